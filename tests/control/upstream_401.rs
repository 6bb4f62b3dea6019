//! Upstream 401 to a current token (RFC 6750 §3.1 `invalid_token`): only that token generation
//! is dropped, one refresh is shared, the request is replayed once if replayable, never looped.

use crate::common;

use common::{config_for, TestGateway};
use http::StatusCode;
use sha2::{Digest, Sha256};
use tokengate_sandbox::{CannedResponse, Echo, Sandbox};

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

const REPLAYED: &str =
    "tokengate_upstream_unauthorized_total{action=\"replayed\",route=\"drillster\"}";
const PASSED: &str =
    "tokengate_upstream_unauthorized_total{action=\"passed_through\",route=\"drillster\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_token_is_dropped_refreshed_once_and_requests_replayed() {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    let client = reqwest::Client::new();
    let first: Echo = client
        .get(gw.url("/drillster/a"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sandbox.drillster.successes(), 1);

    // The API now refuses the not-yet-expired token (as after a key rotation upstream).
    sandbox.registry.revoke_all();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (client, url) = (client.clone(), gw.url("/drillster/b"));
            tokio::spawn(async move { client.get(url).send().await.unwrap() })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status(), 200);
        let echo: Echo = r.json().await.unwrap();
        assert_ne!(echo.header("authorization"), first.header("authorization"));
    }
    assert_eq!(
        sandbox.drillster.successes(),
        2,
        "exactly one refresh for all 20 requests"
    );
    let m = gw.metrics().await;
    assert!(metric(&m, REPLAYED) >= 1, "{m}");
    assert_eq!(metric(&m, PASSED), 0);
    // The other route's token was not touched.
    assert_eq!(sandbox.driftrock.successes(), 1);
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_and_small_post_are_replayed_byte_identical() {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    let client = reqwest::Client::new();

    sandbox.registry.revoke_all();
    let echo: Echo = client
        .get(gw.url("/drillster/items?page=2"))
        .header("X-Trace", "t1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (echo.method.as_str(), echo.path.as_str()),
        ("GET", "/items")
    );
    assert_eq!(echo.query.as_deref(), Some("page=2"));
    assert_eq!(echo.header("x-trace"), Some("t1"));

    sandbox.registry.revoke_all();
    let body: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    let r = client
        .post(gw.url("/drillster/upload"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Echo = r.json().await.unwrap();
    assert_eq!(echo.body_len, 2000);
    assert_eq!(echo.body_sha256, hex(&Sha256::digest(&body)));
    assert_eq!(sandbox.drillster.successes(), 3);
    let m = gw.metrics().await;
    assert_eq!(metric(&m, REPLAYED), 2);
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

/// A path the account may not use is refused whatever the token. Fifty
/// requests to it cost one token request, not fifty, and every one gets the API's 401, on
/// either proxy path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_always_refused_request_does_not_refetch_the_token_each_time() {
    let (sandbox, gw) = gateway_before_an_api_that_refuses_everything().await;
    let client = reqwest::Client::new();
    for i in 0..50 {
        let mut req = client.get(gw.url("/drillster/forbidden"));
        if i % 2 == 0 {
            // A Connection-named field sends the request through pingora-proxy: the first
            // refusal is seen there, the hold is honoured on both paths.
            req = req.header("connection", "x-legacy").header("x-legacy", "1");
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(
            r.headers().get("tokengate-error").is_none(),
            "the API's own 401"
        );
    }
    assert_eq!(
        sandbox.drillster.successes(),
        2,
        "the first fetch and one refresh"
    );
    assert_eq!(
        sandbox.api.requests(),
        51,
        "one replay, for the first request only"
    );
    let m = gw.metrics().await;
    assert_eq!(metric(&m, REPLAYED), 1);
    assert_eq!(metric(&m, PASSED), 50);
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

/// The same for requests that cannot be replayed (a body over `replay_body_limit`): no replay
/// can tell, so a token that replaced a refused one and is refused at once is held. Twenty
/// such requests cost one token request, not twenty.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn always_refused_unreplayable_requests_do_not_refetch_the_token_each_time() {
    let (sandbox, gw) = gateway_before_an_api_that_refuses_everything().await;
    let client = reqwest::Client::new();
    let body = vec![b'x'; 70_000];
    for _ in 0..20 {
        let r = client
            .post(gw.url("/drillster/upload"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers().get("tokengate-error").is_none());
    }
    assert_eq!(
        sandbox.drillster.successes(),
        2,
        "the first fetch and one refresh"
    );
    assert_eq!(sandbox.api.requests(), 20, "never replayed");
    let m = gw.metrics().await;
    assert_eq!(metric(&m, REPLAYED), 0);
    assert_eq!(metric(&m, PASSED), 20);
    // The held token is the current one: what the API accepts is served with it.
    sandbox.api.faults().clear_response();
    let r = client.get(gw.url("/drillster/ok")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sandbox.drillster.successes(), 2);
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

/// A ready gateway in front of a sandbox whose API answers every request 401 `invalid_token`.
async fn gateway_before_an_api_that_refuses_everything() -> (Sandbox, TestGateway) {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    sandbox.api.faults().respond_with(CannedResponse::json(
        StatusCode::UNAUTHORIZED,
        r#"{"error":"invalid_token"}"#,
    ));
    (sandbox, gw)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

use crate::scenarios;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fetch_in_flight_cannot_restore_a_dropped_token() {
    scenarios::fetch_in_flight_cannot_restore_a_dropped_token().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_chunked_post_is_not_replayed_and_next_request_uses_new_token() {
    scenarios::large_chunked_post_is_not_replayed_and_next_request_uses_new_token().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_that_keeps_refusing_gets_no_loop() {
    scenarios::upstream_that_keeps_refusing_gets_no_loop().await;
}
