//! The chunk index of a chunked image (manifest schema version 2): where each
//! content-defined chunk of the image lies in the image and in the published file, and its
//! SHA-256. The published file is the chunks' zstd frames back to back, so it is also a
//! plain zstd stream of the whole image; the index lets an agent fetch single frames with
//! `Range` requests and copy the chunks it already has. Format: `docs/delta.md`.
//!
//! Binary, little-endian, fixed-size records, so the parser can bound everything before it
//! allocates:
//!
//! ```text
//! header (48 bytes): magic "UACHIDX1" | image_size u64 | file_size u64
//!                    | min u32 | avg u32 | max u32 | count u32 | reserved u64 (0)
//! record (56 bytes): image_offset u64 | image_len u32 | file_offset u64 | file_len u32
//!                    | sha256 [32]
//! ```
//!
//! The compact form (magic "UACHIDX2", what the publisher writes) has the same header and
//! 40-byte records `image_len u32 | file_len u32 | sha256 [32]`: each chunk starts where the
//! previous one ended, so the offsets are implied (a third smaller: at 16 KiB chunks the
//! index of a 512 MiB image is 1.3 MB instead of 1.8 MB, bytes every delta install fetches).
//!
//! A valid index tiles both the image and the file exactly: chunk `i` starts where chunk
//! `i-1` ended, in the image and in the file; the first starts at 0 and the last ends at the
//! declared sizes. Every chunk but the last is at least `min` bytes, none more than `max`, so
//! the chunk count is at most `ceil(image_size / min)`: the parser checks the count against
//! that bound (and the input length) before allocating anything.

/// First 8 bytes of a chunk index with explicit offsets.
pub const MAGIC: &[u8; 8] = b"UACHIDX1";
/// First 8 bytes of a compact chunk index (offsets implied).
pub const MAGIC_COMPACT: &[u8; 8] = b"UACHIDX2";
/// Record length of the compact form.
pub const COMPACT_RECORD_LEN: usize = 40;
/// Header length in bytes.
pub const HEADER_LEN: usize = 48;
/// Record length in bytes.
pub const RECORD_LEN: usize = 56;
/// Smallest `min` chunk size accepted: bounds the chunk count of an image (and so the
/// memory an index takes) at `image_size / 1024` records.
pub const MIN_CHUNK_FLOOR: u32 = 1024;
/// Largest `max` chunk size accepted (fastcdc's own ceiling): bounds one chunk's buffers.
pub const MAX_CHUNK_CEIL: u32 = 16 << 20;

/// Chunker parameters (FastCDC 2020, normalisation level 1, seed 0), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkParams {
    /// The default sizes: 4/16/64 KiB. A starting point; `docs/delta.md` says how to
    /// choose them by measurement.
    pub const DEFAULT: ChunkParams = ChunkParams {
        min: 4 << 10,
        avg: 16 << 10,
        max: 64 << 10,
    };

    /// Check the sizes are usable: `FLOOR <= min <= avg <= max <= CEIL`, `avg >= 256`.
    pub fn validate(&self) -> Result<(), ChunkIndexError> {
        let ok = self.min >= MIN_CHUNK_FLOOR
            && self.min <= self.avg
            && self.avg <= self.max
            && self.max <= MAX_CHUNK_CEIL
            && self.avg >= 256
            && self.min <= 1 << 20
            && self.avg <= 4 << 20;
        if ok {
            Ok(())
        } else {
            Err(ChunkIndexError::BadParams {
                min: self.min,
                avg: self.avg,
                max: self.max,
            })
        }
    }

    /// Largest frame a chunk of `max` bytes may compress to (zstd's compress bound plus
    /// frame header and checksum, rounded up generously).
    pub fn max_frame_len(&self) -> u64 {
        let m = u64::from(self.max);
        m + m / 128 + 1024
    }
}

/// One chunk: its place in the image and in the published file, and its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    pub image_offset: u64,
    pub image_len: u32,
    pub file_offset: u64,
    pub file_len: u32,
    pub sha256: [u8; 32],
}

