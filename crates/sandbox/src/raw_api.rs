//! A byte-exact sandbox upstream: a tiny HTTP/1.1 server on raw TCP (optionally TLS) that records
//! every request exactly as it arrived on the wire, for tests that must see what hyper hides
//! (header order and spelling, the raw request-target, `Expect: 100-continue` timing) and for
//! bodies and upgrades the [`SandboxApi`](super::SandboxApi) does not serve.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::BodyExt as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

use super::faults::{FaultAction, Faults};
use super::recent::Recent;
use super::registry::TokenRegistry;
use super::SandboxError;

/// Largest request head accepted (request line + fields), bytes. Above it: 431.
pub const RAW_API_MAX_HEAD: usize = 256 * 1024;
/// Download bodies are written in pieces of this many bytes.
const DOWNLOAD_PIECE: usize = 64 * 1024;

/// One request exactly as the [`RawApi`] received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RawRequest {
    /// The request line and header fields up to and including the empty line, byte for byte.
    #[serde(serialize_with = "lossy_bytes")]
    pub head: Vec<u8>,
    /// The method token.
    pub method: String,
    /// The request-target exactly as sent (origin-form `path?query` for a well-behaved proxy).
    pub target: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor_version: u8,
    /// Header fields in received order with names as spelled on the wire; values as raw bytes
    /// (lossy UTF-8 in JSON).
    #[serde(serialize_with = "lossy_pairs")]
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body bytes received (after de-chunking).
    pub body_len: u64,
    /// SHA-256 of the body, lower-case hex.
    pub body_sha256: String,
    /// Whether a `100 Continue` interim response was sent before reading the body.
    pub sent_continue: bool,
    /// The TLS SNI host name of the connection (`None` on plain TCP or without SNI).
    pub sni: Option<String>,
    /// The `sub` of the accepted token (`None` when refused or when token checks are off).
    pub subject: Option<String>,
    /// Why the token was refused, or why the body could not be read (then `status` is 0 and
    /// `body_len` counts the body bytes that arrived).
    pub error: Option<String>,
    /// The status this server answered with (0: none, the body did not arrive whole).
    pub status: u16,
}

