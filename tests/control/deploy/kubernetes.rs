//! `deploy/kubernetes/`: every manifest passes the Kubernetes schemas of a pinned version in
//! strict mode (`kubernetes-validate`, offline); the ConfigMap's config passes `tokengate check`
//! with the Secret's files where the Deployment mounts them; and the pieces agree with each
//! other (ports, probes, mounts, grace periods, who may connect).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_yaml::Value;

use super::{at, both, deploy_dir, run, str_at, tool, yaml_documents};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.30.0";

/// `shutdown_delay` when the config does not set it (docs/configuration.md).
const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);

const INSTALL_KUBERNETES_VALIDATE: &str = "Install it with `pip install kubernetes-validate` \
     (in a virtual environment: `python3 -m venv /opt/kv && /opt/kv/bin/pip install \
     kubernetes-validate`, then put /opt/kv/bin on PATH); .ci/run does this where it is missing.";

fn kubernetes_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

/// Every `*.yaml` in `deploy/kubernetes/`, sorted.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kubernetes_dir())
        .expect("deploy/kubernetes/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("yaml"))
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> &str {
    path.file_name()
        .and_then(|n| n.to_str())
        .expect("file name")
}

/// The one document of kind `kind` across the manifests (the kustomization excluded).
fn resource(kind: &str) -> Value {
    let mut found: Vec<Value> = manifest_files()
        .iter()
        .filter(|p| file_name(p) != "kustomization.yaml")
        .flat_map(|p| yaml_documents(p))
        .filter(|doc| at(doc, "kind").as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    found.remove(0)
}

/// The Deployment's gateway container.
fn container(deployment: &Value) -> &Value {
    let containers = at(deployment, "spec.template.spec.containers")
        .as_sequence()
        .expect("containers");
    containers
        .iter()
        .find(|c| at(c, "name").as_str() == Some("tokengate"))
        .expect("a container named tokengate")
}

/// The containerPort of the named port.
fn container_port(container: &Value, name: &str) -> u64 {
    at(container, "ports")
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| at(p, "name").as_str() == Some(name))
        .and_then(|p| at(p, "containerPort").as_u64())
        .unwrap_or_else(|| panic!("container port {name:?}"))
}

/// The config file the ConfigMap carries: (its key, its TOML text).
pub(super) fn configmap_toml() -> (String, String) {
    let cm = resource("ConfigMap");
    let data = at(&cm, "data").as_mapping().expect("ConfigMap data");
    assert_eq!(data.len(), 1, "the ConfigMap holds one file");
    let (key, text) = data.iter().next().expect("one entry");
    (
        key.as_str().expect("key").to_string(),
        text.as_str().expect("TOML text").to_string(),
    )
}

/// Where the Deployment mounts the volume that comes from `source` (`configMap` or `secret`)
/// named `name`.
fn mount_path_of(deployment: &Value, source: &str, name_key: &str, name: &str) -> String {
    let volumes = at(deployment, "spec.template.spec.volumes")
        .as_sequence()
        .expect("volumes");
    let volume = volumes
        .iter()
        .find(|v| at(v, &format!("{source}.{name_key}")).as_str() == Some(name))
        .unwrap_or_else(|| panic!("a volume from {source} {name:?}"));
    let volume_name = str_at(volume, "name");
    let mounts = at(container(deployment), "volumeMounts")
        .as_sequence()
        .expect("volumeMounts");
    let mount = mounts
        .iter()
        .find(|m| at(m, "name").as_str() == Some(volume_name))
        .unwrap_or_else(|| panic!("volume {volume_name:?} is not mounted"));
    assert!(
        at(mount, "subPath").is_null(),
        "{volume_name}: a subPath mount is never updated when the {source} changes"
    );
    assert_eq!(at(mount, "readOnly").as_bool(), Some(true), "{volume_name}");
    str_at(mount, "mountPath").trim_end_matches('/').to_string()
}

/// Every `*_file` value of the config (key path, file path).
fn file_keys(table: &toml::Table, prefix: &str, out: &mut Vec<(String, String)>) {
    for (key, value) in table {
        let path = format!("{prefix}{key}");
        match value {
            toml::Value::String(s) if key.ends_with("_file") => out.push((path, s.clone())),
            toml::Value::Table(t) => file_keys(t, &format!("{path}."), out),
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let toml::Value::Table(t) = item {
                        file_keys(t, &format!("{path}[{i}]."), out);
                    }
                }
            }
            _ => {}
        }
    }
}

