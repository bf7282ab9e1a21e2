//! Boot Loader Specification backend: systemd-boot's Automatic Boot Assessment.
//!
//! One entry file per slot in one entries directory (`loader/entries/` on the ESP or
//! XBOOTLDR for type #1 `.conf` entries, `EFI/Linux/` for type #2 `.efi` UKIs). The file name
//! is `[GEN-]NAME[+LEFT[-DONE]].conf|efi`: `NAME` is configured per slot, `GEN` is a number
//! the agent raises when staging so the staged entry sorts first, and the counter is the
//! loader's: systemd-boot renames `+LEFT-DONE` to `+(LEFT-1)-(DONE+1)` before booting it.
//!
//! States of an entry: no counter = good (committed); `+LEFT` with LEFT > 0 = on trial;
//! `+0` = bad (systemd-boot sorts it after every other entry). Every operation is exactly one
//! `rename(2)` in the directory followed by an fsync of the directory, so after a power cut
//! the loader sees the old name or the new one.
//!
//! The choice rule ([`loader_order`]) is systemd-boot's `boot_entry_compare`: entries with no
//! tries left last, then by id compared with `strverscmp_improved`, newest first, then more
//! tries left first. `status` and the refusal rule use it; so does the sandbox simulator.

use super::{BootControl, BootError, BootStatus, SlotId, SlotStatus};
use std::cmp::Ordering;
use std::path::{Path, PathBuf};

/// The vendor GUID of systemd-boot's EFI variables.
pub const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// Where efivarfs shows `LoaderEntrySelected` (the id of the entry systemd-boot booted).
pub(crate) const ENTRY_SELECTED_PATH: &str =
    "/sys/firmware/efi/efivars/LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// The name of systemd-boot's variable with the path of the entry it booted *with a
/// counter* (set only when it counted the boot, after its rename): `\loader\entries\NAME+2-1.conf`.
pub const BOOT_COUNT_PATH_VAR: &str = "LoaderBootCountPath";
/// Largest `boot.tries` the backend accepts.
pub(crate) const MAX_TRIES_LIMIT: u8 = 15;

/// Errors of the bls backend. Nothing is renamed when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum BlsError {
    #[error("I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("boot entry {file:?} in {dir}: {reason}")]
    Malformed {
        dir: String,
        file: String,
        reason: String,
    },
    #[error("slot {slot} has {} entries in {dir} ({}); exactly one is allowed", files.len(), files.join(", "))]
    Duplicate {
        dir: String,
        slot: SlotId,
        files: Vec<String>,
    },
    #[error("slot {slot} has no entry in {dir} (expected {name}.conf or {name}.efi, optionally with GEN- and +counter)")]
    Missing {
        dir: String,
        slot: SlotId,
        name: String,
    },
    #[error("refused on boot entries in {dir}: {reason}")]
    Refused { dir: String, reason: String },
    #[error("invalid bls backend setting: {0}")]
    Setting(String),
    #[error("EFI variable {path}: {reason}")]
    EfiVar { path: String, reason: String },
}

impl BlsError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            BlsError::Io { .. } => "bls_io",
            BlsError::Malformed { .. } => "bls_malformed",
            BlsError::Duplicate { .. } => "bls_duplicate",
            BlsError::Missing { .. } => "bls_missing",
            BlsError::Refused { .. } => "bls_refused",
            BlsError::Setting(_) => "bls_setting",
            BlsError::EfiVar { .. } => "bls_efivar",
        }
    }
}

impl From<BlsError> for BootError {
    fn from(e: BlsError) -> Self {
        match e {
            BlsError::Io { what, source } => BootError::Io { what, source },
            BlsError::Refused { .. } => BootError::Refused(e.to_string()),
            // Bad input keeps its own stable kind (`BlsError::kind`), the same in status, the
            // state record and the metrics.
            other => BootError::Backend {
                kind: other.kind(),
                message: other.to_string(),
            },
        }
    }
}

