//! Requests and responses through the gateway's two proxy paths — the HTTP/1.1 fast path and
//! pingora-proxy's — against real servers on loopback: the request policy, framing, forwarding,
//! routing, streaming, WebSocket upgrades, TLS upstreams and the client allowlist.
//!
//! One test binary, so the gateway, pingora and the shared support in `tests/support/` are
//! linked once for all of them.

#[path = "../support/common.rs"]
mod common;
#[path = "../support/proxy_support.rs"]
mod proxy_support;

mod chunked_framing;
mod client_bounds;
mod fast_path;
mod forwarding;
mod framing;
mod gateway;
mod request_policy;
mod routing;
mod shutdown;
mod streaming;
mod tls_upstream;
mod trusted_network;
mod upstream_dns;
mod websocket;
