//! Cohorts: which patients a cohort definition selects for a study, through the cohort
//! engine, under the study's consent snapshot.
//!
//! A sponsor's protected count, the board's exact count and a release all read one
//! [`CohortView`]: the engine over the index and the study's [`StudyConsent`]. A release
//! therefore selects exactly the patients the board's exact count of the study's own
//! definition counts, and then takes of each only what an active grant and the consent
//! both allow. There is no other way to pick patients.
//!
//! A study's consent is decided once per patient and kept: a stored consent decides that
//! patient again in every kept study ([`Broker::consents_changed`]); the whole study is
//! decided again only when the board decides it or the clock reaches an instant at which
//! a decision may change (a policy or provision period, a DUO time limit, the study's own
//! period). Patients who share a policy history share one decision.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cohort_query::{
    CohortDefinition, CohortEngine, ConceptHierarchy, ConsentBuilder, ConsentSnapshot, IndexBuilder,
};
use consent_policy::{PolicyHash, PolicyHistory, StudyAccess, decide, history, study_access};
use model::{Study, StudyStatus};

use super::{Broker, now_secs};
use crate::error::{ServiceError, ServiceResult};

/// The engine over the index as of one index generation, and which patient each engine
/// `person_id` (the patient's number, `patients.person_id`) is.
struct IndexedEngine {
    generation: u64,
    engine: Arc<CohortEngine>,
    pseudonyms: Arc<Vec<String>>,
}

/// What a study's consent was decided for: it is kept only while both still hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Basis {
    status: StudyStatus,
    overrides_abstain: bool,
}

/// Each patient's access to one study, as decided, and the consent builder made of them.
/// Accesses are interned: most patients share a policy, and so an access.
#[derive(Clone, Default)]
struct Decisions {
    builder: ConsentBuilder,
    /// By person number: the index of the patient's access in `accesses`, or `NONE`.
    of_person: Vec<u32>,
    accesses: Vec<StudyAccess>,
    interned: HashMap<StudyAccess, u32>,
}

const NONE: u32 = u32::MAX;

impl Decisions {
    fn access(&self, person: i64) -> Option<&StudyAccess> {
        let i = *usize::try_from(person)
            .ok()
            .and_then(|p| self.of_person.get(p))?;
        (i != NONE).then(|| &self.accesses[i as usize])
    }

    /// Records `person`'s access (or that it has none), replacing what was recorded.
    fn set(&mut self, person: i64, access: Option<StudyAccess>) -> ServiceResult<()> {
        let slot = usize::try_from(person)
            .map_err(|_| ServiceError::internal("a negative person number"))?;
        self.builder.remove(person);
        if self.of_person.len() <= slot {
            self.of_person.resize(slot + 1, NONE);
        }
        let Some(access) = access else {
            self.of_person[slot] = NONE;
            return Ok(());
        };
        self.builder
            .include(person)
            .map_err(ServiceError::internal)?;
        for field in &access.fields {
            self.builder
                .grant(person, *field)
                .map_err(ServiceError::internal)?;
        }
        // Sensitive codes are searchable only under their category, released to the study.
        for category in access.categories.iter().filter(|c| c.is_sensitive()) {
            self.builder
                .permit(person, *category)
                .map_err(ServiceError::internal)?;
        }
        let next = self.accesses.len() as u32;
        let i = *self.interned.entry(access.clone()).or_insert(next);
        if i == next {
            self.accesses.push(access);
        }
        self.of_person[slot] = i;
        Ok(())
    }
}

/// One study's consent: which patients its definitions may look at and through which
/// fields (the snapshot the engine filters by), and what each patient's consent lets the
/// study take. Kept patient by patient as consents change.
struct StudyConsent {
    basis: Basis,
    /// The decisions hold while the clock is before this instant.
    valid_until: Option<i64>,
    decisions: Arc<Decisions>,
    /// The snapshot of `decisions`, taken when a view needs it.
    snapshot: Option<ConsentSnapshot>,
}

