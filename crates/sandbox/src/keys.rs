//! Fixture credentials of the sandbox, embedded at compile time.
//!
//! SANDBOX ONLY: these keys and secrets are public (they live in the repository). They exist so
//! that `tokengate demo` and the integration tests can run without any real vendor account.

/// Key id (`keyId` in the key file, `kid` in the assertion header) of the demo service-account key.
pub const DEMO_KEY_ID: &str = "cf9f895ff1f64e2f9ceea45074f56c52";

/// Service account id (`serviceAccountId` in the key file) of the demo key; the assertion's `iss`.
pub const DEMO_SERVICE_ACCOUNT_ID: &str = "iqKpEF3URCe0yAsyrsk_4g";

/// The demo key as a Drillster JSON key file (`keyId`, `serviceAccountId`, `privateKey`;
/// Drillster: Service accounts).
pub const DEMO_KEY_JSON: &str = include_str!("keys/demo-key.json");

/// The demo private key (PKCS#8 PEM), the same key as in [`DEMO_KEY_JSON`].
pub const DEMO_PRIVATE_PEM: &str = include_str!("keys/demo-private.pem");

/// The demo public key (SPKI PEM), registered with the Drillster-like server under [`DEMO_KEY_ID`].
pub const DEMO_PUBLIC_PEM: &str = include_str!("keys/demo-public.pem");

/// An unrelated private key (PKCS#8 PEM): assertions signed with it fail with "bad signature".
pub const OTHER_PRIVATE_PEM: &str = include_str!("keys/other-private.pem");

/// The public half of [`OTHER_PRIVATE_PEM`].
pub const OTHER_PUBLIC_PEM: &str = include_str!("keys/other-public.pem");

/// Client id of the client application registered with the Drillster-like server
/// (Drillster: Service accounts).
pub const DRILLSTER_CLIENT_ID: &str = "874a16d4ac764ce4a545f0cca4584c63";

/// Client secret of [`DRILLSTER_CLIENT_ID`] (sandbox only).
pub const DRILLSTER_CLIENT_SECRET: &str = "sandbox-drillster-secret-7d1e94b0";

/// Client id registered with the Driftrock-like server. It contains `/` and a space, so a client
/// must form-encode it before Basic encoding (RFC 6749 §2.3.1).
pub const DRIFTROCK_CLIENT_ID: &str = "dr/client 7";

/// Client secret of [`DRIFTROCK_CLIENT_ID`]. It contains `+`, `/`, `%`, `:` and `=`, every
/// character that a wrong Basic encoding gets wrong.
pub const DRIFTROCK_CLIENT_SECRET: &str = "s3cr+t/%41:y=z";
