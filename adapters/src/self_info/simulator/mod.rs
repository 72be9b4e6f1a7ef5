//! A My Number Portal-style self-information API for tests and demos: the authorisation
//! screens (a simulated card reading, then consent), the token and revocation endpoints
//! with `private_key_jwt`, and the paged data endpoints, serving deterministic records for
//! N persons from a seed. Plain HTTP on loopback; all state in memory.
//!
//! Persons: person N (1-based) reads card `card-NNNN` with the PIN from
//! [`SimulatorHandle::person`]. Even-numbered persons are children (they have 乳幼児健診
//! and 学校健診 records, no 特定健診); each odd-numbered adult is the registered proxy
//! (代理人) of the next person.
//!
//! Where the self-information API spec is silent, the simulator chooses:
//! - **Card reading** is a form taking the card number and its 4-digit PIN (standing in for
//!   JPKI signing on a smartphone).
//! - **Categories** are decided by `scope`; the consent screen lists them without
//!   checkboxes and the person consents to all or declines (consent and decline buttons
//!   look the same). Unknown categories, and `checkup.school` unless
//!   `offer_school_checkups`, are refused at `/authorize`.
//! - **Proxy access**: the authorise request may carry `represented=<card number of the
//!   represented person>`; the consent screen then names both persons and the token's
//!   `subject` is the represented person's. A card holder who is not that person's
//!   registered proxy gets an error page.
//! - **Client authentication**: `/token` and `/revoke` both require a `private_key_jwt`
//!   assertion whose `aud` is the token URL (`{base}/token`); `exp` at most five minutes
//!   ahead; each `jti` once.
//! - **Tokens**: access tokens live `access_token_lifetime`; `linkage=period` adds a
//!   refresh token that works until the linkage ends (`linkage_period`, 90 days by default;
//!   not rotated); `linkage=once` gives none. A linkage ends early through
//!   [`SimulatorHandle::expire_linkages`]. After that the data endpoints answer
//!   `401 {"error":"linkage_expired"}` and refresh answers `invalid_grant`.
//! - **Lists**: every item carries `available_at` (RFC 3339, when the record became
//!   available at the portal), the basis of `since` (strictly after) and of the order
//!   (`available_at`, then `id`). `page_size` (default `default_page_size`, at most
//!   `max_page_size`) sets the page length; `next_page_token` is an opaque keyset position.
//!   Only the latest version of a record is listed. 学校健診 records have the 乳幼児健診 shape
//!   without `age_months`.
//! - **Documents**: `document_url` is `{base}/v1/checkups/{id}/document` (same bearer
//!   token, `checkup.specific` scope), answering `application/xml`; once a checkup is
//!   withdrawn its document answers 404 (the list still carries the withdrawn record).
//! - **Errors**: `401 {"error":"invalid_token"}` for unknown or expired tokens, 403
//!   `insufficient_scope` for a category the token does not grant, 429 and 503 with
//!   `Retry-After` in seconds (during a maintenance window: the seconds until it ends).

mod api;
mod auth;
mod data;
pub mod patient_agent;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;

pub use data::PortalPerson;

use crate::self_info::Category;

#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// Where to listen; port 0 picks a free one. Loopback only is the intent.
    pub bind_address: SocketAddr,
    pub seed: u64,
    pub persons: usize,
    /// The one registered client (the gateway) and its public JWK for `private_key_jwt`.
    pub client_id: String,
    pub client_public_jwk: Value,
    pub access_token_lifetime: Duration,
    /// How long `linkage=period` lasts (the portal's 期間連携: 90 days).
    pub linkage_period: Duration,
    pub default_page_size: usize,
    pub max_page_size: usize,
    /// Offer `checkup.school` (the real portal does not today).
    pub offer_school_checkups: bool,
    /// Faults in force from the start (changeable later through the handle).
    pub faults: SimulatorFaults,
}

impl SimulatorConfig {
    /// Defaults for everything but the registered client.
    pub fn new(client_id: impl Into<String>, client_public_jwk: Value) -> Self {
        SimulatorConfig {
            bind_address: SocketAddr::from(([127, 0, 0, 1], 0)),
            seed: 42,
            persons: 4,
            client_id: client_id.into(),
            client_public_jwk,
            access_token_lifetime: Duration::from_secs(3600),
            linkage_period: Duration::from_secs(90 * 24 * 3600),
            default_page_size: 50,
            max_page_size: 500,
            offer_school_checkups: false,
            faults: SimulatorFaults::default(),
        }
    }
}