impl RawRequest {
    /// The path part of the request-target (before `?`).
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The query part of the request-target (after the first `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// Every value of header `name` (case-insensitive), in received order, as lossy UTF-8.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_values(name).into_iter().next()
    }

    /// Header names in received order, lower-cased.
    pub fn header_names(&self) -> Vec<String> {
        self.headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect()
    }
}

fn lossy_bytes<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

fn lossy_pairs<S: serde::Serializer>(h: &[(String, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        h.iter()
            .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v))),
    )
}

/// A running byte-exact upstream on `127.0.0.1:<ephemeral>`, plain or TLS.
///
/// Per request, in order:
/// 1. The head is read (at most [`RAW_API_MAX_HEAD`] bytes, else 431) and recorded.
/// 2. [`Faults`] apply (hold, latency, hang, close, canned answer). A canned answer to a request with
///    `Expect: 100-continue` is sent at once, without reading the body, and the connection is
///    closed (RFC 9110 §10.1.1: a server may answer finally instead of 100).
/// 3. The token is checked: exactly one `Authorization: Bearer <token>` known to the
///    [`TokenRegistry`] (unless [`set_check_tokens(false)`](Self::set_check_tokens), which
///    accepts any single Bearer token). A refusal is 401 `invalid_token` (RFC 6750 §3.1), sent
///    early (no `100`, connection closed) when the client is waiting on `Expect: 100-continue`.
/// 4. Otherwise `100 Continue` if asked for, the body is read (`Content-Length` or chunked; a
///    body cut short or malformed is recorded with status 0 and the connection ends) and:
///    - `GET /download/<n>` answers 200 with `n` bytes of [`download_byte`] generated on the fly
///      (memory stays flat however large `n` is);
///    - `GET /ws` with `Upgrade: websocket` answers 101 (RFC 6455 §4.2.2) and echoes every text
///      and binary message until the client closes;
///    - anything else answers 200 with the [`RawRequest`] as JSON.
///
/// Connections are kept alive (HTTP/1.1) unless the client says `Connection: close`.
pub struct RawApi {
    addr: SocketAddr,
    tls: bool,
    state: Arc<RawState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RawApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawApi")
            .field("addr", &self.addr)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

struct RawState {
    registry: TokenRegistry,
    faults: Faults,
    check_tokens: AtomicBool,
    requests: AtomicU64,
    connections: AtomicU64,
    /// Connections whose task has ended.
    connections_ended: AtomicU64,
    /// Request body bytes received (after de-chunking), counted as they arrive.
    body_bytes: AtomicU64,
    ws_messages: AtomicU64,
    recent: Recent<RawRequest>,
}

impl RawState {
    fn record(&self, request: RawRequest) {
        self.recent.push(request);
    }
}

/// Builds a [`RawApi`].
#[must_use = "call .start().await"]
pub struct RawApiBuilder {
    registry: TokenRegistry,
    tls: Option<(Vec<u8>, Vec<u8>)>,
    ip: IpAddr,
}

impl RawApiBuilder {
    /// Serve TLS 1.2/1.3 with this certificate chain and private key (both PEM; the key PKCS#8,
    /// PKCS#1 or SEC1).
    pub fn tls(mut self, cert_chain_pem: &[u8], key_pem: &[u8]) -> Self {
        self.tls = Some((cert_chain_pem.to_vec(), key_pem.to_vec()));
        self
    }

    /// Listen on `ip` (default `127.0.0.1`), e.g. on whatever `localhost` resolves to first, for
    /// a TLS upstream reached by that name.
    pub fn bind(mut self, ip: IpAddr) -> Self {
        self.ip = ip;
        self
    }

    /// Binds `<ip>:0` and starts serving on the current tokio runtime.
    ///
    /// # Errors
    /// [`SandboxError::Bind`] if no port can be bound or the TLS material is unusable.
    pub async fn start(self) -> Result<RawApi, SandboxError> {
        let bind_err = |source| SandboxError::Bind {
            server: "raw api",
            source,
        };
        let acceptor = match &self.tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key).map_err(bind_err)?),
            None => None,
        };
        let listener = TcpListener::bind((self.ip, 0)).await.map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let state = Arc::new(RawState {
            registry: self.registry,
            faults: Faults::default(),
            check_tokens: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            connections_ended: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            ws_messages: AtomicU64::new(0),
            recent: Recent::new(),
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, acceptor, state.clone(), stopped));
        Ok(RawApi {
            addr,
            tls: self.tls.is_some(),
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }
}

fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> io::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("certificate PEM: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| invalid(format!("private key PEM: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl RawApi {
    /// A builder accepting the tokens of `registry`.
    pub fn builder(registry: TokenRegistry) -> RawApiBuilder {
        RawApiBuilder {
            registry,
            tls: None,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// Starts a plain-TCP server accepting the tokens of `registry`.
    ///
    /// # Errors
    /// [`SandboxError::Bind`] if no port can be bound.
    pub async fn start(registry: TokenRegistry) -> Result<Self, SandboxError> {
        Self::builder(registry).start().await
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, or `https://localhost:PORT` for a TLS server (no trailing slash).
    pub fn base_url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// Fault knobs (see the type docs for when they apply).
    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// `false` accepts any single `Authorization: Bearer` token (for tokens the registry did not
    /// issue, e.g. a canned oversized token); `true` (the default) asks the registry.
    pub fn set_check_tokens(&self, on: bool) {
        self.state.check_tokens.store(on, Ordering::SeqCst);
    }

    /// Request heads received, whatever became of them.
    pub fn request_count(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Request body bytes received so far over all requests (after de-chunking), counted as
    /// they arrive: shows a body streams through before it is complete.
    pub fn body_bytes(&self) -> u64 {
        self.state.body_bytes.load(Ordering::SeqCst)
    }

    /// TCP connections whose serving has ended (closed by either side, or failed).
    pub fn connections_ended(&self) -> u64 {
        self.state.connections_ended.load(Ordering::SeqCst)
    }

    /// TCP connections accepted.
    pub fn connection_count(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// WebSocket messages echoed so far.
    pub fn ws_messages(&self) -> u64 {
        self.state.ws_messages.load(Ordering::SeqCst)
    }

    /// The most recent requests (up to 64), oldest first.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.state.recent.all()
    }

    /// The most recent request.
    pub fn last(&self) -> Option<RawRequest> {
        self.state.recent.last()
    }

    /// Stops accepting and closes every open connection.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RawApi {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Byte `i` of a `/download/<n>` body: a fixed pattern that is not all one value.
#[inline]
pub fn download_byte(i: u64) -> u8 {
    (i % 251) as u8
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<RawState>,
    mut stopped: oneshot::Receiver<()>,
) {
    // Dropping the set aborts every open connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        // A bug in this test server: make it loud.
                        tracing::error!(error = %e, "raw api connection task panicked");
                    }
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    state.connections.fetch_add(1, Ordering::SeqCst);
                    let state = state.clone();
                    let acceptor = acceptor.clone();
                    connections.spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        let result = match acceptor {
                            None => serve(tcp, None, &state).await,
                            Some(acceptor) => match acceptor.accept(tcp).await {
                                Ok(tls) => {
                                    let sni = tls.get_ref().1.server_name().map(str::to_owned);
                                    serve(tls, sni, &state).await
                                }
                                Err(e) => Err(e),
                            },
                        };
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "raw api connection ended");
                        }
                        state.connections_ended.fetch_add(1, Ordering::SeqCst);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "raw api accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// How the body of a request is framed (RFC 9112 §6).
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Serves one connection: request after request until close.
async fn serve<S>(mut io: S, sni: Option<String>, state: &RawState) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        // 1. The head.
        let head_len = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end + 4;
            }
            if buf.len() > RAW_API_MAX_HEAD {
                write_simple(&mut io, 431, "request head too large", true).await?;
                return Ok(());
            }
            if io.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        state.requests.fetch_add(1, Ordering::SeqCst);
        let head = buf.split_to(head_len).to_vec();
        let mut fields = [httparse::EMPTY_HEADER; 256];
        let mut parsed = httparse::Request::new(&mut fields);
        if parsed.parse(&head).ok().is_none_or(|s| s.is_partial()) {
            write_simple(&mut io, 400, "unparsable request head", true).await?;
            return Ok(());
        }
        let mut request = RawRequest {
            method: parsed.method.unwrap_or_default().to_owned(),
            target: parsed.path.unwrap_or_default().to_owned(),
            minor_version: parsed.version.unwrap_or(1),
            headers: parsed
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), h.value.to_vec()))
                .collect(),
            head: Vec::new(),
            body_len: 0,
            body_sha256: String::new(),
            sent_continue: false,
            sni: sni.clone(),
            subject: None,
            error: None,
            status: 0,
        };
        request.head = head;
        let expect_continue = has(&request, "expect", "100-continue");
        let mut keep_alive = request.minor_version == 1 && !has(&request, "connection", "close");
        let framing = if has(&request, "transfer-encoding", "chunked") {
            Framing::Chunked
        } else {
            match request
                .header("content-length")
                .map(|v| v.trim().parse::<u64>())
            {
                Some(Ok(n)) => Framing::Length(n),
                Some(Err(_)) => {
                    write_simple(&mut io, 400, "bad content-length", true).await?;
                    return Ok(());
                }
                None => Framing::None,
            }
        };
        let has_body = !matches!(framing, Framing::None | Framing::Length(0));

        // 2. Faults.
        state.faults.pass_hold().await;
        let (latency, action) = state.faults.next_action();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let canned = match action {
            FaultAction::Proceed => None,
            FaultAction::Hang => std::future::pending().await,
            FaultAction::Close => {
                state.record(request);
                return Ok(());
            }
            FaultAction::Panic => panic!("sandbox fault injection: raw api handler panic"),
            FaultAction::Respond(response) => Some(response),
        };

        // 3. The token.
        let verdict = if canned.is_some() {
            Ok(None)
        } else {
            check_token(state, &request)
        };
        let early = expect_continue && has_body && (canned.is_some() || verdict.is_err());
        if early {
            // Answer without reading the body; the connection cannot be reused.
            keep_alive = false;
        } else {
            if expect_continue && has_body {
                io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                io.flush().await?;
                request.sent_continue = true;
            }
            let mut received = 0;
            let read = read_body(&mut io, &mut buf, framing, &mut received, &state.body_bytes);
            match read.await {
                Ok(sha) => {
                    request.body_len = received;
                    request.body_sha256 = sha;
                }
                Err(e) => {
                    // Recorded with what arrived of the body (status 0: no answer), so a test
                    // can tell a body cut short from one that never came.
                    request.body_len = received;
                    request.error = Some(format!("request body: {e}"));
                    state.record(request);
                    return Err(e);
                }
            }
        }

        // 4. The answer.
        if let Some(response) = canned {
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            request.status = parts.status.as_u16();
            let mut out = format!(
                "HTTP/1.1 {} {}\r\n",
                parts.status.as_u16(),
                parts.status.canonical_reason().unwrap_or("")
            )
            .into_bytes();
            for (name, value) in &parts.headers {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            if !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
                out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
            }
            if !keep_alive {
                out.extend_from_slice(b"connection: close\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&body);
            state.record(request);
            io.write_all(&out).await?;
            io.flush().await?;
        } else {
            match verdict {
                Err(description) => {
                    request.status = 401;
                    request.error = Some(description.clone());
                    state.record(request);
                    let body = serde_json::json!({
                        "error": "invalid_token", "error_description": description
                    })
                    .to_string();
                    let head = format!(
                        "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer error=\"invalid_token\"\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
                        body.len(),
                        if keep_alive { "" } else { "connection: close\r\n" }
                    );
                    io.write_all(head.as_bytes()).await?;
                    io.write_all(body.as_bytes()).await?;
                    io.flush().await?;
                }
                Ok(subject) => {
                    request.subject = subject;
                    let path = request.path().to_owned();
                    if request.method == "GET"
                        && path == "/ws"
                        && has(&request, "upgrade", "websocket")
                    {
                        return websocket(io, buf, request, state).await;
                    }
                    match download_size(&request) {
                        Some(n) => {
                            request.status = 200;
                            state.record(request);
                            download(&mut io, n, keep_alive).await?;
                        }
                        None => {
                            request.status = 200;
                            let body = serde_json::to_vec(&request).unwrap_or_default();
                            state.record(request);
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
                                body.len(),
                                // As nginx does: a proxy must not pass this hop's parameters on.
                                if keep_alive {
                                    "keep-alive: timeout=5\r\n"
                                } else {
                                    "connection: close\r\n"
                                }
                            );
                            io.write_all(head.as_bytes()).await?;
                            io.write_all(&body).await?;
                            io.flush().await?;
                        }
                    }
                }
            }
        }
        if !keep_alive {
            let _ = io.shutdown().await;
            return Ok(());
        }
    }
}

