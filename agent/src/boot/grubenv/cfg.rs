//! grub.cfg generation: the slot-selection script that reads the variables the backend writes.

use super::{GrubEnvError, MAX_TRIES_LIMIT};

/// The slot-selection part of grub.cfg for `max_tries` attempts, in RAUC's style: it expects
/// menu entries in the order rescue (0), slot A (1), slot B (2), and leaves the choice in
/// `default`. With `max_tries = 1` it behaves exactly as RAUC's shipped `contrib/grub.conf`;
/// for more tries GRUB has no arithmetic, so the attempt counter climbs a ladder.
/// `update_agent_sandbox::sim_grub` implements the same logic; the tests run this text against it.
pub fn grub_cfg_selection(max_tries: u8) -> Result<String, GrubEnvError> {
    if max_tries == 0 || max_tries > MAX_TRIES_LIMIT {
        return Err(GrubEnvError::Setting(format!(
            "tries = {max_tries}: must be 1..={MAX_TRIES_LIMIT}"
        )));
    }
    let ladder = |slot: char| -> String {
        let var = format!("{slot}_TRY");
        if max_tries == 1 {
            return format!("{var}=1");
        }
        let mut out = String::new();
        for n in 0..max_tries - 1 {
            let kw = if n == 0 { "if" } else { "elif" };
            out.push_str(&format!(
                "{kw} [ \"${var}\" -eq {n} ]; then {var}={}; ",
                n + 1
            ));
        }
        out.push_str(&format!("else {var}={max_tries}; fi"));
        out
    };
    Ok(format!(
        r#"# update-agent / RAUC slot selection: boot the first slot in ORDER with X_OK=1 and
# X_TRY < {max_tries}, counting the attempt first; nothing bootable: rescue, and reset X_TRY.
default=0
set ORDER="A B"
set A_OK=0
set B_OK=0
set A_TRY=0
set B_TRY=0
load_env

for SLOT in $ORDER; do
    if [ "$SLOT" == "A" ]; then
        INDEX=1
        OK=$A_OK
        TRY=$A_TRY
        {ladder_a}
    fi
    if [ "$SLOT" == "B" ]; then
        INDEX=2
        OK=$B_OK
        TRY=$B_TRY
        {ladder_b}
    fi
    if [ "$OK" -eq 1 -a "$TRY" -lt {max_tries} ]; then
        default=$INDEX
        break
    fi
done

if [ "$default" -eq 0 ]; then
    if [ "$A_OK" -eq 1 -a "$A_TRY" -ge {max_tries} ]; then
        A_TRY=0
    fi
    if [ "$B_OK" -eq 1 -a "$B_TRY" -ge {max_tries} ]; then
        B_TRY=0
    fi
fi

save_env A_TRY B_TRY
"#,
        ladder_a = ladder('A'),
        ladder_b = ladder('B'),
    ))
}
