//! The cohort engine: index tables in Arrow, definitions compiled to DataFusion plans,
//! the consent filter applied to every plan, on a runtime of its own.
//!
//! ```
//! use cohort_query::{CodedEvent, CohortDefinition, CohortEngine, ConceptHierarchy,
//!                    ConsentSnapshot, IndexBuilder, PatientIndex, Person, SearchField};
//!
//! let mut builder = IndexBuilder::new();
//! for id in 0..30 {
//!     let patient = PatientIndex {
//!         person: Person { birth_year: Some(1950 + id as i32), sex: "female".into() },
//!         conditions: vec![CodedEvent {
//!             system: "snomed".into(),
//!             code: if id % 2 == 0 { "44054006" } else { "38341003" }.into(),
//!             date: "2019-06-01".into(),
//!             value: None,
//!             unit: String::new(),
//!         }],
//!         ..Default::default()
//!     };
//!     builder.add(id, &patient).unwrap();
//! }
//! let engine = CohortEngine::from_index(builder.build(), ConceptHierarchy::new());
//! // Patients 0..20 consent everything; 20..30 only their sex.
//! let consent = ConsentSnapshot::from_grants((0..30).map(|id| {
//!     (id, if id < 20 { SearchField::ALL.to_vec() } else { vec![SearchField::Sex] })
//! })).unwrap();
//! let diabetes = CohortDefinition::from_json(
//!     br#"{"criteria": [{"condition": {"codes": ["snomed:44054006"]}}]}"#).unwrap();
//! let result = engine.count_blocking(&diabetes, &consent).unwrap();
//! assert_eq!(result.exact, 10); // even ids below 20
//! assert_eq!(result.attrition[0].exact, 30); // every patient with some consent
//! let ids = engine.select_blocking(&diabetes, &consent).unwrap();
//! assert_eq!(ids.len(), 10);
//! assert!(engine.explain_blocking(&diabetes, &consent).unwrap().contains("consented("));
//! ```

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use datafusion::catalog::TableProvider;
use datafusion::catalog::default_table_source::provider_as_source;
use datafusion::common::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::physical_plan::collect;
use datafusion::prelude::SessionConfig;

use crate::compile::{Output, SetSources, Sources, compile, step_name};
use crate::consent::ConsentSnapshot;
use crate::consent_filter::ConsentFilter;
use crate::definition::{CohortDefinition, DefinitionError, Domain, Index};
use crate::hierarchy::ConceptHierarchy;
use crate::provider::{IndexTableProvider, SetKind, SetTableProvider, TableKind};
use crate::sensitivity::Sensitivity;
use crate::sets::decode;
use crate::tables::{IndexError, IndexTables};

/// A query that could not be answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The engine failed; the message is for operators, and carries no patient data.
    #[error("the cohort engine failed: {0}")]
    Engine(String),
    #[error("the cohort engine stopped before the query finished")]
    Stopped,
}

fn engine_err(e: DataFusionError) -> QueryError {
    QueryError::Engine(e.to_string())
}

/// Stack of each engine thread: DataFusion plans, analyzes and optimizes recursively, and
/// a definition of 128 criteria nests about as deep (debug builds need the most).
const ENGINE_STACK_BYTES: usize = 64 << 20;

/// How plans read the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every scan reads its whole table: the baseline the indexes are measured against.
    FullScan,
    /// Event scans read only the queried codes' rows, through the code directory.
    CodeRows,
    /// As `CodeRows`, and what needs no more than "has a row of these codes" (or a sex,
    /// or a birth year), and the population, is read from precomputed person sets.
    PersonSets,
}

/// How an engine runs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// How plans read the index (default: [`Access::PersonSets`]).
    pub access: Access,
    /// Worker threads of the engine's runtime, and DataFusion's target partitions.
    pub threads: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            access: Access::PersonSets,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// The count after one step of a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttritionStep {
    /// Step 0 is the population (patients with any consent, and with the index event when
    /// there is one); step `k` is after the `k`-th top-level criterion.
    pub step: usize,
    /// What the step adds, for people (no patient data).
    pub label: String,
    pub exact: u64,
}

/// The exact answer to a count. Exact counts never leave the broker: release them only
/// through [`crate::protect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountResult {
    /// Patients matching every criterion.
    pub exact: u64,
    /// The count after each step, in order; the last equals `exact`.
    pub attrition: Vec<AttritionStep>,
}

