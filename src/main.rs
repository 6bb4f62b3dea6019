//! `tokengate` command line (docs/operations.md "Command line"). Parses arguments, loads config,
//! starts; maps errors to exit codes: 0 success, 1 runtime failure, 2 bad usage or bad config.

use std::io::IsTerminal as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};

/// mimalloc: measurably fewer cycles per request than the system allocator on the proxy hot
/// path (docs/architecture.md "The hot path").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's `mi_option_set(option, value)` (mimalloc.h), linked with the allocator.
    fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the same in its v2 and v3).
const MI_OPTION_PURGE_DELAY: std::os::raw::c_int = 15;

/// Freed memory goes back to the system as soon as a page of it is free. With mimalloc's
/// default 10 ms delay the purge waits for the thread's next allocator call, and a thread
/// whose connections all went idle makes none: 10,000 connections idle after one request each
/// then kept 11 KiB each instead of 6 (docs/benchmarks.md "Abuse bounds").
fn purge_freed_memory_at_once() {
    // SAFETY: sets one integer option; mimalloc reads options atomically, any thread, any time.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
use tracing_subscriber::prelude::*;

use tokengate::config::{Config, LogConfig, LogFormat};
use tokengate::oauth::TokenClient;

#[derive(Parser)]
#[command(
    name = "tokengate",
    version,
    about = "Credential-injecting OAuth 2.0 gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (proxy listeners + admin listener) until SIGTERM/SIGINT.
    Run {
        /// Configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate the configuration, secrets and key files.
    Check {
        /// Configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Also obtain one token per route and print its expiry (never the token).
        #[arg(long)]
        fetch: bool,
    },
    /// Print one access token for a route on stdout.
    Token {
        /// Configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Route name.
        #[arg(long)]
        route: String,
        /// Request the token for this subject (JWT bearer grant) instead of the configured one.
        #[arg(long)]
        subject: Option<String>,
    },
    /// Start sandbox authorization servers, a sandbox API and the gateway on loopback, and print
    /// curl lines to try.
    Demo {
        /// Proxy listener (default 127.0.0.1:8080, or an ephemeral port when that is taken).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Admin listener (default 127.0.0.1:9090, or an ephemeral port when that is taken).
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
        /// Token listener for per-user tokens (default 127.0.0.1:9091, or an ephemeral port
        /// when that is taken).
        #[arg(long)]
        token_listen: Option<std::net::SocketAddr>,
    },
}

fn main() -> ExitCode {
    purge_freed_memory_at_once();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            if let Err(e) = tokengate::gateway::catch_sighup_while_starting() {
                eprintln!("tokengate: SIGHUP handler: {e}");
                return ExitCode::from(1);
            }
            if let Err(e) = tokengate::gateway::catch_termination_while_starting() {
                eprintln!("tokengate: SIGTERM/SIGINT handlers: {e}");
                return ExitCode::from(1);
            }
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(&config.log);
            for warning in tokengate::config::warnings(&config) {
                tracing::warn!("{warning}");
            }
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                routes = config.routes.len(),
                "tokengate starting"
            );
            match tokengate::gateway::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tokengate: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Check { config, fetch } => check(&config, fetch),
        Command::Token {
            config,
            route,
            subject,
        } => token(&config, &route, subject),
        Command::Demo {
            listen,
            admin_listen,
            token_listen,
        } => demo(listen, admin_listen, token_listen),
    }
}

#[cfg(feature = "demo")]
fn demo(
    listen: Option<std::net::SocketAddr>,
    admin_listen: Option<std::net::SocketAddr>,
    token_listen: Option<std::net::SocketAddr>,
) -> ExitCode {
    init_logging(&LogConfig {
        format: LogFormat::Text,
        level: "info".into(),
    });
    match tokengate::demo::run(listen, admin_listen, token_listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokengate demo: {e}");
            ExitCode::from(1)
        }
    }
}

/// A production build (`--no-default-features`, as in the Docker image) carries no sandbox.
#[cfg(not(feature = "demo"))]
fn demo(
    _listen: Option<std::net::SocketAddr>,
    _admin_listen: Option<std::net::SocketAddr>,
    _token_listen: Option<std::net::SocketAddr>,
) -> ExitCode {
    eprintln!(
        "tokengate demo: this binary was built without the `demo` feature \
         (build with default features: `cargo run -- demo`)"
    );
    ExitCode::from(2)
}

/// Loads and validates; on failure prints every problem (one per line) and returns exit 2.
fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(2)
    })
}

