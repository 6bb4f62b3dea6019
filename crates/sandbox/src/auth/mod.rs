//! The Drillster-like (RFC 7523) and Driftrock-like (RFC 6749 §4.4) sandbox authorization servers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use jsonwebtoken::DecodingKey;
use serde_json::{json, Value};

use super::client_auth::{decode_basic, BasicDecoding};
use super::faults::{self, Faults};
use super::jwt_bearer::{self, AssertionRejection, RegisteredKey, TimeRules};
use super::keys;
use super::recent::Recent;
use super::registry::{ceil_secs, unix_now, TokenRegistry, TokenRequest};
use super::server::{self, Bound, Handler, HttpServer, Reply, Resp};
use super::token_format::{self, ContentCoding, ResponseFormat};
use super::SandboxError;

mod oauth_error;
mod recorded;

use oauth_error::{no_cache, OAuthError, Params};
use recorded::record;
pub use recorded::RecordedRequest;

/// `grant_type` of the JWT bearer grant (RFC 7523 §2.1).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// RFC 8414 §3 metadata path.
const OAUTH_METADATA_PATH: &str = "/.well-known/oauth-authorization-server";
/// OpenID Connect Discovery 1.0 §4 metadata path (also served, as many vendors do).
const OIDC_METADATA_PATH: &str = "/.well-known/openid-configuration";

/// Token request bodies larger than this get a 400 (an assertion is ~1 KiB).
const MAX_BODY: usize = 1 << 20;

/// Which vendor a sandbox authorization server imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// Drillster service accounts (Drillster: Service accounts): `POST /api/oauth/token` with
    /// the RFC 7523 JWT bearer grant, client authentication by `client_secret_post` (Basic also
    /// accepted).
    Drillster,
    /// Driftrock (Driftrock: Client credentials): `POST /oauth2/token` with the RFC 6749 §4.4
    /// client credentials grant, client authentication by HTTP Basic.
    Driftrock,
}

impl Vendor {
    /// The token endpoint path of the real vendor.
    pub fn token_path(self) -> &'static str {
        match self {
            Vendor::Drillster => "/api/oauth/token",
            Vendor::Driftrock => "/oauth2/token",
        }
    }

    /// The only `grant_type` the vendor's token endpoint accepts.
    pub fn grant_type(self) -> &'static str {
        match self {
            Vendor::Drillster => JWT_BEARER_GRANT,
            Vendor::Driftrock => "client_credentials",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Vendor::Drillster => "drillster",
            Vendor::Driftrock => "driftrock",
        }
    }
}

/// A member of a successful token response (RFC 6749 §5.1) as actually sent, to test how leniently
/// clients parse `expires_in` and `token_type`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum JsonField {
    /// The normal value: `expires_in` = the token lifetime in whole seconds, `token_type` =
    /// `"Bearer"`.
    #[default]
    Normal,
    /// The member is left out.
    Absent,
    /// This JSON text is sent verbatim as the member's value, e.g. `"3600"` (with the quotes),
    /// `0`, `-1`, `9223372036854775807`, `1e308`, `1.5`, `null`. Not validated.
    Raw(String),
}

impl JsonField {
    /// The value sent verbatim as JSON text (see [`JsonField::Raw`]).
    pub fn raw(json: impl Into<String>) -> Self {
        Self::Raw(json.into())
    }

    /// The value sent as a JSON string, e.g. `JsonField::string("3600")` sends `"3600"`.
    pub fn string(value: &str) -> Self {
        Self::Raw(Value::String(value.to_owned()).to_string())
    }
}

/// Builds and starts an [`AuthServer`]; see [`AuthServer::drillster`] and
/// [`AuthServer::driftrock`].
#[must_use = "call .start().await"]
pub struct AuthServerBuilder {
    vendor: Vendor,
    name: Option<String>,
    clients: Vec<(String, String)>,
    keys: Vec<(String, String, String)>,
    demo_key: bool,
    token_lifetime: Duration,
    clock_skew: Duration,
    max_assertion_lifetime: Duration,
    basic_decoding: BasicDecoding,
    allow_basic: bool,
    allow_post: bool,
    registry: Option<TokenRegistry>,
}

