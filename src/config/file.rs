//! The file layer: serde structs that mirror the config file's TOML keys exactly
//! (docs/configuration.md).
//!
//! Every field is optional here: presence, defaults and cross-key rules are checked in
//! `validate/`, which can then say which key is missing and how to fix it. A key that is not a
//! field is not an error to serde here: `deserialize.rs` collects every one of them with
//! `serde_ignored` and reports them all, each with the valid keys of its table. Durations and
//! byte sizes are parsed here (with their own error messages) because their syntax is all there
//! is to them.
//!
//! `${VAR}` expansion has already happened when these are deserialized (see `expand.rs`).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
pub(super) struct FileConfig {
    pub server: Option<ServerFile>,
    pub log: Option<LogFile>,
    pub cluster: Option<ClusterFile>,
    pub routes: Option<Vec<RouteFile>>,
}

/// `[cluster]`: share tokens across a fleet of gateways through Redis.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ClusterFile {
    pub redis: Option<String>,
    pub key_prefix: Option<String>,
    pub encryption_key_file: Option<String>,
    pub timeout: Option<DurationValue>,
}

/// `[server]`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ServerFile {
    pub listen: Option<OneOrMany>,
    pub admin_listen: Option<String>,
    pub allowed_clients: Option<Vec<String>>,
    pub threads: Option<i64>,
    pub grace_period: Option<DurationValue>,
    pub shutdown_delay: Option<DurationValue>,
    pub trusted_proxies: Option<Vec<String>>,
    pub hosts_file: Option<String>,
    pub replay_body_limit: Option<ByteSizeValue>,
    pub max_request_head: Option<ByteSizeValue>,
    pub request_head_timeout: Option<DurationValue>,
    pub idle_timeout: Option<DurationValue>,
    pub body_timeout: Option<DurationValue>,
    pub send_timeout: Option<DurationValue>,
    pub max_connections: Option<i64>,
    pub token_listen: Option<String>,
    pub token_clients: Option<Vec<String>>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct LogFile {
    pub format: Option<String>,
    pub level: Option<String>,
}

/// One `[[routes]]` table.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RouteFile {
    pub name: Option<String>,
    pub path_prefix: Option<String>,
    pub host: Option<String>,
    pub listen: Option<String>,
    pub strip_prefix: Option<bool>,
    pub upstream: Option<String>,
    pub connect_timeout: Option<DurationValue>,
    pub read_timeout: Option<DurationValue>,
    pub forward_cookies: Option<bool>,
    pub allow_methods: Option<Vec<String>>,
    pub ca_file: Option<String>,
    pub strip_headers: Option<Vec<String>>,
    pub auth: Option<AuthFile>,
    pub subjects: Option<SubjectsFile>,
}

/// `[routes.subjects]`: per-user tokens.
#[derive(Debug, Default, Deserialize)]
pub(super) struct SubjectsFile {
    pub allow: Option<Vec<String>>,
    pub header: Option<String>,
    pub header_clients: Option<Vec<String>>,
    pub max_cached: Option<i64>,
}

/// `[routes.auth]`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct AuthFile {
    pub grant: Option<String>,
    pub token_endpoint: Option<String>,
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub client_id_file: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<String>,
    pub client_auth: Option<String>,
    pub basic_encoding: Option<String>,
    pub key_file: Option<String>,
    pub subject: Option<String>,
    pub audience: Option<String>,
    pub assertion_lifetime: Option<DurationValue>,
    pub scope: Option<String>,
    pub resource: Option<String>,
    pub default_token_lifetime: Option<DurationValue>,
    pub refresh_ratio: Option<f64>,
    pub min_time_left: Option<DurationValue>,
    pub token_timeout: Option<DurationValue>,
}

