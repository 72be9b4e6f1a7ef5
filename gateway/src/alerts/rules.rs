//! The alert rules: pure functions of a window of parsed audit events and a few facts
//! (verification, shipping, credential dates), no I/O. Each raised alert carries a dedup key
//! naming its occurrence — rule, subject, occurrence window — so evaluating the same events
//! again, or more events of the same burst, raises nothing new.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use crate::audit::access_log::AccessorKind;
use crate::audit::search::ParsedLeaf;
use crate::audit::EventKind;

/// Failed sign-ins are counted within this sliding window.
pub const FAILED_LOGIN_WINDOW_MILLIS: i64 = 60_000;
const DAY_MILLIS: i64 = 86_400_000;
/// Japan Standard Time: no daylight saving, so a fixed offset is exact.
const JST_OFFSET_MINUTES: i64 = 9 * 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    FailedLogins,
    ManyPatientsRead,
    UnusualHours,
    BreakGlass,
    VerifyFailure,
    ShippingLag,
    ExpiringCredential,
    /// A RustSec advisory affects a crate in the build.
    Vulnerability,
    /// A component's end of support is near or past.
    EndOfLife,
    /// Retention refused to delete generations: the live database looked encrypted or
    /// corrupt.
    BackupPruneRefused,
    /// Fewer backup generations are verified-good than required.
    BackupVerifiedGenerations,
}

impl Rule {
    pub const ALL: [Rule; 11] = [
        Rule::FailedLogins,
        Rule::ManyPatientsRead,
        Rule::UnusualHours,
        Rule::BreakGlass,
        Rule::VerifyFailure,
        Rule::ShippingLag,
        Rule::ExpiringCredential,
        Rule::Vulnerability,
        Rule::EndOfLife,
        Rule::BackupPruneRefused,
        Rule::BackupVerifiedGenerations,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Rule::FailedLogins => "failed-logins",
            Rule::ManyPatientsRead => "many-patients-read",
            Rule::UnusualHours => "unusual-hours",
            Rule::BreakGlass => "break-glass",
            Rule::VerifyFailure => "verify-failure",
            Rule::ShippingLag => "shipping-lag",
            Rule::ExpiringCredential => "expiring-credential",
            Rule::Vulnerability => "vulnerability",
            Rule::EndOfLife => "end-of-life",
            Rule::BackupPruneRefused => "backup-prune-refused",
            Rule::BackupVerifiedGenerations => "backup-verified-generations",
        }
    }

    /// Whether institutions and recipients with a registered webhook are told as well as
    /// operators: what concerns the software they rely on (2省GL asks providers to push
    /// vulnerability and end-of-support information to institutions, not wait to be asked).
    pub fn tells_institutions(self) -> bool {
        matches!(self, Rule::Vulnerability | Rule::EndOfLife)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn code(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// An alert a rule raised. The summary is PHI-free: opaque account and client ids, counts
/// and times, never a patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaisedAlert {
    pub rule: Rule,
    pub severity: Severity,
    pub dedup_key: String,
    pub summary: String,
    /// When the occurrence was first and last seen (Unix milliseconds).
    pub first_seen_millis: i64,
    pub last_seen_millis: i64,
}

/// Local minutes of the day during which reads are expected, `[start, end)`; an end before
/// the start spans midnight, an end equal to the start is the whole day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusinessHours {
    pub start_minute: u32,
    pub end_minute: u32,
}

impl BusinessHours {
    /// Parses `HH:MM`.
    pub fn minute_of(text: &str) -> Option<u32> {
        let (hours, minutes) = text.split_once(':')?;
        if hours.len() != 2 || minutes.len() != 2 {
            return None;
        }
        let (hours, minutes): (u32, u32) = (hours.parse().ok()?, minutes.parse().ok()?);
        (hours < 24 && minutes < 60).then_some(hours * 60 + minutes)
    }

    pub fn contains(&self, minute_of_day: u32) -> bool {
        if self.start_minute == self.end_minute {
            true
        } else if self.start_minute < self.end_minute {
            (self.start_minute..self.end_minute).contains(&minute_of_day)
        } else {
            minute_of_day >= self.start_minute || minute_of_day < self.end_minute
        }
    }
}

/// The minute of the day in Japan for a Unix time in milliseconds.
pub fn jst_minute_of_day(millis: i64) -> u32 {
    (millis.div_euclid(60_000) + JST_OFFSET_MINUTES).rem_euclid(24 * 60) as u32
}

fn hh_mm(minute: u32) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds {
    /// Failed sign-ins within a minute on one account that raise an alert.
    pub failed_logins_per_account: u32,
    /// Failed sign-ins within a minute over all accounts (and unknown names).
    pub failed_logins_overall: u32,
    /// A client or operator reading more distinct patients than this…
    pub patients_read_max: u32,
    /// …within this window raises an alert.
    pub patients_read_window_millis: i64,
    pub business_hours: BusinessHours,
    /// One alert per rule and subject per occurrence window of this length.
    pub occurrence_millis: i64,
    pub shipping_max_leaves_behind: u64,
    pub shipping_max_seconds_since_success: u64,
    /// Warn this many days before a certificate expires or a key reaches its maximum age.
    pub expiry_warning_days: i64,
    pub signing_key_max_age_days: i64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            failed_logins_per_account: 10,
            failed_logins_overall: 10,
            patients_read_max: 20,
            patients_read_window_millis: 10 * 60_000,
            business_hours: BusinessHours {
                start_minute: 7 * 60,
                end_minute: 22 * 60,
            },
            occurrence_millis: 60 * 60_000,
            shipping_max_leaves_behind: 10_000,
            shipping_max_seconds_since_success: 900,
            expiry_warning_days: 30,
            signing_key_max_age_days: 365,
        }
    }
}

