//! HTTP to one source (a hospital, the portal): TLS with the ring provider, a per-source
//! concurrency limit, and retries of 429/502/503/504 and timeouts with bounded, jittered
//! exponential backoff. Shared by every adapter.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;
use time::OffsetDateTime;
use tokio::sync::Semaphore;

use crate::error::SourceError;

/// How hard to try before reporting a source `Unavailable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles after each further failure.
    pub base_delay: Duration,
    /// Upper bound of the computed backoff (a server's `Retry-After` may exceed it).
    pub max_delay: Duration,
    /// A `Retry-After` longer than this is not waited for in-process: the request gives up
    /// at once and hands the wait to the gateway's scheduler through `retry_after`.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Full-jitter backoff in [d/2, d] where d = base·2^(failures-1) capped at max_delay,
    /// and never shorter than what the server asked for.
    fn delay_after(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let exponent = failures.saturating_sub(1).min(16);
        let uncapped = self.base_delay.saturating_mul(1u32 << exponent);
        let capped = uncapped.min(self.max_delay);
        let half = capped / 2;
        let jitter_range = capped.saturating_sub(half).as_millis() as u64;
        let jitter = if jitter_range == 0 {
            0
        } else {
            rand::thread_rng().gen_range(0..=jitter_range)
        };
        let backoff = half + Duration::from_millis(jitter);
        match retry_after {
            Some(asked) => asked.max(backoff),
            None => backoff,
        }
    }
}

/// A response read in full (bounded by `max_response_bytes`).
#[derive(Debug)]
pub(crate) struct HttpReply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
}

/// Why one attempt failed.
enum AttemptFailure {
    /// Worth another attempt: timeout, connection trouble, 429/5xx-maintenance.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    Fatal(SourceError),
}

/// How one source's HTTP client behaves (each adapter fills it from its own config).
#[derive(Debug, Clone)]
pub(crate) struct TransportSettings {
    pub(crate) request_timeout: Duration,
    pub(crate) max_concurrent_requests: usize,
    pub(crate) retry: RetryPolicy,
    pub(crate) max_response_bytes: usize,
    pub(crate) extra_root_certificates_der: Vec<Vec<u8>>,
}

pub(crate) struct Transport {
    pub(crate) client: reqwest::Client,
    /// Shared by every pull of this source, so N concurrent pulls cannot hammer it.
    limiter: Arc<Semaphore>,
    retry: RetryPolicy,
    max_response_bytes: usize,
}

impl Transport {
    pub(crate) fn new(config: &TransportSettings) -> Result<Self, SourceError> {
        let client = build_http_client(config)?;
        Ok(Transport {
            client,
            limiter: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            retry: config.retry.clone(),
            max_response_bytes: config.max_response_bytes,
        })
    }

