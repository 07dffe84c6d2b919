//! Sensitive codes (mental health, substance use, sexual health, genomics) count only for
//! patients whose consent permits their category: on every access path, through
//! descendants and inherited categories, in the SQL export, and never because an uploader
//! left a row untagged (index rows carry no category; the engine classifies).

use cohort_query::{
    Access, Category, CodedEvent, CohortEngine, ConceptHierarchy, ConsentSnapshot, Date,
    EngineOptions, IndexTables, PatientIndex, SearchField, sql::to_sql,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{self, code, def};

const HIV: &str = "snomed:86406008";
/// Not in the tables: sensitive only as a descendant of HIV disease.
const HIV_SUBTYPE: &str = "snomed:111880001";
/// A non-sensitive parent of HIV disease ("infectious disease").
const INFECTIOUS: &str = "snomed:40733004";
const DEPRESSION_ICD: &str = "icd10:F32.9";
const PHQ9_SCORE: &str = "loinc:44261-6";
const HIV_TEST: &str = "snomed:31676001";

fn hierarchy() -> ConceptHierarchy {
    let mut h = common::hierarchy();
    h.add(code(INFECTIOUS), code(HIV));
    h.add(code(HIV), code(HIV_SUBTYPE));
    h
}

fn event(code: &str, day: i32, value: Option<f64>) -> CodedEvent {
    let (system, code) = code.split_once(':').unwrap();
    CodedEvent {
        system: system.into(),
        code: code.into(),
        date: Date::from_days(day).unwrap().to_string(),
        value,
        unit: String::new(),
    }
}

/// The common population with sensitive rows added to random patients.
fn population(seed: u64, n: usize) -> Vec<(i64, PatientIndex)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5E5);
    let base = "2019-01-01".parse::<Date>().unwrap().days();
    let mut patients = common::population(seed, n);
    for (_, p) in &mut patients {
        let day = |rng: &mut ChaCha8Rng| base + rng.gen_range(0..700);
        for _ in 0..rng.gen_range(0..3) {
            let c = [HIV, HIV_SUBTYPE, DEPRESSION_ICD][rng.gen_range(0..3)];
            p.conditions.push(event(c, day(&mut rng), None));
        }
        if rng.gen_bool(0.3) {
            let v = f64::from(rng.gen_range(0..27));
            p.measurements
                .push(event(PHQ9_SCORE, day(&mut rng), Some(v)));
        }
        if rng.gen_bool(0.2) {
            p.procedures.push(event(HIV_TEST, day(&mut rng), None));
        }
    }
    patients
}

/// Random fields (as the common consent) and random permits of the sensitive categories.
fn consent(seed: u64, n: usize) -> ConsentSnapshot {
    let fields = common::consent(seed, n, 0.85);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xCA7);
    let mut b = ConsentSnapshot::builder();
    for (id, field) in fields.grants() {
        b.grant(id, field).unwrap();
    }
    for id in 0..n as i64 {
        for category in [Category::MentalHealth, Category::SexualHealth] {
            if rng.gen_bool(0.4) {
                b.permit(id, category).unwrap();
            }
        }
    }
    b.build()
}

