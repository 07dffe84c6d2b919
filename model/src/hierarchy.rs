//! The concept hierarchy that `include_descendants` expands through.
//!
//! Built from ancestor → descendant pairs (OMOP `concept_ancestor`, or parent → child
//! pairs from any vocabulary): descendants are the transitive closure, so either form works.

use std::collections::{BTreeSet, HashMap};

use crate::definition::Code;

/// Ancestor → descendant relations between codes.
#[derive(Debug, Clone, Default)]
pub struct ConceptHierarchy {
    children: HashMap<Code, Vec<Code>>,
    pairs: usize,
}

impl ConceptHierarchy {
    /// A hierarchy without relations: codes have no descendants.
    pub fn new() -> ConceptHierarchy {
        ConceptHierarchy::default()
    }

    /// A hierarchy from `(ancestor, descendant)` pairs. Pairs of a code with itself are
    /// ignored (a code always matches itself).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (Code, Code)>) -> ConceptHierarchy {
        let mut h = ConceptHierarchy::new();
        for (a, d) in pairs {
            h.add(a, d);
        }
        h
    }

    /// Adds one `(ancestor, descendant)` relation.
    pub fn add(&mut self, ancestor: Code, descendant: Code) {
        if ancestor != descendant {
            self.children.entry(ancestor).or_default().push(descendant);
            self.pairs += 1;
        }
    }

    /// Number of relations held.
    pub fn len(&self) -> usize {
        self.pairs
    }

    /// Whether there are no relations.
    pub fn is_empty(&self) -> bool {
        self.pairs == 0
    }

    /// Every `(ancestor, descendant)` relation held, as added.
    pub fn pairs(&self) -> impl Iterator<Item = (&Code, &Code)> {
        self.children
            .iter()
            .flat_map(|(a, ds)| ds.iter().map(move |d| (a, d)))
    }

    /// Every descendant of `code` (not `code` itself), through any number of steps.
    pub fn descendants(&self, code: &Code) -> BTreeSet<Code> {
        let mut out = BTreeSet::new();
        let mut stack: Vec<&Code> = vec![code];
        while let Some(c) = stack.pop() {
            for d in self.children.get(c).into_iter().flatten() {
                if d != code && out.insert(d.clone()) {
                    stack.push(d);
                }
            }
        }
        out
    }

    /// `codes`, plus all their descendants when `include_descendants`.
    pub fn expand<'a>(
        &self,
        codes: impl IntoIterator<Item = &'a Code>,
        include_descendants: bool,
    ) -> BTreeSet<Code> {
        let mut out = BTreeSet::new();
        for c in codes {
            if include_descendants {
                out.extend(self.descendants(c));
            }
            out.insert(c.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Code {
        s.parse().unwrap()
    }

    #[test]
    fn transitive_from_parent_child_pairs() {
        let h = ConceptHierarchy::from_pairs([
            (c("snomed:1"), c("snomed:2")),
            (c("snomed:2"), c("snomed:3")),
            (c("snomed:3"), c("snomed:1")), // a cycle must not loop
            (c("snomed:4"), c("snomed:4")),
        ]);
        assert_eq!(h.len(), 3);
        let d: Vec<String> = h
            .descendants(&c("snomed:1"))
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(d, ["snomed:2", "snomed:3"]);
        assert!(h.descendants(&c("snomed:4")).is_empty());
        assert_eq!(h.expand([&c("snomed:2")], false).len(), 1);
        assert_eq!(h.expand([&c("snomed:2")], true).len(), 3);
    }
}
