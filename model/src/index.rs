//! The searchable index: the only plaintext the broker holds about a patient, keyed by
//! the broker pseudonym. Names, addresses, identifiers and free text never appear here.

use serde::{Deserialize, Serialize};

use crate::date::Date;

/// Coarse demographics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Person {
    /// Year of birth; for ages over 89 the custodian reports the 90+ bucket year
    /// (reference year − 90). `None` when unknown.
    pub birth_year: Option<i32>,
    /// `male`, `female`, `other` or `unknown` (FHIR administrative gender).
    pub sex: String,
}

/// One coded clinical event: a condition onset, a measurement, a drug start, a procedure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodedEvent {
    /// Code system short name: `snomed`, `loinc`, `rxnorm`, `icd10`, `cvx`.
    pub system: String,
    pub code: String,
    /// ISO 8601 date `YYYY-MM-DD`.
    pub date: String,
    /// Measurement value, when numeric.
    pub value: Option<f64>,
    /// UCUM unit of `value`, or empty.
    pub unit: String,
}

/// A span of days during which the source's records cover the patient (OMOP
/// `observation_period`): events outside it are unknown, not absent. Inclusive bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservationPeriod {
    /// ISO 8601 date `YYYY-MM-DD`.
    pub start: String,
    /// ISO 8601 date `YYYY-MM-DD`, on or after `start`.
    pub end: String,
}

/// The searchable rows of one patient, in OMOP-like long tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PatientIndex {
    pub person: Person,
    pub conditions: Vec<CodedEvent>,
    pub measurements: Vec<CodedEvent>,
    pub drugs: Vec<CodedEvent>,
    pub procedures: Vec<CodedEvent>,
    /// Empty when the source has none (FHIR bundles carry no observation periods).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub observation_periods: Vec<ObservationPeriod>,
}

/// Why a patient's index rows cannot be searched. It names the row, never its value: a
/// date is patient data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IndexRowError {
    #[error("{table} row {row}: the date is not a date (YYYY-MM-DD)")]
    BadDate { table: &'static str, row: usize },
    #[error("observation period {row}: it ends before it starts")]
    ReversedPeriod { row: usize },
}

impl PatientIndex {
    /// Checks what the cohort engine needs of the rows: every date a calendar date, every
    /// observation period starting on or before its end. Rows are numbered from 0.
    pub fn check(&self) -> Result<(), IndexRowError> {
        let tables = [
            ("condition", &self.conditions),
            ("measurement", &self.measurements),
            ("drug", &self.drugs),
            ("procedure", &self.procedures),
        ];
        for (table, events) in tables {
            for (row, e) in events.iter().enumerate() {
                if e.date.parse::<Date>().is_err() {
                    return Err(IndexRowError::BadDate { table, row });
                }
            }
        }
        for (row, p) in self.observation_periods.iter().enumerate() {
            let bad = || IndexRowError::BadDate {
                table: "observation_period",
                row,
            };
            let start: Date = p.start.parse().map_err(|_| bad())?;
            let end: Date = p.end.parse().map_err(|_| bad())?;
            if end < start {
                return Err(IndexRowError::ReversedPeriod { row });
            }
        }
        Ok(())
    }

    /// This index with every date moved by `days` (the custodian's secret per-patient
    /// offset, see [`DATE_SHIFT_MAX_DAYS`]). A shift never moves a date before the year the
    /// patient was born (for the 90+ bucket, the bucket year): such a date becomes 1
    /// January of that year, which tells nothing the birth year does not, and the row
    /// stays, so a count that asks only for codes is the same as on the true dates. A date
    /// that is not a calendar date is left as it is ([`PatientIndex::check`] refuses it).
    pub fn shifted(&self, days: i32) -> PatientIndex {
        let first = self.person.birth_year.and_then(|y| Date::from_ymd(y, 1, 1));
        let shift = |s: &mut String| {
            if let Ok(d) = s.parse::<Date>() {
                let moved = d.add_days(days);
                *s = first.map_or(moved, |f| moved.max(f)).to_string();
            }
        };
        let mut out = self.clone();
        for events in out.event_tables_mut() {
            for e in events.iter_mut() {
                shift(&mut e.date);
            }
        }
        for p in &mut out.observation_periods {
            shift(&mut p.start);
            shift(&mut p.end);
        }
        out
    }

