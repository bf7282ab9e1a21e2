//! Issue 5: the operator's commands (rollback, cancel, mark-good, history, drill) and the
//! health-check binary: refusals are clear and change nothing, a crash mid-check is visible
//! and the next run finishes the job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use update_agent::boot::SlotId;
use update_agent::health::journal::{BootKind, RunOutcome};
use update_agent::ops;
use update_agent::ops::apply::ApplyOptions;
use update_agent::state::{HistoryEvent, Phase, State};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

async fn world(backend: Backend) -> (tempfile::TempDir, World) {
    let dir = tempfile::tempdir().unwrap();
    let world = World::create(dir.path(), Preset::Flatcar, backend, 8)
        .await
        .unwrap();
    (dir, world)
}

async fn install(world: &mut World, version: &str) -> SlotId {
    world.publish(version, Vec::new()).unwrap();
    let host = world.host().unwrap();
    ops::apply::apply(&host, &ApplyOptions::default(), &mut |_| {})
        .await
        .unwrap()
        .slot
}

fn state(world: &World) -> State {
    world.host().unwrap().state.load().unwrap()
}

fn flags(world: &World) -> String {
    format!(
        "{:?}",
        world
            .host()
            .unwrap()
            .boot_control()
            .unwrap()
            .status()
            .unwrap()
    )
}

fn next_boot(world: &World) -> Option<SlotId> {
    let host = world.host().unwrap();
    host.boot_control().unwrap().status().unwrap().next
}

