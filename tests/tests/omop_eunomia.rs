//! Import of the OHDSI Eunomia "GiBleed" OMOP CDM 5.3 data set (Parquet, with its quirks:
//! ids and concept ids stored as DOUBLE, all-null columns as BOOLEAN) from the shared data
//! directory, checked against the data README's row counts, and cohort counts through the
//! engine checked against plain DataFusion SQL over the raw Parquet files.

use std::path::PathBuf;
use std::sync::OnceLock;

use cohort_query::{CohortDefinition, CohortEngine, ConsentSnapshot, IndexBuilder};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use datasets::{DeidConfig, OmopImport, import_dir};

fn eunomia_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/omop-eunomia-gibleed"
    ))
}

fn import() -> &'static OmopImport {
    static IMPORT: OnceLock<OmopImport> = OnceLock::new();
    IMPORT.get_or_init(|| import_dir(&eunomia_dir(), &DeidConfig::new(2026)).unwrap())
}

#[test]
fn row_counts_match_the_data_readme() {
    let import = import();
    assert_eq!(import.rows["person"], 2_694);
    assert_eq!(import.rows["condition_occurrence"], 65_332);
    assert_eq!(import.rows["drug_exposure"], 67_707);
    assert_eq!(import.rows["measurement"], 44_053);
    assert_eq!(import.patients.len(), 2_694);
    let periods: usize = import
        .patients
        .iter()
        .map(|p| p.record.index.observation_periods.len())
        .sum();
    eprintln!(
        "observation periods: {} rows, {periods} indexed, {} of persons without a person row",
        import.rows["observation_period"], import.not_indexed["observation_period"]
    );
    assert_eq!(
        periods + import.not_indexed["observation_period"] + import.withheld.observation_period,
        import.rows["observation_period"]
    );
    assert!(periods >= 2_694, "{periods} observation periods");
    let indexed: usize = import
        .patients
        .iter()
        .map(|p| p.record.index.conditions.len())
        .sum();
    eprintln!(
        "withheld under Safe Harbor: {:?}; deaths read: {:?}",
        import.withheld,
        import.rows.get("death")
    );
    assert_eq!(
        indexed + import.not_indexed["condition_occurrence"] + import.withheld.condition,
        65_332
    );
    assert!(!import.hierarchy.is_empty());
    // Ascending ids, each with a research copy.
    assert!(
        import
            .patients
            .windows(2)
            .all(|w| w[0].person_id < w[1].person_id)
    );
    assert!(
        import
            .patients
            .iter()
            .all(|p| p.record.categories.len() >= 2)
    );
}

#[test]
fn the_research_copy_keeps_years_only() {
    for p in import().patients.iter().take(50) {
        for (category, bytes) in &p.record.categories {
            if *category == pre_kms::Category::Critical {
                continue;
            }
            let text = String::from_utf8_lossy(bytes);
            // No full date anywhere: YYYY-MM-DD never appears.
            let full_date = text.as_bytes().windows(10).any(|w| {
                w[..4].iter().all(u8::is_ascii_digit)
                    && w[4] == b'-'
                    && w[5..7].iter().all(u8::is_ascii_digit)
                    && w[7] == b'-'
                    && w[8..].iter().all(u8::is_ascii_digit)
            });
            assert!(!full_date, "{category:?} of {}: {text}", p.person_id);
            for id in &p.record.identifiers {
                assert!(
                    !text.contains(id.as_str()),
                    "{category:?} holds an identifier"
                );
            }
        }
    }
}

async fn sql_rows(ctx: &SessionContext, sql: &str) -> Vec<RecordBatch> {
    ctx.sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"))
}

async fn sql_count(ctx: &SessionContext, sql: &str) -> u64 {
    let batches = sql_rows(ctx, sql).await;
    let batch = batches.iter().find(|b| b.num_rows() > 0).unwrap();
    let c = cast(batch.column(0), &DataType::Int64).unwrap();
    c.as_primitive::<Int64Type>().value(0) as u64
}

