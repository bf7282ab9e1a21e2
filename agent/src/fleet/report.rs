//! Status reports: after every daemon cycle the host POSTs where it stands to
//! `[daemon] report_url` (server-mock's `/v1/report`), so a rollout can be watched centrally.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::FleetError;

/// What the host says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    /// Version the booted slot runs.
    pub version: Option<String>,
    /// The state phase name (see `state::Phase::name`).
    pub phase: String,
    pub last_error: Option<String>,
    pub wave_seed: Option<u32>,
}

/// POST `report` as JSON; any 2xx is success.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    report: &Report,
    timeout: Duration,
) -> Result<(), FleetError> {
    let err = |message: String| FleetError::Report {
        url: url.to_string(),
        message,
    };
    let body = serde_json::to_vec(report).map_err(|e| err(e.to_string()))?;
    let resp = client
        .post(url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| match crate::fetch::tls_cause(&e) {
            Some(detail) => FleetError::Tls {
                what: "status report".into(),
                url: url.to_string(),
                detail,
            },
            None => err(e.to_string()),
        })?;
    if !resp.status().is_success() {
        return Err(err(format!("HTTP {}", resp.status().as_u16())));
    }
    Ok(())
}
