//! The client's request on the fast path: which requests are plain enough for it
//! ([`parse_request`]) and the upstream request written from the client's bytes
//! ([`write_upstream_request`]).

use std::mem::MaybeUninit;
use std::ops::Range;

use http::{HeaderValue, Method};

use super::response::{offset_in, FieldWriter};
use super::{name_is, parse_content_length, Conn, RequestCtx, MAX_FIELDS, MAX_HEAD};
use crate::proxy::headers::{uri_bytes, valid_host};
use crate::proxy::routes::Route;
use crate::proxy::split_target_rewritten;

/// What a request field is to the gateway.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    Other,
    Authorization,
    /// Removed: `Proxy-Authorization`, `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`.
    Drop,
    Cookie,
    Host,
    XForwardedHost,
    XForwardedProto,
    XForwardedFor,
    XRequestId,
    Connection,
    ContentLength,
    /// A field the fast path does not handle: the request goes to pingora.
    Unhandled,
}

/// One request field: byte ranges into `Conn::buf`.
#[derive(Clone, Debug)]
pub(super) struct Field {
    pub(super) name: Range<usize>,
    pub(super) value: Range<usize>,
    pub(super) kind: Kind,
}

pub(super) fn classify(name: &[u8]) -> Kind {
    let is = |s: &'static str| name_is(name, s);
    match name.len() {
        2 if is("te") => Kind::Unhandled,
        4 if is("host") => Kind::Host,
        6 if is("cookie") => Kind::Cookie,
        6 if is("expect") => Kind::Unhandled,
        7 if is("upgrade") || is("trailer") => Kind::Unhandled,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::Drop,
        12 if is("x-request-id") => Kind::XRequestId,
        13 if is("authorization") => Kind::Authorization,
        14 if is("content-length") => Kind::ContentLength,
        14 if is("http2-settings") => Kind::Unhandled,
        15 if is("x-forwarded-for") => Kind::XForwardedFor,
        16 if is("x-forwarded-host") => Kind::XForwardedHost,
        16 if is("proxy-connection") => Kind::Drop,
        17 if is("x-forwarded-proto") => Kind::XForwardedProto,
        17 if is("transfer-encoding") => Kind::Unhandled,
        18 if is("proxy-authenticate") => Kind::Drop,
        19 if is("proxy-authorization") => Kind::Drop,
        _ => Kind::Other,
    }
}

/// A parsed request the fast path will forward.
pub(super) struct Plain {
    pub(super) head_len: usize,
    pub(super) body_len: usize,
    pub(super) method: Method,
    pub(super) target: Range<usize>,
    /// Where the target's path ends: at its first `?`, or with the target.
    pub(super) path_end: usize,
    pub(super) host: Range<usize>,
    pub(super) request_id: Option<Range<usize>>,
    pub(super) close: bool,
}

/// The result of looking at the buffered request.
pub(super) enum Parsed {
    /// Forward it.
    Plain(Plain),
    /// The head is not complete yet.
    Partial,
    /// Hand the connection to pingora.
    Delegate,
}

/// Parses the head at the start of `buf` into `fields`; decides whether it is plain.
pub(super) fn parse_request(buf: &[u8], fields: &mut Vec<Field>) -> Parsed {
    // Uninitialised: zeroing 128 fields (4 KiB) per request cost more than parsing them.
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut storage) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Delegate,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Delegate;
    };
    let Some(path_len) = accepted_path_len(target) else {
        return Parsed::Delegate;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Delegate;
    };
    if method == Method::CONNECT {
        return Parsed::Delegate;
    }
    let offset = |s: &[u8]| offset_in(buf, s);
    fields.clear();
    let mut host = None;
    let mut request_id = None;
    let mut body_len: Option<usize> = None;
    let mut close = false;
    for h in req.headers.iter() {
        let kind = classify(h.name.as_bytes());
        match kind {
            Kind::Unhandled => return Parsed::Delegate,
            Kind::Host => {
                // The gateway's pingora path answers 400 to an invalid `Host` (RFC 9112 §3.2).
                if host.is_some() || !valid_host(h.value) {
                    return Parsed::Delegate;
                }
                host = Some(offset(h.value));
            }
            Kind::XRequestId if request_id.is_none() => request_id = Some(offset(h.value)),
            Kind::ContentLength => {
                let Some(n) = parse_content_length(h.value).and_then(|n| usize::try_from(n).ok())
                else {
                    return Parsed::Delegate;
                };
                if body_len.is_some_and(|m| m != n) {
                    return Parsed::Delegate;
                }
                body_len = Some(n);
            }
            Kind::Connection => {
                for token in h.value.split(|b| *b == b',').map(|t| t.trim_ascii()) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        // It names other fields as hop-by-hop: pingora removes those.
                        return Parsed::Delegate;
                    }
                }
            }
            _ => {}
        }
        fields.push(Field {
            name: offset(h.name.as_bytes()),
            value: offset(h.value),
            kind,
        });
    }
    let Some(host) = host else {
        return Parsed::Delegate;
    };
    Parsed::Plain(Plain {
        head_len,
        body_len: body_len.unwrap_or(0),
        method,
        path_end: offset(target.as_bytes()).start + path_len,
        target: offset(target.as_bytes()),
        host,
        request_id,
        close,
    })
}

