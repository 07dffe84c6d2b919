//! Feasibility counts: how many patients match a cohort definition, over only the fields
//! each patient's consent makes searchable for the study's purpose. Sponsors get
//! protected counts (`<11`, keyed noise, rounding; the same for every attrition step),
//! within a per-sponsor rate limit and budget; the ethics board gets exact counts. Every
//! count is logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use audit_log::EventKind;
use audit_log::event::Digest32;
use cohort_query::{
    BrokerSecret, BudgetPolicy, Code, CohortDefinition, CohortEngine, ConceptHierarchy,
    ConsentSnapshot, CountResult, IndexBuilder, ProtectedCount, ProtectedResult, ProtectionPolicy,
    QueryBudget, protect,
};

use super::{Broker, now_secs};
use crate::error::{ServiceError, ServiceResult};
use consent_policy::{decide, history};
use model::{Caller, Role};
use model::{Study, StudyStatus};

/// The cohort engine over the index as of one index generation, and which patient each
/// engine `person_id` is.
struct IndexedEngine {
    generation: u64,
    engine: Arc<CohortEngine>,
    pseudonyms: Arc<Vec<String>>,
}

/// The broker's feasibility state: the engine (rebuilt when the index changed), the
/// sponsors' budgets and the noise secret.
pub struct Feasibility {
    engine: Mutex<Option<IndexedEngine>>,
    budgets: Mutex<HashMap<String, QueryBudget>>,
    budget_policy: BudgetPolicy,
    protection: ProtectionPolicy,
    secret: BrokerSecret,
}

impl Feasibility {
    pub fn new(secret: [u8; 32], budget_policy: BudgetPolicy) -> Feasibility {
        Feasibility {
            engine: Mutex::new(None),
            budgets: Mutex::new(HashMap::new()),
            budget_policy,
            protection: ProtectionPolicy::default(),
            secret: BrokerSecret::from_bytes(secret),
        }
    }
}

/// What a count answers: protected for sponsors, exact for the board.
#[derive(Debug, Clone, PartialEq)]
pub enum CountAnswer {
    Protected(ProtectedResult),
    Exact(CountResult),
}

impl Broker {
    /// Counts `definition_json` for `study_id`: protected for its sponsor (charged to the
    /// sponsor's budget), exact for a board member. Logged either way.
    pub fn count_cohort(
        &self,
        caller: &Caller,
        study_id: &str,
        definition_json: &[u8],
    ) -> ServiceResult<CountAnswer> {
        let study = self.study(study_id)?;
        match caller.role {
            Role::Sponsor if study.sponsor_id == caller.actor_id => {}
            Role::Board => {}
            _ => {
                return Err(ServiceError::PermissionDenied(format!(
                    "only study {study_id}'s sponsor (protected counts) or the board (exact counts) may count for it"
                )));
            }
        }
        if study.status == StudyStatus::Rejected {
            return Err(ServiceError::FailedPrecondition(format!(
                "study {study_id} was rejected by the board: nothing is counted for it"
            )));
        }
        let definition = CohortDefinition::from_json(definition_json)
            .map_err(|e| ServiceError::InvalidArgument(format!("cohort definition: {e}")))?;
        if caller.role == Role::Sponsor {
            self.charge(&caller.actor_id)?;
        }
        let (engine, consent) = self.engine_for(&study)?;
        let result = engine
            .count_blocking(&definition, &consent)
            .map_err(|e| ServiceError::internal(format!("cohort engine: {e}")))?;
        let answer = match caller.role {
            Role::Board => CountAnswer::Exact(result),
            _ => CountAnswer::Protected(protect(
                &result,
                &definition,
                &consent.hash(),
                &self.feasibility.secret,
                &self.feasibility.protection,
            )),
        };
        let mut e = self.event(EventKind::FeasibilityCount, caller);
        e.why.study_id = Some(study_id.to_owned());
        e.why.purpose = Some(match &answer {
            CountAnswer::Protected(p) => format!("feasibility count, answered {}", p.count),
            CountAnswer::Exact(r) => format!("exact count for the board, answered {}", r.exact),
        });
        e.details.study_id = Some(study_id.to_owned());
        e.details.content_hashes = vec![Digest32(definition.normalized().hash.0)];
        e.details.record_count = match &answer {
            CountAnswer::Protected(p) => match p.count {
                ProtectedCount::About(n) => Some(n),
                ProtectedCount::Below(_) => None,
            },
            CountAnswer::Exact(r) => Some(r.exact),
        };
        self.record(&[e])?;
        Ok(answer)
    }

