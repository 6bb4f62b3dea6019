//! End to end through the gateway: sandbox authorization servers and API on loopback, the real
//! gateway in front (docs/proxy-behaviour.md, docs/token-lifecycle.md, docs/operations.md
//! "Admin endpoints").

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config_for, raw_request, TestGateway};
use tokengate_sandbox::{keys, Echo, Sandbox};

async fn get_echo(gw: &TestGateway, path: &str) -> Echo {
    let r = reqwest::get(gw.url(path)).await.expect("request");
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.expect("echo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_grants_end_to_end() {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;

    let echo = get_echo(&gw, "/drillster/api/2.1.1/user?x=1").await;
    assert_eq!(echo.path, "/api/2.1.1/user");
    assert_eq!(echo.query.as_deref(), Some("x=1"));
    assert_eq!(echo.subject.as_deref(), Some(keys::DEMO_SERVICE_ACCOUNT_ID));
    assert_eq!(echo.issuer.as_deref(), Some("drillster"));
    assert_eq!(echo.authorization_count, 1);
    assert!(echo.header("authorization").unwrap().starts_with("Bearer "));
    assert_eq!(
        echo.header("host"),
        Some(sandbox.api.addr().to_string().as_str())
    );
    assert!(echo.header("x-request-id").is_some());

    // The assertion the gateway sent, as the Drillster-like server received it (Drillster:
    // Service accounts).
    let req = sandbox.drillster.last_request().expect("token request");
    assert_eq!(
        req.param("grant_type"),
        Some(tokengate::oauth::jwt_bearer::GRANT_TYPE)
    );
    assert_eq!(req.param("client_id"), Some(keys::DRILLSTER_CLIENT_ID));
    assert_eq!(req.header("accept"), Some("application/json"));
    let header = req.assertion_header().unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["kid"], keys::DEMO_KEY_ID);
    let claims = req.assertion_claims().unwrap();
    assert_eq!(claims["iss"], keys::DEMO_SERVICE_ACCOUNT_ID);
    assert_eq!(claims["sub"], keys::DEMO_SERVICE_ACCOUNT_ID);
    assert_eq!(claims["aud"], sandbox.drillster.token_endpoint());
    let (exp, iat) = (
        claims["exp"].as_u64().unwrap(),
        claims["iat"].as_u64().unwrap(),
    );
    assert!(exp > iat && exp - iat <= 3600);
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));

    // Client credentials with an id and secret that need RFC 6749 §2.3.1 encoding; the
    // Driftrock-like server form-decodes Basic credentials, so this only works when encoded
    // (every byte outside RFC 3986's unreserved set percent-encoded, a space as %20).
    let echo = get_echo(&gw, "/driftrock/v2/event").await;
    assert_eq!(echo.path, "/v2/event");
    assert_eq!(echo.subject.as_deref(), Some(keys::DRIFTROCK_CLIENT_ID));
    assert_eq!(echo.issuer.as_deref(), Some("driftrock"));
    let req = sandbox.driftrock.last_request().expect("token request");
    assert_eq!(req.param("grant_type"), Some("client_credentials"));
    assert_eq!(
        req.header("authorization"),
        Some(
            format!(
                "Basic {}",
                base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    "dr%2Fclient%207:s3cr%2Bt%2F%2541%3Ay%3Dz"
                )
            )
            .as_str()
        )
    );
    assert_eq!(sandbox.driftrock.failures(), 0);
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbound_credentials_never_reach_the_upstream() {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;

    let request =
        "GET /drillster/v1/items?a=1&access_token=leaked-query-token&b=%2F&c HTTP/1.1\r\n\
         Host: gateway.internal\r\n\
         Authorization: Basic bGVnYWN5OnBhc3N3b3Jk\r\n\
         X-Custom: keep me\r\n\
         authorization: Bearer client-supplied-token\r\n\
         Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n\
         Cookie: session=legacy-session\r\n\
         X-Custom: and me\r\n\
         Accept: application/json\r\n\
         Connection: close\r\n\r\n";
    let resp = raw_request(gw.addr(), request.as_bytes()).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    let echo = resp.echo();
    assert_eq!(echo.authorization_count, 1);
    let auth = echo.header("authorization").unwrap();
    assert!(
        auth.starts_with("Bearer ey"),
        "gateway token, not the client's"
    );
    assert!(sandbox.registry.issued_count() >= 1);
    assert_ne!(auth, "Bearer client-supplied-token");
    assert_eq!(echo.header("proxy-authorization"), None);
    assert_eq!(echo.header("cookie"), None);
    assert_eq!(echo.query.as_deref(), Some("a=1&b=%2F&c"));
    assert_eq!(echo.header_values("x-custom"), vec!["keep me", "and me"]);
    assert_eq!(echo.header("accept"), Some("application/json"));
    assert_eq!(echo.header("x-forwarded-host"), Some("gateway.internal"));
    assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(echo.header("x-forwarded-proto"), Some("http"));
    let body = String::from_utf8_lossy(&resp.body);
    for secret in [
        "leaked-query-token",
        "client-supplied-token",
        "legacy-session",
        "cHJveHk6c2VjcmV0",
        "bGVnYWN5OnBhc3N3b3Jk",
    ] {
        assert!(!body.contains(secret), "{secret} reached the upstream");
    }
    // A client-supplied X-Request-Id is kept and returned.
    let resp = raw_request(
        gw.addr(),
        b"GET /driftrock/x HTTP/1.1\r\nHost: g\r\nX-Request-Id: trace-42\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-request-id").as_deref(), Some("trace-42"));
    assert_eq!(resp.echo().header("x-request-id"), Some("trace-42"));
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_start_200_concurrent_requests_share_one_token_request_per_route() {
    let sandbox = Sandbox::start().await.unwrap();
    // Slow token endpoints: every request below arrives while the first fetch is in flight.
    sandbox
        .drillster
        .faults()
        .set_latency(Duration::from_millis(400));
    sandbox
        .driftrock
        .faults()
        .set_latency(Duration::from_millis(400));
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let url = gw.url(if i % 2 == 0 {
                "/drillster/a"
            } else {
                "/driftrock/b"
            });
            let client = client.clone();
            tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap().unwrap() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 200);
    assert_eq!(sandbox.drillster.requests(), 1, "drillster token requests");
    assert_eq!(sandbox.driftrock.requests(), 1, "driftrock token requests");
    assert!(
        gw.waited_requests() > 0,
        "the requests really arrived before the token"
    );
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_second_tokens_renew_in_the_background_without_failures_or_waits() {
    let sandbox = Sandbox::builder()
        .token_lifetime(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let gw = Arc::new(TestGateway::start(config_for(&sandbox, |t| t)).await);
    gw.ready().await;
    let waited_before = gw.waited_requests();
    let issued_before = [sandbox.drillster.successes(), sandbox.driftrock.successes()];

    // Traffic on both routes until each route has renewed its token four times (an event, not
    // a time window); the schedule itself is the paused-clock tests' to check.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let gw = Arc::clone(&gw);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let path = if w % 2 == 0 {
                    "/drillster/x"
                } else {
                    "/driftrock/y"
                };
                let (mut ok, mut failed) = (0u64, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = client.get(gw.url(path)).send().await.unwrap();
                    if r.status() == 200 {
                        ok += 1;
                    } else {
                        failed.push(r.status().as_u16());
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let renewed = || {
        [
            sandbox.drillster.successes() - issued_before[0],
            sandbox.driftrock.successes() - issued_before[1],
        ]
    };
    common::eventually(
        Duration::from_secs(120),
        "four renewals per route",
        || async { renewed().iter().all(|&n| n >= 4) },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        assert!(failed.is_empty(), "failed statuses: {failed:?}");
        total += ok;
    }
    let renewals: u64 = renewed().iter().sum();
    // Renewed in the background: far fewer token requests than requests served.
    assert!(
        total > 4 * renewals,
        "{total} requests for {renewals} renewals"
    );
    assert_eq!(
        gw.waited_requests(),
        waited_before,
        "a request waited on the token endpoint"
    );
    let gw = Arc::try_unwrap(gw).ok().expect("sole owner");
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_errors_are_json_with_tokengate_error_header() {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| {
        t.replacen(
            "strip_prefix = true\n",
            "strip_prefix = true\nallow_methods = [\"GET\"]\n",
            1,
        )
    }))
    .await;
    gw.ready().await;

    let r = reqwest::get(gw.url("/nowhere")).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["tokengate-error"], "no_route");
    assert!(r.headers().contains_key("x-request-id"));
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "no_route");

    let r = reqwest::Client::new()
        .post(gw.url("/drillster/x"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET");
    assert_eq!(r.headers()["tokengate-error"], "method_not_allowed");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["route"], "drillster");

    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tokengate_denied_total{reason=\"no_route\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tokengate_denied_total{reason=\"method_not_allowed\"} 1"));
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_outside_allowed_clients_get_403_and_nothing_is_forwarded() {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| {
        t.replacen(
            "[server]\n",
            "[server]\nallowed_clients = [\"10.0.0.0/8\"]\n",
            1,
        )
    }))
    .await;
    gw.ready().await;
    let resp = raw_request(
        gw.addr(),
        b"GET /drillster/x HTTP/1.1\r\nHost: g\r\nX-Forwarded-For: 10.1.2.3\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 403);
    assert_eq!(
        resp.header("tokengate-error").as_deref(),
        Some("client_not_allowed")
    );
    assert_eq!(resp.json()["error"], "client_not_allowed");
    assert_eq!(sandbox.api.requests(), 0);
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_usable_token_means_503_with_retry_after_never_an_unauthenticated_request() {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox
        .drillster
        .faults()
        .fail_with(http::StatusCode::INTERNAL_SERVER_ERROR);
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    let r = reqwest::get(gw.url("/drillster/x")).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["tokengate-error"], "token_unavailable");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert_eq!(
        sandbox.api.requests(),
        0,
        "nothing forwarded without a token"
    );

    let ready = reqwest::get(format!("{}/readyz", gw.admin)).await.unwrap();
    assert_eq!(ready.status(), 503);
    let v: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(v["routes_without_token"], serde_json::json!(["drillster"]));
    // The listener just served a request: only the token is missing.
    assert_eq!(v.get("listeners_not_accepting"), None, "{v}");
    let metrics = gw.metrics().await;
    assert!(metrics
        .contains("tokengate_token_requests_total{outcome=\"http_error\",route=\"drillster\"}"));

    // Recovery without a restart.
    sandbox.drillster.faults().stop_failing();
    gw.ready().await;
    let r = reqwest::get(gw.url("/drillster/x")).await.unwrap();
    assert_eq!(r.status(), 200);
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_endpoints_report_without_secrets() {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    let echo = get_echo(&gw, "/drillster/x").await;
    let token = echo
        .header("authorization")
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_string();

    let health = reqwest::get(format!("{}/healthz", gw.admin)).await.unwrap();
    assert_eq!(health.status(), 200);
    let status = reqwest::get(format!("{}/status", gw.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["routes"][0]["name"], "drillster");
    assert_eq!(v["routes"][0]["grant"], "jwt_bearer");
    assert_eq!(v["routes"][0]["token"]["usable"], true);
    assert!(v["routes"][0]["token"]["expires_at"].as_u64().unwrap() > 0);
    // Every time also as RFC 3339, the same second.
    let t = &v["routes"][0]["token"];
    for key in ["expires_at", "last_refresh"] {
        let text = t[format!("{key}_rfc3339")].as_str().unwrap();
        assert!(text.ends_with('Z'), "{key}: {text}");
        let parsed = humantime::parse_rfc3339(text).unwrap();
        let unix = parsed
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(unix, t[key].as_u64().unwrap(), "{key}");
    }
    assert_eq!(t["last_error_at_rfc3339"], serde_json::Value::Null);
    assert_eq!(v["shutting_down"], false);
    let metrics = gw.metrics().await;
    for name in [
        "tokengate_requests_total{code=\"200\",route=\"drillster\"} 1",
        "tokengate_request_duration_seconds_count{route=\"drillster\"} 1",
        "tokengate_token_requests_total{outcome=\"success\",route=\"drillster\"} 1",
        "tokengate_token_expiry_timestamp_seconds{route=\"drillster\"}",
        "tokengate_token_consecutive_failures{route=\"drillster\"} 0",
        "tokengate_build_info{version=",
    ] {
        assert!(metrics.contains(name), "missing {name}");
    }
    for text in [&status, &metrics] {
        for secret in [
            token.as_str(),
            keys::DRILLSTER_CLIENT_SECRET,
            keys::DRIFTROCK_CLIENT_SECRET,
            "PRIVATE KEY",
        ] {
            assert!(!text.contains(secret), "admin output leaks a secret");
        }
    }
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

/// The admin listener ends an HTTP/1.0 connection after its answer unless asked to keep it
/// (RFC 9112 §9.3), and keeps an HTTP/1.1 one for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_follows_the_clients_connection_wishes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    let addr = gw.admin.trim_start_matches("http://").to_string();
    let exchange = |request: &'static str| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut raw)).await;
            (closed.is_ok(), String::from_utf8_lossy(&raw).to_string())
        }
    };
    for request in [
        "GET /healthz HTTP/1.0\r\n\r\n",
        "GET /healthz HTTP/1.0\r\nConnection: Close\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ] {
        let (closed, text) = exchange(request).await;
        assert!(closed, "{request:?}: left open; got {text}");
        assert!(text.contains(r#"{"ok":true}"#), "{request:?}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
    }
    for request in [
        "GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        let (closed, text) = exchange(request).await;
        assert!(!closed, "{request:?}: closed; got {text}");
    }
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

#[test]
fn demo_curl_lines_answer_as_the_service_account_and_as_a_managed_user() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let demo = tokengate::demo::Demo::start(
        &runtime,
        Some(common::free_addr()),
        Some(common::free_addr()),
        Some(common::free_addr()),
    )
    .unwrap();
    let token_listen = demo.gateway.token.expect("the demo has a token listener");
    let lines =
        tokengate::demo::curl_lines(demo.gateway.listen[0], demo.gateway.admin, token_listen);
    // The first line is: curl -s -H 'Authorization: Basic …' http://LISTEN/drillster/…
    let url = lines[0].split_whitespace().last().unwrap().to_string();
    assert!(url.ends_with("/drillster/api/2.1.1/user"), "{url}");
    let echo: Echo = runtime.block_on(async {
        let r = reqwest::Client::new()
            .get(&url)
            .header("Authorization", "Basic bGVnYWN5OnBhc3N3b3Jk")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    });
    assert_eq!(echo.authorization_count, 1);
    assert_ne!(
        echo.header("authorization"),
        Some("Basic bGVnYWN5OnBhc3N3b3Jk")
    );

    // The per-user lines: a managed user's token from the token listener, and a call as that
    // user (curl -s 'URL', and curl -s -H 'Tokengate-Subject: USER' URL).
    let token_line = lines.iter().find(|l| l.contains("/v1/token/")).unwrap();
    let token_url = token_line.split('\'').nth(1).unwrap().to_string();
    let user_line = lines
        .iter()
        .find(|l| l.contains("Tokengate-Subject"))
        .unwrap();
    let user = user_line.split('\'').nth(1).unwrap();
    let (name, user) = user.split_once(": ").unwrap();
    let user_url = user_line.split_whitespace().last().unwrap().to_string();
    let (token, echo): (serde_json::Value, Echo) = runtime.block_on(async {
        let client = reqwest::Client::new();
        let r = client.get(&token_url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let token = r.json().await.unwrap();
        let r = client
            .get(&user_url)
            .header(name, user)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        (token, r.json().await.unwrap())
    });
    assert_eq!(token["subject"], user);
    let issued = demo
        .sandbox
        .drillster
        .registry()
        .get(token["access_token"].as_str().unwrap());
    assert!(issued.is_some_and(|t| t.subject == user));
    assert_eq!(echo.subject.as_deref(), Some(user));
    assert_eq!(
        echo.header("authorization"),
        Some(format!("Bearer {}", token["access_token"].as_str().unwrap()).as_str())
    );
    assert!(echo.header("tokengate-subject").is_none());
    drop(demo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_upstream_is_502_upstream_unreachable() {
    let sandbox = Sandbox::start().await.unwrap();
    let closed = common::free_addr();
    let api = sandbox.api.base_url();
    let gw = TestGateway::start(config_for(&sandbox, |t| {
        t.replacen(
            &format!("upstream = \"{api}\""),
            &format!("upstream = \"http://{closed}\""),
            1,
        )
    }))
    .await;
    gw.ready().await;
    let r = reqwest::get(gw.url("/drillster/x?access_token=q-secret"))
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["tokengate-error"], "upstream_unreachable");
    let body = r.text().await.unwrap();
    assert!(!body.contains("q-secret"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["route"], "drillster");
    let m = gw.metrics().await;
    assert!(
        m.contains("tokengate_upstream_errors_total{kind=\"connect\",route=\"drillster\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tokengate_requests_total{code=\"502\",route=\"drillster\"} 1"),
        "{m}"
    );
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

/// A request whose client leaves before the response is counted with `code="0"` (no response),
/// on the fast path and on pingora-proxy's path (a chunked body), never as a real status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_left_is_counted_as_code_0() {
    use tokio::io::AsyncWriteExt;
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    sandbox.api.faults().set_latency(Duration::from_millis(400));
    for request in [
        &b"GET /drillster/leave HTTP/1.1\r\nHost: g\r\n\r\n"[..],
        b"POST /drillster/leave HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
        s.write_all(request).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Gone before the upstream answers, with a reset, as a client that gives up does.
        s.set_zero_linger().unwrap();
        drop(s);
    }
    let want = "tokengate_requests_total{code=\"0\",route=\"drillster\"} 2";
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let m = gw.metrics().await;
        if m.contains(want) || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(metrics.contains(want), "{metrics}");
    assert!(!metrics.contains("code=\"100\""), "{metrics}");
    assert!(metrics.contains("tokengate_request_duration_seconds_count{route=\"drillster\"} 2"));
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

/// `tokengate_connections` counts open client connections on both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_client_connections_are_counted() {
    use tokio::io::AsyncWriteExt;
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    let open = |m: String| {
        m.lines()
            .find_map(|l| l.strip_prefix("tokengate_connections "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    // The readiness probe's connections are gone.
    assert!(
        common::poll_until(Duration::from_secs(5), || async {
            open(gw.metrics().await) == Some(0.0)
        })
        .await,
        "{:?}",
        open(gw.metrics().await)
    );
    let mut conns = Vec::new();
    for request in [
        &b"GET /drillster/a HTTP/1.1\r\nHost: gw\r\n\r\n"[..],
        b"POST /drillster/b HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /driftrock/c HTTP/1.1\r\nHost: gw\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
        s.write_all(request).await.unwrap();
        let r = crate::proxy_support::read_answer(&mut s, &mut Vec::new()).await;
        assert_eq!(r.status, 200, "{}", r.head);
        conns.push(s);
    }
    assert_eq!(open(gw.metrics().await), Some(3.0));
    drop(conns);
    assert!(
        common::poll_until(Duration::from_secs(5), || async {
            open(gw.metrics().await) == Some(0.0)
        })
        .await,
        "closed connections are no longer counted"
    );
}
