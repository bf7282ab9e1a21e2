//! `update-agent daemon`: the unattended loop.
//!
//! Each cycle: give back a FleetLock slot if the boot it was taken for committed (Zincati's
//! rule: release only after a healthy boot; a host whose trial failed keeps its slot, which
//! halts its group's rollout) -> if a slot is staged, go to the reboot decision -> else
//! check the manifest (verify, policy, wave) -> when this host's wave is open, install the
//! manifest that check verified (fetched once per cycle) through the same pipeline as `apply`
//! (same install lock, so never two installs at once) -> reboot as the
//! strategy allows (immediately, inside a maintenance window, holding a FleetLock slot, or
//! both: inside a window AND holding a slot).
//! Between cycles it sleeps the poll interval plus random jitter, or backs off exponentially
//! after a failure. It reports through sd_notify (READY, STATUS, WATCHDOG), a Prometheus
//! text file, and optionally a report endpoint.
//!
//! SIGTERM (or SIGINT) stops it in any phase: the cycle is dropped at its next await point and
//! the process exits; an interrupted install resumes from its checkpoints on the next start,
//! and the boot flags are crash-atomic whatever instant the process dies at.

pub mod notify;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn, Instrument};

use crate::config::{Config, RebootStrategy};
use crate::error::AgentError;
use crate::fleet::lock::{FleetLockClient, HeldSlot};
use crate::fleet::metrics::{self, Counters, Live};
use crate::fleet::report::{self, Report};
use crate::fleet::window::{self, Window, WindowState};
use crate::fleet::FleetError;
use crate::host::Host;
use crate::install::ProgressEvent;
use crate::ops::apply::{apply_fetched, ApplyOptions};
use crate::state::Phase;
use notify::Notifier;

/// How long to wait for a requested reboot to stop us before asking again.
const REBOOT_PATIENCE: Duration = Duration::from_secs(10 * 60);
/// Timeout of one FleetLock or report request.
const FLEET_HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Crash tests only: where to hold (see [`crate::ops::testhold`]).
pub use crate::ops::testhold::TEST_HOLD_ENV;

/// How the daemon runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct DaemonOptions {
    /// One cycle (poll, install, reboot decision), then exit.
    pub once: bool,
}

/// A daemon cycle's failure.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

impl DaemonError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            DaemonError::Agent(e) => e.kind(),
            DaemonError::Fleet(e) => e.kind(),
            DaemonError::State(e) => e.kind(),
        }
    }
}

/// What one cycle ended with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CycleOutcome {
    /// Nothing to install: up to date, or policy refuses the offered release.
    UpToDate { reason: String },
    /// A release is offered but this host's wave opens at `at` (Unix seconds; RFC 3339 in
    /// JSON, like every time the agent prints).
    WaitingForWave {
        version: String,
        #[serde(serialize_with = "crate::jsonout::unix_time")]
        at: i64,
    },
    /// Staged; the next maintenance window opens at `at`.
    WaitingForWindow {
        version: String,
        #[serde(serialize_with = "crate::jsonout::unix_time")]
        at: i64,
    },
    /// Staged; the FleetLock server has no free reboot slot.
    WaitingForSlot { version: String, reason: String },
    /// Holding a FleetLock slot after a boot that did not commit: the group's rollout is
    /// halted until an operator looks at this host.
    Halted { phase: String, version: String },
    /// The booted slot is on its trial boot and the health check has not judged it yet:
    /// nothing is installed (the other slot is the rollback target).
    TrialPending { version: String },
    /// The reboot command ran.
    Rebooting { version: String },
}

impl CycleOutcome {
    /// One human line, for STATUS= and logs.
    pub fn render(&self) -> String {
        let at = crate::clock::rfc3339_or_number;
        match self {
            CycleOutcome::UpToDate { reason } => format!("up to date ({reason})"),
            CycleOutcome::WaitingForWave { version, at: t } => {
                format!("{version} offered; this host's wave opens at {}", at(*t))
            }
            CycleOutcome::WaitingForWindow { version, at: t } => {
                format!(
                    "{version} staged; reboot in the maintenance window at {}",
                    at(*t)
                )
            }
            CycleOutcome::WaitingForSlot { version, reason } => {
                format!("{version} staged; waiting for a FleetLock reboot slot ({reason})")
            }
            CycleOutcome::Halted { phase, version } => format!(
                "holding the FleetLock slot taken for {version}: the boot did not commit \
                 (phase {phase}); rollout halted for this group until an operator releases it"
            ),
            CycleOutcome::TrialPending { version } => format!(
                "{version} is on its trial boot; waiting for the health check before anything else"
            ),
            CycleOutcome::Rebooting { version } => format!("rebooting into {version}"),
        }
    }
}

