//! Delta installs (`docs/delta.md`): assemble the new image from the chunks the host already
//! has in its active slot and fetch only the missing ones with `Range` requests.
//!
//! [`DeltaSource`] is an [`ImageSource`] that yields the *decompressed image* in order, so it
//! plugs into the install pipeline as a `compression = none` target (see [`delta_target`]):
//! the pipeline's image SHA-256, size check, checkpoints and read-back decide exactly as for
//! a full install. Delta changes how the bytes arrive, never what is accepted.
//!
//! 1. Fetch the chunk index; its size and SHA-256 must equal the signed manifest's, then
//!    [`ChunkIndex::parse`] bounds and checks it.
//! 2. Index the seeds (the active slot's partition of the same role, then the target's old
//!    content) with the publisher's chunker, streaming; keep `hash -> seed offset` only for
//!    hashes the new image needs.
//! 3. In image order: copy a chunk from the seed (re-read and re-hashed: it counts only if
//!    it matches the index now), or fetch a run of neighbouring missing chunks with one
//!    `Range` request (small gaps of seed chunks included), decompress each frame with a
//!    length bound and check its hash.
//!
//! Memory: the index (56 bytes per chunk, at most `ceil(image_size / min_chunk)` chunks),
//! the seed map (at most one entry per chunk of the new image, about 80 bytes each), one
//! range body (at most [`MAX_RANGE_BYTES`] plus a frame) and its decoded chunks (at most
//! [`MAX_RUN_IMAGE_BYTES`] plus a chunk), and the
//! chunker's buffer (`max_chunk`). For a 1 GiB image with 4 KiB minimum chunks that is at
//! most 262,144 chunks: 14 MiB of index and 21 MiB of map; with the usual 16 KiB average
//! about a quarter of that.
//!
//! Fallback to the full stream of the same file (a plain zstd stream, its wire SHA-256
//! checked against the manifest), said in [`DeltaStats::fallback`] and
//! [`DeltaStats::fallback_kind`]: the index is missing (404), the server answers a `Range`
//! with 200, or an answer to a `Range` is wrong twice (hash, length, a frame that
//! decompresses past its chunk, other bytes or another `Content-Range` than asked; the first
//! wrong answer is asked again). A seed chunk whose bytes no longer match is fetched instead.
//!
//! Seeds: the active slot's partition, then on resume (for hashes it lacks) the target
//! partition's old content, read only ahead of the write cursor.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use ring::digest::{digest, Context, SHA256};
use tracing::{info, warn};
use updater_proto::{ChunkIndex, ImageDigests, ImageEntry};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use crate::fetch::{Chunk, Download, FetchConfig, Url};
use crate::install::{ChunkFuture, ImageSource, ImageSpec, SourceChunk, SourceError, TargetImage};

/// Largest body of one coalesced `Range` request: neighbours are merged up to this size, so
/// a CDN sees few large requests and memory stays bounded.
pub(crate) const MAX_RANGE_BYTES: u64 = 4 << 20;
/// Largest decoded size of one run: frames of zeros are tiny, so the file bytes alone would
/// not bound the decoded chunks held at once.
pub(crate) const MAX_RUN_IMAGE_BYTES: u64 = 8 << 20;
/// zstd window cap for the full-stream fallback (the pipeline's default).
const WINDOW_LOG_MAX: u32 = crate::install::DEFAULT_ZSTD_WINDOW_LOG_MAX;

/// What a delta install did, for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeltaStats {
    /// Image bytes copied from the seed slot (verified against the index).
    pub bytes_reused: u64,
    /// Bytes received from the server (index, ranges, full stream).
    pub bytes_fetched: u64,
    /// HTTP requests made (index, ranges; a full-stream fallback counts its own).
    pub requests: u64,
    /// Chunks fetched by `Range`.
    pub chunks_fetched: u64,
    /// Seed chunks that matched at indexing but not when copied, and were fetched instead.
    pub seed_mismatches: u64,
    /// Image bytes of [`DeltaStats::bytes_reused`] that came from the target (inactive)
    /// slot's old content rather than the active slot.
    #[serde(default)]
    pub bytes_reused_inactive: u64,
    /// `Range` requests repeated because the first answer was wrong (hash, length,
    /// `Content-Range`); a second wrong answer falls back to the full stream.
    #[serde(default)]
    pub refetches: u64,
    /// Why the delta path gave up for the full stream, if it did.
    pub fallback: Option<String>,
    /// The error kind behind [`DeltaStats::fallback`] (`delta_no_index`, `delta_no_range`,
    /// or the `delta_*` kind of the answer that was wrong twice).
    #[serde(default)]
    pub fallback_kind: Option<String>,
}

/// One delta-installed target in `apply`'s report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeltaTargetReport {
    pub role: String,
    #[serde(flatten)]
    pub stats: DeltaStats,
}

