//! The pull cursor: a small JSON string the gateway stores after each batch.
//!
//! `high_water` holds, per resource type (or `$everything`), the newest `meta.lastUpdated`
//! of a *completed* pass; a later pull asks only for resources updated after it.
//! `in_progress` is the type whose pages were being walked, with the next page's URL, so a
//! pull cut short resumes on the page it stopped at.

use std::collections::BTreeMap;

use crate::error::SourceError;
pub(crate) use crate::instant::{compare_instants, newest};
use serde::{Deserialize, Serialize};

/// The key used in `high_water` for `$everything` passes.
pub(crate) const EVERYTHING_KEY: &str = "$everything";

const CURSOR_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullCursor {
    #[serde(rename = "v")]
    pub version: u32,
    /// Resource type (or `$everything`) → newest `meta.lastUpdated` of a completed pass.
    #[serde(default, rename = "hwm", skip_serializing_if = "BTreeMap::is_empty")]
    pub high_water: BTreeMap<String, String>,
    #[serde(default, rename = "cur", skip_serializing_if = "Option::is_none")]
    pub in_progress: Option<InProgressPass>,
}

/// A pass over one type (or `$everything`) that has more pages to fetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgressPass {
    #[serde(rename = "type")]
    pub resource_type: String,
    /// Absolute URL of the next page, as the server gave it in `link[next]`.
    pub next: String,
    /// Pages of this pass already stored (1 after the first page).
    pub page: u32,
    /// Newest `meta.lastUpdated` seen so far in this pass; becomes the high-water mark when
    /// the pass completes (not before: pages are not ordered by lastUpdated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_seen: Option<String>,
}

impl Default for PullCursor {
    fn default() -> Self {
        PullCursor {
            version: CURSOR_VERSION,
            high_water: BTreeMap::new(),
            in_progress: None,
        }
    }
}

impl PullCursor {
    pub fn parse(raw: Option<&str>) -> Result<Self, SourceError> {
        let Some(raw) = raw.filter(|raw| !raw.trim().is_empty()) else {
            return Ok(PullCursor::default());
        };
        let cursor: PullCursor = serde_json::from_str(raw)
            .map_err(|error| SourceError::Config(format!("unreadable pull cursor: {error}")))?;
        if cursor.version != CURSOR_VERSION {
            return Err(SourceError::Config(format!(
                "pull cursor version {} is not supported",
                cursor.version
            )));
        }
        Ok(cursor)
    }

    pub fn encode(&self) -> String {
        // Serialising plain strings and maps cannot fail; fall back to an empty cursor
        // rather than panic.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Where a search for `resource_type` should start from: the newer of its own mark and
    /// that of a completed `$everything` pass (which covered every type).
    pub(crate) fn since_for(&self, resource_type: &str) -> Option<String> {
        newest(
            self.high_water.get(resource_type).map(String::as_str),
            self.high_water.get(EVERYTHING_KEY).map(String::as_str),
        )
        .map(str::to_string)
    }

    /// Where an `$everything` pass should start: its own mark, else the oldest mark among
    /// the types asked for (none if any of them was never completed).
    pub(crate) fn since_for_everything(&self, resource_types: &[String]) -> Option<String> {
        if let Some(mark) = self.high_water.get(EVERYTHING_KEY) {
            return Some(mark.clone());
        }
        let mut oldest: Option<&str> = None;
        for resource_type in resource_types {
            let mark = self.high_water.get(resource_type)?;
            oldest = match oldest {
                Some(current) if compare_instants(current, mark).is_le() => Some(current),
                _ => Some(mark),
            };
        }
        oldest.map(str::to_string)
    }

    pub(crate) fn complete_pass(&mut self, key: &str, newest_seen: Option<String>) {
        if let Some(seen) = newest_seen {
            let current = self.high_water.get(key).map(String::as_str);
            if let Some(best) = newest(current, Some(&seen)) {
                let best = best.to_string();
                self.high_water.insert(key.to_string(), best);
            }
        }
        self.in_progress = None;
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn round_trip_and_marks() {
        let mut cursor = PullCursor::default();
        assert_eq!(cursor.since_for("Observation"), None);
        cursor.complete_pass("Observation", Some("2024-04-01T00:00:05Z".into()));
        cursor.complete_pass("Observation", Some("2024-04-01T09:00:01+09:00".into()));
        assert_eq!(
            cursor.since_for("Observation").as_deref(),
            Some("2024-04-01T00:00:05Z")
        );
        cursor.in_progress = Some(InProgressPass {
            resource_type: "Condition".into(),
            next: "http://127.0.0.1/Condition?x".into(),
            page: 2,
            newest_seen: None,
        });
        let parsed = PullCursor::parse(Some(&cursor.encode())).expect("parse");
        assert_eq!(parsed, cursor);
        assert!(PullCursor::parse(Some("{")).is_err());
        assert_eq!(
            PullCursor::parse(None).expect("empty"),
            PullCursor::default()
        );
        assert_eq!(
            cursor.since_for_everything(&["Observation".into(), "Condition".into()]),
            None
        );
        assert_eq!(
            cursor
                .since_for_everything(&["Observation".into()])
                .as_deref(),
            Some("2024-04-01T00:00:05Z")
        );
    }
}
