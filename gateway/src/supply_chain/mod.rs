//! Supply-chain transparency: the SBOM of the build (`sbom`) and the list of
//! subcontractors and component owners (`supply-chain.toml`: who they are, what they do,
//! which data they touch, under which contract, when it was last reviewed).

pub mod advisories;
pub mod eol;
pub mod sbom;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Error, Result};

/// The list shipped with the gateway; a deployment names its own with `supply_chain_file`.
pub const DEFAULT_LIST: &str = include_str!("../../../supply-chain.toml");

/// The list a configuration names: its `supply_chain_file`, or the one shipped.
pub fn list_text(config: &crate::config::Config) -> Result<String> {
    match &config.supply_chain_file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| Error::io(path, e)),
        None => Ok(DEFAULT_LIST.to_string()),
    }
}

/// Reviews older than this are flagged.
const REVIEW_EVERY_DAYS: i64 = 365;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListFile {
    component: Vec<ListedComponent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListedComponent {
    name: String,
    role: String,
    data_touched: String,
    contract: String,
    last_review: String,
}

/// One subcontractor or component owner, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct SupplyChainEntry {
    pub name: String,
    pub role: String,
    pub data_touched: String,
    pub contract: String,
    /// `YYYY-MM-DD`.
    pub last_review: String,
    /// Not reviewed within a year of `today`.
    pub review_overdue: bool,
}

/// Parses and checks a list (every field present and non-empty, real dates).
pub fn parse(text: &str, today: time::Date) -> Result<Vec<SupplyChainEntry>> {
    let file: ListFile = toml::from_str(text)
        .map_err(|e| Error::config("supply_chain_file", format!("not a valid list: {e}")))?;
    file.component
        .into_iter()
        .map(|c| {
            for (field, value) in [
                ("name", &c.name),
                ("role", &c.role),
                ("data_touched", &c.data_touched),
                ("contract", &c.contract),
            ] {
                if value.trim().is_empty() {
                    return Err(Error::config(
                        "supply_chain_file",
                        format!("{:?}: `{field}` is empty", c.name),
                    ));
                }
            }
            let reviewed =
                crate::store::parse_day(&c.last_review, "last_review").map_err(|_| {
                    Error::config(
                        "supply_chain_file",
                        format!(
                            "{:?}: last_review {:?} is not YYYY-MM-DD",
                            c.name, c.last_review
                        ),
                    )
                })?;
            Ok(SupplyChainEntry {
                review_overdue: (today - reviewed).whole_days() > REVIEW_EVERY_DAYS,
                name: c.name,
                role: c.role,
                data_touched: c.data_touched,
                contract: c.contract,
                last_review: c.last_review,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn the_shipped_list_parses_and_flags_old_reviews() {
        let entries = parse(DEFAULT_LIST, date!(2026 - 11 - 26)).unwrap();
        assert!(entries.len() >= 5);
        assert!(entries.iter().all(|e| !e.review_overdue));
        let later = parse(DEFAULT_LIST, date!(2028 - 01 - 01)).unwrap();
        assert!(later.iter().all(|e| e.review_overdue));
    }

    #[test]
    fn bad_lists_are_refused_with_the_reason() {
        let cases = [
            ("[[component]]\nname = \"x\"\n", "missing field"),
            (
                "[[component]]\nname = \"x\"\nrole = \"r\"\ndata_touched = \" \"\ncontract = \"c\"\nlast_review = \"2026-01-01\"\n",
                "`data_touched` is empty",
            ),
            (
                "[[component]]\nname = \"x\"\nrole = \"r\"\ndata_touched = \"d\"\ncontract = \"c\"\nlast_review = \"yesterday\"\n",
                "not YYYY-MM-DD",
            ),
            (
                "[[component]]\nname = \"x\"\nrole = \"r\"\ndata_touched = \"d\"\ncontract = \"c\"\nlast_review = \"2026-01-01\"\nextra = 1\n",
                "unknown field",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text, date!(2026 - 11 - 26)).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
