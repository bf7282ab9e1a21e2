//! U-Boot backend, speaking RAUC's variables in a U-Boot environment (`ubootenv`).
//!
//! Variables (RAUC's `contrib/uboot.sh`): `BOOT_ORDER` is the space-separated list of slots in
//! the order the boot script tries them; `BOOT_A_LEFT` / `BOOT_B_LEFT` the attempts left. The
//! script ([`choose`], shipped as `docs/uboot/boot.cmd`) boots the first slot in `BOOT_ORDER`
//! whose counter is `1`-`9`, decrementing it (a countdown table, so it also runs where
//! U-Boot has no `setexpr`) and saving; when none qualifies it sets both counters to 3,
//! saves and `reset`s.
//! Missing variables get the script's defaults (`"A B"`, 3, 3).
//!
//! The agent is stricter than the script: it refuses to act on an environment without
//! RAUC's three variables, with a `BOOT_ORDER` other than distinct `A`/`B` tokens, or with a
//! counter that is not one digit, and writes nothing then.
//!
//! Operations: `stage` puts the slot first in `BOOT_ORDER` with `tries` attempts and records
//! it in [`TRIAL_VAR`] (ignored by U-Boot); `commit` sets the slot's counter to `tries` (RAUC's
//! mark-good) and clears the trial; `disable`, `cancel` and `rollback` set the abandoned
//! slot's counter to 0 *and remove it from `BOOT_ORDER`*, so the script's reset (both
//! counters back to 3) cannot resurrect a half-written or failed slot.
//!
//! Each change is one environment write: with a redundant pair it goes to the copy not in
//! use with the next flag, so a power cut leaves the old copy valid ([`super::ubootenv`]).

use super::ubootenv::{EnvStore, UbootEnv, UbootEnvError};
use super::{BootControl, BootError, BootStatus, SlotId, SlotStatus};
use std::path::Path;

/// What the boot script does on one run; `None` booted: no slot qualified, the script reset
/// the counters and the board (`reset`), and the next power-on runs it again.
pub use super::LoaderChoice;
/// Our own variable naming the slot staged for a trial boot and not yet committed.
pub use super::TRIAL_VAR;
/// What RAUC's script sets missing counters to, and both counters to when nothing is left.
pub const SCRIPT_TRIES: u32 = 3;
/// Largest `boot.tries`: the script's countdown table holds one digit (which also reads
/// the same in RAUC's decimal and `setexpr`'s hexadecimal).
pub const MAX_TRIES_LIMIT: u8 = 9;
/// Where libubootenv looks for its configuration.
pub const FW_ENV_CONFIG: &str = "/etc/fw_env.config";

/// Errors of the uboot backend. Nothing is written when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum UbootError {
    #[error(transparent)]
    Env(#[from] UbootEnvError),
    #[error("U-Boot environment {location}: {name} is not set (provision RAUC's variables: fw_setenv BOOT_ORDER \"A B\"; fw_setenv BOOT_A_LEFT 3; fw_setenv BOOT_B_LEFT 3)")]
    MissingVar { location: String, name: String },
    #[error("U-Boot environment {location}: {name}={value:?} is not valid: {reason}")]
    BadValue {
        location: String,
        name: String,
        value: String,
        reason: String,
    },
    #[error("refused on U-Boot environment {location}: {reason}")]
    Refused { location: String, reason: String },
    #[error("invalid uboot backend setting: {0}")]
    Setting(String),
}

impl UbootError {
    /// A stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            UbootError::Env(e) => e.kind(),
            UbootError::MissingVar { .. } => "uboot_missing_var",
            UbootError::BadValue { .. } => "uboot_bad_value",
            UbootError::Refused { .. } => "uboot_refused",
            UbootError::Setting(_) => "uboot_setting",
        }
    }
}

impl From<UbootError> for BootError {
    fn from(e: UbootError) -> Self {
        match e {
            UbootError::Env(UbootEnvError::Io { location, source }) => BootError::Io {
                what: format!("U-Boot environment {location}"),
                source,
            },
            UbootError::Refused { .. } => BootError::Refused(e.to_string()),
            other => BootError::Backend {
                kind: other.kind(),
                message: other.to_string(),
            },
        }
    }
}

