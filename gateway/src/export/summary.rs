//! The patient's readable summary (Japanese first, English beside it): 健診 results over
//! time as tables and small charts (BMI, blood pressure, HbA1c, LDL cholesterol), then
//! medications, immunizations, allergies and conditions, each with its source and date.
//! Built from served resources without I/O; rendered with maud (escaped), charts as inline
//! SVG (no scripts, so the portal's CSP holds).

use std::collections::BTreeMap;

use maud::{html, Markup, DOCTYPE};
use serde_json::Value;

/// A checkup measure followed over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Measure {
    Bmi,
    Systolic,
    Diastolic,
    HbA1c,
    Ldl,
}

impl Measure {
    pub const ALL: [Measure; 5] = [
        Measure::Bmi,
        Measure::Systolic,
        Measure::Diastolic,
        Measure::HbA1c,
        Measure::Ldl,
    ];

    pub fn label_ja(self) -> &'static str {
        match self {
            Measure::Bmi => "BMI",
            Measure::Systolic => "収縮期血圧",
            Measure::Diastolic => "拡張期血圧",
            Measure::HbA1c => "HbA1c",
            Measure::Ldl => "LDLコレステロール",
        }
    }

    pub fn label_en(self) -> &'static str {
        match self {
            Measure::Bmi => "BMI",
            Measure::Systolic => "Systolic blood pressure",
            Measure::Diastolic => "Diastolic blood pressure",
            Measure::HbA1c => "HbA1c",
            Measure::Ldl => "LDL cholesterol",
        }
    }
}

/// 特定健診 item codes (urn:oid:1.2.392.200119.6.1005) by their measure prefix, and LOINC.
pub fn measure_of(system: Option<&str>, code: &str) -> Option<Measure> {
    match system {
        Some("urn:oid:1.2.392.200119.6.1005") => match code.get(..5)? {
            "9N011" => Some(Measure::Bmi),
            "9A751" | "9A752" | "9A755" => Some(Measure::Systolic),
            "9A761" | "9A762" | "9A765" => Some(Measure::Diastolic),
            "3D046" => Some(Measure::HbA1c),
            "3F077" => Some(Measure::Ldl),
            _ => None,
        },
        Some("http://loinc.org") => match code {
            "39156-5" => Some(Measure::Bmi),
            "8480-6" => Some(Measure::Systolic),
            "8462-4" => Some(Measure::Diastolic),
            "4548-4" | "17856-6" => Some(Measure::HbA1c),
            "13457-7" | "18262-6" => Some(Measure::Ldl),
            _ => None,
        },
        _ => None,
    }
}

/// One dated value of a measure.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// `YYYY-MM-DD`.
    pub date: String,
    pub value: f64,
    pub unit: String,
    pub source: String,
}

/// A row of one of the lists (medications, immunizations…).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub date: String,
    pub text: String,
    pub source: String,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub readings: BTreeMap<Measure, Vec<Reading>>,
    pub medications: Vec<Entry>,
    pub immunizations: Vec<Entry>,
    pub allergies: Vec<Entry>,
    pub conditions: Vec<Entry>,
}

impl Summary {
    /// Takes in one served resource (a checkup report Bundle's Observations included).
    pub fn add(&mut self, resource: &Value, source: &str) {
        match resource["resourceType"].as_str() {
            Some("Bundle") => {
                for entry in resource["entry"].as_array().into_iter().flatten() {
                    self.add(&entry["resource"], source);
                }
            }
            Some("Observation") => self.add_observation(resource, source),
            Some("MedicationDispense" | "MedicationRequest" | "MedicationStatement") => {
                let text = concept_text(&resource["medicationCodeableConcept"]);
                let date = first_date(
                    resource,
                    &[
                        "whenHandedOver",
                        "authoredOn",
                        "effectiveDateTime",
                        "dateAsserted",
                    ],
                );
                self.medications.push(Entry {
                    date,
                    text,
                    source: source.into(),
                });
            }
            Some("Immunization") => {
                let text = concept_text(&resource["vaccineCode"]);
                let date = first_date(resource, &["occurrenceDateTime"]);
                self.immunizations.push(Entry {
                    date,
                    text,
                    source: source.into(),
                });
            }
            Some("AllergyIntolerance") => {
                let text = concept_text(&resource["code"]);
                let date = first_date(resource, &["recordedDate", "onsetDateTime"]);
                self.allergies.push(Entry {
                    date,
                    text,
                    source: source.into(),
                });
            }
            Some("Condition") => {
                let text = concept_text(&resource["code"]);
                let date = first_date(resource, &["onsetDateTime", "recordedDate"]);
                self.conditions.push(Entry {
                    date,
                    text,
                    source: source.into(),
                });
            }
            _ => {}
        }
    }

