//! GRUB's environment block format: exactly 1024 bytes, `# GRUB Environment Block\n`, then
//! `name=value\n` lines, padded with `#`, with `\` and newline escaped in values as GRUB does;
//! and where the block lives (a file replaced durably for the loader, or a raw block on a
//! disk). Knows nothing of RAUC's variables.

use super::GrubEnvError;
use crate::disk::BlockDevice;
use std::fmt;
use std::path::PathBuf;

/// Size of a GRUB environment block.
pub const ENV_BLOCK_SIZE: usize = 1024;
/// First line of every GRUB environment block.
pub const ENV_HEADER: &str = "# GRUB Environment Block\n";

/// One line of the block, after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    Var {
        name: String,
        value: String,
    },
    /// A `#` comment line other than the trailing padding, kept verbatim (without `\n`).
    Comment(String),
}

/// A parsed GRUB environment block: variables (unescaped) and comment lines, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrubEnv {
    lines: Vec<Line>,
}

impl GrubEnv {
    /// An empty block (what `grub-editenv FILE create` makes).
    pub fn new() -> Self {
        Self::default()
    }

    /// Parse a block the way GRUB's `grub_envblk_iterate` does, but strictly: anything GRUB
    /// would silently stop at is an error naming `location` and the byte offset.
    pub fn parse(bytes: &[u8], location: &str) -> Result<Self, GrubEnvError> {
        if bytes.len() != ENV_BLOCK_SIZE {
            return Err(GrubEnvError::WrongSize {
                location: location.to_string(),
                size: bytes.len() as u64,
            });
        }
        if !bytes.starts_with(ENV_HEADER.as_bytes()) {
            return Err(GrubEnvError::MissingHeader {
                location: location.to_string(),
            });
        }
        let malformed = |offset: usize, reason: &str| GrubEnvError::Malformed {
            location: location.to_string(),
            offset,
            reason: reason.to_string(),
        };
        let mut lines = Vec::new();
        let mut p = ENV_HEADER.len();
        while p < bytes.len() {
            if bytes[p] == b'#' {
                match bytes[p..].iter().position(|&b| b == b'\n') {
                    // Only '#' up to the end: the padding.
                    None if bytes[p..].iter().all(|&b| b == b'#') => break,
                    None => return Err(malformed(p, "padding contains bytes other than '#'")),
                    Some(len) => {
                        let text = std::str::from_utf8(&bytes[p..p + len])
                            .map_err(|_| malformed(p, "comment line is not UTF-8"))?;
                        lines.push(Line::Comment(text.to_string()));
                        p += len + 1;
                    }
                }
                continue;
            }
            let name_start = p;
            while p < bytes.len() && bytes[p] != b'=' {
                if bytes[p] == b'\n' || bytes[p] == 0 {
                    return Err(malformed(name_start, "variable line has no '='"));
                }
                p += 1;
            }
            if p == bytes.len() {
                return Err(malformed(
                    name_start,
                    "variable line runs past the block end",
                ));
            }
            let name = std::str::from_utf8(&bytes[name_start..p])
                .map_err(|_| malformed(name_start, "variable name is not UTF-8"))?;
            p += 1;
            let value_start = p;
            let mut value = Vec::new();
            loop {
                match bytes.get(p) {
                    None => {
                        return Err(malformed(
                            name_start,
                            "variable value runs past the block end",
                        ))
                    }
                    Some(b'\n') => break,
                    Some(b'\\') => match bytes.get(p + 1) {
                        Some(&c) => {
                            value.push(c);
                            p += 2;
                        }
                        None => return Err(malformed(p, "dangling '\\' at the block end")),
                    },
                    Some(&c) => {
                        value.push(c);
                        p += 1;
                    }
                }
            }
            p += 1;
            let value = String::from_utf8(value)
                .map_err(|_| malformed(value_start, "variable value is not UTF-8"))?;
            validate_name(name).map_err(|e| malformed(name_start, &e.to_string()))?;
            lines.push(Line::Var {
                name: name.to_string(),
                value,
            });
        }
        Ok(GrubEnv { lines })
    }

    /// Serialize to exactly [`ENV_BLOCK_SIZE`] bytes, escaping `\` and newline as GRUB does.
    pub fn to_block(&self, location: &str) -> Result<Vec<u8>, GrubEnvError> {
        let mut out = Vec::with_capacity(ENV_BLOCK_SIZE);
        out.extend_from_slice(ENV_HEADER.as_bytes());
        for line in &self.lines {
            match line {
                Line::Var { name, value } => {
                    out.extend_from_slice(name.as_bytes());
                    out.push(b'=');
                    for &b in value.as_bytes() {
                        if b == b'\\' || b == b'\n' {
                            out.push(b'\\');
                        }
                        out.push(b);
                    }
                }
                Line::Comment(text) => out.extend_from_slice(text.as_bytes()),
            }
            out.push(b'\n');
        }
        if out.len() > ENV_BLOCK_SIZE {
            return Err(GrubEnvError::TooLarge {
                location: location.to_string(),
                needed: out.len(),
            });
        }
        out.resize(ENV_BLOCK_SIZE, b'#');
        Ok(out)
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| match l {
            Line::Var { name: n, value } if n == name => Some(value.as_str()),
            _ => None,
        })
    }

    /// Set `name` in place (or append it), like `grub-editenv set`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), GrubEnvError> {
        validate_name(name)?;
        for line in &mut self.lines {
            if let Line::Var { name: n, value: v } = line {
                if n == name {
                    *v = value.to_string();
                    return Ok(());
                }
            }
        }
        self.lines.push(Line::Var {
            name: name.to_string(),
            value: value.to_string(),
        });
        Ok(())
    }

    /// Remove `name`, like `grub-editenv unset`.
    pub(crate) fn unset(&mut self, name: &str) {
        self.lines
            .retain(|l| !matches!(l, Line::Var { name: n, .. } if n == name));
    }

    /// All variables in file order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match l {
            Line::Var { name, value } => Some((name.as_str(), value.as_str())),
            Line::Comment(_) => None,
        })
    }
}

