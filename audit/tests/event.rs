//! The event model, its canonical encoding, and patient tags.

mod common;

use audit_log::event::{
    Actor, ActorRole, AuditEvent, EventError, EventKind, Outcome, PatientKey, PatientSalt,
    PatientTagKey, write_canonical,
};
use common::sample_event;

#[test]
fn canonical_json_is_sorted_and_compact() {
    let e = sample_event(3);
    let bytes = e.to_leaf_bytes().unwrap();
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(
        text.starts_with("{\"actor\":{\"id\":\"researcher-0003\",\"organisation\":"),
        "{text}"
    );
    // Keys sorted at every level.
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    fn check_sorted(v: &serde_json::Value) {
        if let serde_json::Value::Object(m) = v {
            let keys: Vec<&String> = m.keys().collect();
            let mut sorted = keys.clone();
            sorted.sort();
            assert_eq!(keys, sorted);
            m.values().for_each(check_sorted);
        }
        if let serde_json::Value::Array(a) = v {
            a.iter().for_each(check_sorted);
        }
    }
    check_sorted(&value);
    assert_eq!(AuditEvent::from_leaf_bytes(&bytes).unwrap(), e);
    // Deterministic.
    assert_eq!(sample_event(3).to_leaf_bytes().unwrap(), bytes);
}

#[test]
fn exact_encoding_of_a_minimal_event() {
    let mut e = AuditEvent::new(
        EventKind::AuthorizationFailed,
        1_700_000_000,
        Actor {
            id: "key:ab12".into(),
            role: ActorRole::Unauthenticated,
            organisation: None,
        },
    );
    e.outcome = Outcome::Refused {
        reason: "unknown key \"ab12\"".into(),
    };
    assert_eq!(
        String::from_utf8(e.to_leaf_bytes().unwrap()).unwrap(),
        r#"{"actor":{"id":"key:ab12","role":"unauthenticated"},"kind":"authorization_failed","outcome":{"reason":"unknown key \"ab12\"","result":"refused"},"time":1700000000,"v":1}"#
    );
}

#[test]
fn non_canonical_leaves_are_rejected() {
    let e = sample_event(1);
    let bytes = e.to_leaf_bytes().unwrap();
    // Pretty-printed, or with keys in another order: same event, other bytes.
    let pretty = serde_json::to_vec_pretty(&e).unwrap();
    assert!(matches!(
        AuditEvent::from_leaf_bytes(&pretty),
        Err(EventError::NotCanonical)
    ));
    let unsorted = serde_json::to_vec(&e).unwrap();
    assert_ne!(unsorted, bytes);
    assert!(AuditEvent::from_leaf_bytes(&unsorted).is_err());
    // Explicit nulls for absent fields.
    let text = String::from_utf8(bytes.clone()).unwrap();
    let with_null = text.replacen("{\"actor\"", "{\"a\":null,\"actor\"", 1);
    assert!(AuditEvent::from_leaf_bytes(with_null.as_bytes()).is_err());
    // Unknown schema version.
    let v2 = text.replace("\"v\":1,", "\"v\":2,");
    assert_ne!(v2, text);
    assert!(matches!(
        AuditEvent::from_leaf_bytes(v2.as_bytes()),
        Err(EventError::UnknownVersion(2))
    ));
    assert!(AuditEvent::from_leaf_bytes(b"not json").is_err());
    // Floats have no canonical form here.
    let mut out = Vec::new();
    assert!(write_canonical(&serde_json::json!({"x": 1.5}), &mut out).is_err());
}

#[test]
fn every_kind_round_trips() {
    use EventKind::*;
    for kind in [
        Enroll,
        Upload,
        ConsentSet,
        ConsentRevoked,
        StudyProposed,
        StudyApproved,
        StudyRejected,
        GrantIssued,
        GrantWithdrawn,
        FeasibilityCount,
        Release,
        Fetch,
        BreakGlass,
        BreakGlassReview,
        Erasure,
        KeyRotation,
        AuthorizationFailed,
    ] {
        let mut e = sample_event(9);
        e.kind = kind;
        let bytes = e.to_leaf_bytes().unwrap();
        assert_eq!(AuditEvent::from_leaf_bytes(&bytes).unwrap(), e);
    }
}

#[test]
fn patient_tags() {
    let key = PatientTagKey::new([7u8; 32]);
    let salt = PatientSalt([1u8; 32]);
    let tag = key.tag(&salt, "patient-42");
    // Stable, and the patient can recompute it from their own key.
    assert_eq!(key.tag(&salt, "patient-42"), tag);
    let patient_key = key.patient_key(&salt);
    assert_eq!(
        PatientKey::from_bytes(patient_key.to_bytes()).tag("patient-42"),
        tag
    );
    // Depends on the log secret, the salt and the patient id.
    assert_ne!(PatientTagKey::new([8u8; 32]).tag(&salt, "patient-42"), tag);
    assert_ne!(key.tag(&PatientSalt([2u8; 32]), "patient-42"), tag);
    assert_ne!(key.tag(&salt, "patient-43"), tag);
    // Keys do not leak through Debug.
    assert_eq!(format!("{key:?}"), "PatientTagKey(..)");
    assert_eq!(format!("{salt:?}"), "PatientSalt(..)");
    assert_ne!(PatientSalt::random(), PatientSalt::random());
}

/// Erasure: the broker deletes the patient's salt. The events stay in the log and every
/// proof still verifies, but the tag can no longer be tied to the patient: with a fresh
/// salt (or none) the same patient gets an unrelated tag.
#[test]
fn erasure_keeps_proofs_but_unlinks_tags() {
    let dir = tempfile::tempdir().unwrap();
    let key = PatientTagKey::new(rand::random());
    let salt = PatientSalt::random();
    let tag = key.tag(&salt, "patient-42");
    let mut log = audit_log::AuditLog::create(dir.path(), "broker.example/audit").unwrap();
    let mut e = sample_event(0);
    e.patient = Some(tag);
    log.append_events(&[e.clone()]).unwrap();
    let root = log.root();
    drop(salt); // erased

    let re_enrolled = PatientSalt::random();
    assert_ne!(key.tag(&re_enrolled, "patient-42"), tag);
    let proof = log.inclusion_proof(0, 1).unwrap();
    proof
        .verify_leaf(&e.to_leaf_bytes().unwrap(), &root)
        .unwrap();
    assert_eq!(log.event(0).unwrap().patient, Some(tag));
}
