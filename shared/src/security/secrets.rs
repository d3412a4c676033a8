//! Storage secrets at rest: AES-256-GCM under `LABELSYNC_SECRET_KEY`.
//!
//! A sealed value is `v1.<base64(nonce || ciphertext || tag)>`, with a fresh
//! random nonce per value. The storage id is bound as associated data, so a
//! sealed blob copied onto another storage row does not open there.
//!
//! Key rotation: `LABELSYNC_SECRET_KEY_FALLBACKS` names keys that open but
//! never seal (the key being replaced, or the next one while it is rolled
//! out); [`SecretBox::reseal`] seals again under the current key what only
//! a fallback opens (`labelsync-scheduler reseal`). No key id is stored:
//! a value is tried under each key, so the format is the same `v1` every
//! earlier binary reads, and a fleet can roll the change out one process
//! at a time.
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

/// The key that seals and opens secrets, and the fallbacks that only
/// open. Debug never shows them.
pub struct SecretBox {
    key: LessSafeKey,
    /// The key's id (see [`SecretBox::key_id`]).
    id: String,
    /// Tried, in order, on what `key` does not open; never seal.
    fallbacks: Vec<LessSafeKey>,
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
        let (key, bytes) = parse_key(encoded, "LABELSYNC_SECRET_KEY")?;
        Ok(SecretBox {
            key,
            id: key_id(&bytes),
            fallbacks: Vec::new(),
            rng: SystemRandom::new(),
            placeholder: placeholder(&bytes),
        })
    }

    /// Adds `LABELSYNC_SECRET_KEY_FALLBACKS`: keys as for
    /// [`from_base64`](Self::from_base64), comma-separated, that open what
    /// the key does not (never seal). A bad one is named by its place in
    /// the list, never by its text.
    pub fn with_fallbacks(mut self, list: &str) -> Result<Self> {
        let keys = list.split(',').map(str::trim).filter(|k| !k.is_empty());
        for (place, encoded) in keys.enumerate() {
            let name = format!("key {} of LABELSYNC_SECRET_KEY_FALLBACKS", place + 1);
            self.fallbacks.push(parse_key(encoded, &name)?.0);
        }
        Ok(self)
    }

    /// The key's id: the first 8 bytes of the SHA-256 of its bytes, in hex
    /// (`base64 -d | sha256sum | cut -c1-16`), which tells which key a
    /// process holds without telling anything of the key.
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// Whether any fallback key is set.
    pub fn has_fallbacks(&self) -> bool {
        !self.fallbacks.is_empty()
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
                "LABELSYNC_SECRET_KEY is a placeholder, not random bytes: anyone who reads the database can open the storage and webhook secrets sealed under it; set a random key (openssl rand -base64 32) as the README's \"Rotating LABELSYNC_SECRET_KEY\" says (this one a fallback until `labelsync-scheduler reseal` has sealed the saved secrets again)"
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

    /// Opens what [`seal`](Self::seal) made for the same `context`, under
    /// the key or else a fallback.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Map<String, Value>> {
        let raw = decode(sealed).ok_or_else(unreadable)?;
        std::iter::once(&self.key)
            .chain(&self.fallbacks)
            .find_map(|key| open_with(key, context, &raw))
            .ok_or_else(unreadable)
    }

    /// What to store for `sealed` so that the key alone opens it (see
    /// [`Reseal`]); an error only when sealing fails.
    pub fn reseal(&self, context: &str, sealed: &str) -> Result<Reseal> {
        let Some(raw) = decode(sealed) else {
            return Ok(Reseal::Unopenable);
        };
        if open_with(&self.key, context, &raw).is_some() {
            return Ok(Reseal::Current);
        }
        match self
            .fallbacks
            .iter()
            .find_map(|key| open_with(key, context, &raw))
        {
            Some(secrets) => self.seal(context, &secrets).map(Reseal::Sealed),
            None => Ok(Reseal::Unopenable),
        }
    }
}

/// What [`SecretBox::reseal`] found of a sealed value.
#[derive(Debug, PartialEq)]
pub enum Reseal {
    /// The key opens it: nothing to do.
    Current,
    /// A fallback opened it: the same secrets sealed under the key, to be
    /// stored in its place.
    Sealed(String),
    /// No key opens it (sealed under a key this process is not given, or
    /// not a sealed value).
    Unopenable,
}

