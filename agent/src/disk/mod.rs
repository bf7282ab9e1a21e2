//! Block I/O on a whole disk (GPT image file or block device), GPT tables, slot resolution.
//!
//! Every touch of the disk goes through [`BlockDevice`], so tests can put a recording or
//! fault-injecting device in its place (`update-agent-sandbox`'s `recording`).

pub mod buf;
pub mod slots;
pub mod table;

use nix::fcntl::{posix_fadvise, OFlag, PosixFadviseAdvice};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub(crate) use buf::AlignedBuf;
pub use slots::{PartSelector, Partition, ResolvedSlots, Slot, SlotError, SlotLayoutConfig};
pub use table::{CopyHealth, Gpt, GptError, GptHealth};

/// The small surface the agent needs from a disk. Offsets are absolute byte offsets.
pub trait BlockDevice: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Logical sector size (512 for image files, as the kernel reports for block devices).
    fn sector_size(&self) -> u64 {
        512
    }
    /// Fill `buf` from `offset`; a short read is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Write `bufs` back to back from `offset`: one request where the device can gather
    /// them (`pwritev`), else one [`BlockDevice::write_at`] each, in order.
    fn write_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for b in bufs {
            self.write_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    /// Make every completed write durable (fsync / BLKFLSBUF-equivalent).
    fn flush(&mut self) -> io::Result<()>;
    /// A reader of the same medium that bypasses the page cache, for the read-back of
    /// flushed ranges; `None` for devices that have no such path (test doubles).
    fn uncached_reader(&self) -> Option<io::Result<UncachedReader>> {
        None
    }
}

/// How a device writes and reads past the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// `O_DIRECT`: the bytes go straight between the buffers and the medium.
    Direct,
    /// `O_DIRECT` is refused here (EINVAL): buffered writes, fsync, then
    /// `POSIX_FADV_DONTNEED` on the written range, and reads after dropping the range.
    DropCache,
}

impl<T: BlockDevice + ?Sized> BlockDevice for &mut T {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn sector_size(&self) -> u64 {
        (**self).sector_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn write_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
    fn uncached_reader(&self) -> Option<io::Result<UncachedReader>> {
        (**self).uncached_reader()
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for Box<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn sector_size(&self) -> u64 {
        (**self).sector_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn write_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
    fn uncached_reader(&self) -> Option<io::Result<UncachedReader>> {
        (**self).uncached_reader()
    }
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot determine the size of disk {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
    #[error("disk {path} is empty or smaller than one sector")]
    TooSmall { path: PathBuf },
}

impl DiskError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            DiskError::Open { .. } => "disk_open",
            DiskError::Size { .. } => "disk_size",
            DiskError::NotADisk { .. } => "disk_not_a_disk",
            DiskError::TooSmall { .. } => "disk_too_small",
        }
    }
}

/// A whole disk backed by a file: a GPT image or a block device node such as `/dev/nvme0n1`.
///
/// Writes bypass the page cache with `O_DIRECT` where the kernel allows it: the sector-aligned
/// middle of each write goes straight from the caller's buffer when that is aligned (through a
/// bounce buffer otherwise); an unaligned head or tail (a partition or image that does not
/// start or end on a sector) is written buffered, exactly those bytes, and its pages are
/// dropped after the next flush. Where `O_DIRECT` is refused (EINVAL on open or on the first
/// direct write), every write is buffered and each flush drops the range it made durable.
/// [`BlockDevice::read_at`] stays buffered (GPT reads); [`BlockDevice::uncached_reader`] reads
/// the medium.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    /// The same file opened with `O_DIRECT`, while the kernel accepts direct I/O on it.
    direct: Option<File>,
    /// No direct write has succeeded yet: EINVAL still means "refused here".
    direct_untested: bool,
    /// Aligned copy buffer for writes whose memory is not sector aligned; made on first use.
    bounce: Option<AlignedBuf>,
    /// Bytes written through the page cache since the last flush, dropped after it.
    cached: Option<(u64, u64)>,
    path: PathBuf,
    size: u64,
    sector_size: u64,
}

/// Size of the bounce buffer for writes from unaligned memory.
const BOUNCE_SIZE: usize = 1 << 20;

impl FileDevice {
    /// Open read-write.
    pub fn open(path: impl AsRef<Path>) -> Result<FileDevice, DiskError> {
        Self::open_with(path.as_ref(), true, true)
    }

