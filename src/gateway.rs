//! Assembles a running gateway from a validated [`Config`]: token sources and their refresher
//! runtime, compiled routes, one pingora proxy service per listener, the admin service.
//!
//! [`run`] blocks until a shutdown signal (the `run` command); [`GatewayHandle::start`] runs the
//! same thing on a thread and stops it on drop (`demo` and the tests).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use http::{HeaderValue, Method};
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, WrappedX509};
use tokio::sync::mpsc;

use crate::admin::AdminApp;
use crate::config::{Config, RouteConfig};
use crate::metrics::Metrics;
use crate::oauth::TokenClient;
use crate::proxy::fast_path::ListenerApp;
use crate::proxy::routes::{normalise_prefix, Route, RouteTable};
use crate::proxy::SharedState;
use crate::token::{RenewalPolicy, TokenSource};

/// Why the gateway could not start (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The upstream host could not be resolved.
    #[error("routes[{index}] ({route}): upstream {host}:{port} does not resolve: {reason}")]
    Resolve {
        /// Route index.
        index: usize,
        /// Route name.
        route: String,
        /// Upstream host.
        host: String,
        /// Upstream port.
        port: u16,
        /// Resolver message.
        reason: String,
    },
    /// The route's `ca_file` could not be read or parsed.
    #[error("routes[{index}].ca_file: {reason}")]
    CaFile {
        /// Route index.
        index: usize,
        /// What went wrong.
        reason: String,
    },
    /// A listener address cannot be bound (in use, not a local address, no permission).
    #[error("{key}: cannot listen on {addr}: {reason}")]
    Bind {
        /// The config key (`server.listen`, `server.admin_listen`, `routes[i].listen`).
        key: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        reason: String,
    },
    /// Runtime or HTTP client construction failed.
    #[error("{0}")]
    Internal(String),
}

/// Everything built from a config before pingora starts.
pub struct Built {
    /// Shared request-path state.
    pub state: Arc<SharedState>,
    /// The token refresher runtime (one thread). Dropping it stops every refresher.
    pub token_runtime: tokio::runtime::Runtime,
    config: Config,
}

impl Built {
    /// Compiles routes and token sources and starts the refreshers (each fetches its first token
    /// at once).
    pub fn new(config: Config) -> Result<Self, StartError> {
        let metrics = Metrics::new();
        let token_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tokengate-token")
            .enable_all()
            .build()
            .map_err(|e| StartError::Internal(format!("token runtime: {e}")))?;
        let mut routes = Vec::with_capacity(config.routes.len());
        for (index, rc) in config.routes.iter().enumerate() {
            let ca_pem = match &rc.ca_file {
                Some(path) => Some(std::fs::read(path).map_err(|e| StartError::CaFile {
                    index,
                    reason: format!("{}: {e}", path.display()),
                })?),
                None => None,
            };
            let client = TokenClient::new(
                rc.auth.clone(),
                ca_pem.as_deref(),
                rc.connect_timeout,
                rc.auth.token_timeout,
            )
            .map_err(|e| StartError::CaFile {
                index,
                reason: e.to_string(),
            })?;
            let policy = RenewalPolicy {
                refresh_ratio: rc.auth.refresh_ratio,
                min_time_left: rc.auth.min_time_left,
                // A waiting request gives up shortly after the fetch it waits for must have
                // ended (token_timeout bounds the whole fetch, discovery included).
                max_wait: rc.auth.token_timeout + Duration::from_secs(1),
                ..RenewalPolicy::default()
            };
            let source = TokenSource::new(
                rc.name.clone(),
                Box::new(client),
                policy,
                metrics.token(&rc.name),
            );
            routes.push(compile_route(
                index,
                rc,
                source,
                ca_pem.as_deref(),
                &metrics,
            )?);
        }
        for route in &routes {
            route.token.spawn_refresher(token_runtime.handle());
        }
        let state = Arc::new(SharedState::new(
            routes,
            config.server.allowed_clients.clone(),
            config.server.replay_body_limit,
            metrics,
        ));
        Ok(Built {
            state,
            token_runtime,
            config,
        })
    }

