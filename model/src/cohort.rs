//! A study's cohort: the criteria a patient's index rows must meet to be released.

use serde::{Deserialize, Serialize};

use crate::index::PatientIndex;

/// Inclusion criteria; every set criterion must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cohort {
    /// Any of these condition codes (empty: no condition criterion).
    pub condition_codes: Vec<String>,
    pub min_birth_year: Option<i32>,
    pub max_birth_year: Option<i32>,
    /// `male`, `female`; `None` for any.
    pub sex: Option<String>,
}

impl Cohort {
    /// Whether a patient's index rows meet every criterion.
    pub fn matches(&self, patient: &PatientIndex) -> bool {
        let year = patient.person.birth_year;
        let below = self
            .min_birth_year
            .is_some_and(|min| year.is_none_or(|y| y < min));
        let above = self
            .max_birth_year
            .is_some_and(|max| year.is_none_or(|y| y > max));
        let other_sex = self
            .sex
            .as_ref()
            .is_some_and(|sex| &patient.person.sex != sex);
        if below || above || other_sex {
            return false;
        }
        self.condition_codes.is_empty()
            || patient
                .conditions
                .iter()
                .any(|c| self.condition_codes.iter().any(|code| code == &c.code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{CodedEvent, Person};

    fn patient(year: i32, sex: &str, codes: &[&str]) -> PatientIndex {
        PatientIndex {
            person: Person {
                birth_year: Some(year),
                sex: sex.into(),
            },
            conditions: codes
                .iter()
                .map(|c| CodedEvent {
                    system: "snomed".into(),
                    code: (*c).into(),
                    date: "2020-01-01".into(),
                    value: None,
                    unit: String::new(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn every_set_criterion_must_hold() {
        let cohort = Cohort {
            condition_codes: vec!["44054006".into()],
            min_birth_year: Some(1950),
            max_birth_year: Some(1980),
            sex: Some("female".into()),
        };
        assert!(cohort.matches(&patient(1960, "female", &["44054006"])));
        assert!(!cohort.matches(&patient(1960, "male", &["44054006"])));
        assert!(!cohort.matches(&patient(1940, "female", &["44054006"])));
        assert!(!cohort.matches(&patient(1990, "female", &["44054006"])));
        assert!(!cohort.matches(&patient(1960, "female", &["38341003"])));
        assert!(Cohort::default().matches(&patient(1960, "male", &[])));
    }
}