    fn add_observation(&mut self, observation: &Value, source: &str) {
        let Some(value) = observation["valueQuantity"]["value"].as_f64() else {
            return;
        };
        let measure = observation["code"]["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|coding| {
                measure_of(
                    coding["system"].as_str(),
                    coding["code"].as_str().unwrap_or_default(),
                )
            });
        let Some(measure) = measure else { return };
        let date = first_date(observation, &["effectiveDateTime", "issued"]);
        let unit = observation["valueQuantity"]["unit"]
            .as_str()
            .or(observation["valueQuantity"]["code"].as_str())
            .unwrap_or_default()
            .to_string();
        let readings = self.readings.entry(measure).or_default();
        // The same reading from two sources is shown once.
        if !readings.iter().any(|r| r.date == date && r.value == value) {
            readings.push(Reading {
                date,
                value,
                unit,
                source: source.into(),
            });
        }
    }

    /// Sorts every list by date (oldest first for charts, newest first for lists).
    pub fn finish(&mut self) {
        for readings in self.readings.values_mut() {
            readings.sort_by(|a, b| a.date.cmp(&b.date));
        }
        for list in [
            &mut self.medications,
            &mut self.immunizations,
            &mut self.allergies,
            &mut self.conditions,
        ] {
            list.sort_by(|a, b| b.date.cmp(&a.date).then(a.text.cmp(&b.text)));
        }
    }

    /// The printable page.
    pub fn render(&self, patient_label: &str, generated_at: &str) -> Markup {
        html! {
            (DOCTYPE)
            html lang="ja" {
                head {
                    meta charset="utf-8";
                    title { "健康記録のまとめ / Health record summary" }
                    link rel="stylesheet" href="/portal/style.css";
                }
                body {
                    main {
                        h1 { "健康記録のまとめ " span.en { "Health record summary" } }
                        p { (patient_label) "　作成日時 " (generated_at) }
                        h2 { "健診結果の推移 " span.en { "Checkup results over time" } }
                        @if self.readings.is_empty() {
                            p { "健診結果はまだありません。 " span.en { "No checkup results yet." } }
                        }
                        @for measure in Measure::ALL {
                            @if let Some(readings) = self.readings.get(&measure) {
                                section.measure data-measure=(measure.label_en()) {
                                    h3 { (measure.label_ja()) " " span.en { (measure.label_en()) } }
                                    (chart(readings))
                                    table {
                                        thead { tr { th { "日付 " span.en { "Date" } } th { "値 " span.en { "Value" } } th { "取得元 " span.en { "Source" } } } }
                                        tbody {
                                            @for reading in readings {
                                                tr { td { (reading.date) } td { (format_value(reading.value)) " " (reading.unit) } td { (reading.source) } }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        (list("medications", "お薬", "Medications", &self.medications))
                        (list("immunizations", "予防接種", "Immunizations", &self.immunizations))
                        (list("allergies", "アレルギー", "Allergies", &self.allergies))
                        (list("conditions", "病名", "Conditions", &self.conditions))
                    }
                }
            }
        }
    }
}

fn list(id: &str, title_ja: &str, title_en: &str, entries: &[Entry]) -> Markup {
    html! {
        section id=(id) {
            h2 { (title_ja) " " span.en { (title_en) } }
            @if entries.is_empty() {
                p { "記録はありません。 " span.en { "Nothing recorded." } }
            } @else {
                table {
                    thead { tr { th { "日付 " span.en { "Date" } } th { "内容 " span.en { "What" } } th { "取得元 " span.en { "Source" } } } }
                    tbody {
                        @for entry in entries {
                            tr { td { (entry.date) } td { (entry.text) } td { (entry.source) } }
                        }
                    }
                }
            }
        }
    }
}

/// A small line chart of the readings (inline SVG).
pub fn chart(readings: &[Reading]) -> Markup {
    const WIDTH: f64 = 480.0;
    const HEIGHT: f64 = 160.0;
    const PAD: f64 = 24.0;
    if readings.len() < 2 {
        return html! {};
    }
    let (low, high) = readings.iter().fold((f64::MAX, f64::MIN), |(lo, hi), r| {
        (lo.min(r.value), hi.max(r.value))
    });
    let span = if high > low { high - low } else { 1.0 };
    let step = (WIDTH - 2.0 * PAD) / (readings.len() - 1) as f64;
    let points: Vec<(f64, f64)> = readings
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let x = PAD + step * i as f64;
            let y = HEIGHT - PAD - (r.value - low) / span * (HEIGHT - 2.0 * PAD);
            (x, y)
        })
        .collect();
    let path = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect::<Vec<_>>()
        .join(" ");
    html! {
        svg.chart xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT)
            viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } role="img"
            aria-label={ (readings.len()) " readings from " (readings[0].date) } {
            polyline points=(path) fill="none" stroke="currentColor" stroke-width="2" {}
            @for ((x, y), reading) in points.iter().zip(readings) {
                circle cx=(format!("{x:.1}")) cy=(format!("{y:.1}")) r="3" {}
                text x=(format!("{x:.1}")) y=(format!("{:.1}", y - 6.0)) font-size="10" text-anchor="middle" { (format_value(reading.value)) }
            }
        }
    }
}

fn format_value(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn concept_text(concept: &Value) -> String {
    concept["text"]
        .as_str()
        .or_else(|| concept["coding"][0]["display"].as_str())
        .or_else(|| concept["coding"][0]["code"].as_str())
        .unwrap_or("（名称なし）")
        .to_string()
}

fn first_date(resource: &Value, paths: &[&str]) -> String {
    paths
        .iter()
        .find_map(|path| resource[*path].as_str())
        .map(|date| date.get(..10).unwrap_or(date).to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn measures_from_checkup_item_codes_and_loinc() {
        let table = [
            (
                Some("urn:oid:1.2.392.200119.6.1005"),
                "9N011000000000001",
                Some(Measure::Bmi),
            ),
            (
                Some("urn:oid:1.2.392.200119.6.1005"),
                "9A752000000000001",
                Some(Measure::Systolic),
            ),
            (
                Some("urn:oid:1.2.392.200119.6.1005"),
                "9A761000000000001",
                Some(Measure::Diastolic),
            ),
            (
                Some("urn:oid:1.2.392.200119.6.1005"),
                "3D046000001906202",
                Some(Measure::HbA1c),
            ),
            (
                Some("urn:oid:1.2.392.200119.6.1005"),
                "3F077000002327101",
                Some(Measure::Ldl),
            ),
            (
                Some("urn:oid:1.2.392.200119.6.1005"),
                "9N001000000000001",
                None,
            ),
            (Some("http://loinc.org"), "8480-6", Some(Measure::Systolic)),
            (Some("http://loinc.org"), "4548-4", Some(Measure::HbA1c)),
            (None, "8480-6", None),
            (Some("urn:oid:1.2.392.200119.6.1005"), "9N", None),
        ];
        for (system, code, expected) in table {
            assert_eq!(measure_of(system, code), expected, "{system:?} {code}");
        }
    }

    #[test]
    fn a_summary_shows_readings_over_time_and_lists_escaped() {
        let mut summary = Summary::default();
        let bmi = |date: &str, value: f64| {
            json!({"resourceType": "Observation",
                "code": {"coding": [{"system": "urn:oid:1.2.392.200119.6.1005", "code": "9N011000000000001"}]},
                "effectiveDateTime": date, "valueQuantity": {"value": value, "unit": "kg/m2"}})
        };
        let report = json!({"resourceType": "Bundle", "type": "document", "entry": [
            {"resource": bmi("2025-06-01", 23.4)}, {"resource": bmi("2024-06-01", 22.1)}]});
        summary.add(&report, "マイナポータル");
        // The same reading from the hospital too: shown once.
        summary.add(&bmi("2024-06-01", 22.1), "病院");
        summary.add(
            &json!({"resourceType": "MedicationDispense", "whenHandedOver": "2025-01-10",
                "medicationCodeableConcept": {"text": "<b>アムロジピン</b>"}}),
            "薬局",
        );
        summary.finish();
        let readings = &summary.readings[&Measure::Bmi];
        assert_eq!(readings.len(), 2);
        assert_eq!(readings[0].date, "2024-06-01");
        let html = summary.render("患者 p-1", "2026-11-25").into_string();
        assert!(html.contains("BMI") && html.contains("23.4") && html.contains("<svg"));
        assert!(html.contains("&lt;b&gt;アムロジピン&lt;/b&gt;"), "escaped");
        assert!(!html.contains("<script"));
        assert!(html.contains("記録はありません"), "empty lists say so");
    }
}
