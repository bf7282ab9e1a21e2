//! GRUB environment block backend, speaking RAUC's variables (`ORDER`, `A_OK`, `A_TRY`, ...).
//!
//! The block is GRUB's format: exactly 1024 bytes, `# GRUB Environment Block\n`, then
//! `name=value\n` lines, padded with `#`. In values GRUB escapes `\` and newline with a
//! backslash; we do the same, so `grub-editenv FILE list` reads what we write and we read what
//! `grub-editenv FILE set` writes. Unknown variables and comment lines are kept, in order.
//!
//! Convention (compatible with RAUC's `contrib/grub.conf` when `max_tries` is 1):
//! the loader boots the first slot in `ORDER` with `X_OK=1` and `X_TRY < max_tries`, and
//! counts the attempt in `X_TRY` before booting. If no slot qualifies it boots its rescue
//! entry and resets `X_TRY=0` on every slot with `X_OK=1`. Marking good (`commit`) resets
//! `X_TRY=0`, so with RAUC's script *every* boot is a trial until marked good again.
//!
//! Ops: `stage` puts the slot first in `ORDER` with OK=1, TRY=0 (RAUC's mark-active);
//! `commit` sets OK=1, TRY=0 (mark-good); `disable` sets OK=0, TRY=0 (mark-bad);
//! `rollback(to)` puts `to` first with OK=1, TRY=0 and the other OK=0; `cancel(slot)` puts the
//! other slot first and sets the slot OK=0. A staged, not yet committed slot is remembered in
//! [`TRIAL_VAR`] (ignored by GRUB) so `status` can tell "staged" from "committed".
//!
//! Mapping to [`SlotStatus`]: `priority` is 2 for the first slot in `ORDER`, 1 for the second,
//! 0 when the slot is absent from `ORDER` or `X_OK != 1`; `tries` is `max_tries - X_TRY`
//! (0 when not OK); `successful` is `X_OK=1 && X_TRY=0` and the slot is not the staged trial.
//!
//! The parts: [`block`] (the environment-block format and where it lives), [`vars`] (RAUC's
//! variables and the loader's choice rule), [`cfg`] (the grub.cfg selection script) and, here,
//! the errors and the [`GrubEnvBoot`] backend.

mod block;
mod cfg;
mod vars;

pub use block::{EnvLocation, GrubEnv, ENV_BLOCK_SIZE, ENV_HEADER};
pub use cfg::grub_cfg_selection;
pub use vars::{
    booted_slot_from_cmdline, choose, create_file, ok_var, try_var, LoaderChoice, RaucVars,
    TRIAL_VAR,
};

use super::{BootControl, BootError, BootStatus, SlotId, SlotStatus};
use std::path::PathBuf;
use vars::order_with_first;

/// Largest `max_tries` the backend accepts (one digit keeps grub.cfg ladders short).
pub(crate) const MAX_TRIES_LIMIT: u8 = 9;

/// Errors reading, parsing or writing an environment block.
#[derive(Debug, thiserror::Error)]
pub enum GrubEnvError {
    #[error("I/O error on GRUB environment {location}: {source}")]
    Io {
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GRUB environment {location} is {size} bytes; a GRUB environment block is exactly {ENV_BLOCK_SIZE} bytes")]
    WrongSize { location: String, size: u64 },
    #[error(
        "GRUB environment {location} does not start with the header \"# GRUB Environment Block\""
    )]
    MissingHeader { location: String },
    #[error("GRUB environment {location} is malformed at byte {offset}: {reason}")]
    Malformed {
        location: String,
        offset: usize,
        reason: String,
    },
    #[error("invalid GRUB variable name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("GRUB environment {location}: variables need {needed} bytes, more than the {ENV_BLOCK_SIZE}-byte block holds")]
    TooLarge { location: String, needed: usize },
    #[error("GRUB environment {location}: {name}={value:?} is not valid: {reason}")]
    BadValue {
        location: String,
        name: String,
        value: String,
        reason: String,
    },
    #[error("refused on GRUB environment {location}: {reason}")]
    Refused { location: String, reason: String },
    #[error("invalid grubenv backend setting: {0}")]
    Setting(String),
}

