//! Verification of RFC 7523 JWT bearer assertions, as Drillster's token endpoint does
//! (Drillster: Service accounts).

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

/// Why the Drillster-like server refused an assertion. The `Display` text is the
/// `error_description` of the 400 `invalid_grant` answer (RFC 6749 §5.2, RFC 7523 §3.1), so
/// tests can compare against `rejection.to_string()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionRejection {
    /// Not a compact JWS of three base64url (unpadded) parts with JSON header and claims.
    #[error("malformed assertion")]
    Malformed,
    /// Header `alg` is not `RS256` (RSA_2048 keys sign with RS256, Drillster: Service accounts;
    /// `none` and HMAC are refused).
    #[error("alg must be RS256")]
    UnsupportedAlgorithm,
    /// Header `typ` is not `JWT` ("typ – always equal to JWT", Drillster: Service accounts).
    #[error("typ must be JWT")]
    WrongType,
    /// Header has no `kid` (the key id from the JSON key file, Drillster: Service accounts).
    #[error("missing kid")]
    MissingKid,
    /// `kid` names no key registered with the server (e.g. a deleted key, Drillster: Service
    /// accounts).
    #[error("unknown kid")]
    UnknownKid,
    /// The RS256 signature does not verify with the public key registered under `kid`
    /// (RFC 7523 §3 item 9).
    #[error("bad signature")]
    BadSignature,
    /// No `iss` claim (RFC 7523 §3 item 1).
    #[error("missing iss")]
    MissingIssuer,
    /// `iss` is not the service account the key belongs to ("iss – the user ID of the service
    /// account", Drillster: Service accounts).
    #[error("iss does not match the key's service account")]
    WrongIssuer,
    /// No (or an empty) `sub` claim (RFC 7523 §3 item 2).
    #[error("missing sub")]
    MissingSubject,
    /// `aud` is absent or does not contain the token endpoint URL exactly (RFC 7523 §3 item 3,
    /// "aud – the URI of the token endpoint", Drillster: Service accounts).
    #[error("wrong aud")]
    WrongAudience,
    /// No `exp` claim (RFC 7523 §3 item 4).
    #[error("missing exp")]
    MissingExpiry,
    /// A claim has the wrong JSON type (e.g. `exp` a string; RFC 7519 §2 NumericDate).
    #[error("invalid {0} claim")]
    InvalidClaim(&'static str),
    /// `exp` is not in the future, beyond the allowed clock skew (RFC 7523 §3 item 4).
    #[error("assertion expired")]
    Expired,
    /// `exp` is more than one hour (plus skew) ahead ("in the future, but not more than one
    /// hour", Drillster: Service accounts).
    #[error("exp too far ahead")]
    ExpiryTooFarAhead,
    /// `iat` is in the future beyond the skew (RFC 7523 §3 item 6 lets servers reject
    /// unreasonable `iat`).
    #[error("iat in the future")]
    IssuedInFuture,
    /// `nbf` is in the future beyond the skew (RFC 7523 §3 item 5).
    #[error("nbf in the future")]
    NotYetValid,
    /// `jti` was already used in an accepted assertion (RFC 7523 §3 item 7: replay protection).
    #[error("jti already used")]
    ReusedJti,
}

/// A public key registered for a service account (its "Keys" tab, one entry per key id, in
/// Drillster: Service accounts).
pub(crate) struct RegisteredKey {
    pub service_account_id: String,
    pub key: DecodingKey,
}

/// The server-side limits applied to the time claims, in seconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimeRules {
    pub now: f64,
    pub skew: f64,
    pub max_lifetime: f64,
}

/// The parts of a verified assertion the token endpoint needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VerifiedAssertion {
    pub subject: String,
    pub jti: Option<String>,
    pub exp: f64,
}

/// Verifies `assertion` completely except `jti` reuse (the caller owns the replay cache).
pub(crate) fn verify(
    assertion: &str,
    keys: &HashMap<String, RegisteredKey>,
    audience: &str,
    time: TimeRules,
) -> Result<VerifiedAssertion, AssertionRejection> {
    use AssertionRejection as R;

    let mut parts = assertion.trim().split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(R::Malformed);
    };
    let header = json_object(header_b64)?;
    let claims = json_object(claims_b64)?;

    if header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err(R::UnsupportedAlgorithm);
    }
    if header.get("typ").and_then(Value::as_str) != Some("JWT") {
        return Err(R::WrongType);
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(R::MissingKid)?;
    let registered = keys.get(kid).ok_or(R::UnknownKid)?;

    let signed = &assertion.trim()[..header_b64.len() + 1 + claims_b64.len()];
    let valid = jsonwebtoken::crypto::verify(
        signature_b64,
        signed.as_bytes(),
        &registered.key,
        Algorithm::RS256,
    );
    if !matches!(valid, Ok(true)) {
        return Err(R::BadSignature);
    }

    match string_claim(&claims, "iss")? {
        None => return Err(R::MissingIssuer),
        Some(iss) if iss != registered.service_account_id => return Err(R::WrongIssuer),
        Some(_) => {}
    }
    let subject = match string_claim(&claims, "sub")? {
        Some(sub) if !sub.is_empty() => sub.to_owned(),
        _ => return Err(R::MissingSubject),
    };
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == audience,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    if !audience_ok {
        return Err(R::WrongAudience);
    }
    let exp = numeric_claim(&claims, "exp")?.ok_or(R::MissingExpiry)?;
    if exp <= time.now - time.skew {
        return Err(R::Expired);
    }
    if exp > time.now + time.max_lifetime + time.skew {
        return Err(R::ExpiryTooFarAhead);
    }
    if numeric_claim(&claims, "iat")?.is_some_and(|iat| iat > time.now + time.skew) {
        return Err(R::IssuedInFuture);
    }
    if numeric_claim(&claims, "nbf")?.is_some_and(|nbf| nbf > time.now + time.skew) {
        return Err(R::NotYetValid);
    }
    let jti = string_claim(&claims, "jti")?.map(str::to_owned);
    Ok(VerifiedAssertion { subject, jti, exp })
}

