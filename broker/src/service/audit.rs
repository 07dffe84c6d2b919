//! The access log as the broker writes and serves it.
//!
//! Every consequential operation appends its events (one per patient concerned) to the
//! durable Merkle log of [`audit_log`] before the operation is acknowledged; releases
//! also get a broker-signed checkpoint at once, because the proxies re-encrypt only for
//! release events they can prove are in it. A side index in SQLite (leaf → kind, time,
//! actor, study, patient tag) serves the board's filters and each patient's own events;
//! it is rebuilt from the log for any leaves it misses after a crash.
//!
//! Patients appear in the log only as keyed tags ([`PatientTagKey`]) made from a log
//! secret and a per-patient salt, so that erasing the salt unlinks a patient's events
//! while every proof still verifies.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use audit_log::event::{Actor as LogActor, ActorRole, Digest32, Outcome, PatientSalt};
use audit_log::{
    AuditEvent, AuditLog, CheckpointSignature, EventKind, PatientTag, PatientTagKey,
    SignedCheckpoint,
};
use pre_kms::Identity;
use pre_kms::logged_release::{CheckpointKeys, LoggedEvent};

use super::{Broker, now_secs};
use crate::error::{ServiceError, ServiceResult};
use crate::storage::db::{AuditIndexRow, Db};
use audit_log::EventFilter;
use model::Caller;

/// Leaves per page of a board's event stream.
pub const EVENTS_PAGE: usize = 1000;

/// Event kinds a patient is alerted to.
const ALERT_KINDS: &[&str] = &["release", "break_glass"];

/// The broker's access log: the Merkle log, the key that signs its checkpoints and the
/// secret behind patient tags.
pub struct AccessLog {
    log: Mutex<AuditLog>,
    signer: Identity,
    tags: PatientTagKey,
}

impl AccessLog {
    /// Opens (or creates) the log in `dir`, signed by the broker's `signer`.
    pub fn open(dir: &Path, signer: Identity, tag_secret: [u8; 32]) -> Result<Self, String> {
        let log_id = format!("pre-broker/{}", signer.actor_id());
        let log = AuditLog::open_or_create(dir, &log_id).map_err(|e| {
            format!(
                "the access log in {} cannot be opened: {e}. It was changed or damaged; \
                 nothing was modified. Inspect it with `broker log-verify`",
                dir.display()
            )
        })?;
        if log.log_id() != log_id {
            return Err(format!(
                "the access log in {} belongs to another broker key ({})",
                dir.display(),
                log.log_id()
            ));
        }
        Ok(AccessLog {
            log: Mutex::new(log),
            signer,
            tags: PatientTagKey::new(tag_secret),
        })
    }

    fn lock(&self) -> MutexGuard<'_, AuditLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn broker_key(&self) -> umbral_pre::PublicKey {
        self.signer.verifying_key()
    }

    pub fn size(&self) -> u64 {
        self.lock().size()
    }

    /// The broker's key, which signs checkpoints and the broker's erasure receipts.
    pub(super) fn signer(&self) -> &Identity {
        &self.signer
    }
}

fn index_row(leaf: u64, e: &AuditEvent) -> AuditIndexRow {
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    AuditIndexRow {
        leaf,
        kind,
        time: e.time,
        actor: e.actor.id.clone(),
        study: e.details.study_id.clone().or(e.why.study_id.clone()),
        tag: e.patient.map(|t| t.0),
    }
}

/// A content hash from a blob name (BLAKE3, lowercase hex).
pub fn content_hash(blob_name: &str) -> Option<Digest32> {
    let bytes = hex::decode(blob_name).ok()?;
    Some(Digest32(bytes.try_into().ok()?))
}

