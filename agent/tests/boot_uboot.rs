#![allow(clippy::unwrap_used, clippy::expect_used)]
//! U-Boot environment: our reader and writer agree with libubootenv's `fw_printenv` and
//! `fw_setenv` on single and redundant environments, and bad input is refused.

use std::path::Path;
use std::process::Command;
use update_agent::boot::ubootenv::{EnvStore, UbootEnv};

const SIZE: usize = 0x4000;

fn fw_tools() -> bool {
    if Command::new("fw_printenv").arg("-h").output().is_ok() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("fw_printenv is missing under CI: apt-get install -y libubootenv-tool");
    }
    eprintln!("skipping: fw_printenv not found (apt-get install -y libubootenv-tool)");
    false
}

/// An image file with room for two copies and a fw_env.config naming one or both.
fn setup(dir: &Path, redundant: bool) -> std::path::PathBuf {
    let img = dir.join("env.img");
    std::fs::write(&img, vec![0u8; 2 * SIZE]).unwrap();
    let mut cfg = format!("{} 0x0 {SIZE:#x}\n", img.display());
    if redundant {
        cfg.push_str(&format!("{} {SIZE:#x} {SIZE:#x}\n", img.display()));
    }
    let path = dir.join("fw_env.config");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn fw_printenv(cfg: &Path) -> String {
    let out = Command::new("fw_printenv")
        .arg("-c")
        .arg(cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fw_printenv failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fw_setenv(cfg: &Path, name: &str, value: &str) {
    let out = Command::new("fw_setenv")
        .arg("-c")
        .arg(cfg)
        .arg(name)
        .arg(value)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fw_setenv failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rauc_env() -> UbootEnv {
    let mut env = UbootEnv::new();
    env.set("BOOT_ORDER", "A B").unwrap();
    env.set("BOOT_A_LEFT", "3").unwrap();
    env.set("BOOT_B_LEFT", "0").unwrap();
    env
}

fn crosscheck(redundant: bool) {
    if !fw_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), redundant);
    let mut store = EnvStore::from_fw_env_config(&cfg).unwrap();
    assert_eq!(store.redundant(), redundant);
    store.provision(&rauc_env()).unwrap();

    // We write, fw_printenv reads (twice, so the redundant write alternates copies).
    for (round, left) in ["2", "1"].iter().enumerate() {
        let cur = store.read().unwrap();
        let mut env = cur.env.clone();
        env.set("BOOT_A_LEFT", left).unwrap();
        store.write(&env, &cur).unwrap();
        let after = store.read().unwrap();
        if redundant {
            assert_ne!(
                after.copy, cur.copy,
                "round {round}: write went to the other copy"
            );
        }
        let text = fw_printenv(&cfg);
        assert!(text.contains("BOOT_ORDER=A B\n"), "{text}");
        assert!(text.contains(&format!("BOOT_A_LEFT={left}\n")), "{text}");
        assert!(text.contains("BOOT_B_LEFT=0\n"), "{text}");
    }

    // fw_setenv writes, we read (twice, both copies end up written by it).
    fw_setenv(&cfg, "BOOT_B_LEFT", "3");
    let read = EnvStore::from_fw_env_config(&cfg).unwrap().read().unwrap();
    assert_eq!(read.env.get("BOOT_B_LEFT"), Some("3"));
    assert_eq!(read.env.get("BOOT_A_LEFT"), Some("1"));
    fw_setenv(&cfg, "BOOT_ORDER", "B A");
    let read = EnvStore::from_fw_env_config(&cfg).unwrap().read().unwrap();
    assert_eq!(read.env.get("BOOT_ORDER"), Some("B A"));
    assert_eq!(read.env.get("BOOT_B_LEFT"), Some("3"));

    // And we write over what fw_setenv left.
    let mut store = EnvStore::from_fw_env_config(&cfg).unwrap();
    let cur = store.read().unwrap();
    let mut env = cur.env.clone();
    env.set("BOOT_A_LEFT", "0").unwrap();
    store.write(&env, &cur).unwrap();
    let text = fw_printenv(&cfg);
    assert!(text.contains("BOOT_A_LEFT=0\n"), "{text}");
    assert!(text.contains("BOOT_ORDER=B A\n"), "{text}");
}

#[test]
fn single_copy_agrees_with_libubootenv() {
    crosscheck(false);
}

#[test]
fn redundant_pair_agrees_with_libubootenv() {
    crosscheck(true);
}

#[test]
fn redundant_read_falls_back_to_the_valid_copy_and_rejects_two_bad_crcs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), true);
    let img = dir.path().join("env.img");
    let mut store = EnvStore::from_fw_env_config(&cfg).unwrap();
    store.provision(&rauc_env()).unwrap();
    let cur = store.read().unwrap();
    assert_eq!(cur.copy, 0);
    let mut env = cur.env.clone();
    env.set("BOOT_A_LEFT", "2").unwrap();
    store.write(&env, &cur).unwrap();
    assert_eq!(store.read().unwrap().copy, 1);

    // Corrupt the newer copy (1): the older copy 0 is read, its defect reported.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[SIZE + 10] ^= 0xff;
    std::fs::write(&img, &bytes).unwrap();
    let r = EnvStore::from_fw_env_config(&cfg).unwrap().read().unwrap();
    assert_eq!(r.copy, 0);
    assert_eq!(r.env.get("BOOT_A_LEFT"), Some("3"));
    assert!(r.other_defect.unwrap().contains("CRC"));

    // Both bad: a clear error, and fw_printenv agrees there is no valid copy.
    bytes[10] ^= 0xff;
    std::fs::write(&img, &bytes).unwrap();
    let e = EnvStore::from_fw_env_config(&cfg)
        .unwrap()
        .read()
        .unwrap_err();
    assert_eq!(e.kind(), "ubootenv_bad_crc", "{e}");
    assert!(e.to_string().contains("copy 0") && e.to_string().contains("copy 1"));
}

#[test]
fn oversized_env_is_refused_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), false);
    let img = dir.path().join("env.img");
    let mut store = EnvStore::from_fw_env_config(&cfg).unwrap();
    store.provision(&rauc_env()).unwrap();
    let before = std::fs::read(&img).unwrap();
    let cur = store.read().unwrap();
    let mut env = cur.env.clone();
    env.set("big", &"x".repeat(SIZE)).unwrap();
    let e = store.write(&env, &cur).unwrap_err();
    assert_eq!(e.kind(), "ubootenv_too_large");
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn malformed_data_with_valid_crc_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), false);
    let img = dir.path().join("env.img");
    let mut data = b"BOOT_ORDER=A B\0garbage-without-equals\0\0".to_vec();
    data.resize(SIZE - 4, 0);
    let mut bytes = crc32fast::hash(&data).to_le_bytes().to_vec();
    bytes.extend_from_slice(&data);
    std::fs::write(&img, &bytes).unwrap();
    let e = EnvStore::from_fw_env_config(&cfg)
        .unwrap()
        .read()
        .unwrap_err();
    assert_eq!(e.kind(), "ubootenv_malformed", "{e}");
}
