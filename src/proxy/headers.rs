//! Header and URI hygiene as pure functions: what is removed from a request before it goes
//! upstream, and how the upstream path is built. No network, no state; benchmarked in
//! `benches/hot_path.rs`.

use std::io::Write as _;
use std::net::IpAddr;

use bytes::Bytes;
use http::header::{AUTHORIZATION, COOKIE, HOST, PROXY_AUTHORIZATION};
use http::{HeaderName, HeaderValue};
use pingora::http::{IntoCaseHeaderName, RequestHeader};
use pingora::OrErr;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Removes every inbound credential: all `Authorization` and `Proxy-Authorization` fields (any
/// case, any count), `Cookie` unless `forward_cookies`, and each of `extra` (the route's
/// `strip_headers`). SPEC "Proxy behaviour"; RFC 9110 §11.6.2 and §11.7.2.
#[inline]
pub fn strip_inbound_credentials(
    req: &mut RequestHeader,
    forward_cookies: bool,
    extra: &[HeaderName],
) {
    // `remove_header` drops every field of that name; header names are case-insensitive.
    req.remove_header(&AUTHORIZATION);
    strip_credentials_but_authorization(req, forward_cookies, extra);
}

/// [`strip_inbound_credentials`] without the `Authorization` removal.
#[inline]
fn strip_credentials_but_authorization(
    req: &mut RequestHeader,
    forward_cookies: bool,
    extra: &[HeaderName],
) {
    req.remove_header(&PROXY_AUTHORIZATION);
    if !forward_cookies {
        req.remove_header(&COOKIE);
    }
    for name in extra {
        req.remove_header(name);
    }
}

/// The credential step of the upstream request, in one place for the proxy and its benchmark:
/// strips inbound credentials (as [`strip_inbound_credentials`]), puts the client's field order
/// back if a removal disturbed it ([`restore_field_order`]; `original` is the downstream
/// request's map) and leaves exactly one `Authorization` (`Bearer <token>`): in the place of the
/// client's first one, or last when the client sent none.
///
/// Errors: pingora's, if the value cannot be inserted (it was validated when the token arrived).
#[inline]
pub fn apply_credentials(
    upstream: &mut RequestHeader,
    original: &http::HeaderMap,
    authorization: http::HeaderValue,
    forward_cookies: bool,
    extra: &[HeaderName],
) -> pingora::Result<()> {
    // The client's Authorization fields are not removed but replaced by the insert below:
    // `insert` keeps the position of the first one and drops all others (every spelling, every
    // count), while a removal would move the last field into the hole and cost a reordering.
    // So a client that sends only Authorization — the usual legacy Basic client — needs none.
    strip_credentials_but_authorization(upstream, forward_cookies, extra);
    // Removals (ours and pingora's hop-by-hop policy) can reorder the map; when nothing was
    // removed — the common case — the order is the client's already.
    if upstream.headers.len() != original.len() {
        restore_field_order(upstream, original);
    }
    // The name as `&'static str` in its usual spelling: pingora keeps the original case of every
    // field, and a `HeaderName` would be copied into a new buffer on each insert.
    upstream.insert_header("Authorization", authorization)
}

/// The forwarding fields of the upstream request (SPEC "Proxy behaviour"): the client's `Host`
/// becomes `X-Forwarded-Host` and `Host` becomes `host_header` (the upstream's authority, which
/// TLS SNI also uses); `X-Forwarded-Proto: http`; `client_ip` (IPv4-mapped IPv6 shown as IPv4)
/// is appended to any `X-Forwarded-For` the client sent (RFC 7239 §5.2 order: the nearest hop
/// last); `request_id` is set as `X-Request-Id`. Call after [`apply_credentials`].
///
/// Errors: pingora's, if a value cannot be inserted (all values here are valid by
/// construction; an inbound `X-Forwarded-For` was a valid field value already).
#[inline]
pub fn add_forwarding_fields(
    upstream: &mut RequestHeader,
    host_header: &HeaderValue,
    client_ip: Option<IpAddr>,
    request_id: Option<&HeaderValue>,
) -> pingora::Result<()> {
    if let Some(host) = upstream.headers.get(HOST).cloned() {
        upstream.insert_header("X-Forwarded-Host", host)?;
    }
    upstream.insert_header("Host", host_header.clone())?;
    upstream.insert_header("X-Forwarded-Proto", HeaderValue::from_static("http"))?;
    if let Some(ip) = client_ip.map(|ip| ip.to_canonical()) {
        // One buffer, written once: every `X-Forwarded-For` field the client sent, in order, as
        // one list (RFC 9110 §5.3), the previous hops' bytes as they came, then ours.
        let mut xff = Vec::with_capacity(64);
        for prev in upstream.headers.get_all(&X_FORWARDED_FOR) {
            xff.extend_from_slice(prev.as_bytes());
            xff.extend_from_slice(b", ");
        }
        // Writing to a Vec cannot fail.
        let _ = write!(xff, "{ip}");
        let value = HeaderValue::from_maybe_shared(Bytes::from(xff)).or_err(
            pingora::ErrorType::InvalidHTTPHeader,
            "X-Forwarded-For value",
        )?;
        upstream.insert_header("X-Forwarded-For", value)?;
    }
    if let Some(id) = request_id {
        upstream.insert_header("X-Request-Id", id.clone())?;
    }
    Ok(())
}

/// The query without any `access_token` parameter (RFC 6750 §2.3), or `None` when it has none
/// (then the query is forwarded untouched). The other parameters keep their bytes and order;
/// an empty result means "no query".
pub fn strip_access_token(query: &str) -> Option<String> {
    if !has_access_token(query.as_bytes()) {
        return None;
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !is_access_token_param(p.as_bytes()))
        .collect();
    Some(kept.join("&"))
}

/// Whether `query` (the bytes after `?`) has an `access_token` parameter, plain or with a
/// percent-encoded name (RFC 6750 §2.3): one pass, no allocation unless a name has a `%`.
#[inline]
pub fn has_access_token(query: &[u8]) -> bool {
    // Every spelling of the name has `access_token` in it or a `%`: most queries have
    // neither, which two vectorised scans show faster than splitting the query.
    static NAME: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"access_token"));
    if memchr::memchr(b'%', query).is_none() && NAME.find(query).is_none() {
        return false;
    }
    query.split(|&b| b == b'&').any(is_access_token_param)
}

