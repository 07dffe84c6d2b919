//! The consent filter: a DataFusion [`AnalyzerRule`] that restricts every scan of an index
//! table to what the study's consent snapshot allows.
//!
//! For each `TableScan` of an index table it inserts, directly above the scan:
//!
//! * event tables (`condition`, `measurement`, `drug`, `procedure`):
//!   `Filter: consented(<table>.person_id, '<table>')`: rows of patients who did not
//!   consent that table's field are gone;
//! * `person`: `Filter: consented(person.person_id, 'any')`: patients without any consent
//!   are gone; then a projection masks `birth_year` and `sex` to NULL for patients who did
//!   not consent that column:
//!   `CASE WHEN consented(person.person_id, 'birth_year') THEN person.birth_year END`;
//! * person-set tables (`person_all`, `person_by_sex`, `person_by_birth_year`,
//!   `<table>_by_code`): a projection that intersects each row's set with the consenting
//!   patients of the table's scope:
//!   `consented_persons(condition_by_code.persons, 'condition')` (`any` for `person_all`,
//!   `sex` and `birth_year` for the person sets by sex and birth year), and below it a
//!   filter that drops rows without any consenting patient,
//!   `any_consented(condition_by_code.persons, 'condition')`, which the person-set
//!   provider applies and requires.
//!
//! `consented` is a scalar function bound to one snapshot. The optimizer pushes the filter
//! into the scan (the index table provider applies it exactly, with the snapshot's
//! bitmaps), so `EXPLAIN` shows it as a scan filter:
//!
//! ```text
//! TableScan: condition projection=[person_id],
//!   full_filters=[consented(condition.person_id, Utf8("condition")), condition.code IN (...)]
//! ```
//!
//! The rule cannot be bypassed: the engine executes plans only through a session whose
//! analyzer holds this rule, the tables are not in any catalog (no SQL can name them), the
//! rule refuses a scan of anything that is not an index table, and the providers refuse to
//! scan without the consent predicate for their own table.

use std::sync::Arc;

use crate::consent::{ConsentSnapshot, Members, SearchField};
use crate::provider::{IndexTableProvider, SetKind, SetTableProvider, TableKind};
use arrow::array::{Array, AsArray, BooleanArray};
use arrow::buffer::BooleanBuffer;
use arrow::datatypes::{DataType, Int64Type};
use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult};
use datafusion::common::{Column, DataFusionError, Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, LogicalPlanBuilder, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, TableScan, TableScanBuilder, Volatility, lit, when,
};
use datafusion::optimizer::AnalyzerRule;

/// What a `consented(person_id, scope)` predicate checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The patient consented this field.
    Field(SearchField),
    /// The patient consented at least one field.
    Any,
}

impl Scope {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scope::Field(f) => f.as_str(),
            Scope::Any => "any",
        }
    }

    fn parse(s: &str) -> Option<Scope> {
        if s == "any" {
            Some(Scope::Any)
        } else {
            s.parse().ok().map(Scope::Field)
        }
    }
}

/// `consented(person_id, scope)`, bound to one consent snapshot.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConsentedFn {
    snapshot: ConsentSnapshot,
    signature: Signature,
}

impl ConsentedFn {
    pub(crate) fn members(&self, scope: Scope) -> Members<'_> {
        match scope {
            Scope::Field(f) => self.snapshot.members(Some(f)),
            Scope::Any => self.snapshot.members(None),
        }
    }
}

impl ScalarUDFImpl for ConsentedFn {
    fn name(&self) -> &str {
        "consented"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let scope = match &args.args[1] {
            ColumnarValue::Scalar(ScalarValue::Utf8(Some(s))) => Scope::parse(s),
            _ => None,
        };
        let Some(scope) = scope else {
            return exec_err!("consented() needs a literal field name");
        };
        let ids = args.args[0].to_array(args.number_rows)?;
        Ok(ColumnarValue::Array(Arc::new(membership(
            ids.as_primitive::<Int64Type>(),
            self.members(scope),
        ))))
    }
}

/// Per row, whether the person id is in the set (NULL ids are not).
pub(crate) fn membership(ids: &arrow::array::Int64Array, members: Members<'_>) -> BooleanArray {
    let values = ids.values();
    let bits = BooleanBuffer::collect_bool(values.len(), |i| members.contains(values[i]));
    let bits = match ids.nulls() {
        Some(valid) => &bits & valid.inner(),
        None => bits,
    };
    BooleanArray::new(bits, None)
}

