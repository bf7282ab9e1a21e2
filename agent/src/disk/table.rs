//! GUID partition tables: our own reader and crash-safe writer.
//!
//! We do not write through the `gpt` crate: its writer re-packs used entries to the front of
//! the array (renumbering partitions) and interleaves primary and backup writes. Here the entry
//! array is kept as raw bytes, so every byte we do not mean to change (other entries, other
//! attribute bits, names, header fields) survives exactly, and the two copies are written one
//! after the other with a flush in between: backup first (as GRUB does), then primary.

use super::BlockDevice;
use std::fmt;
use uuid::Uuid;

const SIGNATURE: &[u8; 8] = b"EFI PART";
const MIN_HEADER_SIZE: u32 = 92;
/// Upper bound on the entry array we accept (the usual one is 16 KiB).
const MAX_ARRAY_BYTES: u64 = 4 << 20;

/// One used entry of the partition array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based index in the entry array: the partition number the kernel uses.
    pub number: u32,
    pub type_guid: Uuid,
    pub unique_guid: Uuid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

/// State of one of the two table copies as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyHealth {
    Valid,
    /// No "EFI PART" signature where the header should be.
    Missing,
    /// A header was there but something about it or its entry array is wrong.
    Corrupt(String),
}

impl CopyHealth {
    pub(crate) fn is_valid(&self) -> bool {
        matches!(self, CopyHealth::Valid)
    }
}

impl fmt::Display for CopyHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyHealth::Valid => f.write_str("valid"),
            CopyHealth::Missing => f.write_str("missing"),
            CopyHealth::Corrupt(why) => write!(f, "corrupt ({why})"),
        }
    }
}

/// Both copies as found by [`Gpt::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptHealth {
    pub primary: CopyHealth,
    pub backup: CopyHealth,
    /// Both copies valid and describing the same table.
    pub in_sync: bool,
}

impl GptHealth {
    /// Whether [`Gpt::repair`] would write anything.
    pub fn needs_repair(&self) -> bool {
        !(self.primary.is_valid() && self.backup.is_valid() && self.in_sync)
    }
}

/// Errors reading or writing a GPT.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("I/O error {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no GPT on this disk: neither LBA 1 nor the last LBA ({last_lba}) holds an \"EFI PART\" header")]
    NoGpt { last_lba: u64 },
    #[error("both GPT copies are unusable, refusing to touch the disk: primary {primary}; backup {backup}")]
    BothCorrupt { primary: String, backup: String },
    #[error("partition {number} is not a used entry of the GPT")]
    NoSuchPartition { number: u32 },
    #[error("cannot write the GPT: {0}")]
    Layout(String),
}

impl GptError {
    /// A stable machine-readable kind.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            GptError::Io { .. } => "gpt_io",
            GptError::NoGpt { .. } => "gpt_missing",
            GptError::BothCorrupt { .. } => "gpt_corrupt",
            GptError::NoSuchPartition { .. } => "gpt_no_such_partition",
            GptError::Layout(_) => "gpt_layout",
        }
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn guid_at(b: &[u8], at: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Uuid::from_bytes_le(a)
}

/// The fields of a header we use; `raw` keeps all `header_size` bytes for rewriting.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    raw: Vec<u8>,
    my_lba: u64,
    alt_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Uuid,
    entries_lba: u64,
    num_entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

impl Header {
    fn array_bytes(&self) -> u64 {
        u64::from(self.num_entries) * u64::from(self.entry_size)
    }
}

/// Header crc over `raw` with the crc field zeroed.
fn header_crc(raw: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&raw[..16]);
    h.update(&[0u8; 4]);
    h.update(&raw[20..]);
    h.finalize()
}

/// Which of the two copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableCopy {
    Primary,
    Backup,
}

impl fmt::Display for TableCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableCopy::Primary => "primary",
            TableCopy::Backup => "backup",
        })
    }
}

