//! Shared fixtures: a seeded random population over a small vocabulary (so codes, dates
//! and values collide often) and random consent; the reference evaluator is in
//! `reference.rs`.

use std::collections::{BTreeMap, BTreeSet};

use cohort_query::{
    Code, CodedEvent, CohortDefinition, ConceptHierarchy, ConsentSnapshot, Date, IndexBuilder,
    IndexTables, PatientIndex, Person, SearchField,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const CONDITIONS: [&str; 6] = [
    "snomed:73211009",
    "snomed:44054006",
    "snomed:46635009",
    "snomed:38341003",
    "icd10:E11.9",
    "snomed:195967001",
];
pub const MEASUREMENTS: [(&str, &str); 3] = [
    ("loinc:4548-4", "%"),
    ("loinc:39156-5", "kg/m2"),
    ("loinc:2345-7", "mg/dL"),
];
pub const DRUGS: [&str; 3] = ["rxnorm:860975", "rxnorm:197361", "rxnorm:617312"];
pub const PROCEDURES: [&str; 2] = ["snomed:73761001", "snomed:80146002"];

pub fn code(s: &str) -> Code {
    s.parse().unwrap()
}

/// diabetes mellitus → type 2 → (E11.9 as a child of type 2), diabetes → type 1.
pub fn hierarchy() -> ConceptHierarchy {
    ConceptHierarchy::from_pairs([
        (code("snomed:73211009"), code("snomed:44054006")),
        (code("snomed:73211009"), code("snomed:46635009")),
        (code("snomed:44054006"), code("icd10:E11.9")),
    ])
}

fn event(code: &str, day: i32) -> CodedEvent {
    let (system, code) = code.split_once(':').unwrap();
    CodedEvent {
        system: system.into(),
        code: code.into(),
        date: Date::from_days(day).unwrap().to_string(),
        value: None,
        unit: String::new(),
    }
}

/// `n` random patients with ids `0..n` (days 2018-01-01 plus 0..1500).
pub fn population(seed: u64, n: usize) -> Vec<(i64, PatientIndex)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let base = "2018-01-01".parse::<Date>().unwrap().days();
    (0..n)
        .map(|id| {
            let sex = ["female", "male", "other", "unknown"]
                [rng.gen_range(0..4usize).min(rng.gen_range(0..4))];
            let mut p = PatientIndex {
                person: Person {
                    birth_year: rng.gen_bool(0.9).then(|| rng.gen_range(1930..2010)),
                    sex: sex.into(),
                },
                ..Default::default()
            };
            for _ in 0..rng.gen_range(0..5) {
                let c = CONDITIONS[rng.gen_range(0..CONDITIONS.len())];
                p.conditions.push(event(c, base + rng.gen_range(0..1500)));
            }
            for _ in 0..rng.gen_range(0..5) {
                let (c, unit) = MEASUREMENTS[rng.gen_range(0..MEASUREMENTS.len())];
                let mut e = event(c, base + rng.gen_range(0..1500));
                if rng.gen_bool(0.9) {
                    e.value = Some(f64::from(rng.gen_range(0..200)) / 10.0 + 2.0);
                }
                if rng.gen_bool(0.9) {
                    e.unit = unit.into();
                }
                p.measurements.push(e);
            }
            for _ in 0..rng.gen_range(0..3) {
                let c = DRUGS[rng.gen_range(0..DRUGS.len())];
                p.drugs.push(event(c, base + rng.gen_range(0..1500)));
            }
            for _ in 0..rng.gen_range(0..2) {
                let c = PROCEDURES[rng.gen_range(0..PROCEDURES.len())];
                p.procedures.push(event(c, base + rng.gen_range(0..1500)));
            }
            (id as i64, p)
        })
        .collect()
}

/// Random consent: about 10% of patients nothing, the rest each field with `p`.
pub fn consent(seed: u64, n: usize, p: f64) -> ConsentSnapshot {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xC0);
    ConsentSnapshot::from_grants((0..n as i64).map(|id| {
        let none = rng.gen_bool(0.1);
        let fields: Vec<SearchField> = SearchField::ALL
            .into_iter()
            .filter(|_| !none && rng.gen_bool(p))
            .collect();
        (id, fields)
    }))
    .unwrap()
}

pub fn tables(patients: &[(i64, PatientIndex)]) -> IndexTables {
    let mut b = IndexBuilder::new();
    for (id, p) in patients {
        b.add(*id, p).unwrap();
    }
    b.build()
}

pub fn def(json: &str) -> CohortDefinition {
    CohortDefinition::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{json}"))
}

