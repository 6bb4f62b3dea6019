//! The HTTP/1.1 fast path (`src/proxy/fast_path/`) against real servers on loopback: it sends
//! the upstream exactly what pingora-proxy sends for the same request, keeps connections alive
//! both ways, serves pipelined requests in order, survives an upstream that closed a kept-alive
//! connection, and forwards interim, chunked and close-delimited responses.

use crate::common;
use crate::proxy_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use proxy_support::{read_answer, rig_with, send, Rig, Scripted};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `Connection` field lines that send a request down each path: the fast path, then
/// pingora-proxy (a field nominated by `Connection` is one only pingora-proxy removes).
const KEEP_ALIVE_ON_EACH_PATH: [&str; 2] = [
    "Connection: keep-alive\r\n",
    "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\n",
];
/// As [`KEEP_ALIVE_ON_EACH_PATH`], closing after the answer.
const CLOSE_ON_EACH_PATH: [&str; 2] = [
    "Connection: close\r\n",
    "Connection: close, X-Hop\r\nX-Hop: 1\r\n",
];

/// The targets the raw upstream received, in order.
fn targets(requests: &[tokengate_sandbox::RawRequest]) -> Vec<String> {
    requests.iter().map(|r| r.target.clone()).collect()
}

/// The same request sent once plainly (the fast path forwards it) and once with a
/// `Connection`-nominated field (pingora-proxy forwards it): the upstream must see the same
/// bytes, since pingora removes the nominated field and `Connection` itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_and_pingora_send_the_upstream_identical_requests() {
    let rig = Rig::start(|t, _, _| t).await;
    let fields = "host: gw\r\n\
        accept: application/json\r\n\
        authorization: Basic dXNlcjpwYXNz\r\n\
        X-First: one\r\n\
        Cookie: sid=1\r\n\
        x-forwarded-for: 10.9.8.7\r\n\
        X-Forwarded-For: 10.0.0.2\r\n\
        Proxy-Authorization: Basic eA==\r\n\
        x-request-id: trace-7\r\n\
        X-Repeat: a\r\n\
        Keep-Alive: timeout=5\r\n\
        X-Repeat: b\r\n\
        AUTHORIZATION: Bearer client-token\r\n\
        Content-Length: 4\r\n";
    let target = "/drillster/cmp/a%2Fb?access_token=SECRET&x=1";
    let fast = format!("POST {target} HTTP/1.1\r\n{fields}Connection: close\r\n\r\nbody");
    let slow = format!(
        "POST {target} HTTP/1.1\r\n{fields}Connection: close, X-Hop\r\nX-Hop: 1\r\n\r\nbody"
    );

    let a = send(rig.gw.addr(), fast.as_bytes()).await;
    assert_eq!(a.status, 200, "{}", a.head);
    let via_fast = rig.raw.last().expect("fast request reached the upstream");
    let b = send(rig.gw.addr(), slow.as_bytes()).await;
    assert_eq!(b.status, 200, "{}", b.head);
    let via_pingora = rig
        .raw
        .last()
        .expect("pingora request reached the upstream");

    let fast_head = String::from_utf8_lossy(&via_fast.head).into_owned();
    let pingora_head = String::from_utf8_lossy(&via_pingora.head).into_owned();
    assert_eq!(fast_head, pingora_head, "upstream heads differ");
    assert_eq!(via_fast.body_len, 4);
    assert_eq!(via_fast.body_sha256, via_pingora.body_sha256);
    // And that head is the right one (the field rules themselves are tested in forwarding.rs).
    assert!(
        fast_head.starts_with("POST /cmp/a%2Fb?x=1 HTTP/1.1\r\n"),
        "{fast_head}"
    );
    assert_eq!(via_fast.header_values("authorization").len(), 1);
    assert_eq!(via_fast.header_values("x-forwarded-for").len(), 1);
    assert!(via_fast
        .header("authorization")
        .unwrap()
        .starts_with("Bearer "));
    assert_ne!(
        via_fast.header("authorization").unwrap(),
        "Bearer client-token"
    );
    assert_eq!(via_fast.header("x-request-id").as_deref(), Some("trace-7"));
    assert_eq!(
        via_fast.header("x-forwarded-for").as_deref(),
        Some("10.9.8.7, 10.0.0.2, 127.0.0.1")
    );
    for gone in [
        "cookie",
        "proxy-authorization",
        "keep-alive",
        "connection",
        "x-hop",
    ] {
        assert!(
            via_fast.header(gone).is_none(),
            "{gone} forwarded:\n{fast_head}"
        );
    }
    for answer in [&a, &b] {
        assert_eq!(answer.header("x-request-id").as_deref(), Some("trace-7"));
        assert_eq!(answer.header("connection").as_deref(), Some("close"));
        // The upstream's `Keep-Alive: timeout=5` is hop-by-hop: neither path passes it on.
        assert!(answer.header("keep-alive").is_none(), "{}", answer.head);
    }
    rig.stop().await;
}

