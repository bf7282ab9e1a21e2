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

use serde::{Deserialize, Serialize};

use crate::config::{Config, HumanDuration};

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
}

impl HealthError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            HealthError::Io { .. } => "health_io",
            HealthError::JournalCorrupt { .. } => "health_journal_corrupt",
            HealthError::MarkerCorrupt { .. } => "drill_marker_corrupt",
            HealthError::Serialize { .. } => "health_serialize",
            HealthError::BadCheck { .. } => "health_bad_check",
        }
    }
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> HealthError + '_ {
    move |source| HealthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One check declared in the configuration (`[[health.checks]]`): exactly one of `unit`,
/// `http`, `tcp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckSpec {
    /// Shown in logs and history; defaults to `unit:<name>`, `http:<url>` or `tcp:<addr>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A systemd unit that must be active (`systemctl is-active --quiet UNIT`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// An `http://` or `https://` URL that must answer 2xx to a GET.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// A `host:port` that must accept a TCP connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// A failing required check fails the boot; a failing wanted one is only logged.
    pub required: bool,
    /// Overrides `[health] check_timeout` for this check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
}

impl Default for CheckSpec {
    /// Nothing to check yet; required.
    fn default() -> Self {
        CheckSpec {
            name: None,
            unit: None,
            http: None,
            tcp: None,
            required: true,
            timeout: None,
        }
    }
}

impl CheckSpec {
    /// Exactly one target, well-formed.
    pub fn validate(&self) -> Result<(), String> {
        let set = [&self.unit, &self.http, &self.tcp]
            .iter()
            .filter(|o| o.is_some())
            .count();
        if set != 1 {
            return Err("set exactly one of unit, http, tcp".into());
        }
        if let Some(url) = &self.http {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("http = {url:?} is not an http:// or https:// URL"));
            }
        }
        if let Some(addr) = &self.tcp {
            if !addr
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                return Err(format!("tcp = {addr:?} is not host:port"));
            }
        }
        if let Some(unit) = &self.unit {
            if unit.is_empty() || unit.starts_with('-') {
                return Err(format!("unit = {unit:?} is not a unit name"));
            }
        }
        if self.timeout.is_some_and(|t| t.get().is_zero()) {
            return Err("timeout must be more than 0s".into());
        }
        Ok(())
    }

    /// The name shown in reports.
    pub fn display_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        match (&self.unit, &self.http, &self.tcp) {
            (Some(u), _, _) => format!("unit:{u}"),
            (_, Some(h), _) => format!("http:{h}"),
            (_, _, Some(t)) => format!("tcp:{t}"),
            _ => "unnamed".into(),
        }
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
    pub fn from_config(config: &Config) -> HealthSettings {
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
