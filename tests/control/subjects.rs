//! Per-user tokens (`[routes.subjects]`, docs/per-user-tokens.md) against the sandbox's
//! Drillster-like server on loopback: the token listener, calls as a user on the proxy
//! listener, single flight and per-subject backoff.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::common;
use common::{config_for, free_addr, TestGateway};
use tokengate_sandbox::keys::DEMO_SERVICE_ACCOUNT_ID;
use tokengate_sandbox::{Echo, Sandbox};

pub(crate) const USERS: &[&str] = &["ann@example.com", "bob@example.com"];

/// The Drillster route's `[routes.subjects]` in most tests here.
pub(crate) const SUBJECTS: &str = "allow = [\"[^@]+@example\\\\.com\"]\nheader = \"Tokengate-Subject\"\nheader_clients = [\"127.0.0.1/32\"]\nmax_cached = 100\n";

/// The demo config text with a token listener at `token_listen`, `server_extra` in `[server]`
/// and `subjects` as the Drillster route's `[routes.subjects]`.
pub(crate) fn with_subjects(
    text: String,
    token_listen: std::net::SocketAddr,
    server_extra: &str,
    subjects: &str,
) -> String {
    let text = text.replace(
        "grace_period = \"0s\"\n",
        &format!("grace_period = \"0s\"\ntoken_listen = \"{token_listen}\"\n{server_extra}"),
    );
    text.replace(
        "\n[[routes]]\nname = \"driftrock\"",
        &format!("\n[routes.subjects]\n{subjects}\n[[routes]]\nname = \"driftrock\""),
    )
}

/// The demo config with a token listener and `[routes.subjects]` on the Drillster route.
fn subjects_config(sandbox: &Sandbox) -> (tokengate::config::Config, std::net::SocketAddr) {
    subjects_config_with(sandbox, "", SUBJECTS)
}

/// [`subjects_config`] with `server_extra` in `[server]` and `subjects` as `[routes.subjects]`.
pub(crate) fn subjects_config_with(
    sandbox: &Sandbox,
    server_extra: &str,
    subjects: &str,
) -> (tokengate::config::Config, std::net::SocketAddr) {
    let token_listen = free_addr();
    let config = config_for(sandbox, |t| {
        with_subjects(t, token_listen, server_extra, subjects)
    });
    (config, token_listen)
}

pub(crate) fn managed(sandbox: &Sandbox) {
    let mut users = USERS.to_vec();
    users.push(DEMO_SERVICE_ACCOUNT_ID);
    users.push("carol@example.com");
    sandbox.drillster.set_managed_users(Some(&users));
}

