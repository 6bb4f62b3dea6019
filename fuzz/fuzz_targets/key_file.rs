//! `ServiceAccountKey::from_json` on arbitrary text (a Drillster service-account key file).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tokengate::oauth::key_file::ServiceAccountKey::from_json(text);
    }
});
