//! Search parameters of the FHIR API, parsed without I/O: which ones a resource type takes,
//! their values (tokens, dates with prefixes, `_count`), and what happens to parameters
//! the gateway does not know (`Prefer: handling=strict` refuses them, lenient ignores them).

use std::fmt;

use time::macros::offset;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// Page size when `_count` is absent.
pub const DEFAULT_COUNT: usize = 50;
/// Largest page the gateway serves.
pub const MAX_COUNT: usize = 200;

/// Dates without a time zone are Japan time: the gateway serves a Japanese record.
const LOCAL_OFFSET: UtcOffset = offset!(+9);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    Strict,
    Lenient,
}

impl Handling {
    /// From a `Prefer` header value (`handling=strict` or `handling=lenient`); lenient is
    /// the FHIR default.
    pub fn from_prefer(prefer: Option<&str>) -> Handling {
        let strict = prefer.is_some_and(|value| {
            value
                .split([',', ';'])
                .any(|part| part.trim().eq_ignore_ascii_case("handling=strict"))
        });
        if strict {
            Handling::Strict
        } else {
            Handling::Lenient
        }
    }
}

/// Why a search cannot be run as asked (answered 400 with an `OperationOutcome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError(pub String);

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A token search value: `[system]|[code]`, `code` (any system) or `system|` (any code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// `None`: any system; `Some("")`: no system.
    pub system: Option<String>,
    /// `None`: any code in the system.
    pub code: Option<String>,
}

impl Token {
    pub fn parse(value: &str) -> Result<Token, QueryError> {
        let token = match value.split_once('|') {
            Some((system, code)) => Token {
                system: Some(system.to_string()),
                code: (!code.is_empty()).then(|| code.to_string()),
            },
            None => Token {
                system: None,
                code: Some(value.to_string()),
            },
        };
        if token.code.is_none() && token.system.as_deref().is_none_or(str::is_empty) {
            return Err(QueryError(format!("{value:?} is not a token")));
        }
        Ok(token)
    }

    /// Whether a coding (`system`, `code`) matches.
    pub fn matches(&self, system: Option<&str>, code: Option<&str>) -> bool {
        let system_ok = match self.system.as_deref() {
            None => true,
            Some("") => system.is_none(),
            Some(wanted) => system == Some(wanted),
        };
        let code_ok = match self.code.as_deref() {
            None => true,
            Some(wanted) => code == Some(wanted),
        };
        system_ok && code_ok
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Gt,
    Lt,
    Ge,
    Le,
}

/// A time range `[start, end)` in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: i64,
    pub end: i64,
}

/// A date search value: its prefix and the range its precision covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateValue {
    pub prefix: Prefix,
    pub range: Range,
}

impl DateValue {
    pub fn parse(value: &str) -> Result<DateValue, QueryError> {
        let (prefix, rest) = match value.get(..2) {
            Some("eq") => (Prefix::Eq, &value[2..]),
            Some("gt") => (Prefix::Gt, &value[2..]),
            Some("lt") => (Prefix::Lt, &value[2..]),
            Some("ge") => (Prefix::Ge, &value[2..]),
            Some("le") => (Prefix::Le, &value[2..]),
            Some("ne" | "sa" | "eb" | "ap") => {
                return Err(QueryError(format!(
                    "date prefix {:?} is not supported (use eq, gt, lt, ge or le)",
                    &value[..2]
                )))
            }
            _ => (Prefix::Eq, value),
        };
        let range = parse_date_range(rest)
            .ok_or_else(|| QueryError(format!("{value:?} is not a FHIR date or dateTime")))?;
        Ok(DateValue { prefix, range })
    }

    /// FHIR's comparison of a target's range with this value's range.
    pub fn matches(&self, target: Range) -> bool {
        let within = self.range.start <= target.start && target.end <= self.range.end;
        match self.prefix {
            Prefix::Eq => within,
            Prefix::Gt => target.end > self.range.end,
            Prefix::Lt => target.start < self.range.start,
            Prefix::Ge => target.end > self.range.end || within,
            Prefix::Le => target.start < self.range.start || within,
        }
    }

