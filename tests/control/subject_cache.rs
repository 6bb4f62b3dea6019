//! The per-user token cache (docs/per-user-tokens.md) against the sandbox's Drillster-like
//! server on loopback: at most `max_cached` subjects per route (least recently used evicted),
//! renewal while a subject is in use, a refused subject backing off alone, an upstream 401
//! dropping only that subject's token, the audit line, and reloaded `[routes.subjects]`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::common;
use crate::interop::log_lines;
use crate::subjects::{managed, subjects_config_with, with_subjects, SUBJECTS};
use common::{demo_key_path, eventually, free_addr, raw_request, raw_request_from, TestGateway};
use tokengate::config::Config;
use tokengate_sandbox::keys::DEMO_SERVICE_ACCOUNT_ID;
use tokengate_sandbox::Sandbox;

/// Tokens the sandbox has issued for `subject` (the assertion's `sub`).
fn issued_to(sandbox: &Sandbox, subject: &str) -> usize {
    let registry = sandbox.drillster.registry();
    registry
        .issued_tokens()
        .iter()
        .filter(|t| registry.get(t).is_some_and(|i| i.subject == subject))
        .count()
}

/// The value of the metric line starting with `line_start`.
fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
}

const CACHED: &str = "tokengate_subject_tokens{route=\"drillster\"}";

