//! A GPT read from an untrusted disk: the input is the start of a 1 MiB disk (protective
//! MBR, primary header, entries); the target fixes the header and entries CRCs when the
//! header's fields allow it, so mutation reaches the entry parsing and slot resolution
//! instead of stopping at the checksum. `Gpt::read` never panics; a table it accepts
//! resolves slots (or errors) without panicking and repairs to a table it reads back.
#![no_main]
use libfuzzer_sys::fuzz_target;
use update_agent_sandbox::recording::MemDevice;
use update_agent_sandbox::testimg::Layout;
use update_agent::disk::{BlockDevice, Gpt};

const DISK: usize = 1 << 20;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn fix_crcs(disk: &mut [u8]) {
    let h = 512;
    let size = le32(disk, h + 12) as usize;
    let entries_lba = u64::from_le_bytes(disk[h + 72..h + 80].try_into().unwrap_or_default());
    let (n, esz) = (le32(disk, h + 80) as usize, le32(disk, h + 84) as usize);
    if let Some(len) = n.checked_mul(esz) {
        let start = (entries_lba as usize).saturating_mul(512);
        if len <= 128 * 1024 && start.checked_add(len).is_some_and(|e| e <= disk.len()) {
            let crc = crc32fast::hash(&disk[start..start + len]);
            disk[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
        }
    }
    if (92..=512).contains(&size) {
        disk[h + 16..h + 20].fill(0);
        let crc = crc32fast::hash(&disk[h..h + size]);
        disk[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut disk = vec![0u8; DISK];
    let n = data.len().min(DISK);
    disk[..n].copy_from_slice(&data[..n]);
    if data.first().is_some_and(|b| b & 1 == 0) {
        fix_crcs(&mut disk);
    }
    let dev = MemDevice::new(disk);
    let Ok(mut gpt) = Gpt::read(&dev) else {
        return;
    };
    for layout in Layout::ALL {
        let _ = layout.config().resolve(&gpt);
    }
    let mut copy = dev.clone();
    if gpt.repair(&mut copy).is_ok() {
        let again = Gpt::read(&copy).expect("a repaired table reads back");
        assert!(
            !again.health().needs_repair(),
            "repair left a copy to repair"
        );
    }
    let _ = copy.size();
});
