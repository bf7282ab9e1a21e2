//! This host as the configuration describes it: its disk, slots, boot control, state and trust.
//! Every operation (status, check, apply, ...) starts from a [`Host`].

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use crate::boot::gptprio::GptPrio;
use crate::boot::grubenv::GrubEnvBoot;
use crate::boot::{booted_slot, BootControl, SlotId};
use crate::clock::{Clock, SystemClock};
use crate::config::{BootBackendKind, Config};
use crate::disk::{FileDevice, Gpt, ResolvedSlots, SlotLayoutConfig};
use crate::error::AgentError;
use crate::fetch::{FetchConfig, MinThroughput};
use crate::health::HealthSettings;
use crate::state::{State, StateStore};
use semver::Version;

/// How the booted slot was determined, for `status` and for logs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BootedSlot {
    pub slot: SlotId,
    /// `cmdline` (kernel command line), `config` (`boot.booted_slot` override),
    /// `LoaderBootCountPath` / `LoaderEntrySelected` (bls), `BootCurrent` (efi).
    pub source: &'static str,
}

/// Asks the system to reboot. Beside [`BootControl`] (which says what boots next) it is the
/// host's other hardware touch in the update flow; tests put a recorder in its place.
pub trait Reboot: std::fmt::Debug + Send + Sync {
    /// Returns when the request was accepted; the reboot itself happens after this process
    /// is asked to stop.
    fn request(&self) -> Result<(), AgentError>;
}

/// `[reboot] command` (default `systemctl reboot`).
#[derive(Debug, Clone)]
pub(crate) struct CommandReboot {
    pub command: Vec<String>,
}

impl Reboot for CommandReboot {
    fn request(&self) -> Result<(), AgentError> {
        let cmd = &self.command;
        let Some((program, args)) = cmd.split_first() else {
            return Err(AgentError::NotConfigured {
                key: "reboot.command",
                hint: "the command is empty: nothing to run (e.g. [\"systemctl\", \"reboot\"])"
                    .into(),
            });
        };
        tracing::info!(command = ?cmd, "rebooting");
        let status = Command::new(program)
            .args(args)
            .status()
            .map_err(|source| AgentError::Io {
                what: format!("running reboot command {program}"),
                source,
            })?;
        if !status.success() {
            return Err(AgentError::RebootFailed {
                command: cmd.clone(),
                status: status.to_string(),
            });
        }
        Ok(())
    }
}

/// What the configuration becomes once, when the host is opened, so no command re-derives
/// it on the way: the raw TOML types stay in `config`, these are what the operations use.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `[[trust.keys]]` with `[trust] threshold`, the key files read once; `None` when no key
    /// is configured (a trust root then names the manifest keys).
    pub trust_policy: Option<updater_proto::TrustPolicy>,
    /// Every download's settings (`[install]`, `[server] ca_file`).
    pub fetch: FetchConfig,
    /// `[health]`.
    pub health: HealthSettings,
}

impl Settings {
    /// From a validated configuration.
    pub(crate) fn from_config(config: &Config) -> Result<Settings, AgentError> {
        let c = &config.install;
        let fetch = FetchConfig {
            connect_timeout: c.connect_timeout.into(),
            read_timeout: c.read_timeout.into(),
            max_attempts: c.max_attempts.max(1),
            min_throughput: (c.min_throughput_bytes_per_sec > 0).then(|| MinThroughput {
                bytes_per_sec: c.min_throughput_bytes_per_sec,
                window: c.min_throughput_window.into(),
            }),
            ca_file: config.server.ca_file.clone(),
            ..FetchConfig::default()
        };
        let trust_policy = if config.trust.keys.is_empty() {
            None
        } else {
            Some(config.trust_policy()?)
        };
        Ok(Settings {
            trust_policy,
            fetch,
            health: HealthSettings::from_config(config),
        })
    }
}

/// The configured host: opened lazily, nothing is written by opening it.
#[derive(Debug)]
pub struct Host {
    pub config: Config,
    pub layout: SlotLayoutConfig,
    pub state: StateStore,
    /// The time every decision of this host is taken at.
    pub clock: Arc<dyn Clock>,
    /// How this host reboots.
    pub reboot: Arc<dyn Reboot>,
    /// The configuration as the operations use it, built once.
    pub settings: Settings,
    /// The one HTTP client for manifests, roots and images, built on first use.
    http: OnceLock<reqwest::Client>,
}

