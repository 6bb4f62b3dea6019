//! Loopback stand-ins for the vendors, used by `tokengate demo` and by every integration test.
//!
//! - [`AuthServer::drillster`]: a Drillster-like authorization server (Drillster: Service
//!   accounts): RFC 7523 JWT bearer grant at `POST /api/oauth/token`, RS256 assertions verified
//!   against registered service-account keys.
//! - [`AuthServer::driftrock`]: a Driftrock-like authorization server (Driftrock: Client
//!   credentials): RFC 6749 §4.4 client credentials grant at `POST /oauth2/token`, HTTP Basic
//!   client authentication decoded per RFC 6749 §2.3.1.
//! - [`SandboxApi`]: an echo API that accepts only unexpired, unrevoked tokens from a
//!   [`TokenRegistry`] shared with the authorization servers, and echoes what it received.
//! - [`Sandbox`]: all three on one registry, with the sandbox credentials of [`keys`].
//!
//! Every server binds `127.0.0.1:0`, runs on the caller's tokio runtime, and stops when its
//! handle is dropped or shut down. Each request is handled in a task of its own: a handler panic
//! is answered with a 500, counted (`panics()`), returned as an error by `shutdown()`, and makes
//! dropping the handle panic — it never passes silently. [`Faults`] make any of them slow, hang,
//! reset or answer with a canned response at runtime.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tokengate_sandbox::SandboxError> {
//! use tokengate_sandbox::Sandbox;
//! let sandbox = Sandbox::builder().token_lifetime(std::time::Duration::from_secs(2)).start().await?;
//! println!("token endpoint: {}", sandbox.drillster.token_endpoint());
//! println!("api: {}", sandbox.api.base_url());
//! sandbox.shutdown().await?;
//! # Ok(()) }
//! ```

mod api;
mod auth;
mod client_auth;
mod faults;
mod jwt_bearer;
pub mod keys;
mod raw_api;
mod recent;
mod registry;
mod revocation;
mod server;
mod token_format;

use std::net::SocketAddr;
use std::time::Duration;

pub use api::{Echo, SandboxApi};
pub use auth::{
    AuthServer, AuthServerBuilder, JsonField, RecordedRequest, Vendor, JWT_BEARER_GRANT,
};
pub use client_auth::{basic_authorization, basic_authorization_raw, form_encode, BasicDecoding};
pub use faults::{CannedResponse, Faults};
pub use jwt_bearer::AssertionRejection;
pub use raw_api::{download_byte, RawApi, RawApiBuilder, RawRequest, RAW_API_MAX_HEAD};
pub use registry::{IssuedToken, TokenRegistry, TokenRejection};
pub use token_format::{ContentCoding, ResponseFormat};

/// Errors of the sandbox servers.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Binding `127.0.0.1:0` failed.
    #[error("sandbox {server}: cannot listen on 127.0.0.1:0: {source}")]
    Bind {
        /// Which server.
        server: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A public key given to [`AuthServerBuilder::key`] is not an RSA public key PEM.
    #[error("sandbox: public key for kid {kid:?} is not an RSA public key PEM: {source}")]
    InvalidKey {
        /// The key id it was registered under.
        kid: String,
        /// Why it was refused.
        source: jsonwebtoken::errors::Error,
    },
    /// Signing an access token failed (should not happen with an HMAC key).
    #[error("sandbox: cannot sign an access token: {0}")]
    SignAccessToken(jsonwebtoken::errors::Error),
    /// A request handler panicked (the client got a 500).
    #[error("sandbox {server} at {addr}: {count} handler panic(s); first: {first}")]
    HandlerPanicked {
        /// Which server.
        server: &'static str,
        /// Its address.
        addr: SocketAddr,
        /// How many panics.
        count: u64,
        /// The first panic message.
        first: String,
    },
}

/// The whole sandbox: both authorization servers and the echo API, sharing one
/// [`TokenRegistry`], with the credentials of [`keys`] (Drillster client
/// [`keys::DRILLSTER_CLIENT_ID`] / [`keys::DRILLSTER_CLIENT_SECRET`] and the demo key; Driftrock
/// client [`keys::DRIFTROCK_CLIENT_ID`] / [`keys::DRIFTROCK_CLIENT_SECRET`]).
#[derive(Debug)]
pub struct Sandbox {
    /// The registry shared by all three servers.
    pub registry: TokenRegistry,
    /// The Drillster-like authorization server.
    pub drillster: AuthServer,
    /// The Driftrock-like authorization server.
    pub driftrock: AuthServer,
    /// The echo API accepting tokens of both.
    pub api: SandboxApi,
}

/// Builds a [`Sandbox`].
#[derive(Debug, Default)]
#[must_use = "call .start().await"]
pub struct SandboxBuilder {
    token_lifetime: Option<Duration>,
}

impl SandboxBuilder {
    /// Lifetime of the tokens both authorization servers issue (default 3600 s).
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = Some(lifetime);
        self
    }

    /// Starts the three servers.
    ///
    /// # Errors
    /// [`SandboxError::Bind`] if a port cannot be bound.
    pub async fn start(self) -> Result<Sandbox, SandboxError> {
        let registry = TokenRegistry::new();
        let mut drillster = AuthServer::drillster()
            .client(keys::DRILLSTER_CLIENT_ID, keys::DRILLSTER_CLIENT_SECRET)
            .registry(registry.clone());
        let mut driftrock = AuthServer::driftrock()
            .client(keys::DRIFTROCK_CLIENT_ID, keys::DRIFTROCK_CLIENT_SECRET)
            .registry(registry.clone());
        if let Some(lifetime) = self.token_lifetime {
            drillster = drillster.token_lifetime(lifetime);
            driftrock = driftrock.token_lifetime(lifetime);
        }
        Ok(Sandbox {
            drillster: drillster.start().await?,
            driftrock: driftrock.start().await?,
            api: SandboxApi::start(registry.clone()).await?,
            registry,
        })
    }
}

impl Sandbox {
    /// Starts the sandbox with defaults (see [`Sandbox`]).
    ///
    /// # Errors
    /// [`SandboxError::Bind`] if a port cannot be bound.
    pub async fn start() -> Result<Self, SandboxError> {
        Self::builder().start().await
    }

    /// A builder for non-default settings.
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder::default()
    }

    /// Handler panics caught by any of the three servers.
    pub fn panics(&self) -> u64 {
        self.drillster.panics() + self.driftrock.panics() + self.api.panics()
    }

    /// Stops all three servers.
    ///
    /// # Errors
    /// The first [`SandboxError::HandlerPanicked`] among them.
    pub async fn shutdown(self) -> Result<(), SandboxError> {
        let drillster = self.drillster.shutdown().await;
        let driftrock = self.driftrock.shutdown().await;
        let api = self.api.shutdown().await;
        drillster.and(driftrock).and(api)
    }
}
