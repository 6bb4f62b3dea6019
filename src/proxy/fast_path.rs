//! The HTTP/1.1 keep-alive fast path: the common request forwarded without pingora-proxy's
//! per-request machinery, and everything else handed to it.
//!
//! Each proxy listener runs a [`ListenerApp`]. For every request on a downstream connection it
//! reads the request head, and when the request is *plain* it forwards it itself:
//!
//! ```text
//!  HTTP/1.1, origin-form target, Host present once, no Transfer-Encoding / Upgrade / Expect /
//!  TE / Trailer, Connection naming only keep-alive or close, Content-Length body that fits the
//!  401 replay buffer, client allowed, route found, method allowed, access token usable now
//! ```
//!
//! Anything else — and every request the gateway refuses (403/404/405/503), since refusals are
//! decided there — is handed, with the bytes already read put back in front of the stream, to
//! pingora-proxy running [`Gateway`] for that request; if the connection stays open, the next
//! request is the fast path's again. The two paths send the
//! upstream the same request (same header hygiene, same field order; `tests/` runs both) and
//! count and log requests the same way.
//!
//! What the fast path saves (BENCHMARKS.md): one downstream read and one upstream write per
//! request, the upstream request head written from the client's bytes into one buffer (no
//! header maps), one upstream connection held by the downstream connection between requests
//! (no pool lookup, no idle-watch task per request), and the response head copied with three
//! fields changed.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::{HeaderValue, Method};
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::Peer;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};

use super::error_response::GatewayError;
use super::routes::{Route, RouteTable};
use super::{client_allowed, valid_request_id, Gateway, SharedState};
use crate::metrics::UpstreamErrorKind;

/// A request head larger than this, or with more fields than [`MAX_FIELDS`], goes to pingora.
const MAX_HEAD: usize = 64 * 1024;
/// Most fields the fast path parses in one head (pingora accepts up to 256).
const MAX_FIELDS: usize = 128;
/// How long a downstream connection may sit idle between requests, and how long a request
/// head or body may take to arrive: pingora's keep-alive default.
const DOWNSTREAM_IDLE: Duration = Duration::from_secs(60);
/// A held upstream connection idle longer than this is checked for a close before an
/// idempotent request reuses it (a non-idempotent one always checks).
const CHECK_IDLE_UPSTREAM_AFTER: Duration = Duration::from_millis(200);
/// A client connection idle this long gives its upstream connection back to the pool.
const HOLD_WHILE_IDLE: Duration = Duration::from_secs(2);
/// Read size for response bodies.
const READ_CHUNK: usize = 16 * 1024;

/// The service of one proxy listener: the fast path, and pingora-proxy for everything else.
pub struct ListenerApp {
    table: RouteTable,
    state: Arc<SharedState>,
    connector: TransportConnector,
    slow: Arc<HttpProxy<Gateway>>,
    /// Largest request body the fast path takes: it must be replayable after an upstream 401.
    body_limit: usize,
}

impl ListenerApp {
    /// The service for a listener serving `table`.
    pub fn new(table: RouteTable, state: Arc<SharedState>, conf: &Arc<ServerConf>) -> Self {
        let slow = pingora::proxy::http_proxy(conf, Gateway::new(table.clone(), state.clone()));
        let body_limit = state.replay_body_limit.min(super::RETRY_BUFFER_LIMIT);
        ListenerApp {
            table,
            state,
            connector: TransportConnector::new(Some(ConnectorOptions::from_server_conf(conf))),
            slow: Arc::new(slow),
            body_limit,
        }
    }
}

#[async_trait]
impl ServerApp for ListenerApp {
    async fn process_new(
        self: &Arc<Self>,
        mut down: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Only a plain TCP stream can take back bytes already read.
        if !down.as_any().is::<L4Stream>() {
            return ServerApp::process_new(&self.slow, down, shutdown).await;
        }
        let mut conn = Conn::new(&down);
        loop {
            if let Outcome::Close = self.serve(&mut down, &mut conn, shutdown).await {
                if !*shutdown.borrow() {
                    self.release(conn.held.take());
                }
                return None;
            }
            // One request for pingora-proxy. It may take long (an upgraded connection lasts as
            // long as the client wants): the held upstream connection goes back to the pool.
            self.release(conn.held.take());
            let Ok(mut l4) = down.into_any().downcast::<L4Stream>() else {
                return None;
            };
            l4.rewind(&conn.buf);
            conn.buf.clear();
            let mut session = ServerSession::new_http1(l4);
            // What pingora's own HTTP/1 loop sets: 60 s keep-alive, none while shutting down.
            session.set_keepalive((!*shutdown.borrow()).then_some(60));
            // The connection comes back after that request when it can carry another, so one
            // unusual request (or a moment without a usable token) does not keep the client's
            // connection off the fast path.
            let reused = HttpServerApp::process_new_http(&self.slow, session, shutdown).await?;
            let (stream, _pipelining_off) = reused.consume();
            down = stream;
            if !down.as_any().is::<L4Stream>() {
                return ServerApp::process_new(&self.slow, down, shutdown).await;
            }
        }
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.slow).await;
    }
}

impl ListenerApp {
    /// Returns a clean upstream connection to pingora's connection pool.
    fn release(&self, held: Option<Held>) {
        if let Some(held) = held.filter(|h| h.reusable) {
            let peer = &self.state.routes[held.route].peer;
            self.connector.release_stream(
                held.stream,
                peer.reuse_hash(),
                peer.options.idle_timeout,
            );
        }
    }
}

