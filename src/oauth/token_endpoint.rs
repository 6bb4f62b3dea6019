//! The token endpoint client: one per route. Builds the grant's token request, sends it with
//! reqwest (connect and total timeouts, `Accept: application/json`, no redirects) and classifies
//! the answer. Also RFC 8414 discovery when the route names an `issuer` instead of a
//! `token_endpoint`.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, RETRY_AFTER};
use tokio::sync::OnceCell;
use url::Url;

use super::token_response::{echoed_forms, parse_token_response, AccessToken, TokenResponseError};
use super::{client_credentials, jwt_bearer};
use crate::config::{AuthConfig, ClientAuth, Grant, TokenEndpointLocation};

/// Total time one token fetch may take by default (`routes.auth.token_timeout`), connect and
/// discovery included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest token response body read; a token response is a few KiB at most.
const MAX_BODY: usize = 1024 * 1024;

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
    auth: AuthConfig,
    /// Overrides the assertion subject (the `token` command's `--subject`).
    subject: Option<String>,
    endpoint: OnceCell<Url>,
    /// Bounds one whole [`TokenClient::fetch`], discovery included.
    request_timeout: Duration,
    /// The spellings of the client credentials a token endpoint's error might echo, never
    /// shown ([`echoed_forms`]); built once, as the credentials are fixed.
    echoes: Vec<String>,
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
            auth,
            subject: None,
            endpoint,
            request_timeout,
            echoes,
        })
    }

    /// Requests tokens for `subject` instead of the configured one (JWT bearer grant only).
    pub fn with_subject(mut self, subject: Option<String>) -> Self {
        self.subject = subject;
        self
    }

    /// The grant settings this client uses.
    pub fn auth(&self) -> &AuthConfig {
        &self.auth
    }

    /// The token endpoint URL: configured, or discovered once (RFC 8414) and then cached.
    pub async fn token_endpoint(&self) -> Result<&Url, FetchError> {
        self.endpoint
            .get_or_try_init(|| async {
                match &self.auth.endpoint {
                    TokenEndpointLocation::Url(url) => Ok(url.clone()),
                    TokenEndpointLocation::Issuer(issuer) => self.discover(issuer).await,
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
        match tokio::time::timeout(self.request_timeout, self.fetch_once(now)).await {
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

    async fn fetch_once(&self, now: SystemTime) -> Result<AccessToken, FetchError> {
        let endpoint = self.token_endpoint().await?.clone();
        let (mut form, basic) = self.request_parts(endpoint.as_str(), now)?;
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
        let bytes = read_limited(resp).await?;
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
        let parsed = parse_token_response(
            &bytes,
            SystemTime::now(),
            self.auth.default_token_lifetime,
            &secrets,
        );
        match parsed {
            Ok(token) if status.is_success() => Ok(token),
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
    /// `issuer` must equal the configured issuer (RFC 8414 §3.3).
    async fn discover(&self, issuer: &Url) -> Result<Url, FetchError> {
        let mut last = None;
        for url in discovery_urls(issuer) {
            match self.discovery_document(&url, issuer).await {
                Ok(endpoint) => return Ok(endpoint),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            FetchError::new(FetchOutcome::InvalidResponse, "discovery: no document URL")
        }))
    }

    async fn discovery_document(&self, url: &Url, issuer: &Url) -> Result<Url, FetchError> {
        let resp = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(network_error)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(FetchError::new(
                FetchOutcome::HttpError,
                format!("discovery {url}: HTTP {status}"),
            ));
        }
        let bytes = read_limited(resp).await?;
        let doc: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| {
            FetchError::new(
                FetchOutcome::InvalidResponse,
                format!("discovery {url}: not JSON"),
            )
        })?;
        let doc_issuer = doc.get("issuer").and_then(|v| v.as_str()).unwrap_or("");
        if doc_issuer.trim_end_matches('/') != issuer.as_str().trim_end_matches('/') {
            return Err(FetchError::new(
                FetchOutcome::InvalidResponse,
                format!(
                    "discovery {url}: issuer {doc_issuer:?} does not match the configured issuer"
                ),
            ));
        }
        doc.get("token_endpoint")
            .and_then(|v| v.as_str())
            .and_then(|s| Url::parse(s).ok())
            .filter(|u| matches!(u.scheme(), "https" | "http"))
            .ok_or_else(|| {
                FetchError::new(
                    FetchOutcome::InvalidResponse,
                    format!("discovery {url}: no usable token_endpoint"),
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
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    FetchError::new(FetchOutcome::NetworkError, msg)
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(network_error)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(FetchError::new(
                FetchOutcome::InvalidResponse,
                format!("token endpoint response larger than {MAX_BODY} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
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
