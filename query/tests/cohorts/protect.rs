//! Protected counts as a sponsor sees them: `<11` below 11, the same answer to the same or
//! an equivalent reordered question, every attrition step protected, a repeated step one
//! draw.

use cohort_query::{
    BrokerSecret, CohortDefinition, CohortEngine, ConsentSnapshot, CountBasis, Draws,
    ProtectedCount, ProtectedResult, ProtectionPolicy, protect,
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

/// `d` counted and protected as the broker does it.
fn answer(
    engine: &CohortEngine,
    consent: &ConsentSnapshot,
    d: &CohortDefinition,
    secret: &BrokerSecret,
) -> ProtectedResult {
    let basis = CountBasis::new(&consent.hash(), &engine.index_version());
    let exact = engine.count_blocking(d, consent).unwrap();
    protect(
        &exact,
        &Draws::of(d, &basis),
        secret,
        &ProtectionPolicy::default(),
    )
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
    let p = answer(&engine, &consent, &d, &secret());
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
    let ra = engine.count_blocking(&a, &consent).unwrap();
    let rb = engine.count_blocking(&b, &consent).unwrap();
    assert_eq!(ra.exact, rb.exact);
    assert!(ra.exact >= 30, "fixture too narrow: {}", ra.exact);
    let pa = answer(&engine, &consent, &a, &secret());
    let pa2 = answer(&engine, &consent, &a, &secret());
    let pb = answer(&engine, &consent, &b, &secret());
    assert_eq!(pa, pa2, "the same query twice");
    assert_eq!(pa.count, pb.count, "an equivalent reordered query");
    // The last attrition step is the whole definition: the same protected count.
    assert_eq!(pa.attrition.last().unwrap().count, pa.count);
    assert_eq!(pb.attrition.last().unwrap().count, pb.count);
    // Each step is protected like the shorter definition it counts.
    let first_only = def(r#"{"criteria": [{"condition": {"codes": ["snomed:38341003"]}}]}"#);
    let p1 = answer(&engine, &consent, &first_only, &secret());
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
    let answers: std::collections::BTreeSet<String> = (0..40u8)
        .map(|k| {
            let p = answer(&engine, &consent, &d, &BrokerSecret::from_bytes([k; 32]));
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

#[test]
fn a_repeated_or_rewritten_step_is_one_draw_and_a_new_step_another() {
    let (engine, consent) = setup();
    let a = r#"{"condition": {"codes": ["snomed:38341003"]}}"#;
    let forms = [
        a.to_string(),
        format!(r#"{{"all": [{a}, {a}]}}"#),
        format!(r#"{{"not": {{"not": {a}}}}}"#),
        format!(r#"{{"at_least": {{"n": 1, "of": [{a}]}}}}"#),
        r#"{"condition": {"codes": ["snomed:38341003", "snomed:38341003"]}}"#.to_string(),
    ];
    let repeated: Vec<&str> = (0..50).map(|i| forms[i % forms.len()].as_str()).collect();
    let d = def(&format!(r#"{{"criteria": [{}]}}"#, repeated.join(", ")));
    let exact = engine.count_blocking(&d, &consent).unwrap();
    assert!(exact.exact >= 30, "fixture too narrow: {}", exact.exact);
    // Over many secrets: the 50 steps always agree, and agree with the criterion alone.
    let alone = def(&format!(r#"{{"criteria": [{a}]}}"#));
    let mut seen = std::collections::BTreeSet::new();
    for k in 0..30u8 {
        let s = BrokerSecret::from_bytes([k; 32]);
        let p = answer(&engine, &consent, &d, &s);
        assert!(p.attrition[1..].iter().all(|x| x.count == p.count), "{p:?}");
        assert_eq!(p.count, answer(&engine, &consent, &alone, &s).count);
        seen.insert(p.count.to_string());
    }
    assert!(seen.len() >= 2, "the noise never moved: {seen:?}");
    // The test can fail: steps that each add a criterion no patient fails (a code nobody
    // has, excluded) have the same exact count but are new questions with their own draws.
    let padded: Vec<String> = std::iter::once(a.to_string())
        .chain((0..12).map(|i| format!(r#"{{"not": {{"drug": {{"codes": ["rxnorm:99{i}"]}}}}}}"#)))
        .collect();
    let d = def(&format!(r#"{{"criteria": [{}]}}"#, padded.join(", ")));
    let exact = engine.count_blocking(&d, &consent).unwrap();
    assert!(exact.attrition[1..].iter().all(|s| s.exact == exact.exact));
    let p = answer(&engine, &consent, &d, &secret());
    assert!(
        p.attrition[1..].iter().any(|x| x.count != p.count),
        "13 independent draws all agreed: {p:?}"
    );
}
