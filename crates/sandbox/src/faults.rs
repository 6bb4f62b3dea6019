//! Runtime fault injection for the sandbox servers: slow, hanging, dropped and canned answers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use http_body_util::Full;
use tokio::sync::watch;

use super::server::{Reply, Resp};

/// Fault knobs of one sandbox endpoint, changeable at any time through a shared handle.
///
/// Each request that reaches the endpoint first waits while the endpoint is
/// [held](Self::hold), then waits the configured [latency](Self::set_latency), then, in this order of precedence: hangs forever if [hang](Self::set_hang) is on, closes the
/// connection without an answer if [close](Self::set_close_connection) is on, answers with the
/// next [scripted response](Self::respond_with_sequence) if any is left, with the
/// [canned response](Self::respond_with) if one is armed, and otherwise answers normally.
/// Knobs are independent: turning one off leaves the others as they are; [`reset`](Self::reset)
/// turns everything off. These mirror what real token endpoints and APIs do on a bad day: slow
/// answers, load balancers that accept and never answer, resets, and HTML error pages with
/// `Retry-After` (RFC 9110 §10.2.3).
///
/// Cheap to clone: clones share the same knobs.
#[derive(Clone, Default)]
pub struct Faults {
    state: Arc<Mutex<FaultState>>,
    /// Requests waiting at the hold now.
    held: Arc<AtomicUsize>,
}

#[derive(Default)]
struct FaultState {
    /// `true` while held; requests at the hold wait for `false` (or for the sender to go, on
    /// [`Faults::reset`]).
    hold: watch::Sender<bool>,
    latency: Duration,
    hang: bool,
    close_connection: bool,
    panic: bool,
    canned: Option<(CannedResponse, Remaining)>,
    script: VecDeque<CannedResponse>,
}

#[derive(Clone, Copy)]
enum Remaining {
    Always,
    Next(u32),
}

/// What a request must do, decided once when it arrives.
pub(crate) enum FaultAction {
    Proceed,
    Hang,
    Close,
    Panic,
    Respond(Resp),
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        let hold = *s.hold.borrow();
        f.debug_struct("Faults")
            .field("hold", &hold)
            .field("held", &self.held())
            .field("latency", &s.latency)
            .field("hang", &s.hang)
            .field("close_connection", &s.close_connection)
            .field("canned", &s.canned.as_ref().map(|(c, _)| c.status))
            .finish()
    }
}

impl Faults {
    /// Holds every request that arrives from now on before it is handled (before latency and
    /// every other fault), until [`release`](Self::release): a test can make "requests wait for
    /// this answer" certain instead of racing them. [`held`](Self::held) tells when a request
    /// is waiting.
    pub fn hold(&self) {
        self.lock().hold.send_replace(true);
    }

    /// Lets the held requests, and every later one, go on.
    pub fn release(&self) {
        self.lock().hold.send_replace(false);
    }