    /// Open read-only: writes fail with `PermissionDenied`-like errors from the OS.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<FileDevice, DiskError> {
        Self::open_with(path.as_ref(), false, true)
    }

    /// Open read-write without `O_DIRECT`: every write goes through the page cache and each
    /// flush drops what it made durable (the path taken where the kernel refuses direct I/O).
    pub fn open_buffered(path: impl AsRef<Path>) -> Result<FileDevice, DiskError> {
        Self::open_with(path.as_ref(), true, false)
    }

    fn open_with(path: &Path, write: bool, direct: bool) -> Result<FileDevice, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let ft = meta.file_type();
        let (size, sector_size) = if ft.is_file() {
            (meta.len(), 512)
        } else if ft.is_block_device() {
            // The size ioctl needs unsafe code; seeking to the end gives the same number.
            let size = file
                .seek(SeekFrom::End(0))
                .map_err(|source| DiskError::Size {
                    path: path.to_path_buf(),
                    source,
                })?;
            (size, block_logical_sector_size(meta.rdev()))
        } else {
            return Err(DiskError::NotADisk {
                path: path.to_path_buf(),
            });
        };
        if size < sector_size {
            return Err(DiskError::TooSmall {
                path: path.to_path_buf(),
            });
        }
        let direct = if direct {
            match OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(OFlag::O_DIRECT.bits())
                .open(path)
            {
                Ok(f) => Some(f),
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    tracing::debug!(path = %path.display(), "O_DIRECT refused; writes are buffered");
                    None
                }
                Err(e) => return Err(open_err(e)),
            }
        } else {
            None
        };
        tracing::debug!(path = %path.display(), size, sector_size, direct = direct.is_some(), "opened disk");
        Ok(FileDevice {
            file,
            direct,
            direct_untested: true,
            bounce: None,
            cached: None,
            path: path.to_path_buf(),
            size,
            sector_size,
        })
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How writes reach the medium now: `Direct`, or `DropCache` where `O_DIRECT` was refused.
    pub fn write_bypass(&self) -> Bypass {
        if self.direct.is_some() {
            Bypass::Direct
        } else {
            Bypass::DropCache
        }
    }

    /// Drop the page cache for `len` bytes at `offset` (after a flush), so the next read comes
    /// from the medium: the read-back verification must not be satisfied by cached pages.
    pub fn drop_cache(&self, offset: u64, len: u64) -> io::Result<()> {
        fadvise_dontneed(&self.file, offset, len)
    }

    /// Write through the page cache and remember the range for the next flush to drop.
    fn write_cached(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        self.cached = Some(match self.cached {
            Some((s, e)) => (s.min(offset), e.max(end)),
            None => (offset, end),
        });
        Ok(())
    }

    /// One gathered `O_DIRECT` write of aligned buffers (aligned lengths, aligned offset),
    /// repeated over what a short write left.
    fn pwritev_direct(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let Some(direct) = self.direct.as_ref() else {
            return Err(io::Error::other("no O_DIRECT descriptor"));
        };
        let mut slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        let mut at = offset;
        while !rest.is_empty() {
            let off = i64::try_from(at).map_err(io::Error::other)?;
            let n = match nix::sys::uio::pwritev(direct, rest, off) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            };
            at += n as u64;
            io::IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    /// Write a sector-aligned range with `O_DIRECT`, from `buf` when its memory is aligned,
    /// else through the bounce buffer; the first EINVAL switches the device to buffered writes.
    fn write_direct(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let align = self.sector_size as usize;
        let mut done = 0;
        while done < buf.len() {
            let Some(direct) = self.direct.as_ref() else {
                return self.write_cached(&buf[done..], offset + done as u64);
            };
            let rest = &buf[done..];
            let at = offset + done as u64;
            let (r, n) = if (rest.as_ptr() as usize) % align == 0 {
                (direct.write_all_at(rest, at), rest.len())
            } else {
                let n = rest.len().min(BOUNCE_SIZE);
                let bounce = self
                    .bounce
                    .get_or_insert_with(|| AlignedBuf::new(BOUNCE_SIZE));
                bounce.as_mut_slice()[..n].copy_from_slice(&rest[..n]);
                (direct.write_all_at(&bounce.as_slice()[..n], at), n)
            };
            match r {
                Err(e) if self.direct_untested && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    tracing::debug!(path = %self.path.display(), "O_DIRECT write refused; writes are buffered");
                    self.direct = None;
                    self.bounce = None;
                }
                Err(e) => return Err(e),
                Ok(()) => {
                    self.direct_untested = false;
                    done += n;
                }
            }
        }
        Ok(())
    }
}

/// `POSIX_FADV_DONTNEED` on a byte range, widened to whole pages (the kernel keeps pages the
/// range covers only in part): the kernel drops the clean cached pages.
fn fadvise_dontneed(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const PAGE: u64 = 4096;
    let start = offset / PAGE * PAGE;
    let end = offset
        .saturating_add(len)
        .div_ceil(PAGE)
        .saturating_mul(PAGE);
    let off = i64::try_from(start).map_err(io::Error::other)?;
    let len = i64::try_from(end - start).map_err(io::Error::other)?;
    posix_fadvise(file, off, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED).map_err(io::Error::from)
}

