//! The searchable index as Arrow tables, keyed by an integer `person_id`.
//!
//! | table | columns |
//! |---|---|
//! | `person` | `person_id BIGINT`, `birth_year INT NULL`, `sex VARCHAR NULL` |
//! | `condition` | `person_id BIGINT`, `code VARCHAR`, `date DATE` |
//! | `measurement` | `person_id BIGINT`, `code VARCHAR`, `date DATE`, `value DOUBLE NULL`, `unit VARCHAR NULL` |
//! | `drug` | `person_id BIGINT`, `code VARCHAR`, `date DATE` |
//! | `procedure` | `person_id BIGINT`, `code VARCHAR`, `date DATE` |
//! | `observation_period` | `person_id BIGINT`, `start_date DATE`, `end_date DATE` |
//!
//! `code` is one column holding `system:code` (e.g. `snomed:44054006`, `loinc:4548-4`):
//! a code set is then one `IN` list, and a system is never compared apart from its code.
//! In memory `code`, `unit` and `sex` are dictionary-encoded, and each event table is sorted by
//! `(code, person_id, date)` with a directory from code to its row range, so a scan for a
//! code set reads only those codes' rows ([`crate::provider`]).
//!
//! Beside the row tables, the index keeps person sets (roaring bitmaps, serialized in a
//! `BINARY` column), read by plans whose criterion needs no more than "has a row":
//!
//! | table | columns |
//! |---|---|
//! | `person_all` | `persons` (one row: every patient) |
//! | `person_by_sex` | `sex VARCHAR`, `persons` |
//! | `person_by_birth_year` | `birth_year INT`, `persons` |
//! | `condition_by_code`, `measurement_by_code`, `drug_by_code`, `procedure_by_code` | `code VARCHAR`, `persons` (patients with at least one row of that code) |
//!
//! `person_id` must fit in 0..=4294967295: person sets are 32-bit roaring bitmaps.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, Date32Array, DictionaryArray, Float64Array, Int32Array, Int64Array,
    RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef};
use roaring::RoaringBitmap;

use crate::consent::person_key;
use crate::date::Date;
use crate::definition::Domain;
use crate::index::PatientIndex;

/// Index rows that cannot be added, or index files that cannot be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    #[error("person_id {0} is out of range: the index holds ids from 0 to 4294967295")]
    PersonIdOutOfRange(i64),
    #[error("person_id {0} was added twice; add each patient once with all their rows")]
    DuplicatePerson(i64),
    #[error("person_id {person_id}: {table} date `{date}` is not a date (YYYY-MM-DD)")]
    BadDate {
        person_id: i64,
        table: &'static str,
        date: String,
    },
    #[error("person_id {person_id}: an observation period ends ({end}) before it starts ({start})")]
    ReversedPeriod {
        person_id: i64,
        start: String,
        end: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{path}: column `{column}`, row {row}: {problem}")]
    Value {
        path: String,
        column: String,
        row: usize,
        problem: String,
    },
}

pub(crate) fn person_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Int64, false),
        Field::new("birth_year", DataType::Int32, true),
        Field::new("sex", dict_utf8(), true),
    ]))
}

pub(crate) fn dict_utf8() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

pub(crate) fn event_schema(domain: Domain) -> SchemaRef {
    let mut fields = vec![
        Field::new("person_id", DataType::Int64, false),
        Field::new("code", dict_utf8(), false),
        Field::new("date", DataType::Date32, false),
    ];
    if domain == Domain::Measurement {
        fields.push(Field::new("value", DataType::Float64, true));
        fields.push(Field::new("unit", dict_utf8(), true));
    }
    Arc::new(Schema::new(fields))
}

pub(crate) fn period_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Int64, false),
        Field::new("start_date", DataType::Date32, false),
        Field::new("end_date", DataType::Date32, false),
    ]))
}

/// The person table: one row per patient, sorted by `person_id`.
#[derive(Debug, Clone)]
pub(crate) struct PersonTable {
    pub batch: RecordBatch,
    /// `person_all(persons)`.
    pub all: SetTable,
    /// `person_by_sex(sex, persons)`.
    pub by_sex: SetTable,
    /// `person_by_birth_year(birth_year, persons)`.
    pub by_birth_year: SetTable,
}

/// A person-set table: the Arrow batch plans read, and its sets kept decoded for the
/// provider's own checks.
#[derive(Debug, Clone)]
pub(crate) struct SetTable {
    pub batch: RecordBatch,
    pub sets: Vec<RoaringBitmap>,
}

