//! Recipients' notifications over HTTP: an operator registers a client's webhook endpoint;
//! the client acknowledges, with its own token, that it stopped using and deleted the data
//! a withdrawal or expiry notification asked it to.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::session::OperatorSession;
use super::{AppState, ClientAddr};
use crate::oauth::AccessGrant;
use crate::store::millis_to_rfc3339;
use axum::Extension;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpoint {
    /// Where Security Event Tokens are POSTed (`https`, or `http` on loopback for
    /// development).
    pub url: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Acknowledged {
    /// RFC 3339: when the acknowledgement was first recorded.
    pub acknowledged_at: String,
}

/// Registers or replaces a client's webhook endpoint (operator). Audited.
#[utoipa::path(put, path = "/operator/clients/{id}/webhook", tag = "operator",
    params(("id" = String, Path, description = "The client id")),
    request_body = WebhookEndpoint,
    responses((status = 204, description = "Registered"),
        (status = 400, description = "Not an https URL (or loopback http)", content_type = "application/problem+json"),
        (status = 403, description = "Not an operator", content_type = "application/problem+json"),
        (status = 404, description = "No such client", content_type = "application/problem+json")))]
pub async fn register_webhook(
    State(state): State<AppState>,
    operator: OperatorSession,
    Path(client_id): Path<String>,
    Json(endpoint): Json<WebhookEndpoint>,
) -> Result<StatusCode, ApiError> {
    crate::notifications::register_endpoint(
        &state.db,
        &operator.0.agent(),
        &operator.0.session.account.id,
        &client_id,
        &endpoint.url,
    )
    .await?;
    state.audit.notify();
    Ok(StatusCode::NO_CONTENT)
}

/// The recipient confirms it stopped using and deleted the patient's data, as the
/// notification asked. Any access token of the client will do (a patient token may
/// already be revoked: use client credentials).
#[utoipa::path(post, path = "/recipient/notifications/{id}/acknowledge", tag = "oauth",
    params(("id" = String, Path, description = "The notification's `jti`")),
    responses((status = 200, description = "Recorded", body = Acknowledged),
        (status = 401, description = "No valid token", content_type = "application/problem+json"),
        (status = 404, description = "No such notification for this client", content_type = "application/problem+json")))]
pub async fn acknowledge(
    State(state): State<AppState>,
    grant: AccessGrant,
    Extension(ClientAddr(address)): Extension<ClientAddr>,
    Path(id): Path<String>,
) -> Result<Json<Acknowledged>, ApiError> {
    let agent = grant.agent(address);
    let at = crate::notifications::acknowledge(&state.db, &agent, &grant.client_id, &id).await?;
    state.audit.notify();
    Ok(Json(Acknowledged {
        acknowledged_at: millis_to_rfc3339(at),
    }))
}
