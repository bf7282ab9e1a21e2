//! Getting the signed manifest and verifying it against this host's trust policy and state.
//! Shared by `check`, `apply` and the daemon.

use time::OffsetDateTime;
use updater_proto::{verify, VerifiedManifest, VerifyContext, MAX_ENVELOPE_BYTES};

use crate::error::AgentError;
use crate::fetch::{fetch_manifest, FetchConfig, ManifestSource};
use crate::host::Host;

/// `arg` as given on the command line, else the configured `server.manifest_url`.
pub fn locate(host: &Host, arg: Option<&str>) -> Result<ManifestSource, AgentError> {
    let text = match arg {
        Some(a) => a.to_string(),
        None => host.config.server.manifest_url.clone().ok_or_else(|| {
            AgentError::Refused(
                "no manifest given: pass --manifest URL|FILE or set [server] manifest_url".into(),
            )
        })?,
    };
    Ok(ManifestSource::parse(&text)?)
}

/// Where an image named `relative` in the manifest at `base` lives.
pub fn image_location(base: &ManifestSource, relative: &str) -> Result<ManifestSource, AgentError> {
    match base {
        ManifestSource::Url(url) => url.join(relative).map(ManifestSource::Url).map_err(|e| {
            AgentError::Refused(format!("image url {relative:?} against {base}: {e}"))
        }),
        ManifestSource::File(path) => {
            let dir = path.parent().map(|p| p.to_path_buf()).unwrap_or_default();
            Ok(ManifestSource::File(dir.join(relative)))
        }
    }
}

/// Reads the manifest (never more than the envelope bound plus one byte, so an oversized
/// one fails verification's size check by name) and verifies it for this host.
pub async fn fetch_and_verify(
    host: &Host,
    source: &ManifestSource,
    client: &reqwest::Client,
    fetch: &FetchConfig,
) -> Result<VerifiedManifest, AgentError> {
    let bytes = fetch_manifest(client, source, MAX_ENVELOPE_BYTES as u64 + 1, fetch).await?;
    verify_for_host(host, source, &bytes)
}

/// Verifies `bytes` with the configured keys, threshold, product and channel, against the
/// highest serial this host has seen and the current time.
pub fn verify_for_host(
    host: &Host,
    source: &ManifestSource,
    bytes: &[u8],
) -> Result<VerifiedManifest, AgentError> {
    let policy = host.config.trust_policy()?;
    let state = host.state.load()?;
    let channel = host.config.trust.channel.clone();
    let product =
        host.config.trust.product.clone().ok_or_else(|| {
            AgentError::Refused("no product configured: set [trust] product".into())
        })?;
    let ctx = VerifyContext::new(
        OffsetDateTime::now_utc().unix_timestamp(),
        state.serial(&channel),
        product,
    )
    .with_channel(channel);
    verify(bytes, &policy, &ctx).map_err(|error| AgentError::Verify {
        source_name: source.to_string(),
        error,
    })
}
