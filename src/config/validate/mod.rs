//! Validation: the file structs (`file.rs`) into the internal model ([`Config`]), one module
//! per section. Every problem is reported through the [`Report`] with its key; a value that
//! fails is replaced by its default (or left out) so the rest can still be checked.

mod auth;
mod client_limits;
mod cluster;
mod routes;
mod secrets;
mod server;
mod subjects;
mod upstream;

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::diagnostics::Report;
use super::file::FileConfig;
use super::Config;

/// Validates one file's structs, reporting into `r`.
pub(super) struct Validator<'r> {
    r: &'r mut Report,
    /// The config file's directory: relative paths in the file are relative to it.
    base_dir: Option<PathBuf>,
}

impl<'r> Validator<'r> {
    /// A validator reporting into `r`, resolving relative paths against `base_dir`.
    pub(super) fn new(r: &'r mut Report, base_dir: Option<PathBuf>) -> Self {
        Validator { r, base_dir }
    }

    /// The validated config. Valid only when no problem was reported.
    pub(super) fn config(&mut self, file: FileConfig, source: Option<&Path>) -> Config {
        let server = self.server(file.server.unwrap_or_default());
        let log = self.log(file.log.unwrap_or_default());
        let routes = self.routes(file.routes.unwrap_or_default(), &server);
        let cluster = file.cluster.map(|c| self.cluster(c));
        Config {
            source: source.map(Path::to_path_buf),
            server,
            log,
            routes,
            cluster: cluster.flatten(),
        }
    }

    /// `path` from the file, relative to the config file's directory.
    fn resolve(&self, path: &str) -> PathBuf {
        let p = PathBuf::from(path);
        match &self.base_dir {
            Some(base) if p.is_relative() => base.join(p),
            _ => p,
        }
    }

    /// A duration that must not be zero; `default` when absent (or zero, which is reported).
    fn positive(&mut self, key: &str, value: Option<Duration>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(d) if d.is_zero() => {
                self.r.push(
                    key,
                    format!(
                        "\"0s\" is not allowed; use a positive duration, e.g. \"{}\"",
                        humantime::format_duration(default)
                    ),
                );
                default
            }
            Some(d) => d,
        }
    }

    /// `value` when it is at most `max`; else reported under `key`, naming the bound, and
    /// `max` is used.
    fn at_most(&mut self, key: &str, value: Duration, max: Duration) -> Duration {
        if value <= max {
            return value;
        }
        self.r.push(
            key,
            format!(
                "{} s is more than the most it may be, \"{}\"; use a shorter duration",
                value.as_secs(),
                humantime::format_duration(max)
            ),
        );
        max
    }

    /// A string that must not be blank when present (a blank one is reported and dropped).
    fn non_empty(&mut self, key: &str, value: Option<String>) -> Option<String> {
        match value {
            Some(v) if v.trim().is_empty() => {
                self.r.push(key, "is empty; set a value or remove the key");
                None
            }
            other => other,
        }
    }
}
