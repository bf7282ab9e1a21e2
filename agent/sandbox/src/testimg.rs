//! Disk images in the three seed layouts, made with `sgdisk` (a tool nobody here wrote), for
//! tests of the disk and boot layers. Partition numbers have gaps on purpose, and some
//! attribute bits outside gptprio's are set, so tests can check both are preserved.

use std::path::Path;
use std::process::Command;
use update_agent::disk::slots::{
    BOTTLEROCKET_BOOT_TYPE, BOTTLEROCKET_HASH_TYPE, BOTTLEROCKET_ROOT_TYPE, CHROMEOS_KERNEL_TYPE,
    COREOS_USR_TYPE,
};
use update_agent::disk::SlotLayoutConfig;

/// Whether external tool `name` (Debian package `package`) runs. Missing: an error under
/// `CI=true` (CI must install it), otherwise `Ok(false)` after printing how to install it.
pub fn require_tool(name: &str, package: &str) -> Result<bool, String> {
    let found = Command::new(name).arg("--help").output().is_ok();
    if found {
        return Ok(true);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        return Err(format!(
            "{name} is required under CI: apt-get install -y {package}"
        ));
    }
    eprintln!("skipping: {name} not found (apt-get install -y {package})");
    Ok(false)
}

/// One of the seed layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Flatcar,
    ChromeOs,
    Bottlerocket,
}

impl Layout {
    pub const ALL: [Layout; 3] = [Layout::Flatcar, Layout::ChromeOs, Layout::Bottlerocket];

    pub fn config(self) -> SlotLayoutConfig {
        match self {
            Layout::Flatcar => SlotLayoutConfig::flatcar(),
            Layout::ChromeOs => SlotLayoutConfig::chromeos(),
            Layout::Bottlerocket => SlotLayoutConfig::bottlerocket(),
        }
    }

    /// Partition numbers of the flags partitions of A and B.
    pub fn flags_parts(self) -> (u32, u32) {
        match self {
            Layout::Flatcar => (3, 4),
            Layout::ChromeOs => (2, 4),
            Layout::Bottlerocket => (3, 7),
        }
    }

    /// `sgdisk` arguments: (number, size, type, label, attribute bits to set).
    fn parts(self) -> Vec<(u32, &'static str, String, &'static str, Vec<u32>)> {
        let t = |u: uuid::Uuid| u.to_string();
        let s = |x: &str| x.to_string();
        match self {
            // Flatcar: 5, 7, 8 unused; USR-A good (prio 1, successful), USR-B empty.
            Layout::Flatcar => vec![
                (1, "+8M", s("ef00"), "EFI-SYSTEM", vec![0]),
                (2, "+1M", s("ef02"), "BIOS-BOOT", vec![2]),
                (3, "+8M", t(COREOS_USR_TYPE), "USR-A", vec![48, 56, 60]),
                (4, "+8M", t(COREOS_USR_TYPE), "USR-B", vec![60]),
                (6, "+4M", s("8300"), "OEM", vec![]),
                (9, "+8M", s("8300"), "ROOT", vec![]),
            ],
            // ChromeOS: 7-11 unused; KERN-C present with priority 0, as on real devices.
            Layout::ChromeOs => vec![
                (2, "+4M", t(CHROMEOS_KERNEL_TYPE), "KERN-A", vec![48, 56]),
                (
                    3,
                    "+8M",
                    s("3cb8e202-3b7e-47dd-8a3c-7ff2a13cfcec"),
                    "ROOT-A",
                    vec![],
                ),
                (4, "+4M", t(CHROMEOS_KERNEL_TYPE), "KERN-B", vec![]),
                (
                    5,
                    "+8M",
                    s("3cb8e202-3b7e-47dd-8a3c-7ff2a13cfcec"),
                    "ROOT-B",
                    vec![],
                ),
                (6, "+1M", t(CHROMEOS_KERNEL_TYPE), "KERN-C", vec![]),
                (1, "+8M", s("8300"), "STATE", vec![]),
                (12, "+4M", s("ef00"), "EFI-SYSTEM", vec![]),
            ],
            // Bottlerocket: banks by type-GUID order; 12 unused, 13 DATA.
            Layout::Bottlerocket => vec![
                (1, "+1M", s("ef02"), "BOTTLEROCKET-BIOS-BOOT", vec![2]),
                (2, "+4M", s("ef00"), "BOTTLEROCKET-EFI-SYSTEM", vec![]),
                (
                    3,
                    "+4M",
                    t(BOTTLEROCKET_BOOT_TYPE),
                    "BOTTLEROCKET-BOOT-A",
                    vec![48, 56],
                ),
                (
                    4,
                    "+8M",
                    t(BOTTLEROCKET_ROOT_TYPE),
                    "BOTTLEROCKET-ROOT-A",
                    vec![],
                ),
                (
                    5,
                    "+1M",
                    t(BOTTLEROCKET_HASH_TYPE),
                    "BOTTLEROCKET-HASH-A",
                    vec![],
                ),
                (
                    6,
                    "+1M",
                    s("0c5d99a5-d331-4147-baef-08e2b855bdc9"),
                    "BOTTLEROCKET-RESERVED-A",
                    vec![],
                ),
                (
                    7,
                    "+4M",
                    t(BOTTLEROCKET_BOOT_TYPE),
                    "BOTTLEROCKET-BOOT-B",
                    vec![],
                ),
                (
                    8,
                    "+8M",
                    t(BOTTLEROCKET_ROOT_TYPE),
                    "BOTTLEROCKET-ROOT-B",
                    vec![],
                ),
                (
                    9,
                    "+1M",
                    t(BOTTLEROCKET_HASH_TYPE),
                    "BOTTLEROCKET-HASH-B",
                    vec![],
                ),
                (
                    10,
                    "+1M",
                    s("0c5d99a5-d331-4147-baef-08e2b855bdc9"),
                    "BOTTLEROCKET-RESERVED-B",
                    vec![],
                ),
                (
                    11,
                    "+1M",
                    s("440408bb-eb0b-4328-a6e5-a29038fad706"),
                    "BOTTLEROCKET-PRIVATE",
                    vec![],
                ),
                (13, "+4M", s("8300"), "BOTTLEROCKET-DATA", vec![]),
            ],
        }
    }

