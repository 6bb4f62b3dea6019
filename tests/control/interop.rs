//! Authorization servers as widely used libraries build them, imitated by the sandbox's knobs:
//! Basic credentials that form-decoding, percent-decoding-only and raw-comparing servers all
//! read back (RFC 6749 §2.3.1, RFC 3986 §2.1, RFC 7617); token responses in any content coding
//! (RFC 9110 §8.4), under any media type, or form-encoded; discovery errors that say what was
//! tried (RFC 8414 §3); and credentials deleted at the server while the gateway runs
//! (Drillster: Registering your client application).

use crate::common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use tokengate::config::{AuthConfig, Config};
use tokengate::oauth::{FetchOutcome, TokenClient};
use tokengate_sandbox::{
    basic_authorization, keys, AuthServer, BasicDecoding, CannedResponse, ContentCoding, Echo,
    ResponseFormat, Sandbox,
};

use crate::scenarios::token_status;
use common::{config_for, LogCapture, TestGateway};

// ---------------------------------------------------------------------------------------------
// building blocks

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

/// Every log line of this test binary (a process-wide subscriber, installed once).
pub(crate) fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn,tokengate=info"))
            .with_writer(LogCapture(Arc::clone(&logs)))
            .with_ansi(false)
            .try_init()
            .expect("the only subscriber in this binary");
        logs
    })
}

pub(crate) fn log_lines() -> Vec<String> {
    let logs = captured_logs().lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&logs)
        .lines()
        .map(str::to_owned)
        .collect()
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

// ---------------------------------------------------------------------------------------------
// Token responses as servers send them

/// Every content coding the server chooses (sent whatever `Accept-Encoding` says), every
/// JSON-ish or text media type, and form-encoded bodies are read; so are refusals in any of
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_responses_in_any_coding_media_type_or_form_are_read() {
    let server = AuthServer::driftrock()
        .client("c 1", "s+1")
        .start()
        .await
        .unwrap();
    // Opaque tokens: the lifetime can only come from expires_in.
    server.set_opaque_tokens(true);
    let good = client(&server, "c 1", "s+1", "");
    let codings = [
        None,
        Some(ContentCoding::Gzip),
        Some(ContentCoding::Deflate),
        Some(ContentCoding::Br),
    ];
    let json_types = [
        None,
        Some("application/json"),
        Some("text/plain; charset=utf-8"),
        Some("text/html"),
        Some("text/javascript"),
        Some("application/vnd.example.token+json; version=2"),
        Some("application/x-json"),
    ];
    let form_types = [
        None,
        Some("application/x-www-form-urlencoded; charset=utf-8"),
        Some("text/plain"),
    ];
    for coding in codings {
        server.set_content_coding(coding);
        for (format, types) in [
            (ResponseFormat::Json, &json_types[..]),
            (ResponseFormat::Form, &form_types[..]),
        ] {
            server.set_response_format(format);
            for content_type in types {
                server.set_content_type(*content_type);
                let token = good
                    .fetch(SystemTime::now())
                    .await
                    .unwrap_or_else(|e| panic!("{coding:?} {format:?} {content_type:?}: {e}"));
                assert!(
                    server.registry().get(&token.value).is_some(),
                    "the token as issued"
                );
                assert_eq!(token.lifetime, Duration::from_secs(3600), "expires_in read");
                let sent = server.last_request().unwrap();
                assert_eq!(sent.header("accept-encoding"), Some("gzip, deflate, br"));
                assert_eq!(sent.header("accept"), Some("application/json"));
            }
        }
        // A refusal in that coding is read too: its error, not "not JSON".
        let wrong = client(&server, "c 1", "nope", "");
        let e = wrong.fetch(SystemTime::now()).await.unwrap_err();
        assert_eq!(e.outcome, FetchOutcome::OAuthError, "{coding:?}: {e}");
        assert!(e.message.contains("invalid_client"), "{e}");
    }
    // The server codes whatever was asked for.
    server.set_content_coding(Some(ContentCoding::Gzip));
    let r = reqwest::Client::new()
        .post(server.token_endpoint())
        .header("accept-encoding", "identity")
        .header("authorization", "Basic Yzo=")
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    server.set_content_coding(None);

    // A form-encoded refusal.
    server.faults().respond_with_next(
        1,
        CannedResponse::new(StatusCode::UNAUTHORIZED)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("error=invalid_client&error_description=Client+secret+deleted"),
    );
    let e = good.fetch(SystemTime::now()).await.unwrap_err();
    assert_eq!(e.outcome, FetchOutcome::OAuthError);
    assert!(
        e.message
            .contains("\"invalid_client\": Client secret deleted"),
        "{e}"
    );
    // A coding tokengate does not know is named.
    server.faults().respond_with_next(
        1,
        CannedResponse::json(StatusCode::OK, "{}").header("content-encoding", "zstd"),
    );
    let e = good.fetch(SystemTime::now()).await.unwrap_err();
    assert_eq!(e.outcome, FetchOutcome::InvalidResponse);
    assert!(e.message.contains("\"zstd\" is not supported"), "{e}");
    server.shutdown().await.unwrap();
}

