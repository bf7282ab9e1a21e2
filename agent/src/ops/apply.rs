//! `update-agent apply` (and the daemon's install step): verified manifest -> policy -> install
//! into the inactive slot -> stage -> optional reboot. The state record follows every step.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use semver::Version;
use serde::Serialize;
use tracing::{info, info_span, Instrument};
use updater_proto::VerifiedManifest;

use crate::boot::SlotId;
use crate::disk::{BlockDevice, FileDevice, ResolvedSlots};
use crate::error::AgentError;
use crate::fetch::{build_client, Download, FetchConfig, ManifestSource, MinThroughput};
use crate::host::Host;
use crate::install::{
    self, Compression, FileSource, ImageSource, InstallError, InstallOptions, InstallPlan,
    ProgressEvent, Readback, ResumeRecord, TargetImage, TargetReport,
};
use crate::ops::manifest::{fetch_and_verify, image_location, locate};
use crate::ops::resume::ResumeFile;
use crate::policy::{admit, denylist_versions, HostFacts, PolicyError};
use crate::state::{HistoryEntry, HistoryEvent, Phase, SlotRecord, State, StateStore};

/// What the operator asked for.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Manifest URL or file; `None` for the configured one.
    pub manifest: Option<String>,
    pub allow_downgrade: bool,
    pub allow_denylisted: bool,
    /// Skip the read-back verification (overrides `[install] readback`).
    pub no_readback: bool,
}

/// What `apply` did, for the summary line and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub version: String,
    pub serial: u64,
    pub slot: SlotId,
    pub booted: SlotId,
    pub targets: Vec<TargetReport>,
    pub bytes_written: u64,
    pub bytes_fetched: u64,
    pub seconds: f64,
    /// What happens at the next boot, in words.
    pub next_boot: String,
}

impl ApplyReport {
    pub fn render(&self) -> String {
        format!(
            "installed {} into slot {} ({} MiB written, {} MiB fetched, {:.1} s); {}",
            self.version,
            self.slot,
            self.bytes_written >> 20,
            self.bytes_fetched >> 20,
            self.seconds,
            self.next_boot
        )
    }
}

/// Where the manifest came from and how to fetch what it names.
struct Origin<'a> {
    source: &'a ManifestSource,
    client: &'a reqwest::Client,
    fetch: &'a FetchConfig,
}

/// The fetch settings from `[install]`.
pub fn fetch_config(host: &Host) -> FetchConfig {
    let c = &host.config.install;
    FetchConfig {
        connect_timeout: c.connect_timeout.into(),
        read_timeout: c.read_timeout.into(),
        max_attempts: c.max_attempts.max(1),
        min_throughput: (c.min_throughput_bytes_per_sec > 0).then(|| MinThroughput {
            bytes_per_sec: c.min_throughput_bytes_per_sec,
            window: c.min_throughput_window.into(),
        }),
        ..FetchConfig::default()
    }
}

/// A failed apply: the error, the slot it was aimed at once known, and whether it got as far
/// as changing the host (state record, boot flags, slot bytes).
struct Failure {
    slot: Option<SlotId>,
    changed_host: bool,
    error: AgentError,
}

impl Failure {
    /// Failed before changing anything on the host.
    fn early(slot: Option<SlotId>, error: AgentError) -> Failure {
        Failure {
            slot,
            changed_host: false,
            error,
        }
    }
}

/// Records a failed apply in the history and, unless the failure changed nothing while a
/// release is staged or on its trial boot, as the phase. Keeping that phase matters: the
/// health check treats the staged slot's next boot as a trial only while the record says
/// so; otherwise it would confirm the slot without running a single check.
fn record_failure(store: &StateStore, version: Option<&str>, f: &Failure) {
    let (slot, e) = (f.slot, &f.error);
    // "Nothing to do" is not a failure: the record keeps saying what the host is doing.
    if let AgentError::Policy(p) = e {
        if matches!(
            **p,
            PolicyError::AlreadyRunning { .. } | PolicyError::AlreadyStaged { .. }
        ) {
            return;
        }
    }
    let message = e.to_string();
    let kind = e.kind().to_string();
    let result = store.update(|s| {
        let keep = !f.changed_host && matches!(s.phase, Phase::Staged { .. } | Phase::Trial { .. });
        if !keep {
            s.phase = Phase::Failed {
                kind: kind.clone(),
                message: message.clone(),
            };
        }
        let mut entry = HistoryEntry::now(HistoryEvent::Failed);
        entry.version = version.map(str::to_string);
        entry.slot = slot;
        entry.reason = Some(message.clone());
        entry.error_kind = Some(kind.clone());
        s.record(entry);
    });
    if let Err(se) = result {
        tracing::error!(error = %se, "could not record the failure in the state file");
    }
}

/// The version the booted slot runs, as this host recorded it.
fn running_version(state: &State, booted: SlotId) -> Option<Version> {
    state
        .slots
        .get(&booted)
        .and_then(|r| Version::parse(&r.version).ok())
}

