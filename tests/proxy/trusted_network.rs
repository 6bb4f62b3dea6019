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