async fn sql_text(ctx: &SessionContext, sql: &str) -> String {
    let batches = sql_rows(ctx, sql).await;
    let batch = batches.iter().find(|b| b.num_rows() > 0).unwrap();
    let c = cast(batch.column(0), &DataType::Utf8).unwrap();
    assert!(!c.is_null(0));
    c.as_string::<i32>().value(0).to_string()
}

/// The tables as the files hold them (no casts here: the queries cast), except that the
/// event tables are views without what Safe Harbor withholds from the index: for a person
/// over 89 in the reference year (2026) or at death, the rows dated before the year that
/// makes them 90, and for anyone the rows dated before their birth year; an observation
/// period starts no earlier than that year.
async fn raw_context() -> SessionContext {
    let ctx = SessionContext::new();
    for table in [
        "person",
        "death",
        "condition_occurrence",
        "drug_exposure",
        "measurement",
        "concept",
        "concept_ancestor",
        "observation_period",
    ] {
        let path = eunomia_dir().join(format!("{table}.parquet"));
        let name = if table == "observation_period" || EVENT_VIEWS.iter().any(|(t, _)| *t == table)
        {
            format!("raw_{table}")
        } else {
            table.to_string()
        };
        ctx.register_parquet(&name, path.to_str().unwrap(), ParquetReadOptions::default())
            .await
            .unwrap();
    }
    let statements = std::iter::once(
        "CREATE VIEW first_year AS \
         SELECT pid, CASE WHEN age_year - born > 89 THEN age_year - 90 ELSE born END AS y \
         FROM (SELECT CAST(p.person_id AS BIGINT) AS pid, CAST(p.year_of_birth AS BIGINT) AS born, \
                      LEAST(COALESCE(MIN(CAST(date_part('year', d.death_date) AS BIGINT)), 2026), 2026) AS age_year \
               FROM person p LEFT JOIN death d ON CAST(d.person_id AS BIGINT) = CAST(p.person_id AS BIGINT) \
               GROUP BY 1, 2)"
            .to_string(),
    )
    .chain(EVENT_VIEWS.iter().map(|(table, date)| {
        format!(
            "CREATE VIEW {table} AS SELECT t.* FROM raw_{table} t \
             JOIN first_year f ON f.pid = CAST(t.person_id AS BIGINT) \
             WHERE CAST(date_part('year', t.{date}) AS BIGINT) >= f.y"
        )
    }))
    .chain(std::iter::once(
        "CREATE VIEW observation_period AS \
         SELECT t.person_id, \
                GREATEST(CAST(t.observation_period_start_date AS DATE), make_date(f.y, 1, 1)) \
                    AS observation_period_start_date, \
                t.observation_period_end_date \
         FROM raw_observation_period t JOIN first_year f ON f.pid = CAST(t.person_id AS BIGINT) \
         WHERE CAST(t.observation_period_end_date AS DATE) >= make_date(f.y, 1, 1)"
            .to_string(),
    ));
    for sql in statements {
        ctx.sql(&sql).await.unwrap_or_else(|e| panic!("{e}\n{sql}"));
    }
    ctx
}

/// The event tables filtered by Safe Harbor's first year, with their date column
/// (`observation_period`, clamped as well as filtered, has its own view).
const EVENT_VIEWS: [(&str, &str); 3] = [
    ("condition_occurrence", "condition_start_date"),
    ("drug_exposure", "drug_exposure_start_date"),
    ("measurement", "measurement_date"),
];

