//! Verification: every rejection has its own kind, and nothing altered ever verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use proptest::prelude::*;
use semver::Version;
use updater_proto::fuzzing::{fuzz_envelope, fuzz_signed_payload};
use updater_proto::*;

const NOW: i64 = 1_800_000_000;

fn key(n: u8) -> SigningKey {
    SigningKey::from_seed_for_tests(&[n; 32])
}

fn trusted(k: &SigningKey) -> TrustedKey {
    TrustedKey::new(k.public_key())
}

fn manifest() -> Manifest {
    Manifest {
        schema_version: 1,
        product: "acme-edge".into(),
        channel: "stable".into(),
        version: Version::new(1, 4, 2),
        serial: 42,
        issued_at: NOW - 3600,
        expires_at: NOW + 7 * 86400,
        min_running_version: Some(Version::new(1, 0, 0)),
        waves: vec![
            Wave {
                seed_bound: 100,
                start: NOW,
            },
            Wave {
                seed_bound: 2048,
                start: NOW + 86400,
            },
        ],
        images: vec![ImageEntry {
            role: "root".into(),
            url: "root-1.4.2.img.zst".into(),
            size: 1 << 20,
            sha256: "1".repeat(64),
            compression: Compression::Zstd,
            compressed_size: 4000,
            compressed_sha256: "2".repeat(64),
            chunk_index: None,
        }],
    }
}

fn ctx() -> VerifyContext {
    VerifyContext::new(NOW, 40, "acme-edge")
}

/// Policy: keys 1, 2, 3 trusted, 2 of 3 required.
fn policy() -> TrustPolicy {
    TrustPolicy::new(
        vec![trusted(&key(1)), trusted(&key(2)), trusted(&key(3))],
        2,
    )
    .unwrap()
}

fn signed(m: &Manifest, keys: &[&SigningKey]) -> Vec<u8> {
    sign_manifest(m, keys).unwrap()
}

fn good() -> Vec<u8> {
    signed(&manifest(), &[&key(1), &key(2)])
}

fn kind(bytes: &[u8]) -> &'static str {
    verify(bytes, &policy(), &ctx()).unwrap_err().kind()
}

/// Sign raw payload bytes (not necessarily a valid manifest) as a manifest envelope.
fn signed_payload(payload: &[u8], keys: &[&SigningKey]) -> Vec<u8> {
    Envelope::sign(MANIFEST_PAYLOAD_TYPE, payload, keys).to_json()
}

