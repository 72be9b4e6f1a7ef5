//! The pull: one pass per enabled and granted category, one `PullBatch` per list page,
//! resumable from the cursor. 特定健診 list entries are followed to their CDA document.

use std::collections::VecDeque;
use std::sync::Arc;

use reqwest::header::{ACCEPT, AUTHORIZATION};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;

use super::cursor::{InProgressCategory, SelfInfoCursor};
use super::mapping::{self, Mapped};
use super::{auth, Category, PortalContext};
use crate::error::SourceError;
use crate::fhir_r4::smart::is_fhir_id;
use crate::http::{is_under_base, HttpReply};
use crate::instant::{compare_instants, newest};
use crate::source::{
    LinkCredentials, Provenance, PullBatch, PullItem, PullRequest, PulledResource,
};

/// One page of a list endpoint.
#[derive(Debug, Deserialize)]
struct ListPage {
    items: Vec<Value>,
    #[serde(default)]
    next_page_token: Option<String>,
}

/// The `error` of a 401 body: what the portal says is wrong with our token.
#[derive(Debug, Deserialize)]
struct BearerError {
    #[serde(default)]
    error: String,
}

const LINKAGE_EXPIRED: &str = "linkage_expired";

struct CurrentPass {
    category: Category,
    page_token: Option<String>,
    since: Option<String>,
    newest_seen: Option<String>,
    /// Whether `page_token` came from a stored cursor (and may have expired at the portal).
    resumed: bool,
}

enum RunState {
    NotStarted,
    Running,
    Finished,
}

pub(crate) struct PullRun {
    context: Arc<PortalContext>,
    instruction_id: String,
    credentials: LinkCredentials,
    requested_types: Vec<String>,
    cursor: SelfInfoCursor,
    state: RunState,
    passes: VecDeque<Category>,
    current: Option<CurrentPass>,
    refresh_used: bool,
    /// New credentials not yet handed to the gateway in a batch.
    credentials_to_report: Option<LinkCredentials>,
    /// An error held back so that a batch carrying refreshed credentials goes first.
    deferred_error: Option<SourceError>,
}