impl ChunkEntry {
    /// End offset in the image.
    pub fn image_end(&self) -> u64 {
        self.image_offset + u64::from(self.image_len)
    }
    /// End offset in the file.
    pub fn file_end(&self) -> u64 {
        self.file_offset + u64::from(self.file_len)
    }
}

/// A parsed, validated chunk index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIndex {
    pub image_size: u64,
    pub file_size: u64,
    pub params: ChunkParams,
    pub chunks: Vec<ChunkEntry>,
}

/// Why an index was refused; [`ChunkIndexError::kind`] is stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkIndexError {
    #[error("chunk index is {len} bytes: too short for its header or records")]
    Truncated { len: usize },
    #[error("chunk index does not start with the magic {MAGIC:?}")]
    BadMagic,
    #[error("chunk index header: reserved field is not 0")]
    Reserved,
    #[error(
        "chunk index sizes min {min} / avg {avg} / max {max} are unusable (need \
         {MIN_CHUNK_FLOOR} <= min <= avg <= max <= {MAX_CHUNK_CEIL})"
    )]
    BadParams { min: u32, avg: u32, max: u32 },
    #[error("chunk index is for a {what} of {found} bytes, the manifest says {expected}")]
    SizeMismatch {
        what: &'static str,
        expected: u64,
        found: u64,
    },
    #[error(
        "chunk index declares {count} chunks; an image of {image_size} bytes with chunks of \
         at least {min} bytes has at most {bound}"
    )]
    TooManyChunks {
        count: u64,
        bound: u64,
        image_size: u64,
        min: u32,
    },
    #[error("chunk index is {len} bytes, {count} records need exactly {needed}")]
    LengthMismatch { len: usize, count: u64, needed: u64 },
    #[error("chunk {index}: starts at {what} offset {offset}, before chunk {}'s start {prev_start} (out of order)", index - 1)]
    OutOfOrder {
        index: usize,
        what: &'static str,
        offset: u64,
        prev_start: u64,
    },
    #[error("chunk {index}: starts at {what} offset {offset}, inside the previous chunk (which ends at {prev_end})")]
    Overlapping {
        index: usize,
        what: &'static str,
        offset: u64,
        prev_end: u64,
    },
    #[error("chunk {index}: starts at {what} offset {offset}, leaving a gap after {prev_end}")]
    Gap {
        index: usize,
        what: &'static str,
        offset: u64,
        prev_end: u64,
    },
    #[error("chunk {index}: {what} range ends at {end}, past the {what} size {size}")]
    OutOfRange {
        index: usize,
        what: &'static str,
        end: u64,
        size: u64,
    },
    #[error("chunk {index}: {what} length {len} is outside {low}..={high}")]
    BadLength {
        index: usize,
        what: &'static str,
        len: u64,
        low: u64,
        high: u64,
    },
    #[error("chunk index covers {what} bytes 0..{covered}, the {what} is {size} bytes")]
    Incomplete {
        what: &'static str,
        covered: u64,
        size: u64,
    },
}

impl ChunkIndexError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ChunkIndexError::Truncated { .. } => "chunk_index_truncated",
            ChunkIndexError::BadMagic => "chunk_index_bad_magic",
            ChunkIndexError::Reserved => "chunk_index_reserved",
            ChunkIndexError::BadParams { .. } => "chunk_index_bad_params",
            ChunkIndexError::SizeMismatch { .. } => "chunk_index_size_mismatch",
            ChunkIndexError::TooManyChunks { .. } => "chunk_index_too_many_chunks",
            ChunkIndexError::LengthMismatch { .. } => "chunk_index_length_mismatch",
            ChunkIndexError::OutOfOrder { .. } => "chunk_index_out_of_order",
            ChunkIndexError::Overlapping { .. } => "chunk_index_overlapping",
            ChunkIndexError::Gap { .. } => "chunk_index_gap",
            ChunkIndexError::OutOfRange { .. } => "chunk_index_out_of_range",
            ChunkIndexError::BadLength { .. } => "chunk_index_bad_length",
            ChunkIndexError::Incomplete { .. } => "chunk_index_incomplete",
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Most chunks an image of `image_size` bytes can have with chunks of at least `min` bytes.
pub fn max_chunks(image_size: u64, min: u32) -> u64 {
    image_size.div_ceil(u64::from(min.max(1)))
}

