//! The install pipeline on real files: raw and zstd images, every failure mode leaves the slot
//! disabled and the bytes outside the target partition untouched, resume, backpressure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use update_agent::boot::{BootControl, BootError, BootStatus, SlotId, SlotStatus};
use update_agent::disk::{BlockDevice, FileDevice};
use update_agent::install::{
    install, BytesSource, CancelToken, ChunkFuture, Compression, ImageSource, ImageSpec,
    InstallError, InstallOptions, InstallPlan, NoResume, Phase, ProgressEvent, Readback,
    ReadbackMethod, ResumeRecord, SourceChunk, SourceError, TargetImage,
};

const MIB: u64 = 1 << 20;
/// Disk layout: A at 1 MiB, B right after, each `PART` long, 1 MiB spare at the end.
const PART: u64 = 8 * MIB;
const A_OFF: u64 = MIB;
const B_OFF: u64 = A_OFF + PART;
const DISK: u64 = B_OFF + PART + MIB;

/// Shared log of boot-flag changes and disk writes, to check their order.
type Log = Arc<Mutex<Vec<String>>>;

/// A disk image file with an optional fault: corrupt the bytes it stores.
struct TestDisk {
    file: File,
    size: u64,
    log: Log,
    /// Largest end offset ever written.
    max_end: Arc<AtomicU64>,
    /// Smallest offset ever written.
    min_off: Arc<AtomicU64>,
    corrupt_writes: bool,
    written: Arc<AtomicU64>,
    /// Bytes read through `read_at`.
    read: Arc<AtomicU64>,
    slow: bool,
    /// The same file as a real device, whose uncached reader this disk hands out (`None`:
    /// a disk without one, read back through `read_at`).
    medium: Option<FileDevice>,
}

impl BlockDevice for TestDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::SeqCst);
        self.file.read_exact_at(buf, offset)
    }
    fn uncached_reader(&self) -> Option<io::Result<update_agent::disk::UncachedReader>> {
        self.medium.as_ref().and_then(BlockDevice::uncached_reader)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        {
            let mut log = self.log.lock().unwrap();
            if log.last().map(String::as_str) != Some("write") {
                log.push("write".into());
            }
        }
        self.max_end
            .fetch_max(offset + buf.len() as u64, Ordering::SeqCst);
        self.min_off.fetch_min(offset, Ordering::SeqCst);
        if self.slow {
            // Make the disk the bottleneck so the download runs ahead as far as it can.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        if self.corrupt_writes {
            let mut bad = buf.to_vec();
            bad[buf.len() / 2] ^= 0x5a;
            self.file.write_all_at(&bad, offset)?;
        } else {
            self.file.write_all_at(buf, offset)?;
        }
        self.written.fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Boot control double: records disable/stage and reports a slot disabled until staged.
struct FakeBoot {
    log: Log,
    disabled: Vec<SlotId>,
}

impl BootControl for FakeBoot {
    fn backend(&self) -> &'static str {
        "fake"
    }
    fn status(&mut self) -> Result<BootStatus, BootError> {
        let slots = [SlotId::A, SlotId::B]
            .into_iter()
            .map(|s| SlotStatus {
                slot: s,
                priority: if self.disabled.contains(&s) { 0 } else { 1 },
                tries: 0,
                successful: !self.disabled.contains(&s),
            })
            .collect();
        Ok(BootStatus {
            backend: "fake".into(),
            slots,
            next: Some(SlotId::A),
            reason: String::new(),
        })
    }
    fn disable(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.log.lock().unwrap().push(format!("disable {slot}"));
        self.disabled.push(slot);
        Ok(())
    }
    fn stage(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.log.lock().unwrap().push(format!("stage {slot}"));
        self.disabled.retain(|s| *s != slot);
        Ok(())
    }
    fn commit(&mut self, _: SlotId) -> Result<(), BootError> {
        Ok(())
    }
    fn rollback(&mut self, _: SlotId) -> Result<(), BootError> {
        Ok(())
    }
    fn cancel(&mut self, _: SlotId) -> Result<(), BootError> {
        Ok(())
    }
}