fn check(path: &std::path::Path, fetch: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    say(format_args!(
        "{}: OK ({} route{})",
        path.display(),
        config.routes.len(),
        if config.routes.len() == 1 { "" } else { "s" }
    ));
    for warning in tokengate::config::warnings(&config) {
        say(format_args!("warning: {warning}"));
    }
    // `run` starts with an upstream that does not resolve (the route answers 502 until it
    // does), so this is a warning too.
    for (i, route) in config.routes.iter().enumerate() {
        let up = &route.upstream;
        if let Err(e) = tokengate::proxy::upstream_dns::resolve_blocking(
            &up.host,
            up.port,
            config.server.hosts_file.as_deref(),
        ) {
            say(format_args!(
                "warning: routes[{i}].upstream: {}:{} does not resolve ({e}); route {} would \
                 answer 502 upstream_unreachable until it does",
                up.host, up.port, route.name
            ));
        }
    }
    if !fetch {
        return ExitCode::SUCCESS;
    }
    let Some(rt) = runtime() else {
        return ExitCode::from(1);
    };
    let mut ok = true;
    for (i, route) in config.routes.iter().enumerate() {
        let result = rt.block_on(async {
            let client = client_for(route)?;
            client
                .fetch(SystemTime::now())
                .await
                .map_err(|e| e.to_string())
        });
        match result {
            Ok(token) => say(format_args!(
                "routes[{i}] {}: token obtained, expires in {} s",
                route.name,
                token.lifetime.as_secs()
            )),
            Err(e) => {
                ok = false;
                say(format_args!(
                    "routes[{i}] {}: token request failed: {e}",
                    route.name
                ));
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn token(path: &std::path::Path, route_name: &str, subject: Option<String>) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(route) = config.routes.iter().find(|r| r.name == route_name) else {
        let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        eprintln!(
            "tokengate: --route {route_name:?}: no such route; routes are: {}",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    if subject.is_some() && !matches!(route.auth.grant, tokengate::config::Grant::JwtBearer { .. })
    {
        eprintln!(
            "tokengate: --subject: route {route_name:?} uses the {} grant; --subject applies to jwt_bearer routes only",
            route.auth.grant.name()
        );
        return ExitCode::from(2);
    }
    if let Some(subject) = &subject {
        if !tokengate::config::subject_chars_ok(subject.as_bytes()) {
            eprintln!(
                "tokengate: --subject: {subject:?} is not a user id, e-mail address or third-party id \
                 (1 to 256 bytes of letters, digits and . _ @ + -)"
            );
            return ExitCode::from(2);
        }
    }
    let Some(rt) = runtime() else {
        return ExitCode::from(1);
    };
    // A per-user token obtained here is audited like one the gateway obtains, on standard error.
    let _audit = subject.as_ref().map(|_| {
        let audit = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .with_filter(Targets::new().with_target("tokengate::audit", LevelFilter::INFO));
        tracing::subscriber::set_default(tracing_subscriber::registry().with(audit))
    });
    let result = rt.block_on(async {
        let client = client_for(route)?.with_subject(subject.clone());
        let now = SystemTime::now();
        let (token, jti) = client
            .fetch_identified(now)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(subject) = &subject {
            tokengate::token::subjects::audit_obtained(
                route_name,
                subject,
                None,
                jti.as_deref(),
                now + token.lifetime,
            );
        }
        Ok::<_, String>(token)
    });
    match result {
        Ok(token) => {
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{}", token.value).and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tokengate: cannot write the token to standard output: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            eprintln!("tokengate: route {route_name}: {e}");
            ExitCode::from(1)
        }
    }
}

/// One line of a report on standard output. A reader that went away (`tokengate check … | head
/// -1`) ends the report, not the process: the exit code still says how the checks went.
fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn client_for(route: &tokengate::config::RouteConfig) -> Result<TokenClient, String> {
    let ca = match &route.ca_file {
        Some(p) => Some(
            tokengate::files::read_regular_capped(p, tokengate::files::CA_FILE_LIMIT)
                .map_err(|e| format!("{}: {e}", p.display()))?,
        ),
        None => None,
    };
    TokenClient::new(
        route.auth.clone(),
        ca.as_deref(),
        route.connect_timeout,
        route.auth.token_timeout,
    )
    .map_err(|e| e.to_string())
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("tokengate: cannot start runtime: {e}");
            None
        }
    }
}

/// Logs go to stderr, as text (coloured only on a terminal) or JSON lines; `RUST_LOG`
/// overrides `log.level` when set.
fn init_logging(log: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(&log.level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    // pingora's debug/trace output carries credentials: cap it (a second filter, so the cap
    // only ever lowers a level).
    let caps = tokengate::proxy::LOG_TARGETS_CAPPED_AT_INFO.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, target| t.with_target(*target, LevelFilter::INFO),
    );
    let caps = tokengate::proxy::LOG_TARGETS_OFF
        .iter()
        .fold(caps, |t, target| t.with_target(*target, LevelFilter::OFF));
    // Colour only for a person at a terminal: log files and collectors get plain text.
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match log.format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter.and(caps)))
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer.with_filter(filter.and(caps)))
            .try_init(),
    };
}
