//! `update-agent cancel`: stop a running install, or drop a staged update before the reboot;
//! the booted slot boots next again. Only a stage that has not booted yet can be cancelled (a
//! running trial is decided by the health check, or by `rollback`).
//!
//! A running install is in another process (the daemon, `apply`, the D-Bus service) or on
//! another thread of this one: it holds the install lock, which names its pid. `cancel`
//! writes that pid into `<state dir>/cancel-request`; the installer watches that file
//! ([`watch`]) and stops at its next chunk boundary (resume checkpoints kept, the slot left
//! disabled, the record `failed` with kind `install_cancelled`). `cancel` returns once the
//! lock is free again, so the install has stopped when it answers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::boot::SlotId;
use crate::error::AgentError;
use crate::host::Host;
use crate::install::CancelToken;
use crate::state::{InstallLock, Phase, StateError, Transition};

/// The request file inside the state directory: the pid of the install to stop.
pub(crate) const CANCEL_REQUEST_FILE: &str = "cancel-request";
/// How long `cancel` waits for a running install to stop.
const STOP_PATIENCE: Duration = Duration::from_secs(60);
/// How often the installer looks at the request file, and `cancel` at the lock.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Serialize)]
pub struct CancelReport {
    /// `install`: a running install was stopped; `stage`: a staged update was dropped.
    pub stopped: &'static str,
    pub slot: SlotId,
    pub version: String,
    pub next: Option<SlotId>,
}

impl CancelReport {
    pub(crate) fn render(&self) -> String {
        format!(
            "cancelled: {} {}in slot {} will not boot; next boot: {}",
            self.version,
            if self.stopped == "install" {
                "(install stopped, resumable) "
            } else {
                ""
            },
            self.slot,
            self.next
                .map(|s| format!("slot {s}"))
                .unwrap_or_else(|| "NOTHING BOOTABLE".into())
        )
    }
}

fn request_path(dir: &Path) -> PathBuf {
    dir.join(CANCEL_REQUEST_FILE)
}

/// Whether the request file names this process.
fn requested(dir: &Path) -> bool {
    std::fs::read_to_string(request_path(dir))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        == Some(std::process::id())
}

/// The installer's side: a token cancelled once `<dir>/cancel-request` names this process,
/// watched by a task that ends with the returned guard.
pub(crate) fn watch(dir: &Path) -> (CancelToken, WatchGuard) {
    let token = CancelToken::default();
    let (t, dir) = (token.clone(), dir.to_path_buf());
    let task = tokio::spawn(async move {
        loop {
            if requested(&dir) {
                tracing::info!("cancel requested: stopping the install");
                let _ = std::fs::remove_file(request_path(&dir));
                t.cancel();
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    });
    (token, WatchGuard(task))
}

/// Stops the request watcher of [`watch`] when dropped.
#[derive(Debug)]
pub(crate) struct WatchGuard(tokio::task::JoinHandle<()>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Ask the install of process `pid` to stop and wait until it let go of the install lock.
fn stop_running_install(dir: &Path, pid: u32) -> Result<InstallLock, AgentError> {
    let path = request_path(dir);
    let tmp = path.with_extension("tmp");
    let io = |source| AgentError::Io {
        what: format!("writing {}", path.display()),
        source,
    };
    std::fs::write(&tmp, format!("{pid}\n")).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    tracing::info!(pid, "asked the running install to stop");
    let started = Instant::now();
    let lock = loop {
        match InstallLock::acquire(dir) {
            Ok(lock) => break lock,
            Err(StateError::Locked { .. }) if started.elapsed() < STOP_PATIENCE => {
                std::thread::sleep(POLL);
            }
            Err(StateError::Locked { .. }) => {
                let _ = std::fs::remove_file(&path);
                return Err(AgentError::CancelTimeout {
                    pid,
                    waited_secs: STOP_PATIENCE.as_secs(),
                });
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e.into());
            }
        }
    };
    // Under the lock no install runs: a request it did not consume is stale.
    let _ = std::fs::remove_file(&path);
    Ok(lock)
}

pub fn cancel(host: &Host) -> Result<CancelReport, AgentError> {
    let dir = host.state.dir();
    let (_lock, stopped_install) = match InstallLock::acquire(dir) {
        Ok(lock) => (lock, false),
        Err(StateError::Locked { pid: Some(pid), .. }) => (stop_running_install(dir, pid)?, true),
        Err(e) => return Err(e.into()),
    };
    let state = host.state.load()?;
    if stopped_install {
        if let Phase::Failed { kind, .. } = &state.phase {
            if kind == "install_cancelled" {
                let last = state.history.last();
                let slot = last.and_then(|e| e.slot);
                let version = last.and_then(|e| e.version.clone()).unwrap_or_default();
                let next = host.boot_control()?.status()?.next;
                if let Some(slot) = slot {
                    return Ok(CancelReport {
                        stopped: "install",
                        slot,
                        version,
                        next,
                    });
                }
            }
        }
        // It had got past its last chunk: what it staged is dropped below.
    }
    let (slot, version) = match &state.phase {
        Phase::Staged { slot, version } => (*slot, version.clone()),
        Phase::Trial { slot, version, .. } => {
            return Err(AgentError::AlreadyOnTrial {
                slot: *slot,
                version: version.clone(),
            })
        }
        other => {
            return Err(AgentError::NothingStaged {
                phase: serde_json::to_string(other).unwrap_or_default(),
            })
        }
    };
    let slots = host.slots()?;
    let booted = host.booted_slot(&slots)?.slot;
    if booted == slot {
        return Err(AgentError::AlreadyOnTrial { slot, version });
    }
    let mut boot = host.boot_control()?;
    boot.cancel(slot)?;
    let next = boot.status()?.next;
    host.state.transition(Transition::Cancelled {
        slot,
        version: version.clone(),
        reason: "stage cancelled by the operator before the reboot".into(),
    })?;
    tracing::info!(%slot, version, "stage cancelled");
    Ok(CancelReport {
        stopped: "stage",
        slot,
        version,
        next,
    })
}
