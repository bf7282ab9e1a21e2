//! `update-agent cancel`: drop a staged update before the reboot; the booted slot boots next
//! again. Only a stage that has not booted yet can be cancelled (a running trial is decided
//! by the health check, or by `rollback`).

use serde::Serialize;

use crate::boot::SlotId;
use crate::error::AgentError;
use crate::host::Host;
use crate::state::{HistoryEntry, HistoryEvent, Phase};

#[derive(Debug, Clone, Serialize)]
pub struct CancelReport {
    pub slot: SlotId,
    pub version: String,
    pub next: Option<SlotId>,
}

impl CancelReport {
    pub fn render(&self) -> String {
        format!(
            "cancelled: {} in slot {} will not boot; next boot: {}",
            self.version,
            self.slot,
            self.next
                .map(|s| format!("slot {s}"))
                .unwrap_or_else(|| "NOTHING BOOTABLE".into())
        )
    }
}

pub fn cancel(host: &Host) -> Result<CancelReport, AgentError> {
    let _lock = crate::state::InstallLock::acquire(host.state.dir())?;
    let state = host.state.load()?;
    let (slot, version) = match &state.phase {
        Phase::Staged { slot, version } => (*slot, version.clone()),
        Phase::Trial { slot, version, .. } => {
            return Err(AgentError::Refused(format!(
                "{version} in slot {slot} is already on its trial boot: nothing to cancel. \
                 The health check decides, or run `update-agent rollback`"
            )))
        }
        other => {
            return Err(AgentError::Refused(format!(
                "nothing is staged, so there is nothing to cancel (phase: {})",
                serde_json::to_string(other).unwrap_or_default()
            )))
        }
    };
    let slots = host.slots()?;
    let booted = host.booted_slot(&slots)?.slot;
    if booted == slot {
        return Err(AgentError::Refused(format!(
            "slot {slot} ({version}) is the booted slot: it is on its trial boot, nothing to \
             cancel. The health check decides, or run `update-agent rollback`"
        )));
    }
    let mut boot = host.boot_control()?;
    boot.cancel(slot)?;
    let next = boot.status()?.next;
    host.state.update(|s| {
        s.phase = Phase::Idle;
        let mut entry = HistoryEntry::now(HistoryEvent::Cancelled);
        entry.version = Some(version.clone());
        entry.slot = Some(slot);
        entry.reason = Some("stage cancelled by the operator before the reboot".into());
        s.record(entry);
    })?;
    tracing::info!(%slot, version, "stage cancelled");
    Ok(CancelReport {
        slot,
        version,
        next,
    })
}
