//! Offline bundles: one file carrying a signed manifest and everything it names, for hosts
//! updated from a USB stick or an air-gapped share (`update-agent apply --bundle FILE`,
//! written by `update-publish bundle`). Format: docs/bundles.md.
//!
//! A bundle is a plain POSIX tar (ustar), so `tar tvf` shows what is inside: `manifest.json`
//! first (the signed envelope, byte for byte what a server would serve), then each image
//! file under the relative name the manifest gives it, and any `N.root.json` trust roots.
//! The tar headers are not signed and need not be: nothing in them is trusted. The manifest
//! is verified exactly as a fetched one (keys, threshold, product, channel, expiry, serial
//! floor); roots are verified by their own signatures; every image member is hashed against
//! the manifest's `compressed_sha256` and size before anything is written, so a truncated
//! or tampered bundle is refused with nothing changed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ring::digest::{Context, SHA256};

/// The member holding the signed manifest; always the first.
pub(crate) const MANIFEST_MEMBER: &str = "manifest.json";
/// Most members a bundle may have (a manifest, its images, a chain of roots).
pub(crate) const MAX_MEMBERS: usize = 256;

/// Why a bundle was refused, each with its own stable kind.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle {}: not a bundle: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("bundle {}: truncated: member {member:?} needs bytes up to {needed}, the file has {len}", path.display())]
    Truncated {
        path: PathBuf,
        member: String,
        needed: u64,
        len: u64,
    },
    #[error("bundle {}: member name {name:?} {reason}", path.display())]
    MemberName {
        path: PathBuf,
        name: String,
        reason: &'static str,
    },
    #[error("bundle {}: more than {MAX_MEMBERS} members", path.display())]
    TooManyMembers { path: PathBuf },
    #[error("bundle {}: has no member {member:?}{hint}", path.display())]
    MemberMissing {
        path: PathBuf,
        member: String,
        hint: &'static str,
    },
    #[error("bundle {}: member {member:?} is {size} bytes, larger than the {limit} allowed", path.display())]
    MemberTooLarge {
        path: PathBuf,
        member: String,
        size: u64,
        limit: u64,
    },
    #[error("bundle {}: image {member:?} {what}: the signed manifest says {expected}, the bundle holds {actual}", path.display())]
    ImageMismatch {
        path: PathBuf,
        member: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
}

impl BundleError {
    /// A stable machine-readable kind.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            BundleError::Io { .. } => "bundle_unreadable",
            BundleError::Format { .. } => "bundle_format",
            BundleError::Truncated { .. } => "bundle_truncated",
            BundleError::MemberName { .. } => "bundle_member_name",
            BundleError::TooManyMembers { .. } => "bundle_too_many_members",
            BundleError::MemberMissing { .. } => "bundle_member_missing",
            BundleError::MemberTooLarge { .. } => "bundle_member_too_large",
            BundleError::ImageMismatch { .. } => "bundle_image_mismatch",
        }
    }

    /// A member this bundle does not hold (a root beyond the newest one it carries).
    pub(crate) fn is_missing_member(&self) -> bool {
        matches!(self, BundleError::MemberMissing { .. })
    }
}

/// Where one member's bytes lie in the bundle file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub offset: u64,
    pub size: u64,
}

/// A bundle's table of members, read once when it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub path: PathBuf,
    pub members: BTreeMap<String, Member>,
}

