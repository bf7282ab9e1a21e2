//! Fixed-size buffers aligned for direct I/O (`O_DIRECT` needs them; the disk and the install
//! pipeline share them), in safe Rust: over-allocate by the alignment and
//! use the aligned window inside.

/// Alignment of every I/O buffer: the largest logical block size in use (4Kn disks), which
/// also satisfies 512-byte devices.
pub(crate) const IO_ALIGN: usize = 4096;

/// A heap buffer whose usable window starts at an [`IO_ALIGN`]-aligned address.
#[derive(Debug)]
pub(crate) struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to a multiple of [`IO_ALIGN`]).
    pub(crate) fn new(len: usize) -> Self {
        let len = round_up(len.max(1) as u64, IO_ALIGN as u64) as usize;
        let storage = vec![0u8; len + IO_ALIGN];
        let start = storage.as_ptr().align_offset(IO_ALIGN);
        // align_offset may report "impossible" (usize::MAX) in theory; never for u8 pointers
        // on real targets, but fall back to an unaligned window rather than panic.
        let start = if start > IO_ALIGN { 0 } else { start };
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// A zero-length placeholder that owns no memory.
    pub(crate) fn empty() -> Self {
        AlignedBuf {
            storage: Vec::new(),
            start: 0,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// `v` rounded up to a multiple of `align` (a power of two or any non-zero value).
pub(crate) fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        for len in [1, 4095, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % IO_ALIGN, 0);
            assert!(b.len() >= len && b.len() % IO_ALIGN == 0);
            let last = b.len() - 1;
            b.as_mut_slice()[last] = 7;
        }
    }
}
