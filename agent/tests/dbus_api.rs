//! The D-Bus API (docs/dbus.md) on a real private `dbus-daemon` started by the test, called
//! with `busctl`: Status, Check, Install with its signals, Cancel, the properties, a bad
//! option; a non-root caller refused by the shipped policy file and, on a bus without it, by
//! the service itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use update_agent::boot::SlotId;
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::testimg::require_tool;
use update_agent_sandbox::world::{Backend, PublishSpec, World};
use updater_proto::Compression;

const NAME: &str = "org.updateagent.Agent1";
const PATH: &str = "/org/updateagent/Agent1";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn policy_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dbus/org.updateagent.Agent1.conf")
}

/// A private bus; with `policy`, the shipped policy file is included after an allow-all
/// default (as the system bus includes system.d after its defaults).
fn start_bus(dir: &Path, policy: bool) -> (Killed, String) {
    let sock = dir.join("bus");
    let include = if policy {
        format!("<include>{}</include>", policy_file().display())
    } else {
        String::new()
    };
    let conf = dir.join("bus.conf");
    std::fs::write(
        &conf,
        format!(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN\" \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig>\
             <type>update-agent-test</type><listen>unix:path={}</listen><auth>EXTERNAL</auth>\
             <policy context=\"default\"><allow user=\"*\"/><allow own=\"*\"/>\
             <allow send_destination=\"*\" eavesdrop=\"true\"/><allow eavesdrop=\"true\"/></policy>\
             {include}</busconfig>\n",
            sock.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--print-address"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("unix:"), "dbus-daemon said {line:?}");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    (Killed(child), line.trim().to_string())
}

/// [`start_bus`] in `root/name`, both reachable by the uid-65534 caller.
fn private_bus(root: &Path, name: &str, policy: bool) -> (Killed, String) {
    let dir = root.join(name);
    std::fs::create_dir(&dir).unwrap();
    for d in [root, &dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    start_bus(&dir, policy)
}

fn start_agent(w: &World, addr: &str) -> Killed {
    let child = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&w.config_path)
        .args(["dbus", "--address", addr])
        .spawn()
        .unwrap();
    let ok = Command::new("gdbus")
        .args(["wait", "--address", addr, "--timeout", "30", NAME])
        .status()
        .unwrap();
    assert!(ok.success(), "{NAME} did not appear on the bus");
    Killed(child)
}

/// `busctl --json=short call ...`: Ok(data) or Err(stderr).
fn call(addr: &str, as_nobody: bool, args: &[&str]) -> Result<serde_json::Value, String> {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "busctl"]);
        c
    } else {
        Command::new("busctl")
    };
    let o = cmd
        .arg(format!("--address={addr}"))
        .args(["--json=short", "--timeout=120"])
        .args(args)
        .output()
        .unwrap();
    if o.status.success() {
        let text = String::from_utf8_lossy(&o.stdout);
        Ok(if text.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
        })
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

fn method(addr: &str, m: &str, sig_args: &[&str]) -> Result<serde_json::Value, String> {
    let mut a = vec!["call", NAME, PATH, NAME, m];
    a.extend_from_slice(sig_args);
    call(addr, false, &a)
}

/// The JSON document a method answered with (`s`).
fn doc(v: serde_json::Value) -> serde_json::Value {
    serde_json::from_str(v["data"][0].as_str().unwrap()).unwrap()
}

fn prop(addr: &str, p: &str) -> String {
    let v = call(addr, false, &["get-property", NAME, PATH, NAME, p]).unwrap();
    v["data"].as_str().unwrap().to_string()
}

fn tools() -> bool {
    for (tool, pkg) in [
        ("dbus-daemon", "dbus-daemon"),
        ("busctl", "systemd"),
        ("gdbus", "libglib2.0-bin"),
        ("setpriv", "util-linux"),
    ] {
        if !require_tool(tool, pkg).unwrap() {
            return false;
        }
    }
    true
}

