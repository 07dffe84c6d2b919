//! Index tables and consent snapshots as Parquet files.
//!
//! A directory holds `person.parquet`, `condition.parquet`, `measurement.parquet`,
//! `drug.parquet`, `procedure.parquet` and `observation_period.parquet` with the columns of
//! [`crate::tables`] (`code` and `unit` as plain `VARCHAR`), and optionally `consent.parquet(person_id BIGINT, field
//! VARCHAR)` with one row per consented field and per permitted sensitive category. Other engines (PostgreSQL, DuckDB) load the
//! same files. Rows are numbered from 1 in error messages.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Date32Type, Field, Float64Type, Int32Type, Int64Type, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::consent::{ConsentBuilder, ConsentSnapshot, SearchField, person_key};
use crate::definition::Domain;
use crate::tables::{IndexBuilder, IndexError, IndexTables};
use model::Category;

const WRITE_ROWS: usize = 1 << 20;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IndexError + '_ {
    move |source| IndexError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> IndexError {
    IndexError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn value_err(path: &Path, column: &str, row: usize, problem: impl Into<String>) -> IndexError {
    IndexError::Value {
        path: path.display().to_string(),
        column: column.to_string(),
        row,
        problem: problem.into(),
    }
}

fn export_schema(table: &str) -> Arc<Schema> {
    let mut fields = vec![Field::new("person_id", DataType::Int64, false)];
    match table {
        "person" => {
            fields.push(Field::new("birth_year", DataType::Int32, true));
            fields.push(Field::new("sex", DataType::Utf8, true));
        }
        "consent" => fields.push(Field::new("field", DataType::Utf8, false)),
        "observation_period" => {
            fields.push(Field::new("start_date", DataType::Date32, false));
            fields.push(Field::new("end_date", DataType::Date32, false));
        }
        other => {
            fields.push(Field::new("code", DataType::Utf8, false));
            fields.push(Field::new("date", DataType::Date32, false));
            if other == "measurement" {
                fields.push(Field::new("value", DataType::Float64, true));
                fields.push(Field::new("unit", DataType::Utf8, true));
            }
        }
    }
    Arc::new(Schema::new(fields))
}

/// Writes `batches` (whose first column is `person_id`) as one Parquet file, without the
/// rows of `retired` patients, one batch (and one filtered copy of it) at a time.
fn write_batches(
    path: &Path,
    table: &str,
    batches: &[&RecordBatch],
    retired: &roaring::RoaringBitmap,
) -> Result<(), IndexError> {
    let schema = export_schema(table);
    let file = File::create(path).map_err(io(path))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| file_err(path, e))?;
    for batch in batches {
        let kept;
        let batch = if retired.is_empty() {
            *batch
        } else {
            let ids = batch.column(0).as_primitive::<Int64Type>();
            let keep: arrow::array::BooleanArray = ids
                .values()
                .iter()
                .map(|&id| Some(!retired.contains(id as u32)))
                .collect();
            kept =
                arrow::compute::filter_record_batch(batch, &keep).map_err(|e| file_err(path, e))?;
            &kept
        };
        let mut start = 0;
        while start < batch.num_rows() {
            let len = WRITE_ROWS.min(batch.num_rows() - start);
            let chunk = batch.slice(start, len);
            let columns = schema
                .fields()
                .iter()
                .zip(chunk.columns())
                .map(|(f, c)| arrow::compute::cast(c, f.data_type()))
                .collect::<Result<Vec<ArrayRef>, _>>()
                .map_err(|e| file_err(path, e))?;
            let out =
                RecordBatch::try_new(schema.clone(), columns).map_err(|e| file_err(path, e))?;
            writer.write(&out).map_err(|e| file_err(path, e))?;
            start += len;
        }
    }
    writer.close().map_err(|e| file_err(path, e))?;
    Ok(())
}

