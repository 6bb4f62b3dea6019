//! The client side of a fast-path connection under `server`'s client bounds: a connection
//! from outside `allowed_clients` refused before its head is read, request heads read within
//! `max_request_head` and `request_head_timeout`, idle connections closed after
//! `idle_timeout` and holding no buffers while they wait, request bodies read within
//! `body_timeout`, responses written within `send_timeout` (docs/proxy-behaviour.md
//! "Client bounds").

use std::io;
use std::time::{Duration, Instant};

use http::HeaderValue;
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::request::{parse_request, Parsed, Plain};
use super::timer::Timer;
use super::{record_request, Conn, Current, ListenerApp, Outcome, RequestRecord, HOLD_WHILE_IDLE};
use crate::metrics::ClientTimeout;
use crate::proxy::policy::{ErrorResponse, GatewayError};
use crate::proxy::routes::Route;
use crate::proxy::SharedState;

/// What a request head's reads ask for at a time, bytes: most heads fit in one.
const HEAD_READ: usize = 4 * 1024;
/// How long a refused connection's unread bytes are drained after the refusal was sent, so
/// the client reads the answer instead of a reset (RFC 9112 §9.6).
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes drained after a refusal.
const LINGER_BYTES: usize = 64 * 1024;

impl ListenerApp {
    /// Reads until `c.buf` starts with a complete request head the fast path forwards itself.
    /// Waits for its first byte at most `idle_timeout` (giving the held upstream connection
    /// and the buffers back once the connection has been idle [`HOLD_WHILE_IDLE`]), then for the
    /// whole head at most `request_head_timeout`; a head over `max_request_head` gets 431, one
    /// late gets 408. `Err` says how the connection goes on instead.
    pub(super) async fn read_head(
        &self,
        down: &mut Stream,
        c: &mut Conn,
        current: &mut Current,
    ) -> Result<Plain, Outcome> {
        let mut limits = current.state.limits;
        // When the head was first found incomplete: read only then, so a head that arrives in
        // one read costs no clock read.
        let mut head_started: Option<Instant> = None;
        loop {
            match parse_request(&c.buf, &mut c.fields, limits.max_request_head) {
                Parsed::Plain(req) if req.fast() => return Ok(req),
                Parsed::Plain(r) => {
                    return Err(Outcome::Delegate(r.facts.chunked.then_some(r.head_len)))
                }
                Parsed::Delegate(chunked_body) => return Err(Outcome::Delegate(chunked_body)),
                Parsed::Refuse(err) => {
                    self.refuse(down, c, &current.state, err).await;
                    return Err(Outcome::Close);
                }
                Parsed::Partial => {}
            }
            if c.buf.is_empty() {
                self.wait_for_request(down, c, current).await?;
                // A reload while the connection waited: its bounds apply to this request.
                self.follow_reload(c, current);
                limits = current.state.limits;
                continue;
            }
            let started = *head_started.get_or_insert_with(Instant::now);
            let left = limits
                .request_head_timeout
                .saturating_sub(started.elapsed());
            // At most one byte past the limit is read into a head that has not ended.
            let room = (limits.max_request_head + 1).saturating_sub(c.buf.len());
            c.buf.reserve_exact(room.clamp(1, HEAD_READ));
            match c.timer.bounded(Some(left), down.read_buf(&mut c.buf)).await {
                Ok(0) => return Err(Outcome::Close),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    let state = &current.state;
                    state.metrics.client_timeout(ClientTimeout::Head);
                    self.refuse(down, c, state, GatewayError::RequestTimeout)
                        .await;
                    return Err(Outcome::Close);
                }
                Err(_) => return Err(Outcome::Close),
            }
        }
    }

    /// Waits on an idle connection (`c.buf` empty) until the next request's first bytes are
    /// in `c.buf`. A connection that served a request keeps its buffers and upstream
    /// connection for [`HOLD_WHILE_IDLE`] (the next request usually follows at once); after
    /// that, and on a new connection, it waits holding neither, reading one byte into the
    /// connection's task, so an idle connection costs no buffer memory. `Err(Close)` after
    /// `idle_timeout` without a byte, or when the client closed.
    async fn wait_for_request(
        &self,
        down: &mut Stream,
        c: &mut Conn,
        current: &Current,
    ) -> Result<(), Outcome> {
        let idle_timeout = current.state.limits.idle_timeout;
        let mut left = idle_timeout;
        if c.buf.capacity() > 0 {
            c.buf.reserve(HEAD_READ);
            let hold = HOLD_WHILE_IDLE.min(idle_timeout);
            match c.timer.bounded(Some(hold), down.read_buf(&mut c.buf)).await {
                Ok(0) => return Err(Outcome::Close),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(_) => return Err(Outcome::Close),
            }
            // Idle: the upstream connection goes back to pingora's pool (bounded, watched for
            // closes), the buffers to the allocator.
            self.release(c.held.take(), &current.state);
            c.release_buffers();
            left -= hold;
        }
        let mut first = [0u8; 1];
        match c.timer.bounded(Some(left), down.read(&mut first)).await {
            Ok(1) => {
                c.buf.reserve_exact(HEAD_READ);
                c.buf.push(first[0]);
                Ok(())
            }
            _ => Err(Outcome::Close),
        }
    }

    /// Reads the rest of a `Content-Length` body until `c.buf` holds `total` bytes, each read
    /// within `body_timeout`; a stalled body gets 408. `Err(Close)` when the connection ends.
    pub(super) async fn read_body(
        &self,
        down: &mut Stream,
        c: &mut Conn,
        state: &SharedState,
        total: usize,
    ) -> Result<(), Outcome> {
        while c.buf.len() < total {
            c.buf.reserve(total - c.buf.len());
            match c
                .timer
                .bounded(Some(state.limits.body_timeout), down.read_buf(&mut c.buf))
                .await
            {
                Ok(0) => return Err(Outcome::Close),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    state.metrics.client_timeout(ClientTimeout::Body);
                    self.refuse(down, c, state, GatewayError::RequestTimeout)
                        .await;
                    return Err(Outcome::Close);
                }
                Err(_) => return Err(Outcome::Close),
            }
        }
        Ok(())
    }

    /// Refuses a connection from outside `allowed_clients` before reading its request head:
    /// 403 `client_not_allowed` at once, then the connection is closed after its unread bytes
    /// are drained a moment (at most [`LINGER`] and [`LINGER_BYTES`]), so the client reads the
    /// answer. A trusted proxy's connection is not refused here: each of its requests names its
    /// client.
    pub(super) async fn refuse_unadmitted(
        &self,
        down: &mut Stream,
        c: &mut Conn,
        state: &SharedState,
    ) {
        self.refuse(down, c, state, GatewayError::ClientNotAllowed)
            .await;
        c.release_buffers();
        // Refused connections take no place among `max_connections`; so that a flood of them
        // cannot hold many tasks, at most MAX_LINGERING linger and the rest close at once.
        let Some(_lingering) = self.live.clients.linger() else {
            return;
        };
        let deadline = Instant::now() + LINGER;
        let _ = c.timer.bounded(Some(LINGER), down.shutdown()).await;
        let mut sink = [0u8; 512];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            let left = deadline.saturating_duration_since(Instant::now());
            match c.timer.bounded(Some(left), down.read(&mut sink)).await {
                Ok(n) if n > 0 => drained += n,
                _ => break,
            }
        }
    }

    /// Refuses a request head no server may accept (or one over the limit, or late) with the
    /// gateway's error, after the client check (a client outside `allowed_clients` gets 403
    /// whatever it sent), counts and logs it; the connection is closed after it.
    pub(super) async fn refuse(
        &self,
        down: &mut Stream,
        c: &mut Conn,
        state: &SharedState,
        err: GatewayError,
    ) {
        let started = Instant::now();
        if c.peer_trusted {
            // An unreadable head names no client: judged by its peer (as pingora's path does).
            c.check_client(state);
        }
        let err = if c.allowed {
            err
        } else {
            GatewayError::ClientNotAllowed
        };
        if let Some(reason) = err.deny_reason() {
            state.metrics.denied(reason);
        }
        let request_id = state.request_ids.next();
        // A CONNECT: no route is known, so the methods a route takes by default.
        let allow = HeaderValue::from_static(Route::DEFAULT_ALLOW);
        let response = ErrorResponse::new(&err, None, Some(&request_id), Some(&allow));
        response.write_h1(false, &mut c.out);
        let _ = write_down(down, &mut c.timer, state, &c.out).await;
        record_request(&RequestRecord {
            route: None,
            method: None,
            path: "-",
            status: response.status,
            started,
            generation: 0,
            gateway_error: Some(err.code()),
            error: None,
            request_id: request_id.to_str().ok(),
            authorization_len: 0,
        });
    }
}

/// Writes `bytes` to the client; a write that makes no progress for `send_timeout` fails with
/// `TimedOut` and is counted (the caller closes the client and upstream connections).
pub(super) async fn write_down(
    down: &mut Stream,
    timer: &mut Timer,
    state: &SharedState,
    bytes: &[u8],
) -> io::Result<()> {
    let limit = Some(state.limits.send_timeout);
    let mut rest = bytes;
    while !rest.is_empty() {
        match timer.bounded(limit, down.write(rest)).await {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) => {
                if e.kind() == io::ErrorKind::TimedOut {
                    state.metrics.client_timeout(ClientTimeout::Send);
                }
                return Err(e);
            }
        }
    }
    match timer.bounded(limit, down.flush()).await {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            state.metrics.client_timeout(ClientTimeout::Send);
            Err(e)
        }
        other => other,
    }
}
