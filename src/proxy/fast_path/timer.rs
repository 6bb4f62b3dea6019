//! Read and write timeouts for a connection's whole life from one timer.

use std::future::Future;
use std::io;
use std::task::Poll;
use std::time::Duration;

/// How often a connection's [`Timer`] wakes while one of its reads or writes waits.
pub(super) const TIMER_TICK: Duration = Duration::from_secs(1);

/// One timer per connection for all its read and write timeouts, instead of a timer entry
/// registered and dropped per operation (which cost ~1 µs per request: docs/architecture.md
/// "The hot path"). It is re-armed only when it fires (at most once per [`TIMER_TICK`] while
/// something waits) or when an operation's deadline is nearer than its next firing, so a timeout
/// fires on time.
#[derive(Default)]
pub(super) struct Timer {
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Timer {
    /// `fut` bounded by `limit` (`None`: no limit). The future is polled once first: most
    /// reads and writes are ready at once and then read no clock at all.
    pub(super) async fn bounded<T>(
        &mut self,
        limit: Option<Duration>,
        fut: impl Future<Output = io::Result<T>>,
    ) -> io::Result<T> {
        let mut fut = std::pin::pin!(fut);
        if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
        {
            return r;
        }
        let Some(limit) = limit else {
            return fut.await;
        };
        let deadline = tokio::time::Instant::now() + limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            while sleep.as_mut().poll(cx).is_ready() {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
                }
                sleep.as_mut().reset((now + TIMER_TICK).min(deadline));
            }
            Poll::Pending
        })
        .await
    }
}