    /// Drops the event rows dated before 1 January of [`Person::birth_year`] and starts
    /// every observation period no earlier than that day (dropping a period that ends
    /// before it): what the custodian does to the true dates before shifting them. For a
    /// patient in the 90+ bucket, whose birth year is the bucket year, such a row would
    /// reveal an age over 90; for anyone else it is an error in the data. Nothing happens
    /// without a birth year.
    pub fn drop_before_birth_year(&mut self) {
        let Some(first) = self.person.birth_year.and_then(|y| Date::from_ymd(y, 1, 1)) else {
            return;
        };
        let before = |s: &str| s.parse::<Date>().is_ok_and(|d| d < first);
        for events in self.event_tables_mut() {
            events.retain(|e| !before(&e.date));
        }
        let first_day = first.to_string();
        self.observation_periods.retain_mut(|p| {
            if before(&p.end) {
                return false;
            }
            if before(&p.start) {
                p.start = first_day.clone();
            }
            true
        });
    }

    fn event_tables_mut(&mut self) -> [&mut Vec<CodedEvent>; 4] {
        [
            &mut self.conditions,
            &mut self.measurements,
            &mut self.drugs,
            &mut self.procedures,
        ]
    }
}

/// The largest date shift, in days, either way: a custodian moves all the index dates of a
/// patient by a secret offset of 1 to this many days, earlier or later, so that no index
/// date is the patient's birth or death date as such. Intervals between a patient's own
/// dates are kept exactly; calendar dates move by at most this much.
pub const DATE_SHIFT_MAX_DAYS: i32 = 182;

#[cfg(test)]
mod tests {
    use super::*;

    fn period(start: &str, end: &str) -> ObservationPeriod {
        ObservationPeriod {
            start: start.into(),
            end: end.into(),
        }
    }

    #[test]
    fn check_names_the_row_and_not_the_value() {
        let mut index = PatientIndex {
            observation_periods: vec![period("2010-01-01", "2010-01-01")],
            ..Default::default()
        };
        assert_eq!(index.check(), Ok(()));
        index.drugs.push(CodedEvent {
            system: "rxnorm".into(),
            code: "1".into(),
            date: "2019-02-29".into(),
            value: None,
            unit: String::new(),
        });
        let e = index.check().unwrap_err();
        assert_eq!(
            e,
            IndexRowError::BadDate {
                table: "drug",
                row: 0
            }
        );
        assert!(!e.to_string().contains("2019"), "{e}");
        index.drugs.clear();
        index
            .observation_periods
            .push(period("2012-01-02", "2012-01-01"));
        assert_eq!(index.check(), Err(IndexRowError::ReversedPeriod { row: 1 }));
    }

    fn event(date: &str) -> CodedEvent {
        CodedEvent {
            system: "snomed".into(),
            code: "1".into(),
            date: date.into(),
            value: None,
            unit: String::new(),
        }
    }

    #[test]
    fn a_shift_moves_every_date_and_never_before_the_birth_year() {
        let index = PatientIndex {
            person: Person {
                birth_year: Some(2000),
                sex: "female".into(),
            },
            conditions: vec![event("2000-03-01"), event("2010-12-31")],
            measurements: vec![event("2000-01-10")],
            drugs: vec![event("not a date")],
            procedures: vec![event("2020-02-29")],
            observation_periods: vec![period("2000-03-01", "2020-02-29")],
        };
        let later = index.shifted(10);
        assert_eq!(later.conditions[0].date, "2000-03-11");
        assert_eq!(later.conditions[1].date, "2011-01-10");
        assert_eq!(later.measurements[0].date, "2000-01-20");
        assert_eq!(later.drugs[0].date, "not a date");
        assert_eq!(later.procedures[0].date, "2020-03-10");
        assert_eq!(
            later.observation_periods,
            [period("2000-03-11", "2020-03-10")]
        );
        // Earlier: what would fall before 2000 is on 2000-01-01, and stays.
        let earlier = index.shifted(-70);
        assert_eq!(earlier.conditions[0].date, "2000-01-01");
        assert_eq!(earlier.conditions[1].date, "2010-10-22");
        assert_eq!(earlier.measurements[0].date, "2000-01-01");
        assert_eq!(
            earlier.observation_periods,
            [period("2000-01-01", "2019-12-21")]
        );
        // Without a birth year nothing holds a date back.
        let mut unborn = index.clone();
        unborn.person.birth_year = None;
        assert_eq!(unborn.shifted(-70).measurements[0].date, "1999-11-01");
        // The intervals between a patient's own dates are kept.
        let day = |s: &str| s.parse::<Date>().unwrap().days();
        assert_eq!(
            day(&later.procedures[0].date) - day(&later.conditions[1].date),
            day("2020-02-29") - day("2010-12-31")
        );
    }

    #[test]
    fn an_index_without_periods_serializes_as_before() {
        // Stored index versions are hashed from this JSON: no new key when empty.
        let json = serde_json::to_string(&PatientIndex::default()).unwrap();
        assert!(!json.contains("observation_periods"), "{json}");
        let back: PatientIndex = serde_json::from_str(&json).unwrap();
        assert!(back.observation_periods.is_empty());
    }
}
