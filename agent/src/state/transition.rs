//! The update flow's state machine, in one place: every phase change and every history entry
//! of the flow is a [`Transition`]. Each one checks the phase it starts from, sets the next
//! and appends its history entry; [`super::StateStore::transition`] does that on the record
//! in one atomic write, so a crash leaves the old record or the new one, never a phase
//! without its history entry.
//!
//! ```text
//!                 begin_download            staging_intent     staged
//!   (any phase) ----------------> Downloading ------> Downloading ------> Staged
//!                                                                          |  |
//!                                                          cancelled       |  | trial
//!                                                      Idle <--------------+  v
//!                                                                          Trial --committed--> Committed
//!   trial also from a settled phase when the flags show a trial the record lost track of
//!   rolled_back: Staged/Trial of the slot left, or any settled phase -> RolledBack
//!   failed: any phase -> Failed (a staged or trial phase stays when nothing changed)
//! ```
//!
//! **Architecture invariant: only this module sets `State::phase` or appends to
//! `State::history` for the update flow.** Checked by
//! `agent/tests/architecture.rs::only_transitions_change_the_phase`.

use crate::clock::Timestamp;

use super::{HistoryEntry, HistoryEvent, HookRecord, Phase, SlotRecord, State, Transfer};
use crate::slot::SlotId;

/// One step of the update flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transition {
    /// `apply`: the target slot's old content is about to be overwritten. Refused while the
    /// other slot (the booted one) is staged or on its trial: it is the only fallback.
    BeginDownload { version: String, target: SlotId },
    /// `apply`: written and read back; before the flag write the record names the release in
    /// the slot, so a crash after the flags leaves a trial judged under the right version.
    StagingIntent {
        slot: SlotId,
        version: String,
        image_sha256s: Vec<String>,
    },
    /// `apply`: the boot flags stage the slot (after its staging intent). `transfer`: what
    /// the install moved over the network, for the history entry.
    Staged {
        slot: SlotId,
        version: String,
        transfer: Option<Transfer>,
    },
    /// The health check on the staged slot's boot (again after a crash mid-check).
    Trial {
        slot: SlotId,
        version: String,
        boot_id: String,
    },
    /// The booted `slot` was marked good in the boot flags (health check or operator). While
    /// the other slot is staged or on trial, that phase stays: the next boot is still its
    /// trial (or the fallback from it) and must be judged.
    Committed { slot: SlotId, reason: String },
    /// The boot flags were flipped away from `from` (failed trial, fallback, operator); its
    /// version is denylisted when `deny`. `error_kind`: the flip itself failed and the record
    /// says what the loader did anyway.
    RolledBack {
        from: SlotId,
        reason: String,
        deny: bool,
        error_kind: Option<String>,
    },
    /// An operation failed. With `keep_pending` (it changed nothing on the host) a staged or
    /// trial phase stays, so that slot's next boot is still checked as a trial.
    Failed {
        version: Option<String>,
        slot: Option<SlotId>,
        kind: String,
        message: String,
        keep_pending: bool,
    },
    /// A hook ran (docs/hooks.md): a history entry, the phase stays. Allowed from any phase.
    HookRan {
        version: Option<String>,
        record: HookRecord,
    },
    /// `cancel`: the staged slot will not boot; the host is idle again.
    Cancelled {
        slot: SlotId,
        version: String,
        reason: String,
    },
}

/// A transition the record's phase does not allow; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the state record refuses {transition} from phase {from}: {why}")]
pub struct Refused {
    pub transition: &'static str,
    /// The phase's name (`staged`, `trial`, ...).
    pub from: &'static str,
    pub why: String,
}

/// What a transition found on its way (for the operation's report).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// The release the transition was about (the committed or rolled-back slot's).
    pub version: Option<String>,
    /// `RolledBack`: the release in the slot rolled back to.
    pub other_version: Option<String>,
    /// `RolledBack`: the version put on the denylist.
    pub denylisted: Option<String>,
}

/// The slot the phase says is staged or on trial.
fn pending_slot(phase: &Phase) -> Option<SlotId> {
    match phase {
        Phase::Staged { slot, .. } | Phase::Trial { slot, .. } => Some(*slot),
        _ => None,
    }
}