impl Thresholds {
    /// How much history the event rules look at.
    pub fn window_millis(&self) -> i64 {
        self.patients_read_window_millis
            .max(FAILED_LOGIN_WINDOW_MILLIS)
    }
}

/// How far audit shipping lags: leaves not yet shipped, and seconds since the last
/// successful shipment (`None`: none yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShippingLag {
    pub leaves_behind: u64,
    pub seconds_since_success: Option<u64>,
}

/// An audit verification that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyFailure {
    pub detected_millis: i64,
    /// What failed, PHI-free (leaf indices, tree sizes).
    pub reason: String,
}

/// A signing key and when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyAge {
    pub name: String,
    pub created_millis: i64,
}

/// Facts the rules take besides the events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub now_millis: i64,
    pub verify_failure: Option<VerifyFailure>,
    pub shipping_lag: Option<ShippingLag>,
    /// The TLS certificate's notAfter (Unix milliseconds).
    pub tls_not_after_millis: Option<i64>,
    pub signing_keys: Vec<SigningKeyAge>,
    /// Advisories affecting the build (from the local advisory-db snapshot).
    pub advisories: Vec<crate::supply_chain::advisories::AdvisoryFinding>,
    /// Components near or past their end of support.
    pub end_of_life: Vec<crate::supply_chain::eol::EolWarning>,
    /// Backup generations verified-good, when backups are configured.
    pub backup_verified: Option<BackupVerified>,
}

/// The backup generations whose latest verification passed (not deleted since).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupVerified {
    pub good: Vec<String>,
    pub required: u64,
    /// When the newest verification (of any result) was recorded; `None` before the first.
    pub last_verification_millis: Option<i64>,
}

/// Every alert the events and facts raise, each once.
pub fn evaluate(events: &[ParsedLeaf], facts: &Facts, thresholds: &Thresholds) -> Vec<RaisedAlert> {
    let mut raised = Vec::new();
    raised.extend(failed_logins(events, thresholds));
    raised.extend(many_patients_read(events, thresholds));
    raised.extend(unusual_hours(events, thresholds));
    raised.extend(break_glass(events, thresholds));
    raised.extend(verify_failure(facts));
    raised.extend(shipping_lag(facts, thresholds));
    raised.extend(expiring_credentials(facts, thresholds));
    raised.extend(vulnerabilities(facts));
    raised.extend(end_of_life(facts));
    raised.extend(backup_prune_refused(events, thresholds));
    raised.extend(backup_verified_generations(facts));
    raised
}

/// Whether an event is a refused prune (see `backup::generations::PRUNE_REFUSED`).
pub fn is_backup_prune_refused(event: &ParsedLeaf) -> bool {
    event.kind == Some(EventKind::SecurityConfiguration)
        && event.failed
        && event
            .detail
            .as_deref()
            .is_some_and(|d| d.starts_with(crate::backup::generations::PRUNE_REFUSED))
}

/// One critical alert per occurrence window in which pruning was refused.
fn backup_prune_refused(events: &[ParsedLeaf], thresholds: &Thresholds) -> Vec<RaisedAlert> {
    let mut occurrences: BTreeMap<i64, Occurrence> = BTreeMap::new();
    for event in events.iter().filter(|e| is_backup_prune_refused(e)) {
        let t = event.recorded_millis;
        occurrences
            .entry(occurrence_start(t, thresholds.occurrence_millis))
            .or_insert(Occurrence::at(t, 0))
            .include(t);
    }
    occurrences
        .into_iter()
        .map(|(bucket, seen)| RaisedAlert {
            rule: Rule::BackupPruneRefused,
            severity: Severity::Critical,
            dedup_key: format!("{}:{bucket}", Rule::BackupPruneRefused.code()),
            summary: "backup retention refused to delete generations: the live database looks \
                      encrypted or corrupt; check it before anything else"
                .into(),
            first_seen_millis: seen.first,
            last_seen_millis: seen.last,
        })
        .collect()
}

/// While fewer generations than required are verified-good. The key names the set of good
/// generations and the newest verification, so the same shortfall raises one alert until
/// the next verification (a drill that did not heal it reminds once more); once healed
/// nothing is raised, and a later shortfall raises anew.
fn backup_verified_generations(facts: &Facts) -> Option<RaisedAlert> {
    let verified = facts.backup_verified.as_ref()?;
    let good = verified.good.len() as u64;
    if good >= verified.required {
        return None;
    }
    let mut names = verified.good.clone();
    names.sort();
    Some(RaisedAlert {
        rule: Rule::BackupVerifiedGenerations,
        severity: if good == 0 {
            Severity::Critical
        } else {
            Severity::Warning
        },
        dedup_key: format!(
            "{}:{}",
            Rule::BackupVerifiedGenerations.code(),
            short_hash(&format!(
                "{}@{}",
                names.join(","),
                verified.last_verification_millis.unwrap_or(0)
            ))
        ),
        summary: format!(
            "{good} backup generation(s) verified-good, fewer than {}: run phr-gateway backup drill",
            verified.required
        ),
        first_seen_millis: facts.now_millis,
        last_seen_millis: facts.now_millis,
    })
}

