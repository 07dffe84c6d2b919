//! The subcommands of `brokerctl`, a module per role, and the connection options they
//! share.

pub mod board;
pub mod clinician;
pub mod conn;
pub mod custodian;
pub mod keys;
pub mod operator;
pub mod patient;
pub mod researcher;
pub mod sponsor;
pub mod ui;
