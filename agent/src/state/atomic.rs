//! Crash-safe file replacement: temp file in the same directory, write, fsync, rename,
//! fsync the directory. After a power cut the path holds either the old or the new bytes.
//!
//! [`write_for_loader`] goes further for files a boot loader reads (the grubenv): GRUB reads
//! the filesystem without replaying its journal, so after the rename the new directory entry
//! may exist only in the journal. It adds `syncfs` and, on a journaling filesystem (ext3/4,
//! XFS) other than the root filesystem, a freeze/thaw (`FIFREEZE`/`FITHAW`), which
//! checkpoints the journal into place, as OSTree does for a separate `/boot`. The root
//! filesystem is only synced: freezing it would stall every writer on the host (the agent's
//! own logging included), and a process killed between freeze and thaw would leave `/`
//! frozen. On ext4, `syncfs` already writes the committed metadata home (tested with
//! `debugfs`, which reads the disk as GRUB does).
//!
//! Every file operation a replace issues can be logged with [`record_ops`] (a per-thread
//! recorder): the power-cut tests rebuild what a cut at any point would have left.

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// One file operation of a replace, in the order it was issued (see [`record_ops`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    /// A new file created with these bytes and mode (not durable until `Fsync`).
    Write {
        path: PathBuf,
        data: Vec<u8>,
        mode: u32,
    },
    /// The file's data and inode are durable; its directory entry is not yet.
    Fsync { path: PathBuf },
    /// `from` replaced `to` (not durable until `FsyncDir` of the directory).
    Rename { from: PathBuf, to: PathBuf },
    /// A file removed (not durable until `FsyncDir`).
    Remove { path: PathBuf },
    /// Every entry change in `dir` so far is durable.
    FsyncDir { dir: PathBuf },
    /// `syncfs` (and freeze/thaw where the filesystem journals) on the filesystem of `dir`:
    /// everything so far is durable and in place for a reader that skips the journal.
    SyncFs { dir: PathBuf, froze: bool },
}

thread_local! {
    static RECORDER: RefCell<Option<Vec<FileOp>>> = const { RefCell::new(None) };
}

fn note(op: impl FnOnce() -> FileOp) {
    RECORDER.with(|r| {
        if let Some(log) = r.borrow_mut().as_mut() {
            log.push(op());
        }
    });
}

/// Run `f` and return, with its result, every file operation [`write_atomic`],
/// [`write_for_loader`] and [`sync_dir`] issued on this thread meanwhile (they are carried
/// out for real as well). Nested calls are not supported: the inner one takes the log.
pub fn record_ops<T>(f: impl FnOnce() -> T) -> (T, Vec<FileOp>) {
    RECORDER.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let out = f();
    let log = RECORDER.with(|r| r.borrow_mut().take()).unwrap_or_default();
    (out, log)
}

