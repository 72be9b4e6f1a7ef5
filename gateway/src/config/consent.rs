//! `[consent]`: what recipients may ask consent for, and the limits within which the patient
//! chooses. Defaults are what a patient would expect: nothing pre-chosen, an end date the
//! patient sets (a year offered, two at most), no re-asking for 90 days after a decline.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsentConfig {
    /// The purposes a recipient may ask for; the consent screen shows one control each.
    pub purposes: Vec<PurposeConfig>,
    /// The end date first shown on the consent screen, in days from today.
    pub default_period_days: u32,
    /// The latest end date a patient may choose, in days from today.
    pub max_period_days: u32,
    /// After a decline the same recipient may not ask again for this long, unless what it
    /// asks for changed.
    pub reask_after_decline_days: u32,
    /// The patient is reminded this many days before a consent ends.
    pub remind_before_days: u32,
    /// Version of the privacy notice shown with every request; receipts name it.
    pub notice_version: String,
    /// Who is responsible for the data (the receipts' PII controller).
    pub controller: ControllerConfig,
    /// A dependent's representation ends at this age; the person is then asked to confirm
    /// or withdraw each consent given for them.
    pub age_of_majority: u32,
}

impl Default for ConsentConfig {
    fn default() -> Self {
        ConsentConfig {
            purposes: vec![
                PurposeConfig {
                    code: "PATRQT".into(),
                    system: V3_ACT_REASON.into(),
                    label_ja: "あなた自身の健康管理のため、アプリに表示する".into(),
                    label_en: "Show your data in the app, for your own health care".into(),
                    required: true,
                },
                PurposeConfig {
                    code: "TREAT".into(),
                    system: V3_ACT_REASON.into(),
                    label_ja: "あなたの診療のため、あなたが選んだ医療機関と共有する".into(),
                    label_en: "Share with the clinics you choose, for your treatment".into(),
                    required: false,
                },
                PurposeConfig {
                    code: "HRESCH".into(),
                    system: V3_ACT_REASON.into(),
                    label_ja: "個人が特定されない形に加工して、研究に使う".into(),
                    label_en: "Use for research, after removing what identifies you".into(),
                    required: false,
                },
            ],
            default_period_days: 365,
            max_period_days: 730,
            reask_after_decline_days: 90,
            remind_before_days: 14,
            notice_version: "2026-04".into(),
            controller: ControllerConfig::default(),
            age_of_majority: 18,
        }
    }
}

const V3_ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// One purpose of use a recipient may ask consent for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PurposeConfig {
    pub code: String,
    pub system: String,
    pub label_ja: String,
    pub label_en: String,
    /// Needed for the recipient's basic service. Still never pre-chosen, and always asked
    /// on its own: optional purposes are never bundled with it.
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    pub name: String,
    pub contact: String,
    pub address: String,
    pub email: String,
    pub phone: String,
    pub url: Option<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            name: "PHRゲートウェイ運営者 / PHR gateway operator".into(),
            contact: "個人情報保護管理者 / Privacy officer".into(),
            address: "".into(),
            email: "privacy@localhost".into(),
            phone: "".into(),
            url: None,
        }
    }
}

impl ConsentConfig {
    /// The configured purpose with this code.
    pub fn purpose(&self, code: &str) -> Option<&PurposeConfig> {
        self.purposes.iter().find(|p| p.code == code)
    }

    pub(super) fn check(&self) -> Result<(), (String, String)> {
        if self.purposes.is_empty() {
            return Err((
                "consent.purposes".into(),
                "list at least one purpose".into(),
            ));
        }
        let mut codes: Vec<&str> = self.purposes.iter().map(|p| p.code.as_str()).collect();
        codes.sort_unstable();
        codes.dedup();
        if codes.len() != self.purposes.len() {
            return Err((
                "consent.purposes".into(),
                "purpose codes must differ".into(),
            ));
        }
        if self.purposes.iter().any(|p| {
            p.code.trim().is_empty() || p.label_ja.trim().is_empty() || p.label_en.trim().is_empty()
        }) {
            return Err((
                "consent.purposes".into(),
                "every purpose needs a code and labels in Japanese and English".into(),
            ));
        }
        if self.default_period_days == 0 || self.default_period_days > self.max_period_days {
            return Err((
                "consent.default_period_days".into(),
                "must be at least 1 and at most consent.max_period_days".into(),
            ));
        }
        Ok(())
    }
}
