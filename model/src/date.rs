//! Calendar dates as days since 1970-01-01, the representation of Arrow's `Date32`.
//!
//! Definitions, index rows and the SQL export all speak ISO 8601 `YYYY-MM-DD`; this module
//! converts without a calendar library (proleptic Gregorian calendar, years 1..=9999).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A calendar day: days since 1970-01-01 (negative before).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date(i32);

/// A string that is not an ISO 8601 calendar date `YYYY-MM-DD`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a date: write YYYY-MM-DD (e.g. 2020-01-31), years 1 to 9999")]
pub struct DateError(pub String);

impl Date {
    /// The day `year-month-day`, if it exists.
    pub fn from_ymd(year: i32, month: u32, day: u32) -> Option<Date> {
        if !(1..=9999).contains(&year) || !(1..=12).contains(&month) || day < 1 {
            return None;
        }
        if day > days_in_month(year, month) {
            return None;
        }
        Some(Date(days_from_civil(year, month, day)))
    }

    /// Days since 1970-01-01 (Arrow `Date32`).
    pub const fn days(self) -> i32 {
        self.0
    }

    /// The date `days` after 1970-01-01, if its year is within 1..=9999.
    pub fn from_days(days: i32) -> Option<Date> {
        let (y, _, _) = civil_from_days(days);
        (1..=9999).contains(&y).then_some(Date(days))
    }

    /// The calendar year.
    pub fn year(self) -> i32 {
        civil_from_days(self.0).0
    }

    /// This date moved by `days` (saturating at the ends of the supported range).
    pub fn add_days(self, days: i32) -> Date {
        let min = days_from_civil(1, 1, 1);
        let max = days_from_civil(9999, 12, 31);
        Date(self.0.saturating_add(days).clamp(min, max))
    }
}

impl FromStr for Date {
    type Err = DateError;

    fn from_str(s: &str) -> Result<Date, DateError> {
        let err = || DateError(s.to_string());
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(err());
        }
        let num = |r: std::ops::Range<usize>| -> Option<u32> {
            let part = &s[r];
            part.bytes()
                .all(|c| c.is_ascii_digit())
                .then(|| part.parse().ok())
                .flatten()
        };
        let (y, m, d) = (
            num(0..4).ok_or_else(err)?,
            num(5..7).ok_or_else(err)?,
            num(8..10).ok_or_else(err)?,
        );
        Date::from_ymd(y as i32, m, d).ok_or_else(err)
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = civil_from_days(self.0);
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl Serialize for Date {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Date, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

// Howard Hinnant's `days_from_civil` / `civil_from_days`.
fn days_from_civil(y: i32, m: u32, d: u32) -> i32 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400) as u32;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe as i32 - 719_468
}

fn civil_from_days(z: i32) -> (i32, u32, u32) {
    let z = z as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_epoch() {
        assert_eq!("1970-01-01".parse::<Date>().unwrap().days(), 0);
        assert_eq!("1969-12-31".parse::<Date>().unwrap().days(), -1);
        assert_eq!("2000-03-01".parse::<Date>().unwrap().days(), 11_017);
        for s in [
            "0001-01-01",
            "1900-02-28",
            "2000-02-29",
            "2024-12-31",
            "9999-12-31",
        ] {
            let d: Date = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
            assert_eq!(Date::from_days(d.days()), Some(d));
        }
        assert_eq!("2019-07-04".parse::<Date>().unwrap().year(), 2019);
    }

    #[test]
    fn rejects_what_is_not_a_day() {
        for s in [
            "1900-02-29",
            "2021-13-01",
            "2021-04-31",
            "2021-4-30",
            "20210430",
            "0000-01-01",
            "2021-04-3a",
            "+202-04-30",
            "",
        ] {
            assert!(s.parse::<Date>().is_err(), "{s}");
        }
    }
}
