//! GRUB environment block backend, speaking RAUC's variables (`ORDER`, `A_OK`, `A_TRY`, ...).
//!
//! The block is GRUB's format: exactly 1024 bytes, `# GRUB Environment Block\n`, then
//! `name=value\n` lines, padded with `#`. In values GRUB escapes `\` and newline with a
//! backslash; we do the same, so `grub-editenv FILE list` reads what we write and we read what
//! `grub-editenv FILE set` writes. Unknown variables and comment lines are kept, in order.
//!
//! Convention (compatible with RAUC's `contrib/grub.conf` when `max_tries` is 1):
//! the loader boots the first slot in `ORDER` with `X_OK=1` and `X_TRY < max_tries`, and
//! counts the attempt in `X_TRY` before booting. If no slot qualifies it boots its rescue
//! entry and resets `X_TRY=0` on every slot with `X_OK=1`. Marking good (`commit`) resets
//! `X_TRY=0`, so with RAUC's script *every* boot is a trial until marked good again.
//!
//! Ops: `stage` puts the slot first in `ORDER` with OK=1, TRY=0 (RAUC's mark-active);
//! `commit` sets OK=1, TRY=0 (mark-good); `disable` sets OK=0, TRY=0 (mark-bad);
//! `rollback(to)` puts `to` first with OK=1, TRY=0 and the other OK=0; `cancel(slot)` puts the
//! other slot first and sets the slot OK=0. A staged, not yet committed slot is remembered in
//! [`TRIAL_VAR`] (ignored by GRUB) so `status` can tell "staged" from "committed".
//!
//! Mapping to [`SlotStatus`]: `priority` is 2 for the first slot in `ORDER`, 1 for the second,
//! 0 when the slot is absent from `ORDER` or `X_OK != 1`; `tries` is `max_tries - X_TRY`
//! (0 when not OK); `successful` is `X_OK=1 && X_TRY=0` and the slot is not the staged trial.

use super::{BootControl, BootError, BootStatus, SlotId, SlotStatus};
use crate::disk::BlockDevice;
use std::fmt;
use std::path::{Path, PathBuf};

/// Size of a GRUB environment block.
pub const ENV_BLOCK_SIZE: usize = 1024;
/// First line of every GRUB environment block.
pub const ENV_HEADER: &str = "# GRUB Environment Block\n";
/// Our own variable naming the slot staged for a trial boot and not yet committed.
pub const TRIAL_VAR: &str = "UPDATE_AGENT_TRIAL";
/// Largest `max_tries` the backend accepts (one digit keeps grub.cfg ladders short).
pub const MAX_TRIES_LIMIT: u8 = 9;

/// Errors reading, parsing or writing an environment block.
#[derive(Debug, thiserror::Error)]
pub enum GrubEnvError {
    #[error("I/O error on GRUB environment {location}: {source}")]
    Io {
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GRUB environment {location} is {size} bytes; a GRUB environment block is exactly {ENV_BLOCK_SIZE} bytes")]
    WrongSize { location: String, size: u64 },
    #[error(
        "GRUB environment {location} does not start with the header \"# GRUB Environment Block\""
    )]
    MissingHeader { location: String },
    #[error("GRUB environment {location} is malformed at byte {offset}: {reason}")]
    Malformed {
        location: String,
        offset: usize,
        reason: String,
    },
    #[error("invalid GRUB variable name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("GRUB environment {location}: variables need {needed} bytes, more than the {ENV_BLOCK_SIZE}-byte block holds")]
    TooLarge { location: String, needed: usize },
    #[error("GRUB environment {location}: {name}={value:?} is not valid: {reason}")]
    BadValue {
        location: String,
        name: String,
        value: String,
        reason: String,
    },
    #[error("refused on GRUB environment {location}: {reason}")]
    Refused { location: String, reason: String },
    #[error("invalid grubenv backend setting: {0}")]
    Setting(String),
}

impl GrubEnvError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            GrubEnvError::Io { .. } => "grubenv_io",
            GrubEnvError::WrongSize { .. } => "grubenv_wrong_size",
            GrubEnvError::MissingHeader { .. } => "grubenv_missing_header",
            GrubEnvError::Malformed { .. } => "grubenv_malformed",
            GrubEnvError::InvalidName { .. } => "grubenv_invalid_name",
            GrubEnvError::TooLarge { .. } => "grubenv_too_large",
            GrubEnvError::BadValue { .. } => "grubenv_bad_value",
            GrubEnvError::Refused { .. } => "grubenv_refused",
            GrubEnvError::Setting(_) => "grubenv_setting",
        }
    }
}

