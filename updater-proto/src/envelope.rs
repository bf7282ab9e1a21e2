//! The DSSE-style signed envelope and ed25519 signing keys.
//!
//! Wire form (JSON, field names as in DSSE):
//! `{"payloadType": "...", "payload": "<base64>", "signatures": [{"keyid": "<hex>", "sig": "<base64>"}]}`.
//! Signatures cover [`pae`]`(payloadType, payload bytes)`, never the JSON, so no canonical-JSON
//! step exists to get wrong.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::digest;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

/// Payload type of a version-1 manifest.
pub const MANIFEST_PAYLOAD_TYPE: &str = "application/vnd.update-agent.manifest+json; version=1";

/// The signed envelope as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Media type of the payload; covered by the signatures.
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Standard base64 (with padding) of the payload bytes.
    pub payload: String,
    /// One entry per signature.
    pub signatures: Vec<Signature>,
}

/// One signature in an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// [`key_id`] of the signing key; required (unlike DSSE, where it is optional).
    pub keyid: String,
    /// Standard base64 of the 64-byte ed25519 signature.
    pub sig: String,
}

/// DSSE pre-authentication encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in ASCII decimal.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + payload.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// Key id of an ed25519 public key: lower-case hex of SHA-256 over the 32 raw key bytes
/// (all 64 hex characters, so ids never collide in practice and need no truncation rules).
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, public_key))
}

/// An ed25519 private key able to sign envelopes.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("id", &self.id).finish()
    }
}

/// A PKCS#8 document that is not an ed25519 private key ring accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid ed25519 PKCS#8 private key: {0}")]
pub struct BadPrivateKey(pub String);

impl SigningKey {
    /// Load from PKCS#8 DER (v1 or v2, as written by `update-publish keygen`).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, BadPrivateKey> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| BadPrivateKey(e.to_string()))?;
        let id = key_id(pair.public_key().as_ref());
        Ok(SigningKey { pair, id })
    }

    /// A key from a fixed 32-byte seed, for tests and fuzzing only: real keys come from
    /// `update-publish keygen` and the system's random source. Not part of the shipped API:
    /// only with the `test-support` feature (or in this crate's unit tests).
    #[cfg(any(test, feature = "test-support"))]
    pub fn from_seed_for_tests(seed: &[u8; 32]) -> Self {
        // ring only fails here for a seed of the wrong length, which the type rules out.
        #[allow(clippy::expect_used)]
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("32-byte seed");
        let id = key_id(pair.public_key().as_ref());
        SigningKey { pair, id }
    }

    /// This key's id (see [`key_id`]).
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// The 32 raw public key bytes.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// Sign `payload` of `payload_type` through [`pae`].
    pub fn sign(&self, payload_type: &str, payload: &[u8]) -> Signature {
        let sig = self.pair.sign(&pae(payload_type, payload));
        Signature {
            keyid: self.id.clone(),
            sig: B64.encode(sig.as_ref()),
        }
    }
}

impl Envelope {
    /// Build an envelope signed by every key in `keys`, in order.
    pub fn sign(payload_type: &str, payload: &[u8], keys: &[&SigningKey]) -> Envelope {
        Envelope {
            payload_type: payload_type.to_owned(),
            payload: B64.encode(payload),
            signatures: keys.iter().map(|k| k.sign(payload_type, payload)).collect(),
        }
    }

    /// The envelope as pretty JSON, as published.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings always serializes.
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // From the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn key_id_is_full_sha256_hex() {
        let id = key_id(&[0u8; 32]);
        assert_eq!(id.len(), 64);
        assert_eq!(
            id,
            "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"
        );
    }

    #[test]
    fn rejects_garbage_private_key() {
        assert!(SigningKey::from_pkcs8(b"not a key").is_err());
    }
}
