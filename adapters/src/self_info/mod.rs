//! The My Number Portal-style self-information API (自己情報取得API) as a source: the person
//! authorises at the portal by reading their My Number Card, the gateway then fetches their
//! 薬剤情報, 特定健診, 医療費通知, 予防接種 and 乳幼児健診 records (and 学校健診 where the
//! portal offers it) and maps each record to a JP Core FHIR R4 resource.
//!
//! The wire format follows the self-information API spec: an authorisation screen at
//! `{portal}/authorize` (PKCE S256, `state`, `scope` = categories, `linkage=period|once`),
//! `POST {portal}/token` and `POST {portal}/revoke` authenticated with `private_key_jwt`
//! (the gateway's ES384 key), and paged JSON lists at `{portal}/v1/…` fetched with `since`
//! (when a record *became available at the portal*) and `page_token`.
//!
//! Unlike a hospital FHIR server, the portal sends its own JSON, so this adapter builds the
//! FHIR resources itself (`mapping`), one per record or record item, with the portal's
//! record id as the resource id and the record's `version` as its version: a corrected
//! record replaces the stored one in place, a withdrawn one is kept with status
//! `entered-in-error`.

mod auth;
mod client;
mod cursor;
pub mod mapping;
pub mod simulator;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::error::SourceError;
use crate::http::{self, RetryPolicy};
use crate::oauth::BackendKey;
use crate::source::{
    AuthorizationRequest, AuthorizationStart, Callback, Capabilities, LinkCredentials,
    PendingAuthorization, PullRequest, PullStream, Source,
};

pub use auth::{
    CHOOSE_AT_PORTAL, EXTRA_LINKAGE, EXTRA_LINKAGE_EXPIRES_AT, EXTRA_ON_BEHALF_OF,
    EXTRA_TOKEN_ENDPOINT, REPRESENTED_PARAMETER,
};
pub use cursor::SelfInfoCursor;

/// One kind of record the portal offers; its scope name is also the wire name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// 特定健診: an hc08 CDA document per checkup, yielded as a DocumentReference.
    SpecificCheckup,
    /// 薬剤情報: dispensing records, one MedicationDispense per drug.
    Medication,
    /// 予防接種.
    Immunization,
    /// 乳幼児健診: one Observation per measurement.
    InfantCheckup,
    /// 医療費通知: one ExplanationOfBenefit per month and institution.
    MedicalCost,
    /// 学校健診: not offered by the real portal today; off unless configured.
    SchoolCheckup,
}

impl Category {
    pub const ALL: [Category; 6] = [
        Category::SpecificCheckup,
        Category::Medication,
        Category::Immunization,
        Category::InfantCheckup,
        Category::MedicalCost,
        Category::SchoolCheckup,
    ];

    /// The scope name (and cursor key) of the category.
    pub fn scope(self) -> &'static str {
        match self {
            Category::SpecificCheckup => "checkup.specific",
            Category::Medication => "medication",
            Category::Immunization => "immunization",
            Category::InfantCheckup => "checkup.infant",
            Category::MedicalCost => "medical_cost",
            Category::SchoolCheckup => "checkup.school",
        }
    }

    pub fn from_scope(scope: &str) -> Option<Category> {
        Category::ALL
            .into_iter()
            .find(|category| category.scope() == scope)
    }

    /// The list endpoint, relative to the portal base URL.
    pub fn endpoint(self) -> &'static str {
        match self {
            Category::SpecificCheckup => "/v1/checkups",
            Category::Medication => "/v1/medications",
            Category::Immunization => "/v1/immunizations",
            Category::InfantCheckup => "/v1/infant-checkups",
            Category::MedicalCost => "/v1/medical-costs",
            Category::SchoolCheckup => "/v1/school-checkups",
        }
    }

    /// The FHIR resource type the category's records become.
    pub fn resource_type(self) -> &'static str {
        match self {
            Category::SpecificCheckup => "DocumentReference",
            Category::Medication => "MedicationDispense",
            Category::Immunization => "Immunization",
            Category::InfantCheckup | Category::SchoolCheckup => "Observation",
            Category::MedicalCost => "ExplanationOfBenefit",
        }
    }

    /// The categories offered unless configured otherwise: everything the real portal
    /// offers today (学校健診 is not among them).
    pub fn default_enabled() -> Vec<Category> {
        Category::ALL
            .into_iter()
            .filter(|category| *category != Category::SchoolCheckup)
            .collect()
    }
}

/// 期間連携 (`period`: refresh for up to 90 days) or a one-off fetch (`once`: no refresh
/// token; the link ends when the access token does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linkage {
    Period,
    Once,
}

impl Linkage {
    pub fn as_str(self) -> &'static str {
        match self {
            Linkage::Period => "period",
            Linkage::Once => "once",
        }
    }

    pub fn parse(value: &str) -> Option<Linkage> {
        match value {
            "period" => Some(Linkage::Period),
            "once" => Some(Linkage::Once),
            _ => None,
        }
    }
}