/// One key of a setting (`name`): 32 bytes in base64; with its bytes.
fn parse_key(encoded: &str, name: &str) -> Result<(LessSafeKey, Vec<u8>)> {
    let bad = || {
        Error::invalid(
            "invalid_setting",
            None,
            format!(
                "{name} must be 32 random bytes in base64 (make one with `openssl rand -base64 32`)"
            ),
        )
    };
    let bytes = STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
    let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| bad())?;
    Ok((LessSafeKey::new(key), bytes))
}

/// See [`SecretBox::key_id`].
fn key_id(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The error for secrets no key opens.
fn unreadable() -> Error {
    Error::Internal(
        "stored secrets cannot be decrypted: neither LABELSYNC_SECRET_KEY nor a key of LABELSYNC_SECRET_KEY_FALLBACKS is the key they were saved with"
            .into(),
    )
}

/// The nonce and sealed bytes of a `v1.` value, when it is one.
fn decode(sealed: &str) -> Option<Vec<u8>> {
    sealed
        .strip_prefix(PREFIX)
        .and_then(|b| STANDARD.decode(b).ok())
        .filter(|raw| raw.len() > NONCE_LEN)
}

/// The secrets in `raw` (nonce, then sealed bytes) when `key` opens them
/// for `context`.
fn open_with(key: &LessSafeKey, context: &str, raw: &[u8]) -> Option<Map<String, Value>> {
    let (nonce, rest) = raw.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut buf = rest.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buf)
        .ok()?;
    serde_json::from_slice(plain).ok()
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

    /// A fallback opens what the key does not, never seals, and `reseal`
    /// moves a value under the key; what no key opens stays an error.
    #[test]
    fn a_fallback_opens_until_its_secrets_are_sealed_again() {
        let secrets: Map<String, Value> = serde_json::from_str(r#"{"token":"t0k"}"#).unwrap();
        let old = key();
        let sealed_old = old.seal("storage:1", &secrets).unwrap();
        let new_key = STANDARD.encode([9u8; 32]);
        let rotated = SecretBox::from_base64(&new_key)
            .unwrap()
            .with_fallbacks(&format!(" , {} ,", STANDARD.encode([7u8; 32])))
            .unwrap();
        assert!(rotated.has_fallbacks());
        assert_eq!(rotated.open("storage:1", &sealed_old).unwrap(), secrets);
        assert!(rotated.open("storage:2", &sealed_old).is_err());
        let Reseal::Sealed(resealed) = rotated.reseal("storage:1", &sealed_old).unwrap() else {
            panic!("not sealed again");
        };
        let alone = SecretBox::from_base64(&new_key).unwrap();
        assert_eq!(alone.open("storage:1", &resealed).unwrap(), secrets);
        assert!(
            old.open("storage:1", &resealed).is_err(),
            "sealed under the key"
        );
        assert_eq!(
            rotated.reseal("storage:1", &resealed).unwrap(),
            Reseal::Current
        );
        let fresh = rotated.seal("storage:1", &secrets).unwrap();
        assert!(
            old.open("storage:1", &fresh).is_err(),
            "fallbacks never seal"
        );
        for unopenable in [sealed_old.as_str(), "v1.garbage", "plain"] {
            let found = alone.reseal("storage:1", unopenable).unwrap();
            assert_eq!(found, Reseal::Unopenable, "{unopenable}");
        }
        assert!(alone.open("storage:1", &sealed_old).is_err());
    }

    /// The id a shell can compute from the base64 key.
    #[test]
    fn a_key_id_is_the_start_of_its_sha256() {
        // printf '%s' MDEy...ZWY= | base64 -d | sha256sum | cut -c1-16
        let key = SecretBox::from_base64("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").unwrap();
        assert_eq!(key.key_id(), "3eb1bd439947eb76");
    }

    #[test]
    fn a_bad_fallback_is_named_by_its_place() {
        let good = STANDARD.encode([1u8; 32]);
        let err = key()
            .with_fallbacks(&format!("{good},hunter2"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key 2 of LABELSYNC_SECRET_KEY_FALLBACKS"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn rejects_short_keys() {
        assert!(SecretBox::from_base64("c2hvcnQ=").is_err());
        assert!(SecretBox::from_base64("not base64!").is_err());
    }
}
