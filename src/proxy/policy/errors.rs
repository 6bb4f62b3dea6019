//! Responses tokengate itself produces: a JSON body `{"error", "message", "route"}` and the
//! `tokengate-error: <code>` header, so a client can tell them from the API's own. They never
//! contain a secret or a token. Both proxy paths write the same [`ErrorResponse`].

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use crate::metrics::DenyReason;

/// The `tokengate-error` response header.
pub static TOKENGATE_ERROR: HeaderName = HeaderName::from_static("tokengate-error");

/// A gateway-made failure, with its error code and HTTP status.
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
    /// 400 `bad_request`: the request's framing or request line (RFC 9112 §2.2, §3, §6.3).
    BadRequest(&'static str),
    /// 408 `request_timeout`: the request head did not arrive within
    /// `server.request_head_timeout`, or its body stalled for `server.body_timeout`
    /// (RFC 9110 §15.5.9).
    RequestTimeout,
    /// 431 `request_header_too_large`: the request head is over the limit (RFC 6585 §5).
    HeaderTooLarge,
    /// 501 `not_implemented`: a transfer coding other than `chunked` (RFC 9112 §6.1).
    NotImplemented,
    /// 403 `subject_not_allowed`: a per-user token for a subject outside the route's
    /// `[routes.subjects]` `allow`, a subject field from a client outside `header_clients`,
    /// or a subject field given twice or empty (docs/per-user-tokens.md).
    SubjectNotAllowed,
}

impl GatewayError {
    /// The error code in the gateway's JSON error body (docs/proxy-behaviour.md "Gateway errors").
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no_route",
            GatewayError::ClientNotAllowed => "client_not_allowed",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::TokenUnavailable { .. } => "token_unavailable",
            GatewayError::UpstreamUnreachable => "upstream_unreachable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::RequestTimeout => "request_timeout",
            GatewayError::HeaderTooLarge => "request_header_too_large",
            GatewayError::NotImplemented => "not_implemented",
            GatewayError::SubjectNotAllowed => "subject_not_allowed",
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
            GatewayError::BadRequest(_) => 400,
            GatewayError::RequestTimeout => 408,
            GatewayError::HeaderTooLarge => 431,
            GatewayError::NotImplemented => 501,
            GatewayError::SubjectNotAllowed => 403,
        }
    }

    /// The `tokengate_denied_total` reason, for refusals before the request is forwarded.
    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            GatewayError::NoRoute => Some(DenyReason::NoRoute),
            GatewayError::ClientNotAllowed => Some(DenyReason::ClientNotAllowed),
            GatewayError::MethodNotAllowed => Some(DenyReason::MethodNotAllowed),
            GatewayError::BadRequest(_) => Some(DenyReason::BadRequest),
            GatewayError::HeaderTooLarge => Some(DenyReason::HeaderTooLarge),
            GatewayError::NotImplemented => Some(DenyReason::NotImplemented),
            GatewayError::SubjectNotAllowed => Some(DenyReason::SubjectNotAllowed),
            _ => None,
        }
    }

    fn message(&self) -> String {
        match self {
            GatewayError::NoRoute => "no route matches this request".into(),
            GatewayError::ClientNotAllowed => {
                "client address is not allowed on this listener (server.allowed_clients; \
                 server.token_clients on the token listener)"
                    .into()
            }
            GatewayError::MethodNotAllowed => "method not allowed on this route".into(),
            GatewayError::TokenUnavailable { retry_after } => format!(
                "no valid access token is available; the token endpoint refused or failed the token request (retry in {} s)",
                retry_after.as_secs().max(1)
            ),
            GatewayError::UpstreamUnreachable => "the upstream could not be reached".into(),
            GatewayError::UpstreamTimeout => "the upstream did not answer in time".into(),
            GatewayError::BadRequest(why) => format!("malformed request: {why}"),
            GatewayError::RequestTimeout => "the request did not arrive in time".into(),
            GatewayError::HeaderTooLarge => "the request head is too large".into(),
            GatewayError::NotImplemented => {
                "transfer coding not implemented; only chunked is accepted".into()
            }
            GatewayError::SubjectNotAllowed => {
                "no token for this subject: not allowed for this route or this client".into()
            }
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

/// A gateway error response as both proxy paths send it: status, fields in order, JSON body.
pub struct ErrorResponse {
    /// The HTTP status.
    pub status: u16,
    /// `content-type`, `content-length`, `cache-control: no-store`, `tokengate-error`,
    /// `x-request-id` (when known), `retry-after` for `token_unavailable`, `allow` for a 405.
    pub fields: Vec<(HeaderName, HeaderValue)>,
    /// `{"error", "message", "route"}`.
    pub body: Bytes,
}

impl ErrorResponse {
    /// The response for `err` on `route` (`None` before one matched). `allow` is the `Allow`
    /// value of a 405 (RFC 9110 §15.5.6: the methods the route accepts).
    pub fn new(
        err: &GatewayError,
        route: Option<&str>,
        request_id: Option<&HeaderValue>,
        allow: Option<&HeaderValue>,
    ) -> Self {
        use http::header::{ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
        let body = err.body(route);
        let mut fields = vec![
            (CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (CONTENT_LENGTH, HeaderValue::from(body.len())),
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
        if let (GatewayError::MethodNotAllowed, Some(allow)) = (err, allow) {
            fields.push((ALLOW, allow.clone()));
        }
        ErrorResponse {
            status: err.status(),
            fields,
            body,
        }
    }

    /// The whole HTTP/1.1 response into `out`: status line, fields, `Date`,
    /// `Connection: close` (the connection is closed after a gateway error), the body unless
    /// the request was `HEAD` (RFC 9110 §9.3.2: the fields describe the GET's answer).
    pub fn write_h1(&self, head_request: bool, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(self.status.to_string().as_bytes());
        out.push(b' ');
        let reason = http::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        let date = pingora::protocols::http::date::get_cached_date();
        let fixed = [
            (&b"Date"[..], date.as_bytes()),
            (&b"Connection"[..], &b"close"[..]),
        ];
        let own = self
            .fields
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
        for (name, value) in own.chain(fixed) {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_request {
            out.extend_from_slice(&self.body);
        }
    }

    /// Writes the response through pingora-proxy's session.
    pub async fn write(self, session: &mut Session) -> Result<()> {
        // As `write_h1`: the connection closes after a gateway error, and the head says so.
        session.set_keepalive(None);
        let mut resp = ResponseHeader::build(self.status, Some(self.fields.len()))?;
        for (name, value) in self.fields {
            resp.insert_header(name, value)?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(self.body), true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_gateways_json() {
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
