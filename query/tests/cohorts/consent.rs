//! The consent filter: non-consented fields never change a count, patients without consent
//! are invisible, and `EXPLAIN` shows the filter on every scan.

use cohort_query::{CohortEngine, ConsentSnapshot, PatientIndex, SearchableField};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{self, def};

/// Rewrites every field `consent` does not allow, for every patient, with other values.
fn flip_unconsented(
    patients: &[(i64, PatientIndex)],
    consent: &ConsentSnapshot,
    seed: u64,
) -> Vec<(i64, PatientIndex)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let others = common::population(seed ^ 0xF11F, patients.len());
    patients
        .iter()
        .zip(others)
        .map(|((id, p), (_, other))| {
            let mut p = p.clone();
            let allows = |f| consent.allows(*id, f);
            if !allows(SearchableField::BirthYear) {
                p.person.birth_year = if rng.gen_bool(0.2) {
                    None
                } else {
                    Some(rng.gen_range(1900..2020))
                };
            }
            if !allows(SearchableField::Sex) {
                p.person.sex = ["female", "male", "other", "unknown"][rng.gen_range(0..4)].into();
            }
            if !allows(SearchableField::Condition) {
                p.conditions = other.conditions;
            }
            if !allows(SearchableField::Measurement) {
                p.measurements = other.measurements;
            }
            if !allows(SearchableField::Drug) {
                p.drugs = other.drugs;
            }
            if !allows(SearchableField::Procedure) {
                p.procedures = other.procedures;
            }
            (*id, p)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn no_count_depends_on_a_field_that_was_not_consented(
        seed in any::<u64>(),
        flip in any::<u64>(),
        p in 0.3f64..0.95,
    ) {
        let n = 120;
        let patients = common::population(seed, n);
        let consent = common::consent(seed, n, p);
        let flipped = flip_unconsented(&patients, &consent, flip);
        let hierarchy = common::hierarchy();
        let a = CohortEngine::from_index(common::tables(&patients), hierarchy.clone());
        let b = CohortEngine::from_index(common::tables(&flipped), hierarchy);
        for (name, json) in common::definitions() {
            let d = def(json);
            let ra = a.count_blocking(&d, &consent).unwrap();
            let rb = b.count_blocking(&d, &consent).unwrap();
            prop_assert_eq!(&ra, &rb, "{}", name);
            prop_assert_eq!(a.select_blocking(&d, &consent).unwrap(), b.select_blocking(&d, &consent).unwrap(), "{}", name);
        }
    }
}

#[test]
fn consented_fields_do_change_counts() {
    // The property above must be able to fail: flipping *consented* fields moves counts.
    let n = 200;
    let patients = common::population(5, n);
    let everything = ConsentSnapshot::everything(0..n as i64).unwrap();
    let flipped = flip_unconsented(
        &patients,
        &ConsentSnapshot::from_grants(Vec::<(i64, Vec<SearchableField>)>::new()).unwrap(),
        77,
    );
    let hierarchy = common::hierarchy();
    let a = CohortEngine::from_index(common::tables(&patients), hierarchy.clone());
    let b = CohortEngine::from_index(common::tables(&flipped), hierarchy);
    let changed = common::definitions()
        .into_iter()
        .filter(|(_, json)| {
            let d = def(json);
            a.count_blocking(&d, &everything).unwrap() != b.count_blocking(&d, &everything).unwrap()
        })
        .count();
    assert!(changed >= 10, "only {changed} definitions changed");
}

#[test]
fn patients_without_consent_are_invisible() {
    let n = 50;
    let patients = common::population(11, n);
    let engine = CohortEngine::from_index(common::tables(&patients), common::hierarchy());
    let nobody = ConsentSnapshot::from_grants(Vec::<(i64, Vec<SearchableField>)>::new()).unwrap();
    let only_sex =
        ConsentSnapshot::from_grants((0..n as i64).map(|id| (id, vec![SearchableField::Sex])))
            .unwrap();
    for (name, json) in common::definitions() {
        let d = def(json);
        let r = engine.count_blocking(&d, &nobody).unwrap();
        assert!(r.attrition.iter().all(|s| s.exact == 0), "{name}: {r:?}");
        // Sex alone: every patient is visible, and only sex can match.
        let r = engine.count_blocking(&d, &only_sex).unwrap();
        let reference = common::Reference {
            hierarchy: &common::hierarchy(),
            consent: &only_sex,
        };
        assert_eq!(
            r.attrition.iter().map(|s| s.exact).collect::<Vec<_>>(),
            common::counts(&reference.steps(&patients, &d)),
            "{name}"
        );
    }
    let d = def(
        r#"{"criteria": [{"condition": {"codes": ["snomed:38341003", "snomed:44054006", "snomed:73211009"]}}]}"#,
    );
    assert_eq!(engine.count_blocking(&d, &only_sex).unwrap().exact, 0);
    assert_eq!(
        engine.count_blocking(&d, &only_sex).unwrap().attrition[0].exact,
        n as u64
    );
}

#[test]
fn explain_shows_the_consent_filter_on_every_scan() {
    let patients = common::population(3, 20);
    let consent = common::consent(3, 20, 0.8);
    let engine = CohortEngine::from_index(common::tables(&patients), common::hierarchy());
    let d = def(r#"{"index": {"date": "2020-01-01"}, "criteria": [
            {"demographics": {"sex": ["female"], "age": {"min": 40}}},
            {"condition": {"codes": ["snomed:44054006"]}},
            {"not": {"drug": {"codes": ["rxnorm:860975"]}}},
            {"measurement": {"codes": ["loinc:4548-4"], "value": {"min": 7.0}}},
            {"procedure": {"codes": ["snomed:73761001"]}}]}"#);
    let plan = engine.explain_blocking(&d, &consent).unwrap();
    for table in ["person", "condition", "measurement", "drug", "procedure"] {
        // Every scan carries its table's consent predicate, applied by the scan itself.
        let scope = if table == "person" { "any" } else { table };
        let want = format!(r#"consented({table}.person_id, Utf8("{scope}"))"#);
        let scans: Vec<&str> = plan
            .lines()
            .filter(|l| l.contains(&format!("TableScan: {table} ")))
            .collect();
        assert!(!scans.is_empty(), "no scan of {table} in\n{plan}");
        for scan in scans {
            assert!(
                scan.contains("full_filters=[") && scan.contains(&want),
                "`{want}` missing: {scan}\n{plan}"
            );
        }
    }
    for want in [
        // The person table's sex and birth year are masked per patient.
        r#"CASE WHEN consented(person.person_id, Utf8("sex")) THEN person.sex END"#,
        r#"CASE WHEN consented(person.person_id, Utf8("birth_year")) THEN person.birth_year END"#,
        "physical_plan",
    ] {
        assert!(plan.contains(want), "missing `{want}` in\n{plan}");
    }
    // No scan without a consent predicate.
    for line in plan.lines().filter(|l| l.contains("TableScan:")) {
        assert!(
            line.contains("consented("),
            "unfiltered scan: {line}\n{plan}"
        );
    }
}
