//! The grubenv backend against the real `grub-editenv` and RAUC's grub.cfg logic (simulated).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use update_agent::boot::grubenv::{
    create_file, EnvLocation, GrubEnv, GrubEnvBoot, GrubEnvError, ENV_BLOCK_SIZE, TRIAL_VAR,
};
use update_agent::boot::{BootControl, SlotId, SlotStatus};
use update_agent::disk::BlockDevice;
use update_agent_sandbox::sim_grub;

/// `grub-editenv` is usable; under `CI=true` its absence fails the test.
fn have_grub_editenv() -> bool {
    let ok = Command::new("grub-editenv")
        .arg("--version")
        .output()
        .is_ok();
    if !ok {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "grub-editenv is required under CI: apt-get install grub-common"
        );
        eprintln!("skipping: grub-editenv not found (apt-get install grub-common)");
    }
    ok
}

fn editenv(file: &Path, args: &[&str]) -> String {
    let out = Command::new("grub-editenv")
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grub-editenv {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn list(file: &Path) -> Vec<String> {
    editenv(file, &["list"])
        .lines()
        .map(str::to_string)
        .collect()
}

fn fresh(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("grubenv");
    create_file(&path, SlotId::A).unwrap();
    path
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn our_block_is_read_by_grub_editenv_with_unknown_vars_in_order() {
    if !have_grub_editenv() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let mut env = GrubEnv::new();
    env.set("saved_entry", "1").unwrap();
    env.set("ORDER", "A B").unwrap();
    env.set("path", "C:\\boot\\x").unwrap();
    EnvLocation::File(path.clone()).write(&env).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024);
    assert_eq!(
        list(&path),
        strs(&["saved_entry=1", "ORDER=A B", "path=C:\\boot\\x"])
    );
    // And grub-editenv can edit it further: the block stays valid for both.
    editenv(&path, &["set", "extra=yes"]);
    let back = EnvLocation::File(path.clone()).read().unwrap();
    assert_eq!(back.get("path"), Some("C:\\boot\\x"));
    assert_eq!(back.get("extra"), Some("yes"));
}

#[test]
fn we_read_what_grub_editenv_writes_including_escapes() {
    if !have_grub_editenv() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    editenv(&path, &["create"]);
    editenv(
        &path,
        &[
            "set",
            "ORDER=B A",
            "A_OK=1",
            "B_OK=1",
            "A_TRY=0",
            "B_TRY=0",
            "odd=back\\slash",
            "multi=line1\nline2",
        ],
    );
    let env = EnvLocation::File(path.clone()).read().unwrap();
    assert_eq!(env.get("ORDER"), Some("B A"));
    assert_eq!(env.get("odd"), Some("back\\slash"));
    assert_eq!(env.get("multi"), Some("line1\nline2"));
    // Our re-serialization of grub-editenv's block is byte-identical.
    let raw = std::fs::read(&path).unwrap();
    assert_eq!(env.to_block("t").unwrap(), raw);
    let mut boot = GrubEnvBoot::file(&path, 1).unwrap();
    assert_eq!(boot.status().unwrap().next, Some(SlotId::B));
}

#[test]
fn each_operation_leaves_the_expected_variables() {
    if !have_grub_editenv() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(&dir);
    editenv(&path, &["set", "saved_entry=0"]);
    let mut boot = GrubEnvBoot::file(&path, 1).unwrap();
    let base = |order: &str, a: (u8, u8), b: (u8, u8), trial: Option<&str>| {
        let mut v = vec![
            format!("ORDER={order}"),
            format!("A_OK={}", a.0),
            format!("A_TRY={}", a.1),
            format!("B_OK={}", b.0),
            format!("B_TRY={}", b.1),
            "saved_entry=0".to_string(),
        ];
        if let Some(t) = trial {
            v.push(format!("{TRIAL_VAR}={t}"));
        }
        v
    };

    boot.disable(SlotId::B).unwrap();
    assert_eq!(list(&path), base("A B", (1, 0), (0, 0), None));
    boot.stage(SlotId::B).unwrap();
    assert_eq!(list(&path), base("B A", (1, 0), (1, 0), Some("B")));
    boot.cancel(SlotId::B).unwrap();
    assert_eq!(list(&path), base("A B", (1, 0), (0, 0), None));
    boot.stage(SlotId::B).unwrap();
    boot.commit(SlotId::B).unwrap();
    assert_eq!(list(&path), base("B A", (1, 0), (1, 0), None));
    boot.rollback(SlotId::A).unwrap();
    assert_eq!(list(&path), base("A B", (1, 0), (0, 0), None));
}

#[test]
fn status_maps_rauc_variables() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(&dir);
    let mut boot = GrubEnvBoot::file(&path, 1).unwrap();
    let st = |slot, priority, tries, successful| SlotStatus {
        slot,
        priority,
        tries,
        successful,
    };
    let s = boot.status().unwrap();
    assert_eq!(s.backend, "grubenv");
    assert_eq!(
        s.slots,
        vec![st(SlotId::A, 2, 1, true), st(SlotId::B, 1, 1, true)]
    );
    assert_eq!(s.next, Some(SlotId::A));
    boot.stage(SlotId::B).unwrap();
    let s = boot.status().unwrap();
    assert_eq!(
        s.slots,
        vec![st(SlotId::A, 1, 1, true), st(SlotId::B, 2, 1, false)]
    );
    assert_eq!(s.next, Some(SlotId::B));
    assert!(s.reason.contains("B_TRY=0"), "{}", s.reason);
    boot.disable(SlotId::B).unwrap();
    let s = boot.status().unwrap();
    assert_eq!(s.slots[1], st(SlotId::B, 0, 0, false));
    assert_eq!(s.next, Some(SlotId::A));
}

#[test]
fn wrong_size_or_missing_header_is_a_clear_error_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");

    let mut short = b"# GRUB Environment Block\nA_OK=1\n".to_vec();
    short.resize(1000, b'#');
    std::fs::write(&path, &short).unwrap();
    let mut boot = GrubEnvBoot::file(&path, 1).unwrap();
    let e = boot.stage(SlotId::B).unwrap_err();
    assert!(e.to_string().contains("1000 bytes"), "{e}");
    // Each bad block has its own stable kind through the BootControl trait (status, the
    // state record and the metrics all carry it), not the catch-all `boot_inconsistent`.
    assert_eq!(e.kind(), "grubenv_wrong_size");
    assert!(e.to_string().contains("grubenv"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), short);

    let mut headless = b"# GRUB Env Block\nA_OK=1\n".to_vec();
    headless.resize(ENV_BLOCK_SIZE, b'#');
    std::fs::write(&path, &headless).unwrap();
    let e = boot.commit(SlotId::A).unwrap_err();
    assert!(e.to_string().contains("header"), "{e}");
    assert_eq!(e.kind(), "grubenv_missing_header");
    assert_eq!(std::fs::read(&path).unwrap(), headless);

    let mut garbage = b"# GRUB Environment Block\nA_OK=1\nnoequals\n".to_vec();
    garbage.resize(ENV_BLOCK_SIZE, b'#');
    std::fs::write(&path, &garbage).unwrap();
    let e = boot.status().unwrap_err();
    assert!(e.to_string().contains("no '='"), "{e}");
    assert_eq!(e.kind(), "grubenv_malformed");

    let mut bad = b"# GRUB Environment Block\nA_OK=yes\n".to_vec();
    bad.resize(ENV_BLOCK_SIZE, b'#');
    std::fs::write(&path, &bad).unwrap();
    let e = boot.disable(SlotId::B).unwrap_err();
    assert!(e.to_string().contains("A_OK"), "{e}");
    assert_eq!(e.kind(), "grubenv_bad_value");
    assert_eq!(std::fs::read(&path).unwrap(), bad);
    // No temp files left behind by any of the refused writes.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn overflowing_the_block_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(&dir);
    let before = std::fs::read(&path).unwrap();
    let mut env = EnvLocation::File(path.clone()).read().unwrap();
    env.set("big", &"x".repeat(1000)).unwrap();
    let e = EnvLocation::File(path.clone()).write(&env).unwrap_err();
    assert!(matches!(e, GrubEnvError::TooLarge { .. }), "{e}");
    assert_eq!(e.kind(), "grubenv_too_large");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn refuses_to_leave_no_bootable_slot() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(&dir);
    let mut boot = GrubEnvBoot::file(&path, 1).unwrap();
    boot.disable(SlotId::B).unwrap();
    let before = std::fs::read(&path).unwrap();
    let e = boot.disable(SlotId::A).unwrap_err();
    assert_eq!(e.kind(), "boot_refused");
    assert!(e.to_string().contains("slot B is not marked OK"), "{e}");
    let e = boot.rollback(SlotId::B).unwrap_err();
    assert_eq!(e.kind(), "boot_refused");
    // A staged, never committed slot is no rollback target either.
    boot.stage(SlotId::B).unwrap();
    let staged = std::fs::read(&path).unwrap();
    assert!(boot.rollback(SlotId::B).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), staged);
    assert_ne!(staged, before);
}

