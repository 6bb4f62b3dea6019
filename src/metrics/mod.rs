//! Every metric tokengate exports, defined once (names and labels as docs/operations.md
//! "Metrics" lists them).
//!
//! Each gateway owns its own [`Registry`] (so several gateways can run in one process, as the
//! tests do); `/metrics` encodes it. Per-route handles are resolved once at start-up, so the
//! request path only increments atomics: no label hashing, no lock.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pingora_prometheus::prometheus::{
    self, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::oauth::FetchOutcome;

mod thread_histogram;

use thread_histogram::{ThreadHistogram, ThreadHistogramVec};

/// The gateway's metric families.
pub struct Metrics {
    registry: Registry,
    requests_total: IntCounterVec,
    /// Kept per thread: observed on every request (see [`ThreadHistogramVec`]).
    request_duration: ThreadHistogramVec,
    upstream_errors: IntCounterVec,
    token_requests: IntCounterVec,
    token_request_duration: HistogramVec,
    token_expiry: IntGaugeVec,
    token_failures: IntGaugeVec,
    upstream_unauthorized: IntCounterVec,
    denied: IntCounterVec,
    config_reloads: IntCounterVec,
    subject_tokens: IntGaugeVec,
    vended_tokens: IntCounterVec,
    connections: IntGauge,
    connections_refused: IntCounter,
    client_timeouts: IntCounterVec,
    cluster_up: IntGauge,
    cluster_operations: IntCounterVec,
}

/// Which client stall a connection was cut off for (`tokengate_client_timeouts_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTimeout {
    /// A request head not complete within `server.request_head_timeout`: 408.
    Head,
    /// A request body that made no progress for `server.body_timeout`: 408, or a close once
    /// the response had started.
    Body,
    /// A response write that made no progress for `server.send_timeout`: closed.
    Send,
}

impl ClientTimeout {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            ClientTimeout::Head => "head",
            ClientTimeout::Body => "body",
            ClientTimeout::Send => "send",
        }
    }
}

/// Why a request was refused before routing finished (`tokengate_denied_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// No route matched: 404.
    NoRoute,
    /// Client address outside `allowed_clients`: 403.
    ClientNotAllowed,
    /// Method outside the route's `allow_methods`: 405.
    MethodNotAllowed,
    /// A request refused for its framing or request line: 400.
    BadRequest,
    /// A request head over the limit: 431.
    HeaderTooLarge,
    /// A transfer coding the gateway does not implement: 501.
    NotImplemented,
    /// A per-user token asked for a subject outside `[routes.subjects]` `allow`, or by a
    /// client not trusted to name one: 403.
    SubjectNotAllowed,
}

impl DenyReason {
    /// The label value, also the gateway error code.
    pub fn label(self) -> &'static str {
        match self {
            DenyReason::NoRoute => "no_route",
            DenyReason::ClientNotAllowed => "client_not_allowed",
            DenyReason::MethodNotAllowed => "method_not_allowed",
            DenyReason::BadRequest => "bad_request",
            DenyReason::HeaderTooLarge => "request_header_too_large",
            DenyReason::NotImplemented => "not_implemented",
            DenyReason::SubjectNotAllowed => "subject_not_allowed",
        }
    }
}

/// `kind` label of `tokengate_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// TCP connect failed.
    Connect,
    /// Connect or read timed out.
    Timeout,
    /// TLS handshake or certificate failure.
    Tls,
    /// Connection reset or closed mid-request.
    Reset,
}

impl UpstreamErrorKind {
    fn index(self) -> usize {
        self as usize
    }
    const LABELS: [&'static str; 4] = ["connect", "timeout", "tls", "reset"];
}

fn register<C: prometheus::core::Collector + 'static>(r: &Registry, c: C) {
    // Names are static and unique, so registration cannot fail; if it ever did, the metric
    // would still count, only not be exported.
    if let Err(e) = r.register(Box::new(c)) {
        tracing::error!(error = %e, "metric registration failed");
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    register(r, c.clone());
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    register(r, g.clone());
    g
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("static metric definition");
    register(r, h.clone());
    h
}

/// A histogram family observed on every request: kept per thread ([`ThreadHistogramVec`]).
fn thread_histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    label: &str,
    buckets: Vec<f64>,
) -> ThreadHistogramVec {
    let h = ThreadHistogramVec::new(name, help, label, buckets).expect("static metric definition");
    register(r, h.clone());
    h
}