/// `Ok(subject)` (`None` when checks are off) or why the token is refused.
fn check_token(state: &RawState, request: &RawRequest) -> Result<Option<String>, String> {
    let values = request.header_values("authorization");
    let [one] = values.as_slice() else {
        return Err(format!("{} Authorization headers", values.len()));
    };
    let token = match one.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            token.trim()
        }
        _ => return Err("Authorization is not a Bearer token".to_owned()),
    };
    if !state.check_tokens.load(Ordering::SeqCst) {
        return Ok(None);
    }
    state
        .registry
        .validate(token)
        .map(|t| Some(t.subject))
        .map_err(|r| r.to_string())
}

/// Whether header `name` lists `token` (comma-separated, case-insensitive).
fn has(request: &RawRequest, name: &str, token: &str) -> bool {
    request
        .header_values(name)
        .iter()
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn download_size(request: &RawRequest) -> Option<u64> {
    if request.method != "GET" {
        return None;
    }
    request.path().strip_prefix("/download/")?.parse().ok()
}

async fn download<S: AsyncWrite + Unpin>(io: &mut S, n: u64, keep_alive: bool) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {n}\r\n{}\r\n",
        if keep_alive { "" } else { "connection: close\r\n" }
    );
    io.write_all(head.as_bytes()).await?;
    // The pattern repeats every 251 bytes, so a piece that is a multiple of 251 long can be
    // reused for every offset that is one too.
    let piece_len = DOWNLOAD_PIECE - DOWNLOAD_PIECE % 251;
    let piece: Vec<u8> = (0..piece_len as u64).map(download_byte).collect();
    let mut left = n;
    while left > 0 {
        let take = left.min(piece_len as u64) as usize;
        io.write_all(&piece[..take]).await?;
        left -= take as u64;
    }
    io.flush().await
}

