//! The durable log: an append-only record file replayed into a [`MerkleTree`] at open.
//!
//! See the crate documentation for the file formats and the recovery rules.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointSigner, SignedCheckpoint};
use crate::error::Error;
use crate::event::AuditEvent;
use crate::proof::{ConsistencyProof, InclusionProof};
use crate::tree::{Blake3, Hash, MerkleHasher, MerkleTree};

/// Name of the record file inside the log directory.
pub const LEAVES_FILE: &str = "leaves.log";
/// Name of the file of issued checkpoints inside the log directory.
pub const CHECKPOINTS_FILE: &str = "checkpoints.log";
/// Largest accepted leaf.
pub const MAX_LEAF_BYTES: usize = 1 << 20;

const FILE_MAGIC: &[u8; 8] = b"AUDITLOG";
const FILE_VERSION: u32 = 1;
const RECORD_MAGIC: &[u8; 4] = b"LREC";
/// magic (4) ‖ index (8) ‖ length (4) ‖ header check (4)
const RECORD_HEADER_LEN: usize = 20;
const RECORD_HASH_LEN: usize = 32;
/// Records are read in windows of this many bytes (must exceed the largest record).
const SCAN_WINDOW: usize = 8 << 20;
/// Below this many leaves per batch, leaf hashes are computed on the calling thread.
const PARALLEL_BATCH: usize = 64;

/// Record overhead on disk, in bytes, on top of the leaf itself.
pub const RECORD_OVERHEAD: usize = RECORD_HEADER_LEN + RECORD_HASH_LEN;

/// A damaged place in the record file that is not a torn final write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe_corruption(self))]
pub struct Corruption {
    /// The record index at which the damage was found (the expected index at that place).
    pub record: u64,
    /// Byte offset of that record in `leaves.log`.
    pub offset: u64,
    /// What is wrong.
    pub kind: CorruptionKind,
}

/// The kinds of [`Corruption`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorruptionKind {
    /// The file header is damaged or not a log header.
    FileHeader(String),
    /// The record header fails its check (a changed, inserted or removed byte).
    BadRecordHeader,
    /// The record header is intact but says it is another record (records removed,
    /// reordered or inserted).
    OutOfOrder {
        /// The index the record claims.
        found: u64,
    },
    /// The record header is intact but declares an impossible length.
    TooLarge {
        /// The declared length.
        len: u32,
    },
    /// The record's leaf does not match its stored leaf hash.
    ChecksumMismatch,
    /// The record no longer matches what was read when the log was opened.
    ChangedSinceOpen,
}

fn describe_corruption(c: &Corruption) -> String {
    let at = format!("record {} (byte offset {})", c.record, c.offset);
    match &c.kind {
        CorruptionKind::FileHeader(why) => format!("the file header is damaged: {why}"),
        CorruptionKind::BadRecordHeader => format!("{at} has a damaged header"),
        CorruptionKind::OutOfOrder { found } => format!(
            "{at} is out of place: it claims to be record {found} (records were removed, reordered or inserted)"
        ),
        CorruptionKind::TooLarge { len } => {
            format!("{at} declares an impossible length of {len} bytes")
        }
        CorruptionKind::ChecksumMismatch => {
            format!("{at} fails its checksum: its leaf does not match its stored leaf hash")
        }
        CorruptionKind::ChangedSinceOpen => {
            format!("{at} changed on disk since the log was opened")
        }
    }
}

/// A torn final write found at open: bytes after the last complete record, which were never
/// acknowledged (an append returns only after its whole batch is synced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Offset at which the incomplete data starts (the new file length).
    pub offset: u64,
    /// How many bytes were (or, when only verifying, would be) discarded.
    pub discarded_bytes: u64,
    /// Number of complete records kept.
    pub records_kept: u64,
    /// What the tail looked like.
    pub cause: TailCause,
}

/// What a [`TornTail`] looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailCause {
    /// Fewer bytes than a record header, beginning like one.
    PartialHeader,
    /// An intact record header whose leaf and hash run past the end of the file.
    PartialRecord {
        /// The length the header declares.
        declared_len: u32,
    },
    /// Only zero bytes (space allocated but never written).
    ZeroFilled,
}

impl fmt::Display for TornTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cause = match self.cause {
            TailCause::PartialHeader => "a partial record header".to_string(),
            TailCause::PartialRecord { declared_len } => {
                format!("a record of {declared_len} bytes cut short")
            }
            TailCause::ZeroFilled => "zero bytes".to_string(),
        };
        write!(
            f,
            "torn final write: {} bytes at offset {} after record {} ({cause}); only unacknowledged data is lost",
            self.discarded_bytes, self.offset, self.records_kept
        )
    }
}

