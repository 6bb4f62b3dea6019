//! From a validated [`RouteConfig`] to the [`Route`] the request path uses: the upstream
//! resolved to an address, the pingora peer with its timeouts and trust roots, the precomputed
//! `Host` and `Allow` values and the folded `strip_headers`.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, WrappedX509};

use crate::config::RouteConfig;
use crate::gateway::StartError;
use crate::metrics::Metrics;
use crate::proxy::routes::{normalise_prefix, Route};
use crate::proxy::upstream_dns::UpstreamAddress;
use crate::token::subjects::SubjectTokens;
use crate::token::TokenSource;

/// How [`compile_route`] treats an upstream host that does not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unresolved {
    /// At start: the route is built without a peer and answers 502 `upstream_unreachable`
    /// until a background resolution succeeds.
    Tolerate,
    /// At a reload: the reload is rejected.
    Reject,
}

/// Compiles route `index` (`routes[index]` in the config), its requests authorised by `token`.
/// `ca_pem` is the content of the route's `ca_file`, read once by the caller; upstream names
/// are resolved from `hosts_file` when given.
///
/// Resolves the upstream host now (blocking); the caller starts its background resolution
/// ([`crate::proxy::upstream_dns::UpstreamAddress::follow`]).
///
/// # Errors
/// [`StartError::Resolve`] when the host does not resolve and `unresolved` is
/// [`Unresolved::Reject`], [`StartError::CaFile`] when `ca_pem` holds no PEM certificate,
/// [`StartError::Internal`] when the upstream authority is not a valid `Host` value.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compile_route(
    index: usize,
    rc: &RouteConfig,
    token: Arc<TokenSource>,
    subjects: Option<Arc<SubjectTokens>>,
    ca_pem: Option<&[u8]>,
    metrics: &Metrics,
    hosts_file: Option<&std::path::Path>,
    unresolved: Unresolved,
) -> Result<Route, StartError> {
    let up = &rc.upstream;
    // The address is filled in by each resolution (UpstreamAddress); pingora's own
    // resolution would panic on a name that does not resolve.
    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], up.port));
    let mut peer = HttpPeer::new(addr, up.tls, up.host.clone());
    peer.options.connection_timeout = Some(rc.connect_timeout);
    peer.options.total_connection_timeout = Some(rc.connect_timeout * 2);
    peer.options.read_timeout = Some(rc.read_timeout);
    peer.options.write_timeout = Some(rc.read_timeout);
    peer.options.idle_timeout = Some(Duration::from_secs(60));
    peer.options.verify_cert = true;
    peer.options.verify_hostname = true;
    if let Some(pem) = ca_pem {
        peer.options.ca = Some(trust_roots(index, pem)?);
        // pingora's connection-reuse key does not cover the CA list: without this, a connection
        // verified against this route's private CA could be reused by a route that does not
        // trust it (same address and SNI). Routes with the same CA file still share connections.
        peer.group_key = ca_group_key(pem);
    }
    // The policy decides every upstream request field; pingora's own sanitising is off.
    peer.options.http_upstream_request_policy =
        pingora::upstreams::peer::HttpUpstreamRequestPolicy::preserve();
    let upstream = Arc::new(UpstreamAddress::new(
        &up.host,
        up.port,
        peer,
        hosts_file.map(std::path::Path::to_path_buf),
    ));
    if let Err(reason) = upstream.resolve_blocking() {
        if unresolved == Unresolved::Reject {
            return Err(StartError::Resolve {
                index,
                route: rc.name.clone(),
                host: up.host.clone(),
                port: up.port,
                reason,
            });
        }
        tracing::warn!(
            route = %rc.name,
            upstream = %upstream.name(),
            error = %reason,
            "upstream does not resolve; the route answers 502 until it does"
        );
    }
    let allow_header = match &rc.allow_methods {
        Some(m) => {
            let joined = m.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
            HeaderValue::from_str(&joined).ok()
        }
        None => Some(HeaderValue::from_static(Route::DEFAULT_ALLOW)),
    };
    // The subject field is the gateway's to read and never reaches the upstream.
    let subject_header = rc.subjects.as_ref().and_then(|s| s.header.as_ref());
    let host_header = HeaderValue::from_str(&up.authority)
        .map_err(|_| StartError::Internal(format!("routes[{index}].upstream: invalid host")))?;
    Ok(Route {
        index,
        name: rc.name.clone(),
        prefix: normalise_prefix(&rc.path_prefix),
        strip_prefix: rc.strip_prefix,
        base_path: up.base_path.trim_end_matches('/').to_string(),
        upstream,
        host_header,
        allow_methods: rc.allow_methods.clone(),
        allow_header,
        strip_headers: rc.strip_headers.to_vec(),
        strip_folded: rc
            .strip_headers
            .iter()
            .chain(subject_header)
            .map(|h| crate::proxy::policy::fields::fold_name(h.as_str()))
            .collect(),
        forward_cookies: rc.forward_cookies,
        token,
        subject_header: subject_header
            .filter(|_| subjects.is_some())
            .map(|h| crate::proxy::policy::fields::fold_name(h.as_str())),
        subjects,
        metrics: metrics.route(&rc.name),
    })
}

/// A connection-pool key for peers trusting the CA file with contents `pem` (never 0, the key
/// of peers with the default trust store).
fn ca_group_key(pem: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pem.hash(&mut h);
    h.finish().max(1)
}

/// System roots plus the route's `ca_file` certificates (extra trust roots, docs/configuration.md
/// "[[routes]]"). pingora's per-peer CA list replaces the default store, so the system roots are
/// included here.
fn trust_roots(index: usize, pem: &[u8]) -> Result<Arc<[WrappedX509]>, StartError> {
    let mut ders: Vec<Vec<u8>> = rustls_native_certs::load_native_certs()
        .certs
        .into_iter()
        .map(|c| c.to_vec())
        .collect();
    let mut extra = 0;
    for block in pem::parse_many(pem).map_err(|e| StartError::CaFile {
        index,
        reason: format!("not PEM: {e}"),
    })? {
        if block.tag() == "CERTIFICATE" {
            ders.push(block.contents().to_vec());
            extra += 1;
        }
    }
    if extra == 0 {
        return Err(StartError::CaFile {
            index,
            reason: "no CERTIFICATE block".into(),
        });
    }
    // parse_x509 panics on invalid DER, so check each certificate first.
    let valid: Vec<WrappedX509> = ders
        .into_iter()
        .filter(|d| x509_parser::parse_x509_certificate(d).is_ok())
        .map(|d| WrappedX509::new(d, parse_x509))
        .collect();
    Ok(valid.into())
}