    /// Sends `request`, retrying transient failures; any other status is returned as is.
    pub(crate) async fn execute(
        &self,
        request: reqwest::Request,
    ) -> Result<HttpReply, SourceError> {
        let max_attempts = self.retry.max_attempts.max(1);
        let mut failures = 0u32;
        loop {
            let attempt = request.try_clone().ok_or_else(|| {
                SourceError::Config("request body cannot be replayed for a retry".into())
            })?;
            let (reason, retry_after) = match self.attempt_once(attempt).await {
                Ok(reply) => return Ok(reply),
                Err(AttemptFailure::Fatal(error)) => return Err(error),
                Err(AttemptFailure::Transient {
                    reason,
                    retry_after,
                }) => (reason, retry_after),
            };
            failures += 1;
            let too_long = retry_after.is_some_and(|asked| asked > self.retry.max_retry_after);
            if failures >= max_attempts || too_long {
                return Err(SourceError::unavailable(
                    format!("{reason} (after {failures} attempt(s))"),
                    retry_after,
                ));
            }
            let delay = self.retry.delay_after(failures, retry_after);
            tracing::debug!(%reason, ?delay, failures, "retrying request to source");
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt_once(&self, request: reqwest::Request) -> Result<HttpReply, AttemptFailure> {
        // The permit covers the exchange but not the backoff sleep, so waiting never blocks
        // other pulls of the same source.
        let _permit = self.limiter.acquire().await.map_err(|_| {
            AttemptFailure::Fatal(SourceError::unavailable("source is shutting down", None))
        })?;
        let mut response = self
            .client
            .execute(request)
            .await
            .map_err(classify_reqwest_error)?;
        let status = response.status();
        let headers = response.headers().clone();
        if is_transient_status(status) {
            return Err(AttemptFailure::Transient {
                reason: format!("HTTP {status}"),
                retry_after: parse_retry_after(&headers, OffsetDateTime::now_utc()),
            });
        }
        if response
            .content_length()
            .is_some_and(|length| length > self.max_response_bytes as u64)
        {
            return Err(AttemptFailure::Fatal(oversize(self.max_response_bytes)));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify_reqwest_error)? {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(AttemptFailure::Fatal(oversize(self.max_response_bytes)));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpReply {
            status,
            headers,
            body,
        })
    }

    /// Adapter so the `oauth2` crate's token requests go through the same limits and retries.
    pub(crate) async fn execute_oauth(
        &self,
        request: oauth2::HttpRequest,
    ) -> Result<oauth2::HttpResponse, SourceError> {
        let (parts, body) = request.into_parts();
        let request = self
            .client
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .build()
            .map_err(|error| SourceError::Config(format!("token request: {error}")))?;
        let reply = self.execute(request).await?;
        let mut response = oauth2::HttpResponse::new(reply.body);
        *response.status_mut() = reply.status;
        *response.headers_mut() = reply.headers;
        Ok(response)
    }
}

/// The `oauth2` crate's HTTP client hook, boxed so the futures stay `Send` for any borrow.
pub(crate) struct OAuthHttp<'a>(pub(crate) &'a Transport);

impl<'c> oauth2::AsyncHttpClient<'c> for OAuthHttp<'_> {
    type Error = SourceError;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<oauth2::HttpResponse, SourceError>> + Send + 'c,
        >,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(self.0.execute_oauth(request))
    }
}

fn oversize(limit: usize) -> SourceError {
    SourceError::Protocol(format!("response larger than the {limit}-byte limit"))
}

fn is_transient_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

fn classify_reqwest_error(error: reqwest::Error) -> AttemptFailure {
    if error.is_timeout() || error.is_connect() || error.is_request() || error.is_body() {
        AttemptFailure::Transient {
            reason: format!("network: {error}"),
            retry_after: None,
        }
    } else {
        AttemptFailure::Fatal(SourceError::Protocol(format!("HTTP client: {error}")))
    }
}

const HTTP_DATE: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

/// `Retry-After` as delta-seconds or an IMF-fixdate HTTP date (RFC 9110 §10.2.3).
pub(crate) fn parse_retry_after(headers: &HeaderMap, now: OffsetDateTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = time::PrimitiveDateTime::parse(value, HTTP_DATE)
        .ok()?
        .assume_utc();
    let wait = date - now;
    Some(Duration::try_from(wait).unwrap_or(Duration::ZERO))
}

/// Formats an instant as an HTTP date (for the simulator's `Retry-After`).
pub(crate) fn format_http_date(instant: OffsetDateTime) -> String {
    instant
        .to_offset(time::UtcOffset::UTC)
        .format(HTTP_DATE)
        .unwrap_or_default()
}

/// reqwest with our own rustls config: ring provider explicitly (no process default),
/// webpki roots plus configured anchors, and no redirects (a redirect could carry the
/// bearer token or the authorisation code somewhere else).
fn build_http_client(config: &TransportSettings) -> Result<reqwest::Client, SourceError> {
    client_builder(&config.extra_root_certificates_der)?
        .timeout(config.request_timeout)
        .connect_timeout(config.request_timeout)
        .build()
        .map_err(|error| SourceError::Config(format!("HTTP client: {error}")))
}

