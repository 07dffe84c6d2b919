//! Feasibility counts: how many patients match a cohort definition, over only the fields
//! each patient's consent makes searchable for the study's purpose, and — for codes the
//! engine classifies as sensitive — only for patients whose consent permits the study the
//! code's category. Sponsors get protected counts (`<11`, keyed noise drawn once per
//! normalized attrition step, consent snapshot and index version, rounding), within a
//! per-sponsor rate limit and a privacy budget charged one unit per fresh draw; the ethics
//! board gets exact counts. Every count is logged, a sponsor's with its charge.

use std::collections::HashMap;
use std::sync::Mutex;

use audit_log::EventKind;
use audit_log::event::{BudgetCharge, Digest32};
use cohort_query::{
    BrokerSecret, BudgetPolicy, Charge, Code, CohortDefinition, CountBasis, CountResult, Draws,
    ProtectedCount, ProtectedResult, ProtectionPolicy, QueryBudget, protect,
};

use super::Broker;
use crate::error::{ServiceError, ServiceResult};
use model::StudyStatus;
use model::{Caller, Role};

/// The broker's feasibility state: the sponsors' budgets and the noise secret.
pub struct Feasibility {
    budgets: Mutex<HashMap<String, QueryBudget>>,
    budget_policy: BudgetPolicy,
    protection: ProtectionPolicy,
    secret: BrokerSecret,
}

impl Feasibility {
    pub fn new(secret: [u8; 32], budget_policy: BudgetPolicy) -> Feasibility {
        Feasibility {
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
    /// Counts `definition_json` (empty: the study's own cohort) for `study_id`: protected
    /// for its sponsor (charged to the sponsor's budget), exact for a board member. Logged
    /// either way.
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
        let definition = if definition_json.is_empty() {
            study.proposal.cohort.clone()
        } else {
            CohortDefinition::from_json(definition_json)
                .map_err(|e| ServiceError::InvalidArgument(format!("cohort definition: {e}")))?
        };
        if caller.role == Role::Sponsor {
            // Past the rate limit, refuse before building the study's consent snapshot.
            self.rate_check(&caller.actor_id)?;
        }
        let view = self.cohort_view(&study)?;
        let (engine, consent) = (&view.engine, &view.snapshot);
        // What a sponsor's answer shows: one noise draw per normalized attrition step over
        // this consent snapshot and index. Charged before counting; fresh draws only.
        let sponsor = match caller.role {
            Role::Sponsor => {
                let basis = CountBasis::new(&consent.hash(), &engine.index_version());
                let draws = Draws::of(&definition, &basis);
                let charge = self.charge(&caller.actor_id, &draws)?;
                Some((draws, charge))
            }
            _ => None,
        };
        let result = engine
            .count_blocking(&definition, consent)
            .map_err(|e| ServiceError::internal(format!("cohort engine: {e}")))?;
        let (answer, purpose) = match &sponsor {
            None => {
                let purpose = format!("exact count for the board, answered {}", result.exact);
                (CountAnswer::Exact(result), purpose)
            }
            Some((draws, charge)) => {
                let protected = protect(
                    &result,
                    draws,
                    &self.feasibility.secret,
                    &self.feasibility.protection,
                );
                let purpose = format!(
                    "feasibility count, answered {}; charged {} of the sponsor's budget, {} left",
                    protected.count, charge.units, charge.remaining.total
                );
                (CountAnswer::Protected(protected), purpose)
            }
        };
        let mut e = self.event(EventKind::FeasibilityCount, caller);
        e.why.study_id = Some(study_id.to_owned());
        e.why.purpose = Some(purpose);
        e.details.study_id = Some(study_id.to_owned());
        e.details.definition_hash = Some(Digest32(definition.normalized().hash.0));
        e.details.record_count = match &answer {
            CountAnswer::Protected(p) => match p.count {
                ProtectedCount::About(n) => Some(n),
                ProtectedCount::Below(_) => None,
            },
            CountAnswer::Exact(r) => Some(r.exact),
        };
        e.details.budget = sponsor.map(|(_, c)| BudgetCharge {
            charged: c.units,
            remaining: c.remaining.total,
        });
        self.record(&[e])?;
        Ok(answer)
    }

    /// Charges a sponsor's count that shows `draws`: one call against the rate limit, one
    /// unit per draw not charged before; persisted before the count runs.
    fn charge(&self, sponsor: &str, draws: &Draws) -> ServiceResult<Charge> {
        let mut budgets = self.budgets();
        let budget = self.budget_of(&mut budgets, sponsor)?;
        let mut next = budget.clone();
        let charge = next
            .charge(std::time::SystemTime::now(), draws)
            .map_err(|e| ServiceError::Exhausted(e.to_string()))?;
        let json = serde_json::to_string(&next).map_err(ServiceError::internal)?;
        self.db().put_query_budget(sponsor, &json)?;
        // Only what is stored counts as charged; the lock is held throughout, so
        // concurrent counts of one sponsor are charged one after the other.
        *budget = next;
        Ok(charge)
    }

    /// Refuses a sponsor past the rate limit, charging nothing.
    fn rate_check(&self, sponsor: &str) -> ServiceResult<()> {
        let mut budgets = self.budgets();
        self.budget_of(&mut budgets, sponsor)?
            .rate_check(std::time::SystemTime::now())
            .map_err(|e| ServiceError::Exhausted(e.to_string()))
    }

    fn budgets(&self) -> std::sync::MutexGuard<'_, HashMap<String, QueryBudget>> {
        self.feasibility
            .budgets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The sponsor's budget, loaded from the database on first use.
    fn budget_of<'a>(
        &self,
        budgets: &'a mut HashMap<String, QueryBudget>,
        sponsor: &str,
    ) -> ServiceResult<&'a mut QueryBudget> {
        Ok(match budgets.entry(sponsor.to_owned()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let stored = self.db().query_budget(sponsor)?;
                let mut b = stored
                    .and_then(|json| serde_json::from_str::<QueryBudget>(&json).ok())
                    .unwrap_or_else(|| QueryBudget::new(self.feasibility.budget_policy));
                b.set_policy(self.feasibility.budget_policy);
                e.insert(b)
            }
        })
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
            self.concepts_changed()?;
        }
        Ok((added, total))
    }
}