/// Read and fully validate the copy whose header sits at `lba`.
fn read_copy(
    dev: &dyn BlockDevice,
    lba: u64,
    which: TableCopy,
    disk_sectors: u64,
) -> Result<Result<(Header, Vec<u8>), CopyHealth>, GptError> {
    let ss = dev.sector_size();
    let mut sector = vec![0u8; ss as usize];
    dev.read_at(&mut sector, lba * ss)
        .map_err(|source| GptError::Io {
            what: format!("reading the {which} GPT header at LBA {lba}"),
            source,
        })?;
    if &sector[..8] != SIGNATURE {
        return Ok(Err(CopyHealth::Missing));
    }
    let bad = |why: String| Ok(Err(CopyHealth::Corrupt(why)));
    let header_size = le_u32(&sector, 12);
    if header_size < MIN_HEADER_SIZE || u64::from(header_size) > ss {
        return bad(format!("header size {header_size} out of range"));
    }
    let raw = sector[..header_size as usize].to_vec();
    let stored_crc = le_u32(&raw, 16);
    if header_crc(&raw) != stored_crc {
        return bad("header CRC mismatch".into());
    }
    let h = Header {
        my_lba: le_u64(&raw, 24),
        alt_lba: le_u64(&raw, 32),
        first_usable: le_u64(&raw, 40),
        last_usable: le_u64(&raw, 48),
        disk_guid: guid_at(&raw, 56),
        entries_lba: le_u64(&raw, 72),
        num_entries: le_u32(&raw, 80),
        entry_size: le_u32(&raw, 84),
        entries_crc: le_u32(&raw, 88),
        raw,
    };
    if h.my_lba != lba {
        return bad(format!(
            "header says it is at LBA {} but sits at {lba}",
            h.my_lba
        ));
    }
    if h.alt_lba >= disk_sectors || h.last_usable >= disk_sectors {
        return bad("header points past the end of the disk".into());
    }
    if h.first_usable > h.last_usable.saturating_add(1) {
        return bad("first usable LBA after last usable LBA".into());
    }
    if h.entry_size < 128 || h.entry_size % 8 != 0 || h.num_entries == 0 {
        return bad(format!(
            "entry array shape {} x {} bytes unsupported",
            h.num_entries, h.entry_size
        ));
    }
    let array = h.array_bytes();
    if array > MAX_ARRAY_BYTES {
        return bad(format!("entry array of {array} bytes is too large"));
    }
    let array_sectors = array.div_ceil(ss);
    let array_end = h.entries_lba + array_sectors; // exclusive
    let placed_ok = match which {
        TableCopy::Primary => h.entries_lba > lba && array_end <= h.first_usable,
        TableCopy::Backup => h.entries_lba > h.last_usable && array_end <= lba,
    };
    if !placed_ok {
        return bad(format!(
            "entry array at LBA {} overlaps the header or usable space",
            h.entries_lba
        ));
    }
    let mut entries = vec![0u8; array as usize];
    dev.read_at(&mut entries, h.entries_lba * ss)
        .map_err(|source| GptError::Io {
            what: format!(
                "reading the {which} GPT entry array at LBA {}",
                h.entries_lba
            ),
            source,
        })?;
    if crc32fast::hash(&entries) != h.entries_crc {
        return bad("entry array CRC mismatch".into());
    }
    for e in parse_entries(&entries, h.entry_size) {
        if e.first_lba > e.last_lba || e.first_lba < h.first_usable || e.last_lba > h.last_usable {
            return bad(format!(
                "partition {} spans LBA {}..={} outside the usable {}..={}",
                e.number, e.first_lba, e.last_lba, h.first_usable, h.last_usable
            ));
        }
    }
    Ok(Ok((h, entries)))
}

fn parse_entries(array: &[u8], entry_size: u32) -> Vec<Entry> {
    array
        .chunks_exact(entry_size as usize)
        .enumerate()
        .filter_map(|(i, e)| {
            let type_guid = guid_at(e, 0);
            if type_guid.is_nil() {
                return None;
            }
            let units: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            Some(Entry {
                number: u32::try_from(i + 1).unwrap_or(u32::MAX),
                type_guid,
                unique_guid: guid_at(e, 16),
                first_lba: le_u64(e, 32),
                last_lba: le_u64(e, 40),
                attributes: le_u64(e, 48),
                name: String::from_utf16_lossy(&units),
            })
        })
        .collect()
}

/// A GPT as read from a disk: the authoritative copy (primary when valid, as every loader
/// does), the health of both copies, and an in-memory entry array that may be changed and then
/// written with [`Gpt::write`].
#[derive(Debug, Clone)]
pub struct Gpt {
    sector_size: u64,
    /// Header of the authoritative copy (template for both rewritten headers).
    template: Header,
    source: TableCopy,
    primary_lba: u64,
    backup_lba: u64,
    primary_entries_lba: u64,
    backup_entries_lba: u64,
    /// The entry array as the authoritative copy holds it on disk.
    on_disk: Vec<u8>,
    /// The entry array to be written.
    entries: Vec<u8>,
    health: GptHealth,
}

