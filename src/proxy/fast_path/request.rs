//! The client's request on the fast path: which requests are plain enough for it
//! ([`parse_request`]) and the upstream request written from the client's bytes
//! ([`write_upstream_request`]).

use std::mem::MaybeUninit;
use std::ops::Range;

use http::{HeaderValue, Method};

use super::response::{offset_in, FieldWriter};
use super::{Conn, RequestCtx, MAX_FIELDS};
use crate::proxy::policy::target::TargetForm;
use crate::proxy::policy::{
    self, uri_bytes, Action, FieldName, Fields, Forwarding, GatewayError, RequestFacts,
    RequestScan, Upgrade,
};
use crate::proxy::{valid_request_id_bytes, SharedState, MAX_REQUEST_ID};

/// One request field: byte ranges into `Conn::buf`, and its class in the policy's table.
#[derive(Clone, Debug)]
pub(super) struct Field {
    pub(super) name: Range<usize>,
    pub(super) value: Range<usize>,
    pub(super) class: FieldName,
}

/// The fields of the request in `buf`, as the policy reads them.
pub(super) struct FieldsIn<'a> {
    pub(super) buf: &'a [u8],
    pub(super) fields: &'a [Field],
}

impl Fields for FieldsIn<'_> {
    #[inline]
    fn count(&self) -> usize {
        self.fields.len()
    }
    #[inline]
    fn name(&self, i: usize) -> &[u8] {
        &self.buf[self.fields[i].name.clone()]
    }
    #[inline]
    fn value(&self, i: usize) -> &[u8] {
        &self.buf[self.fields[i].value.clone()]
    }
    #[inline]
    fn class(&self, i: usize) -> FieldName {
        self.fields[i].class
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
    /// What the policy's scan found.
    pub(super) facts: RequestFacts,
}

/// The result of looking at the buffered request.
pub(super) enum Parsed {
    /// Forward it.
    Plain(Plain),
    /// The head is not complete yet.
    Partial,
    /// Hand the connection to pingora; where the body starts (the head's length) when it is
    /// chunked.
    Delegate(Option<usize>),
    /// Answer with this gateway error and close: a head no server may accept (RFC 9112 §2.2,
    /// §3, §5) or one over the limit (431). pingora-proxy's parser is more lenient (it accepts
    /// two spaces in the request line, a space in the target) and would forward a different
    /// request than the one a strict server sees.
    Refuse(GatewayError),
}

impl Plain {
    /// Whether the fast path forwards this request itself. It leaves to pingora-proxy bodies
    /// it cannot hold whole (chunked), interim responses (`Expect`), upgrades, and fields a
    /// `Connection` names or the hop-by-hop `TE`/`Trailer` (kept off the fast path so the
    /// common request pays for no lookups). Either path sends the same upstream head.
    pub(super) fn fast(&self) -> bool {
        let f = &self.facts;
        !(f.chunked || f.expect || f.upgrade != Upgrade::None || f.nominations > 0 || f.hop_by_hop)
    }
}

/// Parses the head at the start of `buf` into `fields`: a complete HTTP/1.1 origin-form head
/// the policy admits is [`Parsed::Plain`] (see [`Plain::fast`] for which of those the fast path
/// forwards itself). A head longer than `max_head` bytes (`server.max_request_head`) is
/// refused with 431 (RFC 6585 §5) as soon as that many bytes are in without its end.
pub(super) fn parse_request(buf: &[u8], fields: &mut Vec<Field>, max_head: usize) -> Parsed {
    // Uninitialised: zeroing the field storage per request cost more than parsing it.
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut storage) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Parsed::Partial,
        // A request line that does not end within the limit holds a target no upstream URI
        // parser takes (pingora's `http` refuses targets past 65,534 bytes): 400 as pingora
        // answered it.
        Ok(_) if memchr::memchr(b'\n', &buf[..buf.len().min(max_head)]).is_none() => {
            return Parsed::Refuse(GatewayError::BadRequest("request line too long"))
        }
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Refuse(GatewayError::HeaderTooLarge)
        }
        Err(e) => return Parsed::Refuse(GatewayError::BadRequest(parse_error(e))),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Refuse(GatewayError::BadRequest("incomplete request line"));
    };
    // From the method on: empty lines before the request line are ignored (RFC 9112 §2.2).
    let line_start = offset_in(buf, method.as_bytes()).start;
    if !policy::target::parsed_request_line_ok(
        &buf[line_start..],
        method.as_bytes(),
        target.as_bytes(),
    ) {
        return Parsed::Refuse(GatewayError::BadRequest("malformed request line"));
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Refuse(GatewayError::BadRequest("invalid method"));
    };
    let form = match policy::target_form(&method, target.as_bytes()) {
        Ok(form) => form,
        Err(e) => return Parsed::Refuse(e),
    };
    if form == TargetForm::Authority {
        // CONNECT: a tunnel, never proxied (RFC 9110 §9.3.6).
        return Parsed::Refuse(GatewayError::MethodNotAllowed);
    }
    let offset = |s: &[u8]| offset_in(buf, s);
    fields.clear();
    let mut scan = RequestScan::default();
    for (i, h) in req.headers.iter().enumerate() {
        let class = policy::classify(h.name.as_bytes());
        scan.field(i, class, h.value);
        fields.push(Field {
            name: offset(h.name.as_bytes()),
            value: offset(h.value),
            class,
        });
    }
    // The head must end its lines in CRLF (httparse also takes a bare LF).
    if !policy::target::crlf_lines(
        &buf[..head_len],
        line_start,
        fields.iter().map(|f| f.name.start),
    ) {
        return Parsed::Refuse(GatewayError::BadRequest("bare LF in the request head"));
    }
    let http_version = if version == 1 {
        http::Version::HTTP_11
    } else {
        http::Version::HTTP_10
    };
    // Refusals are answered here, before the paths split: pingora's parser would refuse some
    // of these itself, with a bare answer.
    let facts = match scan.finish(http_version) {
        Ok(facts) => facts,
        Err(e) => return Parsed::Refuse(e),
    };
    if form == TargetForm::Absolute
        && !policy::target::authority_agrees(
            target.as_bytes(),
            facts.host.map(|i| &buf[fields[i].value.clone()]),
        )
    {
        return Parsed::Refuse(GatewayError::BadRequest(
            "the target's authority differs from Host",
        ));
    }
    if version != 1 || form != TargetForm::Origin {
        // HTTP/1.0 (no keep-alive by default, no chunked responses) and absolute-form or `*`
        // targets: pingora-proxy's path, with the same policy.
        return Parsed::Delegate(facts.chunked.then_some(head_len));
    }
    let path_len = match accepted_path_len(target) {
        Some(n) => n,
        // A fragment: pingora drops it.
        None if target.contains('#') => return Parsed::Delegate(facts.chunked.then_some(head_len)),
        // A target pingora's URI parser refuses (`"`, `<`, `>`, too long).
        None => return Parsed::Refuse(GatewayError::BadRequest("invalid request-target")),
    };
    let (Some(host), Ok(body_len)) = (
        facts.host,
        usize::try_from(facts.content_length.unwrap_or(0)),
    ) else {
        return Parsed::Delegate(facts.chunked.then_some(head_len));
    };
    Parsed::Plain(Plain {
        head_len,
        body_len,
        method,
        path_end: offset(target.as_bytes()).start + path_len,
        target: offset(target.as_bytes()),
        host: fields[host].value.clone(),
        request_id: facts.request_id.map(|i| fields[i].value.clone()),
        close: facts.close,
        facts,
    })
}

