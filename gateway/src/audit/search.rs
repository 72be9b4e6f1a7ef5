//! Audit leaves read back as facts — what kind of event, by whom, about whose data, with
//! which outcome — for the operator's audit search and export and for the alert rules. Like
//! the access log, it reads the leaves as written; the `patient_id` column beside each leaf
//! narrows a search to one patient without reading every leaf.

use async_stream::try_stream;
use futures::Stream;
use serde_json::Value;
use sqlx::Row;

use super::access_log::{accessor_of, AccessorKind};
use super::event::EventKind;
use crate::error::{Error, Result};
use crate::store::Database;

/// Every event kind by the name operators search with.
pub const KINDS: &[(&str, EventKind)] = &[
    ("application-start", EventKind::ApplicationStart),
    ("login", EventKind::Login),
    ("logout", EventKind::Logout),
    ("security-configuration", EventKind::SecurityConfiguration),
    ("data-key-created", EventKind::DataKeyCreated),
    ("data-key-destroyed", EventKind::DataKeyDestroyed),
    ("create", EventKind::Create),
    ("update", EventKind::Update),
    ("read", EventKind::Read),
    ("search", EventKind::Search),
    ("export", EventKind::Export),
    ("pull-instruction-given", EventKind::PullInstructionGiven),
    (
        "pull-instruction-authorised",
        EventKind::PullInstructionAuthorised,
    ),
    (
        "pull-instruction-withdrawn",
        EventKind::PullInstructionWithdrawn,
    ),
    ("upload-permission-given", EventKind::UploadPermissionGiven),
    (
        "upload-permission-withdrawn",
        EventKind::UploadPermissionWithdrawn,
    ),
    ("pull-item-rejected", EventKind::PullItemRejected),
    ("data-deleted", EventKind::DataDeleted),
    ("consent-granted", EventKind::ConsentGranted),
    ("consent-changed", EventKind::ConsentChanged),
    ("consent-withdrawn", EventKind::ConsentWithdrawn),
    ("consent-declined", EventKind::ConsentDeclined),
    ("consent-denied", EventKind::ConsentDenied),
    (
        "representation-registered",
        EventKind::RepresentationRegistered,
    ),
    ("representation-ended", EventKind::RepresentationEnded),
    ("client-registered", EventKind::ClientRegistered),
    ("authorization-requested", EventKind::AuthorizationRequested),
    (
        "authorization-code-issued",
        EventKind::AuthorizationCodeIssued,
    ),
    ("authorization-declined", EventKind::AuthorizationDeclined),
    ("token-issued", EventKind::TokenIssued),
    ("token-refreshed", EventKind::TokenRefreshed),
    ("token-revoked", EventKind::TokenRevoked),
    ("oauth-refused", EventKind::OAuthRefused),
    ("token-reuse-detected", EventKind::TokenReuseDetected),
    ("notification-sent", EventKind::NotificationSent),
    (
        "notification-acknowledged",
        EventKind::NotificationAcknowledged,
    ),
    ("emergency-override", EventKind::EmergencyOverride),
    ("alert-raised", EventKind::AlertRaised),
    ("alert-acknowledged", EventKind::AlertAcknowledged),
    ("audit-log-searched", EventKind::AuditLogSearched),
    ("audit-log-exported", EventKind::AuditLogExported),
    ("maintenance-window", EventKind::MaintenanceWindow),
    ("maintenance-action", EventKind::MaintenanceAction),
];

/// The kind an operator names, e.g. `login`.
pub fn kind_named(name: &str) -> Option<EventKind> {
    KINDS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, kind)| *kind)
}

/// The DICOM code of the subtype that marks break-glass use.
const EMERGENCY_OVERRIDE_CODE: &str = "110127";
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";

/// What one leaf says, in the terms searches and alert rules use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedLeaf {
    /// `recorded`, as Unix milliseconds.
    pub recorded_millis: i64,
    /// `None` for a leaf of a kind this build does not know.
    pub kind: Option<EventKind>,
    /// The outcome was a failure (minor or serious).
    pub failed: bool,
    pub actor_kind: AccessorKind,
    /// The account or client id; none for the gateway or nobody.
    pub actor_id: Option<String>,
    /// Whose data (opaque gateway id).
    pub patient_id: Option<String>,
    /// `outcomeDesc`: a short PHI-free note such as "wrong password".
    pub detail: Option<String>,
    /// A subtype is DCM 110127 (Emergency Override): break-glass use.
    pub emergency_override: bool,
}

