#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The efi backend on a directory of efivarfs-format files: a trial through `BootNext` and
//! commit/rollback through `BootOrder`, cross-checked both ways with `efibootmgr` (libefivar
//! reads and writes a file-backed tree named by `EFIVARFS_PATH`); the immutable flag cleared
//! and restored; bad variables refused with nothing written; a power cut between any two
//! variable writes leaves a state in which the firmware (as efibootmgr shows the variables)
//! boots the old or the new choice, never nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use update_agent::boot::efi::{boot_var, encode_order, EfiBoot, LoadOption, END_DEVICE_PATH};
use update_agent::boot::efivars::{
    encode, is_immutable, set_immutable, EfiVar, EfiVarError, EfiVarFs, EfiVars, ATTR_NV_BS_RT,
    GLOBAL_GUID,
};
use update_agent::boot::{BootControl, BootError, SlotId};
use update_agent_sandbox::sim_efi;
use update_agent_sandbox::testimg::require_tool;

const ENTRIES: [u16; 2] = [1, 2];

fn var(data: Vec<u8>) -> EfiVar {
    EfiVar {
        attributes: ATTR_NV_BS_RT,
        data,
    }
}

/// Boot0001 (A), Boot0002 (B), Boot0000 (a shell); BootOrder 0001,0000; booted A.
fn tree(dir: &Path) -> PathBuf {
    let d = dir.join("efivars");
    std::fs::create_dir_all(&d).unwrap();
    let mut v = EfiVarFs::new(&d);
    for (n, label) in [(1, "os A"), (2, "os B"), (0, "EFI Shell")] {
        v.set(
            &boot_var(n),
            GLOBAL_GUID,
            &var(LoadOption::encode(1, label, &END_DEVICE_PATH)),
        )
        .unwrap();
    }
    v.set("BootOrder", GLOBAL_GUID, &var(encode_order(&[1, 0])))
        .unwrap();
    v.set(
        "BootCurrent",
        GLOBAL_GUID,
        &var(1u16.to_le_bytes().to_vec()),
    )
    .unwrap();
    d
}

fn backend(d: &Path) -> EfiBoot {
    EfiBoot::new(Box::new(EfiVarFs::new(d)), ENTRIES[0], ENTRIES[1]).unwrap()
}

fn boot(d: &Path) -> Option<SlotId> {
    sim_efi::boot(&mut EfiVarFs::new(d), ENTRIES).unwrap().slot
}