impl Gpt {
    /// Read both copies and pick the authoritative one. Writes nothing.
    pub fn read(dev: &dyn BlockDevice) -> Result<Gpt, GptError> {
        let ss = dev.sector_size();
        let disk_sectors = dev.size() / ss;
        if disk_sectors < 4 {
            return Err(GptError::NoGpt {
                last_lba: disk_sectors.saturating_sub(1),
            });
        }
        let last_lba = disk_sectors - 1;
        let primary = read_copy(dev, 1, TableCopy::Primary, disk_sectors)?;
        let backup_lba = match &primary {
            Ok((h, _)) => h.alt_lba,
            Err(_) => last_lba,
        };
        let backup = if backup_lba > 1 {
            read_copy(dev, backup_lba, TableCopy::Backup, disk_sectors)?
        } else {
            Err(CopyHealth::Corrupt(
                "primary header names no backup location".into(),
            ))
        };
        let health_of = |r: &Result<(Header, Vec<u8>), CopyHealth>| match r {
            Ok(_) => CopyHealth::Valid,
            Err(h) => h.clone(),
        };
        let (ph, bh) = (health_of(&primary), health_of(&backup));
        let in_sync = match (&primary, &backup) {
            (Ok((p, pe)), Ok((b, be))) => {
                pe == be
                    && p.alt_lba == b.my_lba
                    && b.alt_lba == p.my_lba
                    && p.first_usable == b.first_usable
                    && p.last_usable == b.last_usable
                    && p.disk_guid == b.disk_guid
                    && p.num_entries == b.num_entries
                    && p.entry_size == b.entry_size
            }
            _ => false,
        };
        let health = GptHealth {
            primary: ph.clone(),
            backup: bh.clone(),
            in_sync,
        };
        let entries_lba_of = |p: &Result<(Header, Vec<u8>), CopyHealth>| match p {
            Ok((h, _)) => Some(h.entries_lba),
            Err(_) => None,
        };
        let p_elba = entries_lba_of(&primary);
        let b_elba = entries_lba_of(&backup);
        let (template, entries, source) = match (primary, backup) {
            (Ok((h, e)), _) => (h, e, TableCopy::Primary),
            (Err(_), Ok((h, e))) => (h, e, TableCopy::Backup),
            (Err(CopyHealth::Missing), Err(CopyHealth::Missing)) => {
                return Err(GptError::NoGpt { last_lba })
            }
            (Err(p), Err(b)) => {
                return Err(GptError::BothCorrupt {
                    primary: p.to_string(),
                    backup: b.to_string(),
                })
            }
        };
        let array_sectors = template.array_bytes().div_ceil(ss);
        let backup_lba = match source {
            TableCopy::Primary => template.alt_lba,
            TableCopy::Backup => template.my_lba,
        };
        // A broken copy is rebuilt at the standard place: primary array at LBA 2, backup
        // array right before the backup header (`write_copy` refuses if that overlaps).
        let primary_entries_lba = p_elba.unwrap_or(2);
        let backup_entries_lba = b_elba.unwrap_or(backup_lba.saturating_sub(array_sectors));
        if !health.primary.is_valid() || !health.backup.is_valid() || !in_sync {
            tracing::warn!(primary = %ph, backup = %bh, in_sync, "GPT copies need repair");
        }
        Ok(Gpt {
            sector_size: ss,
            template,
            source,
            primary_lba: 1,
            backup_lba,
            primary_entries_lba,
            backup_entries_lba,
            on_disk: entries.clone(),
            entries,
            health,
        })
    }

    /// Health of both copies as last read or written.
    pub fn health(&self) -> &GptHealth {
        &self.health
    }

    /// Which copy the table was taken from.
    pub fn source(&self) -> TableCopy {
        self.source
    }

    pub fn disk_guid(&self) -> Uuid {
        self.template.disk_guid
    }

    pub(crate) fn sector_size(&self) -> u64 {
        self.sector_size
    }

    /// Used entries in index order (the in-memory state, including unwritten changes).
    pub fn partitions(&self) -> Vec<Entry> {
        parse_entries(&self.entries, self.template.entry_size)
    }

    /// The used entry with this partition number.
    pub fn partition(&self, number: u32) -> Option<Entry> {
        self.partitions().into_iter().find(|e| e.number == number)
    }

    /// Change the 64-bit attribute field of one used entry (in memory only).
    pub fn set_attributes(&mut self, number: u32, attributes: u64) -> Result<(), GptError> {
        if self.partition(number).is_none() {
            return Err(GptError::NoSuchPartition { number });
        }
        let at = (number as usize - 1) * self.template.entry_size as usize + 48;
        self.entries[at..at + 8].copy_from_slice(&attributes.to_le_bytes());
        Ok(())
    }

    /// Whether the in-memory array differs from the disk.
    pub(crate) fn is_dirty(&self) -> bool {
        self.entries != self.on_disk
    }

