//! Loading: TOML text → `${VAR}` expansion → file structs → validated [`Config`].
//!
//! The pipeline reports every problem it can find before failing (linkerd style):
//!
//! 1. TOML syntax errors (all of them, with lines). Nothing else is checked after one.
//! 2. `${VAR}` expansion over every string value in the parsed tree (`expand.rs`). An unset
//!    variable, or one set to the empty string, is an error naming the key and the variable,
//!    never the value.
//! 3. Deserializing into the file structs (`deserialize.rs`): every unknown key and every value
//!    of the wrong type, each with its key path and line.
//! 4. Validation into the internal model (`validate/`): presence, defaults, ranges, URL and
//!    address syntax, cross-key rules, secrets from `*_file`, key files and CA files.
//!
//! Relative paths (`key_file`, `*_file`, `ca_file`) are resolved against the directory of the
//! config file.

use std::path::Path;

use toml::de::DeTable;

use super::deserialize::{check_shapes, deserialize_collecting};
use super::diagnostics::Report;
use super::error::{ConfigError, ConfigErrors};
use super::expand::expand_table;
use super::validate::Validator;
use super::Config;
use crate::files;

impl Config {
    /// Reads and validates a config file.
    ///
    /// `${VAR}` is read from the process environment; relative paths resolve against the file's
    /// directory. See [`Config::from_toml_str`] for the rules.
    ///
    /// # Errors
    /// [`ConfigErrors`]: every problem found, one line each (`{file}[:{line}]: {key}: …`).
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = match files::read_to_string_capped(path, files::CONFIG_FILE_LIMIT) {
            Ok(text) => text,
            Err(e) => {
                return Err(ConfigErrors::new(vec![ConfigError {
                    file: path.display().to_string(),
                    line: None,
                    key: String::new(),
                    message: format!(
                        "cannot read the config file: {e}; check the path given with -c"
                    ),
                }]))
            }
        };
        let env = |name: &str| std::env::var(name).ok();
        Config::from_toml_str(&text, Some(path), &env)
    }

    /// Parses and validates TOML config text (docs/configuration.md).
    ///
    /// * `source`: the file the text came from; names the file in errors and anchors relative
    ///   paths. `None` names it `<config>` and leaves relative paths relative to the process's
    ///   working directory.
    /// * `env`: looks up `${VAR}` references (injected so tests need not touch the process
    ///   environment). `$${` is a literal `${`.
    ///
    /// Secret files, key files and CA files are read during validation.
    ///
    /// # Errors
    /// [`ConfigErrors`]: every problem found, one line each, in file order.
    pub fn from_toml_str(
        text: &str,
        source: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let file = source
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<config>".to_string());
        let base_dir = source
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf);
        let mut report = Report::new(file, text);

        let (mut root, syntax) = DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            for e in syntax {
                let line = e.span().map(|s| report.line_of(s.start));
                report.push_early(
                    "",
                    line,
                    format!("TOML syntax error: {}; fix the syntax", e.message()),
                );
            }
            return Err(report.finish());
        }

        report.index_lines(root.get_ref());
        expand_table(root.get_mut(), env, &mut report);
        check_shapes(root.get_mut(), &mut report);
        let parsed = deserialize_collecting(&mut root, &mut report);
        let config = parsed.map(|file_config| {
            let mut v = Validator::new(&mut report, base_dir);
            v.config(file_config, source)
        });
        match config {
            Some(config) if !report.has_errors() => Ok(config),
            _ => Err(report.finish()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_support::{cc_route, errors, has, load};
    use super::super::{BasicEncoding, ClientAuth, LogFormat};
    use super::*;

    #[test]
    fn minimal_client_credentials_with_defaults() {
        let c = load(&cc_route("")).expect("valid");
        assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.server.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.server.allowed_clients.len(), 2);
        assert!(c.server.threads >= 1);
        assert_eq!(c.server.grace_period, Duration::from_secs(10));
        assert_eq!(c.server.replay_body_limit, 65536);
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "info");
        let r = &c.routes[0];
        assert_eq!(r.path_prefix, "/");
        assert_eq!(r.connect_timeout, Duration::from_secs(5));
        assert_eq!(r.read_timeout, Duration::from_secs(60));
        assert!(!r.strip_prefix && !r.forward_cookies);
        assert_eq!(r.auth.client_auth, ClientAuth::Basic(BasicEncoding::Form));
        assert_eq!(r.auth.refresh_ratio, 0.8);
        assert_eq!(r.auth.default_token_lifetime, Duration::from_secs(300));
        assert_eq!(r.auth.min_time_left, Duration::from_secs(10));
        assert_eq!(r.auth.token_timeout, Duration::from_secs(10));
        assert_eq!(r.upstream.authority, "external-apis.driftrock.com");
        assert_eq!(r.upstream.port, 443);
        assert!(r.upstream.tls);
    }

    #[test]
    fn many_problems_reported_at_once() {
        let text = r#"
[server]
listen = ["127.0.0.1:80800"]
allowed_clients = ["10.0.0.0/33"]
threads = 0

[log]
format = "yaml"
level = "verbose"

[[routes]]
name = "Drill Ster"
path_prefix = "api"
upstream = "ftp://x"
allow_methods = ["GETT"]
strip_headers = ["bad header"]

[routes.auth]
grant = "password"
token_endpoint = "not a url"
refresh_ratio = 1.5
"#;
        let errs = errors(text);
        for key in [
            "server.listen[0]",
            "server.allowed_clients[0]",
            "server.threads",
            "log.format",
            "log.level",
            "routes[0].name",
            "routes[0].path_prefix",
            "routes[0].upstream",
            "routes[0].allow_methods[0]",
            "routes[0].strip_headers[0]",
            "routes[0].auth.grant",
            "routes[0].auth.token_endpoint",
            "routes[0].auth.client_id",
            "routes[0].auth.refresh_ratio",
        ] {
            assert!(
                has(&errs, &format!(" {key}: ")),
                "{key} missing from {errs:#?}"
            );
        }
        // File order.
        let lines: Vec<usize> = errs
            .iter()
            .filter_map(|e| e.split(':').nth(1).and_then(|l| l.parse().ok()))
            .collect();
        assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{errs:#?}");
    }

    #[test]
    fn syntax_errors_have_lines() {
        let errs = errors("[server]\nthreads = \n");
        assert!(
            errs[0].starts_with("tokengate.toml:2: TOML syntax error"),
            "{errs:?}"
        );
    }

    #[test]
    fn unreadable_file() {
        let e = Config::load(Path::new("/nonexistent/tokengate.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/nonexistent/tokengate.toml: cannot read the config file"),
            "{e}"
        );
    }
}
