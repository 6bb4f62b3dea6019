//! The framing table of `docs/request-lifecycle.md`, one test per row: what each framing case
//! gets on the request side and on the response side, on both proxy paths. Refusals are the
//! gateway's own (JSON body, `tokengate-error`, the status RFC 9112 names) and nothing of the
//! request reaches the upstream.

use crate::proxy_support;

use proxy_support::{rig_with, send, Answer, Rig, Scripted};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Field lines that send a request down each path: none (the fast path), and a field a
/// `Connection` names (pingora-proxy's path).
const EACH_PATH: [&str; 2] = ["", "Connection: X-Hop\r\nX-Hop: 1\r\n"];

/// Asserts a gateway refusal: `status`, `tokengate-error: code`, the JSON body's `error`.
pub(crate) fn assert_refused(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{}", a.head);
    assert_eq!(
        a.header("tokengate-error").as_deref(),
        Some(code),
        "{}",
        a.head
    );
    let body: serde_json::Value = serde_json::from_slice(&a.body)
        .unwrap_or_else(|e| panic!("not the gateway's JSON ({e}): {}", a.head));
    assert_eq!(body["error"], code);
}

/// Each `(request, status, code)` is refused on both paths (where the request can take
/// either), and nothing reaches the upstream; the refusals are counted.
async fn refused_on_both_paths(cases: &[(&str, u16, &str)]) {
    let rig = Rig::start(|t, _, _| t).await;
    for (request, status, code) in cases {
        for extra in EACH_PATH {
            // The path-choosing fields go right after the request line.
            let (line, rest) = request.split_once("\r\n").expect("request line");
            let raw = format!("{line}\r\n{extra}{rest}");
            let a = send(rig.gw.addr(), raw.as_bytes()).await;
            assert_refused(&a, *status, code);
        }
    }
    assert!(
        rig.raw.requests().is_empty(),
        "a refused request was forwarded"
    );
    let metrics = rig.gw.metrics().await;
    for (_, _, code) in cases {
        let line = format!("tokengate_denied_total{{reason=\"{code}\"}}");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{line} not counted:\n{metrics}"
        );
    }
    rig.stop().await;
}

/// Content-Length and Transfer-Encoding together, lengths that disagree or are no number,
/// a coding other than chunked (RFC 9112 §6.1, §6.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_or_invalid_framing_is_refused() {
    refused_on_both_paths(&[
        (
            "POST /drillster/f HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            "POST /drillster/f HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            "POST /drillster/f HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            400,
            "bad_request",
        ),
        (
            "POST /drillster/f HTTP/1.1\r\nHost: gw\r\nContent-Length: 5, 6\r\n\r\nhello",
            400,
            "bad_request",
        ),
        (
            "POST /drillster/f HTTP/1.1\r\nHost: gw\r\nContent-Length: +5\r\n\r\nhello",
            400,
            "bad_request",
        ),
        (
            "POST /drillster/f HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            "not_implemented",
        ),
        (
            "POST /drillster/f HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            501,
            "not_implemented",
        ),
        // A `Transfer-Encoding` that names no coding is refused, never taken as absent (the
        // fast path once forwarded it as chunked with a length-framed body: request smuggling).
        (
            "POST /drillster/f HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: \r\nContent-Length: 5\r\n\r\nhello",
            400,
            "bad_request",
        ),
        (
            "POST /drillster/f HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: ,\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            "POST /drillster/f HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            "POST /drillster/f HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            "POST /drillster/f HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
            "not_implemented",
        ),
    ])
    .await;
}

/// A missing, repeated or invalid `Host` (RFC 9112 §3.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_must_be_there_once_and_valid() {
    refused_on_both_paths(&[
        ("GET /drillster/h HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (
            "GET /drillster/h HTTP/1.1\r\nHost: gw\r\nHost: other\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            "GET /drillster/h HTTP/1.1\r\nHost: user@gw\r\n\r\n",
            400,
            "bad_request",
        ),
    ])
    .await;
}

