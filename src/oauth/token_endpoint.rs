//! The token endpoint client: one per route. Builds the grant's token request, sends it with
//! reqwest (connect and total timeouts, `Accept: application/json`, `Accept-Encoding: gzip,
//! deflate, br`, no redirects), decodes the answer's content coding and classifies it. Also
//! RFC 8414 discovery when the route names an `issuer` instead of a `token_endpoint`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{
    HeaderMap, ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER,
};
use tokio::sync::OnceCell;
use url::Url;

use super::content_coding;
use super::token_response::{echoed_forms, parse_token_body, AccessToken, TokenResponseError};
use super::{client_credentials, jwt_bearer};
use crate::config::{AuthConfig, ClientAuth, Grant, TokenEndpointLocation};

/// Total time one token fetch may take by default (`routes.auth.token_timeout`), connect and
/// discovery included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest token response or metadata body read, before and after decoding its content coding;
/// a token response is a few KiB at most.
const MAX_BODY: usize = 1024 * 1024;

/// Longest `issuer` value of a metadata document shown in a discovery error.
const SHOWN_ISSUER: usize = 200;

/// The `outcome` label of `tokengate_token_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FetchOutcome {
    /// A usable access token.
    Success,
    /// A non-2xx status without an RFC 6749 §5.2 error object (e.g. 502 with an HTML page).
    HttpError,
    /// An RFC 6749 §5.2 error object, whatever the status (including 200).
    OAuthError,
    /// Connect failure, timeout, reset, TLS failure.
    NetworkError,
    /// 2xx but unusable: not JSON, no `access_token`, unsupported `token_type`.
    InvalidResponse,
}

impl FetchOutcome {
    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            FetchOutcome::Success => "success",
            FetchOutcome::HttpError => "http_error",
            FetchOutcome::OAuthError => "oauth_error",
            FetchOutcome::NetworkError => "network_error",
            FetchOutcome::InvalidResponse => "invalid_response",
        }
    }

    /// Every label value, for pre-registering metrics.
    pub const ALL: [FetchOutcome; 5] = [
        FetchOutcome::Success,
        FetchOutcome::HttpError,
        FetchOutcome::OAuthError,
        FetchOutcome::NetworkError,
        FetchOutcome::InvalidResponse,
    ];
}

/// A failed token request. `message` is safe to log: it carries the status, the server's
/// `error`/`error_description`, never a secret, an assertion or a token.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    /// How it failed (metric label).
    pub outcome: FetchOutcome,
    /// Human-readable, secret-free description.
    pub message: String,
    /// `Retry-After` from a 429 or 503 answer.
    pub retry_after: Option<Duration>,
}

