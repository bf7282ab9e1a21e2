//! Arbitrary bytes as a manifest payload, signed by the trusted fuzz key, through `verify`:
//! reaches the schema-version, schema and policy checks behind the signature.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    updater_proto::fuzzing::fuzz_signed_payload(data);
});
