//! `[[health.checks]]`: one declared health check as written in the configuration. The
//! health runner turns it into a check; it lives here so that `config` needs nothing above it.

use serde::{Deserialize, Serialize};

use super::duration::HumanDuration;

/// The keys of `[[health.checks]]` of which exactly one names what is checked.
pub(super) const CHECK_TARGET_KEYS: [&str; 3] = ["unit", "http", "tcp"];
/// Every key of `[[health.checks]]` (the fields of [`RawCheckSpec`]).
pub(super) const CHECK_KEYS: [&str; 6] = ["name", "unit", "http", "tcp", "required", "timeout"];

/// The one key of `keys` that `present` says is set, else the message naming them all.
pub(super) fn exactly_one<'a>(
    keys: &[&'a str],
    present: impl Fn(&str) -> bool,
) -> Result<&'a str, String> {
    let set: Vec<&str> = keys.iter().copied().filter(|k| present(k)).collect();
    match set[..] {
        [one] => Ok(one),
        _ => Err(format!("set exactly one of {}", keys.join(", "))),
    }
}

/// What a declared check probes: exactly one target, so "none" and "two" cannot be held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckTarget {
    /// A systemd unit that must be active (`systemctl is-active --quiet UNIT`).
    Unit(String),
    /// An `http://` or `https://` URL that must answer 2xx to a GET.
    Http(String),
    /// A `host:port` that must accept a TCP connection.
    Tcp(String),
}

/// One check declared in the configuration (`[[health.checks]]`): exactly one of `unit`,
/// `http`, `tcp` (the config parser refuses none or several, naming the entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawCheckSpec", into = "RawCheckSpec")]
pub struct CheckSpec {
    /// Shown in logs and history; defaults to `unit:<name>`, `http:<url>` or `tcp:<addr>`.
    pub name: Option<String>,
    pub target: CheckTarget,
    /// A failing required check fails the boot; a failing wanted one is only logged.
    pub required: bool,
    /// Overrides `[health] check_timeout` for this check.
    pub timeout: Option<HumanDuration>,
}

/// `[[health.checks]]` as written: the target keys side by side, for serde only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawCheckSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<String>,
    required: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<HumanDuration>,
}

impl Default for RawCheckSpec {
    fn default() -> Self {
        RawCheckSpec {
            name: None,
            unit: None,
            http: None,
            tcp: None,
            required: true,
            timeout: None,
        }
    }
}

impl TryFrom<RawCheckSpec> for CheckSpec {
    type Error = String;

    fn try_from(raw: RawCheckSpec) -> Result<CheckSpec, String> {
        let target = match exactly_one(&CHECK_TARGET_KEYS, |k| match k {
            "unit" => raw.unit.is_some(),
            "http" => raw.http.is_some(),
            _ => raw.tcp.is_some(),
        })? {
            "unit" => CheckTarget::Unit(raw.unit.unwrap_or_default()),
            "http" => CheckTarget::Http(raw.http.unwrap_or_default()),
            _ => CheckTarget::Tcp(raw.tcp.unwrap_or_default()),
        };
        Ok(CheckSpec {
            name: raw.name,
            target,
            required: raw.required,
            timeout: raw.timeout,
        })
    }
}

impl From<CheckSpec> for RawCheckSpec {
    fn from(spec: CheckSpec) -> RawCheckSpec {
        let (mut unit, mut http, mut tcp) = (None, None, None);
        match spec.target {
            CheckTarget::Unit(u) => unit = Some(u),
            CheckTarget::Http(h) => http = Some(h),
            CheckTarget::Tcp(t) => tcp = Some(t),
        }
        RawCheckSpec {
            name: spec.name,
            unit,
            http,
            tcp,
            required: spec.required,
            timeout: spec.timeout,
        }
    }
}

impl CheckSpec {
    /// A required check of `target` with the default timeout.
    pub fn new(target: CheckTarget) -> CheckSpec {
        CheckSpec {
            name: None,
            target,
            required: true,
            timeout: None,
        }
    }

    /// The target is well-formed.
    pub fn validate(&self) -> Result<(), String> {
        match &self.target {
            CheckTarget::Http(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!("http = {url:?} is not an http:// or https:// URL"));
                }
            }
            CheckTarget::Tcp(addr) => {
                if !addr
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                {
                    return Err(format!("tcp = {addr:?} is not host:port"));
                }
            }
            CheckTarget::Unit(unit) => {
                if unit.is_empty() || unit.starts_with('-') {
                    return Err(format!("unit = {unit:?} is not a unit name"));
                }
            }
        }
        if self.timeout.is_some_and(|t| t.get().is_zero()) {
            return Err("timeout must be more than 0s".into());
        }
        Ok(())
    }

    /// The name shown in reports.
    pub fn display_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        match &self.target {
            CheckTarget::Unit(u) => format!("unit:{u}"),
            CheckTarget::Http(h) => format!("http:{h}"),
            CheckTarget::Tcp(t) => format!("tcp:{t}"),
        }
    }
}
