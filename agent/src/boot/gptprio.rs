//! GPT priority/tries/successful backend (ChromeOS cgpt, Bottlerocket signpost, Flatcar GRUB
//! `gptprio.next`).
//!
//! The flags live in the attribute field of each slot's flags partition: priority in bits
//! 48-51, tries in 52-55, successful in bit 56. Every other bit, every other entry and every
//! partition number is left exactly as found. Each operation re-reads the table (the loader
//! changes it between our calls), checks the resulting choice with the loaders' own rule
//! before writing, and writes through [`Gpt::write`] (broken copy repaired first, then backup,
//! flush, primary, flush).

use super::{BootControl, BootError, BootStatus, SlotId, SlotStatus};
use crate::disk::{BlockDevice, Gpt, ResolvedSlots, SlotError, SlotLayoutConfig};

pub(crate) const PRIORITY_SHIFT: u32 = 48;
pub(crate) const TRIES_SHIFT: u32 = 52;
pub(crate) const SUCCESSFUL_BIT: u32 = 56;
/// Bits 48-56: the only bits this backend ever changes.
pub const GPTPRIO_MASK: u64 = 0x1ff << PRIORITY_SHIFT;

/// The gptprio fields of one attribute word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct GptPrioFlags {
    pub priority: u8,
    pub tries: u8,
    pub successful: bool,
}

impl GptPrioFlags {
    pub fn from_attributes(attrs: u64) -> Self {
        GptPrioFlags {
            priority: ((attrs >> PRIORITY_SHIFT) & 0xf) as u8,
            tries: ((attrs >> TRIES_SHIFT) & 0xf) as u8,
            successful: (attrs >> SUCCESSFUL_BIT) & 1 == 1,
        }
    }

    /// `old` with bits 48-56 replaced by these flags (values above 15 are clamped).
    pub fn to_attributes(self, old: u64) -> u64 {
        let p = u64::from(self.priority.min(15));
        let t = u64::from(self.tries.min(15));
        (old & !GPTPRIO_MASK)
            | (p << PRIORITY_SHIFT)
            | (t << TRIES_SHIFT)
            | (u64::from(self.successful) << SUCCESSFUL_BIT)
    }

    /// Unbootable: priority 0, no tries, not successful.
    pub(crate) const DISABLED: GptPrioFlags = GptPrioFlags {
        priority: 0,
        tries: 0,
        successful: false,
    };
}

/// Tries given to a staged slot unless configured otherwise (Bottlerocket and ChromeOS use 1).
pub(crate) const DEFAULT_TRIES: u8 = 1;

/// The gptprio backend over one disk.
#[derive(Debug)]
pub struct GptPrio<D> {
    dev: D,
    disk: String,
    layout: SlotLayoutConfig,
    tries: u8,
}

fn idx(s: SlotId) -> usize {
    match s {
        SlotId::A => 0,
        SlotId::B => 1,
    }
}

impl<D: BlockDevice> GptPrio<D> {
    /// Open the backend on `dev` (`disk` names it in messages). Reads and resolves the table
    /// once to fail early; writes nothing.
    pub fn new(
        dev: D,
        disk: impl Into<String>,
        layout: SlotLayoutConfig,
    ) -> Result<Self, BootError> {
        let me = GptPrio {
            dev,
            disk: disk.into(),
            layout,
            tries: DEFAULT_TRIES,
        };
        me.load()?;
        Ok(me)
    }