    /// How many requests are waiting at the [hold](Self::hold) right now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Waits while the endpoint is held (counted in [`held`](Self::held)).
    pub(crate) async fn pass_hold(&self) {
        let mut open = {
            let s = self.lock();
            if !*s.hold.borrow() {
                return;
            }
            s.hold.subscribe()
        };
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.held.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.held);
        // An error: `reset` replaced the knobs, which releases.
        let _ = open.wait_for(|held| !held).await;
    }

    /// Delays every answer (normal or canned) by `latency`; `Duration::ZERO` turns it off.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// While on, requests are accepted and read but never answered (until the client gives up or
    /// the server is shut down). Requests already hanging stay hanging after it is turned off.
    pub fn set_hang(&self, on: bool) {
        self.lock().hang = on;
    }

    /// While on, the connection is closed without any response once the request has been read
    /// (the client sees a reset / "connection closed before message completed").
    pub fn set_close_connection(&self, on: bool) {
        self.lock().close_connection = on;
    }

    /// While on, the request handler panics. Only for testing that the sandbox reports handler
    /// panics (the client gets a 500 and the server's `panics()` counts it).
    pub fn set_panic(&self, on: bool) {
        self.lock().panic = on;
    }

    /// Answers every request with `response` until [`clear_response`](Self::clear_response).
    pub fn respond_with(&self, response: CannedResponse) {
        self.lock().canned = Some((response, Remaining::Always));
    }

    /// Answers the next `n` requests with `response`, then answers normally again.
    pub fn respond_with_next(&self, n: u32, response: CannedResponse) {
        self.lock().canned = (n > 0).then_some((response, Remaining::Next(n)));
    }

    /// Answers the next requests with `responses`, one each, in order, then answers as before
    /// (normally, or with the [canned response](Self::respond_with) if one is armed). Appends to
    /// a script that is still running.
    pub fn respond_with_sequence(&self, responses: impl IntoIterator<Item = CannedResponse>) {
        self.lock().script.extend(responses);
    }

    /// How many scripted responses are left.
    pub fn scripted_left(&self) -> usize {
        self.lock().script.len()
    }

    /// Disarms the canned response and drops what is left of the script.
    pub fn clear_response(&self) {
        let mut s = self.lock();
        s.canned = None;
        s.script.clear();
    }

    /// Fails every request from now on with `status` and an RFC 6749 §5.2 error body (see
    /// [`CannedResponse::failure`]), until [`stop_failing`](Self::stop_failing).
    pub fn fail_with(&self, status: StatusCode) {
        self.respond_with(CannedResponse::failure(status));
    }

    /// Undoes [`fail_with`](Self::fail_with) (same as [`clear_response`](Self::clear_response)).
    pub fn stop_failing(&self) {
        self.clear_response();
    }

    /// Turns every fault off (and releases held requests).
    pub fn reset(&self) {
        *self.lock() = FaultState::default();
    }

    /// Decides, and consumes one use of a `respond_with_next` response, for one request.
    pub(crate) fn next_action(&self) -> (Duration, FaultAction) {
        let mut s = self.lock();
        let action = if s.hang {
            FaultAction::Hang
        } else if s.close_connection {
            FaultAction::Close
        } else if s.panic {
            FaultAction::Panic
        } else if let Some(scripted) = s.script.pop_front() {
            FaultAction::Respond(scripted.to_response())
        } else if let Some((canned, remaining)) = s.canned.take() {
            let response = canned.to_response();
            s.canned = match remaining {
                Remaining::Always => Some((canned, Remaining::Always)),
                Remaining::Next(n) if n > 1 => Some((canned, Remaining::Next(n - 1))),
                Remaining::Next(_) => None,
            };
            FaultAction::Respond(response)
        } else {
            FaultAction::Proceed
        };
        (s.latency, action)
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock()
    }
}

/// Applies `faults` to one request: waits while held, waits the latency, then `Some(reply)` if a fault decides the
/// answer, `None` if the request should be handled normally.
pub(crate) async fn apply(faults: &Faults) -> Option<Reply> {
    faults.pass_hold().await;
    let (latency, action) = faults.next_action();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match action {
        FaultAction::Proceed => None,
        FaultAction::Hang => Some(Reply::Hang),
        FaultAction::Close => Some(Reply::Close),
        FaultAction::Panic => panic!("sandbox fault injection: handler panic"),
        FaultAction::Respond(response) => Some(Reply::Respond(response)),
    }
}

/// A fixed answer served instead of the normal one: any status, any headers, any raw body.
///
/// Nothing is added except what HTTP/1.1 framing needs (`content-length`, `date`): if you want a
/// `Content-Type`, say so.
#[derive(Debug, Clone)]
pub struct CannedResponse {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl CannedResponse {
    /// An empty response with `status`.
    pub fn new(status: StatusCode) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Adds a header (repeatable: the same name may be added more than once).
    ///
    /// # Panics
    /// If `name` or `value` is not a valid HTTP header name/value: that is a bug in the test that
    /// builds the response, not network input.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = HeaderName::from_bytes(name.as_bytes())
            .unwrap_or_else(|e| panic!("CannedResponse::header: invalid name {name:?}: {e}"));
        let value = HeaderValue::from_str(value)
            .unwrap_or_else(|e| panic!("CannedResponse::header: invalid value {value:?}: {e}"));
        self.headers.push((name, value));
        self
    }

