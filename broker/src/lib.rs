//! The research data broker: the server (`broker`) and the client (`brokerctl`).
//!
//! It stores patients' envelopes (which it cannot read) and their consented searchable
//! index, registers actors and studies, relays grants to the proxies, fixes releases
//! and streams re-encrypted records to approved researchers. Every call is signed by
//! the caller's registered key and authorized by role.
//!
//! - [`server`]: data directory, proxies, `start(listener, config, shutdown)`
//! - [`service`]: the domain operations; [`grpc`]: the tonic adapter; [`convert`]
//! - [`storage`]: SQLite metadata and index, content-addressed blobs
//! - [`client`]: the signed-request client used by `brokerctl`, the demo and the tests
pub mod agent;
pub mod client;
pub mod consent;
pub mod convert;
pub mod demo;
pub mod error;
pub mod grpc;
pub mod log_review;
pub mod methods;
pub mod proxy_pool;
pub mod role;
pub mod server;
pub mod service;
pub mod storage;
pub mod study;
