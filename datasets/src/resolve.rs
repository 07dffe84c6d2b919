//! Reference resolution within one patient's resources (and shared ones, like Medication).

use std::cell::OnceCell;
use std::collections::HashMap;

use serde_json::Value;

use crate::categorize::{Lookup, known_type_name};
use crate::util::{self, RefTarget};

/// Resources by id and by `(type, id)`.
#[derive(Default)]
pub(crate) struct ResourceIndex<'a> {
    by_id: HashMap<&'a str, &'a Value>,
    by_type_id: HashMap<(&'a str, &'a str), &'a Value>,
}

impl<'a> ResourceIndex<'a> {
    pub(crate) fn new(resources: impl IntoIterator<Item = &'a Value>) -> Self {
        let mut index = ResourceIndex::default();
        for r in resources {
            if let (Some(ty), Some(id)) = (util::resource_type(r), util::resource_id(r)) {
                index.by_id.entry(id).or_insert(r);
                index.by_type_id.entry((ty, id)).or_insert(r);
            }
        }
        index
    }

    fn get(&self, target: &RefTarget<'_>) -> Option<&'a Value> {
        match target {
            RefTarget::Uuid(id) => self.by_id.get(id).copied(),
            RefTarget::Typed(ty, id) => self.by_type_id.get(&(*ty, *id)).copied(),
            _ => None,
        }
    }
}

/// Resolves reference strings against one patient, the resources that came with them, and
/// optionally an index of shared resources.
///
/// `resources` are the resources a reference may need whole (a reason's code, a
/// Medication); a reference that only needs its target's type may also be resolved by
/// [`Resolver::with_types`], so that an importer need not hold every resource at once.
pub(crate) struct Resolver<'a> {
    patient: &'a Value,
    resources: &'a [Value],
    /// The type of every resource of the patient, by id, when not all are in `resources`.
    types: Option<&'a HashMap<String, &'static str>>,
    patient_id: Option<&'a str>,
    /// Other ids the patient is referenced by (`urn:uuid:` fullUrls that differ from the id).
    patient_aliases: &'a [String],
    /// Built on first use: index extraction alone rarely needs it.
    own: OnceCell<ResourceIndex<'a>>,
    shared: Option<&'a ResourceIndex<'a>>,
}

impl<'a> Resolver<'a> {
    pub(crate) fn new(
        patient: &'a Value,
        resources: &'a [Value],
        shared: Option<&'a ResourceIndex<'a>>,
    ) -> Self {
        Resolver {
            patient,
            resources,
            patient_id: util::resource_id(patient),
            patient_aliases: &[],
            types: None,
            own: OnceCell::new(),
            shared,
        }
    }

    /// Also treats `urn:uuid:<alias>` references as references to the patient.
    pub(crate) fn with_patient_aliases(mut self, aliases: &'a [String]) -> Self {
        self.patient_aliases = aliases;
        self
    }

    /// Also knows the types of these resources (by id), whole or not.
    pub(crate) fn with_types(mut self, types: &'a HashMap<String, &'static str>) -> Self {
        self.types = Some(types);
        self
    }

    fn own(&self) -> &ResourceIndex<'a> {
        self.own
            .get_or_init(|| ResourceIndex::new(std::iter::once(self.patient).chain(self.resources)))
    }

    /// Whether the reference points to this patient.
    pub(crate) fn is_patient(&self, reference: &str) -> bool {
        let Some(pid) = self.patient_id else {
            return false;
        };
        match util::parse_reference(reference) {
            RefTarget::Uuid(id) => id == pid || self.patient_aliases.iter().any(|a| a == id),
            RefTarget::Typed("Patient", id) => id == pid,
            _ => false,
        }
    }

    /// The resource type a reference points to, when it can be told. Only known FHIR
    /// resource type names are returned, so nothing of the reference string leaks.
    pub(crate) fn target_type(&self, reference: &str) -> Option<&'static str> {
        let target = util::parse_reference(reference);
        match target {
            RefTarget::Uuid(id) => self.types.and_then(|t| t.get(id).copied()).or_else(|| {
                self.find(&target)
                    .and_then(|r| util::resource_type(r))
                    .and_then(known_type_name)
            }),
            RefTarget::Typed(ty, _) | RefTarget::TypeOnly(ty) => known_type_name(ty),
            RefTarget::Other => None,
        }
    }

    fn find(&self, target: &RefTarget<'_>) -> Option<&'a Value> {
        self.own()
            .get(target)
            .or_else(|| self.shared.and_then(|s| s.get(target)))
    }
}

impl Lookup for Resolver<'_> {
    fn resolve(&self, reference: &str) -> Option<&Value> {
        self.find(&util::parse_reference(reference))
    }
}