/// What a parse error says of the head, for the 400's message.
fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid field name",
        httparse::Error::HeaderValue => "invalid field value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status | httparse::Error::Token => "malformed request line",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::TooManyHeaders => "too many fields",
    }
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

/// Writes the upstream request head for `ctx.req` into `c.out`, then its body: the policy's
/// plan ([`policy::plan_request`]) serialised, the client's field lines copied as they came
/// where the plan keeps them.
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
        forward_entries,
        plan,
        ..
    } = c;
    let req = ctx.req;
    let view = FieldsIn { buf, fields };
    let fw = Forwarding {
        route: ctx.route,
        client_ip: client_ip_text.as_deref(),
        forward_entries: *forward_entries,
        authorization: authorization.as_bytes(),
        request_id: ctx.request_id.as_bytes(),
    };
    let target = &buf[req.target.clone()];
    policy::plan_request(&view, &req.facts, TargetForm::Origin, target, &fw, plan);
    out.clear();
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(plan.target.as_deref().unwrap_or(target));
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut w = FieldWriter::new(out, buf);
    for (f, action) in fields.iter().zip(&plan.actions) {
        match *action {
            Action::Keep => w.keep(f.name.clone(), f.value.clone()),
            Action::Drop => {}
            Action::Put(set) => policy::write_line(set, &view, &req.facts, &fw, w.out()),
        }
    }
    let out = w.out();
    for set in plan.added() {
        policy::write_line(set, &view, &req.facts, &fw, out);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&buf[req.head_len..req.head_len + req.body_len]);
}

/// A request's `X-Request-Id` value held inline: the client's (1 to [`MAX_REQUEST_ID`] visible
/// ASCII bytes) or a generated one (32 hex digits). No allocation per request.
pub(in crate::proxy) struct RequestId {
    len: usize,
    bytes: [u8; MAX_REQUEST_ID],
}

impl RequestId {
    /// The client's `X-Request-Id` in `buf` when usable, else a new one from `state`.
    pub(super) fn of(buf: &[u8], req: &Plain, state: &SharedState) -> Self {
        let mut id = RequestId {
            len: 0,
            bytes: [0; MAX_REQUEST_ID],
        };
        let client = req.request_id.as_ref().map(|r| &buf[r.clone()]);
        let value = match client {
            Some(v) if valid_request_id_bytes(v) => v,
            _ => &state.request_ids.next_hex(),
        };
        id.bytes[..value.len()].copy_from_slice(value);
        id.len = value.len();
        id
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Visible ASCII, so always a `str`.
    pub(super) fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("-")
    }

    /// As a field value, for the gateway's own error responses (not the common path).
    pub(super) fn to_header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(self.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::policy::valid_host;

    fn plain(raw: &[u8]) -> Option<(Plain, Vec<Field>)> {
        let mut fields = Vec::new();
        match parse_request(raw, &mut fields, super::super::wire::MAX_HEAD) {
            Parsed::Plain(p) if p.fast() => Some((p, fields)),
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
            parse_request(b"GET / HTTP/1.1\r\nHost: g", &mut fields, 1024),
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