/// One notification per advisory and affected crate version, ever (the key has no time).
fn vulnerabilities(facts: &Facts) -> Vec<RaisedAlert> {
    facts
        .advisories
        .iter()
        .map(|finding| RaisedAlert {
            rule: Rule::Vulnerability,
            severity: if matches!(finding.severity.as_str(), "critical" | "high") {
                Severity::Critical
            } else {
                Severity::Warning
            },
            dedup_key: format!(
                "{}:{}:{}@{}",
                Rule::Vulnerability.code(),
                finding.id,
                finding.package,
                finding.version
            ),
            summary: format!(
                "{} affects {} {} (severity {}): {}; workaround: {}; fix planned by {}",
                finding.id,
                finding.package,
                finding.version,
                finding.severity,
                finding.title,
                finding.workaround,
                finding.fix_due
            ),
            first_seen_millis: facts.now_millis,
            last_seen_millis: facts.now_millis,
        })
        .collect()
}

/// One warning per component and date once within the warning period, and one more (critical)
/// once the date has passed.
fn end_of_life(facts: &Facts) -> Vec<RaisedAlert> {
    facts
        .end_of_life
        .iter()
        .map(|warning| {
            let past = warning.days_left < 0;
            RaisedAlert {
                rule: Rule::EndOfLife,
                severity: if past {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                dedup_key: format!(
                    "{}:{}:{}:{}:{}",
                    Rule::EndOfLife.code(),
                    warning.name,
                    warning.version,
                    warning.eol,
                    if past { "past" } else { "near" }
                ),
                summary: if past {
                    format!(
                        "{} {} is past its end of support ({}; source: {})",
                        warning.name, warning.version, warning.eol, warning.source
                    )
                } else {
                    format!(
                        "{} {} reaches its end of support in {} day(s), on {} (source: {})",
                        warning.name,
                        warning.version,
                        warning.days_left,
                        warning.eol,
                        warning.source
                    )
                },
                first_seen_millis: facts.now_millis,
                last_seen_millis: facts.now_millis,
            }
        })
        .collect()
}

fn is_failed_login(event: &ParsedLeaf) -> bool {
    event.kind == Some(EventKind::Login) && event.failed
}

/// A read of patient data by someone other than the patient's side: a recipient's app or
/// an operator.
fn is_read_by_client_or_operator(event: &ParsedLeaf) -> bool {
    matches!(
        event.kind,
        Some(EventKind::Read | EventKind::Search | EventKind::Export)
    ) && !event.failed
        && event.patient_id.is_some()
        && matches!(
            event.actor_kind,
            AccessorKind::Client | AccessorKind::Operator
        )
}

fn actor_label(event: &ParsedLeaf) -> String {
    let kind = match event.actor_kind {
        AccessorKind::Client => "client",
        AccessorKind::Operator => "operator",
        AccessorKind::Account => "account",
        AccessorKind::System => "system",
        AccessorKind::Unauthenticated => "unauthenticated",
    };
    match &event.actor_id {
        Some(id) => format!("{kind} {id}"),
        None => kind.to_string(),
    }
}

/// The times (sorted) at which a sliding window of `window` held at least `threshold`
/// of `times` (sorted), i.e. each `t[j]` with `t[j] - t[j - threshold + 1] < window`,
/// with the count in the window ending there.
fn crowded_moments(times: &[i64], threshold: usize, window: i64) -> Vec<(i64, usize)> {
    let mut moments = Vec::new();
    if threshold == 0 {
        return moments;
    }
    let mut start = 0;
    for (j, &t) in times.iter().enumerate() {
        while t - times[start] >= window {
            start += 1;
        }
        let count = j + 1 - start;
        if count >= threshold {
            moments.push((t, count));
        }
    }
    moments
}

/// What one occurrence window saw of a subject.
#[derive(Debug, Clone, Copy)]
struct Occurrence {
    first: i64,
    last: i64,
    /// The most events counted at once (or, for grouped events, how many).
    count: usize,
}

impl Occurrence {
    fn at(t: i64, count: usize) -> Self {
        Occurrence {
            first: t,
            last: t,
            count,
        }
    }

    fn include(&mut self, t: i64) {
        self.first = self.first.min(t);
        self.last = self.last.max(t);
    }
}

/// The start of the occurrence window holding `t`.
fn occurrence_start(t: i64, occurrence_millis: i64) -> i64 {
    let occurrence = occurrence_millis.max(1);
    t.div_euclid(occurrence) * occurrence
}

/// Groups trigger moments of one subject into occurrence windows: one alert each.
fn per_occurrence(moments: &[(i64, usize)], occurrence_millis: i64) -> BTreeMap<i64, Occurrence> {
    let mut occurrences: BTreeMap<i64, Occurrence> = BTreeMap::new();
    for &(t, count) in moments {
        let seen = occurrences
            .entry(occurrence_start(t, occurrence_millis))
            .or_insert(Occurrence::at(t, count));
        seen.include(t);
        seen.count = seen.count.max(count);
    }
    occurrences
}

fn failed_logins(events: &[ParsedLeaf], thresholds: &Thresholds) -> Vec<RaisedAlert> {
    let mut by_subject: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for event in events.iter().filter(|e| is_failed_login(e)) {
        by_subject
            .entry(String::new())
            .or_default()
            .push(event.recorded_millis);
        if let (AccessorKind::Account | AccessorKind::Operator, Some(id)) =
            (event.actor_kind, &event.actor_id)
        {
            by_subject
                .entry(id.clone())
                .or_default()
                .push(event.recorded_millis);
        }
    }
    let mut raised = Vec::new();
    for (account, mut times) in by_subject {
        times.sort_unstable();
        let (threshold, subject, who) = if account.is_empty() {
            (
                thresholds.failed_logins_overall,
                "all".to_string(),
                "over all accounts".to_string(),
            )
        } else {
            (
                thresholds.failed_logins_per_account,
                format!("account:{account}"),
                format!("for account {account}"),
            )
        };
        let moments = crowded_moments(&times, threshold as usize, FAILED_LOGIN_WINDOW_MILLIS);
        for (bucket, seen) in per_occurrence(&moments, thresholds.occurrence_millis) {
            raised.push(RaisedAlert {
                rule: Rule::FailedLogins,
                severity: Severity::Warning,
                dedup_key: format!("{}:{subject}:{bucket}", Rule::FailedLogins.code()),
                summary: format!("{} failed sign-ins within a minute {who}", seen.count),
                first_seen_millis: seen.first,
                last_seen_millis: seen.last,
            });
        }
    }
    raised
}

fn many_patients_read(events: &[ParsedLeaf], thresholds: &Thresholds) -> Vec<RaisedAlert> {
    let mut by_actor: BTreeMap<String, Vec<(i64, &str)>> = BTreeMap::new();
    for event in events.iter().filter(|e| is_read_by_client_or_operator(e)) {
        if let Some(patient) = &event.patient_id {
            by_actor
                .entry(actor_label(event))
                .or_default()
                .push((event.recorded_millis, patient));
        }
    }
    let window = thresholds.patients_read_window_millis.max(1);
    let mut raised = Vec::new();
    for (actor, mut reads) in by_actor {
        reads.sort_unstable();
        let mut in_window: HashMap<&str, usize> = HashMap::new();
        let mut start = 0;
        let mut moments = Vec::new();
        for &(t, patient) in &reads {
            *in_window.entry(patient).or_default() += 1;
            while t - reads[start].0 >= window {
                let leaving = reads[start].1;
                if let Some(n) = in_window.get_mut(leaving) {
                    *n -= 1;
                    if *n == 0 {
                        in_window.remove(leaving);
                    }
                }
                start += 1;
            }
            if in_window.len() > thresholds.patients_read_max as usize {
                moments.push((t, in_window.len()));
            }
        }
        for (bucket, seen) in per_occurrence(&moments, thresholds.occurrence_millis) {
            raised.push(RaisedAlert {
                rule: Rule::ManyPatientsRead,
                severity: Severity::Warning,
                dedup_key: format!(
                    "{}:{}:{bucket}",
                    Rule::ManyPatientsRead.code(),
                    actor.replace(' ', ":")
                ),
                summary: format!(
                    "{actor} read {} distinct patients within {} minutes (more than {})",
                    seen.count,
                    window / 60_000,
                    thresholds.patients_read_max
                ),
                first_seen_millis: seen.first,
                last_seen_millis: seen.last,
            });
        }
    }
    raised
}

/// Events of each actor per occurrence window, keyed by (actor, window start).
fn grouped_by_actor<'a>(
    events: impl Iterator<Item = &'a ParsedLeaf>,
    occurrence_millis: i64,
) -> BTreeMap<(String, i64), Occurrence> {
    let mut groups: BTreeMap<(String, i64), Occurrence> = BTreeMap::new();
    for event in events {
        let t = event.recorded_millis;
        let seen = groups
            .entry((actor_label(event), occurrence_start(t, occurrence_millis)))
            .or_insert(Occurrence::at(t, 0));
        seen.include(t);
        seen.count += 1;
    }
    groups
}