    /// The instants `[from, to]` (inclusive, Unix ms) this value admits for a point in
    /// time, e.g. a resource's last update.
    pub fn instant_bounds(&self) -> (Option<i64>, Option<i64>) {
        let Range { start, end } = self.range;
        match self.prefix {
            Prefix::Eq => (Some(start), Some(end - 1)),
            Prefix::Gt => (Some(end), None),
            Prefix::Lt => (None, Some(start - 1)),
            Prefix::Ge => (Some(start), None),
            Prefix::Le => (None, Some(end - 1)),
        }
    }
}

/// The range a FHIR `date`, `dateTime` or `instant` covers at its precision.
pub fn parse_date_range(value: &str) -> Option<Range> {
    let millis = |t: OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000) as i64;
    let local_day = |date: Date| {
        millis(PrimitiveDateTime::new(date, Time::MIDNIGHT).assume_offset(LOCAL_OFFSET))
    };
    let bytes = value.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        value
            .get(range.clone())
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<i32>().ok())
    };
    let year = digits(0..4)?;
    match value.len() {
        4 => {
            let start = Date::from_calendar_date(year, Month::January, 1).ok()?;
            let end = Date::from_calendar_date(year + 1, Month::January, 1).ok()?;
            Some(Range {
                start: local_day(start),
                end: local_day(end),
            })
        }
        7 if bytes[4] == b'-' => {
            let month = Month::try_from(u8::try_from(digits(5..7)?).ok()?).ok()?;
            let start = Date::from_calendar_date(year, month, 1).ok()?;
            let (next_year, next_month) = if month == Month::December {
                (year + 1, Month::January)
            } else {
                (year, month.next())
            };
            let end = Date::from_calendar_date(next_year, next_month, 1).ok()?;
            Some(Range {
                start: local_day(start),
                end: local_day(end),
            })
        }
        10 if bytes[4] == b'-' && bytes[7] == b'-' => {
            let month = Month::try_from(u8::try_from(digits(5..7)?).ok()?).ok()?;
            let day = u8::try_from(digits(8..10)?).ok()?;
            let date = Date::from_calendar_date(year, month, day).ok()?;
            let start = local_day(date);
            Some(Range {
                start,
                end: start + 86_400_000,
            })
        }
        _ => parse_date_time(value),
    }
}

/// A dateTime with hours and minutes at least; the range is its precision (a minute, a
/// second or a millisecond).
fn parse_date_time(value: &str) -> Option<Range> {
    use time::format_description::well_known::Rfc3339;
    let (local, zone) = split_zone(value)?;
    let (with_seconds, precision) = match local.len() {
        16 => (format!("{local}:00"), 60_000),
        19 => (local.to_string(), 1_000),
        n if n > 20 && local.as_bytes()[19] == b'.' => (local.to_string(), 1),
        _ => return None,
    };
    let parsed = OffsetDateTime::parse(&format!("{with_seconds}{zone}"), &Rfc3339).ok()?;
    let start = (parsed.unix_timestamp_nanos() / 1_000_000) as i64;
    Some(Range {
        start,
        end: start + precision,
    })
}

/// Splits `2024-05-01T10:00:00+09:00` into its local part and zone (`Z`, `±hh:mm`, or
/// Japan time when none is given).
fn split_zone(value: &str) -> Option<(&str, String)> {
    if value.len() < 16 || value.as_bytes().get(10) != Some(&b'T') {
        return None;
    }
    if let Some(local) = value.strip_suffix('Z') {
        return Some((local, "Z".into()));
    }
    let tail = &value[value.len().saturating_sub(6)..];
    let b = tail.as_bytes();
    if b.len() == 6 && (b[0] == b'+' || b[0] == b'-') && b[3] == b':' && value.len() > 19 {
        return Some((&value[..value.len() - 6], tail.to_string()));
    }
    Some((value, "+09:00".into()))
}

