//! Rebooting through the configured command (default `systemctl reboot`).

use std::process::Command;

use crate::error::AgentError;
use crate::host::Host;

/// Runs `[reboot] command`. Returns when the command has accepted the request; the reboot
/// itself happens after this process is asked to stop.
pub fn reboot(host: &Host) -> Result<(), AgentError> {
    let cmd = &host.config.reboot.command;
    let Some((program, args)) = cmd.split_first() else {
        return Err(AgentError::Refused(
            "[reboot] command is empty: nothing to run".into(),
        ));
    };
    tracing::info!(command = ?cmd, "rebooting");
    let status = Command::new(program)
        .args(args)
        .status()
        .map_err(|source| AgentError::Io {
            what: format!("running reboot command {program}"),
            source,
        })?;
    if !status.success() {
        return Err(AgentError::Refused(format!(
            "reboot command {cmd:?} failed: {status}"
        )));
    }
    Ok(())
}