fn definitions() -> Vec<(&'static str, String)> {
    let one = |domain: &str, c: &str| {
        format!(r#"{{"criteria": [{{"{domain}": {{"codes": ["{c}"]}}}}]}}"#)
    };
    vec![
        ("HIV", one("condition", HIV)),
        ("HIV subtype (inherited)", one("condition", HIV_SUBTYPE)),
        (
            "HIV through a non-sensitive parent",
            format!(
                r#"{{"criteria": [{{"condition": {{"codes": ["{INFECTIOUS}"], "include_descendants": true}}}}]}}"#
            ),
        ),
        ("depression by ICD-10", one("condition", DEPRESSION_ICD)),
        (
            "a mixed list",
            format!(
                r#"{{"criteria": [{{"condition": {{"codes": ["{HIV}", "{DEPRESSION_ICD}", "snomed:44054006"]}}}}]}}"#
            ),
        ),
        (
            "HIV twice (rows)",
            format!(
                r#"{{"criteria": [{{"condition": {{"codes": ["{HIV}", "{HIV_SUBTYPE}"], "occurrence": {{"at_least": 2}}}}}}]}}"#
            ),
        ),
        (
            "HIV in a window (rows)",
            format!(
                r#"{{"criteria": [{{"condition": {{"codes": ["{HIV}"], "window": {{"between": {{"from": "2019-06-01"}}}}}}}}]}}"#
            ),
        ),
        (
            "PHQ-9 of 10 or more",
            format!(
                r#"{{"criteria": [{{"measurement": {{"codes": ["{PHQ9_SCORE}"], "value": {{"min": 10}}}}}}]}}"#
            ),
        ),
        ("HIV test", one("procedure", HIV_TEST)),
        (
            "no HIV, with diabetes",
            format!(
                r#"{{"criteria": [{{"condition": {{"codes": ["snomed:44054006"]}}}}, {{"not": {{"condition": {{"codes": ["{HIV}"]}}}}}}]}}"#
            ),
        ),
        (
            "first HIV event as index",
            format!(
                r#"{{"index": {{"first_event": {{"condition": {{"codes": ["{HIV}"]}}}}}}, "criteria": [{{"procedure": {{"codes": ["{HIV_TEST}"], "window": {{"days_from_index": {{"from": -400, "to": 400}}}}}}}}]}}"#
            ),
        ),
    ]
}

fn engines(tables: &IndexTables) -> Vec<(Access, CohortEngine)> {
    [Access::PersonSets, Access::CodeRows, Access::FullScan]
        .into_iter()
        .map(|access| {
            let options = EngineOptions { access, threads: 2 };
            (
                access,
                CohortEngine::with_options(tables.clone(), hierarchy(), options),
            )
        })
        .collect()
}

#[test]
fn sensitive_codes_count_only_where_their_category_is_permitted() {
    let n = 400;
    let patients = population(41, n);
    let consent = consent(41, n);
    let tables = common::tables(&patients);
    let h = hierarchy();
    let reference = crate::reference::Reference {
        hierarchy: &h,
        consent: &consent,
    };
    // The same fields without any permit, and with every permit.
    let fields_only = ConsentSnapshot::from_grants(
        (0..n as i64).map(|id| (id, consent.fields_of(id).into_iter().collect::<Vec<_>>())),
    )
    .unwrap();
    let mut with_all = ConsentSnapshot::builder();
    for (id, f) in consent.grants() {
        with_all.grant(id, f).unwrap();
    }
    for id in 0..n as i64 {
        for c in [
            Category::MentalHealth,
            Category::SubstanceUse,
            Category::SexualHealth,
            Category::Genomics,
        ] {
            with_all.permit(id, c).unwrap();
        }
    }
    let with_all = with_all.build();
    for (access, engine) in engines(&tables) {
        for (name, json) in definitions() {
            let d = def(&json);
            let got = engine.count_blocking(&d, &consent).unwrap();
            assert_eq!(
                got.attrition.iter().map(|s| s.exact).collect::<Vec<_>>(),
                common::counts(&reference.steps(&patients, &d)),
                "{access:?} {name}"
            );
            let ids = engine.select_blocking(&d, &consent).unwrap();
            let want: Vec<i64> = reference
                .steps(&patients, &d)
                .last()
                .unwrap()
                .iter()
                .copied()
                .collect();
            assert_eq!(ids, want, "{access:?} {name}");
            // Without permits no sensitive row counts; with them all do.
            let none = engine.count_blocking(&d, &fields_only).unwrap().exact;
            let all = engine.count_blocking(&d, &with_all).unwrap().exact;
            if name.starts_with("no HIV") {
                assert!(none >= got.exact && got.exact >= all, "{name}");
            } else {
                assert!(none <= got.exact && got.exact <= all, "{access:?} {name}");
            }
        }
        // The property can fail: permits matter for every purely sensitive question.
        for (name, json) in definitions().into_iter().filter(|(n, _)| {
            [
                "HIV",
                "HIV subtype (inherited)",
                "HIV test",
                "PHQ-9 of 10 or more",
            ]
            .contains(n)
        }) {
            let d = def(&json);
            let none = engine.count_blocking(&d, &fields_only).unwrap().exact;
            let some = engine.count_blocking(&d, &consent).unwrap().exact;
            let all = engine.count_blocking(&d, &with_all).unwrap().exact;
            assert_eq!(none, 0, "{access:?} {name}: nobody permitted its category");
            assert!(
                0 < some && some < all,
                "{access:?} {name}: {none} {some} {all}"
            );
        }
    }
    // The field is still required: a permit alone shows nothing.
    let permit_only = {
        let mut b = ConsentSnapshot::builder();
        for id in 0..n as i64 {
            b.grant(id, SearchField::Sex).unwrap();
            b.permit(id, Category::SexualHealth).unwrap();
        }
        b.build()
    };
    let engine = CohortEngine::from_index(tables.clone(), hierarchy());
    let d = def(&definitions()[0].1);
    assert_eq!(engine.count_blocking(&d, &permit_only).unwrap().exact, 0);
}

#[test]
fn explain_shows_sensitive_codes_filtered_by_code() {
    let patients = population(5, 30);
    let consent = consent(5, 30);
    let tables = common::tables(&patients);
    let d = def(&definitions()[5].1);
    // An occurrence count reads rows on every access path.
    let want = r#"consented(condition.person_id, condition.code, Utf8("condition"))"#;
    for (access, engine) in engines(&tables) {
        let plan = engine.explain_blocking(&d, &consent).unwrap();
        assert!(plan.contains(want), "{access:?}\n{plan}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_export_applies_the_categories_too() {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};

    let n = 300;
    let patients = population(77, n);
    let consent = consent(77, n);
    let tables = common::tables(&patients);
    let dir = tempfile::tempdir().unwrap();
    tables.write_parquet_dir(dir.path()).unwrap();
    let path = dir.path().join("consent.parquet");
    consent.write_parquet(&path).unwrap();
    let read = ConsentSnapshot::read_parquet(&path).unwrap();
    assert_eq!(
        read.hash(),
        consent.hash(),
        "permits survive the round trip"
    );

    let ctx = SessionContext::new();
    for table in [
        "person",
        "condition",
        "measurement",
        "drug",
        "procedure",
        "consent",
    ] {
        let file = dir.path().join(format!("{table}.parquet"));
        ctx.register_parquet(table, file.to_str().unwrap(), ParquetReadOptions::default())
            .await
            .unwrap();
    }
    let engine = CohortEngine::from_index(tables, hierarchy());
    for (name, json) in definitions() {
        let d = def(&json);
        let want = engine.count(&d, &consent).await.unwrap().exact;
        let sql = to_sql(&d, &hierarchy());
        let batches = ctx
            .sql(&sql)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{sql}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}\n{sql}"));
        let batch = batches.iter().find(|b| b.num_rows() > 0).unwrap();
        let got = batch.column(0).as_primitive::<Int64Type>().value(0) as u64;
        assert_eq!(got, want, "{name}\n{sql}");
    }
}