impl PullRun {
    pub(crate) fn new(
        context: Arc<PortalContext>,
        request: PullRequest,
    ) -> Result<Self, SourceError> {
        let cursor = SelfInfoCursor::parse(request.cursor.as_deref())?;
        if !is_fhir_id(&request.credentials.source_patient_id) {
            return Err(SourceError::Config(
                "linked subject is not usable as a FHIR id".into(),
            ));
        }
        Ok(PullRun {
            context,
            instruction_id: request.instruction_id,
            credentials: request.credentials,
            requested_types: request.resource_types,
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
                    let refused = self.plan();
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
                        let Some(category) = self.passes.pop_front() else {
                            self.state = RunState::Finished;
                            return Ok(None);
                        };
                        self.current = Some(self.begin(category, None, None));
                    }
                    return self.fetch_current_page().await.map(Some);
                }
            }
        }
    }

    /// Decides the passes; returns the requested types none of whose categories the link
    /// grants (never asked for at the portal).
    fn plan(&mut self) -> Vec<String> {
        let wanted = self.context.categories_for(&self.requested_types);
        let granted: Vec<Category> = wanted
            .iter()
            .copied()
            .filter(|category| {
                self.credentials
                    .granted_scopes
                    .iter()
                    .any(|scope| scope == category.scope())
            })
            .collect();
        let mut refused: Vec<String> = Vec::new();
        for category in &wanted {
            let resource_type = category.resource_type();
            let served = granted
                .iter()
                .any(|granted| granted.resource_type() == resource_type);
            if !served && !refused.iter().any(|t| t == resource_type) {
                refused.push(resource_type.to_string());
            }
        }
        self.passes = granted.into_iter().collect();
        // Resume the pass the cursor was in the middle of, if it is still planned.
        if let Some(progress) = self.cursor.in_progress.clone() {
            let position = self
                .passes
                .iter()
                .position(|category| category.scope() == progress.category);
            match position.and_then(|position| self.passes.remove(position)) {
                Some(category) => {
                    let mut pass =
                        self.begin(category, Some(progress.page_token), progress.newest_seen);
                    pass.resumed = true;
                    self.current = Some(pass);
                }
                None => self.cursor.in_progress = None,
            }
        }
        refused
    }

    fn begin(
        &self,
        category: Category,
        page_token: Option<String>,
        newest_seen: Option<String>,
    ) -> CurrentPass {
        CurrentPass {
            category,
            page_token,
            since: self.cursor.since_for(category.scope()),
            newest_seen,
            resumed: false,
        }
    }

    fn page_url(&self, pass: &CurrentPass) -> Result<String, SourceError> {
        let mut url = url::Url::parse(&format!(
            "{}{}",
            self.context.base_url,
            pass.category.endpoint()
        ))
        .map_err(|error| SourceError::Config(format!("list URL: {error}")))?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("page_size", &self.context.config.page_size.to_string());
            if let Some(since) = &pass.since {
                query.append_pair("since", since);
            }
            if let Some(token) = &pass.page_token {
                query.append_pair("page_token", token);
            }
        }
        Ok(url.into())
    }

    async fn fetch_current_page(&mut self) -> Result<PullBatch, SourceError> {
        let Some(pass) = self.current.take() else {
            return Ok(self.batch(Vec::new()));
        };
        let url = self.page_url(&pass)?;
        let reply = self.get_authorized(&url).await?;
        let category = pass.category;
        match reply.status {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN => {
                self.forget_progress_of(category);
                return Ok(self.batch(vec![PullItem::TypeNotGranted {
                    resource_type: category.resource_type().to_string(),
                }]));
            }
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::GONE if pass.resumed => {
                // A stored page token the portal no longer honours: redo the category from
                // its high-water mark (already stored records come again, harmlessly).
                tracing::info!(
                    category = category.scope(),
                    "stored page token refused; restarting"
                );
                self.forget_progress_of(category);
                self.current = Some(self.begin(category, None, None));
                return Ok(self.batch(Vec::new()));
            }
            status => {
                return Err(SourceError::Protocol(format!(
                    "{} answered HTTP {status}",
                    category.endpoint()
                )))
            }
        }
        let page: ListPage = match serde_json::from_slice(&reply.body) {
            Ok(page) => page,
            Err(error) => {
                // One category's unreadable page does not end the pull; its mark does not
                // move, so the page is fetched again at the next pull.
                self.forget_progress_of(category);
                return Ok(self.batch(vec![PullItem::Rejected {
                    resource_type: Some(category.resource_type().to_string()),
                    source_resource_id: None,
                    reason: format!("a {} page could not be read: {error}", category.scope()),
                }]));
            }
        };
        let mut pass = pass;
        let mut items = Vec::with_capacity(page.items.len());
        for record in &page.items {
            let header = mapping::record_header(record).ok();
            let available_at = header.as_ref().and_then(|h| h.available_at.clone());
            if let (Some(since), Some(available)) = (&pass.since, &available_at) {
                // A portal that ignores `since` must not make us store records twice.
                if compare_instants(available, since).is_le() {
                    continue;
                }
            }
            pass.newest_seen =
                newest(pass.newest_seen.as_deref(), available_at.as_deref()).map(str::to_string);
            let mapped = self.map(category, record).await?;
            items.extend(
                mapped
                    .into_iter()
                    .map(|outcome| self.item(category, outcome)),
            );
        }
        match page.next_page_token.filter(|token| !token.is_empty()) {
            Some(token) => {
                if pass.page_token.as_deref() == Some(token.as_str()) {
                    return Err(SourceError::Protocol(format!(
                        "{} repeats the same page token",
                        category.endpoint()
                    )));
                }
                self.cursor.in_progress = Some(InProgressCategory {
                    category: category.scope().to_string(),
                    page_token: token.clone(),
                    newest_seen: pass.newest_seen.clone(),
                });
                pass.page_token = Some(token);
                pass.resumed = false;
                self.current = Some(pass);
            }
            None => self
                .cursor
                .complete_pass(category.scope(), pass.newest_seen),
        }
        Ok(self.batch(items))
    }

    /// Maps one record; 特定健診 fetches its document first.
    async fn map(
        &mut self,
        category: Category,
        record: &Value,
    ) -> Result<Vec<Mapped>, SourceError> {
        let patient_id = self.credentials.source_patient_id.clone();
        if category != Category::SpecificCheckup {
            return Ok(mapping::map_record(category, record, &patient_id));
        }
        let listing = match mapping::checkup_listing(record) {
            Ok(listing) => listing,
            Err(error) => return Ok(vec![Err(error)]),
        };
        let refuse = |reason: String| {
            Ok(vec![Err(mapping::MappingError {
                id: Some(listing.resource_id.clone()),
                reason,
            })])
        };
        // The bearer token goes to the portal only.
        if !is_under_base(&self.context.base_url, &listing.document_url) {
            return refuse("document_url is not on the portal".into());
        }
        let reply = self.get_authorized(&listing.document_url).await?;
        if reply.status != StatusCode::OK {
            // A withdrawn checkup is kept even when its document is gone.
            if listing.header.entered_in_error {
                return Ok(vec![mapping::map_withdrawn_checkup(&listing, &patient_id)]);
            }
            return refuse(format!("document answered HTTP {}", reply.status));
        }
        if reply.body.len() > self.context.config.max_document_bytes {
            return refuse(format!(
                "document larger than the {}-byte limit",
                self.context.config.max_document_bytes
            ));
        }
        Ok(vec![mapping::map_checkup_document(
            &listing,
            &reply.body,
            &patient_id,
        )])
    }

    fn item(&self, category: Category, outcome: Mapped) -> PullItem {
        match outcome {
            Ok(resource) => match serde_json::to_vec(&resource.body) {
                Ok(body) => PullItem::Resource(PulledResource {
                    resource_type: resource.resource_type.to_string(),
                    source_resource_id: resource.id,
                    version_id: Some(resource.version.to_string()),
                    body,
                    provenance: Provenance {
                        source: self.context.config.source_id.clone(),
                        retrieved_at: unix_millis_now(),
                        instruction_id: self.instruction_id.clone(),
                    },
                }),
                Err(error) => PullItem::Rejected {
                    resource_type: Some(resource.resource_type.to_string()),
                    source_resource_id: Some(resource.id),
                    reason: format!("could not serialise: {error}"),
                },
            },
            Err(error) => PullItem::Rejected {
                resource_type: Some(category.resource_type().to_string()),
                source_resource_id: error.id,
                reason: format!("{} record: {}", category.scope(), error.reason),
            },
        }
    }

    fn forget_progress_of(&mut self, category: Category) {
        if self
            .cursor
            .in_progress
            .as_ref()
            .is_some_and(|progress| progress.category == category.scope())
        {
            self.cursor.in_progress = None;
        }
    }

    /// GET with the bearer token. `invalid_token`: refresh once per pull and try again;
    /// `linkage_expired`: stop, the patient has to authorise again.
    async fn get_authorized(&mut self, url: &str) -> Result<HttpReply, SourceError> {
        let reply = self.get(url).await?;
        if reply.status != StatusCode::UNAUTHORIZED {
            return Ok(reply);
        }
        refusal_of_linkage(&reply)?;
        if self.refresh_used {
            return Err(SourceError::Unauthorized(
                "access token refused again after a refresh".into(),
            ));
        }
        self.refresh_used = true;
        let refreshed = auth::refresh(&self.context, &self.credentials).await?;
        self.credentials = refreshed.clone();
        self.credentials_to_report = Some(refreshed);
        let reply = self.get(url).await?;
        if reply.status == StatusCode::UNAUTHORIZED {
            refusal_of_linkage(&reply)?;
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
            .header(ACCEPT, "application/json, application/xml")
            .header(
                AUTHORIZATION,
                format!("Bearer {}", self.credentials.access_token),
            )
            .build()
            .map_err(|error| SourceError::Config(format!("portal request: {error}")))?;
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

/// A 401 that says the linkage period ended.
fn refusal_of_linkage(reply: &HttpReply) -> Result<(), SourceError> {
    let said = serde_json::from_slice::<BearerError>(&reply.body)
        .map(|body| body.error)
        .unwrap_or_default();
    if said == LINKAGE_EXPIRED {
        Err(SourceError::LinkageExpired(
            "the portal says the linkage period is over".into(),
        ))
    } else {
        Ok(())
    }
}

fn unix_millis_now() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}
