//! Per-user tokens (docs/per-user-tokens.md) on both listeners, for the log check: a managed
//! user's token from the token listener, calls as users on the proxy listener, an upstream 401
//! for a user's token, and a user the authorization server refuses.

use super::*;

/// The demo config with a token listener and `[routes.subjects]` on the Drillster route
/// (loopback clients may name `…@example.com` subjects); returns it with the token listener.
fn per_user_config(sandbox: &Sandbox) -> (Config, std::net::SocketAddr) {
    let token_listen = free_addr();
    let config = config_for(sandbox, |t| {
        t.replace(
            "grace_period = \"0s\"\n",
            &format!("grace_period = \"0s\"\ntoken_listen = \"{token_listen}\"\n"),
        )
        .replace(
            "\n[[routes]]\nname = \"driftrock\"",
            "\n[routes.subjects]\nallow = [\"[^@]+@example\\\\.com\"]\nheader = \"Tokengate-Subject\"\nheader_clients = [\"127.0.0.0/8\"]\n\n[[routes]]\nname = \"driftrock\"",
        )
    });
    (config, token_listen)
}

/// `GET /drillster/x` as `subject`: the status and the API's echo (when 200).
async fn as_user(client: &reqwest::Client, gw: &TestGateway, subject: &str) -> (u16, Option<Echo>) {
    let r = client
        .get(gw.url("/drillster/x"))
        .header("Tokengate-Subject", subject)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let echo = if status == 200 {
        Some(r.json().await.expect("echo"))
    } else {
        None
    };
    (status, echo)
}

pub async fn per_user_tokens_on_both_listeners_with_a_401_and_a_refused_user() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.drillster.set_managed_users(Some(&[
        keys::DEMO_SERVICE_ACCOUNT_ID,
        "ann@example.com",
        "bob@example.com",
    ]));
    let (config, token_listen) = per_user_config(&sandbox);
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    let client = reqwest::Client::new();

    let r = client
        .get(format!(
            "http://{token_listen}/v1/token/drillster?subject=ann%40example.com"
        ))
        .send()
        .await
        .expect("token listener");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    let ann = body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();

    let (status, echo) = as_user(&client, &gw, "bob@example.com").await;
    assert_eq!(status, 200);
    assert_eq!(
        echo.expect("echo").subject.as_deref(),
        Some("bob@example.com")
    );

    // The API refuses ann's token: dropped, renewed, the request replayed.
    assert!(sandbox.drillster.registry().revoke(&ann));
    let (status, echo) = as_user(&client, &gw, "ann@example.com").await;
    assert_eq!(status, 200);
    let echo = echo.expect("echo");
    assert_eq!(echo.subject.as_deref(), Some("ann@example.com"));
    assert_ne!(
        echo.header("authorization"),
        Some(format!("Bearer {ann}").as_str())
    );

    // A user the authorization server does not manage: 503, backed off.
    for _ in 0..3 {
        assert_eq!(as_user(&client, &gw, "zed@example.com").await.0, 503);
    }
    // A subject outside allow.
    assert_eq!(as_user(&client, &gw, "mallory@evil.example").await.0, 403);

    let seen = Seen::from_sandbox(&sandbox);
    gw.stop().await;
    seen
}
