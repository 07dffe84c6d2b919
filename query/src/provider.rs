//! The index tables as a DataFusion [`TableProvider`].
//!
//! Two kinds of scan filter are applied by the provider itself (pushed down as `Exact`):
//!
//! * the consent predicate `consented(person_id, [code,] scope)` inserted by
//!   [`ConsentFilter`](crate::consent_filter): required — a scan without the predicate for
//!   its own table (for event tables, the form by code) fails, so no plan can read an index
//!   table around the consent filter or around the sensitive categories. Rows are read per
//!   code, so each code's rows are restricted to the patients who consented the field and
//!   permitted every sensitive category of the code;
//! * with the code index on, `code = '...'` and `code IN (...)`: only the rows of those
//!   codes are read, through the table's code directory (rows are sorted by code).
//!
//! Every other predicate stays in DataFusion's `FilterExec` above the scan.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, BooleanArray, Int32Array, RecordBatch, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Int32Type, Int64Type, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Result, ScalarValue, plan_err};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::{
    BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType, expr::InList,
};
use datafusion::physical_plan::ExecutionPlan;
use roaring::RoaringBitmap;

use crate::consent::SearchField;
use crate::consent_filter::{
    ConsentPredicate, Scope, any_member, as_consent_predicate, as_set_consent_predicate, membership,
};
use crate::definition::Domain;
use crate::sensitivity::Gates;
use crate::tables::{IndexTables, Segment, SetTable, event_schema, period_schema, person_schema};

/// Which index table a provider serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableKind {
    Person,
    Event(Domain),
    ObservationPeriod,
}

impl TableKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TableKind::Person => "person",
            TableKind::Event(d) => d.as_str(),
            TableKind::ObservationPeriod => "observation_period",
        }
    }

    /// The consent predicate a scan of the table requires: its scope, and whether by code.
    fn required(self) -> (Scope, bool) {
        match self {
            TableKind::Person => (Scope::Any, false),
            TableKind::Event(d) => (Scope::Field(SearchField::of_domain(d)), true),
            TableKind::ObservationPeriod => (Scope::Field(SearchField::ObservationPeriod), false),
        }
    }
}

/// Which person-set table a provider serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetKind {
    /// `person_all(persons)`
    All,
    /// `person_by_sex(sex, persons)`
    Sex,
    /// `person_by_birth_year(birth_year, persons)`
    BirthYear,
    /// `<table>_by_code(code, persons)`
    Code(Domain),
}

impl SetKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            SetKind::All => "person_all",
            SetKind::Sex => "person_by_sex",
            SetKind::BirthYear => "person_by_birth_year",
            SetKind::Code(Domain::Condition) => "condition_by_code",
            SetKind::Code(Domain::Measurement) => "measurement_by_code",
            SetKind::Code(Domain::Drug) => "drug_by_code",
            SetKind::Code(Domain::Procedure) => "procedure_by_code",
        }
    }

    /// Whether the table's consent predicate is the form by code.
    pub(crate) fn by_code(self) -> bool {
        matches!(self, SetKind::Code(_))
    }

    /// The consent scope a row's persons are restricted to.
    pub(crate) fn scope(self) -> Scope {
        match self {
            SetKind::All => Scope::Any,
            SetKind::Sex => Scope::Field(SearchField::Sex),
            SetKind::BirthYear => Scope::Field(SearchField::BirthYear),
            SetKind::Code(d) => Scope::Field(SearchField::of_domain(d)),
        }
    }
}

/// One person-set table. The consent filter restricts its `persons` column to consenting
/// patients by a projection (`consented_persons(persons, scope)`) above the scan, and
/// drops rows without any with a filter this provider applies, and requires:
/// `any_consented(persons, scope)`. `code = ...` /
/// `code IN (...)` filters are applied here too, through the code directory.
pub(crate) struct SetTableProvider {
    kind: SetKind,
    tables: IndexTables,
}

impl fmt::Debug for SetTableProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetTableProvider")
            .field("table", &self.kind.name())
            .finish()
    }
}

impl SetTableProvider {
    pub(crate) fn new(kind: SetKind, tables: IndexTables) -> Self {
        SetTableProvider { kind, tables }
    }

