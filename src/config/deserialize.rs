//! From the expanded TOML tree to the file structs (`file.rs`), reporting every unknown key
//! and every value of the wrong type with its key path and line.
//!
//! Unknown keys are collected in one pass with `serde_ignored` (the file structs accept and
//! ignore them). A value of the wrong type stops serde: it is reported with the path
//! `serde_path_to_error` gives, removed from the tree, and deserializing runs again, so every
//! type error is reported in one run too. Shapes serde would describe badly (a table written
//! as an array, a non-string in a `listen` array) are checked before.

use std::collections::HashSet;

use serde_aux::serde_introspection::serde_introspect;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::diagnostics::{
    found, leaf, render_path, type_error_message, unknown_key_message, Report, Seg,
};
use super::file::{
    AuthFile, ClusterFile, FileConfig, LogFile, RouteFile, ServerFile, SubjectsFile,
};

/// Most unknown keys and wrong types reported in one run: one typo repeated in every route of
/// a large file would bury everything else (and each wrong type costs one more pass over the
/// file); past this the rest is left for the next run.
pub(super) const FILE_LAYER_LIMIT: usize = 100;

/// Deserializes the file structs, reporting unknown keys and wrong types (see the module
/// docs). `None` when a problem could not be tied to a key, or there were more than
/// [`FILE_LAYER_LIMIT`]: validation would then only add noise.
pub(super) fn deserialize_collecting(
    root: &mut Spanned<DeTable<'_>>,
    r: &mut Report,
) -> Option<FileConfig> {
    // Problems reported so far, and the unknown keys among them (rendered paths).
    let mut reported = 0;
    let mut unknown_reported = HashSet::new();
    loop {
        let mut unknown: Vec<Vec<Seg>> = Vec::new();
        let mut on_ignored = |path: serde_ignored::Path<'_>| {
            let mut segs = Vec::new();
            ignored_path(&path, &mut segs);
            unknown.push(segs);
        };
        let de = toml::de::Deserializer::from(root.clone());
        let result = serde_path_to_error::deserialize::<_, FileConfig>(
            serde_ignored::Deserializer::new(de, &mut on_ignored),
        );
        // A pass stopped by a type error has met the unknown keys before it, which the next
        // pass meets again: each is reported once, in the order met.
        for path in unknown {
            let key = render_path(&path);
            if unknown_reported.contains(&key) {
                continue;
            }
            if reported == FILE_LAYER_LIMIT {
                return stop(r);
            }
            report_unknown(&path, r);
            unknown_reported.insert(key);
            reported += 1;
        }
        let e = match result {
            Ok(config) => return Some(config),
            Err(e) => e,
        };
        if reported == FILE_LAYER_LIMIT {
            return stop(r);
        }
        reported += 1;
        let path = error_path(e.path());
        let inner = e.into_inner();
        let Some(path) = path.filter(|p| !p.is_empty()) else {
            let line = inner.span().map(|s| r.line_of(s.start));
            r.push_early("", line, type_error_message(inner.message(), None, None));
            return None;
        };
        let value = value_at(root.get_ref(), &path).map(Spanned::get_ref);
        let message = type_error_message(inner.message(), leaf(&path), value);
        r.push_early(&render_path(&path), None, message);
        // Remove the innermost key holding the bad value (an array element takes its array).
        let mut removal = path;
        while matches!(removal.last(), Some(Seg::Index(_))) {
            removal.pop();
        }
        r.silence(&render_path(&removal));
        if !remove_path(root.get_mut(), &removal) {
            return None;
        }
    }
}

/// The last line of a report cut short at [`FILE_LAYER_LIMIT`].
fn stop(r: &mut Report) -> Option<FileConfig> {
    r.push_early(
        "",
        None,
        format!(
            "stopped after {FILE_LAYER_LIMIT} unknown keys and wrong types; fix these and run \
             `tokengate check` again for the rest"
        ),
    );
    None
}

/// Reports the unknown key at `path` with the valid keys of its table.
fn report_unknown(path: &[Seg], r: &mut Report) {
    let Some((Seg::Key(field), table)) = path.split_last() else {
        return;
    };
    let message = unknown_key_message(field, keys_of(table));
    r.push_early(&render_path(path), None, message);
}

/// The keys a table at `path` may hold, in the file struct's order.
fn keys_of(path: &[Seg]) -> &'static [&'static str] {
    match path {
        [] => serde_introspect::<FileConfig>(),
        [Seg::Key(k)] if k == "server" => serde_introspect::<ServerFile>(),
        [Seg::Key(k)] if k == "log" => serde_introspect::<LogFile>(),
        [Seg::Key(k)] if k == "cluster" => serde_introspect::<ClusterFile>(),
        [Seg::Key(k), Seg::Index(_)] if k == "routes" => serde_introspect::<RouteFile>(),
        [Seg::Key(k), Seg::Index(_), Seg::Key(a)] if k == "routes" && a == "auth" => {
            serde_introspect::<AuthFile>()
        }
        [Seg::Key(k), Seg::Index(_), Seg::Key(a)] if k == "routes" && a == "subjects" => {
            serde_introspect::<SubjectsFile>()
        }
        _ => &[],
    }
}

