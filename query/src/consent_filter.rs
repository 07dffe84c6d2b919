//! The consent filter: a DataFusion [`AnalyzerRule`] that restricts every scan of an index
//! table to what the study's consent snapshot allows.
//!
//! For each `TableScan` of an index table it inserts, directly above the scan:
//!
//! * event tables (`condition`, `measurement`, `drug`, `procedure`):
//!   `Filter: consented(<table>.person_id, <table>.code, '<table>')`: rows of patients who
//!   did not consent that table's field are gone, and so are rows whose code is sensitive
//!   (mental health, substance use, sexual health, genomics; [`crate::sensitivity`]) for
//!   patients who did not also permit the study every sensitive category of the code;
//! * `person`: `Filter: consented(person.person_id, 'any')`: patients without any consent
//!   are gone; then a projection masks `birth_year` and `sex` to NULL for patients who did
//!   not consent that column:
//!   `CASE WHEN consented(person.person_id, 'birth_year') THEN person.birth_year END`;
//! * person-set tables (`person_all`, `person_by_sex`, `person_by_birth_year`,
//!   `<table>_by_code`): a projection that intersects each row's set with the consenting
//!   patients of the table's scope:
//!   `consented_persons(condition_by_code.persons, condition_by_code.code, 'condition')`
//!   (by code, so that a sensitive code's set keeps only patients who permitted its
//!   category; `consented_persons(persons, 'any')` for `person_all`, `sex` and
//!   `birth_year` for the person sets by sex and birth year), and below it a filter that
//!   drops rows without any consenting patient,
//!   `any_consented(condition_by_code.persons, condition_by_code.code, 'condition')`,
//!   which the person-set provider applies and requires.
//!
//! `consented` is a scalar function bound to one snapshot. The optimizer pushes the filter
//! into the scan (the index table provider applies it exactly, with the snapshot's
//! bitmaps), so `EXPLAIN` shows it as a scan filter:
//!
//! ```text
//! TableScan: condition projection=[person_id],
//!   full_filters=[consented(condition.person_id, condition.code, Utf8("condition")),
//!                 condition.code IN (...)]
//! ```
//!
//! The rule cannot be bypassed: the engine executes plans only through a session whose
//! analyzer holds this rule, the tables are not in any catalog (no SQL can name them), the
//! rule refuses a scan of anything that is not an index table, and the providers refuse to
//! scan without the consent predicate for their own table (for event tables and their
//! person sets, the form by code, so the sensitive categories cannot be left out).

use std::collections::HashMap;
use std::sync::Arc;

use crate::consent::{ConsentSnapshot, Members, SearchField};
use crate::provider::{IndexTableProvider, SetKind, SetTableProvider, TableKind};
use crate::sensitivity::{Gates, Sensitivity};
use crate::tables::dict_utf8;
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray};
use arrow::buffer::BooleanBuffer;
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult};
use datafusion::common::{Column, DataFusionError, Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, LogicalPlanBuilder, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, TableScan, TableScanBuilder, TypeSignature, Volatility, lit, when,
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

/// The engine's classifier, shared by the functions of every query (compared by identity).
#[derive(Debug, Clone)]
pub(crate) struct SensitivityRef(pub(crate) Arc<Sensitivity>);

impl PartialEq for SensitivityRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SensitivityRef {}

impl std::hash::Hash for SensitivityRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.0).hash(state)
    }
}

/// The consent one query runs under: the snapshot and the engine's classifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Bound {
    snapshot: ConsentSnapshot,
    sensitivity: SensitivityRef,
}

