//! server-mock over real loopback HTTP: ranges, ETags, 416, HEAD, every fault, the admin
//! endpoints and the binary's startup line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use server_mock::{Fault, FaultRule, LogEntry, Server, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LEN: usize = 100_000;

fn content() -> Vec<u8> {
    (0..LEN).map(|i| (i * 7 % 251) as u8).collect()
}

async fn start() -> (tempfile::TempDir, ServerHandle) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    std::fs::write(dir.path().join("images/a.img"), content()).unwrap();
    std::fs::write(dir.path().join("other"), b"other").unwrap();
    let h = Server::start(dir.path(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (dir, h)
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().unwrap()
}

/// What a raw HTTP/1.1 exchange produced: the head, the body bytes, and how the connection
/// ended (`Ok` for a clean EOF, `Err` for a reset or our read timeout).
struct Raw {
    head: String,
    body: Vec<u8>,
    end: std::io::Result<()>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
    fn status(&self) -> u16 {
        self.head.split(' ').nth(1).unwrap().parse().unwrap()
    }
}

async fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Raw {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    let mut buf = vec![0u8; 65536];
    let end = loop {
        match tokio::time::timeout(Duration::from_millis(1500), s.read(&mut buf)).await {
            Err(_) => break Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "stalled")),
            Ok(Err(e)) => break Err(e),
            Ok(Ok(0)) => break Ok(()),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
        }
    };
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(all.len());
    Raw {
        head: String::from_utf8_lossy(&all[..split]).into_owned(),
        body: all[split..].to_vec(),
        end,
    }
}

fn last(h: &ServerHandle) -> LogEntry {
    h.request_log().last().cloned().unwrap()
}

#[tokio::test]
async fn head_and_get_announce_length_etag_and_ranges() {
    let (_d, h) = start().await;
    let c = client();
    let r = c.head(h.url_for("images/a.img")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], LEN.to_string().as_str());
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert!(r.bytes().await.unwrap().is_empty());
    let r = c.get(h.url_for("images/a.img")).send().await.unwrap();
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert_eq!(r.bytes().await.unwrap(), content());
    let log = h.request_log();
    assert_eq!(log.len(), 2);
    assert_eq!((log[0].method.as_str(), log[0].bytes_sent), ("HEAD", 0));
    assert_eq!(log[1].bytes_sent, LEN as u64);
    assert!(log[1].complete);
}

#[tokio::test]
async fn single_ranges_are_served_with_206_and_content_range() {
    let (_d, h) = start().await;
    let c = client();
    let url = h.url_for("images/a.img");
    let data = content();
    for (range, start, end) in [
        ("bytes=10-19", 10, 19),
        ("bytes=99990-", 99_990, LEN - 1),
        ("bytes=-5", LEN - 5, LEN - 1),
        ("bytes=99000-200000", 99_000, LEN - 1),
    ] {
        let r = c.get(&url).header("range", range).send().await.unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes {start}-{end}/{LEN}").as_str()
        );
        assert_eq!(r.bytes().await.unwrap(), data[start..=end], "{range}");
    }
    assert_eq!(last(&h).range.as_deref(), Some("bytes=99000-200000"));
}

#[tokio::test]
async fn unsatisfiable_range_is_416_and_bad_ranges_are_ignored() {
    let (_d, h) = start().await;
    let c = client();
    let url = h.url_for("images/a.img");
    for range in [format!("bytes={LEN}-"), "bytes=-0".to_string()] {
        let r = c.get(&url).header("range", &range).send().await.unwrap();
        assert_eq!(r.status(), 416, "{range}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes */{LEN}").as_str()
        );
    }
    for range in ["bytes=5-3", "bytes=0-1,5-6", "lines=1-2", "bytes=x-"] {
        let r = c.get(&url).header("range", range).send().await.unwrap();
        assert_eq!(r.status(), 200, "{range}");
        assert_eq!(r.bytes().await.unwrap().len(), LEN);
    }
}