fn unusual_hours(events: &[ParsedLeaf], thresholds: &Thresholds) -> Vec<RaisedAlert> {
    let hours = thresholds.business_hours;
    let outside = events.iter().filter(|e| {
        is_read_by_client_or_operator(e) && !hours.contains(jst_minute_of_day(e.recorded_millis))
    });
    grouped_by_actor(outside, thresholds.occurrence_millis)
        .into_iter()
        .map(|((actor, bucket), seen)| RaisedAlert {
            rule: Rule::UnusualHours,
            severity: Severity::Warning,
            dedup_key: format!(
                "{}:{}:{bucket}",
                Rule::UnusualHours.code(),
                actor.replace(' ', ":")
            ),
            summary: format!(
                "{actor} read patient data {} time(s) from {} (+09:00), outside {}–{}",
                seen.count,
                hh_mm(jst_minute_of_day(seen.first)),
                hh_mm(hours.start_minute),
                hh_mm(hours.end_minute)
            ),
            first_seen_millis: seen.first,
            last_seen_millis: seen.last,
        })
        .collect()
}

fn break_glass(events: &[ParsedLeaf], thresholds: &Thresholds) -> Vec<RaisedAlert> {
    let emergency = events.iter().filter(|e| e.emergency_override);
    grouped_by_actor(emergency, thresholds.occurrence_millis)
        .into_iter()
        .map(|((actor, bucket), seen)| RaisedAlert {
            rule: Rule::BreakGlass,
            severity: Severity::Critical,
            dedup_key: format!(
                "{}:{}:{bucket}",
                Rule::BreakGlass.code(),
                actor.replace(' ', ":")
            ),
            summary: format!(
                "break-glass (emergency override) used by {actor}: {} event(s)",
                seen.count
            ),
            first_seen_millis: seen.first,
            last_seen_millis: seen.last,
        })
        .collect()
}

