//! The proxy: a thin pingora [`ProxyHttp`] implementation over the route table, header hygiene
//! and the token cache. Each listener runs [`fast_path::ListenerApp`], which forwards plain
//! HTTP/1.1 requests itself (the same decisions, one pass over the client's bytes) and hands
//! every other request to pingora-proxy running [`Gateway`], whose phases are:
//!
//! ```text
//!  downstream request
//!    │ request_filter ........... admission: allowlist (403), route (404), method (405),
//!    │                            token from the cache (503 if none usable); fills the CTX
//!    │ upstream_peer ............ the route's precomputed peer
//!    │ upstream_request_filter .. strip inbound credentials and hop-by-hop fields, insert
//!    │                            exactly one `Authorization: Bearer`, Host, X-Forwarded-*,
//!    │                            rewrite path (strip_prefix, base path, access_token)
//!    ▼
//!  upstream response
//!    │ response_filter .......... X-Request-Id to the client
//!    │ fail_to_proxy ............ 502/504 as gateway JSON errors
//!    ▼ logging .................. metrics and the access log: the only per-request logging
//! ```

pub mod chunked_framing;
pub mod client_connections;
pub mod downstream;
pub mod fast_path;
pub mod policy;
pub(crate) mod route_compile;
pub mod routes;
pub mod upstream_dns;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::header::TRANSFER_ENCODING;
use http::{HeaderValue, Method};
use ipnet::IpNet;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};

use crate::metrics::{Metrics, UpstreamErrorKind};
use crate::token::Sent;
use downstream::DownstreamHead;
use policy::response::Http10Body;
use policy::{ErrorResponse, Forwarding, GatewayError, Plan};
use routes::{Route, RouteTable};

/// Log targets capped at `info` whatever `log.level` / `RUST_LOG` say: at `debug` and `trace`
/// pingora logs whole request and response headers and bodies (the client's credentials,
/// `access_token` query values, an echoing upstream's copy of the access token). A cap only
/// lowers: it never raises a target above the configured level.
pub const LOG_TARGETS_CAPPED_AT_INFO: &[&str] = &["pingora_proxy", "pingora_core", "pingora"];

/// Log targets turned off: pingora's HTTP app (the admin listener) logs a malformed request at
/// `error` with its raw head (a client's `Authorization`, `Cookie`, query), and every other
/// line it writes is a client's connection trouble.
pub const LOG_TARGETS_OFF: &[&str] = &["pingora_core::apps::http_app"];

/// State shared by every listener: compiled routes, client allowlist, metrics. One config's
/// worth: a reload (SIGHUP) builds a new one and swaps it in through [`Live`].
pub struct SharedState {
    /// Compiled routes, indexed like `Config::routes`.
    pub routes: Vec<Route>,
    /// Each proxy listener's route table, by listener slot (the shared listeners first when
    /// there are any, then each route's own listener in route order). Empty in benches.
    pub tables: Vec<RouteTable>,
    /// `server.allowed_clients`.
    pub allowed_clients: Vec<IpNet>,
    /// `server.trusted_proxies`: peers whose `X-Forwarded-For` names the client
    /// ([`policy::client`]).
    pub trusted_proxies: Vec<IpNet>,
    /// Metric handles.
    pub metrics: Arc<Metrics>,
    /// `server.replay_body_limit`, bytes.
    pub replay_body_limit: usize,
    /// `server.max_request_head`, the client timeouts and `server.max_connections`.
    pub limits: crate::config::ClientLimits,
    pub(crate) request_ids: RequestIds,
    /// What `/status` shows of each route besides its token, indexed like `routes`.
    pub(crate) route_info: Vec<crate::admin::RouteInfo>,
}

impl SharedState {
    /// Bundles the compiled routes and settings.
    pub fn new(
        routes: Vec<Route>,
        allowed_clients: Vec<IpNet>,
        replay_body_limit: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        SharedState {
            routes,
            tables: Vec::new(),
            allowed_clients,
            trusted_proxies: Vec::new(),
            replay_body_limit,
            limits: crate::config::ClientLimits::default(),
            metrics,
            request_ids: RequestIds::new(),
            route_info: Vec::new(),
        }
    }
}

