//! Query results as data: a hand-made population with expected counts per definition,
//! and every definition of `common::definitions` against the reference evaluator on a
//! random population and random consent.

use cohort_query::{
    Access, CodedEvent, CohortEngine, ConceptHierarchy, ConsentSnapshot, EngineOptions,
    IndexBuilder, PatientIndex, Person, SearchField,
};

use crate::common::{self, def};
use crate::reference::Reference;

fn ev(code: &str, date: &str) -> CodedEvent {
    let (system, code) = code.split_once(':').unwrap();
    CodedEvent {
        system: system.into(),
        code: code.into(),
        date: date.into(),
        value: None,
        unit: String::new(),
    }
}

fn lab(code: &str, date: &str, value: f64, unit: &str) -> CodedEvent {
    CodedEvent {
        value: Some(value),
        unit: unit.into(),
        ..ev(code, date)
    }
}

fn person(year: i32, sex: &str) -> Person {
    Person {
        birth_year: Some(year),
        sex: sex.into(),
    }
}

/// Eight patients whose answers can be read off by eye.
fn small() -> (CohortEngine, ConsentSnapshot) {
    let patients = [
        // 0: woman, 1960, type 2 diabetes, high HbA1c in 2021, metformin
        PatientIndex {
            person: person(1960, "female"),
            conditions: vec![ev("snomed:44054006", "2019-05-01")],
            measurements: vec![lab("loinc:4548-4", "2021-02-01", 8.1, "%")],
            drugs: vec![ev("rxnorm:860975", "2019-06-01")],
            ..Default::default()
        },
        // 1: man, 1955, type 2 diabetes twice, normal HbA1c, no drug
        PatientIndex {
            person: person(1955, "male"),
            conditions: vec![
                ev("snomed:44054006", "2018-01-01"),
                ev("snomed:44054006", "2020-01-01"),
            ],
            measurements: vec![lab("loinc:4548-4", "2021-02-01", 5.4, "%")],
            ..Default::default()
        },
        // 2: woman, 1990, type 1 diabetes, HbA1c 7.5 in mmol/mol units (wrong unit)
        PatientIndex {
            person: person(1990, "female"),
            conditions: vec![ev("snomed:46635009", "2015-03-03")],
            measurements: vec![lab("loinc:4548-4", "2021-02-01", 7.5, "mmol/mol")],
            ..Default::default()
        },
        // 3: man, 1940, hypertension, a colonoscopy
        PatientIndex {
            person: person(1940, "male"),
            conditions: vec![ev("snomed:38341003", "2010-10-10")],
            procedures: vec![ev("snomed:73761001", "2019-09-09")],
            ..Default::default()
        },
        // 4: woman, 1975, type 2 diabetes: consents nothing but sex → invisible for codes
        PatientIndex {
            person: person(1975, "female"),
            conditions: vec![ev("snomed:44054006", "2019-05-01")],
            ..Default::default()
        },
        // 5: consents nothing at all: invisible
        PatientIndex {
            person: person(1970, "female"),
            conditions: vec![ev("snomed:44054006", "2019-05-01")],
            ..Default::default()
        },
        // 6: man, 1985, hypertension and type 2 diabetes (ICD-10), high HbA1c in 2023
        PatientIndex {
            person: person(1985, "male"),
            conditions: vec![
                ev("snomed:38341003", "2021-01-01"),
                ev("icd10:E11.9", "2022-01-01"),
            ],
            measurements: vec![lab("loinc:4548-4", "2023-06-01", 9.0, "%")],
            ..Default::default()
        },
        // 7: other, 2000, nothing else
        PatientIndex {
            person: person(2000, "other"),
            ..Default::default()
        },
    ];
    let mut b = IndexBuilder::new();
    for (id, p) in patients.iter().enumerate() {
        b.add(id as i64, p).unwrap();
    }
    let consent = ConsentSnapshot::from_grants((0..8i64).map(|id| match id {
        4 => (id, vec![SearchField::Sex]),
        5 => (id, vec![]),
        _ => (id, SearchField::ALL.to_vec()),
    }))
    .unwrap();
    (
        CohortEngine::from_index(b.build(), common::hierarchy()),
        consent,
    )
}

