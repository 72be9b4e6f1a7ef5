//! The gateway's OAuth 2 authorisation server for PHR apps, in the style of SMART App
//! Launch 2.2: confidential clients only (`private_key_jwt` with RS384/ES384, or
//! `client_secret_basic`), authorisation code with PKCE S256, refresh-token rotation with
//! reuse detection, client credentials for `system/` scopes, revocation and introspection.
//!
//! Codes and tokens are opaque 256-bit random strings stored only as SHA-256 digests. Every
//! issue, refresh, refusal, revocation and detected reuse is an audit event. The patient's
//! decision itself happens on the consent pages, which use `authorize::pending_request`,
//! `authorize::approve` and `authorize::decline`.

pub mod assertion;
pub mod authorize;
pub mod clients;
pub mod housekeeping;
pub mod jws_keys;
pub mod scopes;
pub mod tokens;

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};

pub use authorize::{approve, decline, pending_request, PendingAuthorization};
pub use scopes::Scope;
pub use tokens::{revoke_by_consent, AccessGrant};

/// The OAuth error codes the gateway answers with (RFC 6749 §4.1.2.1, §5.2; RFC 6750 §3.1;
/// RFC 7009 §2.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    UnsupportedResponseType,
    InvalidScope,
    AccessDenied,
    InvalidToken,
    UnsupportedTokenType,
}

impl OAuthErrorCode {
    pub fn code(self) -> &'static str {
        match self {
            OAuthErrorCode::InvalidRequest => "invalid_request",
            OAuthErrorCode::InvalidClient => "invalid_client",
            OAuthErrorCode::InvalidGrant => "invalid_grant",
            OAuthErrorCode::UnauthorizedClient => "unauthorized_client",
            OAuthErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            OAuthErrorCode::UnsupportedResponseType => "unsupported_response_type",
            OAuthErrorCode::InvalidScope => "invalid_scope",
            OAuthErrorCode::AccessDenied => "access_denied",
            OAuthErrorCode::InvalidToken => "invalid_token",
            OAuthErrorCode::UnsupportedTokenType => "unsupported_token_type",
        }
    }
}

/// A refusal in OAuth's terms: the code a client acts on and a description for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub code: OAuthErrorCode,
    pub description: String,
}

impl OAuthError {
    pub fn new(code: OAuthErrorCode, description: impl Into<String>) -> Self {
        OAuthError {
            code,
            description: description.into(),
        }
    }

    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(OAuthErrorCode::InvalidRequest, description)
    }

    pub fn invalid_client(description: impl Into<String>) -> Self {
        Self::new(OAuthErrorCode::InvalidClient, description)
    }

    pub fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(OAuthErrorCode::InvalidGrant, description)
    }

    pub fn invalid_scope(description: impl Into<String>) -> Self {
        Self::new(OAuthErrorCode::InvalidScope, description)
    }

    pub fn invalid_token(description: impl Into<String>) -> Self {
        Self::new(OAuthErrorCode::InvalidToken, description)
    }
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.code(), self.description)
    }
}

impl From<OAuthError> for crate::error::Error {
    fn from(err: OAuthError) -> Self {
        crate::error::Error::OAuth(err)
    }
}

/// Lifetimes, from `[oauth]` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Access tokens; never more than `MAX_ACCESS_TOKEN_SECS`.
    pub access_token_secs: u64,
    pub refresh_token_secs: u64,
    /// A pending authorisation request waiting for the patient.
    pub authorization_request_secs: u64,
}

/// Access tokens live five minutes at most, whatever the configuration says.
pub const MAX_ACCESS_TOKEN_SECS: u64 = 300;

/// Authorisation codes live one minute.
pub const CODE_LIFETIME_SECS: u64 = 60;

impl Lifetimes {
    pub fn of(config: &crate::config::OAuthConfig) -> Self {
        Lifetimes {
            access_token_secs: config.access_token_secs.clamp(1, MAX_ACCESS_TOKEN_SECS),
            refresh_token_secs: config.refresh_token_days.saturating_mul(24 * 60 * 60),
            authorization_request_secs: config.authorization_request_secs,
        }
    }
}

/// 32 random bytes, base64url: codes, tokens, secrets.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The stored form of a code or token.
pub fn digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}
