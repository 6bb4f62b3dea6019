//! Configuration errors: one line per problem, all problems at once.
//!
//! Each [`ConfigError`] renders as
//!
//! ```text
//! {file}[:{line}]: {key}: {what is wrong, quoting the bad value}; {the fix}
//! ```
//!
//! e.g. `tokengate.toml:14: routes[1].auth.grant: unknown grant "client-credential"; expected
//! "jwt_bearer" or "client_credentials"`. Keys are dotted paths with **0-based** array indices
//! (`routes[0]` is the first `[[routes]]` table). The line is the 1-based line of the key in the
//! file when it is known (for a missing key: the line of the table that should hold it). Secret
//! values are never quoted.

use std::fmt;

/// One configuration problem. `Display` is the single-line form described in the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as the user named it (`<config>` when parsed from a string without a source).
    pub file: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// Dotted key path with 0-based indices, e.g. `routes[0].auth.client_id`; empty for
    /// problems that concern the whole file (unreadable file, TOML syntax).
    pub key: String,
    /// What is wrong and the fix, e.g. `unknown grant "x"; expected "jwt_bearer" or …`.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one configuration file (never empty). `Display` prints one
/// [`ConfigError`] per line, in file order where possible; `tokengate` exits with code 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.errors))]
pub struct ConfigErrors {
    errors: Vec<ConfigError>,
}

fn render(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigErrors {
    /// Wraps a list of problems.
    pub fn new(errors: Vec<ConfigError>) -> Self {
        ConfigErrors { errors }
    }

    /// The problems, in the order found.
    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// Iterates over the problems.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.errors.iter()
    }

    /// How many problems there are.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// `true` when there are none (never the case for a returned error).
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The first problem whose key is exactly `key`.
    pub fn find(&self, key: &str) -> Option<&ConfigError> {
        self.errors.iter().find(|e| e.key == key)
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}
