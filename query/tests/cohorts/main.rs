//! Tests of the cohort engine's public API: query results as data, the consent filter,
//! protected counts, sensitive codes, the SQL export against DataFusion's own SQL, Parquet round trips.

mod common;
mod consent;
mod export;
mod protect;
mod queries;
mod reference;
mod sensitive;
