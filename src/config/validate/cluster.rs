//! `[cluster]`: the Redis URL, the key prefix, the encryption key file and the Redis timeout
//! (docs/configuration.md "`[cluster]`"). The URL may hold a password (often as `${VAR}`):
//! messages never quote it.

use base64::Engine;

use super::Validator;
use crate::config::defaults::{
    DEFAULT_CLUSTER_KEY_PREFIX, DEFAULT_CLUSTER_TIMEOUT, MAX_CLUSTER_TIMEOUT,
};
use crate::config::file::ClusterFile;
use crate::config::{ClusterConfig, ClusterKey, Secret};
use crate::files;

impl Validator<'_> {
    /// `[cluster]`. `None` when a key is missing or invalid (each is reported).
    pub(super) fn cluster(&mut self, c: ClusterFile) -> Option<ClusterConfig> {
        let redis = match c.redis {
            None => {
                self.r.push(
                    "cluster.redis",
                    "is missing; set the Redis URL, e.g. \"redis://127.0.0.1:6379/0\" \
                     (rediss:// for TLS), or remove the [cluster] table",
                );
                None
            }
            Some(text) => self.redis_url(&text),
        };
        let key_prefix = match c.key_prefix {
            None => Some(DEFAULT_CLUSTER_KEY_PREFIX.to_string()),
            Some(p) if p.is_empty() || p.len() > 64 || p.chars().any(|ch| !key_prefix_char(ch)) => {
                self.r.push(
                    "cluster.key_prefix",
                    format!(
                        "\"{p}\" is not a key prefix; use 1 to 64 of A-Z a-z 0-9 _ - . :, \
                         e.g. \"{DEFAULT_CLUSTER_KEY_PREFIX}\""
                    ),
                );
                None
            }
            Some(p) => Some(p),
        };
        let encryption_key = match c.encryption_key_file {
            None => {
                self.r.push(
                    "cluster.encryption_key_file",
                    "is missing; tokens are stored encrypted: create a key with \
                     `head -c 32 /dev/urandom | base64 > cluster.key` and name that file",
                );
                None
            }
            Some(path) => self.cluster_key(&path),
        };
        let timeout = self.positive(
            "cluster.timeout",
            c.timeout.map(|d| d.0),
            DEFAULT_CLUSTER_TIMEOUT,
        );
        // Every Redis command waits at most this long, and a start at most twice it: a store
        // that hangs must never hold tokens back for longer than a token request would.
        let timeout = self.at_most("cluster.timeout", timeout, MAX_CLUSTER_TIMEOUT);
        let (redis, redis_display) = redis?;
        Some(ClusterConfig {
            redis: Secret::new(redis),
            redis_display,
            key_prefix: key_prefix?,
            encryption_key: encryption_key?,
            timeout,
        })
    }

    /// The URL and its display form (password hidden). Only the scheme, host and database
    /// are checked here; the client library parses it again at start.
    fn redis_url(&mut self, text: &str) -> Option<(String, String)> {
        let url = match url::Url::parse(text) {
            Ok(u) => u,
            Err(e) => {
                self.r.push(
                    "cluster.redis",
                    format!(
                        "is not a URL ({e}); expected e.g. \"redis://127.0.0.1:6379/0\" or \
                         \"rediss://:${{REDIS_PASSWORD}}@redis.internal:6380/0\""
                    ),
                );
                return None;
            }
        };
        let mut display = url.clone();
        if display.password().is_some() {
            let _ = display.set_password(Some("***"));
        }
        let display = display.to_string();
        if !matches!(url.scheme(), "redis" | "rediss") {
            self.r.push(
                "cluster.redis",
                format!(
                    "\"{display}\": unsupported scheme \"{}\"; expected redis:// or rediss:// (TLS)",
                    url.scheme()
                ),
            );
            return None;
        }
        if url.host_str().is_none_or(str::is_empty) {
            self.r.push(
                "cluster.redis",
                format!("\"{display}\" names no host; expected e.g. \"redis://127.0.0.1:6379/0\""),
            );
            return None;
        }
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() && db.parse::<u16>().is_err() {
            self.r.push(
                "cluster.redis",
                format!("\"{display}\": the path must be a database number, e.g. /0"),
            );
            return None;
        }
        if redis::Client::open(text).is_err() {
            self.r.push(
                "cluster.redis",
                format!("\"{display}\" is not a Redis URL the client accepts"),
            );
            return None;
        }
        Some((text.to_string(), display))
    }

    /// `encryption_key_file`: 32 bytes, base64 (standard alphabet, padding optional).
    fn cluster_key(&mut self, path: &str) -> Option<ClusterKey> {
        const KEY: &str = "cluster.encryption_key_file";
        let resolved = self.resolve(path);
        let text = match files::read_regular_to_string_capped(&resolved, files::SECRET_FILE_LIMIT) {
            Ok(t) => t,
            Err(e) => {
                self.r.push(
                    KEY,
                    format!(
                        "cannot read \"{}\": {e}; create it with \
                         `head -c 32 /dev/urandom | base64 > FILE` or correct the path",
                        resolved.display()
                    ),
                );
                return None;
            }
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text.trim()));
        match decoded.ok().and_then(|b| <[u8; 32]>::try_from(b).ok()) {
            Some(key) => Some(ClusterKey(key)),
            None => {
                self.r.push(
                    KEY,
                    format!(
                        "the content of \"{}\" is not 32 bytes in base64; create it with \
                         `head -c 32 /dev/urandom | base64 > FILE`",
                        resolved.display()
                    ),
                );
                None
            }
        }
    }
}