/// How a downstream connection leaves the fast path.
enum Outcome {
    /// Closed (or to be closed).
    Close,
    /// The next request goes to pingora-proxy, with `Conn::buf` put back in front of the
    /// stream; the connection comes back to the fast path after it if it stays open.
    Delegate,
}

/// Per-connection state, reused across the connection's requests.
struct Conn {
    /// Downstream bytes read and not yet consumed; the current request starts at 0.
    buf: Vec<u8>,
    /// The upstream request head (and body) or the downstream response head being built.
    out: Vec<u8>,
    /// Upstream bytes read.
    ubuf: Vec<u8>,
    fields: Vec<Field>,
    client_ip: Option<std::net::IpAddr>,
    /// `client_ip` as `X-Forwarded-For` shows it (IPv4-mapped IPv6 as IPv4), formatted once.
    client_ip_text: Option<Vec<u8>>,
    allowed: bool,
    held: Option<Held>,
    timer: Timer,
}

/// An upstream connection the downstream connection keeps between requests.
struct Held {
    route: usize,
    stream: Stream,
    last_used: Instant,
    /// Clean after a complete response (nothing unread, no `Connection: close`).
    reusable: bool,
}

impl Conn {
    fn new(down: &Stream) -> Self {
        let client_ip = down
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        Self::detached(client_ip)
    }

    fn detached(client_ip: Option<std::net::IpAddr>) -> Self {
        Conn {
            buf: Vec::with_capacity(8 * 1024),
            out: Vec::with_capacity(4 * 1024),
            ubuf: Vec::with_capacity(READ_CHUNK),
            fields: Vec::with_capacity(32),
            client_ip,
            client_ip_text: client_ip.map(|ip| ip.to_canonical().to_string().into_bytes()),
            allowed: false,
            held: None,
            timer: Timer::default(),
        }
    }
}

/// What a request field is to the gateway.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Other,
    Authorization,
    /// Removed: `Proxy-Authorization`, `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`.
    Drop,
    Cookie,
    Host,
    XForwardedHost,
    XForwardedProto,
    XForwardedFor,
    XRequestId,
    Connection,
    ContentLength,
    /// A field the fast path does not handle: the request goes to pingora.
    Unhandled,
}

/// One request field: byte ranges into `Conn::buf`.
#[derive(Clone, Debug)]
struct Field {
    name: Range<usize>,
    value: Range<usize>,
    kind: Kind,
}

fn classify(name: &[u8]) -> Kind {
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    match name.len() {
        2 if is("te") => Kind::Unhandled,
        4 if is("host") => Kind::Host,
        6 if is("cookie") => Kind::Cookie,
        6 if is("expect") => Kind::Unhandled,
        7 if is("upgrade") || is("trailer") => Kind::Unhandled,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::Drop,
        12 if is("x-request-id") => Kind::XRequestId,
        13 if is("authorization") => Kind::Authorization,
        14 if is("content-length") => Kind::ContentLength,
        14 if is("http2-settings") => Kind::Unhandled,
        15 if is("x-forwarded-for") => Kind::XForwardedFor,
        16 if is("x-forwarded-host") => Kind::XForwardedHost,
        16 if is("proxy-connection") => Kind::Drop,
        17 if is("x-forwarded-proto") => Kind::XForwardedProto,
        17 if is("transfer-encoding") => Kind::Unhandled,
        18 if is("proxy-authenticate") => Kind::Drop,
        19 if is("proxy-authorization") => Kind::Drop,
        _ => Kind::Other,
    }
}

/// A parsed request the fast path will forward.
struct Plain {
    head_len: usize,
    body_len: usize,
    method: Method,
    target: Range<usize>,
    host: Range<usize>,
    request_id: Option<Range<usize>>,
    close: bool,
}

/// The result of looking at the buffered request.
enum Parsed {
    /// Forward it.
    Plain(Plain),
    /// The head is not complete yet.
    Partial,
    /// Hand the connection to pingora.
    Delegate,
}

/// Parses the head at the start of `buf` into `fields`; decides whether it is plain.
fn parse_request(buf: &[u8], fields: &mut Vec<Field>) -> Parsed {
    let mut storage = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut storage);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Delegate,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Delegate;
    };
    // Only what pingora itself would accept as a target (it parses into `http::Uri`).
    if !target.starts_with('/') || http::uri::PathAndQuery::try_from(target).is_err() {
        return Parsed::Delegate;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Delegate;
    };
    if method == Method::CONNECT {
        return Parsed::Delegate;
    }
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    fields.clear();
    let mut host = None;
    let mut request_id = None;
    let mut body_len: Option<usize> = None;
    let mut close = false;
    for h in req.headers.iter() {
        let kind = classify(h.name.as_bytes());
        match kind {
            Kind::Unhandled => return Parsed::Delegate,
            Kind::Host => {
                if host.is_some() {
                    return Parsed::Delegate;
                }
                host = Some(offset(h.value));
            }
            Kind::XRequestId if request_id.is_none() => request_id = Some(offset(h.value)),
            Kind::ContentLength => {
                let Some(n) = std::str::from_utf8(h.value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<usize>().ok())
                else {
                    return Parsed::Delegate;
                };
                if body_len.is_some_and(|m| m != n) {
                    return Parsed::Delegate;
                }
                body_len = Some(n);
            }
            Kind::Connection => {
                for token in h.value.split(|b| *b == b',').map(|t| t.trim_ascii()) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        // It names other fields as hop-by-hop: pingora removes those.
                        return Parsed::Delegate;
                    }
                }
            }
            _ => {}
        }
        fields.push(Field {
            name: offset(h.name.as_bytes()),
            value: offset(h.value),
            kind,
        });
    }
    let Some(host) = host else {
        return Parsed::Delegate;
    };
    Parsed::Plain(Plain {
        head_len,
        body_len: body_len.unwrap_or(0),
        method,
        target: offset(target.as_bytes()),
        host,
        request_id,
        close,
    })
}