/// What `_include` may bring along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    /// The patient the matches are about (`X:patient`, `X:subject`, `*`).
    Patient,
    /// The Medication a medication resource references (`X:medication`, `*`).
    Medication,
}

/// A parsed search of one resource type in the patient compartment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchQuery {
    pub count: usize,
    /// `_lastUpdated`: inclusive instant bounds (Unix ms), all values intersected.
    pub updated_from: Option<i64>,
    pub updated_to: Option<i64>,
    /// Each parameter occurrence is ANDed; the comma-separated values within one are ORed.
    pub codes: Vec<Vec<Token>>,
    pub categories: Vec<Vec<Token>>,
    pub dates: Vec<DateValue>,
    pub ids: Vec<Vec<String>>,
    /// `patient` / `subject`: the patient id asked for (must be the caller's).
    pub patient: Option<String>,
    pub includes: Vec<Include>,
    /// Where the previous page ended (the gateway's own paging parameter).
    pub cursor: Option<String>,
    /// `$everything`'s `_type`: only these types.
    pub types: Vec<String>,
    /// Parameters ignored under lenient handling.
    pub ignored: Vec<String>,
}

impl SearchQuery {
    /// Whether the matches must be read to be filtered (so the store's count is not the
    /// number of matches).
    pub fn filters_content(&self) -> bool {
        !self.codes.is_empty() || !self.categories.is_empty() || !self.dates.is_empty()
    }
}

/// Which search kind the parameters belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchKind<'a> {
    /// `GET [base]/[type]?…`
    Type(&'a str),
    /// `GET [base]/Patient/[id]/$everything?…`
    Everything,
}

/// Parameters that change only the format or are answered anyway; accepted, not applied.
const HARMLESS: &[&str] = &["_format", "_pretty"];

/// Parses a query string's pairs for `kind`.
pub fn parse(
    kind: SearchKind<'_>,
    params: &[(String, String)],
    handling: Handling,
) -> Result<SearchQuery, QueryError> {
    let mut query = SearchQuery {
        count: DEFAULT_COUNT,
        ..SearchQuery::default()
    };
    let unknown = |name: &str, query: &mut SearchQuery| -> Result<(), QueryError> {
        match handling {
            Handling::Strict => Err(QueryError(format!(
                "search parameter {name:?} is not supported here"
            ))),
            Handling::Lenient => {
                query.ignored.push(name.to_string());
                Ok(())
            }
        }
    };
    for (raw_name, value) in params {
        // Modifiers other than none are not supported (`code:text`, `date:missing`…).
        let name = raw_name.as_str();
        if name.contains(':') && !name.starts_with("_include") {
            unknown(name, &mut query)?;
            continue;
        }
        match (name, kind) {
            ("_count", _) => {
                let count: i64 = value
                    .parse()
                    .map_err(|_| QueryError(format!("_count {value:?} is not a number")))?;
                if count < 0 {
                    return Err(QueryError("_count must not be negative".into()));
                }
                let count = count as usize;
                query.count = if count > MAX_COUNT {
                    if handling == Handling::Strict {
                        return Err(QueryError(format!("_count is at most {MAX_COUNT}")));
                    }
                    MAX_COUNT
                } else {
                    count
                };
            }
            ("_lastUpdated", _) | ("_since", SearchKind::Everything) => {
                let date = if name == "_since" {
                    let mut since = DateValue::parse(value)?;
                    since.prefix = Prefix::Ge;
                    since
                } else {
                    DateValue::parse(value)?
                };
                let (from, to) = date.instant_bounds();
                if let Some(from) = from {
                    query.updated_from = Some(query.updated_from.map_or(from, |f| f.max(from)));
                }
                if let Some(to) = to {
                    query.updated_to = Some(query.updated_to.map_or(to, |t| t.min(to)));
                }
            }
            ("_cursor", _) => {
                if value.is_empty()
                    || value.len() > 64
                    || !value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(QueryError("_cursor is not one the gateway gave".into()));
                }
                query.cursor = Some(value.clone());
            }
            ("_type", SearchKind::Everything) => {
                for resource_type in value.split(',').filter(|t| !t.is_empty()) {
                    query.types.push(resource_type.to_string());
                }
            }
            ("_id", SearchKind::Type(_)) => {
                query
                    .ids
                    .push(value.split(',').map(str::to_string).collect());
            }
            ("patient" | "subject", SearchKind::Type(t)) if t != "Patient" => {
                let id = value.strip_prefix("Patient/").unwrap_or(value);
                if id.is_empty() {
                    return Err(QueryError(format!("{name} needs a patient id")));
                }
                if query.patient.as_deref().is_some_and(|p| p != id) {
                    return Err(QueryError("two different patients asked for".into()));
                }
                query.patient = Some(id.to_string());
            }
            ("code", SearchKind::Type(t)) if code_path(t).is_some() => {
                query.codes.push(tokens(value)?);
            }
            ("category", SearchKind::Type(t)) if category_path(t).is_some() => {
                query.categories.push(tokens(value)?);
            }
            ("date", SearchKind::Type(t)) if date_paths(t).is_some() => {
                query.dates.push(DateValue::parse(value)?);
            }
            ("_include", SearchKind::Type(t)) => match include_of(t, value) {
                Some(include) => {
                    if !query.includes.contains(&include) {
                        query.includes.push(include);
                    }
                }
                None => unknown(&format!("_include={value}"), &mut query)?,
            },
            (name, _) if HARMLESS.contains(&name) => {}
            (name, _) => unknown(name, &mut query)?,
        }
    }
    Ok(query)
}

