//! Prometheus text-format metrics for node_exporter's textfile collector.
//!
//! Counters the state record does not keep (bytes downloaded, checks, failures by kind) live
//! in `<state_dir>/metrics.json`, so they survive restarts and reboots; the rest is read from
//! the state record when the file is rendered. The `.prom` file is replaced atomically, so the
//! collector never reads half a file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::FleetError;
use crate::state::{HistoryEvent, State};

/// Counter file inside the state directory.
pub(crate) const COUNTERS_FILE: &str = "metrics.json";

/// Persisted counters and last values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub checks_total: u64,
    pub check_failures_total: u64,
    /// Unix seconds of the last manifest check (successful or not).
    pub last_check_unix: Option<i64>,
    /// Unix seconds of the last successful manifest check.
    pub last_success_unix: Option<i64>,
    pub downloaded_bytes_total: u64,
    /// Image bytes delta installs copied from the slots instead of downloading them.
    pub delta_reused_bytes_total: u64,
    /// HTTP requests made by delta installs (index and ranges).
    pub delta_requests_total: u64,
    /// Delta installs that fell back to the full stream.
    pub delta_fallbacks_total: u64,
    pub installs_total: u64,
    /// Seconds the last successful install took.
    pub last_install_seconds: Option<f64>,
    /// Failed daemon cycles by error kind.
    pub failures_by_kind: BTreeMap<String, u64>,
    /// Rollbacks counted so far, and the time of the newest one counted: the history is
    /// trimmed to its last entries, so a counter read from it could go down.
    pub rollbacks_total: u64,
    pub last_rollback_counted: Option<i64>,
}

impl Counters {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(COUNTERS_FILE)
    }

    /// The stored counters; a missing or unreadable file starts from zero (metrics are
    /// diagnostics: losing them must not stop updates), with a warning for a corrupt one.
    pub(crate) fn load(state_dir: &Path) -> Counters {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "metrics counters corrupt; starting from zero");
                Counters::default()
            }),
            Err(_) => Counters::default(),
        }
    }

    pub(crate) fn save(&self, state_dir: &Path) -> Result<(), FleetError> {
        let path = Self::path(state_dir);
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| FleetError::Corrupt {
            what: "metrics counters",
            path: path.clone(),
            source,
        })?;
        crate::state::atomic::write_atomic(&path, &bytes, 0o644).map_err(|source| FleetError::Io {
            what: "writing metrics counters",
            path,
            source,
        })
    }
}

/// Values only the running daemon knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Live {
    pub wave_seed: Option<u32>,
    /// Unix seconds from which the offered release may be installed on this host.
    pub eligible_from: Option<i64>,
    pub fleetlock_held: bool,
    /// Version running in the booted slot.
    pub running_version: Option<String>,
}

/// Every phase name, so each series exists (0 or 1) and alerts can match on absence of 1.
pub(crate) const PHASES: [&str; 8] = [
    "idle",
    "downloading",
    "staged",
    "trial",
    "committed",
    "rolled_back",
    "failed",
    "unknown",
];

