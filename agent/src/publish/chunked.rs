//! Chunked images for delta updates (manifest schema v2, `docs/delta.md`): the image is cut
//! into content-defined chunks (FastCDC 2020), each chunk is compressed as its own zstd
//! frame, and the frames are written back to back into one file. That file is a valid zstd
//! stream of the whole image (`zstd -d` and agents without delta support read it as a full
//! image); the chunk index beside it lets an agent fetch single frames with `Range`.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::Path;

use ring::digest::{digest, Context, SHA256};
use updater_proto::{ChunkEntry, ChunkIndex, ChunkIndexRef, ChunkParams, Compression, ImageEntry};

use super::fsutil::{commit_temp, create_temp, WriteMode};
use super::{io_err, PublishError};

/// The chunker every party must use for a given [`ChunkParams`]: FastCDC 2020, normalisation
/// level 1, gear seed 0 (fastcdc's defaults). The agent indexes its seed slot with this too.
pub(crate) fn chunker<R: std::io::Read>(source: R, p: ChunkParams) -> fastcdc::v2020::StreamCDC<R> {
    fastcdc::v2020::StreamCDC::new(source, p.min, p.avg, p.max)
}

/// Write `src` into `out_dir` as a chunked zstd image `<role>-<16 hex>.chunked.zst` plus its
/// index `<role>-<16 hex>.chunked.idx` (content-addressed like [`super::prepare_image`]) and
/// return the entry (with `chunk_index`; needs manifest schema v2). Memory: one chunk (at
/// most `params.max` bytes) and its frame at a time, plus the index (56 bytes per chunk).
pub fn prepare_chunked_image(
    src: &Path,
    out_dir: &Path,
    role: &str,
    zstd_level: i32,
    params: ChunkParams,
) -> Result<ImageEntry, PublishError> {
    let _span = tracing::info_span!("prepare_chunked_image", src = %src.display(), role).entered();
    let bad = |detail: String| PublishError::BadImage {
        path: src.to_path_buf(),
        detail,
    };
    updater_proto::manifest::validate_role(role).map_err(|e| bad(e.to_string()))?;
    params.validate().map_err(|e| bad(e.to_string()))?;
    let input = File::open(src).map_err(io_err("open", src))?;
    let staging = out_dir.join(format!("{role}.chunked.partial"));
    let (mut file, tmp) = create_temp(&staging, 0o644)?;

    let result = (|| -> Result<(String, String, u64, Vec<ChunkEntry>), PublishError> {
        let mut comp = zstd::bulk::Compressor::new(zstd_level)
            .map_err(|e| bad(format!("zstd level {zstd_level}: {e}")))?;
        // Each frame says its decompressed size and carries a checksum: a plain `zstd -d`
        // of the file is checked frame by frame too.
        comp.include_checksum(true)
            .and_then(|()| comp.include_contentsize(true))
            .map_err(|e| bad(format!("zstd parameters: {e}")))?;
        let mut plain = Context::new(&SHA256);
        let mut wire = Context::new(&SHA256);
        let (mut size, mut len) = (0u64, 0u64);
        let mut chunks = Vec::new();
        for chunk in chunker(BufReader::with_capacity(1 << 20, input), params) {
            let chunk = chunk.map_err(|e| match e {
                fastcdc::v2020::Error::IoError(e) => io_err("read", src)(e),
                other => bad(format!("chunking: {other}")),
            })?;
            plain.update(&chunk.data);
            let frame = comp
                .compress(&chunk.data)
                .map_err(io_err("compress", src))?;
            wire.update(&frame);
            file.write_all(&frame).map_err(io_err("write", &tmp))?;
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(digest(&SHA256, &chunk.data).as_ref());
            let image_len =
                u32::try_from(chunk.length).map_err(|_| bad("chunk too long".into()))?;
            let file_len = u32::try_from(frame.len()).map_err(|_| bad("frame too long".into()))?;
            chunks.push(ChunkEntry {
                image_offset: size,
                image_len,
                file_offset: len,
                file_len,
                sha256,
            });
            size += chunk.length as u64;
            len += frame.len() as u64;
        }
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        Ok((
            hex::encode(plain.finish()),
            hex::encode(wire.finish()),
            len,
            chunks,
        ))
    })();
    let (sha256, compressed_sha256, len, chunks) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let size = chunks.last().map_or(0, ChunkEntry::image_end);
    if size == 0 {
        let _ = std::fs::remove_file(&tmp);
        return Err(bad(
            "is empty; a partition image must have at least one byte".into(),
        ));
    }
    let index = ChunkIndex {
        image_size: size,
        file_size: len,
        params,
        chunks,
    };
    let index_bytes = index.encode_compact();
    // The agent's parser is the judge: never publish an index it would refuse.
    if let Err(e) = ChunkIndex::parse(&index_bytes, size, len) {
        let _ = std::fs::remove_file(&tmp);
        return Err(bad(format!("built an index the agent would refuse: {e}")));
    }
    let stem = format!("{role}-{}.chunked", &sha256[..16]);
    let url = format!("{stem}.zst");
    let index_url = format!("{stem}.idx");
    commit_temp(&tmp, &out_dir.join(&url), WriteMode::Replace)?;
    super::write_atomic(
        &out_dir.join(&index_url),
        &index_bytes,
        0o644,
        WriteMode::Replace,
    )?;
    let entry = ImageEntry {
        role: role.to_owned(),
        url,
        size,
        sha256,
        compression: Compression::Zstd,
        compressed_size: len,
        compressed_sha256,
        chunk_index: Some(ChunkIndexRef {
            url: index_url,
            size: index_bytes.len() as u64,
            sha256: hex::encode(digest(&SHA256, &index_bytes)),
        }),
    };
    if let Err(e) = entry.validate_at("") {
        let _ = std::fs::remove_file(out_dir.join(&entry.url));
        let _ = std::fs::remove_file(out_dir.join(index_url_of(&entry)));
        return Err(bad(e.to_string()));
    }
    tracing::info!(url = %entry.url, size, compressed = len, chunks = index.chunks.len(), "chunked image prepared");
    Ok(entry)
}

