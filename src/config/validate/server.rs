//! `[server]` and `[log]`: listeners, the admin listener, the client allowlist, process-wide
//! knobs and the log format and filter.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::Validator;
use crate::config::defaults::{
    DEFAULT_ADMIN_LISTEN, DEFAULT_ALLOWED_CLIENTS, DEFAULT_GRACE_PERIOD, DEFAULT_LISTEN,
    DEFAULT_REPLAY_BODY_LIMIT, DEFAULT_SHUTDOWN_DELAY, DEFAULT_TOKEN_CLIENTS, MAX_GRACE_PERIOD,
    MAX_REPLAY_BODY_LIMIT, MAX_SHUTDOWN_DELAY,
};
use crate::config::file::{LogFile, OneOrMany, ServerFile};
use crate::config::{LogConfig, LogFormat, ServerConfig};

impl Validator<'_> {
    /// `[server]`. Listener addresses must be distinct (port 0 excepted), the admin listener
    /// apart from the proxy's.
    pub(super) fn server(&mut self, s: ServerFile) -> ServerConfig {
        let limits = self.client_limits(&s);
        let listen_entries: Vec<(String, String)> = match s.listen {
            None => vec![("server.listen".to_string(), DEFAULT_LISTEN.to_string())],
            Some(OneOrMany::One(a)) => vec![("server.listen".to_string(), a)],
            Some(OneOrMany::Many(all)) => all
                .into_iter()
                .enumerate()
                .map(|(i, a)| (format!("server.listen[{i}]"), a))
                .collect(),
        };
        let mut listen: Vec<SocketAddr> = Vec::new();
        let mut seen: HashMap<SocketAddr, String> = HashMap::new();
        for (key, text) in listen_entries {
            let Some(addr) = self.socket_addr(&key, &text) else {
                continue;
            };
            if let Some(first) = seen.get(&addr) {
                if addr.port() != 0 {
                    let first = first.clone();
                    self.r.push(
                        &key,
                        format!("\"{text}\" is listed twice (also {first}); remove one"),
                    );
                    continue;
                }
            }
            seen.insert(addr, key);
            listen.push(addr);
        }

        let admin_text = s
            .admin_listen
            .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
        let admin_listen = self
            .socket_addr("server.admin_listen", &admin_text)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9090)));
        if admin_listen.port() != 0 && listen.contains(&admin_listen) {
            self.r.push(
                "server.admin_listen",
                format!(
                    "\"{admin_text}\" is also a proxy listener in server.listen; give the admin \
                     listener an address of its own, e.g. \"{DEFAULT_ADMIN_LISTEN}\""
                ),
            );
        }

        let allowed_clients = match s.allowed_clients {
            None => DEFAULT_ALLOWED_CLIENTS
                .iter()
                .filter_map(|c| c.parse::<IpNet>().ok())
                .collect(),
            Some(list) if list.is_empty() => {
                self.r.push(
                    "server.allowed_clients",
                    "is empty, so no client could use the proxy; list CIDRs such as \
                     \"127.0.0.0/8\", or remove the key for loopback only",
                );
                Vec::new()
            }
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, c)| self.cidr(&format!("server.allowed_clients[{i}]"), c))
                .collect(),
        };

        let threads = match s.threads {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(n) if n >= 1 => usize::try_from(n).unwrap_or(1),
            Some(n) => {
                self.r.push(
                    "server.threads",
                    format!("{n} is not a thread count; use 1 or more, or remove the key for one per CPU"),
                );
                1
            }
        };

        let grace_period = s.grace_period.map_or(DEFAULT_GRACE_PERIOD, |d| d.0);
        let grace_period = self.at_most("server.grace_period", grace_period, MAX_GRACE_PERIOD);
        let shutdown_delay = s.shutdown_delay.map_or(DEFAULT_SHUTDOWN_DELAY, |d| d.0);
        let shutdown_delay =
            self.at_most("server.shutdown_delay", shutdown_delay, MAX_SHUTDOWN_DELAY);
        let hosts_file = s.hosts_file.and_then(|p| {
            let resolved = self.resolve(&p);
            let read = crate::files::read_regular_capped(&resolved, crate::files::HOSTS_FILE_LIMIT)
                .and_then(|bytes| {
                    String::from_utf8(bytes).map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text")
                    })
                });
            match read {
                Ok(_) => Some(resolved),
                Err(e) => {
                    self.r.push(
                        "server.hosts_file",
                        format!(
                            "cannot read \"{}\": {e}; point hosts_file at a file of \
                             \"address name\" lines, or remove the key for the system resolver",
                            resolved.display()
                        ),
                    );
                    None
                }
            }
        });
        let trusted_proxies = s
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, c)| self.cidr(&format!("server.trusted_proxies[{i}]"), c))
            .collect();
        let replay_body_limit = match s.replay_body_limit {
            None => DEFAULT_REPLAY_BODY_LIMIT,
            Some(b) if b.0 <= MAX_REPLAY_BODY_LIMIT as u64 => b.0 as usize,
            Some(b) => {
                self.r.push(
                    "server.replay_body_limit",
                    format!(
                        "{} bytes is more than a replay can keep: at most \"64KiB\" (pingora-proxy \
                         keeps at most 64 KiB of a request body for a retry)",
                        b.0
                    ),
                );
                DEFAULT_REPLAY_BODY_LIMIT
            }
        };

        let token_listen = s
            .token_listen
            .and_then(|t| self.socket_addr("server.token_listen", &t));
        if let Some(addr) = token_listen.filter(|a| a.port() != 0) {
            if listen.contains(&addr) || addr == admin_listen {
                self.r.push(
                    "server.token_listen",
                    format!(
                        "\"{addr}\" is also a proxy or admin listener; give the token listener \
                         an address of its own, e.g. \"127.0.0.1:9091\""
                    ),
                );
            }
        }
        let token_clients = match s.token_clients {
            None => DEFAULT_TOKEN_CLIENTS
                .iter()
                .filter_map(|c| c.parse::<IpNet>().ok())
                .collect(),
            Some(list) if list.is_empty() => {
                self.r.push(
                    "server.token_clients",
                    "is empty, so no client could use the token listener; list the CIDRs of \
                     the trusted backends, e.g. \"10.1.0.0/24\", or remove the key for loopback \
                     only",
                );
                Vec::new()
            }
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, c)| self.cidr(&format!("server.token_clients[{i}]"), c))
                .collect(),
        };

        ServerConfig {
            listen,
            admin_listen,
            allowed_clients,
            threads,
            grace_period,
            shutdown_delay,
            trusted_proxies,
            hosts_file,
            replay_body_limit,
            limits,
            token_listen,
            token_clients,
        }
    }

    /// An `IP:port` (host names are not resolved).
    pub(super) fn socket_addr(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.r.push(
                    key,
                    format!(
                        "\"{text}\" is not a socket address; write IP:port, e.g. \
                         \"127.0.0.1:8080\" or \"[::1]:8080\" (host names are not resolved)"
                    ),
                );
                None
            }
        }
    }

    /// A CIDR, or a single address as its /32 or /128; host bits are cleared. An IPv4-mapped
    /// IPv6 range (`::ffff:10.0.0.0/104`) becomes its IPv4 range: client addresses are compared
    /// as IPv4 (RFC 4291 §2.5.5.2), so the mapped form would never match.
    pub(super) fn cidr(&mut self, key: &str, text: &str) -> Option<IpNet> {
        let parsed = if text.contains('/') {
            text.parse::<IpNet>().ok().map(|n| n.trunc())
        } else {
            text.parse::<IpAddr>().ok().map(IpNet::from)
        }
        .map(unmapped);
        if parsed.is_none() {
            self.r.push(
                key,
                format!(
                    "\"{text}\" is not a CIDR; write e.g. \"10.0.0.0/8\", \"fd00::/8\" or a \
                     single address such as \"10.1.2.3\""
                ),
            );
        }
        parsed
    }

    /// `[log]`.
    pub(super) fn log(&mut self, l: LogFile) -> LogConfig {
        let format = match l.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.r.push(
                    "log.format",
                    format!("unknown log format \"{other}\"; expected \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };
        let level = l.level.unwrap_or_else(|| "info".to_string());
        if let Some(problem) = log_level_problem(&level) {
            self.r.push("log.level", problem);
        }
        LogConfig { format, level }
    }
}

/// Why `level` is not a usable `tracing` EnvFilter directive, if it is not.
fn log_level_problem(level: &str) -> Option<String> {
    const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
    let fix = "expected one of trace, debug, info, warn, error, off, or an EnvFilter directive \
               such as \"info,tokengate=debug\"";
    if level.trim().is_empty() {
        return Some(format!("is empty; {fix}"));
    }
    // A lone word is a *target* name to EnvFilter (enabling everything for that target only),
    // which is almost always a misspelt level.
    let single_word = !level.contains([',', '=', ':', '[']);
    if single_word && !LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
        return Some(format!("unknown log level {level:?}; {fix}"));
    }
    match tracing_subscriber::EnvFilter::try_new(level) {
        Ok(_) => None,
        Err(e) => Some(format!("{level:?} is not a valid filter ({e}); {fix}")),
    }
}