/// With `X-Forwarded-For` among a route's `strip_headers`, both paths drop the client's and
/// send only the gateway's own (the client's address), in the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripped_x_forwarded_for_is_the_clients_address_only_on_both_paths() {
    let rig = Rig::start(|t, _, _| {
        proxy_support::route_setting(
            &t,
            "drillster",
            "strip_headers = [\"X-Forwarded-For\", \"X-Api-Key\"]",
        )
    })
    .await;
    let mut heads = Vec::new();
    for connection in CLOSE_ON_EACH_PATH {
        let request = format!(
            "GET /drillster/xff HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 6.6.6.6\r\nX-Api-Key: k\r\nx-forwarded-for: 7.7.7.7\r\nX-Request-Id: xff-1\r\n{connection}\r\n"
        );
        let a = send(rig.gw.addr(), request.as_bytes()).await;
        assert_eq!(a.status, 200, "{}", a.head);
        let seen = rig.raw.last().expect("forwarded");
        assert_eq!(
            seen.header_values("x-forwarded-for"),
            ["127.0.0.1"],
            "{connection:?}"
        );
        assert!(seen.header("x-api-key").is_none());
        heads.push(String::from_utf8_lossy(&seen.head).into_owned());
    }
    assert_eq!(heads[0], heads[1], "upstream heads differ");
    rig.stop().await;
}

/// `strip_headers` wins over `forward_cookies` on both paths: a route that forwards cookies but
/// strips `Cookie` sends none, whichever path carries the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripped_cookie_is_not_forwarded_even_with_forward_cookies() {
    let rig = Rig::start(|t, _, _| {
        let t = proxy_support::route_setting(&t, "drillster", "forward_cookies = true");
        proxy_support::route_setting(&t, "drillster", "strip_headers = [\"Cookie\"]")
    })
    .await;
    let mut heads = Vec::new();
    for connection in CLOSE_ON_EACH_PATH {
        let request = format!(
            "GET /drillster/cookie HTTP/1.1\r\nHost: gw\r\nCookie: sid=SECRET\r\nX-Request-Id: c-1\r\n{connection}\r\n"
        );
        let a = send(rig.gw.addr(), request.as_bytes()).await;
        assert_eq!(a.status, 200, "{}", a.head);
        let seen = rig.raw.last().expect("forwarded");
        assert!(seen.header("cookie").is_none(), "{connection:?}");
        heads.push(String::from_utf8_lossy(&seen.head).into_owned());
    }
    assert_eq!(heads[0], heads[1], "upstream heads differ");
    rig.stop().await;
}

/// Three requests on one client connection: one upstream connection carries all three, each
/// with its own token field and request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_both_ways() {
    let rig = Rig::start(|t, _, _| t).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    let mut buf = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let req = format!("GET /drillster/ka/{i} HTTP/1.1\r\nHost: gw\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let a = read_answer(&mut s, &mut buf).await;
        assert_eq!(a.status, 200, "{}", a.head);
        assert_eq!(a.header("connection").as_deref(), Some("keep-alive"));
        ids.push(a.header("x-request-id").expect("request id"));
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "request ids repeat: {ids:?}");
    let seen = rig.raw.requests();
    let targets: Vec<&str> = seen.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/ka/0", "/ka/1", "/ka/2"]);
    for r in &seen {
        assert_eq!(r.header_values("authorization").len(), 1);
    }
    assert_eq!(
        rig.raw.connection_count(),
        1,
        "upstream connection not reused"
    );
    rig.stop().await;
}