/// Why [`AuditLog::verify_against`] or [`verify_dir`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading failed.
    #[error(transparent)]
    Read(Error),
    /// A record is damaged (see [`Corruption`]).
    #[error("{0}")]
    Corrupt(Corruption),
    /// The checkpoint belongs to another log.
    #[error("the checkpoint is for log {checkpoint:?} but this log is {log:?}")]
    WrongLog {
        /// The log's id.
        log: String,
        /// The checkpoint's log id.
        checkpoint: String,
    },
    /// The log has fewer leaves than a checkpoint commits to.
    #[error(
        "the log has only {log_size} leaves but a checkpoint commits to {checkpoint_size}: leaves were removed from the end"
    )]
    TooShort {
        /// Leaves in the log.
        log_size: u64,
        /// Size of the checkpoint.
        checkpoint_size: u64,
    },
    /// The root of the first `size` leaves differs from the checkpoint's.
    #[error("{}", describe_mismatch(*.size, *.last_good))]
    RootMismatch {
        /// The checkpoint's size.
        size: u64,
        /// The largest checked size below `size` whose root still matched, if any.
        last_good: Option<u64>,
    },
}

impl From<Error> for VerifyError {
    fn from(e: Error) -> Self {
        match e {
            Error::Corrupt(c) => Self::Corrupt(c),
            other => Self::Read(other),
        }
    }
}

fn describe_mismatch(size: u64, last_good: Option<u64>) -> String {
    let first = format!("the log's root for size {size} differs from the checkpoint");
    match last_good {
        Some(good) => format!(
            "{first}; it matches the checkpoint for size {good}, so a leaf in [{good}, {size}) was changed, removed, reordered or inserted"
        ),
        None => {
            format!("{first}: a leaf in [0, {size}) was changed, removed, reordered or inserted")
        }
    }
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Complete records in the log.
    pub leaves: u64,
    /// Sizes of the checkpoints the log matched, ascending.
    pub checked_sizes: Vec<u64>,
    /// A torn final write, if the file has one (verification never modifies the file).
    pub torn_tail: Option<TornTail>,
}

/// The durable, append-only audit log in one directory.
///
/// One process at a time may hold a log open for writing; the caller must ensure it (the
/// library takes no lock).
pub struct AuditLog {
    dir: PathBuf,
    leaves_path: PathBuf,
    log_id: String,
    file: File,
    /// File offset of each record.
    offsets: Vec<u64>,
    /// End of the last complete record (the file length).
    end: u64,
    tree: MerkleTree<Blake3>,
    latest_checkpoint: Option<SignedCheckpoint>,
    torn_tail: Option<TornTail>,
    poisoned: bool,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.dir)
            .field("log_id", &self.log_id)
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

