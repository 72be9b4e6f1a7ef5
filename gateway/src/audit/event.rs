//! Audit events as FHIR R4 `AuditEvent` resources following the IHE Basic Audit Log Patterns
//! (BALP). They carry no PHI: patients and actors appear by opaque gateway ids, resources by
//! id, never names or clinical content.

use std::net::IpAddr;

use serde_json::{json, Value};
use time::OffsetDateTime;

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL: &str = "http://hl7.org/fhir/restful-interaction";
pub(super) const GATEWAY_EVENTS: &str = "urn:phr-gateway:audit-event";
pub(super) const ACCOUNT_IDS: &str = "urn:phr-gateway:account";
pub(super) const CLIENT_IDS: &str = "urn:phr-gateway:client";
/// `agent[0].policy` entry naming the access token the agent used.
pub(super) const TOKEN_POLICY: &str = "urn:ietf:params:oauth:jti:";
/// `agent[0].policy` entry naming the patient's disclosure consent an access rests on.
pub(super) const CONSENT_POLICY: &str = "urn:phr-gateway:consent:";

/// What happened, mapped to the BALP/DICOM type and subtype codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    ApplicationStart,
    Login,
    Logout,
    /// A security setting was weakened or the configuration changed.
    SecurityConfiguration,
    /// Copying the audit log to its write-once sink started failing, or recovered.
    AuditShipping,
    DataKeyCreated,
    DataKeyDestroyed,
    Create,
    Update,
    Read,
    Search,
    Export,
    /// The patient instructed a pull, the source authorised it, or it was withdrawn.
    PullInstructionGiven,
    PullInstructionAuthorised,
    PullInstructionWithdrawn,
    /// The patient let a checkup institution upload their results, or withdrew that.
    UploadPermissionGiven,
    UploadPermissionWithdrawn,
    /// A pulled item was refused (e.g. it belongs to another patient).
    PullItemRejected,
    /// Stored data was deleted at the patient's request.
    DataDeleted,
    /// A disclosure consent was given, changed, withdrawn, or a request for one declined.
    ConsentGranted,
    ConsentChanged,
    ConsentWithdrawn,
    ConsentDeclined,
    /// A recipient's access was refused by the patient's consent.
    ConsentDenied,
    /// Someone may now act for a patient (parent, registered proxy), or no longer.
    RepresentationRegistered,
    RepresentationEnded,
    /// An operator registered an OAuth client (an app of a recipient).
    ClientRegistered,
    /// An app's authorisation request was checked and now waits for the patient.
    AuthorizationRequested,
    /// The patient approved: an authorisation code was issued.
    AuthorizationCodeIssued,
    /// The patient declined an app's request.
    AuthorizationDeclined,
    /// Tokens were issued at the token endpoint (code exchange or client credentials).
    TokenIssued,
    /// A refresh token was rotated.
    TokenRefreshed,
    /// Tokens were revoked (by the client, or with the consent they rest on).
    TokenRevoked,
    /// An OAuth request was refused; the detail starts with the OAuth error code.
    OAuthRefused,
    /// A spent code or refresh token came back: its token family was revoked.
    TokenReuseDetected,
    /// A notification reached a recipient's endpoint (or was given up).
    NotificationSent,
    /// A recipient confirmed it stopped using and deleted the data, as asked.
    NotificationAcknowledged,
    /// An emergency (break-glass) operator session started, or acted: every action in it
    /// is recorded with this kind (DCM 110113 / 110127, purposeOfEvent BTG).
    EmergencyOverride,
    /// A rule over the audit stream raised an alert, or an operator acknowledged one.
    AlertRaised,
    AlertAcknowledged,
    /// An operator searched or exported audit events (DCM 110101 Audit Log Used).
    AuditLogSearched,
    AuditLogExported,
    /// A remote maintenance window was requested, approved, rejected or closed, or its
    /// report generated.
    MaintenanceWindow,
    /// A request made in a maintenance window (refused ones too), with the window id in the
    /// detail; purposeOfEvent SYSADMN.
    MaintenanceAction,
}

