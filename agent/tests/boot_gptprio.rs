//! The gptprio backend on real GPT images made by `sgdisk` in the three seed layouts, checked
//! with `sgdisk -v` and `cgpt show` after every operation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use update_agent::boot::gptprio::{GptPrio, GPTPRIO_MASK};
use update_agent::boot::{booted_slot, BootControl, SlotId};
use update_agent::disk::{BlockDevice, FileDevice, Gpt, SlotLayoutConfig};
use update_agent_sandbox::sim;
use update_agent_sandbox::testimg::{cgpt_field, require_tool, run, sgdisk_verify, Layout};

fn tools() -> bool {
    require_tool("sgdisk", "gdisk").unwrap() && require_tool("cgpt", "cgpt").unwrap()
}

fn image(dir: &tempfile::TempDir, layout: Layout) -> PathBuf {
    let p = dir.path().join(format!("{layout:?}.img"));
    layout.create(&p).unwrap();
    p
}

fn sha(path: &Path) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, &std::fs::read(path).unwrap())
        .as_ref()
        .to_vec()
}

fn open(path: &Path, layout: Layout) -> GptPrio<FileDevice> {
    GptPrio::new(
        FileDevice::open(path).unwrap(),
        path.display().to_string(),
        layout.config(),
    )
    .unwrap()
}

/// Raw primary entry array (LBA 2, 128 x 128 bytes as sgdisk makes it).
fn raw_entries(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()[1024..1024 + 128 * 128].to_vec()
}

/// (priority, tries, successful) as `cgpt show` reads them.
fn cgpt(path: &Path, n: u32) -> (u64, u64, u64) {
    (
        cgpt_field(path, n, "-P").unwrap(),
        cgpt_field(path, n, "-T").unwrap(),
        cgpt_field(path, n, "-S").unwrap(),
    )
}

/// Every byte outside bits 48-56 of the two flags entries is as it was; both copies agree.
fn assert_only_flags_changed(before: &[u8], path: &Path, flags_parts: (u32, u32)) {
    let after = raw_entries(path);
    for (i, (b, a)) in before.chunks(128).zip(after.chunks(128)).enumerate() {
        let n = i as u32 + 1;
        if n == flags_parts.0 || n == flags_parts.1 {
            assert_eq!(b[..48], a[..48], "entry {n} changed outside its attributes");
            assert_eq!(b[56..], a[56..], "entry {n} changed outside its attributes");
            let ab = u64::from_le_bytes(b[48..56].try_into().unwrap());
            let aa = u64::from_le_bytes(a[48..56].try_into().unwrap());
            assert_eq!(
                ab & !GPTPRIO_MASK,
                aa & !GPTPRIO_MASK,
                "entry {n}: non-gptprio bits changed"
            );
        } else {
            assert_eq!(b, a, "entry {n} changed");
        }
    }
    sgdisk_verify(path).unwrap();
    let dev = FileDevice::open_read_only(path).unwrap();
    let h = Gpt::read(&dev).unwrap().health().clone();
    assert!(!h.needs_repair(), "{h:?}");
}