/// A sandboxed host with `slot_mib` MiB slots, or `None` when a tool is missing (outside CI).
async fn host(slot_mib: u64) -> Option<(tempfile::TempDir, World)> {
    if !tools() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let w = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, slot_mib)
        .await
        .unwrap();
    Some((dir, w))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_on_a_private_bus_installs_and_refuses_non_root() {
    let Some((dir, mut w)) = host(2).await else {
        return;
    };
    w.publish("1.1.0", Vec::new()).unwrap();
    let (_bus, addr) = private_bus(dir.path(), "bus", true);
    let _agent = start_agent(&w, &addr);

    let st = doc(method(&addr, "Status", &[]).unwrap());
    assert_eq!(st["phase"]["phase"], "committed", "{st}");
    assert_eq!(prop(&addr, "Operation"), "idle");
    assert_eq!(prop(&addr, "BootedSlot"), "A");
    let check = doc(method(&addr, "Check", &[]).unwrap());
    assert_eq!(check["version"], "1.1.0", "{check}");

    // A bad option is refused with its kind, nothing started.
    let e = method(&addr, "Install", &["a{sv}", "1", "force", "b", "true"]).unwrap_err();
    assert!(e.contains("invalid_option"), "{e}");

    // Install: returns at once; Progress signals, then Completed(true, apply's report).
    let mut signals = Signals::start(&addr);
    method(
        &addr,
        "Install",
        &["a{sv}", "1", "no_readback", "b", "false"],
    )
    .unwrap();
    let mut progress = 0;
    let mut states = Vec::new();
    let completed = loop {
        let (member, data) = signals.next();
        match member.as_str() {
            "Progress" => progress += 1,
            "StateChanged" => states.push(data[0].as_str().unwrap().to_string()),
            "Completed" => break data,
            _ => {}
        }
    };
    assert_eq!(completed[0], true, "{completed}");
    let report: serde_json::Value = serde_json::from_str(completed[1].as_str().unwrap()).unwrap();
    assert_eq!(report["version"], "1.1.0", "{report}");
    assert!(progress > 0, "no Progress signal");
    assert_eq!(states, ["installing", "idle"]);
    assert_eq!(prop(&addr, "Phase"), "staged");

    // Cancel drops it again.
    let c = doc(method(&addr, "Cancel", &[]).unwrap());
    assert_eq!(c["version"], "1.1.0", "{c}");
    assert_ne!(prop(&addr, "Phase"), "staged");

    // A non-root caller: refused by the policy file, before the service sees it.
    let e = call(&addr, true, &["call", NAME, PATH, NAME, "Status"]).unwrap_err();
    assert!(
        e.to_lowercase().contains("access denied") || e.contains("AccessDenied"),
        "{e}"
    );

    // On a bus without the policy file the service refuses the caller itself.
    let (_bus2, addr2) = private_bus(dir.path(), "bus2", false);
    let _agent2 = start_agent(&w, &addr2);
    let e = call(&addr2, true, &["call", NAME, PATH, NAME, "Status"]).unwrap_err();
    assert!(e.contains("root only"), "{e}");
    assert!(call(&addr2, false, &["call", NAME, PATH, NAME, "Status"]).is_ok());
}

/// Follows `busctl monitor` of the service: the signals, as JSON values.
struct Signals {
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    _stderr: BufReader<std::process::ChildStderr>,
    _monitor: Killed,
}

impl Signals {
    /// Starts the monitor and waits until it is subscribed: busctl says so on stderr once
    /// the bus made it a monitor.
    fn start(addr: &str) -> Signals {
        let mut monitor = Command::new("busctl")
            .arg(format!("--address={addr}"))
            .args(["monitor", "--json=short", NAME])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(monitor.stdout.take().unwrap()).lines();
        let mut stderr = BufReader::new(monitor.stderr.take().unwrap());
        let monitor = Killed(monitor);
        let mut line = String::new();
        while !line.contains("Monitoring bus message stream") {
            line.clear();
            assert_ne!(
                stderr.read_line(&mut line).unwrap(),
                0,
                "busctl monitor ended"
            );
        }
        Signals {
            lines,
            _stderr: stderr,
            _monitor: monitor,
        }
    }