fn envelope(bytes: &[u8]) -> Envelope {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn good_manifest_verifies_and_exposes_its_content() {
    let v = verify(&good(), &policy(), &ctx()).unwrap();
    assert_eq!(v.manifest(), &manifest());
    let mut expected = vec![key(1).key_id().to_owned(), key(2).key_id().to_owned()];
    expected.sort();
    assert_eq!(v.signers(), expected.as_slice());
    // Equal serial is accepted: the agent re-reads the manifest it already has.
    let c = VerifyContext::new(NOW, 42, "acme-edge").with_channel("stable");
    verify(&good(), &policy(), &c).unwrap();
}

#[test]
fn extra_untrusted_signature_is_ignored_when_threshold_met() {
    let bytes = signed(&manifest(), &[&key(9), &key(1), &key(3)]);
    verify(&bytes, &policy(), &ctx()).unwrap();
}

#[test]
fn bad_signature() {
    let mut e = envelope(&good());
    let mut raw = B64.decode(&e.signatures[0].sig).unwrap();
    raw[10] ^= 1;
    e.signatures[0].sig = B64.encode(raw);
    let err = verify(&e.to_json(), &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "bad_signature");
    assert!(err.to_string().contains(key(1).key_id()), "{err}");
}

#[test]
fn signature_over_other_payload_is_bad() {
    // Signatures of one manifest pasted onto another (mix-and-match).
    let mut other = manifest();
    other.serial = 43;
    let mut e = envelope(&signed(&other, &[&key(1), &key(2)]));
    e.payload = envelope(&good()).payload;
    assert_eq!(kind(&e.to_json()), "bad_signature");
}

#[test]
fn untrusted_key() {
    let bytes = signed(&manifest(), &[&key(7), &key(8)]);
    let err = verify(&bytes, &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "untrusted_key");
    assert!(err.to_string().contains(key(7).key_id()), "{err}");
}

#[test]
fn attacker_strings_in_errors_are_clipped() {
    let mut e = envelope(&signed(&manifest(), &[&key(7)]));
    e.signatures[0].keyid = "k".repeat(100_000);
    e.payload_type = "t".repeat(100_000);
    let err = verify(&e.to_json(), &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "wrong_payload_type");
    assert!(err.to_string().len() < 400, "{}", err.to_string().len());
    e.payload_type = MANIFEST_PAYLOAD_TYPE.into();
    let err = verify(&e.to_json(), &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "untrusted_key");
    assert!(err.to_string().len() < 400, "{}", err.to_string().len());
    let long_field = format!(r#"{{"{}": 1}}"#, "f".repeat(100_000));
    let err = verify(long_field.as_bytes(), &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "malformed_envelope");
    assert!(err.to_string().len() < 600, "{}", err.to_string().len());
}

#[test]
fn too_few_distinct_signers() {
    assert_eq!(kind(&signed(&manifest(), &[&key(1)])), "threshold_not_met");
    // The same trusted key signing twice counts once.
    let err = verify(&signed(&manifest(), &[&key(1), &key(1)]), &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "threshold_not_met");
    assert_eq!(
        err,
        VerifyError::ThresholdNotMet {
            valid: 1,
            threshold: 2
        }
    );
    // A forged keyid naming key 2 on key 1's signature is a bad signature, not a second signer.
    let mut e = envelope(&signed(&manifest(), &[&key(1), &key(1)]));
    e.signatures[1].keyid = key(2).key_id().to_owned();
    assert_eq!(kind(&e.to_json()), "bad_signature");
}

#[test]
fn wrong_payload_type() {
    let bytes = Envelope::sign(
        "application/json",
        &manifest().to_payload(),
        &[&key(1), &key(2)],
    )
    .to_json();
    assert_eq!(kind(&bytes), "wrong_payload_type");
}

#[test]
fn expired() {
    let mut m = manifest();
    m.expires_at = NOW;
    let err = verify(&signed(&m, &[&key(1), &key(2)]), &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "expired");
    assert!(err.to_string().contains("expired"), "{err}");
}

#[test]
fn serial_below_floor() {
    let c = VerifyContext::new(NOW, 43, "acme-edge");
    let err = verify(&good(), &policy(), &c).unwrap_err();
    assert_eq!(err.kind(), "serial_below_floor");
    assert_eq!(
        err,
        VerifyError::SerialBelowFloor {
            serial: 42,
            floor: 43
        }
    );
}

#[test]
fn wrong_product_and_channel() {
    let c = VerifyContext::new(NOW, 0, "other-board");
    assert_eq!(
        verify(&good(), &policy(), &c).unwrap_err().kind(),
        "wrong_product"
    );
    let c = VerifyContext::new(NOW, 0, "acme-edge").with_channel("beta");
    assert_eq!(
        verify(&good(), &policy(), &c).unwrap_err().kind(),
        "wrong_channel"
    );
}

#[test]
fn unsupported_schema_version() {
    let mut v: serde_json::Value = serde_json::from_slice(&manifest().to_payload()).unwrap();
    v["schema_version"] = 3.into();
    v["a_field_from_the_future"] = true.into();
    let bytes = signed_payload(&serde_json::to_vec(&v).unwrap(), &[&key(1), &key(2)]);
    let err = verify(&bytes, &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "unsupported_schema_version");
    assert!(err.to_string().contains('3'), "{err}");

    v.as_object_mut().unwrap().remove("schema_version");
    let bytes = signed_payload(&serde_json::to_vec(&v).unwrap(), &[&key(1), &key(2)]);
    assert_eq!(kind(&bytes), "unsupported_schema_version");
}

type Mutation = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn malformed_manifest_names_the_field() {
    let base: serde_json::Value = serde_json::from_slice(&manifest().to_payload()).unwrap();
    let cases: Vec<(&str, Mutation)> = vec![
        ("serial", Box::new(|v| v["serial"] = "forty-two".into())),
        ("version", Box::new(|v| v["version"] = "1.4".into())),
        (
            "images[0].compression",
            Box::new(|v| v["images"][0]["compression"] = "gzip".into()),
        ),
        (
            "images[0].size",
            Box::new(|v| v["images"][0]["size"] = (-1).into()),
        ),
        (
            "waves[1].start",
            Box::new(|v| v["waves"][1]["start"] = "soon".into()),
        ),
        ("sneaky", Box::new(|v| v["sneaky"] = 1.into())),
    ];
    for (field, mutate) in cases {
        let mut v = base.clone();
        mutate(&mut v);
        let bytes = signed_payload(&serde_json::to_vec(&v).unwrap(), &[&key(1), &key(2)]);
        let err = verify(&bytes, &policy(), &ctx()).unwrap_err();
        assert_eq!(err.kind(), "malformed_manifest", "{field}: {err}");
        assert!(
            err.to_string().contains(field),
            "{field} not named in: {err}"
        );
    }
    // Missing required field.
    let mut v = base.clone();
    v.as_object_mut().unwrap().remove("expires_at");
    let bytes = signed_payload(&serde_json::to_vec(&v).unwrap(), &[&key(1), &key(2)]);
    let err = verify(&bytes, &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "malformed_manifest");
    assert!(err.to_string().contains("expires_at"), "{err}");
    // Not JSON at all.
    let bytes = signed_payload(b"{\"schema_version\": 1, ", &[&key(1), &key(2)]);
    assert_eq!(kind(&bytes), "malformed_manifest");
}

#[test]
fn invalid_manifest_names_the_field() {
    let mut v: serde_json::Value = serde_json::from_slice(&manifest().to_payload()).unwrap();
    v["images"][0]["url"] = "../../etc/shadow".into();
    let bytes = signed_payload(&serde_json::to_vec(&v).unwrap(), &[&key(1), &key(2)]);
    let err = verify(&bytes, &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "invalid_manifest");
    assert!(err.to_string().contains("images[0].url"), "{err}");
    // And the publisher refuses to sign it in the first place.
    let mut m = manifest();
    m.images[0].url = "https://elsewhere/x".into();
    assert_eq!(
        sign_manifest(&m, &[&key(1)]).unwrap_err().field,
        "images[0].url"
    );
}

#[test]
fn malformed_envelope_names_the_problem() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "malformed"),
        (b"{}".to_vec(), "payloadType"),
        (
            br#"{"payloadType":"x","payload":"!!","signatures":[]}"#.to_vec(),
            "payload",
        ),
        (
            format!(
                r#"{{"payloadType":"x","payload":"{}","signatures":[]}}"#,
                B64.encode(b"{}")
            )
            .into_bytes(),
            "signatures",
        ),
        (
            br#"{"payloadType":"x","payload":"","signatures":[{"keyid":"a","sig":"%%"}]}"#.to_vec(),
            "signatures[0].sig",
        ),
        (
            br#"{"payloadType":"x","payload":"","signatures":[{"keyid":1,"sig":""}]}"#.to_vec(),
            "signatures[0].keyid",
        ),
    ];
    for (bytes, needle) in cases {
        let err = verify(&bytes, &policy(), &ctx()).unwrap_err();
        assert_eq!(err.kind(), "malformed_envelope", "{err}");
        assert!(err.to_string().contains(needle), "{needle} not in: {err}");
    }
    let mut trailing = good();
    trailing.extend_from_slice(b"{}");
    assert_eq!(kind(&trailing), "malformed_envelope");
    // Too many signatures.
    let keys: Vec<SigningKey> = (0..=MAX_SIGNATURES as u8).map(|i| key(100 + i)).collect();
    let refs: Vec<&SigningKey> = keys.iter().collect();
    assert_eq!(kind(&signed(&manifest(), &refs)), "malformed_envelope");
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let mut big = good();
    big.resize(MAX_ENVELOPE_BYTES + 1, b' ');
    let err = verify(&big, &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "too_large");
    // Exactly at the bound still parses (trailing whitespace is valid JSON).
    let mut at = good();
    at.resize(MAX_ENVELOPE_BYTES, b' ');
    verify(&at, &policy(), &ctx()).unwrap();
    // The bound is the caller's to tighten.
    let mut c = ctx();
    c.max_envelope_bytes = 100;
    assert_eq!(
        verify(&good(), &policy(), &c).unwrap_err().kind(),
        "too_large"
    );
}

