use std::time::Duration;

use crate::proxy::upstream_dns::UpstreamAddress;
use async_trait::async_trait;
use http::{HeaderName, HeaderValue, Method};
use pingora::upstreams::peer::HttpPeer;

use super::*;
use crate::metrics::{Metrics, TokenMetrics};
use crate::oauth::{AccessToken, FetchError};
use crate::token::{RenewalPolicy, TokenFetcher, TokenSource};

/// A fetcher the policy never calls (it takes the token value as input).
struct Unused;

#[async_trait]
impl TokenFetcher for Unused {
    async fn fetch(&self, _now: std::time::SystemTime) -> Result<AccessToken, FetchError> {
        Ok(AccessToken {
            value: "unused".into(),
            lifetime: Duration::from_secs(60),
        })
    }
}

pub(crate) struct RouteSpec<'a> {
    pub strip: &'a [&'a str],
    pub forward_cookies: bool,
    pub prefix: &'a str,
    pub strip_prefix: bool,
    pub base_path: &'a str,
}

impl Default for RouteSpec<'_> {
    fn default() -> Self {
        RouteSpec {
            strip: &[],
            forward_cookies: false,
            prefix: "/",
            strip_prefix: false,
            base_path: "",
        }
    }
}

pub(crate) fn route(settings: RouteSpec<'_>) -> Route {
    let strip: Vec<HeaderName> = settings
        .strip
        .iter()
        .map(|s| HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes()).unwrap())
        .collect();
    Route {
        index: 0,
        name: "r".into(),
        prefix: settings.prefix.into(),
        strip_prefix: settings.strip_prefix,
        base_path: settings.base_path.into(),
        upstream: UpstreamAddress::fixed(HttpPeer::new(
            "127.0.0.1:80",
            false,
            "api.example".into(),
        )),
        host_header: HeaderValue::from_static("api.example"),
        allow_methods: None,
        allow_header: None,
        strip_folded: strip
            .iter()
            .map(|h| fields::fold_name(h.as_str()))
            .collect(),
        strip_headers: strip,
        forward_cookies: settings.forward_cookies,
        token: TokenSource::new(
            "r",
            Box::new(Unused),
            RenewalPolicy::default(),
            TokenMetrics::detached(),
        ),
        subjects: None,
        subject_header: None,
        metrics: Metrics::new().route("r"),
    }
}

/// The upstream fields the plan gives for `fields`, as `(name, value)` strings in order.
fn planned(route: &Route, fields: &[(&str, &str)]) -> Vec<(String, String)> {
    planned_target(route, "/x", fields).1
}

fn planned_target(
    route: &Route,
    target: &str,
    fields: &[(&str, &str)],
) -> (Option<String>, Vec<(String, String)>) {
    let view: Vec<(&[u8], &[u8])> = fields
        .iter()
        .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
        .collect();
    let view = view.as_slice();
    let mut scan = RequestScan::default();
    for i in 0..view.count() {
        scan.field(i, view.class(i), view.value(i));
    }
    let facts = scan.finish(http::Version::HTTP_11).expect("admitted");
    let form = target_form(&Method::GET, target.as_bytes()).expect("target");
    let fw = Forwarding {
        route,
        client_ip: Some(b"10.0.0.9"),
        forward_entries: None,
        authorization: b"Bearer gateway",
        request_id: b"rid",
    };
    let mut plan = Plan::default();
    plan_request(view, &facts, form, target.as_bytes(), &fw, &mut plan);
    let mut out = Vec::new();
    let mut value = Vec::new();
    for (i, action) in plan.actions.iter().enumerate() {
        match *action {
            Action::Keep => out.push((fields[i].0.to_string(), fields[i].1.to_string())),
            Action::Drop => {}
            Action::Put(set) => {
                value.clear();
                write_value(set, view, &facts, &fw, &mut value);
                out.push((set.name().into(), String::from_utf8(value.clone()).unwrap()));
            }
        }
    }
    for set in plan.added() {
        value.clear();
        write_value(set, view, &facts, &fw, &mut value);
        out.push((set.name().into(), String::from_utf8(value.clone()).unwrap()));
    }
    let target = plan.target.map(|t| String::from_utf8(t).unwrap());
    (target, out)
}

