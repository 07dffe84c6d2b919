//! OMOP CDM 5.3/5.4 importer: a directory of Parquet or CSV tables to per-patient records,
//! their searchable index and the concept hierarchy.
//!
//! Tables read (file `<table>.parquet` or `<table>.csv`, names matched case-insensitively):
//! `person`, `condition_occurrence`, `measurement`, `drug_exposure`,
//! `procedure_occurrence`, `concept`, `concept_ancestor`, and `observation_period` and
//! `death` when present (without `observation_period`, no patient has an observation
//! period, and observation-period criteria match nobody; without `death`, every age is
//! taken at the reference year; a table not read has no entry in [`OmopImport::rows`]).
//!
//! ## Types, and the quirks of real exports
//!
//! Every column read is converted to its type in the OMOP CDM 5.3 specification (integer,
//! float, date, varchar), whatever type the file stores:
//!
//! * integers stored as `DOUBLE` (OHDSI Eunomia stores every id and concept column so) are
//!   accepted when the value is a whole number in range; `1.5` is an error;
//! * a column stored as `BOOLEAN` (what an all-null column becomes in Eunomia's export) is
//!   accepted only when every value is null; a true or false value is an error;
//! * dates may be `DATE`, timestamps, or `YYYY-MM-DD` text; CSV values are text and are
//!   parsed the same way (an empty field is null);
//! * a required column that is missing, or null in a row, is an error.
//!
//! Errors name the file, the column and the row (rows counted from 1, not counting a CSV
//! header); nothing is skipped silently. Event rows whose concept is `0` or outside the
//! four searchable vocabularies are not indexed and are counted in
//! [`OmopImport::not_indexed`].
//!
//! ## What a patient becomes
//!
//! * The index ([`PatientIndex`]): birth year (the 90+ bucket for patients over 89 at the
//!   reference year, or at death), sex from `gender_concept_id` (8507 male, 8532 female, 8521 other,
//!   else unknown), and one coded event per condition, measurement (value and UCUM unit
//!   when present), drug exposure and procedure, with the full date, and the patient's
//!   observation periods (start and end dates; a period ending before it starts is an
//!   error, a period of a person without a person row is not indexed and is counted in
//!   [`OmopImport::not_indexed`], as Eunomia's subset keeps such periods). Codes are the
//!   concepts' `concept_code` in their vocabulary: SNOMED → `snomed`, LOINC → `loinc`,
//!   RxNorm → `rxnorm`, ICD10CM → `icd10`. Safe Harbor then withholds what would reveal
//!   an age over 89 (counted in [`OmopImport::withheld`]), as for FHIR input
//!   ([`crate::index`]).
//! * The research copy: the rows as minimal FHIR R4 resources (Patient, Condition,
//!   Observation, MedicationStatement, Procedure) with the standard code and its name only,
//!   put through the same categorization and Safe Harbor de-identification as FHIR input
//!   ([`PatientRecord::from_fhir`]): dates reduced to years, ids replaced, sensitive codes
//!   moved to their categories. No `*_source_value` reaches it; `person_source_value` is
//!   kept only as an identifier for the leak scan ([`PatientRecord::identifiers`]).
//! * The concept hierarchy: `concept_ancestor` pairs between concepts of the four
//!   vocabularies.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Date32Type, Field, Float64Type, Int64Type, Schema};
use model::{
    Code, CodeSystem, CodedEvent, ConceptHierarchy, Date, ObservationPeriod, PatientIndex, Person,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::deidentify::DeidConfig;
use crate::index;
use crate::record::PatientRecord;

/// One imported patient.
#[derive(Debug, Clone)]
pub struct OmopPatient {
    /// The OMOP `person_id` (the custodian's id; the broker assigns its own pseudonym).
    pub person_id: i64,
    pub record: PatientRecord,
}

/// The result of importing an OMOP CDM directory.
#[derive(Debug, Clone)]
pub struct OmopImport {
    /// Every person, ascending by `person_id`.
    pub patients: Vec<OmopPatient>,
    /// Ancestor → descendant relations among concepts of the four vocabularies.
    pub hierarchy: ConceptHierarchy,
    /// Rows read per table.
    pub rows: BTreeMap<&'static str, usize>,
    /// Event rows per table left out of the index: concept 0, or a concept outside
    /// SNOMED, LOINC, RxNorm and ICD10CM; for `observation_period`, periods of persons
    /// without a person row; for `death`, deaths of persons without a person row.
    pub not_indexed: BTreeMap<&'static str, usize>,
    /// Index rows withheld under Safe Harbor, per index table.
    pub withheld: index::Withheld,
}

/// Why an OMOP directory could not be imported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OmopError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir}: no `{table}` table; expected {table}.parquet or {table}.csv")]
    MissingTable { dir: PathBuf, table: &'static str },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: no column `{column}`, which the OMOP CDM 5.3 specification requires")]
    MissingColumn { path: PathBuf, column: &'static str },
    #[error("{path}: column `{column}`, row {row}: {problem}")]
    Value {
        path: PathBuf,
        column: &'static str,
        row: usize,
        problem: String,
    },
}

/// A column's type in the OMOP CDM 5.3 specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    Integer,
    Float,
    Date,
    Text,
}

impl Spec {
    fn name(self) -> &'static str {
        match self {
            Spec::Integer => "an integer",
            Spec::Float => "a float",
            Spec::Date => "a date",
            Spec::Text => "a varchar",
        }
    }
}