/// Two requests in one write: both answered, in order (RFC 9112 §9.3.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let rig = Rig::start(|t, _, _| t).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(
        b"POST /drillster/p/1 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: first\r\nContent-Length: 3\r\n\r\none\
          GET /drillster/p/2 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: second\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let first = read_answer(&mut s, &mut buf).await;
    let second = read_answer(&mut s, &mut buf).await;
    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(first.header("x-request-id").as_deref(), Some("first"));
    assert_eq!(second.header("x-request-id").as_deref(), Some("second"));
    let seen = rig.raw.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[0].target.as_str(), seen[0].body_len), ("/p/1", 3));
    assert_eq!(seen[1].target, "/p/2");
    rig.stop().await;
}

/// The upstream closes each connection shortly after answering, without `Connection: close`.
/// The next request on the client's connection must not fail: a GET right after the close is
/// retried on a new connection, a GET after a pause and a POST find the held connection closed
/// before using it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_close_between_requests_is_not_the_clients_problem() {
    let up = Scripted::start(
        vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
        Some(Duration::from_millis(10)),
    )
    .await;
    let rig = rig_with(&up).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    let mut buf = Vec::new();
    let steps: [(&str, u64); 5] = [
        ("GET", 0),
        ("GET", 60),  // closed, not checked: the failure is retried
        ("GET", 400), // checked before use
        ("POST", 60), // a POST always checks
        ("POST", 400),
    ];
    for (i, (method, pause)) in steps.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(*pause)).await;
        let req =
            format!("{method} /scripted/s/{i} HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\n\r\nx");
        s.write_all(req.as_bytes()).await.unwrap();
        let a = read_answer(&mut s, &mut buf).await;
        assert_eq!(
            a.status, 200,
            "step {i} ({method} after {pause} ms): {}",
            a.head
        );
        assert_eq!(a.body, b"ok");
    }
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        5,
        "a request was sent twice"
    );
    assert_eq!(up.connections.load(Ordering::SeqCst), 5);
    rig.stop().await;
}

/// 103 Early Hints is passed on before the final response; a response delimited by the close of
/// the upstream connection arrives whole and the client's connection is closed after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_and_close_delimited_responses() {
    let up = Scripted::start(
        vec![
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
               HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        ],
        Some(Duration::ZERO),
    )
    .await;
    let rig = rig_with(&up).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(b"GET /scripted/e HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let hints = read_answer(&mut s, &mut buf).await;
    assert_eq!(hints.status, 103, "{}", hints.head);
    assert_eq!(
        hints.header("link").as_deref(),
        Some("</a.css>; rel=preload")
    );
    let last = read_answer(&mut s, &mut buf).await;
    assert_eq!(last.status, 200, "{}", last.head);
    assert_eq!(last.body, b"until the end");
    assert_eq!(last.header("connection").as_deref(), Some("close"));
    rig.stop().await;
}

/// A chunked response with a trailer is forwarded as sent, and the connection carries the next
/// request (the end of the body was found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_responses_end_where_the_upstream_ends_them() {
    const BODY: &[u8] = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n";
    let up = Scripted::start(
        vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"],
        None,
    )
    .await;
    let rig = rig_with(&up).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    for i in 0..2 {
        s.write_all(format!("GET /scripted/c/{i} HTTP/1.1\r\nHost: gw\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let body_start = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&chunk[..n]);
                if let Some(h) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    if got.len() >= h + 4 + BODY.len() {
                        return h + 4;
                    }
                }
            }
        })
        .await
        .expect("a whole response");
        let head = String::from_utf8_lossy(&got[..body_start]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(head.contains("connection: keep-alive"), "{head}");
        assert_eq!(&got[body_start..], BODY, "request {i}");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    rig.stop().await;
}

