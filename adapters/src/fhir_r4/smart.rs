//! SMART App Launch 2: discovery, the standalone patient launch (PKCE S256 only), token
//! refresh and revocation; SMART Backend Services client assertions (`private_key_jwt`).

use std::collections::BTreeMap;
use std::sync::Arc;

use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, CsrfToken, EndpointNotSet, EndpointSet,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::http::{require_secure_scheme, OAuthHttp, Transport};
use super::{FhirR4Config, SourceContext};
use crate::error::SourceError;
use crate::oauth::constant_time_eq;
pub use crate::oauth::{
    client_assertion, BackendKey, CLIENT_ASSERTION_LIFETIME, JWT_BEARER_ASSERTION_TYPE,
};
use crate::source::{
    AuthorizationRequest, AuthorizationStart, Callback, LinkCredentials, PendingAuthorization,
};

/// Scopes every standalone patient launch asks for, before the per-type ones.
pub const LAUNCH_BASE_SCOPES: &[&str] = &["launch/patient", "openid", "fhirUser", "offline_access"];

/// Keys of `PendingAuthorization.extra` / `LinkCredentials.extra`.
pub const EXTRA_TOKEN_ENDPOINT: &str = "token_endpoint";
pub const EXTRA_REVOCATION_ENDPOINT: &str = "revocation_endpoint";
pub const EXTRA_INSTRUCTION_ID: &str = "instruction_id";

/// `.well-known/smart-configuration`, the fields we use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmartConfiguration {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    #[serde(default)]
    pub code_challenge_methods_supported: Vec<String>,
    #[serde(default)]
    pub scopes_supported: Vec<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub grant_types_supported: Vec<String>,
    #[serde(default)]
    pub token_endpoint_auth_methods_supported: Vec<String>,
}

/// Extra token response fields SMART adds to OAuth 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmartTokenFields {
    /// The patient in context: the id of the linked patient at this source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

impl oauth2::ExtraTokenFields for SmartTokenFields {}

type SmartTokenResponse = StandardTokenResponse<SmartTokenFields, BasicTokenType>;

type SmartOAuthClient<HasAuthUrl, HasTokenUrl> = oauth2::Client<
    BasicErrorResponse,
    SmartTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    HasAuthUrl,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    HasTokenUrl,
>;

type TokenError = RequestTokenError<SourceError, BasicErrorResponse>;

/// Fetches and checks `{base}/.well-known/smart-configuration`.
pub(crate) async fn discover(context: &SourceContext) -> Result<SmartConfiguration, SourceError> {
    let url = format!("{}/.well-known/smart-configuration", context.base_url);
    let request = context
        .transport
        .client
        .get(&url)
        .header(reqwest::header::ACCEPT, "application/json")
        .build()
        .map_err(|error| SourceError::Config(format!("discovery request: {error}")))?;
    let reply = context.transport.execute(request).await?;
    if !reply.status.is_success() {
        return Err(SourceError::Protocol(format!(
            "SMART discovery answered HTTP {}",
            reply.status
        )));
    }
    let configuration: SmartConfiguration = serde_json::from_slice(&reply.body)
        .map_err(|error| SourceError::Protocol(format!("SMART discovery document: {error}")))?;
    for endpoint in [
        Some(&configuration.authorization_endpoint),
        Some(&configuration.token_endpoint),
        configuration.revocation_endpoint.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        endpoint_url(endpoint)?;
    }
    Ok(configuration)
}

/// Parses an endpoint from discovery and refuses insecure ones.
pub(crate) fn endpoint_url(raw: &str) -> Result<url::Url, SourceError> {
    let url = url::Url::parse(raw)
        .map_err(|error| SourceError::Protocol(format!("endpoint {raw:?}: {error}")))?;
    require_secure_scheme(&url).map_err(|error| SourceError::Protocol(error.to_string()))?;
    Ok(url)
}

/// PKCE with `plain` protects nothing against a leaked code: S256 or no link at all.
pub fn require_s256(configuration: &SmartConfiguration) -> Result<(), SourceError> {
    if configuration
        .code_challenge_methods_supported
        .iter()
        .any(|method| method == "S256")
    {
        Ok(())
    } else {
        Err(SourceError::Unsupported(format!(
            "authorisation server offers PKCE methods {:?}, not S256",
            configuration.code_challenge_methods_supported
        )))
    }
}

/// FHIR resource type names are ASCII letters starting with a capital.
pub(crate) fn is_resource_type_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|first| first.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_alphabetic())
        && name.len() <= 64
}

