//! FleetLock client, as Zincati speaks it to airlock: `POST {base}/v1/pre-reboot` takes a
//! reboot slot, `POST {base}/v1/steady-state` gives it back. Each request carries the header
//! `fleet-lock-protocol: true` and `{"client_params":{"id":..,"group":..}}`; 200 means done,
//! anything else is refused (with a `{"kind","value"}` body when the server sends one). Both
//! calls are idempotent, so retrying after a lost answer is safe.
//!
//! The slot is released only after a healthy boot: [`HeldSlot`] is a marker in the state
//! directory written once the slot is granted, removed once it is given back. A host whose new
//! slot fails its checks keeps the slot, which halts the rollout for its group.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::clock::Timestamp;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::FleetError;

/// The protocol header and its required value.
pub(crate) const PROTOCOL_HEADER: &str = "fleet-lock-protocol";
/// Marker file (in the state directory) saying this host holds a reboot slot.
pub const HELD_FILE: &str = "fleetlock.json";

/// A FleetLock client for one node in one group.
#[derive(Debug, Clone)]
pub struct FleetLockClient {
    base: reqwest::Url,
    id: String,
    group: String,
    client: reqwest::Client,
}

#[derive(Serialize)]
struct Body<'a> {
    client_params: Params<'a>,
}

#[derive(Serialize)]
struct Params<'a> {
    id: &'a str,
    group: &'a str,
}

#[derive(Deserialize)]
struct ErrorBody {
    kind: String,
    value: String,
}

impl FleetLockClient {
    /// `base` with or without a trailing slash, optionally with a path prefix
    /// (`https://airlock.example/` or `http://10.0.0.1:3333/fleet`).
    pub fn new(
        base: &str,
        id: &str,
        group: &str,
        timeout: Duration,
    ) -> Result<FleetLockClient, FleetError> {
        Self::with_ca(base, id, group, timeout, None)
    }

    /// As [`FleetLockClient::new`], trusting only the CAs in `ca_file` for https
    /// (`[server] ca_file`; `None`: the system roots).
    pub fn with_ca(
        base: &str,
        id: &str,
        group: &str,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<FleetLockClient, FleetError> {
        let bad = |message: String| FleetError::LockUrl {
            url: base.to_string(),
            message,
        };
        let mut url = reqwest::Url::parse(base).map_err(|e| bad(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("not an http:// or https:// URL".into()));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("a base URL takes no query or fragment".into()));
        }
        // Joining "v1/..." onto a base without a trailing slash would drop its last segment.
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        let client = crate::fetch::http_client(&crate::fetch::HttpOptions {
            timeout: Some(timeout),
            ca_file: ca_file.map(Path::to_path_buf),
            ..Default::default()
        })
        .map_err(|e| bad(format!("building the HTTP client: {e}")))?;
        Ok(FleetLockClient {
            base: url,
            id: id.to_string(),
            group: group.to_string(),
            client,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// The URL of `op` (`pre-reboot` or `steady-state`).
    pub fn endpoint(&self, op: &str) -> String {
        // The base ends with '/', and "v1/<op>" is a relative path: join cannot fail.
        self.base
            .join(&format!("v1/{op}"))
            .map(|u| u.to_string())
            .unwrap_or_else(|_| format!("{}v1/{op}", self.base))
    }

    /// Take a reboot slot. `Ok` only on HTTP 200.
    pub async fn pre_reboot(&self) -> Result<(), FleetError> {
        self.call("pre-reboot").await
    }

    /// Give the slot back. `Ok` only on HTTP 200.
    pub async fn steady_state(&self) -> Result<(), FleetError> {
        self.call("steady-state").await
    }

    async fn call(&self, op: &'static str) -> Result<(), FleetError> {
        let url = self.endpoint(op);
        let body = Body {
            client_params: Params {
                id: &self.id,
                group: &self.group,
            },
        };
        let body = serde_json::to_vec(&body).map_err(|e| FleetError::LockUrl {
            url: url.clone(),
            message: format!("encoding the body: {e}"),
        })?;
        let span =
            tracing::info_span!("fleetlock", op, url = %url, id = %self.id, group = %self.group);
        self.send(op, url, body).instrument(span).await
    }

    async fn send(&self, op: &'static str, url: String, body: Vec<u8>) -> Result<(), FleetError> {
        let http = |source: reqwest::Error| match crate::fetch::tls_cause(&source) {
            Some(detail) => FleetError::Tls {
                what: format!("FleetLock {op}"),
                url: url.clone(),
                detail,
            },
            None => FleetError::LockHttp {
                op,
                url: url.clone(),
                source,
            },
        };
        let resp = self
            .client
            .post(&url)
            .header(PROTOCOL_HEADER, "true")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(http)?;
        let status = resp.status().as_u16();
        if status == 200 {
            tracing::info!("granted");
            return Ok(());
        }
        // Bound what a misbehaving server can make us hold and log.
        let text = resp.text().await.unwrap_or_default();
        let text: String = text.chars().take(1024).collect();
        let (kind, value) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => (e.kind, e.value),
            Err(_) => ("unknown".to_string(), text.trim().to_string()),
        };
        tracing::info!(status, %kind, %value, "refused");
        Err(FleetError::LockRefused {
            op,
            url,
            status,
            kind,
            value,
        })
    }
}

/// This host holds a reboot slot (taken before rebooting into `version`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldSlot {
    pub url: String,
    pub id: String,
    pub group: String,
    /// The release the slot was taken to reboot into.
    pub version: String,
    pub taken_at: Timestamp,
}

impl HeldSlot {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(HELD_FILE)
    }

    /// The marker, if this host holds a slot.
    pub fn load(state_dir: &Path) -> Result<Option<HeldSlot>, FleetError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| FleetError::Corrupt {
                        what: "FleetLock marker",
                        path,
                        source,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(FleetError::Io {
                what: "reading the FleetLock marker",
                path,
                source,
            }),
        }
    }

    /// Persist the marker (atomically) before the reboot command runs.
    pub(crate) fn save(&self, state_dir: &Path) -> Result<(), FleetError> {
        let path = Self::path(state_dir);
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| FleetError::Corrupt {
            what: "FleetLock marker",
            path: path.clone(),
            source,
        })?;
        crate::state::atomic::write_atomic(&path, &bytes, 0o644).map_err(|source| FleetError::Io {
            what: "writing the FleetLock marker",
            path,
            source,
        })
    }

    /// Forget the marker once the slot was given back.
    pub(crate) fn clear(state_dir: &Path) -> Result<(), FleetError> {
        let path = Self::path(state_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => crate::state::atomic::sync_dir(state_dir).map_err(|source| FleetError::Io {
                what: "syncing the state directory after removing",
                path,
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(FleetError::Io {
                what: "removing the FleetLock marker",
                path,
                source,
            }),
        }
    }
}
