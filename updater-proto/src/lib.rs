//! Sans-IO update protocol shared by the publisher and the agent: no network, no disk, no async.
//!
//! - [`manifest`]: the version-1 manifest schema and its rules.
//! - [`envelope`]: the DSSE-style signed envelope, PAE, ed25519 signing keys and key ids.
//! - [`verify`](mod@verify): trust policy (k of n keys) and [`verify()`], the only way to
//!   get a [`VerifiedManifest`].
//! - [`rollout`]: wave seeds and eligibility times.
//!
//! The format is specified in `docs/manifest.md`, the threat model in `docs/security.md`.

pub mod envelope;
pub mod fuzzing;
pub mod manifest;
pub mod rollout;
pub mod verify;

pub use envelope::{key_id, pae, Envelope, Signature, SigningKey, MANIFEST_PAYLOAD_TYPE};
pub use manifest::{Compression, ImageEntry, Manifest, SchemaError, SCHEMA_VERSION};
pub use rollout::{eligibility, eligible_from, Eligibility, Wave, WaveSeed, SEED_SPACE};
pub use verify::{
    verify, PolicyError, TrustPolicy, TrustedKey, VerifiedManifest, VerifyContext, VerifyError,
    MAX_ENVELOPE_BYTES, MAX_SIGNATURES,
};

/// Validate `manifest` and sign it with every key in `keys`: the envelope bytes to publish.
/// An invalid manifest is refused so a publisher cannot ship what agents would reject.
pub fn sign_manifest(manifest: &Manifest, keys: &[&SigningKey]) -> Result<Vec<u8>, SchemaError> {
    manifest.validate()?;
    Ok(Envelope::sign(MANIFEST_PAYLOAD_TYPE, &manifest.to_payload(), keys).to_json())
}
