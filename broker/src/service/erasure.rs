//! Erasure: a patient's right to be forgotten, carried out as one job that a crash cannot
//! leave half done.
//!
//! A patient signs an [`ErasureRequest`]. The broker accepts it in one transaction (the
//! job, every grant of the patient withdrawn, the erasure event as an intent) and then
//! runs the job's steps in order, each redone whole if a crash interrupts it, the step
//! reached stored after each one ([`ErasureStep`]):
//!
//! 1. **Proxies**: every proxy destroys the patient's kfrags and signs a receipt
//!    (idempotent at the proxy: the same request again destroys nothing more). The job
//!    waits here until every proxy confirmed.
//! 2. **Delete**: the packs holding the patient's blobs are rewritten with the other
//!    patients' blobs only; then one transaction points those records at the new packs
//!    and deletes every row of the patient, including the log-tag salt, and writes the
//!    notices to the studies that received the patient's records; the write-ahead log is
//!    emptied into the database (which overwrites deleted content).
//! 3. **Packs**: the old packs are overwritten and removed.
//! 4. **Index**: the cohort engine forgets the patient and its snapshot on disk is written
//!    again without them, the older one destroyed.
//! 5. **Done**: the broker signs its receipt; the receipts stay for the patient to fetch
//!    again with the same request.
//!
//! A restart resumes every job under way ([`Broker::resume_erasures`]).

use std::sync::Arc;

use audit_log::EventKind;
use audit_log::event::Digest32;
use pre_kms::erasure::{
    ErasureReceipt, ErasureRequest, Role as ReceiptRole, VerifiedErasureRequest,
};

use super::{Broker, now_secs};
use crate::error::{ServiceError, ServiceResult};
use crate::storage::db::{Deleted, ErasureJob, ErasureStep};
use model::Caller;
use pre_kms::request_auth::now_ms;

/// How old a request may be when the broker first sees it.
const REQUEST_MAX_AGE_MS: i64 = 24 * 3600 * 1000;
/// How far ahead of the broker's clock a request may say it was signed.
const REQUEST_SKEW_MS: i64 = 300 * 1000;

/// What an erasure notice tells a study's researcher.
const NOTICE: &str = "a subject of this study was erased at their request: records of theirs \
     the study already received stay governed by its data-use terms (the study as the ethics \
     board approved it); later releases do not include them";

impl Broker {
    /// Carries out (or resumes) a patient's erasure and returns the receipts: one per
    /// proxy, then the broker's. The same request again returns them again. Until every
    /// proxy confirmed, the answer is `Unavailable` and the job stays under way.
    pub async fn erase(
        self: &Arc<Self>,
        caller: Caller,
        request: ErasureRequest,
    ) -> ServiceResult<Vec<ErasureReceipt>> {
        let verified = request.verify().map_err(|e| {
            ServiceError::InvalidArgument(format!("the erasure request is not the patient's: {e}"))
        })?;
        let _one_at_a_time = self.erasing.lock().await;
        let this = self.clone();
        let v = verified.clone();
        let job = tokio::task::spawn_blocking(move || this.accept_erasure(&caller, &v))
            .await
            .map_err(ServiceError::internal)??;
        self.run_erasure(job, &verified).await
    }

    /// Resumes every erasure a restart interrupted; returns how many finished.
    pub async fn resume_erasures(self: &Arc<Self>) -> ServiceResult<usize> {
        let _one_at_a_time = self.erasing.lock().await;
        let this = self.clone();
        let jobs = tokio::task::spawn_blocking(move || this.db().erasures_under_way())
            .await
            .map_err(ServiceError::internal)??;
        let mut finished = 0;
        for job in jobs {
            let verified = serde_json::from_str::<ErasureRequest>(&job.request)
                .map_err(ServiceError::internal)?
                .verify()
                .map_err(ServiceError::internal)?;
            match self.run_erasure(job, &verified).await {
                Ok(_) => finished += 1,
                Err(e) => tracing::warn!(error = %e, "an erasure is still under way"),
            }
        }
        Ok(finished)
    }