impl EventKind {
    pub(super) fn type_coding(self) -> Value {
        match self {
            EventKind::ApplicationStart => coding(DCM, "110100", "Application Activity"),
            EventKind::Login | EventKind::Logout => coding(DCM, "110114", "User Authentication"),
            EventKind::SecurityConfiguration
            | EventKind::AuditShipping
            | EventKind::DataKeyCreated
            | EventKind::DataKeyDestroyed => coding(DCM, "110113", "Security Alert"),
            EventKind::Export => coding(DCM, "110106", "Export"),
            EventKind::PullInstructionGiven
            | EventKind::PullInstructionAuthorised
            | EventKind::PullInstructionWithdrawn => {
                coding(GATEWAY_EVENTS, "pull-instruction", "Pull instruction")
            }
            EventKind::PullItemRejected => coding(DCM, "110113", "Security Alert"),
            EventKind::UploadPermissionGiven | EventKind::UploadPermissionWithdrawn => {
                coding(GATEWAY_EVENTS, "upload-permission", "Upload permission")
            }
            EventKind::DataDeleted => coding(DCM, "110110", "Patient Record"),
            EventKind::ConsentGranted
            | EventKind::ConsentChanged
            | EventKind::ConsentWithdrawn
            | EventKind::ConsentDeclined
            | EventKind::ConsentDenied => coding(GATEWAY_EVENTS, "consent", "Disclosure consent"),
            EventKind::RepresentationRegistered | EventKind::RepresentationEnded => {
                coding(GATEWAY_EVENTS, "representation", "Acting for a patient")
            }
            EventKind::Create | EventKind::Update | EventKind::Read | EventKind::Search => {
                coding(EVENT_TYPE, "rest", "RESTful Operation")
            }
            EventKind::ClientRegistered
            | EventKind::TokenReuseDetected
            | EventKind::EmergencyOverride => coding(DCM, "110113", "Security Alert"),
            EventKind::AlertRaised | EventKind::AlertAcknowledged => {
                coding(DCM, "110113", "Security Alert")
            }
            EventKind::AuditLogSearched | EventKind::AuditLogExported => {
                coding(DCM, "110101", "Audit Log Used")
            }
            EventKind::NotificationSent | EventKind::NotificationAcknowledged => coding(
                GATEWAY_EVENTS,
                "notification",
                "Notification to a recipient",
            ),
            EventKind::MaintenanceWindow | EventKind::MaintenanceAction => {
                coding(GATEWAY_EVENTS, "maintenance", "Remote maintenance")
            }
            // IHE IUA records its transactions as User Authentication.
            EventKind::AuthorizationRequested
            | EventKind::AuthorizationCodeIssued
            | EventKind::AuthorizationDeclined
            | EventKind::TokenIssued
            | EventKind::TokenRefreshed
            | EventKind::TokenRevoked
            | EventKind::OAuthRefused => coding(DCM, "110114", "User Authentication"),
        }
    }

