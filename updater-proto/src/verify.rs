//! Trust policy and verification: the only way to obtain a [`VerifiedManifest`].
//!
//! [`verify`] checks, in this order, stopping at the first failure: size bound, envelope
//! shape, payload type, signatures, threshold, schema version, manifest schema, expiry,
//! serial floor, compatibility (product, then channel if asked).

use std::collections::BTreeSet;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::digest;
use ring::signature::{UnparsedPublicKey, ED25519};
use serde::Deserialize;

use crate::digest::Sha256;
use crate::envelope::{key_id, pae, Envelope, MANIFEST_PAYLOAD_TYPE};
use crate::manifest::{ImageEntry, Manifest, SCHEMA_VERSION};

/// Largest envelope [`verify`] accepts, and the download bound the agent uses for manifests.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;
/// Most signatures one envelope may carry (bounds the work an attacker can cause).
pub const MAX_SIGNATURES: usize = 32;

/// A public key the policy trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    key_id: String,
    public_key: [u8; 32],
}

impl TrustedKey {
    /// Trust a raw 32-byte ed25519 public key; its id is derived, never taken on faith.
    pub fn new(public_key: [u8; 32]) -> Self {
        TrustedKey {
            key_id: key_id(&public_key),
            public_key,
        }
    }

    /// Parse a public key from 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, PolicyError> {
        let bytes = hex::decode(s.trim()).map_err(|e| PolicyError::BadKey {
            key: s.to_owned(),
            problem: e.to_string(),
        })?;
        let raw: [u8; 32] = bytes.try_into().map_err(|v: Vec<u8>| PolicyError::BadKey {
            key: s.to_owned(),
            problem: format!("expected 32 bytes, got {}", v.len()),
        })?;
        Ok(TrustedKey::new(raw))
    }

    /// The key id (lower-case hex SHA-256 of the raw key).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The raw public key.
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public_key
    }
}

/// A set of trusted keys and how many distinct ones must sign (k of n).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPolicy {
    keys: Vec<TrustedKey>,
    threshold: usize,
}

/// A trust policy that could never be satisfied or is ambiguous.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Threshold 0 would accept unsigned manifests.
    #[error("threshold must be at least 1")]
    ZeroThreshold,
    /// More signers required than keys trusted.
    #[error("threshold {threshold} exceeds the {keys} distinct trusted keys")]
    ThresholdAboveKeys {
        /// Requested threshold.
        threshold: usize,
        /// Distinct trusted keys.
        keys: usize,
    },
    /// The same key listed twice would let one signer count twice.
    #[error("key {key_id} is listed more than once")]
    DuplicateKey {
        /// The repeated key's id.
        key_id: String,
    },
    /// A key that is not 32 bytes of hex.
    #[error("trusted key {key:?} is not an ed25519 public key: {problem}")]
    BadKey {
        /// The text given.
        key: String,
        /// Why it was refused.
        problem: String,
    },
}

impl PolicyError {
    /// Stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyError::ZeroThreshold => "policy_zero_threshold",
            PolicyError::ThresholdAboveKeys { .. } => "policy_threshold_above_keys",
            PolicyError::DuplicateKey { .. } => "policy_duplicate_key",
            PolicyError::BadKey { .. } => "policy_bad_key",
        }
    }
}

impl TrustPolicy {
    /// A policy requiring `threshold` distinct keys out of `keys`.
    pub fn new(keys: Vec<TrustedKey>, threshold: usize) -> Result<Self, PolicyError> {
        if threshold == 0 {
            return Err(PolicyError::ZeroThreshold);
        }
        let mut seen = BTreeSet::new();
        for k in &keys {
            if !seen.insert(k.key_id.as_str()) {
                return Err(PolicyError::DuplicateKey {
                    key_id: k.key_id.clone(),
                });
            }
        }
        if threshold > keys.len() {
            return Err(PolicyError::ThresholdAboveKeys {
                threshold,
                keys: keys.len(),
            });
        }
        Ok(TrustPolicy { keys, threshold })
    }

    /// The trusted keys.
    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// How many distinct trusted keys must sign.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    fn find(&self, key_id: &str) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.key_id == key_id)
    }
}

/// What the caller knows that the manifest cannot tell: the time, the highest serial already
/// accepted, and what this host is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyContext {
    /// Current time, Unix seconds.
    pub now_unix: i64,
    /// Lowest acceptable serial (the highest one seen before); equal is accepted.
    pub serial_floor: u64,
    /// This host's product/board compatibility string.
    pub product: String,
    /// If set, the manifest must be for this channel.
    pub channel: Option<String>,
    /// Size bound on the envelope; defaults to [`MAX_ENVELOPE_BYTES`].
    pub max_envelope_bytes: usize,
}

