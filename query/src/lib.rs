//! Cohort selection over the consented searchable index.
//!
//! Sponsors ask how many patients match a cohort; the answer may use only the fields each
//! counted patient consented to make searchable for the study's purpose, must not leak
//! individuals, and must be fast at a million patients. This crate holds:
//!
//! * [`CohortDefinition`] ([`definition`]): criteria groups, exclusions, demographics,
//!   condition/measurement/drug/procedure criteria with code sets, descendants, occurrence
//!   counts and time windows (absolute, from the index, from each event of another
//!   criterion), observation around the index date; JSON in, validated, with a normalized
//!   form and hash;
//! * [`IndexBuilder`] / [`IndexTables`] ([`tables`]): the index as Arrow tables keyed by an
//!   integer `person_id`, from [`PatientIndex`] rows or Parquet files;
//! * [`CohortEngine`] ([`engine`]): definitions compiled to DataFusion plans, with the
//!   consent filter ([`ConsentSnapshot`]) as a mandatory analyzer rule; exact counts,
//!   attrition, selected ids, `EXPLAIN`;
//! * [`protect`]: `<11` suppression, keyed noise drawn once per normalized attrition step,
//!   consent snapshot and index version (so equivalent questions share a draw and
//!   averaging gains nothing), rounding, and [`QueryBudget`] per sponsor, charged per fresh
//!   draw;
//! * sensitive codes (mental health, substance use, sexual health, genomics, classified by
//!   [`model::sensitive`]) count only for patients whose consent permits their category.
//!
//! ```text
//!   definition JSON ──validate──▶ CohortDefinition ──compile──▶ LogicalPlan (person sets)
//!                                                                   │
//!   ConsentSnapshot ──▶ consent_filter (AnalyzerRule) ◀─────────────┘
//!                          │  every index scan: consented(person_id, field); person
//!                          ▼  birth_year/sex masked per patient
//!                     optimizer ─▶ IndexTableProvider (code index, consent applied)
//!                          │
//!                          ▼
//!                     CountResult { exact, attrition } ──protect──▶ "<11" / "1235"
//! ```
//!
//! The broker selects a study's release with the same engine, under the same snapshot,
//! through [`CohortEngine::select`]: there is no other way to pick patients.
//!
//! See [`engine`] for an end-to-end example.

pub mod consent;
pub mod engine;
pub mod protect;
pub mod sql;
pub mod tables;

mod compile;
mod consent_filter;
mod parquet_files;
mod provider;
mod sensitivity;
mod sets;

pub use model::{
    AtLeast, Category, Code, CodeError, CodeSystem, CodedEvent, CohortDefinition, ConceptHierarchy,
    Criterion, Date, DateError, DefinitionError, DefinitionHash, Demographics, Domain,
    EventCriterion, Index, IntRange, NormalizedDefinition, ObservationPeriod, ObservationWindow,
    Occurrence, PatientIndex, Person, Problem, SearchField, Sex, ValueRange, Window,
};
/// The vocabulary the engine shares with the broker, the consent crate and the importers
/// (cohort definitions, codes, dates, the patient index, concept relations), re-exported.
pub use model::{date, definition, hierarchy, index};

pub use consent::{ConsentBuilder, ConsentError, ConsentHash, ConsentSnapshot};
pub use engine::{
    Access, AttritionStep, CohortEngine, CountResult, EngineOptions, IndexVersion, QueryError,
};
pub use protect::{
    BrokerSecret, BudgetError, BudgetPolicy, Charge, CountBasis, DrawId, Draws, ProtectedCount,
    ProtectedResult, ProtectedStep, ProtectionPolicy, QueryBudget, Remaining, protect,
    protect_count,
};
pub use tables::{IndexBuilder, IndexError, IndexTables};
