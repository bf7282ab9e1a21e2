//! This host as the configuration describes it: its disk, slots, boot control, state and trust.
//! Every operation (status, check, apply, ...) starts from a [`Host`].

use std::path::PathBuf;

use crate::boot::gptprio::GptPrio;
use crate::boot::grubenv::GrubEnvBoot;
use crate::boot::{booted_slot, BootControl, SlotId};
use crate::config::{BootBackendKind, Config};
use crate::disk::{FileDevice, Gpt, ResolvedSlots, SlotLayoutConfig};
use crate::error::AgentError;
use crate::state::StateStore;

/// How the booted slot was determined, for `status` and for logs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BootedSlot {
    pub slot: SlotId,
    /// `cmdline` (kernel command line) or `config` (`boot.booted_slot` override).
    pub source: &'static str,
}

/// The configured host: opened lazily, nothing is written by opening it.
#[derive(Debug)]
pub struct Host {
    pub config: Config,
    pub layout: SlotLayoutConfig,
    pub state: StateStore,
}

impl Host {
    /// Check the configuration and open the state directory.
    pub fn open(config: Config) -> Result<Host, AgentError> {
        config.validate()?;
        let layout = config.slot_layout()?;
        let state = StateStore::open(&config.state.dir)?;
        Ok(Host {
            config,
            layout,
            state,
        })
    }

    /// The whole-disk path from `[disk] path`.
    pub fn disk_path(&self) -> Result<PathBuf, AgentError> {
        self.config.disk.path.clone().ok_or_else(|| {
            AgentError::Refused(
                "no disk configured: set [disk] path (e.g. /dev/nvme0n1 or an image file)".into(),
            )
        })
    }

    pub fn open_disk(&self) -> Result<FileDevice, AgentError> {
        Ok(FileDevice::open(self.disk_path()?)?)
    }

    pub fn open_disk_read_only(&self) -> Result<FileDevice, AgentError> {
        Ok(FileDevice::open_read_only(self.disk_path()?)?)
    }

    /// Slots resolved from the disk's GPT (read-only).
    pub fn slots(&self) -> Result<ResolvedSlots, AgentError> {
        let dev = self.open_disk_read_only()?;
        let gpt = Gpt::read(&dev).map_err(crate::disk::SlotError::from)?;
        Ok(self.layout.resolve(&gpt)?)
    }

    /// The configured boot-control backend over `dev` (gptprio) or the grubenv file.
    pub fn boot_control(&self) -> Result<Box<dyn BootControl>, AgentError> {
        let tries = self.config.boot.tries;
        Ok(match self.config.boot.backend {
            BootBackendKind::Gptprio => {
                let path = self.disk_path()?;
                let dev = self.open_disk()?;
                Box::new(
                    GptPrio::new(dev, path.display().to_string(), self.layout.clone())?
                        .with_tries(tries)?,
                )
            }
            BootBackendKind::Grubenv => Box::new(
                GrubEnvBoot::file(&self.config.boot.grubenv_path, tries)
                    .map_err(crate::boot::BootError::from)?,
            ),
        })
    }

    /// The slot this system booted from: the `boot.booted_slot` override, else the partition
    /// named by `PARTUUID=` on the kernel command line, else RAUC's `rauc.slot=`.
    pub fn booted_slot(&self, slots: &ResolvedSlots) -> Result<BootedSlot, AgentError> {
        if let Some(slot) = self.config.boot.booted_slot {
            return Ok(BootedSlot {
                slot,
                source: "config",
            });
        }
        let path = &self.config.boot.cmdline_path;
        let cmdline = std::fs::read_to_string(path).map_err(|source| AgentError::Io {
            what: format!("reading the kernel command line {}", path.display()),
            source,
        })?;
        booted_slot(&cmdline, slots)
            .or_else(|| crate::boot::grubenv::booted_slot_from_cmdline(&cmdline))
            .map(|slot| BootedSlot {
                slot,
                source: "cmdline",
            })
            .ok_or_else(|| {
                AgentError::BootedSlotUnknown(format!(
                    "{} names no partition of slot A or B by PARTUUID= nor rauc.slot= (set [boot] booted_slot \
                     to override)",
                    path.display()
                ))
            })
    }
}

/// The async runtime every command that touches the network runs on.
pub fn runtime() -> Result<tokio::runtime::Runtime, AgentError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| AgentError::Io {
            what: "starting the async runtime".into(),
            source,
        })
}
