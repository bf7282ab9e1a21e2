//! The rollback drill's marker: `<state_dir>/drill.armed`. While it exists, the next trial
//! boot's health check fails on purpose; the check removes it first (durably), so the drill
//! fires once even if the agent dies mid-check.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{io_err, HealthError};

/// File name inside the state directory.
pub const MARKER_FILE: &str = "drill.armed";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    #[serde(with = "time::serde::rfc3339")]
    pub armed_at: OffsetDateTime,
}

pub fn marker_path(state_dir: &Path) -> PathBuf {
    state_dir.join(MARKER_FILE)
}

/// Arm (or re-arm) the drill; returns the marker written.
pub fn arm(state_dir: &Path) -> Result<Marker, HealthError> {
    let marker = Marker {
        armed_at: OffsetDateTime::now_utc(),
    };
    let bytes = serde_json::to_vec(&marker).map_err(|source| HealthError::Serialize {
        what: "the drill marker",
        source,
    })?;
    let path = marker_path(state_dir);
    crate::state::atomic::write_atomic(&path, &bytes, 0o600).map_err(io_err(&path))?;
    Ok(marker)
}

/// The armed marker, if any.
pub fn peek(state_dir: &Path) -> Result<Option<Marker>, HealthError> {
    let path = marker_path(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| HealthError::MarkerCorrupt { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Whether the drill is armed, for the health check: a corrupt marker still counts as armed
/// (the operator asked for a drill), stamped now, rather than failing the boot's check.
pub fn armed(state_dir: &Path) -> Result<Option<Marker>, HealthError> {
    match peek(state_dir) {
        Err(HealthError::MarkerCorrupt { path, .. }) => {
            tracing::warn!(path = %path.display(), "drill marker unreadable; treating it as armed now");
            Ok(Some(Marker {
                armed_at: OffsetDateTime::now_utc(),
            }))
        }
        other => other,
    }
}

/// Remove the marker (durably); returns what [`armed`] saw.
pub fn take(state_dir: &Path) -> Result<Option<Marker>, HealthError> {
    let marker = armed(state_dir)?;
    if marker.is_some() {
        disarm(state_dir)?;
    }
    Ok(marker)
}

/// Remove the marker; `true` if there was one.
pub fn disarm(state_dir: &Path) -> Result<bool, HealthError> {
    let path = marker_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            crate::state::atomic::sync_dir(state_dir).map_err(io_err(state_dir))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(&path)(e)),
    }
}
