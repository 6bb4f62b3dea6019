//! The fleet store (`[cluster]`, docs/fleet.md): gateways that share a Redis (or Valkey) share
//! each credential identity's access token.
//!
//! This module only speaks to Redis; the protocol that decides when to read, lease, publish or
//! invalidate lives with the token lifecycle (`token/fleet.rs`). Per credential identity
//! ([`FleetKey`]) there are three names:
//!
//! | name | holds |
//! | --- | --- |
//! | `{prefix}:token:{id}` | the shared token, sealed ([`seal`]), expiring with the token (`SET … PX`) |
//! | `{prefix}:lease:{id}` | the owner id of the replica obtaining a token now (`SET NX PX`) |
//! | `{prefix}:chan:{id}` | a pub/sub channel: a token was published or a lease released |
//!
//! Redis is never needed to serve: every operation is bounded by `cluster.timeout` (a connect by
//! [`CONNECT_BUDGET`] when longer), and after a failure the store counts as down
//! (`tokengate_cluster_up` 0) and is skipped, without waiting, until a background `PING` answers
//! again. At start, operations wait for the first `PING` (connected, refused or timed out).

pub mod seal;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::config::{AuthConfig, ClusterConfig, Grant, TokenEndpointLocation};
use crate::metrics::{ClusterMetrics, ClusterOp, ClusterOutcome};
use seal::Sealer;

/// How often the store is pinged (sets `tokengate_cluster_up`; brings a down store back).
const PING_EVERY: Duration = Duration::from_secs(1);

/// How long a connect (TCP, TLS, `AUTH`) may take, when longer than `cluster.timeout`: a TLS
/// handshake can take longer than a command. At start, token sources wait for the first
/// connect up to this long, so replicas starting together share their first tokens.
pub const CONNECT_BUDGET: Duration = Duration::from_secs(2);

/// Deletes `KEYS[1]` when it still holds `ARGV[1]` (compare-and-delete), and then announces on
/// `KEYS[2]`. A lease is released only by its owner; a token is invalidated only while it is
/// still the refused one.
const DELETE_IF_EQUAL: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  return 1
end
return 0
";

/// The Redis names of one credential identity.
#[derive(Debug, Clone)]
pub struct FleetKey {
    token: String,
    lease: String,
    channel: String,
}

impl FleetKey {
    /// The names of identity `id` under `prefix`: `{prefix}:token:{id}`, `{prefix}:lease:{id}`,
    /// `{prefix}:chan:{id}`.
    pub fn new(prefix: &str, id: &str) -> FleetKey {
        FleetKey {
            token: format!("{prefix}:token:{id}"),
            lease: format!("{prefix}:lease:{id}"),
            channel: format!("{prefix}:chan:{id}"),
        }
    }

    /// The key naming the shared token (also the sealed value's associated data).
    pub fn token_key(&self) -> &str {
        &self.token
    }
}

/// A token as the fleet shares it (the sealed plaintext).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SharedToken {
    /// The access token. Secret: never logged.
    #[serde(rename = "t")]
    pub access_token: String,
    /// Expiry, Unix milliseconds.
    #[serde(rename = "e")]
    pub expires_at_ms: u64,
    /// When the fleet renews it, Unix milliseconds.
    #[serde(rename = "r")]
    pub refresh_at_ms: u64,
    /// Random id of this token in the fleet: tells two publications apart.
    #[serde(rename = "g")]
    pub id: u64,
}

impl std::fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedToken")
            .field("expires_at_ms", &self.expires_at_ms)
            .field("refresh_at_ms", &self.refresh_at_ms)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A shared token read from the store, with its stored bytes (for compare-and-delete).
#[derive(Debug, Clone)]
pub struct Stored {
    /// The token.
    pub token: SharedToken,
    /// The sealed bytes as stored.
    pub raw: Vec<u8>,
}

/// Redis did not answer in time, refused the command, or is known to be down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreDown;

