//! Marking the booted slot good (`update-agent mark-good`, and the health check's pass).

use serde::Serialize;

use crate::boot::SlotId;
use crate::error::AgentError;
use crate::host::Host;
use crate::state::{HistoryEntry, HistoryEvent, Phase};

#[derive(Debug, Clone, Serialize)]
pub struct CommitReport {
    pub slot: SlotId,
    pub version: Option<String>,
}

impl CommitReport {
    pub fn render(&self) -> String {
        format!(
            "slot {} ({}) marked good: it keeps booting",
            self.slot,
            self.version.as_deref().unwrap_or("unknown version")
        )
    }
}

/// Commits the booted slot in the boot flags and records it.
pub fn mark_good(host: &Host) -> Result<CommitReport, AgentError> {
    let _lock = crate::state::InstallLock::acquire(host.state.dir())?;
    let slots = host.slots()?;
    let booted = host.booted_slot(&slots)?.slot;
    host.boot_control()?.commit(booted)?;
    let version = host.state.update(|s| {
        let version = s.slots.get(&booted).map(|r| r.version.clone());
        s.phase = Phase::Committed {
            slot: booted,
            version: version.clone().unwrap_or_default(),
        };
        let mut entry = HistoryEntry::now(HistoryEvent::Committed);
        entry.version = version.clone();
        entry.slot = Some(booted);
        s.record(entry);
        version
    })?;
    Ok(CommitReport {
        slot: booted,
        version,
    })
}
