//! Runs the real `update-publish` binary: keygen -> image -> manifest -> verify, and the
//! failures an operator will meet, each with its error kind and a non-zero exit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use updater_proto::{TrustPolicy, VerifyContext};

#[path = "support/publish_cli.rs"]
mod publish_cli;
use publish_cli::{fails, ok, publish};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Repo {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Repo {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir(root.join("repo")).unwrap();
        Repo { _dir: dir, root }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    fn keygen(&self, name: &str) {
        ok(&[
            "keygen",
            "--private",
            s(&self.p(&format!("{name}.pk8"))),
            "--public",
            s(&self.p(&format!("{name}.pub"))),
        ]);
    }
}

#[test]
fn keygen_image_manifest_verify_round_trip() {
    let r = Repo::new();
    r.keygen("k1");
    r.keygen("k2");
    r.keygen("k3");
    let mode = std::fs::metadata(r.p("k1.pk8"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // Two partition images: a compressible root and a small boot image stored as is.
    let root: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(r.p("root.raw"), &root).unwrap();
    std::fs::write(r.p("boot.raw"), b"vmlinuz and friends").unwrap();
    let stdout = ok(&[
        "image",
        "--input",
        s(&r.p("root.raw")),
        "--out-dir",
        s(&r.p("repo")),
        "--role",
        "root",
        "--entry-out",
        s(&r.p("root.entry.json")),
    ]);
    let entry: updater_proto::ImageEntry = serde_json::from_str(&stdout).unwrap();
    assert_eq!(entry.size, root.len() as u64);
    assert_eq!(entry.compression, updater_proto::Compression::Zstd);
    let stored = std::fs::read(r.p("repo").join(&entry.url)).unwrap();
    assert_eq!(stored.len() as u64, entry.compressed_size);
    assert_eq!(zstd::decode_all(&stored[..]).unwrap(), root);
    ok(&[
        "image",
        "--input",
        s(&r.p("boot.raw")),
        "--out-dir",
        s(&r.p("repo")),
        "--role",
        "boot",
        "--compression",
        "none",
        "--entry-out",
        s(&r.p("boot.entry.json")),
    ]);

    let manifest = r.p("repo/manifest.json");
    let stdout = ok(&[
        "manifest",
        "--out",
        s(&manifest),
        "--key",
        s(&r.p("k1.pk8")),
        "--key",
        s(&r.p("k2.pk8")),
        "--product",
        "acme-edge",
        "--channel",
        "stable",
        "--version",
        "2.1.0",
        "--serial",
        "7",
        "--expires-in",
        "7d",
        "--image",
        s(&r.p("boot.entry.json")),
        "--image",
        s(&r.p("root.entry.json")),
        "--wave",
        "100@+0s",
        "--wave",
        "2048@+1d",
        "--min-version",
        "2.0.0",
    ]);
    assert!(stdout.contains("serial 7"), "{stdout}");

    let verify_args = |extra: &[&str]| {
        let mut v = vec![
            "verify".to_owned(),
            s(&manifest).to_owned(),
            "--trusted".into(),
            s(&r.p("k1.pub")).into(),
            "--trusted".into(),
            s(&r.p("k2.pub")).into(),
            "--trusted".into(),
            s(&r.p("k3.pub")).into(),
            "--threshold".into(),
            "2".into(),
            "--product".into(),
            "acme-edge".into(),
        ];
        v.extend(extra.iter().map(|x| (*x).to_owned()));
        v
    };
    let args = verify_args(&["--channel", "stable", "--serial-floor", "7"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stdout = ok(&args);
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(stdout.contains("version  2.1.0"), "{stdout}");

    let args = verify_args(&["--json"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["signers"].as_array().unwrap().len(), 2);
    assert_eq!(v["manifest"]["images"].as_array().unwrap().len(), 2);

    // The library the agent uses agrees with the binary, byte for byte.
    let policy = update_agent::publish::load_policy(&[r.p("k1.pub"), r.p("k2.pub")], 2).unwrap();
    let now = v["manifest"]["issued_at"].as_i64().unwrap();
    let verified = update_agent::publish::verify_manifest_file(
        &manifest,
        &policy,
        &VerifyContext::new(now, 0, "acme-edge"),
    )
    .unwrap();
    let m = verified.manifest();
    assert_eq!(m.image("root").unwrap(), &entry);
    assert_eq!(m.waves[1].start, m.issued_at + 86_400);
    assert_eq!(m.expires_at, m.issued_at + 7 * 86_400);
    let _: &TrustPolicy = &policy;

    // Verification failures: exit 1, kind on stderr, --json on stdout.
    let args = verify_args(&["--serial-floor", "8"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&args, "serial_below_floor");
    let args = verify_args(&["--channel", "beta"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&args, "wrong_channel");
    let args = verify_args(&["--now", "+8d"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&args, "expired");
    let args = verify_args(&["--json", "--serial-floor", "99"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = publish(&args);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["kind"], "serial_below_floor");

    // Only k3 trusted: no trusted signer at all.
    fails(
        &[
            "verify",
            s(&manifest),
            "--trusted",
            s(&r.p("k3.pub")),
            "--product",
            "acme-edge",
        ],
        "untrusted_key",
    );
    // A flipped byte in the published file.
    let mut bytes = std::fs::read(&manifest).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    let tampered = r.p("repo/tampered.json");
    std::fs::write(&tampered, &bytes).unwrap();
    let out = publish(&[
        "verify",
        s(&tampered),
        "--trusted",
        s(&r.p("k1.pub")),
        "--product",
        "acme-edge",
    ]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn operator_mistakes_are_refused_with_their_kind() {
    let r = Repo::new();
    r.keygen("k1");
    // keygen refuses to overwrite, and leaves the key alone.
    let before = std::fs::read(r.p("k1.pk8")).unwrap();
    fails(
        &[
            "keygen",
            "--private",
            s(&r.p("k1.pk8")),
            "--public",
            s(&r.p("k1.pub")),
        ],
        "key_exists",
    );
    assert_eq!(std::fs::read(r.p("k1.pk8")).unwrap(), before);

    std::fs::write(r.p("img"), b"data").unwrap();
    ok(&[
        "image",
        "--input",
        s(&r.p("img")),
        "--out-dir",
        s(&r.p("repo")),
        "--role",
        "root",
        "--entry-out",
        s(&r.p("e.json")),
    ]);
    let base = |expires: &str, key: &Path| -> Vec<String> {
        [
            "manifest",
            "--out",
            s(&r.p("repo/m.json")),
            "--key",
            s(key),
            "--product",
            "acme-edge",
            "--channel",
            "stable",
            "--version",
            "1.0.0",
            "--serial",
            "1",
            "--expires-in",
            expires,
            "--image",
            s(&r.p("e.json")),
        ]
        .iter()
        .map(|x| (*x).to_owned())
        .collect()
    };
    let args = base("7x", &r.p("k1.pk8"));
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "bad_duration",
    );
    assert!(!r.p("repo/m.json").exists());

    // A private key readable by others is refused.
    std::fs::copy(r.p("k1.pk8"), r.p("loose.pk8")).unwrap();
    std::fs::set_permissions(r.p("loose.pk8"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let args = base("7d", &r.p("loose.pk8"));
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "key_permissions",
    );

    // Duplicate roles: refused before signing, nothing written.
    let mut args = base("7d", &r.p("k1.pk8"));
    args.extend(["--image".to_owned(), s(&r.p("e.json")).to_owned()]);
    let err = fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "invalid_manifest",
    );
    assert!(err.contains("images[1].role"), "{err}");
    assert!(!r.p("repo/m.json").exists());

    // An entry file with a wrong field names the field.
    let mut e: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.p("e.json")).unwrap()).unwrap();
    e["sha256"] = "xyz".into();
    std::fs::write(r.p("bad.json"), serde_json::to_vec(&e).unwrap()).unwrap();
    let mut args = base("7d", &r.p("k1.pk8"));
    let last = args.len() - 1;
    args[last] = s(&r.p("bad.json")).to_owned();
    let err = fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "bad_image_entry",
    );
    assert!(err.contains("sha256"), "{err}");

    // Threshold above the number of trusted keys.
    ok(&base("7d", &r.p("k1.pk8"))
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    fails(
        &[
            "verify",
            s(&r.p("repo/m.json")),
            "--trusted",
            s(&r.p("k1.pub")),
            "--threshold",
            "2",
            "--product",
            "acme-edge",
        ],
        "policy_threshold_above_keys",
    );
}

/// `image --chunked`: one zstd stream that the real `zstd -d` decodes to the image, an index
/// the agent's parser accepts, and a manifest that becomes schema version 2 and verifies.
#[test]
fn chunked_image_gives_a_v2_manifest_and_a_plain_zstd_stream() {
    let r = Repo::new();
    r.keygen("k1");
    let root: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 27) as u8)
        .collect();
    std::fs::write(r.p("root.raw"), &root).unwrap();
    let stdout = ok(&[
        "image",
        "--input",
        s(&r.p("root.raw")),
        "--out-dir",
        s(&r.p("repo")),
        "--role",
        "root",
        "--chunked",
        "--chunk-sizes",
        "2048/8192/32768",
        "--entry-out",
        s(&r.p("root.entry.json")),
    ]);
    let entry: updater_proto::ImageEntry = serde_json::from_str(&stdout).unwrap();
    let ix_ref = entry.chunk_index.clone().expect("a chunk index");
    let ix_bytes = std::fs::read(r.p("repo").join(&ix_ref.url)).unwrap();
    let ix =
        updater_proto::ChunkIndex::parse(&ix_bytes, entry.size, entry.compressed_size).unwrap();
    assert_eq!(ix.params.avg, 8192);
    assert!(ix.chunks.len() > 100, "{} chunks", ix.chunks.len());
    if update_agent_sandbox::testimg::require_tool("zstd", "zstd").unwrap() {
        let out = Command::new("zstd")
            .args(["-d", "-c"])
            .arg(r.p("repo").join(&entry.url))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout == root,
            "zstd -d of the chunked file is not the image"
        );
    }

    let manifest = r.p("repo/manifest.json");
    ok(&[
        "manifest",
        "--out",
        s(&manifest),
        "--key",
        s(&r.p("k1.pk8")),
        "--product",
        "acme-edge",
        "--channel",
        "stable",
        "--version",
        "3.0.0",
        "--serial",
        "1",
        "--expires-in",
        "7d",
        "--image",
        s(&r.p("root.entry.json")),
    ]);
    ok(&[
        "verify",
        s(&manifest),
        "--trusted",
        s(&r.p("k1.pub")),
        "--product",
        "acme-edge",
    ]);
    let env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let payload = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        env["payload"].as_str().unwrap(),
    )
    .unwrap();
    let m: updater_proto::Manifest = serde_json::from_slice(&payload).unwrap();
    assert_eq!(m.schema_version, updater_proto::SCHEMA_VERSION_CHUNKED);
    assert_eq!(m.images[0].chunk_index.as_ref(), Some(&ix_ref));

    // Chunk sizes the index could not carry are refused up front.
    let out = publish(&[
        "image",
        "--input",
        s(&r.p("root.raw")),
        "--out-dir",
        s(&r.p("repo")),
        "--role",
        "root",
        "--chunked",
        "--chunk-sizes",
        "64/256/1024",
    ]);
    assert!(!out.status.success());
}