impl Bound {
    /// The sets a patient must be in for a row of `scope` gated by `gates`: the scope's,
    /// and each gating category's.
    pub(crate) fn members(&self, scope: Scope, gates: Gates) -> Vec<Members<'_>> {
        let mut out = vec![match scope {
            Scope::Field(f) => self.snapshot.members(Some(f)),
            Scope::Any => self.snapshot.members(None),
        }];
        out.extend(gates.iter().map(|c| self.snapshot.category_members(c)));
        out
    }

    pub(crate) fn gates(&self, code: &str) -> Gates {
        self.sensitivity.0.gates(code)
    }

    /// The gates of each row's code (`None`: the predicate is not by code).
    fn row_gates(&self, codes: Option<&ArrayRef>, rows: usize) -> Result<Vec<Gates>> {
        let Some(codes) = codes else {
            return Ok(vec![Gates::default(); rows]);
        };
        if let Some(dict) = codes.as_dictionary_opt::<Int32Type>() {
            let values = dict
                .values()
                .as_string_opt::<i32>()
                .ok_or_else(|| DataFusionError::Execution("consent: codes are not text".into()))?;
            let per_value: Vec<Gates> = (0..values.len())
                .map(|i| self.gates(values.value(i)))
                .collect();
            return Ok(dict
                .keys()
                .iter()
                .map(|k| k.map_or(Gates::default(), |k| per_value[k as usize]))
                .collect());
        }
        let Some(text) = codes.as_string_opt::<i32>() else {
            return exec_err!("consent: codes are not text");
        };
        let mut seen: HashMap<&str, Gates> = HashMap::new();
        Ok(text
            .iter()
            .map(|c| {
                c.map_or(Gates::default(), |c| {
                    *seen.entry(c).or_insert_with(|| self.gates(c))
                })
            })
            .collect())
    }
}

fn scope_arg(args: &[ColumnarValue], name: &str) -> Result<Scope> {
    let scope = match args.last() {
        Some(ColumnarValue::Scalar(ScalarValue::Utf8(Some(s)))) => Scope::parse(s),
        _ => None,
    };
    match scope {
        Some(scope) => Ok(scope),
        None => exec_err!("{name}() needs a literal field name"),
    }
}

/// `consented(person_id, scope)` (the person table) and `consented(person_id, code,
/// scope)` (event tables: the field, and every sensitive category of the row's code),
/// bound to one consent snapshot.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConsentedFn {
    bound: Bound,
    signature: Signature,
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
        let scope = scope_arg(&args.args, "consented")?;
        let ids = args.args[0].to_array(args.number_rows)?;
        let ids = ids.as_primitive::<Int64Type>();
        let codes = match args.args.len() {
            3 => Some(args.args[1].to_array(args.number_rows)?),
            _ => None,
        };
        let gates = self.bound.row_gates(codes.as_ref(), ids.len())?;
        let field = self.bound.members(scope, Gates::default());
        let bits = BooleanBuffer::collect_bool(ids.len(), |i| {
            let id = ids.values()[i];
            field[0].contains(id)
                && gates[i]
                    .iter()
                    .all(|c| self.bound.snapshot.category_members(c).contains(id))
        });
        let bits = match ids.nulls() {
            Some(valid) => &bits & valid.inner(),
            None => bits,
        };
        Ok(ColumnarValue::Array(Arc::new(BooleanArray::new(
            bits, None,
        ))))
    }
}

