//! An `apply` that fails while another release is staged (or on its trial boot) must not
//! erase what the state record knows about it: the next boot of the staged slot is still its
//! trial, health-checked and rolled back on failure, never confirmed unchecked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e_tests::{apply_default, assert_slot_holds, snapshot, state, world};
use server_mock::{Fault, FaultRule};
use update_agent::boot::SlotId;
use update_agent::health::journal::RunOutcome;
use update_agent::state::{HistoryEvent, Phase};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, Release, World};

/// 2.0.0 applied and staged in slot B; the host still runs A.
async fn staged(backend: Backend) -> (tempfile::TempDir, World, Release) {
    let (dir, mut world) = world(Preset::Flatcar, backend, 8).await;
    let release = world.publish("2.0.0", Vec::new()).unwrap();
    apply_default(&world).await.unwrap();
    (dir, world, release)
}

fn assert_still_staged(world: &World, kind: &str) {
    let st = state(world);
    assert_eq!(
        st.phase,
        Phase::Staged {
            slot: SlotId::B,
            version: "2.0.0".into()
        },
        "a failure that changed nothing must not overwrite the staged phase"
    );
    let last = st.history.last().unwrap();
    assert_eq!(last.event, HistoryEvent::Failed, "{last:?}");
    assert_eq!(last.error_kind.as_deref(), Some(kind), "{last:?}");
    assert!(
        st.slots.contains_key(&SlotId::A),
        "slot A's record (the rollback target) is kept"
    );
}

/// Reboot into B, whose required health check fails: the trial must be rolled back to A.
fn trial_fails_and_rolls_back(world: &World, a_before: &e2e_tests::SlotSnapshot) {
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    world
        .add_check(true, "web", "echo web is down; exit 1")
        .unwrap();
    let report = world.health_check().unwrap();
    assert_eq!(
        report.outcome,
        RunOutcome::RolledBack,
        "the trial boot of B was not health-checked: {report:?}"
    );
    assert_eq!(report.rolled_back_to, Some(SlotId::A));
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
    assert_eq!(snapshot(world, SlotId::A).digests, a_before.digests);
}

#[tokio::test(flavor = "multi_thread")]
async fn replayed_manifest_while_staged_keeps_the_trial_health_gated() {
    let (_d, mut world) = world(Preset::Flatcar, Backend::Gptprio, 8).await;
    world.publish("1.5.0", Vec::new()).unwrap();
    let old = std::fs::read(world.repo.join("manifest.json")).unwrap();
    world.publish("2.0.0", Vec::new()).unwrap();
    apply_default(&world).await.unwrap();
    let a_before = snapshot(&world, SlotId::A);
    // A mirror serves the older, validly signed manifest (serial 1 < 2) again.
    std::fs::write(world.repo.join("manifest.json"), &old).unwrap();
    let err = apply_default(&world).await.unwrap_err();
    assert_eq!(err.kind(), "serial_below_floor", "{err}");
    assert_still_staged(&world, "serial_below_floor");
    trial_fails_and_rolls_back(&world, &a_before);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_down_while_staged_keeps_the_trial_health_gated() {
    let (_d, world, release) = staged(Backend::Grubenv).await;
    let a_before = snapshot(&world, SlotId::A);
    world.set_config("install", "max_attempts", 1).unwrap();
    world
        .server
        .set_fault(FaultRule::new("/manifest.json", Fault::Status(503)));
    let err = apply_default(&world).await.unwrap_err();
    assert_still_staged(&world, err.kind());
    world.server.clear_faults();
    assert_slot_holds(&world, SlotId::B, &release);
    trial_fails_and_rolls_back(&world, &a_before);
}

/// On the trial boot of B (not yet confirmed), an apply of a newer release must refuse
/// before touching anything: slot A is the only fallback.
#[tokio::test(flavor = "multi_thread")]
async fn apply_during_the_trial_boot_is_refused_and_the_fallback_kept() {
    let (_d, mut world, _release) = staged(Backend::Gptprio).await;
    let a_before = snapshot(&world, SlotId::A);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    world.publish("3.0.0", Vec::new()).unwrap();
    world.server.clear_log();
    let err = apply_default(&world).await.unwrap_err();
    assert_eq!(err.kind(), "trial_in_progress", "{err}");
    assert!(err.to_string().contains("trial"), "{err}");
    assert!(
        world
            .server
            .request_log()
            .iter()
            .all(|e| e.path == "/manifest.json"),
        "nothing was downloaded"
    );
    assert_still_staged(&world, "trial_in_progress");
    assert_eq!(
        snapshot(&world, SlotId::A),
        a_before,
        "the fallback slot A changed"
    );
    // The boot just made was B's trial: its failing check rolls back to A.
    world.add_check(true, "web", "exit 1").unwrap();
    let report = world.health_check().unwrap();
    assert_eq!(report.outcome, RunOutcome::RolledBack, "{report:?}");
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
}

/// Applying the staged release again changes nothing: it is not rewritten (which would leave
/// the slot unbootable meanwhile and lose it if the second run failed), and the refusal is
/// not recorded as a failure.
#[tokio::test(flavor = "multi_thread")]
async fn applying_the_staged_release_again_is_refused_and_changes_nothing() {
    let (_d, world, release) = staged(Backend::Gptprio).await;
    let b_before = snapshot(&world, SlotId::B);
    let history_len = state(&world).history.len();
    world.server.clear_log();
    let err = apply_default(&world).await.unwrap_err();
    assert_eq!(err.kind(), "already_staged", "{err}");
    assert!(err.to_string().contains("reboot to try it"), "{err}");
    let b_after = snapshot(&world, SlotId::B);
    assert_eq!(b_after.digests, b_before.digests);
    assert_eq!(b_after.flags, b_before.flags);
    let st = state(&world);
    assert_eq!(
        st.phase,
        Phase::Staged {
            slot: SlotId::B,
            version: "2.0.0".into()
        }
    );
    assert_eq!(
        st.history.len(),
        history_len,
        "nothing to do is not a failure"
    );
    let images_fetched = world
        .server
        .request_log()
        .iter()
        .filter(|e| e.path != "/manifest.json")
        .count();
    assert_eq!(images_fetched, 0, "no image was fetched");
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_slot_holds(&world, SlotId::B, &release);
}