    pub(crate) fn kind(&self) -> SetKind {
        self.kind
    }

    fn table(segment: &Segment, kind: SetKind) -> &SetTable {
        match kind {
            SetKind::All => &segment.person.all,
            SetKind::Sex => &segment.person.by_sex,
            SetKind::BirthYear => &segment.person.by_birth_year,
            SetKind::Code(d) => &segment.event(d).by_code,
        }
    }

    /// Whether a filter on the key column is applied by this provider.
    fn key_predicate(&self, f: &Expr) -> bool {
        match self.kind {
            SetKind::All => false,
            SetKind::Sex => text_predicate(f, "sex").is_some(),
            SetKind::BirthYear => year_predicate(f).is_some(),
            SetKind::Code(_) => code_predicate(f).is_some(),
        }
    }
}

#[async_trait]
impl TableProvider for SetTableProvider {
    fn schema(&self) -> SchemaRef {
        SetTableProvider::table(&self.tables.segments[0], self.kind)
            .batch
            .schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(pushdown(filters, |f| {
            as_set_consent_predicate(f).is_some() || self.key_predicate(f)
        }))
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut consents: Vec<ConsentPredicate<'_>> = Vec::new();
        let mut keys: Vec<&Expr> = Vec::new();
        for f in filters {
            match as_set_consent_predicate(f) {
                Some(p) => consents.push(p),
                None => keys.push(f),
            }
        }
        if !consents
            .iter()
            .any(|p| p.scope == self.kind.scope() && p.by_code == self.kind.by_code())
        {
            return plan_err!(
                "refusing to scan person-set table `{}` without its consent filter",
                self.kind.name()
            );
        }
        // Each segment's rows the key filters select, merged by key across segments:
        // a key's persons are the union of its rows, without retired ids.
        let mut merged: Vec<(SetKey, RoaringBitmap)> = Vec::new();
        let mut at: HashMap<SetKey, usize> = HashMap::new();
        for segment in self.tables.segments.iter() {
            let table = SetTableProvider::table(segment, self.kind);
            let mut rows: Vec<usize> = (0..table.sets.len()).collect();
            for f in &keys {
                let key = table.batch.column(0);
                match self.kind {
                    SetKind::Code(d) => {
                        let Some(codes) = code_predicate(f) else {
                            return plan_err!(
                                "unexpected scan filter on `{}`: {f}",
                                self.kind.name()
                            );
                        };
                        let wanted = segment
                            .event(d)
                            .code_numbers(codes.iter().map(String::as_str));
                        rows.retain(|r| wanted.binary_search(r).is_ok());
                    }
                    SetKind::Sex => {
                        let Some(values) = text_predicate(f, "sex") else {
                            return plan_err!(
                                "unexpected scan filter on `{}`: {f}",
                                self.kind.name()
                            );
                        };
                        let key = key.as_string::<i32>();
                        rows.retain(|&r| values.contains(key.value(r)));
                    }
                    SetKind::BirthYear => {
                        let Some((low, high)) = year_predicate(f) else {
                            return plan_err!(
                                "unexpected scan filter on `{}`: {f}",
                                self.kind.name()
                            );
                        };
                        let key = key.as_primitive::<Int32Type>();
                        rows.retain(|&r| (low..=high).contains(&i64::from(key.value(r))));
                    }
                    SetKind::All => {
                        return plan_err!("unexpected scan filter on `{}`: {f}", self.kind.name());
                    }
                }
            }
            for r in rows {
                let key = match self.kind {
                    SetKind::All => SetKey::All,
                    SetKind::BirthYear => {
                        SetKey::Year(table.batch.column(0).as_primitive::<Int32Type>().value(r))
                    }
                    _ => SetKey::Text(table.batch.column(0).as_string::<i32>().value(r).to_owned()),
                };
                match at.get(&key) {
                    Some(&i) => merged[i].1 |= &table.sets[r],
                    None => {
                        at.insert(key.clone(), merged.len());
                        merged.push((key, table.sets[r].clone()));
                    }
                }
            }
        }
        if !self.tables.retired.is_empty() {
            for (_, set) in &mut merged {
                *set -= &*self.tables.retired;
            }
        }
        // Keep rows with at least one consenting patient (who, for a sensitive code, also
        // permitted its categories).
        merged.retain(|(key, set)| {
            let gates = match (self.kind, key) {
                (SetKind::Code(_), SetKey::Text(code)) => consents
                    .first()
                    .map_or(Gates::default(), |p| p.bound.gates(code)),
                _ => Gates::default(),
            };
            consents.iter().all(|p| any_member(set, &p.members(gates)))
        });
        let batch = set_batch(self.kind, merged)?;
        let exec = MemorySourceConfig::try_new_exec(
            &[vec![batch.clone()]],
            batch.schema(),
            projection.cloned(),
        )?;
        Ok(exec)
    }
}

