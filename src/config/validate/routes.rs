//! `[[routes]]`: each route's own keys, and the rules across routes (unique names, one route
//! per own listener, one route per shared host and path prefix). The upstream and `ca_file`
//! are in `upstream.rs`, `[routes.auth]` in `auth.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::config::defaults::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, MAX_CONNECT_TIMEOUT, MAX_READ_TIMEOUT,
};
use crate::config::file::RouteFile;
use crate::config::{RouteConfig, ServerConfig};

use super::upstream::parse_upstream;
use super::Validator;

/// Methods `allow_methods` accepts (RFC 9110 §9 plus PATCH, RFC 5789).
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

impl Validator<'_> {
    /// Every `[[routes]]` entry; at least one is required. A route whose upstream or auth is
    /// invalid is left out (its problems are reported).
    pub(super) fn routes(
        &mut self,
        routes: Vec<RouteFile>,
        server: &ServerConfig,
    ) -> Vec<RouteConfig> {
        if routes.is_empty() {
            self.r.push(
                "routes",
                "no routes are defined; add at least one [[routes]] table with name, upstream \
                 and [routes.auth]",
            );
            return Vec::new();
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut own_listeners: HashMap<SocketAddr, usize> = HashMap::new();
        let mut shared_matches: HashMap<(Option<String>, String), usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, route) in routes.into_iter().enumerate() {
            let p = format!("routes[{i}]");
            let display_name = route.name.clone().unwrap_or_default();
            if let Some(name) = &route.name {
                if let Some(first) = names.get(name) {
                    self.r.push(
                        &format!("{p}.name"),
                        format!(
                            "\"{name}\" is already the name of routes[{first}]; route names \
                             must be unique"
                        ),
                    );
                } else {
                    names.insert(name.clone(), i);
                }
            }
            let Some(rc) = self.route(&p, route, server) else {
                continue;
            };
            match rc.listen {
                Some(addr) if addr.port() != 0 => {
                    if server.listen.contains(&addr) {
                        self.r.push(
                            &format!("{p}.listen"),
                            format!(
                                "\"{addr}\" is also a shared listener in server.listen; give \
                                 the route a port of its own, or remove {p}.listen to share it"
                            ),
                        );
                    } else if addr == server.admin_listen {
                        self.r.push(
                            &format!("{p}.listen"),
                            format!(
                                "\"{addr}\" is the admin listener (server.admin_listen); use \
                                 another port"
                            ),
                        );
                    } else if let Some(first) = own_listeners.get(&addr) {
                        self.r.push(
                            &format!("{p}.listen"),
                            format!(
                                "\"{addr}\" is already the listener of routes[{first}]; a route \
                                 listener serves exactly one route, use another port"
                            ),
                        );
                    } else {
                        own_listeners.insert(addr, i);
                    }
                }
                Some(_) => {}
                None => {
                    if server.listen.is_empty() {
                        self.r.push(
                            &format!("{p}.listen"),
                            "the route has no listener: server.listen is empty; set \
                             server.listen or give the route its own listen address",
                        );
                    }
                    let k = (rc.host.clone(), rc.path_prefix.clone());
                    if let Some(first) = shared_matches.get(&k) {
                        let on_host = rc
                            .host
                            .as_deref()
                            .map(|h| format!(" on host \"{h}\""))
                            .unwrap_or_default();
                        self.r.push(
                            &format!("{p}.path_prefix"),
                            format!(
                                "\"{}\"{on_host} is already routed by routes[{first}]; give \
                                 route \"{display_name}\" a different path_prefix, host or \
                                 listen",
                                rc.path_prefix
                            ),
                        );
                    } else {
                        shared_matches.insert(k, i);
                    }
                }
            }
            out.push(rc);
        }
        out
    }

    /// One route, `p` being its key (`routes[i]`).
    fn route(&mut self, p: &str, route: RouteFile, server: &ServerConfig) -> Option<RouteConfig> {
        let name = match route.name {
            None => {
                self.r.push(
                    &format!("{p}.name"),
                    "missing; every route needs a name of [a-z0-9_-] characters, e.g. name = \
                     \"drillster\"",
                );
                String::new()
            }
            Some(n) => {
                let ok = !n.is_empty()
                    && n.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    });
                if !ok {
                    self.r.push(
                        &format!("{p}.name"),
                        format!(
                            "{n:?} is not a valid route name; use only a-z, 0-9, _ and -, e.g. \
                             \"{}\"",
                            suggest_name(&n)
                        ),
                    );
                }
                n
            }
        };

        let path_prefix = match route.path_prefix {
            None => "/".to_string(),
            Some(pp) => self.path_prefix(&format!("{p}.path_prefix"), &pp),
        };
        let host = route.host.and_then(|h| self.host(&format!("{p}.host"), &h));
        let listen = route
            .listen
            .and_then(|l| self.socket_addr(&format!("{p}.listen"), &l));

        let upstream = match route.upstream {
            None => {
                self.r.push(
                    &format!("{p}.upstream"),
                    "missing; set the API base URL, e.g. upstream = \"https://api.example.com\"",
                );
                None
            }
            Some(u) => match parse_upstream(&u) {
                Ok(up) => Some(up),
                Err(problem) => {
                    self.r.push(&format!("{p}.upstream"), problem);
                    None
                }
            },
        };

        let connect_timeout = self.positive(
            &format!("{p}.connect_timeout"),
            route.connect_timeout.map(|d| d.0),
            DEFAULT_CONNECT_TIMEOUT,
        );
        let read_timeout = self.positive(
            &format!("{p}.read_timeout"),
            route.read_timeout.map(|d| d.0),
            DEFAULT_READ_TIMEOUT,
        );
        let connect_timeout = self.at_most(
            &format!("{p}.connect_timeout"),
            connect_timeout,
            MAX_CONNECT_TIMEOUT,
        );
        let read_timeout =
            self.at_most(&format!("{p}.read_timeout"), read_timeout, MAX_READ_TIMEOUT);

        let allow_methods = route
            .allow_methods
            .map(|m| self.methods(&format!("{p}.allow_methods"), &m));
        let strip_headers = route
            .strip_headers
            .map(|h| self.header_names(&format!("{p}.strip_headers"), &h))
            .unwrap_or_default();
        let ca_file = route
            .ca_file
            .and_then(|c| self.ca_file(&format!("{p}.ca_file"), &c));

        let auth = match route.auth {
            None => {
                self.r.push(
                    &format!("{p}.auth"),
                    "missing; add a [routes.auth] table after this route with grant, \
                     token_endpoint and client_id",
                );
                None
            }
            Some(a) => self.auth(&format!("{p}.auth"), a),
        };
        let subjects = route.subjects.and_then(|s| {
            let grant = auth.as_ref().map(|a| &a.grant);
            self.subjects(p, s, grant, &strip_headers, server)
        });

        Some(RouteConfig {
            name,
            path_prefix,
            host,
            listen,
            strip_prefix: route.strip_prefix.unwrap_or(false),
            upstream: upstream?,
            connect_timeout,
            read_timeout,
            forward_cookies: route.forward_cookies.unwrap_or(false),
            allow_methods,
            ca_file,
            strip_headers,
            auth: auth?,
            subjects,
        })
    }

    /// A path starting with `/`, without query, fragment or whitespace; stored without a
    /// trailing `/` (except the root).
    fn path_prefix(&mut self, key: &str, pp: &str) -> String {
        if !pp.starts_with('/') {
            self.r.push(
                key,
                format!(
                    "{pp:?} does not start with \"/\"; write e.g. \"/{}\"",
                    pp.trim_start_matches('/')
                ),
            );
        } else if pp.contains(['?', '#']) || pp.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            self.r.push(
                key,
                format!(
                    "{pp:?} is not a plain path; remove the query, fragment or whitespace \
                     (percent-encode spaces as %20)"
                ),
            );
        }
        // "/api/" and "/api" match the same requests on segment boundaries; the trimmed form
        // keeps strip_prefix from eating the slash that starts the forwarded path.
        let trimmed = pp.trim_end_matches('/');
        if trimmed.is_empty() {
            "/".to_string()
        } else {
            trimmed.to_string()
        }
    }

    /// A host name or bracketed IPv6 literal without port, lower-cased.
    fn host(&mut self, key: &str, h: &str) -> Option<String> {
        let lower = h.trim_end_matches('.').to_ascii_lowercase();
        let valid = if let Some(inner) = lower.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok())
        } else if lower.contains(':') {
            self.r.push(
                key,
                format!("{h:?} includes a port; write the host name only, e.g. \"api.internal\""),
            );
            return None;
        } else {
            !lower.is_empty()
                && lower
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        };
        if valid {
            Some(lower)
        } else {
            self.r.push(
                key,
                format!("{h:?} is not a host name; write e.g. \"drillster.internal\" (no scheme, path or port)"),
            );
            None
        }
    }

    /// `allow_methods`: known methods, upper-cased, without duplicates; CONNECT refused.
    fn methods(&mut self, key: &str, methods: &[String]) -> Vec<http::Method> {
        if methods.is_empty() {
            self.r.push(
                key,
                "is empty, which would refuse every request; list methods such as [\"GET\", \
                 \"POST\"], or remove the key to allow all",
            );
        }
        let mut out: Vec<http::Method> = Vec::new();
        for (i, m) in methods.iter().enumerate() {
            let upper = m.trim().to_ascii_uppercase();
            let parsed = if METHODS.contains(&upper.as_str()) {
                http::Method::from_bytes(upper.as_bytes()).ok()
            } else {
                None
            };
            match parsed {
                Some(http::Method::CONNECT) => self.r.push(
                    &format!("{key}[{i}]"),
                    "CONNECT opens a tunnel, which the gateway does not proxy; remove it"
                        .to_string(),
                ),
                Some(method) if !out.contains(&method) => out.push(method),
                Some(_) => {}
                None => self.r.push(
                    &format!("{key}[{i}]"),
                    format!(
                        "unknown method {m:?}; expected one of {}",
                        METHODS.join(", ")
                    ),
                ),
            }
        }
        out
    }

    /// `strip_headers`: header names to remove besides the credential fields. Framing and
    /// connection fields are refused: removing them would break the request's framing (a body
    /// without its `Content-Length`) or the gateway's own handling of them.
    fn header_names(&mut self, key: &str, names: &[String]) -> Vec<http::HeaderName> {
        use http::header::{
            CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
        };
        let mut out: Vec<http::HeaderName> = Vec::new();
        for (i, n) in names.iter().enumerate() {
            match http::HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes()) {
                Ok(h)
                    if [
                        CONTENT_LENGTH,
                        TRANSFER_ENCODING,
                        HOST,
                        CONNECTION,
                        UPGRADE,
                        TE,
                        TRAILER,
                        EXPECT,
                    ]
                    .contains(&h) =>
                {
                    self.r.push(
                        &format!("{key}[{i}]"),
                        format!(
                            "{n:?} frames or routes the request and is the gateway's to handle; \
                             strip_headers is for credential headers such as \"X-Api-Key\""
                        ),
                    )
                }
                Ok(h) if !out.contains(&h) => out.push(h),
                Ok(_) => {}
                Err(_) => self.r.push(
                    &format!("{key}[{i}]"),
                    format!("{n:?} is not a valid header name; write a name such as \"X-Api-Key\""),
                ),
            }
        }
        out
    }
}

