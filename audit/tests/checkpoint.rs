//! Checkpoint encoding, signatures and witnessing.

mod common;

use audit_log::checkpoint::{
    Checkpoint, CheckpointError, SIGNING_CONTEXT, SignatureFailure, SignedCheckpoint,
    witness_cosign,
};
use audit_log::tree::Blake3;
use audit_log::{AuditLog, MerkleHasher};
use common::{TestMacSigner, TestMacVerifier};

fn cp() -> Checkpoint {
    Checkpoint {
        log_id: "broker.example/audit".into(),
        size: 1234,
        root: *blake3::hash(b"root").as_bytes(),
        time: 1_760_000_000,
    }
}

#[test]
fn canonical_body() {
    let c = cp();
    let body = c.encode().unwrap();
    assert_eq!(
        body,
        format!(
            "broker.example/audit\n1234\n{}\ntime 1760000000\n",
            base64_std(&c.root)
        )
    );
    assert_eq!(Checkpoint::decode(&body).unwrap(), c);
    let msg = c.signed_message().unwrap();
    assert!(msg.starts_with(SIGNING_CONTEXT));
    assert_eq!(&msg[SIGNING_CONTEXT.len()..], body.as_bytes());

    // Negative times are fine.
    let neg = Checkpoint { time: -5, ..cp() };
    assert_eq!(Checkpoint::decode(&neg.encode().unwrap()).unwrap(), neg);

    // Non-canonical or malformed bodies are rejected.
    let root = base64_std(&c.root);
    for bad in [
        format!("broker.example/audit\n01234\n{root}\ntime 1760000000\n"),
        format!("broker.example/audit\n+1234\n{root}\ntime 1760000000\n"),
        format!("broker.example/audit\n1234\n{root}\ntime 1760000000"),
        format!("broker.example/audit\n1234\n{root}\ntime  1760000000\n"),
        format!("broker.example/audit\n1234\n{root}\n1760000000\n"),
        format!("broker.example/audit\n1234\n{root}\ntime 1760000000\nextra\n"),
        format!(
            "broker.example/audit\n1234\n{}\ntime 1760000000\n",
            root.trim_end_matches('=')
        ),
        format!(
            "broker.example/audit\n1234\n{}\ntime 1760000000\n",
            base64_std(&[1u8; 31])
        ),
        format!("\n1234\n{root}\ntime 1760000000\n"),
        "".to_string(),
    ] {
        assert!(Checkpoint::decode(&bad).is_err(), "{bad:?}");
    }
    // Unencodable log ids.
    for id in ["", "a\nb", "a\rb"] {
        let c = Checkpoint {
            log_id: id.into(),
            ..cp()
        };
        assert!(matches!(c.encode(), Err(CheckpointError::InvalidLogId(_))));
    }
}

