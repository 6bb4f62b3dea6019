//! Upstream 401 to a current token (RFC 6750 §3.1 `invalid_token`).

use super::*;

/// A renewal is in flight (the server will hand back its cached token) when the upstream
/// rejects that token: the dropped token is not put back; the request is replayed once with a
/// new one. The renewal is held at the token endpoint until the request waits for it.
pub async fn fetch_in_flight_cannot_restore_a_dropped_token() -> Seen {
    let sandbox = Sandbox::builder()
        .token_lifetime(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let gw = Arc::new(
        TestGateway::start(config_for(&sandbox, |t| {
            with_auth(t, "drillster", "refresh_ratio = 0.05")
        }))
        .await,
    );
    gw.ready().await;
    let first = upstream_auth(&gw, "/drillster/x").await;
    sandbox.drillster.faults().hold();
    sandbox.drillster.reissue_next(1);
    eventually(Duration::from_secs(10), "renewal in flight", || async {
        sandbox.drillster.faults().held() == 1
    })
    .await;
    sandbox.registry.revoke_all();
    let waited = gw.waited_requests();
    let request = {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move { upstream_auth(&gw, "/drillster/x").await })
    };
    eventually(
        Duration::from_secs(10),
        "the request waits for a token",
        || async { gw.waited_requests() > waited },
    )
    .await;
    sandbox.drillster.faults().release();
    let replayed = request.await.unwrap();
    assert_ne!(replayed, first, "the dropped token came back");
    assert_eq!(
        sandbox.drillster.requests(),
        3,
        "stale answer discarded, one new fetch"
    );
    assert_eq!(
        token_status(&gw, "drillster").await["generation"],
        2,
        "the re-issued token was never published"
    );
    assert_eq!(upstream_auth(&gw, "/drillster/x").await, replayed);
    let gw = Arc::try_unwrap(gw).ok().expect("sole owner");
    finish(gw, sandbox).await
}

/// A 5 MB chunked POST that gets a 401 is not replayed (more than `replay_body_limit`): the
/// 401 goes to the client, the upstream saw the body once, and the next request carries the new
/// token. Never an empty-body retry.
pub async fn large_chunked_post_is_not_replayed_and_next_request_uses_new_token() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    let first = upstream_auth(&gw, "/drillster/x").await;
    sandbox.registry.revoke_all();
    let api_before = sandbox.api.requests();

    let body: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(
        b"POST /drillster/upload HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\
          Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    for chunk in body.chunks(64 * 1024) {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(chunk).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut response))
        .await
        .expect("answer within 20 s")
        .unwrap();
    let head = String::from_utf8_lossy(&response[..response.len().min(200)]).to_string();
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("tokengate-error"),
        "the API's own 401"
    );
    assert_eq!(sandbox.api.requests(), api_before + 1, "not replayed");
    let echo = sandbox.api.last_echo().expect("echo");
    assert_eq!(echo.body_len, 5_000_000);
    assert_eq!(echo.body_sha256, hex(&Sha256::digest(&body)));
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tokengate_upstream_unauthorized_total{action=\"passed_through\",route=\"drillster\"}"
        ),
        1.0
    );
    let next = upstream_auth(&gw, "/drillster/x").await;
    assert_ne!(next, first, "the next request uses the new token");
    assert!(sandbox
        .api
        .recent()
        .iter()
        .all(|e| e.method != "POST" || e.body_len == 5_000_000));
    finish(gw, sandbox).await
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An upstream that refuses even freshly fetched tokens: no loop — the first refused
/// request gets one refresh and one replay; the replay's 401 shows the API refuses the request,
/// not the token, so the token is held through 401s for `REFUSED_TOKEN_HOLD` (the next
/// requests are passed through without a refresh) and keeps serving what the API accepts.
pub async fn upstream_that_keeps_refusing_gets_no_loop() -> Seen {
    let sandbox = Sandbox::start().await.unwrap();
    let gw = TestGateway::start(config_for(&sandbox, |t| t)).await;
    gw.ready().await;
    sandbox.api.faults().respond_with(
        CannedResponse::json(StatusCode::UNAUTHORIZED, r#"{"error":"invalid_token"}"#)
            .header("www-authenticate", "Bearer error=\"invalid_token\""),
    );
    for i in 1..=3u64 {
        let (status, headers, _) = get(&gw, "/drillster/x").await;
        assert_eq!(status, 401);
        assert!(headers.get("tokengate-error").is_none());
        assert_eq!(
            sandbox.drillster.successes(),
            2,
            "one refresh for the first request, none while the token is held"
        );
        assert_eq!(
            sandbox.api.requests(),
            1 + i,
            "original + one replay, then one each"
        );
    }
    let m = gw.metrics().await;
    let series = |action: &str| {
        format!("tokengate_upstream_unauthorized_total{{action=\"{action}\",route=\"drillster\"}}")
    };
    assert_eq!(metric(&m, &series("passed_through")), 3.0);
    assert_eq!(metric(&m, &series("replayed")), 1.0);
    // The held token is the current one: what the API accepts is served with it.
    sandbox.api.faults().clear_response();
    let (status, _, _) = get(&gw, "/drillster/y").await;
    assert_eq!(status, 200);
    assert_eq!(sandbox.drillster.successes(), 2);
    finish(gw, sandbox).await
}
