//! Boot control: which slot boots next, trial boots, commit and rollback.
//!
//! One trait, [`BootControl`], with a backend per mechanism (`gptprio`, `grubenv`, `bls`,
//! `uboot`, `efi`). The
//! simulators of each loader's choice live in the `update-agent-sandbox` crate, outside the
//! shipped agent.

pub mod bls;
pub mod efi;
pub mod efivars;
pub mod gptprio;
pub mod grubenv;
pub mod uboot;
pub mod ubootenv;

pub use crate::slot::SlotId;

use crate::disk::{ResolvedSlots, SlotError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The agent's own trial mark in a RAUC-style environment (GRUB's and U-Boot's), ignored by
/// the loader: which slot was staged and not yet committed, so `status` can tell "staged"
/// from "committed".
pub const TRIAL_VAR: &str = "UPDATE_AGENT_TRIAL";

/// What a RAUC-style selection script (GRUB's `contrib/grub.conf`, U-Boot's `boot.cmd`) does
/// on one boot: the slot it boots, or `None` when none qualified (GRUB's rescue entry,
/// U-Boot's `reset`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderChoice {
    /// The slot booted, if any.
    pub booted: Option<SlotId>,
    /// `true` when no slot qualified and the script reset the attempt counters.
    pub reset_tries: bool,
}

impl LoaderChoice {
    /// The kernel command line argument the script passes (`rauc.slot=A|B`); feed it to
    /// [`grubenv::booted_slot_from_cmdline`].
    pub fn cmdline(&self) -> Option<String> {
        self.booted.map(|s| format!("rauc.slot={s}"))
    }
}

/// A slot token of RAUC's variables (`ORDER`, `BOOT_ORDER`, the trial mark): `A` or `B`.
pub(crate) fn parse_slot_token(token: &str) -> Option<SlotId> {
    match token {
        "A" => Some(SlotId::A),
        "B" => Some(SlotId::B),
        _ => None,
    }
}

/// The trial mark's value: absent or empty = none; otherwise it must name a slot
/// (`Err(value)`: the caller reports the variable and the value).
pub(crate) fn parse_trial_mark(value: Option<&str>) -> Result<Option<SlotId>, &str> {
    match value {
        None | Some("") => Ok(None),
        Some(v) => parse_slot_token(v).map(Some).ok_or(v),
    }
}

/// What a backend reports about one slot, in its loader's terms mapped onto a common shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: SlotId,
    /// gptprio: the priority bits; grubenv: 2 for the first slot in ORDER, 1 for the second.
    pub priority: u8,
    /// Boot attempts left before the loader gives up on the slot.
    pub tries: u8,
    /// Marked good after a healthy boot.
    pub successful: bool,
}

/// The flags of both slots and the loader's verdict on them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootStatus {
    pub backend: String,
    pub slots: Vec<SlotStatus>,
    /// The slot the loader would choose on the next boot, if any.
    pub next: Option<SlotId>,
    /// Why the loader would choose it (or nothing), in words for a human.
    pub reason: String,
}

/// Errors of the boot-control layer. Each variant has a stable kind for metrics and `--json`.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("boot flags are inconsistent: {0}")]
    Inconsistent(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Disk(String),
    /// A backend's own stable kind (`uboot_*`, `ubootenv_*`, `efi_*`) with its message.
    #[error("{message}")]
    Backend { kind: &'static str, message: String },
    /// The partition table or the slots on it (no GPT, corrupt copies, missing labels...).
    #[error("disk {disk}: {source}")]
    Table {
        disk: String,
        #[source]
        source: SlotError,
    },
}

impl BootError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            BootError::Io { .. } => "boot_io",
            BootError::Inconsistent(_) => "boot_inconsistent",
            BootError::Refused(_) => "boot_refused",
            BootError::Disk(_) => "boot_disk",
            BootError::Backend { kind, .. } => kind,
            BootError::Table { source, .. } => source.kind(),
        }
    }
}

/// Boot control for one A/B pair. Every method that changes flags is crash-atomic: after a
/// power cut during the call the loader sees either the old or the new flags.
pub trait BootControl {
    /// Short backend name (`gptprio`, `grubenv`).
    fn backend(&self) -> &'static str;
    /// Current flags and the loader's next choice.
    fn status(&mut self) -> Result<BootStatus, BootError>;
    /// Make `slot` unbootable. Called before the first byte of an install is written to it.
    fn disable(&mut self, slot: SlotId) -> Result<(), BootError>;
    /// Stage `slot` for one trial boot: it boots next, and if it is never committed the
    /// loader falls back to the other slot.
    fn stage(&mut self, slot: SlotId) -> Result<(), BootError>;
    /// Mark the booted `slot` good (after a healthy boot).
    fn commit(&mut self, slot: SlotId) -> Result<(), BootError>;
    /// Make `to` (already good) boot next and leave the other slot unbootable.
    fn rollback(&mut self, to: SlotId) -> Result<(), BootError>;
    /// Undo a stage of `slot` before the reboot; the other slot boots next again.
    fn cancel(&mut self, slot: SlotId) -> Result<(), BootError>;
}

/// Which slot the running system booted from, judged by the kernel command line: any
/// `PARTUUID=<guid>` in it (`root=`, `mount.usr=`, `usr=`, `verity.usr=`, dm-verity tables,
/// ChromeOS' `PARTUUID=<kernel>/PARTNROFF=1`) is matched against the unique GUIDs of both
/// slots' partitions. `None` when nothing matches or the matches disagree.
pub fn booted_slot(cmdline: &str, slots: &ResolvedSlots) -> Option<SlotId> {
    const KEY: &str = "partuuid=";
    let lower = cmdline.to_ascii_lowercase();
    let mut found: Option<SlotId> = None;
    for (at, _) in lower.match_indices(KEY) {
        let start = at + KEY.len();
        let Some(text) = lower.get(start..start + 36) else {
            continue;
        };
        let Ok(guid) = Uuid::parse_str(text) else {
            continue;
        };
        for slot in [&slots.a, &slots.b] {
            if slot.has_guid(guid) {
                match found {
                    Some(prev) if prev != slot.id => return None,
                    _ => found = Some(slot.id),
                }
            }
        }
    }
    found
}