/// A client that goes idle hands its upstream connection back to the pool: the next client's
/// request reuses it instead of opening another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_clients_upstream_connection_returns_to_the_pool() {
    let rig = Rig::start(|t, _, _| t).await;
    let mut first = TcpStream::connect(rig.gw.addr()).await.unwrap();
    first
        .write_all(b"GET /drillster/idle/1 HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let a = read_answer(&mut first, &mut Vec::new()).await;
    assert_eq!(a.status, 200, "{}", a.head);
    // Past the 2 s hold while idle; `first` stays open.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let b = send(
        rig.gw.addr(),
        b"GET /drillster/idle/2 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(b.status, 200, "{}", b.head);
    assert_eq!(rig.raw.request_count(), 2);
    assert_eq!(
        rig.raw.connection_count(),
        1,
        "the pooled connection was not reused"
    );
    drop(first);
    rig.stop().await;
}

/// A request pingora-proxy handles (a chunked upload) does not keep the connection off the fast
/// path: the requests after it are served by the fast path again, which answers pipelined
/// requests (pingora-proxy answers the first of them and closes the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_comes_back_to_the_fast_path_after_a_request_for_pingora() {
    let rig = Rig::start(|t, _, _| t).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(
        b"POST /drillster/chunked HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let a = read_answer(&mut s, &mut buf).await;
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(rig.raw.last().unwrap().body_len, 3);
    s.write_all(
        b"GET /drillster/after/1 HTTP/1.1\r\nHost: gw\r\n\r\n\
          GET /drillster/after/2 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let first = read_answer(&mut s, &mut buf).await;
    let second = read_answer(&mut s, &mut buf).await;
    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(
        targets(&rig.raw.requests()),
        ["/chunked", "/after/1", "/after/2"]
    );
    rig.stop().await;
}

/// Requests pingora refuses are refused on the fast path too, not forwarded: a `Host` with
/// userinfo, and a target longer than `http` accepts (65,534 bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pingora_refuses_are_not_forwarded() {
    let rig = Rig::start(|t, _, _| t).await;
    let long = format!("/drillster/{}", "a".repeat(65_535));
    let mut requests = vec![
        "GET /drillster/x HTTP/1.1\r\nHost: user@gw\r\nConnection: close\r\n\r\n".to_string(),
        format!("GET {long} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"),
    ];
    // Invalid Host values (RFC 9112 §3.2: 400), on the fast path and, with a field that sends
    // the request to pingora-proxy (`Expect`), on the other path.
    for host in [
        "ho st",
        "host:80:80",
        "[::1",
        "http://gw",
        "a%zz",
        "host:8a",
        "h\u{e9}st",
    ] {
        for extra in ["", "Expect: 100-continue\r\n"] {
            requests.push(format!(
                "GET /drillster/x HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
            ));
        }
    }
    for request in requests {
        let a = send(rig.gw.addr(), request.as_bytes()).await;
        assert_eq!(a.status, 400, "{}", a.head);
    }
    assert!(rig.raw.requests().is_empty(), "forwarded a refused request");
    rig.stop().await;
}

/// One kept-alive client connection across a token renewal: the request right after the
/// renewal carries the new token, while the old one would still be usable (each connection
/// keeps a copy of the token and must notice the swap, not wait for the old one to expire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_carries_the_renewed_token_at_once() {
    // 6-second tokens renewed at 27-30 % of their life, usable until 65 % (a 2.1 s margin).
    let rig = rig_with_renewing_tokens(Duration::from_secs(6)).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    let mut buf = Vec::new();
    let ask = |i: u32| {
        let req = format!("GET /drillster/renewal/{i} HTTP/1.1\r\nHost: gw\r\n\r\n");
        req.into_bytes()
    };
    s.write_all(&ask(0)).await.unwrap();
    let a = read_answer(&mut s, &mut buf).await;
    assert_eq!(a.status, 200, "{}", a.head);
    let first = rig.raw.last().unwrap().header("authorization").unwrap();
    // Wait for the renewal: the gateway publishes a new token.
    let token = &rig.gw.handle.state().routes[0].token;
    let generation = token.current().unwrap().generation;
    common::eventually(Duration::from_secs(10), "the renewal", || async {
        token.current().is_some_and(|t| t.generation > generation)
    })
    .await;
    s.write_all(&ask(1)).await.unwrap();
    let b = read_answer(&mut s, &mut buf).await;
    assert_eq!(b.status, 200, "{}", b.head);
    assert_eq!(b.header("connection").as_deref(), Some("keep-alive"));
    let second = rig.raw.last().unwrap().header("authorization").unwrap();
    assert_ne!(first, second, "the renewed token was not used");
    // And it is the token the gateway holds now.
    let current = rig.gw.handle.state().routes[0].token.current().unwrap();
    assert_eq!(current.authorization().to_str().ok(), Some(second.as_str()));
    rig.stop().await;
}

