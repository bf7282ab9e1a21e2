//! `/_admin/...`: scripting a running server over HTTP (faults and the request log).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::{AppState, FaultRule, LogEntry};

/// Routes nested under `/_admin`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/log", get(read_log).delete(clear_log))
}

async fn list_faults(State(s): State<AppState>) -> Json<Vec<FaultRule>> {
    Json(s.faults.list())
}

/// Arm one rule; echoes it back with 201.
async fn add_fault(
    State(s): State<AppState>,
    Json(rule): Json<FaultRule>,
) -> (StatusCode, Json<FaultRule>) {
    tracing::info!(?rule, "fault armed over HTTP");
    s.faults.add(rule.clone());
    (StatusCode::CREATED, Json(rule))
}

async fn clear_faults(State(s): State<AppState>) -> StatusCode {
    s.faults.clear();
    StatusCode::NO_CONTENT
}

async fn read_log(State(s): State<AppState>) -> Json<Vec<LogEntry>> {
    Json(s.log.entries())
}

async fn clear_log(State(s): State<AppState>) -> StatusCode {
    s.log.clear();
    StatusCode::NO_CONTENT
}
