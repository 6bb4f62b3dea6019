//! Drillster service-account JSON key files (Drillster: Service accounts) and the RSA signing
//! key they carry.
//!
//! A key file is the JSON document the Drillster console offers as "Download JSON key file":
//!
//! ```json
//! {
//!   "type": "service_account_key",
//!   "keyId": "cf9f895ff1f64e2f9ceea45074f56c52",
//!   "serviceAccountId": "iqKpEF3URCe0yAsyrsk_4g",
//!   "privateKey": "-----BEGIN PRIVATE KEY-----\nMIIE…\n-----END PRIVATE KEY-----"
//! }
//! ```
//!
//! `keyId` becomes the assertion's `kid` header, `serviceAccountId` its `iss` (and default `sub`),
//! and `privateKey` signs the RFC 7523 §2.1 JWT bearer assertion with RS256 (the keys are
//! `RSA_2048`, Drillster: Service accounts). Unknown fields (such as `type`) are ignored.
//!
//! The private key is accepted in the shapes people actually end up with: PKCS#8
//! (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`) PEM, with real newlines, CRLF, or the
//! two characters `\` `n` (a key pasted into JSON twice escaped), and with text before or after
//! the PEM markers. Anything else fails at load time with an error that names the field and says
//! what is wrong; the key is proven usable by building the signing key **and** signing a
//! throw-away JWT, because `EncodingKey::from_rsa_pem` alone does not look inside the DER.
//!
//! Errors never contain key material: only field names, PEM labels and library error kinds.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// A parsed, validated Drillster service-account key (Drillster: Service accounts).
///
/// `Debug` shows `key_id` and `service_account_id` but never the private key.
#[derive(Clone)]
pub struct ServiceAccountKey {
    /// `keyId`: sent as the assertion's `kid` header (RFC 7515 §4.1.4).
    pub key_id: String,
    /// `serviceAccountId`: the assertion's `iss`, and its `sub` unless the route sets `subject`
    /// (RFC 7523 §3; Drillster: Service accounts).
    pub service_account_id: String,
    encoding_key: EncodingKey,
    /// SHA-256 of the private key PEM as given: lets a config reload tell a rotated key from
    /// the same one without keeping or comparing key material.
    key_digest: [u8; 32],
}

/// Same key id, service account and private key (by digest): a reload keeps the token source.
impl PartialEq for ServiceAccountKey {
    fn eq(&self, other: &Self) -> bool {
        self.key_id == other.key_id
            && self.service_account_id == other.service_account_id
            && self.key_digest == other.key_digest
    }
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("key_id", &self.key_id)
            .field("service_account_id", &self.service_account_id)
            .field("private_key", &"[redacted]")
            .finish()
    }
}

