//! Bodies of the fuzz targets in `updater-proto/fuzz/`, kept here so the regular test suite
//! runs them too (on random and mutated inputs) and CI exercises them without nightly.

use crate::envelope::{Envelope, SigningKey, MANIFEST_PAYLOAD_TYPE};
use crate::verify::{verify, TrustPolicy, TrustedKey, VerifyContext};

/// Product string the fuzz context expects.
pub const FUZZ_PRODUCT: &str = "fuzz-board";
/// Clock of the fuzz context (Unix seconds).
pub const FUZZ_NOW: i64 = 1_800_000_000;

/// The fixed key the fuzz targets sign with. Derived from a constant seed: never a real key.
pub fn fuzz_key() -> SigningKey {
    SigningKey::from_seed_for_tests(&[0x5a; 32])
}

fn fuzz_policy(key: &SigningKey) -> TrustPolicy {
    // One trusted key, threshold 1: always a valid policy.
    TrustPolicy::new(vec![TrustedKey::new(key.public_key())], 1)
        .unwrap_or_else(|e| panic!("fixed fuzz policy rejected: {e}"))
}

/// Feed arbitrary bytes to [`verify`] as a whole envelope. Must never panic; whatever it
/// accepts must verify again identically.
pub fn fuzz_envelope(data: &[u8]) {
    let key = fuzz_key();
    let policy = fuzz_policy(&key);
    let ctx = VerifyContext::new(FUZZ_NOW, 0, FUZZ_PRODUCT);
    if let Ok(v) = verify(data, &policy, &ctx) {
        assert_eq!(verify(data, &policy, &ctx).ok(), Some(v));
    }
}

/// Sign arbitrary bytes as a manifest payload with the trusted key, so the fuzzer reaches
/// the schema checks behind the signature. Whatever verifies must be a valid manifest that
/// re-signs and re-verifies to the same manifest.
pub fn fuzz_signed_payload(data: &[u8]) {
    let key = fuzz_key();
    let policy = fuzz_policy(&key);
    let ctx = VerifyContext::new(FUZZ_NOW, 0, FUZZ_PRODUCT);
    let envelope = Envelope::sign(MANIFEST_PAYLOAD_TYPE, data, &[&key]).to_json();
    if let Ok(v) = verify(&envelope, &policy, &ctx) {
        let m = v.manifest();
        assert!(m.validate().is_ok(), "verify accepted an invalid manifest");
        let again = crate::sign_manifest(m, &[&key])
            .unwrap_or_else(|e| panic!("verified manifest does not re-sign: {e}"));
        let v2 = verify(&again, &policy, &ctx)
            .unwrap_or_else(|e| panic!("re-signed manifest does not verify: {e}"));
        assert_eq!(v2.manifest(), m);
    }
}

/// The fuzz root: version 1, root and manifest role both the fuzz key, threshold 1.
pub fn fuzz_root_v1() -> crate::root::Root {
    use crate::root::{Role, Root, RootKey, ROOT_SCHEMA_VERSION};
    let role = || Role {
        threshold: 1,
        keys: vec![RootKey::of(&TrustedKey::new(fuzz_key().public_key()))],
    };
    Root {
        schema_version: ROOT_SCHEMA_VERSION,
        version: 1,
        expires_at: FUZZ_NOW + 86_400,
        root: role(),
        manifest: role(),
    }
}

/// Arbitrary bytes as a trust root. The first byte picks how they are used:
/// even: as a whole root envelope, bootstrapped and offered as the update to the fuzz root;
/// odd: as the root payload, signed by the fuzz key (so the fuzzer gets past the
/// signatures into the schema and the role checks). Must never panic; a root that bootstraps
/// re-parses to the same root; an accepted update is version 2 and keeps its own policy.
pub fn fuzz_root(data: &[u8]) {
    use crate::root::{sign_root, TrustedRoot, ROOT_PAYLOAD_TYPE};
    use std::collections::BTreeSet;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let key = fuzz_key();
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        Envelope::sign(ROOT_PAYLOAD_TYPE, rest, &[&key]).to_json()
    };
    if let Ok(t) = TrustedRoot::bootstrap(&bytes, BTreeSet::new()) {
        let again = TrustedRoot::bootstrap(&t.envelope().to_json(), BTreeSet::new())
            .unwrap_or_else(|e| panic!("a bootstrapped root does not re-parse: {e}"));
        assert_eq!(again.root(), t.root());
        assert!(t.root().validate().is_ok());
    }
    let v1 = sign_root(&fuzz_root_v1(), &[&key])
        .unwrap_or_else(|e| panic!("fixed fuzz root does not sign: {e}"))
        .to_json();
    let trusted = TrustedRoot::bootstrap(&v1, BTreeSet::new())
        .unwrap_or_else(|e| panic!("fixed fuzz root rejected: {e}"));
    if let Ok(next) = trusted.update(&bytes) {
        assert_eq!(next.version(), 2, "an update is exactly one version on");
        assert!(next.root().validate().is_ok());
        assert!(next.manifest_policy().threshold() >= 1);
    }
}

/// Arbitrary bytes as a chunk index. The signed sizes it is checked against are the ones its
/// header declares when the first byte is even (so parsing gets past the size check), else
/// the next 16 bytes. Must never panic; an accepted index encodes back to the same bytes,
/// its chunks tile the image, and `chunk_at` finds each chunk's first byte in it.
pub fn fuzz_chunk_index(data: &[u8]) {
    use crate::chunk_index::ChunkIndex;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let le = |b: &[u8], at: usize| -> u64 {
        let mut x = [0u8; 8];
        if let Some(s) = b.get(at..at + 8) {
            x.copy_from_slice(s);
        }
        u64::from_le_bytes(x)
    };
    let (bytes, image, file) = if mode % 2 == 0 {
        (rest, le(rest, 8), le(rest, 16))
    } else if rest.len() >= 16 {
        (&rest[16..], le(rest, 0), le(rest, 8))
    } else {
        return;
    };
    let Ok(ix) = ChunkIndex::parse(bytes, image, file) else {
        return;
    };
    // Each form encodes back to itself: the explicit form through `encode`, the compact
    // form (what the publisher writes) through `encode_compact`.
    let again = if bytes.starts_with(crate::chunk_index::MAGIC_COMPACT) {
        ix.encode_compact()
    } else {
        ix.encode()
    };
    assert_eq!(again, bytes, "an accepted index encodes to its own bytes");
    assert_eq!(ix.image_size, image);
    let mut end = 0u64;
    for (i, c) in ix.chunks.iter().enumerate() {
        assert_eq!(c.image_offset, end, "chunk {i} starts where the last ended");
        end = c.image_end();
        assert_eq!(ix.chunk_at(c.image_offset), Some(i));
    }
    assert_eq!(end, image, "the chunks cover the image");
    assert_eq!(ix.chunk_at(image), None);
}

/// Arbitrary bytes as a manifest's hex digest: never panics; an accepted digest spells
/// itself (64 lower-case hex characters, one spelling per digest).
pub fn fuzz_digest(data: &[u8]) {
    use crate::digest::Sha256;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = Sha256::from_hex(text) {
        assert_eq!(d.to_hex(), text);
        assert_eq!(Sha256::from_hex(&d.to_hex()), Ok(d));
    }
}
