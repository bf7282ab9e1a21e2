//! A FleetLock server (the protocol airlock speaks to Zincati): reboot slots per group.
//!
//! `POST /v1/pre-reboot` takes a slot for `client_params.id` in `client_params.group`,
//! `POST /v1/steady-state` gives it back. Both need the header `fleet-lock-protocol: true` and
//! the body `{"client_params":{"id":"..","group":".."}}`; both are idempotent per id. 200
//! means done; anything else carries `{"kind":"..","value":".."}`.
//!
//! Beyond airlock: an optional lock TTL frees the slot of a holder that never came back (kured
//! users asked for it), and every decision is kept in an event log with the largest number of
//! simultaneous holders seen per group, so fleet tests can prove the limit held.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::AppState;

/// Header every FleetLock request must carry with the value `true`.
pub const PROTOCOL_HEADER: &str = "fleet-lock-protocol";

/// How many slots groups have and how long a slot may be held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetLockSettings {
    /// Slots of a group not listed in `groups`.
    #[serde(default = "one")]
    pub default_slots: u32,
    /// Slots per named group.
    #[serde(default)]
    pub groups: BTreeMap<String, u32>,
    /// A holder older than this loses its slot (airlock: never). Milliseconds.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
}

fn one() -> u32 {
    1
}

impl Default for FleetLockSettings {
    fn default() -> Self {
        FleetLockSettings {
            default_slots: 1,
            groups: BTreeMap::new(),
            ttl_ms: None,
        }
    }
}

impl FleetLockSettings {
    fn slots(&self, group: &str) -> u32 {
        self.groups
            .get(group)
            .copied()
            .unwrap_or(self.default_slots)
    }
}

/// One request and what the server answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockEvent {
    /// Milliseconds since the server started.
    pub at_ms: u64,
    /// `pre-reboot` or `steady-state`.
    pub op: String,
    pub id: String,
    pub group: String,
    pub status: u16,
    /// The error kind when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Holders of the group after the request.
    pub holders: usize,
}

/// A group's current state, for `/_admin/fleetlock` and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub slots: u32,
    pub holders: Vec<String>,
    /// Most simultaneous holders ever seen.
    pub max_holders: usize,
}

/// Everything the FleetLock side knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetLockView {
    pub settings: FleetLockSettings,
    pub groups: BTreeMap<String, GroupView>,
    pub events: Vec<LockEvent>,
}

#[derive(Debug, Default)]
struct Group {
    /// Holder id -> when it took the slot.
    holders: BTreeMap<String, Instant>,
    max_holders: usize,
}

#[derive(Debug)]
struct Inner {
    settings: FleetLockSettings,
    groups: BTreeMap<String, Group>,
    events: Vec<LockEvent>,
    started: Instant,
}

/// The reboot-slot table, shared by every connection.
#[derive(Debug, Clone)]
pub struct FleetLock {
    inner: Arc<Mutex<Inner>>,
}

impl Default for FleetLock {
    fn default() -> Self {
        FleetLock {
            inner: Arc::new(Mutex::new(Inner {
                settings: FleetLockSettings::default(),
                groups: BTreeMap::new(),
                events: Vec::new(),
                started: Instant::now(),
            })),
        }
    }
}

/// Why a request was refused: becomes the `{"kind","value"}` error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub kind: &'static str,
    pub value: String,
}

