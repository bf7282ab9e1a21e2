//! EFI boot manager backend: one `Boot####` load option per slot, `BootNext` for the trial
//! boot, `BootOrder` for commit and rollback (the scheme RAUC's `efi` bootloader uses, here
//! through efivarfs instead of `efibootmgr`).
//!
//! The firmware's choice rule ([`choose`], UEFI specification "Boot Manager"): when
//! `BootNext` names an existing load option, the boot manager deletes `BootNext` and boots
//! that option once; otherwise it walks `BootOrder` and boots the first option that exists
//! and is active (`LOAD_OPTION_ACTIVE`). A trial is therefore exactly one boot: if the staged
//! slot never commits, the next boot follows `BootOrder` back to the committed slot.
//!
//! Operations: `stage` writes `BootNext` (the slot stays out of `BootOrder`); `commit` moves
//! the slot to the front of `BootOrder`; `rollback`, `disable` and `cancel` delete a
//! `BootNext` naming the abandoned slot and remove its option from `BootOrder`. Every write
//! is one variable (`SetVariable` is atomic per variable); `rollback` writes two, `BootNext`
//! first, and every state in between boots a committed slot.
//!
//! Status mapping: `successful` = in `BootOrder`; `priority` 2 for the slot the firmware
//! boots next, 1 for another slot in `BootOrder`, 0 otherwise; `tries` 1 for the slot
//! `BootNext` names (one trial), else 0.

use super::efivars::{EfiVar, EfiVarError, EfiVars, ATTR_NV_BS_RT, GLOBAL_GUID};
use super::{BootControl, BootError, BootStatus, SlotId, SlotStatus};

/// `LOAD_OPTION_ACTIVE`.
pub(crate) const LOAD_OPTION_ACTIVE: u32 = 0x1;

/// Errors of the efi backend. Nothing is written when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum EfiError {
    #[error(transparent)]
    Var(#[from] EfiVarError),
    #[error("EFI variable {name} in {dir} is malformed: {reason}")]
    Malformed {
        dir: String,
        name: String,
        reason: String,
    },
    #[error("EFI load option {name} of slot {slot} does not exist in {dir} (create it with efibootmgr --create, see docs/boot.md)")]
    MissingEntry {
        dir: String,
        slot: SlotId,
        name: String,
    },
    #[error("refused on EFI variables in {dir}: {reason}")]
    Refused { dir: String, reason: String },
    #[error("invalid efi backend setting: {0}")]
    Setting(String),
}

impl EfiError {
    /// A stable machine-readable kind.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            EfiError::Var(e) => e.kind(),
            EfiError::Malformed { .. } => "efi_malformed",
            EfiError::MissingEntry { .. } => "efi_missing_entry",
            EfiError::Refused { .. } => "efi_refused",
            EfiError::Setting(_) => "efi_setting",
        }
    }
}

impl From<EfiError> for BootError {
    fn from(e: EfiError) -> Self {
        match e {
            EfiError::Var(EfiVarError::Io { path, source }) => BootError::Io {
                what: format!("EFI variable {path}"),
                source,
            },
            EfiError::Refused { .. } => BootError::Refused(e.to_string()),
            other => BootError::Backend {
                kind: other.kind(),
                message: other.to_string(),
            },
        }
    }
}

/// `Boot0001` for 1.
pub fn boot_var(n: u16) -> String {
    format!("Boot{n:04X}")
}

/// Parse a load option number as efibootmgr prints it (`0001`, hexadecimal, 1 to 4 digits).
pub(crate) fn parse_entry_number(s: &str) -> Result<u16, EfiError> {
    let t = s
        .strip_prefix("Boot")
        .or_else(|| s.strip_prefix("0x"))
        .unwrap_or(s);
    if t.is_empty() || t.len() > 4 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(EfiError::Setting(format!(
            "load option {s:?} is not a hexadecimal Boot#### number such as \"0001\""
        )));
    }
    u16::from_str_radix(t, 16).map_err(|e| EfiError::Setting(format!("{s:?}: {e}")))
}

/// The parts of an `EFI_LOAD_OPTION` the choice rule needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOption {
    pub attributes: u32,
    pub description: String,
    /// Bytes of the device path list.
    pub file_path_len: u16,
}