/// Collect the delta counters of an install and correct each delta target's
/// `bytes_fetched` (the pipeline counts the image bytes the source yielded, not the wire).
pub(crate) fn apply_reports(
    deltas: &[(String, StatsHandle)],
    targets: &mut [crate::install::TargetReport],
) -> Vec<DeltaTargetReport> {
    let mut out = Vec::new();
    for (role, handle) in deltas {
        let Ok(stats) = handle.lock().map(|s| s.clone()) else {
            continue;
        };
        if let Some(t) = targets.iter_mut().find(|t| &t.role == role && !t.reused) {
            t.bytes_fetched = stats.bytes_fetched;
        }
        out.push(DeltaTargetReport {
            role: role.clone(),
            stats,
        });
    }
    out
}

/// The history record of a staged install: bytes fetched by all targets, and what the delta
/// targets reused and asked for.
pub(crate) fn transfer(
    deltas: &[DeltaTargetReport],
    targets: &[crate::install::TargetReport],
) -> crate::state::Transfer {
    crate::state::Transfer {
        bytes_fetched: targets.iter().map(|t| t.bytes_fetched).sum(),
        bytes_reused: deltas.iter().map(|d| d.stats.bytes_reused).sum(),
        requests: deltas.iter().map(|d| d.stats.requests).sum(),
        fallback: deltas.iter().find_map(|d| {
            d.stats
                .fallback
                .as_ref()
                .map(|f| format!("{}: {f}", d.role))
        }),
    }
}

/// `; delta usr: 3 MiB reused, 1 MiB fetched in 4 requests` for the summary line.
pub(crate) fn render_reports(reports: &[DeltaTargetReport]) -> String {
    reports
        .iter()
        .map(|r| {
            format!(
                "; delta {}: {} KiB reused, {} KiB fetched in {} request(s){}",
                r.role,
                r.stats.bytes_reused >> 10,
                r.stats.bytes_fetched >> 10,
                r.stats.requests,
                r.stats
                    .fallback
                    .as_deref()
                    .map(|f| format!(" (fell back to the full image: {f})"))
                    .unwrap_or_default()
            )
        })
        .collect()
}

/// Shared handle on a [`DeltaSource`]'s counters (the source moves into the pipeline).
pub(crate) type StatsHandle = Arc<Mutex<DeltaStats>>;

/// The seed: the partition of the active slot holding the previous image of this role.
#[derive(Debug, Clone)]
pub struct Seed {
    /// Device (or disk image file) path, opened read-only.
    pub device: PathBuf,
    /// Byte offset of the partition on the device.
    pub offset: u64,
    /// Bytes of the partition to index.
    pub len: u64,
}

/// Everything a [`DeltaSource`] needs, from the verified manifest entry.
#[derive(Debug, Clone)]
pub struct DeltaConfig {
    pub client: reqwest::Client,
    pub fetch: FetchConfig,
    /// The chunked file (a zstd stream of one frame per chunk).
    pub file_url: Url,
    pub index_url: Url,
    pub index_size: u64,
    pub index_sha256: [u8; 32],
    pub image_size: u64,
    pub file_size: u64,
    pub file_sha256: [u8; 32],
    pub seed: Option<Seed>,
    /// The target partition's old content, a second seed on resume for the chunks the active
    /// slot lacks (what the interrupted run wrote beyond its last checkpoint, or an earlier
    /// attempt). Read only ahead of the write cursor, every chunk re-hashed before it counts
    /// like any seed chunk.
    pub inactive: Option<Seed>,
}

