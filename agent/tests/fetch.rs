//! The fetching layer against a real server-mock over loopback HTTP, one fault at a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use server_mock::{Fault, FaultRule, LogEntry, Server, ServerHandle};
use update_agent::fetch::{
    build_client, fetch_manifest, Chunk, Download, FetchConfig, FetchError, ManifestSource,
    MinThroughput, Url,
};
use update_agent::install::{ImageSource, SourceChunk};

const IMG: &str = "/images/os.img.zst";
const LEN: usize = 1 << 20;

/// Deterministic, incompressible-looking bytes.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

struct Fixture {
    dir: tempfile::TempDir,
    server: ServerHandle,
    data: Vec<u8>,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("images")).unwrap();
        let data = content(LEN, 7);
        std::fs::write(dir.path().join("images/os.img.zst"), &data).unwrap();
        let server = Server::start(dir.path(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Fixture { dir, server, data }
    }

    fn url(&self, path: &str) -> Url {
        Url::parse(&self.server.url_for(path)).unwrap()
    }

    fn download(&self, expected_len: u64, cfg: FetchConfig) -> Download {
        let client = build_client(&cfg).unwrap();
        Download::new(client, self.url(IMG), expected_len, cfg)
    }

    fn log(&self) -> Vec<LogEntry> {
        self.server.request_log()
    }

    /// The tag the server gives the image: its own rule, not a copy of it.
    fn etag(&self) -> String {
        server_mock::etag_for(
            &std::fs::metadata(self.dir.path().join("images/os.img.zst")).unwrap(),
        )
    }
}

/// Fast retries, short timeouts, no throughput floor unless a test sets one.
fn cfg() -> FetchConfig {
    FetchConfig {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(5),
        overall_timeout: Some(Duration::from_secs(60)),
        max_attempts: 5,
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(50),
        min_throughput: None,
        ca_file: None,
    }
}

/// Read a download to its end like a consumer would: a restart voids what was received.
async fn collect(d: &mut Download) -> Result<(Vec<u8>, u32), FetchError> {
    let mut out = Vec::new();
    let mut restarts = 0;
    let mut start = d.offset();
    while let Some(c) = d.next_chunk().await? {
        match c {
            Chunk::Data(b) => out.extend_from_slice(&b),
            Chunk::Restarted => {
                restarts += 1;
                start = 0;
                out.clear();
            }
        }
    }
    assert_eq!(start + out.len() as u64, d.offset());
    Ok((out, restarts))
}

fn gets(log: &[LogEntry]) -> Vec<&LogEntry> {
    log.iter().filter(|e| e.method == "GET").collect()
}

#[tokio::test]
async fn plain_download_delivers_exactly_the_file() {
    let f = Fixture::new().await;
    let mut d = f.download(LEN as u64, cfg());
    let (data, restarts) = collect(&mut d).await.unwrap();
    assert_eq!(data, f.data);
    assert_eq!(restarts, 0);
    assert_eq!(d.etag(), Some(f.etag().as_str()));
    let log = f.log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].range, None);
    assert_eq!(log[0].bytes_sent, LEN as u64);
    // Calling again after the end stays at the end without another request.
    assert!(d.next_chunk().await.unwrap().is_none());
    assert_eq!(f.log().len(), 1);
}

#[tokio::test]
async fn server_errors_are_retried_until_recovery() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::Status(503)).times(2));
    let mut d = f.download(LEN as u64, cfg());
    let (data, _) = collect(&mut d).await.unwrap();
    assert_eq!(data, f.data);
    let statuses: Vec<u16> = f.log().iter().map(|e| e.status).collect();
    assert_eq!(statuses, vec![503, 503, 200]);
    assert_eq!(d.stats().failures, 2);
    assert_eq!(d.stats().requests, 3);
}