async fn read_body<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    framing: Framing,
    total: &mut u64,
    counter: &AtomicU64,
) -> io::Result<String> {
    let mut hasher = Sha256::new();
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            hash_exact(io, buf, n, &mut hasher, (total, counter)).await?;
        }
        Framing::Chunked => loop {
            let line = read_line(io, buf).await?;
            let size = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| u64::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailer fields until the empty line.
                while !read_line(io, buf).await?.is_empty() {}
                break;
            }
            hash_exact(io, buf, size, &mut hasher, (total, counter)).await?;
            if !read_line(io, buf).await?.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk not CRLF-terminated",
                ));
            }
        },
    }
    Ok(hex(&hasher.finalize()))
}

/// Feeds the next `n` body bytes (from `buf`, then `io`) to `hasher`, consuming them and
/// counting them in `total` and the server's counter.
async fn hash_exact<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    n: u64,
    hasher: &mut Sha256,
    (total, counter): (&mut u64, &AtomicU64),
) -> io::Result<()> {
    let mut left = n;
    while left > 0 {
        if buf.is_empty() && io.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let take = (buf.len() as u64).min(left) as usize;
        hasher.update(&buf[..take]);
        buf.advance(take);
        left -= take as u64;
        *total += take as u64;
        counter.fetch_add(take as u64, Ordering::SeqCst);
    }
    Ok(())
}

