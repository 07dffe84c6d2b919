//! The index tables as a DataFusion [`TableProvider`].
//!
//! Two kinds of scan filter are applied by the provider itself (pushed down as `Exact`):
//!
//! * the consent predicate `consented(person_id, scope)` inserted by
//!   [`ConsentFilter`](crate::consent_filter): required — a scan without the predicate for
//!   its own table fails, so no plan can read an index table around the consent filter;
//! * with the code index on, `code = '...'` and `code IN (...)`: only the rows of those
//!   codes are read, through the table's code directory (rows are sorted by code).
//!
//! Every other predicate stays in DataFusion's `FilterExec` above the scan.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{Int64Type, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Result, ScalarValue, plan_err};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::{
    BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType, expr::InList,
};
use datafusion::physical_plan::ExecutionPlan;

use crate::consent::SearchableField;
use crate::consent_filter::{Scope, as_consent_predicate, membership};
use crate::definition::Domain;
use crate::tables::{IndexTables, event_schema, person_schema};

/// Which index table a provider serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableKind {
    Person,
    Event(Domain),
}

impl TableKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TableKind::Person => "person",
            TableKind::Event(d) => d.as_str(),
        }
    }

    fn required_scope(self) -> Scope {
        match self {
            TableKind::Person => Scope::Any,
            TableKind::Event(d) => Scope::Field(SearchableField::of_domain(d)),
        }
    }
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

    fn batch(&self) -> &RecordBatch {
        match self.kind {
            TableKind::Person => &self.tables.person.batch,
            TableKind::Event(d) => &self.tables.event(d).batch,
        }
    }
}

/// The codes a `code = 'x'` / `code IN ('x', ...)` predicate selects.
fn code_predicate(expr: &Expr) -> Option<BTreeSet<String>> {
    fn is_code(e: &Expr) -> bool {
        match e {
            Expr::Column(c) => c.name == "code",
            Expr::Cast(c) => is_code(&c.expr),
            Expr::TryCast(c) => is_code(&c.expr),
            _ => false,
        }
    }
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
            if is_code(left) {
                Some(BTreeSet::from([text(right)?]))
            } else if is_code(right) {
                Some(BTreeSet::from([text(left)?]))
            } else {
                None
            }
        }
        Expr::InList(InList {
            expr,
            list,
            negated: false,
        }) if is_code(expr) => list.iter().map(text).collect(),
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
        Ok(filters
            .iter()
            .map(|f| {
                let exact = as_consent_predicate(f).is_some()
                    || (self.code_index
                        && matches!(self.kind, TableKind::Event(_))
                        && code_predicate(f).is_some());
                if exact {
                    TableProviderFilterPushDown::Exact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut consents = Vec::new();
        let mut codes: Option<BTreeSet<String>> = None;
        for f in filters {
            if let Some((func, scope)) = as_consent_predicate(f) {
                consents.push(func.members(scope));
            } else if let Some(set) = code_predicate(f) {
                codes = Some(match codes {
                    Some(prev) => prev.intersection(&set).cloned().collect(),
                    None => set,
                });
            } else {
                return plan_err!("unexpected scan filter on `{}`: {f}", self.kind.name());
            }
        }
        let required = filters
            .iter()
            .any(|f| as_consent_predicate(f).is_some_and(|(_, s)| s == self.kind.required_scope()));
        if !required {
            return plan_err!(
                "refusing to scan index table `{}` without its consent filter",
                self.kind.name()
            );
        }

        let batch = self.batch();
        let ranges: Vec<Range<usize>> = match (&codes, self.kind) {
            (Some(codes), TableKind::Event(d)) => self
                .tables
                .event(d)
                .ranges(codes.iter().map(String::as_str)),
            _ => std::iter::once(0..batch.num_rows()).collect(),
        };
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
        for range in ranges {
            let mut start = range.start;
            while start < range.end {
                let len = CHUNK_ROWS.min(range.end - start);
                let mut chunk = batch.slice(start, len).project(&columns)?;
                start += len;
                for members in &consents {
                    let ids = chunk.column(id_column).as_primitive::<Int64Type>();
                    let mask = membership(ids, *members);
                    if mask.true_count() < mask.len() {
                        chunk = filter_record_batch(&chunk, &mask)?;
                    }
                }
                if chunk.num_rows() == 0 {
                    continue;
                }
                out[next % partitions].push(chunk);
                next += 1;
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
    fn recognizes_code_predicates() {
        let eq = col("code").eq(lit("snomed:1"));
        assert_eq!(
            code_predicate(&eq),
            Some(BTreeSet::from(["snomed:1".to_string()]))
        );
        let list = col("code").in_list(vec![lit("a:1"), lit("b:2")], false);
        assert_eq!(code_predicate(&list).unwrap().len(), 2);
        assert!(code_predicate(&col("code").in_list(vec![lit("a:1")], true)).is_none());
        assert!(code_predicate(&col("unit").eq(lit("%"))).is_none());
    }
}
