//! The blocking half of the pipeline: decode, hash, write, checkpoint, flush, read back.

use super::buf::AlignedBuf;
use super::readback::{ReadError, Readback, ReadbackMethod, Verifier};
use super::{Compression, InstallError, Phase, TargetReport};
use crate::boot::SlotId;
use crate::disk::BlockDevice;
use bytes::Bytes;
use ring::digest;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use zstd::stream::raw::{DParameter, Decoder, Operation};

/// What the job does with the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Stream the image into the partition.
    Write,
    /// The disk should already hold the image: hash it, fetch nothing.
    VerifyExisting,
}

/// Everything the writer thread needs to know about one target.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub slot: SlotId,
    pub role: String,
    pub url: String,
    pub device: String,
    pub part_offset: u64,
    pub part_len: u64,
    pub expected_size: u64,
    pub expected_sha256: [u8; 32],
    pub compression: Compression,
    pub compressed_size: u64,
    pub compressed_sha256: Option<[u8; 32]>,
    /// Image bytes already on disk (resume, `compression = none` only).
    pub start_at: u64,
    pub mode: Mode,
    pub buffer_size: usize,
    pub channel_capacity: usize,
    pub checkpoint_bytes: u64,
    pub window_log_max: u32,
    pub readback: Readback,
}

/// Writer -> verifier thread.
#[derive(Debug)]
pub(crate) enum VMsg {
    /// Read back and hash this flushed range (absolute offsets), next in image order.
    Range { offset: u64, len: u64 },
    /// The source restarted: hash from 0 again.
    Reset,
}

/// Download task -> writer.
#[derive(Debug)]
pub(crate) enum Msg {
    Data(Bytes),
    Restarted,
    End,
}

/// Writer -> async side.
#[derive(Debug)]
pub(crate) enum Event {
    Progress {
        phase: Phase,
        done: u64,
        total: u64,
    },
    /// Everything up to `written` is fsynced.
    Checkpoint {
        written: u64,
        compressed_offset: u64,
        complete: bool,
    },
}

#[derive(Debug)]
pub(crate) enum WriterError {
    /// The data channel closed without an end marker, or the async side went away: the
    /// reason is on the async side (fetch error, sink error).
    StreamAborted,
    Install(Box<InstallError>),
}

impl From<InstallError> for WriterError {
    fn from(e: InstallError) -> Self {
        WriterError::Install(Box::new(e))
    }
}

type Res<T> = Result<T, WriterError>;

fn hex32(d: &[u8]) -> String {
    hex::encode(d)
}

struct Writer<'a> {
    job: &'a Job,
    dev: &'a Mutex<dyn BlockDevice>,
    ev: &'a mpsc::UnboundedSender<Event>,
    buf: AlignedBuf,
    fill: usize,
    /// Image bytes on disk from the partition start.
    written: u64,
    /// Wire bytes consumed from the stream start.
    compressed: u64,
    image_hash: digest::Context,
    wire_hash: Option<digest::Context>,
    decoder: Option<Decoder<'static>>,
    /// The decoder sits at a frame boundary (a complete stream so far).
    frame_done: bool,
    last_checkpoint: u64,
    /// Durable ranges go here to be read back while writing continues.
    verifier: Option<std::sync::mpsc::Sender<VMsg>>,
    fetched_this_run: u64,
    written_this_run: u64,
}

impl<'a> Writer<'a> {
    fn new(
        job: &'a Job,
        dev: &'a Mutex<dyn BlockDevice>,
        ev: &'a mpsc::UnboundedSender<Event>,
        verifier: Option<std::sync::mpsc::Sender<VMsg>>,
    ) -> Res<Self> {
        let decoder = match job.compression {
            Compression::None => None,
            Compression::Zstd => {
                let mut d = Decoder::new().map_err(|e| self_decompress(job, e))?;
                d.set_parameter(DParameter::WindowLogMax(job.window_log_max))
                    .map_err(|e| self_decompress(job, e))?;
                Some(d)
            }
        };
        Ok(Writer {
            job,
            dev,
            ev,
            buf: AlignedBuf::new(job.buffer_size),
            fill: 0,
            written: 0,
            compressed: 0,
            image_hash: digest::Context::new(&digest::SHA256),
            wire_hash: wire_hasher(job),
            decoder,
            frame_done: false,
            last_checkpoint: 0,
            verifier,
            fetched_this_run: 0,
            written_this_run: 0,
        })
    }

