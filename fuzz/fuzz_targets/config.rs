//! `Config::from_toml_str` on arbitrary text: must return Ok or Err, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        // No environment: every `${VAR}` is unset. No source path: relative paths stay relative.
        let _ = tokengate::config::Config::from_toml_str(text, None, &|_| None);
    }
});
