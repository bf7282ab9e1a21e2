//! Where image bytes come from: a small async trait the fetcher (HTTP) and local files plug into.

use super::buf::{round_up, AlignedBuf, IO_ALIGN};
use bytes::Bytes;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

/// One step of a source stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceChunk {
    /// The next bytes of the (possibly compressed) stream.
    Data(Bytes),
    /// The source could not continue where it was (e.g. the server ignored a Range request
    /// or the ETag changed) and starts again from byte 0: everything seen so far is void.
    Restarted,
}

/// A failure of a source, with a stable kind from the layer that produced it.
#[derive(Debug)]
pub struct SourceError {
    /// Machine-readable kind (e.g. the fetcher's own `kind()`).
    pub kind: &'static str,
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl SourceError {
    pub fn new(
        kind: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        SourceError {
            kind,
            source: source.into(),
        }
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.source, self.kind)
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// The future returned by [`ImageSource::next_chunk`].
pub type ChunkFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<SourceChunk>, SourceError>> + Send + 'a>>;

/// A stream of image bytes. `next_chunk` yields `Ok(None)` at the end of the stream.
///
/// Chunks may be any size; the pipeline coalesces them into fixed-size buffers.
pub trait ImageSource: Send {
    /// Where the bytes come from (URL or path), for errors and the resume record.
    fn describe(&self) -> String;
    /// The validator of the current object (HTTP ETag), once known; kept in the resume record.
    fn etag(&self) -> Option<String> {
        None
    }
    /// Ask the next `next_chunk` call to start at `offset` of the stream. `etag` is the
    /// validator recorded when those bytes were first fetched. A source that cannot honour
    /// it starts from 0 and yields [`SourceChunk::Restarted`] first.
    fn resume_from(&mut self, offset: u64, etag: Option<&str>) -> Result<(), SourceError>;
    /// The next chunk, or `None` at the end of the stream.
    fn next_chunk(&mut self) -> ChunkFuture<'_>;
}

/// Reads an image from a local file (an image on removable media, tests, the benchmark).
///
/// A reader thread reads the file sequentially in whole `chunk`-byte pieces (one `read`
/// syscall per piece where the kernel allows, after `POSIX_FADV_SEQUENTIAL` so readahead is
/// large) straight into [`IO_ALIGN`]-aligned pool buffers, one piece ahead of the pipeline.
/// The pieces go out as [`Bytes`] that own their buffer, so the pump passes them on without a
/// copy, and dropping the last handle returns the buffer to the pool: a steady-state install
/// allocates nothing. (The earlier `tokio::fs` reads went through tokio's own bounce buffer,
/// a blocking-pool hop per read and a fresh `Vec` per chunk: the local benchmark's bottleneck.)
#[derive(Debug)]
pub(crate) struct FileSource {
    path: PathBuf,
    /// Where the stream starts in the file, and its length (`None`: to the end of the file).
    base: u64,
    len: Option<u64>,
    offset: u64,
    chunk: usize,
    reader: Option<Reader>,
}

/// The running reader thread: pieces arrive on `rx`; dropping it stops the thread.
#[derive(Debug)]
struct Reader {
    rx: tokio::sync::mpsc::Receiver<Result<Option<Bytes>, SourceError>>,
}

/// Pieces read ahead of the pipeline (besides the one being read).
const READ_AHEAD: usize = 1;

impl FileSource {
    /// A source reading `path` in `chunk`-byte reads (rounded up to a multiple of
    /// [`IO_ALIGN`], at least 4 KiB).
    pub(crate) fn new(path: impl AsRef<Path>, chunk: usize) -> Self {
        FileSource {
            path: path.as_ref().to_path_buf(),
            base: 0,
            len: None,
            offset: 0,
            chunk: round_up(chunk.max(IO_ALIGN) as u64, IO_ALIGN as u64) as usize,
            reader: None,
        }
    }

    /// A source of the `len` bytes at `base` in `path` (a member of an offline bundle).
    pub(crate) fn window(path: impl AsRef<Path>, base: u64, len: u64, chunk: usize) -> Self {
        FileSource {
            base,
            len: Some(len),
            ..FileSource::new(path, chunk)
        }
    }

    fn spawn_reader(&self) -> Result<Reader, SourceError> {
        let path = self.path.clone();
        let io_err = {
            let path = path.clone();
            move |what: &str, e: std::io::Error| {
                SourceError::new("source_io", format!("{what} {}: {e}", path.display()))
            }
        };
        let file = std::fs::File::open(&path).map_err(|e| io_err("cannot open", e))?;
        // Advice only: a file system that ignores it still reads correctly.
        let _ = nix::fcntl::posix_fadvise(
            &file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
        );
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        let start = self.base + self.offset;
        let end = self.len.map(|l| self.base + l);
        let chunk = self.chunk;
        let thread_err = io_err.clone();
        std::thread::Builder::new()
            .name("file-source".into())
            .spawn(move || read_loop(&file, start, end, chunk, &tx, &thread_err))
            .map_err(|e| io_err("cannot start the reader thread for", e))?;
        Ok(Reader { rx })
    }

    async fn next(&mut self) -> Result<Option<SourceChunk>, SourceError> {
        if self.reader.is_none() {
            self.reader = Some(self.spawn_reader()?);
        }
        let Some(r) = self.reader.as_mut() else {
            return Ok(None);
        };
        match r.rx.recv().await {
            Some(Ok(Some(b))) => {
                self.offset += b.len() as u64;
                Ok(Some(SourceChunk::Data(b)))
            }
            Some(Ok(None)) => Ok(None),
            Some(Err(e)) => Err(e),
            None => Err(SourceError::new(
                "source_io",
                format!("the reader thread for {} stopped", self.path.display()),
            )),
        }
    }
}

/// The reader thread: whole pieces from `offset` to `end` (or the end of the file), then
/// `Ok(None)`. Ends early when the source is dropped or restarted (the channel closes).
fn read_loop(
    file: &std::fs::File,
    mut offset: u64,
    end: Option<u64>,
    chunk: usize,
    tx: &tokio::sync::mpsc::Sender<Result<Option<Bytes>, SourceError>>,
    io_err: &dyn Fn(&str, std::io::Error) -> SourceError,
) {
    use std::os::unix::fs::FileExt;
    let (pool_tx, pool_rx) = std::sync::mpsc::channel::<AlignedBuf>();
    loop {
        let mut buf = pool_rx
            .try_recv()
            .unwrap_or_else(|_| AlignedBuf::new(chunk));
        let mut n = 0;
        // This piece stops at the window's end.
        let want = match end {
            Some(e) => (e.saturating_sub(offset)).min(chunk as u64) as usize,
            None => chunk,
        };
        let res = loop {
            if n == want {
                break Ok(());
            }
            match file.read_at(&mut buf.as_mut_slice()[n..want], offset + n as u64) {
                Ok(0) => break Ok(()),
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(io_err("cannot read", e)),
            }
        };
        let msg = match res {
            Err(e) => Err(e),
            Ok(()) if n == 0 => Ok(None),
            Ok(()) => Ok(Some(Bytes::from_owner(PooledRead {
                buf: Some(buf),
                len: n,
                pool: pool_tx.clone(),
            }))),
        };
        let last = !matches!(msg, Ok(Some(_)));
        offset += n as u64;
        if tx.blocking_send(msg).is_err() || last {
            return;
        }
    }
}

/// The first `len` bytes of a reader pool buffer; dropping the last handle returns it.
struct PooledRead {
    buf: Option<AlignedBuf>,
    len: usize,
    pool: std::sync::mpsc::Sender<AlignedBuf>,
}

impl AsRef<[u8]> for PooledRead {
    fn as_ref(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b.as_slice()[..self.len],
            None => &[],
        }
    }
}

impl Drop for PooledRead {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            // The reader may be gone (end of file, install over): then the buffer is freed.
            let _ = self.pool.send(b);
        }
    }
}

