//! The request line and the upstream request-target: which request lines are accepted, which
//! target forms, and the target sent upstream (`base path + path' + ?query'`, byte for byte
//! otherwise).

use crate::proxy::routes::Route;

/// The form of a request-target (RFC 9112 §3.2).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TargetForm {
    /// `/path?query`.
    Origin,
    /// `http://authority/path?query`: forwarded in origin-form (only the route's upstream is
    /// ever reached).
    Absolute,
    /// `*`, for `OPTIONS` only: forwarded as `*`.
    Asterisk,
    /// `host:port`, for `CONNECT` only (which the gateway refuses as a method).
    Authority,
}

/// The form of `target` for a request with `method`, or `None` when the target is not one a
/// server may accept for it (RFC 9112 §3.2: `*` only with `OPTIONS`, authority-form only with
/// `CONNECT`; absolute-form only as an `http` or `https` URI with an authority).
pub fn target_form(method: &http::Method, target: &[u8]) -> Option<TargetForm> {
    let connect = method == http::Method::CONNECT;
    match target.first()? {
        b'/' if !connect => Some(TargetForm::Origin),
        b'*' if target.len() == 1 && method == http::Method::OPTIONS => Some(TargetForm::Asterisk),
        _ if connect => {
            let authority = http::uri::Authority::try_from(target).ok()?;
            authority.port().is_some().then_some(TargetForm::Authority)
        }
        _ => {
            let uri = http::Uri::try_from(target).ok()?;
            let scheme_ok = matches!(uri.scheme_str(), Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"));
            (scheme_ok && uri.authority().is_some()).then_some(TargetForm::Absolute)
        }
    }
}

/// Whether the first line of `head` is exactly `method SP request-target SP HTTP-version CRLF`
/// (RFC 9112 §3): a token method, a target of visible ASCII, `HTTP/1.0` or `HTTP/1.1`, single
/// spaces. Lenient parsers accept more (two spaces, a space inside the target) and then forward
/// a different request than the one a strict server sees; the gateway answers 400 instead.
pub fn request_line_ok(head: &[u8]) -> bool {
    let Some(end) = memchr::memchr(b'\n', head) else {
        return false;
    };
    let Some(line) = head[..end].strip_suffix(b"\r") else {
        return false;
    };
    let Some(sp1) = memchr::memchr(b' ', line) else {
        return false;
    };
    let rest = &line[sp1 + 1..];
    let Some(sp2) = memchr::memchr(b' ', rest) else {
        return false;
    };
    let (method, target, version) = (&line[..sp1], &rest[..sp2], &rest[sp2 + 1..]);
    // Branch-free table passes: this runs for every request.
    let all = |bytes: &[u8], table: &[bool; 256]| {
        bytes.iter().fold(true, |ok, &b| ok & table[b as usize])
    };
    !method.is_empty()
        && all(method, &TCHAR)
        && !target.is_empty()
        && all(target, &VCHAR)
        && (version == b"HTTP/1.1" || version == b"HTTP/1.0")
}

/// [`request_line_ok`] for a request line httparse (default configuration) has already parsed
/// into `method` and `target`, without a second pass over the line: httparse took a token
/// method, one space, a target of `!`..`~` and bytes from 0x80 on, one space and `HTTP/1.0` or
/// `HTTP/1.1`, then an LF with or without a CR. What is left to check is a target of visible
/// ASCII and the CR. `line` starts at the method.
#[inline]
pub fn parsed_request_line_ok(line: &[u8], method: &[u8], target: &[u8]) -> bool {
    // `method SP target SP HTTP/1.x`, then the CR.
    let cr = method.len() + 1 + target.len() + 1 + b"HTTP/1.1".len();
    target.is_ascii() && line.get(cr) == Some(&b'\r')
}

/// Whether every line of a request head (whose CRs a strict parser already placed: only
/// before an LF) ends in CRLF: as many CRs as LFs. A bare LF ends a line for some parsers and
/// not for others (RFC 9112 §2.2), so the gateway refuses it. Counted per block of at most
/// 255 bytes, so that the byte counters cannot wrap and the loop vectorises.
pub fn crlf_only(head: &[u8]) -> bool {
    let (cr, lf) = head.chunks(255).fold((0usize, 0usize), |(cr, lf), block| {
        let (c, l) = block.iter().fold((0u8, 0u8), |(c, l), &b| {
            (c + u8::from(b == b'\r'), l + u8::from(b == b'\n'))
        });
        (cr + usize::from(c), lf + usize::from(l))
    });
    cr == lf
}

/// [`crlf_only`] for a head httparse accepted, without a pass over its bytes: httparse puts
/// every LF of a request head at the end of a line (no obs-fold in requests), lets a CR
/// through only right before an LF, and each field line starts right after the line before
/// it. So a line ends in CRLF when the byte two before the next line's start is a CR; what
/// is left to look at is the empty lines before the request line (`request_line_start`,
/// rare), the field lines' starts (`field_starts`) and the head's end (the last line and the
/// empty line).
#[inline(always)]
pub fn crlf_lines(
    head: &[u8],
    request_line_start: usize,
    field_starts: impl IntoIterator<Item = usize>,
) -> bool {
    (request_line_start == 0 || crlf_only(&head[..request_line_start]))
        && head.ends_with(b"\r\n\r\n")
        // Every start looked at, no early exit: one branch-free pass over a few fields is
        // cheaper than a branch per field.
        && field_starts.into_iter().fold(true, |ok, start| {
            ok & (start.checked_sub(2).and_then(|i| head.get(i)) == Some(&b'\r'))
        })
}

/// Whether an absolute-form `target`'s authority is exactly `host` (the `Host` field, when
/// there is one) and carries no userinfo: pingora refuses anything else, and the gateway
/// answers it first (RFC 9112 §3.2.2).
pub fn authority_agrees(target: &[u8], host: Option<&[u8]>) -> bool {
    let after_scheme = memchr::memmem::find(target, b"://").map_or(0, |i| i + 3);
    let rest = &target[after_scheme..];
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?' || b == b'#')
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    memchr::memchr(b'@', authority).is_none() && host.is_none_or(|h| h == authority)
}

/// Token bytes (RFC 9110 §5.6.2).
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"!#$%&'*+-.^_`|~";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
};

