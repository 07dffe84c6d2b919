//! The broker's client: the library behind `brokerctl`, the demo, the benchmarks and the
//! tests. It meets the server only on the wire.
//!
//! - [`wire`]: [`BrokerClient`], every call signed with the caller's identity, answers
//!   converted to domain types;
//! - [`agent`]: the flows of each role on top of it (a custodian's ingest, consent and
//!   grants as each patient's consent permits, a researcher's verified decryption);
//! - [`log_review`]: the board's and the patient's checks of the access log, exports;
//! - [`keystore`]: the custodian's keys for its patients, which never leave it;
//! - [`ui`]: `brokerctl ui`, the local web page for board members and patients;
//! - [`consent_heads`]: the newest consent each patient's agent set, to catch a broker
//!   that hides it.
#![forbid(unsafe_code)]

pub mod agent;
pub mod consent_heads;
pub mod keystore;
pub mod log_review;
pub mod ui;
pub mod wire;

pub use keystore::Keystore;
pub use wire::{BrokerClient, ClientError, ClientResult};
