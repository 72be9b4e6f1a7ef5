//! S3-compatible object storage. Write-once when the bucket has Object Lock with a default
//! COMPLIANCE retention: then no credential, ours included, can delete or shorten the
//! retention of an object version before it expires.
//!
//! Requests are presigned with rusty-s3 (SigV4) and sent with the reqwest already used
//! elsewhere, so no second HTTP or TLS stack. Writes carry `If-None-Match: *`, so the
//! gateway itself never writes a second version of a key. Reads take a key's *first*
//! version: on a versioned bucket a later overwrite adds a version and a delete adds a
//! marker, but the original version, under retention, stays and is what counts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use md5::{Digest, Md5};
use quick_xml::events::Event;
use quick_xml::Reader;
use rusty_s3::actions::{GetObject, PutObject, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use super::{async_trait, AuditSink, PutOutcome};
use crate::config::S3SinkConfig;
use crate::error::{Error, Result};

/// Lifetime of a presigned request: it is sent at once.
const SIGNED_FOR: Duration = Duration::from_secs(120);

pub struct S3Sink {
    bucket: Bucket,
    credentials: Credentials,
    prefix: String,
    http: reqwest::Client,
    /// Set once the bucket was seen to enforce Object Lock in compliance mode.
    write_once: AtomicBool,
}

impl S3Sink {
    /// From `[audit_shipping.s3]`; credentials from there or `AWS_ACCESS_KEY_ID` /
    /// `AWS_SECRET_ACCESS_KEY`.
    pub fn from_config(config: &S3SinkConfig) -> Result<Self> {
        let endpoint = config
            .endpoint
            .as_deref()
            .ok_or_else(|| Error::config("audit_shipping.s3.endpoint", "required"))?;
        let endpoint = endpoint
            .parse()
            .map_err(|e| Error::config("audit_shipping.s3.endpoint", format!("{e}")))?;
        let name = config
            .bucket
            .clone()
            .ok_or_else(|| Error::config("audit_shipping.s3.bucket", "required"))?;
        let style = if config.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(endpoint, style, name, config.region.clone())
            .map_err(|e| Error::config("audit_shipping.s3", e.to_string()))?;
        let key = config
            .access_key_id
            .clone()
            .or_else(|| std::env::var("AWS_ACCESS_KEY_ID").ok())
            .ok_or_else(|| {
                Error::config(
                    "audit_shipping.s3.access_key_id",
                    "not set (nor AWS_ACCESS_KEY_ID)",
                )
            })?;
        let secret = config
            .secret_access_key
            .as_ref()
            .map(|s| s.0.clone())
            .or_else(|| std::env::var("AWS_SECRET_ACCESS_KEY").ok())
            .ok_or_else(|| {
                Error::config(
                    "audit_shipping.s3.secret_access_key",
                    "not set (nor AWS_SECRET_ACCESS_KEY)",
                )
            })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::config("audit_shipping.s3", format!("HTTP client: {e}")))?;
        Ok(S3Sink {
            bucket,
            credentials: Credentials::new(key, secret),
            prefix: config.prefix.clone(),
            http,
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

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Audit(format!("audit sink {}: {what}: {e}", self.describe()))
    }

    /// Without the URL: a presigned URL is a short-lived credential and stays out of logs.
    fn http_fail(&self, what: &str, e: reqwest::Error) -> Error {
        let e = e.without_url();
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        self.fail(what, text)
    }

    /// Every version of every key under `prefix` (full keys), newest first within a key as
    /// S3 lists them; delete markers are left out.
    async fn versions(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let mut all = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut action = GetObject::new(&self.bucket, Some(&self.credentials), "");
            action.query_mut().insert("versions", "");
            action.query_mut().insert("prefix", prefix.to_string());
            if let Some((key, version)) = &markers {
                action.query_mut().insert("key-marker", key.clone());
                action
                    .query_mut()
                    .insert("version-id-marker", version.clone());
            }
            let url = action.sign(SIGNED_FOR);
            let response = self
                .http
                .get(url)
                .send()
                .await
                .map_err(|e| self.http_fail("list versions", e))?;
            let status = response.status();
            let body = response
                .text()
                .await
                .map_err(|e| self.http_fail("list versions", e))?;
            if !status.is_success() {
                return Err(self.fail(
                    "list versions",
                    format!("HTTP {status}: {}", snippet(&body)),
                ));
            }
            let page = parse_versions(&body).map_err(|e| self.fail("list versions", e))?;
            all.extend(page.versions);
            match (
                page.truncated,
                page.next_key_marker,
                page.next_version_marker,
            ) {
                (true, Some(key), Some(version)) => markers = Some((key, version)),
                _ => return Ok(all),
            }
        }
    }

    /// Reads the bucket's Object Lock configuration: write-once when enabled with a default
    /// COMPLIANCE retention.
    pub async fn check_object_lock(&self) -> Result<bool> {
        let mut action = GetObject::new(&self.bucket, Some(&self.credentials), "");
        action.query_mut().insert("object-lock", "");
        let response = self
            .http
            .get(action.sign(SIGNED_FOR))
            .send()
            .await
            .map_err(|e| self.http_fail("object lock configuration", e))?;
        let ok = response.status().is_success();
        let body = response
            .text()
            .await
            .map_err(|e| self.http_fail("object lock configuration", e))?;
        let write_once = ok && object_lock_is_compliance(&body);
        self.write_once.store(write_once, Ordering::Relaxed);
        Ok(write_once)
    }
}

fn snippet(body: &str) -> String {
    body.chars().take(300).collect()
}

/// Whether an Object Lock configuration enables the lock with a default COMPLIANCE
/// retention (governance mode can be bypassed with a permission, so it does not count).
fn object_lock_is_compliance(xml: &str) -> bool {
    let mut reader = Reader::from_str(xml);
    let (mut enabled, mut compliance) = (false, false);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => match e.local_name().as_ref() {
                b"ObjectLockEnabled" => {
                    enabled = text_of(&mut reader, e.name()).is_ok_and(|t| t == "Enabled")
                }
                b"Mode" => {
                    compliance = text_of(&mut reader, e.name()).is_ok_and(|t| t == "COMPLIANCE")
                }
                _ => {}
            },
            Ok(Event::Eof) | Err(_) => return enabled && compliance,
            _ => {}
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct VersionsPage {
    /// (key, version id) of each object version, in listing order.
    versions: Vec<(String, String)>,
    truncated: bool,
    next_key_marker: Option<String>,
    next_version_marker: Option<String>,
}

fn text_of(reader: &mut Reader<&[u8]>, name: quick_xml::name::QName) -> Result<String, String> {
    let raw = reader.read_text(name).map_err(|e| e.to_string())?;
    quick_xml::escape::unescape(&raw)
        .map(|t| t.into_owned())
        .map_err(|e| e.to_string())
}

/// A `ListVersionsResult` page (ListObjectVersions).
fn parse_versions(xml: &str) -> std::result::Result<VersionsPage, String> {
    let mut reader = Reader::from_str(xml);
    let mut page = VersionsPage::default();
    let mut in_version = false;
    let (mut key, mut version) = (None, None);
    loop {
        match reader.read_event().map_err(|e| e.to_string())? {
            Event::Start(e) => match e.local_name().as_ref() {
                b"Version" => {
                    in_version = true;
                    key = None;
                    version = None;
                }
                b"Key" if in_version => key = Some(text_of(&mut reader, e.name())?),
                b"VersionId" if in_version => version = Some(text_of(&mut reader, e.name())?),
                b"IsTruncated" => page.truncated = text_of(&mut reader, e.name())? == "true",
                b"NextKeyMarker" => page.next_key_marker = Some(text_of(&mut reader, e.name())?),
                b"NextVersionIdMarker" => {
                    page.next_version_marker = Some(text_of(&mut reader, e.name())?)
                }
                _ => {}
            },
            Event::End(e) if e.local_name().as_ref() == b"Version" => {
                in_version = false;
                if let (Some(k), Some(v)) = (key.take(), version.take()) {
                    page.versions.push((k, v));
                }
            }
            Event::Eof => return Ok(page),
            _ => {}
        }
    }
}

#[async_trait]
impl AuditSink for S3Sink {
    fn describe(&self) -> String {
        format!("s3 {}{}", self.bucket.base_url(), self.prefix)
    }

    fn is_write_once(&self) -> bool {
        self.write_once.load(Ordering::Relaxed)
    }

    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<PutOutcome> {
        let full = self.full_key(key);
        let url = PutObject::new(&self.bucket, Some(&self.credentials), &full).sign(SIGNED_FOR);
        // Object Lock buckets require an integrity header on PutObject.
        let md5 = BASE64.encode(Md5::digest(&bytes));
        let response = self
            .http
            .put(url)
            .header("If-None-Match", "*")
            .header("Content-MD5", md5)
            .header("Content-Length", bytes.len())
            .body(bytes)
            .send()
            .await
            .map_err(|e| self.http_fail(&format!("put {key}"), e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(PutOutcome::Created);
        }
        if status == reqwest::StatusCode::PRECONDITION_FAILED {
            return Ok(PutOutcome::AlreadyExists);
        }
        let body = response.text().await.unwrap_or_default();
        Err(self.fail(
            &format!("put {key}"),
            format!("HTTP {status}: {}", snippet(&body)),
        ))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let full = self.full_key(key);
        // Listed newest first: the last version of exactly this key is the first written.
        let first = self
            .versions(&full)
            .await?
            .into_iter()
            .rfind(|(k, _)| *k == full);
        let Some((_, version)) = first else {
            return Ok(None);
        };
        let mut action = GetObject::new(&self.bucket, Some(&self.credentials), &full);
        if version != "null" {
            action.query_mut().insert("versionId", version);
        }
        let response = self
            .http
            .get(action.sign(SIGNED_FOR))
            .send()
            .await
            .map_err(|e| self.http_fail(&format!("get {key}"), e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| self.http_fail(&format!("get {key}"), e))?;
        if !status.is_success() {
            return Err(self.fail(
                &format!("get {key}"),
                format!(
                    "HTTP {status}: {}",
                    snippet(&String::from_utf8_lossy(&body))
                ),
            ));
        }
        Ok(Some(body.to_vec()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        // From the versions, so an object hidden behind a delete marker still counts.
        let mut keys: Vec<String> = self
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_page_keeps_versions_in_order_and_skips_delete_markers() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListVersionsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>audit</Name><Prefix>p/</Prefix><KeyMarker/><VersionIdMarker/>
  <MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>
  <NextKeyMarker>p/b&amp;c</NextKeyMarker><NextVersionIdMarker>v9</NextVersionIdMarker>
  <DeleteMarker><Key>p/a</Key><VersionId>dm</VersionId><IsLatest>true</IsLatest></DeleteMarker>
  <Version><Key>p/a</Key><VersionId>v2</VersionId><IsLatest>false</IsLatest></Version>
  <Version><Key>p/a</Key><VersionId>v1</VersionId><IsLatest>false</IsLatest></Version>
  <Version><Key>p/b&amp;c</Key><VersionId>null</VersionId></Version>
</ListVersionsResult>"#;
        let page = parse_versions(xml).unwrap();
        assert_eq!(
            page.versions,
            vec![
                ("p/a".to_string(), "v2".to_string()),
                ("p/a".to_string(), "v1".to_string()),
                ("p/b&c".to_string(), "null".to_string()),
            ]
        );
        assert!(page.truncated);
        assert_eq!(page.next_key_marker.as_deref(), Some("p/b&c"));
        assert_eq!(page.next_version_marker.as_deref(), Some("v9"));
    }

    #[test]
    fn only_compliance_mode_counts_as_write_once() {
        let compliance = "<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention><Mode>COMPLIANCE</Mode><Days>1</Days></DefaultRetention></Rule></ObjectLockConfiguration>";
        assert!(object_lock_is_compliance(compliance));
        assert!(!object_lock_is_compliance(
            &compliance.replace("COMPLIANCE", "GOVERNANCE")
        ));
        assert!(!object_lock_is_compliance(
            "<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled></ObjectLockConfiguration>"
        ));
        assert!(!object_lock_is_compliance(
            "<Error><Code>NoSuchKey</Code></Error>"
        ));
    }
}
