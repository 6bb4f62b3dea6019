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
//! What the fast path saves against pingora-proxy (docs/architecture.md "The hot path":
//! ~42 → ~19 µs of proxy CPU per request): no per-request session, context and header maps, no
//! futures and channels joining two proxy halves; the upstream request written from the client's
//! bytes into one buffer; one upstream connection held by the client connection while it is busy
//! (no pool lookup and no idle-watch task per request); one timer per connection; the response
//! head copied with three fields changed.

use std::io;
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
use pingora::upstreams::peer::Peer as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};

mod admission;
mod client_io;
mod request;
mod response;
mod timer;
pub mod wire;

use super::chunked_framing;
use super::client_connections::bound_session;
use super::policy::{self, ErrorResponse, GatewayError, Plan};
use super::routes::{Route, RouteTable};
use super::{record_request, Gateway, Live, RequestRecord, SharedState};
use crate::metrics::UpstreamErrorKind;
use crate::token::{Sent, TokenCache, TokenSource};
use admission::{admit, Admitted};
use client_io::write_down;
use request::{parse_request, write_upstream_request, Field, Parsed, Plain, RequestId};
use response::{parse_response, ChunkedEnd, Framing, ResponseHead};
use timer::Timer;

/// Most fields in one request head: pingora's limit.
const MAX_FIELDS: usize = 256;
/// Most fields in an upstream response head: pingora's HTTP/1 client's limit, so a response
/// pingora would forward is forwarded here too (a request already sent cannot be handed over).
const MAX_RESPONSE_FIELDS: usize = 256;
/// Largest incomplete upstream response head the fast path keeps reading, bytes: pingora's
/// HTTP/1 client's limit (`MAX_HEADER_SIZE`), for the same reason.
const MAX_RESPONSE_HEAD: usize = 1024 * 1024 - 1;
/// A held upstream connection idle longer than this is checked for a close before an
/// idempotent request reuses it (a non-idempotent one always checks).
const CHECK_IDLE_UPSTREAM_AFTER: Duration = Duration::from_millis(200);
/// A client connection idle this long gives its upstream connection back to the pool and its
/// buffers to the allocator.
const HOLD_WHILE_IDLE: Duration = Duration::from_secs(2);
/// Read size for response bodies.
const READ_CHUNK: usize = 16 * 1024;

/// The service of one proxy listener: the fast path, and pingora-proxy for everything else.
pub struct ListenerApp {
    live: Arc<Live>,
    /// This listener's index in [`SharedState::tables`].
    slot: usize,
    connector: TransportConnector,
    slow: Arc<HttpProxy<Gateway>>,
    /// `tokengate_connections`.
    connections: pingora_prometheus::prometheus::IntGauge,
}

impl ListenerApp {
    /// The service for the listener whose route table is `live`'s `tables[slot]`.
    pub fn new(live: Arc<Live>, slot: usize, conf: &Arc<ServerConf>) -> Self {
        let slow = pingora::proxy::http_proxy(conf, Gateway::new(Arc::clone(&live), slot));
        let connections = live.load().metrics.connections();
        ListenerApp {
            connections,
            live,
            slot,
            connector: TransportConnector::new(Some(ConnectorOptions::from_server_conf(conf))),
            slow: Arc::new(slow),
        }
    }
}

/// The state a connection serves its requests with, and the [`Live`] generation it was
/// loaded at.
struct Current {
    generation: u64,
    state: Arc<SharedState>,
}

impl Current {
    fn load(live: &Live) -> Self {
        // Generation first: the state loaded after it is that generation's or newer.
        let generation = live.generation();
        Current {
            generation,
            state: live.load(),
        }
    }
}

#[async_trait]
impl ServerApp for ListenerApp {
    /// Moves the connection to a task of its own and returns at once. pingora's accept task
    /// is sized for its TLS handshake (about 12 KiB, whatever the listener), so a connection
    /// served inside it would hold that for its whole life; this task holds ~2 KiB
    /// (docs/benchmarks.md "Abuse bounds").
    async fn process_new(
        self: &Arc<Self>,
        down: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let app = Arc::clone(self);
        let shutdown = shutdown.clone();
        tokio::spawn(async move { app.serve_connection(down, &shutdown).await });
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.slow).await;
    }
}

