//! Install progress: a bar with rate and ETA on a terminal, one JSON line per step otherwise.

use std::io::Write;

use indicatif::{ProgressBar, ProgressStyle};

use crate::install::{Phase, ProgressEvent};

/// Turns pipeline events into what the operator sees on stderr.
#[derive(Debug)]
pub struct Progress {
    json: bool,
    bar: Option<ProgressBar>,
    last: Option<(String, Phase)>,
    last_done: u64,
    last_total: u64,
}

impl Progress {
    pub fn new(json: bool) -> Progress {
        Progress {
            json,
            bar: None,
            last: None,
            last_done: 0,
            last_total: 0,
        }
    }

    fn last_percent(&self) -> u64 {
        (self.last_done * 10)
            .checked_div(self.last_total)
            .unwrap_or(10)
    }

    pub fn event(&mut self, ev: ProgressEvent) {
        let step = (ev.role.clone(), ev.phase);
        let new_step = self.last.as_ref() != Some(&step);
        if self.json {
            // One line per step, plus one per 10% of bytes while writing or verifying.
            let percent = |n: u64| (n * 10).checked_div(ev.total).unwrap_or(10);
            let tick = !new_step && percent(ev.done) != self.last_percent();
            if new_step || tick || ev.done == ev.total {
                let line = serde_json::json!({"progress": ev});
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
            self.last_done = ev.done;
            self.last_total = ev.total;
        } else {
            if new_step {
                if let Some(bar) = self.bar.take() {
                    bar.finish();
                }
                let bar = ProgressBar::new(ev.total);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg:24} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_message(format!("{} {:?}", ev.role, ev.phase).to_lowercase());
                self.bar = Some(bar);
            }
            if let Some(bar) = &self.bar {
                bar.set_length(ev.total);
                bar.set_position(ev.done);
            }
        }
        self.last = Some(step);
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