impl SetTable {
    pub(crate) fn new(
        key: Option<(&str, DataType, ArrayRef)>,
        sets: Vec<RoaringBitmap>,
    ) -> SetTable {
        let mut columns = Vec::new();
        let schema = set_schema(key.as_ref().map(|(n, t, _)| (*n, t.clone())));
        if let Some((_, _, values)) = key {
            columns.push(values);
        }
        columns.push(sets_column(&sets));
        SetTable {
            batch: RecordBatch::try_new(schema, columns).expect("set table"),
            sets,
        }
    }
}

/// One event table, sorted by `(code, person_id, date)`, with its code directory.
#[derive(Debug, Clone)]
pub(crate) struct EventTable {
    pub batch: RecordBatch,
    /// `system:code` → code number: its row in `by_code` and its range in `ranges`.
    pub directory: HashMap<String, usize>,
    /// Rows of each code.
    pub ranges: Vec<Range<usize>>,
    /// `<table>_by_code(code, persons)`.
    pub by_code: SetTable,
}

impl EventTable {
    /// The numbers of the listed codes that occur, ascending.
    pub fn code_numbers<'a>(&self, codes: impl IntoIterator<Item = &'a str>) -> Vec<usize> {
        let mut out: Vec<usize> = codes
            .into_iter()
            .filter_map(|c| self.directory.get(c).copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The `system:code` of code number `c` (its row of `by_code`).
    pub fn code(&self, c: usize) -> &str {
        use arrow::array::AsArray;
        self.by_code.batch.column(0).as_string::<i32>().value(c)
    }
}

pub(crate) fn persons_field() -> Field {
    Field::new("persons", DataType::Binary, false)
}

/// Serialized person sets as a `BINARY` column.
fn sets_column(sets: &[RoaringBitmap]) -> ArrayRef {
    Arc::new(BinaryArray::from_iter_values(
        sets.iter().map(crate::sets::encode),
    ))
}

pub(crate) fn set_schema(key: Option<(&str, DataType)>) -> SchemaRef {
    let mut fields = Vec::new();
    if let Some((name, ty)) = key {
        fields.push(Field::new(name, ty, true));
    }
    fields.push(persons_field());
    Arc::new(Schema::new(fields))
}

/// One segment of the index: the tables built from one batch of patients.
#[derive(Debug)]
pub(crate) struct Segment {
    pub person: PersonTable,
    pub events: [EventTable; 4],
    /// `observation_period`, sorted by `(person_id, start_date, end_date)`.
    pub periods: RecordBatch,
    /// Per person row, in the person table's order: the hash of the patient's rows (see
    /// [`IndexTables::content_hash`]).
    pub person_hashes: Vec<Lanes>,
}

impl Segment {
    pub(crate) fn event(&self, domain: Domain) -> &EventTable {
        &self.events[domain as usize]
    }

    fn person_ids(&self) -> &Int64Array {
        use arrow::array::AsArray;
        self.person
            .batch
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
    }

    /// The row of `person` in the person table, if the segment holds the patient.
    fn person_row(&self, person: u32) -> Option<usize> {
        self.person_ids()
            .values()
            .binary_search(&i64::from(person))
            .ok()
    }

    fn memory_size(&self) -> usize {
        let p = &self.person;
        [
            &p.batch,
            &p.all.batch,
            &p.by_sex.batch,
            &p.by_birth_year.batch,
        ]
        .iter()
        .map(|b| b.get_array_memory_size())
        .sum::<usize>()
            + self
                .events
                .iter()
                .map(|e| e.batch.get_array_memory_size() + e.by_code.batch.get_array_memory_size())
                .sum::<usize>()
            + self.periods.get_array_memory_size()
            + self.person_hashes.len() * std::mem::size_of::<Lanes>()
    }
}

/// A 256-bit sum of hashes, four wrapping 64-bit lanes.
pub(crate) type Lanes = [u64; 4];

fn add_lanes(a: &mut Lanes, b: &Lanes) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_add(*y);
    }
}

fn sub_lanes(a: &mut Lanes, b: &Lanes) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_sub(*y);
    }
}

