//! Token lifecycle scenarios under real-world failure (docs/token-lifecycle.md), each against the
//! sandbox servers with their fault knobs. Every scenario is an `async fn` that panics on a failed
//! assertion and returns the secrets it saw (client secrets, assertions, access tokens), so that
//! `tests/log_hygiene.rs` can drive them all under one capturing subscriber and check the logs. The
//! thin `#[tokio::test]` wrappers live in `token_lifecycle.rs`, `discovery.rs`, `keys_and_clock.rs`
//! and `upstream_401.rs`.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokengate::config::Config;
use tokengate::metrics::Metrics;
use tokengate::oauth::TokenClient;
use tokengate::token::{RenewalPolicy, TokenSource};
use tokengate_sandbox::{keys, AuthServer, CannedResponse, Echo, JsonField, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use crate::common::eventually;
use crate::common::{config_for, free_addr, TestGateway};

/// Secrets a scenario handled; none may appear in any log line.
#[derive(Debug, Default)]
pub struct Seen(pub BTreeSet<String>);

impl Seen {
    /// Client secrets, the demo private key's base64 lines, and every token and assertion the
    /// sandbox's servers issued or received.
    pub fn from_sandbox(sandbox: &Sandbox) -> Seen {
        let mut seen = Seen::default();
        seen.add_auth_server(&sandbox.drillster);
        seen.add_auth_server(&sandbox.driftrock);
        seen
    }

    /// The secrets of one authorization server (tokens it issued, assertions it received).
    pub fn add_auth_server(&mut self, server: &AuthServer) {
        self.0.insert(keys::DRILLSTER_CLIENT_SECRET.to_string());
        self.0.insert(keys::DRIFTROCK_CLIENT_SECRET.to_string());
        for line in keys::DEMO_PRIVATE_PEM
            .lines()
            .filter(|l| !l.starts_with("-----"))
        {
            if line.len() >= 16 {
                self.0.insert(line.trim().to_string());
            }
        }
        self.0.extend(server.registry().issued_tokens());
        for r in server.recent_requests() {
            if let Some(a) = r.param("assertion") {
                self.0.insert(a.to_string());
                // The signature alone is secret enough to check for too.
                if let Some(sig) = a.rsplit('.').next() {
                    self.0.insert(sig.to_string());
                }
            }
        }
    }

    pub fn extend(&mut self, other: Seen) {
        self.0.extend(other.0);
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

/// Inserts `extra` lines into the `[routes.auth]` table of route `drillster` or `driftrock` of
/// the demo config.
pub fn with_auth(toml: String, route: &str, extra: &str) -> String {
    let anchor = match route {
        "drillster" => "grant = \"jwt_bearer\"\n",
        _ => "grant = \"client_credentials\"\n",
    };
    toml.replacen(anchor, &format!("{anchor}{extra}\n"), 1)
}

/// `GET gw + path` → (status, headers, body).
pub async fn get(gw: &TestGateway, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::get(gw.url(path)).await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.expect("body"))
}

/// The `Authorization` the upstream saw for `GET path`, asserting a 200.
pub async fn upstream_auth(gw: &TestGateway, path: &str) -> String {
    let (status, _, body) = get(gw, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    let echo: Echo = serde_json::from_str(&body).expect("echo");
    assert_eq!(echo.authorization_count, 1);
    echo.header("authorization")
        .expect("authorization")
        .to_string()
}

/// `/status`'s `token` object of `route`.
pub async fn token_status(gw: &TestGateway, route: &str) -> Value {
    let v: Value = reqwest::get(format!("{}/status", gw.admin))
        .await
        .expect("status")
        .json()
        .await
        .expect("status JSON");
    v["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["name"] == route)
        .unwrap_or_else(|| panic!("no route {route} in {v}"))["token"]
        .clone()
}

/// `/readyz` → (status, body).
pub async fn readyz(gw: &TestGateway) -> (u16, Value) {
    let r = reqwest::get(format!("{}/readyz", gw.admin))
        .await
        .expect("readyz");
    (r.status().as_u16(), r.json().await.expect("readyz JSON"))
}

/// The value of a metric series (exact label set, as the exposition prints it), 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// Seconds from now until `/status`'s `expires_at` of `route`.
pub async fn expires_in(gw: &TestGateway, route: &str) -> f64 {
    let t = token_status(gw, route).await;
    t["expires_at"].as_f64().expect("expires_at") - unix_now()
}

/// The `exp` claim of a JWT access token.
pub fn jwt_exp(token: &str) -> f64 {
    let payload = token.split('.').nth(1).expect("JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice::<Value>(&bytes).expect("claims")["exp"]
        .as_f64()
        .expect("exp")
}

fn bearer(auth: &str) -> &str {
    auth.strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("not `Bearer <token>`: {auth:?}"))
}

const TOKEN_REQS: &str = "tokengate_token_requests_total";

fn outcome_series(route: &str, outcome: &str) -> String {
    format!("{TOKEN_REQS}{{outcome=\"{outcome}\",route=\"{route}\"}}")
}

async fn finish(gw: TestGateway, sandbox: Sandbox) -> Seen {
    gw.stop().await;
    let seen = Seen::from_sandbox(&sandbox);
    assert_eq!(sandbox.panics(), 0);
    sandbox.shutdown().await.expect("sandbox shutdown");
    seen
}

// ---------------------------------------------------------------------------------------------
// Token responses

/// `expires_in` as a numeric string is accepted (3600 s, not the token's own 7200 s `exp`);
/// both `application/json; charset=utf-8` and `application/json;charset=UTF-8` parse, and token
/// requests send `Accept: application/json`.
pub async fn expires_in_string_and_content_type_parameters() -> Seen {
    let sandbox = Sandbox::builder()
        .token_lifetime(Duration::from_secs(7200))
        .start()
        .await
        .unwrap();
    sandbox.driftrock.set_expires_in(JsonField::string("3600"));
    sandbox
        .driftrock
        .set_content_type(Some("application/json; charset=utf-8"));
    sandbox
        .drillster
        .set_content_type(Some("application/json;charset=UTF-8"));
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    upstream_auth(&gw, "/driftrock/x").await;
    upstream_auth(&gw, "/drillster/x").await;
    let left = expires_in(&gw, "driftrock").await;
    assert!((3590.0..=3601.0).contains(&left), "expires in {left} s");
    let left = expires_in(&gw, "drillster").await;
    assert!((7190.0..=7201.0).contains(&left), "expires in {left} s");
    for server in [&sandbox.drillster, &sandbox.driftrock] {
        let req = server.last_request().expect("token request");
        assert_eq!(req.header("accept"), Some("application/json"));
    }
    finish(gw, sandbox).await
}

/// Without `expires_in`, a JWT access token's `exp` sets the expiry; an opaque token gets
/// `default_token_lifetime`, and is fetched once per lifetime, not once per request (the
/// renewal schedule itself: `token::paused_clock_tests`).
pub async fn missing_expires_in_uses_jwt_exp_else_default_lifetime() -> Seen {
    let sandbox = Sandbox::builder()
        .token_lifetime(Duration::from_secs(7200))
        .start()
        .await
        .unwrap();
    sandbox.drillster.set_expires_in(JsonField::Absent);
    sandbox.driftrock.set_expires_in(JsonField::Absent);
    sandbox.driftrock.set_opaque_tokens(true);
    let gw = TestGateway::start(config_for(&sandbox, |t| {
        with_auth(t, "driftrock", "default_token_lifetime = \"60s\"")
    }))
    .await;
    gw.ready().await;

    let auth = upstream_auth(&gw, "/drillster/x").await;
    let exp = jwt_exp(bearer(&auth));
    let status = token_status(&gw, "drillster").await;
    let expires_at = status["expires_at"].as_f64().unwrap();
    assert!(
        (expires_at - exp).abs() <= 1.0,
        "expiry {expires_at} is the token's exp {exp}"
    );

    let auth = upstream_auth(&gw, "/driftrock/x").await;
    assert!(!bearer(&auth).contains('.'), "opaque token");
    // The 60 s default from when it arrived (whole seconds in /status), not 300 s or the
    // server's 7200 s.
    let status = token_status(&gw, "driftrock").await;
    let lifetime =
        status["expires_at"].as_u64().unwrap() - status["last_refresh"].as_u64().unwrap();
    assert!(
        (59..=60).contains(&lifetime),
        "lifetime {lifetime} s: {status}"
    );
    // Requests carry the token; none of them asks for another (the renewal is due in 43–48 s).
    let before = sandbox.driftrock.successes();
    for _ in 0..40 {
        assert_eq!(upstream_auth(&gw, "/driftrock/y").await, auth);
    }
    assert_eq!(
        sandbox.driftrock.successes(),
        before,
        "a token request per request"
    );
    finish(gw, sandbox).await
}

/// `token_type` "bearer", "BEARER" or absent → the upstream sees `Authorization: Bearer x`;
/// "DPoP" is refused with a clear error (and never sent).
pub async fn token_type_any_case_or_absent_and_dpop_refused() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox
        .drillster
        .set_token_type(JsonField::string("bearer"));
    sandbox
        .driftrock
        .set_token_type(JsonField::string("BEARER"));
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    for path in ["/drillster/x", "/driftrock/x"] {
        let auth = upstream_auth(&gw, path).await;
        assert!(auth.starts_with("Bearer ") && auth.len() > 20, "{auth}");
    }
    // Absent: the next token (after the API refuses the current one) has no token_type.
    sandbox.drillster.set_token_type(JsonField::Absent);
    let before = upstream_auth(&gw, "/drillster/x").await;
    sandbox.registry.revoke_all();
    let after = upstream_auth(&gw, "/drillster/x").await;
    assert_ne!(before, after);
    assert!(after.starts_with("Bearer "));
    let last = sandbox.drillster.last_request().unwrap();
    assert_eq!(last.method, "POST");

    // DPoP: refused; the request that needed a new token gets 503, never a DPoP token sent as
    // Bearer.
    sandbox.driftrock.set_token_type(JsonField::string("DPoP"));
    sandbox.registry.revoke_all();
    let api_before = sandbox.api.accepted();
    let (status, headers, _) = get(&gw, "/driftrock/x").await;
    assert_eq!(status, 503);
    assert_eq!(headers["tokengate-error"], "token_unavailable");
    assert_eq!(sandbox.api.accepted(), api_before);
    let t = token_status(&gw, "driftrock").await;
    let err = t["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("token_type \"DPoP\" is not supported") && err.contains("Bearer"),
        "{err}"
    );
    let m = gw.metrics().await;
    assert!(metric(&m, &outcome_series("driftrock", "invalid_response")) >= 1.0);
    finish(gw, sandbox).await
}

/// Unknown members (`ext_expires_in`, `refresh_token`, `id_token`, nested objects) are
/// ignored — including an `expires_in` nested inside them.
pub async fn unknown_members_are_ignored() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    let extra = r#""ext_expires_in":7200,"refresh_token":"rt-ignored","id_token":"it-ignored","nested":{"a":[1,{"b":null}],"expires_in":1}"#;
    sandbox.drillster.set_extra_members(Some(extra));
    sandbox.driftrock.set_extra_members(Some(extra));
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    for route in ["drillster", "driftrock"] {
        upstream_auth(&gw, &format!("/{route}/x")).await;
        let left = expires_in(&gw, route).await;
        assert!((3590.0..=3601.0).contains(&left), "{route}: {left} s");
    }
    finish(gw, sandbox).await
}

/// Six kinds of failed fetch, each counted with the right `outcome`, described with the
/// server's `error`/`error_description`, and retried with exponential backoff (its lower bounds
/// checked on the request arrival times at the sandbox) — then the token arrives.
pub async fn failed_fetches_are_classified_and_backed_off() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    let config = config_for(&sandbox, |t| t);
    let auth = config.routes[1].auth.clone();
    assert_eq!(auth.grant.name(), "client_credentials");
    let html = "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>";
    let script = [
        (
            CannedResponse::json(StatusCode::OK, r#"{"error":"invalid_client"}"#),
            "oauth_error",
            "HTTP 200: token endpoint returned error \"invalid_client\"",
        ),
        (
            CannedResponse::json(StatusCode::OK, r#"{"access_token":"","expires_in":0}"#),
            "invalid_response",
            "no usable access_token",
        ),
        (
            CannedResponse::html(StatusCode::BAD_GATEWAY, html),
            "http_error",
            "HTTP 502 Bad Gateway: token response is not a JSON object (65 bytes, HTML)",
        ),
        (
            CannedResponse::json(StatusCode::OK, html),
            "invalid_response",
            "HTTP 200: token response is not a JSON object (65 bytes, HTML)",
        ),
        (
            CannedResponse::oauth_error(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                "client not allowed to use this grant",
            ),
            "oauth_error",
            "HTTP 400: token endpoint returned error \"unauthorized_client\": client not allowed to use this grant",
        ),
        (
            CannedResponse::new(StatusCode::UNAUTHORIZED),
            "http_error",
            "HTTP 401 Unauthorized: token response is not a JSON object (0 bytes, empty)",
        ),
    ];
    sandbox
        .driftrock
        .faults()
        .respond_with_sequence(script.iter().map(|(c, _, _)| c.clone()));
    let client =
        TokenClient::new(auth, None, Duration::from_secs(2), Duration::from_secs(5)).unwrap();
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let client = Recording {
        inner: client,
        results: Arc::clone(&results),
    };
    let metrics = Metrics::new();
    let policy = RenewalPolicy {
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_millis(1600),
        max_wait: Duration::from_secs(5),
        ..RenewalPolicy::default()
    };
    let source = TokenSource::new(
        "driftrock",
        Box::new(client),
        policy,
        metrics.token("driftrock"),
    );
    let refresher = source.spawn_refresher(&tokio::runtime::Handle::current());
    eventually(Duration::from_secs(15), "token after the failures", || {
        let ok = source.status().usable;
        async move { ok }
    })
    .await;
    refresher.abort();

    let results = results.lock().unwrap().clone();
    assert_eq!(results.len(), script.len() + 1, "{results:?}");
    for ((_, outcome, want), got) in script.iter().zip(&results) {
        let (got_outcome, got_message) = got.as_ref().expect_err("a failure");
        assert_eq!(got_outcome, outcome, "{got_message}");
        assert!(
            got_message.contains(want),
            "{got_message:?} should contain {want:?}"
        );
    }
    assert!(results[script.len()].is_ok());
    let (text, _) = metrics.encode();
    let text = String::from_utf8(text).unwrap();
    for (outcome, count) in [
        ("oauth_error", 2.0),
        ("invalid_response", 2.0),
        ("http_error", 2.0),
        ("success", 1.0),
        ("network_error", 0.0),
    ] {
        assert_eq!(
            metric(&text, &outcome_series("driftrock", outcome)),
            count,
            "{outcome}\n{text}"
        );
    }
    assert!(text.contains("tokengate_token_consecutive_failures{route=\"driftrock\"} 0"));

    // Arrival gaps at least the backoff: 200 ms, 400 ms, 800 ms, then the cap's half (a loaded
    // machine only makes them longer; the upper bounds and the cap, exactly:
    // `token::paused_clock_tests`).
    let times: Vec<Instant> = sandbox
        .driftrock
        .recent_requests()
        .iter()
        .map(|r| r.received)
        .collect();
    assert_eq!(times.len(), 7);
    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let lows = [0.2, 0.4, 0.8, 0.8, 0.8, 0.8];
    for (i, (gap, low)) in gaps.iter().zip(lows).enumerate() {
        assert!(
            *gap >= low * 0.95,
            "gap {i} = {gap:.3} s < {low} s: {gaps:?}"
        );
    }
    let mut seen = Seen::from_sandbox(&sandbox);
    seen.0.insert(keys::DRIFTROCK_CLIENT_SECRET.into());
    sandbox.shutdown().await.unwrap();
    seen
}

/// The gaps between the arrivals of the token requests that reached `server` since `since`
/// (among its last 64).
pub fn arrival_gaps(server: &AuthServer, since: Instant) -> Vec<Duration> {
    let times: Vec<Instant> = server
        .recent_requests()
        .iter()
        .map(|r| r.received)
        .filter(|t| *t >= since)
        .collect();
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

/// A fetcher that records the outcome label and message of every fetch.
struct Recording {
    inner: TokenClient,
    results: Arc<std::sync::Mutex<Vec<FetchRecord>>>,
}

/// `Ok` or the failure's (outcome label, message).
type FetchRecord = Result<(), (&'static str, String)>;

#[async_trait::async_trait]
impl tokengate::token::TokenFetcher for Recording {
    async fn fetch(
        &self,
        now: SystemTime,
    ) -> Result<tokengate::oauth::AccessToken, tokengate::oauth::FetchError> {
        let r = self.inner.fetch(now).await;
        let recorded = match &r {
            Ok(_) => Ok(()),
            Err(e) => Err((e.outcome.label(), e.message.clone())),
        };
        self.results.lock().unwrap().push(recorded);
        r
    }
}

/// Absurd `expires_in` values never panic and are clamped (1 s … 24 h); 0 means "not given"
/// (the default lifetime); a negative one is an already-expired token, refused and retried with
/// backoff, never sent; tiny lifetimes do not make the refresher loop; after sitting idle longer
/// than a lifetime, the first request gets a fresh token. (The schedules themselves, exactly:
/// `token::paused_clock_tests`.)
pub async fn absurd_expires_in_is_clamped_and_idle_gateway_sends_fresh_token() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.driftrock.set_opaque_tokens(true);
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;

    // Negative: refused as already expired, counted, backed off; requests get 503, not it.
    sandbox.driftrock.set_expires_in(JsonField::raw("-1"));
    sandbox.registry.revoke_all();
    let n = sandbox.driftrock.requests();
    let since = Instant::now();
    let (status, headers, _) = get(&gw, "/driftrock/x").await;
    assert_eq!(status, 503, "an expired token is not sent");
    assert_eq!(headers["tokengate-error"], "token_unavailable");
    let status = token_status(&gw, "driftrock").await;
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("already expired: expires_in is -1")),
        "{status}"
    );
    assert!(
        status["last_error_at"]
            .as_f64()
            .is_some_and(|t| (unix_now() - t).abs() < 10.0),
        "{status}"
    );
    // Retried at backoff pace: 0.5–1 s, then 1–2 s after each refusal arrived (a loaded
    // machine only makes the gaps longer).
    eventually(Duration::from_secs(15), "two retries", || async {
        sandbox.driftrock.requests() >= n + 3
    })
    .await;
    let gaps = arrival_gaps(&sandbox.driftrock, since);
    assert!(
        gaps[0] >= Duration::from_millis(499) && gaps[1] >= Duration::from_millis(999),
        "{gaps:?}"
    );
    let m = gw.metrics().await;
    assert!(
        metric(&m, &outcome_series("driftrock", "invalid_response")) >= 1.0,
        "{m}"
    );

    let cases: [(&str, f64, f64); 5] = [
        ("9223372036854775807", 86_390.0, 86_401.0),
        ("1e308", 86_390.0, 86_401.0),
        ("0", 290.0, 300.01),
        ("0.001", -1.0, 1.01),
        ("1.5", -1.0, 1.51),
    ];
    for (i, (raw, low, high)) in cases.into_iter().enumerate() {
        sandbox.driftrock.set_expires_in(JsonField::raw(raw));
        let since = Instant::now();
        if i == 0 {
            // Out of the backoff the negative case left.
            eventually(Duration::from_secs(40), "recovery", || async {
                readyz(&gw).await.0 == 200
            })
            .await;
        }
        let before = upstream_auth(&gw, "/driftrock/x").await;
        sandbox.registry.revoke_all();
        let after = upstream_auth(&gw, "/driftrock/x").await;
        assert_ne!(before, after, "expires_in {raw}: a new token");
        let left = expires_in(&gw, "driftrock").await;
        assert!(
            (low..=high).contains(&left),
            "expires_in {raw}: {left} s left, want {low}..{high}"
        );
        if raw == "0.001" {
            // A 1 s floor: renewals at least 0.72 s apart (80 % of 1 s, less 10 % jitter),
            // not a tight loop.
            let n = sandbox.driftrock.requests();
            eventually(Duration::from_secs(15), "three renewals", || async {
                sandbox.driftrock.requests() >= n + 3
            })
            .await;
            let gaps = arrival_gaps(&sandbox.driftrock, since);
            assert!(
                gaps.iter().all(|g| *g >= Duration::from_millis(719)),
                "{gaps:?}"
            );
        }
    }
    // expires_in 1.5 s (the server really keeps it an hour): idle through two renewals, then
    // the first request carries a token issued after the one sent before, and the current one.
    let before = upstream_auth(&gw, "/driftrock/x").await;
    let issued = sandbox.registry.issued_count();
    eventually(
        Duration::from_secs(15),
        "two renewals while idle",
        || async { sandbox.registry.issued_count() >= issued + 2 },
    )
    .await;
    let after = upstream_auth(&gw, "/driftrock/x").await;
    assert_ne!(before, after);
    let issued_at = |token: &str| {
        sandbox
            .registry
            .get(bearer(token))
            .expect("issued")
            .issued_at
    };
    assert!(
        issued_at(&after) > issued_at(&before),
        "a token from before the idle time"
    );
    assert_eq!(gw.handle.state().routes.len(), 2, "still serving");
    finish(gw, sandbox).await
}

// ---------------------------------------------------------------------------------------------
// Outages and limits, with readiness and gauges

const FAILS: &str = "tokengate_token_consecutive_failures{route=\"drillster\"}";
const EXPIRY: &str = "tokengate_token_expiry_timestamp_seconds{route=\"drillster\"}";

/// 20 s tokens renewed at 30 % of their life, token endpoint failing (500) before the first
/// renewal: the cached token until it is no longer usable (at 13 s), then 503
/// `token_unavailable` with `Retry-After` and nothing forwarded; `/readyz` 503 and the gauges
/// tell the story; recovery without a restart. (When the token stops being usable, exactly:
/// `token::paused_clock_tests`.)
pub async fn outage_serves_cached_token_then_503_then_recovers() -> Seen {
    let sandbox = Sandbox::builder()
        .token_lifetime(Duration::from_secs(20))
        .start()
        .await
        .unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| {
        with_auth(t, "drillster", "refresh_ratio = 0.3")
    }))
    .await;
    gw.ready().await;
    let first = upstream_auth(&gw, "/drillster/x").await;
    let exp = jwt_exp(bearer(&first));
    let expiry_gauge = metric(&gw.metrics().await, EXPIRY);
    assert!((expiry_gauge - exp).abs() <= 1.0);
    // The renewal (at 5.4–6 s of the token's life) and every retry fail; the token is still
    // served.
    sandbox
        .drillster
        .faults()
        .fail_with(StatusCode::INTERNAL_SERVER_ERROR);
    eventually(Duration::from_secs(20), "the failed renewal", || async {
        metric(&gw.metrics().await, FAILS) >= 1.0
    })
    .await;
    assert_eq!(
        upstream_auth(&gw, "/drillster/x").await,
        first,
        "cached token served during the outage"
    );

    // 200 with the cached token while it is usable (the API answers 200 only to a token before
    // its `exp`), then 503s: never a request forwarded without a token, no 200 after a 503.
    eventually(
        Duration::from_secs(30),
        "a 503 once the token expired",
        || async {
            let api_before = sandbox.api.requests();
            let (status, headers, body) = get(&gw, "/drillster/x").await;
            match status {
                200 => {
                    let echo: Echo = serde_json::from_str(&body).unwrap();
                    assert_eq!(echo.header("authorization"), Some(first.as_str()));
                    false
                }
                503 => {
                    assert_eq!(headers["tokengate-error"], "token_unavailable");
                    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                    assert!((1..=30).contains(&retry), "Retry-After {retry}");
                    assert_eq!(
                        sandbox.api.requests(),
                        api_before,
                        "forwarded without a token"
                    );
                    true
                }
                other => panic!("unexpected {other}: {body}"),
            }
        },
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            get(&gw, "/drillster/x").await.0,
            503,
            "200 after 503 while failing"
        );
    }
    let (ready, body) = readyz(&gw).await;
    assert_eq!(ready, 503);
    assert_eq!(
        body["routes_without_token"],
        serde_json::json!(["drillster"])
    );
    eventually(
        Duration::from_secs(15),
        "a second failed renewal",
        || async { metric(&gw.metrics().await, FAILS) >= 2.0 },
    )
    .await;
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, EXPIRY),
        expiry_gauge,
        "expiry gauge keeps the old token's"
    );
    // fail_with answers 500 with an RFC 6749 §5.2 body ("server_error"): an oauth_error.
    assert!(
        metric(&m, &outcome_series("drillster", "oauth_error")) >= 2.0,
        "{m}"
    );
    let t = token_status(&gw, "drillster").await;
    assert_eq!(t["usable"], false);
    assert!(
        t["last_error"].as_str().unwrap().contains("HTTP 500"),
        "{t}"
    );

    sandbox.drillster.faults().stop_failing();
    eventually(Duration::from_secs(20), "recovery", || async {
        readyz(&gw).await.0 == 200
    })
    .await;
    let fresh = upstream_auth(&gw, "/drillster/x").await;
    assert_ne!(fresh, first);
    let m = gw.metrics().await;
    assert_eq!(metric(&m, FAILS), 0.0);
    assert!(metric(&m, EXPIRY) > expiry_gauge);
    finish(gw, sandbox).await
}

