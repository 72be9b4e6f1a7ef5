//! When acting for someone else ends. A parent's representation of a dependent ends on the
//! day the dependent reaches the age of majority (their birthday; a 29 February birthday
//! counts from 1 March in common years, as 年齢計算ニ関スル法律 reads). A registered proxy
//! (代理人) is not ended by age: it ends when it is revoked.

use time::{Date, Month};

use crate::model::Representation;

/// Whether `representation` of someone born on `birth_date` has ended by `today`.
/// Without a birth date a dependent's representation is treated as ended (fail closed).
pub fn representation_ended(
    representation: Representation,
    birth_date: Option<Date>,
    today: Date,
    age_of_majority: u8,
) -> bool {
    match representation {
        Representation::OneSelf | Representation::RegisteredProxy => false,
        Representation::ParentOfDependent => match birth_date {
            None => true,
            Some(born) => majority_day(born, age_of_majority).is_none_or(|day| today >= day),
        },
    }
}

/// The day someone born on `born` reaches `age` (`None` beyond the calendar's range).
pub fn majority_day(born: Date, age: u8) -> Option<Date> {
    let year = born.year().checked_add(i32::from(age))?;
    Date::from_calendar_date(year, born.month(), born.day())
        .ok()
        .or_else(|| Date::from_calendar_date(year, Month::March, 1).ok())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use time::macros::date;

    use super::*;

    #[test]
    fn a_dependents_representation_ends_on_the_birthday_of_majority() {
        let cases = [
            // (born, today, ended)
            (date!(2008 - 06 - 15), date!(2026 - 06 - 14), false),
            (date!(2008 - 06 - 15), date!(2026 - 06 - 15), true),
            (date!(2008 - 06 - 15), date!(2030 - 01 - 01), true),
            (date!(2020 - 01 - 01), date!(2026 - 11 - 25), false),
            // 29 February: from 1 March in a common year.
            (date!(2008 - 02 - 29), date!(2026 - 02 - 28), false),
            (date!(2008 - 02 - 29), date!(2026 - 03 - 01), true),
        ];
        for (born, today, ended) in cases {
            assert_eq!(
                representation_ended(Representation::ParentOfDependent, Some(born), today, 18),
                ended,
                "{born} {today}"
            );
        }
    }

    #[test]
    fn proxies_and_self_do_not_end_by_age_and_no_birth_date_fails_closed() {
        let today = date!(2026 - 11 - 25);
        let old = Some(date!(1950 - 01 - 01));
        assert!(!representation_ended(
            Representation::RegisteredProxy,
            old,
            today,
            18
        ));
        assert!(!representation_ended(
            Representation::OneSelf,
            old,
            today,
            18
        ));
        assert!(representation_ended(
            Representation::ParentOfDependent,
            None,
            today,
            18
        ));
    }

    proptest! {
        /// Once ended, a dependent's representation stays ended on every later day.
        #[test]
        fn ending_is_monotonic(born in 0i32..20_000, today in 0i32..30_000, later in 0i32..5_000) {
            let epoch = date!(1970 - 01 - 01);
            let born = epoch + time::Duration::days(i64::from(born));
            let today = epoch + time::Duration::days(i64::from(today));
            let later = today + time::Duration::days(i64::from(later));
            if representation_ended(Representation::ParentOfDependent, Some(born), today, 18) {
                prop_assert!(representation_ended(Representation::ParentOfDependent, Some(born), later, 18));
            }
        }
    }
}
