//! `[alerts]`: rules over the audit stream, how often they run, and where alerts go
//! (operators' webhook endpoints, as signed Security Event Tokens).

use serde::{Deserialize, Serialize};

use crate::alerts::rules::{BusinessHours, Thresholds};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Run the rules in the background.
    pub evaluate: bool,
    /// Milliseconds between evaluations.
    pub interval_millis: u64,
    /// Operators' endpoints (https, or http on a loopback host); each new alert is POSTed
    /// to every one.
    pub webhook_urls: Vec<String>,
    /// Attempts per delivery before it is given up.
    pub max_attempts: u32,
    /// Longest wait between attempts.
    pub max_backoff_secs: u64,
    /// Failed sign-ins within a minute on one account that raise an alert.
    pub failed_logins_per_account: u32,
    /// Failed sign-ins within a minute over all accounts.
    pub failed_logins_overall: u32,
    /// A recipient's app or an operator reading more distinct patients than this…
    pub patients_read_max: u32,
    /// …within this many seconds raises an alert.
    pub patients_read_window_secs: u64,
    /// Reads by apps and operators are expected between these local (+09:00) times, `HH:MM`
    /// (the same time twice: at any time).
    pub business_hours_start: String,
    pub business_hours_end: String,
    /// One alert per rule and subject (an account, a client) per this many seconds.
    pub occurrence_secs: u64,
    /// Audit shipping lagging more leaves than this, or without success for longer than
    /// this many seconds, raises an alert.
    pub shipping_max_leaves_behind: u64,
    pub shipping_max_seconds_since_success: u64,
    /// Warn this many days before the TLS certificate expires or a signing key reaches its
    /// maximum age.
    pub expiry_warning_days: u32,
    pub signing_key_max_age_days: u32,
    /// Seconds between full audit log verifications (0: never; a failure raises an alert).
    pub verify_interval_secs: u64,
    /// A local RustSec advisory-db snapshot (a checkout of rustsec/advisory-db, kept current
    /// by the operator); each advisory affecting the build is notified once. Unset: no check.
    pub advisory_db_dir: Option<std::path::PathBuf>,
    /// Seconds between scans of the snapshot (0: every evaluation).
    pub advisory_scan_interval_secs: u64,
    /// Warn about end-of-life dates (the inventory shipped as `eol.toml`, or this file).
    pub check_end_of_life: bool,
    pub eol_inventory_file: Option<std::path::PathBuf>,
    /// Warn this many days before an end-of-life date.
    pub eol_warning_days: u32,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        let thresholds = Thresholds::default();
        AlertsConfig {
            evaluate: true,
            interval_millis: 5_000,
            webhook_urls: Vec::new(),
            max_attempts: 8,
            max_backoff_secs: 3_600,
            failed_logins_per_account: thresholds.failed_logins_per_account,
            failed_logins_overall: thresholds.failed_logins_overall,
            patients_read_max: thresholds.patients_read_max,
            patients_read_window_secs: (thresholds.patients_read_window_millis / 1000) as u64,
            business_hours_start: "07:00".into(),
            business_hours_end: "22:00".into(),
            occurrence_secs: (thresholds.occurrence_millis / 1000) as u64,
            shipping_max_leaves_behind: thresholds.shipping_max_leaves_behind,
            shipping_max_seconds_since_success: thresholds.shipping_max_seconds_since_success,
            expiry_warning_days: thresholds.expiry_warning_days as u32,
            signing_key_max_age_days: thresholds.signing_key_max_age_days as u32,
            verify_interval_secs: 3_600,
            advisory_db_dir: None,
            advisory_scan_interval_secs: 3_600,
            check_end_of_life: true,
            eol_inventory_file: None,
            eol_warning_days: 90,
        }
    }
}

impl AlertsConfig {
    /// Checks the values; `Err((key, reason))` names the key at fault.
    pub fn check(&self) -> Result<(), (String, String)> {
        let positive = [
            ("alerts.interval_millis", self.interval_millis),
            ("alerts.max_attempts", u64::from(self.max_attempts)),
            ("alerts.max_backoff_secs", self.max_backoff_secs),
            (
                "alerts.failed_logins_per_account",
                u64::from(self.failed_logins_per_account),
            ),
            (
                "alerts.failed_logins_overall",
                u64::from(self.failed_logins_overall),
            ),
            (
                "alerts.patients_read_window_secs",
                self.patients_read_window_secs,
            ),
            ("alerts.occurrence_secs", self.occurrence_secs),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err((key.into(), "must be greater than 0".into()));
            }
        }
        for url in &self.webhook_urls {
            crate::oauth::clients::validate_redirect_uri(url).map_err(|reason| {
                (
                    "alerts.webhook_urls".to_string(),
                    format!("{url:?}: {reason}"),
                )
            })?;
        }
        self.thresholds()?;
        Ok(())
    }

    /// The rules' thresholds.
    pub fn thresholds(&self) -> Result<Thresholds, (String, String)> {
        let minute = |key: &str, text: &str| {
            BusinessHours::minute_of(text)
                .ok_or_else(|| (key.to_string(), format!("{text:?} is not a time HH:MM")))
        };
        Ok(Thresholds {
            failed_logins_per_account: self.failed_logins_per_account,
            failed_logins_overall: self.failed_logins_overall,
            patients_read_max: self.patients_read_max,
            patients_read_window_millis: (self.patients_read_window_secs as i64)
                .saturating_mul(1000),
            business_hours: BusinessHours {
                start_minute: minute("alerts.business_hours_start", &self.business_hours_start)?,
                end_minute: minute("alerts.business_hours_end", &self.business_hours_end)?,
            },
            occurrence_millis: (self.occurrence_secs as i64).saturating_mul(1000),
            shipping_max_leaves_behind: self.shipping_max_leaves_behind,
            shipping_max_seconds_since_success: self.shipping_max_seconds_since_success,
            expiry_warning_days: i64::from(self.expiry_warning_days),
            signing_key_max_age_days: i64::from(self.signing_key_max_age_days),
        })
    }
}
