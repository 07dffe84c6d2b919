//! Record categories: each is encrypted under its own label-derived key, so a grant for
//! one category carries kfrags for that key only.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A category of a patient's research copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Demographics,
    Conditions,
    Observations,
    Medications,
    Procedures,
    Immunizations,
    Allergies,
    Encounters,
    MentalHealth,
    SubstanceUse,
    SexualHealth,
    Genomics,
    /// Blood type, allergies, implants, active medications: the break-glass category.
    Critical,
}

impl Category {
    /// Every category, in a fixed order.
    pub const ALL: [Category; 13] = [
        Category::Demographics,
        Category::Conditions,
        Category::Observations,
        Category::Medications,
        Category::Procedures,
        Category::Immunizations,
        Category::Allergies,
        Category::Encounters,
        Category::MentalHealth,
        Category::SubstanceUse,
        Category::SexualHealth,
        Category::Genomics,
        Category::Critical,
    ];

    /// The stable label the category key is derived from (`SecretKeyFactory::make_key`).
    pub fn label(self) -> &'static str {
        match self {
            Category::Demographics => "demographics",
            Category::Conditions => "conditions",
            Category::Observations => "observations",
            Category::Medications => "medications",
            Category::Procedures => "procedures",
            Category::Immunizations => "immunizations",
            Category::Allergies => "allergies",
            Category::Encounters => "encounters",
            Category::MentalHealth => "mental_health",
            Category::SubstanceUse => "substance_use",
            Category::SexualHealth => "sexual_health",
            Category::Genomics => "genomics",
            Category::Critical => "critical",
        }
    }

    /// Sensitive categories never default to shared.
    pub fn is_sensitive(self) -> bool {
        matches!(
            self,
            Category::MentalHealth
                | Category::SubstanceUse
                | Category::SexualHealth
                | Category::Genomics
        )
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A category name that is not one of [`Category::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown category {0:?}; expected one of: demographics, conditions, observations, medications, procedures, immunizations, allergies, encounters, mental_health, substance_use, sexual_health, genomics, critical"
)]
pub struct UnknownCategory(pub String);

impl FromStr for Category {
    type Err = UnknownCategory;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Category::ALL
            .into_iter()
            .find(|c| c.label() == s)
            .ok_or_else(|| UnknownCategory(s.chars().take(40).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip() {
        for c in Category::ALL {
            assert_eq!(c.label().parse::<Category>().unwrap(), c);
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.label())
            );
        }
        assert!("names".parse::<Category>().is_err());
    }
}
