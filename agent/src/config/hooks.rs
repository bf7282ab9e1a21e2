//! `[hooks]`: programs the agent runs at three points of an update (docs/hooks.md).

use serde::{Deserialize, Serialize};

use super::HumanDuration;

/// `[hooks]`: each point is optional; nothing runs when it is unset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// After the slot is written and verified, before it is staged; a failure leaves it
    /// unstaged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_install: Option<HookConfig>,
    /// Before `[reboot] command` (e.g. `kubectl drain`); a failure cancels the reboot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pre_reboot: Option<HookConfig>,
    /// After the booted slot is committed (e.g. `kubectl uncordon`); a failure is recorded,
    /// the commit stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_commit: Option<HookConfig>,
}

/// One hook: program and arguments, and how long it may run before it is killed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    pub command: Vec<String>,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration::secs(5 * 60)
}

impl HooksConfig {
    /// Each configured hook names a program and has a timeout above zero.
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        for (name, hook) in [
            ("post_install", &self.post_install),
            ("pre_reboot", &self.pre_reboot),
            ("post_commit", &self.post_commit),
        ] {
            let Some(h) = hook else { continue };
            if h.command.first().is_none_or(|p| p.is_empty()) {
                return Err((
                    format!("hooks.{name}.command"),
                    "must name a program".into(),
                ));
            }
            if h.timeout.get().is_zero() {
                return Err((format!("hooks.{name}.timeout"), "must be above 0s".into()));
            }
        }
        Ok(())
    }
}
