//! Routes compiled for the request path, and the per-listener route table.
//!
//! Matching (docs/proxy-behaviour.md "Routing"): a route's own `listen`, else `host`, else the
//! longest `path_prefix` on a path-segment boundary. Lookup is one hash probe per path segment,
//! whatever the number of routes.

use std::collections::HashMap;
use std::sync::Arc;

/// The route maps' hasher: foldhash, several times faster than the default SipHash on short
/// paths. Flooding is no concern: the keys come from the config, requests only look up.
type Map<V> = HashMap<String, V, foldhash::fast::RandomState>;
/// Path prefixes as bytes: the fast path looks them up in the request's bytes as received.
type PrefixKeys<V> = HashMap<Vec<u8>, V, foldhash::fast::RandomState>;

use http::{HeaderName, HeaderValue, Method};

use crate::config::RouteConfig;
use crate::metrics::RouteMetrics;
use crate::token::TokenSource;

/// A route, with everything the request path needs precomputed.
pub struct Route {
    /// Position in the config (`routes[i]`).
    pub index: usize,
    /// Route name (metric label, error bodies).
    pub name: String,
    /// Normalised `path_prefix` (no trailing `/` unless `/`).
    pub prefix: String,
    /// Remove `prefix` before forwarding.
    pub strip_prefix: bool,
    /// Upstream base path without trailing `/`.
    pub base_path: String,
    /// The upstream: the peer new connections use (address, TLS, SNI, timeouts, trust
    /// roots), its name re-resolved in the background (`proxy::upstream_dns`).
    pub upstream: Arc<crate::proxy::upstream_dns::UpstreamAddress>,
    /// `Host` sent upstream.
    pub host_header: HeaderValue,
    /// Allowed methods (`None`: all but TRACE and CONNECT).
    pub allow_methods: Option<Vec<Method>>,
    /// `Allow` header value for 405 answers (RFC 9110 §15.5.6).
    pub allow_header: Option<HeaderValue>,
    /// Extra credential headers to remove.
    pub strip_headers: Vec<HeaderName>,
    /// `strip_headers` folded for the policy's comparison (case and `_`/`-` alike).
    pub strip_folded: crate::proxy::policy::fields::FoldedNames,
    /// Forward `Cookie`.
    pub forward_cookies: bool,
    /// Where the access token comes from.
    pub token: Arc<TokenSource>,
    /// `[routes.subjects]`: per-user tokens (docs/per-user-tokens.md).
    pub subjects: Option<Arc<crate::token::subjects::SubjectTokens>>,
    /// `[routes.subjects]` `header`, folded as [`crate::proxy::policy::fields::fold_name`]
    /// folds it (also in `strip_folded`: the field never reaches the upstream). `None`: the
    /// route reads no subject from requests, and no request pays for looking.
    pub subject_header: Option<Box<[u8]>>,
    /// Request-path metric handles.
    pub metrics: RouteMetrics,
}

impl Route {
    /// Whether `method` is allowed on this route: one of `allow_methods`, or without that
    /// list any method but TRACE (an upstream echoing it would hand the client the gateway's
    /// token, RFC 9110 §9.3.8) and CONNECT (a tunnel, not an API call).
    #[inline]
    pub fn allows(&self, method: &Method) -> bool {
        match &self.allow_methods {
            // Any letter case: a method is case-sensitive (RFC 9110 §9.1), but some servers
            // read `trace` as TRACE.
            None => {
                let m = method.as_str();
                !m.eq_ignore_ascii_case("TRACE") && !m.eq_ignore_ascii_case("CONNECT")
            }
            Some(list) => list.iter().any(|m| m == method),
        }
    }

    /// The `Allow` value of a route without `allow_methods`.
    pub const DEFAULT_ALLOW: &'static str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH";
}

/// Normalises a configured prefix: leading `/`, no trailing `/` (except the root).
pub fn normalise_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_string()
    } else if trimmed.starts_with('/') {
        trimmed.to_string()
    } else {
        format!("/{trimmed}")
    }
}

/// Prefix → route index for one host (or for any host).
#[derive(Default, Debug, Clone)]
struct PrefixMap {
    exact: PrefixKeys<usize>,
    /// `has_len[n]`: some key is `n` bytes long. A candidate of another length is not
    /// hashed at all: most of a long path's candidates are skipped this way.
    has_len: Vec<bool>,
}

impl PrefixMap {
    fn insert(&mut self, prefix: String, index: usize) {
        let len = prefix.len();
        if self.has_len.len() <= len {
            self.has_len.resize(len + 1, false);
        }
        self.has_len[len] = true;
        self.exact.entry(prefix.into_bytes()).or_insert(index);
    }