/// A request whose body arrives slowly leaves with the token current when it is sent, not the
/// one current when its head arrived (that one may be replaced or expired by then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_leaves_with_the_token_current_when_it_is_sent() {
    // 4-second tokens renewed at 27-30 % of their life, usable until 65 %.
    let rig = rig_with_renewing_tokens(Duration::from_secs(4)).await;
    let held = rig.gw.handle.state().routes[0].token.current().unwrap();
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(b"POST /drillster/slow-body HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\n")
        .await
        .unwrap();
    // Past the token's usable time: renewals happen meanwhile.
    common::eventually(
        Duration::from_secs(20),
        "the held token past its use",
        || async { !held.is_usable(tokio::time::Instant::now()) },
    )
    .await;
    s.write_all(b"abc").await.unwrap();
    let mut buf = Vec::new();
    let a = read_answer(&mut s, &mut buf).await;
    assert_eq!(a.status, 200, "{}", a.head);
    let sent: Vec<_> = rig
        .raw
        .requests()
        .into_iter()
        .filter(|r| r.target.ends_with("/slow-body"))
        .collect();
    assert_eq!(
        sent.len(),
        1,
        "sent upstream more than once (a 401 replay?)"
    );
    assert_ne!(
        sent[0].header("authorization").as_deref(),
        held.authorization().to_str().ok(),
        "the token current when the head arrived was sent"
    );
    rig.stop().await;
}

/// A rig whose `drillster` route gets tokens of `lifetime` from the sandbox and renews them at
/// 27-30 % of it (`refresh_ratio = 0.3`), so renewals come while the old token is usable.
async fn rig_with_renewing_tokens(lifetime: Duration) -> Rig {
    let sandbox = tokengate_sandbox::Sandbox::builder()
        .token_lifetime(lifetime)
        .start()
        .await
        .expect("sandbox");
    let raw = tokengate_sandbox::RawApi::start(sandbox.registry.clone())
        .await
        .expect("raw api");
    Rig::start_with(sandbox, raw, |t, _, _| {
        t.replace(
            "grant = \"jwt_bearer\"\n",
            "grant = \"jwt_bearer\"\nrefresh_ratio = 0.3\n",
        )
    })
    .await
}