/// The boot counter in a file name: `+LEFT` or `+LEFT-DONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub left: u32,
    pub done: Option<u32>,
}

/// Entry type by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Type #1 (`.conf`).
    Conf,
    /// Type #2 unified kernel image (`.efi`).
    Uki,
}

impl EntryKind {
    fn ext(self) -> &'static str {
        match self {
            EntryKind::Conf => "conf",
            EntryKind::Uki => "efi",
        }
    }
}

/// One slot's entry, parsed from its file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub slot: SlotId,
    /// The generation prefix (`GEN-`), 0 when absent.
    pub gen: u64,
    /// The configured slot name.
    pub name: String,
    pub counter: Option<Counter>,
    pub kind: EntryKind,
}

impl Entry {
    /// The file name for this entry.
    pub fn file_name(&self) -> String {
        let mut s = String::new();
        if self.gen > 0 {
            s += &format!("{}-", self.gen);
        }
        s += &self.name;
        if let Some(c) = self.counter {
            s += &format!("+{}", c.left);
            if let Some(d) = c.done {
                s += &format!("-{d}");
            }
        }
        s + "." + self.kind.ext()
    }

    /// The id systemd-boot sorts by: the file name without the counter, lower-cased.
    pub fn id(&self) -> String {
        Entry {
            counter: None,
            ..self.clone()
        }
        .file_name()
        .to_ascii_lowercase()
    }

    /// Tries left: `None` without a counter (good), `Some(0)` when marked bad.
    pub fn tries_left(&self) -> Option<u32> {
        self.counter.map(|c| c.left)
    }

    /// Whether the loader considers it with the entries it boots normally (not sorted last).
    pub(crate) fn bootable(&self) -> bool {
        self.tries_left() != Some(0)
    }

    /// No counter: committed.
    pub fn good(&self) -> bool {
        self.counter.is_none()
    }

    fn with_counter(&self, counter: Option<Counter>) -> Entry {
        Entry {
            counter,
            ..self.clone()
        }
    }

    /// The same entry marked bad (`+0-DONE`), as `systemd-bless-boot bad` does.
    fn marked_bad(&self) -> Entry {
        let done = self.counter.and_then(|c| c.done).unwrap_or(0);
        self.with_counter(Some(Counter {
            left: 0,
            done: Some(done),
        }))
    }
}

/// systemd's `strverscmp_improved` (src/fundamental/string-util-fundamental.c).
pub(crate) fn strverscmp_improved(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.is_empty() || b.is_empty() {
        return a.cmp(b);
    }
    let valid = |c: u8| c.is_ascii_alphanumeric() || b"~-^.".contains(&c);
    let (mut i, mut j) = (0usize, 0usize);
    let at = |s: &[u8], k: usize| s.get(k).copied().unwrap_or(0);
    loop {
        while i < a.len() && !valid(a[i]) {
            i += 1;
        }
        while j < b.len() && !valid(b[j]) {
            j += 1;
        }
        let tail = |s: &[u8], k: usize| s[k.min(s.len())..].to_vec();
        if at(a, i) == b'~' || at(b, j) == b'~' {
            // The string prefixed with '~' is older (a pre-release).
            let r = (at(a, i) != b'~').cmp(&(at(b, j) != b'~'));
            if r != Ordering::Equal {
                return r;
            }
            i += 1;
            j += 1;
        }
        if i >= a.len() || j >= b.len() {
            return tail(a, i).cmp(&tail(b, j));
        }
        // '-' (release), '^' (patch), '.' (point release): the prefixed string is older.
        for sep in [b'-', b'^', b'.'] {
            if at(a, i) == sep || at(b, j) == sep {
                let r = (at(a, i) != sep).cmp(&(at(b, j) != sep));
                if r != Ordering::Equal {
                    return r;
                }
                i += 1;
                j += 1;
            }
        }
        if i >= a.len() || j >= b.len() {
            // The C code loops back to its end-of-string check.
            continue;
        }
        let (aa, bb);
        if a[i].is_ascii_digit() || b[j].is_ascii_digit() {
            let mut x = i;
            while x < a.len() && a[x].is_ascii_digit() {
                x += 1;
            }
            let mut y = j;
            while y < b.len() && b[y].is_ascii_digit() {
                y += 1;
            }
            let r = (x != i).cmp(&(y != j));
            if r != Ordering::Equal {
                return r;
            }
            while i < x && a[i] == b'0' {
                i += 1;
            }
            while j < y && b[j] == b'0' {
                j += 1;
            }
            let r = (x - i).cmp(&(y - j)).then_with(|| a[i..x].cmp(&b[j..y]));
            if r != Ordering::Equal {
                return r;
            }
            (aa, bb) = (x, y);
        } else {
            let mut x = i;
            while x < a.len() && a[x].is_ascii_alphabetic() {
                x += 1;
            }
            let mut y = j;
            while y < b.len() && b[y].is_ascii_alphabetic() {
                y += 1;
            }
            let n = (x - i).min(y - j);
            let r = a[i..i + n]
                .cmp(&b[j..j + n])
                .then_with(|| (x - i).cmp(&(y - j)));
            if r != Ordering::Equal {
                return r;
            }
            (aa, bb) = (x, y);
        }
        i = aa;
        j = bb;
    }
}

