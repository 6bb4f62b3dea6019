//! Exact forwarding through the gateway to the byte-exact sandbox upstream: paths and queries
//! byte for byte, hop-by-hop fields removed, one `Authorization`, small bodies whole, redirects
//! passed back, no open proxy, 405, malformed requests.

use crate::proxy_support;

use proxy_support::{client_credentials_route, route_setting, send, Rig, Tripwire};
use tokengate_sandbox::CannedResponse;

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_and_queries_arrive_byte_for_byte() {
    let rig = Rig::start(|t, sandbox, raw| {
        let api = client_credentials_route(
            sandbox,
            "api",
            "/api",
            &format!("{}/v1/", raw.base_url()),
            "",
        );
        format!("{t}{api}")
    })
    .await;
    let cases: &[(&str, &str)] = &[
        ("/drillster/a%2Fb/c", "/a%2Fb/c"),
        ("/drillster/a//b", "/a//b"),
        ("/drillster/q%20r", "/q%20r"),
        ("/drillster/x%252F", "/x%252F"),
        (
            "/drillster/@scope%2Fname?k=a%2Fb&z",
            "/@scope%2Fname?k=a%2Fb&z",
        ),
        ("/drillster/p?a=%2F&b=%zz&c=+%20", "/p?a=%2F&b=%zz&c=+%20"),
        (
            "/drillster/t?access_token=SECRET1&k=a%2Fb&z",
            "/t?k=a%2Fb&z",
        ),
        (
            "/drillster/t?k=a%2Fb&access_token=SECRET2&z",
            "/t?k=a%2Fb&z",
        ),
        (
            "/drillster/t?k=a%2Fb&z&access_token=SECRET3",
            "/t?k=a%2Fb&z",
        ),
        ("/drillster/t?access_token=SECRET4", "/t"),
        ("/drillster/a%2F..%2Fb?x=%41", "/a%2F..%2Fb?x=%41"),
        ("/api/users", "/v1/users"),
        ("/api", "/v1/"),
        ("/api/a//b", "/v1/a//b"),
        ("/api/a%2Fb?access_token=S5&q=%2F", "/v1/a%2Fb?q=%2F"),
    ];
    for (sent, expected) in cases {
        let r = send(rig.gw.addr(), &get(sent)).await;
        assert_eq!(r.status, 200, "{sent}: {}", r.head);
        let seen = rig.raw.last().expect("request reached the upstream");
        assert_eq!(seen.target, *expected, "sent {sent}");
        let head = String::from_utf8_lossy(&seen.head);
        assert!(
            head.starts_with(&format!("GET {expected} HTTP/1.1\r\n")),
            "request line on the wire: {head}"
        );
        assert!(
            !head.contains("SECRET"),
            "access_token leaked upstream: {head}"
        );
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_fields_removed_order_and_repeats_kept() {
    let rig = Rig::start(|t, _, _| t).await;
    let request = b"GET /drillster/h HTTP/1.1\r\n\
        Host: gw\r\n\
        Accept: application/json\r\n\
        Connection: keep-alive, X-Hop\r\n\
        X-Hop: 1\r\n\
        X-First: one\r\n\
        Keep-Alive: timeout=5\r\n\
        X-Repeat: a\r\n\
        X-Repeat: b\r\n\
        Proxy-Connection: keep-alive\r\n\
        TE: gzip\r\n\
        Upgrade: h2c\r\n\
        X-Last: z\r\n\
        \r\n";
    let r = send(rig.gw.addr(), request).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = rig.raw.last().unwrap();
    let names = seen.header_names();
    for hop in [
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        // A `Connection` pingora adds for its own upstream connection management would carry only
        // its own tokens; the client's must not arrive.
        let values = seen.header_values(hop);
        assert!(
            values
                .iter()
                .all(|v| !v.to_ascii_lowercase().contains("x-hop")
                    && v != "1"
                    && v != "h2c"
                    && v != "gzip"
                    && !v.contains("timeout")),
            "{hop} reached the upstream: {values:?}\n{}",
            String::from_utf8_lossy(&seen.head)
        );
        if hop != "connection" {
            assert!(
                !names.contains(&hop.to_string()),
                "{hop} reached the upstream: {names:?}"
            );
        }
    }
    let ordinary: Vec<&String> = names
        .iter()
        .filter(|n| ["accept", "x-first", "x-repeat", "x-last"].contains(&n.as_str()))
        .collect();
    assert_eq!(
        ordinary,
        ["accept", "x-first", "x-repeat", "x-repeat", "x-last"],
        "order: {names:?}"
    );
    assert_eq!(seen.header_values("x-repeat"), ["a", "b"]);
    // Names keep the client's spelling.
    assert!(
        seen.headers.iter().any(|(n, _)| n == "X-First"),
        "{:?}",
        seen.headers
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_gateway_authorization_whatever_the_client_sends() {
    let rig = Rig::start(|t, _, _| t).await;
    let variants: &[&str] = &[
        "Authorization: Basic bGVnYWN5OnBhc3N3b3Jk\r\nAuthorization: Bearer client-token\r\n",
        "authorization: Bearer lower-case\r\n",
        "AUTHORIZATION: Bearer a, Bearer b\r\n",
        "Authorization: Bearer a, Bearer b\r\nProxy-Authorization: Basic eDp5\r\nCookie: s=1\r\n",
    ];
    for v in variants {
        let req =
            format!("GET /drillster/auth HTTP/1.1\r\nHost: gw\r\n{v}Connection: close\r\n\r\n");
        let r = send(rig.gw.addr(), req.as_bytes()).await;
        assert_eq!(r.status, 200, "{v}: {}", r.head);
        let seen = rig.raw.last().unwrap();
        let auth = seen.header_values("authorization");
        assert_eq!(auth.len(), 1, "{v}: {auth:?}");
        let token = auth[0].strip_prefix("Bearer ").expect("spelled `Bearer `");
        assert!(
            rig.sandbox.registry.validate(token).is_ok(),
            "a gateway-issued token"
        );
        assert!(seen.subject.is_some(), "upstream accepted it");
        for gone in ["proxy-authorization", "cookie"] {
            assert!(seen.header(gone).is_none(), "{gone} forwarded");
        }
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_put_arrives_whole_and_empty_post_keeps_content_length_zero() {
    use sha2::{Digest, Sha256};
    let rig = Rig::start(|t, _, _| t).await;
    let body: Vec<u8> = (0..200 * 1024u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut req = b"PUT /drillster/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for piece in body.chunks(10_000) {
        req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = send(rig.gw.addr(), &req).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = rig.raw.last().unwrap();
    assert_eq!(seen.body_len, body.len() as u64);
    let sha: String = Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(seen.body_sha256, sha);

    let r = send(
        rig.gw.addr(),
        b"POST /drillster/empty HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = rig.raw.last().unwrap();
    assert_eq!(seen.header_values("content-length"), ["0"]);
    assert!(seen.header("transfer-encoding").is_none());
    assert_eq!(seen.body_len, 0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_returned_never_followed() {
    let rig = Rig::start(|t, _, _| t).await;
    let elsewhere = Tripwire::start().await;
    let cases = [
        (302u16, "https://other.example/login?next=%2Fx".to_string()),
        (307, format!("http://{}/plain", elsewhere.addr)),
    ];
    for (status, location) in cases {
        let before = rig.raw.request_count();
        rig.raw.faults().respond_with_next(
            1,
            CannedResponse::new(http::StatusCode::from_u16(status).unwrap())
                .header("location", &location)
                .body("moved"),
        );
        let r = send(rig.gw.addr(), &get("/drillster/r")).await;
        assert_eq!(r.status, status, "{}", r.head);
        assert_eq!(r.header("location").as_deref(), Some(location.as_str()));
        assert_eq!(r.body, b"moved");
        assert_eq!(
            rig.raw.request_count(),
            before + 1,
            "one request upstream, no follow-up"
        );
    }
    assert_eq!(
        elsewhere.hits(),
        0,
        "the redirect target was never contacted"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_open_proxy() {
    let rig = Rig::start(|t, _, _| t).await;
    let elsewhere = Tripwire::start().await;
    let e = elsewhere.addr;
    let raw_addr = rig.raw.addr();

    // Absolute-form to a foreign host: routed by path, sent in origin-form to the upstream.
    let r = send(
        rig.gw.addr(),
        format!(
            "GET http://{e}/drillster/abs?x=1 HTTP/1.1\r\nHost: {e}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = rig.raw.last().unwrap();
    assert_eq!(seen.target, "/abs?x=1");
    assert_eq!(
        seen.header("host").as_deref(),
        Some(raw_addr.to_string().as_str())
    );

    // An absolute-form request for a foreign host's `/`: nothing routes `/` (404), nothing is
    // contacted.
    let before = rig.raw.request_count();
    let r = send(
        rig.gw.addr(),
        b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.head);
    assert_eq!(r.header("tokengate-error").as_deref(), Some("no_route"));

    // A foreign Host header: the configured upstream gets the request, with its own Host.
    let r = send(
        rig.gw.addr(),
        format!("GET /drillster/h HTTP/1.1\r\nHost: {e}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = rig.raw.last().unwrap();
    assert_eq!(
        seen.header("host").as_deref(),
        Some(raw_addr.to_string().as_str())
    );
    assert_eq!(rig.raw.request_count(), before + 1);

    // CONNECT, in authority-form and with a routed path-looking target.
    for target in [e.to_string(), "elsewhere.example:443".into()] {
        let r = send(
            rig.gw.addr(),
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(
            (400..500).contains(&r.status),
            "CONNECT {target}: {}",
            r.head
        );
    }
    assert_eq!(
        rig.raw.request_count(),
        before + 1,
        "CONNECT never forwarded"
    );
    assert_eq!(elsewhere.hits(), 0, "a foreign host was contacted");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_outside_allow_methods_is_405_with_allow() {
    let rig =
        Rig::start(|t, _, _| route_setting(&t, "drillster", "allow_methods = [\"GET\"]")).await;
    let before = rig.raw.request_count();
    let r = send(
        rig.gw.addr(),
        b"POST /drillster/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert_eq!(r.status, 405, "{}", r.head);
    assert_eq!(r.header("allow").as_deref(), Some("GET"));
    assert_eq!(
        r.header("tokengate-error").as_deref(),
        Some("method_not_allowed")
    );
    assert_eq!(r.json()["error"], "method_not_allowed");
    assert_eq!(rig.raw.request_count(), before);
    let r = send(rig.gw.addr(), &get("/drillster/x")).await;
    assert_eq!(r.status, 200);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_never_forwarded() {
    let rig = Rig::start(|t, _, _| t).await;
    let big = format!("X-Big: {}\r\n", "a".repeat(8 * 1024)).repeat(160);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "CL and TE",
            b"POST /drillster/m HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "TE and CL",
            b"POST /drillster/m HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\ncontent-length: 4\r\n\r\n4\r\nabcd\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "two Content-Length",
            b"POST /drillster/m HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".to_vec(),
        ),
        (
            "Content-Length list",
            b"POST /drillster/m HTTP/1.1\r\nHost: gw\r\nContent-Length: 4, 5\r\n\r\nabcde".to_vec(),
        ),
        (
            "raw CR in a value",
            b"GET /drillster/m HTTP/1.1\r\nHost: gw\r\nX-Evil: a\rb\r\n\r\n".to_vec(),
        ),
        (
            "raw CR in a name",
            b"GET /drillster/m HTTP/1.1\r\nHost: gw\r\nX-E\rvil: a\r\n\r\n".to_vec(),
        ),
        (
            "HTTP/1.1 without Host",
            b"GET /drillster/m HTTP/1.1\r\nAccept: */*\r\n\r\n".to_vec(),
        ),
        (
            "oversized header block",
            format!("GET /drillster/m HTTP/1.1\r\nHost: gw\r\n{big}\r\n").into_bytes(),
        ),
    ];
    for (what, req) in cases {
        let before = rig.raw.request_count();
        let r = send(rig.gw.addr(), &req).await;
        assert!((400..500).contains(&r.status), "{what}: {}", r.head);
        assert_eq!(rig.raw.request_count(), before, "{what} was forwarded");
    }
    // The gateway still works.
    let r = send(rig.gw.addr(), &get("/drillster/ok")).await;
    assert_eq!(r.status, 200);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_chunked_get_501_and_are_never_forwarded() {
    let rig = Rig::start(|t, _, _| t).await;
    for te in [
        "gzip, chunked",
        "gzip\r\nTransfer-Encoding: chunked",
        "chunked, chunked",
    ] {
        let req = format!(
            "POST /drillster/te HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let before = rig.raw.request_count();
        let r = send(rig.gw.addr(), req.as_bytes()).await;
        assert_eq!(r.status, 501, "{te}: {}", r.head);
        assert_eq!(rig.raw.request_count(), before, "{te} was forwarded");
    }
    // Plain chunked (any case) still goes through whole.
    let r = send(
        rig.gw.addr(),
        b"POST /drillster/te HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(rig.raw.last().unwrap().body_len, 5);
    rig.stop().await;
}