impl LoadOption {
    /// Parse `UINT32 Attributes; UINT16 FilePathListLength; CHAR16 Description[] (NUL
    /// terminated); EFI_DEVICE_PATH_PROTOCOL FilePathList[]; UINT8 OptionalData[]`.
    pub(crate) fn parse(data: &[u8]) -> Result<Self, String> {
        if data.len() < 6 {
            return Err(format!(
                "{} bytes: shorter than the 6-byte header",
                data.len()
            ));
        }
        let attributes = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let file_path_len = u16::from_le_bytes([data[4], data[5]]);
        let mut units = Vec::new();
        let mut p = 6;
        loop {
            let Some(c) = data.get(p..p + 2) else {
                return Err("description is not NUL-terminated".into());
            };
            p += 2;
            let u = u16::from_le_bytes([c[0], c[1]]);
            if u == 0 {
                break;
            }
            units.push(u);
        }
        let description = String::from_utf16(&units)
            .map_err(|_| "description is not valid UTF-16".to_string())?;
        if data.len() < p + usize::from(file_path_len) {
            return Err(format!(
                "FilePathListLength {file_path_len} runs past the end ({} bytes after the description)",
                data.len() - p
            ));
        }
        if file_path_len < 4 {
            return Err("the device path list is shorter than its end node".into());
        }
        Ok(LoadOption {
            attributes,
            description,
            file_path_len,
        })
    }

    /// Encode with `file_path` as the device path list (tests, the simulator, provisioning).
    pub fn encode(attributes: u32, description: &str, file_path: &[u8]) -> Vec<u8> {
        let mut out = attributes.to_le_bytes().to_vec();
        out.extend_from_slice(&(file_path.len() as u16).to_le_bytes());
        out.extend_from_slice(&super::efivars::utf16_bytes(description));
        out.extend_from_slice(file_path);
        out
    }

    pub(crate) fn active(&self) -> bool {
        self.attributes & LOAD_OPTION_ACTIVE != 0
    }
}

/// The device path list of just the end node (`END_ENTIRE_DEVICE_PATH`): a valid but
/// empty path, for test and sandbox load options.
pub const END_DEVICE_PATH: [u8; 4] = [0x7f, 0xff, 0x04, 0x00];

/// The boot manager's variables as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfiBootVars {
    pub boot_next: Option<u16>,
    pub boot_order: Vec<u16>,
    pub boot_current: Option<u16>,
    /// Load option numbers that exist and are active, among those `BootOrder`/`BootNext`
    /// name and the slots'.
    pub active: Vec<u16>,
    /// The slots' load option numbers (A, B).
    pub entries: [u16; 2],
}

impl EfiBootVars {
    /// The slot whose load option is `n`.
    pub(crate) fn slot_of(&self, n: u16) -> Option<SlotId> {
        if n == self.entries[0] {
            Some(SlotId::A)
        } else if n == self.entries[1] {
            Some(SlotId::B)
        } else {
            None
        }
    }

    pub(crate) fn entry(&self, slot: SlotId) -> u16 {
        match slot {
            SlotId::A => self.entries[0],
            SlotId::B => self.entries[1],
        }
    }

    fn order_text(&self) -> String {
        order_text(&self.boot_order)
    }
}

