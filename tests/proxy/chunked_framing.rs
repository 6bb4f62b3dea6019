//! Chunked request bodies are held to RFC 9112 §7.1 (docs/proxy-behaviour.md "Chunked request
//! bodies"): a body framed any other way gets the gateway's 400 `bad_request` before its bad
//! bytes (or anything after them) reach the upstream, and the connection closes; valid
//! framing — extensions, trailers, any hex spelling, pipelining, `Expect: 100-continue`, large
//! streamed uploads — goes through as before.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::eventually;
use crate::framing::assert_refused;
use crate::proxy_support::{read_answer, Rig};

const HEAD: &[u8] = b"POST /drillster/c HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n";
/// Sent right after each malformed body: it must never reach the upstream.
const SMUGGLED: &[u8] = b"GET /drillster/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n";

/// Reads until the gateway closes `s` (a reset counts as closed).
async fn assert_closed(s: &mut TcpStream) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    let read = read.expect("the gateway closes the connection within 10 s");
    if read.is_ok() {
        assert!(
            rest.is_empty(),
            "more after the 400: {}",
            String::from_utf8_lossy(&rest)
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `body` after a chunked request head, sent two ways — all in one write, and after the
/// upstream already has the head — gets the gateway's 400 and a closed connection each time.
/// The upstream answers nothing, gets at most `valid_prefix` body bytes (those of chunks
/// before the bad one) and never the request sent behind it.
async fn refused(body: &[u8], valid_prefix: u64) {
    let rig = Rig::start(|t, _, _| t).await;
    let mut all = HEAD.to_vec();
    all.extend_from_slice(body);
    all.extend_from_slice(SMUGGLED);
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(&all).await.unwrap();
    let a = read_answer(&mut s, &mut Vec::new()).await;
    assert_refused(&a, 400, "bad_request");
    assert_closed(&mut s).await;

    let connected = rig.raw.connection_count();
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(HEAD).await.unwrap();
    let raw = &rig.raw;
    eventually(
        Duration::from_secs(10),
        "the gateway connects upstream",
        || async { raw.connection_count() > connected },
    )
    .await;
    let mut rest = body.to_vec();
    rest.extend_from_slice(SMUGGLED);
    s.write_all(&rest).await.unwrap();
    let a = read_answer(&mut s, &mut Vec::new()).await;
    assert_refused(&a, 400, "bad_request");
    assert_closed(&mut s).await;

    eventually(
        Duration::from_secs(10),
        "every upstream connection ends",
        || async { raw.connections_ended() == raw.connection_count() },
    )
    .await;
    let seen = rig.raw.requests();
    assert!(!seen.is_empty(), "the upstream got the head at least once");
    for r in &seen {
        assert_eq!(r.path(), "/c", "{r:?}");
        assert_eq!(r.status, 0, "the body completed upstream: {r:?}");
        assert!(r.error.is_some(), "{r:?}");
        assert!(r.body_len <= valid_prefix, "{r:?}");
    }
    let metrics = rig.gw.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "tokengate_denied_total{reason=\"bad_request\"} 2"),
        "both refusals counted:\n{metrics}"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_chunk_size_is_refused() {
    refused(b"\r\n\r\n", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_size_that_is_not_hex_is_refused() {
    refused(b"zz\r\nhello\r\n0\r\n\r\n", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_without_a_size_is_refused() {
    refused(b";x\r\n0\r\n\r\n", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_lf_after_the_size_is_refused() {
    refused(b"5\nhello\r\n0\r\n\r\n", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_lf_in_an_extension_is_refused() {
    refused(b"5;e\nx\r\nhello\r\n0\r\n\r\n", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_data_without_its_crlf_is_refused() {
    refused(b"5\r\nhelloXX0\r\n\r\n", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_of_seventeen_hex_digits_is_refused() {
    refused(b"00000000000000005\r\nhello\r\n0\r\n\r\n", 0).await;
}

/// Valid chunks before the bad one may go ahead; the bad one and what follows do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chunk_after_good_ones_is_refused() {
    refused(b"5\r\nhello\r\n6\r\n world\r\nzz\r\n0\r\n\r\n", 11).await;
}

/// A chunked request pingora-proxy's path takes for its target (absolute-form) is checked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_request_is_checked_too() {
    let rig = Rig::start(|t, _, _| t).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(b"POST http://gw/drillster/c HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n;x\r\n0\r\n\r\n")
        .await
        .unwrap();
    let a = read_answer(&mut s, &mut Vec::new()).await;
    assert_refused(&a, 400, "bad_request");
    assert_closed(&mut s).await;
    assert!(rig.raw.requests().iter().all(|r| r.status == 0));
    rig.stop().await;
}

/// Extensions with and without values, quoted strings, whitespace before `;`, upper- and
/// lower-case hex, leading zeros (RFC 9112 §7.1, §7.1.1): the body arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_and_any_hex_spelling_pass() {
    let rig = Rig::start(|t, _, _| t).await;
    let mut raw = HEAD.to_vec();
    raw.extend_from_slice(
        b"5;a=1;flag;q=\"x;y \\\"z\\\"\"\r\nhello\r\n000006 ;b\r\n world\r\nA\r\n0123456789\r\na\r\nabcdefghij\r\n0;end=\"1\"\r\n\r\n",
    );
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(&raw).await.unwrap();
    let a = read_answer(&mut s, &mut Vec::new()).await;
    assert_eq!(a.status, 200, "{}", a.head);
    let seen = rig.raw.last().unwrap();
    let body = b"hello world0123456789abcdefghij";
    assert_eq!(seen.body_len, body.len() as u64);
    assert_eq!(seen.body_sha256, hex(&Sha256::digest(body)));
    rig.stop().await;
}

/// Trailer fields after the last chunk (RFC 9112 §7.1.2), then a request pipelined behind the
/// body in the same write, then one more on the same connection: all three answered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_and_pipelined_requests_pass() {
    let rig = Rig::start(|t, _, _| t).await;
    let mut raw = HEAD.to_vec();
    raw.extend_from_slice(b"5\r\nhello\r\n0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n");
    raw.extend_from_slice(b"GET /drillster/next HTTP/1.1\r\nHost: gw\r\n\r\n");
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(&raw).await.unwrap();
    let mut buf = Vec::new();
    let first = read_answer(&mut s, &mut buf).await;
    assert_eq!(first.status, 200, "{}", first.head);
    let second = read_answer(&mut s, &mut buf).await;
    assert_eq!(second.status, 200, "{}", second.head);
    s.write_all(b"GET /drillster/third HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let third = read_answer(&mut s, &mut buf).await;
    assert_eq!(third.status, 200, "{}", third.head);
    let seen = rig.raw.requests();
    let paths: Vec<_> = seen.iter().map(|r| r.path().to_owned()).collect();
    assert_eq!(paths, ["/c", "/next", "/third"]);
    assert_eq!(seen[0].body_len, 5);
    rig.stop().await;
}

/// A chunked request after one on the same connection is checked as the first was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_chunked_request_on_a_connection_is_checked() {
    let rig = Rig::start(|t, _, _| t).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    let mut raw = HEAD.to_vec();
    raw.extend_from_slice(b"3\r\nabc\r\n0\r\n\r\n");
    s.write_all(&raw).await.unwrap();
    let mut buf = Vec::new();
    let first = read_answer(&mut s, &mut buf).await;
    assert_eq!(first.status, 200, "{}", first.head);
    let mut raw = HEAD.to_vec();
    raw.extend_from_slice(b";x\r\n0\r\n\r\n");
    s.write_all(&raw).await.unwrap();
    let second = read_answer(&mut s, &mut buf).await;
    assert_refused(&second, 400, "bad_request");
    assert_closed(&mut s).await;
    rig.stop().await;
}

/// `Expect: 100-continue` with a chunked body: the client gets the upstream's 100, then sends
/// the body, which arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_with_a_chunked_body_passes() {
    let rig = Rig::start(|t, _, _| t).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(b"PUT /drillster/e HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let interim = read_answer(&mut s, &mut buf).await;
    assert_eq!(interim.status, 100, "{}", interim.head);
    s.write_all(b"5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\n")
        .await
        .unwrap();
    let a = read_answer(&mut s, &mut buf).await;
    assert_eq!(a.status, 200, "{}", a.head);
    let seen = rig.raw.last().unwrap();
    assert!(seen.sent_continue);
    assert_eq!(seen.body_len, 5);
    rig.stop().await;
}

/// A large chunked upload streams: the upstream has most of the first 8 MiB before the client
/// sends the rest, and the 32 MiB arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_chunked_upload_streams() {
    const PIECE: usize = 64 * 1024;
    const PIECES: usize = 512;
    let rig = Rig::start(|t, _, _| t).await;
    let mut s = TcpStream::connect(rig.gw.addr()).await.unwrap();
    s.write_all(HEAD).await.unwrap();
    let data: Vec<u8> = (0..PIECE as u32).map(|i| (i % 239) as u8).collect();
    let mut chunk = format!("{PIECE:x}\r\n").into_bytes();
    chunk.extend_from_slice(&data);
    chunk.extend_from_slice(b"\r\n");
    let mut sha = Sha256::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..PIECES / 4 {
            s.write_all(&chunk).await.unwrap();
            sha.update(&data);
        }
    })
    .await
    .expect("the first quarter sent within 60 s");
    let raw = &rig.raw;
    eventually(
        Duration::from_secs(30),
        "the upstream receives the body while it is still being sent",
        || async { raw.body_bytes() >= (PIECES / 8 * PIECE) as u64 },
    )
    .await;
    tokio::time::timeout(Duration::from_secs(60), async {
        for _ in PIECES / 4..PIECES {
            s.write_all(&chunk).await.unwrap();
            sha.update(&data);
        }
        s.write_all(b"0\r\n\r\n").await.unwrap();
    })
    .await
    .expect("upload within 60 s");
    let a = read_answer(&mut s, &mut Vec::new()).await;
    assert_eq!(a.status, 200, "{}", a.head);
    let seen = rig.raw.last().unwrap();
    assert_eq!(seen.body_len, (PIECES * PIECE) as u64);
    assert_eq!(seen.body_sha256, hex(&sha.finalize()));
    rig.stop().await;
}