impl Broker {
    /// An event by `caller`, now.
    pub(crate) fn event(&self, kind: EventKind, caller: &Caller) -> AuditEvent {
        let organisation = self
            .actor(&caller.actor_id)
            .map(|a| a.organisation)
            .filter(|o| !o.is_empty());
        AuditEvent::new(
            kind,
            now_secs(),
            LogActor {
                id: caller.actor_id.clone(),
                role: caller.role.into(),
                organisation,
            },
        )
    }

    /// An event by the broker itself (work it redoes at start), now.
    pub(crate) fn system_event(&self, kind: EventKind) -> AuditEvent {
        AuditEvent::new(
            kind,
            now_secs(),
            LogActor {
                id: self.audit.signer.actor_id(),
                role: ActorRole::System,
                organisation: None,
            },
        )
    }

    /// The log tag of a patient with this salt.
    pub(crate) fn patient_tag(&self, salt: &[u8; 32], pseudonym: &str) -> PatientTag {
        self.audit.tags.tag(&PatientSalt(*salt), pseudonym)
    }

    /// The log tags of patients, by pseudonym. Takes the metadata lock: call it before
    /// [`Broker::record`], never while holding that lock.
    pub(crate) fn patient_tags(
        &self,
        db: &Db,
        pseudonyms: &[&str],
    ) -> ServiceResult<std::collections::HashMap<String, PatientTag>> {
        let salts = db.audit_salts(pseudonyms)?;
        Ok(salts
            .into_iter()
            .map(|(p, salt)| {
                let tag = self.audit.tags.tag(&PatientSalt(salt), &p);
                (p, tag)
            })
            .collect())
    }