/// What the fleet protocol (`token/fleet.rs`) needs of a store: [`Fleet`] on Redis in
/// production; the token lifecycle's tests use one in memory.
#[async_trait::async_trait]
pub trait FleetStore: Send + Sync + 'static {
    /// Whether the store answered the last operation.
    fn is_up(&self) -> bool;
    /// The shared token of `key`; `Ok(None)`: none, or one that does not open.
    async fn get(&self, key: &FleetKey) -> Result<Option<Stored>, StoreDown>;
    /// Takes the lease of `key` for `ttl`; `Ok(false)`: another replica holds it.
    async fn lease(&self, key: &FleetKey, ttl: Duration) -> Result<bool, StoreDown>;
    /// Releases the lease of `key` if this replica holds it, and announces it.
    async fn release(&self, key: &FleetKey);
    /// Stores `token` for `ttl` and announces it; returns the stored bytes.
    async fn publish(
        &self,
        key: &FleetKey,
        token: &SharedToken,
        ttl: Duration,
    ) -> Result<Vec<u8>, StoreDown>;
    /// Deletes the token of `key` while it is still `raw`; `Ok(false)`: replaced or gone.
    async fn invalidate(&self, key: &FleetKey, raw: &[u8]) -> Result<bool, StoreDown>;
    /// Subscribes to `key`'s announcements (before reading the token again).
    async fn subscribe(&self, key: &FleetKey) -> Result<Box<dyn Announcements>, StoreDown>;
}

/// Announcements on one identity's channel ([`FleetStore::subscribe`]).
#[async_trait::async_trait]
pub trait Announcements: Send {
    /// Waits for the next announcement until `deadline`. `false`: the deadline passed or
    /// the subscription ended.
    async fn next(&mut self, deadline: Instant) -> bool;
}

