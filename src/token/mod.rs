//! The token cache: one [`TokenSource`] per credential identity (route, subject, scope, audience).
//!
//! * The current token is published with an atomic swap ([`arc_swap::ArcSwapOption`]); the
//!   request path reads it without a lock or an await.
//! * One background task per source (the *refresher*) owns every fetch: it renews at
//!   `refresh_ratio` of the lifetime (jittered), retries failures with capped exponential backoff
//!   and jitter (honouring `Retry-After`), and never evicts a token that is still valid. Requests
//!   that find no usable token (cold start, after a 401 drop) wake the refresher and wait for its
//!   next result, so concurrent requests share one fetch (single flight).
//! * Tokens carry a generation number, so an upstream 401 drops only the token it was sent with.
//!
//! No HTTP details live here: fetching is behind [`TokenFetcher`]. Time comes from tokio's
//! clock and the source's wall [`Clock`] (see [`clock`]), never from the system directly, so
//! tests can run the whole lifecycle on tokio's paused clock.

pub mod clock;
pub mod fleet;
#[cfg(test)]
mod fleet_tests;
#[cfg(test)]
mod paused_clock_tests;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use backon::BackoffBuilder;
use http::HeaderValue;
// parking_lot, not std: every critical section below is a copy or a few field assignments
// that cannot panic half-way, so there is no poisoned state to guard against, and the request
// path (invalidate on an upstream 401) needs no poison handling at all.
use parking_lot::Mutex;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use clock::Clock;

use crate::metrics::TokenMetrics;

pub mod subjects;
use crate::oauth::{AccessToken, FetchError, FetchOutcome};

/// Obtains access tokens for one credential identity ([`crate::oauth::TokenClient`] in
/// production).
#[async_trait]
pub trait TokenFetcher: Send + Sync + 'static {
    /// One token request, made at the wall-clock time `now` (the source's [`Clock`]; an
    /// RFC 7523 assertion's `iat` and `exp` count from it).
    async fn fetch(&self, now: SystemTime) -> Result<AccessToken, FetchError>;
}

#[async_trait]
impl TokenFetcher for crate::oauth::TokenClient {
    async fn fetch(&self, now: SystemTime) -> Result<AccessToken, FetchError> {
        crate::oauth::TokenClient::fetch(self, now).await
    }
}

/// How long before its own margin a source renews a token adopted from the fleet (at most
/// the margin itself): time for the lease and the token request.
const ADOPTED_HEADROOM: Duration = Duration::from_secs(2);

/// Shortest lifetime we act on: a token said to live less (`expires_in` 0, negative) is treated
/// as living this long, so a misbehaving server cannot drive the refresher into a tight loop.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// Renewal and retry settings of one source.
#[derive(Debug, Clone)]
pub struct RenewalPolicy {
    /// Renew at this fraction of the lifetime (0 < r < 1).
    pub refresh_ratio: f64,
    /// A token with less than this left is never sent (scaled down for very short tokens, see
    /// [`Token`]).
    pub min_time_left: Duration,
    /// First retry delay after a failure (jittered up to twice this).
    pub backoff_min: Duration,
    /// Retry delay cap: no jittered delay exceeds it (a `Retry-After` from the server may).
    pub backoff_max: Duration,
    /// How long a request waits for a token when none is usable and a fetch is due or in flight.
    /// A request that finds the source backing off after a failure does not wait at all.
    pub max_wait: Duration,
    /// How many requests may wait at once; more get 503 at once.
    pub max_waiters: usize,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy {
            refresh_ratio: 0.8,
            min_time_left: Duration::from_secs(10),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_wait: Duration::from_secs(15),
            max_waiters: 10_000,
        }
    }
}

/// A published access token. Cheap to read; never logged. Its instants are on tokio's clock
/// ([`tokio::time::Instant`], see [`clock`]).
pub struct Token {
    authorization: HeaderValue,
    /// Increases by one with every token a source publishes.
    pub generation: u64,
    /// When the response arrived.
    pub obtained_at: Instant,
    /// After this instant the token is not sent (expiry minus the time-left margin).
    pub usable_until: Instant,
    /// When the refresher renews it.
    pub refresh_at: Instant,
    /// Wall-clock expiry (for `/status` and the expiry gauge).
    pub expires_at_wall: SystemTime,
    /// Length of the access token in bytes (for logs about oversized headers).
    pub len: usize,
}

