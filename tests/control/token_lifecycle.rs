//! Token lifecycle under real-world failure: token responses parsed leniently, failed fetches
//! classified and backed off, outages, timeouts, Retry-After, single flight, short tokens, with
//! readiness and gauges checked during outages — against the sandbox servers with their fault knobs
//! (scenarios in `tests/support/scenarios/`).

use crate::scenarios;

use scenarios as s;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expires_in_string_and_content_type_parameters() {
    s::expires_in_string_and_content_type_parameters().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_expires_in_uses_jwt_exp_else_default_lifetime() {
    s::missing_expires_in_uses_jwt_exp_else_default_lifetime().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_type_any_case_or_absent_and_dpop_refused() {
    s::token_type_any_case_or_absent_and_dpop_refused().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_members_are_ignored() {
    s::unknown_members_are_ignored().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_fetches_are_classified_and_backed_off() {
    s::failed_fetches_are_classified_and_backed_off().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn absurd_expires_in_is_clamped_and_idle_gateway_sends_fresh_token() {
    s::absurd_expires_in_is_clamped_and_idle_gateway_sends_fresh_token().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_serves_cached_token_then_503_then_recovers() {
    s::outage_serves_cached_token_then_503_then_recovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hanging_token_endpoint_times_out_and_waiters_get_503() {
    s::hanging_token_endpoint_times_out_and_waiters_get_503().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_429_is_honoured_and_valid_token_kept() {
    s::retry_after_429_is_honoured_and_valid_token_kept().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_start_200_requests_share_one_fetch() {
    s::cold_start_200_requests_share_one_fetch().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_start_failure_fails_all_together_then_backs_off() {
    s::cold_start_failure_fails_all_together_then_backs_off().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_during_backoff_get_503_at_once() {
    s::requests_during_backoff_get_503_at_once().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_tokens_renew_ahead_of_expiry_without_looping() {
    s::short_tokens_renew_ahead_of_expiry_without_looping().await;
}
