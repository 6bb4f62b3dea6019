//! Rotation the way Kubernetes delivers it: the ConfigMap's own config, its files in volumes
//! laid out as the kubelet writes ConfigMap and Secret volumes (each visible file a symlink
//! through `..data` to a timestamped directory; an update writes a new directory, renames a new
//! `..data` link over the old one and deletes the old directory), against the sandbox
//! authorization servers. A reload (what SIGHUP runs) after such an update applies the new
//! secret and the new config.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use tokengate::config::{BasicEncoding, Config, Secret};
use tokengate_sandbox::{keys, Sandbox};

use super::kubernetes::{configmap_toml, example_secret_keys, secret_mount_dir};
use crate::common::{demo_key_path, free_addr, TestGateway};

/// A directory updated like a kubelet ConfigMap or Secret volume.
struct AtomicVolume {
    dir: PathBuf,
    generation: usize,
}

impl AtomicVolume {
    fn new(dir: PathBuf, files: &[(String, String)]) -> AtomicVolume {
        std::fs::create_dir_all(&dir).unwrap();
        let mut volume = AtomicVolume { dir, generation: 0 };
        volume.update(files);
        volume
    }

    /// Publishes `files` as the volume's new content in one rename, then removes the previous
    /// generation's directory, as the kubelet does.
    fn update(&mut self, files: &[(String, String)]) {
        let previous = format!("..gen_{}", self.generation);
        self.generation += 1;
        let current = format!("..gen_{}", self.generation);
        std::fs::create_dir(self.dir.join(&current)).unwrap();
        for (name, content) in files {
            std::fs::write(self.dir.join(&current).join(name), content).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        symlink(&current, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for (name, _) in files {
            let visible = self.dir.join(name);
            if std::fs::symlink_metadata(&visible).is_err() {
                symlink(Path::new("..data").join(name), &visible).unwrap();
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.join(previous));
    }
}

/// A scratch directory, removed on drop (also when the test fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The credential files the Secret holds, with the sandbox's credentials.
fn secret_files(driftrock_secret: &str) -> Vec<(String, String)> {
    let key = std::fs::read_to_string(demo_key_path()).unwrap();
    let files: Vec<(String, String)> = [
        ("drillster-key.json", key),
        (
            "drillster-client-secret",
            format!("{}\n", keys::DRILLSTER_CLIENT_SECRET),
        ),
        (
            "driftrock-client-id",
            format!("{}\n", keys::DRIFTROCK_CLIENT_ID),
        ),
        ("driftrock-client-secret", format!("{driftrock_secret}\n")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let names: std::collections::BTreeSet<String> = files.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(names, example_secret_keys(), "the Secret's keys");
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_and_config_update_in_kubelet_volumes_applies_on_reload() {
    let sandbox = Sandbox::start().await.unwrap();
    let scratch = Scratch(
        std::env::temp_dir().join(format!("tokengate-deploy-volumes-{}", std::process::id())),
    );
    let root = &scratch.0;
    let _ = std::fs::remove_dir_all(root);
    let (listen, admin) = (free_addr(), free_addr());

    // The ConfigMap's config, pointed at the sandbox and at loopback ports, its secrets read
    // from the Secret volume below.
    let (key, text) = configmap_toml();
    let api = sandbox.api.base_url();
    let secrets_dir = root.join("secrets");
    let text = text
        .replace("0.0.0.0:8080", &listen.to_string())
        .replace("0.0.0.0:9090", &admin.to_string())
        .replace(
            r#"allowed_clients = ["10.244.0.0/16"]"#,
            r#"allowed_clients = ["127.0.0.0/8"]"#,
        )
        .replace(r#"grace_period = "10s""#, r#"grace_period = "0s""#)
        .replace(
            "https://www.drillster.com/api/oauth/token",
            &sandbox.drillster.token_endpoint(),
        )
        .replace(
            "https://external-apis.driftrock.com/oauth2/token",
            &sandbox.driftrock.token_endpoint(),
        )
        .replace("https://www.drillster.com", &api)
        .replace("https://external-apis.driftrock.com", &api)
        .replace(
            "874a16d4ac764ce4a545f0cca4584c63",
            keys::DRILLSTER_CLIENT_ID,
        )
        .replace(&secret_mount_dir(), &secrets_dir.display().to_string());
    assert!(!text.contains("https://"), "a real endpoint left:\n{text}");

    let old = keys::DRIFTROCK_CLIENT_SECRET;
    let mut secrets = AtomicVolume::new(secrets_dir, &secret_files(old));
    let mut config_volume = AtomicVolume::new(root.join("config"), &[(key.clone(), text.clone())]);
    let config = Config::load(&config_volume.dir.join(&key)).unwrap_or_else(|e| panic!("{e}"));
    let gw = TestGateway::start(config).await;
    gw.ready().await;
    let client = reqwest::Client::new();
    let status = |method: reqwest::Method, path: &str| {
        let request = client.request(method, gw.url(path));
        async move {
            request
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(status(reqwest::Method::GET, "/driftrock/a").await, 200);
    assert_eq!(status(reqwest::Method::GET, "/a").await, 200);

    // The Secret is updated with a new Driftrock client secret: the old files are gone.
    let new = "r0tated s3cret/%2F";
    sandbox
        .driftrock
        .add_client_secret(keys::DRIFTROCK_CLIENT_ID, new);
    secrets.update(&secret_files(new));
    let requests = sandbox.driftrock.requests();
    let summary = tokio::task::block_in_place(|| gw.handle.reload()).expect("reload applies");
    assert_eq!((summary.sources_kept, summary.sources_new), (1, 1));
    assert_eq!(
        sandbox.driftrock.requests(),
        requests + 1,
        "one token request"
    );
    let sent = sandbox.driftrock.last_request().expect("a token request");
    let basic = tokengate::oauth::client_credentials::basic_authorization(
        keys::DRIFTROCK_CLIENT_ID,
        &Secret::new(new),
        BasicEncoding::Form,
    );
    assert_eq!(
        sent.header("authorization"),
        Some(basic.as_str()),
        "the new secret"
    );
    assert!(sandbox
        .driftrock
        .delete_client_secret(keys::DRIFTROCK_CLIENT_ID, old));
    assert_eq!(status(reqwest::Method::GET, "/driftrock/b").await, 200);

    // The ConfigMap is updated: Driftrock takes GET only. The tokens stay.
    let limited = text.replace(
        "strip_prefix = true\n",
        "strip_prefix = true\nallow_methods = [\"GET\"]\n",
    );
    assert_ne!(limited, text);
    config_volume.update(&[(key, limited)]);
    let summary = tokio::task::block_in_place(|| gw.handle.reload()).expect("reload applies");
    assert_eq!((summary.sources_kept, summary.sources_new), (2, 0));
    assert_eq!(status(reqwest::Method::POST, "/driftrock/c").await, 405);
    assert_eq!(status(reqwest::Method::GET, "/driftrock/c").await, 200);

    gw.stop().await;
}