/// `serde_ignored`'s path as key path segments (`Some` and newtype wrappers are not keys).
fn ignored_path(path: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            ignored_path(parent, out);
            out.push(Seg::Index(*index));
        }
        Path::Map { parent, key } => {
            ignored_path(parent, out);
            out.push(Seg::Key(key.clone()));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent, out),
    }
}

/// `serde_path_to_error`'s path as key path segments; `None` when a step is not a key or an
/// index (the value cannot then be found and removed).
fn error_path(path: &serde_path_to_error::Path) -> Option<Vec<Seg>> {
    use serde_path_to_error::Segment;
    path.iter()
        .map(|seg| match seg {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// Tables written as arrays (`[[server]]`) or arrays as tables (`[routes]`) get a clear message
/// here; serde would otherwise read a struct from an array positionally and blame a field.
/// So does a `server.listen` array with an element that is not a string: serde's one-or-many
/// enum can only say the whole value is wrong.
pub(super) fn check_shapes(root: &mut DeTable<'_>, r: &mut Report) {
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
    for (name, want_array) in [
        ("server", false),
        ("log", false),
        ("cluster", false),
        ("routes", true),
    ] {
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
    check_listen_array(root, r);
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

/// Reports the first element of a `server.listen` array that is not a string, and removes the
/// array (the default listener then applies, and nothing more is said about the key).
fn check_listen_array(root: &mut DeTable<'_>, r: &mut Report) {
    let Some(DeValue::Table(server)) = root.get_mut("server").map(|v| v.get_mut()) else {
        return;
    };
    let Some(DeValue::Array(items)) = server.get("listen").map(|v| v.get_ref()) else {
        return;
    };
    let Some((i, item)) = items
        .iter()
        .enumerate()
        .find(|(_, item)| !matches!(item.get_ref(), DeValue::String(_)))
    else {
        return;
    };
    let message = format!(
        "wrong type: found {}; expected a string",
        found(item.get_ref())
    );
    r.push_early(&format!("server.listen[{i}]"), None, message);
    r.silence("server.listen");
    server.remove("listen");
}

/// The value at `path`, if it is in the tree.
fn value_at<'a, 'i>(table: &'a DeTable<'i>, path: &[Seg]) -> Option<&'a Spanned<DeValue<'i>>> {
    let (Seg::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let mut value = table.get(first.as_str())?;
    for seg in rest {
        value = match (value.get_ref(), seg) {
            (DeValue::Table(t), Seg::Key(k)) => t.get(k.as_str())?,
            (DeValue::Array(items), Seg::Index(i)) => items.get(*i)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Removes the value at `path`; `false` when it is not in the tree.
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

#[cfg(test)]
mod tests {
    use super::super::test_support::{cc_route, errors, has};
    use super::*;

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

    /// One typo repeated in every route of a large file: the first `FILE_LAYER_LIMIT` are
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
        let errs = errors(&routes(FILE_LAYER_LIMIT));
        let unknown = errs.iter().filter(|e| e.contains("unknown key")).count();
        assert_eq!(unknown, FILE_LAYER_LIMIT, "{:?}", errs.last());
        assert!(errs.iter().all(|e| !e.contains("stopped after")));
        let errs = errors(&routes(FILE_LAYER_LIMIT + 20));
        assert_eq!(errs.len(), FILE_LAYER_LIMIT + 1, "{errs:?}");
        assert!(
            errs[0].starts_with("tokengate.toml:2: routes[0].nme: unknown key"),
            "{}",
            errs[0]
        );
        let last = &errs[FILE_LAYER_LIMIT - 1];
        assert!(
            last.contains(&format!("routes[{}].nme", FILE_LAYER_LIMIT - 1)),
            "{last}"
        );
        assert!(errs[FILE_LAYER_LIMIT].contains("stopped after 100 unknown keys"));
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

    /// A `listen` that is neither a string nor an array says what it found and what it takes.
    #[test]
    fn listen_of_the_wrong_type_named() {
        let errs = errors(&format!("[server]\nlisten = 5\n{}", cc_route("")));
        assert_eq!(
            errs,
            [
                "tokengate.toml:2: server.listen: wrong type: found integer `5`; expected an \
              address or an array of addresses, e.g. \"127.0.0.1:8080\""
            ]
        );
        let errs = errors(&format!(
            "[server]\nlisten = [\"127.0.0.1:1\", 5]\n{}",
            cc_route("")
        ));
        assert_eq!(
            errs,
            ["tokengate.toml:2: server.listen[1]: wrong type: found integer `5`; expected a string"]
        );
    }

    #[test]
    fn keys_of_each_table() {
        assert_eq!(keys_of(&[]), ["server", "log", "cluster", "routes"]);
        assert_eq!(
            keys_of(&[Seg::Key("cluster".into())]),
            ["redis", "key_prefix", "encryption_key_file", "timeout"]
        );
        let auth = [
            Seg::Key("routes".into()),
            Seg::Index(3),
            Seg::Key("auth".into()),
        ];
        assert_eq!(keys_of(&auth)[..2], ["grant", "token_endpoint"]);
        assert!(keys_of(&[Seg::Key("serer".into())]).is_empty());
    }
}