/// `Content-Length` as a list of one number (`4, 4`) or as repeated fields, in requests and in
/// responses, on both paths: one `Content-Length` leaves the gateway each way (RFC 9110 §8.6),
/// the body is framed by it, and numbers that differ are refused, never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_lists_and_repeats_leave_as_one_field() {
    // Requests. The list goes to pingora-proxy (the fast path takes only digits); the repeated
    // field stays on the fast path, and with a `Connection`-nominated field goes to pingora.
    let rig = Rig::start(|t, _, _| t).await;
    let [fast, via_pingora] = CLOSE_ON_EACH_PATH;
    for (lengths, extra) in [
        ("Content-Length: 4, 4\r\n", fast),
        ("Content-Length: 4\r\ncontent-length: 4\r\n", fast),
        ("Content-Length: 4\r\ncontent-length: 4\r\n", via_pingora),
    ] {
        let request =
            format!("POST /drillster/cl HTTP/1.1\r\nHost: gw\r\n{lengths}{extra}\r\nbody");
        let a = send(rig.gw.addr(), request.as_bytes()).await;
        assert_eq!(a.status, 200, "{lengths:?}: {}", a.head);
        let seen = rig.raw.last().expect("forwarded");
        assert_eq!(seen.header_values("content-length"), ["4"], "{lengths:?}");
        assert_eq!(seen.body_len, 4);
    }
    let forwarded = rig.raw.requests().len();
    for lengths in [
        "Content-Length: 4, 5\r\n",
        "Content-Length: 4\r\nContent-Length: 5\r\n",
        "Content-Length: 4\r\nContent-Length: 4, 5\r\n",
    ] {
        let request = format!(
            "POST /drillster/cl HTTP/1.1\r\nHost: gw\r\n{lengths}Connection: close\r\n\r\nbody!"
        );
        let a = send(rig.gw.addr(), request.as_bytes()).await;
        assert_eq!(a.status, 400, "{lengths:?}: {}", a.head);
    }
    assert_eq!(
        rig.raw.requests().len(),
        forwarded,
        "a conflicting length was forwarded"
    );
    rig.stop().await;

    // Responses, each followed by a second request on the same connection: the body ended
    // where the one length said.
    let up = Scripted::start(
        vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: a\r\ncontent-length: 2\r\n\r\nok",
        ],
        None,
    )
    .await;
    let rig = rig_with(&up).await;
    for extra in KEEP_ALIVE_ON_EACH_PATH {
        let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
        let mut buf = Vec::new();
        for i in 0..4 {
            let request = format!("GET /scripted/cl/{i} HTTP/1.1\r\nHost: gw\r\n{extra}\r\n");
            s.write_all(request.as_bytes()).await.unwrap();
            let a = read_answer(&mut s, &mut buf).await;
            assert_eq!(a.status, 200, "{extra:?} #{i}: {}", a.head);
            assert_eq!(a.body, b"ok");
            let lengths = a
                .head
                .to_ascii_lowercase()
                .matches("content-length:")
                .count();
            assert_eq!(lengths, 1, "{extra:?} #{i}: {}", a.head);
            assert_eq!(
                a.header("content-length").as_deref(),
                Some("2"),
                "{}",
                a.head
            );
        }
    }
    rig.stop().await;
}

/// Requests pipelined behind one that pingora-proxy serves, in the same write, are answered in
/// order (RFC 9112 §9.3.2): pingora-proxy gets only its request's bytes, the fast path keeps the
/// rest. Requests for pingora here: a `Connection`-nominated field, a `Content-Length` list, a
/// body over the 64 KiB the fast path buffers for a 401 replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pipelined_behind_one_for_pingora_are_all_answered() {
    let rig = Rig::start(|t, _, _| t).await;
    let big = vec![b'x'; 100 * 1024];
    let mut write = Vec::new();
    write.extend_from_slice(
        b"POST /drillster/p/1 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: r1\r\n\
          Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nContent-Length: 3\r\n\r\none\
          GET /drillster/p/2 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: r2\r\n\r\n\
          POST /drillster/p/3 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: r3\r\nContent-Length: 4, 4\r\n\r\nfour",
    );
    write.extend_from_slice(
        format!(
            "POST /drillster/p/4 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: r4\r\nContent-Length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    );
    write.extend_from_slice(&big);
    write.extend_from_slice(
        b"GET /drillster/p/5 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: r5\r\nConnection: close\r\n\r\n",
    );
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(&write).await.unwrap();
    let mut buf = Vec::new();
    for i in 1..=5 {
        let a = read_answer(&mut s, &mut buf).await;
        assert_eq!(a.status, 200, "#{i}: {}", a.head);
        let id = format!("r{i}");
        assert_eq!(a.header("x-request-id"), Some(id), "{}", a.head);
    }
    let seen: Vec<(String, u64)> = rig
        .raw
        .requests()
        .iter()
        .map(|r| (r.target.clone(), r.body_len))
        .collect();
    let want: Vec<(String, u64)> = [3, 0, 4, big.len() as u64, 0]
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("/p/{}", i + 1), *n))
        .collect();
    assert_eq!(seen, want);

    // A chunked upload with a request behind it in the same write, and one more arriving while
    // pingora-proxy waits for a slow upstream (pingora's default answered that with 400).
    rig.raw.faults().set_latency(Duration::from_millis(300));
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(
        b"POST /drillster/q/1 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: q1\r\n\
          Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /drillster/q/2 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: q2\r\n\r\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(
        b"GET /drillster/q/3 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: q3\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    for i in 1..=3 {
        let a = read_answer(&mut s, &mut buf).await;
        assert_eq!(a.status, 200, "q{i}: {}", a.head);
        assert_eq!(
            a.header("x-request-id"),
            Some(format!("q{i}")),
            "{}",
            a.head
        );
    }
    assert_eq!(targets(&rig.raw.requests()[5..]), ["/q/1", "/q/2", "/q/3"]);
    rig.stop().await;
}