impl Metrics {
    /// Creates and registers every metric family; sets `tokengate_build_info`.
    pub fn new() -> Arc<Self> {
        let r = Registry::new();
        let m = Metrics {
            requests_total: counter_vec(
                &r,
                "tokengate_requests_total",
                "Proxied requests by route and response status code.",
                &["route", "code"],
            ),
            request_duration: thread_histogram_vec(
                &r,
                "tokengate_request_duration_seconds",
                "Time from request received to response finished, seconds.",
                "route",
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0,
                ],
            ),
            upstream_errors: counter_vec(
                &r,
                "tokengate_upstream_errors_total",
                "Failures talking to the upstream, by kind (connect, timeout, tls, reset).",
                &["route", "kind"],
            ),
            token_requests: counter_vec(
                &r,
                "tokengate_token_requests_total",
                "Token endpoint requests by outcome (success, http_error, oauth_error, network_error, invalid_response).",
                &["route", "outcome"],
            ),
            token_request_duration: histogram_vec(
                &r,
                "tokengate_token_request_duration_seconds",
                "Token endpoint request duration, seconds.",
                &["route"],
                vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            token_expiry: gauge_vec(
                &r,
                "tokengate_token_expiry_timestamp_seconds",
                "Unix time at which the current access token expires (0: none).",
                &["route"],
            ),
            token_failures: gauge_vec(
                &r,
                "tokengate_token_consecutive_failures",
                "Failed token requests since the last success.",
                &["route"],
            ),
            upstream_unauthorized: counter_vec(
                &r,
                "tokengate_upstream_unauthorized_total",
                "Upstream 401 answers to a current token, by action (replayed, passed_through).",
                &["route", "action"],
            ),
            denied: counter_vec(
                &r,
                "tokengate_denied_total",
                "Requests refused by the gateway, by reason.",
                &["reason"],
            ),
            config_reloads: counter_vec(
                &r,
                "tokengate_config_reloads_total",
                "Configuration reloads (SIGHUP) by outcome (success, error).",
                &["outcome"],
            ),
            subject_tokens: gauge_vec(
                &r,
                "tokengate_subject_tokens",
                "Per-user tokens cached, by route (never labelled by subject).",
                &["route"],
            ),
            vended_tokens: counter_vec(
                &r,
                "tokengate_vended_tokens_total",
                "Tokens handed out by the token listener, by route.",
                &["route"],
            ),
            connections: {
                let g = IntGauge::new(
                    "tokengate_connections",
                    "Open client connections on the proxy listeners.",
                )
                .expect("static metric definition");
                register(&r, g.clone());
                g
            },
            connections_refused: {
                let c = IntCounter::new(
                    "tokengate_connections_refused_total",
                    "Client connections closed at accept because server.max_connections were open.",
                )
                .expect("static metric definition");
                register(&r, c.clone());
                c
            },
            client_timeouts: {
                let c = counter_vec(
                    &r,
                    "tokengate_client_timeouts_total",
                    "Client connections cut off for a stall, by kind (head, body, send).",
                    &["kind"],
                );
                for kind in [ClientTimeout::Head, ClientTimeout::Body, ClientTimeout::Send] {
                    c.with_label_values(&[kind.label()]);
                }
                c
            },
            cluster_up: {
                let g = IntGauge::new(
                    "tokengate_cluster_up",
                    "1 while the fleet's Redis answers, 0 while it does not (or no [cluster]).",
                )
                .expect("static metric definition");
                register(&r, g.clone());
                g
            },
            cluster_operations: counter_vec(
                &r,
                "tokengate_cluster_operations_total",
                "Fleet store operations by op (get, lease, publish, invalidate) and outcome (ok, miss, error).",
                &["op", "outcome"],
            ),
            registry: r,
        };
        let build = gauge_vec(
            &m.registry,
            "tokengate_build_info",
            "Always 1; the version label identifies the build.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for reason in [
            DenyReason::NoRoute,
            DenyReason::ClientNotAllowed,
            DenyReason::MethodNotAllowed,
            DenyReason::BadRequest,
            DenyReason::HeaderTooLarge,
            DenyReason::NotImplemented,
            DenyReason::SubjectNotAllowed,
        ] {
            m.denied.with_label_values(&[reason.label()]);
        }
        for outcome in ["success", "error"] {
            m.config_reloads.with_label_values(&[outcome]);
        }
        Arc::new(m)
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> (Vec<u8>, String) {
        let encoder = TextEncoder::new();
        let mut buf = Vec::with_capacity(16 * 1024);
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        (buf, encoder.format_type().to_string())
    }

    /// `tokengate_connections`: open client connections on the proxy listeners (both paths).
    pub fn connections(&self) -> IntGauge {
        self.connections.clone()
    }

    /// Counts a client connection closed at accept for `server.max_connections`.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Counts a client connection cut off for a stall.
    pub fn client_timeout(&self, kind: ClientTimeout) {
        self.client_timeouts
            .with_label_values(&[kind.label()])
            .inc();
    }

    /// Counts a refused request.
    pub fn denied(&self, reason: DenyReason) {
        self.denied.with_label_values(&[reason.label()]).inc();
    }

    /// Counts a config reload.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "success" } else { "error" }])
            .inc();
    }