/// The key of a person-set row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SetKey {
    All,
    Text(String),
    Year(i32),
}

/// A person-set table's rows as a batch of its schema.
fn set_batch(kind: SetKind, rows: Vec<(SetKey, RoaringBitmap)>) -> Result<RecordBatch> {
    let (keys, sets): (Vec<SetKey>, Vec<RoaringBitmap>) = rows.into_iter().unzip();
    let key = match kind {
        SetKind::All => None,
        SetKind::BirthYear => Some((
            "birth_year",
            DataType::Int32,
            Arc::new(Int32Array::from_iter_values(keys.iter().map(|k| match k {
                SetKey::Year(y) => *y,
                _ => 0,
            }))) as ArrayRef,
        )),
        SetKind::Sex | SetKind::Code(_) => Some((
            if kind == SetKind::Sex { "sex" } else { "code" },
            DataType::Utf8,
            Arc::new(StringArray::from_iter_values(keys.iter().map(
                |k| match k {
                    SetKey::Text(t) => t.as_str(),
                    _ => "",
                },
            ))) as ArrayRef,
        )),
    };
    Ok(SetTable::new(key, sets).batch)
}

/// Rows handed to DataFusion per batch.
const CHUNK_ROWS: usize = 64 * 1024;

/// One index table.
pub(crate) struct IndexTableProvider {
    kind: TableKind,
    tables: IndexTables,
    code_index: bool,
    schema: SchemaRef,
}

impl fmt::Debug for IndexTableProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IndexTableProvider")
            .field("table", &self.kind.name())
            .field("code_index", &self.code_index)
            .finish()
    }
}

impl IndexTableProvider {
    pub(crate) fn new(kind: TableKind, tables: IndexTables, code_index: bool) -> Self {
        let schema = match kind {
            TableKind::Person => person_schema(),
            TableKind::Event(d) => event_schema(d),
            TableKind::ObservationPeriod => period_schema(),
        };
        IndexTableProvider {
            kind,
            tables,
            code_index,
            schema,
        }
    }

    pub(crate) fn kind(&self) -> TableKind {
        self.kind
    }

    fn batch<'a>(&self, segment: &'a Segment) -> &'a RecordBatch {
        match self.kind {
            TableKind::Person => &segment.person.batch,
            TableKind::Event(d) => &segment.event(d).batch,
            TableKind::ObservationPeriod => &segment.periods,
        }
    }
}

/// Exact for the filters a provider applies itself, unsupported for the others.
fn pushdown(filters: &[&Expr], exact: impl Fn(&Expr) -> bool) -> Vec<TableProviderFilterPushDown> {
    filters
        .iter()
        .map(|f| {
            if exact(f) {
                TableProviderFilterPushDown::Exact
            } else {
                TableProviderFilterPushDown::Unsupported
            }
        })
        .collect()
}

/// The codes a `code = 'x'` / `code IN ('x', ...)` predicate selects.
fn code_predicate(expr: &Expr) -> Option<BTreeSet<String>> {
    text_predicate(expr, "code")
}

