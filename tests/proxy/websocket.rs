//! WebSocket upgrades through the gateway: `Connection: Upgrade` and `Connection: keep-alive,
//! Upgrade` both get 101 with the gateway's Bearer token on the handshake, messages flow both
//! ways, and a token renewal does not close an open socket.

use crate::proxy_support;

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use proxy_support::{read_answer, Rig};
use tokengate_sandbox::{RawApi, Sandbox};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Opens `/drillster/ws` through the gateway with `connection` as the `Connection` value.
async fn open(rig: &Rig, connection: &str) -> WebSocketStream<TcpStream> {
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    let req = format!(
        "GET /drillster/ws HTTP/1.1\r\nHost: gw\r\nConnection: {connection}\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\nAuthorization: Basic bGVnYWN5OnB3\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = read_answer(&mut s, &mut buf).await;
    assert_eq!(r.status, 101, "{connection}: {}", r.head);
    assert_eq!(
        r.header("sec-websocket-accept").as_deref(),
        Some(tokio_tungstenite::tungstenite::handshake::derive_accept_key(KEY.as_bytes()).as_str())
    );
    assert!(buf.is_empty(), "no bytes after the 101 head yet");
    WebSocketStream::from_raw_socket(s, Role::Client, None).await
}

async fn echo(ws: &mut WebSocketStream<TcpStream>, message: Message) {
    ws.send(message.clone()).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo within 10 s")
        .expect("socket open")
        .unwrap_or_else(|e| panic!("a message, got error: {e:?}"));
    assert_eq!(back, message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_either_connection_value_and_messages_both_ways() {
    let rig = Rig::start(|t, _, _| t).await;
    for connection in ["Upgrade", "keep-alive, Upgrade"] {
        let mut ws = open(&rig, connection).await;
        let hs = rig.raw.last().unwrap();
        assert_eq!(hs.status, 101);
        let auth = hs.header_values("authorization");
        assert_eq!(auth.len(), 1, "{auth:?}");
        assert!(auth[0].starts_with("Bearer "), "{auth:?}");
        assert!(
            hs.subject.is_some(),
            "a valid gateway token on the handshake"
        );
        assert_eq!(hs.header("upgrade").as_deref(), Some("websocket"));
        assert!(hs
            .header("connection")
            .unwrap()
            .to_ascii_lowercase()
            .contains("upgrade"));
        echo(&mut ws, Message::text(format!("hello via {connection}"))).await;
        echo(&mut ws, Message::binary(vec![0u8, 1, 2, 255])).await;
        echo(&mut ws, Message::text("x".repeat(100_000))).await;
        ws.close(None).await.unwrap();
    }
    assert_eq!(rig.raw.ws_messages(), 6);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_renewal_does_not_close_an_open_socket() {
    // Tokens live 3 s: the refresher renews while the socket is open.
    let sandbox = Sandbox::builder()
        .token_lifetime(Duration::from_secs(3))
        .start()
        .await
        .unwrap();
    let raw = RawApi::start(sandbox.registry.clone()).await.unwrap();
    let rig = Rig::start_with(sandbox, raw, |t, _, _| t).await;
    let mut ws = open(&rig, "keep-alive, Upgrade").await;
    echo(&mut ws, Message::text("before")).await;
    let issued = rig.sandbox.drillster.successes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while rig.sandbox.drillster.successes() == issued {
        assert!(tokio::time::Instant::now() < deadline, "no renewal in 20 s");
        // Keep the socket busy meanwhile (and prove it stays up).
        echo(&mut ws, Message::text("during")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    echo(&mut ws, Message::text("after renewal")).await;
    // New requests use the new token; the socket is still the old one.
    let r = proxy_support::send(
        rig.gw.addr(),
        b"GET /drillster/after HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    echo(&mut ws, Message::text("still open")).await;
    ws.close(None).await.unwrap();
    rig.stop().await;
}