    /// Tries a staged slot gets (1..=15).
    pub fn with_tries(mut self, tries: u8) -> Result<Self, BootError> {
        if !(1..=15).contains(&tries) {
            return Err(BootError::Refused(format!(
                "gptprio tries must be 1..=15 (4 bits), got {tries}"
            )));
        }
        self.tries = tries;
        Ok(self)
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    pub fn into_inner(self) -> D {
        self.dev
    }

    pub fn layout(&self) -> &SlotLayoutConfig {
        &self.layout
    }

    /// The slots as the table on disk describes them now.
    pub fn slots(&self) -> Result<ResolvedSlots, BootError> {
        Ok(self.load()?.1)
    }

    fn table_err(&self, source: impl Into<SlotError>) -> BootError {
        BootError::Table {
            disk: self.disk.clone(),
            source: source.into(),
        }
    }

    fn load(&self) -> Result<(Gpt, ResolvedSlots), BootError> {
        let gpt = Gpt::read(&self.dev).map_err(|e| self.table_err(e))?;
        let slots = self.layout.resolve(&gpt).map_err(|e| self.table_err(e))?;
        Ok((gpt, slots))
    }

    fn flags_of(gpt: &Gpt, slots: &ResolvedSlots) -> [GptPrioFlags; 2] {
        [SlotId::A, SlotId::B].map(|s| {
            gpt.partition(slots.get(s).flags_part)
                .map(|e| GptPrioFlags::from_attributes(e.attributes))
                .unwrap_or_default()
        })
    }

    /// The loaders' next choice over the whole table, mapped onto the slots.
    fn next_of(gpt: &Gpt, slots: &ResolvedSlots) -> (Option<u32>, Option<SlotId>) {
        let n = choose_gptprio(gpt.partitions().iter().map(|e| (e.number, e.attributes)));
        (n, n.and_then(|n| slots.slot_with_flags_part(n)))
    }

    /// Apply `f` to both slots' flags, check the loaders would then boot `expect` (and, when
    /// `fallback` is given, that slot once the first one's tries run out), then write.
    fn change(
        &mut self,
        op: &str,
        expect: Option<SlotId>,
        fallback: Option<(SlotId, SlotId)>,
        f: impl FnOnce(&mut [GptPrioFlags; 2]) -> Result<(), BootError>,
    ) -> Result<(), BootError> {
        let _span = tracing::info_span!("gptprio", disk = %self.disk, op).entered();
        let (mut gpt, slots) = self.load()?;
        let mut flags = Self::flags_of(&gpt, &slots);
        let before = flags;
        f(&mut flags)?;
        for s in [SlotId::A, SlotId::B] {
            let n = slots.get(s).flags_part;
            let old = gpt.partition(n).map(|e| e.attributes).unwrap_or(0);
            gpt.set_attributes(n, flags[idx(s)].to_attributes(old))
                .map_err(|e| self.table_err(e))?;
        }
        let (winner, next) = Self::next_of(&gpt, &slots);
        if let Some(want) = expect {
            if next != Some(want) {
                return Err(BootError::Refused(format!(
                    "{op}: afterwards the loader would boot {} instead of slot {want}; nothing written",
                    describe_winner(&gpt, winner, next)
                )));
            }
        }
        if let Some((trial, back)) = fallback {
            let mut spent = gpt.clone();
            let n = slots.get(trial).flags_part;
            let attrs = spent.partition(n).map(|e| e.attributes).unwrap_or(0);
            let f = GptPrioFlags {
                tries: 0,
                ..GptPrioFlags::from_attributes(attrs)
            };
            spent
                .set_attributes(n, f.to_attributes(attrs))
                .map_err(|e| self.table_err(e))?;
            let (w, n) = Self::next_of(&spent, &slots);
            if n != Some(back) {
                return Err(BootError::Refused(format!(
                    "{op}: if slot {trial}'s trial failed the loader would boot {} instead of slot {back}; nothing written",
                    describe_winner(&spent, w, n)
                )));
            }
        }
        tracing::info!(?before, after = ?flags, "writing gptprio flags");
        gpt.write(&mut self.dev).map_err(|e| self.table_err(e))?;
        Ok(())
    }
}

/// Refuse to leave `keep` as the only bootable slot unless it is marked successful: a slot on
/// trial loses its last try at the next boot, and then nothing would boot.
fn require_good_fallback(op: &str, f: &[GptPrioFlags; 2], keep: SlotId) -> Result<(), BootError> {
    let k = f[idx(keep)];
    if k.successful && k.priority > 0 {
        Ok(())
    } else {
        Err(BootError::Refused(format!(
            "{op}: slot {keep} would be the only bootable slot but is not marked successful (priority {}, tries {}); nothing written",
            k.priority, k.tries
        )))
    }
}

fn describe_winner(gpt: &Gpt, winner: Option<u32>, slot: Option<SlotId>) -> String {
    match (winner, slot) {
        (Some(_), Some(s)) => format!("slot {s}"),
        (Some(n), None) => {
            let label = gpt.partition(n).map(|e| e.name).unwrap_or_default();
            format!("partition {n} {label:?} outside the slots")
        }
        (None, _) => "nothing (no bootable partition)".into(),
    }
}

impl<D: BlockDevice> BootControl for GptPrio<D> {
    fn backend(&self) -> &'static str {
        "gptprio"
    }

