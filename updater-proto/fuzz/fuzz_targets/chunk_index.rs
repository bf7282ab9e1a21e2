//! Arbitrary bytes as a delta chunk index, against its declared or given signed sizes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    updater_proto::fuzzing::fuzz_chunk_index(data);
});
