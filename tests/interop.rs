//! Authorization servers as widely used libraries build them, imitated by the sandbox's knobs:
//! Basic credentials that form-decoding, percent-decoding-only and raw-comparing servers all
//! read back (RFC 6749 §2.3.1, RFC 3986 §2.1, RFC 7617).

mod common;

use std::time::{Duration, SystemTime};

use http::StatusCode;
use tokengate::config::{AuthConfig, Config};
use tokengate::oauth::TokenClient;
use tokengate::sandbox::{basic_authorization, AuthServer, BasicDecoding, Echo, Sandbox};

use common::{config_for, TestGateway};

// ---------------------------------------------------------------------------------------------
// helpers

/// `value` as a TOML string.
fn toml_str(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

/// The `[routes.auth]` of a one-route config with `auth` as its lines.
fn auth_config(auth: &str) -> AuthConfig {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n\n[[routes]]\n\
         name = \"r\"\nupstream = \"http://127.0.0.1:9\"\n\n[routes.auth]\n{auth}\n"
    );
    let config = Config::from_toml_str(&text, None, &|_| None).unwrap_or_else(|e| panic!("{e}"));
    config.routes[0].auth.clone()
}

/// A client credentials client for `server` with `id` and `secret`, plus `extra` auth lines.
fn client(server: &AuthServer, id: &str, secret: &str, extra: &str) -> TokenClient {
    client_for(&format!(
        "grant = \"client_credentials\"\ntoken_endpoint = {}\nclient_id = {}\n\
         client_secret = {}\n{extra}",
        toml_str(&server.token_endpoint()),
        toml_str(id),
        toml_str(secret),
    ))
}

fn client_for(auth: &str) -> TokenClient {
    let auth = auth_config(auth);
    let timeout = auth.token_timeout;
    TokenClient::new(auth, None, Duration::from_secs(2), timeout).expect("client")
}

/// The `Authorization` the echo API saw for `GET path`, asserting a 200.
async fn upstream_auth(gw: &TestGateway, path: &str) -> String {
    let r = reqwest::get(gw.url(path)).await.expect("request");
    let status = r.status();
    let body = r.text().await.expect("body");
    assert_eq!(status, 200, "{path}: {body}");
    let echo: Echo = serde_json::from_str(&body).expect("echo");
    echo.header("authorization")
        .expect("authorization")
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Client authentication (RFC 6749 §2.3.1)

/// Client ids and secrets with every character whose encoding differs between decoders: space,
/// `+`, `%` (also before hex digits and before non-hex), `/`, `:`, `=`, `@`, `!`, `$` and
/// non-ASCII.
const CREDENTIALS: &[(&str, &str)] = &[
    ("dr/client 7", "s3cr+t/%41:y=z"),
    ("space id", "space secret "),
    ("plus+id", "plus+secret"),
    ("percent%41id%", "percent%zz%2"),
    ("slash/id", "/slash/secret/"),
    ("colon:id", "colon:secret:"),
    ("equals=id", "equals=secret=="),
    ("at@id", "at@secret"),
    ("bang!id", "bang!secret"),
    ("dollar$id", "dollar$secret$"),
    ("ünïcödé-日本", "sécret-€-😀"),
    ("all +%/:=@!$é", "all +%/:=@!$é~"),
];

/// The default `basic_encoding` (percent-encoding every byte outside RFC 3986's unreserved
/// set) is read back by servers that form-decode the credentials and by servers that only
/// percent-decode them; `basic_encoding = "raw"` by servers that compare them as sent (for ids
/// without `:`, which RFC 7617 §2 cannot carry). Each credential is checked against each style.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_credential_reaches_each_decoding_style_it_should() {
    let mut builder = AuthServer::driftrock();
    for (id, secret) in CREDENTIALS {
        builder = builder.client(*id, *secret);
    }
    let server = builder.start().await.expect("server");
    let fetch = |id: &'static str, secret: &'static str, extra: &'static str| {
        let client = client(&server, id, secret, extra);
        async move { client.fetch(SystemTime::now()).await }
    };
    for style in [BasicDecoding::Form, BasicDecoding::Percent] {
        server.set_basic_decoding(style);
        for (id, secret) in CREDENTIALS {
            let token = fetch(id, secret, "")
                .await
                .unwrap_or_else(|e| panic!("{style:?} server, id {id:?}: {e}"));
            let issued = server.registry().get(&token.value).expect("issued");
            assert_eq!(issued.client_id, *id, "{style:?}");
            // The bytes sent: only unreserved characters and %XX escapes, no `+`.
            let sent = server.last_request().expect("recorded");
            let basic = sent.header("authorization").expect("basic");
            let decoded = base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                basic.trim_start_matches("Basic "),
            )
            .expect("base64");
            assert!(
                decoded
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~%:".contains(b)),
                "{:?}",
                String::from_utf8_lossy(&decoded)
            );
            assert_eq!(decoded.iter().filter(|b| **b == b':').count(), 1);
        }
    }

    server.set_basic_decoding(BasicDecoding::Raw);
    for (id, secret) in CREDENTIALS.iter().filter(|(id, _)| !id.contains(':')) {
        let token = fetch(id, secret, "basic_encoding = \"raw\"")
            .await
            .unwrap_or_else(|e| panic!("raw server, id {id:?}: {e}"));
        assert_eq!(server.registry().get(&token.value).unwrap().client_id, *id);
        // Encoded, they are not what a raw-comparing server has on file: `raw` is needed.
        let e = fetch(id, secret, "").await.expect_err("encoded for raw");
        assert!(e.message.contains("invalid_client"), "{id:?}: {e}");
    }

    // Why `+` for a space fails: a percent-decoding-only server reads it as a `+`.
    server.set_basic_decoding(BasicDecoding::Percent);
    let plus = basic_authorization("dr/client 7", "s3cr+t/%41:y=z");
    let r = reqwest::Client::new()
        .post(server.token_endpoint())
        .header("authorization", plus)
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    server.shutdown().await.expect("no handler panics");
}

/// The Driftrock route of the demo (client id `dr/client 7`) gets its token from a server that
/// only percent-decodes the Basic credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_percent_decoding_server_gives_the_route_its_token() {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox.driftrock.set_basic_decoding(BasicDecoding::Percent);
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    assert!(upstream_auth(&gw, "/driftrock/v2/x")
        .await
        .starts_with("Bearer "));
    assert_eq!(sandbox.driftrock.failures(), 0);
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}