#[test]
fn lifecycle_on_every_seed_layout_reads_back_with_cgpt_and_sgdisk() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for layout in Layout::ALL {
        let path = image(&dir, layout);
        let (na, nb) = layout.flags_parts();
        let mut bc = open(&path, layout);
        let st = bc.status().unwrap();
        assert_eq!(st.next, Some(SlotId::A), "{layout:?}: {}", st.reason);
        assert_eq!(cgpt(&path, na), (1, 0, 1));

        let mut before = raw_entries(&path);
        bc.disable(SlotId::B).unwrap();
        assert_eq!(cgpt(&path, nb), (0, 0, 0), "{layout:?} disable");
        assert_only_flags_changed(&before, &path, (na, nb));

        before = raw_entries(&path);
        bc.stage(SlotId::B).unwrap();
        assert_eq!(cgpt(&path, nb), (2, 1, 0), "{layout:?} stage B");
        assert_eq!(cgpt(&path, na), (1, 0, 1), "{layout:?} stage keeps A good");
        assert_only_flags_changed(&before, &path, (na, nb));
        let st = bc.status().unwrap();
        assert_eq!(st.next, Some(SlotId::B), "{}", st.reason);
        assert!(st.reason.contains("trial"), "{}", st.reason);

        // The loader boots B, spending its try.
        let booted = sim::boot_gptprio(bc.device_mut(), &layout.config())
            .unwrap()
            .unwrap();
        assert_eq!((booted.number, booted.slot), (nb, Some(SlotId::B)));
        assert!(booted.was_trial());
        assert_eq!(
            cgpt(&path, nb),
            (2, 0, 0),
            "{layout:?} loader spent the try"
        );
        sgdisk_verify(&path).unwrap();
        let slots = bc.slots().unwrap();
        assert_eq!(booted_slot(&booted.cmdline(), &slots), Some(SlotId::B));

        before = raw_entries(&path);
        bc.commit(SlotId::B).unwrap();
        assert_eq!(cgpt(&path, nb), (2, 0, 1), "{layout:?} commit");
        assert_eq!(
            cgpt(&path, na),
            (1, 0, 1),
            "{layout:?} commit leaves A as fallback"
        );
        assert_only_flags_changed(&before, &path, (na, nb));
        assert_eq!(bc.status().unwrap().next, Some(SlotId::B));

        before = raw_entries(&path);
        bc.rollback(SlotId::A).unwrap();
        assert_eq!(cgpt(&path, na).2, 1);
        assert_eq!(cgpt(&path, nb), (0, 0, 0), "{layout:?} rollback");
        assert_only_flags_changed(&before, &path, (na, nb));
        assert_eq!(bc.status().unwrap().next, Some(SlotId::A));

        bc.stage(SlotId::B).unwrap();
        assert_eq!(bc.status().unwrap().next, Some(SlotId::B));
        before = raw_entries(&path);
        bc.cancel(SlotId::B).unwrap();
        assert_eq!(cgpt(&path, nb), (0, 0, 0), "{layout:?} cancel");
        assert_only_flags_changed(&before, &path, (na, nb));
        assert_eq!(bc.status().unwrap().next, Some(SlotId::A));
        // A boots, without writing anything (successful, no tries).
        let h = sha(&path);
        let booted = sim::boot_gptprio(bc.device_mut(), &layout.config())
            .unwrap()
            .unwrap();
        assert_eq!(booted.slot, Some(SlotId::A));
        assert_eq!(sha(&path), h);
    }
}

#[test]
fn an_uncommitted_trial_falls_back_to_the_good_slot() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir, Layout::ChromeOs);
    let mut bc = open(&path, Layout::ChromeOs).with_tries(2).unwrap();
    bc.stage(SlotId::B).unwrap();
    assert_eq!(cgpt(&path, 4), (2, 2, 0));
    let cfg = SlotLayoutConfig::chromeos();
    for _ in 0..2 {
        let b = sim::boot_gptprio(bc.device_mut(), &cfg).unwrap().unwrap();
        assert_eq!(b.slot, Some(SlotId::B));
    }
    let b = sim::boot_gptprio(bc.device_mut(), &cfg).unwrap().unwrap();
    assert_eq!(
        b.slot,
        Some(SlotId::A),
        "tries spent, never committed: back to A"
    );
    let st = bc.status().unwrap();
    assert_eq!(st.next, Some(SlotId::A));
    assert!(st.reason.contains("successful"), "{}", st.reason);
    assert_eq!(bc.with_tries(16).unwrap_err().kind(), "boot_refused");
}

