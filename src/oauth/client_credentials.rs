//! The client credentials grant (RFC 6749 §4.4), as Driftrock uses it (seed 003), and the
//! client authentication both grants share (RFC 6749 §2.3.1).

use base64::Engine;

use crate::config::{BasicEncoding, Secret};

/// `grant_type` value for this grant (RFC 6749 §4.4.2).
pub const GRANT_TYPE: &str = "client_credentials";

/// Token request form parameters for the client credentials grant: `grant_type`, and the
/// optional `scope` (RFC 6749 §3.3), `audience` and `resource` (RFC 8707) parameters.
pub fn form_params(
    scope: Option<&str>,
    audience: Option<&str>,
    resource: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut form = vec![("grant_type", GRANT_TYPE.to_string())];
    for (name, value) in [
        ("scope", scope),
        ("audience", audience),
        ("resource", resource),
    ] {
        if let Some(v) = value {
            form.push((name, v.to_string()));
        }
    }
    form
}

/// The `Authorization: Basic …` value for `client_secret_basic`.
///
/// RFC 6749 §2.3.1: the client id and secret are each encoded with
/// `application/x-www-form-urlencoded` before being joined by `:` and base64-encoded
/// ([`BasicEncoding::Form`]). Some servers compare the raw values (RFC 7617 as-is; seed 003's
/// JavaScript example does that): [`BasicEncoding::Raw`]. The result is a secret.
pub fn basic_authorization(client_id: &str, secret: &Secret, encoding: BasicEncoding) -> String {
    let joined = match encoding {
        BasicEncoding::Form => format!(
            "{}:{}",
            form_encode(client_id),
            form_encode(secret.expose())
        ),
        BasicEncoding::Raw => format!("{}:{}", client_id, secret.expose()),
    };
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(joined)
    )
}

fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_form_encodes_each_part_before_base64() {
        let v = basic_authorization(
            "dr/client 7",
            &Secret::new("s3cr+t/%41:y=z"),
            BasicEncoding::Form,
        );
        let raw = base64::engine::general_purpose::STANDARD
            .decode(v.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(
            String::from_utf8(raw).unwrap(),
            "dr%2Fclient+7:s3cr%2Bt%2F%2541%3Ay%3Dz"
        );
    }

    #[test]
    fn basic_raw_keeps_values() {
        let v = basic_authorization("s6BhdRkqt3", &Secret::new("gX1fBat3bV"), BasicEncoding::Raw);
        // RFC 6749 §2.3.1 / seed 003 example value.
        assert_eq!(v, "Basic czZCaGRSa3F0MzpnWDFmQmF0M2JW");
    }

    #[test]
    fn optional_parameters_only_when_set() {
        assert_eq!(
            form_params(None, None, None),
            vec![("grant_type", "client_credentials".to_string())]
        );
        let f = form_params(Some("a b"), Some("api"), Some("https://r"));
        assert_eq!(f.len(), 4);
        assert_eq!(f[1], ("scope", "a b".to_string()));
    }
}
