//! The sandbox resource server: an echo API that accepts only tokens from the registry.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::faults::{self, Faults};
use super::recent::Recent;
use super::registry::TokenRegistry;
use super::server::{self, Bound, Handler, HttpServer, Reply};
use super::SandboxError;

/// What the echo API saw of one request. The JSON body of every 200 answer; also recorded (with
/// the 401 status and `error`) for refused requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    /// The status the API answered with (200, or 401 for a refused token).
    pub status: u16,
    /// The request method.
    pub method: String,
    /// The request path exactly as received (no percent-decoding, no slash merging).
    pub path: String,
    /// The raw query string as received, or `null`.
    pub query: Option<String>,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
    /// Headers as `[name, value]` pairs: names lower-case (HTTP/1 names are case-insensitive and
    /// hyper does not expose the received spelling), grouped by name in first-seen order with
    /// repeated values in received order; values lossily decoded as UTF-8.
    pub headers: Vec<(String, String)>,
    /// Body length in bytes (the body is read, and hashed, as it streams).
    pub body_len: u64,
    /// SHA-256 of the body, lower-case hex.
    pub body_sha256: String,
    /// The `sub` of the accepted token.
    pub subject: Option<String>,
    /// The `client_id` of the accepted token.
    pub client_id: Option<String>,
    /// The name of the sandbox server that issued the accepted token.
    pub issuer: Option<String>,
    /// How many `Authorization` headers arrived.
    pub authorization_count: usize,
    /// The TCP peer address of the client.
    pub peer: String,
    /// Why the request was refused (`error_description` of the 401), if it was.
    pub error: Option<String>,
}

impl Echo {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).into_iter().next()
    }

    /// Every value of header `name` (case-insensitive), in received order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A running echo API on `127.0.0.1:<ephemeral>`, standing in for the Drillster and Driftrock REST
/// APIs: any method, any path.
///
/// A request must carry exactly one `Authorization: Bearer <token>` (scheme case-insensitive,
/// RFC 9110 §11.1) whose token is in the [`TokenRegistry`], unexpired and not revoked. Otherwise
/// the answer is 401 with `WWW-Authenticate: Bearer error="invalid_token",
/// error_description="…"` (RFC 6750 §3, §3.1) and a JSON body `{"error": "invalid_token",
/// "error_description": …}`. The body is always read first. Accepted requests get 200 with the
/// [`Echo`] as JSON.
pub struct SandboxApi {
    server: HttpServer,
    state: Arc<ApiState>,
}

impl std::fmt::Debug for SandboxApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxApi")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

struct ApiState {
    registry: TokenRegistry,
    faults: Faults,
    requests: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    recent: Recent<Echo>,
}

impl SandboxApi {
    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime, accepting the tokens
    /// of `registry`.
    ///
    /// # Errors
    /// [`SandboxError::Bind`] if no port can be bound.
    pub async fn start(registry: TokenRegistry) -> Result<Self, SandboxError> {
        let state = Arc::new(ApiState {
            registry,
            faults: Faults::default(),
            requests: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            recent: Recent::new(),
        });
        let server = Bound::new("api").await?.serve(state.clone());
        Ok(Self { server, state })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// `base_url()` + `path_and_query` (which should start with `/`).
    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base_url())
    }

    /// The registry whose tokens are accepted.
    pub fn registry(&self) -> &TokenRegistry {
        &self.state.registry
    }

    /// Fault knobs, applied to every request before the token check (slow, hanging, resetting
    /// or canned upstream, e.g. a 502 HTML page or a redirect).
    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// Requests received (whatever became of them).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Requests answered 200.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Requests answered 401.
    pub fn rejected(&self) -> u64 {
        self.state.rejected.load(Ordering::SeqCst)
    }

    /// The most recent request that reached the token check (accepted or refused).
    pub fn last_echo(&self) -> Option<Echo> {
        self.state.recent.last()
    }

    /// The most recent requests that reached the token check (up to 64), oldest first.
    pub fn recent(&self) -> Vec<Echo> {
        self.state.recent.all()
    }

    /// Handler panics caught so far (each answered with a 500).
    pub fn panics(&self) -> u64 {
        self.server.panics()
    }

    /// Stops the server, closing open connections.
    ///
    /// # Errors
    /// [`SandboxError::HandlerPanicked`] if a handler panicked during the server's life.
    pub async fn shutdown(self) -> Result<(), SandboxError> {
        self.server.shutdown().await
    }
}

impl ApiState {}

impl Handler for ApiState {
    async fn handle(self: Arc<Self>, request: Request<Incoming>, peer: SocketAddr) -> Reply {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if let Some(reply) = faults::apply(&self.faults).await {
            return reply;
        }
        let (parts, mut body) = request.into_parts();
        let mut hasher = Sha256::new();
        let mut body_len = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        hasher.update(data);
                        body_len += data.len() as u64;
                    }
                }
                Err(e) => {
                    let message = format!("request body unreadable: {e}");
                    return Reply::Respond(server::text(StatusCode::BAD_REQUEST, message));
                }
            }
        }
        let authorizations: Vec<&HeaderValue> =
            parts.headers.get_all(AUTHORIZATION).iter().collect();
        let mut echo = Echo {
            status: 200,
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            version: format!("{:?}", parts.version),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), server::lossy(v)))
                .collect(),
            body_len,
            body_sha256: hex(&hasher.finalize()),
            subject: None,
            client_id: None,
            issuer: None,
            authorization_count: authorizations.len(),
            peer: peer.to_string(),
            error: None,
        };
        let verdict = match authorizations.as_slice() {
            [] => Err("no Authorization header".to_owned()),
            [one] => bearer_token(one)
                .ok_or_else(|| "Authorization is not a Bearer token".to_owned())
                .and_then(|token| {
                    self.registry
                        .validate(token)
                        .map_err(|rejection| rejection.to_string())
                }),
            _ => Err("more than one Authorization header".to_owned()),
        };
        let response = match verdict {
            Ok(token) => {
                echo.subject = Some(token.subject);
                echo.client_id = Some(token.client_id);
                echo.issuer = Some(token.issuer);
                self.accepted.fetch_add(1, Ordering::SeqCst);
                server::json(StatusCode::OK, &echo)
            }
            Err(description) => {
                echo.status = 401;
                self.rejected.fetch_add(1, Ordering::SeqCst);
                let body = json!({ "error": "invalid_token", "error_description": description });
                let mut response = server::json(StatusCode::UNAUTHORIZED, &body);
                let challenge =
                    format!("Bearer error=\"invalid_token\", error_description=\"{description}\"");
                let value = HeaderValue::from_str(&challenge)
                    .unwrap_or_else(|_| HeaderValue::from_static("Bearer error=\"invalid_token\""));
                response.headers_mut().insert(WWW_AUTHENTICATE, value);
                echo.error = Some(description);
                response
            }
        };
        self.recent.push(echo);
        Reply::Respond(response)
    }
}

/// The token of `Bearer <token>` (RFC 6750 §2.1), if the value has that form.
fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