pub(crate) fn client_builder(
    extra_root_certificates_der: &[Vec<u8>],
) -> Result<reqwest::ClientBuilder, SourceError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for der in extra_root_certificates_der {
        roots
            .add(rustls::pki_types::CertificateDer::from(der.clone()))
            .map_err(|error| SourceError::Config(format!("extra root certificate: {error}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| SourceError::Config(format!("TLS versions: {error}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("phr-gateway/", env!("CARGO_PKG_VERSION"))))
}

/// Trims the trailing slash and refuses anything but https (plain http only on loopback).
pub(crate) fn validated_base_url(raw: &str) -> Result<String, SourceError> {
    let trimmed = raw.trim_end_matches('/');
    let parsed = url::Url::parse(trimmed)
        .map_err(|error| SourceError::Config(format!("base URL {raw:?}: {error}")))?;
    require_secure_scheme(&parsed)?;
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(SourceError::Config(
            "base URL must not carry a query or fragment".into(),
        ));
    }
    Ok(trimmed.to_string())
}

/// https everywhere; http only to this machine (simulators, local test servers).
pub(crate) fn require_secure_scheme(url: &url::Url) -> Result<(), SourceError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(url) => Ok(()),
        other => Err(SourceError::Config(format!(
            "{url} uses {other}; only https (or http on loopback) is allowed"
        ))),
    }
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(address)) => address.is_loopback(),
        Some(url::Host::Ipv6(address)) => address.is_loopback(),
        None => false,
    }
}

/// Whether `candidate` lies under the base URL (same scheme, host, port and path prefix):
/// the bearer token is only ever sent there.
pub(crate) fn is_under_base(base_url: &str, candidate: &str) -> bool {
    let (Ok(base), Ok(candidate)) = (url::Url::parse(base_url), url::Url::parse(candidate)) else {
        return false;
    };
    let base_path = base.path().trim_end_matches('/');
    base.scheme() == candidate.scheme()
        && base.host() == candidate.host()
        && base.port_or_known_default() == candidate.port_or_known_default()
        && (candidate.path() == base_path
            || candidate
                .path()
                .strip_prefix(base_path)
                .is_some_and(|rest| rest.starts_with('/')))
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_seconds_and_http_date() {
        let now = time::macros::datetime!(2024-04-01 00:00:00 UTC);
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(
            parse_retry_after(&headers, now),
            Some(Duration::from_secs(7))
        );
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Mon, 01 Apr 2024 00:00:42 GMT"),
        );
        assert_eq!(
            parse_retry_after(&headers, now),
            Some(Duration::from_secs(42))
        );
        let formatted = format_http_date(now + time::Duration::seconds(5));
        assert_eq!(formatted, "Mon, 01 Apr 2024 00:00:05 GMT");
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&headers, now), None);
    }

    #[test]
    fn backoff_is_bounded_and_honours_retry_after() {
        let policy = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(400),
            max_retry_after: Duration::from_secs(5),
        };
        for failures in 1..10 {
            let delay = policy.delay_after(failures, None);
            assert!(delay <= Duration::from_millis(400), "{delay:?}");
        }
        assert!(policy.delay_after(1, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
    }

    #[test]
    fn base_url_rules() {
        assert!(validated_base_url("https://fhir.example.jp/r4/").is_ok());
        assert!(validated_base_url("http://127.0.0.1:8080").is_ok());
        assert!(validated_base_url("http://fhir.example.jp/r4").is_err());
        assert!(is_under_base(
            "https://h.example/r4",
            "https://h.example/r4/Observation?x=1"
        ));
        assert!(!is_under_base(
            "https://h.example/r4",
            "https://h.example/r44/Observation"
        ));
        assert!(!is_under_base(
            "https://h.example/r4",
            "https://evil.example/r4/Observation"
        ));
        assert!(!is_under_base(
            "https://h.example/r4",
            "http://h.example/r4/Observation"
        ));
    }
}