/// A token endpoint that accepts and never answers: the fetch ends at `token_timeout`,
/// requests waiting for it get 503, one token request at a time. (How long waiters wait, exactly:
/// `token::paused_clock_tests` and `token::tests::waiters_are_bounded_and_time_out`.)
pub async fn hanging_token_endpoint_times_out_and_waiters_get_503() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.drillster.faults().set_hang(true);
    let gw = Arc::new(
        TestGateway::start(config_for(&sandbox, |t| {
            with_auth(t, "drillster", "token_timeout = \"1s\"")
        }))
        .await,
    );
    let since = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the first token request",
        || async { sandbox.drillster.requests() >= 1 },
    )
    .await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let gw = Arc::clone(&gw);
            tokio::spawn(async move { get(&gw, "/drillster/x").await })
        })
        .collect();
    for t in tasks {
        let (status, headers, _) = t.await.unwrap();
        assert_eq!(status, 503, "{headers:?}");
        assert_eq!(headers["tokengate-error"], "token_unavailable");
        assert!(headers.contains_key("retry-after"));
    }
    assert_eq!(sandbox.api.requests(), 0);
    eventually(Duration::from_secs(10), "the timeout recorded", || async {
        token_status(&gw, "drillster").await["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out"))
    })
    .await;
    let m = gw.metrics().await;
    assert!(metric(&m, &outcome_series("drillster", "network_error")) >= 1.0);
    assert!(metric(&m, FAILS) >= 1.0);
    let (ready, _) = readyz(&gw).await;
    assert_eq!(ready, 503);
    // One fetch at a time, each bounded: the next starts only after the last timed out (1 s)
    // and the backoff (at least 0.5 s); a little slack for the request's way to the server.
    let gaps = arrival_gaps(&sandbox.drillster, since);
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(1200)),
        "{gaps:?}"
    );

    sandbox.drillster.faults().set_hang(false);
    eventually(Duration::from_secs(15), "recovery", || async {
        readyz(&gw).await.0 == 200
    })
    .await;
    upstream_auth(&gw, "/drillster/x").await;
    assert_eq!(metric(&gw.metrics().await, FAILS), 0.0);
    let gw = Arc::try_unwrap(gw).ok().expect("sole owner");
    finish(gw, sandbox).await
}

