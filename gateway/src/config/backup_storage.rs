//! `[backup]` settings of generations: where they are kept, how many, and restore drills.

use serde::{Deserialize, Serialize};

use super::audit_shipping::check_endpoint;
use super::BackupConfig;

/// Where backup generations are kept.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GenerationStoreKind {
    /// The local `backup.directory`: the default, and not ransomware-resilient.
    #[default]
    Local,
    /// S3-compatible object storage with Object Lock (`backup.s3`); the local directory is
    /// then only where a generation is written before it is uploaded.
    S3,
}

/// The Object Lock mode each uploaded generation's objects are written with.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ObjectLockMode {
    /// No one, the bucket owner included, can delete a version before its retain-until.
    #[default]
    Compliance,
    /// Holders of `s3:BypassGovernanceRetention` can (the gateway never asks to).
    Governance,
}

impl ObjectLockMode {
    pub fn header_value(self) -> &'static str {
        match self {
            ObjectLockMode::Compliance => "COMPLIANCE",
            ObjectLockMode::Governance => "GOVERNANCE",
        }
    }
}

/// The retention policy's defaults.
pub const DEFAULT_KEEP_DAILY: u32 = 7;
pub const DEFAULT_KEEP_WEEKLY: u32 = 4;
pub const DEFAULT_KEEP_MONTHLY: u32 = 3;

impl BackupConfig {
    pub fn keep_daily(&self) -> u32 {
        self.keep_daily.unwrap_or(DEFAULT_KEEP_DAILY)
    }

    pub fn keep_weekly(&self) -> u32 {
        self.keep_weekly.unwrap_or(DEFAULT_KEEP_WEEKLY)
    }

    pub fn keep_monthly(&self) -> u32 {
        self.keep_monthly.unwrap_or(DEFAULT_KEEP_MONTHLY)
    }

    /// `(key, reason)` of the first bad value.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.keep_daily() == 0 {
            return Err((
                "backup.keep_daily",
                "must be at least 1 (the newest generation is always kept)".into(),
            ));
        }
        if self.drill_interval_secs == Some(0) {
            return Err((
                "backup.drill_interval_secs",
                "must be greater than 0".into(),
            ));
        }
        if self.store != GenerationStoreKind::S3 {
            return Ok(());
        }
        let Some(endpoint) = &self.s3.endpoint else {
            return Err(("backup.s3.endpoint", "required for the s3 store".into()));
        };
        check_endpoint(endpoint).map_err(|reason| ("backup.s3.endpoint", reason))?;
        if self.s3.bucket.as_deref().is_none_or(str::is_empty) {
            return Err(("backup.s3.bucket", "required for the s3 store".into()));
        }
        if self.s3.region.is_empty() {
            return Err(("backup.s3.region", "must not be empty".into()));
        }
        if self.s3.timeout_secs == 0 {
            return Err(("backup.s3.timeout_secs", "must be greater than 0".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_defaults_to_7_4_3_and_needs_a_daily() {
        let config = BackupConfig::default();
        assert_eq!(
            (
                config.keep_daily(),
                config.keep_weekly(),
                config.keep_monthly()
            ),
            (7, 4, 3)
        );
        assert!(config.check().is_ok());
        let none_daily = BackupConfig {
            keep_daily: Some(0),
            ..BackupConfig::default()
        };
        assert_eq!(none_daily.check().unwrap_err().0, "backup.keep_daily");
    }

    #[test]
    fn s3_needs_an_https_endpoint_and_a_bucket() {
        let mut config = BackupConfig {
            store: GenerationStoreKind::S3,
            ..BackupConfig::default()
        };
        assert_eq!(config.check().unwrap_err().0, "backup.s3.endpoint");
        config.s3.endpoint = Some("http://s3.example.jp".into());
        assert_eq!(config.check().unwrap_err().0, "backup.s3.endpoint");
        config.s3.endpoint = Some("https://s3.example.jp".into());
        assert_eq!(config.check().unwrap_err().0, "backup.s3.bucket");
        config.s3.bucket = Some("phr-backups".into());
        assert!(config.check().is_ok());
    }
}