/// `BOOT_A_LEFT` / `BOOT_B_LEFT`.
pub fn left_var(slot: SlotId) -> String {
    format!("BOOT_{slot}_LEFT")
}

use super::parse_slot_token as parse_slot;

/// A counter as the script's countdown table reads it: exactly one digit `0`-`9` (the
/// script boots a slot whose counter is `1`-`9` and skips any other text, which the agent
/// refuses rather than guess; digits read the same in RAUC's decimal and `setexpr`'s hex).
fn parse_left(value: &str) -> Option<u32> {
    match value.as_bytes() {
        [d @ b'0'..=b'9'] => Some(u32::from(d - b'0')),
        _ => None,
    }
}

/// A counter as the script writes it (one digit; counters never exceed [`MAX_TRIES_LIMIT`]).
fn format_left(n: u32) -> String {
    n.to_string()
}

/// RAUC's variables decoded strictly: all three present, `BOOT_ORDER` distinct `A`/`B`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UbootVars {
    pub order: Vec<SlotId>,
    pub a_left: u32,
    pub b_left: u32,
    /// The slot staged for a trial boot by this agent, if any.
    pub trial: Option<SlotId>,
}

impl UbootVars {
    /// Decode `env`; anything missing or malformed is an error naming the variable.
    pub fn from_env(env: &UbootEnv, location: &str) -> Result<Self, UbootError> {
        let bad = |name: &str, value: &str, reason: &str| UbootError::BadValue {
            location: location.to_string(),
            name: name.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let get = |name: &str| {
            env.get(name).ok_or_else(|| UbootError::MissingVar {
                location: location.to_string(),
                name: name.to_string(),
            })
        };
        let order_text = get("BOOT_ORDER")?;
        let mut order = Vec::new();
        for token in order_text.split_whitespace() {
            let slot = parse_slot(token).ok_or_else(|| {
                bad(
                    "BOOT_ORDER",
                    order_text,
                    &format!("token {token:?} is not a slot (expected A and/or B)"),
                )
            })?;
            if order.contains(&slot) {
                return Err(bad(
                    "BOOT_ORDER",
                    order_text,
                    &format!("slot {slot} is listed twice"),
                ));
            }
            order.push(slot);
        }
        if order.is_empty() {
            return Err(bad("BOOT_ORDER", order_text, "names no slot"));
        }
        let left = |slot: SlotId| -> Result<u32, UbootError> {
            let name = left_var(slot);
            let v = get(&name)?;
            parse_left(v).ok_or_else(|| {
                bad(
                    &name,
                    v,
                    "expected one digit 0-9 (the boot script counts down from at most 9)",
                )
            })
        };
        let trial = super::parse_trial_mark(env.get(TRIAL_VAR))
            .map_err(|v| bad(TRIAL_VAR, v, "expected A or B"))?;
        Ok(UbootVars {
            order,
            a_left: left(SlotId::A)?,
            b_left: left(SlotId::B)?,
            trial,
        })
    }

    /// `BOOT_x_LEFT` of `slot`.
    pub fn left(&self, slot: SlotId) -> u32 {
        match slot {
            SlotId::A => self.a_left,
            SlotId::B => self.b_left,
        }
    }

    /// In `BOOT_ORDER` and not the uncommitted trial: a slot the host may fall back to.
    pub fn good(&self, slot: SlotId) -> bool {
        self.order.contains(&slot) && self.trial != Some(slot)
    }

    fn order_text(&self) -> String {
        self.order
            .iter()
            .map(SlotId::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// THE choice rule: RAUC's U-Boot script run on `env` in memory, step for step (defaults
/// for missing or empty variables, the first slot in `BOOT_ORDER` with a counter above 0,
/// decremented; none: both counters set to 3). `env` is left as the script's `saveenv`
/// writes it. `status`, the refusal rule and the sandbox simulator all use it.
pub fn choose(env: &mut UbootEnv, location: &str) -> Result<LoaderChoice, UbootError> {
    let bad = |name: &str, value: &str| UbootError::BadValue {
        location: location.to_string(),
        name: name.to_string(),
        value: value.to_string(),
        reason: "the boot script counts down one digit 0-9 and would not boot this slot".into(),
    };
    // test -n "${X}" || setenv X default
    if env.get("BOOT_ORDER").is_none_or(str::is_empty) {
        env.set("BOOT_ORDER", "A B")?;
    }
    for slot in [SlotId::A, SlotId::B] {
        if env.get(&left_var(slot)).is_none_or(str::is_empty) {
            env.set(&left_var(slot), &SCRIPT_TRIES.to_string())?;
        }
    }
    let order: Vec<String> = env
        .get("BOOT_ORDER")
        .unwrap_or("A B")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut booted = None;
    for token in &order {
        if booted.is_some() {
            break;
        }
        // Tokens other than A and B match neither branch of the script.
        let Some(slot) = parse_slot(token) else {
            continue;
        };
        let name = left_var(slot);
        let value = env.get(&name).unwrap_or("0").to_string();
        let left = parse_left(&value).ok_or_else(|| bad(&name, &value))?;
        if left > 0 {
            env.set(&name, &format_left(left - 1))?;
            booted = Some(slot);
        }
    }
    let reset_tries = booted.is_none();
    if reset_tries {
        for slot in [SlotId::A, SlotId::B] {
            env.set(&left_var(slot), &SCRIPT_TRIES.to_string())?;
        }
    }
    Ok(LoaderChoice {
        booted,
        reset_tries,
    })
}

/// Boots the script makes, without a commit in between, until it boots `want`: `Ok(())`, or
/// the boots seen (`None` = a reset) when it does not within a bound that covers every
/// counter running out twice.
fn loader_reaches(
    env: &UbootEnv,
    want: SlotId,
    loc: &str,
) -> Result<Result<(), Vec<Option<SlotId>>>, UbootError> {
    let mut env = env.clone();
    let mut seen = Vec::new();
    for _ in 0..4 * (u32::from(MAX_TRIES_LIMIT).max(SCRIPT_TRIES) + 1) {
        let boot = choose(&mut env, loc)?;
        if boot.booted == Some(want) {
            return Ok(Ok(()));
        }
        seen.push(boot.booted);
    }
    Ok(Err(seen))
}

fn describe_boots(boots: &[Option<SlotId>]) -> String {
    let mut out: Vec<String> = boots
        .iter()
        .take(8)
        .map(|b| b.map_or("reset".to_string(), |s| s.to_string()))
        .collect();
    if boots.len() > 8 {
        out.push("...".into());
    }
    out.join(", ")
}

fn refuse(location: &str, reason: String) -> UbootError {
    UbootError::Refused {
        location: location.to_string(),
        reason,
    }
}

/// Refuse unless the script, run on `after` with no commit in between, boots `fallback`.
fn require_reaches(
    after: &UbootEnv,
    fallback: SlotId,
    loc: &str,
    what: &str,
) -> Result<(), UbootError> {
    match loader_reaches(after, fallback, loc)? {
        Ok(()) => Ok(()),
        Err(boots) => Err(refuse(
            loc,
            format!(
                "{what} would strand the host: the boot script would boot {} and never reach \
                 {fallback} (BOOT_{fallback}_LEFT counts boots not yet marked good; run \
                 `update-agent health` or commit first)",
                describe_boots(&boots)
            ),
        )),
    }
}

fn require_good(vars: &UbootVars, slot: SlotId, loc: &str, why: &str) -> Result<(), UbootError> {
    if vars.good(slot) {
        Ok(())
    } else {
        let state = if vars.trial == Some(slot) {
            "is staged and was never committed"
        } else {
            "is not in BOOT_ORDER"
        };
        Err(refuse(loc, format!("slot {slot} {state}, so {why}")))
    }
}

/// `BOOT_ORDER` with `order`'s slots.
fn set_order(env: &mut UbootEnv, order: &[SlotId]) -> Result<(), UbootError> {
    let text = order
        .iter()
        .map(SlotId::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    Ok(env.set("BOOT_ORDER", &text)?)
}

fn clear_trial_if(env: &mut UbootEnv, vars: &UbootVars, slot: SlotId) {
    if vars.trial == Some(slot) {
        env.unset(TRIAL_VAR);
    }
}

/// The uboot [`BootControl`] backend.
#[derive(Debug)]
pub struct UbootBoot {
    store: EnvStore,
    tries: u8,
}

impl UbootBoot {
    /// A backend on `store`; `tries` boot attempts per trial and after each commit.
    pub fn new(store: EnvStore, tries: u8) -> Result<Self, UbootError> {
        if tries == 0 || tries > MAX_TRIES_LIMIT {
            return Err(UbootError::Setting(format!(
                "tries = {tries}: must be 1..={MAX_TRIES_LIMIT}"
            )));
        }
        Ok(UbootBoot { store, tries })
    }

    /// A backend on the copies a `fw_env.config` names.
    pub fn from_fw_env_config(path: &Path, tries: u8) -> Result<Self, UbootError> {
        Self::new(EnvStore::from_fw_env_config(path)?, tries)
    }

    /// The environment store (the simulator boots from the same one).
    pub fn store_mut(&mut self) -> &mut EnvStore {
        &mut self.store
    }

    /// The store, consumed (tests take their recording devices back).
    pub fn into_store(self) -> EnvStore {
        self.store
    }

    fn modify(
        &mut self,
        op: &str,
        change: impl FnOnce(&UbootVars, &mut UbootEnv, &str) -> Result<(), UbootError>,
    ) -> Result<(), BootError> {
        let loc = self.store.describe();
        let span = tracing::info_span!("uboot", op, location = %loc);
        let _enter = span.enter();
        let cur = self.store.read().map_err(UbootError::from)?;
        let vars = UbootVars::from_env(&cur.env, &loc)?;
        let mut env = cur.env.clone();
        change(&vars, &mut env, &loc)?;
        if env == cur.env {
            return Ok(());
        }
        self.store.write(&env, &cur).map_err(UbootError::from)?;
        tracing::info!(
            boot_order = env.get("BOOT_ORDER").unwrap_or(""),
            a_left = env.get("BOOT_A_LEFT").unwrap_or(""),
            b_left = env.get("BOOT_B_LEFT").unwrap_or(""),
            trial = env.get(TRIAL_VAR).unwrap_or(""),
            "U-Boot environment written"
        );
        Ok(())
    }

    /// Drop `slot` from `BOOT_ORDER`, zero its counter, clear its trial mark.
    fn abandon(env: &mut UbootEnv, vars: &UbootVars, slot: SlotId) -> Result<(), UbootError> {
        let order: Vec<SlotId> = vars.order.iter().copied().filter(|&s| s != slot).collect();
        set_order(env, &order)?;
        env.set(&left_var(slot), "0")?;
        clear_trial_if(env, vars, slot);
        Ok(())
    }
}

impl BootControl for UbootBoot {
    fn backend(&self) -> &'static str {
        "uboot"
    }

    fn status(&mut self) -> Result<BootStatus, BootError> {
        let loc = self.store.describe();
        let cur = self.store.read().map_err(UbootError::from)?;
        let vars = UbootVars::from_env(&cur.env, &loc)?;
        let choice = choose(&mut cur.env.clone(), &loc)?;
        let slots = [SlotId::A, SlotId::B]
            .into_iter()
            .map(|slot| SlotStatus {
                slot,
                priority: match vars.order.iter().position(|&s| s == slot) {
                    Some(i) if vars.left(slot) > 0 => 2u8.saturating_sub(i as u8),
                    _ => 0,
                },
                tries: u8::try_from(vars.left(slot)).unwrap_or(u8::MAX),
                successful: vars.good(slot),
            })
            .collect();
        let order = vars.order_text();
        let reason = match choice.booted {
            Some(s) => format!(
                "{s} is the first slot in BOOT_ORDER=\"{order}\" with BOOT_{s}_LEFT={} > 0; the \
                 boot script decrements it and boots {s}{}",
                vars.left(s),
                if vars.trial == Some(s) {
                    " (a trial: not committed yet)"
                } else {
                    ""
                }
            ),
            None => format!(
                "no slot in BOOT_ORDER=\"{order}\" has attempts left: the boot script sets \
                 BOOT_A_LEFT and BOOT_B_LEFT to {SCRIPT_TRIES} and resets the board, then boots \
                 the first slot in BOOT_ORDER"
            ),
        };
        let next = match choice.booted {
            Some(s) => Some(s),
            None => vars.order.first().copied(),
        };
        Ok(BootStatus {
            backend: self.backend().to_string(),
            slots,
            next,
            reason,
        })
    }

    fn disable(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.modify("disable", |vars, env, loc| {
            let other = slot.other();
            require_good(
                vars,
                other,
                loc,
                &format!("disabling {slot} would leave no bootable slot"),
            )?;
            Self::abandon(env, vars, slot)?;
            require_reaches(env, other, loc, &format!("disabling {slot}"))
        })
    }

    fn stage(&mut self, slot: SlotId) -> Result<(), BootError> {
        let tries = u32::from(self.tries);
        self.modify("stage", |vars, env, loc| {
            let other = slot.other();
            require_good(
                vars,
                other,
                loc,
                &format!("staging {slot} would leave no fallback if its trial fails"),
            )?;
            set_order(env, &[slot, other])?;
            env.set(&left_var(slot), &format_left(tries))?;
            env.set(TRIAL_VAR, &slot.to_string())?;
            let next = choose(&mut env.clone(), loc)?.booted;
            if next != Some(slot) {
                return Err(refuse(
                    loc,
                    format!("after staging {slot} the boot script would boot {next:?}"),
                ));
            }
            // If the trial never reaches a commit, its attempts run out and `other` boots.
            let mut spent = env.clone();
            spent.set(&left_var(slot), "0")?;
            require_reaches(
                &spent,
                other,
                loc,
                &format!("staging {slot} (if its trial fails)"),
            )
        })
    }

    fn commit(&mut self, slot: SlotId) -> Result<(), BootError> {
        let tries = u32::from(self.tries);
        self.modify("commit", |vars, env, loc| {
            if !vars.order.contains(&slot) {
                return Err(refuse(
                    loc,
                    format!(
                        "slot {slot} is not in BOOT_ORDER=\"{}\": the boot script never boots it",
                        vars.order_text()
                    ),
                ));
            }
            env.set(&left_var(slot), &format_left(tries))?;
            clear_trial_if(env, vars, slot);
            Ok(())
        })
    }

    fn rollback(&mut self, to: SlotId) -> Result<(), BootError> {
        let tries = u32::from(self.tries);
        self.modify("rollback", |vars, env, loc| {
            require_good(vars, to, loc, "it is not a known-good rollback target")?;
            let from = to.other();
            Self::abandon(env, vars, from)?;
            set_order(env, &[to])?;
            env.set(&left_var(to), &format_left(tries))?;
            env.unset(TRIAL_VAR);
            require_reaches(env, to, loc, &format!("rolling back to {to}"))
        })
    }

    fn cancel(&mut self, slot: SlotId) -> Result<(), BootError> {
        self.modify("cancel", |vars, env, loc| {
            let other = slot.other();
            require_good(
                vars,
                other,
                loc,
                &format!("cancelling the stage of {slot} would leave no bootable slot"),
            )?;
            Self::abandon(env, vars, slot)?;
            require_reaches(env, other, loc, &format!("cancelling {slot}"))
        })
    }
}

/// RAUC's initial variables: `BOOT_ORDER` with `first` only (the other slot holds nothing
/// yet), `first` with `tries` attempts, the other with 0 (what a provisioning step writes).
pub fn initial_env(first: SlotId, tries: u8) -> Result<UbootEnv, UbootError> {
    let mut env = UbootEnv::new();
    env.set("BOOT_ORDER", &first.to_string())?;
    env.set(&left_var(first), &format_left(u32::from(tries)))?;
    env.set(&left_var(first.other()), "0")?;
    Ok(env)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn env(vars: &[(&str, &str)]) -> UbootEnv {
        let mut e = UbootEnv::new();
        for (n, v) in vars {
            e.set(n, v).unwrap();
        }
        e
    }

    #[test]
    fn script_defaults_decrement_and_reset() {
        let mut e = UbootEnv::new();
        let c = choose(&mut e, "mem").unwrap();
        assert_eq!(c.booted, Some(SlotId::A));
        assert_eq!(e.get("BOOT_ORDER"), Some("A B"));
        assert_eq!(e.get("BOOT_A_LEFT"), Some("2"));
        assert_eq!(e.get("BOOT_B_LEFT"), Some("3"));

        let mut e = env(&[
            ("BOOT_ORDER", "B A"),
            ("BOOT_A_LEFT", "0"),
            ("BOOT_B_LEFT", "0"),
        ]);
        let c = choose(&mut e, "mem").unwrap();
        assert_eq!(
            c,
            LoaderChoice {
                booted: None,
                reset_tries: true
            }
        );
        assert_eq!(e.get("BOOT_A_LEFT"), Some("3"));
        assert_eq!(choose(&mut e, "mem").unwrap().booted, Some(SlotId::B));

        // Unknown tokens are skipped; the countdown goes 9 -> 8.
        let mut e = env(&[
            ("BOOT_ORDER", "X A"),
            ("BOOT_A_LEFT", "9"),
            ("BOOT_B_LEFT", "0"),
        ]);
        assert_eq!(choose(&mut e, "mem").unwrap().booted, Some(SlotId::A));
        assert_eq!(e.get("BOOT_A_LEFT"), Some("8"));
        // Counters the script's one-digit table does not hold: refused, not guessed.
        for v in ["a", "10", "03", "0x3", " 3"] {
            let mut e = env(&[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", v)]);
            let err = choose(&mut e, "mem").unwrap_err();
            assert_eq!(err.kind(), "uboot_bad_value", "{v:?}");
        }
    }

    #[test]
    fn strict_decoding_names_the_variable() {
        let base = [
            ("BOOT_ORDER", "A B"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "3"),
        ];
        assert!(UbootVars::from_env(&env(&base), "m").is_ok());
        for (name, value, kind) in [
            ("BOOT_ORDER", "A C", "uboot_bad_value"),
            ("BOOT_ORDER", "A A", "uboot_bad_value"),
            ("BOOT_ORDER", " ", "uboot_bad_value"),
            ("BOOT_A_LEFT", "three", "uboot_bad_value"),
            ("BOOT_A_LEFT", "a", "uboot_bad_value"),
            ("BOOT_A_LEFT", "12", "uboot_bad_value"),
            ("BOOT_B_LEFT", "", "uboot_bad_value"),
        ] {
            let mut e = env(&base);
            e.set(name, value).unwrap();
            let err = UbootVars::from_env(&e, "m").unwrap_err();
            assert_eq!(err.kind(), kind, "{name}={value:?}");
            assert!(err.to_string().contains(name), "{err}");
        }
        for missing in ["BOOT_ORDER", "BOOT_A_LEFT", "BOOT_B_LEFT"] {
            let mut e = env(&base);
            e.unset(missing);
            let err = UbootVars::from_env(&e, "m").unwrap_err();
            assert_eq!(err.kind(), "uboot_missing_var");
            assert!(err.to_string().contains(missing), "{err}");
        }
    }
}

#[cfg(test)]
mod reach_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_spent_fallback_is_reached_after_the_scripts_reset() {
        let mut e = UbootEnv::new();
        e.set("BOOT_ORDER", "B A").unwrap();
        e.set("BOOT_A_LEFT", "0").unwrap();
        e.set("BOOT_B_LEFT", "0").unwrap();
        // Nothing left: reset (both 3), B's three attempts, then A.
        assert!(loader_reaches(&e, SlotId::A, "m").unwrap().is_ok());
        e.set("BOOT_ORDER", "B").unwrap();
        assert!(loader_reaches(&e, SlotId::A, "m").unwrap().is_err());
    }
}
