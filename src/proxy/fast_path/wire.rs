//! The fast path's parsers of network bytes, as plain functions over byte slices: the entry
//! points for fuzzing (`fuzz/`) and for tests. Each runs exactly the code the fast path runs on
//! a connection, without the connection.

use std::ops::Range;

use http::Method;

use super::request::{parse_request, Parsed};
use super::response::{parse_response, ChunkedEnd};
use crate::proxy::policy::GatewayError;

pub use super::response::Framing;

/// Largest request head [`request_head`] accepts, bytes (431 past it): the default
/// `server.max_request_head`.
pub const MAX_HEAD: usize = crate::config::ClientLimits::DEFAULT_MAX_REQUEST_HEAD;
/// Largest incomplete response head [`response_head`] reads on, bytes.
pub const MAX_RESPONSE_HEAD: usize = super::MAX_RESPONSE_HEAD;
/// Longest chunk-size line (size, extensions, CRLF) [`chunked_body`] reads, bytes.
pub const MAX_CHUNK_LINE: usize = super::response::MAX_CHUNK_LINE;
/// How much of a chunk-size line [`chunked_body`] checks before the line's LF arrives, bytes.
pub const CHUNK_LINE_EARLY_CHECK: usize = super::response::EARLY_CHECK;

/// What the fast path makes of the bytes at the start of a client connection's buffer.
#[derive(Debug)]
pub enum RequestHead {
    /// A complete HTTP/1.1 origin-form head the policy admits.
    Plain(PlainRequest),
    /// The head is not complete yet: read on.
    Partial,
    /// Handed to pingora-proxy's path (HTTP/1.0, another target form, a target or framing
    /// that path decides on).
    Delegate,
    /// Answered with this gateway error (400 or 431), and the connection closed.
    Refuse(GatewayError),
}

/// A request head the fast path parsed: positions are byte ranges into the bytes parsed.
#[derive(Debug)]
pub struct PlainRequest {
    /// Length of the head, up to and including its empty line.
    pub head_len: usize,
    /// Length of the body (`Content-Length`, or 0).
    pub body_len: usize,
    /// The method.
    pub method: Method,
    /// The request-target.
    pub target: Range<usize>,
    /// Where the target's path ends: at its first `?`, or with the target.
    pub path_end: usize,
    /// The `Host` field's value.
    pub host: Range<usize>,
    /// The first `X-Request-Id` field's value.
    pub request_id: Option<Range<usize>>,
    /// `Connection: close`.
    pub close: bool,
    /// Whether the fast path forwards it itself (otherwise pingora-proxy's path does, with the
    /// same decisions).
    pub fast: bool,
    /// Each field's name and value, in received order.
    pub fields: Vec<(Range<usize>, Range<usize>)>,
}

/// The fast path's request-head parser and classifier (httparse, the request line and target
/// checks, the policy's field scan) on `bytes`, the start of a client connection's buffer.
/// For fuzzing and tests.
pub fn request_head(bytes: &[u8]) -> RequestHead {
    let mut fields = Vec::new();
    match parse_request(bytes, &mut fields, MAX_HEAD) {
        Parsed::Plain(p) => RequestHead::Plain(PlainRequest {
            fast: p.fast(),
            head_len: p.head_len,
            body_len: p.body_len,
            method: p.method,
            target: p.target,
            path_end: p.path_end,
            host: p.host,
            request_id: p.request_id,
            close: p.close,
            fields: fields.into_iter().map(|f| (f.name, f.value)).collect(),
        }),
        Parsed::Partial => RequestHead::Partial,
        Parsed::Delegate(_) => RequestHead::Delegate,
        Parsed::Refuse(e) => RequestHead::Refuse(e),
    }
}

/// An upstream response head the fast path parsed, and the head it sends the client.
#[derive(Debug)]
pub struct ResponseHead {
    /// Length of the upstream's head, up to and including its empty line.
    pub head_len: usize,
    /// The status code.
    pub status: u16,
    /// How the body is delimited.
    pub framing: Framing,
    /// The upstream closes the connection after this response.
    pub upstream_close: bool,
    /// The head written for the client.
    pub client_head: Vec<u8>,
}