    /// The job of this request: the stored one if the request was accepted before (sent
    /// again by the patient), or a new one, accepted now.
    fn accept_erasure(
        &self,
        caller: &Caller,
        request: &VerifiedErasureRequest,
    ) -> ServiceResult<ErasureJob> {
        let pseudonym = request.pseudonym().to_owned();
        let known = self.db().erasure(&request.digest())?;
        if let Some(job) = known {
            if caller.actor_id != job.actor_id {
                self.check_acts_for(caller, std::iter::once(&pseudonym))?;
            }
            return Ok(job);
        }
        self.check_acts_for(caller, std::iter::once(&pseudonym))?;
        let mut db = self.db();
        let patient = db
            .patient(&pseudonym)?
            .ok_or_else(|| ServiceError::internal("patient vanished"))?;
        let signed_by = hex::decode(&request.request().verifying_key).unwrap_or_default();
        if signed_by != patient.verifying_key {
            return Err(ServiceError::PermissionDenied(
                "the erasure request is not signed by the patient's enrolled key".into(),
            ));
        }
        let issued = request.request().issued_at_ms;
        let now = now_ms();
        if issued < now - REQUEST_MAX_AGE_MS {
            return Err(ServiceError::FailedPrecondition(
                "the erasure request was signed more than 24 hours ago; sign a new one".into(),
            ));
        }
        // Enrolment times are whole seconds: a request of the enrolment's own second is
        // refused too, so that none signed before a re-enrolment ever passes.
        if issued.div_euclid(1000) <= db.patient_enrolled_at(&pseudonym)? {
            return Err(ServiceError::PermissionDenied(
                "the erasure request was signed before the patient enrolled: an old request is \
                 not carried out again; sign a new one"
                    .into(),
            ));
        }
        if issued > now + REQUEST_SKEW_MS {
            return Err(ServiceError::InvalidArgument(
                "the erasure request says it was signed in the future; check the clock".into(),
            ));
        }
        if db.is_being_erased(&pseudonym)? {
            return Err(ServiceError::FailedPrecondition(
                "an erasure of this patient is already under way under another request: send \
                 that request again to finish it"
                    .into(),
            ));
        }
        let tag = self
            .patient_tags(&db, &[pseudonym.as_str()])?
            .remove(&pseudonym);
        let job = ErasureJob {
            digest: request.digest(),
            pseudonym: pseudonym.clone(),
            actor_id: patient.actor_id.clone(),
            verifying_key: patient.verifying_key.clone(),
            request: serde_json::to_string(request.request()).map_err(ServiceError::internal)?,
            step: ErasureStep::Proxies,
            receipts: "[]".into(),
            deleted: "{}".into(),
            index_id: None,
        };
        let mut erasure = self.event(EventKind::Erasure, caller);
        erasure.patient = tag;
        erasure.why.purpose = Some("the patient's erasure request".into());
        erasure.details.content_hashes = vec![Digest32(request.digest())];
        let log_size = self.audit.size();
        let (events, intents) = db.begin_erasure(&job, now_secs(), log_size, |withdrawn| {
            std::iter::once(erasure)
                .chain(withdrawn.iter().map(|(study, _, grant)| {
                    let mut e = self.event(EventKind::GrantWithdrawn, caller);
                    e.patient = tag;
                    e.why.purpose = Some("erasure".into());
                    e.why.study_id = Some(study.clone());
                    e.details.study_id = Some(study.clone());
                    e.details.grant_id = Some(grant.clone());
                    e
                }))
                .collect()
        })?;
        drop(db);
        self.record_intended(&events, &intents)?;
        crate::crash::point(crate::crash::ERASE_AFTER_ACCEPT);
        Ok(job)
    }

    /// Runs the job's remaining steps (see the module documentation).
    async fn run_erasure(
        self: &Arc<Self>,
        mut job: ErasureJob,
        request: &VerifiedErasureRequest,
    ) -> ServiceResult<Vec<ErasureReceipt>> {
        let mut receipts: Vec<ErasureReceipt> =
            serde_json::from_str(&job.receipts).map_err(ServiceError::internal)?;
        if job.step == ErasureStep::Proxies {
            self.proxies_erase(&job, request, &mut receipts).await?;
            job.step = ErasureStep::Delete;
            let json = serde_json::to_string(&receipts).map_err(ServiceError::internal)?;
            let digest = job.digest;
            self.blocking(move |b| {
                b.db()
                    .advance_erasure(&digest, ErasureStep::Delete, &json)?;
                Ok(())
            })
            .await?;
            crate::crash::point(crate::crash::ERASE_AFTER_PROXIES);
        }
        let digest = job.digest;
        if job.step == ErasureStep::Delete {
            let j = job.clone();
            self.blocking(move |b| b.delete_erased(&j)).await?;
        }
        let job = self
            .blocking(move |b| {
                b.db()
                    .erasure(&digest)?
                    .ok_or_else(|| ServiceError::internal("erasure job vanished"))
            })
            .await?;
        if job.step == ErasureStep::Packs {
            self.blocking(move |b| {
                let packs = b.db().erasure_packs()?;
                for pack in packs {
                    b.blobs.remove_pack(&pack)?;
                    b.db().erasure_pack_destroyed(&pack)?;
                }
                b.db()
                    .advance_erasure(&digest, ErasureStep::Index, &job.receipts)?;
                Ok(())
            })
            .await?;
            crate::crash::point(crate::crash::ERASE_AFTER_PACKS);
        }
        if job.step < ErasureStep::Done {
            let deleted: Deleted =
                serde_json::from_str(&job.deleted).map_err(ServiceError::internal)?;
            let index_id = job.index_id;
            let request = request.clone();
            receipts = self
                .blocking(move |b| {
                    if let Some(id) = index_id {
                        b.index_erased(id)?;
                    }
                    receipts.retain(|r| r.role == ReceiptRole::Proxy);
                    receipts.push(ErasureReceipt::sign(
                        b.audit.signer(),
                        ReceiptRole::Broker,
                        &request,
                        deleted.iter().map(|(k, n)| (k.as_str(), *n)),
                        now_ms(),
                    ));
                    let json = serde_json::to_string(&receipts).map_err(ServiceError::internal)?;
                    let db = b.db();
                    db.advance_erasure(&digest, ErasureStep::Done, &json)?;
                    db.checkpoint_wal()?;
                    Ok(receipts)
                })
                .await?;
        }
        Ok(receipts)
    }