impl GrubEnvError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            GrubEnvError::Io { .. } => "grubenv_io",
            GrubEnvError::WrongSize { .. } => "grubenv_wrong_size",
            GrubEnvError::MissingHeader { .. } => "grubenv_missing_header",
            GrubEnvError::Malformed { .. } => "grubenv_malformed",
            GrubEnvError::InvalidName { .. } => "grubenv_invalid_name",
            GrubEnvError::TooLarge { .. } => "grubenv_too_large",
            GrubEnvError::BadValue { .. } => "grubenv_bad_value",
            GrubEnvError::Refused { .. } => "grubenv_refused",
            GrubEnvError::Setting(_) => "grubenv_setting",
        }
    }
}

impl From<GrubEnvError> for BootError {
    fn from(e: GrubEnvError) -> Self {
        match e {
            GrubEnvError::Io { location, source } => BootError::Io {
                what: format!("GRUB environment {location}"),
                source,
            },
            GrubEnvError::Refused { .. } => BootError::Refused(e.to_string()),
            // Bad input keeps its own stable kind (`GrubEnvError::kind`), the same in status, the
            // state record and the metrics.
            other => BootError::Backend {
                kind: other.kind(),
                message: other.to_string(),
            },
        }
    }
}

/// The grubenv [`BootControl`] backend.
#[derive(Debug)]
pub struct GrubEnvBoot {
    location: EnvLocation,
    max_tries: u8,
}

impl GrubEnvBoot {
    /// A backend on `location`; `max_tries` boot attempts per trial (RAUC's script: 1).
    pub fn new(location: EnvLocation, max_tries: u8) -> Result<Self, GrubEnvError> {
        if max_tries == 0 || max_tries > MAX_TRIES_LIMIT {
            return Err(GrubEnvError::Setting(format!(
                "tries = {max_tries}: must be 1..={MAX_TRIES_LIMIT}"
            )));
        }
        Ok(GrubEnvBoot {
            location,
            max_tries,
        })
    }

    /// A backend on a grubenv file.
    pub fn file(path: impl Into<PathBuf>, max_tries: u8) -> Result<Self, GrubEnvError> {
        Self::new(EnvLocation::File(path.into()), max_tries)
    }

    /// Boot attempts per trial.
    pub fn max_tries(&self) -> u8 {
        self.max_tries
    }

    /// The underlying location (the simulator boots from the same one).
    pub fn location_mut(&mut self) -> &mut EnvLocation {
        &mut self.location
    }

    /// Read, decode, let `change` edit the block, write it back. `change` sees the decoded
    /// variables and may refuse; on any error nothing is written.
    fn modify(
        &mut self,
        op: &str,
        change: impl FnOnce(&RaucVars, &mut GrubEnv, &str) -> Result<(), GrubEnvError>,
    ) -> Result<(), BootError> {
        let loc = self.location.describe();
        let span = tracing::info_span!("grubenv", op, location = %loc);
        let _enter = span.enter();
        let mut env = self.location.read()?;
        let vars = RaucVars::from_env(&env, &loc)?;
        change(&vars, &mut env, &loc)?;
        self.location.write(&env)?;
        tracing::info!(
            order = env.get("ORDER").unwrap_or(""),
            a_ok = env.get("A_OK").unwrap_or(""),
            a_try = env.get("A_TRY").unwrap_or(""),
            b_ok = env.get("B_OK").unwrap_or(""),
            b_try = env.get("B_TRY").unwrap_or(""),
            "GRUB environment written"
        );
        Ok(())
    }
}

fn refuse(location: &str, reason: String) -> GrubEnvError {
    GrubEnvError::Refused {
        location: location.to_string(),
        reason,
    }
}

