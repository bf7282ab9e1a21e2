//! The U-Boot environment format, read and written compatibly with U-Boot and libubootenv
//! (`fw_printenv` / `fw_setenv`).
//!
//! A copy is `SIZE` bytes: a CRC32 (IEEE, little-endian) of the data area, for a redundant
//! pair a flag byte, then the data area: `name=value` strings each ended by NUL, an empty
//! string (a second NUL) ending the list, padding to the end. The CRC covers the whole data
//! area including padding. With two copies (`CONFIG_SYS_REDUNDAND_ENVIRONMENT`, a second line
//! in `fw_env.config`) the valid copy with the newer flag wins (flags count up by one per
//! write and wrap: 0 is newer than 255; equal flags: the first copy), as in U-Boot's
//! `env_import_redund` and libubootenv. A write goes to the *other* copy with the next flag
//! value and is flushed, so a power cut leaves the current copy valid.

use crate::disk::{BlockDevice, FileDevice};
use std::fmt;
use std::path::{Path, PathBuf};

/// Bytes before the data area: CRC only (single copy).
const HEADER_SINGLE: usize = 4;
/// Bytes before the data area: CRC and flag byte (redundant pair).
const HEADER_REDUNDANT: usize = 5;

/// Errors of the environment format and its storage.
#[derive(Debug, thiserror::Error)]
pub enum UbootEnvError {
    #[error("I/O error on U-Boot environment {location}: {source}")]
    Io {
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error("U-Boot environment config {location} line {line}: {reason}")]
    Config {
        location: String,
        line: usize,
        reason: String,
    },
    #[error("U-Boot environment {location}: no copy has a valid CRC ({detail})")]
    BadCrc { location: String, detail: String },
    #[error("U-Boot environment {location} is malformed at data byte {offset}: {reason}")]
    Malformed {
        location: String,
        offset: usize,
        reason: String,
    },
    #[error("U-Boot environment {location}: variables need {needed} bytes, more than the {capacity} the data area holds")]
    TooLarge {
        location: String,
        needed: usize,
        capacity: usize,
    },
    #[error("invalid U-Boot variable {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid value for U-Boot variable {name}: {reason}")]
    InvalidValue { name: String, reason: String },
}

impl UbootEnvError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            UbootEnvError::Io { .. } => "ubootenv_io",
            UbootEnvError::Config { .. } => "ubootenv_config",
            UbootEnvError::BadCrc { .. } => "ubootenv_bad_crc",
            UbootEnvError::Malformed { .. } => "ubootenv_malformed",
            UbootEnvError::TooLarge { .. } => "ubootenv_too_large",
            UbootEnvError::InvalidName { .. } => "ubootenv_invalid_name",
            UbootEnvError::InvalidValue { .. } => "ubootenv_invalid_value",
        }
    }
}

/// The variables of one environment, in stored order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UbootEnv {
    vars: Vec<(String, String)>,
}

impl UbootEnv {
    /// An empty environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parse a data area (after CRC and flag): NUL-terminated `name=value` strings up to an
    /// empty string. Bytes after the terminator are padding and not looked at.
    pub fn parse_data(data: &[u8], location: &str) -> Result<Self, UbootEnvError> {
        let malformed = |offset: usize, reason: &str| UbootEnvError::Malformed {
            location: location.to_string(),
            offset,
            reason: reason.to_string(),
        };
        let mut vars: Vec<(String, String)> = Vec::new();
        let mut p = 0;
        loop {
            let Some(len) = data[p..].iter().position(|&b| b == 0) else {
                return Err(malformed(
                    p,
                    "variable list is not terminated by an empty string",
                ));
            };
            if len == 0 {
                break;
            }
            let entry = std::str::from_utf8(&data[p..p + len])
                .map_err(|_| malformed(p, "entry is not UTF-8"))?;
            let Some((name, value)) = entry.split_once('=') else {
                return Err(malformed(p, "entry has no '='"));
            };
            validate_name(name).map_err(|e| malformed(p, &e.to_string()))?;
            if vars.iter().any(|(n, _)| n == name) {
                return Err(malformed(p, &format!("variable {name} is set twice")));
            }
            vars.push((name.to_string(), value.to_string()));
            p += len + 1;
        }
        Ok(UbootEnv { vars })
    }