/// One CRLF-terminated line, without the CRLF.
async fn read_line<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> io::Result<Vec<u8>> {
    loop {
        if let Some(end) = find(buf, b"\r\n") {
            let line = buf.split_to(end).to_vec();
            buf.advance(2);
            return Ok(line);
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        if io.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

async fn websocket<S>(
    mut io: S,
    leftover: BytesMut,
    mut request: RawRequest,
    state: &RawState,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(key) = request.header("sec-websocket-key") else {
        write_simple(&mut io, 400, "no Sec-WebSocket-Key", true).await?;
        return Ok(());
    };
    let accept =
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    request.status = 101;
    state.record(request);
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    io.write_all(head.as_bytes()).await?;
    io.flush().await?;
    let stream = Prefixed {
        prefix: leftover,
        inner: io,
    };
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
    while let Some(message) = ws.next().await {
        match message.map_err(io::Error::other)? {
            m @ (Message::Text(_) | Message::Binary(_)) => {
                state.ws_messages.fetch_add(1, Ordering::SeqCst);
                ws.send(m).await.map_err(io::Error::other)?;
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// A stream that first yields bytes already read past the handshake.
struct Prefixed<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let take = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..take]);
            self.prefix.advance(take);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn write_simple<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: u16,
    message: &str,
    close: bool,
) -> io::Result<()> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{message}",
        message.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    io.write_all(head.as_bytes()).await?;
    io.flush().await
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
