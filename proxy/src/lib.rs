//! A re-encryption proxy: one node of the t-of-n network (a pre-kms node).
//!
//! - [`node`]: the kfrags it holds, each verified on deposit and kept in the node's own
//!   SQLite file, and re-encryption of capsules for releases proven to be in the log;
//! - [`grpc`]: `broker.v1.Proxy`, callable only by the broker's key, and
//!   `serve(listener, node, broker_key, tls, shutdown)` (TLS with the node's own
//!   certificate, which the broker pins).
//!
//! The cryptography itself (opening sealed kfrags, checking a logged release,
//! re-encrypting) is `pre_kms`'s; this crate adds the storage and the transport.
#![forbid(unsafe_code)]

pub mod grpc;
pub mod node;

pub use grpc::{ProxyService, ServeError, serve};
pub use node::{Deposit, NodeError, ProxyNode, ReencryptRequest};