    /// Serialize into a data area of exactly `capacity` bytes, zero padded.
    pub fn to_data(&self, capacity: usize, location: &str) -> Result<Vec<u8>, UbootEnvError> {
        let mut out = Vec::with_capacity(capacity);
        for (name, value) in &self.vars {
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(0);
        }
        out.push(0);
        if out.len() > capacity {
            return Err(UbootEnvError::TooLarge {
                location: location.to_string(),
                needed: out.len(),
                capacity,
            });
        }
        out.resize(capacity, 0);
        Ok(out)
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Set `name` (in place, or appended).
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), UbootEnvError> {
        validate_name(name)?;
        if value.contains('\0') {
            return Err(UbootEnvError::InvalidValue {
                name: name.to_string(),
                reason: "contains NUL".into(),
            });
        }
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value.to_string(),
            None => self.vars.push((name.to_string(), value.to_string())),
        }
        Ok(())
    }

    /// Remove `name`.
    pub fn unset(&mut self, name: &str) {
        self.vars.retain(|(n, _)| n != name);
    }

    /// All variables in stored order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

fn validate_name(name: &str) -> Result<(), UbootEnvError> {
    let bad = |reason: &str| {
        Err(UbootEnvError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.contains(['=', '\0']) || name.chars().any(char::is_whitespace) {
        return bad("contains '=', NUL or whitespace");
    }
    Ok(())
}

/// Encode one copy of `size` bytes; `flag` is `Some` for a copy of a redundant pair.
pub fn encode_copy(
    env: &UbootEnv,
    size: usize,
    flag: Option<u8>,
    location: &str,
) -> Result<Vec<u8>, UbootEnvError> {
    let header = if flag.is_some() {
        HEADER_REDUNDANT
    } else {
        HEADER_SINGLE
    };
    let capacity = size.saturating_sub(header);
    let data = env.to_data(capacity, location)?;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
    if let Some(f) = flag {
        out.push(f);
    }
    out.extend_from_slice(&data);
    Ok(out)
}

/// Why one copy was not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyDefect {
    /// Stored CRC differs from the data's.
    Crc { stored: u32, computed: u32 },
    /// Shorter than its header.
    Short,
}

impl fmt::Display for CopyDefect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyDefect::Crc { stored, computed } => {
                write!(f, "stored CRC {stored:#010x}, data has {computed:#010x}")
            }
            CopyDefect::Short => f.write_str("shorter than its header"),
        }
    }
}

/// Check one copy's CRC: `Ok((flag, data area))`. `redundant` selects the flag byte.
pub fn check_copy(bytes: &[u8], redundant: bool) -> Result<(Option<u8>, &[u8]), CopyDefect> {
    let header = if redundant {
        HEADER_REDUNDANT
    } else {
        HEADER_SINGLE
    };
    if bytes.len() < header + 1 {
        return Err(CopyDefect::Short);
    }
    let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let data = &bytes[header..];
    let computed = crc32fast::hash(data);
    if stored != computed {
        return Err(CopyDefect::Crc { stored, computed });
    }
    Ok((redundant.then(|| bytes[4]), data))
}

/// Which of two valid copies is newer, by their flags: U-Boot's rule (0 after 255 wraps;
/// otherwise the larger; equal: the first). Returns 0 or 1.
pub fn newer_copy(flag0: u8, flag1: u8) -> usize {
    if flag0 == 255 && flag1 == 0 {
        1
    } else if flag1 == 255 && flag0 == 0 {
        0
    } else if flag1 > flag0 {
        1
    } else {
        0
    }
}

/// One line of `fw_env.config`: where a copy lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    pub device: PathBuf,
    pub offset: u64,
    pub size: usize,
}

/// Parse `fw_env.config` text: `DEVICE OFFSET SIZE [SECTOR-SIZE [SECTORS]]` per line, `#`
/// comments; one line (single copy) or two (redundant pair, same size). Numbers are decimal
/// or `0x` hex, as libubootenv reads them.
pub fn parse_fw_env_config(text: &str, location: &str) -> Result<Vec<CopySpec>, UbootEnvError> {
    let bad = |line: usize, reason: String| UbootEnvError::Config {
        location: location.to_string(),
        line,
        reason,
    };
    let mut specs = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 {
            return Err(bad(i + 1, "expected DEVICE OFFSET SIZE".into()));
        }
        let num = |s: &str, what: &str| -> Result<u64, UbootEnvError> {
            let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.map_err(|_| bad(i + 1, format!("{what} {s:?} is not a number")))
        };
        let offset = num(fields[1], "offset")?;
        let size = num(fields[2], "size")?;
        if !(HEADER_REDUNDANT as u64 + 1..=16 << 20).contains(&size) {
            return Err(bad(
                i + 1,
                format!("size {size} is out of range 6..=16 MiB"),
            ));
        }
        specs.push(CopySpec {
            device: PathBuf::from(fields[0]),
            offset,
            size: size as usize,
        });
    }
    match specs.len() {
        1 => {}
        2 if specs[0].size == specs[1].size => {}
        2 => return Err(bad(0, "the two copies have different sizes".into())),
        n => return Err(bad(0, format!("expected 1 or 2 copies, found {n}"))),
    }
    Ok(specs)
}