impl FetchError {
    fn new(outcome: FetchOutcome, message: impl Into<String>) -> Self {
        FetchError {
            outcome,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Error building the HTTP client (bad `ca_file` content).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientBuildError(String);

/// Form parameters of a token request, and the `Authorization: Basic` value when the client
/// authenticates with `client_secret_basic`.
type RequestParts = (Vec<(&'static str, String)>, Option<String>);

/// Token endpoint client for one route (one credential identity's grant settings).
pub struct TokenClient {
    http: reqwest::Client,
    /// Shared with the clients [`TokenClient::for_subject`] makes (one copy of the key and
    /// secrets per route, however many subjects).
    auth: Arc<AuthConfig>,
    /// Overrides the assertion subject (the `token` command's `--subject`).
    subject: Option<String>,
    /// The token endpoint, given or discovered once; shared with [`TokenClient::for_subject`]'s
    /// clients.
    endpoint: Arc<OnceCell<Url>>,
    /// Bounds one whole [`TokenClient::fetch`], discovery included.
    request_timeout: Duration,
    /// The spellings of the client credentials a token endpoint's error might echo, never
    /// shown ([`echoed_forms`]); built once, as the credentials are fixed.
    echoes: Arc<[String]>,
}

impl TokenClient {
    /// Builds the client. `ca_pem`: extra trust roots (the route's `ca_file` content), added to
    /// the system roots. Timeouts: `connect_timeout` for connecting, `request_timeout` for each
    /// HTTP request and for one whole [`fetch`](Self::fetch) (discovery and token request
    /// together).
    pub fn new(
        auth: AuthConfig,
        ca_pem: Option<&[u8]>,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, ClientBuildError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, "application/json".parse().expect("static header"));
        headers.insert(
            ACCEPT_ENCODING,
            content_coding::ACCEPT_ENCODING
                .parse()
                .expect("static header"),
        );
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("tokengate/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .timeout(request_timeout);
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClientBuildError(format!("ca_file: {e}")))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ClientBuildError(format!("HTTP client: {e}")))?;
        let endpoint = OnceCell::new();
        if let TokenEndpointLocation::Url(url) = &auth.endpoint {
            let _ = endpoint.set(url.clone());
        }
        let mut echoes = Vec::new();
        if let Some(secret) = &auth.client_secret {
            echoes.extend(echoed_forms(secret.expose()));
            echoes.extend(echoed_forms(&format!(
                "{}:{}",
                auth.client_id,
                secret.expose()
            )));
            if let ClientAuth::Basic(encoding) = auth.client_auth {
                let basic =
                    client_credentials::basic_authorization(&auth.client_id, secret, encoding);
                echoes.push(basic.trim_start_matches("Basic ").to_string());
                echoes.push(basic);
            }
        }
        Ok(TokenClient {
            http,
            auth: Arc::new(auth),
            subject: None,
            endpoint: Arc::new(endpoint),
            request_timeout,
            echoes: echoes.into(),
        })
    }

    /// Requests tokens for `subject` instead of the configured one (JWT bearer grant only).
    pub fn with_subject(mut self, subject: Option<String>) -> Self {
        self.subject = subject;
        self
    }

    /// A client for the same route that requests tokens for `subject` (RFC 7523 §3 `sub`: a
    /// user the organisation manages, "Drillster: Service accounts"), sharing this client's
    /// HTTP connections, settings and key, and token endpoint (discovered once for all).
    pub fn for_subject(&self, subject: &str) -> Self {
        TokenClient {
            http: self.http.clone(),
            auth: Arc::clone(&self.auth),
            subject: Some(subject.to_string()),
            endpoint: Arc::clone(&self.endpoint),
            request_timeout: self.request_timeout,
            echoes: Arc::clone(&self.echoes),
        }
    }

    /// The grant settings this client uses.
    pub fn auth(&self) -> &AuthConfig {
        &self.auth
    }

    /// The token endpoint URL: configured, or discovered once (RFC 8414) and then cached.
    /// Discovery takes at most the request timeout.
    ///
    /// # Errors
    /// [`FetchError`] naming every metadata URL tried and why each failed.
    pub async fn token_endpoint(&self) -> Result<&Url, FetchError> {
        self.token_endpoint_by(tokio::time::Instant::now() + self.request_timeout)
            .await
    }

    async fn token_endpoint_by(&self, deadline: tokio::time::Instant) -> Result<&Url, FetchError> {
        self.endpoint
            .get_or_try_init(|| async {
                match &self.auth.endpoint {
                    TokenEndpointLocation::Url(url) => Ok(url.clone()),
                    TokenEndpointLocation::Issuer(issuer) => self.discover(issuer, deadline).await,
                }
            })
            .await
    }

    /// Obtains one access token. `now` is the wall clock used for the assertion (injectable, so
    /// tests can run the gateway's clock ahead of or behind the server's). The returned lifetime
    /// counts from when the response arrived.
    ///
    /// The whole fetch, discovery included, ends after the request timeout with a
    /// [`FetchOutcome::NetworkError`].
    pub async fn fetch(&self, now: SystemTime) -> Result<AccessToken, FetchError> {
        self.fetch_identified(now).await.map(|(token, _)| token)
    }

    /// [`TokenClient::fetch`], also returning the `jti` of the assertion the token was obtained
    /// with (RFC 7519 §4.1.7; `None` for the client credentials grant), for the audit log.
    /// The `jti` identifies the assertion, it is no secret.
    ///
    /// # Errors
    /// As [`TokenClient::fetch`].
    pub async fn fetch_identified(
        &self,
        now: SystemTime,
    ) -> Result<(AccessToken, Option<String>), FetchError> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let endpoint = self.token_endpoint_by(deadline).await?.clone();
        match tokio::time::timeout_at(deadline, self.request_token(endpoint, now)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::new(
                FetchOutcome::NetworkError,
                format!(
                    "token endpoint timed out: no answer within {}",
                    humantime::format_duration(self.request_timeout)
                ),
            )),
        }
    }

    async fn request_token(
        &self,
        endpoint: Url,
        now: SystemTime,
    ) -> Result<(AccessToken, Option<String>), FetchError> {
        let (mut form, basic) = self.request_parts(endpoint.as_str(), now)?;
        let jti = form
            .iter()
            .find(|(k, _)| *k == "assertion")
            .and_then(|(_, a)| jwt_bearer::assertion_id(a));
        if basic.is_none() {
            // client_secret_post (RFC 6749 §2.3.1), or a public client sending only its id.
            form.push(("client_id", self.auth.client_id.clone()));
            if let Some(secret) = &self.auth.client_secret {
                form.push(("client_secret", secret.expose().to_string()));
            }
        }
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
            .finish();
        let mut req = self
            .http
            .post(endpoint)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        if let Some(basic) = basic {
            req = req.header(AUTHORIZATION, basic);
        }
        let resp = req.send().await.map_err(network_error)?;
        let status = resp.status();
        let retry_after = matches!(status.as_u16(), 429 | 503)
            .then(|| parse_retry_after(resp.headers()))
            .flatten();
        let content_type = header_text(resp.headers(), CONTENT_TYPE);
        let bytes = read_body(resp).await?.map_err(|e| {
            let outcome = if status.is_success() {
                FetchOutcome::InvalidResponse
            } else {
                FetchOutcome::HttpError
            };
            FetchError {
                outcome,
                message: format!("token endpoint answered HTTP {status}: {e}"),
                retry_after,
            }
        })?;
        // An error may echo what was sent: the credentials or this request's assertion.
        let secrets: Vec<&str> = self
            .echoes
            .iter()
            .map(String::as_str)
            .chain(
                form.iter()
                    .filter(|(k, _)| *k == "assertion")
                    .map(|(_, v)| v.as_str()),
            )
            .collect();
        let parsed = parse_token_body(
            &bytes,
            content_type.as_deref(),
            SystemTime::now(),
            self.auth.default_token_lifetime,
            &secrets,
        );
        match parsed {
            Ok(token) if status.is_success() => Ok((token, jti)),
            Ok(_) => Err(FetchError {
                outcome: FetchOutcome::HttpError,
                message: format!("token endpoint answered HTTP {status} with a token body"),
                retry_after,
            }),
            Err(e @ TokenResponseError::OAuth { .. }) => Err(FetchError {
                outcome: FetchOutcome::OAuthError,
                message: format!("HTTP {}: {e}", status.as_u16()),
                retry_after,
            }),
            Err(e) if !status.is_success() => Err(FetchError {
                outcome: FetchOutcome::HttpError,
                message: format!("token endpoint answered HTTP {status}: {e}"),
                retry_after,
            }),
            Err(e) => Err(FetchError::new(
                FetchOutcome::InvalidResponse,
                format!("HTTP {}: {e}", status.as_u16()),
            )),
        }
    }

    /// The grant's form parameters and, for `client_secret_basic`, the `Authorization` value.
    fn request_parts(&self, endpoint: &str, now: SystemTime) -> Result<RequestParts, FetchError> {
        let auth = &self.auth;
        let form = match &auth.grant {
            Grant::JwtBearer {
                key,
                subject,
                assertion_lifetime,
                ..
            } => {
                let subject = self.subject.as_deref().unwrap_or(subject);
                let audience = auth.audience.as_deref().unwrap_or(endpoint);
                let assertion = jwt_bearer::build_assertion(
                    key,
                    subject,
                    audience,
                    *assertion_lifetime,
                    now,
                )
                .map_err(|e| FetchError::new(FetchOutcome::InvalidResponse, e.to_string()))?;
                jwt_bearer::form_params(assertion, auth.scope.as_deref())
            }
            Grant::ClientCredentials { resource } => client_credentials::form_params(
                auth.scope.as_deref(),
                auth.audience.as_deref(),
                resource.as_deref(),
            ),
        };
        let basic = match (auth.client_auth, &auth.client_secret) {
            (ClientAuth::Basic(encoding), Some(secret)) => Some(
                client_credentials::basic_authorization(&auth.client_id, secret, encoding),
            ),
            _ => None,
        };
        Ok((form, basic))
    }

    /// RFC 8414 §3 discovery, falling back to OpenID Connect Discovery 1.0 §4. The document's
    /// `issuer` must equal the configured issuer (RFC 8414 §3.3). Each metadata URL gets an
    /// equal share of the time left before `deadline` (the first half, the second the rest),
    /// so a URL that never answers still leaves time to try the next.
    ///
    /// # Errors
    /// One [`FetchError`] listing every URL tried and why each failed (not found, not JSON,
    /// an `issuer` mismatch with both values, a timeout, …); its outcome is the last one's.
    async fn discover(
        &self,
        issuer: &Url,
        deadline: tokio::time::Instant,
    ) -> Result<Url, FetchError> {
        let urls = discovery_urls(issuer);
        let mut tried = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let remaining = u32::try_from(urls.len() - i).unwrap_or(1);
            let share = left / remaining;
            match tokio::time::timeout(share, self.discovery_document(url, issuer)).await {
                Ok(Ok(endpoint)) => return Ok(endpoint),
                Ok(Err(failure)) => tried.push((url, failure)),
                Err(_) => {
                    // To the nearest millisecond: "500ms", not "499ms 999us 800ns".
                    let shown = Duration::from_millis(((share.as_micros() + 500) / 1000) as u64);
                    let why = format!("timed out after {}", humantime::format_duration(shown));
                    tried.push((url, (FetchOutcome::NetworkError, why)));
                }
            }
        }
        let outcome = tried
            .last()
            .map_or(FetchOutcome::InvalidResponse, |(_, (o, _))| *o);
        let list: Vec<String> = tried
            .iter()
            .map(|(url, (_, why))| format!("{url}: {why}"))
            .collect();
        Err(FetchError::new(
            outcome,
            format!(
                "discovery found no usable metadata for issuer {}; tried {}",
                issuer.as_str().trim_end_matches('/'),
                list.join("; ")
            ),
        ))
    }