fn parse_toml(text: &str) -> toml::Table {
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("ConfigMap TOML: {e}"))
}

fn duration_key(server: Option<&toml::Value>, key: &str, default: Duration) -> Duration {
    match server.and_then(|s| s.get(key)) {
        None => default,
        Some(v) => humantime::parse_duration(v.as_str().expect("a duration string"))
            .unwrap_or_else(|e| panic!("server.{key}: {e}")),
    }
}

#[test]
fn kubernetes_manifests_pass_the_schemas_in_strict_mode() {
    let validator = tool(
        "TOKENGATE_KUBERNETES_VALIDATE",
        "kubernetes-validate",
        INSTALL_KUBERNETES_VALIDATE,
    );
    // kustomization.yaml is kustomize's own format, not a Kubernetes resource.
    let files: Vec<PathBuf> = manifest_files()
        .into_iter()
        .filter(|p| file_name(p) != "kustomization.yaml")
        .collect();
    assert!(files.len() >= 8, "manifests: {files:?}");
    let documents: usize = files.iter().map(|p| yaml_documents(p).len()).sum();
    let mut args = vec!["-k", KUBERNETES_VERSION, "--strict"];
    args.extend(files.iter().map(|p| p.to_str().expect("UTF-8 path")));
    let out = run(&validator, &args);
    let text = both(&out);
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    // A kind or apiVersion without a schema is only a warning to the validator; here it fails.
    assert!(
        !text.contains("WARN"),
        "kubernetes-validate warned:\n{text}"
    );
    let passed = text.lines().filter(|l| l.contains(" passed ")).count();
    assert_eq!(passed, documents, "every document validated:\n{text}");
}

