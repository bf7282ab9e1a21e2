//! `update-agent health-check`: once per boot, before `boot-complete.target`.
//!
//! - Trial boot (the staged slot booted): record `Trial{boot_id}`, run the checks; pass ->
//!   commit the slot; fail -> flip back to the other slot, denylist the version, record why,
//!   and reboot (`[health] reboot_on_failure`).
//! - Fallback (a slot was staged but the loader booted the other one): the new slot failed
//!   to boot; record it as a rollback and denylist the version.
//! - Normal boot: confirm the booted slot (reset a GRUB attempt counter) and exit.
//!
//! With `--no-commit` (the shipped units) a passed trial is only recorded as `Passed`; the
//! commit is `update-agent commit` (`commit_passed`), run by update-agent-commit.service
//! after `boot-complete.target`, so any unit the target requires can still veto it.
//!
//! Each boot's verdict is kept in the health journal under the kernel's boot id, so a second
//! run on the same boot reports it and changes nothing.

use std::path::PathBuf;

use crate::clock::Timestamp;
use serde::Serialize;

use crate::boot::grubenv::{EnvLocation, RaucVars};
use crate::boot::{BootControl, BootError, SlotId, SlotStatus};
use crate::config::BootBackendKind;
use crate::error::AgentError;
use crate::health::journal::{BootKind, BootRun, Journal, RunOutcome};
use crate::health::runner::{self, CheckEnv, CheckResult};
use crate::health::{drill, HealthSettings};
use crate::host::Host;
use crate::ops::rollback;
use crate::state::{InstallLock, Phase, Transition};

/// What the caller can change about a run.
#[derive(Debug, Clone)]
pub struct HealthOptions {
    /// Where the current boot's id is read (`/proc/sys/kernel/random/boot_id`).
    pub boot_id_path: PathBuf,
    /// Where the time since boot is read (`/proc/uptime`): the kernel's boot time.
    pub uptime_path: PathBuf,
}

impl Default for HealthOptions {
    fn default() -> Self {
        HealthOptions {
            boot_id_path: PathBuf::from(crate::state::BOOT_ID_PATH),
            uptime_path: PathBuf::from(drill::PROC_UPTIME_PATH),
        }
    }
}

/// What the health check found and did.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    pub boot_id: String,
    pub kind: BootKind,
    pub booted: SlotId,
    pub version: Option<String>,
    pub outcome: RunOutcome,
    /// An earlier run on this boot already recorded the verdict; nothing was done now.
    pub already_recorded: bool,
    pub reason: Option<String>,
    pub checks: Vec<CheckResult>,
    /// This trial failed on purpose for the rollback drill.
    pub drill: bool,
    pub rolled_back_to: Option<SlotId>,
    pub denylisted: Option<String>,
    /// The reboot command was run.
    pub rebooting: bool,
}

impl HealthReport {
    /// Whether this boot is fine to reach `boot-complete.target` (exit status 0).
    pub fn healthy(&self) -> bool {
        matches!(
            self.outcome,
            RunOutcome::Passed
                | RunOutcome::Committed
                | RunOutcome::Confirmed
                | RunOutcome::FallbackDetected
        )
    }

    fn from_run(run: &BootRun, already: bool) -> HealthReport {
        HealthReport {
            boot_id: run.boot_id.clone(),
            kind: run.kind,
            booted: run.booted,
            version: run.version.clone(),
            outcome: run.outcome,
            already_recorded: already,
            reason: run.reason.clone(),
            checks: run.checks.clone(),
            drill: run.drill_armed_at.is_some(),
            rolled_back_to: run.rolled_back_to,
            denylisted: None,
            rebooting: false,
        }
    }

