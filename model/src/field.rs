//! The searchable fields: what a patient can let the broker index in plaintext (under a
//! pseudonym) so that cohort queries can search it. Consent policies name them and the
//! cohort engine filters by them; this is their one definition.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::definition::Domain;
use crate::quote::excerpt;

/// A field of the index a patient can make searchable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchField {
    BirthYear,
    Sex,
    Condition,
    Measurement,
    Drug,
    Procedure,
    /// The spans of time the source's records cover (OMOP `observation_period`).
    ObservationPeriod,
}

impl SearchField {
    /// Every searchable field, in order.
    pub const ALL: [SearchField; 7] = [
        SearchField::BirthYear,
        SearchField::Sex,
        SearchField::Condition,
        SearchField::Measurement,
        SearchField::Drug,
        SearchField::Procedure,
        SearchField::ObservationPeriod,
    ];

    /// The field's name: `birth_year`, `sex`, `condition`, `measurement`, `drug`,
    /// `procedure`, `observation_period`.
    pub fn as_str(self) -> &'static str {
        match self {
            SearchField::BirthYear => "birth_year",
            SearchField::Sex => "sex",
            SearchField::Condition => "condition",
            SearchField::Measurement => "measurement",
            SearchField::Drug => "drug",
            SearchField::Procedure => "procedure",
            SearchField::ObservationPeriod => "observation_period",
        }
    }

    /// The field's position in [`SearchField::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The field that makes a domain's event table searchable.
    pub fn of_domain(domain: Domain) -> SearchField {
        match domain {
            Domain::Condition => SearchField::Condition,
            Domain::Measurement => SearchField::Measurement,
            Domain::Drug => SearchField::Drug,
            Domain::Procedure => SearchField::Procedure,
        }
    }
}

impl fmt::Display for SearchField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`SearchField`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown searchable field {0:?}; use birth_year, sex, condition, measurement, drug, \
     procedure or observation_period"
)]
pub struct UnknownSearchField(pub String);

impl FromStr for SearchField {
    type Err = UnknownSearchField;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SearchField::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| UnknownSearchField(excerpt(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_index_in_order() {
        for (i, f) in SearchField::ALL.into_iter().enumerate() {
            assert_eq!(f.as_str().parse::<SearchField>().unwrap(), f);
            assert_eq!(f.index(), i);
            assert_eq!(
                serde_json::to_string(&f).unwrap(),
                format!("\"{}\"", f.as_str())
            );
        }
        assert!("zip".parse::<SearchField>().is_err());
    }
}
