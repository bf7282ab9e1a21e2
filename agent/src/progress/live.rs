//! Live install progress for `update-agent status` from another process: the installer
//! (`apply`, the daemon, the demo) folds its progress events into one count ([`Tally`]) and
//! publishes it as `<state_dir>/progress.json`, replaced atomically (temp file + rename) at
//! most [`WRITE_INTERVAL`] apart and on every phase change, and removed when the install ends.
//! `status` shows it while the writer's process is alive.
//!
//! Every publication also goes, as one datagram, to `<state_dir>/progress.sock` when a
//! listener is bound there (the D-Bus service: its `Progress` signals and progress properties
//! come from this one source whichever process installs), and the end of the install as a
//! [`FeedMessage::Ended`]. Sends never block and a missing listener costs one failed syscall.
//!
//! The file is a hint, not a record: it is not fsynced (a power cut loses nothing that
//! matters; the state record's `downloading` phase and the resume checkpoints are the truth),
//! and a file left by a killed process is ignored because its `pid` is gone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::clock::{Clock, Timestamp};
use serde::{Deserialize, Serialize};

use super::Tally;
use crate::install::{Phase, ProgressEvent};

/// The file inside the state directory.
pub(crate) const PROGRESS_FILE: &str = "progress.json";
/// The datagram socket a listener may bind inside the state directory.
pub(crate) const FEED_SOCKET: &str = "progress.sock";

/// One datagram on [`FEED_SOCKET`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum FeedMessage {
    /// What was just published to [`PROGRESS_FILE`].
    Progress(LiveProgress),
    /// The install of process `pid` is over (done or failed).
    Ended { pid: u32 },
}
/// Longest time between two writes while bytes move (so at most 4 renames a second).
pub(crate) const WRITE_INTERVAL: Duration = Duration::from_millis(250);

/// What `status` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LiveProgress {
    /// The installing process.
    pub pid: u32,
    /// The release being installed, when the writer knows it.
    pub version: Option<String>,
    /// `writing`, `verifying`, ... (the pipeline's phase of the latest event).
    pub phase: String,
    pub role: String,
    /// Image bytes written across all images, of `total`.
    pub done: u64,
    pub total: u64,
    /// Download rate over the last few seconds.
    pub bytes_per_second: f64,
    /// Time left at that rate, in JSON `eta_ms` (`null` until a rate is known).
    #[serde(
        rename = "eta_ms",
        serialize_with = "crate::jsonout::millis::from_secs_f64_opt",
        deserialize_with = "eta_from_ms",
        default
    )]
    pub eta_seconds: Option<f64>,
    pub updated_at: Timestamp,
}

fn eta_from_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.map(|ms| ms as f64 / 1000.0))
}

/// The writer side: feed it every pipeline event.
#[derive(Debug)]
pub struct LiveWriter {
    path: PathBuf,
    feed_path: PathBuf,
    /// Unbound, non-blocking; `None` if the socket could not be made (then only the file).
    feed: Option<std::os::unix::net::UnixDatagram>,
    version: Option<String>,
    tally: Tally,
    last_write: Option<Instant>,
    last_phase: Option<Phase>,
    /// (when, bytes done) samples of the last seconds, for the rate.
    samples: std::collections::VecDeque<(Instant, u64)>,
    /// Stamps `updated_at` (the host's clock; rates use the monotonic one).
    clock: std::sync::Arc<dyn Clock>,
}

impl LiveWriter {
    pub fn new(
        state_dir: &Path,
        version: Option<String>,
        clock: std::sync::Arc<dyn Clock>,
    ) -> LiveWriter {
        let feed = std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .ok();
        LiveWriter {
            path: state_dir.join(PROGRESS_FILE),
            feed_path: state_dir.join(FEED_SOCKET),
            feed,
            version,
            tally: Tally::default(),
            last_write: None,
            last_phase: None,
            samples: Default::default(),
            clock,
        }
    }