#[tokio::test]
async fn token_listener_hands_out_per_user_tokens_and_refuses_the_rest() {
    let sandbox = Sandbox::start().await.unwrap();
    managed(&sandbox);
    let (config, token_listen) = subjects_config(&sandbox);
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    let client = reqwest::Client::new();
    let url = |route: &str, subject: &str| {
        format!("http://{token_listen}/v1/token/{route}?subject={subject}")
    };

    let r = client
        .get(url("drillster", "ann@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["subject"], "ann@example.com");
    assert!(body["expires_in"].as_u64().unwrap() > 0);
    let token = body["access_token"].as_str().unwrap().to_string();
    let claims = sandbox.drillster.registry().get(&token);
    assert!(
        claims.is_some_and(|t| t.subject == "ann@example.com"),
        "the token is ann's"
    );

    // A prefix of an allowed subject, a subject outside allow, odd characters: 403.
    for bad in [
        "ann@example.com.evil.org",
        "mallory@evil.org",
        "ann%0A@example.com",
        // Matches the pattern, but a space is no character of a user id or e-mail address.
        "ann%20bob@example.com",
        "x@example.com%00",
        "",
    ] {
        let r = client.get(url("drillster", bad)).send().await.unwrap();
        assert_eq!(r.status(), 403, "{bad}");
        assert_eq!(r.headers()["tokengate-error"], "subject_not_allowed");
    }
    // A route without [routes.subjects]: 404.
    let r = client
        .get(url("driftrock", "ann@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["tokengate-error"], "no_route");
    // An allowed pattern, but a user the authorization server does not manage: 503, backed off.
    let r = client
        .get(url("drillster", "zed@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    // The service account's token and other users are not delayed by the failing one.
    let r = client
        .get(url("drillster", "bob@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client.get(gw.url("/drillster/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tokengate_vended_tokens_total{route=\"drillster\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tokengate_subject_tokens{route=\"drillster\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("ann@example.com"),
        "no metric names a subject"
    );
    let status = reqwest::get(format!("{}/status", gw.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    // ann, bob, and zed backing off.
    assert_eq!(v["routes"][0]["subject_tokens"], 3, "{status}");
    assert!(v["routes"][1].get("subject_tokens").is_none());
    assert!(!status.contains("ann@example.com"), "{status}");
    assert!(!status.contains(&token), "{status}");
    gw.stop().await;
}

#[tokio::test]
async fn two_hundred_requests_for_a_new_subject_share_one_token_request() {
    let sandbox = Sandbox::start().await.unwrap();
    managed(&sandbox);
    let (config, _) = subjects_config(&sandbox);
    let gw = Arc::new(TestGateway::start(config).await);
    gw.ready().await;
    let before = sandbox.drillster.requests();
    sandbox
        .drillster
        .faults()
        .set_latency(std::time::Duration::from_millis(300));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (client, url) = (client.clone(), gw.url("/drillster/x"));
            tokio::spawn(async move {
                let r = client
                    .get(url)
                    .header("Tokengate-Subject", "carol@example.com")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let echo: Echo = r.json().await.unwrap();
                assert!(
                    echo.header("tokengate-subject").is_none(),
                    "the field is removed"
                );
                echo.header("authorization").unwrap().to_string()
            })
        })
        .collect();
    let mut tokens = BTreeSet::new();
    for t in tasks {
        tokens.insert(t.await.unwrap());
    }
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        sandbox.drillster.requests() - before,
        1,
        "one token request"
    );
    let token = tokens.into_iter().next().unwrap();
    let issued = sandbox
        .drillster
        .registry()
        .get(token.trim_start_matches("Bearer "));
    assert!(issued.is_some_and(|t| t.subject == "carol@example.com"));
    let gw = Arc::try_unwrap(gw).ok().expect("sole owner");
    gw.stop().await;
}

#[tokio::test]
async fn a_subject_field_is_honoured_only_when_trusted_once_and_allowed() {
    let sandbox = Sandbox::start().await.unwrap();
    managed(&sandbox);
    let (config, _) = subjects_config(&sandbox);
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    let service = common::raw_request(
        gw.addr(),
        b"GET /drillster/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(service.status, 200);
    let service_auth = service.echo().header("authorization").unwrap().to_string();
    for req in [
        // Twice.
        &b"GET /drillster/x HTTP/1.1\r\nHost: a\r\nTokengate-Subject: ann@example.com\r\ntokengate_subject: bob@example.com\r\nConnection: close\r\n\r\n"[..],
        // Empty.
        b"GET /drillster/x HTTP/1.1\r\nHost: a\r\nTokengate-Subject: \r\nConnection: close\r\n\r\n",
        // Outside allow.
        b"GET /drillster/x HTTP/1.1\r\nHost: a\r\nTokengate-Subject: mallory@evil.org\r\nConnection: close\r\n\r\n",
    ] {
        let r = common::raw_request(gw.addr(), req).await;
        assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(req));
        assert_eq!(r.header("tokengate-error").as_deref(), Some("subject_not_allowed"));
    }
    let ann = common::raw_request(
        gw.addr(),
        b"GET /drillster/x HTTP/1.1\r\nHost: a\r\nTOKENGATE-SUBJECT: ann@example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(ann.status, 200);
    let echo = ann.echo();
    assert!(echo.header("tokengate-subject").is_none());
    assert_ne!(echo.header("authorization").unwrap(), service_auth);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tokengate_denied_total{reason=\"subject_not_allowed\"} 3"),
        "{metrics}"
    );
    gw.stop().await;
}

/// Another loopback address: a client inside the default `allowed_clients` that the tests'
/// `token_clients` and `header_clients` leave out.
const OTHER_CLIENT: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

#[tokio::test]
async fn the_token_listener_answers_only_token_clients() {
    let sandbox = Sandbox::start().await.unwrap();
    managed(&sandbox);
    let (config, token_listen) =
        subjects_config_with(&sandbox, "token_clients = [\"127.0.0.2/32\"]\n", SUBJECTS);
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    let request = b"GET /v1/token/drillster?subject=ann@example.com HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let before = sandbox.drillster.requests();

    // 127.0.0.1 is outside token_clients: refused before any token request.
    let r = common::raw_request(token_listen, request).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("tokengate-error").as_deref(),
        Some("client_not_allowed")
    );
    assert!(!String::from_utf8_lossy(&r.body).contains("access_token"));
    assert_eq!(sandbox.drillster.requests(), before, "no token request");

    // 127.0.0.2 is inside.
    let r = common::raw_request_from(OTHER_CLIENT, token_listen, request).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    let body = r.json();
    let claims = sandbox
        .drillster
        .registry()
        .get(body["access_token"].as_str().unwrap());
    assert!(claims.is_some_and(|t| t.subject == "ann@example.com"));

    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tokengate_denied_total{reason=\"client_not_allowed\"} 1"),
        "{metrics}"
    );
    gw.stop().await;
}

/// The subject field from a client inside `allowed_clients` but outside `header_clients` is
/// refused, never served with the service account's token; requests without the field are
/// served as before on both proxy paths, and a trusted client's field is served as that user.
#[tokio::test]
async fn the_subject_field_is_refused_from_untrusted_clients_and_optional_on_both_paths() {
    let sandbox = Sandbox::start().await.unwrap();
    managed(&sandbox);
    let (config, _) = subjects_config(&sandbox);
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    let before = sandbox.drillster.requests();

    let r = common::raw_request_from(
        OTHER_CLIENT,
        gw.addr(),
        b"GET /drillster/x HTTP/1.1\r\nHost: a\r\nTokengate-Subject: ann@example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("tokengate-error").as_deref(),
        Some("subject_not_allowed")
    );
    assert_eq!(sandbox.drillster.requests(), before, "no token request");

    // Without the field: the service account, on the fast path and on pingora-proxy's (a
    // field nominated by `Connection` is one only pingora-proxy removes).
    for from in [OTHER_CLIENT, "127.0.0.1".parse().unwrap()] {
        for connection in [
            "Connection: close\r\n",
            "Connection: close, X-Hop\r\nX-Hop: 1\r\n",
        ] {
            let req = format!("GET /drillster/x HTTP/1.1\r\nHost: a\r\n{connection}\r\n");
            let r = common::raw_request_from(from, gw.addr(), req.as_bytes()).await;
            assert_eq!(r.status, 200, "{from} {connection}");
            let echo = r.echo();
            assert_eq!(echo.subject.as_deref(), Some(DEMO_SERVICE_ACCOUNT_ID));
            assert!(echo.header("x-hop").is_none());
        }
    }
    // With the field from a trusted client, on either path: the user. The first request waits
    // for bob's token on pingora-proxy's path; the last finds it cached, on the fast path.
    for connection in [
        "Connection: close\r\n",
        "Connection: close, X-Hop\r\nX-Hop: 1\r\n",
        "Connection: close\r\n",
    ] {
        let req = format!(
            "GET /drillster/x HTTP/1.1\r\nHost: a\r\nTokengate-Subject: bob@example.com\r\n{connection}\r\n"
        );
        let r = common::raw_request(gw.addr(), req.as_bytes()).await;
        assert_eq!(r.status, 200, "{connection}");
        let echo = r.echo();
        assert_eq!(echo.subject.as_deref(), Some("bob@example.com"));
        assert!(
            echo.header("tokengate-subject").is_none(),
            "the field is removed"
        );
        assert_eq!(echo.authorization_count, 1);
    }
    assert_eq!(
        sandbox.drillster.requests(),
        before + 1,
        "one token request: bob's"
    );
    gw.stop().await;
}

/// Per-user tokens on both listeners with an upstream 401 and a refused user (the scenario
/// `tests/log_hygiene.rs` also runs, checking every log line for tokens and assertions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_tokens_on_both_listeners_with_a_401_and_a_refused_user() {
    crate::scenarios::per_user_tokens_on_both_listeners_with_a_401_and_a_refused_user().await;
}
