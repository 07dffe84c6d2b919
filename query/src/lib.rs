//! Cohort selection over the consented searchable index.
pub mod cohort;
pub mod index;

pub use cohort::Cohort;
pub use index::{CodedEvent, PatientIndex, Person};