/// FHIR ids: 1–64 of `[A-Za-z0-9-.]`. Checked before an id goes into a URL path.
pub(crate) fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The scopes of a standalone patient launch for these resource types (SMART v2 `.rs`).
pub fn launch_scopes(resource_types: &[String]) -> Result<Vec<String>, SourceError> {
    let mut scopes: Vec<String> = LAUNCH_BASE_SCOPES.iter().map(|s| s.to_string()).collect();
    for scope in read_scopes("patient", resource_types)? {
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    Ok(scopes)
}

/// `<context>/<Type>.rs` for each resource type, once each; refuses non-type names.
pub(crate) fn read_scopes(
    context: &str,
    resource_types: &[String],
) -> Result<Vec<String>, SourceError> {
    let mut scopes = Vec::new();
    for resource_type in resource_types {
        if !is_resource_type_name(resource_type) {
            return Err(SourceError::Config(format!(
                "{resource_type:?} is not a FHIR resource type"
            )));
        }
        let scope = format!("{context}/{resource_type}.rs");
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    Ok(scopes)
}

/// Whether one granted scope lets us read/search `resource_type` in the patient context.
/// Understands SMART v1 (`patient/Observation.read`, `.*`) and v2 (`.rs`, `.r`, `.cruds`,
/// with or without `?param=value` restrictions, which the server enforces).
pub fn scope_grants_read(scope: &str, resource_type: &str) -> bool {
    scope_grants_read_in(scope, resource_type, ScopeContext::Patient)
}

/// Whose scopes a link holds: a patient's (standalone launch) or the gateway's own system
/// scopes (Backend Services, on the patient's instruction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeContext {
    Patient,
    System,
}

/// `scope_grants_read` for either kind of link.
pub fn scope_grants_read_in(scope: &str, resource_type: &str, wanted: ScopeContext) -> bool {
    let scope = scope.split('?').next().unwrap_or_default();
    let Some((context, rest)) = scope.split_once('/') else {
        return false;
    };
    let context_fits = match wanted {
        ScopeContext::Patient => context == "patient" || context == "user",
        ScopeContext::System => context == "system",
    };
    if !context_fits {
        return false;
    }
    let Some((scoped_type, permissions)) = rest.split_once('.') else {
        return false;
    };
    if scoped_type != "*" && scoped_type != resource_type {
        return false;
    }
    match permissions {
        "read" | "*" => true,
        v2 => {
            !v2.is_empty()
                && v2.chars().all(|c| "cruds".contains(c))
                && (v2.contains('r') || v2.contains('s'))
        }
    }
}

/// Splits `requested` into the types the scopes grant and those they do not.
pub fn split_by_grant(requested: &[String], scopes: &[String]) -> (Vec<String>, Vec<String>) {
    split_by_grant_in(requested, scopes, ScopeContext::Patient)
}

/// `split_by_grant` for either kind of link.
pub fn split_by_grant_in(
    requested: &[String],
    scopes: &[String],
    context: ScopeContext,
) -> (Vec<String>, Vec<String>) {
    let mut granted = Vec::new();
    let mut refused = Vec::new();
    for resource_type in requested {
        if granted.contains(resource_type) || refused.contains(resource_type) {
            continue;
        }
        if scopes
            .iter()
            .any(|scope| scope_grants_read_in(scope, resource_type, context))
        {
            granted.push(resource_type.clone());
        } else {
            refused.push(resource_type.clone());
        }
    }
    (granted, refused)
}

pub(crate) fn start_standalone_launch(
    context: &SourceContext,
    configuration: &SmartConfiguration,
    request: &AuthorizationRequest,
) -> Result<AuthorizationStart, SourceError> {
    if request.on_behalf_of.is_some() {
        // A SMART launch links whoever logs in; acting for someone else is the
        // hospital portal's own business, not something we can ask for.
        return Err(SourceError::Unsupported(
            "proxy access is not part of a SMART standalone launch".into(),
        ));
    }
    require_s256(configuration)?;
    let authorization_endpoint = endpoint_url(&configuration.authorization_endpoint)?;
    endpoint_url(&configuration.token_endpoint)?;
    let scopes = launch_scopes(&request.resource_types)?;
    let redirect_url = RedirectUrl::new(request.redirect_uri.clone())
        .map_err(|error| SourceError::Config(format!("redirect_uri: {error}")))?;
    let client: SmartOAuthClient<EndpointSet, EndpointNotSet> =
        oauth2::Client::new(ClientId::new(context.config.client_id.clone()))
            .set_auth_uri(AuthUrl::from_url(authorization_endpoint))
            .set_redirect_uri(redirect_url);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (authorize_url, state) = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes.iter().cloned().map(Scope::new))
        // SMART requires `aud`: the server must refuse to mint a token for another FHIR
        // server than the one we will present it to.
        .add_extra_param("aud", context.base_url.clone())
        .set_pkce_challenge(challenge)
        .url();
    let mut extra = BTreeMap::new();
    extra.insert(
        EXTRA_TOKEN_ENDPOINT.to_string(),
        configuration.token_endpoint.clone(),
    );
    if let Some(revocation) = &configuration.revocation_endpoint {
        extra.insert(EXTRA_REVOCATION_ENDPOINT.to_string(), revocation.clone());
    }
    extra.insert(
        EXTRA_INSTRUCTION_ID.to_string(),
        request.instruction_id.clone(),
    );
    Ok(AuthorizationStart {
        authorize_url: authorize_url.to_string(),
        pending: PendingAuthorization {
            state: state.secret().clone(),
            code_verifier: verifier.secret().clone(),
            redirect_uri: request.redirect_uri.clone(),
            requested_scopes: scopes,
            extra,
        },
    })
}