#[tokio::test]
async fn persistent_server_errors_give_up_after_max_attempts() {
    let f = Fixture::new().await;
    f.server.set_fault(FaultRule::new(IMG, Fault::Status(503)));
    let mut d = f.download(
        LEN as u64,
        FetchConfig {
            max_attempts: 3,
            ..cfg()
        },
    );
    let err = collect(&mut d).await.unwrap_err();
    assert_eq!(err.kind(), "http_status");
    assert_eq!(err.status(), Some(503));
    assert_eq!(f.log().len(), 3);
}

#[tokio::test]
async fn client_errors_are_not_retried_but_408_and_429_are() {
    let f = Fixture::new().await;
    let client = build_client(&cfg()).unwrap();
    let mut d = Download::new(client, f.url("/images/missing"), 10, cfg());
    let err = d.next_chunk().await.unwrap_err();
    assert_eq!(err.kind(), "http_status");
    assert_eq!(err.status(), Some(404));
    assert_eq!(f.log().len(), 1, "a 404 must not be retried");

    for code in [429, 408] {
        f.server.clear_log();
        f.server
            .set_fault(FaultRule::new(IMG, Fault::Status(code)).times(1));
        let mut d = f.download(LEN as u64, cfg());
        let (data, _) = collect(&mut d).await.unwrap();
        assert_eq!(data, f.data);
        let statuses: Vec<u16> = f.log().iter().map(|e| e.status).collect();
        assert_eq!(statuses, vec![code, 200]);
    }
}

#[tokio::test]
async fn dropped_connection_resumes_with_a_range_request() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::DropAfter(300_000)).times(1));
    let mut d = f.download(LEN as u64, cfg());
    let (data, restarts) = collect(&mut d).await.unwrap();
    assert_eq!(data, f.data);
    assert_eq!(restarts, 0);
    let log = f.log();
    let gets = gets(&log);
    assert_eq!(gets.len(), 2, "{log:?}");
    assert_eq!(gets[0].faults, vec!["drop_after"]);
    assert!(!gets[0].complete);
    // The resume asks for exactly what is missing, guarded by the ETag...
    let resumed_at: u64 = gets[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("second request has no open range: {:?}", gets[1]));
    assert!(resumed_at > 0 && resumed_at <= 300_000, "{resumed_at}");
    assert_eq!(gets[1].if_range.as_deref(), Some(f.etag().as_str()));
    assert_eq!(gets[1].status, 206);
    // ...and the server sent the tail only: the download did not start over.
    assert_eq!(gets[1].bytes_sent, LEN as u64 - resumed_at);
    let total: u64 = gets.iter().map(|e| e.bytes_sent).sum();
    assert!(total <= LEN as u64 + 300_000, "{total}");
    assert_eq!(d.stats().resumes, 1);
}

#[tokio::test]
async fn truncated_response_is_resumed() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::TruncateAfter(250_000)).times(2));
    let mut d = f.download(LEN as u64, cfg());
    let (data, restarts) = collect(&mut d).await.unwrap();
    assert_eq!(data, f.data);
    assert_eq!(restarts, 0);
    let log = f.log();
    let gets = gets(&log);
    assert_eq!(gets.len(), 3);
    assert_eq!(gets[1].range.as_deref(), Some("bytes=250000-"));
    assert_eq!(gets[2].range.as_deref(), Some("bytes=500000-"));
    assert_eq!(d.stats().resumes, 2);
}

#[tokio::test]
async fn truncation_without_range_support_ends_in_truncated() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::TruncateAfter(10_000)));
    f.server.set_fault(FaultRule::new(IMG, Fault::IgnoreRange));
    let mut d = f.download(
        LEN as u64,
        FetchConfig {
            max_attempts: 3,
            ..cfg()
        },
    );
    let err = collect(&mut d).await.unwrap_err();
    assert_eq!(err.kind(), "truncated", "{err}");
    assert!(
        matches!(err, FetchError::Truncated { got: 10_000, .. }),
        "{err}"
    );
    assert_eq!(f.log().len(), 3);
}