fn index_url_of(entry: &ImageEntry) -> String {
    entry
        .chunk_index
        .as_ref()
        .map(|i| i.url.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Pseudo-random bytes (xorshift), so chunk boundaries are content-defined, not periodic.
    pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn publish(data: &[u8], dir: &Path) -> (ImageEntry, ChunkIndex, Vec<u8>) {
        let src = dir.join("root.raw");
        std::fs::write(&src, data).unwrap();
        let out = dir.join("repo");
        std::fs::create_dir_all(&out).unwrap();
        let e = prepare_chunked_image(&src, &out, "root", 3, ChunkParams::DEFAULT).unwrap();
        let file = std::fs::read(out.join(&e.url)).unwrap();
        let ixr = e.chunk_index.clone().unwrap();
        let ixb = std::fs::read(out.join(&ixr.url)).unwrap();
        assert_eq!(ixb.len() as u64, ixr.size);
        assert_eq!(hex::encode(digest(&SHA256, &ixb)), ixr.sha256);
        let ix = ChunkIndex::parse(&ixb, e.size, e.compressed_size).unwrap();
        (e, ix, file)
    }

    #[test]
    fn the_file_is_one_zstd_stream_and_each_frame_is_its_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let data = noise(1 << 20, 7);
        let (e, ix, file) = publish(&data, dir.path());
        assert_eq!(e.compressed_size, file.len() as u64);
        assert_eq!(zstd::decode_all(&file[..]).unwrap(), data);
        assert!(ix.chunks.len() > 8, "{} chunks", ix.chunks.len());
        for c in &ix.chunks {
            let frame = &file[c.file_offset as usize..c.file_end() as usize];
            let plain = zstd::bulk::decompress(frame, c.image_len as usize).unwrap();
            assert_eq!(
                plain,
                &data[c.image_offset as usize..c.image_end() as usize]
            );
            assert_eq!(digest(&SHA256, &plain).as_ref(), &c.sha256);
        }

        // The real `zstd -d` is run on such a file in tests/publisher_cli.rs.
    }

    #[test]
    fn an_insertion_changes_only_the_chunks_around_it() {
        let a = noise(2 << 20, 11);
        let mut b = a.clone();
        b.splice(1_000_000..1_000_000, noise(100, 3));
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let (_, ia, _) = publish(&a, d1.path());
        let (_, ib, _) = publish(&b, d2.path());
        let have: std::collections::HashSet<[u8; 32]> =
            ia.chunks.iter().map(|c| c.sha256).collect();
        let missing: u64 = ib
            .chunks
            .iter()
            .filter(|c| !have.contains(&c.sha256))
            .map(|c| u64::from(c.image_len))
            .sum();
        // Content-defined: the shift after the insertion does not change later chunks.
        assert!(missing < 200 << 10, "{missing} bytes of new chunks");
    }

    #[test]
    fn bad_parameters_and_empty_images_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("repo");
        std::fs::create_dir(&out).unwrap();
        let src = dir.path().join("x");
        std::fs::write(&src, b"").unwrap();
        let err = prepare_chunked_image(&src, &out, "root", 3, ChunkParams::DEFAULT).unwrap_err();
        assert_eq!(err.kind(), "bad_image");
        std::fs::write(&src, b"x").unwrap();
        let p = ChunkParams {
            min: 64,
            avg: 256,
            max: 1024,
        };
        let err = prepare_chunked_image(&src, &out, "root", 3, p).unwrap_err();
        assert_eq!(err.kind(), "bad_image");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }
}