    pub(super) fn subtype_coding(self) -> Value {
        match self {
            EventKind::ApplicationStart => coding(DCM, "110120", "Application Start"),
            EventKind::Login => coding(DCM, "110122", "Login"),
            EventKind::Logout => coding(DCM, "110123", "Logout"),
            EventKind::SecurityConfiguration => coding(DCM, "110129", "Security Configuration"),
            EventKind::AuditShipping => {
                coding(GATEWAY_EVENTS, "audit-shipping", "Audit log shipping")
            }
            EventKind::DataKeyCreated => {
                coding(GATEWAY_EVENTS, "data-key-created", "Data key created")
            }
            EventKind::DataKeyDestroyed => {
                coding(GATEWAY_EVENTS, "data-key-destroyed", "Data key destroyed")
            }
            EventKind::Create => coding(RESTFUL, "create", "create"),
            EventKind::Update => coding(RESTFUL, "update", "update"),
            EventKind::Read => coding(RESTFUL, "read", "read"),
            EventKind::Search => coding(RESTFUL, "search-type", "search type"),
            EventKind::Export => coding(GATEWAY_EVENTS, "export", "Export"),
            EventKind::PullInstructionGiven => coding(GATEWAY_EVENTS, "given", "Given"),
            EventKind::PullInstructionAuthorised => {
                coding(GATEWAY_EVENTS, "authorised", "Authorised at the source")
            }
            EventKind::PullInstructionWithdrawn => coding(GATEWAY_EVENTS, "withdrawn", "Withdrawn"),
            EventKind::PullItemRejected => {
                coding(GATEWAY_EVENTS, "pull-item-rejected", "Pulled item rejected")
            }
            EventKind::UploadPermissionGiven => coding(GATEWAY_EVENTS, "given", "Given"),
            EventKind::UploadPermissionWithdrawn => {
                coding(GATEWAY_EVENTS, "withdrawn", "Withdrawn")
            }
            EventKind::DataDeleted => coding(RESTFUL, "delete", "delete"),
            EventKind::ConsentGranted => coding(GATEWAY_EVENTS, "consent-granted", "Granted"),
            EventKind::ConsentChanged => coding(GATEWAY_EVENTS, "consent-changed", "Changed"),
            EventKind::ConsentWithdrawn => coding(GATEWAY_EVENTS, "consent-withdrawn", "Withdrawn"),
            EventKind::ConsentDeclined => coding(GATEWAY_EVENTS, "consent-declined", "Declined"),
            EventKind::ConsentDenied => {
                coding(GATEWAY_EVENTS, "consent-denied", "Access denied by consent")
            }
            EventKind::RepresentationRegistered => {
                coding(GATEWAY_EVENTS, "representation-registered", "Registered")
            }
            EventKind::RepresentationEnded => {
                coding(GATEWAY_EVENTS, "representation-ended", "Ended")
            }
            EventKind::ClientRegistered => coding(
                GATEWAY_EVENTS,
                "oauth-client-registered",
                "OAuth client registered",
            ),
            EventKind::AuthorizationRequested => coding(
                GATEWAY_EVENTS,
                "oauth-authorization-requested",
                "Authorisation requested",
            ),
            EventKind::AuthorizationCodeIssued => coding(
                GATEWAY_EVENTS,
                "oauth-code-issued",
                "Authorisation code issued",
            ),
            EventKind::AuthorizationDeclined => coding(
                GATEWAY_EVENTS,
                "oauth-authorization-declined",
                "Authorisation declined",
            ),
            EventKind::TokenIssued => coding(GATEWAY_EVENTS, "oauth-token-issued", "Token issued"),
            EventKind::TokenRefreshed => {
                coding(GATEWAY_EVENTS, "oauth-token-refreshed", "Token refreshed")
            }
            EventKind::TokenRevoked => {
                coding(GATEWAY_EVENTS, "oauth-token-revoked", "Token revoked")
            }
            EventKind::OAuthRefused => {
                coding(GATEWAY_EVENTS, "oauth-refused", "OAuth request refused")
            }
            EventKind::TokenReuseDetected => coding(
                GATEWAY_EVENTS,
                "oauth-token-reuse",
                "Code or refresh token reused",
            ),
            EventKind::NotificationSent => {
                coding(GATEWAY_EVENTS, "notification-sent", "Notification sent")
            }
            EventKind::NotificationAcknowledged => coding(
                GATEWAY_EVENTS,
                "notification-acknowledged",
                "Deletion acknowledged by the recipient",
            ),
            EventKind::EmergencyOverride => coding(DCM, "110127", "Emergency Override Started"),
            EventKind::AlertRaised => coding(GATEWAY_EVENTS, "alert-raised", "Alert raised"),
            EventKind::AlertAcknowledged => {
                coding(GATEWAY_EVENTS, "alert-acknowledged", "Alert acknowledged")
            }
            EventKind::AuditLogSearched => coding(
                GATEWAY_EVENTS,
                "audit-log-searched",
                "Audit events searched",
            ),
            EventKind::AuditLogExported => coding(
                GATEWAY_EVENTS,
                "audit-log-exported",
                "Audit events exported",
            ),
            EventKind::MaintenanceWindow => {
                coding(GATEWAY_EVENTS, "maintenance-window", "Maintenance window")
            }
            EventKind::MaintenanceAction => coding(
                GATEWAY_EVENTS,
                "maintenance-action",
                "Action in a maintenance window",
            ),
        }
    }

