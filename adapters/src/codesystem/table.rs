//! The OID ↔ URL facts, written out by hand so the gateway never depends on a file at run
//! time.
//!
//! Sources, in the order they win when they disagree:
//! 1. the JP Core v1.1.2 example twins (`fixtures/jp-core-1.1.2/{oid,url}`): what JP Core
//!    itself rewrote each OID to;
//! 2. the JP-CLINS v1.5.0 change table 「コード表のsystem値の変更表（OID形式→URL形式）」 and
//!    JP Core's 「OID形式とURL形式に関するマップ表」 (guide-urlmap), which list every OID that
//!    has a URL form (rows marked 「URL表記は使用しない」 or 「関係者調整中」 are left out: those
//!    OIDs keep their `urn:oid:` form);
//! 3. the JP-CLINS v1.5.2 NamingSystem resources (`fixtures/jp-clins-1.5.2/naming-systems`).
//!    Where a NamingSystem names a different URL than 1 or 2 (usually a
//!    `http://jpfhir.jp/fhir/core/CodeSystem/JP_*_CS` form), that URL is kept in
//!    `other_urls`: it names the same system but is not the one we store.
//!
//! The fixture tests check this table against 1 and 3.

/// Whether a `system` names codes or an identifier namespace. Both are rewritten the same
/// way; the distinction is for readers and for callers that want to tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SystemKind {
    /// Used as `Coding.system` (and `Quantity.system` for MERIT-9 units).
    CodeSystem,
    /// Used as `Identifier.system`.
    IdentifierSystem,
}

/// One known code system: its canonical URL and the OIDs (without `urn:oid:`) that name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodeSystemName {
    /// The form the gateway stores.
    pub url: &'static str,
    /// Every OID that names this system, without the `urn:oid:` prefix.
    pub oids: &'static [&'static str],
    /// Human-readable name, as the Japanese specifications call it.
    pub title: &'static str,
    /// Other URLs that published NamingSystems or later specification versions give for
    /// the same system. They are recognised but not rewritten: a URL is already a URL.
    pub other_urls: &'static [&'static str],
    pub kind: SystemKind,
}

/// The table, written in Rust as facts (not loaded from files at run time).
pub fn known_code_systems() -> &'static [CodeSystemName] {
    KNOWN_CODE_SYSTEMS
}

const fn code_system(
    url: &'static str,
    oids: &'static [&'static str],
    title: &'static str,
    other_urls: &'static [&'static str],
) -> CodeSystemName {
    CodeSystemName {
        url,
        oids,
        title,
        other_urls,
        kind: SystemKind::CodeSystem,
    }
}

const fn identifier_system(
    url: &'static str,
    oids: &'static [&'static str],
    title: &'static str,
) -> CodeSystemName {
    CodeSystemName {
        url,
        oids,
        title,
        other_urls: &[],
        kind: SystemKind::IdentifierSystem,
    }
}