/// Visible ASCII (RFC 5234 `VCHAR`).
const VCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x21;
    while b < 0x7f {
        t[b] = true;
        b += 1;
    }
    t
};

/// A token byte (RFC 9110 §5.6.2).
pub(crate) fn is_tchar(b: u8) -> bool {
    TCHAR[b as usize]
}

/// The path and query of an origin-form or absolute-form `target`, split at the first `?`
/// (`query` without it). An absolute-form target without a path has the path `/`.
pub fn path_and_query(form: TargetForm, target: &[u8]) -> (&[u8], Option<&[u8]>) {
    let pq = match form {
        TargetForm::Origin => target,
        TargetForm::Absolute => {
            // `scheme://authority` then the path: the third `/` starts it (or `?` the query).
            let after_scheme = memchr::memmem::find(target, b"://").map_or(0, |i| i + 3);
            let rest = &target[after_scheme..];
            let start = rest
                .iter()
                .position(|&b| b == b'/' || b == b'?' || b == b'#')
                .unwrap_or(rest.len());
            &rest[start..]
        }
        TargetForm::Asterisk | TargetForm::Authority => target,
    };
    // A fragment is never sent (RFC 9112 §3.2).
    let pq = match memchr::memchr(b'#', pq) {
        Some(i) => &pq[..i],
        None => pq,
    };
    let (path, query) = match memchr::memchr(b'?', pq) {
        Some(q) => (&pq[..q], Some(&pq[q + 1..])),
        None => (pq, None),
    };
    (if path.is_empty() { b"/" } else { path }, query)
}

/// The upstream request-target for a target already split at its first `?` (`query` without
/// the `?`), or `None` when it goes upstream exactly as received: no prefix to strip, no base
/// path, no `access_token` parameter.
pub fn rewritten_target(path: &[u8], query: Option<&[u8]>, route: &Route) -> Option<Vec<u8>> {
    let strip = route.strip_prefix && route.prefix != "/";
    let new_query = query.and_then(strip_access_token);
    if !strip && route.base_path.is_empty() && new_query.is_none() {
        return None;
    }
    Some(build_target(path, query, new_query, route))
}

