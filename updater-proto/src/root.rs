//! The trust root: a signed, versioned list of who may sign what (TUF's `root.json`).
//!
//! A root names two roles, each a set of ed25519 keys and a threshold:
//! - `root`: the keys that sign the next root (key rotation and revocation);
//! - `manifest`: the keys that sign manifests (see [`TrustedRoot::manifest_policy`]).
//!
//! It travels in the same DSSE envelope as a manifest, with its own payload type
//! [`ROOT_PAYLOAD_TYPE`], so a manifest can never pass for a root or the other way round.
//!
//! Updating follows TUF's client workflow (spec 1.0, 5.3): from trusted root `N` the only
//! acceptable next root is version `N+1`, signed by a threshold of root `N`'s root keys AND a
//! threshold of its own root keys. A key is revoked by leaving it out of the next root.
//! Signatures that do not verify, or are by keys the role does not list, do not count, and
//! do not fail the root when the threshold is met anyway. Expiry is checked only on the
//! newest root reached ([`TrustedRoot::check_fresh`]), so a host that was offline for long
//! (or an install image whose shipped root has expired) can still walk forward.

use std::collections::BTreeSet;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::signature::{UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::envelope::{pae, Envelope, SigningKey};
use crate::verify::{TrustPolicy, TrustedKey, MAX_SIGNATURES};

/// Payload type of a version-1 trust root.
pub const ROOT_PAYLOAD_TYPE: &str = "application/vnd.update-agent.root+json; version=1";
/// Schema version of the root payload.
pub const ROOT_SCHEMA_VERSION: u32 = 1;
/// Largest root envelope accepted (and the agent's download bound for one root file).
pub const MAX_ROOT_BYTES: usize = 256 * 1024;
/// Most keys one role may list.
pub const MAX_ROLE_KEYS: usize = 32;
/// Most root versions the agent walks in one poll (bounds a malicious server's work).
pub const MAX_ROOT_STEPS: u32 = 32;

/// One key in a role, as published: its id and the raw public key in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootKey {
    /// [`key_id`] of the key; checked against `public` on load.
    pub keyid: String,
    /// 64 hex characters: the 32 raw ed25519 public key bytes.
    pub public: String,
}

impl RootKey {
    /// The published form of `key`.
    pub fn of(key: &TrustedKey) -> RootKey {
        RootKey {
            keyid: key.key_id().to_owned(),
            public: hex::encode(key.public_key()),
        }
    }
}

/// A role: which keys, and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Distinct keys whose valid signatures are required.
    pub threshold: usize,
    /// The role's keys.
    pub keys: Vec<RootKey>,
}

/// The root payload (signed JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// Always [`ROOT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Root version, from 1; each new root is exactly one more.
    pub version: u64,
    /// Unix seconds; the newest root reached must be valid now (`now < expires_at`).
    pub expires_at: i64,
    /// Keys that sign roots.
    pub root: Role,
    /// Keys that sign manifests.
    pub manifest: Role,
}

