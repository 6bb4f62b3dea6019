//! Token lifecycle scenarios under real-world failure (docs/token-lifecycle.md), each against the
//! sandbox servers with their fault knobs. Every scenario is an `async fn` that panics on a failed
//! assertion and returns the secrets it saw (client secrets, assertions, access tokens), so that
//! `tests/log_hygiene.rs` can drive them all under one capturing subscriber and check the logs. The
//! thin `#[tokio::test]` wrappers live in `token_lifecycle.rs`, `discovery.rs`, `keys_and_clock.rs`,
//! `upstream_401.rs` and `subjects.rs`.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokengate::config::Config;
use tokengate::metrics::Metrics;
use tokengate::oauth::TokenClient;
use tokengate::token::{RenewalPolicy, TokenSource};
use tokengate_sandbox::{keys, AuthServer, CannedResponse, Echo, JsonField, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use crate::common::eventually;
use crate::common::{config_for, free_addr, TestGateway};

/// Secrets a scenario handled; none may appear in any log line.
#[derive(Debug, Default)]
pub struct Seen(pub BTreeSet<String>);

impl Seen {
    /// Client secrets, the demo private key's base64 lines, and every token and assertion the
    /// sandbox's servers issued or received.
    pub fn from_sandbox(sandbox: &Sandbox) -> Seen {
        let mut seen = Seen::default();
        seen.add_auth_server(&sandbox.drillster);
        seen.add_auth_server(&sandbox.driftrock);
        seen
    }

    /// The secrets of one authorization server (tokens it issued, assertions it received).
    pub fn add_auth_server(&mut self, server: &AuthServer) {
        self.0.insert(keys::DRILLSTER_CLIENT_SECRET.to_string());
        self.0.insert(keys::DRIFTROCK_CLIENT_SECRET.to_string());
        for line in keys::DEMO_PRIVATE_PEM
            .lines()
            .filter(|l| !l.starts_with("-----"))
        {
            if line.len() >= 16 {
                self.0.insert(line.trim().to_string());
            }
        }
        self.0.extend(server.registry().issued_tokens());
        for r in server.recent_requests() {
            if let Some(a) = r.param("assertion") {
                self.0.insert(a.to_string());
                // The signature alone is secret enough to check for too.
                if let Some(sig) = a.rsplit('.').next() {
                    self.0.insert(sig.to_string());
                }
            }
        }
    }

    pub fn extend(&mut self, other: Seen) {
        self.0.extend(other.0);
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

/// Inserts `extra` lines into the `[routes.auth]` table of route `drillster` or `driftrock` of
/// the demo config.
pub fn with_auth(toml: String, route: &str, extra: &str) -> String {
    let anchor = match route {
        "drillster" => "grant = \"jwt_bearer\"\n",
        _ => "grant = \"client_credentials\"\n",
    };
    toml.replacen(anchor, &format!("{anchor}{extra}\n"), 1)
}

/// `GET gw + path` → (status, headers, body).
pub async fn get(gw: &TestGateway, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::get(gw.url(path)).await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.expect("body"))
}

/// The `Authorization` the upstream saw for `GET path`, asserting a 200.
pub async fn upstream_auth(gw: &TestGateway, path: &str) -> String {
    let (status, _, body) = get(gw, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    let echo: Echo = serde_json::from_str(&body).expect("echo");
    assert_eq!(echo.authorization_count, 1);
    echo.header("authorization")
        .expect("authorization")
        .to_string()
}

/// `/status`'s `token` object of `route`.
pub async fn token_status(gw: &TestGateway, route: &str) -> Value {
    let v: Value = reqwest::get(format!("{}/status", gw.admin))
        .await
        .expect("status")
        .json()
        .await
        .expect("status JSON");
    v["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["name"] == route)
        .unwrap_or_else(|| panic!("no route {route} in {v}"))["token"]
        .clone()
}

/// `/readyz` → (status, body).
pub async fn readyz(gw: &TestGateway) -> (u16, Value) {
    let r = reqwest::get(format!("{}/readyz", gw.admin))
        .await
        .expect("readyz");
    (r.status().as_u16(), r.json().await.expect("readyz JSON"))
}

/// The value of a metric series (exact label set, as the exposition prints it), 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// Seconds from now until `/status`'s `expires_at` of `route`.
pub async fn expires_in(gw: &TestGateway, route: &str) -> f64 {
    let t = token_status(gw, route).await;
    t["expires_at"].as_f64().expect("expires_at") - unix_now()
}

/// The `exp` claim of a JWT access token.
pub fn jwt_exp(token: &str) -> f64 {
    let payload = token.split('.').nth(1).expect("JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice::<Value>(&bytes).expect("claims")["exp"]
        .as_f64()
        .expect("exp")
}

fn bearer(auth: &str) -> &str {
    auth.strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("not `Bearer <token>`: {auth:?}"))
}

const TOKEN_REQS: &str = "tokengate_token_requests_total";

fn outcome_series(route: &str, outcome: &str) -> String {
    format!("{TOKEN_REQS}{{outcome=\"{outcome}\",route=\"{route}\"}}")
}

async fn finish(gw: TestGateway, sandbox: Sandbox) -> Seen {
    gw.stop().await;
    let seen = Seen::from_sandbox(&sandbox);
    assert_eq!(sandbox.panics(), 0);
    sandbox.shutdown().await.expect("sandbox shutdown");
    seen
}

mod token_responses;
pub use token_responses::*;
mod outages;
pub use outages::*;
mod upstream_401;
pub use upstream_401::*;
mod key_files;
pub use key_files::*;
mod discovery;
pub use discovery::*;
mod per_user;
pub use per_user::*;
