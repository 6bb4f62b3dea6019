//! tokengate: a credential-injecting OAuth 2.0 gateway.
//!
//! Legacy clients inside a trusted network point their API base URL at tokengate and call it
//! without credentials. tokengate strips whatever credentials arrive, attaches a cached
//! `Authorization: Bearer <access token>` that it obtained itself (RFC 7523 JWT bearer grant or
//! RFC 6749 §4.4 client credentials grant) and forwards the request to the real API.
//!
//! Data flows one way:
//!
//! ```text
//!  config (file → validated model)
//!      │
//!      ├──► routes (proxy::routes)          token sources (token::TokenSource, one per
//!      │                                     credential identity; renewed in the background
//!      │                                     by oauth::TokenClient)
//!      ▼                                         │  ArcSwap, lock-free reads
//!  proxy phases (proxy::Gateway, pingora) ◄──────┘
//!      │
//!      ▼
//!  metrics / access log (metrics, admin)
//! ```
#![forbid(unsafe_code)]

pub mod admin;
pub mod cluster;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod files;
pub mod gateway;
pub mod metrics;
pub mod oauth;
pub mod proxy;
pub mod shutdown;
pub mod token;
pub mod token_listener;
