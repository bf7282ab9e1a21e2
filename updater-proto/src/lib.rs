//! Sans-IO update protocol shared by the publisher and the agent: no network, no disk, no async.
//!
//! - [`manifest`]: the manifest schema (versions 1 and 2) and its rules.
//! - [`chunk_index`]: the chunk index of a chunked image (delta updates).
//! - [`envelope`]: the DSSE-style signed envelope, PAE, ed25519 signing keys and key ids.
//! - [`verify`](mod@verify): trust policy (k of n keys) and [`verify()`], the only way to
//!   get a [`VerifiedManifest`].
//! - [`rollout`]: wave seeds and eligibility times.
//! - [`root`]: the signed, versioned trust root (key rotation and revocation, TUF style).
//!
//! The format is specified in `docs/manifest.md`, the threat model in `docs/security.md`.

pub mod chunk_index;
pub mod digest;
pub mod envelope;
#[cfg(feature = "test-support")]
pub mod fuzzing;
pub mod manifest;
pub mod rollout;
pub mod root;
pub mod verify;

pub use chunk_index::{ChunkEntry, ChunkIndex, ChunkIndexError, ChunkParams};
pub use digest::{DigestError, Sha256};
pub use envelope::{key_id, pae, Envelope, Signature, SigningKey, MANIFEST_PAYLOAD_TYPE};
pub use manifest::{
    ChunkIndexRef, Compression, ImageEntry, Manifest, SchemaError, SCHEMA_VERSION,
    SCHEMA_VERSION_CHUNKED,
};
pub use rollout::{eligibility, eligible_from, Eligibility, Wave, WaveSeed, SEED_SPACE};
pub use root::{
    count_signatures, Role, Root, RootError, RootKey, TrustedRoot, MAX_ROOT_BYTES, MAX_ROOT_STEPS,
    ROOT_PAYLOAD_TYPE,
};
pub use verify::{
    verify, IgnoredReason, IgnoredSignature, ImageDigests, PolicyError, TrustPolicy, TrustedKey,
    VerifiedManifest, VerifyContext, VerifyError, MAX_ENVELOPE_BYTES, MAX_SIGNATURES,
};

/// Validate `manifest` and sign it with every key in `keys`: the envelope bytes to publish.
/// An invalid manifest is refused so a publisher cannot ship what agents would reject.
pub fn sign_manifest(manifest: &Manifest, keys: &[&SigningKey]) -> Result<Vec<u8>, SchemaError> {
    manifest.validate()?;
    Ok(Envelope::sign(MANIFEST_PAYLOAD_TYPE, &manifest.to_payload(), keys).to_json())
}
