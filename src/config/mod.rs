//! Configuration: the TOML file layer and the validated internal model.
//!
//! The file layer (`file.rs`, serde structs) is the stable user interface described in
//! docs/configuration.md; the types in this module are what the rest of the crate sees.
//! [`Config::load`] reads a file, expands `${VAR}` and `*_file` secrets, reads key files and
//! validates every key, reporting all problems at once ([`ConfigErrors`]).
//!
//! | module | concern |
//! | --- | --- |
//! | `load.rs` | the pipeline: [`Config::load`], [`Config::from_toml_str`] |
//! | `file.rs` | serde structs mirroring the file's keys |
//! | `expand.rs` | `${VAR}` expansion |
//! | `deserialize.rs` | tree → file structs: unknown keys, wrong types, table shapes |
//! | `diagnostics.rs` | key paths, lines, "did you mean", message wording |
//! | `validate/` | one module per section: server and log, routes, upstream, auth, secrets |
//! | `defaults.rs` | defaults and bounds of the keys |
//! | `error.rs` | [`ConfigError`], [`ConfigErrors`] |

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use url::Url;

use crate::oauth::key_file::ServiceAccountKey;

mod defaults;
mod deserialize;
mod diagnostics;
mod error;
mod expand;
mod file;
mod load;
#[cfg(test)]
mod test_support;
mod validate;
mod warnings;

pub use error::{ConfigError, ConfigErrors};
pub use warnings::warnings;

/// A secret string (client secret). `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for building a token request. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The validated configuration. Every value here has been checked; nothing downstream needs to
/// re-validate it.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from (for messages and SIGHUP reload).
    pub source: Option<PathBuf>,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[[routes]]`, in file order. Names are unique.
    pub routes: Vec<RouteConfig>,
    /// `[cluster]`: tokens shared with other gateways through Redis (docs/fleet.md). `None`:
    /// this gateway works alone.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: where the fleet's shared tokens live and how they are sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis`: a `redis://` or `rediss://` (TLS) URL, password included. Never log it; use
    /// [`ClusterConfig::redis_display`].
    pub redis: Secret,
    /// The URL with any password replaced by `***`, for logs and `/status`.
    pub redis_display: String,
    /// `key_prefix`: the start of every key and channel name. Default `tokengate`.
    pub key_prefix: String,
    /// `encryption_key_file`'s 32 bytes: the AES-256-GCM key of the stored tokens.
    pub encryption_key: ClusterKey,
    /// `timeout`: bounds each Redis connect and command. Default 500 ms.
    pub timeout: Duration,
}

/// A 32-byte AES-256 key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(pub [u8; 32]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey([redacted])")
    }
}

/// `[server]`: listeners, client allowlist and process-wide knobs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Shared proxy listeners (`listen`, a string or an array). May be empty when every route
    /// has a listener of its own.
    pub listen: Vec<SocketAddr>,
    /// The admin listener: `/metrics`, `/healthz`, `/readyz`, `/status`.
    pub admin_listen: SocketAddr,
    /// CIDRs whose clients may use the proxy. Default: `127.0.0.0/8` and `::1/128`.
    pub allowed_clients: Vec<IpNet>,
    /// Proxy worker threads. Default: number of CPUs.
    pub threads: usize,
    /// How long in-flight requests may drain after SIGTERM/SIGINT, once the listeners stopped
    /// accepting. Default 10 s, at most 1 h.
    pub grace_period: Duration,
    /// How long the listeners keep accepting and serving after SIGTERM/SIGINT while `/readyz`
    /// answers 503, so load balancers stop sending first. Default 5 s, at most 10 min.
    pub shutdown_delay: Duration,
    /// CIDRs of load balancers whose `X-Forwarded-For` names the client
    /// (docs/proxy-behaviour.md "Client address"). Default: none.
    pub trusted_proxies: Vec<IpNet>,
    /// A hosts(5)-format file upstream names are resolved from instead of the system
    /// resolver, re-read at each resolution (docs/proxy-behaviour.md "Upstream addresses").
    /// `None`: the system resolver.
    pub hosts_file: Option<PathBuf>,
    /// Request bodies up to this many bytes are kept for one replay after an upstream 401.
    /// Default 64 KiB.
    pub replay_body_limit: usize,
    /// Bounds on what one client connection may hold and how long it may stall.
    pub limits: ClientLimits,
    /// The token listener for trusted backends: `GET /v1/token/{route}?subject={id}` hands out
    /// per-user tokens (docs/per-user-tokens.md). `None`: no such listener.
    pub token_listen: Option<SocketAddr>,
    /// CIDRs whose clients may use the token listener. Default: `127.0.0.0/8` and `::1/128`.
    pub token_clients: Vec<IpNet>,
}