/// Run the daemon on its own runtime until SIGTERM/SIGINT (or after one cycle with `once`).
pub(crate) fn run(config: Config, opts: DaemonOptions) -> Result<ExitCode, AgentError> {
    let rt = crate::host::runtime()?;
    let result = rt.block_on(run_async(config, opts));
    // A blocking step of an interrupted install gets a moment to finish; the process exits
    // after that whatever it is doing (every on-disk step is crash-safe).
    rt.shutdown_timeout(Duration::from_secs(5));
    result
}

/// How long a stop may take before the process exits regardless (systemd's default
/// TimeoutStopSec is 90 s; every on-disk step is crash-safe, so exiting is always safe).
const STOP_GRACE: Duration = Duration::from_secs(20);

/// The daemon on the current (multi-thread) runtime.
pub(crate) async fn run_async(config: Config, opts: DaemonOptions) -> Result<ExitCode, AgentError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| AgentError::Io { what, source }
    };
    let mut term = signal(SignalKind::terminate()).map_err(io("installing the SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("installing the SIGINT handler"))?;
    let notifier = Arc::new(Notifier::from_env());
    let mut daemon = Daemon::new(Host::open(config)?, notifier.clone())?;
    notifier.ready("started");
    info!(once = opts.once, "daemon started");
    let watchdog = notifier.watchdog_interval().map(|every| {
        let n = notifier.clone();
        tokio::spawn(async move {
            loop {
                n.watchdog();
                tokio::time::sleep(every).await;
            }
        })
    });
    // Signals are watched on a worker thread, so a stop is seen even while a cycle runs a
    // blocking step on this one.
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopper = {
        let stop = stop.clone();
        let notifier = notifier.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            info!(signal = name, "stopping");
            notifier.stopping(&format!("stopping ({name})"));
            crate::ops::testhold::request_stop();
            stop.notify_one();
            tokio::time::sleep(STOP_GRACE).await;
            warn!("the current step did not stop within {STOP_GRACE:?}; exiting anyway");
            std::process::exit(0);
        })
    };
    // The cycle (apply's future is not Send) runs here; a stop drops it at its next await.
    let code = tokio::select! {
        code = daemon.run_loop(opts.once) => code,
        () = stop.notified() => ExitCode::SUCCESS,
    };
    stopper.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    Ok(code)
}

/// The daemon's state between cycles.
#[derive(Debug)]
pub struct Daemon {
    host: Host,
    notifier: Arc<Notifier>,
    windows: Vec<Window>,
    node_id: Option<String>,
    counters: Counters,
    live: Live,
    http: reqwest::Client,
    /// Cycles run so far (for the log span).
    cycles: u64,
    /// [`TEST_HOLD_ENV`]: progress phase and minimum percentage.
    hold_at: Option<(String, u64)>,
}

impl Daemon {
    /// Check what the strategy needs (windows parse, a node id for FleetLock or reports).
    pub fn new(host: Host, notifier: Arc<Notifier>) -> Result<Daemon, AgentError> {
        let fleet = AgentError::Fleet;
        let windows = Window::all(&host.config.reboot.windows).map_err(fleet)?;
        let needs_id = host.config.reboot.strategy.has(RebootStrategy::FleetLock)
            || host.config.daemon.report_url.is_some();
        let node_id = if needs_id {
            Some(crate::fleet::node_id(&host.config).map_err(fleet)?)
        } else {
            crate::fleet::node_id(&host.config).ok()
        };
        let http = crate::fetch::http_client(&crate::fetch::HttpOptions {
            timeout: Some(FLEET_HTTP_TIMEOUT),
            ca_file: host.config.server.ca_file.clone(),
            ..Default::default()
        })?;
        let counters = Counters::load(host.state.dir());
        let live = Live {
            wave_seed: crate::fleet::wave_seed(&host.config).ok().map(|s| s.get()),
            ..Live::default()
        };
        Ok(Daemon {
            host,
            notifier,
            windows,
            node_id,
            counters,
            live,
            http,
            cycles: 0,
            hold_at: std::env::var(TEST_HOLD_ENV)
                .ok()
                .map(|v| match v.split_once(':') {
                    Some((phase, pct)) => (phase.to_string(), pct.parse().unwrap_or(0)),
                    None => (v, 0),
                }),
        })
    }

