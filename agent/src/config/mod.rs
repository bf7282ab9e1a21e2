//! Configuration: a TOML main file plus drop-in fragments, merged like Zincati / systemd.
//!
//! Sources, lowest precedence first: the main file (`/etc/update-agent/config.toml`, or
//! `--config`), then every `*.toml` fragment from `/usr/lib/update-agent/config.d`,
//! `/run/update-agent/config.d` and `/etc/update-agent/config.d`, sorted by file name across
//! the three directories. A fragment in a later directory masks a same-named one in an
//! earlier directory (`/etc` masks `/run` masks `/usr/lib`; an empty file or a symlink to
//! `/dev/null` masks with nothing). Later sources override earlier ones key by key: tables
//! merge deeply, any other value (arrays included) is replaced whole.
//!
//! Every file is checked on its own first (`deny_unknown_fields`), so a typo is an error naming
//! the file, the line and the key. Cross-key rules are checked after the merge.
//! `docs/configuration.md` lists every key.
//!
//! Here: the errors and the raw serde types (what the files say). `sources.rs`: where they come
//! from and how they merge; `validate.rs`: the rules across keys and the key files read.
//! What the operations use is built from this once, when the host is opened
//! (`host::Settings`).

pub mod checks;
pub mod duration;
pub mod hooks;
mod sources;
mod validate;

pub use checks::{CheckSpec, CheckTarget};
pub use duration::HumanDuration;
pub(crate) use hooks::{HookConfig, HooksConfig};
pub use sources::ConfigSources;

use crate::disk::SlotLayoutConfig;
use crate::slot::SlotId;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration {path}: {source}", path = path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("configuration key {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("trusted key {which}: {message}")]
    Key { which: String, message: String },
    #[error("could not render the configuration as TOML: {0}")]
    Render(#[from] toml::ser::Error),
}

impl ConfigError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigError::Io { .. } => "config_io",
            ConfigError::Parse { .. } => "config_parse",
            ConfigError::Invalid { .. } => "config_invalid",
            ConfigError::Key { .. } => "config_key",
            ConfigError::Render(_) => "config_render",
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Which preset partition layout, or `custom` for an explicit `[disk.slots]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LayoutPreset {
    #[default]
    Flatcar,
    Chromeos,
    Bottlerocket,
    Custom,
}

/// `[disk]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiskConfig {
    /// Whole disk: a block device (`/dev/nvme0n1`) or a GPT image file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    pub layout: LayoutPreset,
    /// Explicit slots, only with `layout = "custom"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<SlotLayoutConfig>,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            path: None,
            layout: LayoutPreset::Flatcar,
            slots: None,
        }
    }
}

/// Boot-control backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BootBackendKind {
    #[default]
    Gptprio,
    Grubenv,
    /// systemd-boot Automatic Boot Assessment (Boot Loader Specification entries).
    Bls,
    /// RAUC's U-Boot variables in the U-Boot environment (`fw_env.config`).
    Uboot,
    /// UEFI boot manager: `BootNext` for the trial, `BootOrder` for commit and rollback.
    Efi,
}

