//! Policy before install: is this verified update one this host should take?
//!
//! Signature, expiry, serial floor and product are checked by `updater_proto` verification;
//! what remains needs the host's own knowledge: what it runs and what it rolled back from.

use semver::Version;

/// Why a verified update is not installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("version {offered} is not newer than the running {running}; pass --allow-downgrade to install it anyway")]
    Downgrade { offered: Version, running: Version },
    #[error("version {offered} is already running")]
    AlreadyRunning { offered: Version },
    #[error("version {offered} is already installed and staged in slot {slot}: reboot to try it")]
    AlreadyStaged {
        offered: Version,
        slot: crate::boot::SlotId,
    },
    #[error("version {offered} is on this host's denylist (rolled back: {reason}); pass --allow-denylisted to install it anyway")]
    Denylisted { offered: Version, reason: String },
    #[error("version {offered} requires a running version of at least {minimum}, this host runs {running}")]
    BelowMinimum {
        offered: Version,
        minimum: Version,
        running: Version,
    },
}

impl PolicyError {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            PolicyError::Downgrade { .. } => "downgrade",
            PolicyError::AlreadyRunning { .. } => "already_running",
            PolicyError::AlreadyStaged { .. } => "already_staged",
            PolicyError::Denylisted { .. } => "denylisted",
            PolicyError::BelowMinimum { .. } => "below_minimum_version",
        }
    }
}

/// What the host knows about itself and what the operator allowed.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostFacts<'a> {
    /// The version running now, if known (a fresh host may not know it).
    pub running: Option<&'a Version>,
    /// Versions rolled back from, with the reason recorded at the time.
    pub denylist: &'a [(Version, String)],
    pub allow_downgrade: bool,
    pub allow_denylisted: bool,
}

/// The denylist as versions with their reasons; entries that are not semver (written by hand
/// or by a newer agent) cannot match an offered version and are skipped.
pub(crate) fn denylist_versions(entries: &[crate::state::DenyEntry]) -> Vec<(Version, String)> {
    entries
        .iter()
        .filter_map(|d| {
            Version::parse(&d.version)
                .ok()
                .map(|v| (v, d.reason.clone()))
        })
        .collect()
}

/// Decides whether `offered` (with its optional `min_running` requirement) may be installed.
pub(crate) fn admit(
    offered: &Version,
    min_running: Option<&Version>,
    host: &HostFacts<'_>,
) -> Result<(), PolicyError> {
    if let Some((_, reason)) = host.denylist.iter().find(|(v, _)| v == offered) {
        if !host.allow_denylisted {
            return Err(PolicyError::Denylisted {
                offered: offered.clone(),
                reason: reason.clone(),
            });
        }
    }
    let Some(running) = host.running else {
        return Ok(());
    };
    if offered == running {
        return Err(PolicyError::AlreadyRunning {
            offered: offered.clone(),
        });
    }
    if offered < running && !host.allow_downgrade {
        return Err(PolicyError::Downgrade {
            offered: offered.clone(),
            running: running.clone(),
        });
    }
    if let Some(minimum) = min_running {
        if running < minimum {
            return Err(PolicyError::BelowMinimum {
                offered: offered.clone(),
                minimum: minimum.clone(),
                running: running.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn newer_is_admitted_older_needs_permission() {
        let running = v("1.2.0");
        let host = HostFacts {
            running: Some(&running),
            ..Default::default()
        };
        assert_eq!(admit(&v("1.3.0"), None, &host), Ok(()));
        assert_eq!(
            admit(&v("1.1.0"), None, &host).unwrap_err().kind(),
            "downgrade"
        );
        assert_eq!(
            admit(&v("1.2.0"), None, &host).unwrap_err().kind(),
            "already_running"
        );
        let host = HostFacts {
            allow_downgrade: true,
            ..host
        };
        assert_eq!(admit(&v("1.1.0"), None, &host), Ok(()));
    }

    #[test]
    fn denylisted_version_is_refused_unless_forced() {
        let running = v("1.0.0");
        let deny = vec![(v("2.0.0"), "health check failed".to_string())];
        let host = HostFacts {
            running: Some(&running),
            denylist: &deny,
            ..Default::default()
        };
        let err = admit(&v("2.0.0"), None, &host).unwrap_err();
        assert_eq!(err.kind(), "denylisted");
        assert!(err.to_string().contains("health check failed"));
        assert_eq!(admit(&v("2.0.1"), None, &host), Ok(()));
        let host = HostFacts {
            allow_denylisted: true,
            ..host
        };
        assert_eq!(admit(&v("2.0.0"), None, &host), Ok(()));
    }

    #[test]
    fn minimum_running_version_is_enforced() {
        let running = v("1.0.0");
        let host = HostFacts {
            running: Some(&running),
            ..Default::default()
        };
        let err = admit(&v("3.0.0"), Some(&v("2.0.0")), &host).unwrap_err();
        assert_eq!(err.kind(), "below_minimum_version");
        assert_eq!(admit(&v("3.0.0"), Some(&v("1.0.0")), &host), Ok(()));
    }
}
