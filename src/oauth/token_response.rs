//! Token endpoint responses: RFC 6749 §5.1 (success) and §5.2 (error), parsed leniently.
//!
//! Real token endpoints deviate from the RFC in small ways; where §5.1 allows it we accept them:
//! unknown fields are ignored, `expires_in` may be a number or a numeric string, `token_type`
//! may have any case or be absent (= Bearer), a JSON body is read whatever media type labels
//! it (`text/plain`, `application/vnd.…+json`, parameters), and a form-encoded body
//! (`access_token=…&token_type=bearer&expires_in=3600`, as some servers answer) is read like
//! the JSON object it stands for. What we cannot use is refused with an error that names the
//! problem but never contains the token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::{Map, Value};

/// A usable access token as obtained from the token endpoint.
pub struct AccessToken {
    /// The access token (RFC 6749 §1.4). Secret: never log it.
    pub value: String,
    /// How long the token is valid from the moment the response arrived. Already the earliest
    /// of `expires_in`, the token's own JWT `exp` and, when neither exists, the default lifetime;
    /// more than zero (a response saying less is refused) and at most `MAX_TOKEN_LIFETIME` (the
    /// cache treats less than [`crate::token::MIN_LIFETIME`] as that).
    pub lifetime: Duration,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field(
                "value",
                &format_args!("[redacted; {} bytes]", self.value.len()),
            )
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// Longest lifetime we believe: one day. Larger (or absurd, e.g. `1e308`) `expires_in` values
/// are clamped, so arithmetic on them cannot overflow and a token is renewed at least daily.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Why a token response could not be used. Messages never contain the access token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenResponseError {
    /// RFC 6749 §5.2 error object (`{"error": …}`), whatever the HTTP status.
    #[error("token endpoint returned error \"{error}\"{}", describe(.description))]
    OAuth {
        /// The `error` code, e.g. `invalid_client`.
        error: String,
        /// `error_description`, if any (truncated to 200 characters).
        description: Option<String>,
    },
    /// The body is not JSON (HTML error page, empty body, …) or not a JSON object.
    #[error("token response is not a JSON object ({0})")]
    NotJson(String),
    /// `access_token` missing, not a string, or empty.
    #[error("token response has no usable access_token")]
    MissingAccessToken,
    /// `token_type` is something other than Bearer (e.g. `DPoP`).
    #[error("token_type \"{0}\" is not supported; tokengate sends Bearer tokens only (RFC 6750)")]
    UnsupportedTokenType(String),
    /// A form-encoded response names this member more than once, so which one counts is
    /// unclear.
    #[error("form-encoded token response has {0} more than once")]
    RepeatedMember(&'static str),
    /// The access token cannot be sent in an HTTP header (control characters etc.).
    #[error("access_token contains characters not allowed in an HTTP header")]
    InvalidTokenCharacters,
    /// The response says the token has already expired: a negative `expires_in`, or a JWT
    /// access token whose `exp` is not after the time the response arrived (often this
    /// machine's clock or the server's is wrong). Sending it would only earn 401s.
    #[error("the access token has already expired: {0}")]
    AlreadyExpired(String),
}

fn describe(d: &Option<String>) -> String {
    match d {
        Some(d) => format!(": {d}"),
        None => String::new(),
    }
}

/// Parses a token endpoint response body.
///
/// * `body`: the raw response body (any HTTP status; the caller decides what the status means
///   when the body is not an RFC 6749 §5.2 error object).
/// * `now`: the wall-clock time the response arrived, used to read a JWT access token's `exp`.
/// * `default_lifetime`: used when neither `expires_in` nor a JWT `exp` is present.
/// * `secrets`: what the request carried that must never be shown (client secret, assertion,
///   Basic credentials): an `error` or `error_description` that echoes one shows
///   `[redacted]` in its place (before truncation, so no prefix survives either).
///
/// Errors: [`TokenResponseError`]; an `{"error": …}` object is always an error, even with
/// HTTP 200.
pub fn parse_token_response(
    body: &[u8],
    now: SystemTime,
    default_lifetime: Duration,
    secrets: &[&str],
) -> Result<AccessToken, TokenResponseError> {
    parse_token_body(body, None, now, default_lifetime, secrets)
}

/// [`parse_token_response`] for a body that came with `Content-Type: content_type`.
///
/// JSON is read whatever the media type says. A body that is not JSON is read as
/// `application/x-www-form-urlencoded` when it is labelled so, or when, unlabelled or
/// labelled otherwise, it looks like a form (visible ASCII only, with an `access_token` or
/// `error` member); each member is then the JSON string it would have been (`expires_in=3600`
/// is read like `"expires_in": "3600"`). A UTF-8 byte order mark before the body is skipped.
pub fn parse_token_body(
    body: &[u8],
    content_type: Option<&str>,
    now: SystemTime,
    default_lifetime: Duration,
    secrets: &[&str],
) -> Result<AccessToken, TokenResponseError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let parsed = serde_json::from_slice::<Value>(body);
    if parsed.is_err() {
        if let Some(obj) = form_members(body, content_type)? {
            return token_from_object(obj, now, default_lifetime, secrets);
        }
    }
    let value: Value = parsed.map_err(|e| {
        let hint = match body_hint(body) {
            // serde_json's message names the problem and where, never the text.
            "" => format!(", {e}"),
            hint => hint.to_string(),
        };
        TokenResponseError::NotJson(format!("{} bytes{hint}", body.len()))
    })?;
    let Value::Object(obj) = value else {
        return Err(TokenResponseError::NotJson("not an object".into()));
    };
    token_from_object(obj, now, default_lifetime, secrets)
}

