//! The Parquet export and the SQL rendering: what other engines load and run must give the
//! engine's exact counts. DataFusion's own SQL front end stands in for them here.

use cohort_query::{CohortEngine, ConsentSnapshot, IndexTables, sql::to_sql};
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::common::{self, def};

async fn sql_count(ctx: &SessionContext, sql: &str) -> u64 {
    let batches = ctx
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"));
    let batch = batches.iter().find(|b| b.num_rows() > 0).expect("one row");
    assert_eq!(batch.num_rows(), 1);
    assert_eq!(batch.schema().field(0).name(), "count");
    let c = batch.column(0);
    assert!(!c.is_null(0));
    c.as_primitive::<Int64Type>().value(0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_the_parquet_export_gives_the_engine_counts() {
    let n = 500;
    let patients = common::population(31, n);
    let consent = common::consent(31, n, 0.8);
    let tables = common::tables(&patients);
    let dir = tempfile::tempdir().unwrap();
    tables.write_parquet_dir(dir.path()).unwrap();
    consent
        .write_parquet(&dir.path().join("consent.parquet"))
        .unwrap();

    // Read back: the same tables and snapshot.
    let read = IndexTables::read_parquet_dir(dir.path()).unwrap();
    let read_consent = ConsentSnapshot::read_parquet(&dir.path().join("consent.parquet")).unwrap();
    assert_eq!(read_consent.hash(), consent.hash());
    assert_eq!(read.persons(), tables.persons());

    let hierarchy = common::hierarchy();
    let engine = CohortEngine::from_index(tables, hierarchy.clone());
    let reread = CohortEngine::from_parquet_dir(dir.path(), hierarchy.clone()).unwrap();

    let ctx = SessionContext::new();
    for table in [
        "person",
        "condition",
        "measurement",
        "drug",
        "procedure",
        "observation_period",
        "consent",
    ] {
        let path = dir.path().join(format!("{table}.parquet"));
        ctx.register_parquet(table, path.to_str().unwrap(), ParquetReadOptions::default())
            .await
            .unwrap();
    }
    for (name, json) in common::definitions() {
        let d = def(json);
        let want = engine.count(&d, &consent).await.unwrap();
        assert_eq!(
            reread.count(&d, &read_consent).await.unwrap(),
            want,
            "{name}"
        );
        let sql = to_sql(&d, &hierarchy);
        assert_eq!(sql_count(&ctx, &sql).await, want.exact, "{name}\n{sql}");
    }
}

#[test]
fn reading_reports_file_column_and_row() {
    use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("consent.parquet");
    let ids: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
    let fields: ArrayRef = Arc::new(StringArray::from(vec!["sex", "drug", "conditions"]));
    let batch = RecordBatch::try_from_iter([("person_id", ids), ("field", fields)]).unwrap();
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&path).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let err = ConsentSnapshot::read_parquet(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "consent.parquet: column `field`, row 3: `conditions` is not a searchable field"
        ),
        "{err}"
    );

    let err = IndexTables::read_parquet_dir(&dir.path().join("missing")).unwrap_err();
    assert!(err.to_string().contains("person.parquet"), "{err}");
}