/// Apply the update end to end, short of rebooting. Holds the install lock throughout.
pub async fn apply(
    host: &Host,
    opts: &ApplyOptions,
    progress: &mut (dyn FnMut(ProgressEvent) + Send),
) -> Result<ApplyReport, AgentError> {
    let _lock = crate::state::InstallLock::acquire(host.state.dir())?;
    let started = Instant::now();
    let fetch = fetch_config(host);
    let client = build_client(&fetch)?;
    let source = locate(host, opts.manifest.as_deref())?;
    let verified = match fetch_and_verify(host, &source, &client, &fetch).await {
        Ok(v) => v,
        Err(e) => {
            let f = Failure::early(None, e);
            record_failure(&host.state, None, &f);
            return Err(f.error);
        }
    };
    let m = verified.manifest();
    let version = m.version.to_string();
    let span = info_span!("apply", version = %version, serial = m.serial);
    async {
        if let Err(e) = host
            .state
            .update(|s| s.observe_serial(&m.channel, m.serial))
        {
            let f = Failure::early(None, e.into());
            record_failure(&host.state, Some(&version), &f);
            return Err(f.error);
        }
        let origin = Origin {
            source: &source,
            client: &client,
            fetch: &fetch,
        };
        match install_verified(host, opts, &verified, &origin, progress).await {
            Ok((slot, booted, targets)) => {
                let bytes_written = targets.iter().map(|t| t.bytes_written).sum();
                let bytes_fetched = targets.iter().map(|t| t.bytes_fetched).sum();
                Ok(ApplyReport {
                    version: version.clone(),
                    serial: m.serial,
                    slot,
                    booted,
                    targets,
                    bytes_written,
                    bytes_fetched,
                    seconds: started.elapsed().as_secs_f64(),
                    next_boot: format!(
                        "slot {slot} boots next for one trial boot; it is committed when its \
                         health checks pass, otherwise slot {booted} boots again"
                    ),
                })
            }
            Err(f) => {
                record_failure(&host.state, Some(&version), &f);
                Err(f.error)
            }
        }
    }
    .instrument(span)
    .await
}

/// Policy, plan, install, stage. Failures carry the target slot once it is known and say
/// whether the host was changed.
async fn install_verified(
    host: &Host,
    opts: &ApplyOptions,
    verified: &VerifiedManifest,
    origin: &Origin<'_>,
    progress: &mut (dyn FnMut(ProgressEvent) + Send),
) -> Result<(SlotId, SlotId, Vec<TargetReport>), Failure> {
    let m = verified.manifest();
    let version = m.version.to_string();
    let state = host
        .state
        .load()
        .map_err(|e| Failure::early(None, e.into()))?;
    let slots = host.slots().map_err(|e| Failure::early(None, e))?;
    let booted = host
        .booted_slot(&slots)
        .map_err(|e| Failure::early(None, e))?
        .slot;
    let target = booted.other();
    // Until the state record says Downloading, nothing on the host has changed.
    let early = |e: AgentError| Failure::early(Some(target), e);
    let fail = |e: AgentError| Failure {
        slot: Some(target),
        changed_host: true,
        error: e,
    };

    // On the booted slot's trial boot the other slot is the only fallback: installing into
    // it would leave nothing good to roll back to.
    if let Phase::Staged { slot, version: v }
    | Phase::Trial {
        slot, version: v, ..
    } = &state.phase
    {
        if *slot == booted {
            return Err(early(AgentError::Refused(format!(
                "slot {booted} runs {v} on its trial boot; slot {target} is its only \
                 fallback, so nothing is installed until {v} is confirmed (health-check or \
                 mark-good) or rolled back"
            ))));
        }
    }

    // Writing the same release again would only make the staged slot unbootable for the
    // time it takes, and lose it if that second run failed.
    if let Phase::Staged { slot, version: v } = &state.phase {
        if *slot == target && *v == version && state.slot_verified(target) {
            return Err(early(
                PolicyError::AlreadyStaged {
                    offered: m.version.clone(),
                    slot: target,
                }
                .into(),
            ));
        }
    }

    let denylist = denylist_versions(&state.denylist);
    let running = running_version(&state, booted);
    let facts = HostFacts {
        running: running.as_ref(),
        denylist: &denylist,
        allow_downgrade: opts.allow_downgrade || host.config.install.allow_downgrade,
        allow_denylisted: opts.allow_denylisted,
    };
    admit(&m.version, m.min_running_version.as_ref(), &facts).map_err(|e| early(e.into()))?;

    let mut checkpoints = ResumeFile::load(&host.state);
    let plan = plan(
        verified,
        origin,
        &slots,
        &host.disk_path().map_err(early)?.display().to_string(),
        target,
        checkpoints.records(),
    )
    .map_err(early)?;
    host.state
        .update(|s| {
            s.phase = Phase::Downloading {
                version: version.clone(),
                bytes_done: 0,
            };
            // The slot's old content is about to be overwritten: it is no rollback target.
            s.slots.remove(&target);
            let mut entry = HistoryEntry::now(HistoryEvent::InstallStarted);
            entry.version = Some(version.clone());
            entry.slot = Some(target);
            s.record(entry);
        })
        .map_err(|e| fail(e.into()))?;

    let disk_path = host.disk_path().map_err(fail)?;
    let dev: Arc<Mutex<dyn BlockDevice>> = Arc::new(Mutex::new(
        FileDevice::open(&disk_path).map_err(|e| fail(e.into()))?,
    ));
    let mut boot = host.boot_control().map_err(fail)?;
    let readback = if opts.no_readback || !host.config.install.readback {
        Readback::Off
    } else {
        Readback::Uncached { path: disk_path }
    };
    let options = InstallOptions {
        readback,
        ..InstallOptions::default()
    };
    let report = match install::install(
        plan,
        dev,
        boot.as_mut(),
        &options,
        &mut checkpoints,
        progress,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            // Checkpoints exist to survive an interrupted download. After any other failure
            // (a hash or read-back mismatch above all) the checkpointed bytes or their source
            // are suspect: resuming from them would repeat the same failure on every run.
            if !matches!(e, InstallError::Fetch { .. }) {
                if let Err(ce) = checkpoints.clear() {
                    tracing::warn!(error = %ce, "could not remove the resume checkpoints");
                }
            }
            return Err(fail(e.into()));
        }
    };
    boot.stage(target).map_err(|e| fail(e.into()))?;
    host.state
        .update(|s| {
            s.slots.insert(
                target,
                SlotRecord {
                    version: version.clone(),
                    image_sha256s: report.targets.iter().map(|t| t.sha256.clone()).collect(),
                    verified: true,
                },
            );
            s.phase = Phase::Staged {
                slot: target,
                version: version.clone(),
            };
            let mut entry = HistoryEntry::now(HistoryEvent::Staged);
            entry.version = Some(version.clone());
            entry.slot = Some(target);
            s.record(entry);
        })
        .map_err(|e| fail(e.into()))?;
    if let Err(e) = checkpoints.clear() {
        tracing::warn!(error = %e, "could not remove the resume checkpoints");
    }
    info!(slot = %target, "staged");
    Ok((target, booted, report.targets))
}