/// Misbehaviour to inject; set at start or at run time through `SimulatorHandle`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimulatorFaults {
    /// The next N data requests answer `401 invalid_token`, whatever the token.
    pub invalid_token_responses: u32,
    /// Data requests answer 429 with `Retry-After`.
    pub rate_limited: bool,
    /// Everything (token, revoke, data) answers 503 with `Retry-After`.
    pub maintenance: bool,
    /// Scheduled maintenance: 503 while the wall clock is inside one of these windows,
    /// with `Retry-After` = the seconds until it ends.
    pub maintenance_windows: Vec<(OffsetDateTime, OffsetDateTime)>,
    /// The `Retry-After` sent with 429 and unscheduled 503 (whole seconds).
    pub retry_after: Duration,
    /// 特定健診 lists carry an extra entry whose document is not a CDA (an HTML page).
    pub bad_xml_document: bool,
    /// 薬剤情報 lists carry an extra record with a YJ code of the wrong shape.
    pub wrong_drug_code: bool,
    /// 予防接種 lists carry an extra record without `vaccine` and `date`.
    pub item_missing_fields: bool,
}

/// Counters for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimulatorStats {
    pub data_requests: u64,
    pub throttled: u64,
    pub maintenance_refusals: u64,
    pub unauthorized: u64,
    pub tokens_issued: u64,
    pub refused_client_assertions: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) data_requests: AtomicU64,
    pub(crate) throttled: AtomicU64,
    pub(crate) maintenance_refusals: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) tokens_issued: AtomicU64,
    pub(crate) refused_client_assertions: AtomicU64,
}

const REQUEST_LOG_LIMIT: usize = 10_000;

pub(crate) struct SimulatorState {
    pub(crate) config: SimulatorConfig,
    pub(crate) base_url: String,
    store: Mutex<data::Store>,
    auth: Mutex<auth::AuthState>,
    faults: Mutex<SimulatorFaults>,
    counters: Counters,
    request_log: Mutex<Vec<String>>,
}

/// Recovers from a poisoned lock: a panicking handler (a test bug) must not cascade.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SimulatorState {
    pub(crate) fn store(&self) -> MutexGuard<'_, data::Store> {
        lock(&self.store)
    }

    pub(crate) fn auth(&self) -> MutexGuard<'_, auth::AuthState> {
        lock(&self.auth)
    }

    pub(crate) fn faults(&self) -> MutexGuard<'_, SimulatorFaults> {
        lock(&self.faults)
    }

    pub(crate) fn count(&self, counter: fn(&Counters) -> &AtomicU64) {
        counter(&self.counters).fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn log_request(&self, line: String) {
        let mut log = lock(&self.request_log);
        if log.len() >= REQUEST_LOG_LIMIT {
            log.remove(0);
        }
        log.push(line);
    }

    pub(crate) fn offers(&self, category: Category) -> bool {
        category != Category::SchoolCheckup || self.config.offer_school_checkups
    }
}

/// Controls a simulator while it runs. Cheap to clone.
#[derive(Clone)]
pub struct SimulatorHandle {
    state: Arc<SimulatorState>,
}

