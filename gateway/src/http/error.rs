//! The one place errors become HTTP responses: `application/problem+json` (RFC 9457)
//! everywhere, FHIR `OperationOutcome` under `/fhir`. The `render_errors` middleware also
//! converts responses produced outside our handlers (framework rejections, body limits, the
//! fallback) so every error a client sees has the same shape.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::json;

use crate::error::Error;

pub const PROBLEM_JSON: &str = "application/problem+json";
pub const FHIR_JSON: &str = "application/fhir+json";

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::from(Error::from(error))
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let status = match &err {
            Error::Invalid(_) | Error::Config { .. } => StatusCode::BAD_REQUEST,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::KeyMissing(_) => StatusCode::GONE,
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::OAuth(e) => match e.code {
                crate::oauth::OAuthErrorCode::InvalidClient
                | crate::oauth::OAuthErrorCode::InvalidToken => StatusCode::UNAUTHORIZED,
                _ => StatusCode::BAD_REQUEST,
            },
            Error::Database(_) | Error::NativeDatabase(_) | Error::Migration(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Source(e) => match e {
                phr_adapters::SourceError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
                phr_adapters::SourceError::Authorization(_) => StatusCode::BAD_REQUEST,
                phr_adapters::SourceError::Config(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_GATEWAY,
            },
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // A source's own failure is safe and useful to show: it names no internals of ours.
        let detail = if matches!(err, Error::Source(_))
            && status != StatusCode::INTERNAL_SERVER_ERROR
        {
            err.to_string()
        } else if status.is_server_error() {
            // Internal details go to the log, not to the client.
            tracing::error!(error = %err, "request failed");
            match status {
                StatusCode::SERVICE_UNAVAILABLE => "storage is unavailable; try again later".into(),
                _ => "internal error".into(),
            }
        } else {
            err.to_string()
        };
        ApiError {
            status,
            detail,
            retry_after: match err {
                Error::RateLimited { retry_after_secs } => Some(retry_after_secs),
                Error::Database(_) | Error::NativeDatabase(_) => Some(5),
                Error::Source(phr_adapters::SourceError::Unavailable {
                    retry_after: Some(after),
                    ..
                }) => Some(after.as_secs().max(1)),
                _ => None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = problem(self.status, &self.detail);
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

fn problem(status: StatusCode, detail: &str) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, PROBLEM_JSON)],
        body.to_string(),
    )
        .into_response()
}

/// FHIR `OperationOutcome` with the issue code that fits the status.
pub fn operation_outcome(status: StatusCode, detail: &str) -> Response {
    let code = match status {
        StatusCode::NOT_FOUND | StatusCode::GONE => "not-found",
        StatusCode::UNAUTHORIZED => "login",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::PAYLOAD_TOO_LARGE => "too-costly",
        StatusCode::TOO_MANY_REQUESTS => "throttled",
        StatusCode::METHOD_NOT_ALLOWED => "not-supported",
        s if s.is_server_error() => "exception",
        _ => "invalid",
    };
    let severity = if status.is_server_error() {
        "fatal"
    } else {
        "error"
    };
    let body = json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": detail}]
    });
    (
        status,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        body.to_string(),
    )
        .into_response()
}

/// Marks an error response already in its protocol's own shape (OAuth's JSON errors, RFC
/// 6749 §5.2): `render_errors` leaves it as it is.
#[derive(Debug, Clone, Copy)]
pub struct ProtocolError;

/// Largest error body read back when converting it.
const MAX_ERROR_BODY: usize = 16 * 1024;

pub async fn render_errors(request: Request, next: Next) -> Response {
    let fhir = request.uri().path().starts_with("/fhir");
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.extensions().get::<ProtocolError>().is_some()
    {
        return response;
    }
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let wanted = if fhir { FHIR_JSON } else { PROBLEM_JSON };
    // Pages render their own errors for people (e.g. a failed sign-in form).
    if content_type.starts_with(wanted) || content_type.starts_with("text/html") {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = match http_body_util::Limited::new(body, MAX_ERROR_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Default::default(),
    };
    let detail = if content_type.starts_with(PROBLEM_JSON) {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_string))
            .unwrap_or_default()
    } else {
        String::from_utf8_lossy(&bytes).trim().to_string()
    };
    let detail = if detail.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        detail
    };
    let mut converted = if fhir {
        operation_outcome(status, &detail)
    } else {
        problem(status, &detail)
    };
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            converted.headers_mut().insert(name.clone(), value.clone());
        }
    }
    converted
}

/// Catch-all for unknown paths.
pub async fn not_found() -> Response {
    problem(StatusCode::NOT_FOUND, "no such endpoint")
}

/// A panic in a handler becomes a plain 500 (logged), never a dropped connection.
pub fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    tracing::error!("handler panicked");
    problem(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}