/// The engine and one study's consent, taken together: a count and a selection made
/// through one view are over the same patients and fields.
pub(crate) struct CohortView {
    pub engine: Arc<CohortEngine>,
    pub snapshot: ConsentSnapshot,
    pseudonyms: Arc<Vec<String>>,
    decisions: Arc<Decisions>,
}

impl CohortView {
    /// The patients `definition` selects, with what each one's consent lets the study
    /// take: for release selection inside the broker, never for sponsors.
    pub fn select(
        &self,
        definition: &CohortDefinition,
    ) -> ServiceResult<Vec<(&str, &StudyAccess)>> {
        let ids = self
            .engine
            .select_blocking(definition, &self.snapshot)
            .map_err(|e| ServiceError::internal(format!("cohort engine: {e}")))?;
        ids.into_iter()
            .map(|id| {
                let pseudonym = usize::try_from(id)
                    .ok()
                    .and_then(|i| self.pseudonyms.get(i))
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| ServiceError::internal("the engine selected an unknown id"))?;
                let access = self.decisions.access(id).ok_or_else(|| {
                    ServiceError::internal("the engine selected a patient outside the snapshot")
                })?;
                Ok((pseudonym.as_str(), access))
            })
            .collect()
    }
}

/// The broker's cohort state: the engine (rebuilt when the index changed) and each
/// study's consent.
#[derive(Default)]
pub struct Cohorts {
    engine: Mutex<Option<IndexedEngine>>,
    /// Held while a study's consent is decided or updated, so that a consent stored
    /// meanwhile is applied after, never lost.
    studies: Mutex<HashMap<String, StudyConsent>>,
}

impl Broker {
    /// These patients' consents changed: every kept study consent decides them again.
    pub(crate) fn consents_changed(&self, pseudonyms: &[&str]) -> ServiceResult<()> {
        let mut studies = self
            .cohorts
            .studies
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if studies.is_empty() {
            return Ok(());
        }
        let now = now_secs();
        let changed: Vec<(i64, Option<PolicyHistory>)> = {
            let db = self.db();
            let mut out = Vec::new();
            for (person, pseudonym) in db.person_ids(pseudonyms)? {
                let versions = db.consents(&pseudonym)?;
                let history = (!versions.is_empty())
                    .then(|| history(&versions))
                    .transpose()
                    .map_err(ServiceError::internal)?;
                out.push((person, history));
            }
            out
        };
        let ids: Vec<String> = studies.keys().cloned().collect();
        for id in ids {
            let study = self.study(&id)?;
            let kept = studies.get_mut(&id).expect("listed");
            let decisions = Arc::make_mut(&mut kept.decisions);
            for (person, history) in &changed {
                let access = history.as_ref().and_then(|h| {
                    earliest(&mut kept.valid_until, h.next_change_after(now));
                    study_access(&decide(h, &study, now), &study).ok()
                });
                decisions.set(*person, access)?;
            }
            kept.snapshot = None;
        }
        Ok(())
    }

    /// The engine over the current index and `study`'s consent as it stands now.
    pub(crate) fn cohort_view(&self, study: &Study) -> ServiceResult<CohortView> {
        let (engine, pseudonyms) = self.indexed_engine()?;
        let now = now_secs();
        let basis = Basis {
            status: study.status,
            overrides_abstain: study.overrides_abstain,
        };
        let mut studies = self
            .cohorts
            .studies
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let fresh = studies
            .get(&study.study_id)
            .is_some_and(|c| c.basis == basis && c.valid_until.is_none_or(|t| now < t));
        if !fresh {
            let (decisions, valid_until) = self.decide_consents(study, now)?;
            studies.insert(
                study.study_id.clone(),
                StudyConsent {
                    basis,
                    valid_until,
                    decisions: Arc::new(decisions),
                    snapshot: None,
                },
            );
        }
        let kept = studies.get_mut(&study.study_id).expect("just kept");
        let snapshot = kept
            .snapshot
            .get_or_insert_with(|| kept.decisions.builder.snapshot())
            .clone();
        Ok(CohortView {
            engine,
            snapshot,
            pseudonyms,
            decisions: kept.decisions.clone(),
        })
    }

