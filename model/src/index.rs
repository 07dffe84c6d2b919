//! The searchable index: the only plaintext the broker holds about a patient, keyed by
//! the broker pseudonym. Names, addresses, identifiers and free text never appear here.

use serde::{Deserialize, Serialize};

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

/// The searchable rows of one patient, in OMOP-like long tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PatientIndex {
    pub person: Person,
    pub conditions: Vec<CodedEvent>,
    pub measurements: Vec<CodedEvent>,
    pub drugs: Vec<CodedEvent>,
    pub procedures: Vec<CodedEvent>,
}
