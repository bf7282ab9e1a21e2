//! Read a written range back and hash it, bypassing the page cache where the system allows.
//!
//! `Uncached` opens the device path with `O_DIRECT` (aligned buffers, aligned offsets and
//! lengths). Where the filesystem refuses `O_DIRECT` (tmpfs, some FUSE), it falls back to
//! fsync + `posix_fadvise(DONTNEED)` on the range and a normal read, which makes the kernel
//! drop the clean cached pages so the read comes from the medium (on tmpfs there is no
//! medium: the check then only proves the bytes in memory).
//! Reading and hashing overlap: a reader thread fills one buffer while the caller hashes the
//! other.

use super::buf::{round_up, AlignedBuf, IO_ALIGN};
use crate::disk::BlockDevice;
use nix::fcntl::{posix_fadvise, OFlag, PosixFadviseAdvice};
use ring::digest;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use std::sync::Mutex;
use tracing::debug;

/// How the pipeline verifies what reached the disk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Readback {
    /// No read-back (the streamed hash is still checked).
    Off,
    /// Read through the [`BlockDevice`]; may be served from the page cache. For devices
    /// without a path (test doubles) and as a fallback.
    #[default]
    Device,
    /// Read `path` (the whole disk the `BlockDevice` writes, same offsets) bypassing the
    /// page cache.
    Uncached { path: PathBuf },
}

/// How a read-back was actually done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadbackMethod {
    /// Through the block device (page cache possible).
    Device,
    /// `O_DIRECT` reads: straight from the medium.
    Direct,
    /// fsync + `POSIX_FADV_DONTNEED`, then buffered reads.
    DropCache,
}

/// An I/O failure during read-back: which operation, at which absolute offset.
#[derive(Debug)]
pub(crate) struct ReadError {
    pub op: &'static str,
    pub offset: u64,
    pub source: io::Error,
}

/// Hash `len` bytes at absolute `offset` (inside a partition ending at `limit`).
pub(crate) fn hash_range(
    mode: &Readback,
    dev: &Mutex<dyn BlockDevice>,
    offset: u64,
    len: u64,
    limit: u64,
    buffer_size: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<([u8; 32], ReadbackMethod), ReadError> {
    match mode {
        Readback::Off | Readback::Device => {
            let read = |buf: &mut [u8], at: u64| -> io::Result<()> {
                dev.lock()
                    .map_err(|_| io::Error::other("block device lock poisoned"))?
                    .read_at(buf, at)
            };
            let h = pipelined_hash(offset, len, len, buffer_size, read, progress)?;
            Ok((h, ReadbackMethod::Device))
        }
        Readback::Uncached { path } => {
            match direct(path, offset, len, limit, buffer_size, progress) {
                Ok(Some(h)) => return Ok((h, ReadbackMethod::Direct)),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            let h = drop_cache(path, offset, len, buffer_size, progress)?;
            Ok((h, ReadbackMethod::DropCache))
        }
    }
}

/// `O_DIRECT` read-back; `Ok(None)` when the system refuses direct I/O here.
fn direct(
    path: &PathBuf,
    offset: u64,
    len: u64,
    limit: u64,
    buffer_size: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<Option<[u8; 32]>, ReadError> {
    let align = [IO_ALIGN as u64, 512].into_iter().find(|a| offset % a == 0);
    let Some(align) = align else {
        debug!(
            offset,
            "partition offset not sector aligned; no direct read-back"
        );
        return Ok(None);
    };
    let read_len = round_up(len, align);
    if offset + read_len > limit {
        debug!("aligned read-back would leave the partition; no direct read-back");
        return Ok(None);
    }
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_DIRECT.bits())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
            debug!(path = %path.display(), "O_DIRECT refused; falling back to fadvise");
            return Ok(None);
        }
        Err(source) => {
            return Err(ReadError {
                op: "opening for read-back",
                offset,
                source,
            })
        }
    };
    let read = |buf: &mut [u8], at: u64| file.read_exact_at(buf, at);
    match pipelined_hash(offset, read_len, len, buffer_size, read, progress) {
        Ok(h) => Ok(Some(h)),
        // A filesystem that accepted the flag but rejects the first aligned read.
        Err(e) if e.offset == offset && e.source.raw_os_error() == Some(nix::libc::EINVAL) => {
            debug!("O_DIRECT read refused; falling back to fadvise");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// fsync, drop the cached pages of the range, then read it normally.
fn drop_cache(
    path: &PathBuf,
    offset: u64,
    len: u64,
    buffer_size: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<[u8; 32], ReadError> {
    let err = |op: &'static str| move |source: io::Error| ReadError { op, offset, source };
    let file = File::open(path).map_err(err("opening for read-back"))?;
    file.sync_all().map_err(err("syncing before read-back"))?;
    let (o, l) = (
        i64::try_from(offset).unwrap_or(i64::MAX),
        i64::try_from(len).unwrap_or(i64::MAX),
    );
    posix_fadvise(&file, o, l, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .map_err(|e| io::Error::from_raw_os_error(e as i32))
        .map_err(err("dropping cached pages before read-back"))?;
    let read = |buf: &mut [u8], at: u64| file.read_exact_at(buf, at);
    pipelined_hash(offset, len, len, buffer_size, read, progress)
}

/// Read `read_len` bytes from `offset` in `buffer_size` pieces on a helper thread, hashing the
/// first `hash_len` of them here. Two buffers: one being read, one being hashed.
fn pipelined_hash<R>(
    offset: u64,
    read_len: u64,
    hash_len: u64,
    buffer_size: usize,
    read: R,
    progress: &mut dyn FnMut(u64),
) -> Result<[u8; 32], ReadError>
where
    R: Fn(&mut [u8], u64) -> io::Result<()> + Send,
{
    let mut ctx = digest::Context::new(&digest::SHA256);
    std::thread::scope(|s| {
        let (full_tx, full_rx) = sync_channel::<Result<(AlignedBuf, u64, usize), ReadError>>(1);
        let (empty_tx, empty_rx) = sync_channel::<AlignedBuf>(2);
        for _ in 0..2 {
            // Cannot fail: the channel has room for both and the receiver is alive.
            let _ = empty_tx.send(AlignedBuf::new(buffer_size));
        }
        s.spawn(move || {
            let mut pos = 0u64;
            while pos < read_len {
                let Ok(mut buf) = empty_rx.recv() else { return };
                let n = (read_len - pos).min(buf.len() as u64) as usize;
                let at = offset + pos;
                let msg = match read(&mut buf.as_mut_slice()[..n], at) {
                    Ok(()) => Ok((buf, pos, n)),
                    Err(source) => Err(ReadError {
                        op: "reading back",
                        offset: at,
                        source,
                    }),
                };
                let failed = msg.is_err();
                if full_tx.send(msg).is_err() || failed {
                    return;
                }
                pos += n as u64;
            }
        });
        let mut done = 0u64;
        while done < read_len {
            let Ok(msg) = full_rx.recv() else {
                return Err(ReadError {
                    op: "reading back",
                    offset: offset + done,
                    source: io::Error::other("read-back thread stopped"),
                });
            };
            let (buf, pos, n) = msg?;
            let h = hash_len.saturating_sub(pos).min(n as u64) as usize;
            ctx.update(&buf.as_slice()[..h]);
            done = pos + n as u64;
            progress(done.min(hash_len));
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })?;
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}
