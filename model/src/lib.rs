//! The shared vocabulary of the broker, its clients, the consent engine, the cohort engine
//! and the importers: one definition of each idea, with no transport, storage or query
//! engine behind it (this crate depends on serde, serde_json, blake3 and thiserror only).
//!
//! - [`Category`]: the categories of a record, each encrypted under its own key;
//! - [`SearchField`]: what a consent can make searchable;
//! - [`Role`], [`Actor`], [`Caller`]: who calls;
//! - [`PatientIndex`]: a patient's searchable rows, as importers extract them;
//! - [`CohortDefinition`] (a study's cohort, and a sponsor's feasibility question), with
//!   [`Code`], [`CodeSystem`], [`Date`], [`Sex`] and the concept relations
//!   ([`ConceptHierarchy`]);
//! - [`ResearchPurpose`], [`StudyProposal`], [`Study`]; an [`Upload`] and a fixed
//!   [`Release`];
//! - break-glass: [`EmergencyOrganisation`], [`BreakGlassAccess`] and its [`Review`];
//! - the digests parties sign: [`enrollment_digest`], [`decision_digest`].
//!
//! ```
//! use model::{Category, SearchField};
//! assert_eq!("conditions".parse::<Category>().unwrap(), Category::Conditions);
//! assert_eq!(SearchField::of_domain(model::Domain::Drug), SearchField::Drug);
//! ```
#![forbid(unsafe_code)]

pub mod category;
pub mod date;
pub mod definition;
pub mod emergency;
pub mod enrollment;
pub mod field;
pub mod hierarchy;
pub mod index;
pub mod purpose;
pub mod quote;
pub mod release;
pub mod role;
pub mod sensitive;
pub mod study;
pub mod upload;

pub use category::{Category, UnknownCategory};
pub use date::{Date, DateError};
pub use definition::{
    AtLeast, Code, CodeError, CodeSystem, CohortDefinition, Criterion, DefinitionError,
    DefinitionHash, Demographics, Domain, EventCriterion, Index, IntRange, NormalizedDefinition,
    ObservationWindow, Occurrence, Problem, Sex, ValueRange, Window,
};
pub use emergency::{
    BreakGlassAccess, EmergencyOrganisation, Finding, Review, emergency_grantee,
    emergency_organisation_of,
};
pub use enrollment::{Enrollment, enrollment_digest};
pub use field::{SearchField, UnknownSearchField};
pub use hierarchy::ConceptHierarchy;
pub use index::{
    CodedEvent, DATE_SHIFT_MAX_DAYS, IndexRowError, ObservationPeriod, PatientIndex, Person,
};
pub use purpose::{ResearchPurpose, StudyFocus};
pub use quote::excerpt;
pub use release::Release;
pub use role::{Actor, Caller, Role, UnknownRole};
pub use study::{Study, StudyProposal, StudyStatus, decision_digest, purpose_label};
pub use upload::{EnvelopeReceipt, Upload, UploadReceipt, UploadedEnvelope};