impl Transition {
    /// Its name (in refusals and logs).
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Transition::BeginDownload { .. } => "begin_download",
            Transition::StagingIntent { .. } => "staging_intent",
            Transition::Staged { .. } => "staged",
            Transition::Trial { .. } => "trial",
            Transition::Committed { .. } => "committed",
            Transition::RolledBack { .. } => "rolled_back",
            Transition::Failed { .. } => "failed",
            Transition::Cancelled { .. } => "cancelled",
            Transition::HookRan { .. } => "hook_ran",
        }
    }

    /// Whether `from` allows it; changes nothing.
    pub(crate) fn check(&self, from: &Phase) -> Result<(), Refused> {
        let refuse = |why: String| {
            Err(Refused {
                transition: self.name(),
                from: from.name(),
                why,
            })
        };
        match (self, from) {
            (Transition::BeginDownload { target, .. }, _) => match pending_slot(from) {
                Some(s) if s != *target => refuse(format!(
                    "slot {s} (the booted one) is staged or on its trial and slot {target} is \
                     its only fallback"
                )),
                _ => Ok(()),
            },
            (Transition::StagingIntent { version, .. }, Phase::Downloading { version: v, .. })
                if v == version =>
            {
                Ok(())
            }
            (Transition::StagingIntent { version, .. }, _) => {
                refuse(format!("no download of {version} is in progress"))
            }
            (Transition::Staged { version, .. }, Phase::Downloading { version: v, .. })
                if v == version =>
            {
                Ok(())
            }
            (Transition::Staged { version, .. }, _) => {
                refuse(format!("no download of {version} is in progress"))
            }
            // The staged slot's boot; or a boot the flags show as a trial the record lost
            // track of (a crash between the flag write and the staged record, an older
            // agent): the flags are the truth. Never over another slot's or release's stage.
            (Transition::Trial { slot, version, .. }, _) => match from {
                Phase::Staged {
                    slot: s,
                    version: v,
                }
                | Phase::Trial {
                    slot: s,
                    version: v,
                    ..
                } if s != slot || v != version => refuse(format!(
                    "{v} in slot {s} is pending, not {version} in slot {slot}"
                )),
                _ => Ok(()),
            },
            // Committing the booted slot is always possible (a pending stage of the other
            // slot stays); a failure or a rollback can be recorded from any phase, except a
            // rollback onto a slot staged but never booted.
            (Transition::Committed { .. }, _) | (Transition::Failed { .. }, _) => Ok(()),
            (Transition::RolledBack { from: f, .. }, Phase::Staged { slot, .. })
                if *slot == f.other() =>
            {
                refuse(format!(
                    "slot {slot} is staged and has never booted: cancel it instead"
                ))
            }
            (Transition::RolledBack { .. }, _) => Ok(()),
            (
                Transition::Cancelled { slot, version, .. },
                Phase::Staged {
                    slot: s,
                    version: v,
                },
            ) if s == slot && v == version => Ok(()),
            (Transition::HookRan { .. }, _) => Ok(()),
            (Transition::Cancelled { slot, version, .. }, _) => {
                refuse(format!("{version} is not staged in slot {slot}"))
            }
        }
    }

    /// Check `state`'s phase, then set the next one and append the history entry (stamped
    /// `at`). Refused: `state` is untouched.
    pub(crate) fn apply(self, state: &mut State, at: Timestamp) -> Result<Outcome, Refused> {
        self.check(&state.phase)?;
        let entry = |event: HistoryEvent| HistoryEntry {
            at,
            event,
            version: None,
            slot: None,
            reason: None,
            error_kind: None,
            transfer: None,
            hook: None,
        };
        let mut out = Outcome::default();
        match self {
            Transition::BeginDownload { version, target } => {
                state.phase = Phase::Downloading {
                    version: version.clone(),
                    bytes_done: 0,
                };
                // The slot's old content is about to be overwritten: it is no rollback target.
                state.slots.remove(&target);
                let mut e = entry(HistoryEvent::InstallStarted);
                e.version = Some(version.clone());
                e.slot = Some(target);
                state.record(e);
                out.version = Some(version);
            }
            Transition::StagingIntent {
                slot,
                version,
                image_sha256s,
            } => {
                state.slots.insert(
                    slot,
                    SlotRecord {
                        version: version.clone(),
                        image_sha256s,
                        verified: true,
                    },
                );
                out.version = Some(version);
            }
            Transition::Staged {
                slot,
                version,
                transfer,
            } => {
                state.phase = Phase::Staged {
                    slot,
                    version: version.clone(),
                };
                let mut e = entry(HistoryEvent::Staged);
                e.version = Some(version.clone());
                e.slot = Some(slot);
                e.transfer = transfer;
                state.record(e);
                out.version = Some(version);
            }
            Transition::Trial {
                slot,
                version,
                boot_id,
            } => {
                state.phase = Phase::Trial {
                    slot,
                    version: version.clone(),
                    boot_id,
                };
                out.version = Some(version);
            }
            Transition::Committed { slot, reason } => {
                let version = state.slots.get(&slot).map(|r| r.version.clone());
                if pending_slot(&state.phase).is_none_or(|s| s == slot) {
                    state.phase = Phase::Committed {
                        slot,
                        version: version.clone().unwrap_or_default(),
                    };
                }
                let mut e = entry(HistoryEvent::Committed);
                e.version = version.clone();
                e.slot = Some(slot);
                e.reason = Some(reason);
                state.record(e);
                out.version = version;
            }
            Transition::RolledBack {
                from,
                reason,
                deny,
                error_kind,
            } => {
                let of = |slot: SlotId| state.slots.get(&slot).map(|r| r.version.clone());
                let from_version = match &state.phase {
                    Phase::Staged { slot, version } | Phase::Trial { slot, version, .. }
                        if *slot == from =>
                    {
                        Some(version.clone())
                    }
                    _ => of(from),
                };
                out.other_version = of(from.other());
                if let (Some(v), true) = (&from_version, deny) {
                    state.deny_at(v, &reason, at);
                    out.denylisted = Some(v.clone());
                }
                state.phase = Phase::RolledBack {
                    reason: reason.clone(),
                    from_version: from_version.clone(),
                };
                let mut e = entry(HistoryEvent::RolledBack);
                e.version = from_version.clone();
                e.slot = Some(from);
                e.reason = Some(reason);
                e.error_kind = error_kind;
                state.record(e);
                out.version = from_version;
            }
            Transition::Failed {
                version,
                slot,
                kind,
                message,
                keep_pending,
            } => {
                if !(keep_pending && pending_slot(&state.phase).is_some()) {
                    state.phase = Phase::Failed {
                        kind: kind.clone(),
                        message: message.clone(),
                    };
                }
                let mut e = entry(HistoryEvent::Failed);
                e.version = version.clone();
                e.slot = slot;
                e.reason = Some(message);
                e.error_kind = Some(kind);
                state.record(e);
                out.version = version;
            }
            Transition::Cancelled {
                slot,
                version,
                reason,
            } => {
                state.phase = Phase::Idle;
                let mut e = entry(HistoryEvent::Cancelled);
                e.version = Some(version.clone());
                e.slot = Some(slot);
                e.reason = Some(reason);
                state.record(e);
                out.version = Some(version);
            }
            Transition::HookRan { version, record } => {
                let mut e = entry(HistoryEvent::Hook);
                e.version = version.clone();
                e.reason = Some(format!("{} hook: {}", record.name, record.status));
                if !record.passed {
                    e.error_kind = Some("hook_failed".into());
                }
                e.hook = Some(record);
                state.record(e);
                out.version = version;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::slot::SlotId::{A, B};

    fn at() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    /// One phase of each kind, naming slot B / version 2.0 where a phase names one.
    fn phases() -> Vec<Phase> {
        vec![
            Phase::Idle,
            Phase::Downloading {
                version: "2.0".into(),
                bytes_done: 0,
            },
            Phase::Staged {
                slot: B,
                version: "2.0".into(),
            },
            Phase::Trial {
                slot: B,
                version: "2.0".into(),
                boot_id: "boot-1".into(),
            },
            Phase::Committed {
                slot: A,
                version: "1.0".into(),
            },
            Phase::RolledBack {
                reason: "r".into(),
                from_version: Some("2.0".into()),
            },
            Phase::Failed {
                kind: "k".into(),
                message: "m".into(),
            },
            Phase::Unknown,
        ]
    }

    fn transitions() -> Vec<Transition> {
        vec![
            Transition::BeginDownload {
                version: "2.0".into(),
                target: B,
            },
            Transition::BeginDownload {
                version: "2.0".into(),
                target: A,
            },
            Transition::StagingIntent {
                slot: B,
                version: "2.0".into(),
                image_sha256s: vec!["ab".into()],
            },
            Transition::StagingIntent {
                slot: B,
                version: "3.0".into(),
                image_sha256s: vec![],
            },
            Transition::Staged {
                slot: B,
                version: "2.0".into(),
                transfer: None,
            },
            Transition::Staged {
                slot: B,
                version: "3.0".into(),
                transfer: None,
            },
            Transition::Trial {
                slot: B,
                version: "2.0".into(),
                boot_id: "boot-2".into(),
            },
            Transition::Trial {
                slot: A,
                version: "2.0".into(),
                boot_id: "boot-2".into(),
            },
            Transition::Committed {
                slot: B,
                reason: "healthy".into(),
            },
            Transition::Committed {
                slot: A,
                reason: "operator".into(),
            },
            Transition::RolledBack {
                from: B,
                reason: "failed".into(),
                deny: true,
                error_kind: None,
            },
            Transition::RolledBack {
                from: A,
                reason: "operator".into(),
                deny: false,
                error_kind: None,
            },
            Transition::Failed {
                version: Some("2.0".into()),
                slot: Some(B),
                kind: "connect".into(),
                message: "m".into(),
                keep_pending: true,
            },
            Transition::Failed {
                version: None,
                slot: None,
                kind: "boot".into(),
                message: "m".into(),
                keep_pending: false,
            },
            Transition::Cancelled {
                slot: B,
                version: "2.0".into(),
                reason: "operator".into(),
            },
            Transition::Cancelled {
                slot: A,
                version: "2.0".into(),
                reason: "operator".into(),
            },
        ]
    }

    /// The whole table: for every transition (rows) the phases it is allowed from (`+`) and
    /// refused from (`-`), columns in the order of [`phases`]: idle, downloading, staged B,
    /// trial B, committed A, rolled_back, failed, unknown.
    const TABLE: &[(&str, &str)] = &[
        ("begin_download 2.0 into B", "++++++++"),
        ("begin_download 2.0 into A (B booted on trial)", "++--++++"),
        ("staging_intent B 2.0", "-+------"),
        ("staging_intent B 3.0 (another download)", "--------"),
        ("staged B 2.0", "-+------"),
        ("staged B 3.0 (another download)", "--------"),
        ("trial B 2.0", "++++++++"),
        ("trial A 2.0 (not the staged slot)", "++--++++"),
        ("committed B", "++++++++"),
        ("committed A", "++++++++"),
        ("rolled_back from B", "++++++++"),
        ("rolled_back from A (onto a never-booted stage)", "++-+++++"),
        ("failed, nothing changed", "++++++++"),
        ("failed, host changed", "++++++++"),
        ("cancelled B 2.0", "--+-----"),
        ("cancelled A 2.0 (not staged)", "--------"),
    ];

    fn state_in(phase: Phase) -> State {
        let mut s = State {
            phase,
            ..State::default()
        };
        for (slot, v) in [(A, "1.0"), (B, "2.0")] {
            s.slots.insert(
                slot,
                SlotRecord {
                    version: v.into(),
                    image_sha256s: vec![],
                    verified: true,
                },
            );
        }
        s
    }

    #[test]
    fn the_transition_table_allows_and_refuses_exactly_what_it_says() {
        let ts = transitions();
        assert_eq!(ts.len(), TABLE.len());
        let mut wrong = Vec::new();
        for (t, (label, row)) in ts.iter().zip(TABLE) {
            for (from, want) in phases().into_iter().zip(row.chars()) {
                let mut state = state_in(from.clone());
                let before = state.clone();
                let got = t.clone().apply(&mut state, at());
                match (want, &got) {
                    ('+', Ok(_)) => {}
                    ('-', Err(r)) => {
                        assert_eq!(r.transition, t.name());
                        assert_eq!(r.from, from.name());
                        assert_eq!(state, before, "a refusal changed the record");
                    }
                    _ => wrong.push(format!("{label} from {}: {got:?}", from.name())),
                }
                // check() agrees with apply().
                assert_eq!(t.check(&from).is_ok(), got.is_ok(), "{label}");
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    fn last(s: &State) -> &HistoryEntry {
        s.history.last().unwrap()
    }

    #[test]
    fn each_transition_sets_its_phase_and_history_entry() {
        let mut s = state_in(Phase::Idle);
        Transition::BeginDownload {
            version: "3.0".into(),
            target: B,
        }
        .apply(&mut s, at())
        .unwrap();
        assert_eq!(
            s.phase,
            Phase::Downloading {
                version: "3.0".into(),
                bytes_done: 0
            }
        );
        assert!(
            !s.slots.contains_key(&B),
            "the overwritten slot is no target"
        );
        assert_eq!(last(&s).event, HistoryEvent::InstallStarted);
        assert_eq!((last(&s).slot, last(&s).at), (Some(B), at()));

        let n = s.history.len();
        Transition::StagingIntent {
            slot: B,
            version: "3.0".into(),
            image_sha256s: vec!["cd".into()],
        }
        .apply(&mut s, at())
        .unwrap();
        assert_eq!(s.history.len(), n, "the intent is no history event");
        assert!(s.slot_verified(B));
        assert!(matches!(s.phase, Phase::Downloading { .. }));

        Transition::Staged {
            slot: B,
            version: "3.0".into(),
            transfer: None,
        }
        .apply(&mut s, at())
        .unwrap();
        assert_eq!(
            s.phase,
            Phase::Staged {
                slot: B,
                version: "3.0".into()
            }
        );
        assert_eq!(last(&s).event, HistoryEvent::Staged);

        // Committing the booted slot A keeps B's stage pending.
        let out = Transition::Committed {
            slot: A,
            reason: "operator".into(),
        }
        .apply(&mut s, at())
        .unwrap();
        assert_eq!(out.version.as_deref(), Some("1.0"));
        assert!(matches!(s.phase, Phase::Staged { .. }));
        assert_eq!(last(&s).event, HistoryEvent::Committed);

        // A failure that changed nothing keeps it too; one that did does not.
        let failed = |keep_pending| Transition::Failed {
            version: None,
            slot: None,
            kind: "connect".into(),
            message: "m".into(),
            keep_pending,
        };
        failed(true).apply(&mut s, at()).unwrap();
        assert!(matches!(s.phase, Phase::Staged { .. }));
        assert_eq!(last(&s).error_kind.as_deref(), Some("connect"));

        Transition::Trial {
            slot: B,
            version: "3.0".into(),
            boot_id: "b".into(),
        }
        .apply(&mut s, at())
        .unwrap();
        assert!(matches!(s.phase, Phase::Trial { .. }));

        let out = Transition::RolledBack {
            from: B,
            reason: "unhealthy".into(),
            deny: true,
            error_kind: None,
        }
        .apply(&mut s, at())
        .unwrap();
        assert_eq!(
            out,
            Outcome {
                version: Some("3.0".into()),
                other_version: Some("1.0".into()),
                denylisted: Some("3.0".into()),
            }
        );
        assert!(s.is_denied("3.0"));
        assert_eq!(
            s.phase,
            Phase::RolledBack {
                reason: "unhealthy".into(),
                from_version: Some("3.0".into())
            }
        );
        assert_eq!(last(&s).event, HistoryEvent::RolledBack);

        failed(false).apply(&mut s, at()).unwrap();
        assert!(matches!(s.phase, Phase::Failed { .. }));

        let mut s = state_in(Phase::Staged {
            slot: B,
            version: "2.0".into(),
        });
        Transition::Cancelled {
            slot: B,
            version: "2.0".into(),
            reason: "operator".into(),
        }
        .apply(&mut s, at())
        .unwrap();
        assert_eq!(s.phase, Phase::Idle);
        assert_eq!(last(&s).event, HistoryEvent::Cancelled);

        let mut s = state_in(Phase::Trial {
            slot: B,
            version: "2.0".into(),
            boot_id: "b".into(),
        });
        Transition::Committed {
            slot: B,
            reason: "healthy".into(),
        }
        .apply(&mut s, at())
        .unwrap();
        assert_eq!(
            s.phase,
            Phase::Committed {
                slot: B,
                version: "2.0".into()
            }
        );
    }
}
