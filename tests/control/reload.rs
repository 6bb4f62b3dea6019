//! Config reload (docs/operations.md "Reloading the config (SIGHUP)": SIGHUP reloads config,
//! secrets and key files; a new config that fails validation is rejected and the running one keeps
//! serving). In-process through `GatewayHandle::reload` (what the SIGHUP handler calls), and once
//! through the real binary and a real SIGHUP.

use crate::common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{demo_key_path, free_addr, raw_request, TestGateway};
use tokengate::config::Config;
use tokengate::gateway::ReloadError;
use tokengate_sandbox::{AuthServer, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A scratch directory for one test's config file, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("tokengate-reload-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn config(&self) -> PathBuf {
        self.0.join("tokengate.toml")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The demo config for `sandbox` on the given ports, with `extra` appended.
fn config_text(sandbox: &Sandbox, listen: SocketAddr, admin: SocketAddr, extra: &str) -> String {
    tokengate::demo::config_toml(sandbox, listen, admin, &demo_key_path()) + extra
}

/// A third route, `echo`, under `/echo` to the same API with the Driftrock credentials.
fn echo_route(sandbox: &Sandbox, client_secret: &str) -> String {
    format!(
        r#"
[[routes]]
name = "echo"
path_prefix = "/echo"
strip_prefix = true
upstream = "{api}"

[routes.auth]
grant = "client_credentials"
token_endpoint = "{endpoint}"
client_id = "{id}"
client_secret = "{client_secret}"
"#,
        api = sandbox.api.base_url(),
        endpoint = sandbox.driftrock.token_endpoint(),
        id = tokengate_sandbox::keys::DRIFTROCK_CLIENT_ID,
    )
}

async fn start_from_file(path: &Path) -> TestGateway {
    let gw = start_from_file_unready(path).await;
    gw.ready().await;
    gw
}

async fn start_from_file_unready(path: &Path) -> TestGateway {
    let config = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
    TestGateway::start(config).await
}

fn reload(gw: &TestGateway) -> Result<tokengate::gateway::ReloadSummary, ReloadError> {
    gw.handle.reload()
}

/// One request on an open keep-alive connection; returns (status, body).
async fn on_connection(conn: &mut tokio::net::TcpStream, path: &str) -> (u16, Vec<u8>) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
            .await
            .expect("answer within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .expect("content-length");
        if buf.len() >= end + 4 + len {
            let status = head[9..12].parse().unwrap();
            return (status, buf[end + 4..end + 4 + len].to_vec());
        }
    }
}

/// The status of `GET path` on a fresh connection to `listen`.
async fn status_of(listen: SocketAddr, path: &str) -> u16 {
    let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    raw_request(listen, req.as_bytes()).await.status
}

