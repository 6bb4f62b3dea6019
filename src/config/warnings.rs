//! What a valid config may still get wrong, said as warnings: `tokengate check` prints them and
//! `tokengate run` logs them at start; neither refuses the config.

use std::net::IpAddr;

use super::{Config, Grant, TokenEndpointLocation};

/// One warning line per problem, each naming the key: a token endpoint (or issuer) reached
/// over plain `http://` on a host that is not loopback, naming the credentials that would
/// cross the network in clear; an upstream reached so, which the access token would cross; a
/// `trusted_proxies` range that trusts every peer.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (i, net) in config.server.trusted_proxies.iter().enumerate() {
        if net.prefix_len() == 0 {
            out.push(format!(
                "server.trusted_proxies[{i}]: \"{net}\" trusts every peer, so any client can \
                 name its own address in X-Forwarded-For (and pass allowed_clients and \
                 header_clients with it); list only your load balancers' addresses"
            ));
        }
    }
    for (i, route) in config.routes.iter().enumerate() {
        let u = &route.upstream;
        if !u.tls && !host_is_loopback(&u.host) {
            out.push(format!(
                "routes[{i}].upstream: plain HTTP to \"{}\", a host that is not loopback: the \
                 route's access tokens would travel in clear; use https://",
                u.authority
            ));
        }
    }
    for (i, route) in config.routes.iter().enumerate() {
        let auth = &route.auth;
        let (key, url) = match &auth.endpoint {
            TokenEndpointLocation::Url(u) => ("token_endpoint", u),
            TokenEndpointLocation::Issuer(u) => ("issuer", u),
        };
        if url.scheme() != "http" || is_loopback(url) {
            continue;
        }
        let mut secrets = Vec::new();
        if auth.client_secret.is_some() {
            secrets.push(format!(
                "the client secret (routes[{i}].auth.client_secret)"
            ));
        }
        if let Grant::JwtBearer { key_file, .. } = &auth.grant {
            secrets.push(format!(
                "the assertions signed with the key of routes[{i}].auth.key_file ({})",
                key_file.display()
            ));
        }
        secrets.push("the access tokens".to_string());
        out.push(format!(
            "routes[{i}].auth.{key}: \"{url}\" is plain HTTP to a host that is not loopback: \
             {} would travel in clear; use https://",
            secrets.join(", ")
        ));
    }
    out
}

/// Whether `host` (a name or an IP literal without brackets) is `localhost` or a loopback
/// address.
fn host_is_loopback(host: &str) -> bool {
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => {
            let d = host.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
    }
}

/// Whether `url`'s host is `localhost` or a loopback address.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.');
            d.eq_ignore_ascii_case("localhost") || d.to_ascii_lowercase().ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).to_canonical().is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{jwt_route, load, DEMO_KEY};

    fn cc(endpoint: &str) -> String {
        format!(
            "[[routes]]\nname = \"r\"\nupstream = \"https://api.example.com\"\n[routes.auth]\n\
             grant = \"client_credentials\"\ntoken_endpoint = \"{endpoint}\"\nclient_id = \"a\"\n\
             client_secret = \"topsecret\"\n"
        )
    }

    #[test]
    fn plain_http_to_another_host_names_what_travels_in_clear() {
        let w = warnings(&load(&cc("http://auth.example.com/token")).unwrap());
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "routes[0].auth.token_endpoint: \"http://auth.example.com/token\" is plain HTTP"
            ),
            "{}",
            w[0]
        );
        assert!(w[0].contains("the client secret (routes[0].auth.client_secret)"));
        assert!(!w[0].contains("topsecret"), "never the secret itself");

        let jwt = jwt_route(DEMO_KEY, "").replace(
            "https://www.drillster.com/api/oauth/token",
            "http://10.1.2.3:8080/oauth/token",
        );
        let w = warnings(&load(&jwt).unwrap());
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("assertions signed with the key of routes[0].auth.key_file"));
    }

    #[test]
    fn trusting_every_peer_and_a_plain_http_upstream_are_warned_about() {
        let text = cc("https://auth.example.com/token")
            .replace("https://api.example.com", "http://api.example.com:8080");
        let text = format!("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"::/0\"]\n{text}");
        let w = warnings(&load(&text).unwrap());
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("server.trusted_proxies[1]: \"::/0\" trusts every peer"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("routes[0].upstream: plain HTTP to \"api.example.com:8080\""),
            "{w:?}"
        );
        let loopback = cc("https://auth.example.com/token")
            .replace("https://api.example.com", "http://127.0.0.1:8080");
        assert!(warnings(&load(&loopback).unwrap()).is_empty());
    }

    #[test]
    fn https_and_loopback_are_fine() {
        for endpoint in [
            "https://auth.example.com/token",
            "http://127.0.0.1:9000/token",
            "http://127.8.9.10/token",
            "http://localhost:9000/token",
            "http://[::1]:9000/token",
        ] {
            assert!(
                warnings(&load(&cc(endpoint)).unwrap()).is_empty(),
                "{endpoint}"
            );
        }
    }
}
