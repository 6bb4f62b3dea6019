//! Config reload (SPEC "CLI": SIGHUP reloads config, secrets and key files; a new config that
//! fails validation is rejected and the running one keeps serving). In-process through
//! `GatewayHandle::reload` (what the SIGHUP handler calls), and once through the real binary
//! and a real SIGHUP.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{demo_key_path, free_addr, raw_request, TestGateway};
use tokengate::config::Config;
use tokengate::gateway::ReloadError;
use tokengate::sandbox::Sandbox;
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
        id = tokengate::sandbox::keys::DRIFTROCK_CLIENT_ID,
    )
}

async fn start_from_file(path: &Path) -> TestGateway {
    let config = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    gw
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
    let echo: tokengate::sandbox::Echo = serde_json::from_slice(&body).unwrap();
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
        &echo_route(&sandbox, tokengate::sandbox::keys::DRIFTROCK_CLIENT_SECRET),
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
    let echo: tokengate::sandbox::Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo.path, "/a");
    assert!(echo.header("authorization").unwrap().starts_with("Bearer "));
    // The kept routes kept their tokens: no token request for them, the same token sent.
    let (status, body) = on_connection(&mut conn, "/driftrock/v2/x").await;
    assert_eq!(status, 200);
    let echo: tokengate::sandbox::Echo = serde_json::from_slice(&body).unwrap();
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

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_secret_gets_a_new_token_source_and_a_removed_route_is_gone() {
    let sandbox = Sandbox::start().await.unwrap();
    let dir = Dir::new("secret");
    let (listen, admin) = (free_addr(), free_addr());
    let good = echo_route(&sandbox, tokengate::sandbox::keys::DRIFTROCK_CLIENT_SECRET);
    std::fs::write(dir.config(), config_text(&sandbox, listen, admin, &good)).unwrap();
    let gw = start_from_file(&dir.config()).await;
    assert_eq!(status_of(listen, "/echo/a").await, 200);

    // A wrong secret for `echo`: a new source, whose token request the server refuses.
    let wrong = echo_route(&sandbox, "not-the-secret");
    std::fs::write(dir.config(), config_text(&sandbox, listen, admin, &wrong)).unwrap();
    let summary = tokio::task::block_in_place(|| reload(&gw)).expect("reload applies");
    assert_eq!((summary.sources_kept, summary.sources_new), (2, 1));
    assert_eq!(status_of(listen, "/echo/a").await, 503);
    assert_eq!(status_of(listen, "/driftrock/a").await, 200);

    // The right secret back: a new source again. The one with the wrong secret stops retrying
    // and no longer sets the route's gauges, so they follow the new source and stay at 0.
    let failures = "tokengate_token_consecutive_failures{route=\"echo\"}";
    assert!(metric(&gw.metrics().await, failures) >= 1.0);
    std::fs::write(dir.config(), config_text(&sandbox, listen, admin, &good)).unwrap();
    let summary = tokio::task::block_in_place(|| reload(&gw)).expect("reload applies");
    assert_eq!((summary.sources_kept, summary.sources_new), (2, 1));
    eventually(|| status_of(listen, "/echo/a"), 200).await;
    let refused = sandbox.driftrock.failures();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metric(&gw.metrics().await, failures), 0.0);
    assert_eq!(
        sandbox.driftrock.failures(),
        refused,
        "the replaced source kept retrying"
    );

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

/// The real binary: SIGHUP applies a new route; a broken file is rejected, logged without
/// secrets, and the process keeps serving.
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

    let secret = tokengate::sandbox::keys::DRIFTROCK_CLIENT_SECRET;
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
    assert!(child.0.try_wait().unwrap().is_none(), "still running");

    drop(child);
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(log.contains("config reloaded"), "{log}");
    assert!(
        log.contains("config reload rejected") && log.contains("routes[0].strip_prefix"),
        "{log}"
    );
    for secret in [secret, tokengate::sandbox::keys::DRILLSTER_CLIENT_SECRET] {
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = probe().await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {got:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while healthz().await != 200 {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "exited while starting"
        );
        assert!(tokio::time::Instant::now() < deadline, "not up in 60 s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let up_after = spawned.elapsed();
    // Caught while the config was still being read, not only once the gateway was built.
    assert!(
        caught_after * 4 < up_after,
        "SIGHUP caught after {caught_after:?}, gateway up after {up_after:?}"
    );
    assert!(child.0.try_wait().unwrap().is_none(), "still running");
}

/// A reload that keeps a token source keeps its one refresher: with 2-second tokens the
/// token endpoint sees one request per renewal, not one per reload on top.
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
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Renewal at 80 % of 2 s: about 3 in 5 s. Four refreshers would make about 12.
    let renewals = sandbox.driftrock.requests() - before;
    assert!(
        (2..=5).contains(&renewals),
        "{renewals} token requests in 5 s"
    );
    assert_eq!(status_of(listen, "/driftrock/a").await, 200);
    gw.stop().await;
}
