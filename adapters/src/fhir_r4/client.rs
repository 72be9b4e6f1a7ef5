//! The pull: one pass per granted resource type over the patient compartment (or one
//! `$everything` pass), one `PullBatch` per page, resumable from the cursor.

use std::collections::VecDeque;
use std::sync::Arc;

use reqwest::header::{ACCEPT, AUTHORIZATION};
use reqwest::StatusCode;
use serde_json::Value;
use time::OffsetDateTime;

use super::backend_link;
use super::bundle::{self, EntryOutcome, EntryRules};
use super::cursor::{self, InProgressPass, PullCursor, EVERYTHING_KEY};
use super::http::{is_under_base, HttpReply};
use super::smart::{self, is_fhir_id, is_resource_type_name};
use super::SourceContext;
use crate::error::SourceError;
use crate::source::{
    LinkCredentials, Provenance, PullBatch, PullItem, PullRequest, PulledResource,
};

/// The FHIR JSON media type, sent exactly (no `fhirVersion` parameter: some servers
/// answer 406 to it).
const FHIR_JSON: &str = "application/fhir+json";

/// What `/metadata` told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CapabilitySummary {
    pub(crate) resource_types: Vec<String>,
    pub(crate) supports_everything: bool,
}

/// How long a CapabilityStatement summary is reused.
const CAPABILITIES_TTL: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// The server's capabilities, read at most once per [`CAPABILITIES_TTL`] (failures are not
/// remembered: the next pull asks again).
pub(crate) async fn fetch_capability_statement(
    context: &SourceContext,
) -> Result<CapabilitySummary, SourceError> {
    if let Ok(cached) = context.capabilities.lock() {
        if let Some((at, summary)) = cached.as_ref() {
            if at.elapsed() < CAPABILITIES_TTL {
                return Ok(summary.clone());
            }
        }
    }
    let summary = read_capability_statement(context).await?;
    if let Ok(mut cached) = context.capabilities.lock() {
        *cached = Some((std::time::Instant::now(), summary.clone()));
    }
    Ok(summary)
}

async fn read_capability_statement(
    context: &SourceContext,
) -> Result<CapabilitySummary, SourceError> {
    let request = context
        .transport
        .client
        .get(format!("{}/metadata", context.base_url))
        .header(ACCEPT, FHIR_JSON)
        .build()
        .map_err(|error| SourceError::Config(format!("metadata request: {error}")))?;
    let reply = context.transport.execute(request).await?;
    if !reply.status.is_success() {
        return Err(SourceError::Protocol(format!(
            "/metadata answered HTTP {}",
            reply.status
        )));
    }
    let statement: Value = serde_json::from_slice(&reply.body)
        .map_err(|error| SourceError::Protocol(format!("CapabilityStatement: {error}")))?;
    summarise_capability_statement(&statement)
}

fn summarise_capability_statement(statement: &Value) -> Result<CapabilitySummary, SourceError> {
    if statement.get("resourceType").and_then(Value::as_str) != Some("CapabilityStatement") {
        return Err(SourceError::Protocol(
            "/metadata is not a CapabilityStatement".into(),
        ));
    }
    if let Some(version) = statement.get("fhirVersion").and_then(Value::as_str) {
        if !version.starts_with("4.0") {
            return Err(SourceError::Unsupported(format!(
                "server speaks FHIR {version}, not R4 (4.0.x)"
            )));
        }
    }
    let is_everything = |operation: &Value| {
        operation.get("name").and_then(Value::as_str) == Some("everything")
            || operation
                .get("definition")
                .and_then(Value::as_str)
                .is_some_and(|definition| definition.ends_with("Patient-everything"))
    };
    let mut summary = CapabilitySummary {
        resource_types: Vec::new(),
        supports_everything: false,
    };
    let servers = statement
        .get("rest")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|rest| rest.get("mode").and_then(Value::as_str) == Some("server"));
    for rest in servers {
        for resource in rest
            .get("resource")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(resource_type) = resource.get("type").and_then(Value::as_str) else {
                continue;
            };
            if !summary.resource_types.iter().any(|t| t == resource_type) {
                summary.resource_types.push(resource_type.to_string());
            }
            let operations = resource.get("operation").and_then(Value::as_array);
            if resource_type == "Patient" && operations.into_iter().flatten().any(is_everything) {
                summary.supports_everything = true;
            }
        }
    }
    Ok(summary)
}