    /// The pingora server with one proxy service per listener and the admin service.
    fn server(&self) -> Result<Server, StartError> {
        let mut conf = ServerConf {
            threads: self.config.server.threads.max(1),
            grace_period_seconds: Some(self.config.server.grace_period.as_secs()),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        };
        conf.upstream_keepalive_pool_size = conf.upstream_keepalive_pool_size.max(128);
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();

        let shared: Vec<(usize, &RouteConfig)> = self
            .config
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.listen.is_none())
            .collect();
        if !self.config.server.listen.is_empty() && !shared.is_empty() {
            let table = RouteTable::shared(shared);
            let app = ListenerApp::new(table, Arc::clone(&self.state), &server.configuration);
            let mut svc = Service::new("tokengate proxy".to_string(), app);
            for addr in &self.config.server.listen {
                svc.add_listener(proxy_listener(*addr));
            }
            server.add_service(svc);
        }
        for (index, rc) in self.config.routes.iter().enumerate() {
            if let Some(addr) = rc.listen {
                let app = ListenerApp::new(
                    RouteTable::own(index),
                    Arc::clone(&self.state),
                    &server.configuration,
                );
                let mut svc = Service::new(format!("tokengate proxy ({})", rc.name), app);
                svc.add_listener(proxy_listener(addr));
                server.add_service(svc);
            }
        }
        let admin = AdminApp::new(Arc::clone(&self.state), &self.config);
        let mut admin_svc = Service::new(
            "tokengate admin".to_string(),
            pingora::apps::http_app::HttpServer::new_app(admin),
        );
        admin_svc.add_tcp(&self.config.server.admin_listen.to_string());
        server.add_service(admin_svc);
        Ok(server)
    }

    /// The config this was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// A proxy listener on `addr`. Reads are not buffered by pingora: both the fast path and
/// pingora-proxy's HTTP/1 session read into buffers of their own, so pingora's 64 KiB
/// per-connection read buffer would only add a copy and memory. Writes keep pingora's small
/// buffer (pingora-proxy writes a response head and body separately).
fn proxy_listener(addr: SocketAddr) -> ListenerConfig {
    ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings {
        read: Some(0),
        write: None,
    })
}

/// Runs the gateway until `shutdown` fires; blocks the calling thread.
pub fn run_with(built: Built, shutdown: Box<dyn ShutdownSignalWatch>) -> Result<(), StartError> {
    let server = built.server()?;
    server.run(RunArgs {
        shutdown_signal: shutdown,
    });
    drop(built);
    Ok(())
}

/// Runs the gateway until SIGTERM or SIGINT (both drain for `server.grace_period`).
pub fn run(config: Config) -> Result<(), StartError> {
    check_listeners(&config)?;
    let built = Built::new(config)?;
    run_with(built, Box::new(UnixSignals))
}

/// Binds (and releases) every listener address before pingora starts: pingora binds in its
/// service threads, retries a taken port for half a minute and then panics in that thread while
/// the rest of the process keeps running. Failing here gives a clear error and exit 1.
pub fn check_listeners(config: &Config) -> Result<(), StartError> {
    let mut addrs: Vec<(String, SocketAddr)> = config
        .server
        .listen
        .iter()
        .map(|a| ("server.listen".to_string(), *a))
        .collect();
    addrs.push(("server.admin_listen".into(), config.server.admin_listen));
    for (i, r) in config.routes.iter().enumerate() {
        if let Some(a) = r.listen {
            addrs.push((format!("routes[{i}].listen"), a));
        }
    }
    for (key, addr) in addrs {
        std::net::TcpListener::bind(addr).map_err(|e| StartError::Bind {
            key,
            addr,
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// SIGTERM and SIGINT: graceful terminate (SPEC "Signals"). SIGQUIT: fast.
struct UnixSignals;

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
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); ShutdownSignal::GracefulTerminate }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); ShutdownSignal::GracefulTerminate }
            _ = quit.recv() => ShutdownSignal::FastShutdown,
        }
    }
}

struct ChannelSignal(tokio::sync::Mutex<mpsc::Receiver<()>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelSignal {
    async fn recv(&self) -> ShutdownSignal {
        let _ = self.0.lock().await.recv().await;
        ShutdownSignal::FastShutdown
    }
}

/// A gateway running on its own thread; stopped when dropped. For `demo` and tests.
pub struct GatewayHandle {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    state: Arc<SharedState>,
    /// Proxy listener addresses (shared ones first, then routes' own).
    pub listen: Vec<SocketAddr>,
    /// Admin listener address.
    pub admin: SocketAddr,
}

impl GatewayHandle {
    /// Builds and starts the gateway; returns once every listener accepts connections.
    pub fn start(config: Config) -> Result<Self, StartError> {
        let mut listen = config.server.listen.clone();
        listen.extend(config.routes.iter().filter_map(|r| r.listen));
        let admin = config.server.admin_listen;
        check_listeners(&config)?;
        let built = Built::new(config)?;
        let state = Arc::clone(&built.state);
        let server = built.server()?;
        let (tx, rx) = mpsc::channel(1);
        let thread = std::thread::Builder::new()
            .name("tokengate-gateway".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(ChannelSignal(tokio::sync::Mutex::new(rx))),
                });
                drop(built);
            })
            .map_err(|e| StartError::Internal(e.to_string()))?;
        let handle = GatewayHandle {
            stop: Some(tx),
            thread: Some(thread),
            state,
            listen,
            admin,
        };
        for addr in handle.listen.iter().chain(std::iter::once(&handle.admin)) {
            wait_listening(*addr)?;
        }
        Ok(handle)
    }

    /// Shared state (routes, token sources, metrics), for assertions in tests.
    pub fn state(&self) -> &Arc<SharedState> {
        &self.state
    }

    /// Stops the gateway and waits for its thread.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.try_send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Waits until `addr` accepts a TCP connection (the listener is up), for at most 10 s.