impl Token {
    /// `Bearer <access token>`, marked sensitive (never logged by `http`'s Debug).
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    /// Whether the token may still be sent at `now`.
    #[inline]
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

/// One connection's copy of the token its requests carry ([`TokenSource::usable_cached`]):
/// which source it came from and that source's publish count when it was loaded.
#[derive(Default)]
pub struct TokenCache {
    /// The source's address (0: nothing cached yet).
    source: usize,
    version: u64,
    token: Option<Arc<Token>>,
}

impl TokenCache {
    /// Takes the cached token out for the length of one request (moving the `Arc`, no
    /// reference count change); [`TokenCache::put_back`] returns it.
    pub fn take(&mut self) -> Option<Arc<Token>> {
        self.token.take()
    }

    /// Returns a token [`TokenCache::take`] took, unless something was loaded since.
    pub fn put_back(&mut self, token: Arc<Token>) {
        if self.token.is_none() {
            self.token = Some(token);
        }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("generation", &self.generation)
            .field("len", &self.len)
            .field("expires_at_wall", &self.expires_at_wall)
            .finish_non_exhaustive()
    }
}

/// A token obtained by [`TokenSource::verify`] before its source serves, handed to
/// [`TokenSource::start_with`] so the source starts with it instead of asking again.
pub struct FirstToken {
    token: AccessToken,
    /// When the response arrived (its lifetime counts from here).
    obtained_at: Instant,
    took: Duration,
}

impl std::fmt::Debug for FirstToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstToken")
            .field("token", &self.token)
            .field("took", &self.took)
            .finish_non_exhaustive()
    }
}

/// No usable token could be had in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// When the next token request is due (for `Retry-After`), at least 1 s.
    pub retry_after: Duration,
}

/// What `/status` shows about a source. No secrets, no token.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceStatus {
    /// Wall-clock expiry of the current token.
    #[serde(with = "opt_unix")]
    pub token_expires_at: Option<SystemTime>,
    /// When the last token was obtained.
    #[serde(with = "opt_unix")]
    pub last_refresh: Option<SystemTime>,
    /// Failed token requests since the last success.
    pub consecutive_failures: u32,
    /// While backing off after a failure: when the next token request is due (the backoff, or
    /// the server's `Retry-After`, whichever is later).
    #[serde(with = "opt_unix")]
    pub next_attempt_at: Option<SystemTime>,
    /// The last failure's message (status, OAuth `error`/`error_description`; never a secret).
    /// Kept after a success, so the last trouble stays visible; `last_error_at` dates it.
    pub last_error: Option<String>,
    /// When the last failure happened.
    #[serde(with = "opt_unix")]
    pub last_error_at: Option<SystemTime>,
    /// Generation of the current token (0: none yet).
    pub generation: u64,
    /// Whether a usable token is held right now.
    pub usable: bool,
    /// The fleet state (`[cluster]`); `None` without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<fleet::FleetStatus>,
}

mod opt_unix {
    use std::time::{SystemTime, UNIX_EPOCH};
    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }
}

/// Outcome of one refresher attempt, broadcast to waiting requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    None,
    Succeeded(u64),
    Failed(u64),
}