/// Through the gateway: a Drillster-like server answering form-encoded in Brotli and a
/// Driftrock-like one answering JSON labelled `text/plain` in gzip both give tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_reads_coded_and_form_encoded_token_responses() {
    let sandbox = Sandbox::start().await.unwrap();
    sandbox
        .drillster
        .set_content_coding(Some(ContentCoding::Br));
    sandbox.drillster.set_response_format(ResponseFormat::Form);
    sandbox
        .driftrock
        .set_content_coding(Some(ContentCoding::Gzip));
    sandbox.driftrock.set_content_type(Some("text/plain"));
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    for path in ["/drillster/api/2.1.1/user", "/driftrock/v2/event"] {
        assert!(upstream_auth(&gw, path).await.starts_with("Bearer "));
    }
    let t = token_status(&gw, "drillster").await;
    let left = t["expires_at"].as_f64().unwrap()
        - SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
    assert!((3500.0..=3601.0).contains(&left), "expires_in read: {left}");
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Discovery (RFC 8414 §3, OpenID Connect Discovery 1.0 §4)

/// A failed discovery names each metadata URL tried and why it failed: not found, not JSON,
/// an `issuer` mismatch (both values), a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_errors_name_every_url_and_why() {
    let server = AuthServer::drillster().start().await.unwrap();
    let issuer = server.issuer();
    let rfc8414 = format!("{issuer}/.well-known/oauth-authorization-server");
    let oidc = format!("{issuer}/.well-known/openid-configuration");
    let discover = |extra: &str| {
        let auth = format!(
            "grant = \"jwt_bearer\"\nissuer = \"{issuer}\"\nclient_id = \"{}\"\n\
             client_secret = \"{}\"\nkey_file = {}\n{extra}",
            keys::DRILLSTER_CLIENT_ID,
            keys::DRILLSTER_CLIENT_SECRET,
            toml_str(&common::demo_key_path().display().to_string()),
        );
        let client = client_for(&auth);
        async move { client.fetch(SystemTime::now()).await.unwrap_err() }
    };

    server.discovery_faults().respond_with_sequence([
        CannedResponse::json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#),
        CannedResponse::html(StatusCode::OK, "<html>login</html>"),
    ]);
    let e = discover("").await;
    assert_eq!(
        e.message,
        format!(
            "discovery found no usable metadata for issuer {issuer}; tried {rfc8414}: not \
             found (HTTP 404); {oidc}: not JSON"
        )
    );

    server.serve_metadata(false, true);
    server.set_metadata_issuer(tokengate_sandbox::JsonField::string("https://as.example"));
    let e = discover("").await;
    assert_eq!(
        e.message,
        format!(
            "discovery found no usable metadata for issuer {issuer}; tried {rfc8414}: not \
             found (HTTP 404); {oidc}: issuer \"https://as.example\" does not match the \
             configured issuer \"{issuer}\" (RFC 8414 §3.3)"
        )
    );
    assert_eq!(e.outcome, FetchOutcome::InvalidResponse);

    server.discovery_faults().set_hang(true);
    let started = Instant::now();
    let e = discover("token_timeout = \"1s\"").await;
    let took = started.elapsed();
    // Half the time each; the second gets what the first left (a timer may fire late).
    let expected = format!(
        "discovery found no usable metadata for issuer {issuer}; tried {rfc8414}: timed out \
         after 500ms; {oidc}: timed out after "
    );
    assert!(e.message.starts_with(&expected), "{}", e.message);
    let second: u64 = e.message[expected.len()..]
        .strip_suffix("ms")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("{}", e.message));
    assert!((400..=500).contains(&second), "{}", e.message);
    assert_eq!(e.outcome, FetchOutcome::NetworkError);
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert_eq!(server.requests(), 0, "no token request");
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Credentials deleted under a running gateway