/// Why a key file (or its `privateKey`) cannot be used. Messages name the JSON field and the fix,
/// and never include key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read. The message does not repeat the path: callers prefix it.
    #[error("cannot read the key file: {0}")]
    Read(#[source] std::io::Error),
    /// The file is a bare PEM key rather than the JSON key file.
    #[error(
        "this is a PEM file, not a Drillster JSON key file; use the JSON file from \"Download JSON \
         key file\" (fields privateKey, keyId, serviceAccountId)"
    )]
    PemNotJson,
    /// The text is not valid JSON (the reason gives line and column, never content).
    #[error("not a valid JSON key file: {0}; expected a JSON object with privateKey, keyId and serviceAccountId")]
    Json(String),
    /// The JSON is valid but is not an object.
    #[error("the key file is JSON {found}, not an object; expected {{\"privateKey\": …, \"keyId\": …, \"serviceAccountId\": …}}")]
    NotAnObject {
        /// The JSON type found (`an array`, `a string`, …).
        found: &'static str,
    },
    /// A required field is absent.
    #[error("field `{field}` is missing; the Drillster key file must contain privateKey, keyId and serviceAccountId")]
    MissingField {
        /// The JSON field name.
        field: &'static str,
    },
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be a string, found {found}")]
    NotAString {
        /// The JSON field name.
        field: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// A field is an empty (or all-whitespace) string.
    #[error("field `{field}` is empty; download the key file again from the Drillster console")]
    EmptyField {
        /// The JSON field name.
        field: &'static str,
    },
    /// `privateKey` has no usable `-----BEGIN …-----` / `-----END …-----` block.
    #[error(
        "field `privateKey` is not a PEM private key ({reason}); expected \"-----BEGIN PRIVATE \
         KEY-----\" (PKCS#8) or \"-----BEGIN RSA PRIVATE KEY-----\" (PKCS#1)"
    )]
    NotPem {
        /// What is missing or malformed.
        reason: &'static str,
    },
    /// `privateKey` is password protected.
    #[error(
        "field `privateKey` holds an encrypted private key; tokengate needs it unencrypted: \
         `openssl pkcs8 -topk8 -nocrypt -in encrypted.pem -out key.pem`"
    )]
    Encrypted,
    /// `privateKey` is a private key, but not RSA (EC, Ed25519, …).
    #[error(
        "field `privateKey` holds {kind} private key; Drillster service accounts sign their \
         RFC 7523 assertions with RS256 and need an RSA key"
    )]
    NotRsa {
        /// `an EC (ECDSA)`, `an Ed25519`, …
        kind: &'static str,
    },
    /// `privateKey` is a public key or certificate.
    #[error(
        "field `privateKey` holds a \"{label}\" PEM block, not a private key; use the private key \
         from the key file"
    )]
    NotPrivate {
        /// The PEM label, e.g. `PUBLIC KEY`.
        label: String,
    },
    /// `privateKey` has a PEM label tokengate does not understand.
    #[error(
        "field `privateKey` has unsupported PEM type \"{label}\"; expected \"PRIVATE KEY\" \
         (PKCS#8) or \"RSA PRIVATE KEY\" (PKCS#1), e.g. `openssl pkcs8 -topk8 -nocrypt`"
    )]
    UnsupportedLabel {
        /// The PEM label found.
        label: String,
    },
    /// `privateKey` looks like an RSA key but cannot sign.
    #[error("field `privateKey` is not a valid RSA private key ({reason}); the key may be truncated or corrupted, download it again")]
    InvalidRsa {
        /// The signing library's error kind (no key material).
        reason: String,
    },
}

