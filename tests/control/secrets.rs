//! Large tokens and secrets, against the real binary so its log output can be searched: 12 KB
//! and 40 KB access tokens are sent whole, an upstream 431 is passed through and logged with the
//! token's size only; with an upstream answering 500, no error body, `/status`, metric or log
//! line holds a client secret, assertion, private key, access token or `access_token` query
//! value.

use crate::common;
use crate::proxy_support;

use common::{demo_key_path, free_addr, poll_until};
use proxy_support::{send, BinaryGateway};
use tokengate_sandbox::{keys, CannedResponse, RawApi, Sandbox};

/// The demo config for `sandbox` on fresh ports with the upstream pointed at `raw`.
fn toml_for(
    sandbox: &Sandbox,
    raw: &RawApi,
) -> (String, std::net::SocketAddr, std::net::SocketAddr) {
    let (listen, admin) = (free_addr(), free_addr());
    let toml = tokengate::demo::config_toml(sandbox, listen, admin, &demo_key_path()).replace(
        &format!("upstream = \"{}\"", sandbox.api.base_url()),
        &format!("upstream = \"{}\"", raw.base_url()),
    );
    (toml, listen, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_tokens_sent_whole_and_431_logged_with_size_only() {
    let sandbox = Sandbox::start().await.unwrap();
    let raw = RawApi::start(sandbox.registry.clone()).await.unwrap();
    // The canned tokens are not in the registry: accept any single Bearer token.
    raw.set_check_tokens(false);
    for size in [12 * 1024, 40 * 1024] {
        // A token of exactly `size` bytes, distinctive enough to search for.
        let token: String = format!("LARGE{size}x")
            .chars()
            .chain((0..).map(|i: usize| (b'a' + (i % 26) as u8) as char))
            .take(size)
            .collect();
        sandbox
            .drillster
            .faults()
            .respond_with(CannedResponse::json(
                http::StatusCode::OK,
                format!(r#"{{"access_token":"{token}","token_type":"bearer","expires_in":3600}}"#),
            ));
        let (toml, listen, admin) = toml_for(&sandbox, &raw);
        let gw = BinaryGateway::start(&toml, listen, admin, "info").await;

        let r = send(
            listen,
            b"GET /drillster/big HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.head);
        let seen = raw.last().unwrap();
        assert_eq!(
            seen.header_values("authorization"),
            [format!("Bearer {token}")],
            "the {size}-byte token arrived whole"
        );

        raw.faults().respond_with_next(
            1,
            CannedResponse::new(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
                .header("content-type", "text/plain")
                .body("header too large"),
        );
        let r = send(
            listen,
            b"GET /drillster/big431 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 431, "{}", r.head);
        assert_eq!(
            r.body, b"header too large",
            "the upstream's answer, unchanged"
        );
        assert!(r.header("tokengate-error").is_none());

        // The log line comes from the `logging` phase, after the response: wait for it.
        poll_until(std::time::Duration::from_secs(5), || async {
            gw.log().contains("upstream answered 431")
        })
        .await;
        let log = gw.log();
        let line = log
            .lines()
            .find(|l| l.contains("upstream answered 431"))
            .unwrap_or_else(|| panic!("no 431 log line:\n{log}"));
        assert!(
            line.contains("token_bytes") && line.contains(&size.to_string()),
            "{line}"
        );
        assert!(!log.contains(&token[..64]), "the token was logged");
        drop(gw);
        sandbox.drillster.faults().clear_response();
    }
    raw.shutdown().await;
    sandbox.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_leak_with_a_failing_upstream() {
    let sandbox = Sandbox::start().await.unwrap();
    let raw = RawApi::start(sandbox.registry.clone()).await.unwrap();
    raw.faults().respond_with(CannedResponse::json(
        http::StatusCode::INTERNAL_SERVER_ERROR,
        r#"{"error":"boom"}"#,
    ));
    let (toml, listen, admin) = toml_for(&sandbox, &raw);
    // Everything pingora and tokengate can say.
    let gw = BinaryGateway::start(&toml, listen, admin, "trace").await;

    let query_secret = "QUERYSECRET0123456789";
    let mut bodies = Vec::new();
    for request in [
        format!("GET /drillster/fail?access_token={query_secret}&a=1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Basic bGVnYWN5OnBhc3N3b3Jk\r\nConnection: close\r\n\r\n"),
        format!("POST /driftrock/fail?x=1&access_token={query_secret} HTTP/1.1\r\nHost: gw\r\nCookie: s=1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
        format!("GET /nowhere?access_token={query_secret} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"),
        "CONNECT x:1 HTTP/1.1\r\nHost: x:1\r\n\r\n".to_string(),
    ] {
        let r = send(listen, request.as_bytes()).await;
        assert!(r.status >= 400, "{}", r.head);
        bodies.push(format!("{}\n{}", r.head, String::from_utf8_lossy(&r.body)));
    }
    assert!(raw.request_count() >= 2);
    // An unreachable upstream: a gateway-made 502 body too.
    raw.faults().set_close_connection(true);
    let r = send(listen, format!("GET /drillster/gone?access_token={query_secret} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").as_bytes()).await;
    assert_eq!(r.status, 502, "{}", r.head);
    bodies.push(format!("{}\n{}", r.head, String::from_utf8_lossy(&r.body)));

    let get = |path: &str| {
        let url = format!("http://{admin}{path}");
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };
    let status = get("/status").await;
    let metrics = get("/metrics").await;
    assert!(status.contains("drillster") && metrics.contains("tokengate_"));
    let log = gw.log();
    assert!(log.len() > 1000, "trace logging produced little:\n{log}");
    // Written to a file, not a terminal: plain text, no colour escapes.
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log file:\n{}",
        &log[..log.len().min(400)]
    );

    let key_json = std::fs::read_to_string(demo_key_path()).unwrap();
    let private_key = serde_json::from_str::<serde_json::Value>(&key_json).unwrap()["privateKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let key_body_line = private_key
        .lines()
        .find(|l| l.len() > 40 && !l.starts_with("-----"))
        .unwrap()
        .to_owned();
    let assertion = sandbox
        .drillster
        .last_request()
        .and_then(|r| r.param("assertion").map(str::to_owned))
        .expect("the gateway sent an assertion");
    let mut secrets: Vec<(String, String)> = vec![
        (
            "drillster client secret".into(),
            keys::DRILLSTER_CLIENT_SECRET.into(),
        ),
        (
            "driftrock client secret".into(),
            keys::DRIFTROCK_CLIENT_SECRET.into(),
        ),
        ("assertion".into(), assertion.clone()),
        (
            "assertion signature".into(),
            assertion.rsplit('.').next().unwrap().into(),
        ),
        ("private key".into(), key_body_line),
        ("private key header".into(), "PRIVATE KEY".into()),
        ("access_token query value".into(), query_secret.into()),
        (
            "client's Basic credentials".into(),
            "bGVnYWN5OnBhc3N3b3Jk".into(),
        ),
    ];
    let tokens = sandbox.registry.issued_tokens();
    assert!(!tokens.is_empty());
    for t in tokens {
        secrets.push(("access token".into(), t.clone()));
        secrets.push((
            "access token signature".into(),
            t.rsplit('.').next().unwrap().into(),
        ));
    }
    let places = [
        ("error bodies", bodies.join("\n")),
        ("/status", status),
        ("/metrics", metrics),
        ("log", log),
    ];
    for (what, secret) in &secrets {
        for (place, text) in &places {
            assert!(
                !text.contains(secret.as_str()),
                "{what} found in {place}:\n{}",
                text.lines()
                    .filter(|l| l.contains(secret.as_str()))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    drop(gw);
    raw.shutdown().await;
    sandbox.shutdown().await.unwrap();
}

/// A token endpoint whose `error_description` echoes what it was sent (the client secret, raw
/// and form-encoded, and the Basic credentials): `/status` and the log show `[redacted]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_description_echoing_the_secret_is_redacted() {
    let sandbox = Sandbox::start().await.unwrap();
    let raw = RawApi::start(sandbox.registry.clone()).await.unwrap();
    let (toml, listen, admin) = toml_for(&sandbox, &raw);
    let gw = BinaryGateway::start(&toml, listen, admin, "debug").await;

    let secret = keys::DRIFTROCK_CLIENT_SECRET;
    let encoded: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let basic = sandbox
        .driftrock
        .last_request()
        .and_then(|r| r.header("authorization").map(str::to_owned))
        .expect("the gateway authenticated with Basic");
    let basic_b64 = basic.strip_prefix("Basic ").expect("Basic").to_owned();
    sandbox
        .driftrock
        .faults()
        .respond_with(CannedResponse::oauth_error(
            http::StatusCode::UNAUTHORIZED,
            "invalid_client",
            &format!("secret {secret} ({encoded}) is wrong; you sent Authorization: {basic}"),
        ));
    sandbox.registry.revoke_all();
    let r = send(
        listen,
        b"GET /driftrock/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.head);

    let status = reqwest::get(format!("http://{admin}/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        status.contains(
            "secret [redacted] ([redacted]) is wrong; you sent Authorization: [redacted]"
        ),
        "{status}"
    );
    let log = gw.log();
    assert!(log.contains("[redacted]"), "the failure is logged:\n{log}");
    for (place, text) in [("/status", &status), ("log", &log)] {
        for s in [secret, encoded.as_str(), basic_b64.as_str()] {
            assert!(!text.contains(s), "{s:?} in {place}:\n{text}");
        }
    }
    drop(gw);
    raw.shutdown().await;
    sandbox.shutdown().await.unwrap();
}

/// Requests refused for the client's own doing get their answer and, when pingora could read
/// the head, an access-log line (debug), never an ERROR line: a client cannot flood the log
/// with errors. Malformed heads on the admin listener are not logged with their raw bytes, nor
/// is an upstream's malformed answer (which here echoes the access token): the gateway's own
/// line names the kind only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_not_logged_as_errors_and_raw_heads_never() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sandbox = Sandbox::start().await.unwrap();
    let raw = RawApi::start(sandbox.registry.clone()).await.unwrap();
    // An upstream whose answer is malformed and carries the Authorization it received.
    let bad_upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bad_addr = bad_upstream.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = bad_upstream.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let auth = head
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization: "))
                    .unwrap_or("none")
                    .to_string();
                let answer =
                    format!("HTTP/1.1 200 OK\r\nX-Seen: {auth}\r\nBad Header\x01: x\r\n\r\n");
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    let (toml, listen, admin) = toml_for(&sandbox, &raw);
    let toml = toml.replacen(
        &format!("upstream = \"{}\"", raw.base_url()),
        &format!("upstream = \"http://{bad_addr}\""),
        1,
    );
    let gw = BinaryGateway::start(&toml, listen, admin, "info,tokengate::access=debug").await;
    for request in [
        &b"GET /driftrock/x HTTP/1.1\r\nHost: gw\r\nConnection: x-forwarded-for\r\n\r\n"[..],
        b"GET /driftrock/x HTTP/1.1\r\n\r\n",
        b"POST /driftrock/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ] {
        let r = send(listen, request).await;
        assert!(matches!(r.status, 400 | 501), "{}", r.head);
    }
    // Cut short or unreadable: a bad chunk (400), a close mid-body, a garbage head.
    for request in [
        &b"POST /driftrock/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"[..],
        b"POST /driftrock/x HTTP/1.1\r\nHost: gw\r\nConnection: x-a\r\nX-A: 1\r\nContent-Length: 100\r\n\r\nshort",
        b"GARBAGE\r\nAuthorization: Bearer CLIENTSECRET\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        s.write_all(request).await.unwrap();
        s.shutdown().await.unwrap();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            s.read_to_end(&mut Vec::new()),
        )
        .await;
    }
    // The admin listener, with credentials in a malformed head.
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /status?access_token=QSECRET HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer CLIENTSECRET\r\nCookie: sid=COOKIESECRET\r\nBad Header: 1\r\n\r\n")
        .await
        .unwrap();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_end(&mut Vec::new()),
    )
    .await;
    // The upstream's malformed answer, on pingora-proxy's path and on the fast path.
    for extra in ["Connection: x-a\r\nX-A: 1\r\n", ""] {
        let request =
            format!("GET /drillster/echo HTTP/1.1\r\nHost: gw\r\n{extra}Connection: close\r\n\r\n");
        let r = send(listen, request.as_bytes()).await;
        assert_eq!(r.status, 502, "{}", r.head);
    }
    // Lines are written before the answers they go with; the access log's after: wait for it.
    let logged = |log: &str| {
        log.lines()
            .filter(|l| l.contains("path=\"/drillster/echo\""))
            .count()
    };
    poll_until(std::time::Duration::from_secs(10), || async {
        logged(&gw.log()) >= 2
    })
    .await;
    let log = gw.log();
    let refused = log
        .lines()
        .filter(|l| l.contains("status=400") || l.contains("status=501"))
        .count();
    // Four refusals of readable heads, and the garbage head: the gateway answers it 400 too.
    assert_eq!(refused, 5, "every refusal is in the access log:\n{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let upstream_failures = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("upstream request failed"))
        .count();
    assert_eq!(upstream_failures, 2, "one line each path:\n{log}");
    let tokens = sandbox.registry.issued_tokens();
    assert!(!tokens.is_empty());
    let fixed = ["CLIENTSECRET", "QSECRET", "COOKIESECRET"].map(String::from);
    for secret in fixed.iter().chain(&tokens) {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
    drop(gw);
    raw.shutdown().await;
    sandbox.shutdown().await.unwrap();
}
