//! Loading: TOML text → `${VAR}` expansion → file structs → validated [`Config`].
//!
//! The pipeline reports every problem it can find before failing (linkerd style):
//!
//! 1. TOML syntax errors (all of them, with lines). Nothing else is checked after one.
//! 2. `${VAR}` expansion over every string value in the parsed tree. An unset variable, or one
//!    set to the empty string, is an error naming the key and the variable, never the value.
//! 3. Deserializing into the file structs. An unknown key or a value of the wrong type is
//!    reported with its key path and line, removed from the tree, and deserializing is retried,
//!    so every unknown key in the file is reported in one run.
//! 4. Validation into the internal model: presence, defaults, ranges, URL and address syntax,
//!    cross-key rules, secrets from `*_file`, key files and CA files.
//!
//! Relative paths (`key_file`, `*_file`, `ca_file`) are resolved against the directory of the
//! config file.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;
use url::Url;

use super::error::{ConfigError, ConfigErrors};
use super::file::{AuthFile, FileConfig, LogFile, OneOrMany, RouteFile, ServerFile, SECRET_KEYS};
use super::{
    AuthConfig, BasicEncoding, ClientAuth, Config, Grant, LogConfig, LogFormat, RouteConfig,
    Secret, ServerConfig, TokenEndpointLocation, Upstream,
};
use crate::files;
use crate::oauth::key_file::{KeyFileError, ServiceAccountKey};

/// Default `server.listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default `server.admin_listen`.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Default `server.allowed_clients`: loopback only.
pub const DEFAULT_ALLOWED_CLIENTS: &[&str] = &["127.0.0.0/8", "::1/128"];
/// Default `server.grace_period`.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// Default `server.replay_body_limit` (64 KiB).
pub const DEFAULT_REPLAY_BODY_LIMIT: usize = 64 * 1024;
/// Largest `server.replay_body_limit`, bytes: pingora-proxy keeps at most this much of a
/// request body for a retry, so a larger limit could not take effect.
pub const MAX_REPLAY_BODY_LIMIT: usize = crate::proxy::RETRY_BUFFER_LIMIT;
/// Default `routes.connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `routes.read_timeout`.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `routes.auth.assertion_lifetime`.
pub const DEFAULT_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// Upper bound of `routes.auth.assertion_lifetime`: "Drillster: Service accounts" puts `exp`
/// at most one hour ahead.
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// Default `routes.auth.default_token_lifetime`.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// Default `routes.auth.refresh_ratio`.
pub const DEFAULT_REFRESH_RATIO: f64 = 0.8;
/// Default `routes.auth.min_time_left`.
pub const DEFAULT_MIN_TIME_LEFT: Duration = Duration::from_secs(10);
/// Default `routes.auth.token_timeout`.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Methods `allow_methods` accepts (RFC 9110 §9 plus PATCH, RFC 5789).
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

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
                report.errors.push(ConfigError {
                    file: report.file.clone(),
                    line,
                    key: String::new(),
                    message: format!("TOML syntax error: {}; fix the syntax", e.message()),
                });
            }
            return Err(report.finish());
        }

        let mut path = Vec::new();
        expand_table(root.get_mut(), &mut path, env, &mut report);
        check_shapes(root.get_mut(), &mut report);
        let parsed = deserialize_collecting(&mut root, &mut report);
        let config = parsed.map(|file_config| {
            let mut v = Validator {
                r: &mut report,
                base_dir,
            };
            v.config(file_config, source)
        });
        match config {
            Some(config) if report.errors.is_empty() => Ok(config),
            _ => Err(report.finish()),
        }
    }
}

/// Collects problems and knows where keys are.
struct Report {
    file: String,
    /// Byte offset of every `\n` in `text`, ascending: a line lookup is a binary search, not a
    /// count from the start (which made loading 1,000 routes quadratic).
    newlines: Vec<usize>,
    /// Key path → 1-based line.
    lines: HashMap<String, usize>,
    /// Keys already reported by an earlier phase; later complaints about them (or anything
    /// under them) would be noise.
    reported: HashSet<String>,
    errors: Vec<ConfigError>,
}

impl Report {
    fn new(file: String, text: &str) -> Self {
        Report {
            file,
            newlines: text
                .bytes()
                .enumerate()
                .filter_map(|(i, b)| (b == b'\n').then_some(i))
                .collect(),
            lines: HashMap::new(),
            reported: HashSet::new(),
            errors: Vec::new(),
        }
    }

    /// The 1-based line of byte `offset` of the text.
    fn line_of(&self, offset: usize) -> usize {
        // Newlines before `offset`, plus one.
        self.newlines.partition_point(|&n| n < offset) + 1
    }

    /// The line of `key`, or of the nearest enclosing table that is in the file.
    fn line_for(&self, key: &str) -> Option<usize> {
        key_and_enclosing(key).find_map(|k| self.lines.get(k).copied())
    }

    /// Whether `key` or a table or array enclosing it was already reported: one set lookup
    /// per enclosing level (thousands of reported keys made a scan of them all quadratic).
    fn suppressed(&self, key: &str) -> bool {
        key_and_enclosing(key).any(|k| self.reported.contains(k))
    }

