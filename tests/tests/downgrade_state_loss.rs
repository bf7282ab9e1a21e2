//! Issue 9's acceptance for state loss, on both boot backends and two layouts: after
//! `rm state.json`, and after replacing it by an older copy, no manifest below the running
//! version or below the persisted serial is installed, and nothing on the disk changes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e_tests::{apply_default, snapshot, world};
use update_agent::boot::SlotId;
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

/// What a test starts from: 2.0.0 installed, booted and committed in slot B.
struct Running {
    _dir: tempfile::TempDir,
    world: World,
    /// 1.5.0's signed manifest, under a serial below the floor.
    old_manifest: Vec<u8>,
    /// `state.json` as the factory left it (1.0.0 in slot A, floor 0).
    factory_state: Vec<u8>,
}

async fn running_2_0_0(preset: Preset, backend: Backend) -> Running {
    let (dir, mut w) = world(preset, backend, 2).await;
    let factory_state = std::fs::read(w.state_dir.join("state.json")).unwrap();
    w.publish("1.5.0", Vec::new()).unwrap();
    let old_manifest = std::fs::read(w.repo.join("manifest.json")).unwrap();
    w.publish("2.0.0", Vec::new()).unwrap();
    assert_eq!(apply_default(&w).await.unwrap().slot, SlotId::B);
    assert_eq!(w.boot().unwrap(), Some(SlotId::B));
    assert!(w.health_check().unwrap().healthy());
    Running {
        _dir: dir,
        world: w,
        old_manifest,
        factory_state,
    }
}

/// Both older offers are refused with their kinds, and slot A (the inactive one, which an
/// install would overwrite) and B are untouched.
async fn older_offers_are_refused(w: &mut World, old_manifest: &[u8]) {
    let before = (snapshot(w, SlotId::A), snapshot(w, SlotId::B));
    std::fs::write(w.repo.join("manifest.json"), old_manifest).unwrap();
    let err = apply_default(w).await.unwrap_err();
    assert_eq!(err.kind(), "serial_below_floor", "{err}");
    w.publish("1.6.0", Vec::new()).unwrap();
    let err = apply_default(w).await.unwrap_err();
    assert_eq!(err.kind(), "downgrade", "{err}");
    assert_eq!((snapshot(w, SlotId::A), snapshot(w, SlotId::B)), before);
    assert_eq!(w.boot().unwrap(), Some(SlotId::B));
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_state_file() {
    for (preset, backend) in [
        (Preset::Flatcar, Backend::Gptprio),
        (Preset::ChromeOs, Backend::Grubenv),
    ] {
        let mut r = running_2_0_0(preset, backend).await;
        std::fs::remove_file(r.world.state_dir.join("state.json")).unwrap();
        older_offers_are_refused(&mut r.world, &r.old_manifest).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn state_file_replaced_by_an_older_copy() {
    for (preset, backend) in [
        (Preset::Flatcar, Backend::Gptprio),
        (Preset::ChromeOs, Backend::Grubenv),
    ] {
        let mut r = running_2_0_0(preset, backend).await;
        std::fs::write(r.world.state_dir.join("state.json"), &r.factory_state).unwrap();
        older_offers_are_refused(&mut r.world, &r.old_manifest).await;
    }
}