/// The [`SharedState`] requests are served with, replaced whole by a config reload. Readers
/// on the fast path compare [`Live::generation`] once per request (one atomic load) and load
/// the state only when it moved; pingora-proxy loads it once per request.
pub struct Live {
    current: ArcSwap<SharedState>,
    generation: AtomicU64,
    /// Shutdown state and requests in flight on both paths (kept across reloads).
    pub drain: crate::shutdown::Drain,
    /// Open client connections on every proxy listener (kept across reloads).
    pub clients: client_connections::ClientConnections,
}

impl Live {
    /// Serves `state` until the first [`Live::replace`].
    pub fn new(state: SharedState) -> Self {
        Live {
            current: ArcSwap::from_pointee(state),
            generation: AtomicU64::new(0),
            drain: crate::shutdown::Drain::default(),
            clients: client_connections::ClientConnections::default(),
        }
    }

    /// The current state.
    pub fn load(&self) -> Arc<SharedState> {
        self.current.load_full()
    }

    /// Bumped after each replacement. Read it before [`Live::load`]: a reader that sees a new
    /// generation then loads the state it announces (or a newer one).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Serves `state` from now on. Requests already admitted finish with the state they were
    /// admitted with.
    pub fn replace(&self, state: SharedState) {
        self.current.store(Arc::new(state));
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// Whether a downstream peer at `ip` may use the gateway: `ip` (an IPv4-mapped IPv6 address counts
/// as its IPv4 address) is inside one of `allowed_clients` (`server.allowed_clients`,
/// docs/proxy-behaviour.md "Admission"; loopback only by default). Linear in the number of CIDRs,
/// which is a handful in practice.
#[inline]
pub fn client_allowed(allowed_clients: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    allowed_clients.iter().any(|net| net.contains(&ip))
}

/// The [`ProxyHttp`] service of one listener.
pub struct Gateway {
    live: Arc<Live>,
    /// This listener's index in [`SharedState::tables`].
    slot: usize,
    metrics: Arc<Metrics>,
}

impl Gateway {
    /// A proxy for the listener whose route table is `live`'s `tables[slot]`.
    pub fn new(live: Arc<Live>, slot: usize) -> Self {
        let metrics = Arc::clone(&live.load().metrics);
        Gateway {
            live,
            slot,
            metrics,
        }
    }

    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: GatewayError,
        route: Option<&Route>,
    ) -> Result<bool> {
        ctx.error = Some(err.code());
        if let Some(reason) = err.deny_reason() {
            self.metrics.denied(reason);
        }
        ErrorResponse::new(
            &err,
            route.map(|r| r.name.as_str()),
            ctx.request_id.as_ref(),
            route.and_then(|r| r.allow_header.as_ref()),
        )
        .write(session)
        .await?;
        Ok(true)
    }
}

/// Per-request context: small and plain.
pub struct RequestCtx {
    /// The state current when the request arrived; a reload does not change it mid-request.
    state: Arc<SharedState>,
    started: Instant,
    route: Option<usize>,
    authorization: Option<HeaderValue>,
    generation: u64,
    request_id: Option<HeaderValue>,
    error: Option<&'static str>,
    /// The request was replayed once after an upstream 401 (never twice).
    replayed: bool,
    /// Set while the replay error travels through pingora's retry machinery.
    replay_pending: bool,
    /// A replay found no usable token: answer 503 `token_unavailable`.
    unavailable: Option<std::time::Duration>,
    /// Length in bytes of the `Authorization` value sent upstream (for the 431 log line; never
    /// the value itself).
    authorization_len: usize,
    /// The client's head as the policy read it.
    head: Option<DownstreamHead>,
    /// The upstream request's plan (kept for a replay).
    plan: Plan,
    /// A managed user's token source when the request names a subject
    /// ([`policy::Subject::User`]); `None`: the route's own.
    subject_source: Option<Arc<crate::token::TokenSource>>,
    /// The client address ([`policy::client::client_address`]); `None` when the peer has no IP
    /// address.
    client: Option<policy::client::ClientAddress>,
    /// The request counts as in flight for the drain after SIGTERM while this lives.
    _busy: crate::shutdown::BusyOwned,
}

impl RequestCtx {
    /// The route's name for log lines, `-` before (or without) one.
    fn route_name(&self) -> &str {
        self.route
            .map(|i| self.state.routes[i].name.as_str())
            .unwrap_or("-")
    }

