//! The agent's one persisted record per host (`<state_dir>/state.json`) and the install lock.
//!
//! Writes are atomic (temp file 0600 in the same directory, fsync, rename, fsync dir), so a
//! power cut leaves the old or the new record. A corrupt record is an error, never silently
//! replaced: losing the denylist or the highest serial seen would reopen rollback attacks.
//! [`StateStore::quarantine_corrupt`] is the explicit operator escape hatch.
//!
//! Compatibility: the state directory outlives A/B switches, so after a rollback an *older*
//! agent reads what a newer one wrote. Fields are therefore only ever added: unknown top-level
//! fields are kept verbatim across a save (`extra`), unknown phases and history events read
//! as `unknown`, and `schema_version` records which writer produced the file.

pub mod atomic;

use crate::boot::SlotId;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

/// Schema version this agent writes.
pub const SCHEMA_VERSION: u32 = 1;
/// File name of the record inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// File name of the install lock inside the state directory.
pub const LOCK_FILE: &str = "install.lock";
/// History entries kept (oldest dropped first).
pub const HISTORY_LIMIT: usize = 200;

/// Errors of the state store and the install lock.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("I/O error on {path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt ({source}); it was left untouched: inspect it, or move it aside with `update-agent state reset`", path = path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state directory {path} is not a directory", path = path.display())]
    NotADirectory { path: PathBuf },
    #[error("another install holds the lock {path}{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), path = path.display())]
    Locked { pid: Option<u32>, path: PathBuf },
    #[error("could not serialize the state: {0}")]
    Serialize(#[source] serde_json::Error),
}

impl StateError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            StateError::Io { .. } => "state_io",
            StateError::Corrupt { .. } => "state_corrupt",
            StateError::NotADirectory { .. } => "state_not_a_directory",
            StateError::Locked { .. } => "install_locked",
            StateError::Serialize(_) => "state_serialize",
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the update flow stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Idle,
    Downloading {
        version: String,
        bytes_done: u64,
    },
    /// Written, verified and staged in the boot flags; waiting for the reboot.
    Staged {
        slot: SlotId,
        version: String,
    },
    /// Booted into the staged slot; health checks decide commit or rollback.
    Trial {
        slot: SlotId,
        version: String,
        /// `/proc/sys/kernel/random/boot_id` of the trial boot.
        boot_id: String,
    },
    Committed {
        slot: SlotId,
        version: String,
    },
    RolledBack {
        reason: String,
        #[serde(default)]
        from_version: Option<String>,
    },
    Failed {
        kind: String,
        message: String,
    },
    /// A phase written by a newer agent.
    #[serde(other)]
    Unknown,
}

/// A version this host rolled back from; never offered again (like Zincati's denylist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenyEntry {
    pub version: String,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// What a slot holds, as far as this agent knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub version: String,
    /// Hex SHA-256 of each image written to the slot's partitions, in partition order.
    #[serde(default)]
    pub image_sha256s: Vec<String>,
    /// Content read back and matched the hashes. Rollback only targets a verified slot.
    pub verified: bool,
}

/// Events in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryEvent {
    InstallStarted,
    Staged,
    Committed,
    RolledBack,
    Failed,
    Cancelled,
    /// An event written by a newer agent.
    #[serde(other)]
    Unknown,
}

/// One history entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub event: HistoryEvent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<SlotId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
}

impl HistoryEntry {
    /// An entry stamped now with only the event set.
    pub fn now(event: HistoryEvent) -> Self {
        HistoryEntry {
            at: OffsetDateTime::now_utc(),
            event,
            version: None,
            slot: None,
            reason: None,
            error_kind: None,
        }
    }
}

/// Enough to resume an interrupted download with an HTTP Range request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRecord {
    pub url: String,
    /// Hex SHA-256 the finished image must have.
    pub expected_sha256: String,
    /// Bytes already written (and flushed) to the target.
    pub bytes_written: u64,
    /// Server ETag at the start; a different ETag means start over.
    #[serde(default)]
    pub etag: Option<String>,
    /// Slot being written, so a resume never continues into another slot.
    #[serde(default)]
    pub slot: Option<SlotId>,
}

/// The persisted record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub schema_version: u32,
    #[serde(default)]
    pub phase: Phase,
    /// Highest manifest serial accepted, per channel.
    #[serde(default)]
    pub highest_serial: BTreeMap<String, u64>,
    #[serde(default)]
    pub denylist: Vec<DenyEntry>,
    #[serde(default)]
    pub slots: BTreeMap<SlotId, SlotRecord>,
    /// Oldest first, at most [`HISTORY_LIMIT`] entries.
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    #[serde(default)]
    pub resume: Option<ResumeRecord>,
    /// Top-level fields written by a newer agent, kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for State {
    fn default() -> Self {
        State {
            schema_version: SCHEMA_VERSION,
            phase: Phase::Idle,
            highest_serial: BTreeMap::new(),
            denylist: Vec::new(),
            slots: BTreeMap::new(),
            history: Vec::new(),
            resume: None,
            extra: serde_json::Map::new(),
        }
    }
}

impl State {
    /// Append to the history, dropping the oldest entries beyond [`HISTORY_LIMIT`].
    pub fn record(&mut self, entry: HistoryEntry) {
        self.history.push(entry);
        self.trim_history();
    }

