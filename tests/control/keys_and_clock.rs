//! Key files and clocks: key file shapes that must sign RS256 and shapes that must fail at
//! start-up naming the field; assertions accepted with the gateway's clock ±90 s off.

use crate::scenarios;

use scenarios as s;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_variants_all_sign_rs256() {
    s::key_variants_all_sign_rs256().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_fail_at_startup_naming_file_and_field() {
    s::bad_keys_fail_at_startup_naming_file_and_field().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assertions_accepted_with_clock_90s_ahead_or_behind() {
    s::assertions_accepted_with_clock_90s_ahead_or_behind().await;
}
