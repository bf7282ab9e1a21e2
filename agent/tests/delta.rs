//! Delta installs end to end: a real Flatcar GPT disk file (sgdisk), the real gptprio
//! backend, a chunked image published by the real publisher, served over HTTP on 127.0.0.1
//! by server-mock. The slot must hash to the manifest; the seed slot must stay
//! byte-identical; bad input must fail with its own kind and stage nothing. Needs sgdisk
//! and cgpt (see `require_tool`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ring::digest::{digest, SHA256};
use server_mock::{Fault, FaultRule, ServerHandle};
use update_agent::boot::gptprio::GptPrio;
use update_agent::boot::{BootControl, SlotId};
use update_agent::delta::{config_for, delta_target, DeltaConfig, DeltaStats, Seed};
use update_agent::disk::slots::Partition;
use update_agent::disk::{BlockDevice, FileDevice};
use update_agent::fetch::{build_client, FetchConfig, Url};
use update_agent::install::{
    install, ImageSpec, InstallError, InstallOptions, InstallPlan, Readback, ResumeRecord,
};
use update_agent_sandbox::testimg::{cgpt_field, require_tool, sgdisk_verify, Layout};
use updater_proto::{ChunkIndex, ChunkParams, ImageDigests, ImageEntry, Sha256};

const MIB: usize = 1 << 20;

/// Deterministic bytes that compress a little (runs of 4 repeated bytes), like a filesystem.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&[(x >> 24) as u8; 4]);
    }
    out.truncate(len);
    out
}

fn sha(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, b).as_ref());
    out
}

struct World {
    _dir: tempfile::TempDir,
    disk: PathBuf,
    repo: PathBuf,
    a: Partition,
    b: Partition,
    old: Vec<u8>,
    new: Vec<u8>,
    entry: ImageEntry,
    server: ServerHandle,
}