/// Bounds on client connections to the proxy listeners (docs/configuration.md "[server]"), so
/// slow, huge or idle clients cannot hold the gateway's memory or connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Largest request head (request line and fields), bytes; a larger one gets 431
    /// (RFC 6585 §5). Default 32 KiB.
    pub max_request_head: usize,
    /// How long a request head may take from its first byte, however it trickles; then 408
    /// and the connection is closed. Default 10 s.
    pub request_head_timeout: Duration,
    /// How long a client connection may sit between requests (or before its first one)
    /// before it is closed. Default 60 s.
    pub idle_timeout: Duration,
    /// How long a request body may make no progress: 408, or a close once the response has
    /// started. Default 60 s.
    pub body_timeout: Duration,
    /// How long a response write to the client may make no progress before the client and
    /// upstream connections are closed. Default 60 s.
    pub send_timeout: Duration,
    /// Client connections open at once over all proxy listeners; more are refused
    /// (closed at accept). Default 10,000.
    pub max_connections: usize,
}

impl ClientLimits {
    /// The default `max_request_head`, bytes.
    pub const DEFAULT_MAX_REQUEST_HEAD: usize = defaults::DEFAULT_MAX_REQUEST_HEAD;
}

impl Default for ClientLimits {
    fn default() -> Self {
        use defaults::*;
        ClientLimits {
            max_request_head: DEFAULT_MAX_REQUEST_HEAD,
            request_head_timeout: DEFAULT_REQUEST_HEAD_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Text (human) or JSON lines.
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info` or `info,tokengate::access=debug`.
    /// Validated at load.
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Unique, `[a-z0-9_-]+`; used as the metric label.
    pub name: String,
    /// Starts with `/`. Matched on path-segment boundaries; the longest match wins. Default `/`.
    pub path_prefix: String,
    /// Match the `Host` header too (lower-case, without port).
    pub host: Option<String>,
    /// A listener of the route's own; it then matches every request on that listener.
    pub listen: Option<SocketAddr>,
    /// Remove `path_prefix` before forwarding.
    pub strip_prefix: bool,
    /// Where requests go.
    pub upstream: Upstream,
    /// TCP (and TLS) connect timeout to the upstream. Default 5 s.
    pub connect_timeout: Duration,
    /// Timeout for each read from the upstream. Default 60 s.
    pub read_timeout: Duration,
    /// Forward the `Cookie` header (an inbound credential, stripped by default).
    pub forward_cookies: bool,
    /// Allowed request methods; `None` allows every method.
    pub allow_methods: Option<Vec<http::Method>>,
    /// Extra trust roots (PEM) for this route's upstream and token endpoint.
    pub ca_file: Option<PathBuf>,
    /// More inbound credential headers to remove (lower-case).
    pub strip_headers: Vec<http::HeaderName>,
    /// `[routes.auth]`.
    pub auth: AuthConfig,
    /// `[routes.subjects]` (`jwt_bearer` routes only): per-user tokens.
    pub subjects: Option<SubjectsConfig>,
}

/// Longest subject accepted, in bytes.
pub const MAX_SUBJECT_LEN: usize = 256;

/// Whether `subject` is made only of what a Drillster user id, an e-mail address or a
/// third-party id uses (`A-Z a-z 0-9 . _ @ + -`), 1 to [`MAX_SUBJECT_LEN`] bytes. Anything
/// else is refused before any `allow` pattern runs.
pub fn subject_chars_ok(subject: &[u8]) -> bool {
    !subject.is_empty()
        && subject.len() <= MAX_SUBJECT_LEN
        && subject
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'+' | b'-'))
}

/// `[routes.subjects]`: which managed users (the assertion's `sub`, RFC 7523 §3; "Drillster:
/// Service accounts": a user id, an e-mail address or a third-party id) the route may obtain
/// tokens for, and who may ask.
#[derive(Debug, Clone)]
pub struct SubjectsConfig {
    /// The `allow` patterns as written (for messages and reload comparisons).
    pub allow_patterns: Vec<String>,
    /// The `allow` patterns, each anchored as `^(?:…)$`: a subject is allowed when one
    /// matches it whole.
    pub allow: regex::RegexSet,
    /// The request field naming the subject on the proxy listener; `None`: only the token
    /// listener hands out per-user tokens.
    pub header: Option<http::HeaderName>,
    /// Clients trusted to send `header`; within `server.allowed_clients`.
    pub header_clients: Vec<IpNet>,
    /// Per-subject tokens kept (least recently used evicted). Default 10,000.
    pub max_cached: usize,
}

impl SubjectsConfig {
    /// Whether `subject` may have a token: its characters pass [`subject_chars_ok`] and one
    /// `allow` pattern matches it whole.
    pub fn allows(&self, subject: &[u8]) -> bool {
        subject_chars_ok(subject)
            && std::str::from_utf8(subject).is_ok_and(|s| self.allow.is_match(s))
    }

    /// Whether the client at `ip` may name a subject with `header`.
    pub fn header_client(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.header_clients.iter().any(|n| n.contains(&ip))
    }
}

/// A parsed `upstream` URL: scheme, host, optional port and base path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `true` for `https`.
    pub tls: bool,
    /// Host name or IP literal (without brackets), used for DNS, TLS SNI and certificate checks.
    pub host: String,
    /// Port; defaults to 443/80 by scheme.
    pub port: u16,
    /// The `Host` header value sent upstream: host, plus `:port` when not the scheme default.
    pub authority: String,
    /// Base path without a trailing slash: `""` for `https://h` or `https://h/`, `/v1` for
    /// `https://h/v1/`.
    pub base_path: String,
}

/// `[routes.auth]`: how this route obtains its access token. Equal values (secrets and the
/// key by digest included) mean a config reload keeps the route's token source and its token.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    /// The grant and its grant-specific settings.
    pub grant: Grant,
    /// Where the token endpoint is.
    pub endpoint: TokenEndpointLocation,
    /// RFC 6749 §2.2 client identifier.
    pub client_id: String,
    /// RFC 6749 §2.3.1 client secret. Required for `client_credentials`; optional for
    /// `jwt_bearer` (Drillster requires it).
    pub client_secret: Option<Secret>,
    /// How the client authenticates at the token endpoint.
    pub client_auth: ClientAuth,
    /// `scope` token request parameter (RFC 6749 §3.3).
    pub scope: Option<String>,
    /// `jwt_bearer`: the assertion's `aud` (default: the token endpoint URL, exactly).
    /// `client_credentials`: the `audience` token request parameter.
    pub audience: Option<String>,
    /// Used when `expires_in` is absent and the token is not a JWT with `exp`. Default 5 min.
    pub default_token_lifetime: Duration,
    /// Renew at this fraction of the lifetime, in (0, 1). Default 0.8.
    pub refresh_ratio: f64,
    /// A token with less than this left is never sent. Default 10 s.
    pub min_time_left: Duration,
    /// Total time one token request may take (discovery included, connect included); also
    /// bounds how long a request waits for a token. Default 10 s.
    pub token_timeout: Duration,
}

/// The token endpoint, given directly or found by discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEndpointLocation {
    /// `token_endpoint = "https://…"`.
    Url(Url),
    /// `issuer = "https://…"`: RFC 8414 discovery.
    Issuer(Url),
}