    fn send(&self, ev: Event) -> Res<()> {
        self.ev.send(ev).map_err(|_| WriterError::StreamAborted)
    }

    fn progress(&self, phase: Phase, done: u64) -> Res<()> {
        self.send(Event::Progress {
            phase,
            done,
            total: self.job.expected_size,
        })
    }

    fn io_err(&self, op: &'static str, offset: u64, source: io::Error) -> WriterError {
        WriterError::from(InstallError::Io {
            role: self.job.role.clone(),
            op,
            device: self.job.device.clone(),
            offset,
            source,
        })
    }

    /// Re-hash the bytes a previous run left on disk so the stream hash continues.
    fn rehash_existing(&mut self, upto: u64) -> Res<()> {
        let job = self.job;
        let ev = self.ev;
        let prog = |done: u64| {
            let _ = ev.send(Event::Progress {
                phase: Phase::Rehashing,
                done,
                total: job.expected_size,
            });
        };
        let mut pos = 0u64;
        while pos < upto {
            let n = (upto - pos).min(self.buf.len() as u64) as usize;
            let at = job.part_offset + pos;
            let dev = self.dev.lock().map_err(|_| poisoned(job))?;
            dev.read_at(&mut self.buf.as_mut_slice()[..n], at)
                .map_err(|e| self.io_err("re-reading for resume", at, e))?;
            drop(dev);
            self.image_hash.update(&self.buf.as_slice()[..n]);
            pos += n as u64;
            prog(pos);
        }
        self.written = upto;
        self.compressed = upto;
        self.verify_durable()?;
        info!(bytes = upto, "resuming after re-hashing the bytes on disk");
        Ok(())
    }

    fn feed(&mut self, data: &[u8]) -> Res<()> {
        let job = self.job;
        self.compressed += data.len() as u64;
        self.fetched_this_run += data.len() as u64;
        if self.compressed > job.compressed_size {
            return Err(InstallError::SizeMismatch {
                role: job.role.clone(),
                url: job.url.clone(),
                what: "compressed",
                expected: job.compressed_size,
                actual: self.compressed,
            }
            .into());
        }
        if let Some(h) = self.wire_hash.as_mut() {
            h.update(data);
        }
        let mut input = data;
        match self.decoder.is_some() {
            false => {
                while !input.is_empty() {
                    if self.fill == 0 && input.len() >= self.buf.len() {
                        // A whole buffer at an aligned cursor: write it without copying.
                        let (block, rest) = input.split_at(self.buf.len());
                        self.write_block(block)?;
                        input = rest;
                        continue;
                    }
                    let room = self.buf.len() - self.fill;
                    let n = room.min(input.len());
                    self.buf.as_mut_slice()[self.fill..self.fill + n].copy_from_slice(&input[..n]);
                    self.fill += n;
                    input = &input[n..];
                    if self.fill == self.buf.len() {
                        self.commit()?;
                    }
                }
            }
            true => {
                while !input.is_empty() {
                    let made = self.decode_step(input)?;
                    input = &input[made..];
                }
            }
        }
        Ok(())
    }

    /// One decoder call on `input` into the free part of the buffer; returns bytes consumed.
    fn decode_step(&mut self, input: &[u8]) -> Res<usize> {
        let job = self.job;
        let fill = self.fill;
        let Some(dec) = self.decoder.as_mut() else {
            return Ok(input.len());
        };
        let st = dec
            .run_on_buffers(input, &mut self.buf.as_mut_slice()[fill..])
            .map_err(|e| self_decompress(job, e))?;
        self.fill += st.bytes_written;
        if st.bytes_read > 0 || st.bytes_written > 0 {
            self.frame_done = st.remaining == 0;
        }
        if self.written + self.fill as u64 > job.expected_size {
            return Err(InstallError::DecompressedTooLong {
                role: job.role.clone(),
                url: job.url.clone(),
                limit: job.expected_size,
            }
            .into());
        }
        if self.fill == self.buf.len() {
            self.commit()?;
        } else if st.bytes_read == 0 && st.bytes_written == 0 && !input.is_empty() {
            return Err(self_decompress(
                job,
                io::Error::other("the decoder made no progress"),
            ));
        }
        Ok(st.bytes_read)
    }

