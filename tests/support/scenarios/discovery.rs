//! Token endpoint discovery (RFC 8414 §3, OpenID Connect Discovery 1.0 §4).

use super::*;

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
    eventually(Duration::from_secs(60), "three renewals", || async {
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
