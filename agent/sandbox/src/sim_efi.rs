//! A simulator of the UEFI boot manager on a directory of efivarfs-format files: choose with
//! the backend's own [`choose`] (the rule `status` reports), delete `BootNext` before
//! "booting" when it was used (as the specification requires, so a trial is one boot), and
//! set `BootCurrent` to the option booted.

use update_agent::boot::efi::{choose, read_vars, EfiError, LoaderChoice};
use update_agent::boot::efivars::{EfiVar, EfiVars, ATTR_NV_BS_RT, GLOBAL_GUID};

/// One power-on through the boot manager over `vars` with the slots' options `entries`.
pub fn boot(vars: &mut dyn EfiVars, entries: [u16; 2]) -> Result<LoaderChoice, EfiError> {
    let mut v = read_vars(vars, entries)?;
    let had_next = v.boot_next.is_some();
    let choice = choose(&mut v);
    if had_next {
        vars.delete("BootNext", GLOBAL_GUID)?;
    }
    match choice.entry {
        Some(n) => vars.set(
            "BootCurrent",
            GLOBAL_GUID,
            &EfiVar {
                // BootCurrent is volatile: BS|RT.
                attributes: ATTR_NV_BS_RT & !1,
                data: n.to_le_bytes().to_vec(),
            },
        )?,
        None => vars.delete("BootCurrent", GLOBAL_GUID)?,
    }
    tracing::info!(entry = ?choice.entry, slot = ?choice.slot, via_boot_next = choice.via_boot_next, "simulated UEFI boot");
    Ok(choice)
}
