//! Assembles a running gateway from a validated [`Config`]: token sources and their refresher
//! runtime, compiled routes (`proxy::route_compile`), one pingora proxy service per listener,
//! the admin service; applies a reloaded config (SIGHUP) and handles the shutdown signals.
//!
//! [`run`] blocks until a shutdown signal (the `run` command); [`GatewayHandle::start`] runs the
//! same thing on a thread and stops it on drop (`demo` and the tests).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;
use tokio::sync::mpsc;

use crate::admin::AdminApp;
use crate::cluster::{Fleet, FleetStore};
use crate::config::{AuthConfig, Config, ConfigErrors, RouteConfig, SubjectsConfig};
use crate::files;
use crate::metrics::Metrics;
use crate::oauth::TokenClient;
use crate::proxy::fast_path::ListenerApp;
use crate::proxy::route_compile::{compile_route, Unresolved};
use crate::proxy::routes::RouteTable;
use crate::proxy::{Live, SharedState};
use crate::token::fleet::FleetLink;
use crate::token::subjects::SubjectTokens;
use crate::token::{FirstToken, RenewalPolicy, TokenSource};
use crate::token_listener::TokenApp;

mod signals;

use signals::UnixSignals;
pub use signals::{catch_sighup_while_starting, catch_termination_while_starting};

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
    /// The state requests are served with; a reload replaces it.
    pub live: Arc<Live>,
    /// Applies a new config to the running gateway (SIGHUP).
    pub reloader: Arc<Reloader>,
    /// The token refresher runtime (one thread). Dropping it stops every refresher.
    pub token_runtime: tokio::runtime::Runtime,
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
        let fleet = match &config.cluster {
            Some(cluster) => Some(
                Fleet::start(cluster, metrics.cluster(), token_runtime.handle())
                    .map_err(|e| StartError::Internal(e.to_string()))?,
            ),
            None => None,
        };
        let (state, sources) = build_state(
            &config,
            &metrics,
            &[],
            token_runtime.handle(),
            Unresolved::Tolerate,
            fleet.as_ref(),
        )?;
        let sources = start_refreshers(sources, token_runtime.handle());
        let live = Arc::new(Live::new(state));
        let reloader = Arc::new(Reloader {
            live: Arc::clone(&live),
            metrics,
            runtime: token_runtime.handle().clone(),
            fleet,
            running: Mutex::new(Running { config, sources }),
        });
        Ok(Built {
            live,
            reloader,
            token_runtime,
        })
    }

    /// The pingora server with one proxy service per listener and the admin service.
    fn server(&self) -> Result<Server, StartError> {
        let config = self.reloader.config();
        let mut conf = ServerConf {
            threads: config.server.threads.max(1),
            // A backstop: `run`'s drain ends the process as soon as nothing is in flight, at
            // the latest after `grace_period` (crate::shutdown).
            grace_period_seconds: Some(config.server.grace_period.as_secs() + 2),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        };
        conf.upstream_keepalive_pool_size = conf.upstream_keepalive_pool_size.max(128);
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();

        let listeners = listeners(&config);
        // `/readyz` waits until each of these accepts (pingora binds them on other threads).
        let proxy_addrs = listeners
            .iter()
            .flat_map(|l| l.addrs.iter().copied())
            .collect();
        for (slot, listener) in listeners.into_iter().enumerate() {
            let app = ListenerApp::new(Arc::clone(&self.live), slot, &server.configuration);
            let mut svc = Service::new(listener.name, app);
            for addr in listener.addrs {
                svc.add_listener(proxy_listener(addr));
            }
            server.add_service(svc);
        }
        let admin = AdminApp::new(Arc::clone(&self.live), proxy_addrs);
        let mut admin_svc = Service::new(
            "tokengate admin".to_string(),
            pingora::apps::http_app::HttpServer::new_app(admin),
        );
        admin_svc.add_tcp(&config.server.admin_listen.to_string());
        server.add_service(admin_svc);
        if let Some(addr) = config.server.token_listen {
            let app = TokenApp::new(Arc::clone(&self.live), config.server.token_clients.clone());
            let mut svc = Service::new(
                "tokengate token listener".to_string(),
                pingora::apps::http_app::HttpServer::new_app(app),
            );
            svc.add_tcp(&addr.to_string());
            server.add_service(svc);
        }
        Ok(server)
    }
}