#[inline]
fn is_access_token_param(pair: &[u8]) -> bool {
    let name = match pair.iter().position(|&b| b == b'=') {
        Some(i) => &pair[..i],
        None => pair,
    };
    // Compare the decoded name cheaply: the plain spelling is by far the common one.
    name == b"access_token" || (name.contains(&b'%') && percent_decoded_eq(name, "access_token"))
}

fn percent_decoded_eq(raw: &[u8], want: &str) -> bool {
    let decoded: Vec<u8> = percent_decode(raw);
    decoded == want.as_bytes()
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    form_urlencoded::parse(s)
        .next()
        .map(|(k, _)| k.into_owned().into_bytes())
        .unwrap_or_default()
}

/// Whether `path` (no query) is under `prefix` on a path-segment boundary. `prefix` is
/// normalised: starts with `/`, no trailing `/` unless it is `/` itself.
#[inline]
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// The upstream path: `base_path + (strip_prefix ? path without prefix : path)`, byte for byte
/// (no decoding, no slash merging). `base_path` has no trailing slash; a stripped path that
/// becomes empty is `/`. SPEC "Proxy behaviour".
pub fn upstream_path(base_path: &str, prefix: Option<&str>, path: &str) -> String {
    // Only a path that is under the prefix loses it (a route's own listener matches paths
    // outside its prefix too).
    let rest = match prefix {
        Some(p) if p != "/" && prefix_matches(p, path) => &path[p.len()..],
        _ => path,
    };
    let mut out = String::with_capacity(base_path.len() + rest.len() + 1);
    out.push_str(base_path);
    if !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    out
}