/// The connection to the fleet's Redis, shared by every token source of the gateway.
pub struct Fleet {
    client: redis::Client,
    conn: ConnectionManager,
    sealer: Sealer,
    prefix: String,
    timeout: Duration,
    /// Whether the last operation or ping succeeded. While false, operations fail at once.
    up: AtomicBool,
    /// True once the first ping has finished (either way); operations wait for it.
    settled: tokio::sync::watch::Sender<bool>,
    metrics: ClusterMetrics,
    /// This replica's lease owner id.
    owner: String,
    display: String,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("redis", &self.display)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Why the fleet store could not be set up (a URL the client library refuses).
#[derive(Debug, thiserror::Error)]
#[error("cluster.redis: {0}")]
pub struct FleetError(String);

impl Fleet {
    /// The store `config` describes, connecting lazily on `runtime` (no Redis is needed to
    /// start). Starts the background ping, which ends when the returned `Arc` is dropped.
    ///
    /// # Errors
    /// [`FleetError`] when the client library refuses the URL (message without password).
    pub fn start(
        config: &ClusterConfig,
        metrics: ClusterMetrics,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Arc<Self>, FleetError> {
        let client = redis::Client::open(config.redis.expose())
            .map_err(|_| FleetError(format!("\"{}\" is not a Redis URL", config.redis_display)))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.max(CONNECT_BUDGET)))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(config.timeout);
        let _in_runtime = runtime.enter();
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| FleetError(format!("{}: {:?}", config.redis_display, e.kind())))?;
        let fleet = Arc::new(Fleet {
            client,
            conn,
            sealer: Sealer::new(&config.encryption_key.0),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            up: AtomicBool::new(false),
            settled: tokio::sync::watch::channel(false).0,
            metrics,
            owner: uuid::Uuid::new_v4().simple().to_string(),
            display: config.redis_display.clone(),
        });
        fleet.metrics.set_up(false);
        let weak = Arc::downgrade(&fleet);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(PING_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(fleet) = weak.upgrade() else { return };
                fleet.ping().await;
            }
        });
        Ok(fleet)
    }

    /// The Redis URL with its password hidden.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// This replica's lease owner id (random per process).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The Redis names of a credential identity: a SHA-256 of the route name, grant, token
    /// endpoint (or issuer), client id, subject, scope, audience and resource, so different
    /// credentials never share a token. `subject`: a per-user token's subject (`None`: the
    /// route's own, whose `jwt_bearer` subject is in `auth`).
    pub fn key(&self, route: &str, auth: &AuthConfig, subject: Option<&str>) -> FleetKey {
        let mut h = Sha256::new();
        let mut field = |v: &str| {
            h.update((v.len() as u64).to_be_bytes());
            h.update(v.as_bytes());
        };
        field(route);
        field(auth.grant.name());
        match &auth.endpoint {
            TokenEndpointLocation::Url(u) => field(&format!("token_endpoint {u}")),
            TokenEndpointLocation::Issuer(u) => field(&format!("issuer {u}")),
        }
        field(&auth.client_id);
        let (grant_subject, resource) = match &auth.grant {
            Grant::JwtBearer { subject, .. } => (subject.as_str(), ""),
            Grant::ClientCredentials { resource } => ("", resource.as_deref().unwrap_or("")),
        };
        field(subject.unwrap_or(grant_subject));
        field(if subject.is_some() {
            "per-user"
        } else {
            "route"
        });
        field(auth.scope.as_deref().unwrap_or(""));
        field(auth.audience.as_deref().unwrap_or(""));
        field(resource);
        let id: String = h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        FleetKey::new(&self.prefix, &id)
    }

    /// Runs one command within the timeout; an error or timeout marks the store down and is
    /// counted for `op`.
    async fn run<T>(
        &self,
        op: ClusterOp,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreDown> {
        self.settle().await;
        if !self.is_up() {
            self.metrics.op(op, ClusterOutcome::Error);
            return Err(StoreDown);
        }
        // The connection manager bounds connect and response; this bounds a reconnect too.
        match tokio::time::timeout(self.timeout * 2, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::debug!(redis = %self.display, error = ?e.kind(), "fleet store command failed");
                self.metrics.op(op, ClusterOutcome::Error);
                self.mark_down();
                Err(StoreDown)
            }
            Err(_) => {
                self.metrics.op(op, ClusterOutcome::Error);
                self.mark_down();
                Err(StoreDown)
            }
        }
    }

    /// Waits for the first ping (at start only; at once afterwards).
    async fn settle(&self) {
        if *self.settled.borrow() {
            return;
        }
        let mut rx = self.settled.subscribe();
        let budget = CONNECT_BUDGET + self.timeout * 2;
        let _ = tokio::time::timeout(budget, rx.wait_for(|done| *done)).await;
    }

    fn mark_down(&self) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                redis = %self.display,
                "fleet store unreachable; each token is obtained by this gateway alone until it answers again"
            );
        }
        self.metrics.set_up(false);
    }

    async fn ping(&self) {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING").to_owned();
        // A ping may have to reconnect: the connect budget, then the command's timeout.
        let budget = self.timeout.max(CONNECT_BUDGET) + self.timeout;
        let ok = matches!(
            tokio::time::timeout(budget, cmd.query_async::<String>(&mut conn)).await,
            Ok(Ok(_))
        );
        let first = !*self.settled.borrow();
        if ok {
            if !self.up.swap(true, Ordering::Relaxed) && !first {
                tracing::info!(redis = %self.display, "fleet store answers again; sharing tokens");
            }
            self.metrics.set_up(true);
        } else if first {
            tracing::warn!(
                redis = %self.display,
                "fleet store unreachable at start; each token is obtained by this gateway alone until it answers"
            );
        } else {
            self.mark_down();
        }
        self.settled.send_replace(true);
    }
}