    /// Records a validation problem for `key`: `message` is "what is wrong; the fix".
    fn push(&mut self, key: &str, message: impl Into<String>) {
        if self.suppressed(key) {
            return;
        }
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: self.line_for(key),
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Records a problem found before validation and silences later ones about `key`.
    fn push_early(&mut self, key: &str, line: Option<usize>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: line.or_else(|| self.line_for(key)),
            key: key.to_string(),
            message: message.into(),
        });
        self.reported.insert(key.to_string());
    }

    fn finish(mut self) -> ConfigErrors {
        // File order; problems without a line (whole-file ones) last.
        self.errors
            .sort_by_key(|e| (e.line.is_none(), e.line.unwrap_or(0)));
        ConfigErrors::new(self.errors)
    }
}

// ---------------------------------------------------------------------------------------------
// Key paths

/// `key`, then the keys of the tables and arrays enclosing it, innermost first:
/// `routes[1].auth.grant`, `routes[1].auth`, `routes[1]`, `routes`.
fn key_and_enclosing(key: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(key), |k| k.rfind(['.', '[']).map(|cut| &k[..cut]))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Phase 2: ${VAR} expansion (and the key → line map)

fn expand_table(
    table: &mut DeTable<'_>,
    path: &mut Vec<Seg>,
    env: &dyn Fn(&str) -> Option<String>,
    r: &mut Report,
) {
    for (key, value) in table.iter_mut() {
        path.push(Seg::Key(key.get_ref().to_string()));
        let line = r.line_of(key.span().start);
        r.lines.insert(render_path(path), line);
        expand_value(value, path, env, r);
        path.pop();
    }
}

fn expand_value(
    value: &mut Spanned<DeValue<'_>>,
    path: &mut Vec<Seg>,
    env: &dyn Fn(&str) -> Option<String>,
    r: &mut Report,
) {
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) => {
            let key = render_path(path);
            match expand_vars(s, env) {
                Ok(Some(expanded)) => *s = expanded.into(),
                Ok(None) => {}
                Err(problem) => {
                    let line = Some(r.line_of(span.start));
                    r.push_early(&key, line, problem.message(path));
                }
            }
        }
        DeValue::Table(t) => expand_table(t, path, env, r),
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(Seg::Index(i));
                let line = r.line_of(item.span().start);
                r.lines.insert(render_path(path), line);
                expand_value(item, path, env, r);
                path.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, PartialEq, Eq)]
enum ExpandError {
    /// Variables not set, and variables set to the empty string (one rule for every key: an
    /// empty value is never what was meant).
    Unset {
        unset: Vec<String>,
        empty: Vec<String>,
    },
    Unterminated,
    BadName(String),
}

impl ExpandError {
    fn message(&self, path: &[Seg]) -> String {
        let leaf = match path.last() {
            Some(Seg::Key(k)) => k.as_str(),
            _ => "",
        };
        match self {
            ExpandError::Unset { unset, empty } => {
                let or_file = if SECRET_KEYS.contains(&leaf) {
                    format!(", or use {leaf}_file")
                } else {
                    String::new()
                };
                let describe = |names: &[String], state: &str| match names {
                    [one] => format!("environment variable {one} is {state}"),
                    many => format!("environment variables {} are {state}", many.join(", ")),
                };
                match (unset.is_empty(), empty.is_empty()) {
                    (false, true) => format!(
                        "{}; export it before starting tokengate{or_file}",
                        describe(unset, "not set")
                    ),
                    (true, false) => format!(
                        "{}; give it a value before starting tokengate{or_file}",
                        describe(empty, "set but empty")
                    ),
                    _ => format!(
                        "{}, and {}; export them with values before starting tokengate{or_file}",
                        describe(unset, "not set"),
                        describe(empty, "set but empty")
                    ),
                }
            }
            ExpandError::Unterminated => {
                "has a \"${\" without a closing \"}\"; write ${NAME}, or $${ for a literal \"${\""
                    .to_string()
            }
            ExpandError::BadName(name) => format!(
                "\"${{{name}}}\" is not a valid variable reference; names are letters, digits and \
                 _ (not starting with a digit), or write $${{ for a literal \"${{\""
            ),
        }
    }
}