fn efibootmgr(d: &Path, args: &[&str]) -> String {
    let mut path = d.display().to_string();
    path.push('/');
    let out = Command::new("efibootmgr")
        .env("EFIVARFS_PATH", path)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "efibootmgr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// efibootmgr's `BootNext:` / `BootOrder:` / `BootCurrent:` lines.
fn shown(d: &Path) -> BTreeMap<String, String> {
    efibootmgr(d, &[])
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| k.starts_with("Boot") && !k.contains('*'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// What the firmware boots next by efibootmgr's view: BootNext, else BootOrder's first
/// entry that efibootmgr lists as active (`Boot0001*`). Independent of the backend's parser.
fn firmware_next(d: &Path) -> Option<String> {
    let text = efibootmgr(d, &[]);
    let active: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Boot"))
        .filter_map(|l| l.split_once('*'))
        .map(|(n, _)| n.to_string())
        .collect();
    let s = shown(d);
    if let Some(n) = s.get("BootNext").filter(|n| active.contains(n)) {
        return Some(n.clone());
    }
    s.get("BootOrder")?
        .split(',')
        .find(|n| active.iter().any(|a| a == n))
        .map(str::to_string)
}

fn have_efibootmgr() -> bool {
    require_tool("efibootmgr", "efibootmgr").unwrap()
}

#[test]
fn trial_via_boot_next_then_commit_and_rollback_as_efibootmgr_sees_them() {
    let em = have_efibootmgr();
    let dir = tempfile::tempdir().unwrap();
    let d = tree(dir.path());
    let mut b = backend(&d);
    b.disable(SlotId::B).unwrap();
    b.stage(SlotId::B).unwrap();
    let st = b.status().unwrap();
    assert_eq!(st.next, Some(SlotId::B), "{}", st.reason);
    assert!(st.reason.contains("BootNext=0002"), "{}", st.reason);
    if em {
        let s = shown(&d);
        assert_eq!(s["BootNext"], "0002");
        assert_eq!(s["BootOrder"], "0001,0000");
    }
    // One trial boot; never committed, the next boot is A again.
    assert_eq!(boot(&d), Some(SlotId::B));
    let mut b = backend(&d);
    assert_eq!(b.booted_slot().unwrap(), Some(SlotId::B));
    assert!(
        !b.status().unwrap().slots[1].successful,
        "a trial is not successful"
    );
    assert_eq!(boot(&d), Some(SlotId::A));

    // Stage again, boot, commit: BootOrder leads with B, A stays as fallback.
    backend(&d).stage(SlotId::B).unwrap();
    assert_eq!(boot(&d), Some(SlotId::B));
    backend(&d).commit(SlotId::B).unwrap();
    if em {
        assert_eq!(shown(&d)["BootOrder"], "0002,0001,0000");
        assert!(!shown(&d).contains_key("BootNext"));
    }
    assert_eq!(boot(&d), Some(SlotId::B));
    backend(&d).rollback(SlotId::A).unwrap();
    if em {
        assert_eq!(shown(&d)["BootOrder"], "0001,0000");
    }
    assert_eq!(boot(&d), Some(SlotId::A));

    // And we read what efibootmgr writes.
    if em {
        efibootmgr(&d, &["-q", "-n", "0002"]);
        efibootmgr(&d, &["-q", "-o", "0001,0002,0000"]);
        let st = backend(&d).status().unwrap();
        assert_eq!(st.next, Some(SlotId::B), "{}", st.reason);
        assert!(st.slots[1].successful);
    }
}

#[test]
fn immutable_variables_are_written_and_keep_their_flag() {
    let dir = tempfile::tempdir().unwrap();
    let d = tree(dir.path());
    let order = d.join(format!("BootOrder-{GLOBAL_GUID}"));
    if set_immutable(&order).is_err() {
        // Only where the filesystem has inode flags and we may set them (root on ext4...).
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "cannot set the immutable flag on {}: run as root on ext4/xfs/btrfs",
                order.display()
            );
        }
        eprintln!("skipping: cannot set the immutable flag here");
        return;
    }
    assert!(std::fs::write(&order, b"x").is_err(), "the flag holds");
    let mut b = backend(&d);
    b.disable(SlotId::B).unwrap();
    b.commit(SlotId::A).unwrap();
    backend(&d).stage(SlotId::B).unwrap();
    boot(&d);
    backend(&d).commit(SlotId::B).unwrap();
    assert!(is_immutable(&order).unwrap(), "flag restored");
    let v = EfiVarFs::new(&d)
        .get("BootOrder", GLOBAL_GUID)
        .unwrap()
        .unwrap();
    assert_eq!(v.data, encode_order(&[2, 1, 0]));
    std::process::Command::new("chattr")
        .arg("-i")
        .arg(&order)
        .status()
        .ok();
}

fn snapshot(d: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn bad_variables_are_clear_errors_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, Option<&[u8]>, &str); 5] = [
        (
            "odd BootOrder",
            "BootOrder",
            Some(&[7, 0, 0, 0, 1, 0, 2]),
            "efi_malformed",
        ),
        (
            "short BootNext",
            "BootNext",
            Some(&[7, 0, 0, 0, 1]),
            "efi_malformed",
        ),
        ("no attributes", "BootOrder", Some(&[7, 0]), "efi_malformed"),
        ("missing Boot0002", "Boot0002", None, "efi_missing_entry"),
        (
            "truncated load option",
            "Boot0001",
            Some(&[7, 0, 0, 0, 1, 0, 0, 0, 9, 0]),
            "efi_malformed",
        ),
    ];
    for (i, (what, name, bytes, kind)) in cases.into_iter().enumerate() {
        let d = tree(&dir.path().join(i.to_string()));
        let file = d.join(format!("{name}-{GLOBAL_GUID}"));
        match bytes {
            Some(b) => std::fs::write(&file, b).unwrap(),
            None => std::fs::remove_file(&file).unwrap(),
        }
        let before = snapshot(&d);
        let mut b = backend(&d);
        let e = b.status().unwrap_err();
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert!(e.to_string().contains(name), "{what}: {e}");
        for op in [
            b.stage(SlotId::B),
            b.commit(SlotId::A),
            b.rollback(SlotId::A),
            b.disable(SlotId::B),
        ] {
            assert_eq!(op.unwrap_err().kind(), kind, "{what}");
        }
        assert_eq!(snapshot(&d), before, "{what}: nothing written");
    }
}

#[test]
fn staging_without_a_committed_fallback_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = tree(dir.path());
    let mut v = EfiVarFs::new(&d);
    v.set("BootOrder", GLOBAL_GUID, &var(encode_order(&[0])))
        .unwrap();
    let before = snapshot(&d);
    let e = backend(&d).stage(SlotId::B).unwrap_err();
    assert_eq!(e.kind(), "boot_refused", "{e}");
    assert!(e.to_string().contains("BootOrder=0000"), "{e}");
    assert_eq!(snapshot(&d), before);
}

type Log = Arc<Mutex<Vec<(String, Option<Vec<u8>>)>>>;