impl FakeBoot {
    fn slot_bootable(&mut self, slot: SlotId) -> bool {
        let st = self.status().unwrap();
        let s = st.slots.iter().find(|s| s.slot == slot).unwrap();
        s.priority > 0 && (s.tries > 0 || s.successful)
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Compressible bytes: text-like repetition with some noise.
fn compressible(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(format!("line {i:08} of a filesystem image\n").as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

fn sha(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

/// An entry's digests as verification parses them.
fn digests_of(entry: &updater_proto::ImageEntry) -> updater_proto::ImageDigests {
    let parse = |hex: &str| updater_proto::Sha256::from_hex(hex).unwrap();
    updater_proto::ImageDigests {
        sha256: parse(&entry.sha256),
        compressed_sha256: parse(&entry.compressed_sha256),
        chunk_index_sha256: None,
    }
}

struct Env {
    _dir: tempfile::TempDir,
    path: PathBuf,
    log: Log,
    max_end: Arc<AtomicU64>,
    min_off: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    read: Arc<AtomicU64>,
    boot: FakeBoot,
    before: Vec<u8>,
    medium: Medium,
}

/// How a test disk reads past the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Medium {
    /// A `FileDevice`'s reader: `O_DIRECT` where the filesystem allows it.
    Direct,
    /// A `FileDevice` opened without `O_DIRECT`: drop the range, then read it.
    Buffered,
    /// No uncached reader at all.
    None,
}

impl Env {
    /// A disk whose every byte is noise: slot A holds "the running system".
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let before = noise(DISK as usize, 42);
        std::fs::write(&path, &before).unwrap();
        let log: Log = Arc::default();
        Env {
            _dir: dir,
            path,
            boot: FakeBoot {
                log: log.clone(),
                disabled: Vec::new(),
            },
            log,
            max_end: Arc::new(AtomicU64::new(0)),
            min_off: Arc::new(AtomicU64::new(u64::MAX)),
            written: Arc::new(AtomicU64::new(0)),
            read: Arc::new(AtomicU64::new(0)),
            before,
            medium: Medium::Direct,
        }
    }

    fn device(&self, corrupt_writes: bool, slow: bool) -> Arc<Mutex<dyn BlockDevice>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap();
        Arc::new(Mutex::new(TestDisk {
            file,
            size: DISK,
            log: self.log.clone(),
            max_end: self.max_end.clone(),
            min_off: self.min_off.clone(),
            corrupt_writes,
            written: self.written.clone(),
            read: self.read.clone(),
            slow,
            medium: match self.medium {
                Medium::Direct => Some(FileDevice::open_read_only(&self.path).unwrap()),
                Medium::Buffered => Some(FileDevice::open_buffered(&self.path).unwrap()),
                Medium::None => None,
            },
        }))
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    /// Everything outside B's partition is byte-identical to before.
    fn assert_outside_b_untouched(&self) {
        let now = self.disk();
        let (b0, b1) = (B_OFF as usize, (B_OFF + PART) as usize);
        assert!(
            now[..b0] == self.before[..b0],
            "bytes before slot B changed"
        );
        assert!(now[b1..] == self.before[b1..], "bytes after slot B changed");
        if self.written.load(Ordering::SeqCst) > 0 {
            assert!(self.min_off.load(Ordering::SeqCst) >= B_OFF);
            assert!(self.max_end.load(Ordering::SeqCst) <= B_OFF + PART);
        }
    }

    fn assert_disabled_before_first_write(&self) {
        let log = self.log.lock().unwrap();
        assert_eq!(
            log.first().map(String::as_str),
            Some("disable B"),
            "{log:?}"
        );
        assert!(!log.iter().any(|l| l.starts_with("stage")), "{log:?}");
    }
}

fn raw_target(image: &[u8], source: Box<dyn ImageSource>) -> TargetImage {
    TargetImage {
        image: ImageSpec {
            role: "root".into(),
            part_offset: B_OFF,
            part_len: PART,
            size: image.len() as u64,
            sha256: sha(image),
            compression: Compression::None,
            compressed_size: image.len() as u64,
            compressed_sha256: None,
        },
        source,
        resume: None,
    }
}

fn zstd_target(image: &[u8], wire: &[u8], chunk: usize) -> TargetImage {
    let source = Box::new(BytesSource::new("mem://root.zst", wire.to_vec(), chunk));
    let mut t = raw_target(image, source);
    t.image.compression = Compression::Zstd;
    t.image.compressed_size = wire.len() as u64;
    t.image.compressed_sha256 = Some(sha(wire));
    t
}

fn plan(targets: Vec<TargetImage>) -> InstallPlan {
    InstallPlan {
        slot: SlotId::B,
        device: "disk.img".into(),
        targets,
    }
}

fn small_opts(readback: Readback) -> InstallOptions {
    InstallOptions {
        buffer_size: 256 << 10,
        channel_capacity: 2,
        checkpoint_bytes: MIB,
        readback,
        ..InstallOptions::default()
    }
}

async fn run(
    env: &mut Env,
    p: InstallPlan,
    opts: &InstallOptions,
    corrupt: bool,
) -> (
    Result<update_agent::install::InstallReport, InstallError>,
    Vec<ProgressEvent>,
    Vec<ResumeRecord>,
) {
    let dev = env.device(corrupt, false);
    let mut events = Vec::new();
    let mut records: Vec<ResumeRecord> = Vec::new();
    let r = install(p, dev, &mut env.boot, opts, &mut records, &mut |e| {
        events.push(e)
    })
    .await;
    (r, events, records)
}

#[tokio::test]
async fn raw_image_is_written_flushed_and_read_back_uncached() {
    let mut env = Env::new();
    let image = noise((5 * MIB + 4096 + 100) as usize, 7);
    let src = BytesSource::new("mem://root.img", image.clone(), 100_000);
    let opts = small_opts(Readback::Uncached);
    let (r, events, records) = run(
        &mut env,
        plan(vec![raw_target(&image, Box::new(src))]),
        &opts,
        false,
    )
    .await;
    let report = r.unwrap();
    let t = &report.targets[0];
    assert_eq!(
        t.readback,
        Some(ReadbackMethod::Direct),
        "ext4 takes O_DIRECT"
    );
    assert_eq!(t.bytes_written, image.len() as u64);
    assert_eq!(t.sha256, hex::encode(sha(&image)));
    let disk = env.disk();
    let b = B_OFF as usize;
    assert!(disk[b..b + image.len()] == image[..]);
    // The partition tail beyond the image is left as it was.
    assert!(
        disk[b + image.len()..(B_OFF + PART) as usize]
            == env.before[b + image.len()..(B_OFF + PART) as usize]
    );
    env.assert_outside_b_untouched();
    env.assert_disabled_before_first_write();
    assert!(!env.boot.slot_bootable(SlotId::B), "install never stages");
    // Progress: monotonic writing, then flush, verify, done; totals right.
    assert_eq!(events[0].phase, Phase::Disabled);
    let writing: Vec<u64> = events
        .iter()
        .filter(|e| e.phase == Phase::Writing)
        .map(|e| e.done)
        .collect();
    assert!(writing.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(*writing.last().unwrap(), image.len() as u64);
    assert!(events.iter().any(|e| e.phase == Phase::Verifying));
    let last = events.last().unwrap();
    assert_eq!(
        (last.phase, last.done, last.total),
        (Phase::Done, image.len() as u64, image.len() as u64)
    );
    // Checkpoints every MiB, then one complete record.
    let cps: Vec<u64> = records.iter().map(|r| r.written).collect();
    assert_eq!(
        cps,
        vec![MIB, 2 * MIB, 3 * MIB, 4 * MIB, 5 * MIB, image.len() as u64]
    );
    assert!(records.last().unwrap().complete && records.iter().all(|r| r.resumable));
}

#[tokio::test]
async fn zstd_image_is_decompressed_hashed_and_written() {
    let mut env = Env::new();
    let image = compressible((6 * MIB + 333) as usize);
    let wire = zstd::encode_all(&image[..], 3).unwrap();
    assert!(wire.len() < image.len() / 4);
    let opts = small_opts(Readback::Uncached);
    let (r, _, records) = run(
        &mut env,
        plan(vec![zstd_target(&image, &wire, 7000)]),
        &opts,
        false,
    )
    .await;
    let t = &r.unwrap().targets[0];
    assert_eq!(t.bytes_fetched, wire.len() as u64);
    assert_eq!(t.bytes_written, image.len() as u64);
    let disk = env.disk();
    assert!(disk[B_OFF as usize..B_OFF as usize + image.len()] == image[..]);
    env.assert_outside_b_untouched();
    env.assert_disabled_before_first_write();
    assert!(records.iter().all(|r| !r.resumable), "zstd restarts from 0");
}

#[tokio::test]
async fn two_targets_go_to_their_own_partitions() {
    let mut env = Env::new();
    let boot_img = noise((MIB / 2) as usize, 3);
    let root_img = compressible((3 * MIB) as usize);
    let wire = zstd::encode_all(&root_img[..], 1).unwrap();
    let mut boot_t = raw_target(
        &boot_img,
        Box::new(BytesSource::new("boot", boot_img.clone(), 4096)),
    );
    boot_t.image.role = "boot".into();
    boot_t.image.part_len = MIB;
    let mut root_t = zstd_target(&root_img, &wire, 65536);
    root_t.image.part_offset = B_OFF + MIB;
    root_t.image.part_len = PART - MIB;
    let (r, _, _) = run(
        &mut env,
        plan(vec![boot_t, root_t]),
        &small_opts(Readback::Device),
        false,
    )
    .await;
    let report = r.unwrap();
    assert_eq!(report.targets.len(), 2);
    let disk = env.disk();
    let b = B_OFF as usize;
    assert!(disk[b..b + boot_img.len()] == boot_img[..]);
    assert!(disk[b + MIB as usize..b + MIB as usize + root_img.len()] == root_img[..]);
    env.assert_outside_b_untouched();
}

#[tokio::test]
async fn image_larger_than_partition_is_refused_before_anything_changes() {
    let mut env = Env::new();
    let image = noise((PART + 512) as usize, 1);
    let src = BytesSource::new("big", image.clone(), 65536);
    let (r, events, _) = run(
        &mut env,
        plan(vec![raw_target(&image, Box::new(src))]),
        &small_opts(Readback::Device),
        false,
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.kind(), "too_large_for_partition", "{e}");
    assert!(
        e.to_string().contains("root") && e.to_string().contains(&PART.to_string()),
        "{e}"
    );
    assert!(
        env.log.lock().unwrap().is_empty(),
        "neither disabled nor written"
    );
    assert!(events.is_empty());
    assert_eq!(env.disk(), env.before);
}

#[tokio::test]
async fn invalid_plans_are_refused_before_anything_changes() {
    let mut env = Env::new();
    let image = noise(4096, 1);
    let mut beyond = raw_target(&image, Box::new(BytesSource::new("x", image.clone(), 4096)));
    beyond.image.part_offset = DISK - 4096;
    beyond.image.part_len = 8192;
    let (r, _, _) = run(
        &mut env,
        plan(vec![beyond]),
        &small_opts(Readback::Device),
        false,
    )
    .await;
    assert_eq!(r.unwrap_err().kind(), "invalid_plan");
    let t1 = raw_target(&image, Box::new(BytesSource::new("x", image.clone(), 4096)));
    let mut t2 = raw_target(&image, Box::new(BytesSource::new("y", image.clone(), 4096)));
    t2.image.part_offset = B_OFF + 4096;
    let (r, _, _) = run(
        &mut env,
        plan(vec![t1, t2]),
        &small_opts(Readback::Device),
        false,
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.kind(), "invalid_plan");
    assert!(e.to_string().contains("overlaps"), "{e}");
    assert!(env.log.lock().unwrap().is_empty());
    assert_eq!(env.disk(), env.before);
}

/// Run a plan expected to fail with `kind`; check the slot stays disabled and nothing outside
/// B changed.
async fn expect_failure(
    p: InstallPlan,
    opts: &InstallOptions,
    corrupt: bool,
    kind: &str,
) -> (Env, InstallError) {
    let mut env = Env::new();
    let (r, _, records) = run(&mut env, p, opts, corrupt).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind(), kind, "{e}");
    assert!(
        !env.boot.slot_bootable(SlotId::B),
        "slot B must stay disabled"
    );
    env.assert_disabled_before_first_write();
    env.assert_outside_b_untouched();
    assert!(
        records.iter().all(|r| !r.complete),
        "no complete record after a failure"
    );
    (env, e)
}

#[tokio::test]
async fn stream_longer_than_declared_is_stopped() {
    let image = noise((2 * MIB) as usize, 5);
    let mut longer = image.clone();
    longer.extend_from_slice(&noise(10_000, 6));
    let t = raw_target(
        &image,
        Box::new(BytesSource::new("mem://long", longer, 50_000)),
    );
    let (env, e) = expect_failure(
        plan(vec![t]),
        &small_opts(Readback::Device),
        false,
        "size_mismatch",
    )
    .await;
    assert!(e.to_string().contains("longer"), "{e}");
    assert!(env.max_end.load(Ordering::SeqCst) <= B_OFF + image.len() as u64);
}

#[tokio::test]
async fn stream_shorter_than_declared_is_stopped() {
    let image = noise((2 * MIB) as usize, 5);
    let t = raw_target(
        &image,
        Box::new(BytesSource::new(
            "mem://short",
            image[..image.len() - 1].to_vec(),
            50_000,
        )),
    );
    let (_, e) = expect_failure(
        plan(vec![t]),
        &small_opts(Readback::Device),
        false,
        "size_mismatch",
    )
    .await;
    assert!(
        e.to_string().contains("shorter") && e.to_string().contains("mem://short"),
        "{e}"
    );
}

#[tokio::test]
async fn zstd_stream_decompressing_past_declared_size_is_stopped_before_writing_past_it() {
    let image = compressible((4 * MIB) as usize);
    let wire = zstd::encode_all(&image[..], 3).unwrap();
    let declared = 3 * MIB + 17;
    let mut t = zstd_target(&image, &wire, 8192);
    t.image.size = declared;
    let (env, _) = expect_failure(
        plan(vec![t]),
        &small_opts(Readback::Device),
        false,
        "decompressed_too_long",
    )
    .await;
    assert!(env.max_end.load(Ordering::SeqCst) <= B_OFF + declared);
}

#[tokio::test]
async fn zstd_truncated_frame_is_refused() {
    let image = compressible((2 * MIB) as usize);
    let wire = zstd::encode_all(&image[..], 3).unwrap();
    let cut = &wire[..wire.len() - 20];
    let mut t = zstd_target(&image, cut, 8192);
    t.image.compressed_sha256 = None;
    let (_, e) = expect_failure(
        plan(vec![t]),
        &small_opts(Readback::Device),
        false,
        "decompress",
    )
    .await;
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[tokio::test]
async fn zstd_window_above_the_cap_is_refused() {
    let image = noise((MIB) as usize, 9);
    let mut enc = zstd::stream::raw::Encoder::new(3).unwrap();
    use zstd::stream::raw::CParameter;
    enc.set_parameter(CParameter::WindowLog(26)).unwrap();
    enc.set_parameter(CParameter::ContentSizeFlag(false))
        .unwrap();
    let mut w = zstd::stream::zio::Writer::new(Vec::new(), enc);
    std::io::Write::write_all(&mut w, &image).unwrap();
    w.finish().unwrap();
    let wire = w.into_inner().0;
    let t = zstd_target(&image, &wire, 65536);
    let (_, e) = expect_failure(
        plan(vec![t]),
        &small_opts(Readback::Device),
        false,
        "decompress",
    )
    .await;
    assert!(
        e.to_string().to_lowercase().contains("window") || e.to_string().contains("memory"),
        "{e}"
    );
}

#[tokio::test]
async fn image_hash_mismatch_leaves_slot_disabled() {
    let image = noise((3 * MIB) as usize, 5);
    let mut t = raw_target(
        &image,
        Box::new(BytesSource::new("mem://root", image.clone(), 65536)),
    );
    t.image.sha256[0] ^= 1;
    let (_, e) = expect_failure(
        plan(vec![t]),
        &small_opts(Readback::Device),
        false,
        "hash_mismatch",
    )
    .await;
    assert!(e.to_string().contains("image"), "{e}");
}

#[tokio::test]
async fn compressed_hash_mismatch_leaves_slot_disabled() {
    let image = compressible((3 * MIB) as usize);
    let wire = zstd::encode_all(&image[..], 3).unwrap();
    let mut t = zstd_target(&image, &wire, 65536);
    t.image.compressed_sha256.as_mut().unwrap()[5] ^= 1;
    let (_, e) = expect_failure(
        plan(vec![t]),
        &small_opts(Readback::Device),
        false,
        "hash_mismatch",
    )
    .await;
    assert!(e.to_string().contains("compressed stream"), "{e}");
}

#[tokio::test]
async fn readback_mismatch_through_device_and_uncached() {
    let image = noise((2 * MIB) as usize, 5);
    let t = raw_target(
        &image,
        Box::new(BytesSource::new("mem://root", image.clone(), 65536)),
    );
    let (_, e) = expect_failure(
        plan(vec![t]),
        &small_opts(Readback::Device),
        true,
        "readback_mismatch",
    )
    .await;
    assert!(e.to_string().contains("read-back of slot B"), "{e}");

    // Uncached: the path is only known after the Env exists, so build it by hand.
    let mut env = Env::new();
    let t = raw_target(
        &image,
        Box::new(BytesSource::new("mem://root", image.clone(), 65536)),
    );
    let opts = small_opts(Readback::Uncached);
    let (r, _, _) = run(&mut env, plan(vec![t]), &opts, true).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind(), "readback_mismatch", "{e}");
    assert!(matches!(
        e,
        InstallError::ReadbackMismatch {
            method: ReadbackMethod::Direct,
            ..
        }
    ));
    assert!(!env.boot.slot_bootable(SlotId::B));
    env.assert_outside_b_untouched();
}

/// Serves `data` but fails after `fail_after` bytes; honours resume_from like a Range request.
struct FlakySource {
    data: Bytes,
    pos: usize,
    fail_after: Option<usize>,
    chunk: usize,
    restart_on_resume: bool,
    restarted: bool,
    fetched: Arc<AtomicU64>,
    fail_kind: &'static str,
}

impl ImageSource for FlakySource {
    fn describe(&self) -> String {
        "http://test/root.img".into()
    }
    fn etag(&self) -> Option<String> {
        Some("\"v1\"".into())
    }
    fn resume_from(&mut self, offset: u64, etag: Option<&str>) -> Result<(), SourceError> {
        assert_eq!(etag, Some("\"v1\""));
        if self.restart_on_resume {
            self.restarted = true;
            self.pos = 0;
        } else {
            self.pos = offset as usize;
        }
        Ok(())
    }
    fn next_chunk(&mut self) -> ChunkFuture<'_> {
        let r = if std::mem::take(&mut self.restarted) {
            Ok(Some(SourceChunk::Restarted))
        } else if self.fail_after.is_some_and(|f| self.pos >= f) {
            Err(SourceError::new(self.fail_kind, "connection reset by peer"))
        } else {
            let end = (self.pos + self.chunk).min(self.data.len());
            let end = self.fail_after.map_or(end, |f| end.min(f));
            if end == self.pos {
                Ok(None)
            } else {
                let c = self.data.slice(self.pos..end);
                self.fetched.fetch_add(c.len() as u64, Ordering::SeqCst);
                self.pos = end;
                Ok(Some(SourceChunk::Data(c)))
            }
        };
        Box::pin(std::future::ready(r))
    }
}

fn flaky(
    image: &[u8],
    fail_after: Option<usize>,
    restart_on_resume: bool,
) -> (FlakySource, Arc<AtomicU64>) {
    let fetched = Arc::new(AtomicU64::new(0));
    (
        FlakySource {
            data: Bytes::from(image.to_vec()),
            pos: 0,
            fail_after,
            chunk: 100_000,
            restart_on_resume,
            restarted: false,
            fetched: fetched.clone(),
            fail_kind: "connection_reset",
        },
        fetched,
    )
}

#[tokio::test]
async fn fetch_error_is_reported_and_slot_stays_disabled() {
    let image = noise((3 * MIB) as usize, 5);
    let (src, _) = flaky(&image, Some(1_500_000), false);
    let t = raw_target(&image, Box::new(src));
    let (_, e) = expect_failure(plan(vec![t]), &small_opts(Readback::Device), false, "fetch").await;
    assert!(
        e.to_string().contains("connection reset")
            && e.to_string().contains("http://test/root.img"),
        "{e}"
    );
}

#[tokio::test]
async fn a_fetcher_that_sees_too_many_bytes_is_a_size_mismatch() {
    let image = noise((2 * MIB) as usize, 5);
    let (mut src, _) = flaky(&image, Some(image.len()), false);
    src.fail_kind = "too_long";
    let t = raw_target(&image, Box::new(src));
    let (_, e) = expect_failure(
        plan(vec![t]),
        &small_opts(Readback::Device),
        false,
        "size_mismatch",
    )
    .await;
    assert!(
        e.to_string().contains("longer than declared: at least")
            && e.to_string().contains(&image.len().to_string()),
        "{e}"
    );
}

#[tokio::test]
async fn interrupted_raw_install_resumes_from_the_last_checkpoint() {
    let mut env = Env::new();
    let image = noise((5 * MIB + 512) as usize, 11);
    let (src, _) = flaky(&image, Some((3 * MIB + 300_000) as usize), false);
    let opts = small_opts(Readback::Uncached);
    let (r, _, records) = run(
        &mut env,
        plan(vec![raw_target(&image, Box::new(src))]),
        &opts,
        false,
    )
    .await;
    assert_eq!(r.unwrap_err().kind(), "fetch");
    let last = records.last().unwrap().clone();
    assert_eq!(last.written, 3 * MIB);
    assert_eq!(last.etag.as_deref(), Some("\"v1\""));
    assert_eq!(last.url, "http://test/root.img");

    // Second run: continue from the record; only the rest is fetched.
    let (src, fetched) = flaky(&image, None, false);
    let mut t = raw_target(&image, Box::new(src));
    t.resume = Some(last.resume_point());
    let (r, events, _) = run(&mut env, plan(vec![t]), &opts, false).await;
    let report = r.unwrap();
    assert_eq!(report.targets[0].resumed_from, 3 * MIB);
    assert_eq!(fetched.load(Ordering::SeqCst), image.len() as u64 - 3 * MIB);
    assert!(events.iter().any(|e| e.phase == Phase::Rehashing));
    assert!(env.disk()[B_OFF as usize..B_OFF as usize + image.len()] == image[..]);
    env.assert_outside_b_untouched();
}

/// Serves `data` up to `stall_at`, then never answers again (a server that stopped sending).
struct StallingSource {
    data: Bytes,
    pos: usize,
    stall_at: usize,
}

impl ImageSource for StallingSource {
    fn describe(&self) -> String {
        "http://test/root.img".into()
    }
    fn etag(&self) -> Option<String> {
        Some("\"v1\"".into())
    }
    fn resume_from(&mut self, _: u64, _: Option<&str>) -> Result<(), SourceError> {
        unreachable!("the first run does not resume")
    }
    fn next_chunk(&mut self) -> ChunkFuture<'_> {
        if self.pos >= self.stall_at {
            return Box::pin(std::future::pending());
        }
        let end = (self.pos + 100_000).min(self.stall_at);
        let c = self.data.slice(self.pos..end);
        self.pos = end;
        Box::pin(std::future::ready(Ok(Some(SourceChunk::Data(c)))))
    }
}

#[tokio::test]
async fn a_cancelled_install_stops_while_stalled_keeps_its_checkpoints_and_resumes() {
    let mut env = Env::new();
    let image = noise((5 * MIB) as usize, 13);
    let src = StallingSource {
        data: Bytes::from(image.clone()),
        pos: 0,
        stall_at: (3 * MIB) as usize,
    };
    let cancel = CancelToken::default();
    let opts = InstallOptions {
        cancel: Some(cancel.clone()),
        ..small_opts(Readback::Uncached)
    };
    let dev = env.device(false, false);
    let mut records: Vec<ResumeRecord> = Vec::new();
    // Cancelled once all the bytes the source will ever send are written: the pipeline is
    // then waiting on a chunk that never comes, and only the token can stop it.
    let r = install(
        plan(vec![raw_target(&image, Box::new(src))]),
        dev,
        &mut env.boot,
        &opts,
        &mut records,
        &mut |e| {
            if e.phase == Phase::Writing && e.done >= 3 * MIB {
                cancel.cancel();
            }
        },
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.kind(), "install_cancelled", "{e}");
    assert!(e.to_string().contains("cancelled"), "{e}");
    env.assert_disabled_before_first_write();
    assert!(!env.boot.slot_bootable(SlotId::B));
    env.assert_outside_b_untouched();
    let last = records
        .last()
        .expect("no checkpoint before the cancel")
        .clone();
    assert!(last.written >= 2 * MIB && !last.complete, "{last:?}");

    // The next run continues from the kept checkpoint.
    let (src, fetched) = flaky(&image, None, false);
    let mut t = raw_target(&image, Box::new(src));
    t.resume = Some(last.resume_point());
    let opts = small_opts(Readback::Uncached);
    let (r, _, _) = run(&mut env, plan(vec![t]), &opts, false).await;
    assert_eq!(r.unwrap().targets[0].resumed_from, last.written);
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        image.len() as u64 - last.written
    );
    assert!(env.disk()[B_OFF as usize..B_OFF as usize + image.len()] == image[..]);
    env.assert_outside_b_untouched();
}

