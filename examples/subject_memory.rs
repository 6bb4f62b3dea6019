//! Resident memory of a gateway holding many per-user tokens (docs/per-user-tokens.md): starts
//! the sandbox servers in this process and `tokengate run` as a child process with
//! `max_cached = SUBJECTS`, asks its token listener for SUBJECTS distinct subjects, and reports
//! the child's `VmRSS` (from `/proc/PID/status`) before and after, as one JSON line.
//!
//! ```sh
//! cargo build --release --bin tokengate --example subject_memory
//! target/release/examples/subject_memory [SUBJECTS]     # default 100000
//! ```
//!
//! The gateway binary is the `tokengate` next to this example's directory (the same profile),
//! or `TOKENGATE_BIN`. Not run by `cargo test`; Linux only (`/proc`).

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokengate_sandbox::{keys, Sandbox};

/// Requests in flight against the token listener.
const CONCURRENCY: usize = 16;

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

fn gateway_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TOKENGATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/PROFILE/examples/subject_memory → target/PROFILE/tokengate
    exe.parent()
        .and_then(|examples| examples.parent())
        .map(|profile| profile.join("tokengate"))
        .expect("target directory")
}

/// `VmRSS` of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let subjects: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let sandbox = Sandbox::builder()
        .token_lifetime(Duration::from_secs(3600))
        .start()
        .await
        .expect("sandbox");
    let dir = std::env::temp_dir().join(format!("tokengate-subject-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let key_file =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/sandbox/src/keys/demo-key.json");
    let (listen, admin, token_listen) = (free_addr(), free_addr(), free_addr());
    let config = format!(
        r#"[server]
listen = "{listen}"
admin_listen = "{admin}"
token_listen = "{token_listen}"
grace_period = "0s"

[log]
level = "warn"

[[routes]]
name = "drillster"
upstream = "{api}"

[routes.auth]
grant = "jwt_bearer"
token_endpoint = "{endpoint}"
client_id = "{id}"
client_secret = "{secret}"
key_file = "{key_file}"

[routes.subjects]
allow = ["u[0-9]+@example\\.com"]
max_cached = {subjects}
"#,
        api = sandbox.api.base_url(),
        endpoint = sandbox.drillster.token_endpoint(),
        id = keys::DRILLSTER_CLIENT_ID,
        secret = keys::DRILLSTER_CLIENT_SECRET,
        key_file = key_file.display(),
    );
    let config_path = dir.join("tokengate.toml");
    std::fs::write(&config_path, config).expect("config");
    let binary = gateway_binary();
    let child = Command::new(&binary)
        .args(["run", "-c"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    let gateway = Gateway(child);
    let pid = gateway.0.id();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = client
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "gateway not ready in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_before = rss_kib(pid);

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, next) = (client.clone(), Arc::clone(&next));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= subjects {
                        return;
                    }
                    let url = format!(
                        "http://{token_listen}/v1/token/drillster?subject=u{i}%40example.com"
                    );
                    let r = client.get(&url).send().await.expect("token listener");
                    assert_eq!(r.status(), 200, "u{i}");
                    let _ = r.bytes().await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    let took = started.elapsed();
    let metrics = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let cached = metric(&metrics, "tokengate_subject_tokens{route=\"drillster\"}");
    let rss_after = rss_kib(pid);
    let per_subject = (rss_after.saturating_sub(rss_before) * 1024) as f64 / subjects as f64;
    println!(
        "{}",
        serde_json::json!({
            "subjects": subjects,
            "cached": cached,
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "bytes_per_subject": per_subject.round(),
            "seconds": took.as_secs_f64().round(),
            "binary": binary.display().to_string(),
        })
    );
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}
