//! Install progress below its views: [`Tally`] folds the pipeline's per-target events into one
//! count for the install, and [`live`] publishes that count for `update-agent status` in
//! another process. The CLI's bar and the daemon's status lines both read from here.
//!
//! The pipeline reports per target (`role`) and per phase, and the read-back of each
//! checkpoint interleaves with the writing of the next. The tally counts image bytes written
//! out of the bytes of every image, with the latest phase as the message.

pub mod live;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::install::{Phase, ProgressEvent};

/// The install as one count, folded from the pipeline's per-target events.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    /// Bytes of every image (from the pipeline's first event), 0 until known.
    total: u64,
    /// Per role: (image bytes written so far, image size).
    roles: BTreeMap<String, (u64, u64)>,
    phase: Option<Phase>,
    role: String,
}

/// A snapshot of a [`Tally`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct TallyView {
    pub phase: Phase,
    pub role: String,
    /// Image bytes written (downloaded, hashed and on disk) across all targets.
    pub done: u64,
    /// Image bytes of the whole install.
    pub total: u64,
}

impl Tally {
    /// Takes one pipeline event into the count.
    pub(crate) fn event(&mut self, ev: &ProgressEvent) {
        if ev.phase == Phase::Disabled && ev.role.is_empty() {
            // The first event carries the size of the whole install.
            self.total = ev.total;
        } else {
            let entry = self.roles.entry(ev.role.clone()).or_insert((0, ev.total));
            entry.1 = ev.total;
            match ev.phase {
                // Verifying and flushing report positions of the read-back and the fsync,
                // not new bytes: the count stays on what was written.
                Phase::Writing | Phase::Rehashing => entry.0 = entry.0.max(ev.done),
                Phase::Restarted => entry.0 = 0,
                Phase::Done => entry.0 = ev.total,
                Phase::Disabled | Phase::Flushing | Phase::Verifying => {}
            }
        }
        self.phase = Some(ev.phase);
        self.role.clone_from(&ev.role);
    }

    /// Where the install is, once the pipeline has said anything.
    pub(crate) fn view(&self) -> Option<TallyView> {
        let done: u64 = self.roles.values().map(|(d, _)| *d).sum();
        let sizes: u64 = self.roles.values().map(|(_, t)| *t).sum();
        Some(TallyView {
            phase: self.phase?,
            role: self.role.clone(),
            done,
            total: self.total.max(sizes),
        })
    }
}

impl TallyView {
    /// `writing usr`, `verifying root`, `slot disabled`.
    pub(crate) fn message(&self) -> String {
        let phase = phase_word(self.phase);
        if self.role.is_empty() {
            phase.to_string()
        } else {
            format!("{phase} {}", self.role)
        }
    }
}

/// The phase as a person reads it.
pub(crate) fn phase_word(phase: Phase) -> &'static str {
    match phase {
        Phase::Disabled => "slot disabled",
        Phase::Rehashing => "re-hashing",
        Phase::Writing => "writing",
        Phase::Restarted => "restarted",
        Phase::Flushing => "flushing",
        Phase::Verifying => "verifying",
        Phase::Done => "verified",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::boot::SlotId;

    fn ev(role: &str, phase: Phase, done: u64, total: u64) -> ProgressEvent {
        ProgressEvent {
            slot: SlotId::B,
            role: role.into(),
            phase,
            done,
            total,
        }
    }

    #[test]
    fn tally_counts_written_bytes_across_targets_and_interleaved_readback() {
        let mut t = Tally::default();
        t.event(&ev("", Phase::Disabled, 0, 300));
        t.event(&ev("usr", Phase::Writing, 100, 200));
        t.event(&ev("usr", Phase::Verifying, 20, 200));
        let v = t.view().unwrap();
        assert_eq!((v.done, v.total), (100, 300));
        assert_eq!(v.message(), "verifying usr");
        t.event(&ev("usr", Phase::Writing, 200, 200));
        t.event(&ev("usr", Phase::Done, 200, 200));
        t.event(&ev("oem", Phase::Writing, 50, 100));
        let v = t.view().unwrap();
        assert_eq!((v.done, v.total), (250, 300));
        assert_eq!(v.message(), "writing oem");
        t.event(&ev("oem", Phase::Restarted, 0, 100));
        assert_eq!(t.view().unwrap().done, 200);
    }
}