impl Root {
    /// The root as signed bytes (compact JSON).
    pub fn to_payload(&self) -> Vec<u8> {
        // A struct of numbers, strings and vectors always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Schema rules: version, thresholds, keys well-formed and ids matching.
    pub fn validate(&self) -> Result<(), RootError> {
        let invalid = |detail: String| Err(RootError::Invalid { detail });
        if self.schema_version != ROOT_SCHEMA_VERSION {
            return invalid(format!(
                "schema_version {} is not supported (this agent reads {ROOT_SCHEMA_VERSION})",
                self.schema_version
            ));
        }
        if self.version == 0 {
            return invalid("version starts at 1".into());
        }
        self.root.policy("root")?;
        self.manifest.policy("manifest")?;
        Ok(())
    }

    /// Key ids of both roles.
    fn key_ids(&self) -> BTreeSet<String> {
        self.root
            .keys
            .iter()
            .chain(&self.manifest.keys)
            .map(|k| k.keyid.to_ascii_lowercase())
            .collect()
    }
}

impl Role {
    /// The role as a trust policy, or why it cannot be one.
    fn policy(&self, name: &str) -> Result<TrustPolicy, RootError> {
        let invalid = |detail: String| RootError::Invalid {
            detail: format!("role `{name}`: {detail}"),
        };
        if self.keys.len() > MAX_ROLE_KEYS {
            return Err(invalid(format!(
                "{} keys, at most {MAX_ROLE_KEYS}",
                self.keys.len()
            )));
        }
        let mut keys = Vec::with_capacity(self.keys.len());
        for (i, k) in self.keys.iter().enumerate() {
            let key =
                TrustedKey::from_hex(&k.public).map_err(|e| invalid(format!("keys[{i}]: {e}")))?;
            if !k.keyid.eq_ignore_ascii_case(key.key_id()) {
                return Err(invalid(format!(
                    "keys[{i}]: keyid {} does not match the key (its id is {})",
                    clip(&k.keyid, 64),
                    key.key_id()
                )));
            }
            keys.push(key);
        }
        TrustPolicy::new(keys, self.threshold).map_err(|e| invalid(e.to_string()))
    }
}

/// Why a root was refused. Each kind names one cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootError {
    /// Larger than [`MAX_ROOT_BYTES`].
    #[error("trust root is {size} bytes, above the {max}-byte limit")]
    TooLarge {
        /// Bytes given.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// Not a well-formed envelope or root payload.
    #[error("trust root is malformed: {detail}")]
    Malformed {
        /// What is wrong.
        detail: String,
    },
    /// An envelope of another type (a manifest, say).
    #[error("envelope payload type is {found:?}, expected {ROOT_PAYLOAD_TYPE:?}")]
    WrongPayloadType {
        /// Type in the envelope.
        found: String,
    },
    /// Well-formed but breaks a rule (threshold, duplicate or bad key, key id mismatch).
    #[error("trust root is invalid: {detail}")]
    Invalid {
        /// The rule broken.
        detail: String,
    },
    /// A root older than or equal to the trusted one (replay, rollback).
    #[error("trust root version {found} is not newer than the trusted version {trusted}")]
    VersionRollback {
        /// Version in the new root.
        found: u64,
        /// The trusted root's version.
        trusted: u64,
    },
    /// A root more than one version ahead: versions advance one at a time.
    #[error("trust root version {found} skips ahead of the trusted version {trusted} (expected {expected})", expected = trusted + 1)]
    VersionSkipped {
        /// Version in the new root.
        found: u64,
        /// The trusted root's version.
        trusted: u64,
    },
    /// The threshold of the trusted root's keys was not met, and a key that an earlier root
    /// revoked (left out) signed: an attempt with a retired, possibly compromised key.
    #[error("trust root {version} is signed by revoked key(s) {revoked:?}; only {valid} of the {threshold} required signature(s) of root {trusted}'s keys count")]
    RevokedKey {
        /// The new root's version.
        version: u64,
        /// The trusted root's version.
        trusted: u64,
        /// Revoked key ids that signed.
        revoked: Vec<String>,
        /// Valid signatures by the trusted root's keys.
        valid: usize,
        /// Required.
        threshold: usize,
    },
    /// Not signed by a threshold of the trusted root's root keys (e.g. only by new keys).
    #[error("trust root {version} has {valid} valid signature(s) by root {trusted}'s keys, {threshold} required")]
    PreviousThreshold {
        /// The new root's version.
        version: u64,
        /// The trusted root's version.
        trusted: u64,
        /// Valid signatures by the trusted root's root keys.
        valid: usize,
        /// Required.
        threshold: usize,
    },
    /// Not signed by a threshold of its own root keys.
    #[error("trust root {version} has {valid} valid signature(s) by its own root keys, {threshold} required")]
    SelfThreshold {
        /// The root's version.
        version: u64,
        /// Valid signatures by its own root keys.
        valid: usize,
        /// Required.
        threshold: usize,
    },
    /// The newest root reached has expired: a freeze attack, or the publisher forgot to
    /// re-sign. Manifests are refused until a newer root is published.
    #[error("trust root {version} expired at {expires_at} (now {now}); publish a newer root (update-publish root rotate)")]
    Expired {
        /// The root's version.
        version: u64,
        /// Its expiry.
        expires_at: i64,
        /// Caller's clock.
        now: i64,
    },
}

impl RootError {
    /// Stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            RootError::TooLarge { .. } => "root_too_large",
            RootError::Malformed { .. } => "root_malformed",
            RootError::WrongPayloadType { .. } => "root_wrong_payload_type",
            RootError::Invalid { .. } => "root_invalid",
            RootError::VersionRollback { .. } => "root_version_rollback",
            RootError::VersionSkipped { .. } => "root_version_skipped",
            RootError::RevokedKey { .. } => "root_revoked_key",
            RootError::PreviousThreshold { .. } => "root_threshold_previous",
            RootError::SelfThreshold { .. } => "root_threshold_self",
            RootError::Expired { .. } => "root_expired",
        }
    }
}