/// `tokengate run -c` the directory's config, its stderr to `stderr.log` there.
fn spawn_binary(dir: &Dir) -> (Gateway, PathBuf) {
    let stderr = dir.0.join("stderr.log");
    let child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["run", "-c"])
        .arg(dir.config())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    (Gateway(child), stderr)
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in metrics"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_adds_a_route_keeps_unchanged_tokens_and_reaches_open_connections() {
    let sandbox = Sandbox::start().await.unwrap();
    let dir = Dir::new("add");
    let (listen, admin) = (free_addr(), free_addr());
    std::fs::write(dir.config(), config_text(&sandbox, listen, admin, "")).unwrap();
    let gw = start_from_file(&dir.config()).await;

    let mut conn = tokio::net::TcpStream::connect(listen).await.unwrap();
    let (status, body) = on_connection(&mut conn, "/driftrock/v2/x").await;
    assert_eq!(status, 200);
    let echo: tokengate_sandbox::Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo.path, "/v2/x");
    let token_before = echo.header("authorization").unwrap().to_string();
    // (A 404 closes its connection: asked on another one.)
    assert_eq!(status_of(listen, "/echo/a").await, 404);
    let token_requests = (sandbox.drillster.requests(), sandbox.driftrock.requests());

    // New: route `echo`, and `driftrock` no longer strips its prefix (the fast path handles
    // that request on this connection: it must see the new route table).
    let text = config_text(
        &sandbox,
        listen,
        admin,
        &echo_route(&sandbox, tokengate_sandbox::keys::DRIFTROCK_CLIENT_SECRET),
    );
    let at = text.find("name = \"driftrock\"").unwrap();
    let text = format!(
        "{}{}",
        &text[..at],
        text[at..].replacen("strip_prefix = true", "strip_prefix = false", 1)
    );
    std::fs::write(dir.config(), text).unwrap();
    let summary = tokio::task::block_in_place(|| reload(&gw)).expect("reload applies");
    assert_eq!(
        (summary.routes, summary.sources_kept, summary.sources_new),
        (3, 2, 1)
    );

    // The same client connection sees the new route at its next request.
    let (status, body) = on_connection(&mut conn, "/echo/a").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let echo: tokengate_sandbox::Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo.path, "/a");
    assert!(echo.header("authorization").unwrap().starts_with("Bearer "));
    // The kept routes kept their tokens: no token request for them, the same token sent.
    let (status, body) = on_connection(&mut conn, "/driftrock/v2/x").await;
    assert_eq!(status, 200);
    let echo: tokengate_sandbox::Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo.path, "/driftrock/v2/x", "the new strip_prefix");
    assert_eq!(echo.header("authorization").unwrap(), token_before);
    assert_eq!(sandbox.drillster.requests(), token_requests.0);
    // One token request for the new route (same endpoint as driftrock).
    assert_eq!(sandbox.driftrock.requests(), token_requests.1 + 1);

    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "tokengate_config_reloads_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "tokengate_config_reloads_total{outcome=\"error\"}"),
        0.0
    );
    let status: serde_json::Value = reqwest::get(format!("{}/status", gw.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["drillster", "driftrock", "echo"]);
    gw.stop().await;
}

/// A route's new credentials get a new token source, verified before the swap; the source it
/// replaces stops retrying and no longer sets the route's gauges; a removed route is gone.
#[tokio::test(flavor = "multi_thread")]
async fn changed_credentials_get_a_new_token_source_and_a_removed_route_is_gone() {
    let sandbox = Sandbox::start().await.unwrap();
    // `echo` starts against a second server that refuses every token request.
    let refusing = AuthServer::driftrock().start().await.unwrap();
    refusing
        .faults()
        .fail_with(http::StatusCode::INTERNAL_SERVER_ERROR);
    let dir = Dir::new("secret");
    let (listen, admin) = (free_addr(), free_addr());
    let secret = tokengate_sandbox::keys::DRIFTROCK_CLIENT_SECRET;
    let failing = echo_route(&sandbox, secret).replace(
        &sandbox.driftrock.token_endpoint(),
        &refusing.token_endpoint(),
    );
    std::fs::write(dir.config(), config_text(&sandbox, listen, admin, &failing)).unwrap();
    let gw = start_from_file_unready(&dir.config()).await;
    let failures = "tokengate_token_consecutive_failures{route=\"echo\"}";
    eventually(
        || async { metric(&gw.metrics().await, failures) >= 1.0 },
        true,
    )
    .await;
    assert_eq!(status_of(listen, "/echo/a").await, 503);
    // Its next retry is held at the server across the reload.
    refusing.faults().hold();
    common::eventually(Duration::from_secs(30), "the next retry", || async {
        refusing.faults().held() == 1
    })
    .await;

    // The working token endpoint: a new source, with its token before the swap.
    let good = echo_route(&sandbox, secret);
    std::fs::write(dir.config(), config_text(&sandbox, listen, admin, &good)).unwrap();
    let summary = tokio::task::block_in_place(|| reload(&gw)).expect("reload applies");
    assert_eq!((summary.sources_kept, summary.sources_new), (2, 1));
    assert_eq!(
        status_of(listen, "/echo/a").await,
        200,
        "no wait for a token"
    );
    // The replaced source's retry, refused after the swap, is counted but no longer sets the
    // route's gauges (nor does it retry again: `token::paused_clock_tests`).
    let refusals = |m: &str| {
        ["oauth_error", "network_error"]
            .iter()
            .map(|o| {
                metric(
                    m,
                    &format!("tokengate_token_requests_total{{outcome=\"{o}\",route=\"echo\"}}"),
                )
            })
            .sum::<f64>()
    };
    let counted = refusals(&gw.metrics().await);
    refusing.faults().release();
    common::eventually(
        Duration::from_secs(10),
        "the held retry refused",
        || async { refusals(&gw.metrics().await) > counted },
    )
    .await;
    assert_eq!(metric(&gw.metrics().await, failures), 0.0);

    // The route removed: 404, the others still served, its token gauges gone.
    std::fs::write(dir.config(), config_text(&sandbox, listen, admin, "")).unwrap();
    let summary = tokio::task::block_in_place(|| reload(&gw)).expect("reload applies");
    assert_eq!(
        (summary.routes, summary.sources_kept, summary.sources_new),
        (2, 2, 0)
    );
    assert_eq!(status_of(listen, "/echo/a").await, 404);
    assert_eq!(status_of(listen, "/drillster/a").await, 200);
    let m = gw.metrics().await;
    let expiry = "tokengate_token_expiry_timestamp_seconds{route=\"echo\"}";
    for gauge in [expiry, failures] {
        assert!(!m.lines().any(|l| l.starts_with(gauge)), "{gauge} stays");
    }
    gw.stop().await;
}