impl World {
    /// USR-A holds `old` (rest of the partition: other bytes); the release is `new`: `old`
    /// with a few local edits, so most chunks can come from USR-A.
    async fn new() -> Option<World> {
        if !require_tool("sgdisk", "gdisk").unwrap() || !require_tool("cgpt", "cgpt").unwrap() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("flatcar.img");
        Layout::Flatcar.create(&disk).unwrap();
        let boot = boot(&disk);
        let slots = boot.slots().unwrap();
        let a = slots.get(SlotId::A).parts["usr"].clone();
        let b = slots.get(SlotId::B).parts["usr"].clone();
        let old = content(3 * MIB, 5);
        let mut fill = content(a.byte_len as usize, 9);
        fill[..old.len()].copy_from_slice(&old);
        FileDevice::open(&disk)
            .unwrap()
            .write_at(&fill, a.byte_offset)
            .unwrap();
        let mut new = old.clone();
        new[MIB..MIB + 20_000].copy_from_slice(&content(20_000, 77));
        new.splice(2 * MIB..2 * MIB, content(3000, 78));
        new.truncate(3 * MIB);
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        let src = dir.path().join("new.raw");
        std::fs::write(&src, &new).unwrap();
        let entry = update_agent::publish::prepare_chunked_image(
            &src,
            &repo,
            "usr",
            3,
            ChunkParams::DEFAULT,
        )
        .unwrap();
        let server = server_mock::Server::start(&repo, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Some(World {
            _dir: dir,
            disk,
            repo,
            a,
            b,
            old,
            new,
            entry,
            server,
        })
    }

    fn config(&self) -> DeltaConfig {
        let url = |p: &str| Url::parse(&self.server.url_for(p)).unwrap();
        let fetch = FetchConfig {
            max_attempts: 2,
            ..FetchConfig::default()
        };
        config_for(
            &self.entry,
            &self.digests(),
            url(&self.entry.url),
            url(&self.entry.chunk_index.as_ref().unwrap().url),
            build_client(&fetch).unwrap(),
            fetch,
            Some(Seed {
                device: self.disk.clone(),
                offset: self.a.byte_offset,
                len: self.a.byte_len,
            }),
        )
        .unwrap()
    }

    /// The entry's digests as verification parses them.
    fn digests(&self) -> ImageDigests {
        let parse = |hex: &str| Sha256::from_hex(hex).unwrap();
        ImageDigests {
            sha256: parse(&self.entry.sha256),
            compressed_sha256: parse(&self.entry.compressed_sha256),
            chunk_index_sha256: self.entry.chunk_index.as_ref().map(|ix| parse(&ix.sha256)),
        }
    }

    fn slot_a(&self) -> Vec<u8> {
        read(&self.disk, &self.a)
    }

    /// Install into USR-B from `cfg`; on success stage B as the agent would.
    async fn install(
        &self,
        cfg: DeltaConfig,
        sink: &mut Vec<ResumeRecord>,
    ) -> (Result<(), InstallError>, DeltaStats) {
        self.install_from(cfg, sink, None).await
    }

    async fn install_from(
        &self,
        cfg: DeltaConfig,
        sink: &mut Vec<ResumeRecord>,
        resume: Option<&ResumeRecord>,
    ) -> (Result<(), InstallError>, DeltaStats) {
        let image = ImageSpec::from_entry(&self.entry, &self.digests(), &self.b);
        let (mut t, stats) = delta_target(image, cfg);
        t.resume = resume.map(ResumeRecord::resume_point);
        let mut boot = boot(&self.disk);
        let dev: Arc<Mutex<dyn BlockDevice>> =
            Arc::new(Mutex::new(FileDevice::open(&self.disk).unwrap()));
        let opts = InstallOptions {
            buffer_size: 256 << 10,
            checkpoint_bytes: 512 << 10,
            readback: Readback::Uncached,
            ..InstallOptions::default()
        };
        let plan = InstallPlan {
            slot: SlotId::B,
            device: self.disk.display().to_string(),
            targets: vec![t],
        };
        let r = install(plan, dev, &mut boot, &opts, sink, &mut |_| {}).await;
        let r = r.map(|_| boot.stage(SlotId::B).unwrap());
        let s = stats.lock().unwrap().clone();
        (r, s)
    }

    fn slot_b_image(&self) -> Vec<u8> {
        read(&self.disk, &self.b)[..self.new.len()].to_vec()
    }

    /// After a failure: B not bootable, A untouched, GPT intact.
    fn assert_nothing_staged(&self, a_before: &[u8]) {
        assert_eq!(
            cgpt_field(&self.disk, 4, "-P").unwrap(),
            0,
            "USR-B disabled"
        );
        assert_eq!(cgpt_field(&self.disk, 4, "-T").unwrap(), 0);
        assert!(self.slot_a() == a_before, "USR-A changed");
        sgdisk_verify(&self.disk).unwrap();
        assert_eq!(boot(&self.disk).status().unwrap().next, Some(SlotId::A));
    }

    /// Write `bytes` as a new index file and point `cfg` at it with a matching digest.
    fn serve_index(&self, cfg: &mut DeltaConfig, bytes: &[u8]) {
        let name = format!("bad-{}.idx", &hex::encode(sha(bytes))[..16]);
        std::fs::write(self.repo.join(&name), bytes).unwrap();
        cfg.index_url = Url::parse(&self.server.url_for(&name)).unwrap();
        cfg.index_size = bytes.len() as u64;
        cfg.index_sha256 = sha(bytes);
    }

    fn index(&self) -> ChunkIndex {
        let ix = self.entry.chunk_index.as_ref().unwrap();
        let b = std::fs::read(self.repo.join(&ix.url)).unwrap();
        ChunkIndex::parse(&b, self.entry.size, self.entry.compressed_size).unwrap()
    }
}

fn boot(disk: &Path) -> GptPrio<FileDevice> {
    GptPrio::new(
        FileDevice::open(disk).unwrap(),
        "flatcar.img",
        Layout::Flatcar.config(),
    )
    .unwrap()
}

fn read(disk: &Path, p: &Partition) -> Vec<u8> {
    let d = std::fs::read(disk).unwrap();
    d[p.byte_offset as usize..(p.byte_offset + p.byte_len) as usize].to_vec()
}

/// The kind inside a failed install (`fetch` errors carry the source's own kind).
fn kind(e: &InstallError) -> &'static str {
    match e {
        InstallError::Fetch { source, .. } => source.kind,
        other => other.kind(),
    }
}

