//! RFC 3339 instants as sources send them (FHIR `meta.lastUpdated`, the portal's
//! `available_at`): compared by time, not by text, since offsets differ.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub(crate) fn parse_instant(value: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(value, &Rfc3339).ok()
}

/// Orders instants by time; unparseable values sort first so they never win.
pub(crate) fn compare_instants(left: &str, right: &str) -> std::cmp::Ordering {
    parse_instant(left).cmp(&parse_instant(right))
}

/// The later of two optional instants (unparseable ones are ignored).
pub(crate) fn newest<'a>(left: Option<&'a str>, right: Option<&'a str>) -> Option<&'a str> {
    let left = left.filter(|value| parse_instant(value).is_some());
    let right = right.filter(|value| parse_instant(value).is_some());
    match (left, right) {
        (Some(l), Some(r)) => Some(if compare_instants(l, r).is_ge() { l } else { r }),
        (l, r) => l.or(r),
    }
}
