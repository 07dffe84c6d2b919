//! Protected counts as a sponsor sees them: `<11` below 11, the same answer to the same or
//! an equivalent reordered question, every attrition step protected.

use cohort_query::{
    BrokerSecret, CohortEngine, ConsentSnapshot, ProtectedCount, ProtectionPolicy, protect,
};

use crate::common::{self, def};

fn setup() -> (CohortEngine, ConsentSnapshot) {
    let n = 600;
    let patients = common::population(21, n);
    let consent = common::consent(21, n, 0.9);
    (
        CohortEngine::from_index(common::tables(&patients), common::hierarchy()),
        consent,
    )
}

fn secret() -> BrokerSecret {
    BrokerSecret::from_bytes(*b"an example broker secret 32bytes")
}

#[test]
fn below_eleven_is_reported_as_less_than_eleven() {
    let (engine, consent) = setup();
    // A narrow cohort: few patients.
    let d = def(r#"{"criteria": [
        {"condition": {"codes": ["snomed:44054006"], "occurrence": {"at_least": 3}}},
        {"procedure": {"codes": ["snomed:80146002"]}}]}"#);
    let exact = engine.count_blocking(&d, &consent).unwrap();
    assert!(exact.exact < 11, "fixture too broad: {}", exact.exact);
    let p = protect(
        &exact,
        &d,
        &consent.hash(),
        &secret(),
        &ProtectionPolicy::default(),
    );
    assert_eq!(p.count, ProtectedCount::Below(11));
    assert_eq!(p.count.to_string(), "<11");
    // The population step is large, so it is a rounded number.
    assert!(matches!(p.attrition[0].count, ProtectedCount::About(n) if n % 5 == 0 && n > 100));
}

#[test]
fn same_question_same_answer_and_reordering_teaches_nothing() {
    let (engine, consent) = setup();
    let a = def(r#"{"title": "one", "criteria": [
        {"condition": {"codes": ["snomed:38341003"]}},
        {"any": [{"drug": {"codes": ["rxnorm:617312"]}}, {"demographics": {"sex": ["male"]}}]}]}"#);
    let b = def(r#"{"title": "the same, reordered", "criteria": [
        {"any": [{"demographics": {"sex": ["male"]}}, {"drug": {"codes": ["rxnorm:617312"]}}]},
        {"condition": {"codes": ["snomed:38341003"]}}]}"#);
    let policy = ProtectionPolicy::default();
    let ra = engine.count_blocking(&a, &consent).unwrap();
    let rb = engine.count_blocking(&b, &consent).unwrap();
    assert_eq!(ra.exact, rb.exact);
    assert!(ra.exact >= 30, "fixture too narrow: {}", ra.exact);
    let pa = protect(&ra, &a, &consent.hash(), &secret(), &policy);
    let pa2 = protect(
        &engine.count_blocking(&a, &consent).unwrap(),
        &a,
        &consent.hash(),
        &secret(),
        &policy,
    );
    let pb = protect(&rb, &b, &consent.hash(), &secret(), &policy);
    assert_eq!(pa, pa2, "the same query twice");
    assert_eq!(pa.count, pb.count, "an equivalent reordered query");
    // The last attrition step is the whole definition: the same protected count.
    assert_eq!(pa.attrition.last().unwrap().count, pa.count);
    assert_eq!(pb.attrition.last().unwrap().count, pb.count);
    // Each step is protected like the shorter definition it counts.
    let first_only = def(r#"{"criteria": [{"condition": {"codes": ["snomed:38341003"]}}]}"#);
    let p1 = protect(
        &engine.count_blocking(&first_only, &consent).unwrap(),
        &first_only,
        &consent.hash(),
        &secret(),
        &policy,
    );
    assert_eq!(pa.attrition[1].count, p1.count);
    for step in &pa.attrition {
        if let ProtectedCount::About(n) = step.count {
            assert_eq!(n % 5, 0);
            assert!(n >= 11);
        }
    }
}

#[test]
fn noise_depends_on_the_secret_and_stays_close() {
    let (engine, consent) = setup();
    let d = def(r#"{"criteria": [{"measurement": {"codes": ["loinc:39156-5"]}}]}"#);
    let r = engine.count_blocking(&d, &consent).unwrap();
    let policy = ProtectionPolicy::default();
    let answers: std::collections::BTreeSet<String> = (0..40u8)
        .map(|k| {
            let p = protect(
                &r,
                &d,
                &consent.hash(),
                &BrokerSecret::from_bytes([k; 32]),
                &policy,
            );
            match p.count {
                ProtectedCount::About(n) => assert!(n.abs_diff(r.exact) <= 8, "{n} vs {}", r.exact),
                ProtectedCount::Below(_) => panic!("{} is not small", r.exact),
            }
            p.count.to_string()
        })
        .collect();
    assert!(
        answers.len() >= 2,
        "noise never moved the count: {answers:?}"
    );
}