fn lanes(hash: &blake3::Hash) -> Lanes {
    let b = hash.as_bytes();
    std::array::from_fn(|i| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes")))
}

/// The index tables an engine runs on: segments of patients, each added whole. A patient
/// is added once under each `person_id`; a later version of a patient's index is added
/// under a new id and the old one [retired](IndexTables::retire): a retired id's rows are
/// invisible to every query, whatever the consent, until [`IndexTables::compact`] drops
/// them. Build with [`IndexBuilder`] or read with [`IndexTables::read_parquet_dir`].
#[derive(Debug, Clone)]
pub struct IndexTables {
    pub(crate) segments: Arc<[Arc<Segment>]>,
    pub(crate) retired: Arc<RoaringBitmap>,
    /// The sum of the person hashes of every patient held and not retired.
    sum: Lanes,
    /// Ids held, retired or not.
    held: u64,
}

impl IndexTables {
    fn from_segments(segments: Vec<Arc<Segment>>, retired: RoaringBitmap) -> IndexTables {
        let mut sum = [0u64; 4];
        let mut held = 0u64;
        for segment in &segments {
            let ids = segment.person_ids();
            held += ids.len() as u64;
            for (row, hash) in segment.person_hashes.iter().enumerate() {
                if !retired.contains(ids.value(row) as u32) {
                    add_lanes(&mut sum, hash);
                }
            }
        }
        IndexTables {
            segments: segments.into(),
            retired: Arc::new(retired),
            sum,
            held,
        }
    }

    /// Number of patients (ids held and not retired).
    pub fn persons(&self) -> usize {
        (self.held - self.retired.len()) as usize
    }

    /// Number of rows held by an event table (retired ids' rows included, until
    /// compaction).
    pub fn rows(&self, domain: Domain) -> usize {
        self.segments
            .iter()
            .map(|s| s.event(domain).batch.num_rows())
            .sum()
    }

    /// Distinct codes of an event table.
    pub fn codes(&self, domain: Domain) -> usize {
        let mut codes: std::collections::HashSet<&str> = Default::default();
        for s in self.segments.iter() {
            codes.extend(s.event(domain).directory.keys().map(String::as_str));
        }
        codes.len()
    }

    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// The ids held and not retired.
    pub fn ids(&self) -> RoaringBitmap {
        let mut ids = RoaringBitmap::new();
        for s in self.segments.iter() {
            ids.extend(s.person_ids().values().iter().map(|&id| id as u32));
        }
        ids - &*self.retired
    }

    /// Whether `person_id` is held and not retired.
    pub fn holds(&self, person_id: i64) -> bool {
        person_key(person_id).is_some_and(|k| {
            !self.retired.contains(k) && self.segments.iter().any(|s| s.person_row(k).is_some())
        })
    }

    /// These tables and the patients of `more`, as one more segment. Fails, changing
    /// nothing, if `more` holds an id these tables already hold (retired or not): a new
    /// version of a patient's index takes a new id.
    pub fn append(&self, more: IndexTables) -> Result<IndexTables, IndexError> {
        for added in more.segments.iter() {
            for &id in added.person_ids().values() {
                let key = id as u32;
                if self.segments.iter().any(|s| s.person_row(key).is_some()) {
                    return Err(IndexError::DuplicatePerson(id));
                }
            }
        }
        let mut segments: Vec<Arc<Segment>> = self.segments.to_vec();
        segments.extend(more.segments.iter().cloned());
        let mut retired = (*self.retired).clone();
        retired |= &*more.retired;
        let mut sum = self.sum;
        add_lanes(&mut sum, &more.sum);
        Ok(IndexTables {
            segments: segments.into(),
            retired: Arc::new(retired),
            sum,
            held: self.held + more.held,
        })
    }

    /// These tables with `ids` retired: their rows are invisible from now on. Ids not
    /// held, or retired already, are ignored.
    pub fn retire(&self, ids: impl IntoIterator<Item = i64>) -> IndexTables {
        let mut retired = (*self.retired).clone();
        let mut sum = self.sum;
        for id in ids {
            let Some(key) = person_key(id) else { continue };
            if retired.contains(key) {
                continue;
            }
            for s in self.segments.iter() {
                if let Some(row) = s.person_row(key) {
                    sub_lanes(&mut sum, &s.person_hashes[row]);
                    retired.insert(key);
                    break;
                }
            }
        }
        IndexTables {
            segments: self.segments.clone(),
            retired: Arc::new(retired),
            sum,
            held: self.held,
        }
    }

    /// The same contents in one segment without the retired ids' rows: what the engine
    /// answers does not change (nor does [`IndexTables::content_hash`]), scans get shorter.
    pub fn compact(&self) -> IndexTables {
        let tables = merge(&self.segments, &self.retired);
        debug_assert_eq!(tables.sum, self.sum);
        tables
    }

    /// The last `k` segments merged into one, without their retired ids' rows (the others
    /// stay as they are). Appending a segment at a time and merging the tail whenever it
    /// grows as large as the segment before it keeps a logarithmic number of segments for
    /// linear work per row, amortized.
    pub fn merge_tail(&self, k: usize) -> IndexTables {
        let n = self.segments.len();
        let k = k.clamp(1, n);
        if k == 1 && self.retired.is_empty() {
            return self.clone();
        }
        let tail = &self.segments[n - k..];
        let merged = merge(tail, &self.retired);
        // Retired ids whose rows the merge dropped are no longer held.
        let mut retired = (*self.retired).clone();
        let mut dropped = 0u64;
        for s in tail {
            for &id in s.person_ids().values() {
                if retired.remove(id as u32) {
                    dropped += 1;
                }
            }
        }
        let mut segments: Vec<Arc<Segment>> = self.segments[..n - k].to_vec();
        segments.extend(merged.segments.iter().cloned());
        IndexTables {
            segments: segments.into(),
            retired: Arc::new(retired),
            sum: self.sum,
            held: self.held - dropped,
        }
    }

    /// Patients held per segment (retired ones included), oldest first.
    pub fn segment_sizes(&self) -> Vec<usize> {
        self.segments.iter().map(|s| s.person_ids().len()).collect()
    }
}

/// One segment made of `segments`, without `retired` ids' rows.
fn merge(segments: &[Arc<Segment>], retired: &RoaringBitmap) -> IndexTables {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Date32Type, Float64Type, Int64Type};
    let mut b = IndexBuilder::new();
    for s in segments.iter() {
        let ids = s.person_ids();
        let years = s.person.batch.column(1).as_primitive::<Int32Type>();
        let sexes = s.person.batch.column(2).as_dictionary::<Int32Type>();
        let sex_values = sexes.values().as_string::<i32>();
        for row in 0..ids.len() {
            let key = ids.value(row) as u32;
            if retired.contains(key) {
                continue;
            }
            b.mark_seen(key);
            let year = years.is_valid(row).then(|| years.value(row));
            let sex = sexes.key(row).map(|k| sex_values.value(k));
            b.push_person(key, year, sex);
        }
        for domain in Domain::ALL {
            let table = s.event(domain);
            let batch = &table.batch;
            let persons = batch.column(0).as_primitive::<Int64Type>();
            let codes = batch.column(1).as_dictionary::<Int32Type>();
            let code_values = codes.values().as_string::<i32>();
            let dates = batch.column(2).as_primitive::<Date32Type>();
            let measurement = (domain == Domain::Measurement).then(|| {
                (
                    batch.column(3).as_primitive::<Float64Type>(),
                    batch.column(4).as_dictionary::<Int32Type>(),
                )
            });
            for row in 0..batch.num_rows() {
                let key = persons.value(row) as u32;
                if retired.contains(key) {
                    continue;
                }
                let code = code_values.value(codes.key(row).expect("codes are not null"));
                let (value, unit) = match &measurement {
                    Some((values, units)) => (
                        values.is_valid(row).then(|| values.value(row)),
                        units
                            .key(row)
                            .map(|k| units.values().as_string::<i32>().value(k)),
                    ),
                    None => (None, None),
                };
                b.push_event(domain, key, code, dates.value(row), value, unit);
            }
        }
        let persons = s.periods.column(0).as_primitive::<Int64Type>();
        let starts = s.periods.column(1).as_primitive::<Date32Type>();
        let ends = s.periods.column(2).as_primitive::<Date32Type>();
        for row in 0..s.periods.num_rows() {
            let key = persons.value(row) as u32;
            if !retired.contains(key) {
                b.push_period(key, starts.value(row), ends.value(row));
            }
        }
    }
    b.build()
}

