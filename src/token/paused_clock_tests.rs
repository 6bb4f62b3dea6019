//! The token lifecycle on tokio's paused clock: renewal at the refresh ratio, backoff with
//! jitter, `Retry-After`, expiry, the hold after upstream 401s, single flight and the bounded
//! cold-start wait, each timed exactly. Time passes only when every task waits, so the token
//! endpoint here is an in-process one that answers at once (or after a latency on the same
//! clock): real socket I/O would let the paused clock run ahead of it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::runtime::Handle;
use tokio::time::Instant;

use super::*;

/// The wall-clock time the sources' clocks start at.
fn wall0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

const MS: Duration = Duration::from_millis(1);

/// What the token endpoint answers one request with.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// A token that lives this long.
    Token(Duration),
    /// An RFC 6749 §5.2 error, with the server's `Retry-After` if any.
    Fail(Option<Duration>),
}

/// An in-process token endpoint: answers the scripted answers first, then `otherwise`, each
/// after `latency` (on tokio's clock). Tokens are `t1`, `t2`, … by request number. Records when
/// each request came and the wall-clock time it was made at.
struct Endpoint {
    script: Mutex<VecDeque<Answer>>,
    otherwise: Mutex<Answer>,
    latency: Duration,
    requests: Mutex<Vec<(Instant, SystemTime)>>,
}

impl Endpoint {
    fn new(lifetime: Duration) -> Arc<Endpoint> {
        Self::slow(lifetime, Duration::ZERO)
    }

    fn slow(lifetime: Duration, latency: Duration) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            script: Mutex::new(VecDeque::new()),
            otherwise: Mutex::new(Answer::Token(lifetime)),
            latency,
            requests: Mutex::new(Vec::new()),
        })
    }

    fn then(&self, answers: impl IntoIterator<Item = Answer>) {
        self.script.lock().unwrap().extend(answers);
    }

    fn otherwise(&self, answer: Answer) {
        *self.otherwise.lock().unwrap() = answer;
    }

    fn times(&self) -> Vec<Instant> {
        self.requests.lock().unwrap().iter().map(|r| r.0).collect()
    }

    fn walls(&self) -> Vec<SystemTime> {
        self.requests.lock().unwrap().iter().map(|r| r.1).collect()
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

struct Via(Arc<Endpoint>);

#[async_trait]
impl TokenFetcher for Via {
    async fn fetch(&self, now: SystemTime) -> Result<AccessToken, FetchError> {
        let e = &self.0;
        let n = {
            let mut r = e.requests.lock().unwrap();
            r.push((Instant::now(), now));
            r.len()
        };
        if !e.latency.is_zero() {
            tokio::time::sleep(e.latency).await;
        }
        let scripted = e.script.lock().unwrap().pop_front();
        match scripted.unwrap_or(*e.otherwise.lock().unwrap()) {
            Answer::Token(lifetime) => Ok(AccessToken {
                value: format!("t{n}"),
                lifetime,
            }),
            Answer::Fail(retry_after) => Err(FetchError {
                outcome: FetchOutcome::OAuthError,
                message: format!(
                    "HTTP 400: token endpoint returned error \"invalid_client\" ({n})"
                ),
                retry_after,
            }),
        }
    }
}

/// A source fetching from `endpoint`, its wall clock at [`wall0`] now.
fn source(endpoint: &Arc<Endpoint>, policy: RenewalPolicy) -> Arc<TokenSource> {
    TokenSource::with_clock(
        "paused",
        Box::new(Via(Arc::clone(endpoint))),
        policy,
        TokenMetrics::detached(),
        Clock::following_tokio(wall0()),
    )
}

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

/// `d` in `[low, high]`, give or take the timer's 1 ms resolution and the backoff's
/// millisecond rounding.
fn within(d: Duration, low: Duration, high: Duration) -> bool {
    d + MS >= low && d <= high + MS
}

fn since_epoch(t: Option<SystemTime>) -> Duration {
    t.expect("a timestamp").duration_since(UNIX_EPOCH).unwrap()
}

#[tokio::test(start_paused = true)]
async fn renewal_comes_at_the_refresh_ratio_less_up_to_10_percent_jitter() {
    let endpoint = Endpoint::new(Duration::from_secs(100));
    let s = source(&endpoint, RenewalPolicy::default());
    let start = Instant::now();
    let _r = s.spawn_refresher(&Handle::current());
    assert_eq!(s.token().await.unwrap().1, 1);
    let waited = s.waited_requests();
    // A request every second for 1000 s: every one finds a usable token; requests never fetch.
    for _ in 0..1000 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.token().await.unwrap();
    }
    assert_eq!(
        s.waited_requests(),
        waited,
        "a request waited for a renewal"
    );
    let times = endpoint.times();
    assert_eq!(times[0], start, "the first token is fetched at once");
    // 80 % of 100 s, jittered down by up to 10 %: every 72–80 s.
    let gaps = gaps(&times);
    for g in &gaps {
        assert!(
            within(*g, Duration::from_secs(72), Duration::from_secs(80)),
            "{gaps:?}"
        );
    }
    assert!((12..=13).contains(&gaps.len()), "{gaps:?}");
    assert!(gaps.iter().any(|g| *g != gaps[0]), "jitter: {gaps:?}");
    // The wall clock the source reads follows tokio's: the last fetch was made at wall0 plus
    // the time since the start, and the token expires 100 s after it arrived.
    let last = *endpoint.walls().last().unwrap();
    assert_eq!(last, wall0() + (*times.last().unwrap() - start));
    let status = s.status();
    assert_eq!(status.last_refresh, Some(last));
    assert_eq!(
        status.token_expires_at,
        Some(last + Duration::from_secs(100))
    );
    assert_eq!(status.generation, times.len() as u64);
    assert_eq!(
        s.current().unwrap().expires_at_wall,
        last + Duration::from_secs(100)
    );
}

