//! Test scaffolding kept out of the shipped `update-agent`: the self-contained sandbox behind
//! `update-agent-sandbox demo` (a GPT disk image file, keys, a signed update served by
//! server-mock over loopback, reboots through the boot simulator), the simulators of each
//! loader's choice (`sim`, `sim_grub`, `sim_bls`, `sim_uboot`, `sim_efi`), recording and in-memory disks (`recording`) and
//! sgdisk-made test images (`testimg`).
//!
//! The arrows run one way: this crate uses `update_agent`, never the reverse (the agent's
//! integration tests take it as a dev-dependency).

pub mod demo;
pub mod disk_image;
pub mod recording;
pub mod sim;
pub mod sim_bls;
pub mod sim_efi;
pub mod sim_grub;
pub mod sim_uboot;
pub mod testimg;
pub mod world;

use std::path::PathBuf;

/// Options of `update-agent-sandbox demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Work in this directory instead of a fresh temporary one (it is kept afterwards). It
    /// must be empty or missing; a used one is refused before anything is written.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// With --dir: replace an earlier sandbox in that directory (only the sandbox's own
    /// files are removed; a directory holding anything else is still refused).
    #[arg(long, requires = "dir")]
    pub force: bool,
    /// Disk layout of the sandbox: flatcar, chromeos or bottlerocket.
    #[arg(long, default_value = "flatcar")]
    pub layout: String,
    /// Boot-control backend: gptprio, grubenv, bls, uboot or efi.
    #[arg(long, default_value = "gptprio")]
    pub backend: String,
}
