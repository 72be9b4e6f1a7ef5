//! The FHIR API lives under `/fhir`; errors there are `OperationOutcome`s. Its interactions
//! arrive with the FHIR API issue; until then every FHIR path answers with a clear outcome.

use axum::http::StatusCode;
use axum::response::Response;

use super::error::operation_outcome;

pub async fn not_supported() -> Response {
    operation_outcome(
        StatusCode::NOT_FOUND,
        "this FHIR interaction is not supported yet",
    )
}
