use super::*;
use std::sync::atomic::AtomicU32;

/// Hands out `t1`, `t2`, … (lifetime 1 h), or never answers when `hang` is set.
struct Scripted {
    n: AtomicU32,
    hang: bool,
}

#[async_trait]
impl TokenFetcher for Scripted {
    async fn fetch(&self, _now: SystemTime) -> Result<AccessToken, FetchError> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(AccessToken {
            value: format!("t{n}"),
            lifetime: Duration::from_secs(3600),
        })
    }
}

fn source(hang: bool, policy: RenewalPolicy) -> Arc<TokenSource> {
    let fetcher = Scripted {
        n: AtomicU32::new(0),
        hang,
    };
    TokenSource::new("test", Box::new(fetcher), policy, TokenMetrics::detached())
}

#[tokio::test]
async fn invalidate_drops_only_its_generation() {
    let s = source(false, RenewalPolicy::default());
    let _r = s.spawn_refresher(&tokio::runtime::Handle::current());
    let (auth, generation) = s.token().await.unwrap();
    assert_eq!((auth.to_str().unwrap(), generation), ("Bearer t1", 1));
    assert_eq!(s.invalidate(1), Rejection::Dropped);
    let (auth, generation) = s.token().await.unwrap();
    assert_eq!((auth.to_str().unwrap(), generation), ("Bearer t2", 2));
    // A late 401 for the old generation leaves the new token alone.
    assert_eq!(s.invalidate(1), Rejection::Superseded);
    assert_eq!(s.usable_now(Instant::now()).unwrap().1, 2);
}

/// A token refused on a replay is kept through 401s for the hold; so is a token that
/// replaced a refused one and is refused at once by a request that cannot be replayed.
/// After the hold, when a replay can tell, or when refused long after it arrived (a real
/// revocation), a token is dropped.
#[tokio::test]
async fn a_token_refused_for_the_request_is_held_through_401s() {
    let s = source(false, RenewalPolicy::default());
    let _r = s.spawn_refresher(&tokio::runtime::Handle::current());
    s.token().await.unwrap();
    let now = Instant::now();
    // Refused on a replay: held, that generation only.
    s.refused_on_replay_at(1, now);
    assert_eq!(s.invalidate_at(1, now, false), Rejection::Kept);
    assert_eq!(s.usable_now(Instant::now()).unwrap().1, 1, "kept");
    let after_hold = now + REFUSED_TOKEN_HOLD;
    assert_eq!(s.invalidate_at(1, after_hold, false), Rejection::Dropped);
    // Generation 2 replaced it; refused at once for a replayable request: dropped (the
    // replay tells).
    assert_eq!(s.token().await.unwrap().1, 2);
    assert_eq!(
        s.invalidate_at(2, Instant::now(), false),
        Rejection::Dropped
    );
    // Generation 3 replaced it and is refused at once for an unreplayable request: held
    // through the hold, then dropped.
    assert_eq!(s.token().await.unwrap().1, 3);
    let now = Instant::now();
    assert_eq!(s.invalidate_at(3, now, true), Rejection::Kept);
    let later = now + REFUSED_TOKEN_HOLD - Duration::from_millis(1);
    assert_eq!(s.invalidate_at(3, later, true), Rejection::Kept);
    assert_eq!(s.invalidate_at(3, later, false), Rejection::Kept);
    assert_eq!(s.usable_now(Instant::now()).unwrap().1, 3, "kept");
    assert_eq!(
        s.invalidate_at(3, now + REFUSED_TOKEN_HOLD, true),
        Rejection::Dropped
    );
    // Generation 4 replaced it but is refused only a hold after it arrived: dropped.
    assert_eq!(s.token().await.unwrap().1, 4);
    let much_later = Instant::now() + REFUSED_TOKEN_HOLD;
    assert_eq!(s.invalidate_at(4, much_later, true), Rejection::Dropped);
    assert_eq!(s.token().await.unwrap().1, 5);
    // A late replay report for generation 4 sets nothing on generation 5.
    s.refused_on_replay_at(4, much_later);
    assert_eq!(
        s.invalidate_at(5, much_later + REFUSED_TOKEN_HOLD, true),
        Rejection::Dropped
    );
}

