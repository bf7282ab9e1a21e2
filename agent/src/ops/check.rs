//! `update-agent check`: fetch and verify the manifest, say what `apply` would do and when this
//! host's wave opens. Changes nothing (not even the serial floor).

use semver::Version;
use serde::Serialize;
use time::OffsetDateTime;
use updater_proto::{eligible_from, WaveSeed};

use crate::boot::SlotId;
use crate::error::AgentError;
use crate::fetch::build_client;
use crate::host::Host;
use crate::ops::apply::fetch_config;
use crate::ops::manifest::{fetch_and_verify, locate};
use crate::policy::{admit, denylist_versions, HostFacts};

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub version: String,
    pub serial: u64,
    pub channel: String,
    pub expires_at: i64,
    pub signers: Vec<String>,
    pub images: Vec<(String, u64)>,
    pub booted: Option<SlotId>,
    pub running_version: Option<String>,
    /// `None` when `apply` would install it; otherwise why not (with its kind).
    pub refused: Option<(String, String)>,
    pub wave_seed: Option<u32>,
    /// Unix time from which this host's wave admits it (`None`: no waves, or unknown seed).
    pub eligible_from: Option<i64>,
    pub eligible_now: bool,
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
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

pub async fn check(
    host: &Host,
    manifest: Option<&str>,
    allow_downgrade: bool,
    allow_denylisted: bool,
) -> Result<CheckReport, AgentError> {
    let fetch = fetch_config(host);
    let client = build_client(&fetch)?;
    let source = locate(host, manifest)?;
    let verified = fetch_and_verify(host, &source, &client, &fetch).await?;
    let m = verified.manifest();
    let state = host.state.load()?;
    let booted = host
        .slots()
        .and_then(|slots| host.booted_slot(&slots))
        .ok()
        .map(|b| b.slot);
    let running = booted
        .and_then(|b| state.slots.get(&b))
        .and_then(|r| Version::parse(&r.version).ok());
    let denylist = denylist_versions(&state.denylist);
    let refused = admit(
        &m.version,
        m.min_running_version.as_ref(),
        &HostFacts {
            running: running.as_ref(),
            denylist: &denylist,
            allow_downgrade: allow_downgrade || host.config.install.allow_downgrade,
            allow_denylisted,
        },
    )
    .err()
    .map(|e| (e.kind().to_string(), e.to_string()));
    // `[daemon] wave_seed` or the machine id at `[daemon] machine_id_path`.
    let seed = crate::fleet::wave_seed(&host.config).ok();
    let from = seed.and_then(|s| eligible_from(&m.waves, s));
    let now = OffsetDateTime::now_utc().unix_timestamp();
    Ok(CheckReport {
        version: m.version.to_string(),
        serial: m.serial,
        channel: m.channel.clone(),
        expires_at: m.expires_at,
        signers: verified.signers().to_vec(),
        images: m.images.iter().map(|i| (i.role.clone(), i.size)).collect(),
        booted,
        running_version: running.map(|v| v.to_string()),
        refused,
        wave_seed: seed.map(WaveSeed::get),
        eligible_from: from,
        eligible_now: from.is_none_or(|at| now >= at),
    })
}