/// `GET /v1/token/drillster?subject=…` on the token listener from 127.0.0.1.
async fn vend(token_listen: SocketAddr, subject: &str) -> common::RawResponse {
    let req = format!(
        "GET /v1/token/drillster?subject={subject} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    );
    raw_request(token_listen, req.as_bytes()).await
}

/// The access token of a 200 from the token listener.
fn access_token(r: &common::RawResponse) -> String {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["access_token"].as_str().unwrap().to_string()
}

/// `GET /drillster/x` on the proxy listener as `subject` (from 127.0.0.1): (status, the
/// upstream's `Authorization`, the token's `sub`).
async fn as_user(gw: &TestGateway, subject: &str) -> (u16, Option<String>, Option<String>) {
    let req = format!(
        "GET /drillster/x HTTP/1.1\r\nHost: a\r\nTokengate-Subject: {subject}\r\nConnection: close\r\n\r\n"
    );
    let r = raw_request(gw.addr(), req.as_bytes()).await;
    if r.status != 200 {
        return (r.status, None, None);
    }
    let echo = r.echo();
    let auth = echo.header("authorization").map(str::to_string);
    (r.status, auth, echo.subject)
}

/// A subject evicted while a request waits for its first token: the token request in flight
/// still answers that request (no 503 after the wait limit), and the cache stays at its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_evicted_while_a_request_waits_still_gets_its_token() {
    let sandbox = Sandbox::start().await.unwrap();
    let (config, token_listen) = subjects_config_with(
        &sandbox,
        "",
        "allow = [\"u[0-9]+@example\\\\.com\"]\nmax_cached = 1\n",
    );
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    let faults = sandbox.drillster.faults();
    faults.hold();
    let first = tokio::spawn(async move { vend(token_listen, "u1@example.com").await });
    eventually(Duration::from_secs(10), "u1's token request", || async {
        faults.held() == 1
    })
    .await;
    // u2 takes the only place: u1 is evicted with its request waiting.
    let second = tokio::spawn(async move { vend(token_listen, "u2@example.com").await });
    eventually(Duration::from_secs(10), "u2's token request", || async {
        faults.held() == 2
    })
    .await;
    faults.release();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(first.status, 200, "{}", first.head);
    assert_eq!(second.status, 200, "{}", second.head);
    let route = &gw.handle.state().routes[0];
    assert_eq!(route.subjects.as_ref().unwrap().cached(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subjects_keep_at_most_max_cached_tokens_least_recently_used_evicted() {
    let sandbox = Sandbox::start().await.unwrap();
    let (config, token_listen) = subjects_config_with(
        &sandbox,
        "",
        "allow = [\"u[0-9]+@example\\\\.com\"]\nmax_cached = 100\n",
    );
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    let before = sandbox.drillster.requests();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            tokio::spawn(async move {
                for i in (w..1000).step_by(4) {
                    let r = vend(token_listen, &format!("u{i}@example.com")).await;
                    assert_eq!(r.status, 200, "u{i}");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(sandbox.drillster.requests() - before, 1000);
    assert_eq!(metric(&gw.metrics().await, CACHED), 100.0);
    let route = &gw.handle.state().routes[0];
    assert_eq!(route.subjects.as_ref().unwrap().cached(), 100);

    // One of the last hundred is still cached; the first was evicted long ago.
    let recent = (900..1000)
        .find(|i| {
            route
                .subjects
                .as_ref()
                .unwrap()
                .usable_now(&format!("u{i}@example.com"), None)
                .is_some()
        })
        .expect("a recent subject is cached");
    let requests = sandbox.drillster.requests();
    access_token(&vend(token_listen, &format!("u{recent}@example.com")).await);
    assert_eq!(
        sandbox.drillster.requests(),
        requests,
        "served from the cache"
    );
    access_token(&vend(token_listen, "u0@example.com").await);
    assert_eq!(sandbox.drillster.requests(), requests + 1, "u0 was evicted");
    assert_eq!(metric(&gw.metrics().await, CACHED), 100.0);
    let m = gw.metrics().await;
    assert!(!m.contains("u0@example.com"), "no metric names a subject");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subject_backs_off_alone_and_the_service_account_makes_no_token_request() {
    let sandbox = Sandbox::start().await.unwrap();
    managed(&sandbox);
    let (config, token_listen) = subjects_config_with(&sandbox, "", SUBJECTS);
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    let (status, ann, _) = as_user(&gw, "ann@example.com").await;
    assert_eq!(status, 200);
    let service = issued_to(&sandbox, DEMO_SERVICE_ACCOUNT_ID);
    let requests = sandbox.drillster.requests();

    // zed matches allow but is no user the authorization server manages: invalid_grant.
    let mut refused = 0;
    for i in 0..150 {
        let status = if i % 2 == 0 {
            vend(token_listen, "zed@example.com").await.status
        } else {
            as_user(&gw, "zed@example.com").await.0
        };
        assert_eq!(status, 503);
        refused += 1;
        // The service account and ann are served meanwhile, without waiting.
        if i % 30 == 0 {
            let r = raw_request(
                gw.addr(),
                b"GET /drillster/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert_eq!(r.status, 200);
            assert_eq!(r.echo().subject.as_deref(), Some(DEMO_SERVICE_ACCOUNT_ID));
            assert_eq!(as_user(&gw, "ann@example.com").await.1, ann);
        }
    }
    let r = vend(token_listen, "zed@example.com").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.header("tokengate-error").as_deref(),
        Some("token_unavailable")
    );
    assert!(r.header("retry-after").is_some());

    let zed_requests = sandbox.drillster.requests() - requests;
    assert!(
        zed_requests >= 1 && zed_requests * 10 < refused,
        "zed backs off: {zed_requests} token requests for {refused} refused requests"
    );
    assert_eq!(
        issued_to(&sandbox, DEMO_SERVICE_ACCOUNT_ID),
        service,
        "no token request for the service account"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tokengate_token_consecutive_failures{route=\"drillster\"}"
        ),
        0.0,
        "the route's own token is not failing"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_for_a_user_token_drops_that_subjects_token_only() {
    let sandbox = Sandbox::start().await.unwrap();
    managed(&sandbox);
    let (config, token_listen) = subjects_config_with(&sandbox, "", SUBJECTS);
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    let (_, ann, _) = as_user(&gw, "ann@example.com").await;
    let ann = ann.unwrap();
    let bob = access_token(&vend(token_listen, "bob@example.com").await);
    let service = raw_request(
        gw.addr(),
        b"GET /drillster/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .echo()
    .header("authorization")
    .unwrap()
    .to_string();
    let requests = sandbox.drillster.requests();

    assert!(sandbox
        .drillster
        .registry()
        .revoke(ann.trim_start_matches("Bearer ")));
    // The API refuses ann's token: dropped, one new token for ann, the request replayed.
    let (status, renewed, sub) = as_user(&gw, "ann@example.com").await;
    assert_eq!(status, 200);
    assert_eq!(sub.as_deref(), Some("ann@example.com"));
    assert_ne!(renewed.as_deref(), Some(ann.as_str()));
    assert_eq!(
        sandbox.drillster.requests(),
        requests + 1,
        "one token request"
    );
    assert_eq!(as_user(&gw, "ann@example.com").await.1, renewed);

    // Bob's token and the service account's are untouched.
    assert_eq!(
        access_token(&vend(token_listen, "bob@example.com").await),
        bob
    );
    let r = raw_request(
        gw.addr(),
        b"GET /drillster/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.echo().header("authorization"), Some(service.as_str()));
    assert_eq!(sandbox.drillster.requests(), requests + 1);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tokengate_upstream_unauthorized_total{action=\"replayed\",route=\"drillster\"}"
        ),
        1.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_token_is_renewed_while_in_use_and_dropped_when_not() {
    let sandbox = Sandbox::start().await.unwrap();
    managed(&sandbox);
    let (config, _) = subjects_config_with(&sandbox, "", SUBJECTS);
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    // Short tokens from now on: ann's are renewed every few seconds while she is in use.
    sandbox.drillster.set_token_lifetime(Duration::from_secs(6));
    let mut tokens = std::collections::BTreeSet::new();
    let mut served = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // Traffic as ann until her token has been renewed twice (an event, bounded only for a
    // loaded machine).
    while tokens.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "two renewals of ann's token"
        );
        let (status, auth, sub) = as_user(&gw, "ann@example.com").await;
        assert_eq!(status, 200, "ann is served throughout");
        assert_eq!(sub.as_deref(), Some("ann@example.com"));
        tokens.insert(auth.unwrap());
        served += 1;
        // Pacing, so the traffic leaves the machine to the gateway.
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    let subjects = Arc::clone(gw.handle.state().routes[0].subjects.as_ref().unwrap());
    let (source, _, _) = subjects
        .usable_now("ann@example.com", None)
        .expect("ann's token is cached");
    assert_eq!(
        source.waited_requests(),
        1,
        "only the first of {served} requests waited: renewals ran ahead of expiry"
    );
    drop(source);
    // Nobody asks for ann any more: her token is not renewed but dropped.
    let issued = issued_to(&sandbox, "ann@example.com");
    // Renewed at most once more (for the requests since the last renewal), then dropped.
    eventually(Duration::from_secs(30), "ann's token dropped", || async {
        subjects.cached() == 0
    })
    .await;
    assert_eq!(metric(&gw.metrics().await, CACHED), 0.0);
    assert!(issued_to(&sandbox, "ann@example.com") <= issued + 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_user_token_obtained_is_one_audit_line_and_no_token_is_logged() {
    crate::interop::captured_logs();
    let sandbox = Sandbox::start().await.unwrap();
    // Subjects no other test here uses: the log capture is process-wide.
    let (config, token_listen) = subjects_config_with(
        &sandbox,
        "",
        &SUBJECTS.replace("[^@]+@example", "audit-[a-z]+@example"),
    );
    let gw = TestGateway::start(config).await;
    gw.ready().await;

    access_token(&vend(token_listen, "audit-dora@example.com").await);
    access_token(&vend(token_listen, "audit-dora@example.com").await);
    let r = raw_request_from(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        gw.addr(),
        b"GET /drillster/x HTTP/1.1\r\nHost: a\r\nTokengate-Subject: audit-eve@example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);

    let jti_of = |subject: &str| {
        sandbox
            .drillster
            .recent_requests()
            .iter()
            .filter_map(|r| r.assertion_claims())
            .find(|c| c["sub"] == subject)
            .and_then(|c| c["jti"].as_str().map(str::to_string))
            .expect("a token request for the subject")
    };
    for subject in ["audit-dora@example.com", "audit-eve@example.com"] {
        let jti = jti_of(subject);
        let mut lines = Vec::new();
        eventually(Duration::from_secs(5), "the audit line", || {
            lines = log_lines()
                .into_iter()
                .filter(|l| {
                    l.contains("tokengate::audit") && l.contains(&format!("subject={subject}"))
                })
                .collect::<Vec<_>>();
            let found = !lines.is_empty();
            async move { found }
        })
        .await;
        assert_eq!(lines.len(), 1, "one line per token obtained: {lines:?}");
        let line = &lines[0];
        assert!(line.contains(" INFO "), "{line}");
        for part in [
            "route=drillster".to_string(),
            "caller=127.0.0.1".to_string(),
            format!("jti={jti}"),
            "expires=".to_string(),
        ] {
            assert!(line.contains(&part), "{part} in {line}");
        }
    }

    // No access token and no assertion of this sandbox in any line logged.
    let logs = log_lines().join("\n");
    let mut secrets = sandbox.drillster.registry().issued_tokens();
    secrets.extend(
        sandbox
            .drillster
            .recent_requests()
            .iter()
            .filter_map(|r| r.param("assertion").map(str::to_string)),
    );
    assert!(secrets.len() >= 4);
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a token or assertion was logged"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_allow_header_clients_and_max_cached_and_drops_disallowed_tokens() {
    let sandbox = Sandbox::start().await.unwrap();
    managed(&sandbox);
    let dir =
        std::env::temp_dir().join(format!("tokengate-subjects-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokengate.toml");
    let (listen, admin, token_listen) = (free_addr(), free_addr(), free_addr());
    let text = |subjects: &str| {
        let base = tokengate::demo::config_toml(&sandbox, listen, admin, &demo_key_path());
        with_subjects(base, token_listen, "", subjects)
    };
    std::fs::write(&path, text(SUBJECTS)).unwrap();
    let gw = TestGateway::start(Config::load(&path).unwrap()).await;
    gw.ready().await;

    let ann = access_token(&vend(token_listen, "ann@example.com").await);
    let bob = access_token(&vend(token_listen, "bob@example.com").await);
    let carol = access_token(&vend(token_listen, "carol@example.com").await);
    assert_eq!(metric(&gw.metrics().await, CACHED), 3.0);
    assert_eq!(
        as_user(&gw, "ann@example.com").await.1.unwrap(),
        format!("Bearer {ann}")
    );
    let requests = sandbox.drillster.requests();

    // bob is no longer allowed; only 127.0.0.2 may name a subject; one token kept.
    std::fs::write(
        &path,
        text(
            "allow = [\"(ann|carol)@example\\\\.com\"]\nheader = \"Tokengate-Subject\"\nheader_clients = [\"127.0.0.2/32\"]\nmax_cached = 1\n",
        ),
    )
    .unwrap();
    let summary = tokio::task::block_in_place(|| gw.handle.reload()).expect("reload applies");
    assert_eq!((summary.sources_kept, summary.sources_new), (2, 0));
    assert_eq!(metric(&gw.metrics().await, CACHED), 1.0);
    let subjects = Arc::clone(gw.handle.state().routes[0].subjects.as_ref().unwrap());
    assert!(
        subjects.usable_now("bob@example.com", None).is_none(),
        "bob's token dropped"
    );
    assert!(
        subjects.usable_now("ann@example.com", None).is_some(),
        "ann was the most recently used"
    );
    assert_eq!(sandbox.drillster.requests(), requests, "no token request");

    let r = vend(token_listen, "bob@example.com").await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("tokengate-error").as_deref(),
        Some("subject_not_allowed")
    );
    assert!(!String::from_utf8_lossy(&r.body).contains(&bob));
    assert_eq!(
        as_user(&gw, "ann@example.com").await.0,
        403,
        "127.0.0.1 no longer trusted"
    );
    let r = raw_request_from(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        gw.addr(),
        b"GET /drillster/x HTTP/1.1\r\nHost: a\r\nTokengate-Subject: ann@example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.echo().header("authorization").unwrap(),
        format!("Bearer {ann}")
    );
    // carol was evicted (max_cached = 1): a new token, and ann makes room for it.
    assert_ne!(
        access_token(&vend(token_listen, "carol@example.com").await),
        carol
    );
    assert_eq!(sandbox.drillster.requests(), requests + 1);
    assert_eq!(subjects.cached(), 1);
    assert_eq!(metric(&gw.metrics().await, CACHED), 1.0);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