fn short_hash(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

fn verify_failure(facts: &Facts) -> Option<RaisedAlert> {
    let failure = facts.verify_failure.as_ref()?;
    // The same failure found again is the same occurrence.
    Some(RaisedAlert {
        rule: Rule::VerifyFailure,
        severity: Severity::Critical,
        dedup_key: format!(
            "{}:{}",
            Rule::VerifyFailure.code(),
            short_hash(&failure.reason)
        ),
        summary: format!("audit log verification failed: {}", failure.reason),
        first_seen_millis: failure.detected_millis,
        last_seen_millis: failure.detected_millis,
    })
}

fn shipping_lag(facts: &Facts, thresholds: &Thresholds) -> Option<RaisedAlert> {
    let lag = facts.shipping_lag?;
    let too_many = lag.leaves_behind > thresholds.shipping_max_leaves_behind;
    let too_long = match lag.seconds_since_success {
        Some(seconds) => seconds > thresholds.shipping_max_seconds_since_success,
        None => lag.leaves_behind > 0 && too_many,
    };
    if !(too_many || too_long) {
        return None;
    }
    let since = match lag.seconds_since_success {
        Some(seconds) => format!("last success {seconds} s ago"),
        None => "no success yet".to_string(),
    };
    Some(RaisedAlert {
        rule: Rule::ShippingLag,
        severity: Severity::Warning,
        dedup_key: format!(
            "{}:{}",
            Rule::ShippingLag.code(),
            occurrence_start(facts.now_millis, thresholds.occurrence_millis)
        ),
        summary: format!(
            "audit shipping lags: {} leaves behind, {since}",
            lag.leaves_behind
        ),
        first_seen_millis: facts.now_millis,
        last_seen_millis: facts.now_millis,
    })
}

fn expiring_credentials(facts: &Facts, thresholds: &Thresholds) -> Vec<RaisedAlert> {
    let now = facts.now_millis;
    let warning = thresholds.expiry_warning_days.saturating_mul(DAY_MILLIS);
    let mut raised = Vec::new();
    if let Some(not_after) = facts.tls_not_after_millis {
        if not_after - now < warning {
            let expired = not_after <= now;
            raised.push(RaisedAlert {
                rule: Rule::ExpiringCredential,
                severity: if expired {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                dedup_key: format!(
                    "{}:tls-certificate:{not_after}",
                    Rule::ExpiringCredential.code()
                ),
                summary: if expired {
                    format!(
                        "the TLS certificate expired on {}",
                        crate::store::millis_to_rfc3339(not_after)
                    )
                } else {
                    format!(
                        "the TLS certificate expires in {} day(s), on {}",
                        (not_after - now) / DAY_MILLIS,
                        crate::store::millis_to_rfc3339(not_after)
                    )
                },
                first_seen_millis: now,
                last_seen_millis: now,
            });
        }
    }
    let max_age = thresholds
        .signing_key_max_age_days
        .saturating_mul(DAY_MILLIS);
    for key in &facts.signing_keys {
        let due = key.created_millis.saturating_add(max_age);
        if due - now < warning {
            raised.push(RaisedAlert {
                rule: Rule::ExpiringCredential,
                severity: if due <= now {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                dedup_key: format!(
                    "{}:{}:{}",
                    Rule::ExpiringCredential.code(),
                    key.name.replace(' ', "-"),
                    key.created_millis
                ),
                summary: format!(
                    "the {} is {} day(s) old; rotate it by {} (maximum age {} days)",
                    key.name,
                    (now - key.created_millis) / DAY_MILLIS,
                    crate::store::millis_to_rfc3339(due),
                    thresholds.signing_key_max_age_days
                ),
                first_seen_millis: now,
                last_seen_millis: now,
            });
        }
    }
    raised
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2026-11-25 12:00:00 +09:00 (business hours).
    const NOON_JST: i64 = 1_764_039_600_000;

    fn event(kind: EventKind, actor: AccessorKind, actor_id: Option<&str>, at: i64) -> ParsedLeaf {
        ParsedLeaf {
            recorded_millis: at,
            kind: Some(kind),
            failed: false,
            actor_kind: actor,
            actor_id: actor_id.map(str::to_string),
            patient_id: None,
            detail: None,
            emergency_override: false,
        }
    }

    fn failed_login(account: Option<&str>, at: i64) -> ParsedLeaf {
        ParsedLeaf {
            failed: true,
            detail: Some("wrong password".into()),
            ..event(
                EventKind::Login,
                if account.is_some() {
                    AccessorKind::Account
                } else {
                    AccessorKind::Unauthenticated
                },
                account,
                at,
            )
        }
    }

    fn read(actor: AccessorKind, id: &str, patient: &str, at: i64) -> ParsedLeaf {
        ParsedLeaf {
            patient_id: Some(patient.into()),
            ..event(EventKind::Read, actor, Some(id), at)
        }
    }

    fn keys_of(raised: &[RaisedAlert], rule: Rule) -> Vec<String> {
        raised
            .iter()
            .filter(|a| a.rule == rule)
            .map(|a| a.dedup_key.clone())
            .collect()
    }

    #[test]
    fn event_rules_fire_as_the_table_says() {
        let thresholds = Thresholds::default();
        let bucket = NOON_JST.div_euclid(3_600_000) * 3_600_000;
        let ten_failures: Vec<ParsedLeaf> = (0..10)
            .map(|i| failed_login(Some("acc-1"), NOON_JST + i * 5_000))
            .collect();
        let nine_failures = ten_failures[..9].to_vec();
        let ten_spread_out: Vec<ParsedLeaf> = (0..10)
            .map(|i| failed_login(Some("acc-1"), NOON_JST + i * 7_000))
            .collect();
        let ten_unknown_names: Vec<ParsedLeaf> = (0..10)
            .map(|i| failed_login(None, NOON_JST + i * 1_000))
            .collect();
        let twenty_one_patients: Vec<ParsedLeaf> = (0..21)
            .map(|i| {
                read(
                    AccessorKind::Client,
                    "c-1",
                    &format!("p-{i}"),
                    NOON_JST + i * 1000,
                )
            })
            .collect();
        let twenty_patients = twenty_one_patients[..20].to_vec();
        let one_patient_many_times: Vec<ParsedLeaf> = (0..50)
            .map(|i| read(AccessorKind::Client, "c-1", "p-1", NOON_JST + i * 1000))
            .collect();
        let night = NOON_JST - 10 * 3_600_000; // 02:00 JST
        let emergency = ParsedLeaf {
            emergency_override: true,
            ..event(
                EventKind::EmergencyOverride,
                AccessorKind::Operator,
                Some("op-1"),
                NOON_JST,
            )
        };
        let cases: Vec<(&str, Vec<ParsedLeaf>, Rule, Vec<String>)> = vec![
            (
                "ten failures on one account within a minute",
                ten_failures.clone(),
                Rule::FailedLogins,
                vec![
                    format!("failed-logins:all:{bucket}"),
                    format!("failed-logins:account:acc-1:{bucket}"),
                ],
            ),
            ("nine failures", nine_failures, Rule::FailedLogins, vec![]),
            (
                "ten failures over 63 seconds",
                ten_spread_out,
                Rule::FailedLogins,
                vec![],
            ),
            (
                "ten failures for unknown names: overall only",
                ten_unknown_names,
                Rule::FailedLogins,
                vec![format!("failed-logins:all:{bucket}")],
            ),
            (
                "a client reads 21 patients in 21 seconds",
                twenty_one_patients,
                Rule::ManyPatientsRead,
                vec![format!("many-patients-read:client:c-1:{bucket}")],
            ),
            (
                "a client reads 20 patients",
                twenty_patients,
                Rule::ManyPatientsRead,
                vec![],
            ),
            (
                "a client reads one patient fifty times",
                one_patient_many_times,
                Rule::ManyPatientsRead,
                vec![],
            ),
            (
                "an operator reads at 02:00",
                vec![read(AccessorKind::Operator, "op-1", "p-1", night)],
                Rule::UnusualHours,
                vec![format!(
                    "unusual-hours:operator:op-1:{}",
                    night.div_euclid(3_600_000) * 3_600_000
                )],
            ),
            (
                "an operator reads at noon",
                vec![read(AccessorKind::Operator, "op-1", "p-1", NOON_JST)],
                Rule::UnusualHours,
                vec![],
            ),
            (
                "a patient's representative reads at 02:00",
                vec![read(AccessorKind::Account, "acc-2", "p-1", night)],
                Rule::UnusualHours,
                vec![],
            ),
            (
                "break-glass",
                vec![emergency],
                Rule::BreakGlass,
                vec![format!("break-glass:operator:op-1:{bucket}")],
            ),
        ];
        for (name, events, rule, expected) in cases {
            let raised = evaluate(&events, &Facts::default(), &thresholds);
            assert_eq!(keys_of(&raised, rule), expected, "{name}");
            // Evaluating again, or with the events reversed, raises the same.
            let mut reversed = events.clone();
            reversed.reverse();
            assert_eq!(
                evaluate(&reversed, &Facts::default(), &thresholds),
                raised,
                "{name}"
            );
        }
    }

    #[test]
    fn more_of_the_same_burst_is_the_same_occurrence() {
        let thresholds = Thresholds::default();
        let burst: Vec<ParsedLeaf> = (0..30)
            .map(|i| failed_login(Some("acc-1"), NOON_JST + i * 1_000))
            .collect();
        let first = evaluate(&burst[..10], &Facts::default(), &thresholds);
        let later = evaluate(&burst, &Facts::default(), &thresholds);
        assert_eq!(
            keys_of(&first, Rule::FailedLogins),
            keys_of(&later, Rule::FailedLogins)
        );
        let account = later
            .iter()
            .find(|a| a.dedup_key.contains("account"))
            .unwrap();
        assert_eq!(account.first_seen_millis, NOON_JST + 9_000);
        assert_eq!(account.last_seen_millis, NOON_JST + 29_000);
        assert!(
            account.summary.contains("30 failed sign-ins"),
            "{}",
            account.summary
        );
        assert!(!account.summary.contains("p-"), "no patient in a summary");
    }

    #[test]
    fn fact_rules_fire_as_the_table_says() {
        let thresholds = Thresholds::default();
        let now = NOON_JST;
        let day = DAY_MILLIS;
        type Case = (&'static str, Facts, Vec<(Rule, Severity)>);
        let cases: Vec<Case> = vec![
            (
                "nothing to report",
                Facts {
                    now_millis: now,
                    ..Default::default()
                },
                vec![],
            ),
            (
                "a verification failed",
                Facts {
                    now_millis: now,
                    verify_failure: Some(VerifyFailure {
                        detected_millis: now,
                        reason: "leaf 5 was changed".into(),
                    }),
                    ..Default::default()
                },
                vec![(Rule::VerifyFailure, Severity::Critical)],
            ),
            (
                "shipping is a little behind",
                Facts {
                    now_millis: now,
                    shipping_lag: Some(ShippingLag {
                        leaves_behind: 100,
                        seconds_since_success: Some(60),
                    }),
                    ..Default::default()
                },
                vec![],
            ),
            (
                "shipping has not succeeded for an hour",
                Facts {
                    now_millis: now,
                    shipping_lag: Some(ShippingLag {
                        leaves_behind: 100,
                        seconds_since_success: Some(3600),
                    }),
                    ..Default::default()
                },
                vec![(Rule::ShippingLag, Severity::Warning)],
            ),
            (
                "shipping is far behind",
                Facts {
                    now_millis: now,
                    shipping_lag: Some(ShippingLag {
                        leaves_behind: 20_000,
                        seconds_since_success: None,
                    }),
                    ..Default::default()
                },
                vec![(Rule::ShippingLag, Severity::Warning)],
            ),
            (
                "the certificate expires in 10 days",
                Facts {
                    now_millis: now,
                    tls_not_after_millis: Some(now + 10 * day),
                    ..Default::default()
                },
                vec![(Rule::ExpiringCredential, Severity::Warning)],
            ),
            (
                "the certificate expires in 90 days",
                Facts {
                    now_millis: now,
                    tls_not_after_millis: Some(now + 90 * day),
                    ..Default::default()
                },
                vec![],
            ),
            (
                "the certificate has expired",
                Facts {
                    now_millis: now,
                    tls_not_after_millis: Some(now - day),
                    ..Default::default()
                },
                vec![(Rule::ExpiringCredential, Severity::Critical)],
            ),
            (
                "a key 350 days old",
                Facts {
                    now_millis: now,
                    signing_keys: vec![SigningKeyAge {
                        name: "audit signing key".into(),
                        created_millis: now - 350 * day,
                    }],
                    ..Default::default()
                },
                vec![(Rule::ExpiringCredential, Severity::Warning)],
            ),
            (
                "a key 10 days old",
                Facts {
                    now_millis: now,
                    signing_keys: vec![SigningKeyAge {
                        name: "audit signing key".into(),
                        created_millis: now - 10 * day,
                    }],
                    ..Default::default()
                },
                vec![],
            ),
        ];
        for (name, facts, expected) in cases {
            let raised: Vec<(Rule, Severity)> = evaluate(&[], &facts, &thresholds)
                .into_iter()
                .map(|a| (a.rule, a.severity))
                .collect();
            assert_eq!(raised, expected, "{name}");
        }
        // The same certificate keeps its key from day to day.
        let cert = |now_millis| Facts {
            now_millis,
            tls_not_after_millis: Some(NOON_JST + 10 * day),
            ..Default::default()
        };
        assert_eq!(
            evaluate(&[], &cert(now), &thresholds)[0].dedup_key,
            evaluate(&[], &cert(now + day), &thresholds)[0].dedup_key
        );
    }

    #[test]
    fn backup_rules_fire_as_the_table_says_and_heal() {
        let thresholds = Thresholds::default();
        let names =
            |n: usize| -> Vec<String> { (0..n).map(|i| format!("2026112{i}T000000Z")).collect() };
        let verified = |good: Vec<String>| Facts {
            now_millis: NOON_JST,
            backup_verified: Some(BackupVerified {
                good,
                required: 3,
                last_verification_millis: Some(NOON_JST),
            }),
            ..Default::default()
        };
        type Case = (&'static str, Facts, Vec<(Rule, Severity)>);
        let cases: Vec<Case> = vec![
            ("backups not configured", Facts::default(), vec![]),
            (
                "none verified",
                verified(vec![]),
                vec![(Rule::BackupVerifiedGenerations, Severity::Critical)],
            ),
            (
                "two verified",
                verified(names(2)),
                vec![(Rule::BackupVerifiedGenerations, Severity::Warning)],
            ),
            ("three verified", verified(names(3)), vec![]),
            ("five verified", verified(names(5)), vec![]),
        ];
        for (name, facts, expected) in cases {
            let raised: Vec<(Rule, Severity)> = evaluate(&[], &facts, &thresholds)
                .into_iter()
                .map(|a| (a.rule, a.severity))
                .collect();
            assert_eq!(raised, expected, "{name}");
        }
        // The same shortfall is one alert; after another verification, or another set of
        // good generations, it is another.
        let key = |facts: &Facts| evaluate(&[], facts, &thresholds)[0].dedup_key.clone();
        assert_eq!(key(&verified(names(2))), key(&verified(names(2))));
        assert_ne!(
            key(&verified(names(2))),
            key(&verified(vec![
                "20261201T000000Z".into(),
                "20261202T000000Z".into()
            ]))
        );
        let mut later = verified(names(2));
        if let Some(v) = later.backup_verified.as_mut() {
            v.last_verification_millis = Some(NOON_JST + 1);
        }
        assert_ne!(key(&verified(names(2))), key(&later));

        // A refused prune is a critical alert, one per occurrence window.
        let refused = |at| ParsedLeaf {
            failed: true,
            detail: Some(format!(
                "{}: the live database looks encrypted or corrupt (header)",
                crate::backup::generations::PRUNE_REFUSED
            )),
            ..event(
                EventKind::SecurityConfiguration,
                AccessorKind::System,
                None,
                at,
            )
        };
        let other_failure = ParsedLeaf {
            failed: true,
            detail: Some("TLS settings weakened".into()),
            ..event(
                EventKind::SecurityConfiguration,
                AccessorKind::System,
                None,
                NOON_JST,
            )
        };
        let facts = Facts {
            now_millis: NOON_JST,
            ..Default::default()
        };
        let raised = evaluate(
            &[
                refused(NOON_JST),
                refused(NOON_JST + 60_000),
                other_failure.clone(),
            ],
            &facts,
            &thresholds,
        );
        assert_eq!(keys_of(&raised, Rule::BackupPruneRefused).len(), 1);
        assert_eq!(raised[0].severity, Severity::Critical);
        assert!(evaluate(&[other_failure], &facts, &thresholds).is_empty());
    }

    #[test]
    fn business_hours_parse_and_wrap() {
        assert_eq!(BusinessHours::minute_of("07:00"), Some(420));
        assert_eq!(BusinessHours::minute_of("22:30"), Some(1350));
        for bad in ["7:00", "24:00", "07:60", "0700", "", "aa:bb"] {
            assert_eq!(BusinessHours::minute_of(bad), None, "{bad}");
        }
        let day = BusinessHours {
            start_minute: 420,
            end_minute: 1320,
        };
        assert!(day.contains(420) && day.contains(1319));
        assert!(!day.contains(1320) && !day.contains(419));
        let night_shift = BusinessHours {
            start_minute: 1320,
            end_minute: 420,
        };
        assert!(night_shift.contains(0) && night_shift.contains(1320));
        assert!(!night_shift.contains(720));
        let always = BusinessHours {
            start_minute: 0,
            end_minute: 0,
        };
        assert!((0..1440).all(|minute| always.contains(minute)));
        assert_eq!(jst_minute_of_day(NOON_JST), 720);
    }

    proptest! {
        /// The failed-login rule fires iff some 60-second window holds at least N failures
        /// of one account.
        #[test]
        fn failed_logins_fire_iff_a_minute_holds_n(
            offsets in proptest::collection::vec(0i64..600_000, 0..40),
            threshold in 1u32..12,
        ) {
            let thresholds = Thresholds {
                failed_logins_per_account: threshold,
                failed_logins_overall: u32::MAX,
                ..Thresholds::default()
            };
            let events: Vec<ParsedLeaf> = offsets
                .iter()
                .map(|o| failed_login(Some("acc-1"), NOON_JST + o))
                .collect();
            let fired = !keys_of(&evaluate(&events, &Facts::default(), &thresholds), Rule::FailedLogins).is_empty();
            let expected = offsets.iter().any(|&start| {
                offsets.iter().filter(|&&o| o >= start && o < start + 60_000).count() >= threshold as usize
            });
            prop_assert_eq!(fired, expected);
        }

        /// Evaluating a prefix of the events, then all of them, never raises a key for the
        /// prefix that the whole does not raise too: re-evaluation does not re-fire.
        #[test]
        fn keys_are_stable_as_events_arrive(
            offsets in proptest::collection::vec(0i64..7_200_000, 0..60),
            cut in 0usize..60,
        ) {
            let thresholds = Thresholds { failed_logins_per_account: 3, failed_logins_overall: 5, ..Thresholds::default() };
            let mut offsets = offsets;
            offsets.sort_unstable();
            let events: Vec<ParsedLeaf> = offsets.iter().map(|o| failed_login(Some("acc-1"), NOON_JST + o)).collect();
            let cut = cut.min(events.len());
            let prefix = keys_of(&evaluate(&events[..cut], &Facts::default(), &thresholds), Rule::FailedLogins);
            let whole = keys_of(&evaluate(&events, &Facts::default(), &thresholds), Rule::FailedLogins);
            for key in prefix {
                prop_assert!(whole.contains(&key), "{} vanished", key);
            }
        }
    }
}
