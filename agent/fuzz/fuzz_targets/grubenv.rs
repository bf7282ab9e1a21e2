//! A GRUB environment block from disk: the parser never panics, whatever it accepts
//! serialises back to the same bytes' meaning, and the loader simulator and the RAUC
//! variable decoder run on it without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use update_agent::boot::grubenv::{GrubEnv, RaucVars, ENV_BLOCK_SIZE, ENV_HEADER};
use update_agent_sandbox::sim_grub;

fuzz_target!(|data: &[u8]| {
    // Inputs without the header and an odd first byte get it in place of that byte, so mutation reaches the variable lines.
    let mut block =
        if !data.starts_with(ENV_HEADER.as_bytes()) && data.first().is_some_and(|b| b & 1 == 1) {
            let mut b = ENV_HEADER.as_bytes().to_vec();
            b.extend_from_slice(&data[1..]);
            b
        } else {
            data.to_vec()
        };
    if block.len() < ENV_BLOCK_SIZE && block.len() > ENV_HEADER.len() {
        block.resize(ENV_BLOCK_SIZE, b'#');
    }
    let Ok(mut env) = GrubEnv::parse(&block, "fuzz") else {
        return;
    };
    let again = env.to_block("fuzz").expect("a parsed block fits its block");
    assert_eq!(GrubEnv::parse(&again, "fuzz").expect("re-parse"), env);
    let _ = RaucVars::from_env(&env, "fuzz").map(|v| v.next_boot(3));
    for tries in [1, 3] {
        let _ = sim_grub::choose(&mut env, tries, "fuzz");
    }
});
