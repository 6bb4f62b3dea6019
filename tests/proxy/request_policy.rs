//! Both proxy paths send the upstream the same request head: generated requests — credential,
//! hop-by-hop, `Connection`-named and gateway-set field names in varied letter case, `_`
//! spellings and repetition, `strip_headers` lists, `forward_cookies` on and off,
//! `access_token` in varied query positions and spellings — go through the fast path's
//! serialiser (its buffer) and pingora-proxy's (pingora's own HTTP/1 parser, then the
//! `RequestHeader` built from the policy's plan, written by pingora). Both must refuse alike or
//! send the same request line and the same fields, byte for byte; for every name the same
//! values in the same order (RFC 9110 §5.3). pingora's header map holds repeated names
//! together, so across names the order may differ only by that grouping.
//!
//! Each head also keeps the gateway's promise: exactly one `Authorization`, the gateway's; no
//! inbound credential and no `access_token` parameter in any spelling a server reads as one.

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use pingora::protocols::http::ServerSession;
use pingora::upstreams::peer::HttpPeer;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use tokengate::proxy::upstream_dns::UpstreamAddress;

use tokengate::metrics::{Metrics, TokenMetrics};
use tokengate::oauth::{AccessToken, FetchError};
use tokengate::proxy::downstream::DownstreamHead;
use tokengate::proxy::fast_path::{upstream_head, Scratch};
use tokengate::proxy::policy::fields::fold_name;
use tokengate::proxy::policy::{Forwarding, GatewayError, Plan};
use tokengate::proxy::routes::Route;
use tokengate::proxy::SharedState;
use tokengate::token::{RenewalPolicy, TokenFetcher, TokenSource};

const AUTHORIZATION: &str = "Bearer gateway-token-0123";
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));

/// Never asked: both serialisers take the token value as input.
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

fn state(strip: &[&str], forward_cookies: bool, strip_prefix: bool) -> SharedState {
    let strip: Vec<HeaderName> = strip
        .iter()
        .map(|s| HeaderName::from_bytes(s.as_bytes()).expect("header name"))
        .collect();
    let metrics = Metrics::new();
    let route = Route {
        index: 0,
        name: "api".into(),
        prefix: "/api".into(),
        strip_prefix,
        base_path: if strip_prefix {
            "/v2".into()
        } else {
            String::new()
        },
        upstream: UpstreamAddress::fixed(HttpPeer::new("127.0.0.1:9", false, "api.example".into())),
        host_header: HeaderValue::from_static("api.example"),
        allow_methods: None,
        allow_header: None,
        strip_folded: strip.iter().map(|h| fold_name(h.as_str())).collect(),
        strip_headers: strip,
        forward_cookies,
        token: TokenSource::new(
            "api",
            Box::new(Unused),
            RenewalPolicy::default(),
            TokenMetrics::detached(),
        ),
        subjects: None,
        subject_header: None,
        metrics: metrics.route("api"),
    };
    SharedState::new(
        vec![route],
        vec!["10.0.0.0/8".parse().expect("cidr")],
        65536,
        metrics,
    )
}

/// One generated request: `(method, target, fields, strip list, forward_cookies, strip prefix)`.
#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    target: String,
    fields: Vec<(String, String)>,
    strip: Vec<&'static str>,
    forward_cookies: bool,
    strip_prefix: bool,
}

/// Names whose handling the policy decides: credentials, hop-by-hop, gateway-set, framing.
const NAMES: &[&str] = &[
    "Authorization",
    "Proxy-Authorization",
    "Cookie",
    "Proxy",
    "X-Api-Key",
    "X-Secret",
    "Keep-Alive",
    "Proxy-Connection",
    "Proxy-Authenticate",
    "TE",
    "Trailer",
    "Upgrade",
    "HTTP2-Settings",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Request-Id",
    "Accept",
    "User-Agent",
    "X-Hop",
    "X-Trace",
    "Expect",
];

/// The names the gateway acts on (its table), whose `_` spellings never pass.
const TABLE: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "proxy",
    "host",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-request-id",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "http2-settings",
    "expect",
    "date",
];

/// `strip_headers` entries a route may have (framing fields are a config error).
const STRIPPABLE: &[&str] = &[
    "x-api-key",
    "x_secret",
    "cookie",
    "x-forwarded-for",
    "x-request-id",
    "accept",
    "x-hop",
];

fn spelled(name: &'static str) -> impl Strategy<Value = String> {
    (any::<u32>(), any::<bool>()).prop_map(move |(case_bits, underscore)| {
        name.chars()
            .enumerate()
            .map(|(i, c)| match c {
                '-' if underscore => '_',
                c if case_bits >> (i % 32) & 1 == 1 => c.to_ascii_uppercase(),
                c => c.to_ascii_lowercase(),
            })
            .collect()
    })
}

