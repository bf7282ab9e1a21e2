//! Install progress: one bar for the whole install on a terminal, a few plain lines when
//! stderr is not a terminal, one JSON line per step with `--json`.
//!
//! The bar shows [`crate::progress::Tally`]'s one count for the whole install, so its rate and
//! ETA follow the download.

use std::io::Write;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::install::{Phase, ProgressEvent};
use crate::progress::Tally;

/// How progress is shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// `--json`: `{"progress": event}` lines.
    Json,
    /// stderr is a terminal: one redrawn bar.
    Bar,
    /// Neither: a line per target when it starts and when it is verified.
    Plain,
}

/// Turns pipeline events into what the operator sees on stderr.
#[derive(Debug)]
pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    tally: Tally,
    /// Roles already announced (plain mode).
    started: std::collections::BTreeSet<String>,
    last: Option<(String, Phase)>,
    last_done: u64,
    last_total: u64,
}

impl Progress {
    pub fn new(mode: ProgressMode) -> Progress {
        Progress {
            mode,
            bar: None,
            tally: Tally::default(),
            started: Default::default(),
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
        let was = self.last.as_ref().map(|(_, p)| *p);
        self.tally.event(&ev);
        match self.mode {
            ProgressMode::Json => {
                // One line per step, plus one per 10% of bytes while writing or verifying.
                let percent = |n: u64| (n * 10).checked_div(ev.total).unwrap_or(10);
                let tick = !new_step && percent(ev.done) != self.last_percent();
                if new_step || tick || ev.done == ev.total {
                    let line = crate::jsonout::versioned(&serde_json::json!({"progress": ev}));
                    let _ = writeln!(std::io::stderr().lock(), "{line}");
                }
                self.last_done = ev.done;
                self.last_total = ev.total;
            }
            ProgressMode::Plain => {
                // What a log reader wants: each image once when it starts, once when verified.
                let first = !ev.role.is_empty() && self.started.insert(ev.role.clone());
                let line = match ev.phase {
                    _ if first => Some(format!("{}: writing {}", ev.role, HumanBytes(ev.total))),
                    Phase::Done => Some(format!(
                        "{}: {} written and read back",
                        ev.role,
                        HumanBytes(ev.total)
                    )),
                    Phase::Restarted => Some(format!("{}: download restarted from 0", ev.role)),
                    _ => None,
                };
                if let Some(line) = line {
                    let _ = writeln!(std::io::stderr().lock(), "{line}");
                }
            }
            ProgressMode::Bar => {
                let Some(view) = self.tally.view() else {
                    return;
                };
                let bar = self.bar.get_or_insert_with(|| {
                    let bar = ProgressBar::new(view.total);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{msg:16} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar
                });
                // Bytes re-hashed from disk on a resume are not download speed.
                if was == Some(Phase::Rehashing) && ev.phase == Phase::Writing {
                    bar.reset_eta();
                }
                bar.set_length(view.total);
                bar.set_position(view.done);
                bar.set_message(view.message());
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
