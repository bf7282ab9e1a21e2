//! Rebooting: the host's [`crate::host::Reboot`] (by default `[reboot] command`, i.e.
//! `systemctl reboot`).

use crate::error::AgentError;
use crate::host::Host;

/// Asks the host to reboot. Returns when the request has been accepted; the reboot itself
/// happens after this process is asked to stop.
pub fn reboot(host: &Host) -> Result<(), AgentError> {
    // The pre-reboot hook (e.g. a drain). Into a staged release its failure cancels the
    // reboot; any other reboot (back to the old slot after a rollback) goes ahead anyway:
    // a failed drain must not keep a host on the release it is leaving.
    let version = host.state.load().ok().and_then(|s| match s.phase {
        crate::state::Phase::Staged { version, .. } => Some(version),
        _ => None,
    });
    let mut env = vec![(
        "UPDATE_AGENT_REBOOT_INTO".to_string(),
        if version.is_some() {
            "update"
        } else {
            "rollback"
        }
        .to_string(),
    )];
    if let Some(v) = &version {
        env.push(("UPDATE_AGENT_VERSION".to_string(), v.clone()));
    }
    if let Err(e) = crate::hooks::run(
        &host.config.hooks,
        crate::hooks::HookPoint::PreReboot,
        &env,
        &host.state,
        version.as_deref(),
    ) {
        if version.is_some() {
            return Err(e.into());
        }
        tracing::warn!(kind = e.kind(), error = %e, "pre-reboot hook failed; rebooting anyway (not into an update)");
    }
    host.reboot.request()
}
