//! The patient's access log: who (which recipient's app, which operator, which
//! representative) read, searched or exported which categories of a patient's data, when,
//! under which consent — and which accesses their consent refused. It is read from the audit
//! leaves: the `patient_id` column beside each leaf finds a patient's leaves, and
//! [`decode_access`], a pure function, reads each leaf.
//!
//! The patient's own accesses are left out (they know about those). Entries carry opaque
//! ids, category codes and labels, and registered names of recipients: no PHI, like the
//! leaves they come from.

use std::collections::{HashMap, HashSet};

use phr_consent::DataCategory;
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use utoipa::ToSchema;

use super::event::{AccountRole, EventKind, ACCOUNT_IDS, CLIENT_IDS, CONSENT_POLICY};
use crate::error::{Error, Result};
use crate::store::Database;

/// Entries per page unless the caller asks for another number.
pub const DEFAULT_LIMIT: u32 = 50;
/// The most entries one page holds.
pub const MAX_LIMIT: u32 = 200;
/// Leaves read per statement while filling a page.
const SCAN_BATCH: i64 = 200;
/// Leaves read for one page at most; a page cut short by it still says where to go on.
const MAX_SCANNED: usize = 5000;

/// The audit event kinds that are accesses to a patient's data.
const ACCESS_KINDS: [EventKind; 4] = [
    EventKind::Read,
    EventKind::Search,
    EventKind::Export,
    EventKind::ConsentDenied,
];

/// Who accessed, as far as the leaf tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AccessorKind {
    /// A recipient's app (an OAuth client).
    Client,
    /// An operator of the gateway.
    Operator,
    /// Another person's account: a representative acting for the patient.
    Account,
    /// The gateway itself (background work, the command line).
    System,
    /// Nobody signed in.
    Unauthenticated,
}

/// What was done with the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AccessAction {
    Read,
    Search,
    Export,
    /// Any other disclosure, e.g. a request the consent decision refused.
    Other,
}

/// Whether data was disclosed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AccessOutcome {
    Success,
    /// Nothing was disclosed: refused by the patient's consent, or the request failed.
    Denied,
}

/// What one leaf says about an access, before names are looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedAccess {
    /// `recorded` of the AuditEvent (RFC 3339).
    pub at: String,
    /// Whose data (opaque gateway id).
    pub patient_id: String,
    pub accessor_kind: AccessorKind,
    /// The account or client id; none for the gateway or nobody.
    pub accessor_id: Option<String>,
    pub action: AccessAction,
    /// The categories of the resources disclosed, in `DataCategory::ALL` order, once each.
    pub categories: Vec<DataCategory>,
    pub consent_id: Option<String>,
    pub outcome: AccessOutcome,
}

/// Reads one audit leaf as an access to a patient's data. `None` for leaves that record
/// anything else (a login, a consent given), name no patient, or do not parse.
pub fn decode_access(leaf: &[u8]) -> Option<DecodedAccess> {
    let event: Value = serde_json::from_slice(leaf).ok()?;
    if event["resourceType"] != "AuditEvent" {
        return None;
    }
    let kind = ACCESS_KINDS.into_iter().find(|kind| {
        event["type"] == kind.type_coding() && event["subtype"][0] == kind.subtype_coding()
    })?;
    let action = match kind {
        EventKind::Read => AccessAction::Read,
        EventKind::Search => AccessAction::Search,
        EventKind::Export => AccessAction::Export,
        _ => AccessAction::Other,
    };
    let outcome = match (kind, event["outcome"].as_str()?) {
        (EventKind::ConsentDenied, _) => AccessOutcome::Denied,
        (_, "0") => AccessOutcome::Success,
        _ => AccessOutcome::Denied,
    };
    let at = event["recorded"].as_str()?.to_string();
    let agent = &event["agent"][0];
    let (accessor_kind, accessor_id) = accessor_of(agent)?;
    let consent_id = agent["policy"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|policy| policy.strip_prefix(CONSENT_POLICY))
        .map(str::to_string);

    let entities = event["entity"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut patient_id = None;
    let mut categories = Vec::new();
    for entity in entities {
        let Some(reference) = entity["what"]["reference"].as_str() else {
            continue;
        };
        match entity["role"]["code"].as_str() {
            // The patient whose data it is.
            Some("1") => {
                patient_id = reference.strip_prefix("Patient/").map(str::to_string);
            }
            // A resource disclosed: `Type/id` or `Type/id/_history/v`.
            Some("4") => {
                let resource_type = reference.split('/').next().unwrap_or_default();
                if let Some(category) = DataCategory::of_resource_type(resource_type) {
                    categories.push(category);
                }
            }
            _ => {}
        }
    }
    categories.sort_unstable();
    categories.dedup();
    Some(DecodedAccess {
        at,
        patient_id: patient_id.filter(|id| !id.is_empty())?,
        accessor_kind,
        accessor_id,
        action,
        categories,
        consent_id,
        outcome,
    })
}

pub(super) fn accessor_of(agent: &Value) -> Option<(AccessorKind, Option<String>)> {
    let who = &agent["who"];
    let id = who["identifier"]["value"].as_str().map(str::to_string);
    match who["identifier"]["system"].as_str() {
        Some(ACCOUNT_IDS) => {
            let agent_type = &agent["type"]["coding"][0];
            let kind = if *agent_type == AccountRole::Operator.agent_type() {
                AccessorKind::Operator
            } else if *agent_type == AccountRole::Patient.agent_type() {
                AccessorKind::Account
            } else {
                return None;
            };
            Some((kind, Some(id?)))
        }
        Some(CLIENT_IDS) => Some((AccessorKind::Client, Some(id?))),
        Some(_) => None,
        None => match who["display"].as_str()? {
            "phr-gateway" => Some((AccessorKind::System, None)),
            "unauthenticated" => Some((AccessorKind::Unauthenticated, None)),
            _ => None,
        },
    }
}

/// Who accessed, with the names a patient can recognise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Accessor {
    pub kind: AccessorKind,
    /// The client or account id (opaque); none for the gateway itself.
    pub id: Option<String>,
    /// For an app, its registered name; otherwise the id (or `phr-gateway`).
    pub display: String,
    /// For an app, the recipient organisation that registered it.
    pub organisation: Option<String>,
}