/// Reads a Parquet file, casting each listed column to its type; errors name the column
/// and row of a value that does not convert.
fn read_columns(
    path: &Path,
    columns: &[(&str, DataType)],
    mut each: impl FnMut(&[ArrayRef], usize) -> Result<(), IndexError>,
) -> Result<(), IndexError> {
    let file = File::open(path).map_err(io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| file_err(path, e))?
        .with_batch_size(64 * 1024)
        .build()
        .map_err(|e| file_err(path, e))?;
    let mut first_row = 1;
    for batch in reader {
        let batch = batch.map_err(|e| file_err(path, e))?;
        let mut arrays = Vec::with_capacity(columns.len());
        for (name, ty) in columns {
            let raw = batch
                .column_by_name(name)
                .ok_or_else(|| file_err(path, format!("no column `{name}`")))?;
            let cast = cast_with_options(raw, ty, &CastOptions::default()).map_err(|e| {
                value_err(path, name, first_row, format!("cannot read as {ty}: {e}"))
            })?;
            if cast.null_count() > raw.null_count() {
                let row = (0..raw.len())
                    .find(|&i| cast.is_null(i) && !raw.is_null(i))
                    .unwrap_or(0);
                return Err(value_err(
                    path,
                    name,
                    first_row + row,
                    format!("value does not convert to {ty}"),
                ));
            }
            arrays.push(cast);
        }
        each(&arrays, first_row)?;
        first_row += batch.num_rows();
    }
    Ok(())
}

/// The person of row `i` of a table whose `person_id` must have a person row.
fn person_row(
    ids: &Int64Array,
    i: usize,
    persons: &roaring::RoaringBitmap,
    path: &Path,
    row: usize,
) -> Result<u32, IndexError> {
    (!ids.is_null(i))
        .then(|| person_key(ids.value(i)))
        .flatten()
        .filter(|k| persons.contains(*k))
        .ok_or_else(|| value_err(path, "person_id", row, "no person row with this person_id"))
}

impl IndexTables {
    /// Writes the tables as Parquet files into `dir` (created if missing): one file per
    /// table, without retired ids' rows, segment after segment (no compacted copy of the
    /// whole index is made).
    pub fn write_parquet_dir(&self, dir: &Path) -> Result<(), IndexError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let persons: Vec<&RecordBatch> = self.segments.iter().map(|s| &s.person.batch).collect();
        write_batches(
            &dir.join("person.parquet"),
            "person",
            &persons,
            &self.retired,
        )?;
        for domain in Domain::ALL {
            let path = dir.join(format!("{}.parquet", domain.as_str()));
            let rows: Vec<&RecordBatch> = self
                .segments
                .iter()
                .map(|s| &s.event(domain).batch)
                .collect();
            write_batches(&path, domain.as_str(), &rows, &self.retired)?;
        }
        let periods: Vec<&RecordBatch> = self.segments.iter().map(|s| &s.periods).collect();
        write_batches(
            &dir.join("observation_period.parquet"),
            "observation_period",
            &periods,
            &self.retired,
        )
    }

    /// Reads tables written by [`IndexTables::write_parquet_dir`] (or by any tool, with
    /// those columns; integer and string types are cast). Every event row's `person_id`
    /// must have a person row.
    pub fn read_parquet_dir(dir: &Path) -> Result<IndexTables, IndexError> {
        let mut b = IndexBuilder::new();
        let person_path = dir.join("person.parquet");
        read_columns(
            &person_path,
            &[
                ("person_id", DataType::Int64),
                ("birth_year", DataType::Int32),
                ("sex", DataType::Utf8),
            ],
            |cols, first| {
                let ids = cols[0].as_primitive::<Int64Type>();
                let years = cols[1].as_primitive::<Int32Type>();
                let sexes = cols[2].as_string::<i32>();
                for i in 0..ids.len() {
                    let row = first + i;
                    let key = (!ids.is_null(i))
                        .then(|| person_key(ids.value(i)))
                        .flatten()
                        .ok_or_else(|| {
                            value_err(
                                &person_path,
                                "person_id",
                                row,
                                "not an id in 0..=4294967295",
                            )
                        })?;
                    if !b.mark_seen(key) {
                        return Err(value_err(
                            &person_path,
                            "person_id",
                            row,
                            "duplicate person_id",
                        ));
                    }
                    let year = (!years.is_null(i)).then(|| years.value(i));
                    let sex = (!sexes.is_null(i)).then(|| sexes.value(i));
                    b.push_person(key, year, sex.filter(|s| !s.is_empty()));
                }
                Ok(())
            },
        )?;
        let persons: roaring::RoaringBitmap = b.seen_persons().clone();
        for domain in Domain::ALL {
            let path = dir.join(format!("{}.parquet", domain.as_str()));
            let mut columns = vec![
                ("person_id", DataType::Int64),
                ("code", DataType::Utf8),
                ("date", DataType::Date32),
            ];
            if domain == Domain::Measurement {
                columns.push(("value", DataType::Float64));
                columns.push(("unit", DataType::Utf8));
            }
            read_columns(&path, &columns, |cols, first| {
                let ids = cols[0].as_primitive::<Int64Type>();
                let codes = cols[1].as_string::<i32>();
                let dates = cols[2].as_primitive::<Date32Type>();
                let values = cols.get(3).map(|c| c.as_primitive::<Float64Type>());
                let units = cols.get(4).map(|c| c.as_string::<i32>());
                for i in 0..ids.len() {
                    let row = first + i;
                    let key = person_row(ids, i, &persons, &path, row)?;
                    if codes.is_null(i) {
                        return Err(value_err(&path, "code", row, "missing code"));
                    }
                    if dates.is_null(i) {
                        return Err(value_err(&path, "date", row, "missing date"));
                    }
                    let value = values.and_then(|v| (!v.is_null(i)).then(|| v.value(i)));
                    let unit = units.and_then(|u| (!u.is_null(i)).then(|| u.value(i)));
                    b.push_event(
                        domain,
                        key,
                        codes.value(i),
                        dates.value(i),
                        value,
                        unit.filter(|u| !u.is_empty()),
                    );
                }
                Ok(())
            })?;
        }
        let path = dir.join("observation_period.parquet");
        read_columns(
            &path,
            &[
                ("person_id", DataType::Int64),
                ("start_date", DataType::Date32),
                ("end_date", DataType::Date32),
            ],
            |cols, first| {
                let ids = cols[0].as_primitive::<Int64Type>();
                let starts = cols[1].as_primitive::<Date32Type>();
                let ends = cols[2].as_primitive::<Date32Type>();
                for i in 0..ids.len() {
                    let row = first + i;
                    let key = person_row(ids, i, &persons, &path, row)?;
                    for (name, dates) in [("start_date", starts), ("end_date", ends)] {
                        if dates.is_null(i) {
                            return Err(value_err(&path, name, row, "missing date"));
                        }
                    }
                    if ends.value(i) < starts.value(i) {
                        return Err(value_err(
                            &path,
                            "end_date",
                            row,
                            "the period ends before it starts",
                        ));
                    }
                    b.push_period(key, starts.value(i), ends.value(i));
                }
                Ok(())
            },
        )?;
        Ok(b.build())
    }
}