/// Writes the upstream request head for `ctx.req` into `c.out`, then its body:
/// the same message pingora-proxy sends after [`Gateway`]'s `upstream_request_filter`
/// (credentials stripped, one `Authorization: Bearer`, `Host`, `X-Forwarded-*`, `X-Request-Id`,
/// hop-by-hop fields removed, the client's field order kept, the client's spelling of every
/// field the gateway does not set, the gateway's fields in their usual spelling in the place of
/// the client's first one of that name or appended in the same order).
fn write_upstream_request(c: &mut Conn, ctx: &RequestCtx<'_>, authorization: &HeaderValue) {
    let Conn {
        out,
        buf,
        fields,
        client_ip_text,
        ..
    } = c;
    let client_ip = client_ip_text.as_deref();
    let (req, route, request_id) = (ctx.req, ctx.route, ctx.request_id);
    out.clear();
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    let target = &buf[req.target.clone()];
    match super::origin_form_target(target, route) {
        Some(t) => out.extend_from_slice(&t),
        None => out.extend_from_slice(target),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let xff = |out: &mut Vec<u8>, prev: Option<&[u8]>| {
        if let Some(p) = prev {
            out.extend_from_slice(p);
            if client_ip.is_some() {
                out.extend_from_slice(b", ");
            }
        }
        if let Some(ip) = client_ip {
            out.extend_from_slice(ip);
        }
    };
    let (mut authorization_done, mut xfh_done, mut xfp_done, mut xff_done, mut id_done) =
        (false, false, false, false, false);
    for f in fields {
        let name = &buf[f.name.clone()];
        match f.kind {
            Kind::Authorization => {
                if !authorization_done {
                    push_field(out, b"Authorization", authorization.as_bytes());
                    authorization_done = true;
                }
            }
            Kind::Drop | Kind::Connection => {}
            Kind::Cookie if !route.forward_cookies => {}
            Kind::Host => push_field(out, b"Host", route.host_header.as_bytes()),
            Kind::XForwardedHost => {
                if !xfh_done {
                    push_field(out, b"X-Forwarded-Host", &buf[req.host.clone()]);
                    xfh_done = true;
                }
            }
            Kind::XForwardedProto => {
                if !xfp_done {
                    push_field(out, b"X-Forwarded-Proto", b"http");
                    xfp_done = true;
                }
            }
            Kind::XForwardedFor => {
                if !xff_done && client_ip.is_some() {
                    out.extend_from_slice(b"X-Forwarded-For: ");
                    xff(out, Some(&buf[f.value.clone()]));
                    out.extend_from_slice(b"\r\n");
                    xff_done = true;
                } else if client_ip.is_none() {
                    push_field(out, name, &buf[f.value.clone()]);
                }
            }
            Kind::XRequestId => {
                if !id_done {
                    push_field(out, b"X-Request-Id", request_id.as_bytes());
                    id_done = true;
                }
            }
            Kind::Other if is_stripped(name, route) => {}
            _ => push_field(out, name, &buf[f.value.clone()]),
        }
    }
    if !authorization_done {
        push_field(out, b"Authorization", authorization.as_bytes());
    }
    if !xfh_done {
        push_field(out, b"X-Forwarded-Host", &buf[req.host.clone()]);
    }
    if !xfp_done {
        push_field(out, b"X-Forwarded-Proto", b"http");
    }
    if !xff_done && client_ip.is_some() {
        out.extend_from_slice(b"X-Forwarded-For: ");
        xff(out, None);
        out.extend_from_slice(b"\r\n");
    }
    if !id_done {
        push_field(out, b"X-Request-Id", request_id.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&buf[req.head_len..req.head_len + req.body_len]);
}

/// Whether `name` is one of the route's `strip_headers`.
#[inline]
fn is_stripped(name: &[u8], route: &Route) -> bool {
    route
        .strip_headers
        .iter()
        .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// How the upstream response body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// The parts of an upstream response head the fast path acts on.
struct ResponseHead {
    head_len: usize,
    status: u16,
    framing: Framing,
    upstream_close: bool,
}

/// Parses the response head at the start of `ubuf` and writes the downstream head into `out`:
/// `Connection` and `Keep-Alive` replaced by the gateway's own `Connection`, `X-Request-Id`
/// set, `Date` added when missing (what pingora's HTTP/1 server does). `Ok(None)`: incomplete.
fn parse_response(
    ubuf: &[u8],
    head_request: bool,
    request_id: &HeaderValue,
    keepalive: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, &'static str> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut storage);
    // As lenient as pingora's HTTP/1 client: `Name : value` is accepted (and sent on as
    // `Name: value`).
    let mut parser = httparse::ParserConfig::default();
    parser.allow_spaces_after_header_name_in_responses(true);
    let head_len = match parser.parse_response(&mut resp, ubuf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if ubuf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("response head too large"),
        Err(_) => return Err("malformed response head"),
    };
    let status = resp.code.unwrap_or(0);
    let version = resp.version.unwrap_or(0);
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut upstream_close = version == 0;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or("invalid Content-Length")?;
            if length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length");
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|b| *b == b',').map(|t| t.trim_ascii()) {
                if token.eq_ignore_ascii_case(b"close") {
                    upstream_close = true;
                } else if version == 0 && token.eq_ignore_ascii_case(b"keep-alive") {
                    upstream_close = false;
                }
            }
        }
    }
    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304
    {
        Framing::None
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    let keepalive = keepalive && framing != Framing::UntilClose;

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse guarantees three digits.
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let informational = (100..200).contains(&status);
    let (mut id_done, mut date) = (false, false);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if !informational {
            if name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"keep-alive")
            {
                continue;
            }
            if name.eq_ignore_ascii_case(b"content-length") && chunked.is_some() {
                continue;
            }
            if name.eq_ignore_ascii_case(b"x-request-id") {
                if !id_done {
                    push_field(out, b"X-Request-Id", request_id.as_bytes());
                    id_done = true;
                }
                continue;
            }
            date |= name.eq_ignore_ascii_case(b"date");
        }
        push_field(out, name, h.value);
    }
    if !informational {
        if !date {
            let now = pingora::protocols::http::date::get_cached_date();
            push_field(out, b"Date", now.as_bytes());
        }
        let connection: &[u8] = if keepalive { b"keep-alive" } else { b"close" };
        push_field(out, b"Connection", connection);
        if !id_done {
            push_field(out, b"X-Request-Id", request_id.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        head_len,
        status,
        framing,
        upstream_close,
    }))
}