#[tokio::test]
async fn server_ignoring_range_restarts_cleanly() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::DropAfter(100_000)).times(1));
    f.server.set_fault(FaultRule::new(IMG, Fault::IgnoreRange));
    let mut d = f.download(LEN as u64, cfg());
    let (data, restarts) = collect(&mut d).await.unwrap();
    assert_eq!(restarts, 1, "the consumer must be told to reset");
    assert_eq!(data, f.data);
    assert_eq!(d.stats().restarts, 1);
    let log = f.log();
    assert_eq!(log[1].status, 200);
    assert!(log[1].range.is_some());
}

#[tokio::test]
async fn changed_etag_on_resume_restarts_with_the_new_object() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::DropAfter(200_000)).times(1));
    let mut d = f.download(LEN as u64, cfg());
    let first = d.next_chunk().await.unwrap().unwrap();
    assert!(matches!(first, Chunk::Data(_)));
    let old_etag = d.etag().unwrap().to_string();
    // Publish a new object under the same name (new inode, new mtime, same size).
    let new = content(LEN, 99);
    let tmp = f.dir.path().join("images/.new");
    std::fs::write(&tmp, &new).unwrap();
    std::fs::rename(&tmp, f.dir.path().join("images/os.img.zst")).unwrap();
    assert_ne!(f.etag(), old_etag);

    let mut out = match first {
        Chunk::Data(b) => b.to_vec(),
        Chunk::Restarted => unreachable!(),
    };
    let mut restarts = 0;
    while let Some(c) = d.next_chunk().await.unwrap() {
        match c {
            Chunk::Data(b) => out.extend_from_slice(&b),
            Chunk::Restarted => {
                restarts += 1;
                out.clear();
            }
        }
    }
    assert_eq!(restarts, 1);
    assert_eq!(out, new);
    assert_eq!(d.etag(), Some(f.etag().as_str()));
    let log = f.log();
    let gets = gets(&log);
    assert_eq!(gets[1].if_range.as_deref(), Some(old_etag.as_str()));
    assert_eq!(
        gets[1].status, 200,
        "If-Range with the old ETag must get the whole new file"
    );
}

#[tokio::test]
async fn start_at_fetches_only_the_tail() {
    let f = Fixture::new().await;
    let tail = 100_000u64;
    let start = LEN as u64 - tail;
    let mut d = f
        .download(LEN as u64, cfg())
        .start_at(start, Some(f.etag()))
        .unwrap();
    let (data, restarts) = collect(&mut d).await.unwrap();
    assert_eq!(restarts, 0);
    assert_eq!(data, f.data[start as usize..]);
    assert_eq!(d.offset(), LEN as u64);
    let log = f.log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].range, Some(format!("bytes={start}-")));
    assert_eq!(log[0].status, 206);
    assert_eq!(log[0].bytes_sent, tail);
}

#[tokio::test]
async fn start_at_with_a_stale_etag_restarts() {
    let f = Fixture::new().await;
    let mut d = f
        .download(LEN as u64, cfg())
        .start_at(5000, Some("\"stale\"".into()))
        .unwrap();
    assert_eq!(d.next_chunk().await.unwrap(), Some(Chunk::Restarted));
    let (data, _) = collect(&mut d).await.unwrap();
    assert_eq!(data, f.data);
}

#[tokio::test]
async fn start_at_beyond_the_declared_size_is_refused() {
    let f = Fixture::new().await;
    let err = f
        .download(LEN as u64, cfg())
        .start_at(LEN as u64 + 1, None)
        .unwrap_err();
    assert_eq!(err.kind(), "too_long");
    // At exactly the end there is nothing to fetch and no request is made.
    let mut d = f
        .download(LEN as u64, cfg())
        .start_at(LEN as u64, None)
        .unwrap();
    assert_eq!(d.next_chunk().await.unwrap(), None);
    assert!(f.log().is_empty());
}

