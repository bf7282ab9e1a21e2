//! Getting the signed manifest, verifying it against this host's trust policy and state, and
//! admitting it by this host's policy. Shared by `check`, `apply` and the daemon: the daemon
//! fetches and verifies once per cycle and hands the [`Fetched`] manifest to `apply`.

use semver::Version;
use updater_proto::{verify, VerifiedManifest, VerifyContext, MAX_ENVELOPE_BYTES};

use crate::boot::SlotId;
use crate::error::AgentError;
use crate::fetch::{fetch_manifest, FetchConfig, FetchError, ManifestSource};
use crate::host::Host;
use crate::policy::{admit, denylist_versions, HostFacts, PolicyError};
use crate::state::State;

/// A manifest that verified for this host, with where it came from (image URLs resolve
/// against it).
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    pub(crate) verified: VerifiedManifest,
    pub(crate) source: ManifestSource,
}

/// `arg` as given on the command line, else the configured `server.manifest_url`.
pub(crate) fn locate(host: &Host, arg: Option<&str>) -> Result<ManifestSource, AgentError> {
    let text =
        match arg {
            Some(a) => a.to_string(),
            None => host.config.server.manifest_url.clone().ok_or_else(|| {
                AgentError::NotConfigured {
                    key: "server.manifest_url",
                    hint: "pass --manifest URL|FILE or set [server] manifest_url".into(),
                }
            })?,
        };
    Ok(ManifestSource::parse(&text)?)
}

/// Where an image named `relative` in the manifest at `base` lives.
pub(crate) fn image_location(
    base: &ManifestSource,
    relative: &str,
) -> Result<ManifestSource, AgentError> {
    base.beside(relative).map_err(|e| AgentError::ImageUrl {
        url: relative.to_string(),
        base: base.to_string(),
        reason: e,
    })
}

/// Reads the manifest (never more than the envelope bound plus one byte, so an oversized
/// one fails verification's size check by name), verifies it for this host and raises the
/// serial floor to its serial: every verified manifest raises it, whoever fetched it, so an
/// older signed manifest never verifies again.
pub(crate) async fn fetch_and_verify(
    host: &Host,
    source: &ManifestSource,
    client: &reqwest::Client,
    fetch: &FetchConfig,
) -> Result<Fetched, AgentError> {
    // Trust root first (TUF order): the manifest is verified with the newest root's keys.
    crate::trust::refresh(host, source, client, fetch).await?;
    let bytes = fetch_manifest(client, source, MAX_ENVELOPE_BYTES as u64 + 1, fetch)
        .await
        .map_err(|e| match (source, e) {
            (ManifestSource::File(_), e @ FetchError::Io { .. }) => {
                AgentError::ManifestUnreadable {
                    source_name: source.to_string(),
                    source: e,
                }
            }
            (_, e) => e.into(),
        })?;
    let verified = verify_for_host(host, source, &bytes)?;
    let m = verified.manifest();
    host.state.raise_floor(&m.channel, m.serial)?;
    Ok(Fetched {
        verified,
        source: source.clone(),
    })
}

/// Verifies `bytes` with the configured keys, threshold, product and channel, against the
/// serial floor and the current time. The one place a manifest is verified.
pub(crate) fn verify_for_host(
    host: &Host,
    source: &ManifestSource,
    bytes: &[u8],
) -> Result<VerifiedManifest, AgentError> {
    let policy = crate::trust::manifest_policy(host)?;
    let channel = host.config.trust.channel.clone();
    let floor = host.state.serial_floor(&channel)?;
    let product = host
        .config
        .trust
        .product
        .clone()
        .ok_or_else(|| AgentError::NotConfigured {
            key: "trust.product",
            hint: "set [trust] product to this host's product string".into(),
        })?;
    let ctx = VerifyContext::new(host.clock.unix(), floor, product).with_channel(channel);
    let verified = verify(bytes, &policy, &ctx).map_err(|error| AgentError::Verify {
        source_name: source.to_string(),
        error,
    })?;
    for s in verified.ignored_signatures() {
        tracing::warn!(
            manifest = %source,
            key_id = %s.key_id,
            reason = s.reason.as_str(),
            "signature ignored: it did not count towards the threshold, which valid ones met"
        );
    }
    Ok(verified)
}

/// What the host knows when it admits a release: the running version.
#[derive(Debug, Clone)]
pub(crate) struct Standing {
    pub(crate) running: Option<Version>,
}

impl Standing {
    /// The running version from the running system and the record, given the booted slot
    /// (`None` when it cannot be told; [`Host::running_version`]).
    pub(crate) fn of(
        host: &Host,
        state: &State,
        booted: Option<SlotId>,
    ) -> Result<Standing, AgentError> {
        Ok(Standing {
            running: host.running_version(state, booted)?,
        })
    }
}

/// The one admission rule `check`, the daemon and `apply` apply to a verified manifest:
/// the denylist, the running version (downgrade, already running) and the minimum running
/// version, with the operator's overrides.
pub(crate) fn admit_for_host(
    host: &Host,
    verified: &VerifiedManifest,
    state: &State,
    standing: &Standing,
    allow_downgrade: bool,
    allow_denylisted: bool,
) -> Result<(), PolicyError> {
    let m = verified.manifest();
    let denylist = denylist_versions(&state.denylist);
    admit(
        &m.version,
        m.min_running_version.as_ref(),
        &HostFacts {
            running: standing.running.as_ref(),
            denylist: &denylist,
            allow_downgrade: allow_downgrade || host.config.install.allow_downgrade,
            allow_denylisted,
        },
    )
}