/// 429 with `Retry-After: 30` on a renewal: no token request for 30 s while the still
/// valid token keeps being used; a request that needs a new token meanwhile gets 503 with a
/// `Retry-After` of about 30 s. (Asserted through `/status` and the answers; that the next
/// token request waits out the 30 s: `token::paused_clock_tests`.)
pub async fn retry_after_429_is_honoured_and_valid_token_kept() -> Seen {
    let sandbox = Sandbox::builder()
        .token_lifetime(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| {
        // Renew after ~3 s of a 60 s token, so the renewal happens early in the test.
        with_auth(t, "drillster", "refresh_ratio = 0.05")
    }))
    .await;
    gw.ready().await;
    let first = upstream_auth(&gw, "/drillster/x").await;
    sandbox.drillster.faults().respond_with_next(
        1,
        CannedResponse::oauth_error(
            StatusCode::TOO_MANY_REQUESTS,
            "temporarily_unavailable",
            "slow down",
        )
        .header("retry-after", "30"),
    );
    eventually(Duration::from_secs(10), "the renewal", || async {
        sandbox.drillster.requests() == 2
    })
    .await;
    eventually(Duration::from_secs(10), "failure recorded", || async {
        metric(&gw.metrics().await, FAILS) == 1.0
    })
    .await;
    let t = token_status(&gw, "drillster").await;
    let next = t["next_attempt_at"].as_f64().expect("next_attempt_at") - unix_now();
    assert!((25.0..=31.0).contains(&next), "next attempt in {next} s");
    assert!(
        t["last_error"].as_str().unwrap().contains("HTTP 429"),
        "{t}"
    );

    for _ in 0..20 {
        assert_eq!(upstream_auth(&gw, "/drillster/x").await, first);
    }
    assert_eq!(
        sandbox.drillster.requests(),
        2,
        "no token request before 30 s"
    );
    assert_eq!(readyz(&gw).await.0, 200, "the valid token is usable");

    // The API now refuses the token: it is dropped, but the next token request stays due in
    // ~30 s, so the request gets 503 with that Retry-After and no token request is made.
    sandbox.registry.revoke_all();
    let (status, headers, _) = get(&gw, "/drillster/x").await;
    assert_eq!(status, 503);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((20..=30).contains(&retry), "Retry-After {retry}");
    assert_eq!(sandbox.drillster.requests(), 2);
    assert_eq!(readyz(&gw).await.0, 503);
    finish(gw, sandbox).await
}