impl AuthServerBuilder {
    fn new(vendor: Vendor) -> Self {
        Self {
            vendor,
            name: None,
            clients: Vec::new(),
            keys: Vec::new(),
            demo_key: vendor == Vendor::Drillster,
            token_lifetime: Duration::from_secs(3600),
            clock_skew: Duration::from_secs(5),
            max_assertion_lifetime: Duration::from_secs(3600),
            basic_decoding: BasicDecoding::Form,
            allow_basic: true,
            allow_post: vendor == Vendor::Drillster,
            registry: None,
        }
    }

    /// Registers a client application. May be called repeatedly; the same id twice registers a
    /// second live secret (Drillster: Registering your client application, "Multiple client
    /// secrets may be used at the same time"). If it is never called the vendor's sandbox client
    /// is registered ([`keys::DRILLSTER_CLIENT_ID`] / [`keys::DRIFTROCK_CLIENT_ID`] with their
    /// secrets).
    pub fn client(mut self, id: impl Into<String>, secret: impl Into<String>) -> Self {
        self.clients.push((id.into(), secret.into()));
        self
    }

    /// Registers a service-account public key (SPKI or PKCS#1 PEM) under `kid`; assertions signed
    /// with it must carry `iss` = `service_account_id` (Drillster: Service accounts). The demo
    /// key is registered too unless [`without_demo_key`](Self::without_demo_key) is called.
    pub fn key(
        mut self,
        kid: impl Into<String>,
        service_account_id: impl Into<String>,
        public_pem: impl Into<String>,
    ) -> Self {
        self.keys
            .push((kid.into(), service_account_id.into(), public_pem.into()));
        self
    }

    /// Does not register the demo key ([`keys::DEMO_KEY_ID`]).
    pub fn without_demo_key(mut self) -> Self {
        self.demo_key = false;
        self
    }