/// The authorization server deletes the route's client secret (Driftrock-like: `invalid_client`)
/// or its service-account key (Drillster-like: `invalid_grant`, unknown kid) while the gateway
/// holds a valid token. The token keeps serving until it is no longer usable; each failed
/// renewal is one warn line with the server's error, at backoff pace (no tight loop); `/status`
/// shows it. Then requests get 503 `token_unavailable`, never a request without a token. (How
/// many refusals by when, and when the token stops being usable, exactly:
/// `token::paused_clock_tests`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_credentials_keep_the_token_until_expiry_and_back_off() {
    captured_logs();
    // 20 s opaque tokens (their lifetime is expires_in, exactly) renewed at 30 % of their
    // life, jittered: the first renewal fails at 5.4–6 s; the token stays usable until 13 s (a
    // margin of (1 − 0.3) / 2 of its life, under `min_time_left`).
    let sandbox = Sandbox::builder()
        .token_lifetime(Duration::from_secs(20))
        .start()
        .await
        .unwrap();
    sandbox.driftrock.set_opaque_tokens(true);
    sandbox.drillster.set_opaque_tokens(true);
    let config = config_for(&sandbox, |t| {
        t.replacen("name = \"driftrock\"", "name = \"deleted-secret\"", 1)
            .replacen("name = \"drillster\"", "name = \"deleted-key\"", 1)
            .replace("[routes.auth]\n", "[routes.auth]\nrefresh_ratio = 0.3\n")
    });
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    assert_eq!(
        (sandbox.driftrock.requests(), sandbox.drillster.requests()),
        (1, 1)
    );
    let paths = [
        ("deleted-secret", "/driftrock/v2/x", &sandbox.driftrock),
        ("deleted-key", "/drillster/api/x", &sandbox.drillster),
    ];
    let mut first = Vec::new();
    for (_, path, _) in &paths {
        first.push(upstream_auth(&gw, path).await);
    }
    assert!(sandbox
        .driftrock
        .delete_client_secret(keys::DRIFTROCK_CLIENT_ID, keys::DRIFTROCK_CLIENT_SECRET));
    assert!(sandbox.drillster.delete_key(keys::DEMO_KEY_ID));

    // The renewals are refused; the token still serves.
    common::eventually(Duration::from_secs(30), "refused renewals", || async {
        sandbox.driftrock.failures() >= 1 && sandbox.drillster.failures() >= 1
    })
    .await;
    for ((_, path, _), auth) in paths.iter().zip(&first) {
        assert_eq!(&upstream_auth(&gw, path).await, auth, "{path}");
    }
    // Then, past its usable life: 503, nothing forwarded; until then the same token.
    for ((_, path, _), auth) in paths.iter().zip(&first) {
        common::eventually(
            Duration::from_secs(30),
            "503 past the token's life",
            || async {
                let api_requests = sandbox.api.requests();
                let r = reqwest::get(gw.url(path)).await.unwrap();
                if r.status() == 200 {
                    let echo: Echo = r.json().await.unwrap();
                    assert_eq!(echo.header("authorization"), Some(auth.as_str()), "{path}");
                    return false;
                }
                assert_eq!(r.status(), 503, "{path}");
                assert_eq!(r.headers()["tokengate-error"], "token_unavailable");
                assert_eq!(
                    sandbox.api.requests(),
                    api_requests,
                    "forwarded without a token"
                );
                true
            },
        )
        .await;
    }
    // Retried at backoff pace: 0.5–1 s, then 1–2 s after a refusal (no tight loop).
    for (route, _, server) in &paths {
        common::eventually(Duration::from_secs(30), "three refusals", || async {
            server.failures() >= 3
        })
        .await;
        let times: Vec<Instant> = server
            .recent_requests()
            .iter()
            .map(|r| r.received)
            .collect();
        let refusals = &times[1..];
        assert!(
            refusals[1] - refusals[0] >= Duration::from_millis(499)
                && refusals[2] - refusals[1] >= Duration::from_millis(999),
            "{route}: {refusals:?}"
        );
    }

    let lines = log_lines();
    for ((route, _, server), (error, description)) in paths.iter().zip([
        ("invalid_client", "bad client secret"),
        ("invalid_grant", "unknown kid"),
    ]) {
        let t = token_status(&gw, route).await;
        let failures = server.failures();
        assert!(
            t["consecutive_failures"].as_u64().unwrap() >= failures - 1,
            "{route}: {t}"
        );
        let last_error = t["last_error"].as_str().unwrap();
        assert!(
            last_error.contains(error) && last_error.contains(description),
            "{route}: {last_error}"
        );
        assert!(!t["usable"].as_bool().unwrap(), "{t}");
        let warned: Vec<&String> = lines
            .iter()
            .filter(|l| {
                l.contains("token request failed") && l.contains(&format!("route={route} "))
            })
            .collect();
        // One line per refused request (the one in flight may not be logged yet).
        let now_failures = server.failures();
        assert!(
            warned.len() as u64 == now_failures || warned.len() as u64 + 1 == now_failures,
            "{route}: {} lines for {now_failures} refusals",
            warned.len()
        );
        for line in warned {
            assert!(line.contains(" WARN ") && line.contains(error), "{line}");
            assert!(!line.contains(keys::DRIFTROCK_CLIENT_SECRET), "{line}");
        }
    }
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}
