//! Which plain requests the fast path forwards itself, and the access token each one carries:
//! the route's own, or a managed user's when the request names one (docs/per-user-tokens.md).

use std::sync::Arc;

use http::HeaderValue;

use super::request::{FieldsIn, Plain};
use super::Conn;
use crate::proxy::policy::{self, Subject};
use crate::proxy::routes::{Route, RouteTable};
use crate::proxy::{client_allowed, SharedState};
use crate::token::{Token, TokenCache, TokenSource};

/// A request the fast path forwards: its route (an index into `SharedState::routes`) and the
/// access token it carries.
pub(super) struct Admitted {
    pub(super) index: usize,
    pub(super) grant: Grant,
}

/// The access token a fast-path request carries.
pub(super) enum Grant {
    /// The route's own, taken out of the connection's [`TokenCache`] for the length of the
    /// request.
    Route(Arc<Token>),
    /// A managed user's (RFC 7523 §3 `sub`), with the source an upstream 401 is reported to.
    User {
        source: Arc<TokenSource>,
        authorization: HeaderValue,
        generation: u64,
    },
}

impl Grant {
    /// `Bearer <access token>`.
    #[inline]
    pub(super) fn authorization(&self) -> &HeaderValue {
        match self {
            Grant::Route(token) => token.authorization(),
            Grant::User { authorization, .. } => authorization,
        }
    }

    /// The token's generation at its source (an upstream 401 drops that generation only).
    #[inline]
    pub(super) fn generation(&self) -> u64 {
        match self {
            Grant::Route(token) => token.generation,
            Grant::User { generation, .. } => *generation,
        }
    }

    /// The source that issued the token: where an upstream 401 goes, and the next token after
    /// it comes from (RFC 6750 §3.1).
    #[inline]
    pub(super) fn source<'a>(&'a self, route: &'a Route) -> &'a TokenSource {
        match self {
            Grant::Route(_) => &route.token,
            Grant::User { source, .. } => source,
        }
    }

    /// Gives the route's token back to the connection's cache.
    #[inline(always)]
    pub(super) fn release(self, tokens: &mut TokenCache) {
        if let Grant::Route(token) = self {
            tokens.put_back(token);
        }
    }

    /// The same account's token usable at `now`, for a request whose body outlasted the token
    /// picked when its head arrived. `None`: none is usable now, pingora-proxy waits for one.
    pub(super) fn renew(
        self,
        route: &Route,
        tokens: &mut TokenCache,
        now: tokio::time::Instant,
    ) -> Option<Grant> {
        match self {
            Grant::Route(token) => {
                tokens.put_back(token);
                take_token(route, tokens, now).map(Grant::Route)
            }
            Grant::User { source, .. } => {
                let (authorization, generation) = source.usable_now(now)?;
                Some(Grant::User {
                    source,
                    authorization,
                    generation,
                })
            }
        }
    }
}

/// The admission decisions [`crate::proxy::Gateway::request_filter`] makes, for a plain
/// request: the client is allowed, the body fits the replay limit, a route matches, the method
/// is allowed, the policy's subject decision, and a token is usable now. `None`: pingora-proxy
/// decides (and answers any refusal, 403 `subject_not_allowed` included; a user's first
/// request waits there for the user's token).
pub(super) fn admit(
    table: &RouteTable,
    state: &SharedState,
    c: &mut Conn,
    req: &Plain,
    body_limit: usize,
    now: tokio::time::Instant,
) -> Option<Admitted> {
    if !c.allowed || req.body_len > body_limit {
        return None;
    }
    let path = &c.buf[req.target.start..req.path_end];
    let index = table.lookup(Some(&c.buf[req.host.clone()]), path)?;
    let route = &state.routes[index];
    if !route.allows(&req.method) {
        return None;
    }
    // A route without a subject field pays for no look at the fields.
    if route.subject_header.is_none() {
        let token = take_token(route, &mut c.tokens, now)?;
        return Some(Admitted {
            index,
            grant: Grant::Route(token),
        });
    }
    let view = FieldsIn {
        buf: &c.buf,
        fields: &c.fields,
    };
    let grant = match policy::subject(&view, route, c.client_ip) {
        Subject::Route => Grant::Route(take_token(route, &mut c.tokens, now)?),
        Subject::User(subject) => {
            let subject = std::str::from_utf8(subject).ok()?;
            let (source, authorization, generation) =
                route.subjects.as_ref()?.usable_now(subject, c.client_ip)?;
            Grant::User {
                source,
                authorization,
                generation,
            }
        }
        Subject::Refused => return None,
    };
    Some(Admitted { index, grant })
}

/// The route's token usable at `now`, taken out of the connection's cache for one request
/// (given back with [`TokenCache::put_back`]).
#[inline]
pub(super) fn take_token(
    route: &Route,
    tokens: &mut TokenCache,
    now: tokio::time::Instant,
) -> Option<Arc<Token>> {
    route.token.usable_cached(tokens, now)?;
    tokens.take()
}

impl Conn {
    /// Checks the client against `state.allowed_clients`: once per connection, and again
    /// after a reload.
    pub(super) fn check_client(&mut self, state: &SharedState) {
        self.peer_trusted = !state.trusted_proxies.is_empty()
            && self
                .peer_ip
                .is_some_and(|ip| policy::client::is_trusted(&state.trusted_proxies, ip));
        if self.client_ip != self.peer_ip {
            self.client_ip = self.peer_ip;
            self.client_ip_text = self
                .peer_ip
                .map(|ip| ip.to_canonical().to_string().into_bytes());
        }
        self.forward_entries = None;
        self.allowed = self
            .client_ip
            .is_some_and(|ip| client_allowed(&state.allowed_clients, ip));
    }

    /// Decides the client address of the request whose fields are in `self.fields`, from a
    /// trusted peer (docs/proxy-behaviour.md "Client address"), and checks it against
    /// `state.allowed_clients`.
    pub(super) fn judge_forwarded(&mut self, state: &SharedState) {
        let Some(peer) = self.peer_ip else {
            return;
        };
        let view = FieldsIn {
            buf: &self.buf,
            fields: &self.fields,
        };
        let client = policy::client::client_address(peer, &state.trusted_proxies, &view);
        if self.client_ip != Some(client.ip) {
            self.client_ip = Some(client.ip);
            self.client_ip_text = Some(client.ip.to_string().into_bytes());
        }
        self.forward_entries = client.forward_entries;
        self.allowed = client_allowed(&state.allowed_clients, client.ip);
    }
}