    /// Lifetime of issued access tokens (`exp` − `iat` and `expires_in`, rounded up to whole
    /// seconds). Default 3600 s, the value both vendors document. Zero issues expired tokens.
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime;
        self
    }

    /// Clock skew tolerated on assertion `exp`, `iat` and `nbf`. Default 5 s.
    pub fn clock_skew(mut self, skew: Duration) -> Self {
        self.clock_skew = skew;
        self
    }

    /// How far ahead an assertion's `exp` may be (before skew). Default 1 h (Drillster: Service
    /// accounts).
    pub fn max_assertion_lifetime(mut self, max: Duration) -> Self {
        self.max_assertion_lifetime = max;
        self
    }

    /// How Basic client credentials are decoded. Default [`BasicDecoding::Form`] (RFC 6749
    /// §2.3.1).
    pub fn basic_decoding(mut self, mode: BasicDecoding) -> Self {
        self.basic_decoding = mode;
        self
    }

    /// Whether `client_secret_post` (RFC 6749 §2.3.1: `client_id` and `client_secret` in the
    /// body) is accepted. Default: on for Drillster ("Drillster: Service accounts" shows it),
    /// off for Driftrock ("Driftrock: Client credentials" asks for Basic).
    pub fn client_secret_post(mut self, enabled: bool) -> Self {
        self.allow_post = enabled;
        self
    }

    /// Whether `client_secret_basic` is accepted. Default on.
    pub fn client_secret_basic(mut self, enabled: bool) -> Self {
        self.allow_basic = enabled;
        self
    }

    /// Records issued tokens in `registry` (share one registry between servers and the API).
    /// Default: a new registry of its own.
    pub fn registry(mut self, registry: TokenRegistry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The issuer name recorded with each token (default `"drillster"` / `"driftrock"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime.
    ///
    /// # Errors
    /// [`SandboxError::Bind`] if no port can be bound, [`SandboxError::InvalidKey`] if a key given
    /// to [`key`](Self::key) is not an RSA public key PEM.
    pub async fn start(self) -> Result<AuthServer, SandboxError> {
        let vendor = self.vendor;
        let mut keys = HashMap::new();
        let demo = self.demo_key.then(|| {
            (
                keys::DEMO_KEY_ID.to_owned(),
                keys::DEMO_SERVICE_ACCOUNT_ID.to_owned(),
                keys::DEMO_PUBLIC_PEM.to_owned(),
            )
        });
        for (kid, service_account_id, pem) in demo.into_iter().chain(self.keys) {
            let key = DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|source| {
                SandboxError::InvalidKey {
                    kid: kid.clone(),
                    source,
                }
            })?;
            keys.insert(
                kid,
                RegisteredKey {
                    service_account_id,
                    key,
                },
            );
        }
        let mut clients: HashMap<String, Vec<String>> = HashMap::new();
        for (id, secret) in self.clients {
            clients.entry(id).or_default().push(secret);
        }
        if clients.is_empty() {
            let (id, secret) = match vendor {
                Vendor::Drillster => (keys::DRILLSTER_CLIENT_ID, keys::DRILLSTER_CLIENT_SECRET),
                Vendor::Driftrock => (keys::DRIFTROCK_CLIENT_ID, keys::DRIFTROCK_CLIENT_SECRET),
            };
            clients.insert(id.to_owned(), vec![secret.to_owned()]);
        }

        let bound = Bound::new(vendor.name()).await?;
        let base_url = format!("http://{}", bound.addr());
        let state = Arc::new(AuthState {
            vendor,
            name: self.name.unwrap_or_else(|| vendor.name().to_owned()),
            token_endpoint: format!("{base_url}{}", vendor.token_path()),
            base_url,
            clients: Mutex::new(clients),
            keys: Mutex::new(keys),
            clock_skew: self.clock_skew,
            max_assertion_lifetime: self.max_assertion_lifetime,
            allow_basic: self.allow_basic,
            allow_post: self.allow_post,
            registry: self.registry.unwrap_or_default(),
            faults: Faults::default(),
            discovery_faults: Faults::default(),
            settings: Mutex::new(Settings {
                token_lifetime: self.token_lifetime,
                expires_in: JsonField::Normal,
                token_type: JsonField::Normal,
                basic_decoding: self.basic_decoding,
                opaque_tokens: false,
                extra_members: None,
                content_type: None,
                reissue: 0,
                serve_oauth_metadata: true,
                serve_openid_configuration: true,
                metadata_issuer: JsonField::Normal,
                response_format: ResponseFormat::Json,
                content_coding: None,
            }),
            last_token: Mutex::new(None),
            discovery_paths: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            discovery_requests: AtomicU64::new(0),
            recent: Recent::new(),
            used_jti: Mutex::new(HashMap::new()),
            managed_users: Mutex::new(None),
        });
        let server = bound.serve(state.clone());
        Ok(AuthServer { server, state })
    }
}

/// A running sandbox authorization server on `127.0.0.1:<ephemeral>`.
///
/// Serves `POST <token path>` ([`Vendor::token_path`]), and RFC 8414 metadata at
/// `GET /.well-known/oauth-authorization-server` and `GET /.well-known/openid-configuration`
/// (`issuer` = [`issuer`](Self::issuer), `token_endpoint` = [`token_endpoint`](Self::token_endpoint)).
/// Everything else is a 404.
///
/// The token endpoint checks, in this order, each failure answered with an RFC 6749 §5.2 JSON
/// error (`Content-Type: application/json;charset=UTF-8`, `Cache-Control: no-store`,
/// `Pragma: no-cache`):
/// 1. method `POST` (RFC 6749 §3.2) — else 405 `invalid_request` with `Allow: POST`;
/// 2. `Content-Type: application/x-www-form-urlencoded` (RFC 6749 §4.4.2, §2.1 of RFC 7523),
///    no parameter twice (RFC 6749 §3.2; empty values count as absent) — else 400
///    `invalid_request`;
/// 3. client authentication (RFC 6749 §2.3.1): exactly one `Authorization` header if any, Basic
///    decoded per [`BasicDecoding`], or `client_id` + `client_secret` in the body when
///    `client_secret_post` is enabled; not both methods (RFC 6749 §2.3) — else 401
///    `invalid_client` with `WWW-Authenticate: Basic realm="…"` (400 `invalid_request` for two
///    methods or two headers);
/// 4. `grant_type` present (400 `invalid_request`) and the vendor's ([`Vendor::grant_type`];
///    400 `unsupported_grant_type`);
/// 5. Drillster only: the `assertion` (RFC 7523 §3, Drillster: Service accounts; each failure a
///    400 `invalid_grant` whose description is an [`AssertionRejection`]), and `jti` not seen
///    before.
///
/// Success: 200 `{"access_token": <HS256 JWT>, "token_type": "Bearer", "expires_in": <s>}` (plus
/// `scope` if one was requested) with the same headers, the token recorded in
/// [`registry`](Self::registry) for subject `sub` (Drillster) or the client id (Driftrock).
pub struct AuthServer {
    server: HttpServer,
    state: Arc<AuthState>,
}

impl std::fmt::Debug for AuthServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthServer")
            .field("vendor", &self.state.vendor)
            .field("token_endpoint", &self.state.token_endpoint)
            .finish_non_exhaustive()
    }
}

impl AuthServer {
    /// A Drillster-like server (Drillster: Service accounts, RFC 7523 §2.1 + §3).
    pub fn drillster() -> AuthServerBuilder {
        AuthServerBuilder::new(Vendor::Drillster)
    }

    /// A Driftrock-like server (Driftrock: Client credentials, RFC 6749 §4.4).
    pub fn driftrock() -> AuthServerBuilder {
        AuthServerBuilder::new(Vendor::Driftrock)
    }

    /// The vendor imitated.
    pub fn vendor(&self) -> Vendor {
        self.state.vendor
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The issuer identifier, `http://127.0.0.1:PORT` (RFC 8414 §2; no trailing slash).
    pub fn issuer(&self) -> String {
        self.state.base_url.clone()
    }

    /// The full token endpoint URL, e.g. `http://127.0.0.1:PORT/api/oauth/token`; a Drillster
    /// assertion's `aud` must equal it exactly.
    pub fn token_endpoint(&self) -> String {
        self.state.token_endpoint.clone()
    }

    /// The RFC 8414 metadata URL.
    pub fn metadata_url(&self) -> String {
        format!("{}{OAUTH_METADATA_PATH}", self.state.base_url)
    }

    /// The registry the issued tokens are recorded in.
    pub fn registry(&self) -> &TokenRegistry {
        &self.state.registry
    }

    /// Adds a live secret for client `id` (registering the client if it is new); the client's
    /// other secrets stay live (Drillster: Registering your client application).
    pub fn add_client_secret(&self, id: &str, secret: &str) {
        let mut clients = self.state.clients.lock();
        clients
            .entry(id.to_owned())
            .or_default()
            .push(secret.to_owned());
    }

    /// Deletes one secret of client `id`: from now on it is refused (`invalid_client`), while
    /// the access tokens already issued stay valid (Drillster: Registering your client
    /// application, "Deleting a client secret will make it unavailable immediately"). Returns
    /// whether it was live.
    pub fn delete_client_secret(&self, id: &str, secret: &str) -> bool {
        let mut clients = self.state.clients.lock();
        match clients.get_mut(id) {
            Some(live) => {
                let before = live.len();
                live.retain(|s| s != secret);
                live.len() != before
            }
            None => false,
        }
    }

    /// Deletes the service-account key registered under `kid`: assertions it signs are refused
    /// from now on (`invalid_grant`, "unknown kid"); tokens already issued stay valid. Returns
    /// whether it was registered.
    pub fn delete_key(&self, kid: &str) -> bool {
        let mut keys = self.state.keys.lock();
        keys.remove(kid).is_some()
    }

    /// Fault knobs of the token endpoint.
    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// Fault knobs of the two metadata endpoints (separate, so discovery can work while the token
    /// endpoint fails, or the other way round).
    pub fn discovery_faults(&self) -> &Faults {
        &self.state.discovery_faults
    }

    /// Token requests received (whatever became of them).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Token requests answered with a token.
    pub fn successes(&self) -> u64 {
        self.state.successes.load(Ordering::SeqCst)
    }

    /// Token requests answered otherwise: refused, canned response, closed connection. (Hung
    /// requests count in neither.)
    pub fn failures(&self) -> u64 {
        self.state.failures.load(Ordering::SeqCst)
    }

    /// Metadata (discovery) requests received.
    pub fn discovery_requests(&self) -> u64 {
        self.state.discovery_requests.load(Ordering::SeqCst)
    }

    /// The most recent token request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.state.recent.last()
    }

    /// The most recent token requests (up to 64), oldest first.
    pub fn recent_requests(&self) -> Vec<RecordedRequest> {
        self.state.recent.all()
    }

    /// Drillster: from now on issue tokens only for these accounts (the assertion's `sub`: the
    /// service account and the users the organisation manages, "Drillster: Service
    /// accounts"); any other `sub` gets 400 `invalid_grant` (unknown user). `None`: any `sub`.
    pub fn set_managed_users(&self, users: Option<&[&str]>) {
        *self.state.managed_users.lock() = users.map(|u| u.iter().map(|s| s.to_string()).collect());
    }

    /// Changes the lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state.settings().token_lifetime = lifetime;
    }

    /// Overrides the `expires_in` member of successful responses from now on (the token's real
    /// `exp` and registry expiry still follow the token lifetime).
    pub fn set_expires_in(&self, field: JsonField) {
        self.state.settings().expires_in = field;
    }

    /// Overrides the `token_type` member of successful responses from now on.
    pub fn set_token_type(&self, field: JsonField) {
        self.state.settings().token_type = field;
    }

    /// Changes how Basic credentials are decoded from now on.
    pub fn set_basic_decoding(&self, mode: BasicDecoding) {
        self.state.settings().basic_decoding = mode;
    }

    /// From now on issue opaque access tokens (random base64url strings, still recorded in the
    /// registry) instead of JWTs, so a client cannot read an `exp` from the token itself; `false`
    /// goes back to JWTs.
    pub fn set_opaque_tokens(&self, on: bool) {
        self.state.settings().opaque_tokens = on;
    }

    /// Appends these members verbatim to every successful token response from now on, e.g.
    /// `"refresh_token":"r","ext_expires_in":7200` (RFC 6749 §5.1: clients must ignore
    /// unknown members). Not validated, so broken JSON is possible on purpose. `None` stops it.
    pub fn set_extra_members(&self, members: Option<&str>) {
        self.state.settings().extra_members = members.map(str::to_owned);
    }

    /// The `Content-Type` of successful token responses from now on (default
    /// `application/json;charset=UTF-8`), e.g. `application/json; charset=utf-8`. `None` goes back
    /// to the default.
    pub fn set_content_type(&self, content_type: Option<&str>) {
        self.state.settings().content_type = content_type.map(str::to_owned);
    }

    /// The body format of successful token responses from now on (default
    /// [`ResponseFormat::Json`]); [`set_content_type`](Self::set_content_type) still overrides
    /// the `Content-Type`.
    pub fn set_response_format(&self, format: ResponseFormat) {
        self.state.settings().response_format = format;
    }

    /// From now on every answer of the token endpoint (tokens and refusals) is sent in `coding`
    /// whatever the request's `Accept-Encoding` says; `None` sends them unencoded (default).
    pub fn set_content_coding(&self, coding: Option<ContentCoding>) {
        self.state.settings().content_coding = coding;
    }

    /// The next `n` successful token requests are answered with the most recently issued access
    /// token again (with `expires_in` = its remaining lifetime) instead of a new one, as servers
    /// that cache tokens per client do — even when that token has been revoked since. Requests
    /// before any token was issued, or after it expired, get a new one.
    pub fn reissue_next(&self, n: u32) {
        self.state.settings().reissue = n;
    }

    /// Whether `/.well-known/oauth-authorization-server` (RFC 8414) and
    /// `/.well-known/openid-configuration` (OpenID Connect Discovery) are served; a disabled one
    /// answers 404 (still counted in [`discovery_requests`](Self::discovery_requests)). Default:
    /// both served.
    pub fn serve_metadata(&self, oauth_authorization_server: bool, openid_configuration: bool) {
        let mut settings = self.state.settings();
        settings.serve_oauth_metadata = oauth_authorization_server;
        settings.serve_openid_configuration = openid_configuration;
    }

    /// Overrides the `issuer` member of both metadata documents from now on
    /// ([`JsonField::Normal`]: [`issuer`](Self::issuer)); a mismatching issuer must make clients
    /// refuse the document (RFC 8414 §3.3).
    pub fn set_metadata_issuer(&self, field: JsonField) {
        self.state.settings().metadata_issuer = field;
    }

    /// The paths of the metadata (discovery) requests received, oldest first.
    pub fn discovery_paths(&self) -> Vec<String> {
        self.state.discovery_paths.lock().clone()
    }

    /// Handler panics caught so far (each was answered with a 500). Tests may assert it is 0;
    /// dropping the server panics if it is not (unless [`shutdown`](Self::shutdown) reported it).
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

