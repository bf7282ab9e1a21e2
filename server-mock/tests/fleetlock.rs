//! server-mock's FleetLock endpoint and status reports over loopback HTTP: the header and body
//! checks, slot limits per group, idempotent take/release, the TTL for dead holders, the admin
//! view and release, and the fleet summary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use server_mock::{FleetLockSettings, Server, ServerHandle};

async fn start() -> (tempfile::TempDir, ServerHandle) {
    let dir = tempfile::tempdir().unwrap();
    let h = Server::start(dir.path(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (dir, h)
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().unwrap()
}

async fn call(
    h: &ServerHandle,
    op: &str,
    id: &str,
    group: &str,
) -> (u16, Option<serde_json::Value>) {
    let resp = client()
        .post(h.url_for(&format!("v1/{op}")))
        .header("fleet-lock-protocol", "true")
        .header("content-type", "application/json")
        .body(
            serde_json::to_vec(&serde_json::json!({"client_params": {"id": id, "group": group}}))
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).ok())
}

#[tokio::test]
async fn slots_are_limited_per_group_and_idempotent_per_id() {
    let (_d, h) = start().await;
    h.fleetlock().configure(FleetLockSettings {
        default_slots: 1,
        groups: BTreeMap::from([("workers".to_string(), 2)]),
        ttl_ms: None,
    });
    assert_eq!(call(&h, "pre-reboot", "a", "workers").await.0, 200);
    assert_eq!(
        call(&h, "pre-reboot", "a", "workers").await.0,
        200,
        "retake"
    );
    assert_eq!(call(&h, "pre-reboot", "b", "workers").await.0, 200);
    let (status, body) = call(&h, "pre-reboot", "c", "workers").await;
    assert_eq!(status, 409);
    let body = body.expect("error body is JSON");
    assert_eq!(body["kind"], "failed_lock");
    assert!(
        body["value"].as_str().unwrap().contains("workers"),
        "{body}"
    );
    // Other groups are independent and use the default count.
    assert_eq!(call(&h, "pre-reboot", "c", "db").await.0, 200);
    assert_eq!(call(&h, "pre-reboot", "d", "db").await.0, 409);

    assert_eq!(call(&h, "steady-state", "a", "workers").await.0, 200);
    assert_eq!(
        call(&h, "steady-state", "a", "workers").await.0,
        200,
        "re-release"
    );
    assert_eq!(call(&h, "pre-reboot", "c", "workers").await.0, 200);
    assert_eq!(h.fleetlock().holders("workers"), vec!["b", "c"]);
    assert_eq!(h.fleetlock().max_holders("workers"), 2);
    let refused = h
        .fleetlock()
        .events()
        .iter()
        .filter(|e| e.status == 409)
        .count();
    assert_eq!(refused, 2);
}

#[tokio::test]
async fn header_and_body_are_checked() {
    let (_d, h) = start().await;
    let c = client();
    let body = serde_json::json!({"client_params": {"id": "a", "group": "default"}});
    let resp = c
        .post(h.url_for("v1/pre-reboot"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let err: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(err["kind"], "missing_protocol_header");
    assert!(h.fleetlock().holders("default").is_empty());

    for (bad, kind) in [
        (serde_json::json!({"id": "a"}), "bad_body"),
        (
            serde_json::json!({"client_params": {"id": "", "group": "default"}}),
            "bad_id",
        ),
        (
            serde_json::json!({"client_params": {"id": "a", "group": "no spaces"}}),
            "bad_group",
        ),
    ] {
        let resp = c
            .post(h.url_for("v1/pre-reboot"))
            .header("fleet-lock-protocol", "true")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&bad).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{bad}");
        let err: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
        assert_eq!(err["kind"], kind, "{bad}");
    }
    assert!(h.fleetlock().holders("default").is_empty());
}

#[tokio::test]
async fn a_dead_holder_loses_its_slot_after_the_ttl() {
    let (_d, h) = start().await;
    h.fleetlock().configure(FleetLockSettings {
        default_slots: 1,
        groups: BTreeMap::new(),
        ttl_ms: Some(200),
    });
    assert_eq!(call(&h, "pre-reboot", "dead", "default").await.0, 200);
    assert_eq!(call(&h, "pre-reboot", "next", "default").await.0, 409);
    // The TTL is the property under test: wait it out, then the slot is free.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(call(&h, "pre-reboot", "next", "default").await.0, 200);
    assert_eq!(h.fleetlock().holders("default"), vec!["next"]);
}

#[tokio::test]
async fn admin_view_configure_and_release() {
    let (_d, h) = start().await;
    let c = client();
    let put = c
        .put(h.url_for("_admin/fleetlock"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&serde_json::json!({"default_slots": 3})).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 200);
    assert_eq!(h.fleetlock().settings().default_slots, 3);
    assert_eq!(call(&h, "pre-reboot", "n1", "default").await.0, 200);
    let view = c
        .get(h.url_for("_admin/fleetlock"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["groups"]["default"]["holders"][0], "n1");
    assert_eq!(view["groups"]["default"]["slots"], 3);
    let del = c
        .delete(h.url_for("_admin/fleetlock?id=n1&group=default"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status().as_u16(), 200);
    assert!(h.fleetlock().holders("default").is_empty());
    let del = c
        .delete(h.url_for("_admin/fleetlock?id=n1&group=default"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status().as_u16(), 404);
}

#[tokio::test]
async fn reports_are_summarised() {
    let (_d, h) = start().await;
    let c = client();
    for (id, version, phase, err) in [
        ("h1", "1.1.0", "committed", None),
        ("h2", "1.1.0", "committed", None),
        ("h3", "1.0.0", "rolled_back", Some("health check failed")),
        ("h1", "1.1.0", "idle", None),
    ] {
        let resp = c
            .post(h.url_for("v1/report"))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&serde_json::json!({"id": id, "version": version, "phase": phase, "last_error": err})).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 204);
    }
    let resp = c
        .post(h.url_for("v1/report"))
        .body("{\"version\":\"1\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let s = c
        .get(h.url_for("_admin/fleet"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let s: server_mock::FleetSummary = serde_json::from_str(&s).unwrap();
    assert_eq!(s.hosts, 3);
    assert_eq!(s.by_version["1.1.0"], 2);
    assert_eq!(s.by_phase["idle"], 1);
    assert_eq!(s.failing.len(), 1);
    assert_eq!(s.failing[0].id, "h3");
    assert!(s.render().contains("failing: h3"), "{}", s.render());
}

#[tokio::test]
async fn binary_flags_configure_slots_and_the_summary_prints_on_sigterm() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_server-mock"))
        .arg("--dir")
        .arg(dir.path())
        .args(["--fleetlock-slots", "2", "--fleetlock-group", "canary=1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let c = client();
    let post = |path: &str, body: serde_json::Value| {
        c.post(format!("{base}/{path}"))
            .header("fleet-lock-protocol", "true")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .send()
    };
    let lock =
        |id: &str, group: &str| serde_json::json!({"client_params": {"id": id, "group": group}});
    assert_eq!(
        post("v1/pre-reboot", lock("a", "canary"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        post("v1/pre-reboot", lock("b", "canary"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        409
    );
    assert_eq!(
        post("v1/pre-reboot", lock("b", "other"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        post("v1/pre-reboot", lock("c", "other"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        post("v1/pre-reboot", lock("d", "other"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        409
    );
    let r = serde_json::json!({"id": "a", "version": "1.1.0", "phase": "rolled_back", "last_error": "check failed"});
    assert_eq!(post("v1/report", r).await.unwrap().status().as_u16(), 204);
    // The shell's builtin kill: no procps needed.
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(rest.contains("fleet: 1 host(s) reported"), "{rest}");
    assert!(
        rest.contains("failing: a (rolled_back): check failed"),
        "{rest}"
    );
}