pub(crate) fn token_endpoint_of(extra: &BTreeMap<String, String>) -> Result<TokenUrl, SourceError> {
    let raw = extra
        .get(EXTRA_TOKEN_ENDPOINT)
        .ok_or_else(|| SourceError::Config("no token endpoint recorded for this link".into()))?;
    Ok(TokenUrl::from_url(endpoint_url(raw)?))
}

fn token_client(
    context: &SourceContext,
    token_url: TokenUrl,
) -> SmartOAuthClient<EndpointNotSet, EndpointSet> {
    oauth2::Client::new(ClientId::new(context.config.client_id.clone()))
        .set_token_uri(token_url)
        // Public client: client_id goes in the body, there is no secret for Basic auth.
        .set_auth_type(AuthType::RequestBody)
}

pub(crate) async fn finish_standalone_launch(
    context: &SourceContext,
    pending: &PendingAuthorization,
    callback: &Callback,
) -> Result<LinkCredentials, SourceError> {
    let returned_state = callback
        .state
        .as_deref()
        .ok_or_else(|| SourceError::Authorization("callback carries no state".into()))?;
    // Check the state before anything else the callback says, error included: a callback
    // that is not ours must not even be able to report a refusal.
    if !constant_time_eq(returned_state, &pending.state) {
        return Err(SourceError::Authorization(
            "state does not match the authorisation we started".into(),
        ));
    }
    if let Some(error) = &callback.error {
        let description = callback.error_description.as_deref().unwrap_or("");
        return Err(SourceError::Authorization(format!(
            "source answered {error} {description}"
        )));
    }
    let code = callback
        .code
        .as_deref()
        .filter(|code| !code.is_empty())
        .ok_or_else(|| SourceError::Authorization("callback carries no code".into()))?;
    let token_url = token_endpoint_of(&pending.extra)?;
    let redirect_url = RedirectUrl::new(pending.redirect_uri.clone())
        .map_err(|error| SourceError::Config(format!("redirect_uri: {error}")))?;
    let client = token_client(context, token_url).set_redirect_uri(redirect_url);
    let http = OAuthHttp(&context.transport);
    let response = client
        .exchange_code(AuthorizationCode::new(code.to_string()))
        .set_pkce_verifier(PkceCodeVerifier::new(pending.code_verifier.clone()))
        .request_async(&http)
        .await
        .map_err(|error| token_error(error, SourceError::Authorization))?;
    let mut extra = pending.extra.clone();
    extra.remove(EXTRA_INSTRUCTION_ID);
    credentials_from_token_response(&response, &pending.requested_scopes, None, extra)
}

/// Uses the refresh token; the new credentials keep the old refresh token if the server
/// does not rotate it.
pub(crate) async fn refresh(
    context: &SourceContext,
    credentials: &LinkCredentials,
) -> Result<LinkCredentials, SourceError> {
    let refresh_token = credentials.refresh_token.as_ref().ok_or_else(|| {
        SourceError::Unauthorized("access token refused and no refresh token held".into())
    })?;
    let token_url = token_endpoint_of(&credentials.extra)?;
    let client = token_client(context, token_url);
    let http = OAuthHttp(&context.transport);
    let response = client
        .exchange_refresh_token(&RefreshToken::new(refresh_token.clone()))
        .request_async(&http)
        .await
        .map_err(|error| token_error(error, SourceError::Unauthorized))?;
    let mut refreshed = credentials_from_token_response(
        &response,
        &credentials.granted_scopes,
        Some(&credentials.source_patient_id),
        credentials.extra.clone(),
    )?;
    if refreshed.refresh_token.is_none() {
        refreshed.refresh_token = credentials.refresh_token.clone();
    }
    Ok(refreshed)
}