impl ListenerApp {
    /// Serves one client connection until it closes, as pingora's own loop would: a stream
    /// handed back for reuse is served again.
    async fn serve_connection(self: Arc<Self>, down: Stream, shutdown: &ShutdownWatch) {
        let mut next = self.serve_stream(down, shutdown).await;
        while let Some(down) = next {
            next = self.serve_stream(down, shutdown).await;
        }
    }

    /// Serves `down`: the fast path, and pingora-proxy for the requests it hands over.
    /// `Some` when the stream is handed back for reuse.
    async fn serve_stream(
        self: &Arc<Self>,
        mut down: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut current = Current::load(&self.live);
        // Only a plain TCP stream can take back bytes already read.
        let plain_tcp = down.as_any().is::<L4Stream>();
        let mut conn = Conn::new(&down);
        conn.check_client(&current.state);
        if plain_tcp && !conn.allowed && !conn.peer_trusted {
            // Refused before it takes a place among `max_connections`.
            // Boxed, as every rare step with a large future: a connection's task is sized for
            // the largest step it may take, and an idle connection should cost little.
            Box::pin(self.refuse_unadmitted(&mut down, &mut conn, &current.state)).await;
            return None;
        }
        let Some(_open) = self
            .live
            .clients
            .open(current.state.limits.max_connections, &self.connections)
        else {
            // Closed at once: an accepted connection cannot be put back in the listen backlog.
            current.state.metrics.connection_refused();
            return None;
        };
        if !plain_tcp {
            return ServerApp::process_new(&self.slow, down, shutdown).await;
        }
        loop {
            let outcome = self
                .serve(&mut down, &mut conn, &mut current, shutdown)
                .await;
            let Outcome::Delegate(chunked_body) = outcome else {
                if !*shutdown.borrow() {
                    self.release(conn.held.take(), &current.state);
                }
                return None;
            };
            // One request for pingora-proxy. It may take long (an upgraded connection lasts as
            // long as the client wants): the held upstream connection goes back to the pool.
            self.release(conn.held.take(), &current.state);
            let Ok(mut l4) = down.into_any().downcast::<L4Stream>() else {
                return None;
            };
            l4.rewind(&conn.buf);
            conn.buf.clear();
            let mut session = ServerSession::new_http1(chunked_framing::wrap(l4, chunked_body));
            // The fast path's client bounds; no keep-alive while shutting down.
            bound_session(&mut session, &current.state.limits, *shutdown.borrow());
            // Requests pipelined behind this one, read with it or while it is proxied, are kept
            // (pingora's default closes the connection after the first answer, or answers 400
            // when more arrives while it is proxied) and come back in front of the stream
            // (vendor/pingora-proxy, TOKENGATE-PATCH.md) for the fast path: RFC 9112 §9.3.2.
            session.set_pipelining_enabled(true);
            // The connection comes back after that request when it can carry another, so one
            // unusual request (or a moment without a usable token) does not keep the client's
            // connection off the fast path.
            let reused = {
                // In flight from here, so the drain after SIGTERM never sees a gap between the
                // fast path and pingora-proxy's count.
                let _busy = self.live.drain.busy();
                HttpServerApp::process_new_http(&self.slow, session, shutdown).await?
            };
            if self.live.drain.closing() {
                return None;
            }
            let (stream, _pipelining_off) = reused.consume();
            down = chunked_framing::unwrap(stream)?;
            if !down.as_any().is::<L4Stream>() {
                return ServerApp::process_new(&self.slow, down, shutdown).await;
            }
        }
    }

    /// After a config reload: from the next request on, the new routes, tokens, allowlist and
    /// client bounds. The held upstream connection and the cached token belong to the old ones.
    #[inline]
    fn follow_reload(&self, c: &mut Conn, current: &mut Current) {
        if self.live.generation() != current.generation {
            self.release(c.held.take(), &current.state);
            *current = Current::load(&self.live);
            c.tokens = TokenCache::default();
            c.check_client(&current.state);
        }
    }

