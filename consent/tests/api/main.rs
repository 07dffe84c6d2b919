//! Tests of the public API, in one binary: the FHIR R4 example table, golden
//! vectors of canonical bytes and hashes, and property tests over random policies
//! and requests.

mod fhir_examples;
mod golden;
mod properties;
