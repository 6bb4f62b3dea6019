//! Client authentication at the sandbox token endpoints (RFC 6749 §2.3.1).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// How a sandbox authorization server decodes `Authorization: Basic` client credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BasicDecoding {
    /// RFC 6749 §2.3.1: after base64-decoding and splitting at the first `:`, the client id and
    /// the secret are each `application/x-www-form-urlencoded`-decoded (`+` is a space, `%XX` a
    /// byte; a malformed `%` escape fails). The client must have encoded them first, so id
    /// `dr/client 7` with secret `s3cr+t/%41:y=z` arrives as
    /// `dr%2Fclient+7:s3cr%2Bt%2F%2541%3Ay%3Dz` or `dr%2Fclient%207:…`. What RFC 6749 §2.3.1
    /// requires, and what Keycloak and Spring Authorization Server do.
    #[default]
    Form,
    /// Percent-decoding only (RFC 3986 §2.1): `%XX` is a byte, `+` stays `+`, and a malformed
    /// `%` escape is kept as it is, as Python's `urllib.parse.unquote` does (Authlib's
    /// `extract_basic_authorization`). A client that sends a space as `+` is refused here.
    Percent,
    /// RFC 7617: the base64-decoded `id:secret` is split at the first `:` and compared as is
    /// (what the JavaScript example in "Driftrock: Client credentials" does, and what most HTTP
    /// clients' "basic auth" helpers send). A client id with a `:` cannot be sent this way
    /// (RFC 7617 §2).
    Raw,
}

/// Why Basic credentials could not be decoded (the `error_description` of the 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BasicError {
    #[error("malformed Basic credentials: not base64")]
    Base64,
    #[error("malformed Basic credentials: no ':' between client id and secret")]
    NoColon,
    #[error("malformed Basic credentials: bad form-urlencoding")]
    FormEncoding,
    #[error("malformed Basic credentials: not UTF-8")]
    Utf8,
}

/// Decodes the credentials part of `Authorization: Basic <credentials>` into (id, secret).
pub(crate) fn decode_basic(
    credentials: &str,
    mode: BasicDecoding,
) -> Result<(String, String), BasicError> {
    let decoded = STANDARD
        .decode(credentials.trim())
        .map_err(|_| BasicError::Base64)?;
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or(BasicError::NoColon)?;
    let (id, secret) = (&decoded[..colon], &decoded[colon + 1..]);
    match mode {
        BasicDecoding::Form => Ok((form_decode(id)?, form_decode(secret)?)),
        BasicDecoding::Percent => Ok((percent_decode(id)?, percent_decode(secret)?)),
        BasicDecoding::Raw => Ok((utf8(id)?, utf8(secret)?)),
    }
}

/// Strict `application/x-www-form-urlencoded` decoding of one component.
pub(crate) fn form_decode(input: &[u8]) -> Result<String, BasicError> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = input.get(i + 1).and_then(|&b| hex(b));
                let lo = input.get(i + 2).and_then(|&b| hex(b));
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(BasicError::FormEncoding),
                }
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    utf8(&out)
}

/// Lenient percent-decoding of one component: `%XX` is a byte, anything else (`+`, a malformed
/// escape) is kept, as Python's `unquote` does.
fn percent_decode(input: &[u8]) -> Result<String, BasicError> {
    utf8(&percent_encoding::percent_decode(input).collect::<Vec<u8>>())
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

fn utf8(bytes: &[u8]) -> Result<String, BasicError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| BasicError::Utf8)
}

/// `application/x-www-form-urlencoded` encoding of one component, as a client must do it before
/// Basic encoding (RFC 6749 §2.3.1, Appendix B). Public so tests can build correct headers.
pub fn form_encode(component: &str) -> String {
    form_urlencoded::byte_serialize(component.as_bytes()).collect()
}

/// The `Authorization` header value a correct RFC 6749 §2.3.1 client sends.
pub fn basic_authorization(client_id: &str, client_secret: &str) -> String {
    let pair = format!("{}:{}", form_encode(client_id), form_encode(client_secret));
    format!("Basic {}", STANDARD.encode(pair))
}

/// The `Authorization` header value an RFC 7617 client (no form-encoding) sends.
pub fn basic_authorization_raw(client_id: &str, client_secret: &str) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{client_id}:{client_secret}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6749_form_encoding_round_trip() {
        assert_eq!(form_encode("dr/client 7"), "dr%2Fclient+7");
        assert_eq!(form_encode("s3cr+t/%41:y=z"), "s3cr%2Bt%2F%2541%3Ay%3Dz");
        let header = basic_authorization("dr/client 7", "s3cr+t/%41:y=z");
        let creds = header.strip_prefix("Basic ").unwrap_or_default();
        assert_eq!(
            decode_basic(creds, BasicDecoding::Form),
            Ok(("dr/client 7".to_owned(), "s3cr+t/%41:y=z".to_owned()))
        );
        assert_eq!(
            decode_basic(creds, BasicDecoding::Raw),
            Ok((
                "dr%2Fclient+7".to_owned(),
                "s3cr%2Bt%2F%2541%3Ay%3Dz".to_owned()
            ))
        );
    }

    #[test]
    fn raw_credentials_decode_differently_in_form_mode() {
        let header = basic_authorization_raw("dr/client 7", "s3cr+t/%41:y=z");
        let creds = header.strip_prefix("Basic ").unwrap_or_default();
        assert_eq!(
            decode_basic(creds, BasicDecoding::Form),
            Ok(("dr/client 7".to_owned(), "s3cr t/A:y=z".to_owned()))
        );
        assert_eq!(
            decode_basic(creds, BasicDecoding::Raw),
            Ok(("dr/client 7".to_owned(), "s3cr+t/%41:y=z".to_owned()))
        );
    }

    #[test]
    fn percent_decoding_keeps_plus_and_malformed_escapes() {
        let header = basic_authorization_raw("dr%2Fclient%207", "a+b%41%4");
        let creds = header.strip_prefix("Basic ").unwrap_or_default();
        assert_eq!(
            decode_basic(creds, BasicDecoding::Percent),
            Ok(("dr/client 7".to_owned(), "a+bA%4".to_owned()))
        );
        // The `+` of form-encoding is not a space here.
        let header = basic_authorization("dr/client 7", "x");
        let creds = header.strip_prefix("Basic ").unwrap_or_default();
        assert_eq!(
            decode_basic(creds, BasicDecoding::Percent),
            Ok(("dr/client+7".to_owned(), "x".to_owned()))
        );
    }

    #[test]
    fn malformed_credentials() {
        assert_eq!(
            decode_basic("!!!", BasicDecoding::Form),
            Err(BasicError::Base64)
        );
        let no_colon = STANDARD.encode("abc");
        assert_eq!(
            decode_basic(&no_colon, BasicDecoding::Raw),
            Err(BasicError::NoColon)
        );
        let bad_escape = STANDARD.encode("a:%4");
        assert_eq!(
            decode_basic(&bad_escape, BasicDecoding::Form),
            Err(BasicError::FormEncoding)
        );
        let bad_utf8 = STANDARD.encode("a:%FF");
        assert_eq!(
            decode_basic(&bad_utf8, BasicDecoding::Form),
            Err(BasicError::Utf8)
        );
    }
}
