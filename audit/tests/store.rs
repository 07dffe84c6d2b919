//! The durable store: round trips, proofs against checkpoints, crash recovery, and
//! tampering with the files on disk.

mod common;

use std::fs;
use std::path::Path;

use audit_log::store::{
    CHECKPOINTS_FILE, CorruptionKind, LEAVES_FILE, MAX_LEAF_BYTES, RECORD_OVERHEAD, TailCause,
    VerifyError, verify_dir,
};
use audit_log::{AuditEvent, AuditLog, Error, SignedCheckpoint};
use common::{TestMacSigner, TestMacVerifier, sample_event};

const LOG_ID: &str = "broker.example/audit";

fn leaf(i: u64) -> Vec<u8> {
    format!("event number {i} {}", "x".repeat((i % 7) as usize)).into_bytes()
}

fn header_len() -> u64 {
    16 + LOG_ID.len() as u64 + 32
}

/// Byte offset of record `i` in a log of `leaf(0..)` records.
fn offset_of(i: u64) -> u64 {
    header_len()
        + (0..i)
            .map(|j| (leaf(j).len() + RECORD_OVERHEAD) as u64)
            .sum::<u64>()
}

fn record_len(i: u64) -> usize {
    leaf(i).len() + RECORD_OVERHEAD
}

/// A log of `n` leaves appended in batches of 10, with a checkpoint after each batch.
fn make_log(dir: &Path, n: u64) -> Vec<SignedCheckpoint> {
    let signer = TestMacSigner::new("broker");
    let mut log = AuditLog::create(dir, LOG_ID).unwrap();
    let mut cps = Vec::new();
    let mut next = 0;
    while next < n {
        let batch: Vec<Vec<u8>> = (next..n.min(next + 10)).map(leaf).collect();
        let idx = log.append(&batch).unwrap();
        assert_eq!(idx, (next..next + batch.len() as u64).collect::<Vec<_>>());
        next += batch.len() as u64;
        cps.push(log.checkpoint(&signer, 1_000 + next as i64).unwrap());
    }
    cps
}

fn leaves_path(dir: &Path) -> std::path::PathBuf {
    dir.join(LEAVES_FILE)
}

fn edit(dir: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = fs::read(leaves_path(dir)).unwrap();
    f(&mut bytes);
    fs::write(leaves_path(dir), bytes).unwrap();
}

fn corruption(err: Error) -> (u64, CorruptionKind) {
    match err {
        Error::Corrupt(c) => (c.record, c.kind),
        other => panic!("expected corruption, got {other}"),
    }
}

fn verify_corruption(dir: &Path, cps: &[SignedCheckpoint]) -> (u64, CorruptionKind) {
    match verify_dir(dir, cps) {
        Err(VerifyError::Corrupt(c)) => (c.record, c.kind),
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn append_reopen_and_prove() {
    let dir = tempfile::tempdir().unwrap();
    let signer = TestMacSigner::new("broker");
    let verifier = TestMacVerifier::with(&[&signer]);
    let cps = make_log(dir.path(), 45);
    let log = AuditLog::open(dir.path()).unwrap();
    assert_eq!(log.size(), 45);
    assert_eq!(log.log_id(), LOG_ID);
    assert!(log.torn_tail().is_none());
    assert_eq!(log.latest_checkpoint(), cps.last());
    assert_eq!(log.checkpoints().unwrap(), cps);
    for i in 0..45 {
        assert_eq!(log.leaf(i).unwrap(), leaf(i));
    }
    assert!(matches!(
        log.leaf(45),
        Err(Error::NoSuchLeaf {
            index: 45,
            size: 45
        })
    ));
    assert_eq!(
        log.file_bytes(),
        header_len() + (0..45).map(|i| record_len(i) as u64).sum::<u64>()
    );

    // Inclusion of every leaf against every checkpoint that covers it; consistency between
    // every pair of checkpoints.
    for cp in &cps {
        cp.verify(&verifier, &["broker"]).unwrap();
        let c = &cp.checkpoint;
        for i in 0..c.size {
            let proof = log.inclusion_proof(i, c.size).unwrap();
            c.verify_inclusion(&leaf(i), &proof).unwrap();
            assert!(c.verify_inclusion(&leaf(i + 1), &proof).is_err());
        }
        for later in &cps {
            if later.checkpoint.size >= c.size {
                let proof = log
                    .consistency_proof(c.size, later.checkpoint.size)
                    .unwrap();
                c.verify_consistency(&later.checkpoint, &proof).unwrap();
            }
        }
    }
    let report = log.verify_against_all(&cps).unwrap();
    assert_eq!(report.leaves, 45);
    assert_eq!(report.checked_sizes, vec![10, 20, 30, 40, 45]);
}

#[test]
fn empty_log_and_wrong_log_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let signer = TestMacSigner::new("broker");
    let mut log = AuditLog::create(dir.path(), LOG_ID).unwrap();
    let empty = log.checkpoint(&signer, 1).unwrap();
    assert_eq!(empty.checkpoint.size, 0);
    let report = log.verify_against(&empty).unwrap();
    assert_eq!((report.leaves, report.checked_sizes), (0, vec![0]));
    log.append(&[leaf(0)]).unwrap();
    log.verify_against(&empty).unwrap();
    let mut other = log.checkpoint(&signer, 2).unwrap();
    other.checkpoint.log_id = "someone.else/audit".into();
    assert!(matches!(
        log.verify_against(&other),
        Err(VerifyError::WrongLog { .. })
    ));
    assert!(matches!(
        verify_dir(dir.path().join("missing"), &[]),
        Err(VerifyError::Read(Error::NotFound(_)))
    ));
}

#[test]
fn log_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<AuditLog>();
    assert_send_sync::<SignedCheckpoint>();
}

