//! The fleet protocol of a token source (`[cluster]`, docs/fleet.md): the one place that decides
//! when a source reads, leases, publishes or invalidates the fleet's shared token. Route and
//! per-user sources both go through it; it runs only in the refresher, never on the request
//! path, and never while the source holds a usable token it does not need to renew.
//!
//! When the refresher is due to obtain a token (cold start, renewal, after a 401 drop):
//! 1. A token an upstream 401 dropped is deleted from the store, only if it is still the one
//!    stored (compare-and-delete): one refused generation, dropped fleet-wide.
//! 2. The stored token is adopted when it is not the one this source already holds, is not
//!    due for renewal and was not refused here.
//! 3. Else the source takes the lease (`SET NX PX`, owner id, `token_timeout` plus
//!    [`LEASE_MARGIN`]), looks once more (the previous holder may just have published), and
//!    fetches; the token is published (`SET PX` to its expiry, and an
//!    announcement on the channel) and the lease released (compare-and-delete).
//! 4. When another replica holds the lease, the source subscribes to the channel, then looks
//!    again (no lost wakeup), and waits for announcements until `token_timeout`: a published
//!    token is adopted; a released lease is taken over. After `token_timeout` it fetches itself.
//!
//! Whenever the store does not answer, the source fetches alone, as without `[cluster]`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{Token, TokenSource};
use crate::cluster::{FleetKey, FleetStore, SharedToken, Stored};
use crate::oauth::AccessToken;

/// The lease outlives the longest token request (`token_timeout`) by this much, so it is never
/// lost while its holder still waits for an answer.
pub const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// Adopted tokens are renewed up to this much (and at most 5 % of what is left of the token)
/// after the fleet's renewal time, at random, so the replica that obtained the token usually
/// renews it and the others find its successor.
const ADOPT_JITTER: Duration = Duration::from_secs(2);

/// A token source's place in the fleet: the store, its identity's names and what it holds.
pub struct FleetLink {
    fleet: Arc<dyn FleetStore>,
    key: FleetKey,
    token_timeout: Duration,
    state: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    /// The fleet token the source holds now.
    held: Option<Held>,
    /// A held token an upstream 401 dropped, still to be deleted from the store.
    refused: Option<Held>,
    /// How the current token came (for `/status`).
    last: Option<&'static str>,
}

#[derive(Clone)]
struct Held {
    /// The source's local generation of the token.
    generation: u64,
    /// The token's fleet id.
    id: u64,
    /// Its stored bytes, for compare-and-delete.
    raw: Vec<u8>,
}

/// What `/status` shows of a source's fleet state. No token, no key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetStatus {
    /// Whether the store answers now.
    pub store_up: bool,
    /// How the current token came: `adopted` (published by another replica),
    /// `obtained_under_lease` (fetched here and shared), `obtained_alone` (fetched here while
    /// the store did not answer, or after waiting `token_timeout` for another replica).
    pub token_from: Option<&'static str>,
    /// Whether the current token is the one stored in the fleet.
    pub shared: bool,
}

/// Whether to fetch after [`TokenSource::fleet_before_fetch`].
pub(super) enum Before {
    /// A token from the fleet is published; no fetch.
    Adopted,
    /// Fetch; `leased`: this replica holds the lease.
    Fetch { leased: bool },
}

impl FleetLink {
    /// A source's link to `fleet` under `key`; `token_timeout` bounds one token request.
    pub fn new(fleet: Arc<dyn FleetStore>, key: FleetKey, token_timeout: Duration) -> Self {
        FleetLink {
            fleet,
            key,
            token_timeout,
            state: Mutex::new(LinkState::default()),
        }
    }

    /// An upstream 401 dropped `generation`: its stored copy goes at the next attempt.
    pub(super) fn refused(&self, generation: u64) {
        let mut s = self.state.lock();
        if s.held.as_ref().is_some_and(|h| h.generation == generation) {
            s.refused = s.held.take();
        }
    }