/// Heads a strict parser refuses (RFC 9112 §2.2, §3, §5.1, §5.2): the gateway answers them
/// itself, before pingora-proxy's more lenient parser could read something else into them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heads_are_refused_by_the_gateway() {
    let rig = Rig::start(|t, _, _| t).await;
    for raw in [
        // Two spaces, a space inside the target, a tab.
        &b"GET  /drillster/a?access_token=S  HTTP/1.1\r\nHost: gw\r\n\r\n"[..],
        b"GET /drillster/a b HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET\t/drillster/a HTTP/1.1\r\nHost: gw\r\n\r\n",
        // Authority-form for a method that is not CONNECT.
        b"GET gw:80 HTTP/1.1\r\nHost: gw\r\n\r\n",
        // `*` for a method that is not OPTIONS.
        b"GET * HTTP/1.1\r\nHost: gw\r\n\r\n",
        // Whitespace before the colon, obs-fold, NUL and a bare CR in a value.
        b"GET /drillster/a HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding : chunked\r\n\r\n",
        b"GET /drillster/a HTTP/1.1\r\nHost: gw\r\nX-A: one\r\n two\r\n\r\n",
        b"GET /drillster/a HTTP/1.1\r\nHost: gw\r\nX-A: o\0ne\r\n\r\n",
        b"GET /drillster/a HTTP/1.1\r\nHost: gw\r\nX-A: o\rne\r\n\r\n",
        // Bare LF line endings (a recipient may accept them, RFC 9112 §2.2; the gateway does
        // not, so no upstream reads the head differently).
        b"GET /drillster/a HTTP/1.1\nHost: gw\n\n",
        // A bare LF ending a field line.
        b"GET /drillster/a HTTP/1.1\r\nHost: gw\nX-A: 1\r\n\r\n",
        // A target pingora's URI parser refuses; an absolute-form authority that is not Host's,
        // or carries userinfo.
        b"GET /drillster/a?a=<> HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET http://other/drillster/a HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET http://user:pw@gw/drillster/a HTTP/1.1\r\nHost: gw\r\n\r\n",
        // A version other than 1.0 and 1.1, garbage.
        b"GET /drillster/a HTTP/2.0\r\nHost: gw\r\n\r\n",
        b"GARBAGE\r\n\r\n",
    ] {
        let a = send(rig.gw.addr(), raw).await;
        assert_refused(&a, 400, "bad_request");
    }
    // A head over the limit: 431.
    let big = format!(
        "GET /drillster/a HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n",
        "v".repeat(70 * 1024)
    );
    let a = send(rig.gw.addr(), big.as_bytes()).await;
    assert_refused(&a, 431, "request_header_too_large");
    assert!(
        rig.raw.requests().is_empty(),
        "a refused request was forwarded"
    );
    rig.stop().await;
}

/// TRACE (an echoing upstream would hand back the gateway's token) and CONNECT: 405 with
/// `Allow`, unless the route allows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_and_connect_are_refused_by_default() {
    let rig = Rig::start(|t, _, _| {
        proxy_support::route_setting(&t, "driftrock", "allow_methods = [\"GET\", \"TRACE\"]")
    })
    .await;
    // In any letter case: some servers read `trace` as TRACE.
    for (extra, method) in EACH_PATH
        .iter()
        .flat_map(|e| [(e, "TRACE"), (e, "trace"), (e, "Connect")])
    {
        let trace = format!("{method} /drillster/t HTTP/1.1\r\nHost: gw\r\n{extra}\r\n");
        let a = send(rig.gw.addr(), trace.as_bytes()).await;
        assert_refused(&a, 405, "method_not_allowed");
        let allow = a.header("allow").expect("Allow");
        assert!(!allow.contains("TRACE") && allow.contains("GET"), "{allow}");
    }
    let connect = b"CONNECT gw:443 HTTP/1.1\r\nHost: gw:443\r\n\r\n";
    let a = send(rig.gw.addr(), connect).await;
    assert_refused(&a, 405, "method_not_allowed");
    assert!(rig.raw.requests().is_empty());
    // Named in `allow_methods`, TRACE is forwarded like any method.
    let a = send(
        rig.gw.addr(),
        b"TRACE /driftrock/t HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.head);
    rig.stop().await;
}

