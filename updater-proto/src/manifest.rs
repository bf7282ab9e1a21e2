//! The manifest, schema versions 1 and 2 (2 adds chunk indexes): what the publisher signs
//! and the agent installs.
//!
//! Unknown fields are rejected (`deny_unknown_fields`): a misspelt security field (say
//! `min_running_versoin`) must not be silently ignored. Additions that old agents must not
//! misread go into a new `schema_version`; see `docs/manifest.md`.

use std::collections::BTreeSet;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::rollout::{Wave, SEED_SPACE};

/// The base schema version: full images only. v1 manifests are read exactly as before.
pub const SCHEMA_VERSION: u32 = 1;
/// Schema version 2: v1 plus an optional `chunk_index` per image entry (delta updates, see
/// `docs/delta.md`). Agents that only read v1 refuse it as an unsupported version.
pub const SCHEMA_VERSION_CHUNKED: u32 = 2;

/// Whether this crate reads manifests of schema version `v`.
pub fn is_supported_schema_version(v: u64) -> bool {
    v == u64::from(SCHEMA_VERSION) || v == u64::from(SCHEMA_VERSION_CHUNKED)
}
/// Upper bound on the number of image entries (one per partition role of a slot).
pub const MAX_IMAGES: usize = 16;
/// Upper bound on the number of rollout waves.
pub const MAX_WAVES: usize = 64;
/// Upper bound on the length of an image URL.
pub const MAX_URL_LEN: usize = 512;

/// A signed description of one release for one product on one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`SCHEMA_VERSION`] for this crate.
    pub schema_version: u32,
    /// Product/board compatibility string; the agent installs only its own product.
    pub product: String,
    /// Release channel, e.g. `stable` or `beta`.
    pub channel: String,
    /// Version of the OS image this manifest installs.
    pub version: Version,
    /// Per-channel counter that only grows from one published manifest to the next; the
    /// agent persists the highest one seen and refuses anything lower (rollback attack).
    pub serial: u64,
    /// Issue time, Unix seconds (UTC).
    pub issued_at: i64,
    /// Expiry, Unix seconds (UTC): after this the manifest is refused (freeze attack).
    pub expires_at: i64,
    /// Hosts running a version below this must first install an intermediate release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_running_version: Option<Version>,
    /// Staged rollout; empty means every host is eligible at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Wave>,
    /// One entry per partition role of a slot (`root`, or `boot`+`root`+`verity`).
    pub images: Vec<ImageEntry>,
}

/// One partition image of the release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    /// Partition role inside a slot, e.g. `root`; unique within a manifest.
    pub role: String,
    /// Location of the (possibly compressed) image, relative to the manifest's URL.
    pub url: String,
    /// Size in bytes of the decompressed image, as written to the partition.
    pub size: u64,
    /// Lower-case hex SHA-256 of the decompressed image.
    pub sha256: String,
    /// How the bytes at `url` are encoded.
    pub compression: Compression,
    /// Size in bytes of the file at `url`.
    pub compressed_size: u64,
    /// Lower-case hex SHA-256 of the file at `url`, so bad bytes are caught before decoding.
    pub compressed_sha256: String,
    /// Schema version 2 only: the chunk index of the file at `url` (a zstd stream of one
    /// frame per content-defined chunk), for delta installs. Absent in v1 manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_index: Option<ChunkIndexRef>,
}

/// Where the chunk index of a chunked image is, and its signed size and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkIndexRef {
    /// Location of the index file, relative to the manifest's URL.
    pub url: String,
    /// Size in bytes of the index file.
    pub size: u64,
    /// Lower-case hex SHA-256 of the index file.
    pub sha256: String,
}

/// Encoding of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is: `compressed_*` equal the plain `size`/`sha256`.
    None,
    /// A zstd frame.
    Zstd,
}

impl Compression {
    /// The name used in manifests and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!(
                "unknown compression {other:?} (expected \"none\" or \"zstd\")"
            )),
        }
    }
}