    /// Sets the raw body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// `status` with `Content-Type: application/json` and `body` as given (not validated, so
    /// broken JSON is possible on purpose).
    pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Self::new(status)
            .header("content-type", "application/json")
            .body(body)
    }

    /// `status` with `Content-Type: text/html` and `body`, like a load balancer's error page.
    pub fn html(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Self::new(status)
            .header("content-type", "text/html; charset=utf-8")
            .body(body)
    }

    /// An RFC 6749 §5.2 error answer: `{"error": …, "error_description": …}` with
    /// `Content-Type: application/json;charset=UTF-8` and `Cache-Control: no-store`.
    pub fn oauth_error(status: StatusCode, error: &str, description: &str) -> Self {
        let body = serde_json::json!({ "error": error, "error_description": description });
        Self::new(status)
            .header("content-type", "application/json;charset=UTF-8")
            .header("cache-control", "no-store")
            .body(body.to_string())
    }

    /// The answer [`Faults::fail_with`] uses: an RFC 6749 §5.2 error body whose `error` fits the
    /// status (`temporarily_unavailable` for 503 and 429, `server_error` for other 5xx,
    /// `invalid_client` for 401, `invalid_request` otherwise), plus `Retry-After: 1` on 429/503.
    pub fn failure(status: StatusCode) -> Self {
        let error = match status.as_u16() {
            429 | 503 => "temporarily_unavailable",
            401 => "invalid_client",
            s if s >= 500 => "server_error",
            _ => "invalid_request",
        };
        let canned = Self::oauth_error(status, error, "sandbox fault injection");
        if matches!(status.as_u16(), 429 | 503) {
            canned.header("retry-after", "1")
        } else {
            canned
        }
    }

    /// The status of this response.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn to_response(&self) -> Resp {
        let mut response = Resp::new(Full::new(self.body.clone()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_n_then_normal() {
        let faults = Faults::default();
        faults.respond_with_next(2, CannedResponse::new(StatusCode::BAD_GATEWAY));
        for _ in 0..2 {
            assert!(matches!(faults.next_action().1, FaultAction::Respond(r) if r.status() == 502));
        }
        assert!(matches!(faults.next_action().1, FaultAction::Proceed));
    }

    #[test]
    fn script_then_canned_then_normal() {
        let faults = Faults::default();
        faults.respond_with_next(1, CannedResponse::new(StatusCode::BAD_GATEWAY));
        faults.respond_with_sequence([
            CannedResponse::new(StatusCode::TOO_MANY_REQUESTS),
            CannedResponse::new(StatusCode::UNAUTHORIZED),
        ]);
        assert_eq!(faults.scripted_left(), 2);
        for want in [429, 401, 502] {
            assert!(
                matches!(faults.next_action().1, FaultAction::Respond(r) if r.status() == want)
            );
        }
        assert!(matches!(faults.next_action().1, FaultAction::Proceed));
    }

    #[test]
    fn precedence_and_reset() {
        let faults = Faults::default();
        faults.fail_with(StatusCode::SERVICE_UNAVAILABLE);
        faults.set_close_connection(true);
        faults.set_latency(Duration::from_millis(5));
        assert!(matches!(faults.next_action(), (d, FaultAction::Close) if d.as_millis() == 5));
        faults.set_close_connection(false);
        match faults.next_action().1 {
            FaultAction::Respond(r) => {
                assert_eq!(r.status(), 503);
                assert_eq!(r.headers()["retry-after"], "1");
            }
            _ => panic!("expected the canned failure"),
        }
        faults.reset();
        assert!(matches!(faults.next_action(), (d, FaultAction::Proceed) if d.is_zero()));
    }
}