impl From<GrubEnvError> for BootError {
    fn from(e: GrubEnvError) -> Self {
        match e {
            GrubEnvError::Io { location, source } => BootError::Io {
                what: format!("GRUB environment {location}"),
                source,
            },
            GrubEnvError::Refused { .. } => BootError::Refused(e.to_string()),
            other => BootError::Inconsistent(other.to_string()),
        }
    }
}

/// One line of the block, after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    Var {
        name: String,
        value: String,
    },
    /// A `#` comment line other than the trailing padding, kept verbatim (without `\n`).
    Comment(String),
}

/// A parsed GRUB environment block: variables (unescaped) and comment lines, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrubEnv {
    lines: Vec<Line>,
}

impl GrubEnv {
    /// An empty block (what `grub-editenv FILE create` makes).
    pub fn new() -> Self {
        Self::default()
    }

    /// Parse a block the way GRUB's `grub_envblk_iterate` does, but strictly: anything GRUB
    /// would silently stop at is an error naming `location` and the byte offset.
    pub fn parse(bytes: &[u8], location: &str) -> Result<Self, GrubEnvError> {
        if bytes.len() != ENV_BLOCK_SIZE {
            return Err(GrubEnvError::WrongSize {
                location: location.to_string(),
                size: bytes.len() as u64,
            });
        }
        if !bytes.starts_with(ENV_HEADER.as_bytes()) {
            return Err(GrubEnvError::MissingHeader {
                location: location.to_string(),
            });
        }
        let malformed = |offset: usize, reason: &str| GrubEnvError::Malformed {
            location: location.to_string(),
            offset,
            reason: reason.to_string(),
        };
        let mut lines = Vec::new();
        let mut p = ENV_HEADER.len();
        while p < bytes.len() {
            if bytes[p] == b'#' {
                match bytes[p..].iter().position(|&b| b == b'\n') {
                    // Only '#' up to the end: the padding.
                    None if bytes[p..].iter().all(|&b| b == b'#') => break,
                    None => return Err(malformed(p, "padding contains bytes other than '#'")),
                    Some(len) => {
                        let text = std::str::from_utf8(&bytes[p..p + len])
                            .map_err(|_| malformed(p, "comment line is not UTF-8"))?;
                        lines.push(Line::Comment(text.to_string()));
                        p += len + 1;
                    }
                }
                continue;
            }
            let name_start = p;
            while p < bytes.len() && bytes[p] != b'=' {
                if bytes[p] == b'\n' || bytes[p] == 0 {
                    return Err(malformed(name_start, "variable line has no '='"));
                }
                p += 1;
            }
            if p == bytes.len() {
                return Err(malformed(
                    name_start,
                    "variable line runs past the block end",
                ));
            }
            let name = std::str::from_utf8(&bytes[name_start..p])
                .map_err(|_| malformed(name_start, "variable name is not UTF-8"))?;
            p += 1;
            let value_start = p;
            let mut value = Vec::new();
            loop {
                match bytes.get(p) {
                    None => {
                        return Err(malformed(
                            name_start,
                            "variable value runs past the block end",
                        ))
                    }
                    Some(b'\n') => break,
                    Some(b'\\') => match bytes.get(p + 1) {
                        Some(&c) => {
                            value.push(c);
                            p += 2;
                        }
                        None => return Err(malformed(p, "dangling '\\' at the block end")),
                    },
                    Some(&c) => {
                        value.push(c);
                        p += 1;
                    }
                }
            }
            p += 1;
            let value = String::from_utf8(value)
                .map_err(|_| malformed(value_start, "variable value is not UTF-8"))?;
            validate_name(name).map_err(|e| malformed(name_start, &e.to_string()))?;
            lines.push(Line::Var {
                name: name.to_string(),
                value,
            });
        }
        Ok(GrubEnv { lines })
    }

