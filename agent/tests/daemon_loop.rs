//! The long-running loop as a process: exponential backoff (with jitter) while the server
//! fails, then the install; a poll interval of an hour does not delay a wave that opens in a
//! few seconds (the daemon wakes when the wave opens).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use server_mock::{Fault, FaultRule};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};
use updater_proto::{Wave, WaveSeed};

const DEADLINE: Duration = Duration::from_secs(60);

/// Notifications with the time they arrived.
struct Notify {
    sock: UnixDatagram,
    seen: Vec<(Instant, String)>,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let sock = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Notify {
            sock,
            seen: Vec::new(),
        }
    }

    fn wait_for(&mut self, needle: &str, child: &mut Child) -> Instant {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            if let Some((t, _)) = self.seen.iter().find(|(_, m)| m.contains(needle)) {
                return *t;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no {needle:?}; seen {:?}",
                self.seen
            );
            match self.sock.recv(&mut buf) {
                Ok(n) => self.seen.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                )),
                Err(_) => {
                    if let Some(s) = child.try_wait().unwrap() {
                        panic!(
                            "daemon exited ({s}) before {needle:?}; seen {:?}",
                            self.seen
                        );
                    }
                }
            }
        }
    }
}

fn spawn(world: &World, dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&world.config_path)
        .args(["--log", "warn", "daemon"])
        .env("NOTIFY_SOCKET", dir.join("notify.sock"))
        .env_remove("WATCHDOG_USEC")
        .env_remove(update_agent::daemon::TEST_HOLD_ENV)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn stop(child: &mut Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "{s}");
            return;
        }
        assert!(start.elapsed() < DEADLINE, "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn world(dir: &Path) -> World {
    let w = World::create(dir, Preset::Flatcar, Backend::Gptprio, 2)
        .await
        .unwrap();
    std::fs::write(dir.join("machine-id"), "aabbccddeeff00112233445566778899\n").unwrap();
    w.set_config(
        "daemon",
        "machine_id_path",
        dir.join("machine-id").display().to_string(),
    )
    .unwrap();
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backs_off_exponentially_while_the_server_fails_then_installs() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    w.publish("1.1.0", Vec::new()).unwrap();
    w.set_config("daemon", "poll_interval", "300ms").unwrap();
    w.set_config("daemon", "jitter", "0s").unwrap();
    w.set_config("daemon", "max_backoff", "10s").unwrap();
    // No retries inside one fetch: every 503 fails a cycle, so the daemon's own backoff shows.
    w.set_config("install", "max_attempts", 1).unwrap();
    w.server
        .set_fault(FaultRule::new("/manifest.json", Fault::Status(503)).times(3));
    let mut notify = Notify::bind(dir.path());
    let mut child = spawn(&w, dir.path());
    notify.wait_for("STATUS=rebooting into 1.1.0", &mut child);
    stop(&mut child);
    let failures: Vec<Instant> = notify
        .seen
        .iter()
        .filter(|(_, m)| m.starts_with("STATUS=failed ["))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(failures.len(), 3, "{:?}", notify.seen);
    assert!(
        notify.seen.iter().any(|(_, m)| m.contains("retrying in")),
        "{:?}",
        notify.seen
    );
    // Backoff n waits within [base*2^(n-1)/2, base*2^(n-1)] (base = 300 ms): the third wait
    // (>= 600 ms) is longer than the first (<= 300 ms).
    let gap1 = failures[1] - failures[0];
    let gap2 = failures[2] - failures[1];
    assert!(gap1 >= Duration::from_millis(140), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(290), "{gap2:?}");
    let manifest_503 = w
        .server
        .request_log()
        .iter()
        .filter(|e| e.path == "/manifest.json" && e.status == 503)
        .count();
    assert_eq!(manifest_503, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wakes_when_its_wave_opens_not_at_the_next_poll() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    w.set_config("daemon", "poll_interval", "1h").unwrap();
    let seed = WaveSeed::from_machine_id(b"aabbccddeeff00112233445566778899");
    // One wave holding every seed, opening in 3 s.
    let now = jiff::Timestamp::now().as_second();
    w.publish(
        "1.1.0",
        vec![Wave {
            seed_bound: 2048,
            start: now + 3,
        }],
    )
    .unwrap();
    let mut notify = Notify::bind(dir.path());
    let started = Instant::now();
    let mut child = spawn(&w, dir.path());
    let waiting = notify.wait_for("wave opens at", &mut child);
    let rebooting = notify.wait_for("STATUS=rebooting into 1.1.0", &mut child);
    stop(&mut child);
    assert!(rebooting > waiting);
    // Eligible at `now + 3` (whole seconds): well before the hour-long poll.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "installed before the wave: {took:?} (seed {})",
        seed.get()
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    let s = update_agent::state::StateStore::open(&w.state_dir)
        .unwrap()
        .load()
        .unwrap();
    let install = s
        .history
        .iter()
        .find(|e| e.event == update_agent::state::HistoryEvent::InstallStarted)
        .unwrap();
    assert!(install.at.as_second() >= now + 3);
}