impl VerifyContext {
    /// A context with no channel check and the default size bound.
    pub fn new(now_unix: i64, serial_floor: u64, product: impl Into<String>) -> Self {
        VerifyContext {
            now_unix,
            serial_floor,
            product: product.into(),
            channel: None,
            max_envelope_bytes: MAX_ENVELOPE_BYTES,
        }
    }

    /// Also require the manifest's channel to be `channel`.
    pub fn with_channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }
}

/// A manifest that passed every check of [`verify`]. It has no public constructor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedManifest {
    manifest: Manifest,
    signers: Vec<String>,
    ignored: Vec<IgnoredSignature>,
    /// Parsed digests of `manifest.images`, index for index.
    digests: Vec<ImageDigests>,
    payload_sha256: [u8; 32],
}

/// An image's digests, parsed once at verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageDigests {
    /// Of the decompressed image.
    pub sha256: Sha256,
    /// Of the file at the image's URL.
    pub compressed_sha256: Sha256,
    /// Of the chunk index, for a chunked (schema v2) entry.
    pub chunk_index_sha256: Option<Sha256>,
}

/// A signature that did not count towards the threshold of a manifest that verified anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredSignature {
    /// The key id the signature claimed (clipped: attacker-chosen).
    pub key_id: String,
    /// Why it did not count.
    pub reason: IgnoredReason,
}

/// Why a signature did not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoredReason {
    /// The key id names a trusted key, but the signature does not verify with it.
    Invalid,
    /// The key id names no trusted key.
    UntrustedKey,
}

impl IgnoredReason {
    /// Stable machine-readable name.
    pub fn as_str(&self) -> &'static str {
        match self {
            IgnoredReason::Invalid => "invalid",
            IgnoredReason::UntrustedKey => "untrusted_key",
        }
    }
}

impl VerifiedManifest {
    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Key ids of the distinct trusted keys whose signatures verified, sorted.
    pub fn signers(&self) -> &[String] {
        &self.signers
    }

    /// Signatures that did not count (invalid under a trusted key id, or by an unknown key),
    /// in envelope order; the threshold was met without them.
    pub fn ignored_signatures(&self) -> &[IgnoredSignature] {
        &self.ignored
    }

    /// Every image with its parsed digests, in manifest order.
    pub fn images(&self) -> impl Iterator<Item = (&ImageEntry, &ImageDigests)> {
        self.manifest.images.iter().zip(&self.digests)
    }

    /// SHA-256 of the signed payload bytes: identifies this exact manifest.
    pub fn payload_sha256(&self) -> &[u8; 32] {
        &self.payload_sha256
    }

    /// Give up the proof and keep the manifest.
    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }
}

/// Why a manifest was refused. One variant per check of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Larger than the size bound.
    #[error("signed manifest is {size} bytes, above the {max}-byte limit")]
    TooLarge {
        /// Bytes given.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// Not a well-formed envelope (JSON, base64, signature list).
    #[error("signed manifest envelope is malformed: {detail}")]
    MalformedEnvelope {
        /// What is wrong, with the JSON path when serde knows it.
        detail: String,
    },
    /// The envelope carries something other than a version-1 manifest.
    #[error("envelope payload type is {found:?}, expected {expected:?}")]
    WrongPayloadType {
        /// Type in the envelope.
        found: String,
        /// Type this crate reads.
        expected: &'static str,
    },
    /// A trusted key's signature does not verify (the payload or signature was altered) and
    /// the valid signatures alone do not meet the threshold.
    #[error("signature by trusted key {key_id} does not verify (payload or signature altered)")]
    BadSignature {
        /// Key whose signature failed.
        key_id: String,
    },
    /// No trusted key signed; only unknown keys did.
    #[error("signed only by untrusted keys: {key_ids:?}")]
    UntrustedKey {
        /// Key ids found, none trusted.
        key_ids: Vec<String>,
    },
    /// Fewer distinct trusted keys signed than the threshold.
    #[error("only {valid} distinct trusted key(s) signed, {threshold} required")]
    ThresholdNotMet {
        /// Distinct trusted keys with a valid signature.
        valid: usize,
        /// Required.
        threshold: usize,
    },
    /// Signed, but a schema version this crate cannot read.
    #[error("manifest schema version {found:?} is not supported (this agent reads version {SCHEMA_VERSION})")]
    UnsupportedSchemaVersion {
        /// The version field as found (missing or not a number shows as such).
        found: String,
    },
    /// Signed, but the JSON does not fit the schema's types.
    #[error("manifest is malformed at `{field}`: {detail}")]
    MalformedManifest {
        /// JSON path of the offending field (`.` for the root).
        field: String,
        /// serde's description.
        detail: String,
    },
    /// Signed and well-typed, but breaks a schema rule.
    #[error("manifest is invalid: {0}")]
    InvalidManifest(#[from] crate::manifest::SchemaError),
    /// Past its expiry.
    #[error(
        "manifest expired at {expires_at} (now {now}); the server may be serving stale metadata"
    )]
    Expired {
        /// Expiry in the manifest.
        expires_at: i64,
        /// Caller's clock.
        now: i64,
    },
    /// Older than a manifest already accepted: a replay.
    #[error(
        "manifest serial {serial} is below the highest seen {floor} (rollback to older metadata)"
    )]
    SerialBelowFloor {
        /// Serial in the manifest.
        serial: u64,
        /// Caller's floor.
        floor: u64,
    },
    /// For another product/board.
    #[error("manifest is for product {found:?}, this host is {expected:?}")]
    WrongProduct {
        /// Product in the manifest.
        found: String,
        /// This host's product.
        expected: String,
    },
    /// For another channel.
    #[error("manifest is for channel {found:?}, this host follows {expected:?}")]
    WrongChannel {
        /// Channel in the manifest.
        found: String,
        /// This host's channel.
        expected: String,
    },
}