/// Boots the loader makes, without a commit in between, until it reaches `want` (or gives
/// up): the choice rule of [`choose`], counting `X_TRY` as GRUB does.
/// `Ok(())` when `want` is booted before any rescue boot; otherwise the boots seen.
fn loader_reaches(
    env: &GrubEnv,
    max_tries: u8,
    want: SlotId,
    loc: &str,
) -> Result<Result<(), Vec<Option<SlotId>>>, GrubEnvError> {
    let mut env = env.clone();
    let mut seen = Vec::new();
    // Each boot that does not reach `want` spends a try of the slot booted (at most
    // max_tries per slot), so 2 * max_tries + 1 boots decide it.
    for _ in 0..=2 * usize::from(max_tries) {
        let boot = choose(&mut env, max_tries, loc)?;
        if boot.booted == Some(want) {
            return Ok(Ok(()));
        }
        seen.push(boot.booted);
        if boot.booted.is_none() {
            break;
        }
    }
    Ok(Err(seen))
}

fn describe_boots(boots: &[Option<SlotId>]) -> String {
    boots
        .iter()
        .map(|b| b.map_or("rescue".to_string(), |s| s.to_string()))
        .collect::<Vec<_>>()
        .join(", then ")
}

/// Refuse unless the loader, run on the block as `change` leaves it, boots `fallback` before
/// it would ever boot its rescue entry (no commit in between: the trial failed, or nobody
/// marked the running boot good).
fn require_loader_reaches(
    after: &GrubEnv,
    max_tries: u8,
    fallback: SlotId,
    loc: &str,
    what: &str,
) -> Result<(), GrubEnvError> {
    match loader_reaches(after, max_tries, fallback, loc)? {
        Ok(()) => Ok(()),
        Err(boots) => Err(refuse(
            loc,
            format!(
                "{what} would strand the host: GRUB would boot {} and never reach {fallback} \
                 ({fallback}_TRY counts attempts the running boot has not been marked good \
                 for; run `update-agent health` or commit first)",
                describe_boots(&boots)
            ),
        )),
    }
}

/// Refuse when `slot` (the one that must stay bootable) is not marked OK.
fn require_ok(vars: &RaucVars, slot: SlotId, loc: &str, why: &str) -> Result<(), GrubEnvError> {
    if vars.ok(slot) {
        Ok(())
    } else {
        Err(refuse(
            loc,
            format!("slot {slot} is not marked OK ({slot}_OK != 1), so {why}"),
        ))
    }
}

fn clear_trial_if(env: &mut GrubEnv, vars: &RaucVars, slot: SlotId) {
    if vars.trial == Some(slot) {
        env.unset(TRIAL_VAR);
    }
}

