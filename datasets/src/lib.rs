//! Patient data on the custodian's side, before encryption: the per-category research
//! copy and the searchable index rows of each patient, from FHIR R4 input ([`fhir`]) or from
//! a seeded synthetic population ([`synthetic`]). This crate never encrypts; the custodian
//! seals each category's bytes under that category's key elsewhere.
//!
//! Both sources go through one pipeline ([`PatientRecord::from_fhir`]):
//!
//! 1. **Categorization** ([`categorize`]): every resource goes to exactly one
//!    [`Category`](model::Category). By type: Patient → demographics; Condition, CarePlan,
//!    Goal → conditions; Observation, DiagnosticReport → observations; Medication\* →
//!    medications; Procedure, Device → procedures; Immunization → immunizations;
//!    AllergyIntolerance → allergies; Encounter → encounters. A resource whose code, value,
//!    reason or addressed condition is in the sensitive code tables moves to mental health,
//!    substance use, sexual health or genomics instead (e.g. a depression diagnosis, a PHQ-9
//!    score, an encounter or a medication for opioid dependence, an HIV test). Providers,
//!    organizations, locations, billing, provenance, documents and images are not part of
//!    the research copy. The break-glass category `critical` is a full, *not* de-identified
//!    copy of the Patient, allergies, active medication requests, blood type and devices.
//! 2. **De-identification** ([`deidentify`], HIPAA Safe Harbor) of every category except
//!    `critical`: no names, addresses, telecom, identifiers, photos, contacts, narratives,
//!    notes, attachments or other free text; no actors (practitioners, organizations,
//!    locations); every date reduced to its year; ages over 89 become "90 or older";
//!    patients over 89 (this year, or at death) lose their birth year (marked `90+`), every
//!    age and every year before the bucket year; references reduced to their target type
//!    (the patient's own to `Patient/subject`); resource ids replaced by salted hashes.
//!    Codes, values, units and statuses are kept. A final scan removes any string that
//!    still contains one of the patient's identifying strings.
//! 3. **Index extraction** ([`index`]): birth year (90+ bucketed) and sex, then conditions,
//!    measurements, drugs and procedures as coded events with their true dates, less what
//!    would reveal an age over 89 (counted as withheld). The custodian's agent moves every
//!    date by the patient's secret shift before upload (`model::PatientIndex::shifted`).
//!
//! Research-copy bytes are canonical JSON (sorted keys, compact) FHIR `collection` Bundles,
//! so the same input always gives the same bytes.
//!
//! ```
//! use datasets::{DeidConfig, Population};
//! use model::Category;
//!
//! let population = Population::with_config(7, 1_000, DeidConfig::new(2026));
//! let record = population.patient(42);
//! assert_eq!(record.source_id, "synth-000042");
//!
//! // The research copy of a category is a de-identified FHIR Bundle...
//! let demographics = record.bundle(Category::Demographics).unwrap();
//! assert_eq!(demographics["entry"][0]["resource"]["id"], "subject");
//! for (category, bytes) in &record.categories {
//!     if *category != Category::Critical {
//!         let text = String::from_utf8_lossy(bytes);
//!         assert!(record.identifiers.iter().all(|id| !text.contains(id.as_str())));
//!     }
//! }
//! // ...and the index rows come from the same data.
//! assert!(record.index.person.birth_year.is_some());
//!
//! // FHIR input goes through the same pipeline.
//! let bundle = serde_json::to_vec(&population.bundle(42)).unwrap();
//! let report = datasets::import_bundle_json(&bundle, "patient.json".as_ref(), population.config());
//! assert!(report.errors.is_empty());
//! assert_eq!(report.patients[0], record);
//! ```

pub mod categorize;
pub mod deidentify;
pub mod fhir;
pub mod index;
pub mod omop;
pub mod record;
pub mod synthetic;

mod canonical;
mod resolve;
mod util;
mod validate;

pub use deidentify::DeidConfig;
pub use fhir::{
    ImportError, ImportFiles, ImportReport, import_bundle_json, import_json_files,
    import_ndjson_bytes, import_ndjson_files, import_path,
};
pub use index::Withheld;
pub use omop::{OmopError, OmopImport, OmopPatient, import_dir};
pub use record::PatientRecord;
pub use synthetic::Population;
