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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use roaring::RoaringBitmap;

use cohort_query::{
    CohortDefinition, CohortEngine, ConceptHierarchy, ConsentBuilder, ConsentSnapshot,
    IndexBuilder, IndexTables,
};
use consent_policy::{PolicyHash, PolicyHistory, StudyAccess, decide, history, study_access};
use model::{Study, StudyStatus};

use super::{Broker, now_secs};
use crate::error::{ServiceError, ServiceResult};
use crate::storage::IndexSnapshots;
use crate::storage::db::IndexChange;

/// The live engine: over every patient's current index version, grown by a segment per
/// upload (older versions retired), with the newest segments merged as they grow.
struct LiveEngine {
    engine: Arc<CohortEngine>,
    /// Every index version numbered up to this one is in the engine (or was replaced
    /// before it got there). Uploads number their versions consecutively in commit order,
    /// so an upload whose versions do not follow waits in `pending` for the ones before.
    through: i64,
    pending: BTreeMap<i64, Vec<IndexChange>>,
    /// Versions added since the last snapshot was written.
    since_snapshot: usize,
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
    /// By engine id (index version number): the index of the patient's access in
    /// `accesses`, or `NONE`.
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
        let slot =
            usize::try_from(person).map_err(|_| ServiceError::internal("a negative engine id"))?;
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
pub(crate) struct CohortView<'a> {
    pub engine: Arc<CohortEngine>,
    pub snapshot: ConsentSnapshot,
    pseudonyms: &'a RwLock<Vec<String>>,
    decisions: Arc<Decisions>,
}

impl CohortView<'_> {
    /// The patients `definition` selects, with what each one's consent lets the study
    /// take: for release selection inside the broker, never for sponsors.
    pub fn select(
        &self,
        definition: &CohortDefinition,
    ) -> ServiceResult<Vec<(String, &StudyAccess)>> {
        let ids = self
            .engine
            .select_blocking(definition, &self.snapshot)
            .map_err(|e| ServiceError::internal(format!("cohort engine: {e}")))?;
        let pseudonyms = self.pseudonyms.read().unwrap_or_else(|e| e.into_inner());
        ids.into_iter()
            .map(|id| {
                let pseudonym = usize::try_from(id)
                    .ok()
                    .and_then(|i| pseudonyms.get(i))
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| ServiceError::internal("the engine selected an unknown id"))?;
                let access = self.decisions.access(id).ok_or_else(|| {
                    ServiceError::internal("the engine selected a patient outside the snapshot")
                })?;
                Ok((pseudonym.clone(), access))
            })
            .collect()
    }
}

/// The broker's cohort state: the live engine (built on first use from the index snapshot
/// and the database, then grown by each upload), which patient each engine id is, and
/// each study's consent.
#[derive(Default)]
pub struct Cohorts {
    engine: Mutex<Option<LiveEngine>>,
    /// Where the engine's tables are snapshotted (none: never).
    snapshots: Option<IndexSnapshots>,
    /// The thread that writes (or last wrote) a snapshot.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// How the engine was last built.
    loaded: Mutex<Option<IndexLoad>>,
    /// By engine id (index version number): the patient's pseudonym, or empty. Only
    /// appended to: ids are never reused.
    pseudonyms: RwLock<Vec<String>>,
    /// Held while a study's consent is decided or updated, so that a consent stored
    /// meanwhile is applied after, never lost.
    studies: Mutex<HashMap<String, StudyConsent>>,
}

/// How the cohort engine's index was last built: patients taken from the snapshot and
/// read from the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexLoad {
    pub from_snapshot: u64,
    pub from_database: u64,
}

/// A snapshot is written once this many index versions were added since the last one
/// (and at least an eighth of the patients held): a start then reads at most that many
/// patients' rows from the database.
const SNAPSHOT_AFTER: usize = 20_000;

/// Uploads that may wait for an earlier one to reach the engine before it is rebuilt.
const MAX_PENDING_UPLOADS: usize = 64;

impl Cohorts {
    /// The live engine, held.
    fn live(&self) -> std::sync::MutexGuard<'_, Option<LiveEngine>> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Which patient each engine id is, for writing.
    fn pseudonyms_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<String>> {
        self.pseudonyms.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn new(snapshots: Option<IndexSnapshots>) -> Cohorts {
        Cohorts {
            snapshots,
            ..Default::default()
        }
    }

    /// Writes `tables` as the current snapshot on a thread of its own, unless a write is
    /// under way (the next trigger writes then).
    fn snapshot(&self, tables: &IndexTables) -> bool {
        let Some(snapshots) = self.snapshots.clone() else {
            return false;
        };
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if writer.as_ref().is_some_and(|w| !w.is_finished()) {
            return false;
        }
        if let Some(done) = writer.take() {
            let _ = done.join();
        }
        let tables = tables.clone();
        *writer = Some(std::thread::spawn(move || {
            let started = std::time::Instant::now();
            match snapshots.write(&tables) {
                Ok(()) => tracing::info!(
                    patients = tables.persons(),
                    seconds = started.elapsed().as_secs_f64(),
                    "index snapshot written"
                ),
                Err(e) => tracing::warn!(error = %e, "index snapshot not written"),
            }
        }));
        true
    }

    /// Waits for a snapshot being written (before the data directory is let go).
    fn settle(&self) {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            let _ = w.join();
        }
    }
}