    fn trim_history(&mut self) {
        if self.history.len() > HISTORY_LIMIT {
            let drop = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..drop);
        }
    }

    /// Whether `version` is on the denylist.
    pub fn is_denied(&self, version: &str) -> bool {
        self.denylist.iter().any(|d| d.version == version)
    }

    /// Put `version` on the denylist (once).
    pub fn deny(&mut self, version: &str, reason: &str) {
        if !self.is_denied(version) {
            self.denylist.push(DenyEntry {
                version: version.to_string(),
                reason: reason.to_string(),
                at: OffsetDateTime::now_utc(),
            });
        }
    }

    /// Highest serial seen on `channel` (0 if none).
    pub fn serial(&self, channel: &str) -> u64 {
        self.highest_serial.get(channel).copied().unwrap_or(0)
    }

    /// Raise the highest serial seen on `channel`; never lowers it.
    pub fn observe_serial(&mut self, channel: &str, serial: u64) {
        let e = self.highest_serial.entry(channel.to_string()).or_insert(0);
        *e = (*e).max(serial);
    }

    /// Whether `slot` holds a verified image (the only valid rollback target).
    pub fn slot_verified(&self, slot: SlotId) -> bool {
        self.slots.get(&slot).is_some_and(|r| r.verified)
    }
}

/// Where the kernel publishes the id of the current boot.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The current boot's id (recorded in [`Phase::Trial`] to tell "still the trial boot" from
/// "rebooted since").
pub fn boot_id() -> Result<String, StateError> {
    read_boot_id(Path::new(BOOT_ID_PATH))
}

/// [`boot_id`] from another path (tests, sandboxes).
pub fn read_boot_id(path: &Path) -> Result<String, StateError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    Ok(text.trim().to_string())
}

/// The state directory and its record.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Open `dir`, creating it (mode 0700) if missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<StateStore, StateError> {
        let dir = dir.into();
        match fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(StateError::NotADirectory { path: dir }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .map_err(io_err(&dir))?;
                if let Some(parent) = dir.parent() {
                    atomic::sync_dir(parent).map_err(io_err(parent))?;
                }
            }
            Err(e) => return Err(io_err(&dir)(e)),
        }
        Ok(StateStore { dir })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the record.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The record; a missing file is the default (idle) state, a corrupt one an error.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let state: State =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if state.schema_version > SCHEMA_VERSION {
            tracing::warn!(
                path = %path.display(),
                file = state.schema_version,
                ours = SCHEMA_VERSION,
                "state written by a newer agent; unknown fields are kept as they are"
            );
        }
        Ok(state)
    }

    /// Write the record atomically (mode 0600), history trimmed to [`HISTORY_LIMIT`].
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let mut state = state.clone();
        state.trim_history();
        state.schema_version = state.schema_version.max(SCHEMA_VERSION);
        let mut bytes = serde_json::to_vec_pretty(&state).map_err(StateError::Serialize)?;
        bytes.push(b'\n');
        let path = self.path();
        atomic::write_atomic(&path, &bytes, 0o600).map_err(io_err(&path))
    }

    /// Load, apply `f`, save; returns what `f` returned. Hold the [`InstallLock`] when other
    /// processes may update concurrently.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> Result<R, StateError> {
        let mut state = self.load()?;
        let r = f(&mut state);
        self.save(&state)?;
        Ok(r)
    }

    /// Move a corrupt (or any) record aside to `state.json.corrupt-<unix time>` so the next
    /// load starts fresh. Returns the new path, or `None` when there was no record.
    pub fn quarantine_corrupt(&self) -> Result<Option<PathBuf>, StateError> {
        let path = self.path();
        if !path.exists() {
            return Ok(None);
        }
        let aside = self.dir.join(format!(
            "{STATE_FILE}.corrupt-{}",
            OffsetDateTime::now_utc().unix_timestamp()
        ));
        fs::rename(&path, &aside).map_err(io_err(&path))?;
        atomic::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        tracing::warn!(from = %path.display(), to = %aside.display(), "state record moved aside");
        Ok(Some(aside))
    }
}

/// Exclusive, non-blocking `flock` on `<state_dir>/install.lock`, held until dropped. The
/// holder's pid is written into the file so a refused caller can name it. The kernel drops
/// the lock when the holder dies, so a crash never leaves a stale lock.
#[derive(Debug)]
pub struct InstallLock {
    _lock: Flock<fs::File>,
    path: PathBuf,
}

impl InstallLock {
    /// Take the lock or fail at once with [`StateError::Locked`].
    pub fn acquire(dir: impl AsRef<Path>) -> Result<InstallLock, StateError> {
        let path = dir.as_ref().join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(StateError::Locked { pid, path });
            }
            Err((_, errno)) => return Err(io_err(&path)(std::io::Error::from(errno))),
        };
        let pid = std::process::id();
        lock.set_len(0).map_err(io_err(&path))?;
        lock.rewind().map_err(io_err(&path))?;
        writeln!(lock, "{pid}").map_err(io_err(&path))?;
        tracing::debug!(path = %path.display(), pid, "install lock taken");
        Ok(InstallLock { _lock: lock, path })
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
