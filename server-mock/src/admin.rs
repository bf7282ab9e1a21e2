//! `/_admin/...`: scripting a running server over HTTP (faults, the request log, FleetLock
//! slots and the fleet summary).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::{AppState, Fault, FaultRule, LogEntry};

/// Routes nested under `/_admin`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/log", get(read_log).delete(clear_log))
        .route(
            "/fleetlock",
            get(crate::fleetlock::admin_view)
                .put(crate::fleetlock::admin_configure)
                .delete(crate::fleetlock::admin_release),
        )
        .route("/fleet", get(crate::reports::fleet))
}

async fn list_faults(State(s): State<AppState>) -> Json<Vec<FaultRule>> {
    Json(s.faults.list())
}

/// Arm one rule; echoes it back with 201, or 400 naming what is wrong with it.
async fn add_fault(
    State(s): State<AppState>,
    Json(rule): Json<FaultRule>,
) -> Result<(StatusCode, Json<FaultRule>), (StatusCode, String)> {
    if let Fault::Status(code) = rule.fault {
        if !(100..=599).contains(&code) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("fault status {code} is not an HTTP status (100-599)\n"),
            ));
        }
    }
    if rule.times == Some(0) {
        return Err((
            StatusCode::BAD_REQUEST,
            "times 0 would never apply: leave it out for \"always\"\n".into(),
        ));
    }
    tracing::info!(?rule, "fault armed over HTTP");
    s.faults.add(rule.clone());
    Ok((StatusCode::CREATED, Json(rule)))
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