fn base64_std(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn signatures_name_the_failing_key() {
    let broker = TestMacSigner::new("broker");
    let board_a = TestMacSigner::new("board-a");
    let board_b = TestMacSigner::new("board-b");
    let verifier = TestMacVerifier::with(&[&broker, &board_a, &board_b]);

    let mut signed = SignedCheckpoint::sign(cp(), &broker).unwrap();
    signed.cosign(&board_a).unwrap();
    assert!(matches!(
        signed.cosign(&board_a),
        Err(CheckpointError::DuplicateSignature(_))
    ));
    signed.verify(&verifier, &["broker", "board-a"]).unwrap();
    // Extra signatures by unknown keys are ignored.
    signed.cosign(&TestMacSigner::new("somebody-else")).unwrap();
    signed.verify(&verifier, &["broker", "board-a"]).unwrap();

    // Missing signature.
    let err = signed
        .verify(&verifier, &["broker", "board-b"])
        .unwrap_err();
    assert_eq!(
        err,
        CheckpointError::Signatures(vec![SignatureFailure::Missing("board-b".into())])
    );
    assert!(
        err.to_string().contains("no signature by \"board-b\""),
        "{err}"
    );

    // A flipped signature byte.
    let mut bad = signed.clone();
    bad.signatures[1].signature[0] ^= 1;
    assert_eq!(
        bad.verify(&verifier, &["broker", "board-a"]).unwrap_err(),
        CheckpointError::Signatures(vec![SignatureFailure::Invalid("board-a".into())])
    );

    // Any change to the checkpoint invalidates every signature.
    for change in [
        |c: &mut Checkpoint| c.size += 1,
        |c: &mut Checkpoint| c.root[7] ^= 1,
        |c: &mut Checkpoint| c.time += 1,
        |c: &mut Checkpoint| c.log_id.push('x'),
    ] {
        let mut bad = signed.clone();
        change(&mut bad.checkpoint);
        assert_eq!(
            bad.verify(&verifier, &["broker", "board-a"]).unwrap_err(),
            CheckpointError::Signatures(vec![
                SignatureFailure::Invalid("broker".into()),
                SignatureFailure::Invalid("board-a".into()),
            ])
        );
    }

    // A signature smuggled in twice under one key.
    let mut dup = signed.clone();
    dup.signatures.push(dup.signatures[0].clone());
    assert_eq!(
        dup.verify(&verifier, &["broker"]).unwrap_err(),
        CheckpointError::Signatures(vec![SignatureFailure::Duplicate("broker".into())])
    );
}

#[test]
fn note_and_json_round_trip() {
    let broker = TestMacSigner::new("broker");
    let board = TestMacSigner::new("board");
    let mut signed = SignedCheckpoint::sign(cp(), &broker).unwrap();
    signed.cosign(&board).unwrap();
    let note = signed.to_note().unwrap();
    assert!(note.starts_with(&cp().encode().unwrap()));
    assert!(note.contains("\n\n\u{2014} broker "));
    assert_eq!(SignedCheckpoint::from_note(&note).unwrap(), signed);
    let json = serde_json::to_string(&signed).unwrap();
    assert_eq!(
        serde_json::from_str::<SignedCheckpoint>(&json).unwrap(),
        signed
    );

    for bad in [
        note.replacen("\n\n", "\n", 1),
        note.trim_end().to_string(),
        note.replace("\u{2014} board ", "- board "),
        note.replace("\u{2014} board ", "\u{2014} bo ard "),
        format!("{note}\u{2014} broker AAAA\n"),
    ] {
        assert!(SignedCheckpoint::from_note(&bad).is_err(), "{bad:?}");
    }
    assert!(SignedCheckpoint::sign(cp(), &TestMacSigner::new("has space")).is_err());
}

#[test]
fn witness_checks_consistency_before_cosigning() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestMacSigner::new("broker");
    let board = TestMacSigner::new("board");
    let verifier = TestMacVerifier::with(&[&broker, &board]);
    let mut log = AuditLog::create(dir.path(), "broker.example/audit").unwrap();

    log.append(&[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()])
        .unwrap();
    let mut first = log.checkpoint(&broker, 10).unwrap();
    witness_cosign(&mut first, None, None, &verifier, "broker", &board).unwrap();
    first.verify(&verifier, &["broker", "board"]).unwrap();

    log.append(&[b"d".to_vec(), b"e".to_vec()]).unwrap();
    let mut second = log.checkpoint(&broker, 20).unwrap();
    let proof = log.consistency_proof(3, 5).unwrap();
    // Without a proof, or with the wrong one, the board refuses.
    assert!(
        witness_cosign(
            &mut second.clone(),
            Some(&first.checkpoint),
            None,
            &verifier,
            "broker",
            &board
        )
        .is_err()
    );
    let wrong = log.consistency_proof(2, 5).unwrap();
    assert!(
        witness_cosign(
            &mut second.clone(),
            Some(&first.checkpoint),
            Some(&wrong),
            &verifier,
            "broker",
            &board
        )
        .is_err()
    );
    witness_cosign(
        &mut second,
        Some(&first.checkpoint),
        Some(&proof),
        &verifier,
        "broker",
        &board,
    )
    .unwrap();
    second.verify(&verifier, &["broker", "board"]).unwrap();

    // A checkpoint for a forked history (same size, other contents) is refused.
    let other_dir = tempfile::tempdir().unwrap();
    let mut fork = AuditLog::create(other_dir.path(), "broker.example/audit").unwrap();
    fork.append(&[
        b"a".to_vec(),
        b"b".to_vec(),
        b"X".to_vec(),
        b"d".to_vec(),
        b"e".to_vec(),
    ])
    .unwrap();
    let mut forked = fork.checkpoint(&broker, 30).unwrap();
    let fork_proof = fork.consistency_proof(3, 5).unwrap();
    let err = witness_cosign(
        &mut forked,
        Some(&first.checkpoint),
        Some(&fork_proof),
        &verifier,
        "broker",
        &board,
    )
    .unwrap_err();
    assert!(matches!(err, CheckpointError::Proof(_)), "{err}");

    // A checkpoint not signed by the log is refused.
    let mut unsigned = second.clone();
    unsigned.signatures.clear();
    assert!(witness_cosign(&mut unsigned, None, None, &verifier, "broker", &board).is_err());

    // Going back in time is refused.
    let mut older = SignedCheckpoint::sign(
        Checkpoint {
            time: 5,
            ..second.checkpoint.clone()
        },
        &broker,
    )
    .unwrap();
    assert!(matches!(
        witness_cosign(
            &mut older,
            Some(&first.checkpoint),
            Some(&proof),
            &verifier,
            "broker",
            &board
        ),
        Err(CheckpointError::Regression { .. })
    ));
}

#[test]
fn release_gate_inclusion_against_signed_checkpoint() {
    // What a proxy does before re-encrypting: verify the checkpoint's signatures, then the
    // release event's inclusion proof against it.
    let dir = tempfile::tempdir().unwrap();
    let broker = TestMacSigner::new("broker");
    let verifier = TestMacVerifier::with(&[&broker]);
    let mut log = AuditLog::create(dir.path(), "broker.example/audit").unwrap();
    let events: Vec<_> = (0..20).map(common::sample_event).collect();
    let idx = log.append_events(&events).unwrap();
    let signed = log.checkpoint(&broker, 1).unwrap();
    signed.verify(&verifier, &["broker"]).unwrap();
    let leaf = events[7].to_leaf_bytes().unwrap();
    let proof = log.inclusion_proof(idx[7], signed.checkpoint.size).unwrap();
    signed.checkpoint.verify_inclusion(&leaf, &proof).unwrap();
    // Another event, or a proof for another size, does not pass.
    let other = events[8].to_leaf_bytes().unwrap();
    assert!(signed.checkpoint.verify_inclusion(&other, &proof).is_err());
    let proof_19 = log.inclusion_proof(idx[7], 19).unwrap();
    assert!(
        signed
            .checkpoint
            .verify_inclusion(&leaf, &proof_19)
            .is_err()
    );
    // Proofs survive JSON.
    let json = serde_json::to_string(&proof).unwrap();
    assert_eq!(
        serde_json::from_str::<audit_log::InclusionProof>(&json).unwrap(),
        proof
    );
    assert_eq!(
        Blake3::leaf_hash(&leaf),
        log.tree().leaf_hash(idx[7]).unwrap()
    );
}
