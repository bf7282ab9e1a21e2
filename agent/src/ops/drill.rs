//! `update-agent drill arm|disarm|report`: the rollback drill. Arming makes the next trial
//! boot's health check fail on purpose, once; the report rebuilds the timeline from the state
//! history and the health journal (staged -> trial boot -> check failed -> flags flipped ->
//! old slot booted) with the time between steps and a verdict. Boots are placed at the time
//! their kernel started (`btime`, recorded by each boot's health check), not when the check
//! began: on a slow machine the two are a minute apart.

use crate::clock::Timestamp;
use serde::Serialize;

use crate::boot::SlotId;
use crate::error::AgentError;
use crate::health::drill;
use crate::health::journal::{BootKind, BootRun, Journal, RunOutcome};
use crate::host::Host;
use crate::state::{HistoryEvent, Phase, State};

fn ts(t: Timestamp) -> String {
    t.to_string()
}

#[derive(Debug, Clone, Serialize)]
pub struct ArmReport {
    pub armed_at: Timestamp,
    /// The update already staged, whose trial boot the drill will fail.
    #[serde(serialize_with = "crate::jsonout::slot_version")]
    pub staged: Option<(SlotId, String)>,
}

impl ArmReport {
    pub(crate) fn render(&self) -> String {
        let next = match &self.staged {
            Some((slot, v)) => format!(
                "{v} is staged in slot {slot}: reboot, and its trial boot will fail its health check on purpose"
            ),
            None => "stage an update (`update-agent apply`) and reboot: its trial boot will fail its health check on purpose".into(),
        };
        format!(
            "rollback drill armed at {} (fires once); {next}. Afterwards: `update-agent drill report`",
            ts(self.armed_at)
        )
    }
}

/// Arm the drill (again, if it already was).
pub fn arm(host: &Host) -> Result<ArmReport, AgentError> {
    let marker = drill::arm(host.state.dir(), host.clock.now())?;
    let staged = match host.state.load()?.phase {
        Phase::Staged { slot, version } => Some((slot, version)),
        _ => None,
    };
    tracing::info!(armed_at = %ts(marker.armed_at), "rollback drill armed");
    Ok(ArmReport {
        armed_at: marker.armed_at,
        staged,
    })
}

/// Disarm; `true` if it was armed.
pub(crate) fn disarm(host: &Host) -> Result<bool, AgentError> {
    Ok(drill::disarm(host.state.dir())?)
}

/// The steps of the timeline of a drill that ran, in order (`check started` and `old slot
/// running` only when the boots' kernel times were recorded).
pub const STEPS: [&str; 8] = [
    "armed",
    "staged",
    "rebooted",
    "check started",
    "check failed",
    "flag flipped",
    "booted old slot",
    "old slot running",
];

/// One step of the drill's timeline.
#[derive(Debug, Clone, Serialize)]
pub struct DrillStep {
    pub step: &'static str,
    pub at: Timestamp,
    /// Milliseconds since the step before.
    pub since_previous_ms: Option<i64>,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillVerdict {
    /// The old slot booted after the failed trial: the rollback path works.
    Pass,
    Fail,
    /// The drill fired, the old slot has not booted yet (reboot pending).
    InProgress,
    /// No drill has fired yet.
    NotRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub verdict: DrillVerdict,
    pub summary: String,
    pub steps: Vec<DrillStep>,
    /// From the trial boot's kernel start to the old slot running again (its health check
    /// started), in ms.
    pub rollback_ms: Option<i64>,
    /// A drill armed and not fired yet.
    pub armed_now: Option<Timestamp>,
}

impl DrillReport {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.steps {
            out += &format!(
                "{}  {:<16} {:>10}  {}\n",
                ts(s.at),
                s.step,
                s.since_previous_ms
                    .map(|ms| format!("+{:.3}s", ms as f64 / 1000.0))
                    .unwrap_or_default(),
                s.detail
            );
        }
        if let Some(ms) = self.rollback_ms {
            out += &format!(
                "trial boot to old slot running again: {:.3}s\n",
                ms as f64 / 1000.0
            );
        }
        if let Some(t) = self.armed_now {
            out += &format!(
                "a drill is armed (since {}) and waits for the next trial boot\n",
                ts(t)
            );
        }
        let verdict = match self.verdict {
            DrillVerdict::Pass => "PASS",
            DrillVerdict::Fail => "FAIL",
            DrillVerdict::InProgress => "IN PROGRESS",
            DrillVerdict::NotRun => "NOT RUN",
        };
        out += &format!("drill verdict: {verdict}: {}", self.summary);
        out
    }
}

fn ms_between(a: Timestamp, b: Timestamp) -> i64 {
    i64::try_from(b.duration_since(a).as_millis()).unwrap_or(i64::MAX)
}

