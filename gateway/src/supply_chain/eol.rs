//! End-of-life dates of the OS, PostgreSQL, the Rust toolchain and other components
//! (`eol.toml`, with the source of each date): what is within the warning period or past.

use serde::Deserialize;

use crate::error::{Error, Result};

/// The inventory shipped with the gateway.
pub const DEFAULT_INVENTORY: &str = include_str!("../../../eol.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Inventory {
    component: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    version: String,
    /// The last day of support; absent where none is published (most crates), in which
    /// case `support` says what the policy is.
    eol: Option<String>,
    /// The Rust crate this entry is (its package name in `Cargo.lock`), whose `version`
    /// must be the locked one's series.
    #[serde(rename = "crate")]
    crate_name: Option<String>,
    support: Option<String>,
    source: String,
}

/// The crate entries (package name, version series) of an inventory, to be checked against
/// the lock file so the inventory cannot silently describe another version.
pub fn crate_entries(inventory: &str) -> Result<Vec<(String, String)>> {
    Ok(parse(inventory)?
        .component
        .into_iter()
        .filter_map(|entry| entry.crate_name.map(|name| (name, entry.version)))
        .collect())
}

fn parse(inventory: &str) -> Result<Inventory> {
    let inventory: Inventory = toml::from_str(inventory).map_err(|e| {
        Error::config(
            "alerts.eol_inventory_file",
            format!("not a valid inventory: {e}"),
        )
    })?;
    if let Some(entry) = inventory
        .component
        .iter()
        .find(|entry| entry.eol.is_none() && entry.support.is_none())
    {
        return Err(Error::config(
            "alerts.eol_inventory_file",
            format!(
                "{:?} has neither an eol date nor a support statement",
                entry.name
            ),
        ));
    }
    Ok(inventory)
}

/// A component whose end of support is near or past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EolWarning {
    pub name: String,
    pub version: String,
    pub eol: String,
    pub source: String,
    /// Negative once past.
    pub days_left: i64,
}

/// The components within `within_days` of their date, or past it.
pub fn warnings(inventory: &str, today: time::Date, within_days: i64) -> Result<Vec<EolWarning>> {
    let inventory = parse(inventory)?;
    let mut out = Vec::new();
    for entry in inventory.component {
        let Some(day) = entry.eol else { continue };
        let eol = crate::store::parse_day(&day, "eol").map_err(|_| {
            Error::config(
                "alerts.eol_inventory_file",
                format!("{:?}: eol {:?} is not YYYY-MM-DD", entry.name, day),
            )
        })?;
        let days_left = (eol - today).whole_days();
        if days_left <= within_days {
            out.push(EolWarning {
                name: entry.name,
                version: entry.version,
                eol: day,
                source: entry.source,
                days_left,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    const INVENTORY: &str = r#"
[[component]]
name = "A"
version = "1"
eol = "2027-03-01"
source = "https://example.invalid/a"

[[component]]
name = "B"
version = "2"
eol = "2026-11-01"
source = "https://example.invalid/b"
"#;

    #[test]
    fn warns_ninety_days_ahead_and_after() {
        let cases = [
            (date!(2026 - 07 - 01), vec![]),
            (date!(2026 - 08 - 15), vec![("B", 78)]),
            (date!(2026 - 12 - 01), vec![("A", 90), ("B", -30)]),
        ];
        for (today, expected) in cases {
            let got: Vec<(String, i64)> = warnings(INVENTORY, today, 90)
                .unwrap()
                .into_iter()
                .map(|w| (w.name, w.days_left))
                .collect();
            let expected: Vec<(String, i64)> = expected
                .into_iter()
                .map(|(n, d)| (n.to_string(), d))
                .collect();
            assert_eq!(got, expected, "{today}");
        }
    }

    #[test]
    fn crates_without_a_date_need_a_support_statement_and_are_never_warned() {
        let with_crate = format!(
            "{INVENTORY}\n[[component]]\nname = \"C\"\ncrate = \"c\"\nversion = \"0.8\"\nsupport = \"newest minor only\"\nsource = \"https://example.invalid/c\"\n"
        );
        let warned = warnings(&with_crate, date!(2099 - 01 - 01), 90).unwrap();
        assert_eq!(warned.len(), 2, "only the dated entries: {warned:?}");
        assert_eq!(
            crate_entries(&with_crate).unwrap(),
            vec![("c".to_string(), "0.8".to_string())]
        );
        let bare = with_crate.replace("support = \"newest minor only\"\n", "");
        let error = warnings(&bare, date!(2026 - 01 - 01), 90)
            .unwrap_err()
            .to_string();
        assert!(error.contains("neither an eol date"), "{error}");
    }

    /// The shipped inventory describes the crates actually locked: bumping one without
    /// reviewing its entry fails here.
    #[test]
    fn the_shipped_crate_entries_match_the_lock_file() {
        let lock: cargo_lock::Lockfile = include_str!("../../../Cargo.lock").parse().unwrap();
        let entries = crate_entries(DEFAULT_INVENTORY).unwrap();
        assert!(entries.len() >= 8, "{entries:?}");
        for (name, series) in entries {
            let locked: Vec<String> = lock
                .packages
                .iter()
                .filter(|p| p.name.as_str() == name)
                .map(|p| p.version.to_string())
                .collect();
            assert!(
                locked
                    .iter()
                    .any(|v| v == &series || v.starts_with(&format!("{series}."))),
                "eol.toml lists {name} {series}; Cargo.lock has {locked:?}"
            );
        }
    }

    #[test]
    fn the_shipped_inventory_parses_and_bad_dates_are_refused() {
        assert!(warnings(DEFAULT_INVENTORY, date!(2026 - 01 - 01), 90).is_ok());
        let bad = INVENTORY.replace("2027-03-01", "March 2027");
        let error = warnings(&bad, date!(2026 - 01 - 01), 90)
            .unwrap_err()
            .to_string();
        assert!(error.contains("not YYYY-MM-DD"), "{error}");
    }
}