/// Largest index an image of `image_size` bytes can need with [`MIN_CHUNK_FLOOR`]: the
/// manifest's declared index size must not exceed it.
pub fn max_index_len(image_size: u64) -> u64 {
    HEADER_LEN as u64 + max_chunks(image_size, MIN_CHUNK_FLOOR) * RECORD_LEN as u64
}

/// Check one chunk's start against where the previous one ended.
fn check_start(
    index: usize,
    what: &'static str,
    offset: u64,
    prev_start: u64,
    prev_end: u64,
) -> Result<(), ChunkIndexError> {
    if offset == prev_end {
        Ok(())
    } else if index > 0 && offset < prev_start {
        Err(ChunkIndexError::OutOfOrder {
            index,
            what,
            offset,
            prev_start,
        })
    } else if offset < prev_end {
        Err(ChunkIndexError::Overlapping {
            index,
            what,
            offset,
            prev_end,
        })
    } else {
        Err(ChunkIndexError::Gap {
            index,
            what,
            offset,
            prev_end,
        })
    }
}

impl ChunkIndex {
    /// Parse and validate `bytes` as the index of an image of `image_size` bytes published
    /// as a file of `file_size` bytes (both from the signed manifest). Allocates only after
    /// the chunk count is known to be within `ceil(image_size / min)` and to match the input.
    pub fn parse(
        bytes: &[u8],
        image_size: u64,
        file_size: u64,
    ) -> Result<ChunkIndex, ChunkIndexError> {
        if bytes.len() < HEADER_LEN {
            return Err(ChunkIndexError::Truncated { len: bytes.len() });
        }
        let compact = match &bytes[..8] {
            m if m == MAGIC => false,
            m if m == MAGIC_COMPACT => true,
            _ => return Err(ChunkIndexError::BadMagic),
        };
        let record_len = if compact {
            COMPACT_RECORD_LEN
        } else {
            RECORD_LEN
        };
        let declared_image = u64_at(bytes, 8);
        let declared_file = u64_at(bytes, 16);
        let params = ChunkParams {
            min: u32_at(bytes, 24),
            avg: u32_at(bytes, 28),
            max: u32_at(bytes, 32),
        };
        let count = u64::from(u32_at(bytes, 36));
        if u64_at(bytes, 40) != 0 {
            return Err(ChunkIndexError::Reserved);
        }
        params.validate()?;
        if declared_image != image_size {
            return Err(ChunkIndexError::SizeMismatch {
                what: "image",
                expected: image_size,
                found: declared_image,
            });
        }
        if declared_file != file_size {
            return Err(ChunkIndexError::SizeMismatch {
                what: "file",
                expected: file_size,
                found: declared_file,
            });
        }
        let bound = max_chunks(image_size, params.min);
        if count > bound || (count == 0 && image_size > 0) {
            return Err(ChunkIndexError::TooManyChunks {
                count,
                bound,
                image_size,
                min: params.min,
            });
        }
        let needed = HEADER_LEN as u64 + count * record_len as u64;
        if bytes.len() as u64 != needed {
            return Err(ChunkIndexError::LengthMismatch {
                len: bytes.len(),
                count,
                needed,
            });
        }
        // count <= bytes.len() / record_len here, so this allocation is bounded by the input.
        let count = count as usize;
        let mut chunks = Vec::with_capacity(count);
        let (mut img_start, mut img_end, mut file_start, mut file_end) = (0u64, 0u64, 0u64, 0u64);
        let max_frame = params.max_frame_len();
        for i in 0..count {
            let r = &bytes[HEADER_LEN + i * record_len..HEADER_LEN + (i + 1) * record_len];
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(&r[record_len - 32..]);
            let c = if compact {
                ChunkEntry {
                    image_offset: img_end,
                    image_len: u32_at(r, 0),
                    file_offset: file_end,
                    file_len: u32_at(r, 4),
                    sha256,
                }
            } else {
                ChunkEntry {
                    image_offset: u64_at(r, 0),
                    image_len: u32_at(r, 8),
                    file_offset: u64_at(r, 12),
                    file_len: u32_at(r, 20),
                    sha256,
                }
            };
            check_start(i, "image", c.image_offset, img_start, img_end)?;
            check_start(i, "file", c.file_offset, file_start, file_end)?;
            let last = i + 1 == count;
            let low = if last { 1 } else { u64::from(params.min) };
            let len = u64::from(c.image_len);
            if len < low || len > u64::from(params.max) {
                return Err(ChunkIndexError::BadLength {
                    index: i,
                    what: "image",
                    len,
                    low,
                    high: u64::from(params.max),
                });
            }
            let flen = u64::from(c.file_len);
            if flen == 0 || flen > max_frame {
                return Err(ChunkIndexError::BadLength {
                    index: i,
                    what: "file",
                    len: flen,
                    low: 1,
                    high: max_frame,
                });
            }
            if c.image_end() > image_size {
                return Err(ChunkIndexError::OutOfRange {
                    index: i,
                    what: "image",
                    end: c.image_end(),
                    size: image_size,
                });
            }
            if c.file_end() > file_size {
                return Err(ChunkIndexError::OutOfRange {
                    index: i,
                    what: "file",
                    end: c.file_end(),
                    size: file_size,
                });
            }
            (img_start, img_end) = (c.image_offset, c.image_end());
            (file_start, file_end) = (c.file_offset, c.file_end());
            chunks.push(c);
        }
        if img_end != image_size {
            return Err(ChunkIndexError::Incomplete {
                what: "image",
                covered: img_end,
                size: image_size,
            });
        }
        if file_end != file_size {
            return Err(ChunkIndexError::Incomplete {
                what: "file",
                covered: file_end,
                size: file_size,
            });
        }
        Ok(ChunkIndex {
            image_size,
            file_size,
            params,
            chunks,
        })
    }

