//! Boot control: which slot boots next, trial boots, commit and rollback.
//!
//! One trait, [`BootControl`], with a backend per mechanism (`gptprio`, `grubenv`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// One of the two A/B slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum SlotId {
    A,
    B,
}

impl SlotId {
    pub fn other(self) -> SlotId {
        match self {
            SlotId::A => SlotId::B,
            SlotId::B => SlotId::A,
        }
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SlotId::A => "A",
            SlotId::B => "B",
        })
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
}

impl BootError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            BootError::Io { .. } => "boot_io",
            BootError::Inconsistent(_) => "boot_inconsistent",
            BootError::Refused(_) => "boot_refused",
            BootError::Disk(_) => "boot_disk",
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