/// Replace `path` with `bytes` atomically; the new file gets permission bits `mode`.
/// The temp file is removed if anything fails before the rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // Unique per process and call, so concurrent writers never share a temp file.
    let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{seq}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` is filtered by the umask on create; set it exactly.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(bytes)?;
        note(|| FileOp::Write {
            path: tmp.clone(),
            data: bytes.to_vec(),
            mode,
        });
        f.sync_all()?;
        note(|| FileOp::Fsync { path: tmp.clone() });
        drop(f);
        fs::rename(&tmp, path)?;
        note(|| FileOp::Rename {
            from: tmp.clone(),
            to: path.to_path_buf(),
        });
        Ok(())
    })();
    if let Err(e) = result {
        if fs::remove_file(&tmp).is_ok() {
            note(|| FileOp::Remove { path: tmp.clone() });
        }
        return Err(e);
    }
    sync_dir(&dir)
}

/// [`write_atomic`], then make the result durable *in place* for a reader that does not
/// replay the filesystem journal (a boot loader): `syncfs`, and freeze/thaw on a
/// journaling filesystem. Returns whether the filesystem was frozen.
pub fn write_for_loader(path: &Path, bytes: &[u8], mode: u32) -> io::Result<bool> {
    write_atomic(path, bytes, mode)?;
    let dir = parent_dir(path);
    let froze = sync_fs_for_loader(&dir)?;
    note(|| FileOp::SyncFs { dir, froze });
    Ok(froze)
}

/// fsync a directory so a rename or create in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()?;
    note(|| FileOp::FsyncDir {
        dir: dir.to_path_buf(),
    });
    Ok(())
}

/// Whether a filesystem of this `statfs` type keeps metadata in a journal that a boot
/// loader does not replay (GRUB's ext2 and XFS readers ignore the journal).
pub(crate) fn journals(fs_type: nix::sys::statfs::FsType) -> bool {
    use nix::sys::statfs::{EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC};
    // EXT4_SUPER_MAGIC (0xEF53) is shared by ext2/3/4; freezing a journal-less ext2 is
    // harmless (it only syncs).
    fs_type == EXT4_SUPER_MAGIC || fs_type == XFS_SUPER_MAGIC
}

/// `syncfs` on the filesystem holding `dir`, then freeze and thaw it when it journals and
/// is not the root filesystem.
/// Freezing needs CAP_SYS_ADMIN; a filesystem that cannot be frozen (`EOPNOTSUPP`) has been
/// synced and is reported as not frozen.
fn sync_fs_for_loader(dir: &Path) -> io::Result<bool> {
    let d = File::open(dir)?;
    nix::unistd::syncfs(&d).map_err(io::Error::from)?;
    let fs_type = nix::sys::statfs::fstatfs(&d)
        .map_err(io::Error::from)?
        .filesystem_type();
    if !journals(fs_type) || same_fs(dir, Path::new("/"))? {
        return Ok(false);
    }
    match freeze::freeze(&d) {
        Ok(()) => {}
        Err(nix::errno::Errno::EOPNOTSUPP) => return Ok(false),
        // The shipped units run the agent without capabilities (CapabilityBoundingSet=), and
        // FIFREEZE needs CAP_SYS_ADMIN: refusing here failed every health check on a host
        // with a separate /boot (found by the QEMU lab, docs/lab.md). The filesystem has
        // been synced, which on ext4 already writes the committed metadata home (above);
        // the lab's real GRUB reads the result on its next boot.
        Err(nix::errno::Errno::EPERM) => {
            tracing::warn!(
                dir = %dir.display(),
                "not permitted to freeze the filesystem (FIFREEZE needs CAP_SYS_ADMIN): synced only"
            );
            return Ok(false);
        }
        Err(e) => {
            return Err(io::Error::other(format!(
                "freezing the filesystem of {} to checkpoint its journal for the boot \
                 loader failed: {e} (FIFREEZE needs CAP_SYS_ADMIN)",
                dir.display()
            )))
        }
    }
    // Thaw at once; a failure here leaves the filesystem frozen, so say so plainly.
    freeze::thaw(&d).map_err(|e| {
        io::Error::other(format!(
            "thawing the filesystem of {} failed: {e}; it stays frozen until `fsfreeze -u` \
             on its mount point",
            dir.display()
        ))
    })?;
    Ok(true)
}

fn same_fs(a: &Path, b: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(a)?.dev() == fs::metadata(b)?.dev())
}

/// `FIFREEZE` / `FITHAW` (linux/fs.h: `_IOWR('X', 119, int)` / `_IOWR('X', 120, int)`).
/// The only unsafe code in the agent: nix's ioctl wrappers are `unsafe fn` because the
/// kernel reads through the pointer they pass.
#[allow(unsafe_code)]
mod freeze {
    use std::os::fd::{AsRawFd, BorrowedFd};
    nix::ioctl_readwrite!(fifreeze, b'X', 119, nix::libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, nix::libc::c_int);

    pub(crate) fn freeze(fd: &impl std::os::fd::AsFd) -> nix::Result<()> {
        let fd: BorrowedFd<'_> = fd.as_fd();
        let mut arg: nix::libc::c_int = 0;
        // SAFETY: `fd` is a live descriptor borrowed for the call, and `arg` is a valid,
        // aligned c_int on our stack for the ioctl's whole duration (the kernel ignores it).
        unsafe { fifreeze(fd.as_raw_fd(), &mut arg) }.map(drop)
    }

    pub(crate) fn thaw(fd: &impl std::os::fd::AsFd) -> nix::Result<()> {
        let fd: BorrowedFd<'_> = fd.as_fd();
        let mut arg: nix::libc::c_int = 0;
        // SAFETY: as in `freeze`.
        unsafe { fithaw(fd.as_raw_fd(), &mut arg) }.map(drop)
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