#[test]
fn staging_renormalises_a_high_priority_and_keeps_other_bits() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir, Layout::Flatcar);
    // USR-A at priority 15 (bits 48-51) with bit 60 set; cgpt itself writes it.
    run(
        "cgpt",
        &["add", "-i", "3", "-P", "15", "-S", "1"].map(String::from),
        &path,
    )
    .unwrap();
    let before = raw_entries(&path);
    let mut bc = open(&path, Layout::Flatcar);
    bc.stage(SlotId::B).unwrap();
    assert_eq!(cgpt(&path, 3), (14, 0, 1));
    assert_eq!(cgpt(&path, 4), (15, 1, 0));
    assert_only_flags_changed(&before, &path, (3, 4));
    let a = u64::from_le_bytes(
        raw_entries(&path)[2 * 128 + 48..2 * 128 + 56]
            .try_into()
            .unwrap(),
    );
    assert_ne!(a & (1 << 60), 0, "bit 60 of USR-A survives");
}

fn corrupt(path: &Path, offset: u64) {
    let mut d = FileDevice::open(path).unwrap();
    let mut b = [0u8];
    d.read_at(&mut b, offset).unwrap();
    d.write_at(&[b[0] ^ 0x5a], offset).unwrap();
    d.flush().unwrap();
}

#[test]
fn a_corrupt_primary_is_repaired_from_the_backup_before_any_change() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (what, offset) in [("header", 512 + 40), ("entry array", 1024 + 2 * 128 + 60)] {
        let path = image(&dir, Layout::Flatcar);
        let before = raw_entries(&path);
        corrupt(&path, offset);
        assert!(
            sgdisk_verify(&path).is_err(),
            "sgdisk must see the damage to the {what}"
        );
        let h = sha(&path);
        let mut bc = open(&path, Layout::Flatcar);
        let st = bc.status().unwrap();
        assert_eq!(st.next, Some(SlotId::A));
        assert!(
            st.reason.contains("primary corrupt"),
            "{what}: {}",
            st.reason
        );
        assert_eq!(sha(&path), h, "open and status write nothing");
        bc.disable(SlotId::B).unwrap();
        sgdisk_verify(&path).unwrap();
        assert_eq!(cgpt(&path, 4), (0, 0, 0));
        assert_only_flags_changed(&before, &path, (3, 4));
    }
}

#[test]
fn a_corrupt_backup_is_repaired_too() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir, Layout::Bottlerocket);
    let before = raw_entries(&path);
    let last = std::fs::metadata(&path).unwrap().len() - 512;
    corrupt(&path, last + 30);
    let mut bc = open(&path, Layout::Bottlerocket);
    assert!(bc.status().unwrap().reason.contains("backup corrupt"));
    bc.disable(SlotId::B).unwrap();
    assert_only_flags_changed(&before, &path, (3, 7));
}

/// Open (and, when it opens, try to stage) and return the error; the image must be unchanged.
fn refused(path: &Path, cfg: SlotLayoutConfig) -> update_agent::boot::BootError {
    let h = sha(path);
    let r = GptPrio::new(FileDevice::open(path).unwrap(), "disk.img", cfg)
        .and_then(|mut bc| bc.stage(SlotId::B).map(|_| bc));
    assert_eq!(sha(path), h, "nothing may be written");
    match r {
        Ok(_) => panic!("expected an error for {}", path.display()),
        Err(e) => e,
    }
}

