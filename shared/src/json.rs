//! JSON read as it is written.
//!
//! serde_json's `Value` reads an object whose first key is
//! `$serde_json::private::RawValue` as the JSON text held in its string (its
//! `raw_value` feature, which axum and sqlx turn on for the whole build).
//! So a task `{"$serde_json::private::RawValue": "{\"a\": 1}"}` would be
//! stored as `{"a": 1}`. Each such string is also parsed with a fresh
//! 128-level nesting limit, so strings nested in strings recurse past it
//! (an unoptimized serde_json overflowed a 2 MiB stack at 12 levels;
//! optimized, no line within the row limit reaches that).
//!
//! Task files are read through [`from_slice_within`] or [`AsWritten`], which build
//! a `Value` without that rule, and a key that starts with
//! [`RESERVED_PREFIX`] is refused wherever it would be stored
//! ([`is_reserved_key`], [`reserved_key_in`] for request bodies): reading
//! the row back from the database goes through `Value` again, so a row
//! stored with one would not read back as stored.
//!
//! A parse of a task builds within an [`Allowance`] of the row limit's
//! measure: a row of many small values takes many times its text in memory
//! (`{"a":0}` is 7 bytes of text and about 700 in memory), so it is refused
//! while it is built, not once it is whole.
use std::cell::Cell;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The prefix of the keys serde_json gives a meaning of its own.
pub const RESERVED_PREFIX: &str = "$serde_json::private::";

/// Whether a key is one serde_json reads as something else than a key.
pub fn is_reserved_key(key: &str) -> bool {
    key.starts_with(RESERVED_PREFIX)
}

/// The message for a reserved key, for a row's or a request's error.
pub fn reserved_key_error(key: &str) -> String {
    let shown: String = key.chars().take(64).collect();
    format!(
        "the key \"{shown}\" is reserved: keys starting with \"{RESERVED_PREFIX}\" cannot be stored (rename the key)"
    )
}

/// What the row limit counts for each value (twice for an entry of an
/// object: its key and its value), besides the text of strings and keys:
/// the size of a `Value` (`ingest::parse::check_task`'s measure).
pub const VALUE_BYTES: usize = 32;

/// How much of the row limit's measure a value being built may still take.
#[derive(Debug)]
pub struct Allowance {
    left: Cell<usize>,
    over: Cell<bool>,
}

impl Allowance {
    /// An allowance of `bytes`.
    pub fn new(bytes: usize) -> Self {
        Allowance {
            left: Cell::new(bytes),
            over: Cell::new(false),
        }
    }

    /// No limit.
    pub fn unlimited() -> Self {
        Allowance::new(usize::MAX)
    }

    /// Whether a value was refused more than was left: what was built is
    /// not the value (its rest was read, not built).
    pub fn is_over(&self) -> bool {
        self.over.get()
    }

    /// Takes `bytes`; false (for good) once they were more than was left.
    fn take(&self, bytes: usize) -> bool {
        if self.over.get() {
            return false;
        }
        match self.left.get().checked_sub(bytes) {
            Some(left) => {
                self.left.set(left);
                true
            }
            None => {
                self.over.set(true);
                false
            }
        }
    }
}

/// One JSON text, whole (nothing but whitespace after it), as written,
/// within `allowance`: once over it, the rest is read but not built (check
/// [`Allowance::is_over`]).
pub fn from_slice_within(bytes: &[u8], allowance: &Allowance) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = AsWritten(allowance).deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// The first reserved key of a JSON text, read up to its end or its first
/// error (whoever parses it next reports that error). Nothing but the keys
/// is built: this is a check before a parse into a typed body whose `Value`
/// fields would read the key by serde_json's rule.
pub fn reserved_key_in(bytes: &[u8]) -> Option<String> {
    let found = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let _ = Scan { found: &found }.deserialize(&mut de);
    found.take()
}

/// [`AsWritten`] for `#[serde(deserialize_with)]`, with no limit.
pub fn as_written<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
    AsWritten(&Allowance::unlimited()).deserialize(deserializer)
}