#[tokio::test]
async fn if_range_keeps_the_range_only_for_the_current_etag() {
    let (d, h) = start().await;
    let c = client();
    let url = h.url_for("images/a.img");
    let etag = c.head(&url).send().await.unwrap().headers()["etag"]
        .to_str()
        .unwrap()
        .to_string();
    let r = c
        .get(&url)
        .header("range", "bytes=100-")
        .header("if-range", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    let r = c
        .get(&url)
        .header("range", "bytes=100-")
        .header("if-range", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), LEN);
    // Replacing the file changes the ETag, so an old If-Range gets the whole new file.
    let tmp = d.path().join("images/.tmp");
    std::fs::write(&tmp, vec![1u8; LEN]).unwrap();
    std::fs::rename(&tmp, d.path().join("images/a.img")).unwrap();
    let r = c
        .get(&url)
        .header("range", "bytes=100-")
        .header("if-range", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_ne!(r.headers()["etag"], etag.as_str());
    assert_eq!(r.bytes().await.unwrap(), vec![1u8; LEN]);
}

#[tokio::test]
async fn missing_files_traversal_and_other_methods_are_refused() {
    let (_d, h) = start().await;
    let c = client();
    assert_eq!(c.get(h.url_for("nope")).send().await.unwrap().status(), 404);
    assert_eq!(
        c.get(h.url_for("images")).send().await.unwrap().status(),
        404,
        "directories are not served"
    );
    let r = raw(h.addr(), "GET", "/../../etc/passwd", &[]).await;
    assert_eq!(r.status(), 404);
    let r = raw(h.addr(), "GET", "/images/../other", &[]).await;
    assert_eq!(r.status(), 404, "no `..` at all");
    let r = c.post(h.url_for("other")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
}

#[tokio::test]
async fn status_fault_applies_n_times_on_matching_paths_only() {
    let (_d, h) = start().await;
    let c = client();
    h.set_fault(FaultRule::new("/images/*", Fault::Status(503)).times(2));
    let get = |p: &'static str| {
        let c = c.clone();
        let u = h.url_for(p);
        async move { c.get(u).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get("other").await, 200);
    assert_eq!(get("images/a.img").await, 503);
    assert_eq!(get("images/a.img").await, 503);
    assert_eq!(get("images/a.img").await, 200);
    let log = h.request_log();
    assert_eq!(log[1].faults, vec!["status"]);
    assert!(log[3].faults.is_empty());
    h.set_fault(FaultRule::new("/other", Fault::Status(500)));
    for _ in 0..3 {
        assert_eq!(get("other").await, 500);
    }
    h.clear_faults();
    assert_eq!(get("other").await, 200);
}

#[tokio::test]
async fn latency_delays_the_headers() {
    let (_d, h) = start().await;
    h.set_fault(FaultRule::new("/other", Fault::LatencyMs(400)).times(1));
    let t = Instant::now();
    let r = client().get(h.url_for("other")).send().await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(400));
    assert_eq!(r.bytes().await.unwrap(), &b"other"[..]);
}

#[tokio::test]
async fn drop_after_resets_the_connection_after_n_bytes() {
    let (_d, h) = start().await;
    h.set_fault(FaultRule::new("/images/a.img", Fault::DropAfter(30_000)).times(1));
    let r = raw(h.addr(), "GET", "/images/a.img", &[]).await;
    assert_eq!(r.header("content-length"), Some(LEN.to_string()));
    assert!(r.body.len() <= 30_000);
    assert_eq!(r.body[..], content()[..r.body.len()]);
    assert_eq!(
        r.end.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );
    let e = last(&h);
    assert_eq!((e.bytes_sent, e.complete), (30_000, false));
}

#[tokio::test]
async fn truncate_after_closes_cleanly_after_n_bytes_of_the_announced_length() {
    let (_d, h) = start().await;
    h.set_fault(FaultRule::new("/images/a.img", Fault::TruncateAfter(12_345)).times(1));
    let r = raw(h.addr(), "GET", "/images/a.img", &[]).await;
    assert_eq!(r.header("content-length"), Some(LEN.to_string()));
    assert_eq!(r.body, content()[..12_345]);
    assert!(r.end.is_ok(), "FIN, not RST");
    // reqwest sees an incomplete body.
    h.set_fault(FaultRule::new("/images/a.img", Fault::TruncateAfter(12_345)).times(1));
    let resp = client()
        .get(h.url_for("images/a.img"))
        .send()
        .await
        .unwrap();
    assert!(resp.bytes().await.is_err());
}

#[tokio::test]
async fn stall_sends_headers_and_some_bytes_then_nothing() {
    let (_d, h) = start().await;
    h.set_fault(FaultRule::new("/images/a.img", Fault::StallAfter(5000)).times(1));
    let r = raw(h.addr(), "GET", "/images/a.img", &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.body, content()[..5000]);
    assert_eq!(r.end.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    assert!(!last(&h).complete);
}

#[tokio::test]
async fn bandwidth_caps_the_rate() {
    let (_d, h) = start().await;
    h.set_fault(FaultRule::new("/images/a.img", Fault::Bandwidth(200_000)));
    let t = Instant::now();
    let body = client()
        .get(h.url_for("images/a.img"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let took = t.elapsed();
    assert_eq!(body, content());
    // 100 kB at 200 kB/s: half a second, not much less.
    assert!(took >= Duration::from_millis(450), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn corrupt_flips_one_byte_at_a_file_offset_even_in_a_range() {
    let (_d, h) = start().await;
    let c = client();
    h.set_fault(FaultRule::new("/images/a.img", Fault::CorruptAt(50_000)));
    let data = content();
    let body = c
        .get(h.url_for("images/a.img"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let diffs: Vec<usize> = (0..LEN).filter(|&i| body[i] != data[i]).collect();
    assert_eq!(diffs, vec![50_000]);
    assert_eq!(body[50_000], !data[50_000]);
    let body = c
        .get(h.url_for("images/a.img"))
        .header("range", "bytes=49990-50009")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body[10], !data[50_000]);
    assert_eq!(body[..10], data[49_990..50_000]);
}

#[tokio::test]
async fn append_serves_a_longer_file_with_a_matching_length() {
    let (_d, h) = start().await;
    h.set_fault(FaultRule::new("/images/a.img", Fault::Append(100)));
    let r = client()
        .get(h.url_for("images/a.img"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.content_length(), Some(LEN as u64 + 100));
    let body = r.bytes().await.unwrap();
    assert_eq!(body[..LEN], content()[..]);
    assert_eq!(body.len(), LEN + 100);
}

#[tokio::test]
async fn lying_length_sends_more_than_content_length() {
    let (_d, h) = start().await;
    h.set_fault(FaultRule::new("/images/a.img", Fault::LyingLength(64)).times(1));
    let r = raw(h.addr(), "GET", "/images/a.img", &[]).await;
    assert_eq!(r.header("content-length"), Some(LEN.to_string()));
    assert_eq!(r.body.len(), LEN + 64);
    assert_eq!(r.body[..LEN], content()[..]);
    assert_eq!(last(&h).faults, vec!["lying_length"]);
    // Used up: the next request is normal.
    let r = raw(h.addr(), "GET", "/images/a.img", &[]).await;
    assert_eq!(r.body.len(), LEN);
}

#[tokio::test]
async fn lying_length_also_reaches_clients_on_kept_alive_connections() {
    // A connection opened before the fault was armed is closed after its next response, so
    // the request after that starts a new connection and gets the raw answer.
    let (_d, h) = start().await;
    let c = client();
    let get = || async {
        let r = c.get(h.url_for("other")).send().await.unwrap();
        r.bytes().await.map(|b| b.len())
    };
    assert_eq!(get().await.unwrap(), 5);
    h.set_fault(FaultRule::new("/other", Fault::LyingLength(3)).times(1));
    let mut lens = Vec::new();
    for _ in 0..3 {
        lens.push(get().await.unwrap());
    }
    assert_eq!(lens, vec![5, 5, 5], "the client reads Content-Length bytes");
    let used: usize = h
        .request_log()
        .iter()
        .filter(|e| e.faults == vec!["lying_length"])
        .count();
    assert_eq!(used, 1);
}

#[tokio::test]
async fn ignore_range_answers_200_with_everything() {
    let (_d, h) = start().await;
    h.set_fault(FaultRule::new("/images/a.img", Fault::IgnoreRange));
    let r = client()
        .get(h.url_for("images/a.img"))
        .header("range", "bytes=10-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), LEN);
}

#[tokio::test]
async fn admin_endpoints_script_faults_and_read_the_log() {
    let (_d, h) = start().await;
    let c = client();
    let admin = |p: &str| format!("{}/_admin/{p}", h.url());
    let r = c
        .post(admin("faults"))
        .header("content-type", "application/json")
        .body(r#"{"path":"/other","times":1,"fault":{"status":502}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let listed: Vec<FaultRule> = c
        .get(admin("faults"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap();
    assert_eq!(
        listed,
        vec![FaultRule::new("/other", Fault::Status(502)).times(1)]
    );
    assert_eq!(
        c.get(h.url_for("other")).send().await.unwrap().status(),
        502
    );
    assert_eq!(
        c.get(h.url_for("other")).send().await.unwrap().status(),
        200
    );
    let log: Vec<LogEntry> = c
        .get(admin("log"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap();
    assert_eq!(
        log.iter().map(|e| e.status).collect::<Vec<_>>(),
        vec![502, 200],
        "admin requests are not logged"
    );
    assert_eq!(log, h.request_log());

    let bad = c
        .post(admin("faults"))
        .header("content-type", "application/json")
        .body(r#"{"path":"/other","fault":{"explode":1}}"#)
        .send()
        .await
        .unwrap();
    assert!(bad.status().is_client_error(), "{}", bad.status());
    assert!(bad.text().await.unwrap().contains("explode"));
    for body in [
        r#"{"path":"/other","fault":{"status":42}}"#,
        r#"{"path":"/other","times":0,"fault":{"status":500}}"#,
    ] {
        let bad = c
            .post(admin("faults"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400, "{body}");
    }

    c.post(admin("faults"))
        .header("content-type", "application/json")
        .body(r#"{"path":"*","fault":{"status":500}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        c.delete(admin("faults")).send().await.unwrap().status(),
        204
    );
    assert_eq!(
        c.get(h.url_for("other")).send().await.unwrap().status(),
        200
    );
    assert_eq!(c.delete(admin("log")).send().await.unwrap().status(), 204);
    assert!(h.request_log().is_empty());
}

#[tokio::test]
async fn start_errors_name_the_problem() {
    let err = Server::start("/nonexistent/repo", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "repo_dir");
    assert!(err.to_string().contains("/nonexistent/repo"));
    let (d, h) = start().await;
    let err = Server::start(d.path(), h.addr()).await.unwrap_err();
    assert_eq!(err.kind(), "bind");
}

#[test]
fn binary_prints_its_address_first_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.json"), b"{}").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_server-mock"))
        .args([
            "--dir",
            dir.path().to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = rt.block_on(async {
        client()
            .get(format!("{url}/m.json"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(body, &b"{}"[..]);
}
