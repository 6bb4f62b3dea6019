//! A route's upstream: the `upstream` URL and the extra trust roots of `ca_file`.

use std::path::PathBuf;

use url::Url;

use crate::config::Upstream;
use crate::files;

use super::Validator;

impl Validator<'_> {
    /// `ca_file`: a readable regular file holding at least one PEM certificate. The
    /// certificates themselves are parsed when the gateway builds the route.
    pub(super) fn ca_file(&mut self, key: &str, path: &str) -> Option<PathBuf> {
        let resolved = self.resolve(path);
        let shown = resolved.display();
        let text = match files::read_regular_capped(&resolved, files::CA_FILE_LIMIT) {
            Ok(t) => t,
            Err(e) => {
                self.r.push(
                    key,
                    format!("cannot read \"{shown}\": {e}; point ca_file at a PEM file of CA certificates"),
                );
                return None;
            }
        };
        let certs = pem::parse_many(&text)
            .map(|all| all.iter().filter(|p| p.tag() == "CERTIFICATE").count())
            .unwrap_or(0);
        if certs == 0 {
            self.r.push(
                key,
                format!(
                    "\"{shown}\" contains no PEM certificate (\"-----BEGIN CERTIFICATE-----\"); \
                     point ca_file at a PEM bundle of CA certificates"
                ),
            );
            return None;
        }
        Some(resolved)
    }
}

/// Parses `upstream`: http(s), a host, optional port and base path; nothing else.
pub(super) fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let example =
        "write scheme, host, optional port and base path, e.g. \"https://api.example.com/v1\"";
    let url = Url::parse(text)
        .map_err(|e| format!("{text:?} is not an absolute URL ({e}); {example}"))?;
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        other => {
            return Err(format!(
                "{text:?} has scheme \"{other}\"; use https:// or http://"
            ))
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "contains user:password@; tokengate adds its own credentials, remove them".to_string(),
        );
    }
    if url.query().is_some() {
        return Err(format!(
            "{text:?} has a ?query; the request's own query is forwarded, remove it"
        ));
    }
    if url.fragment().is_some() {
        return Err(format!("{text:?} has a #fragment; remove it"));
    }
    let (host, bracketed) = match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => (d.to_ascii_lowercase(), None),
        Some(url::Host::Ipv4(a)) => (a.to_string(), None),
        Some(url::Host::Ipv6(a)) => (a.to_string(), Some(format!("[{a}]"))),
        _ => return Err(format!("{text:?} has no host; {example}")),
    };
    let default_port = if tls { 443 } else { 80 };
    let port = url.port().unwrap_or(default_port);
    let mut authority = bracketed.unwrap_or_else(|| host.clone());
    if port != default_port {
        authority.push_str(&format!(":{port}"));
    }
    let base_path = url.path().trim_end_matches('/').to_string();
    Ok(Upstream {
        tls,
        host,
        port,
        authority,
        base_path,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{cc_route, errors, has};

    use super::*;

    #[test]
    fn upstream_shapes() {
        let u = parse_upstream("https://h/").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.authority.as_str(),
                u.base_path.as_str()
            ),
            ("h", 443, "h", "")
        );
        let u = parse_upstream("http://API.example.com:8080/v1/").unwrap();
        assert_eq!(u.authority, "api.example.com:8080");
        assert_eq!(u.base_path, "/v1");
        assert!(!u.tls);
        let u = parse_upstream("https://[::1]:8443/x").unwrap();
        assert_eq!(
            (u.host.as_str(), u.authority.as_str(), u.port),
            ("::1", "[::1]:8443", 8443)
        );
        let u = parse_upstream("https://[::1]:443").unwrap();
        assert_eq!(u.authority, "[::1]");
        for bad in [
            "https://h/?q=1",
            "https://h/#f",
            "https://u:p@h/",
            "ftp://h",
            "h:80",
            "/x",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
        assert!(!parse_upstream("https://user:hunter2@h/")
            .unwrap_err()
            .contains("hunter2"));
    }

    #[test]
    fn ca_file_checked() {
        let errs = errors(&cc_route("").replace(
            "upstream =",
            "ca_file = \"/nonexistent/ca.pem\"\nupstream =",
        ));
        assert!(
            has(
                &errs,
                "routes[0].ca_file: cannot read \"/nonexistent/ca.pem\""
            ),
            "{errs:?}"
        );
        let key = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/crates/sandbox/src/keys/demo-public.pem"
        );
        let errs =
            errors(&cc_route("").replace("upstream =", &format!("ca_file = {key:?}\nupstream =")));
        assert!(has(&errs, "contains no PEM certificate"), "{errs:?}");
    }
}