/// Reads one leaf; `None` when it is not an AuditEvent this gateway wrote.
pub fn parse_leaf(leaf: &[u8]) -> Option<ParsedLeaf> {
    let event: Value = serde_json::from_slice(leaf).ok()?;
    if event["resourceType"] != "AuditEvent" {
        return None;
    }
    let recorded = event["recorded"].as_str()?;
    let recorded =
        time::OffsetDateTime::parse(recorded, &time::format_description::well_known::Rfc3339)
            .ok()?;
    let recorded_millis = (recorded.unix_timestamp_nanos() / 1_000_000) as i64;
    let kind = KINDS.iter().map(|(_, kind)| *kind).find(|kind| {
        event["type"] == kind.type_coding() && event["subtype"][0] == kind.subtype_coding()
    });
    let (actor_kind, actor_id) = accessor_of(&event["agent"][0])?;
    let patient_id = event["entity"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entity| entity["role"]["code"] == "1")
        .find_map(|entity| {
            entity["what"]["reference"]
                .as_str()?
                .strip_prefix("Patient/")
        })
        .filter(|id| !id.is_empty())
        .map(str::to_string);
    let emergency_override = event["subtype"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|coding| coding["system"] == DCM && coding["code"] == EMERGENCY_OVERRIDE_CODE);
    Some(ParsedLeaf {
        recorded_millis,
        kind,
        failed: event["outcome"].as_str()? != "0",
        actor_kind,
        actor_id,
        patient_id,
        detail: event["outcomeDesc"].as_str().map(str::to_string),
        emergency_override,
    })
}

/// Which audit events an operator asks for. Every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub patient_id: Option<String>,
    /// An account or client id.
    pub actor_id: Option<String>,
    pub kind: Option<EventKind>,
    /// Recorded at or after (Unix milliseconds).
    pub since_millis: Option<i64>,
    /// Recorded before (Unix milliseconds).
    pub until_millis: Option<i64>,
}

impl AuditQuery {
    pub fn matches(&self, leaf: &ParsedLeaf) -> bool {
        self.patient_id
            .as_ref()
            .is_none_or(|p| leaf.patient_id.as_ref() == Some(p))
            && self
                .actor_id
                .as_ref()
                .is_none_or(|a| leaf.actor_id.as_ref() == Some(a))
            && self.kind.is_none_or(|k| leaf.kind == Some(k))
            && self.since_millis.is_none_or(|s| leaf.recorded_millis >= s)
            && self.until_millis.is_none_or(|u| leaf.recorded_millis < u)
    }
}

/// Events per page unless asked otherwise, and the most one page holds.
pub const DEFAULT_COUNT: u32 = 100;
pub const MAX_COUNT: u32 = 1000;
/// Matches skipped to reach a page at most: deeper pages need a narrower time range.
pub const MAX_SKIPPED: u64 = 50_000;
/// Leaves read per statement.
const SCAN_BATCH: i64 = 500;
/// Slack on the stored write time when narrowing by the event time: the two are taken
/// within one request, so a minute covers any delay between them.
const RECORDED_SLACK_MILLIS: i64 = 60_000;

/// One page of matching events, in log order.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchPage {
    /// The AuditEvents as stored.
    pub events: Vec<Value>,
    pub next_page: Option<u32>,
}

/// Page `page` (from 1) of `count` matching events.
pub async fn search(
    db: &Database,
    query: &AuditQuery,
    count: u32,
    page: u32,
) -> Result<SearchPage> {
    if !(1..=MAX_COUNT).contains(&count) {
        return Err(Error::Invalid(format!(
            "_count must be between 1 and {MAX_COUNT}"
        )));
    }
    if page == 0 {
        return Err(Error::Invalid("page starts at 1".into()));
    }
    let skip = u64::from(page - 1) * u64::from(count);
    if skip > MAX_SKIPPED {
        return Err(Error::Invalid(format!(
            "page too deep: at most {MAX_SKIPPED} earlier matches; narrow the time range"
        )));
    }
    let mut events = Vec::new();
    let mut skipped = 0u64;
    let mut after_id = 0i64;
    loop {
        let batch = scan(db, query, after_id).await?;
        let batch_len = batch.len();
        for (id, body) in batch {
            after_id = id;
            if !parse_leaf(&body).is_some_and(|leaf| query.matches(&leaf)) {
                continue;
            }
            if skipped < skip {
                skipped += 1;
                continue;
            }
            if events.len() == count as usize {
                return Ok(SearchPage {
                    events,
                    next_page: Some(page + 1),
                });
            }
            events.push(
                serde_json::from_slice(&body)
                    .map_err(|e| Error::Audit(format!("leaf {id}: {e}")))?,
            );
        }
        if (batch_len as i64) < SCAN_BATCH {
            return Ok(SearchPage {
                events,
                next_page: None,
            });
        }
    }
}

/// Every matching leaf, in log order, exactly as stored (one NDJSON line each).
pub fn matching_leaves(
    db: Database,
    query: AuditQuery,
) -> impl Stream<Item = Result<Vec<u8>>> + Send + 'static {
    try_stream! {
        let mut after_id = 0i64;
        loop {
            let batch = scan(&db, &query, after_id).await?;
            let batch_len = batch.len();
            for (id, body) in batch {
                after_id = id;
                if parse_leaf(&body).is_some_and(|leaf| query.matches(&leaf)) {
                    yield body;
                }
            }
            if (batch_len as i64) < SCAN_BATCH {
                break;
            }
        }
    }
}

