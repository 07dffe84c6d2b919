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
}

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

    #[test]
    fn an_index_without_periods_serializes_as_before() {
        // Stored index versions are hashed from this JSON: no new key when empty.
        let json = serde_json::to_string(&PatientIndex::default()).unwrap();
        assert!(!json.contains("observation_periods"), "{json}");
        let back: PatientIndex = serde_json::from_str(&json).unwrap();
        assert!(back.observation_periods.is_empty());
    }
}