/// 200 concurrent requests on an empty cache, the first token request held at the token
/// endpoint until all 200 wait for it: one token request, every request carries that token.
pub async fn cold_start_200_requests_share_one_fetch() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.drillster.faults().hold();
    let gw = Arc::new(TestGateway::start(config_for(&sandbox, |t| t)).await);
    let tasks = cold_start_requests(&sandbox, &gw, |r| async move {
        assert_eq!(r.status(), 200);
        let echo: Echo = r.json().await.unwrap();
        echo.header("authorization").unwrap().to_string()
    })
    .await;
    let mut tokens = BTreeSet::new();
    for t in tasks {
        tokens.insert(t.await.unwrap());
    }
    assert_eq!(tokens.len(), 1, "all 200 requests carry the one token");
    assert_eq!(sandbox.drillster.requests(), 1, "exactly one token request");
    let gw = Arc::try_unwrap(gw).ok().expect("sole owner");
    finish(gw, sandbox).await
}

/// Sends 200 concurrent requests to `/drillster/x` once the gateway's first token request is
/// held at the sandbox, waits until all 200 wait for it, then releases it; `answer` reads each
/// response.
async fn cold_start_requests<F, Fut, T>(
    sandbox: &Sandbox,
    gw: &TestGateway,
    answer: F,
) -> Vec<tokio::task::JoinHandle<T>>
where
    F: Fn(reqwest::Response) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
    T: Send + 'static,
{
    eventually(
        Duration::from_secs(10),
        "the held token request",
        || async { sandbox.drillster.faults().held() == 1 },
    )
    .await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let waited = gw.waited_requests();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (client, url, answer) = (client.clone(), gw.url("/drillster/x"), answer.clone());
            tokio::spawn(async move {
                let response = client.get(url).send().await.unwrap();
                answer(response).await
            })
        })
        .collect();
    eventually(Duration::from_secs(10), "200 requests waiting", || async {
        gw.waited_requests() == waited + 200
    })
    .await;
    assert_eq!(
        sandbox.api.requests(),
        0,
        "nothing forwarded without a token"
    );
    sandbox.drillster.faults().release();
    tasks
}

