//! Arbitrary bytes as a trust root envelope or signed root payload: bootstrap and the N+1 update.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    updater_proto::fuzzing::fuzz_root(data);
});