/// The values a `<column> = 'x'` / `<column> IN ('x', ...)` predicate (or an OR of
/// them) selects.
fn text_predicate(expr: &Expr, column: &str) -> Option<BTreeSet<String>> {
    fn text(e: &Expr) -> Option<String> {
        fn scalar(v: &ScalarValue) -> Option<String> {
            match v {
                ScalarValue::Utf8(Some(s))
                | ScalarValue::LargeUtf8(Some(s))
                | ScalarValue::Utf8View(Some(s)) => Some(s.clone()),
                ScalarValue::Dictionary(_, inner) => scalar(inner),
                _ => None,
            }
        }
        match e {
            Expr::Literal(v, _) => scalar(v),
            Expr::Cast(c) => text(&c.expr),
            _ => None,
        }
    }
    match expr {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => {
            if is_column(left, column) {
                Some(BTreeSet::from([text(right)?]))
            } else if is_column(right, column) {
                Some(BTreeSet::from([text(left)?]))
            } else {
                None
            }
        }
        Expr::InList(InList {
            expr,
            list,
            negated: false,
        }) if is_column(expr, column) => list.iter().map(text).collect(),
        // The optimizer turns short IN lists into ORs of equalities.
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Or,
            right,
        }) => {
            let mut values = text_predicate(left, column)?;
            values.extend(text_predicate(right, column)?);
            Some(values)
        }
        _ => None,
    }
}

fn is_column(e: &Expr, name: &str) -> bool {
    match e {
        Expr::Column(c) => c.name == name,
        Expr::Cast(c) => is_column(&c.expr, name),
        Expr::TryCast(c) => is_column(&c.expr, name),
        _ => false,
    }
}

/// The inclusive range a `birth_year <op> n` comparison selects.
fn year_predicate(expr: &Expr) -> Option<(i64, i64)> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = expr else {
        return None;
    };
    let (op, value) = match (left.as_ref(), right.as_ref()) {
        (c, Expr::Literal(v, _)) if is_column(c, "birth_year") => (*op, v),
        (Expr::Literal(v, _), c) if is_column(c, "birth_year") => (op.swap()?, v),
        _ => return None,
    };
    let n = match value {
        ScalarValue::Int32(Some(n)) => i64::from(*n),
        ScalarValue::Int64(Some(n)) => *n,
        _ => return None,
    };
    match op {
        Operator::Eq => Some((n, n)),
        Operator::GtEq => Some((n, i64::MAX)),
        Operator::Gt => Some((n.saturating_add(1), i64::MAX)),
        Operator::LtEq => Some((i64::MIN, n)),
        Operator::Lt => Some((i64::MIN, n.saturating_sub(1))),
        _ => None,
    }
}

#[async_trait]
impl TableProvider for IndexTableProvider {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(pushdown(filters, |f| {
            as_consent_predicate(f).is_some()
                || (self.code_index
                    && matches!(self.kind, TableKind::Event(_))
                    && code_predicate(f).is_some())
        }))
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut consents: Vec<ConsentPredicate<'_>> = Vec::new();
        let mut codes: Option<BTreeSet<String>> = None;
        for f in filters {
            if let Some(p) = as_consent_predicate(f) {
                consents.push(p);
            } else if let Some(set) = code_predicate(f) {
                codes = Some(match codes {
                    Some(prev) => prev.intersection(&set).cloned().collect(),
                    None => set,
                });
            } else {
                return plan_err!("unexpected scan filter on `{}`: {f}", self.kind.name());
            }
        }
        let required = self.kind.required();
        if !consents.iter().any(|p| (p.scope, p.by_code) == required) {
            return plan_err!(
                "refusing to scan index table `{}` without its consent filter",
                self.kind.name()
            );
        }

