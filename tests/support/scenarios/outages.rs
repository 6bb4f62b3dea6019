//! Outages and limits, with readiness and gauges: a cached token through an outage, hanging
//! token endpoints, Retry-After, cold starts, short tokens.

use super::*;

const FAILS: &str = "tokengate_token_consecutive_failures{route=\"drillster\"}";
const EXPIRY: &str = "tokengate_token_expiry_timestamp_seconds{route=\"drillster\"}";

/// 20 s tokens renewed at 30 % of their life, token endpoint failing (500) before the first
/// renewal: the cached token until it is no longer usable (at 13 s), then 503
/// `token_unavailable` with `Retry-After` and nothing forwarded; `/readyz` stays 200 naming the
/// route without a usable token, and the gauges tell the story; recovery without a restart. (When the token stops being usable, exactly:
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
    // The route had a token once: the replica stays ready (its requests get 503 from the
    // gateway itself), and /readyz names the route without a usable token.
    let (ready, body) = readyz(&gw).await;
    assert_eq!(ready, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(
        body["routes_without_usable_token"],
        serde_json::json!(["drillster"])
    );
    assert_eq!(body.get("routes_without_token"), None, "{body}");
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
        token_status(&gw, "drillster").await["usable"] == true
    })
    .await;
    let (ready, body) = readyz(&gw).await;
    assert_eq!(
        (ready, body.get("routes_without_usable_token")),
        (200, None)
    );
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
    // and the backoff (at least 0.5 s). Arrivals, not starts, are what the server sees: a
    // request delayed on its way by a loaded machine shortens the gap after it, so the bound
    // keeps 0.5 s of slack and still fails for two fetches at once or one without its timeout.
    let gaps = arrival_gaps(&sandbox.drillster, since);
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(1000)),
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
    // The route had a token: still ready, naming the route without a usable one.
    let (ready, body) = readyz(&gw).await;
    assert_eq!(ready, 200, "{body}");
    assert_eq!(
        body["routes_without_usable_token"],
        serde_json::json!(["drillster"])
    );
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
        // Every token answered was published (a renewal may be on its way at any moment:
        // they agree between renewals).
        eventually(Duration::from_secs(10), "every token published", || async {
            token_status(&gw, route).await["generation"].as_u64() == Some(server.successes())
        })
        .await;
    }
    // Three renewals were published (generation 4 above), each requested at least 2.88 s after
    // the last; `exp` is whole seconds and the gauge truncates, so allow two seconds of rounding.
    let m = gw.metrics().await;
    assert_eq!(metric(&m, FAILS), 0.0);
    let moved = metric(&m, EXPIRY) - expiry0;
    assert!(
        moved >= 3.0 * (5.0 - 1.0) * 0.8 * 0.9 - 2.0,
        "expiry moved on {moved} s over three renewals"
    );
    let gw = Arc::try_unwrap(gw).ok().expect("sole owner");
    finish(gw, sandbox).await
}