/// How to reach the portal and what to ask it for.
#[derive(Debug, Clone)]
pub struct SelfInfoConfig {
    /// The gateway's id of this source (e.g. `myna-portal`); goes into Provenance.
    pub source_id: String,
    /// The portal's base URL. Must be https, except on loopback.
    pub portal_base_url: String,
    /// Our client id registered at the portal (a confidential client: `private_key_jwt`).
    pub client_id: String,
    /// The gateway's signing key; its public JWK is registered with the portal.
    pub backend_key: BackendKey,
    /// Categories this deployment asks for. 学校健診 is off unless added here.
    pub enabled_categories: Vec<Category>,
    /// Records asked for per list page (`page_size`).
    pub page_size: u32,
    pub linkage: Linkage,
    /// 特定健診 documents larger than this are rejected rather than stored.
    pub max_document_bytes: usize,
    /// A response body larger than this ends the pull with a protocol error.
    pub max_response_bytes: usize,
    /// Per-request timeout (connect + response).
    pub request_timeout: Duration,
    /// Requests in flight to the portal at once, across all pulls.
    pub max_concurrent_requests: usize,
    pub retry: RetryPolicy,
    /// Extra trust anchors (DER) on top of webpki roots.
    pub extra_root_certificates_der: Vec<Vec<u8>>,
}

impl SelfInfoConfig {
    /// A config with conservative defaults for everything but the identity of the source.
    pub fn new(
        source_id: impl Into<String>,
        portal_base_url: impl Into<String>,
        client_id: impl Into<String>,
        backend_key: BackendKey,
    ) -> Self {
        SelfInfoConfig {
            source_id: source_id.into(),
            portal_base_url: portal_base_url.into(),
            client_id: client_id.into(),
            backend_key,
            enabled_categories: Category::default_enabled(),
            page_size: 100,
            linkage: Linkage::Period,
            max_document_bytes: 4 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 4,
            retry: RetryPolicy::default(),
            extra_root_certificates_der: Vec::new(),
        }
    }

    fn transport_settings(&self) -> http::TransportSettings {
        http::TransportSettings {
            request_timeout: self.request_timeout,
            max_concurrent_requests: self.max_concurrent_requests,
            retry: self.retry.clone(),
            max_response_bytes: self.max_response_bytes,
            extra_root_certificates_der: self.extra_root_certificates_der.clone(),
        }
    }
}

/// What the authorisation calls and pulls share.
pub(crate) struct PortalContext {
    pub(crate) config: SelfInfoConfig,
    /// The portal base without a trailing slash.
    pub(crate) base_url: String,
    pub(crate) transport: http::Transport,
}

impl PortalContext {
    pub(crate) fn token_url(&self) -> String {
        format!("{}/token", self.base_url)
    }

    /// The enabled categories among `resource_types`, in a fixed order.
    pub(crate) fn categories_for(&self, resource_types: &[String]) -> Vec<Category> {
        Category::ALL
            .into_iter()
            .filter(|category| self.config.enabled_categories.contains(category))
            .filter(|category| {
                resource_types
                    .iter()
                    .any(|resource_type| resource_type == category.resource_type())
            })
            .collect()
    }
}

/// The self-information API of one portal.
pub struct SelfInfoSource {
    context: Arc<PortalContext>,
}

impl SelfInfoSource {
    pub fn new(config: SelfInfoConfig) -> Result<Self, SourceError> {
        let base_url = http::validated_base_url(&config.portal_base_url)?;
        if config.page_size == 0 || config.max_concurrent_requests == 0 {
            return Err(SourceError::Config(
                "page_size and max_concurrent_requests must be positive".into(),
            ));
        }
        if config.client_id.is_empty() {
            return Err(SourceError::Config("client_id is empty".into()));
        }
        if config.enabled_categories.is_empty() {
            return Err(SourceError::Config("no category is enabled".into()));
        }
        let transport = http::Transport::new(&config.transport_settings())?;
        Ok(SelfInfoSource {
            context: Arc::new(PortalContext {
                config,
                base_url,
                transport,
            }),
        })
    }

    pub fn config(&self) -> &SelfInfoConfig {
        &self.context.config
    }
}

#[async_trait::async_trait]
impl Source for SelfInfoSource {
    fn id(&self) -> &str {
        &self.context.config.source_id
    }

    /// The portal publishes no discovery document: what we can get is what we enabled.
    async fn capabilities(&self) -> Result<Capabilities, SourceError> {
        let mut resource_types: Vec<String> = Vec::new();
        for category in &self.context.config.enabled_categories {
            let resource_type = category.resource_type().to_string();
            if !resource_types.contains(&resource_type) {
                resource_types.push(resource_type);
            }
        }
        Ok(Capabilities {
            resource_types,
            supports_everything: false,
            scopes_supported: self
                .context
                .config
                .enabled_categories
                .iter()
                .map(|category| category.scope().to_string())
                .collect(),
        })
    }

    async fn start_authorization(
        &self,
        request: &AuthorizationRequest,
    ) -> Result<AuthorizationStart, SourceError> {
        auth::start(&self.context, request)
    }

    async fn finish_authorization(
        &self,
        pending: &PendingAuthorization,
        callback: &Callback,
    ) -> Result<LinkCredentials, SourceError> {
        auth::finish(&self.context, pending, callback).await
    }

    async fn pull(&self, request: PullRequest) -> Result<PullStream, SourceError> {
        let run = client::PullRun::new(Arc::clone(&self.context), request)?;
        Ok(futures::stream::unfold(run, |mut run| async move {
            let batch = run.next_batch().await?;
            Some((batch, run))
        })
        .boxed())
    }

    async fn revoke(&self, credentials: &LinkCredentials) -> Result<(), SourceError> {
        auth::revoke(&self.context, credentials).await
    }
}
