//! The agent's one persisted record per host (`<state_dir>/state.json`) and the install lock.
//!
//! Writes are atomic (temp file 0600 in the same directory, fsync, rename, fsync dir), so a
//! power cut leaves the old or the new record. A corrupt record is an error, never silently
//! replaced: losing the denylist or the highest serial seen would reopen rollback attacks.
//! [`StateStore::quarantine_corrupt`] and [`StateStore::reset`] are the explicit operator
//! escape hatches.
//!
//! Trust: the record carries the serial floor, the denylist and which slot holds a verified
//! image, so the directory and the record must be writable by root (or the agent's own uid)
//! alone: a group- or world-writable one, or one owned by another user, is refused
//! (`state_insecure`), judged after resolving symlinks.
//!
//! The serial floor is also kept in its own record (`floor.json`), raised by every verified
//! manifest whoever fetched it and never lowered by the agent: losing `state.json` or
//! replacing it by an older copy does not let an older signed manifest verify again.
//!
//! Compatibility: the state directory outlives A/B switches, so after a rollback an *older*
//! agent reads what a newer one wrote. Fields are therefore only ever added: unknown top-level
//! fields are kept verbatim across a save (`extra`), unknown phases and history events read
//! as `unknown`, and `schema_version` records which writer produced the file.

pub mod atomic;
pub mod transition;

pub(crate) use transition::{Outcome, Transition};

use crate::clock::Timestamp;
use crate::clock::{Clock, SystemClock};
use crate::slot::SlotId;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Schema version this agent writes.
pub(crate) const SCHEMA_VERSION: u32 = 1;
/// File name of the record inside the state directory.
pub(crate) const STATE_FILE: &str = "state.json";
/// File name of the install lock inside the state directory.
pub(crate) const LOCK_FILE: &str = "install.lock";
/// File name of the serial floor record inside the state directory.
pub(crate) const FLOOR_FILE: &str = "floor.json";
/// Lock serializing raises of the floor record (check, the daemon and apply may race).
const FLOOR_LOCK_FILE: &str = "floor.lock";
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
    /// The directory or a record could be written by someone other than root or the agent:
    /// anyone able to write it could forge the floor, the denylist or a verified slot.
    #[error("refusing the state {what} {path}: {reason}; it must be owned by root (or the agent's user) and writable by its owner only (chown root {path} && chmod go-w {path})", path = path.display())]
    Insecure {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The record's phase does not allow the step (e.g. staging with no download running);
    /// nothing was written.
    #[error(transparent)]
    Refused(#[from] transition::Refused),
    #[error("serial floor record {path} is corrupt ({source}); it was left untouched: inspect it, or drop it with `update-agent state reset --all`", path = path.display())]
    FloorCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
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
            StateError::Insecure { .. } => "state_insecure",
            StateError::FloorCorrupt { .. } => "floor_corrupt",
            StateError::Refused(_) => "transition_refused",
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

impl Phase {
    /// The phase's name as the state file spells its tag (`staged`, `rolled_back`, ...), also
    /// in metrics and status reports.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Downloading { .. } => "downloading",
            Phase::Staged { .. } => "staged",
            Phase::Trial { .. } => "trial",
            Phase::Committed { .. } => "committed",
            Phase::RolledBack { .. } => "rolled_back",
            Phase::Failed { .. } => "failed",
            Phase::Unknown => "unknown",
        }
    }
}

/// A version this host rolled back from; never offered again (like Zincati's denylist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenyEntry {
    pub version: String,
    pub reason: String,
    pub at: Timestamp,
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
    /// A hook ran (`hook` says which, how it ended and what it printed).
    Hook,
    /// An event written by a newer agent.
    #[serde(other)]
    Unknown,
}

/// One history entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: Timestamp,
    pub event: HistoryEvent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<SlotId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// For a staged install: what it cost and saved (bytes fetched, and for delta installs
    /// bytes reused from the slots and requests made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
    /// For [`HistoryEvent::Hook`]: the hook's run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookRecord>,
}

/// What an install moved over the network, for `history` (issue 13: the saving per host).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub bytes_fetched: u64,
    /// Image bytes copied from the slots instead of fetched (delta installs; else 0).
    #[serde(default)]
    pub bytes_reused: u64,
    /// HTTP requests of the delta installs (0 when none was a delta install).
    #[serde(default)]
    pub requests: u64,
    /// Why a delta install fell back to the full stream, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// One run of a hook (docs/hooks.md), as the history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRecord {
    /// `post_install`, `pre_reboot` or `post_commit`.
    pub name: String,
    pub command: Vec<String>,
    pub passed: bool,
    pub timed_out: bool,
    /// `exit status 0`, `killed after the timeout of 5s`, `cannot start ...`.
    pub status: String,
    pub duration_ms: u64,
    /// The last 2 KiB of its stdout and stderr.
    pub output_tail: String,
}