/// A chunked response with an invalid or conflicting `Content-Length` beside its
/// `Transfer-Encoding`: `Transfer-Encoding` decides and the length is dropped, on both paths
/// (RFC 9112 §6.3), where the fast path used to answer 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_overrides_any_content_length_on_both_paths() {
    let up = Scripted::start(
        vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ],
        None,
    )
    .await;
    let rig = rig_with(&up).await;
    for connection in CLOSE_ON_EACH_PATH {
        for i in 0..2 {
            // The reader takes a response without a length to the connection's close.
            let request = format!("GET /scripted/te/{i} HTTP/1.1\r\nHost: gw\r\n{connection}\r\n");
            let a = send(rig.gw.addr(), request.as_bytes()).await;
            assert_eq!(a.status, 200, "{connection:?} #{i}: {}", a.head);
            assert_eq!(a.body, b"ok", "{connection:?} #{i}");
            assert!(a.header("content-length").is_none(), "{}", a.head);
        }
    }
    rig.stop().await;
}

/// An interim response gets the same treatment on both paths: the upstream's `Keep-Alive` is
/// dropped (hop-by-hop) and `X-Request-Id` is the request's, replacing the upstream's or added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_carry_the_request_id_and_no_keep_alive_on_both_paths() {
    let up = Scripted::start(
        vec![
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nKeep-Alive: timeout=5\r\n\
              X-Request-Id: theirs\r\nX-Request-Id: again\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 103 Early Hints\r\nLink: </b.css>; rel=preload\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ],
        None,
    )
    .await;
    let rig = rig_with(&up).await;
    for extra in KEEP_ALIVE_ON_EACH_PATH {
        let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
        let mut buf = Vec::new();
        for link in ["</a.css>; rel=preload", "</b.css>; rel=preload"] {
            let request = format!(
                "GET /scripted/h HTTP/1.1\r\nHost: gw\r\nX-Request-Id: mine\r\n{extra}\r\n"
            );
            s.write_all(request.as_bytes()).await.unwrap();
            let hints = read_answer(&mut s, &mut buf).await;
            assert_eq!(hints.status, 103, "{extra:?}: {}", hints.head);
            assert_eq!(hints.header("link").as_deref(), Some(link));
            assert!(
                hints.header("keep-alive").is_none(),
                "{extra:?}: {}",
                hints.head
            );
            let ids = hints
                .head
                .to_ascii_lowercase()
                .matches("x-request-id:")
                .count();
            assert_eq!(ids, 1, "{extra:?}: {}", hints.head);
            assert_eq!(hints.header("x-request-id").as_deref(), Some("mine"));
            let last = read_answer(&mut s, &mut buf).await;
            assert_eq!((last.status, last.body.as_slice()), (200, &b"ok"[..]));
            assert_eq!(last.header("x-request-id").as_deref(), Some("mine"));
        }
    }
    rig.stop().await;
}

/// An HTTP/1.0 upstream's response goes to the client as the gateway's HTTP/1.1 (RFC 9110
/// §6.2: an intermediary sends its own version) on both paths, with a length or without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_upstream_is_answered_for_in_http_1_1_on_both_paths() {
    let up = Scripted::start(
        vec![
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\n\r\nok",
        ],
        Some(Duration::ZERO),
    )
    .await;
    let rig = rig_with(&up).await;
    for connection in CLOSE_ON_EACH_PATH {
        for i in 0..2 {
            let request = format!("GET /scripted/v/{i} HTTP/1.1\r\nHost: gw\r\n{connection}\r\n");
            let a = send(rig.gw.addr(), request.as_bytes()).await;
            assert!(
                a.head.starts_with("HTTP/1.1 200 "),
                "{connection:?} #{i}: {}",
                a.head
            );
            assert_eq!(a.body, b"ok", "{connection:?} #{i}");
        }
    }
    rig.stop().await;
}