    /// One metadata document: the token endpoint it names, or the outcome and why not.
    async fn discovery_document(
        &self,
        url: &Url,
        issuer: &Url,
    ) -> Result<Url, (FetchOutcome, String)> {
        let resp = self.http.get(url.clone()).send().await.map_err(|e| {
            (
                FetchOutcome::NetworkError,
                network_reason(&e)
                    .trim_start_matches("token endpoint ")
                    .to_string(),
            )
        })?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err((FetchOutcome::HttpError, "not found (HTTP 404)".to_string()));
        }
        if !status.is_success() {
            return Err((FetchOutcome::HttpError, format!("HTTP {status}")));
        }
        let bytes = match read_body(resp).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => return Err((FetchOutcome::InvalidResponse, e.to_string())),
            Err(e) => return Err((e.outcome, e.message)),
        };
        let doc: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|_| (FetchOutcome::InvalidResponse, "not JSON".to_string()))?;
        let configured = issuer.as_str().trim_end_matches('/');
        let doc_issuer = match doc.get("issuer") {
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(_) | None => {
                return Err((
                    FetchOutcome::InvalidResponse,
                    format!("no \"issuer\" string; the configured issuer is {configured:?}"),
                ))
            }
        };
        if doc_issuer.trim_end_matches('/') != configured {
            let shown: String = doc_issuer.chars().take(SHOWN_ISSUER).collect();
            return Err((
                FetchOutcome::InvalidResponse,
                format!(
                    "issuer {shown:?} does not match the configured issuer {configured:?} \
                     (RFC 8414 §3.3)"
                ),
            ));
        }
        doc.get("token_endpoint")
            .and_then(|v| v.as_str())
            .and_then(|s| Url::parse(s).ok())
            .filter(|u| matches!(u.scheme(), "https" | "http"))
            .ok_or_else(|| {
                (
                    FetchOutcome::InvalidResponse,
                    "no usable token_endpoint".to_string(),
                )
            })
    }
}