impl Broker {
    /// These patients' consents changed: every kept study consent decides them again.
    pub(crate) fn consents_changed(&self, pseudonyms: &[&str]) -> ServiceResult<()> {
        let mut studies = self
            .cohorts
            .studies
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let ids = self.db().index_ids(pseudonyms)?;
        let changed: Vec<(Option<i64>, i64, String)> =
            ids.into_iter().map(|(id, p)| (None, id, p)).collect();
        self.redecide(&mut studies, &changed)
    }

    /// An upload stored new versions of these patients' indexes (numbered consecutively):
    /// the live engine adds them as a segment and retires the versions they replace, and
    /// every kept study consent moves each patient's decision to the new version (deciding
    /// patients it did not know). Nothing is built when no engine is yet: the first count
    /// builds it.
    pub(crate) fn index_changed(&self, changes: &[IndexChange]) -> ServiceResult<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut studies = self
            .cohorts
            .studies
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        {
            let mut live = self.cohorts.live();
            if let Some(current) = live.as_mut() {
                // An upload that committed before the engine was built is in it already.
                if changes[0].index_id > current.through {
                    current
                        .pending
                        .insert(changes[0].index_id, changes.to_vec());
                }
                let mut grown = Ok(());
                while grown.is_ok()
                    && let Some(next) = current.pending.remove(&(current.through + 1))
                {
                    grown = self.grow(current, &next);
                }
                // The upload is stored whatever happens here: an engine that cannot follow
                // (or waits on an upload that never reported) is dropped, and the next
                // count builds it again from the snapshot and the database.
                if let Err(e) = grown {
                    tracing::error!(error = %e, "the cohort engine is rebuilt");
                    *live = None;
                } else if current.pending.len() > MAX_PENDING_UPLOADS {
                    tracing::warn!("uploads reported out of order: the cohort engine is rebuilt");
                    *live = None;
                }
            }
        }
        let changed: Vec<(Option<i64>, i64, String)> = changes
            .iter()
            .map(|c| (c.replaced, c.index_id, c.pseudonym.clone()))
            .collect();
        self.redecide(&mut studies, &changed)
    }

    /// An erased patient's index version `id` leaves the cohort engine: every kept study
    /// consent forgets it, the live engine drops its rows (compacted away, not only
    /// retired), and the snapshot on disk is written again without them, the older ones
    /// destroyed. With no live engine but a snapshot on disk, the engine is built first
    /// (without the patient, whose rows are gone from the database) so that a snapshot
    /// without them replaces it.
    pub(crate) fn index_erased(&self, id: i64) -> ServiceResult<()> {
        {
            let mut studies = self
                .cohorts
                .studies
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for kept in studies.values_mut() {
                Arc::make_mut(&mut kept.decisions).set(id, None)?;
                kept.snapshot = None;
            }
        }
        let on_disk = self.cohorts.snapshots.as_ref().is_some_and(|s| s.exists());
        if on_disk {
            self.live_engine()?;
        }
        self.cohorts.settle();
        let mut live = self.cohorts.live();
        let Some(current) = live.as_mut() else {
            return Ok(());
        };
        let tables = current.engine.tables().retire([id]).compact();
        if let Ok(i) = usize::try_from(id)
            && let Some(name) = self.cohorts.pseudonyms_mut().get_mut(i)
        {
            name.clear();
        }
        current.engine = Arc::new(current.engine.with_tables(tables));
        if let Some(snapshots) = self.cohorts.snapshots.as_ref().filter(|_| on_disk) {
            snapshots
                .write_destroying_older(current.engine.tables())
                .map_err(|e| ServiceError::internal(format!("index snapshot: {e}")))?;
            current.since_snapshot = 0;
        }
        Ok(())
    }

    /// Adds one upload's index versions to the live engine, in commit order.
    fn grow(&self, live: &mut LiveEngine, changes: &[IndexChange]) -> ServiceResult<()> {
        let mut builder = IndexBuilder::new();
        for c in changes {
            builder
                .add(c.index_id, &c.index)
                .map_err(|e| ServiceError::internal(format!("index: {e}")))?;
        }
        let grown = live
            .engine
            .tables()
            .append(builder.build())
            .map_err(|e| ServiceError::internal(format!("index: {e}")))?
            .retire(changes.iter().filter_map(|c| c.replaced));
        let tables = merge_grown_tail(grown);
        {
            let mut pseudonyms = self.cohorts.pseudonyms_mut();
            for c in changes {
                name(&mut pseudonyms, c.index_id, &c.pseudonym)?;
            }
        }
        live.through = changes.last().map_or(live.through, |c| c.index_id);
        live.since_snapshot += changes.len();
        if live.since_snapshot >= SNAPSHOT_AFTER.max(tables.persons() / 8)
            && self.cohorts.snapshot(&tables)
        {
            live.since_snapshot = 0;
        }
        live.engine = Arc::new(live.engine.with_tables(tables));
        Ok(())
    }

    /// Decides again, in every kept study, each `(replaced, id, pseudonym)`: the patient's
    /// decision under `replaced` (an older index version) is dropped, and the patient's
    /// current consent decided under `id`.
    fn redecide(
        &self,
        studies: &mut HashMap<String, StudyConsent>,
        changed: &[(Option<i64>, i64, String)],
    ) -> ServiceResult<()> {
        if studies.is_empty() || changed.is_empty() {
            return Ok(());
        }
        let now = now_secs();
        let histories: Vec<Option<PolicyHistory>> = {
            let db = self.db();
            let mut out = Vec::with_capacity(changed.len());
            for (_, _, pseudonym) in changed {
                let versions = db.consents(pseudonym)?;
                out.push(
                    (!versions.is_empty())
                        .then(|| history(&versions))
                        .transpose()
                        .map_err(ServiceError::internal)?,
                );
            }
            out
        };
        let ids: Vec<String> = studies.keys().cloned().collect();
        for id in ids {
            let study = self.study(&id)?;
            let kept = studies.get_mut(&id).expect("listed");
            let decisions = Arc::make_mut(&mut kept.decisions);
            for ((replaced, person, _), history) in changed.iter().zip(&histories) {
                if let Some(old) = replaced {
                    decisions.set(*old, None)?;
                }
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

    /// The concept relations changed: the live engine takes them (descendants are
    /// expanded when a plan is compiled, so its tables stay as they are).
    pub(crate) fn concepts_changed(&self) -> ServiceResult<()> {
        let mut live = self.cohorts.live();
        if let Some(current) = live.as_mut() {
            let hierarchy = self.concept_hierarchy()?;
            current.engine = Arc::new(current.engine.with_hierarchy(hierarchy));
        }
        Ok(())
    }

    /// The concept relations custodians uploaded.
    fn concept_hierarchy(&self) -> ServiceResult<ConceptHierarchy> {
        Ok(ConceptHierarchy::from_pairs(
            self.db()
                .concept_relations()?
                .into_iter()
                .filter_map(|(a, d)| Some((a.parse().ok()?, d.parse().ok()?))),
        ))
    }

    /// The engine over the current index and `study`'s consent as it stands now.
    pub(crate) fn cohort_view(&self, study: &Study) -> ServiceResult<CohortView<'_>> {
        let engine = self.live_engine()?;
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
            pseudonyms: &self.cohorts.pseudonyms,
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

    /// Builds the cohort engine now (at start, so that the first count does not wait for
    /// it); a failure is logged and the first count tries again.
    pub fn warm_cohort_engine(&self) {
        if let Err(e) = self.live_engine() {
            tracing::warn!(error = %e, "building the cohort engine");
        }
    }

    /// Writes the index snapshot if the engine changed since the last one, after any
    /// write under way: the server calls it when it stops, so that the next start reads
    /// nothing from the database, and no write outlives its hold on the data directory.
    pub fn snapshot_on_stop(&self) {
        self.cohorts.settle();
        let Some(snapshots) = &self.cohorts.snapshots else {
            return;
        };
        let mut live = self.cohorts.live();
        let Some(current) = live.as_mut().filter(|l| l.since_snapshot > 0) else {
            return;
        };
        let started = std::time::Instant::now();
        match snapshots.write(current.engine.tables()) {
            Ok(()) => {
                current.since_snapshot = 0;
                tracing::info!(
                    patients = current.engine.tables().persons(),
                    seconds = started.elapsed().as_secs_f64(),
                    "index snapshot written at stop"
                );
            }
            Err(e) => tracing::warn!(error = %e, "index snapshot not written"),
        }
    }

    /// How the cohort engine's index was last built (none yet: `None`).
    pub fn index_load(&self) -> Option<IndexLoad> {
        *self
            .cohorts
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The live engine, built if there is none yet.
    fn live_engine(&self) -> ServiceResult<Arc<CohortEngine>> {
        let mut live = self.cohorts.live();
        if let Some(l) = live.as_ref() {
            return Ok(l.engine.clone());
        }
        let built = self.build_engine()?;
        let engine = built.engine.clone();
        *live = Some(built);
        Ok(engine)
    }

    /// The engine over every patient's current index version, by index version number:
    /// the snapshot's tables (if there is a sound one) less the versions no longer
    /// current, plus the current versions it lacks, read from the database. The
    /// pseudonym of each number is noted; a snapshot is written if it was not current.
    fn build_engine(&self) -> ServiceResult<LiveEngine> {
        let started = std::time::Instant::now();
        let snapshot = match self.cohorts.snapshots.as_ref().map(|s| s.load()) {
            Some(Ok(tables)) => tables,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "building the cohort index from the database");
                None
            }
            None => None,
        };
        let hierarchy = self.concept_hierarchy()?;
        let db = self.db();
        let through = db.last_index_id()?;
        let indexed = db.indexed_patients()?;
        let current: RoaringBitmap = indexed
            .iter()
            .map(|(id, _)| u32::try_from(*id).map_err(ServiceError::internal))
            .collect::<ServiceResult<_>>()?;
        let held = snapshot.as_ref().map(|t| t.ids()).unwrap_or_default();
        let mut builder = IndexBuilder::new();
        let mut read = 0usize;
        {
            let mut pseudonyms = self.cohorts.pseudonyms_mut();
            let missing = indexed
                .iter()
                .filter(|(id, _)| !held.contains(*id as u32))
                .count();
            let mut add = |id: i64, index: &model::PatientIndex| -> ServiceResult<()> {
                builder
                    .add(id, index)
                    .map_err(|e| ServiceError::internal(format!("index: {e}")))?;
                read += 1;
                Ok(())
            };
            if missing * 4 > indexed.len() {
                // Most of the index: one pass over the tables in order.
                db.for_each_index(|id, _, index| {
                    if held.contains(id as u32) {
                        Ok(())
                    } else {
                        add(id, &index)
                    }
                })?;
            } else {
                for (id, p) in &indexed {
                    if !held.contains(*id as u32) {
                        add(*id, &db.index(p)?)?;
                    }
                }
            }
            for (id, p) in &indexed {
                name(&mut pseudonyms, *id, p)?;
            }
        }
        drop(db);
        let stale = &held - &current;
        let tables = match snapshot {
            Some(tables) => {
                let tables = tables
                    .retire(stale.iter().map(i64::from))
                    .append(builder.build())
                    .map_err(|e| ServiceError::internal(format!("index: {e}")))?;
                // Retired rows cost every scan: drop them when they are many.
                if stale.len() * 8 > held.len() {
                    tables.compact()
                } else {
                    tables
                }
            }
            None => builder.build(),
        };
        *self
            .cohorts
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(IndexLoad {
            from_snapshot: held.len() - stale.len(),
            from_database: read as u64,
        });
        tracing::info!(
            patients = tables.persons(),
            from_snapshot = held.len() - stale.len(),
            from_database = read,
            seconds = started.elapsed().as_secs_f64(),
            "cohort index loaded"
        );
        let outdated = read > 0 || !stale.is_empty();
        let mut since_snapshot = read + stale.len() as usize;
        if outdated && self.cohorts.snapshot(&tables) {
            since_snapshot = 0;
        }
        Ok(LiveEngine {
            engine: Arc::new(CohortEngine::from_index(tables, hierarchy)),
            through,
            pending: BTreeMap::new(),
            since_snapshot,
        })
    }
}

/// Merges the newest segments while the last holds at least half as many patients as the
/// one before it: a logarithmic number of segments, each row merged a logarithmic number
/// of times.
fn merge_grown_tail(mut tables: IndexTables) -> IndexTables {
    loop {
        let sizes = tables.segment_sizes();
        let n = sizes.len();
        if n < 2 || sizes[n - 1] * 2 < sizes[n - 2] {
            return tables;
        }
        tables = tables.merge_tail(2);
    }
}

/// Notes that engine id `id` is `pseudonym`.
fn name(pseudonyms: &mut Vec<String>, id: i64, pseudonym: &str) -> ServiceResult<()> {
    let slot = usize::try_from(id).map_err(ServiceError::internal)?;
    if pseudonyms.len() <= slot {
        pseudonyms.resize(slot + 1, String::new());
    }
    pseudonyms[slot] = pseudonym.to_owned();
    Ok(())
}

/// Lowers `until` to `t`, if `t` is earlier.
fn earliest(until: &mut Option<i64>, t: Option<i64>) {
    if let Some(t) = t {
        *until = Some(until.map_or(t, |u| u.min(t)));
    }
}