/// A gateway error answering HEAD on the fast path (here a 502 for conflicting lengths) has no
/// body (RFC 9110 §9.3.2): the next bytes on the connection would be read as a response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_error_to_head_has_no_body() {
    let up = Scripted::start(
        vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello"],
        None,
    )
    .await;
    let rig = rig_with(&up).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(b"HEAD /scripted/broken HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("closed within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 502 "), "{text}");
    assert!(
        text.ends_with("\r\n\r\n"),
        "a body followed the head: {text}"
    );
    rig.stop().await;
}

/// An HTTP/1.0 client (always pingora-proxy's path) gets no 1xx and no chunked framing (RFC
/// 9110 §15.2, RFC 9112 §6.1): an upstream's 103 is dropped and a body of unknown length is
/// sent as it comes, ended by the close, even when the client asked to keep the connection.
/// An HTTP/1.1 client of the same upstream still gets both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_gets_no_1xx_and_no_chunked_body() {
    let up = Scripted::start(
        vec![b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n"],
        None,
    )
    .await;
    let rig = rig_with(&up).await;
    for connection in ["", "Connection: keep-alive\r\n"] {
        let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
        let request = format!("GET /scripted/old HTTP/1.0\r\nHost: gw\r\n{connection}\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("the gateway closes the connection to end the body")
            .unwrap();
        let text = String::from_utf8_lossy(&raw).to_string();
        assert!(text.starts_with("HTTP/1.1 200 "), "{connection:?}: {text}");
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let head = head.to_ascii_lowercase();
        assert!(
            !head.contains("transfer-encoding"),
            "{connection:?}: {text}"
        );
        assert!(head.contains("connection: close"), "{connection:?}: {text}");
        assert_eq!(body, "ok!!!", "{connection:?}");
    }
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(b"GET /scripted/new HTTP/1.1\r\nHost: gw\r\nConnection: x-legacy, close\r\nX-Legacy: 1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let hints = read_answer(&mut s, &mut buf).await;
    assert_eq!(hints.status, 103);
    let last = read_answer(&mut s, &mut buf).await;
    assert_eq!(last.status, 200);
    assert_eq!(last.header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(last.body, b"ok!!!");
    rig.stop().await;
}

/// A response whose transfer codings are more than `chunked` (`gzip, chunked`) cannot reach an
/// HTTP/1.0 client as it came (RFC 9112 §6.1: no Transfer-Encoding to it) and the gateway does
/// not decode gzip: the client gets the gateway's 502, counted as an upstream error, instead of
/// chunked framing it cannot read or a compressed body without a label. An HTTP/1.1 client of
/// the same upstream gets the response with its codings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_gets_a_502_for_a_coding_besides_chunked() {
    let up = Scripted::start(
        vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\ngz!\r\n0\r\n\r\n"],
        None,
    )
    .await;
    let rig = rig_with(&up).await;
    // Read to the close: the gateway ends the connection after its answer.
    let answer = common::raw_request(
        rig.gw.addr(),
        b"GET /scripted/old HTTP/1.0\r\nHost: gw\r\n\r\n",
    )
    .await;
    assert!(answer.head.starts_with("HTTP/1.1 502 "), "{}", answer.head);
    assert_eq!(
        answer.header("tokengate-error").as_deref(),
        Some("upstream_unreachable")
    );
    assert_eq!(answer.header("transfer-encoding"), None, "{}", answer.head);
    assert_eq!(answer.json()["error"], "upstream_unreachable");
    assert!(!String::from_utf8_lossy(&answer.body).contains("gz!"));
    let metrics = rig.gw.metrics().await;
    assert!(
        metrics.contains("tokengate_upstream_errors_total{kind=\"reset\",route=\"scripted\"} 1"),
        "{metrics}"
    );

    let answer = send(
        rig.gw.addr(),
        b"GET /scripted/new HTTP/1.1\r\nHost: gw\r\nConnection: x-legacy, close\r\nX-Legacy: 1\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("transfer-encoding").as_deref(),
        Some("gzip, chunked")
    );
    assert_eq!(answer.body, b"gz!");
    rig.stop().await;
}