struct Settings {
    token_lifetime: Duration,
    expires_in: JsonField,
    token_type: JsonField,
    basic_decoding: BasicDecoding,
    opaque_tokens: bool,
    extra_members: Option<String>,
    content_type: Option<String>,
    reissue: u32,
    serve_oauth_metadata: bool,
    serve_openid_configuration: bool,
    metadata_issuer: JsonField,
    response_format: ResponseFormat,
    content_coding: Option<ContentCoding>,
}

struct AuthState {
    vendor: Vendor,
    name: String,
    base_url: String,
    token_endpoint: String,
    /// Client id → its live secrets.
    clients: Mutex<HashMap<String, Vec<String>>>,
    keys: Mutex<HashMap<String, RegisteredKey>>,
    clock_skew: Duration,
    max_assertion_lifetime: Duration,
    allow_basic: bool,
    allow_post: bool,
    registry: TokenRegistry,
    faults: Faults,
    discovery_faults: Faults,
    settings: Mutex<Settings>,
    requests: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    discovery_requests: AtomicU64,
    recent: Recent<RecordedRequest>,
    used_jti: Mutex<HashMap<String, f64>>,
    /// Drillster: the accounts tokens may be issued for (`sub`); `None`: any.
    managed_users: Mutex<Option<Vec<String>>>,
    /// The most recently issued access token and its `exp` (for `reissue_next`).
    last_token: Mutex<Option<(String, u64)>>,
    discovery_paths: Mutex<Vec<String>>,
}