/// `consented_persons(persons, scope)`: each row's person set restricted to the patients
/// who consented the scope; `any_consented(persons, scope)`: whether any of them did.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConsentedPersonsFn {
    snapshot: ConsentSnapshot,
    /// `any_consented` (BOOLEAN) rather than `consented_persons` (BINARY).
    any: bool,
    signature: Signature,
}

impl ConsentedPersonsFn {
    pub(crate) fn members(&self, scope: Scope) -> Members<'_> {
        match scope {
            Scope::Field(f) => self.snapshot.members(Some(f)),
            Scope::Any => self.snapshot.members(None),
        }
    }
}

impl ScalarUDFImpl for ConsentedPersonsFn {
    fn name(&self) -> &str {
        if self.any {
            "any_consented"
        } else {
            "consented_persons"
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(if self.any {
            DataType::Boolean
        } else {
            DataType::Binary
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let scope = match &args.args[1] {
            ColumnarValue::Scalar(ScalarValue::Utf8(Some(s))) => Scope::parse(s),
            _ => None,
        };
        let Some(scope) = scope else {
            return exec_err!("{}() needs a literal field name", self.name());
        };
        let consenting = self.members(scope);
        let sets = args.args[0].to_array(args.number_rows)?;
        let sets = sets.as_binary::<i32>();
        if self.any {
            let mut out = Vec::with_capacity(sets.len());
            for row in 0..sets.len() {
                out.push(
                    sets.is_valid(row)
                        && !crate::sets::decode(sets.value(row))?.is_disjoint(consenting.bitmap()),
                );
            }
            Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(out))))
        } else {
            let mut out = arrow::array::BinaryBuilder::new();
            for row in 0..sets.len() {
                if sets.is_valid(row) {
                    let set = crate::sets::decode(sets.value(row))? & consenting.bitmap();
                    out.append_value(crate::sets::encode(&set));
                } else {
                    out.append_null();
                }
            }
            Ok(ColumnarValue::Array(Arc::new(out.finish())))
        }
    }
}

/// `func(<table>.<column>, '<scope>')` for a UDF implemented by `F`: the function and scope.
fn consent_call<'a, F: ScalarUDFImpl + 'static>(
    expr: &'a Expr,
    column: &str,
) -> Option<(&'a F, Scope)> {
    let Expr::ScalarFunction(ScalarFunction { func, args }) = expr else {
        return None;
    };
    let f = (func.inner().as_ref() as &dyn std::any::Any).downcast_ref::<F>()?;
    let [
        Expr::Column(c),
        Expr::Literal(ScalarValue::Utf8(Some(scope)), _),
    ] = args.as_slice()
    else {
        return None;
    };
    (c.name == column).then_some(())?;
    Some((f, Scope::parse(scope)?))
}

/// The consent predicate of a person-set table's scan filter, if it is one:
/// `any_consented(<table>.persons, scope)`.
pub(crate) fn as_set_consent_predicate(expr: &Expr) -> Option<(&ConsentedPersonsFn, Scope)> {
    consent_call::<ConsentedPersonsFn>(expr, "persons").filter(|(f, _)| f.any)
}

/// The consent predicate of a scan filter, if it is one: its function and scope.
pub(crate) fn as_consent_predicate(expr: &Expr) -> Option<(&ConsentedFn, Scope)> {
    consent_call::<ConsentedFn>(expr, "person_id")
}

#[derive(Debug)]
pub(crate) struct ConsentFilter {
    consented: Arc<ScalarUDF>,
    consented_persons: Arc<ScalarUDF>,
    any_consented: Arc<ScalarUDF>,
}

impl ConsentFilter {
    pub(crate) fn new(snapshot: &ConsentSnapshot) -> ConsentFilter {
        ConsentFilter {
            consented: Arc::new(ScalarUDF::new_from_impl(ConsentedFn {
                snapshot: snapshot.clone(),
                signature: Signature::exact(
                    vec![DataType::Int64, DataType::Utf8],
                    Volatility::Immutable,
                ),
            })),
            consented_persons: Arc::new(ScalarUDF::new_from_impl(ConsentedPersonsFn {
                snapshot: snapshot.clone(),
                any: false,
                signature: Signature::exact(
                    vec![DataType::Binary, DataType::Utf8],
                    Volatility::Immutable,
                ),
            })),
            any_consented: Arc::new(ScalarUDF::new_from_impl(ConsentedPersonsFn {
                snapshot: snapshot.clone(),
                any: true,
                signature: Signature::exact(
                    vec![DataType::Binary, DataType::Utf8],
                    Volatility::Immutable,
                ),
            })),
        }
    }

