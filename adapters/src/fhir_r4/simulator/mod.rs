//! A hospital FHIR R4 server with a SMART authorisation server, for tests, benchmarks and
//! demos. Plain HTTP on loopback; all state in memory; data deterministic from a seed.
//!
//! Patient logins: patient number N (1-based) logs in as `patient-NNNN` with password
//! `phr-sim-NNNN`, and is FHIR `Patient/ptNNNNNN` (e.g. `patient-0001` / `phr-sim-0001`
//! → `Patient/pt000001`).
//!
//! Endpoints (relative to the base URL): `/.well-known/smart-configuration`, `/metadata`,
//! `/authorize` (login form, then approve/deny), `/token`, `/revoke`, `/{type}?patient=`
//! searches with `_count`, `_lastUpdated` and `next` links, `/{type}/{id}` reads and
//! `/Patient/{id}/$everything` (with `_since`), all enforcing the token's scopes and patient.

mod auth;
mod data;
mod fhir;
mod linking;
pub mod patient_agent;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use serde_json::Value;

pub use data::{PatientLogin, HOT9_OID, HOT9_URL, JLAC10_OID, JLAC10_URL, YJ_OID};

/// A backend (system) client allowed to use `client_credentials` with `private_key_jwt`.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendClientRegistration {
    pub client_id: String,
    /// Its public JWK (ES384 P-384 or RS384 RSA), e.g. `BackendKey::public_jwk()`.
    pub public_jwk: Value,
}

#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// Where to listen; port 0 picks a free one. Loopback only is the intent.
    pub bind_address: SocketAddr,
    pub seed: u64,
    pub patients: usize,
    /// Resources per patient, the Patient resource included.
    pub resources_per_patient: usize,
    /// The client id of the (public) patient-facing app.
    pub client_id: String,
    /// Offer and serve `Patient/{id}/$everything`.
    pub offer_everything: bool,
    /// PKCE methods advertised and accepted. `["plain"]` makes a server the gateway must
    /// refuse.
    pub pkce_methods: Vec<String>,
    pub access_token_lifetime: Duration,
    /// `_count` when a search gives none, and the most a search may ask for.
    pub default_page_size: usize,
    pub max_page_size: usize,
    pub backend_client: Option<BackendClientRegistration>,
    /// Faults in force from the start (changeable later through the handle).
    pub faults: SimulatorFaults,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            bind_address: SocketAddr::from(([127, 0, 0, 1], 0)),
            seed: 42,
            patients: 3,
            resources_per_patient: 50,
            client_id: "phr-gateway".into(),
            offer_everything: true,
            pkce_methods: vec!["S256".into()],
            access_token_lifetime: Duration::from_secs(3600),
            default_page_size: 50,
            max_page_size: 1000,
            backend_client: None,
            faults: SimulatorFaults::default(),
        }
    }
}

/// Misbehaviour to inject; set at start or at run time through `SimulatorHandle`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimulatorFaults {
    /// Every Nth FHIR request (reads, searches, `/metadata`) gets 429 with `Retry-After`.
    pub throttle_every_nth: Option<u64>,
    /// The `Retry-After` sent with 429 and 503 (whole seconds).
    pub retry_after: Duration,
    /// Send `Retry-After` as an HTTP date instead of seconds.
    pub retry_after_as_http_date: bool,
    /// Maintenance: every FHIR request and the token endpoint answer 503.
    pub maintenance: bool,
    /// Delay before every FHIR response (to provoke client timeouts).
    pub response_delay: Option<Duration>,
    /// Structurally malformed entries added to every search page.
    pub malformed_entries_per_page: usize,
    /// Resources of another patient mixed into every search page.
    pub wrong_patient_entries_per_page: usize,
    /// Every access token is refused with 401 (refresh works; the new token is refused too).
    pub reject_all_access_tokens: bool,
    /// Token responses leave out `patient`.
    pub omit_patient_in_token_response: bool,
    /// Types answered with 403 whatever the scopes say.
    pub forbidden_types: Vec<String>,
    /// Types whose searches answer 200 with an HTML error page instead of a Bundle (a
    /// misconfigured proxy in front of the server).
    pub broken_types: Vec<String>,
    /// Types whose searches answer 200 `application/fhir+json` with bytes that are not
    /// UTF-8 (a server that sends Shift_JIS).
    pub non_utf8_types: Vec<String>,
    /// `Patient/$everything` answers 200 with an HTML error page.
    pub broken_everything: bool,
}

/// Counters for assertions and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimulatorStats {
    pub fhir_requests: u64,
    pub throttled: u64,
    pub maintenance_refusals: u64,
    pub unauthorized: u64,
    pub forbidden: u64,
    pub tokens_issued: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) fhir_requests: AtomicU64,
    pub(crate) throttled: AtomicU64,
    pub(crate) maintenance_refusals: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) forbidden: AtomicU64,
    pub(crate) tokens_issued: AtomicU64,
}

/// Requests kept in the log for assertions; older ones are dropped.
const REQUEST_LOG_LIMIT: usize = 10_000;

pub(crate) struct SimulatorState {
    pub(crate) config: SimulatorConfig,
    /// Base URL without a trailing slash; the `aud` tokens are minted for.
    pub(crate) base_url: String,
    pub(crate) store: RwLock<data::Store>,
    pub(crate) auth: Mutex<auth::AuthState>,
    pub(crate) linking: Mutex<linking::LinkingState>,
    faults: Mutex<SimulatorFaults>,
    counters: Counters,
    request_log: Mutex<Vec<String>>,
}