        // Read only the projected columns, plus person_id for the consent check.
        let mut columns: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..self.schema.fields().len()).collect());
        if !columns.contains(&0) {
            columns.push(0);
        }
        columns.sort_unstable();
        columns.dedup();
        let id_column = columns
            .iter()
            .position(|&c| c == 0)
            .expect("person_id read");
        let schema = Arc::new(self.schema.project(&columns)?);
        let inner_projection: Option<Vec<usize>> = projection.map(|p| {
            p.iter()
                .map(|c| columns.iter().position(|x| x == c).expect("read"))
                .collect()
        });
        let partitions = state.config().target_partitions().max(1);
        let mut out: Vec<Vec<RecordBatch>> = vec![Vec::new(); partitions];
        let mut next = 0;
        let retired = &*self.tables.retired;
        for segment in self.tables.segments.iter() {
            let batch = self.batch(segment);
            // Row ranges with the categories gating them: per code for event tables (rows
            // are sorted by code), neighbouring codes with the same gates merged.
            let mut ranges: Vec<(Range<usize>, Gates)> = Vec::new();
            match self.kind {
                TableKind::Event(d) => {
                    let table = segment.event(d);
                    let numbers: Vec<usize> = match &codes {
                        Some(codes) => table.code_numbers(codes.iter().map(String::as_str)),
                        None => (0..table.ranges.len()).collect(),
                    };
                    let bound = consents[0].bound;
                    for c in numbers {
                        let (range, gates) = (table.ranges[c].clone(), bound.gates(table.code(c)));
                        match ranges.last_mut() {
                            Some((last, g)) if *g == gates && last.end == range.start => {
                                last.end = range.end
                            }
                            _ => ranges.push((range, gates)),
                        }
                    }
                }
                TableKind::Person | TableKind::ObservationPeriod => {
                    ranges.push((0..batch.num_rows(), Gates::default()))
                }
            }
            for (range, gates) in ranges {
                let members: Vec<_> = consents.iter().flat_map(|p| p.members(gates)).collect();
                let mut start = range.start;
                while start < range.end {
                    let len = CHUNK_ROWS.min(range.end - start);
                    let mut chunk = batch.slice(start, len).project(&columns)?;
                    start += len;
                    let ids = chunk.column(id_column).as_primitive::<Int64Type>();
                    let mut mask = membership(ids, &members);
                    if !retired.is_empty() {
                        let live = BooleanArray::from_iter(
                            ids.values()
                                .iter()
                                .map(|&id| Some(!retired.contains(id as u32))),
                        );
                        mask = arrow::compute::and(&mask, &live)?;
                    }
                    if mask.true_count() < mask.len() {
                        chunk = filter_record_batch(&chunk, &mask)?;
                    }
                    if chunk.num_rows() == 0 {
                        continue;
                    }
                    out[next % partitions].push(chunk);
                    next += 1;
                }
            }
        }
        out.retain(|p| !p.is_empty());
        if out.is_empty() {
            out.push(Vec::new());
        }
        let exec = MemorySourceConfig::try_new_exec(&out, schema, inner_projection)?;
        Ok(exec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::{col, lit};

    #[test]
    fn recognizes_birth_year_ranges() {
        assert_eq!(
            year_predicate(&col("birth_year").gt_eq(lit(1950))),
            Some((1950, i64::MAX))
        );
        assert_eq!(
            year_predicate(&col("birth_year").lt(lit(1950i64))),
            Some((i64::MIN, 1949))
        );
        assert_eq!(
            year_predicate(&lit(1950).lt(col("birth_year"))),
            Some((1951, i64::MAX))
        );
        assert_eq!(
            year_predicate(&col("birth_year").eq(lit(1950))),
            Some((1950, 1950))
        );
        assert!(year_predicate(&col("birth_year").not_eq(lit(1950))).is_none());
        assert!(year_predicate(&col("sex").gt(lit(1950))).is_none());
    }

    #[test]
    fn recognizes_code_predicates() {
        let eq = col("code").eq(lit("snomed:1"));
        assert_eq!(
            code_predicate(&eq),
            Some(BTreeSet::from(["snomed:1".to_string()]))
        );
        let list = col("code").in_list(vec![lit("a:1"), lit("b:2")], false);
        assert_eq!(code_predicate(&list).unwrap().len(), 2);
        assert!(code_predicate(&col("code").in_list(vec![lit("a:1")], true)).is_none());
        let or = col("code").eq(lit("a:1")).or(col("code").eq(lit("b:2")));
        assert_eq!(code_predicate(&or).unwrap().len(), 2);
        let mixed = col("code").eq(lit("a:1")).or(col("unit").eq(lit("%")));
        assert!(code_predicate(&mixed).is_none());
        assert!(code_predicate(&col("unit").eq(lit("%"))).is_none());
    }
}