/// One credential identity's token: the published value, its refresher and its status.
pub struct TokenSource {
    name: String,
    /// The managed user a per-user source obtains tokens for (docs/per-user-tokens.md), named
    /// in its log lines so they are not taken for the route's own token; `None`: the route's.
    subject: Option<String>,
    current: ArcSwapOption<Token>,
    /// Bumped after every change of `current` (a new token, a dropped one): lets a
    /// [`TokenCache`] tell with one atomic load that its copy is still the current one.
    published: AtomicU64,
    fetcher: Box<dyn TokenFetcher>,
    policy: RenewalPolicy,
    metrics: TokenMetrics,
    /// Wall-clock time for assertions and status; monotonic time is tokio's clock.
    clock: Clock,
    /// Wakes the refresher (a waiter needs a token, or a token was dropped).
    wake: Notify,
    /// Attempt results for waiters.
    attempts: watch::Sender<Attempt>,
    waiters: Semaphore,
    /// Milliseconds since `epoch` at which the next fetch may run (backoff), for `Retry-After`.
    next_attempt_ms: AtomicU64,
    epoch: Instant,
    /// Hashes of dropped tokens: a fetch that returns one of them does not put it back.
    dropped: Mutex<Vec<u64>>,
    /// Counts drops, so the refresher can tell a fetch that raced with a drop.
    drops: AtomicU64,
    status: Mutex<SourceStatus>,
    /// Requests that found no usable token and had to wait (should stay 0 in steady state).
    waited: AtomicU64,
    /// Replaced by a config reload ([`TokenSource::retire`]).
    retired: AtomicBool,
    /// Upstream 401s seen: the last drop, and a token held through further 401s because the
    /// API refuses requests, not it ([`TokenSource::invalidate`]).
    refusals: Mutex<Refusals>,
    /// Set once, before the refresher starts, when the gateway is in a fleet (`[cluster]`).
    fleet: OnceLock<fleet::FleetLink>,
}

/// What upstream 401s have done lately ([`TokenSource::invalidate`]).
#[derive(Clone, Copy, Debug, Default)]
struct Refusals {
    /// The generation a 401 last dropped.
    last_dropped: Option<u64>,
    /// A token kept through upstream 401s: its generation and until when.
    hold: Option<(u64, Instant)>,
}

/// How long a token refused right after it replaced a refused one is kept through further
/// 401s. Bounds the token requests that always-refused requests can cause to about one per
/// this period, and a token revoked in the meantime to this long of 401s passed to clients.
pub const REFUSED_TOKEN_HOLD: Duration = Duration::from_secs(10);

/// Which sending of a request met an upstream 401 ([`TokenSource::upstream_refused`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Sent {
    /// The first: `replayable` when the request can be sent once more (no body, or a body
    /// kept whole within `replay_body_limit`).
    First {
        /// Whether the request can be sent once more.
        replayable: bool,
    },
    /// The one replay, with the token that replaced the refused one.
    Replay,
}

/// What an upstream 401 did to the token it was sent with ([`TokenSource::invalidate`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Rejection {
    /// It was the current token and is dropped: replay with the next one.
    Dropped,
    /// A newer token has replaced it (or a drop is already renewing it): replay with that one.
    Superseded,
    /// It is the current token, but it replaced a refused one moments ago and was refused
    /// too (or was refused on a replay, [`TokenSource::refused_on_replay`]): the API refuses
    /// the request, not the token. It stays, and the 401 goes to the client.
    Kept,
}

impl TokenSource {
    /// Creates a source on the system's wall clock. Call [`TokenSource::spawn_refresher`] to
    /// start renewing.
    pub fn new(
        name: impl Into<String>,
        fetcher: Box<dyn TokenFetcher>,
        policy: RenewalPolicy,
        metrics: TokenMetrics,
    ) -> Arc<Self> {
        Self::with_clock(name, fetcher, policy, metrics, Clock::system())
    }

    /// [`TokenSource::new`] with the wall clock `clock` (for tests on tokio's paused clock:
    /// [`Clock::following_tokio`]).
    pub fn with_clock(
        name: impl Into<String>,
        fetcher: Box<dyn TokenFetcher>,
        policy: RenewalPolicy,
        metrics: TokenMetrics,
        clock: Clock,
    ) -> Arc<Self> {
        Self::build(name.into(), None, fetcher, policy, metrics, clock)
    }

    /// [`TokenSource::new`] for route `name`'s tokens for the managed user `subject`
    /// ([`subjects::SubjectTokens`]); its log lines name the subject.
    pub fn for_subject(
        name: impl Into<String>,
        subject: impl Into<String>,
        fetcher: Box<dyn TokenFetcher>,
        policy: RenewalPolicy,
        metrics: TokenMetrics,
    ) -> Arc<Self> {
        Self::build(
            name.into(),
            Some(subject.into()),
            fetcher,
            policy,
            metrics,
            Clock::system(),
        )
    }