/// The kernel's logical block size for a block device, from sysfs; 512 when unknown.
fn block_logical_sector_size(rdev: u64) -> u64 {
    let major = nix::sys::stat::major(rdev);
    let minor = nix::sys::stat::minor(rdev);
    let p = format!("/sys/dev/block/{major}:{minor}/queue/logical_block_size");
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|n| n.is_power_of_two() && *n >= 512)
        .unwrap_or(512)
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn sector_size(&self) -> u64 {
        self.sector_size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        let Some(end) = end.filter(|e| *e <= self.size) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write of {} bytes at {offset} goes past the end of {} ({} bytes)",
                    buf.len(),
                    self.path.display(),
                    self.size
                ),
            ));
        };
        if self.direct.is_none() {
            return self.write_cached(buf, offset);
        }
        let a = self.sector_size;
        let mid_start = offset.div_ceil(a).saturating_mul(a).min(end);
        let mid_end = (end / a * a).max(mid_start);
        let (h, m) = ((mid_start - offset) as usize, (mid_end - offset) as usize);
        if h > 0 {
            self.write_cached(&buf[..h], offset)?;
        }
        if m > h {
            self.write_direct(&buf[h..m], mid_start)?;
        }
        if buf.len() > m {
            self.write_cached(&buf[m..], mid_end)?;
        }
        Ok(())
    }
    fn write_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let a = self.sector_size;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let gather = self.direct.is_some()
            && bufs.len() > 1
            && offset % a == 0
            && offset.checked_add(total).is_some_and(|e| e <= self.size)
            && bufs
                .iter()
                .all(|b| (b.as_ptr() as usize) % a as usize == 0 && b.len() as u64 % a == 0);
        if !gather {
            let mut at = offset;
            for b in bufs {
                self.write_at(b, at)?;
                at += b.len() as u64;
            }
            return Ok(());
        }
        match self.pwritev_direct(bufs, offset) {
            Err(e) if self.direct_untested && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                tracing::debug!(path = %self.path.display(), "O_DIRECT write refused; writes are buffered");
                self.direct = None;
                self.bounce = None;
                self.write_vectored_at(bufs, offset)
            }
            Err(e) => Err(e),
            Ok(()) => {
                self.direct_untested = false;
                Ok(())
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        // One fsync covers both descriptors (same inode) and flushes the device's write cache.
        self.file.sync_all()?;
        if let Some((s, e)) = self.cached.take() {
            fadvise_dontneed(&self.file, s, e - s)?;
        }
        Ok(())
    }
    fn uncached_reader(&self) -> Option<io::Result<UncachedReader>> {
        let reader = || {
            Ok(UncachedReader {
                plain: self.file.try_clone()?,
                direct: self.direct.as_ref().map(File::try_clone).transpose()?,
                align: self.sector_size,
            })
        };
        Some(reader())
    }
}

/// Reads flushed bytes from the medium past the page cache, on its own descriptors so it can
/// run beside the writer without sharing a lock with it.
#[derive(Debug)]
pub struct UncachedReader {
    plain: File,
    direct: Option<File>,
    align: u64,
}

impl UncachedReader {
    /// `Direct` with `O_DIRECT`, else `DropCache` (drop the range, then read it).
    pub fn bypass(&self) -> Bypass {
        if self.direct.is_some() {
            Bypass::Direct
        } else {
            Bypass::DropCache
        }
    }

    /// Fill `buf` from `offset` (already flushed) from the medium; a short read is an error.
    /// Sector-aligned offsets into aligned memory are read in place; anything else is read
    /// as the enclosing sectors into an aligned buffer and copied out.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(direct) = &self.direct else {
            return self.read_dropped(buf, offset);
        };
        match direct_read(direct, buf, offset, self.align) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => self.read_dropped(buf, offset),
            r => r,
        }
    }

    fn read_dropped(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        fadvise_dontneed(&self.plain, offset, buf.len() as u64)?;
        self.plain.read_exact_at(buf, offset)
    }
}

/// `O_DIRECT` read of any range: aligned in place, the rest through aligned bounce buffers.
fn direct_read(file: &File, buf: &mut [u8], offset: u64, align: u64) -> io::Result<()> {
    let a = align as usize;
    let mut done = 0usize;
    if offset % align == 0 && (buf.as_ptr() as usize) % a == 0 {
        let n = buf.len() / a * a;
        file.read_exact_at(&mut buf[..n], offset)?;
        done = n;
    }
    let mut bounce: Option<AlignedBuf> = None;
    while done < buf.len() {
        let at = offset + done as u64;
        let start = at / align * align;
        let skip = (at - start) as usize;
        let want = (buf.len() - done).min(BOUNCE_SIZE - a);
        let span = (skip + want).div_ceil(a) * a;
        let b = bounce.get_or_insert_with(|| AlignedBuf::new(span.min(BOUNCE_SIZE)));
        if b.len() < span {
            *b = AlignedBuf::new(span);
        }
        // The enclosing sectors may run past the end of an image file: a short read is fine
        // as long as it covers the bytes asked for.
        let mut got = 0usize;
        while got < skip + want {
            let n = file.read_at(&mut b.as_mut_slice()[got..span], start + got as u64)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("read-back at {at} ends at {}", start + got as u64),
                ));
            }
            got += n;
        }
        buf[done..done + want].copy_from_slice(&b.as_slice()[skip..skip + want]);
        done += want;
    }
    Ok(())
}