    /// The compact encoding (offsets implied), which the publisher writes. Only an index
    /// that tiles the image and the file (what `parse` accepts) round-trips through it.
    pub fn encode_compact(&self) -> Vec<u8> {
        let mut out = self.header(MAGIC_COMPACT, COMPACT_RECORD_LEN);
        for c in &self.chunks {
            out.extend_from_slice(&c.image_len.to_le_bytes());
            out.extend_from_slice(&c.file_len.to_le_bytes());
            out.extend_from_slice(&c.sha256);
        }
        out
    }

    fn header(&self, magic: &[u8; 8], record_len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.chunks.len() * record_len);
        out.extend_from_slice(magic);
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.file_size.to_le_bytes());
        out.extend_from_slice(&self.params.min.to_le_bytes());
        out.extend_from_slice(&self.params.avg.to_le_bytes());
        out.extend_from_slice(&self.params.max.to_le_bytes());
        out.extend_from_slice(
            &u32::try_from(self.chunks.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        out.extend_from_slice(&0u64.to_le_bytes());
        out
    }

    /// The encoding with explicit offsets ([`MAGIC`]), which [`ChunkIndex::parse`] also
    /// reads (and can then refuse overlapping or out-of-order chunks).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.header(MAGIC, RECORD_LEN);
        for c in &self.chunks {
            out.extend_from_slice(&c.image_offset.to_le_bytes());
            out.extend_from_slice(&c.image_len.to_le_bytes());
            out.extend_from_slice(&c.file_offset.to_le_bytes());
            out.extend_from_slice(&c.file_len.to_le_bytes());
            out.extend_from_slice(&c.sha256);
        }
        out
    }

    /// The index of the chunk holding image byte `offset` (binary search; `None` past the end).
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.image_size {
            return None;
        }
        let i = self.chunks.partition_point(|c| c.image_end() <= offset);
        (i < self.chunks.len()).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    /// An index of chunks with the given image lengths; frames are half as long (+1).
    fn index_of(lens: &[u32]) -> ChunkIndex {
        let (mut io, mut fo) = (0u64, 0u64);
        let mut chunks = Vec::new();
        for (i, &l) in lens.iter().enumerate() {
            let fl = l / 2 + 1;
            chunks.push(ChunkEntry {
                image_offset: io,
                image_len: l,
                file_offset: fo,
                file_len: fl,
                sha256: [i as u8; 32],
            });
            io += u64::from(l);
            fo += u64::from(fl);
        }
        ChunkIndex {
            image_size: io,
            file_size: fo,
            params: ChunkParams::DEFAULT,
            chunks,
        }
    }

    fn parse(ix: &ChunkIndex) -> Result<ChunkIndex, ChunkIndexError> {
        ChunkIndex::parse(&ix.encode(), ix.image_size, ix.file_size)
    }

    fn kind_of(ix: &ChunkIndex) -> &'static str {
        parse(ix).unwrap_err().kind()
    }

    #[test]
    fn round_trips_and_finds_chunks() {
        let ix = index_of(&[5000, 20000, 65536, 100]);
        assert_eq!(parse(&ix).unwrap(), ix);
        assert_eq!(ix.chunk_at(0), Some(0));
        assert_eq!(ix.chunk_at(4999), Some(0));
        assert_eq!(ix.chunk_at(5000), Some(1));
        assert_eq!(ix.chunk_at(ix.image_size - 1), Some(3));
        assert_eq!(ix.chunk_at(ix.image_size), None);
    }

    #[test]
    fn overlapping_out_of_order_gaps_and_ranges_are_refused() {
        let base = index_of(&[5000, 6000, 7000]);

        let mut ix = base.clone();
        ix.chunks[1].image_offset -= 1;
        assert_eq!(kind_of(&ix), "chunk_index_overlapping");

        let mut ix = base.clone();
        ix.chunks.swap(1, 2);
        assert_eq!(kind_of(&ix), "chunk_index_gap");

        let mut ix = base.clone();
        ix.chunks[2].image_offset = 0;
        assert_eq!(kind_of(&ix), "chunk_index_out_of_order");

        let mut ix = base.clone();
        ix.chunks[2].file_offset = 1;
        assert_eq!(kind_of(&ix), "chunk_index_out_of_order");

        let mut ix = base.clone();
        ix.chunks[1].image_offset += 1;
        assert_eq!(kind_of(&ix), "chunk_index_gap");

        let mut ix = base.clone();
        ix.chunks[2].image_len += 1;
        assert_eq!(kind_of(&ix), "chunk_index_out_of_range");

        let mut ix = base.clone();
        ix.chunks[2].file_len += 1;
        assert_eq!(kind_of(&ix), "chunk_index_out_of_range");

        let mut ix = base.clone();
        ix.chunks.pop();
        assert_eq!(kind_of(&ix), "chunk_index_incomplete");
        ix.image_size = ix.chunks[1].image_end();
        assert_eq!(
            ChunkIndex::parse(&ix.encode(), base.image_size, ix.file_size)
                .unwrap_err()
                .kind(),
            "chunk_index_size_mismatch"
        );

        let mut ix = base.clone();
        ix.chunks[0].image_len = 100;
        ix.chunks[1].image_offset = 100;
        ix.chunks[2].image_offset = 6100;
        ix.image_size = 13100;
        assert_eq!(kind_of(&ix), "chunk_index_bad_length");
    }

    #[test]
    fn header_problems_have_their_own_kinds() {
        let ix = index_of(&[5000, 6000]);
        let b = ix.encode();
        assert_eq!(
            ChunkIndex::parse(&b[..10], 1, 1).unwrap_err().kind(),
            "chunk_index_truncated"
        );
        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(
            ChunkIndex::parse(&bad, ix.image_size, ix.file_size)
                .unwrap_err()
                .kind(),
            "chunk_index_bad_magic"
        );
        let mut bad = b.clone();
        bad[40] = 1;
        assert_eq!(
            ChunkIndex::parse(&bad, ix.image_size, ix.file_size)
                .unwrap_err()
                .kind(),
            "chunk_index_reserved"
        );
        let mut p = ix.clone();
        p.params.min = 16;
        assert_eq!(kind_of(&p), "chunk_index_bad_params");
        assert_eq!(
            ChunkIndex::parse(&b[..b.len() - 1], ix.image_size, ix.file_size)
                .unwrap_err()
                .kind(),
            "chunk_index_length_mismatch"
        );
    }

    #[test]
    fn a_count_that_would_exhaust_memory_is_refused_before_allocating() {
        // A 48-byte header claiming u32::MAX chunks for a 1 MiB image.
        let mut b = index_of(&[5000]).encode();
        b.truncate(HEADER_LEN);
        b[8..16].copy_from_slice(&(1u64 << 20).to_le_bytes());
        b[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = ChunkIndex::parse(&b, 1 << 20, 2501).unwrap_err();
        assert_eq!(e.kind(), "chunk_index_too_many_chunks");
        // Within the count bound but not backed by input bytes: refused on length.
        b[36..40].copy_from_slice(&200u32.to_le_bytes());
        let e = ChunkIndex::parse(&b, 1 << 20, 2501).unwrap_err();
        assert_eq!(e.kind(), "chunk_index_length_mismatch");
    }

    proptest! {
        #[test]
        fn valid_indexes_round_trip(lens in proptest::collection::vec(4096u32..=65536, 1..40), last in 1u32..=65536) {
            let mut lens = lens;
            lens.push(last);
            let ix = index_of(&lens);
            prop_assert_eq!(parse(&ix).unwrap(), ix.clone());
            let compact = ix.encode_compact();
            prop_assert_eq!(compact.len(), HEADER_LEN + ix.chunks.len() * COMPACT_RECORD_LEN);
            prop_assert_eq!(ChunkIndex::parse(&compact, ix.image_size, ix.file_size).unwrap(), ix);
        }

        #[test]
        fn compact_indexes_with_wrong_lengths_are_refused(lens in proptest::collection::vec(4096u32..=65536, 2..20), pos in any::<usize>(), delta in 1u32..4096) {
            // A compact record's length changed: the sizes no longer add up (or a chunk
            // leaves its bounds), never an index that misplaces a chunk.
            let ix = index_of(&lens);
            let mut b = ix.encode_compact();
            let at = HEADER_LEN + (pos % ix.chunks.len()) * COMPACT_RECORD_LEN + 4 * (pos % 2);
            let v = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()).wrapping_add(delta);
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            let e = ChunkIndex::parse(&b, ix.image_size, ix.file_size).unwrap_err();
            prop_assert!(matches!(e.kind(), "chunk_index_incomplete" | "chunk_index_out_of_range" | "chunk_index_bad_length"), "{}", e);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), size in 0u64..1_000_000, fsize in 0u64..1_000_000) {
            let _ = ChunkIndex::parse(&bytes, size, fsize);
        }

        #[test]
        fn any_mutated_record_is_refused_or_still_tiles(lens in proptest::collection::vec(4096u32..=65536, 2..20), pos in any::<usize>(), val in any::<u8>()) {
            let ix = index_of(&lens);
            let mut b = ix.encode();
            let at = HEADER_LEN + pos % (b.len() - HEADER_LEN);
            b[at] = val;
            if let Ok(p) = ChunkIndex::parse(&b, ix.image_size, ix.file_size) {
                // Whatever is accepted tiles the image and file exactly.
                let mut end = 0;
                let mut fend = 0;
                for c in &p.chunks {
                    prop_assert_eq!(c.image_offset, end);
                    prop_assert_eq!(c.file_offset, fend);
                    end = c.image_end();
                    fend = c.file_end();
                }
                prop_assert_eq!(end, ix.image_size);
                prop_assert_eq!(fend, ix.file_size);
            }
        }
    }
}
