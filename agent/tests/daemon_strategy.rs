//! One daemon cycle at a time, in process: the wave gate with an overridden seed, each reboot
//! strategy's decision (immediate, window closed/open, FleetLock granted/refused/unreachable),
//! the slot released only after a committed boot and kept after a rollback, status reports,
//! and the new configuration keys' validation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use update_agent::config::Config;
use update_agent::daemon::notify::Notifier;
use update_agent::daemon::{CycleOutcome, Daemon};
use update_agent::fleet::lock::HeldSlot;
use update_agent::state::{Phase, StateStore};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};
use updater_proto::Wave;

async fn world(dir: &Path) -> World {
    let w = World::create(dir, Preset::Flatcar, Backend::Gptprio, 2)
        .await
        .unwrap();
    std::fs::write(dir.join("machine-id"), "00112233445566778899aabbccddeeff\n").unwrap();
    w.set_config(
        "daemon",
        "machine_id_path",
        dir.join("machine-id").display().to_string(),
    )
    .unwrap();
    w.reboot_by_touching(&dir.join("reboot-requested")).unwrap();
    w
}

fn daemon(w: &World) -> Daemon {
    Daemon::new(w.host().unwrap(), Arc::new(Notifier::from_env())).unwrap()
}

fn rebooted(w: &World) -> bool {
    w.dir.join("reboot-requested").exists()
}

fn phase(w: &World) -> Phase {
    StateStore::open(&w.state_dir)
        .unwrap()
        .load()
        .unwrap()
        .phase
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

#[tokio::test]
async fn wave_gate_uses_the_configured_seed() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    let t = now();
    w.publish(
        "1.1.0",
        vec![
            Wave {
                seed_bound: 1024,
                start: t - 10,
            },
            Wave {
                seed_bound: 2048,
                start: t + 3600,
            },
        ],
    )
    .unwrap();
    w.set_config("daemon", "wave_seed", 2000).unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert_eq!(
        outcome,
        CycleOutcome::WaitingForWave {
            version: "1.1.0".into(),
            at: t + 3600
        }
    );
    assert!(
        outcome.render().contains("wave opens"),
        "{}",
        outcome.render()
    );
    assert!(
        matches!(phase(&w), Phase::Committed { .. }),
        "nothing installed"
    );
    // `check` shows the same seed.
    let report = update_agent::ops::check::check(&w.host().unwrap(), None, false, false)
        .await
        .unwrap();
    assert_eq!(report.wave_seed, Some(2000));
    assert_eq!(report.eligible_from, Some(t + 3600));

    // Seed 0 is the first of wave 1, which opened 10 s ago.
    w.set_config("daemon", "wave_seed", 0).unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert_eq!(
        outcome,
        CycleOutcome::Rebooting {
            version: "1.1.0".into()
        }
    );
    assert!(rebooted(&w));
    assert!(matches!(phase(&w), Phase::Staged { .. }));
}

#[tokio::test]
async fn window_strategy_waits_for_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    w.publish("1.1.0", Vec::new()).unwrap();
    let all_days = toml::Value::Array(
        ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
            .iter()
            .map(|d| toml::Value::from(*d))
            .collect(),
    );
    let window = |start_offset_min: i64, length: &str| {
        let start = (jiff::Timestamp::now() + jiff::SignedDuration::from_mins(start_offset_min))
            .to_zoned_datetime(jiff::tz::TimeZone::UTC);
        let mut t = toml::Table::new();
        t.insert("days".into(), all_days.clone());
        t.insert(
            "start".into(),
            format!("{:02}:{:02}", start.hour(), start.minute()).into(),
        );
        t.insert("length".into(), length.into());
        t.insert("time_zone".into(), "UTC".into());
        toml::Value::Array(vec![toml::Value::Table(t)])
    };
    w.set_config("reboot", "strategy", "window").unwrap();
    // Opens in two hours (every day, so the next opening is today or tomorrow at that time).
    w.set_config("reboot", "windows", window(120, "1h"))
        .unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    let CycleOutcome::WaitingForWindow { at, .. } = outcome else {
        panic!("{outcome:?}");
    };
    assert!((at - now() - 7200).abs() <= 120, "opens at {at}");
    assert!(!rebooted(&w));
    assert!(
        matches!(phase(&w), Phase::Staged { .. }),
        "installed, waiting"
    );
    // A window open now: the staged slot reboots without installing again.
    w.set_config("reboot", "windows", window(-30, "2h"))
        .unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(outcome, CycleOutcome::Rebooting { .. }),
        "{outcome:?}"
    );
    assert!(rebooted(&w));
}

