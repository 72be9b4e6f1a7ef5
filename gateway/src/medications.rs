//! Medications: the same dispensing reported by a hospital (its own MedicationDispense) and
//! by the portal (claims-based 薬剤情報) is stored once, with both sources in its Provenance.
//!
//! Recognition ([`dispensing_keys`]): the same day handed over, the same dispensing
//! institution (保険医療機関・薬局コード) and one drug code in common (YJ, HOT9 or
//! 一般名処方マスタ). A hospital copy carrying YJ and HOT9 therefore meets a portal copy
//! carrying either. Not recognised: an institution named only by a literal reference (no
//! identifier), or two copies with codes from different systems (that needs the MEDIS
//! master, which the gateway does not hold).
//!
//! Every arrival is stored under the reconciled source [`DISPENSING_SOURCE`] with its origin
//! kept in the version (`source|id|version`): the history keeps each source's copy, the
//! patient sees the latest, and a correction from one source (same id, higher version)
//! updates the same resource even when it changes the day or the code, because the record's
//! origin is one of its keys. Two records from the same source are never merged into one.

use phr_adapters::codesystem::canonical_system;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use sqlx::AnyConnection;

use crate::error::Result;
use crate::store::reconciliation::{self, digest, origin_key, KeyKind, NewKey};
use crate::store::resources::NewResource;

/// The source identity's `source` for reconciled dispensings (shared by every sender).
pub const DISPENSING_SOURCE: &str = "dispensed-medication";

/// The 10-digit 保険医療機関・薬局コード, as JP Core / JP-CLINS name it.
const INSTITUTION_CODE_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no";

/// YJ, HOT9 and 一般名処方マスタ, in the order their keys are preferred.
const DRUG_CODE_SYSTEMS: [&str; 3] = [
    "urn:oid:1.2.392.100495.20.2.73",
    "urn:oid:1.2.392.200119.4.403.1",
    "urn:oid:1.2.392.100495.20.2.81",
];

/// The keys under which a MedicationDispense is recognised, most preferred first; empty
/// when it lacks the day, the institution's code or a drug code (then it is not reconciled).
pub fn dispensing_keys(dispense: &Value) -> Vec<String> {
    let Some(day) = dispense
        .get("whenHandedOver")
        .and_then(Value::as_str)
        .and_then(|instant| instant.get(..10))
    else {
        return Vec::new();
    };
    let Some(institution) = institution_code(dispense) else {
        return Vec::new();
    };
    let codings: Vec<(&str, &str)> = dispense
        .pointer("/medicationCodeableConcept/coding")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|coding| {
            Some((
                coding.get("system")?.as_str()?,
                coding.get("code")?.as_str()?.trim(),
            ))
        })
        .filter(|(_, code)| !code.is_empty())
        .collect();
    let mut keys = Vec::new();
    for wanted in DRUG_CODE_SYSTEMS {
        let wanted = canonical_system(wanted);
        for (system, code) in &codings {
            if canonical_system(system) == wanted {
                let key = digest(&["clinical", day, institution, &wanted, code]);
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
    }
    keys
}

fn institution_code(dispense: &Value) -> Option<&str> {
    let wanted = canonical_system(INSTITUTION_CODE_SYSTEM);
    dispense
        .get("performer")?
        .as_array()?
        .iter()
        .filter_map(|performer| performer.pointer("/actor/identifier"))
        .find(|identifier| {
            identifier
                .get("system")
                .and_then(Value::as_str)
                .is_some_and(|system| canonical_system(system) == wanted)
        })
        .and_then(|identifier| identifier.get("value")?.as_str())
        .map(str::trim)
        .filter(|code| !code.is_empty())
}

/// One MedicationDispense of the batch to reconcile, with its keys.
struct Candidate {
    index: usize,
    origin_source: String,
    origin: String,
    clinical: Vec<String>,
}

/// Moves every MedicationDispense of `batch` that can be recognised under the reconciled
/// source: onto the resource an earlier copy (from this or another source) was stored as,
/// or a new one. Runs in the transaction that then stores the batch.
pub async fn reconcile_in(tx: &mut AnyConnection, batch: &mut [NewResource]) -> Result<()> {
    let candidates: Vec<Candidate> = batch
        .iter()
        .enumerate()
        .filter(|(_, new)| {
            new.source.resource_type == "MedicationDispense"
                && new.source.source != DISPENSING_SOURCE
        })
        .filter_map(|(index, new)| {
            let body: Value = serde_json::from_slice(&new.body).ok()?;
            let clinical = dispensing_keys(&body);
            (!clinical.is_empty()).then(|| Candidate {
                index,
                origin_source: new.source.source.clone(),
                origin: origin_key(
                    &new.source.source,
                    &new.source.resource_type,
                    &new.source.source_resource_id,
                ),
                clinical,
            })
        })
        .collect();
    let Some(first) = candidates.first() else {
        return Ok(());
    };
    // A page comes from one instruction, hence one patient.
    let patient_id = batch[first.index].patient_id.clone();
    debug_assert!(candidates
        .iter()
        .all(|c| batch[c.index].patient_id == patient_id));

    let mut wanted: Vec<&str> = candidates
        .iter()
        .flat_map(|c| std::iter::once(&c.origin).chain(&c.clinical))
        .map(String::as_str)
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut known = reconciliation::known_keys(tx, &patient_id, &wanted).await?;
    let targets: Vec<String> = known.values().cloned().collect();
    // Which sources each resource already holds a record from.
    let mut sources_at = reconciliation::origin_sources_at(tx, &patient_id, &targets).await?;

    let mut fresh: Vec<NewKey> = Vec::new();
    for candidate in &candidates {
        let by_origin = known.get(&candidate.origin).cloned();
        let target = by_origin.unwrap_or_else(|| {
            candidate
                .clinical
                .iter()
                .filter_map(|key| known.get(key))
                .find(|target| {
                    !sources_at
                        .get(*target)
                        .is_some_and(|sources| sources.contains(&candidate.origin_source))
                })
                .unwrap_or(&candidate.clinical[0])
                .clone()
        });
        sources_at
            .entry(target.clone())
            .or_default()
            .insert(candidate.origin_source.clone());
        let keys = std::iter::once((&candidate.origin, KeyKind::Origin)).chain(
            candidate
                .clinical
                .iter()
                .map(|key| (key, KeyKind::Clinical)),
        );
        for (key, kind) in keys {
            if !known.contains_key(key) {
                known.insert(key.clone(), target.clone());
                fresh.push(NewKey {
                    match_key: key.clone(),
                    kind,
                    target: target.clone(),
                    origin_source: candidate.origin_source.clone(),
                });
            }
        }
        let new = &mut batch[candidate.index];
        let origin_version = new
            .source
            .version_id
            .clone()
            .unwrap_or_else(|| hex::encode(&Sha256::digest(&new.body)[..16]));
        new.source.version_id = Some(format!(
            "{}|{}|{}",
            new.source.source, new.source.source_resource_id, origin_version
        ));
        new.source.source = DISPENSING_SOURCE.into();
        new.source.source_resource_id = target;
    }
    reconciliation::insert_keys(tx, &patient_id, &fresh).await?;
    Ok(())
}

#[cfg(test)]
mod tests;