#[test]
fn bad_disks_and_configs_are_clear_errors_and_write_nothing() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let e = refused(&blank, SlotLayoutConfig::flatcar());
    assert_eq!(e.kind(), "gpt_missing", "{e}");
    assert!(e.to_string().contains("no GPT"), "{e}");

    let both = image(&dir, Layout::Flatcar);
    corrupt(&both, 512 + 40);
    corrupt(&both, std::fs::metadata(&both).unwrap().len() - 512 + 40);
    let e = refused(&both, SlotLayoutConfig::flatcar());
    assert_eq!(e.kind(), "gpt_corrupt", "{e}");
    assert!(
        e.to_string().contains("primary corrupt") && e.to_string().contains("backup corrupt"),
        "{e}"
    );

    let chrome = image(&dir, Layout::ChromeOs);
    let e = refused(&chrome, SlotLayoutConfig::flatcar());
    assert_eq!(e.kind(), "slot_flags_partition_missing", "{e}");
    assert!(e.to_string().contains("USR-A"), "{e}");

    run("sgdisk", &["-c=5:ROOT-X".to_string()], &chrome).unwrap();
    let e = refused(&chrome, SlotLayoutConfig::chromeos());
    assert_eq!(e.kind(), "slot_partition_missing", "{e}");
    assert!(e.to_string().contains("ROOT-B"), "{e}");

    run("sgdisk", &["-c=5:ROOT-A".to_string()], &chrome).unwrap();
    let e = refused(&chrome, SlotLayoutConfig::chromeos());
    assert_eq!(e.kind(), "slot_ambiguous", "{e}");
    assert!(e.to_string().contains("[3, 5]"), "{e}");

    run(
        "sgdisk",
        &["-c=5:ROOT-B".to_string(), "-c=4:KERN-X".to_string()],
        &chrome,
    )
    .unwrap();
    let e = refused(&chrome, SlotLayoutConfig::chromeos());
    assert_eq!(e.kind(), "slot_flags_partition_missing", "{e}");
    assert!(e.to_string().contains("KERN-B"), "{e}");

    let flatcar = image(&dir, Layout::Flatcar);
    let mut overlap = SlotLayoutConfig::flatcar();
    overlap
        .b
        .insert("usr".into(), update_agent::disk::PartSelector::Number(3));
    let e = refused(&flatcar, overlap);
    assert_eq!(e.kind(), "slot_overlap", "{e}");

    // Staging while the fallback slot was never marked good.
    run(
        "cgpt",
        &["add", "-i", "3", "-S", "0", "-T", "1"].map(String::from),
        &flatcar,
    )
    .unwrap();
    let e = refused(&flatcar, SlotLayoutConfig::flatcar());
    assert_eq!(e.kind(), "boot_refused", "{e}");
    assert!(e.to_string().contains("not marked successful"), "{e}");

    // Rolling back to a slot that never succeeded, disabling the only bootable slot.
    let h = sha(&flatcar);
    let mut bc = open(&flatcar, Layout::Flatcar);
    let e = bc.rollback(SlotId::B).unwrap_err();
    assert!(e.to_string().contains("never marked successful"), "{e}");
    // Disabling B would leave A, on trial and never marked good, as the only bootable slot.
    let e = bc.disable(SlotId::B).unwrap_err();
    assert!(e.to_string().contains("not marked successful"), "{e}");
    let e = bc.disable(SlotId::A).unwrap_err();
    assert_eq!(e.kind(), "boot_refused", "{e}");
    assert!(e.to_string().contains("nothing"), "{e}");
    assert_eq!(sha(&flatcar), h);
}

#[test]
fn booted_slot_reads_the_three_systems_command_lines() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for layout in Layout::ALL {
        let path = image(&dir, layout);
        let slots = open(&path, layout).slots().unwrap();
        let (ga, gb) = (
            slots.a.flags_partition().unwrap().unique_guid,
            slots.b.flags_partition().unwrap().unique_guid,
        );
        let root_b = slots.b.parts.values().last().unwrap().unique_guid;
        let upper = gb.to_string().to_uppercase();
        let cases = [
            (
                format!("root=/dev/sda9 mount.usr=PARTUUID={ga} ro"),
                Some(SlotId::A),
            ),
            (format!("usr=PARTUUID={upper}"), Some(SlotId::B)),
            (
                format!("root=PARTUUID={gb}/PARTNROFF=1 rootwait"),
                Some(SlotId::B),
            ),
            (
                format!(
                    "dm-mod.create=\"root,,,ro,0 1 verity 1 PARTUUID={root_b} x\" root=/dev/dm-0"
                ),
                Some(SlotId::B),
            ),
            (format!("root=PARTUUID={ga} mount.usr=PARTUUID={gb}"), None),
            (
                "root=PARTUUID=00000000-1111-2222-3333-444444444444".into(),
                None,
            ),
            ("root=PARTUUID=short quiet".into(), None),
            (String::new(), None),
        ];
        for (cmdline, want) in cases {
            assert_eq!(booted_slot(&cmdline, &slots), want, "{layout:?}: {cmdline}");
        }
    }
}