#[inline]
fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Finds the end of a chunked body (RFC 9112 §7.1) in bytes fed to it piece by piece.
#[derive(Debug, Default)]
struct ChunkedEnd {
    state: ChunkState,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    FinalLf,
    Done,
}

impl ChunkedEnd {
    /// Feeds `bytes`; `Ok(Some(n))` when the body ends after `bytes[..n]`.
    fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, &'static str> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err("chunk size too large");
                        }
                        self.size = self.size * 16 + (b as char).to_digit(16).unwrap_or(0) as u64;
                        Size
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => Extension,
                    b'\r' if self.digits > 0 => SizeLf,
                    _ => return Err("malformed chunk size"),
                },
                Extension => match b {
                    b'\r' => SizeLf,
                    b'\n' => return Err("malformed chunk extension"),
                    _ => Extension,
                },
                SizeLf if b == b'\n' => {
                    let size = std::mem::take(&mut self.size);
                    self.digits = 0;
                    if size == 0 {
                        TrailerStart
                    } else {
                        Data(size)
                    }
                }
                SizeLf => return Err("malformed chunk size line"),
                Data(rem) => {
                    let take = rem.min((bytes.len() - i) as u64);
                    i += take as usize;
                    let rem = rem - take;
                    self.state = if rem == 0 { DataCr } else { Data(rem) };
                    continue;
                }
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Size,
                DataCr | DataLf => return Err("malformed chunk end"),
                TrailerStart if b == b'\r' => FinalLf,
                TrailerStart | TrailerLine if b == b'\n' => {
                    if self.state == TrailerStart {
                        return Err("malformed trailer");
                    }
                    TrailerStart
                }
                TrailerStart | TrailerLine => TrailerLine,
                FinalLf if b == b'\n' => Done,
                FinalLf => return Err("malformed last chunk"),
                Done => Done,
            };
            i += 1;
            if self.state == Done {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }
}

/// Why an upstream exchange failed, and what the client gets.
struct UpstreamFailure {
    kind: UpstreamErrorKind,
    err: GatewayError,
    /// Failed before any response byte arrived on a reused connection: safe to retry an
    /// idempotent request on a new one (pingora's policy).
    retryable: bool,
    what: String,
}

impl UpstreamFailure {
    fn io(e: io::Error, reused: bool, got_bytes: bool, what: &str) -> Self {
        let timeout = e.kind() == io::ErrorKind::TimedOut;
        UpstreamFailure {
            kind: if timeout {
                UpstreamErrorKind::Timeout
            } else {
                UpstreamErrorKind::Reset
            },
            err: if timeout {
                GatewayError::UpstreamTimeout
            } else {
                GatewayError::UpstreamUnreachable
            },
            retryable: reused && !got_bytes && !timeout,
            what: format!("{what}: {e}"),
        }
    }
}

/// How often a connection's [`Timer`] wakes while one of its reads or writes waits.
const TIMER_TICK: Duration = Duration::from_secs(1);

/// One timer per connection for all its read and write timeouts, instead of a timer entry
/// registered and dropped per operation (which cost ~1 µs per request: BENCHMARKS.md). It is
/// re-armed only when it fires (at most once per [`TIMER_TICK`] while something waits) or when
/// an operation's deadline is nearer than its next firing, so a timeout fires on time.
#[derive(Default)]
struct Timer {
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Timer {
    /// `fut` bounded by `limit` (`None`: no limit). The future is polled once first: most
    /// reads and writes are ready at once and then read no clock at all.
    async fn bounded<T>(
        &mut self,
        limit: Option<Duration>,
        fut: impl Future<Output = io::Result<T>>,
    ) -> io::Result<T> {
        let mut fut = std::pin::pin!(fut);
        if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
        {
            return r;
        }
        let Some(limit) = limit else {
            return fut.await;
        };
        let deadline = tokio::time::Instant::now() + limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            while sleep.as_mut().poll(cx).is_ready() {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
                }
                sleep.as_mut().reset((now + TIMER_TICK).min(deadline));
            }
            Poll::Pending
        })
        .await
    }
}

/// Whether an idle upstream connection was closed (or sent something unasked) while idle:
/// one non-blocking read.
fn closed_while_idle(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut rb = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    !matches!(
        std::pin::Pin::new(&mut **stream).poll_read(&mut cx, &mut rb),
        Poll::Pending
    )
}

