//! The access tokens the sandbox authorization servers have issued, shared with the echo API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::SandboxError;

/// Above this many entries, `issue` drops the expired ones (keeps long load runs bounded).
const PRUNE_ABOVE: usize = 10_000;

/// Every access token issued by the sandbox authorization servers, and whether it is still good.
///
/// The real Drillster and Driftrock APIs accept a bearer token only while it is unexpired and not
/// revoked (RFC 6750 §3.1 `invalid_token`); the echo API asks this registry. Tokens are HS256 JWTs
/// signed with a random per-registry secret and carry `iss`, `sub`, `client_id`, `iat`, `exp`,
/// `jti` (and `scope` when one was requested), so clients can read `exp` as they would from
/// Driftrock's "JWT Access Tokens" (Driftrock: Client credentials).
///
/// Cheap to clone: clones share one registry.
#[derive(Clone)]
pub struct TokenRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    key: EncodingKey,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    issued: AtomicU64,
    /// [`TokenRegistry::set_revoke_previous`].
    revoke_previous: AtomicBool,
    /// Tokens revoked because a newer one superseded them.
    revoked_by_policy: AtomicU64,
}

/// What the registry knows about one issued access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The `sub` the token was issued for (the assertion's `sub`, or the client id for the
    /// client credentials grant).
    pub subject: String,
    /// The client application that requested it.
    pub client_id: String,
    /// The name of the issuing sandbox server (`"drillster"`, `"driftrock"`, or a custom name).
    pub issuer: String,
    /// The `scope` request parameter, if any.
    pub scope: Option<String>,
    /// `iat` of the token, seconds since the Unix epoch.
    pub issued_at: u64,
    /// `exp` of the token, seconds since the Unix epoch; the token is accepted while now < `exp`.
    pub expires_at: u64,
    /// Set by [`TokenRegistry::revoke`] / [`TokenRegistry::revoke_all`].
    pub revoked: bool,
}

/// Why the registry refuses a bearer token (the `error_description` of the API's 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    /// Never issued by this registry (or pruned long after it expired).
    #[error("unknown token")]
    Unknown,
    /// Past its `exp`.
    #[error("token expired")]
    Expired,
    /// Revoked before its `exp`.
    #[error("token revoked")]
    Revoked,
}

/// What a sandbox authorization server asks the registry to issue.
#[derive(Debug, Clone)]
pub(crate) struct TokenRequest<'a> {
    pub subject: &'a str,
    pub client_id: &'a str,
    pub issuer: &'a str,
    pub issuer_url: &'a str,
    pub scope: Option<&'a str>,
    pub lifetime: Duration,
}

#[derive(Serialize)]
struct AccessTokenClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    client_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    iat: u64,
    exp: u64,
    jti: String,
}

impl Default for TokenRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for TokenRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRegistry")
            .field("issued", &self.issued_count())
            .finish_non_exhaustive()
    }
}

impl TokenRegistry {
    /// An empty registry with a fresh random HS256 signing secret.
    pub fn new() -> Self {
        let secret: [u8; 32] = rand::random();
        Self {
            inner: Arc::new(Inner {
                key: EncodingKey::from_secret(&secret),
                tokens: Mutex::new(HashMap::new()),
                issued: AtomicU64::new(0),
                revoke_previous: AtomicBool::new(false),
                revoked_by_policy: AtomicU64::new(0),
            }),
        }
    }

    /// Signs and records a new access token; returns it with its `exp`.
    ///
    /// `exp` = now (whole seconds) + `lifetime` rounded up to whole seconds, so a lifetime of
    /// zero issues a token that is already expired.
    #[cfg(test)]
    pub(crate) fn issue(&self, request: &TokenRequest<'_>) -> Result<(String, u64), SandboxError> {
        self.issue_as(request, false)
    }

    /// Like `issue`; with `opaque` the token is a random 43-character base64url
    /// string (as many servers issue) instead of a JWT, so clients cannot read an `exp` from it.
    pub(crate) fn issue_as(
        &self,
        request: &TokenRequest<'_>,
        opaque: bool,
    ) -> Result<(String, u64), SandboxError> {
        let now = unix_now().as_secs();
        let lifetime = ceil_secs(request.lifetime);
        let exp = now.saturating_add(lifetime);
        let token = if opaque {
            let bytes: [u8; 32] = rand::random();
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
        } else {
            let claims = AccessTokenClaims {
                iss: request.issuer_url,
                sub: request.subject,
                client_id: request.client_id,
                scope: request.scope,
                iat: now,
                exp,
                jti: uuid::Uuid::new_v4().simple().to_string(),
            };
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.inner.key)
                .map_err(SandboxError::SignAccessToken)?
        };
        let entry = IssuedToken {
            subject: request.subject.to_owned(),
            client_id: request.client_id.to_owned(),
            issuer: request.issuer.to_owned(),
            scope: request.scope.map(str::to_owned),
            issued_at: now,
            expires_at: exp,
            revoked: false,
        };
        let mut tokens = self.tokens();
        if tokens.len() >= PRUNE_ABOVE {
            tokens.retain(|_, t| t.expires_at > now);
        }
        if self.inner.revoke_previous.load(Ordering::Relaxed) {
            let n = super::revocation::revoke_superseded(&mut tokens, &entry);
            self.inner
                .revoked_by_policy
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        tokens.insert(token.clone(), entry);
        drop(tokens);
        self.inner.issued.fetch_add(1, Ordering::Relaxed);
        Ok((token, exp))
    }

