//! The install pipeline: stream images into the inactive slot's partitions with bounded memory.
//!
//! ```text
//! source (async task) --bounded channel of fixed-size buffers--> writer (blocking thread):
//!   [zstd decode, window capped] -> SHA-256 -> aligned writes into the partition range
//!   -> fsync at each checkpoint (resume record) and at the end -> read-back bypassing the
//!   page cache -> SHA-256 compared with the manifest
//! ```
//! [`install`] disables the target slot through [`BootControl`] before the first byte is
//! written and never stages it: the caller stages only after `install` returned `Ok`. Every
//! failure therefore leaves the slot unbootable. Bytes outside the target partitions are never
//! written (each write is checked against the partition range). The partition tail beyond the
//! image is left as it is, like RAUC and Bottlerocket: the image carries its own length.
//!
//! Memory: at most `channel_capacity + 2` input buffers, seven write buffers (four of them
//! held for one gathered device write) and two read-back buffers of `buffer_size` bytes each,
//! plus the zstd window (`2^zstd_window_log_max`), whatever the image size. See [`InstallOptions::memory_bound`].
//!
//! Threads: the download runs as a tokio task (wire hash); a decode stage (zstd), a hash stage
//! (image SHA-256: its own thread for zstd, inline in the decode stage for raw images) and a
//! disk stage (`O_DIRECT` writes, fsync at checkpoints) run on blocking threads joined by
//! one-slot channels; a verifier thread reads back each flushed range as soon as it is
//! fsynced, so the read-back overlaps the download and only the tail is read after the end.

mod readback;
mod source;
mod writer;

pub use readback::{Readback, ReadbackMethod};
pub(crate) use source::FileSource;
pub use source::{BytesSource, ChunkFuture, ImageSource, SourceChunk, SourceError};

use crate::boot::{BootControl, BootError, SlotId};
// The aligned buffers are the disk's (direct I/O); the pipeline's stages name them `buf::`.
use crate::disk::buf::{self, AlignedBuf, IO_ALIGN};
use crate::disk::BlockDevice;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, info_span, warn, Instrument};

/// Default size of each pipeline buffer: large sequential writes, few syscalls.
pub(crate) const DEFAULT_BUFFER_SIZE: usize = 1 << 20;
/// Default number of buffers in flight between the download task and the writer.
pub(crate) const DEFAULT_CHANNEL_CAPACITY: usize = 2;
/// Default distance between durable checkpoints (fsync, then resume record).
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 64 << 20;
/// Default cap on the zstd window: 2^23 = 8 MiB. Frames needing more are refused, so the
/// publisher must compress with `--long` no more than 23 (levels <= 19 stay within it).
pub(crate) const DEFAULT_ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// How an image is encoded on the wire: the manifest's own type, so they cannot disagree.
pub use updater_proto::Compression;

/// Where to resume a target from, as recorded by an earlier run's [`ResumeRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// Image bytes already durable on disk from the partition start.
    pub written: u64,
    /// The validator of the object those bytes came from.
    pub etag: Option<String>,
}

/// The image going into one partition of the target slot: where it goes, what it must be
/// once decoded (size, SHA-256) and how it arrives (encoding, wire size and digest).
///
/// The one description of a target: [`TargetImage`] holds it, the writer thread borrows it,
/// and a [`ResumeRecord`] is tied to it ([`ResumeRecord::start`], [`ResumeRecord::matches`]).
#[derive(Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The image's role in the slot (`boot`, `root`, `verity`...).
    pub role: String,
    /// Absolute byte offset of the partition on the device.
    pub part_offset: u64,
    /// Partition length in bytes.
    pub part_len: u64,
    /// Size of the (decompressed) image.
    pub size: u64,
    /// SHA-256 of the (decompressed) image.
    pub sha256: [u8; 32],
    pub compression: Compression,
    /// Bytes on the wire; equal to `size` when `compression` is `None`.
    pub compressed_size: u64,
    /// SHA-256 of the bytes on the wire, when the manifest gives one.
    pub compressed_sha256: Option<[u8; 32]>,
}

impl std::fmt::Debug for ImageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSpec")
            .field("role", &self.role)
            .field("part_offset", &self.part_offset)
            .field("part_len", &self.part_len)
            .field("size", &self.size)
            .field("sha256", &hex::encode(self.sha256))
            .field("compression", &self.compression)
            .field("compressed_size", &self.compressed_size)
            .finish()
    }
}