/// A manifest that parsed but breaks a rule of the schema; `field` is the JSON path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("manifest field `{field}`: {problem}")]
pub struct SchemaError {
    /// JSON path of the offending field, e.g. `images[1].sha256`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

fn schema_err(field: impl Into<String>, problem: impl Into<String>) -> SchemaError {
    SchemaError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// `[A-Za-z0-9._-]`, 1..=max characters: names that are safe in logs, paths and URLs.
fn check_name(field: &str, value: &str, max: usize) -> Result<(), SchemaError> {
    if value.is_empty() || value.len() > max {
        return Err(schema_err(
            field,
            format!("must be 1 to {max} characters, got {}", value.len()),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(schema_err(
            field,
            format!("character {c:?} not allowed (use A-Z a-z 0-9 . _ -)"),
        ));
    }
    Ok(())
}

/// Longest partition role name.
pub const MAX_ROLE_LEN: usize = 32;

/// Check a partition role name (`[A-Za-z0-9._-]`, 1 to [`MAX_ROLE_LEN`] characters).
pub fn validate_role(role: &str) -> Result<(), SchemaError> {
    check_name("role", role, MAX_ROLE_LEN)
}

/// `at.name`, or just `name` at the root.
fn join(at: &str, name: &str) -> String {
    if at.is_empty() {
        name.to_owned()
    } else {
        format!("{at}.{name}")
    }
}

fn check_sha256_hex(field: &str, value: &str) -> Result<(), SchemaError> {
    if value.len() != 64
        || !value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(schema_err(
            field,
            "must be 64 lower-case hex characters (a SHA-256 digest)",
        ));
    }
    Ok(())
}

/// A relative URL made only of `/`-separated segments of `[A-Za-z0-9._-]`, none of them
/// `.` or `..`: no scheme, no host, no query, no escapes, cannot leave the manifest's directory.
fn check_relative_url(field: &str, url: &str) -> Result<(), SchemaError> {
    if url.is_empty() || url.len() > MAX_URL_LEN {
        return Err(schema_err(
            field,
            format!("must be 1 to {MAX_URL_LEN} characters"),
        ));
    }
    for segment in url.split('/') {
        if segment.is_empty() {
            return Err(schema_err(
                field,
                format!("{url:?} has an empty path segment (leading, trailing or double `/`)"),
            ));
        }
        if segment == "." || segment == ".." {
            return Err(schema_err(
                field,
                format!(
                    "{url:?} contains a `{segment}` segment; URLs must stay below the manifest"
                ),
            ));
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(schema_err(
                field,
                format!(
                    "{url:?} contains {c:?}; only a relative path of A-Z a-z 0-9 . _ - and / is allowed"
                ),
            ));
        }
    }
    Ok(())
}

impl Manifest {
    /// Check every rule that serde's types cannot express. Field names in errors are JSON paths.
    pub fn validate(&self) -> Result<(), SchemaError> {
        if !is_supported_schema_version(u64::from(self.schema_version)) {
            return Err(schema_err(
                "schema_version",
                format!(
                    "must be {SCHEMA_VERSION} or {SCHEMA_VERSION_CHUNKED}, got {}",
                    self.schema_version
                ),
            ));
        }
        check_name("product", &self.product, 64)?;
        check_name("channel", &self.channel, 64)?;
        if self.expires_at <= self.issued_at {
            return Err(schema_err(
                "expires_at",
                format!(
                    "must be after issued_at ({}), got {}",
                    self.issued_at, self.expires_at
                ),
            ));
        }
        if let Some(min) = &self.min_running_version {
            if *min > self.version {
                return Err(schema_err(
                    "min_running_version",
                    format!("{min} is above the release's own version {}", self.version),
                ));
            }
        }
        self.validate_waves()?;
        self.validate_images()
    }

    fn validate_waves(&self) -> Result<(), SchemaError> {
        if self.waves.len() > MAX_WAVES {
            return Err(schema_err(
                "waves",
                format!("at most {MAX_WAVES} waves, got {}", self.waves.len()),
            ));
        }
        let mut prev: Option<&Wave> = None;
        for (i, wave) in self.waves.iter().enumerate() {
            if wave.seed_bound == 0 || wave.seed_bound > SEED_SPACE {
                return Err(schema_err(
                    format!("waves[{i}].seed_bound"),
                    format!("must be in 1..={SEED_SPACE}, got {}", wave.seed_bound),
                ));
            }
            if let Some(p) = prev {
                if wave.seed_bound <= p.seed_bound {
                    return Err(schema_err(
                        format!("waves[{i}].seed_bound"),
                        format!(
                            "must be above the previous wave's bound {}, got {}",
                            p.seed_bound, wave.seed_bound
                        ),
                    ));
                }
                if wave.start < p.start {
                    return Err(schema_err(
                        format!("waves[{i}].start"),
                        format!(
                            "must not be before the previous wave's start {}, got {}",
                            p.start, wave.start
                        ),
                    ));
                }
            }
            prev = Some(wave);
        }
        Ok(())
    }

    fn validate_images(&self) -> Result<(), SchemaError> {
        if self.images.is_empty() {
            return Err(schema_err("images", "at least one image entry is required"));
        }
        if self.images.len() > MAX_IMAGES {
            return Err(schema_err(
                "images",
                format!("at most {MAX_IMAGES} entries, got {}", self.images.len()),
            ));
        }
        let mut roles = BTreeSet::new();
        for (i, image) in self.images.iter().enumerate() {
            image.validate_at(&format!("images[{i}]"))?;
            if image.chunk_index.is_some() && self.schema_version < SCHEMA_VERSION_CHUNKED {
                return Err(schema_err(
                    format!("images[{i}].chunk_index"),
                    format!("needs schema_version {SCHEMA_VERSION_CHUNKED}"),
                ));
            }
            if !roles.insert(image.role.as_str()) {
                return Err(schema_err(
                    format!("images[{i}].role"),
                    format!("role {:?} appears more than once", image.role),
                ));
            }
        }
        Ok(())
    }

    /// The image entry for a partition role, if the release has one.
    pub fn image(&self, role: &str) -> Option<&ImageEntry> {
        self.images.iter().find(|i| i.role == role)
    }

    /// Whether a host running `running` may install this release directly.
    pub fn allows_upgrade_from(&self, running: &Version) -> bool {
        self.min_running_version
            .as_ref()
            .is_none_or(|min| running >= min)
    }

    /// The exact payload bytes that get signed: compact JSON.
    pub fn to_payload(&self) -> Vec<u8> {
        // Serializing plain structs of strings and integers into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One image entry, or an array of them, as `update-publish image` writes them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    Many(Vec<serde_json::Value>),
    One(serde_json::Value),
}

impl ImageEntry {
    /// Parse and validate image entries from JSON (one object or an array of objects);
    /// errors name the JSON path, e.g. `[1].sha256`.
    pub fn parse_entries(json: &[u8]) -> Result<Vec<ImageEntry>, SchemaError> {
        let parsed: OneOrMany =
            serde_json::from_slice(json).map_err(|e| schema_err(".", e.to_string()))?;
        let (values, prefix): (Vec<serde_json::Value>, Box<dyn Fn(usize) -> String>) = match parsed
        {
            OneOrMany::Many(v) => (v, Box::new(|i| format!("[{i}]"))),
            OneOrMany::One(v) => (vec![v], Box::new(|_| String::new())),
        };
        let mut out = Vec::with_capacity(values.len());
        for (i, v) in values.into_iter().enumerate() {
            let at = prefix(i);
            let entry: ImageEntry = serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                let field = match (at.is_empty(), path.as_str()) {
                    (true, p) => p.to_owned(),
                    (false, ".") => at.clone(),
                    (false, p) => format!("{at}.{p}"),
                };
                schema_err(field, e.into_inner().to_string())
            })?;
            entry.validate_at(&at)?;
            out.push(entry);
        }
        Ok(out)
    }

    /// Validate one entry; `at` is its JSON path (e.g. `images[0]`, or empty) for messages.
    pub fn validate_at(&self, at: &str) -> Result<(), SchemaError> {
        check_name(&join(at, "role"), &self.role, MAX_ROLE_LEN)?;
        check_relative_url(&join(at, "url"), &self.url)?;
        if self.size == 0 {
            return Err(schema_err(join(at, "size"), "must be greater than 0"));
        }
        if self.compressed_size == 0 {
            return Err(schema_err(
                join(at, "compressed_size"),
                "must be greater than 0",
            ));
        }
        check_sha256_hex(&join(at, "sha256"), &self.sha256)?;
        check_sha256_hex(&join(at, "compressed_sha256"), &self.compressed_sha256)?;
        if let Some(ix) = &self.chunk_index {
            let at = join(at, "chunk_index");
            check_relative_url(&join(&at, "url"), &ix.url)?;
            check_sha256_hex(&join(&at, "sha256"), &ix.sha256)?;
            let bound = crate::chunk_index::max_index_len(self.size);
            if ix.size < crate::chunk_index::HEADER_LEN as u64 || ix.size > bound {
                return Err(schema_err(
                    join(&at, "size"),
                    format!(
                        "must be {} to {bound} bytes for an image of {} bytes",
                        crate::chunk_index::HEADER_LEN,
                        self.size
                    ),
                ));
            }
            if self.compression != Compression::Zstd {
                return Err(schema_err(
                    at.clone(),
                    "a chunked image must have compression \"zstd\"",
                ));
            }
        }
        if self.compression == Compression::None {
            if self.compressed_size != self.size {
                return Err(schema_err(
                    join(at, "compressed_size"),
                    "must equal size when compression is \"none\"",
                ));
            }
            if self.compressed_sha256 != self.sha256 {
                return Err(schema_err(
                    join(at, "compressed_sha256"),
                    "must equal sha256 when compression is \"none\"",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    pub(crate) fn entry(role: &str) -> ImageEntry {
        ImageEntry {
            role: role.into(),
            url: format!("images/{role}.img.zst"),
            size: 4096,
            sha256: "a".repeat(64),
            compression: Compression::Zstd,
            compressed_size: 100,
            compressed_sha256: "b".repeat(64),
            chunk_index: None,
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            schema_version: 1,
            product: "acme-edge".into(),
            channel: "stable".into(),
            version: Version::new(1, 2, 3),
            serial: 5,
            issued_at: 1000,
            expires_at: 2000,
            min_running_version: None,
            waves: vec![],
            images: vec![entry("root")],
        }
    }

    fn field_of(m: &Manifest) -> String {
        m.validate().unwrap_err().field
    }

    #[test]
    fn valid_manifest_passes_and_round_trips() {
        let m = manifest();
        m.validate().unwrap();
        let back: Manifest = serde_json::from_slice(&m.to_payload()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn urls_must_stay_relative_and_plain() {
        for bad in [
            "https://evil/x",
            "/abs",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "",
            "a?b",
            "a%2e",
            "a\\b",
            ".",
        ] {
            let mut m = manifest();
            m.images[0].url = bad.into();
            assert_eq!(field_of(&m), "images[0].url", "{bad:?} accepted");
        }
        let mut m = manifest();
        m.images[0].url = "v1.2.3/root-0123.img.zst".into();
        m.validate().unwrap();
    }

    #[test]
    fn each_rule_names_its_field() {
        let mut m = manifest();
        m.images.push(entry("root"));
        assert_eq!(field_of(&m), "images[1].role");

        let mut m = manifest();
        m.images[0].sha256 = "A".repeat(64);
        assert_eq!(field_of(&m), "images[0].sha256");

        let mut m = manifest();
        m.images[0].compressed_sha256 = "ab".into();
        assert_eq!(field_of(&m), "images[0].compressed_sha256");

        let mut m = manifest();
        m.images[0].size = 0;
        assert_eq!(field_of(&m), "images[0].size");

        let mut m = manifest();
        m.images[0].compression = Compression::None;
        assert_eq!(field_of(&m), "images[0].compressed_size");

        let mut m = manifest();
        m.images.clear();
        assert_eq!(field_of(&m), "images");

        let mut m = manifest();
        m.expires_at = m.issued_at;
        assert_eq!(field_of(&m), "expires_at");

        let mut m = manifest();
        m.product = "acme edge".into();
        assert_eq!(field_of(&m), "product");

        let mut m = manifest();
        m.min_running_version = Some(Version::new(2, 0, 0));
        assert_eq!(field_of(&m), "min_running_version");

        let mut m = manifest();
        m.waves = vec![
            Wave {
                seed_bound: 100,
                start: 10,
            },
            Wave {
                seed_bound: 100,
                start: 20,
            },
        ];
        assert_eq!(field_of(&m), "waves[1].seed_bound");

        let mut m = manifest();
        m.waves = vec![
            Wave {
                seed_bound: 100,
                start: 30,
            },
            Wave {
                seed_bound: 200,
                start: 20,
            },
        ];
        assert_eq!(field_of(&m), "waves[1].start");

        let mut m = manifest();
        m.waves = vec![Wave {
            seed_bound: SEED_SPACE + 1,
            start: 0,
        }];
        assert_eq!(field_of(&m), "waves[0].seed_bound");
    }

    #[test]
    fn image_entries_parse_one_or_many_and_name_fields() {
        let one = serde_json::to_vec(&entry("root")).unwrap();
        assert_eq!(
            ImageEntry::parse_entries(&one).unwrap(),
            vec![entry("root")]
        );
        let many = serde_json::to_vec(&vec![entry("boot"), entry("root")]).unwrap();
        assert_eq!(ImageEntry::parse_entries(&many).unwrap().len(), 2);
        let mut v = serde_json::to_value(vec![entry("boot"), entry("root")]).unwrap();
        v[1]["size"] = "big".into();
        let err = ImageEntry::parse_entries(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(err.field, "[1].size");
        v[1]["size"] = 0.into();
        let err = ImageEntry::parse_entries(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(err.field, "[1].size");
        assert!(ImageEntry::parse_entries(b"nope").is_err());
    }

    #[test]
    fn chunk_index_needs_schema_2_and_a_sane_size() {
        let mut m = manifest();
        m.images[0].chunk_index = Some(ChunkIndexRef {
            url: "images/root.idx".into(),
            size: 48 + 56,
            sha256: "c".repeat(64),
        });
        assert_eq!(field_of(&m), "images[0].chunk_index");
        m.schema_version = SCHEMA_VERSION_CHUNKED;
        m.validate().unwrap();
        let back: Manifest = serde_json::from_slice(&m.to_payload()).unwrap();
        assert_eq!(back, m);
        // v1 payloads are unchanged: no `chunk_index` key when absent.
        let v1 = manifest();
        assert!(!String::from_utf8(v1.to_payload())
            .unwrap()
            .contains("chunk_index"));
        let mut big = m.clone();
        big.images[0].chunk_index.as_mut().unwrap().size = 1 << 30;
        assert_eq!(field_of(&big), "images[0].chunk_index.size");
        let mut raw = m.clone();
        raw.images[0].compression = Compression::None;
        raw.images[0].compressed_size = raw.images[0].size;
        raw.images[0].compressed_sha256 = raw.images[0].sha256.clone();
        assert_eq!(field_of(&raw), "images[0].chunk_index");
        m.schema_version = 3;
        assert_eq!(field_of(&m), "schema_version");
    }

    #[test]
    fn min_running_version_gates_direct_upgrades() {
        let mut m = manifest();
        assert!(m.allows_upgrade_from(&Version::new(0, 1, 0)));
        m.min_running_version = Some(Version::new(1, 0, 0));
        assert!(!m.allows_upgrade_from(&Version::new(0, 9, 9)));
        assert!(m.allows_upgrade_from(&Version::new(1, 0, 0)));
    }
}
