//! The daemon as a process: sd_notify (READY, STATUS, WATCHDOG, STOPPING; path and abstract
//! sockets), SIGTERM during the download, the flush, right after the disable flip and right
//! before the staging flip, then a restart that completes the install onto a verified slot;
//! a manual apply refused while the daemon installs; metrics written.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use update_agent::boot::SlotId;
use update_agent::state::Phase;
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, PublishSpec, Release, World};
use updater_proto::Compression;

const DEADLINE: Duration = Duration::from_secs(60);

/// The test's end of `NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    env: String,
    seen: Vec<String>,
}

impl Notify {
    fn path(dir: &Path) -> Notify {
        let p = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&p).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notify {
            sock,
            env: p.display().to_string(),
            seen: Vec::new(),
        }
    }

    fn abstract_name(name: &str) -> Notify {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notify {
            sock,
            env: format!("@{name}"),
            seen: Vec::new(),
        }
    }

    /// Wait for a datagram containing `needle`; panics with everything seen at the deadline.
    fn wait_for(&mut self, needle: &str, child: &mut Child) -> String {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.seen.iter().find(|m| m.contains(needle)) {
                return m.clone();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no {needle:?} within {DEADLINE:?}; seen {:?}",
                self.seen
            );
            // Datagrams sent before the process exited are still queued: read them first.
            match self.sock.recv(&mut buf) {
                Ok(n) => self
                    .seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(_) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!(
                            "daemon exited ({status}) before {needle:?}; seen {:?}",
                            self.seen
                        );
                    }
                }
            }
        }
    }
}

fn agent(world: &World) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_update-agent"));
    c.arg("--config")
        .arg(&world.config_path)
        .arg("--log")
        .arg("warn")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove(update_agent::daemon::TEST_HOLD_ENV);
    c
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < DEADLINE, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn world(dir: &Path, slot_mib: u64) -> World {
    let w = World::create(dir, Preset::Flatcar, Backend::Gptprio, slot_mib)
        .await
        .unwrap();
    std::fs::write(dir.join("machine-id"), "0123456789abcdef0123456789abcdef\n").unwrap();
    w.set_config(
        "daemon",
        "machine_id_path",
        dir.join("machine-id").display().to_string(),
    )
    .unwrap();
    w.set_config(
        "daemon",
        "metrics_path",
        dir.join("update-agent.prom").display().to_string(),
    )
    .unwrap();
    w
}

fn state(world: &World) -> update_agent::state::State {
    update_agent::state::StateStore::open(&world.state_dir)
        .unwrap()
        .load()
        .unwrap()
}

/// After an interrupted run: restart with `daemon --once`; it must install and stage, and
/// the simulated reboot must boot the new slot with exactly the release's bytes.
fn restart_completes(world: &World, release: &Release) {
    let out = agent(world)
        .args(["daemon", "--once"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "restart failed: {stdout}");
    let outcome: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(outcome["outcome"], "rebooting", "{stdout}");
    assert_eq!(outcome["version"], release.version.as_str());
    let s = state(world);
    assert!(
        matches!(&s.phase, Phase::Staged { slot: SlotId::B, version } if *version == release.version),
        "{:?}",
        s.phase
    );
    assert!(s.slots[&SlotId::B].verified);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    for img in &release.images {
        assert_eq!(
            world.slot_sha256(SlotId::B, &img.role, img.size).unwrap(),
            img.sha256,
            "slot B {} after the restart",
            img.role
        );
    }
}

/// Start the daemon holding at `hold`, SIGTERM it there, check it stopped cleanly and left
/// nothing bootable behind, then restart it to completion.
async fn sigterm_at(
    hold: &str,
    compression: Compression,
    slot_mib: u64,
) -> (tempfile::TempDir, World) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut w = world(&dir, slot_mib).await;
    let release = w
        .publish_with(&PublishSpec::new("1.1.0").compression(compression))
        .unwrap();
    let mut notify = Notify::path(&dir);
    let mut child = agent(&w)
        .arg("daemon")
        .env("NOTIFY_SOCKET", &notify.env)
        .env(update_agent::daemon::TEST_HOLD_ENV, hold)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    notify.wait_for("READY=1", &mut child);
    let phase = hold.split(':').next().unwrap();
    notify.wait_for(&format!("STATUS=test-hold {phase}"), &mut child);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child);
    assert!(status.success(), "SIGTERM at {hold}: {status}");
    notify.wait_for("STOPPING=1", &mut child);
    // Interrupted before staging: the old slot still boots, the new one is not bootable.
    let s = state(&w);
    assert!(
        matches!(s.phase, Phase::Downloading { .. }),
        "at {hold}: {:?}",
        s.phase
    );
    assert_eq!(w.boot().unwrap(), Some(SlotId::A), "at {hold}");
    restart_completes(&w, &release);
    (tmp, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_download_then_restart_resumes_with_range() {
    // Raw image past the first 64 MiB checkpoint, so the restart continues with a Range
    // request instead of starting over.
    let (_tmp, w) = sigterm_at("writing:90", Compression::None, 96).await;
    let ranged: Vec<_> = w
        .server
        .request_log()
        .into_iter()
        .filter(|e| e.path.ends_with(".img") || e.path.contains("usr"))
        .filter_map(|e| e.range)
        .collect();
    assert!(
        ranged.iter().any(|r| !r.starts_with("bytes=0-")),
        "the restart should resume by Range; ranges seen: {ranged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_flush_then_restart_completes() {
    sigterm_at("flushing", Compression::Zstd, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_after_the_disable_flip_then_restart_completes() {
    sigterm_at("disabled", Compression::Zstd, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_before_the_stage_flip_then_restart_completes() {
    // `done` is the last event before the staging flag write.
    sigterm_at("done", Compression::Zstd, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notify_watchdog_abstract_socket_and_install_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path(), 8).await;
    w.publish_with(&PublishSpec::new("1.1.0")).unwrap();
    let name = format!("update-agent-test-{}", std::process::id());
    let mut notify = Notify::abstract_name(&name);
    let mut child = agent(&w)
        .arg("daemon")
        .env("NOTIFY_SOCKET", &notify.env)
        .env("WATCHDOG_USEC", "100000")
        .env(update_agent::daemon::TEST_HOLD_ENV, "flushing")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    notify.wait_for("READY=1", &mut child);
    notify.wait_for("WATCHDOG=1", &mut child);
    notify.wait_for("STATUS=installing 1.1.0", &mut child);
    notify.wait_for("STATUS=test-hold flushing", &mut child);
    // The daemon is inside apply: a manual apply must be refused by the same lock.
    let host = w.host().unwrap();
    let e = update_agent::ops::apply::apply(&host, &Default::default(), &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "install_locked", "{e}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut child).success());
    // The restart finishes; the metrics file tells what happened.
    let out = agent(&w).args(["daemon", "--once"]).output().unwrap();
    assert!(out.status.success());
    let prom = std::fs::read_to_string(dir.path().join("update-agent.prom")).unwrap();
    for needle in [
        "update_agent_phase{phase=\"staged\"} 1",
        "update_agent_installs_total 1",
        "update_agent_last_check_timestamp_seconds ",
        "update_agent_install_duration_seconds ",
        "update_agent_slot_version_info{slot=\"B\",version=\"1.1.0\"",
    ] {
        assert!(prom.contains(needle), "{needle} missing from\n{prom}");
    }
    let downloaded: f64 = prom
        .lines()
        .find_map(|l| l.strip_prefix("update_agent_downloaded_bytes_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(downloaded > 0.0, "{prom}");
}