struct Col {
    name: &'static str,
    spec: Spec,
    required: bool,
}

const fn req(name: &'static str, spec: Spec) -> Col {
    Col {
        name,
        spec,
        required: true,
    }
}

const fn opt(name: &'static str, spec: Spec) -> Col {
    Col {
        name,
        spec,
        required: false,
    }
}

/// One column of one batch, converted to its spec type.
enum Values {
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Date(Vec<Option<i32>>),
    Text(Vec<Option<String>>),
}

impl Values {
    fn int(&self, i: usize) -> Option<i64> {
        match self {
            Values::Int(v) => v[i],
            _ => None,
        }
    }
    fn float(&self, i: usize) -> Option<f64> {
        match self {
            Values::Float(v) => v[i],
            _ => None,
        }
    }
    fn date(&self, i: usize) -> Option<i32> {
        match self {
            Values::Date(v) => v[i],
            _ => None,
        }
    }
    fn text(&self, i: usize) -> Option<&str> {
        match self {
            Values::Text(v) => v[i].as_deref(),
            _ => None,
        }
    }
}

struct Reader<'a> {
    path: PathBuf,
    cols: &'a [Col],
}

impl Reader<'_> {
    fn err(&self, column: &'static str, row: usize, problem: impl Into<String>) -> OmopError {
        OmopError::Value {
            path: self.path.clone(),
            column,
            row,
            problem: problem.into(),
        }
    }

    /// Converts one column of a batch to its spec type.
    fn convert(&self, col: &Col, a: &ArrayRef, first_row: usize) -> Result<Values, OmopError> {
        let n = a.len();
        let row_of = |i: usize| first_row + i;
        // All-null columns come out of some exports as BOOLEAN (or as the Null type).
        if matches!(a.data_type(), DataType::Boolean | DataType::Null) {
            let first_value = match a.data_type() {
                DataType::Boolean => (0..n).find(|&i| !a.is_null(i)),
                _ => None,
            };
            if let Some(i) = first_value {
                let v = a.as_boolean().value(i);
                return Err(self.err(
                    col.name,
                    row_of(i),
                    format!(
                        "BOOLEAN value `{v}` where the OMOP CDM 5.3 specification has {}",
                        col.spec.name()
                    ),
                ));
            }
            return Ok(match col.spec {
                Spec::Integer => Values::Int(vec![None; n]),
                Spec::Float => Values::Float(vec![None; n]),
                Spec::Date => Values::Date(vec![None; n]),
                Spec::Text => Values::Text(vec![None; n]),
            });
        }
        let text = match a.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                let s = cast(a, &DataType::Utf8).map_err(|e| self.file_err(e))?;
                let s = s.as_string::<i32>();
                Some(
                    (0..n)
                        .map(|i| {
                            (!s.is_null(i))
                                .then(|| s.value(i).trim())
                                .filter(|v| !v.is_empty())
                                .map(str::to_string)
                        })
                        .collect::<Vec<_>>(),
                )
            }
            _ => None,
        };
        let unexpected = |ty: &DataType| {
            self.err(
                col.name,
                first_row,
                format!(
                    "stored as {ty}, which does not convert to {} (OMOP CDM 5.3)",
                    col.spec.name()
                ),
            )
        };
        match col.spec {
            Spec::Text => Ok(Values::Text(match text {
                Some(t) => t,
                None if a.data_type().is_numeric() => {
                    let s = cast(a, &DataType::Utf8).map_err(|e| self.file_err(e))?;
                    let s = s.as_string::<i32>();
                    (0..n)
                        .map(|i| (!s.is_null(i)).then(|| s.value(i).to_string()))
                        .collect()
                }
                None => return Err(unexpected(a.data_type())),
            })),
            Spec::Integer => {
                let mut out = Vec::with_capacity(n);
                if let Some(t) = text {
                    for (i, v) in t.iter().enumerate() {
                        out.push(match v {
                            None => None,
                            Some(v) => Some(parse_int(v).ok_or_else(|| {
                                self.err(col.name, row_of(i), format!("`{v}` is not an integer"))
                            })?),
                        });
                    }
                } else if a.data_type().is_integer() {
                    let c = cast(a, &DataType::Int64).map_err(|e| self.file_err(e))?;
                    if let Some(i) = (0..n).find(|&i| c.is_null(i) && !a.is_null(i)) {
                        return Err(self.err(col.name, row_of(i), "integer out of range"));
                    }
                    let c = c.as_primitive::<Int64Type>();
                    out.extend((0..n).map(|i| (!c.is_null(i)).then(|| c.value(i))));
                } else if a.data_type().is_floating()
                    || matches!(a.data_type(), DataType::Decimal128(..))
                {
                    // The Eunomia quirk: ids and concept ids stored as DOUBLE.
                    let c = cast(a, &DataType::Float64).map_err(|e| self.file_err(e))?;
                    let c = c.as_primitive::<Float64Type>();
                    for i in 0..n {
                        out.push(if c.is_null(i) {
                            None
                        } else {
                            let v = c.value(i);
                            Some(whole(v).ok_or_else(|| {
                                self.err(col.name, row_of(i), format!("{v} is not an integer"))
                            })?)
                        });
                    }
                } else {
                    return Err(unexpected(a.data_type()));
                }
                Ok(Values::Int(out))
            }
            Spec::Float => {
                if let Some(t) = text {
                    let mut out = Vec::with_capacity(n);
                    for (i, v) in t.iter().enumerate() {
                        out.push(match v {
                            None => None,
                            Some(v) => {
                                Some(v.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(
                                    || {
                                        self.err(
                                            col.name,
                                            row_of(i),
                                            format!("`{v}` is not a number"),
                                        )
                                    },
                                )?)
                            }
                        });
                    }
                    Ok(Values::Float(out))
                } else if a.data_type().is_numeric() {
                    let c = cast(a, &DataType::Float64).map_err(|e| self.file_err(e))?;
                    let c = c.as_primitive::<Float64Type>();
                    Ok(Values::Float(
                        (0..n)
                            .map(|i| (!c.is_null(i)).then(|| c.value(i)))
                            .collect(),
                    ))
                } else {
                    Err(unexpected(a.data_type()))
                }
            }
            Spec::Date => {
                if let Some(t) = text {
                    let mut out = Vec::with_capacity(n);
                    for (i, v) in t.iter().enumerate() {
                        out.push(match v {
                            None => None,
                            Some(v) => Some(parse_date(v).ok_or_else(|| {
                                self.err(
                                    col.name,
                                    row_of(i),
                                    format!("`{v}` is not a date (YYYY-MM-DD)"),
                                )
                            })?),
                        });
                    }
                    Ok(Values::Date(out))
                } else if matches!(
                    a.data_type(),
                    DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)
                ) {
                    let c = cast(a, &DataType::Date32).map_err(|e| self.file_err(e))?;
                    let c = c.as_primitive::<Date32Type>();
                    Ok(Values::Date(
                        (0..n)
                            .map(|i| (!c.is_null(i)).then(|| c.value(i)))
                            .collect(),
                    ))
                } else {
                    Err(unexpected(a.data_type()))
                }
            }
        }
    }

    fn file_err(&self, e: impl std::fmt::Display) -> OmopError {
        OmopError::File {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Calls `each` with every batch's columns (in `cols` order) and first row number.
    fn for_each(
        &self,
        mut each: impl FnMut(&[Values], usize, usize) -> Result<(), OmopError>,
    ) -> Result<(), OmopError> {
        let mut first_row = 1;
        let mut on_batch = |batch: RecordBatch| -> Result<(), OmopError> {
            let mut values = Vec::with_capacity(self.cols.len());
            for col in self.cols {
                let idx = batch
                    .schema()
                    .fields()
                    .iter()
                    .position(|f| f.name().eq_ignore_ascii_case(col.name));
                let v = match idx {
                    Some(idx) => self.convert(col, batch.column(idx), first_row)?,
                    None if col.required => {
                        return Err(OmopError::MissingColumn {
                            path: self.path.clone(),
                            column: col.name,
                        });
                    }
                    None => {
                        let nulls: ArrayRef =
                            Arc::new(arrow::array::NullArray::new(batch.num_rows()));
                        self.convert(col, &nulls, first_row)?
                    }
                };
                if col.required
                    && let Some(i) = missing(&v)
                {
                    return Err(self.err(
                        col.name,
                        first_row + i,
                        "missing value in a required column",
                    ));
                }
                values.push(v);
            }
            each(&values, first_row, batch.num_rows())?;
            first_row += batch.num_rows();
            Ok(())
        };
        let io = |source| OmopError::Io {
            path: self.path.clone(),
            source,
        };
        let file = File::open(&self.path).map_err(io)?;
        if has_extension(&self.path, "parquet") {
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| self.file_err(e))?
                .with_batch_size(64 * 1024)
                .build()
                .map_err(|e| self.file_err(e))?;
            for batch in reader {
                on_batch(batch.map_err(|e| self.file_err(e))?)?;
            }
        } else {
            // CSV: every column read as text, then converted by the spec.
            let mut header = String::new();
            BufReader::new(File::open(&self.path).map_err(io)?)
                .read_line(&mut header)
                .map_err(io)?;
            let names: Vec<String> = header
                .trim_end_matches(['\r', '\n'])
                .split(',')
                .map(|s| s.trim().trim_matches('"').to_string())
                .collect();
            let schema = Arc::new(Schema::new(
                names
                    .iter()
                    .map(|n| Field::new(n, DataType::Utf8, true))
                    .collect::<Vec<_>>(),
            ));
            let reader = arrow::csv::ReaderBuilder::new(schema)
                .with_header(true)
                .with_batch_size(64 * 1024)
                .build(file)
                .map_err(|e| self.file_err(e))?;
            for batch in reader {
                on_batch(batch.map_err(|e| self.file_err(e))?)?;
            }
        }
        Ok(())
    }
}

