//! Patient consent policies: the model, its evaluation, GA4GH DUO matching and FHIR
//! Consent import.
#![forbid(unsafe_code)]

pub mod duo;
pub mod error;
pub mod evaluate;
pub mod policy;