#[test]
fn hand_made_population_table() {
    let (engine, consent) = small();
    // (definition, attrition counts: population first, then after each criterion)
    let table: &[(&str, &[u64])] = &[
        (r#"{"criteria": []}"#, &[7]),
        (
            r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"]}}]}"#,
            &[7, 2],
        ),
        (
            r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"], "include_descendants": true}}]}"#,
            &[7, 3],
        ),
        (
            r#"{"criteria": [{"condition": {"codes": ["snomed:73211009"], "include_descendants": true}}]}"#,
            &[7, 4],
        ),
        (
            r#"{"criteria": [{"demographics": {"sex": ["female"]}}]}"#,
            &[7, 3],
        ),
        (
            r#"{"criteria": [{"not": {"demographics": {"sex": ["female"]}}}]}"#,
            &[7, 4],
        ),
        (
            r#"{"index": {"date": "2020-01-01"}, "criteria": [{"demographics": {"age": {"min": 60}}}]}"#,
            &[7, 3],
        ),
        (
            r#"{"criteria": [{"measurement": {"codes": ["loinc:4548-4"], "value": {"min": 7.0}, "unit": "%"}}]}"#,
            &[7, 2],
        ),
        (
            r#"{"criteria": [{"measurement": {"codes": ["loinc:4548-4"], "value": {"min": 7.0}, "unit": "%",
                "window": {"between": {"from": "2021-01-01", "to": "2021-12-31"}}}}]}"#,
            &[7, 1],
        ),
        (
            r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"], "occurrence": {"at_least": 2}}}]}"#,
            &[7, 1],
        ),
        (
            r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"], "occurrence": {"exactly": 1}}}]}"#,
            &[7, 1],
        ),
        (
            r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"], "occurrence": {"at_most": 1}}}]}"#,
            &[7, 6],
        ),
        (
            r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"]}}, {"not": {"drug": {"codes": ["rxnorm:860975"]}}}]}"#,
            &[7, 2, 1],
        ),
        (
            r#"{"criteria": [{"at_least": {"n": 2, "of": [
                {"condition": {"codes": ["snomed:73211009"], "include_descendants": true}},
                {"condition": {"codes": ["snomed:38341003"]}},
                {"measurement": {"codes": ["loinc:4548-4"], "value": {"min": 7.0}}}]}}]}"#,
            &[7, 3],
        ),
        (
            r#"{"index": {"first_event": {"condition": {"codes": ["snomed:73211009"], "include_descendants": true}}},
                "criteria": [{"measurement": {"codes": ["loinc:4548-4"], "window": {"days_from_index": {"from": 0, "to": 700}}}}]}"#,
            &[4, 2],
        ),
        (
            r#"{"index": {"first_event": {"condition": {"codes": ["snomed:44054006"]}}},
                "criteria": [{"demographics": {"age": {"min": 59, "max": 63}}}]}"#,
            &[2, 2],
        ),
        (
            r#"{"index": {"first_event": {"condition": {"codes": ["snomed:44054006"]}}},
                "criteria": [{"demographics": {"age": {"min": 60}}}]}"#,
            &[2, 1],
        ),
    ];
    for (json, want) in table {
        let d = def(json);
        let got = engine.count_blocking(&d, &consent).unwrap();
        let counts: Vec<u64> = got.attrition.iter().map(|s| s.exact).collect();
        assert_eq!(&counts, want, "{json}");
        assert_eq!(got.exact, *want.last().unwrap());
        assert_eq!(
            engine.select_blocking(&d, &consent).unwrap().len() as u64,
            got.exact
        );
    }
}

#[test]
fn select_returns_the_matching_ids() {
    let (engine, consent) = small();
    let d = def(
        r#"{"criteria": [{"condition": {"codes": ["snomed:73211009"], "include_descendants": true}}]}"#,
    );
    assert_eq!(
        engine.select_blocking(&d, &consent).unwrap(),
        vec![0, 1, 2, 6]
    );
}

#[test]
fn attrition_labels_follow_the_criteria() {
    let (engine, consent) = small();
    let d = def(
        r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"]}}, {"not": {"drug": {"codes": ["rxnorm:860975"]}}}]}"#,
    );
    let r = engine.count_blocking(&d, &consent).unwrap();
    let labels: Vec<&str> = r.attrition.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "patients with consent",
            "condition snomed:44054006",
            "not (drug rxnorm:860975)"
        ]
    );
}