/// Records each variable write or delete (file name, efivarfs bytes), then performs it.
#[derive(Debug)]
struct Recording {
    inner: EfiVarFs,
    log: Log,
}

impl EfiVars for Recording {
    fn get(&self, name: &str, guid: &str) -> Result<Option<EfiVar>, EfiVarError> {
        self.inner.get(name, guid)
    }
    fn set(&mut self, name: &str, guid: &str, v: &EfiVar) -> Result<(), EfiVarError> {
        self.log
            .lock()
            .unwrap()
            .push((format!("{name}-{guid}"), Some(encode(v))));
        self.inner.set(name, guid, v)
    }
    fn delete(&mut self, name: &str, guid: &str) -> Result<(), EfiVarError> {
        self.log
            .lock()
            .unwrap()
            .push((format!("{name}-{guid}"), None));
        self.inner.delete(name, guid)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn restore(d: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(d).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    for (n, b) in files {
        std::fs::write(d.join(n), b).unwrap();
    }
}

#[test]
fn a_power_cut_between_any_two_variable_writes_boots_the_old_or_the_new_choice() {
    if !have_efibootmgr() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = tree(dir.path());
    let judge = dir.path().join("judge");
    std::fs::create_dir_all(&judge).unwrap();
    type OpFn = fn(&mut EfiBoot) -> Result<(), BootError>;
    // Each operation, and what the firmware boots next before and after it (Boot####).
    let ops: [(&str, OpFn, bool, &str, &str); 7] = [
        ("disable B", |b| b.disable(SlotId::B), false, "0001", "0001"),
        ("stage B", |b| b.stage(SlotId::B), false, "0001", "0002"),
        ("cancel B", |b| b.cancel(SlotId::B), false, "0002", "0001"),
        (
            "stage B again",
            |b| b.stage(SlotId::B),
            true,
            "0001",
            "0002",
        ),
        // After the trial boot (BootNext consumed) BootOrder still starts with A.
        ("commit B", |b| b.commit(SlotId::B), false, "0001", "0002"),
        ("stage A", |b| b.stage(SlotId::A), false, "0002", "0001"),
        (
            "rollback to B",
            |b| b.rollback(SlotId::B),
            false,
            "0001",
            "0002",
        ),
    ];
    let label = |n: &str| match n {
        "0001" => "os A",
        "0002" => "os B",
        _ => "",
    };
    let mut judged = 0;
    for (what, op, boot_after, old, new) in ops {
        let base = snapshot(&d);
        restore(&judge, &base);
        assert_eq!(
            firmware_next(&judge).as_deref(),
            Some(old),
            "{what}: before"
        );
        let log: Log = Arc::default();
        let mut b = EfiBoot::new(
            Box::new(Recording {
                inner: EfiVarFs::new(&d),
                log: log.clone(),
            }),
            ENTRIES[0],
            ENTRIES[1],
        )
        .unwrap();
        op(&mut b).unwrap_or_else(|e| panic!("{what}: {e}"));
        // Every prefix of the writes is a state a power cut can leave (each SetVariable is
        // atomic). Judge each with an independent reader, efibootmgr: the option the firmware
        // boots next must be the old slot's or the new slot's, whole (listed, active, its own
        // label), never a missing or torn entry, the shell or nothing; and once the new
        // choice is reached a later cut never goes back to the old one.
        let log = log.lock().unwrap().clone();
        let mut outcomes: Vec<String> = Vec::new();
        for k in 0..=log.len() {
            let mut files = base.clone();
            for (name, value) in &log[..k] {
                match value {
                    Some(bytes) => files.insert(name.clone(), bytes.clone()),
                    None => files.remove(name),
                };
            }
            restore(&judge, &files);
            let seen = firmware_next(&judge).unwrap_or_else(|| {
                panic!(
                    "{what}: after {k} of {} writes the firmware boots nothing",
                    log.len()
                )
            });
            let listed = efibootmgr(&judge, &[]);
            assert!(
                listed
                    .lines()
                    .any(|l| l.starts_with(&format!("Boot{seen}* {}", label(&seen)))),
                "{what}: after {k} writes Boot{seen} is not a whole slot entry:\n{listed}"
            );
            if outcomes.last() != Some(&seen) {
                outcomes.push(seen);
            }
            judged += 1;
        }
        // The set of outcomes over all cut states is exactly {old, new}, in that order.
        let want: Vec<String> = if old == new {
            vec![old.to_string()]
        } else {
            vec![old.to_string(), new.to_string()]
        };
        assert_eq!(
            outcomes,
            want,
            "{what}: cut states over {} writes",
            log.len()
        );
        if boot_after {
            boot(&d);
        }
    }
    assert!(judged >= 10, "{judged}");
}