/// BLAKE3 of what an engine counts over: its index tables' contents and its concept
/// relations. Protected counts draw fresh noise when it changes ([`crate::protect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndexVersion(pub [u8; 32]);

impl fmt::Display for IndexVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

struct Inner {
    tables: IndexTables,
    hierarchy: ConceptHierarchy,
    /// Which sensitive categories gate each code, through `hierarchy`.
    sensitivity: Arc<Sensitivity>,
    sources: Sources,
    state: SessionState,
    version: OnceLock<IndexVersion>,
}

impl Inner {
    fn new(tables: IndexTables, hierarchy: ConceptHierarchy, options: &EngineOptions) -> Inner {
        let threads = options.threads.max(1);
        let code_index = options.access != Access::FullScan;
        let provider = |kind| -> Arc<dyn TableProvider> {
            Arc::new(IndexTableProvider::new(kind, tables.clone(), code_index))
        };
        let sets = |kind| provider_as_source(Arc::new(SetTableProvider::new(kind, tables.clone())));
        let sources = Sources {
            person: provider_as_source(provider(TableKind::Person)),
            events: Domain::ALL.map(|d| provider_as_source(provider(TableKind::Event(d)))),
            observation_period: provider_as_source(provider(TableKind::ObservationPeriod)),
            sets: (options.access == Access::PersonSets).then(|| SetSources {
                all: sets(SetKind::All),
                sex: sets(SetKind::Sex),
                birth_year: sets(SetKind::BirthYear),
                by_code: Domain::ALL.map(|d| sets(SetKind::Code(d))),
            }),
        };
        let mut config = SessionConfig::new()
            .with_target_partitions(threads)
            .with_batch_size(64 * 1024);
        // Compiled plans are small and already in shape (filters directly above their
        // scans): one optimizer pass reaches the same plans, for about half the time.
        config.options_mut().optimizer.max_passes = 1;
        let state = SessionStateBuilder::new().with_config(config).build();
        Inner {
            sensitivity: Arc::new(Sensitivity::new(&hierarchy)),
            tables,
            hierarchy,
            sources,
            state,
            version: OnceLock::new(),
        }
    }
}

/// Answers cohort definitions over one set of index tables.
pub struct CohortEngine {
    inner: Arc<Inner>,
    runtime: Arc<EngineRuntime>,
    options: EngineOptions,
}

/// The engine's own threads, shared by the engines [`CohortEngine::with_tables`] makes.
struct EngineRuntime(Option<tokio::runtime::Runtime>);

impl Drop for EngineRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks; an engine may be dropped inside async code.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for CohortEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CohortEngine")
            .field("persons", &self.inner.tables.persons())
            .field("concept_relations", &self.inner.hierarchy.len())
            .finish()
    }
}

impl CohortEngine {
    /// An engine over `tables`, expanding descendants through `hierarchy`.
    pub fn from_index(tables: IndexTables, hierarchy: ConceptHierarchy) -> CohortEngine {
        CohortEngine::with_options(tables, hierarchy, EngineOptions::default())
    }

    /// An engine over the index tables of a directory written by
    /// [`IndexTables::write_parquet_dir`].
    pub fn from_parquet_dir(
        dir: &Path,
        hierarchy: ConceptHierarchy,
    ) -> Result<CohortEngine, QueryError> {
        Ok(CohortEngine::from_index(
            IndexTables::read_parquet_dir(dir)?,
            hierarchy,
        ))
    }

    /// An engine with explicit options.
    pub fn with_options(
        tables: IndexTables,
        hierarchy: ConceptHierarchy,
        options: EngineOptions,
    ) -> CohortEngine {
        let threads = options.threads.max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("cohort-engine")
            .thread_stack_size(ENGINE_STACK_BYTES)
            .enable_time()
            .build()
            .expect("a tokio runtime for the cohort engine");
        CohortEngine {
            inner: Arc::new(Inner::new(tables, hierarchy, &options)),
            runtime: Arc::new(EngineRuntime(Some(runtime))),
            options,
        }
    }

    /// An engine over `tables` with this engine's concept relations, options and threads:
    /// cheap, for tables that grew by a segment or were compacted.
    pub fn with_tables(&self, tables: IndexTables) -> CohortEngine {
        CohortEngine {
            inner: Arc::new(Inner::new(
                tables,
                self.inner.hierarchy.clone(),
                &self.options,
            )),
            runtime: self.runtime.clone(),
            options: self.options.clone(),
        }
    }