    /// Serialize to exactly [`ENV_BLOCK_SIZE`] bytes, escaping `\` and newline as GRUB does.
    pub fn to_block(&self, location: &str) -> Result<Vec<u8>, GrubEnvError> {
        let mut out = Vec::with_capacity(ENV_BLOCK_SIZE);
        out.extend_from_slice(ENV_HEADER.as_bytes());
        for line in &self.lines {
            match line {
                Line::Var { name, value } => {
                    out.extend_from_slice(name.as_bytes());
                    out.push(b'=');
                    for &b in value.as_bytes() {
                        if b == b'\\' || b == b'\n' {
                            out.push(b'\\');
                        }
                        out.push(b);
                    }
                }
                Line::Comment(text) => out.extend_from_slice(text.as_bytes()),
            }
            out.push(b'\n');
        }
        if out.len() > ENV_BLOCK_SIZE {
            return Err(GrubEnvError::TooLarge {
                location: location.to_string(),
                needed: out.len(),
            });
        }
        out.resize(ENV_BLOCK_SIZE, b'#');
        Ok(out)
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| match l {
            Line::Var { name: n, value } if n == name => Some(value.as_str()),
            _ => None,
        })
    }

    /// Set `name` in place (or append it), like `grub-editenv set`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), GrubEnvError> {
        validate_name(name)?;
        for line in &mut self.lines {
            if let Line::Var { name: n, value: v } = line {
                if n == name {
                    *v = value.to_string();
                    return Ok(());
                }
            }
        }
        self.lines.push(Line::Var {
            name: name.to_string(),
            value: value.to_string(),
        });
        Ok(())
    }

    /// Remove `name`, like `grub-editenv unset`.
    pub fn unset(&mut self, name: &str) {
        self.lines
            .retain(|l| !matches!(l, Line::Var { name: n, .. } if n == name));
    }

    /// All variables in file order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match l {
            Line::Var { name, value } => Some((name.as_str(), value.as_str())),
            Line::Comment(_) => None,
        })
    }
}