    fn status(&mut self) -> Result<BootStatus, BootError> {
        let (gpt, slots) = self.load()?;
        let flags = Self::flags_of(&gpt, &slots);
        let (winner, next) = Self::next_of(&gpt, &slots);
        let mut reason = match (winner, next) {
            (Some(n), Some(s)) => {
                let f = flags[idx(s)];
                let label = gpt.partition(n).map(|e| e.name).unwrap_or_default();
                let how = if f.tries > 0 {
                    format!("trial boot, {} tries left", f.tries)
                } else {
                    "marked successful".into()
                };
                format!(
                    "slot {s} (partition {n} {label:?}) has the highest bootable priority {}: {how}",
                    f.priority
                )
            }
            (Some(_), None) => format!(
                "{} has the highest bootable priority",
                describe_winner(&gpt, winner, None)
            ),
            (None, _) => "no partition is bootable: each has priority 0, or no tries left and is not successful".into(),
        };
        let h = gpt.health();
        if h.needs_repair() {
            reason.push_str(&format!(
                "; GPT needs repair (primary {}, backup {}{})",
                h.primary,
                h.backup,
                if h.primary.is_valid() && h.backup.is_valid() {
                    ", copies differ"
                } else {
                    ""
                }
            ));
        }
        Ok(BootStatus {
            backend: self.backend().into(),
            slots: [SlotId::A, SlotId::B]
                .into_iter()
                .map(|s| SlotStatus {
                    slot: s,
                    priority: flags[idx(s)].priority,
                    tries: flags[idx(s)].tries,
                    successful: flags[idx(s)].successful,
                })
                .collect(),
            next,
            reason,
        })
    }

    fn disable(&mut self, slot: SlotId) -> Result<(), BootError> {
        let op = format!("disable slot {slot}");
        self.change(&op.clone(), Some(slot.other()), None, |f| {
            require_good_fallback(&op, f, slot.other())?;
            f[idx(slot)] = GptPrioFlags::DISABLED;
            Ok(())
        })
    }

    fn stage(&mut self, slot: SlotId) -> Result<(), BootError> {
        let tries = self.tries;
        let other = slot.other();
        self.change(
            &format!("stage slot {slot}"),
            Some(slot),
            Some((slot, other)),
            |f| {
                let o = f[idx(other)];
                if !o.successful {
                    return Err(BootError::Refused(format!(
                        "stage slot {slot}: slot {other} is not marked successful, so a failed trial of {slot} would leave nothing to fall back to; commit {other} first"
                    )));
                }
                // New above old; renormalise to old=1/new=2 unless the old one is higher, and
                // make room at the top of the 4-bit range.
                let (new_p, old_p) = match o.priority {
                    15 => (15, 14),
                    p => (p.max(1) + 1, p.max(1)),
                };
                f[idx(other)].priority = old_p;
                f[idx(slot)] = GptPrioFlags {
                    priority: new_p,
                    tries,
                    successful: false,
                };
                Ok(())
            },
        )
    }

