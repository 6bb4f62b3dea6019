//! No secret in any log line (docs/security.md "Secrets in logs, errors and metrics"): every log
//! line written while the token lifecycle, upstream 401, key file, discovery and per-user token
//! scenarios of `tests/support/scenarios/` run — tokengate's own events at `trace`, the dependencies'
//! (pingora's `log` records through tracing-log, reqwest, hyper) at `debug`, except
//! `pingora_proxy`, whose debug events dump raw message bodies, at `info` — is captured, and none
//! contains a client secret, private key material, an assertion or an access token.
//!
//! A global subscriber is process-wide, so this binary has exactly one test, which installs the
//! capturing subscriber, drives the scenarios itself and checks the capture last.

#[path = "support/common.rs"]
mod common;
#[path = "support/scenarios/mod.rs"]
mod scenarios;

use scenarios::{self as s, Seen};
use tokengate_sandbox::{basic_authorization, form_encode, keys};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_token_key_or_assertion_in_any_log_line() {
    let capture = common::LogCapture::default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            // pingora_proxy's debug events dump raw message bodies (the echo API echoes the
            // request headers, token included, in its body); the gateway never runs it at debug
            // (it caps pingora's targets at `info` whatever `log.level` says).
            "debug,tokengate=trace,pingora_proxy=info",
        ))
        .with_writer(capture.clone())
        .with_ansi(false)
        .try_init()
        .expect("the only subscriber in this binary (also bridges `log` records)");

    // Two lanes, each running its scenarios one after another: timing assertions stay
    // meaningful on a loaded 2-core machine, and the whole run takes about a minute.
    let lane_a = async {
        let mut seen = Seen::default();
        seen.extend(s::outage_serves_cached_token_then_503_then_recovers().await);
        seen.extend(s::short_tokens_renew_ahead_of_expiry_without_looping().await);
        seen.extend(s::retry_after_429_is_honoured_and_valid_token_kept().await);
        seen.extend(s::hanging_token_endpoint_times_out_and_waiters_get_503().await);
        seen.extend(s::cold_start_200_requests_share_one_fetch().await);
        seen.extend(s::cold_start_failure_fails_all_together_then_backs_off().await);
        seen.extend(s::requests_during_backoff_get_503_at_once().await);
        seen
    };
    let lane_b = async {
        let mut seen = Seen::default();
        seen.extend(s::expires_in_string_and_content_type_parameters().await);
        seen.extend(s::missing_expires_in_uses_jwt_exp_else_default_lifetime().await);
        seen.extend(s::token_type_any_case_or_absent_and_dpop_refused().await);
        seen.extend(s::unknown_members_are_ignored().await);
        seen.extend(s::failed_fetches_are_classified_and_backed_off().await);
        seen.extend(s::absurd_expires_in_is_clamped_and_idle_gateway_sends_fresh_token().await);
        seen.extend(s::fetch_in_flight_cannot_restore_a_dropped_token().await);
        seen.extend(s::large_chunked_post_is_not_replayed_and_next_request_uses_new_token().await);
        seen.extend(s::upstream_that_keeps_refusing_gets_no_loop().await);
        seen.extend(s::key_variants_all_sign_rs256().await);
        seen.extend(s::bad_keys_fail_at_startup_naming_file_and_field().await);
        seen.extend(s::assertions_accepted_with_clock_90s_ahead_or_behind().await);
        seen.extend(s::discovery_rfc8414_first_and_cached().await);
        seen.extend(s::discovery_falls_back_to_openid_configuration().await);
        seen.extend(s::discovery_rejects_issuer_mismatch().await);
        seen.extend(s::discovery_hang_is_bounded_by_token_timeout().await);
        seen.extend(s::per_user_tokens_on_both_listeners_with_a_401_and_a_refused_user().await);
        seen
    };
    let (mut seen, b) = tokio::join!(lane_a, lane_b);
    seen.extend(b);

    // Credentials in the shapes they travel in, too.
    let mut secrets = seen.0;
    secrets.insert(basic_authorization(
        keys::DRIFTROCK_CLIENT_ID,
        keys::DRIFTROCK_CLIENT_SECRET,
    ));
    secrets.insert(tokengate::oauth::client_credentials::basic_authorization(
        keys::DRIFTROCK_CLIENT_ID,
        &tokengate::config::Secret::new(keys::DRIFTROCK_CLIENT_SECRET),
        tokengate::config::BasicEncoding::Form,
    ));
    secrets.insert(form_encode(keys::DRIFTROCK_CLIENT_SECRET));
    secrets.insert(tokengate::oauth::client_credentials::percent_encode(
        keys::DRIFTROCK_CLIENT_SECRET,
    ));
    secrets.insert(form_encode(keys::DRILLSTER_CLIENT_SECRET));
    secrets.insert("PRIVATE KEY-----".into());
    let tokens = secrets.iter().filter(|s| s.len() > 40).count();
    assert!(
        tokens > 100,
        "only {tokens} tokens and assertions collected"
    );

    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    let lines = logs.lines().count();
    assert!(lines > 500, "only {lines} log lines captured");
    // The logs are useful: failures are logged with the server's error and description.
    for expected in [
        "token request failed",
        "unauthorized_client",
        "client not allowed to use this grant",
        "access token obtained",
        "per-user access token obtained",
    ] {
        assert!(logs.contains(expected), "no log line mentions {expected:?}");
    }
    for secret in &secrets {
        if let Some(line) = logs.lines().find(|l| l.contains(secret.as_str())) {
            let shown: String = secret.chars().take(12).collect();
            panic!("a log line contains a secret ({shown}…): {line}");
        }
    }
    eprintln!(
        "checked {lines} log lines ({} bytes) against {} secrets",
        logs.len(),
        secrets.len()
    );
}