    pub fn render(&self) -> String {
        let version = self.version.as_deref().unwrap_or("unknown version");
        let mut out = String::new();
        if self.already_recorded {
            out += &format!(
                "the health check already ran on this boot ({}); its verdict stands and nothing was done again\n",
                self.boot_id
            );
        }
        out += &match (self.kind, self.outcome) {
            (BootKind::Trial, RunOutcome::Committed) => format!(
                "trial boot of slot {} ({version}): required checks passed; slot {} committed",
                self.booted, self.booted
            ),
            (BootKind::Trial, RunOutcome::Passed) => format!(
                "trial boot of slot {} ({version}): required checks passed; the commit waits for boot-complete.target (`update-agent commit`)",
                self.booted
            ),
            (BootKind::Trial, RunOutcome::RolledBack) => format!(
                "trial boot of slot {} ({version}) FAILED{}; slot {} boots next",
                self.booted,
                if self.drill { " (rollback drill)" } else { "" },
                self.rolled_back_to
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "?".into())
            ),
            (BootKind::Fallback, _) => format!(
                "fallback detected: the loader booted slot {} ({version}) because the other slot never came up",
                self.booted
            ),
            (BootKind::Normal, _) => format!("normal boot of slot {} ({version}): confirmed", self.booted),
            (_, outcome) => format!(
                "{:?} boot of slot {} ({version}): {:?}",
                self.kind, self.booted, outcome
            ),
        };
        out += "\n";
        if let Some(r) = &self.reason {
            out += &format!("reason: {r}\n");
        }
        for c in &self.checks {
            out += &format!("  {} [{} ms]\n", c.describe(), c.millis);
        }
        if let Some(d) = &self.denylisted {
            out += &format!(
                "{d} is denylisted: `apply` refuses it unless run with --allow-denylisted\n"
            );
        }
        if self.rebooting {
            out += "rebooting into the previous slot\n";
        }
        out.trim_end().to_string()
    }
}

fn ts(t: Timestamp) -> String {
    t.to_string()
}

/// Run the health check for the current boot; a passed trial is committed.
pub fn health_check(host: &Host, opts: &HealthOptions) -> Result<HealthReport, AgentError> {
    run(host, opts, true)
}

/// Run the health check for the current boot; a passed trial is recorded as `Passed` and
/// left on trial for `commit_passed` after `boot-complete.target`.
pub fn health_check_no_commit(
    host: &Host,
    opts: &HealthOptions,
) -> Result<HealthReport, AgentError> {
    run(host, opts, false)
}

fn run(host: &Host, opts: &HealthOptions, commit: bool) -> Result<HealthReport, AgentError> {
    let settings = &host.settings.health;
    let boot_id = crate::state::read_boot_id(&opts.boot_id_path)?;
    let _span = tracing::info_span!("health_check", boot_id = %boot_id).entered();
    let lock = InstallLock::acquire(host.state.dir())?;
    let journal = Journal::load_or_set_aside(host.state.dir(), host.clock.as_ref())?;
    if let Some(run) = journal.for_boot(&boot_id) {
        if run.outcome != RunOutcome::InProgress {
            tracing::info!(outcome = ?run.outcome, "verdict already recorded for this boot");
            return Ok(HealthReport::from_run(run, true));
        }
        tracing::warn!("a health check on this boot started and never finished; running it again");
    }
    let slots = host.slots()?;
    let booted = host.booted_slot(&slots)?.slot;
    let state = host.state.load()?;
    let pending = match &state.phase {
        Phase::Staged { slot, version } | Phase::Trial { slot, version, .. } => Some((
            *slot,
            version.clone(),
            matches!(state.phase, Phase::Trial { .. }),
        )),
        _ => None,
    };
    // A slot running a version this host rolled back from is waiting for the reboot away
    // from it; whatever its flags say, it is not judged again.
    let booted_denied = state
        .slots
        .get(&booted)
        .is_some_and(|r| state.is_denied(&r.version));
    // The boot control of this command, built once and handed down.
    let mut ctx = Ctx {
        host,
        settings,
        boot_id: &boot_id,
        booted_at: drill::kernel_booted_at(&opts.uptime_path, host.clock.now()),
        journal,
        commit,
        boot: host.boot_control()?,
    };
    match pending {
        Some((slot, version, _)) if slot == booted => trial(ctx, lock, slot, version),
        Some((slot, version, was_trial)) => fallback(ctx, booted, slot, version, was_trial),
        None if !booted_denied && flags_say_trial(host, ctx.boot.as_mut(), booted)? => {
            // The record lost track of a stage (an older agent, a restored state directory):
            // the flags are the truth, and a trial is never confirmed unchecked.
            let version = state
                .slots
                .get(&booted)
                .map(|r| r.version.clone())
                .unwrap_or_else(|| "unknown".into());
            tracing::warn!(%booted, version, "boot flags show a trial boot the state record does not know; running the checks");
            trial(ctx, lock, booted, version)
        }
        None => normal(ctx, booted),
    }
}

/// RAUC's U-Boot script counts every boot down (`BOOT_x_LEFT`), committed slots too: a
/// confirmed slot below `tries` gets its attempts back on each normal boot, as RAUC's
/// mark-good does; otherwise a committed slot falls back after `tries` reboots.
fn counted_down(host: &Host, s: &SlotStatus) -> bool {
    host.config.boot.backend == BootBackendKind::Uboot && s.tries < host.config.boot.tries
}

