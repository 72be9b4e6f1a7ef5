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
    eol: String,
    source: String,
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
    let inventory: Inventory = toml::from_str(inventory).map_err(|e| {
        Error::config(
            "alerts.eol_inventory_file",
            format!("not a valid inventory: {e}"),
        )
    })?;
    let mut out = Vec::new();
    for entry in inventory.component {
        let eol = crate::store::parse_day(&entry.eol, "eol").map_err(|_| {
            Error::config(
                "alerts.eol_inventory_file",
                format!("{:?}: eol {:?} is not YYYY-MM-DD", entry.name, entry.eol),
            )
        })?;
        let days_left = (eol - today).whole_days();
        if days_left <= within_days {
            out.push(EolWarning {
                name: entry.name,
                version: entry.version,
                eol: entry.eol,
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
    fn the_shipped_inventory_parses_and_bad_dates_are_refused() {
        assert!(warnings(DEFAULT_INVENTORY, date!(2026 - 01 - 01), 90).is_ok());
        let bad = INVENTORY.replace("2027-03-01", "March 2027");
        let error = warnings(&bad, date!(2026 - 01 - 01), 90)
            .unwrap_err()
            .to_string();
        assert!(error.contains("not YYYY-MM-DD"), "{error}");
    }
}
