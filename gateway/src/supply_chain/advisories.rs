//! The built dependency set checked against a local RustSec advisory-db snapshot (RustSec's
//! own `rustsec` crate, no network): each advisory that affects a locked crate becomes a
//! finding with its severity, a workaround and the date a fix is planned by (from the
//! severity). The alert engine turns each finding into one notification, once.

use std::path::Path;

use crate::error::{Error, Result};

/// Days from discovery to the planned fix, by severity.
pub fn fix_within_days(severity: &str) -> i64 {
    match severity {
        "critical" => 3,
        "high" => 7,
        "medium" => 30,
        _ => 90,
    }
}

/// One advisory affecting one locked crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvisoryFinding {
    pub id: String,
    pub package: String,
    pub version: String,
    pub title: String,
    /// `critical`, `high`, `medium`, `low`, `none`, or `informational` (unmaintained, …).
    pub severity: String,
    pub workaround: String,
    /// `YYYY-MM-DD`: when the fix is planned by.
    pub fix_due: String,
    pub url: Option<String>,
}

/// The findings for a lock file against the snapshot at `db_dir`.
pub fn scan(db_dir: &Path, lock: &str, today: time::Date) -> Result<Vec<AdvisoryFinding>> {
    let database = rustsec::Database::open(db_dir).map_err(|e| {
        Error::config(
            "alerts.advisory_db_dir",
            format!(
                "cannot read the advisory-db snapshot at {}: {e}",
                db_dir.display()
            ),
        )
    })?;
    let lockfile: cargo_lock::Lockfile = lock
        .parse()
        .map_err(|e| Error::Invalid(format!("Cargo.lock does not parse: {e}")))?;
    let mut findings: Vec<AdvisoryFinding> = database
        .vulnerabilities(&lockfile)
        .into_iter()
        .filter(|v| v.advisory.withdrawn.is_none())
        .map(|v| {
            let severity = match (&v.advisory.informational, &v.advisory.cvss) {
                (Some(_), _) => "informational".to_string(),
                (None, Some(cvss)) => cvss.severity().as_str().to_string(),
                (None, None) => "medium".to_string(),
            };
            let patched: Vec<String> = v.versions.patched().iter().map(|r| r.to_string()).collect();
            let workaround = workaround_of(&v.advisory.description).unwrap_or_else(|| {
                if patched.is_empty() {
                    "no patched release yet: see the advisory".to_string()
                } else {
                    format!("upgrade {} to {}", v.package.name, patched.join(" or "))
                }
            });
            let fix_due = today + time::Duration::days(fix_within_days(&severity));
            AdvisoryFinding {
                id: v.advisory.id.to_string(),
                package: v.package.name.to_string(),
                version: v.package.version.to_string(),
                title: v.advisory.title.clone(),
                severity,
                workaround,
                fix_due: fix_due.to_string(),
                url: v.advisory.url.as_ref().map(|u| u.to_string()),
            }
        })
        .collect();
    findings.sort_by(|a, b| (&a.id, &a.package, &a.version).cmp(&(&b.id, &b.package, &b.version)));
    findings.dedup();
    Ok(findings)
}

/// A line `Workaround: …` in the advisory's text, if it has one.
fn workaround_of(description: &str) -> Option<String> {
    description.lines().find_map(|line| {
        line.trim()
            .strip_prefix("Workaround:")
            .map(|w| w.trim().to_string())
            .filter(|w| !w.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn snapshot() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/advisory-db")
    }

    #[test]
    fn the_fixture_snapshot_finds_exactly_the_affected_locked_crate() {
        let findings = scan(
            &snapshot(),
            super::super::sbom::CARGO_LOCK,
            date!(2026 - 11 - 26),
        )
        .unwrap();
        assert_eq!(findings.len(), 1, "{findings:?}");
        let hex = &findings[0];
        assert_eq!(hex.id, "RUSTSEC-2026-9901");
        assert_eq!(hex.package, "hex");
        assert_eq!(hex.version, "0.4.3");
        assert_eq!(hex.severity, "high");
        assert_eq!(
            hex.workaround,
            "reject odd-length hex input before decoding it."
        );
        assert_eq!(hex.fix_due, "2026-12-03");
    }

    #[test]
    fn fix_dates_follow_severity() {
        let cases = [
            ("critical", 3),
            ("high", 7),
            ("medium", 30),
            ("low", 90),
            ("informational", 90),
        ];
        for (severity, days) in cases {
            assert_eq!(fix_within_days(severity), days, "{severity}");
        }
    }

    #[test]
    fn a_missing_snapshot_is_a_clear_error() {
        let error = scan(
            Path::new("/nonexistent/advisory-db"),
            super::super::sbom::CARGO_LOCK,
            date!(2026 - 11 - 26),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("advisory_db_dir"), "{error}");
    }
}