    /// Returns a clean upstream connection to pingora's connection pool.
    fn release(&self, held: Option<Held>, state: &SharedState) {
        if let Some(held) = held.filter(|h| h.reusable) {
            let options = state.routes[held.route].upstream.options();
            self.connector
                .release_stream(held.stream, held.reuse_hash, options.idle_timeout);
        }
    }
}

/// How a downstream connection leaves the fast path.
enum Outcome {
    /// Closed (or to be closed).
    Close,
    /// The next request goes to pingora-proxy, with `Conn::buf` put back in front of the
    /// stream; the connection comes back to the fast path after it if it stays open. With
    /// the head's length when the body is chunked: pingora reads it through
    /// [`chunked_framing::ChunkedFraming`].
    Delegate(Option<usize>),
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
    /// The upstream request's plan, reused across requests.
    plan: Plan,
    /// The connection's peer address.
    peer_ip: Option<std::net::IpAddr>,
    /// The peer is inside `server.trusted_proxies`: each request's client address is decided
    /// from its `X-Forwarded-For` ([`policy::client`]).
    peer_trusted: bool,
    /// The client address of the current request: the peer, or whom a trusted peer names.
    client_ip: Option<std::net::IpAddr>,
    /// `client_ip` as `X-Forwarded-For` shows it (IPv4-mapped IPv6 as IPv4), formatted once
    /// per connection (per request from a trusted proxy).
    client_ip_text: Option<Vec<u8>>,
    /// The client's `X-Forwarded-For` entries forwarded before `client_ip`
    /// ([`policy::client::ClientAddress::forward_entries`]).
    forward_entries: Option<usize>,
    allowed: bool,
    held: Option<Held>,
    /// The connection pool key of the upstream connection the current request uses.
    up_reuse_hash: u64,
    timer: Timer,
    /// The token this connection's requests carry, reused while it is the current one.
    tokens: TokenCache,
}

/// An upstream connection the downstream connection keeps between requests.
struct Held {
    route: usize,
    /// The connection pool key of the address it was opened to.
    reuse_hash: u64,
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
            // Taken when the first request arrives (client_io): a connection that never sends
            // one holds none.
            buf: Vec::new(),
            out: Vec::new(),
            ubuf: Vec::new(),
            fields: Vec::new(),
            plan: Plan::default(),
            peer_ip: client_ip,
            peer_trusted: false,
            client_ip,
            client_ip_text: client_ip.map(|ip| ip.to_canonical().to_string().into_bytes()),
            forward_entries: None,
            allowed: false,
            held: None,
            up_reuse_hash: 0,
            timer: Timer::default(),
            tokens: TokenCache::default(),
        }
    }
}

impl Conn {
    /// Gives the request and response buffers back while the connection is idle.
    fn release_buffers(&mut self) {
        debug_assert!(self.buf.is_empty());
        self.buf = Vec::new();
        self.out = Vec::new();
        self.ubuf = Vec::new();
        self.fields = Vec::new();
        self.plan = Plan::default();
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
    /// The state the request was admitted with (its route is one of `state.routes`).
    state: &'a SharedState,
    route: &'a Route,
    index: usize,
    req: &'a Plain,
    request_id: &'a RequestId,
    keepalive: bool,
    started: Instant,
    /// The gateway's shutdown state: a response written once it is closing says
    /// `Connection: close`. `None` outside a running listener (benches, tests).
    drain: Option<&'a crate::shutdown::Drain>,
}

impl RequestCtx<'_> {
    /// Whether the client connection stays open after this response: the client asked for it
    /// and the gateway is not closing its connections.
    fn keeps_alive(&self) -> bool {
        self.keepalive && !self.drain.is_some_and(|d| d.closing())
    }
}

/// Scratch buffers for [`own_work`], reused across calls like a connection's.
pub struct Scratch(Conn);