fn wait_listening(addr: SocketAddr) -> Result<(), StartError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut delay = Duration::from_millis(1);
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(StartError::Internal(format!(
                "listener {addr} did not come up within 10 s"
            )));
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

fn compile_route(
    index: usize,
    rc: &RouteConfig,
    token: Arc<TokenSource>,
    ca_pem: Option<&[u8]>,
    metrics: &Metrics,
) -> Result<Route, StartError> {
    let up = &rc.upstream;
    // Resolved once at start (pingora peers hold a socket address); pingora's own resolution
    // would panic on a name that does not resolve.
    let resolve_error = |reason: String| StartError::Resolve {
        index,
        route: rc.name.clone(),
        host: up.host.clone(),
        port: up.port,
        reason,
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(up.host.as_str(), up.port))
        .map_err(|e| resolve_error(e.to_string()))?
        .next()
        .ok_or_else(|| resolve_error("no address".into()))?;
    let mut peer = HttpPeer::new(addr, up.tls, up.host.clone());
    peer.options.connection_timeout = Some(rc.connect_timeout);
    peer.options.total_connection_timeout = Some(rc.connect_timeout * 2);
    peer.options.read_timeout = Some(rc.read_timeout);
    peer.options.write_timeout = Some(rc.read_timeout);
    peer.options.idle_timeout = Some(Duration::from_secs(60));
    peer.options.verify_cert = true;
    peer.options.verify_hostname = true;
    if let Some(pem) = ca_pem {
        peer.options.ca = Some(trust_roots(index, pem)?);
        // pingora's connection-reuse key does not cover the CA list: without this, a connection
        // verified against this route's private CA could be reused by a route that does not
        // trust it (same address and SNI). Routes with the same CA file still share connections.
        peer.group_key = ca_group_key(pem);
    }
    let allow_header = rc.allow_methods.as_ref().and_then(|m| {
        let joined = m.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
        HeaderValue::from_str(&joined).ok()
    });
    let host_header = HeaderValue::from_str(&up.authority)
        .map_err(|_| StartError::Internal(format!("routes[{index}].upstream: invalid host")))?;
    Ok(Route {
        index,
        name: rc.name.clone(),
        prefix: normalise_prefix(&rc.path_prefix),
        strip_prefix: rc.strip_prefix,
        base_path: up.base_path.trim_end_matches('/').to_string(),
        peer,
        host_header,
        allow_methods: rc.allow_methods.clone(),
        allow_header,
        strip_headers: rc.strip_headers.to_vec(),
        forward_cookies: rc.forward_cookies,
        token,
        metrics: metrics.route(&rc.name),
    })
}

/// A connection-pool key for peers trusting the CA file with contents `pem` (never 0, the key
/// of peers with the default trust store).
fn ca_group_key(pem: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pem.hash(&mut h);
    h.finish().max(1)
}

/// System roots plus the route's `ca_file` certificates (SPEC: "extra trust roots"). pingora's
/// per-peer CA list replaces the default store, so the system roots are included here.
fn trust_roots(index: usize, pem: &[u8]) -> Result<Arc<[WrappedX509]>, StartError> {
    let mut ders: Vec<Vec<u8>> = rustls_native_certs::load_native_certs()
        .certs
        .into_iter()
        .map(|c| c.to_vec())
        .collect();
    let mut extra = 0;
    for block in pem::parse_many(pem).map_err(|e| StartError::CaFile {
        index,
        reason: format!("not PEM: {e}"),
    })? {
        if block.tag() == "CERTIFICATE" {
            ders.push(block.contents().to_vec());
            extra += 1;
        }
    }
    if extra == 0 {
        return Err(StartError::CaFile {
            index,
            reason: "no CERTIFICATE block".into(),
        });
    }
    // parse_x509 panics on invalid DER, so check each certificate first.
    let valid: Vec<WrappedX509> = ders
        .into_iter()
        .filter(|d| x509_parser::parse_x509_certificate(d).is_ok())
        .map(|d| WrappedX509::new(d, parse_x509))
        .collect();
    Ok(valid.into())
}