impl AuditLog {
    /// Creates a new, empty log with id `log_id` in `dir` (created if missing).
    pub fn create(dir: impl AsRef<Path>, log_id: &str) -> Result<Self, Error> {
        let dir = dir.as_ref();
        // Reject ids that cannot appear in a checkpoint before anything is written.
        Checkpoint {
            log_id: log_id.to_string(),
            size: 0,
            root: [0; 32],
            time: 0,
        }
        .encode()?;
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let leaves_path = dir.join(LEAVES_FILE);
        let mut file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&leaves_path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(dir.to_path_buf()));
            }
            Err(e) => return Err(io_err("creating", &leaves_path)(e)),
        };
        let header = encode_file_header(log_id);
        file.write_all(&header)
            .and_then(|()| file.sync_all())
            .map_err(io_err("writing", &leaves_path))?;
        sync_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            leaves_path,
            log_id: log_id.to_string(),
            file,
            offsets: Vec::new(),
            end: header.len() as u64,
            tree: MerkleTree::new(),
            latest_checkpoint: None,
            torn_tail: None,
            poisoned: false,
        })
    }

    /// Opens the existing log in `dir`, replaying its records into the tree.
    ///
    /// A torn final write is truncated and reported by [`torn_tail`](Self::torn_tail) (and
    /// a `tracing` warning). Any other damage is an [`Error::Corrupt`]; a stored checkpoint
    /// that no longer matches is an [`Error::CheckpointMismatch`]. Neither modifies the files.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref();
        let leaves_path = dir.join(LEAVES_FILE);
        let file = match OpenOptions::new().read(true).write(true).open(&leaves_path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(dir.to_path_buf()));
            }
            Err(e) => return Err(io_err("opening", &leaves_path)(e)),
        };
        let loaded = load(&file, &leaves_path)?;
        let (checkpoints, checkpoints_torn_at) = read_checkpoints(dir)?;
        for (position, signed) in checkpoints.iter().enumerate() {
            let cp = &signed.checkpoint;
            let problem = if cp.log_id != loaded.log_id {
                Some(format!("it is for log {:?}", cp.log_id))
            } else if cp.size > loaded.tree.len() {
                Some(format!(
                    "the log has only {} complete records (acknowledged records are missing)",
                    loaded.tree.len()
                ))
            } else if loaded.tree.root_at(cp.size)? != cp.root {
                Some("the log's root at that size differs".to_string())
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(Error::CheckpointMismatch {
                    position,
                    size: cp.size,
                    problem,
                });
            }
        }
        if let Some(tail) = &loaded.torn_tail {
            tracing::warn!(log = %leaves_path.display(), "{tail}; truncating");
            file.set_len(tail.offset)
                .and_then(|()| file.sync_all())
                .map_err(io_err("truncating", &leaves_path))?;
        }
        if let Some(at) = checkpoints_torn_at {
            let path = dir.join(CHECKPOINTS_FILE);
            tracing::warn!(log = %path.display(), "torn final checkpoint line at offset {at}; truncating");
            let cf = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err("opening", &path))?;
            cf.set_len(at)
                .and_then(|()| cf.sync_all())
                .map_err(io_err("truncating", &path))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            leaves_path,
            log_id: loaded.log_id,
            file,
            offsets: loaded.offsets,
            end: loaded.end,
            tree: loaded.tree,
            latest_checkpoint: checkpoints.into_iter().last(),
            torn_tail: loaded.torn_tail,
            poisoned: false,
        })
    }

    /// Opens the log in `dir`, creating it with `log_id` if there is none; an existing log
    /// must have that id. A `leaves.log` holding only a prefix of the header `create` would
    /// write (a create interrupted by a crash) is replaced by a new log.
    pub fn open_or_create(dir: impl AsRef<Path>, log_id: &str) -> Result<Self, Error> {
        let dir = dir.as_ref();
        match Self::open(dir) {
            Ok(log) if log.log_id == log_id => Ok(log),
            Ok(log) => Err(Error::WrongLogId {
                expected: log_id.to_string(),
                found: log.log_id,
            }),
            Err(Error::NotFound(_)) => Self::create(dir, log_id),
            Err(Error::Corrupt(Corruption {
                kind: CorruptionKind::FileHeader(why),
                ..
            })) => {
                // A `create` that crashed before its header was durable leaves a prefix of
                // that header (nothing was ever acknowledged): start over.
                let path = dir.join(LEAVES_FILE);
                let bytes = fs::read(&path).map_err(io_err("reading", &path))?;
                if encode_file_header(log_id).starts_with(&bytes) {
                    tracing::warn!(log = %path.display(), "incomplete log header from an interrupted create; recreating");
                    fs::remove_file(&path).map_err(io_err("removing", &path))?;
                    Self::create(dir, log_id)
                } else {
                    Err(Corruption {
                        record: 0,
                        offset: 0,
                        kind: CorruptionKind::FileHeader(why),
                    }
                    .into())
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The log's id (the checkpoint origin line).
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.tree.len()
    }

    /// The current root.
    pub fn root(&self) -> Hash {
        self.tree.root()
    }

    /// The root at an earlier size.
    pub fn root_at(&self, size: u64) -> Result<Hash, Error> {
        Ok(self.tree.root_at(size)?)
    }

    /// The in-memory tree.
    pub fn tree(&self) -> &MerkleTree<Blake3> {
        &self.tree
    }

    /// The torn final write that [`open`](Self::open) truncated, if any.
    pub fn torn_tail(&self) -> Option<&TornTail> {
        self.torn_tail.as_ref()
    }

    /// The latest checkpoint the log issued.
    pub fn latest_checkpoint(&self) -> Option<&SignedCheckpoint> {
        self.latest_checkpoint.as_ref()
    }

    /// Size of `leaves.log` in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.end
    }

    /// Appends a batch of leaves durably: all records are written, then synced once, and
    /// only then are they added to the tree and their indices returned.
    ///
    /// After a failed write or sync the handle refuses further appends
    /// ([`Error::Poisoned`]); reopening re-reads the file and recovers.
    pub fn append<L: AsRef<[u8]> + Sync>(&mut self, leaves: &[L]) -> Result<Vec<u64>, Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        if leaves.is_empty() {
            return Ok(Vec::new());
        }
        let mut bytes = 0usize;
        for leaf in leaves {
            let len = leaf.as_ref().len();
            if len > MAX_LEAF_BYTES {
                return Err(Error::LeafTooLarge {
                    len,
                    max: MAX_LEAF_BYTES,
                });
            }
            bytes += len + RECORD_OVERHEAD;
        }
        let hashes: Vec<Hash> = if leaves.len() >= PARALLEL_BATCH {
            leaves
                .par_iter()
                .map(|l| Blake3::leaf_hash(l.as_ref()))
                .collect()
        } else {
            leaves
                .iter()
                .map(|l| Blake3::leaf_hash(l.as_ref()))
                .collect()
        };
        let first = self.tree.len();
        let mut buf = Vec::with_capacity(bytes);
        let mut offsets = Vec::with_capacity(leaves.len());
        for (i, (leaf, hash)) in leaves.iter().zip(&hashes).enumerate() {
            offsets.push(self.end + buf.len() as u64);
            encode_record(&mut buf, first + i as u64, leaf.as_ref(), hash);
        }
        let written = self
            .file
            .write_all_at(&buf, self.end)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.poisoned = true;
            // Best effort: drop the partial batch so a later open sees a clean end.
            let _ = self.file.set_len(self.end);
            return Err(io_err("appending to", &self.leaves_path)(e));
        }
        self.end += buf.len() as u64;
        self.offsets.extend_from_slice(&offsets);
        for hash in hashes {
            self.tree.push_leaf_hash(hash);
        }
        Ok((first..first + leaves.len() as u64).collect())
    }

    /// Encodes and appends a batch of events ([`AuditEvent::to_leaf_bytes`]).
    pub fn append_events(&mut self, events: &[AuditEvent]) -> Result<Vec<u64>, Error> {
        let leaves = events
            .iter()
            .map(AuditEvent::to_leaf_bytes)
            .collect::<Result<Vec<_>, _>>()?;
        self.append(&leaves)
    }

    /// The leaf at `index`, read from disk and checked against the tree.
    pub fn leaf(&self, index: u64) -> Result<Vec<u8>, Error> {
        let size = self.size();
        let (Some(i), true) = (usize::try_from(index).ok(), index < size) else {
            return Err(Error::NoSuchLeaf { index, size });
        };
        let offset = self.offsets[i];
        let next = self.offsets.get(i + 1).copied().unwrap_or(self.end);
        let mut record = vec![0u8; (next - offset) as usize];
        self.file
            .read_exact_at(&mut record, offset)
            .map_err(io_err("reading", &self.leaves_path))?;
        let changed = Corruption {
            record: index,
            offset,
            kind: CorruptionKind::ChangedSinceOpen,
        };
        let header: &[u8; RECORD_HEADER_LEN] = record
            .get(..RECORD_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| changed.clone())?;
        match parse_record_header(header) {
            Ok((found, len))
                if found == index && len as usize + RECORD_OVERHEAD == record.len() => {}
            _ => return Err(changed.into()),
        }
        let payload = &record[RECORD_HEADER_LEN..record.len() - RECORD_HASH_LEN];
        if Some(Blake3::leaf_hash(payload)) != self.tree.leaf_hash(index) {
            return Err(changed.into());
        }
        record.truncate(record.len() - RECORD_HASH_LEN);
        record.drain(..RECORD_HEADER_LEN);
        Ok(record)
    }

    /// The event at `index`.
    pub fn event(&self, index: u64) -> Result<AuditEvent, Error> {
        Ok(AuditEvent::from_leaf_bytes(&self.leaf(index)?)?)
    }

    /// Inclusion proof of leaf `index` in the tree of `size` leaves.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<InclusionProof, Error> {
        Ok(self.tree.inclusion_proof(index, size)?)
    }

    /// Consistency proof from size `old_size` to size `new_size`.
    pub fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<ConsistencyProof, Error> {
        Ok(self.tree.consistency_proof(old_size, new_size)?)
    }

    /// Issues a checkpoint of the current tree at `time`, signed by `signer`, and records it
    /// durably in `checkpoints.log`. Times must not go backwards.
    pub fn checkpoint(
        &mut self,
        signer: &dyn CheckpointSigner,
        time: i64,
    ) -> Result<SignedCheckpoint, Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let checkpoint = Checkpoint {
            log_id: self.log_id.clone(),
            size: self.size(),
            root: self.root(),
            time,
        };
        if let Some(latest) = &self.latest_checkpoint
            && time < latest.checkpoint.time
        {
            return Err(CheckpointError::Regression {
                old_size: latest.checkpoint.size,
                old_time: latest.checkpoint.time,
                new_size: checkpoint.size,
                new_time: time,
            }
            .into());
        }
        let signed = SignedCheckpoint::sign(checkpoint, signer)?;
        let mut line = serde_json::to_vec(&signed).map_err(crate::event::EventError::from)?;
        line.push(b'\n');
        let path = self.dir.join(CHECKPOINTS_FILE);
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .map_err(io_err("writing", &path))?;
        if !existed {
            sync_dir(&self.dir)?;
        }
        self.latest_checkpoint = Some(signed.clone());
        Ok(signed)
    }

    /// All checkpoints the log issued, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<SignedCheckpoint>, Error> {
        Ok(read_checkpoints(&self.dir)?.0)
    }

    /// Re-reads the log from disk and checks it against `checkpoint`; see [`verify_dir`].
    pub fn verify_against(
        &self,
        checkpoint: &SignedCheckpoint,
    ) -> Result<VerifyReport, VerifyError> {
        verify_dir(&self.dir, std::slice::from_ref(checkpoint))
    }

    /// Re-reads the log from disk and checks it against several checkpoints (e.g. all a
    /// board has seen), which also narrows down where a mismatch lies.
    pub fn verify_against_all(
        &self,
        checkpoints: &[SignedCheckpoint],
    ) -> Result<VerifyReport, VerifyError> {
        verify_dir(&self.dir, checkpoints)
    }
}