impl BootControl for GrubEnvBoot {
    fn backend(&self) -> &'static str {
        "grubenv"
    }

    fn status(&mut self) -> Result<BootStatus, BootError> {
        let loc = self.location.describe();
        let env = self.location.read()?;
        let vars = RaucVars::from_env(&env, &loc)?;
        let order = vars.slot_order();
        let max = u32::from(self.max_tries);
        let slots = [SlotId::A, SlotId::B]
            .into_iter()
            .map(|slot| {
                let ok = vars.ok(slot);
                let made = vars.tries_made(slot);
                let priority = match order.iter().position(|&s| s == slot) {
                    Some(i) if ok => 2u8.saturating_sub(i as u8),
                    _ => 0,
                };
                SlotStatus {
                    slot,
                    priority,
                    tries: if ok {
                        u8::try_from(max.saturating_sub(made)).unwrap_or(u8::MAX)
                    } else {
                        0
                    },
                    successful: ok && made == 0 && vars.trial != Some(slot),
                }
            })
            .collect();
        let next = vars.next_boot(self.max_tries);
        let reason = match next {
            Some(s) => format!(
                "{s} is the first slot in ORDER=\"{}\" with {s}_OK=1 and {s}_TRY={} < {max}",
                vars.order.join(" "),
                vars.tries_made(s)
            ),
            None => format!(
                "no slot in ORDER=\"{}\" has X_OK=1 and X_TRY < {max}: GRUB boots its rescue entry \
                 and resets X_TRY of OK slots",
                vars.order.join(" ")
            ),
        };
        Ok(BootStatus {
            backend: self.backend().to_string(),
            slots,
            next,
            reason,
        })
    }

    fn disable(&mut self, slot: SlotId) -> Result<(), BootError> {
        let max = self.max_tries;
        self.modify("disable", |vars, env, loc| {
            let mut before = env.clone();
            require_ok(
                vars,
                slot.other(),
                loc,
                &format!("disabling {slot} would leave no bootable slot"),
            )?;
            env.set(&ok_var(slot), "0")?;
            env.set(&try_var(slot), "0")?;
            clear_trial_if(env, vars, slot);
            // Refused when the disable itself strands the host: the next boot would be
            // rescue where it was a slot. (When the other slot's attempt is already spent
            // and this one is not OK, the loader boots rescue either way.)
            let next_before = choose(&mut before, max, loc)?.booted;
            let next_after = choose(&mut env.clone(), max, loc)?.booted;
            if next_before.is_some() && next_after.is_none() {
                return Err(refuse(
                    loc,
                    format!(
                        "disabling {slot} would strand the host: GRUB would boot {} now but \
                         rescue after ({other}_TRY={} of {max} tries counts a boot not yet \
                         marked good; run `update-agent health` or commit first)",
                        describe_boots(&[next_before]),
                        vars.tries_made(slot.other()),
                        other = slot.other(),
                    ),
                ));
            }
            Ok(())
        })
    }

    fn stage(&mut self, slot: SlotId) -> Result<(), BootError> {
        let max = self.max_tries;
        self.modify("stage", |vars, env, loc| {
            require_ok(
                vars,
                slot.other(),
                loc,
                &format!("staging {slot} would leave no fallback if its trial fails"),
            )?;
            env.set("ORDER", &order_with_first(&vars.order, slot))?;
            env.set(&ok_var(slot), "1")?;
            env.set(&try_var(slot), "0")?;
            env.set(TRIAL_VAR, &slot.to_string())?;
            // The trial boots first; if it is never committed the other slot must follow.
            require_loader_reaches(
                env,
                max,
                slot.other(),
                loc,
                &format!("staging {slot} (if its trial fails)"),
            )
        })
    }

    fn commit(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.modify("commit", |vars, env, _loc| {
            env.set(&ok_var(slot), "1")?;
            env.set(&try_var(slot), "0")?;
            clear_trial_if(env, vars, slot);
            Ok(())
        })
    }

    fn rollback(&mut self, to: SlotId) -> Result<(), BootError> {
        self.modify("rollback", |vars, env, loc| {
            require_ok(vars, to, loc, "it cannot be the rollback target")?;
            if vars.trial == Some(to) {
                return Err(refuse(
                    loc,
                    format!("slot {to} is staged and was never committed; it is not a known-good rollback target"),
                ));
            }
            let from = to.other();
            env.set("ORDER", &order_with_first(&vars.order, to))?;
            env.set(&try_var(to), "0")?;
            env.set(&ok_var(from), "0")?;
            env.set(&try_var(from), "0")?;
            env.unset(TRIAL_VAR);
            Ok(())
        })
    }

    fn cancel(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.modify("cancel", |vars, env, loc| {
            let other = slot.other();
            require_ok(
                vars,
                other,
                loc,
                &format!("cancelling the stage of {slot} would leave no bootable slot"),
            )?;
            env.set("ORDER", &order_with_first(&vars.order, other))?;
            env.set(&ok_var(slot), "0")?;
            env.set(&try_var(slot), "0")?;
            clear_trial_if(env, vars, slot);
            Ok(())
        })
    }
}
