//! Storage secrets at rest: AES-256-GCM under `LABELSYNC_SECRET_KEY`.
//!
//! A sealed value is `v1.<base64(nonce || ciphertext || tag)>`, with a fresh
//! random nonce per value. The storage id is bound as associated data, so a
//! sealed blob copied onto another storage row does not open there. The
//! version prefix leaves room for key rotation (a `v2` with a key id).
use base64::{Engine, engine::general_purpose::STANDARD};
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};
use serde_json::{Map, Value};

use crate::{Error, Result};

const PREFIX: &str = "v1.";

/// Whether key bytes are a placeholder rather than random: fewer than 16
/// distinct byte values among them (32 random bytes have about 30), or
/// typed text, letters and digits only (a password encoded as the key).
/// Random keys are either less often than once in 2^50.
fn placeholder(bytes: &[u8]) -> bool {
    let mut seen = [false; 256];
    for b in bytes {
        seen[usize::from(*b)] = true;
    }
    seen.iter().filter(|s| **s).count() < 16 || bytes.iter().all(u8::is_ascii_alphanumeric)
}

/// The key that seals and opens secrets. Debug never shows it.
pub struct SecretBox {
    key: LessSafeKey,
    rng: SystemRandom,
    /// Whether the key is a placeholder, not random (see [`placeholder`]).
    placeholder: bool,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(***)")
    }
}

impl SecretBox {
    /// Parses `LABELSYNC_SECRET_KEY`: 32 random bytes, base64 (`openssl rand -base64 32`).
    pub fn from_base64(encoded: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "invalid_setting",
                None,
                "LABELSYNC_SECRET_KEY must be 32 random bytes in base64 (make one with `openssl rand -base64 32`)",
            )
        };
        let bytes = STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| bad())?;
        Ok(SecretBox {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
            placeholder: placeholder(&bytes),
        })
    }

    /// Says at a process's start when the key is a placeholder (the
    /// compose file's 32 zero bytes, a repeated pattern, typed text):
    /// whoever reads
    /// the database can open every secret sealed under it. Kept a
    /// warning, not a refusal: the compose file's default is for trying
    /// labelsync out.
    pub fn warn_if_placeholder(&self) {
        if self.placeholder {
            tracing::warn!(
                "LABELSYNC_SECRET_KEY is a placeholder, not random bytes: anyone who reads the database can open the storage and webhook secrets sealed under it; set a random key (openssl rand -base64 32) before keeping real secrets (secrets saved meanwhile must be given again)"
            );
        }
    }

    /// Seals a secrets object for the storage `context` (its id, or any
    /// stable label the reader will give again).
    pub fn seal(&self, context: &str, secrets: &Map<String, Value>) -> Result<String> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| Error::Internal("no randomness for a nonce".into()))?;
        let mut buf = serde_json::to_vec(secrets).map_err(|e| Error::Internal(e.to_string()))?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut buf,
            )
            .map_err(|_| Error::Internal("sealing secrets failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!("{PREFIX}{}", STANDARD.encode(out)))
    }

    /// Opens what [`seal`](Self::seal) made for the same `context`.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Map<String, Value>> {
        let unreadable = || {
            Error::Internal(
                "stored secrets cannot be decrypted: LABELSYNC_SECRET_KEY is not the key they were saved with"
                    .into(),
            )
        };
        let raw = sealed
            .strip_prefix(PREFIX)
            .and_then(|b| STANDARD.decode(b).ok())
            .filter(|raw| raw.len() > NONCE_LEN)
            .ok_or_else(unreadable)?;
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| unreadable())?;
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| unreadable())?;
        serde_json::from_slice(plain).map_err(|_| unreadable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compose file's 32 zero bytes and a short pattern repeated are
    /// placeholders; random keys are not.
    #[test]
    fn a_placeholder_key_is_told_from_a_random_one() {
        assert!(placeholder(&[0u8; 32]));
        assert!(placeholder(&[1u8, 2, 3, 4].repeat(8)));
        assert!(placeholder(b"0123456789abcdef0123456789abcdef"));
        let rng = SystemRandom::new();
        for _ in 0..1000 {
            let mut bytes = [0u8; 32];
            rng.fill(&mut bytes).unwrap();
            assert!(!placeholder(&bytes), "{bytes:?}");
        }
    }

    fn key() -> SecretBox {
        SecretBox::from_base64(&STANDARD.encode([7u8; 32])).unwrap()
    }

    #[test]
    fn round_trip_and_tamper() {
        let secrets: Map<String, Value> =
            serde_json::from_str(r#"{"secret_access_key":"hunter2"}"#).unwrap();
        let sealed = key().seal("storage:1", &secrets).unwrap();
        assert!(!sealed.contains("hunter2"));
        assert_eq!(key().open("storage:1", &sealed).unwrap(), secrets);
        // Another row, another key, a flipped byte: all refused.
        assert!(key().open("storage:2", &sealed).is_err());
        let other = SecretBox::from_base64(&STANDARD.encode([8u8; 32])).unwrap();
        assert!(other.open("storage:1", &sealed).is_err());
        let mut raw = STANDARD.decode(&sealed[3..]).unwrap();
        raw[20] ^= 1;
        let tampered = format!("v1.{}", STANDARD.encode(raw));
        assert!(key().open("storage:1", &tampered).is_err());
        // Two seals of the same value differ (fresh nonce).
        assert_ne!(sealed, key().seal("storage:1", &secrets).unwrap());
    }

    #[test]
    fn rejects_short_keys() {
        assert!(SecretBox::from_base64("c2hvcnQ=").is_err());
        assert!(SecretBox::from_base64("not base64!").is_err());
    }
}