/// Reads the log in `dir` without modifying anything, recomputes every leaf hash and, as
/// the records stream by, the root at each checkpoint's size, and checks it against the
/// checkpoint. Memory stays small whatever the log's size (no tree is kept).
///
/// Signatures are not checked here: check them first with [`SignedCheckpoint::verify`].
/// The first problem in file order is reported: a damaged record, or a root that differs
/// from a checkpoint (the error names the failing size and, when an earlier checkpoint
/// still matches, the range of leaves where the change lies).
pub fn verify_dir(
    dir: impl AsRef<Path>,
    checkpoints: &[SignedCheckpoint],
) -> Result<VerifyReport, VerifyError> {
    let dir = dir.as_ref();
    let leaves_path = dir.join(LEAVES_FILE);
    let file = match File::open(&leaves_path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NotFound(dir.to_path_buf()).into());
        }
        Err(e) => return Err(io_err("opening", &leaves_path)(e).into()),
    };
    let (log_id, header_len) = read_file_header(&file, &leaves_path)?;
    let mut sorted: Vec<&Checkpoint> = checkpoints.iter().map(|s| &s.checkpoint).collect();
    sorted.sort_by_key(|c| c.size);
    if let Some(other) = sorted.iter().find(|c| c.log_id != log_id) {
        return Err(VerifyError::WrongLog {
            log: log_id,
            checkpoint: other.log_id.clone(),
        });
    }
    let mut pending = sorted.into_iter().peekable();
    let mut frontier = Frontier::default();
    let mut checked_sizes: Vec<u64> = Vec::new();
    let mut check = |frontier: &Frontier,
                     pending: &mut std::iter::Peekable<std::vec::IntoIter<&Checkpoint>>|
     -> Result<(), VerifyError> {
        while let Some(cp) = pending.next_if(|c| c.size == frontier.len()) {
            if frontier.root() != cp.root {
                return Err(VerifyError::RootMismatch {
                    size: cp.size,
                    last_good: checked_sizes.last().copied(),
                });
            }
            checked_sizes.push(cp.size);
        }
        Ok(())
    };
    check(&frontier, &mut pending)?;
    let scanned = scan::<VerifyError>(&file, &leaves_path, header_len, |hashes, _| {
        for hash in hashes {
            frontier.push(*hash);
            check(&frontier, &mut pending)?;
        }
        Ok(())
    })?;
    if let Some(cp) = pending.next() {
        return Err(VerifyError::TooShort {
            log_size: scanned.records,
            checkpoint_size: cp.size,
        });
    }
    Ok(VerifyReport {
        leaves: scanned.records,
        checked_sizes,
        torn_tail: scanned.torn_tail,
    })
}