#[test]
fn events_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AuditLog::create(dir.path(), LOG_ID).unwrap();
    let events: Vec<AuditEvent> = (0..5).map(sample_event).collect();
    assert_eq!(log.append_events(&events).unwrap(), vec![0, 1, 2, 3, 4]);
    drop(log);
    let log = AuditLog::open(dir.path()).unwrap();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(&log.event(i as u64).unwrap(), e);
    }
}

#[test]
fn create_open_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        AuditLog::open(dir.path()),
        Err(Error::NotFound(_))
    ));
    assert!(AuditLog::create(dir.path(), "bad\nid").is_err());
    AuditLog::create(dir.path(), LOG_ID).unwrap();
    assert!(matches!(
        AuditLog::create(dir.path(), LOG_ID),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        AuditLog::open_or_create(dir.path(), "other"),
        Err(Error::WrongLogId { .. })
    ));
    let other = tempfile::tempdir().unwrap();
    let log = AuditLog::open_or_create(other.path().join("new"), "fresh").unwrap();
    assert_eq!(log.size(), 0);
    assert_eq!(
        log.root(),
        <audit_log::Blake3 as audit_log::MerkleHasher>::empty_root()
    );
}

#[test]
fn interrupted_create_is_redone_by_open_or_create() {
    let dir = tempfile::tempdir().unwrap();
    AuditLog::create(dir.path(), LOG_ID).unwrap();
    let header = fs::read(leaves_path(dir.path())).unwrap();
    for cut in [0, 5, header.len() - 1] {
        fs::write(leaves_path(dir.path()), &header[..cut]).unwrap();
        assert!(matches!(
            corruption(AuditLog::open(dir.path()).unwrap_err()),
            (0, CorruptionKind::FileHeader(_))
        ));
        // Another id's header prefix, or a damaged one, is not touched.
        if cut > 20 {
            assert!(AuditLog::open_or_create(dir.path(), "other.example/audit").is_err());
        }
        let mut log = AuditLog::open_or_create(dir.path(), LOG_ID).unwrap();
        assert_eq!(log.size(), 0);
        log.append(&[leaf(0)]).unwrap();
        drop(log);
        assert_eq!(AuditLog::open(dir.path()).unwrap().size(), 1);
        fs::remove_file(leaves_path(dir.path())).unwrap();
    }
}

#[test]
fn append_limits_and_checkpoint_time() {
    let dir = tempfile::tempdir().unwrap();
    let signer = TestMacSigner::new("broker");
    let mut log = AuditLog::create(dir.path(), LOG_ID).unwrap();
    assert_eq!(log.append::<Vec<u8>>(&[]).unwrap(), Vec::<u64>::new());
    let big = vec![0u8; MAX_LEAF_BYTES + 1];
    assert!(matches!(
        log.append(&[big]),
        Err(Error::LeafTooLarge { .. })
    ));
    assert_eq!(log.size(), 0);
    // Large batch: hashed in parallel, indices in order.
    let batch: Vec<Vec<u8>> = (0..500).map(leaf).collect();
    assert_eq!(log.append(&batch).unwrap().len(), 500);
    log.checkpoint(&signer, 100).unwrap();
    log.checkpoint(&signer, 100).unwrap();
    assert!(log.checkpoint(&signer, 99).is_err());
}