/// One walk over a set of pages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pass {
    /// `GET Patient/{id}`: a single resource, no paging.
    PatientRead,
    Search(String),
    Everything,
}

impl Pass {
    /// The key of this pass in the cursor.
    fn cursor_key(&self) -> &str {
        match self {
            Pass::PatientRead => "Patient",
            Pass::Search(resource_type) => resource_type,
            Pass::Everything => EVERYTHING_KEY,
        }
    }
}

/// The pass whose pages are being fetched.
struct CurrentPass {
    pass: Pass,
    url: String,
    page: u32,
    /// Resources not updated after this were stored by an earlier pull; skipped even if a
    /// server ignores `_lastUpdated` / `_since`.
    since: Option<String>,
    newest_seen: Option<String>,
    /// Whether `url` came from a stored cursor (and may have expired at the server).
    resumed: bool,
}

enum RunState {
    NotStarted,
    Running,
    Finished,
}

pub(crate) struct PullRun {
    context: Arc<SourceContext>,
    instruction_id: String,
    credentials: LinkCredentials,
    requested_types: Vec<String>,
    /// Requested types the credentials grant: the only ones fetched or yielded.
    granted_types: Vec<String>,
    rules: EntryRules,
    cursor: PullCursor,
    state: RunState,
    passes: VecDeque<Pass>,
    current: Option<CurrentPass>,
    refresh_used: bool,
    /// New credentials not yet handed to the gateway in a batch.
    credentials_to_report: Option<LinkCredentials>,
    /// An error held back so that a batch carrying refreshed credentials goes first.
    deferred_error: Option<SourceError>,
}

impl PullRun {
    pub(crate) fn new(
        context: Arc<SourceContext>,
        request: PullRequest,
    ) -> Result<Self, SourceError> {
        let cursor = PullCursor::parse(request.cursor.as_deref())?;
        if !is_fhir_id(&request.credentials.source_patient_id) {
            return Err(SourceError::Config(
                "linked patient id is not a FHIR id".into(),
            ));
        }
        let mut requested_types: Vec<String> = Vec::new();
        for resource_type in request.resource_types {
            if !is_resource_type_name(&resource_type) {
                return Err(SourceError::Config(format!(
                    "{resource_type:?} is not a FHIR resource type"
                )));
            }
            // Types outside the patient compartment (e.g. Medication, reached through
            // references) cannot be searched by patient: asking would only earn a 404.
            if !super::SUPPORTED_RESOURCE_TYPES.contains(&resource_type.as_str()) {
                continue;
            }
            if !requested_types.contains(&resource_type) {
                requested_types.push(resource_type);
            }
        }
        let rules = EntryRules {
            linked_patient_id: request.credentials.source_patient_id.clone(),
            fhir_base_url: context.base_url.clone(),
            max_entry_bytes: context.config.max_entry_bytes,
        };
        Ok(PullRun {
            context,
            instruction_id: request.instruction_id,
            credentials: request.credentials,
            requested_types,
            granted_types: Vec::new(),
            rules,
            cursor,
            state: RunState::NotStarted,
            passes: VecDeque::new(),
            current: None,
            refresh_used: false,
            credentials_to_report: None,
            deferred_error: None,
        })
    }

    /// The next batch, `None` when the pull is over (after an error, too).
    pub(crate) async fn next_batch(&mut self) -> Option<Result<PullBatch, SourceError>> {
        if let Some(error) = self.deferred_error.take() {
            self.state = RunState::Finished;
            return Some(Err(error));
        }
        if matches!(self.state, RunState::Finished) {
            return None;
        }
        match self.step().await {
            Ok(Some(batch)) => Some(Ok(batch)),
            Ok(None) => {
                self.state = RunState::Finished;
                // Never end a pull sitting on refreshed credentials the gateway has not seen.
                self.credentials_to_report
                    .is_some()
                    .then(|| Ok(self.batch(Vec::new())))
            }
            Err(error) => {
                if self.credentials_to_report.is_some() {
                    self.deferred_error = Some(error);
                    return Some(Ok(self.batch(Vec::new())));
                }
                self.state = RunState::Finished;
                Some(Err(error))
            }
        }
    }