/// Whether the boot flags mark `booted` as an uncommitted trial: gptprio: not successful (a
/// committed slot always is; bls: a counter; uboot: our trial mark or out of BOOT_ORDER; efi:
/// out of BootOrder); grubenv: our trial mark names it (its attempt counter alone cannot
/// tell, RAUC's script counts every boot).
fn flags_say_trial(
    host: &Host,
    boot: &mut dyn BootControl,
    booted: SlotId,
) -> Result<bool, AgentError> {
    Ok(match host.config.boot.backend {
        BootBackendKind::Gptprio
        | BootBackendKind::Bls
        | BootBackendKind::Uboot
        | BootBackendKind::Efi => !boot
            .status()?
            .slots
            .iter()
            .any(|s| s.slot == booted && s.successful),
        BootBackendKind::Grubenv => {
            let path = &host.config.boot.grubenv_path;
            let loc = EnvLocation::File(path.clone());
            let env = loc.read().map_err(BootError::from)?;
            RaucVars::from_env(&env, &path.display().to_string())
                .map_err(BootError::from)?
                .trial
                == Some(booted)
        }
    })
}

struct Ctx<'a> {
    host: &'a Host,
    settings: &'a HealthSettings,
    boot_id: &'a str,
    /// When this boot's kernel started, recorded in the run (the drill's timeline).
    booted_at: Option<crate::clock::Timestamp>,
    journal: Journal,
    /// Commit a passed trial now (false: leave it to `commit_passed`).
    commit: bool,
    /// The host's boot control for this run.
    boot: Box<dyn BootControl>,
}

impl Ctx<'_> {
    fn save(&mut self, run: &BootRun) -> Result<(), AgentError> {
        self.journal.upsert(run.clone());
        Ok(self.journal.save(self.host.state.dir())?)
    }
}

fn trial(
    mut ctx: Ctx<'_>,
    lock: InstallLock,
    slot: SlotId,
    version: String,
) -> Result<HealthReport, AgentError> {
    let host = ctx.host;
    let dir = host.state.dir().to_path_buf();
    let prior = ctx.journal.for_boot(ctx.boot_id).cloned();
    let mut run = BootRun::start_at(
        ctx.boot_id,
        slot,
        Some(version.clone()),
        BootKind::Trial,
        host.clock.now(),
    );
    run.booted_at = ctx.booted_at;
    // A rerun after a crash mid-check keeps the first start and the drill it was armed with.
    match &prior {
        Some(p) => {
            run.started_at = p.started_at;
            run.drill_armed_at = p.drill_armed_at;
        }
        None => run.drill_armed_at = drill::armed(&dir, host.clock.now())?.map(|m| m.armed_at),
    }
    host.state.transition(Transition::Trial {
        slot,
        version: version.clone(),
        boot_id: ctx.boot_id.to_string(),
    })?;
    // Journal first, then the marker goes: a crash in between keeps the drill armed in the
    // journal's run, so it still fires exactly once.
    ctx.save(&run)?;
    if run.drill_armed_at.is_some() {
        drill::take(&dir, host.clock.now())?;
    }
    let drill_why = run.drill_armed_at.map(|t| {
        format!(
            "rollback drill armed at {}: this trial boot fails on purpose",
            ts(t)
        )
    });
    let checks = runner::collect(ctx.settings, drill_why);
    tracing::info!(%slot, version, checks = checks.len(), "trial boot: running health checks");
    let env = CheckEnv {
        slot: slot.to_string(),
        version: version.clone(),
    };
    let verdict = runner::run_all(&checks, ctx.settings.total_timeout, &env);
    run.checks = verdict.results.clone();
    run.checks_done_at = Some(host.clock.now());

    if verdict.passed {
        let wanted: Vec<String> = verdict.wanted_failures().map(|r| r.name.clone()).collect();
        let required = verdict.results.iter().filter(|r| r.required).count();
        let reason = format!(
            "health checks passed on the trial boot ({required} required{})",
            if wanted.is_empty() {
                String::new()
            } else {
                format!("; wanted checks failed, not fatal: {}", wanted.join(", "))
            }
        );
        if !ctx.commit {
            run.outcome = RunOutcome::Passed;
            run.reason = Some(reason);
            run.finished_at = Some(host.clock.now());
            ctx.save(&run)?;
            return Ok(HealthReport::from_run(&run, false));
        }
        if let Err(e) = crate::ops::commit::commit_slot(host, ctx.boot.as_mut(), slot, &reason) {
            run.outcome = RunOutcome::Error;
            run.reason = Some(format!(
                "checks passed but committing slot {slot} failed: {e}"
            ));
            run.finished_at = Some(host.clock.now());
            ctx.save(&run)?;
            return Err(e);
        }
        run.outcome = RunOutcome::Committed;
        run.reason = Some(reason);
        run.finished_at = Some(host.clock.now());
        ctx.save(&run)?;
        return Ok(HealthReport::from_run(&run, false));
    }

    let failure = verdict
        .first_failure()
        .map(CheckResult::describe)
        .unwrap_or_else(|| "no check passed".into());
    let is_drill = run.drill_armed_at.is_some();
    let reason = if is_drill {
        format!("rollback drill on slot {slot} ({version}): {failure}")
    } else {
        format!("health check failed on slot {slot} ({version}): {failure}")
    };
    // The drill tests the mechanism, not the release: its version stays installable.
    match rollback::roll_back(host, ctx.boot.as_mut(), slot, &reason, !is_drill) {
        Ok(r) => {
            run.outcome = RunOutcome::RolledBack;
            run.rolled_back_at = Some(host.clock.now());
            run.rolled_back_to = Some(r.to);
            run.reason = Some(reason);
            run.finished_at = run.rolled_back_at;
            ctx.save(&run)?;
            drop(lock);
            let mut report = HealthReport::from_run(&run, false);
            report.denylisted = r.denylisted;
            if ctx.settings.reboot_on_failure {
                crate::ops::reboot::reboot(host)?;
                report.rebooting = true;
            }
            Ok(report)
        }
        Err(e) => {
            // Never committed, so the loader still falls back once its tries run out.
            let why = format!(
                "{reason}; flipping the boot flags back failed ({e}): slot {slot} stays \
                 uncommitted and the loader falls back when its tries run out"
            );
            run.outcome = RunOutcome::Error;
            run.reason = Some(why.clone());
            run.finished_at = Some(host.clock.now());
            ctx.save(&run)?;
            let kind = e.kind().to_string();
            host.state.transition(Transition::Failed {
                version: Some(version.clone()),
                slot: Some(slot),
                kind,
                message: why,
                keep_pending: false,
            })?;
            Err(e)
        }
    }
}

