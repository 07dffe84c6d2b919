//! One patient as the custodian holds it before encryption, and the pipeline that builds it
//! from FHIR resources: categorization, de-identification, index extraction.

use std::borrow::Cow;
use std::collections::BTreeMap;

use model::Category;
use model::PatientIndex;
use serde_json::{Map, Value};

use crate::canonical::CollectionWriter;
use crate::categorize::{self, research_category};
use crate::deidentify::{self, DeidConfig, Deidentifier};
use crate::resolve::Resolver;
use crate::{canonical, index, util};

/// One patient, as a custodian holds it before encryption.
#[derive(Debug, Clone, PartialEq)]
pub struct PatientRecord {
    /// The custodian's own stable id of the patient (e.g. Synthea `Patient.id`, or
    /// `synth-000042`). Custodian-side only.
    pub source_id: String,
    /// The research copy: per category, a FHIR R4 Bundle (type `collection`) of
    /// de-identified resources, as canonical JSON bytes (keys sorted, compact). Only
    /// categories with at least one resource are present. [`Category::Critical`] is the
    /// exception: the full, *not* de-identified Patient plus allergies, active medication
    /// requests, blood-type observations and devices, for break-glass access; it is present
    /// whenever there is a Patient.
    pub categories: BTreeMap<Category, Vec<u8>>,
    /// Searchable index rows extracted from the same data.
    pub index: PatientIndex,
    /// Index rows the data held that Safe Harbor withheld.
    pub withheld: index::Withheld,
    /// Strings that identify the patient (names, street address lines, cities, phone,
    /// email, identifier values such as MRN, SSN, driver's licence and passport numbers).
    /// Never stored by the broker; leak tests scan the broker's data for them. Strings
    /// shorter than [`MIN_IDENTIFIER_LEN`](crate::deidentify::MIN_IDENTIFIER_LEN) characters
    /// are not listed.
    pub identifiers: Vec<String>,
}

impl PatientRecord {
    /// Builds the record of one patient from FHIR R4 JSON.
    ///
    /// `patient` is the Patient resource; `resources` are the patient's other resources,
    /// plus any shared resources they reference (e.g. `Medication`). Resources whose type is
    /// not part of the research copy are ignored; references are resolved among
    /// `resources` by `urn:uuid:<id>` and `Type/<id>`. Input is expected to have passed the
    /// importer's checks, but nothing here panics on malformed input: unusable elements are
    /// skipped.
    pub fn from_fhir(patient: &Value, resources: &[Value], cfg: &DeidConfig) -> PatientRecord {
        let resolver = Resolver::new(patient, resources, None);
        Self::build(
            patient,
            &resolver,
            resources.iter().map(Cow::Borrowed),
            cfg,
            None,
        )
    }

    /// [`PatientRecord::from_fhir`] for a source whose index rows were read elsewhere (the
    /// OMOP importer reads them from its tables): the resources make the research copy
    /// only, and `index` is the record's index as it is.
    pub(crate) fn from_fhir_with_index(
        patient: &Value,
        resources: &[Value],
        cfg: &DeidConfig,
        index: (PatientIndex, index::Withheld),
    ) -> PatientRecord {
        let resolver = Resolver::new(patient, resources, None);
        let resources = resources.iter().map(Cow::Borrowed);
        Self::build(patient, &resolver, resources, cfg, Some(index))
    }

    /// [`PatientRecord::from_fhir`] over the patient's resources one at a time (an importer
    /// may parse each only when its turn comes), references resolved by `resolver`; the
    /// index is extracted from them unless `given`.
    pub(crate) fn build<'r>(
        patient: &Value,
        resolver: &Resolver<'_>,
        resources: impl Iterator<Item = Cow<'r, Value>>,
        cfg: &DeidConfig,
        given: Option<(PatientIndex, index::Withheld)>,
    ) -> PatientRecord {
        let source_id = util::resource_id(patient).unwrap_or_default().to_string();
        let (birth_year, death_year) = deidentify::life_years(patient);
        let bucket_year = birth_year.and_then(|y| cfg.bucket_year(y, death_year));
        let deid = Deidentifier::new(*cfg, &source_id, bucket_year, resolver);
        let identifiers = deidentify::identifiers_of(patient);

        let mut copies: BTreeMap<Category, CollectionWriter> = BTreeMap::new();
        copies
            .entry(Category::Demographics)
            .or_default()
            .push(&deid.patient(patient));
        let mut critical = CollectionWriter::default();
        critical.push(patient);
        let mut extractor = given.is_none().then(|| index::Extractor::new(patient));
        for r in resources {
            if util::resource_type(&r) == Some("Patient") {
                continue;
            }
            if let Some(category) = research_category(&r, resolver)
                && let Some(clean) = deid.resource(&r)
            {
                copies.entry(category).or_default().push(&clean);
            }
            if categorize::is_critical(&r) {
                critical.push(&r);
            }
            if let Some(e) = &mut extractor {
                e.add(&r, resolver);
            }
        }

        let needles: Vec<String> = identifiers.iter().map(|s| s.to_lowercase()).collect();
        let mut categories = BTreeMap::new();
        for (category, copy) in copies {
            let mut bytes = copy.finish();
            if contains_any(&bytes, &needles) {
                // Safety net: drop every string that still carries an identifier.
                let scrubbed = canonical::parse(&bytes)
                    .ok()
                    .and_then(|bundle| deidentify::scrub(&bundle, &needles))
                    .unwrap_or_else(|| collection(Vec::new()));
                bytes = canonical::to_vec(&scrubbed);
            }
            categories.insert(category, bytes);
        }
        categories.insert(Category::Critical, critical.finish());

        let (index, withheld) = match extractor {
            Some(e) => e.finish(patient, cfg),
            None => given.unwrap_or_default(),
        };
        PatientRecord {
            index,
            withheld,
            source_id,
            categories,
            identifiers,
        }
    }

    /// The research-copy bundle of a category, parsed.
    pub fn bundle(&self, category: Category) -> Option<Value> {
        serde_json::from_slice(self.categories.get(&category)?).ok()
    }
}

fn collection(resources: Vec<Value>) -> Value {
    let entry: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            let mut m = Map::new();
            m.insert("resource".into(), r);
            Value::Object(m)
        })
        .collect();
    let mut bundle = Map::new();
    bundle.insert("resourceType".into(), Value::from("Bundle"));
    bundle.insert("type".into(), Value::from("collection"));
    bundle.insert("entry".into(), Value::Array(entry));
    Value::Object(bundle)
}

/// Whether `haystack`, lower-cased, contains any of the (lower-case) `needles`.
pub(crate) fn contains_any(haystack: &[u8], needles: &[String]) -> bool {
    if needles.is_empty() {
        return false;
    }
    let lower = String::from_utf8_lossy(haystack).to_lowercase();
    needles
        .iter()
        .any(|n| memchr::memmem::find(lower.as_bytes(), n.as_bytes()).is_some())
}
