//! Upstream names followed while running (docs/proxy-behaviour.md "Upstream addresses"), with
//! names resolved from a hosts file the test writes (`server.hosts_file`), never the network:
//! a name that does not resolve at start leaves the gateway running and the route answering 502
//! `upstream_unreachable` on both paths, with `/status` saying why, until the name resolves;
//! a name that moves is followed after a connect failure.

use crate::common;
use crate::proxy_support;

use std::net::SocketAddr;
use std::time::Duration;

use common::TestGateway;
use proxy_support::{send, Answer, Rig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const NAME: &str = "api.tokengate.test";

/// A plain GET (the fast path) or a chunked POST (pingora-proxy's path).
fn request(pingora: bool) -> Vec<u8> {
    if pingora {
        b"POST /drillster/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n".to_vec()
    } else {
        b"GET /drillster/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".to_vec()
    }
}

async fn status_of(gw: &TestGateway) -> serde_json::Value {
    reqwest::get(format!("{}/status", gw.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Sends `request(pingora)` until `done` holds for the answer, for at most 10 s.
async fn until(gw: &TestGateway, pingora: bool, done: impl Fn(&Answer) -> bool) -> Answer {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = send(gw.addr(), &request(pingora)).await;
        if done(&r) || tokio::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A server on `addr` answering every request with 200 and `X-Which: moved`.
async fn moved_upstream(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(addr)
        .await
        .expect("bind the moved upstream");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nX-Which: moved\r\nContent-Length: 5\r\nConnection: close\r\n\r\nmoved")
                            .await;
                        return;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolved_name_is_502_until_it_resolves_and_a_moved_name_is_followed() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hosts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "# nothing yet\n").unwrap();
    let hosts_text = hosts.display().to_string();
    let rig = Rig::start(move |t, _, raw| {
        let port = raw.addr().port();
        // The first route (drillster) only.
        t.replacen(
            &format!("upstream = \"{}\"", raw.base_url()),
            &format!("upstream = \"http://{NAME}:{port}\""),
            1,
        )
        .replacen(
            "[server]\n",
            &format!("[server]\nhosts_file = {hosts_text:?}\n"),
            1,
        )
    })
    .await;
    let port = rig.raw.addr().port();

    // Not resolvable at start: the gateway runs, the route answers 502 on both paths.
    for pingora in [false, true] {
        let r = send(rig.gw.addr(), &request(pingora)).await;
        assert_eq!(r.status, 502, "pingora-proxy: {pingora}: {}", r.head);
        assert_eq!(r.json()["error"], "upstream_unreachable");
        assert_eq!(r.json()["route"], "drillster");
    }
    let s = status_of(&rig.gw).await;
    let dns = &s["routes"][0]["upstream_dns"];
    assert_eq!(dns["resolved"], false, "{s}");
    assert!(
        dns["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("{NAME}: no address"))),
        "{s}"
    );
    assert!(dns["last_error_at_rfc3339"].as_str().is_some(), "{s}");
    // The other route is unaffected.
    let r = send(
        rig.gw.addr(),
        b"GET /driftrock/y HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);

    // The name appears: followed without a reload.
    std::fs::write(&hosts, format!("127.0.0.1 {NAME}\n")).unwrap();
    for pingora in [false, true] {
        let r = until(&rig.gw, pingora, |r| r.status == 200).await;
        assert_eq!(r.status, 200, "pingora-proxy: {pingora}: {}", r.head);
    }
    let seen = rig.raw.last().unwrap();
    assert_eq!(
        seen.header("host").as_deref(),
        Some(format!("{NAME}:{port}").as_str())
    );
    let s = status_of(&rig.gw).await;
    let dns = &s["routes"][0]["upstream_dns"];
    assert_eq!(dns["resolved"], true, "{s}");
    assert_eq!(
        dns["addresses"],
        serde_json::json!([format!("127.0.0.1:{port}")])
    );
    assert_eq!(dns["last_error"], serde_json::Value::Null);

    // The name moves to 127.0.0.2 and the old address stops answering: the connect failure
    // has the name resolved again, and new connections go to the new address.
    let moved = moved_upstream(SocketAddr::from(([127, 0, 0, 2], port))).await;
    std::fs::write(&hosts, format!("127.0.0.2 {NAME}\n")).unwrap();
    let Rig { sandbox, raw, gw } = rig;
    raw.shutdown().await;
    for pingora in [false, true] {
        let r = until(&gw, pingora, |r| {
            r.header("x-which").as_deref() == Some("moved")
        })
        .await;
        assert_eq!(r.status, 200, "pingora-proxy: {pingora}: {}", r.head);
        assert_eq!(r.header("x-which").as_deref(), Some("moved"), "{}", r.head);
    }
    let s = status_of(&gw).await;
    assert_eq!(
        s["routes"][0]["upstream_dns"]["addresses"],
        serde_json::json!([format!("127.0.0.2:{port}")])
    );
    moved.abort();
    gw.stop().await;
    sandbox.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
