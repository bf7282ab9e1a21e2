//! Issue 9 defect 5: signatures are counted as TUF does. A junk signature under a trusted
//! key id (anyone on the path can add one) does not veto a manifest whose threshold is met by
//! valid signatures; it does not count, and it is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use semver::Version;
use updater_proto::*;

const NOW: i64 = 1_800_000_000;

fn key(n: u8) -> SigningKey {
    SigningKey::from_seed_for_tests(&[n; 32])
}

fn manifest() -> Manifest {
    Manifest {
        schema_version: 1,
        product: "acme-edge".into(),
        channel: "stable".into(),
        version: Version::new(2, 0, 0),
        serial: 7,
        issued_at: NOW - 3600,
        expires_at: NOW + 86400,
        min_running_version: None,
        waves: Vec::new(),
        images: vec![ImageEntry {
            role: "root".into(),
            url: "root.img".into(),
            size: 4096,
            sha256: "1".repeat(64),
            compression: Compression::None,
            compressed_size: 4096,
            compressed_sha256: "1".repeat(64),
            chunk_index: None,
        }],
    }
}

/// Keys 1, 2, 3 trusted, 2 of 3 required.
fn policy() -> TrustPolicy {
    TrustPolicy::new(
        [1, 2, 3]
            .map(|n| TrustedKey::new(key(n).public_key()))
            .to_vec(),
        2,
    )
    .unwrap()
}

fn ctx() -> VerifyContext {
    VerifyContext::new(NOW, 0, "acme-edge")
}

/// Keys 1 and 2 sign validly; a junk signature claims trusted key 3.
fn with_junk_under_key3() -> Vec<u8> {
    let mut e: Envelope =
        serde_json::from_slice(&sign_manifest(&manifest(), &[&key(1), &key(2)]).unwrap()).unwrap();
    e.signatures.push(Signature {
        keyid: key(3).key_id().to_owned(),
        sig: B64.encode([0x5a; 64]),
    });
    e.to_json()
}

#[test]
fn junk_signature_under_a_trusted_key_id_does_not_veto_a_met_threshold() {
    let v = verify(&with_junk_under_key3(), &policy(), &ctx()).unwrap();
    let mut signers = vec![key(1).key_id().to_owned(), key(2).key_id().to_owned()];
    signers.sort();
    assert_eq!(v.signers(), signers.as_slice());
    assert_eq!(
        v.ignored_signatures(),
        &[IgnoredSignature {
            key_id: key(3).key_id().to_owned(),
            reason: IgnoredReason::Invalid,
        }]
    );
}

#[test]
fn junk_signature_does_not_count_towards_the_threshold() {
    // Key 1 valid, key 3 junk: one valid signature of two required.
    let mut e: Envelope =
        serde_json::from_slice(&sign_manifest(&manifest(), &[&key(1)]).unwrap()).unwrap();
    e.signatures.push(Signature {
        keyid: key(3).key_id().to_owned(),
        sig: B64.encode([0x5a; 64]),
    });
    let err = verify(&e.to_json(), &policy(), &ctx()).unwrap_err();
    // Below the threshold, the bad signature by a trusted key is the reason given.
    assert_eq!(err.kind(), "bad_signature");
    assert!(err.to_string().contains(key(3).key_id()), "{err}");
}

#[test]
fn a_valid_and_an_invalid_signature_by_the_same_key_count_once() {
    let mut e: Envelope = serde_json::from_slice(&with_junk_under_key3()).unwrap();
    // Replace key 2's valid signature by junk under key 1's id: key 1 valid once, junk once.
    e.signatures[1] = Signature {
        keyid: key(1).key_id().to_owned(),
        sig: B64.encode([0x11; 64]),
    };
    let err = verify(&e.to_json(), &policy(), &ctx()).unwrap_err();
    assert_eq!(err.kind(), "bad_signature", "{err}");
}

#[test]
fn untrusted_signatures_are_reported_too() {
    let bytes = sign_manifest(&manifest(), &[&key(1), &key(9), &key(2)]).unwrap();
    let v = verify(&bytes, &policy(), &ctx()).unwrap();
    assert_eq!(v.signers().len(), 2);
    assert_eq!(
        v.ignored_signatures(),
        &[IgnoredSignature {
            key_id: key(9).key_id().to_owned(),
            reason: IgnoredReason::UntrustedKey,
        }]
    );
}
