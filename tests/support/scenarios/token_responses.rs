//! Token responses: lenient parsing (RFC 6749 §5.1), failed fetches classified and backed
//! off, absurd lifetimes clamped.

use super::*;

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
                token_status(&gw, "driftrock").await["usable"] == true
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