#[tokio::test]
async fn resume_that_the_server_refuses_restarts_from_zero() {
    let mut env = Env::new();
    let image = noise((3 * MIB) as usize, 12);
    // First a partial, wrong-content install so the re-hash of the prefix is meaningless.
    std::fs::File::options()
        .write(true)
        .open(&env.path)
        .unwrap()
        .write_all_at(&noise(MIB as usize, 99), B_OFF)
        .unwrap();
    env.before = env.disk();
    let (src, fetched) = flaky(&image, None, true);
    let mut t = raw_target(&image, Box::new(src));
    t.resume = Some(update_agent::install::ResumePoint {
        written: MIB,
        etag: Some("\"v1\"".into()),
    });
    let (r, events, _) = run(
        &mut env,
        plan(vec![t]),
        &small_opts(Readback::Device),
        false,
    )
    .await;
    let report = r.unwrap();
    assert_eq!(report.targets[0].resumed_from, 0);
    assert_eq!(fetched.load(Ordering::SeqCst), image.len() as u64);
    assert!(events.iter().any(|e| e.phase == Phase::Restarted));
    assert!(env.disk()[B_OFF as usize..B_OFF as usize + image.len()] == image[..]);
}

#[tokio::test]
async fn complete_record_reuses_the_verified_bytes_on_disk() {
    let mut env = Env::new();
    let image = noise((2 * MIB) as usize, 13);
    let (src, _) = flaky(&image, None, false);
    let opts = small_opts(Readback::Uncached);
    let (r, _, records) = run(
        &mut env,
        plan(vec![raw_target(&image, Box::new(src))]),
        &opts,
        false,
    )
    .await;
    r.unwrap();
    let done = records.last().unwrap().clone();
    assert!(done.complete);
    let writes_before = env.written.load(Ordering::SeqCst);
    let (src, fetched) = flaky(&image, Some(0), false);
    let mut t = raw_target(&image, Box::new(src));
    t.resume = Some(done.resume_point());
    let (r, _, _) = run(&mut env, plan(vec![t]), &opts, false).await;
    let report = r.unwrap();
    assert!(report.targets[0].reused);
    assert_eq!(fetched.load(Ordering::SeqCst), 0);
    assert_eq!(env.written.load(Ordering::SeqCst), writes_before);

    // If the disk no longer holds it, the record is not trusted: full install.
    std::fs::File::options()
        .write(true)
        .open(&env.path)
        .unwrap()
        .write_all_at(b"x", B_OFF + 10)
        .unwrap();
    let (src, fetched) = flaky(&image, None, false);
    let mut t = raw_target(&image, Box::new(src));
    t.resume = Some(done.resume_point());
    let (r, _, _) = run(&mut env, plan(vec![t]), &opts, false).await;
    assert!(!r.unwrap().targets[0].reused);
    assert_eq!(fetched.load(Ordering::SeqCst), image.len() as u64);
    assert!(env.disk()[B_OFF as usize..B_OFF as usize + image.len()] == image[..]);
}