fn fallback(
    mut ctx: Ctx<'_>,
    booted: SlotId,
    staged: SlotId,
    version: String,
    was_trial: bool,
) -> Result<HealthReport, AgentError> {
    let host = ctx.host;
    let state = host.state.load()?;
    let booted_version = state.slots.get(&booted).map(|r| r.version.clone());
    let mut run = BootRun::start_at(
        ctx.boot_id,
        booted,
        booted_version,
        BootKind::Fallback,
        host.clock.now(),
    );
    run.booted_at = ctx.booted_at;
    let reason = format!(
        "new slot failed to boot: slot {staged} ({version}) {}, and the loader fell back to slot {booted}",
        if was_trial {
            "started its trial boot but its health check never finished"
        } else {
            "never reached its health check"
        }
    );
    tracing::error!(%staged, %booted, version, "{reason}");
    let denylisted = match rollback::roll_back(host, ctx.boot.as_mut(), staged, &reason, true) {
        Ok(r) => r.denylisted,
        Err(e) => {
            // The loader already gave up on the slot; record the truth even if the flags
            // could not be tidied.
            tracing::warn!(error = %e, "could not clear the failed slot's boot flags");
            let reason = format!("{reason} (its boot flags were left as they are: {e})");
            host.state
                .transition(Transition::RolledBack {
                    from: staged,
                    reason,
                    deny: true,
                    error_kind: Some(e.kind().to_string()),
                })?
                .denylisted
        }
    };
    run.outcome = RunOutcome::FallbackDetected;
    run.rolled_back_at = Some(host.clock.now());
    run.rolled_back_to = Some(booted);
    run.reason = Some(reason);
    run.finished_at = run.rolled_back_at;
    ctx.save(&run)?;
    let mut report = HealthReport::from_run(&run, false);
    report.denylisted = denylisted;
    Ok(report)
}