/// When the one fetch of 200 concurrent cold-start requests fails, all 200 fail together (503), and
/// the next attempt waits for the backoff.
pub async fn cold_start_failure_fails_all_together_then_backs_off() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.drillster.faults().hold();
    sandbox.drillster.faults().respond_with_next(
        1,
        CannedResponse::failure(StatusCode::INTERNAL_SERVER_ERROR),
    );
    let gw = Arc::new(TestGateway::start(config_for(&sandbox, |t| t)).await);
    let before_release = Instant::now();
    let tasks = cold_start_requests(&sandbox, &gw, |r| async move { r.status().as_u16() }).await;
    for t in tasks {
        assert_eq!(t.await.unwrap(), 503, "all fail together");
    }
    assert_eq!(sandbox.api.requests(), 0);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, &outcome_series("drillster", "oauth_error")),
        1.0,
        "{m}"
    );
    eventually(Duration::from_secs(10), "the retry", || async {
        readyz(&gw).await.0 == 200
    })
    .await;
    let recent = sandbox.drillster.recent_requests();
    assert_eq!(recent.len(), 2);
    // Not before the failure came back (on release), then at least the 500 ms minimum backoff.
    let retried = recent[1].received;
    assert!(
        retried >= before_release + Duration::from_millis(500),
        "retried {:?} after the requests were sent",
        retried - before_release
    );
    upstream_auth(&gw, "/drillster/x").await;
    let gw = Arc::try_unwrap(gw).ok().expect("sole owner");
    finish(gw, sandbox).await
}