/// A plausible valid route name derived from an invalid one (for the fix hint).
fn suggest_name(name: &str) -> String {
    let s: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() {
        "api".to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{cc_route, errors, has, load};

    #[test]
    fn no_routes() {
        let errs = errors("[server]\nthreads = 1\n");
        assert!(
            has(&errs, "tokengate.toml: routes: no routes are defined"),
            "{errs:?}"
        );
    }

    #[test]
    fn listener_conflicts() {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:8080\"\n{}{}{}",
            cc_route("").replace("upstream =", "listen = \"127.0.0.1:8080\"\nupstream ="),
            cc_route("").replace("name = \"driftrock\"", "name = \"b\""),
            cc_route("").replace("name = \"driftrock\"", "name = \"c\""),
        );
        let errs = errors(&text);
        assert!(
            has(
                &errs,
                "server.admin_listen: \"127.0.0.1:8080\" is also a proxy listener"
            ),
            "{errs:?}"
        );
        assert!(
            has(
                &errs,
                "routes[0].listen: \"127.0.0.1:8080\" is also a shared listener"
            ),
            "{errs:?}"
        );
        assert!(
            has(
                &errs,
                "routes[2].path_prefix: \"/\" is already routed by routes[1]"
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn duplicate_names_and_host_routing() {
        let text = format!(
            "{}{}{}",
            cc_route(""),
            cc_route("").replace("upstream =", "host = \"API.Internal\"\nupstream ="),
            cc_route("")
                .replace("name = \"driftrock\"", "name = \"other\"")
                .replace("upstream =", "path_prefix = \"/x/\"\nupstream ="),
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            has(
                &errs,
                "routes[1].name: \"driftrock\" is already the name of routes[0]"
            ),
            "{errs:?}"
        );
        let ok = text.replacen("name = \"driftrock\"", "name = \"first\"", 1);
        let c = load(&ok).expect("valid");
        assert_eq!(c.routes[1].host.as_deref(), Some("api.internal"));
        assert_eq!(c.routes[2].path_prefix, "/x");
    }

    #[test]
    fn methods_headers_cidrs() {
        let text = format!(
            "[server]\nallowed_clients = [\"10.1.2.3\", \"fd00::1\", \"192.168.1.7/24\"]\nreplay_body_limit = \"16KiB\"\n{}",
            cc_route("").replace(
                "upstream =",
                "allow_methods = [\"get\", \"POST\", \"GET\"]\nstrip_headers = [\"X-Api-Key\"]\nupstream ="
            )
        );
        let c = load(&text).expect("valid");
        let nets: Vec<String> = c
            .server
            .allowed_clients
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.1.2.3/32", "fd00::1/128", "192.168.1.0/24"]);
        assert_eq!(c.server.replay_body_limit, 16 << 10);
        let r = &c.routes[0];
        assert_eq!(
            r.allow_methods.as_deref(),
            Some(&[http::Method::GET, http::Method::POST][..])
        );
        assert_eq!(r.strip_headers[0].as_str(), "x-api-key");
    }

    #[test]
    fn strip_headers_refuses_framing_and_connection_fields() {
        let text = |names: &str| {
            cc_route("").replace(
                "upstream =",
                &format!("strip_headers = [{names}]\nupstream ="),
            )
        };
        let c = load(&text(r#""X-Api-Key", "x-legacy-auth""#)).unwrap();
        assert_eq!(c.routes[0].strip_headers.len(), 2);
        let errs = errors(&text(r#""X-Api-Key", "Content-Length", "host""#));
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            has(
                &errs,
                "routes[0].strip_headers[1]: \"Content-Length\" frames or routes"
            ),
            "{errs:?}"
        );
        assert!(
            has(&errs, "routes[0].strip_headers[2]: \"host\""),
            "{errs:?}"
        );
    }
}