/// Which signatures of an envelope count for a role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignatureCount {
    /// Distinct role keys with a valid signature.
    pub valid: BTreeSet<String>,
    /// Role keys whose signature did not verify (they do not count).
    pub invalid: BTreeSet<String>,
    /// Key ids the role does not list (they do not count).
    pub unknown: BTreeSet<String>,
}

/// Count, TUF style, the signatures over `message` by distinct keys of `policy`: an invalid
/// signature or one by an unlisted key does not count and is not an error.
pub fn count_signatures(
    policy: &TrustPolicy,
    message: &[u8],
    signatures: &[(String, Vec<u8>)],
) -> SignatureCount {
    let mut count = SignatureCount::default();
    for (keyid, raw) in signatures {
        let keyid = keyid.to_ascii_lowercase();
        match policy.keys().iter().find(|k| k.key_id() == keyid) {
            Some(key) => {
                if UnparsedPublicKey::new(&ED25519, key.public_key())
                    .verify(message, raw)
                    .is_ok()
                {
                    count.valid.insert(keyid);
                } else if !count.valid.contains(&keyid) {
                    count.invalid.insert(keyid);
                }
            }
            None => {
                count.unknown.insert(clip(&keyid, 64));
            }
        }
    }
    // A key with one good signature counts, whatever else was sent under its id.
    let valid = count.valid.clone();
    count.invalid.retain(|k| !valid.contains(k));
    count
}

/// A root envelope parsed and checked for shape and schema, its signatures not yet counted.
#[derive(Debug, Clone)]
struct Parsed {
    root: Root,
    root_policy: TrustPolicy,
    manifest_policy: TrustPolicy,
    message: Vec<u8>,
    signatures: Vec<(String, Vec<u8>)>,
    envelope: Envelope,
}

fn parse(bytes: &[u8]) -> Result<Parsed, RootError> {
    if bytes.len() > MAX_ROOT_BYTES {
        return Err(RootError::TooLarge {
            size: bytes.len(),
            max: MAX_ROOT_BYTES,
        });
    }
    let malformed = |detail: String| RootError::Malformed { detail };
    let envelope: Envelope = serde_json::from_slice(bytes)
        .map_err(|e| malformed(format!("envelope: {}", clip(&e.to_string(), 256))))?;
    if envelope.payload_type != ROOT_PAYLOAD_TYPE {
        return Err(RootError::WrongPayloadType {
            found: clip(&envelope.payload_type, 128),
        });
    }
    let payload = B64
        .decode(&envelope.payload)
        .map_err(|e| malformed(format!("`payload` is not valid base64: {e}")))?;
    if envelope.signatures.len() > MAX_SIGNATURES {
        return Err(malformed(format!(
            "{} signatures, at most {MAX_SIGNATURES} allowed",
            envelope.signatures.len()
        )));
    }
    let mut signatures = Vec::with_capacity(envelope.signatures.len());
    for (i, s) in envelope.signatures.iter().enumerate() {
        let raw = B64
            .decode(&s.sig)
            .map_err(|e| malformed(format!("`signatures[{i}].sig` is not valid base64: {e}")))?;
        signatures.push((s.keyid.clone(), raw));
    }
    let root: Root = serde_json::from_slice(&payload)
        .map_err(|e| malformed(format!("payload: {}", clip(&e.to_string(), 256))))?;
    root.validate()?;
    let root_policy = root.root.policy("root")?;
    let manifest_policy = root.manifest.policy("manifest")?;
    Ok(Parsed {
        message: pae(&envelope.payload_type, &payload),
        root,
        root_policy,
        manifest_policy,
        signatures,
        envelope,
    })
}