impl IndexTables {
    /// BLAKE3 of the tables' contents: a sum, over every patient held and not retired, of
    /// a hash of the patient's id, person row and every event row (each row hashed on its
    /// own, so neither row order nor segmentation matters). Equal contents hash equally,
    /// however they were added or compacted; any change to a row changes the hash.
    pub fn content_hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("cohort-query 2026 index contents v2");
        h.update(&self.persons().to_le_bytes());
        for lane in self.sum {
            h.update(&lane.to_le_bytes());
        }
        *h.finalize().as_bytes()
    }

    /// Bytes held by the Arrow arrays (rows and person sets) and the person hashes.
    pub fn memory_size(&self) -> usize {
        self.segments.iter().map(|s| s.memory_size()).sum::<usize>()
            + self.retired.serialized_size()
    }
}

#[derive(Default)]
struct Interner {
    ids: HashMap<String, i32>,
    values: Vec<String>,
}

impl Interner {
    fn id(&mut self, s: &str) -> i32 {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        let id = self.values.len() as i32;
        self.values.push(s.to_string());
        self.ids.insert(s.to_string(), id);
        id
    }
}

#[derive(Default)]
struct EventColumns {
    codes: Interner,
    units: Interner,
    code: Vec<i32>,
    person: Vec<u32>,
    date: Vec<i32>,
    /// NaN for no value (a NaN value is no value: it matches no range).
    value: Vec<f64>,
    /// [`NO_UNIT`] for no unit.
    unit: Vec<i32>,
}

