//! Key files and assertions (RFC 7523 §3; Drillster: Service accounts).

use super::*;

/// A config with one jwt_bearer route to `server` using `key_file`, plus `extra` auth lines.
pub fn drillster_config(server: &AuthServer, api: &str, key_file: &Path, extra: &str) -> String {
    format!(
        r#"[server]
listen = "{listen}"
admin_listen = "{admin}"
grace_period = "0s"

[[routes]]
name = "drillster"
upstream = "{api}"

[routes.auth]
grant = "jwt_bearer"
token_endpoint = "{endpoint}"
client_id = "{id}"
client_secret = "{secret}"
key_file = "{key}"
{extra}
"#,
        listen = free_addr(),
        admin = free_addr(),
        endpoint = server.token_endpoint(),
        id = keys::DRILLSTER_CLIENT_ID,
        secret = keys::DRILLSTER_CLIENT_SECRET,
        key = key_file.display(),
    )
}

/// A temporary directory for key files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tokengate-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes a Drillster JSON key file with `private_key` as the `privateKey` value, written
    /// verbatim into the JSON string (so `\\n` there stays a literal backslash-n).
    pub fn key_file(&self, name: &str, private_key_json_escaped: &str) -> PathBuf {
        let path = self.0.join(name);
        let json = format!(
            "{{\"type\":\"service_account_key\",\"keyId\":\"{}\",\"serviceAccountId\":\"{}\",\"privateKey\":\"{}\"}}",
            keys::DEMO_KEY_ID,
            keys::DEMO_SERVICE_ACCOUNT_ID,
            private_key_json_escaped
        );
        std::fs::write(&path, json).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/keys")
            .join(name),
    )
    .unwrap()
}

/// JSON-string escaping of a PEM with real newlines as `\n` escapes (what a key file holds).
fn json_escape(pem: &str) -> String {
    serde_json::to_string(pem)
        .unwrap()
        .trim_matches('"')
        .to_string()
}

/// `privateKey` with literal backslash-n escapes, with CRLF, PKCS#1 and PKCS#8: each signs
/// RS256 assertions the Drillster-like server accepts.
pub async fn key_variants_all_sign_rs256() -> Seen {
    let server = AuthServer::drillster().start().await.unwrap();
    let dir = TempDir::new("keys");
    let pkcs8 = keys::DEMO_PRIVATE_PEM.to_string();
    let pkcs1 = fixture("demo-pkcs1.pem");
    let variants = [
        ("pkcs8.json", json_escape(&pkcs8)),
        ("pkcs1.json", json_escape(&pkcs1)),
        // The two characters `\` `n` in the decoded string: `\\n` in the JSON text.
        (
            "literal-backslash-n.json",
            pkcs8.trim_end().replace('\n', "\\\\n"),
        ),
        ("crlf.json", json_escape(&pkcs8.replace('\n', "\r\n"))),
        (
            "surrounding-text.json",
            json_escape(&format!("Key for service account\n{pkcs1}\n(end)")),
        ),
    ];
    for (name, escaped) in &variants {
        let path = dir.key_file(name, escaped);
        let toml = drillster_config(&server, "http://127.0.0.1:9", &path, "");
        let config =
            Config::from_toml_str(&toml, None, &|_| None).unwrap_or_else(|e| panic!("{name}: {e}"));
        let client = TokenClient::new(
            config.routes[0].auth.clone(),
            None,
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .unwrap();
        let token = client
            .fetch(SystemTime::now())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!token.value.is_empty());
        let req = server.last_request().unwrap();
        assert_eq!(req.assertion_header().unwrap()["alg"], "RS256", "{name}");
    }
    assert_eq!(server.successes(), variants.len() as u64);
    let mut seen = Seen::default();
    seen.add_auth_server(&server);
    server.shutdown().await.unwrap();
    seen
}

/// An EC key, an encrypted key or a non-PEM string fails at start-up (config load, and
/// `tokengate check`) naming the key file and the `privateKey` field.
pub async fn bad_keys_fail_at_startup_naming_file_and_field() -> Seen {
    let server = AuthServer::drillster().start().await.unwrap();
    let dir = TempDir::new("badkeys");
    let variants = [
        ("ec.json", json_escape(&fixture("ec-p256.pem"))),
        (
            "encrypted.json",
            json_escape(&fixture("demo-encrypted.pem")),
        ),
        (
            "not-pem.json",
            "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ".to_string(),
        ),
    ];
    for (name, escaped) in &variants {
        let path = dir.key_file(name, escaped);
        let toml = drillster_config(&server, "http://127.0.0.1:9", &path, "");
        let err = Config::from_toml_str(&toml, None, &|_| None)
            .err()
            .unwrap_or_else(|| panic!("{name} must be refused"))
            .to_string();
        assert!(err.contains("routes[0].auth.key_file"), "{name}: {err}");
        assert!(err.contains(&path.display().to_string()), "{name}: {err}");
        assert!(err.contains("privateKey"), "{name}: {err}");
        assert!(
            !err.contains("MIIE"),
            "{name}: key material in the error: {err}"
        );

        let config_path = dir.0.join(format!("{name}.toml"));
        std::fs::write(&config_path, &toml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["check", "-c"])
            .arg(&config_path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("routes[0].auth.key_file") && stderr.contains("privateKey"),
            "{name}: {stderr}"
        );
    }
    assert_eq!(server.requests(), 0);
    server.shutdown().await.unwrap();
    Seen::default()
}

/// A server allowing 5 s of skew that rejects `iat` in the future, `exp` more than 3600 s
/// ahead and reused `jti`s accepts every assertion built with the gateway's clock 90 s ahead of
/// and 90 s behind its own (default and maximum assertion lifetimes); 200 s ahead is refused,
/// showing the server does check.
pub async fn assertions_accepted_with_clock_90s_ahead_or_behind() -> Seen {
    let server = AuthServer::drillster()
        .clock_skew(Duration::from_secs(5))
        .max_assertion_lifetime(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    for lifetime in ["", "assertion_lifetime = \"1h\""] {
        let toml = drillster_config(
            &server,
            "http://127.0.0.1:9",
            &crate::common::demo_key_path(),
            lifetime,
        );
        let config = Config::from_toml_str(&toml, None, &|_| None).unwrap();
        let client = TokenClient::new(
            config.routes[0].auth.clone(),
            None,
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .unwrap();
        for offset in [-90i64, 90, -90, 90, 0] {
            let now = if offset >= 0 {
                SystemTime::now() + Duration::from_secs(offset as u64)
            } else {
                SystemTime::now() - Duration::from_secs((-offset) as u64)
            };
            client
                .fetch(now)
                .await
                .unwrap_or_else(|e| panic!("clock {offset:+} s, {lifetime:?}: {e}"));
        }
        let e = client
            .fetch(SystemTime::now() + Duration::from_secs(200))
            .await
            .expect_err("200 s ahead: refused");
        assert!(
            e.message.contains("iat in the future") || e.message.contains("exp too far ahead"),
            "{e}"
        );
    }
    assert_eq!(server.successes(), 10);
    let mut seen = Seen::default();
    seen.add_auth_server(&server);
    server.shutdown().await.unwrap();
    seen
}
