//! A simulator of RAUC's grub.cfg slot selection (`contrib/grub.conf`), operating on a real
//! environment block: load the env, pick a slot, count the attempt, `save_env A_TRY B_TRY`.
//!
//! With `max_tries = 1` this is RAUC's script step for step; with more tries the attempt
//! counter is incremented (up to `max_tries`) instead of being set to 1.

//! The choice rule itself is the backend's (`update_agent::boot::grubenv::choose`): the
//! simulator only adds the read and the `save_env` around it.

pub use update_agent::boot::grubenv::{choose, LoaderChoice as SimBoot};
use update_agent::boot::grubenv::{EnvLocation, GrubEnvError};

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
    use update_agent::boot::grubenv::GrubEnv;
    use update_agent::boot::SlotId;

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