fn tokens(value: &str) -> Result<Vec<Token>, QueryError> {
    value.split(',').map(Token::parse).collect()
}

fn include_of(resource_type: &str, value: &str) -> Option<Include> {
    let medication_types = [
        "MedicationRequest",
        "MedicationDispense",
        "MedicationStatement",
    ];
    match value.split_once(':') {
        Some((source, "patient" | "subject"))
            if source == resource_type && resource_type != "Patient" =>
        {
            Some(Include::Patient)
        }
        Some((source, "medication"))
            if source == resource_type && medication_types.contains(&resource_type) =>
        {
            Some(Include::Medication)
        }
        _ => None,
    }
}

/// Where a type's `code` parameter looks (a CodeableConcept).
pub fn code_path(resource_type: &str) -> Option<&'static str> {
    Some(match resource_type {
        "Observation" | "Condition" | "AllergyIntolerance" | "DiagnosticReport" | "Medication" => {
            "code"
        }
        "MedicationRequest" | "MedicationDispense" | "MedicationStatement" => {
            "medicationCodeableConcept"
        }
        _ => return None,
    })
}

/// Where a type's `category` parameter looks (CodeableConcepts, or codes for
/// AllergyIntolerance).
pub fn category_path(resource_type: &str) -> Option<&'static str> {
    Some(match resource_type {
        "Observation"
        | "Condition"
        | "DiagnosticReport"
        | "DocumentReference"
        | "MedicationRequest"
        | "Composition"
        | "AllergyIntolerance"
        | "MedicationStatement"
        | "MedicationDispense" => "category",
        _ => return None,
    })
}