/// Requests sent one after another on one kept-alive client while a reload runs.
struct Load {
    stop: Arc<AtomicBool>,
    /// Answers with 200 so far.
    ok: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Served>,
}

/// What [`Load`] saw: answers, failures (status or error, path) and the distinct
/// `Authorization` values the API received.
#[derive(Default, Debug)]
struct Served {
    ok: u64,
    failed: Vec<String>,
    tokens: BTreeSet<String>,
}

impl Load {
    fn start(listen: SocketAddr, paths: &'static [&'static str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let ok = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&ok);
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut served = Served::default();
            while !flag.load(Ordering::Relaxed) {
                for path in paths {
                    match client.get(format!("http://{listen}{path}")).send().await {
                        Ok(r) if r.status() == 200 => {
                            let echo: tokengate_sandbox::Echo = r.json().await.unwrap();
                            let auth = echo.header("authorization").unwrap_or_default();
                            served.tokens.insert(auth.to_string());
                            served.ok += 1;
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => served.failed.push(format!("{path}: {}", r.status())),
                        Err(e) => served.failed.push(format!("{path}: {e}")),
                    }
                }
            }
            served
        });
        Load { stop, ok, task }
    }

    /// Waits until `n` more requests have been answered 200: the load has run past whatever
    /// happened before.
    async fn more(&self, n: u64) {
        let until = self.ok.load(Ordering::Relaxed) + n;
        common::eventually(Duration::from_secs(20), "answers under load", || async {
            self.ok.load(Ordering::Relaxed) >= until
        })
        .await;
    }

    async fn finish(self) -> Served {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// A reload whose new credentials get no token is rejected whole, whatever the reason (a
/// wrong secret, a deleted key, an unreachable or mistyped token endpoint): the running
/// routes keep serving with the tokens they hold, no request fails during or after it, and
/// the error names the route and the authorization server's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_whose_new_credentials_get_no_token_is_rejected_and_nothing_fails() {
    let sandbox = Sandbox::start().await.unwrap();
    let dir = Dir::new("refused");
    let (listen, admin) = (free_addr(), free_addr());
    let text = config_text(&sandbox, listen, admin, "");
    std::fs::write(dir.config(), &text).unwrap();
    let gw = start_from_file(&dir.config()).await;
    let load = Load::start(listen, &["/drillster/a", "/driftrock/b"]);
    let requests = (sandbox.drillster.requests(), sandbox.driftrock.requests());

    // A key file whose key the server does not have (deleted, or never uploaded).
    let deleted_key = dir.0.join("deleted-key.json");
    let key = serde_json::json!({
        "type": "service_account_key",
        "keyId": "0d1e7ed5e5e54f0b8c1a3c0b2f1e9d77",
        "serviceAccountId": tokengate_sandbox::keys::DEMO_SERVICE_ACCOUNT_ID,
        "privateKey": tokengate_sandbox::keys::OTHER_PRIVATE_PEM,
    });
    std::fs::write(&deleted_key, key.to_string()).unwrap();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let driftrock_endpoint = sandbox.driftrock.token_endpoint();
    let secret = tokengate_sandbox::keys::DRIFTROCK_CLIENT_SECRET;
    let cases = [
        (
            "routes[1] (driftrock)",
            text.replace(secret, "s3cr+t/%41:y=Z"),
            "HTTP 401: token endpoint returned error \"invalid_client\": bad client secret",
        ),
        (
            "routes[0] (drillster)",
            text.replace(
                &demo_key_path().display().to_string(),
                &deleted_key.display().to_string(),
            ),
            "HTTP 400: token endpoint returned error \"invalid_grant\": unknown kid",
        ),
        (
            "routes[1] (driftrock)",
            text.replace(
                &driftrock_endpoint,
                &format!("http://{closed}/oauth2/token"),
            ),
            "token endpoint connect failed",
        ),
        (
            "routes[1] (driftrock)",
            text.replace(&driftrock_endpoint, &format!("{driftrock_endpoint}s")),
            "HTTP 404",
        ),
    ];
    for (i, (route, changed, reason)) in cases.iter().enumerate() {
        std::fs::write(dir.config(), changed).unwrap();
        let err = tokio::task::block_in_place(|| reload(&gw)).unwrap_err();
        let shown = err.to_string();
        assert!(matches!(err, ReloadError::TokenRefused(_)), "{shown}");
        assert!(
            shown.starts_with(&format!("{route}: no token with the new settings: "))
                && shown.contains(reason),
            "{shown}"
        );
        assert!(!shown.contains("s3cr+t"), "a secret in {shown}");
        let m = gw.metrics().await;
        let errors = metric(&m, "tokengate_config_reloads_total{outcome=\"error\"}");
        assert_eq!(errors, (i + 1) as f64);
    }
    load.more(21).await;
    let served = load.finish().await;
    assert!(served.failed.is_empty(), "{:?}", served.failed);
    assert!(served.ok > 20, "{served:?}");
    assert_eq!(served.tokens.len(), 2, "the tokens held before, throughout");
    // One token request per verification that reached a token endpoint, none otherwise.
    assert_eq!(
        (sandbox.drillster.requests(), sandbox.driftrock.requests()),
        (requests.0 + 1, requests.1 + 1)
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "tokengate_config_reloads_total{outcome=\"success\"}"),
        0.0
    );
    gw.stop().await;
}

