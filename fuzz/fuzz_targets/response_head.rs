//! The fast path's response-head parser and rewriter (`fast_path::wire::response_head`) on
//! arbitrary bytes from an upstream. The first input byte picks the request's kind (bit 0: a
//! `HEAD` request, bit 1: the client keeps its connection open); the rest is the response.
//!
//! Checked besides "no panic", for every head it forwards:
//! - the client's head parses again with httparse in its strict default configuration (no
//!   obsolete line folding, no space before a colon), completely, as HTTP/1.1 with the same
//!   status;
//! - it holds exactly one `X-Request-Id`, the request's; a final head holds at most one
//!   `Content-Length` (none when `Transfer-Encoding` decides the framing, the length when it
//!   does), exactly one `Connection` (`keep-alive` only when the client keeps its connection
//!   and the body has a length), a `Date`, and no `Keep-Alive` or `Proxy-Connection`;
//! - a response with no body (`HEAD`, 1xx, 204, 304) has no framing;
//! - every read boundary before the head's end gives "incomplete", and the head alone gives
//!   the same answer as the head with whatever follows it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::proxy::fast_path::wire::{self, Framing, ResponseHead, MAX_RESPONSE_HEAD};

const REQUEST_ID: &[u8] = b"req-0123456789";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 != 0;
    let keepalive = flags & 2 != 0;
    match wire::response_head(bytes, head_request, REQUEST_ID, keepalive) {
        Ok(Some(head)) => forwarded(bytes, head_request, keepalive, &head),
        Ok(None) => assert!(bytes.len() <= MAX_RESPONSE_HEAD),
        Err(_) => {}
    }
});

fn forwarded(bytes: &[u8], head_request: bool, keepalive: bool, head: &ResponseHead) {
    assert!(head.head_len <= bytes.len());
    let out = &head.client_head;
    let mut storage = vec![httparse::EMPTY_HEADER; 300];
    let mut resp = httparse::Response::new(&mut storage);
    match resp.parse(out) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, out.len()),
        other => panic!("client head {:?}: {other:?}", String::from_utf8_lossy(out)),
    }
    assert_eq!(resp.version, Some(1));
    assert_eq!(resp.code, Some(head.status));
    let count = |name: &str| {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    let value = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    assert_eq!(
        count("x-request-id"),
        1,
        "{:?}",
        String::from_utf8_lossy(out)
    );
    assert_eq!(value("x-request-id"), Some(REQUEST_ID));

    let informational = (100..200).contains(&head.status);
    if head_request || informational || head.status == 204 || head.status == 304 {
        assert_eq!(head.framing, Framing::None);
    }
    if !informational {
        let lengths = count("content-length");
        assert!(lengths <= 1, "{:?}", String::from_utf8_lossy(out));
        if head.framing == Framing::Chunked {
            assert_eq!(lengths, 0);
        }
        if let Framing::Length(n) = head.framing {
            assert_eq!(value("content-length"), Some(n.to_string().as_bytes()));
        }
        assert_eq!(count("connection"), 1);
        let open = keepalive && head.framing != Framing::UntilClose;
        let connection: &[u8] = if open { b"keep-alive" } else { b"close" };
        assert_eq!(value("connection"), Some(connection));
        assert!(count("date") >= 1);
        assert_eq!(count("keep-alive") + count("proxy-connection"), 0);
    }

    // The head alone reads the same; a read that ends before it is incomplete.
    let alone = wire::response_head(&bytes[..head.head_len], head_request, REQUEST_ID, keepalive)
        .expect("the head alone is valid")
        .expect("the head alone is complete");
    assert_eq!(
        (
            alone.head_len,
            alone.status,
            alone.framing,
            alone.upstream_close
        ),
        (
            head.head_len,
            head.status,
            head.framing,
            head.upstream_close
        )
    );
    let step = (head.head_len / 16).max(1);
    let splits = (0..head.head_len)
        .step_by(step)
        .chain(head.head_len.saturating_sub(2)..head.head_len);
    for k in splits {
        let got = wire::response_head(&bytes[..k], head_request, REQUEST_ID, keepalive);
        assert!(
            matches!(got, Ok(None)),
            "the first {k} bytes of a {}-byte head: {:?}",
            head.head_len,
            got.map(|h| h.map(|h| h.status))
        );
    }
}