    /// Longest prefix of `path` on a segment boundary that is a key.
    #[inline]
    fn lookup(&self, path: &[u8]) -> Option<usize> {
        if self.exact.is_empty() {
            return None;
        }
        let mut end = path.len();
        loop {
            let candidate: &[u8] = if end == 0 { b"/" } else { &path[..end] };
            if self.has_len.get(candidate.len()) == Some(&true) {
                if let Some(&i) = self.exact.get(candidate) {
                    return Some(i);
                }
            }
            if end == 0 {
                return None;
            }
            // Next shorter candidate: up to (not including) the previous '/'.
            end = path[..end].iter().rposition(|&b| b == b'/').unwrap_or(0);
        }
    }
}

/// The routes one listener serves.
#[derive(Default, Debug, Clone)]
pub struct RouteTable {
    /// A route with its own listener matches everything there.
    own: Option<usize>,
    by_host: Map<PrefixMap>,
    any_host: PrefixMap,
}

impl RouteTable {
    /// A table for a route's own listener.
    pub fn own(index: usize) -> Self {
        RouteTable {
            own: Some(index),
            ..Default::default()
        }
    }

    /// A table of shared-listener routes: `(index, config)` of each route without a listener
    /// of its own. Config validation has rejected duplicate host+prefix pairs; if one slipped
    /// through, the first route wins.
    pub fn shared<'a>(routes: impl IntoIterator<Item = (usize, &'a RouteConfig)>) -> Self {
        let mut t = RouteTable::default();
        for (i, r) in routes {
            let map = match &r.host {
                Some(h) => t.by_host.entry(h.to_ascii_lowercase()).or_default(),
                None => &mut t.any_host,
            };
            map.insert(normalise_prefix(&r.path_prefix), i);
        }
        t
    }

    /// The route for a request: `host` is the `Host` header (any case, port allowed), `path`
    /// the request path without query (`&str` or the bytes as received).
    #[inline]
    pub fn lookup(&self, host: Option<&[u8]>, path: impl AsRef<[u8]>) -> Option<usize> {
        let path = path.as_ref();
        if let Some(i) = self.own {
            return Some(i);
        }
        if !self.by_host.is_empty() {
            if let Some(map) = host.and_then(|h| self.host_map(h)) {
                if let Some(i) = map.lookup(path) {
                    return Some(i);
                }
            }
        }
        self.any_host.lookup(path)
    }

    fn host_map(&self, host: &[u8]) -> Option<&PrefixMap> {
        let host = std::str::from_utf8(host).ok()?;
        let name = strip_port(host);
        if let Some(m) = self.by_host.get(name) {
            return Some(m);
        }
        self.by_host.get(&name.to_ascii_lowercase())
    }
}

/// `host:port` → `host`; `[v6]:port` → `v6`.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(Option<&str>, &str)]) -> RouteTable {
        let mut t = RouteTable::default();
        for (i, (host, prefix)) in entries.iter().enumerate() {
            let map = match host {
                Some(h) => t.by_host.entry(h.to_string()).or_default(),
                None => &mut t.any_host,
            };
            map.insert(normalise_prefix(prefix), i);
        }
        t
    }

    #[test]
    fn longest_prefix_on_segment_boundary_wins() {
        let t = table(&[(None, "/"), (None, "/api"), (None, "/api/v2/")]);
        assert_eq!(t.lookup(None, "/"), Some(0));
        assert_eq!(t.lookup(None, "/apix"), Some(0));
        assert_eq!(t.lookup(None, "/api"), Some(1));
        assert_eq!(t.lookup(None, "/api/"), Some(1));
        assert_eq!(t.lookup(None, "/api/v1/x"), Some(1));
        assert_eq!(t.lookup(None, "/api/v2"), Some(2));
        assert_eq!(t.lookup(None, "/api/v2/users/7"), Some(2));
    }

    #[test]
    fn no_root_route_means_no_match() {
        let t = table(&[(None, "/driftrock")]);
        assert_eq!(t.lookup(None, "/other"), None);
        assert_eq!(t.lookup(None, "/driftrock/v2/event"), Some(0));
    }

    #[test]
    fn host_routes_first_then_any_host() {
        let t = table(&[(Some("drillster.internal"), "/"), (None, "/")]);
        assert_eq!(t.lookup(Some(b"drillster.internal"), "/x"), Some(0));
        assert_eq!(t.lookup(Some(b"Drillster.Internal:8080"), "/x"), Some(0));
        assert_eq!(t.lookup(Some(b"other"), "/x"), Some(1));
        assert_eq!(t.lookup(None, "/x"), Some(1));
    }

    #[test]
    fn own_listener_matches_everything() {
        let t = RouteTable::own(3);
        assert_eq!(t.lookup(Some(b"x"), "/anything"), Some(3));
    }

    #[test]
    fn strip_port_variants() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
