//! Per-user tokens (`[routes.subjects]`, docs/per-user-tokens.md) against the sandbox's
//! Drillster-like server on loopback: the token listener, calls as a user on the proxy
//! listener, single flight and per-subject backoff.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::common;
use common::{config_for, free_addr, TestGateway};
use tokengate_sandbox::keys::DEMO_SERVICE_ACCOUNT_ID;
use tokengate_sandbox::{Echo, Sandbox};

const USERS: &[&str] = &["ann@example.com", "bob@example.com"];

/// The demo config with a token listener and `[routes.subjects]` on the Drillster route.
fn subjects_config(sandbox: &Sandbox) -> (tokengate::config::Config, std::net::SocketAddr) {
    let token_listen = free_addr();
    let config = config_for(sandbox, |t| {
        let t = t.replace(
            "grace_period = \"0s\"\n",
            &format!("grace_period = \"0s\"\ntoken_listen = \"{token_listen}\"\n"),
        );
        t.replace(
            "\n[[routes]]\nname = \"driftrock\"",
            "\n[routes.subjects]\nallow = [\"[^@]+@example\\\\.com\"]\nheader = \"Tokengate-Subject\"\nheader_clients = [\"127.0.0.1/32\"]\nmax_cached = 100\n\n[[routes]]\nname = \"driftrock\"",
        )
    });
    (config, token_listen)
}

fn managed(sandbox: &Sandbox) {
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
