//! Config loading through the public API: the shipped examples in `conf/` and the error lines
//! an operator sees.

use std::path::{Path, PathBuf};

use tokengate::config::{ClientAuth, Config, ConfigErrors, Grant, TokenEndpointLocation};

fn example_env(name: &str) -> Option<String> {
    match name {
        "DRILLSTER_CLIENT_SECRET" => Some("drillster-example-secret".to_string()),
        "DRIFTROCK_CLIENT_ID" => Some("driftrock-example-id".to_string()),
        _ => None,
    }
}

fn conf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conf")
}

fn load_example(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).expect("read example");
    Config::from_toml_str(&text, Some(path), &example_env)
}

#[test]
fn every_example_config_loads() {
    let mut seen = 0;
    for entry in std::fs::read_dir(conf_dir()).expect("conf/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        let config = load_example(&path).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
        assert!(!config.routes.is_empty(), "{}", path.display());
        for addr in config
            .server
            .listen
            .iter()
            .chain(std::iter::once(&config.server.admin_listen))
            .chain(config.routes.iter().filter_map(|r| r.listen.as_ref()))
        {
            // Loopback everywhere, except where the operator says otherwise: the container
            // config must bind every interface for Docker's port mapping (which docker-compose.yml
            // publishes on the host's loopback only).
            let in_container = matches!(
                path.file_name().and_then(|n| n.to_str()),
                Some("docker.toml" | "docker-fleet.toml")
            );
            assert!(
                addr.ip().is_loopback() || (in_container && addr.ip().is_unspecified()),
                "{}: {addr} is not loopback",
                path.display()
            );
        }
    }
    assert!(
        seen >= 3,
        "expected conf/drillster.toml, driftrock.toml, tokengate.toml"
    );
}

#[test]
fn combined_example_has_both_grants() {
    let config = load_example(&conf_dir().join("tokengate.toml")).expect("valid");
    let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["drillster", "driftrock"]);

    let drillster = &config.routes[0].auth;
    assert_eq!(drillster.client_auth, ClientAuth::Post);
    assert_eq!(
        drillster.client_secret.as_ref().map(|s| s.expose()),
        Some("drillster-example-secret")
    );
    match &drillster.grant {
        Grant::JwtBearer {
            subject, key_file, ..
        } => {
            assert_eq!(subject, "iqKpEF3URCe0yAsyrsk_4g");
            assert!(
                key_file.ends_with("conf/demo/drillster-key.json"),
                "{key_file:?}"
            );
        }
        other => panic!("expected jwt_bearer, got {other:?}"),
    }
    assert_eq!(
        drillster.endpoint,
        TokenEndpointLocation::Url("https://www.drillster.com/api/oauth/token".parse().unwrap())
    );

    let driftrock = &config.routes[1];
    assert_eq!(driftrock.path_prefix, "/driftrock");
    assert!(driftrock.strip_prefix);
    assert_eq!(driftrock.auth.client_id, "driftrock-example-id");
    assert_eq!(
        driftrock.auth.client_secret.as_ref().map(|s| s.expose()),
        Some("FAKE-driftrock-secret-for-examples-only"),
        "file content with the trailing newline trimmed"
    );
    assert!(matches!(driftrock.auth.client_auth, ClientAuth::Basic(_)));
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let config = load_example(&conf_dir().join("tokengate.toml")).expect("valid");
    let shown = format!("{config:?}");
    assert!(!shown.contains("drillster-example-secret"), "{shown}");
    assert!(!shown.contains("FAKE-driftrock-secret"), "{shown}");
    assert!(!shown.contains("BEGIN PRIVATE KEY"), "{shown}");
}

#[test]
fn example_without_env_names_each_missing_variable() {
    let path = conf_dir().join("tokengate.toml");
    let text = std::fs::read_to_string(&path).expect("read");
    let errors = Config::from_toml_str(&text, Some(&path), &|_| None).unwrap_err();
    let secret = errors
        .find("routes[0].auth.client_secret")
        .expect("client_secret error");
    assert!(
        secret
            .message
            .contains("DRILLSTER_CLIENT_SECRET is not set"),
        "{secret}"
    );
    let id = errors
        .find("routes[1].auth.client_id")
        .expect("client_id error");
    assert!(
        id.message.contains("DRIFTROCK_CLIENT_ID is not set"),
        "{id}"
    );
    assert_eq!(errors.len(), 2, "{errors}");
    for line in errors.to_string().lines() {
        assert!(line.contains("tokengate.toml:"), "{line}");
    }
}

#[test]
fn problems_in_several_places_come_back_together() {
    let path = conf_dir().join("tokengate.toml");
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace(
            "grant = \"client_credentials\"",
            "grant = \"client-credential\"",
        )
        .replace(
            "assertion_lifetime = \"5m\"",
            "assertion_lifetime = \"5m\"\nclient_scret = \"x\"",
        )
        .replace("level = \"info\"", "level = \"loud\"");
    let errors = Config::from_toml_str(&text, Some(&path), &example_env).unwrap_err();
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"log.level"), "{errors}");
    assert!(keys.contains(&"routes[0].auth.client_scret"), "{errors}");
    assert!(keys.contains(&"routes[1].auth.grant"), "{errors}");
    let grant = errors.find("routes[1].auth.grant").expect("grant");
    assert!(
        grant.to_string().ends_with(
            "routes[1].auth.grant: unknown grant \"client-credential\"; expected \"jwt_bearer\" or \"client_credentials\""
        ),
        "{grant}"
    );
    // One line per problem.
    assert_eq!(errors.to_string().lines().count(), errors.len());
}

#[test]
fn load_reads_a_file_and_names_it() {
    let err = Config::load(Path::new("/nonexistent/tokengate.toml")).unwrap_err();
    assert_eq!(err.len(), 1);
    assert!(
        err.to_string()
            .starts_with("/nonexistent/tokengate.toml: cannot read"),
        "{err}"
    );
}