impl Scratch {
    /// Buffers for a client at `client_ip`, checked against `state.allowed_clients` once, as a
    /// connection is.
    pub fn new(state: &SharedState, client_ip: std::net::IpAddr) -> Self {
        let mut c = Conn::detached(Some(client_ip));
        c.check_client(state);
        Scratch(c)
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
    // One clock read: tokio's instant for the token (its clock, see `token::clock`), the same
    // instant as std's for the request's duration.
    let now = tokio::time::Instant::now();
    let started = now.into_std();
    let c = &mut scratch.0;
    c.buf.clear();
    c.buf.extend_from_slice(request);
    let Parsed::Plain(req) = parse_request(&c.buf, &mut c.fields, state.limits.max_request_head)
    else {
        return None;
    };
    if !req.fast() {
        return None;
    }
    let limit = state.replay_body_limit.min(super::RETRY_BUFFER_LIMIT);
    let admitted = admit(table, state, c, &req, limit, now)?;
    let route = &state.routes[admitted.index];
    let request_id = RequestId::of(&c.buf, &req, state);
    let ctx = RequestCtx {
        state,
        route,
        index: admitted.index,
        req: &req,
        request_id: &request_id,
        keepalive: !req.close,
        started,
        drain: None,
    };
    write_upstream_request(c, &ctx, admitted.grant.authorization());
    let sent = c.out.len();
    let head = parse_response(
        response,
        false,
        request_id.as_bytes(),
        ctx.keepalive,
        &mut c.out,
    )
    .ok()??;
    route.metrics.request(head.status, started.elapsed());
    admitted.grant.release(&mut c.tokens);
    Some((sent, c.out.len()))
}

/// The upstream request head the fast path's serialiser writes for `request` (a complete
/// HTTP/1.1 head in origin-form, body not included) on `state.routes[index]`, for a client at
/// `client_ip` and the access token `authorization`, whether or not the fast path would
/// forward that request itself. For tests that hold both paths' serialisers side by side.
///
/// # Errors
/// The policy's refusal of the head; `None` inside when the head is incomplete or not
/// HTTP/1.1 in origin-form (pingora-proxy's path alone serves those).
pub fn upstream_head(
    state: &SharedState,
    index: usize,
    request: &[u8],
    authorization: &HeaderValue,
    scratch: &mut Scratch,
) -> Result<Vec<u8>, Option<GatewayError>> {
    let c = &mut scratch.0;
    c.buf.clear();
    c.buf.extend_from_slice(request);
    let mut req = match parse_request(&c.buf, &mut c.fields, state.limits.max_request_head) {
        Parsed::Plain(req) => req,
        Parsed::Refuse(e) => return Err(Some(e)),
        Parsed::Partial | Parsed::Delegate(_) => return Err(None),
    };
    // Only the body bytes given are copied.
    let body_len = req.body_len.min(c.buf.len().saturating_sub(req.head_len));
    req.body_len = body_len;
    let request_id = RequestId::of(&c.buf, &req, state);
    let ctx = RequestCtx {
        state,
        route: &state.routes[index],
        index,
        req: &req,
        request_id: &request_id,
        keepalive: !req.close,
        started: Instant::now(),
        drain: None,
    };
    write_upstream_request(c, &ctx, authorization);
    let out = &c.out;
    Ok(out[..out.len() - body_len].to_vec())
}

impl ListenerApp {
    /// Serves requests on `down` until it closes or a request needs pingora.
    async fn serve(
        &self,
        down: &mut Stream,
        c: &mut Conn,
        current: &mut Current,
        shutdown: &ShutdownWatch,
    ) -> Outcome {
        c.check_client(&current.state);
        loop {
            // A reload's client bounds apply from the next wait on.
            self.follow_reload(c, current);
            let req = match self.read_head(down, c, current).await {
                Ok(req) => req,
                Err(outcome) => return outcome,
            };
            // In flight until this iteration ends (docs/operations.md "Shutdown").
            let _busy = self.live.drain.busy();
            self.follow_reload(c, current);
            if c.peer_trusted {
                c.judge_forwarded(&current.state);
            }
            let state = &*current.state;
            let now = tokio::time::Instant::now();
            let started = now.into_std();
            let body_limit = state.replay_body_limit.min(super::RETRY_BUFFER_LIMIT);
            let Some(Admitted { index, mut grant }) =
                admit(&state.tables[self.slot], state, c, &req, body_limit, now)
            else {
                return Outcome::Delegate(None);
            };
            let route = &state.routes[index];
            // The body (Content-Length only) in full: it may have to be sent twice.
            let total = req.head_len + req.body_len;
            if c.buf.len() < total {
                if let Err(outcome) = self.read_body(down, c, state, total).await {
                    return outcome;
                }
                // A slow body can outlast the token picked when the head arrived: the one sent
                // is the one current when the request leaves (pingora waits for a token).
                let now = tokio::time::Instant::now();
                let Some(current) = grant.renew(route, &mut c.tokens, now) else {
                    return Outcome::Delegate(None);
                };
                grant = current;
            }
            let request_id = RequestId::of(&c.buf, &req, state);
            let ctx = RequestCtx {
                state,
                route,
                index,
                req: &req,
                request_id: &request_id,
                keepalive: !req.close && !*shutdown.borrow(),
                started,
                drain: Some(&self.live.drain),
            };
            // The size the 431 warning reports (a replayed token is as long, give or take).
            let authorization_len = grant.authorization().len();
            let (exchange, generation, error) = self
                .exchange(
                    down,
                    c,
                    &ctx,
                    grant.source(route),
                    grant.authorization(),
                    grant.generation(),
                )
                .await;
            grant.release(&mut c.tokens);
            let (status, keep) = match exchange {
                Exchange::Done { status, keepalive } => (status, keepalive),
                Exchange::Broken { status } => (status, false),
            };
            let target = &c.buf[req.target.clone()];
            let path = target.split(|&b| b == b'?').next().unwrap_or(b"");
            record_request(&RequestRecord {
                route: Some(route),
                method: Some(&req.method),
                path: std::str::from_utf8(path).unwrap_or("-"),
                status,
                started,
                generation,
                gateway_error: error,
                error: None,
                request_id: Some(request_id.as_str()),
                authorization_len,
            });
            if !keep || self.live.drain.closing() {
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
        source: &TokenSource,
        authorization: &HeaderValue,
        mut generation: u64,
    ) -> (Exchange, u64, Option<&'static str>) {
        let route = ctx.route;
        let mut replayed = false;
        let mut attempts = 0;
        // The token the replay after a 401 carries.
        let mut renewed: Option<HeaderValue> = None;
        loop {
            write_upstream_request(c, ctx, renewed.as_ref().unwrap_or(authorization));
            let sent = loop {
                attempts += 1;
                let (mut up, reused) = match self.upstream(c, ctx).await {
                    Ok(s) => s,
                    Err(e) => {
                        let (kind, err) = super::classify_upstream_error(e.etype());
                        route.metrics.upstream_error(kind);
                        // Resolve the name again soon: the address may have moved.
                        route.upstream.connect_failed();
                        tracing::warn!(route = %route.name, error = %e, "upstream connect failed");
                        return fail(down, c, ctx, err, generation).await;
                    }
                };
                match send(&mut up, c, ctx, reused).await {
                    Ok(head) => break (up, head),
                    // The body is in the buffer whole.
                    Err(f)
                        if f.retryable
                            && attempts < 3
                            && policy::may_resend(&ctx.req.method, true) => {}
                    Err(f) => {
                        route.metrics.upstream_error(f.kind);
                        tracing::warn!(route = %route.name, error = %f.what, "upstream request failed");
                        return fail(down, c, ctx, f.err, generation).await;
                    }
                }
            };
            let (up, head) = sent;
            if head.status == 401 {
                // Fast-path requests are always replayable (their body is within the limit).
                let sent = if replayed {
                    Sent::Replay
                } else {
                    Sent::First { replayable: true }
                };
                if !source.upstream_refused(generation, sent) {
                    route.metrics.unauthorized(false);
                } else {
                    // One replay with the next token (one renewal is shared by every request
                    // that saw the 401).
                    route.metrics.unauthorized(true);
                    replayed = true;
                    attempts = 0;
                    drop(up);
                    // Boxed: rare, and its future is large (see `process_new`).
                    match Box::pin(source.token()).await {
                        Ok((a, g)) => (renewed, generation) = (Some(a), g),
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

    /// An upstream connection for the request's route: the one this downstream connection
    /// holds if it is still good, else one from pingora's connector (its pool, or new). The
    /// flag says whether the connection was used before.
    async fn upstream(
        &self,
        c: &mut Conn,
        ctx: &RequestCtx<'_>,
    ) -> pingora::Result<(Stream, bool)> {
        let idempotent = ctx.req.method.is_idempotent();
        // The address the last background resolution found (proxy::upstream_dns); its
        // peer is cloned only for a new connection.
        let (resolved, reuse_hash) = {
            let resolution = ctx.route.upstream.current();
            (resolution.peer.is_some(), resolution.reuse_hash)
        };
        if !resolved {
            let why = ctx.route.upstream.peer().err().unwrap_or_default();
            return Err(pingora::Error::explain(
                pingora::ErrorType::ConnectNoRoute,
                format!(
                    "upstream {} does not resolve: {why}",
                    ctx.route.upstream.name()
                ),
            ));
        }
        if let Some(mut held) = c.held.take() {
            // A request that cannot be retried checks every time; others only after the held
            // connection sat idle a while (a failure on a just-used one is retried).
            let alive = held.reusable
                && ((idempotent && held.last_used.elapsed() < CHECK_IDLE_UPSTREAM_AFTER)
                    || !closed_while_idle(&mut held.stream));
            // A connection to an address the name no longer has is not reused.
            if alive && held.route == ctx.index && held.reuse_hash == reuse_hash {
                c.up_reuse_hash = reuse_hash;
                return Ok((held.stream, true));
            }
            if alive {
                self.release(Some(held), ctx.state);
            }
        }
        let peer = ctx
            .route
            .upstream
            .peer()
            .map_err(|why| pingora::Error::explain(pingora::ErrorType::ConnectNoRoute, why))?;
        c.up_reuse_hash = peer.reuse_hash();
        // Boxed: only for a new connection (the pool and the held one serve most requests),
        // and pingora's connect future (TLS included) is large (see `process_new`).
        Box::pin(self.connector.get_stream(&*peer)).await
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
    let opts = &ctx.route.upstream.options();
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
            ctx.request_id.as_bytes(),
            ctx.keeps_alive(),
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
                ctx.route.upstream.options().read_timeout,
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
    let read_timeout = ctx.route.upstream.options().read_timeout;
    // Interim responses (103 Early Hints, an unasked 100) are forwarded as they come.
    while (100..200).contains(&head.status) {
        if write_down(down, &mut c.timer, ctx.state, &c.out)
            .await
            .is_err()
        {
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
    if write_down(down, &mut c.timer, ctx.state, &c.out)
        .await
        .is_err()
    {
        // The client never got the head (it left): no response, as pingora-proxy counts it.
        return Exchange::Broken { status: 0 };
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
        if write_down(down, &mut c.timer, ctx.state, &c.ubuf[..n])
            .await
            .is_err()
        {
            return Exchange::Broken { status };
        }
    }
    let until_close = head.framing == Framing::UntilClose;
    c.held = Some(Held {
        route: ctx.index,
        reuse_hash: c.up_reuse_hash,
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

/// Answers with a gateway error (JSON body, `tokengate-error`) and closes the connection, as
/// pingora-proxy's `fail_to_proxy` does for [`Gateway`].
async fn fail(
    down: &mut Stream,
    c: &mut Conn,
    ctx: &RequestCtx<'_>,
    err: GatewayError,
    generation: u64,
) -> (Exchange, u64, Option<&'static str>) {
    let request_id = ctx.request_id.to_header_value();
    let response = ErrorResponse::new(&err, Some(&ctx.route.name), Some(&request_id), None);
    response.write_h1(ctx.req.method == Method::HEAD, &mut c.out);
    let _ = write_down(down, &mut c.timer, ctx.state, &c.out).await;
    (
        Exchange::Broken {
            status: response.status,
        },
        generation,
        Some(err.code()),
    )
}