/// `[boot]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootConfig {
    pub backend: BootBackendKind,
    /// GRUB environment file (grubenv backend).
    pub grubenv_path: PathBuf,
    /// Boot attempts a staged slot gets (gptprio: 1..=15; grubenv: 1..=9).
    pub tries: u8,
    /// Force the booted slot instead of reading it from the kernel command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub booted_slot: Option<SlotId>,
    pub cmdline_path: PathBuf,
    /// bls backend: the entries directory (`loader/entries` on the ESP/XBOOTLDR, or
    /// `EFI/Linux` for UKIs).
    pub bls_entries_dir: PathBuf,
    /// bls backend: entry names of slots A and B (`[GEN-]NAME[+LEFT[-DONE]].conf|efi`).
    pub bls_entry_a: String,
    pub bls_entry_b: String,
    /// bls backend: efivarfs file of systemd-boot's `LoaderEntrySelected` (the booted entry).
    pub bls_entry_selected_path: PathBuf,
    /// uboot backend: libubootenv's configuration naming the environment copies.
    pub uboot_fw_env_config: PathBuf,
    /// efi backend: the efivarfs directory.
    pub efivars_dir: PathBuf,
    /// efi backend: the `Boot####` load options of slots A and B (hexadecimal, as
    /// efibootmgr prints them).
    pub efi_entry_a: String,
    pub efi_entry_b: String,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            backend: BootBackendKind::Gptprio,
            grubenv_path: PathBuf::from("/boot/grub/grubenv"),
            tries: 1,
            booted_slot: None,
            cmdline_path: PathBuf::from("/proc/cmdline"),
            bls_entries_dir: PathBuf::from("/boot/loader/entries"),
            bls_entry_a: "update-agent-a".to_string(),
            bls_entry_b: "update-agent-b".to_string(),
            bls_entry_selected_path: PathBuf::from(crate::boot::bls::ENTRY_SELECTED_PATH),
            uboot_fw_env_config: PathBuf::from(crate::boot::uboot::FW_ENV_CONFIG),
            efivars_dir: PathBuf::from(crate::boot::efivars::EFIVARS_DIR),
            efi_entry_a: "0001".to_string(),
            efi_entry_b: "0002".to_string(),
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the signed manifest is fetched (`http://` or `https://`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_url: Option<String>,
    /// PEM file of the CA(s) https servers must chain to; when set, only these are trusted
    /// (not the system roots). Applies to manifests, roots, images, FleetLock and reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// One trusted key: inline (`public_key`, 32 raw bytes as hex or base64) or from a file
/// holding the same text, exactly one of them (the config parser refuses none or both).
/// `id`, if given, must match the id derived from the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawKeyConfig", into = "RawKeyConfig")]
pub struct KeyConfig {
    pub id: Option<String>,
    pub source: KeySource,
}

/// Where a trusted key's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `public_key = "..."`: the key itself.
    Inline(String),
    /// `file = "..."`: a file holding it (or the publisher's JSON key file).
    File(PathBuf),
}

/// The keys of `[[trust.keys]]` of which exactly one gives the key.
pub(crate) const KEY_SOURCE_KEYS: [&str; 2] = ["public_key", "file"];

/// `[[trust.keys]]` as written, for serde only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
}

impl TryFrom<RawKeyConfig> for KeyConfig {
    type Error = String;

    fn try_from(raw: RawKeyConfig) -> Result<KeyConfig, String> {
        let one = checks::exactly_one(&KEY_SOURCE_KEYS, |k| match k {
            "public_key" => raw.public_key.is_some(),
            _ => raw.file.is_some(),
        })?;
        let source = match (one, raw.public_key, raw.file) {
            ("public_key", Some(k), _) => KeySource::Inline(k),
            (_, _, Some(f)) => KeySource::File(f),
            _ => return Err(format!("set exactly one of {}", KEY_SOURCE_KEYS.join(", "))),
        };
        Ok(KeyConfig { id: raw.id, source })
    }
}

impl From<KeyConfig> for RawKeyConfig {
    fn from(k: KeyConfig) -> RawKeyConfig {
        let (public_key, file) = match k.source {
            KeySource::Inline(key) => (Some(key), None),
            KeySource::File(f) => (None, Some(f)),
        };
        RawKeyConfig {
            id: k.id,
            public_key,
            file,
        }
    }
}

/// `[trust]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustConfig {
    pub threshold: usize,
    /// Product this host runs; manifests for other products are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    pub channel: String,
    pub keys: Vec<KeyConfig>,
    /// The trust root shipped on the host (`update-publish root init`); once a root is
    /// held, its manifest keys replace `keys` (see `docs/security.md`, migration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_file: Option<PathBuf>,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            threshold: 1,
            product: None,
            channel: "stable".into(),
            keys: Vec::new(),
            root_file: None,
        }
    }
}

/// `[state]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    pub dir: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: PathBuf::from("/var/lib/update-agent"),
        }
    }
}

