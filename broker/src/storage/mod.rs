//! The embedded store: SQLite metadata and index ([`db`]) and content-addressed
//! envelope blobs ([`blobs`]), and Parquet snapshots of the cohort index
//! ([`index_snapshot`]), all under one data directory.
pub mod blobs;
pub mod db;
pub mod index_snapshot;

pub use blobs::BlobStore;
pub use db::Db;
pub use index_snapshot::IndexSnapshots;