/// One proxy listener service: its addresses and the routes it serves.
struct Listener {
    name: String,
    addrs: Vec<SocketAddr>,
    table: RouteTable,
}

/// The proxy listeners `config` asks for, in slot order: the shared listeners (when any route
/// uses them), then each route's own listener in route order. A reload keeps the listeners,
/// so the slots of the old and the new config line up.
fn listeners(config: &Config) -> Vec<Listener> {
    let mut out = Vec::new();
    let shared: Vec<(usize, &RouteConfig)> = config
        .routes
        .iter()
        .enumerate()
        .filter(|(_, r)| r.listen.is_none())
        .collect();
    if !config.server.listen.is_empty() && !shared.is_empty() {
        out.push(Listener {
            name: "tokengate proxy".to_string(),
            addrs: config.server.listen.clone(),
            table: RouteTable::shared(shared),
        });
    }
    for (index, rc) in config.routes.iter().enumerate() {
        if let Some(addr) = rc.listen {
            out.push(Listener {
                name: format!("tokengate proxy ({})", rc.name),
                addrs: vec![addr],
                table: RouteTable::own(index),
            });
        }
    }
    out
}

/// A route's token source as running: what it was built from (a reload keeps the source, and
/// its token, when the new config builds the same one) and its refresher task.
struct RunningSource {
    auth: AuthConfig,
    ca_pem: Option<Vec<u8>>,
    connect_timeout: Duration,
    source: Arc<TokenSource>,
    /// The route's per-user tokens (`[routes.subjects]`), kept with the source.
    subjects: Option<Arc<SubjectTokens>>,
    /// `None` until [`start_refreshers`] ran, or a kept source's handle moved over from the
    /// running entry (a source built for a reload that failed never starts).
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl RunningSource {
    fn builds_same(&self, rc: &RouteConfig, ca_pem: &Option<Vec<u8>>) -> bool {
        self.source.name() == rc.name
            && self.auth == rc.auth
            && &self.ca_pem == ca_pem
            && self.connect_timeout == rc.connect_timeout
    }
}

/// Compiles `config` into a [`SharedState`]: routes, route tables, token sources. A source in
/// `running` that `config` builds the same (route name, `[routes.auth]` with secrets and key,
/// `ca_file` contents, `connect_timeout`) is reused with its token; other sources are new and
/// not started. Reads `ca_file`s and resolves upstream hosts.
fn build_state(
    config: &Config,
    metrics: &Arc<Metrics>,
    running: &[RunningSource],
    runtime: &tokio::runtime::Handle,
    unresolved: Unresolved,
    fleet: Option<&Arc<Fleet>>,
) -> Result<(SharedState, Vec<RunningSource>), StartError> {
    let mut routes = Vec::with_capacity(config.routes.len());
    let mut sources = Vec::with_capacity(config.routes.len());
    for (index, rc) in config.routes.iter().enumerate() {
        let ca_pem = match &rc.ca_file {
            Some(path) => Some(
                files::read_regular_capped(path, files::CA_FILE_LIMIT).map_err(|e| {
                    StartError::CaFile {
                        index,
                        reason: format!("{}: {e}", path.display()),
                    }
                })?,
            ),
            None => None,
        };
        let kept = running.iter().find(|r| r.builds_same(rc, &ca_pem));
        let source = match kept {
            Some(kept) => Arc::clone(&kept.source),
            None => new_source(index, rc, ca_pem.as_deref(), metrics, fleet)?,
        };
        // Kept with the source (same credentials); reloaded settings apply after the swap
        // ([`Reloader::apply`]).
        let subjects = match (&rc.subjects, kept.and_then(|k| k.subjects.as_ref())) {
            (None, _) => None,
            (Some(_), Some(kept)) => Some(Arc::clone(kept)),
            (Some(settings), None) => {
                let subjects =
                    new_subjects(index, rc, settings, ca_pem.as_deref(), metrics, runtime)?;
                if let Some(fleet) = fleet {
                    subjects.join_fleet(Arc::clone(fleet));
                }
                Some(subjects)
            }
        };
        routes.push(compile_route(
            index,
            rc,
            Arc::clone(&source),
            subjects.clone(),
            ca_pem.as_deref(),
            metrics,
            config.server.hosts_file.as_deref(),
            unresolved,
        )?);
        sources.push(RunningSource {
            auth: rc.auth.clone(),
            ca_pem,
            connect_timeout: rc.connect_timeout,
            source,
            subjects,
            refresher: None,
        });
    }
    // Each route's upstream name is followed while the route lives.
    for route in &routes {
        route.upstream.follow(runtime);
    }
    let mut state = SharedState::new(
        routes,
        config.server.allowed_clients.clone(),
        config.server.replay_body_limit,
        Arc::clone(metrics),
    );
    state.trusted_proxies = config.server.trusted_proxies.clone();
    state.limits = config.server.limits;
    state.tables = listeners(config).into_iter().map(|l| l.table).collect();
    state.route_info = crate::admin::route_info(config);
    Ok((state, sources))
}

/// The token endpoint client of route `index`, trusting `ca_pem` besides the system roots.
fn token_client(
    index: usize,
    rc: &RouteConfig,
    ca_pem: Option<&[u8]>,
) -> Result<TokenClient, StartError> {
    TokenClient::new(
        rc.auth.clone(),
        ca_pem,
        rc.connect_timeout,
        rc.auth.token_timeout,
    )
    .map_err(|e| StartError::CaFile {
        index,
        reason: e.to_string(),
    })
}

/// A new token source for route `index` (not started).
fn new_source(
    index: usize,
    rc: &RouteConfig,
    ca_pem: Option<&[u8]>,
    metrics: &Metrics,
    fleet: Option<&Arc<Fleet>>,
) -> Result<Arc<TokenSource>, StartError> {
    let client = token_client(index, rc, ca_pem)?;
    let source = TokenSource::new(
        rc.name.clone(),
        Box::new(client),
        renewal_policy(rc),
        metrics.token(&rc.name),
    );
    if let Some(fleet) = fleet {
        let key = fleet.key(&rc.name, &rc.auth, None);
        let store: Arc<dyn FleetStore> = fleet.clone();
        source.join_fleet(FleetLink::new(store, key, rc.auth.token_timeout));
    }
    Ok(source)
}

/// The per-user token cache of route `index` (`[routes.subjects]` `settings`).
fn new_subjects(
    index: usize,
    rc: &RouteConfig,
    settings: &SubjectsConfig,
    ca_pem: Option<&[u8]>,
    metrics: &Metrics,
    runtime: &tokio::runtime::Handle,
) -> Result<Arc<SubjectTokens>, StartError> {
    let client = token_client(index, rc, ca_pem)?;
    Ok(SubjectTokens::new(
        rc.name.clone(),
        client,
        renewal_policy(rc),
        settings.clone(),
        metrics.token(&rc.name).without_gauges(),
        metrics.subject_tokens(&rc.name),
        runtime.clone(),
    ))
}

/// The renewal settings of route `rc`'s token sources.
fn renewal_policy(rc: &RouteConfig) -> RenewalPolicy {
    RenewalPolicy {
        refresh_ratio: rc.auth.refresh_ratio,
        min_time_left: rc.auth.min_time_left,
        // A waiting request gives up shortly after the fetch it waits for must have
        // ended (token_timeout bounds the whole fetch, discovery included).
        max_wait: rc.auth.token_timeout + Duration::from_secs(1),
        ..RenewalPolicy::default()
    }
}

/// Starts the refresher of every source in `sources` that has none yet (each fetches its
/// first token at once).
fn start_refreshers(
    mut sources: Vec<RunningSource>,
    runtime: &tokio::runtime::Handle,
) -> Vec<RunningSource> {
    for s in &mut sources {
        if s.refresher.is_none() {
            s.refresher = Some(s.source.spawn_refresher(runtime));
        }
    }
    sources
}

/// Why a reload was rejected; the running config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway was not started from a file (`demo`, tests without one).
    #[error("no config file to reload from")]
    NoFile,
    /// The new file does not validate (every problem, one per line, as at start).
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A key that only a restart can change was changed.
    #[error("{key}: changed, but takes effect only on restart (listeners, threads, shutdown delay, grace period, logging and [cluster] are fixed at start); restart to apply it")]
    NeedsRestart {
        /// The config key.
        key: &'static str,
    },
    /// The new config cannot be built (an upstream that does not resolve, a bad `ca_file`).
    #[error("{0}")]
    Build(#[from] StartError),
    /// A route with new credentials or token settings could not obtain a token with them:
    /// one entry per such route, `routes[i] (name): <the token request's error>` (status, the
    /// authorization server's `error` and `error_description`; never a secret).
    #[error("{}", .0.join("; "))]
    TokenRefused(Vec<String>),
}

/// What a successful reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Routes in the new config.
    pub routes: usize,
    /// Token sources kept with their token (same credentials and token endpoint).
    pub sources_kept: usize,
    /// Token sources started anew (new routes, changed credentials, key or endpoint).
    pub sources_new: usize,
}