    /// Decides every patient's consent for `study` at `now`: each patient whose current
    /// policy permits the study is in the snapshot, with the fields it makes searchable
    /// that the study requested, and the sensitive categories it releases to the study.
    /// Also the instant until which the decisions hold.
    fn decide_consents(&self, study: &Study, now: i64) -> ServiceResult<(Decisions, Option<i64>)> {
        let period = [study.proposal.not_before, study.proposal.not_after];
        let mut valid_until = period.into_iter().filter(|&t| t > now).min();
        let mut decisions = Decisions::default();
        // Patients who share a history share a decision.
        let mut decided: HashMap<Vec<PolicyHash>, Option<StudyAccess>> = HashMap::new();
        let mut failed = None;
        self.db().for_each_consent_history(|person, versions| {
            let key: Vec<PolicyHash> = versions.iter().map(|p| p.policy_hash()).collect();
            let access = match decided.get(&key) {
                Some(a) => a.clone(),
                None => {
                    let a = match PolicyHistory::new(versions.iter().cloned()) {
                        Ok(h) => {
                            earliest(&mut valid_until, h.next_change_after(now));
                            study_access(&decide(&h, study, now), study).ok()
                        }
                        Err(e) => {
                            failed.get_or_insert(ServiceError::internal(e));
                            None
                        }
                    };
                    decided.insert(key, a.clone());
                    a
                }
            };
            if let Err(e) = decisions.set(person, access) {
                failed.get_or_insert(e);
            }
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok((decisions, valid_until)),
        }
    }

    /// The engine over the current index, and which patient each of its ids is.
    fn indexed_engine(&self) -> ServiceResult<(Arc<CohortEngine>, Arc<Vec<String>>)> {
        let generation = self.index_generation();
        let mut cached = self
            .cohorts
            .engine
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cached.as_ref().filter(|c| c.generation == generation) {
            return Ok((c.engine.clone(), c.pseudonyms.clone()));
        }
        let (engine, pseudonyms) = self.build_engine()?;
        let built = IndexedEngine {
            generation,
            engine: Arc::new(engine),
            pseudonyms: Arc::new(pseudonyms),
        };
        let out = (built.engine.clone(), built.pseudonyms.clone());
        *cached = Some(built);
        Ok(out)
    }

    /// The engine over every patient's index, by person number, and the pseudonym of each
    /// number (empty where there is none).
    fn build_engine(&self) -> ServiceResult<(CohortEngine, Vec<String>)> {
        let db = self.db();
        let hierarchy = ConceptHierarchy::from_pairs(
            db.concept_relations()?
                .into_iter()
                .filter_map(|(a, d)| Some((a.parse().ok()?, d.parse().ok()?))),
        );
        let persons = db.persons()?;
        let mut builder = IndexBuilder::new();
        let mut pseudonyms = Vec::new();
        for (person, p) in persons {
            builder
                .add(person, &db.index(&p)?)
                .map_err(|e| ServiceError::internal(format!("index: {e}")))?;
            let slot = usize::try_from(person).map_err(ServiceError::internal)?;
            if pseudonyms.len() <= slot {
                pseudonyms.resize(slot + 1, String::new());
            }
            pseudonyms[slot] = p;
        }
        drop(db);
        let engine = CohortEngine::from_index(builder.build(), hierarchy);
        Ok((engine, pseudonyms))
    }
}

/// Lowers `until` to `t`, if `t` is earlier.
fn earliest(until: &mut Option<i64>, t: Option<i64>) {
    if let Some(t) = t {
        *until = Some(until.map_or(t, |u| u.min(t)));
    }
}