/// The right edge of a growing tree: the roots of its complete subtrees, largest first
/// (at most 64 of them), enough to compute the root at the current size.
#[derive(Default)]
struct Frontier {
    /// (subtree size, subtree root)
    subtrees: Vec<(u64, Hash)>,
    len: u64,
}

impl Frontier {
    fn push(&mut self, leaf_hash: Hash) {
        let (mut size, mut hash) = (1u64, leaf_hash);
        while let Some(&(top_size, top)) = self.subtrees.last() {
            if top_size != size {
                break;
            }
            self.subtrees.pop();
            hash = Blake3::node_hash(&top, &hash);
            size *= 2;
        }
        self.subtrees.push((size, hash));
        self.len += 1;
    }

    fn len(&self) -> u64 {
        self.len
    }

    /// `MTH` of the leaves pushed so far: the subtrees folded from the right.
    fn root(&self) -> Hash {
        let mut it = self.subtrees.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return Blake3::empty_root();
        };
        for (_, left) in it {
            acc = Blake3::node_hash(left, &acc);
        }
        acc
    }
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// `FILE_MAGIC ‖ version u32 ‖ id length u32 ‖ id ‖ BLAKE3(all of the preceding)`.
fn encode_file_header(log_id: &str) -> Vec<u8> {
    let mut header = Vec::with_capacity(16 + log_id.len() + 32);
    header.extend_from_slice(FILE_MAGIC);
    header.extend_from_slice(&FILE_VERSION.to_le_bytes());
    header.extend_from_slice(&(log_id.len() as u32).to_le_bytes());
    header.extend_from_slice(log_id.as_bytes());
    let check = blake3::hash(&header);
    header.extend_from_slice(check.as_bytes());
    header
}