/// `base_path + path' + ?query'`: the prefix stripped when the route says so; `new_query`
/// replaces `query` when given (an empty one is dropped).
fn build_target(
    path: &[u8],
    query: Option<&[u8]>,
    new_query: Option<Vec<u8>>,
    route: &Route,
) -> Vec<u8> {
    let strip = route.strip_prefix && route.prefix != "/";
    let rest = match strip.then_some(route.prefix.as_bytes()) {
        Some(p) if prefix_matches(p, path) => &path[p.len()..],
        _ => path,
    };
    let mut target = Vec::with_capacity(route.base_path.len() + path.len() + 2);
    target.extend_from_slice(route.base_path.as_bytes());
    if rest.first() != Some(&b'/') {
        target.push(b'/');
    }
    target.extend_from_slice(rest);
    let query = match &new_query {
        Some(q) => (!q.is_empty()).then_some(q.as_slice()),
        None => query,
    };
    if let Some(q) = query {
        target.push(b'?');
        target.extend_from_slice(q);
    }
    target
}

/// Whether `path` (no query) is under `prefix` on a path-segment boundary. `prefix` is
/// normalised: starts with `/`, no trailing `/` unless it is `/` itself.
#[inline]
pub fn prefix_matches(prefix: &[u8], path: &[u8]) -> bool {
    prefix == b"/"
        || (path.starts_with(prefix) && matches!(path.get(prefix.len()), None | Some(b'/')))
}

/// The query without any `access_token` parameter (RFC 6750 §2.3), or `None` when it has none
/// (then the query is forwarded untouched). The other parameters keep their bytes, order and
/// separators; an empty result means "no query".
///
/// A parameter is `access_token` when its name, percent-decoded until it no longer changes,
/// ASCII case-folded and without a trailing `[]`, is `access_token`; `&` and `;` both separate
/// parameters. Server-side parsers read each of these spellings as that parameter
/// (`ACCESS_TOKEN`, `x=1;access_token=`, `access%255Ftoken`, `access_token[]`).
pub fn strip_access_token(query: &[u8]) -> Option<Vec<u8>> {
    if !may_hold_access_token(query) {
        return None;
    }
    let is_separator = |b: &u8| *b == b'&' || *b == b';';
    if !query.split(is_separator).any(is_access_token_param) {
        return None;
    }
    let mut out = Vec::with_capacity(query.len());
    let mut kept_any = false;
    let mut start = 0;
    while start <= query.len() {
        let end = query[start..]
            .iter()
            .position(is_separator)
            .map_or(query.len(), |i| start + i);
        let param = &query[start..end];
        if !is_access_token_param(param) {
            if kept_any {
                // The separator before this parameter, as the client wrote it.
                out.push(query[start - 1]);
            }
            out.extend_from_slice(param);
            kept_any = true;
        }
        start = end + 1;
    }
    Some(out)
}

/// A quick look for what every spelling of the name needs: a `%` (an encoded name), or one of
/// `_ . + [` with `access` before it and `token` after it in any case. Most queries have
/// neither.
#[inline]
fn may_hold_access_token(query: &[u8]) -> bool {
    let around = |i: usize| {
        i >= 6
            && query[i - 6..i].eq_ignore_ascii_case(b"access")
            && query
                .get(i + 1..i + 6)
                .is_some_and(|t| t.eq_ignore_ascii_case(b"token"))
    };
    // One pass: queries are short, and a byte loop costs less than several memchr set-ups.
    query.iter().enumerate().any(|(i, &b)| match b {
        b'%' => true,
        b'_' | b'.' | b'+' | b'[' => around(i),
        _ => false,
    })
}