    /// Create a 64 MiB sparse image at `path` in this layout with `sgdisk`.
    pub fn create(self, path: &Path) -> Result<(), String> {
        let f =
            std::fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
        f.set_len(64 << 20)
            .map_err(|e| format!("size {}: {e}", path.display()))?;
        drop(f);
        self.partition(path)
    }

    /// Write this layout's GPT onto an existing disk or image at `path` with `sgdisk`.
    pub fn partition(self, path: &Path) -> Result<(), String> {
        let mut args = vec!["-o".to_string()];
        for (n, size, ty, label, bits) in self.parts() {
            args.push(format!("-n={n}:0:{size}"));
            args.push(format!("-t={n}:{ty}"));
            args.push(format!("-c={n}:{label}"));
            for b in bits {
                args.push(format!("-A={n}:set:{b}"));
            }
        }
        run("sgdisk", &args, path)
    }
}

/// Run `tool args... path`, failing with its output when it exits non-zero.
pub fn run(tool: &str, args: &[String], path: &Path) -> Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| format!("{tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} {args:?} {} failed: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// `sgdisk -v`: Ok when it finds no problems, else its report. sgdisk says "No problems
/// found" even after silently loading the backup of a corrupt primary, so its warnings on
/// either stream count as problems too.
pub fn sgdisk_verify(path: &Path) -> Result<(), String> {
    let out = Command::new("sgdisk")
        .arg("-v")
        .arg(path)
        .output()
        .map_err(|e| format!("sgdisk: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let clean = out.status.success()
        && text.contains("No problems found")
        && !["ERROR", "Warning", "Caution", "corrupt", "mismatch"]
            .iter()
            .any(|w| text.contains(w));
    if clean {
        Ok(())
    } else {
        Err(format!("sgdisk -v {}: {text}", path.display()))
    }
}

/// `cgpt show -i N -P|-T|-S path` as a number.
pub fn cgpt_field(path: &Path, number: u32, flag: &str) -> Result<u64, String> {
    let out = Command::new("cgpt")
        .args(["show", "-i", &number.to_string(), flag])
        .arg(path)
        .output()
        .map_err(|e| format!("cgpt: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().map_err(|_| {
        format!(
            "cgpt show -i {number} {flag} {}: unexpected output {text:?} {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
