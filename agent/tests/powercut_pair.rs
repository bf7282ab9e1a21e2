//! Power cuts across the pair the agent writes together when it stages a release (issue 9
//! item 10): the state record's intent (slot B holds 2.0.0, verified), the GPT flags that
//! make B bootable, then the `Staged` record, in the order `ops::apply` issues them (see
//! its `// The intent, before the flag write` step). The flag write is recorded on the
//! sandbox's recording device (`power_cuts`: subsets of unflushed writes, torn writes,
//! garbage sectors); each state write's file operations are recorded (`file_cuts`). Every
//! cut falls in one of the three writes, the writes before it durable (each ends with a
//! flush or a directory fsync), those after it not issued.
//!
//! Each cut state is judged by independent readers: `cgpt show` reads the flags from the
//! saved disk image, `serde_json` parses the state file on its own. What must hold:
//! - the state file parses (old or new record), and the agent's own reader agrees;
//! - the simulated loader boots a slot whose content is a verified image;
//! - a slot the flags can boot is one the state record names with the release on it (no
//!   anonymous trial that the health check would judge as `unknown`);
//! - a `Staged` record never stands beside flags that do not stage B (the next run would
//!   wait for a reboot that boots nothing new).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use update_agent::boot::gptprio::GptPrio;
use update_agent::boot::{BootControl, SlotId};
use update_agent::disk::{BlockDevice, Gpt, ResolvedSlots};
use update_agent::state::atomic::{record_ops, FileOp};
use update_agent::state::{Phase, SlotRecord, StateStore};
use update_agent_sandbox::recording::{file_cuts, power_cuts, MemDevice, RecordingDevice};
use update_agent_sandbox::sim;
use update_agent_sandbox::testimg::{cgpt_field, require_tool, Layout};

fn marker(version: &str, role: &str) -> Vec<u8> {
    let mut m = format!("IMAGE {version} {role}").into_bytes();
    m.resize(64, 0);
    m
}

fn write_slot(dev: &mut MemDevice, slots: &ResolvedSlots, slot: SlotId, version: &str) {
    for (role, p) in &slots.get(slot).parts {
        dev.write_at(&marker(version, role), p.byte_offset).unwrap();
    }
}

fn slot_holds(dev: &MemDevice, slots: &ResolvedSlots, slot: SlotId, version: &str) -> bool {
    slots.get(slot).parts.iter().all(|(role, p)| {
        let mut b = vec![0u8; 64];
        dev.read_at(&mut b, p.byte_offset).unwrap();
        b == marker(version, role)
    })
}

fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect()
}

/// (priority, tries, successful) of partition `n`, as cgpt reads them.
fn cgpt_flags(img: &Path, n: u32) -> Result<(u64, u64, u64), String> {
    Ok((
        cgpt_field(img, n, "-P")?,
        cgpt_field(img, n, "-T")?,
        cgpt_field(img, n, "-S")?,
    ))
}

/// One state a cut can leave: the disk and the state directory.
struct CutState {
    what: String,
    disk: MemDevice,
    files: BTreeMap<PathBuf, Vec<u8>>,
}

