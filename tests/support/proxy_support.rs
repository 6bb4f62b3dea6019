//! Shared by the proxy-behaviour tests: a sandbox whose API is the byte-exact [`RawApi`], a
//! gateway in front of it, a scripted upstream, and raw-socket helpers with timeouts.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokengate_sandbox::{keys, RawApi, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{config_for, poll_until, TestGateway};

/// The sandbox (auth servers + hyper echo API), a [`RawApi`] on the same registry, and a gateway
/// whose two demo routes (`/drillster`, `/driftrock`, both stripped) forward to the `RawApi`.
pub struct Rig {
    pub sandbox: Sandbox,
    pub raw: RawApi,
    pub gw: TestGateway,
}

impl Rig {
    /// Starts everything with `edit` applied to the TOML (after the upstream was pointed at the
    /// raw API), and waits until the gateway is ready.
    pub async fn start(edit: impl FnOnce(String, &Sandbox, &RawApi) -> String) -> Rig {
        let sandbox = Sandbox::start().await.expect("sandbox");
        let raw = RawApi::start(sandbox.registry.clone())
            .await
            .expect("raw api");
        Self::start_with(sandbox, raw, edit).await
    }

    /// Like [`start`](Self::start) with a given sandbox and raw API.
    pub async fn start_with(
        sandbox: Sandbox,
        raw: RawApi,
        edit: impl FnOnce(String, &Sandbox, &RawApi) -> String,
    ) -> Rig {
        let api = sandbox.api.base_url();
        let config = config_for(&sandbox, |t| {
            let t = t.replace(
                &format!("upstream = \"{api}\""),
                &format!("upstream = \"{}\"", raw.base_url()),
            );
            edit(t, &sandbox, &raw)
        });
        let gw = TestGateway::start(config).await;
        gw.ready().await;
        Rig { sandbox, raw, gw }
    }

    /// Stops the gateway, the raw API and the sandbox (failing on sandbox handler panics).
    pub async fn stop(self) {
        self.gw.stop().await;
        self.raw.shutdown().await;
        self.sandbox
            .shutdown()
            .await
            .expect("no sandbox handler panicked");
    }
}

/// A `[[routes]]` block named `name` under `prefix` (stripped) to `upstream`, using the
/// Driftrock client credentials grant of `sandbox`, plus `extra` lines in the route table.
pub fn client_credentials_route(
    sandbox: &Sandbox,
    name: &str,
    prefix: &str,
    upstream: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[[routes]]
name = "{name}"
path_prefix = "{prefix}"
strip_prefix = true
upstream = "{upstream}"
{extra}

[routes.auth]
grant = "client_credentials"
token_endpoint = "{endpoint}"
client_id = "{id}"
client_secret = "{secret}"
"#,
        endpoint = sandbox.driftrock.token_endpoint(),
        id = keys::DRIFTROCK_CLIENT_ID,
        secret = keys::DRIFTROCK_CLIENT_SECRET,
    )
}

/// Inserts `line` into the route named `name` (right after its `name = …` line).
pub fn route_setting(toml: &str, name: &str, line: &str) -> String {
    let anchor = format!("name = \"{name}\"\n");
    assert!(toml.contains(&anchor), "no route {name}");
    toml.replacen(&anchor, &format!("{anchor}{line}\n"), 1)
}

/// A response head and body read from a raw socket (the shared harness type).
pub use crate::common::RawResponse as Answer;

/// Reads one response (head, then a `Content-Length` body or up to EOF) from `s`, within 10 s.
/// 1xx interim responses are returned like final ones (the caller reads again).
pub async fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>) -> Answer {
    tokio::time::timeout(Duration::from_secs(10), async {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = s.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "connection closed before a response head: {}",
                String::from_utf8_lossy(buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end - 4]).to_string();
        buf.drain(..head_end);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let mut a = Answer {
            status,
            head,
            body: Vec::new(),
        };
        if status < 200 || status == 204 || status == 304 {
            return a;
        }
        match a
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(n) => {
                while buf.len() < n {
                    let mut chunk = [0u8; 16 * 1024];
                    let r = s.read(&mut chunk).await.expect("read body");
                    assert!(r > 0, "body cut short");
                    buf.extend_from_slice(&chunk[..r]);
                }
                a.body = buf.drain(..n).collect();
            }
            None => {
                s.read_to_end(buf).await.expect("read to end");
                a.body = std::mem::take(buf);
                if a.header("transfer-encoding")
                    .is_some_and(|v| v.contains("chunked"))
                {
                    a.body = dechunk(&a.body);
                }
            }
        }
        a
    })
    .await
    .expect("a response within 10 s")
}