#[tokio::test]
async fn delta_install_fetches_only_new_chunks_and_the_slot_hashes_to_the_manifest() {
    let Some(w) = World::new().await else { return };
    let a_before = w.slot_a();
    let (r, s) = w.install(w.config(), &mut Vec::new()).await;
    r.unwrap();
    assert!(w.slot_b_image() == w.new, "USR-B is not the new image");
    assert_eq!(hex::encode(sha(&w.slot_b_image())), w.entry.sha256);
    assert!(w.slot_a() == a_before, "the seed slot changed");
    // Staged: B is next to boot, A still marked good.
    assert_eq!(boot(&w.disk).status().unwrap().next, Some(SlotId::B));
    assert_eq!(cgpt_field(&w.disk, 3, "-S").unwrap(), 1);
    sgdisk_verify(&w.disk).unwrap();

    assert_eq!(s.fallback, None);
    assert_eq!(s.seed_mismatches, 0);
    assert!(s.bytes_reused > w.entry.size * 9 / 10, "{s:?}");
    assert!(s.bytes_fetched < w.entry.compressed_size / 5, "{s:?}");
    // Two edits: the index plus at most a few coalesced ranges, each for neighbours.
    let log = w.server.request_log();
    let ranges: Vec<_> = log.iter().filter(|e| e.range.is_some()).collect();
    assert_eq!(s.requests as usize, log.len(), "{log:?}");
    assert!(ranges.iter().all(|e| e.status == 206), "{log:?}");
    assert!(
        ranges.len() <= 4,
        "{} range requests: {log:?}",
        ranges.len()
    );
    assert!(
        (ranges.len() as u64) < s.chunks_fetched,
        "neighbours not coalesced: {s:?}"
    );
    let _ = &w.old;
}

#[tokio::test]
async fn a_corrupted_seed_chunk_is_detected_and_fetched_instead() {
    let Some(w) = World::new().await else { return };
    let (_, clean) = w.install(w.config(), &mut Vec::new()).await;
    // Flip a byte of USR-A in a region the new image shares with it.
    let mut dev = FileDevice::open(&w.disk).unwrap();
    let at = w.a.byte_offset + 100_000;
    let mut b = [0u8; 1];
    dev.read_at(&mut b, at).unwrap();
    dev.write_at(&[b[0] ^ 0x40], at).unwrap();
    drop(dev);
    let a_before = w.slot_a();
    let (r, s) = w.install(w.config(), &mut Vec::new()).await;
    r.unwrap();
    assert!(
        w.slot_b_image() == w.new,
        "the corrupted seed byte reached USR-B"
    );
    assert!(w.slot_a() == a_before);
    assert!(s.bytes_reused < clean.bytes_reused, "{s:?} vs {clean:?}");
    assert!(
        s.chunks_fetched > clean.chunks_fetched,
        "{s:?} vs {clean:?}"
    );
    assert_eq!(s.fallback, None);
}

#[tokio::test]
async fn a_server_that_ignores_range_gives_a_full_install() {
    let Some(w) = World::new().await else { return };
    w.server.set_fault(FaultRule::new(
        format!("/{}", w.entry.url),
        Fault::IgnoreRange,
    ));
    let (r, s) = w.install(w.config(), &mut Vec::new()).await;
    r.unwrap();
    assert!(w.slot_b_image() == w.new);
    assert!(
        s.fallback.as_deref().unwrap().contains("ignored Range"),
        "{s:?}"
    );
    assert!(s.bytes_fetched >= w.entry.compressed_size, "{s:?}");
}

#[tokio::test]
async fn a_missing_index_gives_a_full_install() {
    let Some(w) = World::new().await else { return };
    std::fs::remove_file(w.repo.join(&w.entry.chunk_index.as_ref().unwrap().url)).unwrap();
    let (r, s) = w.install(w.config(), &mut Vec::new()).await;
    r.unwrap();
    assert!(w.slot_b_image() == w.new);
    assert!(
        s.fallback.as_deref().unwrap().contains("no chunk index"),
        "{s:?}"
    );
    assert_eq!(s.bytes_reused, 0);
}