/// The one 401 policy: a first refusal of a replayable request replays with the next token;
/// a refused replay does not, and holds the token; so does an unreplayable request refused
/// right after the token replaced a refused one.
#[tokio::test]
async fn an_upstream_401_replays_once_and_never_loops() {
    let s = source(false, RenewalPolicy::default());
    let _r = s.spawn_refresher(&tokio::runtime::Handle::current());
    s.token().await.unwrap();
    assert!(s.upstream_refused(1, Sent::First { replayable: true }));
    assert_eq!(s.token().await.unwrap().1, 2);
    assert!(!s.upstream_refused(2, Sent::Replay));
    assert!(
        !s.upstream_refused(2, Sent::First { replayable: true }),
        "held"
    );
    assert_eq!(s.usable_now(Instant::now()).unwrap().1, 2);
    // A late 401 for the old generation: replay with the current one.
    assert!(s.upstream_refused(1, Sent::First { replayable: true }));
    assert!(!s.upstream_refused(2, Sent::First { replayable: false }));
    assert_eq!(s.usable_now(Instant::now()).unwrap().1, 2, "still held");
}

/// A connection's cached token follows every change of the current one: a new token, a
/// dropped one, another source; and a token taken out for a request comes back.
#[tokio::test]
async fn cached_token_follows_every_publish() {
    let s = source(false, RenewalPolicy::default());
    let _r = s.spawn_refresher(&tokio::runtime::Handle::current());
    let mut cache = TokenCache::default();
    assert!(s.usable_cached(&mut cache, Instant::now()).is_none());
    s.token().await.unwrap();
    let generation = |cache: &mut TokenCache| {
        s.usable_cached(cache, Instant::now())
            .map(|t| (t.authorization().to_str().unwrap().to_owned(), t.generation))
    };
    assert_eq!(generation(&mut cache), Some(("Bearer t1".into(), 1)));
    let taken = cache.take().unwrap();
    cache.put_back(taken);
    assert_eq!(generation(&mut cache), Some(("Bearer t1".into(), 1)));
    // Dropped after a 401: the cache sees it at once, then the renewed token.
    assert_eq!(s.invalidate(1), Rejection::Dropped);
    assert_eq!(generation(&mut cache), None);
    s.token().await.unwrap();
    assert_eq!(generation(&mut cache), Some(("Bearer t2".into(), 2)));
    // A token taken out and lost (the request ended early) is loaded again.
    cache.take().unwrap();
    assert_eq!(generation(&mut cache), Some(("Bearer t2".into(), 2)));
    // Another source's token replaces this one's.
    let other = source(false, RenewalPolicy::default());
    let _r2 = other.spawn_refresher(&tokio::runtime::Handle::current());
    other.token().await.unwrap();
    let theirs = other.current().unwrap();
    let t = other.usable_cached(&mut cache, Instant::now()).unwrap();
    assert!(Arc::ptr_eq(t, &theirs));
    let ours = s.current().unwrap();
    let t = s.usable_cached(&mut cache, Instant::now()).unwrap();
    assert!(Arc::ptr_eq(t, &ours) && !Arc::ptr_eq(t, &theirs));
    // Not usable past its expiry margin, even cached.
    assert!(s
        .usable_cached(&mut cache, Instant::now() + Duration::from_secs(7200))
        .is_none());
}

/// On tokio's paused clock: the three admitted waiters give up at exactly `max_wait`, the
/// other seven are refused at once.
#[tokio::test(start_paused = true)]
async fn waiters_are_bounded_and_time_out() {
    let policy = RenewalPolicy {
        max_wait: Duration::from_millis(300),
        max_waiters: 3,
        ..RenewalPolicy::default()
    };
    let s = source(true, policy);
    let _r = s.spawn_refresher(&tokio::runtime::Handle::current());
    let started = Instant::now();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let r = s.token().await;
                (r.is_err(), Instant::now())
            })
        })
        .collect();
    let mut waited = Vec::new();
    for t in tasks {
        let (failed, at) = t.await.unwrap();
        assert!(failed);
        waited.push(at - started);
    }
    let at_once = waited.iter().filter(|w| w.is_zero()).count();
    assert_eq!(at_once, 7, "only 3 may wait; the rest are refused at once");
    let bounded = waited.iter().filter(|w| **w == Duration::from_millis(300));
    assert_eq!(
        bounded.count(),
        3,
        "the waiters give up at max_wait: {waited:?}"
    );
}

#[test]
fn backoff_is_exponential_jittered_and_hard_capped() {
    let (min, max) = (Duration::from_millis(100), Duration::from_millis(1000));
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let mut b = CappedBackoff::new(min, max);
        let d: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        firsts.insert(d[0]);
        assert!(d[0] >= min && d[0] < min * 2, "{d:?}");
        assert!(d[1] >= min * 2 && d[1] < min * 4, "{d:?}");
        assert!(d[2] >= min * 4 && d[2] < min * 8, "{d:?}");
        assert!(d.iter().all(|x| *x <= max), "cap exceeded: {d:?}");
        assert!(d[11] >= max / 2, "{d:?}");
    }
    assert!(firsts.len() > 10, "jitter");
}
