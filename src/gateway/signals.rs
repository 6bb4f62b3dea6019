//! Signals while the gateway starts and the drain after SIGTERM/SIGINT (docs/operations.md
//! "Shutdown"): handlers in place from the first moment of `run`, the shutdown delay, then the
//! drain that ends the process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};

use crate::proxy::Live;

/// Keeps SIGHUP from ending the process while it starts: SIGHUP's default action is to
/// terminate, and [`super::run`] listens for it only once the gateway is built (after the config,
/// secrets and key files are read and upstream hosts resolved). Call it first thing; a SIGHUP
/// before the gateway runs is then ignored (the file is being read at start anyway). The
/// handler stays installed for the life of the process.
///
/// # Errors
/// The signal handler could not be installed.
pub fn catch_sighup_while_starting() -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let _guard = runtime.enter();
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map(drop)
}

/// Set when SIGTERM or SIGINT arrives while `run` starts, before [`UnixSignals`] listens.
static TERMINATED_WHILE_STARTING: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Catches SIGTERM and SIGINT from the first moment of `run` until the gateway listens for them
/// itself: without it a signal in the first moments (reading the config, key files and
/// secrets) ends the process at once with the signal's status, or, as a container's PID 1, is
/// ignored. The first one is remembered, and the drain starts as soon as the gateway runs.
/// Call it first thing, with [`catch_sighup_while_starting`].
///
/// # Errors
/// The signal handlers or their thread could not be set up.
pub fn catch_termination_while_starting() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut term, mut int) = {
        let _guard = runtime.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    std::thread::Builder::new()
        .name("tokengate-start-signals".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            TERMINATED_WHILE_STARTING.store(true, std::sync::atomic::Ordering::Release);
        })?;
    Ok(())
}

/// SIGTERM and SIGINT: the drain (docs/operations.md "Shutdown"). SIGQUIT: fast, also during
/// the shutdown delay.
pub(super) struct UnixSignals {
    pub(super) live: Arc<Live>,
    /// `server.shutdown_delay`.
    pub(super) delay: Duration,
    /// `server.grace_period`.
    pub(super) grace: Duration,
    /// `server.admin_listen`: served on through the drain ([`crate::admin::draining`]).
    pub(super) admin: SocketAddr,
}

#[async_trait]
impl ShutdownSignalWatch for UnixSignals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; shutting down");
            return ShutdownSignal::FastShutdown;
        };
        // A signal that came while starting was caught then; one after this look reaches
        // the streams above.
        let name = if TERMINATED_WHILE_STARTING.load(std::sync::atomic::Ordering::Acquire) {
            "SIGTERM or SIGINT while starting"
        } else {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = quit.recv() => return ShutdownSignal::FastShutdown,
            }
        };
        self.live.drain.begin();
        tracing::info!(
            signal = name,
            shutdown_delay_ms = self.delay.as_millis() as u64,
            "shutting down: /readyz answers 503; serving on for the shutdown delay"
        );
        tokio::select! {
            _ = tokio::time::sleep(self.delay) => {}
            _ = quit.recv() => return ShutdownSignal::FastShutdown,
        }
        // pingora stops the listeners once this returns; the process exits when the drain
        // ends (its own grace period, a little longer, is only a backstop).
        self.live.drain.close();
        crate::admin::draining::serve_until_exit(Arc::clone(&self.live), self.admin);
        let live = Arc::clone(&self.live);
        let grace = self.grace;
        let spawned = std::thread::Builder::new()
            .name("tokengate-drain".into())
            .spawn(move || drain_and_exit(&live, grace));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the drain; pingora's grace period applies");
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// Waits until no request is in flight, for at most `grace`, then ends the process with 0.
fn drain_and_exit(live: &Live, grace: Duration) {
    let started = std::time::Instant::now();
    tracing::info!(
        in_flight = live.drain.in_flight(),
        grace_period_ms = grace.as_millis() as u64,
        "listeners closed; draining the requests in flight"
    );
    if live.drain.wait_idle(started + grace) {
        tracing::info!(
            drained_ms = started.elapsed().as_millis() as u64,
            "no request in flight; exiting"
        );
    } else {
        tracing::warn!(
            in_flight = live.drain.in_flight(),
            "grace period over with requests in flight; exiting"
        );
    }
    std::process::exit(0);
}