#[tokio::test]
async fn stalled_server_times_out() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::StallAfter(0)));
    let mut d = f.download(
        LEN as u64,
        FetchConfig {
            read_timeout: Duration::from_millis(300),
            max_attempts: 2,
            ..cfg()
        },
    );
    let t = Instant::now();
    let err = collect(&mut d).await.unwrap_err();
    assert_eq!(err.kind(), "timeout", "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(gets(&f.log()).len(), 2, "one retry after the first stall");
}

#[tokio::test]
async fn stall_once_is_resumed() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::StallAfter(400_000)).times(1));
    let mut d = f.download(
        LEN as u64,
        FetchConfig {
            read_timeout: Duration::from_millis(300),
            ..cfg()
        },
    );
    let (data, _) = collect(&mut d).await.unwrap();
    assert_eq!(data, f.data);
    let log = f.log();
    assert_eq!(log[1].range.as_deref(), Some("bytes=400000-"));
}

#[tokio::test]
async fn a_server_that_stalls_after_every_few_bytes_is_slow_retrieval() {
    // Each attempt brings new bytes, so the retry count alone would never stop this; the
    // throughput window spans reconnections.
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::StallAfter(1000)));
    let mut d = f.download(
        LEN as u64,
        FetchConfig {
            read_timeout: Duration::from_millis(200),
            min_throughput: Some(MinThroughput {
                bytes_per_sec: 20_000,
                window: Duration::from_secs(1),
            }),
            ..cfg()
        },
    );
    let t = Instant::now();
    let err = collect(&mut d).await.unwrap_err();
    assert_eq!(err.kind(), "slow_retrieval", "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(gets(&f.log()).len() >= 3);
}

#[tokio::test]
async fn latency_before_headers_times_out_then_recovers() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::LatencyMs(2000)).times(1));
    let mut d = f.download(
        LEN as u64,
        FetchConfig {
            read_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_millis(300),
            ..cfg()
        },
    );
    let (data, _) = collect(&mut d).await.unwrap();
    assert_eq!(data, f.data);
    assert_eq!(d.stats().failures, 1);
}

#[tokio::test]
async fn bandwidth_below_the_floor_is_slow_retrieval() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::Bandwidth(4000)));
    let mut d = f.download(
        LEN as u64,
        FetchConfig {
            min_throughput: Some(MinThroughput {
                bytes_per_sec: 50_000,
                window: Duration::from_millis(500),
            }),
            ..cfg()
        },
    );
    let t = Instant::now();
    let err = collect(&mut d).await.unwrap_err();
    assert_eq!(err.kind(), "slow_retrieval", "{err}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(gets(&f.log()).len(), 1, "slow retrieval is not retried");
}

#[tokio::test]
async fn bandwidth_above_the_floor_passes() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::Bandwidth(2_000_000)));
    let mut d = f.download(
        LEN as u64,
        FetchConfig {
            min_throughput: Some(MinThroughput {
                bytes_per_sec: 20_000,
                window: Duration::from_millis(300),
            }),
            ..cfg()
        },
    );
    let (data, _) = collect(&mut d).await.unwrap();
    assert_eq!(data, f.data);
}

#[tokio::test]
async fn overall_deadline_bounds_a_slow_transfer() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::Bandwidth(100_000)));
    let mut d = f.download(
        LEN as u64,
        FetchConfig {
            overall_timeout: Some(Duration::from_millis(500)),
            ..cfg()
        },
    );
    let t = Instant::now();
    let err = collect(&mut d).await.unwrap_err();
    assert_eq!(err.kind(), "timeout", "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn file_longer_than_declared_is_too_long_before_reading() {
    let f = Fixture::new().await;
    let mut d = f.download(LEN as u64 - 1000, cfg());
    let err = collect(&mut d).await.unwrap_err();
    assert!(
        matches!(err, FetchError::TooLong { got, .. } if got == LEN as u64),
        "{err}"
    );
    assert_eq!(d.stats().bytes, 0, "rejected from the Content-Length alone");
    assert_eq!(f.log().len(), 1, "too_long is not retried");
}

