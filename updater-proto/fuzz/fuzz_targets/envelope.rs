//! Arbitrary bytes as a whole signed envelope through `updater_proto::verify`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    updater_proto::fuzzing::fuzz_envelope(data);
});