impl ImageSource for FileSource {
    fn describe(&self) -> String {
        match self.len {
            Some(len) => format!(
                "{} (bytes {}..{})",
                self.path.display(),
                self.base,
                self.base + len
            ),
            None => self.path.display().to_string(),
        }
    }

    fn resume_from(&mut self, offset: u64, _etag: Option<&str>) -> Result<(), SourceError> {
        self.offset = offset;
        self.reader = None;
        Ok(())
    }

    fn next_chunk(&mut self) -> ChunkFuture<'_> {
        Box::pin(self.next())
    }
}

/// An in-memory source handing out fixed-size pieces of a buffer (tests, small payloads).
#[derive(Debug, Clone)]
pub struct BytesSource {
    data: Bytes,
    pos: usize,
    chunk: usize,
    name: String,
}

impl BytesSource {
    pub fn new(name: impl Into<String>, data: impl Into<Bytes>, chunk: usize) -> Self {
        BytesSource {
            data: data.into(),
            pos: 0,
            chunk: chunk.max(1),
            name: name.into(),
        }
    }
}

impl ImageSource for BytesSource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn resume_from(&mut self, offset: u64, _etag: Option<&str>) -> Result<(), SourceError> {
        self.pos = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.data.len());
        Ok(())
    }

    fn next_chunk(&mut self) -> ChunkFuture<'_> {
        let end = self.pos.saturating_add(self.chunk).min(self.data.len());
        let out = if end > self.pos {
            Some(SourceChunk::Data(self.data.slice(self.pos..end)))
        } else {
            None
        };
        self.pos = end;
        Box::pin(std::future::ready(Ok(out)))
    }
}