/// Applies a new config to the running gateway (SIGHUP, docs/operations.md "Reloading the config
/// (SIGHUP)"): re-reads the file, its secrets and key files, validates it like a start, and swaps
/// the routes, token sources, allowlist and replay limit in at once. Requests already admitted
/// finish with the config they were admitted with. Before the swap, every route that needs a new
/// token source (new credentials, key, token endpoint or issuer, subject, audience, scope or other
/// token settings; a new route) obtains a token with it, all at once, each within its route's
/// timeouts; that token is the new source's first. A config that fails validation, cannot be built,
/// changes a key fixed at start ([`ReloadError::NeedsRestart`]) or whose new credentials get no
/// token ([`ReloadError::TokenRefused`]) is rejected, and the running one keeps serving with the
/// tokens it holds. Counted in `tokengate_config_reloads_total{outcome}`.
pub struct Reloader {
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    /// Serialises reloads. std's Mutex, and its poisoning propagates: a reload that panicked
    /// may have swapped the live state without recording it here, and a later reload compared
    /// against this record could keep a token source the live routes no longer match. The
    /// panic ends only the reload task; the gateway keeps serving, and a restart reloads.
    running: Mutex<Running>,
    /// The fleet store (`[cluster]`), fixed at start.
    fleet: Option<Arc<Fleet>>,
}