impl ServiceAccountKey {
    /// Parses and validates a Drillster JSON key file (Drillster: Service accounts).
    ///
    /// Requires the string fields `privateKey`, `keyId` and `serviceAccountId`; others are
    /// ignored. `privateKey` must be an unencrypted RSA private key in PEM (PKCS#8 or PKCS#1; see
    /// the module docs for the tolerated variations). The key is trial-signed with RS256.
    ///
    /// # Errors
    /// [`KeyFileError`] naming the field and what is wrong.
    pub fn from_json(text: &str) -> Result<Self, KeyFileError> {
        let trimmed = text.trim_start_matches('\u{feff}').trim_start();
        if trimmed.starts_with("-----BEGIN") {
            return Err(KeyFileError::PemNotJson);
        }
        let value: serde_json::Value =
            serde_json::from_str(trimmed).map_err(|e| KeyFileError::Json(json_error(&e)))?;
        let object = match &value {
            serde_json::Value::Object(o) => o,
            other => {
                return Err(KeyFileError::NotAnObject {
                    found: json_type(other),
                })
            }
        };
        let field = |name: &'static str| -> Result<&str, KeyFileError> {
            match object.get(name) {
                None | Some(serde_json::Value::Null) => {
                    Err(KeyFileError::MissingField { field: name })
                }
                Some(serde_json::Value::String(s)) if s.trim().is_empty() => {
                    Err(KeyFileError::EmptyField { field: name })
                }
                Some(serde_json::Value::String(s)) => Ok(s),
                Some(other) => Err(KeyFileError::NotAString {
                    field: name,
                    found: json_type(other),
                }),
            }
        };
        let private_key = field("privateKey")?;
        let key_id = field("keyId")?;
        let service_account_id = field("serviceAccountId")?;
        Self::from_pem(private_key, key_id.trim(), service_account_id.trim())
    }

    /// Reads and parses a key file; see [`ServiceAccountKey::from_json`].
    ///
    /// # Errors
    /// [`KeyFileError::Read`] if the file cannot be read or holds more than
    /// [`crate::files::SECRET_FILE_LIMIT`] or is not a regular file (the path is not repeated
    /// in the message), else as [`ServiceAccountKey::from_json`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, KeyFileError> {
        let text = crate::files::read_regular_to_string_capped(
            path.as_ref(),
            crate::files::SECRET_FILE_LIMIT,
        )
        .map_err(KeyFileError::Read)?;
        Self::from_json(&text)
    }

    /// Builds a key from its parts: a PEM RSA private key (same tolerance as the `privateKey`
    /// field) plus the key id and service account id. Used by the sandbox and tests.
    ///
    /// # Errors
    /// As for the `privateKey` field of [`ServiceAccountKey::from_json`].
    pub fn from_pem(
        private_key_pem: &str,
        key_id: impl Into<String>,
        service_account_id: impl Into<String>,
    ) -> Result<Self, KeyFileError> {
        use sha2::Digest;
        let encoding_key = rsa_encoding_key(private_key_pem)?;
        Ok(ServiceAccountKey {
            key_id: key_id.into(),
            service_account_id: service_account_id.into(),
            encoding_key,
            key_digest: sha2::Sha256::digest(private_key_pem.as_bytes()).into(),
        })
    }

    /// The RS256 signing key for RFC 7523 assertions.
    pub fn encoding_key(&self) -> &EncodingKey {
        &self.encoding_key
    }
}

/// A PEM block normalised to canonical form.
struct PemBlock {
    label: String,
    /// Header lines such as `Proc-Type: 4,ENCRYPTED` (legacy OpenSSL encryption).
    headers: Vec<String>,
    /// Base64 body without whitespace.
    body: String,
}