impl ImageSpec {
    /// A verified manifest entry going into `part`, a partition of the inactive slot, with
    /// the digests verification parsed. The size checks happen in [`install`].
    pub fn from_entry(
        entry: &updater_proto::ImageEntry,
        digests: &updater_proto::ImageDigests,
        part: &crate::disk::slots::Partition,
    ) -> ImageSpec {
        ImageSpec {
            role: entry.role.clone(),
            part_offset: part.byte_offset,
            part_len: part.byte_len,
            size: entry.size,
            sha256: digests.sha256.0,
            compression: entry.compression,
            compressed_size: entry.compressed_size,
            compressed_sha256: Some(digests.compressed_sha256.0),
        }
    }

    /// The same image arriving already decoded (a delta source yields image bytes): a
    /// `compression = none` stream whose wire bytes are the image.
    pub(crate) fn decoded(self) -> ImageSpec {
        ImageSpec {
            compression: Compression::None,
            compressed_size: self.size,
            compressed_sha256: Some(self.sha256),
            ..self
        }
    }
}

/// One image to write into one partition of the target slot, with where its bytes come from.
pub struct TargetImage {
    /// What is written where.
    pub image: ImageSpec,
    pub source: Box<dyn ImageSource>,
    /// Continue an interrupted install (see [`ResumeRecord`] for what is honoured).
    pub resume: Option<ResumePoint>,
}

impl std::fmt::Debug for TargetImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetImage")
            .field("image", &self.image)
            .field("source", &self.source.describe())
            .field("resume", &self.resume)
            .finish()
    }
}

impl TargetImage {
    /// The target for a verified manifest entry going into `part` (see
    /// [`ImageSpec::from_entry`]), read from `source`, not resumed.
    pub fn from_entry(
        entry: &updater_proto::ImageEntry,
        digests: &updater_proto::ImageDigests,
        part: &crate::disk::slots::Partition,
        source: Box<dyn ImageSource>,
    ) -> TargetImage {
        TargetImage {
            image: ImageSpec::from_entry(entry, digests, part),
            source,
            resume: None,
        }
    }
}

/// Everything to write into one slot.
#[derive(Debug)]
pub struct InstallPlan {
    /// The inactive slot; disabled before the first write, never staged here.
    pub slot: SlotId,
    /// The device's name (path) for messages.
    pub device: String,
    pub targets: Vec<TargetImage>,
}

/// Tuning and policy of the pipeline.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Size of each buffer; a multiple of [`IO_ALIGN`].
    pub buffer_size: usize,
    /// Buffers in flight between download and writer (backpressure on the network).
    pub channel_capacity: usize,
    /// fsync and record a resume checkpoint every this many image bytes.
    pub checkpoint_bytes: u64,
    /// Largest zstd window accepted, as a power of two.
    pub zstd_window_log_max: u32,
    /// How to verify what reached the disk.
    pub readback: Readback,
    /// Stops the install at its next chunk boundary (or while it waits for one) with
    /// [`InstallError::Cancelled`]; the checkpoints recorded so far stay valid.
    pub cancel: Option<CancelToken>,
}

