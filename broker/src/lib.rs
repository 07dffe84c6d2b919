//! The research data broker, the server.
//!
//! It stores patients' envelopes (which it cannot read) and their consented searchable
//! index, registers actors and studies, relays grants to the proxies, fixes releases
//! and streams re-encrypted records to approved researchers. Every call is signed by
//! the caller's registered key and authorized by role.
//!
//! - [`server`]: data directory, proxies, `start(listener, config, shutdown)`
//! - [`service`]: the domain operations, on domain types only; [`access`]: which role
//!   may call which method
//! - [`grpc`]: the tonic adapter (credentials from metadata, conversion, the one mapping
//!   of [`error::ServiceError`] to a gRPC status)
//! - [`storage`]: SQLite metadata and index, content-addressed blobs
//! - [`proxy_pool`]: the broker's connections to its proxies
//! - [`crash`]: the crash points the crash tests arm
//!
//! The client (`brokerctl`) is its own crate and meets this one only on the wire.
#![forbid(unsafe_code)]

pub mod access;
pub mod crash;
pub mod error;
pub mod grpc;
pub mod proxy_pool;
pub mod server;
pub mod service;
pub mod storage;