fn json_object(part: &str) -> Result<Map<String, Value>, AssertionRejection> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AssertionRejection::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(AssertionRejection::Malformed),
    }
}

fn string_claim<'a>(
    claims: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, AssertionRejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(AssertionRejection::InvalidClaim(name)),
    }
}

fn numeric_claim(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<f64>, AssertionRejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|n| n.is_finite())
            .map(Some)
            .ok_or(AssertionRejection::InvalidClaim(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{DEMO_KEY_ID, DEMO_PRIVATE_PEM, DEMO_PUBLIC_PEM, DEMO_SERVICE_ACCOUNT_ID};
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const AUD: &str = "http://127.0.0.1:1/api/oauth/token";
    const NOW: f64 = 1_700_000_000.0;

    fn keys() -> HashMap<String, RegisteredKey> {
        let key = DecodingKey::from_rsa_pem(DEMO_PUBLIC_PEM.as_bytes()).expect("demo key");
        HashMap::from([(
            DEMO_KEY_ID.to_owned(),
            RegisteredKey {
                service_account_id: DEMO_SERVICE_ACCOUNT_ID.to_owned(),
                key,
            },
        )])
    }

    fn sign(claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(DEMO_KEY_ID.to_owned());
        let key = EncodingKey::from_rsa_pem(DEMO_PRIVATE_PEM.as_bytes()).expect("demo key");
        jsonwebtoken::encode(&header, claims, &key).expect("sign")
    }

    fn check(claims: Value) -> Result<VerifiedAssertion, AssertionRejection> {
        let rules = TimeRules {
            now: NOW,
            skew: 5.0,
            max_lifetime: 3600.0,
        };
        verify(&sign(&claims), &keys(), AUD, rules)
    }

    fn base() -> Value {
        json!({"iss": DEMO_SERVICE_ACCOUNT_ID, "sub": "user-9", "aud": AUD,
               "exp": NOW + 300.0, "iat": NOW, "jti": "j1"})
    }

    fn with(key: &str, value: Value) -> Value {
        let mut claims = base();
        claims[key] = value;
        claims
    }

    #[test]
    fn accepts_valid_and_reports_subject() {
        let ok = check(base()).expect("valid");
        assert_eq!(ok.subject, "user-9");
        assert_eq!(ok.jti.as_deref(), Some("j1"));
        assert!(check(with("aud", json!(["x", AUD]))).is_ok());
        assert!(check(with("exp", json!(NOW + 3600.0 + 5.0))).is_ok());
    }

    #[test]
    fn claim_rejections() {
        use AssertionRejection as R;
        assert_eq!(
            check(with("aud", json!(format!("{AUD}/")))),
            Err(R::WrongAudience)
        );
        assert_eq!(check(with("iss", json!("someone"))), Err(R::WrongIssuer));
        assert_eq!(check(with("sub", json!(""))), Err(R::MissingSubject));
        assert_eq!(check(with("exp", json!(NOW - 6.0))), Err(R::Expired));
        assert_eq!(
            check(with("exp", json!(NOW + 3606.0))),
            Err(R::ExpiryTooFarAhead)
        );
        assert_eq!(
            check(with("exp", json!("soon"))),
            Err(R::InvalidClaim("exp"))
        );
        assert_eq!(
            check(with("iat", json!(NOW + 60.0))),
            Err(R::IssuedInFuture)
        );
        assert_eq!(check(with("nbf", json!(NOW + 60.0))), Err(R::NotYetValid));
        let mut no_exp = base();
        no_exp.as_object_mut().map(|m| m.remove("exp"));
        assert_eq!(check(no_exp), Err(R::MissingExpiry));
    }

    #[test]
    fn structural_rejections() {
        use AssertionRejection as R;
        let rules = TimeRules {
            now: NOW,
            skew: 5.0,
            max_lifetime: 3600.0,
        };
        let good = sign(&base());
        assert_eq!(verify("a.b", &keys(), AUD, rules), Err(R::Malformed));
        assert_eq!(verify("", &keys(), AUD, rules), Err(R::Malformed));
        let tampered = format!("{good}x");
        assert_eq!(verify(&tampered, &keys(), AUD, rules), Err(R::BadSignature));
        let (header, rest) = good.split_once('.').expect("three parts");
        let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"x"}"#);
        assert_eq!(
            verify(&format!("{none}.{rest}"), &keys(), AUD, rules),
            Err(R::UnsupportedAlgorithm)
        );
        assert!(!header.is_empty());
    }
}
