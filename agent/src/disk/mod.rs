//! Block I/O on a whole disk (GPT image file or block device), GPT tables, slot resolution.
//!
//! Every touch of the disk goes through [`BlockDevice`], so tests can put a recording or
//! fault-injecting device in its place.

use std::io;

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