/// Bytes of an origin-form target every `http::uri::PathAndQuery` accepts unchecked, in the
/// path and in the query: unreserved, sub-delims, `:`, `@`, `/`, `?` and `%` (RFC 3986 §3.3,
/// §3.4). Not `#`.
const PLAIN_TARGET: [bool; 256] = uri_bytes(b":@/?%");

/// When `target` is an origin-form target pingora accepts (it parses every target into
/// `http::Uri`) without a fragment. A fragment is never sent (RFC 9112 §3.2); pingora drops
/// it, so it decides. The common bytes are checked by table, anything else by `http` itself,
/// which allocates.
/// Returns the length of its path (the bytes before the first `?`), in one pass over the
/// common case.
fn accepted_path_len(target: &str) -> Option<usize> {
    let bytes = target.as_bytes();
    // `http` refuses longer targets (`PathAndQuery`'s limit), so pingora answers 400.
    if bytes.first() != Some(&b'/') || bytes.len() > MAX_TARGET {
        return None;
    }
    let path_len = memchr::memchr(b'?', bytes).unwrap_or(bytes.len());
    // No early exit: a branch-free pass over a short target is cheaper than one branch a byte.
    let plain = bytes
        .iter()
        .fold(true, |plain, &b| plain & PLAIN_TARGET[b as usize]);
    if plain {
        return Some(path_len);
    }
    let accepted = !target.contains('#') && http::uri::PathAndQuery::try_from(target).is_ok();
    accepted.then_some(path_len)
}

/// Longest request-target `http::uri::PathAndQuery` accepts.
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// Writes the upstream request head for `ctx.req` into `c.out`, then its body:
/// the same message pingora-proxy sends after [`Gateway`]'s `upstream_request_filter`
/// (credentials stripped, one `Authorization: Bearer`, `Host`, `X-Forwarded-*`, `X-Request-Id`,
/// hop-by-hop fields removed, the client's field order kept, the client's spelling of every
/// field the gateway does not set, the gateway's fields in their usual spelling in the place of
/// the client's first one of that name or appended in the same order).
pub(super) fn write_upstream_request(
    c: &mut Conn,
    ctx: &RequestCtx<'_>,
    authorization: &HeaderValue,
) {
    let Conn {
        out,
        buf,
        fields,
        client_ip_text,
        ..
    } = c;
    let client_ip = client_ip_text.as_deref();
    let (req, route, request_id) = (ctx.req, ctx.route, ctx.request_id);
    out.clear();
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    let target = &buf[req.target.clone()];
    let query = (req.path_end < req.target.end).then(|| &buf[req.path_end + 1..req.target.end]);
    match split_target_rewritten(&buf[req.target.start..req.path_end], query, route) {
        Some(t) => out.extend_from_slice(&t),
        None => out.extend_from_slice(target),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // Every `X-Forwarded-For` field the client sent (`prior`), in order, as one list (RFC 9110
    // §5.3), then this client's address: the nearest hop last.
    let xff = |out: &mut Vec<u8>, prior: bool| {
        out.extend_from_slice(b"X-Forwarded-For: ");
        for f in fields
            .iter()
            .filter(|f| prior && f.kind == Kind::XForwardedFor)
        {
            out.extend_from_slice(&buf[f.value.clone()]);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client_ip.unwrap_or_default());
        out.extend_from_slice(b"\r\n");
    };
    let (mut authorization_done, mut xfh_done, mut xfp_done, mut xff_done, mut id_done) =
        (false, false, false, false, false);
    let mut length_done = false;
    let mut w = FieldWriter::new(out, buf);
    for f in fields.iter() {
        match f.kind {
            Kind::Authorization => {
                if !authorization_done {
                    w.push(b"Authorization", authorization.as_bytes());
                    authorization_done = true;
                }
            }
            Kind::Drop | Kind::Connection => {}
            Kind::Cookie if !route.forward_cookies => {}
            Kind::Host => w.push(b"Host", route.host_header.as_bytes()),
            Kind::XForwardedHost => {
                if !xfh_done {
                    w.push(b"X-Forwarded-Host", &buf[req.host.clone()]);
                    xfh_done = true;
                }
            }
            Kind::XForwardedProto => {
                if !xfp_done {
                    w.push(b"X-Forwarded-Proto", b"http");
                    xfp_done = true;
                }
            }
            // Among the route's `strip_headers`, the client's are dropped and ours alone goes
            // last, where pingora-proxy's path puts it.
            Kind::XForwardedFor if is_stripped(b"x-forwarded-for", route) => {}
            Kind::XForwardedFor => {
                if client_ip.is_none() {
                    w.keep(f.name.clone(), f.value.clone());
                } else if !xff_done {
                    xff(w.out(), true);
                    xff_done = true;
                }
            }
            Kind::XRequestId => {
                if !id_done {
                    w.push(b"X-Request-Id", request_id.as_bytes());
                    id_done = true;
                }
            }
            // Repeated `Content-Length` fields agree (`parse_request`): one is sent (RFC 9110
            // §8.6), as pingora-proxy's path does.
            Kind::ContentLength => {
                if !length_done {
                    w.keep(f.name.clone(), f.value.clone());
                    length_done = true;
                }
            }
            Kind::Other if is_stripped(&buf[f.name.clone()], route) => {}
            _ => w.keep(f.name.clone(), f.value.clone()),
        }
    }
    if !authorization_done {
        w.push(b"Authorization", authorization.as_bytes());
    }
    if !xfh_done {
        w.push(b"X-Forwarded-Host", &buf[req.host.clone()]);
    }
    if !xfp_done {
        w.push(b"X-Forwarded-Proto", b"http");
    }
    if !xff_done && client_ip.is_some() {
        // The client sent none, or they were stripped.
        xff(w.out(), false);
    }
    if !id_done {
        w.push(b"X-Request-Id", request_id.as_bytes());
    }
    let out = w.out();
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&buf[req.head_len..req.head_len + req.body_len]);
}

