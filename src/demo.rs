//! `tokengate demo`: the embedded default. Starts the sandbox (a Drillster-like and a
//! Driftrock-like authorization server and an echo API, all on loopback) and a gateway in front
//! of them, prints `curl` lines to try, and runs until Ctrl-C (or SIGTERM, SIGHUP, SIGQUIT).
//! Nothing leaves the machine.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigErrors};
use crate::gateway::{GatewayHandle, StartError};
use tokengate_sandbox::{keys, Sandbox, SandboxError};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Runtime, file or signal trouble.
    #[error("{0}")]
    Io(String),
    /// A sandbox server failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The generated config did not validate (a bug).
    #[error("demo config: {0}")]
    Config(#[from] ConfigErrors),
    /// The gateway did not start.
    #[error(transparent)]
    Start(#[from] StartError),
}

/// The users the demo's sandbox manages besides its service account ("Drillster: Service
/// accounts": tokens may be issued for any account the organisation manages); the demo's
/// `[routes.subjects]` allows them.
pub const DEMO_USERS: &[&str] = &["ann@example.com", "bob@example.com"];

/// The demo's gateway config for a running sandbox: route `drillster` (JWT bearer grant) under
/// `/drillster/` and route `driftrock` (client credentials, form-encoded Basic) under
/// `/driftrock/`, both stripping their prefix and forwarding to the sandbox API.
/// `key_file` is the path of the demo key file.
pub fn config_toml(
    sandbox: &Sandbox,
    listen: SocketAddr,
    admin: SocketAddr,
    key_file: &Path,
) -> String {
    config_text(sandbox, listen, admin, key_file, None)
}

/// [`config_toml`] with per-user tokens (docs/per-user-tokens.md): a token listener at
/// `token_listen` for loopback clients, and `[routes.subjects]` on the `drillster` route
/// allowing e-mail addresses at `example.com` (the [`DEMO_USERS`]), named on the proxy
/// listener with the `Tokengate-Subject` field by loopback clients.
pub fn config_toml_with_subjects(
    sandbox: &Sandbox,
    listen: SocketAddr,
    admin: SocketAddr,
    token_listen: SocketAddr,
    key_file: &Path,
) -> String {
    config_text(sandbox, listen, admin, key_file, Some(token_listen))
}

fn config_text(
    sandbox: &Sandbox,
    listen: SocketAddr,
    admin: SocketAddr,
    key_file: &Path,
    token_listen: Option<SocketAddr>,
) -> String {
    let (server_extra, subjects) = match token_listen {
        Some(t) => (
            format!("token_listen = \"{t}\"\ntoken_clients = [\"127.0.0.0/8\", \"::1/128\"]\n"),
            concat!(
                "\n[routes.subjects]\n",
                "allow = [\"[^@]+@example\\\\.com\"]\n",
                "header = \"Tokengate-Subject\"\n",
                "header_clients = [\"127.0.0.0/8\", \"::1/128\"]\n",
                "max_cached = 1000\n",
            ),
        ),
        None => (String::new(), ""),
    };
    format!(
        r#"# tokengate demo configuration (sandbox only: every credential here is public)
[server]
listen = "{listen}"
admin_listen = "{admin}"
grace_period = "0s"
{server_extra}
[log]
level = "info"

[[routes]]
name = "drillster"
path_prefix = "/drillster"
strip_prefix = true
upstream = "{api}"

[routes.auth]
grant = "jwt_bearer"
token_endpoint = "{drillster}"
client_id = "{drillster_id}"
client_secret = "{drillster_secret}"
key_file = "{key_file}"
{subjects}
[[routes]]
name = "driftrock"
path_prefix = "/driftrock"
strip_prefix = true
upstream = "{api}"

[routes.auth]
grant = "client_credentials"
token_endpoint = "{driftrock}"
client_id = "{driftrock_id}"
client_secret = "{driftrock_secret}"
"#,
        api = sandbox.api.base_url(),
        drillster = sandbox.drillster.token_endpoint(),
        drillster_id = keys::DRILLSTER_CLIENT_ID,
        drillster_secret = keys::DRILLSTER_CLIENT_SECRET,
        key_file = key_file.display(),
        driftrock = sandbox.driftrock.token_endpoint(),
        driftrock_id = keys::DRIFTROCK_CLIENT_ID,
        driftrock_secret = keys::DRIFTROCK_CLIENT_SECRET,
    )
}

/// The `curl` lines the demo prints; the first answers 200 with the sandbox API's echo. The
/// two with `ann@example.com` fetch a managed user's access token from the token listener (as
/// a backend does to start Drillster's embedded Player for that user) and call the sandbox API
/// as that user through the proxy listener (the echo's `subject` is the user).
pub fn curl_lines(listen: SocketAddr, admin: SocketAddr, token_listen: SocketAddr) -> Vec<String> {
    let user = DEMO_USERS[0];
    vec![
        format!(
            "curl -s -H 'Authorization: Basic bGVnYWN5OnBhc3N3b3Jk' http://{listen}/drillster/api/2.1.1/user"
        ),
        format!(
            "curl -s -X POST -H 'Cookie: session=legacy' -d '{{\"event\":\"demo\"}}' 'http://{listen}/driftrock/v2/event?access_token=leaked&page=2'"
        ),
        format!("curl -s 'http://{token_listen}/v1/token/drillster?subject={user}'"),
        format!(
            "curl -s -H 'Tokengate-Subject: {user}' http://{listen}/drillster/api/2.1.1/user"
        ),
        format!("curl -s http://{listen}/elsewhere"),
        format!("curl -s http://{admin}/status"),
        format!("curl -s http://{admin}/metrics | grep '^tokengate_token'"),
    ]
}

/// A sandbox, its demo config and a gateway in front of it, all running.
pub struct Demo {
    /// The sandbox servers.
    pub sandbox: Sandbox,
    /// The gateway.
    pub gateway: GatewayHandle,
    /// Where the generated config and key file were written; removed on drop.
    pub dir: DemoDir,
}

/// The demo's scratch directory (config and a copy of the public sandbox key), removed on drop.
pub struct DemoDir(PathBuf);

impl DemoDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Demo {
    /// Starts everything on `runtime`. `listen`/`admin`/`token_listen` default to
    /// 127.0.0.1:8080/9090/9091, or ephemeral ports when those are taken. The sandbox's
    /// Drillster-like server manages [`DEMO_USERS`].
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        listen: Option<SocketAddr>,
        admin: Option<SocketAddr>,
        token_listen: Option<SocketAddr>,
    ) -> Result<Demo, DemoError> {
        let sandbox = runtime.block_on(Sandbox::start())?;
        let mut managed = vec![keys::DEMO_SERVICE_ACCOUNT_ID];
        managed.extend_from_slice(DEMO_USERS);
        sandbox.drillster.set_managed_users(Some(&managed));
        let dir = std::env::temp_dir().join(format!("tokengate-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| DemoError::Io(format!("{}: {e}", dir.display())))?;
        let dir = DemoDir(dir);
        let key_file = dir.path().join("drillster-key.json");
        write_private(&key_file, keys::DEMO_KEY_JSON)?;
        let listen = listen.unwrap_or_else(|| free_or_ephemeral("127.0.0.1:8080"));
        let admin = admin.unwrap_or_else(|| free_or_ephemeral("127.0.0.1:9090"));
        let token_listen = token_listen.unwrap_or_else(|| free_or_ephemeral("127.0.0.1:9091"));
        let toml = config_toml_with_subjects(&sandbox, listen, admin, token_listen, &key_file);
        let config_path = dir.path().join("tokengate-demo.toml");
        write_private(&config_path, &toml)?;
        let config = Config::from_toml_str(&toml, Some(&config_path), &|_| None)?;
        let gateway = GatewayHandle::start(config)?;
        Ok(Demo {
            sandbox,
            gateway,
            dir,
        })
    }
}

/// Runs the demo until Ctrl-C (SIGINT), SIGTERM, SIGHUP or SIGQUIT, then stops everything and
/// removes its scratch directory.
pub fn run(
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    token_listen: Option<SocketAddr>,
) -> Result<(), DemoError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| DemoError::Io(format!("runtime: {e}")))?;
    // SIGTERM (`kill`, a container stop), SIGHUP (the terminal closed) and SIGQUIT (what
    // `run` takes as a graceful stop) end the demo like Ctrl-C, so the scratch directory is
    // removed either way; listened for from the start, so none is missed.
    let (mut term, mut hup, mut quit) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _entered = runtime.enter();
        let stop = |kind| signal(kind).map_err(|e| DemoError::Io(format!("signal: {e}")));
        (
            stop(SignalKind::terminate())?,
            stop(SignalKind::hangup())?,
            stop(SignalKind::quit())?,
        )
    };
    let demo = Demo::start(&runtime, listen, admin, token_listen)?;
    let listen = demo.gateway.listen[0];
    let admin = demo.gateway.admin;
    let token_listen = demo.gateway.token.unwrap_or(listen);
    let mut banner = format!(
        "\ntokengate demo is running (sandbox only; nothing leaves this machine)\n\
         \x20 gateway        http://{listen}  (routes /drillster/ and /driftrock/)\n\
         \x20 admin          http://{admin}   (/metrics /healthz /readyz /status)\n\
         \x20 token listener http://{token_listen}  (/v1/token/drillster?subject=…; users {})\n\
         \x20 Drillster-like token endpoint  {}\n\
         \x20 Driftrock-like token endpoint  {}\n\
         \x20 sandbox API    {}\n\
         \x20 config         {}\n\n\
         Try (the API echoes what it received: your Authorization, Cookie and access_token are \
         gone, the gateway's Bearer token is there; as a user, the token's subject is that user):\n",
        DEMO_USERS.join(", "),
        demo.sandbox.drillster.token_endpoint(),
        demo.sandbox.driftrock.token_endpoint(),
        demo.sandbox.api.base_url(),
        demo.dir.path().join("tokengate-demo.toml").display()
    );
    for line in curl_lines(listen, admin, token_listen) {
        banner.push_str("  ");
        banner.push_str(&line);
        banner.push('\n');
    }
    banner.push_str("\nCtrl-C to stop.\n");
    // A closed standard output (`tokengate demo | head`) does not stop the demo.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), banner.as_bytes());
    runtime
        .block_on(async {
            tokio::select! {
                r = tokio::signal::ctrl_c() => r,
                _ = term.recv() => Ok(()),
                _ = hup.recv() => Ok(()),
                _ = quit.recv() => Ok(()),
            }
        })
        .map_err(|e| DemoError::Io(format!("signal: {e}")))?;
    let Demo {
        sandbox,
        gateway,
        dir,
    } = demo;
    gateway.shutdown();
    drop(dir);
    runtime.block_on(sandbox.shutdown())?;
    Ok(())
}

fn free_or_ephemeral(preferred: &str) -> SocketAddr {
    let bind = |a: &str| TcpListener::bind(a).and_then(|l| l.local_addr());
    bind(preferred)
        .or_else(|_| bind("127.0.0.1:0"))
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

fn write_private(path: &Path, content: &str) -> Result<(), DemoError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| DemoError::Io(format!("{}: {e}", path.display())))?;
    f.write_all(content.as_bytes())
        .map_err(|e| DemoError::Io(format!("{}: {e}", path.display())))
}