#[tokio::test]
async fn fleet_lock_release_only_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    w.publish("1.1.0", Vec::new()).unwrap();
    let server = &w.server;
    server
        .fleetlock()
        .configure(server_mock::FleetLockSettings {
            default_slots: 1,
            groups: Default::default(),
            ttl_ms: None,
        });
    let mut fl = toml::Table::new();
    fl.insert("url".into(), format!("{}/", server.url()).into());
    fl.insert("group".into(), "workers".into());
    w.set_config("reboot", "strategy", "fleet_lock").unwrap();
    w.set_config("reboot", "fleet_lock", toml::Value::Table(fl))
        .unwrap();
    w.set_config("daemon", "report_url", server.url_for("v1/report"))
        .unwrap();

    // Somebody else holds the only slot: install, then wait.
    server.fleetlock().pre_reboot("other", "workers").unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(&outcome, CycleOutcome::WaitingForSlot { reason, .. } if reason.contains("409")),
        "{outcome:?}"
    );
    assert!(!rebooted(&w));
    // The report went out with the node id derived from the machine id.
    let id = update_agent::fleet::node_id(&w.config().unwrap()).unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(server.reports().get(&id).unwrap().phase, "staged");

    // Slot free: taken, marker written, reboot requested.
    server.fleetlock().steady_state("other", "workers").unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(outcome, CycleOutcome::Rebooting { .. }),
        "{outcome:?}"
    );
    assert_eq!(server.fleetlock().holders("workers"), vec![id.clone()]);
    let held = HeldSlot::load(&w.state_dir).unwrap().unwrap();
    assert_eq!(
        (held.group.as_str(), held.version.as_str()),
        ("workers", "1.1.0")
    );
    // `status` shows the slot and the seed.
    let st = update_agent::ops::status::status(&w.host().unwrap()).unwrap();
    assert_eq!(st.fleetlock_held.as_ref(), Some(&held));
    assert!(st.wave_seed.is_some());
    assert!(st
        .render()
        .contains("FleetLock: holding a reboot slot in group workers"));

    // The trial boot is still undecided: the slot stays held.
    w.boot().unwrap();
    StateStore::open(&w.state_dir)
        .unwrap()
        .update(|s| {
            s.phase = Phase::Trial {
                slot: update_agent::boot::SlotId::B,
                version: "1.1.0".into(),
                boot_id: "x".into(),
            }
        })
        .unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(outcome, CycleOutcome::TrialPending { .. }),
        "{outcome:?}"
    );
    assert_eq!(server.fleetlock().holders("workers"), vec![id.clone()]);

    // The trial failed and rolled back: the slot stays held, the host reports a halt.
    let store = StateStore::open(&w.state_dir).unwrap();
    let trial = store.load().unwrap().phase;
    store
        .update(|s| {
            s.phase = Phase::RolledBack {
                reason: "health check failed".into(),
                from_version: Some("1.1.0".into()),
            }
        })
        .unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(outcome, CycleOutcome::Halted { .. }),
        "{outcome:?}"
    );
    assert_eq!(server.fleetlock().holders("workers"), vec![id.clone()]);
    store.update(|s| s.phase = trial).unwrap();

    // Committed: released, marker gone, and the host is up to date.
    update_agent::ops::commit::mark_good(&w.host().unwrap()).unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(outcome, CycleOutcome::UpToDate { .. }),
        "{outcome:?}"
    );
    assert!(server.fleetlock().holders("workers").is_empty());
    assert!(HeldSlot::load(&w.state_dir).unwrap().is_none());
}

#[tokio::test]
async fn unreachable_fleet_lock_is_an_error_and_nothing_reboots() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    w.publish("1.1.0", Vec::new()).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let mut fl = toml::Table::new();
    fl.insert("url".into(), dead.into());
    w.set_config("reboot", "strategy", "fleet_lock").unwrap();
    w.set_config("reboot", "fleet_lock", toml::Value::Table(fl))
        .unwrap();
    let e = daemon(&w).step().await.unwrap_err();
    assert_eq!(e.kind(), "fleetlock_http", "{e}");
    assert!(!rebooted(&w));
    assert!(HeldSlot::load(&w.state_dir).unwrap().is_none());
    assert!(matches!(phase(&w), Phase::Staged { .. }));
}