#[test]
fn the_validator_rejects_a_manifest_with_an_unknown_field() {
    let validator = tool(
        "TOKENGATE_KUBERNETES_VALIDATE",
        "kubernetes-validate",
        INSTALL_KUBERNETES_VALIDATE,
    );
    let text = std::fs::read_to_string(kubernetes_dir().join("deployment.yaml")).unwrap();
    let broken = text.replacen("  replicas: 3\n", "  replicas: 3\n  replica: 3\n", 1);
    assert_ne!(broken, text);
    let dir = std::env::temp_dir().join(format!("tokengate-deploy-strict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("deployment.yaml");
    std::fs::write(&path, broken).unwrap();
    let out = run(
        &validator,
        &["-k", KUBERNETES_VERSION, "--strict", path.to_str().unwrap()],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "accepted:\n{}", both(&out));
    assert!(both(&out).contains("'replica'"), "{}", both(&out));
}

#[test]
fn kustomization_names_every_manifest_but_the_example_secret() {
    let kustomization = &yaml_documents(&kubernetes_dir().join("kustomization.yaml"))[0];
    assert_eq!(str_at(kustomization, "namespace"), "tokengate");
    let listed: BTreeSet<String> = at(kustomization, "resources")
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("resource path").to_string())
        .collect();
    let present: BTreeSet<String> = manifest_files()
        .iter()
        .map(|p| file_name(p).to_string())
        .filter(|n| n != "kustomization.yaml" && n != "secret.example.yaml")
        .collect();
    assert_eq!(listed, present);
    // Applying the manifests must never replace real credentials with placeholders.
    assert!(!listed.contains("secret.example.yaml"));
    for path in manifest_files() {
        for doc in yaml_documents(&path) {
            if at(&doc, "kind").as_str() != Some("Namespace")
                && file_name(&path) != "kustomization.yaml"
            {
                assert_eq!(
                    str_at(&doc, "metadata.namespace"),
                    "tokengate",
                    "{}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn deployment_runs_three_hardened_replicas_probed_on_the_admin_port() {
    let d = resource("Deployment");
    assert_eq!(at(&d, "spec.replicas").as_u64(), Some(3));
    assert_eq!(
        at(&d, "spec.strategy.rollingUpdate.maxUnavailable").as_u64(),
        Some(0)
    );

    let pod = at(&d, "spec.template.spec");
    assert_eq!(
        at(pod, "securityContext.runAsNonRoot").as_bool(),
        Some(true)
    );
    assert!(at(pod, "securityContext.runAsUser").as_u64().unwrap_or(0) > 0);
    assert_eq!(
        at(pod, "securityContext.seccompProfile.type").as_str(),
        Some("RuntimeDefault")
    );
    assert_eq!(
        at(pod, "automountServiceAccountToken").as_bool(),
        Some(false)
    );

    let c = container(&d);
    let sc = at(c, "securityContext");
    assert_eq!(at(sc, "allowPrivilegeEscalation").as_bool(), Some(false));
    assert_eq!(at(sc, "readOnlyRootFilesystem").as_bool(), Some(true));
    assert_eq!(at(sc, "runAsNonRoot").as_bool(), Some(true));
    assert_eq!(
        at(sc, "seccompProfile.type").as_str(),
        Some("RuntimeDefault")
    );
    let dropped: Vec<&str> = at(sc, "capabilities.drop")
        .as_sequence()
        .expect("capabilities.drop")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(dropped, ["ALL"]);
    assert!(at(sc, "capabilities.add").is_null());

    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !at(c, &format!("resources.{kind}.{resource}")).is_null(),
                "resources.{kind}.{resource}"
            );
        }
    }

    // The probes ask the admin listener the config binds.
    let (_, toml_text) = configmap_toml();
    let config = parse_toml(&toml_text);
    let admin: SocketAddr = config["server"]["admin_listen"]
        .as_str()
        .expect("server.admin_listen")
        .parse()
        .expect("an address");
    assert_eq!(container_port(c, "admin"), u64::from(admin.port()));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(str_at(c, &format!("{probe}.httpGet.path")), path, "{probe}");
        let port = at(c, &format!("{probe}.httpGet.port"));
        assert!(
            port.as_str() == Some("admin") || port.as_u64() == Some(u64::from(admin.port())),
            "{probe} asks port {port:?}, not the admin listener"
        );
    }
}

#[test]
fn termination_grace_period_outlasts_shutdown_delay_and_grace_period() {
    let d = resource("Deployment");
    let termination = Duration::from_secs(
        at(&d, "spec.template.spec.terminationGracePeriodSeconds")
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );
    let (_, toml_text) = configmap_toml();
    let config = parse_toml(&toml_text);
    let server = config.get("server");
    let shutdown_delay = duration_key(server, "shutdown_delay", DEFAULT_SHUTDOWN_DELAY);
    // grace_period's default is the one the config loader applies.
    let loaded = load_with_test_secrets(&toml_text);
    let grace_period = duration_key(server, "grace_period", loaded.server.grace_period);
    assert_eq!(grace_period, loaded.server.grace_period);
    assert!(
        termination > shutdown_delay + grace_period,
        "terminationGracePeriodSeconds {termination:?} must exceed shutdown_delay \
         {shutdown_delay:?} + grace_period {grace_period:?}"
    );
}

/// A directory of stand-in credential files for the ConfigMap's config, under the same names
/// the Secret uses: the sandbox demo key (conf/demo/) and fixed strings.
struct TestSecrets {
    dir: PathBuf,
}

impl TestSecrets {
    fn new(name: &str) -> TestSecrets {
        // One directory per instance: tests run in parallel and each removes its own.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "tokengate-deploy-{name}-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/demo");
        for key in example_secret_keys() {
            let content = if key.ends_with(".json") {
                std::fs::read_to_string(conf.join("drillster-key.json")).unwrap()
            } else {
                format!("{key}-for-tests\n")
            };
            std::fs::write(dir.join(&key), content).unwrap();
        }
        TestSecrets { dir }
    }
}

impl Drop for TestSecrets {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The keys of the example Secret (the file names the Secret volume holds).
pub(super) fn example_secret_keys() -> BTreeSet<String> {
    let secret = resource("Secret");
    let mut keys = BTreeSet::new();
    for field in ["stringData", "data"] {
        if let Some(map) = at(&secret, field).as_mapping() {
            keys.extend(map.keys().map(|k| k.as_str().expect("key").to_string()));
        }
    }
    keys
}

/// Where the Deployment mounts the Secret (no trailing `/`).
pub(super) fn secret_mount_dir() -> String {
    let secret_name = str_at(&resource("Secret"), "metadata.name").to_string();
    mount_path_of(
        &resource("Deployment"),
        "secret",
        "secretName",
        &secret_name,
    )
}

/// The ConfigMap's TOML with the Secret's mount path replaced by `dir`.
fn with_secrets_in(toml_text: &str, dir: &Path) -> String {
    let mount = secret_mount_dir();
    let replaced = toml_text.replace(&format!("{mount}/"), &format!("{}/", dir.display()));
    assert_ne!(
        replaced, toml_text,
        "the config names no file under {mount}"
    );
    replaced
}

fn load_with_test_secrets(toml_text: &str) -> tokengate::config::Config {
    let secrets = TestSecrets::new("load");
    let text = with_secrets_in(toml_text, &secrets.dir);
    tokengate::config::Config::from_toml_str(&text, None, &|_| None)
        .unwrap_or_else(|e| panic!("ConfigMap config:\n{e}"))
}

#[test]
fn configmap_config_passes_tokengate_check_with_the_secret_files() {
    let (_, toml_text) = configmap_toml();
    let secrets = TestSecrets::new("check");
    let path = secrets.dir.join("tokengate.toml");
    std::fs::write(&path, with_secrets_in(&toml_text, &secrets.dir)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["check", "-c", path.to_str().unwrap()])
        .env_clear()
        .output()
        .expect("run tokengate check");
    assert!(out.status.success(), "tokengate check:\n{}", both(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(": OK (2 routes)"),
        "{}",
        both(&out)
    );

    // The check can fail: without the key file it names the key.
    std::fs::remove_file(secrets.dir.join("drillster-key.json")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["check", "-c", path.to_str().unwrap()])
        .env_clear()
        .output()
        .expect("run tokengate check");
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        both(&out).contains("routes[0].auth.key_file"),
        "{}",
        both(&out)
    );
}

#[test]
fn config_files_secret_keys_and_mounts_agree() {
    let d = resource("Deployment");
    let (key, toml_text) = configmap_toml();
    let config_name = str_at(&resource("ConfigMap"), "metadata.name").to_string();
    let config_dir = mount_path_of(&d, "configMap", "name", &config_name);
    // The container runs the ConfigMap's file.
    let args: Vec<&str> = at(container(&d), "args")
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args, ["run", "-c", &format!("{config_dir}/{key}")]);

    // Every file the config reads is a key of the Secret, where the Secret is mounted, and
    // every key of the Secret is read.
    let secret_name = str_at(&resource("Secret"), "metadata.name").to_string();
    let secret_dir = mount_path_of(&d, "secret", "secretName", &secret_name);
    let mut files = Vec::new();
    file_keys(&parse_toml(&toml_text), "", &mut files);
    let keys = example_secret_keys();
    let mut read = BTreeSet::new();
    for (config_key, path) in &files {
        let name = path
            .strip_prefix(&format!("{secret_dir}/"))
            .unwrap_or_else(|| panic!("{config_key} = {path:?} is not under {secret_dir}"));
        assert!(
            keys.contains(name),
            "{config_key}: the Secret has no key {name:?}"
        );
        read.insert(name.to_string());
    }
    assert_eq!(read, keys, "Secret keys the config does not read");
    // Secrets come from files, which SIGHUP reads again; `${VAR}` from the pod's environment
    // would need a restart to change.
    assert!(!toml_text.contains("${"), "the config uses ${{VAR}}");
}

#[test]
fn configmap_binds_every_interface_and_admits_the_pod_network() {
    let d = resource("Deployment");
    let c = container(&d);
    let (_, toml_text) = configmap_toml();
    let config = load_with_test_secrets(&toml_text);
    let listen = &config.server.listen;
    assert_eq!(listen.len(), 1, "{listen:?}");
    assert!(listen[0].ip().is_unspecified(), "{listen:?}");
    assert!(config.server.admin_listen.ip().is_unspecified());
    assert_eq!(container_port(c, "proxy"), u64::from(listen[0].port()));
    // The pod network, not loopback only: clients connect from their pods' addresses.
    let allowed = &config.server.allowed_clients;
    assert!(
        allowed.iter().any(|net| !net.addr().is_loopback()),
        "allowed_clients admits loopback only: {allowed:?}"
    );
    let pod_address: std::net::IpAddr = "10.244.1.7".parse().unwrap();
    assert!(allowed.iter().any(|net| net.contains(&pod_address)));
}

#[test]
fn network_policy_admits_client_namespaces_to_the_proxy_and_prometheus_to_admin() {
    let policy = resource("NetworkPolicy");
    let d = resource("Deployment");
    assert_eq!(
        at(&policy, "spec.podSelector.matchLabels"),
        at(&d, "spec.selector.matchLabels")
    );
    let types: Vec<&str> = at(&policy, "spec.policyTypes")
        .as_sequence()
        .expect("policyTypes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(types.contains(&"Ingress"));
    let rules = at(&policy, "spec.ingress").as_sequence().expect("ingress");
    let mut ports_seen = BTreeSet::new();
    for rule in rules {
        // Every rule names its peers and its ports: none admits everyone or every port.
        let peers = at(rule, "from").as_sequence().expect("a rule without from");
        let ports = at(rule, "ports")
            .as_sequence()
            .expect("a rule without ports");
        assert!(!peers.is_empty() && !ports.is_empty());
        for peer in peers {
            let ns = at(peer, "namespaceSelector.matchLabels")
                .as_mapping()
                .expect("peers are chosen by namespace label");
            assert!(!ns.is_empty());
            assert!(at(peer, "ipBlock").is_null());
        }
        let port_names: Vec<&str> = ports
            .iter()
            .filter_map(|p| at(p, "port").as_str())
            .collect();
        assert_eq!(port_names.len(), 1, "{ports:?}");
        if port_names == ["admin"] {
            for peer in peers {
                assert!(
                    at(peer, "podSelector.matchLabels").as_mapping().is_some(),
                    "the admin port is for the Prometheus pods only"
                );
            }
        }
        ports_seen.insert(port_names[0].to_string());
    }
    assert_eq!(
        ports_seen,
        BTreeSet::from(["admin".to_string(), "proxy".to_string()])
    );
}

#[test]
fn service_exposes_the_proxy_port_only_and_the_budget_keeps_two_replicas() {
    let service = resource("Service");
    let d = resource("Deployment");
    assert_eq!(
        at(&service, "spec.selector"),
        at(&d, "spec.selector.matchLabels")
    );
    let ports = at(&service, "spec.ports").as_sequence().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(str_at(&ports[0], "targetPort"), "proxy");

    let pdb = resource("PodDisruptionBudget");
    assert_eq!(
        at(&pdb, "spec.selector.matchLabels"),
        at(&d, "spec.selector.matchLabels")
    );
    assert_eq!(at(&pdb, "spec.maxUnavailable").as_u64(), Some(1));
}
