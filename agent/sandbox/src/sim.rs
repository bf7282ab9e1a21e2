//! A boot simulator that chooses the next partition exactly as GRUB's `gptprio.next` and
//! ChromeOS vboot do, and updates the table the way they do before booting.
//!
//! The choice rule is the backend's own [`choose_gptprio`] (the one `GptPrio::status` uses for
//! `next`), so the backend's report and the simulated loader cannot disagree.

use update_agent::boot::gptprio::{choose_gptprio, GptPrioFlags};
use update_agent::boot::SlotId;
use update_agent::disk::{BlockDevice, Gpt, SlotError, SlotLayoutConfig};
use uuid::Uuid;

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
    /// [`update_agent::boot::booted_slot`].
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
