//! Client connections to the proxy listeners: how many may be open at once
//! (`server.max_connections`, gauge `tokengate_connections`) and the stall bounds pingora-proxy's
//! HTTP/1 session is given for the requests the fast path hands it, so both paths bound a
//! client the same way (docs/proxy-behaviour.md "Client bounds").

use std::sync::atomic::{AtomicUsize, Ordering};

use pingora::protocols::http::ServerSession;
use pingora_prometheus::prometheus::IntGauge;

use crate::config::ClientLimits;

/// Most refused connections drained at once before they are closed (each holds a task for at
/// most two seconds); more are closed right after their refusal.
pub const MAX_LINGERING: usize = 1024;

/// Open client connections over all proxy listeners, counted for `server.max_connections`,
/// and refused ones still draining.
#[derive(Default)]
pub struct ClientConnections {
    open: AtomicUsize,
    lingering: AtomicUsize,
}

/// A refused connection draining before its close, counted until dropped.
pub struct Lingering<'a>(&'a AtomicUsize);

impl Drop for Lingering<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open client connection, counted in [`ClientConnections`] and `tokengate_connections`
/// until dropped.
pub struct OpenConnection<'a> {
    count: &'a ClientConnections,
    gauge: &'a IntGauge,
}

impl ClientConnections {
    /// Counts a new connection, or `None` when `max` are open already (the caller closes it).
    pub fn open<'a>(&'a self, max: usize, gauge: &'a IntGauge) -> Option<OpenConnection<'a>> {
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            return None;
        }
        gauge.inc();
        Some(OpenConnection { count: self, gauge })
    }

    /// A place among the [`MAX_LINGERING`] refused connections that may drain, or `None`.
    pub fn linger(&self) -> Option<Lingering<'_>> {
        self.lingering
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_LINGERING).then_some(n + 1)
            })
            .ok()
            .map(|_| Lingering(&self.lingering))
    }

    /// Connections open now.
    pub fn current(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.count.open.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// Gives pingora-proxy's HTTP/1 session for one request the client bounds the fast path keeps:
/// `body_timeout` per request-body read, `send_timeout` per response write, `idle_timeout`
/// for keep-alive (none while the gateway is `closing`).
pub fn bound_session(session: &mut ServerSession, limits: &ClientLimits, closing: bool) {
    session.set_keepalive((!closing).then_some(limits.idle_timeout.as_secs().max(1)));
    session.set_read_timeout(Some(limits.body_timeout));
    session.set_write_timeout(Some(limits.send_timeout));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_are_open_and_a_closed_one_frees_a_place() {
        let gauge = IntGauge::new("t", "t").unwrap();
        let count = ClientConnections::default();
        let a = count.open(2, &gauge).expect("first");
        let b = count.open(2, &gauge).expect("second");
        assert!(count.open(2, &gauge).is_none());
        assert_eq!((count.current(), gauge.get()), (2, 2));
        drop(a);
        assert_eq!((count.current(), gauge.get()), (1, 1));
        let _c = count.open(2, &gauge).expect("a place was freed");
        drop(b);
        assert_eq!((count.current(), gauge.get()), (1, 1));
    }

    #[test]
    fn at_most_max_lingering_refusals_drain() {
        let count = ClientConnections::default();
        let held: Vec<_> = (0..MAX_LINGERING)
            .map(|_| count.linger().unwrap())
            .collect();
        assert!(count.linger().is_none());
        drop(held);
        assert!(count.linger().is_some());
    }
}
