//! The typed content of one 特定健診情報ファイル (hc08 CDA), as read by [`super::parse`].

/// A code with its code system OID (defaults from the XSD already applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    pub code: String,
    pub system: Option<String>,
    pub display: Option<String>,
}

/// An HL7 instance identifier (`root` OID + `extension`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceId {
    pub root: String,
    pub extension: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Address {
    pub postal_code: Option<String>,
    /// The address text without the postal code.
    pub text: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patient {
    /// Name in kanji (or whatever non-kana name the document carries).
    pub name: Option<String>,
    /// Name in katakana (`use="SYL"`, or a name written only in kana).
    pub name_kana: Option<String>,
    /// `YYYY-MM-DD`.
    pub birth_date: Option<String>,
    /// 1 male, 2 female (1.2.392.200119.6.1104).
    pub sex: Option<Code>,
    pub address: Address,
}

/// 被保険者証等: the patient's insurance identifiers.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Insurance {
    /// 保険者番号 (1.2.392.200119.6.101).
    pub insurer_number: Option<String>,
    /// 被保険者証等記号 (1.2.392.200119.6.204).
    pub symbol: Option<String>,
    /// 被保険者証等番号 (1.2.392.200119.6.205).
    pub number: Option<String>,
    /// 枝番 (1.2.392.200119.6.211).
    pub branch: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Organization {
    /// 機関番号 (10 digits, 1.2.392.200119.6.102).
    pub number: Option<String>,
    pub name: Option<String>,
    pub telecom: Option<String>,
    pub address: Address,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Author {
    /// `YYYY-MM-DD`.
    pub time: Option<String>,
    pub organization: Organization,
}

/// 受診券 (the checkup voucher the insurer issued), when the document names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Voucher {
    pub number: Option<String>,
    /// `YYYY-MM-DD`.
    pub valid_until: Option<String>,
}

/// The value of one observation, by `xsi:type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObservationValue {
    /// PQ: the decimal exactly as written, and the unit.
    Quantity { value: String, unit: Option<String> },
    /// CD / CO / CE: `xsi_type` says which.
    Coded { xsi_type: String, code: Code },
    /// ST.
    Text(String),
    /// Any other type (e.g. IVL_PQ), kept as its type name and attribute/text summary.
    Other { xsi_type: String, raw: String },
    /// `nullFlavor` on the value (e.g. `NI`, `UNK`): not measured or unknown.
    Null {
        xsi_type: Option<String>,
        null_flavor: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceRange {
    pub low: Option<String>,
    pub high: Option<String>,
    pub unit: Option<String>,
}

/// One result (`observation`), possibly a group (一連検査グループ) with members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub code: Code,
    /// `nullFlavor` on the observation itself.
    pub null_flavor: Option<String>,
    pub value: Option<ObservationValue>,
    /// `YYYY-MM-DD`, when the observation has its own time.
    pub effective_date: Option<String>,
    pub methods: Vec<Code>,
    pub interpretations: Vec<Code>,
    pub reference_range: Option<ReferenceRange>,
    /// Members through `entryRelationship`, with its `typeCode` (COMP, RSON, …).
    pub members: Vec<(String, Observation)>,
    /// 1-based line in the document, for error messages.
    pub line: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub code: Option<Code>,
    pub title: Option<String>,
    pub observations: Vec<Observation>,
}

/// One 特定健診情報ファイル.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckupDocument {
    /// `None` when the document's id is a nullFlavor.
    pub document_id: Option<InstanceId>,
    /// 報告区分 (1.2.392.200119.6.1001).
    pub report_category: Option<Code>,
    /// Document date, `YYYY-MM-DD`.
    pub effective_date: String,
    pub patient: Patient,
    pub insurance: Insurance,
    pub author: Author,
    pub voucher: Option<Voucher>,
    /// プログラム種別 (1.2.392.200119.6.1002).
    pub program: Option<Code>,
    /// 実施日, `YYYY-MM-DD`.
    pub checkup_date: Option<String>,
    /// 実施機関.
    pub institution: Organization,
    pub sections: Vec<Section>,
}

/// What identifies one checkup across sources: the same person's checkup at the same
/// institution on the same day, whichever system sent it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReconciliationKey {
    pub institution_number: Option<String>,
    /// `YYYY-MM-DD` (実施日, or the document date when the checkup date is missing).
    pub checkup_date: String,
    pub insurance: Insurance,
}

impl CheckupDocument {
    pub fn reconciliation_key(&self) -> ReconciliationKey {
        ReconciliationKey {
            institution_number: self.institution.number.clone(),
            checkup_date: self
                .checkup_date
                .clone()
                .unwrap_or_else(|| self.effective_date.clone()),
            insurance: self.insurance.clone(),
        }
    }

    /// All observations, top level first then members, depth-first.
    pub fn observations(&self) -> impl Iterator<Item = &Observation> {
        fn walk<'a>(o: &'a Observation, out: &mut Vec<&'a Observation>) {
            out.push(o);
            for (_, m) in &o.members {
                walk(m, out);
            }
        }
        let mut all = Vec::new();
        for section in &self.sections {
            for o in &section.observations {
                walk(o, &mut all);
            }
        }
        all.into_iter()
    }
}
