//! The `tokengate` binary: exit codes and messages of `check`, `token` (docs/operations.md
//! "Command line").

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tokengate_sandbox::Sandbox;

fn tokengate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(args)
        .env_remove("TOKENGATE_TEST_UNSET_VAR")
        .env("TOKENGATE_TEST_EMPTY_VAR", "")
        .output()
        .expect("run tokengate")
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("tokengate-cli-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn good_config(key_file: &Path) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19090"
hosts_file = {hosts:?}

[[routes]]
name = "drillster"
upstream = "https://www.drillster.com"

[routes.auth]
grant = "jwt_bearer"
token_endpoint = "https://www.drillster.com/api/oauth/token"
client_id = "874a16d4ac764ce4a545f0cca4584c63"
client_secret = "not-a-real-secret"
key_file = "{}"
"#,
        key_file.display(),
        hosts = cli_hosts_file().display().to_string(),
    )
}

/// A hosts file naming www.drillster.com (on loopback), so `check`, which resolves upstream
/// names, never asks a DNS server.
fn cli_hosts_file() -> PathBuf {
    let path = std::env::temp_dir().join(format!("tokengate-cli-hosts-{}", std::process::id()));
    std::fs::write(&path, "127.0.0.1 www.drillster.com\n").unwrap();
    path
}

