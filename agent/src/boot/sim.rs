//! A boot simulator that chooses the next partition exactly as GRUB's `gptprio.next` and
//! ChromeOS vboot do, and updates the table the way they do before booting.
//!
//! The choice rule ([`choose_gptprio`]) is the one `GptPrio::status` uses for `next`, so the
//! backend's report and the simulated loader cannot disagree.

use super::gptprio::GptPrioFlags;
use super::SlotId;
use crate::disk::{BlockDevice, Gpt, SlotError, SlotLayoutConfig};
use uuid::Uuid;

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

/// What one simulated boot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootedPartition {
    pub number: u32,
    pub unique_guid: Uuid,
    pub label: String,
    /// The slot whose flags partition this is, `None` for a partition outside the slots.
    pub slot: Option<SlotId>,
    /// Flags as found, before the loader decremented tries.
    pub flags_before: GptPrioFlags,
}

impl BootedPartition {
    /// Whether this boot used up one of the slot's trial tries.
    pub fn was_trial(&self) -> bool {
        self.flags_before.tries > 0
    }

    /// A kernel command line such a loader would pass (Flatcar style), for
    /// [`super::booted_slot`].
    pub fn cmdline(&self) -> String {
        format!("mount.usr=PARTUUID={} rw quiet", self.unique_guid)
    }
}

/// Boot `dev` once: read the table as the loader does (primary, or the backup when the primary
/// is invalid), choose, and when the chosen entry has tries left decrement them and write the
/// table back (backup copy first, as GRUB does). `Ok(None)`: nothing bootable.
pub fn boot_gptprio(
    dev: &mut dyn BlockDevice,
    layout: &SlotLayoutConfig,
) -> Result<Option<BootedPartition>, SlotError> {
    let mut gpt = Gpt::read(dev)?;
    let parts = gpt.partitions();
    let Some(number) = choose_gptprio(parts.iter().map(|e| (e.number, e.attributes))) else {
        return Ok(None);
    };
    let Some(entry) = parts.into_iter().find(|e| e.number == number) else {
        return Ok(None);
    };
    let flags = GptPrioFlags::from_attributes(entry.attributes);
    if flags.tries > 0 {
        let after = GptPrioFlags {
            tries: flags.tries - 1,
            ..flags
        };
        gpt.set_attributes(number, after.to_attributes(entry.attributes))?;
        gpt.write(dev)?;
    }
    let slot = layout
        .resolve(&gpt)
        .ok()
        .and_then(|s| s.slot_with_flags_part(number));
    tracing::info!(partition = number, label = %entry.name, ?slot, trial = flags.tries > 0, "simulated boot");
    Ok(Some(BootedPartition {
        number,
        unique_guid: entry.unique_guid,
        label: entry.name,
        slot,
        flags_before: flags,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

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
