//! Status reports: agents `POST /v1/report` their version, phase and last error; the server
//! keeps the newest report per host and summarises the fleet (`GET /_admin/fleet`, and on exit).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::AppState;

/// What an agent says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The host's id (the FleetLock node id).
    pub id: String,
    /// Version the booted slot runs.
    #[serde(default)]
    pub version: Option<String>,
    /// The state phase (`idle`, `staged`, `committed`, `rolled_back`, `failed`, ...).
    pub phase: String,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub wave_seed: Option<u32>,
}

/// Counts across the fleet, plus every host's newest report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSummary {
    pub hosts: usize,
    pub by_version: BTreeMap<String, usize>,
    pub by_phase: BTreeMap<String, usize>,
    /// Hosts whose newest report carries an error.
    pub failing: Vec<Report>,
    pub reports: Vec<Report>,
}

impl FleetSummary {
    /// A few human lines.
    pub fn render(&self) -> String {
        let join = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = format!(
            "fleet: {} host(s) reported\n  versions: {}\n  phases: {}\n",
            self.hosts,
            join(&self.by_version),
            join(&self.by_phase)
        );
        for r in &self.failing {
            out += &format!(
                "  failing: {} ({}): {}\n",
                r.id,
                r.phase,
                r.last_error.as_deref().unwrap_or("")
            );
        }
        out
    }
}

/// The newest report per host.
#[derive(Debug, Clone, Default)]
pub struct Reports {
    inner: Arc<Mutex<BTreeMap<String, Report>>>,
}

impl Reports {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Report>> {
        // Each update is one insert: a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put(&self, report: Report) {
        self.lock().insert(report.id.clone(), report);
    }

    pub fn get(&self, id: &str) -> Option<Report> {
        self.lock().get(id).cloned()
    }

    pub fn summary(&self) -> FleetSummary {
        let map = self.lock();
        let mut by_version = BTreeMap::new();
        let mut by_phase = BTreeMap::new();
        for r in map.values() {
            *by_version
                .entry(r.version.clone().unwrap_or_else(|| "unknown".into()))
                .or_insert(0) += 1;
            *by_phase.entry(r.phase.clone()).or_insert(0) += 1;
        }
        FleetSummary {
            hosts: map.len(),
            by_version,
            by_phase,
            failing: map
                .values()
                .filter(|r| r.last_error.is_some())
                .cloned()
                .collect(),
            reports: map.values().cloned().collect(),
        }
    }
}

/// `POST /v1/report`
pub(crate) async fn post_report(
    State(s): State<AppState>,
    body: bytes::Bytes,
) -> (StatusCode, String) {
    match serde_json::from_slice::<Report>(&body) {
        Ok(r) if !r.id.is_empty() => {
            tracing::debug!(id = %r.id, phase = %r.phase, "report");
            s.reports.put(r);
            (StatusCode::NO_CONTENT, String::new())
        }
        Ok(_) => (StatusCode::BAD_REQUEST, "report: id is empty\n".into()),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("report: body is not {{\"id\",\"phase\",...}}: {e}\n"),
        ),
    }
}

/// `GET /_admin/fleet`
pub(crate) async fn fleet(State(s): State<AppState>) -> Json<FleetSummary> {
    Json(s.reports.summary())
}