/// How one request ended.
enum Exchange {
    /// Response forwarded in full; keep the downstream connection when `keepalive`.
    Done { status: u16, keepalive: bool },
    /// The response could not be completed (or was a gateway error): close the connection.
    Broken { status: u16 },
}

/// Per-request facts the exchange and the log line need.
struct RequestCtx<'a> {
    route: &'a Route,
    index: usize,
    req: &'a Plain,
    request_id: &'a HeaderValue,
    keepalive: bool,
    started: Instant,
}

/// A request the fast path forwards: its route and the access token it carries.
struct Admitted {
    index: usize,
    authorization: HeaderValue,
    generation: u64,
}

/// The admission decisions [`Gateway::request_filter`] makes, for a plain request: the client
/// is allowed, the body fits the replay limit, a route matches, the method is allowed and a
/// token is usable now. `None`: pingora-proxy decides (and answers any refusal).
fn admit(
    table: &RouteTable,
    state: &SharedState,
    c: &Conn,
    req: &Plain,
    body_limit: usize,
    now: Instant,
) -> Option<Admitted> {
    if !c.allowed || req.body_len > body_limit {
        return None;
    }
    let target = &c.buf[req.target.clone()];
    let path = match target.iter().position(|&b| b == b'?') {
        Some(q) => &target[..q],
        None => target,
    };
    // `parse_request` checked that the target is a valid URI path (ASCII).
    let path = std::str::from_utf8(path).ok()?;
    let index = table.lookup(Some(&c.buf[req.host.clone()]), path)?;
    let route = &state.routes[index];
    if !route.allows(&req.method) {
        return None;
    }
    let (authorization, generation) = route.token.usable_now(now)?;
    Some(Admitted {
        index,
        authorization,
        generation,
    })
}

/// The request's id: the client's `X-Request-Id` when usable, else a new one.
fn request_id(buf: &[u8], req: &Plain, state: &SharedState) -> HeaderValue {
    match &req.request_id {
        Some(r) => HeaderValue::from_bytes(&buf[r.clone()])
            .ok()
            .filter(valid_request_id)
            .unwrap_or_else(|| state.request_ids.next()),
        None => state.request_ids.next(),
    }
}

/// Scratch buffers for [`own_work`], reused across calls like a connection's.
pub struct Scratch(Conn);

impl Scratch {
    /// Buffers for a client at `client_ip`, admitted by `allowed_clients`.
    pub fn new(client_ip: std::net::IpAddr) -> Self {
        Scratch(Conn::detached(Some(client_ip)))
    }

    /// The last upstream request head (after [`own_work`] returned `Some`, the client's
    /// response head replaced it).
    pub fn out(&self) -> &[u8] {
        &self.0.out
    }
}

/// Everything the fast path's own code does for one request, without I/O, for
/// `benches/hot_path.rs` and tests: parse the client's `request` (head and body), admit it
/// (allowlist, route among `state.routes` through `table`, method, token), pick the request
/// id, write the upstream request, parse the upstream's `response` head and write the client's
/// version, count the request. Returns `(upstream request, client response head)` lengths, or
/// `None` when pingora-proxy would get the request.
pub fn own_work(
    table: &RouteTable,
    state: &SharedState,
    request: &[u8],
    response: &[u8],
    scratch: &mut Scratch,
) -> Option<(usize, usize)> {
    let started = Instant::now();
    let c = &mut scratch.0;
    c.buf.clear();
    c.buf.extend_from_slice(request);
    c.allowed = c
        .client_ip
        .is_some_and(|ip| client_allowed(&state.allowed_clients, ip));
    let Parsed::Plain(req) = parse_request(&c.buf, &mut c.fields) else {
        return None;
    };
    let limit = state.replay_body_limit.min(super::RETRY_BUFFER_LIMIT);
    let admitted = admit(table, state, c, &req, limit, started)?;
    let route = &state.routes[admitted.index];
    let request_id = request_id(&c.buf, &req, state);
    let ctx = RequestCtx {
        route,
        index: admitted.index,
        req: &req,
        request_id: &request_id,
        keepalive: !req.close,
        started,
    };
    write_upstream_request(c, &ctx, &admitted.authorization);
    let sent = c.out.len();
    let head = parse_response(response, false, &request_id, ctx.keepalive, &mut c.out).ok()??;
    route.metrics.request(head.status, started.elapsed());
    Some((sent, c.out.len()))
}

