//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/status` (docs/operations.md "Admin
//! endpoints").
//! Nothing here ever shows a secret or a token.

pub mod draining;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::config::{Config, TokenEndpointLocation};
use crate::proxy::Live;

/// Static per-route facts shown by `/status`, kept with the routes they describe
/// (`SharedState::route_info`) so a reload replaces both at once.
pub(crate) struct RouteInfo {
    upstream: String,
    grant: &'static str,
    token_endpoint: String,
}

/// What `/status` shows of each of `config`'s routes besides its token.
pub(crate) fn route_info(config: &Config) -> Vec<RouteInfo> {
    config
        .routes
        .iter()
        .map(|r| RouteInfo {
            upstream: format!(
                "{}://{}{}",
                if r.upstream.tls { "https" } else { "http" },
                r.upstream.authority,
                r.upstream.base_path
            ),
            grant: r.auth.grant.name(),
            token_endpoint: match &r.auth.endpoint {
                TokenEndpointLocation::Url(u) => u.to_string(),
                TokenEndpointLocation::Issuer(u) => format!("discovered from issuer {u}"),
            },
        })
        .collect()
}

/// How long `/readyz` waits for one proxy listener to accept its probe connection.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Whether the proxy listeners accept connections yet.
///
/// pingora binds each service's listeners on that service's own threads, in no order with the
/// admin listener, so `/readyz` can be asked before a proxy port is bound. Until every listener
/// has accepted one probe connection (a TCP connect, closed at once: the gateway sees a client
/// that sent nothing), `/readyz` names the ones that did not. Once all have, the answer is kept:
/// listeners are bound once, at start, and stay bound until shutdown.
pub struct ListenerProbe {
    /// Proxy listener addresses; an unspecified IP (`0.0.0.0`, `::`) is probed on loopback.
    /// Port 0 (a port the kernel picks) cannot be probed and counts as accepting.
    addrs: Vec<SocketAddr>,
    all_accepting: AtomicBool,
}

impl ListenerProbe {
    /// A probe of the proxy listeners at `addrs` (`server.listen` and routes' own `listen`).
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        let addrs = addrs
            .into_iter()
            .filter(|a| a.port() != 0)
            .map(|mut a| {
                if a.ip().is_unspecified() {
                    a.set_ip(match a {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                }
                a
            })
            .collect();
        ListenerProbe {
            addrs,
            all_accepting: AtomicBool::new(false),
        }
    }

    /// The listeners that did not accept a connection within [`PROBE_TIMEOUT`] each; empty once
    /// all have (then without connecting again).
    pub async fn not_accepting(&self) -> Vec<SocketAddr> {
        if self.all_accepting.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut not_accepting = Vec::new();
        for &addr in &self.addrs {
            let connect = tokio::net::TcpStream::connect(addr);
            if !matches!(
                tokio::time::timeout(PROBE_TIMEOUT, connect).await,
                Ok(Ok(_))
            ) {
                not_accepting.push(addr);
            }
        }
        if not_accepting.is_empty() {
            self.all_accepting.store(true, Ordering::Release);
        }
        not_accepting
    }
}

/// The admin HTTP application.
pub struct AdminApp {
    live: Arc<Live>,
    listeners: ListenerProbe,
}

impl AdminApp {
    /// An admin app over the gateway's current state (it follows reloads); `listeners` are the
    /// proxy listener addresses `/readyz` waits for.
    pub fn new(live: Arc<Live>, listeners: Vec<SocketAddr>) -> Self {
        AdminApp {
            live,
            listeners: ListenerProbe::new(listeners),
        }
    }