    /// Charges one count to the sponsor's budget, persisted.
    fn charge(&self, sponsor: &str) -> ServiceResult<()> {
        let mut budgets = self
            .feasibility
            .budgets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let budget = match budgets.entry(sponsor.to_owned()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let stored = self.db().query_budget(sponsor)?;
                let mut b = stored
                    .and_then(|json| serde_json::from_str::<QueryBudget>(&json).ok())
                    .unwrap_or_else(|| QueryBudget::new(self.feasibility.budget_policy));
                b.set_policy(self.feasibility.budget_policy);
                e.insert(b)
            }
        };
        budget
            .charge(std::time::SystemTime::now())
            .map_err(|e| ServiceError::Exhausted(e.to_string()))?;
        let json = serde_json::to_string(budget).map_err(ServiceError::internal)?;
        self.db().put_query_budget(sponsor, &json)?;
        Ok(())
    }

    /// The engine over the current index, and the consent snapshot of `study`: each
    /// patient whose current policy permits the study, with the fields it makes
    /// searchable that the study requested.
    fn engine_for(&self, study: &Study) -> ServiceResult<(Arc<CohortEngine>, ConsentSnapshot)> {
        let generation = self.index_generation();
        let (engine, pseudonyms) = {
            let mut cached = self
                .feasibility
                .engine
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match cached.as_ref() {
                Some(c) if c.generation == generation => (c.engine.clone(), c.pseudonyms.clone()),
                _ => {
                    let (engine, pseudonyms) = self.build_engine()?;
                    let built = IndexedEngine {
                        generation,
                        engine: Arc::new(engine),
                        pseudonyms: Arc::new(pseudonyms),
                    };
                    let out = (built.engine.clone(), built.pseudonyms.clone());
                    *cached = Some(built);
                    out
                }
            }
        };
        let now = now_secs();
        let db = self.db();
        let mut builder = ConsentSnapshot::builder();
        for (person, pseudonym) in pseudonyms.iter().enumerate() {
            let versions = db.consents(pseudonym)?;
            if versions.is_empty() {
                continue;
            }
            let history = history(&versions).map_err(ServiceError::internal)?;
            let Some(access) = decide(&history, study, now).permit() else {
                continue;
            };
            for field in access.fields().intersection(&study.proposal.fields) {
                builder
                    .grant(person as i64, *field)
                    .map_err(ServiceError::internal)?;
            }
        }
        Ok((engine, builder.build()))
    }

    /// Adds ancestor → descendant code relations (a custodian's or the operator's
    /// vocabulary, e.g. OMOP `concept_ancestor`) for `include_descendants`; returns how
    /// many were new and how many are held.
    pub fn put_concepts(
        &self,
        caller: &Caller,
        relations: Vec<(String, String)>,
    ) -> ServiceResult<(usize, u64)> {
        if !matches!(caller.role, Role::Custodian | Role::Operator) {
            return Err(ServiceError::PermissionDenied(
                "only a custodian or the operator may add concept relations".into(),
            ));
        }
        for (i, (a, d)) in relations.iter().enumerate() {
            for code in [a, d] {
                code.parse::<Code>()
                    .map_err(|e| ServiceError::InvalidArgument(format!("relation {i}: {e}")))?;
            }
        }
        let (added, total) = self.db().put_concept_relations(&relations)?;
        if added > 0 {
            // The engine expands descendants at compile time: rebuild it.
            self.index_changed();
        }
        Ok((added, total))
    }

    fn build_engine(&self) -> ServiceResult<(CohortEngine, Vec<String>)> {
        let db = self.db();
        let hierarchy = ConceptHierarchy::from_pairs(
            db.concept_relations()?
                .into_iter()
                .filter_map(|(a, d)| Some((a.parse().ok()?, d.parse().ok()?))),
        );
        let pseudonyms = db.pseudonyms()?;
        let mut builder = IndexBuilder::new();
        for (person, p) in pseudonyms.iter().enumerate() {
            builder
                .add(person as i64, &db.index(p)?)
                .map_err(|e| ServiceError::internal(format!("index: {e}")))?;
        }
        drop(db);
        let engine = CohortEngine::from_index(builder.build(), hierarchy);
        Ok((engine, pseudonyms))
    }
}
