//! The pull cursor, stored by the gateway after each batch (same shape as the FHIR
//! source's): per category the `since` high-water mark of the last *completed* pass, and
//! the page token of a pass cut short so it resumes on the page it stopped at.
//!
//! The mark is the newest `available_at` seen in a pass (when the record became available
//! at the portal), not the clinical date: claims-based 薬剤情報 arrives weeks late.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::SourceError;
use crate::instant::newest;

const CURSOR_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfInfoCursor {
    #[serde(rename = "v")]
    pub version: u32,
    /// Category scope name → newest `available_at` of a completed pass.
    #[serde(default, rename = "hwm", skip_serializing_if = "BTreeMap::is_empty")]
    pub high_water: BTreeMap<String, String>,
    #[serde(default, rename = "cur", skip_serializing_if = "Option::is_none")]
    pub in_progress: Option<InProgressCategory>,
}

/// A pass over one category with more pages to fetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgressCategory {
    pub category: String,
    /// The portal's `next_page_token`.
    pub page_token: String,
    /// Newest `available_at` seen so far; the mark once the pass completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_seen: Option<String>,
}

impl Default for SelfInfoCursor {
    fn default() -> Self {
        SelfInfoCursor {
            version: CURSOR_VERSION,
            high_water: BTreeMap::new(),
            in_progress: None,
        }
    }
}

impl SelfInfoCursor {
    pub fn parse(raw: Option<&str>) -> Result<Self, SourceError> {
        let Some(raw) = raw.filter(|raw| !raw.trim().is_empty()) else {
            return Ok(SelfInfoCursor::default());
        };
        let cursor: SelfInfoCursor = serde_json::from_str(raw)
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
        // Plain strings and maps always serialise; an empty cursor beats a panic.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub(crate) fn since_for(&self, category: &str) -> Option<String> {
        self.high_water.get(category).cloned()
    }

    /// Ends a pass: its newest `available_at` becomes the mark (never moving it back).
    pub(crate) fn complete_pass(&mut self, category: &str, newest_seen: Option<String>) {
        let current = self.high_water.get(category).map(String::as_str);
        if let Some(best) = newest(current, newest_seen.as_deref()) {
            let best = best.to_string();
            self.high_water.insert(category.to_string(), best);
        }
        self.in_progress = None;
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn round_trip_and_marks_only_move_forward() {
        let mut cursor = SelfInfoCursor::default();
        assert_eq!(cursor.since_for("medication"), None);
        cursor.complete_pass("medication", Some("2024-05-01T00:00:00Z".into()));
        cursor.complete_pass("medication", Some("2024-04-01T00:00:00Z".into()));
        cursor.complete_pass("immunization", None);
        assert_eq!(
            cursor.since_for("medication").as_deref(),
            Some("2024-05-01T00:00:00Z")
        );
        assert_eq!(cursor.since_for("immunization"), None);
        cursor.in_progress = Some(InProgressCategory {
            category: "checkup.specific".into(),
            page_token: "t2".into(),
            newest_seen: None,
        });
        let parsed = SelfInfoCursor::parse(Some(&cursor.encode())).expect("parse");
        assert_eq!(parsed, cursor);
        assert!(SelfInfoCursor::parse(Some("{")).is_err());
        assert!(SelfInfoCursor::parse(Some(r#"{"v":9}"#)).is_err());
    }
}