fn definition(json: &str) -> CohortDefinition {
    CohortDefinition::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{json}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_counts_equal_plain_sql_over_the_raw_files() {
    let import = import();
    let mut builder = IndexBuilder::new();
    for p in &import.patients {
        builder.add(p.person_id, &p.record.index).unwrap();
    }
    let engine = CohortEngine::from_index(builder.build(), import.hierarchy.clone());
    let consent = ConsentSnapshot::everything(import.patients.iter().map(|p| p.person_id)).unwrap();
    let ctx = raw_context().await;

    // GI bleed (concept 192671) and its descendants through concept_ancestor.
    let gi_bleed = sql_text(
        &ctx,
        "SELECT concept_code FROM concept WHERE CAST(concept_id AS BIGINT) = 192671",
    )
    .await;
    assert_eq!(gi_bleed, "74474003");
    let gi_bleed_rows = "SELECT CAST(co.person_id AS BIGINT) AS person_id, \
                CAST(co.condition_start_date AS DATE) AS d \
         FROM condition_occurrence co \
         WHERE CAST(co.condition_concept_id AS BIGINT) IN ( \
             SELECT CAST(descendant_concept_id AS BIGINT) FROM concept_ancestor \
             WHERE CAST(ancestor_concept_id AS BIGINT) = 192671 \
             UNION SELECT 192671)";
    // The most frequent RxNorm drug.
    let drug_concept = sql_text(
        &ctx,
        "SELECT CAST(CAST(de.drug_concept_id AS BIGINT) AS VARCHAR) FROM drug_exposure de \
         JOIN concept c ON CAST(c.concept_id AS BIGINT) = CAST(de.drug_concept_id AS BIGINT) \
         WHERE c.vocabulary_id = 'RxNorm' \
         GROUP BY CAST(de.drug_concept_id AS BIGINT) ORDER BY COUNT(*) DESC, 1 LIMIT 1",
    )
    .await;
    let drug_code = sql_text(
        &ctx,
        &format!(
            "SELECT concept_code FROM concept WHERE CAST(concept_id AS BIGINT) = {drug_concept}"
        ),
    )
    .await;
    // The most frequent LOINC measurement (Eunomia has no measurement values:
    // value_as_number is all null, stored as BOOLEAN).
    let lab_concept = sql_text(
        &ctx,
        "SELECT CAST(CAST(m.measurement_concept_id AS BIGINT) AS VARCHAR) FROM measurement m \
         JOIN concept c ON CAST(c.concept_id AS BIGINT) = CAST(m.measurement_concept_id AS BIGINT) \
         WHERE c.vocabulary_id = 'LOINC' \
         GROUP BY CAST(m.measurement_concept_id AS BIGINT) ORDER BY COUNT(*) DESC, 1 LIMIT 1",
    )
    .await;
    let lab_code = sql_text(
        &ctx,
        &format!(
            "SELECT concept_code FROM concept WHERE CAST(concept_id AS BIGINT) = {lab_concept}"
        ),
    )
    .await;

    // The SNOMED ancestor whose descendants reach the most patients with a condition.
    let ancestor = sql_text(
        &ctx,
        "SELECT CAST(CAST(ca.ancestor_concept_id AS BIGINT) AS VARCHAR) FROM concept_ancestor ca \
         JOIN condition_occurrence co \
           ON CAST(co.condition_concept_id AS BIGINT) = CAST(ca.descendant_concept_id AS BIGINT) \
         JOIN concept c ON CAST(c.concept_id AS BIGINT) = CAST(ca.ancestor_concept_id AS BIGINT) \
         WHERE c.vocabulary_id = 'SNOMED' \
           AND CAST(ca.ancestor_concept_id AS BIGINT) <> CAST(ca.descendant_concept_id AS BIGINT) \
         GROUP BY CAST(ca.ancestor_concept_id AS BIGINT) \
         ORDER BY COUNT(DISTINCT CAST(co.person_id AS BIGINT)) DESC, 1 LIMIT 1",
    )
    .await;
    let ancestor_code = sql_text(
        &ctx,
        &format!("SELECT concept_code FROM concept WHERE CAST(concept_id AS BIGINT) = {ancestor}"),
    )
    .await;

    let cases: Vec<(&str, String, String)> = vec![
        (
            "a SNOMED ancestor and its descendants",
            format!(
                r#"{{"criteria": [{{"condition": {{"codes": ["snomed:{ancestor_code}"], "include_descendants": true}}}}]}}"#
            ),
            format!(
                "SELECT COUNT(DISTINCT CAST(person_id AS BIGINT)) FROM condition_occurrence \
                 WHERE CAST(condition_concept_id AS BIGINT) IN ( \
                     SELECT CAST(descendant_concept_id AS BIGINT) FROM concept_ancestor \
                     WHERE CAST(ancestor_concept_id AS BIGINT) = {ancestor} UNION SELECT {ancestor})"
            ),
        ),
        (
            "the same ancestor alone",
            format!(
                r#"{{"criteria": [{{"condition": {{"codes": ["snomed:{ancestor_code}"]}}}}]}}"#
            ),
            format!(
                "SELECT COUNT(DISTINCT CAST(person_id AS BIGINT)) FROM condition_occurrence \
                 WHERE CAST(condition_concept_id AS BIGINT) = {ancestor}"
            ),
        ),
        (
            "GI bleed and descendants",
            format!(
                r#"{{"criteria": [{{"condition": {{"codes": ["snomed:{gi_bleed}"], "include_descendants": true}}}}]}}"#
            ),
            format!("SELECT COUNT(DISTINCT person_id) FROM ({gi_bleed_rows}) g"),
        ),
        (
            "GI bleed only, no descendants",
            format!(r#"{{"criteria": [{{"condition": {{"codes": ["snomed:{gi_bleed}"]}}}}]}}"#),
            "SELECT COUNT(DISTINCT CAST(person_id AS BIGINT)) FROM condition_occurrence \
             WHERE CAST(condition_concept_id AS BIGINT) = 192671"
                .to_string(),
        ),
        (
            "a drug",
            format!(r#"{{"criteria": [{{"drug": {{"codes": ["rxnorm:{drug_code}"]}}}}]}}"#),
            format!(
                "SELECT COUNT(DISTINCT CAST(person_id AS BIGINT)) FROM drug_exposure \
                 WHERE CAST(drug_concept_id AS BIGINT) = {drug_concept}"
            ),
        ),
        (
            "women with GI bleed in 2000-2010, without the drug",
            format!(
                r#"{{"criteria": [
                    {{"demographics": {{"sex": ["female"]}}}},
                    {{"condition": {{"codes": ["snomed:{gi_bleed}"], "include_descendants": true,
                        "window": {{"between": {{"from": "2000-01-01", "to": "2010-12-31"}}}}}}}},
                    {{"not": {{"drug": {{"codes": ["rxnorm:{drug_code}"]}}}}}}]}}"#
            ),
            format!(
                "SELECT COUNT(*) FROM person p \
                 WHERE CAST(p.gender_concept_id AS BIGINT) = 8532 \
                 AND CAST(p.person_id AS BIGINT) IN (SELECT person_id FROM ({gi_bleed_rows}) g \
                     WHERE d BETWEEN DATE '2000-01-01' AND DATE '2010-12-31') \
                 AND CAST(p.person_id AS BIGINT) NOT IN (SELECT CAST(person_id AS BIGINT) FROM drug_exposure \
                     WHERE CAST(drug_concept_id AS BIGINT) = {drug_concept})"
            ),
        ),
        (
            "the drug within 30 days after a first GI bleed",
            format!(
                r#"{{"index": {{"first_event": {{"condition": {{"codes": ["snomed:{gi_bleed}"], "include_descendants": true}}}}}},
                    "criteria": [{{"drug": {{"codes": ["rxnorm:{drug_code}"], "occurrence": {{"at_least": 1}},
                        "window": {{"days_from_index": {{"from": 0, "to": 30}}}}}}}}]}}"#
            ),
            format!(
                "WITH idx AS (SELECT person_id, MIN(d) AS first_day FROM ({gi_bleed_rows}) g GROUP BY person_id) \
                 SELECT COUNT(DISTINCT idx.person_id) FROM idx \
                 JOIN drug_exposure de ON CAST(de.person_id AS BIGINT) = idx.person_id \
                 WHERE CAST(de.drug_concept_id AS BIGINT) = {drug_concept} \
                 AND CAST(de.drug_exposure_start_date AS DATE) >= idx.first_day \
                 AND CAST(de.drug_exposure_start_date AS DATE) <= idx.first_day + INTERVAL '30 days'"
            ),
        ),
        (
            "observed a year before and after 2010-01-01",
            r#"{"index": {"date": "2010-01-01"},
                "criteria": [{"observation_period": {"prior_days": 365, "post_days": 365}}]}"#
                .to_string(),
            "SELECT COUNT(DISTINCT CAST(person_id AS BIGINT)) FROM observation_period \
             WHERE CAST(observation_period_start_date AS DATE) <= DATE '2009-01-01' \
             AND CAST(observation_period_end_date AS DATE) >= DATE '2011-01-01' \
             AND CAST(person_id AS BIGINT) IN (SELECT CAST(person_id AS BIGINT) FROM person)"
                .to_string(),
        ),
        (
            "observed 180 days before a first GI bleed",
            format!(
                r#"{{"index": {{"first_event": {{"condition": {{"codes": ["snomed:{gi_bleed}"], "include_descendants": true}}}}}},
                    "criteria": [{{"observation_period": {{"prior_days": 180}}}}]}}"#
            ),
            format!(
                "WITH idx AS (SELECT person_id, MIN(d) AS first_day FROM ({gi_bleed_rows}) g GROUP BY person_id) \
                 SELECT COUNT(DISTINCT idx.person_id) FROM idx \
                 JOIN observation_period op ON CAST(op.person_id AS BIGINT) = idx.person_id \
                 WHERE CAST(op.observation_period_start_date AS DATE) <= idx.first_day - INTERVAL '180 days' \
                 AND CAST(op.observation_period_end_date AS DATE) >= idx.first_day"
            ),
        ),
        (
            "a lab at least 3 times since 2010",
            format!(
                r#"{{"criteria": [{{"measurement": {{"codes": ["loinc:{lab_code}"], "occurrence": {{"at_least": 3}},
                    "window": {{"between": {{"from": "2010-01-01"}}}}}}}}]}}"#
            ),
            format!(
                "SELECT COUNT(*) FROM (SELECT CAST(person_id AS BIGINT) FROM measurement \
                 WHERE CAST(measurement_concept_id AS BIGINT) = {lab_concept} \
                 AND CAST(measurement_date AS DATE) >= DATE '2010-01-01' \
                 GROUP BY CAST(person_id AS BIGINT) HAVING COUNT(*) >= 3) x"
            ),
        ),
        (
            "born 1940-1960, GI bleed, at most one exposure to the drug",
            format!(
                r#"{{"criteria": [
                    {{"demographics": {{"birth_year": {{"min": 1940, "max": 1960}}}}}},
                    {{"condition": {{"codes": ["snomed:{gi_bleed}"], "include_descendants": true}}}},
                    {{"drug": {{"codes": ["rxnorm:{drug_code}"], "occurrence": {{"at_most": 1}}}}}}]}}"#
            ),
            format!(
                "SELECT COUNT(*) FROM person p \
                 WHERE CAST(p.year_of_birth AS BIGINT) BETWEEN 1940 AND 1960 \
                 AND CAST(p.person_id AS BIGINT) IN (SELECT person_id FROM ({gi_bleed_rows}) g) \
                 AND CAST(p.person_id AS BIGINT) NOT IN (SELECT CAST(person_id AS BIGINT) FROM drug_exposure \
                     WHERE CAST(drug_concept_id AS BIGINT) = {drug_concept} \
                     GROUP BY CAST(person_id AS BIGINT) HAVING COUNT(*) > 1)"
            ),
        ),
    ];
    let mut counts = Vec::new();
    for (name, json, sql) in cases {
        let want = sql_count(&ctx, &sql).await;
        let got = engine
            .count(&definition(&json), &consent)
            .await
            .unwrap()
            .exact;
        eprintln!("{name}: {got}");
        assert_eq!(got, want, "{name}\n{json}\n{sql}");
        assert!(want > 0, "{name}: an empty cohort checks little");
        counts.push(got);
    }
    // Descendants through concept_ancestor matter for the ancestor.
    assert!(counts[0] > counts[1], "{counts:?}");
}

