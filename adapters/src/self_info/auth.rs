//! Authorisation at the portal: the authorise URL (PKCE S256, `state`, categories as
//! scope, linkage), the code exchange and refresh with `private_key_jwt`, and revocation.
//!
//! Token requests are plain form posts rather than an OAuth client library's: the portal's
//! token response carries `subject` and `linkage_expires_at`, which a generic client
//! would drop.

use std::collections::BTreeMap;

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{Category, Linkage, PortalContext};
use crate::error::SourceError;
use crate::fhir_r4::smart::is_fhir_id;
use crate::http::HttpReply;
use crate::oauth::{
    client_assertion, constant_time_eq, pkce_s256_pair, random_url_token,
    CLIENT_ASSERTION_LIFETIME, JWT_BEARER_ASSERTION_TYPE,
};
use crate::source::{
    AuthorizationRequest, AuthorizationStart, Callback, LinkCredentials, PendingAuthorization,
};

/// Keys of `PendingAuthorization.extra` / `LinkCredentials.extra`.
pub const EXTRA_TOKEN_ENDPOINT: &str = "token_endpoint";
pub const EXTRA_LINKAGE: &str = "linkage";
pub const EXTRA_LINKAGE_EXPIRES_AT: &str = "linkage_expires_at";
/// The represented person's handle, for proxy (代理人) links.
pub const EXTRA_ON_BEHALF_OF: &str = "on_behalf_of";

/// The authorise URL's parameter naming the represented person (proxy access).
pub const REPRESENTED_PARAMETER: &str = "represented";
/// `on_behalf_of` for a registered proxy (代理人) who chooses at the portal whom they act
/// for: the portal knows its proxies, the provider does not know the portal's persons.
pub const CHOOSE_AT_PORTAL: &str = "choose";

/// The portal's token response.
#[derive(Debug, Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    linkage_expires_at: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    subject: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OAuthErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

