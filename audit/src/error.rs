//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::checkpoint::CheckpointError;
use crate::event::EventError;
use crate::proof::ProofError;
use crate::store::Corruption;

/// Everything that can go wrong with the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The files on disk are damaged or were tampered with (not a torn final write).
    #[error("the log is corrupt: {0}")]
    Corrupt(#[from] Corruption),
    /// A checkpoint the log issued earlier no longer matches the log's contents.
    #[error("stored checkpoint {position} (size {size}) does not match the log: {problem}")]
    CheckpointMismatch {
        /// Position of the checkpoint in `checkpoints.log` (0-based).
        position: usize,
        /// Its size.
        size: u64,
        /// What differs.
        problem: String,
    },
    /// The directory holds no log.
    #[error("no audit log in {0} (missing leaves.log)")]
    NotFound(PathBuf),
    /// `create` was called on a directory that already holds a log.
    #[error("an audit log already exists in {0}")]
    AlreadyExists(PathBuf),
    /// The log on disk has another id than the one asked for.
    #[error("the log in this directory is {found:?}, not {expected:?}")]
    WrongLogId {
        /// The id asked for.
        expected: String,
        /// The id on disk.
        found: String,
    },
    /// A leaf is larger than [`MAX_LEAF_BYTES`](crate::store::MAX_LEAF_BYTES).
    #[error("a leaf of {len} bytes exceeds the limit of {max} bytes")]
    LeafTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No leaf with this index.
    #[error("there is no leaf {index}; the log has {size} leaves")]
    NoSuchLeaf {
        /// The index asked for.
        index: u64,
        /// The log's size.
        size: u64,
    },
    /// An earlier write or sync failed; the handle refuses writes until the log is reopened.
    #[error("the log refuses writes after an earlier failed write or sync; reopen it")]
    Poisoned,
    /// A proof could not be made.
    #[error(transparent)]
    Proof(#[from] ProofError),
    /// A checkpoint could not be made, encoded or checked.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// An event could not be encoded or decoded.
    #[error(transparent)]
    Event(#[from] EventError),
}
