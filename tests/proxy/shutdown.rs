//! The drain after SIGTERM, on the real binary (docs/operations.md "Shutdown"): `/readyz`
//! answers 503 at once, both paths keep accepting and serving for `shutdown_delay`, then the
//! listeners refuse connections, requests in flight finish with `Connection: close`, and the
//! process exits 0 within a second of the last one — long before `grace_period`.

use crate::common;
use crate::proxy_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{demo_key_path, free_addr};
use proxy_support::{read_answer, Answer, BinaryGateway};
use tokengate_sandbox::{RawApi, Sandbox};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const DELAY: Duration = Duration::from_secs(2);
const GRACE: Duration = Duration::from_secs(30);

/// A plain GET (the fast path) or a chunked POST (pingora-proxy's path), keeping the connection
/// unless `close`.
fn request(pingora: bool, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    if pingora {
        format!(
            "POST /drillster/p HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\
             {connection}\r\n0\r\n\r\n"
        )
    } else {
        format!("GET /drillster/f HTTP/1.1\r\nHost: gw\r\n{connection}\r\n")
    }
    .into_bytes()
}

/// One request on a new connection: its status, or why there was none.
async fn once(listen: SocketAddr, pingora: bool) -> Result<u16, String> {
    let mut s = TcpStream::connect(listen)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(&request(pingora, true))
        .await
        .map_err(|e| format!("write: {e}"))?;
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut s, &mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, String>(buf)
    })
    .await
    .map_err(|_| "no answer in 10 s".to_string())??;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {text:?}"))
}

async fn readyz(admin: SocketAddr) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_serves_through_the_delay_then_drains_and_exits_after_the_last_request() {
    let sandbox = Sandbox::start().await.unwrap();
    let raw = RawApi::start(sandbox.registry.clone()).await.unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let toml = tokengate::demo::config_toml(&sandbox, listen, admin, &demo_key_path())
        .replace(
            &format!("upstream = \"{}\"", sandbox.api.base_url()),
            &format!("upstream = \"{}\"", raw.base_url()),
        )
        .replacen(
            "grace_period = \"0s\"\n",
            &format!(
                "shutdown_delay = \"{}s\"\ngrace_period = \"{}s\"\n",
                DELAY.as_secs(),
                GRACE.as_secs()
            ),
            1,
        );
    let mut gw = BinaryGateway::start(&toml, listen, admin, "info").await;
    for pingora in [false, true] {
        assert_eq!(
            once(listen, pingora).await,
            Ok(200),
            "pingora-proxy: {pingora}"
        );
    }

    // Requests on new connections, alternating between the paths, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut results = Vec::new();
            let mut pingora = false;
            while !stop.load(Ordering::SeqCst) {
                results.push((pingora, once(listen, pingora).await));
                pingora = !pingora;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            results
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["shutting_down"], true);
    assert!(
        signalled.elapsed() < Duration::from_millis(500),
        "/readyz 503 at once"
    );

    // Most of the delay: every request is served.
    tokio::time::sleep(DELAY - Duration::from_millis(600)).await;
    stop.store(true, Ordering::SeqCst);
    let results = traffic.await.unwrap();
    let refused: Vec<_> = results.iter().filter(|(_, r)| *r != Ok(200)).collect();
    assert!(refused.is_empty(), "refused during the delay: {refused:?}");
    for pingora in [false, true] {
        assert!(
            results.iter().filter(|(p, _)| *p == pingora).count() >= 10,
            "too few requests on pingora-proxy: {pingora}: {}",
            results.len()
        );
    }

    // Two requests in flight across the end of the delay, on kept-alive connections, one per
    // path: the upstream holds them.
    raw.faults().hold();
    let mut slow = Vec::new();
    for pingora in [false, true] {
        let mut s = TcpStream::connect(listen).await.unwrap();
        s.write_all(&request(pingora, false)).await.unwrap();
        slow.push(s);
    }
    common::poll_until(Duration::from_secs(5), || async {
        raw.faults().held() == 2
    })
    .await;
    assert_eq!(raw.faults().held(), 2, "both requests reached the upstream");

    // After the delay the listeners refuse connections, and the process waits for the two.
    let closed = common::poll_until(DELAY + Duration::from_secs(3), || async {
        TcpStream::connect(listen).await.is_err()
    })
    .await;
    assert!(closed, "the proxy listener still accepts after the delay");
    assert!(
        signalled.elapsed() >= DELAY,
        "listener closed {:?} after SIGTERM, before the delay",
        signalled.elapsed()
    );
    // The admin endpoints answer through the drain: /healthz while the process runs, /readyz
    // still 503, /metrics showing it.
    let healthz = common::poll_until(Duration::from_secs(3), || async {
        reqwest::get(format!("http://{admin}/healthz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(healthz, "/healthz does not answer while draining");
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["shutting_down"], true, "{body}");
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("tokengate_connections"), "{metrics}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "exited with requests in flight"
    );

    let released = Instant::now();
    raw.faults().release();
    for (s, pingora) in slow.iter_mut().zip([false, true]) {
        let mut buf = Vec::new();
        let r: Answer = read_answer(s, &mut buf).await;
        assert_eq!(r.status, 200, "pingora-proxy: {pingora}: {}", r.head);
        assert_eq!(
            r.header("connection").map(|v| v.to_ascii_lowercase()),
            Some("close".to_string()),
            "pingora-proxy: {pingora}: {}",
            r.head
        );
    }
    let exited = loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            released.elapsed() < Duration::from_secs(5),
            "still running 5 s after the last request; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let after_last = released.elapsed();
    assert_eq!(exited.code(), Some(0), "log:\n{}", gw.log());
    assert!(
        after_last < Duration::from_secs(1),
        "exit {after_last:?} after the last request was released"
    );
    raw.shutdown().await;
    sandbox.shutdown().await.unwrap();
}

/// Whether `pid` has a handler for SIGTERM (bit 15 of `SigCgt` in `/proc/<pid>/status`).
fn catches_sigterm(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
}

/// A SIGTERM in the first moments of `run`, while it reads its config, is caught and drains
/// once the gateway runs: exit 0, not death by the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_starting_drains_and_exits_0() {
    let sandbox = Sandbox::start().await.unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let toml = tokengate::demo::config_toml(&sandbox, listen, admin, &demo_key_path());
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let config_path = dir.join(format!(
        "starting-{}-{}.toml",
        std::process::id(),
        listen.port()
    ));
    let log_path = config_path.with_extension("log");
    std::fs::write(&config_path, toml).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .arg("run")
        .arg("-c")
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The first moment a SIGTERM handler exists: long before the gateway's listeners.
    let started = Instant::now();
    while !catches_sigterm(pid) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no SIGTERM handler"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still running 20 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{log}");
    assert!(log.contains("while starting"), "log:\n{log}");
    sandbox.shutdown().await.unwrap();
}
