//! Upstream host names followed while running (docs/proxy-behaviour.md "Upstream addresses"):
//! each route's name is resolved in the background — at start, every [`REFRESH`], and soon
//! after a connect failure — and the peer new connections use is swapped in with `arc-swap`.
//! The request path only loads the current peer; it never resolves and never waits.
//!
//! A name that does not resolve at start leaves the route without a peer: its requests get
//! 502 `upstream_unreachable` and `/status` says why, until a later resolution succeeds. A
//! failed re-resolution keeps the last good addresses.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use pingora::upstreams::peer::{HttpPeer, Peer};

/// How often a resolved name is resolved again.
pub const REFRESH: Duration = Duration::from_secs(30);
/// The least time between two resolutions a connect failure asks for, and how soon an
/// unresolved name is tried again.
pub const RETRY: Duration = Duration::from_secs(1);

/// What the last resolution of a route's upstream gave.
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    /// The peer new connections use (the first address); `None` while the name never resolved.
    pub peer: Option<Arc<HttpPeer>>,
    /// Every address of the last successful resolution.
    pub addrs: Vec<SocketAddr>,
    /// Wall-clock time of the last successful resolution.
    pub resolved_at: Option<SystemTime>,
    /// Why the last resolution failed, while it did (kept until one succeeds).
    pub error: Option<String>,
    /// When the last resolution failed.
    pub failed_at: Option<SystemTime>,
    /// `peer`'s connection-pool key ([`Peer::reuse_hash`]).
    pub reuse_hash: u64,
}

/// A route's upstream address, kept current in the background.
pub struct UpstreamAddress {
    host: String,
    port: u16,
    /// Timeouts, TLS, SNI and trust roots; its address is replaced by each resolution.
    template: HttpPeer,
    /// `server.hosts_file`: names resolved from this file only.
    hosts_file: Option<PathBuf>,
    current: ArcSwap<Resolution>,
    wake: tokio::sync::Notify,
    asked: AtomicBool,
}

impl UpstreamAddress {
    /// The upstream `host:port` of a route whose peers are built from `template`, resolved
    /// from `hosts_file` when given (else the system resolver). Not resolved yet.
    pub fn new(host: &str, port: u16, template: HttpPeer, hosts_file: Option<PathBuf>) -> Self {
        UpstreamAddress {
            host: host.to_string(),
            port,
            template,
            hosts_file,
            current: ArcSwap::from_pointee(Resolution::default()),
            wake: tokio::sync::Notify::new(),
            asked: AtomicBool::new(false),
        }
    }

    /// An upstream that is `peer`'s address, resolved once and for all (benches, tests).
    pub fn fixed(peer: HttpPeer) -> Arc<Self> {
        let (host, port) = match peer.address().as_inet() {
            Some(a) => (a.ip().to_string(), a.port()),
            None => (String::new(), 0),
        };
        let resolution = Resolution {
            addrs: peer.address().as_inet().into_iter().copied().collect(),
            reuse_hash: peer.reuse_hash(),
            resolved_at: Some(SystemTime::now()),
            peer: Some(Arc::new(peer.clone())),
            ..Resolution::default()
        };
        Arc::new(UpstreamAddress {
            host,
            port,
            template: peer,
            hosts_file: None,
            current: ArcSwap::from_pointee(resolution),
            wake: tokio::sync::Notify::new(),
            asked: AtomicBool::new(false),
        })
    }

    /// The peer for a new connection, or why there is none (the name never resolved).
    #[inline]
    pub fn peer(&self) -> Result<Arc<HttpPeer>, String> {
        let current = self.current.load();
        match &current.peer {
            Some(p) => Ok(Arc::clone(p)),
            None => {
                self.connect_failed();
                Err(current
                    .error
                    .clone()
                    .unwrap_or_else(|| format!("{}:{} is not resolved yet", self.host, self.port)))
            }
        }
    }

    /// The last resolution, as the request path reads it (no reference count taken; do not
    /// hold it across an `await`).
    #[inline]
    pub fn current(&self) -> arc_swap::Guard<Arc<Resolution>> {
        self.current.load()
    }

    /// The template's options: timeouts, TLS settings (the same for every address).
    pub fn options(&self) -> &pingora::upstreams::peer::PeerOptions {
        &self.template.options
    }

    /// The last resolution, for `/status`.
    pub fn resolution(&self) -> Arc<Resolution> {
        self.current.load_full()
    }

