//! Streaming an image download: resume by `Range` + `If-Range`, restart when the server
//! cannot resume, retries with backoff, idle/overall deadlines, a throughput floor, and a
//! hard bound at the declared size.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, RANGE};
use tokio::time::Instant;
use tracing::Instrument;

use super::retry::{classify_send, retry_after, Retry};
use super::{redact, FetchConfig, FetchError, MinThroughput, Url};
use crate::install::{ChunkFuture, ImageSource, SourceChunk, SourceError};

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// One step of a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// The next bytes, at [`Download::offset`] minus their length.
    Data(Bytes),
    /// The server could not continue where we were (it ignored `Range`, or the object's
    /// ETag changed): the download starts again from byte 0, and every byte delivered so far
    /// must be forgotten (reset the hash, rewind the writer).
    Restarted,
}

/// Counters for logs and the status report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// HTTP requests sent.
    pub requests: u32,
    /// Failed attempts that were retried or ended the download.
    pub failures: u32,
    /// Responses that continued from a non-zero offset (206).
    pub resumes: u32,
    /// Times the download went back to byte 0 ([`Chunk::Restarted`]).
    pub restarts: u32,
    /// Body bytes received in this process (including bytes later voided by a restart).
    pub bytes: u64,
}

/// A resumable download of exactly `expected_len` bytes.
///
/// `next_chunk` delivers the bytes in order; on a dropped connection it reconnects and asks
/// for the rest (`Range: bytes=N-`, `If-Range: <etag>`), so the consumer never sees a
/// byte twice unless a [`Chunk::Restarted`] came first. It never delivers more than
/// `expected_len` bytes (`too_long`), and a short object ends in `truncated`.
pub struct Download {
    client: reqwest::Client,
    url: Url,
    shown: String,
    expected_len: u64,
    cfg: FetchConfig,
    offset: u64,
    /// Furthest offset reached: only bytes beyond it count as progress for the retry count.
    high_water: u64,
    etag: Option<String>,
    body: Option<Body>,
    /// A restart happened that the consumer has not been told about yet.
    restart_pending: bool,
    retry: Retry,
    stats: FetchStats,
    /// Bytes received, stamped with the transfer clock (see `transfer_clock`).
    window: VecDeque<(Duration, u64)>,
    /// When the first `next_chunk` was called.
    started: Option<Instant>,
    /// Every event of this download is logged inside it (URL, declared size).
    span: tracing::Span,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("url", &self.shown)
            .field("expected_len", &self.expected_len)
            .field("offset", &self.offset)
            .field("etag", &self.etag)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

enum Opened {
    Body(Body),
    /// Ask again at once (the position was reset to 0).
    Again,
    Failed(FetchError, Option<Duration>),
}

impl Download {
    /// A download of `url` that must be exactly `expected_len` bytes (the manifest's size).
    pub fn new(client: reqwest::Client, url: Url, expected_len: u64, cfg: FetchConfig) -> Self {
        let retry = Retry::new(&cfg);
        let shown = redact(&url);
        let span = tracing::info_span!("download", url = %shown, expected_len);
        Self {
            client,
            span,
            shown,
            url,
            expected_len,
            cfg,
            offset: 0,
            high_water: 0,
            etag: None,
            body: None,
            restart_pending: false,
            retry,
            stats: FetchStats::default(),
            window: VecDeque::new(),
            started: None,
        }
    }

    /// Begin at `offset` (bytes the consumer already has, e.g. from a resume record after
    /// the agent restarted). `etag` is the validator those bytes came with: if the server's
    /// object changed since, the download restarts from 0 with [`Chunk::Restarted`].
    pub fn start_at(mut self, offset: u64, etag: Option<String>) -> Result<Self, FetchError> {
        self.set_position(offset, etag)?;
        Ok(self)
    }