/// The next batch of leaves after row `after_id` that may match: narrowed in SQL by patient
/// and (with slack) time, checked exactly by the caller.
async fn scan(db: &Database, query: &AuditQuery, after_id: i64) -> Result<Vec<(i64, Vec<u8>)>> {
    let since = query
        .since_millis
        .map_or(i64::MIN, |s| s.saturating_sub(RECORDED_SLACK_MILLIS));
    let until = query
        .until_millis
        .map_or(i64::MAX, |u| u.saturating_add(RECORDED_SLACK_MILLIS));
    let rows = match &query.patient_id {
        Some(patient_id) => {
            sqlx::query(
                "SELECT id, body FROM audit_leaves
                 WHERE patient_id = $1 AND id > $2 AND recorded_at >= $3 AND recorded_at < $4
                 ORDER BY id LIMIT $5",
            )
            .bind(patient_id)
            .bind(after_id)
            .bind(since)
            .bind(until)
            .bind(SCAN_BATCH)
            .fetch_all(db.read_pool())
            .await?
        }
        None => {
            sqlx::query(
                "SELECT id, body FROM audit_leaves
                 WHERE id > $1 AND recorded_at >= $2 AND recorded_at < $3
                 ORDER BY id LIMIT $4",
            )
            .bind(after_id)
            .bind(since)
            .bind(until)
            .bind(SCAN_BATCH)
            .fetch_all(db.read_pool())
            .await?
        }
    };
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AccountRole, Actor, Agent, AuditEvent, Outcome};

    #[test]
    fn every_kind_has_one_name_and_is_read_back() {
        let mut names: Vec<&str> = KINDS.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KINDS.len(), "a name is used twice");
        for (name, kind) in KINDS {
            assert_eq!(kind_named(name), Some(*kind));
            let leaf = AuditEvent::new(*kind, Agent::system()).to_leaf();
            assert_eq!(
                parse_leaf(&leaf).and_then(|l| l.kind),
                Some(*kind),
                "{name}"
            );
        }
        assert_eq!(kind_named("reed"), None);
    }

    #[test]
    fn leaves_parse_into_who_what_and_whose() {
        let recorded = time::macros::datetime!(2026-11-25 01:02:03 UTC);
        let failed_login = AuditEvent {
            recorded,
            ..AuditEvent::new(
                EventKind::Login,
                Agent {
                    actor: Actor::Account {
                        id: "acc-1".into(),
                        role: AccountRole::Operator,
                    },
                    address: None,
                    token_jti: None,
                },
            )
            .outcome(Outcome::MinorFailure)
            .detail("wrong password")
        };
        let parsed = parse_leaf(&failed_login.to_leaf()).unwrap();
        assert_eq!(parsed.kind, Some(EventKind::Login));
        assert!(parsed.failed);
        assert_eq!(parsed.actor_kind, AccessorKind::Operator);
        assert_eq!(parsed.actor_id.as_deref(), Some("acc-1"));
        assert_eq!(parsed.detail.as_deref(), Some("wrong password"));
        assert_eq!(parsed.recorded_millis, 1_795_568_523_000);
        assert!(!parsed.emergency_override);

        let read = AuditEvent::new(EventKind::Read, Agent::client("c-1")).patient("p-1");
        let parsed = parse_leaf(&read.to_leaf()).unwrap();
        assert_eq!(parsed.actor_kind, AccessorKind::Client);
        assert_eq!(parsed.patient_id.as_deref(), Some("p-1"));
        assert!(!parsed.failed);

        let emergency = AuditEvent::new(EventKind::EmergencyOverride, Agent::system());
        assert!(parse_leaf(&emergency.to_leaf()).unwrap().emergency_override);
        assert_eq!(parse_leaf(b"not json"), None);
    }

    #[test]
    fn a_query_matches_only_what_it_names() {
        let leaf = ParsedLeaf {
            recorded_millis: 1000,
            kind: Some(EventKind::Read),
            failed: false,
            actor_kind: AccessorKind::Client,
            actor_id: Some("c-1".into()),
            patient_id: Some("p-1".into()),
            detail: None,
            emergency_override: false,
        };
        let cases = [
            (AuditQuery::default(), true),
            (
                AuditQuery {
                    patient_id: Some("p-1".into()),
                    actor_id: Some("c-1".into()),
                    kind: Some(EventKind::Read),
                    since_millis: Some(1000),
                    until_millis: Some(1001),
                },
                true,
            ),
            (
                AuditQuery {
                    patient_id: Some("p-2".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                AuditQuery {
                    actor_id: Some("c-2".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                AuditQuery {
                    kind: Some(EventKind::Search),
                    ..Default::default()
                },
                false,
            ),
            (
                AuditQuery {
                    since_millis: Some(1001),
                    ..Default::default()
                },
                false,
            ),
            (
                AuditQuery {
                    until_millis: Some(1000),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (query, expected) in cases {
            assert_eq!(query.matches(&leaf), expected, "{query:?}");
        }
    }
}