/// Replaces `${NAME}` from `env`; `$${` is a literal `${`. `Ok(None)`: nothing to replace.
fn expand_vars(
    input: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, ExpandError> {
    if !input.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(input.len());
    let (mut unset, mut empty) = (Vec::new(), Vec::new());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(close) = after.find('}') else {
                return Err(ExpandError::Unterminated);
            };
            let name = &after[..close];
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(ExpandError::BadName(name.to_string()));
            }
            match env(name) {
                Some(value) if !value.is_empty() => out.push_str(&value),
                found => {
                    let list = if found.is_some() {
                        &mut empty
                    } else {
                        &mut unset
                    };
                    if !list.iter().any(|n| n == name) {
                        list.push(name.to_string());
                    }
                }
            }
            rest = &after[close + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    if unset.is_empty() && empty.is_empty() {
        Ok(Some(out))
    } else {
        Err(ExpandError::Unset { unset, empty })
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 3: deserialize, collecting unknown keys and type errors

/// Deserializes the file structs; on an error, reports it, removes the offending key and tries
/// again. `None` when an error could not be tied to a key (then validation would only add noise).
fn deserialize_collecting(root: &mut Spanned<DeTable<'_>>, r: &mut Report) -> Option<FileConfig> {
    // Each round removes one key and deserializes the whole file again, so a file with
    // thousands of bad keys (one typo repeated in every route) would take minutes: past
    // `DESERIALIZE_ROUNDS` the rest is left for the next run.
    for round in 0..=DESERIALIZE_ROUNDS {
        let de = toml::de::Deserializer::from(root.clone());
        let e = match FileConfig::deserialize(de) {
            Ok(config) => return Some(config),
            Err(_) if round == DESERIALIZE_ROUNDS => break,
            Err(e) => e,
        };
        let span = e.span();
        let line = span.as_ref().map(|s| r.line_of(s.start));
        let located = span.and_then(|s| locate(root.get_ref(), s.start, &mut Vec::new()));
        let Some(path) = located else {
            r.push_early("", line, clean_serde_message(e.message(), None));
            return None;
        };
        let key = render_path(&path);
        let leaf = path.iter().rev().find_map(|s| match s {
            Seg::Key(k) => Some(k.as_str()),
            Seg::Index(_) => None,
        });
        r.push_early(&key, line, clean_serde_message(e.message(), leaf));
        // Remove the innermost key holding the bad value (an array element takes its array).
        let mut removal = path;
        while matches!(removal.last(), Some(Seg::Index(_))) {
            removal.pop();
        }
        r.reported.insert(render_path(&removal));
        if !remove_path(root.get_mut(), &removal) {
            return None;
        }
    }
    r.push_early(
        "",
        None,
        format!(
            "stopped after {DESERIALIZE_ROUNDS} unknown keys and wrong types; fix these and run \
             `tokengate check` again for the rest"
        ),
    );
    None
}

/// Most unknown-key and type errors reported in one run (see `deserialize_collecting`).
const DESERIALIZE_ROUNDS: usize = 100;

/// Tables written as arrays (`[[server]]`) or arrays as tables (`[routes]`) get a clear message
/// here; serde would otherwise read a struct from an array positionally and blame a field.
fn check_shapes(root: &mut DeTable<'_>, r: &mut Report) {
    fn wrong(value: &DeValue<'_>, want_array: bool) -> bool {
        match value {
            DeValue::Array(items) => {
                !want_array
                    || items
                        .iter()
                        .any(|i| !matches!(i.get_ref(), DeValue::Table(_)))
            }
            DeValue::Table(_) => want_array,
            _ => true,
        }
    }
    let mut bad = Vec::new();
    for (name, want_array) in [("server", false), ("log", false), ("routes", true)] {
        if let Some((k, v)) = root.get_key_value(name) {
            if wrong(v.get_ref(), want_array) {
                let fix = if want_array {
                    format!("expected [[{name}]] tables (double brackets), one per entry")
                } else {
                    format!("expected one [{name}] table (single brackets)")
                };
                let found = match v.get_ref() {
                    DeValue::Array(_) => "an array",
                    DeValue::Table(_) => "a table",
                    _ => "a plain value",
                };
                let line = r.line_of(k.span().start);
                r.push_early(name, Some(line), format!("is {found}; {fix}"));
                bad.push(name);
            }
        }
    }
    for name in bad {
        root.remove(name);
    }
    let Some(DeValue::Array(routes)) = root.get_mut("routes").map(|v| v.get_mut()) else {
        return;
    };
    for (i, route) in routes.iter_mut().enumerate() {
        let DeValue::Table(t) = route.get_mut() else {
            continue;
        };
        let bad_auth = t
            .get_key_value("auth")
            .filter(|(_, v)| wrong(v.get_ref(), false))
            .map(|(k, _)| k.span().start);
        if let Some(start) = bad_auth {
            let line = r.line_of(start);
            r.push_early(
                &format!("routes[{i}].auth"),
                Some(line),
                "is not a table; expected one [routes.auth] table (single brackets) after each \
                 [[routes]]",
            );
            t.remove("auth");
        }
    }
}

/// The deepest key path whose key or value span contains `pos`.
fn locate(table: &DeTable<'_>, pos: usize, path: &mut Vec<Seg>) -> Option<Vec<Seg>> {
    for (key, value) in table.iter() {
        path.push(Seg::Key(key.get_ref().to_string()));
        if let Some(found) = locate_in_value(value, pos, path) {
            return Some(found);
        }
        if key.span().contains(&pos) || value.span().contains(&pos) {
            return Some(path.clone());
        }
        path.pop();
    }
    None
}

fn locate_in_value(value: &Spanned<DeValue<'_>>, pos: usize, path: &[Seg]) -> Option<Vec<Seg>> {
    match value.get_ref() {
        DeValue::Table(t) => locate(t, pos, &mut path.to_vec()),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let mut inner = path.to_vec();
                inner.push(Seg::Index(i));
                if let Some(found) = locate_in_value(item, pos, &inner) {
                    return Some(found);
                }
                if item.span().contains(&pos) {
                    return Some(inner);
                }
            }
            None
        }
        _ => None,
    }
}

fn remove_path(table: &mut DeTable<'_>, path: &[Seg]) -> bool {
    match path {
        [Seg::Key(k)] => table.remove(k.as_str()).is_some(),
        [Seg::Key(k), rest @ ..] => match table.get_mut(k.as_str()) {
            Some(v) => remove_in_value(v.get_mut(), rest),
            None => false,
        },
        _ => false,
    }
}

fn remove_in_value(value: &mut DeValue<'_>, path: &[Seg]) -> bool {
    match (value, path) {
        (DeValue::Table(t), _) => remove_path(t, path),
        (DeValue::Array(items), [Seg::Index(i), rest @ ..]) => match items.get_mut(*i) {
            Some(item) => remove_in_value(item.get_mut(), rest),
            None => false,
        },
        _ => false,
    }
}

/// Turns serde/toml messages into "what; fix" lines, never quoting a secret.
fn clean_serde_message(message: &str, leaf: Option<&str>) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let valid: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        if valid.is_empty() {
            return format!("unknown key {field:?}; remove it");
        }
        let hint = closest(field, &valid)
            .map(|c| format!("did you mean {c:?}? "))
            .unwrap_or_default();
        return format!(
            "unknown key {field:?}; {hint}valid keys here: {}",
            valid.join(", ")
        );
    }
    if leaf.is_some_and(|l| SECRET_KEYS.contains(&l)) {
        return "has the wrong type; expected a string (or use the _file twin)".to_string();
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            let (found, expected) = (toml_type(found), toml_type(expected));
            let hint = match (found.as_str(), expected.as_str(), leaf) {
                ("table", "an array", Some(k)) => {
                    format!(" (write [[{k}]] with double brackets for each entry)")
                }
                ("array", "a table", Some(k)) => {
                    format!(" (write [{k}] with single brackets, once)")
                }
                _ => String::new(),
            };
            return format!("wrong type: found {found}; expected {expected}{hint}");
        }
    }
    message.to_string()
}