/// The latest drill's timeline and verdict. Reads only.
pub fn report(host: &Host) -> Result<DrillReport, AgentError> {
    let dir = host.state.dir();
    let journal = Journal::load(dir)?;
    let state = host.state.load()?;
    let armed_now = drill::peek(dir)?.map(|m| m.armed_at);
    Ok(timeline(&journal, &state, armed_now))
}

/// Where a boot goes on the timeline: its kernel's start when recorded, else (records of older
/// agents) its health check's start, said so in the detail.
fn boot_at(run: &BootRun) -> (Timestamp, &'static str) {
    match run.booted_at {
        Some(t) => (t, "kernel started"),
        None => (
            run.started_at,
            "its health check started; the kernel's boot time was not recorded",
        ),
    }
}

/// [`report`] from what it read: the journal, the state record and an armed marker.
fn timeline(journal: &Journal, state: &State, armed_now: Option<Timestamp>) -> DrillReport {
    let Some(idx) = journal
        .runs
        .iter()
        .rposition(|r| r.kind == BootKind::Trial && r.drill_armed_at.is_some())
    else {
        return DrillReport {
            verdict: DrillVerdict::NotRun,
            summary: if armed_now.is_some() {
                "armed, waiting for an update's trial boot (stage one and reboot)".into()
            } else {
                "no drill has run on this host: `update-agent drill arm`, then stage an update and reboot".into()
            },
            steps: Vec::new(),
            rollback_ms: None,
            armed_now,
        };
    };
    let run = &journal.runs[idx];
    let version = run.version.clone().unwrap_or_default();
    let mut raw: Vec<(&'static str, Timestamp, String)> = Vec::new();
    if let Some(t) = run.drill_armed_at {
        raw.push((
            "armed",
            t,
            "drill armed (marker in the state directory)".into(),
        ));
    }
    // Staged before this boot began (its kernel, or at the latest its check).
    let (trial_at, trial_how) = boot_at(run);
    if let Some(e) = state.history.iter().rev().find(|e| {
        e.event == HistoryEvent::Staged
            && e.slot == Some(run.booted)
            && e.version.as_deref() == run.version.as_deref()
            && e.at <= run.started_at
    }) {
        raw.push((
            "staged",
            e.at,
            format!("{version} staged in slot {} for one trial boot", run.booted),
        ));
    }
    raw.push((
        "rebooted",
        trial_at,
        format!(
            "slot {} booted for its trial (boot {}): {trial_how}",
            run.booted, run.boot_id
        ),
    ));
    if run.booted_at.is_some() {
        raw.push((
            "check started",
            run.started_at,
            format!(
                "health check of the trial boot started on slot {}",
                run.booted
            ),
        ));
    }
    if let Some(t) = run.checks_done_at {
        let what = run
            .checks
            .iter()
            .find(|c| c.required && !c.passed)
            .map(|c| c.describe())
            .unwrap_or_else(|| "no required check failed".into());
        raw.push(("check failed", t, what));
    }
    if let (Some(t), Some(to)) = (run.rolled_back_at, run.rolled_back_to) {
        raw.push((
            "flag flipped",
            t,
            format!(
                "boot flags flipped: slot {to} boots next, slot {} is unbootable",
                run.booted
            ),
        ));
    }
    let next_boot = journal.runs[idx + 1..]
        .iter()
        .find(|r| r.boot_id != run.boot_id);
    if let Some(n) = next_boot {
        let (at, how) = boot_at(n);
        raw.push((
            "booted old slot",
            at,
            format!(
                "next boot ({}) came up on slot {} ({}): {how}",
                n.boot_id,
                n.booted,
                n.version.as_deref().unwrap_or("unknown version")
            ),
        ));
        if n.booted_at.is_some() {
            raw.push((
                "old slot running",
                n.started_at,
                format!("slot {} running again: its health check started", n.booted),
            ));
        }
    }
    // Stable: steps at the same instant (whole-second boot times) keep the order above.
    raw.sort_by_key(|(_, at, _)| *at);
    let mut steps = Vec::new();
    let mut prev: Option<Timestamp> = None;
    for (step, at, detail) in raw {
        steps.push(DrillStep {
            step,
            at,
            since_previous_ms: prev.map(|p| ms_between(p, at)),
            detail,
        });
        prev = Some(at);
    }
    let (verdict, summary, rollback_ms) = match (run.outcome, run.rolled_back_to, next_boot) {
        (RunOutcome::RolledBack, Some(to), Some(n)) if n.booted == to => (
            DrillVerdict::Pass,
            format!(
                "the failed trial of {version} in slot {} was rolled back and slot {to} booted again",
                run.booted
            ),
            Some(ms_between(trial_at, n.started_at)),
        ),
        (RunOutcome::RolledBack, Some(to), Some(n)) => (
            DrillVerdict::Fail,
            format!(
                "after rolling back to slot {to} the next boot came up on slot {} instead",
                n.booted
            ),
            None,
        ),
        (RunOutcome::RolledBack, Some(to), None) => (
            DrillVerdict::InProgress,
            format!("rolled back; waiting for the reboot into slot {to}"),
            None,
        ),
        (RunOutcome::InProgress, _, _) => (
            DrillVerdict::InProgress,
            "the trial boot's health check has not finished".into(),
            None,
        ),
        (outcome, _, _) => (
            DrillVerdict::Fail,
            format!(
                "the trial did not roll back (outcome {outcome:?}){}",
                run.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
            None,
        ),
    };
    DrillReport {
        verdict,
        summary,
        steps,
        rollback_ms,
        armed_now,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::state::HistoryEntry;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_796_200_000 + secs).unwrap()
    }

    /// A drill that ran: staged at -10 s, the trial kernel booted at 0, its check started at
    /// 40 s and rolled back at 41 s; the old slot's kernel booted at 60 s, its check at 100 s.
    /// `kernel_times`: whether the runs carry the kernels' boot times (newer agents).
    fn ran(kernel_times: bool) -> (Journal, State) {
        let mut trial = BootRun::start_at(
            "trial-boot",
            SlotId::B,
            Some("1.1.0".into()),
            BootKind::Trial,
            at(40),
        );
        trial.booted_at = kernel_times.then(|| at(0));
        trial.drill_armed_at = Some(at(-100));
        trial.checks_done_at = Some(at(41));
        trial.rolled_back_at = Some(at(41));
        trial.rolled_back_to = Some(SlotId::A);
        trial.outcome = RunOutcome::RolledBack;
        let mut next = BootRun::start_at(
            "next-boot",
            SlotId::A,
            Some("1.0.0".into()),
            BootKind::Normal,
            at(100),
        );
        next.booted_at = kernel_times.then(|| at(60));
        next.outcome = RunOutcome::Confirmed;
        let mut state = State::default();
        state.history.push(HistoryEntry {
            at: at(-10),
            event: HistoryEvent::Staged,
            version: Some("1.1.0".into()),
            slot: Some(SlotId::B),
            reason: None,
            error_kind: None,
            transfer: None,
            hook: None,
        });
        (
            Journal {
                runs: vec![trial, next],
            },
            state,
        )
    }

    fn names(r: &DrillReport) -> Vec<&'static str> {
        r.steps.iter().map(|s| s.step).collect()
    }

    fn step<'a>(r: &'a DrillReport, name: &str) -> &'a DrillStep {
        r.steps.iter().find(|s| s.step == name).unwrap()
    }

    #[test]
    fn boots_are_placed_at_their_kernels_start_not_at_their_health_check() {
        let (journal, state) = ran(true);
        let r = timeline(&journal, &state, None);
        assert_eq!(r.verdict, DrillVerdict::Pass);
        assert_eq!(names(&r), STEPS);
        assert_eq!(step(&r, "rebooted").at, at(0));
        assert!(step(&r, "rebooted").detail.contains("kernel started"));
        assert_eq!(step(&r, "rebooted").since_previous_ms, Some(10_000));
        assert_eq!(step(&r, "check started").at, at(40));
        assert_eq!(step(&r, "check started").since_previous_ms, Some(40_000));
        assert_eq!(step(&r, "booted old slot").at, at(60));
        assert_eq!(step(&r, "booted old slot").since_previous_ms, Some(19_000));
        assert_eq!(step(&r, "old slot running").at, at(100));
        // Trial kernel to the old slot running again.
        assert_eq!(r.rollback_ms, Some(100_000));
        assert!(r
            .render()
            .contains("trial boot to old slot running again: 100.000s"));
    }

    #[test]
    fn records_without_kernel_times_fall_back_to_the_checks_start_and_say_so() {
        let (journal, state) = ran(false);
        let r = timeline(&journal, &state, None);
        assert_eq!(r.verdict, DrillVerdict::Pass);
        // Without kernel times there is nothing between a boot and its check.
        let without: Vec<_> = STEPS
            .into_iter()
            .filter(|s| !["check started", "old slot running"].contains(s))
            .collect();
        assert_eq!(names(&r), without);
        assert_eq!(step(&r, "rebooted").at, at(40));
        assert!(step(&r, "rebooted").detail.contains("not recorded"));
        assert_eq!(step(&r, "booted old slot").at, at(100));
        assert_eq!(r.rollback_ms, Some(60_000));
    }

    #[test]
    fn a_journal_without_a_fired_drill_is_not_run() {
        let r = timeline(&Journal::default(), &State::default(), Some(at(0)));
        assert_eq!(r.verdict, DrillVerdict::NotRun);
        assert!(r.steps.is_empty());
        assert_eq!(r.armed_now, Some(at(0)));
    }
}