/// Grant-specific settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    /// RFC 7523 §2.1 JWT bearer grant (Drillster: Service accounts).
    JwtBearer {
        /// The service account key file, parsed.
        key: ServiceAccountKey,
        /// Path of the key file (for messages).
        key_file: PathBuf,
        /// The assertion's `sub`; default the key file's `serviceAccountId`.
        subject: String,
        /// The assertion's `exp - iat`. Default 5 min, at most 1 h.
        assertion_lifetime: Duration,
    },
    /// RFC 6749 §4.4 client credentials grant (Driftrock: Client credentials).
    ClientCredentials {
        /// `resource` token request parameter (RFC 8707).
        resource: Option<String>,
    },
}

impl Grant {
    /// The `grant` key's value: `jwt_bearer` or `client_credentials`.
    pub fn name(&self) -> &'static str {
        match self {
            Grant::JwtBearer { .. } => "jwt_bearer",
            Grant::ClientCredentials { .. } => "client_credentials",
        }
    }
}

/// RFC 6749 §2.3 client authentication at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `Authorization: Basic` (RFC 6749 §2.3.1).
    Basic(BasicEncoding),
    /// `client_id` and `client_secret` in the form body.
    Post,
}

/// How client id and secret are encoded before base64 in `client_secret_basic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasicEncoding {
    /// RFC 6749 §2.3.1: `application/x-www-form-urlencoded` each part first (default).
    Form,
    /// RFC 7617 as-is, for servers that compare raw values.
    Raw,
}