/// Puts the fields of `upstream` back in the order the client sent them (`original`: the
/// downstream request's fields, in received order), after removals reordered them
/// (`http::HeaderMap::remove` moves the last field into the removed one's slot). Values of one
/// name keep their relative order; fields the client did not send (added by the gateway) go last,
/// in their current order; names keep their received spelling.
///
/// Costs one pass and no allocation when the order is already right; otherwise one `Vec` and a
/// rebuild of the header map (needed for correctness: issue 4 asks for the client's field order).
pub fn restore_field_order(upstream: &mut RequestHeader, original: &http::HeaderMap) {
    let in_order = upstream
        .headers
        .keys()
        .filter(|k| original.contains_key(*k))
        .eq(original
            .keys()
            .filter(|k| upstream.headers.contains_key(*k)));
    if in_order {
        return;
    }
    let rank = |name: &HeaderName| {
        original
            .keys()
            .position(|k| k == name)
            .unwrap_or(usize::MAX)
    };
    if upstream.has_case() {
        let fields: Vec<_> = upstream
            .headers
            .iter()
            .zip(upstream.case_header_iter())
            .map(|((n, v), (c, _))| (rank(n), n.clone(), c.clone(), v.clone()))
            .collect();
        rebuild(upstream, fields);
    } else {
        let fields: Vec<_> = upstream
            .headers
            .iter()
            .map(|(n, v)| (rank(n), n.clone(), n.clone(), v.clone()))
            .collect();
        rebuild(upstream, fields);
    }
}

fn rebuild<C: IntoCaseHeaderName>(
    upstream: &mut RequestHeader,
    mut fields: Vec<(usize, HeaderName, C, HeaderValue)>,
) {
    // Stable: values of one name, and added fields, keep their relative order.
    fields.sort_by_key(|f| f.0);
    for (_, name, _, _) in &fields {
        upstream.remove_header(name);
    }
    for (_, _, case, value) in fields {
        // Appending a name/value that was just removed cannot fail.
        let _ = upstream.append_header(case, value);
    }
}

/// Whether the raw request head (request line and fields, as received) has a field named `name`
/// (ASCII, lower-case). For what the parsed header no longer shows: pingora drops
/// `Content-Length` when `Transfer-Encoding` is present (RFC 9112 §6.3), and a request carrying
/// both is refused instead (RFC 9112 §6.1: such a message is a smuggling vector).
pub fn raw_head_has_field(head: &[u8], name: &[u8]) -> bool {
    head.split(|&b| b == b'\n').skip(1).any(|line| {
        line.len() > name.len()
            && line[name.len()] == b':'
            && line[..name.len()].eq_ignore_ascii_case(name)
    })
}

