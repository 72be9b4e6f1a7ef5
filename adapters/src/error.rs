//! The adapters' one error type. What the gateway does next depends on the variant: wait
//! and retry (`Unavailable`), ask the patient to link again (`Unauthorized`,
//! `LinkageExpired`), or give up with a reason (the rest).

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Down, in maintenance, rate-limiting (429/503) or unreachable: retry later. The
    /// source's `Retry-After`, when it sent one, is in `retry_after`.
    #[error("source unavailable: {reason}")]
    Unavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The link no longer works (token expired or revoked, linkage period over): the
    /// patient has to authorise again.
    #[error("source refused our credentials: {0}")]
    Unauthorized(String),
    /// The source's fixed linkage period (the self-information API's 期間連携, at most 90
    /// days) is over: the link worked until it ran out, and the patient has to authorise
    /// again to go on. Kept apart from `Unauthorized` so the patient is told why.
    #[error("linkage period ended: {0}")]
    LinkageExpired(String),
    /// The authorisation callback does not match what we started (state, error from the
    /// source, patient declined).
    #[error("authorisation failed: {0}")]
    Authorization(String),
    /// The source does not offer what we require (e.g. PKCE S256 only offered as `plain`).
    #[error("source not supported: {0}")]
    Unsupported(String),
    /// The source answered something we cannot use (malformed discovery, bundle, token).
    #[error("source protocol error: {0}")]
    Protocol(String),
    /// Our own configuration for this source is wrong.
    #[error("source configuration: {0}")]
    Config(String),
}

impl SourceError {
    pub fn unavailable(reason: impl Into<String>, retry_after: Option<Duration>) -> Self {
        SourceError::Unavailable {
            reason: reason.into(),
            retry_after,
        }
    }

    /// Whether only the patient authorising again can make the link work.
    pub fn needs_reauthorization(&self) -> bool {
        matches!(
            self,
            SourceError::Unauthorized(_) | SourceError::LinkageExpired(_)
        )
    }

    /// Whether waiting and trying again may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Unavailable { .. })
    }
}