/// While backing off, a request that needs a token gets 503 at once instead of waiting out the
/// backoff.
pub async fn requests_during_backoff_get_503_at_once() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox
        .drillster
        .faults()
        .fail_with(StatusCode::INTERNAL_SERVER_ERROR);
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    // After three failures the backoff is at least 2 s.
    eventually(Duration::from_secs(10), "three failures", || async {
        metric(&gw.metrics().await, FAILS) >= 3.0
    })
    .await;
    let t = Instant::now();
    let (status, headers, _) = get(&gw, "/drillster/x").await;
    let took = t.elapsed();
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    assert!(
        took < Duration::from_secs(1),
        "waited {took:?} instead of answering at once"
    );
    finish(gw, sandbox).await
}

/// 5 s and 3 s tokens are renewed ahead of expiry, never in a loop: under steady traffic through
/// three renewals of each, every request is answered with the token the gateway published, each
/// renewal is one token request at least 80 % (less 10 % jitter) of a lifetime after the last
/// (the lifetime counted to the token's whole-second `exp`), and the expiry gauge moves on. (Exact counts, and that no request waits:
/// `token::paused_clock_tests`.)
pub async fn short_tokens_renew_ahead_of_expiry_without_looping() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.drillster.set_token_lifetime(Duration::from_secs(5));
    sandbox.driftrock.set_token_lifetime(Duration::from_secs(3));
    let gw = Arc::new(TestGateway::start(config_for(&sandbox, |t| t)).await);
    gw.ready().await;
    let since = Instant::now();
    let expiry0 = metric(&gw.metrics().await, EXPIRY);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = ["/drillster/x", "/driftrock/y"]
        .into_iter()
        .map(|path| {
            let (gw, done) = (Arc::clone(&gw), Arc::clone(&done));
            tokio::spawn(async move {
                let mut n = 0;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    upstream_auth(&gw, path).await;
                    n += 1;
                    // Pacing, so the traffic leaves the machine to the gateway.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                n
            })
        })
        .collect();
    eventually(
        Duration::from_secs(60),
        "three renewals of each",
        || async { sandbox.drillster.successes() >= 4 && sandbox.driftrock.successes() >= 4 },
    )
    .await;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        assert!(w.await.unwrap() > 0);
    }
    for (server, route, lifetime) in [
        (&sandbox.drillster, "drillster", 5.0),
        (&sandbox.driftrock, "driftrock", 3.0),
    ] {
        let gaps = arrival_gaps(server, since);
        assert!(
            gaps.iter()
                .all(|g| g.as_secs_f64() >= (lifetime - 1.0) * 0.8 * 0.9 - 0.001),
            "{route}: {gaps:?}"
        );
        let t = token_status(&gw, route).await;
        assert_eq!(t["generation"].as_u64(), Some(server.successes()), "{t}");
    }
    let m = gw.metrics().await;
    assert_eq!(metric(&m, FAILS), 0.0);
    assert!(metric(&m, EXPIRY) >= expiry0 + 10.0);
    let gw = Arc::try_unwrap(gw).ok().expect("sole owner");
    finish(gw, sandbox).await
}

// ---------------------------------------------------------------------------------------------
// Upstream 401

/// A renewal is in flight (the server will hand back its cached token) when the upstream
/// rejects that token: the dropped token is not put back; the request is replayed once with a
/// new one. The renewal is held at the token endpoint until the request waits for it.
pub async fn fetch_in_flight_cannot_restore_a_dropped_token() -> Seen {
    let sandbox = Sandbox::builder()
        .token_lifetime(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let gw = Arc::new(
        TestGateway::start(config_for(&sandbox, |t| {
            with_auth(t, "drillster", "refresh_ratio = 0.05")
        }))
        .await,
    );
    gw.ready().await;
    let first = upstream_auth(&gw, "/drillster/x").await;
    sandbox.drillster.faults().hold();
    sandbox.drillster.reissue_next(1);
    eventually(Duration::from_secs(10), "renewal in flight", || async {
        sandbox.drillster.faults().held() == 1
    })
    .await;
    sandbox.registry.revoke_all();
    let waited = gw.waited_requests();
    let request = {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move { upstream_auth(&gw, "/drillster/x").await })
    };
    eventually(
        Duration::from_secs(10),
        "the request waits for a token",
        || async { gw.waited_requests() > waited },
    )
    .await;
    sandbox.drillster.faults().release();
    let replayed = request.await.unwrap();
    assert_ne!(replayed, first, "the dropped token came back");
    assert_eq!(
        sandbox.drillster.requests(),
        3,
        "stale answer discarded, one new fetch"
    );
    assert_eq!(
        token_status(&gw, "drillster").await["generation"],
        2,
        "the re-issued token was never published"
    );
    assert_eq!(upstream_auth(&gw, "/drillster/x").await, replayed);
    let gw = Arc::try_unwrap(gw).ok().expect("sole owner");
    finish(gw, sandbox).await
}

/// A 5 MB chunked POST that gets a 401 is not replayed (more than `replay_body_limit`): the
/// 401 goes to the client, the upstream saw the body once, and the next request carries the new
/// token. Never an empty-body retry.
pub async fn large_chunked_post_is_not_replayed_and_next_request_uses_new_token() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    let first = upstream_auth(&gw, "/drillster/x").await;
    sandbox.registry.revoke_all();
    let api_before = sandbox.api.requests();

    let body: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(
        b"POST /drillster/upload HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\
          Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    for chunk in body.chunks(64 * 1024) {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(chunk).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut response))
        .await
        .expect("answer within 20 s")
        .unwrap();
    let head = String::from_utf8_lossy(&response[..response.len().min(200)]).to_string();
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("tokengate-error"),
        "the API's own 401"
    );
    assert_eq!(sandbox.api.requests(), api_before + 1, "not replayed");
    let echo = sandbox.api.last_echo().expect("echo");
    assert_eq!(echo.body_len, 5_000_000);
    assert_eq!(echo.body_sha256, hex(&Sha256::digest(&body)));
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tokengate_upstream_unauthorized_total{action=\"passed_through\",route=\"drillster\"}"
        ),
        1.0
    );
    let next = upstream_auth(&gw, "/drillster/x").await;
    assert_ne!(next, first, "the next request uses the new token");
    assert!(sandbox
        .api
        .recent()
        .iter()
        .all(|e| e.method != "POST" || e.body_len == 5_000_000));
    finish(gw, sandbox).await
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Keys and assertions

