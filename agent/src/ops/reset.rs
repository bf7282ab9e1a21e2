//! `update-agent state reset`: move the state record aside and start afresh (the way out of a
//! corrupt record). The serial floor and the denylist are kept unless `--all`: forgetting them
//! would reopen replays of older manifests and reinstalls of releases rolled back from.

use crate::error::AgentError;
use crate::host::Host;
use crate::state::{InstallLock, ResetReport};

/// Resets the record under the install lock (never in the middle of an install).
pub(crate) fn reset(host: &Host, all: bool) -> Result<ResetReport, AgentError> {
    let _lock = InstallLock::acquire(host.state.dir())?;
    let report = host.state.reset(all)?;
    tracing::warn!(moved_to = ?report.moved_to, all, "state record reset");
    Ok(report)
}