    fn action(self) -> &'static str {
        match self {
            EventKind::Create | EventKind::DataKeyCreated | EventKind::PullInstructionGiven => "C",
            EventKind::Update | EventKind::PullInstructionAuthorised => "U",
            EventKind::DataKeyDestroyed
            | EventKind::PullInstructionWithdrawn
            | EventKind::DataDeleted => "D",
            EventKind::PullItemRejected => "E",
            EventKind::UploadPermissionGiven => "C",
            EventKind::UploadPermissionWithdrawn => "D",
            EventKind::ConsentGranted => "C",
            EventKind::ConsentChanged => "U",
            EventKind::ConsentWithdrawn => "D",
            EventKind::ConsentDeclined | EventKind::ConsentDenied => "E",
            EventKind::RepresentationRegistered => "C",
            EventKind::RepresentationEnded => "D",
            EventKind::Read | EventKind::Export => "R",
            EventKind::Search => "E",
            EventKind::ApplicationStart
            | EventKind::Login
            | EventKind::Logout
            | EventKind::SecurityConfiguration
            | EventKind::AuditShipping => "E",
            EventKind::ClientRegistered
            | EventKind::AuthorizationRequested
            | EventKind::AuthorizationCodeIssued
            | EventKind::TokenIssued
            | EventKind::TokenRefreshed => "C",
            EventKind::TokenRevoked => "D",
            EventKind::AuthorizationDeclined
            | EventKind::OAuthRefused
            | EventKind::TokenReuseDetected => "E",
            EventKind::NotificationSent => "R",
            EventKind::NotificationAcknowledged => "E",
            EventKind::EmergencyOverride => "E",
            EventKind::AlertRaised => "C",
            EventKind::AlertAcknowledged => "U",
            EventKind::AuditLogSearched => "E",
            EventKind::AuditLogExported => "R",
            EventKind::MaintenanceWindow | EventKind::MaintenanceAction => "E",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    MinorFailure,
    SeriousFailure,
}

impl Outcome {
    fn code(self) -> &'static str {
        match self {
            Outcome::Success => "0",
            Outcome::MinorFailure => "4",
            Outcome::SeriousFailure => "8",
        }
    }
}

/// Who acted. Ids are the gateway's opaque ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A signed-in account (patient or operator).
    Account { id: String, role: AccountRole },
    /// An OAuth client acting for a recipient.
    Client { id: String },
    /// The gateway itself (start-up, background jobs, CLI).
    System,
    /// Not (yet) authenticated: a failed login names no account.
    Anonymous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountRole {
    Patient,
    Operator,
}

impl AccountRole {
    /// The code used in storage and APIs.
    pub fn code(self) -> &'static str {
        match self {
            AccountRole::Patient => "patient",
            AccountRole::Operator => "operator",
        }
    }
}

impl AccountRole {
    /// The coding of `agent.type` for an account of this role.
    pub(super) fn agent_type(self) -> Value {
        match self {
            AccountRole::Patient => coding(
                "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
                "PAT",
                "patient",
            ),
            AccountRole::Operator => coding(
                "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                "IRCP",
                "information recipient",
            ),
        }
    }
}

/// Who acted, from where, and under which token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub actor: Actor,
    pub address: Option<IpAddr>,
    pub token_jti: Option<String>,
}

impl Agent {
    /// An OAuth client acting with no token of its own in play (a job run for it, a
    /// delivery to it).
    pub fn client(id: impl Into<String>) -> Self {
        Agent {
            actor: Actor::Client { id: id.into() },
            address: None,
            token_jti: None,
        }
    }

