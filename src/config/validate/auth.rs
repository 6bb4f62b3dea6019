//! `[routes.auth]`: the grant and its settings, the token endpoint, client authentication and
//! the token lifecycle knobs (docs/configuration.md "[routes.auth]"). Credentials come from
//! `secrets.rs`.

use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use crate::config::defaults::{
    DEFAULT_ASSERTION_LIFETIME, DEFAULT_MIN_TIME_LEFT, DEFAULT_REFRESH_RATIO,
    DEFAULT_TOKEN_LIFETIME, DEFAULT_TOKEN_TIMEOUT, MAX_ASSERTION_LIFETIME,
    MAX_DEFAULT_TOKEN_LIFETIME, MAX_TOKEN_TIMEOUT,
};
use crate::config::file::AuthFile;
use crate::config::{AuthConfig, BasicEncoding, ClientAuth, Grant, Secret, TokenEndpointLocation};
use crate::oauth::key_file::{KeyFileError, ServiceAccountKey};

use super::Validator;

/// Which grant a route uses, before its settings are known to be valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrantKind {
    JwtBearer,
    ClientCredentials,
}

impl GrantKind {
    fn name(self) -> &'static str {
        match self {
            GrantKind::JwtBearer => "jwt_bearer",
            GrantKind::ClientCredentials => "client_credentials",
        }
    }
}

/// The token lifecycle knobs, validated (defaults filled in).
struct Lifecycle {
    default_token_lifetime: Duration,
    refresh_ratio: f64,
    min_time_left: Duration,
    token_timeout: Duration,
}

