//! Route selection and client authentication variants through the gateway: a route's own
//! listener, `host` routes, longest prefix; `basic_encoding = "raw"` and `client_secret_post`.

use crate::common;

use common::{config_for, free_addr, raw_request, TestGateway};
use tokengate_sandbox::{
    keys, AuthServer, BasicDecoding, Echo, Sandbox, SandboxApi, TokenRegistry,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_listener_then_host_then_longest_prefix() {
    let sandbox = Sandbox::start().await.unwrap();
    let own = free_addr();
    let gw = TestGateway::start(config_for(&sandbox, |t| {
        // drillster: a listener of its own; driftrock: only for Host api.driftrock.internal,
        // plus a catch-all "/" route using the Drillster grant under another name.
        let t = t.replacen(
            "name = \"drillster\"\npath_prefix = \"/drillster\"\n",
            &format!("name = \"drillster\"\nlisten = \"{own}\"\npath_prefix = \"/drillster\"\n"),
            1,
        );
        let t = t.replacen(
            "name = \"driftrock\"\npath_prefix = \"/driftrock\"\n",
            "name = \"driftrock\"\nhost = \"api.driftrock.internal\"\npath_prefix = \"/driftrock\"\n",
            1,
        );
        let fallback = t[t.find("[[routes]]").unwrap()..t.rfind("[[routes]]").unwrap()]
            .replacen("name = \"drillster\"", "name = \"fallback\"", 1)
            .replacen(&format!("listen = \"{own}\"\n"), "", 1)
            .replacen("path_prefix = \"/drillster\"", "path_prefix = \"/\"", 1)
            .replacen("strip_prefix = true", "strip_prefix = false", 1);
        format!("{t}\n{fallback}")
    }))
    .await;
    gw.ready().await;

    // Own listener: everything there goes to drillster, whatever the path.
    let r = raw_request(
        own,
        b"GET /any/path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let e = r.echo();
    assert_eq!(e.issuer.as_deref(), Some("drillster"));
    assert_eq!(
        e.path, "/any/path",
        "a route's own listener matches everything (prefix not stripped when absent)"
    );

    // Host route: only with the right Host header (any case, with a port).
    let r = raw_request(
        gw.addr(),
        b"GET /driftrock/v2/x HTTP/1.1\r\nHost: API.Driftrock.Internal:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.echo().issuer.as_deref(), Some("driftrock"));
    assert_eq!(r.echo().path, "/v2/x");

    // Other host: the driftrock route does not match, the "/" fallback does (unstripped).
    let r = raw_request(
        gw.addr(),
        b"GET /driftrock/v2/x HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().issuer.as_deref(), Some("drillster"));
    assert_eq!(r.echo().path, "/driftrock/v2/x");
    let m = gw.metrics().await;
    assert!(
        m.contains("tokengate_requests_total{code=\"200\",route=\"fallback\"} 1"),
        "{m}"
    );
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

/// A client credentials route against a server configured with `server`, the gateway using
/// `auth_lines` in `[routes.auth]`.
async fn client_credentials_route(
    configure: impl FnOnce(tokengate_sandbox::AuthServerBuilder) -> tokengate_sandbox::AuthServerBuilder,
    auth_lines: &str,
) -> (AuthServer, Echo) {
    let registry = TokenRegistry::new();
    let server = configure(
        AuthServer::driftrock()
            .client(keys::DRIFTROCK_CLIENT_ID, keys::DRIFTROCK_CLIENT_SECRET)
            .registry(registry.clone()),
    )
    .start()
    .await
    .unwrap();
    let api = SandboxApi::start(registry).await.unwrap();
    let toml = format!(
        r#"[server]
listen = "{}"
admin_listen = "{}"
[[routes]]
name = "cc"
upstream = "{}"
[routes.auth]
grant = "client_credentials"
token_endpoint = "{}"
client_id = "{}"
client_secret = "{}"
scope = "events:write"
audience = "https://api.example"
resource = "https://api.example/v2"
{auth_lines}
"#,
        free_addr(),
        free_addr(),
        api.base_url(),
        server.token_endpoint(),
        keys::DRIFTROCK_CLIENT_ID,
        keys::DRIFTROCK_CLIENT_SECRET,
    );
    let config = tokengate::config::Config::from_toml_str(&toml, None, &|_| None).unwrap();
    let gw = TestGateway::start(config).await;
    let r = reqwest::get(gw.url("/v2/event")).await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", server.last_request());
    let echo: Echo = r.json().await.unwrap();
    gw.stop().await;
    api.shutdown().await.unwrap();
    (server, echo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_basic_encoding_for_servers_that_compare_raw_values() {
    let (server, echo) = client_credentials_route(
        |b| b.basic_decoding(BasicDecoding::Raw),
        "basic_encoding = \"raw\"",
    )
    .await;
    assert_eq!(echo.subject.as_deref(), Some(keys::DRIFTROCK_CLIENT_ID));
    let req = server.last_request().unwrap();
    assert_eq!(
        req.header("authorization"),
        Some(
            tokengate_sandbox::basic_authorization_raw(
                keys::DRIFTROCK_CLIENT_ID,
                keys::DRIFTROCK_CLIENT_SECRET
            )
            .as_str()
        )
    );
    assert_eq!(req.param("scope"), Some("events:write"));
    assert_eq!(req.param("audience"), Some("https://api.example"));
    assert_eq!(req.param("resource"), Some("https://api.example/v2"));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_secret_post_sends_credentials_in_the_form() {
    let (server, echo) = client_credentials_route(
        |b| b.client_secret_post(true).client_secret_basic(false),
        "client_auth = \"client_secret_post\"",
    )
    .await;
    assert_eq!(echo.subject.as_deref(), Some(keys::DRIFTROCK_CLIENT_ID));
    let req = server.last_request().unwrap();
    assert_eq!(req.header("authorization"), None);
    assert_eq!(req.param("client_id"), Some(keys::DRIFTROCK_CLIENT_ID));
    assert_eq!(
        req.param("client_secret"),
        Some(keys::DRIFTROCK_CLIENT_SECRET)
    );
    server.shutdown().await.unwrap();
}