    /// Hash and write the filled part of the buffer at the cursor.
    fn commit(&mut self) -> Res<()> {
        if self.fill == 0 {
            return Ok(());
        }
        let buf = std::mem::replace(&mut self.buf, AlignedBuf::empty());
        let r = self.write_block(&buf.as_slice()[..self.fill]);
        self.buf = buf;
        self.fill = 0;
        r
    }

    /// Hash and write `data` at the cursor; at each checkpoint fsync, record, and hand the
    /// now durable range to the verifier.
    fn write_block(&mut self, data: &[u8]) -> Res<()> {
        let job = self.job;
        let n = data.len();
        let end = self.written + n as u64;
        if end > job.expected_size || end > job.part_len {
            // Unreachable through feed/decode_step; kept so no path can write past the image.
            return Err(InstallError::DecompressedTooLong {
                role: job.role.clone(),
                url: job.url.clone(),
                limit: job.expected_size,
            }
            .into());
        }
        self.image_hash.update(data);
        let at = job.part_offset + self.written;
        {
            let mut dev = self.dev.lock().map_err(|_| poisoned(job))?;
            dev.write_at(data, at)
                .map_err(|e| self.io_err("writing", at, e))?;
        }
        self.written = end;
        self.written_this_run += n as u64;
        self.progress(Phase::Writing, self.written)?;
        if self.written - self.last_checkpoint >= job.checkpoint_bytes {
            self.flush()?;
            self.verify_durable()?;
            let compressed_offset = match job.compression {
                Compression::None => self.written,
                Compression::Zstd => self.compressed,
            };
            self.send(Event::Checkpoint {
                written: self.written,
                compressed_offset,
                complete: false,
            })?;
        }
        Ok(())
    }

    /// Hand `last_checkpoint..written` (flushed) to the verifier and advance the checkpoint.
    fn verify_durable(&mut self) -> Res<()> {
        let range = VMsg::Range {
            offset: self.job.part_offset + self.last_checkpoint,
            len: self.written - self.last_checkpoint,
        };
        self.last_checkpoint = self.written;
        if let Some(v) = &self.verifier {
            // A closed channel means the verifier stopped on an error: it is reported when
            // the writer joins it at the end.
            let _ = v.send(range);
        }
        Ok(())
    }

    fn flush(&mut self) -> Res<()> {
        let job = self.job;
        let mut dev = self.dev.lock().map_err(|_| poisoned(job))?;
        dev.flush()
            .map_err(|e| self.io_err("flushing", job.part_offset, e))
    }

    /// The source started over: forget everything streamed so far.
    fn restart(&mut self) -> Res<()> {
        warn!(
            discarded = self.written,
            "source restarted from byte 0; hashing from 0"
        );
        self.fill = 0;
        self.written = 0;
        self.compressed = 0;
        self.last_checkpoint = 0;
        self.image_hash = digest::Context::new(&digest::SHA256);
        self.wire_hash = wire_hasher(self.job);
        self.frame_done = false;
        if let Some(d) = self.decoder.as_mut() {
            d.reinit().map_err(|e| self_decompress(self.job, e))?;
        }
        if let Some(v) = &self.verifier {
            let _ = v.send(VMsg::Reset);
        }
        self.progress(Phase::Restarted, 0)
    }

