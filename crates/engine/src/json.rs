//! JSON text to a `serde_json::Value`, with the checks a policy push needs that
//! `serde_json::from_slice` does not make: a key given twice in one object is
//! an error naming its JSON pointer (serde_json would silently keep the last,
//! so a policy could say two things and mean one), and the input size is capped.

use crate::diagnostic::pointer_segment;
use serde_core::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// The largest JSON document accepted (a plugin configuration or a policy file).
/// 100,000 typical policies take about 12 MiB.
pub const MAX_JSON_BYTES: usize = 64 * 1024 * 1024;

/// Where a value sits, as a chain of stack frames: no allocation unless an
/// error has to be reported.
#[derive(Clone, Copy)]
enum Location<'a> {
    Root,
    Key(&'a Location<'a>, &'a str),
    Index(&'a Location<'a>, usize),
}

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Root => Ok(()),
            Location::Key(parent, key) => write!(f, "{parent}/{}", pointer_segment(key)),
            Location::Index(parent, i) => write!(f, "{parent}/{i}"),
        }
    }
}

struct ValueAt<'a>(Location<'a>);

impl<'de> DeserializeSeed<'de> for ValueAt<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueAt<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
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

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(v) = seq.next_element_seed(ValueAt(Location::Index(&self.0, out.len())))? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key `{key}` in the object at `{}`",
                    if matches!(self.0, Location::Root) {
                        "/".to_owned()
                    } else {
                        self.0.to_string()
                    }
                )));
            }
            let value = map.next_value_seed(ValueAt(Location::Key(&self.0, &key)))?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// Why a JSON document was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    TooLarge { bytes: usize },
    Syntax(String),
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::TooLarge { bytes } => write!(
                f,
                "{bytes} bytes is over the {MAX_JSON_BYTES}-byte limit for one JSON document"
            ),
            JsonError::Syntax(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for JsonError {}

/// A fingerprint of a configuration's bytes, to tell whether a configuration
/// was already applied (not a defence against a crafted collision: whoever
/// writes configurations is trusted).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    use std::hash::BuildHasher as _;
    foldhash::fast::FixedState::with_seed(0x6f72_6967_696e).hash_one(bytes)
}

/// Parses one JSON document: size-capped, duplicate keys refused, nesting
/// bounded by serde_json's recursion limit (128).
pub fn parse_json(bytes: &[u8]) -> Result<Value, JsonError> {
    if bytes.len() > MAX_JSON_BYTES {
        return Err(JsonError::TooLarge { bytes: bytes.len() });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(JsonError::Syntax("the document is empty".to_owned()));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = ValueAt(Location::Root)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| JsonError::Syntax(e.to_string()))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_value_as_serde_json() {
        let text = br#"{"a": [1, -2, 3.5, "x\u00e9", null, true, {"b": {}}], "c": {"d": []}}"#;
        let strict = parse_json(text).unwrap();
        let plain: Value = serde_json::from_slice(text).unwrap();
        assert_eq!(strict, plain);
    }

    #[test]
    fn duplicate_keys_name_their_object() {
        let err = parse_json(br#"{"policies": [{"primary": {"port": 80, "port": 443}}]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("duplicate key `port` in the object at `/policies/0/primary`"),
            "{err}"
        );
        let top = parse_json(br#"{"a": 1, "a": 1}"#).unwrap_err().to_string();
        assert!(
            top.contains("duplicate key `a` in the object at `/`"),
            "{top}"
        );
        // The same key in sibling objects is fine.
        assert!(parse_json(br#"[{"a": 1}, {"a": 2}]"#).is_ok());
    }

    #[test]
    fn escaped_keys_compare_decoded() {
        let err = parse_json(br#"{"a~b": 1, "a\u007eb": 2}"#).unwrap_err();
        assert!(err.to_string().contains("duplicate key `a~b`"), "{err}");
    }

    #[test]
    fn empty_deep_and_huge_documents_are_refused() {
        assert_eq!(
            parse_json(b" \n").unwrap_err(),
            JsonError::Syntax("the document is empty".to_owned())
        );
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let err = parse_json(deep.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("recursion limit"), "{err}");
        let huge = vec![b' '; MAX_JSON_BYTES + 1];
        assert_eq!(
            parse_json(&huge).unwrap_err(),
            JsonError::TooLarge {
                bytes: MAX_JSON_BYTES + 1
            }
        );
        assert!(parse_json(b"{} x").is_err());
    }
}