impl Host {
    /// Check the configuration and open the state directory.
    pub fn open(config: Config) -> Result<Host, AgentError> {
        config.validate()?;
        let layout = config.slot_layout()?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let state = StateStore::open(&config.state.dir)?.with_clock(clock.clone());
        let reboot = Arc::new(CommandReboot {
            command: config.reboot.command.clone(),
        });
        let settings = Settings::from_config(&config)?;
        Ok(Host {
            config,
            layout,
            state,
            clock,
            reboot,
            settings,
            http: OnceLock::new(),
        })
    }

    /// The host's HTTP client (rustls and its roots set up once per host).
    pub(crate) fn http_client(&self) -> Result<reqwest::Client, AgentError> {
        if let Some(c) = self.http.get() {
            return Ok(c.clone());
        }
        let client = crate::fetch::build_client(&self.settings.fetch)?;
        Ok(self.http.get_or_init(|| client).clone())
    }

    /// The trust policy of `[[trust.keys]]` (read when the host was opened).
    pub(crate) fn config_trust_policy(&self) -> Result<updater_proto::TrustPolicy, AgentError> {
        match &self.settings.trust_policy {
            Some(p) => Ok(p.clone()),
            // No key configured: the configuration's own error says so.
            None => Ok(self.config.trust_policy()?),
        }
    }

    /// The same host at another clock (its state store stamps with it too).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Host {
        self.state = self.state.with_clock(clock.clone());
        self.clock = clock;
        self
    }

    /// The same host rebooting through `reboot`.
    pub fn with_reboot(mut self, reboot: Arc<dyn Reboot>) -> Host {
        self.reboot = reboot;
        self
    }

    /// The whole-disk path from `[disk] path`.
    pub(crate) fn disk_path(&self) -> Result<PathBuf, AgentError> {
        self.config
            .disk
            .path
            .clone()
            .ok_or_else(|| AgentError::NotConfigured {
                key: "disk.path",
                hint: "set [disk] path (e.g. /dev/nvme0n1 or an image file)".into(),
            })
    }

    pub(crate) fn open_disk(&self) -> Result<FileDevice, AgentError> {
        Ok(FileDevice::open(self.disk_path()?)?)
    }

    pub(crate) fn open_disk_read_only(&self) -> Result<FileDevice, AgentError> {
        Ok(FileDevice::open_read_only(self.disk_path()?)?)
    }

    /// Slots resolved from the disk's GPT (read-only).
    pub(crate) fn slots(&self) -> Result<ResolvedSlots, AgentError> {
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
            BootBackendKind::Bls => Box::new(
                crate::boot::bls::BlsBoot::new(
                    &self.config.boot.bls_entries_dir,
                    &self.config.boot.bls_entry_a,
                    &self.config.boot.bls_entry_b,
                    tries,
                )
                .map_err(crate::boot::BootError::from)?,
            ),
            BootBackendKind::Grubenv => Box::new(
                GrubEnvBoot::file(&self.config.boot.grubenv_path, tries)
                    .map_err(crate::boot::BootError::from)?,
            ),
            BootBackendKind::Uboot => Box::new(
                crate::boot::uboot::UbootBoot::from_fw_env_config(
                    &self.config.boot.uboot_fw_env_config,
                    tries,
                )
                .map_err(crate::boot::BootError::from)?,
            ),
            BootBackendKind::Efi => Box::new(self.efi_boot()?),
        })
    }

    /// The efi backend over `[boot] efivars_dir`.
    fn efi_boot(&self) -> Result<crate::boot::efi::EfiBoot, AgentError> {
        use crate::boot::efi::{parse_entry_number, EfiBoot};
        let b = &self.config.boot;
        let e = |e: crate::boot::efi::EfiError| AgentError::from(crate::boot::BootError::from(e));
        let vars = crate::boot::efivars::EfiVarFs::new(&b.efivars_dir);
        EfiBoot::new(
            Box::new(vars),
            parse_entry_number(&b.efi_entry_a).map_err(e)?,
            parse_entry_number(&b.efi_entry_b).map_err(e)?,
        )
        .map_err(e)
    }

    /// The slot this system booted from: the `boot.booted_slot` override, else the partition
    /// named by `PARTUUID=` on the kernel command line, else RAUC's `rauc.slot=`.
    pub(crate) fn booted_slot(&self, slots: &ResolvedSlots) -> Result<BootedSlot, AgentError> {
        if let Some(slot) = self.config.boot.booted_slot {
            return Ok(BootedSlot {
                slot,
                source: "config",
            });
        }
        if self.config.boot.backend == BootBackendKind::Bls {
            let b = &self.config.boot;
            if let Some((slot, source)) = crate::boot::bls::booted_slot_from_efivars(
                &b.bls_entry_selected_path,
                &b.bls_entry_a,
                &b.bls_entry_b,
            )
            .map_err(crate::boot::BootError::from)?
            {
                return Ok(BootedSlot { slot, source });
            }
        }
        if self.config.boot.backend == BootBackendKind::Efi {
            if let Some(slot) = self
                .efi_boot()?
                .booted_slot()
                .map_err(crate::boot::BootError::from)?
            {
                return Ok(BootedSlot {
                    slot,
                    source: "BootCurrent",
                });
            }
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

/// Where the running system's os-release is looked for when `[system] os_release_path` is
/// unset, in order (the os-release(5) rule).
pub(crate) const OS_RELEASE_PATHS: [&str; 2] = ["/etc/os-release", "/usr/lib/os-release"];

/// `VERSION_ID` of an os-release file's text, unquoted (os-release(5) shell-style values).
pub(crate) fn os_release_version_id(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let value = line.trim().strip_prefix("VERSION_ID=")?;
        let value = value.trim();
        let unquoted = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        Some(unquoted.to_string())
    })
}