/// Sends `request` on a fresh connection and reads one response.
pub async fn send(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    read_answer(&mut s, &mut Vec::new()).await
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || b.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
    out
}

/// A loopback listener that only counts the connections it accepts: stands in for a host that
/// must never be contacted.
pub struct Tripwire {
    pub addr: SocketAddr,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Tripwire {
    pub async fn start() -> Tripwire {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = count.clone();
        let task = tokio::spawn(async move {
            while let Ok((_s, _)) = l.accept().await {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        Tripwire { addr, count, task }
    }

    /// Connections accepted so far.
    pub fn hits(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Tripwire {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The real `tokengate` binary (`run -c <file>`), for measurements of the gateway process alone
/// (resident memory) and for its log output. Killed on drop.
pub struct BinaryGateway {
    pub child: std::process::Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Where the process's stderr (its log) goes.
    pub log_path: std::path::PathBuf,
}

impl BinaryGateway {
    /// Writes `toml` (which must listen on `listen` and `admin`) to a file and starts the binary
    /// with `RUST_LOG=rust_log`; returns once `/readyz` answers 200, and panics if `listen`
    /// then refuses a connection (`/readyz` promises the proxy listeners accept).
    pub async fn start(
        toml: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        rust_log: &str,
    ) -> BinaryGateway {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let stem = format!("gw-{}-{}", std::process::id(), listen.port());
        let config_path = dir.join(format!("{stem}.toml"));
        let log_path = dir.join(format!("{stem}.log"));
        std::fs::write(&config_path, toml).expect("write config");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .arg("run")
            .arg("-c")
            .arg(&config_path)
            .env("RUST_LOG", rust_log)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tokengate");
        let gw = BinaryGateway {
            child,
            listen,
            admin,
            log_path,
        };
        let client = reqwest::Client::new();
        let url = format!("http://{admin}/readyz");
        let ready = poll_until(Duration::from_secs(20), || async {
            client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(
            ready,
            "binary gateway not ready in 20 s; log:\n{}",
            gw.log()
        );
        if let Err(e) = TcpStream::connect(listen).await {
            panic!("/readyz answered 200 but the proxy listener {listen} refused: {e}");
        }
        gw
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Current resident set size, bytes (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss(&self) -> u64 {
        rss_of(self.pid())
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for BinaryGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmRSS` of process `pid`, bytes (0 if it cannot be read).
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A loopback HTTP/1.1 server answering every request with the next of `responses` (cycling),
/// optionally closing each connection `close_after` its first response without saying so.
pub struct Scripted {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    pub requests: Arc<AtomicU64>,
    /// The request heads received, in order.
    heads: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    pub async fn start(responses: Vec<&'static [u8]>, close_after: Option<Duration>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, r, h) = (connections.clone(), requests.clone(), heads.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, h, responses) = (r.clone(), h.clone(), responses.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request: the head, then a Content-Length body.
                        let end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let raw_head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        h.lock().unwrap_or_else(|e| e.into_inner()).push(raw_head);
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let body: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + body {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + body);
                        let n = r.fetch_add(1, Ordering::SeqCst) as usize;
                        if s.write_all(responses[n % responses.len()]).await.is_err() {
                            return;
                        }
                        if let Some(d) = close_after {
                            tokio::time::sleep(d).await;
                            return;
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            connections,
            requests,
            heads,
            task,
        }
    }

    /// The request heads received so far, in order.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A [`Rig`] with one more route, `/scripted`, to `scripted`.
pub async fn rig_with(scripted: &Scripted) -> Rig {
    let url = format!("http://{}", scripted.addr);
    Rig::start(move |t, sandbox, _| {
        let route = client_credentials_route(sandbox, "scripted", "/scripted", &url, "");
        format!("{t}{route}")
    })
    .await
}