/// A config with one jwt_bearer route to `server` using `key_file`, plus `extra` auth lines.
pub fn drillster_config(server: &AuthServer, api: &str, key_file: &Path, extra: &str) -> String {
    format!(
        r#"[server]
listen = "{listen}"
admin_listen = "{admin}"
grace_period = "0s"

[[routes]]
name = "drillster"
upstream = "{api}"

[routes.auth]
grant = "jwt_bearer"
token_endpoint = "{endpoint}"
client_id = "{id}"
client_secret = "{secret}"
key_file = "{key}"
{extra}
"#,
        listen = free_addr(),
        admin = free_addr(),
        endpoint = server.token_endpoint(),
        id = keys::DRILLSTER_CLIENT_ID,
        secret = keys::DRILLSTER_CLIENT_SECRET,
        key = key_file.display(),
    )
}

/// A temporary directory for key files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tokengate-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes a Drillster JSON key file with `private_key` as the `privateKey` value, written
    /// verbatim into the JSON string (so `\\n` there stays a literal backslash-n).
    pub fn key_file(&self, name: &str, private_key_json_escaped: &str) -> PathBuf {
        let path = self.0.join(name);
        let json = format!(
            "{{\"type\":\"service_account_key\",\"keyId\":\"{}\",\"serviceAccountId\":\"{}\",\"privateKey\":\"{}\"}}",
            keys::DEMO_KEY_ID,
            keys::DEMO_SERVICE_ACCOUNT_ID,
            private_key_json_escaped
        );
        std::fs::write(&path, json).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/keys")
            .join(name),
    )
    .unwrap()
}

/// JSON-string escaping of a PEM with real newlines as `\n` escapes (what a key file holds).
fn json_escape(pem: &str) -> String {
    serde_json::to_string(pem)
        .unwrap()
        .trim_matches('"')
        .to_string()
}

/// `privateKey` with literal backslash-n escapes, with CRLF, PKCS#1 and PKCS#8: each signs
/// RS256 assertions the Drillster-like server accepts.
pub async fn key_variants_all_sign_rs256() -> Seen {
    let server = AuthServer::drillster().start().await.unwrap();
    let dir = TempDir::new("keys");
    let pkcs8 = keys::DEMO_PRIVATE_PEM.to_string();
    let pkcs1 = fixture("demo-pkcs1.pem");
    let variants = [
        ("pkcs8.json", json_escape(&pkcs8)),
        ("pkcs1.json", json_escape(&pkcs1)),
        // The two characters `\` `n` in the decoded string: `\\n` in the JSON text.
        (
            "literal-backslash-n.json",
            pkcs8.trim_end().replace('\n', "\\\\n"),
        ),
        ("crlf.json", json_escape(&pkcs8.replace('\n', "\r\n"))),
        (
            "surrounding-text.json",
            json_escape(&format!("Key for service account\n{pkcs1}\n(end)")),
        ),
    ];
    for (name, escaped) in &variants {
        let path = dir.key_file(name, escaped);
        let toml = drillster_config(&server, "http://127.0.0.1:9", &path, "");
        let config =
            Config::from_toml_str(&toml, None, &|_| None).unwrap_or_else(|e| panic!("{name}: {e}"));
        let client = TokenClient::new(
            config.routes[0].auth.clone(),
            None,
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .unwrap();
        let token = client
            .fetch(SystemTime::now())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!token.value.is_empty());
        let req = server.last_request().unwrap();
        assert_eq!(req.assertion_header().unwrap()["alg"], "RS256", "{name}");
    }
    assert_eq!(server.successes(), variants.len() as u64);
    let mut seen = Seen::default();
    seen.add_auth_server(&server);
    server.shutdown().await.unwrap();
    seen
}

/// An EC key, an encrypted key or a non-PEM string fails at start-up (config load, and
/// `tokengate check`) naming the key file and the `privateKey` field.
pub async fn bad_keys_fail_at_startup_naming_file_and_field() -> Seen {
    let server = AuthServer::drillster().start().await.unwrap();
    let dir = TempDir::new("badkeys");
    let variants = [
        ("ec.json", json_escape(&fixture("ec-p256.pem"))),
        (
            "encrypted.json",
            json_escape(&fixture("demo-encrypted.pem")),
        ),
        (
            "not-pem.json",
            "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ".to_string(),
        ),
    ];
    for (name, escaped) in &variants {
        let path = dir.key_file(name, escaped);
        let toml = drillster_config(&server, "http://127.0.0.1:9", &path, "");
        let err = Config::from_toml_str(&toml, None, &|_| None)
            .err()
            .unwrap_or_else(|| panic!("{name} must be refused"))
            .to_string();
        assert!(err.contains("routes[0].auth.key_file"), "{name}: {err}");
        assert!(err.contains(&path.display().to_string()), "{name}: {err}");
        assert!(err.contains("privateKey"), "{name}: {err}");
        assert!(
            !err.contains("MIIE"),
            "{name}: key material in the error: {err}"
        );

        let config_path = dir.0.join(format!("{name}.toml"));
        std::fs::write(&config_path, &toml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["check", "-c"])
            .arg(&config_path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("routes[0].auth.key_file") && stderr.contains("privateKey"),
            "{name}: {stderr}"
        );
    }
    assert_eq!(server.requests(), 0);
    server.shutdown().await.unwrap();
    Seen::default()
}

