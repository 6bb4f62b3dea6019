//! `${VAR}` expansion over every string value of the parsed file, before deserializing
//! (docs/configuration.md "Secrets, files and paths"): `${NAME}` is replaced from the
//! environment, `$${` is a literal `${`.
//!
//! An unset variable, or one set to the empty string, is an error naming the key and the
//! variable, never a value: one rule for every key, since an empty value is never what was
//! meant. Secrets from `*_file` keys are read later, in `validate/secrets.rs`.

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::diagnostics::{render_path, Report, Seg};
use super::file::SECRET_KEYS;

/// Expands `${VAR}` in every string under `table`, looking names up with `env`. Each bad
/// string is reported (and its key silenced) and left as it was.
pub(super) fn expand_table(
    table: &mut DeTable<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    r: &mut Report,
) {
    expand_in_table(table, &mut Vec::new(), env, r);
}

fn expand_in_table(
    table: &mut DeTable<'_>,
    path: &mut Vec<Seg>,
    env: &dyn Fn(&str) -> Option<String>,
    r: &mut Report,
) {
    for (key, value) in table.iter_mut() {
        path.push(Seg::Key(key.get_ref().to_string()));
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
        DeValue::String(s) => match expand_vars(s, env) {
            Ok(Some(expanded)) => *s = expanded.into(),
            Ok(None) => {}
            Err(problem) => {
                let line = Some(r.line_of(span.start));
                r.push_early(&render_path(path), line, problem.message(path));
            }
        },
        DeValue::Table(t) => expand_in_table(t, path, env, r),
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(Seg::Index(i));
                expand_value(item, path, env, r);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Why a string could not be expanded.
#[derive(Debug, PartialEq, Eq)]
enum ExpandError {
    /// Variables not set, and variables set to the empty string, each named once in order of
    /// appearance.
    Unset {
        unset: Vec<String>,
        empty: Vec<String>,
    },
    /// A `${` without its `}`.
    Unterminated,
    /// `${…}` around something that is not a variable name.
    BadName(String),
}

impl ExpandError {
    /// The "what; fix" line for the key at `path`; a secret key also suggests its `_file` twin.
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

#[cfg(test)]
mod tests {
    use super::super::test_support::{cc_route, env_of, errors, no_env};
    use super::super::{Config, Secret};
    use super::*;

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
}