    /// `/readyz` (docs/operations.md "Admin endpoints"): 200 `{"ready":true}` once every proxy
    /// listener accepts connections and every route has obtained an access token at least once
    /// since start; a later token outage keeps the replica ready (its requests get 503
    /// `token_unavailable` with `Retry-After` from the gateway itself), and
    /// `routes_without_usable_token` names the routes without a usable token now. 503 while
    /// shutting down (`"shutting_down":true`), or with `routes_without_token` (never obtained
    /// one) and `listeners_not_accepting` (addresses) naming what is missing.
    async fn readyz(&self) -> (StatusCode, Vec<u8>) {
        if self.live.drain.draining() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "shutting_down": true})
                    .to_string()
                    .into_bytes(),
            );
        }
        let state = self.live.load();
        let now = tokio::time::Instant::now();
        let mut never: Vec<&str> = Vec::new();
        let mut unusable: Vec<&str> = Vec::new();
        for r in &state.routes {
            if r.token.usable_now(now).is_some() {
                continue;
            }
            if r.token.status().last_refresh.is_none() {
                never.push(&r.name);
            } else {
                unusable.push(&r.name);
            }
        }
        let not_accepting = self.listeners.not_accepting().await;
        let ready = never.is_empty() && not_accepting.is_empty();
        let mut body = json!({"ready": ready});
        if !never.is_empty() {
            body["routes_without_token"] = json!(never);
        }
        if !unusable.is_empty() {
            body["routes_without_usable_token"] = json!(unusable);
        }
        if !not_accepting.is_empty() {
            let addrs: Vec<String> = not_accepting.iter().map(|a| a.to_string()).collect();
            body["listeners_not_accepting"] = json!(addrs);
        }
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, body.to_string().into_bytes())
    }

    fn status(&self) -> Vec<u8> {
        let state = self.live.load();
        let routes: Vec<_> = state
            .routes
            .iter()
            .zip(&state.route_info)
            .map(|(r, info)| {
                let s = r.token.status();
                let mut route = json!({
                    "name": r.name,
                    "upstream": info.upstream,
                    "grant": info.grant,
                    "token_endpoint": info.token_endpoint,
                    "token": {
                        "usable": s.usable,
                        "generation": s.generation,
                        "expires_at": s.token_expires_at.map(unix),
                        "expires_at_rfc3339": s.token_expires_at.map(rfc3339),
                        "last_refresh": s.last_refresh.map(unix),
                        "last_refresh_rfc3339": s.last_refresh.map(rfc3339),
                        "consecutive_failures": s.consecutive_failures,
                        "next_attempt_at": s.next_attempt_at.map(unix),
                        "next_attempt_at_rfc3339": s.next_attempt_at.map(rfc3339),
                        "last_error": s.last_error,
                        "last_error_at": s.last_error_at.map(unix),
                        "last_error_at_rfc3339": s.last_error_at.map(rfc3339),
                    }
                });
                // The upstream name as last resolved (proxy::upstream_dns).
                let dns = r.upstream.resolution();
                route["upstream_dns"] = json!({
                    "resolved": dns.peer.is_some(),
                    "addresses": dns.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "resolved_at": dns.resolved_at.map(unix),
                    "resolved_at_rfc3339": dns.resolved_at.map(rfc3339),
                    "last_error": dns.error,
                    "last_error_at": dns.failed_at.map(unix),
                    "last_error_at_rfc3339": dns.failed_at.map(rfc3339),
                });
                // `[cluster]`: where the token came from and whether the store answers.
                if let Some(fleet) = &s.fleet {
                    route["fleet"] = json!(fleet);
                }
                // Per-user tokens cached (`[routes.subjects]`); never which subjects.
                if let Some(subjects) = &r.subjects {
                    route["subject_tokens"] = json!(subjects.cached());
                }
                route
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "shutting_down": self.live.drain.draining(),
            "routes": routes,
        })
        .to_string()
        .into_bytes()
    }
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `t` as an RFC 3339 UTC timestamp with whole seconds, e.g. `2026-12-03T17:55:17Z`.
fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        if !keeps_alive(session.req_header()) {
            // pingora's HTTP app keeps a connection open for 60 s unless `close` is asked for;
            // an HTTP/1.0 request without `keep-alive` ends it (RFC 9112 §9.3).
            session.set_keepalive(None);
        }
        let req = session.req_header();
        self.answer(&req.method, req.uri.path()).await
    }
}

impl AdminApp {
    /// The answer to `method` on `path`: one of the four endpoints, 404 or 405.
    pub async fn answer(&self, method: &Method, path: &str) -> Response<Vec<u8>> {
        if method != Method::GET && method != Method::HEAD {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "application/json",
                br#"{"error":"method_not_allowed"}"#.to_vec(),
            );
        }
        match path {
            "/metrics" => {
                let (body, ct) = self.live.load().metrics.encode();
                respond(StatusCode::OK, &ct, body)
            }
            "/healthz" => respond(
                StatusCode::OK,
                "application/json",
                br#"{"ok":true}"#.to_vec(),
            ),
            "/readyz" => {
                let (status, body) = self.readyz().await;
                respond(status, "application/json", body)
            }
            "/status" => respond(StatusCode::OK, "application/json", self.status()),
            _ => respond(
                StatusCode::NOT_FOUND,
                "application/json",
                br#"{"error":"not_found","paths":["/metrics","/healthz","/readyz","/status"]}"#
                    .to_vec(),
            ),
        }
    }
}

/// Whether the client wants its connection kept after `req` (RFC 9112 §9.3): HTTP/1.1 unless
/// `Connection` names `close`, HTTP/1.0 only when it names `keep-alive`.
fn keeps_alive(req: &pingora::http::RequestHeader) -> bool {
    let named = |option: &str| {
        req.headers
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(|v| crate::proxy::policy::list(v.as_bytes()))
            .any(|o| o.eq_ignore_ascii_case(option.as_bytes()))
    };
    if req.version >= http::Version::HTTP_11 {
        !named("close")
    } else {
        named("keep-alive")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address nothing listens on: a port the kernel just handed out, released again.
    fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn names_a_listener_until_it_accepts_then_keeps_the_answer() {
        let bound = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bound_addr = bound.local_addr().unwrap();
        let later = free_addr();
        let probe = ListenerProbe::new(vec![bound_addr, later]);

        assert_eq!(probe.not_accepting().await, vec![later]);
        assert_eq!(probe.not_accepting().await, vec![later]);

        let now_bound = tokio::net::TcpListener::bind(later).await.unwrap();
        assert_eq!(probe.not_accepting().await, Vec::<SocketAddr>::new());
        // Bound once, bound until shutdown: no more probe connections after that.
        drop((bound, now_bound));
        assert_eq!(probe.not_accepting().await, Vec::<SocketAddr>::new());
    }

    #[tokio::test]
    async fn probes_an_unspecified_address_on_loopback_and_skips_port_0() {
        let l = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let probe = ListenerProbe::new(vec![
            SocketAddr::from(([0, 0, 0, 0], port)),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        ]);
        assert_eq!(probe.addrs, vec![SocketAddr::from(([127, 0, 0, 1], port))]);
        assert!(probe.not_accepting().await.is_empty());

        drop(l);
        let gone = ListenerProbe::new(vec![SocketAddr::from(([0, 0, 0, 0], port))]);
        assert_eq!(
            gone.not_accepting().await,
            vec![SocketAddr::from(([127, 0, 0, 1], port))]
        );
    }
}
