//! Where the token lifecycle reads the time.
//!
//! * Monotonic time — renewal, backoff, the hold after an upstream 401, expiry, `max_wait` —
//!   is [`tokio::time::Instant`]: the system's monotonic clock in the gateway, and tokio's
//!   paused clock in tests that pause it (`#[tokio::test(start_paused = true)]`), so a test
//!   can let hours of a token's life pass at once. Reading it costs what
//!   [`std::time::Instant::now`] costs plus one atomic load: tokio's `test-util` feature is on
//!   in every build (pingora-core depends on tokio-test), and while no clock in the process was
//!   ever paused, as in the gateway, tokio reads the system clock after that load.
//! * Wall-clock time — an assertion's `iat`/`exp` (RFC 7523 §3), `/status` timestamps, the
//!   expiry gauge — comes from a [`Clock`] each [`super::TokenSource`] holds: the system clock
//!   in the gateway, or one that advances with tokio's clock in tests.

use std::time::SystemTime;

use tokio::time::Instant;

/// The wall clock of one token source. Not on the request path: read when a token is
/// requested or published, a fetch fails, or `/status` is asked.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// `None`: the system clock. `Some((start, wall))`: `wall` at the tokio instant `start`,
    /// advancing with tokio's clock.
    origin: Option<(Instant, SystemTime)>,
}

impl Clock {
    /// The system's wall clock ([`SystemTime::now`]), as the gateway runs.
    pub fn system() -> Clock {
        Clock { origin: None }
    }

    /// A wall clock that reads `wall` now and then advances exactly as tokio's clock does
    /// (paused or not): for tests on tokio's paused clock, whose wall-clock timestamps
    /// (`/status`, assertion times) then follow the time the test lets pass.
    pub fn following_tokio(wall: SystemTime) -> Clock {
        Clock {
            origin: Some((Instant::now(), wall)),
        }
    }

    /// The current wall-clock time.
    pub fn wall(&self) -> SystemTime {
        match self.origin {
            None => SystemTime::now(),
            Some((start, wall)) => wall + Instant::now().saturating_duration_since(start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[tokio::test(start_paused = true)]
    async fn a_clock_following_tokio_advances_with_the_paused_clock() {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = Clock::following_tokio(start);
        assert_eq!(clock.wall(), start);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.wall(), start + Duration::from_secs(3600));
    }

    #[test]
    fn the_system_clock_reads_system_time() {
        let before = SystemTime::now();
        let read = Clock::system().wall();
        assert!(read >= before && read <= SystemTime::now());
    }
}
