//! The fleet protocol on tokio's paused clock, with the store in memory: replicas sharing a
//! store make one token request per identity and renewal; without a store each fetches alone;
//! an upstream 401 is answered by one refresh for all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32};

use tokio::sync::broadcast;

use super::fleet::FleetLink;
use super::*;
use crate::cluster::{Announcements, FleetKey, FleetStore, SharedToken, StoreDown, Stored};

/// One Redis, in memory: values, leases and announcements; expiry is not modelled (tokens here
/// outlive the tests' spans), `down` makes every operation fail.
#[derive(Default)]
struct MemoryStore {
    values: Mutex<HashMap<String, Vec<u8>>>,
    leases: Mutex<HashMap<String, u32>>,
    channels: Mutex<HashMap<String, broadcast::Sender<()>>>,
    down: AtomicBool,
}

/// One replica's view of a [`MemoryStore`] (its lease owner id).
struct Replica {
    store: Arc<MemoryStore>,
    owner: u32,
}

struct Channel(broadcast::Receiver<()>);

#[async_trait]
impl Announcements for Channel {
    async fn next(&mut self, deadline: Instant) -> bool {
        matches!(
            tokio::time::timeout_at(deadline, self.0.recv()).await,
            Ok(Ok(()))
        )
    }
}

impl MemoryStore {
    fn announce(&self, key: &FleetKey) {
        if let Some(tx) = self.channels.lock().get(key.token_key()) {
            let _ = tx.send(());
        }
    }
}

#[async_trait]
impl FleetStore for Replica {
    fn is_up(&self) -> bool {
        !self.store.down.load(Ordering::SeqCst)
    }
    async fn get(&self, key: &FleetKey) -> Result<Option<Stored>, StoreDown> {
        if !self.is_up() {
            return Err(StoreDown);
        }
        let raw = self.store.values.lock().get(key.token_key()).cloned();
        Ok(raw.map(|raw| Stored {
            token: serde_json::from_slice(&raw).expect("stored by publish"),
            raw,
        }))
    }
    async fn lease(&self, key: &FleetKey, _ttl: Duration) -> Result<bool, StoreDown> {
        if !self.is_up() {
            return Err(StoreDown);
        }
        let mut leases = self.store.leases.lock();
        if leases.contains_key(key.token_key()) {
            return Ok(false);
        }
        leases.insert(key.token_key().to_string(), self.owner);
        Ok(true)
    }
    async fn release(&self, key: &FleetKey) {
        let mut leases = self.store.leases.lock();
        if leases.get(key.token_key()) == Some(&self.owner) {
            leases.remove(key.token_key());
            drop(leases);
            self.store.announce(key);
        }
    }
    async fn publish(
        &self,
        key: &FleetKey,
        token: &SharedToken,
        _ttl: Duration,
    ) -> Result<Vec<u8>, StoreDown> {
        if !self.is_up() {
            return Err(StoreDown);
        }
        let raw = serde_json::to_vec(token).expect("json");
        self.store
            .values
            .lock()
            .insert(key.token_key().to_string(), raw.clone());
        self.store.announce(key);
        Ok(raw)
    }
    async fn invalidate(&self, key: &FleetKey, raw: &[u8]) -> Result<bool, StoreDown> {
        if !self.is_up() {
            return Err(StoreDown);
        }
        let mut values = self.store.values.lock();
        if values.get(key.token_key()).is_some_and(|v| v == raw) {
            values.remove(key.token_key());
            return Ok(true);
        }
        Ok(false)
    }
    async fn subscribe(&self, key: &FleetKey) -> Result<Box<dyn Announcements>, StoreDown> {
        if !self.is_up() {
            return Err(StoreDown);
        }
        let rx = self
            .store
            .channels
            .lock()
            .entry(key.token_key().to_string())
            .or_insert_with(|| broadcast::channel(16).0)
            .subscribe();
        Ok(Box::new(Channel(rx)))
    }
}

/// Counts token requests of all replicas; each takes 100 ms and lives `lifetime`.
struct Counting {
    n: Arc<AtomicU32>,
    lifetime: Duration,
}

#[async_trait]
impl TokenFetcher for Counting {
    async fn fetch(&self, _now: SystemTime) -> Result<AccessToken, FetchError> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(AccessToken {
            value: format!("t{n}"),
            lifetime: self.lifetime,
        })
    }
}

/// `count` replicas' sources of one identity on `store`, refreshers started.
fn replicas(
    count: u32,
    store: &Arc<MemoryStore>,
    requests: &Arc<AtomicU32>,
    lifetime: Duration,
) -> Vec<Arc<TokenSource>> {
    (0..count)
        .map(|owner| replica(owner, RenewalPolicy::default(), store, requests, lifetime))
        .collect()
}

