//! RAUC's variables in the block (`ORDER`, `A_OK`, `A_TRY`, ..., and our [`TRIAL_VAR`]) and
//! the loader's choice rule over them ([`choose`]), which the backend's refusals and the
//! sandbox's simulator both run.

use super::{EnvLocation, GrubEnv, GrubEnvError, SlotId};
use std::path::Path;

/// What GRUB's selection script does on one boot (RAUC's `contrib/grub.conf`); `None`
/// booted: GRUB fell through to its rescue entry.
pub use crate::boot::LoaderChoice;
/// Our own variable naming the slot staged for a trial boot and not yet committed.
pub use crate::boot::TRIAL_VAR;

/// `A_OK` / `B_OK`.
pub fn ok_var(slot: SlotId) -> String {
    format!("{slot}_OK")
}

/// `A_TRY` / `B_TRY`.
pub fn try_var(slot: SlotId) -> String {
    format!("{slot}_TRY")
}

use crate::boot::parse_slot_token as parse_slot;

/// RAUC's variables decoded, with the grub.cfg defaults for missing ones
/// (`ORDER="A B"`, `X_OK=0`, `X_TRY=0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaucVars {
    /// `ORDER` split on whitespace; tokens other than `A`/`B` are kept (GRUB skips them).
    pub order: Vec<String>,
    pub a_ok: bool,
    pub a_try: u32,
    pub b_ok: bool,
    pub b_try: u32,
    /// The slot staged for a trial boot by this agent, if any.
    pub trial: Option<SlotId>,
}

impl RaucVars {
    /// Decode from `env`; a value that is not a number (or not 0/1 for `X_OK`) is an error.
    pub fn from_env(env: &GrubEnv, location: &str) -> Result<Self, GrubEnvError> {
        let bad = |name: &str, value: &str, reason: &str| GrubEnvError::BadValue {
            location: location.to_string(),
            name: name.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let order = env
            .get("ORDER")
            .unwrap_or("A B")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let ok = |slot: SlotId| -> Result<bool, GrubEnvError> {
            let name = ok_var(slot);
            match env.get(&name) {
                None => Ok(false),
                Some("1") => Ok(true),
                Some("0") => Ok(false),
                Some(v) => Err(bad(&name, v, "expected 0 or 1")),
            }
        };
        let tries = |slot: SlotId| -> Result<u32, GrubEnvError> {
            let name = try_var(slot);
            match env.get(&name) {
                None => Ok(0),
                Some(v) => v
                    .parse::<u32>()
                    .map_err(|_| bad(&name, v, "expected a decimal attempt count")),
            }
        };
        let trial = crate::boot::parse_trial_mark(env.get(TRIAL_VAR))
            .map_err(|v| bad(TRIAL_VAR, v, "expected A or B"))?;
        Ok(RaucVars {
            order,
            a_ok: ok(SlotId::A)?,
            a_try: tries(SlotId::A)?,
            b_ok: ok(SlotId::B)?,
            b_try: tries(SlotId::B)?,
            trial,
        })
    }

    /// `X_OK` of `slot`.
    pub(crate) fn ok(&self, slot: SlotId) -> bool {
        match slot {
            SlotId::A => self.a_ok,
            SlotId::B => self.b_ok,
        }
    }

    /// `X_TRY` of `slot`.
    pub(crate) fn tries_made(&self, slot: SlotId) -> u32 {
        match slot {
            SlotId::A => self.a_try,
            SlotId::B => self.b_try,
        }
    }

    /// Slots in `ORDER`, first occurrence only, unknown tokens skipped.
    pub(crate) fn slot_order(&self) -> Vec<SlotId> {
        let mut out = Vec::new();
        for slot in self.order.iter().filter_map(|t| parse_slot(t)) {
            if !out.contains(&slot) {
                out.push(slot);
            }
        }
        out
    }

    /// The loader's choice: the first slot in `ORDER` with OK=1 and TRY < `max_tries`.
    pub fn next_boot(&self, max_tries: u8) -> Option<SlotId> {
        self.slot_order()
            .into_iter()
            .find(|&s| self.ok(s) && self.tries_made(s) < u32::from(max_tries))
    }
}

/// The booted slot from RAUC's kernel argument `rauc.slot=A|B` (set by its grub.cfg menu
/// entries). `None` when absent, unknown, or given twice with different values.
pub fn booted_slot_from_cmdline(cmdline: &str) -> Option<SlotId> {
    let mut found = None;
    for value in cmdline
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix("rauc.slot="))
    {
        let slot = parse_slot(value)?;
        if found.is_some_and(|f| f != slot) {
            return None;
        }
        found = Some(slot);
    }
    found
}