struct Running {
    config: Config,
    sources: Vec<RunningSource>,
}

impl Reloader {
    /// The running config and sources.
    ///
    /// # Panics
    /// When an earlier reload panicked while holding them (see [`Reloader`]'s `running`).
    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running
            .lock()
            .expect("an earlier config reload panicked; restart tokengate to reload")
    }

    /// The config served now.
    pub fn config(&self) -> Config {
        self.running().config.clone()
    }

    /// Reloads from the file the running config came from, and logs the outcome in one line
    /// (never a secret: config errors name keys, not values; token errors are redacted).
    /// Blocking: reads files, resolves upstream hosts and waits for the token requests of new
    /// token sources, which run on the token runtime (so never call it on that runtime's
    /// worker thread).
    ///
    /// # Errors
    /// [`ReloadError`]; the running config keeps serving.
    pub fn reload_from_file(&self) -> Result<ReloadSummary, ReloadError> {
        let path = self.running().config.source.clone();
        let result = match path {
            Some(path) => Config::load(&path)
                .map_err(ReloadError::from)
                .and_then(|config| self.apply(config)),
            None => Err(ReloadError::NoFile),
        };
        self.metrics.config_reload(result.is_ok());
        match &result {
            Ok(s) => tracing::info!(
                routes = s.routes,
                token_sources_kept = s.sources_kept,
                token_sources_new = s.sources_new,
                "config reloaded"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "config reload rejected; the running config keeps serving"
            ),
        }
        result
    }

    /// Applies `config` (already validated) in place of the running one. Blocking, like
    /// [`Reloader::reload_from_file`].
    ///
    /// # Errors
    /// [`ReloadError::NeedsRestart`], [`ReloadError::Build`] or [`ReloadError::TokenRefused`];
    /// nothing changes then.
    pub fn apply(&self, config: Config) -> Result<ReloadSummary, ReloadError> {
        let mut running = self.running();
        if let Some(key) = needs_restart(&running.config, &config) {
            return Err(ReloadError::NeedsRestart { key });
        }
        let (state, mut sources) = build_state(
            &config,
            &self.metrics,
            &running.sources,
            &self.runtime,
            Unresolved::Reject,
            self.fleet.as_ref(),
        )?;
        let fresh: Vec<(usize, Arc<TokenSource>)> = sources
            .iter()
            .enumerate()
            .filter(|(_, new)| {
                !running
                    .sources
                    .iter()
                    .any(|old| Arc::ptr_eq(&old.source, &new.source))
            })
            .map(|(i, new)| (i, Arc::clone(&new.source)))
            .collect();
        // New credentials obtain a token before anything changes; it is the source's first.
        for (index, first) in self.verify_new_sources(&config, fresh)? {
            sources[index].source.start_with(first);
        }
        // A kept source keeps its refresher (a second one would double its token requests).
        for new in &mut sources {
            let mut old = running.sources.iter_mut();
            if let Some(old) = old.find(|o| Arc::ptr_eq(&o.source, &new.source)) {
                new.refresher = old.refresher.take();
            }
        }
        let sources = start_refreshers(sources, &self.runtime);
        // Reloaded `allow`, `header_clients` and `max_cached` take effect now, before the new
        // routes serve (a narrowed setting is never served after the swap); subjects no longer
        // allowed lose their tokens.
        for (s, rc) in sources.iter().zip(&config.routes) {
            if let (Some(cache), Some(settings)) = (&s.subjects, &rc.subjects) {
                cache.update(settings.clone());
            }
        }
        self.live.replace(state);
        let old = std::mem::replace(&mut running.sources, sources);
        let (kept, replaced): (Vec<_>, Vec<_>) = old.into_iter().partition(|s| {
            running
                .sources
                .iter()
                .any(|n| Arc::ptr_eq(&n.source, &s.source))
        });
        let summary = ReloadSummary {
            routes: config.routes.len(),
            sources_kept: kept.len(),
            sources_new: running.sources.len() - kept.len(),
        };
        running.config = config;
        for s in replaced {
            // A replaced source stops renewing at once, but still fetches for a request
            // admitted before the swap that waits for its token, until the grace period ends.
            s.source.retire();
            if !running
                .sources
                .iter()
                .any(|n| n.source.name() == s.source.name())
            {
                // A removed route: its token gauges would go stale (and trip expiry alerts).
                self.metrics.forget_route(s.source.name());
            }
            if let Some(refresher) = s.refresher {
                let linger = s.auth.token_timeout + Duration::from_secs(2);
                self.runtime.spawn(async move {
                    tokio::time::sleep(linger).await;
                    refresher.abort();
                });
            }
        }
        Ok(summary)
    }

    /// Obtains a token for each of the new sources `fresh` (route index, source), all at once
    /// on the token runtime, and waits for them. Returns each route index with its first token.
    ///
    /// # Errors
    /// [`ReloadError::TokenRefused`] naming every route whose token request failed.
    fn verify_new_sources(
        &self,
        config: &Config,
        fresh: Vec<(usize, Arc<TokenSource>)>,
    ) -> Result<Vec<(usize, FirstToken)>, ReloadError> {
        if fresh.is_empty() {
            return Ok(Vec::new());
        }
        let count = fresh.len();
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let tasks: Vec<_> = fresh
                .into_iter()
                .map(|(i, source)| (i, tokio::spawn(async move { source.verify().await })))
                .collect();
            for (i, task) in tasks {
                let result = task
                    .await
                    .map_err(|e| format!("token request task failed: {e}"));
                let _ = tx.send((i, result));
            }
        });
        let mut firsts = Vec::with_capacity(count);
        let mut refused = Vec::new();
        for _ in 0..count {
            let Ok((i, result)) = rx.recv() else {
                refused.push("token runtime stopped".to_string());
                break;
            };
            let name = config.routes.get(i).map_or("?", |r| r.name.as_str());
            match result {
                Ok(Ok(first)) => firsts.push((i, first)),
                Ok(Err(e)) => refused.push(format!(
                    "routes[{i}] ({name}): no token with the new settings: {e}"
                )),
                Err(e) => refused.push(format!("routes[{i}] ({name}): {e}")),
            }
        }
        if refused.is_empty() {
            Ok(firsts)
        } else {
            Err(ReloadError::TokenRefused(refused))
        }
    }
}