/// Replica `owner`'s source of the one identity on `store`, renewing by `policy`.
fn replica(
    owner: u32,
    policy: RenewalPolicy,
    store: &Arc<MemoryStore>,
    requests: &Arc<AtomicU32>,
    lifetime: Duration,
) -> Arc<TokenSource> {
    let clock = Clock::following_tokio(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let fetcher = Counting {
        n: Arc::clone(requests),
        lifetime,
    };
    let s = TokenSource::with_clock(
        "fleet",
        Box::new(fetcher),
        policy,
        TokenMetrics::detached(),
        clock,
    );
    let store: Arc<dyn FleetStore> = Arc::new(Replica {
        store: Arc::clone(store),
        owner,
    });
    s.join_fleet(FleetLink::new(
        store,
        FleetKey::new("test", "identity"),
        Duration::from_secs(10),
    ));
    s.spawn_refresher(&tokio::runtime::Handle::current());
    s
}

/// A replica that keeps a wider margin than the one that obtained the token renews an adopted
/// token before its own margin, not at the other's later renewal time: its token is usable at
/// every moment.
#[tokio::test(start_paused = true)]
async fn an_adopted_token_is_renewed_before_the_adopters_own_margin() {
    let store = Arc::new(MemoryStore::default());
    let requests = Arc::new(AtomicU32::new(0));
    let lifetime = Duration::from_secs(30);
    let late = RenewalPolicy {
        refresh_ratio: 0.95,
        min_time_left: Duration::from_secs(1),
        ..RenewalPolicy::default()
    };
    let early = RenewalPolicy {
        refresh_ratio: 0.3,
        min_time_left: Duration::from_secs(8),
        ..RenewalPolicy::default()
    };
    let a = replica(0, late, &store, &requests, lifetime);
    a.token().await.expect("token");
    let b = replica(1, early, &store, &requests, lifetime);
    b.token().await.expect("adopted");
    assert_eq!(requests.load(Ordering::SeqCst), 1, "b adopted a's token");
    for step in 0..240 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            b.usable_now(Instant::now()).is_some(),
            "b holds no usable token {} ms after adopting",
            (step + 1) * 250
        );
    }
}

#[tokio::test(start_paused = true)]
async fn replicas_sharing_a_store_fetch_once_per_renewal() {
    let store = Arc::new(MemoryStore::default());
    let requests = Arc::new(AtomicU32::new(0));
    let fleet = replicas(3, &store, &requests, Duration::from_secs(100));
    for s in &fleet {
        s.token().await.expect("token");
    }
    assert_eq!(
        requests.load(Ordering::SeqCst),
        1,
        "one request at cold start"
    );
    let first: Vec<_> = fleet
        .iter()
        .map(|s| s.usable_now(Instant::now()).unwrap().0)
        .collect();
    assert!(first.iter().all(|a| *a == first[0]), "one token for all");
    // Five lifetimes: renewed at 72–80 % each time, by one replica for all.
    tokio::time::sleep(Duration::from_secs(500)).await;
    let n = requests.load(Ordering::SeqCst);
    assert!(
        (6..=8).contains(&n),
        "{n} token requests in 500 s of 100 s tokens"
    );
    let now: Vec<_> = fleet
        .iter()
        .map(|s| s.usable_now(Instant::now()).unwrap().0)
        .collect();
    assert!(now.iter().all(|a| *a == now[0]), "still one token for all");
}

#[tokio::test(start_paused = true)]
async fn replicas_without_a_store_fetch_alone_and_converge_when_it_answers() {
    let store = Arc::new(MemoryStore::default());
    store.down.store(true, Ordering::SeqCst);
    let requests = Arc::new(AtomicU32::new(0));
    let fleet = replicas(3, &store, &requests, Duration::from_secs(100));
    for s in &fleet {
        s.token().await.expect("a token without the store");
    }
    assert_eq!(requests.load(Ordering::SeqCst), 3, "each alone");
    store.down.store(false, Ordering::SeqCst);
    // Within one lifetime every replica has renewed once through the store.
    tokio::time::sleep(Duration::from_secs(100)).await;
    let converged = requests.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(300)).await;
    let n = requests.load(Ordering::SeqCst) - converged;
    assert!(
        (3..=5).contains(&n),
        "{n} token requests in 300 s once converged"
    );
}

#[tokio::test(start_paused = true)]
async fn an_upstream_401_is_one_refresh_for_the_fleet() {
    let store = Arc::new(MemoryStore::default());
    let requests = Arc::new(AtomicU32::new(0));
    let fleet = replicas(3, &store, &requests, Duration::from_secs(3600));
    let mut held = Vec::new();
    for s in &fleet {
        held.push(s.token().await.expect("token").1);
    }
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    for (s, generation) in fleet.iter().zip(&held) {
        assert_eq!(s.invalidate(*generation), Rejection::Dropped);
    }
    for s in &fleet {
        s.token().await.expect("the replacement");
    }
    assert_eq!(
        requests.load(Ordering::SeqCst),
        2,
        "one refresh for three replicas"
    );
    let now: Vec<_> = fleet
        .iter()
        .map(|s| s.usable_now(Instant::now()).unwrap().0)
        .collect();
    assert!(now.iter().all(|a| *a == now[0]) && now[0] == "Bearer t2");
}