#[test]
fn daemon_keys_are_validated() {
    for (text, key) in [
        ("[daemon]\nwave_seed = 2048\n", "daemon.wave_seed"),
        ("[daemon]\nreport_url = \"ftp://x\"\n", "daemon.report_url"),
        ("[daemon]\nnode_id = \" \"\n", "daemon.node_id"),
        ("[daemon]\nmax_backoff = \"0s\"\n", "daemon.max_backoff"),
    ] {
        let e = Config::from_toml_str(text).unwrap_err();
        assert!(e.to_string().contains(key), "{text}: {e}");
    }
    let c = Config::from_toml_str(
        "[daemon]\nwave_seed = 7\nnode_id = \"n1\"\nmetrics_path = \"/run/m.prom\"\n\
         [reboot]\nstrategy = \"window\"\n[[reboot.windows]]\ndays = [\"Sat\"]\nstart = \"02:30\"\n\
         length = \"1h\"\ntime_zone = \"Europe/Berlin\"\n",
    )
    .unwrap();
    assert_eq!(c.daemon.wave_seed, Some(7));
    assert_eq!(update_agent::fleet::wave_seed(&c).unwrap().get(), 7);
    assert_eq!(update_agent::fleet::node_id(&c).unwrap(), "n1");
    // `config show` output loads back unchanged.
    assert_eq!(
        Config::from_toml_str(&c.to_toml_string().unwrap()).unwrap(),
        c
    );
}

/// After a rollback the daemon does not install the denylisted release again, however often
/// it polls, and says why; a newer release is installed as usual.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_never_reinstalls_a_release_it_rolled_back_from() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    w.set_config("reboot", "strategy", "immediate").unwrap();
    w.publish("1.1.0", Vec::new()).unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(outcome, CycleOutcome::Rebooting { .. }),
        "{outcome:?}"
    );
    std::fs::remove_file(dir.path().join("reboot-requested")).unwrap();
    assert_eq!(w.boot().unwrap(), Some(update_agent::boot::SlotId::B));
    w.add_check(true, "app", "echo app is down; exit 1")
        .unwrap();
    w.health_check().unwrap();
    // The failed health check asked for the reboot back into slot A.
    std::fs::remove_file(dir.path().join("reboot-requested")).unwrap();
    assert_eq!(w.boot().unwrap(), Some(update_agent::boot::SlotId::A));
    w.health_check().unwrap();

    for _ in 0..3 {
        let outcome = daemon(&w).step().await.unwrap();
        match &outcome {
            CycleOutcome::UpToDate { reason } => {
                assert!(reason.contains("denylist"), "{reason}")
            }
            other => panic!("the daemon acted on a denylisted release: {other:?}"),
        }
        assert!(!rebooted(&w));
    }
    let st = StateStore::open(&w.state_dir).unwrap().load().unwrap();
    let installs = st
        .history
        .iter()
        .filter(|e| {
            e.event == update_agent::state::HistoryEvent::InstallStarted
                && e.version.as_deref() == Some("1.1.0")
        })
        .count();
    assert_eq!(installs, 1, "1.1.0 was installed again");

    // A fixed release is not on the denylist.
    w.publish("1.1.1", Vec::new()).unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(outcome, CycleOutcome::Rebooting { .. }),
        "{outcome:?}"
    );
}

fn window_table(start_offset_min: i64, length: &str) -> toml::Value {
    let all_days = toml::Value::Array(
        ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
            .iter()
            .map(|d| toml::Value::from(*d))
            .collect(),
    );
    let start = (jiff::Timestamp::now() + jiff::SignedDuration::from_mins(start_offset_min))
        .to_zoned_datetime(jiff::tz::TimeZone::UTC);
    let mut t = toml::Table::new();
    t.insert("days".into(), all_days);
    t.insert(
        "start".into(),
        format!("{:02}:{:02}", start.hour(), start.minute()).into(),
    );
    t.insert("length".into(), length.into());
    t.insert("time_zone".into(), "UTC".into());
    toml::Value::Array(vec![toml::Value::Table(t)])
}