impl SimulatorHandle {
    /// Builds the state (generating the data) for a simulator served at `base_url`.
    pub fn new(config: SimulatorConfig, base_url: &str) -> Self {
        let store = data::Store::generate(config.seed, config.persons);
        let faults = config.faults.clone();
        SimulatorHandle {
            state: Arc::new(SimulatorState {
                config,
                base_url: base_url.trim_end_matches('/').to_string(),
                store: Mutex::new(store),
                auth: Mutex::new(auth::AuthState::default()),
                faults: Mutex::new(faults),
                counters: Counters::default(),
                request_log: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.state.base_url
    }

    pub fn router(&self) -> axum::Router {
        router(self)
    }

    /// Person number `number` (1-based): card, PIN, subject, name.
    pub fn person(&self, number: usize) -> Option<PortalPerson> {
        self.state.store().person(number).cloned()
    }

    /// `(category, id, version, entered_in_error)` of every record of a person, latest
    /// versions, in list order.
    pub fn records(&self, subject: &str) -> Vec<(Category, String, u64, bool)> {
        let store = self.state.store();
        let mut records: Vec<_> = store
            .records
            .get(subject)
            .map(|records| records.iter().collect())
            .unwrap_or_default();
        records.sort_by_key(|record| record.page_key());
        records
            .into_iter()
            .map(|record| {
                (
                    record.category,
                    record.id.clone(),
                    record.version,
                    record.entered_in_error,
                )
            })
            .collect()
    }

    /// A record as the list endpoint sends it.
    pub fn record_json(&self, subject: &str, id: &str) -> Option<serde_json::Value> {
        let base_url = self.base_url().to_string();
        self.state
            .store()
            .records
            .get(subject)?
            .iter()
            .filter(|record| record.id == id)
            .max_by_key(|record| record.version)
            .map(|record| record.to_json(&base_url))
    }

    /// The hc08 document of a 特定健診 record.
    pub fn checkup_document(&self, subject: &str, id: &str) -> Option<String> {
        self.state
            .store()
            .records
            .get(subject)?
            .iter()
            .find(|record| record.id == id)?
            .document
            .clone()
    }

    /// Adds a dispensing record, available after everything so far; returns its id.
    pub fn add_medication(&self, subject: &str) -> String {
        let seed = self.state.config.seed;
        self.state.store().add_medication(subject, seed)
    }

    /// Publishes a corrected version of a record (same id, version + 1); returns it.
    pub fn correct_record(&self, subject: &str, id: &str) -> Option<u64> {
        self.state.store().correct(subject, id)
    }

    /// Withdraws a record (version + 1, `entered-in-error`); returns the new version.
    pub fn withdraw_record(&self, subject: &str, id: &str) -> Option<u64> {
        self.state.store().withdraw(subject, id)
    }

    /// Ends every linkage now, as if its 90 days had passed.
    pub fn expire_linkages(&self) {
        self.state.auth().expire_linkages();
    }

    /// Makes every access token issued so far expire now (linkages stay).
    pub fn expire_access_tokens(&self) {
        self.state.auth().expire_access_tokens();
    }

    pub fn faults(&self) -> SimulatorFaults {
        self.state.faults().clone()
    }

    pub fn set_faults(&self, faults: SimulatorFaults) {
        *self.state.faults() = faults;
    }

    pub fn update_faults(&self, change: impl FnOnce(&mut SimulatorFaults)) {
        change(&mut self.state.faults());
    }

    pub fn stats(&self) -> SimulatorStats {
        let counters = &self.state.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        SimulatorStats {
            data_requests: load(&counters.data_requests),
            throttled: load(&counters.throttled),
            maintenance_refusals: load(&counters.maintenance_refusals),
            unauthorized: load(&counters.unauthorized),
            tokens_issued: load(&counters.tokens_issued),
            refused_client_assertions: load(&counters.refused_client_assertions),
        }
    }

    /// `METHOD path?query` of recent data requests, oldest first.
    pub fn request_log(&self) -> Vec<String> {
        lock(&self.state.request_log).clone()
    }

    pub fn clear_request_log(&self) {
        lock(&self.state.request_log).clear();
    }
}

/// All simulator routes, sharing the handle's state.
pub fn router(handle: &SimulatorHandle) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/authorize", get(auth::authorize_page))
        .route("/authorize/card", post(auth::read_card))
        .route("/authorize/decision", post(auth::decision))
        .route("/token", post(auth::token))
        .route("/revoke", post(auth::revoke))
        .route("/v1/checkups/{id}/document", get(api::checkup_document))
        .route("/v1/{list}", get(api::list))
        .with_state(Arc::clone(&handle.state))
}

pub struct PortalSimulator;

impl PortalSimulator {
    /// Binds `config.bind_address`, generates the data and serves until `shutdown`.
    pub async fn start(config: SimulatorConfig) -> std::io::Result<RunningSimulator> {
        let listener = tokio::net::TcpListener::bind(config.bind_address).await?;
        let address = listener.local_addr()?;
        let base_url = format!("http://{address}");
        let handle = SimulatorHandle::new(config, &base_url);
        let app = router(&handle);
        let server = crate::simulator_web::BackgroundServer::serve(listener, app, "portal");
        tracing::info!(%base_url, "portal simulator listening");
        Ok(RunningSimulator {
            base_url,
            handle,
            server,
        })
    }
}

/// A simulator serving in the background.
pub struct RunningSimulator {
    pub base_url: String,
    pub handle: SimulatorHandle,
    server: crate::simulator_web::BackgroundServer,
}

impl RunningSimulator {
    /// Stops accepting, lets requests in flight finish (at most 5 s), then returns.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}
