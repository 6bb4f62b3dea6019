//! A token request as a sandbox authorization server received it, kept for tests.

use std::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::request::Parts;
use serde_json::Value;

use crate::server;

/// One token request as the server received it (for assertions in tests). Recorded before any
/// fault or check runs, so hung, failed and refused requests are recorded too. It holds the
/// client secret and assertion as sent: sandbox credentials only, never log it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The request method.
    pub method: String,
    /// The request path, as received.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// Headers as (lower-case name, value), grouped by name in first-seen order (what
    /// `http::HeaderMap` keeps); values are lossily decoded as UTF-8.
    pub headers: Vec<(String, String)>,
    /// The raw body, lossily decoded as UTF-8.
    pub body: String,
    /// The body's form parameters, decoded, in order, including repeats and empty values.
    pub params: Vec<(String, String)>,
    /// When the request had been read (before any fault ran), for measuring retry intervals.
    pub received: Instant,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).into_iter().next()
    }

    /// Every value of header `name` (case-insensitive).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of form parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The decoded (unverified) JOSE header of the `assertion` parameter, if it is a JWT.
    pub fn assertion_header(&self) -> Option<Value> {
        self.assertion_part(0)
    }

    /// The decoded (unverified) claims of the `assertion` parameter, if it is a JWT.
    pub fn assertion_claims(&self) -> Option<Value> {
        self.assertion_part(1)
    }

    fn assertion_part(&self, index: usize) -> Option<Value> {
        let part = self.param("assertion")?.split('.').nth(index)?;
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
    }
}

pub(super) fn record(parts: &Parts, body: Option<&Bytes>) -> RecordedRequest {
    let body = body.map(|b| b.as_ref()).unwrap_or_default();
    RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), server::lossy(v)))
            .collect(),
        body: String::from_utf8_lossy(body).into_owned(),
        params: form_urlencoded::parse(body).into_owned().collect(),
        received: Instant::now(),
    }
}
