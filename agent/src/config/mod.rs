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

pub mod duration;

pub use duration::HumanDuration;

use crate::boot::SlotId;
use crate::disk::SlotLayoutConfig;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use updater_proto::verify::{TrustPolicy, TrustedKey};

/// Default main configuration file.
pub const DEFAULT_MAIN: &str = "/etc/update-agent/config.toml";
/// Default drop-in directories, lowest precedence first.
pub const DEFAULT_DROPIN_DIRS: [&str; 3] = [
    "/usr/lib/update-agent/config.d",
    "/run/update-agent/config.d",
    "/etc/update-agent/config.d",
];

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

/// Where configuration comes from; injectable for tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigSources {
    /// The main file; when set it must exist.
    pub main: Option<PathBuf>,
    /// Drop-in directories, lowest precedence first; missing directories are skipped.
    pub dropin_dirs: Vec<PathBuf>,
}

impl ConfigSources {
    /// The system locations. `main_override` (`--config`) must exist; the default main file
    /// may be absent.
    pub fn system(main_override: Option<PathBuf>) -> Self {
        let main = main_override.or_else(|| {
            let p = PathBuf::from(DEFAULT_MAIN);
            p.exists().then_some(p)
        });
        ConfigSources {
            main,
            dropin_dirs: DEFAULT_DROPIN_DIRS.iter().map(PathBuf::from).collect(),
        }
    }

    /// The files to read, in merge order (main first, then fragments by name, masked).
    pub fn files(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let mut out = Vec::new();
        if let Some(main) = &self.main {
            out.push(main.clone());
        }
        let mut fragments: BTreeMap<std::ffi::OsString, PathBuf> = BTreeMap::new();
        for dir in &self.dropin_dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ConfigError::Io {
                        path: dir.clone(),
                        source,
                    })
                }
            };
            for entry in entries {
                let entry = entry.map_err(|source| ConfigError::Io {
                    path: dir.clone(),
                    source,
                })?;
                let name = entry.file_name();
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml")
                    && !name.to_string_lossy().starts_with('.')
                    && !path.is_dir()
                {
                    // Later directories overwrite (mask) earlier same-named fragments.
                    fragments.insert(name, path);
                }
            }
        }
        out.extend(fragments.into_values());
        Ok(out)
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
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            backend: BootBackendKind::Gptprio,
            grubenv_path: PathBuf::from("/boot/grub/grubenv"),
            tries: 1,
            booted_slot: None,
            cmdline_path: PathBuf::from("/proc/cmdline"),
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
}

/// One trusted key: inline (`public_key`, 32 raw bytes as hex or base64) or from a file
/// holding the same text. `id`, if given, must match the id derived from the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
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
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            threshold: 1,
            product: None,
            channel: "stable".into(),
            keys: Vec::new(),
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
    pub checks: Vec<crate::health::CheckSpec>,
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

/// When to reboot into a staged slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RebootStrategy {
    #[default]
    Immediate,
    Window,
    FleetLock,
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
    pub strategy: RebootStrategy,
    /// Program and arguments that reboot the host.
    pub command: Vec<String>,
    pub windows: Vec<WindowConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_lock: Option<FleetLockConfig>,
}

