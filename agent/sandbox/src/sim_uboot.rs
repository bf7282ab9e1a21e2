//! A simulator of U-Boot running RAUC's boot script (`docs/uboot/boot.cmd`) on a real
//! environment store: read the valid copy as U-Boot's `env_import_redund` does, run the
//! backend's own [`choose`] (the rule `status` reports, so the two cannot disagree), and
//! `saveenv` the way U-Boot does (the other copy of a redundant pair, next flag). When no
//! slot qualifies the script resets the counters and the board; the simulator runs the
//! script again on the next "power-on", up to a bound.

use update_agent::boot::uboot::{choose, UbootError};
use update_agent::boot::ubootenv::EnvStore;
use update_agent::boot::SlotId;

/// What one power-on did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimBoot {
    /// The slot booted (`None`: the script reset the board every time, up to the bound).
    pub booted: Option<SlotId>,
    /// Board resets by the script before it booted.
    pub resets: u32,
}

/// Script runs per power-on before the simulator gives up (a reset always makes a slot in
/// `BOOT_ORDER` bootable, so two runs suffice unless `BOOT_ORDER` names no slot).
const MAX_RUNS: u32 = 4;

/// One power-on through U-Boot and the boot script over `store`.
pub fn boot(store: &mut EnvStore) -> Result<SimBoot, UbootError> {
    let loc = store.describe();
    let mut resets = 0;
    for _ in 0..MAX_RUNS {
        let cur = store.read()?;
        let mut env = cur.env.clone();
        let choice = choose(&mut env, &loc)?;
        // saveenv, in both branches of the script.
        store.write(&env, &cur)?;
        tracing::info!(booted = ?choice.booted, reset = choice.reset_tries, "simulated U-Boot boot script");
        if let Some(slot) = choice.booted {
            return Ok(SimBoot {
                booted: Some(slot),
                resets,
            });
        }
        resets += 1;
    }
    Ok(SimBoot {
        booted: None,
        resets,
    })
}
