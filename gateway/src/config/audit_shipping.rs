//! `[audit_shipping]`: where copies of the audit log's leaves and signed checkpoints go.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// A local directory: the default, and not ransomware-resilient (whoever controls this
    /// host can rewrite it).
    #[default]
    Local,
    /// S3-compatible object storage; write-once when the bucket has Object Lock in
    /// compliance mode with a default retention.
    S3,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditShippingConfig {
    /// Whether this process ships (any number of processes may; writes are create-only).
    pub enabled: bool,
    pub sink: SinkKind,
    /// Local sink directory. Unset: `<data_dir>/audit-shipped`.
    pub directory: Option<PathBuf>,
    /// How often the shipper looks for new leaves and checkpoints.
    pub poll_millis: u64,
    /// Upper bound of the wait between retries while the sink is down.
    pub max_backoff_secs: u64,
    pub s3: S3SinkConfig,
}

impl Default for AuditShippingConfig {
    fn default() -> Self {
        AuditShippingConfig {
            enabled: true,
            sink: SinkKind::Local,
            directory: None,
            poll_millis: 1000,
            max_backoff_secs: 60,
            s3: S3SinkConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct S3SinkConfig {
    /// The endpoint, e.g. `https://s3.ap-northeast-1.amazonaws.com` (plain http only on
    /// loopback, for tests).
    pub endpoint: Option<String>,
    pub bucket: Option<String>,
    pub region: String,
    /// Object key prefix, e.g. `gateway-1/`.
    pub prefix: String,
    /// Path-style URLs (`endpoint/bucket/key`), which S3-compatible servers expect;
    /// `false` for virtual-hosted style.
    pub path_style: bool,
    /// Credentials: from here (e.g. `PHR_AUDIT_SHIPPING__S3__ACCESS_KEY_ID`), else from
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`. Never in a committed file.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// Seconds one request may take.
    pub timeout_secs: u64,
}

impl Default for S3SinkConfig {
    fn default() -> Self {
        S3SinkConfig {
            endpoint: None,
            bucket: None,
            region: "us-east-1".into(),
            prefix: String::new(),
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            timeout_secs: 10,
        }
    }
}

/// An S3 endpoint must be https (plain http only on loopback, for tests).
pub(super) fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let url = url::Url::parse(endpoint).map_err(|e| e.to_string())?;
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err("must be https (plain http only on loopback)".into()),
    }
}

/// A secret string that never shows in logs or debug output.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl AuditShippingConfig {
    pub fn directory_in(&self, data_dir: &Path) -> PathBuf {
        self.directory
            .clone()
            .unwrap_or_else(|| data_dir.join("audit-shipped"))
    }

    /// `(key, reason)` of the first bad value.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.poll_millis == 0 {
            return Err((
                "audit_shipping.poll_millis",
                "must be greater than 0".into(),
            ));
        }
        if self.max_backoff_secs == 0 {
            return Err((
                "audit_shipping.max_backoff_secs",
                "must be greater than 0".into(),
            ));
        }
        if self.sink != SinkKind::S3 {
            return Ok(());
        }
        let s3 = &self.s3;
        let Some(endpoint) = &s3.endpoint else {
            return Err((
                "audit_shipping.s3.endpoint",
                "required for the s3 sink".into(),
            ));
        };
        check_endpoint(endpoint).map_err(|reason| ("audit_shipping.s3.endpoint", reason))?;
        if s3.bucket.as_deref().is_none_or(str::is_empty) {
            return Err((
                "audit_shipping.s3.bucket",
                "required for the s3 sink".into(),
            ));
        }
        if s3.region.is_empty() {
            return Err(("audit_shipping.s3.region", "must not be empty".into()));
        }
        if s3.timeout_secs == 0 {
            return Err((
                "audit_shipping.s3.timeout_secs",
                "must be greater than 0".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(endpoint: &str) -> AuditShippingConfig {
        AuditShippingConfig {
            sink: SinkKind::S3,
            s3: S3SinkConfig {
                endpoint: Some(endpoint.into()),
                bucket: Some("audit".into()),
                ..S3SinkConfig::default()
            },
            ..AuditShippingConfig::default()
        }
    }

    #[test]
    fn local_is_the_default_under_the_data_dir() {
        let config = AuditShippingConfig::default();
        assert_eq!(config.sink, SinkKind::Local);
        assert!(config.check().is_ok());
        assert_eq!(
            config.directory_in(Path::new("/data")),
            PathBuf::from("/data/audit-shipped")
        );
    }

    #[test]
    fn s3_needs_https_except_on_loopback_and_a_bucket() {
        assert!(s3("https://s3.example.jp").check().is_ok());
        assert!(s3("http://127.0.0.1:9000").check().is_ok());
        assert!(s3("http://localhost:9000").check().is_ok());
        let (key, _) = s3("http://s3.example.jp").check().unwrap_err();
        assert_eq!(key, "audit_shipping.s3.endpoint");
        let mut no_bucket = s3("https://s3.example.jp");
        no_bucket.s3.bucket = None;
        assert_eq!(no_bucket.check().unwrap_err().0, "audit_shipping.s3.bucket");
        let mut no_endpoint = s3("https://s3.example.jp");
        no_endpoint.s3.endpoint = None;
        assert_eq!(
            no_endpoint.check().unwrap_err().0,
            "audit_shipping.s3.endpoint"
        );
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let mut config = s3("https://s3.example.jp");
        config.s3.secret_access_key = Some(Secret("very-secret".into()));
        assert!(!format!("{config:?}").contains("very-secret"));
    }
}