#[test]
fn every_cut_across_the_flags_and_the_state_record_boots_a_slot_the_record_names() {
    if !require_tool("sgdisk", "gdisk").unwrap() || !require_tool("cgpt", "cgpt").unwrap() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::Flatcar;
    let (num_a, num_b) = layout.flags_parts();
    let img = dir.path().join("disk.img");
    layout.create(&img).unwrap();
    let cfg = layout.config();
    let mut dev = MemDevice::from_file(&img).unwrap();
    let slots = cfg.resolve(&Gpt::read(&dev).unwrap()).unwrap();
    write_slot(&mut dev, &slots, SlotId::A, "1.0.0");
    // The install: B made unbootable, then written and verified (not part of the pair).
    let mut setup = GptPrio::new(dev, "setup", cfg.clone()).unwrap();
    setup.disable(SlotId::B).unwrap();
    let mut dev = setup.into_inner();
    write_slot(&mut dev, &slots, SlotId::B, "2.0.0");

    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    std::fs::set_permissions(
        &state_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let store = StateStore::open(&state_dir).unwrap();
    store
        .update(|s| {
            s.phase = Phase::Downloading {
                version: "2.0.0".into(),
                bytes_done: 0,
            };
            s.slots.remove(&SlotId::B);
        })
        .unwrap();
    let files0 = snapshot(&state_dir);

    // 1. The intent.
    let ((), intent_log) = record_ops(|| {
        store
            .update(|s| {
                s.slots.insert(
                    SlotId::B,
                    SlotRecord {
                        version: "2.0.0".into(),
                        image_sha256s: vec!["ab".repeat(32)],
                        verified: true,
                    },
                );
            })
            .unwrap()
    });
    let files1 = snapshot(&state_dir);
    // 2. The flags.
    let mut bc = GptPrio::new(RecordingDevice::new(dev.clone()), "pair", cfg.clone()).unwrap();
    bc.stage(SlotId::B).unwrap();
    let mut rec = bc.into_inner();
    let disk_log = rec.take_log();
    let dev_staged = rec.into_inner();
    // 3. The staged record.
    let ((), staged_log) = record_ops(|| {
        store
            .update(|s| {
                s.phase = Phase::Staged {
                    slot: SlotId::B,
                    version: "2.0.0".into(),
                }
            })
            .unwrap()
    });
    for log in [&intent_log, &staged_log] {
        assert!(
            matches!(log.last(), Some(FileOp::FsyncDir { .. })),
            "a state write ends durable: {log:?}"
        );
    }

    let mut states = Vec::new();
    for c in file_cuts(&files0, &intent_log) {
        states.push(CutState {
            what: format!("intent write, {}", c.what),
            disk: dev.clone(),
            files: c.files,
        });
    }
    for c in power_cuts(&disk_log, 512) {
        let mut d = dev.clone();
        c.apply(&mut d).unwrap();
        states.push(CutState {
            what: format!("flag write, {}", c.what),
            disk: d,
            files: files1.clone(),
        });
    }
    for c in file_cuts(&files1, &staged_log) {
        states.push(CutState {
            what: format!("staged write, {}", c.what),
            disk: dev_staged.clone(),
            files: c.files,
        });
    }

    let mut booted_b = 0;
    for st in &states {
        let what = &st.what;
        let d = tempfile::tempdir().unwrap();
        let sdir = d.path().join("state");
        std::fs::create_dir(&sdir).unwrap();
        std::fs::set_permissions(&sdir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        for (p, bytes) in &st.files {
            let to = sdir.join(p.strip_prefix(&state_dir).unwrap());
            std::fs::write(&to, bytes).unwrap();
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
        // The state record, parsed on its own.
        let raw = std::fs::read(sdir.join("state.json"))
            .unwrap_or_else(|e| panic!("{what}: state.json: {e}"));
        let json: serde_json::Value =
            serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{what}: state.json: {e}"));
        let named_b = json["slots"]["B"]["version"].as_str() == Some("2.0.0")
            || json["slots"]["b"]["version"].as_str() == Some("2.0.0");
        let staged = json["phase"]["phase"].as_str() == Some("staged");
        // The agent's reader agrees.
        let ours = StateStore::open(&sdir)
            .unwrap()
            .load()
            .unwrap_or_else(|e| panic!("{what}: the agent cannot read the record: {e}"));
        assert_eq!(
            ours.slots.contains_key(&SlotId::B),
            named_b,
            "{what}: {json}"
        );
        assert_eq!(
            matches!(ours.phase, Phase::Staged { .. }),
            staged,
            "{what}: {json}"
        );

        // The flags, as cgpt reads them (after our repair when cgpt refuses a damaged copy).
        let path = d.path().join("disk.img");
        st.disk.save(&path).unwrap();
        let (fa, fb) = match (cgpt_flags(&path, num_a), cgpt_flags(&path, num_b)) {
            (Ok(a), Ok(b)) => (a, b),
            (ea, eb) => {
                let mut gpt = Gpt::read(&st.disk).unwrap();
                assert!(
                    gpt.health().needs_repair(),
                    "{what}: cgpt refuses an intact table: {ea:?} {eb:?}"
                );
                let mut repaired = st.disk.clone();
                gpt.repair(&mut repaired).unwrap();
                repaired.save(&path).unwrap();
                (
                    cgpt_flags(&path, num_a).unwrap(),
                    cgpt_flags(&path, num_b).unwrap(),
                )
            }
        };
        let b_bootable = fb.1 > 0 || fb.2 == 1;
        let b_first = b_bootable && fb.0 >= fa.0;
        if b_bootable {
            assert!(
                named_b,
                "{what}: the flags can boot B ({fb:?}) but the record does not name it: {json}"
            );
        }
        if staged {
            assert!(
                b_first,
                "{what}: Staged recorded beside flags A {fa:?} B {fb:?}"
            );
        }

        // The loader boots a verified slot; if it is B, the record names its release.
        let mut boot_disk = st.disk.clone();
        let booted = sim::boot_gptprio(&mut boot_disk, &cfg)
            .unwrap_or_else(|e| panic!("{what}: loader: {e}"))
            .unwrap_or_else(|| panic!("{what}: nothing boots"));
        let slot = booted.slot.unwrap_or_else(|| panic!("{what}: {booted:?}"));
        let version = if slot == SlotId::A { "1.0.0" } else { "2.0.0" };
        assert!(
            slot_holds(&boot_disk, &slots, slot, version),
            "{what}: slot {slot}"
        );
        if slot == SlotId::B {
            assert!(
                named_b,
                "{what}: booted B, which the record does not name: {json}"
            );
            booted_b += 1;
        }
    }
    assert!(states.len() > 40, "only {} cut states", states.len());
    assert!(
        booted_b > 0,
        "no cut boots the new slot: the flag write was not cut"
    );
    eprintln!(
        "{} cut states across the pair, {booted_b} boot B",
        states.len()
    );
}