    /// Like [`Download::start_at`] on a download in progress (drops the open response).
    pub(crate) fn set_position(
        &mut self,
        offset: u64,
        etag: Option<String>,
    ) -> Result<(), FetchError> {
        if offset > self.expected_len {
            return Err(FetchError::TooLong {
                url: self.shown.clone(),
                expected: self.expected_len,
                got: offset,
            });
        }
        self.offset = offset;
        self.high_water = self.high_water.max(offset);
        self.etag = etag;
        self.body = None;
        self.restart_pending = false;
        Ok(())
    }

    /// Bytes delivered so far (the offset of the next byte).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The declared total size.
    pub fn expected_len(&self) -> u64 {
        self.expected_len
    }

    /// The server's strong ETag for the object being downloaded, once known.
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    pub fn stats(&self) -> FetchStats {
        let mut s = self.stats;
        s.failures = self.retry.total_failures;
        s
    }

    /// The next chunk; `Ok(None)` once exactly `expected_len` bytes have been delivered.
    /// After an error the download may be continued by calling `next_chunk` again.
    pub async fn next_chunk(&mut self) -> Result<Option<Chunk>, FetchError> {
        let span = self.span.clone();
        self.next_chunk_inner().instrument(span).await
    }

    async fn next_chunk_inner(&mut self) -> Result<Option<Chunk>, FetchError> {
        self.retry.start();
        self.started.get_or_insert_with(Instant::now);
        loop {
            if self.restart_pending && self.body.is_some() {
                self.restart_pending = false;
                return Ok(Some(Chunk::Restarted));
            }
            let Some(body) = self.body.as_mut() else {
                if self.offset == self.expected_len {
                    return Ok(None);
                }
                match self.open().await? {
                    Opened::Body(b) => {
                        self.body = Some(b);
                    }
                    Opened::Again => {}
                    Opened::Failed(e, hint) => self.retry.after_failure(&self.url, e, hint).await?,
                }
                continue;
            };
            let wait = self.retry.wait_budget(&self.url, self.cfg.read_timeout)?;
            let failure = match tokio::time::timeout(wait, body.next()).await {
                Err(_) if self.retry.expired() => {
                    self.body = None;
                    return Err(self.retry.overall_timeout(&self.url));
                }
                Err(_) => FetchError::Timeout {
                    url: self.shown.clone(),
                    what: "the next body chunk",
                    after: wait,
                },
                Ok(Some(Ok(bytes))) => {
                    if bytes.is_empty() {
                        continue;
                    }
                    return self.accept(bytes).map(Some);
                }
                Ok(None) if self.offset == self.expected_len => {
                    self.body = None;
                    return Ok(None);
                }
                Ok(None) => FetchError::Truncated {
                    url: self.shown.clone(),
                    expected: self.expected_len,
                    got: self.offset,
                    detail: "the response ended early".into(),
                },
                Ok(Some(Err(e))) if e.is_timeout() => FetchError::Timeout {
                    url: self.shown.clone(),
                    what: "the next body chunk",
                    after: self.cfg.read_timeout,
                },
                Ok(Some(Err(e))) => FetchError::Truncated {
                    url: self.shown.clone(),
                    expected: self.expected_len,
                    got: self.offset,
                    detail: format!("the connection failed mid-body: {e}"),
                },
            };
            self.body = None;
            tracing::info!(offset = self.offset, error = %failure, "download interrupted");
            self.retry.after_failure(&self.url, failure, None).await?;
        }
    }

    fn accept(&mut self, bytes: Bytes) -> Result<Chunk, FetchError> {
        let len = bytes.len() as u64;
        let end = self.offset + len;
        if end > self.expected_len {
            self.body = None;
            return Err(FetchError::TooLong {
                url: self.shown.clone(),
                expected: self.expected_len,
                got: end,
            });
        }
        self.offset = end;
        self.stats.bytes += len;
        if end > self.high_water {
            self.high_water = end;
            self.retry.progressed();
        }
        if let Some(min) = self.cfg.min_throughput {
            self.check_throughput(min, len)?;
        }
        Ok(Chunk::Data(bytes))
    }

    /// Time spent transferring: since the first `next_chunk`, minus backoff sleeps. Waiting
    /// for responses, reconnecting and the consumer's own pauses between calls all count.
    fn transfer_clock(&self) -> Duration {
        self.started
            .map_or(Duration::ZERO, |s| s.elapsed())
            .saturating_sub(self.retry.slept)
    }