fn names(fields: &[(String, String)]) -> Vec<&str> {
    fields.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn strips_every_credential_any_case() {
    let r = route(RouteSpec {
        strip: &["X-Api-Key"],
        ..Default::default()
    });
    let out = planned(
        &r,
        &[
            ("Host", "h"),
            ("Authorization", "Basic a"),
            ("authorization", "Bearer b"),
            ("Proxy-Authorization", "Basic c"),
            ("Cookie", "sid=1"),
            ("X-Api-Key", "k"),
            ("x_api_key", "k2"),
            ("Proxy_Authorization", "Basic cA=="),
            ("Proxy", "http://evil"),
            ("Accept", "application/json"),
        ],
    );
    assert_eq!(
        names(&out),
        [
            "Host",
            "Authorization",
            "Accept",
            "X-Forwarded-Host",
            "X-Forwarded-Proto",
            "X-Forwarded-For",
            "X-Request-Id"
        ]
    );
    let auth: Vec<_> = out.iter().filter(|(n, _)| n == "Authorization").collect();
    assert_eq!(auth.len(), 1);
    assert_eq!(auth[0].1, "Bearer gateway");
}

#[test]
fn authorization_replaced_in_place_order_kept() {
    let r = route(RouteSpec::default());
    let out = planned(
        &r,
        &[
            ("Host", "h"),
            ("authorization", "Basic a"),
            ("X-Mid", "1"),
            ("Authorization", "Bearer b, Bearer c"),
            ("Cookie", "c"),
            ("X-Repeat", "a"),
            ("Keep-Alive", "timeout=5"),
            ("X-Repeat", "b"),
            ("X-Last", "z"),
        ],
    );
    let want: Vec<(String, String)> = [
        ("Host", "api.example"),
        ("Authorization", "Bearer gateway"),
        ("X-Mid", "1"),
        ("X-Repeat", "a"),
        ("X-Repeat", "b"),
        ("X-Last", "z"),
        ("X-Forwarded-Host", "h"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-For", "10.0.0.9"),
        ("X-Request-Id", "rid"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    assert_eq!(out, want);

    // No inbound Authorization: the gateway's comes first after the client's fields.
    let out = planned(&r, &[("Host", "h"), ("X-A", "1")]);
    assert_eq!(
        names(&out),
        [
            "Host",
            "X-A",
            "Authorization",
            "X-Forwarded-Host",
            "X-Forwarded-Proto",
            "X-Forwarded-For",
            "X-Request-Id"
        ]
    );
}

#[test]
fn cookies_forwarded_when_asked_unless_stripped() {
    let fields = [("Host", "h"), ("Cookie", "sid=1"), ("Authorization", "x")];
    let forward = route(RouteSpec {
        forward_cookies: true,
        ..Default::default()
    });
    let out = planned(&forward, &fields);
    assert!(out.contains(&("Cookie".into(), "sid=1".into())));
    // `strip_headers` wins over `forward_cookies`, in any spelling.
    for strip in ["Cookie", "cookie"] {
        let stripped = route(RouteSpec {
            forward_cookies: true,
            strip: &[strip],
            ..Default::default()
        });
        let out = planned(&stripped, &fields);
        assert!(!names(&out).contains(&"Cookie"), "{out:?}");
    }
}

#[test]
fn gateway_fields_replace_the_clients() {
    let r = route(RouteSpec::default());
    let out = planned(
        &r,
        &[
            ("Host", "gw"),
            ("X-Forwarded-For", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("X-Forwarded-Host", "evil"),
            ("X-Forwarded-Proto", "https"),
            ("X-Request-Id", "mine"),
            ("X-Request-Id", "second"),
            ("X_Forwarded_For", "3.3.3.3"),
        ],
    );
    let want: Vec<(String, String)> = [
        ("Host", "api.example"),
        ("X-Forwarded-For", "1.1.1.1, 2.2.2.2, 10.0.0.9"),
        ("X-Forwarded-Host", "gw"),
        ("X-Forwarded-Proto", "http"),
        ("X-Request-Id", "rid"),
        ("Authorization", "Bearer gateway"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    assert_eq!(out, want);
}

#[test]
fn content_length_is_sent_once_in_canonical_form() {
    let r = route(RouteSpec::default());
    for (fields, want) in [
        (&[("Host", "h"), ("Content-Length", "010")][..], "10"),
        (&[("Host", "h"), ("Content-Length", "5, 5")][..], "5"),
        (
            &[
                ("Host", "h"),
                ("Content-Length", "5"),
                ("content-length", "5"),
            ][..],
            "5",
        ),
        (&[("Host", "h"), ("Content-Length", "0")][..], "0"),
        (&[("Host", "h"), ("Content-Length", "87")][..], "87"),
    ] {
        let out = planned(&r, fields);
        let lengths: Vec<_> = out
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(lengths, [want], "{fields:?}");
    }
}

#[test]
fn framing_refusals() {
    let refused = |fields: &[(&str, &str)], version| {
        let view: Vec<(&[u8], &[u8])> = fields
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect();
        let mut scan = RequestScan::default();
        for (i, (n, v)) in view.iter().enumerate() {
            scan.field(i, classify(n), v);
        }
        scan.finish(version).err()
    };
    let v11 = http::Version::HTTP_11;
    assert_eq!(refused(&[("Host", "a")], v11), None);
    assert_eq!(refused(&[], http::Version::HTTP_10), None);
    assert_eq!(
        refused(&[("Transfer-Encoding", "chunked")], http::Version::HTTP_10).map(|e| e.status()),
        Some(400)
    );
    for (fields, status) in [
        (&[][..], 400),
        (&[("Host", "a"), ("Host", "b")][..], 400),
        (&[("Host", "a b")][..], 400),
        (
            &[
                ("Host", "a"),
                ("Content-Length", "5"),
                ("Content-Length", "6"),
            ][..],
            400,
        ),
        (&[("Host", "a"), ("Content-Length", "+5")][..], 400),
        (
            &[
                ("Host", "a"),
                ("Content-Length", "5"),
                ("Transfer-Encoding", "chunked"),
            ][..],
            400,
        ),
        (
            &[("Host", "a"), ("Transfer-Encoding", "gzip, chunked")][..],
            501,
        ),
        (
            &[("Host", "a"), ("Transfer-Encoding", "chunked, chunked")][..],
            501,
        ),
        (&[("Host", "a"), ("Transfer-Encoding", "xchunked")][..], 501),
        (&[("Host", "a"), ("Transfer-Encoding", "")][..], 400),
        (&[("Host", "a"), ("Transfer-Encoding", " , ")][..], 400),
        (&[("Host", "a"), ("Transfer-Encoding", "chunked,")][..], 400),
        (
            &[
                ("Host", "a"),
                ("Transfer-Encoding", ""),
                ("Content-Length", "5"),
            ][..],
            400,
        ),
        (
            &[
                ("Host", "a"),
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", ""),
            ][..],
            400,
        ),
        (&[("Host", "a"), ("Connection", "X_Forwarded_For")][..], 400),
        (&[("Host", "a"), ("Connection", "x-forwarded-for")][..], 400),
        (&[("Host", "a"), ("Connection", "Host")][..], 400),
        (&[("Host", "a"), ("Connection", "content-length")][..], 400),
        (
            &[("Host", "a"), ("Connection", "a,b,c,d,e,f,g,h,i,j")][..],
            400,
        ),
    ] {
        let err = refused(fields, v11);
        assert_eq!(err.map(|e| e.status()), Some(status), "{fields:?}");
    }
}

#[test]
fn connection_named_fields_are_dropped() {
    let r = route(RouteSpec::default());
    let out = planned(
        &r,
        &[
            ("Host", "h"),
            ("Connection", "keep-alive, X-Hop, x_other"),
            ("X-Hop", "1"),
            ("X-Other", "2"),
            ("X-Kept", "3"),
        ],
    );
    assert!(!names(&out).contains(&"X-Hop"), "{out:?}");
    assert!(!names(&out).contains(&"X-Other"), "{out:?}");
    assert!(!names(&out).contains(&"Connection"), "{out:?}");
    assert!(names(&out).contains(&"X-Kept"), "{out:?}");
}

#[test]
fn websocket_handshake_keeps_its_fields() {
    let r = route(RouteSpec::default());
    let out = planned(
        &r,
        &[
            ("Host", "h"),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "k"),
        ],
    );
    assert!(out.contains(&("Connection".into(), "Upgrade".into())));
    assert!(out.contains(&("Upgrade".into(), "websocket".into())));
    // Another protocol is no upgrade: both go.
    let out = planned(
        &r,
        &[("Host", "h"), ("Connection", "Upgrade"), ("Upgrade", "h2c")],
    );
    assert!(!names(&out).contains(&"Upgrade"), "{out:?}");
    assert!(!names(&out).contains(&"Connection"), "{out:?}");
}

#[test]
fn upstream_target_joins_byte_for_byte() {
    let fields = [("Host", "h")];
    let target = |settings: RouteSpec<'_>, t: &str| planned_target(&route(settings), t, &fields).0;
    let api = || RouteSpec {
        prefix: "/api",
        strip_prefix: true,
        base_path: "/v1",
        ..Default::default()
    };
    assert_eq!(target(api(), "/api/users").as_deref(), Some("/v1/users"));
    assert_eq!(target(api(), "/api").as_deref(), Some("/v1/"));
    assert_eq!(target(api(), "/api/a//b").as_deref(), Some("/v1/a//b"));
    assert_eq!(target(api(), "/apix").as_deref(), Some("/v1/apix"));
    assert_eq!(target(RouteSpec::default(), "/a%2Fb/c"), None);
    let base = RouteSpec {
        base_path: "/v1",
        ..Default::default()
    };
    assert_eq!(target(base, "/x%252F").as_deref(), Some("/v1/x%252F"));
    assert_eq!(
        target(RouteSpec::default(), "/q?a=1&access_token=s").as_deref(),
        Some("/q?a=1")
    );
    assert_eq!(
        target(RouteSpec::default(), "/q?access_token=s").as_deref(),
        Some("/q")
    );
    assert_eq!(
        target(RouteSpec::default(), "http://gw:80/q?x=1").as_deref(),
        Some("/q?x=1")
    );
}

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

#[test]
fn trace_and_connect_need_the_route_to_allow_them() {
    let mut r = route(RouteSpec::default());
    for m in [Method::GET, Method::POST, Method::PATCH, Method::OPTIONS] {
        assert!(admit(true, Ok(()), Some(&r), &m).is_ok(), "{m}");
    }
    for m in [Method::TRACE, Method::CONNECT] {
        assert_eq!(
            admit(true, Ok(()), Some(&r), &m).err(),
            Some(GatewayError::MethodNotAllowed)
        );
    }
    r.allow_methods = Some(vec![Method::TRACE]);
    assert!(admit(true, Ok(()), Some(&r), &Method::TRACE).is_ok());
    // The order: client, framing, route, method.
    let bad = Err(GatewayError::BadRequest("x"));
    assert_eq!(
        admit(false, bad.clone(), None, &Method::TRACE).err(),
        Some(GatewayError::ClientNotAllowed)
    );
    assert_eq!(
        admit(true, bad, None, &Method::TRACE).err(),
        Some(GatewayError::BadRequest("x"))
    );
    assert_eq!(
        admit(true, Ok(()), None, &Method::TRACE).err(),
        Some(GatewayError::NoRoute)
    );
}

/// The look at line starts agrees with the count over every byte, for a bare LF at the end of
/// any line of heads httparse accepts: the request line, any field line (empty values too),
/// the empty line, and empty lines before the request line.
#[test]
fn crlf_lines_agrees_with_counting_every_byte() {
    let lines: &[&[u8]] = &[
        b"GET /a?b=c HTTP/1.1",
        b"Host: gw",
        b"X-Empty:",
        b"X-Spaces:   ",
        b"Accept: */*",
    ];
    let mut checked = 0;
    for leading in [&b""[..], b"\r\n", b"\n", b"\r\n\n"] {
        // Bit i set: line i ends in a bare LF (the last bit is the empty line).
        for bare in 0u32..1 << (lines.len() + 1) {
            let mut head = leading.to_vec();
            for (i, line) in lines.iter().chain([&&b""[..]]).enumerate() {
                head.extend_from_slice(line);
                head.extend_from_slice(if bare & 1 << i != 0 { b"\n" } else { b"\r\n" });
            }
            let mut fields = [httparse::EMPTY_HEADER; 8];
            let mut req = httparse::Request::new(&mut fields);
            let Ok(httparse::Status::Complete(n)) = req.parse(&head) else {
                continue;
            };
            let at = |s: &[u8]| s.as_ptr() as usize - head.as_ptr() as usize;
            let starts: Vec<usize> = req.headers.iter().map(|h| at(h.name.as_bytes())).collect();
            let line_start = at(req.method.unwrap().as_bytes());
            assert_eq!(
                target::crlf_lines(&head[..n], line_start, starts),
                target::crlf_only(&head[..n]),
                "{:?}",
                String::from_utf8_lossy(&head)
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} heads parsed");
}

/// Every gateway field line starts with its name as `Set::line_start` spells it.
#[test]
fn padded_line_starts_spell_every_field() {
    // `ALL` lists every variant once, in declaration order: the table has no empty entry.
    for (i, set) in Set::ALL.into_iter().enumerate() {
        assert_eq!(set as usize, i, "{set:?}");
        let (padded, len) = &Set::PADDED_LINE_STARTS[set as usize];
        assert_eq!(&padded[..*len], set.line_start().as_bytes(), "{set:?}");
    }
}