/// A seed that reads any JSON value into a `Value` as written, within its
/// allowance: each string and key takes its text, each element of an array
/// [`VALUE_BYTES`] and each entry of an object twice that (the root's own
/// is the caller's to count). Past the allowance the rest of the value is
/// read without being built, and what is returned is not the value.
#[derive(Clone, Copy)]
pub struct AsWritten<'a>(pub &'a Allowance);

impl<'de> DeserializeSeed<'de> for AsWritten<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for AsWritten<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    /// A float serde_json cannot hold (never from its own parser) is null,
    /// as in serde_json's own `Value`.
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        if !self.0.take(v.len()) {
            return Ok(Value::Null);
        }
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        if !self.0.take(v.len()) {
            return Ok(Value::Null);
        }
        Ok(Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            if !self.0.take(VALUE_BYTES) {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                return Ok(Value::Null);
            }
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if !self.0.take((2 * VALUE_BYTES).saturating_add(key.len())) {
                map.next_value::<IgnoredAny>()?;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(Value::Null);
            }
            let value = map.next_value_seed(self)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// Walks a JSON value without building it; at a reserved key it keeps it
/// in `found` and stops.
#[derive(Clone, Copy)]
struct Scan<'a> {
    found: &'a Cell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Scan<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scan<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if is_reserved_key(&key) {
                self.found.set(Some(key));
                return Err(de::Error::custom("reserved key"));
            }
            map.next_value_seed(self)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;

    fn from_slice(bytes: &[u8]) -> serde_json::Result<Value> {
        from_slice_within(bytes, &Allowance::unlimited())
    }

    /// A task whose string at each of `levels` levels holds the next one,
    /// under 120 brackets each: serde_json's `Value` recurses 120 levels a
    /// level (past its 128-level limit), and the escapes double each level.
    pub(crate) fn nested_raw_values(levels: usize) -> String {
        let mut text = String::from(r#"{"a":1}"#);
        for _ in 0..levels {
            let object = json!({ "$serde_json::private::RawValue": text });
            text = format!("{}{object}{}", "[".repeat(120), "]".repeat(120));
        }
        text
    }

    #[test]
    fn a_reserved_key_is_read_as_written() {
        let text = br#"{"$serde_json::private::RawValue": "{\"a\": 1}"}"#;
        // Why this module exists: serde_json's own `Value` reads another
        // value.
        let theirs: Value = serde_json::from_slice(text).unwrap();
        assert_eq!(theirs, json!({ "a": 1 }));
        let ours = from_slice(text).unwrap();
        let (key, value) = ours.as_object().unwrap().iter().next().unwrap();
        assert_eq!(
            (key.as_str(), value),
            ("$serde_json::private::RawValue", &json!("{\"a\": 1}"))
        );
        assert!(is_reserved_key(key));
        assert!(reserved_key_error(key).contains("is reserved"));

        // Nested ones are read as one string each, not parsed again.
        let deep = nested_raw_values(12);
        assert!(from_slice(deep.as_bytes()).is_ok());
        assert!(from_slice(b"{\"a\": 1} trailing").is_err());
        let all = br#"[1, -2, 3.5, 18446744073709551615, "s", true, null, {"k": [{}]}]"#;
        assert_eq!(
            from_slice(all).unwrap(),
            serde_json::from_slice::<Value>(all).unwrap()
        );
    }

    #[test]
    fn a_reserved_key_is_found_at_any_depth() {
        let found = |text: &str| reserved_key_in(text.as_bytes());
        let key = Some("$serde_json::private::RawValue".to_owned());
        assert_eq!(found(r#"{"$serde_json::private::RawValue": "1"}"#), key);
        assert_eq!(
            found(r#"{"a": [{"b": 1}, {"$serde_json::private::RawValue": 2}]}"#),
            key
        );
        // Written with an escape, it is the same key.
        assert_eq!(
            found(r#"{"\u0024serde_json::private::RawValue": "1"}"#),
            key
        );
        assert_eq!(found(&nested_raw_values(12)), key);
        assert_eq!(found(r#"{"a": "$serde_json::private::RawValue"}"#), None);
        assert_eq!(found(r#"{"$serde_json::private": 1}"#), None);
        // A text that breaks off before any is not this check's to report.
        assert_eq!(found(r#"{"a": [1, "#), None);
    }
}
