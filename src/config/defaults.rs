//! Defaults and bounds of the config keys (docs/configuration.md): what a key means when the
//! file leaves it out, and the limits validation holds values to.

use std::time::Duration;

/// Default `server.listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default `server.admin_listen`.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Default `server.allowed_clients`: loopback only.
pub const DEFAULT_ALLOWED_CLIENTS: &[&str] = &["127.0.0.0/8", "::1/128"];
/// Default `server.token_clients`: loopback only.
pub const DEFAULT_TOKEN_CLIENTS: &[&str] = &["127.0.0.0/8", "::1/128"];
/// Default `routes.subjects.max_cached`: per-subject tokens kept per route.
pub const DEFAULT_MAX_CACHED_SUBJECTS: usize = 10_000;
/// Default `server.grace_period`.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// Largest `server.grace_period`: a drain longer than an hour only delays a restart.
pub const MAX_GRACE_PERIOD: Duration = Duration::from_secs(3600);
/// Default `server.shutdown_delay`: long enough for Kubernetes to take the pod out of its
/// Service endpoints after the readiness probe fails.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);
/// Largest `server.shutdown_delay`.
pub const MAX_SHUTDOWN_DELAY: Duration = Duration::from_secs(600);
/// Largest `routes.connect_timeout`.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest `routes.read_timeout`.
pub const MAX_READ_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest `routes.auth.token_timeout`.
pub const MAX_TOKEN_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest `routes.auth.default_token_lifetime`.
pub const MAX_DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default `server.replay_body_limit` (64 KiB).
pub const DEFAULT_REPLAY_BODY_LIMIT: usize = 64 * 1024;
/// Largest `server.replay_body_limit`, bytes: pingora-proxy keeps at most this much of a
/// request body for a retry, so a larger limit could not take effect.
pub const MAX_REPLAY_BODY_LIMIT: usize = crate::proxy::RETRY_BUFFER_LIMIT;
/// Default `server.max_request_head`: nginx's `large_client_header_buffers` line size.
pub const DEFAULT_MAX_REQUEST_HEAD: usize = 32 * 1024;
/// Smallest `server.max_request_head`: room for a request line and a few fields.
pub const MIN_MAX_REQUEST_HEAD: usize = 1024;
/// Largest `server.max_request_head`: pingora's HTTP/1 server reads at most this much head.
pub const MAX_MAX_REQUEST_HEAD: usize = 1024 * 1024;
/// Default `server.request_head_timeout`.
pub const DEFAULT_REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `server.idle_timeout`: pingora's HTTP/1 keep-alive.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `server.body_timeout`.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `server.send_timeout`.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest `server.request_head_timeout`, `idle_timeout`, `body_timeout` and `send_timeout`:
/// a client stalled longer than an hour is gone.
pub const MAX_CLIENT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Smallest of those timeouts: anything shorter cuts off clients on a slow network.
pub const MIN_CLIENT_TIMEOUT: Duration = Duration::from_millis(100);
/// Default `server.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Largest `server.max_connections`.
pub const MAX_MAX_CONNECTIONS: usize = 1_000_000;
/// Default `routes.connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `routes.read_timeout`.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `routes.auth.assertion_lifetime`.
pub const DEFAULT_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// Upper bound of `routes.auth.assertion_lifetime`: "Drillster: Service accounts" puts `exp`
/// at most one hour ahead.
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// Default `routes.auth.default_token_lifetime`.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// Default `routes.auth.refresh_ratio`.
pub const DEFAULT_REFRESH_RATIO: f64 = 0.8;
/// Default `routes.auth.min_time_left`.
pub const DEFAULT_MIN_TIME_LEFT: Duration = Duration::from_secs(10);
/// Default `routes.auth.token_timeout`.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `cluster.key_prefix`: the start of every Redis key and channel name.
pub const DEFAULT_CLUSTER_KEY_PREFIX: &str = "tokengate";
/// Default `cluster.timeout`: bounds each Redis connect and each command.
pub const DEFAULT_CLUSTER_TIMEOUT: Duration = Duration::from_millis(500);
/// Most `cluster.timeout` may be: a Redis that answers slower than this is treated as down.
pub const MAX_CLUSTER_TIMEOUT: Duration = Duration::from_secs(5);
