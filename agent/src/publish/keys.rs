//! ed25519 key files: private keys as PKCS#8 DER (mode 0600), public keys as a small JSON.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use serde::{Deserialize, Serialize};
use updater_proto::{SigningKey, TrustedKey};

use super::fsutil::{self, write_atomic, WriteMode};
use super::{io_err, PublishError};

/// Largest key file read; real ones are under 200 bytes.
const MAX_KEY_FILE: usize = 4096;

/// The public key file written by `keygen`: `{"keytype":"ed25519","keyid":..,"public":..}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFile {
    /// Always `ed25519`.
    pub keytype: String,
    /// `updater_proto::key_id` of the key; checked on load.
    pub keyid: String,
    /// The 32 raw key bytes in lower-case hex.
    pub public: String,
}

/// What `generate_key` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedKey {
    /// The key id.
    pub key_id: String,
    /// The private key file (PKCS#8, mode 0600).
    pub private_path: PathBuf,
    /// The public key file.
    pub public_path: PathBuf,
}

/// Generate an ed25519 key pair from the system's random source and write both files
/// atomically. The private key is mode 0600 from its first byte. Existing files are kept
/// (error `key_exists`) unless `force`.
pub fn generate_key(
    private_path: &Path,
    public_path: &Path,
    force: bool,
) -> Result<GeneratedKey, PublishError> {
    let _span = tracing::info_span!("keygen", private = %private_path.display()).entered();
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| PublishError::BadPrivateKey {
        path: private_path.to_path_buf(),
        detail: format!("key generation failed: {e}"),
    })?;
    let key = SigningKey::from_pkcs8(pkcs8.as_ref()).map_err(|e| PublishError::BadPrivateKey {
        path: private_path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let public = PublicKeyFile {
        keytype: "ed25519".into(),
        keyid: key.key_id().to_owned(),
        public: hex::encode(key.public_key()),
    };
    let mut public_json = serde_json::to_vec_pretty(&public).unwrap_or_default();
    public_json.push(b'\n');
    let how = if force {
        WriteMode::Replace
    } else {
        WriteMode::CreateNew
    };
    if !force && public_path.exists() {
        // Checked first so a refused keygen writes neither file.
        return Err(PublishError::KeyExists {
            path: public_path.to_path_buf(),
        });
    }
    write_atomic(private_path, pkcs8.as_ref(), 0o600, how)?;
    write_atomic(public_path, &public_json, 0o644, how)?;
    tracing::info!(key_id = %public.keyid, "generated signing key");
    Ok(GeneratedKey {
        key_id: public.keyid,
        private_path: private_path.to_path_buf(),
        public_path: public_path.to_path_buf(),
    })
}

/// Load a private key, refusing files that group or others can read.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, PublishError> {
    let meta = std::fs::metadata(path).map_err(io_err("stat", path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PublishError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let der = fsutil::read_bounded(path, MAX_KEY_FILE).map_err(|e| match e {
        PublishError::Verify(_) => PublishError::BadPrivateKey {
            path: path.to_path_buf(),
            detail: "file too large for a key".into(),
        },
        other => other,
    })?;
    SigningKey::from_pkcs8(&der).map_err(|e| PublishError::BadPrivateKey {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Load a public key file written by `keygen` (or a file holding just 64 hex characters),
/// checking that the stated key id matches the key.
pub fn load_public_key(path: &Path) -> Result<TrustedKey, PublishError> {
    let bad = |detail: String| PublishError::BadPublicKey {
        path: path.to_path_buf(),
        detail,
    };
    let bytes = fsutil::read_bounded(path, MAX_KEY_FILE).map_err(|e| match e {
        PublishError::Verify(_) => bad("file too large for a key".into()),
        other => other,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
    let file: PublicKeyFile = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
    } else {
        let key = TrustedKey::from_hex(text.trim()).map_err(|e| bad(e.to_string()))?;
        PublicKeyFile {
            keytype: "ed25519".into(),
            keyid: key.key_id().to_owned(),
            public: hex::encode(key.public_key()),
        }
    };
    if file.keytype != "ed25519" {
        return Err(bad(format!(
            "keytype {:?} is not \"ed25519\"",
            file.keytype
        )));
    }
    let key = TrustedKey::from_hex(&file.public).map_err(|e| bad(e.to_string()))?;
    if key.key_id() != file.keyid {
        return Err(bad(format!(
            "keyid {} does not match the key (its id is {})",
            file.keyid,
            key.key_id()
        )));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn keygen_writes_0600_refuses_overwrite_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let sk = dir.path().join("k.pk8");
        let pk = dir.path().join("k.pub");
        let made = generate_key(&sk, &pk, false).unwrap();
        assert_eq!(
            std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let key = load_signing_key(&sk).unwrap();
        let public = load_public_key(&pk).unwrap();
        assert_eq!(key.key_id(), made.key_id);
        assert_eq!(public.key_id(), made.key_id);
        assert_eq!(public.public_key(), &key.public_key());

        let before = std::fs::read(&sk).unwrap();
        assert_eq!(
            generate_key(&sk, &pk, false).unwrap_err().kind(),
            "key_exists"
        );
        assert_eq!(std::fs::read(&sk).unwrap(), before);
        let again = generate_key(&sk, &pk, true).unwrap();
        assert_ne!(again.key_id, made.key_id);
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn loose_permissions_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sk = dir.path().join("k.pk8");
        let pk = dir.path().join("k.pub");
        generate_key(&sk, &pk, false).unwrap();
        std::fs::set_permissions(&sk, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_signing_key(&sk).unwrap_err().kind(), "key_permissions");

        let junk = dir.path().join("junk");
        write_atomic(&junk, b"junk", 0o600, WriteMode::Replace).unwrap();
        assert_eq!(
            load_signing_key(&junk).unwrap_err().kind(),
            "bad_private_key"
        );
        assert_eq!(load_public_key(&junk).unwrap_err().kind(), "bad_public_key");

        // A public key file whose keyid was edited.
        let mut f: PublicKeyFile = serde_json::from_slice(&std::fs::read(&pk).unwrap()).unwrap();
        f.keyid = "00".repeat(32);
        write_atomic(
            &pk,
            &serde_json::to_vec(&f).unwrap(),
            0o644,
            WriteMode::Replace,
        )
        .unwrap();
        let err = load_public_key(&pk).unwrap_err();
        assert_eq!(err.kind(), "bad_public_key");
        assert!(err.to_string().contains("does not match"), "{err}");

        // Bare hex is accepted.
        let hexfile = dir.path().join("hex.pub");
        write_atomic(&hexfile, f.public.as_bytes(), 0o644, WriteMode::Replace).unwrap();
        assert_eq!(
            hex::encode(load_public_key(&hexfile).unwrap().public_key()),
            f.public
        );
    }
}