/// `net` with an IPv4-mapped IPv6 prefix of at least 96 bits as the IPv4 network it maps.
fn unmapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{cc_route, errors, has, load};

    #[test]
    fn log_levels() {
        assert!(log_level_problem("info").is_none());
        assert!(log_level_problem("WARN").is_none());
        assert!(log_level_problem("info,tokengate=debug").is_none());
        assert!(log_level_problem("verbose").is_some());
        assert!(log_level_problem("").is_some());
        assert!(log_level_problem("info,tokengate=loud").is_some());
    }

    #[test]
    fn replay_body_limit_is_at_most_what_pingora_keeps() {
        let text = |v: &str| format!("[server]\nreplay_body_limit = \"{v}\"\n{}", cc_route(""));
        assert_eq!(
            load(&text("64KiB")).unwrap().server.replay_body_limit,
            65536
        );
        assert_eq!(load(&text("0B")).unwrap().server.replay_body_limit, 0);
        let errs = errors(&text("1MiB"));
        assert!(
            has(
                &errs,
                "server.replay_body_limit: 1048576 bytes is more than a replay can keep"
            ),
            "{errs:?}"
        );
    }
}

#[cfg(test)]
mod shutdown_and_proxies_tests {
    use crate::config::test_support::{cc_route, errors, has, load};
    use std::time::Duration;

