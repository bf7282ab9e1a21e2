//! Test devices: an in-memory copy-on-write disk, and a device that records every write and
//! flush so a test can rebuild the disk as a power cut at any point would have left it.

use super::BlockDevice;
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

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

/// Every state a power cut during `log` may leave, under this model: all writes before the
/// last completed flush are durable; of the writes issued after it, any subset may have
/// landed (all subsets when there are at most 10, else every prefix), and the last one of a
/// prefix may be torn (only its first sector, half of its first sector, or all but its last
/// sector).
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
        if pending.len() <= 10 {
            for mask in 0u32..(1 << pending.len()) {
                let subset: Vec<_> = (0..pending.len())
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| pending[i].clone())
                    .collect();
                cuts.push(with(
                    subset,
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
        }
        for (j, (off, data)) in pending.iter().enumerate() {
            let mut torn = vec![
                ("first sector", data.len().min(ss)),
                ("half a sector", data.len().min(ss / 2)),
            ];
            if data.len() > ss {
                torn.push(("all but the last sector", data.len() - ss));
            }
            for (how, len) in torn {
                let mut w = pending[..j].to_vec();
                w.push((*off, data[..len].to_vec()));
                cuts.push(with(
                    w,
                    format!("first {j} writes landed, write #{j} torn ({how})"),
                ));
            }
        }
        durable.extend(pending.iter().cloned());
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
}
