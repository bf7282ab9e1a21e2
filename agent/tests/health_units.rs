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
    // The commit waits for boot-complete.target (update-agent-commit.service).
    assert!(has(&d, "ExecStart", "--no-commit"));
    // Never ordered after multi-user.target: the daemon's chain would close a cycle.
    assert!(!has(&d, "After", "multi-user.target"));
    assert!(has(&d, "DefaultDependencies", "no"));
    assert!(d
        .iter()
        .any(|(k, v)| k == "CapabilityBoundingSet" && v.is_empty()));
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
    // A failed check (target not reached) keeps it from starting at all.
    assert!(has(&d, "Requires", "boot-complete.target"));
    assert!(has(&d, "Requires", "update-agent-commit.service"));
    assert!(has(&d, "After", "update-agent-commit.service"));
    // multi-user.target must not be ordered after it (issue 11's cycle).
    assert!(has(&d, "DefaultDependencies", "no"));
    assert!(has(&d, "ProtectSystem", "strict"));
    assert!(!d.iter().any(|(k, _)| k == "PrivateDevices"));
}

#[test]
fn commit_unit_runs_after_boot_complete_and_requires_it() {
    let text = std::fs::read_to_string(unit_path("update-agent-commit.service")).unwrap();
    let d = directives(&text);
    assert!(has(&d, "After", "boot-complete.target"));
    assert!(has(&d, "Requires", "boot-complete.target"));
    assert!(!has(&d, "Before", "boot-complete.target"));
    assert!(has(&d, "ExecStart", "commit"));
    assert!(has(&d, "WantedBy", "multi-user.target"));
    assert!(has(&d, "DefaultDependencies", "no"));
    assert!(!d.iter().any(|(k, _)| k == "PrivateDevices"));
    assert!(has(&d, "DeviceAllow", "block-virtblk"));
}

/// The D-Bus API runs the CLI's operations, so it is hardened like the daemon, and it is
/// started by the bus (its alias is what the activation file names), not at every boot.
#[test]
fn dbus_unit_is_bus_activated_and_hardened_like_the_daemon() {
    let text = std::fs::read_to_string(unit_path("update-agent-dbus.service")).unwrap();
    let d = directives(&text);
    let daemon = directives(&std::fs::read_to_string(unit_path("update-agent.service")).unwrap());
    assert!(has(&d, "Type", "dbus"));
    assert!(has(&d, "BusName", "org.updateagent.Agent1"));
    assert!(has(&d, "ExecStart", "dbus"));
    assert!(has(&d, "Alias", "dbus-org.updateagent.Agent1.service"));
    assert!(!d.iter().any(|(k, _)| k == "WantedBy"));
    let activation = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/dbus/org.updateagent.Agent1.service"),
    )
    .unwrap();
    assert!(activation.contains("\nSystemdService=dbus-org.updateagent.Agent1.service\n"));
    assert!(activation.contains("\nName=org.updateagent.Agent1\n"));
    // Every hardening directive of the daemon, with the same value.
    for key in [
        "ProtectSystem",
        "StateDirectory",
        "StateDirectoryMode",
        "ReadWritePaths",
        "ProtectHome",
        "PrivateTmp",
        "NoNewPrivileges",
        "CapabilityBoundingSet",
        "DevicePolicy",
        "DeviceAllow",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "RestrictNamespaces",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictAddressFamilies",
        "SystemCallArchitectures",
        "SystemCallFilter",
        "UMask",
    ] {
        let values = |d: &[(String, String)]| -> Vec<String> {
            d.iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .collect()
        };
        assert!(!values(&daemon).is_empty(), "the daemon has no {key}");
        assert_eq!(values(&d), values(&daemon), "{key}");
    }
}

/// `systemd-analyze security` rates every unit OK (exposure at most 3.0 of 10; docs/dbus.md
/// and docs/lab.md record the scores).
#[test]
fn units_keep_their_systemd_analyze_security_exposure() {
    if !have("systemd-analyze", "systemd") {
        return;
    }
    for (name, threshold) in [
        ("update-agent.service", 30),
        ("update-agent-dbus.service", 30),
        ("update-agent-commit.service", 30),
        ("update-agent-health.service", 50),
    ] {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--threshold={threshold}"))
            .arg(unit_path(name))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name} above {threshold}:\n{}",
            text.lines().last().unwrap_or_default()
        );
        assert!(text.contains("Overall exposure level"), "{text}");
    }
}

#[test]
fn the_health_units_command_exists_in_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .args(["health-check", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(help.contains("--boot-id-path"));
    assert!(help.contains("--no-commit"));
    let out = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .args(["commit", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for name in [
        "update-agent.service",
        "update-agent-health.service",
        "update-agent-commit.service",
        "update-agent-dbus.service",
    ] {
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
