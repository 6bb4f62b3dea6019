//! Builders for integration tests: a sandbox and a gateway in front of it, on ephemeral loopback
//! ports, plus a raw HTTP/1.1 client for requests reqwest cannot express (duplicate headers with
//! different case, absolute-form targets).
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tokengate::config::Config;
use tokengate::gateway::GatewayHandle;
use tokengate_sandbox::{Echo, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Polls `cond` every 20 ms until it holds or `limit` has passed; whether it held. Tests wait
/// this way for an event (a token request arrived, a token was published, a line was logged),
/// never for a fixed time; `limit` is only a generous bound for a loaded machine.
pub async fn poll_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`poll_until`] that panics with `what` when `cond` does not hold within `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        poll_until(limit, cond).await,
        "not within {limit:?}: {what}"
    );
}

/// A free loopback port for a gateway listener (bound, then released for the gateway to take),
/// taken below the kernel's ephemeral port range: servers that bind port 0 (the sandbox, the
/// raw API) and outgoing connections only get ephemeral ports, so nothing else in the test
/// process can claim this port between here and the gateway's bind. Never the same port twice
/// in one process; each process starts at its own offset.
pub fn free_addr() -> SocketAddr {
    static NEXT: Mutex<Option<(u16, u16, u16)>> = Mutex::new(None);
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    let (low, high, cursor) = next.get_or_insert_with(|| {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32768);
        let (low, high) = (ephemeral_low / 2, ephemeral_low);
        let start = low + (std::process::id() % u32::from(high - low)) as u16;
        (low, high, start)
    });
    for _ in *low..*high {
        let port = *cursor;
        *cursor = if port + 1 >= *high { *low } else { port + 1 };
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().expect("local_addr");
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// The sandbox demo key file in the repository.
pub fn demo_key_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/sandbox/src/keys/demo-key.json")
}

/// The demo configuration for `sandbox` on fresh ports, with `edit` applied to the TOML text.
pub fn config_for(sandbox: &Sandbox, edit: impl FnOnce(String) -> String) -> Config {
    let toml = tokengate::demo::config_toml(sandbox, free_addr(), free_addr(), &demo_key_path());
    let toml = edit(toml);
    Config::from_toml_str(&toml, None, &|_| None).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

/// A running gateway with its base URLs.
pub struct TestGateway {
    pub handle: GatewayHandle,
    /// `http://127.0.0.1:PORT` of the (first) proxy listener.
    pub base: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
}

impl TestGateway {
    /// Starts the gateway on its own thread (blocking until its listeners accept connections).
    pub async fn start(config: Config) -> TestGateway {
        let handle = tokio::task::spawn_blocking(move || GatewayHandle::start(config))
            .await
            .expect("join")
            .expect("gateway starts");
        TestGateway {
            base: format!("http://{}", handle.listen[0]),
            admin: format!("http://{}", handle.admin),
            handle,
        }
    }

    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The proxy listener address.
    pub fn addr(&self) -> SocketAddr {
        self.handle.listen[0]
    }

    /// Waits (by polling the readiness endpoint, the gateway's readiness signal) until every
    /// route holds a usable token.
    pub async fn ready(&self) {
        let client = reqwest::Client::new();
        let url = format!("{}/readyz", self.admin);
        eventually(Duration::from_secs(15), "gateway ready", || async {
            client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Requests that had to wait for a token, summed over routes.
    pub fn waited_requests(&self) -> u64 {
        self.handle
            .state()
            .routes
            .iter()
            .map(|r| r.token.waited_requests())
            .sum()
    }

    /// Stops the gateway.
    pub async fn stop(self) {
        let handle = self.handle;
        tokio::task::spawn_blocking(move || handle.shutdown())
            .await
            .expect("join");
    }
}

/// A response read by [`raw_request`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// First value of a response header (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// The body as the sandbox API's echo.
    pub fn echo(&self) -> Echo {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not an echo ({e}): {}\n{}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}\n{}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends `request` (raw bytes, should say `Connection: close`) and reads the whole answer.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    raw_exchange(s, request).await
}

/// [`raw_request`] from the local address `from` (e.g. `127.0.0.2`, another loopback address:
/// a client the gateway tells apart from `127.0.0.1`).
pub async fn raw_request_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    request: &[u8],
) -> RawResponse {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    let s = socket.connect(addr).await.expect("connect");
    raw_exchange(s, request).await
}

async fn raw_exchange(mut s: tokio::net::TcpStream, request: &[u8]) -> RawResponse {
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("response within 10 s")
        .expect("read");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {}", String::from_utf8_lossy(&buf)));
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut body = buf[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    RawResponse { status, head, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..eol])
                .unwrap_or("0")
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// A tracing writer that appends every log line to a shared buffer, for tests that read what
/// was logged.
#[derive(Clone, Default)]
pub struct LogCapture(pub std::sync::Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> LogCapture {
        self.clone()
    }
}