#[test]
fn changed_byte_in_leaf_is_a_checksum_failure() {
    let dir = tempfile::tempdir().unwrap();
    let cps = make_log(dir.path(), 40);
    edit(dir.path(), |b| b[offset_of(17) as usize + 25] ^= 0x20);
    let err = AuditLog::open(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert_eq!(corruption(err), (17, CorruptionKind::ChecksumMismatch));
    assert!(
        msg.contains("record 17") && msg.contains("fails its checksum"),
        "{msg}"
    );
    assert_eq!(
        verify_corruption(dir.path(), &cps),
        (17, CorruptionKind::ChecksumMismatch)
    );
}

#[test]
fn changed_byte_in_header_or_stored_hash() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 40);
    let clean = fs::read(leaves_path(dir.path())).unwrap();
    // The index field of record 17.
    edit(dir.path(), |b| b[offset_of(17) as usize + 5] ^= 1);
    assert_eq!(
        corruption(AuditLog::open(dir.path()).unwrap_err()),
        (17, CorruptionKind::BadRecordHeader)
    );
    // The last byte of record 17's stored leaf hash.
    fs::write(leaves_path(dir.path()), &clean).unwrap();
    edit(dir.path(), |b| b[offset_of(18) as usize - 1] ^= 1);
    assert_eq!(
        corruption(AuditLog::open(dir.path()).unwrap_err()),
        (17, CorruptionKind::ChecksumMismatch)
    );
    // The file header.
    fs::write(leaves_path(dir.path()), &clean).unwrap();
    edit(dir.path(), |b| b[20] ^= 1);
    assert!(matches!(
        corruption(AuditLog::open(dir.path()).unwrap_err()),
        (0, CorruptionKind::FileHeader(_))
    ));
}

/// Every single-byte change anywhere in the file is detected, never repaired.
#[test]
fn every_single_byte_change_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let cps = make_log(dir.path(), 12);
    let clean = fs::read(leaves_path(dir.path())).unwrap();
    for pos in 0..clean.len() {
        for flip in [0x01u8, 0x80] {
            let mut bytes = clean.clone();
            bytes[pos] ^= flip;
            fs::write(leaves_path(dir.path()), &bytes).unwrap();
            match AuditLog::open(dir.path()) {
                Err(Error::Corrupt(_)) => {}
                other => panic!("byte {pos} ^ {flip:#x}: open gave {other:?}"),
            }
            assert!(verify_dir(dir.path(), &cps).is_err(), "byte {pos}");
            assert_eq!(
                fs::read(leaves_path(dir.path())).unwrap(),
                bytes,
                "file modified"
            );
        }
    }
}

#[test]
fn removed_record_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let cps = make_log(dir.path(), 40);
    edit(dir.path(), |b| {
        let (s, e) = (offset_of(17) as usize, offset_of(18) as usize);
        b.drain(s..e);
    });
    let err = AuditLog::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("claims to be record 18"), "{err}");
    assert_eq!(
        corruption(err),
        (17, CorruptionKind::OutOfOrder { found: 18 })
    );
    assert_eq!(
        verify_corruption(dir.path(), &cps),
        (17, CorruptionKind::OutOfOrder { found: 18 })
    );
}

#[test]
fn reordered_records_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let cps = make_log(dir.path(), 40);
    edit(dir.path(), |b| {
        let (a, m, e) = (
            offset_of(17) as usize,
            offset_of(18) as usize,
            offset_of(19) as usize,
        );
        let r17 = b[a..m].to_vec();
        let r18 = b[m..e].to_vec();
        b.splice(a..e, r18.into_iter().chain(r17));
    });
    assert_eq!(
        corruption(AuditLog::open(dir.path()).unwrap_err()),
        (17, CorruptionKind::OutOfOrder { found: 18 })
    );
    assert!(verify_dir(dir.path(), &cps).is_err());
}

