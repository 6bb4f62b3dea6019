//! Per-user tokens: one [`TokenSource`] per (route, subject), for routes with
//! `[routes.subjects]` (docs/per-user-tokens.md).
//!
//! Drillster issues access tokens for its service account or for any account the organisation
//! manages: the assertion's `sub` (RFC 7523 §3; "Drillster: Service accounts") names a user id,
//! an e-mail address or a third-party id. Each subject's source is an ordinary
//! [`TokenSource`], so it has the same single flight (one token request however many requests
//! wait for a new subject), renewal ahead of expiry, per-subject backoff after failures (an
//! unknown user's `invalid_grant` delays nobody else) and 401 invalidation by generation.
//!
//! * At most `max_cached` subjects per route are kept; the least recently used is evicted (its
//!   refresher stopped).
//! * A subject's token is renewed only while the subject is in use: a sweep drops a subject whose
//!   token is due for renewal and that no request asked for since it was obtained, and a subject
//!   without a token that nobody asked for in [`IDLE_WITHOUT_TOKEN`].
//! * Every token obtained is one `info` line on target `tokengate::audit` (route, subject,
//!   caller, the assertion's `jti`, expiry); never the token.
//! * `tokengate_subject_tokens{route}` counts the cached subjects; no metric names a subject.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use async_trait::async_trait;
use http::HeaderValue;
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use pingora_prometheus::prometheus::IntGauge;
use tokio::task::JoinHandle;

use super::{RenewalPolicy, TokenFetcher, TokenSource, Unavailable};
use crate::config::SubjectsConfig;
use crate::metrics::TokenMetrics;
use crate::oauth::{AccessToken, FetchError, TokenClient};

/// A subject that has no usable token and that no request asked for in this long is dropped
/// (its refresher stops retrying).
pub const IDLE_WITHOUT_TOKEN: Duration = Duration::from_secs(30);

/// How often the sweep looks for subjects to drop.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One subject's source and when a request last asked for it.
struct Entry {
    source: Arc<TokenSource>,
    /// Stopped when the entry goes, after [`Entry::linger`].
    refresher: Option<JoinHandle<()>>,
    /// Where the refresher's stop is scheduled.
    runtime: tokio::runtime::Handle,
    /// How long a request may wait for a token (`RenewalPolicy::max_wait`), and a second.
    linger: Duration,
    /// Milliseconds since the cache's epoch of the last request for this subject.
    last_used_ms: AtomicU64,
    /// The address of the last client that asked (for the audit line).
    caller: Arc<Mutex<Option<IpAddr>>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        // Evicted or swept: no renewals from now on, but a request already waiting for this
        // subject still gets the token request in flight (or the one it wakes), as a replaced
        // route's source does after a reload; the refresher stops once every waiter has had
        // its answer or given up.
        self.source.retire();
        if let Some(refresher) = self.refresher.take() {
            let linger = self.linger;
            self.runtime.spawn(async move {
                tokio::time::sleep(linger).await;
                refresher.abort();
            });
        }
    }
}

/// A route's per-subject tokens.
pub struct SubjectTokens {
    route: String,
    client: TokenClient,
    policy: RenewalPolicy,
    metrics: TokenMetrics,
    gauge: IntGauge,
    settings: RwLock<SubjectsConfig>,
    cache: Mutex<LruCache<String, Arc<Entry>>>,
    runtime: tokio::runtime::Handle,
    epoch: Instant,
    sweeper: Mutex<Option<JoinHandle<()>>>,
    /// The fleet every subject's source joins (`[cluster]`).
    fleet: std::sync::OnceLock<Arc<crate::cluster::Fleet>>,
}

impl Drop for SubjectTokens {
    fn drop(&mut self) {
        if let Some(h) = self.sweeper.lock().take() {
            h.abort();
        }
    }
}