/// systemd-boot's `boot_entry_compare` for entries without `sort-key`: `Less` means `a` is
/// listed (and, with no `default` configured, chosen) before `b`.
pub(crate) fn entry_compare(a: &Entry, b: &Entry) -> Ordering {
    (a.tries_left() == Some(0))
        .cmp(&(b.tries_left() == Some(0)))
        .then_with(|| strverscmp_improved(&a.id(), &b.id()).reverse())
        .then_with(|| match (a.counter, b.counter) {
            (Some(x), Some(y)) => y
                .left
                .cmp(&x.left)
                .then_with(|| x.done.unwrap_or(0).cmp(&y.done.unwrap_or(0))),
            _ => Ordering::Equal,
        })
}

/// THE choice rule: the entries in the order systemd-boot lists them; it boots the first
/// (it boots a `+0` entry too when nothing else is left, which is why the refusal rule
/// insists on a good entry to fall back to).
pub fn loader_order(entries: &[Entry]) -> Vec<Entry> {
    let mut v = entries.to_vec();
    v.sort_by(entry_compare);
    v
}

/// The slot systemd-boot boots next from these entries.
pub fn next_boot(entries: &[Entry]) -> Option<SlotId> {
    loader_order(entries).first().map(|e| e.slot)
}

/// Slot entry names: start with a letter, then letters, digits, `.`, `_`, `-` (no `+`, so
/// the counter is unambiguous; no leading digit, so `GEN-` is unambiguous).
pub(crate) fn validate_name(name: &str) -> Result<(), BlsError> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(BlsError::Setting(format!(
            "entry name {name:?} must start with a letter and hold only letters, digits, '.', '_' and '-'"
        )))
    }
}

