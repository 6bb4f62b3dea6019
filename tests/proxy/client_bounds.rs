//! Client bounds on both proxy paths: a connection from outside `allowed_clients` refused before
//! its head is read, `max_request_head` (431), `request_head_timeout` (408), `idle_timeout`,
//! `body_timeout` (408), `send_timeout` (closed), `max_connections`, each counted; and clients
//! that are slow but make progress are served whole. Requests in HTTP/1.0 go to pingora-proxy's
//! path, HTTP/1.1 ones to the fast path.

use crate::common::poll_until;
use crate::proxy_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proxy_support::{read_answer, Answer, Rig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn rig(server_lines: &str) -> Rig {
    let lines = server_lines.to_string();
    Rig::start(move |t, _, _| t.replacen("[server]\n", &format!("[server]\n{lines}\n"), 1)).await
}

/// The value of the series `series` (name and labels exactly as exported), 0 when absent.
async fn metric(rig: &Rig, series: &str) -> u64 {
    rig.gw
        .metrics()
        .await
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

/// Reads until the gateway closes the connection (EOF or reset), at most `limit`; the bytes
/// read and when it closed.
async fn until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (got, closed.then(|| start.elapsed()))
}

fn status_of(bytes: &[u8]) -> Option<u16> {
    std::str::from_utf8(bytes.get(9..12)?).ok()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outside_the_allowlist_is_refused_before_it_sends_a_byte() {
    let rig = rig("allowed_clients = [\"127.0.0.1/32\"]").await;
    let gw = rig.gw.addr();
    let connect_from = |ip: [u8; 4]| async move {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((ip, 0))).unwrap();
        socket.connect(gw).await.unwrap()
    };

    // Nothing sent: the 403 comes at once, then the connection closes.
    let mut s = connect_from([127, 0, 0, 2]).await;
    let r = read_answer(&mut s, &mut Vec::new()).await;
    assert_eq!(r.status, 403, "{}", r.head);
    assert_eq!(r.json()["error"], "client_not_allowed");
    let (_, closed) = until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "the refused connection is closed");

    // A megabyte of head is never read: the connection ends within the linger bound.
    let mut s = connect_from([127, 0, 0, 2]).await;
    let started = Instant::now();
    let big = [b'a'; 64 * 1024];
    let _ = s
        .write_all(b"GET /drillster/x HTTP/1.1\r\nHost: gw\r\nX-Big: ")
        .await;
    for _ in 0..16 {
        if s.write_all(&big).await.is_err() {
            break;
        }
    }
    let (got, closed) = until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(closed.is_some(), "closed");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(got.is_empty() || status_of(&got) == Some(403), "{got:?}");
    assert_eq!(rig.raw.request_count(), 0, "nothing reached the upstream");
    assert!(
        metric(
            &rig,
            "tokengate_denied_total{reason=\"client_not_allowed\"}"
        )
        .await
            >= 2
    );

    // The allowed address is served.
    let mut s = connect_from([127, 0, 0, 1]).await;
    s.write_all(b"GET /drillster/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s, &mut Vec::new()).await.status, 200);
    rig.stop().await;
}

fn head_of(len: usize, version: &str) -> Vec<u8> {
    let start =
        format!("GET /drillster/x HTTP/1.{version}\r\nHost: gw\r\nConnection: close\r\nX-Big: ");
    let mut head = start.into_bytes();
    head.resize(len - 4, b'a');
    head.extend_from_slice(b"\r\n\r\n");
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_over_max_request_head_get_431_on_both_paths() {
    let rig = rig("").await;
    for version in ["1", "0"] {
        let r = proxy_support::send(rig.gw.addr(), &head_of(30 * 1024, version)).await;
        assert_eq!(
            r.status, 200,
            "a 30 KiB head on HTTP/1.{version}: {}",
            r.head
        );
        let r = proxy_support::send(rig.gw.addr(), &head_of(32 * 1024 + 1, version)).await;
        assert_eq!(r.status, 431, "HTTP/1.{version}: {}", r.head);
        assert_eq!(r.json()["error"], "request_header_too_large");
    }
    assert_eq!(
        rig.raw.request_count(),
        2,
        "only the heads within the limit went on"
    );
    rig.stop().await;

    let rig = self::rig("max_request_head = \"2KiB\"").await;
    let r = proxy_support::send(rig.gw.addr(), &head_of(2048, "1")).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let r = proxy_support::send(rig.gw.addr(), &head_of(2049, "1")).await;
    assert_eq!(r.status, 431, "{}", r.head);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_head_gets_408_after_request_head_timeout() {
    let rig = rig("request_head_timeout = \"1s\"").await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    let started = Instant::now();
    s.write_all(b"GET /drillster/x HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    // A field every 200 ms keeps every read short; the head as a whole is late.
    for _ in 0..40 {
        if s.write_all(b"X-Drip: 1\r\n").await.is_err() {
            break;
        }
        let mut chunk = [0u8; 4096];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut chunk)).await {
            match r {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    }
    let answered = started.elapsed();
    let (rest, closed) = until_closed(&mut s, Duration::from_secs(5)).await;
    got.extend_from_slice(&rest);
    assert_eq!(
        status_of(&got),
        Some(408),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(String::from_utf8_lossy(&got).contains("\"request_timeout\""));
    assert!(closed.is_some(), "closed after the 408");
    assert!(
        answered >= Duration::from_millis(900) && answered < Duration::from_secs(5),
        "answered after {answered:?}"
    );
    assert_eq!(rig.raw.request_count(), 0);
    assert_eq!(
        metric(&rig, "tokengate_client_timeouts_total{kind=\"head\"}").await,
        1
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_idle_timeout() {
    let rig = rig("idle_timeout = \"1s\"").await;
    // A connection that never sends a request.
    let fresh = TcpStream::connect(rig.gw.addr()).await.unwrap();
    // A kept-alive one after a request on each path.
    let mut kept = TcpStream::connect(rig.gw.addr()).await.unwrap();
    kept.write_all(b"GET /drillster/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut kept, &mut Vec::new()).await.status, 200);
    let mut kept_slow = TcpStream::connect(rig.gw.addr()).await.unwrap();
    kept_slow
        .write_all(b"GET /drillster/x HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_answer(&mut kept_slow, &mut Vec::new()).await.status,
        200
    );
    // Each is closed about idle_timeout after its last byte; all are watched at once.
    let idle_since = Instant::now();
    let watch = |what: &'static str, mut s: TcpStream| async move {
        let (got, closed) = until_closed(&mut s, Duration::from_secs(6)).await;
        assert!(got.is_empty(), "{what}: closed without an answer");
        assert!(closed.is_some(), "{what}: still open");
        idle_since.elapsed()
    };
    let (a, b, c) = tokio::join!(
        watch("fresh", fresh),
        watch("kept", kept),
        watch("kept after pingora", kept_slow)
    );
    for (what, after) in [("fresh", a), ("kept", b), ("kept after pingora", c)] {
        assert!(
            after >= Duration::from_millis(700) && after < Duration::from_secs(5),
            "{what}: closed {after:?} after its last request"
        );
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_gets_408_on_both_paths() {
    let rig = rig("body_timeout = \"1s\"").await;
    let stalled: [&[u8]; 3] = [
        // Fast path: a Content-Length body it holds whole.
        b"POST /drillster/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\nhello",
        // pingora-proxy's path: a chunked body, and one over the replay limit.
        b"POST /drillster/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"POST /drillster/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000\r\n\r\nhello",
    ];
    for request in stalled {
        let what = String::from_utf8_lossy(&request[..60]).to_string();
        let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
        let started = Instant::now();
        s.write_all(request).await.unwrap();
        let (got, closed) = until_closed(&mut s, Duration::from_secs(8)).await;
        assert_eq!(
            status_of(&got),
            Some(408),
            "{what}: {}",
            String::from_utf8_lossy(&got)
        );
        assert!(closed.is_some(), "{what}: closed");
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(900),
            "{what}: after {after:?}"
        );
    }
    assert_eq!(
        metric(&rig, "tokengate_client_timeouts_total{kind=\"body\"}").await,
        3
    );
    rig.stop().await;
}

/// A connection whose receive buffer is small, so a client that does not read stalls the
/// gateway's writes soon.
async fn small_window(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.connect(addr).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout_on_both_paths() {
    let rig = rig("send_timeout = \"1s\"").await;
    const SIZE: usize = 256 << 20;
    for (n, version) in ["1", "0"].into_iter().enumerate() {
        let mut s = small_window(rig.gw.addr()).await;
        s.write_all(
            format!("GET /drillster/download/{SIZE} HTTP/1.{version}\r\nHost: gw\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let series = "tokengate_client_timeouts_total{kind=\"send\"}";
        let cut = poll_until(Duration::from_secs(10), || async {
            metric(&rig, series).await == n as u64 + 1
        })
        .await;
        assert!(cut, "HTTP/1.{version}: a stalled write is cut off");
        let (got, closed) = until_closed(&mut s, Duration::from_secs(10)).await;
        assert!(closed.is_some(), "HTTP/1.{version}: closed");
        assert!(
            got.len() < SIZE,
            "HTTP/1.{version}: the response was cut short"
        );
        assert_eq!(status_of(&got), Some(200));
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_that_make_progress_are_served_whole() {
    // A writer blocked on a full socket is woken only once the client has drained a good part of
    // the socket's send buffer (megabytes on loopback), so the send bound is not set tighter.
    let rig = rig("body_timeout = \"1s\"\nsend_timeout = \"2s\"").await;
    // An upload of 3 MiB in 64 KiB pieces every 40 ms (about 1.6 MB/s, 2 s in all).
    const UP: usize = 3 << 20;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(
        format!("POST /drillster/x HTTP/1.1\r\nHost: gw\r\nContent-Length: {UP}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let piece = vec![b'u'; 64 * 1024];
    for _ in 0..UP / piece.len() {
        s.write_all(&piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let r: Answer = read_answer(&mut s, &mut Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(rig.raw.last().unwrap().body_len, UP as u64);

    // A download of 8 MiB read 64 KiB every 10 ms (at most 6.5 MB/s), on both paths.
    const DOWN: usize = 8 << 20;
    for version in ["1", "0"] {
        let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
        s.write_all(format!("GET /drillster/download/{DOWN} HTTP/1.{version}\r\nHost: gw\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = 0usize;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            got > DOWN,
            "HTTP/1.{version}: head and all {DOWN} bytes, got {got}"
        );
    }
    let series = "tokengate_client_timeouts_total{kind=\"send\"}";
    assert_eq!(metric(&rig, series).await, 0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_refused() {
    let rig = rig("max_connections = 3").await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(TcpStream::connect(rig.gw.addr()).await.unwrap());
    }
    let all_in = poll_until(Duration::from_secs(5), || async {
        metric(&rig, "tokengate_connections").await == 3
    })
    .await;
    assert!(all_in, "three connections open");
    let mut extra = TcpStream::connect(rig.gw.addr()).await.unwrap();
    let _ = extra
        .write_all(b"GET /drillster/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await;
    let (got, closed) = until_closed(&mut extra, Duration::from_secs(5)).await;
    assert!(
        got.is_empty() && closed.is_some(),
        "the fourth is closed unanswered"
    );
    assert_eq!(metric(&rig, "tokengate_connections_refused_total").await, 1);
    assert_eq!(metric(&rig, "tokengate_connections").await, 3);

    // A place freed is a place taken.
    drop(open.pop());
    let freed = poll_until(Duration::from_secs(5), || async {
        metric(&rig, "tokengate_connections").await == 2
    })
    .await;
    assert!(freed);
    let r = proxy_support::send(
        rig.gw.addr(),
        b"GET /drillster/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    rig.stop().await;
}