/// A delta failure, with a stable kind (`delta_*`); the pipeline reports it as `fetch`
/// with this kind inside.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeltaError {
    #[error("chunk index {url}: {what}, the signed manifest says {expected}, got {actual}")]
    IndexMismatch {
        url: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("chunk index {url}: {source}")]
    IndexInvalid {
        url: String,
        #[source]
        source: updater_proto::ChunkIndexError,
    },
    #[error("{url}: Range {range} answered with Content-Range {got:?}")]
    ContentRange {
        url: String,
        range: String,
        got: Option<String>,
    },
    #[error("{url}: Range {range} answered with {got} body bytes, {expected} expected")]
    RangeLength {
        url: String,
        range: String,
        expected: u64,
        got: u64,
    },
    #[error("chunk {index} (image bytes {offset}..): frame decompresses past its {len} bytes")]
    FrameTooLong { index: usize, offset: u64, len: u32 },
    #[error("chunk {index} (image bytes {offset}..): frame gives {got} bytes, the index says {len}{detail}")]
    ChunkLength {
        index: usize,
        offset: u64,
        len: u32,
        got: u64,
        detail: String,
    },
    #[error("chunk {index} (image bytes {offset}..): fetched bytes hash to {actual}, the index says {expected}")]
    ChunkHash {
        index: usize,
        offset: u64,
        expected: String,
        actual: String,
    },
    #[error("the full stream {url} hashes to {actual}, the manifest says {expected}")]
    StreamHash {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("the full stream {url} cannot be decoded: {detail}")]
    StreamDecode { url: String, detail: String },
    #[error("{url}: {detail}")]
    Http { url: String, detail: String },
    /// The TLS handshake failed (an untrusted or wrong certificate): the same kind, `tls`,
    /// as a manifest or full-image fetch that fails the same way.
    #[error("{url}: TLS: {detail}")]
    Tls { url: String, detail: String },
    #[error("seed {}: {source}", path.display())]
    Seed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DeltaError {
    /// The server answered a `Range` with bytes the signed index does not describe: worth
    /// one more request, then the full stream (whose SHA-256 the manifest pins).
    fn is_bad_answer(&self) -> bool {
        matches!(
            self,
            DeltaError::ContentRange { .. }
                | DeltaError::RangeLength { .. }
                | DeltaError::FrameTooLong { .. }
                | DeltaError::ChunkLength { .. }
                | DeltaError::ChunkHash { .. }
        )
    }

    /// A stable machine-readable kind.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            DeltaError::IndexMismatch { .. } => "delta_index_mismatch",
            DeltaError::IndexInvalid { source, .. } => source.kind(),
            DeltaError::ContentRange { .. } => "delta_content_range",
            DeltaError::RangeLength { .. } => "delta_range_length",
            DeltaError::FrameTooLong { .. } => "delta_frame_too_long",
            DeltaError::ChunkLength { .. } => "delta_chunk_length",
            DeltaError::ChunkHash { .. } => "delta_chunk_hash",
            DeltaError::StreamHash { .. } => "delta_stream_hash",
            DeltaError::StreamDecode { .. } => "delta_stream_decode",
            DeltaError::Http { .. } => "delta_http",
            DeltaError::Tls { .. } => "tls",
            DeltaError::Seed { .. } => "delta_seed_io",
        }
    }
}

impl From<DeltaError> for SourceError {
    fn from(e: DeltaError) -> Self {
        SourceError::new(e.kind(), e)
    }
}

/// Where the delta path is.
enum State {
    /// Nothing fetched yet.
    Init,
    Delta(Box<Plan>),
    Full(Box<Full>),
    Done,
}

/// Which seed a seed-map entry points into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeedSlot {
    Active,
    Inactive,
}

struct Plan {
    index: ChunkIndex,
    /// Chunk hash -> (seed, offset in that partition), only for hashes the image needs.
    seed_map: HashMap<[u8; 32], (SeedSlot, u64)>,
    seed: Option<(File, Seed)>,
    inactive: Option<(File, Seed)>,
    /// Next chunk to produce.
    next: usize,
    /// Decoded chunks of the current range, in order.
    pending: VecDeque<Bytes>,
}

struct Full {
    download: Download,
    decoder: Decoder<'static>,
    wire: Context,
    /// Image offset of the next decoded byte in this pass; bytes before [`DeltaSource::pos`]
    /// (already delivered) are dropped.
    decoded: u64,
    /// Wire bytes received but not yet fully fed to the decoder, and how far it got.
    input: Bytes,
    in_pos: usize,
    /// The last step filled its whole output buffer: the decoder may hold more output.
    draining: bool,
}

/// Decoded bytes produced per step of the full stream: a tiny frame of zeros can expand
/// to its whole chunk, so output is bounded per step rather than per input chunk.
const FULL_STEP_OUT: usize = 256 << 10;

/// The image of one chunked entry, assembled from the seed and `Range` fetches.
pub struct DeltaSource {
    cfg: DeltaConfig,
    state: State,
    stats: StatsHandle,
    /// Image offset of the next byte to yield.
    pos: u64,
}

impl std::fmt::Debug for DeltaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaSource")
            .field("file_url", &crate::fetch::redact(&self.cfg.file_url))
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(digest(&SHA256, b))
}

fn http_err(url: &Url, e: impl std::fmt::Display) -> DeltaError {
    DeltaError::Http {
        url: crate::fetch::redact(url),
        detail: e.to_string(),
    }
}

/// A failed request or body read: `tls` when a certificate was refused (not worth asking
/// again), else `delta_http`.
fn send_err(url: &Url, e: reqwest::Error) -> DeltaError {
    match crate::fetch::tls_cause(&e) {
        Some(detail) => DeltaError::Tls {
            url: crate::fetch::redact(url),
            detail,
        },
        None => http_err(url, e),
    }
}

impl DeltaSource {
    pub fn new(cfg: DeltaConfig) -> (DeltaSource, StatsHandle) {
        let stats = StatsHandle::default();
        (
            DeltaSource {
                cfg,
                state: State::Init,
                stats: stats.clone(),
                pos: 0,
            },
            stats,
        )
    }

