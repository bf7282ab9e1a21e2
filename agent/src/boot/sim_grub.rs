//! A simulator of RAUC's grub.cfg slot selection (`contrib/grub.conf`), operating on a real
//! environment block: load the env, pick a slot, count the attempt, `save_env A_TRY B_TRY`.
//!
//! With `max_tries = 1` this is RAUC's script step for step; with more tries the attempt
//! counter is incremented (up to `max_tries`) instead of being set to 1.

use super::grubenv::{try_var, EnvLocation, GrubEnv, GrubEnvError, RaucVars};
use super::SlotId;

/// What one simulated boot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimBoot {
    /// The slot booted, or `None` when GRUB fell through to its rescue entry.
    pub booted: Option<SlotId>,
    /// `true` when no slot qualified and the OK slots' attempt counters were reset.
    pub reset_tries: bool,
}

impl SimBoot {
    /// The kernel command line RAUC's menu entry passes (`rauc.slot=A|B`), or `None` for the
    /// rescue entry; feed it to [`super::grubenv::booted_slot_from_cmdline`].
    pub fn cmdline(&self) -> Option<String> {
        self.booted.map(|s| format!("rauc.slot={s}"))
    }
}

/// Run the script's logic on `env` in memory (the `save_env` is the caller's write).
pub fn choose(env: &mut GrubEnv, max_tries: u8, location: &str) -> Result<SimBoot, GrubEnvError> {
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
    Ok(SimBoot {
        booted,
        reset_tries,
    })
}

/// One power-on through GRUB: read the env at `location`, choose, write the counters back.
pub fn boot(location: &mut EnvLocation, max_tries: u8) -> Result<SimBoot, GrubEnvError> {
    let loc = location.describe();
    let mut env = location.read()?;
    let result = choose(&mut env, max_tries, &loc)?;
    location.write(&env)?;
    tracing::info!(location = %loc, booted = ?result.booted, reset = result.reset_tries, "simulated GRUB boot");
    Ok(result)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> GrubEnv {
        let mut e = GrubEnv::new();
        for (k, v) in pairs {
            e.set(k, v).unwrap();
        }
        e
    }

    #[test]
    fn rauc_script_semantics_with_one_try() {
        let mut e = env(&[("ORDER", "B A"), ("A_OK", "1"), ("B_OK", "1")]);
        assert_eq!(choose(&mut e, 1, "m").unwrap().booted, Some(SlotId::B));
        assert_eq!(e.get("B_TRY"), Some("1"));
        assert_eq!(e.get("A_TRY"), Some("0"));
        // B never marked good: A boots, and both counters are now 1 (as RAUC's script does).
        assert_eq!(choose(&mut e, 1, "m").unwrap().booted, Some(SlotId::A));
        assert_eq!((e.get("A_TRY"), e.get("B_TRY")), (Some("1"), Some("1")));
        // Nobody marked A good either: rescue, counters of OK slots reset.
        let r = choose(&mut e, 1, "m").unwrap();
        assert_eq!(
            r,
            SimBoot {
                booted: None,
                reset_tries: true
            }
        );
        assert_eq!((e.get("A_TRY"), e.get("B_TRY")), (Some("0"), Some("0")));
    }

    #[test]
    fn missing_variables_use_script_defaults() {
        let mut e = GrubEnv::new();
        assert_eq!(choose(&mut e, 1, "m").unwrap().booted, None);
        assert_eq!(e.get("A_TRY"), Some("1"));
    }
}
