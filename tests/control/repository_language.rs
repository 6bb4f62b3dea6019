//! The repository's text speaks of the product, not of how the work on it was organised.
//!
//! Walks every tracked text file (`git ls-files`; a plain directory walk when git is not
//! available) and fails, listing `file:line`, for wording that refers to work sessions,
//! internal runs, internal issue numbers, the build machine, or documents that are not in the
//! repository. Behaviour is attributed to its public source instead: an RFC section, the
//! vendor documentation by title, or the README and the manual in docs/.
//!
//! Skipped: `vendor/` (third-party code), `Cargo.lock`, `target/`, `fuzz/corpus/`, binary
//! files, files over 2 MB, and this file itself — its patterns necessarily spell out the
//! wording they look for, so it is excluded from its own scan rather than obfuscated.

use std::path::{Path, PathBuf};
use std::process::Command;

use regex::Regex;

const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024;
const THIS_FILE: &str = "tests/control/repository_language.rs";

/// Each rule: a name for the report and the pattern that flags a line.
fn rules() -> Vec<(&'static str, Regex)> {
    let ordinal = "first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|\
                   twelfth|thirteenth|fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|\
                   nineteenth|twentieth|\\d+(?:st|nd|rd|th)|nth";
    let rule = |name, pattern: &str| (name, Regex::new(pattern).expect("valid pattern"));
    vec![
        // "the twelfth session's", "7th session", "ninth-session"; never a bare "session",
        // pingora's `Session`, or an HTTP/TLS session.
        rule(
            "ordinal before \"session\"",
            &format!(r"(?i)\b(?:{ordinal})[\s\-]+sessions?\b"),
        ),
        rule("\"break-in\"", r"(?i)\bbreak[\-\u{2010}\u{2011}]in\b"),
        // Case-sensitive: `spec` as a variable name or in a crate version is fine.
        rule("\"SPEC\" / \"SPEC.md\"", r"\bSPEC\b"),
        rule("\"seed 00N\"", r"(?i)\bseeds?[\s_\-]*00\d"),
        rule("\"issue\" + number", r"(?i)\bissues?\s*#?\d+"),
        rule("\"this VM\"", r"\b[Tt]his VM\b"),
    ]
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Repository-relative paths (with `/` separators) of the files to scan.
fn candidate_files(root: &Path) -> Vec<String> {
    let from_git = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split('\0')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|files| !files.is_empty());
    match from_git {
        Some(files) => files,
        None => {
            let mut files = Vec::new();
            walk(root, root, &mut files);
            files
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let rel = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name == ".git" || skipped(&format!("{rel}/")) {
                continue;
            }
            walk(root, &path, out);
        } else if kind.is_file() {
            out.push(rel);
        }
    }
}

/// Paths that are not the project's own words.
fn skipped(rel: &str) -> bool {
    rel == THIS_FILE
        || rel == "Cargo.lock"
        || rel.ends_with("/Cargo.lock")
        || rel.starts_with("vendor/")
        || rel.starts_with("target/")
        || rel.starts_with("fuzz/target/")
        || rel.starts_with("fuzz/corpus/")
        || rel.starts_with("fuzz/artifacts/")
}

/// The file's text, or `None` for binary, unreadable, missing or oversized files.
fn text_of(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    if bytes.contains(&0) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

#[test]
fn repository_speaks_only_of_the_product() {
    let root = root();
    let rules = rules();
    let mut hits = Vec::new();
    let mut scanned = 0usize;
    for rel in candidate_files(&root) {
        if skipped(&rel) {
            continue;
        }
        let Some(text) = text_of(&root.join(&rel)) else {
            continue;
        };
        scanned += 1;
        for (number, line) in text.lines().enumerate() {
            for (name, pattern) in &rules {
                if let Some(found) = pattern.find(line) {
                    hits.push(format!(
                        "{rel}:{}: {name}: {:?} in {:?}",
                        number + 1,
                        found.as_str(),
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(scanned > 0, "no files scanned under {}", root.display());
    assert!(
        hits.is_empty(),
        "{} line(s) refer to how the work was organised rather than to the product:\n{}",
        hits.len(),
        hits.join("\n")
    );
}

#[test]
fn patterns_flag_work_history_but_not_product_sessions() {
    let rules = rules();
    let flagged = |line: &str| rules.iter().any(|(_, re)| re.is_match(line));
    // Work-history wording, spelled in pieces so this file's text stays plain.
    let session = "session";
    for line in [
        format!("the twelfth {session}'s load run"),
        format!("Seventh {session}"),
        format!("measured in the 12th {session}"),
        format!("a {}-in run", "break"),
        format!("as {} \"Proxy behaviour\" says", "SP".to_owned() + "EC"),
        format!("see {}.md", "SP".to_owned() + "EC"),
        format!("per {} 004", "seed"),
        format!("({} 4, point 6)", "issue"),
        format!("{} 3, items 1-12", "Issue"),
        format!("on {} VM", "this"),
    ] {
        assert!(flagged(&line), "not flagged: {line:?}");
    }
    for line in [
        "pingora's Session type",
        "fn request_filter(&self, session: &mut Session)",
        "an HTTP session",
        "TLS session resumption",
        "the session ends when the client closes",
        "let spec = policy_spec();",
        "an open issue upstream",
        "first request of the connection",
    ] {
        assert!(!flagged(line), "flagged: {line:?}");
    }
}
