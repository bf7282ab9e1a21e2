//! Read a written range back and hash it, bypassing the page cache where the device can.
//!
//! Every read goes through the [`BlockDevice`] the pipeline wrote: `Uncached` through the
//! device's own [`UncachedReader`] (`O_DIRECT` on a [`crate::disk::FileDevice`], or
//! fsync + `posix_fadvise(DONTNEED)` and a normal read where the filesystem refuses
//! `O_DIRECT`; on its own descriptor so it runs beside the writer), `Device` (and `Uncached`
//! on a device without such a reader, i.e. test doubles) through [`BlockDevice::read_at`].
//! The read-back never reopens the disk by path.
//! Reading and hashing overlap: a reader thread fills one buffer while the caller hashes the
//! other.

use super::buf::AlignedBuf;
use crate::disk::{BlockDevice, Bypass, UncachedReader};
use ring::digest;
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::mpsc::sync_channel;
use std::sync::Mutex;
use tracing::debug;

/// How the pipeline verifies what reached the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Readback {
    /// No read-back (the streamed hash is still checked).
    Off,
    /// Read through [`BlockDevice::read_at`]; may be served from the page cache.
    #[default]
    Device,
    /// Read bypassing the page cache through the device's [`UncachedReader`]; a device
    /// without one is read as with `Device` (and the report says `device`).
    Uncached,
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

/// How the verifier reads: both go through the device.
enum How<'a> {
    Device(&'a Mutex<dyn BlockDevice>),
    Reader(UncachedReader),
}

/// Incremental read-back: hashes durable (already flushed) ranges of one image in order, so
/// the read-back of early checkpoints overlaps the download of later ones.
pub(crate) struct Verifier<'a> {
    how: How<'a>,
    ctx: digest::Context,
    buffer_size: usize,
    /// Image bytes hashed so far.
    pub done: u64,
}

impl<'a> Verifier<'a> {
    /// A verifier for `mode` (`Off` reads through the device, for explicit re-checks).
    pub(crate) fn open(
        mode: Readback,
        dev: &'a Mutex<dyn BlockDevice>,
        offset: u64,
        buffer_size: usize,
    ) -> Result<Self, ReadError> {
        let how = match mode {
            Readback::Off | Readback::Device => How::Device(dev),
            Readback::Uncached => {
                let reader = dev
                    .lock()
                    .map_err(|_| ReadError {
                        op: "opening for read-back",
                        offset,
                        source: io::Error::other("block device lock poisoned"),
                    })?
                    .uncached_reader();
                match reader {
                    Some(r) => How::Reader(r.map_err(|source| ReadError {
                        op: "opening for read-back",
                        offset,
                        source,
                    })?),
                    None => {
                        debug!("the device has no uncached reader; reading back through it");
                        How::Device(dev)
                    }
                }
            }
        };
        Ok(Verifier {
            how,
            ctx: digest::Context::new(&digest::SHA256),
            buffer_size,
            done: 0,
        })
    }

    pub(crate) fn method(&self) -> ReadbackMethod {
        match &self.how {
            How::Device(_) => ReadbackMethod::Device,
            How::Reader(r) => match r.bypass() {
                Bypass::Direct => ReadbackMethod::Direct,
                Bypass::DropCache => ReadbackMethod::DropCache,
            },
        }
    }

    /// Forget everything hashed (the source restarted from 0).
    pub(crate) fn reset(&mut self) {
        self.ctx = digest::Context::new(&digest::SHA256);
        self.done = 0;
    }

    /// Hash `len` image bytes at absolute `offset`, which the writer has already flushed.
    pub(crate) fn feed(
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
        match &self.how {
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
                    self.buffer_size,
                    read,
                    &mut prog,
                )
            }
            How::Reader(r) => {
                let read = |buf: &mut [u8], at: u64| r.read_at(buf, at);
                pipelined_hash(
                    &mut self.ctx,
                    offset,
                    len,
                    self.buffer_size,
                    read,
                    &mut prog,
                )
            }
        }?;
        self.done += len;
        Ok(())
    }

    pub(crate) fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.ctx.finish().as_ref());
        out
    }
}

/// Read `len` bytes from `offset` in `buffer_size` pieces on a helper thread, hashing them
/// into `ctx` here. Two buffers: one being read, one being hashed.
fn pipelined_hash<R>(
    ctx: &mut digest::Context,
    offset: u64,
    len: u64,
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
            while pos < len {
                let Ok(mut buf) = empty_rx.recv() else { return };
                let n = (len - pos).min(buf.len() as u64) as usize;
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
        while done < len {
            let Ok(msg) = full_rx.recv() else {
                return Err(ReadError {
                    op: "reading back",
                    offset: offset + done,
                    source: io::Error::other("read-back thread stopped"),
                });
            };
            let (buf, pos, n) = msg?;
            ctx.update(&buf.as_slice()[..n]);
            done = pos + n as u64;
            progress(done);
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })
}
