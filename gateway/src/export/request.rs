//! A Bulk Data kick-off's parameters, parsed without I/O: `_type`, `_since`,
//! `_outputFormat`, `_typeFilter`.

use serde::{Deserialize, Serialize};

use crate::fhir::query::{self, parse_date_range, Handling, QueryError, SearchKind, SearchQuery};

/// The NDJSON media types Bulk Data clients may ask for.
const OUTPUT_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// What to export.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportParameters {
    /// Resource types; empty means every type the client may see.
    pub types: Vec<String>,
    /// Only resources updated at or after this (Unix ms).
    pub since: Option<i64>,
    /// `_typeFilter`s as `Type?query`; a resource of a filtered type is exported when it
    /// matches any of its type's filters.
    pub type_filters: Vec<String>,
}

impl ExportParameters {
    /// The parsed filters of `resource_type` (none: no filter).
    pub fn filters_of(&self, resource_type: &str) -> Vec<SearchQuery> {
        self.type_filters
            .iter()
            .filter_map(|filter| {
                let (filter_type, query) = filter.split_once('?')?;
                (filter_type == resource_type).then(|| parse_filter(filter_type, query).ok())?
            })
            .collect()
    }
}

fn parse_filter(resource_type: &str, query: &str) -> Result<SearchQuery, QueryError> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let parsed = query::parse(SearchKind::Type(resource_type), &pairs, Handling::Strict)?;
    if parsed.count != query::DEFAULT_COUNT
        || parsed.cursor.is_some()
        || !parsed.includes.is_empty()
        || parsed.patient.is_some()
    {
        return Err(QueryError(format!(
            "_typeFilter {resource_type}?{query}: only code, category, date, _id and _lastUpdated filter an export"
        )));
    }
    Ok(parsed)
}

/// Parses the kick-off's query parameters; `served` are the types that can be exported.
pub fn parse(params: &[(String, String)], served: &[&str]) -> Result<ExportParameters, QueryError> {
    let mut parameters = ExportParameters::default();
    for (name, value) in params {
        match name.as_str() {
            "_outputFormat" => {
                if !OUTPUT_FORMATS.contains(&value.as_str()) {
                    return Err(QueryError(format!(
                        "_outputFormat {value:?} is not supported (use application/fhir+ndjson)"
                    )));
                }
            }
            "_type" => {
                for resource_type in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if !served.contains(&resource_type) {
                        return Err(QueryError(format!(
                            "_type {resource_type:?} is not a type this server exports"
                        )));
                    }
                    if !parameters.types.iter().any(|t| t == resource_type) {
                        parameters.types.push(resource_type.to_string());
                    }
                }
            }
            "_since" => {
                let range = parse_date_range(value)
                    .filter(|_| value.len() > 10)
                    .ok_or_else(|| QueryError(format!("_since {value:?} is not a FHIR instant")))?;
                parameters.since = Some(range.start);
            }
            "_typeFilter" => {
                for filter in value.split(',').filter(|f| !f.is_empty()) {
                    let (resource_type, query) = filter.split_once('?').ok_or_else(|| {
                        QueryError(format!("_typeFilter {filter:?} is not Type?query"))
                    })?;
                    if !served.contains(&resource_type) {
                        return Err(QueryError(format!(
                            "_typeFilter names {resource_type:?}, not a type this server exports"
                        )));
                    }
                    parse_filter(resource_type, query)?;
                    parameters.type_filters.push(filter.to_string());
                }
            }
            other => {
                return Err(QueryError(format!(
                    "parameter {other:?} is not supported by this export"
                )))
            }
        }
    }
    for filter in &parameters.type_filters {
        let filter_type = filter.split('?').next().unwrap_or_default();
        if !parameters.types.is_empty() && !parameters.types.iter().any(|t| t == filter_type) {
            return Err(QueryError(format!(
                "_typeFilter names {filter_type}, which _type leaves out"
            )));
        }
    }
    Ok(parameters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SERVED: &[&str] = &["Patient", "Observation", "Condition", "MedicationDispense"];

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kick_off_parameters() {
        let parsed = parse(
            &pairs(&[
                ("_type", "Observation,Patient,Observation"),
                ("_since", "2026-01-01T00:00:00Z"),
                ("_outputFormat", "application/fhir+ndjson"),
                ("_typeFilter", "Observation?category=laboratory"),
            ]),
            SERVED,
        )
        .unwrap();
        assert_eq!(parsed.types, vec!["Observation", "Patient"]);
        assert_eq!(parsed.since, Some(1_767_225_600_000));
        assert_eq!(parsed.filters_of("Observation").len(), 1);
        assert!(parsed.filters_of("Patient").is_empty());
    }

    #[test]
    fn bad_kick_offs_are_refused_with_a_reason() {
        for (params, needle) in [
            (vec![("_type", "Practitioner")], "Practitioner"),
            (vec![("_since", "yesterday")], "_since"),
            (vec![("_since", "2026-01-01")], "_since"),
            (vec![("_outputFormat", "text/csv")], "_outputFormat"),
            (vec![("_typeFilter", "Observation")], "Type?query"),
            (
                vec![("_typeFilter", "Observation?flavour=salty")],
                "flavour",
            ),
            (vec![("_typeFilter", "Observation?_count=5")], "only code"),
            (
                vec![("_type", "Patient"), ("_typeFilter", "Observation?code=x")],
                "leaves out",
            ),
            (vec![("_elements", "id")], "_elements"),
        ] {
            let error = parse(&pairs(&params), SERVED).unwrap_err();
            assert!(error.0.contains(needle), "{params:?}: {error}");
        }
    }

    proptest! {
        #[test]
        fn parsing_never_panics(params in proptest::collection::vec(("[_a-zA-Z]{0,12}", "\\PC{0,30}"), 0..5)) {
            let _ = parse(&params, SERVED);
        }
    }
}
