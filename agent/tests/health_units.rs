//! Issue 5: the systemd units in docs/systemd pass `systemd-analyze verify` (with ExecStart
//! pointed at the binary under test) and keep the orderings and hardening the design needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

/// `Ok(true)` if `tool` runs; under `CI=true` a missing tool fails the test.
fn have(tool: &str, package: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required under CI: apt-get install -y {package}"
        );
        eprintln!("skipping: {tool} not found (apt-get install -y {package})");
    }
    found
}

fn unit_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/systemd")
        .join(name)
}

fn directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn has(d: &[(String, String)], key: &str, value_part: &str) -> bool {
    d.iter()
        .any(|(k, v)| k == key && v.split_whitespace().any(|w| w == value_part))
}

#[test]
fn health_unit_runs_before_boot_complete_and_is_required_by_it() {
    let text = std::fs::read_to_string(unit_path("update-agent-health.service")).unwrap();
    let d = directives(&text);
    assert!(has(&d, "Before", "boot-complete.target"));
    assert!(has(&d, "RequiredBy", "boot-complete.target"));
    assert!(has(&d, "Type", "oneshot"));
    assert!(has(&d, "ExecStart", "health-check"));
    assert!(has(&d, "ProtectSystem", "strict"));
    assert!(has(&d, "PrivateTmp", "yes"));
    assert!(has(&d, "NoNewPrivileges", "yes"));
    assert!(has(&d, "StateDirectory", "update-agent"));
    // The agent writes the raw disk: devices must stay reachable.
    assert!(!d.iter().any(|(k, _)| k == "PrivateDevices"));
    assert!(has(&d, "DeviceAllow", "block-sd"));
    // Checks probe local services over the network.
    assert!(!d.iter().any(|(k, _)| k == "PrivateNetwork"));
}

#[test]
fn daemon_unit_starts_after_the_boot_was_judged() {
    let text = std::fs::read_to_string(unit_path("update-agent.service")).unwrap();
    let d = directives(&text);
    assert!(has(&d, "After", "boot-complete.target"));
    assert!(has(&d, "After", "update-agent-health.service"));
    assert!(has(&d, "ProtectSystem", "strict"));
    assert!(!d.iter().any(|(k, _)| k == "PrivateDevices"));
}

#[test]
fn the_health_units_command_exists_in_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .args(["health-check", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--boot-id-path"));
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for name in ["update-agent.service", "update-agent-health.service"] {
        let text = std::fs::read_to_string(unit_path(name)).unwrap();
        // verify insists that ExecStart exists; point it at the binary under test.
        let text = text.replace("/usr/bin/update-agent", env!("CARGO_BIN_EXE_update-agent"));
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("update-agent"))
        .collect();
    assert!(
        ours.is_empty(),
        "warnings about our units:\n{}",
        ours.join("\n")
    );
}
