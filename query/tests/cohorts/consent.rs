//! The consent filter: non-consented fields never change a count, patients without consent
//! are invisible, and `EXPLAIN` shows the filter on every scan.

use cohort_query::{CohortEngine, ConsentSnapshot, PatientIndex, SearchField};
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
            if !allows(SearchField::BirthYear) {
                p.person.birth_year = if rng.gen_bool(0.2) {
                    None
                } else {
                    Some(rng.gen_range(1900..2020))
                };
            }
            if !allows(SearchField::Sex) {
                p.person.sex = ["female", "male", "other", "unknown"][rng.gen_range(0..4)].into();
            }
            if !allows(SearchField::Condition) {
                p.conditions = other.conditions;
            }
            if !allows(SearchField::Measurement) {
                p.measurements = other.measurements;
            }
            if !allows(SearchField::Drug) {
                p.drugs = other.drugs;
            }
            if !allows(SearchField::Procedure) {
                p.procedures = other.procedures;
            }
            if !allows(SearchField::ObservationPeriod) {
                p.observation_periods = other.observation_periods;
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
        &ConsentSnapshot::from_grants(Vec::<(i64, Vec<SearchField>)>::new()).unwrap(),
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
    let nobody = ConsentSnapshot::from_grants(Vec::<(i64, Vec<SearchField>)>::new()).unwrap();
    let only_sex =
        ConsentSnapshot::from_grants((0..n as i64).map(|id| (id, vec![SearchField::Sex]))).unwrap();
    for (name, json) in common::definitions() {
        let d = def(json);
        let r = engine.count_blocking(&d, &nobody).unwrap();
        assert!(r.attrition.iter().all(|s| s.exact == 0), "{name}: {r:?}");
        // Sex alone: every patient is visible, and only sex can match.
        let r = engine.count_blocking(&d, &only_sex).unwrap();
        let reference = crate::reference::Reference {
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

/// Every `TableScan` line of `plan` carries its table's consent predicate.
fn every_scan_is_consent_filtered(plan: &str) -> usize {
    let mut scans = 0;
    for line in plan.lines().filter(|l| l.contains("TableScan: ")) {
        scans += 1;
        let table = line
            .split("TableScan: ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let want = match table {
            "person" => r#"consented(person.person_id, Utf8("any"))"#.to_string(),
            "observation_period" => {
                r#"consented(observation_period.person_id, Utf8("observation_period"))"#.to_string()
            }
            // Event rows by code: the field and the code's sensitive categories.
            "condition" | "measurement" | "drug" | "procedure" => {
                format!(r#"consented({table}.person_id, {table}.code, Utf8("{table}"))"#)
            }
            sets => {
                let args = match sets {
                    "person_all" => r#"Utf8("any")"#.to_string(),
                    "person_by_sex" => r#"Utf8("sex")"#.to_string(),
                    "person_by_birth_year" => r#"Utf8("birth_year")"#.to_string(),
                    by_code => {
                        let scope = by_code.strip_suffix("_by_code").unwrap();
                        format!(r#"{by_code}.code, Utf8("{scope}")"#)
                    }
                };
                let masked = format!(r#"consented_persons({sets}.persons, {args}) AS persons"#);
                assert!(plan.contains(&masked), "`{masked}` missing\n{plan}");
                format!(r#"any_consented({sets}.persons, {args})"#)
            }
        };
        assert!(
            line.contains("full_filters=[") && line.contains(&want),
            "`{want}` missing: {line}\n{plan}"
        );
    }
    scans
}

#[test]
fn explain_shows_the_consent_filter_on_every_scan() {
    let patients = common::population(3, 20);
    let consent = common::consent(3, 20, 0.8);
    let d = def(r#"{"index": {"date": "2020-01-01"}, "criteria": [
            {"demographics": {"sex": ["female"], "age": {"min": 40}}},
            {"condition": {"codes": ["snomed:44054006"]}},
            {"not": {"drug": {"codes": ["rxnorm:860975"]}}},
            {"measurement": {"codes": ["loinc:4548-4"], "value": {"min": 7.0}}},
            {"procedure": {"codes": ["snomed:73761001"], "occurrence": {"at_least": 2}}},
            {"observation_period": {"prior_days": 30}}]}"#);
    // Person sets where they answer, rows where values, dates or counts are needed.
    let engine = CohortEngine::from_index(common::tables(&patients), common::hierarchy());
    let plan = engine.explain_blocking(&d, &consent).unwrap();
    assert_eq!(every_scan_is_consent_filtered(&plan), 8, "{plan}");
    for table in [
        "person_all",
        "person_by_sex",
        "person_by_birth_year",
        "condition_by_code",
        "drug_by_code",
        "measurement",
        "procedure",
        "observation_period",
    ] {
        assert!(
            plan.contains(&format!("TableScan: {table} ")),
            "{table}\n{plan}"
        );
    }
    assert!(plan.contains("physical_plan"), "{plan}");

    // Rows only: the person table's sex and birth year are masked per patient.
    let rows = CohortEngine::with_options(
        common::tables(&patients),
        common::hierarchy(),
        cohort_query::EngineOptions {
            access: cohort_query::Access::FullScan,
            threads: 2,
        },
    );
    let plan = rows.explain_blocking(&d, &consent).unwrap();
    assert_eq!(every_scan_is_consent_filtered(&plan), 7, "{plan}");
    for want in [
        r#"CASE WHEN consented(person.person_id, Utf8("sex")) THEN person.sex END"#,
        r#"CASE WHEN consented(person.person_id, Utf8("birth_year")) THEN person.birth_year END"#,
    ] {
        assert!(plan.contains(want), "missing `{want}` in\n{plan}");
    }
}