fn key_prefix_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::test_support::*;
    use crate::config::Config;

    fn key_file(content: &str) -> tempfile_path::TempFile {
        tempfile_path::TempFile::with(content)
    }

    mod tempfile_path {
        /// A file under the system temp dir, removed on drop.
        pub struct TempFile(pub std::path::PathBuf);
        impl TempFile {
            pub fn with(content: &str) -> Self {
                let p = std::env::temp_dir().join(format!(
                    "tokengate-cluster-key-{}-{}",
                    std::process::id(),
                    uuid::Uuid::new_v4()
                ));
                std::fs::write(&p, content).expect("write key file");
                TempFile(p)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    const KEY_B64: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    fn with_cluster(table: &str) -> String {
        format!("[cluster]\n{table}\n{}", cc_route(""))
    }

    #[test]
    fn a_full_cluster_table_is_read_with_defaults() {
        let k = key_file(&format!("{KEY_B64}\n"));
        let c: Config = load(&with_cluster(&format!(
            "redis = \"redis://:hunter2@127.0.0.1:6379/0\"\nencryption_key_file = \"{}\"",
            k.0.display()
        )))
        .expect("valid [cluster]");
        let cl = c.cluster.expect("cluster");
        assert_eq!(cl.encryption_key.0, *b"0123456789abcdef0123456789abcdef");
        assert_eq!(cl.key_prefix, "tokengate");
        assert_eq!(cl.timeout, Duration::from_millis(500));
        assert_eq!(cl.redis_display, "redis://:***@127.0.0.1:6379/0");
        assert!(!format!("{cl:?}").contains("hunter2"), "{cl:?}");
    }

    #[test]
    fn the_redis_timeout_is_bounded() {
        let k = key_file(&format!("{KEY_B64}\n"));
        let errs = errors(&with_cluster(&format!(
            "redis = \"redis://127.0.0.1:6379/0\"\nencryption_key_file = \"{}\"\ntimeout = \"1h\"",
            k.0.display()
        )));
        assert!(has(&errs, "cluster.timeout"), "{errs:?}");
    }

    #[test]
    fn a_missing_or_malformed_key_file_names_the_key() {
        let errs = errors(&with_cluster("redis = \"redis://127.0.0.1/0\""));
        assert!(
            has(&errs, "cluster.encryption_key_file: is missing"),
            "{errs:?}"
        );
        let k = key_file("c2hvcnQ=");
        let errs = errors(&with_cluster(&format!(
            "redis = \"redis://127.0.0.1/0\"\nencryption_key_file = \"{}\"",
            k.0.display()
        )));
        assert!(
            has(&errs, "cluster.encryption_key_file: the content of"),
            "{errs:?}"
        );
        let errs = errors(&with_cluster(
            "redis = \"redis://127.0.0.1/0\"\nencryption_key_file = \"/nonexistent/key\"",
        ));
        assert!(
            has(&errs, "cluster.encryption_key_file: cannot read"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_bad_url_is_reported_without_its_password() {
        let k = key_file(KEY_B64);
        let errs = errors(&with_cluster(&format!(
            "redis = \"http://:hunter2@127.0.0.1/0\"\nencryption_key_file = \"{}\"",
            k.0.display()
        )));
        assert!(has(&errs, "cluster.redis: "), "{errs:?}");
        assert!(errs.iter().all(|e| !e.contains("hunter2")), "{errs:?}");
        let errs = errors(&format!(
            "[cluster]\nkey_prefix = \"a b\"\n{}",
            cc_route("")
        ));
        assert!(has(&errs, "cluster.redis: is missing"), "{errs:?}");
        assert!(has(&errs, "cluster.key_prefix: "), "{errs:?}");
    }
}