    /// The request id for log lines, `-` before one is set.
    fn request_id_str(&self) -> &str {
        self.request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // No downstream modules: tokengate never compresses (pingora's default adds a disabled
        // compression module that still runs on every request).
    }

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            state: self.live.load(),
            started: Instant::now(),
            route: None,
            authorization: None,
            generation: 0,
            request_id: None,
            error: None,
            replayed: false,
            replay_pending: false,
            unavailable: None,
            authorization_len: 0,
            head: None,
            plan: Plan::default(),
            subject_source: None,
            client: None,
            _busy: crate::shutdown::BusyOwned::new(Arc::clone(&self.live)),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let state = Arc::clone(&ctx.state);
        if session.req_header().version < http::Version::HTTP_11 {
            // RFC 9110 §15.2: no 1xx to an HTTP/1.0 client (pingora would pass an upstream's
            // 100 or 103 on; a 101 cannot happen, a 1.0 request is no upgrade).
            session.as_mut().set_ignore_info_resp(true);
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        // The head as the bytes pingora received, read as the fast path reads them.
        let head = match session.as_downstream().as_http1() {
            Some(h1) => DownstreamHead::parse(h1.get_headers_raw_bytes()),
            None => Err(GatewayError::BadRequest("not an HTTP/1 request")),
        };
        // Who the client is: the peer, or whom a trusted proxy's X-Forwarded-For names (an
        // unreadable head is judged by its peer).
        ctx.client = peer.map(|peer| match &head {
            Ok(h) => policy::client::client_address(peer, &state.trusted_proxies, h),
            Err(_) => policy::client::ClientAddress::peer(peer),
        });
        let client_ip = ctx.client.map(|c| c.ip);
        let allowed = client_ip.is_some_and(|ip| client_allowed(&state.allowed_clients, ip));
        // The client's first `X-Request-Id` when usable, else a new one (as on the fast path).
        let client_id = head
            .as_ref()
            .ok()
            .and_then(|h| h.facts.request_id.map(|i| policy::Fields::value(h, i)))
            .filter(|v: &&[u8]| valid_request_id_bytes(v))
            .and_then(|v| HeaderValue::from_bytes(v).ok());
        ctx.request_id = Some(client_id.unwrap_or_else(|| state.request_ids.next()));
        let (framing, index) = match &head {
            Ok(h) => {
                let authority = session.req_header().uri.authority();
                let host = h
                    .host()
                    .or_else(|| authority.map(|a| a.as_str().as_bytes()));
                (Ok(()), state.tables[self.slot].lookup(host, h.path()))
            }
            Err(e) => (Err(e.clone()), None),
        };
        let route = index.map(|i| &state.routes[i]);
        ctx.route = index;
        let method = session.req_header().method.clone();
        let route = match policy::admit(allowed, framing, route, &method) {
            Ok(route) => route,
            Err(err) => {
                // An early answer with a request body still unread: don't reuse the connection.
                session.set_keepalive(None);
                let shown = match err {
                    GatewayError::MethodNotAllowed => route,
                    _ => None,
                };
                if !matches!(
                    err,
                    GatewayError::MethodNotAllowed | GatewayError::TokenUnavailable { .. }
                ) {
                    ctx.route = None;
                }
                return self.refuse(session, ctx, err, shown).await;
            }
        };
        ctx.head = head.ok();

        // Whose token: decided by the policy, once, as on the fast path.
        let decision = match &ctx.head {
            Some(h) => match policy::subject(h, route, client_ip) {
                policy::Subject::Route => None,
                policy::Subject::User(v) => Some(std::str::from_utf8(v).ok().map(str::to_string)),
                policy::Subject::Refused => Some(None),
            },
            None => None,
        };
        if let Some(decision) = decision {
            let found = match (decision, route.subjects.as_ref()) {
                (Some(subject), Some(subjects)) => subjects.token(&subject, client_ip).await,
                _ => Ok(None),
            };
            let err = match found {
                Ok(Some((source, authorization, generation))) => {
                    ctx.subject_source = Some(source);
                    ctx.authorization = Some(authorization);
                    ctx.generation = generation;
                    return Ok(false);
                }
                Ok(None) => GatewayError::SubjectNotAllowed,
                Err(unavailable) => GatewayError::TokenUnavailable {
                    retry_after: unavailable.retry_after,
                },
            };
            session.set_keepalive(None);
            return self.refuse(session, ctx, err, Some(route)).await;
        }

        match route.token.token().await {
            Ok((authorization, generation)) => {
                ctx.authorization = Some(authorization);
                ctx.generation = generation;
                Ok(false)
            }
            Err(unavailable) => {
                session.set_keepalive(None);
                let err = GatewayError::TokenUnavailable {
                    retry_after: unavailable.retry_after,
                };
                self.refuse(session, ctx, err, Some(route)).await
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let state = &ctx.state;
        let Some(route) = ctx.route.map(|i| &state.routes[i]) else {
            return Error::e_explain(ErrorType::InternalError, "no route in upstream_peer");
        };
        // The address the last background resolution found (proxy::upstream_dns); a name
        // that never resolved is a connect failure: 502 `upstream_unreachable`.
        match route.upstream.peer() {
            Ok(peer) => Ok(Box::new((*peer).clone())),
            Err(why) => Err(Error::explain(
                ErrorType::ConnectNoRoute,
                format!("upstream {} does not resolve: {why}", route.upstream.name()),
            )
            .into_up()),
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        // Resolve the name again soon: the address may have moved.
        if let Some(i) = ctx.route {
            ctx.state.routes[i].upstream.connect_failed();
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let state = Arc::clone(&ctx.state);
        let Some(i) = ctx.route else {
            return Error::e_explain(ErrorType::InternalError, "no route for upstream request");
        };
        let route = &state.routes[i];
        let authorization = match ctx.authorization.take() {
            Some(a) => a,
            // A replay after an upstream 401: the refreshed token (one refresh is shared by every
            // request that saw the 401). Never forward without a token.
            None => match ctx
                .subject_source
                .as_ref()
                .unwrap_or(&route.token)
                .token()
                .await
            {
                Ok((a, generation)) => {
                    ctx.generation = generation;
                    a
                }
                Err(unavailable) => {
                    ctx.unavailable = Some(unavailable.retry_after);
                    return Error::e_explain(
                        ErrorType::HTTPStatus(503),
                        "no usable access token for the replay",
                    );
                }
            },
        };

        ctx.authorization_len = authorization.len();
        let client_ip = ctx.client.map(|c| c.ip.to_string().into_bytes());
        let Some(head) = ctx.head.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "no request head");
        };
        let fw = Forwarding {
            route,
            client_ip: client_ip.as_deref(),
            forward_entries: ctx.client.and_then(|c| c.forward_entries),
            authorization: authorization.as_bytes(),
            request_id: ctx.request_id.as_ref().map_or(b"-", |v| v.as_bytes()),
        };
        *upstream = head.upstream_header(&fw, &mut ctx.plan)?;
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            let upgrade = ctx
                .head
                .as_ref()
                .map(|h| h.facts.upgrade)
                .unwrap_or_default();
            if !policy::response::switch_allowed(upgrade) {
                return Err(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "101 Switching Protocols to a request that asked for no upgrade",
                )
                .into_up());
            }
        }
        if response.status != http::StatusCode::UNAUTHORIZED {
            return Ok(());
        }
        let state = Arc::clone(&ctx.state);
        let Some(route) = ctx.route.map(|i| &state.routes[i]) else {
            return Ok(());
        };
        let sent = if ctx.replayed {
            Sent::Replay
        } else {
            Sent::First {
                replayable: self.replayable(session, ctx),
            }
        };
        let source = ctx.subject_source.as_ref().unwrap_or(&route.token);
        if !source.upstream_refused(ctx.generation, sent) {
            route.metrics.unauthorized(false);
            return Ok(());
        }
        route.metrics.unauthorized(true);
        ctx.replayed = true;
        ctx.replay_pending = true;
        let mut e = Error::explain(
            ErrorType::Custom("upstream_unauthorized"),
            "upstream answered 401 to the current access token; replaying once with a new one",
        );
        e.set_retry(true);
        Err(e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if std::mem::take(&mut ctx.replay_pending) {
            // Our own 401 replay: replayability was decided in upstream_response_filter.
            return e;
        }
        let body_whole = !session.as_ref().retry_buffer_truncated();
        if !policy::may_resend(&session.req_header().method, body_whole) {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        // pingora puts this in its error logs. Never the query: it may carry `access_token`.
        let req = session.req_header();
        format!(
            "{} {}, route: {}, request id: {}",
            req.method,
            req.uri.path(),
            ctx.route_name(),
            ctx.request_id_str()
        )
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        // pingora's own line carries the error's context, which for a malformed head is its raw
        // bytes: a client's credentials, or an upstream echoing the access token. Ours names
        // the kind only. A request refused for the client's own doing (a malformed head or
        // chunk, a close mid-body, a coding we refuse) is in the access log with its status
        // when it has one, and no line here: clients could write those at will.
        if client_caused(error) {
            return true;
        }
        let (route, request_id) = (ctx.route_name(), ctx.request_id_str());
        let kind = error.etype().as_str();
        if error.esource() == &ErrorSource::Upstream {
            // As the fast path says it.
            tracing::warn!(route, request_id, error = kind, "upstream request failed");
        } else {
            tracing::error!(route, request_id, error = kind, "request failed");
        }
        true
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
        error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        // A 401 replay is counted in tokengate_upstream_unauthorized_total, not logged per
        // request. Other retries get our line, which names the kind only (pingora's carries
        // the error's context: a malformed head's raw bytes).
        if !matches!(error.etype(), ErrorType::Custom("upstream_unauthorized"))
            && !client_caused(error)
        {
            tracing::warn!(
                route = ctx.route_name(),
                request_id = ctx.request_id_str(),
                error = error.etype().as_str(),
                "upstream request failed; retrying"
            );
        }
        true
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let facts = downstream::apply_response_policy(response, ctx.request_id.as_ref())?;
        if self.live.drain.closing() {
            // Shutting down: this response closes the connection (docs/operations.md "Shutdown").
            session.set_keepalive(None);
        }
        if session.req_header().version < http::Version::HTTP_11 {
            // pingora-proxy frames a body of unknown length chunked (or keeps the upstream's
            // chunked); without `Transfer-Encoding` it writes the body as it comes and the close
            // ends it.
            match policy::response::for_http10_client(&facts) {
                Http10Body::AsIs => {}
                Http10Body::Unchunked => {
                    response.remove_header(&TRANSFER_ENCODING);
                    response.remove_header(&http::header::CONTENT_LENGTH);
                    session.set_keepalive(None);
                }
                Http10Body::Refused => {
                    return Err(Error::explain(
                        ErrorType::InvalidHTTPHeader,
                        "response transfer coding other than chunked for an HTTP/1.0 client",
                    )
                    .into_up())
                }
            }
        }
        // An intermediary sends its own HTTP version (RFC 9110 §6.2), as the fast path does;
        // pingora passes an HTTP/1.0 upstream's on when the body has a length.
        if response.version != http::Version::HTTP_11 {
            response.set_version(http::Version::HTTP_11);
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let state = Arc::clone(&ctx.state);
        let route = ctx.route.map(|i| &state.routes[i]);
        let (code, err) = match (e.esource(), e.etype()) {
            _ if ctx.unavailable.is_some() => {
                let retry_after = ctx.unavailable.unwrap_or_default();
                (503, Some(GatewayError::TokenUnavailable { retry_after }))
            }
            // A chunked body framed against RFC 9112 §7.1, stopped before pingora read it
            // (`chunked_framing`): a read error of the client's stream, answered 400.
            _ if chunked_framing::is_framing_error(e) => {
                let err = GatewayError::BadRequest("malformed request body");
                (err.status(), Some(err))
            }
            (ErrorSource::Upstream, etype) => {
                let (kind, err) = classify_upstream_error(etype);
                if let Some(r) = route {
                    r.metrics.upstream_error(kind);
                }
                (err.status(), Some(err))
            }
            (ErrorSource::Downstream, ErrorType::ReadError | ErrorType::WriteError)
            | (ErrorSource::Downstream, ErrorType::ConnectionClosed) => (0, None),
            // `server.body_timeout` (the session's read timeout; its head was read whole by the
            // fast path before the request was handed over): 408 while no response has started.
            (ErrorSource::Downstream, ErrorType::ReadTimedout) => {
                self.metrics
                    .client_timeout(crate::metrics::ClientTimeout::Body);
                let err = GatewayError::RequestTimeout;
                (err.status(), Some(err))
            }
            // `server.send_timeout`: the client stopped reading; both connections close.
            (ErrorSource::Downstream, ErrorType::WriteTimedout) => {
                self.metrics
                    .client_timeout(crate::metrics::ClientTimeout::Send);
                (0, None)
            }
            // The client's body could not be read as framed (a malformed chunk): RFC 9112 §7.1.
            (ErrorSource::Downstream, _) => {
                let err = GatewayError::BadRequest("malformed request body");
                (err.status(), Some(err))
            }
            (_, ErrorType::HTTPStatus(code)) => (*code, None),
            _ => (500, None),
        };
        match err {
            Some(err) if session.response_written().is_none() => {
                ctx.error = Some(err.code());
                if let Some(reason) = err.deny_reason() {
                    self.metrics.denied(reason);
                }
                let response = ErrorResponse::new(
                    &err,
                    route.map(|r| r.name.as_str()),
                    ctx.request_id.as_ref(),
                    None,
                );
                if let Err(write_err) = response.write(session).await {
                    tracing::debug!(error = %write_err, "could not send error response");
                }
            }
            _ if code > 0 && session.response_written().is_none() => {
                let _ = session.respond_error(code).await;
            }
            _ => {}
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let state = &ctx.state;
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let route = ctx.route.map(|i| &state.routes[i]);
        record_request(&RequestRecord {
            route,
            method: Some(&session.req_header().method),
            path: session.req_header().uri.path(),
            status,
            started: ctx.started,
            generation: ctx.generation,
            gateway_error: ctx.error,
            error: e.map(|e| e.etype().as_str()),
            request_id: ctx.request_id.as_ref().and_then(|v| v.to_str().ok()),
            authorization_len: ctx.authorization_len,
        });
    }
}

/// One finished request, as both paths report it.
pub(crate) struct RequestRecord<'a> {
    pub route: Option<&'a Route>,
    /// `None` for a head that could not be read.
    pub method: Option<&'a Method>,
    /// The path without the query (the query may carry `access_token`).
    pub path: &'a str,
    /// 0 when no response was written.
    pub status: u16,
    pub started: Instant,
    pub generation: u64,
    pub gateway_error: Option<&'static str>,
    pub error: Option<&'static str>,
    /// The `X-Request-Id` sent upstream (visible ASCII).
    pub request_id: Option<&'a str>,
    /// Length of the `Authorization` value sent upstream (never the value).
    pub authorization_len: usize,
}

/// Metrics and the access log for a finished request (docs/operations.md "Metrics", "Logging"), and
/// the warning for an upstream 431: the only per-request logging, shared by pingora-proxy's
/// `logging` phase and the fast path.
pub(crate) fn record_request(r: &RequestRecord<'_>) {
    let elapsed = r.started.elapsed();
    let route_name = r.route.map(|r| r.name.as_str()).unwrap_or("-");
    if let Some(route) = r.route {
        route.metrics.request(r.status, elapsed);
    }
    let request_id = r.request_id.unwrap_or("-");
    if r.status == 431 && r.gateway_error.is_none() {
        // The upstream refused the request head; with a large token that is likely the
        // token. Its size (never the token) tells the operator.
        tracing::warn!(
            route = route_name,
            token_bytes = r.authorization_len.saturating_sub("Bearer ".len()),
            request_id,
            "upstream answered 431 Request Header Fields Too Large",
        );
    }
    tracing::debug!(
        target: "tokengate::access",
        route = route_name,
        method = r.method.map_or("-", Method::as_str),
        path = r.path,
        status = r.status,
        duration_us = elapsed.as_micros() as u64,
        token_generation = r.generation,
        gateway_error = r.gateway_error.unwrap_or("-"),
        error = r.error.unwrap_or("-"),
        request_id,
    );
}

impl Gateway {
    /// Whether the request can be sent again: no body, or a body kept whole within
    /// `replay_body_limit` (pingora's retry buffer holds at most 64 KiB). Never an empty-body
    /// retry of a request that had a body.
    fn replayable(&self, session: &mut Session, ctx: &RequestCtx) -> bool {
        let state = &ctx.state;
        let Some(facts) = ctx.head.as_ref().map(|h| &h.facts) else {
            return false;
        };
        let content_length = facts.content_length;
        if !facts.chunked && content_length.unwrap_or(0) == 0 {
            return true;
        }
        let limit = state.replay_body_limit.min(RETRY_BUFFER_LIMIT) as u64;
        let within = content_length.is_none_or(|n| n <= limit);
        within
            && session.as_mut().is_body_done()
            && !session.as_ref().retry_buffer_truncated()
            && session
                .as_ref()
                .get_retry_buffer()
                .is_some_and(|b| b.len() as u64 <= limit)
    }
}

/// pingora keeps at most this many request body bytes for a retry.
pub(crate) const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

pub(crate) fn classify_upstream_error(etype: &ErrorType) -> (UpstreamErrorKind, GatewayError) {
    use ErrorType::*;
    match etype {
        ConnectTimedout | TLSHandshakeTimedout => {
            (UpstreamErrorKind::Timeout, GatewayError::UpstreamTimeout)
        }
        ReadTimedout | WriteTimedout => (UpstreamErrorKind::Timeout, GatewayError::UpstreamTimeout),
        TLSHandshakeFailure | InvalidCert | HandshakeError => {
            (UpstreamErrorKind::Tls, GatewayError::UpstreamUnreachable)
        }
        ConnectRefused | ConnectNoRoute | ConnectError | SocketError | BindError => (
            UpstreamErrorKind::Connect,
            GatewayError::UpstreamUnreachable,
        ),
        _ => (UpstreamErrorKind::Reset, GatewayError::UpstreamUnreachable),
    }
}

/// Whether an error is the client's doing: anything from the downstream side, or a refusal of
/// the request by status (400, 405, 501, …; not the 503 for a missing access token).
fn client_caused(error: &Error) -> bool {
    error.esource() == &ErrorSource::Downstream
        || matches!(error.etype(), ErrorType::HTTPStatus(code) if *code != 503)
}

/// Longest client-supplied `X-Request-Id` the gateway keeps, in bytes.
pub(crate) const MAX_REQUEST_ID: usize = 128;

/// Whether a client's `X-Request-Id` is kept: 1 to [`MAX_REQUEST_ID`] visible ASCII bytes.
#[inline]
pub(crate) fn valid_request_id_bytes(b: &[u8]) -> bool {
    // A branch-free pass (vectorised): ids are checked on every request that carries one.
    !b.is_empty()
        && b.len() <= MAX_REQUEST_ID
        && b.iter()
            .fold(true, |ok, &c| ok & (c.wrapping_sub(b'!') <= b'~' - b'!'))
}

/// Generates request ids (`X-Request-Id` when the client sent none or an unusable one): a
/// random per-process prefix and a counter, as 32 lower-case hex digits. Lock-free.
pub struct RequestIds {
    /// The random prefix's 16 hex digits, formatted once.
    prefix: [u8; 16],
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIds {
    /// A generator with a fresh random prefix.
    pub fn new() -> Self {
        RequestIds {
            prefix: hex16(rand::random()),
            counter: AtomicU64::new(0),
        }
    }

    /// The next id: 32 hex digits, unique within this process.
    #[inline]
    pub fn next(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.next_hex()).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }

    /// The next id as its 32 lower-case hex digits, without allocating (the fast path).
    #[inline]
    pub fn next_hex(&self) -> [u8; 32] {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        buf[..16].copy_from_slice(&self.prefix);
        buf[16..].copy_from_slice(&hex16(n));
        buf
    }
}

/// `n` as 16 lower-case hex digits, most significant first: one table lookup a byte.
#[inline]
fn hex16(n: u64) -> [u8; 16] {
    const PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [HEX[i >> 4], HEX[i & 0xf]];
            i += 1;
        }
        t
    };
    let mut out = [0u8; 16];
    for (pair, byte) in out.chunks_exact_mut(2).zip(n.to_be_bytes()) {
        pair.copy_from_slice(&PAIRS[byte as usize]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex16_is_the_number_in_lower_case_hex() {
        for n in [0, 1, 0xab, 0x0123_4567_89ab_cdef, u64::MAX] {
            assert_eq!(hex16(n), *format!("{n:016x}").as_bytes());
        }
    }

    #[test]
    fn request_ids_are_unique_hex() {
        let ids = RequestIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn request_id_validation() {
        assert!(valid_request_id_bytes(b"abc-123"));
        assert!(!valid_request_id_bytes(b""));
        assert!(!valid_request_id_bytes(b"a b"));
    }
}