    /// Header sector for `which` describing `entries`.
    fn header_sector(&self, which: TableCopy, entries: &[u8]) -> Vec<u8> {
        let mut raw = self.template.raw.clone();
        let (my, alt, elba) = match which {
            TableCopy::Primary => (self.primary_lba, self.backup_lba, self.primary_entries_lba),
            TableCopy::Backup => (self.backup_lba, self.primary_lba, self.backup_entries_lba),
        };
        raw[24..32].copy_from_slice(&my.to_le_bytes());
        raw[32..40].copy_from_slice(&alt.to_le_bytes());
        raw[72..80].copy_from_slice(&elba.to_le_bytes());
        raw[88..92].copy_from_slice(&crc32fast::hash(entries).to_le_bytes());
        let crc = header_crc(&raw);
        raw[16..20].copy_from_slice(&crc.to_le_bytes());
        raw.resize(self.sector_size as usize, 0);
        raw
    }

    /// Write one whole copy (array, then header) and flush. The header goes last: until it
    /// lands, the copy's old header CRC-checks against whatever array is on disk.
    fn write_copy(
        &self,
        dev: &mut dyn BlockDevice,
        which: TableCopy,
        entries: &[u8],
    ) -> Result<(), GptError> {
        let ss = self.sector_size;
        let array_sectors = (entries.len() as u64).div_ceil(ss);
        let (hdr_lba, elba) = match which {
            TableCopy::Primary => (self.primary_lba, self.primary_entries_lba),
            TableCopy::Backup => (self.backup_lba, self.backup_entries_lba),
        };
        let placed_ok = match which {
            TableCopy::Primary => {
                elba > hdr_lba && elba + array_sectors <= self.template.first_usable
            }
            TableCopy::Backup => {
                elba > self.template.last_usable && elba + array_sectors <= hdr_lba
            }
        };
        if !placed_ok {
            return Err(GptError::Layout(format!(
                "the {which} entry array would land at LBA {elba}, overlapping its header or usable space"
            )));
        }
        let io = |what: String| move |source| GptError::Io { what, source };
        dev.write_at(entries, elba * ss).map_err(io(format!(
            "writing the {which} GPT entry array at LBA {elba}"
        )))?;
        dev.write_at(&self.header_sector(which, entries), hdr_lba * ss)
            .map_err(io(format!(
                "writing the {which} GPT header at LBA {hdr_lba}"
            )))?;
        dev.flush()
            .map_err(io(format!("flushing the {which} GPT")))?;
        Ok(())
    }

    /// Make both copies valid and equal to the authoritative one, rewriting only the copy that
    /// is broken or stale. Returns whether anything was written.
    pub fn repair(&mut self, dev: &mut dyn BlockDevice) -> Result<bool, GptError> {
        if !self.health.needs_repair() {
            return Ok(false);
        }
        let target = match self.source {
            TableCopy::Primary => TableCopy::Backup,
            TableCopy::Backup => TableCopy::Primary,
        };
        tracing::info!(copy = %target, from = %self.source, "repairing GPT copy");
        let on_disk = self.on_disk.clone();
        self.write_copy(dev, target, &on_disk)?;
        self.health = GptHealth {
            primary: CopyHealth::Valid,
            backup: CopyHealth::Valid,
            in_sync: true,
        };
        Ok(true)
    }

    /// Write the in-memory array crash-safely: repair a broken copy first, then the whole
    /// backup copy and a flush, then the whole primary copy and a flush. At every instant one
    /// copy is complete and valid: the primary (old) while the backup is written, the backup
    /// (new) while the primary is written. Writes nothing when nothing changed.
    pub fn write(&mut self, dev: &mut dyn BlockDevice) -> Result<(), GptError> {
        let _span = tracing::debug_span!("gpt_write").entered();
        self.repair(dev)?;
        if !self.is_dirty() {
            tracing::debug!("table unchanged, nothing written");
            return Ok(());
        }
        let entries = self.entries.clone();
        self.write_copy(dev, TableCopy::Backup, &entries)?;
        self.write_copy(dev, TableCopy::Primary, &entries)?;
        self.on_disk = entries;
        Ok(())
    }

    /// Byte ranges `[start, end)` each copy occupies (array and header), primary first.
    pub fn copy_regions(&self) -> [(u64, u64); 2] {
        let ss = self.sector_size;
        let arr = (self.entries.len() as u64).div_ceil(ss);
        [
            (
                self.primary_lba * ss,
                (self.primary_entries_lba + arr).max(self.primary_lba + 1) * ss,
            ),
            (
                self.backup_entries_lba.min(self.backup_lba) * ss,
                (self.backup_lba + 1) * ss,
            ),
        ]
    }
}
