//! JSON text to a `serde_json::Value`, with the checks a policy push needs that
//! `serde_json::from_slice` does not make: a key given twice in one object is
//! an error naming its JSON pointer (serde_json would silently keep the last,
//! so a policy could say two things and mean one), and the input size is capped.

use crate::policy::diagnostic::pointer_segment;
use serde_core::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
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

/// A fingerprint of one document's bytes, to recognise a policy already
/// compiled: 128 bits (two differently seeded hashes), so that an accidental
/// collision among 200,000 documents is out of reach. Like [`fingerprint`], not
/// a defence against a crafted collision.
pub(crate) fn document_fingerprint(bytes: &[u8]) -> u128 {
    use std::hash::BuildHasher as _;
    let low = foldhash::fast::FixedState::with_seed(0x6f72_6967_696e).hash_one(bytes);
    let high = foldhash::fast::FixedState::with_seed(0x706f_6c69_6379).hash_one(bytes);
    (u128::from(high) << 64) | u128::from(low)
}

/// A plugin configuration's envelope with its parts still as JSON text,
/// borrowed from the configuration: `{"settings": ..., "policies": [...]}`.
/// Scanning it checks the JSON syntax of the whole configuration but builds
/// no tree; each part is parsed (with [`parse_json`]'s checks) only when it
/// has to be.
pub(crate) struct RawEnvelope<'a> {
    pub settings: Option<&'a RawValue>,
    pub policies: Option<Vec<&'a RawValue>>,
    pub schema: Option<&'a RawValue>,
    pub delivery: Option<&'a RawValue>,
}

/// Why an envelope could not be scanned. The message is only a fallback: the
/// caller reports the error a full parse gives.
#[derive(Debug)]
pub(crate) struct EnvelopeError(pub String);

struct EnvelopeVisitor {
    max_policies: usize,
}

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = RawEnvelope<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object with `settings` and `policies`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEnvelope<'de>, A::Error> {
        let mut out = RawEnvelope {
            settings: None,
            policies: None,
            schema: None,
            delivery: None,
        };
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let taken = match key.as_ref() {
                "settings" => out.settings.replace(map.next_value()?).is_some(),
                "$schema" => out.schema.replace(map.next_value()?).is_some(),
                "delivery" => out.delivery.replace(map.next_value()?).is_some(),
                "policies" => out
                    .policies
                    .replace(map.next_value_seed(RawList {
                        max: self.max_policies,
                    })?)
                    .is_some(),
                other => {
                    return Err(de::Error::custom(format_args!(
                        "unknown top-level field `{other}`"
                    )))
                }
            };
            if taken {
                return Err(de::Error::custom(format_args!(
                    "duplicate key `{key}` in the object at `/`"
                )));
            }
        }
        Ok(out)
    }
}

/// The `policies` array as raw documents; refused past `max` entries without
/// reading the rest.
struct RawList {
    max: usize,
}

impl<'de> DeserializeSeed<'de> for RawList {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RawList {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of policy objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(document) = seq.next_element::<&'de RawValue>()? {
            if out.len() == self.max {
                return Err(de::Error::custom("too many policies"));
            }
            out.push(document);
        }
        Ok(out)
    }
}

/// Scans a plugin configuration's envelope (see [`RawEnvelope`]).
pub(crate) fn scan_envelope(
    bytes: &[u8],
    max_policies: usize,
) -> Result<RawEnvelope<'_>, EnvelopeError> {
    if bytes.len() > MAX_JSON_BYTES {
        return Err(EnvelopeError(
            JsonError::TooLarge { bytes: bytes.len() }.to_string(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let envelope = de
        .deserialize_map(EnvelopeVisitor { max_policies })
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| EnvelopeError(e.to_string()))?;
    Ok(envelope)
}

/// The `domain` member of a policy document, if it is a string: read without
/// building the document's tree, to find a domain's document among many.
pub(crate) fn domain_text(document: &RawValue) -> Option<String> {
    struct DomainOnly;
    impl<'de> Visitor<'de> for DomainOnly {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a policy object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
            let mut domain = None;
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if key == "domain" && domain.is_none() {
                    domain = match map.next_value::<Value>()? {
                        Value::String(text) => Some(text),
                        _ => None,
                    };
                } else {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
            Ok(domain)
        }
    }
    let mut de = serde_json::Deserializer::from_str(document.get());
    de.deserialize_map(DomainOnly).ok().flatten()
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