    fn stat(&self, f: impl FnOnce(&mut DeltaStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    /// GET the index (bounded at its signed size + 1); `None` when the server has none.
    async fn fetch_index(
        cfg: &DeltaConfig,
        stats: &StatsHandle,
    ) -> Result<Option<Vec<u8>>, DeltaError> {
        let url = &cfg.index_url;
        if let Ok(mut s) = stats.lock() {
            s.requests += 1;
        }
        let resp = tokio::time::timeout(cfg.fetch.read_timeout, cfg.client.get(url.clone()).send())
            .await
            .map_err(|_| http_err(url, "timed out waiting for the index"))?
            .map_err(|e| send_err(url, e))?;
        if resp.status() == StatusCode::NOT_FOUND || resp.status() == StatusCode::GONE {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(http_err(url, format!("status {}", resp.status())));
        }
        let body = read_bounded(resp, cfg.index_size + 1, url, cfg.fetch.read_timeout).await?;
        if let Ok(mut s) = stats.lock() {
            s.bytes_fetched += body.len() as u64;
        }
        Ok(Some(body))
    }

    async fn start(&mut self) -> Result<(), SourceError> {
        let Some(bytes) = Self::fetch_index(&self.cfg, &self.stats).await? else {
            return self
                .fall_back("the server has no chunk index (404)", "delta_no_index")
                .await;
        };
        let url = crate::fetch::redact(&self.cfg.index_url);
        if bytes.len() as u64 != self.cfg.index_size {
            return Err(DeltaError::IndexMismatch {
                url,
                what: "size",
                expected: self.cfg.index_size.to_string(),
                actual: if bytes.len() as u64 > self.cfg.index_size {
                    format!("more than {}", self.cfg.index_size)
                } else {
                    bytes.len().to_string()
                },
            }
            .into());
        }
        let actual = sha_hex(&bytes);
        if actual != hex::encode(self.cfg.index_sha256) {
            return Err(DeltaError::IndexMismatch {
                url,
                what: "SHA-256",
                expected: hex::encode(self.cfg.index_sha256),
                actual,
            }
            .into());
        }
        let index = ChunkIndex::parse(&bytes, self.cfg.image_size, self.cfg.file_size)
            .map_err(|source| DeltaError::IndexInvalid { url, source })?;
        drop(bytes);
        let needed: HashSet<[u8; 32]> = index.chunks.iter().map(|c| c.sha256).collect();
        let params = index.params;
        // The target's old content is worth indexing on resume (an earlier run wrote part
        // of this very image there); on a fresh install it holds an older release than the
        // active slot and indexing it would cost a second full read of a partition.
        // Only its first `image_size` bytes: the image's last chunk ends there, not where the
        // chunker would cut the partition's tail.
        let image_size = self.cfg.image_size;
        let inactive_cfg = self
            .cfg
            .inactive
            .clone()
            .filter(|_| self.pos > 0)
            .map(|s| Seed {
                len: s.len.min(image_size),
                ..s
            });
        let seed_cfg = self.cfg.seed.clone();
        let from = self.pos;
        let (seed_map, seed, inactive) = tokio::task::spawn_blocking(move || {
            index_seeds(
                seed_cfg.as_ref(),
                inactive_cfg.as_ref(),
                from,
                params,
                needed,
            )
        })
        .await
        .map_err(|e| SourceError::new("internal", format!("seed indexer: {e}")))??;
        info!(
            chunks = index.chunks.len(),
            seed_hits = seed_map.len(),
            "delta: index verified, seed indexed"
        );
        let next = index.chunk_at(self.pos).unwrap_or(index.chunks.len());
        self.state = State::Delta(Box::new(Plan {
            index,
            seed_map,
            seed,
            inactive,
            next,
            pending: VecDeque::new(),
        }));
        Ok(())
    }

    /// Switch to the full stream of the same file, dropping the image bytes already yielded.
    async fn fall_back(&mut self, why: &str, kind: &str) -> Result<(), SourceError> {
        warn!(
            reason = why,
            kind,
            at = self.pos,
            "delta: falling back to the full stream"
        );
        self.stat(|s| {
            s.fallback = Some(why.to_string());
            s.fallback_kind = Some(kind.to_string());
        });
        let mut decoder = Decoder::new().map_err(|e| SourceError::new("internal", e))?;
        decoder
            .set_parameter(zstd::stream::raw::DParameter::WindowLogMax(WINDOW_LOG_MAX))
            .map_err(|e| SourceError::new("internal", e))?;
        let download = Download::new(
            self.cfg.client.clone(),
            self.cfg.file_url.clone(),
            self.cfg.file_size,
            self.cfg.fetch.clone(),
        );
        self.state = State::Full(Box::new(Full {
            download,
            decoder,
            wire: Context::new(&SHA256),
            decoded: 0,
            input: Bytes::new(),
            in_pos: 0,
            draining: false,
        }));
        Ok(())
    }

    async fn next_inner(&mut self) -> Result<Option<SourceChunk>, SourceError> {
        loop {
            let step = match &mut self.state {
                State::Init => {
                    self.start().await?;
                    Step::Again
                }
                State::Done => return Ok(None),
                State::Full(full) => full_step(full, &self.cfg, &self.stats, &mut self.pos).await?,
                State::Delta(plan) => {
                    delta_step(plan, &self.cfg, &self.stats, &mut self.pos).await?
                }
            };
            match step {
                Step::Yield(c) => return Ok(Some(c)),
                Step::Again => {}
                Step::Finish => {
                    self.finish();
                    return Ok(None);
                }
                Step::FallBack(why, kind) => self.fall_back(&why, kind).await?,
            }
        }
    }

    fn finish(&mut self) {
        self.state = State::Done;
        if let Ok(s) = self.stats.lock() {
            info!(
                bytes_reused = s.bytes_reused,
                bytes_fetched = s.bytes_fetched,
                requests = s.requests,
                seed_mismatches = s.seed_mismatches,
                fallback = s.fallback.as_deref().unwrap_or("none"),
                "delta: image assembled"
            );
        }
    }
}

impl ImageSource for DeltaSource {
    fn describe(&self) -> String {
        crate::fetch::redact(&self.cfg.file_url)
    }

    /// Resume at image offset `offset`: chunks before it are neither copied nor fetched
    /// (chunk granularity: the chunk holding `offset` is produced and trimmed).
    fn resume_from(&mut self, offset: u64, _etag: Option<&str>) -> Result<(), SourceError> {
        self.pos = offset.min(self.cfg.image_size);
        self.state = State::Init;
        Ok(())
    }

    fn next_chunk(&mut self) -> ChunkFuture<'_> {
        Box::pin(self.next_inner())
    }
}

/// Trim `b` (image bytes at `at`) to what lies at or after `*pos`, and advance `*pos`.
fn emit(pos: &mut u64, at: u64, b: Bytes) -> Option<SourceChunk> {
    let end = at + b.len() as u64;
    if end <= *pos || b.is_empty() {
        return None;
    }
    let from = usize::try_from(pos.saturating_sub(at)).unwrap_or(0);
    *pos = end;
    Some(SourceChunk::Data(b.slice(from..)))
}

/// What the state machine wants done once its borrow of the state has ended.
enum Step {
    Yield(SourceChunk),
    Again,
    Finish,
    FallBack(String, &'static str),
}

async fn full_step(
    full: &mut Full,
    cfg: &DeltaConfig,
    stats: &StatsHandle,
    pos: &mut u64,
) -> Result<Step, SourceError> {
    if full.in_pos < full.input.len() || full.draining {
        let mut buf = vec![0u8; FULL_STEP_OUT];
        let mut inb = InBuffer::around(&full.input[full.in_pos..]);
        let mut outb = OutBuffer::around(&mut buf[..]);
        full.decoder
            .run(&mut inb, &mut outb)
            .map_err(|e| DeltaError::StreamDecode {
                url: crate::fetch::redact(&cfg.file_url),
                detail: e.to_string(),
            })?;
        full.in_pos += inb.pos();
        let n = outb.pos();
        full.draining = n == FULL_STEP_OUT;
        buf.truncate(n);
        let at = full.decoded;
        full.decoded += n as u64;
        return Ok(emit(pos, at, Bytes::from(buf)).map_or(Step::Again, Step::Yield));
    }
    match full
        .download
        .next_chunk()
        .await
        .map_err(|e| SourceError::new(e.kind(), e))?
    {
        Some(Chunk::Restarted) => {
            full.decoder
                .reinit()
                .map_err(|e| SourceError::new("internal", e))?;
            full.wire = Context::new(&SHA256);
            full.decoded = 0;
            full.input = Bytes::new();
            full.in_pos = 0;
            full.draining = false;
            Ok(Step::Again)
        }
        Some(Chunk::Data(b)) => {
            if let Ok(mut s) = stats.lock() {
                s.bytes_fetched += b.len() as u64;
            }
            full.wire.update(&b);
            full.input = b;
            full.in_pos = 0;
            Ok(Step::Again)
        }
        None => {
            let wire = hex::encode(full.wire.clone().finish());
            if wire != hex::encode(cfg.file_sha256) {
                return Err(DeltaError::StreamHash {
                    url: crate::fetch::redact(&cfg.file_url),
                    expected: hex::encode(cfg.file_sha256),
                    actual: wire,
                }
                .into());
            }
            let requests = u64::from(full.download.stats().requests);
            if let Ok(mut s) = stats.lock() {
                s.requests += requests;
            }
            Ok(Step::Finish)
        }
    }
}

async fn delta_step(
    plan: &mut Plan,
    cfg: &DeltaConfig,
    stats: &StatsHandle,
    pos: &mut u64,
) -> Result<Step, SourceError> {
    if let Some(b) = plan.pending.pop_front() {
        let at = plan.index.chunks[plan.next].image_offset;
        plan.next += 1;
        return Ok(emit(pos, at, b).map_or(Step::Again, Step::Yield));
    }
    if plan.next >= plan.index.chunks.len() {
        return Ok(Step::Finish);
    }
    let i = plan.next;
    let c = plan.index.chunks[i];
    if let Some(&(SeedSlot::Inactive, off)) = plan.seed_map.get(&c.sha256) {
        if off < c.image_offset {
            // Behind the write cursor: the target slot no longer holds its old bytes there.
            plan.seed_map.remove(&c.sha256);
        }
    }
    if let Some(&(slot, off)) = plan.seed_map.get(&c.sha256) {
        if let Some(b) = read_seed(plan, slot, off, c.image_len)? {
            plan.next += 1;
            if let Ok(mut s) = stats.lock() {
                s.bytes_reused += u64::from(c.image_len);
                if slot == SeedSlot::Inactive {
                    s.bytes_reused_inactive += u64::from(c.image_len);
                }
            }
            return Ok(emit(pos, c.image_offset, b).map_or(Step::Again, Step::Yield));
        }
        warn!(
            chunk = i,
            seed = ?slot,
            seed_offset = off,
            "delta: seed chunk changed; fetching it"
        );
        plan.seed_map.remove(&c.sha256);
        if let Ok(mut s) = stats.lock() {
            s.seed_mismatches += 1;
        }
    }
    let j = run_end(plan, i);
    let first = c.file_offset;
    let last = plan.index.chunks[j - 1].file_end() - 1;
    let range = format!("bytes={first}-{last}");
    let mut tries = 0;
    let decoded = loop {
        tries += 1;
        let err = match fetch_range(cfg, &range, first, last, stats).await {
            Ok(None) => {
                return Ok(Step::FallBack(
                    "the server ignored Range (200 instead of 206)".into(),
                    "delta_no_range",
                ))
            }
            Ok(Some(body)) => match decode_run(&plan.index, i, j, first, &body) {
                Ok(v) => break v,
                Err(e) => e,
            },
            Err(e) => e,
        };
        if !err.is_bad_answer() {
            return Err(err.into());
        }
        if tries >= 2 {
            return Ok(Step::FallBack(format!("{err} (twice)"), err.kind()));
        }
        warn!(error = %err, kind = err.kind(), "delta: wrong answer to a Range; asking again");
        if let Ok(mut s) = stats.lock() {
            s.refetches += 1;
        }
    };
    plan.pending.extend(decoded);
    if let Ok(mut s) = stats.lock() {
        s.chunks_fetched += (j - i) as u64;
    }
    Ok(Step::Again)
}

/// File bytes of seed chunks worth fetching inside a run rather than splitting it into two
/// requests: a request costs a few hundred bytes of headers each way and a round trip, so
/// tiny frames (runs of zeros, small metadata blocks) between two missing chunks travel
/// with them.
pub(crate) const GAP_MERGE_BYTES: u64 = 512;

/// One past the last chunk of the run starting at the missing chunk `i`: neighbours the
/// seed lacks, and gaps of seed chunks of at most [`GAP_MERGE_BYTES`] file bytes between
/// them, within [`MAX_RANGE_BYTES`] and [`MAX_RUN_IMAGE_BYTES`]. Never ends on a seed chunk.
fn run_end(plan: &Plan, i: usize) -> usize {
    let chunks = &plan.index.chunks;
    let c = chunks[i];
    let (mut j, mut end, mut gap) = (i + 1, i + 1, 0u64);
    while j < chunks.len()
        && chunks[j].file_end() - c.file_offset <= MAX_RANGE_BYTES
        && chunks[j].image_end() - c.image_offset <= MAX_RUN_IMAGE_BYTES
    {
        if plan.seed_map.contains_key(&chunks[j].sha256) {
            gap += u64::from(chunks[j].file_len);
            if gap > GAP_MERGE_BYTES {
                break;
            }
        } else {
            end = j + 1;
            gap = 0;
        }
        j += 1;
    }
    end
}

/// Decode the frames of chunks `i..j` from a range body starting at file offset `first`.
fn decode_run(
    index: &ChunkIndex,
    i: usize,
    j: usize,
    first: u64,
    body: &[u8],
) -> Result<Vec<Bytes>, DeltaError> {
    (i..j)
        .map(|k| {
            let ck = index.chunks[k];
            let frame = &body[(ck.file_offset - first) as usize..(ck.file_end() - first) as usize];
            decode_chunk(k, &ck, frame)
        })
        .collect()
}

/// Read a body of at most `limit` bytes (more is an error), each read within `timeout`.
async fn read_bounded(
    mut resp: reqwest::Response,
    limit: u64,
    url: &Url,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::new();
    loop {
        let chunk = tokio::time::timeout(timeout, resp.chunk())
            .await
            .map_err(|_| http_err(url, "timed out reading the body"))?
            .map_err(|e| send_err(url, e))?;
        let Some(chunk) = chunk else {
            return Ok(out);
        };
        if out.len() as u64 + chunk.len() as u64 > limit {
            let take = (limit - out.len() as u64) as usize;
            out.extend_from_slice(&chunk[..take]);
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
    }
}

/// One `Range` request for file bytes `first..=last`. `Ok(None)`: the server ignored it.
async fn fetch_range(
    cfg: &DeltaConfig,
    range: &str,
    first: u64,
    last: u64,
    stats: &StatsHandle,
) -> Result<Option<Vec<u8>>, DeltaError> {
    let url = &cfg.file_url;
    if let Ok(mut s) = stats.lock() {
        s.requests += 1;
    }
    let resp = tokio::time::timeout(
        cfg.fetch.read_timeout,
        cfg.client.get(url.clone()).header(RANGE, range).send(),
    )
    .await
    .map_err(|_| http_err(url, "timed out waiting for a Range response"))?
    .map_err(|e| send_err(url, e))?;
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {}
        StatusCode::OK => return Ok(None),
        other => return Err(http_err(url, format!("status {other} for Range {range}"))),
    }
    let want = format!("bytes {first}-{last}/{}", cfg.file_size);
    let got = resp
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if got.as_deref() != Some(want.as_str()) {
        return Err(DeltaError::ContentRange {
            url: crate::fetch::redact(url),
            range: range.to_string(),
            got,
        });
    }
    let expected = last - first + 1;
    let body = read_bounded(resp, expected + 1, url, cfg.fetch.read_timeout).await?;
    if let Ok(mut s) = stats.lock() {
        s.bytes_fetched += body.len() as u64;
    }
    if body.len() as u64 != expected {
        return Err(DeltaError::RangeLength {
            url: crate::fetch::redact(url),
            range: range.to_string(),
            expected,
            got: body.len() as u64,
        });
    }
    Ok(Some(body))
}

type Seeds = (
    HashMap<[u8; 32], (SeedSlot, u64)>,
    Option<(File, Seed)>,
    Option<(File, Seed)>,
);

/// Index the active seed, then the inactive one (chunks at or after `from`, where it still
/// holds old bytes) for the hashes still missing; open both for the copies. The map never
/// outgrows the new image's chunk count.
fn index_seeds(
    active: Option<&Seed>,
    inactive: Option<&Seed>,
    from: u64,
    params: updater_proto::ChunkParams,
    mut needed: HashSet<[u8; 32]>,
) -> Result<Seeds, SourceError> {
    let mut map = HashMap::new();
    let mut open = |seed: &Seed, slot: SeedSlot, needed: &mut HashSet<[u8; 32]>| {
        let from = if slot == SeedSlot::Inactive { from } else { 0 };
        index_seed(seed, slot, from, params, needed, &mut map)?;
        File::open(&seed.device)
            .map(|f| (f, seed.clone()))
            .map_err(|source| {
                SourceError::from(DeltaError::Seed {
                    path: seed.device.clone(),
                    source,
                })
            })
    };
    let a = active
        .map(|s| open(s, SeedSlot::Active, &mut needed))
        .transpose()?;
    let b = match inactive {
        Some(s) if !needed.is_empty() => Some(open(s, SeedSlot::Inactive, &mut needed)?),
        _ => None,
    };
    Ok((map, a, b))
}

/// Chunk one seed partition with the publisher's chunker; each hash in `needed` found there
/// (in a chunk at or after `from`) moves into `map`.
fn index_seed(
    seed: &Seed,
    slot: SeedSlot,
    from: u64,
    params: updater_proto::ChunkParams,
    needed: &mut HashSet<[u8; 32]>,
    map: &mut HashMap<[u8; 32], (SeedSlot, u64)>,
) -> Result<(), SourceError> {
    let io = |source| DeltaError::Seed {
        path: seed.device.clone(),
        source,
    };
    let file = File::open(&seed.device).map_err(io)?;
    let reader = PartReader {
        file,
        pos: seed.offset,
        end: seed.offset + seed.len,
    };
    for chunk in crate::publish::chunker(std::io::BufReader::with_capacity(1 << 20, reader), params)
    {
        let chunk = chunk.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => SourceError::from(io(e)),
            other => SourceError::new("delta_seed_io", other.to_string()),
        })?;
        if chunk.offset < from {
            continue;
        }
        let mut h = [0u8; 32];
        h.copy_from_slice(digest(&SHA256, &chunk.data).as_ref());
        if needed.remove(&h) {
            map.insert(h, (slot, chunk.offset));
        }
        if needed.is_empty() {
            break;
        }
    }
    Ok(())
}