/// A byte table of URI characters (RFC 3986 §2.2, §2.3): unreserved and sub-delims, plus the
/// bytes in `extra`.
pub(crate) const fn uri_bytes(extra: &[u8]) -> [bool; 256] {
    const SUB_DELIMS_AND_MARKS: &[u8] = b"-._~!$&'()*+,;=";
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < SUB_DELIMS_AND_MARKS.len() {
        t[SUB_DELIMS_AND_MARKS[i] as usize] = true;
        i += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

/// Bytes of a registered name or IPv4 address besides percent-encoding: unreserved and
/// sub-delims (RFC 3986 §3.2.2).
const REG_NAME_BYTE: [bool; 256] = uri_bytes(b"");

/// Whether `value` is a valid `Host` field value (RFC 9112 §3.2; RFC 3986 §3.2.2, §3.2.3):
/// empty, or `uri-host [ ":" port ]` where uri-host is an IPv6 literal in brackets or a
/// registered name / IPv4 address of unreserved, sub-delims and percent-encoded bytes, and port
/// is digits. No userinfo (`@`), no spaces, no second colon, no empty host before a port
/// (`:80`). A server must answer 400 to anything else; pingora-proxy forwards it, so the
/// gateway checks.
pub fn valid_host(value: &[u8]) -> bool {
    let (host, port) = match value.first() {
        None => return true,
        Some(b'[') => {
            let Some(close) = value.iter().position(|&b| b == b']') else {
                return false;
            };
            let literal = std::str::from_utf8(&value[1..close]).ok();
            if literal
                .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
                .is_none()
            {
                return false;
            }
            (&value[..0], &value[close + 1..])
        }
        Some(_) => match memchr::memchr(b':', value) {
            Some(i) => (&value[..i], &value[i..]),
            None => (value, &value[value.len()..]),
        },
    };
    // `:80` has an empty host: no http URI can be built from it (RFC 9110 §4.2.1).
    if host.is_empty() && !port.is_empty() && value[0] != b'[' {
        return false;
    }
    // The common name: one branch-free table pass (this runs on the fast path per request).
    let plain = host
        .iter()
        .fold(true, |plain, &b| plain & REG_NAME_BYTE[b as usize]);
    let mut i = if plain { host.len() } else { 0 };
    while i < host.len() {
        match host[i] {
            b'%' if host
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
            {
                i += 3;
                continue;
            }
            b if REG_NAME_BYTE[b as usize] => {}
            _ => return false,
        }
        i += 1;
    }
    match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().fold(true, |d, b| d & b.is_ascii_digit()),
        Some(_) => false,
    }
}

/// A `Content-Length` value: ASCII digits only (no sign, no list, no spaces: httparse has
/// trimmed the field), `None` for anything else or a number past `u64`.
pub(crate) fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    // One pass, no UTF-8 check and no second validation inside `str::parse`.
    value.iter().try_fold(0u64, |n, &b| {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The elements of a list-valued field (RFC 9110 §5.6.1) across all its lines, trimmed, empty
/// ones skipped: `Connection: keep-alive, X-Hop` gives `keep-alive` and `X-Hop`.
pub(crate) fn list_elements<'a>(
    fields: http::header::GetAll<'a, http::HeaderValue>,
) -> impl Iterator<Item = &'a [u8]> {
    fields
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|e| e.trim_ascii())
        .filter(|e| !e.is_empty())
}

/// A `Content-Length` value that is a list of one number repeated (`5, 5`; RFC 9110 §8.6: a
/// recipient may take it as that one number): the number, or `None` for anything else (an
/// empty element, elements that differ or are not digits, a number past `u64`). A single
/// number is a list of one.
pub(crate) fn content_length_list(value: &[u8]) -> Option<u64> {
    let mut elements = value.split(|b| *b == b',').map(|e| e.trim_ascii());
    let n = parse_content_length(elements.next()?)?;
    elements
        .all(|e| parse_content_length(e) == Some(n))
        .then_some(n)
}