#[test]
fn trial_boot_then_commit_keeps_the_new_slot() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(&dir);
    let mut boot = GrubEnvBoot::file(&path, 1).unwrap();
    let mut loc = EnvLocation::File(path.clone());
    // The running system (A) was marked good this boot.
    assert_eq!(sim_grub::boot(&mut loc, 1).unwrap().booted, Some(SlotId::A));
    boot.commit(SlotId::A).unwrap();

    boot.disable(SlotId::B).unwrap();
    boot.stage(SlotId::B).unwrap();
    assert_eq!(sim_grub::boot(&mut loc, 1).unwrap().booted, Some(SlotId::B));
    let s = boot.status().unwrap();
    assert!(!s.slots[1].successful, "in trial: {s:?}");
    boot.commit(SlotId::B).unwrap();
    assert!(boot.status().unwrap().slots[1].successful);
    // Every later healthy boot is marked good again, as rauc-mark-good does.
    for _ in 0..3 {
        assert_eq!(sim_grub::boot(&mut loc, 1).unwrap().booted, Some(SlotId::B));
        boot.commit(SlotId::B).unwrap();
    }
}

#[test]
fn trial_boot_without_commit_falls_back_to_the_old_slot() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(&dir);
    let mut boot = GrubEnvBoot::file(&path, 1).unwrap();
    let mut loc = EnvLocation::File(path.clone());
    boot.stage(SlotId::B).unwrap();
    assert_eq!(sim_grub::boot(&mut loc, 1).unwrap().booted, Some(SlotId::B));
    // Hung or crashed before health checks passed: no commit.
    assert_eq!(sim_grub::boot(&mut loc, 1).unwrap().booted, Some(SlotId::A));
    let s = boot.status().unwrap();
    assert_eq!(s.slots[1].tries, 0);
    // The agent on A sees the failed trial and rolls back: B is unbootable from now on.
    boot.rollback(SlotId::A).unwrap();
    for _ in 0..3 {
        assert_eq!(sim_grub::boot(&mut loc, 1).unwrap().booted, Some(SlotId::A));
        boot.commit(SlotId::A).unwrap();
    }
    let s = boot.status().unwrap();
    assert_eq!(s.slots[1].priority, 0);
}

