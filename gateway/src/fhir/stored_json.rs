//! `present`, straight from the stored bytes, for bulk export: the same served resource,
//! written as one NDJSON line, but only the parts that can change are parsed into a JSON
//! tree. The top level is split into its members; `id` and `meta` are the gateway's, a
//! member that may hold a `reference` is parsed and rewritten, and every other member is
//! copied as stored. Building the whole tree (and serialising it again) was most of an
//! export's reading time. No I/O.
//!
//! Anything the split does not take exactly (a body over several lines, a top-level member
//! named twice, a top level that is not an object) is parsed whole and served by `present`
//! itself. Members copied as stored keep their text as received: a decimal keeps its
//! written precision (`1.50`), where a tree would print the nearest float.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::present::{
    collect_references, note_reference, present, rewrite_reference, rewrite_references, stamp_meta,
    ReferenceMap, Served,
};

/// A stored body read for serving.
pub enum StoredJson<'a> {
    /// The top level's members, in order.
    Split(Vec<(Cow<'a, str>, Member<'a>)>),
    /// Parsed whole, for `present`.
    Whole(Value),
}

/// One top-level member's value.
pub enum Member<'a> {
    /// Copied as stored: it holds nothing the gateway changes.
    Stored(&'a RawValue),
    /// Parsed: the gateway's `meta`, or a value that may hold a reference.
    Parsed(Value),
}

impl<'a> StoredJson<'a> {
    /// Reads `body`; an error only when it is not JSON.
    pub fn parse(body: &'a [u8]) -> serde_json::Result<Self> {
        // NDJSON needs each resource on one line; JSON strings cannot hold a raw line break,
        // so a body without one has none inside its members either.
        if !body.contains(&b'\n') && !body.contains(&b'\r') {
            if let Ok(TopLevel(members)) = serde_json::from_slice::<TopLevel>(body) {
                let named_once = members
                    .iter()
                    .enumerate()
                    .all(|(i, (name, _))| members[..i].iter().all(|(other, _)| other != name));
                if named_once {
                    return Ok(StoredJson::Split(
                        members
                            .into_iter()
                            .map(|(name, raw)| {
                                let member = if may_change(&name, raw) {
                                    Member::Parsed(serde_json::from_str(raw.get())?)
                                } else {
                                    Member::Stored(raw)
                                };
                                Ok((name, member))
                            })
                            .collect::<serde_json::Result<_>>()?,
                    ));
                }
            }
        }
        Ok(StoredJson::Whole(serde_json::from_slice(body)?))
    }

    /// The relative references other than to `Patient`, each once (as `references_in`).
    pub fn references(&self) -> Vec<(String, String)> {
        let mut found = Vec::new();
        match self {
            StoredJson::Whole(value) => collect_references(value, &mut found),
            StoredJson::Split(members) => {
                for (name, member) in members {
                    let Member::Parsed(value) = member else {
                        continue;
                    };
                    if let ("reference", Value::String(reference)) = (name.as_ref(), value) {
                        note_reference(reference, &mut found);
                    }
                    collect_references(value, &mut found);
                }
            }
        }
        found
    }