/// A server allowing 5 s of skew that rejects `iat` in the future, `exp` more than 3600 s
/// ahead and reused `jti`s accepts every assertion built with the gateway's clock 90 s ahead of
/// and 90 s behind its own (default and maximum assertion lifetimes); 200 s ahead is refused,
/// showing the server does check.
pub async fn assertions_accepted_with_clock_90s_ahead_or_behind() -> Seen {
    let server = AuthServer::drillster()
        .clock_skew(Duration::from_secs(5))
        .max_assertion_lifetime(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    for lifetime in ["", "assertion_lifetime = \"1h\""] {
        let toml = drillster_config(
            &server,
            "http://127.0.0.1:9",
            &crate::common::demo_key_path(),
            lifetime,
        );
        let config = Config::from_toml_str(&toml, None, &|_| None).unwrap();
        let client = TokenClient::new(
            config.routes[0].auth.clone(),
            None,
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .unwrap();
        for offset in [-90i64, 90, -90, 90, 0] {
            let now = if offset >= 0 {
                SystemTime::now() + Duration::from_secs(offset as u64)
            } else {
                SystemTime::now() - Duration::from_secs((-offset) as u64)
            };
            client
                .fetch(now)
                .await
                .unwrap_or_else(|e| panic!("clock {offset:+} s, {lifetime:?}: {e}"));
        }
        let e = client
            .fetch(SystemTime::now() + Duration::from_secs(200))
            .await
            .expect_err("200 s ahead: refused");
        assert!(
            e.message.contains("iat in the future") || e.message.contains("exp too far ahead"),
            "{e}"
        );
    }
    assert_eq!(server.successes(), 10);
    let mut seen = Seen::default();
    seen.add_auth_server(&server);
    server.shutdown().await.unwrap();
    seen
}

// ---------------------------------------------------------------------------------------------
// Discovery

fn issuer_config(sandbox: &Sandbox, extra: &str) -> Config {
    let endpoint = sandbox.drillster.token_endpoint();
    let issuer = sandbox.drillster.issuer();
    config_for(sandbox, |t| {
        let t = t.replacen(
            &format!("token_endpoint = \"{endpoint}\""),
            &format!("issuer = \"{issuer}\"\n{extra}"),
            1,
        );
        assert!(t.contains("issuer = "), "{t}");
        t
    })
}

const RFC8414: &str = "/.well-known/oauth-authorization-server";
const OIDC: &str = "/.well-known/openid-configuration";

/// RFC 8414 metadata first; the result is cached across renewals.
pub async fn discovery_rfc8414_first_and_cached() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.drillster.set_token_lifetime(Duration::from_secs(2));
    let gw = TestGateway::start(issuer_config(&sandbox, "")).await;
    gw.ready().await;
    upstream_auth(&gw, "/drillster/x").await;
    // The assertion's aud is the discovered endpoint, exactly.
    let claims = sandbox
        .drillster
        .last_request()
        .unwrap()
        .assertion_claims()
        .unwrap();
    assert_eq!(claims["aud"], sandbox.drillster.token_endpoint());
    eventually(Duration::from_secs(10), "three renewals", || async {
        sandbox.drillster.successes() >= 4
    })
    .await;
    assert_eq!(
        sandbox.drillster.discovery_paths(),
        vec![RFC8414.to_string()]
    );
    assert_eq!(sandbox.drillster.discovery_requests(), 1, "cached");
    finish(gw, sandbox).await
}

/// No RFC 8414 document (404): OpenID Connect discovery is used.
pub async fn discovery_falls_back_to_openid_configuration() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.drillster.serve_metadata(false, true);
    let gw = TestGateway::start(issuer_config(&sandbox, "")).await;
    gw.ready().await;
    upstream_auth(&gw, "/drillster/x").await;
    assert_eq!(
        sandbox.drillster.discovery_paths(),
        vec![RFC8414.to_string(), OIDC.to_string()]
    );
    finish(gw, sandbox).await
}

/// Documents whose `issuer` differs from the configured one are refused (RFC 8414 §3.3): no
/// token request goes to the endpoint they name.
pub async fn discovery_rejects_issuer_mismatch() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox
        .drillster
        .set_metadata_issuer(JsonField::string("https://evil.example"));
    let gw = TestGateway::start(issuer_config(&sandbox, "")).await;
    eventually(Duration::from_secs(5), "discovery failure", || async {
        token_status(&gw, "drillster").await["consecutive_failures"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    })
    .await;
    let t = token_status(&gw, "drillster").await;
    let err = t["last_error"].as_str().unwrap();
    assert!(
        err.contains("does not match the configured issuer"),
        "{err}"
    );
    assert_eq!(sandbox.drillster.requests(), 0, "no token request");
    let (status, headers, _) = get(&gw, "/drillster/x").await;
    assert_eq!(status, 503);
    assert_eq!(headers["tokengate-error"], "token_unavailable");
    // Fixed document: the next attempt discovers and succeeds.
    sandbox.drillster.set_metadata_issuer(JsonField::Normal);
    eventually(Duration::from_secs(10), "recovery", || async {
        readyz(&gw).await.0 == 200
    })
    .await;
    finish(gw, sandbox).await
}

/// Discovery uses the token timeout: a metadata endpoint that never answers ends the fetch
/// after `token_timeout` (both documents together), requests get 503 in bounded time.
pub async fn discovery_hang_is_bounded_by_token_timeout() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.drillster.discovery_faults().set_hang(true);
    let gw = TestGateway::start(issuer_config(&sandbox, "token_timeout = \"1s\"")).await;
    let t = Instant::now();
    let (status, _, _) = get(&gw, "/drillster/x").await;
    assert_eq!(status, 503);
    assert!(t.elapsed() <= Duration::from_secs(4), "{:?}", t.elapsed());
    eventually(Duration::from_secs(5), "timeout recorded", || async {
        token_status(&gw, "drillster").await["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out"))
    })
    .await;
    assert_eq!(sandbox.drillster.requests(), 0);
    sandbox.drillster.discovery_faults().set_hang(false);
    eventually(Duration::from_secs(10), "recovery", || async {
        readyz(&gw).await.0 == 200
    })
    .await;
    upstream_auth(&gw, "/drillster/x").await;
    finish(gw, sandbox).await
}

/// An upstream that refuses even freshly fetched tokens: no loop — the first refused
/// request gets one refresh and one replay; the replay's 401 shows the API refuses the request,
/// not the token, so the token is held through 401s for `REFUSED_TOKEN_HOLD` (the next
/// requests are passed through without a refresh) and keeps serving what the API accepts.
pub async fn upstream_that_keeps_refusing_gets_no_loop() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    sandbox.api.faults().respond_with(
        CannedResponse::json(StatusCode::UNAUTHORIZED, r#"{"error":"invalid_token"}"#)
            .header("www-authenticate", "Bearer error=\"invalid_token\""),
    );
    for i in 1..=3u64 {
        let (status, headers, _) = get(&gw, "/drillster/x").await;
        assert_eq!(status, 401);
        assert!(headers.get("tokengate-error").is_none());
        assert_eq!(
            sandbox.drillster.successes(),
            2,
            "one refresh for the first request, none while the token is held"
        );
        assert_eq!(
            sandbox.api.requests(),
            1 + i,
            "original + one replay, then one each"
        );
    }
    let m = gw.metrics().await;
    let series = |action: &str| {
        format!("tokengate_upstream_unauthorized_total{{action=\"{action}\",route=\"drillster\"}}")
    };
    assert_eq!(metric(&m, &series("passed_through")), 3.0);
    assert_eq!(metric(&m, &series("replayed")), 1.0);
    // The held token is the current one: what the API accepts is served with it.
    sandbox.api.faults().clear_response();
    let (status, _, _) = get(&gw, "/drillster/y").await;
    assert_eq!(status, 200);
    assert_eq!(sandbox.drillster.successes(), 2);
    finish(gw, sandbox).await
}