/// A member name must be what a manifest may name: a relative path of plain components
/// (the manifest's own rule for image URLs), so no name can mean two members.
fn check_name(path: &Path, name: &str) -> Result<(), BundleError> {
    let bad = |reason| BundleError::MemberName {
        path: path.to_path_buf(),
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.len() > 255 {
        return Err(bad("is empty or longer than 255 bytes"));
    }
    if name.starts_with('/') {
        return Err(bad("is absolute"));
    }
    if name
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad("has an empty, `.` or `..` component"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
    {
        return Err(bad("has a character other than A-Z a-z 0-9 . _ - /"));
    }
    Ok(())
}

impl Bundle {
    /// Read the member table of the bundle at `path`. Only regular files are accepted; the
    /// first must be `manifest.json`; names are unique and plain; every member lies inside
    /// the file.
    pub fn open(path: &Path) -> Result<Bundle, BundleError> {
        let io = |source| BundleError::Io {
            path: path.to_path_buf(),
            source,
        };
        let format = |reason: String| BundleError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 1024 {
            return Err(format(format!(
                "{len} bytes, shorter than a tar header and its end marker"
            )));
        }
        let mut archive = tar::Archive::new(file);
        let entries = archive
            .entries_with_seek()
            .map_err(|e| format(e.to_string()))?;
        let mut members = BTreeMap::new();
        for (i, entry) in entries.enumerate() {
            let entry = entry.map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    BundleError::Truncated {
                        path: path.to_path_buf(),
                        member: format!("#{i}"),
                        needed: len + 1,
                        len,
                    }
                } else {
                    format(format!("member #{i}: {e}"))
                }
            })?;
            if members.len() >= MAX_MEMBERS {
                return Err(BundleError::TooManyMembers {
                    path: path.to_path_buf(),
                });
            }
            let raw = entry.path_bytes();
            let name = std::str::from_utf8(&raw)
                .map_err(|_| format(format!("member #{i}: name is not UTF-8")))?
                .to_string();
            check_name(path, &name)?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                return Err(format(format!(
                    "member {name:?} is not a regular file ({:?})",
                    entry.header().entry_type()
                )));
            }
            if i == 0 && name != MANIFEST_MEMBER {
                return Err(format(format!(
                    "the first member is {name:?}, not {MANIFEST_MEMBER}"
                )));
            }
            let member = Member {
                offset: entry.raw_file_position(),
                size: entry.size(),
            };
            let end = member.offset.saturating_add(member.size);
            if end > len {
                return Err(BundleError::Truncated {
                    path: path.to_path_buf(),
                    member: name,
                    needed: end,
                    len,
                });
            }
            if members.insert(name.clone(), member).is_some() {
                return Err(format(format!("member {name:?} appears twice")));
            }
        }
        if !members.contains_key(MANIFEST_MEMBER) {
            return Err(BundleError::MemberMissing {
                path: path.to_path_buf(),
                member: MANIFEST_MEMBER.into(),
                hint: " (an empty or truncated bundle)",
            });
        }
        Ok(Bundle {
            path: path.to_path_buf(),
            members,
        })
    }

    /// `name`'s place in the file.
    pub fn member(&self, name: &str) -> Result<Member, BundleError> {
        self.members
            .get(name)
            .copied()
            .ok_or_else(|| BundleError::MemberMissing {
                path: self.path.clone(),
                member: name.to_string(),
                hint: "",
            })
    }

    /// The bytes of member `name`, refused (unread) when larger than `limit`.
    pub(crate) fn read_member(&self, name: &str, limit: u64) -> Result<Vec<u8>, BundleError> {
        let m = self.member(name)?;
        if m.size > limit {
            return Err(BundleError::MemberTooLarge {
                path: self.path.clone(),
                member: name.to_string(),
                size: m.size,
                limit,
            });
        }
        let io = |source| BundleError::Io {
            path: self.path.clone(),
            source,
        };
        let mut f = File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(m.offset)).map_err(io)?;
        let mut buf = Vec::with_capacity(m.size as usize);
        f.take(m.size).read_to_end(&mut buf).map_err(io)?;
        if (buf.len() as u64) < m.size {
            return Err(BundleError::Truncated {
                path: self.path.clone(),
                member: name.to_string(),
                needed: m.offset + m.size,
                len: m.offset + buf.len() as u64,
            });
        }
        Ok(buf)
    }

    /// Check image member `name` against what the signed manifest says of it (its size and
    /// SHA-256 as published, i.e. compressed), reading it once. Run for every image before
    /// anything is written.
    pub(crate) fn check_image(
        &self,
        name: &str,
        size: u64,
        sha256: &[u8; 32],
    ) -> Result<(), BundleError> {
        let m = self.member(name)?;
        let mismatch = |what, expected: String, actual: String| BundleError::ImageMismatch {
            path: self.path.clone(),
            member: name.to_string(),
            what,
            expected,
            actual,
        };
        if m.size != size {
            return Err(mismatch(
                "size",
                size.to_string(),
                format!("{} bytes", m.size),
            ));
        }
        let io = |source| BundleError::Io {
            path: self.path.clone(),
            source,
        };
        let mut f = File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(m.offset)).map_err(io)?;
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = m.size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..want]).map_err(io)?;
            if n == 0 {
                return Err(BundleError::Truncated {
                    path: self.path.clone(),
                    member: name.to_string(),
                    needed: m.offset + m.size,
                    len: m.offset + (m.size - left),
                });
            }
            ctx.update(&buf[..n]);
            left -= n as u64;
        }
        let actual = ctx.finish();
        if actual.as_ref() != sha256 {
            return Err(mismatch(
                "SHA-256",
                hex::encode(sha256),
                hex::encode(actual.as_ref()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn member_names_are_plain_relative_paths() {
        let p = Path::new("b.tar");
        for ok in [
            "manifest.json",
            "usr-2.0.0.img.zst",
            "images/usr.img",
            "3.root.json",
        ] {
            check_name(p, ok).unwrap();
        }
        for bad in ["", "/etc/passwd", "../x", "a//b", "./a", "a/..", "a b", "é"] {
            assert_eq!(
                check_name(p, bad).unwrap_err().kind(),
                "bundle_member_name",
                "{bad:?}"
            );
        }
    }
}