impl ListenerApp {
    /// Serves requests on `down` until it closes or a request needs pingora.
    async fn serve(&self, down: &mut Stream, c: &mut Conn, shutdown: &ShutdownWatch) -> Outcome {
        c.allowed = c
            .client_ip
            .is_some_and(|ip| client_allowed(&self.state.allowed_clients, ip));
        loop {
            let req = loop {
                match parse_request(&c.buf, &mut c.fields) {
                    Parsed::Plain(req) => break req,
                    Parsed::Delegate => return Outcome::Delegate,
                    Parsed::Partial => {}
                }
                c.buf.reserve(4096);
                let wait = match &c.held {
                    Some(_) => HOLD_WHILE_IDLE,
                    None => DOWNSTREAM_IDLE,
                };
                match c.timer.bounded(Some(wait), down.read_buf(&mut c.buf)).await {
                    Ok(0) => return Outcome::Close,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::TimedOut && c.held.is_some() => {
                        // An idle client does not keep an upstream connection to itself: it
                        // goes back to pingora's pool (bounded, watched for closes).
                        self.release(c.held.take());
                    }
                    Err(_) => return Outcome::Close,
                }
            };
            let started = Instant::now();
            let Some(Admitted {
                index,
                authorization,
                generation,
            }) = admit(&self.table, &self.state, c, &req, self.body_limit, started)
            else {
                return Outcome::Delegate;
            };
            let route = &self.state.routes[index];
            // The body (Content-Length only) in full: it may have to be sent twice.
            let total = req.head_len + req.body_len;
            while c.buf.len() < total {
                c.buf.reserve(total - c.buf.len());
                match c
                    .timer
                    .bounded(Some(DOWNSTREAM_IDLE), down.read_buf(&mut c.buf))
                    .await
                {
                    Ok(0) | Err(_) => return Outcome::Close,
                    Ok(_) => {}
                }
            }
            let request_id = request_id(&c.buf, &req, &self.state);
            let ctx = RequestCtx {
                route,
                index,
                req: &req,
                request_id: &request_id,
                keepalive: !req.close && !*shutdown.borrow(),
                started,
            };
            let (exchange, generation, error) = self
                .exchange(down, c, &ctx, authorization, generation)
                .await;
            let (status, keep) = match exchange {
                Exchange::Done { status, keepalive } => (status, keepalive),
                Exchange::Broken { status } => (status, false),
            };
            let target = &c.buf[req.target.clone()];
            let path = target.split(|&b| b == b'?').next().unwrap_or(b"");
            log(&ctx, path, status, generation, error);
            if !keep {
                return Outcome::Close;
            }
            // Pipelined bytes (the next request) stay in front.
            c.buf.drain(..total);
        }
    }

    /// Sends the request upstream — again on a new connection after a reused one failed
    /// before answering (idempotent methods only, as pingora), and once more with a new token
    /// after a 401 — and forwards the response.
    async fn exchange(
        &self,
        down: &mut Stream,
        c: &mut Conn,
        ctx: &RequestCtx<'_>,
        mut authorization: HeaderValue,
        mut generation: u64,
    ) -> (Exchange, u64, Option<&'static str>) {
        let route = ctx.route;
        let mut replayed = false;
        let mut attempts = 0;
        loop {
            write_upstream_request(c, ctx, &authorization);
            let sent = loop {
                attempts += 1;
                let (mut up, reused) = match self
                    .upstream(c, ctx.index, ctx.req.method.is_idempotent())
                    .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        let (kind, err) = super::classify_upstream_error(e.etype());
                        route.metrics.upstream_error(kind);
                        tracing::warn!(route = %route.name, error = %e, "upstream connect failed");
                        return fail(down, c, ctx, err, generation).await;
                    }
                };
                match send(&mut up, c, ctx, reused).await {
                    Ok(head) => break (up, head),
                    Err(f) if f.retryable && attempts < 3 && ctx.req.method.is_idempotent() => {}
                    Err(f) => {
                        route.metrics.upstream_error(f.kind);
                        tracing::warn!(route = %route.name, error = %f.what, "upstream request failed");
                        return fail(down, c, ctx, f.err, generation).await;
                    }
                }
            };
            let (up, head) = sent;
            if head.status == 401 {
                if replayed {
                    // The new token was refused too: no loop, the 401 goes to the client.
                    route.metrics.unauthorized(false);
                } else {
                    // Drop exactly the token this request carried; one replay with a new one
                    // (one renewal is shared by every request that saw the 401).
                    route.token.invalidate(generation);
                    route.metrics.unauthorized(true);
                    replayed = true;
                    attempts = 0;
                    drop(up);
                    match route.token.token().await {
                        Ok((a, g)) => (authorization, generation) = (a, g),
                        Err(unavailable) => {
                            let err = GatewayError::TokenUnavailable {
                                retry_after: unavailable.retry_after,
                            };
                            return fail(down, c, ctx, err, generation).await;
                        }
                    }
                    continue;
                }
            }
            if head.status == 101 {
                // No upgrade was asked for (such requests go to pingora).
                route.metrics.upstream_error(UpstreamErrorKind::Reset);
                return fail(down, c, ctx, GatewayError::UpstreamUnreachable, generation).await;
            }
            return (forward(down, up, c, ctx, head).await, generation, None);
        }
    }

    /// An upstream connection for route `index`: the one this downstream connection holds if
    /// it is still good, else one from pingora's connector (its pool, or new). The flag says
    /// whether the connection was used before.
    async fn upstream(
        &self,
        c: &mut Conn,
        index: usize,
        idempotent: bool,
    ) -> pingora::Result<(Stream, bool)> {
        if let Some(mut held) = c.held.take() {
            // A request that cannot be retried checks every time; others only after the held
            // connection sat idle a while (a failure on a just-used one is retried).
            let alive = held.reusable
                && ((idempotent && held.last_used.elapsed() < CHECK_IDLE_UPSTREAM_AFTER)
                    || !closed_while_idle(&mut held.stream));
            if alive && held.route == index {
                return Ok((held.stream, true));
            }
            if alive {
                self.release(Some(held));
            }
        }
        self.connector
            .get_stream(&self.state.routes[index].peer)
            .await
    }
}

/// Writes the request in `c.out` to `up` and reads the response head; the downstream version
/// of the head is left in `c.out`.
async fn send(
    up: &mut Stream,
    c: &mut Conn,
    ctx: &RequestCtx<'_>,
    reused: bool,
) -> Result<ResponseHead, UpstreamFailure> {
    let opts = &ctx.route.peer.options;
    let write = async {
        up.write_all(&c.out).await?;
        up.flush().await
    };
    c.timer
        .bounded(opts.write_timeout, write)
        .await
        .map_err(|e| UpstreamFailure::io(e, reused, false, "writing the request"))?;
    c.ubuf.clear();
    read_response_head(up, c, ctx, reused).await
}