#[test]
fn checks_run_in_the_documented_order() {
    // Expired AND wrong product AND low serial AND too few signers: the first check wins.
    let mut m = manifest();
    m.expires_at = NOW - 1;
    m.issued_at = NOW - 10;
    m.product = "other".into();
    let c = VerifyContext::new(NOW, 100, "acme-edge");
    let one = signed(&m, &[&key(1)]);
    assert_eq!(
        verify(&one, &policy(), &c).unwrap_err().kind(),
        "threshold_not_met"
    );
    let two = signed(&m, &[&key(1), &key(2)]);
    assert_eq!(verify(&two, &policy(), &c).unwrap_err().kind(), "expired");
    m.expires_at = NOW + 10;
    let two = signed(&m, &[&key(1), &key(2)]);
    assert_eq!(
        verify(&two, &policy(), &c).unwrap_err().kind(),
        "serial_below_floor"
    );
    let c = VerifyContext::new(NOW, 0, "acme-edge");
    assert_eq!(
        verify(&two, &policy(), &c).unwrap_err().kind(),
        "wrong_product"
    );
    // Payload type is checked before signatures.
    let e = Envelope::sign("text/plain", b"x", &[&key(9)]).to_json();
    assert_eq!(kind(&e), "wrong_payload_type");
}