fn value_for(name: &str) -> BoxedStrategy<String> {
    let lower = name.to_ascii_lowercase().replace('_', "-");
    match lower.as_str() {
        "connection" => proptest::sample::subsequence(
            vec![
                "keep-alive",
                "close",
                "upgrade",
                "X-Hop",
                "x_trace",
                "Accept",
                "Cookie",
                "te",
            ],
            0..4,
        )
        .prop_map(|v| v.join(", "))
        .boxed(),
        "upgrade" => prop_oneof![Just("websocket".to_string()), Just("h2c".to_string())].boxed(),
        "x-request-id" => prop_oneof![
            Just("trace-7".to_string()),
            Just("bad id".to_string()),
            Just(String::new())
        ]
        .boxed(),
        "x-forwarded-for" => prop_oneof![
            Just("192.0.2.1".to_string()),
            Just("1.1.1.1, 2.2.2.2".to_string())
        ]
        .boxed(),
        "expect" => Just("100-continue".to_string()).boxed(),
        _ => "[a-zA-Z0-9=;/ ]{0,12}"
            .prop_map(|v| v.trim().to_string())
            .boxed(),
    }
}

fn field() -> impl Strategy<Value = (String, String)> {
    proptest::sample::select(NAMES)
        .prop_flat_map(spelled)
        .prop_flat_map(|name| {
            let v = value_for(&name);
            (Just(name), v)
        })
}

fn query() -> impl Strategy<Value = String> {
    let param = prop_oneof![
        Just("a=1"),
        Just("b=%2F"),
        Just("access_token=S"),
        Just("ACCESS_TOKEN=S"),
        Just("access%5Ftoken=S"),
        Just("access%255Ftoken=S"),
        Just("access_token[]=S"),
        Just("my_access_token=1"),
        Just("x=access_token"),
    ];
    let sep = prop_oneof![Just("&"), Just(";")];
    proptest::collection::vec((sep, param), 0..5).prop_map(|ps| {
        let mut q = String::new();
        for (i, (sep, p)) in ps.into_iter().enumerate() {
            if i > 0 {
                q.push_str(sep);
            }
            q.push_str(p);
        }
        q
    })
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::sample::select(&["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"][..]),
        prop_oneof![Just("/api/x"), Just("/api"), Just("/other/a%2Fb")],
        query(),
        proptest::collection::vec(field(), 0..12),
        (0..12usize, any::<bool>(), spelled("Connection")),
        proptest::sample::subsequence(STRIPPABLE.to_vec(), 0..4),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(method, path, query, mut fields, (host_at, with_length, conn), strip, fc, sp)| {
                // One Host (two are refused alike; tested by name elsewhere), somewhere.
                fields.insert(host_at.min(fields.len()), ("Host".into(), "gw.test".into()));
                if with_length {
                    fields.push(("Content-Length".into(), "0".into()));
                }
                if fields.len() % 3 == 0 {
                    fields.push((conn, "keep-alive, X-Hop".into()));
                }
                let target = if query.is_empty() {
                    path.to_string()
                } else {
                    format!("{path}?{query}")
                };
                Case {
                    method,
                    target,
                    fields,
                    strip,
                    forward_cookies: fc,
                    strip_prefix: sp,
                }
            },
        )
}

fn raw(case: &Case) -> Vec<u8> {
    let mut raw = format!("{} {} HTTP/1.1\r\n", case.method, case.target).into_bytes();
    for (n, v) in &case.fields {
        raw.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    raw
}

/// The fields of a serialised head (after its request line).
fn fields_of(head: &[u8]) -> (String, Vec<(String, String)>) {
    let mut storage = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut storage);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        other => panic!(
            "unparseable upstream head {other:?}: {}",
            String::from_utf8_lossy(head)
        ),
    }
    let line = format!(
        "{} {} HTTP/1.{}",
        req.method.unwrap_or(""),
        req.path.unwrap_or(""),
        req.version.unwrap_or(9)
    );
    let fields = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    (line, fields)
}

/// pingora-proxy's path: pingora's HTTP/1 server reads the head, the policy plans from the
/// bytes it read, the `RequestHeader` built from the plan is written as pingora writes it.
fn via_pingora(
    rt: &tokio::runtime::Runtime,
    raw: &[u8],
    state: &SharedState,
    request_id: &[u8],
) -> Result<Vec<u8>, Option<GatewayError>> {
    let mut session = ServerSession::new_http1(Box::new(Cursor::new(raw.to_vec())));
    match rt.block_on(session.read_request()) {
        Ok(true) => {}
        _ => return Err(None),
    }
    let Some(h1) = session.as_http1() else {
        return Err(None);
    };
    let head = DownstreamHead::parse(h1.get_headers_raw_bytes()).map_err(Some)?;
    let client_ip = CLIENT.to_string();
    let fw = Forwarding {
        route: &state.routes[0],
        client_ip: Some(client_ip.as_bytes()),
        forward_entries: None,
        authorization: AUTHORIZATION.as_bytes(),
        request_id,
    };
    let up = match head.upstream_header(&fw, &mut Plan::default()) {
        Ok(up) => up,
        Err(e) => panic!("pingora could not hold the planned head: {e}"),
    };
    let mut wire = format!(
        "{} {} HTTP/1.1\r\n",
        up.method,
        String::from_utf8_lossy(up.raw_path())
    )
    .into_bytes();
    up.header_to_h1_wire(&mut wire);
    wire.extend_from_slice(b"\r\n");
    Ok(wire)
}