#[test]
fn every_definition_matches_the_reference_evaluator() {
    let hierarchy = common::hierarchy();
    for seed in [1u64, 2, 3] {
        let patients = common::population(seed, 400);
        let consent = common::consent(seed, 400, 0.8);
        let engine = CohortEngine::from_index(common::tables(&patients), hierarchy.clone());
        let reference = Reference {
            hierarchy: &hierarchy,
            consent: &consent,
        };
        for (name, json) in common::definitions() {
            let d = def(json);
            let want = reference.steps(&patients, &d);
            let got = engine.count_blocking(&d, &consent).unwrap();
            let counts: Vec<u64> = got.attrition.iter().map(|s| s.exact).collect();
            assert_eq!(counts, common::counts(&want), "seed {seed}: {name}");
            if name.starts_with("observed") {
                // Observation must decide something here, or the comparison shows little.
                let last = *counts.last().unwrap();
                assert!(
                    last > 0 && last < counts[0],
                    "seed {seed}: {name} does not split the population: {counts:?}"
                );
            }
            let ids = engine.select_blocking(&d, &consent).unwrap();
            assert_eq!(
                ids,
                want.last().unwrap().iter().copied().collect::<Vec<_>>(),
                "seed {seed}: {name}"
            );
        }
    }
}

#[test]
fn no_access_path_changes_an_answer() {
    let hierarchy = common::hierarchy();
    let patients = common::population(9, 300);
    let consent = common::consent(9, 300, 0.85);
    let tables = common::tables(&patients);
    let engines: Vec<CohortEngine> = [Access::FullScan, Access::CodeRows, Access::PersonSets]
        .into_iter()
        .map(|access| {
            CohortEngine::with_options(
                tables.clone(),
                hierarchy.clone(),
                EngineOptions { access, threads: 2 },
            )
        })
        .collect();
    for (name, json) in common::definitions() {
        let d = def(json);
        let want = engines[0].count_blocking(&d, &consent).unwrap();
        for e in &engines[1..] {
            assert_eq!(e.count_blocking(&d, &consent).unwrap(), want, "{name}");
            assert_eq!(
                e.select_blocking(&d, &consent).unwrap(),
                engines[0].select_blocking(&d, &consent).unwrap(),
                "{name}"
            );
        }
    }
}

#[test]
fn unknown_codes_count_zero() {
    let (engine, consent) = small();
    let d = def(r#"{"criteria": [{"procedure": {"codes": ["snomed:999999"]}}]}"#);
    assert_eq!(engine.count_blocking(&d, &consent).unwrap().exact, 0);
    let empty = CohortEngine::from_index(IndexBuilder::new().build(), ConceptHierarchy::new());
    assert_eq!(
        empty.count_blocking(&d, &consent).unwrap().attrition[0].exact,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_api_works_inside_a_runtime_and_the_engine_drops_there() {
    let (engine, consent) = small();
    let d = def(r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"]}}]}"#);
    assert_eq!(engine.count(&d, &consent).await.unwrap().exact, 2);
    assert_eq!(engine.select(&d, &consent).await.unwrap(), vec![0, 1]);
    drop(engine);
}

#[test]
fn invalid_definitions_are_refused_by_the_engine() {
    let (engine, consent) = small();
    let mut d = def(r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"]}}]}"#);
    d.criteria.push(cohort_query::Criterion::All(vec![]));
    let err = engine.count_blocking(&d, &consent).unwrap_err();
    assert!(
        err.to_string()
            .contains("criteria[1]: an empty `all` group"),
        "{err}"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// Random definitions (every criterion kind, groups, windows relative to the index and
    /// to each event of another criterion) answer as the reference evaluator does, on
    /// every access path.
    #[test]
    fn random_definitions_match_the_reference_evaluator(
        d in common::arbitrary_definition(),
        seed in 0u64..1_000,
    ) {
        let hierarchy = common::hierarchy();
        let patients = common::population(seed, 150);
        let consent = common::consent(seed, 150, 0.8);
        let reference = Reference { hierarchy: &hierarchy, consent: &consent };
        let want = reference.steps(&patients, &d);
        let tables = common::tables(&patients);
        for access in [Access::FullScan, Access::CodeRows, Access::PersonSets] {
            let engine = CohortEngine::with_options(
                tables.clone(),
                hierarchy.clone(),
                EngineOptions { access, threads: 1 },
            );
            let got = engine.count_blocking(&d, &consent).unwrap();
            let counts: Vec<u64> = got.attrition.iter().map(|s| s.exact).collect();
            proptest::prop_assert_eq!(&counts, &common::counts(&want), "{:?}", access);
            let ids = engine.select_blocking(&d, &consent).unwrap();
            proptest::prop_assert_eq!(ids, want.last().unwrap().iter().copied().collect::<Vec<_>>());
        }
    }
}
