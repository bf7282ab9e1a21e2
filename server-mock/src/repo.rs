//! Serving the repository directory: path resolution, ETags, `Range` / `If-Range`, and the
//! response body stream that the body-shaping faults act on.

use std::io::{self, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::Stream;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::faults::BodyPlan;
use crate::log::{EntryHandle, RequestLog};

/// Largest chunk the body stream hands to the connection at once.
const CHUNK: usize = 64 * 1024;
/// Pause before cutting a body served through hyper (see `next_chunk`).
const CUT_PAUSE: Duration = Duration::from_millis(200);
/// The byte appended by the `append` and `lying_length` faults.
pub(crate) const FILLER: u8 = 0x5a;

/// What to answer to one GET or HEAD on a repository path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// 200 or 206 with a body of `len` bytes starting at file offset `start`.
    File {
        path: PathBuf,
        status: u16,
        start: u64,
        len: u64,
        total: u64,
        etag: String,
    },
    /// 416: the range starts at or beyond the end of the file.
    Unsatisfiable { total: u64, etag: String },
    /// 404 (also for directories and paths that try to leave the repository).
    NotFound,
}

impl Answer {
    /// Status line code and headers (without Content-Length for files, which the caller
    /// computes because faults may change the length).
    pub(crate) fn status(&self) -> u16 {
        match self {
            Answer::File { status, .. } => *status,
            Answer::Unsatisfiable { .. } => 416,
            Answer::NotFound => 404,
        }
    }
}

/// Map a URL path to a file inside `root`, refusing anything that could leave it.
pub(crate) fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let rel = url_path.trim_start_matches('/');
    if rel.is_empty() || rel.contains('\\') || rel.contains('\0') {
        return None;
    }
    let rel = Path::new(rel);
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(root.join(rel))
}

/// Strong ETag from inode, size and modification time (as Apache does): it changes whenever
/// the file is replaced (a new inode, even within one tick of the file system's coarse clock)
/// or rewritten.
pub fn etag_for(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("\"{:x}-{:x}-{:x}\"", meta.ino(), meta.len(), mtime)
}

/// A parsed single byte range, before it is checked against the file length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteRange {
    /// `bytes=a-b` or `bytes=a-` (`end` inclusive).
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// Parse a `Range` header. `None` for anything but one well-formed byte range: such a header
/// is ignored (RFC 9110 14.2 allows serving the whole file), multi-range included.
pub(crate) fn parse_range(value: &str) -> Option<ByteRange> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return b.parse().ok().map(ByteRange::Suffix);
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        None
    } else {
        let e: u64 = b.parse().ok()?;
        if e < start {
            return None;
        }
        Some(e)
    };
    Some(ByteRange::From { start, end })
}

/// Decide the answer for a request on `url_path`, given its `Range` and `If-Range` headers.
pub(crate) async fn answer(
    root: &Path,
    url_path: &str,
    range: Option<&str>,
    if_range: Option<&str>,
    ignore_range: bool,
) -> Answer {
    let Some(path) = resolve(root, url_path) else {
        return Answer::NotFound;
    };
    let Ok(meta) = tokio::fs::metadata(&path).await else {
        return Answer::NotFound;
    };
    if !meta.is_file() {
        return Answer::NotFound;
    }
    let total = meta.len();
    let etag = etag_for(&meta);
    let whole = Answer::File {
        path: path.clone(),
        status: 200,
        start: 0,
        len: total,
        total,
        etag: etag.clone(),
    };
    if ignore_range {
        return whole;
    }
    let Some(range) = range.and_then(parse_range) else {
        return whole;
    };
    // If-Range: only an exact strong ETag match keeps the range; a weak tag or a date never
    // matches (we send no Last-Modified), so the client gets the whole current file.
    if let Some(v) = if_range {
        if v.trim() != etag {
            return whole;
        }
    }
    let (start, end) = match range {
        ByteRange::From { start, end } => {
            if start >= total {
                return Answer::Unsatisfiable { total, etag };
            }
            (start, end.map_or(total - 1, |e| e.min(total - 1)))
        }
        ByteRange::Suffix(n) => {
            if n == 0 || total == 0 {
                return Answer::Unsatisfiable { total, etag };
            }
            (total - n.min(total), total - 1)
        }
    };
    Answer::File {
        path,
        status: 206,
        start,
        len: end - start + 1,
        total,
        etag,
    }
}

/// Headers for an answer: `(name, value)` pairs; `body_len` is the Content-Length to announce.
pub(crate) fn headers(answer: &Answer, body_len: u64) -> Vec<(&'static str, String)> {
    let mut h = vec![("accept-ranges", "bytes".to_string())];
    match answer {
        Answer::File {
            status,
            start,
            len,
            total,
            etag,
            ..
        } => {
            h.push(("content-type", "application/octet-stream".into()));
            h.push(("etag", etag.clone()));
            if *status == 206 {
                let last = (start + len).saturating_sub(1);
                h.push(("content-range", format!("bytes {start}-{last}/{total}")));
            }
            h.push(("content-length", body_len.to_string()));
        }
        Answer::Unsatisfiable { total, etag } => {
            h.push(("etag", etag.clone()));
            h.push(("content-range", format!("bytes */{total}")));
            h.push(("content-length", "0".into()));
        }
        Answer::NotFound => {
            h.push(("content-type", "text/plain".into()));
            h.push(("content-length", body_len.to_string()));
        }
    }
    h
}

struct BodyState {
    file: Option<tokio::fs::File>,
    path: PathBuf,
    /// File offset of the next byte to read.
    pos: u64,
    /// File bytes still to send.
    file_left: u64,
    /// Filler bytes still to send after the file.
    extra_left: u64,
    plan: BodyPlan,
    sent: u64,
    started: Instant,
    log: RequestLog,
    entry: EntryHandle,
    finished: bool,
    pause_before_cut: bool,
}

