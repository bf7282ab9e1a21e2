//! `update-agent drill arm|disarm|report`: the rollback drill. Arming makes the next trial
//! boot's health check fail on purpose, once; the report rebuilds the timeline from the state
//! history and the health journal (staged -> trial boot -> check failed -> flags flipped ->
//! old slot booted) with the time between steps and a verdict.

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::boot::SlotId;
use crate::error::AgentError;
use crate::health::drill;
use crate::health::journal::{BootKind, Journal, RunOutcome};
use crate::host::Host;
use crate::state::{HistoryEvent, Phase};

fn ts(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

#[derive(Debug, Clone, Serialize)]
pub struct ArmReport {
    #[serde(with = "time::serde::rfc3339")]
    pub armed_at: OffsetDateTime,
    /// The update already staged, whose trial boot the drill will fail.
    pub staged: Option<(SlotId, String)>,
}

impl ArmReport {
    pub fn render(&self) -> String {
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
    let marker = drill::arm(host.state.dir())?;
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
pub fn disarm(host: &Host) -> Result<bool, AgentError> {
    Ok(drill::disarm(host.state.dir())?)
}

/// One step of the drill's timeline.
#[derive(Debug, Clone, Serialize)]
pub struct DrillStep {
    pub step: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
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
    /// From the trial boot's health check start to the old slot's boot, in ms.
    pub rollback_ms: Option<i64>,
    /// A drill armed and not fired yet.
    #[serde(with = "time::serde::rfc3339::option")]
    pub armed_now: Option<OffsetDateTime>,
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

fn ms_between(a: OffsetDateTime, b: OffsetDateTime) -> i64 {
    i64::try_from((b - a).whole_milliseconds()).unwrap_or(i64::MAX)
}

/// The latest drill's timeline and verdict. Reads only.
pub fn report(host: &Host) -> Result<DrillReport, AgentError> {
    let dir = host.state.dir();
    let journal = Journal::load(dir)?;
    let state = host.state.load()?;
    let armed_now = drill::peek(dir)?.map(|m| m.armed_at);
    let Some(idx) = journal
        .runs
        .iter()
        .rposition(|r| r.kind == BootKind::Trial && r.drill_armed_at.is_some())
    else {
        return Ok(DrillReport {
            verdict: DrillVerdict::NotRun,
            summary: if armed_now.is_some() {
                "armed, waiting for an update's trial boot (stage one and reboot)".into()
            } else {
                "no drill has run on this host: `update-agent drill arm`, then stage an update and reboot".into()
            },
            steps: Vec::new(),
            rollback_ms: None,
            armed_now,
        });
    };
    let run = &journal.runs[idx];
    let version = run.version.clone().unwrap_or_default();
    let mut raw: Vec<(&'static str, OffsetDateTime, String)> = Vec::new();
    if let Some(t) = run.drill_armed_at {
        raw.push((
            "armed",
            t,
            "drill armed (marker in the state directory)".into(),
        ));
    }
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
        run.started_at,
        format!(
            "slot {} booted for its trial (boot {}); health check started",
            run.booted, run.boot_id
        ),
    ));
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
        raw.push((
            "booted old slot",
            n.started_at,
            format!(
                "next boot ({}) came up on slot {} ({})",
                n.boot_id,
                n.booted,
                n.version.as_deref().unwrap_or("unknown version")
            ),
        ));
    }
    raw.sort_by_key(|(_, at, _)| *at);
    let mut steps = Vec::new();
    let mut prev: Option<OffsetDateTime> = None;
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
            Some(ms_between(run.started_at, n.started_at)),
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
    Ok(DrillReport {
        verdict,
        summary,
        steps,
        rollback_ms,
        armed_now,
    })
}
