//! The admin endpoints while the process drains (docs/operations.md "Shutdown"): pingora stops
//! every listener of its services at the end of the shutdown delay, the admin listener with the
//! proxy's, yet `/healthz` answers while the process runs and `/metrics` and `/status` are what
//! show the drain. So once pingora's admin listener is gone, the same endpoints are served on
//! the same address from a thread of their own until the process exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::AdminApp;
use crate::proxy::Live;

/// How long to wait for pingora to release the admin address.
const REBIND_FOR: Duration = Duration::from_secs(5);
/// A request head larger than this is refused (the endpoints take no fields).
const MAX_HEAD: usize = 8 * 1024;
/// One connection's whole exchange, from accept to the last byte written.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin endpoints on `addr` (`server.admin_listen`) from a new thread, once pingora
/// has closed its admin listener, until the process exits. One request per connection
/// (`Connection: close`). Failures are logged; the drain goes on without the endpoints.
pub fn serve_until_exit(live: Arc<Live>, addr: SocketAddr) {
    let spawned = std::thread::Builder::new()
        .name("tokengate-admin-drain".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "admin endpoints not served while draining");
                    return;
                }
            };
            runtime.block_on(serve(live, addr));
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "admin endpoints not served while draining");
    }
}

async fn serve(live: Arc<Live>, addr: SocketAddr) {
    let started = Instant::now();
    // pingora closes its listener a moment after the delay ends: bind once it has.
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if started.elapsed() < REBIND_FOR => {
                tracing::trace!(error = %e, "admin address not released yet");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "admin endpoints not served while draining");
                return;
            }
        }
    };
    // `/readyz` answers 503 while draining before it would look at any proxy listener.
    let app = Arc::new(AdminApp::new(live, Vec::new()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(&app, stream)).await;
        });
    }
}

/// Reads one request head, writes the answer and closes.
async fn exchange(app: &AdminApp, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    let (method, path) = loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut fields);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let method = http::Method::from_bytes(req.method.unwrap_or("").as_bytes());
                let target = req.path.unwrap_or("/");
                let path = target.split('?').next().unwrap_or("/").to_string();
                break (method.ok(), path);
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => {
                stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await?;
                return stream.shutdown().await;
            }
        }
    };
    let Some(method) = method else {
        stream
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await?;
        return stream.shutdown().await;
    };
    let response = app.answer(&method, &path).await;
    let mut out = Vec::with_capacity(256 + response.body().len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            response.status().as_u16(),
            response.status().canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in response.headers() {
        if name == http::header::CONTENT_LENGTH || name == http::header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            response.body().len()
        )
        .as_bytes(),
    );
    if method != http::Method::HEAD {
        out.extend_from_slice(response.body());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}
