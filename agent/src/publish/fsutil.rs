//! Small file helpers: atomic, durable writes and bounded reads.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{io_err, PublishError};

/// Whether [`write_atomic`] may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Replace whatever is there (manifests, images).
    Replace,
    /// Fail with `key_exists` if the destination exists (keys).
    CreateNew,
}

/// Temporary sibling of `dest`, in the same directory so the rename is atomic.
pub(crate) fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync the directory holding `path`, so a rename into it survives a power cut.
pub(crate) fn sync_parent(path: &Path) -> Result<(), PublishError> {
    let dir = parent_dir(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Open a fresh temporary file beside `dest` with permission bits `mode`.
pub(crate) fn create_temp(dest: &Path, mode: u32) -> Result<(File, PathBuf), PublishError> {
    let tmp = temp_path(dest);
    // A leftover from a crashed run of this same pid is ours to replace.
    let _ = std::fs::remove_file(&tmp);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    Ok((file, tmp))
}

/// Move a synced temporary file into place, then fsync the directory.
pub(crate) fn commit_temp(tmp: &Path, dest: &Path, mode: WriteMode) -> Result<(), PublishError> {
    let result = match mode {
        WriteMode::Replace => std::fs::rename(tmp, dest).map_err(io_err("rename into", dest)),
        // link(2) fails if `dest` exists, so there is no check-then-write race.
        WriteMode::CreateNew => match std::fs::hard_link(tmp, dest) {
            Ok(()) => std::fs::remove_file(tmp).map_err(io_err("remove", tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(PublishError::KeyExists {
                    path: dest.to_path_buf(),
                })
            }
            Err(e) => Err(io_err("link into", dest)(e)),
        },
    };
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result?;
    sync_parent(dest)
}

/// Write `bytes` to `dest` atomically and durably (temp file, fsync, rename/link, fsync dir),
/// with permission bits `mode` from the first byte on.
pub fn write_atomic(
    dest: &Path,
    bytes: &[u8],
    mode: u32,
    how: WriteMode,
) -> Result<(), PublishError> {
    let (mut file, tmp) = create_temp(dest, mode)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_err("write", &tmp));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    drop(file);
    commit_temp(&tmp, dest, how)
}

/// Read a whole file, refusing anything above `max` bytes without reading past it.
pub(crate) fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, PublishError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    file.take(limit)
        .read_to_end(&mut out)
        .map_err(io_err("read", path))?;
    if out.len() > max {
        // Let verification report the size with its own error kind.
        return Err(PublishError::Verify(updater_proto::VerifyError::TooLarge {
            size: out.len(),
            max,
        }));
    }
    Ok(out)
}
