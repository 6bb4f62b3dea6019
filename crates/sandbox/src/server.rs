//! The HTTP/1.1 server harness shared by every sandbox server: ephemeral loopback port, one task
//! per connection, one task per request (so a handler panic is caught, answered with a 500 and
//! reported), shutdown on drop.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinError, JoinHandle, JoinSet};

use super::SandboxError;

/// The response type of every sandbox handler.
pub(crate) type Resp = Response<Full<Bytes>>;

/// What a handler wants done with the connection.
pub(crate) enum Reply {
    /// Send this response.
    Respond(Resp),
    /// Close the connection without a response.
    Close,
    /// Never answer.
    Hang,
}

/// A sandbox endpoint's request handler.
pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Reply> + Send;
}

/// Handler panics seen by one server.
#[derive(Default)]
struct Health {
    panics: AtomicU64,
    first_panic: Mutex<Option<String>>,
    /// Set once the panics have been reported through `shutdown`, so `Drop` does not repeat them.
    reported: AtomicBool,
}

impl Health {
    fn record_panic(&self, server: &str, message: String) {
        tracing::error!(server, panic = %message, "sandbox handler panicked");
        self.panics.fetch_add(1, Ordering::SeqCst);
        let mut first = self.first_panic.lock();
        first.get_or_insert(message);
    }

    fn first_panic(&self) -> String {
        self.first_panic.lock().clone().unwrap_or_default()
    }
}

/// A running server. Dropping it stops accepting and aborts every open connection; if a handler
/// panicked and that was not reported by [`HttpServer::shutdown`], dropping it panics (unless the
/// thread is already panicking), so a panic in a sandbox server fails the test that used it.
pub(crate) struct HttpServer {
    name: &'static str,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    health: Arc<Health>,
}

/// A bound, not yet serving, listener: lets a server learn its own URL before building its handler.
pub(crate) struct Bound {
    name: &'static str,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Bound {
    /// Binds `127.0.0.1:0`.
    pub(crate) async fn new(name: &'static str) -> Result<Self, SandboxError> {
        let bind_err = |source| SandboxError::Bind {
            server: name,
            source,
        };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(Self {
            name,
            listener,
            addr,
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts serving on the caller's tokio runtime.
    pub(crate) fn serve<H: Handler>(self, handler: Arc<H>) -> HttpServer {
        let health = Arc::new(Health::default());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(
            self.name,
            self.listener,
            handler,
            health.clone(),
            stopped,
        ));
        tracing::debug!(server = self.name, addr = %self.addr, "sandbox server listening");
        HttpServer {
            name: self.name,
            addr: self.addr,
            stop: Some(stop),
            task: Some(task),
            health,
        }
    }
}

impl HttpServer {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many handler panics this server has caught.
    pub(crate) fn panics(&self) -> u64 {
        self.health.panics.load(Ordering::SeqCst)
    }

    /// Stops the server and waits for it; reports handler panics as an error.
    pub(crate) async fn shutdown(mut self) -> Result<(), SandboxError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                if e.is_panic() {
                    self.health.record_panic(self.name, panic_message(e));
                }
            }
        }
        self.health.reported.store(true, Ordering::SeqCst);
        self.check()
    }

    /// `Err` if a handler has panicked.
    pub(crate) fn check(&self) -> Result<(), SandboxError> {
        match self.panics() {
            0 => Ok(()),
            count => Err(SandboxError::HandlerPanicked {
                server: self.name,
                addr: self.addr,
                count,
                first: self.health.first_panic(),
            }),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if !self.health.reported.load(Ordering::SeqCst) && !std::thread::panicking() {
            if let Err(e) = self.check() {
                panic!("{e}");
            }
        }
    }
}

async fn accept_loop<H: Handler>(
    name: &'static str,
    listener: TcpListener,
    handler: Arc<H>,
    health: Arc<Health>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new());
    // Dropping the set (when this loop ends or is aborted) aborts every open connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        health.record_panic(name, panic_message(e));
                    }
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let handler = handler.clone();
                    let health = health.clone();
                    let service = service_fn(move |request| {
                        dispatch(name, handler.clone(), health.clone(), request, peer)
                    });
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    connections.spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(server = name, %peer, error = %e, "sandbox connection ended");
                        }
                    });
                }
                Err(e) => {
                    // e.g. EMFILE: back off briefly instead of spinning.
                    tracing::warn!(server = name, error = %e, "sandbox accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// Returned to hyper to close the connection without answering.
#[derive(Debug, thiserror::Error)]
#[error("sandbox fault injection: connection closed without a response")]
struct CloseConnection;

async fn dispatch<H: Handler>(
    name: &'static str,
    handler: Arc<H>,
    health: Arc<Health>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Resp, CloseConnection> {
    // Its own task, so that a panic surfaces here as a JoinError instead of killing the
    // connection silently; aborted if hyper drops this future (client went away, shutdown).
    let task = AbortOnDrop(tokio::spawn(handler.handle(request, peer)));
    match task.await {
        Ok(Reply::Respond(response)) => Ok(response),
        Ok(Reply::Close) => Err(CloseConnection),
        Ok(Reply::Hang) => std::future::pending().await,
        Err(e) if e.is_panic() => {
            let message = panic_message(e);
            let body = format!("sandbox handler panicked: {message}");
            health.record_panic(name, message);
            Ok(text(StatusCode::INTERNAL_SERVER_ERROR, body))
        }
        Err(_) => Ok(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "sandbox shutting down",
        )),
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, JoinError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.get_mut().0).poll(cx)
    }
}

fn panic_message(e: JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned()),
        Err(e) => e.to_string(),
    }
}

/// A `text/plain` response.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut response = Resp::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A JSON response with `Content-Type: application/json;charset=UTF-8` (the exact form both
/// vendors' documentation shows: Driftrock: Client credentials, Drillster: Service accounts)
/// and `Cache-Control: no-store` (RFC 6749 §5.1/§5.2).
pub(crate) fn json(status: StatusCode, value: &impl Serialize) -> Resp {
    // Serializing our own plain structs cannot fail; an empty object is a safe fallback anyway.
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    raw_json(status, body)
}

/// Like [`json`], with a body that is already JSON text.
pub(crate) fn raw_json(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut response = Resp::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Header value bytes as text (lossy for non-UTF-8 bytes).
pub(crate) fn lossy(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}