/// The unit id of a measurement without a unit.
const NO_UNIT: i32 = -1;

#[derive(Default)]
struct PeriodColumns {
    person: Vec<u32>,
    start: Vec<i32>,
    end: Vec<i32>,
}

/// Builds [`IndexTables`] from `(person_id, PatientIndex)` pairs.
///
/// ```
/// use cohort_query::{CodedEvent, IndexBuilder, PatientIndex, Person};
///
/// let mut builder = IndexBuilder::new();
/// let patient = PatientIndex {
///     person: Person { birth_year: Some(1970), sex: "female".into() },
///     conditions: vec![CodedEvent {
///         system: "snomed".into(),
///         code: "44054006".into(),
///         date: "2015-03-01".into(),
///         value: None,
///         unit: String::new(),
///     }],
///     ..Default::default()
/// };
/// builder.add(1, &patient).unwrap();
/// let tables = builder.build();
/// assert_eq!(tables.persons(), 1);
/// ```
#[derive(Default)]
pub struct IndexBuilder {
    seen: RoaringBitmap,
    person_id: Vec<u32>,
    birth_year: Vec<Option<i32>>,
    sex: Vec<Option<i32>>,
    sexes: Interner,
    events: [EventColumns; 4],
    periods: PeriodColumns,
    code_buf: String,
}

impl std::fmt::Debug for IndexBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexBuilder")
            .field("persons", &self.person_id.len())
            .finish()
    }
}

impl IndexBuilder {
    /// An empty builder.
    pub fn new() -> IndexBuilder {
        IndexBuilder::default()
    }

    /// Adds one patient's index rows under `person_id`. Fails, adding nothing, on an id out
    /// of range, an id added before, an event or period date that is not `YYYY-MM-DD`, or
    /// an observation period that ends before it starts.
    pub fn add(&mut self, person_id: i64, index: &PatientIndex) -> Result<&mut Self, IndexError> {
        let key = person_key(person_id).ok_or(IndexError::PersonIdOutOfRange(person_id))?;
        if self.seen.contains(key) {
            return Err(IndexError::DuplicatePerson(person_id));
        }
        let lists = [
            (Domain::Condition, &index.conditions),
            (Domain::Measurement, &index.measurements),
            (Domain::Drug, &index.drugs),
            (Domain::Procedure, &index.procedures),
        ];
        // Check every date before adding anything.
        let mut dates: Vec<i32> = Vec::new();
        for (domain, events) in lists {
            for e in events {
                let d: Date = e.date.parse().map_err(|_| IndexError::BadDate {
                    person_id,
                    table: domain.as_str(),
                    date: e.date.clone(),
                })?;
                dates.push(d.days());
            }
        }
        let mut periods: Vec<(i32, i32)> = Vec::with_capacity(index.observation_periods.len());
        for p in &index.observation_periods {
            let day = |date: &str| -> Result<i32, IndexError> {
                date.parse::<Date>()
                    .map(|d| d.days())
                    .map_err(|_| IndexError::BadDate {
                        person_id,
                        table: "observation_period",
                        date: date.to_string(),
                    })
            };
            let (start, end) = (day(&p.start)?, day(&p.end)?);
            if end < start {
                return Err(IndexError::ReversedPeriod {
                    person_id,
                    start: p.start.clone(),
                    end: p.end.clone(),
                });
            }
            periods.push((start, end));
        }
        self.seen.insert(key);
        let sex = Some(index.person.sex.as_str()).filter(|s| !s.is_empty());
        self.push_person(key, index.person.birth_year, sex);
        let mut dates = dates.into_iter();
        for (domain, events) in lists {
            for e in events {
                self.code_buf.clear();
                self.code_buf.push_str(&e.system);
                self.code_buf.push(':');
                self.code_buf.push_str(&e.code);
                let code = std::mem::take(&mut self.code_buf);
                let unit = Some(e.unit.as_str()).filter(|u| !u.is_empty());
                let date = dates.next().expect("one date per event");
                self.push_event(domain, key, &code, date, e.value, unit);
                self.code_buf = code;
            }
        }
        for (start, end) in periods {
            self.push_period(key, start, end);
        }
        Ok(self)
    }

