//! Issue 9 item 9: https for manifests, roots and images against a real TLS listener on
//! 127.0.0.1 (server-mock `--tls-cert/--tls-key`), with a CA made fresh by rcgen: the pinned
//! `[server] ca_file` admits it, a wrong CA and the system roots do not, with kind `tls`;
//! plain http still works and `status` says what it exposes. FleetLock and status reports
//! trust the same CA and fail the same way (kind `tls`, the endpoint named).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use server_mock::{Server, ServerHandle, TlsIdentity};
use update_agent::ops;
use update_agent::ops::apply::ApplyOptions;
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

/// A CA and a server certificate for 127.0.0.1 and localhost signed by it (PEM).
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn make_pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "update server");
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// An https server on 127.0.0.1 over `repo`, presenting `pki`'s certificate.
async fn https_server(repo: &Path, pki: &Pki) -> ServerHandle {
    let tls = TlsIdentity::from_pem(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes()).unwrap();
    Server::start_with(repo, SocketAddr::from(([127, 0, 0, 1], 0)), Some(tls))
        .await
        .unwrap()
}

/// The sandbox (its http server) plus an https server over the same repository.
async fn world(pki: &Pki) -> (tempfile::TempDir, World, ServerHandle) {
    let dir = tempfile::tempdir().unwrap();
    let world = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 8)
        .await
        .unwrap();
    let https = https_server(&world.repo, pki).await;
    assert!(https.url().starts_with("https://127.0.0.1:"));
    world
        .set_config("server", "manifest_url", https.url_for("manifest.json"))
        .unwrap();
    (dir, world, https)
}

fn write_ca(dir: &Path, name: &str, pem: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p.display().to_string()
}

#[tokio::test]
async fn https_apply_with_the_pinned_ca() {
    let pki = make_pki("right");
    let (_dir, mut world, https) = world(&pki).await;
    world
        .set_config(
            "server",
            "ca_file",
            write_ca(&world.dir, "ca.pem", &pki.ca_pem),
        )
        .unwrap();
    world.publish("2.0.0", Vec::new()).unwrap();
    let host = world.host().unwrap();
    let report = ops::check::check(&host, None, false, false).await.unwrap();
    assert_eq!(report.version, "2.0.0");
    let applied = ops::apply::apply(&host, &ApplyOptions::default(), &mut |_| {})
        .await
        .unwrap();
    assert_eq!(applied.version, "2.0.0");
    // Manifest and every image came over TLS.
    let log = https.request_log();
    assert!(log
        .iter()
        .any(|e| e.path == "/manifest.json" && e.status == 200));
    let images = log
        .iter()
        .filter(|e| e.path.ends_with(".img.zst") || e.path.ends_with(".img"));
    assert!(images.clone().count() >= 1, "{log:?}");
    assert!(images.clone().all(|e| e.status == 200 || e.status == 206));
    assert!(
        world.server.request_log().is_empty(),
        "nothing over plain http"
    );

    // status says https with only the pinned CA, and nothing exposed.
    let st = update_agent::trust::status(&host);
    assert_eq!(st.transport.as_deref(), Some("https"));
    assert!(st.transport_exposure.is_none());
}

#[tokio::test]
async fn a_wrong_ca_fails_with_kind_tls() {
    let pki = make_pki("right");
    let other = make_pki("wrong");
    let (_dir, mut world, https) = world(&pki).await;
    world
        .set_config(
            "server",
            "ca_file",
            write_ca(&world.dir, "wrong.pem", &other.ca_pem),
        )
        .unwrap();
    world.publish("2.0.0", Vec::new()).unwrap();
    let host = world.host().unwrap();
    let e = ops::check::check(&host, None, false, false)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "tls", "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    assert!(
        https.request_log().is_empty(),
        "no request got past the handshake"
    );
    let e = ops::apply::apply(&host, &ApplyOptions::default(), &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "tls", "{e}");
}

#[tokio::test]
async fn a_ca_file_without_certificates_is_refused_by_name() {
    let pki = make_pki("right");
    let (_dir, world, _https) = world(&pki).await;
    world
        .set_config(
            "server",
            "ca_file",
            write_ca(&world.dir, "empty.pem", "not a pem\n"),
        )
        .unwrap();
    let host = world.host().unwrap();
    let e = ops::check::check(&host, None, false, false)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "ca_file", "{e}");
}