/// Reads `pos..end` of a file (one partition of the device).
struct PartReader {
    file: File,
    pos: u64,
    end: u64,
}

impl Read for PartReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.end - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

/// Re-read a seed chunk; `Some` only if it still hashes to the index's value. (The inactive
/// seed is the partition being written: the caller uses it only at or after the current
/// chunk's image offset, where it still holds its old content, since the pipeline writes
/// only what this source yielded, in order.)
fn read_seed(
    plan: &Plan,
    slot: SeedSlot,
    off: u64,
    len: u32,
) -> Result<Option<Bytes>, SourceError> {
    let c = plan.index.chunks[plan.next];
    let seed = match slot {
        SeedSlot::Active => &plan.seed,
        SeedSlot::Inactive => &plan.inactive,
    };
    let Some((file, seed)) = seed else {
        return Ok(None);
    };
    if off + u64::from(len) > seed.len {
        return Ok(None);
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, seed.offset + off)
        .map_err(|source| DeltaError::Seed {
            path: seed.device.clone(),
            source,
        })?;
    Ok((digest(&SHA256, &buf).as_ref() == c.sha256).then(|| Bytes::from(buf)))
}

/// Decompress one frame into at most its chunk's length (+1 to see an overrun) and check it.
fn decode_chunk(
    index: usize,
    c: &updater_proto::ChunkEntry,
    frame: &[u8],
) -> Result<Bytes, DeltaError> {
    let len = c.image_len as usize;
    let mut out = vec![0u8; len + 1];
    let mut dec = Decoder::new().map_err(|e| DeltaError::ChunkLength {
        index,
        offset: c.image_offset,
        len: c.image_len,
        got: 0,
        detail: format!(" (decoder: {e})"),
    })?;
    let _ = dec.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(WINDOW_LOG_MAX));
    let mut input = InBuffer::around(frame);
    let mut output = OutBuffer::around(&mut out[..]);
    let mut remaining_hint = 1;
    while input.pos() < frame.len() && output.pos() <= len && remaining_hint != 0 {
        let before = (input.pos(), output.pos());
        remaining_hint = dec
            .run(&mut input, &mut output)
            .map_err(|e| DeltaError::ChunkLength {
                index,
                offset: c.image_offset,
                len: c.image_len,
                got: output.pos() as u64,
                detail: format!(" (corrupt frame: {e})"),
            })?;
        if (input.pos(), output.pos()) == before {
            break;
        }
    }
    let got = output.pos();
    if got > len {
        return Err(DeltaError::FrameTooLong {
            index,
            offset: c.image_offset,
            len: c.image_len,
        });
    }
    if got != len || remaining_hint != 0 || input.pos() != frame.len() {
        return Err(DeltaError::ChunkLength {
            index,
            offset: c.image_offset,
            len: c.image_len,
            got: got as u64,
            detail: if input.pos() != frame.len() {
                " (bytes left after the frame)".into()
            } else if remaining_hint != 0 {
                " (frame incomplete)".into()
            } else {
                String::new()
            },
        });
    }
    out.truncate(len);
    let actual = sha_hex(&out);
    if actual != hex::encode(c.sha256) {
        return Err(DeltaError::ChunkHash {
            index,
            offset: c.image_offset,
            expected: hex::encode(c.sha256),
            actual,
        });
    }
    Ok(Bytes::from(out))
}

