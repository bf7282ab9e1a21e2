//! `<state_dir>/health.json`: one record per boot the health check ran on, keyed by the
//! kernel's boot id. It makes a second run on the same boot harmless (the recorded verdict is
//! reported, nothing is redone) and gives the drill report its timeline (trial boot, check
//! failure, flag flip, the next boot on the old slot).
//!
//! Written atomically like the state record; a corrupt journal is an error, never replaced.

use std::path::{Path, PathBuf};

use crate::clock::{Clock, Timestamp};
use serde::{Deserialize, Serialize};

use super::runner::CheckResult;
use super::{io_err, HealthError};
use crate::boot::SlotId;

/// File name inside the state directory.
pub(crate) const JOURNAL_FILE: &str = "health.json";
/// Boots kept (oldest dropped first).
pub(crate) const JOURNAL_LIMIT: usize = 64;

/// What kind of boot the health check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootKind {
    /// The staged slot booted for its trial: checks decide.
    Trial,
    /// A slot was staged, but the loader booted the other one: the new slot failed to boot.
    Fallback,
    /// Nothing on trial: the booted slot is confirmed.
    Normal,
}

/// How the run ended (or that it has not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// Checks started and no verdict was recorded: still running, or the agent died.
    InProgress,
    /// The checks passed with `health-check --no-commit`: the commit waits for
    /// `boot-complete.target` (`update-agent commit`, update-agent-commit.service).
    Passed,
    Committed,
    RolledBack,
    FallbackDetected,
    Confirmed,
    /// The verdict could not be carried out (see the reason).
    Error,
    #[serde(other)]
    Unknown,
}

/// One boot's health-check run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRun {
    pub boot_id: String,
    pub booted: SlotId,
    #[serde(default)]
    pub version: Option<String>,
    pub kind: BootKind,
    pub outcome: RunOutcome,
    /// When the check started (the host's clock).
    pub started_at: Timestamp,
    /// When this boot's kernel started (now minus the uptime, read when the check started; see
    /// [`super::drill::kernel_booted_at`]): the drill's timeline puts the boot here. Absent in
    /// records of older agents and when the kernel did not say.
    #[serde(default)]
    pub booted_at: Option<Timestamp>,
    /// When the checks finished (trial boots).
    #[serde(default)]
    pub checks_done_at: Option<Timestamp>,
    /// When the boot flags were flipped back (trial failure or fallback).
    #[serde(default)]
    pub rolled_back_at: Option<Timestamp>,
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
    /// Set when this trial failed on purpose for the rollback drill: when it was armed.
    #[serde(default)]
    pub drill_armed_at: Option<Timestamp>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub checks: Vec<CheckResult>,
    /// The slot rolled back to, when there was a rollback.
    #[serde(default)]
    pub rolled_back_to: Option<SlotId>,
}

impl BootRun {
    /// A run of this boot's check, started `at` (the host's clock).
    pub fn start_at(
        boot_id: &str,
        booted: SlotId,
        version: Option<String>,
        kind: BootKind,
        at: Timestamp,
    ) -> Self {
        BootRun {
            boot_id: boot_id.to_string(),
            booted,
            version,
            kind,
            outcome: RunOutcome::InProgress,
            started_at: at,
            booted_at: None,
            checks_done_at: None,
            rolled_back_at: None,
            finished_at: None,
            drill_armed_at: None,
            reason: None,
            checks: Vec::new(),
            rolled_back_to: None,
        }
    }
}

/// All recorded runs, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Journal {
    #[serde(default)]
    pub runs: Vec<BootRun>,
}

impl Journal {
    pub(crate) fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(JOURNAL_FILE)
    }

    /// The journal in `state_dir`; missing means empty.
    pub fn load(state_dir: &Path) -> Result<Journal, HealthError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| HealthError::JournalCorrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// [`Journal::load`] for the health check: a corrupt journal is moved aside to
    /// `health.json.corrupt-<unix time>` and an empty one is used. It is a log, not a guard:
    /// the state record's phase and denylist still keep a rerun from confirming a failed
    /// slot, and refusing to judge the boot would roll back a good update.
    pub(crate) fn load_or_set_aside(
        state_dir: &Path,
        clock: &dyn Clock,
    ) -> Result<Journal, HealthError> {
        match Self::load(state_dir) {
            Err(HealthError::JournalCorrupt { path, source }) => {
                let aside = state_dir.join(format!("{JOURNAL_FILE}.corrupt-{}", clock.unix()));
                std::fs::rename(&path, &aside).map_err(io_err(&path))?;
                crate::state::atomic::sync_dir(state_dir).map_err(io_err(state_dir))?;
                tracing::warn!(path = %path.display(), aside = %aside.display(), error = %source,
                    "health journal corrupt; moved aside, starting a new one");
                Ok(Journal::default())
            }
            other => other,
        }
    }

    /// Write atomically (0600), keeping the last [`JOURNAL_LIMIT`] runs.
    pub fn save(&self, state_dir: &Path) -> Result<(), HealthError> {
        let mut j = self.clone();
        if j.runs.len() > JOURNAL_LIMIT {
            let drop = j.runs.len() - JOURNAL_LIMIT;
            j.runs.drain(..drop);
        }
        let mut bytes = serde_json::to_vec_pretty(&j).map_err(|source| HealthError::Serialize {
            what: "the health journal",
            source,
        })?;
        bytes.push(b'\n');
        let path = Self::path(state_dir);
        crate::state::atomic::write_atomic(&path, &bytes, 0o600).map_err(io_err(&path))
    }

    /// The run recorded for `boot_id`, if any.
    pub(crate) fn for_boot(&self, boot_id: &str) -> Option<&BootRun> {
        self.runs.iter().rev().find(|r| r.boot_id == boot_id)
    }

    /// Replace the run of the same boot, or append.
    pub fn upsert(&mut self, run: BootRun) {
        match self
            .runs
            .iter_mut()
            .rev()
            .find(|r| r.boot_id == run.boot_id)
        {
            Some(slot) => *slot = run,
            None => self.runs.push(run),
        }
    }
}
