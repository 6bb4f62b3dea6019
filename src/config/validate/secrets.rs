//! Credentials in `[routes.auth]`: `client_id` and `client_secret`, each given inline (often as
//! `${VAR}`) or read from its `_file` twin (docs/configuration.md "Secrets, files and paths").
//! Values are never quoted in messages; a file's content is used without its trailing line
//! break.

use crate::files;

use super::Validator;

impl Validator<'_> {
    /// A secret (or client id) from `name` or `name_file`; never quoted in messages.
    /// `None` when absent or invalid (invalid ones are reported).
    ///
    /// `p` is the auth table's key (`routes[i].auth`), `name` the key (`client_secret`);
    /// `inline` and `file` are the values of `name` and `name_file`. Both set, an unreadable
    /// file, an empty value or a control character (a line break inside the value) is reported
    /// once, and the later "missing" complaint about `name` is silenced.
    pub(super) fn secret_value(
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
                self.r.silence(&key);
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
                        self.r.silence(&key);
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
            self.r.silence(&key);
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
            self.r.silence(&key);
            return None;
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{cc_route, load, no_env};
    use crate::config::{Config, Secret};

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
}
