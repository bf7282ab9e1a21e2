//! FleetLock client conformance: the exact request (method, path, header, JSON body) as
//! airlock expects it, base URLs with and without a trailing slash or a path prefix, status
//! codes and error bodies, idempotent retries against server-mock's FleetLock, and transport
//! and URL errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use update_agent::fleet::lock::FleetLockClient;
use update_agent::fleet::FleetError;

/// One request as the server saw it.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A one-shot HTTP server: answers the first request with `status` and `body`, returns what
/// it saw.
async fn one_shot(status: u16, body: &'static str) -> (SocketAddr, tokio::task::JoinHandle<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "client closed before sending a request");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap().split(' ');
        let method = first.next().unwrap().to_string();
        let path = first.next().unwrap().to_string();
        let headers: BTreeMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .get("content-length")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let reply = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(reply.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        Seen {
            method,
            path,
            headers,
            body: buf[head_end..head_end + len].to_vec(),
        }
    });
    (addr, task)
}

fn client(base: &str) -> FleetLockClient {
    FleetLockClient::new(base, "node-1", "workers", Duration::from_secs(5)).unwrap()
}

#[tokio::test]
async fn request_is_exactly_what_airlock_expects() {
    for op in ["pre-reboot", "steady-state"] {
        let (addr, seen) = one_shot(200, "").await;
        let c = client(&format!("http://{addr}"));
        match op {
            "pre-reboot" => c.pre_reboot().await.unwrap(),
            _ => c.steady_state().await.unwrap(),
        }
        let seen = seen.await.unwrap();
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.path, format!("/v1/{op}"));
        assert_eq!(
            seen.headers.get("fleet-lock-protocol").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            seen.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"client_params": {"id": "node-1", "group": "workers"}})
        );
    }
}

#[tokio::test]
async fn base_url_with_or_without_trailing_slash_and_prefix() {
    for (base, want) in [
        ("", "/v1/pre-reboot"),
        ("/", "/v1/pre-reboot"),
        ("/fleet", "/fleet/v1/pre-reboot"),
        ("/fleet/", "/fleet/v1/pre-reboot"),
        ("/a/b", "/a/b/v1/pre-reboot"),
    ] {
        let (addr, seen) = one_shot(200, "").await;
        let c = client(&format!("http://{addr}{base}"));
        assert_eq!(c.endpoint("pre-reboot"), format!("http://{addr}{want}"));
        c.pre_reboot().await.unwrap();
        assert_eq!(seen.await.unwrap().path, want, "base {base:?}");
    }
}

#[tokio::test]
async fn refusals_carry_status_kind_and_value() {
    let (addr, _seen) = one_shot(409, r#"{"kind":"failed_lock","value":"semaphore full"}"#).await;
    let e = client(&format!("http://{addr}"))
        .pre_reboot()
        .await
        .unwrap_err();
    match &e {
        FleetError::LockRefused {
            status,
            kind,
            value,
            op,
            ..
        } => {
            assert_eq!(
                (*status, kind.as_str(), value.as_str(), *op),
                (409, "failed_lock", "semaphore full", "pre-reboot")
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(e.kind(), "fleetlock_refused");
    assert!(e.to_string().contains("semaphore full"), "{e}");

    // Not JSON: the text is kept as the value, the kind is unknown.
    let (addr, _seen) = one_shot(500, "internal trouble").await;
    let e = client(&format!("http://{addr}"))
        .steady_state()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, FleetError::LockRefused { status: 500, kind, value, .. } if kind == "unknown" && value == "internal trouble"),
        "{e:?}"
    );

    // Any other 2xx is not a grant: only 200 is.
    let (addr, _seen) = one_shot(204, "").await;
    let e = client(&format!("http://{addr}"))
        .pre_reboot()
        .await
        .unwrap_err();
    assert!(
        matches!(e, FleetError::LockRefused { status: 204, .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn idempotent_against_server_mock() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_mock::Server::start(dir.path(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    server
        .fleetlock()
        .configure(server_mock::FleetLockSettings {
            default_slots: 1,
            groups: BTreeMap::new(),
            ttl_ms: None,
        });
    let a = FleetLockClient::new(
        &format!("{}/", server.url()),
        "a",
        "workers",
        Duration::from_secs(5),
    )
    .unwrap();
    let b = FleetLockClient::new(&server.url(), "b", "workers", Duration::from_secs(5)).unwrap();
    a.pre_reboot().await.unwrap();
    a.pre_reboot().await.unwrap(); // a retry after a lost answer is granted again
    assert_eq!(server.fleetlock().holders("workers"), vec!["a"]);
    let e = b.pre_reboot().await.unwrap_err();
    assert!(
        matches!(&e, FleetError::LockRefused { status: 409, kind, .. } if kind == "failed_lock"),
        "{e:?}"
    );
    a.steady_state().await.unwrap();
    a.steady_state().await.unwrap(); // releasing twice is fine
    b.pre_reboot().await.unwrap();
    assert_eq!(server.fleetlock().holders("workers"), vec!["b"]);
    assert_eq!(server.fleetlock().max_holders("workers"), 1);
}

#[tokio::test]
async fn transport_and_url_errors() {
    // A port nothing listens on.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let e = client(&format!("http://{addr}"))
        .pre_reboot()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "fleetlock_http");
    assert!(e.to_string().contains("pre-reboot"), "{e}");

    for bad in ["ftp://x/", "not a url", "http://x/?a=b"] {
        let e = FleetLockClient::new(bad, "n", "g", Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.kind(), "fleetlock_url", "{bad}");
        assert!(e.to_string().contains(bad), "{e}");
    }
}