fn credentials_from_token_response(
    response: &SmartTokenResponse,
    scopes_if_unstated: &[String],
    linked_patient: Option<&str>,
    extra: BTreeMap<String, String>,
) -> Result<LinkCredentials, SourceError> {
    let patient = match (response.extra_fields().patient.as_deref(), linked_patient) {
        (Some(patient), Some(linked)) if patient != linked => {
            return Err(SourceError::Protocol(
                "refreshed token names a different patient".into(),
            ))
        }
        (Some(patient), _) => patient.to_string(),
        // A refresh response may omit the context; the link keeps its patient.
        (None, Some(linked)) => linked.to_string(),
        (None, None) => {
            return Err(SourceError::Protocol(
                "token response carries no patient: cannot tell whose record this is".into(),
            ))
        }
    };
    if !is_fhir_id(&patient) {
        return Err(SourceError::Protocol(
            "token response patient is not a FHIR id".into(),
        ));
    }
    let granted_scopes = match response.scopes() {
        Some(scopes) => scopes.iter().map(|scope| scope.to_string()).collect(),
        None => scopes_if_unstated.to_vec(),
    };
    let expires_at = response
        .expires_in()
        .map(|lifetime| OffsetDateTime::now_utc().unix_timestamp() + lifetime.as_secs() as i64);
    Ok(LinkCredentials {
        access_token: response.access_token().secret().clone(),
        refresh_token: response.refresh_token().map(|token| token.secret().clone()),
        expires_at,
        source_patient_id: patient,
        granted_scopes,
        extra,
    })
}

/// `refused` is the variant for a refusal of the grant: `Authorization` at link time,
/// `Unauthorized` at refresh. No token response body ever goes into an error.
fn token_error(error: TokenError, refused: fn(String) -> SourceError) -> SourceError {
    match error {
        RequestTokenError::ServerResponse(response) => {
            let description = format!(
                "token endpoint refused: {} {}",
                response.error(),
                response.error_description().map_or("", String::as_str)
            );
            match response.error() {
                BasicErrorResponseType::InvalidGrant
                | BasicErrorResponseType::InvalidClient
                | BasicErrorResponseType::UnauthorizedClient
                | BasicErrorResponseType::InvalidScope => refused(description),
                _ => SourceError::Protocol(description),
            }
        }
        RequestTokenError::Request(error) => error,
        RequestTokenError::Parse(error, _body) => {
            SourceError::Protocol(format!("token response: {}", error.path()))
        }
        RequestTokenError::Other(message) => {
            SourceError::Protocol(format!("token endpoint: {message}"))
        }
    }
}

/// RFC 7009 revocation when the server offers it; otherwise the gateway just forgets.
pub(crate) async fn revoke(
    context: &SourceContext,
    credentials: &LinkCredentials,
) -> Result<(), SourceError> {
    let Some(endpoint) = credentials.extra.get(EXTRA_REVOCATION_ENDPOINT) else {
        return Ok(());
    };
    let endpoint = endpoint_url(endpoint)?;
    let (token, hint) = match &credentials.refresh_token {
        Some(refresh) => (refresh.as_str(), "refresh_token"),
        None => (credentials.access_token.as_str(), "access_token"),
    };
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("token", token)
        .append_pair("token_type_hint", hint)
        .append_pair("client_id", &context.config.client_id)
        .finish();
    let request = context
        .transport
        .client
        .post(endpoint)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .build()
        .map_err(|error| SourceError::Config(format!("revocation request: {error}")))?;
    let reply = context.transport.execute(request).await?;
    // 400 means the token is unknown or already invalid: the goal is reached either way.
    if reply.status.is_success() || reply.status == reqwest::StatusCode::BAD_REQUEST {
        Ok(())
    } else {
        Err(SourceError::Protocol(format!(
            "revocation answered HTTP {}",
            reply.status
        )))
    }
}

/// A system-level access token from SMART Backend Services. Holds a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendToken {
    pub access_token: String,
    /// Unix seconds, if the server said.
    pub expires_at: Option<i64>,
    pub granted_scopes: Vec<String>,
}