#[test]
fn slots_resolve_with_numbers_sizes_and_guids_sgdisk_reports() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir, Layout::Bottlerocket);
    let slots = open(&path, Layout::Bottlerocket).slots().unwrap();
    let nums = |s: &update_agent::disk::Slot| ["boot", "root", "hash"].map(|r| s.parts[r].number);
    assert_eq!(nums(&slots.a), [3, 4, 5]);
    assert_eq!(nums(&slots.b), [7, 8, 9]);
    let out = std::process::Command::new("sgdisk")
        .args(["-i", "8"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let root_b = &slots.b.parts["root"];
    assert!(
        text.to_lowercase()
            .contains(&root_b.unique_guid.to_string()),
        "{text}"
    );
    assert!(
        text.contains(&format!("First sector: {} ", root_b.first_lba)),
        "{text}"
    );
    assert_eq!(root_b.byte_len, 8 << 20);
    assert_eq!(root_b.byte_offset, root_b.first_lba * 512);
    assert_eq!(root_b.label, "BOTTLEROCKET-ROOT-B");
}

#[test]
fn file_device_bounds_sizes_and_refuses_non_disks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.img");
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    let mut d = FileDevice::open(&p).unwrap();
    assert_eq!((d.size(), d.sector_size()), (1 << 20, 512));
    d.write_at(b"hello", 4096).unwrap();
    d.flush().unwrap();
    d.drop_cache(0, 1 << 20).unwrap();
    let mut b = [0u8; 5];
    d.read_at(&mut b, 4096).unwrap();
    assert_eq!(&b, b"hello");
    let e = d.write_at(b"xx", (1 << 20) - 1).unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    assert!(d.read_at(&mut b, (1 << 20) - 2).is_err());
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        1 << 20,
        "the image never grows"
    );

    let ro = FileDevice::open_read_only(&p).unwrap();
    let mut ro: Box<dyn BlockDevice> = Box::new(ro);
    assert!(ro.write_at(b"x", 0).is_err());

    assert_eq!(
        FileDevice::open_read_only(dir.path()).unwrap_err().kind(),
        "disk_not_a_disk"
    );
    let empty = dir.path().join("empty.img");
    std::fs::File::create(&empty).unwrap();
    assert_eq!(
        FileDevice::open(&empty).unwrap_err().kind(),
        "disk_too_small"
    );
    let e = FileDevice::open(dir.path().join("nope")).unwrap_err();
    assert_eq!(e.kind(), "disk_open");
    assert!(e.to_string().contains("nope"), "{e}");
}

/// The block-device path: the same image through a loop device (needs root and loop support;
/// skipped with a message otherwise).
#[test]
fn a_loop_device_is_a_disk_like_its_image() {
    if !tools() || !require_tool("losetup", "mount").unwrap() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir, Layout::Flatcar);
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&path)
        .output()
        .unwrap();
    if !out.status.success() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root and must attach a loop device: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "skipping: cannot attach a loop device (needs root and /dev/loop*): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let result = std::panic::catch_unwind(|| {
        let dev = FileDevice::open(&loopdev).unwrap();
        assert_eq!(dev.size(), 64 << 20);
        let mut bc = GptPrio::new(dev, loopdev.clone(), SlotLayoutConfig::flatcar()).unwrap();
        bc.disable(SlotId::B).unwrap();
        bc.stage(SlotId::B).unwrap();
        bc.device().drop_cache(0, 64 << 20).unwrap();
        assert_eq!(bc.status().unwrap().next, Some(SlotId::B));
    });
    let _ = std::process::Command::new("losetup")
        .args(["-d", &loopdev])
        .status();
    result.unwrap();
    assert_eq!(cgpt(&path, 4), (2, 1, 0));
    sgdisk_verify(&path).unwrap();
}