    pub fn system() -> Self {
        Agent {
            actor: Actor::System,
            address: None,
            token_jti: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub kind: EventKind,
    pub outcome: Outcome,
    pub recorded: OffsetDateTime,
    pub agent: Agent,
    /// The patient whose data is concerned (opaque gateway id).
    pub patient: Option<String>,
    /// Resources concerned, as `Type/id`.
    pub resources: Vec<String>,
    /// A short, PHI-free note (e.g. "wrong password", "insecure_http").
    pub detail: Option<String>,
    /// The disclosure consent the access rests on (its id), if it is a disclosure.
    pub consent: Option<String>,
    /// A search's query (`Type?params`), kept as BALP PatientQuery's query entity.
    pub query: Option<String>,
}

impl AuditEvent {
    pub fn new(kind: EventKind, agent: Agent) -> Self {
        AuditEvent {
            kind,
            outcome: Outcome::Success,
            recorded: OffsetDateTime::now_utc(),
            agent,
            patient: None,
            resources: Vec::new(),
            detail: None,
            consent: None,
            query: None,
        }
    }

    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    pub fn patient(mut self, patient_id: impl Into<String>) -> Self {
        self.patient = Some(patient_id.into());
        self
    }

    pub fn resource(mut self, reference: impl Into<String>) -> Self {
        self.resources.push(reference.into());
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The disclosure consent this access rests on, written as an `agent[0].policy` entry
    /// `urn:phr-gateway:consent:<id>` (beside the token's jti, when there is one).
    pub fn consent(mut self, consent_id: impl Into<String>) -> Self {
        self.consent = Some(consent_id.into());
        self
    }

    /// The search that was run (BALP PatientQuery: an entity with role Query and the query
    /// base64-encoded).
    pub fn query(mut self, query: impl Into<String>) -> Self {
        self.query = Some(query.into());
        self
    }

    /// The leaf bytes: compact JSON of the FHIR AuditEvent.
    pub fn to_leaf(&self) -> Vec<u8> {
        let recorded = self
            .recorded
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut event = json!({
            "resourceType": "AuditEvent",
            "type": self.kind.type_coding(),
            "subtype": [self.kind.subtype_coding()],
            "action": self.kind.action(),
            "recorded": recorded,
            "outcome": self.outcome.code(),
            "agent": [self.agent_json()],
            "source": {
                "observer": {"display": "phr-gateway"},
                "type": [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")]
            }
        });
        if self.kind == EventKind::EmergencyOverride {
            // Break-the-glass: the purpose of use that marks emergency access for review.
            event["purposeOfEvent"] = json!([{"coding": [coding(
                "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                "BTG",
                "break the glass"
            )]}]);
        }
        if self.kind == EventKind::MaintenanceAction {
            // System administration: marks access made for maintenance, not for care.
            event["purposeOfEvent"] = json!([{"coding": [coding(
                "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                "SYSADMN",
                "system administration"
            )]}]);
        }
        if let Some(detail) = &self.detail {
            event["outcomeDesc"] = Value::String(detail.clone());
        }
        let mut entities = Vec::new();
        if let Some(patient) = &self.patient {
            entities.push(json!({
                "what": {"reference": format!("Patient/{patient}")},
                "type": coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "1", "Person"),
                "role": coding("http://terminology.hl7.org/CodeSystem/object-role", "1", "Patient")
            }));
        }
        for reference in &self.resources {
            entities.push(json!({
                "what": {"reference": reference},
                "type": coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object"),
                "role": coding("http://terminology.hl7.org/CodeSystem/object-role", "4", "Domain Resource")
            }));
        }
        if let Some(query) = &self.query {
            use base64::Engine as _;
            entities.push(json!({
                "type": coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object"),
                "role": coding("http://terminology.hl7.org/CodeSystem/object-role", "24", "Query"),
                "query": base64::engine::general_purpose::STANDARD.encode(query.as_bytes())
            }));
        }
        if !entities.is_empty() {
            event["entity"] = Value::Array(entities);
        }
        serde_json::to_vec(&event).unwrap_or_default()
    }

    fn agent_json(&self) -> Value {
        let (who, agent_type) = match &self.agent.actor {
            Actor::Account { id, role } => (
                json!({"identifier": {"system": ACCOUNT_IDS, "value": id}}),
                role.agent_type(),
            ),
            Actor::Client { id } => (
                json!({"identifier": {"system": CLIENT_IDS, "value": id}}),
                coding(
                    "http://dicom.nema.org/resources/ontology/DCM",
                    "110153",
                    "Source Role ID",
                ),
            ),
            Actor::System => (
                json!({"display": "phr-gateway"}),
                coding(DCM, "110150", "Application"),
            ),
            Actor::Anonymous => (
                json!({"display": "unauthenticated"}),
                coding(DCM, "110151", "Application Launcher"),
            ),
        };
        let mut agent = json!({
            "type": {"coding": [agent_type]},
            "who": who,
            "requestor": true
        });
        let policies: Vec<String> = self
            .agent
            .token_jti
            .iter()
            .map(|jti| format!("{TOKEN_POLICY}{jti}"))
            .chain(
                self.consent
                    .iter()
                    .map(|id| format!("{CONSENT_POLICY}{id}")),
            )
            .collect();
        if !policies.is_empty() {
            agent["policy"] = json!(policies);
        }
        if let Some(address) = self.agent.address {
            agent["network"] = json!({"address": address.to_string(), "type": "2"});
        }
        agent
    }
}

/// A Coding without its display: leaves stay small, and the code is what verifiers read.
fn coding(system: &str, code: &str, _display: &str) -> Value {
    json!({"system": system, "code": code})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_keeps_its_query_as_balp_patient_query_does() {
        use base64::Engine as _;
        let event = AuditEvent::new(EventKind::Search, Agent::system())
            .patient("p-1")
            .resource("Observation/o1/_history/1")
            .query("Observation?code=8480-6&_count=10");
        let leaf: Value = serde_json::from_slice(&event.to_leaf()).unwrap();
        let query = &leaf["entity"][2];
        assert_eq!(query["role"]["code"], "24");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(query["query"].as_str().unwrap())
            .unwrap();
        assert_eq!(decoded, b"Observation?code=8480-6&_count=10");
        // Without a query, no query entity.
        let read = AuditEvent::new(EventKind::Read, Agent::system()).patient("p-1");
        let leaf: Value = serde_json::from_slice(&read.to_leaf()).unwrap();
        assert_eq!(leaf["entity"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn leaf_is_a_balp_shaped_audit_event_without_phi() {
        let event = AuditEvent::new(
            EventKind::Read,
            Agent {
                actor: Actor::Client { id: "c1".into() },
                address: Some("192.0.2.1".parse().unwrap()),
                token_jti: Some("jti-1".into()),
            },
        )
        .patient("p-opaque")
        .resource("Observation/o1");
        let leaf: Value = serde_json::from_slice(&event.to_leaf()).unwrap();
        assert_eq!(leaf["resourceType"], "AuditEvent");
        assert_eq!(leaf["type"]["code"], "rest");
        assert_eq!(leaf["subtype"][0]["code"], "read");
        assert_eq!(leaf["action"], "R");
        assert_eq!(leaf["outcome"], "0");
        assert_eq!(
            leaf["agent"][0]["policy"][0],
            "urn:ietf:params:oauth:jti:jti-1"
        );
        assert_eq!(leaf["agent"][0]["network"]["address"], "192.0.2.1");
        assert_eq!(leaf["entity"][0]["what"]["reference"], "Patient/p-opaque");
        assert_eq!(leaf["entity"][0]["role"]["code"], "1");
        assert_eq!(leaf["entity"][1]["what"]["reference"], "Observation/o1");
    }

    #[test]
    fn the_consent_a_disclosure_rests_on_is_a_policy_beside_the_token() {
        let client = |jti: Option<&str>| Agent {
            actor: Actor::Client { id: "c1".into() },
            address: None,
            token_jti: jti.map(str::to_string),
        };
        let with_token = AuditEvent::new(EventKind::Search, client(Some("jti-1")))
            .patient("p-opaque")
            .consent("consent-7")
            .resource("Observation/o1/_history/2")
            .resource("Condition/c1/_history/1");
        let leaf: Value = serde_json::from_slice(&with_token.to_leaf()).unwrap();
        assert_eq!(
            leaf["agent"][0]["policy"],
            json!([
                "urn:ietf:params:oauth:jti:jti-1",
                "urn:phr-gateway:consent:consent-7"
            ])
        );
        assert_eq!(
            leaf["entity"][1]["what"]["reference"],
            "Observation/o1/_history/2"
        );
        assert_eq!(
            leaf["entity"][2]["what"]["reference"],
            "Condition/c1/_history/1"
        );

        let without_token = AuditEvent::new(EventKind::Read, client(None)).consent("consent-7");
        let leaf: Value = serde_json::from_slice(&without_token.to_leaf()).unwrap();
        assert_eq!(
            leaf["agent"][0]["policy"],
            json!(["urn:phr-gateway:consent:consent-7"])
        );

        // Without a consent the leaf is byte for byte what it was before consents existed.
        let plain = AuditEvent::new(EventKind::Read, client(Some("jti-1")));
        let leaf: Value = serde_json::from_slice(&plain.to_leaf()).unwrap();
        assert_eq!(
            leaf["agent"][0]["policy"],
            json!(["urn:ietf:params:oauth:jti:jti-1"])
        );
        let no_policy = AuditEvent::new(EventKind::Read, client(None));
        let leaf: Value = serde_json::from_slice(&no_policy.to_leaf()).unwrap();
        assert!(leaf["agent"][0].get("policy").is_none());
    }

    #[test]
    fn leaf_bytes_without_a_consent_are_pinned() {
        // Hashed into the tree: these bytes must not change meaning, nor shape, for events
        // that name no consent.
        let recorded = time::macros::datetime!(2026-11-25 01:02:03 UTC);
        let by_client = AuditEvent {
            recorded,
            ..AuditEvent::new(
                EventKind::Read,
                Agent {
                    actor: Actor::Client { id: "c1".into() },
                    address: Some("192.0.2.1".parse().unwrap()),
                    token_jti: Some("jti-1".into()),
                },
            )
            .patient("p-opaque")
            .resource("Observation/o1")
        };
        let by_operator = AuditEvent {
            recorded,
            ..AuditEvent::new(
                EventKind::Search,
                Agent {
                    actor: Actor::Account {
                        id: "a1".into(),
                        role: AccountRole::Operator,
                    },
                    address: None,
                    token_jti: None,
                },
            )
            .patient("p-opaque")
        };
        assert_eq!(
            String::from_utf8(by_client.to_leaf()).unwrap(),
            r#"{"resourceType":"AuditEvent","type":{"system":"http://terminology.hl7.org/CodeSystem/audit-event-type","code":"rest"},"subtype":[{"system":"http://hl7.org/fhir/restful-interaction","code":"read"}],"action":"R","recorded":"2026-11-25T01:02:03Z","outcome":"0","agent":[{"type":{"coding":[{"system":"http://dicom.nema.org/resources/ontology/DCM","code":"110153"}]},"who":{"identifier":{"system":"urn:phr-gateway:client","value":"c1"}},"requestor":true,"policy":["urn:ietf:params:oauth:jti:jti-1"],"network":{"address":"192.0.2.1","type":"2"}}],"source":{"observer":{"display":"phr-gateway"},"type":[{"system":"http://terminology.hl7.org/CodeSystem/security-source-type","code":"4"}]},"entity":[{"what":{"reference":"Patient/p-opaque"},"type":{"system":"http://terminology.hl7.org/CodeSystem/audit-entity-type","code":"1"},"role":{"system":"http://terminology.hl7.org/CodeSystem/object-role","code":"1"}},{"what":{"reference":"Observation/o1"},"type":{"system":"http://terminology.hl7.org/CodeSystem/audit-entity-type","code":"2"},"role":{"system":"http://terminology.hl7.org/CodeSystem/object-role","code":"4"}}]}"#
        );
        assert_eq!(
            String::from_utf8(by_operator.to_leaf()).unwrap(),
            r#"{"resourceType":"AuditEvent","type":{"system":"http://terminology.hl7.org/CodeSystem/audit-event-type","code":"rest"},"subtype":[{"system":"http://hl7.org/fhir/restful-interaction","code":"search-type"}],"action":"E","recorded":"2026-11-25T01:02:03Z","outcome":"0","agent":[{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ParticipationType","code":"IRCP"}]},"who":{"identifier":{"system":"urn:phr-gateway:account","value":"a1"}},"requestor":true}],"source":{"observer":{"display":"phr-gateway"},"type":[{"system":"http://terminology.hl7.org/CodeSystem/security-source-type","code":"4"}]},"entity":[{"what":{"reference":"Patient/p-opaque"},"type":{"system":"http://terminology.hl7.org/CodeSystem/audit-entity-type","code":"1"},"role":{"system":"http://terminology.hl7.org/CodeSystem/object-role","code":"1"}}]}"#
        );
    }

    #[test]
    fn failed_login_is_a_minor_failure_by_nobody() {
        let event = AuditEvent::new(
            EventKind::Login,
            Agent {
                actor: Actor::Anonymous,
                address: None,
                token_jti: None,
            },
        )
        .outcome(Outcome::MinorFailure)
        .detail("wrong password");
        let leaf: Value = serde_json::from_slice(&event.to_leaf()).unwrap();
        assert_eq!(leaf["type"]["code"], "110114");
        assert_eq!(leaf["subtype"][0]["code"], "110122");
        assert_eq!(leaf["outcome"], "4");
        assert!(leaf.get("entity").is_none());
    }
}