/// The pipeline target for a chunked manifest entry going into `image`'s partition: the
/// same image arriving [`ImageSpec::decoded`] (`compression = none`), fed by a
/// [`DeltaSource`], so the image hash, size, checkpoints and read-back apply unchanged.
/// Without an explicit `cfg.inactive`, the target partition's old content is the second seed.
/// Returns the stats handle for the report.
pub fn delta_target(image: ImageSpec, cfg: DeltaConfig) -> (TargetImage, StatsHandle) {
    let mut cfg = cfg;
    if cfg.inactive.is_none() {
        cfg.inactive = cfg.seed.as_ref().map(|s| Seed {
            device: s.device.clone(),
            offset: image.part_offset,
            len: image.part_len,
        });
    }
    let (source, stats) = DeltaSource::new(cfg);
    (
        TargetImage {
            image: image.decoded(),
            source: Box::new(source),
            resume: None,
        },
        stats,
    )
}

/// The [`DeltaConfig`] for a verified chunked entry: URLs joined onto `base` (the manifest's
/// URL), the seed being `seed_part` of `device` (the active slot's partition of the role).
pub fn config_for(
    entry: &ImageEntry,
    digests: &ImageDigests,
    file_url: Url,
    index_url: Url,
    client: reqwest::Client,
    fetch: FetchConfig,
    seed: Option<Seed>,
) -> Option<DeltaConfig> {
    let ix = entry.chunk_index.as_ref()?;
    // Digests come parsed from verification, never re-read from the manifest's text.
    let index_sha256 = digests.chunk_index_sha256?.0;
    let file_sha256 = digests.compressed_sha256.0;
    Some(DeltaConfig {
        client,
        fetch,
        file_url,
        index_url,
        index_size: ix.size,
        index_sha256,
        image_size: entry.size,
        file_size: entry.compressed_size,
        file_sha256,
        seed,
        inactive: None,
    })
}
