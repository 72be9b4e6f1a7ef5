//! The S3-compatible object-store client shared by audit shipping and backup generations.
//!
//! Requests are presigned with rusty-s3 (SigV4) and sent with the reqwest already used
//! elsewhere, so no second HTTP or TLS stack. Writes carry `If-None-Match: *`, so the
//! gateway itself never writes a second version of a key. Reads take a key's *first*
//! version: on a versioned bucket a later overwrite adds a version and a delete adds a
//! marker, but the original version, under retention, stays and is what counts.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use md5::{Digest, Md5};
use quick_xml::events::Event;
use quick_xml::Reader;
use rusty_s3::actions::{DeleteObject, GetObject, PutObject, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use crate::config::S3SinkConfig;
use crate::error::{Error, Result};

/// Lifetime of a presigned request: it is sent at once.
const SIGNED_FOR: Duration = Duration::from_secs(120);

/// What a create-only write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// An object with this key was already there; it was left as it is.
    AlreadyExists,
}

/// What deleting one object version came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    /// The store refused (e.g. Object Lock retention not yet expired): the S3 error code.
    Refused(String),
}

/// Object Lock retention for one object version, set when it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// `COMPLIANCE` or `GOVERNANCE`.
    pub mode: &'static str,
    /// Until when (Unix milliseconds) no one may delete the version (compliance) or only
    /// holders of the bypass permission may (governance).
    pub retain_until_millis: i64,
}

pub struct S3Client {
    bucket: Bucket,
    credentials: Credentials,
    http: reqwest::Client,
    /// Turns a failure's text into the caller's error (audit sink, backup store).
    error: fn(String) -> Error,
}

impl S3Client {
    /// From an `[…s3]` table whose configuration key is `key` (e.g. `audit_shipping.s3`);
    /// credentials from there or `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    pub fn from_config(
        config: &S3SinkConfig,
        key: &str,
        error: fn(String) -> Error,
    ) -> Result<Self> {
        let endpoint = config
            .endpoint
            .as_deref()
            .ok_or_else(|| Error::config(format!("{key}.endpoint"), "required"))?;
        let endpoint = endpoint
            .parse()
            .map_err(|e| Error::config(format!("{key}.endpoint"), format!("{e}")))?;
        let name = config
            .bucket
            .clone()
            .ok_or_else(|| Error::config(format!("{key}.bucket"), "required"))?;
        let style = if config.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(endpoint, style, name, config.region.clone())
            .map_err(|e| Error::config(key, e.to_string()))?;
        let access_key = config
            .access_key_id
            .clone()
            .or_else(|| std::env::var("AWS_ACCESS_KEY_ID").ok())
            .ok_or_else(|| {
                Error::config(
                    format!("{key}.access_key_id"),
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
                    format!("{key}.secret_access_key"),
                    "not set (nor AWS_SECRET_ACCESS_KEY)",
                )
            })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::config(key, format!("HTTP client: {e}")))?;
        Ok(S3Client {
            bucket,
            credentials: Credentials::new(access_key, secret),
            http,
            error,
        })
    }

    /// The bucket's base URL, for logs and audit events (no credential in it).
    pub fn base_url(&self) -> String {
        self.bucket.base_url().to_string()
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        (self.error)(format!("s3 {}: {what}: {e}", self.base_url()))
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
    pub async fn versions(&self, prefix: &str) -> Result<Vec<(String, String)>> {
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

    /// Whether the bucket enables Object Lock with a default COMPLIANCE retention
    /// (governance mode can be bypassed with a permission, so it does not count).
    pub async fn object_lock_is_compliance(&self) -> Result<bool> {
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
        Ok(ok && object_lock_is_compliance(&body))
    }

    /// Creates `key` unless it exists, with Object Lock `retention` when given.
    pub async fn put_if_absent(
        &self,
        key: &str,
        bytes: Vec<u8>,
        retention: Option<&Retention>,
    ) -> Result<PutOutcome> {
        let mut action = PutObject::new(&self.bucket, Some(&self.credentials), key);
        let until = retention.map(|r| crate::store::millis_to_rfc3339(r.retain_until_millis));
        if let (Some(retention), Some(until)) = (retention, &until) {
            // Signed, so the retention cannot be stripped from the request.
            action
                .headers_mut()
                .insert("x-amz-object-lock-mode", retention.mode);
            action
                .headers_mut()
                .insert("x-amz-object-lock-retain-until-date", until.clone());
        }
        let url = action.sign(SIGNED_FOR);
        // Object Lock buckets require an integrity header on PutObject.
        let md5 = BASE64.encode(Md5::digest(&bytes));
        let mut request = self
            .http
            .put(url)
            .header("If-None-Match", "*")
            .header("Content-MD5", md5)
            .header("Content-Length", bytes.len());
        if let (Some(retention), Some(until)) = (retention, &until) {
            request = request
                .header("x-amz-object-lock-mode", retention.mode)
                .header("x-amz-object-lock-retain-until-date", until.clone());
        }
        let response = request
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

    /// `key` as first written (its oldest version); `None` when there is none.
    pub async fn get_first_version(&self, key: &str) -> Result<Option<Vec<u8>>> {
        // Listed newest first: the last version of exactly this key is the first written.
        let first = self
            .versions(key)
            .await?
            .into_iter()
            .rfind(|(k, _)| k == key);
        let Some((_, version)) = first else {
            return Ok(None);
        };
        let mut action = GetObject::new(&self.bucket, Some(&self.credentials), key);
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

    /// Permanently deletes one version of `key` (never bypassing governance retention).
    /// A refusal by the store is an outcome, not an error.
    pub async fn delete_version(&self, key: &str, version: &str) -> Result<DeleteOutcome> {
        let mut action = DeleteObject::new(&self.bucket, Some(&self.credentials), key);
        if version != "null" {
            action.query_mut().insert("versionId", version.to_string());
        }
        let response = self
            .http
            .delete(action.sign(SIGNED_FOR))
            .send()
            .await
            .map_err(|e| self.http_fail(&format!("delete {key}"), e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(DeleteOutcome::Deleted);
        }
        let body = response.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::FORBIDDEN || status == reqwest::StatusCode::BAD_REQUEST {
            return Ok(DeleteOutcome::Refused(
                error_code(&body).unwrap_or_else(|| format!("HTTP {status}")),
            ));
        }
        Err(self.fail(
            &format!("delete {key}"),
            format!("HTTP {status}: {}", snippet(&body)),
        ))
    }
}

pub(crate) fn snippet(body: &str) -> String {
    body.chars().take(300).collect()
}

/// Whether an Object Lock configuration enables the lock with a default COMPLIANCE
/// retention.
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

/// The `<Code>` of an S3 error document.
fn error_code(xml: &str) -> Option<String> {
    let mut reader = Reader::from_str(xml);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) if e.local_name().as_ref() == b"Code" => {
                return text_of(&mut reader, e.name()).ok()
            }
            Ok(Event::Eof) | Err(_) => return None,
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

    #[test]
    fn a_refusal_names_its_code() {
        assert_eq!(
            error_code("<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>locked</Message></Error>")
                .as_deref(),
            Some("AccessDenied")
        );
        assert_eq!(error_code("not xml at all"), None);
    }
}
