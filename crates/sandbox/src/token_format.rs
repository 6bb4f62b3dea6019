//! How the sandbox token endpoints write their answers, beyond the JSON of RFC 6749 §5.1: a
//! content coding chosen by the server (RFC 9110 §8.4.1), and the form-encoded body some
//! servers send instead of JSON.

use std::io::Write as _;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, StatusCode};
use http_body_util::{BodyExt as _, Full};

use super::auth::JsonField;
use super::server::Resp;

/// A content coding a sandbox token endpoint applies to its answers whatever the client's
/// `Accept-Encoding` says (RFC 9110 §8.4.1), as some servers and the proxies in front of them
/// do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentCoding {
    /// `gzip` (RFC 1952; RFC 9110 §8.4.1.3).
    Gzip,
    /// `deflate`: the zlib format (RFC 1950; RFC 9110 §8.4.1.2).
    Deflate,
    /// `br`: Brotli (RFC 7932).
    Br,
}

impl ContentCoding {
    /// The `Content-Encoding` value.
    pub fn name(self) -> &'static str {
        match self {
            ContentCoding::Gzip => "gzip",
            ContentCoding::Deflate => "deflate",
            ContentCoding::Br => "br",
        }
    }

    /// `body` in this coding.
    pub fn encode(self, body: &[u8]) -> Vec<u8> {
        // Writing into a Vec cannot fail.
        match self {
            ContentCoding::Gzip => {
                let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                let _ = w.write_all(body);
                w.finish().unwrap_or_default()
            }
            ContentCoding::Deflate => {
                let mut w =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                let _ = w.write_all(body);
                w.finish().unwrap_or_default()
            }
            ContentCoding::Br => {
                let mut out = Vec::new();
                {
                    let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                    let _ = w.write_all(body);
                }
                out
            }
        }
    }
}

/// The body format of successful token responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResponseFormat {
    /// RFC 6749 §5.1: a JSON object (`Content-Type: application/json;charset=UTF-8`).
    #[default]
    Json,
    /// `application/x-www-form-urlencoded`:
    /// `access_token=…&token_type=bearer&expires_in=3600` (plus `scope` when requested), as
    /// some servers answer a client that does not ask for JSON.
    Form,
}

/// A form-encoded success body. `token_type` and `expires_in` follow the same overrides as the
/// JSON body: a [`JsonField::Raw`] JSON string is sent as its text, other raw JSON as written.
pub(crate) fn form_body(
    token: &str,
    token_type: &JsonField,
    expires_in: &JsonField,
    lifetime_secs: u64,
    scope: Option<&str>,
) -> String {
    let raw_text = |raw: &str| match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(serde_json::Value::String(s)) => s,
        _ => raw.to_owned(),
    };
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("access_token", token);
    match token_type {
        JsonField::Normal => {
            form.append_pair("token_type", "bearer");
        }
        JsonField::Absent => {}
        JsonField::Raw(raw) => {
            form.append_pair("token_type", &raw_text(raw));
        }
    }
    match expires_in {
        JsonField::Normal => {
            form.append_pair("expires_in", &lifetime_secs.to_string());
        }
        JsonField::Absent => {}
        JsonField::Raw(raw) => {
            form.append_pair("expires_in", &raw_text(raw));
        }
    }
    if let Some(scope) = scope {
        form.append_pair("scope", scope);
    }
    form.finish()
}

/// A 200 answer with a form-encoded body (`Cache-Control: no-store`, RFC 6749 §5.1).
pub(crate) fn form_response(body: String) -> Resp {
    let mut response = Resp::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `response` with its body in `coding` and `Content-Encoding` set.
pub(crate) async fn encode_response(response: Resp, coding: ContentCoding) -> Resp {
    let (mut parts, body) = response.into_parts();
    // A `Full` body is already complete: collecting it cannot fail or wait.
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let encoded = coding.encode(&bytes);
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_ENCODING, HeaderValue::from_static(coding.name()));
    Resp::from_parts(parts, Full::new(Bytes::from(encoded)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn each_coding_round_trips() {
        let body = br#"{"access_token":"t","expires_in":3600}"#;
        let gz = ContentCoding::Gzip.encode(body);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
        let zlib = ContentCoding::Deflate.encode(body);
        out.clear();
        flate2::read::ZlibDecoder::new(&zlib[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
        let br = ContentCoding::Br.encode(body);
        out.clear();
        brotli::Decompressor::new(&br[..], 4096)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
    }

    #[test]
    fn form_body_follows_the_overrides() {
        let b = form_body(
            "a+b",
            &JsonField::Normal,
            &JsonField::Normal,
            3600,
            Some("x y"),
        );
        assert_eq!(
            b,
            "access_token=a%2Bb&token_type=bearer&expires_in=3600&scope=x+y"
        );
        let b = form_body(
            "t",
            &JsonField::Absent,
            &JsonField::string("60"),
            3600,
            None,
        );
        assert_eq!(b, "access_token=t&expires_in=60");
    }
}
