//! Which generations to keep: a pure function of their times and the policy (no I/O).
//!
//! The policy keeps the newest generation of each of the `daily` most recent days that have
//! one, of each of the `weekly` most recent ISO weeks and of each of the `monthly` most
//! recent months (days, weeks and months in Japan time, where operators live). Every kept
//! generation carries the reasons that justify it; everything else may be deleted. The
//! newest generation is always kept.

use std::collections::BTreeSet;

use time::{Duration, OffsetDateTime, UtcOffset};

/// Japan Standard Time (no daylight saving).
const JST: UtcOffset = time::macros::offset!(+9);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            daily: 7,
            weekly: 4,
            monthly: 3,
        }
    }
}

impl Policy {
    pub fn of(config: &crate::config::BackupConfig) -> Self {
        Policy {
            daily: config.keep_daily(),
            weekly: config.keep_weekly(),
            monthly: config.keep_monthly(),
        }
    }

    /// The most generations the policy keeps (the newest always counts).
    pub fn most_kept(&self) -> usize {
        (self.daily as usize + self.weekly as usize + self.monthly as usize).max(1)
    }

    /// How long a new generation may be kept if backups go on daily: the newest of its day,
    /// week and month is kept for the longest of the three spans. Uploads are locked until
    /// then (a generation pruned earlier is refused by the lock and retried later).
    pub fn planned_expiry(&self, created: OffsetDateTime) -> OffsetDateTime {
        let days = i64::from(self.daily)
            .max(7 * i64::from(self.weekly))
            .max(31 * i64::from(self.monthly));
        created + Duration::days(days + 1)
    }

    /// A one-line description for operators and the disclosure.
    pub fn describe(&self) -> String {
        format!(
            "{} daily, {} weekly, {} monthly",
            self.daily, self.weekly, self.monthly
        )
    }
}

/// Why a generation is kept.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// The newest generation of this day (Japan time).
    Daily(time::Date),
    /// The newest of this ISO week (ISO year, week number).
    Weekly(i32, u8),
    /// The newest of this month (year, month 1–12).
    Monthly(i32, u8),
    /// The newest generation of all, kept whatever the policy says.
    Newest,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Daily(date) => write!(f, "newest of day {date}"),
            Reason::Weekly(year, week) => write!(f, "newest of week {year}-W{week:02}"),
            Reason::Monthly(year, month) => write!(f, "newest of month {year}-{month:02}"),
            Reason::Newest => f.write_str("newest generation"),
        }
    }
}

/// A generation as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub name: String,
    pub created: OffsetDateTime,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Kept generations, newest first, each with its reasons (never empty).
    pub keep: Vec<(String, Vec<Reason>)>,
    /// Generations the policy lets go, newest first.
    pub delete: Vec<String>,
}

#[derive(Clone, Copy)]
enum Period {
    Day,
    Week,
    Month,
}

fn period_of(at: OffsetDateTime, period: Period) -> Reason {
    let local = at.to_offset(JST);
    match period {
        Period::Day => Reason::Daily(local.date()),
        Period::Week => {
            let (year, week, _) = local.date().to_iso_week_date();
            Reason::Weekly(year, week)
        }
        Period::Month => Reason::Monthly(local.year(), u8::from(local.month())),
    }
}