/// One target per slot partition role; every role of the slot must have an image, so a slot
/// never mixes partitions of two releases.
fn plan(
    verified: &VerifiedManifest,
    origin: &Origin<'_>,
    slots: &ResolvedSlots,
    device_name: &str,
    target: SlotId,
    checkpoints: &[ResumeRecord],
) -> Result<InstallPlan, AgentError> {
    let m = verified.manifest();
    let slot = slots.get(target);
    let missing: Vec<&str> = slot
        .parts
        .keys()
        .filter(|role| m.image(role).is_none())
        .map(String::as_str)
        .collect();
    let extra: Vec<&str> = m
        .images
        .iter()
        .filter(|i| !slot.parts.contains_key(&i.role))
        .map(|i| i.role.as_str())
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(AgentError::Refused(format!(
            "manifest {} does not match slot {target}'s partitions: {}{}",
            m.version,
            if missing.is_empty() {
                String::new()
            } else {
                format!("no image for role(s) {}", missing.join(", "))
            },
            if extra.is_empty() {
                String::new()
            } else {
                format!(" images for unknown role(s) {}", extra.join(", "))
            }
        )));
    }
    let mut targets = Vec::new();
    for image in &m.images {
        let part = &slot.parts[&image.role];
        let hex32 = |s: &str| -> Result<[u8; 32], AgentError> {
            let mut out = [0u8; 32];
            hex::decode_to_slice(s, &mut out).map_err(|e| {
                AgentError::Refused(format!("image {}: bad SHA-256 {s:?}: {e}", image.role))
            })?;
            Ok(out)
        };
        let location = image_location(origin.source, &image.url)?;
        let image_source: Box<dyn ImageSource> = match &location {
            ManifestSource::Url(url) => Box::new(Download::new(
                origin.client.clone(),
                url.clone(),
                image.compressed_size,
                origin.fetch.clone(),
            )),
            ManifestSource::File(path) => Box::new(FileSource::new(path, 1 << 20)),
        };
        let resume = checkpoints
            .iter()
            .find(|r| {
                r.slot == target
                    && r.role == image.role
                    && r.expected_sha256 == image.sha256
                    && (r.resumable || r.complete)
            })
            .map(ResumeRecord::resume_point);
        targets.push(TargetImage {
            role: image.role.clone(),
            part_offset: part.byte_offset,
            part_len: part.byte_len,
            expected_size: image.size,
            expected_sha256: hex32(&image.sha256)?,
            compression: match image.compression {
                updater_proto::Compression::None => Compression::None,
                updater_proto::Compression::Zstd => Compression::Zstd,
            },
            compressed_size: image.compressed_size,
            compressed_sha256: Some(hex32(&image.compressed_sha256)?),
            source: image_source,
            resume,
        });
    }
    Ok(InstallPlan {
        slot: target,
        device: device_name.to_string(),
        targets,
    })
}
