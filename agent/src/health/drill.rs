//! The rollback drill's marker: `<state_dir>/drill.armed`. While it exists, the next trial
//! boot's health check fails on purpose; the check removes it first (durably), so the drill
//! fires once even if the agent dies mid-check.
//!
//! Also where the drill's timeline gets the real boot times: [`kernel_booted_at`] reads when
//! the running kernel started (now minus `/proc/uptime`), recorded by every health-check run.

use std::path::{Path, PathBuf};

use crate::clock::Timestamp;
use serde::{Deserialize, Serialize};

use super::{io_err, HealthError};

/// File name inside the state directory.
pub(crate) const MARKER_FILE: &str = "drill.armed";

/// Where the kernel says how long ago it booted.
pub(crate) const PROC_UPTIME_PATH: &str = "/proc/uptime";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Marker {
    pub armed_at: Timestamp,
}

pub(crate) fn marker_path(state_dir: &Path) -> PathBuf {
    state_dir.join(MARKER_FILE)
}

/// Arm (or re-arm) the drill, stamped `now`; returns the marker written.
pub(crate) fn arm(state_dir: &Path, now: Timestamp) -> Result<Marker, HealthError> {
    let marker = Marker { armed_at: now };
    let bytes = serde_json::to_vec(&marker).map_err(|source| HealthError::Serialize {
        what: "the drill marker",
        source,
    })?;
    let path = marker_path(state_dir);
    crate::state::atomic::write_atomic(&path, &bytes, 0o600).map_err(io_err(&path))?;
    Ok(marker)
}

/// The armed marker, if any.
pub(crate) fn peek(state_dir: &Path) -> Result<Option<Marker>, HealthError> {
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
/// (the operator asked for a drill), stamped `now`, rather than failing the boot's check.
pub(crate) fn armed(state_dir: &Path, now: Timestamp) -> Result<Option<Marker>, HealthError> {
    match peek(state_dir) {
        Err(HealthError::MarkerCorrupt { path, .. }) => {
            tracing::warn!(path = %path.display(), "drill marker unreadable; treating it as armed now");
            Ok(Some(Marker { armed_at: now }))
        }
        other => other,
    }
}

/// Remove the marker (durably); returns what [`armed`] saw.
pub(crate) fn take(state_dir: &Path, now: Timestamp) -> Result<Option<Marker>, HealthError> {
    let marker = armed(state_dir, now)?;
    if marker.is_some() {
        disarm(state_dir)?;
    }
    Ok(marker)
}

/// Remove the marker; `true` if there was one.
pub(crate) fn disarm(state_dir: &Path) -> Result<bool, HealthError> {
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

/// When the running kernel booted: `now` minus the time since boot, the first field of
/// `uptime_path` (`/proc/uptime`, seconds to the hundredth; the same instant as `btime` of
/// `/proc/stat`, finer). The health check records it so the drill's timeline shows when each
/// boot really began, not when its check started (on a slow machine those are a minute
/// apart). `None`, with a warning, when the file cannot be read or holds no valid uptime: a
/// missing boot time must never fail a boot's check.
pub(crate) fn kernel_booted_at(uptime_path: &Path, now: Timestamp) -> Option<Timestamp> {
    let text = match std::fs::read_to_string(uptime_path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(path = %uptime_path.display(), error = %e, "cannot read the time since boot; the kernel's boot time is not recorded");
            return None;
        }
    };
    let up = parse_uptime(&text);
    if up.is_none() {
        tracing::warn!(path = %uptime_path.display(), "no valid uptime; the kernel's boot time is not recorded");
    }
    now.checked_sub(up?).ok()
}

/// The first field of a `/proc/uptime` text (`12345.67 890.12`), as a duration.
fn parse_uptime(text: &str) -> Option<std::time::Duration> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    std::time::Duration::try_from_secs_f64(secs).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_boot_time_is_now_minus_the_uptime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uptime");
        std::fs::write(&path, "3601.25 7000.50\n").unwrap();
        let now = Timestamp::from_second(1_796_200_000).unwrap();
        assert_eq!(
            kernel_booted_at(&path, now),
            Some(
                now.checked_sub(jiff::SignedDuration::from_millis(3_601_250))
                    .unwrap()
            )
        );
    }

    #[test]
    fn no_or_a_bad_uptime_is_no_boot_time() {
        for text in ["", "\n", "soon 1.0\n", "-5.0 1.0\n", "NaN 1\n", "inf 1\n"] {
            assert_eq!(parse_uptime(text), None, "{text:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let now = Timestamp::from_second(1_796_200_000).unwrap();
        assert_eq!(kernel_booted_at(&dir.path().join("uptime"), now), None);
        std::fs::write(dir.path().join("uptime"), "garbage").unwrap();
        assert_eq!(kernel_booted_at(&dir.path().join("uptime"), now), None);
    }

    #[test]
    fn this_machine_booted_in_the_past() {
        let now = Timestamp::now();
        let booted = kernel_booted_at(Path::new(PROC_UPTIME_PATH), now).unwrap();
        assert!(booted < now, "{booted} is not before {now}");
    }
}
