//! Creates GPT disk image files in the seed systems' layouts, for the sandbox demo and tests.
//!
//! Written by hand rather than with the `gpt` crate, whose writer re-packs entries and so
//! renumbers partitions (Flatcar's USR-A must stay partition 3).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use uuid::Uuid;

use update_agent::disk::slots::{
    BOTTLEROCKET_BOOT_TYPE, BOTTLEROCKET_HASH_TYPE, BOTTLEROCKET_ROOT_TYPE, CHROMEOS_KERNEL_TYPE,
    COREOS_USR_TYPE,
};
use update_agent::disk::SlotLayoutConfig;

/// The seed layouts the agent supports out of the box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Flatcar / CoreOS Container Linux: USR-A (3) and USR-B (4), flags on USR.
    Flatcar,
    /// ChromeOS / COS: KERN-A (2) + ROOT-A (3), KERN-B (4) + ROOT-B (5), flags on KERN.
    ChromeOs,
    /// Bottlerocket: BOOT/ROOT/HASH per bank, flags on BOOT.
    Bottlerocket,
}

/// One partition to create: number, label, type GUID, size in MiB.
#[derive(Debug, Clone)]
pub struct PartSpec {
    pub number: u32,
    pub label: String,
    pub type_guid: Uuid,
    pub size_mib: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskImageError {
    #[error("cannot create disk image {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lay out GPT on {path}: {message}")]
    Gpt { path: String, message: String },
}

const CHROME_ROOTFS: Uuid = Uuid::from_u128(0x3cb8e202_3b7e_47dd_8a3c_7ff2a13cfcec);
const EFI_SYSTEM: Uuid = Uuid::from_u128(0xc12a7328_f81f_11d2_ba4b_00a0c93ec93b);
const LINUX_DATA: Uuid = Uuid::from_u128(0x0fc63daf_8483_4772_8e79_3d69d8477de4);

impl Preset {
    pub fn parse(name: &str) -> Option<Preset> {
        match name {
            "flatcar" => Some(Preset::Flatcar),
            "chromeos" => Some(Preset::ChromeOs),
            "bottlerocket" => Some(Preset::Bottlerocket),
            _ => None,
        }
    }