    /// End of stream: drain the decoder, write the tail, check sizes and hashes, fsync.
    fn finish(&mut self) -> Res<[u8; 32]> {
        let job = self.job;
        if self.decoder.is_some() {
            loop {
                let before = self.fill;
                let committed = self.written;
                self.decode_step(&[])?;
                if self.fill == before && self.written == committed {
                    break;
                }
            }
        }
        self.commit()?;
        if self.compressed != job.compressed_size {
            return Err(InstallError::SizeMismatch {
                role: job.role.clone(),
                url: job.url.clone(),
                what: "compressed",
                expected: job.compressed_size,
                actual: self.compressed,
            }
            .into());
        }
        if self.decoder.is_some() && !self.frame_done {
            return Err(self_decompress(
                job,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the last zstd frame is truncated",
                ),
            ));
        }
        if self.written != job.expected_size {
            return Err(InstallError::SizeMismatch {
                role: job.role.clone(),
                url: job.url.clone(),
                what: "image",
                expected: job.expected_size,
                actual: self.written,
            }
            .into());
        }
        self.progress(Phase::Flushing, self.written)?;
        self.flush()?;
        self.verify_durable()?;
        self.verifier = None;
        let image = finish_hash(std::mem::replace(
            &mut self.image_hash,
            digest::Context::new(&digest::SHA256),
        ));
        let wire = match (self.wire_hash.take(), job.compression) {
            (Some(h), _) => Some(finish_hash(h)),
            (None, Compression::None) => Some(image),
            (None, Compression::Zstd) => None,
        };
        if let (Some(expected), Some(actual)) = (job.compressed_sha256, wire) {
            if expected != actual {
                return Err(InstallError::HashMismatch {
                    role: job.role.clone(),
                    url: job.url.clone(),
                    what: "compressed stream",
                    expected: hex32(&expected),
                    actual: hex32(&actual),
                }
                .into());
            }
        }
        if image != job.expected_sha256 {
            return Err(InstallError::HashMismatch {
                role: job.role.clone(),
                url: job.url.clone(),
                what: "image",
                expected: hex32(&job.expected_sha256),
                actual: hex32(&image),
            }
            .into());
        }
        Ok(image)
    }
}

fn wire_hasher(job: &Job) -> Option<digest::Context> {
    match (job.compression, job.compressed_sha256) {
        (Compression::Zstd, Some(_)) => Some(digest::Context::new(&digest::SHA256)),
        _ => None,
    }
}

fn finish_hash(ctx: digest::Context) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn self_decompress(job: &Job, source: io::Error) -> WriterError {
    WriterError::from(InstallError::Decompress {
        role: job.role.clone(),
        url: job.url.clone(),
        source,
    })
}

fn poisoned(job: &Job) -> WriterError {
    WriterError::from(InstallError::Internal {
        role: job.role.clone(),
        reason: "block device lock poisoned by an earlier panic".into(),
    })
}

fn readback_io(job: &Job, mode: &Readback, e: ReadError) -> WriterError {
    WriterError::from(InstallError::Io {
        role: job.role.clone(),
        op: e.op,
        device: match mode {
            Readback::Uncached { path } => path.display().to_string(),
            _ => job.device.clone(),
        },
        offset: e.offset,
        source: e.source,
    })
}

fn check_readback(job: &Job, actual: [u8; 32], method: ReadbackMethod) -> Res<ReadbackMethod> {
    if actual != job.expected_sha256 {
        return Err(InstallError::ReadbackMismatch {
            slot: job.slot,
            role: job.role.clone(),
            device: job.device.clone(),
            offset: job.part_offset,
            end: job.part_offset + job.expected_size,
            method,
            expected: hex32(&job.expected_sha256),
            actual: hex32(&actual),
        }
        .into());
    }
    debug!(?method, "read-back matches");
    Ok(method)
}

/// The verifier thread: read back each range the writer hands over, in order.
fn verifier_thread(
    job: &Job,
    mode: &Readback,
    dev: &Mutex<dyn BlockDevice>,
    ev: &mpsc::UnboundedSender<Event>,
    rx: std::sync::mpsc::Receiver<VMsg>,
) -> Res<([u8; 32], ReadbackMethod)> {
    let mut v = Verifier::open(
        mode,
        dev,
        job.part_offset,
        job.part_offset + job.part_len,
        job.buffer_size,
    )
    .map_err(|e| readback_io(job, mode, e))?;
    let mut prog = |done: u64| {
        let _ = ev.send(Event::Progress {
            phase: Phase::Verifying,
            done,
            total: job.expected_size,
        });
    };
    while let Ok(m) = rx.recv() {
        match m {
            VMsg::Range { offset, len } => v
                .feed(offset, len, &mut prog)
                .map_err(|e| readback_io(job, mode, e))?,
            VMsg::Reset => v.reset(),
        }
    }
    let method = v.method();
    Ok((v.finish(), method))
}

