//! The access log through the real server: every operation is logged; the board verifies
//! the log (signatures, consistency, every leaf) and reads and exports it; each patient
//! sees every access to their own data with proofs, and is alerted to releases; any
//! change to the stored log is detected.

use std::collections::BTreeSet;
use std::path::Path;

use audit_log::EventKind;
use broker::server::{ServeConfig, check_access_log};
use brokerctl::BrokerClient;
use brokerctl::log_review::{self, ShownEvent};
use datasets::{PatientRecord, Population};
use integration_tests::Sandbox;
use model::CohortDefinition;
use model::Role;
use pre_kms::{Category, Identity};

const CATS: [Category; 2] = [Category::Demographics, Category::Conditions];

fn kinds(events: &[ShownEvent]) -> BTreeSet<EventKind> {
    events.iter().map(|e| e.event.kind).collect()
}

fn count(events: &[ShownEvent], kind: EventKind) -> usize {
    events.iter().filter(|e| e.event.kind == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boards_verify_and_read_the_log_and_patients_see_their_own_accesses() {
    let sandbox = Sandbox::start().await;
    let cast = sandbox.cast().await;
    let population = Population::new(5, 4);
    let patients: Vec<(Identity, PatientRecord)> = (0..4)
        .map(|i| (Identity::generate(), population.patient(i)))
        .collect();
    brokerctl::agent::ingest_batch(&cast.custodian, patients.clone())
        .await
        .unwrap();
    let ids: Vec<Identity> = patients.iter().map(|(id, _)| id.clone()).collect();
    cast.consent_broadly(&ids).await.unwrap();
    let study = cast
        .approved_study("log study", &CATS, CohortDefinition::everyone())
        .await
        .unwrap();
    // Patients 0..3 grant; patient 3 does not.
    let granting: Vec<_> = patients[..3]
        .iter()
        .map(|(id, _)| (id.clone(), CATS.to_vec()))
        .collect();
    cast.grant_all(&study, &granting, 10, |_| {}).await.unwrap();
    let (report, _) = cast.fetch(&study).await.unwrap();
    assert_eq!(report.release.subjects, 3);
    // A refused call is logged too.
    assert!(cast.researcher.list_studies().await.is_ok());
    assert!(
        cast.researcher
            .decide_study(&study.study_id, true, false, "")
            .await
            .is_err()
    );

    // The board: first verification, full, co-signed.
    let state = sandbox.dir.path().join("board.log-state.json");
    let first = log_review::verify_log(&cast.board, &state, true, true)
        .await
        .expect("the log verifies");
    assert_eq!(first.previous_size, None);
    assert_eq!(first.leaves_recomputed, Some(first.size));
    assert_eq!(first.cosignatures, Some(2), "broker + board");
    let all = log_review::board_events(&cast.board, Default::default())
        .await
        .unwrap();
    assert_eq!(count(&all, EventKind::Enroll), 4);
    assert_eq!(count(&all, EventKind::Upload), 4);
    assert_eq!(count(&all, EventKind::ConsentSet), 4);
    assert_eq!(count(&all, EventKind::StudyProposed), 1);
    assert_eq!(count(&all, EventKind::StudyApproved), 1);
    assert_eq!(count(&all, EventKind::GrantIssued), 3);
    assert_eq!(count(&all, EventKind::Release), 3);
    assert_eq!(count(&all, EventKind::Fetch), 1);
    let refused: Vec<_> = all
        .iter()
        .filter(|e| e.event.kind == EventKind::AuthorizationFailed)
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(
        refused[0].event.actor.id,
        cast.researcher.identity().actor_id()
    );

    // Filters and exports.
    let releases = log_review::board_events(
        &cast.board,
        log_review::events_filter(
            None,
            None,
            Some(study.study_id.clone()),
            None,
            vec!["release".into()],
        ),
    )
    .await
    .unwrap();
    assert_eq!(releases.len(), 3);
    assert!(
        releases
            .iter()
            .all(|e| e.event.details.record_count == Some(2))
    );
    let none = log_review::board_events(
        &cast.board,
        log_review::events_filter(Some(i64::MAX / 2), None, None, None, vec![]),
    )
    .await
    .unwrap();
    assert!(none.is_empty());
    let jsonl = log_review::to_jsonl(&all);
    assert_eq!(jsonl.lines().count(), all.len());
    for line in jsonl.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
    assert_eq!(log_review::to_csv(&all).lines().count(), all.len() + 1);
    for line in log_review::to_fhir_ndjson(&all).lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["resourceType"], "AuditEvent");
        assert!(r["recorded"].as_str().unwrap().ends_with('Z'));
    }

    // Each patient sees their own events, proven; the one who did not grant sees no release.
    let patient = |i: usize| cast.custodian.with_identity(patients[i].0.clone());
    let mine = log_review::patient_accesses(&patient(0), None)
        .await
        .unwrap();
    assert_eq!(
        kinds(&mine),
        BTreeSet::from([
            EventKind::Enroll,
            EventKind::Upload,
            EventKind::ConsentSet,
            EventKind::GrantIssued,
            EventKind::Release
        ])
    );
    let tags: BTreeSet<_> = mine.iter().map(|e| e.event.patient).collect();
    assert_eq!(tags.len(), 1, "one tag per patient");
    let theirs = log_review::patient_accesses(&patient(1), None)
        .await
        .unwrap();
    assert!(
        mine.iter()
            .all(|m| theirs.iter().all(|t| t.index != m.index))
    );
    let other = log_review::patient_accesses(&patient(3), None)
        .await
        .unwrap();
    assert_eq!(count(&other, EventKind::Release), 0);

    // Alerts: the release, once; read after --ack.
    let alerts = log_review::patient_alerts(&patient(0), None, true)
        .await
        .unwrap();
    assert_eq!(kinds(&alerts), BTreeSet::from([EventKind::Release]));
    assert!(
        log_review::patient_alerts(&patient(0), None, false)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        log_review::patient_alerts(&patient(3), None, false)
            .await
            .unwrap()
            .is_empty()
    );
    // Only patients may ask; a board may not read patients' alerts.
    assert!(
        log_review::patient_alerts(&cast.board, None, false)
            .await
            .is_err()
    );
    // Only boards may read the whole log.
    assert!(
        log_review::board_events(&cast.researcher, Default::default())
            .await
            .is_err()
    );

    // A second release, then an incremental verification from the kept state.
    cast.fetch(&study).await.unwrap();
    let second = log_review::verify_log(&cast.board, &state, false, false)
        .await
        .expect("the grown log verifies");
    assert_eq!(second.previous_size, Some(first.size));
    assert!(second.size > first.size);

    // A changed leaf on disk, under the running broker, fails the board's full check.
    let leaves = sandbox.data_dir().join("audit").join("leaves.log");
    let original = std::fs::read(&leaves).unwrap();
    let records = records(&original);
    let (start, len) = records[3].leaf;
    let mut changed = original.clone();
    changed[start + len / 2] ^= 0x01;
    std::fs::write(&leaves, &changed).unwrap();
    let err = log_review::verify_log(&cast.board, &state, true, false).await;
    assert!(err.is_err(), "a changed leaf went unnoticed");
    std::fs::write(&leaves, &original).unwrap();
    log_review::verify_log(&cast.board, &state, true, false)
        .await
        .expect("verifies again once restored");
    sandbox.stop().await;
}

