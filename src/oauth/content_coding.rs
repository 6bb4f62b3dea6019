//! Content codings of token endpoint and discovery answers (RFC 9110 §8.4).
//!
//! tokengate asks for `gzip`, `deflate` and `br` (RFC 9110 §12.5.3) and decodes whichever of
//! them the server applies, asked for or not: some servers, and the proxies in front of them,
//! compress whatever the request said.

use std::io::Read;

/// The `Accept-Encoding` value sent with every token and discovery request.
pub const ACCEPT_ENCODING: &str = "gzip, deflate, br";

/// Why a body could not be decoded. The message names the coding, never the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A coding tokengate does not implement (e.g. `zstd`, `compress`).
    #[error("Content-Encoding {0:?} is not supported; tokengate decodes gzip, deflate and br")]
    Unsupported(String),
    /// The bytes are not valid in the coding the server named.
    #[error("the body is not valid {coding} ({reason})")]
    Corrupt {
        /// The coding (`gzip`, `deflate`, `br`).
        coding: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// The decoded body is larger than the limit (a decompression bomb, or not a token
    /// response).
    #[error("the body is larger than {0} bytes once decoded")]
    TooLarge(usize),
}

/// Decodes `body` sent with `Content-Encoding: content_encoding` (`None`: not encoded).
///
/// Codings listed one after another (`gzip, br`) were applied in that order, so they are
/// undone last first (RFC 9110 §8.4). `identity` (and an empty list) is no coding; `x-gzip`
/// is `gzip` (RFC 9110 §8.4.1.3); names are case-insensitive. `deflate` is the zlib format
/// (RFC 9110 §8.4.1.2); raw deflate data, which some servers send under that name, is read
/// too. The result is at most `limit` bytes.
///
/// # Errors
/// [`DecodeError`]: an unknown coding, bytes that are not valid in it, or a result over
/// `limit`.
pub fn decode(
    body: Vec<u8>,
    content_encoding: Option<&str>,
    limit: usize,
) -> Result<Vec<u8>, DecodeError> {
    let Some(list) = content_encoding else {
        return Ok(body);
    };
    let codings: Vec<String> = list
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    let mut body = body;
    for coding in codings.iter().rev() {
        body = match coding.as_str() {
            "gzip" | "x-gzip" => {
                read_all(flate2::read::MultiGzDecoder::new(&body[..]), "gzip", limit)?
            }
            "deflate" => {
                match read_all(flate2::read::ZlibDecoder::new(&body[..]), "deflate", limit) {
                    Err(DecodeError::Corrupt { .. }) => read_all(
                        flate2::read::DeflateDecoder::new(&body[..]),
                        "deflate",
                        limit,
                    )?,
                    other => other?,
                }
            }
            "br" => read_all(brotli::Decompressor::new(&body[..], 4096), "br", limit)?,
            other => return Err(DecodeError::Unsupported(truncated(other))),
        };
    }
    Ok(body)
}

/// Reads `reader` to the end, at most `limit` bytes.
fn read_all(reader: impl Read, coding: &'static str, limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Corrupt {
            coding,
            reason: e.to_string(),
        })?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge(limit));
    }
    Ok(out)
}

fn truncated(name: &str) -> String {
    name.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const BODY: &[u8] = br#"{"access_token":"t","token_type":"Bearer","expires_in":3600}"#;

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(b).unwrap();
        w.finish().unwrap()
    }

    fn zlib(b: &[u8]) -> Vec<u8> {
        let mut w = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(b).unwrap();
        w.finish().unwrap()
    }

    fn raw_deflate(b: &[u8]) -> Vec<u8> {
        let mut w = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(b).unwrap();
        w.finish().unwrap()
    }

    fn br(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            w.write_all(b).unwrap();
        }
        out
    }

    #[test]
    fn every_coding_is_decoded() {
        for (coding, encoded) in [
            ("gzip", gzip(BODY)),
            ("x-gzip", gzip(BODY)),
            ("GZIP", gzip(BODY)),
            ("deflate", zlib(BODY)),
            ("deflate", raw_deflate(BODY)),
            ("br", br(BODY)),
            ("identity", BODY.to_vec()),
            ("", BODY.to_vec()),
        ] {
            assert_eq!(
                decode(encoded, Some(coding), 1 << 20).as_deref(),
                Ok(BODY),
                "{coding}"
            );
        }
        assert_eq!(decode(BODY.to_vec(), None, 1 << 20).as_deref(), Ok(BODY));
    }

    #[test]
    fn stacked_codings_are_undone_last_first() {
        let body = br(&gzip(BODY));
        assert_eq!(
            decode(body, Some("gzip, identity, br"), 1 << 20).as_deref(),
            Ok(BODY)
        );
    }

    #[test]
    fn unknown_corrupt_and_oversized_bodies_are_errors() {
        assert_eq!(
            decode(BODY.to_vec(), Some("zstd"), 1 << 20),
            Err(DecodeError::Unsupported("zstd".into()))
        );
        assert!(matches!(
            decode(b"not gzip".to_vec(), Some("gzip"), 1 << 20),
            Err(DecodeError::Corrupt { coding: "gzip", .. })
        ));
        assert!(matches!(
            decode(b"not brotli at all".to_vec(), Some("br"), 1 << 20),
            Err(DecodeError::Corrupt { coding: "br", .. })
        ));
        // A small body that expands past the limit stops there.
        let bomb = gzip(&vec![b' '; 4 << 20]);
        assert!(bomb.len() < 64 << 10);
        assert_eq!(
            decode(bomb, Some("gzip"), 1 << 20),
            Err(DecodeError::TooLarge(1 << 20))
        );
    }
}