#[test]
fn policy_rules() {
    let k = trusted(&key(1));
    assert_eq!(
        TrustPolicy::new(vec![k.clone()], 0).unwrap_err().kind(),
        "policy_zero_threshold"
    );
    assert_eq!(
        TrustPolicy::new(vec![k.clone()], 2).unwrap_err().kind(),
        "policy_threshold_above_keys"
    );
    assert_eq!(
        TrustPolicy::new(vec![k.clone(), k.clone()], 1)
            .unwrap_err()
            .kind(),
        "policy_duplicate_key"
    );
    assert_eq!(
        TrustedKey::from_hex("abcd").unwrap_err().kind(),
        "policy_bad_key"
    );
    let hex = hex::encode(key(1).public_key());
    assert_eq!(TrustedKey::from_hex(&hex).unwrap(), k);
    assert_eq!(k.key_id(), key(1).key_id());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any single flipped bit anywhere in the published envelope bytes is rejected.
    #[test]
    fn flipped_bit_in_envelope_bytes_is_rejected(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bytes = good();
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        prop_assert!(verify(&bytes, &policy(), &ctx()).is_err());
    }

    /// A flipped bit in the decoded payload, re-encoded so the envelope stays well formed.
    #[test]
    fn flipped_bit_in_payload_is_bad_signature(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut e = envelope(&good());
        let mut payload = B64.decode(&e.payload).unwrap();
        let i = pos.index(payload.len());
        payload[i] ^= 1 << bit;
        e.payload = B64.encode(payload);
        prop_assert_eq!(verify(&e.to_json(), &policy(), &ctx()).unwrap_err().kind(), "bad_signature");
    }

    /// A flipped bit in either decoded signature.
    #[test]
    fn flipped_bit_in_signature_is_bad_signature(
        which in 0usize..2, pos in 0usize..64, bit in 0u8..8
    ) {
        let mut e = envelope(&good());
        let mut sig = B64.decode(&e.signatures[which].sig).unwrap();
        sig[pos] ^= 1 << bit;
        e.signatures[which].sig = B64.encode(sig);
        prop_assert_eq!(verify(&e.to_json(), &policy(), &ctx()).unwrap_err().kind(), "bad_signature");
    }

    /// The fuzz targets' bodies on random bytes (CI runs these; cargo-fuzz runs them longer).
    #[test]
    fn fuzz_bodies_on_random_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzz_envelope(&data);
        fuzz_signed_payload(&data);
    }

    /// ... and on mutations of valid inputs, which reach deeper than random bytes.
    #[test]
    fn fuzz_bodies_on_mutated_valid_inputs(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
    ) {
        let key = updater_proto::fuzzing::fuzz_key();
        let mut m = manifest();
        m.product = updater_proto::fuzzing::FUZZ_PRODUCT.into();
        let mut envelope_bytes = signed(&m, &[&key]);
        let mut payload = m.to_payload();
        for (idx, byte) in edits {
            let i = idx.index(envelope_bytes.len());
            envelope_bytes[i] = byte;
            let j = idx.index(payload.len());
            payload[j] = byte;
        }
        fuzz_envelope(&envelope_bytes);
        fuzz_signed_payload(&payload);
    }
}