    /// Bytes received in the last `window` of transfer time must reach
    /// `bytes_per_sec * window`, checked on every chunk once a whole window has passed.
    /// The window spans reconnections, so a server that stalls, gets dropped and then
    /// dribbles a little more each time cannot keep the download alive forever.
    fn check_throughput(&mut self, min: MinThroughput, len: u64) -> Result<(), FetchError> {
        let now = self.transfer_clock();
        self.window.push_back((now, len));
        while let Some(&(t, _)) = self.window.front() {
            if now.saturating_sub(t) > min.window {
                self.window.pop_front();
            } else {
                break;
            }
        }
        if now < min.window {
            return Ok(());
        }
        let got: u64 = self.window.iter().map(|&(_, n)| n).sum();
        let need = (min.bytes_per_sec as f64 * min.window.as_secs_f64()) as u64;
        if got < need {
            self.body = None;
            return Err(FetchError::SlowRetrieval {
                url: self.shown.clone(),
                bytes: got,
                window: min.window,
                min_bytes_per_sec: min.bytes_per_sec,
            });
        }
        Ok(())
    }

    /// Go back to byte 0 (the consumer is told before the next data).
    fn restart(&mut self, why: &str) {
        if self.offset > 0 {
            self.restart_pending = true;
            self.stats.restarts += 1;
        }
        tracing::warn!(
            offset = self.offset,
            reason = why,
            "restarting the download from byte 0"
        );
        self.offset = 0;
        self.etag = None;
    }