impl SubjectTokens {
    /// A cache for `route`, whose tokens `client` (the route's own, `jwt_bearer`) requests with
    /// `sub` set to each subject. Subjects' refreshers and the sweep run on `runtime`.
    /// `metrics`: the route's token request counters (gauges detached,
    /// [`TokenMetrics::without_gauges`]); `gauge`: `tokengate_subject_tokens{route}`.
    pub fn new(
        route: impl Into<String>,
        client: TokenClient,
        policy: RenewalPolicy,
        settings: SubjectsConfig,
        metrics: TokenMetrics,
        gauge: IntGauge,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        let cap = NonZeroUsize::new(settings.max_cached).unwrap_or(NonZeroUsize::MIN);
        let this = Arc::new(SubjectTokens {
            route: route.into(),
            client,
            policy,
            metrics,
            gauge,
            settings: RwLock::new(settings),
            cache: Mutex::new(LruCache::new(cap)),
            runtime: runtime.clone(),
            epoch: Instant::now(),
            sweeper: Mutex::new(None),
            fleet: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&this);
        let sweeper = runtime.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(this) => this.sweep(Instant::now()),
                    None => return,
                }
            }
        });
        *this.sweeper.lock() = Some(sweeper);
        this
    }

    /// Shares every subject's tokens with `fleet` (docs/fleet.md): each (route, subject) is a
    /// credential identity of its own there. Call it before the first request.
    pub fn join_fleet(&self, fleet: Arc<crate::cluster::Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    /// The route's name.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// Whether `subject` may have a token on this route ([`SubjectsConfig::allows`]).
    pub fn allows(&self, subject: &[u8]) -> bool {
        self.settings.read().allows(subject)
    }

    /// Whether the client at `ip` may name a subject in the route's subject field.
    pub fn header_client(&self, ip: IpAddr) -> bool {
        self.settings.read().header_client(ip)
    }

    /// How many subjects have a source now.
    pub fn cached(&self) -> usize {
        self.cache.lock().len()
    }

    /// The source of `subject`, created (and its first token request started) on first use.
    /// `caller`: the client asking, for the audit line. `None` when `subject` is not allowed.
    pub fn source(&self, subject: &str, caller: Option<IpAddr>) -> Option<Arc<TokenSource>> {
        if !self.allows(subject.as_bytes()) {
            return None;
        }
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let mut cache = self.cache.lock();
        if let Some(e) = cache.get(subject) {
            e.last_used_ms.store(now_ms, Ordering::Relaxed);
            if caller.is_some() {
                *e.caller.lock() = caller;
            }
            return Some(Arc::clone(&e.source));
        }
        let caller = Arc::new(Mutex::new(caller));
        let fetcher = AuditedFetcher {
            client: self.client.for_subject(subject),
            route: self.route.clone(),
            subject: subject.to_string(),
            caller: Arc::clone(&caller),
        };
        let source = TokenSource::for_subject(
            self.route.clone(),
            subject,
            Box::new(fetcher),
            self.policy.clone(),
            self.metrics.clone(),
        );
        if let Some(fleet) = self.fleet.get() {
            let auth = self.client.auth();
            let key = fleet.key(&self.route, auth, Some(subject));
            let store: Arc<dyn crate::cluster::FleetStore> = fleet.clone();
            source.join_fleet(super::fleet::FleetLink::new(store, key, auth.token_timeout));
        }
        let refresher = source.spawn_refresher(&self.runtime);
        let entry = Arc::new(Entry {
            source: Arc::clone(&source),
            refresher: Some(refresher),
            runtime: self.runtime.clone(),
            linger: self.policy.max_wait + Duration::from_secs(1),
            last_used_ms: AtomicU64::new(now_ms),
            caller,
        });
        // An evicted entry stops its refresher when dropped (after the lock is released).
        let evicted = cache.push(subject.to_string(), entry);
        self.gauge.set(cache.len() as i64);
        drop(cache);
        drop(evicted);
        Some(source)
    }

    /// A usable token for `subject`: at once when one is cached, else after its source's
    /// first (or next) token request, shared by every request waiting for that subject.
    /// Returns the source too, for an upstream 401 ([`TokenSource::upstream_refused`]).
    ///
    /// Errors: `Ok(None)` when the subject is not allowed; [`Unavailable`] as
    /// [`TokenSource::token`] (the authorization server refused the subject, e.g.
    /// `invalid_grant` for a user it does not manage, and the subject is backing off).
    #[allow(clippy::type_complexity)]
    pub async fn token(
        &self,
        subject: &str,
        caller: Option<IpAddr>,
    ) -> Result<Option<(Arc<TokenSource>, HeaderValue, u64)>, Unavailable> {
        let Some(source) = self.source(subject, caller) else {
            return Ok(None);
        };
        let (authorization, generation) = source.token().await?;
        Ok(Some((source, authorization, generation)))
    }

    /// The current token of `subject` when one is cached and usable now, without creating a
    /// source or waiting. Counts as a use of the subject by `caller` (its token is renewed, not
    /// dropped, and the next audit line names that caller).
    pub fn usable_now(
        &self,
        subject: &str,
        caller: Option<IpAddr>,
    ) -> Option<(Arc<TokenSource>, HeaderValue, u64)> {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let source = {
            let mut cache = self.cache.lock();
            let e = cache.get(subject)?;
            e.last_used_ms.store(now_ms, Ordering::Relaxed);
            if caller.is_some() {
                *e.caller.lock() = caller;
            }
            Arc::clone(&e.source)
        };
        let (a, g) = source.usable_now(Instant::now())?;
        Some((source, a, g))
    }

    /// Applies reloaded `[routes.subjects]` settings: `allow`, `header_clients` and
    /// `max_cached` take effect at once; subjects no longer allowed lose their cached tokens,
    /// and the least recently used go when the cache shrinks.
    pub fn update(&self, settings: SubjectsConfig) {
        let cap = NonZeroUsize::new(settings.max_cached).unwrap_or(NonZeroUsize::MIN);
        let dropped: Vec<Arc<Entry>> = {
            let mut cache = self.cache.lock();
            let gone: Vec<String> = cache
                .iter()
                .filter(|(k, _)| !settings.allows(k.as_bytes()))
                .map(|(k, _)| k.clone())
                .collect();
            let mut dropped: Vec<Arc<Entry>> =
                gone.iter().filter_map(|k| cache.pop(k.as_str())).collect();
            while cache.len() > cap.get() {
                if let Some((_, e)) = cache.pop_lru() {
                    dropped.push(e);
                }
            }
            cache.resize(cap);
            *self.settings.write() = settings;
            self.gauge.set(cache.len() as i64);
            dropped
        };
        drop(dropped);
    }

    /// Drops the subjects no longer in use (see the module documentation).
    fn sweep(&self, now: Instant) {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let dropped: Vec<Arc<Entry>> = {
            let mut cache = self.cache.lock();
            let idle: Vec<String> = cache
                .iter()
                .filter(|(_, e)| {
                    let last = e.last_used_ms.load(Ordering::Relaxed);
                    match e.source.current() {
                        // Due for renewal (within the next sweep) and unused since obtained.
                        Some(t) => {
                            let obtained_ms = t
                                .obtained_at
                                .saturating_duration_since(self.epoch)
                                .as_millis() as u64;
                            now + 2 * SWEEP_EVERY >= t.refresh_at && last < obtained_ms
                        }
                        None => now_ms.saturating_sub(last) > IDLE_WITHOUT_TOKEN.as_millis() as u64,
                    }
                })
                .map(|(k, _)| k.clone())
                .collect();
            let dropped = idle.iter().filter_map(|k| cache.pop(k.as_str())).collect();
            self.gauge.set(cache.len() as i64);
            dropped
        };
        drop(dropped);
    }
}