    /// A person-set table: each row's `persons` intersected with the scope's consenting
    /// patients.
    fn restrict_sets(&self, scan: TableScan, kind: SetKind) -> Result<LogicalPlan> {
        let wanted: Vec<Column> = scan.projected_schema.columns();
        let table = scan.table_name.clone();
        let scope = || lit(kind.scope().name());
        let persons = || Expr::Column(Column::new(Some(table.clone()), "persons"));
        // Rows with no consenting patient go (a key such as a code must not show that
        // someone without consent has it); the others keep only consenting patients.
        let nonempty = self.any_consented.call(vec![persons(), scope()]);
        let full = LogicalPlan::TableScan(
            TableScanBuilder::new(scan.table_name.clone(), scan.source.clone())
                .with_filters(scan.filters.clone())
                .build()?,
        );
        let columns: Vec<Expr> = wanted
            .into_iter()
            .map(|c| {
                if c.name == "persons" {
                    self.consented_persons
                        .call(vec![Expr::Column(c), scope()])
                        .alias_qualified(Some(table.clone()), "persons")
                } else {
                    Expr::Column(c)
                }
            })
            .collect();
        LogicalPlanBuilder::from(full)
            .filter(nonempty)?
            .project(columns)?
            .build()
    }

    fn predicate(&self, scan: &TableScan, scope: Scope) -> Expr {
        let person = Column::new(Some(scan.table_name.clone()), "person_id");
        self.consented
            .call(vec![Expr::Column(person), lit(scope.name())])
    }

    fn restrict(&self, scan: TableScan) -> Result<LogicalPlan> {
        let provider = source_as_provider(&scan.source)?;
        if let Some(sets) =
            (provider.as_ref() as &dyn std::any::Any).downcast_ref::<SetTableProvider>()
        {
            if scan.fetch.is_some() {
                return plan_err!(
                    "a scan of `{}` with a row limit cannot be consent-filtered",
                    scan.table_name
                );
            }
            return self.restrict_sets(scan, sets.kind());
        }
        let Some(index) =
            (provider.as_ref() as &dyn std::any::Any).downcast_ref::<IndexTableProvider>()
        else {
            return plan_err!(
                "the plan scans `{}`, which is not an index table; cohort plans may only \
                 scan index tables",
                scan.table_name
            );
        };
        if scan.fetch.is_some() {
            return plan_err!(
                "a scan of `{}` with a row limit cannot be consent-filtered",
                scan.table_name
            );
        }
        // Scan every column so person_id is at hand, then restore the scan's own output.
        let wanted: Vec<Column> = scan.projected_schema.columns();
        let full = LogicalPlan::TableScan(
            TableScanBuilder::new(scan.table_name.clone(), scan.source.clone())
                .with_filters(scan.filters.clone())
                .build()?,
        );
        let plan = match index.kind() {
            TableKind::Event(domain) => {
                let scope = Scope::Field(SearchField::of_domain(domain));
                LogicalPlanBuilder::from(full)
                    .filter(self.predicate(&scan, scope))?
                    .project(wanted.into_iter().map(Expr::Column))?
                    .build()?
            }
            TableKind::Person => {
                let masked = |c: Column| -> Result<Expr> {
                    let field = match c.name.as_str() {
                        "birth_year" => SearchField::BirthYear,
                        "sex" => SearchField::Sex,
                        _ => return Ok(Expr::Column(c)),
                    };
                    let name = c.name.clone();
                    Ok(
                        when(self.predicate(&scan, Scope::Field(field)), Expr::Column(c))
                            .end()?
                            .alias_qualified(Some(scan.table_name.clone()), name),
                    )
                };
                LogicalPlanBuilder::from(full)
                    .filter(self.predicate(&scan, Scope::Any))?
                    .project(wanted.into_iter().map(masked).collect::<Result<Vec<_>>>()?)?
                    .build()?
            }
        };
        Ok(plan)
    }
}

impl AnalyzerRule for ConsentFilter {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| match node {
            LogicalPlan::TableScan(scan) => self.restrict(scan).map(Transformed::yes),
            other => Ok(Transformed::no(other)),
        })
        .data()
        .map_err(|e| match e {
            DataFusionError::Plan(_) => e,
            other => DataFusionError::Context("consent filter".into(), Box::new(other)),
        })
    }

    fn name(&self) -> &str {
        "consent_filter"
    }
}
