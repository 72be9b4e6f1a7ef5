//! The MHLW item table (XMLhc24tab, 第4期): what each 17-digit item code means, which XML
//! data type and unit its value takes, and which code system its coded answers use.
//!
//! The table ships with the repository and is compiled in, so conversion needs no files at
//! run time.

use std::collections::HashMap;
use std::sync::OnceLock;

/// OID of the item code system (JLAC10-based 17-digit codes).
pub const ITEM_CODE_OID: &str = "1.2.392.200119.6.1005";
/// OID of the method code system (XML検査方法コード).
pub const METHOD_CODE_OID: &str = "1.2.392.200119.6.1007";

const TABLE_CSV: &str = include_str!("../../../fixtures/tokutei-cda/code-tables/XMLhc24tab.csv");

/// XML data type of an item's value (`XMLITEM_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// Physical quantity: a decimal number with a unit.
    Pq,
    /// Coded answer from the item's result code system.
    Cd,
    /// Ordinal coded answer (e.g. urine dipstick −, ±, +).
    Co,
    /// Free text.
    St,
}

impl ValueType {
    pub fn as_xsi_type(self) -> &'static str {
        match self {
            ValueType::Pq => "PQ",
            ValueType::Cd => "CD",
            ValueType::Co => "CO",
            ValueType::St => "ST",
        }
    }

    fn from_table(s: &str) -> Option<Self> {
        match s {
            "PQ" => Some(ValueType::Pq),
            "CD" => Some(ValueType::Cd),
            "CO" => Some(ValueType::Co),
            "ST" => Some(ValueType::St),
            _ => None,
        }
    }
}

/// How a member item relates to its 一連検査グループ (`XMLITEM_BATREL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMembership {
    /// Item code of the group's own observation.
    pub group_code: &'static str,
    /// `COMP` for a member result, `RSON`/`RSON1` for a reason.
    pub relation: &'static str,
}

/// One row of the item table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemDefinition {
    pub code: &'static str,
    /// Category number and name (区分), e.g. 10 身体計測.
    pub category_number: u32,
    pub category_name: &'static str,
    pub name: &'static str,
    /// Format such as `NNN.N` (digits before and after the point) or `256` (text length).
    pub format: &'static str,
    pub value_type: ValueType,
    /// Unit as written in the CDA (表示単位), e.g. `mg/dl`.
    pub display_unit: Option<&'static str>,
    /// UCUM code, e.g. `mg/dL`.
    pub ucum_unit: Option<&'static str>,
    /// Method code (1.2.392.200119.6.1007) the item implies, with its name.
    pub method_code: Option<&'static str>,
    pub method_name: Option<&'static str>,
    /// OID of the coded answers' code system (`urn:oid:` + this in FHIR).
    pub result_code_oid: Option<&'static str>,
    pub group: Option<GroupMembership>,
    /// Item this one qualifies (e.g. 具体的な既往歴 qualifies 既往歴).
    pub depends_on: Option<&'static str>,
}

impl ItemDefinition {
    /// Largest number of digits before and after the decimal point a PQ value may have.
    pub fn pq_digits(&self) -> Option<(usize, usize)> {
        let (int, frac) = match self.format.split_once('.') {
            Some((i, f)) => (i, f),
            None => (self.format, ""),
        };
        let all_n = |s: &str| s.chars().all(|c| c == 'N');
        (!int.is_empty() && all_n(int) && all_n(frac)).then_some((int.len(), frac.len()))
    }

    /// Longest text an ST value may have (the format is a character count).
    pub fn max_text_len(&self) -> Option<usize> {
        self.format.parse().ok()
    }

    /// Longest code a CD/CO answer may have (the format is `N`, `NN`).
    pub fn max_code_len(&self) -> Option<usize> {
        self.format
            .chars()
            .all(|c| c == 'N')
            .then_some(self.format.len())
    }
}

/// The whole item table, indexed by item code.
#[derive(Debug)]
pub struct ItemTable {
    by_code: HashMap<&'static str, ItemDefinition>,
    in_order: Vec<&'static str>,
}

impl ItemTable {
    /// The compiled-in table, loaded once.
    pub fn get() -> &'static ItemTable {
        static TABLE: OnceLock<ItemTable> = OnceLock::new();
        TABLE.get_or_init(|| ItemTable::from_csv(TABLE_CSV))
    }

    pub fn lookup(&self, code: &str) -> Option<&ItemDefinition> {
        self.by_code.get(code)
    }

    /// Items in the table's output order.
    pub fn iter(&self) -> impl Iterator<Item = &ItemDefinition> {
        self.in_order
            .iter()
            .filter_map(|code| self.by_code.get(code))
    }

    pub fn len(&self) -> usize {
        self.by_code.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_code.is_empty()
    }

    /// Parses the table: three header lines (column numbers, column names, Japanese names),
    /// then one item per line. The file has no quoted fields. Rows that cannot be read are
    /// skipped; the tests check that every row of the shipped table is read.
    fn from_csv(csv: &'static str) -> ItemTable {
        let csv = csv.strip_prefix('\u{feff}').unwrap_or(csv);
        let mut by_code = HashMap::new();
        let mut in_order = Vec::new();
        for line in csv.lines().skip(3) {
            let f: Vec<&'static str> = line.split(',').collect();
            if f.len() < 31 {
                continue;
            }
            let Some(value_type) = ValueType::from_table(f[18].trim()) else {
                continue;
            };
            let opt = |s: &'static str| {
                let s = s.trim();
                (!s.is_empty()).then_some(s)
            };
            let code = f[15].trim();
            let group = match (opt(f[23]), opt(f[24])) {
                (Some(group_code), Some(relation)) => Some(GroupMembership {
                    group_code,
                    relation,
                }),
                _ => None,
            };
            let definition = ItemDefinition {
                code,
                category_number: f[0].trim().parse().unwrap_or(0),
                category_name: f[1].trim(),
                name: f[16].trim(),
                format: f[17].trim(),
                value_type,
                display_unit: opt(f[19]),
                ucum_unit: opt(f[20]),
                method_code: opt(f[26]),
                method_name: opt(f[27]),
                result_code_oid: opt(f[29]),
                group,
                depends_on: opt(f[25]),
            };
            if by_code.insert(code, definition).is_none() {
                in_order.push(code);
            }
        }
        ItemTable { by_code, in_order }
    }
}