    /// Cycles until stopped; with `once`, one cycle (exit status 1 if it failed).
    pub(crate) async fn run_loop(&mut self, once: bool) -> ExitCode {
        let mut failures: u32 = 0;
        loop {
            let result = self.step().await;
            let wait = match &result {
                Ok(outcome) => {
                    failures = 0;
                    info!(outcome = %outcome.render(), "cycle done");
                    self.notifier.status(&outcome.render());
                    if once {
                        println!("{}", crate::jsonout::versioned(outcome));
                        return ExitCode::SUCCESS;
                    }
                    if let CycleOutcome::Rebooting { .. } = outcome {
                        // The service manager stops us as the system goes down. If nothing
                        // happens for long (a reboot inhibited or cancelled), the next cycle
                        // finds the slot still staged and asks again.
                        let wait = REBOOT_PATIENCE.max(self.poll_wait());
                        tokio::time::sleep(wait).await;
                        warn!(?wait, "the reboot did not happen; trying again");
                        continue;
                    }
                    self.wait_after(outcome)
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = self.backoff(failures);
                    warn!(kind = e.kind(), error = %e, retry_in = ?wait, "cycle failed");
                    self.notifier.status(&format!(
                        "failed [{}]: {e}; retrying in {}s",
                        e.kind(),
                        wait.as_secs()
                    ));
                    if once {
                        // The same failure line as every other command's --json.
                        println!("{}", crate::jsonout::error_line(e.kind(), &e.to_string()));
                        return ExitCode::from(1);
                    }
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn poll_wait(&self) -> Duration {
        let d = &self.host.config.daemon;
        d.poll_interval.get() + jitter(d.jitter.get())
    }

    /// Sleep after a successful cycle: the poll interval, or less when a wave or window
    /// opens sooner.
    fn wait_after(&self, outcome: &CycleOutcome) -> Duration {
        let poll = self.poll_wait();
        match outcome {
            CycleOutcome::WaitingForWave { at, .. } | CycleOutcome::WaitingForWindow { at, .. } => {
                let now = self.host.clock.unix();
                let secs = u64::try_from(at.saturating_sub(now)).unwrap_or(0);
                poll.min(Duration::from_secs(secs))
            }
            _ => poll,
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let d = &self.host.config.daemon;
        backoff_delay(d.poll_interval.get(), d.max_backoff.get(), failures)
    }

    /// One cycle, then the metrics file and the status report.
    pub async fn step(&mut self) -> Result<CycleOutcome, DaemonError> {
        self.cycles += 1;
        let span = tracing::info_span!("cycle", n = self.cycles, node = ?self.node_id);
        async {
            let result = self.cycle().await;
            self.after_cycle(&result).await;
            result
        }
        .instrument(span)
        .await
    }

    /// One cycle: release, reboot decision, check, install (see the module docs).
    pub(crate) async fn cycle(&mut self) -> Result<CycleOutcome, DaemonError> {
        let state = self.host.state.load()?;
        self.live.running_version = self.running_version(&state);
        if let Some(held) = HeldSlot::load(self.host.state.dir())? {
            self.live.fleetlock_held = true;
            match &state.phase {
                Phase::Committed { .. } | Phase::Idle => self.release(&held).await?,
                // Not judged yet (staged: the reboot is still to come; trial: the health
                // check has not run): keep the slot, decide below.
                Phase::Staged { .. } | Phase::Trial { .. } => {}
                other => {
                    return Ok(CycleOutcome::Halted {
                        phase: other.name().to_string(),
                        version: held.version,
                    })
                }
            }
        } else {
            self.live.fleetlock_held = false;
        }
        match &state.phase {
            Phase::Staged { version, .. } => return self.reboot_step(version).await,
            Phase::Trial { version, .. } => {
                return Ok(CycleOutcome::TrialPending {
                    version: version.clone(),
                })
            }
            _ => {}
        }

        let now = self.host.clock.unix();
        self.counters.checks_total += 1;
        self.counters.last_check_unix = Some(now);
        self.notifier.status("checking for updates");
        let (check, fetched) =
            match crate::ops::check::check_fetched(&self.host, None, false, false).await {
                Ok(c) => c,
                Err(e) => {
                    self.counters.check_failures_total += 1;
                    return Err(e.into());
                }
            };
        self.counters.last_success_unix = Some(now);
        self.live.wave_seed = check.wave_seed.or(self.live.wave_seed);
        self.live.eligible_from = check.eligible_from;
        if let Some((_kind, why)) = check.refused {
            return Ok(CycleOutcome::UpToDate { reason: why });
        }
        if !check.eligible_now {
            return Ok(CycleOutcome::WaitingForWave {
                version: check.version,
                at: check.eligible_from.unwrap_or(now),
            });
        }

        info!(version = %check.version, "installing");
        self.notifier
            .status(&format!("installing {}", check.version));
        let started = Instant::now();
        let notifier = self.notifier.clone();
        let hold_at = self.hold_at.clone();
        let version = check.version.clone();
        let mut last_pct = None;
        // What `update-agent status` shows of this install from another process.
        let mut live = crate::progress::live::LiveWriter::new(
            self.host.state.dir(),
            None,
            self.host.clock.clone(),
        );
        let mut progress = move |ev: ProgressEvent| {
            live.event(&ev);
            let phase = format!("{:?}", ev.phase).to_lowercase();
            let pct = ev
                .done
                .saturating_mul(100)
                .checked_div(ev.total)
                .unwrap_or(0);
            if last_pct != Some((phase.clone(), pct / 10)) {
                notifier.status(&format!("installing {version}: {} {phase} {pct}%", ev.role));
                last_pct = Some((phase.clone(), pct / 10));
            }
            if let Some((hold_phase, min_pct)) = &hold_at {
                if *hold_phase == phase && pct >= *min_pct {
                    crate::ops::testhold::hold(&phase, &|line| notifier.status(line));
                }
            }
        };
        let report = apply_fetched(
            &self.host,
            &ApplyOptions::default(),
            &fetched,
            &mut progress,
        )
        .await?;
        self.counters.installs_total += 1;
        self.counters.downloaded_bytes_total += report.bytes_fetched;
        for d in &report.delta {
            self.counters.delta_reused_bytes_total += d.stats.bytes_reused;
            self.counters.delta_requests_total += d.stats.requests;
            self.counters.delta_fallbacks_total += u64::from(d.stats.fallback.is_some());
        }
        self.counters.last_install_seconds = Some(started.elapsed().as_secs_f64());
        info!(summary = %report.render(), "installed");
        self.reboot_step(&report.version).await
    }

    /// Staged: reboot if every condition of the strategy allows it now, checked in order
    /// (window, then FleetLock: a slot is taken only inside a window).
    async fn reboot_step(&mut self, version: &str) -> Result<CycleOutcome, DaemonError> {
        let strategy = self.host.config.reboot.strategy.clone();
        if strategy.has(RebootStrategy::Window) {
            if let Some(WindowState::Closed { opens }) =
                window::state_at(&self.windows, self.host.clock.now())
            {
                if strategy.has(RebootStrategy::FleetLock) {
                    // A slot taken inside an earlier window whose reboot did not happen:
                    // waiting for the next window must not keep the rest of the group out.
                    if let Some(held) = HeldSlot::load(self.host.state.dir())? {
                        info!(group = %held.group, "window closed before the reboot: giving the FleetLock slot back");
                        self.release(&held).await?;
                    }
                }
                return Ok(CycleOutcome::WaitingForWindow {
                    version: version.to_string(),
                    at: opens.as_second(),
                });
            }
        }
        if strategy.has(RebootStrategy::FleetLock) {
            let reboot = &self.host.config.reboot;
            let Some(cfg) = &reboot.fleet_lock else {
                return Err(AgentError::NotConfigured {
                    key: "reboot.fleet_lock",
                    hint: "strategy \"fleet_lock\" needs a [reboot.fleet_lock] table".into(),
                }
                .into());
            };
            let id = self.node_id.clone().unwrap_or_default();
            let client = FleetLockClient::with_ca(
                &cfg.url,
                &id,
                &cfg.group,
                FLEET_HTTP_TIMEOUT,
                self.host.config.server.ca_file.as_deref(),
            )?;
            match client.pre_reboot().await {
                Ok(()) => {
                    HeldSlot {
                        url: cfg.url.clone(),
                        id,
                        group: cfg.group.clone(),
                        version: version.to_string(),
                        taken_at: self.host.clock.now(),
                    }
                    .save(self.host.state.dir())?;
                    self.live.fleetlock_held = true;
                }
                Err(FleetError::LockRefused {
                    status,
                    kind,
                    value,
                    ..
                }) => {
                    return Ok(CycleOutcome::WaitingForSlot {
                        version: version.to_string(),
                        reason: format!("HTTP {status} [{kind}] {value}"),
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
        info!(version, "rebooting");
        self.notifier.status(&format!("rebooting into {version}"));
        crate::ops::reboot::reboot(&self.host)?;
        Ok(CycleOutcome::Rebooting {
            version: version.to_string(),
        })
    }

    /// Give back the slot named by the marker (its own URL, id and group: exactly what was
    /// taken, even if the configuration changed since).
    async fn release(&mut self, held: &HeldSlot) -> Result<(), DaemonError> {
        let client = FleetLockClient::with_ca(
            &held.url,
            &held.id,
            &held.group,
            FLEET_HTTP_TIMEOUT,
            self.host.config.server.ca_file.as_deref(),
        )?;
        client.steady_state().await?;
        HeldSlot::clear(self.host.state.dir())?;
        self.live.fleetlock_held = false;
        info!(group = %held.group, version = %held.version, "FleetLock slot released after a committed boot");
        Ok(())
    }

    fn running_version(&self, state: &crate::state::State) -> Option<String> {
        let booted = self
            .host
            .slots()
            .and_then(|slots| self.host.booted_slot(&slots))
            .ok()
            .map(|b| b.slot);
        match self.host.running_version(state, booted) {
            Ok(v) => v.map(|v| v.to_string()),
            Err(e) => {
                warn!(kind = e.kind(), error = %e, "running version unknown");
                None
            }
        }
    }

    /// Metrics file and status report, best effort: neither may stop updates.
    async fn after_cycle(&mut self, result: &Result<CycleOutcome, DaemonError>) {
        if let Err(e) = result {
            *self
                .counters
                .failures_by_kind
                .entry(e.kind().to_string())
                .or_insert(0) += 1;
        }
        let dir = self.host.state.dir().to_path_buf();
        let state = self.host.state.load();
        if let Ok(state) = &state {
            self.counters.count_rollbacks(state);
        }
        if let Err(e) = self.counters.save(&dir) {
            warn!(error = %e, "could not save the metrics counters");
        }
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "could not read the state for metrics");
                return;
            }
        };
        if let Some(path) = &self.host.config.daemon.metrics_path {
            let text = metrics::render(&self.counters, &state, &self.live);
            if let Err(e) = metrics::write(path, &text) {
                warn!(error = %e, "could not write metrics");
            }
        }
        if let (Some(url), Some(id)) = (&self.host.config.daemon.report_url, &self.node_id) {
            let last_error = match (result, &state.phase) {
                (Err(e), _) => Some(format!("[{}] {e}", e.kind())),
                (_, Phase::Failed { kind, message }) => Some(format!("[{kind}] {message}")),
                (_, Phase::RolledBack { reason, .. }) => Some(format!("rolled back: {reason}")),
                _ => None,
            };
            let r = Report {
                id: id.clone(),
                version: self.live.running_version.clone(),
                phase: state.phase.name().to_string(),
                last_error,
                wave_seed: self.live.wave_seed,
            };
            if let Err(e) = report::send(&self.http, url, &r, FLEET_HTTP_TIMEOUT).await {
                warn!(error = %e, "status report not delivered");
            }
        }
    }
}

/// Exponential backoff after `failures` consecutive failures: from the poll interval (at most
/// 1 min as a base), doubling, capped at `max`; the result is uniformly random in the upper
/// half of that, so a fleet that failed together does not retry together.
pub(crate) fn backoff_delay(poll: Duration, max: Duration, failures: u32) -> Duration {
    let base = poll.min(Duration::from_secs(60));
    let exp = base.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(max);
    capped / 2 + jitter(capped / 2)
}

/// A uniformly random duration in `[0, max]`.
fn jitter(max: Duration) -> Duration {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if max.is_zero() || ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return Duration::ZERO;
    }
    let frac = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
    max.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let s = Duration::from_secs;
        for (failures, lo, hi) in [(1, 30, 60), (2, 60, 120), (3, 120, 240), (10, 1800, 3600)] {
            let d = backoff_delay(s(1800), s(3600), failures);
            assert!(d >= s(lo) && d <= s(hi), "{failures}: {d:?}");
        }
        // Short poll intervals back off from themselves; huge failure counts do not overflow.
        let d = backoff_delay(Duration::from_millis(200), s(10), 1);
        assert!(d <= Duration::from_millis(200));
        assert!(backoff_delay(s(60), s(21600), u32::MAX) <= s(21600));
        // Jitter spreads retries.
        let samples: std::collections::BTreeSet<_> =
            (0..20).map(|_| backoff_delay(s(60), s(3600), 3)).collect();
        assert!(samples.len() > 1);
    }
}