/// Rotating a client secret (Drillster: Registering your client application: several secrets
/// may be live at once, deleting one is immediate): the new secret obtains the token the new
/// source starts with, one token request in all, and no request fails during the reload or
/// after the old secret is deleted at the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secret_rotation_costs_one_token_request_and_no_failed_request() {
    let sandbox = Sandbox::start().await.unwrap();
    let dir = Dir::new("rotation");
    let (listen, admin) = (free_addr(), free_addr());
    let text = config_text(&sandbox, listen, admin, "");
    std::fs::write(dir.config(), &text).unwrap();
    let gw = start_from_file(&dir.config()).await;
    let load = Load::start(listen, &["/driftrock/b"]);
    let (id, old) = (
        tokengate_sandbox::keys::DRIFTROCK_CLIENT_ID,
        tokengate_sandbox::keys::DRIFTROCK_CLIENT_SECRET,
    );
    let new = "n3w s3cr+t/%42";
    sandbox.driftrock.add_client_secret(id, new);
    load.more(5).await;
    let requests = sandbox.driftrock.requests();
    let waited = gw.waited_requests();

    std::fs::write(dir.config(), text.replace(old, new)).unwrap();
    let summary = tokio::task::block_in_place(|| reload(&gw)).expect("reload applies");
    assert_eq!((summary.sources_kept, summary.sources_new), (1, 1));
    assert_eq!(sandbox.driftrock.requests(), requests + 1);
    let sent = sandbox.driftrock.last_request().unwrap();
    let basic = tokengate::oauth::client_credentials::basic_authorization(
        id,
        &tokengate::config::Secret::new(new),
        tokengate::config::BasicEncoding::Form,
    );
    assert_eq!(sent.header("authorization"), Some(basic.as_str()));
    load.more(5).await;
    assert!(sandbox.driftrock.delete_client_secret(id, old));
    load.more(5).await;

    let served = load.finish().await;
    assert!(served.failed.is_empty(), "{:?}", served.failed);
    assert_eq!(served.tokens.len(), 2, "the old token, then the new one");
    assert_eq!(
        sandbox.driftrock.requests(),
        requests + 1,
        "one token request"
    );
    assert_eq!(
        gw.waited_requests(),
        waited,
        "no request waited for a token"
    );
    assert_eq!(status_of(listen, "/driftrock/c").await, 200);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "tokengate_config_reloads_total{outcome=\"success\"}"),
        1.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_or_restart_only_change_is_rejected_and_the_running_config_keeps_serving() {
    let sandbox = Sandbox::start().await.unwrap();
    let dir = Dir::new("bad");
    let (listen, admin) = (free_addr(), free_addr());
    let text = config_text(&sandbox, listen, admin, "");
    std::fs::write(dir.config(), &text).unwrap();
    let gw = start_from_file(&dir.config()).await;

    // Fails validation: the error names the key, nothing changes.
    std::fs::write(
        dir.config(),
        text.replace("strip_prefix = true", "strip_prefix = \"yes\""),
    )
    .unwrap();
    let err = tokio::task::block_in_place(|| reload(&gw)).unwrap_err();
    assert!(matches!(err, ReloadError::Config(_)), "{err}");
    assert!(err.to_string().contains("routes[0].strip_prefix"), "{err}");

    // A missing key file (secrets and key files are re-read on reload).
    std::fs::write(
        dir.config(),
        text.replace(
            &demo_key_path().display().to_string(),
            "/nonexistent/key.json",
        ),
    )
    .unwrap();
    let err = tokio::task::block_in_place(|| reload(&gw)).unwrap_err();
    assert!(err.to_string().contains("routes[0].auth.key_file"), "{err}");

    // A listener change needs a restart.
    let other = free_addr();
    std::fs::write(
        dir.config(),
        text.replace(&listen.to_string(), &other.to_string()),
    )
    .unwrap();
    let err = tokio::task::block_in_place(|| reload(&gw)).unwrap_err();
    assert!(
        matches!(
            err,
            ReloadError::NeedsRestart {
                key: "server.listen"
            }
        ),
        "{err}"
    );

    // An upstream that does not resolve cannot be built.
    std::fs::write(
        dir.config(),
        text.replacen(
            &sandbox.api.base_url().to_string(),
            "http://does-not-resolve.invalid",
            1,
        ),
    )
    .unwrap();
    let err = tokio::task::block_in_place(|| reload(&gw)).unwrap_err();
    assert!(matches!(err, ReloadError::Build(_)), "{err}");

    for path in ["/drillster/a", "/driftrock/b"] {
        assert_eq!(status_of(listen, path).await, 200, "{path}");
    }
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "tokengate_config_reloads_total{outcome=\"error\"}"),
        4.0
    );
    assert_eq!(
        metric(&m, "tokengate_config_reloads_total{outcome=\"success\"}"),
        0.0
    );
    gw.stop().await;
}