impl PemBlock {
    /// Re-encodes the block with `label` (upper-cased by the caller) and 64-column lines.
    fn canonical(&self, label: &str) -> String {
        let mut out = format!("-----BEGIN {label}-----\n");
        let bytes = self.body.as_bytes();
        for chunk in bytes.chunks(64) {
            // base64 is ASCII, so every chunk is valid UTF-8.
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }
}

/// Finds the first PEM block, tolerating literal `\n` escapes, CRLF, indentation and text
/// around the markers.
fn find_pem(text: &str) -> Result<PemBlock, KeyFileError> {
    let normalised = text
        .replace("\\r\\n", "\n")
        .replace("\\n", "\n")
        .replace("\r\n", "\n")
        .replace('\r', "\n");
    const BEGIN: &str = "-----BEGIN ";
    let Some(begin_at) = normalised.find(BEGIN) else {
        return Err(KeyFileError::NotPem {
            reason: "no \"-----BEGIN\" marker",
        });
    };
    let after_begin = &normalised[begin_at + BEGIN.len()..];
    let Some(label_end) = after_begin.find("-----") else {
        return Err(KeyFileError::NotPem {
            reason: "the \"-----BEGIN\" line is not closed by \"-----\"",
        });
    };
    let label = after_begin[..label_end].trim().to_string();
    if label.is_empty() || label.contains('\n') {
        return Err(KeyFileError::NotPem {
            reason: "the \"-----BEGIN\" line has no label",
        });
    }
    let rest = &after_begin[label_end + 5..];
    let end_marker = format!("-----END {label}-----");
    let Some(end_at) = rest.find(&end_marker) else {
        return Err(KeyFileError::NotPem {
            reason: "no matching \"-----END\" marker",
        });
    };
    let inner = &rest[..end_at];
    let mut headers = Vec::new();
    let mut body = String::new();
    for line in inner.lines() {
        let line = line.trim();
        if line.contains(':') {
            headers.push(line.to_string());
        } else {
            body.extend(line.chars().filter(|c| !c.is_whitespace()));
        }
    }
    if body.is_empty() {
        return Err(KeyFileError::NotPem {
            reason: "the PEM block is empty",
        });
    }
    Ok(PemBlock {
        label,
        headers,
        body,
    })
}

/// Turns PEM text into a proven RS256 signing key.
fn rsa_encoding_key(text: &str) -> Result<EncodingKey, KeyFileError> {
    let block = find_pem(text)?;
    let label = block.label.to_ascii_uppercase();
    let proc_encrypted = block
        .headers
        .iter()
        .any(|h| h.to_ascii_uppercase().starts_with("PROC-TYPE") && h.contains("ENCRYPTED"));
    if label.contains("ENCRYPTED") || proc_encrypted {
        return Err(KeyFileError::Encrypted);
    }
    match label.as_str() {
        "PRIVATE KEY" | "RSA PRIVATE KEY" => {}
        "EC PRIVATE KEY" => {
            return Err(KeyFileError::NotRsa {
                kind: "an EC (ECDSA)",
            })
        }
        "DSA PRIVATE KEY" => return Err(KeyFileError::NotRsa { kind: "a DSA" }),
        "PUBLIC KEY" | "RSA PUBLIC KEY" | "CERTIFICATE" => {
            return Err(KeyFileError::NotPrivate { label: block.label })
        }
        _ => return Err(KeyFileError::UnsupportedLabel { label: block.label }),
    }
    if base64::engine::general_purpose::STANDARD
        .decode(block.body.as_bytes())
        .is_err()
    {
        return Err(KeyFileError::NotPem {
            reason: "the text between the markers is not valid base64",
        });
    }
    let canonical = block.canonical(&label);
    let key = match EncodingKey::from_rsa_pem(canonical.as_bytes()) {
        Ok(key) => key,
        Err(e) => {
            if label == "PRIVATE KEY" {
                if EncodingKey::from_ec_pem(canonical.as_bytes()).is_ok() {
                    return Err(KeyFileError::NotRsa {
                        kind: "an EC (ECDSA)",
                    });
                }
                if EncodingKey::from_ed_pem(canonical.as_bytes()).is_ok() {
                    return Err(KeyFileError::NotRsa { kind: "an Ed25519" });
                }
            }
            return Err(KeyFileError::InvalidRsa {
                reason: e.to_string(),
            });
        }
    };
    trial_sign(&key)?;
    Ok(key)
}

/// Signs a throw-away RS256 JWT: the only reliable proof that the DER is a usable RSA key.
fn trial_sign(key: &EncodingKey) -> Result<(), KeyFileError> {
    let claims = serde_json::json!({ "iss": "tokengate-key-check", "iat": 0 });
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key)
        .map(|_| ())
        .map_err(|e| KeyFileError::InvalidRsa {
            reason: e.to_string(),
        })
}