/// What a body stream sends: `len` file bytes from `start`, then `extra` filler bytes (the
/// `append` / `lying_length` faults), shaped by `plan`.
#[derive(Debug, Clone)]
pub(crate) struct BodySpec {
    pub path: PathBuf,
    pub start: u64,
    pub len: u64,
    pub extra: u64,
    pub plan: BodyPlan,
    /// Served through hyper (pause before cutting the body, see `next_chunk`).
    pub via_hyper: bool,
}

/// The body of a file answer as a stream of chunks with the body faults applied; bytes
/// produced are counted in the log entry.
pub(crate) fn body_stream(
    spec: BodySpec,
    log: RequestLog,
    entry: EntryHandle,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let BodySpec {
        path,
        start,
        len,
        extra,
        plan,
        via_hyper,
    } = spec;
    let state = BodyState {
        file: None,
        path,
        pos: start,
        file_left: len,
        extra_left: extra,
        plan,
        sent: 0,
        started: Instant::now(),
        log,
        entry,
        finished: false,
        pause_before_cut: via_hyper,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        match next_chunk(&mut st).await {
            Ok(Some(b)) => Some((Ok(b), st)),
            Ok(None) => {
                st.finished = true;
                let done = st.file_left + st.extra_left == 0;
                st.log.update(st.entry, |e| e.complete |= done);
                None
            }
            Err(e) => {
                st.finished = true;
                Some((Err(e), st))
            }
        }
    })
}

async fn next_chunk(st: &mut BodyState) -> io::Result<Option<Bytes>> {
    let p = st.plan;
    let cut = p.drop_after.is_some_and(|n| st.sent >= n)
        || p.truncate_after.is_some_and(|n| st.sent >= n);
    if cut && st.pause_before_cut {
        // hyper aborts without flushing what it buffered: give it time to write the bytes
        // already produced (the raw path writes them itself and needs no pause).
        tokio::time::sleep(CUT_PAUSE).await;
    }
    if p.drop_after.is_some_and(|n| st.sent >= n) {
        tracing::info!(path = %st.path.display(), sent = st.sent, "fault: dropping connection");
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "fault drop_after",
        ));
    }
    if p.truncate_after.is_some_and(|n| st.sent >= n) {
        tracing::info!(path = %st.path.display(), sent = st.sent, "fault: truncating body");
        return Ok(None);
    }
    if p.stall_after.is_some_and(|n| st.sent >= n) {
        tracing::info!(path = %st.path.display(), sent = st.sent, "fault: stalling");
        std::future::pending::<()>().await;
    }
    let left = st.file_left + st.extra_left;
    if left == 0 {
        return Ok(None);
    }
    let mut want = left.min(CHUNK as u64);
    for limit in [p.drop_after, p.truncate_after, p.stall_after]
        .into_iter()
        .flatten()
    {
        want = want.min(limit - st.sent);
    }
    if let Some(bw) = p.bandwidth {
        // Small chunks (about 20 per second) keep the rate smooth at the client.
        want = want.min((bw / 20).max(1));
    }
    let mut buf = vec![0u8; usize::try_from(want).unwrap_or(CHUNK)];
    if st.file_left > 0 {
        let n = buf
            .len()
            .min(usize::try_from(st.file_left).unwrap_or(CHUNK));
        if st.file.is_none() {
            let mut f = tokio::fs::File::open(&st.path).await?;
            f.seek(SeekFrom::Start(st.pos)).await?;
            st.file = Some(f);
        }
        if let Some(f) = st.file.as_mut() {
            f.read_exact(&mut buf[..n]).await?;
        }
        if let Some(at) = p.corrupt_at {
            if at >= st.pos && at < st.pos + n as u64 {
                let i = usize::try_from(at - st.pos).unwrap_or(0);
                buf[i] ^= 0xff;
            }
        }
        st.pos += n as u64;
        st.file_left -= n as u64;
        buf.truncate(n);
    } else {
        buf.fill(FILLER);
        st.extra_left -= buf.len() as u64;
    }
    let n = buf.len() as u64;
    st.sent += n;
    if let Some(bw) = p.bandwidth {
        let due = st.started + Duration::from_secs_f64(st.sent as f64 / bw as f64);
        tokio::time::sleep_until(due.into()).await;
    }
    // hyper stops polling once Content-Length is reached, so completeness is recorded here.
    let done = st.file_left + st.extra_left == 0;
    st.log.update(st.entry, |e| {
        e.bytes_sent += n;
        e.complete |= done;
    });
    Ok(Some(Bytes::from(buf)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn ranges_parse() {
        assert_eq!(
            parse_range("bytes=0-9"),
            Some(ByteRange::From {
                start: 0,
                end: Some(9)
            })
        );
        assert_eq!(
            parse_range("bytes=5-"),
            Some(ByteRange::From {
                start: 5,
                end: None
            })
        );
        assert_eq!(parse_range("bytes=-3"), Some(ByteRange::Suffix(3)));
        assert_eq!(parse_range("bytes=9-3"), None);
        assert_eq!(parse_range("bytes=0-1,4-5"), None);
        assert_eq!(parse_range("items=0-1"), None);
        assert_eq!(parse_range("bytes=x-"), None);
    }

    #[test]
    fn paths_stay_inside() {
        let root = Path::new("/srv/repo");
        assert_eq!(
            resolve(root, "/a/b.img"),
            Some(PathBuf::from("/srv/repo/a/b.img"))
        );
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/a/../../x"), None);
        assert_eq!(resolve(root, "/"), None);
        assert_eq!(
            resolve(root, "/a/./b"),
            Some(PathBuf::from("/srv/repo/a/b"))
        );
    }
}