impl Default for RebootConfig {
    fn default() -> Self {
        RebootConfig {
            strategy: RebootStrategy::Immediate,
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
}

impl Config {
    /// Read, check and merge every source, then validate the result.
    pub fn load(sources: &ConfigSources) -> Result<Config, ConfigError> {
        let mut merged = toml::Table::new();
        for path in sources.files()? {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
                path: path.clone(),
                source,
            })?;
            let parse_err = |source| ConfigError::Parse {
                path: path.clone(),
                source,
            };
            // Checked alone first, so unknown keys and wrong types name this file.
            toml::from_str::<Config>(&text).map_err(parse_err)?;
            let table: toml::Table = toml::from_str(&text).map_err(parse_err)?;
            tracing::debug!(path = %path.display(), "configuration source merged");
            merge(&mut merged, table);
        }
        let config: Config = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| invalid("(merged)", e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Parse one TOML document (no merging) and validate it.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<string>"),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as TOML (for `config show`); it loads back unchanged.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Rules across keys, checked on the merged result.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match (self.disk.layout, &self.disk.slots) {
            (LayoutPreset::Custom, None) => {
                return Err(invalid(
                    "disk.slots",
                    "layout = \"custom\" needs a [disk.slots] table",
                ))
            }
            (LayoutPreset::Custom, Some(s)) => s
                .validate()
                .map_err(|e| invalid("disk.slots", e.to_string()))?,
            (preset, Some(_)) => {
                return Err(invalid(
                    "disk.slots",
                    format!(
                        "set only with layout = \"custom\" (layout is {:?})",
                        preset_name(preset)
                    ),
                ))
            }
            (_, None) => {}
        }
        let max_tries = match self.boot.backend {
            BootBackendKind::Gptprio => 15,
            BootBackendKind::Grubenv => crate::boot::grubenv::MAX_TRIES_LIMIT,
        };
        if !(1..=max_tries).contains(&self.boot.tries) {
            return Err(invalid(
                "boot.tries",
                format!(
                    "{} is out of range 1..={max_tries} for backend {:?}",
                    self.boot.tries, self.boot.backend
                ),
            ));
        }
        if let Some(url) = &self.server.manifest_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "server.manifest_url",
                    format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if self.trust.threshold == 0 {
            return Err(invalid(
                "trust.threshold",
                "must be at least 1 (0 would accept unsigned manifests)",
            ));
        }
        if self.trust.channel.is_empty() {
            return Err(invalid("trust.channel", "must not be empty"));
        }
        if !self.trust.keys.is_empty() {
            self.trust_policy()?;
        }
        if self.state.dir.as_os_str().is_empty() {
            return Err(invalid("state.dir", "must not be empty"));
        }
        for (key, d) in [
            ("install.connect_timeout", self.install.connect_timeout),
            ("install.read_timeout", self.install.read_timeout),
            (
                "install.min_throughput_window",
                self.install.min_throughput_window,
            ),
            ("health.check_timeout", self.health.check_timeout),
            ("health.total_timeout", self.health.total_timeout),
            ("daemon.poll_interval", self.daemon.poll_interval),
            ("daemon.max_backoff", self.daemon.max_backoff),
        ] {
            if d.get().is_zero() {
                return Err(invalid(key, "must be more than 0s"));
            }
        }
        for (i, check) in self.health.checks.iter().enumerate() {
            check
                .validate()
                .map_err(|m| invalid(&format!("health.checks[{i}]"), m))?;
        }
        if self.install.max_attempts == 0 {
            return Err(invalid("install.max_attempts", "must be at least 1"));
        }
        if self.reboot.command.is_empty() || self.reboot.command[0].is_empty() {
            return Err(invalid("reboot.command", "must name a program"));
        }
        match self.reboot.strategy {
            RebootStrategy::Window if self.reboot.windows.is_empty() => {
                return Err(invalid(
                    "reboot.windows",
                    "strategy = \"window\" needs at least one [[reboot.windows]]",
                ))
            }
            RebootStrategy::FleetLock if self.reboot.fleet_lock.is_none() => {
                return Err(invalid(
                    "reboot.fleet_lock",
                    "strategy = \"fleet_lock\" needs [reboot.fleet_lock] url = ...",
                ))
            }
            _ => {}
        }
        for (i, w) in self.reboot.windows.iter().enumerate() {
            w.validate()
                .map_err(|m| invalid(&format!("reboot.windows[{i}]"), m))?;
        }
        if let Some(seed) = self.daemon.wave_seed {
            updater_proto::WaveSeed::new(seed)
                .map_err(|e| invalid("daemon.wave_seed", e.to_string()))?;
        }
        if let Some(url) = &self.daemon.report_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "daemon.report_url",
                    format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if self
            .daemon
            .node_id
            .as_deref()
            .is_some_and(|id| id.trim().is_empty())
        {
            return Err(invalid("daemon.node_id", "must not be empty when set"));
        }
        if let Some(fl) = &self.reboot.fleet_lock {
            if !(fl.url.starts_with("http://") || fl.url.starts_with("https://")) {
                return Err(invalid(
                    "reboot.fleet_lock.url",
                    format!("{:?} is not an http:// or https:// URL", fl.url),
                ));
            }
            let group_ok = !fl.group.is_empty()
                && fl
                    .group
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            if !group_ok {
                return Err(invalid(
                    "reboot.fleet_lock.group",
                    format!("{:?} must match [a-zA-Z0-9.-]+", fl.group),
                ));
            }
        }
        Ok(())
    }

