//! Issue 5: full cycles through the boot simulator with both boot backends: install, reboot,
//! `health-check` -> commit on pass; rollback on a failing required check, a hung check and
//! the drill; fallback detection when the new slot never reaches its check; wanted failures
//! are not fatal; a second run on the same boot changes nothing; the denylist holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use update_agent::boot::SlotId;
use update_agent::health::journal::{BootKind, RunOutcome};
use update_agent::health::runner::CheckSource;
use update_agent::ops;
use update_agent::ops::apply::ApplyOptions;
use update_agent::ops::drill::DrillVerdict;
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

async fn apply(
    world: &World,
    opts: &ApplyOptions,
) -> Result<SlotId, update_agent::error::AgentError> {
    let host = world.host().unwrap();
    ops::apply::apply(&host, opts, &mut |_| {})
        .await
        .map(|r| r.slot)
}

/// Publish `version`, apply it (it lands in the slot not booted), and return that slot.
async fn install(world: &mut World, version: &str) -> SlotId {
    world.publish(version, Vec::new()).unwrap();
    apply(world, &ApplyOptions::default()).await.unwrap()
}

fn state(world: &World) -> State {
    world.host().unwrap().state.load().unwrap()
}

fn next_boot(world: &World) -> Option<SlotId> {
    let host = world.host().unwrap();
    host.boot_control().unwrap().status().unwrap().next
}

fn successful(world: &World, slot: SlotId) -> bool {
    let host = world.host().unwrap();
    let st = host.boot_control().unwrap().status().unwrap();
    st.slots.iter().any(|s| s.slot == slot && s.successful)
}

/// Everything a second run could disturb: the state record, the boot flags, the journal.
fn snapshot(world: &World) -> (Vec<u8>, String, Vec<u8>) {
    let flags = format!(
        "{:?}",
        world
            .host()
            .unwrap()
            .boot_control()
            .unwrap()
            .status()
            .unwrap()
    );
    let flags_bytes = match world.backend {
        Backend::Gptprio | Backend::Bls | Backend::Uboot | Backend::Efi => flags,
        Backend::Grubenv => String::from_utf8_lossy(&std::fs::read(&world.grubenv).unwrap()).into(),
    };
    (
        std::fs::read(world.state_dir.join("state.json")).unwrap(),
        flags_bytes,
        std::fs::read(world.state_dir.join("health.json")).unwrap(),
    )
}