/// Served rows: lengths sent canonical and once (RFC 9110 §8.6), absolute-form forwarded in
/// origin-form, `OPTIONS *` forwarded as `*`, `access_token` gone in every spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_requests_leave_in_canonical_form() {
    let rig = Rig::start(|t, _, _| t).await;
    for extra in EACH_PATH {
        for (length_fields, body) in [
            ("Content-Length: 010\r\n", "0123456789"),
            ("Content-Length: 5, 5\r\n", "hello"),
            ("Content-Length: 5\r\ncontent-length: 5\r\n", "hello"),
        ] {
            let raw = format!(
                "POST /drillster/len HTTP/1.1\r\nHost: gw\r\n{extra}{length_fields}Connection: close\r\n\r\n{body}"
            );
            let a = send(rig.gw.addr(), raw.as_bytes()).await;
            assert_eq!(a.status, 200, "{}", a.head);
            let seen = rig.raw.last().expect("forwarded");
            assert_eq!(
                seen.header_values("content-length"),
                [body.len().to_string()],
                "{length_fields:?}"
            );
            assert_eq!(seen.body_len, body.len() as u64);
        }
        let raw = format!(
            "GET /drillster/q?ACCESS_TOKEN=S;a=1&access%255Ftoken=S&access_token[]=S&access.token=S&access+token=S&access_token[0]=S&b=2 HTTP/1.1\r\nHost: gw\r\n{extra}Connection: close\r\n\r\n"
        );
        let a = send(rig.gw.addr(), raw.as_bytes()).await;
        assert_eq!(a.status, 200, "{}", a.head);
        assert_eq!(rig.raw.last().expect("forwarded").target, "/q?a=1&b=2");
    }
    // An empty line before the request line is ignored (RFC 9112 §2.2).
    let a = send(
        rig.gw.addr(),
        b"\r\nGET /drillster/empty-line HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(rig.raw.last().expect("forwarded").target, "/empty-line");
    let a = send(
        rig.gw.addr(),
        b"GET http://gw/drillster/abs?x=1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(rig.raw.last().expect("forwarded").target, "/abs?x=1");
    rig.stop().await;
}

/// `OPTIONS *` reaches the upstream as `*` (RFC 9112 §3.2.4), on the route that owns `/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_asterisk_is_forwarded_as_asterisk() {
    let up = Scripted::start(vec![b"HTTP/1.1 204 No Content\r\n\r\n"], None).await;
    let url = format!("http://{}", up.addr);
    let rig = Rig::start(move |t, sandbox, _| {
        let route = proxy_support::client_credentials_route(sandbox, "root", "/", &url, "");
        format!("{t}{route}")
    })
    .await;
    let a = send(
        rig.gw.addr(),
        b"OPTIONS * HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.head);
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(
        up.heads()
            .last()
            .map(|h| h.lines().next().unwrap_or("").to_string()),
        Some("OPTIONS * HTTP/1.1".to_string())
    );
    rig.stop().await;
}

/// Underscore spellings of stripped or credential fields, and `Proxy` (httpoxy), never reach
/// the upstream (CGI servers read `X_Api_Key` as `X-Api-Key`, RFC 3875 §4.1.18).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_spellings_and_proxy_are_removed() {
    let rig = Rig::start(|t, _, _| {
        proxy_support::route_setting(&t, "drillster", "strip_headers = [\"X-Api-Key\"]")
    })
    .await;
    let mut heads = Vec::new();
    for extra in EACH_PATH {
        let raw = format!(
            "GET /drillster/u HTTP/1.1\r\nHost: gw\r\nX-Request-Id: u-1\r\n{extra}X_Api_Key: k\r\nProxy_Authorization: Basic cA==\r\nProxy: http://evil\r\nX_Forwarded_For: 6.6.6.6\r\nX_Custom: kept\r\nConnection: close\r\n\r\n"
        );
        let a = send(rig.gw.addr(), raw.as_bytes()).await;
        assert_eq!(a.status, 200, "{}", a.head);
        let seen = rig.raw.last().expect("forwarded");
        let names = seen.header_names();
        for gone in [
            "x_api_key",
            "proxy_authorization",
            "proxy",
            "x_forwarded_for",
        ] {
            assert!(
                !names.iter().any(|n| n.eq_ignore_ascii_case(gone)),
                "{gone} forwarded: {names:?}"
            );
        }
        assert_eq!(seen.header("x_custom").as_deref(), Some("kept"));
        assert_eq!(seen.header_values("x-forwarded-for"), ["127.0.0.1"]);
        heads.push(String::from_utf8_lossy(&seen.head).into_owned());
    }
    // The paths differ only by the path-choosing fields, which neither forwards.
    assert_eq!(heads[0], heads[1]);
    rig.stop().await;
}

