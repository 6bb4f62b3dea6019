//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/status` (SPEC "Admin endpoints").
//! Nothing here ever shows a secret or a token.

use std::sync::Arc;

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

/// The admin HTTP application.
pub struct AdminApp {
    live: Arc<Live>,
}

impl AdminApp {
    /// An admin app over the gateway's current state (it follows reloads).
    pub fn new(live: Arc<Live>) -> Self {
        AdminApp { live }
    }

    fn readyz(&self) -> (StatusCode, Vec<u8>) {
        let state = self.live.load();
        let not_ready: Vec<&str> = state
            .routes
            .iter()
            .filter(|r| r.token.usable_now(std::time::Instant::now()).is_none())
            .map(|r| r.name.as_str())
            .collect();
        if not_ready.is_empty() {
            (
                StatusCode::OK,
                json!({"ready": true}).to_string().into_bytes(),
            )
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "routes_without_token": not_ready})
                    .to_string()
                    .into_bytes(),
            )
        }
    }

    fn status(&self) -> Vec<u8> {
        let state = self.live.load();
        let routes: Vec<_> = state
            .routes
            .iter()
            .zip(&state.route_info)
            .map(|(r, info)| {
                let s = r.token.status();
                json!({
                    "name": r.name,
                    "upstream": info.upstream,
                    "grant": info.grant,
                    "token_endpoint": info.token_endpoint,
                    "token": {
                        "usable": s.usable,
                        "generation": s.generation,
                        "expires_at": s.token_expires_at.map(unix),
                        "last_refresh": s.last_refresh.map(unix),
                        "consecutive_failures": s.consecutive_failures,
                        "next_attempt_at": s.next_attempt_at.map(unix),
                        "last_error": s.last_error,
                    }
                })
            })
            .collect();
        json!({"version": env!("CARGO_PKG_VERSION"), "routes": routes})
            .to_string()
            .into_bytes()
    }
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
        let req = session.req_header();
        if req.method != Method::GET && req.method != Method::HEAD {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "application/json",
                br#"{"error":"method_not_allowed"}"#.to_vec(),
            );
        }
        match req.uri.path() {
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
                let (status, body) = self.readyz();
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
