//! Fleet simulation: many hosts, each its own disk image, state directory and machine id,
//! each agent step a separate `update-agent` process (`daemon --once`, `health-check`),
//! reboots through the boot simulator, one server-mock serving the release, FleetLock and the
//! status reports.
//!
//! 1. 100 hosts, two waves, a FleetLock group of 3 slots: every host ends committed on the new
//!    release, the server never saw more than 3 holders, and no host started installing
//!    before its wave admitted it.
//! 2. A host whose health check fails rolls back, keeps its slot, and the hosts waiting for
//!    that slot stay staged without rebooting; once an operator frees the slot the rollout
//!    resumes and completes.
//! 3. 100 hosts, 3 slots, one failing host: it keeps its slot for good, the other 99 roll
//!    through the 2 slots left, never more than 3 holders, no host rebooted more than needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::digest::{digest, SHA256};
use tokio::sync::Semaphore;
use update_agent::boot::SlotId;
use update_agent::state::{HistoryEvent, Phase, State, StateStore};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, Release, World};
use updater_proto::{eligible_from, Wave, WaveSeed};

const SLOT_MIB: u64 = 2;
const NEW: &str = "1.1.0";
/// Agent processes running at once (2 cores shared with the rest of the build).
const PARALLEL: usize = 4;

/// The two simulations each load the machine; run them one after the other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct SimHost {
    id: String,
    machine_id: String,
    world: World,
    reboot_flag: PathBuf,
    boot_id: PathBuf,
    boots: std::sync::atomic::AtomicU32,
}

impl SimHost {
    fn state(&self) -> State {
        StateStore::open(&self.world.state_dir)
            .unwrap()
            .load()
            .unwrap()
    }

    fn holds_marker(&self) -> bool {
        self.world
            .state_dir
            .join(update_agent::fleet::lock::HELD_FILE)
            .exists()
    }

    /// Committed on the new release and the slot given back.
    fn done(&self) -> bool {
        matches!(&self.state().phase, Phase::Committed { version, .. } if version == NEW)
            && !self.holds_marker()
    }

    fn new_boot_id(&self) {
        let n = self.boots.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id =
            hex::encode(&digest(&SHA256, format!("{}-{n}", self.id).as_bytes()).as_ref()[..16]);
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &id[..8],
            &id[8..12],
            &id[12..16],
            &id[16..20],
            &id[20..32]
        );
        std::fs::write(&self.boot_id, format!("{uuid}\n")).unwrap();
    }
}

fn machine_id(run: &str, i: usize) -> String {
    hex::encode(&digest(&SHA256, format!("{run}-{i}").as_bytes()).as_ref()[..16])
}

async fn make_host(base: &Path, run: &str, i: usize, publisher: &World, bad: bool) -> SimHost {
    let dir = base.join(format!("host-{i:03}"));
    std::fs::create_dir_all(&dir).unwrap();
    let world = World::create(&dir, Preset::Flatcar, Backend::Gptprio, SLOT_MIB)
        .await
        .unwrap();
    let mid = machine_id(run, i);
    std::fs::write(dir.join("machine-id"), format!("{mid}\n")).unwrap();
    let health = dir.join("health-required");
    std::fs::create_dir_all(&health).unwrap();
    if bad {
        let script = health.join("10-service");
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'service did not come up' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let flag = dir.join("reboot-requested");
    let s = |v: &Path| v.display().to_string();
    let keys: Vec<toml::Value> = (0..2)
        .map(|k| {
            let mut t = toml::Table::new();
            t.insert(
                "file".into(),
                s(&publisher.dir.join(format!("keys/release-{k}.pub"))).into(),
            );
            toml::Value::Table(t)
        })
        .collect();
    let mut fl = toml::Table::new();
    fl.insert("url".into(), publisher.server.url().into());
    fl.insert("group".into(), "fleet".into());
    world
        .set_config("server", "manifest_url", publisher.manifest_url())
        .unwrap();
    world
        .set_config("trust", "keys", toml::Value::Array(keys))
        .unwrap();
    world
        .set_config("daemon", "machine_id_path", s(&dir.join("machine-id")))
        .unwrap();
    world
        .set_config("daemon", "node_id", format!("host-{i:03}"))
        .unwrap();
    world
        .set_config(
            "daemon",
            "report_url",
            publisher.server.url_for("v1/report"),
        )
        .unwrap();
    world
        .set_config("daemon", "metrics_path", s(&dir.join("agent.prom")))
        .unwrap();
    world
        .set_config("reboot", "strategy", "fleet_lock")
        .unwrap();
    world
        .set_config("reboot", "fleet_lock", toml::Value::Table(fl))
        .unwrap();
    world.reboot_by_touching(&flag).unwrap();
    world
        .set_config("health", "required_dir", s(&health))
        .unwrap();
    world
        .set_config("health", "wanted_dir", s(&dir.join("health-wanted")))
        .unwrap();
    world.set_config("health", "total_timeout", "20s").unwrap();
    let host = SimHost {
        id: format!("host-{i:03}"),
        machine_id: mid,
        world,
        reboot_flag: flag,
        boot_id: dir.join("boot_id"),
        boots: std::sync::atomic::AtomicU32::new(0),
    };
    host.new_boot_id();
    host
}

/// One agent process; (exit success, stdout).
async fn agent(h: &SimHost, sem: &Semaphore, args: &[&str]) -> (bool, String) {
    let _permit = sem.acquire().await.unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&h.world.config_path)
        .arg("--json")
        .args(["--log", "error"])
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove(update_agent::daemon::TEST_HOLD_ENV)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The reboot the command asked for: the loader's choice, a new boot id, the health check
/// (which may itself roll back and ask for another reboot).
async fn reboot_and_check(h: &SimHost, sem: &Semaphore) {
    while h.reboot_flag.exists() {
        std::fs::remove_file(&h.reboot_flag).unwrap();
        h.world.boot().unwrap();
        h.new_boot_id();
        let boot_id = h.boot_id.display().to_string();
        agent(h, sem, &["health-check", "--boot-id-path", &boot_id]).await;
    }
}

/// What ended a host's drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Done,
    Halted,
}