/// Reads until `c.ubuf` holds a complete response head; writes its downstream version to
/// `c.out`.
async fn read_response_head(
    up: &mut Stream,
    c: &mut Conn,
    ctx: &RequestCtx<'_>,
    reused: bool,
) -> Result<ResponseHead, UpstreamFailure> {
    let head_request = ctx.req.method == Method::HEAD;
    loop {
        match parse_response(
            &c.ubuf,
            head_request,
            ctx.request_id,
            ctx.keepalive,
            &mut c.out,
        ) {
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            Err(what) => {
                return Err(UpstreamFailure {
                    kind: UpstreamErrorKind::Reset,
                    err: GatewayError::UpstreamUnreachable,
                    retryable: false,
                    what: what.to_string(),
                })
            }
        }
        c.ubuf.reserve(READ_CHUNK);
        let got_bytes = !c.ubuf.is_empty();
        let n = c
            .timer
            .bounded(
                ctx.route.peer.options.read_timeout,
                up.read_buf(&mut c.ubuf),
            )
            .await
            .map_err(|e| UpstreamFailure::io(e, reused, got_bytes, "reading the response"))?;
        if n == 0 {
            let e = io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed");
            return Err(UpstreamFailure::io(
                e,
                reused,
                got_bytes,
                "reading the response",
            ));
        }
    }
}

/// Forwards the response whose head was read (1xx heads first, then the final one) and its
/// body; keeps `up` in `c.held` when it can carry another request.
async fn forward(
    down: &mut Stream,
    mut up: Stream,
    c: &mut Conn,
    ctx: &RequestCtx<'_>,
    mut head: ResponseHead,
) -> Exchange {
    let read_timeout = ctx.route.peer.options.read_timeout;
    // Interim responses (103 Early Hints, an unasked 100) are forwarded as they come.
    while (100..200).contains(&head.status) {
        if write_down(down, &c.out).await.is_err() {
            return Exchange::Broken { status: 0 };
        }
        c.ubuf.drain(..head.head_len);
        head = match read_response_head(&mut up, c, ctx, false).await {
            Ok(h) if h.status != 101 => h,
            _ => return Exchange::Broken { status: 0 },
        };
    }
    let status = head.status;
    let mut clean = !head.upstream_close;
    let mut chunks = ChunkedEnd::default();
    let mut remaining = match head.framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    // Takes the body part of `bytes`: how much of it to send, and whether the body is done.
    let mut take = |bytes: &[u8], clean: &mut bool| -> Result<(usize, bool), &'static str> {
        match head.framing {
            Framing::None => {
                *clean &= bytes.is_empty();
                Ok((0, true))
            }
            Framing::Length(_) => {
                let n = remaining.min(bytes.len() as u64) as usize;
                remaining -= n as u64;
                *clean &= n == bytes.len();
                Ok((n, remaining == 0))
            }
            Framing::Chunked => match chunks.feed(bytes)? {
                Some(end) => {
                    *clean &= end == bytes.len();
                    Ok((end, true))
                }
                None => Ok((bytes.len(), false)),
            },
            Framing::UntilClose => Ok((bytes.len(), false)),
        }
    };
    let (n, mut done) = match take(&c.ubuf[head.head_len..], &mut clean) {
        Ok(t) => t,
        Err(_) => return Exchange::Broken { status },
    };
    c.out
        .extend_from_slice(&c.ubuf[head.head_len..head.head_len + n]);
    if write_down(down, &c.out).await.is_err() {
        return Exchange::Broken { status };
    }
    while !done {
        c.ubuf.clear();
        c.ubuf.reserve(READ_CHUNK);
        let read = c
            .timer
            .bounded(read_timeout, up.read_buf(&mut c.ubuf))
            .await;
        match read {
            Ok(0) if head.framing == Framing::UntilClose => break,
            Ok(0) | Err(_) => {
                // Truncated: the client sees the connection close (as with pingora).
                ctx.route.metrics.upstream_error(UpstreamErrorKind::Reset);
                return Exchange::Broken { status };
            }
            Ok(_) => {}
        }
        let n;
        (n, done) = match take(&c.ubuf, &mut clean) {
            Ok(t) => t,
            Err(_) => return Exchange::Broken { status },
        };
        if write_down(down, &c.ubuf[..n]).await.is_err() {
            return Exchange::Broken { status };
        }
    }
    let until_close = head.framing == Framing::UntilClose;
    c.held = Some(Held {
        route: ctx.index,
        stream: up,
        // The request's start stands in for the end of its use: no clock read per request.
        last_used: ctx.started,
        reusable: clean && !until_close,
    });
    Exchange::Done {
        status,
        keepalive: ctx.keepalive && !until_close,
    }
}

async fn write_down(down: &mut Stream, bytes: &[u8]) -> io::Result<()> {
    down.write_all(bytes).await?;
    down.flush().await
}

/// Answers with a gateway error (SPEC "Proxy behaviour": JSON body, `tokengate-error`) and
/// closes the connection, as pingora-proxy's `fail_to_proxy` does for [`Gateway`].
async fn fail(
    down: &mut Stream,
    c: &mut Conn,
    ctx: &RequestCtx<'_>,
    err: GatewayError,
    generation: u64,
) -> (Exchange, u64, Option<&'static str>) {
    let body = err.body(Some(&ctx.route.name));
    let status = err.status();
    let out = &mut c.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    push_field(out, b"content-type", b"application/json");
    push_field(out, b"content-length", body.len().to_string().as_bytes());
    push_field(out, b"cache-control", b"no-store");
    push_field(out, b"tokengate-error", err.code().as_bytes());
    push_field(out, b"x-request-id", ctx.request_id.as_bytes());
    if let GatewayError::TokenUnavailable { retry_after } = &err {
        push_field(
            out,
            b"retry-after",
            retry_after.as_secs().max(1).to_string().as_bytes(),
        );
    }
    let date = pingora::protocols::http::date::get_cached_date();
    push_field(out, b"Date", date.as_bytes());
    push_field(out, b"Connection", b"close");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    let _ = write_down(down, &c.out).await;
    (Exchange::Broken { status }, generation, Some(err.code()))
}