/// Reads and checks the file header; returns the log id and the header length.
fn read_file_header(file: &File, path: &Path) -> Result<(String, u64), Error> {
    let bad = |why: &str| {
        Error::Corrupt(Corruption {
            record: 0,
            offset: 0,
            kind: CorruptionKind::FileHeader(why.to_string()),
        })
    };
    let mut fixed = [0u8; 16];
    match file.read_exact_at(&mut fixed, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(bad("the file is shorter than a header"));
        }
        Err(e) => return Err(io_err("reading", path)(e)),
    }
    if &fixed[..8] != FILE_MAGIC {
        return Err(bad("not an audit log file"));
    }
    let version = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
    let id_len = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]) as usize;
    if id_len == 0 || id_len > 255 {
        return Err(bad("impossible log id length"));
    }
    let mut rest = vec![0u8; id_len + 32];
    match file.read_exact_at(&mut rest, 16) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(bad("the file is shorter than its header"));
        }
        Err(e) => return Err(io_err("reading", path)(e)),
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(&fixed);
    hasher.update(&rest[..id_len]);
    if hasher.finalize().as_bytes() != &rest[id_len..] {
        return Err(bad("the header fails its check"));
    }
    if version != FILE_VERSION {
        return Err(bad(&format!("unknown format version {version}")));
    }
    let log_id =
        String::from_utf8(rest[..id_len].to_vec()).map_err(|_| bad("the log id is not UTF-8"))?;
    Ok((log_id, (16 + id_len + 32) as u64))
}

fn record_header_check(first16: &[u8]) -> [u8; 4] {
    let h = blake3::hash(first16);
    let b = h.as_bytes();
    [b[0], b[1], b[2], b[3]]
}

/// Appends one record: `"LREC" ‖ index u64 ‖ len u32 ‖ check ‖ leaf ‖ leaf hash`.
fn encode_record(buf: &mut Vec<u8>, index: u64, leaf: &[u8], leaf_hash: &Hash) {
    let start = buf.len();
    buf.extend_from_slice(RECORD_MAGIC);
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(&(leaf.len() as u32).to_le_bytes());
    let check = record_header_check(&buf[start..start + 16]);
    buf.extend_from_slice(&check);
    buf.extend_from_slice(leaf);
    buf.extend_from_slice(leaf_hash);
}

/// Checks a record header; returns the index and leaf length it declares.
fn parse_record_header(h: &[u8; RECORD_HEADER_LEN]) -> Result<(u64, u32), CorruptionKind> {
    if &h[..4] != RECORD_MAGIC || h[16..20] != record_header_check(&h[..16]) {
        return Err(CorruptionKind::BadRecordHeader);
    }
    let mut index = [0u8; 8];
    index.copy_from_slice(&h[4..12]);
    let len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    Ok((u64::from_le_bytes(index), len))
}

struct Loaded {
    log_id: String,
    tree: MerkleTree<Blake3>,
    offsets: Vec<u64>,
    end: u64,
    torn_tail: Option<TornTail>,
}

/// A complete record found in a scan window.
struct Found {
    offset: u64,
    /// Position of the header in the window.
    header: usize,
    payload: std::ops::Range<usize>,
}

/// How framing a window ended.
struct Framed {
    /// The complete records, in order.
    found: Vec<Found>,
    /// Where framing stopped (window position).
    stopped_at: usize,
    /// Why framing stopped before the end of the window, if it did for a reason other than a
    /// record straddling the window's end: a torn tail, or damage.
    stop: Option<Result<TailCause, CorruptionKind>>,
}

/// Frames the records of `win` (file bytes from `off`), the first of which should be
/// record `next_index`. Framing needs only the magic, index and length; the header check of
/// framed records is left to [`check_window`]. A record that stops framing gets the full
/// check here, to tell damage from a torn write.
fn frame_window(win: &[u8], off: u64, at_eof: bool, next_index: u64) -> Framed {
    let mut found: Vec<Found> = Vec::new();
    let mut p = 0usize;
    let mut stop = None;
    while p < win.len() {
        let rem = &win[p..];
        let Some(header) = rem
            .get(..RECORD_HEADER_LEN)
            .and_then(|h| <&[u8; RECORD_HEADER_LEN]>::try_from(h).ok())
        else {
            if at_eof {
                let n = rem.len().min(RECORD_MAGIC.len());
                stop = Some(if rem[..n] == RECORD_MAGIC[..n] {
                    Ok(TailCause::PartialHeader)
                } else {
                    Err(CorruptionKind::BadRecordHeader)
                });
            }
            break;
        };
        let expected = next_index + found.len() as u64;
        let index = u64::from_le_bytes([
            header[4], header[5], header[6], header[7], header[8], header[9], header[10],
            header[11],
        ]);
        let len = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        let total = len as usize + RECORD_OVERHEAD;
        if &header[..4] != RECORD_MAGIC
            || index != expected
            || len as usize > MAX_LEAF_BYTES
            || rem.len() < total
        {
            stop = match parse_record_header(header) {
                Err(kind) => Some(Err(kind)),
                Ok((index, _)) if index != expected => {
                    Some(Err(CorruptionKind::OutOfOrder { found: index }))
                }
                Ok((_, len)) if len as usize > MAX_LEAF_BYTES => {
                    Some(Err(CorruptionKind::TooLarge { len }))
                }
                // An intact header whose record runs past the end of the file.
                Ok((_, len)) if at_eof => Some(Ok(TailCause::PartialRecord { declared_len: len })),
                // ... or past the end of the window: the next window starts with it.
                Ok(_) => None,
            };
            break;
        }
        found.push(Found {
            offset: off + p as u64,
            header: p,
            payload: p + RECORD_HEADER_LEN..p + total - RECORD_HASH_LEN,
        });
        p += total;
    }
    Framed {
        found,
        stopped_at: p,
        stop,
    }
}

