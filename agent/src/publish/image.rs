//! Image preparation: stream a partition image through SHA-256 and (optionally) zstd into
//! the repository directory, and describe it with an `ImageEntry`.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use ring::digest::{Context, SHA256};
use updater_proto::{Compression, ImageEntry};

use super::fsutil::{commit_temp, create_temp, WriteMode};
use super::{io_err, PublishError};

/// zstd level used by [`prepare_image`]: fast enough for multi-GiB images on small builders.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Read buffer: memory stays bounded whatever the image size.
const CHUNK: usize = 1 << 20;

/// Counts and hashes the bytes written through it.
struct HashingWriter<W> {
    inner: W,
    hash: Context,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// [`prepare_image_level`] with [`DEFAULT_ZSTD_LEVEL`].
pub fn prepare_image(
    src: &Path,
    out_dir: &Path,
    role: &str,
    compression: Compression,
) -> Result<ImageEntry, PublishError> {
    prepare_image_level(src, out_dir, role, compression, DEFAULT_ZSTD_LEVEL)
}

/// Write `src` into `out_dir` as `<role>-<first 16 hex of sha256>.img[.zst]` (content-addressed,
/// so a republished image never overwrites bytes an agent may be resuming), atomically and
/// durably, and return its entry with a URL relative to `out_dir` (where the manifest goes).
pub fn prepare_image_level(
    src: &Path,
    out_dir: &Path,
    role: &str,
    compression: Compression,
    zstd_level: i32,
) -> Result<ImageEntry, PublishError> {
    let _span =
        tracing::info_span!("prepare_image", src = %src.display(), role, %compression).entered();
    let bad = |detail: String| PublishError::BadImage {
        path: src.to_path_buf(),
        detail,
    };
    updater_proto::manifest::validate_role(role).map_err(|e| bad(e.to_string()))?;
    let mut input = File::open(src).map_err(io_err("open", src))?;
    // A placeholder name; the real one depends on the hash, known only at the end.
    let staging = out_dir.join(format!("{role}.img.partial"));
    let (file, tmp) = create_temp(&staging, 0o644)?;
    let out = HashingWriter {
        inner: file,
        hash: Context::new(&SHA256),
        len: 0,
    };

    let result = (|| -> Result<(Context, u64, HashingWriter<File>), PublishError> {
        let mut plain = Context::new(&SHA256);
        let mut size = 0u64;
        let mut buf = vec![0u8; CHUNK];
        let write_err = io_err("write", &tmp);
        let out = match compression {
            Compression::None => {
                let mut out = out;
                loop {
                    let n = input.read(&mut buf).map_err(io_err("read", src))?;
                    if n == 0 {
                        break;
                    }
                    plain.update(&buf[..n]);
                    size += n as u64;
                    out.write_all(&buf[..n]).map_err(io_err("write", &tmp))?;
                }
                out
            }
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(out, zstd_level)
                    .map_err(|e| bad(format!("zstd level {zstd_level}: {e}")))?;
                // Agents refuse frames whose window exceeds 2^23 (their memory bound).
                // Levels up to 19 stay within it; 20-22 would pick up to 2^27.
                if zstd_level > 19 {
                    enc.window_log(crate::install::DEFAULT_ZSTD_WINDOW_LOG_MAX)
                        .map_err(|e| bad(format!("zstd window: {e}")))?;
                }
                loop {
                    let n = input.read(&mut buf).map_err(io_err("read", src))?;
                    if n == 0 {
                        break;
                    }
                    plain.update(&buf[..n]);
                    size += n as u64;
                    enc.write_all(&buf[..n])
                        .map_err(io_err("compress into", &tmp))?;
                }
                enc.finish().map_err(write_err)?
            }
        };
        Ok((plain, size, out))
    })();