/// The one number a message's `Content-Length` fields stand for when they must be collapsed into
/// one field before the message is forwarded: the fields are a list (`5, 5`) or repeated (two
/// `5` fields), all of one number (RFC 9110 §8.6). `None` for no field, one plain number, or
/// numbers that disagree or do not parse: pingora refuses a message framed by those before the
/// gateway's filters see it (a response with `Transfer-Encoding` aside: its length is ignored).
pub fn content_length_to_collapse(headers: &http::HeaderMap) -> Option<u64> {
    let mut fields = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = fields.next()?;
    let n = content_length_list(first.as_bytes())?;
    let mut collapse = first.as_bytes().contains(&b',');
    for v in fields {
        if content_length_list(v.as_bytes()) != Some(n) {
            return None;
        }
        collapse = true;
    }
    collapse.then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_digits_only_and_fits_u64() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"87"), Some(87));
        assert_eq!(parse_content_length(b"0012"), Some(12));
        assert_eq!(
            parse_content_length(b"18446744073709551615"),
            Some(u64::MAX)
        );
        for bad in [
            &b""[..],
            b"18446744073709551616",
            b"+5",
            b"-1",
            b"5 ",
            b"1,2",
            b"0x10",
            b"\xd9\xa1",
        ] {
            assert_eq!(parse_content_length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_content_length_list_of_one_number_is_that_number() {
        for (value, want) in [
            (&b"5"[..], Some(5)),
            (b"5, 5", Some(5)),
            (b"5,5 ,\t5", Some(5)),
            (b"05, 5", Some(5)),
            (b"5, 6", None),
            (b"5,", None),
            (b", 5", None),
            (b"5,,5", None),
            (b"5, x", None),
            (b"", None),
        ] {
            assert_eq!(
                content_length_list(value),
                want,
                "{}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn content_length_is_collapsed_only_when_listed_or_repeated() {
        let map = |values: &[&str]| {
            let mut m = http::HeaderMap::new();
            for v in values {
                m.append(http::header::CONTENT_LENGTH, v.parse().unwrap());
            }
            m
        };
        assert_eq!(content_length_to_collapse(&map(&[])), None);
        assert_eq!(content_length_to_collapse(&map(&["5"])), None);
        assert_eq!(content_length_to_collapse(&map(&["5, 5"])), Some(5));
        assert_eq!(content_length_to_collapse(&map(&["5", "5"])), Some(5));
        assert_eq!(content_length_to_collapse(&map(&["5", "5, 5"])), Some(5));
        assert_eq!(content_length_to_collapse(&map(&["5", "6"])), None);
        assert_eq!(content_length_to_collapse(&map(&["5, 6"])), None);
    }

    #[test]
    fn host_values_are_uri_authorities_without_userinfo() {
        for ok in [
            "",
            "gw",
            "GW.example.com",
            "gw:",
            "gw:0",
            "gw:8080",
            "gw:123456",
            "10.0.0.1:80",
            "[::1]",
            "[::1]:80",
            "a%41b",
            "host.",
            "a_b~c!$&'()*+,;=",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "ho st",
            "a\tb",
            "host:80:80",
            "[::1",
            "[nope]",
            "[::1]x",
            "h\u{e9}st",
            "http://gw",
            "a%zz",
            "a%4",
            "host:8a",
            "user@gw",
            "gw/x",
            "gw?",
            "gw#",
            ":80",
            ":",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn strips_every_credential_any_case() {
        let mut r = req(&[
            ("Authorization", "Basic a"),
            ("authorization", "Bearer b"),
            ("Proxy-Authorization", "Basic c"),
            ("Cookie", "sid=1"),
            ("X-Api-Key", "k"),
            ("Accept", "application/json"),
        ]);
        strip_inbound_credentials(&mut r, false, &[HeaderName::from_static("x-api-key")]);
        let names: Vec<_> = r.headers.keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(names, vec!["accept"]);
    }

    #[test]
    fn apply_credentials_replaces_authorization_in_place() {
        let original = req(&[
            ("Host", "h"),
            ("authorization", "Basic a"),
            ("X-Mid", "1"),
            ("Authorization", "Bearer b, Bearer c"),
            ("Cookie", "c"),
            ("X-Last", "z"),
        ]);
        let mut up = original.clone();
        let bearer = HeaderValue::from_static("Bearer gateway");
        apply_credentials(&mut up, &original.headers, bearer, false, &[]).unwrap();
        let fields: Vec<(String, String)> = up
            .case_header_iter()
            .map(|(n, v)| {
                let n = String::from_utf8_lossy(n.as_slice()).into_owned();
                (n, v.to_str().unwrap().to_owned())
            })
            .collect();
        let want: Vec<(String, String)> = [
            ("Host", "h"),
            ("Authorization", "Bearer gateway"),
            ("X-Mid", "1"),
            ("X-Last", "z"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        assert_eq!(fields, want);
        let values: Vec<_> = up.headers.get_all("authorization").iter().collect();
        assert_eq!(values, vec!["Bearer gateway"]);

        // No inbound Authorization: the gateway's goes last.
        let original = req(&[("Host", "h"), ("X-A", "1")]);
        let mut up = original.clone();
        let bearer = HeaderValue::from_static("Bearer gateway");
        apply_credentials(&mut up, &original.headers, bearer, false, &[]).unwrap();
        let names: Vec<_> = up.headers.keys().map(|k| k.as_str().to_owned()).collect();
        assert_eq!(names, vec!["host", "x-a", "authorization"]);
    }

    #[test]
    fn cookies_forwarded_when_asked() {
        let mut r = req(&[("Cookie", "sid=1"), ("Authorization", "x")]);
        strip_inbound_credentials(&mut r, true, &[]);
        assert_eq!(r.headers.get("cookie").unwrap(), "sid=1");
        assert!(r.headers.get("authorization").is_none());
    }

    #[test]
    fn access_token_removed_in_any_position_rest_untouched() {
        assert_eq!(strip_access_token("a=1&b=%2F"), None);
        assert_eq!(
            strip_access_token("access_token=s&k=a%2Fb&z").as_deref(),
            Some("k=a%2Fb&z")
        );
        assert_eq!(
            strip_access_token("k=a%2Fb&access_token=s&z").as_deref(),
            Some("k=a%2Fb&z")
        );
        assert_eq!(
            strip_access_token("k=a%2Fb&z&access_token=s").as_deref(),
            Some("k=a%2Fb&z")
        );
        assert_eq!(strip_access_token("access_token=s").as_deref(), Some(""));
        assert_eq!(
            strip_access_token("access%5Ftoken=s&a=1").as_deref(),
            Some("a=1")
        );
        assert_eq!(strip_access_token("my_access_token=1"), None);
        assert_eq!(strip_access_token("access_token").as_deref(), Some(""));
        // Past the prefilter (the name in a value), and stopped by it (neither name nor `%`).
        assert_eq!(strip_access_token("q=access_token&a=1"), None);
        assert_eq!(strip_access_token("page=2&per_page=50"), None);
    }

    #[test]
    fn field_order_restored_after_removals() {
        let original = req(&[
            ("Host", "h"),
            ("Authorization", "Basic a"),
            ("X-First", "1"),
            ("Cookie", "c"),
            ("X-Repeat", "a"),
            ("X-Repeat", "b"),
            ("X-Last", "z"),
        ]);
        let mut up = original.clone();
        strip_inbound_credentials(&mut up, false, &[]);
        up.append_header("X-Added", "g").unwrap();
        restore_field_order(&mut up, &original.headers);
        let fields: Vec<(String, String)> = up
            .case_header_iter()
            .map(|(n, v)| {
                let n = String::from_utf8_lossy(n.as_slice()).into_owned();
                (n, v.to_str().unwrap().to_owned())
            })
            .collect();
        let want = [
            ("Host", "h"),
            ("X-First", "1"),
            ("X-Repeat", "a"),
            ("X-Repeat", "b"),
            ("X-Last", "z"),
            ("X-Added", "g"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(fields, want);
        let mut wire = Vec::new();
        up.header_to_h1_wire(&mut wire);
        assert!(String::from_utf8(wire)
            .unwrap()
            .starts_with("Host: h\r\nX-First: 1\r\n"));
    }

    #[test]
    fn raw_head_field_lookup() {
        let head = b"POST /content-length: HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nCONTENT-LENGTH: 4\r\n\r\n";
        assert!(raw_head_has_field(head, b"content-length"));
        assert!(raw_head_has_field(head, b"transfer-encoding"));
        let head =
            b"POST /content-length: HTTP/1.1\r\nX-Content-Length: 4\r\nContent-Lengthy: 1\r\n\r\n";
        assert!(!raw_head_has_field(head, b"content-length"));
    }

    #[test]
    fn prefix_matches_on_segment_boundaries() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/users"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/ap"));
    }

    #[test]
    fn upstream_path_joins_byte_for_byte() {
        assert_eq!(
            upstream_path("/v1", Some("/api"), "/api/users"),
            "/v1/users"
        );
        assert_eq!(upstream_path("/v1", Some("/api"), "/api"), "/v1/");
        assert_eq!(upstream_path("/v1", Some("/api"), "/api/a//b"), "/v1/a//b");
        assert_eq!(upstream_path("", None, "/a%2Fb/c"), "/a%2Fb/c");
        assert_eq!(upstream_path("/v1", None, "/x%252F"), "/v1/x%252F");
        assert_eq!(upstream_path("", Some("/"), "/q%20r"), "/q%20r");
        assert_eq!(upstream_path("", Some("/api"), "/any/path"), "/any/path");
        assert_eq!(upstream_path("", Some("/api"), "/apix"), "/apix");
    }
}