/// The members of a form-encoded token response, or `None` when `body` is not one (see
/// [`parse_token_body`]).
fn form_members(
    body: &[u8],
    content_type: Option<&str>,
) -> Result<Option<Map<String, Value>>, TokenResponseError> {
    let media_type = content_type
        .and_then(|ct| ct.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    let labelled = media_type.as_deref() == Some("application/x-www-form-urlencoded");
    let looks_like_one = !body.is_empty()
        && body.iter().all(u8::is_ascii_graphic)
        && !matches!(body[0], b'{' | b'[' | b'<' | b'"')
        && form_urlencoded::parse(body).any(|(k, _)| k == "access_token" || k == "error");
    if !labelled && !looks_like_one {
        return Ok(None);
    }
    let mut obj = Map::new();
    for (name, value) in form_urlencoded::parse(body) {
        let name = name.into_owned();
        if obj.contains_key(&name) {
            // Only the members read below are named; the others are ignored like JSON's.
            if let Some(known) = FORM_MEMBERS.iter().find(|m| **m == name) {
                return Err(TokenResponseError::RepeatedMember(known));
            }
            continue;
        }
        obj.insert(name, Value::String(value.into_owned()));
    }
    Ok(Some(obj))
}

/// The members a token response is read for.
const FORM_MEMBERS: [&str; 5] = [
    "access_token",
    "token_type",
    "expires_in",
    "error",
    "error_description",
];

/// A token (or the RFC 6749 §5.2 error) from a response's members.
fn token_from_object(
    obj: Map<String, Value>,
    now: SystemTime,
    default_lifetime: Duration,
    secrets: &[&str],
) -> Result<AccessToken, TokenResponseError> {
    if let Some(err) = obj.get("error") {
        let shown = |v: &Value, max| truncate(&redact(json_to_text(v), secrets), max);
        return Err(TokenResponseError::OAuth {
            error: shown(err, 64),
            description: obj.get("error_description").map(|d| shown(d, 200)),
        });
    }
    let token = match obj.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(TokenResponseError::MissingAccessToken),
    };
    if !token.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(TokenResponseError::InvalidTokenCharacters);
    }
    match obj.get("token_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(other) => {
            return Err(TokenResponseError::UnsupportedTokenType(truncate(
                &redact(json_to_text(other), secrets),
                32,
            )))
        }
    }
    // 0 is read as "not given", as golang.org/x/oauth2 does: servers that send it mean no
    // expiry more often than an already-expired token (the token's JWT `exp`, the default
    // lifetime and an upstream 401 still bound it).
    let expires_in = obj
        .get("expires_in")
        .and_then(expires_in_seconds)
        .filter(|&e| e != 0.0);
    let jwt_left = jwt_exp(&token).map(|exp| {
        let now_secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        exp - now_secs
    });
    if let Some(e) = expires_in.filter(|&e| e < 0.0) {
        return Err(TokenResponseError::AlreadyExpired(format!(
            "expires_in is {}",
            shown_seconds(e)
        )));
    }
    if let Some(left) = jwt_left.filter(|&l| l <= 0.0) {
        return Err(TokenResponseError::AlreadyExpired(format!(
            "its JWT exp is {} s before this machine's clock; check both clocks",
            shown_seconds(-left.round())
        )));
    }
    let seconds = match (expires_in, jwt_left) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => default_lifetime.as_secs_f64(),
    };
    Ok(AccessToken {
        value: token,
        lifetime: clamp_lifetime(seconds),
    })
}

