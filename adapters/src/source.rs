//! The `Source` trait: what every data source offers the gateway, whatever its protocol.
//!
//! The flow: `capabilities` (discovery) → `start_authorization` (the gateway sends the
//! patient to the returned URL and keeps the `PendingAuthorization`, secrets included,
//! encrypted) → `finish_authorization` with the callback (yields `LinkCredentials`, kept
//! encrypted) → `pull` from a cursor, as a stream of batches each carrying the cursor to
//! resume from → `revoke` when the patient withdraws the instruction.

use std::collections::BTreeMap;

use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::error::SourceError;

/// What a source can deliver and how it authorises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// FHIR resource types the source can deliver.
    pub resource_types: Vec<String>,
    /// Whether `Patient/[id]/$everything` is offered.
    pub supports_everything: bool,
    /// Scopes the source advertises (SMART `scopes_supported`), if it says.
    pub scopes_supported: Vec<String>,
}

/// What the patient instructed: which resource types to fetch, for which instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationRequest {
    /// The gateway's pull-instruction id; carried into Provenance.
    pub instruction_id: String,
    /// The resource types the patient chose (mapped from their categories).
    pub resource_types: Vec<String>,
    /// Where the source sends the patient back to (the gateway's callback URL).
    pub redirect_uri: String,
    /// Proxy (代理人) access: the person the patient acts for, as the source knows them.
    /// `None` when patients link their own record. Sources without proxy access refuse it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
}

/// How the patient links a source to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkMode {
    /// The patient is sent to the source (`authorize_url`) and comes back with a code.
    Redirect,
    /// The source gave the patient a one-time linking code, which they enter at the
    /// gateway; it is passed to `finish_authorization` as `Callback::code` with the
    /// pending `state`. There is no `authorize_url`.
    LinkingCode,
}

/// Where to send the patient, and what to keep until they come back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationStart {
    /// Empty for sources linked by code (`LinkMode::LinkingCode`).
    pub authorize_url: String,
    pub pending: PendingAuthorization,
}

/// Kept by the gateway (encrypted) between start and finish. Holds secrets.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAuthorization {
    pub state: String,
    pub code_verifier: String,
    pub redirect_uri: String,
    pub requested_scopes: Vec<String>,
    /// Anything else the source needs at finish (e.g. the token endpoint it discovered).
    pub extra: BTreeMap<String, String>,
}

impl std::fmt::Debug for PendingAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAuthorization")
            .field("state", &self.state)
            .field("redirect_uri", &self.redirect_uri)
            .field("requested_scopes", &self.requested_scopes)
            .finish_non_exhaustive()
    }
}

/// The query parameters the source sent the patient back with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Callback {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// A working link to the patient's record at a source. Holds secrets; the gateway stores
/// it encrypted with the patient's data key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCredentials {
    pub access_token: String,
    pub refresh_token: Option<String>,
    /// Unix seconds when the access token expires, if known.
    pub expires_at: Option<i64>,
    /// The patient's id at the source (SMART `patient`, the portal's `subject`).
    pub source_patient_id: String,
    pub granted_scopes: Vec<String>,
    /// Anything else the source needs later (token endpoint, linkage expiry, …).
    pub extra: BTreeMap<String, String>,
}

impl std::fmt::Debug for LinkCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkCredentials")
            .field("source_patient_id", &self.source_patient_id)
            .field("granted_scopes", &self.granted_scopes)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// One pull: from where, since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub instruction_id: String,
    pub credentials: LinkCredentials,
    /// The cursor of the last batch stored, or `None` for everything.
    pub cursor: Option<String>,
    /// Resource types the patient chose; never more than the credentials grant.
    pub resource_types: Vec<String>,
}

/// Where a resource came from, for its Provenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The gateway's id of the source.
    pub source: String,
    /// Unix milliseconds when the gateway received it.
    pub retrieved_at: i64,
    pub instruction_id: String,
}

/// One resource as received (JSON bytes kept; code systems normalised on this copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledResource {
    pub resource_type: String,
    pub source_resource_id: String,
    pub version_id: Option<String>,
    pub body: Vec<u8>,
    pub provenance: Provenance,
}

/// Each thing a pull yields. Item-level problems never end the pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullItem {
    Resource(PulledResource),
    /// An entry the gateway must not store, with the reason (malformed, wrong patient…).
    Rejected {
        resource_type: Option<String>,
        source_resource_id: Option<String>,
        reason: String,
    },
    /// The source refused this type (e.g. 403): the pull goes on without it.
    TypeNotGranted {
        resource_type: String,
    },
}

/// A page of a pull. The gateway stores `items`, then persists `cursor` to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullBatch {
    pub items: Vec<PullItem>,
    pub cursor: String,
    /// New credentials when the source refreshed them during the pull.
    pub refreshed_credentials: Option<LinkCredentials>,
}

pub type PullStream = BoxStream<'static, Result<PullBatch, SourceError>>;

#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// The gateway's id of this source (e.g. `hospital-a`).
    fn id(&self) -> &str;

    async fn capabilities(&self) -> Result<Capabilities, SourceError>;

    /// How the patient links this source; most sources send the patient to them.
    fn link_mode(&self) -> LinkMode {
        LinkMode::Redirect
    }

    async fn start_authorization(
        &self,
        request: &AuthorizationRequest,
    ) -> Result<AuthorizationStart, SourceError>;

    async fn finish_authorization(
        &self,
        pending: &PendingAuthorization,
        callback: &Callback,
    ) -> Result<LinkCredentials, SourceError>;

    async fn pull(&self, request: PullRequest) -> Result<PullStream, SourceError>;

    async fn revoke(&self, credentials: &LinkCredentials) -> Result<(), SourceError>;
}