/// Decides which generations to keep under `policy`.
pub fn decide(generations: &[Generation], policy: &Policy) -> Decision {
    let mut ordered: Vec<&Generation> = generations.iter().collect();
    // Newest first; a tie is broken by name so the decision does not depend on input order.
    ordered.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.name.cmp(&a.name)));
    let mut reasons: Vec<Vec<Reason>> = vec![Vec::new(); ordered.len()];
    for (period, quota) in [
        (Period::Day, policy.daily),
        (Period::Week, policy.weekly),
        (Period::Month, policy.monthly),
    ] {
        let mut seen = BTreeSet::new();
        for (index, generation) in ordered.iter().enumerate() {
            if seen.len() >= quota as usize {
                break;
            }
            let key = period_of(generation.created, period);
            // The first one met in a period is its newest.
            if seen.insert(key.clone()) {
                reasons[index].push(key);
            }
        }
    }
    if let Some(first) = reasons.first_mut() {
        if first.is_empty() {
            first.push(Reason::Newest);
        }
    }
    let mut decision = Decision::default();
    for (generation, why) in ordered.into_iter().zip(reasons) {
        if why.is_empty() {
            decision.delete.push(generation.name.clone());
        } else {
            decision.keep.push((generation.name.clone(), why));
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::datetime;

    fn generation(name: &str, created: OffsetDateTime) -> Generation {
        Generation {
            name: name.to_string(),
            created,
        }
    }

    /// Generations every `step` from `start` backwards, named g0 (newest), g1, …
    fn series(start: OffsetDateTime, step: Duration, n: usize) -> Vec<Generation> {
        (0..n)
            .map(|i| generation(&format!("g{i}"), start - step * i as u32))
            .collect()
    }

    fn kept(decision: &Decision) -> Vec<&str> {
        decision.keep.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn policies_keep_what_the_table_says() {
        // Noon JST on Thursday 2026-11-26.
        let noon = datetime!(2026-11-26 03:00 UTC);
        let day = Duration::days(1);
        type Case = (&'static str, Vec<Generation>, Policy, Vec<&'static str>);
        let cases: Vec<Case> = vec![
            ("nothing to decide", vec![], Policy::default(), vec![]),
            (
                "one generation is kept",
                series(noon, day, 1),
                Policy::default(),
                vec!["g0"],
            ),
            (
                "a week of dailies: all kept",
                series(noon, day, 7),
                Policy::default(),
                vec!["g0", "g1", "g2", "g3", "g4", "g5", "g6"],
            ),
            (
                "three a day: only each day's newest",
                series(noon, Duration::hours(8), 6),
                Policy {
                    daily: 7,
                    weekly: 0,
                    monthly: 0,
                },
                vec!["g0", "g2", "g5"],
            ),
            (
                "dailies only: the 2 newest days",
                series(noon, day, 10),
                Policy {
                    daily: 2,
                    weekly: 0,
                    monthly: 0,
                },
                vec!["g0", "g1"],
            ),
            (
                // g0 Thu 26th (week 48), g4 Sun 22nd (end of week 47), g11 Sun 15th (week 46).
                "weeklies are the newest of each ISO week",
                series(noon, day, 14),
                Policy {
                    daily: 1,
                    weekly: 3,
                    monthly: 0,
                },
                vec!["g0", "g4", "g11"],
            ),
            (
                // Weekly from Thu 26 Nov: g0; Oct's newest is g4 (29 Oct), Sep's g9 (24 Sep).
                "monthlies are the newest of each month",
                series(noon, Duration::weeks(1), 12),
                Policy {
                    daily: 1,
                    weekly: 0,
                    monthly: 3,
                },
                vec!["g0", "g4", "g9"],
            ),
            (
                // 23:30 UTC on the 25th is 08:30 JST on the 26th: the same Japanese day.
                "days are Japanese days",
                vec![
                    generation("late-utc", datetime!(2026-11-25 23:30 UTC)),
                    generation("morning-utc", datetime!(2026-11-26 03:00 UTC)),
                ],
                Policy {
                    daily: 7,
                    weekly: 0,
                    monthly: 0,
                },
                vec!["morning-utc"],
            ),
            (
                "a policy of nothing still keeps the newest",
                series(noon, day, 3),
                Policy {
                    daily: 0,
                    weekly: 0,
                    monthly: 0,
                },
                vec!["g0"],
            ),
        ];
        for (name, generations, policy, expected) in cases {
            let decision = decide(&generations, &policy);
            assert_eq!(kept(&decision), expected, "{name}");
            assert_eq!(
                decision.keep.len() + decision.delete.len(),
                generations.len(),
                "{name}"
            );
        }
    }

    #[test]
    fn the_default_policy_over_a_year_of_dailies_keeps_7_plus_weeklies_plus_monthlies() {
        let noon = datetime!(2026-11-26 03:00 UTC);
        let decision = decide(&series(noon, Duration::days(1), 365), &Policy::default());
        // 7 dailies; the 4 weeks' newest are among them or add up to 3 more (the current week's
        // newest is g0); the months' newest likewise.
        assert!(decision.keep.len() <= 14, "{:?}", kept(&decision));
        assert!(decision.keep.len() >= 7 + 2, "{:?}", kept(&decision));
        let (newest, why) = &decision.keep[0];
        assert_eq!(newest, "g0");
        assert_eq!(why.len(), 3, "the newest is its day's, week's and month's");
        assert_eq!(
            Policy::default().planned_expiry(noon),
            noon + Duration::days(94)
        );
    }

    fn arbitrary_generations() -> impl Strategy<Value = Vec<Generation>> {
        // Up to 60 generations within about 200 days, some on the same day.
        prop::collection::vec(0i64..200 * 24 * 60, 0..60).prop_map(|minutes| {
            let base = datetime!(2026-06-01 00:00 UTC);
            minutes
                .into_iter()
                .enumerate()
                .map(|(i, m)| generation(&format!("g{i:03}"), base + Duration::minutes(m)))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn retention_is_safe_bounded_and_justified(
            generations in arbitrary_generations(),
            daily in 0u32..10,
            weekly in 0u32..6,
            monthly in 0u32..5,
        ) {
            let policy = Policy { daily, weekly, monthly };
            let decision = decide(&generations, &policy);
            // A partition of the input.
            let mut all: Vec<&str> = kept(&decision);
            all.extend(decision.delete.iter().map(String::as_str));
            all.sort_unstable();
            let mut names: Vec<&str> = generations.iter().map(|g| g.name.as_str()).collect();
            names.sort_unstable();
            prop_assert_eq!(all, names);
            // Never deletes the newest.
            if let Some(newest) = generations.iter().max_by(|a, b| {
                a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name))
            }) {
                prop_assert!(!decision.delete.contains(&newest.name));
            }
            // Never keeps more than the policy.
            prop_assert!(decision.keep.len() <= policy.most_kept());
            let count = |f: fn(&Reason) -> bool| {
                decision.keep.iter().flat_map(|(_, why)| why).filter(|r| f(r)).count()
            };
            prop_assert!(count(|r| matches!(r, Reason::Daily(_))) <= daily as usize);
            prop_assert!(count(|r| matches!(r, Reason::Weekly(..))) <= weekly as usize);
            prop_assert!(count(|r| matches!(r, Reason::Monthly(..))) <= monthly as usize);
            // Each kept generation is justified: it is the newest of every period it names.
            for (name, why) in &decision.keep {
                prop_assert!(!why.is_empty());
                let me = generations.iter().find(|g| &g.name == name).unwrap();
                for reason in why {
                    let period = match reason {
                        Reason::Daily(_) => Period::Day,
                        Reason::Weekly(..) => Period::Week,
                        Reason::Monthly(..) => Period::Month,
                        Reason::Newest => continue,
                    };
                    prop_assert_eq!(&period_of(me.created, period), reason);
                    let newer_in_period = generations.iter().any(|g| {
                        period_of(g.created, period) == *reason
                            && (g.created, &g.name) > (me.created, &me.name)
                    });
                    prop_assert!(!newer_in_period, "{} is not the newest of {}", name, reason);
                }
            }
            // A deleted generation is not its period's newest within the quota: the daily
            // quota is full of newer days (or it is not its day's newest).
            for name in &decision.delete {
                let me = generations.iter().find(|g| &g.name == name).unwrap();
                let newer_days: BTreeSet<_> = generations
                    .iter()
                    .filter(|g| (g.created, &g.name) > (me.created, &me.name))
                    .map(|g| period_of(g.created, Period::Day))
                    .collect();
                let my_day = period_of(me.created, Period::Day);
                prop_assert!(
                    newer_days.contains(&my_day) || newer_days.len() >= daily as usize
                );
            }
        }
    }
}