async fn pass_commits(backend: Backend) {
    let (_d, mut world) = world(backend).await;
    let marker = world.dir.join("check-ran");
    world
        .add_check(
            true,
            "10-env",
            &format!(
                "echo \"$UPDATE_AGENT_SLOT $UPDATE_AGENT_VERSION\" > {:?}",
                marker
            ),
        )
        .unwrap();
    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));

    let report = world.health_check().unwrap();
    assert_eq!(report.kind, BootKind::Trial);
    assert_eq!(report.outcome, RunOutcome::Committed);
    assert!(report.healthy());
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "B 2.0.0\n");
    assert!(successful(&world, SlotId::B));
    let s = state(&world);
    assert_eq!(
        s.phase,
        Phase::Committed {
            slot: SlotId::B,
            version: "2.0.0".into()
        }
    );
    let last = s.history.last().unwrap();
    assert_eq!(last.event, HistoryEvent::Committed);
    assert_eq!(last.version.as_deref(), Some("2.0.0"));

    // Same boot again: the verdict is reported, nothing is written.
    let before = snapshot(&world);
    let again = world.health_check().unwrap();
    assert!(again.already_recorded);
    assert_eq!(again.outcome, RunOutcome::Committed);
    assert_eq!(snapshot(&world), before);

    // Later boots are normal: B keeps booting and is confirmed.
    for _ in 0..2 {
        assert_eq!(world.boot().unwrap(), Some(SlotId::B));
        let r = world.health_check().unwrap();
        assert_eq!(
            (r.kind, r.outcome),
            (BootKind::Normal, RunOutcome::Confirmed)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pass_commits_gptprio() {
    pass_commits(Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pass_commits_grubenv() {
    pass_commits(Backend::Grubenv).await;
}

async fn failing_required_rolls_back(backend: Backend) {
    let (_d, mut world) = world(backend).await;
    world.add_check(true, "10-ok", "exit 0").unwrap();
    world
        .add_check(
            true,
            "50-db",
            "echo connecting to db; echo db not reachable >&2; exit 3",
        )
        .unwrap();
    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));

    let report = world.health_check().unwrap();
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    assert!(!report.healthy());
    assert_eq!(report.rolled_back_to, Some(SlotId::A));
    assert_eq!(report.denylisted.as_deref(), Some("2.0.0"));
    assert!(
        report.rebooting,
        "[health] reboot_on_failure defaults to true"
    );
    let failed = report.checks.iter().find(|c| !c.passed).unwrap();
    assert_eq!(failed.name, "required.d/50-db");
    assert_eq!(failed.status, "exit status 3");
    assert!(
        failed.output_tail.contains("db not reachable"),
        "{failed:?}"
    );
    assert_eq!(next_boot(&world), Some(SlotId::A));

    let s = state(&world);
    assert!(s.is_denied("2.0.0"));
    let last = s.history.last().unwrap();
    assert_eq!(last.event, HistoryEvent::RolledBack);
    let reason = last.reason.as_deref().unwrap();
    assert!(
        reason.contains("required.d/50-db") && reason.contains("db not reachable"),
        "{reason}"
    );
    assert!(
        matches!(s.phase, Phase::RolledBack { ref from_version, .. } if from_version.as_deref() == Some("2.0.0"))
    );

    // A second run before the reboot lands changes nothing (and never re-commits B).
    let before = snapshot(&world);
    let again = world.health_check().unwrap();
    assert!(again.already_recorded);
    assert_eq!(again.outcome, RunOutcome::RolledBack);
    assert_eq!(snapshot(&world), before);

    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
    let r = world.health_check().unwrap();
    assert_eq!(
        (r.kind, r.outcome),
        (BootKind::Normal, RunOutcome::Confirmed)
    );
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
    // Every boot is confirmed before an install (with grubenv, staging over a running slot
    // whose attempt is still counted is refused: a failed trial would end in rescue).
    world.health_check().unwrap();

    // The denylisted version is not installed again unless forced.
    let err = apply(&world, &ApplyOptions::default()).await.unwrap_err();
    assert!(err.to_string().contains("2.0.0"), "{err}");
    assert!(err.kind().contains("denylist"), "{}", err.kind());
    let forced = ApplyOptions {
        allow_denylisted: true,
        ..ApplyOptions::default()
    };
    assert_eq!(apply(&world, &forced).await.unwrap(), SlotId::B);
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_required_check_rolls_back_gptprio() {
    failing_required_rolls_back(Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_required_check_rolls_back_grubenv() {
    failing_required_rolls_back(Backend::Grubenv).await;
}

fn pid_gone(pid: i32) -> bool {
    // Gone, or a zombie waiting for init to reap it: either way it no longer runs.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn hung_check_times_out(backend: Backend) {
    let (_d, mut world) = world(backend).await;
    world.set_config("health", "check_timeout", "1s").unwrap();
    let pidfile = world.dir.join("bg.pid");
    // The check leaves a background child too: the whole process group must die.
    world
        .add_check(
            true,
            "20-hang",
            &format!("sleep 30 & echo $! > {pidfile:?}; echo waiting for the app; sleep 30"),
        )
        .unwrap();
    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));

    let started = Instant::now();
    let report = world.health_check().unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1) + Duration::from_secs(4),
        "health-check took {took:?} with a 1s check timeout"
    );
    assert!(
        took >= Duration::from_secs(1),
        "returned before the timeout: {took:?}"
    );
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    let hung = &report.checks[0];
    assert!(hung.timed_out && !hung.passed, "{hung:?}");
    assert!(hung.status.contains("timeout of 1s"), "{}", hung.status);
    assert!(hung.output_tail.contains("waiting for the app"));
    let bg: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid_gone(bg), "the check's background child {bg} survived");
    assert_eq!(next_boot(&world), Some(SlotId::A));
    assert!(state(&world).is_denied("2.0.0"));
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_check_times_out_and_rolls_back_gptprio() {
    hung_check_times_out(Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_check_times_out_and_rolls_back_grubenv() {
    hung_check_times_out(Backend::Grubenv).await;
}

async fn drill_cycle(backend: Backend) {
    let (_d, mut world) = world(backend).await;
    world.add_check(true, "10-ok", "exit 0").unwrap();
    let host = world.host().unwrap();
    assert_eq!(
        ops::drill::report(&host).unwrap().verdict,
        DrillVerdict::NotRun
    );
    ops::drill::arm(&host).unwrap();
    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));

    let report = world.health_check().unwrap();
    assert!(report.drill);
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    let drill = report
        .checks
        .iter()
        .find(|c| c.source == CheckSource::Drill)
        .unwrap();
    assert!(!drill.passed);
    // The drill tests the mechanism, not the release: 2.0.0 stays installable.
    assert!(!state(&world).is_denied("2.0.0"));
    assert!(
        !world.state_dir.join("drill.armed").exists(),
        "the drill fires once"
    );
    let mid = ops::drill::report(&host).unwrap();
    assert_eq!(mid.verdict, DrillVerdict::InProgress, "{}", mid.render());

    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
    world.health_check().unwrap();
    let done = ops::drill::report(&host).unwrap();
    assert_eq!(done.verdict, DrillVerdict::Pass, "{}", done.render());
    let steps: Vec<&str> = done.steps.iter().map(|s| s.step).collect();
    // The sandbox's boots record their kernels' start: every step, in order.
    assert_eq!(steps, ops::drill::STEPS);
    assert!(done.steps[1..]
        .iter()
        .all(|s| s.since_previous_ms.unwrap() >= 0));
    assert!(done.rollback_ms.unwrap() >= 0);

    // Once: the same release's next trial passes and is committed.
    assert_eq!(
        apply(&world, &ApplyOptions::default()).await.unwrap(),
        SlotId::B
    );
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let r = world.health_check().unwrap();
    assert_eq!(r.outcome, RunOutcome::Committed);
    assert!(!r.drill);
}

#[tokio::test(flavor = "multi_thread")]
async fn drill_rolls_back_once_and_reports_pass_gptprio() {
    drill_cycle(Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drill_rolls_back_once_and_reports_pass_grubenv() {
    drill_cycle(Backend::Grubenv).await;
}

async fn fallback_detected(backend: Backend) {
    let (_d, mut world) = world(backend).await;
    if backend == Backend::Uboot {
        // The sandbox's U-Boot world gives 3 attempts; this cycle spends one.
        world.set_config("boot", "tries", 1).unwrap();
    }
    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    // The new slot boots but hangs before its health check; the watchdog reboots, tries are
    // spent, the loader falls back.
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));

    let report = world.health_check().unwrap();
    assert_eq!(report.kind, BootKind::Fallback);
    assert_eq!(report.outcome, RunOutcome::FallbackDetected);
    assert!(report.healthy(), "the old slot itself is fine");
    assert_eq!(report.denylisted.as_deref(), Some("2.0.0"));
    let s = state(&world);
    assert!(s.is_denied("2.0.0"));
    match &s.phase {
        Phase::RolledBack {
            reason,
            from_version,
        } => {
            assert!(reason.contains("new slot failed to boot"), "{reason}");
            assert_eq!(from_version.as_deref(), Some("2.0.0"));
        }
        other => panic!("phase {other:?}"),
    }
    let last = s.history.last().unwrap();
    assert_eq!(
        (last.event, last.slot),
        (HistoryEvent::RolledBack, Some(SlotId::B))
    );
    // status reports it.
    let status = ops::status::status(&world.host().unwrap()).unwrap();
    assert!(status.render().contains("new slot failed to boot"));
    assert_eq!(status.denylist, vec!["2.0.0".to_string()]);

    // The old slot keeps booting (GRUB's attempt counter was reset too).
    assert_eq!(next_boot(&world), Some(SlotId::A));
    for _ in 0..2 {
        assert_eq!(world.boot().unwrap(), Some(SlotId::A));
        assert_eq!(world.health_check().unwrap().kind, BootKind::Normal);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_is_detected_when_the_new_slot_never_checks_in_gptprio() {
    fallback_detected(Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_is_detected_when_the_new_slot_never_checks_in_grubenv() {
    fallback_detected(Backend::Grubenv).await;
}

async fn wanted_failure_is_not_fatal(backend: Backend) {
    let (_d, mut world) = world(backend).await;
    world.add_check(true, "10-ok", "exit 0").unwrap();
    world
        .add_check(false, "10-metrics", "echo exporter down; exit 1")
        .unwrap();
    // Not executable: a wanted one is logged, not fatal either.
    std::fs::write(world.wanted_d.join("20-noexec"), "#!/bin/sh\nexit 0\n").unwrap();
    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let report = world.health_check().unwrap();
    assert_eq!(report.outcome, RunOutcome::Committed);
    let wanted: Vec<_> = report.checks.iter().filter(|c| !c.required).collect();
    assert_eq!(wanted.len(), 2);
    assert!(wanted.iter().all(|c| !c.passed));
    assert!(wanted[1].output_tail.contains("not executable"));
    let reason = state(&world)
        .history
        .last()
        .unwrap()
        .reason
        .clone()
        .unwrap();
    assert!(reason.contains("wanted.d/10-metrics"), "{reason}");
    assert!(successful(&world, SlotId::B));
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
}

#[tokio::test(flavor = "multi_thread")]
async fn wanted_failure_does_not_roll_back_gptprio() {
    wanted_failure_is_not_fatal(Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wanted_failure_does_not_roll_back_grubenv() {
    wanted_failure_is_not_fatal(Backend::Grubenv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_required_file_that_is_not_executable_fails_the_boot() {
    let (_d, mut world) = world(Backend::Gptprio).await;
    std::fs::write(
        world.required_d.join("30-forgot-chmod"),
        "#!/bin/sh\nexit 0\n",
    )
    .unwrap();
    install(&mut world, "2.0.0").await;
    world.boot().unwrap();
    let report = world.health_check().unwrap();
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    assert!(report.reason.unwrap().contains("not executable"));
}

#[tokio::test(flavor = "multi_thread")]
async fn total_timeout_bounds_all_checks() {
    let (_d, mut world) = world(Backend::Gptprio).await;
    world.set_config("health", "check_timeout", "10s").unwrap();
    world.set_config("health", "total_timeout", "1s").unwrap();
    world.add_check(true, "10-slow", "sleep 30").unwrap();
    world.add_check(true, "20-never", "exit 0").unwrap();
    install(&mut world, "2.0.0").await;
    world.boot().unwrap();
    let started = Instant::now();
    let report = world.health_check().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    assert!(report.checks[0].timed_out);
}

#[tokio::test(flavor = "multi_thread")]
async fn normal_boot_only_confirms_and_writes_no_history() {
    let (_d, world) = world(Backend::Grubenv).await;
    world.add_check(true, "10-would-fail", "exit 1").unwrap();
    let history_before = state(&world).history.len();
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
    assert!(!successful(&world, SlotId::A), "GRUB counted the attempt");
    let r = world.health_check().unwrap();
    assert_eq!(
        (r.kind, r.outcome),
        (BootKind::Normal, RunOutcome::Confirmed)
    );
    assert!(r.checks.is_empty(), "no checks on a normal boot");
    assert!(successful(&world, SlotId::A), "attempt counter reset");
    assert_eq!(state(&world).history.len(), history_before);
}

async fn trial_known_only_to_the_flags(backend: Backend) {
    let (_d, mut world) = world(backend).await;
    world
        .add_check(true, "10-fails", "echo nope; exit 1")
        .unwrap();
    install(&mut world, "2.0.0").await;
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    // The record forgot the stage (restored from a backup, an older agent...).
    let host = world.host().unwrap();
    host.state.update(|s| s.phase = Phase::Idle).unwrap();
    let report = world.health_check().unwrap();
    assert_eq!(
        report.kind,
        BootKind::Trial,
        "a trial is never confirmed unchecked"
    );
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trial_the_record_forgot_is_still_checked_gptprio() {
    trial_known_only_to_the_flags(Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trial_the_record_forgot_is_still_checked_grubenv() {
    trial_known_only_to_the_flags(Backend::Grubenv).await;
}

async fn fallback_after_several_tries(backend: Backend) {
    let (_d, mut world) = world(backend).await;
    world.set_config("boot", "tries", 3).unwrap();
    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    // Three attempts on B that never reach the health check, then the loader gives up.
    for _ in 0..3 {
        assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    }
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
    let report = world.health_check().unwrap();
    assert_eq!(
        (report.kind, report.outcome),
        (BootKind::Fallback, RunOutcome::FallbackDetected)
    );
    assert_eq!(next_boot(&world), Some(SlotId::A));
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_after_three_tries_gptprio() {
    fallback_after_several_tries(Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_after_three_tries_grubenv() {
    fallback_after_several_tries(Backend::Grubenv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_trial_boot_after_a_crash_runs_the_checks_again() {
    let (_d, mut world) = world(Backend::Gptprio).await;
    world.set_config("boot", "tries", 2).unwrap();
    world.add_check(true, "10-ok", "exit 0").unwrap();
    install(&mut world, "2.0.0").await;
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    // The first trial boot dies while its checks run: phase Trial with that boot's id.
    let host = world.host().unwrap();
    let first_boot = std::fs::read_to_string(&world.boot_id)
        .unwrap()
        .trim()
        .to_string();
    host.state
        .update(|s| {
            s.phase = Phase::Trial {
                slot: SlotId::B,
                version: "2.0.0".into(),
                boot_id: first_boot.clone(),
            }
        })
        .unwrap();
    // The loader gives B its second try; this boot's check runs and commits.
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let report = world.health_check().unwrap();
    assert_eq!(
        (report.kind, report.outcome),
        (BootKind::Trial, RunOutcome::Committed)
    );
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
}

// The same cycles with the bls backend (systemd-boot boot counting, simulated by sim_bls).

#[tokio::test(flavor = "multi_thread")]
async fn pass_commits_bls() {
    pass_commits(Backend::Bls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_required_check_rolls_back_bls() {
    failing_required_rolls_back(Backend::Bls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drill_rolls_back_once_and_reports_pass_bls() {
    drill_cycle(Backend::Bls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_is_detected_when_the_new_slot_never_checks_in_bls() {
    fallback_detected(Backend::Bls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trial_the_record_forgot_is_still_checked_bls() {
    trial_known_only_to_the_flags(Backend::Bls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_after_three_tries_bls() {
    fallback_after_several_tries(Backend::Bls).await;
}

/// Issue 14 item 9: `health-check --no-commit` only records a passed trial; `commit` (run
/// after boot-complete.target) commits it, refuses when no passed check is recorded for the
/// boot, and reports an already judged boot without changing it.
async fn no_commit_then_commit(backend: Backend) {
    let (_d, mut world) = world(backend).await;
    world.add_check(true, "10-ok", "exit 0").unwrap();
    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let host = world.host().unwrap();
    let opts = world.health_options();

    // Before the health check ran on this boot: refused, nothing committed.
    let err = ops::health::commit_passed(&host, &opts).unwrap_err();
    assert_eq!(err.kind(), "health_not_passed");
    assert!(!successful(&world, SlotId::B));

    let report = ops::health::health_check_no_commit(&host, &opts).unwrap();
    assert_eq!(report.outcome, RunOutcome::Passed);
    assert!(report.healthy());
    assert!(
        !successful(&world, SlotId::B),
        "--no-commit committed the trial"
    );

    let committed = ops::health::commit_passed(&host, &opts).unwrap();
    assert_eq!(committed.outcome, RunOutcome::Committed);
    assert!(!committed.already_recorded);
    assert!(successful(&world, SlotId::B));
    let last = state(&world).history.last().cloned().unwrap();
    assert_eq!(last.event, HistoryEvent::Committed);
    assert!(last
        .reason
        .unwrap()
        .contains("committed after boot-complete.target"));

    // Again on the same boot: reported, nothing written.
    let before = snapshot(&world);
    let again = ops::health::commit_passed(&host, &opts).unwrap();
    assert!(again.already_recorded);
    assert_eq!(snapshot(&world), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_commit_then_commit_gptprio() {
    no_commit_then_commit(Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_commit_then_commit_grubenv() {
    no_commit_then_commit(Backend::Grubenv).await;
}

/// A failed trial under `--no-commit` rolls back as before, and `commit` refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn commit_refuses_a_failed_trial() {
    let (_d, mut world) = world(Backend::Grubenv).await;
    world.add_check(true, "10-bad", "exit 1").unwrap();
    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let host = world.host().unwrap();
    let opts = world.health_options();
    let report = ops::health::health_check_no_commit(&host, &opts).unwrap();
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    let before = snapshot(&world);
    let err = ops::health::commit_passed(&host, &opts).unwrap_err();
    assert_eq!(err.kind(), "health_not_passed");
    assert_eq!(snapshot(&world), before);
}

/// Issue 11: a committed slot that boots once without reaching its health check (power lost
/// mid-boot) spends its GRUB attempt, and the loader falls back to the older slot. The agent
/// says so (phase, history, status), confirms the slot that runs, does not denylist the newer
/// release, and the next install brings it back through a trial boot (docs/health.md).
#[tokio::test(flavor = "multi_thread")]
async fn a_committed_slot_that_falls_back_is_reported_not_confirmed_silently_grubenv() {
    let (_d, mut world) = world(Backend::Grubenv).await;
    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_eq!(world.health_check().unwrap().outcome, RunOutcome::Committed);
    // One boot of B dies before userspace; the next boot is A.
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));

    let report = world.health_check().unwrap();
    assert_eq!(report.kind, BootKind::Fallback);
    assert_eq!(report.outcome, RunOutcome::FallbackDetected);
    assert!(report.healthy(), "the older slot itself is fine");
    assert_eq!(report.denylisted, None);
    let s = state(&world);
    assert!(
        !s.is_denied("2.0.0"),
        "a release that passed its trial is not denylisted"
    );
    match &s.phase {
        Phase::RolledBack {
            reason,
            from_version,
        } => {
            assert!(
                reason.contains("committed slot B (2.0.0) fell back to slot A"),
                "{reason}"
            );
            assert_eq!(from_version.as_deref(), Some("2.0.0"));
        }
        other => panic!("phase {other:?}"),
    }
    let last = s.history.last().unwrap();
    assert_eq!(
        (last.event, last.slot, last.version.as_deref()),
        (HistoryEvent::RolledBack, Some(SlotId::B), Some("2.0.0"))
    );
    let status = ops::status::status(&world.host().unwrap()).unwrap();
    assert!(
        status.render().contains("committed slot B"),
        "{}",
        status.render()
    );
    // A is confirmed and keeps booting; a second run on the same boot changes nothing.
    assert_eq!(next_boot(&world), Some(SlotId::A));
    let before = snapshot(&world);
    assert!(world.health_check().unwrap().already_recorded);
    assert_eq!(snapshot(&world), before);
    // Policy: the release installs again (not refused as denylisted) and earns its commit
    // through a trial boot.
    assert_eq!(
        apply(&world, &ApplyOptions::default()).await.unwrap(),
        SlotId::B
    );
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_eq!(world.health_check().unwrap().outcome, RunOutcome::Committed);
}

// The same cycles with the uboot backend (RAUC's U-Boot variables, simulated by sim_uboot).

#[tokio::test(flavor = "multi_thread")]
async fn pass_commits_uboot() {
    pass_commits(Backend::Uboot).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_required_check_rolls_back_uboot() {
    failing_required_rolls_back(Backend::Uboot).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drill_rolls_back_once_and_reports_pass_uboot() {
    drill_cycle(Backend::Uboot).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_is_detected_when_the_new_slot_never_checks_in_uboot() {
    fallback_detected(Backend::Uboot).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trial_the_record_forgot_is_still_checked_uboot() {
    trial_known_only_to_the_flags(Backend::Uboot).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_after_three_tries_uboot() {
    fallback_after_several_tries(Backend::Uboot).await;
}

// The same cycles with the efi backend (BootNext/BootOrder, simulated by sim_efi).

#[tokio::test(flavor = "multi_thread")]
async fn pass_commits_efi() {
    pass_commits(Backend::Efi).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_required_check_rolls_back_efi() {
    failing_required_rolls_back(Backend::Efi).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drill_rolls_back_once_and_reports_pass_efi() {
    drill_cycle(Backend::Efi).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_is_detected_when_the_new_slot_never_checks_in_efi() {
    fallback_detected(Backend::Efi).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trial_the_record_forgot_is_still_checked_efi() {
    trial_known_only_to_the_flags(Backend::Efi).await;
}

/// RAUC's U-Boot script counts every boot of every slot: a committed slot keeps booting
/// for many more boots than it has attempts, because each normal boot's health check gives
/// them back (the defect: "already marked good" left the counter spent, and the host fell
/// back to the old slot after `tries` reboots).
#[tokio::test(flavor = "multi_thread")]
async fn a_committed_uboot_slot_keeps_booting_past_its_tries() {
    let (_d, mut world) = world(Backend::Uboot).await;
    world.set_config("boot", "tries", 2).unwrap();
    assert_eq!(install(&mut world, "2.0.0").await, SlotId::B);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_eq!(world.health_check().unwrap().outcome, RunOutcome::Committed);
    for n in 0..6 {
        assert_eq!(world.boot().unwrap(), Some(SlotId::B), "normal boot {n}");
        let r = world.health_check().unwrap();
        assert_eq!(
            (r.kind, r.outcome),
            (BootKind::Normal, RunOutcome::Confirmed),
            "normal boot {n}"
        );
        let host = world.host().unwrap();
        let st = host.boot_control().unwrap().status().unwrap();
        let b = st.slots.iter().find(|s| s.slot == SlotId::B).unwrap();
        assert_eq!(b.tries, 2, "normal boot {n}: BOOT_B_LEFT restored");
    }
}
