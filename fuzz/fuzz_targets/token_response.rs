//! `parse_token_response` on arbitrary bytes (an RFC 6749 §5.1/§5.2 token endpoint body).
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let _ = tokengate::oauth::token_response::parse_token_response(
        data,
        now,
        Duration::from_secs(3600),
        &["client-secret", "eyJhbGciOiJSUzI1NiJ9.assertion"],
    );
});