/// `https://h/p` → `https://h/.well-known/oauth-authorization-server/p` (RFC 8414 §3.1), then
/// `https://h/p/.well-known/openid-configuration` (OpenID Connect Discovery §4.1).
fn discovery_urls(issuer: &Url) -> Vec<Url> {
    let path = issuer.path().trim_end_matches('/');
    let mut urls = Vec::with_capacity(2);
    let mut rfc8414 = issuer.clone();
    rfc8414.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    rfc8414.set_query(None);
    urls.push(rfc8414);
    let mut oidc = issuer.clone();
    oidc.set_path(&format!("{path}/.well-known/openid-configuration"));
    oidc.set_query(None);
    urls.push(oidc);
    urls
}

fn network_error(e: reqwest::Error) -> FetchError {
    FetchError::new(FetchOutcome::NetworkError, network_reason(&e))
}

fn network_reason(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connect failed"
    } else {
        "request failed"
    };
    // reqwest's Display includes the URL (no credentials: those are in headers/body) and the
    // source chain; it never contains the request body.
    let mut msg = format!("token endpoint {kind}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// A response header as text (`None` when absent or not visible ASCII).
fn header_text(headers: &HeaderMap, name: reqwest::header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Reads a response body of at most [`MAX_BODY`] bytes and undoes its content coding (also to
/// at most [`MAX_BODY`] bytes). The outer error is a network failure or an oversized body,
/// the inner one a coding that cannot be decoded.
async fn read_body(
    mut resp: reqwest::Response,
) -> Result<Result<Vec<u8>, content_coding::DecodeError>, FetchError> {
    let coding = header_text(resp.headers(), CONTENT_ENCODING);
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(network_error)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(FetchError::new(
                FetchOutcome::InvalidResponse,
                format!("response larger than {MAX_BODY} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(content_coding::decode(body, coding.as_deref(), MAX_BODY))
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(24 * 3600)));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(24 * 3600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_urls_follow_rfc8414_then_oidc() {
        let u = discovery_urls(&Url::parse("https://as.example/tenant1").unwrap());
        assert_eq!(
            u[0].as_str(),
            "https://as.example/.well-known/oauth-authorization-server/tenant1"
        );
        assert_eq!(
            u[1].as_str(),
            "https://as.example/tenant1/.well-known/openid-configuration"
        );
        let u = discovery_urls(&Url::parse("https://as.example").unwrap());
        assert_eq!(
            u[0].as_str(),
            "https://as.example/.well-known/oauth-authorization-server"
        );
        assert_eq!(
            u[1].as_str(),
            "https://as.example/.well-known/openid-configuration"
        );
    }

    #[test]
    fn retry_after_seconds_and_date() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "30".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(30)));
        let later = SystemTime::now() + Duration::from_secs(120);
        h.insert(RETRY_AFTER, httpdate::fmt_http_date(later).parse().unwrap());
        let d = parse_retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), None);
    }
}
