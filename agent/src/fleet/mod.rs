//! Fleet-facing pieces of the daemon: the host's identity and rollout seed, the FleetLock
//! client and its held-slot marker, maintenance windows, status reports and Prometheus
//! metrics. Each is usable on its own (tests drive them directly); `daemon` wires them up.

pub mod lock;
pub mod metrics;
pub mod report;
pub mod window;

use std::path::PathBuf;

use ring::digest::{digest, SHA256};
use updater_proto::WaveSeed;

use crate::config::Config;

/// Errors of the fleet layer.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("FleetLock {op} at {url} refused with HTTP {status}: [{kind}] {value}")]
    LockRefused {
        op: &'static str,
        url: String,
        status: u16,
        kind: String,
        value: String,
    },
    #[error("FleetLock {op} at {url} failed: {source}")]
    LockHttp {
        op: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server's certificate was not trusted (or TLS failed otherwise): the same kind,
    /// `tls`, as for manifests and images.
    #[error("{what} at {url}: TLS failed: {detail} (the server's certificate must chain to [server] ca_file if set, else to the system roots)")]
    Tls {
        what: String,
        url: String,
        detail: String,
    },
    #[error("FleetLock base URL {url:?} is not usable: {message}")]
    LockUrl { url: String, message: String },
    #[error("status report to {url} failed: {message}")]
    Report { url: String, message: String },
    #[error("cannot read the machine id {path}: {message}", path = path.display())]
    MachineId { path: PathBuf, message: String },
    #[error("maintenance window {index}: {message}")]
    Window { index: usize, message: String },
    #[error("{what} {path}: {source}", path = path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is corrupt: {source}", path = path.display())]
    Corrupt {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl FleetError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            FleetError::LockRefused { .. } => "fleetlock_refused",
            FleetError::LockHttp { .. } => "fleetlock_http",
            FleetError::Tls { .. } => "tls",
            FleetError::LockUrl { .. } => "fleetlock_url",
            FleetError::Report { .. } => "report_failed",
            FleetError::MachineId { .. } => "machine_id",
            FleetError::Window { .. } => "window_invalid",
            FleetError::Io { .. } => "fleet_io",
            FleetError::Corrupt { .. } => "fleet_state_corrupt",
        }
    }
}

/// Domain prefix of the node id hash, so the id reveals nothing about the machine id.
const NODE_ID_DOMAIN: &[u8] = b"update-agent-node-id:";

fn read_machine_id(config: &Config) -> Result<String, FleetError> {
    let path = &config.daemon.machine_id_path;
    let text = std::fs::read_to_string(path).map_err(|e| FleetError::MachineId {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let id = text.trim();
    if id.is_empty() {
        return Err(FleetError::MachineId {
            path: path.clone(),
            message: "the file is empty".into(),
        });
    }
    Ok(id.to_string())
}

/// The host's rollout seed: `[daemon] wave_seed` if set (validated with the config), else
/// derived from the machine id at `[daemon] machine_id_path`.
pub fn wave_seed(config: &Config) -> Result<WaveSeed, FleetError> {
    if let Some(seed) = config.daemon.wave_seed.and_then(|s| WaveSeed::new(s).ok()) {
        return Ok(seed);
    }
    Ok(WaveSeed::from_machine_id(
        read_machine_id(config)?.as_bytes(),
    ))
}

/// The host's id towards FleetLock and the report endpoint: `[daemon] node_id`, else the
/// first 32 hex digits of SHA-256(domain || machine id) (Zincati also sends an app-specific
/// id rather than the machine id).
pub fn node_id(config: &Config) -> Result<String, FleetError> {
    if let Some(id) = &config.daemon.node_id {
        return Ok(id.clone());
    }
    let mid = read_machine_id(config)?;
    let mut input = NODE_ID_DOMAIN.to_vec();
    input.extend_from_slice(mid.as_bytes());
    Ok(hex::encode(&digest(&SHA256, &input).as_ref()[..16]))
}