/// A request to stop a running install, shared between the installer and whoever cancels it.
#[derive(Debug, Clone)]
pub struct CancelToken(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for CancelToken {
    fn default() -> Self {
        CancelToken(Arc::new(tokio::sync::watch::Sender::new(false)))
    }
}

impl CancelToken {
    /// Ask the install to stop.
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once [`CancelToken::cancel`] was called (at once if it already was).
    pub(crate) async fn cancelled(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// The source error kind of a pump stopped by its [`CancelToken`].
const CANCEL_KIND: &str = "cancel_requested";

impl Default for InstallOptions {
    /// Defaults; `readback` reads through the device's page cache: set
    /// [`Readback::Uncached`] to read the medium.
    fn default() -> Self {
        InstallOptions {
            buffer_size: DEFAULT_BUFFER_SIZE,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            zstd_window_log_max: DEFAULT_ZSTD_WINDOW_LOG_MAX,
            readback: Readback::Device,
            cancel: None,
        }
    }
}

impl InstallOptions {
    /// Upper bound of the pipeline's buffer memory in bytes, independent of image size:
    /// input buffers (channel + one being filled + one being consumed), seven write buffers
    /// (filling, queued, hashing, and the disk stage's batch of four gathered into one device write
    /// without a copy; a raw image passes its input buffers through to the disk stage
    /// instead, which then holds up to five of them and the decode stage one write buffer),
    /// two read-back buffers, and the zstd window plus its block buffers.
    pub fn memory_bound(&self) -> u64 {
        let b = self.buffer_size as u64;
        let inputs = (self.channel_capacity as u64 + 2) * b;
        let zstd = (1u64 << self.zstd_window_log_max) + (256 << 10);
        inputs + writer::WRITE_BUFFERS as u64 * b + 2 * b + zstd
    }
}

/// What the pipeline is doing, for progress bars and JSON lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The slot was made unbootable.
    Disabled,
    /// Re-hashing bytes already on disk to resume.
    Rehashing,
    /// Downloading, decompressing, hashing and writing.
    Writing,
    /// The source restarted from byte 0; counters reset.
    Restarted,
    /// fsync of the written range.
    Flushing,
    /// Reading back what reached the disk.
    Verifying,
    /// The target is written and verified.
    Done,
}

/// One progress report. `done`/`total` are image bytes of the target `role`. `Verifying`
/// reports interleave with `Writing` ones: each fsynced range (a quarter of a checkpoint)
/// is read back while the download continues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressEvent {
    pub slot: SlotId,
    pub role: String,
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
}

/// A durable checkpoint: everything up to `written` image bytes is on disk (fsynced) before
/// this record is handed to the [`ResumeSink`].
///
/// Resume policy: for `compression = none` an interrupted target continues from `written`
/// (the bytes on disk are re-hashed, then the download continues with a Range request).
/// A zstd stream's decoder state is not persisted, so a zstd target restarts from 0;
/// its records say `resumable: false`. A record with `complete: true` lets a later run skip
/// a target whose bytes on disk still hash to the expected value.
///
/// Kept as its own serde struct because it is the on-disk format of `resume.json` (field
/// names and the hex digest are fixed); it is made from an [`ImageSpec`] only in
/// [`ResumeRecord::start`] and tied back to one only in [`ResumeRecord::matches`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRecord {
    pub slot: SlotId,
    pub role: String,
    pub url: String,
    /// Hex SHA-256 of the image, to tie the record to one manifest entry.
    pub expected_sha256: String,
    pub compression: Compression,
    /// Bytes of the wire stream consumed.
    pub compressed_offset: u64,
    /// Image bytes durable on disk from the partition start.
    pub written: u64,
    pub etag: Option<String>,
    /// True when `written` can be fed back as a [`ResumePoint`].
    pub resumable: bool,
    /// The whole target is written and verified.
    pub complete: bool,
}

impl ResumeRecord {
    /// The first record of `image` going into `slot` from `url`: nothing written yet.
    pub(crate) fn start(
        slot: SlotId,
        url: String,
        image: &ImageSpec,
        etag: Option<String>,
    ) -> ResumeRecord {
        ResumeRecord {
            slot,
            role: image.role.clone(),
            url,
            expected_sha256: hex::encode(image.sha256),
            compression: image.compression,
            compressed_offset: 0,
            written: 0,
            etag,
            resumable: image.compression == Compression::None,
            complete: false,
        }
    }

    /// This record is about `image` going into `slot` (same role and image SHA-256).
    pub(crate) fn matches(&self, slot: SlotId, image: &ImageSpec) -> bool {
        self.slot == slot
            && self.role == image.role
            && self.expected_sha256 == hex::encode(image.sha256)
    }

    /// The resume point to pass back in [`TargetImage::resume`].
    pub fn resume_point(&self) -> ResumePoint {
        ResumePoint {
            written: self.written,
            etag: self.etag.clone(),
        }
    }
}

