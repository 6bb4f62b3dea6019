//! The deployment artifacts in `deploy/`: the Kubernetes manifests (validated offline against
//! the Kubernetes schemas, their config checked by `tokengate check`, a secret and a config
//! update applied through volumes laid out as the kubelet writes them), the Prometheus alerting
//! rules with their unit tests, and the Grafana dashboard's queries.
//!
//! The external validators are required, not optional: a missing one fails the test with how
//! to install it (`.ci/run` installs both where missing).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize as _;
use serde_yaml::Value;

mod kubernetes;
mod monitoring;
mod rotation;

/// The repository's `deploy/` directory.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// An external tool: the executable named by the environment variable `env_var` when set,
/// else `name` on `PATH`. Panics, saying how to install it, when neither runs.
fn tool(env_var: &str, name: &str, install: &str) -> PathBuf {
    let candidate = match std::env::var_os(env_var) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(name),
    };
    match Command::new(&candidate).arg("--version").output() {
        Ok(out) if out.status.success() => candidate,
        Ok(out) => panic!(
            "{} --version failed ({}): {}\n{install}",
            candidate.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "{name} is required by this test and could not be run as {} ({e}).\n{install}\n\
             Or point {env_var} at the executable.",
            candidate.display()
        ),
    }
}

/// Runs `program` with `args`; its output.
fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

/// Standard output and error of a finished command, for assertion messages.
fn both(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every YAML document of `path`.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The value at a dotted path (`spec.template.spec.containers.0.image`); `Null` when absent.
fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    path.split('.')
        .fold(value, |v, seg| match seg.parse::<usize>() {
            Ok(i) => v.get(i).unwrap_or(&NULL),
            Err(_) => v.get(seg).unwrap_or(&NULL),
        })
}

/// The string at `path`, or a panic naming the path.
fn str_at<'a>(value: &'a Value, path: &str) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path}: not a string: {:?}", at(value, path)))
}