impl std::fmt::Debug for BackendToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendToken")
            .field("expires_at", &self.expires_at)
            .field("granted_scopes", &self.granted_scopes)
            .finish_non_exhaustive()
    }
}

/// SMART Backend Services: `client_credentials` authenticated with `private_key_jwt`.
pub struct BackendServicesClient {
    context: Arc<SourceContext>,
    key: BackendKey,
}

impl BackendServicesClient {
    /// `config.client_id` is the backend client id registered with the hospital.
    pub fn new(config: FhirR4Config, key: BackendKey) -> Result<Self, SourceError> {
        let source = super::FhirR4Source::new(config)?;
        Ok(BackendServicesClient {
            context: source.context,
            key,
        })
    }

    /// Discovers the token endpoint and asks for `scopes` (e.g. `system/Patient.rs`).
    pub async fn request_token(&self, scopes: &[String]) -> Result<BackendToken, SourceError> {
        request_system_token(&self.context, &self.key, scopes).await
    }
}

/// `client_credentials` authenticated with `private_key_jwt`, at the discovered token
/// endpoint.
pub(crate) async fn request_system_token(
    context: &SourceContext,
    key: &BackendKey,
    scopes: &[String],
) -> Result<BackendToken, SourceError> {
    let configuration = discover(context).await?;
    require_private_key_jwt(&configuration)?;
    let token_url = endpoint_url(&configuration.token_endpoint)?;
    let assertion = client_assertion(
        key,
        &context.config.client_id,
        token_url.as_str(),
        CLIENT_ASSERTION_LIFETIME,
    )?;
    let client = token_client(context, TokenUrl::from_url(token_url));
    let transport: &Transport = &context.transport;
    let http = OAuthHttp(transport);
    let response = client
        .exchange_client_credentials()
        .add_scopes(scopes.iter().cloned().map(Scope::new))
        .add_extra_param("client_assertion_type", JWT_BEARER_ASSERTION_TYPE)
        .add_extra_param("client_assertion", assertion)
        .request_async(&http)
        .await
        .map_err(|error| token_error(error, SourceError::Unauthorized))?;
    Ok(BackendToken {
        access_token: response.access_token().secret().clone(),
        expires_at: response
            .expires_in()
            .map(|lifetime| OffsetDateTime::now_utc().unix_timestamp() + lifetime.as_secs() as i64),
        granted_scopes: match response.scopes() {
            Some(granted) => granted.iter().map(|scope| scope.to_string()).collect(),
            None => scopes.to_vec(),
        },
    })
}

/// A server that says which client authentication it takes must take `private_key_jwt`.
pub(crate) fn require_private_key_jwt(
    configuration: &SmartConfiguration,
) -> Result<(), SourceError> {
    let methods = &configuration.token_endpoint_auth_methods_supported;
    if !methods.is_empty() && !methods.iter().any(|method| method == "private_key_jwt") {
        return Err(SourceError::Unsupported(
            "token endpoint does not accept private_key_jwt".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn scope_grants() {
        assert!(scope_grants_read("patient/Observation.rs", "Observation"));
        assert!(scope_grants_read(
            "patient/Observation.rs?category=laboratory",
            "Observation"
        ));
        assert!(scope_grants_read("patient/*.read", "Condition"));
        assert!(scope_grants_read("patient/Condition.cruds", "Condition"));
        assert!(!scope_grants_read("patient/Condition.c", "Condition"));
        assert!(!scope_grants_read("patient/Observation.rs", "Condition"));
        assert!(!scope_grants_read("system/Observation.rs", "Observation"));
        assert!(!scope_grants_read("launch/patient", "Patient"));
        assert!(!scope_grants_read("patient/Observation.rx", "Observation"));
        let (granted, refused) = split_by_grant(
            &["Patient".into(), "Observation".into(), "Condition".into()],
            &[
                "patient/Patient.rs".into(),
                "patient/Observation.read".into(),
            ],
        );
        assert_eq!(granted, vec!["Patient", "Observation"]);
        assert_eq!(refused, vec!["Condition"]);
    }

    #[test]
    fn launch_scopes_refuse_odd_types() {
        let scopes = launch_scopes(&["Observation".into(), "Observation".into()]).expect("scopes");
        assert_eq!(
            scopes,
            vec![
                "launch/patient",
                "openid",
                "fhirUser",
                "offline_access",
                "patient/Observation.rs"
            ]
        );
        assert!(launch_scopes(&["Observation.rs openid".into()]).is_err());
    }
}