/// The fast path's response-head parser and rewriter on `bytes`, the start of an upstream
/// connection's buffer: for a request that was a `HEAD` (`head_request`), had the id
/// `request_id` and keeps its connection open (`keepalive`). `Ok(None)`: incomplete.
/// For fuzzing and tests.
///
/// # Errors
/// What makes the head unusable (malformed, too large, invalid framing).
pub fn response_head(
    bytes: &[u8],
    head_request: bool,
    request_id: &[u8],
    keepalive: bool,
) -> Result<Option<ResponseHead>, &'static str> {
    let mut out = Vec::new();
    Ok(
        parse_response(bytes, head_request, request_id, keepalive, &mut out)?.map(|h| {
            ResponseHead {
                head_len: h.head_len,
                status: h.status,
                framing: h.framing,
                upstream_close: h.upstream_close,
                client_head: out,
            }
        }),
    )
}

/// The fast path's chunked-body tracker (RFC 9112 §7.1) fed `pieces` in order, as reads
/// deliver a body: `Ok(Some(n))` when the body ends after its first `n` bytes (counted over
/// all pieces), `Ok(None)` when it has not ended yet. For fuzzing and tests.
///
/// # Errors
/// A malformed chunk-size line, chunk end or trailer section.
pub fn chunked_body(pieces: &[&[u8]]) -> Result<Option<usize>, &'static str> {
    let mut tracker = ChunkedEnd::default();
    let mut offset = 0;
    for piece in pieces {
        if let Some(end) = tracker.feed(piece)? {
            return Ok(Some(offset + end));
        }
        offset += piece.len();
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_through_the_entry() {
        let raw = b"GET /a?b HTTP/1.1\r\nHost: gw\r\nX-Request-Id: r1\r\n\r\n";
        let RequestHead::Plain(p) = request_head(raw) else {
            panic!("plain");
        };
        assert!(p.fast);
        assert_eq!(p.head_len, raw.len());
        assert_eq!(&raw[p.target.clone()], b"/a?b");
        assert_eq!(p.path_end, p.target.start + 2);
        assert_eq!(&raw[p.host], b"gw");
        assert_eq!(p.request_id.map(|r| &raw[r]), Some(&b"r1"[..]));
        assert_eq!(p.fields.len(), 2);
        assert_eq!(&raw[p.fields[1].0.clone()], b"X-Request-Id");
        assert!(matches!(
            request_head(b"GET / HTTP/1.1\r\nHo"),
            RequestHead::Partial
        ));
        assert!(matches!(
            request_head(b"GET / HTTP/1.0\r\n\r\n"),
            RequestHead::Delegate
        ));
        assert!(matches!(
            request_head(b"GET  / HTTP/1.1\r\nHost: gw\r\n\r\n"),
            RequestHead::Refuse(GatewayError::BadRequest(_))
        ));
    }

    #[test]
    fn response_heads_and_chunked_bodies_through_the_entry() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nDate: d\r\n\r\n";
        let head = response_head(raw, false, b"id", true)
            .expect("valid")
            .expect("complete");
        assert_eq!((head.head_len, head.status), (raw.len(), 200));
        assert_eq!(head.framing, Framing::Chunked);
        assert_eq!(
            head.client_head,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nDate: d\r\n\
              Connection: keep-alive\r\nX-Request-Id: id\r\n\r\n"
        );
        assert!(matches!(
            response_head(b"HTTP/1.1 2", false, b"id", true),
            Ok(None)
        ));
        assert!(response_head(b"HTTP/1.1 2x", false, b"id", true).is_err());

        assert_eq!(
            chunked_body(&[b"3\r\nab", b"c\r\n0\r\n\r\nX"]),
            Ok(Some(13))
        );
        assert_eq!(chunked_body(&[b"3\r\nab"]), Ok(None));
        assert!(chunked_body(&[b"3\r\nabcd"]).is_err());
    }
}
