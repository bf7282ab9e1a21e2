//! Arbitrary bytes as a manifest's hex SHA-256 digest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    updater_proto::fuzzing::fuzz_digest(data);
});