/// The fast path's fields grouped as pingora's header map groups them: each name's values
/// together, names in order of first appearance.
fn grouped(fields: &[(String, String)]) -> Vec<(String, String)> {
    let mut names: Vec<String> = Vec::new();
    for (n, _) in fields {
        let lower = n.to_ascii_lowercase();
        if !names.contains(&lower) {
            names.push(lower);
        }
    }
    names
        .iter()
        .flat_map(|name| {
            fields
                .iter()
                .filter(move |(n, _)| n.to_ascii_lowercase() == *name)
                .cloned()
        })
        .collect()
}

/// Cases whose two heads were compared (the rest were refused alike).
static COMPARED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn check(rt: &tokio::runtime::Runtime, case: &Case) -> Result<(), TestCaseError> {
    let state = state(&case.strip, case.forward_cookies, case.strip_prefix);
    let raw = raw(case);
    let mut scratch = Scratch::new(&state, CLIENT);
    let auth = HeaderValue::from_static(AUTHORIZATION);
    let fast = upstream_head(&state, 0, &raw, &auth, &mut scratch);
    // The request id both paths decided: the fast path's (the rule is one shared function).
    let request_id = match &fast {
        Ok(head) => fields_of(head)
            .1
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("x-request-id"))
            .map(|(_, v)| v)
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let slow = via_pingora(rt, &raw, &state, request_id.as_bytes());
    let (fast, slow) = match (fast, slow) {
        (Err(a), Err(b)) => {
            // pingora's own parser refuses some heads before the policy sees them (`None`).
            if b.is_some() {
                prop_assert_eq!(a, b, "different refusals");
            }
            return Ok(());
        }
        (Ok(fast), Ok(slow)) => (fast, slow),
        (a, b) => {
            return Err(TestCaseError::fail(format!(
                "one path refused: fast {:?} pingora {:?}",
                a.map(|h| String::from_utf8_lossy(&h).into_owned()),
                b.map(|h| String::from_utf8_lossy(&h).into_owned())
            )))
        }
    };
    COMPARED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (fast_line, fast_fields) = fields_of(&fast);
    let (slow_line, slow_fields) = fields_of(&slow);
    prop_assert_eq!(&fast_line, &slow_line, "request lines differ");
    prop_assert_eq!(
        grouped(&fast_fields),
        slow_fields.clone(),
        "fields differ:\nfast:\n{}\npingora:\n{}",
        String::from_utf8_lossy(&fast),
        String::from_utf8_lossy(&slow)
    );
    promise_kept(case, &fast_line, &fast_fields)
}

/// The gateway's promise, checked on the head itself.
fn promise_kept(case: &Case, line: &str, fields: &[(String, String)]) -> Result<(), TestCaseError> {
    let same = |a: &str, b: &str| {
        a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
    };
    let auth: Vec<_> = fields
        .iter()
        .filter(|(n, _)| same(n, "authorization"))
        .collect();
    prop_assert_eq!(auth.len(), 1);
    prop_assert_eq!(auth[0].1.as_str(), AUTHORIZATION);
    for (n, _) in fields {
        for gone in [
            "proxy-authorization",
            "proxy",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "te",
            "trailer",
            "http2-settings",
        ] {
            prop_assert!(!same(n, gone), "{} forwarded", n);
        }
        // No `_` spelling of a name the gateway acts on.
        prop_assert!(
            !n.contains('_') || !TABLE.iter().any(|k| same(n, k)),
            "{} forwarded",
            n
        );
        for s in &case.strip {
            let gateway_set = same(s, "x-forwarded-for") || same(s, "x-request-id");
            prop_assert!(!same(n, s) || gateway_set, "{} stripped but forwarded", n);
        }
        if same(n, "cookie") {
            prop_assert!(case.forward_cookies && !case.strip.contains(&"cookie"));
        }
    }
    let query = line
        .split(' ')
        .nth(1)
        .and_then(|t| t.split_once('?'))
        .map(|(_, q)| q);
    for p in query.unwrap_or("").split(['&', ';']) {
        let name = p.split('=').next().unwrap_or("");
        let mut decoded = name.to_string();
        for _ in 0..4 {
            decoded = percent_encoding::percent_decode_str(&decoded)
                .decode_utf8_lossy()
                .into_owned();
        }
        let decoded = decoded.to_ascii_lowercase();
        prop_assert!(
            decoded.trim_end_matches("[]") != "access_token",
            "access_token left in {line}"
        );
    }
    Ok(())
}

fn fold(b: u8) -> u8 {
    match b | 0x20 {
        0x7f => b'-',
        b => b,
    }
}

#[test]
fn both_paths_send_the_same_upstream_head() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 10_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&case(), |case| check(&rt, &case))
        .unwrap_or_else(|e| panic!("{e}"));
    // Most generated requests are admitted (refusals are compared too, but say less).
    let compared = COMPARED.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        compared >= 5_000,
        "only {compared} of 10,000 heads compared"
    );
}
