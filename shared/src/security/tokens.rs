//! API tokens: their scopes, how secrets are made and remembered.
//!
//! A secret is `lsk_` and 43 base64url characters (32 random bytes); only
//! its SHA-256 is kept, so a stolen database names no working token. The
//! first [`PREFIX_LEN`] characters are kept too, for people to tell tokens
//! apart in lists.
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::rand::{SecureRandom, SystemRandom};

use crate::{Error, Result};

pub const SECRET_PREFIX: &str = "lsk_";
/// `lsk_` and the first 8 characters of the random part.
pub const PREFIX_LEN: usize = 12;

/// What a token may do (docs/API.md, "Tokens and scopes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Everything, tokens and the audit trail included.
    Admin,
    /// Create and change projects, storages, syncs and annotations.
    Write,
    /// Read them (GET only).
    Read,
    /// Runs, queues and fleet actions, without task data, annotations or
    /// storage configs.
    Ops,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Admin, Scope::Write, Scope::Read, Scope::Ops];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Write => "write",
            Scope::Read => "read",
            Scope::Ops => "ops",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }
}

/// A new secret and its hash.
pub fn generate() -> Result<(String, String)> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Internal("no randomness for a token".into()))?;
    let secret = format!("{SECRET_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash(&secret);
    Ok((secret, hash))
}

/// Characters of a secret's random part (32 bytes, base64url).
const RANDOM_CHARS: usize = 43;

/// Whether `given` has the shape of a secret [`generate`] makes: only such
/// a string can be a stored token, so no other is looked up (a flood of
/// made-up tokens costs no query).
pub fn well_formed(given: &str) -> bool {
    given.strip_prefix(SECRET_PREFIX).is_some_and(|random| {
        random.len() == RANDOM_CHARS
            && random
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// How a secret is remembered and looked up.
pub fn hash(secret: &str) -> String {
    super::sha256_hex(&[secret.as_bytes()])
}

/// The part of a secret lists show.
pub fn display_prefix(secret: &str) -> String {
    secret.chars().take(PREFIX_LEN).collect()
}

/// A lifetime such as `90d`, `12h`, `30m` or `3600s`, for the CLI's
/// `--expires`. The unit is needed: a bare `90` read as seconds made a
/// token meant for 90 days expire before it was handed over.
pub fn parse_lifetime(text: &str) -> Option<chrono::Duration> {
    let text = text.trim();
    let (i, unit) = text.char_indices().last()?;
    let number = &text[..i];
    let n: i64 = number.parse().ok().filter(|n| *n > 0)?;
    let seconds = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    chrono::Duration::try_seconds(n.checked_mul(seconds)?)
}

/// When a token made at `now` with the lifetime `text` (see
/// [`parse_lifetime`]) expires; `None` for a lifetime that does not parse
/// or ends past the last date there is.
pub fn expiry_after(
    text: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    now.checked_add_signed(parse_lifetime(text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100,000,000,000 days parse as a lifetime but end past any date a
    /// timestamp holds: the CLI's `now + lifetime` panicked on them.
    #[test]
    fn an_expiry_past_every_date_is_none() {
        let now = chrono::Utc::now();
        assert!(parse_lifetime("100000000000d").is_some());
        assert_eq!(expiry_after("100000000000d", now), None);
        assert_eq!(
            expiry_after("1d", now),
            now.checked_add_signed(chrono::Duration::days(1))
        );
    }

    #[test]
    fn secrets_are_random_and_only_their_hash_is_kept() {
        let (a, hash_a) = generate().unwrap();
        let (b, _) = generate().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("lsk_") && a.len() == 4 + 43, "{a}");
        assert_eq!(hash(&a), hash_a);
        assert!(!hash_a.contains(&a[4..]));
        assert_eq!(display_prefix(&a), &a[..12]);
    }

    /// Every secret made is well-formed; made-up bearers are not, so they
    /// are refused without a lookup.
    #[test]
    fn only_secrets_of_our_shape_are_well_formed() {
        for _ in 0..100 {
            let (secret, _) = generate().unwrap();
            assert!(well_formed(&secret), "{secret}");
        }
        let random = "A".repeat(43);
        for made_up in [
            "",
            "nonsense",
            "lsk_",
            "lsk_short",
            &format!("lsk_{random}x"),
            &format!("lsk_{}+", &random[..42]),
            &format!("LSK_{random}"),
            &format!("lsk_{}é", &random[..41]),
        ] {
            assert!(!well_formed(made_up), "{made_up}");
        }
        assert!(well_formed(&format!("lsk_{random}")));
    }

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("90d"), chrono::Duration::try_days(90));
        assert_eq!(parse_lifetime("12h"), chrono::Duration::try_hours(12));
        assert_eq!(parse_lifetime("3600s"), chrono::Duration::try_hours(1));
        // A number alone was seconds: a token meant for 90 days lasted 90 s.
        for bad in [
            "",
            "d",
            "0d",
            "-1d",
            "5y",
            "99999999999999999d",
            "1.5d",
            "90",
        ] {
            assert_eq!(parse_lifetime(bad), None, "{bad}");
        }
    }

    #[test]
    fn scopes_parse_their_names_only() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(Scope::parse("Admin"), None);
    }
}