/// `[install]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstallConfig {
    pub allow_downgrade: bool,
    /// Read the slot back and hash it after writing.
    pub readback: bool,
    pub connect_timeout: HumanDuration,
    /// Longest wait for any bytes from the server.
    pub read_timeout: HumanDuration,
    /// Abort a download slower than this over `min_throughput_window` (slow-retrieval attack).
    pub min_throughput_bytes_per_sec: u64,
    pub min_throughput_window: HumanDuration,
    /// Download attempts (resuming with Range) before the install fails.
    pub max_attempts: u32,
}

impl Default for InstallConfig {
    fn default() -> Self {
        InstallConfig {
            allow_downgrade: false,
            readback: true,
            connect_timeout: HumanDuration::secs(10),
            read_timeout: HumanDuration::secs(30),
            min_throughput_bytes_per_sec: 16 * 1024,
            min_throughput_window: HumanDuration::secs(60),
            max_attempts: 5,
        }
    }
}

/// `[health]`: greenboot-style check directories, with the timeouts greenboot lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Executables that must all pass.
    pub required_dir: PathBuf,
    /// Executables whose failure is only logged.
    pub wanted_dir: PathBuf,
    /// A check running longer fails.
    pub check_timeout: HumanDuration,
    /// All checks together; past it the boot is judged failed.
    pub total_timeout: HumanDuration,
    /// After a failed trial boot, run `[reboot] command` to boot the previous slot.
    pub reboot_on_failure: bool,
    /// Declared checks (`[[health.checks]]`): a systemd unit, an HTTP URL or a TCP port.
    pub checks: Vec<CheckSpec>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            required_dir: PathBuf::from("/etc/update-agent/health/required.d"),
            wanted_dir: PathBuf::from("/etc/update-agent/health/wanted.d"),
            check_timeout: HumanDuration::secs(60),
            total_timeout: HumanDuration::secs(300),
            reboot_on_failure: true,
            checks: Vec::new(),
        }
    }
}

/// One condition for rebooting into a staged slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RebootStrategy {
    #[default]
    Immediate,
    Window,
    FleetLock,
}

/// `[reboot] strategy`: one strategy (`"window"`) or a list whose conditions must all hold
/// (`["window", "fleet_lock"]`: only inside a maintenance window AND holding a FleetLock
/// slot). The daemon checks them in a fixed order, cheapest and local first: the window,
/// then the FleetLock slot (so a slot is only taken inside a window).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RebootStrategies(Vec<RebootStrategy>);

impl RebootStrategies {
    /// Whether `s` is one of the conditions.
    pub fn has(&self, s: RebootStrategy) -> bool {
        self.0.contains(&s) || (s == RebootStrategy::Immediate && self.0.is_empty())
    }

    /// The conditions in the order the daemon checks them.
    pub fn conditions(&self) -> Vec<RebootStrategy> {
        let mut v = self.0.clone();
        v.sort();
        v
    }

    fn check(&self) -> Result<(), String> {
        if self.0.is_empty() {
            return Err("needs at least one of \"immediate\", \"window\", \"fleet_lock\"".into());
        }
        let mut seen = self.0.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.0.len() {
            return Err("names a strategy twice".into());
        }
        if self.0.len() > 1 && self.0.contains(&RebootStrategy::Immediate) {
            return Err("\"immediate\" cannot be combined with another strategy".into());
        }
        Ok(())
    }
}

impl From<RebootStrategy> for RebootStrategies {
    fn from(s: RebootStrategy) -> Self {
        RebootStrategies(vec![s])
    }
}

impl From<Vec<RebootStrategy>> for RebootStrategies {
    fn from(v: Vec<RebootStrategy>) -> Self {
        RebootStrategies(v)
    }
}

/// `strategy == RebootStrategy::Window`: exactly that one strategy.
impl PartialEq<RebootStrategy> for RebootStrategies {
    fn eq(&self, other: &RebootStrategy) -> bool {
        self.0.as_slice() == [*other]
    }
}

impl Serialize for RebootStrategies {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RebootStrategies {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a strategy name or a list of them")]
        enum OneOrMany {
            One(RebootStrategy),
            Many(Vec<RebootStrategy>),
        }
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(s) => RebootStrategies(vec![s]),
            OneOrMany::Many(v) => RebootStrategies(v),
        })
    }
}

