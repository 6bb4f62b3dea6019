//! The token listener (`server.token_listen`): per-user access tokens for trusted backends
//! (docs/per-user-tokens.md), e.g. to start Drillster's embedded Player for the signed-in user
//! (`<div class="drl-widget drl-player" drl-token="{access token}">`).
//!
//! `GET /v1/token/{route}?subject={id}` from a client in `server.token_clients`:
//!
//! * 200 `{"access_token", "token_type": "Bearer", "expires_in", "subject"}` (RFC 6749 §5.1
//!   shapes; `expires_in` in seconds), `Cache-Control: no-store`;
//! * 403 `client_not_allowed` for other clients, 403 `subject_not_allowed` for a subject outside
//!   the route's `[routes.subjects]` `allow`, 404 `no_route` for a route without
//!   `[routes.subjects]`, 503 `token_unavailable` with `Retry-After` when no token can be had
//!   (the authorization server refuses the subject, or is failing).
//!
//! Errors are the gateway's JSON errors ([`ErrorResponse`]). The token is in the body only, and
//! never logged.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use ipnet::IpNet;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::proxy::policy::{ErrorResponse, GatewayError};
use crate::proxy::Live;

/// The path prefix of token requests.
pub const TOKEN_PATH: &str = "/v1/token/";

/// The token listener's HTTP application.
pub struct TokenApp {
    live: Arc<Live>,
    clients: Vec<IpNet>,
}

impl TokenApp {
    /// Serves the routes of the gateway's current state (it follows reloads) to clients inside
    /// `clients` (`server.token_clients`).
    pub fn new(live: Arc<Live>, clients: Vec<IpNet>) -> Self {
        TokenApp { live, clients }
    }

    async fn answer(
        &self,
        client: Option<IpAddr>,
        method: &Method,
        path: &str,
        query: Option<&str>,
    ) -> Result<Response<Vec<u8>>, (GatewayError, Option<String>)> {
        let allowed = client.is_some_and(|ip| {
            let ip = ip.to_canonical();
            self.clients.iter().any(|n| n.contains(&ip))
        });
        if !allowed {
            return Err((GatewayError::ClientNotAllowed, None));
        }
        if method != Method::GET {
            return Err((GatewayError::MethodNotAllowed, None));
        }
        let route_name = path
            .strip_prefix(TOKEN_PATH)
            .filter(|r| !r.is_empty() && !r.contains('/'))
            .ok_or((GatewayError::NoRoute, None))?;
        let state = self.live.load();
        let route = state
            .routes
            .iter()
            .find(|r| r.name == route_name)
            .ok_or((GatewayError::NoRoute, None))?;
        let name = Some(route.name.clone());
        let Some(subjects) = route.subjects.as_ref() else {
            return Err((GatewayError::NoRoute, name));
        };
        let subject = query
            .into_iter()
            .flat_map(|q| form_urlencoded::parse(q.as_bytes()))
            .filter(|(k, _)| k == "subject")
            .map(|(_, v)| v.into_owned())
            .collect::<Vec<_>>();
        let [subject] = subject.as_slice() else {
            return Err((GatewayError::SubjectNotAllowed, name));
        };
        let (source, authorization, generation) = match subjects.token(subject, client).await {
            Ok(Some(t)) => t,
            Ok(None) => return Err((GatewayError::SubjectNotAllowed, name)),
            Err(u) => {
                return Err((
                    GatewayError::TokenUnavailable {
                        retry_after: u.retry_after,
                    },
                    name,
                ))
            }
        };
        // The current token when it is the one obtained or a newer one (a renewal may have
        // published one meanwhile): its expiry is known. Else (dropped meanwhile after an
        // upstream 401) the one obtained, with no time promised.
        let now = tokio::time::Instant::now();
        let (authorization, expires_at) = match source
            .current()
            .filter(|t| t.generation >= generation && t.is_usable(now))
        {
            Some(t) => (t.authorization().clone(), Some(t.expires_at_wall)),
            None => (authorization, None),
        };
        let expires_in = expires_at
            .and_then(|e| e.duration_since(SystemTime::now()).ok())
            .map_or(0, |d| d.as_secs());
        let token = authorization
            .to_str()
            .ok()
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or_default();
        let body = json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": expires_in,
            "subject": subject,
        })
        .to_string()
        .into_bytes();
        state.metrics.vended_tokens(&route.name).inc();
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, body.len())
            .header(http::header::CACHE_CONTROL, "no-store")
            .body(body)
            .unwrap_or_else(|_| Response::new(Vec::new())))
    }
}

/// The gateway's JSON error for `err` as an HTTP application response.
fn error_response(err: &GatewayError, route: Option<&str>) -> Response<Vec<u8>> {
    let e = ErrorResponse::new(err, route, None, None);
    let mut b = Response::builder().status(e.status);
    for (name, value) in &e.fields {
        b = b.header(name, value);
    }
    b.body(e.body.to_vec())
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for TokenApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        let query = req.uri.query().map(str::to_string);
        match self.answer(client, &method, &path, query.as_deref()).await {
            Ok(r) => r,
            Err((err, route)) => {
                if let Some(reason) = err.deny_reason() {
                    self.live.load().metrics.denied(reason);
                }
                error_response(&err, route.as_deref())
            }
        }
    }
}