/// A data category, by code and in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct AccessedCategory {
    /// e.g. `observations`.
    pub code: String,
    pub label_ja: String,
    pub label_en: String,
}

impl AccessedCategory {
    fn of(category: DataCategory) -> Self {
        AccessedCategory {
            code: category.code().to_string(),
            label_ja: category.label_ja().to_string(),
            label_en: category.label_en().to_string(),
        }
    }
}

/// One access to the patient's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct AccessLogEntry {
    /// When (RFC 3339).
    pub at: String,
    pub accessor: Accessor,
    pub action: AccessAction,
    /// The categories of the resources disclosed; empty when nothing was.
    pub categories: Vec<AccessedCategory>,
    /// The disclosure consent the access rested on.
    pub consent_id: Option<String>,
    pub outcome: AccessOutcome,
}

/// One page of the access log, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct AccessLogPage {
    pub entries: Vec<AccessLogEntry>,
    /// Pass as `before` for the next (older) page; none when this is the last.
    pub next: Option<String>,
}

/// Where a leaf sits in a patient's log: newest first by the time it was written, then
/// by its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    recorded_at: i64,
    row_id: i64,
}

impl Position {
    const NEWEST: Position = Position {
        recorded_at: i64::MAX,
        row_id: i64::MAX,
    };

    fn cursor(self) -> String {
        format!("{}-{}", self.recorded_at, self.row_id)
    }

    fn parse(cursor: &str) -> Result<Position> {
        let invalid = || Error::Invalid("before: not a cursor this access log gave".into());
        let (recorded_at, row_id) = cursor.split_once('-').ok_or_else(invalid)?;
        Ok(Position {
            recorded_at: recorded_at.parse().map_err(|_| invalid())?,
            row_id: row_id.parse().map_err(|_| invalid())?,
        })
    }
}