    async fn step(&mut self) -> Result<Option<PullBatch>, SourceError> {
        loop {
            match self.state {
                RunState::Finished => return Ok(None),
                RunState::NotStarted => {
                    let refused = self.plan().await?;
                    self.state = RunState::Running;
                    if !refused.is_empty() {
                        let items = refused
                            .into_iter()
                            .map(|resource_type| PullItem::TypeNotGranted { resource_type })
                            .collect();
                        return Ok(Some(self.batch(items)));
                    }
                }
                RunState::Running => {
                    if self.current.is_none() {
                        let Some(pass) = self.passes.pop_front() else {
                            self.state = RunState::Finished;
                            return Ok(None);
                        };
                        self.current = Some(self.begin(pass)?);
                    }
                    if let Some(batch) = self.fetch_current_page().await? {
                        return Ok(Some(batch));
                    }
                }
            }
        }
    }

    /// Decides the passes; returns the requested types the credentials do not grant, which
    /// are never requested from the server.
    async fn plan(&mut self) -> Result<Vec<String>, SourceError> {
        let context = if backend_link::is_backend_link(&self.credentials) {
            smart::ScopeContext::System
        } else {
            smart::ScopeContext::Patient
        };
        let (granted, refused) = smart::split_by_grant_in(
            &self.requested_types,
            &self.credentials.granted_scopes,
            context,
        );
        self.granted_types = granted;
        if self.granted_types.is_empty() {
            self.cursor.in_progress = None;
            return Ok(refused);
        }
        let use_everything = self.context.config.prefer_everything
            && match fetch_capability_statement(&self.context).await {
                Ok(summary) => summary.supports_everything,
                Err(error @ SourceError::Unavailable { .. }) => return Err(error),
                // A broken /metadata should not stop a pull that plain searches can do.
                Err(error) => {
                    tracing::warn!(%error, "CapabilityStatement unusable; searching per type");
                    false
                }
            };
        self.passes = if use_everything {
            VecDeque::from([Pass::Everything])
        } else {
            self.search_passes()
        };
        self.resume_in_progress_pass()?;
        Ok(refused)
    }

    fn search_passes(&self) -> VecDeque<Pass> {
        let mut passes = VecDeque::new();
        if self.granted_types.iter().any(|t| t == "Patient") {
            passes.push_back(Pass::PatientRead);
        }
        for resource_type in self.granted_types.iter().filter(|t| *t != "Patient") {
            passes.push_back(Pass::Search(resource_type.clone()));
        }
        passes
    }

    /// Puts the pass the cursor was in the middle of first, starting at its stored page.
    fn resume_in_progress_pass(&mut self) -> Result<(), SourceError> {
        let Some(progress) = self.cursor.in_progress.clone() else {
            return Ok(());
        };
        let position = self
            .passes
            .iter()
            .position(|pass| pass.cursor_key() == progress.resource_type);
        let resumable = position.filter(|_| is_under_base(&self.context.base_url, &progress.next));
        let Some(position) = resumable else {
            // Planned differently this time (mode or grant changed): start that type over.
            self.cursor.in_progress = None;
            return Ok(());
        };
        let Some(pass) = self.passes.remove(position) else {
            return Ok(());
        };
        let mut current = self.begin(pass)?;
        current.url = progress.next;
        current.page = progress.page;
        current.newest_seen = progress.newest_seen;
        current.resumed = true;
        self.current = Some(current);
        Ok(())
    }

    fn begin(&self, pass: Pass) -> Result<CurrentPass, SourceError> {
        let base = &self.context.base_url;
        let patient = &self.credentials.source_patient_id;
        let page_size = self.context.config.page_size.to_string();
        let (path, since) = match &pass {
            Pass::PatientRead => (
                format!("{base}/Patient/{patient}"),
                self.cursor.since_for("Patient"),
            ),
            Pass::Search(resource_type) => (
                format!("{base}/{resource_type}"),
                self.cursor.since_for(resource_type),
            ),
            Pass::Everything => (
                format!("{base}/Patient/{patient}/$everything"),
                self.cursor.since_for_everything(&self.granted_types),
            ),
        };
        let mut url = url::Url::parse(&path)
            .map_err(|error| SourceError::Config(format!("request URL: {error}")))?;
        match &pass {
            Pass::PatientRead => {}
            Pass::Search(_) => {
                let mut query = url.query_pairs_mut();
                query.append_pair("patient", patient);
                query.append_pair("_count", &page_size);
                if let Some(since) = &since {
                    query.append_pair("_lastUpdated", &format!("gt{since}"));
                }
            }
            Pass::Everything => {
                let mut query = url.query_pairs_mut();
                query.append_pair("_count", &page_size);
                if let Some(since) = &since {
                    query.append_pair("_since", since);
                }
            }
        }
        Ok(CurrentPass {
            pass,
            url: url.into(),
            page: 0,
            since,
            newest_seen: None,
            resumed: false,
        })
    }

