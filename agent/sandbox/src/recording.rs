//! Test devices: an in-memory copy-on-write disk, and a device that records every write and
//! flush so a test can rebuild the disk as a power cut at any point would have left it.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use update_agent::disk::BlockDevice;

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write { offset: u64, data: Vec<u8> },
    Flush,
}

/// Passes everything to `inner` and logs every write and flush in order.
#[derive(Debug)]
pub struct RecordingDevice<D> {
    inner: D,
    log: Vec<Op>,
}

impl<D: BlockDevice> RecordingDevice<D> {
    pub fn new(inner: D) -> Self {
        RecordingDevice {
            inner,
            log: Vec::new(),
        }
    }

    pub fn log(&self) -> &[Op] {
        &self.log
    }

    pub fn take_log(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.log)
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    pub fn into_inner(self) -> D {
        self.inner
    }
}

impl<D: BlockDevice> BlockDevice for RecordingDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn sector_size(&self) -> u64 {
        self.inner.sector_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.log.push(Op::Write {
            offset,
            data: buf.to_vec(),
        });
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.log.push(Op::Flush);
        self.inner.flush()
    }
}

/// An in-memory disk: a shared base image plus the sectors written since. Cloning is cheap,
/// so a test can branch one image into many power-cut states.
#[derive(Debug, Clone)]
pub struct MemDevice {
    base: Arc<Vec<u8>>,
    dirty: BTreeMap<u64, Box<[u8]>>,
    sector_size: u64,
}

impl MemDevice {
    pub fn new(image: Vec<u8>) -> Self {
        MemDevice {
            base: Arc::new(image),
            dirty: BTreeMap::new(),
            sector_size: 512,
        }
    }

    pub fn from_file(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Self::new(std::fs::read(path)?))
    }

    /// The whole disk as bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = (*self.base).clone();
        let ss = self.sector_size as usize;
        for (s, data) in &self.dirty {
            let at = *s as usize * ss;
            v[at..at + data.len()].copy_from_slice(data);
        }
        v
    }

    /// Write the whole disk to `path` (for external tools such as `sgdisk -v`).
    pub fn save(&self, path: impl AsRef<Path>) -> io::Result<()> {
        std::fs::write(path, self.to_vec())
    }

    fn sector(&self, s: u64) -> &[u8] {
        match self.dirty.get(&s) {
            Some(d) => d,
            None => {
                // The last sector of an image whose size is not a multiple of the sector size
                // is short.
                let ss = self.sector_size as usize;
                let at = s as usize * ss;
                &self.base[at..(at + ss).min(self.base.len())]
            }
        }
    }

    fn check(&self, len: usize, offset: u64) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at {offset} past the end of a {}-byte disk",
                    self.size()
                ),
            )),
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.base.len() as u64
    }
    fn sector_size(&self) -> u64 {
        self.sector_size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(buf.len(), offset)?;
        let ss = self.sector_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (s, within) = (pos / ss, (pos % ss) as usize);
            let n = (ss as usize - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&self.sector(s)[within..within + n]);
            done += n;
        }
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(buf.len(), offset)?;
        let ss = self.sector_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (s, within) = (pos / ss, (pos % ss) as usize);
            let n = (ss as usize - within).min(buf.len() - done);
            let mut sector: Box<[u8]> = self.sector(s).into();
            sector[within..within + n].copy_from_slice(&buf[done..done + n]);
            self.dirty.insert(s, sector);
            done += n;
        }
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One disk state a power cut can leave: the writes that reached the medium, in order.
#[derive(Debug, Clone)]
pub struct Cut {
    /// Human description for assertion messages.
    pub what: String,
    pub writes: Vec<(u64, Vec<u8>)>,
}

impl Cut {
    /// Apply the surviving writes to `dev`.
    pub fn apply(&self, dev: &mut dyn BlockDevice) -> io::Result<()> {
        for (off, data) in &self.writes {
            dev.write_at(data, *off)?;
        }
        Ok(())
    }
}