/// Step one host (`daemon --once`, and the reboot and health check it asks for) until it is
/// committed on the new release with its slot given back, or halted.
async fn drive(h: Arc<SimHost>, sem: Arc<Semaphore>, deadline: Instant) -> Result<End, String> {
    loop {
        if h.done() {
            return Ok(End::Done);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: not done by the deadline: {:?}",
                h.id,
                h.state().phase
            ));
        }
        let (_ok, out) = agent(&h, &sem, &["daemon", "--once"]).await;
        if h.reboot_flag.exists() {
            reboot_and_check(&h, &sem).await;
            continue;
        }
        let outcome: serde_json::Value =
            serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap_or_default();
        let wait = match outcome["outcome"].as_str() {
            Some("halted") => return Ok(End::Halted),
            Some("waiting_for_wave") => {
                let at = outcome["at"]
                    .as_str()
                    .unwrap()
                    .parse::<jiff::Timestamp>()
                    .unwrap()
                    .as_second();
                let now = jiff::Timestamp::now().as_second();
                Duration::from_millis(u64::try_from(at - now).unwrap_or(0) * 1000 + 50)
            }
            _ => Duration::from_millis(250),
        };
        tokio::time::sleep(wait).await;
    }
}

async fn fleet(base: &Path, run: &str, n: usize, bad: Option<usize>) -> (World, Vec<Arc<SimHost>>) {
    let pdir = base.join("publisher");
    std::fs::create_dir_all(&pdir).unwrap();
    let publisher = World::create(&pdir, Preset::Flatcar, Backend::Gptprio, SLOT_MIB)
        .await
        .unwrap();
    let mut hosts = Vec::new();
    for i in 0..n {
        hosts.push(Arc::new(
            make_host(base, run, i, &publisher, Some(i) == bad).await,
        ));
    }
    (publisher, hosts)
}

