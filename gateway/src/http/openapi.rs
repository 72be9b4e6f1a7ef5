//! The OpenAPI document, generated from the handlers' annotations. `phr-gateway openapi`
//! writes it to `openapi/openapi.json`; a test fails when the committed file drifts.

use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "phr-gateway", description = "PHR data-exchange gateway: pulls on the patient's instruction, discloses under consent.", version = "0.1.0"),
    paths(
        super::health::healthz,
        super::health::readyz,
        super::metrics::metrics,
        super::auth::login,
        super::auth::logout,
        super::auth::session,
        super::second_factor::prove_totp,
        super::second_factor::prove_recovery_code,
        super::second_factor::passkey_challenge,
        super::second_factor::prove_passkey,
        super::second_factor::passkey_sign_in_start,
        super::second_factor::passkey_sign_in_finish,
        super::second_factor::step_up_passkey_challenge,
        super::second_factor::factors,
        super::second_factor::begin_totp,
        super::second_factor::confirm_totp,
        super::second_factor::passkey_registration_start,
        super::second_factor::passkey_registration_finish,
        super::second_factor::recovery_codes,
        super::break_glass::start,
        super::break_glass::list,
        super::break_glass::review,
        super::patient::resources,
        super::erasure::erase,
        super::patient_export::export,
        super::patient_import::import,
        super::transfers::start,
        super::transfers::list,
        super::transfers::register_endpoint,
        super::transfers::issue_code,
        super::transfers::register_peer,
        super::transfers::inbox,
        super::access_log::list,
        super::operator::audit_checkpoint,
        super::operator::sessions,
        super::operator::end_session,
        super::operator::supply_chain,
        super::operator::sbom,
        super::pull::sources,
        super::pull::give,
        super::pull::callback,
        super::pull::list,
        super::pull::detail,
        super::pull::withdraw,
        super::pull::jwks,
        super::checkups::upload,
        super::checkups::institution_upload,
        super::uploads::list,
        super::uploads::give,
        super::uploads::withdraw,
        super::consents::list,
        super::consents::detail,
        super::consents::withdraw,
        super::consents::change,
        super::consents::confirm,
        super::representations::register,
        super::representations::list,
        super::oauth::register_client,
        super::oauth::list_clients,
        super::oauth::smart_configuration,
        super::oauth::authorize,
        super::oauth::token,
        super::oauth::revoke,
        super::oauth::introspect,
        super::oauth::grant,
        super::notifications::register_webhook,
        super::notifications::acknowledge,
    ),
    tags(
        (name = "health", description = "Probes"),
        (name = "auth", description = "Sign-in for patients and operators"),
        (name = "patient", description = "The patient's own data"),
        (name = "operator", description = "Operator endpoints (operator session required)"),
        (name = "pull", description = "Pull instructions: fetching from sources on the patient's instruction"),
        (name = "keys", description = "The gateway's public keys"),
        (name = "checkups", description = "特定健診 results uploaded as CDA or exchange ZIP"),
        (name = "consent", description = "Disclosure consents: the patient's, to list, change and withdraw"),
        (name = "oauth", description = "The OAuth 2 authorisation server for PHR apps (SMART App Launch style)"),
    )
)]
pub struct ApiDoc;

/// The document as committed: pretty JSON with a trailing newline.
pub fn document() -> String {
    let mut json = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    json.push('\n');
    json
}
