//! A simulator of systemd-boot with Automatic Boot Assessment, on a real entries directory:
//! list the entries, choose with the backend's own [`loader_order`] (the rule `status`
//! reports, so the two cannot disagree), and when the chosen entry has a counter with tries
//! left rename it `+LEFT-DONE` -> `+(LEFT-1)-(DONE+1)` before "booting" it, as systemd-boot
//! does. It then sets `LoaderEntrySelected` (efivarfs format) to the entry's id, and
//! `LoaderBootCountPath` to the counted entry's new path when it counted (removing a stale
//! one otherwise: the variable is volatile, set afresh on each boot).

use std::path::Path;
use update_agent::boot::bls::{
    encode_entry_selected, loader_order, rename_durable, BlsBoot, BlsError, Counter, Entry,
    BOOT_COUNT_PATH_VAR, LOADER_GUID,
};
use update_agent::boot::SlotId;

/// What one simulated boot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimBoot {
    pub booted: SlotId,
    /// The entry's file name before the loader counted.
    pub entry_before: String,
    /// Its file name after counting (equal when it has no counter or no tries left).
    pub entry_after: String,
}

/// The entry systemd-boot would rename `e` to when booting it (itself when nothing counts).
pub fn counted(e: &Entry) -> Entry {
    match e.counter {
        Some(c) if c.left > 0 => Entry {
            counter: Some(Counter {
                left: c.left - 1,
                done: Some(c.done.unwrap_or(0).saturating_add(1)),
            }),
            ..e.clone()
        },
        _ => e.clone(),
    }
}

/// One power-on through systemd-boot over `boot`'s entries directory; writes
/// `LoaderEntrySelected` to `entry_selected` when given.
pub fn boot(boot: &BlsBoot, entry_selected: Option<&Path>) -> Result<SimBoot, BlsError> {
    let entries = boot.read_entries()?;
    let order = loader_order(&entries);
    let Some(first) = order.first() else {
        return Err(BlsError::Setting("no entries to boot".into()));
    };
    let after = counted(first);
    if after != *first {
        rename_durable(boot.dir(), &first.file_name(), &after.file_name())?;
    }
    if let Some(path) = entry_selected {
        let io = |path: &Path| {
            let what = format!("writing {}", path.display());
            move |source| BlsError::Io { what, source }
        };
        std::fs::write(path, encode_entry_selected(&first.id())).map_err(io(path))?;
        let count_path = path.with_file_name(format!("{BOOT_COUNT_PATH_VAR}-{LOADER_GUID}"));
        if after != *first {
            let dir = boot
                .dir()
                .file_name()
                .and_then(|d| d.to_str())
                .unwrap_or("entries");
            let value = format!("\\loader\\{dir}\\{}", after.file_name());
            std::fs::write(&count_path, encode_entry_selected(&value)).map_err(io(&count_path))?;
        } else if count_path.exists() {
            std::fs::remove_file(&count_path).map_err(io(&count_path))?;
        }
    }
    tracing::info!(entry = %first.file_name(), counted = %after.file_name(), "simulated systemd-boot boot");
    Ok(SimBoot {
        booted: first.slot,
        entry_before: first.file_name(),
        entry_after: after.file_name(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use update_agent::boot::bls::parse_entry_file;

    #[test]
    fn counting_renames_like_systemd_boot() {
        let e = parse_entry_file("3-os-b+2.conf", SlotId::B, "os-b")
            .unwrap()
            .unwrap();
        assert_eq!(counted(&e).file_name(), "3-os-b+1-1.conf");
        assert_eq!(counted(&counted(&e)).file_name(), "3-os-b+0-2.conf");
        let spent = counted(&counted(&e));
        assert_eq!(counted(&spent), spent);
    }
}