/// Recovers from a poisoned lock: the simulator's state stays usable after a panicking
/// handler (a test bug) instead of cascading.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SimulatorState {
    pub(crate) fn store(&self) -> RwLockReadGuard<'_, data::Store> {
        self.store
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn store_mut(&self) -> RwLockWriteGuard<'_, data::Store> {
        self.store
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn auth(&self) -> MutexGuard<'_, auth::AuthState> {
        lock(&self.auth)
    }

    pub(crate) fn faults(&self) -> SimulatorFaults {
        lock(&self.faults).clone()
    }

    pub(crate) fn count(&self, counter: fn(&Counters) -> &AtomicU64) -> u64 {
        counter(&self.counters).fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn log_request(&self, line: String) {
        let mut log = lock(&self.request_log);
        if log.len() >= REQUEST_LOG_LIMIT {
            log.remove(0);
        }
        log.push(line);
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
        let store =
            data::Store::generate(config.seed, config.patients, config.resources_per_patient);
        let faults = config.faults.clone();
        SimulatorHandle {
            state: Arc::new(SimulatorState {
                config,
                base_url: base_url.trim_end_matches('/').to_string(),
                store: RwLock::new(store),
                auth: Mutex::new(auth::AuthState::default()),
                linking: Mutex::new(linking::LinkingState::default()),
                faults: Mutex::new(faults),
                counters: Counters::default(),
                request_log: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.state.base_url
    }

    /// The axum router serving this simulator (mount it at the base URL's path).
    pub fn router(&self) -> axum::Router {
        router(self)
    }

    /// Login and FHIR id of patient number `number` (1-based).
    pub fn patient(&self, number: usize) -> Option<PatientLogin> {
        let store = self.state.store();
        let patient_id = store.by_username.get(&format!("patient-{number:04}"))?;
        store.patients.get(patient_id)?.login.clone()
    }

    /// `(resourceType, id)` of every resource of the patient.
    pub fn resource_keys(&self, patient_id: &str) -> Vec<(String, String)> {
        self.state
            .store()
            .patients
            .get(patient_id)
            .map(|records| {
                records
                    .all
                    .iter()
                    .map(|resource| (resource.resource_type.clone(), resource.id.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The JSON the simulator serves for a resource.
    pub fn resource_json(&self, resource_type: &str, id: &str) -> Option<String> {
        self.state
            .store()
            .by_key
            .get(&(resource_type.to_string(), id.to_string()))
            .map(|resource| resource.json.clone())
    }

    /// Adds new lab Observations, newer than everything stored; returns their ids.
    pub fn add_observations(&self, patient_id: &str, count: usize) -> Vec<String> {
        self.state.store_mut().add_observations(patient_id, count)
    }

    /// Adds one resource of the patient (for example a MedicationDispense the portal also
    /// reports); returns the id it is served under.
    pub fn add_resource(&self, patient_id: &str, resource: serde_json::Value) -> Option<String> {
        self.state.store_mut().add_resource(patient_id, resource)
    }

    pub fn faults(&self) -> SimulatorFaults {
        self.state.faults()
    }

    pub fn set_faults(&self, faults: SimulatorFaults) {
        *lock(&self.state.faults) = faults;
    }

    pub fn update_faults(&self, change: impl FnOnce(&mut SimulatorFaults)) {
        change(&mut lock(&self.state.faults));
    }

    /// A one-time linking code for `patient_id`, as the hospital's counter would print it
    /// for a patient who asks it to release their records to the gateway.
    pub fn issue_linking_code(&self, patient_id: &str) -> String {
        lock(&self.state.linking).issue(patient_id)
    }

    /// `(instruction id, patient id)` of every instruction the gateway linked and has not
    /// withdrawn.
    pub fn linked_instructions(&self) -> Vec<(String, String)> {
        lock(&self.state.linking).linked()
    }

    /// Makes every access token issued so far expire now (refresh tokens stay valid).
    pub fn expire_access_tokens(&self) {
        self.state.auth().expire_access_tokens();
    }

    pub fn stats(&self) -> SimulatorStats {
        let counters = &self.state.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        SimulatorStats {
            fhir_requests: load(&counters.fhir_requests),
            throttled: load(&counters.throttled),
            maintenance_refusals: load(&counters.maintenance_refusals),
            unauthorized: load(&counters.unauthorized),
            forbidden: load(&counters.forbidden),
            tokens_issued: load(&counters.tokens_issued),
        }
    }

    /// `METHOD path?query` of recent FHIR requests, oldest first.
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
        .route(
            "/.well-known/smart-configuration",
            get(auth::smart_configuration),
        )
        .route("/authorize", get(auth::authorize_page))
        .route("/authorize/login", post(auth::login))
        .route("/authorize/decision", post(auth::decision))
        .route("/token", post(auth::token))
        .route("/revoke", post(auth::revoke))
        .route("/metadata", get(fhir::metadata))
        .route("/{resource_type}", get(fhir::search))
        .route(
            "/{resource_type}/{id}",
            get(fhir::read).post(linking::operation),
        )
        .route("/{resource_type}/{id}/{operation}", get(fhir::operation))
        .with_state(Arc::clone(&handle.state))
}

pub struct HospitalSimulator;

impl HospitalSimulator {
    /// Binds `config.bind_address`, generates the data and serves until `shutdown`.
    pub async fn start(config: SimulatorConfig) -> std::io::Result<RunningSimulator> {
        let listener = tokio::net::TcpListener::bind(config.bind_address).await?;
        let address = listener.local_addr()?;
        let base_url = format!("http://{address}");
        let handle = SimulatorHandle::new(config, &base_url);
        let app = router(&handle);
        let server = crate::simulator_web::BackgroundServer::serve(listener, app, "hospital");
        tracing::info!(%base_url, "hospital simulator listening");
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

/// Maps of the simulator's internal tables, for `auth` and `fhir`.
pub(crate) type Table<V> = HashMap<String, V>;