    /// The token's record if it is known, unexpired and not revoked.
    pub fn validate(&self, token: &str) -> Result<IssuedToken, TokenRejection> {
        let tokens = self.tokens();
        let entry = tokens.get(token).ok_or(TokenRejection::Unknown)?;
        if entry.revoked {
            return Err(TokenRejection::Revoked);
        }
        if unix_now().as_secs() >= entry.expires_at {
            return Err(TokenRejection::Expired);
        }
        Ok(entry.clone())
    }

    /// The token's record, whatever its state (for assertions in tests).
    pub fn get(&self, token: &str) -> Option<IssuedToken> {
        self.tokens().get(token).cloned()
    }

    /// Revokes one token: the API answers 401 to it from now on. Returns whether it was known.
    pub fn revoke(&self, token: &str) -> bool {
        match self.tokens().get_mut(token) {
            Some(entry) => {
                entry.revoked = true;
                true
            }
            None => false,
        }
    }

    /// Revokes every token issued so far (a key rotation or an outage on the vendor's side);
    /// tokens issued afterwards are good. Returns how many were not revoked yet.
    pub fn revoke_all(&self) -> usize {
        let mut tokens = self.tokens();
        let mut count = 0;
        for entry in tokens.values_mut().filter(|t| !t.revoked) {
            entry.revoked = true;
            count += 1;
        }
        count
    }

    /// Every token string known to the registry (issued and not pruned), e.g. for tests that
    /// check that no token leaked into logs. Secret material: never log the result.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.tokens().keys().cloned().collect()
    }

    /// Each new token revokes the earlier unrevoked tokens of the same issuer, client and
    /// subject (see `revocation.rs`: Doorkeeper's `revoke_previous_client_credentials_token`).
    /// Off by default.
    pub fn set_revoke_previous(&self, on: bool) {
        self.inner.revoke_previous.store(on, Ordering::Relaxed);
    }

    /// How many tokens [`TokenRegistry::set_revoke_previous`] revoked so far.
    pub fn revoked_by_policy(&self) -> u64 {
        self.inner.revoked_by_policy.load(Ordering::Relaxed)
    }

    /// Issues a token for `client_id` and `subject` (unit tests of policies).
    #[cfg(test)]
    pub(crate) fn issue_for_test(
        &self,
        client_id: &str,
        subject: &str,
        lifetime: Duration,
    ) -> String {
        let request = TokenRequest {
            subject,
            client_id,
            issuer: "test",
            issuer_url: "http://127.0.0.1:1",
            scope: None,
            lifetime,
        };
        self.issue_as(&request, true).expect("issue").0
    }

    /// How many tokens have been issued since the registry was created.
    pub fn issued_count(&self) -> u64 {
        self.inner.issued.load(Ordering::Relaxed)
    }

    fn tokens(&self) -> MutexGuard<'_, HashMap<String, IssuedToken>> {
        self.inner.tokens.lock()
    }
}

/// Time since the Unix epoch (zero if the clock is before 1970).
pub(crate) fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// `d` in whole seconds, rounded up.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(lifetime: Duration) -> TokenRequest<'static> {
        TokenRequest {
            subject: "sub-1",
            client_id: "client-1",
            issuer: "drillster",
            issuer_url: "http://127.0.0.1:1",
            scope: Some("read"),
            lifetime,
        }
    }

    #[test]
    fn issue_validate_revoke() {
        let registry = TokenRegistry::new();
        let (token, exp) = registry
            .issue(&request(Duration::from_secs(60)))
            .expect("sign");
        let entry = registry.validate(&token).expect("valid");
        assert_eq!(entry.subject, "sub-1");
        assert_eq!(entry.expires_at, exp);
        assert_eq!(entry.scope.as_deref(), Some("read"));
        assert_eq!(registry.issued_count(), 1);
        assert_eq!(registry.validate("nope"), Err(TokenRejection::Unknown));
        assert!(registry.revoke(&token));
        assert_eq!(registry.validate(&token), Err(TokenRejection::Revoked));
        assert_eq!(registry.revoke_all(), 0);
    }

    #[test]
    fn zero_lifetime_is_expired_and_tokens_are_unique() {
        let registry = TokenRegistry::new();
        let (a, _) = registry.issue(&request(Duration::ZERO)).expect("sign");
        let (b, _) = registry.issue(&request(Duration::ZERO)).expect("sign");
        assert_ne!(a, b);
        assert_eq!(registry.validate(&a), Err(TokenRejection::Expired));
        assert_eq!(registry.revoke_all(), 2);
    }

    #[test]
    fn opaque_tokens_validate_and_are_not_jwts() {
        let registry = TokenRegistry::new();
        let (token, _) = registry
            .issue_as(&request(Duration::from_secs(60)), true)
            .expect("issue");
        assert_eq!(token.len(), 43);
        assert!(!token.contains('.'));
        assert_eq!(registry.validate(&token).expect("valid").subject, "sub-1");
    }

    #[test]
    fn ceil_secs_rounds_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
        assert_eq!(ceil_secs(Duration::ZERO), 0);
    }
}