/// Subsets of a batch larger than this are sampled instead of enumerated.
pub const EXHAUSTIVE_BATCH: usize = 10;
/// Subsets sampled per large batch (besides every prefix).
pub const SAMPLED_SUBSETS: usize = 256;

/// A small deterministic generator (SplitMix64): the sampled subsets and the garbage in torn
/// sectors are the same on every run, so a failing cut can be reproduced by its description.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Every state a power cut during `log` may leave, under this model: all writes before the
/// last completed flush are durable; of the writes issued after it, any subset may have
/// landed, in any order (all subsets when there are at most [`EXHAUSTIVE_BATCH`], else every
/// prefix plus [`SAMPLED_SUBSETS`] deterministically sampled subsets). Any one write of the
/// batch may be torn while the others before it landed: only its first sector, half of it,
/// all but its last sector, or its first sector replaced by garbage (a sector the drive was
/// writing when power failed reads back as anything).
pub fn power_cuts(log: &[Op], sector_size: u64) -> Vec<Cut> {
    let mut batches: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new()];
    for op in log {
        match op {
            Op::Write { offset, data } => {
                if let Some(b) = batches.last_mut() {
                    b.push((*offset, data.clone()));
                }
            }
            Op::Flush => batches.push(Vec::new()),
        }
    }
    let ss = sector_size as usize;
    let mut cuts = Vec::new();
    let mut durable: Vec<(u64, Vec<u8>)> = Vec::new();
    for (k, pending) in batches.iter().enumerate() {
        let with = |extra: Vec<(u64, Vec<u8>)>, what: String| Cut {
            what: format!("after flush #{k}: {what}"),
            writes: durable.iter().cloned().chain(extra).collect(),
        };
        let subset = |mask: &dyn Fn(usize) -> bool| -> Vec<(u64, Vec<u8>)> {
            (0..pending.len())
                .filter(|&i| mask(i))
                .map(|i| pending[i].clone())
                .collect()
        };
        if pending.len() <= EXHAUSTIVE_BATCH {
            for mask in 0u32..(1 << pending.len()) {
                cuts.push(with(
                    subset(&|i| mask & (1 << i) != 0),
                    format!("writes {mask:#b} of {} landed", pending.len()),
                ));
            }
        } else {
            for n in 0..=pending.len() {
                cuts.push(with(
                    pending[..n].to_vec(),
                    format!("first {n} writes landed"),
                ));
            }
            let mut rng = SplitMix(k as u64 ^ (pending.len() as u64) << 32);
            for sample in 0..SAMPLED_SUBSETS {
                let bits: Vec<bool> = (0..pending.len())
                    .map(|_| rng.next_u64() & 1 == 1)
                    .collect();
                cuts.push(with(
                    subset(&|i| bits[i]),
                    format!(
                        "sampled subset #{sample} of {} writes landed",
                        pending.len()
                    ),
                ));
            }
        }
        for (j, (off, data)) in pending.iter().enumerate() {
            let mut torn: Vec<(&str, Vec<u8>)> = vec![
                ("first sector", data[..data.len().min(ss)].to_vec()),
                ("half a sector", data[..data.len().min(ss / 2)].to_vec()),
            ];
            if data.len() > ss {
                torn.push(("all but the last sector", data[..data.len() - ss].to_vec()));
            }
            let mut garbage = vec![0u8; data.len().min(ss)];
            SplitMix(*off ^ j as u64).fill(&mut garbage);
            torn.push(("garbage in its first sector", garbage));
            for (how, bytes) in torn {
                // The writes before it landed, and (a torn write anywhere in the batch) also
                // every write after it.
                for (rest, rest_what) in [(false, "before it"), (true, "all others")] {
                    if rest && j + 1 == pending.len() {
                        continue;
                    }
                    let mut w = pending[..j].to_vec();
                    w.push((*off, bytes.clone()));
                    if rest {
                        w.extend(pending[j + 1..].iter().cloned());
                    }
                    cuts.push(with(
                        w,
                        format!("writes {rest_what} landed, write #{j} torn ({how})"),
                    ));
                }
            }
        }
        durable.extend(pending.iter().cloned());
    }
    cuts
}