    /// Send one request for the bytes from `offset`. `Err` only for failures that end the
    /// download (bad sizes, deadline); retryable ones come back as `Opened::Failed`.
    async fn open(&mut self) -> Result<Opened, FetchError> {
        let mut req = self.client.get(self.url.clone());
        let ranged = self.offset > 0;
        if ranged {
            req = req.header(RANGE, format!("bytes={}-", self.offset));
            if let Some(tag) = self.etag.as_deref() {
                req = req.header(IF_RANGE, tag);
            }
        }
        if let Some(left) = self.retry.remaining() {
            req = req.timeout(left);
        }
        let wait = self
            .retry
            .wait_budget(&self.url, self.cfg.connect_timeout + self.cfg.read_timeout)?;
        self.stats.requests += 1;
        tracing::debug!(offset = self.offset, etag = ?self.etag, "requesting");
        let resp = match tokio::time::timeout(wait, req.send()).await {
            Err(_) if self.retry.expired() => return Err(self.retry.overall_timeout(&self.url)),
            Err(_) => {
                return Ok(Opened::Failed(
                    FetchError::Timeout {
                        url: self.shown.clone(),
                        what: "the response headers",
                        after: wait,
                    },
                    None,
                ))
            }
            Ok(Err(e)) => {
                return Ok(Opened::Failed(
                    classify_send(&self.url, e, self.cfg.read_timeout),
                    None,
                ))
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        let their_etag = strong_etag(&resp);
        let remaining = self.expected_len - self.offset;
        match status {
            200 => {
                if let Some(cl) = resp.content_length() {
                    self.check_total(cl, "Content-Length")?;
                }
                if ranged {
                    let why = if self.etag.is_some() && their_etag != self.etag {
                        "the object changed (ETag differs)"
                    } else {
                        "the server ignored the Range request"
                    };
                    self.restart(why);
                }
                self.etag = their_etag;
                Ok(Opened::Body(Box::pin(resp.bytes_stream())))
            }
            206 if ranged => {
                if self.etag.is_some() && their_etag.is_some() && their_etag != self.etag {
                    // The server ignored If-Range: the bytes would come from another object.
                    self.restart("the object changed but the server ignored If-Range");
                    return Ok(Opened::Again);
                }
                let (start, total) =
                    parse_content_range(&resp).ok_or_else(|| FetchError::Protocol {
                        url: self.shown.clone(),
                        reason: "206 without a usable Content-Range".into(),
                    })?;
                self.check_total(total, "Content-Range total")?;
                if start != self.offset {
                    return Err(FetchError::Protocol {
                        url: self.shown.clone(),
                        reason: format!(
                            "asked for bytes from {} but got a range starting at {start}",
                            self.offset
                        ),
                    });
                }
                if resp.content_length().is_some_and(|cl| cl > remaining) {
                    return Err(FetchError::TooLong {
                        url: self.shown.clone(),
                        expected: self.expected_len,
                        got: self.offset + resp.content_length().unwrap_or(0),
                    });
                }
                if self.etag.is_none() {
                    self.etag = their_etag;
                }
                self.stats.resumes += 1;
                tracing::info!(offset = self.offset, "resuming with a range request");
                Ok(Opened::Body(Box::pin(resp.bytes_stream())))
            }
            416 => Err(FetchError::Truncated {
                url: self.shown.clone(),
                expected: self.expected_len,
                got: self.offset,
                detail: "the server has no bytes at this offset (416)".into(),
            }),
            _ => {
                let hint = retry_after(&resp);
                let err = if (200..300).contains(&status) {
                    FetchError::Protocol {
                        url: self.shown.clone(),
                        reason: format!("unexpected status {status}"),
                    }
                } else {
                    FetchError::HttpStatus {
                        url: self.shown.clone(),
                        status,
                    }
                };
                Ok(Opened::Failed(err, hint))
            }
        }
    }

    /// The server's idea of the whole object size must be exactly the declared size.
    fn check_total(&self, total: u64, what: &str) -> Result<(), FetchError> {
        if total > self.expected_len {
            return Err(FetchError::TooLong {
                url: self.shown.clone(),
                expected: self.expected_len,
                got: total,
            });
        }
        if total < self.expected_len {
            return Err(FetchError::Truncated {
                url: self.shown.clone(),
                expected: self.expected_len,
                got: total,
                detail: format!("the server's {what} announces only {total} bytes"),
            });
        }
        Ok(())
    }
}

/// The response's ETag when it is a strong one (weak ones cannot be used with If-Range).
fn strong_etag(resp: &reqwest::Response) -> Option<String> {
    strong_etag_value(resp.headers().get(ETAG)?.to_str().ok()?)
}

/// An `ETag` header value when it is a strong one (quoted, no `W/`): the string-level part
/// of [`strong_etag`], public for the fuzz targets.
pub fn strong_etag_value(v: &str) -> Option<String> {
    let v = v.trim();
    (v.starts_with('"') && v.len() >= 2).then(|| v.to_string())
}

/// `Content-Range: bytes START-END/TOTAL` -> (START, TOTAL).
fn parse_content_range(resp: &reqwest::Response) -> Option<(u64, u64)> {
    parse_content_range_value(resp.headers().get(CONTENT_RANGE)?.to_str().ok()?)
}

/// A `Content-Range` header value `bytes START-END/TOTAL` -> (START, TOTAL), `None` unless
/// `START <= END < TOTAL`. Public for the fuzz targets.
pub fn parse_content_range_value(v: &str) -> Option<(u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    let total: u64 = total.trim().parse().ok()?;
    (start <= end && end < total).then_some((start, total))
}

/// The install pipeline reads images through this trait.
impl ImageSource for Download {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn etag(&self) -> Option<String> {
        self.etag.clone()
    }

    fn resume_from(&mut self, offset: u64, etag: Option<&str>) -> Result<(), SourceError> {
        self.set_position(offset, etag.map(str::to_string))
            .map_err(|e| SourceError::new(e.kind(), e))
    }

    fn next_chunk(&mut self) -> ChunkFuture<'_> {
        Box::pin(async move {
            match Download::next_chunk(self).await {
                Ok(Some(Chunk::Data(b))) => Ok(Some(SourceChunk::Data(b))),
                Ok(Some(Chunk::Restarted)) => Ok(Some(SourceChunk::Restarted)),
                Ok(None) => Ok(None),
                Err(e) => Err(SourceError::new(e.kind(), e)),
            }
        })
    }
}