fn missing(v: &Values) -> Option<usize> {
    match v {
        Values::Int(v) => v.iter().position(Option::is_none),
        Values::Float(v) => v.iter().position(Option::is_none),
        Values::Date(v) => v.iter().position(Option::is_none),
        Values::Text(v) => v.iter().position(Option::is_none),
    }
}

fn whole(v: f64) -> Option<i64> {
    (v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15).then_some(v as i64)
}

fn parse_int(s: &str) -> Option<i64> {
    s.parse::<i64>()
        .ok()
        .or_else(|| s.parse::<f64>().ok().and_then(whole))
}

fn parse_date(s: &str) -> Option<i32> {
    let day = match s.len() {
        10 => s,
        n if n > 10 && matches!(s.as_bytes()[10], b' ' | b'T') => &s[..10],
        _ => return None,
    };
    day.parse::<Date>().ok().map(Date::days)
}

fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

/// The file of `table` in `dir`: `<table>.parquet` or `<table>.csv`, any case.
fn find_table(dir: &Path, table: &'static str) -> Result<PathBuf, OmopError> {
    let entries = std::fs::read_dir(dir).map_err(|source| OmopError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut found: Option<PathBuf> = None;
    for entry in entries.flatten() {
        let path = entry.path();
        let stem_matches = path
            .file_stem()
            .and_then(|s| s.to_str())
            .is_some_and(|s| s.eq_ignore_ascii_case(table));
        if stem_matches && (has_extension(&path, "parquet") || has_extension(&path, "csv")) {
            // Prefer Parquet when both exist.
            if found.as_ref().is_none_or(|f| !has_extension(f, "parquet")) {
                found = Some(path);
            }
        }
    }
    found.ok_or_else(|| OmopError::MissingTable {
        dir: dir.to_path_buf(),
        table,
    })
}

fn vocabulary(vocabulary_id: &str) -> Option<CodeSystem> {
    match vocabulary_id {
        "SNOMED" => Some(CodeSystem::Snomed),
        "LOINC" => Some(CodeSystem::Loinc),
        "RxNorm" => Some(CodeSystem::Rxnorm),
        "ICD10CM" => Some(CodeSystem::Icd10),
        _ => None,
    }
}

fn system_url(system: CodeSystem) -> &'static str {
    match system {
        CodeSystem::Snomed => "http://snomed.info/sct",
        CodeSystem::Loinc => "http://loinc.org",
        CodeSystem::Rxnorm => "http://www.nlm.nih.gov/research/umls/rxnorm",
        CodeSystem::Icd10 => "http://hl7.org/fhir/sid/icd-10-cm",
    }
}