/// Seconds from a number or a numeric string; anything else is treated as absent.
fn expires_in_seconds(v: &Value) -> Option<f64> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    // ±infinity is a number all the same ("1e999" as a string): clamped, or refused as
    // already expired; NaN says nothing.
    (!n.is_nan()).then_some(n)
}

/// A seconds value short enough for a log line: `-1e308`, not 309 digits.
fn shown_seconds(x: f64) -> String {
    if x.is_finite() && x != 0.0 && !(1e-3..1e9).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// Saturating conversion of a seconds value to a lifetime: negative → 0, huge → the cap.
fn clamp_lifetime(seconds: f64) -> Duration {
    // NaN is excluded by the callers; `partial_cmp` keeps a NaN at zero all the same.
    if seconds.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Duration::ZERO;
    }
    if seconds >= MAX_TOKEN_LIFETIME.as_secs_f64() {
        return MAX_TOKEN_LIFETIME;
    }
    Duration::from_secs_f64(seconds)
}

/// The `exp` claim of a JWT access token, without verifying it (we are not its audience; we only
/// want to know when the server will stop accepting it).
fn jwt_exp(token: &str) -> Option<f64> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims
        .get("exp")
        .and_then(Value::as_f64)
        .filter(|e| e.is_finite())
}

fn json_to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The spellings of `secret` a token endpoint might echo back: as sent in a form (`+` or `%20`
/// for a space) or in Basic credentials (RFC 3986 percent-encoding), JSON-escaped (an `error` that is not a string is shown as JSON), and in
/// base64 (standard or URL-safe, padded or not). Pass them to [`parse_token_response`] as
/// `secrets`; percent- and HTML-escaped echoes are found by decoding the text ([`redact`]).
pub fn echoed_forms(secret: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    let form: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let json = serde_json::to_string(secret).unwrap_or_default();
    let (b64, b64url) = (STANDARD.encode(secret), URL_SAFE.encode(secret));
    vec![
        secret.to_string(),
        super::client_credentials::percent_encode(secret),
        form.replace('+', "%20"),
        form,
        json.trim_matches('"').to_string(),
        b64.trim_end_matches('=').to_string(),
        b64,
        b64url.trim_end_matches('=').to_string(),
        b64url,
    ]
}

/// `text` with every occurrence of a non-empty secret, in any ASCII case (a percent-encoding's
/// hex digits may come back in either), replaced by `[redacted]`; longer secrets first. When
/// the text, percent-decoded (once or twice) or HTML-unescaped, still holds one, some other
/// escaping hides it: the whole text becomes `[redacted]`.
fn redact(text: String, secrets: &[&str]) -> String {
    let text = redact_spelled(text, secrets);
    let once = percent_encoding::percent_decode_str(&text)
        .decode_utf8_lossy()
        .into_owned();
    let twice = percent_encoding::percent_decode_str(&once)
        .decode_utf8_lossy()
        .into_owned();
    let html = text
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    let hidden = [once, twice, html]
        .into_iter()
        .any(|decoded| decoded != text && redact_spelled(decoded.clone(), secrets) != decoded);
    if hidden {
        "[redacted]".to_string()
    } else {
        text
    }
}

fn redact_spelled(text: String, secrets: &[&str]) -> String {
    let mut secrets: Vec<String> = secrets
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| s.to_ascii_lowercase())
        .collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut text = text;
    for secret in &secrets {
        // ASCII lowercasing keeps every byte offset, so matches in the copy are matches here.
        let lower = text.to_ascii_lowercase();
        if !lower.contains(secret.as_str()) {
            continue;
        }
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for (i, _) in lower.match_indices(secret.as_str()) {
            out.push_str(&text[last..i]);
            out.push_str("[redacted]");
            last = i + secret.len();
        }
        out.push_str(&text[last..]);
        text = out;
    }
    text
}