fn order_text(order: &[u16]) -> String {
    if order.is_empty() {
        return "(empty)".into();
    }
    order
        .iter()
        .map(|n| format!("{n:04X}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// What the firmware's boot manager does on one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderChoice {
    /// The load option booted (`None`: nothing in `BootNext`/`BootOrder` exists and is active).
    pub entry: Option<u16>,
    /// Its slot (`None` for an option that is no slot's).
    pub slot: Option<SlotId>,
    /// Booted through `BootNext` (which the firmware deleted first).
    pub via_boot_next: bool,
}

/// THE choice rule: `BootNext` when it names an existing active option (deleted before
/// booting: `vars.boot_next` is cleared), else the first existing active option in
/// `BootOrder`. `status`, the refusal rule and the sandbox simulator use it.
pub fn choose(vars: &mut EfiBootVars) -> LoaderChoice {
    let next = vars.boot_next.take();
    if let Some(n) = next.filter(|n| vars.active.contains(n)) {
        return LoaderChoice {
            entry: Some(n),
            slot: vars.slot_of(n),
            via_boot_next: true,
        };
    }
    let entry = vars
        .boot_order
        .iter()
        .copied()
        .find(|n| vars.active.contains(n));
    LoaderChoice {
        entry,
        slot: entry.and_then(|n| vars.slot_of(n)),
        via_boot_next: false,
    }
}

/// Decode a `UINT16` variable.
fn u16_value(var: &EfiVar, name: &str, dir: &str) -> Result<u16, EfiError> {
    match var.data.as_slice() {
        [a, b] => Ok(u16::from_le_bytes([*a, *b])),
        other => Err(EfiError::Malformed {
            dir: dir.to_string(),
            name: name.to_string(),
            reason: format!("{} bytes where a UINT16 (2 bytes) is expected", other.len()),
        }),
    }
}

/// `BootOrder` bytes.
pub fn encode_order(order: &[u16]) -> Vec<u8> {
    order.iter().flat_map(|n| n.to_le_bytes()).collect()
}

/// Read the boot manager's variables and both slots' load options. Strict: a malformed
/// `BootOrder`/`BootNext`/`BootCurrent` or a missing or malformed slot option is an error.
pub fn read_vars(vars: &dyn EfiVars, entries: [u16; 2]) -> Result<EfiBootVars, EfiError> {
    let dir = vars.describe();
    let boot_order = match vars.get("BootOrder", GLOBAL_GUID)? {
        None => Vec::new(),
        Some(v) => {
            if v.data.len() % 2 != 0 {
                return Err(EfiError::Malformed {
                    dir,
                    name: "BootOrder".into(),
                    reason: format!("{} bytes: not a whole number of UINT16s", v.data.len()),
                });
            }
            v.data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        }
    };
    let boot_next = vars
        .get("BootNext", GLOBAL_GUID)?
        .map(|v| u16_value(&v, "BootNext", &dir))
        .transpose()?;
    let boot_current = vars
        .get("BootCurrent", GLOBAL_GUID)?
        .map(|v| u16_value(&v, "BootCurrent", &dir))
        .transpose()?;
    let mut active = Vec::new();
    for (slot, n) in [(SlotId::A, entries[0]), (SlotId::B, entries[1])] {
        let name = boot_var(n);
        let Some(v) = vars.get(&name, GLOBAL_GUID)? else {
            return Err(EfiError::MissingEntry { dir, slot, name });
        };
        let opt = LoadOption::parse(&v.data).map_err(|reason| EfiError::Malformed {
            dir: dir.clone(),
            name: name.clone(),
            reason,
        })?;
        if opt.active() {
            active.push(n);
        }
    }
    // Other options the firmware could boot: those BootOrder and BootNext name.
    for n in boot_order.iter().chain(boot_next.iter()).copied() {
        if entries.contains(&n) || active.contains(&n) {
            continue;
        }
        let is_active = match vars.get(&boot_var(n), GLOBAL_GUID)? {
            Some(v) => LoadOption::parse(&v.data).is_ok_and(|o| o.active()),
            None => false,
        };
        if is_active {
            active.push(n);
        }
    }
    Ok(EfiBootVars {
        boot_next,
        boot_order,
        boot_current,
        active,
        entries,
    })
}

/// The efi [`BootControl`] backend.
#[derive(Debug)]
pub struct EfiBoot {
    vars: Box<dyn EfiVars>,
    entries: [u16; 2],
}

/// One change to the variables, applied in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    SetNext(u16),
    DeleteNext,
    SetOrder(Vec<u16>),
}

impl EfiBoot {
    /// A backend over `vars` with the load options of slots A and B.
    pub fn new(vars: Box<dyn EfiVars>, entry_a: u16, entry_b: u16) -> Result<Self, EfiError> {
        if entry_a == entry_b {
            return Err(EfiError::Setting(format!(
                "slots A and B need different load options (both Boot{entry_a:04X})"
            )));
        }
        Ok(EfiBoot {
            vars,
            entries: [entry_a, entry_b],
        })
    }

    /// Read the variables.
    pub(crate) fn read(&self) -> Result<EfiBootVars, EfiError> {
        read_vars(self.vars.as_ref(), self.entries)
    }

    /// The booted slot from `BootCurrent`, if it names a slot's load option.
    pub fn booted_slot(&self) -> Result<Option<SlotId>, EfiError> {
        let v = self.read()?;
        Ok(v.boot_current.and_then(|n| v.slot_of(n)))
    }

    /// Plan with `plan` (which sees the current variables and may refuse), check the
    /// firmware's choice on the result with `check`, then write the changes in order.
    fn modify(
        &mut self,
        op: &str,
        plan: impl FnOnce(&EfiBootVars, &str) -> Result<Vec<Change>, String>,
        check: impl FnOnce(&EfiBootVars) -> Result<(), String>,
    ) -> Result<(), BootError> {
        let dir = self.vars.describe();
        let span = tracing::info_span!("efi", op, dir = %dir);
        let _enter = span.enter();
        let before = self.read()?;
        let refused = |reason: String| EfiError::Refused {
            dir: dir.clone(),
            reason,
        };
        let changes = plan(&before, &dir).map_err(refused)?;
        let mut after = before.clone();
        for c in &changes {
            match c {
                Change::SetNext(n) => after.boot_next = Some(*n),
                Change::DeleteNext => after.boot_next = None,
                Change::SetOrder(o) => after.boot_order = o.clone(),
            }
        }
        check(&after).map_err(refused)?;
        for c in changes {
            let r = match c {
                Change::SetNext(n) if before.boot_next != Some(n) => self.vars.set(
                    "BootNext",
                    GLOBAL_GUID,
                    &EfiVar {
                        attributes: ATTR_NV_BS_RT,
                        data: n.to_le_bytes().to_vec(),
                    },
                ),
                Change::DeleteNext if before.boot_next.is_some() => {
                    self.vars.delete("BootNext", GLOBAL_GUID)
                }
                Change::SetOrder(o) if o != before.boot_order => self.vars.set(
                    "BootOrder",
                    GLOBAL_GUID,
                    &EfiVar {
                        attributes: ATTR_NV_BS_RT,
                        data: encode_order(&o),
                    },
                ),
                _ => Ok(()),
            };
            r.map_err(EfiError::from)?;
        }
        Ok(())
    }
}

/// The firmware's next choice must be `slot`.
fn require_next(after: &EfiBootVars, slot: SlotId, when: &str) -> Result<(), String> {
    let c = choose(&mut after.clone());
    if c.slot == Some(slot) {
        Ok(())
    } else {
        Err(format!(
            "{when} the firmware would boot {} (BootNext={}, BootOrder={}), not slot {slot}",
            describe_choice(&c),
            after
                .boot_next
                .map_or("unset".to_string(), |n| format!("{n:04X}")),
            after.order_text()
        ))
    }
}

fn describe_choice(c: &LoaderChoice) -> String {
    match (c.entry, c.slot) {
        (Some(n), Some(s)) => format!("Boot{n:04X} (slot {s})"),
        (Some(n), None) => format!("Boot{n:04X} (no slot)"),
        (None, _) => "nothing".into(),
    }
}

/// `order` without `n`.
fn without(order: &[u16], n: u16) -> Vec<u16> {
    order.iter().copied().filter(|&x| x != n).collect()
}

/// `order` with `n` first.
fn with_first(order: &[u16], n: u16) -> Vec<u16> {
    let mut out = vec![n];
    out.extend(without(order, n));
    out
}

/// Refuse unless `slot`'s option is in `BootOrder` (committed).
fn require_committed(v: &EfiBootVars, slot: SlotId, why: &str) -> Result<(), String> {
    if v.boot_order.contains(&v.entry(slot)) {
        Ok(())
    } else {
        Err(format!(
            "slot {slot}'s load option Boot{:04X} is not in BootOrder={}, so {why}",
            v.entry(slot),
            v.order_text()
        ))
    }
}

/// The changes that abandon `slot`: its `BootNext` deleted, its option out of `BootOrder`.
fn abandon(v: &EfiBootVars, slot: SlotId) -> Vec<Change> {
    let n = v.entry(slot);
    let mut out = Vec::new();
    if v.boot_next == Some(n) {
        out.push(Change::DeleteNext);
    }
    out.push(Change::SetOrder(without(&v.boot_order, n)));
    out
}

impl BootControl for EfiBoot {
    fn backend(&self) -> &'static str {
        "efi"
    }

    fn status(&mut self) -> Result<BootStatus, BootError> {
        let v = self.read()?;
        let c = choose(&mut v.clone());
        let mut by_order = v.clone();
        by_order.boot_next = None;
        let order_choice = choose(&mut by_order);
        let slots = [SlotId::A, SlotId::B]
            .into_iter()
            .map(|slot| {
                let n = v.entry(slot);
                SlotStatus {
                    slot,
                    priority: if c.slot == Some(slot) {
                        2
                    } else if v.boot_order.contains(&n) && v.active.contains(&n) {
                        1
                    } else {
                        0
                    },
                    tries: u8::from(v.boot_next == Some(n) && v.active.contains(&n)),
                    successful: v.boot_order.contains(&n),
                }
            })
            .collect();
        let reason = if c.via_boot_next {
            format!(
                "BootNext={:04X} names {}: the firmware deletes BootNext and boots it once; the \
                 boot after follows BootOrder={} to {}",
                c.entry.unwrap_or_default(),
                describe_choice(&c),
                v.order_text(),
                describe_choice(&order_choice)
            )
        } else {
            format!(
                "no BootNext{}: the firmware boots the first active load option in BootOrder={}: {}",
                match v.boot_next {
                    Some(n) => format!(" that exists (BootNext={n:04X} names no active option)"),
                    None => String::new(),
                },
                v.order_text(),
                describe_choice(&c)
            )
        };
        Ok(BootStatus {
            backend: self.backend().to_string(),
            slots,
            next: c.slot,
            reason,
        })
    }

    fn disable(&mut self, slot: SlotId) -> Result<(), BootError> {
        let other = slot.other();
        self.modify(
            "disable",
            |v, _| {
                require_committed(
                    v,
                    other,
                    &format!("disabling {slot} would leave no bootable slot"),
                )?;
                Ok(abandon(v, slot))
            },
            |after| require_next(after, other, &format!("after disabling {slot}")),
        )
    }

    fn stage(&mut self, slot: SlotId) -> Result<(), BootError> {
        let other = slot.other();
        self.modify(
            "stage",
            |v, _| {
                require_committed(
                    v,
                    other,
                    &format!("staging {slot} would leave no fallback if its trial fails"),
                )?;
                Ok(vec![Change::SetNext(v.entry(slot))])
            },
            |after| {
                require_next(after, slot, &format!("after staging {slot}"))?;
                let mut spent = after.clone();
                choose(&mut spent);
                require_next(
                    &spent,
                    other,
                    &format!("once {slot}'s one trial boot is over"),
                )
            },
        )
    }

    fn commit(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.modify(
            "commit",
            |v, _| {
                let n = v.entry(slot);
                if !v.active.contains(&n) {
                    return Err(format!(
                        "slot {slot}'s load option Boot{n:04X} is not active: the firmware would skip it"
                    ));
                }
                Ok(vec![Change::SetOrder(with_first(&v.boot_order, n))])
            },
            |_| Ok(()),
        )
    }

    fn rollback(&mut self, to: SlotId) -> Result<(), BootError> {
        let from = to.other();
        self.modify(
            "rollback",
            |v, _| {
                require_committed(v, to, "it is not a known-good rollback target")?;
                let mut changes = Vec::new();
                if v.boot_next == Some(v.entry(from)) {
                    changes.push(Change::DeleteNext);
                }
                let order = with_first(&without(&v.boot_order, v.entry(from)), v.entry(to));
                changes.push(Change::SetOrder(order));
                Ok(changes)
            },
            |after| require_next(after, to, &format!("after rolling back to {to}")),
        )
    }

    fn cancel(&mut self, slot: SlotId) -> Result<(), BootError> {
        let other = slot.other();
        self.modify(
            "cancel",
            |v, _| {
                require_committed(
                    v,
                    other,
                    &format!("cancelling the stage of {slot} would leave no bootable slot"),
                )?;
                Ok(abandon(v, slot))
            },
            |after| require_next(after, other, &format!("after cancelling {slot}")),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn load_option_round_trip_and_errors() {
        let bytes = LoadOption::encode(1, "slot A", &END_DEVICE_PATH);
        let o = LoadOption::parse(&bytes).unwrap();
        assert_eq!(o.description, "slot A");
        assert!(o.active());
        assert!(LoadOption::parse(&bytes[..5]).is_err());
        assert!(LoadOption::parse(&bytes[..bytes.len() - 1]).is_err());
        assert!(LoadOption::parse(&LoadOption::encode(1, "x", &[])).is_err());
    }

    #[test]
    fn entry_numbers() {
        assert_eq!(parse_entry_number("0001").unwrap(), 1);
        assert_eq!(parse_entry_number("Boot000A").unwrap(), 10);
        assert_eq!(parse_entry_number("ffff").unwrap(), 0xffff);
        for bad in ["", "00001", "zz", "-1"] {
            assert_eq!(parse_entry_number(bad).unwrap_err().kind(), "efi_setting");
        }
    }

    #[test]
    fn boot_next_once_then_boot_order() {
        let mut v = EfiBootVars {
            boot_next: Some(2),
            boot_order: vec![3, 1],
            boot_current: None,
            active: vec![1, 2],
            entries: [1, 2],
        };
        let c = choose(&mut v);
        assert_eq!(
            (c.entry, c.slot, c.via_boot_next),
            (Some(2), Some(SlotId::B), true)
        );
        assert_eq!(v.boot_next, None);
        // 0003 does not exist: skipped.
        let c = choose(&mut v);
        assert_eq!(
            (c.entry, c.slot, c.via_boot_next),
            (Some(1), Some(SlotId::A), false)
        );
    }
}