/// The real binary: SIGHUP applies a new route; a broken file and a mistyped secret are
/// rejected, each logged in one line without secrets, and the process keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_running_binary() {
    let sandbox = Sandbox::start().await.unwrap();
    let dir = Dir::new("sighup");
    let (listen, admin) = (free_addr(), free_addr());
    let text = config_text(&sandbox, listen, admin, "");
    std::fs::write(dir.config(), &text).unwrap();
    let (mut child, stderr) = spawn_binary(&dir);
    let client = reqwest::Client::new();
    let get = |url: String| {
        let client = client.clone();
        async move {
            client
                .get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    eventually(|| get(format!("http://{admin}/readyz")), 200).await;
    assert_eq!(get(format!("http://{listen}/echo/a")).await, 404);

    let secret = tokengate_sandbox::keys::DRIFTROCK_CLIENT_SECRET;
    std::fs::write(dir.config(), text.clone() + &echo_route(&sandbox, secret)).unwrap();
    child.hangup();
    eventually(|| get(format!("http://{listen}/echo/a")), 200).await;

    std::fs::write(
        dir.config(),
        text.replace("strip_prefix = true", "strip_prefix = \"yes\""),
    )
    .unwrap();
    child.hangup();
    let metrics = || async {
        let m = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric(&m, "tokengate_config_reloads_total{outcome=\"error\"}") as u16
    };
    eventually(metrics, 1).await;
    assert_eq!(
        get(format!("http://{listen}/echo/a")).await,
        200,
        "the running config keeps serving"
    );

    // A mistyped secret: the token request with it is refused, so is the reload.
    let typo = "s3cr+t/%41:y=Z";
    let with_typo = text.clone() + &echo_route(&sandbox, secret);
    std::fs::write(dir.config(), with_typo.replacen(secret, typo, 1)).unwrap();
    child.hangup();
    eventually(metrics, 2).await;
    for path in ["/echo/a", "/driftrock/a"] {
        assert_eq!(get(format!("http://{listen}{path}")).await, 200, "{path}");
    }
    assert!(child.0.try_wait().unwrap().is_none(), "still running");

    drop(child);
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(log.contains("config reloaded"), "{log}");
    let rejected: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("config reload rejected"))
        .collect();
    assert_eq!(rejected.len(), 2, "{log}");
    assert!(rejected[0].contains("routes[0].strip_prefix"), "{log}");
    // One warn line naming the route and the server's error, and no other line about it.
    assert!(
        rejected[1].contains("WARN")
            && rejected[1].contains("routes[1] (driftrock): no token with the new settings")
            && rejected[1].contains("invalid_client"),
        "{log}"
    );
    assert!(!log.contains("token request failed"), "{log}");
    for secret in [
        secret,
        typo,
        tokengate_sandbox::keys::DRILLSTER_CLIENT_SECRET,
    ] {
        assert!(!log.contains(secret), "a secret in the log:\n{log}");
    }
}