/// Parse `file` as an entry of `slot` named `name`. `Ok(None)`: not this slot's file.
/// `Err(reason)`: it is this slot's file but the name is malformed.
pub fn parse_entry_file(file: &str, slot: SlotId, name: &str) -> Result<Option<Entry>, String> {
    let lower = file.to_ascii_lowercase();
    let (stem, kind) = if lower.ends_with(".conf") {
        (&file[..file.len() - 5], EntryKind::Conf)
    } else if lower.ends_with(".efi") {
        (&file[..file.len() - 4], EntryKind::Uki)
    } else {
        return Ok(None);
    };
    // Optional GEN- prefix.
    let digits = stem.bytes().take_while(u8::is_ascii_digit).count();
    let (gen, rest) = if digits > 0 && stem.as_bytes().get(digits) == Some(&b'-') {
        match stem[..digits].parse::<u64>() {
            Ok(g) => (g, &stem[digits + 1..]),
            Err(_) => return Err(format!("generation {:?} is too large", &stem[..digits])),
        }
    } else {
        (0, stem)
    };
    let tail = if rest == name {
        None
    } else if let Some(t) = rest.strip_prefix(name).and_then(|t| t.strip_prefix('+')) {
        Some(t)
    } else {
        return Ok(None);
    };
    let counter = match tail {
        None => None,
        Some(t) => {
            let (left, done) = match t.split_once('-') {
                Some((l, d)) => (l, Some(d)),
                None => (t, None),
            };
            let num = |s: &str, what: &str| -> Result<u32, String> {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!(
                        "boot counter \"+{t}\": {what} {s:?} is not a decimal number (expected +LEFT or +LEFT-DONE)"
                    ));
                }
                s.parse()
                    .map_err(|_| format!("boot counter \"+{t}\": {what} {s:?} is too large"))
            };
            Some(Counter {
                left: num(left, "LEFT")?,
                done: done.map(|d| num(d, "DONE")).transpose()?,
            })
        }
    };
    Ok(Some(Entry {
        slot,
        gen,
        name: name.to_string(),
        counter,
        kind,
    }))
}

/// The bls [`BootControl`] backend over one entries directory.
#[derive(Debug, Clone)]
pub struct BlsBoot {
    dir: PathBuf,
    names: [String; 2],
    tries: u8,
}

impl BlsBoot {
    /// A backend on `dir` with entry names for slots A and B and `tries` trial boots.
    pub fn new(
        dir: impl Into<PathBuf>,
        name_a: &str,
        name_b: &str,
        tries: u8,
    ) -> Result<Self, BlsError> {
        validate_name(name_a)?;
        validate_name(name_b)?;
        if name_a.eq_ignore_ascii_case(name_b) {
            return Err(BlsError::Setting(format!(
                "slots A and B need different entry names (both {name_a:?})"
            )));
        }
        if tries == 0 || tries > MAX_TRIES_LIMIT {
            return Err(BlsError::Setting(format!(
                "tries = {tries}: must be 1..={MAX_TRIES_LIMIT}"
            )));
        }
        Ok(BlsBoot {
            dir: dir.into(),
            names: [name_a.to_string(), name_b.to_string()],
            tries,
        })
    }

    /// The entries directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configured entry name of `slot`.
    pub fn name(&self, slot: SlotId) -> &str {
        match slot {
            SlotId::A => &self.names[0],
            SlotId::B => &self.names[1],
        }
    }

    fn loc(&self) -> String {
        self.dir.display().to_string()
    }

