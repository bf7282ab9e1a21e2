//! `update-agent check`: fetch and verify the manifest, say what `apply` would do and when this
//! host's wave opens. Changes nothing but the serial floor, which every verified manifest
//! raises. [`check_fetched`] also hands back the verified manifest, so the daemon installs
//! exactly what it checked without fetching it again.

use serde::Serialize;
use updater_proto::{eligible_from, WaveSeed};

use crate::boot::SlotId;
use crate::error::AgentError;
use crate::host::Host;
use crate::ops::manifest::{admit_for_host, fetch_and_verify, locate, Fetched, Standing};

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub version: String,
    pub serial: u64,
    pub channel: String,
    #[serde(serialize_with = "crate::jsonout::unix_time")]
    pub expires_at: i64,
    pub signers: Vec<String>,
    /// Signatures that did not count; the threshold was met without them.
    pub ignored_signatures: Vec<IgnoredSignature>,
    #[serde(serialize_with = "crate::jsonout::role_sizes")]
    pub images: Vec<(String, u64)>,
    pub booted: Option<SlotId>,
    pub running_version: Option<String>,
    /// `None` when `apply` would install it; otherwise why not (with its kind).
    #[serde(serialize_with = "crate::jsonout::kind_message")]
    pub refused: Option<(String, String)>,
    pub wave_seed: Option<u32>,
    /// Unix time from which this host's wave admits it (`None`: no waves, or unknown seed).
    #[serde(serialize_with = "crate::jsonout::unix_time_opt")]
    pub eligible_from: Option<i64>,
    pub eligible_now: bool,
}

/// A signature of the manifest that did not count towards the threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IgnoredSignature {
    /// The signature's key id.
    pub key_id: String,
    /// `invalid` (it does not verify under the trusted key it names) or `untrusted_key`.
    pub reason: String,
}

impl CheckReport {
    pub fn render(&self) -> String {
        let mut out = format!(
            "manifest: version {} (serial {}, channel {}), signed by {}, expires {}\n",
            self.version,
            self.serial,
            self.channel,
            self.signers.join(", "),
            fmt_time(self.expires_at)
        );
        for s in &self.ignored_signatures {
            out += &format!("  ignored signature by {}: {}\n", s.key_id, s.reason);
        }
        for (role, size) in &self.images {
            out += &format!("  image {role}: {} MiB\n", size >> 20);
        }
        out += &format!(
            "running: {} (slot {})\n",
            self.running_version.as_deref().unwrap_or("unknown"),
            self.booted.map(|s| s.to_string()).unwrap_or("?".into())
        );
        match (&self.wave_seed, self.eligible_from) {
            (Some(seed), Some(at)) => {
                out += &format!(
                    "wave: seed {seed}, eligible from {}{}\n",
                    fmt_time(at),
                    if self.eligible_now { " (now)" } else { "" }
                )
            }
            (Some(seed), None) => out += &format!("wave: seed {seed}, no waves: eligible now\n"),
            (None, _) => out += "wave: seed unknown (no machine id)\n",
        }
        match &self.refused {
            None => out += "verdict: apply would install it\n",
            Some((kind, why)) => out += &format!("verdict: apply would refuse [{kind}]: {why}\n"),
        }
        out
    }
}

fn fmt_time(unix: i64) -> String {
    crate::clock::rfc3339_or_number(unix)
}

pub async fn check(
    host: &Host,
    manifest: Option<&str>,
    allow_downgrade: bool,
    allow_denylisted: bool,
) -> Result<CheckReport, AgentError> {
    Ok(
        check_fetched(host, manifest, allow_downgrade, allow_denylisted)
            .await?
            .0,
    )
}

/// [`check`], also returning the verified manifest (for `apply_fetched`).
pub(crate) async fn check_fetched(
    host: &Host,
    manifest: Option<&str>,
    allow_downgrade: bool,
    allow_denylisted: bool,
) -> Result<(CheckReport, Fetched), AgentError> {
    let client = host.http_client()?;
    let source = locate(host, manifest)?;
    let fetched = fetch_and_verify(host, &source, &client, &host.settings.fetch).await?;
    let verified = &fetched.verified;
    let m = verified.manifest();
    let state = host.state.load()?;
    let booted = host
        .slots()
        .and_then(|slots| host.booted_slot(&slots))
        .ok()
        .map(|b| b.slot);
    let standing = Standing::of(host, &state, booted)?;
    let refused = admit_for_host(
        host,
        verified,
        &state,
        &standing,
        allow_downgrade,
        allow_denylisted,
    )
    .err()
    .map(|e| (e.kind().to_string(), e.to_string()));
    // `[daemon] wave_seed` or the machine id at `[daemon] machine_id_path`.
    let seed = crate::fleet::wave_seed(&host.config).ok();
    let from = seed.and_then(|s| eligible_from(&m.waves, s));
    let now = host.clock.unix();
    let report = CheckReport {
        version: m.version.to_string(),
        serial: m.serial,
        channel: m.channel.clone(),
        expires_at: m.expires_at,
        signers: verified.signers().to_vec(),
        ignored_signatures: verified
            .ignored_signatures()
            .iter()
            .map(|s| IgnoredSignature {
                key_id: s.key_id.clone(),
                reason: s.reason.as_str().to_string(),
            })
            .collect(),
        images: m.images.iter().map(|i| (i.role.clone(), i.size)).collect(),
        booted,
        running_version: standing.running.map(|v| v.to_string()),
        refused,
        wave_seed: seed.map(WaveSeed::get),
        eligible_from: from,
        eligible_now: from.is_none_or(|at| now >= at),
    };
    Ok((report, fetched))
}