/// Counts bytes handed to the pipeline.
struct CountingSource {
    inner: BytesSource,
    produced: Arc<AtomicU64>,
}

impl ImageSource for CountingSource {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn resume_from(&mut self, o: u64, e: Option<&str>) -> Result<(), SourceError> {
        self.inner.resume_from(o, e)
    }
    fn next_chunk(&mut self) -> ChunkFuture<'_> {
        let produced = self.produced.clone();
        let fut = self.inner.next_chunk();
        Box::pin(async move {
            let r = fut.await;
            if let Ok(Some(SourceChunk::Data(b))) = &r {
                produced.fetch_add(b.len() as u64, Ordering::SeqCst);
            }
            r
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_cannot_run_ahead_of_a_slow_disk_by_more_than_the_channel() {
    let mut env = Env::new();
    let image = noise((8 * MIB) as usize, 21);
    let produced = Arc::new(AtomicU64::new(0));
    let chunk = 16 << 10;
    let src = CountingSource {
        inner: BytesSource::new("mem://root", image.clone(), chunk),
        produced: produced.clone(),
    };
    let opts = InstallOptions {
        buffer_size: 64 << 10,
        channel_capacity: 3,
        checkpoint_bytes: 4 * MIB,
        readback: Readback::Off,
        ..InstallOptions::default()
    };
    let dev = env.device(false, true);
    let written = env.written.clone();
    let mut max_ahead = 0u64;
    let mut progress = |e: ProgressEvent| {
        if e.phase == Phase::Writing {
            let ahead = produced.load(Ordering::SeqCst) - written.load(Ordering::SeqCst);
            max_ahead = max_ahead.max(ahead);
        }
    };
    let r = install(
        plan(vec![raw_target(&image, Box::new(src))]),
        dev,
        &mut env.boot,
        &opts,
        &mut NoResume,
        &mut progress,
    )
    .await;
    r.unwrap();
    // In flight at most: the channel, the buffer waiting to enter it, the one the decode stage
    // holds, its fill buffer, the disk stage's queue slot, the four blocks it holds for one
    // gathered write and the block arriving, and one source chunk.
    let bound = (opts.channel_capacity as u64 + 9) * opts.buffer_size as u64 + chunk as u64;
    assert!(
        max_ahead > 0 && max_ahead <= bound,
        "ran ahead {max_ahead} > {bound}"
    );
    assert!(opts.memory_bound() < 16 * MIB);
}

#[test]
fn default_options_bound_memory_independent_of_image_size() {
    let o = InstallOptions::default();
    assert!(o.memory_bound() <= 24 * MIB, "{}", o.memory_bound());
    assert_eq!(o.zstd_window_log_max, 23);
}

#[test]
fn error_kinds_are_stable() {
    let e = InstallError::SizeMismatch {
        role: "root".into(),
        url: "u".into(),
        what: "compressed",
        expected: 2,
        actual: 3,
        at_least: true,
    };
    assert_eq!(e.kind(), "size_mismatch");
    assert!(
        e.to_string()
            .contains("longer than declared: at least 3 bytes"),
        "{e}"
    );
    let e = InstallError::Fetch {
        role: "root".into(),
        url: "u".into(),
        source: SourceError::new("timeout", "timed out"),
    };
    assert_eq!(e.kind(), "fetch");
}

#[tokio::test]
async fn manifest_entry_and_resolved_partition_make_a_target() {
    let mut env = Env::new();
    let image = compressible((2 * MIB) as usize);
    let wire = zstd::encode_all(&image[..], 3).unwrap();
    let entry = updater_proto::ImageEntry {
        role: "usr".into(),
        url: "usr.img.zst".into(),
        size: image.len() as u64,
        sha256: hex::encode(sha(&image)),
        compression: Compression::Zstd,
        compressed_size: wire.len() as u64,
        compressed_sha256: hex::encode(sha(&wire)),
        chunk_index: None,
    };
    let part = update_agent::disk::slots::Partition {
        number: 4,
        first_lba: B_OFF / 512,
        last_lba: (B_OFF + PART) / 512 - 1,
        byte_offset: B_OFF,
        byte_len: PART,
        unique_guid: uuid::Uuid::nil(),
        type_guid: uuid::Uuid::nil(),
        label: "USR-B".into(),
    };
    let src = Box::new(BytesSource::new("usr.img.zst", wire.clone(), 65536));
    let t = TargetImage::from_entry(&entry, &digests_of(&entry), &part, src);
    let (r, _, _) = run(
        &mut env,
        plan(vec![t]),
        &small_opts(Readback::Device),
        false,
    )
    .await;
    r.unwrap();
    assert!(env.disk()[B_OFF as usize..B_OFF as usize + image.len()] == image[..]);
}

#[tokio::test]
async fn readback_falls_back_to_dropping_the_cache_where_direct_io_cannot_apply() {
    // A device whose filesystem refuses O_DIRECT, with a partition at an unaligned offset.
    let mut env = Env::new();
    env.medium = Medium::Buffered;
    let image = noise((MIB + 1000) as usize, 31);
    let mut t = raw_target(
        &image,
        Box::new(BytesSource::new("mem://odd", image.clone(), 65536)),
    );
    t.image.part_offset = B_OFF + 100;
    t.image.part_len = PART - 100;
    let opts = small_opts(Readback::Uncached);
    let (r, _, _) = run(&mut env, plan(vec![t]), &opts, false).await;
    assert_eq!(
        r.unwrap().targets[0].readback,
        Some(ReadbackMethod::DropCache)
    );
    env.assert_outside_b_untouched();

    // ... and a corrupted write is still caught that way.
    let mut env = Env::new();
    env.medium = Medium::Buffered;
    let mut t = raw_target(
        &image,
        Box::new(BytesSource::new("mem://odd", image.clone(), 65536)),
    );
    t.image.part_offset = B_OFF + 100;
    t.image.part_len = PART - 100;
    let opts = small_opts(Readback::Uncached);
    let (r, _, _) = run(&mut env, plan(vec![t]), &opts, true).await;
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            InstallError::ReadbackMismatch {
                method: ReadbackMethod::DropCache,
                ..
            }
        ),
        "{e}"
    );
    assert!(!env.boot.slot_bootable(SlotId::B));
}

/// The read-back goes through the `BlockDevice`: on a device without an uncached reader,
/// `Uncached` reads through `read_at` (never by reopening the disk) and still catches a
/// corrupted write.
#[tokio::test]
async fn uncached_readback_without_a_medium_reader_reads_through_the_device() {
    let image = noise((2 * MIB + 700) as usize, 33);
    for corrupt in [false, true] {
        let mut env = Env::new();
        env.medium = Medium::None;
        let t = raw_target(
            &image,
            Box::new(BytesSource::new("mem://dev", image.clone(), 65536)),
        );
        let (r, _, _) = run(
            &mut env,
            plan(vec![t]),
            &small_opts(Readback::Uncached),
            corrupt,
        )
        .await;
        assert!(
            env.read.load(Ordering::SeqCst) >= image.len() as u64,
            "read back {} of {} bytes through the device",
            env.read.load(Ordering::SeqCst),
            image.len()
        );
        if corrupt {
            let e = r.unwrap_err();
            assert!(
                matches!(
                    e,
                    InstallError::ReadbackMismatch {
                        method: ReadbackMethod::Device,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(!env.boot.slot_bootable(SlotId::B));
        } else {
            assert_eq!(r.unwrap().targets[0].readback, Some(ReadbackMethod::Device));
        }
        env.assert_outside_b_untouched();
    }
}

#[tokio::test]
async fn image_filling_its_partition_with_an_unaligned_tail_reads_back_without_leaving_it() {
    // The last 300 bytes of the image end exactly at the partition end: an O_DIRECT read
    // rounded up to the block size would leave the partition, so the tail is read through
    // the (dropped) cache instead.
    let mut env = Env::new();
    let image = noise((2 * MIB + 300) as usize, 32);
    let mut t = raw_target(
        &image,
        Box::new(BytesSource::new("mem://full", image.clone(), 65536)),
    );
    t.image.part_len = image.len() as u64;
    let opts = small_opts(Readback::Uncached);
    let (r, _, _) = run(&mut env, plan(vec![t]), &opts, false).await;
    assert_eq!(r.unwrap().targets[0].readback, Some(ReadbackMethod::Direct));
    assert!(env.disk()[B_OFF as usize..B_OFF as usize + image.len()] == image[..]);
    env.assert_outside_b_untouched();
}

/// The real gptprio backend on an sgdisk-made Flatcar disk: a failed install leaves USR-B
/// unbootable (cgpt says priority 0, tries 0) and USR-A untouched; a good one is staged by
/// the caller afterwards. Needs sgdisk and cgpt.
#[tokio::test]
async fn real_gpt_and_gptprio_failed_install_leaves_b_unbootable_and_a_untouched() {
    use update_agent::boot::gptprio::GptPrio;
    use update_agent_sandbox::testimg::{
        cgpt_field, require_tool, run as tool, sgdisk_verify, Layout,
    };
    if !require_tool("sgdisk", "gdisk").unwrap() || !require_tool("cgpt", "cgpt").unwrap() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flatcar.img");
    Layout::Flatcar.create(&path).unwrap();
    // Leave USR-B looking like a half-staged slot (priority 1, one try) so `disable` has
    // something to clear.
    tool(
        "sgdisk",
        &["-A=4:set:48".into(), "-A=4:set:52".into()],
        &path,
    )
    .unwrap();
    assert_eq!(cgpt_field(&path, 4, "-P").unwrap(), 1);

    let mut boot = GptPrio::new(
        FileDevice::open(&path).unwrap(),
        "flatcar.img",
        Layout::Flatcar.config(),
    )
    .unwrap();
    let slots = boot.slots().unwrap();
    let (a, b) = (
        slots.get(SlotId::A).parts["usr"].clone(),
        slots.get(SlotId::B).parts["usr"].clone(),
    );
    // Give USR-A content to protect.
    FileDevice::open(&path)
        .unwrap()
        .write_at(&noise(a.byte_len as usize, 77), a.byte_offset)
        .unwrap();
    let a_before = sha(&std::fs::read(&path).unwrap()
        [a.byte_offset as usize..(a.byte_offset + a.byte_len) as usize]);

    let image = noise((3 * MIB + 512) as usize, 78);
    let entry = |sha256: [u8; 32]| updater_proto::ImageEntry {
        role: "usr".into(),
        url: "usr.img".into(),
        size: image.len() as u64,
        sha256: hex::encode(sha256),
        compression: Compression::None,
        compressed_size: image.len() as u64,
        compressed_sha256: hex::encode(sha256),
        chunk_index: None,
    };
    let opts = InstallOptions {
        readback: Readback::Uncached,
        ..small_opts(Readback::Off)
    };
    let mut bad = sha(&image);
    bad[0] ^= 1;
    let e = entry(bad);
    let t = TargetImage::from_entry(
        &e,
        &digests_of(&e),
        &b,
        Box::new(BytesSource::new("usr.img", image.clone(), 65536)),
    );
    let dev: Arc<Mutex<dyn BlockDevice>> = Arc::new(Mutex::new(FileDevice::open(&path).unwrap()));
    let p = InstallPlan {
        slot: SlotId::B,
        device: "flatcar.img".into(),
        targets: vec![t],
    };
    let e = install(p, dev.clone(), &mut boot, &opts, &mut NoResume, &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "hash_mismatch", "{e}");
    assert_eq!(cgpt_field(&path, 4, "-P").unwrap(), 0, "USR-B disabled");
    assert_eq!(cgpt_field(&path, 4, "-T").unwrap(), 0);
    assert_eq!(
        cgpt_field(&path, 3, "-P").unwrap(),
        1,
        "USR-A keeps its flags"
    );
    assert_eq!(cgpt_field(&path, 3, "-S").unwrap(), 1);
    sgdisk_verify(&path).unwrap();
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(
        sha(&disk[a.byte_offset as usize..(a.byte_offset + a.byte_len) as usize]),
        a_before
    );
    assert_eq!(boot.status().unwrap().next, Some(SlotId::A));

    let e = entry(sha(&image));
    let t = TargetImage::from_entry(
        &e,
        &digests_of(&e),
        &b,
        Box::new(BytesSource::new("usr.img", image.clone(), 65536)),
    );
    let p = InstallPlan {
        slot: SlotId::B,
        device: "flatcar.img".into(),
        targets: vec![t],
    };
    let r = install(p, dev, &mut boot, &opts, &mut NoResume, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(r.targets[0].readback, Some(ReadbackMethod::Direct));
    assert_eq!(
        cgpt_field(&path, 4, "-P").unwrap(),
        0,
        "install itself never stages"
    );
    boot.stage(SlotId::B).unwrap();
    assert_eq!(cgpt_field(&path, 4, "-P").unwrap(), 2);
    assert_eq!(cgpt_field(&path, 4, "-T").unwrap(), 1);
    assert_eq!(cgpt_field(&path, 4, "-S").unwrap(), 0);
    sgdisk_verify(&path).unwrap();
    let disk = std::fs::read(&path).unwrap();
    assert!(disk[b.byte_offset as usize..b.byte_offset as usize + image.len()] == image[..]);
    assert_eq!(
        sha(&disk[a.byte_offset as usize..(a.byte_offset + a.byte_len) as usize]),
        a_before
    );
}

// ---- Direct I/O on a real FileDevice (issue 15) ----

use update_agent::disk::Bypass;

/// (offset, length, memory misalignment) cases: aligned, unaligned head, unaligned tail,
/// both, inside one sector, from unaligned memory, larger than the bounce buffer.
const RANGES: [(u64, usize, usize); 7] = [
    (4096, 65536, 0),
    (4096 + 100, 5000, 0),
    (512 * 3, 512 * 9 + 7, 0),
    (1000, 100, 0),
    (512 * 7, 512 * 33, 3),
    (MIB - 1, (2 * MIB) as usize + 515, 1),
    (0, 1536, 0),
];

/// Pages of `path` resident in the page cache, by `fincore` (util-linux), independently of us.
fn resident_bytes(path: &std::path::Path) -> Option<u64> {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Write each of [`RANGES`] through `dev` (opened on `path`, which `read_medium` reads
/// independently), flush, and check that the written pages are not left in the cache, that
/// exactly those bytes changed, and that the uncached reader returns them.
fn exercise(mut dev: FileDevice, path: &std::path::Path, read_medium: &dyn Fn() -> Vec<u8>) {
    let mut expect = read_medium();
    let size = dev.size();
    for (i, (off, len, skew)) in RANGES.into_iter().enumerate() {
        dev.drop_cache(0, size).unwrap();
        let data = noise(len + skew, 1000 + i as u64);
        dev.write_at(&data[skew..], off).unwrap();
        dev.flush().unwrap();
        if let Some(res) = resident_bytes(path) {
            // Direct writes never enter the cache; buffered pieces are dropped at the flush.
            assert_eq!(
                res,
                0,
                "range {i}: {res} bytes of {} cached",
                path.display()
            );
        }
        expect[off as usize..off as usize + len].copy_from_slice(&data[skew..]);
        let now = read_medium();
        assert!(now == expect, "range {i} ({off}+{len}): disk differs");
        let reader = dev.uncached_reader().unwrap().unwrap();
        assert_eq!(reader.bypass(), dev.write_bypass());
        let mut back = vec![0u8; len + 5];
        reader.read_at(&mut back[5 - skew..][..len], off).unwrap();
        assert!(
            back[5 - skew..][..len] == data[skew..],
            "range {i}: read-back"
        );
    }
    // Gathered writes: aligned pieces go as one request, anything else piece by piece; the
    // medium ends up the same either way.
    for (i, (off, lens, skew)) in VECTORED.into_iter().enumerate() {
        dev.drop_cache(0, size).unwrap();
        let pieces: Vec<(Vec<u8>, usize)> = lens
            .iter()
            .enumerate()
            .map(|(j, len)| aligned_noise(*len, skew, 3000 + (i * 10 + j) as u64))
            .collect();
        let bufs: Vec<&[u8]> = pieces
            .iter()
            .zip(lens)
            .map(|((v, at), len)| &v[*at..*at + len])
            .collect();
        dev.write_vectored_at(&bufs, off).unwrap();
        dev.flush().unwrap();
        if let Some(res) = resident_bytes(path) {
            assert_eq!(res, 0, "gathered {i}: {res} bytes cached");
        }
        let mut at = off as usize;
        for b in &bufs {
            expect[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        assert!(
            read_medium() == expect,
            "gathered {i} at {off}: disk differs"
        );
    }
    let past_end = vec![0u8; 8192];
    let e = dev
        .write_vectored_at(&[&past_end[..4096], &past_end[4096..]], size - 4096)
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
}

/// Gathered writes: (offset, piece lengths, misalignment of each piece's memory).
const VECTORED: [(u64, &[usize], usize); 4] = [
    (8192, &[65536, 262144, 4096], 0),
    (MIB, &[4096 * 3, 4096 * 5 + 100, 512], 0),
    (4096 * 7 + 512, &[4096, 8192], 0),
    (2 * MIB, &[8192, 4096], 1),
];

/// `len` noise bytes at an address `skew` bytes past a 4096-byte boundary: the buffer and
/// where they start in it.
fn aligned_noise(len: usize, skew: usize, seed: u64) -> (Vec<u8>, usize) {
    let mut v = vec![0u8; len + 8192];
    let at = v.as_ptr().align_offset(4096) + skew;
    v[at..at + len].copy_from_slice(&noise(len, seed));
    (v, at)
}

/// A noise-filled image file of `len` bytes under `dir`, with nothing of it in the cache.
fn cold_image(dir: &std::path::Path, len: u64) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, noise(len as usize, 7)).unwrap();
    let f = File::open(&path).unwrap();
    f.sync_all().unwrap();
    FileDevice::open_read_only(&path)
        .unwrap()
        .drop_cache(0, len)
        .unwrap();
    path
}

#[test]
fn image_file_takes_aligned_and_unaligned_writes_exactly_with_o_direct() {
    let dir = tempfile::tempdir().unwrap();
    let path = cold_image(dir.path(), 4 * MIB);
    let dev = FileDevice::open(&path).unwrap();
    assert_eq!(dev.write_bypass(), Bypass::Direct, "ext4 takes O_DIRECT");
    exercise(dev, &path, &|| std::fs::read(&path).unwrap());
}

#[test]
fn buffered_writes_are_exact_and_leave_no_pages_cached() {
    // The path taken where the kernel refuses O_DIRECT, forced on an ordinary file system.
    let dir = tempfile::tempdir().unwrap();
    let path = cold_image(dir.path(), 4 * MIB);
    let dev = FileDevice::open_buffered(&path).unwrap();
    assert_eq!(dev.write_bypass(), Bypass::DropCache);
    exercise(dev, &path, &|| std::fs::read(&path).unwrap());
}

/// Run `cmd` with `args`; `Err` with its stderr when it fails or cannot start.
fn sh(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn ramfs_refuses_o_direct_and_the_device_falls_back_to_buffered_writes() {
    // tmpfs accepts O_DIRECT since Linux 6.6; ramfs still refuses it (EINVAL on open).
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("ramfs");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(e) = sh("mount", &["-t", "ramfs", "ramfs", mnt.to_str().unwrap()]) {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root and must mount ramfs: {e}"
        );
        eprintln!("skipping: cannot mount ramfs (needs root): {e}");
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let path = mnt.join("disk.img");
        std::fs::write(&path, noise((4 * MIB) as usize, 7)).unwrap();
        let dev = FileDevice::open(&path).unwrap();
        assert_eq!(dev.write_bypass(), Bypass::DropCache);
        let mut expect = std::fs::read(&path).unwrap();
        let mut dev = dev;
        for (i, (off, len, skew)) in RANGES.into_iter().enumerate() {
            let data = noise(len + skew, 2000 + i as u64);
            dev.write_at(&data[skew..], off).unwrap();
            dev.flush().unwrap();
            expect[off as usize..off as usize + len].copy_from_slice(&data[skew..]);
            let r = dev.uncached_reader().unwrap().unwrap();
            assert_eq!(r.bypass(), Bypass::DropCache);
            let mut back = vec![0u8; len];
            r.read_at(&mut back, off).unwrap();
            assert!(back == data[skew..]);
        }
        assert!(std::fs::read(&path).unwrap() == expect);
    });
    let _ = sh("umount", &[mnt.to_str().unwrap()]);
    result.unwrap();
}

/// Attach `path` to a free loop device with direct I/O on the backing file; `None` (and why)
/// when this process may not.
fn attach_loop(path: &std::path::Path) -> Option<String> {
    match sh(
        "losetup",
        &["--find", "--show", "--direct-io=on", path.to_str()?],
    ) {
        Ok(d) => Some(d),
        Err(e) => {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI runs as root and must attach a loop device: {e}"
            );
            eprintln!("skipping: cannot attach a loop device (needs root and /dev/loop*): {e}");
            None
        }
    }
}

#[test]
fn loop_device_takes_aligned_and_unaligned_writes_exactly_with_o_direct() {
    let dir = tempfile::tempdir().unwrap();
    let path = cold_image(dir.path(), 4 * MIB);
    let Some(loopdev) = attach_loop(&path) else {
        return;
    };
    let result = std::panic::catch_unwind(|| {
        let dev = FileDevice::open(&loopdev).unwrap();
        assert_eq!(dev.size(), 4 * MIB);
        assert_eq!(dev.write_bypass(), Bypass::Direct);
        let read = || {
            let f = File::open(&loopdev).unwrap();
            let mut v = vec![0u8; (4 * MIB) as usize];
            f.read_exact_at(&mut v, 0).unwrap();
            v
        };
        exercise(dev, std::path::Path::new(&loopdev), &read);
    });
    let _ = sh("losetup", &["-d", &loopdev]);
    result.unwrap();
}

/// What a [`Flushes`] device saw.
#[derive(Default)]
struct DevLog {
    /// End of the furthest write.
    written: u64,
    /// End covered by the last flush.
    flushed: u64,
    /// The end covered by each flush, in order.
    flushes: Vec<u64>,
    /// Each `read_at`: offset, end, and the flushed end at that moment.
    reads: Vec<(u64, u64, u64)>,
}

/// A FileDevice that remembers how far its writes reached, what each flush covered and
/// what it was asked to read.
struct Flushes {
    inner: FileDevice,
    state: Arc<Mutex<DevLog>>,
}

impl BlockDevice for Flushes {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        {
            let mut s = self.state.lock().unwrap();
            let flushed = s.flushed;
            s.reads.push((offset, offset + buf.len() as u64, flushed));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        let mut s = self.state.lock().unwrap();
        s.written = s.written.max(offset + buf.len() as u64);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()?;
        let mut s = self.state.lock().unwrap();
        s.flushed = s.written;
        let end = s.written;
        s.flushes.push(end);
        Ok(())
    }
    fn uncached_reader(&self) -> Option<io::Result<update_agent::disk::UncachedReader>> {
        self.inner.uncached_reader()
    }
}

/// Resume records with the flushed end at the moment each was recorded.
struct DurableSink {
    state: Arc<Mutex<DevLog>>,
    seen: Vec<(ResumeRecord, u64)>,
}

impl update_agent::install::ResumeSink for DurableSink {
    fn record(
        &mut self,
        rec: &ResumeRecord,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let flushed = self.state.lock().unwrap().flushed;
        self.seen.push((rec.clone(), flushed));
        Ok(())
    }
}

/// Install `image` into a real image file through FileDevice at `part_offset` (`part_len`
/// long) with uncached read-back; returns the report, the records with the flushed end at
/// each, and the disk before and after.
async fn install_on_file(
    image: &[u8],
    part_offset: u64,
    part_len: u64,
) -> (
    update_agent::install::InstallReport,
    Vec<(ResumeRecord, u64)>,
    Vec<u8>,
    Vec<u8>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = cold_image(dir.path(), DISK);
    let before = std::fs::read(&path).unwrap();
    let state = Arc::new(Mutex::new(DevLog::default()));
    let dev: Arc<Mutex<dyn BlockDevice>> = Arc::new(Mutex::new(Flushes {
        inner: FileDevice::open(&path).unwrap(),
        state: state.clone(),
    }));
    let mut t = raw_target(
        image,
        Box::new(BytesSource::new("mem://root", image.to_vec(), 65536)),
    );
    t.image.part_offset = part_offset;
    t.image.part_len = part_len;
    let mut boot = FakeBoot {
        log: Log::default(),
        disabled: Vec::new(),
    };
    let mut sink = DurableSink {
        state,
        seen: Vec::new(),
    };
    let opts = small_opts(Readback::Uncached);
    let r = install(plan(vec![t]), dev, &mut boot, &opts, &mut sink, &mut |_| {})
        .await
        .unwrap();
    (r, sink.seen, before, std::fs::read(&path).unwrap())
}

#[tokio::test]
async fn install_into_aligned_and_unaligned_partitions_of_an_image_file_reads_back_direct() {
    for (i, (off, len, size)) in [
        (B_OFF, PART, 3 * MIB),
        (B_OFF, PART, 3 * MIB + 300),
        (B_OFF + 100, PART - 100, 2 * MIB + 1000),
        (B_OFF + 512, 3 * MIB + 300, 3 * MIB + 300),
    ]
    .into_iter()
    .enumerate()
    {
        let image = noise(size as usize, 300 + i as u64);
        let (r, records, before, after) = install_on_file(&image, off, len).await;
        let t = &r.targets[0];
        assert_eq!(t.readback, Some(ReadbackMethod::Direct), "case {i}");
        let (o, e) = (off as usize, (off + len) as usize);
        assert!(after[o..o + image.len()] == image[..], "case {i}: image");
        assert!(
            after[o + image.len()..e] == before[o + image.len()..e],
            "case {i}: tail"
        );
        assert!(after[..o] == before[..o], "case {i}: before the partition");
        assert!(after[e..] == before[e..], "case {i}: after the partition");
        // Every checkpoint was recorded only once the device had flushed that far.
        assert!(records.len() >= 3, "case {i}: {} records", records.len());
        for (rec, flushed) in &records {
            assert!(
                off + rec.written <= *flushed,
                "case {i}: record of {} bytes before the flush reached them ({flushed})",
                rec.written
            );
        }
        assert!(records.last().unwrap().0.complete);
    }
}

#[tokio::test]
async fn stage_timings_are_in_the_report_and_its_json() {
    let image = noise((3 * MIB) as usize, 400);
    let (r, _, _, _) = install_on_file(&image, B_OFF, PART).await;
    let s = r.targets[0].stages;
    for (name, d) in [
        ("download", s.download),
        ("hash", s.hash),
        ("write", s.write),
        ("flush", s.flush),
        ("readback", s.readback),
    ] {
        assert!(d > std::time::Duration::ZERO, "{name} took no time: {s:?}");
    }
    assert_eq!(
        s.decode,
        std::time::Duration::ZERO,
        "raw image: nothing decoded"
    );
    let json = serde_json::to_value(&r.targets[0]).unwrap();
    for k in ["download", "decode", "hash", "write", "flush", "readback"] {
        let key = format!("{k}_ms");
        assert!(
            json["stages"][&key].is_u64(),
            "stages.{key} missing in {json}"
        );
    }
    assert_eq!(
        json["stages"]["write_ms"].as_u64().unwrap(),
        update_agent::jsonout::millis::to_ms(s.write)
    );
    assert_eq!(
        json["write_ms"].as_u64().unwrap(),
        update_agent::jsonout::millis::to_ms(r.targets[0].write_time)
    );
    // And a zstd image spends time decoding.
    let mut env = Env::new();
    let image = compressible((2 * MIB) as usize);
    let wire = zstd::encode_all(&image[..], 3).unwrap();
    let (r, _, _) = run(
        &mut env,
        plan(vec![zstd_target(&image, &wire, 4096)]),
        &small_opts(Readback::Device),
        false,
    )
    .await;
    let s = r.unwrap().targets[0].stages;
    assert!(
        s.decode > std::time::Duration::ZERO && s.hash > std::time::Duration::ZERO,
        "{s:?}"
    );
}

/// With read-back on, flushed ranges reach the verifier every quarter checkpoint (so only a
/// quarter is left to read after the last write), it reads nothing the device has not
/// flushed, and the resume records keep their checkpoint cadence; without read-back the
/// device is flushed once per checkpoint only.
#[tokio::test]
async fn read_back_follows_quarter_checkpoints_of_flushed_bytes() {
    let image = noise((4 * MIB + 1000) as usize, 77);
    for readback in [Readback::Device, Readback::Off] {
        let dir = tempfile::tempdir().unwrap();
        let path = cold_image(dir.path(), DISK);
        let state = Arc::new(Mutex::new(DevLog::default()));
        let dev: Arc<Mutex<dyn BlockDevice>> = Arc::new(Mutex::new(Flushes {
            inner: FileDevice::open(&path).unwrap(),
            state: state.clone(),
        }));
        let t = raw_target(
            &image,
            Box::new(BytesSource::new("mem://root", image.clone(), 65536)),
        );
        let mut boot = FakeBoot {
            log: Log::default(),
            disabled: Vec::new(),
        };
        let mut records: Vec<ResumeRecord> = Vec::new();
        let opts = small_opts(readback);
        install(
            plan(vec![t]),
            dev,
            &mut boot,
            &opts,
            &mut records,
            &mut |_| {},
        )
        .await
        .unwrap();
        let cps: Vec<u64> = records.iter().map(|r| r.written).collect();
        assert_eq!(
            cps,
            vec![MIB, 2 * MIB, 3 * MIB, 4 * MIB, image.len() as u64],
            "{readback:?}"
        );
        let s = state.lock().unwrap();
        let quarter = MIB / 4;
        let image_flushes: Vec<u64> = s
            .flushes
            .iter()
            .filter(|&&e| e > B_OFF)
            .map(|e| e - B_OFF)
            .collect();
        match readback {
            Readback::Off => assert_eq!(
                image_flushes,
                vec![MIB, 2 * MIB, 3 * MIB, 4 * MIB, image.len() as u64]
            ),
            _ => {
                let want: Vec<u64> = (1..=16)
                    .map(|i| i * quarter)
                    .chain([image.len() as u64])
                    .collect();
                assert_eq!(image_flushes, want);
                let reads: Vec<&(u64, u64, u64)> =
                    s.reads.iter().filter(|r| r.0 >= B_OFF).collect();
                assert!(!reads.is_empty());
                for (off, end, flushed) in reads {
                    assert!(
                        end <= flushed,
                        "read {off}..{end} past the flushed end {flushed}"
                    );
                }
            }
        }
    }
}