/// Whether `name` is one of the route's `strip_headers`.
#[inline]
pub(super) fn is_stripped(name: &[u8], route: &Route) -> bool {
    route
        .strip_headers
        .iter()
        .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(raw: &[u8]) -> Option<(Plain, Vec<Field>)> {
        let mut fields = Vec::new();
        match parse_request(raw, &mut fields) {
            Parsed::Plain(p) => Some((p, fields)),
            _ => None,
        }
    }

    #[test]
    fn only_plain_requests_take_the_fast_path() {
        let (p, fields) = plain(
            b"POST /a?b=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nConnection: Keep-Alive, close\r\n\r\nabc",
        )
        .expect("plain");
        assert_eq!((p.body_len, p.close, p.method.as_str()), (3, true, "POST"));
        assert_eq!(fields.len(), 3);
        for raw in [
            &b"GET / HTTP/1.0\r\nHost: gw\r\n\r\n"[..],
            b"GET http://gw/ HTTP/1.1\r\nHost: gw\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive, X-Hop\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: gw\r\nTE: trailers\r\n\r\n",
            b"CONNECT gw:443 HTTP/1.1\r\nHost: gw:443\r\n\r\n",
            b"GET /a?x=1#frag HTTP/1.1\r\nHost: gw\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b/c@d\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: gw\r\nX: a\rb\r\n\r\n",
        ] {
            assert!(plain(raw).is_none(), "{}", String::from_utf8_lossy(raw));
        }
        let mut fields = Vec::new();
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost: g", &mut fields),
            Parsed::Partial
        ));
    }

    /// The table-checked shortcuts never accept what `http` (so pingora) would refuse.
    #[test]
    fn shortcuts_accept_only_what_http_accepts() {
        for b in 0..=255u8 {
            if !PLAIN_TARGET[b as usize] {
                continue;
            }
            let c = b as char;
            for t in [format!("/{c}"), format!("/a{c}b?c{c}d"), format!("/?{c}")] {
                assert_eq!(accepted_path_len(&t), t.find('?').or(Some(t.len())));
                assert!(
                    http::uri::PathAndQuery::try_from(t.as_str()).is_ok(),
                    "{t:?}"
                );
            }
        }
        for t in ["/a#b", "a/b", "/a b", "/a\"b", "/\u{e9}"] {
            let http_ok = !t.contains('#') && http::uri::PathAndQuery::try_from(t).is_ok();
            assert_eq!(
                accepted_path_len(t).is_some(),
                t.starts_with('/') && http_ok,
                "{t:?}"
            );
        }
        for h in [
            "gw",
            "GW.example.com",
            "10.0.0.1",
            "a-b:8080",
            "x:1",
            "h:65535",
            "h:99999",
            "",
        ] {
            assert!(valid_host(h.as_bytes()), "{h:?}");
            assert!(
                h.is_empty() || http::uri::Authority::try_from(h).is_ok(),
                "{h:?}"
            );
        }
        for h in ["a b", "a:1:2", "[::1", "a/b", "a%zz"] {
            assert!(!valid_host(h.as_bytes()), "{h:?}");
            assert!(http::uri::Authority::try_from(h).is_err(), "{h:?}");
        }
        // IP literals pass; userinfo never does (pingora refuses it).
        assert!(valid_host(b"[::1]:8080"));
        for h in ["user@gw", "a@b:c@d"] {
            assert!(!valid_host(h.as_bytes()), "{h:?}");
        }
        let long = format!("/{}", "a".repeat(MAX_TARGET));
        assert!(http::uri::PathAndQuery::try_from(long.as_str()).is_err());
        assert_eq!(accepted_path_len(&long), None);
        assert_eq!(accepted_path_len(&long[1..]), None);
        let longest = &long[..MAX_TARGET];
        assert!(http::uri::PathAndQuery::try_from(longest).is_ok());
        assert_eq!(accepted_path_len(longest), Some(MAX_TARGET));
    }
}
