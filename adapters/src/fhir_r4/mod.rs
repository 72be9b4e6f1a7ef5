//! Hospital FHIR R4 source: SMART App Launch 2 (standalone patient launch with PKCE S256),
//! paged patient-compartment pulls with guards, and a hospital simulator for tests.
//!
//! Each resource is checked structurally (resourceType, id, size, patient reference) and
//! then read into its typed FHIR model (`typed_check`); the model only gives the verdict,
//! because typed R4B models drop unknown fields and the gateway keeps each resource exactly
//! as the hospital sent it.

pub mod backend_link;
pub mod bundle;
mod client;
mod cursor;
pub mod simulator;
pub mod smart;
pub mod typed_check;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::error::SourceError;
use crate::http;
use crate::source::{
    AuthorizationRequest, AuthorizationStart, Callback, Capabilities, LinkCredentials, LinkMode,
    PendingAuthorization, PullRequest, PullStream, Source,
};

pub use crate::http::RetryPolicy;
pub use cursor::PullCursor;
pub use smart::{BackendKey, BackendServicesClient, BackendToken, SmartConfiguration};

/// Resource types this source knows how to pull from a patient compartment.
pub const SUPPORTED_RESOURCE_TYPES: &[&str] = &[
    "Patient",
    "Observation",
    "Condition",
    "AllergyIntolerance",
    "MedicationRequest",
    "MedicationDispense",
    "MedicationStatement",
    "Immunization",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "Composition",
];

/// How to reach and talk to one hospital's FHIR R4 server.
#[derive(Debug, Clone)]
pub struct FhirR4Config {
    /// The gateway's id of this source (e.g. `hospital-a`); goes into Provenance.
    pub source_id: String,
    /// The FHIR base URL; also the SMART `aud`. Must be https, except on loopback.
    pub fhir_base_url: String,
    /// Our client id registered at the hospital's authorisation server (public client).
    pub client_id: String,
    /// `_count` asked for on each search page.
    pub page_size: u32,
    /// Entries larger than this (bytes of JSON) are rejected rather than stored.
    pub max_entry_bytes: usize,
    /// A response body larger than this ends the pull with a protocol error.
    pub max_response_bytes: usize,
    /// Per-request timeout (connect + response).
    pub request_timeout: Duration,
    /// Requests in flight to this source at once, across all its pulls.
    pub max_concurrent_requests: usize,
    pub retry: RetryPolicy,
    /// Use `Patient/{id}/$everything` when the CapabilityStatement offers it.
    pub prefer_everything: bool,
    /// Extra trust anchors (DER) for hospitals behind a private CA, on top of webpki roots.
    pub extra_root_certificates_der: Vec<Vec<u8>>,
    /// Set for a hospital that delivers by SMART Backend Services: the patient links with a
    /// linking code and the gateway reads with system tokens (see `backend_link`).
    pub backend_key: Option<BackendKey>,
}

impl FhirR4Config {
    /// A config with conservative defaults for everything but the identity of the source.
    pub fn new(
        source_id: impl Into<String>,
        fhir_base_url: impl Into<String>,
        client_id: impl Into<String>,
    ) -> Self {
        FhirR4Config {
            source_id: source_id.into(),
            fhir_base_url: fhir_base_url.into(),
            client_id: client_id.into(),
            page_size: 100,
            max_entry_bytes: 4 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 4,
            retry: RetryPolicy::default(),
            prefer_everything: true,
            extra_root_certificates_der: Vec::new(),
            backend_key: None,
        }
    }
}

impl FhirR4Config {
    pub(crate) fn transport_settings(&self) -> http::TransportSettings {
        http::TransportSettings {
            request_timeout: self.request_timeout,
            max_concurrent_requests: self.max_concurrent_requests,
            retry: self.retry.clone(),
            max_response_bytes: self.max_response_bytes,
            extra_root_certificates_der: self.extra_root_certificates_der.clone(),
        }
    }
}

/// What a pull and the authorisation calls share: config, HTTP client, concurrency limit.
pub(crate) struct SourceContext {
    pub(crate) config: FhirR4Config,
    /// The FHIR base without a trailing slash.
    pub(crate) base_url: String,
    pub(crate) transport: http::Transport,
    /// The last CapabilityStatement summary and when it was read: a server's capabilities
    /// change rarely, and asking before every pull costs a round trip per job.
    pub(crate) capabilities:
        std::sync::Mutex<Option<(std::time::Instant, client::CapabilitySummary)>>,
}

/// A hospital FHIR R4 server reached through SMART App Launch.
pub struct FhirR4Source {
    context: Arc<SourceContext>,
}

impl FhirR4Source {
    pub fn new(config: FhirR4Config) -> Result<Self, SourceError> {
        let base_url = http::validated_base_url(&config.fhir_base_url)?;
        if config.page_size == 0 || config.max_concurrent_requests == 0 {
            return Err(SourceError::Config(
                "page_size and max_concurrent_requests must be positive".into(),
            ));
        }
        if config.client_id.is_empty() {
            return Err(SourceError::Config("client_id is empty".into()));
        }
        let transport = http::Transport::new(&config.transport_settings())?;
        Ok(FhirR4Source {
            context: Arc::new(SourceContext {
                config,
                base_url,
                transport,
                capabilities: std::sync::Mutex::new(None),
            }),
        })
    }

    pub fn config(&self) -> &FhirR4Config {
        &self.context.config
    }

    /// The FHIR base URL as used for requests and as the SMART `aud`.
    pub fn base_url(&self) -> &str {
        &self.context.base_url
    }

    /// Fetches `.well-known/smart-configuration`.
    pub async fn discover(&self) -> Result<SmartConfiguration, SourceError> {
        smart::discover(&self.context).await
    }
}

#[async_trait::async_trait]
impl Source for FhirR4Source {
    fn id(&self) -> &str {
        &self.context.config.source_id
    }

    async fn capabilities(&self) -> Result<Capabilities, SourceError> {
        let statement = client::fetch_capability_statement(&self.context).await?;
        let smart_configuration = smart::discover(&self.context).await?;
        Ok(Capabilities {
            resource_types: statement.resource_types,
            supports_everything: statement.supports_everything,
            scopes_supported: smart_configuration.scopes_supported,
        })
    }

    fn link_mode(&self) -> LinkMode {
        match self.context.config.backend_key {
            Some(_) => LinkMode::LinkingCode,
            None => LinkMode::Redirect,
        }
    }

    async fn start_authorization(
        &self,
        request: &AuthorizationRequest,
    ) -> Result<AuthorizationStart, SourceError> {
        if self.context.config.backend_key.is_some() {
            return backend_link::start(&self.context, request).await;
        }
        let smart_configuration = smart::discover(&self.context).await?;
        smart::start_standalone_launch(&self.context, &smart_configuration, request)
    }

    async fn finish_authorization(
        &self,
        pending: &PendingAuthorization,
        callback: &Callback,
    ) -> Result<LinkCredentials, SourceError> {
        if let Some(key) = &self.context.config.backend_key {
            return backend_link::finish(&self.context, key, pending, callback).await;
        }
        smart::finish_standalone_launch(&self.context, pending, callback).await
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
        if backend_link::is_backend_link(credentials) {
            let key = self.context.config.backend_key.as_ref().ok_or_else(|| {
                SourceError::Config("a Backend Services link but no backend key configured".into())
            })?;
            return backend_link::unlink(&self.context, key, credentials).await;
        }
        smart::revoke(&self.context, credentials).await
    }
}
