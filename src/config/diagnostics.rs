//! Diagnostics: where each key is in the file, the problems found so far, and serde's messages
//! reworded for people ("did you mean", TOML's type names, secrets never quoted).
//!
//! Keys are dotted paths with 0-based indices (`routes[1].auth.grant`, the form in
//! `error.rs`); lines are 1-based.

use std::collections::{HashMap, HashSet};

use serde::de::Unexpected;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::error::{ConfigError, ConfigErrors};
use super::file::SECRET_KEYS;

/// Collects problems and knows where keys are.
pub(super) struct Report {
    /// The file as the user named it, for every [`ConfigError`].
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
    /// An empty report for `text`, read from `file`.
    pub(super) fn new(file: String, text: &str) -> Self {
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

    /// Whether any problem has been recorded.
    pub(super) fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// The 1-based line of byte `offset` of the text.
    pub(super) fn line_of(&self, offset: usize) -> usize {
        // Newlines before `offset`, plus one.
        self.newlines.partition_point(|&n| n < offset) + 1
    }

    /// Records the line of every key and array element in `table` (before anything is removed
    /// from the tree), so that later phases can name lines by key path.
    pub(super) fn index_lines(&mut self, table: &DeTable<'_>) {
        self.index_table(table, &mut Vec::new());
    }

    fn index_table(&mut self, table: &DeTable<'_>, path: &mut Vec<Seg>) {
        for (key, value) in table.iter() {
            path.push(Seg::Key(key.get_ref().to_string()));
            let line = self.line_of(key.span().start);
            self.lines.insert(render_path(path), line);
            self.index_value(value, path);
            path.pop();
        }
    }

    fn index_value(&mut self, value: &Spanned<DeValue<'_>>, path: &mut Vec<Seg>) {
        match value.get_ref() {
            DeValue::Table(t) => self.index_table(t, path),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(Seg::Index(i));
                    let line = self.line_of(item.span().start);
                    self.lines.insert(render_path(path), line);
                    self.index_value(item, path);
                    path.pop();
                }
            }
            _ => {}
        }
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
    pub(super) fn push(&mut self, key: &str, message: impl Into<String>) {
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
    /// `line` defaults to the line of `key`.
    pub(super) fn push_early(
        &mut self,
        key: &str,
        line: Option<usize>,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: line.or_else(|| self.line_for(key)),
            key: key.to_string(),
            message: message.into(),
        });
        self.silence(key);
    }

    /// Silences later problems about `key` and everything under it (it was reported, or its
    /// value was dropped after a problem).
    pub(super) fn silence(&mut self, key: &str) {
        self.reported.insert(key.to_string());
    }

    /// The problems in file order; problems without a line (whole-file ones) last.
    pub(super) fn finish(mut self) -> ConfigErrors {
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

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// The innermost table key of `path` (an array element is named by its array's key).
pub(super) fn leaf(path: &[Seg]) -> Option<&str> {
    path.iter().rev().find_map(|s| match s {
        Seg::Key(k) => Some(k.as_str()),
        Seg::Index(_) => None,
    })
}

/// `routes[0].auth.grant`; a key that is not a bare TOML key is quoted.
pub(super) fn render_path(path: &[Seg]) -> String {
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
// Messages

/// `unknown key "x"; did you mean "y"? valid keys here: …`, `valid` in the file struct's order.
pub(super) fn unknown_key_message(field: &str, valid: &[&str]) -> String {
    if valid.is_empty() {
        return format!("unknown key {field:?}; remove it");
    }
    let hint = closest(field, valid)
        .map(|c| format!("did you mean {c:?}? "))
        .unwrap_or_default();
    format!(
        "unknown key {field:?}; {hint}valid keys here: {}",
        valid.join(", ")
    )
}

/// Turns a serde/toml type error into a "what; fix" line, never quoting a secret.
///
/// `leaf` is the key holding the bad value; `value` the value itself, when known. A message
/// that only says what was expected (serde's untagged enums, whose `expecting` text starts
/// with "expected ") gets what was found from `value`.
pub(super) fn type_error_message(
    message: &str,
    leaf: Option<&str>,
    value: Option<&DeValue<'_>>,
) -> String {
    if leaf.is_some_and(|l| SECRET_KEYS.contains(&l)) {
        return "has the wrong type; expected a string (or use the _file twin)".to_string();
    }
    if let (Some(expected), Some(value)) = (message.strip_prefix("expected "), value) {
        return format!("wrong type: found {}; expected {expected}", found(value));
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

/// What `value` is, in the words serde uses for an unexpected value (``integer `5` ``), then
/// in TOML's (`table`, `array`).
pub(super) fn found(value: &DeValue<'_>) -> String {
    let unexpected = match value {
        DeValue::String(s) => Unexpected::Str(s),
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .map_or(Unexpected::Other("integer"), Unexpected::Signed),
        DeValue::Float(f) => f
            .as_str()
            .parse()
            .map_or(Unexpected::Other("floating point"), Unexpected::Float),
        DeValue::Boolean(b) => Unexpected::Bool(*b),
        DeValue::Datetime(_) => Unexpected::Other("datetime"),
        DeValue::Array(_) => Unexpected::Seq,
        DeValue::Table(_) => Unexpected::Map,
    };
    toml_type(&unexpected.to_string())
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

/// The valid key closest to a misspelt one, when it is plausibly a typo: at most 2 edits, or
/// a quarter of the key's length for long keys (Levenshtein distance over characters).
fn closest<'a>(typo: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|v| (strsim::levenshtein(typo, v), *v))
        .filter(|(d, v)| *d <= 2.max(v.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_key_within_a_few_edits() {
        let valid = ["client_id", "client_secret", "client_secret_file", "scope"];
        assert_eq!(closest("client_scret", &valid), Some("client_secret"));
        assert_eq!(closest("scop", &valid), Some("scope"));
        assert_eq!(closest("frobnicate", &valid), None);
    }

    #[test]
    fn paths_render_and_nest() {
        let path = [
            Seg::Key("routes".into()),
            Seg::Index(1),
            Seg::Key("auth".into()),
            Seg::Key("a key".into()),
        ];
        assert_eq!(render_path(&path), "routes[1].auth.\"a key\"");
        assert_eq!(leaf(&path[..2]), Some("routes"));
        let nested: Vec<&str> = key_and_enclosing("routes[1].auth.grant").collect();
        assert_eq!(
            nested,
            [
                "routes[1].auth.grant",
                "routes[1].auth",
                "routes[1]",
                "routes"
            ]
        );
    }

    #[test]
    fn found_values_in_serde_words() {
        let value = |text: &'static str| DeValue::parse(text).expect("value").into_inner();
        assert_eq!(found(&value("5")), "integer `5`");
        assert_eq!(found(&value("0x1_0")), "integer `16`");
        assert_eq!(found(&value("1.5")), "floating point `1.5`");
        assert_eq!(found(&value("true")), "boolean `true`");
        assert_eq!(found(&value("[1]")), "array");
        assert_eq!(found(&value("{ a = 1 }")), "table");
    }
}