/// Where checkpoints go (the state store in the agent; a Vec in tests).
pub trait ResumeSink {
    fn record(
        &mut self,
        rec: &ResumeRecord,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// A sink that drops records, for callers that do not resume.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoResume;

impl ResumeSink for NoResume {
    fn record(&mut self, _: &ResumeRecord) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

impl ResumeSink for Vec<ResumeRecord> {
    fn record(
        &mut self,
        rec: &ResumeRecord,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.push(rec.clone());
        Ok(())
    }
}

/// What happened to one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetReport {
    pub role: String,
    /// Image bytes written in this run (excluding resumed or reused bytes).
    pub bytes_written: u64,
    /// Wire bytes received in this run.
    pub bytes_fetched: u64,
    /// Image bytes taken from disk instead of the network (resume or reuse).
    pub resumed_from: u64,
    /// The disk already held the verified image; nothing was fetched or written.
    pub reused: bool,
    pub sha256: String,
    /// How the read-back was done (`None` when disabled).
    pub readback: Option<ReadbackMethod>,
    /// From the first byte to the final fsync and the stream hash check (`write_ms`).
    #[serde(rename = "write_ms", with = "crate::jsonout::millis")]
    pub write_time: Duration,
    /// Read-back time after the final fsync (the tail); earlier ranges are read back while
    /// the download runs. For a reused target, the whole verification (`readback_ms`).
    #[serde(rename = "readback_ms", with = "crate::jsonout::millis")]
    pub readback_time: Duration,
    /// Where the time went, stage by stage.
    #[serde(default)]
    pub stages: StageTimes,
}

/// Time each stage of one target spent working (or, for `download`, waiting for the source),
/// in JSON as `<stage>_ms` (whole milliseconds). The stages run on their own threads and overlap, so they do not add up to the
/// wall time: the largest one is the bottleneck.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTimes {
    /// Waiting for the source's next chunk (the network, or a local file).
    #[serde(rename = "download_ms", with = "crate::jsonout::millis")]
    pub download: Duration,
    /// zstd decompression (zero for raw images).
    #[serde(rename = "decode_ms", with = "crate::jsonout::millis")]
    pub decode: Duration,
    /// SHA-256 of the image and of the wire bytes, in the stream.
    #[serde(rename = "hash_ms", with = "crate::jsonout::millis")]
    pub hash: Duration,
    /// Writes into the partition.
    #[serde(rename = "write_ms", with = "crate::jsonout::millis")]
    pub write: Duration,
    /// Flushes: at each checkpoint and at the end.
    #[serde(rename = "flush_ms", with = "crate::jsonout::millis")]
    pub flush: Duration,
    /// Read-back: reading the medium and hashing it again, on the verifier thread.
    #[serde(rename = "readback_ms", with = "crate::jsonout::millis")]
    pub readback: Duration,
}

/// Shared stage counters (nanoseconds), added to from every thread of one target.
#[derive(Debug, Default)]
pub(crate) struct StageClock {
    pub download: AtomicU64,
    pub decode: AtomicU64,
    pub hash: AtomicU64,
    pub write: AtomicU64,
    pub flush: AtomicU64,
    pub readback: AtomicU64,
}

impl StageClock {
    /// Add the time since `start` to `stage`.
    pub(crate) fn add(stage: &AtomicU64, start: Instant) {
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        stage.fetch_add(ns, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StageTimes {
        let d = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        StageTimes {
            download: d(&self.download),
            decode: d(&self.decode),
            hash: d(&self.hash),
            write: d(&self.write),
            flush: d(&self.flush),
            readback: d(&self.readback),
        }
    }
}

/// What happened to the slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallReport {
    pub slot: SlotId,
    pub targets: Vec<TargetReport>,
}

/// Install failures. Every variant names the role (image) and what was wrong; after any of
/// them the slot is left disabled.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("invalid install plan for slot {slot}: {reason}")]
    InvalidPlan { slot: SlotId, reason: String },
    #[error(
        "image {role} ({image_size} bytes) does not fit its partition in slot {slot} \
         ({part_len} bytes); nothing was written"
    )]
    TooLargeForPartition {
        slot: SlotId,
        role: String,
        image_size: u64,
        part_len: u64,
    },
    #[error(
        "{role}: the {what} stream from {url} is {} than declared: {}{actual} bytes, \
         manifest says {expected}",
        if *actual > *expected { "longer" } else { "shorter" },
        if *at_least { "at least " } else { "" }
    )]
    SizeMismatch {
        role: String,
        url: String,
        /// `compressed` (wire bytes) or `image` (decompressed bytes).
        what: &'static str,
        expected: u64,
        actual: u64,
        /// `actual` is a lower bound (the fetcher stopped at the first byte too many).
        at_least: bool,
    },
    #[error(
        "{role}: the zstd stream from {url} decompresses past the declared image size of \
         {limit} bytes; stopped before writing past it"
    )]
    DecompressedTooLong {
        role: String,
        url: String,
        limit: u64,
    },
    #[error("{role}: the zstd stream from {url} cannot be decoded: {source}")]
    Decompress {
        role: String,
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{role}: SHA-256 of the {what} from {url} is {actual}, the manifest says {expected}")]
    HashMismatch {
        role: String,
        url: String,
        /// `compressed stream` or `image`.
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error(
        "{role}: read-back of slot {slot} ({device} bytes {offset}..{end}, {method:?}) hashes \
         to {actual}, expected {expected}: the data on disk is not what was written"
    )]
    ReadbackMismatch {
        slot: SlotId,
        role: String,
        device: String,
        offset: u64,
        end: u64,
        method: ReadbackMethod,
        expected: String,
        actual: String,
    },
    #[error("{role}: I/O error while {op} {device} at byte {offset}: {source}")]
    Io {
        role: String,
        op: &'static str,
        device: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{role}: fetching {url} failed: {source}")]
    Fetch {
        role: String,
        url: String,
        #[source]
        source: SourceError,
    },
    #[error("boot control failed to {action} slot {slot}: {source}")]
    Boot {
        action: &'static str,
        slot: SlotId,
        #[source]
        source: BootError,
    },
    #[error("{role}: recording the resume checkpoint failed: {source}")]
    ResumeRecord {
        role: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "{role}: the install was cancelled; {written} image bytes are durable on disk and the \
         next install of this release resumes from them where it can"
    )]
    Cancelled { role: String, written: u64 },
    #[error("{role}: the install pipeline stopped unexpectedly: {reason}")]
    Internal { role: String, reason: String },
}