    /// The resource as served, as one line of JSON (without its line break) onto `out`.
    pub fn write_served(
        self,
        served: &Served<'_>,
        references: &ReferenceMap,
        out: &mut Vec<u8>,
    ) -> serde_json::Result<()> {
        let members = match self {
            StoredJson::Whole(value) => {
                return serde_json::to_writer(out, &present(value, served, references))
            }
            StoredJson::Split(members) => members,
        };
        out.push(b'{');
        let (mut has_id, mut has_meta) = (false, false);
        let mut first = true;
        for (name, member) in members {
            member_separator(out, &mut first);
            serde_json::to_writer(&mut *out, name.as_ref())?;
            out.push(b':');
            match (name.as_ref(), member) {
                ("id", _) => {
                    has_id = true;
                    serde_json::to_writer(&mut *out, served.id)?;
                }
                (_, Member::Stored(raw)) => out.extend_from_slice(raw.get().as_bytes()),
                (name, Member::Parsed(mut value)) => {
                    if let ("reference", Value::String(reference)) = (name, &mut value) {
                        rewrite_reference(reference, served.patient_id, references);
                    }
                    rewrite_references(&mut value, served.patient_id, references);
                    if name == "meta" {
                        has_meta = true;
                        stamp_meta(&mut value, served);
                    }
                    serde_json::to_writer(&mut *out, &value)?;
                }
            }
        }
        // `present` adds a missing `id`, then a missing `meta`, at the end.
        if !has_id {
            member_separator(out, &mut first);
            out.extend_from_slice(b"\"id\":");
            serde_json::to_writer(&mut *out, served.id)?;
        }
        if !has_meta {
            member_separator(out, &mut first);
            let mut meta = Value::Object(Map::new());
            stamp_meta(&mut meta, served);
            out.extend_from_slice(b"\"meta\":");
            serde_json::to_writer(&mut *out, &meta)?;
        }
        out.push(b'}');
        Ok(())
    }
}

fn member_separator(out: &mut Vec<u8>, first: &mut bool) {
    if !*first {
        out.push(b',');
    }
    *first = false;
}

/// Whether serving may change a member: `meta` always; anything that holds a member named
/// `reference` (or might, behind an escaped name).
fn may_change(name: &str, raw: &RawValue) -> bool {
    let text = raw.get();
    name == "meta" || name == "reference" || text.contains("\"reference\"") || text.contains("\\u")
}

