//! Fleet mode (`[cluster]`, docs/fleet.md): three `tokengate run` processes sharing one real
//! `redis-server` in front of one sandbox — one token request per credential identity and
//! renewal for the whole fleet, a fleet-wide answer to "each new token revokes the client's
//! earlier ones", and no request failing when Redis dies, comes back empty, or a replica dies
//! holding the lease.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use tokengate_sandbox::Sandbox;

use super::common::{demo_key_path, eventually, free_addr};

/// One fleet test at a time: each runs several gateway processes under load, and two at once
/// would starve the timing-sensitive tests running beside them.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `redis-server` of the test's own on a free loopback port, no persistence; killed on drop.
struct Redis {
    port: u16,
    child: Option<Child>,
    /// TLS only (`--tls-port`), with these extra arguments.
    tls: Option<Vec<String>>,
}

impl Redis {
    fn start() -> Redis {
        let mut r = Redis {
            port: free_addr().port(),
            child: None,
            tls: None,
        };
        r.spawn();
        r
    }

    /// TLS only, with the certificate chain and key files given, requiring `password`.
    fn start_tls(cert: &Path, key: &Path, password: &str) -> Redis {
        let tls = [
            "--tls-cert-file",
            &cert.display().to_string(),
            "--tls-key-file",
            &key.display().to_string(),
            "--tls-ca-cert-file",
            &cert.display().to_string(),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            password,
        ]
        .map(String::from)
        .to_vec();
        let mut r = Redis {
            port: free_addr().port(),
            child: None,
            tls: Some(tls),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some(tls) => cmd.args(["--port", "0", "--tls-port", &port]).args(tls),
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match self.tls {
                None => self.pong(),
                Some(_) => std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            };
            if up {
                break;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it answers `PING`.
    fn pong(&self) -> bool {
        self.command("PING").is_some_and(|r| r.starts_with("+PONG"))
    }

    /// One inline command's first reply line, over a plain TCP connection.
    fn command(&self, line: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{line}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).to_string())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (no shutdown, no save): its data is gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new, empty server on the same port.
    fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A temporary directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let p = std::env::temp_dir().join(format!(
            "tokengate-fleet-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `tokengate run` process; killed on drop.
struct Replica {
    child: Option<Child>,
    listen: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Replica {
    /// Starts a replica in front of `sandbox`, in the fleet at `redis` when given.
    fn start(
        dir: &Path,
        n: usize,
        sandbox: &Sandbox,
        redis: Option<&str>,
        extra_auth: &str,
    ) -> Replica {
        Self::start_as(dir, n, sandbox, redis, extra_auth, false, &[])
    }

    /// [`Replica::start`]; `subjects`: with per-user tokens on the `drillster` route (named by
    /// the `Tokengate-Subject` field).
    fn start_as(
        dir: &Path,
        n: usize,
        sandbox: &Sandbox,
        redis: Option<&str>,
        extra_auth: &str,
        subjects: bool,
        env: &[(&str, &str)],
    ) -> Replica {
        let (listen, admin) = (free_addr(), free_addr());
        let base = if subjects {
            tokengate::demo::config_toml_with_subjects(
                sandbox,
                listen,
                admin,
                free_addr(),
                &demo_key_path(),
            )
        } else {
            tokengate::demo::config_toml(sandbox, listen, admin, &demo_key_path())
        };
        let mut toml = base.replace("[routes.auth]\n", &format!("[routes.auth]\n{extra_auth}\n"));
        toml = toml.replace("[server]\n", "[server]\nthreads = 1\n");
        if let Some(url) = redis {
            let key = dir.join("cluster.key");
            if !key.exists() {
                let bytes: [u8; 32] = rand::random();
                std::fs::write(
                    &key,
                    base64::engine::general_purpose::STANDARD.encode(bytes),
                )
                .expect("key file");
            }
            toml.push_str(&format!(
                "\n[cluster]\nredis = \"{url}\"\nencryption_key_file = \"{}\"\ntimeout = \"1s\"\n",
                key.display()
            ));
        }
        let config = dir.join(format!("replica-{n}.toml"));
        std::fs::write(&config, toml).expect("config");
        let log = dir.join(format!("replica-{n}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["run", "-c"])
            .arg(&config)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("tokengate run");
        Replica {
            child: Some(child),
            listen,
            admin,
            log,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", self.admin))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.ok()?))
    }

    async fn listening(&self) -> bool {
        self.get("/healthz").await.is_some_and(|(s, _)| s == 200)
    }

    async fn ready(&self) -> bool {
        self.get("/readyz").await.is_some_and(|(s, _)| s == 200)
    }

    /// The sum of the samples of `name` whose labels contain every one of `labels`.
    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let Some((_, text)) = self.get("/metrics").await else {
            return 0.0;
        };
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `n` replicas at once (no waiting in between) and waits until each listens.
async fn start_fleet(
    dir: &Dir,
    n: usize,
    sandbox: &Sandbox,
    redis: Option<&str>,
    extra_auth: &str,
) -> Vec<Replica> {
    let replicas: Vec<Replica> = (0..n)
        .map(|i| Replica::start(&dir.0, i, sandbox, redis, extra_auth))
        .collect();
    for r in &replicas {
        eventually(Duration::from_secs(20), "replica listens", || r.listening()).await;
    }
    replicas
}

/// Token requests the sandbox received, both routes together.
fn token_requests(sandbox: &Sandbox) -> u64 {
    sandbox.drillster.requests() + sandbox.driftrock.requests()
}

/// Requests sent and failed by a [`Load`].
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    failed: AtomicU64,
}

/// Steady requests to every replica (both routes) until stopped.
struct Load {
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `per_replica` sequential clients per replica, each pausing `pause` between requests.
    fn start(replicas: &[Replica], per_replica: usize, pause: Duration) -> Load {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let client = reqwest::Client::new();
        let mut tasks = Vec::new();
        for r in replicas {
            for i in 0..per_replica {
                let (tally, stop, client) = (tally.clone(), stop.clone(), client.clone());
                let base = format!("http://{}", r.listen);
                tasks.push(tokio::spawn(async move {
                    let mut n = i;
                    while !stop.load(Ordering::Relaxed) {
                        let route = if n.is_multiple_of(2) {
                            "drillster"
                        } else {
                            "driftrock"
                        };
                        n += 1;
                        let ok = client
                            .get(format!("{base}/{route}/fleet"))
                            .timeout(Duration::from_secs(10))
                            .send()
                            .await
                            .is_ok_and(|r| r.status() == 200);
                        tally.sent.fetch_add(1, Ordering::Relaxed);
                        if !ok {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(pause).await;
                    }
                }));
            }
        }
        Load { tally, stop, tasks }
    }

    /// Stops and returns (sent, failed).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.tally.sent.load(Ordering::Relaxed),
            self.tally.failed.load(Ordering::Relaxed),
        )
    }
}

/// Sends `total` requests at once, spread over the replicas and both routes; the failures.
async fn burst(replicas: &[Replica], total: usize) -> u64 {
    let client = reqwest::Client::new();
    let calls = (0..total).map(|i| {
        let base = format!("http://{}", replicas[i % replicas.len()].listen);
        let route = if (i / replicas.len()).is_multiple_of(2) {
            "drillster"
        } else {
            "driftrock"
        };
        let client = client.clone();
        async move {
            client
                .get(format!("{base}/{route}/burst"))
                .timeout(Duration::from_secs(20))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    });
    let results = futures_util::future::join_all(calls).await;
    results.iter().filter(|ok| !**ok).count() as u64
}

fn logs(replicas: &[Replica]) -> String {
    replicas
        .iter()
        .enumerate()
        .map(|(i, r)| format!("--- replica {i}\n{}", r.log_text()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_cold_start_makes_one_token_request_per_route() {
    let _one = ONE_AT_A_TIME.lock().await;
    let sandbox = Sandbox::start().await.expect("sandbox");
    let redis = Redis::start();
    let dir = Dir::new();
    let replicas = start_fleet(&dir, 3, &sandbox, Some(&redis.url()), "").await;
    let failed = burst(&replicas, 300).await;
    assert_eq!(failed, 0, "{}", logs(&replicas));
    assert_eq!(
        (sandbox.drillster.requests(), sandbox.driftrock.requests()),
        (1, 1),
        "one token request per route for three replicas\n{}",
        logs(&replicas)
    );
    // The two that did not fetch adopted the published token.
    let adopted = logs(&replicas)
        .matches("access token adopted from the fleet")
        .count();
    assert_eq!(adopted, 4, "{}", logs(&replicas));
    // Stored encrypted: two identities, and no token in the stored bytes.
    let keys = redis.command("KEYS tokengate:token:*").unwrap_or_default();
    let keys: Vec<&str> = keys
        .lines()
        .filter(|l| l.starts_with("tokengate:token:"))
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in keys {
        let stored = redis.command(&format!("GET {key}")).unwrap_or_default();
        assert!(stored.len() > 100, "{key}: {stored:?}");
        for token in sandbox.registry.issued_tokens() {
            assert!(!stored.contains(&token), "{key} holds a token in the clear");
        }
    }
    let (_, status) = replicas[0].get("/status").await.expect("status");
    assert!(status.contains("\"fleet\""), "{status}");
    assert!(status.contains("\"store_up\":true"), "{status}");
    for token in sandbox.registry.issued_tokens() {
        assert!(!status.contains(&token));
    }
    assert_eq!(replicas[0].metric("tokengate_cluster_up", &[]).await, 1.0);
}

/// `rediss://` with a password from the environment: replicas trusting the server's CA (through
/// `SSL_CERT_FILE`, read by the system trust store loader) share one token over TLS, and the
/// password is in no log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_over_tls_with_a_password() {
    let _one = ONE_AT_A_TIME.lock().await;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let dir = Dir::new();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "tokengate fleet test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf.use_authority_key_identifier_extension = true;
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let (ca_path, cert_path, key_path) = (
        dir.0.join("ca.pem"),
        dir.0.join("redis.pem"),
        dir.0.join("redis.key"),
    );
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    std::fs::write(&cert_path, format!("{}{}", leaf_cert.pem(), ca_cert.pem())).unwrap();
    std::fs::write(&key_path, leaf_key.serialize_pem()).unwrap();
    let password = "fleet-test-password-9f3b";
    let redis = Redis::start_tls(&cert_path, &key_path, password);
    let sandbox = Sandbox::start().await.expect("sandbox");
    let url = format!("rediss://:${{REDIS_PASSWORD}}@127.0.0.1:{}/0", redis.port);
    let ca = ca_path.display().to_string();
    let env = [("SSL_CERT_FILE", ca.as_str()), ("REDIS_PASSWORD", password)];
    let replicas: Vec<Replica> = (0..2)
        .map(|i| Replica::start_as(&dir.0, i, &sandbox, Some(&url), "", false, &env))
        .collect();
    for r in &replicas {
        eventually(Duration::from_secs(20), "replica ready", || r.ready()).await;
    }
    assert_eq!(burst(&replicas, 40).await, 0, "{}", logs(&replicas));
    assert_eq!(
        (sandbox.drillster.requests(), sandbox.driftrock.requests()),
        (1, 1),
        "one token request per route over TLS\n{}",
        logs(&replicas)
    );
    assert_eq!(replicas[0].metric("tokengate_cluster_up", &[]).await, 1.0);
    let (_, status) = replicas[0].get("/status").await.expect("status");
    assert!(!status.contains(password), "{status}");
    assert!(!logs(&replicas).contains(password));
}

/// The shared token is revoked: whichever replicas meet the upstream's 401 drop that
/// generation fleet-wide, one token request per route replaces it, and every request succeeds
/// (replayed with the new token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_is_answered_by_one_refresh_for_the_fleet() {
    let _one = ONE_AT_A_TIME.lock().await;
    let sandbox = Sandbox::start().await.expect("sandbox");
    let redis = Redis::start();
    let dir = Dir::new();
    let replicas = start_fleet(&dir, 3, &sandbox, Some(&redis.url()), "").await;
    for r in &replicas {
        eventually(Duration::from_secs(20), "replica ready", || r.ready()).await;
    }
    assert_eq!(token_requests(&sandbox), 2);
    assert_eq!(sandbox.registry.revoke_all(), 2);
    let failed = burst(&replicas, 120).await;
    assert_eq!(failed, 0, "{}", logs(&replicas));
    assert_eq!(
        (sandbox.drillster.requests(), sandbox.driftrock.requests()),
        (2, 2),
        "one refresh per route for the fleet\n{}",
        logs(&replicas)
    );
    let mut replayed = 0.0;
    for r in &replicas {
        replayed += r
            .metric(
                "tokengate_upstream_unauthorized_total",
                &["action=\"replayed\""],
            )
            .await;
    }
    assert!(
        replayed >= 3.0,
        "each replica met the revoked token: {replayed}"
    );
}

/// Per-user tokens are credential identities of their own: three replicas asked for one
/// managed user at once make one token request for that user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_shares_per_user_tokens() {
    let _one = ONE_AT_A_TIME.lock().await;
    let sandbox = Sandbox::start().await.expect("sandbox");
    let redis = Redis::start();
    let dir = Dir::new();
    let replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::start_as(&dir.0, i, &sandbox, Some(&redis.url()), "", true, &[]))
        .collect();
    for r in &replicas {
        eventually(Duration::from_secs(20), "replica ready", || r.ready()).await;
    }
    let user = tokengate::demo::DEMO_USERS[0];
    let client = reqwest::Client::new();
    let calls = (0..60).map(|i| {
        let url = format!("http://{}/drillster/me", replicas[i % 3].listen);
        let client = client.clone();
        async move {
            client
                .get(url)
                .header("Tokengate-Subject", user)
                .timeout(Duration::from_secs(20))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    });
    let ok = futures_util::future::join_all(calls).await;
    assert!(ok.iter().all(|ok| *ok), "{}", logs(&replicas));
    let for_user = sandbox
        .drillster
        .recent_requests()
        .iter()
        .filter(|r| {
            r.assertion_claims()
                .is_some_and(|c| c["sub"].as_str() == Some(user))
        })
        .count();
    assert_eq!(for_user, 1, "{}", logs(&replicas));
    assert_eq!(
        sandbox.drillster.requests(),
        2,
        "the route's own and the user's"
    );
}

/// A sandbox whose tokens live 5 s, so a test sees several renewals.
async fn five_second_tokens() -> Sandbox {
    Sandbox::builder()
        .token_lifetime(Duration::from_secs(5))
        .start()
        .await
        .expect("sandbox")
}

/// Tokens live 4–5 s and are renewed at 72–80 % of that: over 60 s each route sees about 15–20
/// token requests from the whole fleet (one per renewal), not three times that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_renews_once_per_renewal_without_failed_requests() {
    let _one = ONE_AT_A_TIME.lock().await;
    let sandbox = five_second_tokens().await;
    let redis = Redis::start();
    let dir = Dir::new();
    let replicas = start_fleet(&dir, 3, &sandbox, Some(&redis.url()), "").await;
    for r in &replicas {
        eventually(Duration::from_secs(20), "replica ready", || r.ready()).await;
    }
    let before = token_requests(&sandbox);
    let started = Instant::now();
    let load = Load::start(&replicas, 2, Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (sent, failed) = load.finish().await;
    let elapsed = started.elapsed().as_secs_f64();
    let renewals = token_requests(&sandbox) - before;
    // The sandbox's `exp` is whole seconds, so a token lives 4–5 s and is renewed at 72–80 %
    // of that: at most one renewal per 2.8 s per route, plus one in flight. Three replicas
    // renewing alone would make three times as many.
    let bound = 2 * ((elapsed / 2.8).ceil() as u64 + 1);
    eprintln!("fleet renewal: {renewals} token requests in {elapsed:.1} s (bound {bound}), {sent} requests");
    assert!(sent > 300, "load ran: {sent}");
    assert_eq!(failed, 0, "{failed} of {sent} failed\n{}", logs(&replicas));
    assert!(
        renewals <= bound && renewals >= 2 * 3,
        "{renewals} token requests in {elapsed:.1} s for two routes (bound {bound})\n{}",
        logs(&replicas)
    );
}

/// The sandbox revokes a client's earlier tokens whenever it issues a new one. Three replicas
/// sharing one token do not fight; three on their own revoke each other's in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_survives_a_server_that_revokes_earlier_tokens_and_lone_replicas_do_not() {
    let _one = ONE_AT_A_TIME.lock().await;
    async fn run(redis: Option<&str>) -> (u64, u64, u64, f64) {
        let sandbox = five_second_tokens().await;
        sandbox.registry.set_revoke_previous(true);
        let dir = Dir::new();
        let replicas = start_fleet(&dir, 3, &sandbox, redis, "").await;
        let before = token_requests(&sandbox);
        let load = Load::start(&replicas, 2, Duration::from_millis(50));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (sent, failed) = load.finish().await;
        let mut unauthorized = 0.0;
        for r in &replicas {
            unauthorized += r.metric("tokengate_upstream_unauthorized_total", &[]).await;
        }
        if redis.is_some() {
            assert_eq!(failed, 0, "{failed} of {sent} failed\n{}", logs(&replicas));
        }
        (
            sent,
            failed,
            token_requests(&sandbox) - before,
            unauthorized,
        )
    }
    let redis = Redis::start();
    let (sent, _, fleet_tokens, fleet_401) = run(Some(&redis.url())).await;
    assert!(sent > 200, "load ran: {sent}");
    let (alone_sent, alone_failed, alone_tokens, alone_401) = run(None).await;
    eprintln!(
        "revoking server: fleet {fleet_tokens} token requests, {fleet_401} upstream 401s of {sent}; \
         alone {alone_tokens} token requests, {alone_401} upstream 401s, {alone_failed} failed of {alone_sent}"
    );
    assert!(alone_sent > 0);
    // On their own, every token a replica obtains revokes the two others' tokens: upstream
    // 401s and token requests pile up far beyond the fleet's.
    assert!(
        alone_401 >= 2.0 * fleet_401.max(1.0) && alone_tokens > 2 * fleet_tokens,
        "alone: {alone_tokens} token requests, {alone_401} upstream 401s, {alone_failed} failed; \
         fleet: {fleet_tokens} token requests, {fleet_401} upstream 401s"
    );
}

/// Redis killed under load, then back empty: no request fails, and within one token lifetime
/// after it returns the fleet is back to one token request per renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_outlives_redis_and_converges_when_it_returns_empty() {
    let _one = ONE_AT_A_TIME.lock().await;
    let sandbox = five_second_tokens().await;
    let mut redis = Redis::start();
    let dir = Dir::new();
    let replicas = start_fleet(&dir, 3, &sandbox, Some(&redis.url()), "").await;
    for r in &replicas {
        eventually(Duration::from_secs(20), "replica ready", || r.ready()).await;
    }
    let load = Load::start(&replicas, 2, Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.kill();
    eventually(
        Duration::from_secs(10),
        "replicas see Redis down",
        || async {
            let mut down = true;
            for r in &replicas {
                down &= r.metric("tokengate_cluster_up", &[]).await == 0.0;
            }
            down
        },
    )
    .await;
    // Two token lifetimes alone: each replica renews by itself.
    let alone_from = token_requests(&sandbox);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let alone = token_requests(&sandbox) - alone_from;
    redis.restart_empty();
    // One token lifetime (and a ping interval) to converge, then two renewal periods measured.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let converged_from = token_requests(&sandbox);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let converged = token_requests(&sandbox) - converged_from;
    let elapsed = started.elapsed().as_secs_f64();
    let (sent, failed) = load.finish().await;
    eprintln!("redis outage: alone {alone} token requests in 10 s; converged {converged} in {elapsed:.1} s; {failed} of {sent} failed");
    assert_eq!(failed, 0, "{failed} of {sent} failed\n{}", logs(&replicas));
    assert!(
        alone >= 2 * 3 * 2,
        "alone, each of three replicas renews both routes: {alone}"
    );
    let bound = 2 * ((elapsed / 2.8).ceil() as u64 + 1);
    assert!(
        converged <= bound,
        "after Redis returned: {converged} token requests in {elapsed:.1} s (bound {bound}; \
         alone it was {alone} in 10 s)\n{}",
        logs(&replicas)
    );
}

/// The replica that holds the lease dies before its token request returns: the others fetch
/// themselves once `token_timeout` has passed, within `token_timeout` plus the lease's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_dying_with_the_lease_delays_the_others_at_most_the_timeout_and_lease() {
    let _one = ONE_AT_A_TIME.lock().await;
    let sandbox = Sandbox::start().await.expect("sandbox");
    let redis = Redis::start();
    let dir = Dir::new();
    let timeout = Duration::from_secs(5);
    let extra = "token_timeout = \"5s\"";
    sandbox.drillster.faults().hold();
    sandbox.driftrock.faults().hold();
    let mut first = Replica::start(&dir.0, 0, &sandbox, Some(&redis.url()), extra);
    eventually(
        Duration::from_secs(20),
        "the first replica asks for both tokens",
        || async {
            sandbox.drillster.faults().held() == 1 && sandbox.driftrock.faults().held() == 1
        },
    )
    .await;
    let others: Vec<Replica> = (1..3)
        .map(|i| Replica::start(&dir.0, i, &sandbox, Some(&redis.url()), extra))
        .collect();
    for r in &others {
        eventually(
            Duration::from_secs(20),
            "waiting for the lease holder",
            || async {
                r.metric(
                    "tokengate_cluster_operations_total",
                    &["op=\"lease\"", "outcome=\"miss\""],
                )
                .await
                    >= 2.0
            },
        )
        .await;
    }
    first.kill();
    let killed = Instant::now();
    sandbox.drillster.faults().release();
    sandbox.driftrock.faults().release();
    for r in &others {
        eventually(
            Duration::from_secs(30),
            "a survivor obtains the tokens",
            || r.ready(),
        )
        .await;
    }
    let took = killed.elapsed();
    eprintln!("lease holder killed: survivors ready after {took:?}");
    let lease = timeout + tokengate::token::fleet::LEASE_MARGIN;
    assert!(
        took <= timeout + lease,
        "survivors ready {took:?} after the holder died (bound {:?})\n{}",
        timeout + lease,
        logs(&others)
    );
    assert!(
        others.iter().any(|r| r
            .log_text()
            .contains("no token published by the fleet within token_timeout")),
        "{}",
        logs(&others)
    );
}
