//! Cohort definitions compiled to DataFusion logical plans.
//!
//! Each leaf criterion (demographics, an event criterion, the population, the index event)
//! becomes a subplan over the index tables that ends in `person_set(person_id)`: one row,
//! one roaring bitmap. The leaves are cross-joined (1 × 1 × … rows) and groups, exclusions
//! and the attrition steps are set algebra on those columns ([`crate::sets`]):
//!
//! ```text
//! Projection: set_count(step_0) AS step_0, set_count(step_1) AS step_1, ...
//!   Projection: ..., set_and(step_0, c2) AS step_1
//!     Projection: c0, c1, c2, set_and(c0, c1) AS step_0     -- population (∩ index event)
//!       Cross Join:
//!         Aggregate: person_set(person.person_id) AS c0      -- visible patients
//!           TableScan: person
//!         Aggregate: person_set(condition.person_id) AS c2
//!           Filter: condition.code IN (...) AND condition.date >= ...
//!             TableScan: condition
//! ```
//!
//! Plans are built with `LogicalPlanBuilder` and `Expr` only; nothing is parsed from SQL.
//! The consent filter is not part of the compiled plan: the engine's analyzer adds it to
//! every scan ([`crate::consent_filter`]).

use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::common::{Column, JoinType, Result, ScalarValue};
use datafusion::functions::datetime::expr_fn::date_part;
use datafusion::functions_aggregate::expr_fn::{count, min};
use datafusion::logical_expr::{
    Expr, LogicalPlan, LogicalPlanBuilder, TableSource, cast, col, lit,
};

use crate::date::Date;
use crate::definition::{
    CohortDefinition, Criterion, Demographics, Domain, EventCriterion, Index, ObservationWindow,
    Occurrence, Window,
};
use crate::hierarchy::ConceptHierarchy;
use crate::provider::{SetKind, TableKind};
use crate::sets::{person_set, set_and, set_at_least, set_count, set_minus, set_or, set_union};

/// The table sources plans scan.
#[derive(Clone)]
pub(crate) struct Sources {
    pub person: Arc<dyn TableSource>,
    pub events: [Arc<dyn TableSource>; 4],
    pub observation_period: Arc<dyn TableSource>,
    /// The person-set tables, when the engine uses them.
    pub sets: Option<SetSources>,
}

/// The person-set tables.
#[derive(Clone)]
pub(crate) struct SetSources {
    pub all: Arc<dyn TableSource>,
    pub sex: Arc<dyn TableSource>,
    pub birth_year: Arc<dyn TableSource>,
    pub by_code: [Arc<dyn TableSource>; 4],
}

/// What a compiled plan returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// One row: `step_0 .. step_n` counts (BIGINT).
    Counts,
    /// One row: `persons`, the final person set (BINARY).
    Persons,
}

/// Name of the index-date column of an index-event subplan.
const INDEX_DATE: &str = "index_date";
/// Alias of the index-event subplan when joined.
const INDEX_ALIAS: &str = "index_event";
/// Alias of the anchor events of a window relative to each event of another criterion.
const ANCHOR_ALIAS: &str = "anchor_event";

enum IndexPlan {
    Date(Date),
    Event(LogicalPlan),
}

struct Compiler<'a> {
    sources: &'a Sources,
    hierarchy: &'a ConceptHierarchy,
    index: Option<IndexPlan>,
    leaves: Vec<LogicalPlan>,
    population: Option<Expr>,
}

