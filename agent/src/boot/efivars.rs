//! UEFI variables through efivarfs, behind a small trait so tests and the sandbox run on a
//! plain directory of files in the same format.
//!
//! efivarfs shows each variable as a file `Name-vendorguid` whose bytes are the 4-byte
//! attribute word (little-endian: `NON_VOLATILE` 1, `BOOTSERVICE_ACCESS` 2,
//! `RUNTIME_ACCESS` 4) followed by the value. The kernel turns one `write(2)` of attributes
//! plus value into one `SetVariable()` call, which the UEFI specification makes atomic per
//! variable: after a power cut the variable holds the old value or the new one. The kernel
//! marks most variables immutable (`chattr +i`); writing or deleting one takes clearing the
//! flag first (`FS_IOC_SETFLAGS`), which [`EfiVarFs`] does and then restores, as libefivar
//! does. (`BootOrder`, `BootNext` and `Boot####` are on the kernel's list of removable
//! variables and usually carry no flag; systemd-boot's variables do.)

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The EFI global variable vendor GUID (`BootOrder`, `BootNext`, `BootCurrent`, `Boot####`).
pub const GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// Where the kernel mounts efivarfs.
pub(crate) const EFIVARS_DIR: &str = "/sys/firmware/efi/efivars";
/// `NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS`: what boot variables carry.
pub const ATTR_NV_BS_RT: u32 = 7;

/// Errors of UEFI variable access.
#[derive(Debug, thiserror::Error)]
pub enum EfiVarError {
    #[error("I/O error on EFI variable {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("EFI variable {path} is malformed: {reason}")]
    Malformed { path: String, reason: String },
}

impl EfiVarError {
    /// A stable machine-readable kind.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            EfiVarError::Io { .. } => "efi_io",
            EfiVarError::Malformed { .. } => "efi_malformed",
        }
    }
}

/// One variable's value and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfiVar {
    pub attributes: u32,
    pub data: Vec<u8>,
}

/// Access to UEFI variables by name and vendor GUID.
pub trait EfiVars: fmt::Debug {
    /// `None` when the variable does not exist.
    fn get(&self, name: &str, guid: &str) -> Result<Option<EfiVar>, EfiVarError>;
    /// Create or replace the variable in one atomic step.
    fn set(&mut self, name: &str, guid: &str, var: &EfiVar) -> Result<(), EfiVarError>;
    /// Delete the variable (no error when it does not exist).
    fn delete(&mut self, name: &str, guid: &str) -> Result<(), EfiVarError>;
    /// Human name for messages.
    fn describe(&self) -> String;
}

/// The efivarfs directory (or a directory of files in its format).
#[derive(Debug, Clone)]
pub struct EfiVarFs {
    dir: PathBuf,
}