    pub(crate) fn push_period(&mut self, person: u32, start: i32, end: i32) {
        self.periods.person.push(person);
        self.periods.start.push(start);
        self.periods.end.push(end);
    }

    pub(crate) fn push_person(&mut self, key: u32, birth_year: Option<i32>, sex: Option<&str>) {
        self.person_id.push(key);
        self.birth_year.push(birth_year);
        let sex = sex.map(|s| self.sexes.id(s));
        self.sex.push(sex);
    }

    pub(crate) fn push_event(
        &mut self,
        domain: Domain,
        person: u32,
        code: &str,
        date: i32,
        value: Option<f64>,
        unit: Option<&str>,
    ) {
        let cols = &mut self.events[domain as usize];
        let id = cols.codes.id(code);
        cols.code.push(id);
        cols.person.push(person);
        cols.date.push(date);
        if domain == Domain::Measurement {
            cols.value.push(value.unwrap_or(f64::NAN));
            let unit = unit.map_or(NO_UNIT, |u| cols.units.id(u));
            cols.unit.push(unit);
        }
    }

    pub(crate) fn mark_seen(&mut self, key: u32) -> bool {
        self.seen.insert(key)
    }

    pub(crate) fn seen_persons(&self) -> &RoaringBitmap {
        &self.seen
    }

    /// The tables.
    pub fn build(self) -> IndexTables {
        let IndexBuilder {
            person_id,
            birth_year,
            sex,
            sexes,
            events,
            periods,
            ..
        } = self;
        let mut order: Vec<usize> = (0..person_id.len()).collect();
        if !person_id.is_sorted() {
            order.sort_unstable_by_key(|&i| person_id[i]);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(
                order.iter().map(|&i| i64::from(person_id[i])),
            )),
            Arc::new(Int32Array::from_iter(order.iter().map(|&i| birth_year[i]))),
            Arc::new(
                DictionaryArray::<Int32Type>::try_new(
                    Int32Array::from_iter(order.iter().map(|&i| sex[i])),
                    Arc::new(StringArray::from_iter_values(&sexes.values)),
                )
                .expect("sexes"),
            ),
        ];
        // Person sets: everyone, by sex, by birth year.
        let all: RoaringBitmap = order.iter().map(|&i| person_id[i]).collect();
        let mut by_sex: Vec<RoaringBitmap> = vec![RoaringBitmap::new(); sexes.values.len()];
        let mut by_year: std::collections::BTreeMap<i32, RoaringBitmap> = Default::default();
        for &i in &order {
            if let Some(s) = sex[i] {
                by_sex[s as usize].insert(person_id[i]);
            }
            if let Some(y) = birth_year[i] {
                by_year.entry(y).or_default().insert(person_id[i]);
            }
        }
        let person = PersonTable {
            batch: RecordBatch::try_new(person_schema(), columns).expect("person columns"),
            all: SetTable::new(None, vec![all]),
            by_sex: SetTable::new(
                Some((
                    "sex",
                    DataType::Utf8,
                    Arc::new(StringArray::from_iter_values(&sexes.values)),
                )),
                by_sex,
            ),
            by_birth_year: SetTable::new(
                Some((
                    "birth_year",
                    DataType::Int32,
                    Arc::new(Int32Array::from_iter_values(by_year.keys().copied())),
                )),
                by_year.into_values().collect(),
            ),
        };
        // Each patient's hash: a sum of keyed hashes of their person row and of each of
        // their event rows (IndexTables::content_hash).
        let sorted: Vec<u32> = order.iter().map(|&i| person_id[i]).collect();
        let key = blake3::derive_key("cohort-query 2026 index row v1", &[]);
        let digest = |s: &str| -> [u8; 16] {
            blake3::hash(s.as_bytes()).as_bytes()[..16]
                .try_into()
                .expect("16 bytes")
        };
        let sex_digests: Vec<[u8; 16]> = sexes.values.iter().map(|v| digest(v)).collect();
        let mut person_hashes: Vec<Lanes> = order
            .iter()
            .map(|&i| {
                let mut row = [0u8; 32];
                row[0] = 0xff;
                row[1..5].copy_from_slice(&person_id[i].to_le_bytes());
                if let Some(y) = birth_year[i] {
                    row[5] = 1;
                    row[6..10].copy_from_slice(&y.to_le_bytes());
                }
                if let Some(x) = sex[i] {
                    row[10] = 1;
                    row[11..27].copy_from_slice(&sex_digests[x as usize]);
                }
                lanes(&blake3::keyed_hash(&key, &row))
            })
            .collect();
        for (domain, cols) in Domain::ALL.iter().zip(&events) {
            let codes: Vec<[u8; 16]> = cols.codes.values.iter().map(|v| digest(v)).collect();
            let units: Vec<[u8; 16]> = cols.units.values.iter().map(|v| digest(v)).collect();
            for r in 0..cols.code.len() {
                let Ok(at) = sorted.binary_search(&cols.person[r]) else {
                    continue;
                };
                let mut row = [0u8; 64];
                row[0] = *domain as u8;
                row[1..5].copy_from_slice(&cols.person[r].to_le_bytes());
                row[5..21].copy_from_slice(&codes[cols.code[r] as usize]);
                row[21..25].copy_from_slice(&cols.date[r].to_le_bytes());
                if *domain == Domain::Measurement {
                    let v = cols.value[r];
                    if !v.is_nan() {
                        row[25] = 1;
                        row[26..34].copy_from_slice(&v.to_bits().to_le_bytes());
                    }
                    let u = cols.unit[r];
                    if u != NO_UNIT {
                        row[34] = 1;
                        row[35..51].copy_from_slice(&units[u as usize]);
                    }
                }
                add_lanes(
                    &mut person_hashes[at],
                    &lanes(&blake3::keyed_hash(&key, &row)),
                );
            }
        }
        // Observation periods: kind 0xfe, person, start, end.
        for r in 0..periods.person.len() {
            let Ok(at) = sorted.binary_search(&periods.person[r]) else {
                continue;
            };
            let mut row = [0u8; 16];
            row[0] = 0xfe;
            row[1..5].copy_from_slice(&periods.person[r].to_le_bytes());
            row[5..9].copy_from_slice(&periods.start[r].to_le_bytes());
            row[9..13].copy_from_slice(&periods.end[r].to_le_bytes());
            add_lanes(
                &mut person_hashes[at],
                &lanes(&blake3::keyed_hash(&key, &row)),
            );
        }
        let mut events = events.into_iter();
        let events =
            Domain::ALL.map(|domain| build_events(domain, events.next().expect("four tables")));
        IndexTables::from_segments(
            vec![Arc::new(Segment {
                person,
                events,
                periods: build_periods(periods),
                person_hashes,
            })],
            RoaringBitmap::new(),
        )
    }
}