/// A root this host trusts: obtained only by [`TrustedRoot::bootstrap`] (the root shipped on
/// the host, or the one it persisted) or by [`TrustedRoot::update`] from a trusted root.
#[derive(Debug, Clone)]
pub struct TrustedRoot {
    root: Root,
    root_policy: TrustPolicy,
    manifest_policy: TrustPolicy,
    envelope: Envelope,
    signers: Vec<String>,
    revoked: BTreeSet<String>,
}

impl TrustedRoot {
    /// Trust a root the host already holds (shipped in its image, or persisted after an
    /// update): its schema must be valid and a threshold of its own root keys must sign it.
    /// `revoked` is the set of key ids earlier roots left out, as persisted with it.
    pub fn bootstrap(bytes: &[u8], revoked: BTreeSet<String>) -> Result<TrustedRoot, RootError> {
        let p = parse(bytes)?;
        let own = count_signatures(&p.root_policy, &p.message, &p.signatures);
        if own.valid.len() < p.root_policy.threshold() {
            return Err(RootError::SelfThreshold {
                version: p.root.version,
                valid: own.valid.len(),
                threshold: p.root_policy.threshold(),
            });
        }
        let mut revoked = revoked;
        for k in p.root.key_ids() {
            revoked.remove(&k);
        }
        Ok(TrustedRoot {
            root: p.root,
            root_policy: p.root_policy,
            manifest_policy: p.manifest_policy,
            envelope: p.envelope,
            signers: own.valid.into_iter().collect(),
            revoked,
        })
    }

    /// Accept `bytes` as the next root: version exactly `self.version() + 1`, signed by a
    /// threshold of this root's root keys and a threshold of its own. Expiry is not checked
    /// here (see [`TrustedRoot::check_fresh`]).
    pub fn update(&self, bytes: &[u8]) -> Result<TrustedRoot, RootError> {
        let p = parse(bytes)?;
        let trusted = self.root.version;
        let version = p.root.version;
        if version <= trusted {
            return Err(RootError::VersionRollback {
                found: version,
                trusted,
            });
        }
        if version != trusted + 1 {
            return Err(RootError::VersionSkipped {
                found: version,
                trusted,
            });
        }
        let old = count_signatures(&self.root_policy, &p.message, &p.signatures);
        if old.valid.len() < self.root_policy.threshold() {
            let revoked: Vec<String> = old
                .unknown
                .iter()
                .filter(|k| self.revoked.contains(*k))
                .cloned()
                .collect();
            if !revoked.is_empty() {
                return Err(RootError::RevokedKey {
                    version,
                    trusted,
                    revoked,
                    valid: old.valid.len(),
                    threshold: self.root_policy.threshold(),
                });
            }
            return Err(RootError::PreviousThreshold {
                version,
                trusted,
                valid: old.valid.len(),
                threshold: self.root_policy.threshold(),
            });
        }
        let own = count_signatures(&p.root_policy, &p.message, &p.signatures);
        if own.valid.len() < p.root_policy.threshold() {
            return Err(RootError::SelfThreshold {
                version,
                valid: own.valid.len(),
                threshold: p.root_policy.threshold(),
            });
        }
        // Keys this root leaves out are revoked from now on; a key it lists again is not.
        let new_ids = p.root.key_ids();
        let mut revoked = self.revoked.clone();
        revoked.extend(self.root.key_ids().difference(&new_ids).cloned());
        revoked.retain(|k| !new_ids.contains(k));
        let mut signers: BTreeSet<String> = old.valid;
        signers.extend(own.valid);
        Ok(TrustedRoot {
            root: p.root,
            root_policy: p.root_policy,
            manifest_policy: p.manifest_policy,
            envelope: p.envelope,
            signers: signers.into_iter().collect(),
            revoked,
        })
    }

    /// The newest root reached must be valid at `now`; a stale one means a freeze attack or
    /// a publisher who did not re-sign in time.
    pub fn check_fresh(&self, now_unix: i64) -> Result<(), RootError> {
        if now_unix >= self.root.expires_at {
            return Err(RootError::Expired {
                version: self.root.version,
                expires_at: self.root.expires_at,
                now: now_unix,
            });
        }
        Ok(())
    }