    /// The agent's slot layout for this preset.
    pub fn layout(self) -> SlotLayoutConfig {
        match self {
            Preset::Flatcar => SlotLayoutConfig::flatcar(),
            Preset::ChromeOs => SlotLayoutConfig::chromeos(),
            Preset::Bottlerocket => SlotLayoutConfig::bottlerocket(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Flatcar => "flatcar",
            Preset::ChromeOs => "chromeos",
            Preset::Bottlerocket => "bottlerocket",
        }
    }

    /// The partitions of this layout with slot partitions of `slot_mib` MiB each.
    pub fn parts(self, slot_mib: u64) -> Vec<PartSpec> {
        let p = |number, label: &str, type_guid, size_mib| PartSpec {
            number,
            label: label.to_string(),
            type_guid,
            size_mib,
        };
        match self {
            Preset::Flatcar => vec![
                p(1, "EFI-SYSTEM", EFI_SYSTEM, 2),
                p(3, "USR-A", COREOS_USR_TYPE, slot_mib),
                p(4, "USR-B", COREOS_USR_TYPE, slot_mib),
                p(9, "ROOT", LINUX_DATA, 2),
            ],
            Preset::ChromeOs => vec![
                p(1, "STATE", LINUX_DATA, 2),
                p(2, "KERN-A", CHROMEOS_KERNEL_TYPE, 2),
                p(3, "ROOT-A", CHROME_ROOTFS, slot_mib),
                p(4, "KERN-B", CHROMEOS_KERNEL_TYPE, 2),
                p(5, "ROOT-B", CHROME_ROOTFS, slot_mib),
            ],
            Preset::Bottlerocket => vec![
                p(2, "BOTTLEROCKET-EFI-SYSTEM", EFI_SYSTEM, 2),
                p(3, "BOTTLEROCKET-BOOT-A", BOTTLEROCKET_BOOT_TYPE, 2),
                p(4, "BOTTLEROCKET-ROOT-A", BOTTLEROCKET_ROOT_TYPE, slot_mib),
                p(5, "BOTTLEROCKET-HASH-A", BOTTLEROCKET_HASH_TYPE, 1),
                p(7, "BOTTLEROCKET-BOOT-B", BOTTLEROCKET_BOOT_TYPE, 2),
                p(8, "BOTTLEROCKET-ROOT-B", BOTTLEROCKET_ROOT_TYPE, slot_mib),
                p(9, "BOTTLEROCKET-HASH-B", BOTTLEROCKET_HASH_TYPE, 1),
                p(13, "BOTTLEROCKET-DATA", LINUX_DATA, 2),
            ],
        }
    }
}

/// Creates (or truncates) a sparse image file at `path` with a protective MBR and a GPT (128
/// entries, both copies) holding `parts` at their given partition numbers, 1 MiB aligned, in
/// order. Partition numbers are entry indices, so gaps stay gaps.
pub fn create(path: &Path, parts: &[PartSpec]) -> Result<(), DiskImageError> {
    let io_err = |source| DiskImageError::Io {
        path: path.display().to_string(),
        source,
    };
    const MIB: u64 = 1024 * 1024;
    const SECTOR: u64 = 512;
    const ENTRIES: usize = 128;
    const ENTRY_SIZE: usize = 128;
    if let Some(bad) = parts
        .iter()
        .find(|p| p.number == 0 || p.number as usize > ENTRIES || p.size_mib == 0)
    {
        return Err(DiskImageError::Gpt {
            path: path.display().to_string(),
            message: format!(
                "partition {} ({}) needs a number in 1..=128 and a size",
                bad.number, bad.label
            ),
        });
    }
    let total_mib: u64 = 2 + parts.iter().map(|p| p.size_mib).sum::<u64>();
    let total_sectors = total_mib * MIB / SECTOR;
    let last_lba = total_sectors - 1;
    let entry_sectors = (ENTRIES * ENTRY_SIZE) as u64 / SECTOR;

    let mut entries = vec![0u8; ENTRIES * ENTRY_SIZE];
    let mut lba = MIB / SECTOR;
    for spec in parts {
        let len = spec.size_mib * MIB / SECTOR;
        let e = &mut entries[(spec.number as usize - 1) * ENTRY_SIZE..][..ENTRY_SIZE];
        e[0..16].copy_from_slice(&spec.type_guid.to_bytes_le());
        e[16..32].copy_from_slice(&Uuid::new_v4().to_bytes_le());
        e[32..40].copy_from_slice(&lba.to_le_bytes());
        e[40..48].copy_from_slice(&(lba + len - 1).to_le_bytes());
        for (i, unit) in spec.label.encode_utf16().take(36).enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
        }
        lba += len;
    }
    let disk_guid = Uuid::new_v4();
    let header = |my_lba: u64, alt_lba: u64, entries_lba: u64| {
        let mut h = [0u8; SECTOR as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
        h[40..48].copy_from_slice(&(2 + entry_sectors).to_le_bytes());
        h[48..56].copy_from_slice(&(last_lba - 1 - entry_sectors).to_le_bytes());
        h[56..72].copy_from_slice(&disk_guid.to_bytes_le());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
        h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    let mut mbr = [0u8; SECTOR as usize];
    let rec = &mut mbr[446..462];
    rec[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
    rec[4] = 0xEE;
    rec[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    rec[8..12].copy_from_slice(&1u32.to_le_bytes());
    let mbr_len = u32::try_from(total_sectors - 1).unwrap_or(u32::MAX);
    rec[12..16].copy_from_slice(&mbr_len.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err)?;
    file.set_len(total_sectors * SECTOR).map_err(io_err)?;
    let backup_entries_lba = last_lba - entry_sectors;
    for (buf, at) in [
        (&mbr[..], 0),
        (&header(1, last_lba, 2)[..], 1),
        (&entries[..], 2),
        (&entries[..], backup_entries_lba),
        (&header(last_lba, 1, backup_entries_lba)[..], last_lba),
    ] {
        file.write_all_at(buf, at * SECTOR).map_err(io_err)?;
    }
    file.sync_all().map_err(io_err)?;
    Ok(())
}
