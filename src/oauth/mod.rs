//! OAuth 2.0 client side: grants, key files, token responses and the token endpoint client.
//!
//! - [`jwt_bearer`]: RFC 7523 §2.1 assertions (Drillster: Service accounts).
//! - [`client_credentials`]: RFC 6749 §4.4 and §2.3.1 client authentication (Driftrock: Client
//!   credentials).
//! - [`key_file`]: the Drillster JSON key file.
//! - [`token_response`]: RFC 6749 §5.1/§5.2 parsing.
//! - [`token_endpoint`]: the HTTP client and RFC 8414 discovery.
//! - [`content_coding`]: gzip, deflate and br answers (RFC 9110 §8.4).
pub mod client_credentials;
pub mod content_coding;
pub mod jwt_bearer;
pub mod key_file;
pub mod token_endpoint;
pub mod token_response;

pub use token_endpoint::{FetchError, FetchOutcome, TokenClient};
pub use token_response::AccessToken;
