//! Trust-root files for the publisher: `update-publish root init|rotate|sign|verify`.
//!
//! Root `N` is published as `N.root.json` beside the manifest. A rotation is a ceremony:
//! `rotate` writes root `N+1` (new key lists, version one up) signed by whoever runs it;
//! each other key holder runs `sign` on the same file until a threshold of root `N`'s keys
//! and a threshold of root `N+1`'s own keys have signed; `verify` says whether it is ready.
//! The bytes and the rules are `updater_proto::root`'s.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use updater_proto::{
    Envelope, Role, Root, RootError, RootKey, SigningKey, TrustedRoot, MAX_ROOT_BYTES,
};

use super::{fsutil, load_public_key, load_signing_key, write_atomic, PublishError, WriteMode};

/// One role as given on the command line: public key files and a threshold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleSpec {
    pub keys: Vec<PathBuf>,
    pub threshold: Option<usize>,
}

impl RoleSpec {
    /// The role, or (with no keys given) `previous` with the threshold changed if asked.
    fn build(&self, previous: Option<&Role>, name: &str) -> Result<Role, PublishError> {
        if self.keys.is_empty() {
            let Some(p) = previous else {
                return Err(PublishError::Root(RootError::Invalid {
                    detail: format!("role `{name}` needs at least one key"),
                }));
            };
            let mut r = p.clone();
            if let Some(t) = self.threshold {
                r.threshold = t;
            }
            return Ok(r);
        }
        let keys = self
            .keys
            .iter()
            .map(|p| load_public_key(p).map(|k| RootKey::of(&k)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Role {
            threshold: self.threshold.unwrap_or(1),
            keys,
        })
    }
}

/// Read a root file without trusting it (to rotate from, or to sign).
pub(crate) fn read_root_envelope(path: &Path) -> Result<(Envelope, Root), PublishError> {
    let bytes = fsutil::read_bounded(path, MAX_ROOT_BYTES)?;
    let bad = |e: String| {
        PublishError::Root(RootError::Malformed {
            detail: format!("{}: {e}", path.display()),
        })
    };
    let env: Envelope = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let payload = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &env.payload)
        .map_err(|e| bad(e.to_string()))?;
    let root: Root = serde_json::from_slice(&payload).map_err(|e| bad(e.to_string()))?;
    Ok((env, root))
}

fn signing_keys(paths: &[PathBuf]) -> Result<Vec<SigningKey>, PublishError> {
    paths.iter().map(|p| load_signing_key(p)).collect()
}

fn write_root(out: &Path, env: &Envelope) -> Result<(), PublishError> {
    write_atomic(out, &env.to_json(), 0o644, WriteMode::Replace)
}

/// `root init`: root version 1, signed by `sign_with` (its root keys, to meet its own
/// threshold), written to `out`.
pub fn init_root(
    out: &Path,
    root: &RoleSpec,
    manifest: &RoleSpec,
    expires_at: i64,
    sign_with: &[PathBuf],
) -> Result<Root, PublishError> {
    let r = Root {
        schema_version: updater_proto::root::ROOT_SCHEMA_VERSION,
        version: 1,
        expires_at,
        root: root.build(None, "root")?,
        manifest: manifest.build(None, "manifest")?,
    };
    let keys = signing_keys(sign_with)?;
    let refs: Vec<&SigningKey> = keys.iter().collect();
    let env = updater_proto::root::sign_root(&r, &refs)?;
    write_root(out, &env)?;
    Ok(r)
}

/// `root rotate`: root `N+1` from `previous` (`N.root.json`), roles replaced where given,
/// signed by `sign_with`, written to `out`. Leaving a key out of a role revokes it.
pub fn rotate_root(
    previous: &Path,
    out: &Path,
    root: &RoleSpec,
    manifest: &RoleSpec,
    expires_at: i64,
    sign_with: &[PathBuf],
) -> Result<Root, PublishError> {
    let (_, prev) = read_root_envelope(previous)?;
    let r = Root {
        schema_version: updater_proto::root::ROOT_SCHEMA_VERSION,
        version: prev.version + 1,
        expires_at,
        root: root.build(Some(&prev.root), "root")?,
        manifest: manifest.build(Some(&prev.manifest), "manifest")?,
    };
    let keys = signing_keys(sign_with)?;
    let refs: Vec<&SigningKey> = keys.iter().collect();
    let env = updater_proto::root::sign_root(&r, &refs)?;
    write_root(out, &env)?;
    Ok(r)
}

/// `root sign`: add `sign_with`'s signatures to the root file in place.
pub fn sign_root_file(path: &Path, sign_with: &[PathBuf]) -> Result<Envelope, PublishError> {
    let (env, _) = read_root_envelope(path)?;
    let keys = signing_keys(sign_with)?;
    let refs: Vec<&SigningKey> = keys.iter().collect();
    let env = updater_proto::root::add_signatures(&env, &refs)?;
    write_root(path, &env)?;
    Ok(env)
}

/// `root verify`: is `path` acceptable, as a first root (no `previous`) or as the successor
/// of `previous`? Exactly the agent's check.
pub fn verify_root_file(path: &Path, previous: Option<&Path>) -> Result<TrustedRoot, PublishError> {
    let bytes = fsutil::read_bounded(path, MAX_ROOT_BYTES)?;
    Ok(match previous {
        None => TrustedRoot::bootstrap(&bytes, BTreeSet::new())?,
        Some(prev) => {
            let prev_bytes = fsutil::read_bounded(prev, MAX_ROOT_BYTES)?;
            TrustedRoot::bootstrap(&prev_bytes, BTreeSet::new())?.update(&bytes)?
        }
    })
}