impl FleetLock {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the table half-updated (every update is
        // a single insert or remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replace the slot counts and TTL; current holders keep their slots.
    pub fn configure(&self, settings: FleetLockSettings) {
        self.lock().settings = settings;
    }

    pub fn settings(&self) -> FleetLockSettings {
        self.lock().settings.clone()
    }

    /// Take a slot for `id` in `group` (a holder asking again is granted again).
    pub fn pre_reboot(&self, id: &str, group: &str) -> Result<(), Refusal> {
        let mut inner = self.lock();
        let slots = inner.settings.slots(group);
        let ttl = inner.settings.ttl_ms.map(Duration::from_millis);
        let g = inner.groups.entry(group.to_string()).or_default();
        if let Some(ttl) = ttl {
            g.holders.retain(|holder, since| {
                let keep = since.elapsed() < ttl;
                if !keep {
                    tracing::warn!(%holder, group, "fleetlock: slot expired (ttl)");
                }
                keep
            });
        }
        let result = if g.holders.contains_key(id) {
            Ok(())
        } else if g.holders.len() < slots as usize {
            g.holders.insert(id.to_string(), Instant::now());
            g.max_holders = g.max_holders.max(g.holders.len());
            Ok(())
        } else {
            Err(Refusal {
                status: StatusCode::CONFLICT,
                kind: "failed_lock",
                value: format!(
                    "all {slots} reboot slot(s) of group {group:?} are taken (held by {})",
                    g.holders.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            })
        };
        let holders = g.holders.len();
        inner.log("pre-reboot", id, group, &result, holders);
        result
    }

    /// Give back `id`'s slot in `group` (not holding one is fine: idempotent).
    pub fn steady_state(&self, id: &str, group: &str) -> Result<(), Refusal> {
        let mut inner = self.lock();
        let g = inner.groups.entry(group.to_string()).or_default();
        g.holders.remove(id);
        let holders = g.holders.len();
        inner.log("steady-state", id, group, &Ok(()), holders);
        Ok(())
    }

    /// Free a slot by hand (an operator clearing a dead holder). Whether it was held.
    pub fn release(&self, id: &str, group: &str) -> bool {
        let mut inner = self.lock();
        inner
            .groups
            .get_mut(group)
            .is_some_and(|g| g.holders.remove(id).is_some())
    }

    /// Current holders of `group`.
    pub fn holders(&self, group: &str) -> Vec<String> {
        self.lock()
            .groups
            .get(group)
            .map(|g| g.holders.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Most simultaneous holders `group` ever had.
    pub fn max_holders(&self, group: &str) -> usize {
        self.lock()
            .groups
            .get(group)
            .map(|g| g.max_holders)
            .unwrap_or(0)
    }

    pub fn events(&self) -> Vec<LockEvent> {
        self.lock().events.clone()
    }

    pub fn view(&self) -> FleetLockView {
        let inner = self.lock();
        FleetLockView {
            settings: inner.settings.clone(),
            groups: inner
                .groups
                .iter()
                .map(|(name, g)| {
                    (
                        name.clone(),
                        GroupView {
                            slots: inner.settings.slots(name),
                            holders: g.holders.keys().cloned().collect(),
                            max_holders: g.max_holders,
                        },
                    )
                })
                .collect(),
            events: inner.events.clone(),
        }
    }

    /// Record a request refused before it reached the table (bad header or body).
    fn log_refused(&self, op: &str, refusal: &Refusal) {
        let mut inner = self.lock();
        inner.log(op, "", "", &Err(refusal.clone()), 0);
    }
}

impl Inner {
    fn log(&mut self, op: &str, id: &str, group: &str, r: &Result<(), Refusal>, holders: usize) {
        let (status, kind) = match r {
            Ok(()) => (200, None),
            Err(e) => (e.status.as_u16(), Some(e.kind.to_string())),
        };
        tracing::info!(op, id, group, status, holders, "fleetlock");
        self.events.push(LockEvent {
            at_ms: self.started.elapsed().as_millis() as u64,
            op: op.to_string(),
            id: id.to_string(),
            group: group.to_string(),
            status,
            kind,
            holders,
        });
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({"kind": self.kind, "value": self.value})),
        )
            .into_response()
    }
}

#[derive(Debug, Deserialize)]
struct Body {
    client_params: ClientParams,
}

#[derive(Debug, Deserialize)]
struct ClientParams {
    id: String,
    group: String,
}

/// Check the header and body of a FleetLock request; `(id, group)`.
fn parse(headers: &HeaderMap, body: &[u8]) -> Result<(String, String), Refusal> {
    let bad = |kind: &'static str, value: String| Refusal {
        status: StatusCode::BAD_REQUEST,
        kind,
        value,
    };
    let header = headers
        .get(PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if header != Some("true") {
        return Err(bad(
            "missing_protocol_header",
            format!("the header `{PROTOCOL_HEADER}: true` is required"),
        ));
    }
    let parsed: Body = serde_json::from_slice(body).map_err(|e| {
        bad(
            "bad_body",
            format!("body is not {{\"client_params\":{{\"id\":..,\"group\":..}}}}: {e}"),
        )
    })?;
    let ClientParams { id, group } = parsed.client_params;
    if id.is_empty() {
        return Err(bad("bad_id", "client_params.id is empty".into()));
    }
    let group_ok = !group.is_empty()
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if !group_ok {
        return Err(bad(
            "bad_group",
            format!("client_params.group {group:?} must match [a-zA-Z0-9.-]+"),
        ));
    }
    Ok((id, group))
}

pub(crate) async fn pre_reboot(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    match parse(&headers, &body) {
        Ok((id, group)) => match s.fleetlock.pre_reboot(&id, &group) {
            Ok(()) => StatusCode::OK.into_response(),
            Err(r) => r.into_response(),
        },
        Err(r) => {
            s.fleetlock.log_refused("pre-reboot", &r);
            r.into_response()
        }
    }
}

pub(crate) async fn steady_state(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    match parse(&headers, &body) {
        Ok((id, group)) => match s.fleetlock.steady_state(&id, &group) {
            Ok(()) => StatusCode::OK.into_response(),
            Err(r) => r.into_response(),
        },
        Err(r) => {
            s.fleetlock.log_refused("steady-state", &r);
            r.into_response()
        }
    }
}

/// `GET /_admin/fleetlock`
pub(crate) async fn admin_view(State(s): State<AppState>) -> Json<FleetLockView> {
    Json(s.fleetlock.view())
}

/// `PUT /_admin/fleetlock`: new slot counts / TTL.
pub(crate) async fn admin_configure(
    State(s): State<AppState>,
    Json(settings): Json<FleetLockSettings>,
) -> Result<Json<FleetLockSettings>, (StatusCode, String)> {
    if settings.default_slots == 0 && settings.groups.is_empty() {
        tracing::warn!("fleetlock: every group now has 0 slots: all reboots are held");
    }
    s.fleetlock.configure(settings.clone());
    Ok(Json(settings))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReleaseQuery {
    id: String,
    group: String,
}

/// `DELETE /_admin/fleetlock?id=..&group=..`: free a dead holder's slot.
pub(crate) async fn admin_release(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<ReleaseQuery>,
) -> (StatusCode, String) {
    if s.fleetlock.release(&q.id, &q.group) {
        (
            StatusCode::OK,
            format!("released {} in group {}\n", q.id, q.group),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            format!("{} holds no slot in group {}\n", q.id, q.group),
        )
    }
}