impl HistoryEntry {
    /// An entry stamped `at` with only the event set.
    pub fn stamped(event: HistoryEvent, at: Timestamp) -> Self {
        HistoryEntry {
            at,
            event,
            version: None,
            slot: None,
            reason: None,
            error_kind: None,
            transfer: None,
            hook: None,
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

    /// Put `version` on the denylist (once), stamped `at`.
    pub fn deny_at(&mut self, version: &str, reason: &str, at: Timestamp) {
        if !self.is_denied(version) {
            self.denylist.push(DenyEntry {
                version: version.to_string(),
                reason: reason.to_string(),
                at,
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
pub(crate) const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

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
    /// Stamps transitions and set-aside copies.
    clock: Arc<dyn Clock>,
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
        check_private(&dir, "directory")?;
        let store = StateStore {
            dir,
            clock: Arc::new(SystemClock),
        };
        // The records are checked again on every read; checking here makes every command
        // refuse an insecure one up front, before it acts on anything.
        for record in [store.path(), store.dir.join(FLOOR_FILE)] {
            if fs::symlink_metadata(&record).is_ok() {
                check_private(&record, "record")?;
            }
        }
        Ok(store)
    }

    /// The same store, stamping with `clock` (the host's).
    pub(crate) fn with_clock(mut self, clock: Arc<dyn Clock>) -> StateStore {
        self.clock = clock;
        self
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
        match fs::symlink_metadata(&path) {
            Ok(_) => check_private(&path, "record")?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
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

    /// Take one step of the update flow ([`Transition`]): load, check the phase it starts
    /// from, set the next and append its history entry, save, in one atomic write. Refused:
    /// nothing is written. Hold the [`InstallLock`].
    pub(crate) fn transition(&self, t: Transition) -> Result<Outcome, StateError> {
        let mut state = self.load()?;
        let name = t.name();
        let out = t.apply(&mut state, self.clock.now())?;
        self.save(&state)?;
        tracing::debug!(
            transition = name,
            phase = state.phase.name(),
            "state transition"
        );
        Ok(out)
    }

    /// The serial floor on `channel`: the higher of the record's and the floor record's.
    pub fn serial_floor(&self, channel: &str) -> Result<u64, StateError> {
        let record = self.load()?.serial(channel);
        Ok(record.max(self.load_floor()?.serial(channel)))
    }

    /// Raise the floor record on `channel` to `serial` (never lowers it). Serialized by its
    /// own lock, so two processes raising at once cannot lower each other's value.
    pub fn raise_floor(&self, channel: &str, serial: u64) -> Result<(), StateError> {
        let lock_path = self.dir.join(FLOOR_LOCK_FILE);
        let file = open_lock_file(&lock_path)?;
        let _lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_err(&lock_path)(std::io::Error::from(errno)))?;
        let mut floor = self.load_floor()?;
        if floor.serial(channel) >= serial {
            return Ok(());
        }
        floor.observe_serial(channel, serial);
        let mut bytes = serde_json::to_vec_pretty(&floor).map_err(StateError::Serialize)?;
        bytes.push(b'\n');
        let path = self.dir.join(FLOOR_FILE);
        atomic::write_atomic(&path, &bytes, 0o600).map_err(io_err(&path))?;
        tracing::debug!(channel, serial, "serial floor raised");
        Ok(())
    }

    /// The floor record; missing is an empty floor, corrupt an error.
    pub fn load_floor(&self) -> Result<Floor, StateError> {
        let path = self.dir.join(FLOOR_FILE);
        match fs::symlink_metadata(&path) {
            Ok(_) => check_private(&path, "record")?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Floor::default()),
            Err(e) => return Err(io_err(&path)(e)),
        }
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&bytes).map_err(|source| StateError::FloorCorrupt { path, source })
    }

    /// `update-agent state reset`: move the record aside and start afresh, keeping the serial
    /// floor and the denylist (from the old record when it reads, and the floor record) unless
    /// `all`, which also drops the floor record. Hold the [`InstallLock`].
    pub(crate) fn reset(&self, all: bool) -> Result<ResetReport, StateError> {
        let old = match self.load() {
            Ok(s) => Some(s),
            Err(StateError::Corrupt { .. }) => None,
            Err(e) => return Err(e),
        };
        let moved_to = self.quarantine_corrupt()?;
        let mut fresh = State::default();
        if all {
            let path = self.dir.join(FLOOR_FILE);
            match fs::remove_file(&path) {
                Ok(()) => atomic::sync_dir(&self.dir).map_err(io_err(&self.dir))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        } else {
            if let Some(old) = &old {
                fresh.highest_serial = old.highest_serial.clone();
                fresh.denylist = old.denylist.clone();
            }
            for (channel, serial) in &self.load_floor()?.highest_serial {
                fresh.observe_serial(channel, *serial);
            }
        }
        // The fresh record starts with no history: what happened is in the moved-aside file.
        self.save(&fresh)?;
        Ok(ResetReport {
            moved_to,
            old_record_read: old.is_some(),
            kept_floor: fresh.highest_serial.clone(),
            kept_denylist: fresh.denylist.iter().map(|d| d.version.clone()).collect(),
        })
    }

    /// Move a corrupt (or any) record aside to `state.json.corrupt-<unix time>` so the next
    /// load starts fresh. Returns the new path, or `None` when there was no record.
    pub fn quarantine_corrupt(&self) -> Result<Option<PathBuf>, StateError> {
        let path = self.path();
        if !path.exists() {
            return Ok(None);
        }
        // Never over an earlier set-aside copy (two resets within a second).
        let stamp = self.clock.unix();
        let mut aside = self.dir.join(format!("{STATE_FILE}.corrupt-{stamp}"));
        let mut n = 1;
        while aside.exists() {
            aside = self.dir.join(format!("{STATE_FILE}.corrupt-{stamp}.{n}"));
            n += 1;
        }
        fs::rename(&path, &aside).map_err(io_err(&path))?;
        atomic::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        tracing::warn!(from = %path.display(), to = %aside.display(), "state record moved aside");
        Ok(Some(aside))
    }
}

/// The serial floor record (`floor.json`): the highest serial verified, per channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floor {
    #[serde(default)]
    pub highest_serial: BTreeMap<String, u64>,
    /// Fields written by a newer agent, kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Floor {
    /// Highest serial on `channel` (0 if none).
    pub(crate) fn serial(&self, channel: &str) -> u64 {
        self.highest_serial.get(channel).copied().unwrap_or(0)
    }

    fn observe_serial(&mut self, channel: &str, serial: u64) {
        let e = self.highest_serial.entry(channel.to_string()).or_insert(0);
        *e = (*e).max(serial);
    }
}

/// What `state reset` did.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ResetReport {
    /// Where the old record went (`None`: there was none).
    pub moved_to: Option<PathBuf>,
    /// Whether the old record could be read (a corrupt one keeps nothing but the floor).
    pub old_record_read: bool,
    pub kept_floor: BTreeMap<String, u64>,
    pub kept_denylist: Vec<String>,
}

impl ResetReport {
    pub(crate) fn render(&self) -> String {
        let mut out = match &self.moved_to {
            Some(p) => format!("state record moved aside to {}\n", p.display()),
            None => "there was no state record\n".to_string(),
        };
        if self.moved_to.is_some() && !self.old_record_read {
            out += "the old record was corrupt: its denylist could not be kept\n";
        }
        out += &format!(
            "kept: serial floor {:?}, denylist {:?}",
            self.kept_floor, self.kept_denylist
        );
        out
    }
}

/// Refuses `path` (after resolving symlinks) when anyone but its owner may write it, or its
/// owner is neither root nor this process' user.
fn check_private(path: &Path, what: &'static str) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt;
    let real = fs::canonicalize(path).map_err(io_err(path))?;
    let meta = fs::metadata(&real).map_err(io_err(&real))?;
    let insecure = |reason: String| StateError::Insecure {
        what,
        path: real.clone(),
        reason,
    };
    let uid = meta.uid();
    let me = nix::unistd::geteuid().as_raw();
    if uid != 0 && uid != me {
        return Err(insecure(format!(
            "it is owned by uid {uid}, not root or the agent (uid {me})"
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(insecure(format!(
            "it is {} writable (mode {mode:04o})",
            match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => "group and world",
                (true, false) => "group",
                _ => "world",
            }
        )));
    }
    Ok(())
}

/// Opens (creating, 0600, never truncating) a file that is only ever `flock`ed.
fn open_lock_file(path: &Path) -> Result<fs::File, StateError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))
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
        let file = open_lock_file(&path)?;
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