/// Checks the headers and leaf hashes of framed records in parallel; returns the leaf
/// hashes, or the earliest failure.
fn check_window(win: &[u8], found: &[Found], next_index: u64) -> Result<Vec<Hash>, Corruption> {
    let checked: Vec<(bool, Hash)> = found
        .par_iter()
        .map(|f| {
            let h = &win[f.header..f.header + RECORD_HEADER_LEN];
            let header_ok = h[16..20] == record_header_check(&h[..16]);
            (header_ok, Blake3::leaf_hash(&win[f.payload.clone()]))
        })
        .collect();
    let mut hashes = Vec::with_capacity(checked.len());
    for (i, (f, (header_ok, hash))) in found.iter().zip(checked).enumerate() {
        let stored = &win[f.payload.end..f.payload.end + RECORD_HASH_LEN];
        let kind = if !header_ok {
            CorruptionKind::BadRecordHeader
        } else if stored != hash {
            CorruptionKind::ChecksumMismatch
        } else {
            hashes.push(hash);
            continue;
        };
        return Err(Corruption {
            record: next_index + i as u64,
            offset: f.offset,
            kind,
        });
    }
    Ok(hashes)
}

/// What a scan of the record file found besides the records themselves.
struct Scanned {
    /// Number of complete, intact records.
    records: u64,
    /// End of the last complete record.
    end: u64,
    torn_tail: Option<TornTail>,
}

/// Reads every record after the file header (`header_len` bytes): checks its header,
/// place and leaf hash, and hands each window's leaf hashes and record offsets to `sink`, in
/// order; finds a torn tail. Never modifies the file. Fails at the first damaged record, or
/// with the first error of `sink`, whichever comes first in file order.
///
/// The file is read in windows; reading the next window overlaps with checking the
/// current one.
fn scan<E: From<Error>>(
    file: &File,
    path: &Path,
    header_len: u64,
    mut sink: impl FnMut(&[Hash], &[u64]) -> Result<(), E>,
) -> Result<Scanned, E> {
    let file_len = file.metadata().map_err(io_err("reading", path))?.len();
    let mut records = 0u64;
    let window_len = |off: u64| SCAN_WINDOW.min((file_len - off) as usize);
    let buffer_len = window_len(header_len.min(file_len));
    let mut current = vec![0u8; buffer_len];
    let mut next = vec![0u8; buffer_len];
    let mut off = header_len;
    if off < file_len {
        file.read_exact_at(&mut current[..window_len(off)], off)
            .map_err(io_err("reading", path))?;
    }
    let torn_tail = loop {
        if off >= file_len {
            break None;
        }
        // `current` holds the window at `off`.
        let want = window_len(off);
        let win = &current[..want];
        let at_eof = off + want as u64 == file_len;
        let next_index = records;
        let framed = frame_window(win, off, at_eof, next_index);
        let stop_offset = off + framed.stopped_at as u64;
        let more = framed.stop.is_none() && stop_offset < file_len;
        if more && framed.stopped_at == 0 {
            // Unreachable (a record always fits in a window), but never loop forever.
            return Err(Error::from(Corruption {
                record: next_index,
                offset: off,
                kind: CorruptionKind::BadRecordHeader,
            })
            .into());
        }
        let next_want = if more { window_len(stop_offset) } else { 0 };
        let (checked, prefetched) = rayon::join(
            || check_window(win, &framed.found, next_index),
            || file.read_exact_at(&mut next[..next_want], stop_offset),
        );
        let hashes = checked.map_err(Error::from)?;
        let offsets: Vec<u64> = framed.found.iter().map(|f| f.offset).collect();
        sink(&hashes, &offsets)?;
        records += hashes.len() as u64;
        match framed.stop {
            None if !more => break None,
            None => {
                prefetched.map_err(io_err("reading", path))?;
                std::mem::swap(&mut current, &mut next);
                off = stop_offset;
            }
            Some(result) => {
                // Space allocated but never written reads as zeros, whatever it looks like.
                let cause = if all_zero_from(file, path, stop_offset, file_len)? {
                    TailCause::ZeroFilled
                } else {
                    match result {
                        Ok(cause) => cause,
                        Err(kind) => {
                            return Err(Error::from(Corruption {
                                record: records,
                                offset: stop_offset,
                                kind,
                            })
                            .into());
                        }
                    }
                };
                break Some(TornTail {
                    offset: stop_offset,
                    discarded_bytes: file_len - stop_offset,
                    records_kept: records,
                    cause,
                });
            }
        }
    };
    let end = torn_tail.as_ref().map_or(file_len, |t| t.offset);
    Ok(Scanned {
        records,
        end,
        torn_tail,
    })
}

