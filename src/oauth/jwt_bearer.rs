//! The JWT bearer authorization grant (RFC 7523 §2.1), as Drillster service accounts use it
//! (Drillster: Service accounts): an RS256-signed assertion built from the JSON key file,
//! exchanged at the token endpoint together with the client id and secret.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, Header};
use serde::Serialize;

use super::key_file::ServiceAccountKey;

/// `grant_type` value for this grant (RFC 7523 §2.1).
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Longest time an assertion may be valid: "not more than one hour" (Drillster: Service
/// accounts).
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// How far `iat` is backdated so a server whose clock is behind ours still accepts it.
/// `exp - iat` stays within [`MAX_ASSERTION_LIFETIME`] whatever the configured lifetime.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(120);

/// Claims of the assertion (RFC 7523 §3; "Drillster: Service accounts" lists `sub`, `iss`,
/// `aud`, `exp`).
#[derive(Debug, Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    iat: u64,
    jti: String,
}

/// Error signing an assertion (the key was validated at start-up, so this is rare).
#[derive(Debug, thiserror::Error)]
#[error("could not sign the JWT assertion: {0}")]
pub struct AssertionError(String);

/// Builds one signed assertion.
///
/// * `key`: the service account key (`kid` = `keyId`, `iss` = `serviceAccountId`).
/// * `subject`: `sub`, the account the access token is for.
/// * `audience`: `aud`, the token endpoint URL exactly unless configured otherwise.
/// * `lifetime`: requested `exp - now`; capped so that `exp - iat` ≤ 1 h.
/// * `now`: the wall clock (injected so tests can move it).
///
/// Header: `alg: RS256`, `typ: JWT`, `kid`. Claims: `iss`, `sub`, `aud`, `exp`, `iat` (backdated by
/// [`CLOCK_SKEW_ALLOWANCE`]) and a fresh random `jti`. The result is a secret: never log it.
pub fn build_assertion(
    key: &ServiceAccountKey,
    subject: &str,
    audience: &str,
    lifetime: Duration,
    now: SystemTime,
) -> Result<String, AssertionError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let lifetime = lifetime
        .min(MAX_ASSERTION_LIFETIME - CLOCK_SKEW_ALLOWANCE)
        .as_secs()
        .max(1);
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.key_id.clone());
    let claims = Claims {
        iss: &key.service_account_id,
        sub: subject,
        aud: audience,
        exp: now + lifetime,
        iat: now.saturating_sub(CLOCK_SKEW_ALLOWANCE.as_secs()),
        jti: uuid::Uuid::new_v4().simple().to_string(),
    };
    jsonwebtoken::encode(&header, &claims, key.encoding_key())
        .map_err(|e| AssertionError(e.kind_description()))
}

/// The `jti` claim of an assertion [`build_assertion`] made (its claims part decoded, the
/// signature not checked): an identifier for the audit log, no secret. `None` when absent.
pub fn assertion_id(assertion: &str) -> Option<String> {
    use base64::Engine as _;
    let claims = assertion.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("jti")?.as_str().map(str::to_string)
}

/// Token request form parameters ("Requesting the access token" in Drillster: Service
/// accounts; RFC 7523 §2.1).
/// Client authentication parameters are added by the caller.
pub fn form_params(assertion: String, scope: Option<&str>) -> Vec<(&'static str, String)> {
    let mut form = vec![
        ("grant_type", GRANT_TYPE.to_string()),
        ("assertion", assertion),
    ];
    if let Some(scope) = scope {
        form.push(("scope", scope.to_string()));
    }
    form
}

trait KindDescription {
    fn kind_description(&self) -> String;
}

impl KindDescription for jsonwebtoken::errors::Error {
    // The error kind only: never the key or the claims.
    fn kind_description(&self) -> String {
        format!("{:?}", self.kind())
    }
}