impl Host {
    /// The version the running system says it runs: `[system] running_version`, else
    /// `VERSION_ID` of its os-release. `None` only when os-release is not configured and the
    /// default files are missing or carry no semver `VERSION_ID` (a host that is not an
    /// image-based product); a configured file that does not give one is an error.
    pub(crate) fn system_version(&self) -> Result<Option<Version>, AgentError> {
        let sys = &self.config.system;
        if let Some(v) = &sys.running_version {
            return Version::parse(v).map(Some).map_err(|e| {
                AgentError::RunningVersionUnknown(format!("[system] running_version {v:?}: {e}"))
            });
        }
        if let Some(path) = &sys.os_release_path {
            let text = std::fs::read_to_string(path).map_err(|e| {
                AgentError::RunningVersionUnknown(format!(
                    "reading [system] os_release_path {}: {e}",
                    path.display()
                ))
            })?;
            let id = os_release_version_id(&text).ok_or_else(|| {
                AgentError::RunningVersionUnknown(format!("{} has no VERSION_ID", path.display()))
            })?;
            return Version::parse(&id).map(Some).map_err(|e| {
                AgentError::RunningVersionUnknown(format!(
                    "{}: VERSION_ID {id:?} is not a semantic version: {e}",
                    path.display()
                ))
            });
        }
        for path in OS_RELEASE_PATHS {
            let Ok(text) = std::fs::read_to_string(path) else {
                continue;
            };
            let id = os_release_version_id(&text);
            let version = id.as_deref().and_then(|id| Version::parse(id).ok());
            if version.is_none() {
                tracing::debug!(path, ?id, "os-release gives no semver VERSION_ID; the running version comes from the state record");
            }
            return Ok(version);
        }
        Ok(None)
    }

    /// The bar below which nothing is installed: the higher of what the running system says
    /// ([`Host::system_version`]) and what the state record says the booted slot holds. The
    /// record alone can be lost or replaced by an older copy; the system alone may be a
    /// static file in a sandbox. Either can only raise the bar.
    pub(crate) fn running_version(
        &self,
        state: &State,
        booted: Option<SlotId>,
    ) -> Result<Option<Version>, AgentError> {
        let system = self.system_version()?;
        let recorded = booted
            .and_then(|b| state.slots.get(&b))
            .and_then(|r| Version::parse(&r.version).ok());
        Ok(system.max(recorded))
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

#[cfg(test)]
mod tests {
    use super::os_release_version_id;

    #[test]
    fn version_id_is_read_unquoted() {
        let text = "NAME=\"Acme OS\"\nID=acme\nVERSION_ID=\"2.0.0\"\nPRETTY_NAME=x\n";
        assert_eq!(os_release_version_id(text).as_deref(), Some("2.0.0"));
        assert_eq!(
            os_release_version_id("VERSION_ID='1.4.2'\n").as_deref(),
            Some("1.4.2")
        );
        assert_eq!(
            os_release_version_id("  VERSION_ID=3.1.0  \n").as_deref(),
            Some("3.1.0")
        );
        assert_eq!(os_release_version_id("ID=debian\nVERSION=12\n"), None);
    }
}
