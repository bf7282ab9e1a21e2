//! `Content-Range` and `ETag` values from an untrusted server: never a panic, and an
//! accepted range is consistent (`start < total`) and its numbers are the ones written.
#![no_main]
use libfuzzer_sys::fuzz_target;
use update_agent::fetch::{parse_content_range_value, strong_etag_value};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((start, total)) = parse_content_range_value(s) {
        assert!(start < total, "{s:?}");
        assert!(s.contains(&start.to_string()) && s.contains(&total.to_string()));
    }
    if let Some(tag) = strong_etag_value(s) {
        assert!(tag.starts_with('"') && s.contains(&tag));
    }
});