    /// Drops the token gauges (`tokengate_token_expiry_timestamp_seconds`,
    /// `tokengate_token_consecutive_failures`) of a route a config reload removed: a frozen
    /// expiry would trip the expiry alert forever. Counters stay (they only ever grow).
    pub fn forget_route(&self, route: &str) {
        let _ = self.token_expiry.remove_label_values(&[route]);
        let _ = self.token_failures.remove_label_values(&[route]);
    }

    /// Per-route handles for the request path.
    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            route: route.to_string(),
            requests_total: self.requests_total.clone(),
            by_status: (99..600).map(|_| OnceLock::new()).collect(),
            duration: self.request_duration.with_label_value(route),
            upstream_errors: UpstreamErrorKind::LABELS
                .map(|k| self.upstream_errors.with_label_values(&[route, k])),
            replayed: self
                .upstream_unauthorized
                .with_label_values(&[route, "replayed"]),
            passed_through: self
                .upstream_unauthorized
                .with_label_values(&[route, "passed_through"]),
        }
    }

    /// `tokengate_subject_tokens{route}`: per-user tokens cached for the route.
    pub fn subject_tokens(&self, route: &str) -> IntGauge {
        self.subject_tokens.with_label_values(&[route])
    }

    /// `tokengate_vended_tokens_total{route}`: tokens the token listener handed out.
    pub fn vended_tokens(&self, route: &str) -> IntCounter {
        self.vended_tokens.with_label_values(&[route])
    }

    /// Handles for the fleet store (`[cluster]`): `tokengate_cluster_up` and
    /// `tokengate_cluster_operations_total{op,outcome}`, every label pair created at once.
    pub fn cluster(&self) -> ClusterMetrics {
        let ops = ClusterOp::ALL.map(|op| {
            ClusterOutcome::ALL.map(|o| {
                self.cluster_operations
                    .with_label_values(&[op.label(), o.label()])
            })
        });
        ClusterMetrics {
            up: self.cluster_up.clone(),
            ops: Arc::new(ops),
        }
    }

    /// Per-route handles for a token source.
    pub fn token(&self, route: &str) -> TokenMetrics {
        TokenMetrics {
            requests: FetchOutcome::ALL
                .map(|o| self.token_requests.with_label_values(&[route, o.label()])),
            duration: self.token_request_duration.with_label_values(&[route]),
            expiry: self.token_expiry.with_label_values(&[route]),
            failures: self.token_failures.with_label_values(&[route]),
        }
    }
}

/// `op` label of `tokengate_cluster_operations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterOp {
    /// Reading a shared token.
    Get,
    /// Taking the lease to obtain one.
    Lease,
    /// Storing an obtained token (and announcing it).
    Publish,
    /// Deleting a token the upstream refused.
    Invalidate,
}

impl ClusterOp {
    const ALL: [ClusterOp; 4] = [
        ClusterOp::Get,
        ClusterOp::Lease,
        ClusterOp::Publish,
        ClusterOp::Invalidate,
    ];
    fn label(self) -> &'static str {
        match self {
            ClusterOp::Get => "get",
            ClusterOp::Lease => "lease",
            ClusterOp::Publish => "publish",
            ClusterOp::Invalidate => "invalidate",
        }
    }
}

/// `outcome` label of `tokengate_cluster_operations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterOutcome {
    /// Done: a token read, a lease taken, a token stored or deleted.
    Ok,
    /// Answered, but nothing to use: no token (or one that does not decrypt with this
    /// fleet's key), a lease another replica holds, a token already replaced.
    Miss,
    /// Redis did not answer in time, refused, or is known to be down.
    Error,
}

impl ClusterOutcome {
    const ALL: [ClusterOutcome; 3] = [
        ClusterOutcome::Ok,
        ClusterOutcome::Miss,
        ClusterOutcome::Error,
    ];
    fn label(self) -> &'static str {
        match self {
            ClusterOutcome::Ok => "ok",
            ClusterOutcome::Miss => "miss",
            ClusterOutcome::Error => "error",
        }
    }
}

/// The fleet store's metric handles ([`Metrics::cluster`]).
#[derive(Clone)]
pub struct ClusterMetrics {
    up: IntGauge,
    ops: Arc<[[IntCounter; 3]; 4]>,
}

impl ClusterMetrics {
    /// Sets `tokengate_cluster_up`.
    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    /// Counts one operation.
    pub fn op(&self, op: ClusterOp, outcome: ClusterOutcome) {
        self.ops[op as usize][outcome as usize].inc();
    }
}

