//! Everything around the proxy: the token lifecycle against sandbox authorization servers
//! (RFC 7523 and RFC 6749 §4.4 grants, discovery, interop, upstream 401), config loading and
//! reload, secrets and key files, the command line, the sandbox servers themselves, the
//! deployment artifacts in `deploy/`, and the repository's own wording.
//!
//! One test binary, so the gateway, pingora and the shared support in `tests/support/` are
//! linked once for all of them. The interop tests install a process-wide log capture
//! (`interop::captured_logs`); tests here that read logs filter them by route name.

#[path = "../support/common.rs"]
mod common;
#[path = "../support/proxy_support.rs"]
mod proxy_support;
#[path = "../support/scenarios/mod.rs"]
mod scenarios;

mod cli;
mod config;
mod deploy;
mod discovery;
mod fleet;
mod interop;
mod keys_and_clock;
mod reload;
mod repository_language;
mod sandbox;
mod secrets;
mod subject_cache;
mod subjects;
mod token_lifecycle;
mod upstream_401;