    /// Appends events durably and indexes them; returns their leaf indices. Must not be
    /// called while holding the metadata lock.
    pub(crate) fn record(&self, events: &[AuditEvent]) -> ServiceResult<Vec<u64>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let leaves = self
            .audit
            .lock()
            .append_events(events)
            .map_err(|e| ServiceError::internal(format!("access log: {e}")))?;
        let rows: Vec<AuditIndexRow> = leaves
            .iter()
            .zip(events)
            .map(|(&leaf, e)| index_row(leaf, e))
            .collect();
        self.db().index_audit(&rows)?;
        Ok(leaves)
    }

    /// Records a call refused after its caller authenticated (a role refusal), in the
    /// caller's name. Failures to log are logged and otherwise ignored: the refusal
    /// stands either way.
    pub(crate) fn record_refusal(&self, caller: &Caller, method: &str, reason: &str) {
        let known = self.actor(&caller.actor_id);
        let mut e = AuditEvent::new(
            EventKind::AuthorizationFailed,
            now_secs(),
            LogActor {
                id: caller.actor_id.clone(),
                role: ActorRole::Registered(caller.role),
                organisation: known.map(|a| a.organisation).filter(|o| !o.is_empty()),
            },
        );
        e.why.purpose = Some(format!("call {method}"));
        e.outcome = Outcome::Refused {
            reason: reason.chars().take(200).collect(),
        };
        if let Err(err) = self.record(&[e]) {
            tracing::error!(error = %err, "could not log a refused call");
        }
    }

    /// Writes the calls refused before they authenticated, counted since the last
    /// flush, as one event per method and reason, attributed to no one. Returns the
    /// number of events written. On failure the counts are kept for the next flush.
    pub fn flush_refusals(&self) -> ServiceResult<usize> {
        let counts = self.refusals.take();
        if counts.is_empty() {
            return Ok(0);
        }
        let events: Vec<AuditEvent> = counts
            .iter()
            .map(|((method, reason), n)| {
                let mut e = AuditEvent::new(
                    EventKind::AuthorizationFailed,
                    now_secs(),
                    LogActor {
                        id: "-".into(),
                        role: ActorRole::Unauthenticated,
                        organisation: None,
                    },
                );
                e.why.purpose = Some(format!("call {method}"));
                e.details.record_count = Some(*n);
                e.outcome = Outcome::Refused {
                    reason: format!("{n} unauthenticated calls: {reason}"),
                };
                e
            })
            .collect();
        match self.record(&events) {
            Ok(_) => Ok(events.len()),
            Err(e) => {
                self.refusals.restore(counts);
                Err(e)
            }
        }
    }

    /// Appends events whose intents were written with the state they describe, then
    /// clears the intents.
    pub(crate) fn record_intended(
        &self,
        events: &[AuditEvent],
        intents: &[i64],
    ) -> ServiceResult<Vec<u64>> {
        let leaves = self.record(events)?;
        self.db().clear_intents(intents)?;
        Ok(leaves)
    }

    /// Appends the events of intents a crash left behind: state stored, event not yet in
    /// the log. An intent whose event already is in the log (the crash came after the
    /// append) is only cleared, so nothing is logged twice.
    pub(crate) fn recover_intents(&self) -> ServiceResult<usize> {
        let intents = self.db().intents()?;
        if intents.is_empty() {
            return Ok(0);
        }
        let missing: Vec<AuditEvent> = {
            let log = self.audit.lock();
            let mut missing = Vec::new();
            for (_, log_size, event) in &intents {
                let logged =
                    (*log_size..log.size()).any(|i| log.event(i).is_ok_and(|e| e == *event));
                if !logged {
                    missing.push(event.clone());
                }
            }
            missing
        };
        self.record(&missing)?;
        let seqs: Vec<i64> = intents.iter().map(|(s, _, _)| *s).collect();
        self.db().clear_intents(&seqs)?;
        if !missing.is_empty() {
            tracing::warn!(
                events = missing.len(),
                "logged events of state stored before a crash"
            );
        }
        Ok(missing.len())
    }

    /// Brings the side index up to the log after a crash between append and index.
    pub(crate) fn reindex_log(&self) -> ServiceResult<()> {
        let indexed = self.db().audit_indexed()?;
        let log = self.audit.lock();
        let mut rows = Vec::new();
        for leaf in indexed..log.size() {
            let e = log
                .event(leaf)
                .map_err(|e| ServiceError::internal(format!("access log: {e}")))?;
            rows.push(index_row(leaf, &e));
        }
        drop(log);
        if !rows.is_empty() {
            tracing::warn!(leaves = rows.len(), "re-indexed access log leaves");
            self.db().index_audit(&rows)?;
        }
        Ok(())
    }

    /// The latest checkpoint, signed now if the log grew since the last one; with the
    /// witness signatures it has collected.
    pub fn checkpoint(&self) -> ServiceResult<SignedCheckpoint> {
        let mut signed = {
            let mut log = self.audit.lock();
            match log.latest_checkpoint() {
                Some(c) if c.checkpoint.size == log.size() => c.clone(),
                latest => {
                    let time = now_secs().max(latest.map_or(0, |c| c.checkpoint.time));
                    log.checkpoint(&self.audit.signer, time)
                        .map_err(|e| ServiceError::internal(format!("access log: {e}")))?
                }
            }
        };
        let c = &signed.checkpoint;
        for (key_id, signature) in self.db().cosignatures(c.size, c.time)? {
            signed
                .signatures
                .push(CheckpointSignature { key_id, signature });
        }
        Ok(signed)
    }

    pub fn broker_key(&self) -> umbral_pre::PublicKey {
        self.audit.broker_key()
    }

    /// Leaves with inclusion proofs against a checkpoint of size `size`.
    pub(crate) fn logged_events(
        &self,
        leaves: &[u64],
        size: u64,
    ) -> ServiceResult<Vec<LoggedEvent>> {
        let log = self.audit.lock();
        leaves
            .iter()
            .map(|&index| {
                let leaf = log.leaf(index)?;
                let path = if size > 0 {
                    log.inclusion_proof(index, size)?.path
                } else {
                    Vec::new()
                };
                Ok(LoggedEvent { index, leaf, path })
            })
            .collect::<Result<_, audit_log::Error>>()
            .map_err(|e| ServiceError::internal(format!("access log: {e}")))
    }

    /// Every checkpoint issued after `after_size`, oldest first, with witness signatures.
    pub fn checkpoints_after(&self, after_size: u64) -> ServiceResult<Vec<SignedCheckpoint>> {
        self.checkpoint()?;
        let all = self
            .audit
            .lock()
            .checkpoints()
            .map_err(|e| ServiceError::internal(format!("access log: {e}")))?;
        let db = self.db();
        all.into_iter()
            .filter(|c| c.checkpoint.size > after_size)
            .map(|mut c| {
                let (size, time) = (c.checkpoint.size, c.checkpoint.time);
                for (key_id, signature) in db.cosignatures(size, time)? {
                    c.signatures.push(CheckpointSignature { key_id, signature });
                }
                Ok(c)
            })
            .collect()
    }

    pub fn consistency(&self, old_size: u64, new_size: u64) -> ServiceResult<Vec<[u8; 32]>> {
        let log = self.audit.lock();
        if old_size > new_size || new_size > log.size() {
            return Err(ServiceError::InvalidArgument(format!(
                "no consistency proof from size {old_size} to {new_size}: the log has {} leaves",
                log.size()
            )));
        }
        log.consistency_proof(old_size, new_size)
            .map(|p| p.path)
            .map_err(|e| ServiceError::InvalidArgument(e.to_string()))
    }

    /// A page of leaves matching `filter` (no proofs: the board checks the whole log
    /// against its checkpoints instead).
    pub fn events_page(&self, filter: &EventFilter) -> ServiceResult<Vec<LoggedEvent>> {
        let leaves = self.db().audit_leaves(filter, EVENTS_PAGE)?;
        self.logged_events(&leaves, 0)
    }

    /// A board's witness signature on a checkpoint the log issued.
    pub fn cosign(&self, caller: &Caller, note: &str) -> ServiceResult<usize> {
        let signed = SignedCheckpoint::from_note(note)
            .map_err(|e| ServiceError::InvalidArgument(format!("checkpoint: {e}")))?;
        let c = &signed.checkpoint;
        let issued = self
            .audit
            .lock()
            .checkpoints()
            .map_err(|e| ServiceError::internal(format!("access log: {e}")))?
            .into_iter()
            .any(|k| k.checkpoint == *c);
        if !issued {
            return Err(ServiceError::FailedPrecondition(format!(
                "the log never issued a checkpoint of size {} at time {}",
                c.size, c.time
            )));
        }
        let board = self
            .actor(&caller.actor_id)
            .and_then(|a| pre_kms::keys::public_key_from_bytes(&a.verifying_key).ok())
            .ok_or_else(|| ServiceError::internal("registered board lacks a key"))?;
        let sig = signed
            .signatures
            .iter()
            .find(|s| s.key_id == caller.actor_id)
            .ok_or_else(|| {
                ServiceError::InvalidArgument(
                    "the checkpoint carries no signature by the caller's key".into(),
                )
            })?;
        signed
            .verify(&CheckpointKeys::new([board]), &[caller.actor_id.as_str()])
            .map_err(|e| ServiceError::InvalidArgument(format!("witness signature: {e}")))?;
        self.db()
            .add_cosignature(c.size, c.time, &sig.key_id, &sig.signature)?;
        Ok(self.db().cosignatures(c.size, c.time)?.len() + 1)
    }

    /// The tag of the calling patient.
    fn caller_tag(&self, caller: &Caller) -> ServiceResult<PatientTag> {
        let db = self.db();
        let (pseudonym, _) = db.patient_by_actor(&caller.actor_id)?.ok_or_else(|| {
            ServiceError::FailedPrecondition("the caller's key is not an enrolled patient".into())
        })?;
        let tags = self.patient_tags(&db, &[pseudonym.as_str()])?;
        tags.into_values()
            .next()
            .ok_or_else(|| ServiceError::internal("patient tag missing"))
    }

    /// Every event about the calling patient, with inclusion proofs against a fresh
    /// checkpoint.
    pub fn accesses(&self, caller: &Caller) -> ServiceResult<(SignedCheckpoint, Vec<LoggedEvent>)> {
        let tag = self.caller_tag(caller)?;
        let leaves = self.db().audit_leaves_about(&tag.0, &[], None)?;
        let checkpoint = self.checkpoint()?;
        let events = self.logged_events(&leaves, checkpoint.checkpoint.size)?;
        Ok((checkpoint, events))
    }

    /// The erasure notices to the calling researcher's studies (or to one of them), with
    /// inclusion proofs against a fresh checkpoint.
    pub fn notices(
        &self,
        caller: &Caller,
        study: Option<&str>,
    ) -> ServiceResult<(SignedCheckpoint, Vec<LoggedEvent>)> {
        let studies: Vec<String> = match study {
            Some(id) => {
                let s = self.study(id)?;
                if s.proposal.researcher_id != caller.actor_id {
                    return Err(ServiceError::PermissionDenied(format!(
                        "only the researcher named in study {id} reads its notices"
                    )));
                }
                vec![s.study_id]
            }
            None => self
                .db()
                .studies()?
                .into_iter()
                .filter(|s| s.proposal.researcher_id == caller.actor_id)
                .map(|s| s.study_id)
                .collect(),
        };
        let mut leaves = Vec::new();
        for study in studies {
            let filter = EventFilter {
                study: Some(study),
                kinds: vec![EventKind::ErasureNotice.name()],
                ..Default::default()
            };
            leaves.extend(self.db().audit_leaves(&filter, EVENTS_PAGE)?);
        }
        leaves.sort_unstable();
        let checkpoint = self.checkpoint()?;
        let events = self.logged_events(&leaves, checkpoint.checkpoint.size)?;
        Ok((checkpoint, events))
    }

    /// The calling patient's unread alerts; optionally marks those up to a leaf read.
    pub fn alerts(
        &self,
        caller: &Caller,
        acknowledge_through: Option<u64>,
    ) -> ServiceResult<(SignedCheckpoint, Vec<LoggedEvent>)> {
        let tag = self.caller_tag(caller)?;
        if let Some(through) = acknowledge_through {
            self.db().mark_alerts_read(&tag.0, through)?;
        }
        let read = self.db().alerts_read_through(&tag.0)?;
        let leaves = self.db().audit_leaves_about(&tag.0, ALERT_KINDS, read)?;
        let checkpoint = self.checkpoint()?;
        let events = self.logged_events(&leaves, checkpoint.checkpoint.size)?;
        Ok((checkpoint, events))
    }
}

/// Calls refused before their caller authenticated, counted per (method, reason) between
/// flushes ([`Broker::flush_refusals`]): anonymous traffic grows the log by at most one
/// leaf per method and reason per flush, never by one per call, costs no disk write on
/// the request path, and is never written in a registered actor's name (whoever sent it
/// could not prove to be that actor). Methods and reasons come from fixed sets, so the
/// map stays small.
#[derive(Debug, Default)]
pub(crate) struct UnauthenticatedRefusals(Mutex<BTreeMap<(String, String), u64>>);

impl UnauthenticatedRefusals {
    fn map(&self) -> MutexGuard<'_, BTreeMap<(String, String), u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn count(&self, method: &str, reason: &str) {
        *self
            .map()
            .entry((method.to_owned(), reason.to_owned()))
            .or_default() += 1;
    }

    fn take(&self) -> BTreeMap<(String, String), u64> {
        std::mem::take(&mut *self.map())
    }

    fn restore(&self, counts: BTreeMap<(String, String), u64>) {
        let mut map = self.map();
        for (k, n) in counts {
            *map.entry(k).or_default() += n;
        }
    }
}