    pub(super) fn status(&self, current: Option<&Token>) -> FleetStatus {
        let s = self.state.lock();
        FleetStatus {
            store_up: self.fleet.is_up(),
            token_from: s.last,
            shared: match (current, &s.held) {
                (Some(t), Some(h)) => t.generation == h.generation,
                _ => false,
            },
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl TokenSource {
    /// Steps 1–4 of the module documentation, up to the fetch.
    pub(super) async fn fleet_before_fetch(&self, link: &FleetLink) -> Before {
        let refused = link.state.lock().refused.take();
        if let Some(r) = refused {
            let _ = link.fleet.invalidate(&link.key, &r.raw).await;
        }
        match link.fleet.get(&link.key).await {
            Err(_) => return Before::Fetch { leased: false },
            Ok(Some(s)) if self.adoptable(link, &s) => return self.adopt(link, s),
            Ok(_) => {}
        }
        let ttl = link.token_timeout + LEASE_MARGIN;
        match link.fleet.lease(&link.key, ttl).await {
            Err(_) => return Before::Fetch { leased: false },
            Ok(true) => return self.leased(link).await,
            Ok(false) => {}
        }
        let deadline = Instant::now() + link.token_timeout;
        let Ok(mut sub) = link.fleet.subscribe(&link.key).await else {
            return Before::Fetch { leased: false };
        };
        loop {
            match link.fleet.get(&link.key).await {
                Err(_) => return Before::Fetch { leased: false },
                Ok(Some(s)) if self.adoptable(link, &s) => return self.adopt(link, s),
                Ok(_) => {}
            }
            // The holder may have released the lease without publishing (its request
            // failed): take over rather than wait out the timeout.
            match link.fleet.lease(&link.key, ttl).await {
                Err(_) => return Before::Fetch { leased: false },
                Ok(true) => return self.leased(link).await,
                Ok(false) => {}
            }
            if !sub.next(deadline).await {
                if Instant::now() < deadline {
                    // The subscription closed early: the store went away.
                    return Before::Fetch { leased: false };
                }
                tracing::info!(
                    route = %self.name,
                    subject = self.subject.as_deref().map(tracing::field::display),
                    "no token published by the fleet within token_timeout; fetching here"
                );
                return Before::Fetch { leased: false };
            }
        }
    }

    /// The lease is taken. A holder publishes before it releases, so a lease taken just after
    /// another replica released it may come with that replica's token: look once more.
    async fn leased(&self, link: &FleetLink) -> Before {
        match link.fleet.get(&link.key).await {
            Ok(Some(s)) if self.adoptable(link, &s) => {
                let adopted = self.adopt(link, s);
                link.fleet.release(&link.key).await;
                adopted
            }
            Err(_) => Before::Fetch { leased: false },
            Ok(_) => Before::Fetch { leased: true },
        }
    }

    /// After a fetch: shares `obtained` (the token just published here, if any) and releases
    /// the lease when this replica held it.
    pub(super) async fn fleet_after_fetch(
        &self,
        link: &FleetLink,
        obtained: Option<(Arc<Token>, String)>,
        leased: bool,
    ) {
        if let Some((token, value)) = obtained {
            let now = Instant::now();
            let wall = self.clock.wall();
            let expires_in = token
                .expires_at_wall
                .duration_since(wall)
                .unwrap_or_default();
            let shared = SharedToken {
                access_token: value,
                expires_at_ms: unix_ms(token.expires_at_wall),
                refresh_at_ms: unix_ms(wall + token.refresh_at.saturating_duration_since(now)),
                id: rand::random::<u64>() | 1,
            };
            let published = link.fleet.publish(&link.key, &shared, expires_in).await;
            let mut s = link.state.lock();
            s.last = Some(if leased {
                "obtained_under_lease"
            } else {
                "obtained_alone"
            });
            s.held = published.ok().map(|raw| Held {
                generation: token.generation,
                id: shared.id,
                raw,
            });
        }
        if leased {
            link.fleet.release(&link.key).await;
        }
    }

    /// Whether the stored token `s` should replace what this source holds.
    fn adoptable(&self, link: &FleetLink, s: &Stored) -> bool {
        let now_ms = unix_ms(self.clock.wall());
        let held_now = {
            let current = self.current.load();
            let state = link.state.lock();
            match (current.as_deref(), &state.held) {
                (Some(t), Some(h)) if t.generation == h.generation => Some(h.id),
                _ => None,
            }
        };
        held_now != Some(s.token.id)
            && now_ms < s.token.refresh_at_ms
            && now_ms + super::MIN_LIFETIME.as_millis() as u64 <= s.token.expires_at_ms
            && !self.was_dropped_value(&s.token.access_token)
    }

    fn adopt(&self, link: &FleetLink, s: Stored) -> Before {
        let now_ms = unix_ms(self.clock.wall());
        let lifetime = Duration::from_millis(s.token.expires_at_ms.saturating_sub(now_ms));
        // Short tokens: the jitter stays a small part of what is left.
        let jitter = ADOPT_JITTER
            .min(lifetime / 20)
            .mul_f64(rand::random::<f64>());
        let refresh_after =
            Duration::from_millis(s.token.refresh_at_ms.saturating_sub(now_ms)) + jitter;
        let token = AccessToken {
            value: s.token.access_token,
            lifetime,
        };
        match self.publish_as(token, Duration::ZERO, Instant::now(), Some(refresh_after)) {
            Some(t) => {
                let mut state = link.state.lock();
                state.held = Some(Held {
                    generation: t.generation,
                    id: s.token.id,
                    raw: s.raw,
                });
                state.last = Some("adopted");
                Before::Adopted
            }
            None => Before::Fetch { leased: false },
        }
    }
}
