//! The publisher's side: key generation, image preparation, manifest signing and checking.
//!
//! Everything byte-level (schema, envelope, signatures, verification) is `updater_proto`, so
//! the publisher and the agent cannot disagree; this module adds files, time and compression.
//! `update-publish` is a thin CLI over these functions; tests and the demo call them directly.

pub mod bundle;
mod chunked;
mod fsutil;
mod image;
mod keys;
pub mod root;

use std::path::{Path, PathBuf};

use updater_proto::{
    Manifest, PolicyError, SchemaError, SigningKey, TrustPolicy, TrustedKey, VerifiedManifest,
    VerifyContext, VerifyError, Wave,
};

pub(crate) use chunked::chunker;
pub use chunked::prepare_chunked_image;
pub use fsutil::{write_atomic, WriteMode};
pub use image::{prepare_image, prepare_image_level, DEFAULT_ZSTD_LEVEL};
pub use keys::{generate_key, load_public_key, load_signing_key, GeneratedKey, PublicKeyFile};

/// Everything that can go wrong while publishing.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What we were doing (`read`, `write`, `rename`, ...).
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Refusing to replace an existing key file.
    #[error("{} already exists; refusing to overwrite a key (use --force to replace it)", path.display())]
    KeyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// A private key file others can read.
    #[error("private key {} has mode {mode:o}; it must not be readable by group or others (chmod 600)", path.display())]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A private key file that is not ed25519 PKCS#8.
    #[error("private key {}: {detail}", path.display())]
    BadPrivateKey {
        /// The key file.
        path: PathBuf,
        /// Why it was refused.
        detail: String,
    },
    /// A public key file that is not what `keygen` writes.
    #[error("public key {}: {detail}", path.display())]
    BadPublicKey {
        /// The key file.
        path: PathBuf,
        /// Why it was refused.
        detail: String,
    },
    /// An image that cannot be published.
    #[error("image {}: {detail}", path.display())]
    BadImage {
        /// The source image.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// An image entry file that does not parse.
    #[error("image entry {}: {detail}", path.display())]
    BadImageEntry {
        /// The entry file.
        path: PathBuf,
        /// What is wrong, with the JSON path.
        detail: String,
    },
    /// A duration like `7d` that does not parse.
    #[error("bad duration {text:?}: {detail} (examples: 90s, 30m, 12h, 7d, 2w, 1d12h)")]
    BadDuration {
        /// What was given.
        text: String,
        /// What is wrong.
        detail: String,
    },
    /// A wave like `100@+1h` that does not parse.
    #[error("bad wave {text:?}: {detail} (form: SEED_BOUND@WHEN, WHEN = +DURATION after issue, Unix seconds or RFC 3339)")]
    BadWave {
        /// What was given.
        text: String,
        /// What is wrong.
        detail: String,
    },
    /// The manifest breaks a schema rule; nothing was signed.
    #[error("refusing to sign: {0}")]
    InvalidManifest(#[from] SchemaError),
    /// A trust policy that cannot be satisfied.
    #[error("trust policy: {0}")]
    Policy(#[from] PolicyError),
    /// The signed manifest failed verification.
    #[error("{0}")]
    Verify(#[from] VerifyError),
    /// A trust root that cannot be built, signed or accepted.
    #[error("{0}")]
    Root(#[from] updater_proto::RootError),
    /// A manifest, or a file it names, that cannot go into a bundle.
    #[error("bundle input {}: {detail}", path.display())]
    BadBundleInput {
        /// The manifest or the file it names.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl PublishError {
    /// Stable machine-readable kind; verification failures keep `updater_proto`'s kinds.
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::Io { .. } => "io",
            PublishError::KeyExists { .. } => "key_exists",
            PublishError::KeyPermissions { .. } => "key_permissions",
            PublishError::BadPrivateKey { .. } => "bad_private_key",
            PublishError::BadPublicKey { .. } => "bad_public_key",
            PublishError::BadImage { .. } => "bad_image",
            PublishError::BadImageEntry { .. } => "bad_image_entry",
            PublishError::BadDuration { .. } => "bad_duration",
            PublishError::BadWave { .. } => "bad_wave",
            PublishError::InvalidManifest(_) => "invalid_manifest",
            PublishError::Policy(e) => e.kind(),
            PublishError::Verify(e) => e.kind(),
            PublishError::Root(e) => e.kind(),
            PublishError::BadBundleInput { .. } => "bad_bundle_input",
        }
    }
}

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PublishError {
    let path = path.to_path_buf();
    move |source| PublishError::Io { op, path, source }
}

/// Validate and sign `manifest` with every key: the envelope bytes to publish.
pub fn sign_manifest(manifest: &Manifest, keys: &[SigningKey]) -> Result<Vec<u8>, PublishError> {
    let refs: Vec<&SigningKey> = keys.iter().collect();
    let _span = tracing::info_span!(
        "sign_manifest",
        serial = manifest.serial,
        signers = keys.len()
    )
    .entered();
    Ok(updater_proto::sign_manifest(manifest, &refs)?)
}

/// Read an image entry file as written by `update-publish image --entry-out`: one entry
/// object, or an array of them. Entries are validated; errors name the JSON field.
pub fn load_image_entries(path: &Path) -> Result<Vec<updater_proto::ImageEntry>, PublishError> {
    let bytes = fsutil::read_bounded(path, updater_proto::MAX_ENVELOPE_BYTES)?;
    updater_proto::ImageEntry::parse_entries(&bytes).map_err(|e| PublishError::BadImageEntry {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Trust policy from public key files (as written by `keygen`) and a threshold.
pub fn load_policy(public_keys: &[PathBuf], threshold: usize) -> Result<TrustPolicy, PublishError> {
    let keys = public_keys
        .iter()
        .map(|p| load_public_key(p))
        .collect::<Result<Vec<TrustedKey>, _>>()?;
    Ok(TrustPolicy::new(keys, threshold)?)
}

/// Read a signed manifest file (bounded by the context's size limit) and verify it.
pub fn verify_manifest_file(
    path: &Path,
    policy: &TrustPolicy,
    ctx: &VerifyContext,
) -> Result<VerifiedManifest, PublishError> {
    let bytes = fsutil::read_bounded(path, ctx.max_envelope_bytes)?;
    let _span = tracing::info_span!("verify", path = %path.display()).entered();
    Ok(updater_proto::verify(&bytes, policy, ctx)?)
}

/// Parse a duration such as `90s`, `30m`, `12h`, `7d`, `2w` or `1d12h` into seconds.
pub fn parse_duration(text: &str) -> Result<i64, PublishError> {
    match parse_duration_or_zero(text)? {
        0 => Err(PublishError::BadDuration {
            text: text.to_owned(),
            detail: "must be a positive duration".into(),
        }),
        n => Ok(n),
    }
}

/// Like [`parse_duration`], but `0s` is allowed (a wave may start at issue time).
fn parse_duration_or_zero(text: &str) -> Result<i64, PublishError> {
    let bad = |detail: &str| PublishError::BadDuration {
        text: text.to_owned(),
        detail: detail.to_owned(),
    };
    let mut total: i64 = 0;
    let mut digits = String::new();
    let mut any = false;
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: i64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad(&format!("unknown unit {c:?}"))),
        };
        if digits.is_empty() {
            return Err(bad(&format!("unit {c:?} without a number before it")));
        }
        let n: i64 = digits.parse().map_err(|_| bad("number too large"))?;
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| bad("too large"))?;
        digits.clear();
        any = true;
    }
    if !digits.is_empty() {
        return Err(bad("number without a unit at the end"));
    }
    if !any {
        return Err(bad("empty"));
    }
    Ok(total)
}

/// Parse a point in time: `+DURATION` after `base`, Unix seconds, or RFC 3339.
pub fn parse_time(text: &str, base: i64) -> Result<i64, String> {
    let text = text.trim();
    if let Some(rel) = text.strip_prefix('+') {
        let secs = parse_duration_or_zero(rel).map_err(|e| e.to_string())?;
        return base.checked_add(secs).ok_or_else(|| "too large".to_owned());
    }
    if let Ok(n) = text.parse::<i64>() {
        return Ok(n);
    }
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_second())
        .map_err(|e| format!("not +DURATION, Unix seconds or RFC 3339: {e}"))
}

/// Parse a wave `SEED_BOUND@WHEN` (see [`parse_time`]; `+` is relative to `issued_at`).
pub fn parse_wave(text: &str, issued_at: i64) -> Result<Wave, PublishError> {
    let bad = |detail: String| PublishError::BadWave {
        text: text.to_owned(),
        detail,
    };
    let (bound, when) = text
        .split_once('@')
        .ok_or_else(|| bad("missing `@`".into()))?;
    let seed_bound: u32 = bound
        .trim()
        .parse()
        .map_err(|e| bad(format!("seed bound {bound:?}: {e}")))?;
    let start = parse_time(when, issued_at).map_err(bad)?;
    Ok(Wave { seed_bound, start })
}

/// Render Unix seconds as RFC 3339 UTC for humans (falls back to the number).
pub fn format_time(unix: i64) -> String {
    crate::clock::rfc3339_or_number(unix)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d").unwrap(), 7 * 86_400);
        assert_eq!(parse_duration("12h").unwrap(), 43_200);
        assert_eq!(parse_duration("1d12h").unwrap(), 129_600);
        assert_eq!(parse_duration("90s").unwrap(), 90);
        assert_eq!(parse_duration("2w").unwrap(), 14 * 86_400);
        for bad in ["", "7", "d", "7x", "0d", "-1d", "99999999999999999999d"] {
            assert_eq!(
                parse_duration(bad).unwrap_err().kind(),
                "bad_duration",
                "{bad}"
            );
        }
    }

    #[test]
    fn waves_and_times() {
        assert_eq!(
            parse_wave("100@+1h", 1000).unwrap(),
            Wave {
                seed_bound: 100,
                start: 4600
            }
        );
        assert_eq!(
            parse_wave("2048@1700000000", 0).unwrap().start,
            1_700_000_000
        );
        assert_eq!(
            parse_wave("5@2026-01-01T00:00:00Z", 0).unwrap().start,
            1_767_225_600
        );
        assert_eq!(parse_wave("1@+0s", 7).unwrap().start, 7);
        for bad in ["100", "x@+1h", "100@soon", "100@+"] {
            assert_eq!(parse_wave(bad, 0).unwrap_err().kind(), "bad_wave", "{bad}");
        }
        assert_eq!(format_time(1_767_225_600), "2026-01-01T00:00:00Z");
    }
}
