//! Shared fixtures: a seeded random population over a small vocabulary (so codes, dates
//! and values collide often) and random consent; the reference evaluator is in
//! `reference.rs`.

use std::collections::{BTreeMap, BTreeSet};

use cohort_query::{
    Code, CodedEvent, CohortDefinition, ConceptHierarchy, ConsentSnapshot, Date, IndexBuilder,
    IndexTables, ObservationPeriod, PatientIndex, Person, SearchField,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

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
            p.observation_periods = observation_periods(seed, id, base);
            (id as i64, p)
        })
        .collect()
}

/// 0 to 2 observation periods around the event days, from a generator of their own (so
/// the rest of the population is what it was before periods existed).
fn observation_periods(seed: u64, id: usize, base: i32) -> Vec<ObservationPeriod> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0b5e_u64 ^ ((id as u64) << 20));
    let mut start = base - 400 + rng.gen_range(0..900);
    let mut out = Vec::new();
    for _ in 0..rng.gen_range(0..3) {
        let end = start + rng.gen_range(0..1200);
        let day = |d: i32| Date::from_days(d).unwrap().to_string();
        out.push(ObservationPeriod {
            start: day(start),
            end: day(end),
        });
        start = end + 1 + rng.gen_range(0..300);
    }
    out
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
            "observed a year before a date and half a year after",
            r#"{"index": {"date": "2020-01-01"}, "criteria": [
                {"observation_period": {"prior_days": 365, "post_days": 180}},
                {"condition": {"codes": ["snomed:73211009"], "include_descendants": true}}]}"#,
        ),
        (
            "observed around the first event, or not",
            r#"{"index": {"first_event": {"drug": {"codes": ["rxnorm:860975", "rxnorm:197361"]}}}, "criteria": [
                {"any": [{"observation_period": {"prior_days": 180}},
                         {"not": {"observation_period": {"post_days": 30}}}]}]}"#,
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
        (
            "relative to each drug",
            r#"{"criteria": [{"measurement": {"codes": ["loinc:4548-4"], "value": {"min": 7.0},
                "window": {"days_from_event": {"event": {"drug": {"codes": ["rxnorm:860975"]}}, "from": 0, "to": 90}}}}]}"#,
        ),
        (
            "relative to each drug, before, twice",
            r#"{"criteria": [{"condition": {"codes": ["snomed:73211009"], "include_descendants": true,
                "occurrence": {"at_least": 2},
                "window": {"days_from_event": {"event": {"drug": {"codes": ["rxnorm:197361", "rxnorm:617312"],
                    "window": {"between": {"from": "2019-01-01"}}}}, "from": -365, "to": -1}}}}]}"#,
        ),
        (
            "relative to each event of the same table, at most once",
            r#"{"criteria": [{"condition": {"codes": ["snomed:38341003", "snomed:195967001"], "occurrence": {"at_most": 1},
                "window": {"days_from_event": {"event": {"condition": {"codes": ["snomed:73211009"], "include_descendants": true}},
                    "from": -200, "to": 200}}}}]}"#,
        ),
        (
            "relative to each lab, open, excluded",
            r#"{"criteria": [{"drug": {"codes": ["rxnorm:860975", "rxnorm:197361"]}},
                {"not": {"procedure": {"codes": ["snomed:73761001", "snomed:80146002"],
                "window": {"days_from_event": {"event": {"measurement": {"codes": ["loinc:39156-5"], "value": {"min": 12.0}, "unit": "kg/m2"}},
                    "from": 0}}}}}]}"#,
        ),
        (
            "relative to each event in a group, with an index",
            r#"{"index": {"first_event": {"condition": {"codes": ["snomed:73211009"], "include_descendants": true}}},
                "criteria": [{"at_least": {"n": 2, "of": [
                {"drug": {"codes": ["rxnorm:860975"], "window": {"days_from_index": {"from": 0}}}},
                {"measurement": {"codes": ["loinc:4548-4"], "occurrence": {"exactly": 1},
                    "window": {"days_from_event": {"event": {"drug": {"codes": ["rxnorm:860975", "rxnorm:617312"]}}, "to": 30}}}},
                {"any": [{"demographics": {"sex": ["female"]}},
                         {"drug": {"codes": ["rxnorm:617312"], "window": {"days_from_event": {"event": {"condition": {"codes": ["snomed:38341003"]}}, "from": -1000, "to": 1000}}}}]}]}}]}"#,
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

/// A code set of one domain: 1 or 2 codes of its vocabulary, for conditions with or
/// without descendants.
fn codes(domain: &'static str) -> BoxedStrategy<Value> {
    let vocabulary: Vec<&'static str> = match domain {
        "condition" => CONDITIONS.to_vec(),
        "measurement" => MEASUREMENTS.iter().map(|(c, _)| *c).collect(),
        "drug" => DRUGS.to_vec(),
        _ => PROCEDURES.to_vec(),
    };
    (prop::sample::subsequence(vocabulary, 1..=2), any::<bool>())
        .prop_map(move |(codes, descendants)| {
            let mut e = json!({ "codes": codes });
            if descendants && domain == "condition" {
                e["include_descendants"] = json!(true);
            }
            e
        })
        .boxed()
}

/// A day range with at least one bound, from `from` to `from + span` (or open on one side).
fn days() -> impl Strategy<Value = Value> {
    (-400..200i32, 0..400i32, 0..3u8).prop_map(|(from, span, open)| match open {
        0 => json!({"from": from, "to": from + span}),
        1 => json!({"from": from}),
        _ => json!({"to": from + span}),
    })
}

