//! The client allowlist: with `allowed_clients = ["127.0.0.1/32"]` a client on 127.0.0.2 gets
//! 403 `client_not_allowed`, even claiming `X-Forwarded-For: 127.0.0.1`; nothing reaches the
//! upstream and no token is fetched for it.

use crate::proxy_support;

use std::net::SocketAddr;

use proxy_support::{read_answer, Answer, Rig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

/// Sends `request` from source address `from` (port chosen by the OS).
async fn send_from(from: [u8; 4], to: SocketAddr, request: &[u8]) -> Answer {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    s.write_all(request).await.unwrap();
    read_answer(&mut s, &mut Vec::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_outside_the_allowlist_is_refused_whatever_it_claims() {
    let rig = Rig::start(|t, _, _| {
        t.replacen(
            "[server]\n",
            "[server]\nallowed_clients = [\"127.0.0.1/32\"]\n",
            1,
        )
    })
    .await;
    let token_requests = || rig.sandbox.drillster.requests() + rig.sandbox.driftrock.requests();
    let tokens_before = token_requests();
    let upstream_before = rig.raw.request_count();

    for request in [
        &b"GET /drillster/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"[..],
        b"GET /drillster/x HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 127.0.0.1\r\nX-Real-IP: 127.0.0.1\r\nForwarded: for=127.0.0.1\r\nConnection: close\r\n\r\n",
        b"POST /driftrock/y HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /nowhere HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    ] {
        let r = send_from([127, 0, 0, 2], rig.gw.addr(), request).await;
        assert_eq!(r.status, 403, "{}", r.head);
        assert_eq!(r.header("tokengate-error").as_deref(), Some("client_not_allowed"));
        assert_eq!(r.json()["error"], "client_not_allowed");
    }
    assert_eq!(
        rig.raw.request_count(),
        upstream_before,
        "nothing reached the upstream"
    );
    assert_eq!(
        token_requests(),
        tokens_before,
        "no token fetched for a refused client"
    );

    // The allowed address is served.
    let r = send_from(
        [127, 0, 0, 1],
        rig.gw.addr(),
        b"GET /drillster/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(
        rig.raw.last().unwrap().header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    let m = rig.gw.metrics().await;
    assert!(
        m.contains("client_not_allowed"),
        "denials are counted:\n{m}"
    );
    rig.stop().await;
}

/// A rig whose clients are 203.0.113.0/24 and 2001:db8::/32, reached through load balancers at
/// 127.0.0.2 and 127.0.0.3 (`server.trusted_proxies`), which are not clients themselves.
async fn behind_balancers() -> Rig {
    Rig::start(|t, _, _| {
        t.replacen(
            "[server]\n",
            "[server]\nallowed_clients = [\"203.0.113.0/24\", \"2001:db8::/32\"]\n\
             trusted_proxies = [\"127.0.0.2\", \"127.0.0.3/32\"]\n",
            1,
        )
    })
    .await
}

/// A request from `from` with `fields` (extra field lines, each ending in CRLF), on the fast
/// path (a plain GET) or on pingora-proxy's (a chunked POST, which the fast path hands over).
async fn through(rig: &Rig, from: [u8; 4], fields: &str, pingora: bool) -> Answer {
    let request = if pingora {
        format!(
            "POST /drillster/x HTTP/1.1\r\nHost: gw\r\n{fields}Transfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n0\r\n\r\n"
        )
    } else {
        format!("GET /drillster/x HTTP/1.1\r\nHost: gw\r\n{fields}Connection: close\r\n\r\n")
    };
    send_from(from, rig.gw.addr(), request.as_bytes()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_balancer_names_the_client_on_both_paths() {
    let rig = behind_balancers().await;
    const LB: [u8; 4] = [127, 0, 0, 2];
    // (source, fields, allowed, the X-Forwarded-For the upstream gets)
    let cases: &[([u8; 4], &str, bool, &str)] = &[
        (LB, "X-Forwarded-For: 203.0.113.7\r\n", true, "203.0.113.7"),
        // The balancer alone is no client.
        (LB, "", false, ""),
        // An untrusted peer's claim is never believed.
        (
            [127, 0, 0, 5],
            "X-Forwarded-For: 203.0.113.7\r\n",
            false,
            "",
        ),
        // A client behind the balancer claiming an allowed address: the balancer appended
        // the real one, which is what counts.
        (
            LB,
            "X-Forwarded-For: 203.0.113.7, 198.51.100.1\r\n",
            false,
            "",
        ),
        // Several fields are one list, in order (RFC 9110 §5.3).
        (
            LB,
            "X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 203.0.113.7\r\n",
            true,
            "198.51.100.1, 203.0.113.7",
        ),
        (
            LB,
            "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1\r\n",
            false,
            "",
        ),
        // Garbage stops the walk: judged as the balancer that reported it.
        (LB, "X-Forwarded-For: 203.0.113.7, garbage\r\n", false, ""),
        (
            LB,
            "X-Forwarded-For: 203.0.113.7, unknown, 127.0.0.3\r\n",
            false,
            "",
        ),
        // IPv6.
        (LB, "X-Forwarded-For: 2001:db8::7\r\n", true, "2001:db8::7"),
        (
            LB,
            "X-Forwarded-For: [2001:db8::8]:4711\r\n",
            true,
            "2001:db8::8",
        ),
        // A chain of trusted balancers; their hops are not forwarded.
        (
            LB,
            "X-Forwarded-For: 198.51.100.1, 203.0.113.9, 127.0.0.3\r\n",
            true,
            "198.51.100.1, 203.0.113.9",
        ),
        // From the second balancer directly.
        (
            [127, 0, 0, 3],
            "X-Forwarded-For: 203.0.113.10\r\n",
            true,
            "203.0.113.10",
        ),
    ];
    for pingora in [false, true] {
        for (from, fields, allowed, forwarded) in cases {
            let before = rig.raw.request_count();
            let r = through(&rig, *from, fields, pingora).await;
            let what = format!("from {from:?} with {fields:?} (pingora-proxy: {pingora})");
            if *allowed {
                assert_eq!(r.status, 200, "{what}: {}", r.head);
                let seen = rig.raw.last().unwrap();
                assert_eq!(
                    seen.header_values("x-forwarded-for"),
                    vec![forwarded.to_string()],
                    "{what}"
                );
            } else {
                assert_eq!(r.status, 403, "{what}: {}", r.head);
                assert_eq!(r.json()["error"], "client_not_allowed", "{what}");
                assert_eq!(rig.raw.request_count(), before, "{what}: nothing forwarded");
            }
        }
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_on_a_balancers_connection_is_judged_by_its_own_field() {
    let rig = behind_balancers().await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 2], 0))).unwrap();
    let mut s = socket.connect(rig.gw.addr()).await.unwrap();
    let mut buf = Vec::new();
    for (xff, status) in [
        ("203.0.113.7", 200),
        ("203.0.113.8", 200),
        ("198.51.100.1", 403),
    ] {
        let request =
            format!("GET /drillster/x HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: {xff}\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let r = read_answer(&mut s, &mut buf).await;
        assert_eq!(r.status, status, "{xff}: {}", r.head);
        if status == 200 {
            assert_eq!(
                rig.raw.last().unwrap().header("x-forwarded-for").as_deref(),
                Some(xff)
            );
        }
    }
    rig.stop().await;
}

/// `header_clients` judges the client address too: behind a trusted balancer, only the client
/// the balancer names may act as a managed user, on both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_clients_are_judged_by_the_address_a_trusted_balancer_names() {
    let sandbox = tokengate_sandbox::Sandbox::start().await.unwrap();
    let toml = tokengate::demo::config_toml_with_subjects(
        &sandbox,
        crate::common::free_addr(),
        crate::common::free_addr(),
        crate::common::free_addr(),
        &crate::common::demo_key_path(),
    )
    .replace(
        "header_clients = [\"127.0.0.0/8\", \"::1/128\"]",
        "header_clients = [\"203.0.113.7\"]",
    )
    .replacen(
        "[server]\n",
        "[server]\nallowed_clients = [\"127.0.0.0/8\", \"203.0.113.0/24\"]\n\
         trusted_proxies = [\"127.0.0.2\"]\n",
        1,
    );
    let config = tokengate::config::Config::from_toml_str(&toml, None, &|_| None)
        .unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let gw = crate::common::TestGateway::start(config).await;
    gw.ready().await;
    let user = tokengate::demo::DEMO_USERS[0];
    // (source, X-Forwarded-For, expected status)
    let cases: &[([u8; 4], &str, u16)] = &[
        ([127, 0, 0, 2], "203.0.113.7", 200),
        ([127, 0, 0, 2], "203.0.113.8", 403),
        // Not through the balancer: the peer itself is judged, and it is no header client.
        ([127, 0, 0, 1], "203.0.113.7", 403),
    ];
    for _round in 0..2 {
        for pingora in [false, true] {
            for (from, xff, status) in cases {
                let fields = format!("X-Forwarded-For: {xff}\r\nTokengate-Subject: {user}\r\n");
                let request = if pingora {
                    format!(
                        "POST /drillster/x HTTP/1.1\r\nHost: gw\r\n{fields}Transfer-Encoding: chunked\r\n\
                         Connection: close\r\n\r\n0\r\n\r\n"
                    )
                } else {
                    format!("GET /drillster/x HTTP/1.1\r\nHost: gw\r\n{fields}Connection: close\r\n\r\n")
                };
                let r = send_from(*from, gw.addr(), request.as_bytes()).await;
                let what = format!("from {from:?} for {xff} (pingora-proxy: {pingora})");
                assert_eq!(r.status, *status, "{what}: {}", r.head);
                if *status == 200 {
                    assert_eq!(r.json()["subject"], user, "{what}");
                } else {
                    assert_eq!(r.json()["error"], "subject_not_allowed", "{what}");
                }
            }
        }
    }
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
}
