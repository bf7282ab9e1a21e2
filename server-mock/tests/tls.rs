//! `--tls-cert/--tls-key`: the repository over https on 127.0.0.1, for a client that pins the
//! test CA (made by rcgen), with Range and a raw-path fault working over TLS too; a client
//! that does not trust the CA, or speaks plain http, gets nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use server_mock::{Fault, FaultRule, Server, TlsIdentity};

/// (CA PEM, server certificate PEM, server key PEM) for 127.0.0.1.
fn pki() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

fn client(ca_pem: Option<&str>) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder();
    if let Some(pem) = ca_pem {
        b = b.tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()]);
    }
    b.build().unwrap()
}

#[test]
fn binary_serves_https_with_the_given_certificate() {
    let (ca, cert, key) = pki();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.json"), b"0123456789").unwrap();
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    let repo = dir.path().to_str().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_server-mock"))
        .args(["--dir", repo, "--addr", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
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
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (body, ranged, untrusted, plain) = rt.block_on(async {
        let c = client(Some(&ca));
        let body = c.get(format!("{url}/m.json")).send().await.unwrap();
        let body = body.bytes().await.unwrap();
        let r = c
            .get(format!("{url}/m.json"))
            .header("range", "bytes=2-4")
            .send()
            .await
            .unwrap();
        let ranged = (r.status().as_u16(), r.bytes().await.unwrap());
        let untrusted = client(None).get(format!("{url}/m.json")).send().await;
        let plain_url = url.replacen("https://", "http://", 1);
        let plain = client(None).get(format!("{plain_url}/m.json")).send().await;
        (body, ranged, untrusted, plain)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert_eq!(body, &b"0123456789"[..]);
    assert_eq!(ranged, (206, bytes::Bytes::from_static(b"234")));
    let e = untrusted.unwrap_err();
    assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");
    assert!(
        plain.is_err(),
        "plain http to the https port must not be answered"
    );
}

#[tokio::test]
async fn raw_faults_work_over_tls() {
    let (ca, cert, key) = pki();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("img"), vec![7u8; 1000]).unwrap();
    let tls = TlsIdentity::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
    let h = Server::start_with(dir.path(), "127.0.0.1:0".parse().unwrap(), Some(tls))
        .await
        .unwrap();
    h.set_fault(FaultRule::new("/img", Fault::DropAfter(100)).times(1));
    let c = client(Some(&ca));
    let r = c.get(h.url_for("img")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.bytes().await.is_err(), "the body is cut after 100 bytes");
    let log = h.request_log();
    assert_eq!(log[0].faults, ["drop_after"]);
    assert_eq!(log[0].bytes_sent, 100);
    // The next request is served whole.
    let r = c.get(h.url_for("img")).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 1000);
}

#[test]
fn a_bad_certificate_or_key_is_refused_by_kind() {
    let (_, cert, _) = pki();
    let e = TlsIdentity::from_pem(b"nothing", b"nothing").unwrap_err();
    assert_eq!(e.kind(), "tls");
    let (_, _, other_key) = pki();
    let e = TlsIdentity::from_pem(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
    assert_eq!(e.kind(), "tls", "{e}");
}
