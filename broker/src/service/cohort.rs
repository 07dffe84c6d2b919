//! Cohorts: which patients a cohort definition selects for a study, through the cohort
//! engine, under the study's consent snapshot.
//!
//! A sponsor's protected count, the board's exact count and a release all read one
//! [`CohortView`]: the engine over the index and the study's [`StudyConsent`]. A release
//! therefore selects exactly the patients the board's exact count of the study's own
//! definition counts, and then takes of each only what an active grant and the consent
//! both allow. There is no other way to pick patients.
//!
//! A study's consent is decided once per patient and kept until a consent changes, the
//! patient set changes, the study is decided, or the clock reaches an instant at which a
//! decision may change (a policy or provision period, a DUO time limit, the study's own
//! period).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cohort_query::{
    CohortDefinition, CohortEngine, ConceptHierarchy, ConsentSnapshot, IndexBuilder,
};
use consent_policy::{StudyAccess, decide, history, study_access};
use model::{Study, StudyStatus};

use super::{Broker, now_secs};
use crate::error::{ServiceError, ServiceResult};

/// The engine over the index as of one index generation, and which patient each engine
/// `person_id` is.
struct IndexedEngine {
    generation: u64,
    engine: Arc<CohortEngine>,
    pseudonyms: Arc<Vec<String>>,
}

/// What a study's consent snapshot was decided from: it is reused only while all of it
/// still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Basis {
    index_generation: u64,
    consent_generation: u64,
    status: StudyStatus,
    overrides_abstain: bool,
}

/// One study's consent: which patients its definitions may look at and through which
/// fields (the snapshot the engine filters by), and what each patient's consent lets the
/// study take.
pub(crate) struct StudyConsent {
    basis: Basis,
    /// The snapshot holds while the clock is before this instant.
    valid_until: Option<i64>,
    pub snapshot: ConsentSnapshot,
    /// The access of each patient in the snapshot, by engine `person_id`.
    pub access: HashMap<i64, StudyAccess>,
}

/// The engine and one study's consent, taken together: a count and a selection made
/// through one view are over the same patients and fields.
pub(crate) struct CohortView {
    pub engine: Arc<CohortEngine>,
    pub pseudonyms: Arc<Vec<String>>,
    pub consent: Arc<StudyConsent>,
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
            .select_blocking(definition, &self.consent.snapshot)
            .map_err(|e| ServiceError::internal(format!("cohort engine: {e}")))?;
        ids.into_iter()
            .map(|id| {
                let pseudonym = usize::try_from(id)
                    .ok()
                    .and_then(|i| self.pseudonyms.get(i))
                    .ok_or_else(|| ServiceError::internal("the engine selected an unknown id"))?;
                let access = self.consent.access.get(&id).ok_or_else(|| {
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
    studies: Mutex<HashMap<String, Arc<StudyConsent>>>,
    /// Bumped whenever a consent is stored.
    consent_generation: AtomicU64,
}

impl Broker {
    /// Patients' consents changed: every study's consent is decided again on next use.
    pub(crate) fn consents_changed(&self) {
        self.cohorts
            .consent_generation
            .fetch_add(1, Ordering::SeqCst);
    }

    /// The engine over the current index and `study`'s consent as it stands now.
    pub(crate) fn cohort_view(&self, study: &Study) -> ServiceResult<CohortView> {
        let (engine, pseudonyms, index_generation) = self.indexed_engine()?;
        let now = now_secs();
        let basis = Basis {
            index_generation,
            consent_generation: self.cohorts.consent_generation.load(Ordering::SeqCst),
            status: study.status,
            overrides_abstain: study.overrides_abstain,
        };
        let cached = self
            .cohorts
            .studies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&study.study_id)
            .filter(|c| c.basis == basis && c.valid_until.is_none_or(|t| now < t))
            .cloned();
        let consent = match cached {
            Some(c) => c,
            None => {
                let built = Arc::new(self.study_consent(study, &pseudonyms, basis, now)?);
                self.cohorts
                    .studies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(study.study_id.clone(), built.clone());
                built
            }
        };
        Ok(CohortView {
            engine,
            pseudonyms,
            consent,
        })
    }

    /// Decides every patient's consent for `study` at `now`: each patient whose current
    /// policy permits the study is in the snapshot, with the fields it makes searchable
    /// that the study requested, and the sensitive categories it releases to the study
    /// (sensitive codes are searchable only under those).
    fn study_consent(
        &self,
        study: &Study,
        pseudonyms: &[String],
        basis: Basis,
        now: i64,
    ) -> ServiceResult<StudyConsent> {
        let period = [study.proposal.not_before, study.proposal.not_after];
        let mut valid_until = period.into_iter().filter(|&t| t > now).min();
        let mut builder = ConsentSnapshot::builder();
        let mut access = HashMap::new();
        let db = self.db();
        for (person, pseudonym) in pseudonyms.iter().enumerate() {
            let versions = db.consents(pseudonym)?;
            if versions.is_empty() {
                continue;
            }
            let history = history(&versions).map_err(ServiceError::internal)?;
            if let Some(t) = history.next_change_after(now) {
                valid_until = Some(valid_until.map_or(t, |v| v.min(t)));
            }
            let Ok(allowed) = study_access(&decide(&history, study, now), study) else {
                continue;
            };
            let id = person as i64;
            builder.include(id).map_err(ServiceError::internal)?;
            for field in &allowed.fields {
                builder.grant(id, *field).map_err(ServiceError::internal)?;
            }
            for category in allowed.categories.iter().filter(|c| c.is_sensitive()) {
                builder
                    .permit(id, *category)
                    .map_err(ServiceError::internal)?;
            }
            access.insert(id, allowed);
        }
        Ok(StudyConsent {
            basis,
            valid_until,
            snapshot: builder.build(),
            access,
        })
    }

    /// The engine over the current index, which patient each of its ids is, and the index
    /// generation it was built at.
    fn indexed_engine(&self) -> ServiceResult<(Arc<CohortEngine>, Arc<Vec<String>>, u64)> {
        let generation = self.index_generation();
        let mut cached = self
            .cohorts
            .engine
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cached.as_ref().filter(|c| c.generation == generation) {
            return Ok((c.engine.clone(), c.pseudonyms.clone(), generation));
        }
        let (engine, pseudonyms) = self.build_engine()?;
        let built = IndexedEngine {
            generation,
            engine: Arc::new(engine),
            pseudonyms: Arc::new(pseudonyms),
        };
        let out = (built.engine.clone(), built.pseudonyms.clone(), generation);
        *cached = Some(built);
        Ok(out)
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