fn validate_name(name: &str) -> Result<(), GrubEnvError> {
    let bad = |reason: &str| {
        Err(GrubEnvError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.starts_with('#') {
        return bad("starts with '#', which GRUB reads as a comment");
    }
    if name.contains(['=', '\n', '\0']) {
        return bad("contains '=', a newline or NUL");
    }
    Ok(())
}

/// Where the environment block lives.
pub enum EnvLocation {
    /// A file such as `/boot/grub/grubenv`: replaced atomically and durably for GRUB (temp
    /// file, fsync, rename, fsync dir, `syncfs`, and freeze/thaw on a journaling filesystem:
    /// see [`crate::state::atomic::write_for_loader`]).
    File(PathBuf),
    /// A raw block at a fixed byte offset on a disk (library use and tests; the `[boot]`
    /// config only names a file). Only the 512-byte sectors whose bytes
    /// change are written, lowest first, then flushed. A change confined to one sector is
    /// atomic on disks with atomic sector writes; a change spanning both sectors can tear
    /// on a power cut (GRUB reads a single copy, so a redundant pair would not protect it).
    Device {
        dev: Box<dyn BlockDevice>,
        offset: u64,
    },
}

impl fmt::Debug for EnvLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl EnvLocation {
    /// Human name for messages: the path, or `device offset N`.
    pub fn describe(&self) -> String {
        match self {
            EnvLocation::File(p) => p.display().to_string(),
            EnvLocation::Device { offset, .. } => format!("block at device offset {offset}"),
        }
    }

    /// Read and parse the block.
    pub fn read(&self) -> Result<GrubEnv, GrubEnvError> {
        let loc = self.describe();
        let io = |source| GrubEnvError::Io {
            location: loc.clone(),
            source,
        };
        match self {
            EnvLocation::File(path) => {
                let meta = std::fs::metadata(path).map_err(io)?;
                if meta.len() != ENV_BLOCK_SIZE as u64 {
                    return Err(GrubEnvError::WrongSize {
                        location: loc,
                        size: meta.len(),
                    });
                }
                let bytes = std::fs::read(path).map_err(io)?;
                GrubEnv::parse(&bytes, &loc)
            }
            EnvLocation::Device { dev, offset } => {
                let mut buf = vec![0u8; ENV_BLOCK_SIZE];
                dev.read_at(&mut buf, *offset).map_err(io)?;
                GrubEnv::parse(&buf, &loc)
            }
        }
    }

    /// Serialize and write `env` crash-safely (see the variants). On a serialization error
    /// nothing is written.
    pub fn write(&mut self, env: &GrubEnv) -> Result<(), GrubEnvError> {
        let loc = self.describe();
        let block = env.to_block(&loc)?;
        let io = |source| GrubEnvError::Io {
            location: loc.clone(),
            source,
        };
        match self {
            EnvLocation::File(path) => {
                let mode = std::fs::metadata(&*path)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                    .unwrap_or(0o644);
                crate::state::atomic::write_for_loader(path, &block, mode)
                    .map(drop)
                    .map_err(io)
            }
            EnvLocation::Device { dev, offset } => {
                let mut old = vec![0u8; ENV_BLOCK_SIZE];
                dev.read_at(&mut old, *offset).map_err(io)?;
                let sector = dev.sector_size().max(1) as usize;
                let mut wrote = false;
                for start in (0..ENV_BLOCK_SIZE).step_by(sector) {
                    let end = (start + sector).min(ENV_BLOCK_SIZE);
                    if old[start..end] != block[start..end] {
                        dev.write_at(&block[start..end], *offset + start as u64)
                            .map_err(io)?;
                        wrote = true;
                    }
                }
                if wrote {
                    dev.flush().map_err(io)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn escapes_round_trip() {
        let mut env = GrubEnv::new();
        env.set("x", "a\\b\nc").unwrap();
        let block = env.to_block("mem").unwrap();
        assert!(block.starts_with(b"# GRUB Environment Block\nx=a\\\\b\\\nc\n#"));
        assert_eq!(GrubEnv::parse(&block, "mem").unwrap(), env);
    }
}