/// `listen`: one address or an array of them. An array holding something other than strings
/// is reported by `deserialize.rs` naming the element, which this enum cannot (serde tries
/// each variant on the whole value).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "expected an address or an array of addresses, e.g. \"127.0.0.1:8080\""
)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A humantime duration string such as `"5s"`, `"10m"` or `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration string with a unit, e.g. "5s", "10m" or "1h""#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationValue, E> {
                humantime::parse_duration(v.trim())
                    .map(DurationValue)
                    .map_err(|e| {
                        E::custom(format!(
                            "invalid duration {v:?} ({e}); write a number with a unit, e.g. \
                             \"5s\", \"10m\" or \"1h\""
                        ))
                    })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationValue, E> {
                Err(E::custom(format!(
                    "the bare number {v} has no unit; write a duration string such as \"{v}s\""
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationValue, E> {
                Err(E::custom(format!(
                    "the bare number {v} has no unit; write a duration string such as \"{v}s\""
                )))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<DurationValue, E> {
                Err(E::custom(format!(
                    "the bare number {v} has no unit; write a duration string such as \"{v}s\""
                )))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A byte size: a bytesize string (`"64KiB"`, `"1 MB"`) or an integer number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ByteSizeValue(pub u64);

impl<'de> Deserialize<'de> for ByteSizeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSizeValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a byte size such as "64KiB" or a number of bytes"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSizeValue, E> {
                v.trim()
                    .parse::<bytesize::ByteSize>()
                    .map(|b| ByteSizeValue(b.as_u64()))
                    .map_err(|_| {
                        E::custom(format!(
                            "invalid byte size {v:?}; write a number with a unit, e.g. \"64KiB\", \
                             \"1MiB\", or a plain number of bytes"
                        ))
                    })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSizeValue, E> {
                u64::try_from(v).map(ByteSizeValue).map_err(|_| {
                    E::custom(format!(
                        "the byte size {v} is negative; write e.g. \"64KiB\""
                    ))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSizeValue, E> {
                Ok(ByteSizeValue(v))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// Keys whose values are credentials: never quoted in error messages, and each has a `_file`
/// twin whose file content is used instead (docs/configuration.md "Secrets, files and paths").
pub(super) const SECRET_KEYS: &[&str] = &["client_secret", "client_id"];

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct D {
        d: DurationValue,
    }

    #[derive(Debug, Deserialize)]
    struct B {
        b: ByteSizeValue,
    }

    #[derive(Debug, Deserialize)]
    struct L {
        l: OneOrMany,
    }

    #[test]
    fn durations() {
        let d: D = toml::from_str(r#"d = "1h 30m""#).expect("duration");
        assert_eq!(d.d.0, Duration::from_secs(5400));
        let e = toml::from_str::<D>("d = 10").expect_err("bare number");
        assert!(e.message().contains("\"10s\""), "{}", e.message());
        let e = toml::from_str::<D>(r#"d = "10 parsecs""#).expect_err("bad unit");
        assert!(e.message().contains("invalid duration"), "{}", e.message());
    }

    #[test]
    fn byte_sizes() {
        let b: B = toml::from_str(r#"b = "64KiB""#).expect("size");
        assert_eq!(b.b.0, 65536);
        let b: B = toml::from_str("b = 1000").expect("int");
        assert_eq!(b.b.0, 1000);
        assert!(toml::from_str::<B>("b = -1").is_err());
        assert!(toml::from_str::<B>(r#"b = "lots""#).is_err());
    }

    #[test]
    fn one_or_many() {
        let l: L = toml::from_str(r#"l = "a""#).expect("one");
        assert_eq!(l.l, OneOrMany::One("a".into()));
        let l: L = toml::from_str(r#"l = ["a", "b"]"#).expect("many");
        assert_eq!(l.l, OneOrMany::Many(vec!["a".into(), "b".into()]));
        let e = toml::from_str::<L>("l = 5").expect_err("a number");
        assert!(
            e.message()
                .starts_with("expected an address or an array of addresses"),
            "{}",
            e.message()
        );
    }
}