    /// This engine's tables, options and threads with other concept relations: cheap,
    /// for relations that were added.
    pub fn with_hierarchy(&self, hierarchy: ConceptHierarchy) -> CohortEngine {
        CohortEngine {
            inner: Arc::new(Inner::new(
                self.inner.tables.clone(),
                hierarchy,
                &self.options,
            )),
            runtime: self.runtime.clone(),
            options: self.options.clone(),
        }
    }

    /// The index tables.
    pub fn tables(&self) -> &IndexTables {
        &self.inner.tables
    }

    /// The concept hierarchy.
    pub fn hierarchy(&self) -> &ConceptHierarchy {
        &self.inner.hierarchy
    }

    /// The version of what this engine counts over (computed once, on first use: a pass
    /// over every row).
    pub fn index_version(&self) -> IndexVersion {
        *self.inner.version.get_or_init(|| {
            let mut pairs: Vec<(String, String)> = self
                .inner
                .hierarchy
                .pairs()
                .map(|(a, d)| (a.to_string(), d.to_string()))
                .collect();
            pairs.sort_unstable();
            let mut h = blake3::Hasher::new_derive_key("cohort-query 2026 index version v1");
            h.update(&self.inner.tables.content_hash());
            h.update(&(pairs.len() as u64).to_le_bytes());
            for (a, d) in &pairs {
                for code in [a, d] {
                    h.update(&(code.len() as u64).to_le_bytes());
                    h.update(code.as_bytes());
                }
            }
            IndexVersion(*h.finalize().as_bytes())
        })
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .0
            .as_ref()
            .expect("runtime lives as long as the engine")
    }

    async fn on_runtime(
        &self,
        definition: &CohortDefinition,
        consent: &ConsentSnapshot,
        output: Output,
        explain: Explain,
    ) -> Result<Vec<RecordBatch>, QueryError> {
        definition.validate()?;
        let inner = self.inner.clone();
        let definition = definition.clone();
        let consent = consent.clone();
        // Planning recurses through the plan tree (up to 128 criteria deep): it runs on the
        // engine's threads, whose stacks are sized for it, not on the caller's.
        self.runtime()
            .spawn(async move {
                let plan = compile(&definition, &inner.hierarchy, &inner.sources, output)
                    .map_err(engine_err)?;
                let plan = if explain != Explain::No {
                    LogicalPlanBuilder::from(plan)
                        .explain(false, explain == Explain::Analyze)
                        .and_then(LogicalPlanBuilder::build)
                        .map_err(engine_err)?
                } else {
                    plan
                };
                execute(&inner.state, plan, &consent, &inner.sensitivity).await
            })
            .await
            .map_err(|_| QueryError::Stopped)?
    }

    /// The exact count and attrition of `definition` over the patients and fields
    /// `consent` allows.
    pub async fn count(
        &self,
        definition: &CohortDefinition,
        consent: &ConsentSnapshot,
    ) -> Result<CountResult, QueryError> {
        let batches = self
            .on_runtime(definition, consent, Output::Counts, Explain::No)
            .await?;
        let batch = one_row(&batches)?;
        let mut attrition = Vec::with_capacity(definition.criteria.len() + 1);
        for step in 0..=definition.criteria.len() {
            let column = batch
                .column_by_name(&step_name(step))
                .ok_or_else(|| QueryError::Engine(format!("no column {}", step_name(step))))?;
            let exact = column.as_primitive::<Int64Type>().value(0) as u64;
            let label = if step == 0 {
                match definition.index {
                    Some(Index::FirstEvent(_)) => "patients with consent and the index event",
                    _ => "patients with consent",
                }
                .to_string()
            } else {
                definition.criteria[step - 1].describe()
            };
            attrition.push(AttritionStep { step, label, exact });
        }
        Ok(CountResult {
            exact: attrition.last().map_or(0, |s| s.exact),
            attrition,
        })
    }

    /// The `person_id`s (ascending) of the patients `definition` matches over what
    /// `consent` allows: for release selection inside the broker, never for sponsors.
    pub async fn select(
        &self,
        definition: &CohortDefinition,
        consent: &ConsentSnapshot,
    ) -> Result<Vec<i64>, QueryError> {
        let batches = self
            .on_runtime(definition, consent, Output::Persons, Explain::No)
            .await?;
        let batch = one_row(&batches)?;
        let bytes = batch.column(0).as_binary::<i32>().value(0);
        let set = decode(bytes).map_err(engine_err)?;
        Ok(set.iter().map(i64::from).collect())
    }