impl InstallError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            InstallError::InvalidPlan { .. } => "invalid_plan",
            InstallError::TooLargeForPartition { .. } => "too_large_for_partition",
            InstallError::SizeMismatch { .. } => "size_mismatch",
            InstallError::DecompressedTooLong { .. } => "decompressed_too_long",
            InstallError::Decompress { .. } => "decompress",
            InstallError::HashMismatch { .. } => "hash_mismatch",
            InstallError::ReadbackMismatch { .. } => "readback_mismatch",
            InstallError::Io { .. } => "io",
            InstallError::Fetch { .. } => "fetch",
            InstallError::Boot { .. } => "boot",
            InstallError::ResumeRecord { .. } => "resume_record",
            InstallError::Cancelled { .. } => "install_cancelled",
            InstallError::Internal { .. } => "internal",
        }
    }
}

/// Checks that need no I/O: sizes fit, ranges lie on the device and do not overlap, options
/// are usable. Nothing has been changed when this fails.
fn validate(plan: &InstallPlan, dev_size: u64, opts: &InstallOptions) -> Result<(), InstallError> {
    let invalid = |reason: String| InstallError::InvalidPlan {
        slot: plan.slot,
        reason,
    };
    if opts.buffer_size == 0 || opts.buffer_size % IO_ALIGN != 0 {
        return Err(invalid(format!(
            "buffer_size {} is not a positive multiple of {IO_ALIGN}",
            opts.buffer_size
        )));
    }
    if opts.channel_capacity == 0 {
        return Err(invalid("channel_capacity must be at least 1".into()));
    }
    if !(10..=31).contains(&opts.zstd_window_log_max) {
        return Err(invalid(format!(
            "zstd_window_log_max {} is outside 10..=31",
            opts.zstd_window_log_max
        )));
    }
    let mut ranges: Vec<(u64, u64, &str)> = Vec::new();
    for t in plan.targets.iter().map(|t| &t.image) {
        let end = t
            .part_offset
            .checked_add(t.part_len)
            .filter(|e| *e <= dev_size);
        let Some(end) = end else {
            return Err(invalid(format!(
                "{}: partition {}+{} lies beyond the end of {} ({dev_size} bytes)",
                t.role, t.part_offset, t.part_len, plan.device
            )));
        };
        if t.size > t.part_len {
            return Err(InstallError::TooLargeForPartition {
                slot: plan.slot,
                role: t.role.clone(),
                image_size: t.size,
                part_len: t.part_len,
            });
        }
        if t.compression == Compression::None && t.compressed_size != t.size {
            return Err(invalid(format!(
                "{}: uncompressed image declares compressed_size {} != size {}",
                t.role, t.compressed_size, t.size
            )));
        }
        if let Some((o, e, r)) = ranges
            .iter()
            .find(|(o, e, _)| t.part_offset < *e && *o < end)
        {
            return Err(invalid(format!(
                "{}: partition {}..{end} overlaps {r} at {o}..{e}",
                t.role, t.part_offset
            )));
        }
        ranges.push((t.part_offset, end, &t.role));
    }
    Ok(())
}