/// The gateway process, stopped (SIGTERM, then waited for) on drop.
struct Gateway(Child);

impl Gateway {
    fn hangup(&self) {
        signal(&self.0, "-HUP");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        signal(&self.0, "-TERM");
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(sig)
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig}");
}

/// Polls `probe` until it returns `want` (10 s at most).
async fn eventually<F, Fut, T>(probe: F, want: T)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
    T: PartialEq + std::fmt::Debug,
{
    let (p, w) = (&probe, &want);
    if !common::poll_until(Duration::from_secs(10), || async move { p().await == *w }).await {
        let got = probe().await;
        assert_eq!(got, want, "not within 10 s");
    }
}

/// A SIGHUP while the binary is still reading its config (here: 100 routes, each with a key
/// file to parse and trial-sign) does not end the process (SIGHUP's default action): the
/// handler is in place long before the gateway is up, and the gateway comes up.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_while_starting_is_ignored() {
    let dir = Dir::new("early");
    let (listen, admin) = (free_addr(), free_addr());
    let mut text = format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ngrace_period = \"0s\"\n"
    );
    for i in 0..100 {
        text += &format!(
            r#"
[[routes]]
name = "r{i}"
path_prefix = "/r{i}"
upstream = "http://127.0.0.1:9"
[routes.auth]
grant = "jwt_bearer"
token_endpoint = "http://127.0.0.1:9/token"
client_id = "c"
client_secret = "s"
key_file = "{key}"
"#,
            key = demo_key_path().display()
        );
    }
    std::fs::write(dir.config(), text).unwrap();
    let (mut child, _stderr) = spawn_binary(&dir);
    // As soon as the process catches SIGHUP (bit 0 of SigCgt), before its listeners are up.
    let pid = child.0.id();
    let caught = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                let mask = s
                    .lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))?
                    .trim()
                    .to_string();
                u64::from_str_radix(&mask, 16).ok()
            })
            .is_some_and(|m| m & 1 == 1)
    };
    let spawned = std::time::Instant::now();
    let deadline = spawned + Duration::from_secs(30);
    while !caught() {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "exited while starting"
        );
        assert!(std::time::Instant::now() < deadline, "SIGHUP never caught");
        std::thread::sleep(Duration::from_millis(1));
    }
    let caught_after = spawned.elapsed();
    assert!(
        std::net::TcpStream::connect(admin).is_err(),
        "the probe came too late: the gateway is already up"
    );
    child.hangup();
    let client = reqwest::Client::new();
    let healthz = || {
        let client = client.clone();
        async move {
            let r = client.get(format!("http://{admin}/healthz")).send().await;
            r.map(|r| r.status().as_u16()).unwrap_or(0)
        }
    };
    let process = std::cell::RefCell::new(&mut child.0);
    let exited = || process.borrow_mut().try_wait().unwrap().is_some();
    let up = common::poll_until(Duration::from_secs(60), || async {
        exited() || healthz().await == 200
    })
    .await;
    let up_after = spawned.elapsed();
    assert!(!exited(), "exited while starting");
    assert!(up, "not up in 60 s");
    // Caught while the config was still being read, not only once the gateway was built.
    assert!(
        caught_after * 4 < up_after,
        "SIGHUP caught after {caught_after:?}, gateway up after {up_after:?}"
    );
    assert!(child.0.try_wait().unwrap().is_none(), "still running");
}