/// What the custodian's secret date shift does to counts, measured on Eunomia with a key
/// per person as a custodian makes them: a definition that asks only for codes, sex or
/// birth years counts the same; relative windows count the same (a patient's dates move
/// together); a calendar window counts the patients near its ends differently.
#[tokio::test]
async fn the_date_shift_changes_only_calendar_windows() {
    use rand::SeedableRng;
    let import = import();
    let engine = |shifted: bool| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let mut builder = IndexBuilder::new();
        for p in &import.patients {
            let days = pre_kms::Identity::generate_with_rng(&mut rng).index_date_shift();
            let index = if shifted {
                p.record.index.shifted(days)
            } else {
                p.record.index.clone()
            };
            builder.add(p.person_id, &index).unwrap();
        }
        CohortEngine::from_index(builder.build(), import.hierarchy.clone())
    };
    let (truth, shifted) = (engine(false), engine(true));
    let consent = ConsentSnapshot::everything(import.patients.iter().map(|p| p.person_id)).unwrap();
    let gi = r#"{"condition": {"codes": ["snomed:74474003"], "include_descendants": true}}"#;
    // The most frequent drug.
    let mut drugs = std::collections::BTreeMap::<&str, usize>::new();
    for p in &import.patients {
        for d in &p.record.index.drugs {
            *drugs.entry(d.code.as_str()).or_default() += 1;
        }
    }
    let drug = drugs.iter().max_by_key(|(_, n)| **n).unwrap().0;
    let same = [
        format!(r#"{{"criteria": [{gi}]}}"#),
        format!(
            r#"{{"criteria": [{{"demographics": {{"sex": ["female"], "birth_year": {{"min": 1940, "max": 1960}}}}}}, {gi}]}}"#
        ),
        format!(
            r#"{{"index": {{"first_event": {gi}}},
                "criteria": [{{"observation_period": {{"prior_days": 180}}}},
                             {{"drug": {{"codes": ["rxnorm:{drug}"], "window": {{"days_from_index": {{"from": -365, "to": 30}}}}}}}}]}}"#
        ),
    ];
    for json in &same {
        let d = definition(json);
        let (a, b) = (
            truth.count(&d, &consent).await.unwrap().exact,
            shifted.count(&d, &consent).await.unwrap().exact,
        );
        eprintln!("{a} true, {b} shifted: {json}");
        assert_eq!(a, b, "{json}");
        assert!(a > 0, "{json}");
    }
    // Calendar windows: one year, five years, an index date.
    let calendar = [
        r#"{"criteria": [{"condition": {"codes": ["snomed:74474003"], "include_descendants": true,
             "window": {"between": {"from": "2005-01-01", "to": "2005-12-31"}}}}]}"#,
        r#"{"criteria": [{"condition": {"codes": ["snomed:74474003"], "include_descendants": true,
             "window": {"between": {"from": "2000-01-01", "to": "2004-12-31"}}}}]}"#,
        r#"{"index": {"date": "2010-01-01"},
            "criteria": [{"observation_period": {"prior_days": 365, "post_days": 365}}]}"#,
    ];
    for json in calendar {
        let d = definition(json);
        let (a, b) = (
            truth.count(&d, &consent).await.unwrap().exact,
            shifted.count(&d, &consent).await.unwrap().exact,
        );
        let change = (b as f64 - a as f64) / a as f64;
        eprintln!(
            "calendar: {a} true, {b} shifted ({:+.1}%): {json}",
            change * 100.0
        );
        assert!(a > 0 && change.abs() < 0.25, "{a} vs {b}: {json}");
    }
}
