//! Benchmark driver (tests/bench/delta_bench.sh): assemble a chunked image by delta over
//! HTTP, seeded from a local file, with the agent's own `DeltaSource`; write it to OUT,
//! check its SHA-256 against the entry, print the delta counters as one JSON line.
//!
//! `delta_fetch SEED ENTRY_JSON BASE_URL OUT`

use std::io::Write;

use update_agent::delta::{config_for, DeltaSource, Seed};
use update_agent::fetch::{build_client, FetchConfig, Url};
use update_agent::install::{ImageSource, SourceChunk};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, seed, entry, base, out] = &args[..] else {
        return Err("usage: delta_fetch SEED ENTRY_JSON BASE_URL OUT".into());
    };
    let entry = updater_proto::ImageEntry::parse_entries(&std::fs::read(entry)?)?
        .pop()
        .ok_or("no entry")?;
    let ix = entry
        .chunk_index
        .clone()
        .ok_or("entry has no chunk_index")?;
    let base = Url::parse(&format!("{}/", base.trim_end_matches('/')))?;
    // A bare entry (no signed manifest here): its digests parsed as verification would.
    let sha = |h: &str| updater_proto::Sha256::from_hex(h).map_err(|e| e.to_string());
    let digests = updater_proto::ImageDigests {
        sha256: sha(&entry.sha256)?,
        compressed_sha256: sha(&entry.compressed_sha256)?,
        chunk_index_sha256: Some(sha(&ix.sha256)?),
    };
    let fetch = FetchConfig::default();
    let cfg = config_for(
        &entry,
        &digests,
        base.join(&entry.url)?,
        base.join(&ix.url)?,
        build_client(&fetch)?,
        fetch,
        Some(Seed {
            device: seed.into(),
            offset: 0,
            len: std::fs::metadata(seed)?.len(),
        }),
    )
    .ok_or("bad entry")?;
    let started = std::time::Instant::now();
    let (mut src, stats) = DeltaSource::new(cfg);
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    while let Some(chunk) = src.next_chunk().await? {
        if let SourceChunk::Data(b) = chunk {
            hash.update(&b);
            file.write_all(&b)?;
        }
    }
    file.flush()?;
    let sha = hex::encode(hash.finish());
    if sha != entry.sha256 {
        return Err(format!(
            "assembled image hashes to {sha}, entry says {}",
            entry.sha256
        )
        .into());
    }
    let s = stats.lock().map_err(|_| "stats poisoned")?.clone();
    println!(
        "{}",
        serde_json::json!({
            "bytes_reused": s.bytes_reused,
            "bytes_fetched": s.bytes_fetched,
            "requests": s.requests,
            "fallback": s.fallback,
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}