/// The top-level object's members, in order, each value as stored.
struct TopLevel<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = TopLevel<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some((Name(name), raw)) = map.next_entry::<Name, &RawValue>()? {
                    members.push((name, raw));
                }
                Ok(TopLevel(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// A member name: borrowed from the body unless it had escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = Name<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(name)))
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(name.to_string())))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::present::references_in;
    use proptest::prelude::*;

    const SERVED: Served<'static> = Served {
        id: "g-1",
        version: 3,
        last_updated: "2026-11-25T00:00:00Z",
        source: "hospital",
        patient_id: "p-1",
    };

    fn reference_map() -> ReferenceMap {
        let mut map = ReferenceMap::new();
        map.insert(("Medication".into(), "m-1".into()), "g-med".into());
        map.insert(("Encounter".into(), "e/1".into()), "never".into());
        map.insert(("Observation".into(), "o-2".into()), "g-obs".into());
        map
    }

    /// The line written from `body`, checked against `present` on the parsed body.
    fn line_matches_present(body: &[u8]) -> Result<Vec<u8>, TestCaseError> {
        let references = reference_map();
        let stored = StoredJson::parse(body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let whole: Value = serde_json::from_slice(body).unwrap();
        let mut wanted = stored.references();
        let mut expected_refs = references_in(&whole);
        wanted.sort();
        expected_refs.sort();
        prop_assert_eq!(wanted, expected_refs);
        let mut line = Vec::new();
        stored
            .write_served(&SERVED, &references, &mut line)
            .unwrap();
        prop_assert!(!line.contains(&b'\n') && !line.contains(&b'\r'));
        let written: Value = serde_json::from_slice(&line).unwrap();
        prop_assert_eq!(written, present(whole, &SERVED, &references));
        Ok(line)
    }

    #[test]
    fn each_shape_is_served_as_present_serves_it() {
        let table: [(&str, &str); 13] = [
            (
                "references, meta kept and stamped",
                r#"{"resourceType":"MedicationRequest","id":"src","meta":{"versionId":"9","profile":["x"]},"subject":{"reference":"Patient/h-42","display":"kept"},"medicationReference":{"reference":"Medication/m-1"},"basedOn":[{"reference":"https://x/ServiceRequest/1"}]}"#,
            ),
            ("no id, no meta", r#"{"resourceType":"Observation","status":"final"}"#),
            ("empty object", "{}"),
            ("meta not an object", r#"{"resourceType":"Observation","meta":"odd"}"#),
            (
                "meta with its own source",
                r#"{"meta":{"source":"urn:theirs","extension":[{"valueReference":{"reference":"Observation/o-2"}}]}}"#,
            ),
            (
                "a reference one level down in a member of any name",
                r#"{"source":{"reference":"Patient/h-1"}}"#,
            ),
            ("a top-level reference", r#"{"reference":"Observation/o-2","id":"x"}"#),
            (
                "an escaped member name",
                r#"{"focus":{"refer\u0065nce":"Medication/m-1"}}"#,
            ),
            (
                "pretty-printed",
                "{\n  \"resourceType\": \"Observation\",\n  \"subject\": {\"reference\": \"Patient/1\"}\n}",
            ),
            (
                "a member named twice",
                r#"{"id":"a","status":"x","status":"y","subject":{"reference":"Patient/1"}}"#,
            ),
            ("not an object", r#"["Patient/1",{"reference":"Patient/2"}]"#),
            (
                "escapes and Japanese text kept",
                r#"{"code":{"text":"\u8840\u5727 \"quoted\"","coding":[{"display":"血圧"}]},"valueQuantity":{"value":1.50}}"#,
            ),
            (
                "whitespace around members",
                r#" { "id" : "x" , "status" : "final" , "note" : [ { "text" : "a b" } ] } "#,
            ),
        ];
        for (case, body) in table {
            if let Err(e) = line_matches_present(body.as_bytes()) {
                panic!("{case}: {e}");
            }
        }
    }

    #[test]
    fn members_without_references_keep_their_text() {
        let body = br#"{"resourceType":"Observation","valueQuantity":{"value":1.50,"unit":"mmol/L"},"subject":{"reference":"Patient/h"}}"#;
        let line = line_matches_present(body).unwrap();
        let line = String::from_utf8(line).unwrap();
        assert!(
            line.contains(r#""valueQuantity":{"value":1.50,"unit":"mmol/L"}"#),
            "{line}"
        );
        assert!(
            line.contains(r#""subject":{"reference":"Patient/p-1"}"#),
            "{line}"
        );
        assert!(line.ends_with(r#""id":"g-1","meta":{"versionId":"3","lastUpdated":"2026-11-25T00:00:00Z","source":"urn:phr-gateway:source:hospital"}}"#), "{line}");
    }

    #[test]
    fn a_body_that_is_not_json_is_an_error() {
        for body in [
            &b"{"[..],
            b"",
            b"{\"a\":}",
            b"\xff\xfe",
            b"{\"a\":1} trailing",
        ] {
            assert!(StoredJson::parse(body).is_err(), "{body:?}");
        }
    }

    /// JSON values shaped like FHIR resources: names and strings drawn mostly from those
    /// the gateway looks at, so references, ids and meta come up often.
    fn fhir_like() -> impl Strategy<Value = Value> {
        let text = prop_oneof![
            Just("Patient/h-1".to_string()),
            Just("Medication/m-1".to_string()),
            Just("Observation/o-2/_history/4".to_string()),
            Just("Encounter/e-9".to_string()),
            Just("urn:uuid:0f0e".to_string()),
            Just("#contained".to_string()),
            Just("reference".to_string()),
            "[a-zA-Z0-9/ \"\\\\\u{3042}-\u{3093}\t]{0,12}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            // Decimals of a few digits: their text survives a parse and print unchanged, so
            // a tree and the stored text compare equal.
            (-100_000i32..100_000).prop_map(|n| Value::from(f64::from(n) / 100.0)),
            text.prop_map(Value::String),
        ];
        let name = prop_oneof![
            Just("reference".to_string()),
            Just("id".to_string()),
            Just("meta".to_string()),
            Just("source".to_string()),
            Just("subject".to_string()),
            Just("versionId".to_string()),
            "[a-z]{1,6}",
            "[a-z\"\\\\\u{3042}]{1,4}",
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((name.clone(), inner), 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_body_is_served_as_present_serves_it(value in fhir_like(), pretty in any::<bool>()) {
            let body = if pretty {
                serde_json::to_vec_pretty(&value).unwrap()
            } else {
                serde_json::to_vec(&value).unwrap()
            };
            line_matches_present(&body)?;
        }
    }
}