    /// The partition layout selected by `[disk]`.
    pub fn slot_layout(&self) -> Result<SlotLayoutConfig, ConfigError> {
        Ok(match self.disk.layout {
            LayoutPreset::Flatcar => SlotLayoutConfig::flatcar(),
            LayoutPreset::Chromeos => SlotLayoutConfig::chromeos(),
            LayoutPreset::Bottlerocket => SlotLayoutConfig::bottlerocket(),
            LayoutPreset::Custom => {
                self.disk.slots.clone().ok_or_else(|| {
                    invalid("disk.slots", "layout = \"custom\" needs [disk.slots]")
                })?
            }
        })
    }

    /// The trust policy from `[trust]`: keys read and parsed, ids checked, threshold applied.
    pub fn trust_policy(&self) -> Result<TrustPolicy, ConfigError> {
        if self.trust.keys.is_empty() {
            return Err(invalid(
                "trust.keys",
                "no trusted keys configured; add [[trust.keys]] public_key = \"...\"",
            ));
        }
        let keys = self
            .trust
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| k.load(i))
            .collect::<Result<Vec<_>, _>>()?;
        TrustPolicy::new(keys, self.trust.threshold).map_err(|e| invalid("trust", e.to_string()))
    }
}

fn preset_name(p: LayoutPreset) -> &'static str {
    match p {
        LayoutPreset::Flatcar => "flatcar",
        LayoutPreset::Chromeos => "chromeos",
        LayoutPreset::Bottlerocket => "bottlerocket",
        LayoutPreset::Custom => "custom",
    }
}

impl KeyConfig {
    /// Read and parse this key (`index` names it in errors when it has no id).
    pub fn load(&self, index: usize) -> Result<TrustedKey, ConfigError> {
        let which = match (&self.id, &self.file) {
            (Some(id), _) => format!("trust.keys[{index}] (id {id})"),
            (None, Some(f)) => format!("trust.keys[{index}] ({})", f.display()),
            (None, None) => format!("trust.keys[{index}]"),
        };
        let err = |message: String| ConfigError::Key {
            which: which.clone(),
            message,
        };
        let key = match (&self.public_key, &self.file) {
            (Some(k), None) => TrustedKey::new(decode_key(k.trim()).map_err(err)?),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| err(format!("cannot read {}: {e}", f.display())))?;
                if text.trim_start().starts_with('{') {
                    // The publisher's key file (`update-publish keygen`): one format for both
                    // sides, its own keyid checked on load.
                    crate::publish::load_public_key(f).map_err(|e| err(e.to_string()))?
                } else {
                    TrustedKey::new(decode_key(text.trim()).map_err(err)?)
                }
            }
            _ => return Err(err("give exactly one of `public_key` or `file`".into())),
        };
        if let Some(id) = &self.id {
            if !id.eq_ignore_ascii_case(key.key_id()) {
                return Err(err(format!(
                    "id does not match the key (the key's id is {})",
                    key.key_id()
                )));
            }
        }
        Ok(key)
    }
}

/// 32 raw ed25519 key bytes from 64 hex characters or base64.
fn decode_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        hex::decode(text).map_err(|e| e.to_string())?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("neither 64 hex characters nor base64: {e}"))?
    };
    let n = bytes.len();
    bytes
        .try_into()
        .map_err(|_| format!("an ed25519 public key is 32 bytes, this is {n}"))
}

impl WindowConfig {
    fn validate(&self) -> Result<(), String> {
        const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        if self.days.is_empty() {
            return Err("`days` is empty".into());
        }
        for d in &self.days {
            if !DAYS.contains(&d.as_str()) {
                return Err(format!("day {d:?} is not one of {}", DAYS.join(", ")));
            }
        }
        self.start_minutes()?;
        if self.length.get().is_zero() {
            return Err("`length` must be more than 0s".into());
        }
        if self.length.get() > std::time::Duration::from_secs(7 * 24 * 3600) {
            return Err("`length` must be at most 7 days (a weekly window)".into());
        }
        jiff::tz::TimeZone::get(&self.time_zone).map_err(|e| {
            format!(
                "time_zone {:?} is not a known IANA time zone: {e}",
                self.time_zone
            )
        })?;
        Ok(())
    }

    /// Minutes after local midnight at which the window opens.
    pub fn start_minutes(&self) -> Result<u32, String> {
        let bad = || format!("start {:?} is not HH:MM (00:00..23:59)", self.start);
        let (h, m) = self.start.split_once(':').ok_or_else(bad)?;
        let h: u32 = h.parse().map_err(|_| bad())?;
        let m: u32 = m.parse().map_err(|_| bad())?;
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(h * 60 + m)
    }
}

/// Merge `over` into `base`: tables recursively, everything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}
