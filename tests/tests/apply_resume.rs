//! Issue 4: a download dropped for good, then an agent restart: the second `apply` resumes
//! from the last durable checkpoint with a Range request and completes; in between, a
//! reboot boots the old slot.
//!
//! The checkpoint interval is the pipeline's default (64 MiB), so the slots are made big
//! enough for one checkpoint to land well before the drop. A connection reset (RST) loses
//! whatever sat in the socket buffers (a few MiB on loopback), hence the margins.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e_tests::{
    apply_default, assert_clean_failure, assert_slot_holds, fetch_source_kind, image_path,
    snapshot, state, world,
};
use server_mock::{Fault, FaultRule, LogEntry};
use update_agent::boot::SlotId;
use update_agent::install::{ResumeRecord, DEFAULT_CHECKPOINT_BYTES};
use update_agent::ops::resume::RESUME_FILE;
use update_agent::state::Phase;
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, PublishSpec, Release, World};
use updater_proto::Compression;

const MIB: u64 = 1 << 20;

fn image_requests(world: &World, release: &Release) -> Vec<LogEntry> {
    let path = image_path(release, "usr");
    world
        .server
        .request_log()
        .into_iter()
        .filter(|e| e.path == path)
        .collect()
}

fn resume_records(world: &World) -> Vec<ResumeRecord> {
    let bytes = std::fs::read(world.state_dir.join(RESUME_FILE)).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// First apply: the server cuts the connection with `fault(wire size)` and the agent may not
/// retry (`max_attempts = 1`), so it fails after a checkpoint; a reboot boots slot A and its
/// health check confirms it.
async fn interrupted(
    backend: Backend,
    slot_mib: u64,
    compression: Compression,
    fault: fn(u64) -> Fault,
) -> (tempfile::TempDir, World, Release) {
    let (dir, mut world) = world(Preset::Flatcar, backend, slot_mib).await;
    let release = world
        .publish_with(&PublishSpec::new("2.0.0").compression(compression))
        .unwrap();
    assert!(release.images[0].size > DEFAULT_CHECKPOINT_BYTES + 4 * MIB);
    world.set_config("install", "max_attempts", 1).unwrap();
    let wire = release.manifest.images[0].compressed_size;
    let path = image_path(&release, "usr");
    world
        .server
        .set_fault(FaultRule::new(path.as_str(), fault(wire)).times(1));
    let a_before = snapshot(&world, SlotId::A);
    let result = apply_default(&world).await;
    let kind = result.as_ref().err().map_or("none", |e| e.kind());
    assert!(matches!(kind, "truncated" | "transport"), "{result:?}");
    let err = assert_clean_failure(&world, result, kind, &a_before);
    assert_eq!(fetch_source_kind(&err), Some(kind), "{err}");
    // That reboot's health check runs as on every boot (update-agent-health.service) and
    // confirms slot A. Without it, grubenv's A_TRY still counts the unconfirmed boot, and
    // staging B would rightly be refused: a failed trial of B would strand the host in
    // GRUB's rescue entry instead of falling back to A.
    let confirmed = world.health_check().unwrap();
    assert!(confirmed.healthy(), "{}", confirmed.render());
    (dir, world, release)
}

#[tokio::test(flavor = "multi_thread")]
async fn drop_then_agent_restart_resumes_from_the_checkpoint() {
    let size = 84 * MIB;
    let (_d, world, release) = interrupted(Backend::Gptprio, 112, Compression::None, |wire| {
        Fault::DropAfter(wire - 4 * MIB)
    })
    .await;
    assert_eq!(release.images[0].size, size);

    let records = resume_records(&world);
    let rec = records
        .iter()
        .find(|r| r.role == "usr" && r.slot == SlotId::B)
        .unwrap_or_else(|| panic!("no checkpoint for usr: {records:?}"));
    assert!(rec.resumable && !rec.complete, "{rec:?}");
    assert_eq!(rec.written, DEFAULT_CHECKPOINT_BYTES, "{rec:?}");
    let checkpoint = rec.written;

    // The agent restarts (a fresh host from the config) and applies again.
    world.server.clear_log();
    let a_before = snapshot(&world, SlotId::A);
    let report = apply_default(&world).await.unwrap();
    assert_eq!(report.targets[0].resumed_from, checkpoint, "{report:?}");
    assert_eq!(report.targets[0].bytes_fetched, size - checkpoint);

    let log = image_requests(&world, &release);
    assert_eq!(log.len(), 1, "one request for the rest: {log:#?}");
    assert_eq!(
        log[0].range.as_deref(),
        Some(format!("bytes={checkpoint}-").as_str()),
        "{log:#?}"
    );
    assert_eq!(log[0].status, 206);
    assert_eq!(log[0].bytes_sent, size - checkpoint);

    assert_eq!(
        state(&world).phase,
        Phase::Staged {
            slot: SlotId::B,
            version: "2.0.0".into()
        }
    );
    assert!(
        !world.state_dir.join(RESUME_FILE).exists(),
        "checkpoints are cleared once staged"
    );
    assert_eq!(snapshot(&world, SlotId::A), a_before, "slot A changed");
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_slot_holds(&world, SlotId::B, &release);
}

/// A zstd stream's decoder state is not persisted, so after a restart it starts over from
/// byte 0 (by design, see `install`'s docs), and still ends in a correct install.
#[tokio::test(flavor = "multi_thread")]
async fn zstd_after_agent_restart_starts_over_and_installs() {
    // The cut must come after the 64 MiB checkpoint of *decompressed* bytes (of 72): late
    // in the compressed stream. A clean close (FIN) loses nothing in the socket buffers.
    let (_d, world, release) = interrupted(Backend::Grubenv, 96, Compression::Zstd, |wire| {
        Fault::TruncateAfter(wire - wire / 32)
    })
    .await;
    let records = resume_records(&world);
    assert!(
        records
            .iter()
            .any(|r| r.written >= DEFAULT_CHECKPOINT_BYTES),
        "a checkpoint was written before the cut: {records:?}"
    );
    assert!(
        records.iter().all(|r| !r.resumable),
        "zstd checkpoints are not resumable: {records:?}"
    );
    world.server.clear_log();
    let report = apply_default(&world).await.unwrap();
    assert_eq!(report.targets[0].resumed_from, 0);
    let log = image_requests(&world, &release);
    assert_eq!(log.len(), 1, "{log:#?}");
    assert!(
        log[0].range.is_none() || log[0].range.as_deref() == Some("bytes=0-"),
        "{log:#?}"
    );
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_slot_holds(&world, SlotId::B, &release);
}

/// The bytes a checkpoint vouches for are damaged on disk before the restart. Resuming trusts
/// them only through the final hash, so that apply fails cleanly; the one after must not
/// repeat the same resume forever but install correctly.
#[tokio::test(flavor = "multi_thread")]
async fn damaged_checkpointed_bytes_never_end_in_a_bad_slot_and_do_not_wedge_the_host() {
    let (_d, world, release) = interrupted(Backend::Gptprio, 112, Compression::None, |wire| {
        Fault::DropAfter(wire - 4 * MIB)
    })
    .await;
    let part = world.slots().unwrap().b.parts["usr"].clone();
    let dev_path = world.disk.clone();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev_path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_at(&mut b, part.byte_offset + MIB).unwrap();
        b[0] ^= 0xff;
        f.write_at(&b, part.byte_offset + MIB).unwrap();
        f.sync_all().unwrap();
    }
    let a_before = snapshot(&world, SlotId::A);
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        match apply_default(&world).await {
            Ok(_) => {
                outcomes.push("ok".to_string());
                break;
            }
            Err(e) => {
                outcomes.push(e.kind().to_string());
                assert_eq!(snapshot(&world, SlotId::A), a_before);
                assert_eq!(world.boot().unwrap(), Some(SlotId::A), "{e}");
            }
        }
    }
    assert_eq!(
        outcomes.last().map(String::as_str),
        Some("ok"),
        "the host stays stuck on damaged resume data: {outcomes:?}"
    );
    assert!(
        outcomes.len() == 1 || outcomes[0] == "hash_mismatch",
        "{outcomes:?}"
    );
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_slot_holds(&world, SlotId::B, &release);
}

