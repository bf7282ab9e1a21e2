//! After the reboot: the check runner (required/wanted executables and declared checks, each
//! under a timeout), the per-boot journal that makes a second run on the same boot harmless,
//! and the rollback drill's marker.
//!
//! The decisions (commit, roll back, detect a fallback) live in `ops::health`; this module only
//! runs checks and keeps records.

pub mod drill;
pub mod journal;
pub mod runner;

use std::path::PathBuf;
use std::time::Duration;

/// The raw `[[health.checks]]` entry is configuration; the runner takes it from there.
pub use crate::config::CheckSpec;
use crate::config::Config;

/// Errors of the health layer (journal, drill marker, check set-up).
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("I/O error on {path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("health journal {path} is corrupt ({source}); it was left untouched: inspect it or move it aside", path = path.display())]
    JournalCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("drill marker {path} is corrupt ({source}); remove it with `update-agent drill disarm`", path = path.display())]
    MarkerCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("health check {index} in the configuration: {message}")]
    BadCheck { index: usize, message: String },
    /// `update-agent commit` found no passed health check on this boot to commit.
    #[error("nothing to commit on boot {boot_id}: {why}")]
    NotPassed { boot_id: String, why: String },
}

impl HealthError {
    /// A stable machine-readable kind.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            HealthError::Io { .. } => "health_io",
            HealthError::JournalCorrupt { .. } => "health_journal_corrupt",
            HealthError::MarkerCorrupt { .. } => "drill_marker_corrupt",
            HealthError::Serialize { .. } => "health_serialize",
            HealthError::BadCheck { .. } => "health_bad_check",
            HealthError::NotPassed { .. } => "health_not_passed",
        }
    }
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> HealthError + '_ {
    move |source| HealthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the health check needs from `[health]`.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    pub required_dir: PathBuf,
    pub wanted_dir: PathBuf,
    pub check_timeout: Duration,
    pub total_timeout: Duration,
    pub reboot_on_failure: bool,
    pub checks: Vec<CheckSpec>,
}

impl HealthSettings {
    pub(crate) fn from_config(config: &Config) -> HealthSettings {
        let h = &config.health;
        HealthSettings {
            required_dir: h.required_dir.clone(),
            wanted_dir: h.wanted_dir.clone(),
            check_timeout: h.check_timeout.get(),
            total_timeout: h.total_timeout.get(),
            reboot_on_failure: h.reboot_on_failure,
            checks: h.checks.clone(),
        }
    }
}
