//! Which consent categories gate each indexed code.
//!
//! A row whose code is sensitive (mental health, substance use, sexual health, genomics,
//! as [`model::sensitive`] classifies it, also through the engine's concept hierarchy) is
//! visible for a patient only if the patient consented the row's field *and* every
//! sensitive category of its code. The engine classifies every code itself: an uploader's
//! own categorization is never trusted, and an index row carries no category.

use std::fmt;

use model::Category;
use model::sensitive::{SENSITIVE_CATEGORIES, SensitiveCodes};

use crate::definition::Code;
use crate::hierarchy::ConceptHierarchy;

/// A set of sensitive categories (bit `i` is [`SENSITIVE_CATEGORIES`]`[i]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub(crate) struct Gates(u8);

impl Gates {
    /// The categories in the set.
    pub(crate) fn iter(self) -> impl Iterator<Item = Category> {
        SENSITIVE_CATEGORIES
            .into_iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, c)| c)
    }

    fn of(categories: &[Category]) -> Gates {
        let mut bits = 0;
        for c in categories {
            if let Some(i) = slot(*c) {
                bits |= 1 << i;
            }
        }
        Gates(bits)
    }
}

/// The position of a sensitive category in [`SENSITIVE_CATEGORIES`].
pub(crate) fn slot(category: Category) -> Option<usize> {
    SENSITIVE_CATEGORIES.iter().position(|c| *c == category)
}

/// The classifier an engine applies: [`SensitiveCodes`] over its concept hierarchy.
pub(crate) struct Sensitivity {
    codes: SensitiveCodes,
}

impl fmt::Debug for Sensitivity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sensitivity(..)")
    }
}

impl Sensitivity {
    pub(crate) fn new(hierarchy: &ConceptHierarchy) -> Sensitivity {
        Sensitivity {
            codes: SensitiveCodes::new(hierarchy),
        }
    }

    /// The categories gating a `system:code` string of the index. A string that is not a
    /// code matches no definition, and is gated by nothing.
    pub(crate) fn gates(&self, code: &str) -> Gates {
        match code.parse::<Code>() {
            Ok(code) => self.gates_of(&code),
            Err(_) => Gates::default(),
        }
    }

    pub(crate) fn gates_of(&self, code: &Code) -> Gates {
        Gates::of(&self.codes.categories(code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_gated_by_their_categories() {
        let hiv: Code = "snomed:86406008".parse().unwrap();
        let child: Code = "snomed:1".parse().unwrap();
        let s = Sensitivity::new(&ConceptHierarchy::from_pairs([(hiv, child)]));
        let gates = s.gates("snomed:86406008");
        assert_eq!(gates.iter().collect::<Vec<_>>(), [Category::SexualHealth]);
        assert_eq!(s.gates("snomed:1"), gates);
        assert_eq!(s.gates("snomed:44054006"), Gates::default());
        assert_eq!(s.gates("not a code"), Gates::default());
        assert_eq!(
            s.gates("icd10:F10.2").iter().collect::<Vec<_>>(),
            [Category::SubstanceUse]
        );
    }
}