    let (plain, size, out) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if size == 0 {
        let _ = std::fs::remove_file(&tmp);
        return Err(bad(
            "is empty; a partition image must have at least one byte".into(),
        ));
    }
    let HashingWriter { inner, hash, len } = out;
    if let Err(e) = inner.sync_all() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("fsync", &tmp)(e));
    }
    drop(inner);

    let sha256 = hex::encode(plain.finish());
    let compressed_sha256 = hex::encode(hash.finish());
    let suffix = match compression {
        Compression::None => "img",
        Compression::Zstd => "img.zst",
    };
    let url = format!("{role}-{}.{suffix}", &sha256[..16]);
    commit_temp(&tmp, &out_dir.join(&url), WriteMode::Replace)?;

    let entry = ImageEntry {
        role: role.to_owned(),
        url,
        size,
        sha256,
        compression,
        compressed_size: len,
        compressed_sha256,
        chunk_index: None,
    };
    // Belt and braces: never hand out an entry the schema would refuse.
    if let Err(e) = entry.validate_at("") {
        let _ = std::fs::remove_file(out_dir.join(&entry.url));
        return Err(bad(e.to_string()));
    }
    tracing::info!(url = %entry.url, size, compressed = len, "image prepared");
    Ok(entry)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(ring::digest::digest(&SHA256, bytes))
    }

    #[test]
    fn zstd_image_round_trips_with_correct_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("root.raw");
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i / 4096) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let out = dir.path().join("repo");
        std::fs::create_dir(&out).unwrap();
        let e = prepare_image(&src, &out, "root", Compression::Zstd).unwrap();
        assert_eq!(e.size, data.len() as u64);
        assert_eq!(e.sha256, sha(&data));
        let stored = std::fs::read(out.join(&e.url)).unwrap();
        assert_eq!(e.compressed_size, stored.len() as u64);
        assert_eq!(e.compressed_sha256, sha(&stored));
        assert!(e.compressed_size < e.size);
        assert_eq!(zstd::decode_all(&stored[..]).unwrap(), data);
        assert!(e.url.starts_with("root-") && e.url.ends_with(".img.zst"));
        // Only the image is left in the repository directory.
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    }

    /// Level 22 on a large input would use a 2^27 window; the publisher caps it so every
    /// agent (window cap 2^23) can decode what it publishes.
    #[test]
    fn ultra_levels_stay_within_the_agents_window_cap() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("root.raw");
        // 40 MiB of text with long-distance repeats: a large window would be worth it.
        let block: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        let data: Vec<u8> = block.iter().copied().cycle().take(40 << 20).collect();
        std::fs::write(&src, &data).unwrap();
        let out = dir.path().join("repo");
        std::fs::create_dir(&out).unwrap();
        let e = prepare_image_level(&src, &out, "root", Compression::Zstd, 22).unwrap();
        let stored = std::fs::read(out.join(&e.url)).unwrap();
        let mut dec = zstd::stream::read::Decoder::new(&stored[..]).unwrap();
        dec.window_log_max(crate::install::DEFAULT_ZSTD_WINDOW_LOG_MAX)
            .unwrap();
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut dec, &mut back).unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data);
    }

    #[test]
    fn uncompressed_image_has_equal_forms() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("boot.raw");
        std::fs::write(&src, b"kernel").unwrap();
        let e = prepare_image(&src, dir.path(), "boot", Compression::None).unwrap();
        assert_eq!(e.sha256, e.compressed_sha256);
        assert_eq!(e.size, 6);
        assert_eq!(std::fs::read(dir.path().join(&e.url)).unwrap(), b"kernel");
    }

    #[test]
    fn empty_image_and_bad_role_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("repo");
        std::fs::create_dir(&out).unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let err = prepare_image(&empty, &out, "root", Compression::Zstd).unwrap_err();
        assert_eq!(err.kind(), "bad_image");
        let src = dir.path().join("x");
        std::fs::write(&src, b"x").unwrap();
        let err = prepare_image(&src, &out, "ro ot", Compression::None).unwrap_err();
        assert_eq!(err.kind(), "bad_image");
        assert!(err.to_string().contains("role"), "{err}");
        let err = prepare_image(&dir.path().join("missing"), &out, "root", Compression::None)
            .unwrap_err();
        assert_eq!(err.kind(), "io");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }
}