    /// Fetches the current pass's page. `None` means "nothing to hand over yet, go on"
    /// (the pass was re-planned).
    async fn fetch_current_page(&mut self) -> Result<Option<PullBatch>, SourceError> {
        let Some(current) = self.current.as_ref() else {
            return Ok(None);
        };
        let url = current.url.clone();
        let reply = self.get_authorized(&url).await?;
        let Some(current) = self.current.take() else {
            return Ok(None);
        };
        match reply.status {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN => return Ok(self.pass_forbidden(current.pass)),
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::GONE
                if current.resumed =>
            {
                // A stored paging link the server no longer honours: redo the pass from
                // its high-water mark.
                tracing::info!(status = %reply.status, "stored page link expired; restarting pass");
                self.cursor.in_progress = None;
                self.current = Some(self.begin(current.pass)?);
                return Ok(None);
            }
            status => {
                return Err(SourceError::Protocol(format!(
                    "{} answered HTTP {status}",
                    current.pass.cursor_key()
                )))
            }
        }
        let retrieved_at = unix_millis_now();
        let (outcomes, next_url) = match current.pass {
            Pass::PatientRead => (
                vec![bundle::examine_resource_bytes(&reply.body, &self.rules)],
                None,
            ),
            Pass::Search(ref resource_type) => {
                match bundle::parse_bundle_page_blocking(reply.body, &self.rules).await {
                    Ok(page) => (page.entries, page.next_url),
                    // One type's unreadable page does not end the pull: record it and go
                    // on with the next type (it is fetched again at the next pull).
                    Err(error) => {
                        let resource_type = resource_type.clone();
                        if self.cursor.in_progress.as_ref().is_some_and(|progress| {
                            progress.resource_type == current.pass.cursor_key()
                        }) {
                            self.cursor.in_progress = None;
                        }
                        return Ok(Some(self.batch(vec![PullItem::Rejected {
                            resource_type: Some(resource_type),
                            source_resource_id: None,
                            reason: format!("a page of this type could not be read: {error}"),
                        }])));
                    }
                }
            }
            Pass::Everything => {
                match bundle::parse_bundle_page_blocking(reply.body, &self.rules).await {
                    Ok(page) => (page.entries, page.next_url),
                    // An unreadable `$everything` page does not end the pull: record it and
                    // fetch type by type instead, which reaches the same data.
                    Err(error) => {
                        tracing::warn!(%error, "$everything page unreadable; searching per type");
                        if self.cursor.in_progress.as_ref().is_some_and(|progress| {
                            progress.resource_type == current.pass.cursor_key()
                        }) {
                            self.cursor.in_progress = None;
                        }
                        self.passes = self.search_passes();
                        return Ok(Some(self.batch(vec![PullItem::Rejected {
                        resource_type: None,
                        source_resource_id: None,
                        reason: format!(
                            "a $everything page could not be read ({error}); fetching type by type instead"
                        ),
                    }])));
                    }
                }
            }
        };
        let mut current = current;
        let mut items = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            match outcome {
                EntryOutcome::Accepted(resource) => {
                    if !self.granted_types.contains(&resource.resource_type) {
                        // $everything brings Practitioners, Medications, …: not asked for.
                        continue;
                    }
                    if let (Some(since), Some(updated)) = (&current.since, &resource.last_updated) {
                        if cursor::compare_instants(updated, since).is_le() {
                            continue;
                        }
                    }
                    current.newest_seen = cursor::newest(
                        current.newest_seen.as_deref(),
                        resource.last_updated.as_deref(),
                    )
                    .map(str::to_string);
                    items.push(PullItem::Resource(PulledResource {
                        resource_type: resource.resource_type,
                        source_resource_id: resource.id,
                        version_id: resource.version_id,
                        body: resource.body,
                        provenance: Provenance {
                            source: self.context.config.source_id.clone(),
                            retrieved_at,
                            instruction_id: self.instruction_id.clone(),
                        },
                    }));
                }
                EntryOutcome::Rejected {
                    resource_type,
                    id,
                    reason,
                } => items.push(PullItem::Rejected {
                    resource_type,
                    source_resource_id: id,
                    reason,
                }),
                EntryOutcome::Informational => {}
            }
        }
        current.page += 1;
        match next_url {
            Some(next) => {
                if !is_under_base(&self.context.base_url, &next) {
                    return Err(SourceError::Protocol(
                        "next link leaves the FHIR base; not following it with our token".into(),
                    ));
                }
                if next == current.url {
                    return Err(SourceError::Protocol(
                        "next link points at the same page".into(),
                    ));
                }
                self.cursor.in_progress = Some(InProgressPass {
                    resource_type: current.pass.cursor_key().to_string(),
                    next: next.clone(),
                    page: current.page,
                    newest_seen: current.newest_seen.clone(),
                });
                current.url = next;
                current.resumed = false;
                self.current = Some(current);
            }
            None => {
                self.cursor
                    .complete_pass(current.pass.cursor_key(), current.newest_seen);
            }
        }
        Ok(Some(self.batch(items)))
    }

    /// 403 on a pass: the types it covers are not granted after all; the pull goes on.
    fn pass_forbidden(&mut self, pass: Pass) -> Option<PullBatch> {
        if self
            .cursor
            .in_progress
            .as_ref()
            .is_some_and(|progress| progress.resource_type == pass.cursor_key())
        {
            self.cursor.in_progress = None;
        }
        let resource_type = match pass {
            Pass::PatientRead => "Patient".to_string(),
            Pass::Search(resource_type) => resource_type,
            Pass::Everything => {
                // The server will not do $everything for this token: search type by type.
                tracing::info!("$everything refused; falling back to per-type searches");
                self.passes = self.search_passes();
                return None;
            }
        };
        Some(self.batch(vec![PullItem::TypeNotGranted { resource_type }]))
    }

    /// GET with the bearer token; on 401 refreshes once per pull and tries again.
    async fn get_authorized(&mut self, url: &str) -> Result<HttpReply, SourceError> {
        let reply = self.get(url).await?;
        if reply.status != StatusCode::UNAUTHORIZED {
            return Ok(reply);
        }
        if self.refresh_used {
            return Err(SourceError::Unauthorized(
                "access token refused again after a refresh".into(),
            ));
        }
        self.refresh_used = true;
        let refreshed = match (
            backend_link::is_backend_link(&self.credentials),
            &self.context.config.backend_key,
        ) {
            (true, Some(key)) => backend_link::renew(&self.context, key, &self.credentials).await?,
            _ => smart::refresh(&self.context, &self.credentials).await?,
        };
        self.credentials = refreshed.clone();
        self.credentials_to_report = Some(refreshed);
        let reply = self.get(url).await?;
        if reply.status == StatusCode::UNAUTHORIZED {
            return Err(SourceError::Unauthorized(
                "freshly refreshed access token refused".into(),
            ));
        }
        Ok(reply)
    }

    async fn get(&self, url: &str) -> Result<HttpReply, SourceError> {
        let request = self
            .context
            .transport
            .client
            .get(url)
            .header(ACCEPT, FHIR_JSON)
            .header(
                AUTHORIZATION,
                format!("Bearer {}", self.credentials.access_token),
            )
            .build()
            .map_err(|error| SourceError::Config(format!("FHIR request: {error}")))?;
        self.context.transport.execute(request).await
    }

    fn batch(&mut self, items: Vec<PullItem>) -> PullBatch {
        PullBatch {
            items,
            cursor: self.cursor.encode(),
            refreshed_credentials: self.credentials_to_report.take(),
        }
    }
}

fn unix_millis_now() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn capability_statement_summary() {
        let statement = json!({
            "resourceType": "CapabilityStatement",
            "fhirVersion": "4.0.1",
            "rest": [{"mode": "server", "resource": [
                {"type": "Patient", "operation": [{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}]},
                {"type": "Observation"}
            ]}]
        });
        let summary = summarise_capability_statement(&statement).expect("summary");
        assert!(summary.supports_everything);
        assert_eq!(summary.resource_types, vec!["Patient", "Observation"]);
        let r5 = json!({"resourceType": "CapabilityStatement", "fhirVersion": "5.0.0"});
        assert!(matches!(
            summarise_capability_statement(&r5),
            Err(SourceError::Unsupported(_))
        ));
    }
}