fn cli(world: &World, args: &[&str], ssl_cert_file: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_update-agent"));
    cmd.arg("--config").arg(&world.config_path).arg("--json");
    cmd.args(args);
    cmd.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
    if let Some(f) = ssl_cert_file {
        // The system store as rustls-native-certs reads it; a file of our CA stands in for
        // /etc/ssl/certs without touching the machine's store.
        cmd.env("SSL_CERT_FILE", f);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn without_ca_file_the_system_roots_decide() {
    let pki = make_pki("right");
    let (_dir, mut world, _https) = world(&pki).await;
    world.publish("2.0.0", Vec::new()).unwrap();
    // The machine's store does not know our CA.
    let (ok, out) = cli(&world, &["check"], None);
    assert!(!ok, "{out}");
    assert!(
        out.contains("\"kind\": \"tls\"") || out.contains("\"kind\":\"tls\""),
        "{out}"
    );
    // A system store that holds it (SSL_CERT_FILE) admits the server.
    let ca = write_ca(&world.dir, "system.pem", &pki.ca_pem);
    let (ok, out) = cli(&world, &["check"], Some(&ca));
    assert!(ok, "{out}");
    assert!(out.contains("2.0.0"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_says_what_plain_http_exposes() {
    let dir = tempfile::tempdir().unwrap();
    let world = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 4)
        .await
        .unwrap();
    let (ok, json) = cli(&world, &["status"], None);
    assert!(ok, "{json}");
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["trust"]["transport"], "http");
    let exposure = v["trust"]["transport_exposure"].as_str().unwrap();
    assert!(exposure.contains("metadata privacy"), "{exposure}");
    assert!(exposure.contains("integrity is not lost"), "{exposure}");
    assert!(exposure.contains("expiry"), "{exposure}");

    let out = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&world.config_path)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("transport: http\n"), "{text}");
    assert!(text.contains("transport exposure: plain http"), "{text}");
    assert!(text.contains("trust root: none"), "{text}");
}

#[tokio::test]
async fn fleetlock_and_reports_use_the_same_pinned_ca() {
    use std::time::Duration;
    use update_agent::fetch::{http_client, HttpOptions};
    use update_agent::fleet::lock::FleetLockClient;
    use update_agent::fleet::report::{self, Report};

    let pki = make_pki("right");
    let other = make_pki("wrong");
    let (_dir, world, https) = world(&pki).await;
    let right = std::path::PathBuf::from(write_ca(&world.dir, "ca.pem", &pki.ca_pem));
    let wrong = std::path::PathBuf::from(write_ca(&world.dir, "wrong.pem", &other.ca_pem));
    let t = Duration::from_secs(5);

    let lock = FleetLockClient::with_ca(&https.url(), "n1", "workers", t, Some(&right)).unwrap();
    lock.pre_reboot().await.unwrap();
    assert_eq!(https.fleetlock().holders("workers"), ["n1"]);
    let bad = FleetLockClient::with_ca(&https.url(), "n2", "workers", t, Some(&wrong)).unwrap();
    let e = bad.pre_reboot().await.unwrap_err();
    // The same kind as a manifest or image fetch meets, naming the endpoint and the cause.
    assert_eq!(e.kind(), "tls", "{e}");
    let text = e.to_string();
    assert!(
        text.contains("FleetLock pre-reboot") && text.contains(&https.url()),
        "{text}"
    );
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains("ca_file"), "{text}");
    assert_eq!(https.fleetlock().holders("workers"), ["n1"]);

    let r = Report {
        id: "n1".into(),
        version: Some("1.0.0".into()),
        phase: "idle".into(),
        last_error: None,
        wave_seed: None,
    };
    let url = https.url_for("v1/report");
    let pinned = |ca: &std::path::Path| {
        http_client(&HttpOptions {
            timeout: Some(t),
            ca_file: Some(ca.to_path_buf()),
            ..Default::default()
        })
        .unwrap()
    };
    report::send(&pinned(&right), &url, &r, t).await.unwrap();
    assert!(https.reports().get("n1").is_some());
    let e = report::send(
        &pinned(&wrong),
        &url,
        &{
            let mut r2 = r.clone();
            r2.id = "n2".into();
            r2
        },
        t,
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), "tls", "{e}");
    let text = e.to_string();
    assert!(
        text.contains("status report") && text.contains(&url) && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(https.reports().get("n2").is_none());
}

/// The daemon meets a FleetLock server whose certificate the pinned CA does not sign: the
/// cycle fails with kind `tls` (as a manifest fetch would), naming the FleetLock endpoint;
/// the metrics count it under `tls`; nothing reboots and the release stays staged.
#[tokio::test]
async fn daemon_fleetlock_with_a_wrong_ca_fails_with_kind_tls_in_the_metrics() {
    use std::sync::Arc;
    use update_agent::daemon::notify::Notifier;
    use update_agent::daemon::Daemon;
    use update_agent::state::{Phase, StateStore};

    let pki = make_pki("right");
    let other = make_pki("other");
    let (_dir, mut world, _https) = world(&pki).await;
    // The FleetLock server presents a certificate from another CA.
    let lock_server = https_server(&world.repo, &other).await;
    let dir = world.dir.clone();
    std::fs::write(dir.join("machine-id"), "00112233445566778899aabbccddeeff\n").unwrap();
    let metrics = dir.join("metrics.prom");
    let flag = dir.join("reboot-requested");
    world
        .set_config(
            "server",
            "ca_file",
            write_ca(&world.dir, "ca.pem", &pki.ca_pem),
        )
        .unwrap();
    let set = |table: &str, key: &str, value: toml::Value| {
        world.set_config(table, key, value).unwrap();
    };
    set(
        "daemon",
        "machine_id_path",
        dir.join("machine-id").display().to_string().into(),
    );
    set(
        "daemon",
        "metrics_path",
        metrics.display().to_string().into(),
    );
    set(
        "reboot",
        "command",
        toml::Value::Array(vec!["touch".into(), flag.display().to_string().into()]),
    );
    set("reboot", "strategy", "fleet_lock".into());
    let mut fl = toml::Table::new();
    fl.insert("url".into(), lock_server.url().into());
    set("reboot", "fleet_lock", toml::Value::Table(fl));
    world.publish("2.0.0", Vec::new()).unwrap();

    let mut daemon = Daemon::new(world.host().unwrap(), Arc::new(Notifier::from_env())).unwrap();
    let e = daemon.step().await.unwrap_err();
    assert_eq!(e.kind(), "tls", "{e}");
    let text = e.to_string();
    assert!(
        text.contains("FleetLock pre-reboot") && text.contains(&lock_server.url()),
        "the message names the endpoint: {text}"
    );
    assert!(lock_server.fleetlock().holders("workers").is_empty());
    assert!(!flag.exists(), "nothing rebooted");
    let phase = StateStore::open(&world.state_dir)
        .unwrap()
        .load()
        .unwrap()
        .phase;
    assert!(matches!(phase, Phase::Staged { .. }), "{phase:?}");
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.lines()
            .any(|l| l.starts_with("update_agent_failures_total{kind=\"tls\"}")),
        "{prom}"
    );
}