    /// `host:port` as configured.
    pub fn name(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// A connection to the current address failed: resolve again soon (at most once per
    /// [`RETRY`]).
    pub fn connect_failed(&self) {
        if !self.asked.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// Resolves now (blocking the calling thread; at start and at reload, never on the
    /// request path) and keeps the result.
    ///
    /// # Errors
    /// The resolver's message when the name does not resolve; the last good addresses stay.
    pub fn resolve_blocking(&self) -> Result<(), String> {
        let result = resolve_blocking(&self.host, self.port, self.hosts_file.as_deref());
        self.apply(result)
    }

    fn apply(&self, result: Result<Vec<SocketAddr>, String>) -> Result<(), String> {
        let old = self.current.load();
        let mut next = (**old).clone();
        let outcome = match result {
            Ok(addrs) => {
                let first = addrs[0];
                if old.peer.as_ref().map(|p| p.address().as_inet()) != Some(Some(&first)) {
                    let mut peer = self.template.clone();
                    peer._address = pingora::protocols::l4::socket::SocketAddr::Inet(first);
                    next.reuse_hash = peer.reuse_hash();
                    next.peer = Some(Arc::new(peer));
                    if old.peer.is_some() {
                        tracing::info!(upstream = %self.name(), address = %first, "upstream address changed");
                    }
                }
                next.addrs = addrs;
                next.resolved_at = Some(SystemTime::now());
                next.error = None;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(upstream = %self.name(), error = %e, "upstream does not resolve");
                next.error = Some(e.clone());
                next.failed_at = Some(SystemTime::now());
                Err(e)
            }
        };
        self.current.store(Arc::new(next));
        outcome
    }

    /// Keeps the name resolved on `runtime` while the route lives: every [`REFRESH`] (every
    /// [`RETRY`] while it never resolved), and after a connect failure. An IP literal needs
    /// no task.
    pub fn follow(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        if self.host.parse::<IpAddr>().is_ok() {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                let Some(this) = weak.upgrade() else { return };
                let wait = if this.current.load().peer.is_some() {
                    REFRESH
                } else {
                    RETRY
                };
                // Hold no strong reference while waiting: a route replaced by a reload ends
                // its task at the next wake.
                let notified = {
                    let this = Arc::clone(&this);
                    async move { this.wake.notified().await }
                };
                drop(this);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = notified => {}
                }
                let Some(this) = weak.upgrade() else { return };
                let result = resolve(this.host.clone(), this.port, this.hosts_file.clone()).await;
                let _ = this.apply(result);
                drop(this);
                tokio::time::sleep(RETRY).await;
                if let Some(this) = weak.upgrade() {
                    this.asked.store(false, Ordering::Release);
                }
            }
        });
    }
}

/// Resolves `host:port` off the async workers: from `hosts_file` only when given, else with
/// the system resolver (`getaddrinfo`).
pub async fn resolve(
    host: String,
    port: u16,
    hosts_file: Option<PathBuf>,
) -> Result<Vec<SocketAddr>, String> {
    tokio::task::spawn_blocking(move || resolve_blocking(&host, port, hosts_file.as_deref()))
        .await
        .unwrap_or_else(|e| Err(format!("resolver task failed: {e}")))
}

/// [`resolve`], blocking the calling thread.
pub fn resolve_blocking(
    host: &str,
    port: u16,
    hosts_file: Option<&Path>,
) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = match hosts_file {
        Some(path) => {
            // A regular file of bounded size: a FIFO or device would block or exhaust the
            // resolver's thread, and with it every later resolution and reload.
            let bytes = crate::files::read_regular_capped(path, crate::files::HOSTS_FILE_LIMIT)
                .map_err(|e| format!("hosts file {}: {e}", path.display()))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| format!("hosts file {}: not UTF-8 text", path.display()))?;
            hosts_lookup(&text, host)
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect()
        }
        None => std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map_err(|e| e.to_string())?
            .collect(),
    };
    if addrs.is_empty() {
        let source = hosts_file.map_or(String::new(), |p| format!(" in {}", p.display()));
        return Err(format!("{host}: no address{source}"));
    }
    Ok(addrs)
}