fn build_periods(cols: PeriodColumns) -> RecordBatch {
    let mut order: Vec<usize> = (0..cols.person.len()).collect();
    order.sort_unstable_by_key(|&r| (cols.person[r], cols.start[r], cols.end[r]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            order.iter().map(|&r| i64::from(cols.person[r])),
        )),
        Arc::new(Date32Array::from_iter_values(
            order.iter().map(|&r| cols.start[r]),
        )),
        Arc::new(Date32Array::from_iter_values(
            order.iter().map(|&r| cols.end[r]),
        )),
    ];
    RecordBatch::try_new(period_schema(), columns).expect("period columns")
}

fn build_events(domain: Domain, cols: EventColumns) -> EventTable {
    let n = cols.code.len();
    let codes = cols.codes.values.len();
    // Counting sort by code (stable, so rows added in person order stay in person order),
    // then sort each code's rows by (person, date).
    let mut starts = vec![0usize; codes + 1];
    for &c in &cols.code {
        starts[c as usize + 1] += 1;
    }
    for i in 0..codes {
        starts[i + 1] += starts[i];
    }
    let mut next = starts.clone();
    let mut order = vec![0u32; n];
    for (row, &c) in cols.code.iter().enumerate() {
        order[next[c as usize]] = row as u32;
        next[c as usize] += 1;
    }
    for c in 0..codes {
        let slice = &mut order[starts[c]..starts[c + 1]];
        let key = |&r: &u32| (cols.person[r as usize], cols.date[r as usize]);
        if !slice.is_sorted_by_key(key) {
            slice.sort_by_key(key);
        }
    }
    let mut directory = HashMap::with_capacity(codes);
    let mut ranges = Vec::with_capacity(codes);
    let mut sets = Vec::with_capacity(codes);
    for (c, code) in cols.codes.values.iter().enumerate() {
        directory.insert(code.clone(), c);
        ranges.push(starts[c]..starts[c + 1]);
        // Rows of a code are sorted by person: one pass, duplicates skipped.
        let mut set = RoaringBitmap::new();
        let mut last = None;
        for &r in &order[starts[c]..starts[c + 1]] {
            let p = cols.person[r as usize];
            if last != Some(p) {
                set.try_push(p).expect("ascending");
                last = Some(p);
            }
        }
        sets.push(set);
    }
    let by_code = SetTable::new(
        Some((
            "code",
            DataType::Utf8,
            Arc::new(StringArray::from_iter_values(&cols.codes.values)),
        )),
        sets,
    );
    let code_values: ArrayRef = Arc::new(StringArray::from_iter_values(&cols.codes.values));
    let code_keys = Int32Array::from_iter_values(order.iter().map(|&r| cols.code[r as usize]));
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            order.iter().map(|&r| i64::from(cols.person[r as usize])),
        )),
        Arc::new(DictionaryArray::<Int32Type>::try_new(code_keys, code_values).expect("codes")),
        Arc::new(Date32Array::from_iter_values(
            order.iter().map(|&r| cols.date[r as usize]),
        )),
    ];
    if domain == Domain::Measurement {
        columns.push(Arc::new(Float64Array::from_iter(order.iter().map(|&r| {
            let v = cols.value[r as usize];
            (!v.is_nan()).then_some(v)
        }))));
        let unit_values: ArrayRef = Arc::new(StringArray::from_iter_values(&cols.units.values));
        let unit_keys = Int32Array::from_iter(order.iter().map(|&r| {
            let u = cols.unit[r as usize];
            (u != NO_UNIT).then_some(u)
        }));
        columns.push(Arc::new(
            DictionaryArray::<Int32Type>::try_new(unit_keys, unit_values).expect("units"),
        ));
    }
    EventTable {
        batch: RecordBatch::try_new(event_schema(domain), columns).expect("event columns"),
        directory,
        ranges,
        by_code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{CodedEvent, Person};
    use arrow::array::{Array, AsArray};

    fn ev(code: &str, date: &str) -> CodedEvent {
        CodedEvent {
            system: "snomed".into(),
            code: code.into(),
            date: date.into(),
            value: None,
            unit: String::new(),
        }
    }

    #[test]
    fn sorted_by_code_person_date_with_directory() {
        let mut b = IndexBuilder::new();
        let p = |codes: &[(&str, &str)]| PatientIndex {
            person: Person {
                birth_year: Some(1950),
                sex: "male".into(),
            },
            conditions: codes.iter().map(|(c, d)| ev(c, d)).collect(),
            ..Default::default()
        };
        b.add(9, &p(&[("2", "2020-01-02"), ("1", "2020-01-01")]))
            .unwrap();
        b.add(3, &p(&[("2", "2019-05-05"), ("2", "2018-05-05")]))
            .unwrap();
        assert!(matches!(
            b.add(3, &p(&[])),
            Err(IndexError::DuplicatePerson(3))
        ));
        assert!(matches!(
            b.add(4, &p(&[("1", "2020-02-30")])),
            Err(IndexError::BadDate { person_id: 4, .. })
        ));
        assert!(matches!(
            b.add(-4, &p(&[])),
            Err(IndexError::PersonIdOutOfRange(-4))
        ));
        let tables = b.build();
        assert_eq!(tables.persons(), 2);
        let t = &tables.segments[0];
        let persons = t
            .person
            .batch
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(persons.values().to_vec(), vec![3, 9]);
        let cond = t.event(Domain::Condition);
        assert_eq!(cond.batch.num_rows(), 4);
        let r = cond.ranges[cond.directory["snomed:2"]].clone();
        assert_eq!(r.len(), 3);
        let pid = cond
            .batch
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>();
        let date = cond
            .batch
            .column(2)
            .as_primitive::<arrow::datatypes::Date32Type>();
        let rows: Vec<(i64, i32)> = r.map(|i| (pid.value(i), date.value(i))).collect();
        assert!(rows.is_sorted());
        assert_eq!(rows[0].0, 3);
        assert_eq!(cond.code_numbers(["snomed:1", "snomed:9"]).len(), 1);
        assert_eq!(cond.code(cond.directory["snomed:2"]), "snomed:2");
        assert!(t.event(Domain::Drug).batch.column(1).is_empty());
    }
}
