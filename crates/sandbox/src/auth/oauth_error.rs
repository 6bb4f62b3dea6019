//! RFC 6749 §5.2 error answers and §3.2 form parameters of the sandbox authorization servers.

use std::collections::HashMap;

use http::header::{ALLOW, PRAGMA, WWW_AUTHENTICATE};
use http::{HeaderValue, StatusCode};
use serde_json::json;

use crate::jwt_bearer::AssertionRejection;
use crate::server::{self, Resp};

/// An RFC 6749 §5.2 error answer.
#[derive(Debug, thiserror::Error)]
#[error("{error}: {description}")]
pub(super) struct OAuthError {
    pub(super) status: StatusCode,
    pub(super) error: &'static str,
    pub(super) description: String,
}

impl OAuthError {
    pub(super) fn invalid_request(description: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_request",
            description: description.into(),
        }
    }

    pub(super) fn invalid_client(description: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_client",
            description: description.into(),
        }
    }

    pub(super) fn invalid_grant(rejection: &AssertionRejection) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_grant",
            description: rejection.to_string(),
        }
    }

    pub(super) fn into_response(self, realm: &str) -> Resp {
        let body = json!({ "error": self.error, "error_description": self.description });
        let mut response = no_cache(server::json(self.status, &body));
        let headers = response.headers_mut();
        match self.status {
            // RFC 6749 §5.2: 401 carries a challenge for the scheme the client may use.
            StatusCode::UNAUTHORIZED => {
                let challenge = format!("Basic realm=\"{realm}\"");
                if let Ok(value) = HeaderValue::from_str(&challenge) {
                    headers.insert(WWW_AUTHENTICATE, value);
                }
            }
            StatusCode::METHOD_NOT_ALLOWED => {
                headers.insert(ALLOW, HeaderValue::from_static("POST"));
            }
            _ => {}
        }
        response
    }
}

pub(super) fn no_cache(mut response: Resp) -> Resp {
    response
        .headers_mut()
        .insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// Form parameters after RFC 6749 §3.2 checks: none repeated, empty ones dropped.
pub(super) struct Params(HashMap<String, String>);

impl Params {
    pub(super) fn new(raw: &[(String, String)]) -> Result<Self, OAuthError> {
        let mut map = HashMap::new();
        for (name, value) in raw.iter().filter(|(_, v)| !v.is_empty()) {
            if map.insert(name.clone(), value.clone()).is_some() {
                return Err(OAuthError::invalid_request(format!(
                    "parameter {name} included more than once"
                )));
            }
        }
        Ok(Self(map))
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}
