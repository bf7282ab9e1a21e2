//! The rules across keys that turn the raw, merged configuration into one the host can be
//! opened with: layout, boot tries, URLs, trust keys (read and parsed), timeouts, windows.

use base64::Engine as _;
use updater_proto::verify::{TrustPolicy, TrustedKey};

use super::{
    invalid, BootBackendKind, Config, ConfigError, KeyConfig, KeySource, LayoutPreset,
    RebootStrategy, WindowConfig,
};
use crate::disk::SlotLayoutConfig;

impl Config {
    /// Rules across keys, checked on the merged result.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.hooks.validate().map_err(|(k, m)| invalid(&k, m))?;
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
            BootBackendKind::Bls => crate::boot::bls::MAX_TRIES_LIMIT,
            BootBackendKind::Uboot => crate::boot::uboot::MAX_TRIES_LIMIT,
            // BootNext is one boot.
            BootBackendKind::Efi => 1,
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
        let strategy = &self.reboot.strategy;
        strategy
            .check()
            .map_err(|m| invalid("reboot.strategy", m))?;
        if strategy.has(RebootStrategy::Window) && self.reboot.windows.is_empty() {
            return Err(invalid(
                "reboot.windows",
                "strategy \"window\" needs at least one [[reboot.windows]]",
            ));
        }
        if strategy.has(RebootStrategy::FleetLock) && self.reboot.fleet_lock.is_none() {
            return Err(invalid(
                "reboot.fleet_lock",
                "strategy \"fleet_lock\" needs [reboot.fleet_lock] url = ...",
            ));
        }
        for (i, w) in self.reboot.windows.iter().enumerate() {
            w.validate()
                .map_err(|m| invalid(&format!("reboot.windows[{i}]"), m))?;
        }
        if let Some(v) = &self.system.running_version {
            semver::Version::parse(v)
                .map_err(|e| invalid("system.running_version", format!("{v:?}: {e}")))?;
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
                "no trusted keys configured; set [trust] root_file or add [[trust.keys]] public_key = \"...\"",
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
    pub(crate) fn load(&self, index: usize) -> Result<TrustedKey, ConfigError> {
        let which = match (&self.id, &self.source) {
            (Some(id), _) => format!("trust.keys[{index}] (id {id})"),
            (None, KeySource::File(f)) => format!("trust.keys[{index}] ({})", f.display()),
            (None, KeySource::Inline(_)) => format!("trust.keys[{index}]"),
        };
        let err = |message: String| ConfigError::Key {
            which: which.clone(),
            message,
        };
        let key = match &self.source {
            KeySource::Inline(k) => TrustedKey::new(decode_key(k.trim()).map_err(err)?),
            KeySource::File(f) => {
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
    pub(crate) fn start_minutes(&self) -> Result<u32, String> {
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

/// The "exactly one of" rules on one raw TOML table, before it is typed: the typed
/// configuration cannot hold a broken entry (`CheckSpec`, `KeyConfig` are enums inside), and
/// this names the entry as the rules above do: `health.checks[1]` (kind `config_invalid`),
/// `trust.keys[0]` (kind `config_key`).
pub(super) fn check_exactly_one(table: &toml::Table) -> Result<(), ConfigError> {
    let entries = |section: &str, key: &str| -> Vec<toml::Table> {
        table
            .get(section)
            .and_then(|s| s.get(key))
            .and_then(toml::Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_table().cloned()).collect())
            .unwrap_or_default()
    };
    // An entry with a key serde does not know is left to serde, which names that key.
    let known = |t: &toml::Table, keys: &[&str]| t.keys().all(|k| keys.contains(&k.as_str()));
    for (i, check) in entries("health", "checks").iter().enumerate() {
        if !known(check, &super::checks::CHECK_KEYS) {
            continue;
        }
        super::checks::exactly_one(&super::checks::CHECK_TARGET_KEYS, |k| check.contains_key(k))
            .map_err(|m| invalid(&format!("health.checks[{i}]"), m))?;
    }
    for (i, key) in entries("trust", "keys").iter().enumerate() {
        if !known(key, &["id", "public_key", "file"]) {
            continue;
        }
        super::checks::exactly_one(&super::KEY_SOURCE_KEYS, |k| key.contains_key(k)).map_err(
            |message| ConfigError::Key {
                which: match key.get("id").and_then(toml::Value::as_str) {
                    Some(id) => format!("trust.keys[{i}] (id {id})"),
                    None => format!("trust.keys[{i}]"),
                },
                message,
            },
        )?;
    }
    Ok(())
}