    /// Step 1: asks every proxy that has not yet confirmed; stores each receipt as it
    /// comes. Fails (the job stays at this step) unless every proxy confirmed.
    async fn proxies_erase(
        self: &Arc<Self>,
        job: &ErasureJob,
        request: &VerifiedErasureRequest,
        receipts: &mut Vec<ErasureReceipt>,
    ) -> ServiceResult<()> {
        let mut missing = Vec::new();
        for (i, proxy) in self.proxies.handles().iter().enumerate() {
            let theirs = hex::encode(&proxy.info.verifying_key);
            if receipts
                .iter()
                .any(|r| r.role == ReceiptRole::Proxy && r.verifying_key == theirs)
            {
                continue;
            }
            match self.proxies.erase(i, request).await {
                Ok(receipt) => {
                    receipts.push(receipt);
                    let json = serde_json::to_string(&receipts).map_err(ServiceError::internal)?;
                    let digest = job.digest;
                    self.blocking(move |b| {
                        b.db()
                            .advance_erasure(&digest, ErasureStep::Proxies, &json)?;
                        Ok(())
                    })
                    .await?;
                }
                Err(e) => {
                    tracing::warn!(proxy = i, error = %e, "a proxy has not confirmed an erasure");
                    missing.push(i.to_string());
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(ServiceError::Unavailable(format!(
            "the erasure is under way: {} of {} proxies confirmed, not yet proxy {}; it resumes \
             when the broker restarts, or send the same request again",
            self.proxies.len() - missing.len(),
            self.proxies.len(),
            missing.join(", ")
        )))
    }

    /// Step 2: rewrites the packs that hold the patient's blobs without them, then deletes
    /// every row of the patient and points the others at the new packs, in one
    /// transaction. The metadata lock is held throughout, so that no other write moves a
    /// record into a pack being rewritten.
    fn delete_erased(&self, job: &ErasureJob) -> ServiceResult<()> {
        let p = job.pseudonym.as_str();
        let mut db = self.db();
        let tag = self.patient_tags(&db, &[p])?.get(p).map(|t| t.0);
        let packs = db.erased_blobs(p)?;
        let mut moved = Vec::new();
        for (pack, keep) in packs.iter().filter(|(_, keep)| !keep.is_empty()) {
            let to = self.blobs.rewrite_pack(pack, keep)?;
            moved.extend(keep.iter().map(|k| (k.pack.clone(), k.offset)).zip(to));
        }
        crate::crash::point(crate::crash::ERASE_AFTER_REWRITE);
        let old: Vec<String> = packs.into_keys().collect();
        let log_size = self.audit.size();
        let (_, events, intents) =
            db.delete_erased_patient(job, tag, &moved, &old, log_size, |released| {
                released
                    .iter()
                    .map(|(study, n)| {
                        let mut e = self.system_event(EventKind::ErasureNotice);
                        e.why.study_id = Some(study.clone());
                        e.why.purpose = Some(NOTICE.into());
                        e.details.study_id = Some(study.clone());
                        e.details.subject = Some(self.subject(study, p));
                        e.details.record_count = Some(*n);
                        e
                    })
                    .collect()
            })?;
        db.checkpoint_wal()?;
        drop(db);
        self.record_intended(&events, &intents)?;
        crate::crash::point(crate::crash::ERASE_AFTER_DELETE);
        Ok(())
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Broker) -> ServiceResult<T> + Send + 'static,
    ) -> ServiceResult<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(ServiceError::internal)?
    }
}