/// Write every target of `plan` into its partition and verify it.
///
/// Disables `plan.slot` first (so a half-written slot can never boot), then streams each
/// target in order. On `Ok` the slot holds the verified images and is still disabled: the
/// caller stages it. On `Err` the slot stays disabled and bytes outside the target
/// partitions are untouched.
pub async fn install(
    plan: InstallPlan,
    dev: Arc<Mutex<dyn BlockDevice>>,
    boot: &mut dyn BootControl,
    opts: &InstallOptions,
    resume: &mut dyn ResumeSink,
    progress: &mut dyn FnMut(ProgressEvent),
) -> Result<InstallReport, InstallError> {
    let span = info_span!("install", slot = %plan.slot, device = %plan.device);
    async move {
        let dev_size = dev
            .lock()
            .map_err(|_| InstallError::Internal {
                role: String::new(),
                reason: "block device lock poisoned".into(),
            })?
            .size();
        validate(&plan, dev_size, opts)?;
        let slot = plan.slot;
        boot.disable(slot).map_err(|source| InstallError::Boot {
            action: "disable",
            slot,
            source,
        })?;
        info!("slot disabled before writing");
        progress(ProgressEvent {
            slot,
            role: String::new(),
            phase: Phase::Disabled,
            done: 0,
            total: plan.targets.iter().map(|t| t.image.size).sum(),
        });
        let mut reports = Vec::with_capacity(plan.targets.len());
        for target in plan.targets {
            let role = target.image.role.clone();
            let report = install_target(slot, &plan.device, target, &dev, opts, resume, progress)
                .instrument(info_span!("target", role = %role))
                .await?;
            reports.push(report);
        }
        Ok(InstallReport {
            slot,
            targets: reports,
        })
    }
    .instrument(span)
    .await
}

/// Stream one target through the writer thread, forwarding its events.
async fn install_target(
    slot: SlotId,
    device: &str,
    target: TargetImage,
    dev: &Arc<Mutex<dyn BlockDevice>>,
    opts: &InstallOptions,
    sink: &mut dyn ResumeSink,
    progress: &mut dyn FnMut(ProgressEvent),
) -> Result<TargetReport, InstallError> {
    let TargetImage {
        image,
        mut source,
        resume,
    } = target;
    let url = source.describe();
    let (mode, start_at, resume_etag) = match resume {
        Some(r) if r.written == image.size => (writer::Mode::VerifyExisting, 0, None),
        Some(r)
            if image.compression == Compression::None
                && r.written > 0
                && r.written < image.size
                && r.written % IO_ALIGN as u64 == 0 =>
        {
            (writer::Mode::Write, r.written, r.etag)
        }
        Some(r) => {
            if r.written > 0 {
                warn!(
                    written = r.written,
                    compression = ?image.compression,
                    "resume point not usable for this target; starting from 0"
                );
            }
            (writer::Mode::Write, 0, None)
        }
        None => (writer::Mode::Write, 0, None),
    };
    let mut record = ResumeRecord::start(slot, url.clone(), &image, resume_etag.clone());
    let role = image.role.clone();
    let mut job = writer::Job {
        slot,
        url: url.clone(),
        device: device.to_string(),
        image,
        start_at,
        mode,
        buffer_size: opts.buffer_size,
        channel_capacity: opts.channel_capacity,
        checkpoint_bytes: opts.checkpoint_bytes.max(opts.buffer_size as u64),
        window_log_max: opts.zstd_window_log_max,
        readback: opts.readback,
        clock: Arc::default(),
        cancel: opts.cancel.clone(),
    };

    if mode == writer::Mode::VerifyExisting {
        let (outcome, ok) = run_job(job.clone(), None, dev, &role, &mut record, sink, progress)
            .await
            .map(|o| (Some(o), true))
            .or_else(|e| match e {
                InstallError::HashMismatch { .. } | InstallError::ReadbackMismatch { .. } => {
                    info!("disk no longer holds the recorded image; installing from 0");
                    Ok((None, false))
                }
                e => Err(e),
            })?;
        if let (Some(outcome), true) = (outcome, ok) {
            return Ok(outcome);
        }
        job.mode = writer::Mode::Write;
    }

    if start_at > 0 {
        source
            .resume_from(start_at, resume_etag.as_deref())
            .map_err(|source| InstallError::Fetch {
                role: role.clone(),
                url: url.clone(),
                source,
            })?;
    }
    run_job(job, Some(source), dev, &role, &mut record, sink, progress).await
}

