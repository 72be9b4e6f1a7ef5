//! Data categories: the units in which a patient instructs pulls and gives consent, in
//! words a patient understands, each mapped to the FHIR resource types it covers.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataCategory {
    /// 基本情報: name, birth date, sex, contact.
    Demographics,
    /// 検査結果・健診結果: lab results, vital signs, checkup results, reports.
    Observations,
    /// 傷病名.
    Conditions,
    /// アレルギー・副作用.
    Allergies,
    /// 処方・調剤.
    Medications,
    /// 予防接種.
    Immunizations,
    /// 受診歴.
    Encounters,
    /// 文書 (discharge summaries, referral letters, checkup report documents).
    Documents,
    /// 医療費 (医療費通知: what was paid, per month and institution).
    MedicalCosts,
}

impl DataCategory {
    pub const ALL: [DataCategory; 9] = [
        DataCategory::Demographics,
        DataCategory::Observations,
        DataCategory::Conditions,
        DataCategory::Allergies,
        DataCategory::Medications,
        DataCategory::Immunizations,
        DataCategory::Encounters,
        DataCategory::Documents,
        DataCategory::MedicalCosts,
    ];

    /// The FHIR resource types the categories cover, in their order (what a source is
    /// asked to grant).
    pub fn resource_types_of(categories: &[DataCategory]) -> Vec<String> {
        categories
            .iter()
            .flat_map(|c| c.resource_types().iter().map(|t| t.to_string()))
            .collect()
    }

    /// The FHIR resource types in this category.
    pub fn resource_types(self) -> &'static [&'static str] {
        match self {
            DataCategory::Demographics => &["Patient"],
            DataCategory::Observations => &["Observation", "DiagnosticReport"],
            DataCategory::Conditions => &["Condition"],
            DataCategory::Allergies => &["AllergyIntolerance"],
            DataCategory::Medications => &[
                "MedicationRequest",
                "MedicationDispense",
                "MedicationStatement",
                "Medication",
            ],
            DataCategory::Immunizations => &["Immunization"],
            DataCategory::Encounters => &["Encounter"],
            // `Bundle`: a 健康診断結果報告書 document converted from a 特定健診 CDA.
            DataCategory::Documents => &["DocumentReference", "Composition", "Bundle"],
            DataCategory::MedicalCosts => &["ExplanationOfBenefit"],
        }
    }

    /// The category a resource type belongs to; `None` for types no category covers (they
    /// are neither pulled nor disclosed).
    pub fn of_resource_type(resource_type: &str) -> Option<DataCategory> {
        DataCategory::ALL
            .into_iter()
            .find(|c| c.resource_types().contains(&resource_type))
    }

    /// The code used in storage, APIs and receipts.
    pub fn code(self) -> &'static str {
        match self {
            DataCategory::Demographics => "demographics",
            DataCategory::Observations => "observations",
            DataCategory::Conditions => "conditions",
            DataCategory::Allergies => "allergies",
            DataCategory::Medications => "medications",
            DataCategory::Immunizations => "immunizations",
            DataCategory::Encounters => "encounters",
            DataCategory::Documents => "documents",
            DataCategory::MedicalCosts => "medical-costs",
        }
    }

    pub fn from_code(code: &str) -> Option<DataCategory> {
        DataCategory::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Plain Japanese, as shown to patients.
    pub fn label_ja(self) -> &'static str {
        match self {
            DataCategory::Demographics => "基本情報（氏名・生年月日・性別）",
            DataCategory::Observations => "検査結果・健診結果",
            DataCategory::Conditions => "病名",
            DataCategory::Allergies => "アレルギー・副作用",
            DataCategory::Medications => "処方・調剤されたお薬",
            DataCategory::Immunizations => "予防接種",
            DataCategory::Encounters => "受診歴",
            DataCategory::Documents => "文書（退院時サマリー・紹介状・健診結果報告書など）",
            DataCategory::MedicalCosts => "医療費（医療費通知）",
        }
    }

    pub fn label_en(self) -> &'static str {
        match self {
            DataCategory::Demographics => "Basic information (name, birth date, sex)",
            DataCategory::Observations => "Test and checkup results",
            DataCategory::Conditions => "Diagnoses",
            DataCategory::Allergies => "Allergies and adverse reactions",
            DataCategory::Medications => "Prescribed and dispensed medicines",
            DataCategory::Immunizations => "Immunizations",
            DataCategory::Encounters => "Visits",
            DataCategory::Documents => {
                "Documents (discharge summaries, referrals, checkup reports)"
            }
            DataCategory::MedicalCosts => "Medical costs (medical expense notices)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_types_of_several_categories_are_theirs_in_order() {
        assert_eq!(
            DataCategory::resource_types_of(&[DataCategory::Allergies, DataCategory::Demographics]),
            vec!["AllergyIntolerance".to_string(), "Patient".to_string()]
        );
        assert!(DataCategory::resource_types_of(&[]).is_empty());
    }

    #[test]
    fn every_type_belongs_to_exactly_one_category() {
        for category in DataCategory::ALL {
            for t in category.resource_types() {
                assert_eq!(DataCategory::of_resource_type(t), Some(category), "{t}");
            }
        }
        assert_eq!(DataCategory::of_resource_type("AuditEvent"), None);
        assert_eq!(DataCategory::of_resource_type("observation"), None);
    }

    #[test]
    fn codes_round_trip_and_serde_uses_them() {
        for category in DataCategory::ALL {
            assert_eq!(DataCategory::from_code(category.code()), Some(category));
            let json = serde_json_like(category);
            assert_eq!(json, category.code());
        }
        assert_eq!(DataCategory::from_code("everything"), None);
    }

    fn serde_json_like(category: DataCategory) -> String {
        // serde's kebab-case names must equal the storage codes.
        let name = format!("{category:?}");
        let mut out = String::new();
        for (i, ch) in name.chars().enumerate() {
            if ch.is_uppercase() && i > 0 {
                out.push('-');
            }
            out.push(ch.to_ascii_lowercase());
        }
        out
    }
}
