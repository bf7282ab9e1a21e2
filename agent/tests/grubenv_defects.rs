//! Issue 9, defect 7: the grubenv replace is durable for a loader that reads the filesystem
//! without replaying its journal; stage and disable refuse what would strand the host under
//! the loader's own choice rule (counting `X_TRY`); the docs promise only locations the
//! config can name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use update_agent::boot::grubenv::{create_file, EnvLocation, GrubEnv, GrubEnvBoot};
use update_agent::boot::{BootControl, SlotId};
use update_agent_sandbox::sim_grub;
use update_agent_sandbox::testimg::require_tool;

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// An ext4 image loop-mounted on a temp dir; unmounted on drop.
struct Ext4Mount {
    image: PathBuf,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ext4Mount {
    /// `None` (with the reason printed) where loop mounts are impossible outside CI.
    fn new() -> Option<Self> {
        for (tool, pkg) in [("mkfs.ext4", "e2fsprogs"), ("debugfs", "e2fsprogs")] {
            if !require_tool(tool, pkg).unwrap() {
                return None;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("boot.img");
        let mnt = dir.path().join("boot");
        std::fs::create_dir(&mnt).unwrap();
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(16 << 20).unwrap();
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt)
            .output()
            .unwrap();
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(
                !ci(),
                "CI runs as root and must loop-mount an ext4 image: {why}"
            );
            eprintln!("skipping: cannot loop-mount an ext4 image (needs root): {why}");
            return None;
        }
        Some(Ext4Mount {
            image,
            mnt,
            _dir: dir,
        })
    }

    /// The file as the disk holds it, read by `debugfs` without the journal (GRUB's view).
    fn read_raw(&self, name: &str) -> Vec<u8> {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat /{name}")])
            .arg(&self.image)
            .output()
            .unwrap();
        assert!(out.status.success(), "debugfs: {out:?}");
        out.stdout
    }
}

impl Drop for Ext4Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
}

#[test]
fn a_staged_grubenv_is_in_place_for_a_reader_that_skips_the_journal() {
    let Some(m) = Ext4Mount::new() else { return };
    let path = m.mnt.join("grubenv");
    create_file(&path, SlotId::A).unwrap();
    run("sync", &["-f", m.mnt.to_str().unwrap()]);
    let before = GrubEnv::parse(&m.read_raw("grubenv"), "raw").unwrap();
    assert_eq!(before.get("ORDER"), Some("A B"));

    let mut boot = GrubEnvBoot::file(&path, 1).unwrap();
    boot.stage(SlotId::B).unwrap();
    // Straight after the call, with no sync of our own: the disk, read as GRUB reads it,
    // holds the staged block (fsync + rename + dir fsync alone leave the old directory
    // entry in place until the journal is checkpointed).
    let raw = GrubEnv::parse(&m.read_raw("grubenv"), "raw").unwrap();
    assert_eq!(raw.get("ORDER"), Some("B A"), "{raw:?}");
    assert_eq!(raw.get("UPDATE_AGENT_TRIAL"), Some("B"));

    // On a separate journaling filesystem the replace freezes and thaws it, and the
    // filesystem is writable afterwards.
    let froze =
        update_agent::state::atomic::write_for_loader(&m.mnt.join("probe"), b"after", 0o644)
            .unwrap();
    assert!(froze, "ext4 on its own mount is frozen and thawed");
    std::fs::write(m.mnt.join("still-writable"), b"x").unwrap();
    assert_eq!(m.read_raw("probe"), b"after");
}

#[test]
fn replacing_a_file_on_the_root_filesystem_syncs_without_freezing() {
    // The temp dir lives on whatever holds the test's TMPDIR; on the root filesystem, or on
    // one that does not journal, nothing is frozen. Either way the bytes are replaced.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let same_as_root = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.path()).unwrap().dev() == std::fs::metadata("/").unwrap().dev()
    };
    let froze = update_agent::state::atomic::write_for_loader(&p, b"new", 0o600).unwrap();
    if same_as_root {
        assert!(!froze, "the root filesystem is never frozen");
    }
    assert_eq!(std::fs::read(&p).unwrap(), b"new");
}

fn env_file(dir: &Path, vars: &[(&str, &str)]) -> PathBuf {
    let path = dir.join("grubenv");
    let mut env = GrubEnv::new();
    for (k, v) in vars {
        env.set(k, v).unwrap();
    }
    EnvLocation::File(path.clone()).write(&env).unwrap();
    path
}

