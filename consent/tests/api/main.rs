//! Tests of the public API, in one binary: the FHIR R4 example table and property
//! tests over random policies and requests.

mod fhir_examples;
mod properties;