/// The byte ranges of each record in a `leaves.log` (format in the audit-log crate docs).
struct Record {
    whole: (usize, usize),
    leaf: (usize, usize),
    hash: usize,
}

fn records(file: &[u8]) -> Vec<Record> {
    let id_len = u32::from_le_bytes(file[12..16].try_into().unwrap()) as usize;
    let mut pos = 16 + id_len + 32;
    let mut out = Vec::new();
    while pos < file.len() {
        assert_eq!(&file[pos..pos + 4], b"LREC");
        let len = u32::from_le_bytes(file[pos + 12..pos + 16].try_into().unwrap()) as usize;
        let leaf = pos + 20;
        out.push(Record {
            whole: (pos, 20 + len + 32),
            leaf: (leaf, len),
            hash: leaf + len,
        });
        pos = leaf + len + 32;
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_change_to_the_stored_log_is_detected() {
    let mut sandbox = Sandbox::start().await;
    let custodian = sandbox.actor(Role::Custodian).await;
    let population = Population::new(9, 3);
    let patients: Vec<(Identity, PatientRecord)> = (0..3)
        .map(|i| (Identity::generate(), population.patient(i)))
        .collect();
    brokerctl::agent::ingest_batch(&custodian, patients)
        .await
        .unwrap();
    // A checkpoint covering every leaf, so that removing the last one is detectable too.
    let board: BrokerClient = sandbox.actor(Role::Board).await;
    board.log_checkpoint().await.unwrap();
    let data = sandbox.data_dir();
    sandbox.running.take().unwrap().stop().await;

    let pristine = check_access_log(&data).expect("the untouched log verifies");
    assert_eq!(
        pristine.leaves, 6,
        "3 enrolments and 3 uploads: {pristine:?}"
    );
    let leaves_path = |dir: &Path| dir.join("audit").join("leaves.log");
    let original = std::fs::read(leaves_path(&data)).unwrap();
    let recs = records(&original);
    let scratch = tempfile::tempdir().unwrap();

    // What the offline check reads: the broker's key and the log.
    let check = |name: &str, bytes: Vec<u8>| -> String {
        let dir = scratch.path().join(name);
        copy_dir(&data.join("audit"), &dir.join("audit"));
        std::fs::copy(data.join("broker.key"), dir.join("broker.key")).unwrap();
        std::fs::write(leaves_path(&dir), bytes).unwrap();
        match check_access_log(&dir) {
            Ok(r) => panic!("{name}: not detected ({r:?})"),
            Err(e) => e,
        }
    };

    // Every byte of the file, changed.
    for pos in 0..original.len() {
        let mut b = original.clone();
        b[pos] ^= 0x20;
        check(&format!("flip-{pos}"), b);
        std::fs::remove_dir_all(scratch.path().join(format!("flip-{pos}"))).unwrap();
    }
    let splice = |parts: &[&[u8]]| parts.concat();
    let rec = |i: usize| &original[recs[i].whole.0..recs[i].whole.0 + recs[i].whole.1];
    let before = |i: usize| &original[..recs[i].whole.0];
    let after = |i: usize| &original[recs[i].whole.0 + recs[i].whole.1..];
    // A record removed (the last one, or one in the middle).
    let last = recs.len() - 1;
    let e = check("remove-last", before(last).to_vec());
    assert!(e.contains("removed"), "{e}");
    check("remove-middle", splice(&[before(2), after(2)]));
    // Two records swapped.
    check(
        "swap",
        splice(&[
            before(1),
            rec(2),
            rec(1),
            &original[recs[2].whole.0 + recs[2].whole.1..],
        ]),
    );
    // A record inserted (a copy of another).
    check(
        "insert",
        splice(&[before(2), rec(1), &original[recs[2].whole.0..]]),
    );
    // A consistent rewrite: a leaf changed and its stored hash recomputed, so every record
    // checks out on its own; only the signed checkpoints can tell.
    let mut rewrite = original.clone();
    let (start, len) = recs[1].leaf;
    let leaf = &mut rewrite[start..start + len];
    let at = leaf.iter().position(|b| b.is_ascii_digit()).unwrap();
    leaf[at] = if leaf[at] == b'9' { b'8' } else { leaf[at] + 1 };
    let mut h = blake3::Hasher::new();
    h.update(&[0]);
    h.update(&rewrite[start..start + len]);
    let hash = *h.finalize().as_bytes();
    rewrite[recs[1].hash..recs[1].hash + 32].copy_from_slice(&hash);
    let e = check("rewrite", rewrite.clone());
    assert!(e.contains("checkpoint") || e.contains("root"), "{e}");

    // A checkpoint file edited: its signature no longer verifies.
    let dir = scratch.path().join("checkpoint-edit");
    copy_dir(&data, &dir);
    let cp_path = dir.join("audit").join("checkpoints.log");
    let cps = std::fs::read_to_string(&cp_path).unwrap();
    let mut first: audit_log::SignedCheckpoint =
        serde_json::from_str(cps.lines().next().unwrap()).unwrap();
    first.checkpoint.time += 1;
    let mut edited = serde_json::to_string(&first).unwrap();
    edited.push('\n');
    for l in cps.lines().skip(1) {
        edited.push_str(l);
        edited.push('\n');
    }
    std::fs::write(&cp_path, edited).unwrap();
    let e = check_access_log(&dir).unwrap_err();
    assert!(e.contains("not signed"), "{e}");

    // And the broker refuses to serve a rewritten log.
    let dir = scratch.path().join("serve-rewrite");
    copy_dir(&data, &dir);
    std::fs::write(leaves_path(&dir), rewrite).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started =
        broker::server::start(listener, ServeConfig::new(&dir), std::future::pending()).await;
    let err = started
        .err()
        .expect("a rewritten log must stop the broker from starting");
    assert!(err.to_string().contains("access log"), "{err}");
}