#[tokio::test(start_paused = true)]
async fn failed_fetches_back_off_exponentially_with_jitter_up_to_the_cap() {
    let endpoint = Endpoint::new(Duration::from_secs(3600));
    endpoint.then([Answer::Fail(None); 6]);
    let policy = RenewalPolicy {
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_millis(1600),
        ..RenewalPolicy::default()
    };
    let s = source(&endpoint, policy);
    let _r = s.spawn_refresher(&Handle::current());
    // The cold start waits for the first attempt, which fails.
    assert!(s.token().await.is_err());
    let status = s.status();
    assert_eq!(status.consecutive_failures, 1);
    assert!(status.last_error.unwrap().contains("invalid_client"));
    assert_eq!(status.last_error_at, Some(wall0()));
    // Backing off: a request fails at once, Retry-After at least 1 s; /status dates the next
    // attempt 200–400 ms ahead.
    let asked = Instant::now();
    let e = s.token().await.unwrap_err();
    assert_eq!(
        Instant::now(),
        asked,
        "a request does not wait out a backoff"
    );
    assert_eq!(e.retry_after, Duration::from_secs(1));
    let next = since_epoch(status.next_attempt_at) - since_epoch(Some(wall0()));
    assert!(
        within(next, Duration::from_millis(200), Duration::from_millis(400)),
        "{next:?}"
    );

    tokio::time::sleep(Duration::from_secs(20)).await;
    let times = endpoint.times();
    assert_eq!(times.len(), 7, "six failures, then the token");
    // Retry n waits [min·2ⁿ, 2·min·2ⁿ), never more than the 1.6 s cap.
    let ms = Duration::from_millis;
    let bounds = [
        (ms(200), ms(400)),
        (ms(400), ms(800)),
        (ms(800), ms(1600)),
        (ms(800), ms(1600)),
        (ms(800), ms(1600)),
        (ms(800), ms(1600)),
    ];
    let gaps = gaps(&times);
    for (gap, (low, high)) in gaps.iter().zip(bounds) {
        assert!(within(*gap, low, high), "{gaps:?}");
    }
    let status = s.status();
    assert!(status.usable);
    assert_eq!(status.consecutive_failures, 0);
    assert_eq!(status.generation, 1);
    assert!(
        status.last_error.is_some(),
        "the last trouble stays visible"
    );
    assert_eq!(status.next_attempt_at, None);
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_cap_is_honoured_while_the_valid_token_serves() {
    let endpoint = Endpoint::new(Duration::from_secs(60));
    // The renewal (at 2.7–3 s) is answered 429 with Retry-After 40 s, over the 30 s cap.
    endpoint.then([
        Answer::Token(Duration::from_secs(60)),
        Answer::Fail(Some(Duration::from_secs(40))),
    ]);
    let policy = RenewalPolicy {
        refresh_ratio: 0.05,
        ..RenewalPolicy::default()
    };
    let s = source(&endpoint, policy);
    let _r = s.spawn_refresher(&Handle::current());
    assert_eq!(s.token().await.unwrap().1, 1);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(endpoint.count(), 2, "the renewal was tried");
    let failed_wall = endpoint.walls()[1];
    let failed_at = endpoint.times()[1];

    // The valid token keeps serving, at once; /status dates the next attempt 40 s after the
    // failure.
    let asked = Instant::now();
    assert_eq!(s.token().await.unwrap().1, 1);
    assert_eq!(Instant::now(), asked);
    let status = s.status();
    assert!(status.usable);
    let next = since_epoch(status.next_attempt_at);
    let want = since_epoch(Some(failed_wall + Duration::from_secs(40)));
    assert!(within(next, want, want), "{next:?} vs {want:?}");

    // The API now refuses the token: it is dropped, and a request gets Unavailable at once
    // with the time left of the Retry-After; no token request is made for it.
    tokio::time::sleep_until(failed_at + Duration::from_secs(2)).await;
    assert_eq!(s.invalidate(1), Rejection::Dropped);
    let asked = Instant::now();
    let e = s.token().await.unwrap_err();
    assert_eq!(Instant::now(), asked);
    assert_eq!(e.retry_after, Duration::from_secs(38));
    assert!(!s.status().usable);

    // The next token request comes when the Retry-After is up, not before.
    tokio::time::sleep_until(failed_at + Duration::from_secs(41)).await;
    let times = endpoint.times();
    assert_eq!(times.len(), 3, "{times:?}");
    let waited = times[2] - failed_at;
    let forty = Duration::from_secs(40);
    assert!(within(waited, forty, forty), "{waited:?}");
    assert_eq!(s.token().await.unwrap().1, 2);
}

/// Renewals refused (credentials deleted at the server): the token serves until its expiry
/// less the margin, failed renewals come at backoff pace, then requests fail.
#[tokio::test(start_paused = true)]
async fn a_valid_token_serves_through_failed_renewals_until_its_margin_then_none_is_usable() {
    let endpoint = Endpoint::new(Duration::from_secs(10));
    endpoint.then([Answer::Token(Duration::from_secs(10))]);
    endpoint.otherwise(Answer::Fail(None));
    // Renewal at 30 % of 10 s (2.7–3 s); usable until 6.5 s (a margin of (1 − 0.3) / 2 of the
    // lifetime, under `min_time_left`).
    let policy = RenewalPolicy {
        refresh_ratio: 0.3,
        ..RenewalPolicy::default()
    };
    let s = source(&endpoint, policy);
    let start = Instant::now();
    let _r = s.spawn_refresher(&Handle::current());
    assert_eq!(s.token().await.unwrap().1, 1);
    let token = s.current().unwrap();
    let usable_until = token.usable_until;
    let six_and_a_half = Duration::from_millis(6500);
    assert!(within(usable_until - start, six_and_a_half, six_and_a_half));
    assert_eq!(
        token.expires_at_wall,
        wall0() + Duration::from_secs(10),
        "expiry: the lifetime from when the response arrived"
    );

    tokio::time::sleep_until(usable_until - MS).await;
    assert_eq!(s.token().await.unwrap().1, 1, "served until the margin");
    assert!(s.status().usable);
    assert!(endpoint.count() >= 2, "renewals were tried meanwhile");
    tokio::time::sleep_until(usable_until).await;
    assert!(s.usable_now(Instant::now()).is_none());
    assert!(s.token().await.is_err(), "past the margin: unavailable");
    assert!(!s.status().usable);

    tokio::time::sleep_until(start + Duration::from_secs(8)).await;
    let times = endpoint.times();
    let refusals = times.len() - 1;
    // From 2.7–3 s, then after 0.5–1 s, 1–2 s, 2–4 s: 3 or 4 by 8 s.
    assert!(
        within(
            times[1] - start,
            Duration::from_millis(2700),
            Duration::from_secs(3)
        ),
        "{times:?}"
    );
    assert!((3..=4).contains(&refusals), "{refusals} refusals");
    let ms = Duration::from_millis;
    let gaps = gaps(&times[1..]);
    for (gap, (low, high)) in gaps.iter().zip([
        (ms(500), ms(1000)),
        (ms(1000), ms(2000)),
        (ms(2000), ms(4000)),
    ]) {
        assert!(within(*gap, low, high), "{gaps:?}");
    }
    let status = s.status();
    assert_eq!(status.consecutive_failures as usize, refusals);
    assert!(status.last_error.unwrap().contains("invalid_client"));
    assert_eq!(
        status.token_expires_at,
        Some(wall0() + Duration::from_secs(10)),
        "the expiry of the token still held"
    );
}

#[tokio::test(start_paused = true)]
async fn a_token_refused_on_its_replay_is_held_for_refused_token_hold_then_dropped() {
    let endpoint = Endpoint::new(Duration::from_secs(3600));
    let s = source(&endpoint, RenewalPolicy::default());
    let _r = s.spawn_refresher(&Handle::current());
    assert_eq!(s.token().await.unwrap().1, 1);
    // Refused: dropped, replayed with a new token, refused again: held.
    assert!(s.upstream_refused(1, Sent::First { replayable: true }));
    assert_eq!(s.token().await.unwrap().1, 2);
    assert!(!s.upstream_refused(2, Sent::Replay));
    tokio::time::sleep(REFUSED_TOKEN_HOLD - MS).await;
    assert!(
        !s.upstream_refused(2, Sent::First { replayable: true }),
        "held: no replay"
    );
    assert_eq!(s.usable_now(Instant::now()).unwrap().1, 2);
    assert_eq!(endpoint.count(), 2);
    tokio::time::sleep(MS).await;
    assert!(
        s.upstream_refused(2, Sent::First { replayable: true }),
        "the hold is over: dropped and replayed"
    );
    assert_eq!(s.token().await.unwrap().1, 3);
    assert_eq!(endpoint.count(), 3);
}

/// Requests the API always refuses, which cannot be replayed, one every 100 ms for 30 s: one
/// token request per hold, not one per request.
#[tokio::test(start_paused = true)]
async fn always_refused_unreplayable_requests_cost_one_token_request_per_hold() {
    let endpoint = Endpoint::new(Duration::from_secs(3600));
    let s = source(&endpoint, RenewalPolicy::default());
    let _r = s.spawn_refresher(&Handle::current());
    s.token().await.unwrap();
    let mut kept = 0;
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, generation) = s.token().await.unwrap();
        if s.invalidate_unreplayable(generation) == Rejection::Kept {
            kept += 1;
        }
    }
    // At 0 s the first token; at 0.1 s it is dropped and the second fetched, refused at once
    // at 0.2 s and held until 10.2 s, when it is dropped; the third, held from 10.3 s, is
    // dropped at 20.3 s; the fourth is held past 30 s.
    assert_eq!(endpoint.count(), 4, "{:?}", endpoint.times());
    assert_eq!(kept, 300 - 3);
    assert_eq!(s.status().generation, 4);
}

