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
