//! Where generations are kept: the local directory (the default; whoever controls this host
//! can delete it, so it is not ransomware-resilient) or an S3 bucket with Object Lock, each
//! object written once with a retention that lasts until the generation's planned expiry.
//!
//! A generation is the files of its directory (the archive or archives and the signed
//! manifest), whatever the engine. On S3 they are `<prefix><generation>/<file>`, the
//! manifest uploaded last, so a generation is listed only once it is complete; reads take
//! each key's first version, so an overwrite or a delete marker added later changes nothing.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::MANIFEST;
use crate::config::{BackupConfig, GenerationStoreKind};
use crate::error::{Error, Result};
use crate::s3::{DeleteOutcome, PutOutcome, Retention, S3Client};

/// The generation directories' name format, e.g. `20261126T052512Z`.
const NAME_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");

/// When a generation was taken, from its name; `None` when the name is not a generation's.
pub fn created_at(name: &str) -> Option<time::OffsetDateTime> {
    time::PrimitiveDateTime::parse(name, NAME_FORMAT)
        .ok()
        .map(time::PrimitiveDateTime::assume_utc)
}

/// What removing a generation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// The store refused (its lock still holds); the generation stays.
    Refused(String),
}

#[async_trait]
pub trait GenerationStore: Send + Sync {
    /// For operators and audit events, e.g. `local directory /var/lib/phr/backups`.
    fn describe(&self) -> String;
    /// Whether a generation, once stored, cannot be deleted or rewritten by someone holding
    /// this host's credentials.
    fn is_write_once(&self) -> bool;
    /// Whether generations stay in the directory they are written to (the local store);
    /// otherwise that directory is only staging.
    fn keeps_in_place(&self) -> bool {
        false
    }
    /// The complete generations (those with a manifest), oldest first.
    async fn list(&self) -> Result<Vec<String>>;
    /// Stores the generation written in the local directory `written` (a no-op when that is
    /// where the store keeps it), locked until `retain_until` where the store can lock.
    async fn store(
        &self,
        generation: &str,
        written: &Path,
        retain_until: time::OffsetDateTime,
    ) -> Result<()>;
    /// The generation's signed manifest as stored; `None` when there is none.
    async fn manifest(&self, generation: &str) -> Result<Option<String>>;
    /// A local directory holding the generation's files, named after it: the store's own
    /// directory, or a copy under `scratch`.
    async fn fetch(&self, generation: &str, scratch: &Path) -> Result<PathBuf>;
    async fn remove(&self, generation: &str) -> Result<Removal>;
}

/// The store the configuration names.
pub async fn from_config(
    config: &BackupConfig,
    data_dir: &Path,
) -> Result<Box<dyn GenerationStore>> {
    Ok(match config.store {
        GenerationStoreKind::Local => Box::new(LocalGenerationStore {
            directory: local_directory(config, data_dir),
        }),
        GenerationStoreKind::S3 => Box::new(S3GenerationStore::connect(config).await?),
    })
}

/// Where generations are written first (and kept, for the local store).
pub fn local_directory(config: &BackupConfig, data_dir: &Path) -> PathBuf {
    config
        .directory
        .clone()
        .unwrap_or_else(|| data_dir.join("backups"))
}

pub struct LocalGenerationStore {
    pub directory: PathBuf,
}

#[async_trait]
impl GenerationStore for LocalGenerationStore {
    fn describe(&self) -> String {
        format!("local directory {}", self.directory.display())
    }

    fn is_write_once(&self) -> bool {
        false
    }

    fn keeps_in_place(&self) -> bool {
        true
    }