#[tokio::test]
async fn appended_bytes_are_too_long() {
    let f = Fixture::new().await;
    f.server.set_fault(FaultRule::new(IMG, Fault::Append(10)));
    let mut d = f.download(LEN as u64, cfg());
    assert_eq!(collect(&mut d).await.unwrap_err().kind(), "too_long");
}

#[tokio::test]
async fn resumed_range_longer_than_declared_is_too_long() {
    let f = Fixture::new().await;
    let mut d = f
        .download(LEN as u64 - 10, cfg())
        .start_at(1000, Some(f.etag()))
        .unwrap();
    let err = collect(&mut d).await.unwrap_err();
    assert_eq!(err.kind(), "too_long", "{err}");
}

#[tokio::test]
async fn bytes_beyond_content_length_are_never_delivered() {
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::LyingLength(4096)).times(1));
    let mut d = f.download(LEN as u64, cfg());
    let (data, _) = collect(&mut d).await.unwrap();
    assert_eq!(data, f.data);
    let log = f.log();
    assert_eq!(
        log[0].bytes_sent,
        LEN as u64 + 4096,
        "the server did send extra"
    );
}

#[tokio::test]
async fn shorter_file_than_declared_is_truncated_without_retry() {
    let f = Fixture::new().await;
    let mut d = f.download(LEN as u64 + 1, cfg());
    let err = collect(&mut d).await.unwrap_err();
    assert_eq!(err.kind(), "truncated", "{err}");
    assert_eq!(f.log().len(), 1);
}

#[tokio::test]
async fn refused_connection_is_a_connect_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = FetchConfig {
        max_attempts: 2,
        ..cfg()
    };
    let client = build_client(&c).unwrap();
    let url = Url::parse(&format!("http://127.0.0.1:{port}/x")).unwrap();
    let mut d = Download::new(client, url, 10, c);
    let err = d.next_chunk().await.unwrap_err();
    assert_eq!(err.kind(), "connect", "{err}");
    assert_eq!(d.stats().requests, 2);
}

#[tokio::test]
async fn corrupted_bytes_reach_the_consumer_unchanged() {
    // The fetcher does not hash: it must hand over exactly what arrived so the hash check
    // downstream sees the corruption.
    let f = Fixture::new().await;
    f.server
        .set_fault(FaultRule::new(IMG, Fault::CorruptAt(12345)).times(1));
    let mut d = f.download(LEN as u64, cfg());
    let (data, _) = collect(&mut d).await.unwrap();
    assert_eq!(data.len(), LEN);
    assert_eq!(data[12345], !f.data[12345]);
    assert_eq!(data[..12345], f.data[..12345]);
    assert_eq!(data[12346..], f.data[12346..]);
}

#[tokio::test]
async fn download_works_as_the_install_pipeline_image_source() {
    let f = Fixture::new().await;
    let mut src: Box<dyn ImageSource> = Box::new(f.download(LEN as u64, cfg()));
    src.resume_from(LEN as u64 - 50_000, Some(&f.etag()))
        .unwrap();
    let mut got = Vec::new();
    while let Some(c) = src.next_chunk().await.unwrap() {
        match c {
            SourceChunk::Data(b) => got.extend_from_slice(&b),
            SourceChunk::Restarted => panic!("unexpected restart"),
        }
    }
    assert_eq!(got, f.data[LEN - 50_000..]);
    assert_eq!(src.etag(), Some(f.etag()));
    assert!(src.describe().ends_with(IMG));

    // Errors keep the fetcher's kind.
    f.server.set_fault(FaultRule::new(IMG, Fault::Status(404)));
    let mut src: Box<dyn ImageSource> = Box::new(f.download(LEN as u64, cfg()));
    let err = src.next_chunk().await.unwrap_err();
    assert_eq!(err.kind, "http_status");
}