    #[test]
    fn trusted_proxies_and_shutdown_delay_have_defaults_and_bounds() {
        let c = load(&cc_route("")).unwrap();
        assert!(c.server.trusted_proxies.is_empty());
        assert_eq!(c.server.shutdown_delay, Duration::from_secs(5));

        let text = format!(
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"fd00::1\"]\nshutdown_delay = \"0s\"\n{}",
            cc_route("")
        );
        let c = load(&text).unwrap();
        assert_eq!(c.server.trusted_proxies.len(), 2);
        assert_eq!(c.server.shutdown_delay, Duration::ZERO);

        let text = format!(
            "[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\ngrace_period = \"365days\"\n\
             shutdown_delay = \"2h\"\n{}",
            cc_route("")
        );
        let errs = errors(&text);
        assert!(
            has(
                &errs,
                "server.trusted_proxies[0]: \"10.0.0.0/33\" is not a CIDR"
            ),
            "{errs:?}"
        );
        assert!(
            has(
                &errs,
                "server.grace_period: 31536000 s is more than the most it may be, \"1h\""
            ),
            "{errs:?}"
        );
        assert!(
            has(
                &errs,
                "server.shutdown_delay: 7200 s is more than the most it may be, \"10m\""
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn ipv4_mapped_ranges_are_read_as_ipv4() {
        let text = format!(
            "[server]\nallowed_clients = [\"::ffff:10.0.0.0/104\", \"::ffff:127.0.0.3\", \"::1\"]\n\
             trusted_proxies = [\"::ffff:192.168.0.0/112\"]\n{}",
            cc_route("")
        );
        let c = load(&text).expect("valid");
        let shown: Vec<String> = c
            .server
            .allowed_clients
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(shown, ["10.0.0.0/8", "127.0.0.3/32", "::1/128"]);
        assert_eq!(c.server.trusted_proxies[0].to_string(), "192.168.0.0/16");
    }

    #[test]
    fn hosts_file_must_be_readable() {
        let text = format!(
            "[server]\nhosts_file = \"/nonexistent/tokengate-hosts\"\n{}",
            cc_route("")
        );
        let errs = errors(&text);
        assert!(
            has(
                &errs,
                "server.hosts_file: cannot read \"/nonexistent/tokengate-hosts\""
            ),
            "{errs:?}"
        );
        assert!(load(&cc_route("")).unwrap().server.hosts_file.is_none());
    }

    #[test]
    fn hosts_file_must_be_a_regular_file() {
        let dir = std::env::temp_dir().join(format!("tokengate-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("hosts.fifo");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        for (path, kind) in [
            (fifo.display().to_string(), "a FIFO"),
            ("/dev/zero".into(), "a device"),
        ] {
            let text = format!("[server]\nhosts_file = \"{path}\"\n{}", cc_route(""));
            let errs = errors(&text);
            assert!(has(&errs, "server.hosts_file: cannot read"), "{errs:?}");
            assert!(has(&errs, kind), "{errs:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn route_durations_are_bounded() {
        let route = cc_route("token_timeout = \"1h\"\ndefault_token_lifetime = \"30days\"\n")
            .replacen(
                "[routes.auth]",
                "connect_timeout = \"1h\"\nread_timeout = \"2days\"\n[routes.auth]",
                1,
            );
        let errs = errors(&route);
        assert!(
            has(&errs, "routes[0].auth.token_timeout: 3600 s is more than"),
            "{errs:?}"
        );
        assert!(
            has(
                &errs,
                "routes[0].auth.default_token_lifetime: 2592000 s is more than"
            ),
            "{errs:?}"
        );
        assert!(
            has(&errs, "routes[0].connect_timeout: 3600 s is more than"),
            "{errs:?}"
        );
        assert!(
            has(&errs, "routes[0].read_timeout: 172800 s is more than"),
            "{errs:?}"
        );
    }
}