/// Compiles a validated definition.
pub(crate) fn compile(
    definition: &CohortDefinition,
    hierarchy: &ConceptHierarchy,
    sources: &Sources,
    output: Output,
) -> Result<LogicalPlan> {
    let mut c = Compiler {
        sources,
        hierarchy,
        index: None,
        leaves: Vec::new(),
        population: None,
    };
    // Leaf 0: every visible patient.
    let mut population = if c.sources.sets.is_some() {
        let all = c.scan_sets(SetKind::All)?;
        c.set_leaf(all, SetKind::All)?
    } else {
        let visible = c.scan(TableKind::Person)?;
        c.leaf(visible, TableKind::Person.name())?
    };
    match &definition.index {
        Some(Index::Date(d)) => c.index = Some(IndexPlan::Date(*d)),
        Some(Index::FirstEvent(event)) => {
            let (domain, e) = event.as_event().expect("validated: an event criterion");
            let rows = c.event_rows(domain, e)?;
            let qualified = Column::new(Some(domain.as_str()), "person_id");
            let plan = rows
                .aggregate(
                    vec![Expr::Column(qualified.clone())],
                    vec![
                        min(Expr::Column(Column::new(Some(domain.as_str()), "date")))
                            .alias(INDEX_DATE),
                    ],
                )?
                .build()?;
            let with_index = c.leaf(LogicalPlanBuilder::from(plan.clone()), domain.as_str())?;
            c.index = Some(IndexPlan::Event(plan));
            population = set_and(population, with_index);
        }
        None => {}
    }
    c.population = Some(population.clone());

    let criteria: Vec<Expr> = definition
        .criteria
        .iter()
        .map(|k| c.criterion(k))
        .collect::<Result<_>>()?;

    let mut plan = LogicalPlanBuilder::from(c.leaves[0].clone());
    for leaf in &c.leaves[1..] {
        plan = plan.cross_join(leaf.clone())?;
    }
    let leaf_cols: Vec<Expr> = (0..c.leaves.len()).map(|i| col(leaf_name(i))).collect();
    let mut carried = leaf_cols.clone();
    carried.push(population.alias(step_name(0)));
    plan = plan.project(carried)?;
    for (k, criterion) in criteria.into_iter().enumerate() {
        let mut carried: Vec<Expr> = leaf_cols.clone();
        carried.extend((0..=k).map(|s| col(step_name(s))));
        carried.push(set_and(col(step_name(k)), criterion).alias(step_name(k + 1)));
        plan = plan.project(carried)?;
    }
    let steps = definition.criteria.len() + 1;
    let last = steps - 1;
    let out: Vec<Expr> = match output {
        Output::Counts => (0..steps)
            .map(|s| set_count(col(step_name(s))).alias(step_name(s)))
            .collect(),
        Output::Persons => vec![col(step_name(last)).alias("persons")],
    };
    plan.project(out)?.build()
}

fn leaf_name(i: usize) -> String {
    format!("c{i}")
}

pub(crate) fn step_name(i: usize) -> String {
    format!("step_{i}")
}

/// `rows` (of `table`) joined to the index-event subplan `plan` by `person_id`: each row
/// gains its patient's `index_event.index_date`; patients without an index event drop out.
fn join_index(
    rows: LogicalPlanBuilder,
    table: &str,
    plan: &LogicalPlan,
) -> Result<LogicalPlanBuilder> {
    let index = LogicalPlanBuilder::from(plan.clone())
        .alias(INDEX_ALIAS)?
        .build()?;
    rows.join(
        index,
        JoinType::Inner,
        (
            vec![Column::new(Some(table), "person_id")],
            vec![Column::new(Some(INDEX_ALIAS), "person_id")],
        ),
        None,
    )
}

/// `from <= days AND days <= to` for the bounds given (`None`: neither).
fn days_between(days: Expr, from: Option<i32>, to: Option<i32>) -> Option<Expr> {
    let low = from.map(|f| days.clone().gt_eq(lit(f)));
    let high = to.map(|t| days.lt_eq(lit(t)));
    match (low, high) {
        (Some(l), Some(h)) => Some(l.and(h)),
        (l, h) => l.or(h),
    }
}

fn date_lit(d: Date) -> Expr {
    lit(ScalarValue::Date32(Some(d.days())))
}

fn qcol(table: &str, name: &str) -> Expr {
    Expr::Column(Column::new(Some(table), name))
}