/// serde's Rust-flavoured type names → TOML words (`map` → `table`, `i64` → `an integer`).
fn toml_type(serde_type: &str) -> String {
    match serde_type {
        "map" => "table".to_string(),
        "sequence" => "array".to_string(),
        "a sequence" => "an array".to_string(),
        "a map" => "a table".to_string(),
        "i64" | "u64" | "usize" => "an integer".to_string(),
        "f64" => "a number".to_string(),
        "a boolean" | "bool" => "true or false".to_string(),
        s if s.starts_with("struct ") => "a table".to_string(),
        s => s.to_string(),
    }
}

/// The valid key closest to a misspelt one, when it is plausibly a typo.
fn closest<'a>(typo: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|v| (edit_distance(typo, v), *v))
        .filter(|(d, v)| *d <= 2.max(v.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Phase 4: validation

struct Validator<'r> {
    r: &'r mut Report,
    base_dir: Option<PathBuf>,
}

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

impl Validator<'_> {
    fn config(&mut self, file: FileConfig, source: Option<&Path>) -> Config {
        let server = self.server(file.server.unwrap_or_default());
        let log = self.log(file.log.unwrap_or_default());
        let routes = self.routes(file.routes.unwrap_or_default(), &server);
        Config {
            source: source.map(Path::to_path_buf),
            server,
            log,
            routes,
        }
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let p = PathBuf::from(path);
        match &self.base_dir {
            Some(base) if p.is_relative() => base.join(p),
            _ => p,
        }
    }

    // --- [server] -----------------------------------------------------------------------------

    fn server(&mut self, s: ServerFile) -> ServerConfig {
        let listen_entries: Vec<(String, String)> = match s.listen {
            None => vec![("server.listen".to_string(), DEFAULT_LISTEN.to_string())],
            Some(OneOrMany::One(a)) => vec![("server.listen".to_string(), a)],
            Some(OneOrMany::Many(all)) => all
                .into_iter()
                .enumerate()
                .map(|(i, a)| (format!("server.listen[{i}]"), a))
                .collect(),
        };
        let mut listen: Vec<SocketAddr> = Vec::new();
        let mut seen: HashMap<SocketAddr, String> = HashMap::new();
        for (key, text) in listen_entries {
            let Some(addr) = self.socket_addr(&key, &text) else {
                continue;
            };
            if let Some(first) = seen.get(&addr) {
                if addr.port() != 0 {
                    let first = first.clone();
                    self.r.push(
                        &key,
                        format!("\"{text}\" is listed twice (also {first}); remove one"),
                    );
                    continue;
                }
            }
            seen.insert(addr, key);
            listen.push(addr);
        }

        let admin_text = s
            .admin_listen
            .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
        let admin_listen = self
            .socket_addr("server.admin_listen", &admin_text)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9090)));
        if admin_listen.port() != 0 && listen.contains(&admin_listen) {
            self.r.push(
                "server.admin_listen",
                format!(
                    "\"{admin_text}\" is also a proxy listener in server.listen; give the admin \
                     listener an address of its own, e.g. \"{DEFAULT_ADMIN_LISTEN}\""
                ),
            );
        }

        let allowed_clients = match s.allowed_clients {
            None => DEFAULT_ALLOWED_CLIENTS
                .iter()
                .filter_map(|c| c.parse::<IpNet>().ok())
                .collect(),
            Some(list) if list.is_empty() => {
                self.r.push(
                    "server.allowed_clients",
                    "is empty, so no client could use the proxy; list CIDRs such as \
                     \"127.0.0.0/8\", or remove the key for loopback only",
                );
                Vec::new()
            }
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, c)| self.cidr(&format!("server.allowed_clients[{i}]"), c))
                .collect(),
        };

        let threads = match s.threads {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(n) if n >= 1 => usize::try_from(n).unwrap_or(1),
            Some(n) => {
                self.r.push(
                    "server.threads",
                    format!("{n} is not a thread count; use 1 or more, or remove the key for one per CPU"),
                );
                1
            }
        };

        let grace_period = s.grace_period.map_or(DEFAULT_GRACE_PERIOD, |d| d.0);
        let replay_body_limit = match s.replay_body_limit {
            None => DEFAULT_REPLAY_BODY_LIMIT,
            Some(b) if b.0 <= MAX_REPLAY_BODY_LIMIT as u64 => b.0 as usize,
            Some(b) => {
                self.r.push(
                    "server.replay_body_limit",
                    format!(
                        "{} bytes is more than a replay can keep: at most \"64KiB\" (pingora-proxy \
                         keeps at most 64 KiB of a request body for a retry)",
                        b.0
                    ),
                );
                DEFAULT_REPLAY_BODY_LIMIT
            }
        };

        ServerConfig {
            listen,
            admin_listen,
            allowed_clients,
            threads,
            grace_period,
            replay_body_limit,
        }
    }

    fn socket_addr(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.r.push(
                    key,
                    format!(
                        "\"{text}\" is not a socket address; write IP:port, e.g. \
                         \"127.0.0.1:8080\" or \"[::1]:8080\" (host names are not resolved)"
                    ),
                );
                None
            }
        }
    }

    fn cidr(&mut self, key: &str, text: &str) -> Option<IpNet> {
        let parsed = if text.contains('/') {
            text.parse::<IpNet>().ok().map(|n| n.trunc())
        } else {
            text.parse::<IpAddr>().ok().map(IpNet::from)
        };
        if parsed.is_none() {
            self.r.push(
                key,
                format!(
                    "\"{text}\" is not a CIDR; write e.g. \"10.0.0.0/8\", \"fd00::/8\" or a \
                     single address such as \"10.1.2.3\""
                ),
            );
        }
        parsed
    }

    // --- [log] --------------------------------------------------------------------------------

    fn log(&mut self, l: LogFile) -> LogConfig {
        let format = match l.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.r.push(
                    "log.format",
                    format!("unknown log format \"{other}\"; expected \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };
        let level = l.level.unwrap_or_else(|| "info".to_string());
        if let Some(problem) = log_level_problem(&level) {
            self.r.push("log.level", problem);
        }
        LogConfig { format, level }
    }

    // --- [[routes]] ---------------------------------------------------------------------------

    fn routes(&mut self, routes: Vec<RouteFile>, server: &ServerConfig) -> Vec<RouteConfig> {
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
            let Some(rc) = self.route(&p, route) else {
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

    fn route(&mut self, p: &str, route: RouteFile) -> Option<RouteConfig> {
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
        })
    }

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

    fn ca_file(&mut self, key: &str, path: &str) -> Option<PathBuf> {
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

    // --- [routes.auth] ------------------------------------------------------------------------

    fn auth(&mut self, p: &str, a: AuthFile) -> Option<AuthConfig> {
        let grant = match a.grant.as_deref() {
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
        };

        let endpoint = match (a.token_endpoint, a.issuer) {
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
        };

        let client_id = self.secret_value(p, "client_id", a.client_id, a.client_id_file);
        if client_id.is_none() {
            self.r.push(
                &format!("{p}.client_id"),
                "missing; set client_id = \"…\" (or client_id_file = \"/run/secrets/…\") to the \
                 client id the authorization server issued",
            );
        }
        let client_secret =
            self.secret_value(p, "client_secret", a.client_secret, a.client_secret_file);

        let client_auth_given = a.client_auth.is_some();
        let basic = match a.client_auth.as_deref() {
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
        let encoding = match a.basic_encoding.as_deref() {
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
        if a.basic_encoding.is_some() && basic == Some(false) {
            self.r.push(
                &format!("{p}.basic_encoding"),
                "only applies to client_auth = \"client_secret_basic\"; remove it or set \
                 client_auth = \"client_secret_basic\"",
            );
        }
        let client_auth = match (basic, encoding) {
            (Some(true), Some(e)) => Some(ClientAuth::Basic(e)),
            (Some(false), _) => Some(ClientAuth::Post),
            _ => None,
        };

        if client_secret.is_none() {
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

        let scope = self.non_empty(&format!("{p}.scope"), a.scope);
        let audience = self.non_empty(&format!("{p}.audience"), a.audience);
        let default_token_lifetime = self.positive(
            &format!("{p}.default_token_lifetime"),
            a.default_token_lifetime.map(|d| d.0),
            DEFAULT_TOKEN_LIFETIME,
        );
        let refresh_ratio = match a.refresh_ratio {
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
            a.token_timeout.map(|d| d.0),
            DEFAULT_TOKEN_TIMEOUT,
        );
        let min_time_left = a.min_time_left.map_or(DEFAULT_MIN_TIME_LEFT, |d| d.0);
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

        let only_for = |v: &mut Self, key: &str, set: bool, wanted: GrantKind| {
            if set && grant.is_some_and(|g| g != wanted) {
                v.r.push(
                    &format!("{p}.{key}"),
                    format!("only applies to grant = \"{}\"; remove it", wanted.name()),
                );
            }
        };
        only_for(self, "key_file", a.key_file.is_some(), GrantKind::JwtBearer);
        only_for(self, "subject", a.subject.is_some(), GrantKind::JwtBearer);
        only_for(
            self,
            "assertion_lifetime",
            a.assertion_lifetime.is_some(),
            GrantKind::JwtBearer,
        );
        only_for(
            self,
            "resource",
            a.resource.is_some(),
            GrantKind::ClientCredentials,
        );

        let grant = match grant? {
            GrantKind::JwtBearer => {
                let key_and_path = match a.key_file {
                    None => {
                        self.r.push(
                            &format!("{p}.key_file"),
                            "missing; grant \"jwt_bearer\" needs the service account's JSON key \
                             file, e.g. key_file = \"/etc/tokengate/drillster-key.json\"",
                        );
                        None
                    }
                    Some(kf) => {
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
                };
                let subject = self.non_empty(&format!("{p}.subject"), a.subject);
                let lifetime = match a.assertion_lifetime.map(|d| d.0) {
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
                Grant::JwtBearer {
                    key,
                    key_file,
                    subject,
                    assertion_lifetime: lifetime,
                }
            }
            GrantKind::ClientCredentials => {
                let resource = a
                    .resource
                    .and_then(|r| self.absolute_uri(&format!("{p}.resource"), &r).map(|_| r));
                Grant::ClientCredentials { resource }
            }
        };

        Some(AuthConfig {
            grant,
            endpoint: endpoint?,
            client_id: client_id?,
            client_secret: client_secret.map(Secret::new),
            client_auth: client_auth?,
            scope,
            audience,
            default_token_lifetime,
            refresh_ratio,
            min_time_left,
            token_timeout,
        })
    }

    fn non_empty(&mut self, key: &str, value: Option<String>) -> Option<String> {
        match value {
            Some(v) if v.trim().is_empty() => {
                self.r.push(key, "is empty; set a value or remove the key");
                None
            }
            other => other,
        }
    }

    /// A secret (or client id) from `name` or `name_file`; never quoted in messages.
    /// `None` when absent or invalid (invalid ones are reported).
    fn secret_value(
        &mut self,
        p: &str,
        name: &str,
        inline: Option<String>,
        file: Option<String>,
    ) -> Option<String> {
        let key = format!("{p}.{name}");
        let file_key = format!("{p}.{name}_file");
        let (value, from_key, origin) = match (inline, file) {
            (Some(_), Some(_)) => {
                self.r.push(
                    &key,
                    format!("both {name} and {name}_file are set; keep only one"),
                );
                // Reported; keep "missing" complaints quiet.
                self.r.reported.insert(key);
                return None;
            }
            (None, None) => return None,
            (Some(v), None) => (v, key.clone(), String::new()),
            (None, Some(path)) => {
                let resolved = self.resolve(&path);
                match files::read_regular_to_string_capped(&resolved, files::SECRET_FILE_LIMIT) {
                    Ok(text) => (
                        text.trim_end_matches(['\n', '\r']).to_string(),
                        file_key.clone(),
                        format!("the content of \"{}\" ", resolved.display()),
                    ),
                    Err(e) => {
                        self.r.push(
                            &file_key,
                            format!(
                                "cannot read \"{}\": {e}; create the file or correct the path",
                                resolved.display()
                            ),
                        );
                        self.r.reported.insert(key);
                        return None;
                    }
                }
            }
        };
        if value.is_empty() {
            self.r.push(
                &from_key,
                format!("{origin}is empty; set the {name} issued by the authorization server"),
            );
            self.r.reported.insert(key);
            return None;
        }
        if value.chars().any(char::is_control) {
            self.r.push(
                &from_key,
                format!(
                    "{origin}contains a control character (e.g. a line break inside the value); \
                     remove it"
                ),
            );
            self.r.reported.insert(key);
            return None;
        }
        Some(value)
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

/// Why `level` is not a usable `tracing` EnvFilter directive, if it is not.
fn log_level_problem(level: &str) -> Option<String> {
    const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
    let fix = "expected one of trace, debug, info, warn, error, off, or an EnvFilter directive \
               such as \"info,tokengate=debug\"";
    if level.trim().is_empty() {
        return Some(format!("is empty; {fix}"));
    }
    // A lone word is a *target* name to EnvFilter (enabling everything for that target only),
    // which is almost always a misspelt level.
    let single_word = !level.contains([',', '=', ':', '[']);
    if single_word && !LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
        return Some(format!("unknown log level {level:?}; {fix}"));
    }
    match tracing_subscriber::EnvFilter::try_new(level) {
        Ok(_) => None,
        Err(e) => Some(format!("{level:?} is not a valid filter ({e}); {fix}")),
    }
}

/// Parses `upstream`: http(s), a host, optional port and base path; nothing else.
fn parse_upstream(text: &str) -> Result<Upstream, String> {
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
    use super::*;

    const DEMO_KEY: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crates/sandbox/src/keys/demo-key.json"
    );

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml_str(text, Some(Path::new("tokengate.toml")), &no_env)
    }

    fn errors(text: &str) -> Vec<String> {
        match load(text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    fn has(errs: &[String], needle: &str) -> bool {
        errs.iter().any(|e| e.contains(needle))
    }

    fn cc_route(extra_auth: &str) -> String {
        format!(
            r#"
[[routes]]
name = "driftrock"
upstream = "https://external-apis.driftrock.com"

[routes.auth]
grant = "client_credentials"
token_endpoint = "https://external-apis.driftrock.com/oauth2/token"
client_id = "abc"
client_secret = "def"
{extra_auth}
"#
        )
    }

    fn jwt_route(key_file: &str, extra_auth: &str) -> String {
        format!(
            r#"
[[routes]]
name = "drillster"
upstream = "https://www.drillster.com"

[routes.auth]
grant = "jwt_bearer"
token_endpoint = "https://www.drillster.com/api/oauth/token"
client_id = "874a16d4ac764ce4a545f0cca4584c63"
client_secret = "shh"
key_file = {key_file:?}
{extra_auth}
"#
        )
    }

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
    fn unknown_key_named_with_path_line_and_hint() {
        let errs = errors(&cc_route("client_scret = \"x\""));
        assert_eq!(errs.len(), 1, "{errs:?}");
        let e = &errs[0];
        assert!(
            e.starts_with("tokengate.toml:11: routes[0].auth.client_scret: unknown key \"client_scret\"; did you mean \"client_secret\"?"),
            "{e}"
        );
        assert!(e.contains("valid keys here: grant, token_endpoint"), "{e}");
    }

    /// One typo repeated in every route of a large file: the first `DESERIALIZE_ROUNDS` are
    /// reported in file order, then one line says the rest comes on the next run.
    #[test]
    fn a_flood_of_unknown_keys_is_cut_short() {
        let routes = |n: usize| {
            (0..n)
                .map(|i| format!("[[routes]]\nnme = \"r{i}\"\n"))
                .collect::<String>()
        };
        // Exactly the limit: all reported, nothing left for a next run.
        // (These routes lack everything else too: validation then reports that as well.)
        let errs = errors(&routes(DESERIALIZE_ROUNDS));
        let unknown = errs.iter().filter(|e| e.contains("unknown key")).count();
        assert_eq!(unknown, DESERIALIZE_ROUNDS, "{:?}", errs.last());
        assert!(errs.iter().all(|e| !e.contains("stopped after")));
        let errs = errors(&routes(DESERIALIZE_ROUNDS + 20));
        assert_eq!(errs.len(), DESERIALIZE_ROUNDS + 1, "{errs:?}");
        assert!(
            errs[0].starts_with("tokengate.toml:2: routes[0].nme: unknown key"),
            "{}",
            errs[0]
        );
        let last = &errs[DESERIALIZE_ROUNDS - 1];
        assert!(
            last.contains(&format!("routes[{}].nme", DESERIALIZE_ROUNDS - 1)),
            "{last}"
        );
        assert!(errs[DESERIALIZE_ROUNDS].contains("stopped after 100 unknown keys"));
    }

    #[test]
    fn every_unknown_key_reported_at_once() {
        let text = format!(
            "[server]\nlisen = \"x\"\n[serer]\n{}\n[[routes]]\nnme = \"b\"\n",
            cc_route("scop = \"x\"")
        );
        let errs = errors(&text);
        for key in [
            "server.lisen",
            "serer",
            "routes[0].auth.scop",
            "routes[1].nme",
        ] {
            assert!(
                has(&errs, &format!(": {key}: unknown key")),
                "{key}: {errs:?}"
            );
        }
    }

    #[test]
    fn wrong_types_named() {
        let text = format!(
            "[server]\nthreads = \"two\"\nlisten = [\"127.0.0.1:1\", 5]\n{}",
            cc_route("refresh_ratio = \"high\"\nclient_secret_file = 3")
        );
        let errs = errors(&text);
        assert!(
            has(
                &errs,
                "server.threads: wrong type: found string \"two\"; expected an integer"
            ),
            "{errs:?}"
        );
        assert!(has(&errs, "server.listen[1]: "), "{errs:?}");
        assert!(
            has(&errs, "routes[0].auth.refresh_ratio: wrong type"),
            "{errs:?}"
        );
        let errs = errors("[routes]\nname = \"x\"\n");
        assert_eq!(
            errs,
            ["tokengate.toml:1: routes: is a table; expected [[routes]] tables (double brackets), one per entry"]
        );
        let errs = errors(&format!("[[server]]\nthreads = 1\n{}", cc_route("")));
        assert_eq!(
            errs,
            ["tokengate.toml:1: server: is an array; expected one [server] table (single brackets)"]
        );
        let errs = errors(&cc_route("").replace("[routes.auth]", "[[routes.auth]]"));
        assert!(has(&errs, "routes[0].auth: is not a table"), "{errs:?}");
        assert_eq!(errs.len(), 1, "{errs:?}");
    }

    #[test]
    fn secret_type_errors_do_not_quote_value() {
        let text = cc_route("").replace("client_secret = \"def\"", "client_secret = 12345678");
        let errs = errors(&text);
        assert!(
            has(&errs, "routes[0].auth.client_secret: has the wrong type"),
            "{errs:?}"
        );
        assert!(!has(&errs, "12345678"), "{errs:?}");
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
    fn unset_variable_named_without_value() {
        let text = cc_route("").replace("\"def\"", "\"${DRIFTROCK_SECRET}\"");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains(
                "routes[0].auth.client_secret: environment variable DRIFTROCK_SECRET is not set"
            ),
            "{}",
            errs[0]
        );
        assert!(errs[0].contains("client_secret_file"), "{}", errs[0]);
    }

    /// One rule for every `${VAR}`: set but empty is refused like unset, naming the variable,
    /// in secrets and in any other value.
    #[test]
    fn empty_variables_are_refused_naming_them() {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:${{PORT}}\"]\n{}",
            cc_route("scope = \"${SCOPE}${GONE}\"").replace("\"def\"", "\"${SECRET}\"")
        );
        let env = env_of(&[("PORT", ""), ("SECRET", ""), ("SCOPE", "")]);
        let errs: Vec<String> = Config::from_toml_str(&text, None, &env)
            .expect_err("refused")
            .iter()
            .map(ToString::to_string)
            .collect();
        for want in [
            ":2: server.listen[0]: environment variable PORT is set but empty; give it a value \
             before starting tokengate",
            "routes[0].auth.client_secret: environment variable SECRET is set but empty; give it \
             a value before starting tokengate, or use client_secret_file",
            "routes[0].auth.scope: environment variable GONE is not set, and environment \
             variable SCOPE is set but empty; export them with values before starting tokengate",
        ] {
            assert!(errs.iter().any(|e| e.contains(want)), "{want}\n{errs:?}");
        }
        assert_eq!(
            expand_vars("a${A}b", &|_| Some(String::new())),
            Err(ExpandError::Unset {
                unset: vec![],
                empty: vec!["A".into()]
            })
        );
    }

    #[test]
    fn variables_expand_everywhere_and_literal_escape() {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:${{PORT}}\"]\n{}",
            cc_route("scope = \"a $${NOT} ${SCOPE}\"")
                .replace("\"abc\"", "\"${ID}\"")
                .replace("\"def\"", "\"${SECRET}\"")
        );
        let env = env_of(&[
            ("PORT", "8181"),
            ("ID", "the-id"),
            ("SECRET", "s3cr+t/%41:y=z"),
            ("SCOPE", "read"),
        ]);
        let c = Config::from_toml_str(&text, None, &env).expect("valid");
        assert_eq!(c.server.listen, vec!["127.0.0.1:8181".parse().unwrap()]);
        let a = &c.routes[0].auth;
        assert_eq!(a.client_id, "the-id");
        assert_eq!(
            a.client_secret.as_ref().map(Secret::expose),
            Some("s3cr+t/%41:y=z")
        );
        assert_eq!(a.scope.as_deref(), Some("a ${NOT} read"));
    }

    #[test]
    fn bad_variable_syntax() {
        assert_eq!(expand_vars("${A", &no_env), Err(ExpandError::Unterminated));
        assert_eq!(
            expand_vars("${1A}", &no_env),
            Err(ExpandError::BadName("1A".into()))
        );
        assert_eq!(
            expand_vars("${A}${B}${A}", &no_env),
            Err(ExpandError::Unset {
                unset: vec!["A".into(), "B".into()],
                empty: vec![]
            })
        );
        assert_eq!(expand_vars("cost $5", &no_env), Ok(None));
        assert_eq!(expand_vars("$${x} $y", &no_env), Ok(Some("${x} $y".into())));
    }

    #[test]
    fn rfc6749_values_kept_verbatim() {
        let text = cc_route("")
            .replace("\"abc\"", "\"dr/client 7\"")
            .replace("\"def\"", "\"s3cr+t/%41:y=z\"");
        let c = load(&text).expect("valid");
        assert_eq!(c.routes[0].auth.client_id, "dr/client 7");
        assert_eq!(
            c.routes[0].auth.client_secret.as_ref().map(Secret::expose),
            Some("s3cr+t/%41:y=z")
        );
    }

    #[test]
    fn secret_files_trimmed_relative_and_exclusive() {
        let dir =
            std::env::temp_dir().join(format!("tokengate-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), "s3cr+t/%41:y=z\n").unwrap();
        std::fs::write(dir.join("empty"), "\n").unwrap();
        let src = dir.join("tokengate.toml");
        let text =
            cc_route("").replace("client_secret = \"def\"", "client_secret_file = \"secret\"");
        let c = Config::from_toml_str(&text, Some(&src), &no_env).expect("valid");
        assert_eq!(
            c.routes[0].auth.client_secret.as_ref().map(Secret::expose),
            Some("s3cr+t/%41:y=z")
        );

        let both = cc_route("client_secret_file = \"secret\"");
        let e = Config::from_toml_str(&both, Some(&src), &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "routes[0].auth.client_secret: both client_secret and client_secret_file are set"
            ),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");

        let empty =
            cc_route("").replace("client_secret = \"def\"", "client_secret_file = \"empty\"");
        let e = Config::from_toml_str(&empty, Some(&src), &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("routes[0].auth.client_secret_file: the content of")
                && e.contains("is empty"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");

        let missing =
            cc_route("").replace("client_secret = \"def\"", "client_secret_file = \"nope\"");
        let e = Config::from_toml_str(&missing, Some(&src), &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("routes[0].auth.client_secret_file: cannot read"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
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
    fn no_routes() {
        let errs = errors("[server]\nthreads = 1\n");
        assert!(
            has(&errs, "tokengate.toml: routes: no routes are defined"),
            "{errs:?}"
        );
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
    fn log_levels() {
        assert!(log_level_problem("info").is_none());
        assert!(log_level_problem("WARN").is_none());
        assert!(log_level_problem("info,tokengate=debug").is_none());
        assert!(log_level_problem("verbose").is_some());
        assert!(log_level_problem("").is_some());
        assert!(log_level_problem("info,tokengate=loud").is_some());
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

    #[test]
    fn replay_body_limit_is_at_most_what_pingora_keeps() {
        let text = |v: &str| format!("[server]\nreplay_body_limit = \"{v}\"\n{}", cc_route(""));
        assert_eq!(
            load(&text("64KiB")).unwrap().server.replay_body_limit,
            65536
        );
        assert_eq!(load(&text("0B")).unwrap().server.replay_body_limit, 0);
        let errs = errors(&text("1MiB"));
        assert!(
            has(
                &errs,
                "server.replay_body_limit: 1048576 bytes is more than a replay can keep"
            ),
            "{errs:?}"
        );
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
