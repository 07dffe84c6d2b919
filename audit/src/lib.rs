//! The tamper-evident access log.
//!
//! Every consequential event of the broker (enrolment, upload, consent, study decisions,
//! grants, releases, fetches, break-glass access, erasure, key rotation, refused requests)
//! is appended to an append-only Merkle log. The log periodically issues *checkpoints*
//! (signed tree heads) that ethics boards co-sign as witnesses after checking that each new
//! checkpoint extends the last one they saw (a consistency proof). A patient can check that
//! an event about them is in the log (an inclusion proof against a signed checkpoint), and a
//! proxy can refuse to re-encrypt for a release whose event is not provably logged. Nobody,
//! the operator included, can rewrite, drop or reorder logged events without the signed
//! checkpoints held by others exposing it.
//!
//! # Modules
//!
//! - [`tree`]: the Merkle tree ([`MerkleTree`]), generic over the hash ([`MerkleHasher`]);
//!   [`Blake3`] in production.
//! - [`proof`]: [`InclusionProof`], [`ConsistencyProof`] and their RFC 9162 verification.
//! - [`checkpoint`]: [`Checkpoint`], [`SignedCheckpoint`], the pluggable
//!   [`CheckpointSigner`] / [`CheckpointVerifier`] traits, and [`witness_cosign`].
//! - [`store`]: the durable log in a directory ([`AuditLog`]) and [`verify_dir`].
//! - [`event`]: the event model ([`AuditEvent`]), its canonical leaf bytes, and patient
//!   pseudonyms ([`PatientTagKey`]).
//!
//! # Hashing
//!
//! The tree is the one of RFC 6962 §2.1 / RFC 9162 §2.1 with `H` = BLAKE3 (32-byte output):
//!
//! - leaf hash `H(0x00 ‖ leaf bytes)`, interior node `H(0x01 ‖ left ‖ right)`;
//! - `MTH({})` = `H("")`; for `n > 1` leaves, `MTH(D[n]) = H(0x01 ‖ MTH(D[0:k]) ‖ MTH(D[k:n]))`
//!   with `k` the largest power of two smaller than `n`;
//! - inclusion proofs are `PATH(m, D[n])` and consistency proofs `PROOF(m, D[n])`, generated
//!   as in RFC 9162 §2.1.3.1 / §2.1.4.1 and verified with the algorithms of §2.1.3.2 /
//!   §2.1.4.2. Consistency from size 0 is the empty proof (with old root `H("")`); between
//!   equal sizes it is the empty proof with equal roots.
//!
//! The tree is generic over the hash so that the test suite runs the RFC 6962 /
//! certificate-transparency SHA-256 test vectors against the same code.
//!
//! ## Why not `ct-merkle`
//!
//! `ct-merkle` 0.3 was evaluated first. Its hash side would fit (it uses `digest` 0.11, which
//! `blake3` 1.8 implements behind `traits-preview`), but its tree does not:
//!
//! - `MemoryBackedTree` keeps every leaf *value* in memory besides its `2n` node hashes. At ten
//!   million events of ~600 bytes that is ~6 GB of leaves. Storing leaf hashes as the values
//!   instead does not help: the tree hashes each value as a leaf, `H(0x00 ‖ value)`, so it
//!   would no longer be the RFC tree of the events.
//! - It proves only against its *current* size (`prove_inclusion(idx)`,
//!   `prove_consistency(num_additions)`); the log must prove against any earlier checkpoint
//!   size, e.g. to a board that last saw size 5000 while the log is at 9000.
//! - Several entry points panic on out-of-range input (`InclusionProof::from_bytes`, the
//!   `indices_for_*` helpers), and verification takes leaf values rather than leaf hashes.
//!
//! So the tree here is a small own implementation over leaf hashes only. It stores every
//! complete, aligned subtree hash, level by level (level 0 = leaf hashes); an append pushes
//! a leaf hash and one parent per completed level (amortized O(1)); the root of any earlier
//! size and every proof node is a stored subtree or a combination of at most `log2 n` of
//! them, so proofs cost O(log n) look-ups and O(log n) hashes. Memory is at most `2n`
//! hashes: 640 MB for ten million leaves (plus 8 bytes per leaf of file offsets in
//! [`AuditLog`]); leaf contents stay on disk.
//!
//! # On-disk format
//!
//! A log directory holds two files. All integers are little-endian.
//!
//! `leaves.log`, the record file:
//!
//! ```text
//! file header:  "AUDITLOG" (8) ‖ version u32 = 1 ‖ id_len u32 ‖ log id (id_len bytes, UTF-8)
//!               ‖ BLAKE3(all preceding header bytes) (32)
//! record i:     "LREC" (4) ‖ i u64 ‖ len u32 ‖ check (4) ‖ leaf (len bytes) ‖ leaf hash (32)
//!               check     = first 4 bytes of BLAKE3(the 16 bytes "LREC" ‖ i ‖ len)
//!               leaf hash = BLAKE3(0x00 ‖ leaf), the RFC leaf hash
//! ```
//!
//! Records follow each other with no gaps; the overhead is
//! [`RECORD_OVERHEAD`](store::RECORD_OVERHEAD) = 52 bytes per leaf, leaves are at most
//! [`MAX_LEAF_BYTES`](store::MAX_LEAF_BYTES). An [`append`](AuditLog::append) writes a whole
//! batch and syncs it once (`fdatasync`) before returning the indices: a batch is
//! acknowledged only once it is durable.
//!
//! [`AuditLog::open`] reads every record and checks its header check, its index (records
//! must be in order, none missing) and its leaf hash, then rebuilds the tree. Where the
//! records stop making sense it decides:
//!
//! - **torn final write** (recovered): the bytes after the last complete record are a
//!   prefix of a record header, or an intact header whose record runs past the end of the
//!   file, or only zero bytes. These were never acknowledged; they are truncated and
//!   reported ([`AuditLog::torn_tail`], and a `tracing` warning);
//! - **anything else** (not repaired): a record failing its header check or leaf hash, a
//!   record out of place (removed, reordered or inserted records) or trailing bytes that are
//!   not a record start is an [`Error::Corrupt`] naming the record index and byte offset,
//!   e.g. "record 17 (byte offset 1234) fails its checksum: its leaf does not match its
//!   stored leaf hash". Nothing is modified.
//!
//! A consistent rewrite (records re-encoded with valid checks and hashes) passes these
//! checks; it is caught by checkpoints: [`AuditLog::verify_against`] / [`verify_dir`]
//! re-read every record from disk, recompute the root at each checkpoint's size as the
//! records stream by (in constant memory) and compare it with the checkpoint's root ("the log's root for size
//! 5000 differs from the checkpoint; it matches the checkpoint for size 4000, so a leaf in
//! [4000, 5000) was changed, removed, reordered or inserted").
//!
//! `checkpoints.log`: every checkpoint the log issued, one JSON [`SignedCheckpoint`] per line
//! (`{"checkpoint":{"log_id":…,"size":…,"root":"<hex>","time":…},"signatures":[{"key_id":…,
//! "signature":"<base64>"}]}`). At open, each must still match the tree (or open fails with
//! [`Error::CheckpointMismatch`], which also catches the loss of acknowledged records); an
//! incomplete last line is a torn write and is dropped.
//!
//! A `leaves.log` holding only a prefix of its header (a `create` interrupted by a crash) is
//! rejected by [`AuditLog::open`] and started over by [`AuditLog::open_or_create`].
//!
//! One process at a time may hold a log open; the library takes no lock.
//!
//! # Checkpoints
//!
//! The canonical body of a [`Checkpoint`] follows the C2SP checkpoint text format (origin,
//! size, root, then an extension line):
//!
//! ```text
//! <log id>\n
//! <size, decimal, no leading zeros>\n
//! <root, standard base64 with padding>\n
//! time <unix seconds, decimal>\n
//! ```
//!
//! The log id must be non-empty, at most 255 bytes, without control characters. Signers
//! sign `"audit-log checkpoint v1\n" ‖ body` ([`Checkpoint::signed_message`]): the prefix
//! keeps these signatures apart from anything else the broker's keys sign. Decoding accepts
//! only the canonical form. [`SignedCheckpoint::to_note`] gives the signed-note text: the
//! body, an empty line, then one line `— <key id> <base64 signature>` per signature (key ids:
//! no whitespace, no `+`). Unlike C2SP notes, a signature line carries no key hash: keys are
//! named by id only.
//!
//! Signatures are pluggable ([`CheckpointSigner`], [`CheckpointVerifier`]) so the broker can
//! use its own keys; [`SignedCheckpoint::verify`] names every required key whose signature is
//! missing, duplicated or invalid.
//!
//! # Events
//!
//! [`AuditEvent::to_leaf_bytes`] is the canonical JSON of the event: no insignificant
//! whitespace, object members sorted by the bytes of their keys at every level, strings
//! escaped as `serde_json` escapes them, integers only (the model has no floats), absent
//! optional fields omitted (never `null`), empty lists omitted. [`AuditEvent::from_leaf_bytes`]
//! accepts only that exact form. Events hold ids, hashes and a keyed patient pseudonym,
//! never patient data. The pseudonym is
//! `BLAKE3-keyed(BLAKE3-keyed(log secret, "audit-log patient key v1\0" ‖ salt),
//! "audit-log patient tag v1\0" ‖ patient id)` with a random per-patient salt
//! ([`PatientTagKey`]); erasing a patient deletes the salt, after which the tags in the log
//! can no longer be linked to them while every proof still verifies.
//!
//! # Example
//!
//! ```
//! use audit_log::event::{Actor, ActorRole, AuditEvent, EventKind};
//! use audit_log::{AuditLog, CheckpointSigner, CheckpointVerifier};
//!
//! // Stand-in keys for the example; the broker plugs in its real signature scheme.
//! struct ExampleKey;
//! impl CheckpointSigner for ExampleKey {
//!     fn key_id(&self) -> String { "broker".into() }
//!     fn sign(&self, msg: &[u8]) -> Vec<u8> { blake3::keyed_hash(&[7; 32], msg).as_bytes().to_vec() }
//! }
//! impl CheckpointVerifier for ExampleKey {
//!     fn verify(&self, key_id: &str, msg: &[u8], sig: &[u8]) -> bool {
//!         key_id == "broker" && blake3::keyed_hash(&[7; 32], msg).as_bytes() == sig
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let mut log = AuditLog::create(dir.path(), "broker.example/audit")?;
//! let actor = Actor { id: "researcher-7".into(), role: ActorRole::Registered(model::Role::Researcher), organisation: None };
//! let mut release = AuditEvent::new(EventKind::Release, 1_760_000_000, actor);
//! release.details.release_id = Some("release-1".into());
//! let index = log.append_events(&[release.clone()])?[0];
//! let signed = log.checkpoint(&ExampleKey, 1_760_000_001)?;
//!
//! // A proxy, before re-encrypting: the checkpoint is signed, and the release is in it.
//! signed.verify(&ExampleKey, &["broker"])?;
//! let proof = log.inclusion_proof(index, signed.checkpoint.size)?;
//! signed.checkpoint.verify_inclusion(&release.to_leaf_bytes()?, &proof)?;
//! # Ok(())
//! # }
//! ```

pub mod checkpoint;
pub mod error;
pub mod event;
pub mod proof;
pub mod store;
pub mod tree;

pub use checkpoint::{
    Checkpoint, CheckpointError, CheckpointSignature, CheckpointSigner, CheckpointVerifier,
    SignedCheckpoint, witness_cosign,
};
pub use error::Error;
pub use event::{AuditEvent, EventFilter, EventKind, PatientTag, PatientTagKey};
pub use proof::{ConsistencyProof, InclusionProof, ProofError};
pub use store::{
    AuditLog, Corruption, CorruptionKind, TornTail, VerifyError, VerifyReport,
    read_checkpoint_file, verify_dir,
};
pub use tree::{Blake3, Hash, MerkleHasher, MerkleTree};