/// Runs `check` on `config` and asserts exit 2 with a message naming `key`.
fn assert_rejected(dir: &TempDir, name: &str, config: &str, key: &str, also: &str) {
    let path = dir.write(name, config);
    let out = tokengate(&["check", "-c", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
    assert!(
        stderr.contains(key),
        "{name}: stderr does not name {key}:\n{stderr}"
    );
    assert!(
        stderr.contains(also),
        "{name}: stderr lacks {also:?}:\n{stderr}"
    );
    assert!(
        stderr.contains(name),
        "{name}: stderr does not name the file:\n{stderr}"
    );
}

#[test]
fn check_accepts_a_good_config() {
    let dir = TempDir::new("good");
    let path = dir.write("good.toml", &good_config(&common::demo_key_path()));
    let out = tokengate(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A reader that went away before the report (`tokengate check … | true`) is no crash: the
/// exit code still says how the check went (0 here, 2 for a bad config), never a panic's 101.
#[test]
fn check_with_a_closed_standard_output_exits_with_its_own_code() {
    let dir = TempDir::new("closed-stdout");
    let good = dir.write("good.toml", &good_config(&common::demo_key_path()));
    let bad = dir.write("bad.toml", "[server]\nlisten = 5\n");
    for (path, code) in [(&good, 0), (&bad, 2)] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["check", "-c", path.to_str().unwrap()])
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run tokengate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn check_rejects_bad_configs_naming_the_key() {
    let dir = TempDir::new("bad");
    let key = common::demo_key_path();
    let good = good_config(&key);

    assert_rejected(
        &dir,
        "unknown-key.toml",
        &good.replace("client_secret =", "client_scret ="),
        "routes[0].auth.client_scret",
        "unknown",
    );
    assert_rejected(
        &dir,
        "missing-client-id.toml",
        &good.replace("client_id = \"874a16d4ac764ce4a545f0cca4584c63\"\n", ""),
        "routes[0].auth.client_id",
        "missing",
    );
    assert_rejected(
        &dir,
        "unset-var.toml",
        &good.replace("not-a-real-secret", "${TOKENGATE_TEST_UNSET_VAR}"),
        "routes[0].auth.client_secret",
        "TOKENGATE_TEST_UNSET_VAR",
    );
    // Set but empty: refused the same way, naming the variable.
    assert_rejected(
        &dir,
        "empty-var.toml",
        &good.replace("not-a-real-secret", "${TOKENGATE_TEST_EMPTY_VAR}"),
        "routes[0].auth.client_secret",
        "environment variable TOKENGATE_TEST_EMPTY_VAR is set but empty",
    );
    assert_rejected(
        &dir,
        "missing-key-file.toml",
        &good_config(&dir.0.join("no-such-key.json")),
        "routes[0].auth.key_file",
        "no-such-key.json",
    );
    let not_a_key = dir.write(
        "not-a-key.json",
        r#"{"keyId":"k1","serviceAccountId":"sa","privateKey":"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"}"#,
    );
    assert_rejected(
        &dir,
        "bad-private-key.toml",
        &good_config(&not_a_key),
        "routes[0].auth.key_file",
        "privateKey",
    );
    // A key, secret or CA path must be a regular file: a device is refused (not read into
    // memory), a FIFO too (opening it would wait for a writer forever, stalling start).
    let fifo = dir.0.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let zero = Path::new("/dev/zero");
    assert_rejected(
        &dir,
        "device-key-file.toml",
        &good_config(zero),
        "routes[0].auth.key_file",
        "it is a device, not a regular file",
    );
    assert_rejected(
        &dir,
        "fifo-secret-file.toml",
        &good.replace(
            "client_secret = \"not-a-real-secret\"",
            &format!("client_secret_file = \"{}\"", fifo.display()),
        ),
        "routes[0].auth.client_secret_file",
        "it is a FIFO, not a regular file",
    );
    assert_rejected(
        &dir,
        "fifo-ca-file.toml",
        &good.replace(
            "[routes.auth]",
            &format!("ca_file = \"{}\"\n\n[routes.auth]", fifo.display()),
        ),
        "routes[0].ca_file",
        "it is a FIFO, not a regular file",
    );
    // A regular file over the cap.
    let big = dir.write("big-secret", &"s".repeat(64 * 1024 + 1));
    assert_rejected(
        &dir,
        "big-secret-file.toml",
        &good.replace(
            "client_secret = \"not-a-real-secret\"",
            &format!("client_secret_file = \"{}\"", big.display()),
        ),
        "routes[0].auth.client_secret_file",
        "larger than 64 KiB",
    );
}

#[test]
fn check_reports_every_problem_at_once() {
    let dir = TempDir::new("many");
    let bad = good_config(&dir.0.join("missing.json"))
        .replace("client_secret =", "client_scret =")
        .replace("\"jwt_bearer\"", "\"jwt_bearer\"\nrefresh_ratio = 1.5");
    let path = dir.write("many.toml", &bad);
    let out = tokengate(&["check", "-c", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("routes[0].auth.client_scret"), "{stderr}");
    // Unknown keys stop the file layer; the other problems show once the key is fixed.
    let fixed = bad.replace("client_scret =", "client_secret =");
    let path = dir.write("many2.toml", &fixed);
    let out = tokengate(&["check", "-c", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("routes[0].auth.key_file"), "{stderr}");
    assert!(stderr.contains("routes[0].auth.refresh_ratio"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(tokengate(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(tokengate(&["check"]).status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_check_fetch_against_the_sandbox() {
    let sandbox = Sandbox::start().await.unwrap();
    let dir = TempDir::new("fetch");
    let toml = tokengate::demo::config_toml(
        &sandbox,
        common::free_addr(),
        common::free_addr(),
        &common::demo_key_path(),
    );
    let path = dir.write("sandbox.toml", &toml);
    let p = path.to_str().unwrap().to_string();

    let out = tokio::task::spawn_blocking({
        let p = p.clone();
        move || tokengate(&["token", "-c", &p, "--route", "driftrock"])
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(sandbox.registry.issued_count(), 1);
    let echo = reqwest::Client::new()
        .get(sandbox.api.url("/v2/ping"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        echo.status(),
        200,
        "the printed token is accepted by the API"
    );

    let out = tokio::task::spawn_blocking({
        let p = p.clone();
        move || {
            tokengate(&[
                "token",
                "-c",
                &p,
                "--route",
                "drillster",
                "--subject",
                "user-42",
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        sandbox
            .drillster
            .last_request()
            .unwrap()
            .assertion_claims()
            .unwrap()["sub"],
        "user-42"
    );
    // The per-user token obtained is one audit line on standard error, without the token.
    let user_token = String::from_utf8(out.stdout.clone()).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let audit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("tokengate::audit"))
        .collect();
    assert_eq!(audit.len(), 1, "{stderr}");
    for field in [
        "per-user access token obtained",
        "route=drillster",
        "subject=user-42",
        "caller=-",
        "jti=",
        "expires=",
    ] {
        assert!(audit[0].contains(field), "{field}: {stderr}");
    }
    assert!(!stderr.contains(user_token.trim()), "{stderr}");

    let out = tokio::task::spawn_blocking(move || tokengate(&["check", "-c", &p, "--fetch"]))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("drillster: token obtained, expires in"),
        "{stdout}"
    );
    assert!(
        stdout.contains("driftrock: token obtained, expires in"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("eyJ"),
        "check --fetch must not print a token"
    );
    sandbox.shutdown().await.unwrap();
}

/// An upstream that does not resolve is a warning for `check` (exit 0) and no reason for
/// `run` to stop: it starts, `/status` says why the route has no address.
#[test]
fn an_upstream_that_does_not_resolve_is_a_warning_and_run_starts_anyway() {
    let dir = TempDir::new("nodns");
    let (listen, admin) = (common::free_addr(), common::free_addr());
    let config = good_config(&common::demo_key_path())
        .replace(
            "https://www.drillster.com\"",
            "https://no-such-host.invalid\"",
        )
        // Nothing listens there: no token, and no request leaves loopback.
        .replace(
            "https://www.drillster.com/api/oauth/token",
            "http://127.0.0.1:9/token",
        )
        .replace("127.0.0.1:18080", &listen.to_string())
        .replace("127.0.0.1:19090", &admin.to_string())
        .replace("[server]\n", "[server]\nshutdown_delay = \"0s\"\n");
    let path = dir.write("nodns.toml", &config);
    let out = tokengate(&["check", "-c", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(
            "warning: routes[0].upstream: no-such-host.invalid:443 does not resolve (no-such-host.invalid: no address in"
        ),
        "{stdout}"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["run", "-c", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        let answer = std::net::TcpStream::connect(admin).ok().and_then(|mut s| {
            use std::io::{Read, Write};
            s.write_all(b"GET /status HTTP/1.0\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            Some(text)
        });
        if let Some(text) = answer.filter(|t| t.starts_with("HTTP/1.1 200")) {
            break text;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "run exited although only an upstream does not resolve"
        );
        assert!(std::time::Instant::now() < deadline, "no /status in 20 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let body: serde_json::Value =
        serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let dns = &body["routes"][0]["upstream_dns"];
    assert_eq!(dns["resolved"], false, "{body}");
    assert!(
        dns["last_error"]
            .as_str()
            .unwrap()
            .contains("no-such-host.invalid: no address"),
        "{body}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
}

/// A token endpoint over plain HTTP on a host that is not loopback is a warning naming what
/// would travel in clear.
#[test]
fn check_warns_about_a_plain_http_token_endpoint() {
    let dir = TempDir::new("plain-http");
    let config = good_config(&common::demo_key_path()).replace(
        "https://www.drillster.com/api/oauth/token",
        "http://www.drillster.com/api/oauth/token",
    );
    let path = dir.write("plain.toml", &config);
    let out = tokengate(&["check", "-c", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("warning: routes[0].auth.token_endpoint: \"http://www.drillster.com/api/oauth/token\" is plain HTTP")
            && stdout.contains("the client secret (routes[0].auth.client_secret)"),
        "{stdout}"
    );
    assert!(!stdout.contains("not-a-real-secret"), "{stdout}");
}

#[test]
fn run_with_a_listener_port_taken_exits_1_naming_the_key() {
    let dir = TempDir::new("busy");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let config = good_config(&common::demo_key_path())
        .replace("127.0.0.1:18080", &busy_addr)
        .replace("127.0.0.1:19090", &common::free_addr().to_string());
    let path = dir.write("busy.toml", &config);
    let out = tokengate(&["run", "-c", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("server.listen: cannot listen on {busy_addr}")),
        "{stderr}"
    );
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_on_a_client_credentials_route_is_a_usage_error() {
    let sandbox = Sandbox::start().await.unwrap();
    let dir = TempDir::new("subject");
    let toml = tokengate::demo::config_toml(
        &sandbox,
        common::free_addr(),
        common::free_addr(),
        &common::demo_key_path(),
    );
    let path = dir.write("sandbox.toml", &toml);
    let p = path.to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        tokengate(&["token", "-c", &p, "--route", "driftrock", "--subject", "x"])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--subject"));
    assert_eq!(sandbox.driftrock.requests(), 0);
    // A subject no id looks like never reaches an assertion.
    for subject in ["", "ann\n@example.com", "a\"b", "ann @example.com"] {
        let p = path.to_str().unwrap().to_string();
        let out = tokio::task::spawn_blocking(move || {
            tokengate(&[
                "token",
                "-c",
                &p,
                "--route",
                "drillster",
                "--subject",
                subject,
            ])
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{subject:?}: {stderr}");
        assert!(stderr.contains("--subject"), "{stderr}");
    }
    assert_eq!(sandbox.drillster.requests(), 0);
    sandbox.shutdown().await.unwrap();
}

/// `tokengate demo` stops cleanly on SIGTERM (a `kill`, a container stop), SIGHUP (its
/// terminal closed) and SIGQUIT as on Ctrl-C: exit 0 and its scratch directory (config and key
/// copy) removed.
#[test]
fn demo_stops_on_sigterm_sighup_and_sigquit_and_removes_its_directory() {
    for signal in ["-TERM", "-HUP", "-QUIT"] {
        demo_stops_on(signal);
    }
}

fn demo_stops_on(signal: &str) {
    let (listen, admin) = (common::free_addr(), common::free_addr());
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["demo", "--listen", &listen.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run tokengate demo");
    let dir = std::env::temp_dir().join(format!("tokengate-demo-{}", child.id()));
    // Up once it prints its last line.
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let printed: Vec<String> = std::io::BufRead::lines(stdout)
        .map_while(Result::ok)
        .take_while(|l| l != "Ctrl-C to stop.")
        .collect();
    assert!(dir.exists(), "printed {printed:?}");
    assert!(std::net::TcpStream::connect(admin).is_ok());
    let killed = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{signal}");
    assert!(!dir.exists(), "{signal}: {} left behind", dir.display());
}