/// Response rows: a `101` to a request that asked for no upgrade, a malformed trailer, lengths
/// that disagree — the same answer on both paths (502, or a closed connection once the head
/// went out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_upstream_responses_get_one_behaviour() {
    // An unasked 101: 502 on both paths, and the connection closes (the client asked to keep it).
    let up = Scripted::start(
        vec![b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"],
        None,
    )
    .await;
    let rig = rig_with(&up).await;
    for extra in EACH_PATH {
        let raw = format!("GET /scripted/ws HTTP/1.1\r\nHost: gw\r\n{extra}\r\n");
        let a = send(rig.gw.addr(), raw.as_bytes()).await;
        assert_refused(&a, 502, "upstream_unreachable");
        assert_eq!(
            a.header("connection").as_deref(),
            Some("close"),
            "{}",
            a.head
        );
    }
    rig.stop().await;

    // Lengths that disagree: 502 on both paths.
    let up = Scripted::start(
        vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"],
        None,
    )
    .await;
    let rig = rig_with(&up).await;
    for extra in EACH_PATH {
        let raw =
            format!("GET /scripted/cl HTTP/1.1\r\nHost: gw\r\n{extra}Connection: close\r\n\r\n");
        let a = send(rig.gw.addr(), raw.as_bytes()).await;
        assert_refused(&a, 502, "upstream_unreachable");
    }
    rig.stop().await;

    // A trailer with a bare LF or a CR inside: the body cannot be read as sent; the client's
    // connection closes before a complete body (the head is already out).
    for body in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: a\nb\r\n\r\n"
            [..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: a\rb\r\n\r\n",
    ] {
        let up = Scripted::start(vec![body], None).await;
        let rig = rig_with(&up).await;
        for extra in EACH_PATH {
            let raw = format!("GET /scripted/trailer HTTP/1.1\r\nHost: gw\r\n{extra}\r\n");
            let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
            s.write_all(raw.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut got))
                    .await;
            let text = String::from_utf8_lossy(&got);
            let head_end = text.find("\r\n\r\n").map_or(0, |i| i + 4);
            let complete = got.len() > head_end && got.ends_with(b"\r\n\r\n");
            assert!(!complete, "malformed trailer passed {extra:?}:\n{text}");
        }
        rig.stop().await;
    }
}

/// A chunked request body that is not valid chunked framing (RFC 9112 §7.1): the gateway's
/// 400, and the request never completes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_the_gateways_400() {
    let rig = Rig::start(|t, _, _| t).await;
    let raw = b"POST /drillster/c HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
    let a = send(rig.gw.addr(), raw).await;
    assert_refused(&a, 400, "bad_request");
    assert!(
        rig.raw.requests().iter().all(|r| r.body_len == 0),
        "a body byte was forwarded"
    );
    rig.stop().await;
}

/// Fields a response's `Connection` names are hop-by-hop (RFC 9110 §7.6.1): neither path
/// passes them to the client; the rest of the head does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_fields_named_by_connection_are_dropped_on_both_paths() {
    let up = Scripted::start(
        vec![b"HTTP/1.1 200 OK\r\nConnection: X-Up-Hop\r\nX-Up-Hop: 1\r\nX-Kept: 2\r\nContent-Length: 2\r\n\r\nok"],
        None,
    )
    .await;
    let rig = rig_with(&up).await;
    for extra in EACH_PATH {
        let raw =
            format!("GET /scripted/h HTTP/1.1\r\nHost: gw\r\n{extra}Connection: close\r\n\r\n");
        let a = send(rig.gw.addr(), raw.as_bytes()).await;
        assert_eq!(a.status, 200, "{}", a.head);
        assert!(a.header("x-up-hop").is_none(), "{extra:?}: {}", a.head);
        assert_eq!(a.header("x-kept").as_deref(), Some("2"));
        assert_eq!(a.body, b"ok");
    }
    rig.stop().await;
}
