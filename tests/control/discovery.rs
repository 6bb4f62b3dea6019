//! Token endpoint discovery: `issuer = "…"` instead of `token_endpoint` — RFC 8414 metadata
//! first, then OpenID Connect discovery; a mismatching `issuer` is refused; the result is cached;
//! discovery runs within the token timeout.

use crate::scenarios;

use scenarios as s;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discovery_rfc8414_first_and_cached() {
    s::discovery_rfc8414_first_and_cached().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discovery_falls_back_to_openid_configuration() {
    s::discovery_falls_back_to_openid_configuration().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discovery_rejects_issuer_mismatch() {
    s::discovery_rejects_issuer_mismatch().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discovery_hang_is_bounded_by_token_timeout() {
    s::discovery_hang_is_bounded_by_token_timeout().await;
}