impl Compiler<'_> {
    fn scan(&self, kind: TableKind) -> Result<LogicalPlanBuilder> {
        let source = match kind {
            TableKind::Person => self.sources.person.clone(),
            TableKind::Event(d) => self.sources.events[d as usize].clone(),
            TableKind::ObservationPeriod => self.sources.observation_period.clone(),
        };
        LogicalPlanBuilder::scan(kind.name(), source, None)
    }

    fn scan_sets(&self, kind: SetKind) -> Result<LogicalPlanBuilder> {
        let sets = self.sources.sets.as_ref().expect("person sets in use");
        let source = match kind {
            SetKind::All => sets.all.clone(),
            SetKind::Sex => sets.sex.clone(),
            SetKind::BirthYear => sets.birth_year.clone(),
            SetKind::Code(d) => sets.by_code[d as usize].clone(),
        };
        LogicalPlanBuilder::scan(kind.name(), source, None)
    }

    /// Ends `rows` of a person-set table in `set_union`, as the next leaf; returns the
    /// leaf's column.
    fn set_leaf(&mut self, rows: LogicalPlanBuilder, kind: SetKind) -> Result<Expr> {
        let name = leaf_name(self.leaves.len());
        let plan = rows
            .aggregate(
                Vec::<Expr>::new(),
                vec![set_union(qcol(kind.name(), "persons")).alias(&name)],
            )?
            .build()?;
        self.leaves.push(plan);
        Ok(col(name))
    }

    /// Demographics from the person sets: by sex and by birth year (age at a fixed date
    /// is a birth-year range).
    fn demographic_sets(&mut self, d: &Demographics) -> Result<Expr> {
        let mut parts = Vec::new();
        if !d.sex.is_empty() {
            let sexes = d.sex.iter().map(|s| lit(s.as_str())).collect();
            let rows = self
                .scan_sets(SetKind::Sex)?
                .filter(qcol(SetKind::Sex.name(), "sex").in_list(sexes, false))?;
            parts.push(self.set_leaf(rows, SetKind::Sex)?);
        }
        let mut low = d.birth_year.and_then(|r| r.min);
        let mut high = d.birth_year.and_then(|r| r.max);
        if let (Some(r), Some(IndexPlan::Date(index))) = (d.age, &self.index) {
            // age = index year − birth year  ⇔  birth year = index year − age
            if let Some(min) = r.min {
                let h = index.year() - min;
                high = Some(high.map_or(h, |x| x.min(h)));
            }
            if let Some(max) = r.max {
                let l = index.year() - max;
                low = Some(low.map_or(l, |x| x.max(l)));
            }
        }
        if low.is_some() || high.is_some() {
            let year = qcol(SetKind::BirthYear.name(), "birth_year");
            let mut pred: Option<Expr> = None;
            if let Some(l) = low {
                pred = Some(year.clone().gt_eq(lit(l)));
            }
            if let Some(h) = high {
                let p = year.lt_eq(lit(h));
                pred = Some(match pred {
                    Some(q) => q.and(p),
                    None => p,
                });
            }
            let rows = self
                .scan_sets(SetKind::BirthYear)?
                .filter(pred.expect("a bound"))?;
            parts.push(self.set_leaf(rows, SetKind::BirthYear)?);
        }
        Ok(parts
            .into_iter()
            .reduce(set_and)
            .expect("validated: not empty"))
    }

    /// Ends `rows` (with a `<table>.person_id` column) in `person_set`, as the next leaf;
    /// returns the leaf's column.
    fn leaf(&mut self, rows: LogicalPlanBuilder, table: &str) -> Result<Expr> {
        let name = leaf_name(self.leaves.len());
        let plan = rows
            .aggregate(
                Vec::<Expr>::new(),
                vec![person_set(qcol(table, "person_id")).alias(&name)],
            )?
            .build()?;
        self.leaves.push(plan);
        Ok(col(name))
    }

    fn population(&self) -> Expr {
        self.population.clone().expect("population compiled first")
    }

    fn criterion(&mut self, c: &Criterion) -> Result<Expr> {
        Ok(match c {
            Criterion::All(v) => {
                let sets = v
                    .iter()
                    .map(|c| self.criterion(c))
                    .collect::<Result<Vec<_>>>()?;
                sets.into_iter()
                    .reduce(set_and)
                    .expect("validated: not empty")
            }
            Criterion::Any(v) => {
                let sets = v
                    .iter()
                    .map(|c| self.criterion(c))
                    .collect::<Result<Vec<_>>>()?;
                sets.into_iter()
                    .reduce(set_or)
                    .expect("validated: not empty")
            }
            Criterion::AtLeast(a) => {
                let sets =
                    a.of.iter()
                        .map(|c| self.criterion(c))
                        .collect::<Result<Vec<_>>>()?;
                set_at_least(a.n, sets)
            }
            Criterion::Not(inner) => {
                let inner = self.criterion(inner)?;
                set_minus(self.population(), inner)
            }
            Criterion::Demographics(d) => self.demographics(d)?,
            Criterion::ObservationPeriod(w) => self.observation(w)?,
            other => {
                let (domain, e) = other.as_event().expect("event criterion");
                self.event(domain, e)?
            }
        })
    }

    fn demographics(&mut self, d: &Demographics) -> Result<Expr> {
        let age_at_event = d.age.is_some() && matches!(self.index, Some(IndexPlan::Event(_)));
        if self.sources.sets.is_some() && !age_at_event {
            return self.demographic_sets(d);
        }
        let person = TableKind::Person.name();
        let mut rows = self.scan(TableKind::Person)?;
        let mut preds: Vec<Expr> = Vec::new();
        if !d.sex.is_empty() {
            let sexes = d.sex.iter().map(|s| lit(s.as_str())).collect();
            preds.push(qcol(person, "sex").in_list(sexes, false));
        }
        if let Some(r) = d.birth_year {
            let year = qcol(person, "birth_year");
            if let Some(min) = r.min {
                preds.push(year.clone().gt_eq(lit(min)));
            }
            if let Some(max) = r.max {
                preds.push(year.lt_eq(lit(max)));
            }
        }
        if let Some(r) = d.age {
            match &self.index {
                Some(IndexPlan::Date(index)) => {
                    // age = index year − birth year  ⇔  birth year = index year − age
                    let year = qcol(person, "birth_year");
                    if let Some(min) = r.min {
                        preds.push(year.clone().lt_eq(lit(index.year() - min)));
                    }
                    if let Some(max) = r.max {
                        preds.push(year.gt_eq(lit(index.year() - max)));
                    }
                }
                Some(IndexPlan::Event(plan)) => {
                    rows = join_index(rows, person, plan)?;
                    let age = cast(
                        date_part(lit("year"), qcol(INDEX_ALIAS, INDEX_DATE)),
                        DataType::Int64,
                    ) - cast(qcol(person, "birth_year"), DataType::Int64);
                    if let Some(min) = r.min {
                        preds.push(age.clone().gt_eq(lit(i64::from(min))));
                    }
                    if let Some(max) = r.max {
                        preds.push(age.lt_eq(lit(i64::from(max))));
                    }
                }
                None => unreachable!("validated: age needs an index"),
            }
        }
        if let Some(p) = preds.into_iter().reduce(Expr::and) {
            rows = rows.filter(p)?;
        }
        self.leaf(rows, person)
    }

    /// Patients with an observation period from at least `prior_days` before their index
    /// date to at least `post_days` after it.
    fn observation(&mut self, w: &ObservationWindow) -> Result<Expr> {
        let table = TableKind::ObservationPeriod.name();
        let prior = i32::try_from(w.prior_days).expect("validated: at most a century");
        let post = i32::try_from(w.post_days).expect("validated: at most a century");
        let (start, end) = (qcol(table, "start_date"), qcol(table, "end_date"));
        let mut rows = self.scan(TableKind::ObservationPeriod)?;
        match &self.index {
            Some(IndexPlan::Date(d)) => {
                rows = rows.filter(
                    start
                        .lt_eq(date_lit(d.add_days(-prior)))
                        .and(end.gt_eq(date_lit(d.add_days(post)))),
                )?;
            }
            Some(IndexPlan::Event(plan)) => {
                rows = join_index(rows, table, plan)?;
                let index = cast(qcol(INDEX_ALIAS, INDEX_DATE), DataType::Int32);
                let before = index.clone() - cast(start, DataType::Int32);
                let after = cast(end, DataType::Int32) - index;
                rows = rows
                    .filter(before.gt_eq(lit(prior)).and(after.gt_eq(lit(post))))?
                    .project(vec![qcol(table, "person_id")])?;
            }
            None => unreachable!("validated: an observation period needs an index"),
        }
        self.leaf(rows, table)
    }

    /// The rows of `domain` matching the criterion's codes, absolute window, value and unit
    /// (not its occurrence count or relative window).
    fn event_rows(&self, domain: Domain, e: &EventCriterion) -> Result<LogicalPlanBuilder> {
        let table = domain.as_str();
        let codes = self.hierarchy.expand(&e.codes, e.include_descendants);
        let mut codes: Vec<Expr> = codes.iter().map(|c| lit(c.to_string())).collect();
        let mut pred = if codes.len() == 1 {
            qcol(table, "code").eq(codes.pop().expect("one code"))
        } else {
            qcol(table, "code").in_list(codes, false)
        };
        let window = match (&e.window, &self.index) {
            (Some(Window::Between { from, to }), _) => Some((*from, *to)),
            // Relative to a fixed date: a calendar window.
            (Some(Window::DaysFromIndex { from, to }), Some(IndexPlan::Date(d))) => {
                Some((from.map(|f| d.add_days(f)), to.map(|t| d.add_days(t))))
            }
            _ => None,
        };
        if let Some((from, to)) = window {
            if let Some(from) = from {
                pred = pred.and(qcol(table, "date").gt_eq(date_lit(from)));
            }
            if let Some(to) = to {
                pred = pred.and(qcol(table, "date").lt_eq(date_lit(to)));
            }
        }
        if let Some(v) = e.value {
            if let Some(min) = v.min {
                pred = pred.and(qcol(table, "value").gt_eq(lit(min)));
            }
            if let Some(max) = v.max {
                pred = pred.and(qcol(table, "value").lt_eq(lit(max)));
            }
        }
        if let Some(unit) = &e.unit {
            pred = pred.and(qcol(table, "unit").eq(lit(unit.as_str())));
        }
        self.scan(TableKind::Event(domain))?.filter(pred)
    }

    /// Whether an event criterion asks no more than "has a row of these codes" (or has
    /// none): answerable from the person sets by code.
    fn needs_rows(e: &EventCriterion) -> bool {
        e.window.is_some()
            || e.value.is_some()
            || e.unit.is_some()
            || !matches!(
                e.occurrence,
                Occurrence::AtLeast(1) | Occurrence::AtMost(0) | Occurrence::Exactly(0)
            )
    }

    fn event(&mut self, domain: Domain, e: &EventCriterion) -> Result<Expr> {
        if self.sources.sets.is_some() && !Self::needs_rows(e) {
            let kind = SetKind::Code(domain);
            let codes = self.hierarchy.expand(&e.codes, e.include_descendants);
            let codes: Vec<Expr> = codes.iter().map(|c| lit(c.to_string())).collect();
            let rows = self
                .scan_sets(kind)?
                .filter(qcol(kind.name(), "code").in_list(codes, false))?;
            let any = self.set_leaf(rows, kind)?;
            return Ok(match e.occurrence {
                Occurrence::AtLeast(1) => any,
                _ => set_minus(self.population(), any),
            });
        }
        let table = domain.as_str();
        let mut rows = self.event_rows(domain, e)?;
        match (&e.window, &self.index) {
            (Some(Window::DaysFromIndex { from, to }), Some(IndexPlan::Event(plan))) => {
                rows = join_index(rows, table, plan)?;
                let days = cast(qcol(table, "date"), DataType::Int32)
                    - cast(qcol(INDEX_ALIAS, INDEX_DATE), DataType::Int32);
                if let Some(p) = days_between(days, *from, *to) {
                    rows = rows.filter(p)?;
                }
                rows = rows.project(vec![qcol(table, "person_id")])?;
            }
            (Some(Window::DaysFromEvent { event, from, to }), _) => {
                // Keep each row that has at least one anchor event of the same patient in
                // the window: a semi join, so a row counts once however many anchors it
                // has, and the occurrence below counts rows.
                let (anchor_domain, anchor) = event.as_event().expect("validated: an event");
                let anchor_table = anchor_domain.as_str();
                let anchors = self
                    .event_rows(anchor_domain, anchor)?
                    .project(vec![
                        qcol(anchor_table, "person_id"),
                        qcol(anchor_table, "date"),
                    ])?
                    .alias(ANCHOR_ALIAS)?
                    .build()?;
                let days = cast(qcol(table, "date"), DataType::Int32)
                    - cast(qcol(ANCHOR_ALIAS, "date"), DataType::Int32);
                rows = rows.join(
                    anchors,
                    JoinType::LeftSemi,
                    (
                        vec![Column::new(Some(table), "person_id")],
                        vec![Column::new(Some(ANCHOR_ALIAS), "person_id")],
                    ),
                    Some(days_between(days, *from, *to).expect("validated: a bound")),
                )?;
            }
            _ => {}
        }
        let per_person = |rows: LogicalPlanBuilder, keep: fn(Expr, Expr) -> Expr, n: u32| {
            rows.aggregate(
                vec![qcol(table, "person_id")],
                vec![count(lit(1)).alias("events")],
            )?
            .filter(keep(col("events"), lit(i64::from(n))))
        };
        Ok(match e.occurrence {
            Occurrence::AtLeast(1) => self.leaf(rows, table)?,
            Occurrence::AtLeast(n) => {
                let rows = per_person(rows, Expr::gt_eq, n)?;
                self.leaf(rows, table)?
            }
            Occurrence::Exactly(0) | Occurrence::AtMost(0) => {
                let any = self.leaf(rows, table)?;
                set_minus(self.population(), any)
            }
            Occurrence::Exactly(n) => {
                let rows = per_person(rows, Expr::eq, n)?;
                self.leaf(rows, table)?
            }
            Occurrence::AtMost(n) => {
                let rows = per_person(rows, Expr::gt, n)?;
                let more = self.leaf(rows, table)?;
                set_minus(self.population(), more)
            }
        })
    }
}