/// Spawn the download pump (if any) and the writer, forward events until the writer ends.
async fn run_job(
    job: writer::Job,
    source: Option<Box<dyn ImageSource>>,
    dev: &Arc<Mutex<dyn BlockDevice>>,
    role: &str,
    record: &mut ResumeRecord,
    sink: &mut dyn ResumeSink,
    progress: &mut dyn FnMut(ProgressEvent),
) -> Result<TargetReport, InstallError> {
    let (data_tx, data_rx) = mpsc::channel::<writer::Msg>(job.channel_capacity);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<writer::Event>();
    let etag = Arc::new(Mutex::new(record.etag.clone()));
    let cancel = job.cancel.clone();
    let pump = source.map(|src| {
        let wire_hash = writer::wants_wire_hash(&job);
        let clock = job.clock.clone();
        tokio::spawn(
            pump(
                src,
                data_tx,
                job.buffer_size,
                wire_hash,
                etag.clone(),
                clock,
                cancel.clone(),
            )
            .in_current_span(),
        )
    });
    let slot = job.slot;
    let compressed_size = job.image.compressed_size;
    let clock = job.clock.clone();
    let dev_w = dev.clone();
    let span = tracing::Span::current();
    let writer = tokio::task::spawn_blocking(move || {
        let _g = span.enter();
        writer::run(&job, &*dev_w, data_rx, &ev_tx)
    });

    let mut sink_error = None;
    while let Some(ev) = ev_rx.recv().await {
        match ev {
            writer::Event::Progress { phase, done, total } => progress(ProgressEvent {
                slot,
                role: role.to_string(),
                phase,
                done,
                total,
            }),
            writer::Event::Checkpoint {
                written,
                compressed_offset,
                complete,
            } => {
                record.written = written;
                record.compressed_offset = compressed_offset;
                record.complete = complete;
                if let Ok(e) = etag.lock() {
                    record.etag.clone_from(&e);
                }
                if let Err(source) = sink.record(record) {
                    sink_error = Some(source);
                    break;
                }
            }
        }
    }
    drop(ev_rx);
    let written = writer.await;
    let pumped = match pump {
        Some(p) => {
            p.abort();
            match p.await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
        None => Ok(()),
    };
    if let Some(source) = sink_error {
        return Err(InstallError::ResumeRecord {
            role: role.to_string(),
            source,
        });
    }
    match written {
        Ok(Ok(mut report)) => {
            report.stages = clock.snapshot();
            Ok(report)
        }
        Ok(Err(writer::WriterError::StreamAborted)) => Err(match pumped {
            Err(source) if source.kind == CANCEL_KIND => InstallError::Cancelled {
                role: role.to_string(),
                written: record.written,
            },
            // The object is bigger than the signed metadata says: a size mismatch, whichever
            // layer saw the first byte too many.
            Err(source) if source.kind == "too_long" => InstallError::SizeMismatch {
                role: role.to_string(),
                url: record.url.clone(),
                what: "compressed",
                expected: compressed_size,
                actual: compressed_size + 1,
                at_least: true,
            },
            Err(source) => InstallError::Fetch {
                role: role.to_string(),
                url: record.url.clone(),
                source,
            },
            Ok(()) => InstallError::Internal {
                role: role.to_string(),
                reason: "the download stopped without an error or an end".into(),
            },
        }),
        Ok(Err(writer::WriterError::Install(e))) => Err(*e),
        Ok(Err(writer::WriterError::DiskStopped)) => Err(InstallError::Internal {
            role: role.to_string(),
            reason: "the disk stage stopped without an error".into(),
        }),
        Err(join) => Err(InstallError::Internal {
            role: role.to_string(),
            reason: format!("writer thread failed: {join}"),
        }),
    }
}

/// Pull chunks from `src`, coalesce them into `buffer_size` buffers and push them into the
/// bounded channel (awaiting when the writer is behind: that is the backpressure). With
/// `wire_hash`, also hash the wire bytes here, off the decode thread, in network-sized steps.
///
/// The buffers are [`AlignedBuf`]s, so the disk stage can write them with `O_DIRECT` straight
/// from memory; each comes back to this task's pool when the disk stage drops it.
async fn pump(
    mut src: Box<dyn ImageSource>,
    tx: mpsc::Sender<writer::Msg>,
    buffer_size: usize,
    wire_hash: bool,
    etag: Arc<Mutex<Option<String>>>,
    clock: Arc<StageClock>,
    cancel: Option<CancelToken>,
) -> Result<(), SourceError> {
    let new_ctx = || wire_hash.then(|| ring::digest::Context::new(&ring::digest::SHA256));
    let mut ctx = new_ctx();
    let (pool_tx, pool_rx) = std::sync::mpsc::channel::<AlignedBuf>();
    let mut acc = AlignedBuf::empty();
    let mut fill = 0usize;
    let closed = || SourceError::new("cancelled", "the writer stopped");
    loop {
        let t = Instant::now();
        // A cancel is seen between chunks and while waiting for one (a stalled server).
        let chunk = match &cancel {
            Some(c) => tokio::select! {
                chunk = src.next_chunk() => chunk?,
                () = c.cancelled() => {
                    return Err(SourceError::new(CANCEL_KIND, "the install was cancelled"));
                }
            },
            None => src.next_chunk().await?,
        };
        StageClock::add(&clock.download, t);
        match chunk {
            Some(SourceChunk::Data(mut b)) => {
                if let Some(c) = ctx.as_mut() {
                    let t = Instant::now();
                    c.update(&b);
                    StageClock::add(&clock.hash, t);
                }
                if let (Some(e), Ok(mut slot)) = (src.etag(), etag.lock()) {
                    if slot.as_deref() != Some(e.as_str()) {
                        *slot = Some(e);
                    }
                }
                if acc.is_empty() && b.len() == buffer_size && (b.as_ptr() as usize) % IO_ALIGN == 0
                {
                    // A whole aligned buffer (the file source's reads): pass it on as it is.
                    tx.send(writer::Msg::Data(b)).await.map_err(|_| closed())?;
                    continue;
                }
                while !b.is_empty() {
                    if acc.is_empty() {
                        acc = pool_rx
                            .try_recv()
                            .unwrap_or_else(|_| AlignedBuf::new(buffer_size));
                        fill = 0;
                    }
                    let n = (buffer_size - fill).min(b.len());
                    acc.as_mut_slice()[fill..fill + n].copy_from_slice(&b.split_to(n));
                    fill += n;
                    if fill == buffer_size {
                        let full = Pooled::bytes(
                            std::mem::replace(&mut acc, AlignedBuf::empty()),
                            fill,
                            &pool_tx,
                        );
                        tx.send(writer::Msg::Data(full))
                            .await
                            .map_err(|_| closed())?;
                    }
                }
            }
            Some(SourceChunk::Restarted) => {
                fill = 0;
                ctx = new_ctx();
                tx.send(writer::Msg::Restarted)
                    .await
                    .map_err(|_| closed())?;
            }
            None => {
                if !acc.is_empty() && fill > 0 {
                    let last = Pooled::bytes(
                        std::mem::replace(&mut acc, AlignedBuf::empty()),
                        fill,
                        &pool_tx,
                    );
                    tx.send(writer::Msg::Data(last))
                        .await
                        .map_err(|_| closed())?;
                }
                let wire = ctx.take().map(|c| {
                    let mut out = [0u8; 32];
                    out.copy_from_slice(c.finish().as_ref());
                    out
                });
                tx.send(writer::Msg::End(wire))
                    .await
                    .map_err(|_| closed())?;
                return Ok(());
            }
        }
    }
}

/// The first `len` bytes of a pool buffer, shared as [`Bytes`]; dropping the last handle
/// returns the buffer to the pool.
struct Pooled {
    buf: Option<AlignedBuf>,
    len: usize,
    pool: std::sync::mpsc::Sender<AlignedBuf>,
}

impl Pooled {
    fn bytes(buf: AlignedBuf, len: usize, pool: &std::sync::mpsc::Sender<AlignedBuf>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf: Some(buf),
            len,
            pool: pool.clone(),
        })
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b.as_slice()[..self.len],
            None => &[],
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            // The pump may be gone (install over): then the buffer is simply freed.
            let _ = self.pool.send(b);
        }
    }
}
