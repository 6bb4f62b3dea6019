//! The sandbox servers behave like the vendors they stand in for (Drillster: Service accounts,
//! Driftrock: Client credentials), refuse what the real ones refuse, and their fault knobs do what
//! they say.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokengate_sandbox::keys::{
    DEMO_KEY_ID, DEMO_PRIVATE_PEM, DEMO_SERVICE_ACCOUNT_ID, DRIFTROCK_CLIENT_ID,
    DRIFTROCK_CLIENT_SECRET, DRILLSTER_CLIENT_ID, DRILLSTER_CLIENT_SECRET, OTHER_PRIVATE_PEM,
};
use tokengate_sandbox::{
    basic_authorization, basic_authorization_raw, AssertionRejection, AuthServer, BasicDecoding,
    CannedResponse, Echo, JsonField, Sandbox, SandboxApi, SandboxError, TokenRegistry,
    JWT_BEARER_GRANT,
};

// ---------------------------------------------------------------------------------------------
// helpers

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}

fn now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    i64::try_from(secs).expect("sane clock")
}

/// Valid claims for the demo service account, for the token endpoint `aud`.
fn claims(aud: &str) -> Value {
    json!({
        "iss": DEMO_SERVICE_ACCOUNT_ID,
        "sub": DEMO_SERVICE_ACCOUNT_ID,
        "aud": aud,
        "iat": now() - 5,
        "exp": now() + 300,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

fn sign_with(claims: &Value, kid: &str, private_pem: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("fixture key");
    jsonwebtoken::encode(&header, claims, &key).expect("sign assertion")
}

fn sign(claims: &Value) -> String {
    sign_with(claims, DEMO_KEY_ID, DEMO_PRIVATE_PEM)
}

/// A Drillster token request as "Drillster: Service accounts" shows it: client_secret_post,
/// `Accept: application/json`.
async fn drillster_request(
    server: &AuthServer,
    assertion: &str,
    secret: &str,
) -> (StatusCode, http::HeaderMap, Value) {
    let response = client()
        .post(server.token_endpoint())
        .header(ACCEPT, "application/json")
        .form(&[
            ("grant_type", JWT_BEARER_GRANT),
            ("client_id", DRILLSTER_CLIENT_ID),
            ("client_secret", secret),
            ("assertion", assertion),
        ])
        .send()
        .await
        .expect("token request");
    split(response).await
}

/// A Driftrock token request with the given `Authorization` value and extra form parameters.
async fn driftrock_request(
    server: &AuthServer,
    authorization: &str,
    params: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, Value) {
    let mut form = vec![("grant_type", "client_credentials")];
    form.extend_from_slice(params);
    let response = client()
        .post(server.token_endpoint())
        .header(AUTHORIZATION, authorization)
        .form(&form)
        .send()
        .await
        .expect("token request");
    split(response).await
}

async fn split(response: reqwest::Response) -> (StatusCode, http::HeaderMap, Value) {
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("response body");
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, value)
}

async fn api_get(
    api: &SandboxApi,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, http::HeaderMap, Value) {
    let mut request = client().get(api.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    split(request.send().await.expect("api request")).await
}

fn access_token(body: &Value) -> String {
    body["access_token"]
        .as_str()
        .expect("access_token in response")
        .to_owned()
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Drillster-like server (Drillster: Service accounts, RFC 7523)

#[tokio::test]
async fn drillster_valid_assertion_gets_a_token_the_api_accepts() {
    let sandbox = Sandbox::start().await.expect("sandbox");
    let drillster = &sandbox.drillster;
    let mut claims = claims(&drillster.token_endpoint());
    claims["sub"] = json!("managed-user-42");
    let (status, headers, body) =
        drillster_request(drillster, &sign(&claims), DRILLSTER_CLIENT_SECRET).await;

    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        header(&headers, "content-type"),
        "application/json;charset=UTF-8"
    );
    assert_eq!(header(&headers, "cache-control"), "no-store");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let token = access_token(&body);

    // The access token is a JWT whose exp the client can read.
    let decoded = jsonwebtoken::dangerous::insecure_decode::<Value>(&token).expect("JWT");
    assert_eq!(decoded.claims["sub"], "managed-user-42");
    assert_eq!(decoded.claims["client_id"], DRILLSTER_CLIENT_ID);
    let exp = decoded.claims["exp"].as_i64().expect("exp");
    let iat = decoded.claims["iat"].as_i64().expect("iat");
    assert_eq!(exp - iat, 3600);
    assert!(decoded.claims["jti"].is_string());

    let recorded = drillster.last_request().expect("recorded");
    assert_eq!(recorded.header("accept"), Some("application/json"));
    assert_eq!(recorded.param("client_id"), Some(DRILLSTER_CLIENT_ID));
    assert_eq!(
        recorded.assertion_header().expect("jwt")["kid"],
        DEMO_KEY_ID
    );
    assert_eq!(
        recorded.assertion_claims().expect("jwt")["sub"],
        "managed-user-42"
    );
    assert_eq!(
        (
            drillster.requests(),
            drillster.successes(),
            drillster.failures()
        ),
        (1, 1, 0)
    );
    assert_eq!(sandbox.registry.issued_count(), 1);

    let (status, _, echo) = api_get(&sandbox.api, "/api/3/user?x=1", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    let echo: Echo = serde_json::from_value(echo).expect("echo");
    assert_eq!(echo.subject.as_deref(), Some("managed-user-42"));
    assert_eq!(echo.client_id.as_deref(), Some(DRILLSTER_CLIENT_ID));
    assert_eq!(echo.issuer.as_deref(), Some("drillster"));
    assert_eq!(echo.authorization_count, 1);
    assert_eq!(echo.path, "/api/3/user");
    assert_eq!(echo.query.as_deref(), Some("x=1"));
    assert_eq!(sandbox.api.accepted(), 1);

    sandbox.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn drillster_refuses_each_bad_assertion_with_its_own_reason() {
    let server = AuthServer::drillster().start().await.expect("server");
    let aud = server.token_endpoint();
    let with = |key: &str, value: Value| {
        let mut c = claims(&aud);
        c[key] = value;
        c
    };
    let hs256 = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(DEMO_KEY_ID.to_owned());
        jsonwebtoken::encode(&header, &claims(&aud), &EncodingKey::from_secret(b"guess"))
            .expect("sign")
    };
    let no_typ = {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(DEMO_KEY_ID.to_owned());
        header.typ = None;
        let key = EncodingKey::from_rsa_pem(DEMO_PRIVATE_PEM.as_bytes()).expect("key");
        jsonwebtoken::encode(&header, &claims(&aud), &key).expect("sign")
    };
    let mut no_sub = claims(&aud);
    no_sub.as_object_mut().map(|c| c.remove("sub"));

    let cases = [
        (
            "signed with another key under the demo kid",
            sign_with(&claims(&aud), DEMO_KEY_ID, OTHER_PRIVATE_PEM),
            AssertionRejection::BadSignature,
        ),
        (
            "unknown kid",
            sign_with(
                &claims(&aud),
                "0000000000000000000000000000dead",
                DEMO_PRIVATE_PEM,
            ),
            AssertionRejection::UnknownKid,
        ),
        (
            "aud with a trailing slash",
            sign(&with("aud", json!(format!("{aud}/")))),
            AssertionRejection::WrongAudience,
        ),
        (
            "aud is the issuer",
            sign(&with("aud", json!(server.issuer()))),
            AssertionRejection::WrongAudience,
        ),
        (
            "exp more than 1 h ahead",
            sign(&with("exp", json!(now() + 3600 + 60))),
            AssertionRejection::ExpiryTooFarAhead,
        ),
        (
            "expired",
            sign(&with("exp", json!(now() - 60))),
            AssertionRejection::Expired,
        ),
        (
            "iat in the future",
            sign(&with("iat", json!(now() + 600))),
            AssertionRejection::IssuedInFuture,
        ),
        (
            "iss is not the key's account",
            sign(&with("iss", json!("someone-else"))),
            AssertionRejection::WrongIssuer,
        ),
        ("no sub", sign(&no_sub), AssertionRejection::MissingSubject),
        ("HS256", hs256, AssertionRejection::UnsupportedAlgorithm),
        ("no typ", no_typ, AssertionRejection::WrongType),
        (
            "not a JWT",
            "not-a-jwt".to_owned(),
            AssertionRejection::Malformed,
        ),
    ];
    for (case, assertion, rejection) in &cases {
        let (status, headers, body) =
            drillster_request(&server, assertion, DRILLSTER_CLIENT_SECRET).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{case}: {body}");
        assert_eq!(body["error"], "invalid_grant", "{case}");
        assert_eq!(body["error_description"], rejection.to_string(), "{case}");
        assert_eq!(header(&headers, "cache-control"), "no-store", "{case}");
    }
    assert_eq!(server.successes(), 0);
    assert_eq!(server.failures(), cases.len() as u64);
    assert_eq!(server.registry().issued_count(), 0);
    server.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn drillster_bad_client_credentials_are_invalid_client() {
    let server = AuthServer::drillster()
        .client("app-1", "right")
        .start()
        .await
        .expect("server");
    let send = |id: &'static str, secret: &'static str| {
        let assertion = sign(&claims(&server.token_endpoint()));
        let url = server.token_endpoint();
        async move {
            let response = client()
                .post(url)
                .form(&[
                    ("grant_type", JWT_BEARER_GRANT),
                    ("client_id", id),
                    ("client_secret", secret),
                    ("assertion", assertion.as_str()),
                ])
                .send()
                .await
                .expect("request");
            split(response).await
        }
    };
    for (id, secret, description) in [
        ("app-1", "wrong", "bad client secret"),
        ("app-2", "right", "unknown client"),
    ] {
        let (status, headers, body) = send(id, secret).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"], "invalid_client");
        assert_eq!(body["error_description"], description);
        assert!(header(&headers, "www-authenticate").starts_with("Basic"));
    }
    let (status, _, body) = send("app-1", "right").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn drillster_refuses_a_reused_jti() {
    let server = AuthServer::drillster().start().await.expect("server");
    let assertion = sign(&claims(&server.token_endpoint()));
    let (status, _, body) = drillster_request(&server, &assertion, DRILLSTER_CLIENT_SECRET).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = drillster_request(&server, &assertion, DRILLSTER_CLIENT_SECRET).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(
        body["error_description"],
        AssertionRejection::ReusedJti.to_string()
    );
    // A fresh jti is fine; an assertion without jti is not tracked.
    let fresh = sign(&claims(&server.token_endpoint()));
    let (status, _, _) = drillster_request(&server, &fresh, DRILLSTER_CLIENT_SECRET).await;
    assert_eq!(status, StatusCode::OK);
    let mut no_jti = claims(&server.token_endpoint());
    no_jti.as_object_mut().map(|c| c.remove("jti"));
    let no_jti = sign(&no_jti);
    for _ in 0..2 {
        let (status, _, body) = drillster_request(&server, &no_jti, DRILLSTER_CLIENT_SECRET).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    server.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn drillster_accepts_client_secret_basic_but_not_two_methods() {
    let server = AuthServer::drillster().start().await.expect("server");
    let basic = basic_authorization(DRILLSTER_CLIENT_ID, DRILLSTER_CLIENT_SECRET);
    let post = |params: Vec<(&'static str, String)>| {
        client()
            .post(server.token_endpoint())
            .header(AUTHORIZATION, basic.clone())
            .form(&params)
            .send()
    };
    let assertion = sign(&claims(&server.token_endpoint()));
    let response = post(vec![
        ("grant_type", JWT_BEARER_GRANT.to_owned()),
        ("assertion", assertion),
    ])
    .await
    .expect("request");
    let (status, _, body) = split(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let response = post(vec![
        ("grant_type", JWT_BEARER_GRANT.to_owned()),
        ("client_secret", DRILLSTER_CLIENT_SECRET.to_owned()),
        ("assertion", sign(&claims(&server.token_endpoint()))),
    ])
    .await
    .expect("request");
    let (status, _, body) = split(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_request");
    server.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn malformed_token_requests_get_errors_not_panics() {
    let server = AuthServer::drillster().start().await.expect("server");
    let url = server.token_endpoint();

    let response = client().get(&url).send().await.expect("request");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(header(response.headers(), "allow"), "POST");

    let credentials =
        format!("client_id={DRILLSTER_CLIENT_ID}&client_secret={DRILLSTER_CLIENT_SECRET}");
    let bodies: [(&str, Vec<u8>, &str); 5] = [
        (
            "application/json",
            br#"{"grant_type":"x"}"#.to_vec(),
            "invalid_request",
        ),
        (
            "application/x-www-form-urlencoded",
            b"\xff\xfe%%%&&==".to_vec(),
            "invalid_client",
        ),
        (
            "application/x-www-form-urlencoded",
            b"grant_type=a&grant_type=b".to_vec(),
            "invalid_request",
        ),
        (
            "application/x-www-form-urlencoded",
            format!("{credentials}&grant_type=client_credentials").into_bytes(),
            "unsupported_grant_type",
        ),
        (
            "application/x-www-form-urlencoded",
            format!("{credentials}&grant_type={JWT_BEARER_GRANT}").into_bytes(),
            "invalid_request",
        ),
    ];
    for (content_type, body, error) in bodies {
        let response = client()
            .post(&url)
            .header(CONTENT_TYPE, content_type)
            .body(body.clone())
            .send()
            .await
            .expect("request");
        let (status, _, json) = split(response).await;
        assert!(status.is_client_error(), "{status} {json}");
        assert_eq!(json["error"], error, "{}", String::from_utf8_lossy(&body));
    }

    let response = client()
        .get(server.issuer() + "/nope")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(server.panics(), 0);
    server.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn discovery_metadata_names_issuer_and_token_endpoint() {
    let server = AuthServer::drillster().start().await.expect("server");
    for path in [
        "/.well-known/oauth-authorization-server",
        "/.well-known/openid-configuration",
    ] {
        let response = client()
            .get(format!("{}{path}", server.issuer()))
            .send()
            .await
            .expect("request");
        let (status, _, body) = split(response).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["issuer"], server.issuer());
        assert_eq!(body["token_endpoint"], server.token_endpoint());
        assert_eq!(body["grant_types_supported"], json!([JWT_BEARER_GRANT]));
    }
    assert_eq!(
        server.metadata_url(),
        format!("{}/.well-known/oauth-authorization-server", server.issuer())
    );
    // Discovery faults are separate from token endpoint faults.
    server
        .discovery_faults()
        .fail_with(StatusCode::INTERNAL_SERVER_ERROR);
    let response = client()
        .get(server.metadata_url())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let (status, _, _) = drillster_request(
        &server,
        &sign(&claims(&server.token_endpoint())),
        DRILLSTER_CLIENT_SECRET,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.discovery_requests(), 3);
    server.shutdown().await.expect("no handler panics");
}

// ---------------------------------------------------------------------------------------------
// Driftrock-like server (Driftrock: Client credentials, RFC 6749 §4.4, §2.3.1)

#[tokio::test]
async fn driftrock_form_encoded_basic_credentials_succeed() {
    let sandbox = Sandbox::start().await.expect("sandbox");
    let driftrock = &sandbox.driftrock;
    let authorization = basic_authorization(DRIFTROCK_CLIENT_ID, DRIFTROCK_CLIENT_SECRET);
    assert_eq!(
        authorization,
        format!(
            "Basic {}",
            STANDARD.encode("dr%2Fclient+7:s3cr%2Bt%2F%2541%3Ay%3Dz")
        )
    );
    let (status, headers, body) = driftrock_request(
        driftrock,
        &authorization,
        &[
            ("scope", "events:write"),
            ("audience", "https://api"),
            ("resource", "https://r/v2"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        header(&headers, "content-type"),
        "application/json;charset=UTF-8"
    );
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "events:write");
    let recorded = driftrock.last_request().expect("recorded");
    assert_eq!(recorded.param("scope"), Some("events:write"));
    assert_eq!(recorded.param("audience"), Some("https://api"));
    assert_eq!(recorded.param("resource"), Some("https://r/v2"));
    assert_eq!(recorded.path, "/oauth2/token");

    let token = access_token(&body);
    let issued = sandbox.registry.get(&token).expect("recorded token");
    assert_eq!(issued.scope.as_deref(), Some("events:write"));
    let (status, _, echo) = api_get(&sandbox.api, "/v2/event", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo["subject"], DRIFTROCK_CLIENT_ID);
    assert_eq!(echo["issuer"], "driftrock");
    sandbox.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn driftrock_basic_decoding_modes() {
    let form = basic_authorization(DRIFTROCK_CLIENT_ID, DRIFTROCK_CLIENT_SECRET);
    let raw = basic_authorization_raw(DRIFTROCK_CLIENT_ID, DRIFTROCK_CLIENT_SECRET);

    let server = AuthServer::driftrock().start().await.expect("server");
    let (status, headers, body) = driftrock_request(&server, &raw, &[]).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "raw credentials in Form mode: {body}"
    );
    assert_eq!(body["error"], "invalid_client");
    assert!(header(&headers, "www-authenticate").starts_with("Basic realm="));

    server.set_basic_decoding(BasicDecoding::Raw);
    let (status, _, body) = driftrock_request(&server, &raw, &[]).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "raw credentials in Raw mode: {body}"
    );
    let (status, _, _) = driftrock_request(&server, &form, &[]).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "form credentials in Raw mode"
    );
    server.shutdown().await.expect("no handler panics");

    let server = AuthServer::driftrock()
        .basic_decoding(BasicDecoding::Raw)
        .start()
        .await
        .expect("server");
    let (status, _, _) = driftrock_request(&server, &raw, &[]).await;
    assert_eq!(status, StatusCode::OK);
    server.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn driftrock_refusals() {
    let server = AuthServer::driftrock().start().await.expect("server");
    let wrong = basic_authorization(DRIFTROCK_CLIENT_ID, "nope");
    let (status, headers, body) = driftrock_request(&server, &wrong, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_description"], "bad client secret");
    assert!(header(&headers, "www-authenticate").starts_with("Basic"));

    let right = basic_authorization(DRIFTROCK_CLIENT_ID, DRIFTROCK_CLIENT_SECRET);
    let response = client()
        .post(server.token_endpoint())
        .header(AUTHORIZATION, &right)
        .form(&[("grant_type", "password")])
        .send()
        .await
        .expect("request");
    let (status, _, body) = split(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "unsupported_grant_type");

    let response = client()
        .post(server.token_endpoint())
        .header(AUTHORIZATION, "Basic !!!not base64")
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // client_secret_post is off by default ("Driftrock: Client credentials" asks for Basic) …
    let post = [
        ("grant_type", "client_credentials"),
        ("client_id", DRIFTROCK_CLIENT_ID),
        ("client_secret", DRIFTROCK_CLIENT_SECRET),
    ];
    let response = client()
        .post(server.token_endpoint())
        .form(&post)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!((server.successes(), server.failures()), (0, 4));
    server.shutdown().await.expect("no handler panics");

    // … and works when enabled.
    let server = AuthServer::driftrock()
        .client_secret_post(true)
        .start()
        .await
        .expect("server");
    let response = client()
        .post(server.token_endpoint())
        .form(&post)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    server.shutdown().await.expect("no handler panics");
}

// ---------------------------------------------------------------------------------------------
// echo API (RFC 6750)

#[tokio::test]
async fn api_refuses_missing_unknown_duplicate_expired_and_revoked_tokens() {
    let sandbox = Sandbox::start().await.expect("sandbox");
    let api = &sandbox.api;
    let authorization = basic_authorization(DRIFTROCK_CLIENT_ID, DRIFTROCK_CLIENT_SECRET);
    let (_, _, body) = driftrock_request(&sandbox.driftrock, &authorization, &[]).await;
    let token = access_token(&body);

    let check_401 = |(status, headers, body): (StatusCode, http::HeaderMap, Value), why: &str| {
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{why}");
        assert!(
            header(&headers, "www-authenticate").starts_with("Bearer error=\"invalid_token\""),
            "{why}"
        );
        assert_eq!(body["error"], "invalid_token", "{why}");
        assert_eq!(body["error_description"], why);
    };
    check_401(api_get(api, "/v2/x", None).await, "no Authorization header");
    check_401(
        api_get(api, "/v2/x", Some("made-up")).await,
        "unknown token",
    );

    let response = client()
        .get(api.url("/v2/x"))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .send()
        .await
        .expect("request");
    check_401(split(response).await, "more than one Authorization header");
    assert_eq!(api.last_echo().expect("recorded").authorization_count, 2);

    let response = client()
        .get(api.url("/v2/x"))
        .header(AUTHORIZATION, format!("Token {token}"))
        .send()
        .await
        .expect("request");
    check_401(split(response).await, "Authorization is not a Bearer token");

    let (status, _, _) = api_get(api, "/v2/x", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(sandbox.registry.revoke(&token));
    check_401(api_get(api, "/v2/x", Some(&token)).await, "token revoked");
    assert_eq!((api.accepted(), api.rejected()), (1, 5));

    // revoke_all: a not-yet-expired token is refused, a new one works.
    let (_, _, body) = driftrock_request(&sandbox.driftrock, &authorization, &[]).await;
    let second = access_token(&body);
    assert_eq!(sandbox.registry.revoke_all(), 1);
    check_401(api_get(api, "/v2/x", Some(&second)).await, "token revoked");
    let (_, _, body) = driftrock_request(&sandbox.driftrock, &authorization, &[]).await;
    let (status, _, _) = api_get(api, "/v2/x", Some(&access_token(&body))).await;
    assert_eq!(status, StatusCode::OK);
    sandbox.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn api_refuses_expired_tokens() {
    let registry = TokenRegistry::new();
    let server = AuthServer::driftrock()
        .registry(registry.clone())
        .token_lifetime(Duration::ZERO)
        .start()
        .await
        .expect("server");
    let api = SandboxApi::start(registry).await.expect("api");
    let authorization = basic_authorization(DRIFTROCK_CLIENT_ID, DRIFTROCK_CLIENT_SECRET);
    let (status, _, body) = driftrock_request(&server, &authorization, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["expires_in"], 0);
    let (status, _, body) = api_get(&api, "/", Some(&access_token(&body))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error_description"], "token expired");
    server.shutdown().await.expect("no handler panics");
    api.shutdown().await.expect("no handler panics");
}

#[tokio::test]
async fn api_echoes_path_query_headers_and_body_exactly() {
    let sandbox = Sandbox::start().await.expect("sandbox");
    let authorization = basic_authorization(DRIFTROCK_CLIENT_ID, DRIFTROCK_CLIENT_SECRET);
    let (_, _, body) = driftrock_request(&sandbox.driftrock, &authorization, &[]).await;
    let token = access_token(&body);

    let payload: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
    let digest: String = Sha256::digest(&payload)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let response = client()
        .patch(sandbox.api.url("/v2/a%2Fb//c;p=1?q=%20+x&a=1&a=2"))
        .bearer_auth(&token)
        .header("x-dup", "one")
        .header("x-other", "between")
        .header("x-dup", "two")
        .body(payload.clone())
        .send()
        .await
        .expect("request");
    let (status, _, body) = split(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let echo: Echo = serde_json::from_value(body).expect("echo");
    assert_eq!(echo.method, "PATCH");
    assert_eq!(echo.path, "/v2/a%2Fb//c;p=1");
    assert_eq!(echo.query.as_deref(), Some("q=%20+x&a=1&a=2"));
    assert_eq!(echo.version, "HTTP/1.1");
    assert_eq!(echo.header_values("x-dup"), ["one", "two"]);
    assert_eq!(echo.header("x-other"), Some("between"));
    assert_eq!(
        echo.header("authorization"),
        Some(format!("Bearer {token}").as_str())
    );
    assert_eq!(echo.body_len, payload.len() as u64);
    assert_eq!(echo.body_sha256, digest);
    assert_eq!(sandbox.api.last_echo().as_ref(), Some(&echo));

    let (_, _, body) = api_get(&sandbox.api, "/plain", Some(&token)).await;
    assert_eq!(body["query"], Value::Null);
    assert_eq!(body["body_len"], 0);
    assert_eq!(sandbox.api.recent().len(), 2);
    sandbox.shutdown().await.expect("no handler panics");
}

mod faults;
