//! The README's main-job command, `update-agent-sandbox demo`, run as the binary: it ends booted on
//! 2.0.0 from slot B with 3.0.0 rolled back and denylisted, exits 0, and leaves nothing
//! running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run_demo(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_update-agent-sandbox"))
        .arg("demo")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(300) {
            child.kill().unwrap();
            panic!("the demo did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Both pipes reach EOF only when no process (a leftover check, a server) still holds them.
    (status, out.join().unwrap(), err.join().unwrap())
}

#[test]
fn demo_ends_on_2_0_0_with_3_0_0_rolled_back_and_denylisted() {
    let (status, out, err) = run_demo(&[]);
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    for needle in [
        "== 1. sandbox in",
        "trial boot of slot B (2.0.0): required checks passed; slot B committed",
        "installed 3.0.0 into slot A",
        "trial boot of slot A (3.0.0) FAILED; slot B boots next",
        "required.d/50-app-responds failed (exit status 1)",
        "3.0.0 is denylisted",
        "apply would refuse [denylisted]",
        "booted: slot B (from cmdline)",
        "next boot: slot B",
        "denylisted versions: 3.0.0",
        "result: running 2.0.0 from slot B; 3.0.0 failed its health check, was rolled back and is denylisted",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    let steps = out.lines().filter(|l| l.starts_with("== ")).count();
    assert_eq!(steps, 12, "{out}");
}

#[test]
fn demo_with_grubenv_and_json_output() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = dir.path().join("sandbox");
    let (status, out, err) = run_demo(&[
        "--backend",
        "grubenv",
        "--layout",
        "chromeos",
        "--json",
        "--dir",
        sandbox.to_str().unwrap(),
    ]);
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["result"], "ok", "{last}");
    assert_eq!(last["running"], "2.0.0");
    assert_eq!(last["denylisted"], serde_json::json!(["3.0.0"]));
    let rolled_back = lines
        .iter()
        .find(|v| v["outcome"] == "rolled_back")
        .expect("a health-check report with outcome rolled_back");
    assert_eq!(rolled_back["booted"], "A");
    assert_eq!(rolled_back["rolled_back_to"], "B");
    // The kept sandbox is a real host's state: the agent's status command reads it (through
    // the library: the `update-agent` binary belongs to another package).
    let sources = update_agent::config::ConfigSources::system(Some(sandbox.join("config.toml")));
    let config = update_agent::config::Config::load(&sources).unwrap();
    let host = update_agent::host::Host::open(config).unwrap();
    let text = update_agent::ops::status::status(&host).unwrap().render();
    assert!(text.contains("denylisted versions: 3.0.0"), "{text}");
}

#[test]
fn demo_with_bls() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = dir.path().join("sandbox");
    let (status, out, err) = run_demo(&["--backend", "bls", "--dir", sandbox.to_str().unwrap()]);
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    for needle in [
        "(boot control: bls)",
        "trial boot of slot B (2.0.0): required checks passed; slot B committed",
        "trial boot of slot A (3.0.0) FAILED; slot B boots next",
        "booted: slot B (from LoaderEntrySelected)",
        "next boot: slot B",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    // What systemd-boot would see: B committed, A (3.0.0) marked bad after one counted try.
    let mut names: Vec<String> = std::fs::read_dir(sandbox.join("esp/loader/entries"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["1-sandbox-b.conf", "2-sandbox-a+0-1.conf"], "{out}");
}