/// Where a type's `date` parameter looks, in order (`effectiveDateTime`, `effectivePeriod`…).
pub fn date_paths(resource_type: &str) -> Option<&'static [&'static str]> {
    Some(match resource_type {
        "Observation" | "DiagnosticReport" | "MedicationStatement" => {
            &["effectiveDateTime", "effectivePeriod", "effectiveInstant"]
        }
        "Encounter" => &["period"],
        "Immunization" => &["occurrenceDateTime"],
        "DocumentReference" | "Composition" => &["date"],
        "AllergyIntolerance" => &["recordedDate"],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn date_ranges_follow_precision_in_japan_time() {
        let day = parse_date_range("2024-05-01").unwrap();
        // 2024-05-01T00:00+09:00 = 2024-04-30T15:00Z.
        assert_eq!(day.start, 1_714_489_200_000);
        assert_eq!(day.end - day.start, 86_400_000);
        let month = parse_date_range("2024-02").unwrap();
        assert_eq!(month.end - month.start, 29 * 86_400_000);
        let year = parse_date_range("2023").unwrap();
        assert_eq!(year.end - year.start, 365 * 86_400_000);
        let instant = parse_date_range("2024-04-30T15:00:00Z").unwrap();
        assert_eq!(instant.start, day.start);
        assert_eq!(instant.end - instant.start, 1_000);
        let minute = parse_date_range("2024-05-01T00:00+09:00").unwrap();
        assert_eq!(minute.start, day.start);
        assert_eq!(minute.end - minute.start, 60_000);
        let millis = parse_date_range("2024-04-30T15:00:00.250Z").unwrap();
        assert_eq!(millis.start, day.start + 250);
        for bad in [
            "",
            "24",
            "2024-13",
            "2024-02-30",
            "2024/05/01",
            "yesterday",
            "2024-05-01T25:00Z",
        ] {
            assert_eq!(parse_date_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn date_prefixes_compare_ranges() {
        let may = |prefix: &str| DateValue::parse(&format!("{prefix}2024-05")).unwrap();
        let day = |d: &str| parse_date_range(d).unwrap();
        let table = [
            ("eq", "2024-05-10", true),
            ("eq", "2024-06-01", false),
            ("gt", "2024-06-01", true),
            ("gt", "2024-05-31", false),
            ("lt", "2024-04-30", true),
            ("lt", "2024-05-01", false),
            ("ge", "2024-05-01", true),
            ("ge", "2024-04-30", false),
            ("le", "2024-05-31", true),
            ("le", "2024-06-01", false),
        ];
        for (prefix, target, expected) in table {
            assert_eq!(
                may(prefix).matches(day(target)),
                expected,
                "{prefix} {target}"
            );
        }
        assert!(DateValue::parse("ne2024").is_err());
        assert!(DateValue::parse("ap2024").is_err());
    }

    #[test]
    fn last_updated_becomes_inclusive_instant_bounds() {
        let query = parse(
            SearchKind::Type("Observation"),
            &pairs(&[
                ("_lastUpdated", "ge2024-05-01"),
                ("_lastUpdated", "lt2024-06-01"),
            ]),
            Handling::Strict,
        )
        .unwrap();
        let may = parse_date_range("2024-05").unwrap();
        assert_eq!(query.updated_from, Some(may.start));
        assert_eq!(query.updated_to, Some(may.end - 1));
    }

    #[test]
    fn tokens_and_their_matching() {
        let table = [
            (
                "http://loinc.org|8480-6",
                Some("http://loinc.org"),
                Some("8480-6"),
                true,
            ),
            (
                "http://loinc.org|8480-6",
                Some("urn:other"),
                Some("8480-6"),
                false,
            ),
            ("8480-6", Some("urn:other"), Some("8480-6"), true),
            ("|8480-6", None, Some("8480-6"), true),
            ("|8480-6", Some("http://loinc.org"), Some("8480-6"), false),
            (
                "http://loinc.org|",
                Some("http://loinc.org"),
                Some("anything"),
                true,
            ),
        ];
        for (value, system, code, expected) in table {
            assert_eq!(
                Token::parse(value).unwrap().matches(system, code),
                expected,
                "{value}"
            );
        }
        assert!(Token::parse("|").is_err());
    }

    #[test]
    fn unknown_parameters_follow_the_handling_preference() {
        let params = pairs(&[("code", "x"), ("flavour", "salty"), ("code:text", "y")]);
        let lenient = parse(SearchKind::Type("Observation"), &params, Handling::Lenient).unwrap();
        assert_eq!(
            lenient.ignored,
            vec!["flavour".to_string(), "code:text".to_string()]
        );
        assert_eq!(lenient.codes.len(), 1);
        let strict = parse(SearchKind::Type("Observation"), &params, Handling::Strict);
        assert!(strict.unwrap_err().0.contains("flavour"));
        // `code` means nothing for Encounter: unknown there.
        let encounter = parse(
            SearchKind::Type("Encounter"),
            &pairs(&[("code", "x")]),
            Handling::Strict,
        );
        assert!(encounter.is_err());
        assert_eq!(
            Handling::from_prefer(Some("return=minimal, handling=strict")),
            Handling::Strict
        );
        assert_eq!(
            Handling::from_prefer(Some("handling=lenient")),
            Handling::Lenient
        );
        assert_eq!(Handling::from_prefer(None), Handling::Lenient);
    }

    #[test]
    fn count_is_bounded() {
        let count = |value: &str, handling| {
            parse(
                SearchKind::Type("Observation"),
                &pairs(&[("_count", value)]),
                handling,
            )
            .map(|q| q.count)
        };
        assert_eq!(count("10", Handling::Strict), Ok(10));
        assert_eq!(count("0", Handling::Strict), Ok(0));
        assert_eq!(count("5000", Handling::Lenient), Ok(MAX_COUNT));
        assert!(count("5000", Handling::Strict).is_err());
        assert!(count("-1", Handling::Lenient).is_err());
        assert!(count("ten", Handling::Lenient).is_err());
    }

    #[test]
    fn includes_patients_and_other_parameters() {
        let query = parse(
            SearchKind::Type("MedicationDispense"),
            &pairs(&[
                ("_include", "MedicationDispense:medication"),
                ("_include", "MedicationDispense:patient"),
                ("patient", "Patient/p-1"),
                ("subject", "p-1"),
            ]),
            Handling::Strict,
        )
        .unwrap();
        assert_eq!(query.includes, vec![Include::Medication, Include::Patient]);
        assert_eq!(query.patient.as_deref(), Some("p-1"));
        let two = parse(
            SearchKind::Type("Observation"),
            &pairs(&[("patient", "p-1"), ("patient", "p-2")]),
            Handling::Lenient,
        );
        assert!(two.is_err());
        let wrong = parse(
            SearchKind::Type("Observation"),
            &pairs(&[("_include", "Observation:medication")]),
            Handling::Strict,
        );
        assert!(wrong.is_err());
        assert!(parse(
            SearchKind::Everything,
            &pairs(&[("_cursor", "x'; DROP")]),
            Handling::Lenient
        )
        .is_err());
    }

    proptest! {
        /// Whatever the query string, parsing answers (a query or a reason) and never panics.
        #[test]
        fn parsing_never_panics(
            params in proptest::collection::vec(("[_a-z:A-Z]{0,12}", "\\PC{0,24}"), 0..6),
            strict in any::<bool>(),
        ) {
            let handling = if strict { Handling::Strict } else { Handling::Lenient };
            let _ = parse(SearchKind::Type("Observation"), &params, handling);
            let _ = parse(SearchKind::Everything, &params, handling);
        }

        /// A day always contains each of its instants, and `eq` on the day admits them.
        #[test]
        fn a_day_admits_its_instants(day in 0u32..20_000, offset_ms in 0i64..86_400_000) {
            let date = Date::from_calendar_date(1990, Month::January, 1).unwrap()
                + time::Duration::days(i64::from(day));
            let text = format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day());
            let value = DateValue::parse(&text).unwrap();
            let instant = value.range.start + offset_ms;
            let point = Range { start: instant, end: instant + 1 };
            prop_assert!(value.matches(point));
            let (from, to) = value.instant_bounds();
            prop_assert!(from.unwrap() <= instant && instant <= to.unwrap());
        }
    }
}