#[tokio::test(start_paused = true)]
async fn concurrent_cold_start_requests_share_one_fetch() {
    let endpoint = Endpoint::slow(Duration::from_secs(3600), Duration::from_millis(500));
    let s = source(&endpoint, RenewalPolicy::default());
    let start = Instant::now();
    let _r = s.spawn_refresher(&Handle::current());
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let (auth, generation) = s.token().await.unwrap();
                (
                    auth.to_str().unwrap().to_owned(),
                    generation,
                    Instant::now(),
                )
            })
        })
        .collect();
    for t in tasks {
        let (auth, generation, at) = t.await.unwrap();
        assert_eq!((auth.as_str(), generation), ("Bearer t1", 1));
        assert_eq!(
            at - start,
            Duration::from_millis(500),
            "when the fetch answered"
        );
    }
    assert_eq!(endpoint.count(), 1, "exactly one token request");
    assert_eq!(s.waited_requests(), 200, "every request waited for it");
}

#[tokio::test(start_paused = true)]
async fn when_the_one_cold_start_fetch_fails_its_waiters_fail_together_then_it_backs_off() {
    let endpoint = Endpoint::slow(Duration::from_secs(3600), Duration::from_millis(1500));
    endpoint.then([Answer::Fail(None)]);
    let s = source(&endpoint, RenewalPolicy::default());
    let start = Instant::now();
    let _r = s.spawn_refresher(&Handle::current());
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move { (s.token().await.is_err(), Instant::now()) })
        })
        .collect();
    for t in tasks {
        let (failed, at) = t.await.unwrap();
        assert!(failed, "all fail together");
        assert_eq!(at - start, Duration::from_millis(1500));
    }
    // During the backoff: at once, and no token request for it.
    let asked = Instant::now();
    assert!(s.token().await.is_err());
    assert_eq!(Instant::now(), asked);
    assert_eq!(endpoint.count(), 1);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let times = endpoint.times();
    assert_eq!(times.len(), 2);
    // 1.5 s latency, then the first backoff (0.5–1 s).
    let gap = times[1] - times[0];
    assert!(
        within(
            gap,
            Duration::from_millis(2000),
            Duration::from_millis(2500)
        ),
        "{gap:?}"
    );
    assert_eq!(s.token().await.unwrap().1, 1);
}