impl EfiVarFs {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        EfiVarFs { dir: dir.into() }
    }

    /// The file of variable `name` with vendor `guid`.
    pub(crate) fn path(&self, name: &str, guid: &str) -> PathBuf {
        self.dir.join(format!("{name}-{guid}"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn is_efivarfs(&self) -> bool {
        // efivarfs' statfs magic.
        nix::sys::statfs::statfs(&self.dir)
            .map(|s| s.filesystem_type() == nix::sys::statfs::FsType(0xde5e_81e4))
            .unwrap_or(false)
    }
}

/// Parse efivarfs bytes: attributes, then the value.
pub(crate) fn decode(bytes: &[u8], path: &str) -> Result<EfiVar, EfiVarError> {
    if bytes.len() < 4 {
        return Err(EfiVarError::Malformed {
            path: path.to_string(),
            reason: format!(
                "{} bytes: shorter than the 4-byte attribute word",
                bytes.len()
            ),
        });
    }
    Ok(EfiVar {
        attributes: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        data: bytes[4..].to_vec(),
    })
}

/// efivarfs bytes of `var`.
pub fn encode(var: &EfiVar) -> Vec<u8> {
    let mut out = var.attributes.to_le_bytes().to_vec();
    out.extend_from_slice(&var.data);
    out
}

impl EfiVars for EfiVarFs {
    fn get(&self, name: &str, guid: &str) -> Result<Option<EfiVar>, EfiVarError> {
        let path = self.path(name, guid);
        match std::fs::read(&path) {
            Ok(bytes) => decode(&bytes, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(EfiVarError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    fn set(&mut self, name: &str, guid: &str, var: &EfiVar) -> Result<(), EfiVarError> {
        let path = self.path(name, guid);
        let p = path.display().to_string();
        let io = |source| EfiVarError::Io {
            path: p.clone(),
            source,
        };
        let efivarfs = self.is_efivarfs();
        let restore = if path.exists() {
            immutable::clear(&path).map_err(io)?
        } else {
            false
        };
        // On efivarfs one write of attributes + value is one SetVariable() (truncating is
        // neither needed nor supported); a plain file must be truncated.
        let result = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(!efivarfs)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&encode(var))?;
                if !efivarfs {
                    f.sync_all()?;
                }
                Ok(())
            });
        if restore {
            immutable::set(&path).map_err(io)?;
        }
        result.map_err(io)?;
        tracing::info!(variable = %p, len = var.data.len(), "EFI variable written");
        Ok(())
    }

    fn delete(&mut self, name: &str, guid: &str) -> Result<(), EfiVarError> {
        let path = self.path(name, guid);
        let p = path.display().to_string();
        let io = |source| EfiVarError::Io {
            path: p.clone(),
            source,
        };
        if !path.exists() {
            return Ok(());
        }
        immutable::clear(&path).map_err(io)?;
        std::fs::remove_file(&path).map_err(io)?;
        if !self.is_efivarfs() {
            std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        tracing::info!(variable = %p, "EFI variable deleted");
        Ok(())
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// The immutable inode flag (`chattr -i` / `+i`) through `FS_IOC_GETFLAGS` /
/// `FS_IOC_SETFLAGS` (linux/fs.h: `_IOR('f', 1, long)` / `_IOW('f', 2, long)`; the kernel
/// copies an int). A filesystem without inode flags (tmpfs before 6.0) has none to clear.
#[allow(unsafe_code)]
mod immutable {
    use std::os::fd::AsRawFd;
    use std::path::Path;

    const FS_IMMUTABLE_FL: nix::libc::c_long = 0x10;
    nix::ioctl_read!(getflags, b'f', 1, nix::libc::c_long);
    nix::ioctl_write_ptr!(setflags, b'f', 2, nix::libc::c_long);

    fn flags(f: &std::fs::File) -> std::io::Result<Option<nix::libc::c_long>> {
        let mut v: nix::libc::c_long = 0;
        // SAFETY: `f` is open for the call and `v` is a valid, aligned c_long on our stack
        // (the kernel writes an int into its first bytes).
        match unsafe { getflags(f.as_raw_fd(), &mut v) } {
            Ok(_) => Ok(Some(v & 0xffff_ffff)),
            Err(nix::errno::Errno::ENOTTY | nix::errno::Errno::EOPNOTSUPP) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn put(f: &std::fs::File, v: nix::libc::c_long) -> std::io::Result<()> {
        // SAFETY: as in `flags`; the kernel reads an int from `v`.
        unsafe { setflags(f.as_raw_fd(), &v) }
            .map(drop)
            .map_err(Into::into)
    }

    /// Clear the flag; `true` when it was set (so the caller restores it).
    pub(crate) fn clear(path: &Path) -> std::io::Result<bool> {
        let f = std::fs::File::open(path)?;
        match flags(&f)? {
            Some(v) if v & FS_IMMUTABLE_FL != 0 => {
                put(&f, v & !FS_IMMUTABLE_FL)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Set the flag again.
    pub(crate) fn set(path: &Path) -> std::io::Result<()> {
        let f = std::fs::File::open(path)?;
        if let Some(v) = flags(&f)? {
            put(&f, v | FS_IMMUTABLE_FL)?;
        }
        Ok(())
    }

    /// Whether the flag is set (tests).
    pub(crate) fn is_set(path: &Path) -> std::io::Result<bool> {
        let f = std::fs::File::open(path)?;
        Ok(flags(&f)?.is_some_and(|v| v & FS_IMMUTABLE_FL != 0))
    }
}

/// Whether `path` carries the immutable flag (`lsattr` shows `i`).
pub fn is_immutable(path: &Path) -> std::io::Result<bool> {
    immutable::is_set(path)
}

/// Set the immutable flag on `path`, as the kernel does on most efivarfs files (tests and
/// the sandbox use it to reproduce that on plain files).
pub fn set_immutable(path: &Path) -> std::io::Result<()> {
    immutable::set(path)
}

/// `s` as UTF-16LE with a NUL terminator.
pub(crate) fn utf16_bytes(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(u16::to_le_bytes)
        .collect()
}