/// One stored copy: its device and where on it.
pub struct EnvCopy {
    pub dev: Box<dyn BlockDevice>,
    pub name: String,
    pub offset: u64,
    pub size: usize,
}

impl fmt::Debug for EnvCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} offset {} size {}", self.name, self.offset, self.size)
    }
}

/// What a read found: the environment and which copy it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadEnv {
    pub env: UbootEnv,
    /// Index of the copy read (0 or 1).
    pub copy: usize,
    /// Its flag (`None` for a single copy).
    pub flag: Option<u8>,
    /// Why the other copy was not used, when it was invalid.
    pub other_defect: Option<String>,
}

/// An environment in one copy or a redundant pair.
#[derive(Debug)]
pub struct EnvStore {
    copies: Vec<EnvCopy>,
}

impl EnvStore {
    /// A store over one copy or two (a redundant pair, same size).
    pub fn new(copies: Vec<EnvCopy>) -> Result<Self, UbootEnvError> {
        let ok = match copies.as_slice() {
            [_] => true,
            [a, b] => a.size == b.size,
            _ => false,
        };
        if !ok {
            return Err(UbootEnvError::Config {
                location: "environment store".into(),
                line: 0,
                reason: "expected one copy or two of the same size".into(),
            });
        }
        Ok(EnvStore { copies })
    }

    /// Open the copies named by a `fw_env.config` file.
    pub fn from_fw_env_config(path: &Path) -> Result<Self, UbootEnvError> {
        let location = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| UbootEnvError::Io {
            location: location.clone(),
            source,
        })?;
        let specs = parse_fw_env_config(&text, &location)?;
        let copies = specs
            .into_iter()
            .map(|s| {
                let name = s.device.display().to_string();
                let dev = FileDevice::open_buffered(&s.device).map_err(|e| UbootEnvError::Io {
                    location: name.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                Ok(EnvCopy {
                    dev: Box::new(dev),
                    name,
                    offset: s.offset,
                    size: s.size,
                })
            })
            .collect::<Result<Vec<_>, UbootEnvError>>()?;
        Self::new(copies)
    }

    /// Whether this is a redundant pair.
    pub fn redundant(&self) -> bool {
        self.copies.len() == 2
    }

    /// Human name for messages.
    pub fn describe(&self) -> String {
        self.copies
            .iter()
            .map(|c| format!("{} offset {:#x}", c.name, c.offset))
            .collect::<Vec<_>>()
            .join(" + ")
    }

    /// The copies (the simulator and tests reach the devices through them).
    pub fn copies_mut(&mut self) -> &mut [EnvCopy] {
        &mut self.copies
    }

    fn read_raw(&self, i: usize) -> Result<Vec<u8>, UbootEnvError> {
        let c = &self.copies[i];
        let mut buf = vec![0u8; c.size];
        c.dev
            .read_at(&mut buf, c.offset)
            .map_err(|source| UbootEnvError::Io {
                location: format!("{} offset {:#x}", c.name, c.offset),
                source,
            })?;
        Ok(buf)
    }

    /// Read the valid, newest copy.
    pub fn read(&self) -> Result<ReadEnv, UbootEnvError> {
        let loc = self.describe();
        let redundant = self.redundant();
        let raws = (0..self.copies.len())
            .map(|i| self.read_raw(i))
            .collect::<Result<Vec<_>, _>>()?;
        let checked: Vec<_> = raws.iter().map(|r| check_copy(r, redundant)).collect();
        let pick = match checked.as_slice() {
            [Ok(_)] => 0,
            [Ok((f0, _)), Ok((f1, _))] => newer_copy(f0.unwrap_or(0), f1.unwrap_or(0)),
            [Ok(_), Err(_)] => 0,
            [Err(_), Ok(_)] => 1,
            _ => {
                let detail = checked
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| c.as_ref().err().map(|d| format!("copy {i}: {d}")))
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(UbootEnvError::BadCrc {
                    location: loc,
                    detail,
                });
            }
        };
        let other_defect = checked
            .get(1 - pick)
            .and_then(|c| c.as_ref().err().map(|d| d.to_string()))
            .filter(|_| redundant);
        let (flag, data) = checked[pick].as_ref().map_err(|_| UbootEnvError::BadCrc {
            location: loc.clone(),
            detail: "internal: picked an invalid copy".into(),
        })?;
        let env = UbootEnv::parse_data(data, &format!("{loc} copy {pick}"))?;
        Ok(ReadEnv {
            env,
            copy: pick,
            flag: *flag,
            other_defect,
        })
    }