/// One state of a directory tree a power cut during recorded file operations may leave:
/// each path's bytes (absent paths are missing).
#[derive(Debug, Clone)]
pub struct FileCut {
    pub what: String,
    pub files: BTreeMap<std::path::PathBuf, Vec<u8>>,
}

/// Every directory state a power cut during `log` (from [`crate::state::atomic::record_ops`])
/// may leave, starting from `before` (path -> bytes, all durable). The model, for
/// filesystems such as ext4 in `data=ordered` mode:
/// - a cut may fall between any two operations;
/// - a file's bytes are durable once it was `Fsync`ed (or a `SyncFs` of its directory ran);
///   until then a file that the cut state names holds its bytes, nothing, half of them, or
///   garbage;
/// - a directory change (create by `Write`, `Rename`, `Remove`) is durable once *its*
///   directory was `FsyncDir`ed (or `SyncFs`ed); of each directory's changes not yet durable
///   any *prefix* landed (a journaled filesystem commits metadata in order; a later rename
///   cannot land without an earlier one), independently per directory, since two
///   directories may sit on two filesystems (the state under /var, grubenv under /boot)
///   and an fsync of one says nothing of the other;
/// - the operation in flight when power failed did not happen.
///
/// Not modelled: reordering of one directory's changes, lost fsyncs (lying disks), partial
/// metadata (a rename half done).
pub fn file_cuts(
    before: &BTreeMap<std::path::PathBuf, Vec<u8>>,
    log: &[update_agent::state::atomic::FileOp],
) -> Vec<FileCut> {
    use std::path::{Path, PathBuf};
    use update_agent::state::atomic::FileOp;
    #[derive(Clone)]
    enum Entry {
        Create(PathBuf, usize),
        Rename(PathBuf, PathBuf),
        Remove(PathBuf),
    }
    let dir_of = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
    let entry_dir = |e: &Entry| match e {
        Entry::Create(p, _) | Entry::Remove(p) | Entry::Rename(_, p) => dir_of(p),
    };
    let mut cuts = Vec::new();
    // Inodes: their bytes and whether they are durable. Inode i < before.len() are the
    // initial files.
    let mut inodes: Vec<(Vec<u8>, bool)> = before.values().map(|d| (d.clone(), true)).collect();
    let mut durable: BTreeMap<PathBuf, usize> = before
        .keys()
        .enumerate()
        .map(|(i, p)| (p.clone(), i))
        .collect();
    let mut live = durable.clone();
    // Each directory's changes not yet durable, in the order they were made.
    let mut pending: BTreeMap<PathBuf, Vec<Entry>> = BTreeMap::new();
    let apply = |tree: &mut BTreeMap<PathBuf, usize>, e: &Entry| match e {
        Entry::Create(p, i) => {
            tree.insert(p.clone(), *i);
        }
        Entry::Rename(from, to) => {
            if let Some(i) = tree.remove(from) {
                tree.insert(to.clone(), i);
            }
        }
        Entry::Remove(p) => {
            tree.remove(p);
        }
    };
    for k in 0..=log.len() {
        // The cut falls before op k: of each directory's pending changes, any prefix landed
        // (every combination of prefix lengths across the directories).
        let dirs: Vec<(&PathBuf, &Vec<Entry>)> = pending.iter().collect();
        let mut lens = vec![0usize; dirs.len()];
        loop {
            let mut tree = durable.clone();
            for ((_, entries), &n) in dirs.iter().zip(&lens) {
                for e in &entries[..n] {
                    apply(&mut tree, e);
                }
            }
            let unsynced: Vec<(PathBuf, usize)> = tree
                .iter()
                .filter(|(_, &i)| !inodes[i].1)
                .map(|(p, &i)| (p.clone(), i))
                .collect();
            let base: BTreeMap<PathBuf, Vec<u8>> = tree
                .iter()
                .map(|(p, &i)| (p.clone(), inodes[i].0.clone()))
                .collect();
            let landed: Vec<String> = dirs
                .iter()
                .zip(&lens)
                .map(|((d, entries), n)| format!("{n} of {} in {}", entries.len(), d.display()))
                .collect();
            let what = if landed.is_empty() {
                format!("before op #{k}, no directory change pending")
            } else {
                format!(
                    "before op #{k}, directory changes landed: {}",
                    landed.join(", ")
                )
            };
            cuts.push(FileCut {
                what: what.clone(),
                files: base.clone(),
            });
            for (p, i) in unsynced {
                let data = &inodes[i].0;
                let mut garbage = vec![0u8; data.len()];
                SplitMix(k as u64 * 31 + lens.iter().sum::<usize>() as u64).fill(&mut garbage);
                for (how, bytes) in [
                    ("empty", Vec::new()),
                    ("half", data[..data.len() / 2].to_vec()),
                    ("garbage", garbage),
                ] {
                    let mut files = base.clone();
                    files.insert(p.clone(), bytes);
                    cuts.push(FileCut {
                        what: format!("{what}, unsynced {} {how}", p.display()),
                        files,
                    });
                }
            }
            // Next combination of prefix lengths (an odometer over the directories).
            let mut d = 0;
            while d < lens.len() {
                if lens[d] < dirs[d].1.len() {
                    lens[d] += 1;
                    break;
                }
                lens[d] = 0;
                d += 1;
            }
            if d == lens.len() {
                break;
            }
        }
        let Some(op) = log.get(k) else { break };
        match op {
            FileOp::Write { path, data, .. } => {
                inodes.push((data.clone(), false));
                let e = Entry::Create(path.clone(), inodes.len() - 1);
                apply(&mut live, &e);
                pending.entry(entry_dir(&e)).or_default().push(e);
            }
            FileOp::Fsync { path } => {
                if let Some(&i) = live.get(path) {
                    inodes[i].1 = true;
                }
            }
            FileOp::Rename { from, to } => {
                let e = Entry::Rename(from.clone(), to.clone());
                apply(&mut live, &e);
                pending.entry(entry_dir(&e)).or_default().push(e);
            }
            FileOp::Remove { path } => {
                let e = Entry::Remove(path.clone());
                apply(&mut live, &e);
                pending.entry(entry_dir(&e)).or_default().push(e);
            }
            FileOp::FsyncDir { dir } | FileOp::SyncFs { dir, .. } => {
                if matches!(op, FileOp::SyncFs { .. }) {
                    for (p, i) in &live {
                        if dir_of(p) == *dir {
                            inodes[*i].1 = true;
                        }
                    }
                }
                for e in pending.remove(dir).unwrap_or_default() {
                    apply(&mut durable, &e);
                }
            }
        }
    }
    cuts
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn mem_device_reads_back_unaligned_writes_and_clones_independently() {
        let mut d = MemDevice::new(vec![7u8; 4096]);
        d.write_at(&[1, 2, 3], 510).unwrap();
        let snapshot = d.clone();
        d.write_at(&[9], 511).unwrap();
        let mut b = [0u8; 4];
        d.read_at(&mut b, 509).unwrap();
        assert_eq!(b, [7, 1, 9, 3]);
        snapshot.read_at(&mut b, 509).unwrap();
        assert_eq!(b, [7, 1, 2, 3]);
        assert!(d.read_at(&mut b, 4094).is_err());
        assert_eq!(d.to_vec()[511], 9);
        let mut odd = MemDevice::new(vec![1u8; 700]);
        odd.write_at(&[5; 10], 690).unwrap();
        let mut b = [0u8; 12];
        odd.read_at(&mut b, 688).unwrap();
        assert_eq!(b, [1, 1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]);
        assert_eq!(odd.to_vec().len(), 700);
    }

    #[test]
    fn cuts_keep_flushed_writes_and_vary_only_the_pending_batch() {
        let w = |o: u64, n: usize| Op::Write {
            offset: o,
            data: vec![1u8; n],
        };
        let log = vec![w(0, 1024), w(2048, 512), Op::Flush, w(4096, 512), Op::Flush];
        let cuts = power_cuts(&log, 512);
        // batch 0: 4 subsets + torn (2 + 3 variants for the 1024-byte write... 3 + 2)
        assert!(cuts
            .iter()
            .all(|c| !c.writes.is_empty() || c.what.starts_with("after flush #0")));
        let after1: Vec<_> = cuts
            .iter()
            .filter(|c| c.what.starts_with("after flush #1"))
            .collect();
        assert!(after1
            .iter()
            .all(|c| c.writes.len() >= 2 && c.writes[0].0 == 0 && c.writes[1].0 == 2048));
        assert!(cuts.iter().any(|c| c.writes.len() == 3));
        assert!(cuts
            .iter()
            .any(|c| c.writes.iter().any(|(_, d)| d.len() == 256)));
    }

    #[test]
    fn large_batches_are_sampled_and_tears_happen_anywhere() {
        let log: Vec<Op> = (0..12)
            .map(|i| Op::Write {
                offset: i * 1024,
                data: vec![1u8; 1024],
            })
            .collect();
        let cuts = power_cuts(&log, 512);
        // A non-prefix subset: write 0 missing, a later one present.
        assert!(cuts
            .iter()
            .any(|c| { c.writes.first().is_some_and(|(o, _)| *o != 0) && c.writes.len() > 1 }));
        // A tear in the middle with later writes landed.
        assert!(cuts.iter().any(|c| {
            c.writes.len() == 12 && c.writes[5].1.len() == 512 && c.writes[11].1.len() == 1024
        }));
        // Garbage, not the data, in a torn sector.
        assert!(cuts.iter().any(|c| c
            .writes
            .iter()
            .any(|(_, d)| d.len() == 512 && d.iter().any(|&b| b != 1))));
        assert_eq!(power_cuts(&log, 512).len(), cuts.len(), "deterministic");
    }

    #[test]
    fn file_cuts_follow_fsync_and_directory_fsync() {
        use std::path::PathBuf;
        use update_agent::state::atomic::FileOp;
        let p = PathBuf::from("d/f");
        let tmp = PathBuf::from("d/.f.tmp");
        let before = BTreeMap::from([(p.clone(), b"old".to_vec())]);
        let log = vec![
            FileOp::Write {
                path: tmp.clone(),
                data: b"new!".to_vec(),
                mode: 0o600,
            },
            FileOp::Fsync { path: tmp.clone() },
            FileOp::Rename {
                from: tmp.clone(),
                to: p.clone(),
            },
            FileOp::FsyncDir {
                dir: PathBuf::from("d"),
            },
        ];
        let cuts = file_cuts(&before, &log);
        // The target is always the old or the new bytes, never torn (data synced before the
        // rename); a torn temp file shows up only under its temp name.
        for c in &cuts {
            let f = c.files.get(&p).map(Vec::as_slice);
            assert!(f == Some(b"old") || f == Some(b"new!"), "{}: {f:?}", c.what);
        }
        assert!(cuts
            .iter()
            .any(|c| c.files.get(&tmp).is_some_and(Vec::is_empty)));
        assert!(cuts
            .iter()
            .any(|c| c.files.get(&p) == Some(&b"new!".to_vec())));
        // Without the data fsync, a rename can expose a torn file.
        let unsafe_log = vec![log[0].clone(), log[2].clone(), log[3].clone()];
        assert!(file_cuts(&before, &unsafe_log)
            .iter()
            .any(|c| c.files.get(&p).is_some_and(Vec::is_empty)));
    }
}