/// Per row, whether the person id is in every one of the sets (NULL ids are not).
pub(crate) fn membership(ids: &arrow::array::Int64Array, members: &[Members<'_>]) -> BooleanArray {
    let values = ids.values();
    let bits = BooleanBuffer::collect_bool(values.len(), |i| {
        members.iter().all(|m| m.contains(values[i]))
    });
    let bits = match ids.nulls() {
        Some(valid) => &bits & valid.inner(),
        None => bits,
    };
    BooleanArray::new(bits, None)
}

/// `set` restricted to the patients in every one of `members`.
pub(crate) fn restrict_set(
    set: &roaring::RoaringBitmap,
    members: &[Members<'_>],
) -> roaring::RoaringBitmap {
    let mut out = set.clone();
    for m in members {
        out &= m.bitmap();
    }
    out
}

/// Whether any patient of `set` is in every one of `members`.
pub(crate) fn any_member(set: &roaring::RoaringBitmap, members: &[Members<'_>]) -> bool {
    match members {
        [one] => !set.is_disjoint(one.bitmap()),
        _ => !restrict_set(set, members).is_empty(),
    }
}

/// `consented_persons(persons, [code,] scope)`: each row's person set restricted to the
/// patients who consented the scope (and permitted every sensitive category of the row's
/// code); `any_consented(persons, [code,] scope)`: whether any of them did.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConsentedPersonsFn {
    bound: Bound,
    /// `any_consented` (BOOLEAN) rather than `consented_persons` (BINARY).
    any: bool,
    signature: Signature,
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
        let scope = scope_arg(&args.args, self.name())?;
        let sets = args.args[0].to_array(args.number_rows)?;
        let sets = sets.as_binary::<i32>();
        let codes = match args.args.len() {
            3 => Some(args.args[1].to_array(args.number_rows)?),
            _ => None,
        };
        let gates = self.bound.row_gates(codes.as_ref(), sets.len())?;
        if self.any {
            let mut out = Vec::with_capacity(sets.len());
            for (row, gates) in gates.iter().enumerate() {
                let members = self.bound.members(scope, *gates);
                out.push(
                    sets.is_valid(row)
                        && any_member(&crate::sets::decode(sets.value(row))?, &members),
                );
            }
            Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(out))))
        } else {
            let mut out = arrow::array::BinaryBuilder::new();
            for (row, gates) in gates.iter().enumerate() {
                if sets.is_valid(row) {
                    let members = self.bound.members(scope, *gates);
                    let set = restrict_set(&crate::sets::decode(sets.value(row))?, &members);
                    out.append_value(crate::sets::encode(&set));
                } else {
                    out.append_null();
                }
            }
            Ok(ColumnarValue::Array(Arc::new(out.finish())))
        }
    }
}

/// A consent predicate found among a scan's filters.
pub(crate) struct ConsentPredicate<'a> {
    pub(crate) bound: &'a Bound,
    pub(crate) scope: Scope,
    /// The form by code: a row's code's sensitive categories gate it too.
    pub(crate) by_code: bool,
}

impl ConsentPredicate<'_> {
    /// The sets a patient must be in for a row of a code gated by `gates` (gates count
    /// only for the form by code).
    pub(crate) fn members(&self, gates: Gates) -> Vec<Members<'_>> {
        let gates = if self.by_code {
            gates
        } else {
            Gates::default()
        };
        self.bound.members(self.scope, gates)
    }
}

fn is_code_column(e: &Expr) -> bool {
    match e {
        Expr::Column(c) => c.name == "code",
        Expr::Cast(c) => is_code_column(&c.expr),
        _ => false,
    }
}

/// `func(<table>.<column>, ['<table>.code',] '<scope>')` for a UDF implemented by `F`: the
/// function, the scope and whether it is by code.
fn consent_call<'a, F: ScalarUDFImpl + 'static>(
    expr: &'a Expr,
    column: &str,
) -> Option<(&'a F, Scope, bool)> {
    let Expr::ScalarFunction(ScalarFunction { func, args }) = expr else {
        return None;
    };
    let f = (func.inner().as_ref() as &dyn std::any::Any).downcast_ref::<F>()?;
    let (c, code, scope) = match args.as_slice() {
        [
            Expr::Column(c),
            Expr::Literal(ScalarValue::Utf8(Some(scope)), _),
        ] => (c, None, scope),
        [
            Expr::Column(c),
            code,
            Expr::Literal(ScalarValue::Utf8(Some(scope)), _),
        ] => (c, Some(code), scope),
        _ => return None,
    };
    (c.name == column).then_some(())?;
    if code.is_some_and(|code| !is_code_column(code)) {
        return None;
    }
    Some((f, Scope::parse(scope)?, code.is_some()))
}

/// The consent predicate of a person-set table's scan filter, if it is one:
/// `any_consented(<table>.persons, [<table>.code,] scope)`.
pub(crate) fn as_set_consent_predicate(expr: &Expr) -> Option<ConsentPredicate<'_>> {
    consent_call::<ConsentedPersonsFn>(expr, "persons")
        .filter(|(f, _, _)| f.any)
        .map(|(f, scope, by_code)| ConsentPredicate {
            bound: &f.bound,
            scope,
            by_code,
        })
}

