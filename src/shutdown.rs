//! The drain after SIGTERM/SIGINT (docs/operations.md "Shutdown"), in three steps:
//!
//! ```text
//!  signal ──► draining: /readyz answers 503; both paths keep accepting and serving
//!    │        for server.shutdown_delay (load balancers take the replica out)
//!    ▼
//!  closing:   listeners stop accepting; a kept-alive connection gets `Connection: close`
//!    │        on its current response and is closed after it
//!    ▼
//!  exit 0     as soon as no request is in flight, at the latest after server.grace_period
//! ```
//!
//! [`Drain`] is the state both proxy paths and the admin listener read; [`Drain::busy`] marks a
//! request in flight on either path.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Shutdown state shared by the listeners of one gateway.
#[derive(Debug, Default)]
pub struct Drain {
    draining: AtomicBool,
    closing: AtomicBool,
    in_flight: AtomicUsize,
}

impl Drain {
    /// A shutdown signal arrived: `/readyz` answers 503 from now on.
    pub fn begin(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether a shutdown has begun.
    #[inline]
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The shutdown delay is over: the listeners stop accepting, and kept-alive client
    /// connections are closed after their current response.
    pub fn close(&self) {
        self.draining.store(true, Ordering::Release);
        self.closing.store(true, Ordering::Release);
    }

    /// Whether connections are to be closed after their current response.
    #[inline]
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Marks one request in flight until the returned guard is dropped.
    #[inline]
    pub fn busy(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Blocks until no request is in flight, or until `deadline`. Returns whether the drain
    /// finished (`false`: requests were still in flight at the deadline).
    ///
    /// A request counts from the moment its head has been read; one whose connection was
    /// accepted just before the listeners closed may not have a head yet, so "none in flight"
    /// must hold on two looks [`SETTLE`] apart.
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        let mut idle_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if self.in_flight() == 0 {
                let since = *idle_since.get_or_insert(now);
                if now.duration_since(since) >= SETTLE {
                    return true;
                }
            } else {
                idle_since = None;
            }
            if now >= deadline {
                return self.in_flight() == 0;
            }
            std::thread::sleep(POLL.min(deadline.saturating_duration_since(now)));
        }
    }
}

/// How long "nothing in flight" must hold before the process exits.
pub const SETTLE: Duration = Duration::from_millis(50);
/// How often [`Drain::wait_idle`] looks.
const POLL: Duration = Duration::from_millis(10);

/// A request in flight ([`Drain::busy`]).
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct Busy<'a>(&'a Drain);

impl Drop for Busy<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request in flight on pingora-proxy's path, held in its per-request context (which must
/// own what it holds).
pub struct BusyOwned(std::sync::Arc<crate::proxy::Live>);

impl BusyOwned {
    /// Marks one request in flight on `live`'s drain until dropped.
    pub fn new(live: std::sync::Arc<crate::proxy::Live>) -> Self {
        live.drain.in_flight.fetch_add(1, Ordering::AcqRel);
        BusyOwned(live)
    }
}

impl Drop for BusyOwned {
    fn drop(&mut self) {
        self.0.drain.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_then_closing() {
        let d = Drain::default();
        assert!(!d.draining() && !d.closing());
        d.begin();
        assert!(d.draining() && !d.closing());
        d.close();
        assert!(d.draining() && d.closing());
    }

    #[test]
    fn waits_for_the_last_request_and_no_longer() {
        let d = std::sync::Arc::new(Drain::default());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let d2 = std::sync::Arc::clone(&d);
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _busy = d2.busy();
            held_tx.send(()).unwrap();
            rx.recv().unwrap();
        });
        held_rx.recv().unwrap();
        assert_eq!(d.in_flight(), 1);
        let start = Instant::now();
        // Still busy at the deadline.
        assert!(!d.wait_idle(start + Duration::from_millis(100)));
        assert!(start.elapsed() >= Duration::from_millis(100));
        let released = Instant::now();
        tx.send(()).unwrap();
        t.join().unwrap();
        assert!(d.wait_idle(Instant::now() + Duration::from_secs(30)));
        let took = released.elapsed();
        assert!(
            took >= SETTLE && took < Duration::from_secs(1),
            "exit {took:?} after the last request"
        );
        assert_eq!(d.in_flight(), 0);
    }
}
