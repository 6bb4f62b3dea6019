//! The client credentials grant (RFC 6749 §4.4), as Driftrock uses it (Driftrock: Client
//! credentials), and the client authentication both grants share (RFC 6749 §2.3.1).

use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

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

/// Every byte except RFC 3986 §2.3's unreserved characters (`A–Z a–z 0–9 - . _ ~`).
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `Authorization: Basic …` value for `client_secret_basic`.
///
/// RFC 6749 §2.3.1: the client id and secret are each encoded with
/// `application/x-www-form-urlencoded` before being joined by `:` and base64-encoded
/// ([`BasicEncoding::Form`]). tokengate percent-encodes every byte outside RFC 3986 §2.3's
/// unreserved set (UTF-8 first), a space as `%20` and never `+`: a server that form-decodes
/// the credentials and one that only percent-decodes them (RFC 3986 §2.1) both read back the
/// exact id and secret. Some servers compare the values as sent (RFC 7617 as-is; Driftrock's
/// documentation's JavaScript example encodes them so): [`BasicEncoding::Raw`]. With only
/// unreserved characters in both, the two settings send the same bytes. The result is a
/// secret.
pub fn basic_authorization(client_id: &str, secret: &Secret, encoding: BasicEncoding) -> String {
    let joined = match encoding {
        BasicEncoding::Form => format!(
            "{}:{}",
            percent_encode(client_id),
            percent_encode(secret.expose())
        ),
        BasicEncoding::Raw => format!("{}:{}", client_id, secret.expose()),
    };
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(joined)
    )
}

/// `s` with every byte outside RFC 3986 §2.3's unreserved set percent-encoded (upper-case hex,
/// RFC 3986 §2.1), as [`basic_authorization`] sends each part.
pub fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, NOT_UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(v: &str) -> String {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(v.strip_prefix("Basic ").unwrap())
            .unwrap();
        String::from_utf8(raw).unwrap()
    }

    #[test]
    fn basic_form_percent_encodes_each_part_before_base64() {
        let v = basic_authorization(
            "dr/client 7",
            &Secret::new("s3cr+t/%41:y=z"),
            BasicEncoding::Form,
        );
        // A space is %20, never `+`: percent-decoding alone reads it back too.
        assert_eq!(decoded(&v), "dr%2Fclient%207:s3cr%2Bt%2F%2541%3Ay%3Dz");
        let v = basic_authorization("Az09-._~", &Secret::new("@!$&'()*,;é"), BasicEncoding::Form);
        assert_eq!(decoded(&v), "Az09-._~:%40%21%24%26%27%28%29%2A%2C%3B%C3%A9");
    }

    #[test]
    fn basic_raw_keeps_values() {
        let v = basic_authorization("s6BhdRkqt3", &Secret::new("gX1fBat3bV"), BasicEncoding::Raw);
        // The example credentials of RFC 6749 §4.4.2, used in Driftrock: Client credentials too.
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