struct Concept {
    code: Code,
    name: Option<String>,
}

struct Concepts {
    coded: HashMap<i64, Concept>,
    units: HashMap<i64, String>,
}

/// A person row: birth year, month, day, administrative sex and the source value.
type PersonRow = (i32, Option<u32>, Option<u32>, &'static str, Option<String>);

#[derive(Default)]
struct Rows {
    patient: Option<PersonRow>,
    death: Option<Date>,
    index: PatientIndex,
    resources: Vec<Value>,
}

/// Imports the OMOP CDM tables in `dir`. `cfg` sets the reference year for the 90+ rule.
pub fn import_dir(dir: &Path, cfg: &DeidConfig) -> Result<OmopImport, OmopError> {
    let mut rows_read = BTreeMap::new();
    let mut not_indexed = BTreeMap::new();

    // Vocabulary: concept id → code in one of the four systems; UCUM units.
    let mut concepts = Concepts {
        coded: HashMap::new(),
        units: HashMap::new(),
    };
    let cols = [
        req("concept_id", Spec::Integer),
        opt("concept_name", Spec::Text),
        req("vocabulary_id", Spec::Text),
        req("concept_code", Spec::Text),
    ];
    let reader = Reader {
        path: find_table(dir, "concept")?,
        cols: &cols,
    };
    let mut n = 0;
    reader.for_each(|v, _, len| {
        n += len;
        for i in 0..len {
            let id = v[0].int(i).expect("required");
            let vocab = v[2].text(i).expect("required");
            let code = v[3].text(i).expect("required");
            if vocab == "UCUM" {
                concepts.units.insert(id, code.to_string());
            } else if let Some(system) = vocabulary(vocab)
                && let Ok(code) = Code::new(system, code)
            {
                let name = v[1].text(i).map(str::to_string);
                concepts.coded.insert(id, Concept { code, name });
            }
        }
        Ok(())
    })?;
    rows_read.insert("concept", n);

    let mut hierarchy = ConceptHierarchy::new();
    let cols = [
        req("ancestor_concept_id", Spec::Integer),
        req("descendant_concept_id", Spec::Integer),
    ];
    let reader = Reader {
        path: find_table(dir, "concept_ancestor")?,
        cols: &cols,
    };
    let mut n = 0;
    reader.for_each(|v, _, len| {
        n += len;
        for i in 0..len {
            let a = v[0].int(i).expect("required");
            let d = v[1].int(i).expect("required");
            if let (Some(a), Some(d)) = (concepts.coded.get(&a), concepts.coded.get(&d)) {
                hierarchy.add(a.code.clone(), d.code.clone());
            }
        }
        Ok(())
    })?;
    rows_read.insert("concept_ancestor", n);

    // Persons.
    let mut people: BTreeMap<i64, Rows> = BTreeMap::new();
    let cols = [
        req("person_id", Spec::Integer),
        req("gender_concept_id", Spec::Integer),
        req("year_of_birth", Spec::Integer),
        opt("month_of_birth", Spec::Integer),
        opt("day_of_birth", Spec::Integer),
        opt("person_source_value", Spec::Text),
    ];
    let reader = Reader {
        path: find_table(dir, "person")?,
        cols: &cols,
    };
    let mut n = 0;
    reader.for_each(|v, first, len| {
        n += len;
        for i in 0..len {
            let id = v[0].int(i).expect("required");
            let year = v[2].int(i).expect("required");
            let year = i32::try_from(year)
                .ok()
                .filter(|y| (1..=9999).contains(y))
                .ok_or_else(|| {
                    reader.err("year_of_birth", first + i, format!("{year} is not a year"))
                })?;
            let month = v[3]
                .int(i)
                .and_then(|m| u32::try_from(m).ok())
                .filter(|m| (1..=12).contains(m));
            let day = v[4]
                .int(i)
                .and_then(|d| u32::try_from(d).ok())
                .filter(|d| (1..=31).contains(d));
            let sex = match v[1].int(i).expect("required") {
                8507 => "male",
                8532 => "female",
                8521 => "other",
                _ => "unknown",
            };
            let source = v[5].text(i).map(str::to_string);
            let entry = people.entry(id).or_default();
            if entry.patient.is_some() {
                return Err(reader.err(
                    "person_id",
                    first + i,
                    format!("person_id {id} appears twice"),
                ));
            }
            entry.patient = Some((year, month, day, sex, source));
            // The birth year is bucketed once deaths are known (the age is taken at death).
            entry.index.person = Person {
                birth_year: Some(year),
                sex: sex.to_string(),
            };
        }
        Ok(())
    })?;
    rows_read.insert("person", n);

    // Events.
    struct EventTable {
        table: &'static str,
        concept: &'static str,
        date: &'static str,
        kind: Kind,
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Condition,
        Measurement,
        Drug,
        Procedure,
    }
    let tables = [
        EventTable {
            table: "condition_occurrence",
            concept: "condition_concept_id",
            date: "condition_start_date",
            kind: Kind::Condition,
        },
        EventTable {
            table: "measurement",
            concept: "measurement_concept_id",
            date: "measurement_date",
            kind: Kind::Measurement,
        },
        EventTable {
            table: "drug_exposure",
            concept: "drug_concept_id",
            date: "drug_exposure_start_date",
            kind: Kind::Drug,
        },
        EventTable {
            table: "procedure_occurrence",
            concept: "procedure_concept_id",
            date: "procedure_date",
            kind: Kind::Procedure,
        },
    ];
    for t in tables {
        let mut cols = vec![
            req("person_id", Spec::Integer),
            req(t.concept, Spec::Integer),
            req(t.date, Spec::Date),
        ];
        if t.kind == Kind::Measurement {
            cols.push(opt("value_as_number", Spec::Float));
            cols.push(opt("unit_concept_id", Spec::Integer));
        }
        let reader = Reader {
            path: find_table(dir, t.table)?,
            cols: &cols,
        };
        let (mut n, mut skipped) = (0, 0);
        reader.for_each(|v, first, len| {
            n += len;
            for i in 0..len {
                let person = v[0].int(i).expect("required");
                let rows = people.get_mut(&person).ok_or_else(|| {
                    reader.err("person_id", first + i, format!("person_id {person} has no person row"))
                })?;
                let Some(concept) = concepts.coded.get(&v[1].int(i).expect("required")) else {
                    skipped += 1;
                    continue;
                };
                let date = Date::from_days(v[2].date(i).expect("required")).ok_or_else(|| {
                    reader.err(t.date, first + i, "date outside the years 1 to 9999")
                })?;
                let (value, unit) = if t.kind == Kind::Measurement {
                    let unit = v[4].int(i).and_then(|u| concepts.units.get(&u)).cloned();
                    (v[3].float(i), unit.unwrap_or_default())
                } else {
                    (None, String::new())
                };
                let event = CodedEvent {
                    system: concept.code.system.as_str().to_string(),
                    code: concept.code.code.clone(),
                    date: date.to_string(),
                    value,
                    unit: unit.clone(),
                };
                let coding = json!({"coding": [{
                    "system": system_url(concept.code.system),
                    "code": concept.code.code,
                    "display": concept.name,
                }]});
                let id = format!("{}-{}", t.table, first + i);
                let subject = json!({"reference": format!("Patient/omop-{person}")});
                let resource = match t.kind {
                    Kind::Condition => {
                        rows.index.conditions.push(event);
                        json!({"resourceType": "Condition", "id": id, "subject": subject,
                               "code": coding, "onsetDateTime": date.to_string()})
                    }
                    Kind::Measurement => {
                        rows.index.measurements.push(event);
                        let mut obs = json!({"resourceType": "Observation", "id": id, "status": "final",
                               "subject": subject, "code": coding, "effectiveDateTime": date.to_string()});
                        if let Some(value) = value {
                            let mut q = json!({"value": value});
                            if !unit.is_empty() {
                                q["unit"] = json!(unit);
                                q["system"] = json!("http://unitsofmeasure.org");
                                q["code"] = json!(unit);
                            }
                            obs["valueQuantity"] = q;
                        }
                        obs
                    }
                    Kind::Drug => {
                        rows.index.drugs.push(event);
                        json!({"resourceType": "MedicationStatement", "id": id, "status": "completed",
                               "subject": subject, "medicationCodeableConcept": coding,
                               "effectiveDateTime": date.to_string()})
                    }
                    Kind::Procedure => {
                        rows.index.procedures.push(event);
                        json!({"resourceType": "Procedure", "id": id, "status": "completed",
                               "subject": subject, "code": coding,
                               "performedDateTime": date.to_string()})
                    }
                };
                rows.resources.push(resource);
            }
            Ok(())
        })?;
        rows_read.insert(t.table, n);
        not_indexed.insert(t.table, skipped);
    }

    // Observation periods: searchable spans, not part of the research copy.
    match find_table(dir, "observation_period") {
        Ok(path) => {
            let cols = [
                req("person_id", Spec::Integer),
                req("observation_period_start_date", Spec::Date),
                req("observation_period_end_date", Spec::Date),
            ];
            let reader = Reader { path, cols: &cols };
            let (mut n, mut skipped) = (0, 0);
            reader.for_each(|v, first, len| {
                n += len;
                for i in 0..len {
                    let row = first + i;
                    let person = v[0].int(i).expect("required");
                    // Exports cut to a subset of persons (OHDSI Eunomia) keep the periods
                    // of persons they left out: not indexed, and counted.
                    let Some(rows) = people.get_mut(&person) else {
                        skipped += 1;
                        continue;
                    };
                    let date = |c: usize, column: &'static str| {
                        Date::from_days(v[c].date(i).expect("required")).ok_or_else(|| {
                            reader.err(column, row, "date outside the years 1 to 9999")
                        })
                    };
                    let start = date(1, "observation_period_start_date")?;
                    let end = date(2, "observation_period_end_date")?;
                    if end < start {
                        return Err(reader.err(
                            "observation_period_end_date",
                            row,
                            format!("the period ends ({end}) before it starts ({start})"),
                        ));
                    }
                    rows.index.observation_periods.push(ObservationPeriod {
                        start: start.to_string(),
                        end: end.to_string(),
                    });
                }
                Ok(())
            })?;
            rows_read.insert("observation_period", n);
            not_indexed.insert("observation_period", skipped);
        }
        Err(OmopError::MissingTable { .. }) => {}
        Err(e) => return Err(e),
    }

    // Deaths: the 90+ rule takes a deceased patient's age at death.
    match find_table(dir, "death") {
        Ok(path) => {
            let cols = [
                req("person_id", Spec::Integer),
                req("death_date", Spec::Date),
            ];
            let reader = Reader { path, cols: &cols };
            let (mut n, mut skipped) = (0, 0);
            reader.for_each(|v, first, len| {
                n += len;
                for i in 0..len {
                    let Some(rows) = people.get_mut(&v[0].int(i).expect("required")) else {
                        skipped += 1;
                        continue;
                    };
                    let date =
                        Date::from_days(v[1].date(i).expect("required")).ok_or_else(|| {
                            reader.err("death_date", first + i, "date outside the years 1 to 9999")
                        })?;
                    // Should a person have two rows, the earlier death counts.
                    rows.death = Some(rows.death.map_or(date, |d: Date| d.min(date)));
                }
                Ok(())
            })?;
            rows_read.insert("death", n);
            not_indexed.insert("death", skipped);
        }
        Err(OmopError::MissingTable { .. }) => {}
        Err(e) => return Err(e),
    }

    let people: Vec<(i64, Rows)> = people.into_iter().collect();
    if let Some((id, _)) = people.iter().find(|(_, r)| r.patient.is_none()) {
        // Unreachable: events of unknown persons are refused above.
        return Err(OmopError::File {
            path: dir.to_path_buf(),
            message: format!("person_id {id} has events but no person row"),
        });
    }
    let patients: Vec<OmopPatient> = people
        .into_par_iter()
        .map(|(person_id, rows)| {
            let (year, month, day, sex, source) = rows.patient.expect("checked above");
            let birth = match (month, day) {
                (Some(m), Some(d)) if Date::from_ymd(year, m, d).is_some() => {
                    format!("{year:04}-{m:02}-{d:02}")
                }
                (Some(m), _) => format!("{year:04}-{m:02}"),
                _ => format!("{year:04}"),
            };
            let mut patient = json!({"resourceType": "Patient", "id": format!("omop-{person_id}"),
                                     "gender": sex, "birthDate": birth});
            if let Some(death) = rows.death {
                patient["deceasedDateTime"] = json!(death.to_string());
            }
            if let Some(source) = source {
                patient["identifier"] =
                    json!([{"system": "urn:ohdsi:omop:person_source_value", "value": source}]);
            }
            let death_year = rows.death.map(Date::year);
            let index = index::safe_harbor(rows.index, Some(year), death_year, cfg);
            let record = PatientRecord::from_fhir_with_index(&patient, &rows.resources, cfg, index);
            OmopPatient { person_id, record }
        })
        .collect();
    let mut withheld = index::Withheld::default();
    for p in &patients {
        withheld.add(&p.record.withheld);
    }
    Ok(OmopImport {
        patients,
        hierarchy,
        rows: rows_read,
        not_indexed,
        withheld,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn minimal(dir: &Path) {
        write(
            dir,
            "CONCEPT.csv",
            "concept_id,concept_name,vocabulary_id,concept_code\n\
             1,Diabetes,SNOMED,44054006\n2,Type 2,SNOMED,E11\n3,HbA1c,LOINC,4548-4\n\
             4,percent,UCUM,%\n5,Metformin,RxNorm,6809\n6,Other,CPT4,99213\n",
        );
        write(
            dir,
            "concept_ancestor.csv",
            "ancestor_concept_id,descendant_concept_id\n1,2\n1,1\n6,1\n",
        );
        write(
            dir,
            "person.csv",
            "person_id,gender_concept_id,year_of_birth,month_of_birth,day_of_birth,person_source_value\n\
             10,8532,1920,5,,MRN-000123\n11,8507,1980,,,\n",
        );
        write(
            dir,
            "condition_occurrence.csv",
            "condition_occurrence_id,person_id,condition_concept_id,condition_start_date\n\
             1,10,2,2019-03-04\n2,11,6,2019-03-04\n",
        );
        write(
            dir,
            "measurement.csv",
            "person_id,measurement_concept_id,measurement_date,value_as_number,unit_concept_id\n\
             10,3,2019-03-05 00:00:00,7.5,4\n11,3,2020-01-01,,\n",
        );
        write(
            dir,
            "drug_exposure.csv",
            "person_id,drug_concept_id,drug_exposure_start_date\n11,5.0,2018-12-31\n",
        );
        write(
            dir,
            "procedure_occurrence.csv",
            "person_id,procedure_concept_id,procedure_date\n",
        );
    }

    #[test]
    fn csv_tables_become_records_index_and_hierarchy() {
        let dir = tempfile::tempdir().unwrap();
        minimal(dir.path());
        let import = import_dir(dir.path(), &DeidConfig::new(2026)).unwrap();
        assert_eq!(import.rows["person"], 2);
        assert_eq!(import.rows["condition_occurrence"], 2);
        assert_eq!(import.not_indexed["condition_occurrence"], 1);
        assert_eq!(import.hierarchy.len(), 1);
        let p10 = &import.patients[0];
        assert_eq!(p10.person_id, 10);
        // Born 1920: over 89 at 2026, so the 90+ bucket year.
        assert_eq!(p10.record.index.person.birth_year, Some(1936));
        assert_eq!(p10.record.index.person.sex, "female");
        assert_eq!(p10.record.index.conditions[0].code, "E11");
        let m = &p10.record.index.measurements[0];
        assert_eq!(
            (m.value, m.unit.as_str(), m.date.as_str()),
            (Some(7.5), "%", "2019-03-05")
        );
        let p11 = &import.patients[1];
        assert_eq!(p11.record.index.measurements[0].value, None);
        assert_eq!(p11.record.index.drugs[0].system, "rxnorm");
        // The research copy: years only, no source value.
        assert!(p10.record.identifiers.iter().any(|s| s == "MRN-000123"));
        for (category, bytes) in &p10.record.categories {
            if *category != model::Category::Critical {
                let text = String::from_utf8_lossy(bytes);
                assert!(!text.contains("MRN-000123"), "{category:?}: {text}");
                assert!(!text.contains("2019-03-04"), "{category:?}: {text}");
            }
        }
    }

    #[test]
    fn observation_periods_are_indexed_when_the_table_is_there() {
        let dir = tempfile::tempdir().unwrap();
        minimal(dir.path());
        let import = import_dir(dir.path(), &DeidConfig::new(2026)).unwrap();
        assert!(!import.rows.contains_key("observation_period"));
        assert!(
            import.patients[0]
                .record
                .index
                .observation_periods
                .is_empty()
        );
        write(
            dir.path(),
            "observation_period.csv",
            "observation_period_id,person_id,observation_period_start_date,observation_period_end_date\n\
             1,10,2015-01-01,2019-12-31\n2,10,2021-01-01,2021-06-30 00:00:00\n3,11,2010-05-05,2010-05-05\n",
        );
        let import = import_dir(dir.path(), &DeidConfig::new(2026)).unwrap();
        assert_eq!(import.rows["observation_period"], 3);
        let periods: Vec<(&str, &str)> = import.patients[0]
            .record
            .index
            .observation_periods
            .iter()
            .map(|p| (p.start.as_str(), p.end.as_str()))
            .collect();
        assert_eq!(
            periods,
            [("2015-01-01", "2019-12-31"), ("2021-01-01", "2021-06-30")]
        );
        assert_eq!(import.patients[1].record.index.observation_periods.len(), 1);
        // Not in the research copy.
        for bytes in import.patients[0].record.categories.values() {
            assert!(!String::from_utf8_lossy(bytes).contains("2015-01-01"));
        }

        write(
            dir.path(),
            "observation_period.csv",
            "person_id,observation_period_start_date,observation_period_end_date\n\
             10,2015-01-01,2019-12-31\n11,2012-01-01,2011-01-01\n",
        );
        let err = import_dir(dir.path(), &DeidConfig::new(2026))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("observation_period.csv: column `observation_period_end_date`, row 2: the period ends"),
            "{err}"
        );
        write(
            dir.path(),
            "observation_period.csv",
            "person_id,observation_period_start_date,observation_period_end_date\n\
             12,2015-01-01,2019-12-31\n10,2015-01-01,2019-12-31\n",
        );
        // A period of a person without a person row (Eunomia's subset keeps them): not
        // indexed, counted.
        let import = import_dir(dir.path(), &DeidConfig::new(2026)).unwrap();
        assert_eq!(import.rows["observation_period"], 2);
        assert_eq!(import.not_indexed["observation_period"], 1);
        assert_eq!(import.patients[0].record.index.observation_periods.len(), 1);
    }

    #[test]
    fn errors_name_file_column_and_row() {
        let dir = tempfile::tempdir().unwrap();
        minimal(dir.path());
        write(
            dir.path(),
            "drug_exposure.csv",
            "person_id,drug_concept_id,drug_exposure_start_date\n11,5,2018-12-31\n11,5.5,2018-12-31\n",
        );
        let err = import_dir(dir.path(), &DeidConfig::new(2026))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "drug_exposure.csv: column `drug_concept_id`, row 2: `5.5` is not an integer"
            ),
            "{err}"
        );

        write(
            dir.path(),
            "drug_exposure.csv",
            "person_id,drug_concept_id,drug_exposure_start_date\n11,5,2018-02-30\n",
        );
        let err = import_dir(dir.path(), &DeidConfig::new(2026))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("column `drug_exposure_start_date`, row 1: `2018-02-30` is not a date"),
            "{err}"
        );

        write(
            dir.path(),
            "drug_exposure.csv",
            "person_id,drug_concept_id\n11,5\n",
        );
        let err = import_dir(dir.path(), &DeidConfig::new(2026))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no column `drug_exposure_start_date`"),
            "{err}"
        );

        std::fs::remove_file(dir.path().join("drug_exposure.csv")).unwrap();
        let err = import_dir(dir.path(), &DeidConfig::new(2026))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `drug_exposure` table"), "{err}");
    }
}