/// `ORDER` with `first` at the front, the other tokens after it in their current order, and
/// `first.other()` appended if it was missing.
pub(super) fn order_with_first(current: &[String], first: SlotId) -> String {
    let first_s = first.to_string();
    let other_s = first.other().to_string();
    let mut out = vec![first_s.clone()];
    out.extend(current.iter().filter(|t| **t != first_s).cloned());
    if !out.contains(&other_s) {
        out.push(other_s);
    }
    out.join(" ")
}

/// The loader's choice rule: run the script's logic on `env` in memory (the `save_env` is
/// the caller's write). With `max_tries = 1` this is RAUC's script step for step; with more
/// tries the attempt counter is incremented (up to `max_tries`). The refusal rule and the
/// sandbox's simulator both use it.
pub fn choose(
    env: &mut GrubEnv,
    max_tries: u8,
    location: &str,
) -> Result<LoaderChoice, GrubEnvError> {
    let vars = RaucVars::from_env(env, location)?;
    let max = u32::from(max_tries);
    // The script's working copies of A_TRY / B_TRY (defaults 0 when unset).
    let mut tries = [vars.a_try, vars.b_try];
    let idx = |s: SlotId| match s {
        SlotId::A => 0,
        SlotId::B => 1,
    };
    let mut booted = None;
    // Unknown ORDER tokens match neither branch in the script and keep the previous slot's
    // (already rejected) OK/TRY, so they are skipped; repeated tokens are evaluated again.
    for slot in vars.order.iter().filter_map(|t| match t.as_str() {
        "A" => Some(SlotId::A),
        "B" => Some(SlotId::B),
        _ => None,
    }) {
        let made = tries[idx(slot)];
        tries[idx(slot)] = (made + 1).min(max.max(1));
        if vars.ok(slot) && made < max {
            booted = Some(slot);
            break;
        }
    }
    let mut reset_tries = false;
    if booted.is_none() {
        for slot in [SlotId::A, SlotId::B] {
            if vars.ok(slot) && tries[idx(slot)] >= max {
                tries[idx(slot)] = 0;
                reset_tries = true;
            }
        }
    }
    for slot in [SlotId::A, SlotId::B] {
        env.set(&try_var(slot), &tries[idx(slot)].to_string())?;
    }
    Ok(LoaderChoice {
        booted,
        reset_tries,
    })
}

/// Create a fresh block file with RAUC's initial variables: `ORDER="A B"`, both slots OK,
/// no tries counted (what a provisioning step would write). Fails if `path` exists.
pub fn create_file(path: &Path, first: SlotId) -> Result<(), GrubEnvError> {
    let loc = path.display().to_string();
    if path.exists() {
        return Err(GrubEnvError::Refused {
            location: loc,
            reason: "the file already exists".into(),
        });
    }
    let mut env = GrubEnv::new();
    env.set("ORDER", &format!("{} {}", first, first.other()))?;
    for slot in [SlotId::A, SlotId::B] {
        env.set(&ok_var(slot), "1")?;
        env.set(&try_var(slot), "0")?;
    }
    let mut location = EnvLocation::File(path.to_path_buf());
    location.write(&env)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn order_rewrite_keeps_unknown_tokens() {
        let cur: Vec<String> = ["A", "R", "B"].iter().map(|s| s.to_string()).collect();
        assert_eq!(order_with_first(&cur, SlotId::B), "B A R");
        assert_eq!(order_with_first(&["A".to_string()], SlotId::B), "B A");
        assert_eq!(order_with_first(&[], SlotId::A), "A B");
    }

    #[test]
    fn booted_slot_from_rauc_cmdline() {
        let c = "console=ttyS0 root=/dev/sda3 panic=60 rauc.slot=B quiet";
        assert_eq!(booted_slot_from_cmdline(c), Some(SlotId::B));
        assert_eq!(booted_slot_from_cmdline("root=/dev/sda1 rauc.slot=R"), None);
        assert_eq!(booted_slot_from_cmdline("quiet"), None);
        assert_eq!(booted_slot_from_cmdline("rauc.slot=A rauc.slot=B"), None);
    }
}