#[tokio::test]
async fn bad_indexes_and_bad_chunks_fail_with_their_kind_and_stage_nothing() {
    let Some(w) = World::new().await else { return };
    let a_before = w.slot_a();
    let ix = w.index();
    let good = ix.encode();

    let mut cases: Vec<(&str, DeltaConfig)> = Vec::new();
    // Digest and size differ from the (signed) manifest.
    let mut c = w.config();
    c.index_sha256[0] ^= 1;
    cases.push(("delta_index_mismatch", c));
    let mut c = w.config();
    c.index_size -= 1;
    cases.push(("delta_index_mismatch", c));
    // Overlapping, out-of-order, out-of-range chunks, under a matching digest.
    let mut bad = ix.clone();
    bad.chunks[3].image_offset -= 1;
    let mut c = w.config();
    w.serve_index(&mut c, &bad.encode());
    cases.push(("chunk_index_overlapping", c));
    let mut bad = ix.clone();
    bad.chunks[3].file_offset = 0;
    let mut c = w.config();
    w.serve_index(&mut c, &bad.encode());
    cases.push(("chunk_index_out_of_order", c));
    let mut bad = ix.clone();
    let last = bad.chunks.len() - 1;
    bad.chunks[last].image_len += 1;
    let mut c = w.config();
    w.serve_index(&mut c, &bad.encode());
    cases.push(("chunk_index_out_of_range", c));
    // A chunk count that would exhaust memory (header only, count u32::MAX).
    let mut huge = good[..48].to_vec();
    huge[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut c = w.config();
    w.serve_index(&mut c, &huge);
    cases.push(("chunk_index_too_many_chunks", c));
    for (want, cfg) in cases {
        let (r, _) = w.install(cfg, &mut Vec::new()).await;
        let e = r.unwrap_err();
        assert_eq!(kind(&e), want, "{e}");
        w.assert_nothing_staged(&a_before);
    }

    // The server answers every Range with other bytes, and the full stream is just as
    // wrong: asked twice, then the full stream, whose signed SHA-256 refuses it.
    let edited = ix.chunk_at(MIB as u64).unwrap();
    let c = ix.chunks[edited];
    w.server.set_fault(FaultRule::new(
        format!("/{}", w.entry.url),
        Fault::CorruptAt(c.file_offset + u64::from(c.file_len) / 2),
    ));
    let (r, s) = w.install(w.config(), &mut Vec::new()).await;
    let e = r.unwrap_err();
    assert!(
        matches!(kind(&e), "delta_stream_hash" | "delta_stream_decode"),
        "{e}"
    );
    assert!(
        matches!(
            s.fallback_kind.as_deref(),
            Some("delta_chunk_hash" | "delta_chunk_length")
        ),
        "{s:?}"
    );
    assert_eq!(s.refetches, 1, "{s:?}");
    w.assert_nothing_staged(&a_before);
}

/// Wrong answers to a `Range` (an index that describes other bytes than the file holds, a
/// frame longer than its chunk, a corrupted answer) are asked once more, then the full
/// stream of the same file is installed; the report says why, with the kind.
#[tokio::test]
async fn a_wrong_fetched_chunk_is_fetched_again_then_the_full_stream_is_installed() {
    let Some(w) = World::new().await else { return };
    let ix = w.index();
    let edited = ix.chunk_at(MIB as u64).unwrap();

    // A corrupted answer once (a bad proxy): the second request gets it right.
    let c = ix.chunks[edited];
    w.server.set_fault(
        FaultRule::new(
            format!("/{}", w.entry.url),
            Fault::CorruptAt(c.file_offset + u64::from(c.file_len) / 2),
        )
        .times(1),
    );
    let (r, s) = w.install(w.config(), &mut Vec::new()).await;
    r.unwrap();
    assert!(w.slot_b_image() == w.new);
    assert_eq!((s.refetches, s.fallback.as_deref()), (1, None), "{s:?}");
    assert!(s.bytes_reused > 0, "{s:?}");
    w.server.clear_faults();

    // The (digest-matching) index says other bytes for one chunk, or cuts a frame short of
    // what it decompresses to: wrong twice, so the full stream, which is right.
    let mut hash = ix.clone();
    hash.chunks[edited].sha256[0] ^= 1;
    let mut long = ix.clone();
    long.chunks[edited].image_len -= 1;
    long.chunks[edited + 1].image_offset -= 1;
    long.chunks[edited + 1].image_len += 1;
    for (want, bad) in [("delta_chunk_hash", hash), ("delta_frame_too_long", long)] {
        let mut cfg = w.config();
        w.serve_index(&mut cfg, &bad.encode());
        let (r, s) = w.install(cfg, &mut Vec::new()).await;
        r.unwrap();
        assert!(w.slot_b_image() == w.new, "{want}");
        assert_eq!(s.fallback_kind.as_deref(), Some(want), "{s:?}");
        assert!(s.fallback.as_deref().unwrap().contains("twice"), "{s:?}");
        assert_eq!(s.refetches, 1, "{s:?}");
        assert_eq!(boot(&w.disk).status().unwrap().next, Some(SlotId::B));
    }
}

/// On resume the target slot's old content is a second seed: what the interrupted run (or an
/// earlier one) left past its last checkpoint is copied, not fetched. Here a clean run wrote
/// the whole image to B, a second run died at its first `Range` (503), and the resumed run
/// completes from the two slots while every `Range` still fails.
#[tokio::test]
async fn a_resumed_delta_copies_what_the_target_slot_still_holds() {
    let Some(w) = World::new().await else { return };
    let (r, clean) = w.install(w.config(), &mut Vec::new()).await;
    r.unwrap();
    assert!(clean.chunks_fetched > 0, "{clean:?}");
    let file = format!("/{}", w.entry.url);
    w.server
        .set_fault(FaultRule::new(file.clone(), Fault::Status(503)));
    let mut records = Vec::new();
    let (r, _) = w.install(w.config(), &mut records).await;
    assert_eq!(kind(&r.unwrap_err()), "delta_http");
    let rec = records.last().expect("a checkpoint").clone();
    assert!(
        rec.written > 0 && rec.written < w.new.len() as u64,
        "{rec:?}"
    );

    let (r, s) = w
        .install_from(w.config(), &mut Vec::new(), Some(&rec))
        .await;
    r.unwrap();
    assert!(w.slot_b_image() == w.new);
    assert_eq!(s.chunks_fetched, 0, "{s:?}");
    assert!(s.bytes_reused_inactive > 0, "{s:?}");
    assert_eq!(s.requests, 1, "only the index: {s:?}");
    assert_eq!(boot(&w.disk).status().unwrap().next, Some(SlotId::B));
}

#[tokio::test]
async fn a_restart_mid_delta_resumes_after_what_was_written() {
    let Some(w) = World::new().await else { return };
    let (_, clean) = w.install(w.config(), &mut Vec::new()).await;
    // Forget what the clean run wrote to B, so B seeds nothing beyond what run 1 writes.
    FileDevice::open(&w.disk)
        .unwrap()
        .write_at(&vec![0u8; w.b.byte_len as usize], w.b.byte_offset)
        .unwrap();
    // Run 1 dies at its first Range request (the edit at 1 MiB): what came from the seed
    // before it is checkpointed.
    w.server.set_fault(FaultRule::new(
        format!("/{}", w.entry.url),
        Fault::Status(503),
    ));
    let mut records = Vec::new();
    let (r, _) = w.install(w.config(), &mut records).await;
    assert_eq!(kind(&r.unwrap_err()), "delta_http");
    let rec = records
        .last()
        .expect("a checkpoint before the failure")
        .clone();
    assert!(rec.resumable && !rec.complete, "{rec:?}");
    assert!(
        rec.written >= 512 << 10 && rec.written < MIB as u64,
        "{rec:?}"
    );
    w.server.clear_faults();
    w.server.clear_log();

    // Run 2 starts at the checkpoint: nothing before it is copied or fetched again.
    let (r, s) = w
        .install_from(w.config(), &mut Vec::new(), Some(&rec))
        .await;
    r.unwrap();
    assert!(w.slot_b_image() == w.new);
    assert!(
        s.bytes_reused + rec.written <= clean.bytes_reused + 64 * 1024,
        "resumed run reused {} bytes, the full run {}, {} were already written",
        s.bytes_reused,
        clean.bytes_reused,
        rec.written
    );
    assert!(s.bytes_reused < clean.bytes_reused - (256 << 10), "{s:?}");
    assert_eq!(s.chunks_fetched, clean.chunks_fetched);
}

/// A server that answers every `Range` on `file` with 206 and the right bytes but a
/// `Content-Range` for other bytes (start + 1), and serves other paths whole. Raw HTTP/1.1
/// on 127.0.0.1, one request per connection; the task ends with the test's runtime.
async fn lying_content_range_server(repo: PathBuf, file: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let repo = repo.clone();
            let file = file.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 64 << 10 {
                    let Ok(n) = conn.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&req).to_string();
                let path = text
                    .split(' ')
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/');
                let range = text
                    .lines()
                    .find_map(|l| l.strip_prefix("range: ").or(l.strip_prefix("Range: ")))
                    .and_then(|r| r.trim().strip_prefix("bytes="))
                    .and_then(|r| r.split_once('-'))
                    .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                let Ok(body) = std::fs::read(repo.join(path)) else {
                    let _ = conn
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let head = match range {
                    Some((a, b)) if path == file => {
                        let head = format!(
                            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {}-{}/{}\r\nconnection: close\r\n\r\n",
                            b - a + 1,
                            a + 1,
                            b + 1,
                            body.len()
                        );
                        let _ = conn.write_all(head.as_bytes()).await;
                        let _ = conn.write_all(&body[a..=b]).await;
                        return;
                    }
                    _ => format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    ),
                };
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(&body).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_range_answered_with_another_content_range_falls_back_to_the_full_stream() {
    let Some(w) = World::new().await else { return };
    let a_before = w.slot_a();
    let base = lying_content_range_server(w.repo.clone(), w.entry.url.clone()).await;
    let mut cfg = w.config();
    cfg.file_url = Url::parse(&format!("{base}/{}", w.entry.url)).unwrap();
    cfg.index_url = Url::parse(&format!(
        "{base}/{}",
        w.entry.chunk_index.as_ref().unwrap().url
    ))
    .unwrap();
    let (r, s) = w.install(cfg, &mut Vec::new()).await;
    // Asked twice, then the whole file (which this server serves right) is installed.
    r.unwrap();
    assert_eq!(
        s.fallback_kind.as_deref(),
        Some("delta_content_range"),
        "{s:?}"
    );
    assert_eq!(s.refetches, 1, "{s:?}");
    assert!(w.slot_b_image() == w.new);
    assert!(w.slot_a() == a_before, "USR-A changed");
}

/// The chunk index, or the file's `Range` answers, from a server whose certificate the
/// client does not trust (a fresh self-signed one; the default client trusts the system
/// roots): the install fails with kind `tls`, the same kind a manifest or full-image fetch
/// gets, naming the URL; no fallback to the full stream (the same server would refuse it
/// the same way), and nothing is staged.
#[tokio::test]
async fn an_untrusted_certificate_on_the_index_or_a_range_fails_with_kind_tls() {
    let Some(w) = World::new().await else { return };
    let a_before = w.slot_a();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let tls = server_mock::TlsIdentity::from_pem(
        cert.cert.pem().as_bytes(),
        cert.key_pair.serialize_pem().as_bytes(),
    )
    .unwrap();
    let https = server_mock::Server::start_with(&w.repo, "127.0.0.1:0".parse().unwrap(), Some(tls))
        .await
        .unwrap();
    let index = w.entry.chunk_index.as_ref().unwrap().url.clone();
    for (case, index_https, file_https) in [("index", true, false), ("range", false, true)] {
        let mut cfg = w.config();
        if index_https {
            cfg.index_url = Url::parse(&https.url_for(&index)).unwrap();
        }
        if file_https {
            cfg.file_url = Url::parse(&https.url_for(&w.entry.url)).unwrap();
        }
        let (r, s) = w.install(cfg, &mut Vec::new()).await;
        let e = r.unwrap_err();
        assert_eq!(kind(&e), "tls", "{case}: {e}");
        let text = e.to_string();
        assert!(text.contains(&https.url()), "{case}: names the URL: {text}");
        assert!(
            text.contains("UnknownIssuer"),
            "{case}: names the cause: {text}"
        );
        assert!(s.fallback.is_none(), "{case}: no fallback: {s:?}");
        w.assert_nothing_staged(&a_before);
    }
    assert!(
        https.request_log().is_empty(),
        "no request got past the handshake"
    );
}

/// `apply` on a sandboxed Flatcar host (gptprio, real GPT file, server-mock): a schema v2
/// manifest with a chunked image is installed by delta, seeded from the booted slot A; the
/// report says what was reused and fetched, and B holds the image the manifest names.
#[tokio::test(flavor = "multi_thread")]
async fn apply_installs_a_chunked_release_by_delta_and_reports_the_saving() {
    use update_agent_sandbox::disk_image::Preset;
    use update_agent_sandbox::world::{Backend, World};
    if !require_tool("sgdisk", "gdisk").unwrap() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 4)
        .await
        .unwrap();
    let base = world.publish("1.0.0", Vec::new()).unwrap().manifest;
    let slots = world.slots().unwrap();
    let a = slots.get(SlotId::A).parts["usr"].clone();
    let old = content(3 * MIB, 21);
    FileDevice::open(dir.path().join("disk.img"))
        .unwrap()
        .write_at(&old, a.byte_offset)
        .unwrap();
    let mut new = old.clone();
    new[MIB..MIB + 10_000].copy_from_slice(&content(10_000, 22));
    let src = dir.path().join("usr-2.raw");
    std::fs::write(&src, &new).unwrap();
    let entry = update_agent::publish::prepare_chunked_image(
        &src,
        &dir.path().join("repo"),
        "usr",
        3,
        ChunkParams::DEFAULT,
    )
    .unwrap();
    let mut m = base.clone();
    m.schema_version = updater_proto::SCHEMA_VERSION_CHUNKED;
    m.version = semver::Version::new(2, 0, 0);
    m.images = vec![entry.clone()];
    world.serve_manifest(m).unwrap();

    let report =
        update_agent::ops::apply::apply(&world.host().unwrap(), &Default::default(), &mut |_| {})
            .await
            .unwrap();
    assert_eq!(report.slot, SlotId::B);
    assert_eq!(
        hex::encode(world.slot_sha256(SlotId::B, "usr", entry.size).unwrap()),
        entry.sha256
    );
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let json = serde_json::to_value(&report).unwrap();
    let d = &json["delta"][0];
    assert_eq!(d["role"], "usr", "{json}");
    assert!(
        d["bytes_reused"].as_u64().unwrap() > entry.size * 9 / 10,
        "{json}"
    );
    assert!(d["fallback"].is_null(), "{json}");
    let fetched = d["bytes_fetched"].as_u64().unwrap();
    assert!(fetched < entry.compressed_size / 5, "{json}");
    assert_eq!(json["bytes_fetched"].as_u64().unwrap(), fetched, "{json}");
    assert!(report.render().contains("reused"), "{}", report.render());
    // The history's staged entry keeps the saving, as `history` shows it.
    let state = update_agent::state::StateStore::open(&world.state_dir)
        .unwrap()
        .load()
        .unwrap();
    let staged = state
        .history
        .iter()
        .rfind(|e| e.event == update_agent::state::HistoryEvent::Staged)
        .unwrap();
    let t = staged.transfer.as_ref().expect("transfer recorded");
    assert_eq!(t.bytes_fetched, fetched, "{t:?}");
    assert_eq!(t.bytes_reused, d["bytes_reused"].as_u64().unwrap(), "{t:?}");
    assert_eq!(t.requests, d["requests"].as_u64().unwrap(), "{t:?}");
    assert_eq!(t.fallback, None);
}