/// `expires_in` below a second is taken as [`MIN_LIFETIME`]: renewals every 0.72–0.8 s, never a
/// tight loop.
#[tokio::test(start_paused = true)]
async fn a_lifetime_below_one_second_counts_as_one_so_renewals_never_loop() {
    let endpoint = Endpoint::new(Duration::from_millis(1));
    let s = source(&endpoint, RenewalPolicy::default());
    let _r = s.spawn_refresher(&Handle::current());
    s.token().await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let gaps = gaps(&endpoint.times());
    for g in &gaps {
        assert!(
            within(*g, Duration::from_millis(720), Duration::from_millis(800)),
            "{gaps:?}"
        );
    }
    assert!((12..=13).contains(&gaps.len()), "{gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn after_idling_longer_than_a_lifetime_the_first_request_gets_a_fresh_token() {
    let lifetime = Duration::from_millis(1500);
    let endpoint = Endpoint::new(lifetime);
    let s = source(&endpoint, RenewalPolicy::default());
    let _r = s.spawn_refresher(&Handle::current());
    let (before, _) = s.token().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (after, generation) = s.token().await.unwrap();
    assert_ne!(before, after);
    let current = s.current().unwrap();
    assert_eq!(current.generation, generation);
    assert!(Instant::now() - current.obtained_at < lifetime);
    assert!(current.is_usable(Instant::now()));
}

/// 5 s and 20 s tokens under steady traffic (a request every 50 ms for 17 s): renewed ahead
/// of expiry, 5 and 2 token requests, and no request ever waits.
#[tokio::test(start_paused = true)]
async fn short_tokens_renew_ahead_of_expiry_and_no_request_waits() {
    let short = Endpoint::new(Duration::from_secs(5));
    let long = Endpoint::new(Duration::from_secs(20));
    let sources = [
        source(&short, RenewalPolicy::default()),
        source(&long, RenewalPolicy::default()),
    ];
    let start = Instant::now();
    let _r: Vec<_> = sources
        .iter()
        .map(|s| s.spawn_refresher(&Handle::current()))
        .collect();
    for s in &sources {
        s.token().await.unwrap();
    }
    let waited: Vec<u64> = sources.iter().map(|s| s.waited_requests()).collect();
    let first_expiry: Vec<_> = sources
        .iter()
        .map(|s| s.status().token_expires_at)
        .collect();
    while Instant::now() - start < Duration::from_secs(17) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        for s in &sources {
            let asked = Instant::now();
            s.token().await.unwrap();
            assert_eq!(Instant::now(), asked);
        }
    }
    for (s, w) in sources.iter().zip(waited) {
        assert_eq!(s.waited_requests(), w, "a request waited for a token");
    }
    // 5 s tokens renewed every 3.6–4 s: at 0 s and 4 more times by 17 s. 20 s tokens: once.
    assert_eq!(short.count(), 5, "{:?}", short.times());
    assert_eq!(long.count(), 2, "{:?}", long.times());
    let expiry = since_epoch(sources[0].status().token_expires_at);
    assert!(expiry >= since_epoch(first_expiry[0]) + Duration::from_secs(10));
}

/// A source replaced by a config reload stops retrying and renewing.
#[tokio::test(start_paused = true)]
async fn a_retired_source_neither_retries_nor_renews() {
    let failing = Endpoint::new(Duration::from_secs(60));
    failing.otherwise(Answer::Fail(None));
    let s = source(&failing, RenewalPolicy::default());
    let _r = s.spawn_refresher(&Handle::current());
    assert!(s.token().await.is_err());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tried = failing.count();
    assert!(tried >= 2, "it retries while serving");
    s.retire();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(failing.count(), tried, "the replaced source kept retrying");

    let renewing = Endpoint::new(Duration::from_secs(60));
    let s = source(&renewing, RenewalPolicy::default());
    let _r = s.spawn_refresher(&Handle::current());
    s.token().await.unwrap();
    s.retire();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(renewing.count(), 1, "the replaced source kept renewing");
}