/// Run one target to completion on the current (blocking) thread.
pub(crate) fn run(
    job: &Job,
    dev: &Mutex<dyn BlockDevice>,
    rx: mpsc::Receiver<Msg>,
    ev: &mpsc::UnboundedSender<Event>,
) -> Res<TargetReport> {
    if job.mode == Mode::VerifyExisting {
        return verify_existing(job, dev, ev);
    }
    std::thread::scope(|s| {
        let (vtx, verifier) = match &job.readback {
            Readback::Off => (None, None),
            mode => {
                let (vtx, vrx) = std::sync::mpsc::channel();
                let h = s.spawn(move || verifier_thread(job, mode, dev, ev, vrx));
                (Some(vtx), Some(h))
            }
        };
        let written = write_all(job, dev, rx, ev, vtx);
        // The sender is gone (finished or failed): the verifier drains and ends.
        let verified = verifier.map(|h| h.join());
        let (mut report, t_end) = written?;
        if let Some(v) = verified {
            let (actual, method) = v.map_err(|_| {
                WriterError::from(InstallError::Internal {
                    role: job.role.clone(),
                    reason: "read-back thread panicked".into(),
                })
            })??;
            report.readback = Some(check_readback(job, actual, method)?);
        }
        report.readback_time = t_end.elapsed();
        ev.send(Event::Checkpoint {
            written: job.expected_size,
            compressed_offset: job.compressed_size,
            complete: true,
        })
        .map_err(|_| WriterError::StreamAborted)?;
        let _ = ev.send(Event::Progress {
            phase: Phase::Done,
            done: job.expected_size,
            total: job.expected_size,
        });
        Ok(report)
    })
}

/// Receive, decode, hash, write and flush; returns the report and when writing ended.
fn write_all(
    job: &Job,
    dev: &Mutex<dyn BlockDevice>,
    mut rx: mpsc::Receiver<Msg>,
    ev: &mpsc::UnboundedSender<Event>,
    verifier: Option<std::sync::mpsc::Sender<VMsg>>,
) -> Res<(TargetReport, Instant)> {
    let t = Instant::now();
    let mut w = Writer::new(job, dev, ev, verifier)?;
    if job.start_at > 0 {
        w.rehash_existing(job.start_at)?;
    }
    let mut restarted = false;
    loop {
        match rx.blocking_recv() {
            None => return Err(WriterError::StreamAborted),
            Some(Msg::Data(b)) => w.feed(&b)?,
            Some(Msg::Restarted) => {
                restarted = true;
                w.restart()?;
            }
            Some(Msg::End) => break,
        }
    }
    drop(rx);
    let sha = w.finish()?;
    let write_time = t.elapsed();
    info!(
        bytes = w.written_this_run,
        fetched = w.fetched_this_run,
        secs = write_time.as_secs_f64(),
        "image written, flushed, stream hash verified"
    );
    let report = TargetReport {
        role: job.role.clone(),
        bytes_written: w.written_this_run,
        bytes_fetched: w.fetched_this_run,
        resumed_from: if restarted { 0 } else { job.start_at },
        reused: false,
        sha256: hex32(&sha),
        readback: None,
        write_time,
        readback_time: Duration::ZERO,
    };
    Ok((report, Instant::now()))
}

/// The disk should already hold the image (a complete resume record): read it back.
fn verify_existing(
    job: &Job,
    dev: &Mutex<dyn BlockDevice>,
    ev: &mpsc::UnboundedSender<Event>,
) -> Res<TargetReport> {
    let t = Instant::now();
    let mode = match &job.readback {
        Readback::Off => Readback::Device,
        m => m.clone(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let _ = tx.send(VMsg::Range {
        offset: job.part_offset,
        len: job.expected_size,
    });
    drop(tx);
    let (actual, method) = verifier_thread(job, &mode, dev, ev, rx)?;
    let method = check_readback(job, actual, method)?;
    info!("the disk already holds the verified image; nothing fetched");
    ev.send(Event::Checkpoint {
        written: job.expected_size,
        compressed_offset: job.compressed_size,
        complete: true,
    })
    .map_err(|_| WriterError::StreamAborted)?;
    let _ = ev.send(Event::Progress {
        phase: Phase::Done,
        done: job.expected_size,
        total: job.expected_size,
    });
    Ok(TargetReport {
        role: job.role.clone(),
        bytes_written: 0,
        bytes_fetched: 0,
        resumed_from: job.expected_size,
        reused: true,
        sha256: hex32(&job.expected_sha256),
        readback: Some(method),
        write_time: Duration::ZERO,
        readback_time: t.elapsed(),
    })
}