/// The state record's phase name as used in metrics and reports.
impl Counters {
    /// Counts the rollbacks the history gained since the last call (the health check records
    /// them, possibly in another process and boot).
    pub(crate) fn count_rollbacks(&mut self, state: &State) {
        let mut newest = self.last_rollback_counted;
        for h in state
            .history
            .iter()
            .filter(|h| h.event == HistoryEvent::RolledBack)
        {
            let at = h.at.as_nanosecond() as i64;
            if self.last_rollback_counted.is_none_or(|seen| at > seen) {
                self.rollbacks_total += 1;
                newest = newest.max(Some(at));
            }
        }
        self.last_rollback_counted = newest;
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The metrics in Prometheus text format.
pub fn render(c: &Counters, state: &State, live: &Live) -> String {
    let mut out = String::new();
    let one = |v: f64| vec![(String::new(), v)];
    if let Some(t) = c.last_check_unix {
        metric(
            &mut out,
            "update_agent_last_check_timestamp_seconds",
            "gauge",
            "Unix time of the last manifest check.",
            &one(t as f64),
        );
    }
    if let Some(t) = c.last_success_unix {
        metric(
            &mut out,
            "update_agent_last_successful_check_timestamp_seconds",
            "gauge",
            "Unix time of the last manifest check that verified.",
            &one(t as f64),
        );
    }
    metric(
        &mut out,
        "update_agent_checks_total",
        "counter",
        "Manifest checks.",
        &one(c.checks_total as f64),
    );
    metric(
        &mut out,
        "update_agent_check_failures_total",
        "counter",
        "Manifest checks that failed (fetch or verification).",
        &one(c.check_failures_total as f64),
    );
    let current = state.phase.name();
    let phases: Vec<(String, f64)> = PHASES
        .iter()
        .map(|p| {
            (
                format!("{{phase=\"{p}\"}}"),
                if *p == current { 1.0 } else { 0.0 },
            )
        })
        .collect();
    metric(
        &mut out,
        "update_agent_phase",
        "gauge",
        "Where the update flow stands (1 for the current phase).",
        &phases,
    );
    let versions: Vec<(String, f64)> = state
        .slots
        .iter()
        .map(|(slot, r)| {
            let running = live.running_version.as_deref() == Some(r.version.as_str());
            (
                format!(
                    "{{slot=\"{slot}\",version=\"{}\",verified=\"{}\",running=\"{running}\"}}",
                    escape(&r.version),
                    r.verified
                ),
                1.0,
            )
        })
        .collect();
    metric(
        &mut out,
        "update_agent_slot_version_info",
        "gauge",
        "The release each slot holds.",
        &versions,
    );
    if let Some(v) = &live.running_version {
        metric(
            &mut out,
            "update_agent_running_version_info",
            "gauge",
            "The release the booted slot runs.",
            &[(format!("{{version=\"{}\"}}", escape(v)), 1.0)],
        );
    }
    metric(
        &mut out,
        "update_agent_downloaded_bytes_total",
        "counter",
        "Image bytes fetched by installs.",
        &one(c.downloaded_bytes_total as f64),
    );
    metric(
        &mut out,
        "update_agent_delta_reused_bytes_total",
        "counter",
        "Image bytes delta installs copied from the slots instead of downloading them.",
        &one(c.delta_reused_bytes_total as f64),
    );
    metric(
        &mut out,
        "update_agent_delta_requests_total",
        "counter",
        "HTTP requests made by delta installs (chunk index and ranges).",
        &one(c.delta_requests_total as f64),
    );
    metric(
        &mut out,
        "update_agent_delta_fallbacks_total",
        "counter",
        "Delta installs that fell back to the full image stream.",
        &one(c.delta_fallbacks_total as f64),
    );
    metric(
        &mut out,
        "update_agent_installs_total",
        "counter",
        "Installs that completed and staged a slot.",
        &one(c.installs_total as f64),
    );
    if let Some(s) = c.last_install_seconds {
        metric(
            &mut out,
            "update_agent_install_duration_seconds",
            "gauge",
            "How long the last completed install took.",
            &one(s),
        );
    }
    let failures: Vec<(String, f64)> = c
        .failures_by_kind
        .iter()
        .map(|(k, n)| (format!("{{kind=\"{}\"}}", escape(k)), *n as f64))
        .collect();
    metric(
        &mut out,
        "update_agent_failures_total",
        "counter",
        "Failed daemon cycles by error kind.",
        &failures,
    );
    metric(
        &mut out,
        "update_agent_rollbacks_total",
        "counter",
        "Rollbacks (failed trial boots and fallbacks) this host has recorded.",
        &one(c.rollbacks_total as f64),
    );
    metric(
        &mut out,
        "update_agent_denylisted_versions",
        "gauge",
        "Releases this host rolled back from and will not install again.",
        &one(state.denylist.len() as f64),
    );
    if let Some(seed) = live.wave_seed {
        metric(
            &mut out,
            "update_agent_wave_seed",
            "gauge",
            "This host's rollout seed (0..2048).",
            &one(f64::from(seed)),
        );
    }
    if let Some(at) = live.eligible_from {
        metric(
            &mut out,
            "update_agent_eligible_timestamp_seconds",
            "gauge",
            "When the offered release's waves admit this host.",
            &one(at as f64),
        );
    }
    metric(
        &mut out,
        "update_agent_fleetlock_held",
        "gauge",
        "1 while this host holds a FleetLock reboot slot.",
        &one(if live.fleetlock_held { 1.0 } else { 0.0 }),
    );
    out
}

/// Replace the `.prom` file atomically (mode 0644: node_exporter runs as another user).
pub(crate) fn write(path: &Path, text: &str) -> Result<(), FleetError> {
    crate::state::atomic::write_atomic(path, text.as_bytes(), 0o644).map_err(|source| {
        FleetError::Io {
            what: "writing metrics",
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::state::{HistoryEntry, Phase, State};

    /// The rollback counter never goes down, though the history it counts from is trimmed,
    /// and counts each rollback once however often it is updated.
    #[test]
    fn rollbacks_total_is_monotonic_across_history_trimming() {
        let mut c = Counters::default();
        let mut state = State::default();
        state.record(HistoryEntry::stamped(
            HistoryEvent::RolledBack,
            jiff::Timestamp::now(),
        ));
        c.count_rollbacks(&state);
        c.count_rollbacks(&state);
        assert_eq!(c.rollbacks_total, 1);
        // The history fills up with other events until the rollback is trimmed away.
        for _ in 0..crate::state::HISTORY_LIMIT {
            state.record(HistoryEntry::stamped(
                HistoryEvent::Committed,
                jiff::Timestamp::now(),
            ));
        }
        assert!(state
            .history
            .iter()
            .all(|h| h.event != HistoryEvent::RolledBack));
        c.count_rollbacks(&state);
        assert_eq!(c.rollbacks_total, 1);
        let mut later = HistoryEntry::stamped(HistoryEvent::RolledBack, jiff::Timestamp::now());
        later.at += jiff::SignedDuration::from_secs(1);
        state.record(later);
        c.count_rollbacks(&state);
        assert_eq!(c.rollbacks_total, 2);
        let text = render(&c, &state, &Live::default());
        assert!(
            text.lines().any(|l| l == "update_agent_rollbacks_total 2"),
            "{text}"
        );
    }

    #[test]
    fn renders_every_family_with_help_type_and_escaped_labels() {
        let mut c = Counters {
            checks_total: 3,
            last_check_unix: Some(1_700_000_000),
            downloaded_bytes_total: 4096,
            delta_reused_bytes_total: 1 << 20,
            delta_requests_total: 7,
            delta_fallbacks_total: 1,
            ..Counters::default()
        };
        c.failures_by_kind.insert("fetch_\"odd\"\nkind".into(), 2);
        let mut state = State {
            phase: Phase::RolledBack {
                reason: "x".into(),
                from_version: None,
            },
            ..State::default()
        };
        state.record(HistoryEntry::stamped(
            HistoryEvent::RolledBack,
            jiff::Timestamp::now(),
        ));
        c.count_rollbacks(&state);
        let live = Live {
            wave_seed: Some(17),
            fleetlock_held: true,
            running_version: Some("1.0.0".into()),
            ..Live::default()
        };
        let text = render(&c, &state, &live);
        for line in [
            "update_agent_checks_total 3",
            "update_agent_last_check_timestamp_seconds 1700000000",
            "update_agent_downloaded_bytes_total 4096",
            "update_agent_delta_reused_bytes_total 1048576",
            "update_agent_delta_requests_total 7",
            "update_agent_delta_fallbacks_total 1",
            "update_agent_phase{phase=\"rolled_back\"} 1",
            "update_agent_phase{phase=\"idle\"} 0",
            "update_agent_rollbacks_total 1",
            "update_agent_failures_total{kind=\"fetch_\\\"odd\\\"\\nkind\"} 2",
            "update_agent_running_version_info{version=\"1.0.0\"} 1",
            "update_agent_wave_seed 17",
            "update_agent_fleetlock_held 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // Every sample line belongs to a family announced with HELP and TYPE.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
    }

    #[test]
    fn counters_survive_a_restart_and_a_corrupt_file_starts_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let c = Counters {
            installs_total: 2,
            ..Counters::default()
        };
        c.save(dir.path()).unwrap();
        assert_eq!(Counters::load(dir.path()), c);
        std::fs::write(dir.path().join(COUNTERS_FILE), "{not json").unwrap();
        assert_eq!(Counters::load(dir.path()), Counters::default());
    }
}