/// The addresses `text` (hosts(5) format: `address name [alias…]`, `#` comments) gives
/// `name` (any case, a trailing `.` ignored), in file order.
pub fn hosts_lookup(text: &str, name: &str) -> Vec<IpAddr> {
    let name = name.trim_end_matches('.');
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let ip = words.next()?.parse::<IpAddr>().ok()?;
            words
                .any(|w| w.trim_end_matches('.').eq_ignore_ascii_case(name))
                .then_some(ip)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> HttpPeer {
        HttpPeer::new("127.0.0.1:1", false, "api.test".to_string())
    }

    #[test]
    fn hosts_format() {
        let text = "# comment\n127.0.0.2 api.test other.test # trailing\n\n::1 API.test.\nbad line\n10.0.0.1 else.test\n";
        assert_eq!(
            hosts_lookup(text, "api.test"),
            vec![
                "127.0.0.2".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert!(hosts_lookup(text, "missing.test").is_empty());
    }

    #[test]
    fn a_hosts_file_that_is_no_regular_file_is_an_error_not_a_wait() {
        let dir = std::env::temp_dir().join(format!("tokengate-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("hosts.fifo");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        // Nothing ever writes to the FIFO: opening it to read would wait forever.
        let err = resolve_blocking("api.test", 443, Some(&fifo)).unwrap_err();
        assert!(err.contains("a FIFO, not a regular file"), "{err}");
        let err = resolve_blocking("api.test", 443, Some(Path::new("/dev/zero"))).unwrap_err();
        assert!(err.contains("a device"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unresolved_then_resolved_then_moved_and_a_failure_keeps_the_last_good() {
        let dir = std::env::temp_dir().join(format!("tg-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts");
        std::fs::write(&file, "").unwrap();
        let up = UpstreamAddress::new("api.test", 8443, template(), Some(file.clone()));
        let err = up.resolve_blocking().unwrap_err();
        assert!(err.contains("api.test: no address in"), "{err}");
        assert!(up.peer().is_err());
        assert!(up.resolution().error.is_some());

        std::fs::write(&file, "127.0.0.7 api.test\n").unwrap();
        up.resolve_blocking().unwrap();
        let first = up.peer().unwrap();
        assert_eq!(first.address().to_string(), "127.0.0.7:8443");
        assert_eq!(first.sni, "api.test", "SNI and options from the template");
        assert!(up.resolution().error.is_none());

        std::fs::write(&file, "127.0.0.8 api.test\n").unwrap();
        up.resolve_blocking().unwrap();
        let moved = up.peer().unwrap();
        assert_eq!(moved.address().to_string(), "127.0.0.8:8443");
        assert_ne!(
            moved.reuse_hash(),
            first.reuse_hash(),
            "a new connection pool"
        );
        assert_eq!(up.resolution().reuse_hash, moved.reuse_hash());

        std::fs::write(&file, "").unwrap();
        assert!(up.resolve_blocking().is_err());
        assert_eq!(up.peer().unwrap().address().to_string(), "127.0.0.8:8443");
        assert!(up.resolution().error.is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_failure_and_the_refresh_resolve_again_in_the_background() {
        let dir = std::env::temp_dir().join(format!("tg-hosts-bg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts");
        std::fs::write(&file, "127.0.0.7 api.test\n").unwrap();
        let up = Arc::new(UpstreamAddress::new(
            "api.test",
            80,
            template(),
            Some(file.clone()),
        ));
        up.resolve_blocking().unwrap();
        up.follow(&tokio::runtime::Handle::current());

        std::fs::write(&file, "127.0.0.8 api.test\n").unwrap();
        // Within the refresh period, nothing asked: still the old address.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(up.peer().unwrap().address().to_string(), "127.0.0.7:80");
        // A connect failure: resolved again at once (in the background).
        up.connect_failed();
        wait_for(&up, "127.0.0.8:80").await;

        // The periodic refresh, without any failure.
        std::fs::write(&file, "127.0.0.9 api.test\n").unwrap();
        tokio::time::sleep(REFRESH + RETRY * 2).await;
        wait_for(&up, "127.0.0.9:80").await;

        // The task ends with the route.
        let weak = Arc::downgrade(&up);
        drop(up);
        tokio::time::sleep(REFRESH * 2).await;
        assert!(weak.upgrade().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Waits (on the paused clock, letting the blocking resolution finish) until `up` uses
    /// `addr`.
    async fn wait_for(up: &UpstreamAddress, addr: &str) {
        for _ in 0..200 {
            if up.peer().is_ok_and(|p| p.address().to_string() == addr) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            tokio::task::yield_now().await;
        }
        panic!(
            "still {:?}, not {addr}",
            up.peer().map(|p| p.address().to_string())
        );
    }
}
