//! Shared by the config unit tests: loading text as `tokengate.toml`, and one route of each
//! grant to vary.

use std::path::Path;

use super::{Config, ConfigErrors};

/// The sandbox's demo service account key (a JSON key file as Drillster issues them).
pub(super) const DEMO_KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crates/sandbox/src/keys/demo-key.json"
);

/// An environment of `pairs` for `${VAR}` lookups.
pub(super) fn env_of(
    pairs: &'static [(&'static str, &'static str)],
) -> impl Fn(&str) -> Option<String> {
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

/// An empty environment.
pub(super) fn no_env(_: &str) -> Option<String> {
    None
}

/// Loads `text` as if read from `tokengate.toml`, with an empty environment.
pub(super) fn load(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_toml_str(text, Some(Path::new("tokengate.toml")), &no_env)
}

/// The error lines for `text`, which must not load.
pub(super) fn errors(text: &str) -> Vec<String> {
    match load(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

/// Whether any error line contains `needle`.
pub(super) fn has(errs: &[String], needle: &str) -> bool {
    errs.iter().any(|e| e.contains(needle))
}

/// A valid `client_credentials` route (Driftrock); `extra_auth` is appended to `[routes.auth]`.
pub(super) fn cc_route(extra_auth: &str) -> String {
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

/// A valid `jwt_bearer` route (Drillster) with `key_file`; `extra_auth` is appended to
/// `[routes.auth]`.
pub(super) fn jwt_route(key_file: &str, extra_auth: &str) -> String {
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
