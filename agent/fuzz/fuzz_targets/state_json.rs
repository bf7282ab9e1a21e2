//! The JSON records the agent reads from its state directory: `state.json`, `resume.json`
//! and `health.json`. Parsing never panics, and whatever parses writes back to a record that
//! parses to the same value (the state record keeps unknown fields), floats aside.
#![no_main]
use libfuzzer_sys::fuzz_target;
use update_agent::health::journal::Journal;
use update_agent::install::ResumeRecord;
use update_agent::state::State;

fn round_trip<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = serde_json::from_slice::<T>(data) {
        let bytes = serde_json::to_vec_pretty(&v).expect("serialise");
        let back: T = serde_json::from_slice(&bytes).expect("re-parse what we wrote");
        // serde_json's default float parsing is not exact: compare only float-free records.
        if !bytes.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
            assert_eq!(back, v);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match data.first().map(|b| b % 3) {
        Some(0) => round_trip::<State>(&data[1..]),
        Some(1) => round_trip::<Vec<ResumeRecord>>(&data[1..]),
        Some(_) => round_trip::<Journal>(&data[1..]),
        None => {}
    }
});