/// A multi-partition slot (Bottlerocket: boot, hash, root): the targets finished before the
/// drop are verified on disk and not fetched again; the interrupted one resumes.
#[tokio::test(flavor = "multi_thread")]
async fn multi_partition_slot_resumes_only_what_is_missing() {
    let (_d, mut world) = world(Preset::Bottlerocket, Backend::Gptprio, 112).await;
    let release = world
        .publish_with(&PublishSpec::new("2.0.0").compression(Compression::None))
        .unwrap();
    world.set_config("install", "max_attempts", 1).unwrap();
    let root_path = image_path(&release, "root");
    let root_size = release
        .images
        .iter()
        .find(|i| i.role == "root")
        .unwrap()
        .size;
    world.server.set_fault(
        FaultRule::new(root_path.as_str(), Fault::DropAfter(root_size - 4 * MIB)).times(1),
    );
    let a_before = snapshot(&world, SlotId::A);
    let result = apply_default(&world).await;
    let kind = result.as_ref().err().map_or("none", |e| e.kind());
    assert!(matches!(kind, "truncated" | "transport"), "{result:?}");
    let err = assert_clean_failure(&world, result, kind, &a_before);
    assert!(err.to_string().contains("root"), "{err}");

    world.server.clear_log();
    let report = apply_default(&world).await.unwrap();
    for t in &report.targets {
        if t.role == "root" {
            assert_eq!(t.resumed_from, DEFAULT_CHECKPOINT_BYTES, "{t:?}");
        } else {
            assert!(t.reused && t.bytes_fetched == 0, "{t:?}");
        }
    }
    let log = world.server.request_log();
    let images: Vec<_> = log.iter().filter(|e| e.path != "/manifest.json").collect();
    assert_eq!(images.len(), 1, "only root is fetched again: {images:#?}");
    assert_eq!(images[0].path, root_path);
    assert_eq!(
        images[0].range.as_deref(),
        Some(format!("bytes={DEFAULT_CHECKPOINT_BYTES}-").as_str())
    );
    assert_eq!(snapshot(&world, SlotId::A), a_before);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_slot_holds(&world, SlotId::B, &release);
}