#[test]
fn inserted_record_or_bytes_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let cps = make_log(dir.path(), 40);
    let clean = fs::read(leaves_path(dir.path())).unwrap();
    // A copy of a valid record inserted after itself.
    edit(dir.path(), |b| {
        let (s, e) = (offset_of(17) as usize, offset_of(18) as usize);
        let copy = b[s..e].to_vec();
        b.splice(e..e, copy);
    });
    assert_eq!(
        corruption(AuditLog::open(dir.path()).unwrap_err()),
        (18, CorruptionKind::OutOfOrder { found: 17 })
    );
    // One byte inserted inside a record.
    fs::write(leaves_path(dir.path()), &clean).unwrap();
    edit(dir.path(), |b| b.insert(offset_of(17) as usize + 30, b'!'));
    assert_eq!(
        corruption(AuditLog::open(dir.path()).unwrap_err()),
        (17, CorruptionKind::ChecksumMismatch)
    );
    assert!(verify_dir(dir.path(), &cps).is_err());
    // One byte inserted between records.
    fs::write(leaves_path(dir.path()), &clean).unwrap();
    edit(dir.path(), |b| b.insert(offset_of(17) as usize, 0));
    assert_eq!(
        corruption(AuditLog::open(dir.path()).unwrap_err()),
        (17, CorruptionKind::BadRecordHeader)
    );
    // Bytes appended after the last record that are not the start of a record.
    fs::write(leaves_path(dir.path()), &clean).unwrap();
    edit(dir.path(), |b| b.extend_from_slice(b"garbage"));
    assert_eq!(
        corruption(AuditLog::open(dir.path()).unwrap_err()),
        (40, CorruptionKind::BadRecordHeader)
    );
}

/// A crash mid-append: the final, unacknowledged record is cut short. Open truncates it,
/// reports it, and everything acknowledged (and checkpointed) is intact.
#[test]
fn torn_final_record_is_recovered() {
    for (cut, cause) in [
        (3usize, TailCause::PartialHeader),
        (19, TailCause::PartialHeader),
        (
            20,
            TailCause::PartialRecord {
                declared_len: leaf(40).len() as u32,
            },
        ),
        (
            record_len(40) - 1,
            TailCause::PartialRecord {
                declared_len: leaf(40).len() as u32,
            },
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cps = make_log(dir.path(), 40);
        // The crashed batch: one more record, of which only `cut` bytes reached the disk.
        {
            let mut log = AuditLog::open(dir.path()).unwrap();
            log.append(&[leaf(40)]).unwrap();
        }
        let full_len = offset_of(41);
        edit(dir.path(), |b| b.truncate(offset_of(40) as usize + cut));

        // Verification alone reports it but modifies nothing.
        let report = verify_dir(dir.path(), &cps).unwrap();
        assert_eq!(report.leaves, 40);
        assert_eq!(report.torn_tail.as_ref().unwrap().cause, cause);
        assert_eq!(
            fs::metadata(leaves_path(dir.path())).unwrap().len(),
            offset_of(40) + cut as u64
        );

        let mut log = AuditLog::open(dir.path()).unwrap();
        let tail = log.torn_tail().unwrap().clone();
        assert_eq!(tail.cause, cause);
        assert_eq!(tail.offset, offset_of(40));
        assert_eq!(tail.discarded_bytes, cut as u64);
        assert_eq!(tail.records_kept, 40);
        assert!(tail.to_string().contains("torn final write"), "{tail}");
        assert_eq!(log.size(), 40);
        assert_eq!(log.root(), cps.last().unwrap().checkpoint.root);
        assert_eq!(
            fs::metadata(leaves_path(dir.path())).unwrap().len(),
            offset_of(40)
        );
        // Appending continues cleanly where the log ends.
        log.append(&[leaf(40)]).unwrap();
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        assert!(log.torn_tail().is_none());
        assert_eq!(log.size(), 41);
        assert_eq!(log.file_bytes(), full_len);
        log.verify_against_all(&cps).unwrap();
    }
}

#[test]
fn zero_filled_tail_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 20);
    edit(dir.path(), |b| b.extend_from_slice(&[0u8; 4096]));
    let log = AuditLog::open(dir.path()).unwrap();
    assert_eq!(log.torn_tail().unwrap().cause, TailCause::ZeroFilled);
    assert_eq!(log.size(), 20);
}