#[tokio::test]
async fn manifest_within_the_bound_is_read_and_retried() {
    let f = Fixture::new().await;
    std::fs::write(f.dir.path().join("manifest.json"), b"{\"x\":1}").unwrap();
    f.server
        .set_fault(FaultRule::new("/manifest.json", Fault::Status(502)).times(1));
    let client = build_client(&cfg()).unwrap();
    let src = ManifestSource::parse(&f.server.url_for("manifest.json")).unwrap();
    let body = fetch_manifest(&client, &src, 1024, &cfg()).await.unwrap();
    assert_eq!(body, b"{\"x\":1}");
    assert_eq!(f.log().len(), 2);
    // The same bytes from a path.
    let path = f.dir.path().join("manifest.json");
    let src = ManifestSource::parse(path.to_str().unwrap()).unwrap();
    assert_eq!(
        fetch_manifest(&client, &src, 1024, &cfg()).await.unwrap(),
        b"{\"x\":1}"
    );
}

#[tokio::test]
async fn manifest_over_the_bound_is_too_large_without_reading_it() {
    let f = Fixture::new().await;
    let big = 8 << 20;
    std::fs::write(f.dir.path().join("manifest.json"), vec![b' '; big]).unwrap();
    let client = build_client(&cfg()).unwrap();
    let src = ManifestSource::parse(&f.server.url_for("/manifest.json")).unwrap();
    let err = fetch_manifest(&client, &src, 64 * 1024, &cfg())
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::TooLarge { seen, limit: 65536, .. } if seen == big as u64),
        "{err}"
    );
    assert_eq!(f.log().len(), 1, "too_large is not retried");
    assert!(!f.log()[0].complete);
    // One byte over the bound is enough.
    std::fs::write(f.dir.path().join("m2"), vec![b' '; 1025]).unwrap();
    let src = ManifestSource::parse(&f.server.url_for("/m2")).unwrap();
    let err = fetch_manifest(&client, &src, 1024, &cfg())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "too_large");
}

/// A one-connection server that answers with a chunked body of `total` bytes (no
/// Content-Length, so only the streamed bytes can tell the size). Returns its URL and a
/// task yielding how many body bytes it managed to write before the client hung up.
async fn chunked_server(total: usize) -> (Url, tokio::task::JoinHandle<usize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = Url::parse(&format!("http://{}/m", listener.local_addr().unwrap())).unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = vec![0u8; 4096];
        let _ = s.read(&mut head).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let chunk = vec![b'a'; 16 * 1024];
        let mut written = 0;
        while written < total {
            let frame = [
                format!("{:x}\r\n", chunk.len()).into_bytes(),
                chunk.clone(),
                b"\r\n".to_vec(),
            ]
            .concat();
            if s.write_all(&frame).await.is_err() {
                return written;
            }
            written += chunk.len();
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
        written
    });
    (url, task)
}

#[tokio::test]
async fn chunked_manifest_over_the_bound_stops_reading_at_the_bound() {
    let total = 256 << 20;
    let (url, server) = chunked_server(total).await;
    let client = build_client(&cfg()).unwrap();
    let err = fetch_manifest(&client, &ManifestSource::Url(url), 64 * 1024, &cfg())
        .await
        .unwrap_err();
    let FetchError::TooLarge { seen, limit, .. } = err else {
        panic!("{err}");
    };
    assert_eq!(limit, 64 * 1024);
    assert!(seen > limit && seen <= limit + 16 * 1024, "{seen}");
    drop(client);
    let written = server.await.unwrap();
    assert!(written < total / 2, "the client kept reading: {written}");
}

#[tokio::test]
async fn chunked_image_longer_than_declared_is_too_long() {
    let (url, _server) = chunked_server(1 << 20).await;
    let c = cfg();
    let mut d = Download::new(build_client(&c).unwrap(), url, 100_000, c);
    let err = collect(&mut d).await.unwrap_err();
    assert!(
        matches!(err, FetchError::TooLong { expected: 100_000, got, .. } if got <= 100_000 + 16 * 1024),
        "{err}"
    );
    assert!(d.offset() <= 100_000);
}
