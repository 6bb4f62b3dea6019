//! `[routes.subjects]`: per-user tokens (docs/per-user-tokens.md). Only a `jwt_bearer` route
//! can ask for a managed user's token (RFC 7523 §3 `sub`; "Drillster: Service accounts").

use ipnet::IpNet;

use crate::config::defaults::DEFAULT_MAX_CACHED_SUBJECTS;
use crate::config::file::SubjectsFile;
use crate::config::{Grant, ServerConfig, SubjectsConfig};
use crate::proxy::policy::fields::{fold_name, FieldName};
use crate::proxy::policy::{classify, fields};

use super::Validator;

/// Largest `allow` pattern program, bytes (the `regex` crate's size limit): bounds the memory
/// and the time a pattern can take.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

impl Validator<'_> {
    /// `[routes.subjects]` of the route at `p`; `grant` and `strip_headers` are the route's,
    /// `server` the validated `[server]`.
    pub(super) fn subjects(
        &mut self,
        p: &str,
        s: SubjectsFile,
        grant: Option<&Grant>,
        strip_headers: &[http::HeaderName],
        server: &ServerConfig,
    ) -> Option<SubjectsConfig> {
        let key = format!("{p}.subjects");
        if let Some(g @ Grant::ClientCredentials { .. }) = grant {
            self.r.push(
                &key,
                format!(
                    "per-user tokens need the jwt_bearer grant (the assertion's sub names the \
                     user, RFC 7523 §3); this route's grant is {}; remove [routes.subjects]",
                    g.name()
                ),
            );
        }
        let allow_patterns = s.allow.unwrap_or_default();
        if allow_patterns.is_empty() {
            self.r.push(
                &format!("{key}.allow"),
                "no subject would be allowed; list regular expressions matched against the whole \
                 subject (anchored for you), e.g. allow = [\"[A-Za-z0-9_-]{22}\"]",
            );
        }
        let mut anchored = Vec::with_capacity(allow_patterns.len());
        for (i, pattern) in allow_patterns.iter().enumerate() {
            let a = format!("^(?:{pattern})$");
            // The pattern must parse on its own too: one that closes the group around it
            // (`a)|(b`) would otherwise escape the anchors.
            let build = |p: &str| {
                regex::RegexBuilder::new(p)
                    .size_limit(PATTERN_SIZE_LIMIT)
                    .build()
            };
            match build(pattern).and_then(|_| build(&a)) {
                Ok(_) => anchored.push(a),
                Err(e) => {
                    let why = match e {
                        regex::Error::Syntax(s) => s.lines().last().unwrap_or("").to_string(),
                        regex::Error::CompiledTooBig(_) => "the pattern is too large".into(),
                        _ => "invalid".into(),
                    };
                    self.r.push(
                        &format!("{key}.allow[{i}]"),
                        format!(
                            "{pattern:?} is not a regular expression ({why}); write e.g. \
                             \"[^@]+@example\\\\.com\" (matched against the whole subject; \
                             backslashes doubled in a TOML string)"
                        ),
                    );
                }
            }
        }
        let allow = regex::RegexSetBuilder::new(&anchored)
            .size_limit(PATTERN_SIZE_LIMIT * 4)
            .build()
            .ok()?;

        let header = s
            .header
            .and_then(|h| self.subject_header(&key, &h, strip_headers));
        let header_clients: Vec<IpNet> = match s.header_clients {
            None if header.is_some() => {
                self.r.push(
                    &format!("{key}.header_clients"),
                    "missing; list the CIDRs of the clients trusted to name a subject with \
                     header, e.g. header_clients = [\"10.1.0.0/24\"]",
                );
                Vec::new()
            }
            None => Vec::new(),
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let k = format!("{key}.header_clients[{i}]");
                    let net = self.cidr(&k, c)?;
                    let within = server.allowed_clients.iter().any(|a| a.contains(&net));
                    if !within {
                        self.r.push(
                            &k,
                            format!(
                                "\"{c}\" is wider than server.allowed_clients: a client trusted \
                                 to name a subject must be one that may use the proxy; narrow it \
                                 or add it to server.allowed_clients"
                            ),
                        );
                    }
                    Some(net)
                })
                .collect(),
        };
        if header.is_none() && !header_clients.is_empty() {
            self.r.push(
                &format!("{key}.header_clients"),
                "has no effect without header; set header = \"Tokengate-Subject\" or remove \
                 header_clients",
            );
        }
        let max_cached = match s.max_cached {
            None => DEFAULT_MAX_CACHED_SUBJECTS,
            Some(n) if n >= 1 => usize::try_from(n).unwrap_or(DEFAULT_MAX_CACHED_SUBJECTS),
            Some(n) => {
                self.r.push(
                    &format!("{key}.max_cached"),
                    format!(
                        "{n} tokens cannot be kept; use 1 or more, or remove the key for \
                         {DEFAULT_MAX_CACHED_SUBJECTS}"
                    ),
                );
                DEFAULT_MAX_CACHED_SUBJECTS
            }
        };
        Some(SubjectsConfig {
            allow_patterns,
            allow,
            header,
            header_clients,
            max_cached,
        })
    }

    /// `header`: a field name the gateway neither sets nor strips (the policy's field table,
    /// [`classify`], and the route's `strip_headers`).
    fn subject_header(
        &mut self,
        key: &str,
        h: &str,
        strip_headers: &[http::HeaderName],
    ) -> Option<http::HeaderName> {
        let k = format!("{key}.header");
        let Ok(name) = http::HeaderName::from_bytes(h.trim().as_bytes()) else {
            self.r.push(
                &k,
                format!("{h:?} is not a valid header name; write e.g. \"Tokengate-Subject\""),
            );
            return None;
        };
        let class = classify(name.as_str().as_bytes());
        if class != FieldName::Other {
            self.r.push(
                &k,
                format!(
                    "{h:?} is a field the gateway sets or removes itself; name a field of its \
                     own, e.g. \"Tokengate-Subject\""
                ),
            );
            return None;
        }
        let stripped: fields::FoldedNames = strip_headers
            .iter()
            .map(|s| fold_name(s.as_str()))
            .collect();
        if stripped.contains(name.as_str().as_bytes()) {
            self.r.push(
                &k,
                format!(
                    "{h:?} is in this route's strip_headers; name another field, e.g. \
                     \"Tokengate-Subject\", or remove it from strip_headers"
                ),
            );
            return None;
        }
        Some(name)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{cc_route, errors, has, jwt_route, load, DEMO_KEY};

    fn with_subjects(route: String, subjects: &str) -> String {
        format!("[server]\nallowed_clients = [\"127.0.0.0/8\", \"10.1.0.0/16\"]\n{route}\n[routes.subjects]\n{subjects}\n")
    }

    #[test]
    fn a_valid_table_loads_anchored() {
        let text = with_subjects(
            jwt_route(DEMO_KEY, ""),
            r#"allow = ["[A-Za-z0-9_-]{22}", "^[^@]+@example\\.com$"]
header = "Tokengate-Subject"
header_clients = ["10.1.0.0/24"]
max_cached = 5"#,
        );
        let c = load(&text).expect("loads");
        let s = c.routes[0].subjects.as_ref().expect("subjects");
        assert!(s.allows(b"ann@example.com"));
        assert!(s.allows(b"abcdefghijABCDEFGHIJ_-"));
        // Whole match only, never a prefix or a suffix.
        assert!(!s.allows(b"ann@example.com.evil.org"));
        assert!(!s.allows(b"xabcdefghijABCDEFGHIJ_-"));
        // Characters no id uses are refused before any pattern runs.
        assert!(!s.allows(b"ann\n@example.com"));
        assert!(!s.allows(&[b'a'; 300]));
        assert_eq!(s.max_cached, 5);
        assert!(s.header_client("10.1.0.7".parse().expect("ip")));
        assert!(!s.header_client("10.1.1.7".parse().expect("ip")));
    }

    #[test]
    fn mistakes_name_the_key_and_the_fix() {
        let errs = errors(&with_subjects(cc_route(""), "allow = [\"x\"]"));
        assert!(
            has(
                &errs,
                "routes[0].subjects: per-user tokens need the jwt_bearer grant"
            ),
            "{errs:?}"
        );
        let errs = errors(&with_subjects(jwt_route(DEMO_KEY, ""), "allow = [\"(x\"]"));
        assert!(
            has(
                &errs,
                "routes[0].subjects.allow[0]: \"(x\" is not a regular expression"
            ),
            "{errs:?}"
        );
        // A pattern that would close the anchoring group and match a prefix or suffix.
        let errs = errors(&with_subjects(
            jwt_route(DEMO_KEY, ""),
            r#"allow = ["ann@example\\.com)|(bob"]"#,
        ));
        assert!(
            has(&errs, "routes[0].subjects.allow[0]: ")
                && has(&errs, "is not a regular expression"),
            "{errs:?}"
        );
        for h in [
            "Authorization",
            "X-Forwarded-For",
            "cookie",
            "X_Forwarded_Host",
            "Host",
        ] {
            let errs = errors(&with_subjects(
                jwt_route(DEMO_KEY, ""),
                &format!("allow = [\"x\"]\nheader = {h:?}\nheader_clients = [\"10.1.0.0/24\"]"),
            ));
            assert!(
                has(&errs, "routes[0].subjects.header: ")
                    && has(&errs, "is a field the gateway sets or removes itself"),
                "{h}: {errs:?}"
            );
        }
        let route = jwt_route(DEMO_KEY, "")
            .replace("upstream =", "strip_headers = [\"X-User\"]\nupstream =");
        let errs = errors(&with_subjects(
            route,
            "allow = [\"x\"]\nheader = \"x_user\"\nheader_clients = [\"10.1.0.0/24\"]",
        ));
        assert!(has(&errs, "is in this route's strip_headers"), "{errs:?}");
        let errs = errors(&with_subjects(
            jwt_route(DEMO_KEY, ""),
            "allow = [\"x\"]\nheader = \"Tokengate-Subject\"\nheader_clients = [\"10.0.0.0/8\"]",
        ));
        assert!(
            has(
                &errs,
                "routes[0].subjects.header_clients[0]: \"10.0.0.0/8\" is wider than server.allowed_clients"
            ),
            "{errs:?}"
        );
        let errs = errors(&with_subjects(
            jwt_route(DEMO_KEY, ""),
            "allow = []\nmax_cached = 0",
        ));
        assert!(
            has(
                &errs,
                "routes[0].subjects.allow: no subject would be allowed"
            ),
            "{errs:?}"
        );
        assert!(
            has(&errs, "routes[0].subjects.max_cached: 0 tokens"),
            "{errs:?}"
        );
        let errs = errors(&with_subjects(
            jwt_route(DEMO_KEY, ""),
            "allow = [\"x\"]\nsubject = \"y\"",
        ));
        assert!(has(&errs, "routes[0].subjects.subject"), "{errs:?}");
    }
}
