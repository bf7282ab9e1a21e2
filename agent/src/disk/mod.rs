//! Block I/O on a whole disk (GPT image file or block device), GPT tables, slot resolution.
//!
//! Every touch of the disk goes through [`BlockDevice`], so tests can put a recording or
//! fault-injecting device in its place.

pub mod recording;
pub mod slots;
pub mod table;
pub mod testimg;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

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
    /// Make every completed write durable (fsync / BLKFLSBUF-equivalent).
    fn flush(&mut self) -> io::Result<()>;
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
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
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
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
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
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    sector_size: u64,
}

impl FileDevice {
    /// Open read-write.
    pub fn open(path: impl AsRef<Path>) -> Result<FileDevice, DiskError> {
        Self::open_with(path.as_ref(), true)
    }

    /// Open read-only: writes fail with `PermissionDenied`-like errors from the OS.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<FileDevice, DiskError> {
        Self::open_with(path.as_ref(), false)
    }

    fn open_with(path: &Path, write: bool) -> Result<FileDevice, DiskError> {
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
        tracing::debug!(path = %path.display(), size, sector_size, "opened disk");
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            size,
            sector_size,
        })
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drop the page cache for `len` bytes at `offset` (after a flush), so the next read comes
    /// from the medium: the read-back verification must not be satisfied by cached pages.
    pub fn drop_cache(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
        let off = i64::try_from(offset).map_err(io::Error::other)?;
        let len = i64::try_from(len).map_err(io::Error::other)?;
        posix_fadvise(
            &self.file,
            off,
            len,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .map_err(io::Error::from)
    }
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
        if end.is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write of {} bytes at {offset} goes past the end of {} ({} bytes)",
                    buf.len(),
                    self.path.display(),
                    self.size
                ),
            ));
        }
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }
}
