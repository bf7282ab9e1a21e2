//! Marking the booted slot good (`update-agent mark-good`, and the health check's pass).

use serde::Serialize;

use crate::boot::{BootControl, SlotId};
use crate::error::AgentError;
use crate::host::Host;
use crate::state::Transition;

#[derive(Debug, Clone, Serialize)]
pub struct CommitReport {
    pub slot: SlotId,
    pub version: Option<String>,
}

impl CommitReport {
    pub(crate) fn render(&self) -> String {
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
    commit_slot(
        host,
        host.boot_control()?.as_mut(),
        booted,
        "marked good by the operator",
    )
}

/// [`mark_good`] on behalf of someone other than the operator (e.g. a sandbox's factory
/// setup), recorded in the history with `reason`.
pub fn mark_good_because(host: &Host, reason: &str) -> Result<CommitReport, AgentError> {
    let _lock = crate::state::InstallLock::acquire(host.state.dir())?;
    let slots = host.slots()?;
    let booted = host.booted_slot(&slots)?.slot;
    commit_slot(host, host.boot_control()?.as_mut(), booted, reason)
}

/// Commit `slot` (the booted one) through the command's `boot` control and record it with
/// `reason`. The caller holds the lock.
pub(crate) fn commit_slot(
    host: &Host,
    boot: &mut dyn BootControl,
    slot: SlotId,
    reason: &str,
) -> Result<CommitReport, AgentError> {
    boot.commit(slot)?;
    let version = host
        .state
        .transition(Transition::Committed {
            slot,
            reason: reason.to_string(),
        })?
        .version;
    tracing::info!(%slot, version = ?version, reason, "slot committed");
    // The post-commit hook (e.g. an uncordon): recorded in the history; the commit stands.
    let mut env = vec![("UPDATE_AGENT_SLOT".to_string(), slot.to_string())];
    if let Some(v) = &version {
        env.push(("UPDATE_AGENT_VERSION".to_string(), v.clone()));
    }
    if let Err(e) = crate::hooks::run(
        &host.config.hooks,
        crate::hooks::HookPoint::PostCommit,
        &env,
        &host.state,
        version.as_deref(),
    ) {
        tracing::warn!(kind = e.kind(), error = %e, "post-commit hook failed; the commit stands");
    }
    Ok(CommitReport { slot, version })
}