/// Any sequence of operations and boots, in any order and on any slot: each operation either
/// succeeds or is refused without a byte written, and the loader always finds a slot to boot,
/// now and after every trial runs out of tries.
#[test]
fn no_sequence_of_operations_leaves_nothing_to_boot() {
    use proptest::prelude::*;
    use update_agent_sandbox::recording::MemDevice;
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir, Layout::ChromeOs);
    let base = MemDevice::from_file(&path).unwrap();
    let cfg = SlotLayoutConfig::chromeos();
    let tables = |d: &MemDevice| {
        let mut head = vec![0u8; 34 * 512];
        let mut tail = vec![0u8; 33 * 512];
        d.read_at(&mut head, 0).unwrap();
        d.read_at(&mut tail, d.size() - 33 * 512).unwrap();
        (head, tail)
    };
    let act = (0u8..6, any::<bool>(), 1u8..4);
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 96,
        ..Default::default()
    });
    runner
        .run(&proptest::collection::vec(act, 1..20), |acts| {
            let mut bc = GptPrio::new(base.clone(), "prop", cfg.clone()).unwrap();
            for (k, b, tries) in acts {
                let s = if b { SlotId::A } else { SlotId::B };
                let before = tables(bc.device());
                let r = match k {
                    0 => bc.disable(s),
                    1 => {
                        bc = GptPrio::new(bc.into_inner(), "prop", cfg.clone())
                            .unwrap()
                            .with_tries(tries)
                            .unwrap();
                        bc.stage(s)
                    }
                    2 => bc.commit(s),
                    3 => bc.rollback(s),
                    4 => bc.cancel(s),
                    _ => sim::boot_gptprio(bc.device_mut(), &cfg)
                        .map(|b| assert!(b.is_some(), "nothing booted"))
                        .map_err(|e| panic!("{e}")),
                };
                if let Err(e) = r {
                    prop_assert_eq!(e.kind(), "boot_refused", "{}", e);
                    prop_assert!(tables(bc.device()) == before, "refused op wrote: {}", e);
                }
                let mut probe = bc.device().clone();
                for _ in 0..20 {
                    let booted = sim::boot_gptprio(&mut probe, &cfg).unwrap();
                    prop_assert!(booted.is_some(), "after op {} on {}: nothing boots", k, s);
                    if !booted.unwrap().was_trial() {
                        break;
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

/// 4096-byte logical sectors: a loop device with `--sector-size 4096`, partitioned by sgdisk
/// (needs root and loop support; skipped with a message otherwise).
#[test]
fn four_k_sector_disks_work_end_to_end() {
    if !tools() || !require_tool("losetup", "mount").unwrap() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("4k.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show", "--sector-size", "4096"])
        .arg(&path)
        .output()
        .unwrap();
    if !out.status.success() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root and must attach a 4K loop device: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "skipping: cannot attach a 4K loop device (needs root and /dev/loop*): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let loopdev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let result = std::panic::catch_unwind(|| {
        Layout::Bottlerocket.partition(&loopdev).unwrap();
        let dev = FileDevice::open(&loopdev).unwrap();
        assert_eq!(dev.sector_size(), 4096);
        let mut bc = GptPrio::new(
            dev,
            loopdev.display().to_string(),
            SlotLayoutConfig::bottlerocket(),
        )
        .unwrap();
        let root_b = bc.slots().unwrap().b.parts["root"].clone();
        assert_eq!(root_b.byte_offset, root_b.first_lba * 4096);
        assert_eq!(root_b.byte_len, 8 << 20);
        bc.disable(SlotId::B).unwrap();
        bc.stage(SlotId::B).unwrap();
        assert_eq!(cgpt(&loopdev, 7), (2, 1, 0));
        sgdisk_verify(&loopdev).unwrap();
        let b = sim::boot_gptprio(bc.device_mut(), &SlotLayoutConfig::bottlerocket())
            .unwrap()
            .unwrap();
        assert_eq!(b.slot, Some(SlotId::B));
        bc.commit(SlotId::B).unwrap();
        assert_eq!(cgpt(&loopdev, 7), (2, 0, 1));
        sgdisk_verify(&loopdev).unwrap();
    });
    let _ = std::process::Command::new("losetup")
        .arg("-d")
        .arg(&loopdev)
        .status();
    result.unwrap();
}