/// One weekly maintenance window: opens at `start` local time on each of `days` in
/// `time_zone`, and stays open for `length` of elapsed time (so a window that spans a DST
/// change still lasts `length`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// `Mon` .. `Sun`.
    pub days: Vec<String>,
    /// `HH:MM`, local time in `time_zone`.
    pub start: String,
    pub length: HumanDuration,
    /// IANA time zone name (`Europe/Berlin`), default `UTC`.
    #[serde(default = "utc")]
    pub time_zone: String,
}

fn utc() -> String {
    "UTC".into()
}

/// FleetLock server (airlock) settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetLockConfig {
    /// Base URL; the agent POSTs to `{url}/v1/pre-reboot` and `{url}/v1/steady-state`.
    pub url: String,
    #[serde(default = "default_group")]
    pub group: String,
}

fn default_group() -> String {
    "default".into()
}

/// `[reboot]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RebootConfig {
    pub strategy: RebootStrategies,
    /// Program and arguments that reboot the host.
    pub command: Vec<String>,
    pub windows: Vec<WindowConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_lock: Option<FleetLockConfig>,
}

impl Default for RebootConfig {
    fn default() -> Self {
        RebootConfig {
            strategy: RebootStrategy::Immediate.into(),
            command: vec!["systemctl".into(), "reboot".into()],
            windows: Vec::new(),
            fleet_lock: None,
        }
    }
}

/// `[daemon]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    pub poll_interval: HumanDuration,
    /// Random extra delay added to each poll, up to this much.
    pub jitter: HumanDuration,
    /// Upper bound of the exponential backoff after failures.
    pub max_backoff: HumanDuration,
    /// The host's rollout seed (`0..2048`) instead of the one derived from the machine id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wave_seed: Option<u32>,
    /// Where the machine id is read (wave seed and default node id).
    pub machine_id_path: PathBuf,
    /// This host's id towards FleetLock and the report endpoint; default: derived from the
    /// machine id (an app-specific hash, so the machine id itself is never sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Prometheus text file for node_exporter's textfile collector (written atomically).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_path: Option<PathBuf>,
    /// Where the daemon POSTs its status after every cycle (server-mock's `/v1/report`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_url: Option<String>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            poll_interval: HumanDuration::secs(30 * 60),
            jitter: HumanDuration::secs(5 * 60),
            max_backoff: HumanDuration::secs(6 * 3600),
            wave_seed: None,
            machine_id_path: PathBuf::from("/etc/machine-id"),
            node_id: None,
            metrics_path: None,
            report_url: None,
        }
    }
}

/// `[system]`: what the running system is. The running version is the bar below which no
/// manifest is installed; it comes from the running system, not from the agent's record, so
/// losing the record cannot lower it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SystemConfig {
    /// The running version, stated outright (semver); overrides os-release.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running_version: Option<String>,
    /// The os-release file of the booted slot as the running system sees it, read for
    /// `VERSION_ID`. Unset: `/etc/os-release`, else `/usr/lib/os-release`. Set: it must read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os_release_path: Option<PathBuf>,
}

/// The whole configuration. Every key has a default; see `docs/configuration.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub disk: DiskConfig,
    pub boot: BootConfig,
    pub server: ServerConfig,
    pub trust: TrustConfig,
    pub state: StateConfig,
    pub install: InstallConfig,
    pub health: HealthConfig,
    pub reboot: RebootConfig,
    pub daemon: DaemonConfig,
    pub system: SystemConfig,
    pub hooks: HooksConfig,
}

impl Config {
    /// Parse one TOML document (no merging) and validate it.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let parse_err = |source| ConfigError::Parse {
            path: PathBuf::from("<string>"),
            source,
        };
        validate::check_exactly_one(&toml::from_str(text).map_err(parse_err)?)?;
        let config: Config = toml::from_str(text).map_err(parse_err)?;
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as TOML (for `config show`); it loads back unchanged.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        Ok(toml::to_string_pretty(self)?)
    }
}
