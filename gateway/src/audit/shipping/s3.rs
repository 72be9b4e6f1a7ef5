//! S3-compatible object storage as an audit sink. Write-once when the bucket has Object
//! Lock with a default COMPLIANCE retention: then no credential, ours included, can delete
//! or shorten the retention of an object version before it expires. The requests
//! themselves are the shared client's (`crate::s3`): create-only writes, reads of a key's
//! first version.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{async_trait, AuditSink, PutOutcome};
use crate::config::S3SinkConfig;
use crate::error::{Error, Result};
use crate::s3::S3Client;

pub struct S3Sink {
    client: S3Client,
    prefix: String,
    /// Set once the bucket was seen to enforce Object Lock in compliance mode.
    write_once: AtomicBool,
}

impl S3Sink {
    /// From `[audit_shipping.s3]`; credentials from there or `AWS_ACCESS_KEY_ID` /
    /// `AWS_SECRET_ACCESS_KEY`.
    pub fn from_config(config: &S3SinkConfig) -> Result<Self> {
        Ok(S3Sink {
            client: S3Client::from_config(config, "audit_shipping.s3", |text| {
                Error::Audit(format!("audit sink {text}"))
            })?,
            prefix: config.prefix.clone(),
            write_once: AtomicBool::new(false),
        })
    }

    /// The same bucket and credentials under another prefix (for `verify --against`).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Reads the bucket's Object Lock configuration: write-once when enabled with a default
    /// COMPLIANCE retention.
    pub async fn check_object_lock(&self) -> Result<bool> {
        let write_once = self.client.object_lock_is_compliance().await?;
        self.write_once.store(write_once, Ordering::Relaxed);
        Ok(write_once)
    }
}

#[async_trait]
impl AuditSink for S3Sink {
    fn describe(&self) -> String {
        format!("s3 {}{}", self.client.base_url(), self.prefix)
    }

    fn is_write_once(&self) -> bool {
        self.write_once.load(Ordering::Relaxed)
    }

    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<PutOutcome> {
        self.client
            .put_if_absent(&self.full_key(key), bytes, None)
            .await
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.client.get_first_version(&self.full_key(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        // From the versions, so an object hidden behind a delete marker still counts.
        let mut keys: Vec<String> = self
            .client
            .versions(&self.full_key(prefix))
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(&self.prefix).map(str::to_string))
            .collect();
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    async fn refresh(&self) -> Result<()> {
        if !self.check_object_lock().await? {
            tracing::warn!(
                sink = %self.describe(),
                "the audit shipping bucket does not enforce Object Lock in compliance mode: \
                 the shipped copy is not write-once"
            );
        }
        Ok(())
    }
}