/// Whether the parameter `pair` (`name` or `name=value`) is `access_token`, as
/// [`strip_access_token`] defines it, and as PHP's query parser reads names too: `+` and `%20`
/// are spaces, leading spaces are dropped, a NUL ends the name, a `[key]` suffix makes an
/// array of the name before it, and a space, `.` or a `[` without its `]` stand for `_`.
fn is_access_token_param(pair: &[u8]) -> bool {
    let name = match memchr::memchr(b'=', pair) {
        Some(i) => &pair[..i],
        None => pair,
    };
    if name == b"access_token" {
        return true;
    }
    // Shortest spelling: `access_token` (12 bytes); anything shorter cannot decode to it.
    if name.len() < 12 || !may_hold_access_token(name) {
        return false;
    }
    let mut decoded: Vec<u8> = name.to_vec();
    // Each round shortens an encoded name; a name of n bytes settles within n / 2 rounds.
    for _ in 0..name.len() {
        let spaced: Vec<u8> = decoded
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        let next: Vec<u8> = percent_encoding::percent_decode(&spaced).collect();
        if next == decoded {
            break;
        }
        decoded = next;
    }
    let mut name: &[u8] = &decoded;
    if let Some(nul) = memchr::memchr(0, name) {
        name = &name[..nul];
    }
    while let [b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c', rest @ ..] = name {
        name = rest;
    }
    // `name[key]`: the array `name`.
    if let Some(open) = memchr::memchr(b'[', name) {
        if memchr::memchr(b']', &name[open..]).is_some() {
            name = &name[..open];
        }
    }
    name.len() == 12
        && name
            .iter()
            .map(|&b| match b {
                b' ' | b'.' | b'[' => b'_',
                b => b.to_ascii_lowercase(),
            })
            .eq(b"access_token".iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(q: &str) -> Option<String> {
        strip_access_token(q.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn access_token_removed_in_any_position_rest_untouched() {
        assert_eq!(strip("a=1&b=%2F"), None);
        assert_eq!(
            strip("access_token=s&k=a%2Fb&z").as_deref(),
            Some("k=a%2Fb&z")
        );
        assert_eq!(
            strip("k=a%2Fb&access_token=s&z").as_deref(),
            Some("k=a%2Fb&z")
        );
        assert_eq!(
            strip("k=a%2Fb&z&access_token=s").as_deref(),
            Some("k=a%2Fb&z")
        );
        assert_eq!(strip("access_token=s").as_deref(), Some(""));
        assert_eq!(strip("access%5Ftoken=s&a=1").as_deref(), Some("a=1"));
        assert_eq!(strip("my_access_token=1"), None);
        assert_eq!(strip("access_token").as_deref(), Some(""));
        // Past the prefilter (the name in a value), and stopped by it (neither `_` nor `%`).
        assert_eq!(strip("q=access_token&a=1"), None);
        assert_eq!(strip("page=2&per-page=50"), None);
    }

    /// Spellings that server-side parsers read as `access_token` (PHP, Rails and Java servlet
    /// query parsers: case-insensitive lookups, `;` separators, double decoding, `[]` arrays).
    #[test]
    fn every_spelling_parsers_read_as_access_token_is_removed() {
        for (query, want) in [
            ("ACCESS_TOKEN=s&a=1", "a=1"),
            ("Access_Token=s", ""),
            ("x=1;access_token=s", "x=1"),
            ("x=1;access_token=s;y=2&z=3", "x=1;y=2&z=3"),
            ("access%255Ftoken=s&a=1", "a=1"),
            ("access%25255Ftoken=s&a=1", "a=1"),
            ("access_token[]=s&a=1", "a=1"),
            ("access_token%5B%5D=s&a=1", "a=1"),
            ("%61ccess_token=s", ""),
            ("a=1&access_token=s&access_token=t&b=2", "a=1&b=2"),
            ("a=1&&access_token=s", "a=1&"),
            // PHP's own spellings of the name.
            ("access.token=s&a=1", "a=1"),
            ("access+token=s&a=1", "a=1"),
            ("access%20token=s&a=1", "a=1"),
            ("access[token=s&a=1", "a=1"),
            ("%20access_token=s&a=1", "a=1"),
            ("access_token%00=s&a=1", "a=1"),
            ("access_token[0]=s&a=1", "a=1"),
            ("ACCESS.TOKEN[x]=s;a=1", "a=1"),
        ] {
            assert_eq!(strip(query).as_deref(), Some(want), "{query}");
        }
        for query in [
            "access_tokens=1",
            "xaccess_token=1",
            "access-token=1",
            "a=access_token",
        ] {
            assert_eq!(strip(query), None, "{query}");
        }
    }

    #[test]
    fn request_lines_must_be_exact() {
        for ok in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n",
            b"GET http://gw/a HTTP/1.0\r\n",
        ] {
            assert!(request_line_ok(ok), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"GET  /a HTTP/1.1\r\n"[..],
            b"GET /a  HTTP/1.1\r\n",
            b"GET /a b HTTP/1.1\r\n",
            b"GET /a\tb HTTP/1.1\r\n",
            b"GET /a HTTP/1.1\n",
            b"GET /a HTTP/2.0\r\n",
            b"G(T /a HTTP/1.1\r\n",
            b" GET /a HTTP/1.1\r\n",
            b"GET /\xc3\xa9 HTTP/1.1\r\n",
        ] {
            assert!(!request_line_ok(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    /// The shortcut after httparse agrees with the full check on every line httparse takes.
    #[test]
    fn parsed_request_lines_agree_with_the_full_check() {
        let mut lines: Vec<Vec<u8>> = [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET  /a HTTP/1.1\r\n\r\n",
            b"GET /a  HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.1\n\r\n",
            b"GET /a HTTP/1.0\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"GET http://gw/a?b HTTP/1.1\r\n\r\n",
        ]
        .iter()
        .map(|l| l.to_vec())
        .collect();
        for b in 0..=255u8 {
            for at in [0, 4, 5, 6, 14, 15] {
                let mut l = b"GET /ab HTTP/1.1\r\n\r\n".to_vec();
                l.insert(at, b);
                lines.push(l);
            }
        }
        for line in &lines {
            let mut fields = [httparse::EMPTY_HEADER; 4];
            let mut req = httparse::Request::new(&mut fields);
            if !matches!(req.parse(line), Ok(httparse::Status::Complete(_))) {
                continue;
            }
            let (method, target) = (req.method.unwrap(), req.path.unwrap());
            assert_eq!(
                parsed_request_line_ok(line, method.as_bytes(), target.as_bytes()),
                request_line_ok(line),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn target_forms_by_method() {
        use http::Method;
        let get = Method::GET;
        assert_eq!(target_form(&get, b"/a?b"), Some(TargetForm::Origin));
        assert_eq!(
            target_form(&get, b"http://gw/a"),
            Some(TargetForm::Absolute)
        );
        assert_eq!(target_form(&get, b"HTTPS://gw"), Some(TargetForm::Absolute));
        assert_eq!(target_form(&get, b"gw:80"), None);
        assert_eq!(target_form(&get, b"*"), None);
        assert_eq!(target_form(&get, b"ftp://gw/a"), None);
        assert_eq!(target_form(&get, b"a/b"), None);
        assert_eq!(
            target_form(&Method::OPTIONS, b"*"),
            Some(TargetForm::Asterisk)
        );
        assert_eq!(
            target_form(&Method::CONNECT, b"gw:443"),
            Some(TargetForm::Authority)
        );
        assert_eq!(target_form(&Method::CONNECT, b"/a"), None);
    }

    #[test]
    fn absolute_form_gives_its_path_and_query() {
        let pq = |t: &[u8]| {
            let (p, q) = path_and_query(TargetForm::Absolute, t);
            (p.to_vec(), q.map(<[u8]>::to_vec))
        };
        assert_eq!(pq(b"http://gw"), (b"/".to_vec(), None));
        assert_eq!(
            pq(b"http://gw:80/a/b?c=1"),
            (b"/a/b".to_vec(), Some(b"c=1".to_vec()))
        );
        assert_eq!(pq(b"http://gw?c"), (b"/".to_vec(), Some(b"c".to_vec())));
        assert_eq!(pq(b"http://gw/a#f"), (b"/a".to_vec(), None));
    }

    #[test]
    fn prefix_matches_on_segment_boundaries() {
        assert!(prefix_matches(b"/", b"/anything"));
        assert!(prefix_matches(b"/api", b"/api"));
        assert!(prefix_matches(b"/api", b"/api/users"));
        assert!(!prefix_matches(b"/api", b"/apix"));
        assert!(!prefix_matches(b"/api", b"/ap"));
    }
}