#[async_trait::async_trait]
impl FleetStore for Fleet {
    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The shared token of `key`. `Ok(None)`: none, or one that does not open with this
    /// fleet's key (another fleet's, or altered), counted `miss`.
    async fn get(&self, key: &FleetKey) -> Result<Option<Stored>, StoreDown> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("GET").arg(&key.token).to_owned();
        let raw: Option<Vec<u8>> = self.run(ClusterOp::Get, cmd.query_async(&mut conn)).await?;
        let stored = raw.and_then(|raw| {
            let plain = self.sealer.open(key.token.as_bytes(), &raw)?;
            let token = serde_json::from_slice::<SharedToken>(&plain).ok()?;
            Some(Stored { token, raw })
        });
        self.metrics.op(
            ClusterOp::Get,
            if stored.is_some() {
                ClusterOutcome::Ok
            } else {
                ClusterOutcome::Miss
            },
        );
        Ok(stored)
    }

    /// Takes the lease of `key` for `ttl` (`SET NX PX`). `Ok(false)`: another replica holds it.
    async fn lease(&self, key: &FleetKey, ttl: Duration) -> Result<bool, StoreDown> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("SET")
            .arg(&key.lease)
            .arg(&self.owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .to_owned();
        let set: Option<String> = self
            .run(ClusterOp::Lease, cmd.query_async(&mut conn))
            .await?;
        let taken = set.is_some();
        self.metrics.op(
            ClusterOp::Lease,
            if taken {
                ClusterOutcome::Ok
            } else {
                ClusterOutcome::Miss
            },
        );
        Ok(taken)
    }

    /// Releases the lease of `key` if this replica still owns it (compare-and-delete), and
    /// announces it so waiting replicas look again at once.
    async fn release(&self, key: &FleetKey) {
        self.settle().await;
        if !self.is_up() {
            return;
        }
        let mut conn = self.conn.clone();
        let script = redis::Script::new(DELETE_IF_EQUAL);
        let mut inv = script.key(&key.lease);
        inv.key(&key.channel).arg(&self.owner).arg("released");
        let call = inv.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(self.timeout * 2, call).await {
            Ok(Ok(_)) => {}
            _ => self.mark_down(),
        }
    }

    /// Stores `token` under `key` until it expires (`SET … PX`) and announces it on the
    /// channel, in one transaction. Returns the stored bytes.
    async fn publish(
        &self,
        key: &FleetKey,
        token: &SharedToken,
        ttl: Duration,
    ) -> Result<Vec<u8>, StoreDown> {
        let plain = serde_json::to_vec(token).map_err(|_| StoreDown)?;
        let raw = self.sealer.seal(key.token.as_bytes(), &plain);
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(&key.token)
            .arg(&raw)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .ignore()
            .cmd("PUBLISH")
            .arg(&key.channel)
            .arg("published")
            .ignore();
        self.run::<()>(ClusterOp::Publish, pipe.query_async(&mut conn))
            .await?;
        self.metrics.op(ClusterOp::Publish, ClusterOutcome::Ok);
        Ok(raw)
    }

    /// Deletes the shared token of `key` only while it is still `raw` (the refused one): a
    /// token another replica published meanwhile stays. `Ok(false)`: already replaced or gone
    /// (counted `miss`).
    async fn invalidate(&self, key: &FleetKey, raw: &[u8]) -> Result<bool, StoreDown> {
        let mut conn = self.conn.clone();
        let script = redis::Script::new(DELETE_IF_EQUAL);
        let mut inv = script.key(&key.token);
        inv.key(&key.channel).arg(raw).arg("invalidated");
        let deleted: i64 = self
            .run(ClusterOp::Invalidate, inv.invoke_async(&mut conn))
            .await?;
        self.metrics.op(
            ClusterOp::Invalidate,
            if deleted == 1 {
                ClusterOutcome::Ok
            } else {
                ClusterOutcome::Miss
            },
        );
        Ok(deleted == 1)
    }

    /// Subscribes to `key`'s channel. Subscribe first, then read the token: a publication
    /// between the two is then never missed.
    async fn subscribe(&self, key: &FleetKey) -> Result<Box<dyn Announcements>, StoreDown> {
        self.settle().await;
        if !self.is_up() {
            return Err(StoreDown);
        }
        let open = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&key.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(self.timeout * 2, open).await {
            Ok(Ok(pubsub)) => Ok(Box::new(Subscription { pubsub })),
            _ => {
                self.mark_down();
                Err(StoreDown)
            }
        }
    }
}

/// A Redis subscription to one identity's channel.
struct Subscription {
    pubsub: redis::aio::PubSub,
}

#[async_trait::async_trait]
impl Announcements for Subscription {
    async fn next(&mut self, deadline: Instant) -> bool {
        let mut messages = self.pubsub.on_message();
        matches!(
            tokio::time::timeout_at(deadline, messages.next()).await,
            Ok(Some(_))
        )
    }
}