fn assert_on_new_release(h: &SimHost, release: &Release) {
    let s = h.state();
    assert!(
        matches!(&s.phase, Phase::Committed { slot: SlotId::B, version } if version == NEW),
        "{}: {:?}",
        h.id,
        s.phase
    );
    for img in &release.images {
        assert_eq!(
            h.world.slot_sha256(SlotId::B, &img.role, img.size).unwrap(),
            img.sha256,
            "{} slot B {}",
            h.id,
            img.role
        );
    }
    let cmdline = std::fs::read_to_string(&h.world.cmdline).unwrap();
    assert!(cmdline.contains("rauc.slot=B"), "{}: {cmdline}", h.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_hosts_two_waves_three_slots() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (mut publisher, hosts) = fleet(tmp.path(), "wave-run", 100, None).await;
    publisher
        .server
        .fleetlock()
        .configure(server_mock::FleetLockSettings {
            default_slots: 3,
            groups: Default::default(),
            ttl_ms: None,
        });
    // Wave 1 (seeds 0..1024) spreads over [t+4, t+10); wave 2 (the rest) opens at t+10.
    let now = jiff::Timestamp::now().as_second();
    let waves = vec![
        Wave {
            seed_bound: 1024,
            start: now + 4,
        },
        Wave {
            seed_bound: 2048,
            start: now + 10,
        },
    ];
    let release = publisher.publish(NEW, waves.clone()).unwrap();
    eprintln!("fleet of {} set up in {:?}", hosts.len(), started.elapsed());

    let sem = Arc::new(Semaphore::new(PARALLEL));
    // A bound so the run stops by itself, not a speed check (that is a benchmark's job):
    // loose enough for a loaded CI machine.
    let deadline = Instant::now() + Duration::from_secs(600);
    let tasks: Vec<_> = hosts
        .iter()
        .map(|h| tokio::spawn(drive(h.clone(), sem.clone(), deadline)))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), End::Done);
    }
    eprintln!("rollout done in {:?}", started.elapsed());

    let fl = publisher.server.fleetlock();
    let max = fl.max_holders("fleet");
    eprintln!("most simultaneous FleetLock holders: {max}");
    assert!((1..=3).contains(&max), "max holders {max}");
    assert!(fl.events().iter().all(|e| e.holders <= 3));
    assert!(fl.holders("fleet").is_empty(), "every slot given back");
    let mut in_wave = [0usize; 2];
    for h in &hosts {
        assert_on_new_release(h, &release);
        let seed = WaveSeed::from_machine_id(h.machine_id.as_bytes());
        in_wave[usize::from(seed.get() >= 1024)] += 1;
        let opens = eligible_from(&waves, seed).unwrap();
        let s = h.state();
        let started_at = s
            .history
            .iter()
            .find(|e| e.event == HistoryEvent::InstallStarted && e.version.as_deref() == Some(NEW))
            .unwrap()
            .at
            .as_second();
        assert!(
            started_at >= opens,
            "{} (seed {}) started installing at {started_at}, before its wave opened at {opens}",
            h.id,
            seed.get()
        );
    }
    assert!(
        in_wave[0] > 0 && in_wave[1] > 0,
        "both waves populated: {in_wave:?}"
    );
    let summary = publisher.server.reports().summary();
    assert_eq!(summary.hosts, 100);
    assert_eq!(
        summary.by_version.get(NEW),
        Some(&100),
        "{}",
        summary.render()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_host_keeps_its_slot_and_halts_the_group() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let (mut publisher, hosts) = fleet(tmp.path(), "halt-run", 8, Some(0)).await;
    // A canary group: one slot.
    publisher
        .server
        .fleetlock()
        .configure(server_mock::FleetLockSettings {
            default_slots: 1,
            groups: Default::default(),
            ttl_ms: None,
        });
    let release = publisher.publish(NEW, Vec::new()).unwrap();
    let sem = Arc::new(Semaphore::new(PARALLEL));
    let deadline = Instant::now() + Duration::from_secs(120);
    let fl = publisher.server.fleetlock();

    // The bad host goes first: it takes the slot, fails its check, rolls back, and halts.
    let bad = hosts[0].clone();
    assert_eq!(
        drive(bad.clone(), sem.clone(), deadline).await.unwrap(),
        End::Halted
    );
    let s = bad.state();
    assert!(matches!(s.phase, Phase::RolledBack { .. }), "{:?}", s.phase);
    assert!(s.is_denied(NEW));
    assert!(bad.holds_marker());
    assert!(std::fs::read_to_string(&bad.world.cmdline)
        .unwrap()
        .contains("rauc.slot=A"));
    assert_eq!(fl.holders("fleet"), vec![bad.id.clone()]);
    let prom = std::fs::read_to_string(bad.world.dir.join("agent.prom")).unwrap();
    assert!(prom.contains("update_agent_fleetlock_held 1"), "{prom}");
    assert!(
        prom.contains("update_agent_phase{phase=\"rolled_back\"} 1"),
        "{prom}"
    );

    // The others install and stage, then are refused the slot, again and again: none
    // reboots into the release while the failed host holds the slot.
    for _round in 0..3 {
        for h in &hosts[1..] {
            let (ok, out) = agent(h, &sem, &["daemon", "--once"]).await;
            assert!(ok, "{}: {out}", h.id);
            assert!(out.contains("waiting_for_slot"), "{}: {out}", h.id);
            assert!(!h.reboot_flag.exists(), "{} asked to reboot", h.id);
        }
    }
    // Staying halted is stable: the bad host keeps saying so and keeps the slot.
    let (_ok, out) = agent(&bad, &sem, &["daemon", "--once"]).await;
    assert!(out.contains("halted"), "{out}");
    for h in &hosts[1..] {
        assert!(matches!(h.state().phase, Phase::Staged { .. }), "{}", h.id);
        assert!(std::fs::read_to_string(&h.world.cmdline)
            .unwrap()
            .contains("rauc.slot=A"));
        assert!(!h.holds_marker());
    }
    assert_eq!(fl.holders("fleet"), vec![bad.id.clone()]);
    let refused = fl.events().iter().filter(|e| e.status == 409).count();
    assert!(refused >= 3 * (hosts.len() - 1), "{refused} refusals");
    let summary = publisher.server.reports().summary();
    assert!(
        summary.failing.iter().any(|r| r.id == bad.id),
        "{}",
        summary.render()
    );

    // The operator has looked at the failed host and frees its slot: the rollout resumes.
    assert!(fl.release(&bad.id, "fleet"));
    let tasks: Vec<_> = hosts[1..]
        .iter()
        .map(|h| tokio::spawn(drive(h.clone(), sem.clone(), deadline)))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), End::Done);
    }
    for h in &hosts[1..] {
        assert_on_new_release(h, &release);
    }
    assert_eq!(fl.max_holders("fleet"), 1);
}