fn validate_name(name: &str) -> Result<(), GrubEnvError> {
    let bad = |reason: &str| {
        Err(GrubEnvError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.starts_with('#') {
        return bad("starts with '#', which GRUB reads as a comment");
    }
    if name.contains(['=', '\n', '\0']) {
        return bad("contains '=', a newline or NUL");
    }
    Ok(())
}

/// Where the environment block lives.
pub enum EnvLocation {
    /// A file such as `/boot/grub/grubenv`: replaced atomically (temp file, fsync, rename,
    /// fsync dir).
    File(PathBuf),
    /// A raw block at a fixed byte offset on a disk. Only the 512-byte sectors whose bytes
    /// change are written, lowest first, then flushed. A change confined to one sector is
    /// atomic on disks with atomic sector writes; a change spanning both sectors can tear
    /// on a power cut (GRUB reads a single copy, so a redundant pair would not protect it).
    Device {
        dev: Box<dyn BlockDevice>,
        offset: u64,
    },
}

impl fmt::Debug for EnvLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl EnvLocation {
    /// Human name for messages: the path, or `device offset N`.
    pub fn describe(&self) -> String {
        match self {
            EnvLocation::File(p) => p.display().to_string(),
            EnvLocation::Device { offset, .. } => format!("block at device offset {offset}"),
        }
    }

    /// Read and parse the block.
    pub fn read(&self) -> Result<GrubEnv, GrubEnvError> {
        let loc = self.describe();
        let io = |source| GrubEnvError::Io {
            location: loc.clone(),
            source,
        };
        match self {
            EnvLocation::File(path) => {
                let meta = std::fs::metadata(path).map_err(io)?;
                if meta.len() != ENV_BLOCK_SIZE as u64 {
                    return Err(GrubEnvError::WrongSize {
                        location: loc,
                        size: meta.len(),
                    });
                }
                let bytes = std::fs::read(path).map_err(io)?;
                GrubEnv::parse(&bytes, &loc)
            }
            EnvLocation::Device { dev, offset } => {
                let mut buf = vec![0u8; ENV_BLOCK_SIZE];
                dev.read_at(&mut buf, *offset).map_err(io)?;
                GrubEnv::parse(&buf, &loc)
            }
        }
    }

    /// Serialize and write `env` crash-safely (see the variants). On a serialization error
    /// nothing is written.
    pub fn write(&mut self, env: &GrubEnv) -> Result<(), GrubEnvError> {
        let loc = self.describe();
        let block = env.to_block(&loc)?;
        let io = |source| GrubEnvError::Io {
            location: loc.clone(),
            source,
        };
        match self {
            EnvLocation::File(path) => {
                let mode = std::fs::metadata(&*path)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                    .unwrap_or(0o644);
                crate::state::atomic::write_atomic(path, &block, mode).map_err(io)
            }
            EnvLocation::Device { dev, offset } => {
                let mut old = vec![0u8; ENV_BLOCK_SIZE];
                dev.read_at(&mut old, *offset).map_err(io)?;
                let sector = dev.sector_size().max(1) as usize;
                let mut wrote = false;
                for start in (0..ENV_BLOCK_SIZE).step_by(sector) {
                    let end = (start + sector).min(ENV_BLOCK_SIZE);
                    if old[start..end] != block[start..end] {
                        dev.write_at(&block[start..end], *offset + start as u64)
                            .map_err(io)?;
                        wrote = true;
                    }
                }
                if wrote {
                    dev.flush().map_err(io)?;
                }
                Ok(())
            }
        }
    }
}

/// Create a fresh block file with RAUC's initial variables: `ORDER="A B"`, both slots OK,
/// no tries counted (what a provisioning step would write). Fails if `path` exists.
pub fn create_file(path: &Path, first: SlotId) -> Result<(), GrubEnvError> {
    let loc = path.display().to_string();
    if path.exists() {
        return Err(GrubEnvError::Refused {
            location: loc,
            reason: "the file already exists".into(),
        });
    }
    let mut env = GrubEnv::new();
    env.set("ORDER", &format!("{} {}", first, first.other()))?;
    for slot in [SlotId::A, SlotId::B] {
        env.set(&ok_var(slot), "1")?;
        env.set(&try_var(slot), "0")?;
    }
    let mut location = EnvLocation::File(path.to_path_buf());
    location.write(&env)
}

/// `A_OK` / `B_OK`.
pub fn ok_var(slot: SlotId) -> String {
    format!("{slot}_OK")
}

/// `A_TRY` / `B_TRY`.
pub fn try_var(slot: SlotId) -> String {
    format!("{slot}_TRY")
}

fn parse_slot(token: &str) -> Option<SlotId> {
    match token {
        "A" => Some(SlotId::A),
        "B" => Some(SlotId::B),
        _ => None,
    }
}

/// RAUC's variables decoded, with the grub.cfg defaults for missing ones
/// (`ORDER="A B"`, `X_OK=0`, `X_TRY=0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaucVars {
    /// `ORDER` split on whitespace; tokens other than `A`/`B` are kept (GRUB skips them).
    pub order: Vec<String>,
    pub a_ok: bool,
    pub a_try: u32,
    pub b_ok: bool,
    pub b_try: u32,
    /// The slot staged for a trial boot by this agent, if any.
    pub trial: Option<SlotId>,
}

impl RaucVars {
    /// Decode from `env`; a value that is not a number (or not 0/1 for `X_OK`) is an error.
    pub fn from_env(env: &GrubEnv, location: &str) -> Result<Self, GrubEnvError> {
        let bad = |name: &str, value: &str, reason: &str| GrubEnvError::BadValue {
            location: location.to_string(),
            name: name.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let order = env
            .get("ORDER")
            .unwrap_or("A B")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let ok = |slot: SlotId| -> Result<bool, GrubEnvError> {
            let name = ok_var(slot);
            match env.get(&name) {
                None => Ok(false),
                Some("1") => Ok(true),
                Some("0") => Ok(false),
                Some(v) => Err(bad(&name, v, "expected 0 or 1")),
            }
        };
        let tries = |slot: SlotId| -> Result<u32, GrubEnvError> {
            let name = try_var(slot);
            match env.get(&name) {
                None => Ok(0),
                Some(v) => v
                    .parse::<u32>()
                    .map_err(|_| bad(&name, v, "expected a decimal attempt count")),
            }
        };
        let trial = match env.get(TRIAL_VAR) {
            None | Some("") => None,
            Some(v) => Some(parse_slot(v).ok_or_else(|| bad(TRIAL_VAR, v, "expected A or B"))?),
        };
        Ok(RaucVars {
            order,
            a_ok: ok(SlotId::A)?,
            a_try: tries(SlotId::A)?,
            b_ok: ok(SlotId::B)?,
            b_try: tries(SlotId::B)?,
            trial,
        })
    }

    /// `X_OK` of `slot`.
    pub fn ok(&self, slot: SlotId) -> bool {
        match slot {
            SlotId::A => self.a_ok,
            SlotId::B => self.b_ok,
        }
    }

    /// `X_TRY` of `slot`.
    pub fn tries_made(&self, slot: SlotId) -> u32 {
        match slot {
            SlotId::A => self.a_try,
            SlotId::B => self.b_try,
        }
    }

    /// Slots in `ORDER`, first occurrence only, unknown tokens skipped.
    pub fn slot_order(&self) -> Vec<SlotId> {
        let mut out = Vec::new();
        for slot in self.order.iter().filter_map(|t| parse_slot(t)) {
            if !out.contains(&slot) {
                out.push(slot);
            }
        }
        out
    }

    /// The loader's choice: the first slot in `ORDER` with OK=1 and TRY < `max_tries`.
    pub fn next_boot(&self, max_tries: u8) -> Option<SlotId> {
        self.slot_order()
            .into_iter()
            .find(|&s| self.ok(s) && self.tries_made(s) < u32::from(max_tries))
    }
}

/// The booted slot from RAUC's kernel argument `rauc.slot=A|B` (set by its grub.cfg menu
/// entries). `None` when absent, unknown, or given twice with different values.
pub fn booted_slot_from_cmdline(cmdline: &str) -> Option<SlotId> {
    let mut found = None;
    for value in cmdline
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix("rauc.slot="))
    {
        let slot = parse_slot(value)?;
        if found.is_some_and(|f| f != slot) {
            return None;
        }
        found = Some(slot);
    }
    found
}

/// The slot-selection part of grub.cfg for `max_tries` attempts, in RAUC's style: it expects
/// menu entries in the order rescue (0), slot A (1), slot B (2), and leaves the choice in
/// `default`. With `max_tries = 1` it behaves exactly as RAUC's shipped `contrib/grub.conf`;
/// for more tries GRUB has no arithmetic, so the attempt counter climbs a ladder.
/// [`super::sim_grub`] implements the same logic; the tests run this text against it.
pub fn grub_cfg_selection(max_tries: u8) -> Result<String, GrubEnvError> {
    if max_tries == 0 || max_tries > MAX_TRIES_LIMIT {
        return Err(GrubEnvError::Setting(format!(
            "tries = {max_tries}: must be 1..={MAX_TRIES_LIMIT}"
        )));
    }
    let ladder = |slot: char| -> String {
        let var = format!("{slot}_TRY");
        if max_tries == 1 {
            return format!("{var}=1");
        }
        let mut out = String::new();
        for n in 0..max_tries - 1 {
            let kw = if n == 0 { "if" } else { "elif" };
            out.push_str(&format!(
                "{kw} [ \"${var}\" -eq {n} ]; then {var}={}; ",
                n + 1
            ));
        }
        out.push_str(&format!("else {var}={max_tries}; fi"));
        out
    };
    Ok(format!(
        r#"# update-agent / RAUC slot selection: boot the first slot in ORDER with X_OK=1 and
# X_TRY < {max_tries}, counting the attempt first; nothing bootable: rescue, and reset X_TRY.
default=0
set ORDER="A B"
set A_OK=0
set B_OK=0
set A_TRY=0
set B_TRY=0
load_env

for SLOT in $ORDER; do
    if [ "$SLOT" == "A" ]; then
        INDEX=1
        OK=$A_OK
        TRY=$A_TRY
        {ladder_a}
    fi
    if [ "$SLOT" == "B" ]; then
        INDEX=2
        OK=$B_OK
        TRY=$B_TRY
        {ladder_b}
    fi
    if [ "$OK" -eq 1 -a "$TRY" -lt {max_tries} ]; then
        default=$INDEX
        break
    fi
done

if [ "$default" -eq 0 ]; then
    if [ "$A_OK" -eq 1 -a "$A_TRY" -ge {max_tries} ]; then
        A_TRY=0
    fi
    if [ "$B_OK" -eq 1 -a "$B_TRY" -ge {max_tries} ]; then
        B_TRY=0
    fi
fi

save_env A_TRY B_TRY
"#,
        ladder_a = ladder('A'),
        ladder_b = ladder('B'),
    ))
}

/// `ORDER` with `first` at the front, the other tokens after it in their current order, and
/// `first.other()` appended if it was missing.
fn order_with_first(current: &[String], first: SlotId) -> String {
    let first_s = first.to_string();
    let other_s = first.other().to_string();
    let mut out = vec![first_s.clone()];
    out.extend(current.iter().filter(|t| **t != first_s).cloned());
    if !out.contains(&other_s) {
        out.push(other_s);
    }
    out.join(" ")
}

/// The grubenv [`BootControl`] backend.
#[derive(Debug)]
pub struct GrubEnvBoot {
    location: EnvLocation,
    max_tries: u8,
}

impl GrubEnvBoot {
    /// A backend on `location`; `max_tries` boot attempts per trial (RAUC's script: 1).
    pub fn new(location: EnvLocation, max_tries: u8) -> Result<Self, GrubEnvError> {
        if max_tries == 0 || max_tries > MAX_TRIES_LIMIT {
            return Err(GrubEnvError::Setting(format!(
                "tries = {max_tries}: must be 1..={MAX_TRIES_LIMIT}"
            )));
        }
        Ok(GrubEnvBoot {
            location,
            max_tries,
        })
    }

    /// A backend on a grubenv file.
    pub fn file(path: impl Into<PathBuf>, max_tries: u8) -> Result<Self, GrubEnvError> {
        Self::new(EnvLocation::File(path.into()), max_tries)
    }

    /// Boot attempts per trial.
    pub fn max_tries(&self) -> u8 {
        self.max_tries
    }

    /// The underlying location (the simulator boots from the same one).
    pub fn location_mut(&mut self) -> &mut EnvLocation {
        &mut self.location
    }

    /// Read the raw block.
    pub fn read_env(&self) -> Result<GrubEnv, GrubEnvError> {
        self.location.read()
    }

    /// Read, decode, let `change` edit the block, write it back. `change` sees the decoded
    /// variables and may refuse; on any error nothing is written.
    fn modify(
        &mut self,
        op: &str,
        change: impl FnOnce(&RaucVars, &mut GrubEnv, &str) -> Result<(), GrubEnvError>,
    ) -> Result<(), BootError> {
        let loc = self.location.describe();
        let span = tracing::info_span!("grubenv", op, location = %loc);
        let _enter = span.enter();
        let mut env = self.location.read()?;
        let vars = RaucVars::from_env(&env, &loc)?;
        change(&vars, &mut env, &loc)?;
        self.location.write(&env)?;
        tracing::info!(
            order = env.get("ORDER").unwrap_or(""),
            a_ok = env.get("A_OK").unwrap_or(""),
            a_try = env.get("A_TRY").unwrap_or(""),
            b_ok = env.get("B_OK").unwrap_or(""),
            b_try = env.get("B_TRY").unwrap_or(""),
            "GRUB environment written"
        );
        Ok(())
    }
}

fn refuse(location: &str, reason: String) -> GrubEnvError {
    GrubEnvError::Refused {
        location: location.to_string(),
        reason,
    }
}

/// Refuse when `slot` (the one that must stay bootable) is not marked OK.
fn require_ok(vars: &RaucVars, slot: SlotId, loc: &str, why: &str) -> Result<(), GrubEnvError> {
    if vars.ok(slot) {
        Ok(())
    } else {
        Err(refuse(
            loc,
            format!("slot {slot} is not marked OK ({slot}_OK != 1), so {why}"),
        ))
    }
}

fn clear_trial_if(env: &mut GrubEnv, vars: &RaucVars, slot: SlotId) {
    if vars.trial == Some(slot) {
        env.unset(TRIAL_VAR);
    }
}

impl BootControl for GrubEnvBoot {
    fn backend(&self) -> &'static str {
        "grubenv"
    }

    fn status(&mut self) -> Result<BootStatus, BootError> {
        let loc = self.location.describe();
        let env = self.location.read()?;
        let vars = RaucVars::from_env(&env, &loc)?;
        let order = vars.slot_order();
        let max = u32::from(self.max_tries);
        let slots = [SlotId::A, SlotId::B]
            .into_iter()
            .map(|slot| {
                let ok = vars.ok(slot);
                let made = vars.tries_made(slot);
                let priority = match order.iter().position(|&s| s == slot) {
                    Some(i) if ok => 2u8.saturating_sub(i as u8),
                    _ => 0,
                };
                SlotStatus {
                    slot,
                    priority,
                    tries: if ok {
                        u8::try_from(max.saturating_sub(made)).unwrap_or(u8::MAX)
                    } else {
                        0
                    },
                    successful: ok && made == 0 && vars.trial != Some(slot),
                }
            })
            .collect();
        let next = vars.next_boot(self.max_tries);
        let reason = match next {
            Some(s) => format!(
                "{s} is the first slot in ORDER=\"{}\" with {s}_OK=1 and {s}_TRY={} < {max}",
                vars.order.join(" "),
                vars.tries_made(s)
            ),
            None => format!(
                "no slot in ORDER=\"{}\" has X_OK=1 and X_TRY < {max}: GRUB boots its rescue entry \
                 and resets X_TRY of OK slots",
                vars.order.join(" ")
            ),
        };
        Ok(BootStatus {
            backend: self.backend().to_string(),
            slots,
            next,
            reason,
        })
    }

    fn disable(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.modify("disable", |vars, env, loc| {
            require_ok(
                vars,
                slot.other(),
                loc,
                &format!("disabling {slot} would leave no bootable slot"),
            )?;
            env.set(&ok_var(slot), "0")?;
            env.set(&try_var(slot), "0")?;
            clear_trial_if(env, vars, slot);
            Ok(())
        })
    }

    fn stage(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.modify("stage", |vars, env, loc| {
            require_ok(
                vars,
                slot.other(),
                loc,
                &format!("staging {slot} would leave no fallback if its trial fails"),
            )?;
            env.set("ORDER", &order_with_first(&vars.order, slot))?;
            env.set(&ok_var(slot), "1")?;
            env.set(&try_var(slot), "0")?;
            env.set(TRIAL_VAR, &slot.to_string())?;
            Ok(())
        })
    }

    fn commit(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.modify("commit", |vars, env, _loc| {
            env.set(&ok_var(slot), "1")?;
            env.set(&try_var(slot), "0")?;
            clear_trial_if(env, vars, slot);
            Ok(())
        })
    }

    fn rollback(&mut self, to: SlotId) -> Result<(), BootError> {
        self.modify("rollback", |vars, env, loc| {
            require_ok(vars, to, loc, "it cannot be the rollback target")?;
            if vars.trial == Some(to) {
                return Err(refuse(
                    loc,
                    format!("slot {to} is staged and was never committed; it is not a known-good rollback target"),
                ));
            }
            let from = to.other();
            env.set("ORDER", &order_with_first(&vars.order, to))?;
            env.set(&try_var(to), "0")?;
            env.set(&ok_var(from), "0")?;
            env.set(&try_var(from), "0")?;
            env.unset(TRIAL_VAR);
            Ok(())
        })
    }

    fn cancel(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.modify("cancel", |vars, env, loc| {
            let other = slot.other();
            require_ok(
                vars,
                other,
                loc,
                &format!("cancelling the stage of {slot} would leave no bootable slot"),
            )?;
            env.set("ORDER", &order_with_first(&vars.order, other))?;
            env.set(&ok_var(slot), "0")?;
            env.set(&try_var(slot), "0")?;
            clear_trial_if(env, vars, slot);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn escapes_round_trip() {
        let mut env = GrubEnv::new();
        env.set("x", "a\\b\nc").unwrap();
        let block = env.to_block("mem").unwrap();
        assert!(block.starts_with(b"# GRUB Environment Block\nx=a\\\\b\\\nc\n#"));
        assert_eq!(GrubEnv::parse(&block, "mem").unwrap(), env);
    }

    #[test]
    fn order_rewrite_keeps_unknown_tokens() {
        let cur: Vec<String> = ["A", "R", "B"].iter().map(|s| s.to_string()).collect();
        assert_eq!(order_with_first(&cur, SlotId::B), "B A R");
        assert_eq!(order_with_first(&["A".to_string()], SlotId::B), "B A");
        assert_eq!(order_with_first(&[], SlotId::A), "A B");
    }

    #[test]
    fn booted_slot_from_rauc_cmdline() {
        let c = "console=ttyS0 root=/dev/sda3 panic=60 rauc.slot=B quiet";
        assert_eq!(booted_slot_from_cmdline(c), Some(SlotId::B));
        assert_eq!(booted_slot_from_cmdline("root=/dev/sda1 rauc.slot=R"), None);
        assert_eq!(booted_slot_from_cmdline("quiet"), None);
        assert_eq!(booted_slot_from_cmdline("rauc.slot=A rauc.slot=B"), None);
    }
}