/// A subject's token requests, each obtained token logged on `tokengate::audit`.
struct AuditedFetcher {
    client: TokenClient,
    route: String,
    subject: String,
    caller: Arc<Mutex<Option<IpAddr>>>,
}

#[async_trait]
impl TokenFetcher for AuditedFetcher {
    async fn fetch(&self, now: SystemTime) -> Result<AccessToken, FetchError> {
        let (token, jti) = self.client.fetch_identified(now).await?;
        let caller = *self.caller.lock();
        audit_obtained(
            &self.route,
            &self.subject,
            caller,
            jti.as_deref(),
            now + token.lifetime,
        );
        Ok(token)
    }
}

/// The audit line of a per-user access token obtained (docs/per-user-tokens.md "Audit"): one
/// `info` line on target `tokengate::audit` with the route, the subject (the assertion's `sub`,
/// RFC 7523 §3), the client that asked (`-`: none, e.g. `tokengate token --subject`), the
/// assertion's `jti` and the token's expiry. Never the token or the assertion.
pub fn audit_obtained(
    route: &str,
    subject: &str,
    caller: Option<IpAddr>,
    jti: Option<&str>,
    expires: SystemTime,
) {
    tracing::info!(
        target: "tokengate::audit",
        route = %route,
        subject = %subject,
        caller = %caller.map_or_else(|| "-".to_string(), |ip| ip.to_string()),
        jti = %jti.unwrap_or("-"),
        expires = %humantime::format_rfc3339_seconds(expires),
        "per-user access token obtained"
    );
}