/// Cutting into records a checkpoint covers is loss of acknowledged data: open refuses,
/// verification says how much is missing.
#[test]
fn truncating_acknowledged_records_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let cps = make_log(dir.path(), 40);
    edit(dir.path(), |b| b.truncate(offset_of(35) as usize + 7));
    match AuditLog::open(dir.path()) {
        Err(Error::CheckpointMismatch { size: 40, .. }) => {}
        other => panic!("{other:?}"),
    }
    match verify_dir(dir.path(), &cps) {
        Err(VerifyError::TooShort {
            log_size: 35,
            checkpoint_size: 40,
        }) => {}
        other => panic!("{other:?}"),
    }
}

/// The operator rewrites history consistently (valid records, recomputed hashes) and
/// drops its own checkpoint file: only the board's checkpoints catch it, and several of
/// them narrow down where.
#[test]
fn consistent_rewrite_is_caught_by_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let cps = make_log(dir.path(), 40);
    let forged = tempfile::tempdir().unwrap();
    {
        let mut log = AuditLog::create(forged.path(), LOG_ID).unwrap();
        let leaves: Vec<Vec<u8>> = (0..40)
            .map(|i| {
                if i == 25 {
                    b"nothing to see here".to_vec()
                } else {
                    leaf(i)
                }
            })
            .collect();
        log.append(&leaves).unwrap();
    }
    fs::copy(leaves_path(forged.path()), leaves_path(dir.path())).unwrap();

    // The log's own checkpoint file still catches it at open.
    match AuditLog::open(dir.path()) {
        Err(Error::CheckpointMismatch { size: 30, .. }) => {}
        other => panic!("{other:?}"),
    }
    fs::remove_file(dir.path().join(CHECKPOINTS_FILE)).unwrap();
    let log = AuditLog::open(dir.path()).unwrap();

    let latest = cps.last().unwrap();
    match log.verify_against(latest) {
        Err(
            e @ VerifyError::RootMismatch {
                size: 40,
                last_good: None,
            },
        ) => {
            assert!(e.to_string().contains("root for size 40 differs"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    match log.verify_against_all(&cps) {
        Err(
            e @ VerifyError::RootMismatch {
                size: 30,
                last_good: Some(20),
            },
        ) => {
            assert!(e.to_string().contains("a leaf in [20, 30)"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // A proof made from the forged log does not verify against the board's checkpoint.
    let proof = log.inclusion_proof(25, 40).unwrap();
    assert!(
        latest
            .checkpoint
            .verify_inclusion(b"nothing to see here", &proof)
            .is_err()
    );
    // Nor does a consistency proof from an honest earlier checkpoint.
    let proof = log.consistency_proof(20, 40).unwrap();
    assert!(
        cps[1]
            .checkpoint
            .verify_consistency(&latest.checkpoint, &proof)
            .is_err()
    );
}

#[test]
fn change_after_open_is_seen_by_leaf_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let cps = make_log(dir.path(), 30);
    let log = AuditLog::open(dir.path()).unwrap();
    edit(dir.path(), |b| b[offset_of(12) as usize + 22] ^= 4);
    match log.leaf(12) {
        Err(Error::Corrupt(c)) => assert_eq!(c.kind, CorruptionKind::ChangedSinceOpen),
        other => panic!("{other:?}"),
    }
    assert_eq!(log.leaf(11).unwrap(), leaf(11));
    assert_eq!(
        verify_corruption(dir.path(), &cps),
        (12, CorruptionKind::ChecksumMismatch)
    );
    assert!(log.verify_against(cps.last().unwrap()).is_err());
}

#[test]
fn checkpoint_file_torn_line_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let cps = make_log(dir.path(), 20);
    let path = dir.path().join(CHECKPOINTS_FILE);
    let clean = fs::read(&path).unwrap();
    // A torn final line is dropped.
    let mut torn = clean.clone();
    torn.extend_from_slice(b"{\"checkpoint\":{\"log_");
    fs::write(&path, &torn).unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    assert_eq!(log.checkpoints().unwrap(), cps);
    assert_eq!(fs::read(&path).unwrap(), clean);
    drop(log);
    // A damaged complete line is an error.
    let mut damaged = clean.clone();
    damaged[5] = b'#';
    fs::write(&path, &damaged).unwrap();
    assert!(matches!(
        AuditLog::open(dir.path()),
        Err(Error::CheckpointMismatch { position: 0, .. })
    ));
}