impl Validator<'_> {
    /// `[routes.auth]` at key `p` (`routes[i].auth`). `None` when anything needed is missing
    /// or invalid (each problem is reported); checks that do not depend on each other all run.
    pub(super) fn auth(&mut self, p: &str, a: AuthFile) -> Option<AuthConfig> {
        let AuthFile {
            grant,
            token_endpoint,
            issuer,
            client_id,
            client_id_file,
            client_secret,
            client_secret_file,
            client_auth,
            basic_encoding,
            key_file,
            subject,
            audience,
            assertion_lifetime,
            scope,
            resource,
            default_token_lifetime,
            refresh_ratio,
            min_time_left,
            token_timeout,
        } = a;
        let grant = self.grant_kind(p, grant.as_deref());
        let endpoint = self.token_endpoint(p, token_endpoint, issuer);

        let client_id = self.secret_value(p, "client_id", client_id, client_id_file);
        if client_id.is_none() {
            self.r.push(
                &format!("{p}.client_id"),
                "missing; set client_id = \"…\" (or client_id_file = \"/run/secrets/…\") to the \
                 client id the authorization server issued",
            );
        }
        let client_secret =
            self.secret_value(p, "client_secret", client_secret, client_secret_file);
        let client_auth_given = client_auth.is_some();
        let client_auth =
            self.client_auth(p, client_auth.as_deref(), basic_encoding.as_deref(), grant);
        if client_secret.is_none() {
            self.secret_missing(p, grant, client_auth_given);
        }

        let scope = self.non_empty(&format!("{p}.scope"), scope);
        let audience = self.non_empty(&format!("{p}.audience"), audience);
        let lifecycle = self.lifecycle(
            p,
            default_token_lifetime.map(|d| d.0),
            refresh_ratio,
            min_time_left.map(|d| d.0),
            token_timeout.map(|d| d.0),
        );

        let only_for = |v: &mut Self, key: &str, set: bool, wanted: GrantKind| {
            if set && grant.is_some_and(|g| g != wanted) {
                v.r.push(
                    &format!("{p}.{key}"),
                    format!("only applies to grant = \"{}\"; remove it", wanted.name()),
                );
            }
        };
        only_for(self, "key_file", key_file.is_some(), GrantKind::JwtBearer);
        only_for(self, "subject", subject.is_some(), GrantKind::JwtBearer);
        only_for(
            self,
            "assertion_lifetime",
            assertion_lifetime.is_some(),
            GrantKind::JwtBearer,
        );
        only_for(
            self,
            "resource",
            resource.is_some(),
            GrantKind::ClientCredentials,
        );

        let grant = match grant? {
            GrantKind::JwtBearer => {
                self.jwt_bearer(p, key_file, subject, assertion_lifetime.map(|d| d.0))?
            }
            GrantKind::ClientCredentials => self.client_credentials(p, resource),
        };

        Some(AuthConfig {
            grant,
            endpoint: endpoint?,
            client_id: client_id?,
            client_secret: client_secret.map(Secret::new),
            client_auth: client_auth?,
            scope,
            audience,
            default_token_lifetime: lifecycle.default_token_lifetime,
            refresh_ratio: lifecycle.refresh_ratio,
            min_time_left: lifecycle.min_time_left,
            token_timeout: lifecycle.token_timeout,
        })
    }

    /// `grant`: required, `jwt_bearer` or `client_credentials`.
    fn grant_kind(&mut self, p: &str, grant: Option<&str>) -> Option<GrantKind> {
        match grant {
            Some("jwt_bearer") => Some(GrantKind::JwtBearer),
            Some("client_credentials") => Some(GrantKind::ClientCredentials),
            Some(other) => {
                self.r.push(
                    &format!("{p}.grant"),
                    format!(
                        "unknown grant {other:?}; expected \"jwt_bearer\" or \"client_credentials\""
                    ),
                );
                None
            }
            None => {
                self.r.push(
                    &format!("{p}.grant"),
                    "missing; set grant = \"jwt_bearer\" (RFC 7523, Drillster) or grant = \
                     \"client_credentials\" (RFC 6749 §4.4)",
                );
                None
            }
        }
    }

    /// Exactly one of `token_endpoint` and `issuer` (RFC 8414 discovery).
    fn token_endpoint(
        &mut self,
        p: &str,
        token_endpoint: Option<String>,
        issuer: Option<String>,
    ) -> Option<TokenEndpointLocation> {
        match (token_endpoint, issuer) {
            (Some(_), Some(_)) => {
                self.r.push(
                    &format!("{p}.issuer"),
                    "both token_endpoint and issuer are set; keep one (issuer means RFC 8414 \
                     discovery of the token endpoint)",
                );
                None
            }
            (Some(t), None) => self
                .http_url(&format!("{p}.token_endpoint"), &t, true)
                .map(TokenEndpointLocation::Url),
            (None, Some(i)) => self
                .http_url(&format!("{p}.issuer"), &i, false)
                .map(TokenEndpointLocation::Issuer),
            (None, None) => {
                self.r.push(
                    &format!("{p}.token_endpoint"),
                    "missing; set token_endpoint = \"https://…/token\", or issuer = \
                     \"https://…\" for RFC 8414 discovery",
                );
                None
            }
        }
    }

    /// `client_auth` and `basic_encoding`. Without `client_auth`: Basic for
    /// `client_credentials`, the form body for `jwt_bearer` (Drillster). `basic_encoding`
    /// applies to Basic only.
    fn client_auth(
        &mut self,
        p: &str,
        client_auth: Option<&str>,
        basic_encoding: Option<&str>,
        grant: Option<GrantKind>,
    ) -> Option<ClientAuth> {
        let basic = match client_auth {
            None => grant.map(|g| g == GrantKind::ClientCredentials),
            Some("client_secret_basic") => Some(true),
            Some("client_secret_post") => Some(false),
            Some(other) => {
                self.r.push(
                    &format!("{p}.client_auth"),
                    format!(
                        "unknown client_auth {other:?}; expected \"client_secret_basic\" or \
                         \"client_secret_post\""
                    ),
                );
                None
            }
        };
        let encoding = match basic_encoding {
            None | Some("form") => Some(BasicEncoding::Form),
            Some("raw") => Some(BasicEncoding::Raw),
            Some(other) => {
                self.r.push(
                    &format!("{p}.basic_encoding"),
                    format!(
                        "unknown basic_encoding {other:?}; expected \"form\" (RFC 6749 §2.3.1) \
                         or \"raw\" (RFC 7617 as-is)"
                    ),
                );
                None
            }
        };
        if basic_encoding.is_some() && basic == Some(false) {
            self.r.push(
                &format!("{p}.basic_encoding"),
                "only applies to client_auth = \"client_secret_basic\"; remove it or set \
                 client_auth = \"client_secret_basic\"",
            );
        }
        match (basic, encoding) {
            (Some(true), Some(e)) => Some(ClientAuth::Basic(e)),
            (Some(false), _) => Some(ClientAuth::Post),
            _ => None,
        }
    }

    /// Reports a missing `client_secret` where one is needed: always for
    /// `client_credentials`; for `jwt_bearer` (where it is optional) when `client_auth` says to
    /// send one.
    fn secret_missing(&mut self, p: &str, grant: Option<GrantKind>, client_auth_given: bool) {
        match grant {
            Some(GrantKind::ClientCredentials) => self.r.push(
                &format!("{p}.client_secret"),
                "missing; grant \"client_credentials\" needs client_secret = \"${VAR}\" or \
                 client_secret_file = \"/run/secrets/…\"",
            ),
            Some(GrantKind::JwtBearer) if client_auth_given => self.r.push(
                &format!("{p}.client_secret"),
                "missing; client_auth is set but there is no secret to send; set \
                 client_secret or client_secret_file, or remove client_auth",
            ),
            _ => {}
        }
    }

    /// `default_token_lifetime`, `refresh_ratio` in (0, 1), `token_timeout`, and
    /// `min_time_left`, which must be less than the default lifetime.
    fn lifecycle(
        &mut self,
        p: &str,
        default_token_lifetime: Option<Duration>,
        refresh_ratio: Option<f64>,
        min_time_left: Option<Duration>,
        token_timeout: Option<Duration>,
    ) -> Lifecycle {
        let default_token_lifetime = self.positive(
            &format!("{p}.default_token_lifetime"),
            default_token_lifetime,
            DEFAULT_TOKEN_LIFETIME,
        );
        let default_token_lifetime = self.at_most(
            &format!("{p}.default_token_lifetime"),
            default_token_lifetime,
            MAX_DEFAULT_TOKEN_LIFETIME,
        );
        let refresh_ratio = match refresh_ratio {
            None => DEFAULT_REFRESH_RATIO,
            Some(r) if r.is_finite() && r > 0.0 && r < 1.0 => r,
            Some(r) => {
                self.r.push(
                    &format!("{p}.refresh_ratio"),
                    format!(
                        "{r} is outside (0, 1); use a fraction of the token lifetime such as 0.8"
                    ),
                );
                DEFAULT_REFRESH_RATIO
            }
        };
        let token_timeout = self.positive(
            &format!("{p}.token_timeout"),
            token_timeout,
            DEFAULT_TOKEN_TIMEOUT,
        );
        let token_timeout = self.at_most(
            &format!("{p}.token_timeout"),
            token_timeout,
            MAX_TOKEN_TIMEOUT,
        );
        let min_time_left = min_time_left.unwrap_or(DEFAULT_MIN_TIME_LEFT);
        if min_time_left >= default_token_lifetime {
            self.r.push(
                &format!("{p}.min_time_left"),
                format!(
                    "\"{}\" is not less than default_token_lifetime \"{}\", so such a token \
                     could never be used; lower min_time_left",
                    humantime::format_duration(min_time_left),
                    humantime::format_duration(default_token_lifetime)
                ),
            );
        }
        Lifecycle {
            default_token_lifetime,
            refresh_ratio,
            min_time_left,
            token_timeout,
        }
    }

    /// The `jwt_bearer` grant: the key file (required), `subject` (default: the key file's
    /// `serviceAccountId`) and `assertion_lifetime` (more than 0, at most 1 h).
    fn jwt_bearer(
        &mut self,
        p: &str,
        key_file: Option<String>,
        subject: Option<String>,
        assertion_lifetime: Option<Duration>,
    ) -> Option<Grant> {
        let key_and_path = self.key_file(p, key_file);
        let subject = self.non_empty(&format!("{p}.subject"), subject);
        let lifetime = match assertion_lifetime {
            None => DEFAULT_ASSERTION_LIFETIME,
            Some(d) if !d.is_zero() && d <= MAX_ASSERTION_LIFETIME => d,
            Some(d) => {
                self.r.push(
                    &format!("{p}.assertion_lifetime"),
                    format!(
                        "\"{}\" is out of range; use more than 0s and at most \"1h\" \
                         (the assertion's exp may be at most one hour ahead)",
                        humantime::format_duration(d)
                    ),
                );
                DEFAULT_ASSERTION_LIFETIME
            }
        };
        let (key, key_file) = key_and_path?;
        let subject = subject.unwrap_or_else(|| key.service_account_id.clone());
        Some(Grant::JwtBearer {
            key,
            key_file,
            subject,
            assertion_lifetime: lifetime,
        })
    }

    /// `key_file`: the service account's JSON key file, read and parsed.
    fn key_file(
        &mut self,
        p: &str,
        key_file: Option<String>,
    ) -> Option<(ServiceAccountKey, PathBuf)> {
        let Some(kf) = key_file else {
            self.r.push(
                &format!("{p}.key_file"),
                "missing; grant \"jwt_bearer\" needs the service account's JSON key file, e.g. \
                 key_file = \"/etc/tokengate/drillster-key.json\"",
            );
            return None;
        };
        let resolved = self.resolve(&kf);
        match ServiceAccountKey::from_file(&resolved) {
            Ok(key) => Some((key, resolved)),
            Err(e) => {
                let fix = match e {
                    KeyFileError::Read(_) => {
                        "; point key_file at the service account's JSON key file"
                    }
                    _ => "",
                };
                self.r.push(
                    &format!("{p}.key_file"),
                    format!("{}: {e}{fix}", resolved.display()),
                );
                None
            }
        }
    }

    /// The `client_credentials` grant: an optional RFC 8707 `resource`.
    fn client_credentials(&mut self, p: &str, resource: Option<String>) -> Grant {
        let resource =
            resource.and_then(|r| self.absolute_uri(&format!("{p}.resource"), &r).map(|_| r));
        Grant::ClientCredentials { resource }
    }

    /// `token_endpoint` (query allowed, RFC 6749 §3.2) or `issuer` (no query, RFC 8414 §2).
    fn http_url(&mut self, key: &str, text: &str, query_ok: bool) -> Option<Url> {
        let example = "e.g. \"https://auth.example.com/oauth/token\"";
        let url = match Url::parse(text) {
            Ok(u) => u,
            Err(e) => {
                self.r.push(
                    key,
                    format!("{text:?} is not an absolute URL ({e}); write a full URL, {example}"),
                );
                return None;
            }
        };
        let problem = if !matches!(url.scheme(), "http" | "https") {
            Some(format!(
                "{text:?} has scheme \"{}\"; use https:// (or http:// for local testing)",
                url.scheme()
            ))
        } else if !url.username().is_empty() || url.password().is_some() {
            Some(
                "contains user:password@; put credentials in client_id and client_secret instead"
                    .to_string(),
            )
        } else if url.host_str().is_none_or(str::is_empty) {
            Some(format!("{text:?} has no host; {example}"))
        } else if url.fragment().is_some() {
            Some(format!("{text:?} has a #fragment; remove it"))
        } else if !query_ok && url.query().is_some() {
            Some(format!(
                "{text:?} has a ?query; an RFC 8414 issuer has none, remove it"
            ))
        } else {
            None
        };
        match problem {
            Some(msg) => {
                self.r.push(key, msg);
                None
            }
            None => Some(url),
        }
    }

    /// RFC 8707 `resource`: an absolute URI without a fragment.
    fn absolute_uri(&mut self, key: &str, text: &str) -> Option<Url> {
        match Url::parse(text) {
            Ok(u) if u.fragment().is_none() => Some(u),
            Ok(_) => {
                self.r.push(
                    key,
                    format!("{text:?} has a #fragment; RFC 8707 resources have none, remove it"),
                );
                None
            }
            Err(e) => {
                self.r.push(
                    key,
                    format!("{text:?} is not an absolute URI ({e}); RFC 8707 needs e.g. \"https://api.example.com/\""),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{cc_route, errors, has, jwt_route, load, no_env, DEMO_KEY};
    use crate::config::Config;

    use super::*;

    #[test]
    fn jwt_bearer_defaults_from_key_file() {
        let c = load(&jwt_route(DEMO_KEY, "")).expect("valid");
        let a = &c.routes[0].auth;
        assert_eq!(a.client_auth, ClientAuth::Post);
        match &a.grant {
            Grant::JwtBearer {
                subject,
                assertion_lifetime,
                key,
                ..
            } => {
                assert_eq!(subject, "iqKpEF3URCe0yAsyrsk_4g");
                assert_eq!(key.key_id, "cf9f895ff1f64e2f9ceea45074f56c52");
                assert_eq!(*assertion_lifetime, Duration::from_secs(300));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_client_id_named() {
        let errs = errors(&cc_route("").replace("client_id = \"abc\"", ""));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("tokengate.toml:6: routes[0].auth.client_id: missing;"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn missing_key_file_named() {
        let errs = errors(&jwt_route("/nonexistent/drillster-key.json", ""));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("routes[0].auth.key_file: /nonexistent/drillster-key.json: cannot read the key file"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn key_file_whose_private_key_is_not_a_key() {
        let dir =
            std::env::temp_dir().join(format!("tokengate-keyfile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("bad.json"),
            r#"{"privateKey": "hello", "keyId": "k", "serviceAccountId": "s"}"#,
        )
        .unwrap();
        let text = jwt_route("bad.json", "");
        let e = Config::from_toml_str(&text, Some(&dir.join("t.toml")), &no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes[0].auth.key_file: "), "{e}");
        assert!(
            e.contains("bad.json: field `privateKey` is not a PEM private key"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_grant_message() {
        let errs = errors(&cc_route("").replace("\"client_credentials\"", "\"client-credential\""));
        assert!(
            has(&errs, "routes[0].auth.grant: unknown grant \"client-credential\"; expected \"jwt_bearer\" or \"client_credentials\""),
            "{errs:?}"
        );
    }

    #[test]
    fn grant_specific_rules() {
        let errs = errors(&cc_route(
            "key_file = \"k.json\"\nbasic_encoding = \"raw\"\nclient_auth = \"client_secret_post\"",
        ));
        assert!(
            has(
                &errs,
                "routes[0].auth.key_file: only applies to grant = \"jwt_bearer\""
            ),
            "{errs:?}"
        );
        assert!(has(&errs, "routes[0].auth.basic_encoding: only applies to client_auth = \"client_secret_basic\""), "{errs:?}");
        let errs = errors(&cc_route("").replace("client_secret = \"def\"", ""));
        assert!(
            has(
                &errs,
                "routes[0].auth.client_secret: missing; grant \"client_credentials\""
            ),
            "{errs:?}"
        );
        let errs = errors(&jwt_route(
            DEMO_KEY,
            "assertion_lifetime = \"2h\"\nresource = \"https://r/\"",
        ));
        assert!(
            has(
                &errs,
                "routes[0].auth.assertion_lifetime: \"2h\" is out of range"
            ),
            "{errs:?}"
        );
        assert!(
            has(
                &errs,
                "routes[0].auth.resource: only applies to grant = \"client_credentials\""
            ),
            "{errs:?}"
        );
        let errs = errors(&jwt_route(DEMO_KEY, "").replace("key_file", "# key_file"));
        assert!(has(&errs, "routes[0].auth.key_file: missing"), "{errs:?}");
        let errs = errors(&jwt_route(
            DEMO_KEY,
            "issuer = \"https://www.drillster.com\"",
        ));
        assert!(
            has(
                &errs,
                "routes[0].auth.issuer: both token_endpoint and issuer"
            ),
            "{errs:?}"
        );
        let c = load(
            &jwt_route(DEMO_KEY, "")
                .replace("token_endpoint", "issuer")
                .replace("/api/oauth/token", ""),
        )
        .expect("issuer");
        assert!(matches!(
            c.routes[0].auth.endpoint,
            TokenEndpointLocation::Issuer(_)
        ));
        let c = load(&cc_route(
            "client_auth = \"client_secret_basic\"\nbasic_encoding = \"raw\"",
        ))
        .expect("raw");
        assert_eq!(
            c.routes[0].auth.client_auth,
            ClientAuth::Basic(BasicEncoding::Raw)
        );
    }

    #[test]
    fn lifecycle_knobs() {
        let errs = errors(&cc_route(
            "default_token_lifetime = \"5s\"\nmin_time_left = \"10s\"\nrefresh_ratio = 0",
        ));
        assert!(has(&errs, "routes[0].auth.min_time_left"), "{errs:?}");
        assert!(
            has(&errs, "routes[0].auth.refresh_ratio: 0 is outside (0, 1)"),
            "{errs:?}"
        );
        let errs = errors(&cc_route("token_timeout = \"0s\""));
        assert!(
            has(&errs, "routes[0].auth.token_timeout: \"0s\" is not allowed"),
            "{errs:?}"
        );
        let c = load(&cc_route("token_timeout = \"1500ms\"")).expect("token_timeout");
        assert_eq!(c.routes[0].auth.token_timeout, Duration::from_millis(1500));
        let errs = errors(&cc_route("default_token_lifetime = 300"));
        assert!(
            has(
                &errs,
                "routes[0].auth.default_token_lifetime: the bare number 300 has no unit"
            ),
            "{errs:?}"
        );
    }
}