#[test]
fn fuzz_bodies_accept_the_seed_inputs() {
    // The unmutated seeds must reach the success path, or the fuzz targets test nothing deep.
    let key = updater_proto::fuzzing::fuzz_key();
    let mut m = manifest();
    m.product = updater_proto::fuzzing::FUZZ_PRODUCT.into();
    let policy = TrustPolicy::new(vec![trusted(&key)], 1).unwrap();
    let c = VerifyContext::new(
        updater_proto::fuzzing::FUZZ_NOW,
        0,
        updater_proto::fuzzing::FUZZ_PRODUCT,
    );
    verify(&signed(&m, &[&key]), &policy, &c).unwrap();
    fuzz_envelope(&signed(&m, &[&key]));
    fuzz_signed_payload(&m.to_payload());
}

/// The seed inputs committed under `fuzz/seeds/`, regenerated with `UPDATE_FUZZ_SEEDS=1`.
fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let fk = updater_proto::fuzzing::fuzz_key();
    let mut m = manifest();
    m.product = updater_proto::fuzzing::FUZZ_PRODUCT.into();
    let mut multi = m.clone();
    multi.images.push(ImageEntry {
        role: "boot".into(),
        url: "boot/boot-1.img".into(),
        size: 6,
        sha256: "3".repeat(64),
        compression: Compression::None,
        compressed_size: 6,
        compressed_sha256: "3".repeat(64),
        chunk_index: None,
    });
    vec![
        ("envelope/valid.json", signed(&m, &[&fk])),
        ("envelope/two_signers.json", signed(&multi, &[&fk, &key(1)])),
        ("signed_payload/manifest.json", m.to_payload()),
        ("signed_payload/two_images.json", multi.to_payload()),
    ]
}

#[test]
fn committed_fuzz_seeds_are_current_and_verify() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for (name, bytes) in fuzz_seeds() {
        let path = dir.join(name);
        if std::env::var_os("UPDATE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_FUZZ_SEEDS=1)", path.display()));
        assert_eq!(
            on_disk,
            bytes,
            "{} is stale (run with UPDATE_FUZZ_SEEDS=1)",
            path.display()
        );
    }
}