/// The acceptance run as stated: 100 hosts, a FleetLock group of 3 slots, one host whose
/// health check fails. It rolls back and keeps its slot for good; the other 99 roll through
/// the 2 slots left, never more than 3 holders at once, and every reboot happened under a
/// slot (the server granted each host's pre-reboot exactly once).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_hosts_three_slots_one_fails_and_keeps_its_slot() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let bad_index = 17;
    let (mut publisher, hosts) = fleet(tmp.path(), "fail-run", 100, Some(bad_index)).await;
    publisher
        .server
        .fleetlock()
        .configure(server_mock::FleetLockSettings {
            default_slots: 3,
            groups: Default::default(),
            ttl_ms: None,
        });
    let release = publisher.publish(NEW, Vec::new()).unwrap();
    let sem = Arc::new(Semaphore::new(PARALLEL));
    let deadline = Instant::now() + Duration::from_secs(300);
    let tasks: Vec<_> = hosts
        .iter()
        .map(|h| tokio::spawn(drive(h.clone(), sem.clone(), deadline)))
        .collect();
    let mut ends = Vec::new();
    for t in tasks {
        ends.push(t.await.unwrap().unwrap());
    }
    let bad = &hosts[bad_index];
    for (i, (h, end)) in hosts.iter().zip(&ends).enumerate() {
        if i == bad_index {
            assert_eq!(*end, End::Halted, "{}", h.id);
        } else {
            assert_eq!(*end, End::Done, "{}", h.id);
            assert_on_new_release(h, &release);
        }
    }

    let s = bad.state();
    assert!(matches!(s.phase, Phase::RolledBack { .. }), "{:?}", s.phase);
    assert!(s.is_denied(NEW));
    assert!(bad.holds_marker(), "the failed host keeps its slot");
    assert!(std::fs::read_to_string(&bad.world.cmdline)
        .unwrap()
        .contains("rauc.slot=A"));

    let fl = publisher.server.fleetlock();
    assert_eq!(fl.holders("fleet"), vec![bad.id.clone()]);
    let events = fl.events();
    assert!(events.iter().all(|e| e.holders <= 3), "more than 3 holders");
    assert!(fl.max_holders("fleet") <= 3);
    for h in hosts.iter() {
        let granted: Vec<_> = events
            .iter()
            .filter(|e| e.id == h.id && e.op == "pre-reboot" && e.status == 200)
            .collect();
        assert!(
            !granted.is_empty(),
            "{} rebooted without taking a slot",
            h.id
        );
        // The first boot in the factory, one into the new release, and for the bad host one
        // more back into the old slot: no host rebooted more than that.
        let boots = h.boots.load(std::sync::atomic::Ordering::SeqCst);
        let expected = if h.id == bad.id { 3 } else { 2 };
        assert_eq!(boots, expected, "{} booted {boots} times", h.id);
    }
}
