//! Rolling back: `update-agent rollback` (the operator's), and the shared step the health
//! check uses after a failed trial or a fallback. The target must hold a verified image (the
//! state record says so) and be marked good in the boot flags (the backend checks that); the
//! version left behind goes on the local denylist so it is not installed again unless forced.

use serde::Serialize;

use crate::boot::{BootControl, SlotId};
use crate::error::AgentError;
use crate::host::Host;
use crate::state::{Phase, Transition};

#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    pub from: SlotId,
    pub from_version: Option<String>,
    pub to: SlotId,
    pub to_version: Option<String>,
    /// The version put on the denylist.
    pub denylisted: Option<String>,
    pub reason: String,
    /// The reboot command was run.
    pub rebooting: bool,
}

impl RollbackReport {
    pub fn render(&self) -> String {
        let v = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown version".into());
        let mut out = format!(
            "rolled back: slot {} ({}) boots next instead of slot {} ({}); reason: {}",
            self.to,
            v(&self.to_version),
            self.from,
            v(&self.from_version),
            self.reason
        );
        if let Some(d) = &self.denylisted {
            out += &format!(
                "\n{d} is denylisted: `apply` refuses it unless run with --allow-denylisted"
            );
        }
        out += if self.rebooting {
            "\nrebooting"
        } else {
            "\nreboot to run it (or run `update-agent rollback --reboot`)"
        };
        out
    }
}

/// The operator's rollback to the slot that is not booted. Refuses, changing nothing, when
/// that slot holds no verified image, when it is only staged (use `cancel`), or when the
/// boot flags do not mark it good.
pub fn rollback(host: &Host, reboot: bool) -> Result<RollbackReport, AgentError> {
    let lock = crate::state::InstallLock::acquire(host.state.dir())?;
    let slots = host.slots()?;
    let booted = host.booted_slot(&slots)?.slot;
    let to = booted.other();
    let state = host.state.load()?;
    if let Phase::Staged { slot, version } = &state.phase {
        if *slot == to {
            return Err(AgentError::RollbackTargetStaged {
                slot: to,
                version: version.clone(),
            });
        }
    }
    if !state.slot_verified(to) {
        return Err(AgentError::RollbackTargetUnverified {
            slot: to,
            detail: match state.slots.get(&to) {
                Some(r) => format!("its image ({}) was not verified", r.version),
                None => "this agent has no record of a verified image in it (it was never \
                         installed by this agent, or an install into it was started since)"
                    .to_string(),
            },
        });
    }
    let mut boot = host.boot_control()?;
    let reason = format!("manual rollback from slot {booted} by the operator");
    let mut report = roll_back(host, boot.as_mut(), booted, &reason, true)?;
    drop(lock);
    if reboot {
        crate::ops::reboot::reboot(host)?;
        report.rebooting = true;
    }
    Ok(report)
}

/// Flip the boot flags to `from.other()`, then record it: phase `RolledBack`, a history entry
/// with `reason`, and (if `deny`) the version of `from` on the denylist. The caller holds the
/// install lock. Nothing is recorded when the flag flip is refused.
pub(crate) fn roll_back(
    host: &Host,
    boot: &mut dyn BootControl,
    from: SlotId,
    reason: &str,
    deny: bool,
) -> Result<RollbackReport, AgentError> {
    let to = from.other();
    boot.rollback(to)?;
    tracing::warn!(%from, %to, reason, "rolled back");
    let out = host.state.transition(Transition::RolledBack {
        from,
        reason: reason.to_string(),
        deny,
        error_kind: None,
    })?;
    let (from_version, to_version, denylisted) = (out.version, out.other_version, out.denylisted);
    Ok(RollbackReport {
        from,
        from_version,
        to,
        to_version,
        denylisted,
        reason: reason.to_string(),
        rebooting: false,
    })
}
