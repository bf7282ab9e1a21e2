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
    commit_slot(host, booted, "marked good by the operator")
}

/// Commit `slot` (the booted one) and record it with `reason`. The caller holds the lock.
pub(crate) fn commit_slot(
    host: &Host,
    slot: SlotId,
    reason: &str,
) -> Result<CommitReport, AgentError> {
    host.boot_control()?.commit(slot)?;
    let version = host.state.update(|s| {
        let version = s.slots.get(&slot).map(|r| r.version.clone());
        s.phase = Phase::Committed {
            slot,
            version: version.clone().unwrap_or_default(),
        };
        let mut entry = HistoryEntry::now(HistoryEvent::Committed);
        entry.version = version.clone();
        entry.slot = Some(slot);
        entry.reason = Some(reason.to_string());
        s.record(entry);
        version
    })?;
    tracing::info!(%slot, version = ?version, reason, "slot committed");
    Ok(CommitReport { slot, version })
}