#[test]
fn more_tries_allow_more_attempts_before_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(&dir);
    let mut boot = GrubEnvBoot::file(&path, 3).unwrap();
    let mut loc = EnvLocation::File(path.clone());
    boot.stage(SlotId::B).unwrap();
    for left in (0..3u8).rev() {
        assert_eq!(sim_grub::boot(&mut loc, 3).unwrap().booted, Some(SlotId::B));
        assert_eq!(boot.status().unwrap().slots[1].tries, left);
    }
    assert_eq!(sim_grub::boot(&mut loc, 3).unwrap().booted, Some(SlotId::A));
    assert!(GrubEnvBoot::file(&path, 0).is_err());
}

/// An in-memory disk that records which byte ranges were written.
#[derive(Clone, Default)]
struct MemDisk {
    bytes: Arc<Mutex<Vec<u8>>>,
    writes: Arc<Mutex<Vec<(u64, usize)>>>,
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let b = self.bytes.lock().unwrap();
        let o = offset as usize;
        let src = b
            .get(o..o + buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "short read"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let o = offset as usize;
        self.bytes.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        self.writes.lock().unwrap().push((offset, buf.len()));
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn block_on_a_device_writes_only_changed_sectors() {
    let disk = MemDisk::default();
    let offset = 4096u64;
    disk.bytes.lock().unwrap().resize(16384, 0xEE);
    let mut env = GrubEnv::new();
    env.set("ORDER", "A B").unwrap();
    for v in ["A_OK=1", "A_TRY=0", "B_OK=1", "B_TRY=0"] {
        let (k, val) = v.split_once('=').unwrap();
        env.set(k, val).unwrap();
    }
    let mut loc = EnvLocation::Device {
        dev: Box::new(disk.clone()),
        offset,
    };
    loc.write(&env).unwrap();
    assert_eq!(*disk.writes.lock().unwrap(), vec![(4096, 512), (4608, 512)]);
    // Bytes outside the block are untouched.
    assert!(disk.bytes.lock().unwrap()[..4096]
        .iter()
        .all(|&b| b == 0xEE));
    assert!(disk.bytes.lock().unwrap()[5120..]
        .iter()
        .all(|&b| b == 0xEE));

    disk.writes.lock().unwrap().clear();
    let mut boot = GrubEnvBoot::new(loc, 1).unwrap();
    boot.stage(SlotId::B).unwrap();
    // Small variable edits stay within the first sector: one atomic sector write.
    assert_eq!(*disk.writes.lock().unwrap(), vec![(4096, 512)]);
    assert_eq!(boot.status().unwrap().next, Some(SlotId::B));
    assert_eq!(
        sim_grub::boot(boot.location_mut(), 1).unwrap().booted,
        Some(SlotId::B)
    );
}

mod properties {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use proptest::prelude::*;
    use update_agent::boot::grubenv::{GrubEnv, ENV_BLOCK_SIZE, ENV_HEADER};

    proptest! {
        /// Whatever variables fit, serialization and parsing are inverse, escapes included.
        #[test]
        fn serialize_then_parse_is_identity(
            vars in proptest::collection::vec(("[A-Za-z_][A-Za-z0-9_]{0,12}", "[^\0]{0,40}"), 0..12)
        ) {
            let mut env = GrubEnv::new();
            for (k, v) in &vars {
                env.set(k, v).unwrap();
            }
            if let Ok(block) = env.to_block("prop") {
                prop_assert_eq!(block.len(), ENV_BLOCK_SIZE);
                prop_assert_eq!(GrubEnv::parse(&block, "prop").unwrap(), env);
            }
        }

        /// Arbitrary bytes after the header never panic the parser.
        #[test]
        fn parser_never_panics(tail in proptest::collection::vec(any::<u8>(), ENV_BLOCK_SIZE - ENV_HEADER.len())) {
            let mut block = ENV_HEADER.as_bytes().to_vec();
            block.extend_from_slice(&tail);
            let _ = GrubEnv::parse(&block, "prop");
        }
    }
}

#[test]
fn health_failure_drill_rolls_back_and_cancel_before_reboot_keeps_the_old_slot() {
    use update_agent::boot::grubenv::booted_slot_from_cmdline;
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(&dir);
    let mut boot = GrubEnvBoot::file(&path, 1).unwrap();
    let mut loc = EnvLocation::File(path.clone());

    // Trial boot of B comes up, its health checks fail, the agent rolls back and reboots.
    boot.disable(SlotId::B).unwrap();
    boot.stage(SlotId::B).unwrap();
    let b = sim_grub::boot(&mut loc, 1).unwrap();
    assert_eq!(
        booted_slot_from_cmdline(&b.cmdline().unwrap()),
        Some(SlotId::B)
    );
    boot.rollback(SlotId::A).unwrap();
    let s = boot.status().unwrap();
    assert_eq!(s.next, Some(SlotId::A));
    assert_eq!(s.slots[1].priority, 0);
    assert_eq!(sim_grub::boot(&mut loc, 1).unwrap().booted, Some(SlotId::A));
    boot.commit(SlotId::A).unwrap();

    // Staged, then cancelled before any reboot: the old slot keeps booting.
    boot.stage(SlotId::B).unwrap();
    boot.cancel(SlotId::B).unwrap();
    for _ in 0..2 {
        assert_eq!(sim_grub::boot(&mut loc, 1).unwrap().booted, Some(SlotId::A));
        boot.commit(SlotId::A).unwrap();
    }
}

#[test]
fn a_booted_slot_never_marked_good_leads_to_rescue_then_retry() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(&dir);
    let mut boot = GrubEnvBoot::file(&path, 1).unwrap();
    let mut loc = EnvLocation::File(path.clone());
    // Both slots OK, nobody ever marks good: A, then B, then rescue (which resets the counters).
    assert_eq!(sim_grub::boot(&mut loc, 1).unwrap().booted, Some(SlotId::A));
    assert_eq!(sim_grub::boot(&mut loc, 1).unwrap().booted, Some(SlotId::B));
    assert_eq!(boot.status().unwrap().next, None);
    let rescue = sim_grub::boot(&mut loc, 1).unwrap();
    assert_eq!(rescue.booted, None);
    assert!(rescue.reset_tries);
    assert_eq!(rescue.cmdline(), None);
    assert_eq!(sim_grub::boot(&mut loc, 1).unwrap().booted, Some(SlotId::A));
}

#[test]
fn a_line_with_an_empty_name_is_malformed_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let mut block = b"# GRUB Environment Block\nA_OK=1\n=oops\n".to_vec();
    block.resize(ENV_BLOCK_SIZE, b'#');
    std::fs::write(&path, &block).unwrap();
    let e = EnvLocation::File(path.clone()).read().unwrap_err();
    assert_eq!(e.kind(), "grubenv_malformed");
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("byte 32"),
        "{msg}"
    );
}