/// Metrics and the access log line, as [`Gateway`]'s `logging` phase writes them.
fn log(
    ctx: &RequestCtx<'_>,
    path: &[u8],
    status: u16,
    generation: u64,
    error: Option<&'static str>,
) {
    let elapsed = ctx.started.elapsed();
    let route = ctx.route;
    route.metrics.request(status, elapsed);
    if status == 431 {
        // The upstream refused the request head; with a large token that is likely the
        // token. Its size (never the token) tells the operator.
        let token_bytes = route.token.current().map_or(0, |t| {
            t.authorization().len().saturating_sub("Bearer ".len())
        });
        tracing::warn!(
            route = %route.name,
            token_bytes,
            request_id = ctx.request_id.to_str().unwrap_or("-"),
            "upstream answered 431 Request Header Fields Too Large",
        );
    }
    tracing::debug!(
        target: "tokengate::access",
        route = %route.name,
        method = %ctx.req.method,
        path = std::str::from_utf8(path).unwrap_or("-"),
        status,
        duration_us = elapsed.as_micros() as u64,
        token_generation = generation,
        gateway_error = error.unwrap_or("-"),
        error = "-",
        request_id = ctx.request_id.to_str().unwrap_or("-"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in pieces of `step` bytes; the end offset found, if any.
    fn chunked_end(body: &[u8], step: usize) -> Result<Option<usize>, &'static str> {
        let mut scanner = ChunkedEnd::default();
        let mut offset = 0;
        for piece in body.chunks(step) {
            if let Some(end) = scanner.feed(piece)? {
                return Ok(Some(offset + end));
            }
            offset += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn chunked_end_is_found_whatever_the_pieces() {
        let body = b"5\r\nhello\r\n1A;ext=\"x\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nT: 1\r\nU: 2\r\n\r\nNEXT";
        let end = body.len() - 4;
        for step in [1, 2, 3, 7, body.len()] {
            assert_eq!(chunked_end(body, step), Ok(Some(end)), "step {step}");
        }
        assert_eq!(chunked_end(b"0\r\n\r\n", 1), Ok(Some(5)));
        assert_eq!(chunked_end(b"5\r\nhel", 3), Ok(None));
        assert_eq!(chunked_end(b"0\r\nTrailer: x\r\n", 4), Ok(None));
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"1234567890abcdef0\r\n",
            b"0\r\n\n",
        ] {
            assert!(
                chunked_end(bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn plain(raw: &[u8]) -> Option<(Plain, Vec<Field>)> {
        let mut fields = Vec::new();
        match parse_request(raw, &mut fields) {
            Parsed::Plain(p) => Some((p, fields)),
            _ => None,
        }
    }

    #[test]
    fn only_plain_requests_take_the_fast_path() {
        let (p, fields) = plain(
            b"POST /a?b=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nConnection: Keep-Alive, close\r\n\r\nabc",
        )
        .expect("plain");
        assert_eq!((p.body_len, p.close, p.method.as_str()), (3, true, "POST"));
        assert_eq!(fields.len(), 3);
        for raw in [
            &b"GET / HTTP/1.0\r\nHost: gw\r\n\r\n"[..],
            b"GET http://gw/ HTTP/1.1\r\nHost: gw\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive, X-Hop\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: gw\r\nTE: trailers\r\n\r\n",
            b"CONNECT gw:443 HTTP/1.1\r\nHost: gw:443\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: gw\r\nX: a\rb\r\n\r\n",
        ] {
            assert!(plain(raw).is_none(), "{}", String::from_utf8_lossy(raw));
        }
        let mut fields = Vec::new();
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost: g", &mut fields),
            Parsed::Partial
        ));
    }

    #[test]
    fn response_heads_are_copied_with_the_gateways_fields() {
        let id = HeaderValue::from_static("req-1");
        let mut out = Vec::new();
        let raw = b"HTTP/1.1 200 Fine\r\nX-Request-Id: theirs\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nContent-Length : 2\r\nDate: Sun, 29 Nov 2026 10:00:00 GMT\r\n\r\nok";
        let head = parse_response(raw, false, &id, true, &mut out)
            .expect("valid")
            .expect("complete");
        assert_eq!(head.status, 200);
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.upstream_close);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 200 Fine\r\nX-Request-Id: req-1\r\nContent-Length: 2\r\n\
             Date: Sun, 29 Nov 2026 10:00:00 GMT\r\nConnection: keep-alive\r\n\r\n"
        );

        let raw =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n";
        let head = parse_response(raw, false, &id, true, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        assert!(!String::from_utf8_lossy(&out).contains("Content-Length"));

        let raw = b"HTTP/1.1 200 OK\r\n\r\nbody until close";
        let head = parse_response(raw, false, &id, true, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(String::from_utf8_lossy(&out).contains("Connection: close\r\n"));

        let raw = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n";
        let head = parse_response(raw, false, &id, true, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::None);

        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"SMTP 220 hello\r\n\r\n",
        ] {
            assert!(parse_response(bad, false, &id, true, &mut out).is_err());
        }
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nDa", false, &id, true, &mut out),
            Ok(None)
        ));
    }
}