/// One page of `patient_id`'s access log: others' accesses, newest first, `limit` entries
/// at most (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]), older than the `before`
/// cursor of a previous page.
pub async fn access_log(
    db: &Database,
    patient_id: &str,
    limit: Option<u32>,
    before: Option<&str>,
) -> Result<AccessLogPage> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT) as usize;
    let mut position = match before {
        Some(cursor) => Position::parse(cursor)?,
        None => Position::NEWEST,
    };
    let own_accounts: HashSet<String> =
        sqlx::query_scalar("SELECT id FROM accounts WHERE patient_id = $1")
            .bind(patient_id)
            .fetch_all(db.read_pool())
            .await?
            .into_iter()
            .collect();

    let mut found: Vec<(Position, DecodedAccess)> = Vec::new();
    let mut scanned = 0;
    let next = 'scan: loop {
        let rows = sqlx::query(
            "SELECT id, recorded_at, body FROM audit_leaves
             WHERE patient_id = $1 AND (recorded_at < $2 OR (recorded_at = $2 AND id < $3))
             ORDER BY recorded_at DESC, id DESC LIMIT $4",
        )
        .bind(patient_id)
        .bind(position.recorded_at)
        .bind(position.row_id)
        .bind(SCAN_BATCH)
        .fetch_all(db.read_pool())
        .await?;
        let batch_len = rows.len();
        for row in rows {
            position = Position {
                row_id: row.try_get(0)?,
                recorded_at: row.try_get(1)?,
            };
            scanned += 1;
            let body: Vec<u8> = row.try_get(2)?;
            let Some(access) = decode_access(&body) else {
                continue;
            };
            let own = access.accessor_kind == AccessorKind::Account
                && access
                    .accessor_id
                    .as_ref()
                    .is_some_and(|id| own_accounts.contains(id));
            // The column and the leaf agree, or the leaf is not shown.
            if own || access.patient_id != patient_id {
                continue;
            }
            if found.len() == limit {
                // One more exists: the page is full and there is a next one.
                break 'scan found.last().map(|(at, _)| at.cursor());
            }
            found.push((position, access));
        }
        if (batch_len as i64) < SCAN_BATCH {
            break None;
        }
        if scanned >= MAX_SCANNED {
            // Go on from the last leaf read, not the last entry found.
            break Some(position.cursor());
        }
    };

    let mut clients: HashMap<String, Option<(String, String)>> = HashMap::new();
    let mut entries = Vec::with_capacity(found.len());
    for (_, access) in found {
        let accessor = match (access.accessor_kind, access.accessor_id) {
            (AccessorKind::Client, Some(id)) => {
                if !clients.contains_key(&id) {
                    let registered = sqlx::query(
                        "SELECT display_name, recipient_name FROM oauth_clients WHERE id = $1",
                    )
                    .bind(&id)
                    .fetch_optional(db.read_pool())
                    .await?
                    .map(|row| -> Result<(String, String)> {
                        Ok((row.try_get(0)?, row.try_get(1)?))
                    })
                    .transpose()?;
                    clients.insert(id.clone(), registered);
                }
                match clients.get(&id).cloned().flatten() {
                    Some((display_name, recipient_name)) => Accessor {
                        kind: AccessorKind::Client,
                        id: Some(id),
                        display: display_name,
                        organisation: Some(recipient_name),
                    },
                    None => Accessor {
                        kind: AccessorKind::Client,
                        display: id.clone(),
                        id: Some(id),
                        organisation: None,
                    },
                }
            }
            (kind, Some(id)) => Accessor {
                kind,
                display: id.clone(),
                id: Some(id),
                organisation: None,
            },
            (kind, None) => Accessor {
                kind,
                id: None,
                display: match kind {
                    AccessorKind::Unauthenticated => "unauthenticated".into(),
                    _ => "phr-gateway".into(),
                },
                organisation: None,
            },
        };
        entries.push(AccessLogEntry {
            at: access.at,
            accessor,
            action: access.action,
            categories: access
                .categories
                .into_iter()
                .map(AccessedCategory::of)
                .collect(),
            consent_id: access.consent_id,
            outcome: access.outcome,
        });
    }
    Ok(AccessLogPage { entries, next })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Actor, Agent, AuditEvent, Outcome};

    fn client_with_token() -> Agent {
        Agent {
            actor: Actor::Client {
                id: "client-1".into(),
            },
            address: Some("192.0.2.7".parse().unwrap()),
            token_jti: Some("jti-9".into()),
        }
    }

    fn account(id: &str, role: AccountRole) -> Agent {
        Agent {
            actor: Actor::Account {
                id: id.into(),
                role,
            },
            address: None,
            token_jti: None,
        }
    }

    fn access(
        accessor_kind: AccessorKind,
        accessor_id: Option<&str>,
        action: AccessAction,
        categories: &[DataCategory],
        consent_id: Option<&str>,
        outcome: AccessOutcome,
    ) -> DecodedAccess {
        DecodedAccess {
            at: "2026-11-25T01:02:03Z".into(),
            patient_id: "p-1".into(),
            accessor_kind,
            accessor_id: accessor_id.map(str::to_string),
            action,
            categories: categories.to_vec(),
            consent_id: consent_id.map(str::to_string),
            outcome,
        }
    }

    fn at(event: AuditEvent) -> AuditEvent {
        AuditEvent {
            recorded: time::macros::datetime!(2026-11-25 01:02:03 UTC),
            ..event
        }
    }

    #[test]
    fn leaves_decode_into_accesses() {
        let cases: Vec<(&str, Vec<u8>, Option<DecodedAccess>)> = vec![
            (
                "a read by a recipient's app under a consent",
                at(AuditEvent::new(EventKind::Read, client_with_token())
                    .patient("p-1")
                    .consent("consent-1")
                    .resource("Observation/o1/_history/3"))
                .to_leaf(),
                Some(access(
                    AccessorKind::Client,
                    Some("client-1"),
                    AccessAction::Read,
                    &[DataCategory::Observations],
                    Some("consent-1"),
                    AccessOutcome::Success,
                )),
            ),
            (
                "a search returning several types, some twice, in category order",
                at(AuditEvent::new(EventKind::Search, client_with_token())
                    .patient("p-1")
                    .consent("consent-1")
                    .resource("MedicationDispense/m1/_history/1")
                    .resource("Observation/o1/_history/1")
                    .resource("DiagnosticReport/d1/_history/2")
                    .resource("MedicationRequest/m2/_history/1")
                    .resource("AuditEvent/not-a-category"))
                .to_leaf(),
                Some(access(
                    AccessorKind::Client,
                    Some("client-1"),
                    AccessAction::Search,
                    &[DataCategory::Observations, DataCategory::Medications],
                    Some("consent-1"),
                    AccessOutcome::Success,
                )),
            ),
            (
                "an operator's read, under no consent",
                at(
                    AuditEvent::new(EventKind::Read, account("op-1", AccountRole::Operator))
                        .patient("p-1")
                        .resource("Patient/p-1"),
                )
                .to_leaf(),
                Some(access(
                    AccessorKind::Operator,
                    Some("op-1"),
                    AccessAction::Read,
                    &[DataCategory::Demographics],
                    None,
                    AccessOutcome::Success,
                )),
            ),
            (
                "a representative's export",
                at(
                    AuditEvent::new(EventKind::Export, account("acc-9", AccountRole::Patient))
                        .patient("p-1")
                        .resource("Immunization/i1"),
                )
                .to_leaf(),
                Some(access(
                    AccessorKind::Account,
                    Some("acc-9"),
                    AccessAction::Export,
                    &[DataCategory::Immunizations],
                    None,
                    AccessOutcome::Success,
                )),
            ),
            (
                "a request the consent refused",
                at(
                    AuditEvent::new(EventKind::ConsentDenied, client_with_token())
                        .patient("p-1")
                        .outcome(Outcome::MinorFailure)
                        .detail("access by client-1 denied: no-consent"),
                )
                .to_leaf(),
                Some(access(
                    AccessorKind::Client,
                    Some("client-1"),
                    AccessAction::Other,
                    &[],
                    None,
                    AccessOutcome::Denied,
                )),
            ),
            (
                "a read that failed",
                at(AuditEvent::new(EventKind::Read, Agent::system())
                    .patient("p-1")
                    .outcome(Outcome::SeriousFailure))
                .to_leaf(),
                Some(access(
                    AccessorKind::System,
                    None,
                    AccessAction::Read,
                    &[],
                    None,
                    AccessOutcome::Denied,
                )),
            ),
            (
                "not an access: a consent given",
                at(AuditEvent::new(EventKind::ConsentGranted, client_with_token()).patient("p-1"))
                    .to_leaf(),
                None,
            ),
            (
                "not an access: a resource written",
                at(AuditEvent::new(EventKind::Create, Agent::system())
                    .patient("p-1")
                    .resource("Observation/o1"))
                .to_leaf(),
                None,
            ),
            (
                "a read about no patient",
                at(AuditEvent::new(EventKind::Read, client_with_token())).to_leaf(),
                None,
            ),
            (
                "malformed: not JSON",
                b"{\"resourceType\":\"Audit".to_vec(),
                None,
            ),
            (
                "malformed: entities and agents of the wrong shape",
                serde_json::to_vec(&serde_json::json!({
                    "resourceType": "AuditEvent",
                    "type": EventKind::Read.type_coding(),
                    "subtype": [EventKind::Read.subtype_coding()],
                    "recorded": "2026-11-25T01:02:03Z",
                    "outcome": "0",
                    "agent": "nobody",
                    "entity": [{"what": 7, "role": {"code": "1"}}]
                }))
                .unwrap(),
                None,
            ),
            (
                "malformed: no outcome",
                serde_json::to_vec(&serde_json::json!({
                    "resourceType": "AuditEvent",
                    "type": EventKind::Read.type_coding(),
                    "subtype": [EventKind::Read.subtype_coding()],
                    "recorded": "2026-11-25T01:02:03Z",
                    "agent": [{"who": {"display": "phr-gateway"}}],
                    "entity": [{"what": {"reference": "Patient/p-1"}, "role": {"code": "1"}}]
                }))
                .unwrap(),
                None,
            ),
            ("malformed: empty", Vec::new(), None),
        ];
        for (name, leaf, expected) in cases {
            assert_eq!(decode_access(&leaf), expected, "{name}");
        }
    }

    #[test]
    fn cursors_round_trip_and_strangers_are_refused() {
        let position = Position {
            recorded_at: 1_764_032_523_000,
            row_id: 42,
        };
        assert_eq!(Position::parse(&position.cursor()).unwrap(), position);
        for bad in ["", "42", "a-b", "1-", "-1-2", "1.5-2"] {
            assert!(
                matches!(Position::parse(bad), Err(Error::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