/// The consent predicate of a scan filter, if it is one.
pub(crate) fn as_consent_predicate(expr: &Expr) -> Option<ConsentPredicate<'_>> {
    consent_call::<ConsentedFn>(expr, "person_id").map(|(f, scope, by_code)| ConsentPredicate {
        bound: &f.bound,
        scope,
        by_code,
    })
}

#[derive(Debug)]
pub(crate) struct ConsentFilter {
    consented: Arc<ScalarUDF>,
    consented_persons: Arc<ScalarUDF>,
    any_consented: Arc<ScalarUDF>,
}

/// `(first, [code,] Utf8)` with the code as the event tables (dictionary) or the person
/// sets (text) hold it.
fn consent_signature(first: DataType) -> Signature {
    Signature::one_of(
        vec![
            TypeSignature::Exact(vec![first.clone(), DataType::Utf8]),
            TypeSignature::Exact(vec![first.clone(), dict_utf8(), DataType::Utf8]),
            TypeSignature::Exact(vec![first, DataType::Utf8, DataType::Utf8]),
        ],
        Volatility::Immutable,
    )
}

impl ConsentFilter {
    pub(crate) fn new(snapshot: &ConsentSnapshot, sensitivity: &Arc<Sensitivity>) -> ConsentFilter {
        let bound = Bound {
            snapshot: snapshot.clone(),
            sensitivity: SensitivityRef(sensitivity.clone()),
        };
        ConsentFilter {
            consented: Arc::new(ScalarUDF::new_from_impl(ConsentedFn {
                bound: bound.clone(),
                signature: consent_signature(DataType::Int64),
            })),
            consented_persons: Arc::new(ScalarUDF::new_from_impl(ConsentedPersonsFn {
                bound: bound.clone(),
                any: false,
                signature: consent_signature(DataType::Binary),
            })),
            any_consented: Arc::new(ScalarUDF::new_from_impl(ConsentedPersonsFn {
                bound,
                any: true,
                signature: consent_signature(DataType::Binary),
            })),
        }
    }

    /// A person-set table: each row's `persons` intersected with the scope's consenting
    /// patients (by code for the sets by code).
    fn restrict_sets(&self, scan: TableScan, kind: SetKind) -> Result<LogicalPlan> {
        let wanted: Vec<Column> = scan.projected_schema.columns();
        let table = scan.table_name.clone();
        let args = |first: Expr| {
            let mut args = vec![first];
            if matches!(kind, SetKind::Code(_)) {
                args.push(Expr::Column(Column::new(Some(table.clone()), "code")));
            }
            args.push(lit(kind.scope().name()));
            args
        };
        let persons = || Expr::Column(Column::new(Some(table.clone()), "persons"));
        // Rows with no consenting patient go (a key such as a code must not show that
        // someone without consent has it); the others keep only consenting patients.
        let nonempty = self.any_consented.call(args(persons()));
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
                        .call(args(Expr::Column(c)))
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

    /// The predicate by code for an event table.
    fn event_predicate(&self, scan: &TableScan, scope: Scope) -> Expr {
        let person = Column::new(Some(scan.table_name.clone()), "person_id");
        let code = Column::new(Some(scan.table_name.clone()), "code");
        self.consented.call(vec![
            Expr::Column(person),
            Expr::Column(code),
            lit(scope.name()),
        ])
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
                    .filter(self.event_predicate(&scan, scope))?
                    .project(wanted.into_iter().map(Expr::Column))?
                    .build()?
            }
            TableKind::ObservationPeriod => LogicalPlanBuilder::from(full)
                .filter(self.predicate(&scan, Scope::Field(SearchField::ObservationPeriod)))?
                .project(wanted.into_iter().map(Expr::Column))?
                .build()?,
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