    /// The next signal (member, payload data); panics when the monitor ends.
    fn next(&mut self) -> (String, serde_json::Value) {
        for line in self.lines.by_ref() {
            let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            if v["type"] == "signal" {
                return (
                    v["member"].as_str().unwrap_or("").to_string(),
                    v["payload"]["data"].clone(),
                );
            }
        }
        panic!("busctl monitor ended");
    }
}

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_running_install_and_keeps_its_resume_state() {
    let Some((dir, mut w)) = host(72).await else {
        return;
    };
    // Past the pipeline's first checkpoint (64 MiB), so there is resume state to keep.
    w.publish_with(
        &PublishSpec::new("1.1.0")
            .compression(Compression::None)
            .image_len("usr", 70 * MIB),
    )
    .unwrap();
    let active_before = w.slot_sha256(SlotId::A, "usr", 72 * MIB).unwrap();
    // The server sends 66 MiB, then nothing: only a cancel ends the install quickly.
    w.server.set_fault(
        serde_json::from_value(serde_json::json!({
            "path": "/usr-*", "fault": {"stall_after": 66 * MIB}
        }))
        .unwrap(),
    );
    let (_bus, addr) = private_bus(dir.path(), "bus", true);
    let _agent = start_agent(&w, &addr);
    let mut signals = Signals::start(&addr);

    method(&addr, "Install", &["a{sv}", "0"]).unwrap();
    // Wait (bounded by the monitor's own output) until 66 MiB are written.
    loop {
        let (member, data) = signals.next();
        assert_ne!(member, "Completed", "the install ended on its own: {data}");
        if member == "Progress" && data[2].as_u64().unwrap() >= 66 * MIB {
            break;
        }
    }
    assert_eq!(prop(&addr, "Operation"), "installing");
    // Cancel returns once the install has stopped.
    let c = doc(method(&addr, "Cancel", &[]).unwrap());
    assert_eq!(c["stopped"], "install", "{c}");
    assert_eq!(c["version"], "1.1.0", "{c}");
    assert_eq!(c["slot"], "B", "{c}");
    assert_eq!(c["next"], "A", "{c}");
    assert_eq!(prop(&addr, "Phase"), "failed");
    let status = doc(method(&addr, "Status", &[]).unwrap());
    assert_eq!(status["phase"]["kind"], "install_cancelled", "{status}");
    loop {
        let (member, data) = signals.next();
        if member == "Completed" {
            assert_eq!(data[0], false, "{data}");
            let e: serde_json::Value = serde_json::from_str(data[1].as_str().unwrap()).unwrap();
            assert_eq!(e["error"]["kind"], "install_cancelled", "{e}");
            break;
        }
    }
    assert_eq!(prop(&addr, "LastError"), "install_cancelled");
    assert_eq!(
        w.slot_sha256(SlotId::A, "usr", 72 * MIB).unwrap(),
        active_before,
        "the active slot changed"
    );
    let resume: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.state_dir.join("resume.json")).unwrap()).unwrap();
    assert!(
        resume.to_string().contains(&(64 * MIB).to_string()),
        "{resume}"
    );

    // The next install resumes from the kept checkpoint.
    w.server.clear_faults();
    method(&addr, "Install", &["a{sv}", "0"]).unwrap();
    let report = loop {
        let (member, data) = signals.next();
        if member == "Completed" {
            assert_eq!(data[0], true, "{data}");
            break serde_json::from_str::<serde_json::Value>(data[1].as_str().unwrap()).unwrap();
        }
    };
    assert_eq!(report["targets"][0]["resumed_from"], 64 * MIB, "{report}");
    assert_eq!(prop(&addr, "Phase"), "staged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_run_install_is_seen_on_the_bus() {
    let Some((dir, mut w)) = host(8).await else {
        return;
    };
    w.publish_with(&PublishSpec::new("1.1.0").compression(Compression::None))
        .unwrap();
    std::fs::write(
        dir.path().join("machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let machine_id = dir.path().join("machine-id").display().to_string();
    w.set_config("daemon", "machine_id_path", machine_id)
        .unwrap();
    let metrics = dir.path().join("update-agent.prom").display().to_string();
    w.set_config("daemon", "metrics_path", metrics).unwrap();
    let (_bus, addr) = private_bus(dir.path(), "bus", true);
    let _agent = start_agent(&w, &addr);
    let mut signals = Signals::start(&addr);

    // Another process installs: the daemon, one cycle.
    let daemon = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&w.config_path)
        .args(["daemon", "--once"])
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let daemon_pid = daemon.id();
    let out = daemon.wait_with_output().unwrap();
    let outcome: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["outcome"], "rebooting", "{outcome}");

    // Its phases came as Progress signals and PropertiesChanged, then the install's end.
    let mut phases: Vec<String> = Vec::new();
    let mut pids = std::collections::BTreeSet::new();
    let mut total = 0;
    loop {
        let (member, data) = signals.next();
        match member.as_str() {
            "Progress" => {
                let phase = data[1].as_str().unwrap().to_string();
                if phases.last() != Some(&phase) {
                    phases.push(phase);
                }
                total = data[3].as_u64().unwrap();
            }
            "PropertiesChanged" => {
                let changed = &data[1];
                if let Some(pid) = changed["InstallPid"]["data"].as_u64() {
                    pids.insert(pid);
                }
                if let Some(phase) = changed["Phase"]["data"].as_str() {
                    assert_eq!(phase, "staged", "{data}");
                    assert_eq!(changed["InstallPhase"]["data"], "", "{data}");
                    break;
                }
            }
            "Completed" => panic!("Completed is for this service's own Install: {data}"),
            _ => {}
        }
    }
    let mut want = ["slot disabled", "writing", "verifying", "verified"].iter();
    let mut next = want.next();
    for p in &phases {
        if Some(&p.as_str()) == next {
            next = want.next();
        }
    }
    assert!(next.is_none(), "phases seen: {phases:?}");
    assert!(total >= 1 << 20, "{total}");
    assert!(pids.contains(&u64::from(daemon_pid)), "{pids:?}");
    assert_eq!(prop(&addr, "InstallPhase"), "");
}