/// `strategy = ["window", "fleet_lock"]` (coreos/zincati#1014): reboot only inside a window
/// AND holding a slot. Outside the window no slot is asked for; inside it a refused slot
/// waits; a granted one reboots; a slot still held when the window has closed is given back.
#[tokio::test]
async fn window_and_fleet_lock_compose() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    w.publish("1.1.0", Vec::new()).unwrap();
    let server = &w.server;
    server
        .fleetlock()
        .configure(server_mock::FleetLockSettings {
            default_slots: 1,
            groups: Default::default(),
            ttl_ms: None,
        });
    let mut fl = toml::Table::new();
    fl.insert("url".into(), server.url().into());
    fl.insert("group".into(), "workers".into());
    w.set_config(
        "reboot",
        "strategy",
        toml::Value::Array(vec!["window".into(), "fleet_lock".into()]),
    )
    .unwrap();
    w.set_config("reboot", "fleet_lock", toml::Value::Table(fl))
        .unwrap();

    // Window closed, slot free: installed and waiting for the window; no slot taken.
    w.set_config("reboot", "windows", window_table(120, "1h"))
        .unwrap();
    let id = update_agent::fleet::node_id(&w.config().unwrap()).unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(outcome, CycleOutcome::WaitingForWindow { .. }),
        "{outcome:?}"
    );
    assert!(matches!(phase(&w), Phase::Staged { .. }));
    assert!(server.fleetlock().holders("workers").is_empty());
    assert!(HeldSlot::load(&w.state_dir).unwrap().is_none());
    assert!(!rebooted(&w));

    // Window open, somebody else holds the only slot: waiting for the slot.
    w.set_config("reboot", "windows", window_table(-30, "2h"))
        .unwrap();
    server.fleetlock().pre_reboot("other", "workers").unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(&outcome, CycleOutcome::WaitingForSlot { reason, .. } if reason.contains("409")),
        "{outcome:?}"
    );
    assert!(!rebooted(&w));

    // Window open, slot free: taken and rebooting.
    server.fleetlock().steady_state("other", "workers").unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(outcome, CycleOutcome::Rebooting { .. }),
        "{outcome:?}"
    );
    assert!(rebooted(&w));
    assert_eq!(server.fleetlock().holders("workers"), vec![id.clone()]);
    assert!(HeldSlot::load(&w.state_dir).unwrap().is_some());

    // The reboot did not happen and the window has closed: the slot goes back to the group
    // while this host waits for its next window.
    std::fs::remove_file(dir.path().join("reboot-requested")).unwrap();
    w.set_config("reboot", "windows", window_table(120, "1h"))
        .unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(outcome, CycleOutcome::WaitingForWindow { .. }),
        "{outcome:?}"
    );
    assert!(server.fleetlock().holders("workers").is_empty());
    assert!(HeldSlot::load(&w.state_dir).unwrap().is_none());
    assert!(!rebooted(&w));
    assert!(matches!(phase(&w), Phase::Staged { .. }));
}

#[test]
fn strategy_lists_are_validated_and_round_trip() {
    let fl = "[reboot.fleet_lock]\nurl = \"http://127.0.0.1:3333\"\n";
    let win = "[[reboot.windows]]\ndays = [\"Sat\"]\nstart = \"02:30\"\nlength = \"1h\"\n";
    for (text, needle) in [
        (
            format!("[reboot]\nstrategy = [\"window\", \"fleet_lock\"]\n{win}"),
            "reboot.fleet_lock",
        ),
        (
            format!("[reboot]\nstrategy = [\"fleet_lock\", \"window\"]\n{fl}"),
            "reboot.windows",
        ),
        ("[reboot]\nstrategy = []\n".to_string(), "reboot.strategy"),
        (
            format!("[reboot]\nstrategy = [\"immediate\", \"window\"]\n{win}"),
            "cannot be combined",
        ),
        (
            format!("[reboot]\nstrategy = [\"window\", \"window\"]\n{win}"),
            "twice",
        ),
        (
            "[reboot]\nstrategy = \"sometimes\"\n".to_string(),
            "strategy",
        ),
    ] {
        let e = Config::from_toml_str(&text).unwrap_err();
        assert!(e.to_string().contains(needle), "{text}: {e}");
    }
    use update_agent::config::RebootStrategy as S;
    let c = Config::from_toml_str(&format!(
        "[reboot]\nstrategy = [\"fleet_lock\", \"window\"]\n{fl}{win}"
    ))
    .unwrap();
    assert!(c.reboot.strategy.has(S::Window) && c.reboot.strategy.has(S::FleetLock));
    assert!(!c.reboot.strategy.has(S::Immediate));
    assert_eq!(
        c.reboot.strategy.conditions(),
        vec![S::Window, S::FleetLock]
    );
    assert_eq!(
        Config::from_toml_str(&c.to_toml_string().unwrap()).unwrap(),
        c
    );
    // A single name still reads and writes back as a plain string.
    let one = Config::from_toml_str(&format!("[reboot]\nstrategy = \"window\"\n{win}")).unwrap();
    assert_eq!(one.reboot.strategy, S::Window);
    assert!(one
        .to_toml_string()
        .unwrap()
        .contains("strategy = \"window\""));
}