    fn commit(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.change(&format!("commit slot {slot}"), None, None, |f| {
            let s = &mut f[idx(slot)];
            if s.priority == 0 {
                return Err(BootError::Refused(format!(
                    "commit slot {slot}: it has priority 0, so it cannot be the slot that booted; nothing written"
                )));
            }
            s.successful = true;
            s.tries = 0;
            Ok(())
        })
    }

    fn rollback(&mut self, to: SlotId) -> Result<(), BootError> {
        self.change(&format!("roll back to slot {to}"), Some(to), None, |f| {
            let t = &mut f[idx(to)];
            if !t.successful {
                return Err(BootError::Refused(format!(
                    "roll back to slot {to}: it was never marked successful; nothing written"
                )));
            }
            t.priority = t.priority.max(1);
            f[idx(to.other())] = GptPrioFlags::DISABLED;
            Ok(())
        })
    }

    fn cancel(&mut self, slot: SlotId) -> Result<(), BootError> {
        let op = format!("cancel slot {slot}");
        self.change(&op.clone(), Some(slot.other()), None, |f| {
            require_good_fallback(&op, f, slot.other())?;
            f[idx(slot)] = GptPrioFlags::DISABLED;
            Ok(())
        })
    }
}

/// The loaders' choice: walk entries in index order; an entry is a candidate when it has
/// tries left or is marked successful, and wins when its priority is strictly greater than the
/// best so far (starting from 0, so priority 0 never boots and ties go to the lower index).
/// `entries` yields (partition number, attribute field); returns the chosen number.
pub fn choose_gptprio(entries: impl IntoIterator<Item = (u32, u64)>) -> Option<u32> {
    let mut best = 0u8;
    let mut chosen = None;
    for (number, attrs) in entries {
        let f = GptPrioFlags::from_attributes(attrs);
        if (f.tries > 0 || f.successful) && f.priority > best {
            best = f.priority;
            chosen = Some(number);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn flags_touch_only_bits_48_to_56() {
        let old = 0xfe00_0000_0000_0001u64 | (0x1ff << 48);
        let f = GptPrioFlags::from_attributes(old);
        assert_eq!((f.priority, f.tries, f.successful), (15, 15, true));
        let new = GptPrioFlags {
            priority: 2,
            tries: 1,
            successful: false,
        }
        .to_attributes(old);
        assert_eq!(new & !GPTPRIO_MASK, old & !GPTPRIO_MASK);
        assert_eq!(new >> 48 & 0x1ff, 0x012);
        // sgdisk prints successful=1, priority=2 as 0102000000000000.
        let sg = GptPrioFlags {
            priority: 2,
            tries: 0,
            successful: true,
        }
        .to_attributes(0);
        assert_eq!(format!("{sg:016x}"), "0102000000000000");
    }

    fn a(priority: u8, tries: u8, successful: bool) -> u64 {
        GptPrioFlags {
            priority,
            tries,
            successful,
        }
        .to_attributes(0)
    }

    #[test]
    fn choice_rule_matches_the_loaders() {
        // Priority 0 never boots, even when successful.
        assert_eq!(choose_gptprio([(1, a(0, 5, true))]), None);
        // Neither tries nor successful: not a candidate.
        assert_eq!(
            choose_gptprio([(1, a(9, 0, false)), (2, a(1, 0, true))]),
            Some(2)
        );
        // Highest priority wins; ties go to the lower index.
        assert_eq!(
            choose_gptprio([(3, a(2, 1, false)), (4, a(2, 0, true))]),
            Some(3)
        );
        assert_eq!(
            choose_gptprio([(3, a(1, 0, true)), (4, a(2, 1, false))]),
            Some(4)
        );
        assert_eq!(choose_gptprio([]), None);
    }
}