fn cli(world: &World, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&world.config_path)
        .args(args)
        .env("UPDATE_AGENT_BOOT_ID_PATH", &world.boot_id)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_refuses_a_slot_without_a_verified_image() {
    for backend in [Backend::Gptprio, Backend::Grubenv] {
        let (_d, world) = world(backend).await;
        let before = (flags(&world), state(&world));
        let err = ops::rollback::rollback(&world.host().unwrap(), false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("slot B") && msg.contains("verified image"),
            "{msg}"
        );
        assert_eq!(err.kind(), "rollback_target_unverified");
        assert_eq!((flags(&world), state(&world)), before, "nothing changed");
        // The CLI says the same and exits non-zero.
        let out = cli(&world, &["rollback"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("verified image"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_to_a_staged_slot_points_to_cancel() {
    let (_d, mut world) = world(Backend::Gptprio).await;
    install(&mut world, "2.0.0").await;
    let before = flags(&world);
    let err = ops::rollback::rollback(&world.host().unwrap(), false).unwrap_err();
    assert!(err.to_string().contains("update-agent cancel"), "{err}");
    assert_eq!(flags(&world), before);
}

async fn cancel_before_reboot(backend: Backend) {
    let (_d, mut world) = world(backend).await;
    let host = world.host().unwrap();
    let err = ops::cancel::cancel(&host).unwrap_err();
    assert!(err.to_string().contains("nothing is staged"), "{err}");

    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    assert_eq!(next_boot(&world), Some(SlotId::B));
    let report = ops::cancel::cancel(&host).unwrap();
    assert_eq!((report.slot, report.next), (SlotId::B, Some(SlotId::A)));
    let s = state(&world);
    assert_eq!(s.phase, Phase::Idle);
    assert_eq!(s.history.last().unwrap().event, HistoryEvent::Cancelled);
    assert!(
        !s.is_denied("2.0.0"),
        "a cancel is no verdict on the release"
    );
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
    assert_eq!(world.health_check().unwrap().kind, BootKind::Normal);
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_unstages_before_the_reboot_gptprio() {
    cancel_before_reboot(Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_unstages_before_the_reboot_grubenv() {
    cancel_before_reboot(Backend::Grubenv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_refuses_during_the_trial_boot() {
    let (_d, mut world) = world(Backend::Grubenv).await;
    install(&mut world, "2.0.0").await;
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let before = flags(&world);
    let err = ops::cancel::cancel(&world.host().unwrap()).unwrap_err();
    assert!(err.to_string().contains("trial boot"), "{err}");
    assert_eq!(flags(&world), before);
}

async fn manual_rollback_after_commit(backend: Backend) {
    let (_d, mut world) = world(backend).await;
    install(&mut world, "2.0.0").await;
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_eq!(world.health_check().unwrap().outcome, RunOutcome::Committed);

    let out = cli(&world, &["rollback", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["to"], "A");
    assert_eq!(report["from_version"], "2.0.0");
    assert_eq!(report["denylisted"], "2.0.0");
    assert_eq!(next_boot(&world), Some(SlotId::A));
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
    assert_eq!(world.health_check().unwrap().kind, BootKind::Normal);
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));

    let out = cli(&world, &["history", "--json"]);
    assert!(out.status.success());
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let events: Vec<&str> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "committed",
            "install_started",
            "staged",
            "committed",
            "rolled_back"
        ]
    );
    let last = &h["entries"][4];
    assert!(last["reason"].as_str().unwrap().contains("manual rollback"));
    assert!(last["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(h["denylist"][0]["version"], "2.0.0");
    let text = String::from_utf8_lossy(&cli(&world, &["history"]).stdout).to_string();
    assert!(
        text.contains("rolled_back") && text.contains("denylisted:"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn manual_rollback_after_commit_gptprio() {
    manual_rollback_after_commit(Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn manual_rollback_after_commit_grubenv() {
    manual_rollback_after_commit(Backend::Grubenv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mark_good_during_the_trial_then_health_check_only_confirms() {
    let (_d, mut world) = world(Backend::Gptprio).await;
    world.add_check(true, "10-fails", "exit 1").unwrap();
    install(&mut world, "2.0.0").await;
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let out = cli(&world, &["mark-good"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("slot B (2.0.0) marked good"));
    let r = world.health_check().unwrap();
    assert_eq!(
        (r.kind, r.outcome),
        (BootKind::Normal, RunOutcome::Confirmed)
    );
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_health_check_exit_status_follows_the_verdict() {
    let (_d, mut world) = world(Backend::Gptprio).await;
    world
        .add_check(true, "10-fails", "echo broken; exit 1")
        .unwrap();
    install(&mut world, "2.0.0").await;
    world.boot().unwrap();
    let out = cli(&world, &["health-check"]);
    assert_eq!(out.status.code(), Some(1), "a failed trial fails the unit");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAILED") && text.contains("broken"), "{text}");
    // Same boot again: the same verdict, still failing, nothing redone.
    let again = cli(&world, &["health-check"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stdout).contains("already ran on this boot"));
    // The next boot (slot A) is healthy.
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
    let ok = cli(&world, &["health-check"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_mid_check_is_visible_and_the_next_run_finishes() {
    let (_d, mut world) = world(Backend::Grubenv).await;
    let pidfile = world.dir.join("check.pid");
    let gate = world.dir.join("app-ready");
    world
        .add_check(
            true,
            "10-app",
            &format!("echo $$ > {pidfile:?}; while [ ! -e {gate:?} ]; do sleep 0.05; done"),
        )
        .unwrap();
    install(&mut world, "2.0.0").await;
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));

    let mut agent = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&world.config_path)
        .arg("health-check")
        .env("UPDATE_AGENT_BOOT_ID_PATH", &world.boot_id)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
        assert!(Instant::now() < deadline, "the check never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The agent dies mid-check (OOM kill, power cut of the process...).
    agent.kill().unwrap();
    agent.wait().unwrap();
    let check_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(check_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    match state(&world).phase {
        Phase::Trial { slot, boot_id, .. } => {
            assert_eq!(slot, SlotId::B);
            assert_eq!(
                boot_id,
                std::fs::read_to_string(&world.boot_id).unwrap().trim()
            );
        }
        other => panic!("phase {other:?}: the interrupted trial is not visible"),
    }
    let status = ops::status::status(&world.host().unwrap()).unwrap();
    // `status` says it in words (ops::status::phase_text), not as the record's JSON tag.
    assert!(
        status
            .render()
            .contains("trial boot of 2.0.0 in slot B: health check pending"),
        "{}",
        status.render()
    );

    std::fs::write(&gate, "").unwrap();
    let report = world.health_check().unwrap();
    assert!(!report.already_recorded);
    assert_eq!(report.outcome, RunOutcome::Committed);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
}

#[tokio::test(flavor = "multi_thread")]
async fn drill_cli_arm_report_disarm() {
    let (_d, mut world) = world(Backend::Gptprio).await;
    let out = cli(&world, &["drill", "report"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT RUN"));
    let out = cli(&world, &["drill", "arm"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("armed"));
    let out = cli(&world, &["drill", "disarm", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["disarmed"], true);

    // Armed after staging: it still fires on that trial.
    install(&mut world, "2.0.0").await;
    let out = cli(&world, &["drill", "arm"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("2.0.0 is staged in slot B"));
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let out = cli(&world, &["health-check"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
    assert!(cli(&world, &["health-check"]).status.success());
    let out = cli(&world, &["drill", "report"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for step in [
        "armed",
        "staged",
        "rebooted",
        "check failed",
        "flag flipped",
        "booted old slot",
    ] {
        assert!(text.contains(step), "{step} missing:\n{text}");
    }
    assert!(text.contains("drill verdict: PASS"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_journal_is_set_aside_and_the_boot_is_still_judged() {
    let (_d, mut world) = world(Backend::Gptprio).await;
    install(&mut world, "2.0.0").await;
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let journal = world.state_dir.join("health.json");
    std::fs::write(&journal, "{ not json").unwrap();
    let report = world.health_check().unwrap();
    assert_eq!(report.outcome, RunOutcome::Committed);
    let aside: Vec<_> = std::fs::read_dir(&world.state_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("health.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), "{ not json");
    // The drill report only reads: a corrupt journal there is an error naming the file.
    std::fs::write(&journal, "{ not json").unwrap();
    let err = ops::drill::report(&world.host().unwrap()).unwrap_err();
    assert!(err.to_string().contains("health.json"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_drill_marker_still_fires_the_drill() {
    let (_d, mut world) = world(Backend::Gptprio).await;
    std::fs::write(world.state_dir.join("drill.armed"), "garbage").unwrap();
    install(&mut world, "2.0.0").await;
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let report = world.health_check().unwrap();
    assert!(report.drill);
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    assert!(!world.state_dir.join("drill.armed").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_with_reboot_runs_the_reboot_command() {
    let (_d, mut world) = world(Backend::Gptprio).await;
    let marker = world.dir.join("rebooted");
    world
        .set_config(
            "reboot",
            "command",
            vec!["touch".to_string(), marker.display().to_string()],
        )
        .unwrap();
    install(&mut world, "2.0.0").await;
    world.boot().unwrap();
    world.health_check().unwrap();
    assert!(!marker.exists(), "a passing trial does not reboot");
    let report = ops::rollback::rollback(&world.host().unwrap(), true).unwrap();
    assert!(report.rebooting);
    assert!(marker.exists(), "the [reboot] command ran");
    assert!(report.render().contains("rebooting"));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_manual_rollback_the_left_slot_is_not_judged_again() {
    for backend in [Backend::Gptprio, Backend::Grubenv] {
        let (_d, mut world) = world(backend).await;
        world.add_check(true, "10-ok", "exit 0").unwrap();
        install(&mut world, "2.0.0").await;
        assert_eq!(world.boot().unwrap(), Some(SlotId::B));
        // The operator rolls back before the health unit ran on this boot.
        ops::rollback::rollback(&world.host().unwrap(), false).unwrap();
        let before = flags(&world);
        let r = world.health_check().unwrap();
        assert_eq!(r.kind, BootKind::Normal, "{}", r.render());
        assert!(r.reason.unwrap().contains("not confirmed"));
        assert_eq!(flags(&world), before, "slot B was not committed again");
        assert_eq!(world.boot().unwrap(), Some(SlotId::A));
    }
}