/// The grub.cfg text we document, run by bash with `load_env`/`save_env` shimmed onto
/// `grub-editenv` (bash accepts this subset of GRUB script unchanged); returns `default`.
fn run_selection_script(script: &str, env_file: &Path) -> u8 {
    const SHIMS: &str = r#"
set() { printf -v "${1%%=*}" '%s' "${1#*=}"; }
load_env() { local l; while IFS= read -r l; do printf -v "${l%%=*}" '%s' "${l#*=}"; done < <(grub-editenv "$ENVFILE" list); }
save_env() { local a=() n; for n in "$@"; do a+=("$n=${!n}"); done; grub-editenv "$ENVFILE" set "${a[@]}"; }
"#;
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("{SHIMS}\n{script}\necho \"default=$default\""))
        .env("ENVFILE", env_file)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.trim()
        .strip_prefix("default=")
        .unwrap_or_else(|| panic!("no default in {text:?}"))
        .parse()
        .unwrap()
}

#[test]
fn documented_grub_cfg_passes_grub_script_check() {
    if !have_grub_editenv() {
        return;
    }
    for tries in 1..=9u8 {
        let script = update_agent::boot::grubenv::grub_cfg_selection(tries).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("grub.cfg");
        std::fs::write(&cfg, &script).unwrap();
        let out = Command::new("grub-script-check")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tries={tries}: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(update_agent::boot::grubenv::grub_cfg_selection(0).is_err());
    // With one try the text keeps RAUC's shape: the counter is simply set to 1.
    let one = update_agent::boot::grubenv::grub_cfg_selection(1).unwrap();
    assert!(one.contains("A_TRY=1\n") && one.contains("save_env A_TRY B_TRY"));
}

#[test]
fn simulator_agrees_with_the_documented_grub_cfg_on_every_state() {
    if !have_grub_editenv() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script_env = dir.path().join("script-env");
    let sim_env = dir.path().join("sim-env");
    let mut cases = 0;
    // Counters run past the limit too (0..=2 covers "above max" for one try).
    for tries in [1u8, 2] {
        let script = update_agent::boot::grubenv::grub_cfg_selection(tries).unwrap();
        for order in ["A B", "B A", "A", "B", "A R B"] {
            for (a_ok, b_ok) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                for a_try in 0..=2u8 {
                    for b_try in 0..=2u8 {
                        let mut env = GrubEnv::new();
                        env.set("ORDER", order).unwrap();
                        env.set("A_OK", &a_ok.to_string()).unwrap();
                        env.set("A_TRY", &a_try.to_string()).unwrap();
                        env.set("B_OK", &b_ok.to_string()).unwrap();
                        env.set("B_TRY", &b_try.to_string()).unwrap();
                        EnvLocation::File(script_env.clone()).write(&env).unwrap();
                        let mut sim_loc = EnvLocation::File(sim_env.clone());
                        sim_loc.write(&env).unwrap();

                        let default = run_selection_script(&script, &script_env);
                        let sim = sim_grub::boot(&mut sim_loc, tries).unwrap();
                        let state = format!(
                            "tries={tries} ORDER={order:?} A={a_ok}/{a_try} B={b_ok}/{b_try}"
                        );
                        let expect = match sim.booted {
                            None => 0,
                            Some(SlotId::A) => 1,
                            Some(SlotId::B) => 2,
                        };
                        assert_eq!(default, expect, "{state}");
                        let after = |p: &PathBuf| {
                            let e = EnvLocation::File(p.clone()).read().unwrap();
                            e.vars()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                        };
                        assert_eq!(after(&script_env), after(&sim_env), "{state}");
                        cases += 1;
                    }
                }
            }
        }
    }
    assert_eq!(cases, 2 * 5 * 4 * 9);
}
