//! The embedded store: SQLite metadata and index ([`db`]) and content-addressed
//! envelope blobs ([`blobs`]), both under one data directory.
pub mod blobs;
pub mod db;

pub use blobs::BlobStore;
pub use db::Db;