fn truncate(s: &str, max: usize) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match cleaned.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &cleaned[..i]),
        None => cleaned,
    }
}

/// A short, safe description of a non-JSON body for logs: only says whether it looks like HTML
/// or is empty (a body could echo back credentials, so its text is never logged).
fn body_hint(body: &[u8]) -> &'static str {
    let head = body.iter().take(64).copied().collect::<Vec<u8>>();
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if body.is_empty() {
        ", empty"
    } else if head.trim_start().starts_with("<!doctype html") || head.contains("<html") {
        ", HTML"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<AccessToken, TokenResponseError> {
        parse_token_response(
            body.as_bytes(),
            SystemTime::now(),
            Duration::from_secs(300),
            &[],
        )
    }

    fn jwt_with_exp(exp: u64) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(br#"{"alg":"HS256"}"#),
            e.encode(format!(r#"{{"exp":{exp}}}"#))
        )
    }

    #[test]
    fn standard_response() {
        let t = parse(r#"{"access_token":"x","token_type":"Bearer","expires_in":3600}"#).unwrap();
        assert_eq!(t.value, "x");
        assert_eq!(t.lifetime, Duration::from_secs(3600));
    }

    #[test]
    fn expires_in_as_string() {
        let t = parse(r#"{"access_token":"x","token_type":"Bearer","expires_in":"3600"}"#).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(3600));
    }

    #[test]
    fn token_type_any_case_or_absent() {
        for tt in [r#""bearer""#, r#""BEARER""#, "null"] {
            let body = format!(r#"{{"access_token":"x","token_type":{tt},"expires_in":60}}"#);
            assert!(parse(&body).is_ok(), "{tt}");
        }
        assert!(parse(r#"{"access_token":"x","expires_in":60}"#).is_ok());
        assert_eq!(
            parse(r#"{"access_token":"x","token_type":"DPoP"}"#).unwrap_err(),
            TokenResponseError::UnsupportedTokenType("DPoP".into())
        );
    }

    #[test]
    fn unknown_fields_ignored() {
        let t = parse(
            r#"{"access_token":"x","expires_in":60,"ext_expires_in":3600,"refresh_token":"r",
                "id_token":"i","nested":{"a":[1,2,{"b":null}]}}"#,
        )
        .unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(60));
    }

    #[test]
    fn error_object_with_any_status_is_an_error() {
        let e =
            parse(r#"{"error":"invalid_client","error_description":"bad secret"}"#).unwrap_err();
        assert_eq!(
            e,
            TokenResponseError::OAuth {
                error: "invalid_client".into(),
                description: Some("bad secret".into())
            }
        );
        assert_eq!(
            e.to_string(),
            "token endpoint returned error \"invalid_client\": bad secret"
        );
    }

    #[test]
    fn an_echoed_secret_is_redacted_before_truncation() {
        let secret = "S".repeat(64);
        // The secret straddles the 200-character cut: no prefix of it may survive.
        let description = format!("{}{secret}", "x".repeat(180));
        let body =
            serde_json::json!({"error": format!("bad {secret}"), "error_description": description});
        let e = parse_token_response(
            body.to_string().as_bytes(),
            SystemTime::now(),
            Duration::from_secs(300),
            &["", &secret],
        )
        .unwrap_err();
        assert_eq!(
            e,
            TokenResponseError::OAuth {
                error: "bad [redacted]".into(),
                description: Some(format!("{}[redacted]", "x".repeat(180))),
            }
        );
    }

    #[test]
    fn every_usual_spelling_of_an_echoed_secret_is_redacted() {
        let secret = r#"my$ecret p@ss+/=&"\x"#;
        let forms = echoed_forms(secret);
        let secrets: Vec<&str> = forms.iter().map(String::as_str).collect();
        let parse_with = |body: String| {
            parse_token_response(
                body.as_bytes(),
                SystemTime::now(),
                Duration::from_secs(300),
                &secrets,
            )
            .unwrap_err()
            .to_string()
        };
        let form: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
        let unpadded = b64.trim_end_matches('=').to_string();
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        for echo in [
            secret.to_string(),
            form.clone(),
            form.replace('+', "%20"),
            form.to_ascii_lowercase(),
            b64,
            unpadded,
            url_safe,
        ] {
            let body = serde_json::json!({"error": "invalid_client", "error_description": format!("got {echo}!")});
            let shown = parse_with(body.to_string());
            assert!(shown.ends_with("got [redacted]!"), "{echo:?}: {shown}");
        }
        // Other escapings (Python's quote() keeps `/`, HTML, double percent-encoding): the
        // whole text goes.
        for echo in [
            form.replace('+', "%20").replace("%2F", "/"),
            secret.replace('&', "&amp;").replace('"', "&quot;"),
            form.replace('%', "%25"),
        ] {
            let body = serde_json::json!({"error": "invalid_client", "error_description": format!("got {echo}!")});
            let shown = parse_with(body.to_string());
            assert!(shown.ends_with(": [redacted]"), "{echo:?}: {shown}");
        }
        // A description with escapes of its own and no secret is shown as it is.
        let body = serde_json::json!({"error": "invalid_client", "error_description": "100%25 &amp; more"});
        assert!(parse_with(body.to_string()).ends_with(": 100%25 &amp; more"));
        // Not strings: shown as JSON, so JSON-escaped.
        let body = serde_json::json!({"error": {"sent": secret}, "error_description": [secret]});
        let shown = parse_with(body.to_string());
        assert!(!shown.contains("ecret"), "{shown}");
        // An unsupported token_type that echoes it.
        let body = serde_json::json!({"access_token": "t", "token_type": secret});
        let shown = parse_with(body.to_string());
        assert!(
            shown.contains("[redacted]") && !shown.contains("ecret"),
            "{shown}"
        );
    }

    fn parse_as(body: &str, content_type: Option<&str>) -> Result<AccessToken, TokenResponseError> {
        parse_token_body(
            body.as_bytes(),
            content_type,
            SystemTime::now(),
            Duration::from_secs(300),
            &[],
        )
    }

    #[test]
    fn json_under_any_media_type() {
        let body = r#"{"access_token":"x","token_type":"bearer","expires_in":60}"#;
        for ct in [
            None,
            Some("application/json"),
            Some("text/plain; charset=iso-8859-1"),
            Some("text/html"),
            Some("text/javascript"),
            Some("application/vnd.example.token+json; version=2"),
            Some("application/x-www-form-urlencoded"),
            Some("application/octet-stream"),
        ] {
            let t = parse_as(body, ct).unwrap_or_else(|e| panic!("{ct:?}: {e}"));
            assert_eq!(
                (t.value.as_str(), t.lifetime.as_secs()),
                ("x", 60),
                "{ct:?}"
            );
        }
        let with_bom = format!("\u{feff}{body}");
        assert_eq!(parse_as(&with_bom, None).unwrap().value, "x");
    }

    #[test]
    fn form_encoded_responses() {
        let body = "access_token=a.b-c_d%2Be&token_type=bearer&expires_in=3600&scope=read+write";
        for ct in [
            Some("application/x-www-form-urlencoded"),
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            Some("text/plain"),
            None,
        ] {
            let t = parse_as(body, ct).unwrap_or_else(|e| panic!("{ct:?}: {e}"));
            assert_eq!(t.value, "a.b-c_d+e", "{ct:?}");
            assert_eq!(t.lifetime, Duration::from_secs(3600), "{ct:?}");
        }
        let e = parse_as(
            "error=invalid_client&error_description=Bad+client+secret",
            Some("application/x-www-form-urlencoded"),
        )
        .unwrap_err();
        assert_eq!(
            e,
            TokenResponseError::OAuth {
                error: "invalid_client".into(),
                description: Some("Bad client secret".into())
            }
        );
        assert_eq!(
            parse_as("access_token=x&token_type=mac", None).unwrap_err(),
            TokenResponseError::UnsupportedTokenType("mac".into())
        );
        assert_eq!(
            parse_as("access_token=a&access_token=b", None).unwrap_err(),
            TokenResponseError::RepeatedMember("access_token")
        );
        // Labelled as a form but without a token.
        assert_eq!(
            parse_as("foo=bar", Some("application/x-www-form-urlencoded")).unwrap_err(),
            TokenResponseError::MissingAccessToken
        );
        // Not labelled as a form and not like one: still "not JSON".
        for (body, ct) in [
            ("foo=bar", Some("text/plain")),
            ("<html>access_token=x</html>", Some("text/html")),
            ("access_token = x", None),
        ] {
            assert!(
                matches!(parse_as(body, ct), Err(TokenResponseError::NotJson(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn empty_access_token_refused() {
        assert_eq!(
            parse(r#"{"access_token":"","expires_in":0}"#).unwrap_err(),
            TokenResponseError::MissingAccessToken
        );
        assert_eq!(
            parse(r#"{"token_type":"Bearer"}"#).unwrap_err(),
            TokenResponseError::MissingAccessToken
        );
    }

    #[test]
    fn json_serde_cannot_read_says_why() {
        let e = parse(r#"{"access_token":"x","expires_in":1e400}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "token response is not a JSON object (39 bytes, number out of range at line 1 column 38)"
        );
    }

    #[test]
    fn html_and_empty_bodies() {
        let e = parse("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>").unwrap_err();
        assert!(
            matches!(e, TokenResponseError::NotJson(ref m) if m.contains("HTML")),
            "{e}"
        );
        let e = parse("").unwrap_err();
        assert!(
            matches!(e, TokenResponseError::NotJson(ref m) if m.contains("empty")),
            "{e}"
        );
        assert!(matches!(
            parse("[1]").unwrap_err(),
            TokenResponseError::NotJson(_)
        ));
    }

    #[test]
    fn absurd_expires_in_is_clamped_never_panics() {
        let cases = [
            ("0.001", Duration::from_millis(1)),
            ("9223372036854775807", MAX_TOKEN_LIFETIME),
            ("1e308", MAX_TOKEN_LIFETIME),
            ("1.5", Duration::from_millis(1500)),
            (r#""1e999""#, MAX_TOKEN_LIFETIME),
            (r#""NaN""#, Duration::from_secs(300)),
            (r#""abc""#, Duration::from_secs(300)),
        ];
        for (raw, want) in cases {
            let body = format!(r#"{{"access_token":"x","expires_in":{raw}}}"#);
            assert_eq!(parse(&body).unwrap().lifetime, want, "expires_in {raw}");
        }
    }

    #[test]
    fn jwt_exp_used_when_expires_in_absent_and_earliest_wins() {
        let now = SystemTime::now();
        let now_s = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let tok = jwt_with_exp(now_s + 120);
        let body = format!(r#"{{"access_token":"{tok}"}}"#);
        let t = parse_token_response(body.as_bytes(), now, Duration::from_secs(300), &[]).unwrap();
        assert!(t.lifetime <= Duration::from_secs(120) && t.lifetime > Duration::from_secs(118));
        let body = format!(r#"{{"access_token":"{tok}","expires_in":3600}}"#);
        let t = parse_token_response(body.as_bytes(), now, Duration::from_secs(300), &[]).unwrap();
        assert!(t.lifetime <= Duration::from_secs(120));
        let body = format!(r#"{{"access_token":"{tok}","expires_in":30}}"#);
        let t = parse_token_response(body.as_bytes(), now, Duration::from_secs(300), &[]).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(30));
    }

    #[test]
    fn a_token_already_expired_is_refused() {
        for raw in [
            "-1",
            r#""-3600""#,
            "-1e308",
            "-0.5",
            r#""-inf""#,
            r#""-1e999""#,
        ] {
            let body = format!(r#"{{"access_token":"x","expires_in":{raw}}}"#);
            assert!(
                matches!(parse(&body).unwrap_err(), TokenResponseError::AlreadyExpired(ref m) if m.starts_with("expires_in is")),
                "expires_in {raw}"
            );
        }
        // Said briefly, whatever the number.
        for (raw, shown) in [
            ("-1e308", "-1e308"),
            ("-1e-320", "-1e-320"),
            ("-2.5", "-2.5"),
        ] {
            let body = format!(r#"{{"access_token":"x","expires_in":{raw}}}"#);
            assert_eq!(
                parse(&body).unwrap_err().to_string(),
                format!("the access token has already expired: expires_in is {shown}")
            );
        }
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let now = UNIX_EPOCH + Duration::from_secs(now_s);
        let body = format!(
            r#"{{"access_token":"{}","expires_in":3600}}"#,
            jwt_with_exp(now_s - 90)
        );
        let e =
            parse_token_response(body.as_bytes(), now, Duration::from_secs(300), &[]).unwrap_err();
        assert!(e.to_string().contains("JWT exp is 90 s before"), "{e}");
        assert!(
            !e.to_string().contains("eyJ"),
            "the token is never shown: {e}"
        );
    }

    #[test]
    fn opaque_token_without_expiry_uses_default() {
        let t = parse(r#"{"access_token":"opaque"}"#).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(300));
        // expires_in 0 means "not given".
        for raw in ["0", "-0", r#""0""#, "0.0"] {
            let body = format!(r#"{{"access_token":"opaque","expires_in":{raw}}}"#);
            assert_eq!(
                parse(&body).unwrap().lifetime,
                Duration::from_secs(300),
                "{raw}"
            );
        }
    }

    #[test]
    fn token_with_header_breaking_characters_refused() {
        assert_eq!(
            parse("{\"access_token\":\"a\\r\\nX-Evil: 1\"}").unwrap_err(),
            TokenResponseError::InvalidTokenCharacters
        );
        assert_eq!(
            parse(r#"{"access_token":"a b"}"#).unwrap_err(),
            TokenResponseError::InvalidTokenCharacters
        );
    }

    #[test]
    fn debug_never_shows_token() {
        let t = parse(r#"{"access_token":"supersecrettoken","expires_in":5}"#).unwrap();
        assert!(!format!("{t:?}").contains("supersecrettoken"));
    }
}