    fn build(
        name: String,
        subject: Option<String>,
        fetcher: Box<dyn TokenFetcher>,
        policy: RenewalPolicy,
        metrics: TokenMetrics,
        clock: Clock,
    ) -> Arc<Self> {
        let max_waiters = policy.max_waiters;
        Arc::new(TokenSource {
            name,
            subject,
            current: ArcSwapOption::empty(),
            published: AtomicU64::new(0),
            fetcher,
            policy,
            metrics,
            clock,
            wake: Notify::new(),
            attempts: watch::channel(Attempt::None).0,
            waiters: Semaphore::new(max_waiters),
            next_attempt_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            dropped: Mutex::new(Vec::new()),
            drops: AtomicU64::new(0),
            status: Mutex::new(SourceStatus::default()),
            waited: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            refusals: Mutex::new(Refusals::default()),
            fleet: OnceLock::new(),
        })
    }

    /// Shares this source's tokens with the fleet through `link` (docs/fleet.md). Call it
    /// before [`TokenSource::spawn_refresher`]; a second call is ignored.
    pub fn join_fleet(&self, link: fleet::FleetLink) {
        let _ = self.fleet.set(link);
    }

    /// The route (identity) name, for logs and metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the refresher on `runtime`; it fetches the first token at once. Abort the
    /// returned handle to stop it.
    pub fn spawn_refresher(self: &Arc<Self>, runtime: &tokio::runtime::Handle) -> JoinHandle<()> {
        let this = Arc::clone(self);
        runtime.spawn(async move { this.refresher().await })
    }

    /// The current token if it is usable now. Lock-free; the hot path.
    #[inline]
    pub fn usable_now(&self, now: Instant) -> Option<(HeaderValue, u64)> {
        let guard = self.current.load();
        match guard.as_deref() {
            Some(t) if t.is_usable(now) => Some((t.authorization.clone(), t.generation)),
            _ => None,
        }
    }