    /// The root's version.
    pub fn version(&self) -> u64 {
        self.root.version
    }

    /// Its expiry, Unix seconds.
    pub fn expires_at(&self) -> i64 {
        self.root.expires_at
    }

    /// The root payload.
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The keys and threshold that sign roots.
    pub fn root_policy(&self) -> &TrustPolicy {
        &self.root_policy
    }

    /// The keys and threshold that sign manifests: the policy to pass to [`crate::verify()`].
    pub fn manifest_policy(&self) -> &TrustPolicy {
        &self.manifest_policy
    }

    /// Key ids whose valid signatures admitted this root, sorted.
    pub fn signers(&self) -> &[String] {
        &self.signers
    }

    /// Key ids earlier roots listed and later ones left out (and did not list again).
    pub fn revoked(&self) -> &BTreeSet<String> {
        &self.revoked
    }

    /// The envelope as received, to persist.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }
}

/// Sign `root` with every key: the envelope bytes to publish. An invalid root is refused so
/// a publisher cannot ship what agents would reject.
pub fn sign_root(root: &Root, keys: &[&SigningKey]) -> Result<Envelope, RootError> {
    root.validate()?;
    Ok(Envelope::sign(ROOT_PAYLOAD_TYPE, &root.to_payload(), keys))
}

/// Add `keys`' signatures to an already signed root envelope (a signing ceremony where each
/// key holder signs in turn). A key that already signed is signed again in place. The
/// payload is not changed, so every earlier signature stays valid.
pub fn add_signatures(envelope: &Envelope, keys: &[&SigningKey]) -> Result<Envelope, RootError> {
    let bytes = envelope.to_json();
    let p = parse(&bytes)?;
    let payload = B64
        .decode(&envelope.payload)
        .map_err(|e| RootError::Malformed {
            detail: format!("`payload` is not valid base64: {e}"),
        })?;
    let mut out = p.envelope;
    for k in keys {
        out.signatures
            .retain(|s| !s.keyid.eq_ignore_ascii_case(k.key_id()));
        out.signatures.push(k.sign(ROOT_PAYLOAD_TYPE, &payload));
    }
    Ok(out)
}

fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed_for_tests(&[n; 32])
    }

    fn role(keys: &[&SigningKey], threshold: usize) -> Role {
        Role {
            threshold,
            keys: keys
                .iter()
                .map(|k| RootKey::of(&TrustedKey::new(k.public_key())))
                .collect(),
        }
    }

    fn root(version: u64, root_keys: &[&SigningKey], t: usize) -> Root {
        Root {
            schema_version: ROOT_SCHEMA_VERSION,
            version,
            expires_at: 2_000_000_000,
            root: role(root_keys, t),
            manifest: role(&[&key(100)], 1),
        }
    }

    fn signed(r: &Root, by: &[&SigningKey]) -> Vec<u8> {
        sign_root(r, by).unwrap().to_json()
    }

    #[test]
    fn rotation_needs_old_and_new_thresholds() {
        let (a, b, c) = (key(1), key(2), key(3));
        let r1 =
            TrustedRoot::bootstrap(&signed(&root(1, &[&a], 1), &[&a]), BTreeSet::new()).unwrap();
        let r2 = root(2, &[&b, &c], 2);
        // Only the new keys: root 1's threshold is not met.
        let e = r1.update(&signed(&r2, &[&b, &c])).unwrap_err();
        assert_eq!(e.kind(), "root_threshold_previous", "{e}");
        // Only the old key: its own threshold is not met.
        let e = r1.update(&signed(&r2, &[&a])).unwrap_err();
        assert_eq!(e.kind(), "root_threshold_self", "{e}");
        let two = r1.update(&signed(&r2, &[&a, &b, &c])).unwrap();
        assert_eq!(two.version(), 2);
        assert!(two.revoked().contains(a.key_id()));
        // The revoked key cannot sign root 3.
        let r3 = root(3, &[&a], 1);
        let e = two.update(&signed(&r3, &[&a])).unwrap_err();
        assert_eq!(e.kind(), "root_revoked_key", "{e}");
    }

    #[test]
    fn versions_advance_one_at_a_time() {
        let a = key(1);
        let r1 =
            TrustedRoot::bootstrap(&signed(&root(1, &[&a], 1), &[&a]), BTreeSet::new()).unwrap();
        let e = r1.update(&signed(&root(3, &[&a], 1), &[&a])).unwrap_err();
        assert_eq!(e.kind(), "root_version_skipped");
        let e = r1.update(&signed(&root(1, &[&a], 1), &[&a])).unwrap_err();
        assert_eq!(e.kind(), "root_version_rollback");
    }

    #[test]
    fn junk_signature_does_not_fail_a_met_threshold() {
        let (a, b) = (key(1), key(2));
        let r1 = TrustedRoot::bootstrap(&signed(&root(1, &[&a, &b], 1), &[&a]), BTreeSet::new())
            .unwrap();
        let mut env = sign_root(&root(2, &[&a, &b], 1), &[&a]).unwrap();
        // A garbage signature under b's id, and one by a stranger.
        let mut junk = env.signatures[0].clone();
        junk.keyid = b.key_id().to_owned();
        junk.sig = B64.encode([0u8; 64]);
        env.signatures.insert(0, junk);
        env.signatures.push(key(9).sign("x", b"y"));
        let two = r1.update(&env.to_json()).unwrap();
        assert_eq!(two.signers(), &[a.key_id().to_owned()]);
        // Without a's good signature the junk does not reach the threshold.
        env.signatures.retain(|s| s.keyid != a.key_id());
        assert_eq!(
            r1.update(&env.to_json()).unwrap_err().kind(),
            "root_threshold_previous"
        );
    }

    #[test]
    fn a_manifest_is_not_a_root_and_bad_roots_are_refused() {
        let a = key(1);
        let env = Envelope::sign(crate::MANIFEST_PAYLOAD_TYPE, b"{}", &[&a]);
        assert_eq!(
            TrustedRoot::bootstrap(&env.to_json(), BTreeSet::new())
                .unwrap_err()
                .kind(),
            "root_wrong_payload_type"
        );
        let mut r = root(1, &[&a], 2);
        assert_eq!(sign_root(&r, &[&a]).unwrap_err().kind(), "root_invalid");
        r.root.threshold = 1;
        r.root.keys[0].keyid = "00".repeat(32);
        assert_eq!(sign_root(&r, &[&a]).unwrap_err().kind(), "root_invalid");
        assert_eq!(
            TrustedRoot::bootstrap(b"{not json", BTreeSet::new())
                .unwrap_err()
                .kind(),
            "root_malformed"
        );
        let big = vec![b' '; MAX_ROOT_BYTES + 1];
        assert_eq!(
            TrustedRoot::bootstrap(&big, BTreeSet::new())
                .unwrap_err()
                .kind(),
            "root_too_large"
        );
    }

    #[test]
    fn expiry_is_checked_on_demand_only() {
        let a = key(1);
        let mut r = root(1, &[&a], 1);
        r.expires_at = 100;
        let one = TrustedRoot::bootstrap(&signed(&r, &[&a]), BTreeSet::new()).unwrap();
        assert!(one.check_fresh(99).is_ok());
        assert_eq!(one.check_fresh(100).unwrap_err().kind(), "root_expired");
        // An expired root can still admit its successor.
        let two = one.update(&signed(&root(2, &[&a], 1), &[&a])).unwrap();
        assert!(two.check_fresh(100).is_ok());
    }

    #[test]
    fn signatures_can_be_added_in_turn() {
        let (a, b) = (key(1), key(2));
        let r1 =
            TrustedRoot::bootstrap(&signed(&root(1, &[&a], 1), &[&a]), BTreeSet::new()).unwrap();
        let env = sign_root(&root(2, &[&b], 1), &[&b]).unwrap();
        assert!(r1.update(&env.to_json()).is_err());
        let env = add_signatures(&env, &[&a]).unwrap();
        assert_eq!(env.signatures.len(), 2);
        assert_eq!(r1.update(&env.to_json()).unwrap().version(), 2);
    }
}
