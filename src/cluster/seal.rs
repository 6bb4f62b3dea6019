//! Sealing the fleet's shared tokens: AES-256-GCM (NIST SP 800-38D) with aws-lc-rs, a fresh
//! random 96-bit nonce per value, and the Redis key name as associated data, so a value copied
//! under another credential identity's key does not open.
//!
//! Stored form: `0x01 ‖ nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)`.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// The format byte in front of every sealed value.
const VERSION: u8 = 1;

/// An AES-256-GCM key for the shared tokens. Never logged.
pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer([redacted])")
    }
}

impl Sealer {
    /// A sealer with the 32-byte `key` (`cluster.encryption_key_file`).
    pub fn new(key: &[u8; 32]) -> Self {
        // A 32-byte key is exactly what AES-256-GCM takes, so this cannot fail.
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("AES-256 key is 32 bytes");
        Sealer {
            key: LessSafeKey::new(unbound),
        }
    }

    /// `plaintext` sealed with the associated data `aad` (the Redis key name).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + 16);
        out.push(VERSION);
        out.extend_from_slice(&nonce_bytes);
        let mut body = plaintext.to_vec();
        // Sealing in place only fails for inputs beyond GCM's 64 GiB limit.
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad),
                &mut body,
            )
            .expect("a token is far below the AES-GCM input limit");
        out.extend_from_slice(&body);
        out
    }

    /// The plaintext of `sealed`, or `None` when it was sealed with another key, for another
    /// key name, altered, or is not a sealed value at all.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let (&version, rest) = sealed.split_first()?;
        if version != VERSION || rest.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::Sealer;

    #[test]
    fn opens_only_with_the_same_key_and_key_name() {
        let a = Sealer::new(&[7; 32]);
        let b = Sealer::new(&[8; 32]);
        let sealed = a.seal(b"tokengate:token:abc", b"secret-token");
        assert!(!sealed
            .windows(b"secret-token".len())
            .any(|w| w == b"secret-token"));
        assert_eq!(
            a.open(b"tokengate:token:abc", &sealed).as_deref(),
            Some(&b"secret-token"[..])
        );
        assert_eq!(b.open(b"tokengate:token:abc", &sealed), None);
        assert_eq!(a.open(b"tokengate:token:abd", &sealed), None);
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(a.open(b"tokengate:token:abc", &flipped), None);
        assert_eq!(a.open(b"tokengate:token:abc", b"garbage"), None);
        assert_eq!(a.open(b"tokengate:token:abc", b""), None);
        // Two seals of one value differ (fresh nonces).
        assert_ne!(sealed, a.seal(b"tokengate:token:abc", b"secret-token"));
    }
}