/// Definitions covering every kind of criterion, as (name, JSON).
pub fn definitions() -> Vec<(&'static str, &'static str)> {
    vec![
        ("everyone", r#"{"criteria": []}"#),
        (
            "one code",
            r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"]}}]}"#,
        ),
        (
            "descendants",
            r#"{"criteria": [{"condition": {"codes": ["snomed:73211009"], "include_descendants": true}}]}"#,
        ),
        (
            "two codes, two systems",
            r#"{"criteria": [{"condition": {"codes": ["snomed:38341003", "icd10:E11.9"]}}]}"#,
        ),
        (
            "sex",
            r#"{"criteria": [{"demographics": {"sex": ["female", "other"]}}]}"#,
        ),
        (
            "birth years",
            r#"{"criteria": [{"demographics": {"birth_year": {"min": 1950, "max": 1980}}}]}"#,
        ),
        (
            "age at a date",
            r#"{"index": {"date": "2020-06-30"}, "criteria": [{"demographics": {"sex": ["male"], "age": {"min": 40, "max": 70}}}]}"#,
        ),
        (
            "age and condition",
            r#"{"index": {"date": "2020-06-30"}, "criteria": [
                {"demographics": {"age": {"max": 60}}},
                {"condition": {"codes": ["snomed:38341003"]}}]}"#,
        ),
        (
            "lab value, unit, window",
            r#"{"criteria": [{"measurement": {"codes": ["loinc:4548-4"], "value": {"min": 7.0, "max": 15.5},
                "unit": "%", "window": {"between": {"from": "2019-01-01", "to": "2020-12-31"}}}}]}"#,
        ),
        (
            "open window",
            r#"{"criteria": [{"drug": {"codes": ["rxnorm:860975"], "window": {"between": {"from": "2020-01-01"}}}}]}"#,
        ),
        (
            "at least twice",
            r#"{"criteria": [{"measurement": {"codes": ["loinc:39156-5"], "occurrence": {"at_least": 2}}}]}"#,
        ),
        (
            "exactly once",
            r#"{"criteria": [{"condition": {"codes": ["snomed:195967001"], "occurrence": {"exactly": 1}}}]}"#,
        ),
        (
            "at most once",
            r#"{"criteria": [{"condition": {"codes": ["snomed:38341003"], "occurrence": {"at_most": 1}}}]}"#,
        ),
        (
            "never",
            r#"{"criteria": [{"procedure": {"codes": ["snomed:73761001"], "occurrence": {"at_most": 0}}}]}"#,
        ),
        (
            "exclusion",
            r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"]}}, {"not": {"drug": {"codes": ["rxnorm:860975"]}}}]}"#,
        ),
        (
            "not female",
            r#"{"criteria": [{"not": {"demographics": {"sex": ["female"]}}}]}"#,
        ),
        (
            "any",
            r#"{"criteria": [{"any": [{"drug": {"codes": ["rxnorm:197361"]}}, {"procedure": {"codes": ["snomed:80146002"]}}]}]}"#,
        ),
        (
            "all nested",
            r#"{"criteria": [{"all": [{"condition": {"codes": ["snomed:38341003"]}},
                {"any": [{"demographics": {"sex": ["male"]}}, {"not": {"measurement": {"codes": ["loinc:2345-7"]}}}]}]}]}"#,
        ),
        (
            "2 of 3",
            r#"{"criteria": [{"at_least": {"n": 2, "of": [
                {"condition": {"codes": ["snomed:38341003"]}},
                {"drug": {"codes": ["rxnorm:617312"]}},
                {"measurement": {"codes": ["loinc:39156-5"], "value": {"min": 12.0}}}]}}]}"#,
        ),
        (
            "relative to a date",
            r#"{"index": {"date": "2020-01-01"}, "criteria": [
                {"condition": {"codes": ["snomed:38341003"], "window": {"days_from_index": {"from": -365, "to": 0}}}}]}"#,
        ),
        (
            "first event index",
            r#"{"index": {"first_event": {"condition": {"codes": ["snomed:73211009"], "include_descendants": true}}},
                "criteria": [
                {"drug": {"codes": ["rxnorm:860975"], "window": {"days_from_index": {"from": 0, "to": 365}}}}]}"#,
        ),
        (
            "first event index, age and exclusion",
            r#"{"index": {"first_event": {"measurement": {"codes": ["loinc:4548-4"], "value": {"min": 6.5}}}},
                "criteria": [
                {"demographics": {"age": {"min": 30, "max": 80}}},
                {"not": {"condition": {"codes": ["snomed:38341003"], "window": {"days_from_index": {"to": -1}}}}}]}"#,
        ),
    ]
}

/// Counts per step, for comparison with `CountResult::attrition`.
pub fn counts(steps: &[BTreeSet<i64>]) -> Vec<u64> {
    steps.iter().map(|s| s.len() as u64).collect()
}

#[allow(dead_code)]
pub fn by_name() -> BTreeMap<&'static str, CohortDefinition> {
    definitions()
        .into_iter()
        .map(|(n, j)| (n, def(j)))
        .collect()
}