    async fn list(&self) -> Result<Vec<String>> {
        let entries = match std::fs::read_dir(&self.directory) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&self.directory, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.directory, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if created_at(&name).is_some() && entry.path().join(MANIFEST).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    async fn store(
        &self,
        generation: &str,
        written: &Path,
        _retain_until: time::OffsetDateTime,
    ) -> Result<()> {
        let target = self.directory.join(generation);
        if written == target {
            return Ok(());
        }
        std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
        for (name, path) in generation_files(written)? {
            std::fs::copy(&path, target.join(&name)).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    async fn manifest(&self, generation: &str) -> Result<Option<String>> {
        let path = self.directory.join(generation).join(MANIFEST);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    async fn fetch(&self, generation: &str, _scratch: &Path) -> Result<PathBuf> {
        Ok(self.directory.join(generation))
    }

    async fn remove(&self, generation: &str) -> Result<Removal> {
        let path = self.directory.join(generation);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => Ok(Removal::Removed),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Removal::Removed),
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}

/// The files of a generation directory, manifest last (hidden files are scratch).
fn generation_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        files.push((name, entry.path()));
    }
    files.sort_by_key(|(name, _)| (name == MANIFEST, name.clone()));
    Ok(files)
}

pub struct S3GenerationStore {
    client: S3Client,
    prefix: String,
    mode: &'static str,
    /// Whether the bucket enforces Object Lock in compliance mode (read at connect).
    write_once: bool,
}

impl S3GenerationStore {
    /// From `backup.s3`; reads the bucket's Object Lock setting.
    pub async fn connect(config: &BackupConfig) -> Result<Self> {
        let client = S3Client::from_config(&config.s3, "backup.s3", Error::BackupStorage)?;
        let write_once = match client.object_lock_is_compliance().await {
            Ok(on) => on,
            Err(error) => {
                tracing::warn!(%error, "cannot read the backup bucket's Object Lock setting");
                false
            }
        };
        if !write_once {
            tracing::warn!(
                bucket = %client.base_url(),
                "the backup bucket does not enforce Object Lock in compliance mode by default: \
                 generations rely on the per-object retention the gateway sets"
            );
        }
        Ok(S3GenerationStore {
            client,
            prefix: config.s3.prefix.clone(),
            mode: config.object_lock_mode.header_value(),
            write_once,
        })
    }

    /// The client, for operators' tools and tests that need the raw bucket.
    pub fn client(&self) -> &S3Client {
        &self.client
    }

    /// The object key of a generation's file.
    pub fn key(&self, generation: &str, file: &str) -> String {
        format!("{}{generation}/{file}", self.prefix)
    }
}

#[async_trait]
impl GenerationStore for S3GenerationStore {
    fn describe(&self) -> String {
        format!("s3 {}{}", self.client.base_url(), self.prefix)
    }

    fn is_write_once(&self) -> bool {
        self.write_once
    }

    async fn list(&self) -> Result<Vec<String>> {
        // From the versions, so a generation hidden behind delete markers still counts.
        let suffix = format!("/{MANIFEST}");
        let mut names: Vec<String> = self
            .client
            .versions(&self.prefix)
            .await?
            .into_iter()
            .filter_map(|(key, _)| {
                let name = key.strip_prefix(&self.prefix)?.strip_suffix(&suffix)?;
                created_at(name).map(|_| name.to_string())
            })
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn store(
        &self,
        generation: &str,
        written: &Path,
        retain_until: time::OffsetDateTime,
    ) -> Result<()> {
        let retention = Retention {
            mode: self.mode,
            retain_until_millis: crate::store::millis_of(retain_until),
        };
        for (name, path) in generation_files(written)? {
            // Whole files in one request (S3 takes up to 5 GiB per PUT; larger archives need
            // multipart uploads, not built).
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let key = self.key(generation, &name);
            match self
                .client
                .put_if_absent(&key, bytes, Some(&retention))
                .await?
            {
                PutOutcome::Created => {}
                PutOutcome::AlreadyExists => {
                    return Err(Error::BackupStorage(format!(
                        "{key} already exists in the bucket; the generation is not stored twice"
                    )))
                }
            }
        }
        Ok(())
    }

    async fn manifest(&self, generation: &str) -> Result<Option<String>> {
        Ok(self
            .client
            .get_first_version(&self.key(generation, MANIFEST))
            .await?
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    async fn fetch(&self, generation: &str, scratch: &Path) -> Result<PathBuf> {
        let target = scratch.join(generation);
        std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
        let prefix = self.key(generation, "");
        let mut files: Vec<String> = self
            .client
            .versions(&prefix)
            .await?
            .into_iter()
            .filter_map(|(key, _)| key.strip_prefix(&prefix).map(str::to_string))
            .filter(|name| !name.is_empty() && !name.contains('/') && !name.starts_with('.'))
            .collect();
        files.sort();
        files.dedup();
        for name in files {
            let key = self.key(generation, &name);
            if let Some(bytes) = self.client.get_first_version(&key).await? {
                let path = target.join(&name);
                std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
            }
        }
        Ok(target)
    }

    async fn remove(&self, generation: &str) -> Result<Removal> {
        let prefix = self.key(generation, "");
        let mut versions = self.client.versions(&prefix).await?;
        // The manifest last, so a half-removed generation is never listed as complete…
        // unless its manifest stays, and then its archive stays too (same retention).
        versions.sort_by_key(|(key, _)| key.ends_with(MANIFEST));
        let mut refused = None;
        for (key, version) in versions {
            if let DeleteOutcome::Refused(code) = self.client.delete_version(&key, &version).await?
            {
                refused.get_or_insert(code);
            }
        }
        Ok(match refused {
            None => Removal::Removed,
            Some(code) => Removal::Refused(code),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names_parse_as_utc_times() {
        let at = created_at("20261126T052512Z").expect("a generation name");
        assert_eq!(at.unix_timestamp(), 1_795_670_712);
        for other in [
            "restore-scratch",
            "20261126",
            "20261326T052512Z",
            ".snapshot",
        ] {
            assert!(created_at(other).is_none(), "{other}");
        }
    }
}
