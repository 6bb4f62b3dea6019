//! Responses tokengate itself produces: a JSON body `{"error", "message", "route"}` and the
//! `tokengate-error: <code>` header, so a client can tell them from the API's own (SPEC "Proxy
//! behaviour"). They never contain a secret or a token.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use crate::metrics::DenyReason;

/// The `tokengate-error` response header.
pub static TOKENGATE_ERROR: HeaderName = HeaderName::from_static("tokengate-error");

/// A gateway-made failure, with its SPEC code and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    /// 404 `no_route`.
    NoRoute,
    /// 403 `client_not_allowed`.
    ClientNotAllowed,
    /// 405 `method_not_allowed`.
    MethodNotAllowed,
    /// 503 `token_unavailable`, with `Retry-After`.
    TokenUnavailable {
        /// When the next token request is due.
        retry_after: Duration,
    },
    /// 502 `upstream_unreachable`.
    UpstreamUnreachable,
    /// 504 `upstream_timeout`.
    UpstreamTimeout,
}

impl GatewayError {
    /// The SPEC error code.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no_route",
            GatewayError::ClientNotAllowed => "client_not_allowed",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::TokenUnavailable { .. } => "token_unavailable",
            GatewayError::UpstreamUnreachable => "upstream_unreachable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::NoRoute => 404,
            GatewayError::ClientNotAllowed => 403,
            GatewayError::MethodNotAllowed => 405,
            GatewayError::TokenUnavailable { .. } => 503,
            GatewayError::UpstreamUnreachable => 502,
            GatewayError::UpstreamTimeout => 504,
        }
    }

    /// The `tokengate_denied_total` reason, for admission failures.
    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            GatewayError::NoRoute => Some(DenyReason::NoRoute),
            GatewayError::ClientNotAllowed => Some(DenyReason::ClientNotAllowed),
            GatewayError::MethodNotAllowed => Some(DenyReason::MethodNotAllowed),
            _ => None,
        }
    }

    fn message(&self) -> String {
        match self {
            GatewayError::NoRoute => "no route matches this request".into(),
            GatewayError::ClientNotAllowed => {
                "client address is not in server.allowed_clients".into()
            }
            GatewayError::MethodNotAllowed => "method not allowed on this route".into(),
            GatewayError::TokenUnavailable { retry_after } => format!(
                "no valid access token is available; the token endpoint is failing (retry in {} s)",
                retry_after.as_secs().max(1)
            ),
            GatewayError::UpstreamUnreachable => "the upstream could not be reached".into(),
            GatewayError::UpstreamTimeout => "the upstream did not answer in time".into(),
        }
    }

    /// The JSON body.
    pub fn body(&self, route: Option<&str>) -> Bytes {
        let v = serde_json::json!({
            "error": self.code(),
            "message": self.message(),
            "route": route,
        });
        Bytes::from(v.to_string())
    }
}

/// The header fields of a gateway error response whose JSON body is `body_len` bytes, in the
/// order they are sent: `content-type`, `content-length`, `cache-control: no-store`,
/// `tokengate-error`, `x-request-id` (when known), `retry-after` for `token_unavailable`. One
/// list for both the pingora-proxy path ([`write`]) and the fast path.
pub fn fields(
    err: &GatewayError,
    body_len: usize,
    request_id: Option<&HeaderValue>,
) -> Vec<(HeaderName, HeaderValue)> {
    use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
    let mut fields = vec![
        (CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (CONTENT_LENGTH, HeaderValue::from(body_len)),
        (CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            TOKENGATE_ERROR.clone(),
            HeaderValue::from_static(err.code()),
        ),
    ];
    if let Some(id) = request_id {
        fields.push((HeaderName::from_static("x-request-id"), id.clone()));
    }
    if let GatewayError::TokenUnavailable { retry_after } = err {
        fields.push((RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1))));
    }
    fields
}

/// Writes a gateway error response to the downstream: [`fields`], then `extra` (a 405's
/// `Allow`), then the JSON body.
pub async fn write(
    session: &mut Session,
    err: &GatewayError,
    route: Option<&str>,
    request_id: Option<&HeaderValue>,
    extra: Option<(HeaderName, HeaderValue)>,
) -> Result<()> {
    let body = err.body(route);
    let mut resp = ResponseHeader::build(err.status(), Some(6))?;
    for (name, value) in fields(err, body.len(), request_id).into_iter().chain(extra) {
        resp.insert_header(name, value)?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_spec_json() {
        let b = GatewayError::NoRoute.body(None);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"], "no_route");
        assert!(v["route"].is_null());
        let b = GatewayError::TokenUnavailable {
            retry_after: Duration::from_secs(7),
        }
        .body(Some("drillster"));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"], "token_unavailable");
        assert_eq!(v["route"], "drillster");
    }
}