    /// The current token if it is usable at `now`, through a connection's `cache`: while
    /// nothing newer was published the cached token is used as it is (one atomic load), else
    /// the current one is loaded into the cache. The fast path's per-request lookup: no
    /// arc-swap guard, no reference count taken (docs/architecture.md "The hot path").
    // Always: with three callers on the fast path the compiler would make it a call per request.
    #[inline(always)]
    pub fn usable_cached<'c>(
        &self,
        cache: &'c mut TokenCache,
        now: Instant,
    ) -> Option<&'c Arc<Token>> {
        // Acquire pairs with the Release bump after a store: a version seen here means the
        // `current` loaded below is that change or a later one.
        let version = self.published.load(Ordering::Acquire);
        let me = self as *const TokenSource as usize;
        if cache.token.is_none() || cache.source != me || cache.version != version {
            cache.token = self.current.load_full();
            (cache.source, cache.version) = (me, version);
        }
        cache.token.as_ref().filter(|t| t.is_usable(now))
    }

    /// The current token (usable or not), for status and logs.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// A usable token: at once when one is cached, else after the refresher's next attempt
    /// (shared by all waiters), bounded by the policy's `max_wait` and `max_waiters`.
    ///
    /// Errors: [`Unavailable`] when the attempt failed, the source is backing off after a
    /// failure (at once: a request never waits out a backoff), the wait timed out or too many
    /// requests are waiting. `retry_after` is the time until the next token request.
    pub async fn token(&self) -> Result<(HeaderValue, u64), Unavailable> {
        if let Some(t) = self.usable_now(Instant::now()) {
            return Ok(t);
        }
        self.waited.fetch_add(1, Ordering::Relaxed);
        if !self.backoff_remaining().is_zero() {
            return Err(self.unavailable());
        }
        let _permit = self.waiters.try_acquire().map_err(|_| self.unavailable())?;
        let mut rx = self.attempts.subscribe();
        rx.borrow_and_update();
        // Re-check after subscribing: a token published in between must not be missed.
        if let Some(t) = self.usable_now(Instant::now()) {
            return Ok(t);
        }
        let deadline = Instant::now() + self.policy.max_wait;
        self.wake.notify_one();
        loop {
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(self.unavailable()),
            }
            if let Some(t) = self.usable_now(Instant::now()) {
                return Ok(t);
            }
            if let Attempt::Failed(_) = *rx.borrow_and_update() {
                return Err(self.unavailable());
            }
        }
    }

    /// The upstream answered 401 (RFC 6750 §3.1 `invalid_token`) to a request sent with the
    /// token of `generation`: the one policy of both proxy paths (docs/token-lifecycle.md
    /// "Upstream 401").
    /// Returns whether to replay the request once with the next token ([`TokenSource::token`]).
    ///
    /// * [`Sent::Replay`]: the replay was refused too. No loop: the 401 goes to the client and
    ///   the token is held ([`TokenSource::refused_on_replay`]).
    /// * [`Sent::First`]: the token is dropped ([`TokenSource::invalidate`], or
    ///   [`TokenSource::invalidate_unreplayable`] when the request cannot be replayed); replay
    ///   unless it is held or the request cannot be replayed.
    pub fn upstream_refused(&self, generation: u64, sent: Sent) -> bool {
        match sent {
            Sent::Replay => {
                self.refused_on_replay(generation);
                false
            }
            Sent::First { replayable: true } => self.invalidate(generation) != Rejection::Kept,
            Sent::First { replayable: false } => {
                self.invalidate_unreplayable(generation);
                false
            }
        }
    }

    /// Drops the token of `generation` after the upstream rejected it (RFC 6750 §3.1
    /// `invalid_token`) and wakes the refresher (docs/token-lifecycle.md "Upstream 401": only that
    /// generation, one refresh however many requests saw the 401), for a request that is
    /// replayed with the next token. A newer token is left alone, and so is one held
    /// ([`Rejection::Kept`]): refused on a replay ([`TokenSource::refused_on_replay`]) or as
    /// in [`TokenSource::invalidate_unreplayable`].
    pub fn invalidate(&self, generation: u64) -> Rejection {
        self.invalidate_at(generation, Instant::now(), false)
    }

    /// [`TokenSource::invalidate`] for a request that cannot be replayed, so no replay can
    /// tell whether the API refuses the token or the request. A token obtained after a drop
    /// and refused within [`REFUSED_TOKEN_HOLD`] of arriving is taken as the latter: it is not
    /// dropped but held through 401s for [`REFUSED_TOKEN_HOLD`]. So requests the API always
    /// refuses cost at most about one token request per that period instead of one each.
    pub fn invalidate_unreplayable(&self, generation: u64) -> Rejection {
        self.invalidate_at(generation, Instant::now(), true)
    }

    fn invalidate_at(&self, generation: u64, now: Instant, unreplayable: bool) -> Rejection {
        let cur = self.current.load_full();
        let Some(tok) = cur.as_ref().filter(|t| t.generation == generation) else {
            return Rejection::Superseded;
        };
        {
            let mut r = self.refusals.lock();
            match r.hold {
                Some((held, until)) if held == generation && now < until => {
                    return Rejection::Kept;
                }
                _ if unreplayable => {
                    // Generations count publications: the next one replaced the dropped one.
                    let replaced_a_refused_one =
                        r.last_dropped.is_some_and(|d| d + 1 == generation);
                    if replaced_a_refused_one
                        && now.saturating_duration_since(tok.obtained_at) < REFUSED_TOKEN_HOLD
                    {
                        r.hold = Some((generation, now + REFUSED_TOKEN_HOLD));
                        return Rejection::Kept;
                    }
                }
                _ => {}
            }
            r.last_dropped = Some(generation);
        }
        let prev = self.current.compare_and_swap(&cur, None);
        let dropped = matches!((&*prev, &cur), (Some(a), Some(b)) if Arc::ptr_eq(a, b));
        if dropped {
            self.published.fetch_add(1, Ordering::Release);
            if let Some(link) = self.fleet.get() {
                link.refused(generation);
            }
            let mut d = self.dropped.lock();
            d.push(hash_token(tok.authorization.as_bytes()));
            if d.len() > 16 {
                d.remove(0);
            }
            drop(d);
            self.drops.fetch_add(1, Ordering::SeqCst);
            self.wake.notify_one();
            return Rejection::Dropped;
        }
        Rejection::Superseded
    }

    /// The upstream answered 401 to a replay carrying the token of `generation`, fetched
    /// because the first attempt's token was refused: the API refuses the request, not the
    /// token. That token is kept through upstream 401s for [`REFUSED_TOKEN_HOLD`], so a request
    /// the API always refuses (a path the account may not use) cannot make every request of
    /// the route wait for the token endpoint, nor flood it. A renewal ends the hold early.
    pub fn refused_on_replay(&self, generation: u64) {
        self.refused_on_replay_at(generation, Instant::now());
    }

    fn refused_on_replay_at(&self, generation: u64, now: Instant) {
        let current = self.current.load();
        if current.as_ref().is_some_and(|t| t.generation == generation) {
            self.refusals.lock().hold = Some((generation, now + REFUSED_TOKEN_HOLD));
        }
    }

    /// One token request with this source's settings (its fetcher's timeouts), outside the
    /// refresher, for a source that does not serve yet: a config reload checks new credentials
    /// this way before it swaps them in. Counted in the token request metrics; nothing is
    /// published and the source's status is left alone, so a refused request leaves no trace
    /// but the error it returns.
    ///
    /// # Errors
    /// The fetch's [`FetchError`] (status, the server's `error`/`error_description`, never a
    /// secret).
    pub async fn verify(&self) -> Result<FirstToken, FetchError> {
        let started = Instant::now();
        let result = self.fetcher.fetch(self.clock.wall()).await;
        let took = started.elapsed();
        match result {
            Ok(token) => {
                self.metrics.fetched(FetchOutcome::Success, took);
                Ok(FirstToken {
                    token,
                    obtained_at: Instant::now(),
                    took,
                })
            }
            Err(e) => {
                self.metrics.fetched(e.outcome, took);
                Err(e)
            }
        }
    }

    /// Publishes `first` ([`TokenSource::verify`]) as this source's first token, so the
    /// refresher, once spawned, renews it when due instead of fetching at once. Call it before
    /// [`TokenSource::spawn_refresher`].
    pub fn start_with(&self, first: FirstToken) {
        self.publish(first.token, first.took, first.obtained_at);
    }

    /// Marks the source as replaced by a config reload: its refresher no longer renews or
    /// retries, and fetches only for a request that waits (one admitted before the reload may);
    /// it no longer sets the route's token gauges, which belong to the source that replaced it.
    /// Counters still count its token requests. Abort the refresher after a grace period.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// How many requests found no usable token and had to wait for the refresher (cold start,
    /// after a 401 drop, or during an outage). In steady state this does not grow.
    pub fn waited_requests(&self) -> u64 {
        self.waited.load(Ordering::Relaxed)
    }

    /// A snapshot for `/status` and `/readyz`.
    pub fn status(&self) -> SourceStatus {
        let mut s = self.status.lock().clone();
        s.usable = self.usable_now(Instant::now()).is_some();
        let backoff = self.backoff_remaining();
        s.next_attempt_at = (!backoff.is_zero()).then(|| self.clock.wall() + backoff);
        s.fleet = self
            .fleet
            .get()
            .map(|l| l.status(self.current.load().as_deref()));
        s
    }

    fn unavailable(&self) -> Unavailable {
        let secs = self.backoff_remaining().as_secs_f64().ceil().max(1.0);
        Unavailable {
            retry_after: Duration::from_secs(secs as u64),
        }
    }

    fn backoff_remaining(&self) -> Duration {
        let next = Duration::from_millis(self.next_attempt_ms.load(Ordering::Relaxed));
        next.saturating_sub(self.epoch.elapsed())
    }

    async fn refresher(self: Arc<Self>) {
        let mut backoff = self.new_backoff();
        let mut attempt_no = 0u64;
        loop {
            if self.is_retired() && self.waiters.available_permits() == self.policy.max_waiters {
                // Replaced: no renewals, no retries; a fetch only for a request that waits
                // (it wakes this loop after taking its permit). Aborted after a grace period.
                self.wake.notified().await;
                continue;
            }
            let now = Instant::now();
            let due = match self.current.load().as_deref() {
                Some(t) if now < t.refresh_at => t.refresh_at,
                _ => now,
            };
            let wake_at = due.max(self.epoch + self.backoff_until());
            if wake_at > now {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake_at) => {}
                    _ = self.wake.notified() => {}
                }
                continue;
            }
            attempt_no += 1;
            let leased = match self.fleet.get() {
                Some(link) => match self.fleet_before_fetch(link).await {
                    fleet::Before::Adopted => {
                        backoff = self.new_backoff();
                        self.attempts.send_replace(Attempt::Succeeded(attempt_no));
                        continue;
                    }
                    fleet::Before::Fetch { leased } => leased,
                },
                None => false,
            };
            let drops_before = self.drops.load(Ordering::SeqCst);
            let started = Instant::now();
            let result = self.fetcher.fetch(self.clock.wall()).await;
            let took = started.elapsed();
            let mut obtained = None;
            match result {
                Ok(token)
                    if self.drops.load(Ordering::SeqCst) != drops_before
                        && self.was_dropped(&token) =>
                {
                    // Requested before the upstream rejected this very token (a server that
                    // hands out its cached token): stale, not the server's fault. Discard it
                    // and ask again at once; waiters keep waiting for that answer.
                    self.metrics.fetched(FetchOutcome::Success, took);
                    tracing::info!(
                        route = %self.name,
                        subject = self.subject.as_deref().map(tracing::field::display),
                        "token fetched while the upstream rejected that same token; fetching again"
                    );
                }
                Ok(token) if self.was_dropped(&token) => {
                    self.record_failure(
                        FetchError {
                            outcome: FetchOutcome::InvalidResponse,
                            message: "token endpoint returned the token the upstream just rejected"
                                .into(),
                            retry_after: None,
                        },
                        took,
                        &mut backoff,
                    );
                    self.attempts.send_replace(Attempt::Failed(attempt_no));
                }
                Ok(token) => {
                    self.metrics.fetched(FetchOutcome::Success, took);
                    let value = self.fleet.get().map(|_| token.value.clone());
                    let published = self.publish_as(token, took, Instant::now(), None);
                    obtained = published.zip(value);
                    backoff = self.new_backoff();
                    self.attempts.send_replace(Attempt::Succeeded(attempt_no));
                }
                Err(e) => {
                    self.record_failure(e, took, &mut backoff);
                    self.attempts.send_replace(Attempt::Failed(attempt_no));
                }
            }
            if let Some(link) = self.fleet.get() {
                self.fleet_after_fetch(link, obtained, leased).await;
            }
        }
    }

    fn backoff_until(&self) -> Duration {
        Duration::from_millis(self.next_attempt_ms.load(Ordering::Relaxed))
    }

    fn new_backoff(&self) -> CappedBackoff {
        CappedBackoff::new(self.policy.backoff_min, self.policy.backoff_max)
    }

    fn was_dropped(&self, token: &AccessToken) -> bool {
        self.was_dropped_value(&token.value)
    }

    fn was_dropped_value(&self, value: &str) -> bool {
        let h = hash_token(format!("Bearer {value}").as_bytes());
        self.dropped.lock().contains(&h)
    }

    /// Publishes `token`, whose response arrived at `obtained_at` after `took`.
    fn publish(&self, token: AccessToken, took: Duration, obtained_at: Instant) {
        self.publish_as(token, took, obtained_at, None);
    }

    /// [`TokenSource::publish`], renewing after `refresh_after` instead of at `refresh_ratio`
    /// of the lifetime when given (a token adopted from the fleet keeps the fleet's renewal
    /// time). Returns the published token.
    fn publish_as(
        &self,
        token: AccessToken,
        took: Duration,
        obtained_at: Instant,
        refresh_after: Option<Duration>,
    ) -> Option<Arc<Token>> {
        let lifetime = token.lifetime.max(MIN_LIFETIME);
        let ratio = self.policy.refresh_ratio.clamp(0.05, 0.95);
        // Very short tokens: the margin shrinks so the token stays usable for most of its life.
        let margin = self
            .policy
            .min_time_left
            .min(lifetime.mul_f64((1.0 - ratio) / 2.0));
        // Renew between 90 % and 100 % of `ratio` (jitter spreads many gateways' renewals).
        let jitter = 1.0 - rand::random::<f64>() * 0.1;
        let adopted = refresh_after.is_some();
        // An adopted token comes with the renewal time of the replica that obtained it, whose
        // policy may keep a smaller margin: renew no later than a little before this source's
        // own margin, or the token would stop being usable here before anyone renews it.
        let latest = lifetime.saturating_sub(margin + margin.min(ADOPTED_HEADROOM));
        let refresh_after = refresh_after
            .map(|r| r.min(latest))
            .unwrap_or_else(|| lifetime.mul_f64(ratio * jitter));
        let len = token.value.len();
        let mut authorization = match HeaderValue::try_from(format!("Bearer {}", token.value)) {
            Ok(v) => v,
            Err(_) => {
                // parse_token_response already refused such tokens; stay safe anyway.
                return None;
            }
        };
        authorization.set_sensitive(true);
        let generation = self.status.lock().generation + 1;
        let wall = self.clock.wall();
        let expires_at_wall = wall + lifetime - obtained_at.elapsed();
        let published = Arc::new(Token {
            authorization,
            generation,
            obtained_at,
            usable_until: obtained_at + lifetime - margin,
            refresh_at: obtained_at + refresh_after,
            expires_at_wall,
            len,
        });
        self.current.store(Some(Arc::clone(&published)));
        self.published.fetch_add(1, Ordering::Release);
        self.next_attempt_ms.store(0, Ordering::Relaxed);
        {
            let mut s = self.status.lock();
            s.generation = generation;
            s.token_expires_at = Some(expires_at_wall);
            s.last_refresh = Some(wall);
            s.consecutive_failures = 0;
        }
        if !self.is_retired() {
            self.metrics.set_consecutive_failures(0);
            self.metrics.set_expiry(expires_at_wall);
        }
        if adopted {
            tracing::info!(
                route = %self.name,
                subject = self.subject.as_deref().map(tracing::field::display),
                generation,
                lifetime_s = lifetime.as_secs_f64(),
                "access token adopted from the fleet"
            );
        } else {
            tracing::info!(
                route = %self.name,
                subject = self.subject.as_deref().map(tracing::field::display),
                generation,
                lifetime_s = lifetime.as_secs_f64(),
                took_ms = took.as_millis() as u64,
                "access token obtained"
            );
        }
        Some(published)
    }

    fn record_failure(&self, e: FetchError, took: Duration, backoff: &mut CappedBackoff) {
        let delay = backoff.next_delay();
        // Retry-After (RFC 9110 §10.2.3, on 429/503) is honoured even beyond the cap.
        let delay = delay.max(e.retry_after.unwrap_or_default());
        let next = self.epoch.elapsed() + delay;
        self.next_attempt_ms
            .store(next.as_millis() as u64, Ordering::Relaxed);
        let failures = {
            let mut s = self.status.lock();
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            s.last_error = Some(e.message.clone());
            s.last_error_at = Some(self.clock.wall());
            s.consecutive_failures
        };
        self.metrics.fetched(e.outcome, took);
        if !self.is_retired() {
            self.metrics.set_consecutive_failures(failures);
        }
        let still_valid = self.usable_now(Instant::now()).is_some();
        tracing::warn!(
            route = %self.name,
            subject = self.subject.as_deref().map(tracing::field::display),
            outcome = e.outcome.label(),
            consecutive_failures = failures,
            retry_in_ms = delay.as_millis() as u64,
            still_valid,
            error = %e.message,
            "token request failed"
        );
    }
}

/// Capped exponential backoff with jitter (backon's exponential schedule, factor 2).
///
/// backon's jitter adds up to 100 % of the current delay, so its schedule is built with half the
/// cap and the result is clamped as well: retry `n` (from 0) waits a random time in
/// `[min·2ⁿ, 2·min·2ⁿ)`, and never more than `max`.
pub struct CappedBackoff {
    inner: backon::ExponentialBackoff,
    max: Duration,
}

impl CappedBackoff {
    /// A fresh schedule: first delay in `[min, 2·min)` (at most `max`).
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        let inner = backon::ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay((max / 2).max(min))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        CappedBackoff { inner, max }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        self.inner.next().unwrap_or(self.max).min(self.max)
    }
}

fn hash_token(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests;