/// A reload that keeps a token source keeps its one refresher: with 2-second tokens the
/// token endpoint sees one request per renewal, each at least 80 % (less 10 % jitter) of the
/// token's life after the last, not one per reload on top (refreshers sharing a token renew
/// it at the same moment).
#[tokio::test(flavor = "multi_thread")]
async fn kept_token_sources_keep_a_single_refresher() {
    let sandbox = Sandbox::builder()
        .token_lifetime(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let dir = Dir::new("refreshers");
    let (listen, admin) = (free_addr(), free_addr());
    std::fs::write(dir.config(), config_text(&sandbox, listen, admin, "")).unwrap();
    let gw = start_from_file(&dir.config()).await;
    for _ in 0..3 {
        let summary = tokio::task::block_in_place(|| reload(&gw)).expect("reload applies");
        assert_eq!((summary.sources_kept, summary.sources_new), (2, 0));
    }
    let before = sandbox.driftrock.requests();
    let since = std::time::Instant::now();
    common::eventually(Duration::from_secs(30), "three renewals", || async {
        sandbox.driftrock.requests() >= before + 3
    })
    .await;
    // Tokens of 2 s to their whole-second `exp`, so at least 1 s: renewed after 0.72 s at the
    // earliest.
    let times: Vec<_> = sandbox
        .driftrock
        .recent_requests()
        .iter()
        .map(|r| r.received)
        .filter(|t| *t >= since)
        .collect();
    let gaps: Vec<_> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(719)),
        "a token request per refresher: {gaps:?}"
    );
    assert_eq!(status_of(listen, "/driftrock/a").await, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_new_client_bounds_to_open_connections_from_their_next_wait() {
    let sandbox = Sandbox::start().await.unwrap();
    let dir = Dir::new("bounds");
    let (listen, admin) = (free_addr(), free_addr());
    let text = |bounds: &str| {
        config_text(&sandbox, listen, admin, "").replacen(
            "[server]\n",
            &format!("[server]\n{bounds}\n"),
            1,
        )
    };
    std::fs::write(dir.config(), text("")).unwrap();
    let gw = start_from_file(&dir.config()).await;

    let mut a = tokio::net::TcpStream::connect(listen).await.unwrap();
    let mut b = tokio::net::TcpStream::connect(listen).await.unwrap();
    for conn in [&mut a, &mut b] {
        assert_eq!(on_connection(conn, "/driftrock/v2/x").await.0, 200);
    }
    std::fs::write(
        dir.config(),
        text("max_request_head = \"4KiB\"\nidle_timeout = \"1s\""),
    )
    .unwrap();
    tokio::task::block_in_place(|| reload(&gw)).expect("reload applies");

    // An 8,000-byte head on a connection opened before the reload: over the new limit.
    let filler = "a".repeat(8000);
    let head = format!("GET /driftrock/v2/x HTTP/1.1\r\nHost: gw\r\nX-Big: {filler}\r\n\r\n");
    a.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), a.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // The other one, after its next request, is closed after the new idle_timeout.
    assert_eq!(on_connection(&mut b, "/driftrock/v2/x").await.0, 200);
    let idle_since = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), b.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok() && rest.is_empty(),
        "closed without an answer"
    );
    let after = idle_since.elapsed();
    assert!(after < Duration::from_secs(5), "closed after {after:?}");
    gw.stop().await;
}