impl ConsentSnapshot {
    /// Writes the snapshot as `consent.parquet(person_id BIGINT, field VARCHAR)`, one row
    /// per consented field, then one per permitted sensitive category (`field` is then the
    /// category: `mental_health`, `substance_use`, `sexual_health` or `genomics`).
    pub fn write_parquet(&self, path: &Path) -> Result<(), IndexError> {
        let rows: Vec<(i64, &'static str)> = self
            .grants()
            .map(|(p, f)| (p, f.as_str()))
            .chain(self.permits_all().map(|(p, c)| (p, c.label())))
            .collect();
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(rows.iter().map(|g| g.0)));
        let fields: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|g| g.1)));
        let batch = RecordBatch::try_new(export_schema("consent"), vec![ids, fields])
            .map_err(|e| file_err(path, e))?;
        write_batches(path, "consent", &[&batch], &roaring::RoaringBitmap::new())
    }

    /// Reads a snapshot written by [`ConsentSnapshot::write_parquet`].
    pub fn read_parquet(path: &Path) -> Result<ConsentSnapshot, IndexError> {
        let mut b = ConsentBuilder::default();
        read_columns(
            path,
            &[("person_id", DataType::Int64), ("field", DataType::Utf8)],
            |cols, first| {
                let ids = cols[0].as_primitive::<Int64Type>();
                let fields = cols[1].as_string::<i32>();
                for i in 0..ids.len() {
                    let row = first + i;
                    if ids.is_null(i) || fields.is_null(i) {
                        return Err(value_err(path, "person_id", row, "missing value"));
                    }
                    let name = fields.value(i);
                    let granted = match (name.parse::<SearchField>(), name.parse::<Category>()) {
                        (Ok(field), _) => b.grant(ids.value(i), field),
                        (_, Ok(category)) if category.is_sensitive() => {
                            b.permit(ids.value(i), category)
                        }
                        _ => {
                            let e = crate::ConsentError::UnknownField(name.to_string());
                            return Err(value_err(path, "field", row, e.to_string()));
                        }
                    };
                    granted.map_err(|e| value_err(path, "person_id", row, e.to_string()))?;
                }
                Ok(())
            },
        )?;
        Ok(b.build())
    }
}
