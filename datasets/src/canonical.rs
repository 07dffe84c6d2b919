//! Canonical JSON: object keys sorted (byte order), no insignificant whitespace.
//!
//! The research copy must be byte-identical across runs so that re-importing the same
//! source is idempotent. `serde_json::Value` keeps its keys sorted only while serde_json's
//! `preserve_order` feature is off, and cargo unifies features across the whole build, so
//! whether the map is sorted is checked once at run time; if it is not, keys are sorted
//! here explicitly.

use std::sync::OnceLock;

use serde_json::{Map, Value};

/// Whether `serde_json::Map` iterates in key order (no `preserve_order` in this build).
fn maps_are_sorted() -> bool {
    static SORTED: OnceLock<bool> = OnceLock::new();
    *SORTED.get_or_init(|| {
        let mut m = Map::new();
        m.insert("b".into(), Value::Null);
        m.insert("a".into(), Value::Null);
        m.keys().next().map(String::as_str) == Some("a")
    })
}

/// Serializes `value` canonically: keys sorted, compact.
pub fn to_vec(value: &Value) -> Vec<u8> {
    if maps_are_sorted() {
        // serde_json's compact Display, already in key order.
        return value.to_string().into_bytes();
    }
    let mut out = Vec::with_capacity(256);
    write(value, &mut out);
    out
}

/// Appends `value`, serialized canonically, to `out`.
pub fn append(value: &Value, out: &mut Vec<u8>) {
    if maps_are_sorted() && serde_json::to_writer(&mut *out, value).is_ok() {
        return;
    }
    write(value, out);
}

/// A FHIR `collection` Bundle written canonically one resource at a time, so that the
/// resources need not be held together: the bytes equal those of
/// `to_vec({"entry": [{"resource": r}, …], "resourceType": "Bundle", "type": "collection"})`.
#[derive(Debug, Default)]
pub struct CollectionWriter {
    out: Vec<u8>,
}

impl CollectionWriter {
    /// Appends one resource.
    pub fn push(&mut self, resource: &Value) {
        self.out.extend_from_slice(if self.out.is_empty() {
            &b"{\"entry\":["[..]
        } else {
            b","
        });
        self.out.extend_from_slice(b"{\"resource\":");
        append(resource, &mut self.out);
        self.out.push(b'}');
    }

    /// The Bundle's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        if self.out.is_empty() {
            self.out.extend_from_slice(b"{\"entry\":[");
        }
        self.out
            .extend_from_slice(b"],\"resourceType\":\"Bundle\",\"type\":\"collection\"}");
        self.out
    }
}

/// Parses JSON text into a `Value` (through `FromStr`, serde_json's own instantiation).
pub fn parse(bytes: &[u8]) -> Result<Value, ParseError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ParseError::Utf8 {
        offset: e.valid_up_to(),
    })?;
    text.parse::<Value>().map_err(ParseError::Json)
}

/// Why JSON text could not be parsed.
#[derive(Debug)]
pub enum ParseError {
    /// The bytes are not UTF-8 (byte offset of the first bad byte).
    Utf8 { offset: usize },
    /// A JSON syntax error.
    Json(serde_json::Error),
}

fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(key, out);
                out.push(b':');
                if let Some(v) = map.get(key) {
                    write(v, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(v, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_str(s, out),
        scalar => {
            // Null, Bool and Number: serde_json's own compact form, which is deterministic
            // (shortest round-trip representation for floats).
            if serde_json::to_writer(&mut *out, scalar).is_err() {
                out.extend_from_slice(b"null");
            }
        }
    }
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_recursively_and_is_compact() {
        let v = json!({"b": 1, "a": {"z": [true, null, 1.5], "y": "x\"y"}});
        let want = r#"{"a":{"y":"x\"y","z":[true,null,1.5]},"b":1}"#;
        assert_eq!(String::from_utf8(to_vec(&v)).unwrap(), want);
        let mut slow = Vec::new();
        write(&v, &mut slow);
        assert_eq!(String::from_utf8(slow).unwrap(), want);
    }

    #[test]
    fn a_collection_written_one_by_one_is_the_canonical_bundle() {
        let resources = [
            json!({"resourceType": "A", "b": [2, 1]}),
            json!({"z": {"y": 1, "x": "q"}}),
        ];
        for n in 0..=resources.len() {
            let mut w = CollectionWriter::default();
            for r in &resources[..n] {
                w.push(r);
            }
            let entry: Vec<Value> = resources[..n]
                .iter()
                .map(|r| json!({"resource": r}))
                .collect();
            let whole = json!({"entry": entry, "resourceType": "Bundle", "type": "collection"});
            assert_eq!(w.finish(), to_vec(&whole), "{n} resources");
        }
    }

    #[test]
    fn parse_errors() {
        assert!(parse(b"{\"a\": 1}").is_ok());
        assert!(matches!(
            parse(b"{\"a\": \xff}"),
            Err(ParseError::Utf8 { offset: 6 })
        ));
        match parse(b"{\n\"a\": }") {
            Err(ParseError::Json(e)) => assert_eq!(e.line(), 2),
            other => panic!("{other:?}"),
        }
    }
}
