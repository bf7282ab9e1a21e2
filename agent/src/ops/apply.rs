//! `update-agent apply` (and the daemon's install step): verified manifest -> policy -> install
//! into the inactive slot -> record the intent -> stage -> record the stage -> optional reboot.
//! The state record follows every step, and names what is on the target slot before the boot
//! flags can make it boot.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tracing::{info, info_span, Instrument};
use updater_proto::VerifiedManifest;

use crate::boot::SlotId;
use crate::disk::{BlockDevice, FileDevice, ResolvedSlots};
use crate::error::AgentError;
use crate::fetch::{Download, FetchConfig, FetchError, ManifestSource};
use crate::host::Host;
use crate::install::{
    self, FileSource, ImageSource, ImageSpec, InstallError, InstallOptions, InstallPlan,
    ProgressEvent, Readback, ResumeRecord, TargetImage, TargetReport,
};
use crate::ops::manifest::{
    admit_for_host, fetch_and_verify, image_location, locate, Fetched, Standing,
};
use crate::ops::resume::ResumeFile;
use crate::policy::PolicyError;
use crate::state::{Phase, StateStore, Transition};

/// What the operator asked for.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Manifest URL or file; `None` for the configured one.
    pub manifest: Option<String>,
    /// An offline bundle to install from instead (`--bundle`): its manifest and images.
    pub bundle: Option<std::path::PathBuf>,
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
    /// Per delta-installed target: bytes reused from the active slot, fetched, requests.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub delta: Vec<crate::delta::DeltaTargetReport>,
    /// Wall time of the whole apply, in JSON `duration_ms`.
    #[serde(
        rename = "duration_ms",
        serialize_with = "crate::jsonout::millis::from_secs_f64"
    )]
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
        ) + &crate::delta::render_reports(&self.delta)
    }
}

/// Where the manifest came from and how to fetch what it names.
struct Origin<'a> {
    source: &'a ManifestSource,
    client: &'a reqwest::Client,
    fetch: &'a FetchConfig,
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
    let result = store.transition(Transition::Failed {
        version: version.map(str::to_string),
        slot,
        kind: e.kind().to_string(),
        message: e.to_string(),
        keep_pending: !f.changed_host,
    });
    if let Err(se) = result {
        tracing::error!(error = %se, "could not record the failure in the state file");
    }
}

/// Apply the update end to end, short of rebooting: fetch and verify the manifest
/// (`opts.manifest` or the configured one), then [`apply_fetched`]. Holds the install lock
/// throughout.
pub async fn apply(
    host: &Host,
    opts: &ApplyOptions,
    progress: &mut (dyn FnMut(ProgressEvent) + Send),
) -> Result<ApplyReport, AgentError> {
    let lock = crate::state::InstallLock::acquire(host.state.dir())?;
    let fetch = &host.settings.fetch;
    let client = host.http_client()?;
    let source = match &opts.bundle {
        Some(path) => match ManifestSource::bundle(path) {
            Ok(s) => s,
            Err(e) => {
                let f = Failure::early(None, e.into());
                record_failure(&host.state, None, &f);
                return Err(f.error);
            }
        },
        None => locate(host, opts.manifest.as_deref())?,
    };
    let fetched = match fetch_and_verify(host, &source, &client, fetch).await {
        Ok(v) => v,
        Err(e) => {
            let f = Failure::early(None, e);
            record_failure(&host.state, None, &f);
            return Err(f.error);
        }
    };
    install_fetched(host, opts, &fetched, &client, fetch, lock, progress).await
}

/// Install a manifest already fetched and verified (by `check_fetched`: the daemon installs
/// exactly what it checked, fetched once). The host's policy is applied again under the
/// install lock, by the same rule `check` used; `opts.manifest` is ignored.
pub(crate) async fn apply_fetched(
    host: &Host,
    opts: &ApplyOptions,
    fetched: &Fetched,
    progress: &mut (dyn FnMut(ProgressEvent) + Send),
) -> Result<ApplyReport, AgentError> {
    let lock = crate::state::InstallLock::acquire(host.state.dir())?;
    let client = host.http_client()?;
    install_fetched(
        host,
        opts,
        fetched,
        &client,
        &host.settings.fetch,
        lock,
        progress,
    )
    .await
}