pub(crate) fn start(
    context: &PortalContext,
    request: &AuthorizationRequest,
) -> Result<AuthorizationStart, SourceError> {
    let categories = context.categories_for(&request.resource_types);
    if categories.is_empty() {
        return Err(SourceError::Config(format!(
            "none of {:?} is offered by the enabled categories",
            request.resource_types
        )));
    }
    let redirect = url::Url::parse(&request.redirect_uri)
        .map_err(|error| SourceError::Config(format!("redirect_uri: {error}")))?;
    if !matches!(redirect.scheme(), "https" | "http") {
        return Err(SourceError::Config(
            "redirect_uri must be an http(s) URL".into(),
        ));
    }
    let scopes: Vec<String> = categories
        .iter()
        .map(|category| category.scope().to_string())
        .collect();
    let state = random_url_token();
    let (code_verifier, code_challenge) = pkce_s256_pair();
    let linkage = context.config.linkage;
    let mut authorize_url = url::Url::parse(&format!("{}/authorize", context.base_url))
        .map_err(|error| SourceError::Config(format!("authorise URL: {error}")))?;
    {
        let mut query = authorize_url.query_pairs_mut();
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", &context.config.client_id)
            .append_pair("redirect_uri", &request.redirect_uri)
            .append_pair("state", &state)
            .append_pair("code_challenge", &code_challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("scope", &scopes.join(" "))
            .append_pair("linkage", linkage.as_str());
        if let Some(represented) = &request.on_behalf_of {
            query.append_pair(REPRESENTED_PARAMETER, represented);
        }
    }
    let mut extra = BTreeMap::new();
    extra.insert(EXTRA_TOKEN_ENDPOINT.to_string(), context.token_url());
    extra.insert(EXTRA_LINKAGE.to_string(), linkage.as_str().to_string());
    if let Some(represented) = &request.on_behalf_of {
        extra.insert(EXTRA_ON_BEHALF_OF.to_string(), represented.clone());
    }
    Ok(AuthorizationStart {
        authorize_url: authorize_url.into(),
        pending: PendingAuthorization {
            state,
            code_verifier,
            redirect_uri: request.redirect_uri.clone(),
            requested_scopes: scopes,
            extra,
        },
    })
}

pub(crate) async fn finish(
    context: &PortalContext,
    pending: &PendingAuthorization,
    callback: &Callback,
) -> Result<LinkCredentials, SourceError> {
    let returned_state = callback
        .state
        .as_deref()
        .ok_or_else(|| SourceError::Authorization("callback carries no state".into()))?;
    // The state first, before even an error: a callback that is not ours must not be able
    // to report a refusal either.
    if !constant_time_eq(returned_state, &pending.state) {
        return Err(SourceError::Authorization(
            "state does not match the authorisation we started".into(),
        ));
    }
    if let Some(error) = &callback.error {
        let description = callback.error_description.as_deref().unwrap_or("");
        return Err(SourceError::Authorization(format!(
            "portal answered {error} {description}"
        )));
    }
    let code = callback
        .code
        .as_deref()
        .filter(|code| !code.is_empty())
        .ok_or_else(|| SourceError::Authorization("callback carries no code".into()))?;
    let form = vec![
        ("grant_type", "authorization_code".to_string()),
        ("code", code.to_string()),
        ("code_verifier", pending.code_verifier.clone()),
        ("redirect_uri", pending.redirect_uri.clone()),
    ];
    let reply = post_authenticated(context, "/token", form).await?;
    let response = token_response(&reply, SourceError::Authorization)?;
    // The token endpoint is recorded for the link's record; requests always go to the
    // configured portal, so a tampered record cannot redirect our client assertion.
    let mut extra = BTreeMap::new();
    extra.insert(EXTRA_TOKEN_ENDPOINT.to_string(), context.token_url());
    for key in [EXTRA_LINKAGE, EXTRA_ON_BEHALF_OF] {
        if let Some(value) = pending.extra.get(key) {
            extra.insert(key.to_string(), value.clone());
        }
    }
    credentials_from(response, &pending.requested_scopes, None, extra)
}

/// Uses the refresh token (period linkage only). After the linkage period the portal
/// answers `invalid_grant`: that becomes `LinkageExpired` when the recorded expiry has
/// passed, `Unauthorized` otherwise (revoked at the portal, for example).
pub(crate) async fn refresh(
    context: &PortalContext,
    credentials: &LinkCredentials,
) -> Result<LinkCredentials, SourceError> {
    let Some(refresh_token) = &credentials.refresh_token else {
        return Err(if linkage_has_expired(credentials) {
            SourceError::LinkageExpired("the linkage period is over".into())
        } else {
            SourceError::Unauthorized(
                "access token refused and no refresh token held (one-off linkage)".into(),
            )
        });
    };
    let form = vec![
        ("grant_type", "refresh_token".to_string()),
        ("refresh_token", refresh_token.clone()),
    ];
    let reply = post_authenticated(context, "/token", form).await?;
    let refused = |reason: String| {
        if linkage_has_expired(credentials) {
            SourceError::LinkageExpired(reason)
        } else {
            SourceError::Unauthorized(reason)
        }
    };
    let response = token_response(&reply, refused)?;
    let mut refreshed = credentials_from(
        response,
        &credentials.granted_scopes,
        Some(&credentials.source_patient_id),
        credentials.extra.clone(),
    )?;
    if refreshed.refresh_token.is_none() {
        refreshed.refresh_token = credentials.refresh_token.clone();
    }
    Ok(refreshed)
}

/// Ends the linkage at the portal. A portal that no longer knows the token (400) has
/// ended it already.
pub(crate) async fn revoke(
    context: &PortalContext,
    credentials: &LinkCredentials,
) -> Result<(), SourceError> {
    let (token, hint) = match &credentials.refresh_token {
        Some(refresh) => (refresh.clone(), "refresh_token"),
        None => (credentials.access_token.clone(), "access_token"),
    };
    let form = vec![("token", token), ("token_type_hint", hint.to_string())];
    let reply = post_authenticated(context, "/revoke", form).await?;
    if reply.status.is_success() || reply.status == reqwest::StatusCode::BAD_REQUEST {
        Ok(())
    } else {
        Err(SourceError::Protocol(format!(
            "revocation answered HTTP {}",
            reply.status
        )))
    }
}

/// Whether the credentials' recorded linkage expiry has passed (by our clock).
pub(crate) fn linkage_has_expired(credentials: &LinkCredentials) -> bool {
    credentials
        .extra
        .get(EXTRA_LINKAGE_EXPIRES_AT)
        .and_then(|value| OffsetDateTime::parse(value, &Rfc3339).ok())
        .is_some_and(|expires| expires <= OffsetDateTime::now_utc())
}

/// POSTs a form to `{portal}{path}` with our client id and a fresh client assertion.
async fn post_authenticated(
    context: &PortalContext,
    path: &str,
    fields: Vec<(&'static str, String)>,
) -> Result<HttpReply, SourceError> {
    let config = &context.config;
    // Every assertion names the token URL as audience, whichever endpoint receives it
    // (the portal verifies all of them as its token endpoint would).
    let assertion = client_assertion(
        &config.backend_key,
        &config.client_id,
        &context.token_url(),
        CLIENT_ASSERTION_LIFETIME,
    )?;
    // Built in one expression: the serializer is not `Send` and must not live across the
    // await below.
    let body = {
        let mut body = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in &fields {
            body.append_pair(name, value);
        }
        body.append_pair("client_id", &config.client_id)
            .append_pair("client_assertion_type", JWT_BEARER_ASSERTION_TYPE)
            .append_pair("client_assertion", &assertion);
        body.finish()
    };
    let request = context
        .transport
        .client
        .post(format!("{}{path}", context.base_url))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json")
        .body(body)
        .build()
        .map_err(|error| SourceError::Config(format!("{path} request: {error}")))?;
    context.transport.execute(request).await
}

/// The token response, or the portal's refusal as `refused(reason)` (`invalid_grant`,
/// `invalid_client`) or a protocol error. Token bodies never go into an error.
fn token_response(
    reply: &HttpReply,
    refused: impl Fn(String) -> SourceError,
) -> Result<TokenResponse, SourceError> {
    if !reply.status.is_success() {
        let Ok(error) = serde_json::from_slice::<OAuthErrorBody>(&reply.body) else {
            return Err(SourceError::Protocol(format!(
                "token endpoint answered HTTP {}",
                reply.status
            )));
        };
        let reason = format!(
            "token endpoint refused: {} {}",
            error.error,
            error.error_description.as_deref().unwrap_or("")
        );
        return Err(match error.error.as_str() {
            "invalid_grant" | "invalid_client" | "unauthorized_client" | "invalid_scope" => {
                refused(reason)
            }
            _ => SourceError::Protocol(reason),
        });
    }
    let response: TokenResponse = serde_json::from_slice(&reply.body).map_err(|error| {
        SourceError::Protocol(format!("token response: {}", json_problem(&error)))
    })?;
    if !response.token_type.eq_ignore_ascii_case("bearer") {
        return Err(SourceError::Protocol(format!(
            "token type {:?} is not Bearer",
            response.token_type
        )));
    }
    Ok(response)
}

/// What kind of problem a JSON body has, without echoing any of it (it may hold a token).
fn json_problem(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "missing or mistyped fields",
        serde_json::error::Category::Eof => "truncated",
    }
}

fn credentials_from(
    response: TokenResponse,
    scopes_if_unstated: &[String],
    linked_subject: Option<&str>,
    mut extra: BTreeMap<String, String>,
) -> Result<LinkCredentials, SourceError> {
    let subject = match (response.subject.as_deref(), linked_subject) {
        (Some(subject), Some(linked)) if subject != linked => {
            return Err(SourceError::Protocol(
                "refreshed token names a different person".into(),
            ))
        }
        (Some(subject), _) => subject.to_string(),
        (None, Some(linked)) => linked.to_string(),
        (None, None) => {
            return Err(SourceError::Protocol(
                "token response carries no subject: cannot tell whose record this is".into(),
            ))
        }
    };
    // The subject becomes the id of the Patient every resource refers to.
    if !is_fhir_id(&subject) {
        return Err(SourceError::Protocol(
            "token response subject is not usable as a FHIR id".into(),
        ));
    }
    if let Some(expires) = &response.linkage_expires_at {
        if OffsetDateTime::parse(expires, &Rfc3339).is_err() {
            return Err(SourceError::Protocol(
                "linkage_expires_at is not an RFC 3339 time".into(),
            ));
        }
        extra.insert(EXTRA_LINKAGE_EXPIRES_AT.to_string(), expires.clone());
    }
    let granted_scopes: Vec<String> = match &response.scope {
        Some(scope) => scope
            .split_whitespace()
            .filter(|scope| Category::from_scope(scope).is_some())
            .map(str::to_string)
            .collect(),
        None => scopes_if_unstated.to_vec(),
    };
    // A refresh token is only meaningful for period linkage; keep what the portal says.
    let refresh_token = match extra.get(EXTRA_LINKAGE).and_then(|l| Linkage::parse(l)) {
        Some(Linkage::Once) => None,
        _ => response.refresh_token,
    };
    Ok(LinkCredentials {
        access_token: response.access_token,
        refresh_token,
        expires_at: response
            .expires_in
            .map(|lifetime| OffsetDateTime::now_utc().unix_timestamp() + lifetime.max(0)),
        source_patient_id: subject,
        granted_scopes,
        extra,
    })
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn response(subject: Option<&str>) -> TokenResponse {
        TokenResponse {
            access_token: "a".into(),
            token_type: "Bearer".into(),
            expires_in: Some(60),
            refresh_token: Some("r".into()),
            linkage_expires_at: Some("2030-01-01T00:00:00Z".into()),
            scope: Some("medication unknown.scope immunization".into()),
            subject: subject.map(str::to_string),
        }
    }

    #[test]
    fn credentials_keep_subject_linkage_and_known_scopes() {
        let credentials =
            credentials_from(response(Some("s-1")), &[], None, BTreeMap::new()).expect("ok");
        assert_eq!(credentials.source_patient_id, "s-1");
        assert_eq!(
            credentials.granted_scopes,
            vec!["medication", "immunization"]
        );
        assert_eq!(
            credentials
                .extra
                .get(EXTRA_LINKAGE_EXPIRES_AT)
                .map(String::as_str),
            Some("2030-01-01T00:00:00Z")
        );
        assert!(!linkage_has_expired(&credentials));
        assert!(credentials_from(response(None), &[], None, BTreeMap::new()).is_err());
        assert!(credentials_from(response(Some("x/y")), &[], None, BTreeMap::new()).is_err());
        assert!(
            credentials_from(response(Some("s-2")), &[], Some("s-1"), BTreeMap::new()).is_err()
        );
    }
}