    /// DataFusion's `EXPLAIN` of the count plan of `definition` under `consent`: the
    /// logical plan after the consent filter and optimization, and the physical plan.
    pub async fn explain(
        &self,
        definition: &CohortDefinition,
        consent: &ConsentSnapshot,
    ) -> Result<String, QueryError> {
        let batches = self
            .on_runtime(definition, consent, Output::Counts, Explain::Plan)
            .await?;
        Ok(explain_text(&batches))
    }

    /// `EXPLAIN ANALYZE` of the count plan: the physical plan with each operator's
    /// metrics (times, row counts). For operators tuning the engine: the row counts are
    /// exact, so the output is as sensitive as an exact count.
    pub fn explain_analyze_blocking(
        &self,
        definition: &CohortDefinition,
        consent: &ConsentSnapshot,
    ) -> Result<String, QueryError> {
        let batches = self.runtime().block_on(self.on_runtime(
            definition,
            consent,
            Output::Counts,
            Explain::Analyze,
        ))?;
        Ok(explain_text(&batches))
    }

    /// [`CohortEngine::count`] for callers outside async code (panics inside it).
    pub fn count_blocking(
        &self,
        definition: &CohortDefinition,
        consent: &ConsentSnapshot,
    ) -> Result<CountResult, QueryError> {
        self.runtime().block_on(self.count(definition, consent))
    }

    /// [`CohortEngine::select`] for callers outside async code (panics inside it).
    pub fn select_blocking(
        &self,
        definition: &CohortDefinition,
        consent: &ConsentSnapshot,
    ) -> Result<Vec<i64>, QueryError> {
        self.runtime().block_on(self.select(definition, consent))
    }

    /// [`CohortEngine::explain`] for callers outside async code (panics inside it).
    pub fn explain_blocking(
        &self,
        definition: &CohortDefinition,
        consent: &ConsentSnapshot,
    ) -> Result<String, QueryError> {
        self.runtime().block_on(self.explain(definition, consent))
    }
}