fn normal(mut ctx: Ctx<'_>, booted: SlotId) -> Result<HealthReport, AgentError> {
    let host = ctx.host;
    let state = host.state.load()?;
    let version = state.slots.get(&booted).map(|r| r.version.clone());
    // The record says the other slot is committed, yet the loader booted this one: the
    // committed slot booted once without reaching its health check (power lost mid-boot, a
    // hang) and its attempts ran out. Policy (docs/health.md, "A committed slot that falls
    // back"): confirm the slot that runs, record the fallback (phase, history, metrics), do
    // not denylist the newer release: the daemon's next cycle installs it again and it earns
    // its commit through a fresh trial boot.
    let fell_back_from = match &state.phase {
        Phase::Committed { slot, version } if *slot != booted => Some((*slot, version.clone())),
        _ => None,
    };
    let kind = if fell_back_from.is_some() {
        BootKind::Fallback
    } else {
        BootKind::Normal
    };
    let mut run = BootRun::start_at(ctx.boot_id, booted, version.clone(), kind, host.clock.now());
    run.booted_at = ctx.booted_at;
    let boot = ctx.boot.as_mut();
    let good = boot
        .status()?
        .slots
        .iter()
        .any(|s| s.slot == booted && s.successful && !counted_down(host, s));
    let reason = match &version {
        Some(v) if state.is_denied(v) => {
            tracing::warn!(%booted, version = v, "booted slot runs a denylisted version; not confirming it");
            format!("not confirmed: slot {booted} runs {v}, which this host rolled back from")
        }
        _ if good => format!("slot {booted} is already marked good"),
        _ => {
            boot.commit(booted)?;
            format!("slot {booted} confirmed (marked good, boot attempts reset)")
        }
    };
    tracing::info!(%booted, "{reason}");
    run.outcome = RunOutcome::Confirmed;
    run.reason = Some(reason);
    if let Some((committed, committed_version)) = fell_back_from {
        let why = format!(
            "committed slot {committed} ({committed_version}) fell back to slot {booted}: it booted without reaching its health check and the loader gave up on it; {committed_version} is not denylisted and is installed again through a trial boot"
        );
        tracing::error!(%committed, %booted, version = committed_version, "{why}");
        host.state.transition(Transition::RolledBack {
            from: committed,
            reason: why.clone(),
            deny: false,
            error_kind: None,
        })?;
        run.outcome = RunOutcome::FallbackDetected;
        run.rolled_back_to = Some(booted);
        run.reason = Some(why);
    }
    run.finished_at = Some(host.clock.now());
    ctx.save(&run)?;
    Ok(HealthReport::from_run(&run, false))
}

/// `update-agent commit`: after `boot-complete.target`, commit the trial whose checks passed
/// on this boot (`health-check --no-commit`). A boot already judged otherwise (normal boot
/// confirmed, fallback recorded, already committed) is left alone and reported; a boot whose
/// check did not pass, or never ran, is refused with `health_not_passed` and nothing changes.
pub fn commit_passed(host: &Host, opts: &HealthOptions) -> Result<HealthReport, AgentError> {
    let boot_id = crate::state::read_boot_id(&opts.boot_id_path)?;
    let _lock = InstallLock::acquire(host.state.dir())?;
    let mut journal = Journal::load_or_set_aside(host.state.dir(), host.clock.as_ref())?;
    let refuse = |why: String| {
        AgentError::Health(crate::health::HealthError::NotPassed {
            boot_id: boot_id.clone(),
            why,
        })
    };
    let Some(run) = journal.for_boot(&boot_id).cloned() else {
        return Err(refuse(
            "the health check has not run on this boot (is update-agent-health.service enabled?)"
                .into(),
        ));
    };
    match run.outcome {
        RunOutcome::Passed => {}
        RunOutcome::Committed | RunOutcome::Confirmed | RunOutcome::FallbackDetected => {
            return Ok(HealthReport::from_run(&run, true));
        }
        other => {
            return Err(refuse(format!(
                "the health check's verdict is {other:?}, not passed"
            )))
        }
    }
    let mut run = run;
    let reason = run
        .reason
        .clone()
        .unwrap_or_else(|| "health checks passed on the trial boot".into());
    let reason = format!("{reason}; committed after boot-complete.target");
    if let Err(e) =
        crate::ops::commit::commit_slot(host, host.boot_control()?.as_mut(), run.booted, &reason)
    {
        run.outcome = RunOutcome::Error;
        run.reason = Some(format!(
            "checks passed but committing slot {} failed: {e}",
            run.booted
        ));
        journal.upsert(run);
        journal.save(host.state.dir())?;
        return Err(e);
    }
    run.outcome = RunOutcome::Committed;
    run.reason = Some(reason);
    run.finished_at = Some(host.clock.now());
    journal.upsert(run.clone());
    journal.save(host.state.dir())?;
    Ok(HealthReport::from_run(&run, false))
}