async fn install_fetched(
    host: &Host,
    opts: &ApplyOptions,
    fetched: &Fetched,
    client: &reqwest::Client,
    fetch: &FetchConfig,
    _lock: crate::state::InstallLock,
    progress: &mut (dyn FnMut(ProgressEvent) + Send),
) -> Result<ApplyReport, AgentError> {
    let started = Instant::now();
    let verified = &fetched.verified;
    let source = &fetched.source;
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
            source,
            client,
            fetch,
        };
        match install_verified(host, opts, verified, &origin, progress).await {
            Ok((slot, booted, targets, delta)) => {
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
                    delta,
                    seconds: started.elapsed().as_secs_f64(),
                    next_boot: format!(
                        "slot {slot} boots next for {}; it is committed when its health \
                         checks pass, otherwise slot {booted} boots again",
                        match host.config.boot.tries {
                            1 => "one trial boot".to_string(),
                            n => format!("up to {n} trial boots"),
                        }
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
) -> Result<
    (
        SlotId,
        SlotId,
        Vec<TargetReport>,
        Vec<crate::delta::DeltaTargetReport>,
    ),
    Failure,
> {
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
    // The state machine's rule (checked again under the write), said in the operator's terms.
    let begin = Transition::BeginDownload {
        version: version.clone(),
        target,
    };
    if begin.check(&state.phase).is_err() {
        if let Phase::Staged { version: v, .. } | Phase::Trial { version: v, .. } = &state.phase {
            return Err(early(AgentError::TrialInProgress {
                booted,
                fallback: target,
                version: v.clone(),
            }));
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

    let standing = Standing::of(host, &state, Some(booted)).map_err(early)?;
    admit_for_host(
        host,
        verified,
        &state,
        &standing,
        opts.allow_downgrade,
        opts.allow_denylisted,
    )
    .map_err(|e| early(e.into()))?;

    let mut checkpoints = ResumeFile::load(&host.state);
    let mut deltas = Vec::new();
    let plan = plan(
        verified,
        origin,
        &slots,
        &host.disk_path().map_err(early)?.display().to_string(),
        target,
        checkpoints.records(),
        &mut deltas,
    )
    .map_err(early)?;
    // A bundle's images are hashed against the signed manifest before anything is written:
    // a truncated or tampered bundle changes nothing (docs/bundles.md).
    if let ManifestSource::Bundle { bundle, .. } = origin.source {
        check_bundle_images(bundle, verified).map_err(early)?;
    }
    // The slot's old content is about to be overwritten: it is no rollback target.
    host.state.transition(begin).map_err(|e| fail(e.into()))?;

    let disk_path = host.disk_path().map_err(fail)?;
    let dev: Arc<Mutex<dyn BlockDevice>> = Arc::new(Mutex::new(
        FileDevice::open(&disk_path).map_err(|e| fail(e.into()))?,
    ));
    let mut boot = host.boot_control().map_err(fail)?;
    let readback = if opts.no_readback || !host.config.install.readback {
        Readback::Off
    } else {
        Readback::Uncached
    };
    // `update-agent cancel` (or D-Bus Cancel) stops the pipeline at its next chunk boundary.
    let (cancel, _watching) = super::cancel::watch(host.state.dir());
    let options = InstallOptions {
        readback,
        cancel: Some(cancel),
        ..InstallOptions::default()
    };
    let mut report = match install::install(
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
            // Checkpoints exist to survive an interrupted download (or a cancelled one). After
            // any other failure (a hash or read-back mismatch above all) the checkpointed
            // bytes or their source are suspect: resuming from them would repeat the same
            // failure on every run.
            if !matches!(
                e,
                InstallError::Fetch { .. } | InstallError::Cancelled { .. }
            ) {
                if let Err(ce) = checkpoints.clear() {
                    tracing::warn!(error = %ce, "could not remove the resume checkpoints");
                }
            }
            return Err(fail(e.into()));
        }
    };
    // The post-install hook sees the written, verified slot before anything can boot it; a
    // failure leaves the slot unstaged (install disabled it) with the hook's output in the
    // history and the error.
    if host.config.hooks.post_install.is_some() {
        let env = post_install_env(host, &slots, target, &version).map_err(fail)?;
        let hooks = host.config.hooks.clone();
        let store = host.state.clone();
        let v = version.clone();
        tokio::task::spawn_blocking(move || {
            crate::hooks::run(
                &hooks,
                crate::hooks::HookPoint::PostInstall,
                &env,
                &store,
                Some(&v),
            )
        })
        .await
        .map_err(|e| {
            fail(AgentError::Io {
                what: "running the post-install hook".into(),
                source: std::io::Error::other(e.to_string()),
            })
        })?
        .map_err(|e| fail(e.into()))?;
    }
    // The intent, before the flag write: from the moment the flags can make the target boot,
    // the record names the release on it. A crash between the flag write and the staged
    // record then leaves a trial the health check judges under the right version (and
    // denylists that version, not "unknown", if it fails), never an anonymous one.
    host.state
        .transition(Transition::StagingIntent {
            slot: target,
            version: version.clone(),
            image_sha256s: report.targets.iter().map(|t| t.sha256.clone()).collect(),
        })
        .map_err(|e| fail(e.into()))?;
    super::testhold::hold_point("staging");
    boot.stage(target).map_err(|e| fail(e.into()))?;
    super::testhold::hold_point("flags-written");
    let delta = crate::delta::apply_reports(&deltas, &mut report.targets);
    host.state
        .transition(Transition::Staged {
            slot: target,
            version: version.clone(),
            transfer: Some(crate::delta::transfer(&delta, &report.targets)),
        })
        .map_err(|e| fail(e.into()))?;
    if let Err(e) = checkpoints.clear() {
        tracing::warn!(error = %e, "could not remove the resume checkpoints");
    }
    info!(slot = %target, "staged");
    Ok((target, booted, report.targets, delta))
}

/// Every image of `verified` in `bundle`: present, of the published size and SHA-256.
fn check_bundle_images(
    bundle: &crate::bundle::Bundle,
    verified: &VerifiedManifest,
) -> Result<(), AgentError> {
    for (image, digests) in verified.images() {
        bundle
            .check_image(
                &image.url,
                image.compressed_size,
                &digests.compressed_sha256.0,
            )
            .map_err(FetchError::from)?;
    }
    Ok(())
}

/// What the post-install hook is told: the release, the slot, the disk and, per role, the
/// partition's number, byte offset and size on it (`UPDATE_AGENT_PART_<ROLE>_*`).
fn post_install_env(
    host: &Host,
    slots: &ResolvedSlots,
    target: SlotId,
    version: &str,
) -> Result<Vec<(String, String)>, AgentError> {
    let mut env = vec![
        ("UPDATE_AGENT_VERSION".to_string(), version.to_string()),
        ("UPDATE_AGENT_SLOT".to_string(), target.to_string()),
        (
            "UPDATE_AGENT_DISK".to_string(),
            host.disk_path()?.display().to_string(),
        ),
    ];
    for (role, p) in &slots.get(target).parts {
        let key: String = role
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        env.push((
            format!("UPDATE_AGENT_PART_{key}_NUMBER"),
            p.number.to_string(),
        ));
        env.push((
            format!("UPDATE_AGENT_PART_{key}_OFFSET"),
            p.byte_offset.to_string(),
        ));
        env.push((
            format!("UPDATE_AGENT_PART_{key}_SIZE"),
            p.byte_len.to_string(),
        ));
    }
    Ok(env)
}

/// The delta source's configuration for a chunked entry fetched over HTTP (`None`: install
/// it in full).
fn delta_plan(
    image: &updater_proto::ImageEntry,
    digests: &updater_proto::ImageDigests,
    location: &ManifestSource,
    origin: &Origin<'_>,
    slots: &ResolvedSlots,
    device_name: &str,
    target: SlotId,
) -> Result<Option<crate::delta::DeltaConfig>, AgentError> {
    let (ManifestSource::Url(file_url), Some(ix)) = (location, &image.chunk_index) else {
        return Ok(None);
    };
    let ManifestSource::Url(index_url) = image_location(origin.source, &ix.url)? else {
        return Ok(None);
    };
    let seed = slots
        .get(target.other())
        .parts
        .get(&image.role)
        .map(|p| crate::delta::Seed {
            device: device_name.into(),
            offset: p.byte_offset,
            len: p.byte_len,
        });
    Ok(crate::delta::config_for(
        image,
        digests,
        file_url.clone(),
        index_url,
        origin.client.clone(),
        origin.fetch.clone(),
        seed,
    ))
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
    deltas: &mut Vec<(String, crate::delta::StatsHandle)>,
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
        return Err(AgentError::ManifestRolesMismatch {
            version: m.version.to_string(),
            slot: target,
            detail: format!(
                "{}{}",
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
            ),
        });
    }
    let mut targets = Vec::new();
    // Digests come parsed from verification, never re-read from the manifest's text.
    for (image, digests) in verified.images() {
        let spec = ImageSpec::from_entry(image, digests, &slot.parts[&image.role]);
        let location = image_location(origin.source, &image.url)?;
        let resume = checkpoints
            .iter()
            .find(|r| r.matches(target, &spec) && (r.resumable || r.complete))
            .map(ResumeRecord::resume_point);
        // Delta (schema v2 chunked entry over HTTP): seeded from the active slot's partition
        // of the same role; see crate::delta. Everything else is installed as before.
        if let Some(cfg) = delta_plan(
            image,
            digests,
            &location,
            origin,
            slots,
            device_name,
            target,
        )? {
            let (t, stats) = crate::delta::delta_target(spec, cfg);
            deltas.push((image.role.clone(), stats));
            targets.push(TargetImage { resume, ..t });
            continue;
        }
        let image_source: Box<dyn ImageSource> = match &location {
            ManifestSource::Url(url) => Box::new(Download::new(
                origin.client.clone(),
                url.clone(),
                image.compressed_size,
                origin.fetch.clone(),
            )),
            ManifestSource::File(path) => {
                Box::new(FileSource::new(path, crate::install::DEFAULT_BUFFER_SIZE))
            }
            ManifestSource::Bundle { bundle, name } => {
                let m = bundle.member(name).map_err(FetchError::from)?;
                Box::new(FileSource::window(
                    &bundle.path,
                    m.offset,
                    m.size,
                    crate::install::DEFAULT_BUFFER_SIZE,
                ))
            }
        };
        targets.push(TargetImage {
            image: spec,
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