    /// Read both slots' entries; any malformed, duplicate or missing entry is an error.
    pub fn read_entries(&self) -> Result<[Entry; 2], BlsError> {
        let loc = self.loc();
        let rd = std::fs::read_dir(&self.dir).map_err(|source| BlsError::Io {
            what: format!("listing boot entries {loc}"),
            source,
        })?;
        let mut found: [Vec<(String, Entry)>; 2] = [Vec::new(), Vec::new()];
        for e in rd {
            let e = e.map_err(|source| BlsError::Io {
                what: format!("listing boot entries {loc}"),
                source,
            })?;
            let Some(file) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            for (i, slot) in [SlotId::A, SlotId::B].into_iter().enumerate() {
                match parse_entry_file(&file, slot, &self.names[i]) {
                    Ok(Some(entry)) => found[i].push((file.clone(), entry)),
                    Ok(None) => {}
                    Err(reason) => {
                        return Err(BlsError::Malformed {
                            dir: loc,
                            file,
                            reason,
                        })
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (i, slot) in [SlotId::A, SlotId::B].into_iter().enumerate() {
            let mut v = std::mem::take(&mut found[i]);
            match v.len() {
                0 => {
                    return Err(BlsError::Missing {
                        dir: loc,
                        slot,
                        name: self.names[i].clone(),
                    })
                }
                1 => out.push(v.remove(0).1),
                _ => {
                    let mut files: Vec<String> = v.into_iter().map(|(f, _)| f).collect();
                    files.sort();
                    return Err(BlsError::Duplicate {
                        dir: loc,
                        slot,
                        files,
                    });
                }
            }
        }
        let b = out.pop();
        let a = out.pop();
        match (a, b) {
            (Some(a), Some(b)) => Ok([a, b]),
            _ => Err(BlsError::Setting("internal: two entries expected".into())),
        }
    }

    /// Rename `from` to `to` in the directory and fsync the directory: the one atomic step.
    fn rename(&self, from: &Entry, to: &Entry) -> Result<(), BlsError> {
        let (old, new) = (from.file_name(), to.file_name());
        if old == new {
            return Ok(());
        }
        let loc = self.loc();
        let dst = self.dir.join(&new);
        if dst.exists() {
            return Err(BlsError::Refused {
                dir: loc,
                reason: format!("{new} already exists; not overwriting it"),
            });
        }
        rename_durable(&self.dir, &old, &new)?;
        tracing::info!(dir = %loc, from = %old, to = %new, "boot entry renamed");
        Ok(())
    }

    /// Apply `change` to `slot`'s entry after checking the loader's choice afterwards with
    /// `check`; nothing is renamed when either refuses.
    fn modify(
        &mut self,
        slot: SlotId,
        change: impl FnOnce(&[Entry; 2]) -> Result<Entry, String>,
        check: impl FnOnce(&[Entry; 2]) -> Result<(), String>,
    ) -> Result<(), BootError> {
        let entries = self.read_entries()?;
        let refused = |reason: String| BlsError::Refused {
            dir: self.loc(),
            reason,
        };
        let new = change(&entries).map_err(refused)?;
        let mut after = entries.clone();
        after[idx(slot)] = new.clone();
        check(&after).map_err(refused)?;
        self.rename(&entries[idx(slot)], &new)?;
        Ok(())
    }
}

fn idx(slot: SlotId) -> usize {
    match slot {
        SlotId::A => 0,
        SlotId::B => 1,
    }
}

/// `rename(dir/old, dir/new)` then fsync `dir` so the new name survives a power cut.
pub fn rename_durable(dir: &Path, old: &str, new: &str) -> Result<(), BlsError> {
    let loc = dir.display().to_string();
    std::fs::rename(dir.join(old), dir.join(new)).map_err(|source| BlsError::Io {
        what: format!("renaming {old} to {new} in {loc}"),
        source,
    })?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| BlsError::Io {
            what: format!("fsync of directory {loc}"),
            source,
        })
}

/// Refuse unless `slot`'s entry is good (no counter).
fn require_good(entries: &[Entry; 2], slot: SlotId, why: &str) -> Result<(), String> {
    let e = &entries[idx(slot)];
    if e.good() {
        Ok(())
    } else {
        Err(format!(
            "slot {slot}'s entry {} is not committed (it has a boot counter), so {why}",
            e.file_name()
        ))
    }
}

/// Refuse unless the loader would boot `slot` next from `entries`.
fn require_next(entries: &[Entry; 2], slot: SlotId, when: &str) -> Result<(), String> {
    match next_boot(entries) {
        Some(s) if s == slot => Ok(()),
        other => Err(format!(
            "{when} systemd-boot would boot {other:?} first (order: {}), not {slot}",
            order_text(entries)
        )),
    }
}

fn order_text(entries: &[Entry]) -> String {
    loader_order(entries)
        .iter()
        .map(Entry::file_name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl BootControl for BlsBoot {
    fn backend(&self) -> &'static str {
        "bls"
    }

    fn status(&mut self) -> Result<BootStatus, BootError> {
        let entries = self.read_entries()?;
        let order = loader_order(&entries);
        let slots = entries
            .iter()
            .map(|e| SlotStatus {
                slot: e.slot,
                priority: if !e.bootable() {
                    0
                } else if order.first().map(|f| f.slot) == Some(e.slot) {
                    2
                } else {
                    1
                },
                tries: u8::try_from(e.tries_left().unwrap_or(0)).unwrap_or(u8::MAX),
                successful: e.good(),
            })
            .collect();
        let next = order.first().map(|e| e.slot);
        let reason = match order.first() {
            Some(first) => {
                let why = match first.counter {
                    None => "has no boot counter (committed)".to_string(),
                    Some(Counter { left: 0, .. }) => {
                        "is marked bad (+0) but nothing else is left to boot".to_string()
                    }
                    Some(c) => format!("has {} tries left", c.left),
                };
                format!(
                    "{} boots: its entry {} {why} and sorts first in systemd-boot's order ({}): \
                     entries with tries left or no counter first, then newest id by version compare",
                    first.slot,
                    first.file_name(),
                    order_text(&entries)
                )
            }
            None => "no entries".to_string(),
        };
        Ok(BootStatus {
            backend: self.backend().to_string(),
            slots,
            next,
            reason,
        })
    }

    fn disable(&mut self, slot: SlotId) -> Result<(), BootError> {
        let other = slot.other();
        self.modify(
            slot,
            |e| {
                require_good(
                    e,
                    other,
                    &format!("disabling {slot} would leave no bootable entry"),
                )?;
                Ok(e[idx(slot)].marked_bad())
            },
            |after| require_next(after, other, &format!("after disabling {slot}")),
        )
    }

    fn stage(&mut self, slot: SlotId) -> Result<(), BootError> {
        let other = slot.other();
        let tries = u32::from(self.tries);
        self.modify(
            slot,
            |e| {
                require_good(
                    e,
                    other,
                    &format!("staging {slot} would leave no fallback if its trial fails"),
                )?;
                let mut new = e[idx(slot)].with_counter(Some(Counter {
                    left: tries,
                    done: None,
                }));
                // Sort first: a generation above the other's (equal names never happen).
                new.gen = e[0].gen.max(e[1].gen).saturating_add(1);
                Ok(new)
            },
            |after| {
                require_next(after, slot, &format!("after staging {slot}"))?;
                let mut spent = after.clone();
                spent[idx(slot)] = spent[idx(slot)].marked_bad();
                require_next(&spent, other, &format!("once {slot}'s tries are spent"))
            },
        )
    }

    fn commit(&mut self, slot: SlotId) -> Result<(), BootError> {
        // Like `systemd-bless-boot good`: drop the counter (a no-op when already good).
        self.modify(slot, |e| Ok(e[idx(slot)].with_counter(None)), |_| Ok(()))
    }

    fn rollback(&mut self, to: SlotId) -> Result<(), BootError> {
        let from = to.other();
        self.modify(
            from,
            |e| {
                require_good(e, to, "it is not a known-good rollback target")?;
                Ok(e[idx(from)].marked_bad())
            },
            |after| require_next(after, to, &format!("after marking {from} bad")),
        )
    }

    fn cancel(&mut self, slot: SlotId) -> Result<(), BootError> {
        let other = slot.other();
        self.modify(
            slot,
            |e| {
                require_good(
                    e,
                    other,
                    &format!("cancelling the stage of {slot} would leave no bootable entry"),
                )?;
                Ok(e[idx(slot)].marked_bad())
            },
            |after| require_next(after, other, &format!("after cancelling {slot}")),
        )
    }
}

/// The entry id in a `LoaderEntrySelected` efivarfs file: 4 attribute bytes, then UTF-16LE,
/// optionally NUL-terminated. `Ok(None)` when the file does not exist (not booted by
/// systemd-boot, or no efivarfs).
pub fn read_entry_selected(path: &Path) -> Result<Option<String>, BlsError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(BlsError::Io {
                what: format!("reading {}", path.display()),
                source,
            })
        }
    };
    let bad = |reason: &str| BlsError::EfiVar {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    if bytes.len() < 4 || (bytes.len() - 4) % 2 != 0 {
        return Err(bad(
            "expected 4 attribute bytes and a UTF-16LE string of whole code units",
        ));
    }
    let units: Vec<u16> = bytes[4..]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units)
        .map(Some)
        .map_err(|_| bad("the value is not valid UTF-16"))
}

/// The booted slot from systemd-boot's variables next to `entry_selected_path` (the
/// efivarfs directory or a test directory of files in its format): `LoaderBootCountPath`
/// (the counted entry's path, present on a trial boot) and `LoaderEntrySelected` (the entry
/// id). `Ok(None)` when neither exists or names a slot's entry; an error when they name
/// different slots, or a value is malformed.
pub fn booted_slot_from_efivars(
    entry_selected_path: &Path,
    name_a: &str,
    name_b: &str,
) -> Result<Option<(SlotId, &'static str)>, BlsError> {
    let count_path =
        entry_selected_path.with_file_name(format!("{BOOT_COUNT_PATH_VAR}-{LOADER_GUID}"));
    let from_count = read_entry_selected(&count_path)?.and_then(|p| {
        let file = p.rsplit(['\\', '/']).next().unwrap_or(&p).to_string();
        slot_of_entry_id(&file, name_a, name_b)
    });
    let from_selected = read_entry_selected(entry_selected_path)?
        .and_then(|id| slot_of_entry_id(&id, name_a, name_b));
    match (from_count, from_selected) {
        (Some(a), Some(b)) if a != b => Err(BlsError::EfiVar {
            path: count_path.display().to_string(),
            reason: format!("names slot {a}'s entry while LoaderEntrySelected names slot {b}'s"),
        }),
        (Some(a), _) => Ok(Some((a, BOOT_COUNT_PATH_VAR))),
        (None, Some(b)) => Ok(Some((b, "LoaderEntrySelected"))),
        (None, None) => Ok(None),
    }
}

/// The bytes efivarfs shows for a systemd-boot string variable holding `id` (attributes
/// NV|BS|RT = 7, UTF-16LE, NUL-terminated), for tests and the simulator.
pub fn encode_entry_selected(id: &str) -> Vec<u8> {
    let mut out = 7u32.to_le_bytes().to_vec();
    for u in id.encode_utf16().chain(std::iter::once(0)) {
        out.extend_from_slice(&u.to_le_bytes());
    }
    out
}

/// The slot whose entry `id` (as systemd-boot reports it, with or without the counter) is.
/// `None` when it is neither slot's.
pub fn slot_of_entry_id(id: &str, name_a: &str, name_b: &str) -> Option<SlotId> {
    [(SlotId::A, name_a), (SlotId::B, name_b)]
        .into_iter()
        .find_map(|(slot, name)| {
            parse_entry_file(id, slot, name)
                .ok()
                .flatten()
                .or_else(|| {
                    parse_entry_file(id, slot, &name.to_ascii_lowercase())
                        .ok()
                        .flatten()
                })
                .map(|e| e.slot)
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn version_compare_matches_systemd() {
        use Ordering::*;
        // Cases from systemd's test-string-util.c (test_strverscmp_improved).
        let older_newer = [
            ("123", "124"),
            ("123.4", "123.5"),
            ("123~rc1", "123"),
            ("123-1", "123.1"),
            ("abc", "hoge"),
            ("os-b", "1-os-a"),
            ("2-os-a", "10-os-b"),
            ("5.10", "5.10^1"),
        ];
        for (a, b) in older_newer {
            assert_eq!(strverscmp_improved(a, b), Less, "{a} < {b}");
            assert_eq!(strverscmp_improved(b, a), Greater, "{b} > {a}");
        }
        assert_eq!(strverscmp_improved("0123", "123"), Equal);
    }
}