impl Handler for AuthState {
    async fn handle(self: Arc<Self>, request: Request<Incoming>, _peer: SocketAddr) -> Reply {
        let path = request.uri().path();
        if path == self.vendor.token_path() {
            self.token_endpoint(request).await
        } else if path == OAUTH_METADATA_PATH || path == OIDC_METADATA_PATH {
            let path = path.to_owned();
            self.metadata(request.method(), &path).await
        } else {
            let body = json!({ "error": "not_found", "path": path });
            Reply::Respond(server::json(StatusCode::NOT_FOUND, &body))
        }
    }
}

impl AuthState {
    fn settings(&self) -> MutexGuard<'_, Settings> {
        self.settings.lock()
    }

    async fn metadata(&self, method: &Method, path: &str) -> Reply {
        self.discovery_requests.fetch_add(1, Ordering::SeqCst);
        self.discovery_paths.lock().push(path.to_owned());
        if let Some(reply) = faults::apply(&self.discovery_faults).await {
            return reply;
        }
        let (served, issuer) = {
            let settings = self.settings();
            let served = if path == OAUTH_METADATA_PATH {
                settings.serve_oauth_metadata
            } else {
                settings.serve_openid_configuration
            };
            (served, settings.metadata_issuer.clone())
        };
        if !served {
            let body = json!({ "error": "not_found", "path": path });
            return Reply::Respond(server::json(StatusCode::NOT_FOUND, &body));
        }
        if method != Method::GET && method != Method::HEAD {
            let mut response = server::json(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({ "error": "method_not_allowed" }),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Reply::Respond(response);
        }
        let mut methods = Vec::new();
        if self.allow_basic {
            methods.push("client_secret_basic");
        }
        if self.allow_post {
            methods.push("client_secret_post");
        }
        // RFC 8414 §2 metadata: issuer and token_endpoint are what clients use.
        let mut metadata = json!({
            "issuer": self.base_url,
            "token_endpoint": self.token_endpoint,
            "grant_types_supported": [self.vendor.grant_type()],
            "token_endpoint_auth_methods_supported": methods,
            "response_types_supported": [],
        });
        match issuer {
            JsonField::Normal => {}
            JsonField::Absent => {
                metadata.as_object_mut().map(|m| m.remove("issuer"));
            }
            JsonField::Raw(raw) => {
                metadata["issuer"] = serde_json::from_str(&raw).unwrap_or(Value::String(raw));
            }
        }
        let mut response = server::json(StatusCode::OK, &metadata);
        response.headers_mut().remove(http::header::CACHE_CONTROL);
        Reply::Respond(response)
    }

    async fn token_endpoint(self: &Arc<Self>, request: Request<Incoming>) -> Reply {
        let (parts, body) = request.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map(|collected| collected.to_bytes());
        let recorded = record(&parts, body.as_ref().ok());
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.recent.push(recorded.clone());
        if let Some(reply) = faults::apply(&self.faults).await {
            if !matches!(reply, Reply::Hang) {
                self.failures.fetch_add(1, Ordering::SeqCst);
            }
            return reply;
        }
        let result = match body {
            Ok(_) => self.grant(&parts, &recorded.params),
            Err(_) => Err(OAuthError::invalid_request(
                "request body unreadable or larger than 1 MiB",
            )),
        };
        let response = match result {
            Ok(response) => {
                self.successes.fetch_add(1, Ordering::SeqCst);
                response
            }
            Err(e) => {
                tracing::debug!(server = %self.name, error = %e, "sandbox token request refused");
                self.failures.fetch_add(1, Ordering::SeqCst);
                e.into_response(&self.name)
            }
        };
        let coding = self.settings().content_coding;
        match coding {
            Some(coding) => Reply::Respond(token_format::encode_response(response, coding).await),
            None => Reply::Respond(response),
        }
    }

    fn grant(&self, parts: &Parts, raw_params: &[(String, String)]) -> Result<Resp, OAuthError> {
        if parts.method != Method::POST {
            return Err(OAuthError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                error: "invalid_request",
                description: "the token endpoint accepts POST only".to_owned(),
            });
        }
        let is_form = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !is_form {
            return Err(OAuthError::invalid_request(
                "Content-Type must be application/x-www-form-urlencoded",
            ));
        }
        let params = Params::new(raw_params)?;
        let client_id = self.authenticate(&parts.headers, &params)?;
        let grant_type = params
            .get("grant_type")
            .ok_or_else(|| OAuthError::invalid_request("missing grant_type"))?;
        if grant_type != self.vendor.grant_type() {
            return Err(OAuthError {
                status: StatusCode::BAD_REQUEST,
                error: "unsupported_grant_type",
                description: format!("grant_type must be {}", self.vendor.grant_type()),
            });
        }
        let subject = match self.vendor {
            Vendor::Drillster => self.check_assertion(&params)?,
            Vendor::Driftrock => client_id.clone(),
        };
        let scope = params.get("scope");
        let mut settings = self.settings();
        let now = unix_now().as_secs();
        let reissued = if settings.reissue > 0 {
            let last = self.last_token.lock().clone();
            last.filter(|(_, exp)| *exp > now)
        } else {
            None
        };
        let (token, lifetime_secs) = match reissued {
            Some((token, exp)) => {
                settings.reissue -= 1;
                (token, exp - now)
            }
            None => {
                let request = TokenRequest {
                    subject: &subject,
                    client_id: &client_id,
                    issuer: &self.name,
                    issuer_url: &self.base_url,
                    scope,
                    lifetime: settings.token_lifetime,
                };
                let (token, exp) = self
                    .registry
                    .issue_as(&request, settings.opaque_tokens)
                    .map_err(|e| OAuthError {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        error: "server_error",
                        description: e.to_string(),
                    })?;
                *self.last_token.lock() = Some((token.clone(), exp));
                (token, ceil_secs(settings.token_lifetime))
            }
        };
        if settings.response_format == ResponseFormat::Form {
            let body = token_format::form_body(
                &token,
                &settings.token_type,
                &settings.expires_in,
                lifetime_secs,
                scope,
            );
            let mut response = token_format::form_response(body);
            if let Some(value) = settings
                .content_type
                .as_deref()
                .and_then(|ct| HeaderValue::from_str(ct).ok())
            {
                response.headers_mut().insert(CONTENT_TYPE, value);
            }
            return Ok(no_cache(response));
        }
        let mut body = format!("{{\"access_token\":{}", Value::String(token));
        match &settings.token_type {
            JsonField::Normal => body.push_str(",\"token_type\":\"Bearer\""),
            JsonField::Absent => {}
            JsonField::Raw(raw) => body.push_str(&format!(",\"token_type\":{raw}")),
        }
        match &settings.expires_in {
            JsonField::Normal => body.push_str(&format!(",\"expires_in\":{lifetime_secs}")),
            JsonField::Absent => {}
            JsonField::Raw(raw) => body.push_str(&format!(",\"expires_in\":{raw}")),
        }
        if let Some(scope) = scope {
            body.push_str(&format!(",\"scope\":{}", Value::String(scope.to_owned())));
        }
        if let Some(extra) = &settings.extra_members {
            body.push(',');
            body.push_str(extra);
        }
        body.push('}');
        let mut response = no_cache(server::raw_json(StatusCode::OK, Bytes::from(body)));
        if let Some(value) = settings
            .content_type
            .as_deref()
            .and_then(|ct| HeaderValue::from_str(ct).ok())
        {
            response.headers_mut().insert(CONTENT_TYPE, value);
        }
        Ok(response)
    }

    /// RFC 6749 §2.3.1 client authentication; returns the authenticated client id.
    fn authenticate(&self, headers: &HeaderMap, params: &Params) -> Result<String, OAuthError> {
        let mut authorization = headers.get_all(AUTHORIZATION).iter();
        let first = authorization.next();
        if authorization.next().is_some() {
            return Err(OAuthError::invalid_request(
                "more than one Authorization header",
            ));
        }
        let (id, secret) = match first {
            Some(value) => {
                let value = value
                    .to_str()
                    .map_err(|_| OAuthError::invalid_client("malformed Authorization header"))?;
                let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
                if !scheme.eq_ignore_ascii_case("basic") {
                    return Err(OAuthError::invalid_client(
                        "unsupported authentication scheme; use Basic",
                    ));
                }
                if !self.allow_basic {
                    return Err(OAuthError::invalid_client(
                        "client_secret_basic is not enabled",
                    ));
                }
                if params.get("client_secret").is_some() {
                    return Err(OAuthError::invalid_request(
                        "more than one client authentication method",
                    ));
                }
                let mode = self.settings().basic_decoding;
                let (id, secret) = decode_basic(credentials, mode)
                    .map_err(|e| OAuthError::invalid_client(e.to_string()))?;
                if params.get("client_id").is_some_and(|p| p != id) {
                    return Err(OAuthError::invalid_client(
                        "client_id parameter does not match the Basic credentials",
                    ));
                }
                (id, secret)
            }
            None => match (params.get("client_id"), params.get("client_secret")) {
                (None, _) => {
                    return Err(OAuthError::invalid_client("no client authentication"));
                }
                (Some(_), None) => return Err(OAuthError::invalid_client("missing client_secret")),
                (Some(_), Some(_)) if !self.allow_post => {
                    return Err(OAuthError::invalid_client(
                        "client_secret_post is not enabled; use HTTP Basic",
                    ));
                }
                (Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
            },
        };
        let clients = self.clients.lock();
        match clients.get(&id) {
            None => Err(OAuthError::invalid_client("unknown client")),
            Some(live) if !live.contains(&secret) => {
                Err(OAuthError::invalid_client("bad client secret"))
            }
            Some(_) => Ok(id),
        }
    }

    /// RFC 7523 §3 checks plus `jti` replay protection; returns the assertion's `sub`.
    fn check_assertion(&self, params: &Params) -> Result<String, OAuthError> {
        let assertion = params
            .get("assertion")
            .ok_or_else(|| OAuthError::invalid_request("missing assertion"))?;
        let now = unix_now().as_secs_f64();
        let skew = self.clock_skew.as_secs_f64();
        let rules = TimeRules {
            now,
            skew,
            max_lifetime: self.max_assertion_lifetime.as_secs_f64(),
        };
        let verified = {
            let keys = self.keys.lock();
            jwt_bearer::verify(assertion, &keys, &self.token_endpoint, rules)
        }
        .map_err(|r| OAuthError::invalid_grant(&r))?;
        if let Some(jti) = verified.jti {
            let mut used = self.used_jti.lock();
            // An expired assertion is refused on exp anyway, so its jti need not be kept.
            used.retain(|_, exp| *exp > now - skew);
            if used.insert(jti, verified.exp).is_some() {
                return Err(OAuthError::invalid_grant(&AssertionRejection::ReusedJti));
            }
        }
        let managed = self.managed_users.lock();
        if let Some(users) = managed.as_ref() {
            if !users.contains(&verified.subject) {
                return Err(OAuthError {
                    status: StatusCode::BAD_REQUEST,
                    error: "invalid_grant",
                    description: "unknown user".into(),
                });
            }
        }
        Ok(verified.subject)
    }
}