static KNOWN_CODE_SYSTEMS: &[CodeSystemName] = &[
    // --- JAMI (日本医療情報学会) ---
    code_system(
        "http://jami.jp/SS-MIX2/CodeSystem/ClinicalDepartment",
        &["1.2.392.200250.2.2.2"],
        "JAMI SS-MIX2 診療科コード表",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_Department_SsMix_CS"],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationUsage",
        // `.20` is what the twins and JP-CLINS use; later JP Core maps list `.20.20`.
        &["1.2.392.200250.2.2.20", "1.2.392.200250.2.2.20.20"],
        "JAMI 用法コード表 16桁版",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationUsageJAMI_CS"],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationUsageAdditional",
        &["1.2.392.200250.2.2.20.22"],
        "JAMI 用法コード表 8桁補足用法コード",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationUsageJAMIAdditional_CS"],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationMethodBasicUsage",
        &["1.2.392.200250.2.2.20.30"],
        "JAMI 用法コード表 基本用法コード1桁",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationMethodJAMIBasicUsage_CS"],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationEventTriggered",
        &["1.2.392.200250.2.2.20.31"],
        "JAMI 用法コード表 イベント用法コード3桁",
        &[],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationBodySiteExternal",
        &["1.2.392.200250.2.2.20.32"],
        "JAMI 用法コード表 外用部位コード3桁",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationBodySiteJAMIExternal_CS"],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationMethodDetailUsage",
        &["1.2.392.200250.2.2.20.40"],
        "JAMI 用法コード表 投与経路区分コード2桁",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationMethodJAMIDetailUsage_CS"],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationMethodDetailOral",
        &["1.2.392.200250.2.2.20.41"],
        "JAMI 用法コード表 内服用法詳細区分コード1桁",
        &[],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationMethodDetailExternal",
        &["1.2.392.200250.2.2.20.42"],
        "JAMI 用法コード表 外用用法詳細区分コード1桁",
        &[],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationMethodDetailInjection",
        &["1.2.392.200250.2.2.20.43"],
        "JAMI 用法コード表 注射用法詳細区分コード1桁",
        &[],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationMethodDetailPouring",
        &["1.2.392.200250.2.2.20.44"],
        "JAMI 用法コード表 注入用法詳細区分コード1桁",
        &[],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationMethodDetailDeviceInjection",
        &["1.2.392.200250.2.2.20.45"],
        "JAMI 用法コード表 時間的要素・機器区分コード1桁",
        &[],
    ),
    code_system(
        "http://jami.jp/CodeSystem/MedicationUsage-12digits",
        &["1.2.392.200250.2.2.21"],
        "JAMI 用法コード表 12桁版（実証実験用）",
        &[],
    ),
    code_system(
        "http://jami.jp/CodeSystem/DrugDispensePreparationMethod",
        &["1.2.392.200250.2.2.30.10"],
        "JAMI 医薬品調剤指示コード",
        &[],
    ),
    // --- MEDIS-DC ---
    code_system(
        "http://medis.or.jp/CodeSystem/master-disease-keyNumber",
        &["1.2.392.200119.4.101.2"],
        "MEDIS 病名マスター 病名管理番号",
        &[],
    ),
    code_system(
        "http://medis.or.jp/CodeSystem/master-disease-exCode",
        &["1.2.392.200119.4.101.6"],
        "MEDIS 病名マスター 病名交換用コード",
        &[],
    ),
    code_system(
        "http://medis.or.jp/CodeSystem/master-disease-modKeyNumber",
        &["1.2.392.200119.4.201.2"],
        "MEDIS 病名マスター 修飾語管理番号",
        &[],
    ),
    code_system(
        "http://medis.or.jp/CodeSystem/master-disease-modExCode",
        &["1.2.392.200119.4.201.5"],
        "MEDIS 病名マスター 修飾語交換用コード",
        &[],
    ),
    code_system(
        "http://medis.or.jp/CodeSystem/master-HOT13",
        &["1.2.392.200119.4.402.1"],
        "MEDIS 医薬品基準番号（HOT13）",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationCodeHOT13_CS"],
    ),
    code_system(
        "http://medis.or.jp/CodeSystem/master-HOT9",
        &["1.2.392.200119.4.403.1", "1.2.392.100495.20.2.74"],
        "MEDIS 医薬品基準番号（HOT9）",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationCodeHOT9_CS"],
    ),
    code_system(
        "http://medis.or.jp/CodeSystem/master-HOT7",
        &["1.2.392.200119.4.403.2"],
        "MEDIS 医薬品処方用番号（HOT7）",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationCodeHOT7_CS"],
    ),
    code_system(
        "http://medis.or.jp/CodeSystem/master-JLAC10-17digits",
        &["1.2.392.200119.4.504"],
        "MEDIS 臨床検査コード（JLAC10）17桁コード表",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_ObservationLabResultCode_CS"],
    ),
    code_system(
        "http://medis.or.jp/CodeSystem/master-nursingAction-16digits",
        &["1.2.392.200119.4.704"],
        "MEDIS 看護行為テーブル（基本看護実践標準用語）",
        &[],
    ),
    code_system(
        "http://medis.or.jp/CodeSystem/master-nursingObservationKeyCode",
        &["1.2.392.200119.4.804"],
        "MEDIS 看護観察テーブル（観察名称管理番号）",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_ObservationVitalSignsCode_CS"],
    ),
    // --- 厚生労働省 (MHLW) code tables, URL-only ones included so they count as known ---
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/ICD10-2013-3digits",
        &[],
        "厚生労働省 WHO-ICD10 2013年版 3桁コード",
        &[],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/ICD10-2013-full",
        &[],
        "厚生労働省 WHO-ICD10 2013年版 全桁コード",
        &["http://www.mhlw.go.jp/toukei/sippei/2013/ICD10-JP"],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationUsage_ePrescription",
        &[],
        "電子処方箋管理サービス 処方用法マスタ",
        &[],
    ),
    // 厚労省処方箋CDA記述仕様 第1版の表
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationForm",
        &["1.2.392.100495.20.2.21"],
        "剤形区分コード",
        &[],
    ),
    code_system(
        // The twins (JP Core 1.1.2) and the JP-CLINS 1.5.0 table use this URL; later JP Core
        // maps and the JP-CLINS 1.5.2 examples spell it `...StrengthStrengthType`.
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationIngredientStrengthType",
        &["1.2.392.100495.20.2.22"],
        "力価区分コード",
        &[
            "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationIngredientStrengthStrengthType",
            "http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationIngredientStrengthStrengthType_CS",
        ],
    ),
    code_system(
        // "Prohibitted" is the published spelling.
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationSubstitutionProhibittedCategory",
        &["1.2.392.100495.20.2.41"],
        "後発品変更不可コード",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationSubstitutionNotAllowedReason_CS"],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/RequestCheckRemainingMedicine",
        &["1.2.392.100495.20.2.42"],
        "残薬確認指示コード",
        &[],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationRequestDepartment",
        &["1.2.392.100495.20.2.51"],
        "診療科コード（処方箋）",
        &[],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/InsuranceMajorCategory",
        &["1.2.392.100495.20.2.61"],
        "保険種別コード",
        &[],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/InsuredPersonCategory",
        &["1.2.392.100495.20.2.62"],
        "被保険者区分コード",
        &[],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationInsuredPersonClass",
        &["1.2.392.100495.20.2.63"],
        "患者一部負担コード",
        &[],
    ),
    code_system(
        "http://capstandard.jp/iyaku.info/CodeSystem/YJ-code",
        &["1.2.392.100495.20.2.73"],
        "個別医薬品コード（YJコード）",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationCodeYJ_CS"],
    ),
    code_system(
        "http://capstandard.jp/CodeSystem/KikakubetsuYakuzaiSeibun",
        &[],
        "規格別薬剤成分コード",
        &[],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationGeneralOrderCode",
        &["1.2.392.100495.20.2.81"],
        "一般名処方マスタ",
        &[],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationUnitMERIT9Code",
        &["1.2.392.100495.20.2.101"],
        "医薬品単位略号（MERIT-9）",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationUnitMERIT9_CS"],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/PrefectureNo-2digits",
        &["1.2.392.100495.20.3.21"],
        "都道府県番号",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_PrefectureNumber_CS"],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/mhlw/CodeSystem/MedicationFeeScoreType",
        &["1.2.392.100495.20.3.22"],
        "点数表番号",
        &["http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicalFeeScoreType_CS"],
    ),
    // --- 厚生労働省 identifier namespaces. The OIDs that carry a per-institution branch
    // (処方箋ID 20.3.11.y, 患者ID 20.3.51.x, 医師ID 20.3.41.x, …) have no URL form and are
    // deliberately absent: only exact OIDs match, so they are never rewritten. ---
    identifier_system(
        "http://jpfhir.jp/fhir/core/mhlw/IdSystem/MedicalOrganizationID",
        &["1.2.392.100495.20.3.23"],
        "医療機関コード（7桁）",
    ),
    identifier_system(
        "http://jpfhir.jp/fhir/core/mhlw/IdSystem/medicalRegistrationNumber",
        &["1.2.392.100495.20.3.31"],
        "医籍登録番号",
    ),
    identifier_system(
        "http://jpfhir.jp/fhir/core/mhlw/IdSystem/InsurerNumber",
        &["1.2.392.100495.20.3.61"],
        "保険者番号",
    ),
    identifier_system(
        "http://jpfhir.jp/fhir/core/mhlw/IdSystem/InsuredPersonSymbol",
        &["1.2.392.100495.20.3.62"],
        "被保険者証記号",
    ),
    identifier_system(
        "http://jpfhir.jp/fhir/core/mhlw/IdSystem/InsuredPersonNumber",
        &["1.2.392.100495.20.3.63"],
        "被保険者証番号",
    ),
    identifier_system(
        "http://jpfhir.jp/fhir/core/mhlw/IdSystem/InsuredPersonSubnumber",
        &[],
        "被保険者証番号 枝番",
    ),
    identifier_system(
        "http://jpfhir.jp/fhir/core/mhlw/IdSystem/PublicPayerNumber",
        &["1.2.392.100495.20.3.71"],
        "公費負担者番号",
    ),
    identifier_system(
        "http://jpfhir.jp/fhir/core/mhlw/IdSystem/PublicInsuredPersonNumber",
        &["1.2.392.100495.20.3.72"],
        "公費受給者番号",
    ),
    identifier_system(
        super::RP_NUMBER_SYSTEM,
        &["1.2.392.100495.20.3.81"],
        "RP番号",
    ),
    identifier_system(
        super::ORDER_IN_RP_SYSTEM,
        &["1.2.392.100495.20.3.82"],
        "RP内の順序を示す連番",
    ),
    // --- JP Core code systems known only through their NamingSystems ---
    code_system(
        "http://jpfhir.jp/fhir/core/CodeSystem/route-codes",
        &[
            "1.2.392.100495.20.2.34",
            "2.16.840.1.113883.3.1937.777.10.5.162",
        ],
        "投与経路（HL7 V2 使用者定義表0162）",
        &[],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationCodeCommon_CS",
        &["1.2.392.100495.20.1.81"],
        "JP Core MedicationCode Common",
        &[],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/CodeSystem/JP_EndoscopyTerminologyCodesJED_CS",
        &["1.2.392.200270.4.1000.1"],
        "JED (Japan Endoscopy Database) 内視鏡用語コード",
        &[],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/CodeSystem/JP_Microbiology_AntiMicrobialDrug_CS",
        &["1.2.392.100495.10.3.100.5.11.5.2"],
        "微生物学的検査 抗菌薬コード（JANIS）",
        &[],
    ),
    code_system(
        "http://jpfhir.jp/fhir/core/CodeSystem/JP_Microbiology_InfectiousAgent_CS",
        &["1.2.392.100495.10.3.100.5.27.6.1"],
        "微生物学的検査 感染性物質コード（JANIS）",
        &[],
    ),
];