/// A calendar window (`between`) with at least one bound, or none.
fn calendar() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        3 => Just(None),
        1 => (0..1500i32, 0..800i32, any::<bool>()).prop_map(|(start, span, open)| {
            let base = "2018-01-01".parse::<Date>().unwrap().days();
            let from = Date::from_days(base + start).unwrap().to_string();
            let to = Date::from_days(base + start + span).unwrap().to_string();
            Some(if open {
                json!({"between": {"from": from}})
            } else {
                json!({"between": {"from": from, "to": to}})
            })
        }),
    ]
}

/// A plain event criterion (codes, descendants, a calendar window, a value and unit): what
/// an index first event or a `days_from_event` anchor may be. `(domain, body)`.
fn plain_event() -> impl Strategy<Value = (&'static str, Value)> {
    prop::sample::select(vec!["condition", "measurement", "drug", "procedure"])
        .prop_flat_map(|domain| {
            let value = prop_oneof![
                2 => Just(None),
                1 => (20..200i32, any::<bool>()).prop_map(|(min, unit)| Some((f64::from(min) / 10.0, unit))),
            ];
            (Just(domain), codes(domain), calendar(), value)
        })
        .prop_map(|(domain, mut e, window, value)| {
            if let Some(w) = window {
                e["window"] = w;
            }
            if let (Some((min, unit)), "measurement") = (value, domain) {
                e["value"] = json!({ "min": min });
                if unit {
                    let code = e["codes"][0].as_str().unwrap();
                    let unit = MEASUREMENTS.iter().find(|(c, _)| *c == code).unwrap().1;
                    e["unit"] = json!(unit);
                }
            }
            (domain, e)
        })
}

/// An event criterion with an occurrence count and any window: none, calendar, relative to
/// the index (when there is one) or relative to each event of a plain anchor criterion.
fn event_criterion(has_index: bool) -> impl Strategy<Value = Value> {
    let occurrence = prop::sample::select(vec![
        None,
        None,
        None,
        Some(json!({"at_least": 2})),
        Some(json!({"at_most": 0})),
        Some(json!({"at_most": 1})),
        Some(json!({"exactly": 1})),
    ]);
    let window = prop_oneof![
        2 => Just(None),
        1 => calendar(),
        1 => days().prop_map(move |d| has_index.then(|| json!({"days_from_index": d}))),
        3 => (plain_event(), days()).prop_map(|((domain, anchor), mut d)| {
            d["event"] = json!({ domain: anchor });
            Some(json!({"days_from_event": d}))
        }),
    ];
    (plain_event(), occurrence, window).prop_map(|((domain, mut e), occurrence, window)| {
        if let Some(o) = occurrence {
            e["occurrence"] = o;
        }
        if let Some(w) = window {
            e["window"] = w;
        }
        json!({ domain: e })
    })
}

fn demographics(has_index: bool) -> impl Strategy<Value = Value> {
    let sex = prop::sample::subsequence(vec!["female", "male", "other", "unknown"], 1..=2);
    prop_oneof![
        sex.prop_map(|s| json!({"demographics": {"sex": s}})),
        (1930..2010i32, 0..40i32).prop_map(
            |(y, span)| json!({"demographics": {"birth_year": {"min": y, "max": y + span}}})
        ),
        (20..70i32).prop_map(move |min| if has_index {
            json!({"demographics": {"age": {"min": min}}})
        } else {
            json!({"demographics": {"birth_year": {"max": 2020 - min}}})
        }),
    ]
}

/// Observation around the index (demographics when there is no index).
fn observation(has_index: bool) -> impl Strategy<Value = Value> {
    (0..500u32, 0..500u32, 0..3u8, demographics(false)).prop_map(
        move |(prior, post, which, fallback)| {
            if !has_index {
                return fallback;
            }
            match which {
                0 => json!({"observation_period": {"prior_days": prior}}),
                1 => json!({"observation_period": {"post_days": post}}),
                _ => json!({"observation_period": {"prior_days": prior, "post_days": post}}),
            }
        },
    )
}

fn criterion(has_index: bool) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        1 => demographics(has_index),
        1 => observation(has_index),
        3 => event_criterion(has_index),
    ];
    leaf.prop_recursive(3, 10, 3, |inner| {
        prop_oneof![
            2 => inner.clone().prop_map(|c| json!({"not": c})),
            1 => prop::collection::vec(inner.clone(), 2..=3).prop_map(|v| json!({"any": v})),
            1 => prop::collection::vec(inner.clone(), 2..=3).prop_map(|v| json!({"all": v})),
            1 => prop::collection::vec(inner, 2..=3)
                .prop_flat_map(|v| (1..=v.len() as u32, Just(v)))
                .prop_map(|(n, v)| json!({"at_least": {"n": n, "of": v}})),
        ]
    })
}

/// Random valid definitions over the common vocabulary: an optional index (a date or a
/// first event), 1 to 3 top-level criteria of every kind, groups up to 3 deep, and event
/// windows of every form, `days_from_event` the most often.
pub fn arbitrary_definition() -> impl Strategy<Value = CohortDefinition> {
    let index = prop_oneof![
        2 => Just(None),
        1 => Just(Some(json!({"date": "2020-01-01"}))),
        1 => plain_event().prop_map(|(domain, e)| Some(json!({"first_event": { domain: e }}))),
    ];
    index
        .prop_flat_map(|index| {
            let criteria = prop::collection::vec(criterion(index.is_some()), 1..=3);
            (Just(index), criteria)
        })
        .prop_map(|(index, criteria)| {
            let mut d = json!({ "criteria": criteria });
            if let Some(i) = index {
                d["index"] = i;
            }
            def(&d.to_string())
        })
}
