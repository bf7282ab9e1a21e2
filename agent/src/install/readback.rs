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

/// How the verifier reads.
enum How<'a> {
    Device(&'a Mutex<dyn BlockDevice>),
    Direct { file: File, path: PathBuf },
    DropCache { file: File },
}

/// Incremental read-back: hashes durable (already flushed) ranges of one image in order, so
/// the read-back of early checkpoints overlaps the download of later ones.
pub(crate) struct Verifier<'a> {
    how: How<'a>,
    ctx: digest::Context,
    buffer_size: usize,
    /// End of the partition: aligned reads never go past it.
    limit: u64,
    /// No range read yet: a refusal of direct reads may still switch to the fallback.
    fresh: bool,
    /// Image bytes hashed so far.
    pub done: u64,
}

impl<'a> Verifier<'a> {
    /// A verifier for `mode` (`Off` reads through the device, for explicit re-checks).
    pub fn open(
        mode: &Readback,
        dev: &'a Mutex<dyn BlockDevice>,
        offset: u64,
        limit: u64,
        buffer_size: usize,
    ) -> Result<Self, ReadError> {
        let how = match mode {
            Readback::Off | Readback::Device => How::Device(dev),
            Readback::Uncached { path } => {
                let aligned = offset % 512 == 0;
                match OpenOptions::new()
                    .read(true)
                    .custom_flags(OFlag::O_DIRECT.bits())
                    .open(path)
                {
                    Ok(file) if aligned => How::Direct {
                        file,
                        path: path.clone(),
                    },
                    Ok(_) => How::DropCache {
                        file: open_plain(path, offset)?,
                    },
                    Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                        debug!(path = %path.display(), "O_DIRECT refused; using fadvise");
                        How::DropCache {
                            file: open_plain(path, offset)?,
                        }
                    }
                    Err(source) => {
                        return Err(ReadError {
                            op: "opening for read-back",
                            offset,
                            source,
                        })
                    }
                }
            }
        };
        Ok(Verifier {
            how,
            ctx: digest::Context::new(&digest::SHA256),
            buffer_size,
            limit,
            fresh: true,
            done: 0,
        })
    }

    pub fn method(&self) -> ReadbackMethod {
        match self.how {
            How::Device(_) => ReadbackMethod::Device,
            How::Direct { .. } => ReadbackMethod::Direct,
            How::DropCache { .. } => ReadbackMethod::DropCache,
        }
    }

    /// Forget everything hashed (the source restarted from 0).
    pub fn reset(&mut self) {
        self.ctx = digest::Context::new(&digest::SHA256);
        self.done = 0;
    }

    /// Hash `len` image bytes at absolute `offset`, which the writer has already flushed.
    pub fn feed(
        &mut self,
        offset: u64,
        len: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), ReadError> {
        if len == 0 {
            return Ok(());
        }
        let base = self.done;
        let mut prog = |d: u64| progress(base + d);
        let r = match &self.how {
            How::Device(dev) => {
                let read = |buf: &mut [u8], at: u64| -> io::Result<()> {
                    dev.lock()
                        .map_err(|_| io::Error::other("block device lock poisoned"))?
                        .read_at(buf, at)
                };
                pipelined_hash(
                    &mut self.ctx,
                    offset,
                    len,
                    len,
                    self.buffer_size,
                    read,
                    &mut prog,
                )
            }
            How::Direct { file, path } => {
                let align = if offset % IO_ALIGN as u64 == 0 {
                    IO_ALIGN as u64
                } else {
                    512
                };
                let read_len = round_up(len, align);
                if offset % align != 0 || offset + read_len > self.limit {
                    // An unaligned tail at the very end of a partition: read it through the
                    // cache after dropping it.
                    let file = open_plain(path, offset)?;
                    drop_range(&file, offset, len)?;
                    let read = |buf: &mut [u8], at: u64| file.read_exact_at(buf, at);
                    pipelined_hash(
                        &mut self.ctx,
                        offset,
                        len,
                        len,
                        self.buffer_size,
                        read,
                        &mut prog,
                    )
                } else {
                    let read = |buf: &mut [u8], at: u64| file.read_exact_at(buf, at);
                    pipelined_hash(
                        &mut self.ctx,
                        offset,
                        read_len,
                        len,
                        self.buffer_size,
                        read,
                        &mut prog,
                    )
                }
            }
            How::DropCache { file } => {
                drop_range(file, offset, len)?;
                let read = |buf: &mut [u8], at: u64| file.read_exact_at(buf, at);
                pipelined_hash(
                    &mut self.ctx,
                    offset,
                    len,
                    len,
                    self.buffer_size,
                    read,
                    &mut prog,
                )
            }
        };
        let refused_path = match (&r, &self.how) {
            (Err(e), How::Direct { path, .. })
                if self.fresh && e.source.raw_os_error() == Some(nix::libc::EINVAL) =>
            {
                Some(path.clone())
            }
            _ => None,
        };
        if let Some(path) = refused_path {
            debug!("O_DIRECT read refused; using fadvise");
            self.how = How::DropCache {
                file: open_plain(&path, offset)?,
            };
            self.ctx = digest::Context::new(&digest::SHA256);
            return self.feed(offset, len, progress);
        }
        r?;
        self.fresh = false;
        self.done += len;
        Ok(())
    }

    pub fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.ctx.finish().as_ref());
        out
    }
}

fn open_plain(path: &PathBuf, offset: u64) -> Result<File, ReadError> {
    File::open(path).map_err(|source| ReadError {
        op: "opening for read-back",
        offset,
        source,
    })
}

/// fsync, then ask the kernel to drop the (now clean) cached pages of the range.
fn drop_range(file: &File, offset: u64, len: u64) -> Result<(), ReadError> {
    let err = |op: &'static str| move |source: io::Error| ReadError { op, offset, source };
    file.sync_all().map_err(err("syncing before read-back"))?;
    let (o, l) = (
        i64::try_from(offset).unwrap_or(i64::MAX),
        i64::try_from(len).unwrap_or(i64::MAX),
    );
    posix_fadvise(file, o, l, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .map_err(|e| io::Error::from_raw_os_error(e as i32))
        .map_err(err("dropping cached pages before read-back"))
}

/// Read `read_len` bytes from `offset` in `buffer_size` pieces on a helper thread, hashing the
/// first `hash_len` of them into `ctx` here. Two buffers: one being read, one being hashed.
fn pipelined_hash<R>(
    ctx: &mut digest::Context,
    offset: u64,
    read_len: u64,
    hash_len: u64,
    buffer_size: usize,
    read: R,
    progress: &mut dyn FnMut(u64),
) -> Result<(), ReadError>
where
    R: Fn(&mut [u8], u64) -> io::Result<()> + Send,
{
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
    })
}