    pub fn event(&mut self, ev: &ProgressEvent) {
        self.tally.event(ev);
        let Some(view) = self.tally.view() else {
            return;
        };
        let now = Instant::now();
        if ev.phase == Phase::Rehashing || ev.phase == Phase::Restarted {
            // Bytes re-read from disk are not download speed.
            self.samples.clear();
        }
        self.samples.push_back((now, view.done));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            self.samples.pop_front();
        }
        let due = self
            .last_write
            .is_none_or(|t| now.duration_since(t) >= WRITE_INTERVAL);
        if !due && self.last_phase == Some(ev.phase) {
            return;
        }
        let rate = match (self.samples.front(), self.samples.back()) {
            (Some((t0, d0)), Some((t1, d1))) if t1 > t0 && d1 > d0 => {
                (d1 - d0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let live = LiveProgress {
            pid: std::process::id(),
            version: self.version.clone(),
            phase: super::phase_word(view.phase).to_string(),
            role: view.role.clone(),
            done: view.done,
            total: view.total,
            bytes_per_second: rate,
            eta_seconds: (rate > 0.0).then(|| view.total.saturating_sub(view.done) as f64 / rate),
            updated_at: self.clock.now(),
        };
        if let Err(e) = self.publish(&live) {
            tracing::debug!(error = %e, path = %self.path.display(), "cannot publish progress");
        }
        self.send(&FeedMessage::Progress(live));
        self.last_write = Some(now);
        self.last_phase = Some(ev.phase);
    }

    /// To the listener, if one is bound (no listener, a full queue: dropped).
    fn send(&self, msg: &FeedMessage) {
        if let (Some(sock), Ok(bytes)) = (&self.feed, serde_json::to_vec(msg)) {
            let _ = sock.send_to(&bytes, &self.feed_path);
        }
    }

    /// End the install's progress (as dropping does); says whether anything was published,
    /// i.e. whether a [`FeedMessage::Ended`] was sent.
    pub(crate) fn finish(self) -> bool {
        self.last_write.is_some()
    }

    fn publish(&self, live: &LiveProgress) -> std::io::Result<()> {
        let tmp = self
            .path
            .with_extension(format!("json.{}.tmp", std::process::id()));
        let bytes = serde_json::to_vec(live).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &self.path)
    }
}

impl Drop for LiveWriter {
    /// The install is over (done or failed): `status` no longer shows it.
    fn drop(&mut self) {
        if self.last_write.is_some() {
            let _ = std::fs::remove_file(&self.path);
            self.send(&FeedMessage::Ended {
                pid: std::process::id(),
            });
        }
    }
}

/// The running install's progress, if a live process is publishing one.
pub(crate) fn read(state_dir: &Path) -> Option<LiveProgress> {
    let text = std::fs::read(state_dir.join(PROGRESS_FILE)).ok()?;
    let live: LiveProgress = serde_json::from_slice(&text).ok()?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(live.pid).ok()?);
    // Signal 0 checks that the process exists (EPERM: it exists, owned by someone else).
    match nix::sys::signal::kill(pid, None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => Some(live),
        Err(_) => None,
    }
}

impl LiveProgress {
    /// `install: writing usr 12.0 MiB of 24.0 MiB (50%), 20.0 MiB/s, about 1s left`.
    pub(crate) fn render(&self) -> String {
        use indicatif::{HumanBytes, HumanDuration};
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(0);
        let mut out = format!(
            "install{}: {} {} {} of {} ({pct}%)",
            self.version
                .as_deref()
                .map(|v| format!(" of {v}"))
                .unwrap_or_default(),
            self.phase,
            self.role,
            HumanBytes(self.done),
            HumanBytes(self.total)
        );
        if self.bytes_per_second > 0.0 {
            out += &format!(", {}/s", HumanBytes(self.bytes_per_second as u64));
        }
        if let Some(eta) = self.eta_seconds {
            out += &format!(
                ", about {} left",
                HumanDuration(Duration::from_secs_f64(eta.max(0.0)))
            );
        }
        out
    }
}
