//! Issue 4: bad input to `apply` gives a clear error with a stable kind, records it, and
//! leaves the active slot untouched (and the host still boots it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use e2e_tests::{
    apply_default, assert_clean_failure, assert_slot_holds, image_path, repo_image, snapshot,
    state, world,
};
use update_agent::boot::SlotId;
use update_agent::state::{HistoryEvent, InstallLock, Phase, StateStore};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, PublishSpec, World, PRODUCT};
use updater_proto::Compression;

const SLOT_MIB: u64 = 8;

async fn host(backend: Backend) -> (tempfile::TempDir, World) {
    world(Preset::Flatcar, backend, SLOT_MIB).await
}

/// Nothing of any image was requested: the refusal came before the download.
fn assert_no_image_requested(world: &World) {
    let log = world.server.request_log();
    assert!(
        log.iter().all(|e| e.path == "/manifest.json"),
        "images were fetched: {log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_manifest_is_a_bad_signature() {
    let (_d, mut world) = host(Backend::Gptprio).await;
    world.publish("2.0.0", Vec::new()).unwrap();
    // An attacker edits the signed payload (same length, another version) and keeps the
    // signatures.
    let path = world.repo.join("manifest.json");
    let mut env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let payload = B64.decode(env["payload"].as_str().unwrap()).unwrap();
    let text = String::from_utf8(payload).unwrap();
    assert!(text.contains("\"2.0.0\""), "{text}");
    let forged = text.replace("\"2.0.0\"", "\"9.0.0\"");
    env["payload"] = B64.encode(forged).into();
    std::fs::write(&path, serde_json::to_vec(&env).unwrap()).unwrap();

    let a_before = snapshot(&world, SlotId::A);
    let err = assert_clean_failure(
        &world,
        apply_default(&world).await,
        "bad_signature",
        &a_before,
    );
    assert!(err.to_string().contains("manifest"), "{err}");
    assert_no_image_requested(&world);
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_manifest_is_refused() {
    let (_d, mut world) = host(Backend::Grubenv).await;
    world
        .publish_with(&PublishSpec::new("2.0.0").expires_in_secs(-3600))
        .unwrap();
    let a_before = snapshot(&world, SlotId::A);
    let err = assert_clean_failure(&world, apply_default(&world).await, "expired", &a_before);
    assert!(err.to_string().contains("expire"), "{err}");
    assert_no_image_requested(&world);
}

#[tokio::test(flavor = "multi_thread")]
async fn downgrade_is_refused() {
    let (_d, mut world) = host(Backend::Gptprio).await;
    world.publish("0.9.0", Vec::new()).unwrap();
    let a_before = snapshot(&world, SlotId::A);
    let err = assert_clean_failure(&world, apply_default(&world).await, "downgrade", &a_before);
    let text = err.to_string();
    assert!(text.contains("0.9.0") && text.contains("1.0.0"), "{text}");
    assert_no_image_requested(&world);
}

#[tokio::test(flavor = "multi_thread")]
async fn replayed_older_manifest_is_refused_and_the_staged_slot_stays() {
    let (_d, mut world) = host(Backend::Gptprio).await;
    let old = world.publish("1.5.0", Vec::new()).unwrap();
    let old_bytes = std::fs::read(world.repo.join("manifest.json")).unwrap();
    let new = world.publish("2.0.0", Vec::new()).unwrap();
    assert!(new.serial > old.serial);
    apply_default(&world).await.unwrap();

    // A mirror (or attacker) serves the older, validly signed manifest again.
    std::fs::write(world.repo.join("manifest.json"), &old_bytes).unwrap();
    world.server.clear_log();
    let a_before = snapshot(&world, SlotId::A);
    let b_before = snapshot(&world, SlotId::B);
    let err = apply_default(&world).await.unwrap_err();
    assert_eq!(err.kind(), "serial_below_floor", "{err}");
    assert!(err.to_string().contains(&old.serial.to_string()), "{err}");
    // Recorded in the history; the phase still says 2.0.0 is staged (see apply_staged).
    let st = state(&world);
    assert_eq!(
        st.phase,
        Phase::Staged {
            slot: SlotId::B,
            version: "2.0.0".into()
        }
    );
    let last = st.history.last().unwrap();
    assert_eq!(last.event, HistoryEvent::Failed, "{last:?}");
    assert_eq!(last.error_kind.as_deref(), Some("serial_below_floor"));
    assert_no_image_requested(&world);
    assert_eq!(snapshot(&world, SlotId::A), a_before, "slot A changed");
    assert_eq!(
        snapshot(&world, SlotId::B),
        b_before,
        "the staged slot B changed"
    );
    // The refusal did not unstage 2.0.0: the next boot still tries it.
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_slot_holds(&world, SlotId::B, &new);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_product_is_refused() {
    let (_d, mut world) = host(Backend::Grubenv).await;
    world
        .publish_with(&PublishSpec::new("2.0.0").product("other-board"))
        .unwrap();
    let a_before = snapshot(&world, SlotId::A);
    let err = assert_clean_failure(
        &world,
        apply_default(&world).await,
        "wrong_product",
        &a_before,
    );
    let text = err.to_string();
    assert!(
        text.contains("other-board") && text.contains(PRODUCT),
        "{text}"
    );
    assert_no_image_requested(&world);
}

#[tokio::test(flavor = "multi_thread")]
async fn image_larger_than_the_slot_is_refused_before_writing() {
    let (_d, mut world) = host(Backend::Gptprio).await;
    let part_len = world.slots().unwrap().b.parts["usr"].byte_len;
    world
        .publish_with(&PublishSpec::new("2.0.0").image_len("usr", part_len + 4096))
        .unwrap();
    let b_before = snapshot(&world, SlotId::B);
    let a_before = snapshot(&world, SlotId::A);
    let err = assert_clean_failure(
        &world,
        apply_default(&world).await,
        "too_large_for_partition",
        &a_before,
    );
    assert!(err.to_string().contains(&part_len.to_string()), "{err}");
    assert_no_image_requested(&world);
    assert_eq!(
        snapshot(&world, SlotId::B).digests,
        b_before.digests,
        "slot B was written"
    );
}

/// The manifest says N bytes, the file on the server has N+1.
#[tokio::test(flavor = "multi_thread")]
async fn image_one_byte_longer_than_declared_is_a_size_mismatch() {
    let (_d, mut world) = host(Backend::Gptprio).await;
    let release = world
        .publish_with(&PublishSpec::new("2.0.0").compression(Compression::None))
        .unwrap();
    let file = repo_image(&world, "usr");
    let mut bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len() as u64, release.images[0].size);
    bytes.push(0);
    std::fs::write(&file, bytes).unwrap();
    let a_before = snapshot(&world, SlotId::A);
    let err = assert_clean_failure(
        &world,
        apply_default(&world).await,
        "size_mismatch",
        &a_before,
    );
    assert!(
        err.to_string()
            .contains(&release.images[0].size.to_string()),
        "{err}"
    );
}

/// A zstd stream that decompresses to more than the manifest's `size`: stopped before
/// writing past it.
#[tokio::test(flavor = "multi_thread")]
async fn decompression_past_the_declared_size_is_stopped() {
    let (_d, mut world) = host(Backend::Grubenv).await;
    let release = world.publish("2.0.0", Vec::new()).unwrap();
    let mut manifest = release.manifest.clone();
    let real = manifest.images[0].size;
    manifest.images[0].size = real - (1 << 20);
    let declared = manifest.images[0].size;
    world.serve_manifest(manifest).unwrap();

    let slots = world.slots().unwrap();
    let part = slots.b.parts["usr"].clone();
    let a_before = snapshot(&world, SlotId::A);
    let err = assert_clean_failure(
        &world,
        apply_default(&world).await,
        "decompressed_too_long",
        &a_before,
    );
    assert!(err.to_string().contains(&declared.to_string()), "{err}");
    // Nothing beyond the declared size reached slot B: the factory left it zero there.
    let dev = update_agent::disk::FileDevice::open_read_only(&world.disk).unwrap();
    let mut tail = vec![0u8; (real - declared) as usize];
    update_agent::disk::BlockDevice::read_at(&dev, &mut tail, part.byte_offset + declared).unwrap();
    assert!(
        tail.iter().all(|b| *b == 0),
        "bytes past the declared size were written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn denylisted_version_is_refused() {
    let (_d, mut world) = host(Backend::Gptprio).await;
    world.publish("2.0.0", Vec::new()).unwrap();
    StateStore::open(&world.state_dir)
        .unwrap()
        .update(|s| {
            s.deny_at(
                "2.0.0",
                "rolled back: health check web failed",
                update_agent::clock::Timestamp::now(),
            )
        })
        .unwrap();
    let a_before = snapshot(&world, SlotId::A);
    let err = assert_clean_failure(&world, apply_default(&world).await, "denylisted", &a_before);
    assert!(err.to_string().contains("2.0.0"), "{err}");
    assert_no_image_requested(&world);
}

#[tokio::test(flavor = "multi_thread")]
async fn second_apply_while_one_holds_the_lock_is_refused() {
    let (_d, mut world) = host(Backend::Grubenv).await;
    let release = world.publish("2.0.0", Vec::new()).unwrap();
    let before = state(&world);
    let a_before = snapshot(&world, SlotId::A);
    let b_before = snapshot(&world, SlotId::B);
    {
        let _held = InstallLock::acquire(&world.state_dir).unwrap();
        let err = apply_default(&world).await.unwrap_err();
        assert_eq!(err.kind(), "install_locked", "{err}");
        assert!(!err.to_string().is_empty());
        // The loser changes nothing: not the state record (that belongs to the holder), not
        // the disk, and it fetches nothing.
        assert_eq!(state(&world), before);
        assert_eq!(snapshot(&world, SlotId::A), a_before);
        assert_eq!(snapshot(&world, SlotId::B), b_before);
        assert!(world.server.request_log().is_empty());
    }
    // Once the lock is released, the same apply goes through.
    let report = apply_default(&world).await.unwrap();
    assert_eq!(report.slot, SlotId::B);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_slot_holds(&world, SlotId::B, &release);
    let _ = image_path(&release, "usr");
}

/// Two `apply` runs racing in one process: exactly one installs, the other is refused.
#[tokio::test(flavor = "multi_thread")]
async fn two_concurrent_applies_one_wins() {
    let (_d, mut world) = host(Backend::Gptprio).await;
    let release = world.publish("2.0.0", Vec::new()).unwrap();
    let a_before = snapshot(&world, SlotId::A);
    let (r1, r2) = tokio::join!(apply_default(&world), apply_default(&world));
    let (ok, err) = match (r1, r2) {
        (Ok(ok), Err(err)) | (Err(err), Ok(ok)) => (ok, err),
        (r1, r2) => panic!("expected one success and one refusal: {r1:?} / {r2:?}"),
    };
    assert_eq!(err.kind(), "install_locked", "{err}");
    assert_eq!(ok.slot, SlotId::B);
    assert_eq!(
        state(&world).phase,
        Phase::Staged {
            slot: SlotId::B,
            version: "2.0.0".into()
        }
    );
    assert_eq!(snapshot(&world, SlotId::A), a_before);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_slot_holds(&world, SlotId::B, &release);
}
