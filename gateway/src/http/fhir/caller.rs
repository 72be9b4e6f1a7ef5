//! Who is asking the FHIR API, and which resource types they may see. A recipient's app
//! holds an access token issued under the patient's consent: its scopes bound the types
//! and the consent, as committed now, decides each one. The patient (or their registered
//! representative) uses their own session token and sees the whole record, consents
//! included.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use phr_consent::{Consent, DataCategory, Recipient, Requested};
use time::OffsetDateTime;

use super::super::error::ApiError;
use super::super::oauth::{agent, audit_refusal, bearer_refusal, bearer_token};
use super::super::session::PatientSession;
use super::super::{AppState, ClientAddr};
use crate::audit::{Agent, AuditEvent, EventKind, Outcome};
use crate::consents::{decide_under_consent, ConsentOutcome};
use crate::error::Error;
use crate::oauth::scopes::{Context, Permissions};
use crate::oauth::{tokens, AccessGrant, Scope};

/// Read (`read`, `vread`, `_history`) or search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Read,
    Search,
}

/// Whether a type may be disclosed to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeAccess {
    Allowed,
    /// The token's scopes do not reach the type (or it is not disclosed to recipients).
    OutOfScope,
    /// The patient's consent does not permit it; the reason in the patient's words.
    Denied {
        reason: &'static str,
        message_ja: &'static str,
        message_en: &'static str,
    },
}

pub enum CallerKind {
    Recipient {
        grant: AccessGrant,
        recipient: Recipient,
        consent_id: String,
        /// The consent as committed when the request arrived; `None` when it is gone.
        consent: Option<Box<Consent>>,
    },
    Patient,
}

pub struct FhirCaller {
    pub kind: CallerKind,
    pub agent: Agent,
    /// Whose record the request is about.
    pub patient_id: String,
}

impl FhirCaller {
    /// Whether `resource_type` may be disclosed by `interaction`.
    pub fn access(&self, resource_type: &str, interaction: Interaction) -> TypeAccess {
        match &self.kind {
            CallerKind::Patient => TypeAccess::Allowed,
            CallerKind::Recipient {
                grant,
                recipient,
                consent,
                ..
            } => {
                if DataCategory::of_resource_type(resource_type).is_none() {
                    return TypeAccess::OutOfScope;
                }
                let wanted = Scope::Resource {
                    context: Context::Patient,
                    resource_type: resource_type.to_string(),
                    permissions: Permissions {
                        read: interaction == Interaction::Read,
                        search: interaction == Interaction::Search,
                    },
                };
                if !wanted.covered_by_any(&grant.scopes) {
                    return TypeAccess::OutOfScope;
                }
                match decide_under_consent(
                    consent.as_deref(),
                    &self.patient_id,
                    recipient,
                    Requested::ResourceType(resource_type),
                    OffsetDateTime::now_utc(),
                ) {
                    ConsentOutcome::Permit { .. } => TypeAccess::Allowed,
                    ConsentOutcome::Deny {
                        reason,
                        message_ja,
                        message_en,
                    } => TypeAccess::Denied {
                        reason,
                        message_ja,
                        message_en,
                    },
                }
            }
        }
    }

    /// Refuses a type the caller may not see: 403, and a consent denial is audited.
    pub async fn require(
        &self,
        state: &AppState,
        resource_type: &str,
        interaction: Interaction,
    ) -> Result<(), ApiError> {
        match self.access(resource_type, interaction) {
            TypeAccess::Allowed => Ok(()),
            TypeAccess::OutOfScope => Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                format!("the token's scopes do not allow this on {resource_type}"),
            )),
            TypeAccess::Denied {
                reason,
                message_ja,
                message_en,
            } => {
                if let CallerKind::Recipient {
                    recipient,
                    consent_id,
                    ..
                } = &self.kind
                {
                    state
                        .consents
                        .record_denial(
                            &self.agent,
                            &self.patient_id,
                            format!(
                                "access by {} to {resource_type} under consent {consent_id} denied: {reason}",
                                recipient.id
                            ),
                        )
                        .await?;
                    state.audit.notify();
                }
                Err(ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    format!("{message_ja} / {message_en}"),
                ))
            }
        }
    }

    /// The consent the disclosure rests on, for the audit record.
    pub fn consent_id(&self) -> Option<&str> {
        match &self.kind {
            CallerKind::Recipient { consent_id, .. } => Some(consent_id),
            CallerKind::Patient => None,
        }
    }

    pub fn is_patient(&self) -> bool {
        matches!(self.kind, CallerKind::Patient)
    }

    /// A BALP PatientRead / PatientQuery record of what was disclosed.
    pub fn audit_event(&self, kind: EventKind, resources: Vec<String>, what: &str) -> AuditEvent {
        let mut event = AuditEvent::new(kind, self.agent.clone()).patient(&self.patient_id);
        event.resources = resources;
        match self.consent_id() {
            Some(consent_id) => event
                .consent(consent_id)
                .detail(format!("{what} under consent {consent_id}")),
            None => event.detail(format!("{what} by the patient")),
        }
    }
}

/// A recipient's token, or else the patient's own session; neither is a 401 with the
/// Bearer challenge (audited).
impl FromRequestParts<AppState> for FhirCaller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let address = parts.extensions.get::<ClientAddr>().and_then(|c| c.0);
        let token = bearer_token(&parts.headers).map(str::to_string);
        let oauth_error = match token.as_deref() {
            Some(token) => match tokens::access_grant_and_consent(&state.db, token).await {
                Ok((grant, consent)) => {
                    return recipient_caller(state, grant, consent, address).await
                }
                Err(Error::OAuth(error)) => Some(error),
                Err(other) => return Err(ApiError::from(other).into_response()),
            },
            None => None,
        };
        match PatientSession::from_request_parts(parts, state).await {
            Ok(session) => Ok(FhirCaller {
                kind: CallerKind::Patient,
                agent: session.auth.agent(),
                patient_id: session.patient_id,
            }),
            Err(_) => {
                if let Some(error) = &oauth_error {
                    audit_refusal(state, &agent(address, None), "fhir", error).await;
                }
                Err(bearer_refusal(oauth_error.as_ref()))
            }
        }
    }
}

/// A recipient's caller; `consent` is the stored JSON of the consent its token rests on, as
/// committed now (read with the token).
async fn recipient_caller(
    state: &AppState,
    grant: AccessGrant,
    consent: Option<String>,
    address: Option<std::net::IpAddr>,
) -> Result<FhirCaller, Response> {
    let forbidden = |detail: &str| {
        ApiError::new(axum::http::StatusCode::FORBIDDEN, detail.to_string()).into_response()
    };
    let (Some(patient_id), Some(consent_id)) = (grant.patient_id.clone(), grant.consent_id.clone())
    else {
        return Err(forbidden(
            "this token has no patient in context: system tokens are for Bulk Data export",
        ));
    };
    let consent = consent
        .as_deref()
        .map(crate::consents::consent_of)
        .transpose()
        .map_err(|e| ApiError::from(e).into_response())?
        .map(Box::new);
    let agent = grant.agent(address);
    if consent.is_none() {
        let event = AuditEvent::new(EventKind::ConsentDenied, agent.clone())
            .patient(&patient_id)
            .outcome(Outcome::MinorFailure)
            .detail(format!("consent {consent_id} of the token is gone"));
        let _ = state.audit.record_now(&event).await;
    }
    Ok(FhirCaller {
        kind: CallerKind::Recipient {
            recipient: Recipient::client(&grant.client_id),
            grant,
            consent_id,
            consent,
        },
        agent,
        patient_id,
    })
}