impl VerifyError {
    /// Stable machine-readable kind, for metrics, `--json` and exit messages.
    pub fn kind(&self) -> &'static str {
        match self {
            VerifyError::TooLarge { .. } => "too_large",
            VerifyError::MalformedEnvelope { .. } => "malformed_envelope",
            VerifyError::WrongPayloadType { .. } => "wrong_payload_type",
            VerifyError::BadSignature { .. } => "bad_signature",
            VerifyError::UntrustedKey { .. } => "untrusted_key",
            VerifyError::ThresholdNotMet { .. } => "threshold_not_met",
            VerifyError::UnsupportedSchemaVersion { .. } => "unsupported_schema_version",
            VerifyError::MalformedManifest { .. } => "malformed_manifest",
            VerifyError::InvalidManifest(_) => "invalid_manifest",
            VerifyError::Expired { .. } => "expired",
            VerifyError::SerialBelowFloor { .. } => "serial_below_floor",
            VerifyError::WrongProduct { .. } => "wrong_product",
            VerifyError::WrongChannel { .. } => "wrong_channel",
        }
    }
}

/// Attacker-chosen strings go into error messages and logs; keep them short.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_owned(),
    }
}

fn path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> (String, String) {
    (
        clip(&e.path().to_string(), 128),
        clip(&e.inner().to_string(), 256),
    )
}