#[test]
fn stage_refuses_when_the_fallback_has_spent_its_tries() {
    // A booted and counted its attempt (A_TRY=1), but nobody marked it good yet. Staging B
    // puts B first; if B's trial fails GRUB skips A (A_TRY=1 is not < 1) and boots rescue.
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("ORDER", "A B"),
        ("A_OK", "1"),
        ("A_TRY", "1"),
        ("B_OK", "0"),
        ("B_TRY", "0"),
    ];
    let path = env_file(dir.path(), &vars);
    let before = std::fs::read(&path).unwrap();

    // What the loader would do, had the stage gone through.
    let mut staged = GrubEnv::parse(&before, "m").unwrap();
    staged.set("ORDER", "B A").unwrap();
    staged.set("B_OK", "1").unwrap();
    assert_eq!(
        sim_grub::choose(&mut staged, 1, "m").unwrap().booted,
        Some(SlotId::B)
    );
    assert_eq!(sim_grub::choose(&mut staged, 1, "m").unwrap().booted, None);

    let mut boot = GrubEnvBoot::file(&path, 1).unwrap();
    let err = boot.stage(SlotId::B).unwrap_err();
    assert_eq!(err.kind(), "boot_refused", "{err}");
    assert!(err.to_string().contains("strand"), "{err}");
    assert!(err.to_string().contains("rescue"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");

    // Disabling B when B is the only slot GRUB would reach (A_TRY spent): refused.
    let dir_b = tempfile::tempdir().unwrap();
    let path_b = env_file(
        dir_b.path(),
        &[
            ("ORDER", "A B"),
            ("A_OK", "1"),
            ("A_TRY", "1"),
            ("B_OK", "1"),
            ("B_TRY", "0"),
        ],
    );
    let before_b = std::fs::read(&path_b).unwrap();
    let mut boot_b = GrubEnvBoot::file(&path_b, 1).unwrap();
    let err = boot_b.disable(SlotId::B).unwrap_err();
    assert_eq!(err.kind(), "boot_refused", "{err}");
    assert!(err.to_string().contains("strand"), "{err}");
    assert_eq!(std::fs::read(&path_b).unwrap(), before_b, "nothing written");

    // Once A is marked good (health check), both go through.
    boot.commit(SlotId::A).unwrap();
    boot.disable(SlotId::B).unwrap();
    boot.stage(SlotId::B).unwrap();
}

#[test]
fn stage_counts_tries_against_the_configured_limit() {
    // With 3 tries, A has one attempt left (A_TRY=2): B's failed trial (3 boots) still
    // falls back to A, so the stage is fine; with A_TRY=3 it is not.
    let dir = tempfile::tempdir().unwrap();
    for (a_try, ok) in [("2", true), ("3", false)] {
        let path = env_file(
            dir.path(),
            &[
                ("ORDER", "A B"),
                ("A_OK", "1"),
                ("A_TRY", a_try),
                ("B_OK", "0"),
                ("B_TRY", "0"),
            ],
        );
        let mut boot = GrubEnvBoot::file(&path, 3).unwrap();
        let r = boot.stage(SlotId::B);
        assert_eq!(r.is_ok(), ok, "A_TRY={a_try}: {r:?}");
        if ok {
            // The simulated loader agrees: three B boots, then A.
            let mut loc = EnvLocation::File(path.clone());
            let boots: Vec<_> = (0..4)
                .map(|_| sim_grub::boot(&mut loc, 3).unwrap().booted)
                .collect();
            assert_eq!(
                boots,
                [
                    Some(SlotId::B),
                    Some(SlotId::B),
                    Some(SlotId::B),
                    Some(SlotId::A)
                ]
            );
        }
    }
}

#[test]
fn boot_docs_name_only_grubenv_locations_the_config_can_set() {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/boot.md")).unwrap();
    let section = docs
        .split("\nWhere it lives")
        .nth(1)
        .and_then(|s| s.split("\n### ").next())
        .expect("docs/boot.md has a 'Where it lives' part in the grubenv section");
    let cfg = update_agent::config::BootConfig::default();
    // The only location key is `grubenv_path`: a raw disk offset is not configurable, so
    // the docs must not offer it as a place to keep the block.
    assert!(section.contains("grubenv_path"), "{section}");
    assert_eq!(cfg.grubenv_path, PathBuf::from("/boot/grub/grubenv"));
    let lower = section.to_lowercase();
    assert!(
        !lower.contains("disk offset") || lower.contains("not configurable"),
        "docs/boot.md offers a raw-disk-offset location that [boot] cannot configure:\n{section}"
    );
}