/// Reads the record file and builds the tree (see [`scan`]).
fn load(file: &File, path: &Path) -> Result<Loaded, Error> {
    let (log_id, header_len) = read_file_header(file, path)?;
    let mut leaf_hashes: Vec<Hash> = Vec::new();
    let mut offsets: Vec<u64> = Vec::new();
    let scanned = scan::<Error>(file, path, header_len, |hashes, offs| {
        leaf_hashes.extend_from_slice(hashes);
        offsets.extend_from_slice(offs);
        Ok(())
    })?;
    // Give back the growth slack before the tree adds its upper levels.
    leaf_hashes.shrink_to_fit();
    offsets.shrink_to_fit();
    Ok(Loaded {
        log_id,
        tree: MerkleTree::from_leaf_hashes(leaf_hashes),
        offsets,
        end: scanned.end,
        torn_tail: scanned.torn_tail,
    })
}

fn all_zero_from(file: &File, path: &Path, from: u64, file_len: u64) -> Result<bool, Error> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = from;
    while off < file_len {
        let n = buf.len().min((file_len - off) as usize);
        file.read_exact_at(&mut buf[..n], off)
            .map_err(io_err("reading", path))?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// The checkpoints recorded in a log directory's `checkpoints.log`, oldest first, without
/// opening the log (an incomplete last line, a torn write, is left out). For offline
/// checks with [`verify_dir`]; check their signatures first.
pub fn read_checkpoint_file(dir: impl AsRef<Path>) -> Result<Vec<SignedCheckpoint>, Error> {
    Ok(read_checkpoints(dir.as_ref())?.0)
}

/// Reads `checkpoints.log` (one JSON [`SignedCheckpoint`] per line). Returns the
/// checkpoints and, if the last line is incomplete (a torn write), its offset.
fn read_checkpoints(dir: &Path) -> Result<(Vec<SignedCheckpoint>, Option<u64>), Error> {
    let path = dir.join(CHECKPOINTS_FILE);
    let data = match fs::read(&path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) => return Err(io_err("reading", &path)(e)),
    };
    let mut checkpoints = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let Some(nl) = data[pos..].iter().position(|&b| b == b'\n') else {
            return Ok((checkpoints, Some(pos as u64)));
        };
        let line = &data[pos..pos + nl];
        let signed: SignedCheckpoint =
            serde_json::from_slice(line).map_err(|e| Error::CheckpointMismatch {
                position: checkpoints.len(),
                size: 0,
                problem: format!(
                    "line {} of {CHECKPOINTS_FILE} is damaged: {e}",
                    checkpoints.len() + 1
                ),
            })?;
        checkpoints.push(signed);
        pos += nl + 1;
    }
    Ok((checkpoints, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontier_roots_match_the_tree() {
        let mut frontier = Frontier::default();
        let mut tree = MerkleTree::<Blake3>::new();
        assert_eq!(frontier.root(), tree.root());
        for i in 0u32..300 {
            let h = Blake3::leaf_hash(&i.to_le_bytes());
            frontier.push(h);
            tree.push_leaf_hash(h);
            assert_eq!(frontier.root(), tree.root(), "size {}", i + 1);
            assert!(frontier.subtrees.len() <= 9);
        }
    }

    #[test]
    fn record_round_trip() {
        let mut buf = Vec::new();
        let leaf = b"hello";
        encode_record(&mut buf, 7, leaf, &Blake3::leaf_hash(leaf));
        assert_eq!(buf.len(), leaf.len() + RECORD_OVERHEAD);
        let header: &[u8; RECORD_HEADER_LEN] = buf[..RECORD_HEADER_LEN].try_into().unwrap();
        assert_eq!(parse_record_header(header), Ok((7, 5)));
        let mut damaged = *header;
        damaged[13] ^= 1;
        assert_eq!(
            parse_record_header(&damaged),
            Err(CorruptionKind::BadRecordHeader)
        );
    }
}
