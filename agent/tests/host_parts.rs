//! Issue 10 item 6: the host's touches of the world outside the disk are small traits a test
//! can replace: the [`Clock`] every time-based decision and stamp is taken by, and the
//! [`Reboot`] beside the boot control.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use update_agent::boot::SlotId;
use update_agent::clock::Clock;
use update_agent::error::AgentError;
use update_agent::host::{Host, Reboot};
use update_agent::ops;
use update_agent::ops::apply::ApplyOptions;
use update_agent::state::{HistoryEvent, Phase};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

/// A clock stopped at one instant.
#[derive(Debug)]
struct At(Timestamp);

impl Clock for At {
    fn now(&self) -> Timestamp {
        self.0
    }
}

/// Counts reboot requests instead of rebooting.
#[derive(Debug, Default)]
struct Recorder(AtomicU32);

impl Reboot for Recorder {
    fn request(&self) -> Result<(), AgentError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

async fn apply(host: &Host) -> Result<SlotId, AgentError> {
    Ok(
        ops::apply::apply(host, &ApplyOptions::default(), &mut |_| {})
            .await?
            .slot,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hosts_clock_decides_expiry_and_stamps_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 8)
        .await
        .unwrap();
    // Valid for a week from now.
    w.publish("2.0.0", Vec::new()).unwrap();

    // Eight days on, the same manifest has expired: refused, nothing installed.
    let late = Timestamp::now() + SignedDuration::from_hours(8 * 24);
    let host = w.host().unwrap().with_clock(Arc::new(At(late)));
    let err = apply(&host).await.unwrap_err();
    assert_eq!(err.kind(), "expired", "{err}");
    let failed = host.state.load().unwrap().history.pop().unwrap();
    assert_eq!((failed.event, failed.at), (HistoryEvent::Failed, late));

    // A day on, it installs, and every step of the flow is stamped by the host's clock.
    let soon =
        Timestamp::from_second((Timestamp::now() + SignedDuration::from_hours(24)).as_second())
            .unwrap();
    let host = w.host().unwrap().with_clock(Arc::new(At(soon)));
    assert_eq!(apply(&host).await.unwrap(), SlotId::B);
    let state = host.state.load().unwrap();
    let steps: Vec<_> = state
        .history
        .iter()
        .filter(|e| e.at == soon)
        .map(|e| e.event)
        .collect();
    assert_eq!(
        steps,
        [HistoryEvent::InstallStarted, HistoryEvent::Staged],
        "{:#?}",
        state.history
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_with_reboot_asks_the_hosts_reboot() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 8)
        .await
        .unwrap();
    w.publish("2.0.0", Vec::new()).unwrap();
    assert_eq!(apply(&w.host().unwrap()).await.unwrap(), SlotId::B);
    assert_eq!(w.boot().unwrap(), Some(SlotId::B));
    w.health_check().unwrap();

    let reboots = Arc::new(Recorder::default());
    let host = w.host().unwrap().with_reboot(reboots.clone());
    let report = ops::rollback::rollback(&host, true).unwrap();
    assert!(report.rebooting);
    assert_eq!(reboots.0.load(Ordering::SeqCst), 1);
    assert!(matches!(
        host.state.load().unwrap().phase,
        Phase::RolledBack { .. }
    ));
    // The reboot was only asked for: the flags say slot A boots next.
    assert_eq!(w.boot().unwrap(), Some(SlotId::A));
}

/// Issue 10 item 4: the configuration becomes settings once, when the host is opened; the
/// key files are read then, not again before each manifest.
#[tokio::test(flavor = "multi_thread")]
async fn the_trust_keys_are_read_once_when_the_host_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 8)
        .await
        .unwrap();
    w.publish("2.0.0", Vec::new()).unwrap();
    let host = w.host().unwrap();
    assert!(host.settings.trust_policy.is_some());
    // The key files go away after the host was opened: the keys it read stay in use, for
    // the check and for the install after it.
    for i in 0..2 {
        std::fs::remove_file(dir.path().join("keys").join(format!("release-{i}.pub"))).unwrap();
    }
    let report = ops::check::check(&host, None, false, false).await.unwrap();
    assert_eq!(report.version, "2.0.0");
    assert_eq!(apply(&host).await.unwrap(), SlotId::B);
    // A host opened now reads the files, and says they are missing.
    let err = w.host().unwrap_err();
    assert_eq!(err.kind(), "config_key", "{err}");
}
