//! Hooks (docs/hooks.md): operator programs run at three points of an update, each with a
//! timeout, in its own process group (killed whole at the timeout), output captured, and
//! every run recorded in the history.
//!
//! - `post_install`: the slot is written and read back, not yet staged. A failure leaves it
//!   unstaged (RAUC's install hooks, update_engine's postinstall).
//! - `pre_reboot`: just before `[reboot] command` (e.g. `kubectl drain`; with FleetLock, after
//!   the slot is taken). A failure cancels the reboot.
//! - `post_commit`: after the booted slot is committed (e.g. `kubectl uncordon`). A failure is
//!   recorded; the commit stands.

use std::process::Command;
use std::time::Instant;

use crate::config::{HookConfig, HooksConfig};
use crate::state::{HookRecord, StateStore};

/// Where a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HookPoint {
    PostInstall,
    PreReboot,
    PostCommit,
}

impl HookPoint {
    pub(crate) fn name(self) -> &'static str {
        match self {
            HookPoint::PostInstall => "post_install",
            HookPoint::PreReboot => "pre_reboot",
            HookPoint::PostCommit => "post_commit",
        }
    }

    fn config(self, hooks: &HooksConfig) -> Option<&HookConfig> {
        match self {
            HookPoint::PostInstall => hooks.post_install.as_ref(),
            HookPoint::PreReboot => hooks.pre_reboot.as_ref(),
            HookPoint::PostCommit => hooks.post_commit.as_ref(),
        }
    }
}

/// A hook that did not succeed.
#[derive(Debug, thiserror::Error)]
#[error("{hook} hook {command:?} failed: {status}{}", tail_note(.output_tail))]
pub struct HookError {
    pub hook: &'static str,
    pub command: Vec<String>,
    pub status: String,
    pub output_tail: String,
}

fn tail_note(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; output: {tail}")
    }
}

impl HookError {
    pub(crate) fn kind(&self) -> &'static str {
        "hook_failed"
    }
}

/// Run the hook configured for `point` (nothing when unset) with `env` added to the
/// agent's environment plus `UPDATE_AGENT_HOOK`, record the run in the history of `store`
/// (best effort: a hook's verdict does not depend on the state file), and return it.
pub(crate) fn run(
    hooks: &HooksConfig,
    point: HookPoint,
    env: &[(String, String)],
    store: &StateStore,
    version: Option<&str>,
) -> Result<Option<HookRecord>, HookError> {
    let Some(cfg) = point.config(hooks) else {
        return Ok(None);
    };
    let span = tracing::info_span!("hook", hook = point.name(), command = ?cfg.command);
    let _guard = span.enter();
    let Some((program, args)) = cfg.command.split_first() else {
        return Ok(None);
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("UPDATE_AGENT_HOOK", point.name());
    let started = Instant::now();
    tracing::info!(timeout = ?cfg.timeout.get(), "running hook");
    let (passed, timed_out, status, output_tail) =
        crate::health::runner::run_command(cmd, cfg.timeout.get());
    let record = HookRecord {
        name: point.name().to_string(),
        command: cfg.command.clone(),
        passed,
        timed_out,
        status,
        duration_ms: crate::jsonout::millis::to_ms(started.elapsed()),
        output_tail,
    };
    if passed {
        tracing::info!(status = %record.status, duration_ms = record.duration_ms, "hook passed");
    } else {
        tracing::warn!(status = %record.status, output = %record.output_tail, "hook failed");
    }
    let recorded = store.transition(crate::state::transition::Transition::HookRan {
        version: version.map(str::to_string),
        record: record.clone(),
    });
    if let Err(e) = recorded {
        tracing::warn!(error = %e, "could not record the hook in the history");
    }
    if record.passed {
        Ok(Some(record))
    } else {
        Err(HookError {
            hook: point.name(),
            command: record.command,
            status: record.status,
            output_tail: record.output_tail,
        })
    }
}