fn json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// serde_json syntax errors carry a category and position, never the input; keep it that way
/// by building the message from those parts only.
fn json_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Eof => "unexpected end of file",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected data",
        serde_json::error::Category::Io => "read error",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO_JSON: &str = include_str!("../../crates/sandbox/src/keys/demo-key.json");
    const DEMO_PKCS8: &str = include_str!("../../crates/sandbox/src/keys/demo-private.pem");
    const DEMO_PKCS1: &str = include_str!("../../tests/fixtures/keys/demo-pkcs1.pem");
    const EC_P256: &str = include_str!("../../tests/fixtures/keys/ec-p256.pem");
    const ENCRYPTED: &str = include_str!("../../tests/fixtures/keys/demo-encrypted.pem");

    fn key_json(private_key: &str) -> String {
        serde_json::json!({
            "type": "service_account_key",
            "keyId": "kid-1",
            "serviceAccountId": "sa-1",
            "privateKey": private_key,
        })
        .to_string()
    }

    fn err(private_key: &str) -> String {
        match ServiceAccountKey::from_json(&key_json(private_key)) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn demo_key_file_loads() {
        let key = ServiceAccountKey::from_json(DEMO_JSON).expect("demo key");
        assert_eq!(key.key_id, "cf9f895ff1f64e2f9ceea45074f56c52");
        assert_eq!(key.service_account_id, "iqKpEF3URCe0yAsyrsk_4g");
    }

    #[test]
    fn keys_compare_by_ids_and_private_key_without_exposing_it() {
        let other_pem = include_str!("../../crates/sandbox/src/keys/other-private.pem");
        let demo = |pem: &str, kid: &str| ServiceAccountKey::from_pem(pem, kid, "sa").unwrap();
        assert_eq!(demo(DEMO_PKCS8, "k"), demo(DEMO_PKCS8, "k"));
        // A rotated key (same ids): a reload must start a new token source.
        assert_ne!(demo(DEMO_PKCS8, "k"), demo(other_pem, "k"));
        assert_ne!(demo(DEMO_PKCS8, "k"), demo(DEMO_PKCS8, "k2"));
        let shown = format!("{:?}", demo(DEMO_PKCS8, "k"));
        assert!(
            !shown.contains("MII") && !shown.contains("digest"),
            "{shown}"
        );
    }

    #[test]
    fn pkcs8_and_pkcs1_accepted() {
        ServiceAccountKey::from_json(&key_json(DEMO_PKCS8)).expect("pkcs8");
        ServiceAccountKey::from_json(&key_json(DEMO_PKCS1)).expect("pkcs1");
    }

    #[test]
    fn literal_backslash_n_accepted() {
        let escaped = DEMO_PKCS8.trim_end().replace('\n', "\\n");
        assert!(escaped.contains("\\n") && !escaped.contains('\n'));
        ServiceAccountKey::from_json(&key_json(&escaped)).expect("literal \\n");
        let escaped1 = DEMO_PKCS1.trim_end().replace('\n', "\\n");
        ServiceAccountKey::from_json(&key_json(&escaped1)).expect("literal \\n pkcs1");
    }

    #[test]
    fn crlf_and_surrounding_text_accepted() {
        let crlf = DEMO_PKCS8.replace('\n', "\r\n");
        ServiceAccountKey::from_json(&key_json(&crlf)).expect("crlf");
        let wrapped = format!("Here is the key:\n  {}\n-- end of paste", DEMO_PKCS1.trim());
        ServiceAccountKey::from_json(&key_json(&wrapped)).expect("surrounding text");
        let indented: String = DEMO_PKCS8.lines().map(|l| format!("    {l}\n")).collect();
        ServiceAccountKey::from_json(&key_json(&indented)).expect("indented");
    }

    #[test]
    fn ec_key_rejected_naming_the_field() {
        let e = err(EC_P256);
        assert!(e.contains("`privateKey`"), "{e}");
        assert!(e.contains("EC"), "{e}");
        assert!(!e.contains("MIG"), "no key material: {e}");
    }

    #[test]
    fn encrypted_key_rejected() {
        let e = err(ENCRYPTED);
        assert!(e.contains("`privateKey`") && e.contains("encrypted"), "{e}");
        // Legacy OpenSSL encryption: Proc-Type header inside an RSA PRIVATE KEY block.
        let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: \
                      AES-128-CBC,0123456789ABCDEF0123456789ABCDEF\n\nAAAA\n-----END RSA PRIVATE \
                      KEY-----\n";
        let e = err(legacy);
        assert!(e.contains("encrypted"), "{e}");
    }

    #[test]
    fn non_pem_rejected() {
        let e = err("not a key at all");
        assert!(e.contains("`privateKey`") && e.contains("not a PEM"), "{e}");
        let e = err("-----BEGIN PRIVATE KEY-----\nAAAA");
        assert!(e.contains("END"), "{e}");
        let e = err("-----BEGIN PRIVATE KEY-----\n!!!notbase64!!!\n-----END PRIVATE KEY-----");
        assert!(e.contains("base64"), "{e}");
    }

    #[test]
    fn pem_that_is_not_an_rsa_key_rejected() {
        // Valid base64, valid PEM, but garbage DER.
        let e = err("-----BEGIN RSA PRIVATE KEY-----\nAAAAAAAA\n-----END RSA PRIVATE KEY-----");
        assert!(
            e.contains("`privateKey`") && e.contains("not a valid RSA"),
            "{e}"
        );
        // A truncated real key.
        let body: Vec<&str> = DEMO_PKCS1.lines().collect();
        let truncated = format!(
            "{}\n{}\n{}\n",
            body[0],
            body[1..body.len() / 2].join("\n"),
            body[body.len() - 1]
        );
        let e = err(&truncated);
        assert!(e.contains("`privateKey`"), "{e}");
        assert!(!e.contains(body[1]), "no key material: {e}");
    }

    #[test]
    fn public_key_rejected() {
        let public = include_str!("../../crates/sandbox/src/keys/demo-public.pem");
        let e = err(public);
        assert!(
            e.contains("PUBLIC KEY") && e.contains("not a private key"),
            "{e}"
        );
    }

    #[test]
    fn json_problems_name_the_field() {
        let missing = r#"{"keyId": "k", "serviceAccountId": "s"}"#;
        let e = ServiceAccountKey::from_json(missing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`privateKey` is missing"), "{e}");
        let no_kid = serde_json::json!({"privateKey": DEMO_PKCS8, "serviceAccountId": "s"});
        let e = ServiceAccountKey::from_json(&no_kid.to_string())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`keyId` is missing"), "{e}");
        let wrong = serde_json::json!({"privateKey": 5, "keyId": "k", "serviceAccountId": "s"});
        let e = ServiceAccountKey::from_json(&wrong.to_string())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`privateKey` must be a string"), "{e}");
        let e = ServiceAccountKey::from_json("{\"privateKey\": ")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid JSON"), "{e}");
        let e = ServiceAccountKey::from_json(DEMO_PKCS8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("PEM file, not a Drillster JSON key file"), "{e}");
        let e = ServiceAccountKey::from_json("[1]").unwrap_err().to_string();
        assert!(e.contains("not an object"), "{e}");
    }

    #[test]
    fn json_string_holding_a_key_does_not_leak_it() {
        let as_string = serde_json::Value::String(DEMO_PKCS8.into()).to_string();
        let e = ServiceAccountKey::from_json(&as_string)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("MII"), "{e}");
    }

    #[test]
    fn debug_never_prints_key_material() {
        let key = ServiceAccountKey::from_json(DEMO_JSON).expect("demo key");
        let shown = format!("{key:?}");
        assert!(
            shown.contains("redacted") && !shown.contains("MII"),
            "{shown}"
        );
    }

    #[test]
    fn signed_assertion_verifies_with_public_key() {
        let key = ServiceAccountKey::from_json(&key_json(DEMO_PKCS1)).expect("pkcs1");
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(key.key_id.clone());
        let claims = serde_json::json!({"iss": "sa-1", "exp": 4_000_000_000u64});
        let token = jsonwebtoken::encode(&header, &claims, key.encoding_key()).expect("sign");
        let public = include_str!("../../crates/sandbox/src/keys/demo-public.pem");
        let dk = jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()).expect("public");
        let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
        v.required_spec_claims.clear();
        v.validate_aud = false;
        jsonwebtoken::decode::<serde_json::Value>(&token, &dk, &v).expect("verifies");
    }
}