    /// Write `env`. Single copy: in place, then flush. Redundant pair: into the copy not read
    /// last (`current` from [`read`](Self::read)) with the next flag, then flush; the current
    /// copy is untouched, so a power cut at any point leaves one valid copy. On an encoding
    /// error nothing is written.
    pub fn write(&mut self, env: &UbootEnv, current: &ReadEnv) -> Result<(), UbootEnvError> {
        let loc = self.describe();
        let (target, flag) = if self.redundant() {
            (
                1 - current.copy,
                Some(current.flag.unwrap_or(0).wrapping_add(1)),
            )
        } else {
            (0, None)
        };
        let c = &mut self.copies[target];
        let bytes = encode_copy(env, c.size, flag, &loc)?;
        let io = |source| UbootEnvError::Io {
            location: format!("{} offset {:#x}", c.name, c.offset),
            source,
        };
        c.dev.write_at(&bytes, c.offset).map_err(io)?;
        c.dev.flush().map_err(io)
    }

    /// Write `env` into every copy (provisioning a fresh store): copy 0 with flag 1, copy 1
    /// with flag 0, so copy 0 is current.
    pub fn provision(&mut self, env: &UbootEnv) -> Result<(), UbootEnvError> {
        let loc = self.describe();
        let redundant = self.redundant();
        for (i, c) in self.copies.iter_mut().enumerate() {
            let flag = redundant.then_some(if i == 0 { 1 } else { 0 });
            let bytes = encode_copy(env, c.size, flag, &loc)?;
            let io = |source| UbootEnvError::Io {
                location: format!("{} offset {:#x}", c.name, c.offset),
                source,
            };
            c.dev.write_at(&bytes, c.offset).map_err(io)?;
            c.dev.flush().map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn flag_order_wraps() {
        assert_eq!(newer_copy(1, 0), 0);
        assert_eq!(newer_copy(1, 2), 1);
        assert_eq!(newer_copy(255, 0), 1);
        assert_eq!(newer_copy(0, 255), 0);
        assert_eq!(newer_copy(7, 7), 0);
    }

    #[test]
    fn data_round_trip_and_errors() {
        let mut env = UbootEnv::new();
        env.set("BOOT_ORDER", "A B").unwrap();
        env.set("BOOT_A_LEFT", "3").unwrap();
        let data = env.to_data(64, "mem").unwrap();
        assert!(data.starts_with(b"BOOT_ORDER=A B\0BOOT_A_LEFT=3\0\0"));
        assert_eq!(UbootEnv::parse_data(&data, "mem").unwrap(), env);
        let e = env.to_data(10, "mem").unwrap_err();
        assert_eq!(e.kind(), "ubootenv_too_large");
        let e = UbootEnv::parse_data(b"novalue\0\0", "mem").unwrap_err();
        assert_eq!(e.kind(), "ubootenv_malformed");
        let e = UbootEnv::parse_data(b"a=1\0a=2\0\0", "mem").unwrap_err();
        assert_eq!(e.kind(), "ubootenv_malformed");
        let e = UbootEnv::parse_data(b"a=1", "mem").unwrap_err();
        assert_eq!(e.kind(), "ubootenv_malformed");
    }

    #[test]
    fn config_lines() {
        let s = parse_fw_env_config(
            "# c\n/dev/mmcblk0 0x3c0000 0x20000\n/dev/mmcblk0 0x3e0000 0x20000 0x20000 1\n",
            "cfg",
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].offset, 0x3e0000);
        assert_eq!(s[0].size, 0x20000);
        for bad in ["", "/dev/x 0\n", "/dev/x 0 zz\n", "/d 0 16\n/d 16 32\n"] {
            assert_eq!(
                parse_fw_env_config(bad, "cfg").unwrap_err().kind(),
                "ubootenv_config",
                "{bad:?}"
            );
        }
    }
}
