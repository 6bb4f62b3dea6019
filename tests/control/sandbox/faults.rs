//! The sandbox servers' fault knobs and their harness: canned answers, overrides, latency,
//! hangs, held requests, handler panics and shutdown.

use super::*;

// ---------------------------------------------------------------------------------------------
// fault knobs

#[tokio::test]
async fn canned_response_for_the_next_n_requests() {
    let sandbox = Sandbox::start().await.expect("sandbox");
    let driftrock = &sandbox.driftrock;
    let html = "<html><body><h1>502 Bad Gateway</h1></body></html>";
    driftrock.faults().respond_with_next(
        2,
        CannedResponse::html(StatusCode::BAD_GATEWAY, html).header("retry-after", "7"),
    );
    let authorization = basic_authorization(DRIFTROCK_CLIENT_ID, DRIFTROCK_CLIENT_SECRET);
    for _ in 0..2 {
        let response = client()
            .post(driftrock.token_endpoint())
            .header(AUTHORIZATION, &authorization)
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            header(response.headers(), "content-type"),
            "text/html; charset=utf-8"
        );
        assert_eq!(header(response.headers(), "retry-after"), "7");
        assert_eq!(response.text().await.expect("body"), html);
    }
    let (status, _, _) = driftrock_request(driftrock, &authorization, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            driftrock.requests(),
            driftrock.successes(),
            driftrock.failures()
        ),
        (3, 1, 2)
    );

    // The same knobs on the API: a redirect that must not be followed, then a broken JSON body.
    sandbox.api.faults().respond_with_next(
        1,
        CannedResponse::new(StatusCode::FOUND).header("location", "https://elsewhere.example/"),
    );
    let response = client()
        .get(sandbox.api.url("/r"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(
        header(response.headers(), "location"),
        "https://elsewhere.example/"
    );
    sandbox
        .api
        .faults()
        .respond_with(CannedResponse::json(StatusCode::OK, "{not json"));
    let response = client()
        .get(sandbox.api.url("/j"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.text().await.expect("body"), "{not json");
    sandbox.api.faults().clear_response();
    let (status, _, _) = api_get(&sandbox.api, "/j", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    sandbox.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn expires_in_and_token_type_overrides_are_sent_verbatim() {
    let server = AuthServer::driftrock().start().await.expect("server");
    let authorization = basic_authorization(DRIFTROCK_CLIENT_ID, DRIFTROCK_CLIENT_SECRET);
    let raw_body = || async {
        let response = client()
            .post(server.token_endpoint())
            .header(AUTHORIZATION, &authorization)
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.expect("body")
    };
    for (field, expected) in [
        (JsonField::string("3600"), r#""expires_in":"3600""#),
        (JsonField::raw("0"), r#""expires_in":0"#),
        (JsonField::raw("-1"), r#""expires_in":-1"#),
        (
            JsonField::raw("9223372036854775807"),
            r#""expires_in":9223372036854775807"#,
        ),
        (JsonField::raw("1e308"), r#""expires_in":1e308"#),
        (JsonField::raw("1.5"), r#""expires_in":1.5"#),
    ] {
        server.set_expires_in(field);
        let body = raw_body().await;
        assert!(body.contains(expected), "{body} lacks {expected}");
        assert!(serde_json::from_str::<Value>(&body).is_ok(), "{body}");
    }
    server.set_expires_in(JsonField::Absent);
    server.set_token_type(JsonField::Absent);
    let body: Value = serde_json::from_str(&raw_body().await).expect("json");
    assert!(
        body.get("expires_in").is_none() && body.get("token_type").is_none(),
        "{body}"
    );
    assert!(body["access_token"].is_string());

    server.set_token_type(JsonField::string("DPoP"));
    server.set_expires_in(JsonField::Normal);
    let body: Value = serde_json::from_str(&raw_body().await).expect("json");
    assert_eq!(body["token_type"], "DPoP");
    assert_eq!(body["expires_in"], 3600);

    server.set_token_lifetime(Duration::from_secs(2));
    server.set_token_type(JsonField::Normal);
    let body: Value = serde_json::from_str(&raw_body().await).expect("json");
    assert_eq!(body["expires_in"], 2);
    assert_eq!(body["token_type"], "Bearer");
    server.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn latency_hang_and_closed_connections() {
    let server = AuthServer::driftrock().start().await.expect("server");
    let authorization = basic_authorization(DRIFTROCK_CLIENT_ID, DRIFTROCK_CLIENT_SECRET);
    let send = |timeout: Duration| {
        client()
            .post(server.token_endpoint())
            .header(AUTHORIZATION, &authorization)
            .form(&[("grant_type", "client_credentials")])
            .timeout(timeout)
            .send()
    };

    server.faults().set_latency(Duration::from_millis(300));
    let started = Instant::now();
    let response = send(Duration::from_secs(10)).await.expect("slow answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    server.faults().set_latency(Duration::ZERO);

    server.faults().set_hang(true);
    let err = send(Duration::from_millis(300))
        .await
        .expect_err("never answered");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(server.requests(), 2, "the hung request was received");
    server.faults().set_hang(false);
    assert_eq!(
        send(Duration::from_secs(10))
            .await
            .expect("answer")
            .status(),
        StatusCode::OK
    );

    server.faults().set_close_connection(true);
    let err = send(Duration::from_secs(10))
        .await
        .expect_err("closed without answer");
    assert!(!err.is_timeout(), "{err:?}");
    server.faults().set_close_connection(false);
    assert_eq!(
        send(Duration::from_secs(10))
            .await
            .expect("answer")
            .status(),
        StatusCode::OK
    );

    server.faults().fail_with(StatusCode::SERVICE_UNAVAILABLE);
    for _ in 0..2 {
        let response = send(Duration::from_secs(10)).await.expect("answer");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header(response.headers(), "retry-after"), "1");
        let body: Value =
            serde_json::from_str(&response.text().await.expect("body")).expect("json");
        assert_eq!(body["error"], "temporarily_unavailable");
    }
    server.faults().stop_failing();
    assert_eq!(
        send(Duration::from_secs(10))
            .await
            .expect("answer")
            .status(),
        StatusCode::OK
    );
    assert_eq!(server.successes(), 4);
    server.shutdown().await.expect("no handler panics");
}

/// Held requests wait, counted, until released, then are answered as usual; `reset` releases
/// too.
#[tokio::test]
async fn held_requests_wait_until_released() {
    let server = AuthServer::driftrock().start().await.expect("server");
    let authorization = basic_authorization(DRIFTROCK_CLIENT_ID, DRIFTROCK_CLIENT_SECRET);
    let send = || {
        let request = client()
            .post(server.token_endpoint())
            .header(AUTHORIZATION, &authorization)
            .form(&[("grant_type", "client_credentials")]);
        tokio::spawn(async move { request.send().await.expect("answer").status() })
    };
    server.faults().hold();
    let held: Vec<_> = (0..3).map(|_| send()).collect();
    crate::common::eventually(Duration::from_secs(10), "three held requests", || async {
        server.faults().held() == 3
    })
    .await;
    assert_eq!(server.successes(), 0, "none answered while held");
    assert!(held.iter().all(|t| !t.is_finished()));
    server.faults().release();
    for t in held {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    assert_eq!((server.faults().held(), server.successes()), (0, 3));

    server.faults().hold();
    let held = send();
    crate::common::eventually(Duration::from_secs(10), "a held request", || async {
        server.faults().held() == 1
    })
    .await;
    server.faults().reset();
    assert_eq!(held.await.expect("task"), StatusCode::OK);
    assert_eq!(server.faults().held(), 0);
    server.shutdown().await.expect("no handler panics");
}

// ---------------------------------------------------------------------------------------------
// harness

#[tokio::test]
async fn handler_panics_are_answered_counted_and_reported() {
    let api = SandboxApi::start(TokenRegistry::new()).await.expect("api");
    api.faults().set_panic(true);
    let response = client()
        .get(api.url("/boom"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(api.panics(), 1);
    match api.shutdown().await {
        Err(SandboxError::HandlerPanicked {
            count: 1, first, ..
        }) => {
            assert!(first.contains("handler panic"), "{first}");
        }
        other => panic!("expected HandlerPanicked, got {other:?}"),
    }

    // Dropping a server whose panic was not reported panics, so the test using it fails.
    let api = SandboxApi::start(TokenRegistry::new()).await.expect("api");
    api.faults().set_panic(true);
    let response = client()
        .get(api.url("/boom"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(api)));
    assert!(dropped.is_err());
}

#[tokio::test]
async fn shutdown_closes_the_listener() {
    let api = SandboxApi::start(TokenRegistry::new()).await.expect("api");
    let addr = api.addr();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    tokio::net::TcpStream::connect(addr)
        .await
        .expect("listening");
    api.shutdown().await.expect("no handler panics");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