/// Parse and check a signed manifest. See the module docs for the order of checks.
pub fn verify(
    bytes: &[u8],
    policy: &TrustPolicy,
    ctx: &VerifyContext,
) -> Result<VerifiedManifest, VerifyError> {
    // 1. Size bound, before any parsing.
    if bytes.len() > ctx.max_envelope_bytes {
        return Err(VerifyError::TooLarge {
            size: bytes.len(),
            max: ctx.max_envelope_bytes,
        });
    }

    // 2. Envelope shape.
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let envelope: Envelope = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let (path, detail) = path_error(e);
        VerifyError::MalformedEnvelope {
            detail: format!("at `{path}`: {detail}"),
        }
    })?;
    de.end().map_err(|e| VerifyError::MalformedEnvelope {
        detail: format!("trailing data after the envelope: {e}"),
    })?;
    let payload = B64
        .decode(&envelope.payload)
        .map_err(|e| VerifyError::MalformedEnvelope {
            detail: format!("`payload` is not valid base64: {e}"),
        })?;
    if envelope.signatures.is_empty() {
        return Err(VerifyError::MalformedEnvelope {
            detail: "`signatures` is empty".into(),
        });
    }
    if envelope.signatures.len() > MAX_SIGNATURES {
        return Err(VerifyError::MalformedEnvelope {
            detail: format!(
                "{} signatures, at most {MAX_SIGNATURES} allowed",
                envelope.signatures.len()
            ),
        });
    }
    let mut sigs = Vec::with_capacity(envelope.signatures.len());
    for (i, s) in envelope.signatures.iter().enumerate() {
        let raw = B64
            .decode(&s.sig)
            .map_err(|e| VerifyError::MalformedEnvelope {
                detail: format!("`signatures[{i}].sig` is not valid base64: {e}"),
            })?;
        sigs.push((s.keyid.as_str(), raw));
    }

    // 3. Payload type.
    if envelope.payload_type != MANIFEST_PAYLOAD_TYPE {
        return Err(VerifyError::WrongPayloadType {
            found: clip(&envelope.payload_type, 128),
            expected: MANIFEST_PAYLOAD_TYPE,
        });
    }

    // 4. Signatures, counted as TUF does: a signature counts when it verifies under the
    // trusted key its key id names; one that does not (or names no trusted key) does not
    // count and is reported, but cannot veto: anyone on the path could add junk.
    let message = pae(&envelope.payload_type, &payload);
    let mut valid = BTreeSet::new();
    let mut ignored = Vec::new();
    for (keyid, raw) in &sigs {
        match policy.find(keyid) {
            Some(key) => {
                match UnparsedPublicKey::new(&ED25519, &key.public_key).verify(&message, raw) {
                    Ok(()) => {
                        valid.insert(key.key_id.clone());
                    }
                    Err(_) => ignored.push(IgnoredSignature {
                        key_id: key.key_id.clone(),
                        reason: IgnoredReason::Invalid,
                    }),
                }
            }
            None => ignored.push(IgnoredSignature {
                key_id: clip(keyid, 64),
                reason: IgnoredReason::UntrustedKey,
            }),
        }
    }

    // 5. Threshold of distinct trusted keys. Below it, the most telling reason: a bad
    // signature by a trusted key (tampering), else only unknown keys, else too few.
    if valid.len() < policy.threshold {
        if let Some(bad) = ignored
            .iter()
            .find(|i| i.reason == IgnoredReason::Invalid && !valid.contains(&i.key_id))
        {
            return Err(VerifyError::BadSignature {
                key_id: bad.key_id.clone(),
            });
        }
        if valid.is_empty() {
            return Err(VerifyError::UntrustedKey {
                key_ids: ignored.into_iter().map(|i| i.key_id).collect(),
            });
        }
        return Err(VerifyError::ThresholdNotMet {
            valid: valid.len(),
            threshold: policy.threshold,
        });
    }

    // 6. Schema version, read on its own so a v2 manifest gets a clear error, not a type error.
    #[derive(Deserialize)]
    struct VersionProbe {
        schema_version: Option<serde_json::Value>,
    }
    let probe: VersionProbe =
        serde_json::from_slice(&payload).map_err(|e| VerifyError::MalformedManifest {
            field: ".".into(),
            detail: e.to_string(),
        })?;
    match &probe.schema_version {
        Some(serde_json::Value::Number(n))
            if n.as_u64()
                .is_some_and(crate::manifest::is_supported_schema_version) => {}
        Some(other) => {
            return Err(VerifyError::UnsupportedSchemaVersion {
                found: clip(&other.to_string(), 64),
            })
        }
        None => {
            return Err(VerifyError::UnsupportedSchemaVersion {
                found: "missing".into(),
            })
        }
    }

    // 7. Manifest schema: types (with the JSON path), then rules.
    let mut de = serde_json::Deserializer::from_slice(&payload);
    let manifest: Manifest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let (field, detail) = path_error(e);
        VerifyError::MalformedManifest { field, detail }
    })?;
    manifest.validate()?;
    // The rules above checked the spelling; the digests are parsed here, once.
    let mut digests = Vec::with_capacity(manifest.images.len());
    for (i, image) in manifest.images.iter().enumerate() {
        let parse = |field: &str, text: &str| {
            Sha256::from_hex(text).map_err(|e| VerifyError::MalformedManifest {
                field: format!("images[{i}].{field}"),
                detail: e.to_string(),
            })
        };
        digests.push(ImageDigests {
            sha256: parse("sha256", &image.sha256)?,
            compressed_sha256: parse("compressed_sha256", &image.compressed_sha256)?,
            chunk_index_sha256: match &image.chunk_index {
                Some(ix) => Some(parse("chunk_index.sha256", &ix.sha256)?),
                None => None,
            },
        });
    }

    // 8. Expiry: a manifest is good up to and excluding `expires_at`.
    if ctx.now_unix >= manifest.expires_at {
        return Err(VerifyError::Expired {
            expires_at: manifest.expires_at,
            now: ctx.now_unix,
        });
    }

    // 9. Serial floor.
    if manifest.serial < ctx.serial_floor {
        return Err(VerifyError::SerialBelowFloor {
            serial: manifest.serial,
            floor: ctx.serial_floor,
        });
    }

    // 10. Compatibility.
    if manifest.product != ctx.product {
        return Err(VerifyError::WrongProduct {
            found: manifest.product,
            expected: ctx.product.clone(),
        });
    }
    if let Some(channel) = &ctx.channel {
        if &manifest.channel != channel {
            return Err(VerifyError::WrongChannel {
                found: manifest.channel,
                expected: channel.clone(),
            });
        }
    }

    let mut payload_sha256 = [0u8; 32];
    payload_sha256.copy_from_slice(digest::digest(&digest::SHA256, &payload).as_ref());
    Ok(VerifiedManifest {
        manifest,
        signers: valid.into_iter().collect(),
        ignored,
        digests,
        payload_sha256,
    })
}