/// A route's request-path metric handles.
pub struct RouteMetrics {
    route: String,
    requests_total: IntCounterVec,
    /// `[0]`: no response (`code="0"`); `[n]`: status code `n + 99` (100..=599). Resolved on
    /// first use, then lock-free.
    by_status: Box<[OnceLock<IntCounter>]>,
    duration: ThreadHistogram,
    upstream_errors: [IntCounter; 4],
    replayed: IntCounter,
    passed_through: IntCounter,
}

impl RouteMetrics {
    /// Counts one finished request and observes its duration. `status` is the response's
    /// code, or 0 when the request got no response (the client left first): counted as
    /// `code="0"`, as Envoy reports it, not as a real status. Codes over 599 count as 599.
    #[inline]
    pub fn request(&self, status: u16, elapsed: Duration) {
        let idx = if status < 100 {
            0
        } else {
            usize::from(status.min(599)) - 99
        };
        self.by_status[idx]
            .get_or_init(|| {
                let code = if idx == 0 { 0 } else { idx + 99 }.to_string();
                self.requests_total.with_label_values(&[&self.route, &code])
            })
            .inc();
        self.duration.observe(elapsed);
    }

    /// Counts an upstream failure.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind.index()].inc();
    }

    /// Counts an upstream 401 to a current token.
    pub fn unauthorized(&self, replayed: bool) {
        if replayed {
            self.replayed.inc()
        } else {
            self.passed_through.inc()
        }
    }
}

/// A token source's metric handles.
#[derive(Clone)]
pub struct TokenMetrics {
    requests: [IntCounter; 5],
    duration: Histogram,
    expiry: IntGauge,
    failures: IntGauge,
}

impl TokenMetrics {
    /// Counts one token request and observes its duration.
    pub fn fetched(&self, outcome: FetchOutcome, took: Duration) {
        let i = FetchOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.requests[i].inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Sets the expiry gauge.
    pub fn set_expiry(&self, at: SystemTime) {
        let secs = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.expiry.set(secs as i64);
    }

    /// Sets the consecutive-failures gauge.
    pub fn set_consecutive_failures(&self, n: u32) {
        self.failures.set(i64::from(n));
    }

    /// The same handles with the expiry and failure gauges registered nowhere: for per-subject
    /// sources, whose token requests count in the route's counters but whose tokens must not
    /// move the route's own token gauges.
    pub fn without_gauges(mut self) -> Self {
        self.expiry = IntGauge::new("detached_expiry", "detached").expect("static metric");
        self.failures = IntGauge::new("detached_failures", "detached").expect("static metric");
        self
    }

    /// Handles registered nowhere, for tools (`tokengate token`) and tests that need no export.
    pub fn detached() -> Self {
        Metrics::new().token("detached")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"))
    }

    /// Durations observed on several threads, and through handles created twice for one route
    /// (as a reload does), add up in one series; buckets are cumulative and `le` inclusive.
    #[test]
    fn request_metrics_from_every_thread_add_up() {
        let m = Metrics::new();
        let first = m.route("a");
        let again = m.route("a");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        first.request(200, Duration::from_micros(500));
                        again.request(200, Duration::from_millis(3));
                    }
                });
            }
        });
        m.route("b").request(502, Duration::from_secs(60));
        // No response at all: its own code, not a real status.
        m.route("b").request(0, Duration::from_millis(1));
        let text = String::from_utf8(m.encode().0).unwrap();
        let bucket = |route: &str, le: &str| {
            line(
                &text,
                &format!(
                    "tokengate_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}} "
                ),
            )
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
        };
        assert_eq!(bucket("a", "0.0005"), "4000");
        assert_eq!(bucket("a", "0.0025"), "4000");
        assert_eq!(bucket("a", "0.005"), "8000");
        assert_eq!(bucket("a", "+Inf"), "8000");
        assert_eq!(bucket("b", "30"), "1");
        assert_eq!(bucket("b", "+Inf"), "2");
        for (code, n) in [("0", 1), ("502", 1)] {
            let l = format!("tokengate_requests_total{{code=\"{code}\",route=\"b\"}}");
            assert_eq!(line(&text, &l), format!("{l} {n}"));
        }
        assert!(!text.contains("code=\"100\""), "{text}");
        assert_eq!(
            line(
                &text,
                "tokengate_request_duration_seconds_count{route=\"a\"}"
            ),
            "tokengate_request_duration_seconds_count{route=\"a\"} 8000"
        );
        assert_eq!(
            line(&text, "tokengate_request_duration_seconds_sum{route=\"a\"}"),
            "tokengate_request_duration_seconds_sum{route=\"a\"} 14"
        );
        assert_eq!(
            line(&text, "# TYPE tokengate_request_duration_seconds"),
            "# TYPE tokengate_request_duration_seconds histogram"
        );
        assert_eq!(
            line(&text, "tokengate_requests_total{code=\"200\",route=\"a\"}"),
            "tokengate_requests_total{code=\"200\",route=\"a\"} 8000"
        );
    }
}