/// The first key fixed at start that `new` changes, if any.
fn needs_restart(old: &Config, new: &Config) -> Option<&'static str> {
    let layout = |c: &Config| -> Vec<Vec<SocketAddr>> {
        listeners(c).into_iter().map(|l| l.addrs).collect()
    };
    if old.server.listen != new.server.listen {
        Some("server.listen")
    } else if old.server.admin_listen != new.server.admin_listen {
        Some("server.admin_listen")
    } else if old.server.token_listen != new.server.token_listen
        || old.server.token_clients != new.server.token_clients
    {
        Some("server.token_listen")
    } else if old.server.threads != new.server.threads {
        Some("server.threads")
    } else if old.server.grace_period != new.server.grace_period {
        Some("server.grace_period")
    } else if old.server.shutdown_delay != new.server.shutdown_delay {
        Some("server.shutdown_delay")
    } else if old.log.level != new.log.level || old.log.format != new.log.format {
        Some("log")
    } else if layout(old) != layout(new) {
        Some("routes[].listen")
    } else if old.cluster != new.cluster {
        Some("cluster")
    } else {
        None
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

/// Runs the gateway until SIGTERM or SIGINT, then drains ([`crate::shutdown`]: `/readyz`
/// 503, serving on for `server.shutdown_delay`, listeners closed, in-flight requests given at
/// most `server.grace_period`) and exits the process with 0; SIGHUP reloads the config file
/// ([`Reloader`]).
pub fn run(config: Config) -> Result<(), StartError> {
    check_listeners(&config)?;
    let delay = config.server.shutdown_delay;
    let grace = config.server.grace_period;
    let config_admin = config.server.admin_listen;
    let built = Built::new(config)?;
    reload_on_sighup(&built)?;
    let signals = UnixSignals {
        live: Arc::clone(&built.live),
        delay,
        grace,
        admin: config_admin,
    };
    run_with(built, Box::new(signals))
}

/// Reloads on every SIGHUP, one reload at a time, on the token runtime (the handler is in
/// place before any listener opens: SIGHUP's default action would end the process).
fn reload_on_sighup(built: &Built) -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = {
        let _guard = built.token_runtime.enter();
        signal(SignalKind::hangup()).map_err(|e| StartError::Internal(format!("SIGHUP: {e}")))?
    };
    let reloader = Arc::clone(&built.reloader);
    built.token_runtime.spawn(async move {
        while hangups.recv().await.is_some() {
            let reloader = Arc::clone(&reloader);
            // Reading files and resolving hosts block: off the runtime's worker.
            let _ = tokio::task::spawn_blocking(move || reloader.reload_from_file()).await;
        }
    });
    Ok(())
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
    if let Some(a) = config.server.token_listen {
        addrs.push(("server.token_listen".into(), a));
    }
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
    live: Arc<Live>,
    reloader: Arc<Reloader>,
    /// Proxy listener addresses (shared ones first, then routes' own).
    pub listen: Vec<SocketAddr>,
    /// Admin listener address.
    pub admin: SocketAddr,
    /// Token listener address (`server.token_listen`).
    pub token: Option<SocketAddr>,
}

impl GatewayHandle {
    /// Builds and starts the gateway; returns once every listener accepts connections.
    pub fn start(config: Config) -> Result<Self, StartError> {
        let mut listen = config.server.listen.clone();
        listen.extend(config.routes.iter().filter_map(|r| r.listen));
        let admin = config.server.admin_listen;
        let token = config.server.token_listen;
        check_listeners(&config)?;
        let built = Built::new(config)?;
        let (live, reloader) = (Arc::clone(&built.live), Arc::clone(&built.reloader));
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
            live,
            reloader,
            listen,
            admin,
            token,
        };
        for addr in handle
            .listen
            .iter()
            .chain(std::iter::once(&handle.admin))
            .chain(&handle.token)
        {
            wait_listening(*addr)?;
        }
        Ok(handle)
    }

    /// The current shared state (routes, token sources, metrics), for assertions in tests.
    pub fn state(&self) -> Arc<SharedState> {
        self.live.load()
    }

    /// Reloads the config file, as SIGHUP does for `tokengate run`.
    ///
    /// # Errors
    /// [`ReloadError`]; the running config keeps serving.
    pub fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        self.reloader.reload_from_file()
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
