//! Runs the sandbox authorization servers and echo API until killed, printing their URLs as one
//! JSON line on stdout: the token endpoints for the load and abuse benchmarks
//! (`benches/load/run.py`, `benches/abuse/run.py`).
//!
//! `cargo run --release --example sandbox_servers -- [TOKEN_LIFETIME_SECONDS]`

use std::time::Duration;

use tokengate_sandbox::Sandbox;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let lifetime = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3600);
    let sandbox = match Sandbox::builder()
        .token_lifetime(Duration::from_secs(lifetime))
        .start()
        .await
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sandbox: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "{}",
        serde_json::json!({
            "drillster_token_endpoint": sandbox.drillster.token_endpoint(),
            "driftrock_token_endpoint": sandbox.driftrock.token_endpoint(),
            "api": sandbox.api.base_url(),
        })
    );
    let _ = tokio::signal::ctrl_c().await;
    // Token request counts for the benchmark's token-path check.
    eprintln!(
        "{}",
        serde_json::json!({
            "drillster_token_requests": sandbox.drillster.requests(),
            "driftrock_token_requests": sandbox.driftrock.requests(),
        })
    );
}
