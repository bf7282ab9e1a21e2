//! The raw-TCP side: reading a request head before hyper sees the connection, putting the
//! bytes back for hyper, and answering the faults hyper cannot produce (a body longer than
//! its Content-Length).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::faults::{BodyPlan, Fault};
use crate::log::LogEntry;
use crate::repo::{self, Answer};
use crate::AppState;

/// A request head bigger than this is left to hyper (which rejects it).
const MAX_HEAD: usize = 16 * 1024;
/// How long to wait for the first request head before handing the connection to hyper.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The parts of a request head the raw path needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawRequest {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
}

/// Bytes read from the connection and, when they held a complete head, the parsed request.
#[derive(Debug)]
pub(crate) struct Head {
    pub bytes: Bytes,
    pub request: Option<RawRequest>,
}

/// A client connection: plain TCP, or TLS over TCP (`--tls-cert`).
pub(crate) trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Make the next close a reset (RST) rather than a clean FIN.
    fn set_reset_on_close(&self);
}

impl Conn for TcpStream {
    fn set_reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }
}

impl Conn for tokio_rustls::server::TlsStream<TcpStream> {
    fn set_reset_on_close(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

/// Read until the end of the first request head (or EOF, error, size limit, timeout).
pub(crate) async fn read_head<S: Conn>(stream: &mut S) -> Head {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            if let Some(end) = find_head_end(&buf) {
                return Some(end);
            }
            if buf.len() >= MAX_HEAD {
                return None;
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    };
    let end = tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .ok()
        .flatten();
    let request = end.and_then(|end| parse_head(&buf[..end]));
    Head {
        bytes: buf.freeze(),
        request,
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn parse_head(head: &[u8]) -> Option<RawRequest> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    let (mut range, mut if_range) = (None, None);
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            } else if k.eq_ignore_ascii_case("if-range") {
                if_range = Some(v.trim().to_string());
            }
        }
    }
    Some(RawRequest {
        method,
        path,
        range,
        if_range,
    })
}

/// A stream that first yields bytes already read from it.
#[derive(Debug)]
pub(crate) struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: Conn> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: Conn> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The faults that act before the body: latency, an injected status, ignoring Range.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Pre {
    pub latency_ms: Option<u64>,
    pub status: Option<u16>,
    pub ignore_range: bool,
}

impl Pre {
    pub(crate) fn from_faults(faults: &[Fault]) -> Self {
        let mut p = Pre::default();
        for f in faults {
            match *f {
                Fault::LatencyMs(ms) => p.latency_ms = Some(ms),
                Fault::Status(code) => p.status = Some(code),
                Fault::IgnoreRange => p.ignore_range = true,
                _ => {}
            }
        }
        p
    }
}

/// Answer one request without hyper, applying every matching fault, then close.
pub(crate) async fn respond<S: Conn>(mut stream: S, req: &RawRequest, state: &AppState) {
    let faults = state.faults.take_for(&req.path, true);
    let entry = state.log.push(LogEntry {
        method: req.method.clone(),
        path: req.path.clone(),
        range: req.range.clone(),
        if_range: req.if_range.clone(),
        status: 0,
        bytes_sent: 0,
        complete: false,
        faults: faults.iter().map(|f| f.name().to_string()).collect(),
    });
    let pre = Pre::from_faults(&faults);
    if let Some(ms) = pre.latency_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(code) = pre.status {
        let body = format!("injected fault: status {code}\n");
        let head = status_head(code, &[("content-length", body.len().to_string())]);
        state.log.update(entry, |e| {
            e.status = code;
            e.complete = true;
        });
        let _ = stream.write_all(head.as_bytes()).await;
        if req.method != "HEAD" {
            let _ = stream.write_all(body.as_bytes()).await;
        }
        let _ = stream.shutdown().await;
        return;
    }
    let answer = repo::answer(
        &state.root,
        &req.path,
        req.range.as_deref(),
        req.if_range.as_deref(),
        pre.ignore_range,
    )
    .await;
    let plan = BodyPlan::from_faults(&faults);
    let status = answer.status();
    state.log.update(entry, |e| e.status = status);
    let Answer::File {
        path, start, len, ..
    } = &answer
    else {
        let head = status_head(status, &repo::headers(&answer, 0));
        state.log.update(entry, |e| e.complete = true);
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.shutdown().await;
        return;
    };
    // Content-Length counts the file and any `append` bytes, but not the `lying_length` ones.
    let head = status_head(status, &repo::headers(&answer, len + plan.append));
    if stream.write_all(head.as_bytes()).await.is_err() || req.method == "HEAD" {
        state.log.update(entry, |e| e.complete = true);
        let _ = stream.shutdown().await;
        return;
    }
    let mut body = std::pin::pin!(repo::body_stream(
        repo::BodySpec {
            path: path.clone(),
            start: *start,
            len: *len,
            extra: plan.append + plan.lying_extra,
            plan,
            via_hyper: false,
        },
        state.log.clone(),
        entry,
    ));
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(b) => {
                if stream.write_all(&b).await.is_err() {
                    return;
                }
            }
            Err(_) => {
                // drop_after: reset rather than close cleanly.
                stream.set_reset_on_close();
                return;
            }
        }
    }
    let _ = stream.shutdown().await;
}

fn status_head(status: u16, headers: &[(&str, String)]) -> String {
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("connection: close\r\n\r\n");
    head
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn head_parses() {
        let h = b"GET /a/b?x=1 HTTP/1.1\r\nHost: x\r\nRange: bytes=1-\r\nif-range: \"e\"\r\n\r\n";
        let end = find_head_end(h).unwrap();
        assert_eq!(end, h.len());
        let r = parse_head(&h[..end]).unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/a/b");
        assert_eq!(r.range.as_deref(), Some("bytes=1-"));
        assert_eq!(r.if_range.as_deref(), Some("\"e\""));
    }
}
