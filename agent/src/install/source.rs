//! Where image bytes come from: a small async trait the fetcher (HTTP) and local files plug into.

use bytes::Bytes;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

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
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    offset: u64,
    chunk: usize,
}

impl FileSource {
    /// A source reading `path` in `chunk`-byte reads (clamped to at least 4 KiB).
    pub fn new(path: impl AsRef<Path>, chunk: usize) -> Self {
        FileSource {
            path: path.as_ref().to_path_buf(),
            file: None,
            offset: 0,
            chunk: chunk.max(4096),
        }
    }

    async fn next(&mut self) -> Result<Option<SourceChunk>, SourceError> {
        let path = self.path.clone();
        let io_err = move |what: &str, e: std::io::Error| {
            SourceError::new("source_io", format!("{what} {}: {e}", path.display()))
        };
        if self.file.is_none() {
            let mut f = tokio::fs::File::open(&self.path)
                .await
                .map_err(|e| io_err("cannot open", e))?;
            f.seek(std::io::SeekFrom::Start(self.offset))
                .await
                .map_err(|e| io_err("cannot seek in", e))?;
            self.file = Some(f);
        }
        let Some(f) = self.file.as_mut() else {
            return Ok(None);
        };
        let mut buf = vec![0u8; self.chunk];
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| io_err("cannot read", e))?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        self.offset += n as u64;
        Ok(Some(SourceChunk::Data(Bytes::from(buf))))
    }
}

impl ImageSource for FileSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn resume_from(&mut self, offset: u64, _etag: Option<&str>) -> Result<(), SourceError> {
        self.offset = offset;
        self.file = None;
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