/// The one code path that executes plans: a session with the consent filter for
/// `consent` appended to the analyzer rules.
async fn execute(
    base: &SessionState,
    plan: LogicalPlan,
    consent: &ConsentSnapshot,
    sensitivity: &Arc<Sensitivity>,
) -> Result<Vec<RecordBatch>, QueryError> {
    let mut state = base.clone();
    state.add_analyzer_rule(Arc::new(ConsentFilter::new(consent, sensitivity)));
    let physical = state
        .create_physical_plan(&plan)
        .await
        .map_err(engine_err)?;
    collect(physical, state.task_ctx())
        .await
        .map_err(engine_err)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Explain {
    No,
    Plan,
    Analyze,
}

fn explain_text(batches: &[RecordBatch]) -> String {
    let mut out = String::new();
    for batch in batches {
        let kinds = batch.column(0).as_string::<i32>();
        let plans = batch.column(1).as_string::<i32>();
        for row in 0..batch.num_rows() {
            out.push_str(kinds.value(row));
            out.push_str(":\n");
            out.push_str(plans.value(row));
            out.push_str("\n\n");
        }
    }
    out
}

fn one_row(batches: &[RecordBatch]) -> Result<&RecordBatch, QueryError> {
    batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .filter(|b| b.num_rows() == 1)
        .ok_or_else(|| QueryError::Engine("a cohort plan returned no single row".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::PatientIndex;
    use crate::tables::{IndexBuilder, IndexError};
    use datafusion::catalog::MemTable;

    fn engine() -> CohortEngine {
        let mut b = IndexBuilder::new();
        b.add(1, &PatientIndex::default()).unwrap();
        CohortEngine::from_index(b.build(), ConceptHierarchy::new())
    }

    fn definition() -> CohortDefinition {
        CohortDefinition::from_json(br#"{"criteria": [{"drug": {"codes": ["rxnorm:1"]}}]}"#)
            .unwrap()
    }

    #[test]
    fn the_largest_definition_counts_without_exhausting_the_stack() {
        // 128 criteria, the most a definition may have: the plan nests as deep, and
        // planning it must not overflow a thread's stack (that would abort the process).
        let criteria: Vec<String> = (0..crate::definition::MAX_CRITERIA)
            .map(|i| format!(r#"{{"not": {{"drug": {{"codes": ["rxnorm:{i}"]}}}}}}"#))
            .collect();
        let json = format!(r#"{{"criteria": [{}]}}"#, criteria.join(","));
        // `not` counts as a node of its own: half as many exclusions fill the limit.
        let half = &criteria[..criteria.len() / 2];
        let json_half = format!(r#"{{"criteria": [{}]}}"#, half.join(","));
        assert!(CohortDefinition::from_json(json.as_bytes()).is_err());
        let d = CohortDefinition::from_json(json_half.as_bytes()).unwrap();
        let consent = ConsentSnapshot::everything([1]).unwrap();
        let r = engine().count_blocking(&d, &consent).unwrap();
        assert_eq!(r.attrition.len(), 65);
        assert!(r.attrition.iter().all(|s| s.exact == 1));
        let plain: Vec<String> = (0..crate::definition::MAX_CRITERIA)
            .map(|i| {
                format!(
                    r#"{{"drug": {{"codes": ["rxnorm:{i}"], "occurrence": {{"at_most": 0}}}}}}"#
                )
            })
            .collect();
        let d = CohortDefinition::from_json(
            format!(r#"{{"criteria": [{}]}}"#, plain.join(",")).as_bytes(),
        )
        .unwrap();
        let r = engine().count_blocking(&d, &consent).unwrap();
        assert_eq!(r.attrition.len(), 129);
        assert_eq!(r.exact, 1);
    }

    /// A small deterministic population: patient `i`'s rows depend on `i` and `version`.
    fn patient(i: i64, version: i64) -> PatientIndex {
        use crate::index::{CodedEvent, ObservationPeriod, Person};
        let ev = |system: &str, code: String, day: i64, value: Option<f64>| CodedEvent {
            system: system.into(),
            code,
            date: format!("20{:02}-0{}-1{}", 10 + (day % 12), 1 + day % 9, day % 10),
            value,
            unit: if value.is_some() {
                "%".into()
            } else {
                String::new()
            },
        };
        let k = i * 7 + version * 3;
        PatientIndex {
            person: Person {
                birth_year: Some(1940 + (k % 60) as i32),
                sex: if k % 2 == 0 { "female" } else { "male" }.into(),
            },
            conditions: (0..(k % 4))
                .map(|j| ev("snomed", format!("{}", 100 + (k + j) % 5), k + j, None))
                .collect(),
            measurements: (0..(k % 3))
                .map(|j| ev("loinc", "4548-4".into(), k * j, Some(((k + j) % 12) as f64)))
                .collect(),
            drugs: (0..(k % 2))
                .map(|j| ev("rxnorm", format!("{}", 7 + (k + j) % 3), k + 2 * j, None))
                .collect(),
            observation_periods: (0..(k % 3))
                .map(|j| ObservationPeriod {
                    start: format!("20{:02}-01-01", 10 + 4 * j + k % 3),
                    end: format!("20{:02}-06-30", 12 + 4 * j + k % 2),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn definitions() -> Vec<CohortDefinition> {
        [
            r#"{"criteria": []}"#,
            r#"{"criteria": [{"condition": {"codes": ["snomed:101", "snomed:103"]}}]}"#,
            r#"{"criteria": [{"demographics": {"sex": ["female"], "birth_year": {"min": 1960}}},
                             {"not": {"drug": {"codes": ["rxnorm:8"]}}}]}"#,
            r#"{"index": {"first_event": {"condition": {"codes": ["snomed:102"]}}},
                "criteria": [{"measurement": {"codes": ["loinc:4548-4"], "value": {"min": 6.5},
                                              "window": {"days_from_index": {"from": -400, "to": 400}}}}]}"#,
            r#"{"index": {"date": "2015-03-01"},
                "criteria": [{"observation_period": {"prior_days": 400, "post_days": 100}}]}"#,
            r#"{"index": {"first_event": {"condition": {"codes": ["snomed:101", "snomed:104"]}}},
                "criteria": [{"not": {"observation_period": {"prior_days": 30}}}]}"#,
        ]
        .iter()
        .map(|j| CohortDefinition::from_json(j.as_bytes()).unwrap())
        .collect()
    }

    #[test]
    fn segments_and_retired_ids_answer_as_one_build_of_the_live_patients() {
        // Patients 0..60, then a segment re-adding 10..20 under new ids 100..110 (their
        // next version) and adding 60..70; the old ids of 10..20 retired.
        let mut base = IndexBuilder::new();
        for i in 0..60 {
            base.add(i, &patient(i, 0)).unwrap();
        }
        let base = base.build();
        let mut more = IndexBuilder::new();
        for i in 10..20 {
            more.add(90 + i, &patient(i, 1)).unwrap();
        }
        for i in 60..70 {
            more.add(i, &patient(i, 0)).unwrap();
        }
        let grown = base.append(more.build()).unwrap().retire(10..20);
        assert_eq!(grown.segments(), 2);
        assert_eq!(grown.persons(), 70);
        assert!(!grown.holds(15) && grown.holds(105) && grown.holds(65));
        // An id already held, retired or not, cannot come back.
        let mut again = IndexBuilder::new();
        again.add(15, &patient(15, 2)).unwrap();
        assert!(matches!(
            grown.append(again.build()),
            Err(IndexError::DuplicatePerson(15))
        ));

        let mut whole = IndexBuilder::new();
        for i in (0..10).chain(20..70) {
            whole.add(i, &patient(i, 0)).unwrap();
        }
        for i in 10..20 {
            whole.add(90 + i, &patient(i, 1)).unwrap();
        }
        let whole = whole.build();
        assert_eq!(grown.content_hash(), whole.content_hash());
        let compacted = grown.compact();
        assert_eq!(compacted.segments(), 1);
        assert_eq!(compacted.content_hash(), whole.content_hash());
        assert_eq!(
            compacted.rows(Domain::Condition),
            whole.rows(Domain::Condition)
        );
        assert_ne!(base.content_hash(), whole.content_hash());

        // Consent even for the retired ids: they stay invisible.
        let everyone = ConsentSnapshot::everything(0..200).unwrap();
        let reference = CohortEngine::from_index(whole, ConceptHierarchy::new());
        // The retired ids are in the first segment: merging only the last drops nothing,
        // merging both drops their rows.
        let tail = grown.merge_tail(1);
        assert_eq!((tail.segments(), tail.persons()), (2, 70));
        assert_eq!(tail.rows(Domain::Condition), grown.rows(Domain::Condition));
        let both = grown.merge_tail(2);
        assert_eq!((both.segments(), both.persons()), (1, 70));
        assert_eq!(both.content_hash(), grown.content_hash());
        assert!(both.rows(Domain::Condition) < grown.rows(Domain::Condition));
        let engines = [
            CohortEngine::from_index(grown, ConceptHierarchy::new()),
            reference.with_tables(compacted),
            reference.with_tables(tail),
            reference.with_tables(both),
        ];
        for (access, d) in [Access::FullScan, Access::CodeRows, Access::PersonSets]
            .into_iter()
            .flat_map(|a| definitions().into_iter().map(move |d| (a, d)))
        {
            let want = reference.count_blocking(&d, &everyone).unwrap();
            let ids = reference.select_blocking(&d, &everyone).unwrap();
            for e in &engines {
                let e = CohortEngine::with_options(
                    e.tables().clone(),
                    ConceptHierarchy::new(),
                    EngineOptions { access, threads: 1 },
                );
                assert_eq!(e.count_blocking(&d, &everyone).unwrap(), want, "{access:?}");
                assert_eq!(e.select_blocking(&d, &everyone).unwrap(), ids, "{access:?}");
            }
        }
        assert!(
            reference
                .count_blocking(&definitions()[0], &everyone)
                .unwrap()
                .exact
                == 70
        );
    }

    #[tokio::test]
    async fn a_plan_run_without_the_consent_filter_cannot_scan() {
        let e = engine();
        let plan = compile(
            &definition(),
            &e.inner.hierarchy,
            &e.inner.sources,
            Output::Counts,
        )
        .unwrap();
        // The session without the rule: the provider itself refuses.
        let state = e.inner.state.clone();
        let err = match state.create_physical_plan(&plan).await {
            Ok(physical) => collect(physical, state.task_ctx()).await.unwrap_err(),
            Err(err) => err,
        };
        assert!(
            err.to_string().contains("without its consent filter"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_consent_filter_refuses_tables_that_are_not_index_tables() {
        let e = engine();
        let batch = e.inner.tables.segments[0].person.batch.clone();
        let other = MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap();
        let plan = LogicalPlanBuilder::scan("person", provider_as_source(Arc::new(other)), None)
            .unwrap()
            .build()
            .unwrap();
        let consent = ConsentSnapshot::everything([1]).unwrap();
        let err = execute(&e.inner.state, plan, &consent, &e.inner.sensitivity)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not an index table"), "{err}");
    }
}
