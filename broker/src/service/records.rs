//! Enrollment and upload of envelopes and index rows.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use pre_kms::keys::{pseudonym, public_key_from_bytes};
use pre_kms::{Category, envelope};
use rayon::prelude::*;

use audit_log::{AuditEvent, EventKind};

use super::{Broker, content_hash, now_secs};
use crate::error::{ServiceError, ServiceResult};
use crate::storage::db::{NewEnvelope, PatientRow, StoredContent};
use model::{Caller, Enrollment, EnvelopeReceipt, PatientIndex, Role, Upload};

impl Broker {
    /// Enrolls patients in one transaction. Every enrollment is checked first (keys,
    /// pseudonym, the patient's signature, who may enroll whom); the first refusal names
    /// its position and nothing is stored. Re-enrolling is idempotent.
    pub fn enroll(
        &self,
        caller: &Caller,
        enrollments: Vec<Enrollment>,
    ) -> ServiceResult<Vec<bool>> {
        if enrollments.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "no patients to enroll".into(),
            ));
        }
        let rows = enrollments
            .into_par_iter()
            .enumerate()
            .map(|(i, e)| {
                self.check_enrollment(caller, e).map_err(|err| match err {
                    ServiceError::InvalidArgument(m) => {
                        ServiceError::InvalidArgument(format!("patient {i}: {m}"))
                    }
                    other => other,
                })
            })
            .collect::<ServiceResult<Vec<PatientRow>>>()?;
        let mut db = self.db();
        let mut fresh = Vec::with_capacity(rows.len());
        let mut created = Vec::with_capacity(rows.len());
        for (i, row) in rows.into_iter().enumerate() {
            match db.patient(&row.pseudonym)? {
                Some(existing) if existing.enrolled_by != caller.actor_id => {
                    return Err(ServiceError::PermissionDenied(format!(
                        "patient {i} was enrolled by another actor"
                    )));
                }
                Some(existing) if existing.category_keys != row.category_keys => {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "patient {i} is enrolled with other keys"
                    )));
                }
                Some(_) => created.push(false),
                None => {
                    created.push(true);
                    fresh.push(row);
                }
            }
        }
        // The new patients, their log salts and their events (as intents), in one
        // transaction.
        let salts: Vec<[u8; 32]> = fresh.iter().map(|_| rand::random()).collect();
        let events: Vec<AuditEvent> = fresh
            .iter()
            .zip(&salts)
            .map(|(p, salt)| {
                let mut e = self.event(EventKind::Enroll, caller);
                e.patient = Some(self.patient_tag(salt, &p.pseudonym));
                e
            })
            .collect();
        let intents = db.enroll_all(&fresh, &salts, now_secs(), self.audit.size(), &events)?;
        drop(db);
        self.record_intended(&events, &intents)?;
        Ok(created)
    }

    fn check_enrollment(&self, caller: &Caller, e: Enrollment) -> ServiceResult<PatientRow> {
        let vk = public_key_from_bytes(&e.verifying_key).map_err(|_| {
            ServiceError::InvalidArgument("verifying_key is not a public key".into())
        })?;
        if pseudonym(&vk) != e.pseudonym {
            return Err(ServiceError::InvalidArgument(
                "pseudonym does not derive from the verifying key".into(),
            ));
        }
        let mut keys = BTreeMap::new();
        for (c, k) in &e.category_keys {
            public_key_from_bytes(k).map_err(|_| {
                ServiceError::InvalidArgument(format!("the {c} key is not a public key"))
            })?;
            if keys.insert(*c, k.clone()).is_some() {
                return Err(ServiceError::InvalidArgument(format!(
                    "the {c} key is given twice"
                )));
            }
        }
        if let Some(missing) = Category::ALL.iter().find(|c| !keys.contains_key(c)) {
            return Err(ServiceError::InvalidArgument(format!(
                "the {missing} key is missing"
            )));
        }
        pre_kms::enrollment::check(&e).map_err(|m| ServiceError::InvalidArgument(m.into()))?;
        if caller.role == Role::Patient && caller.actor_id != pre_kms::keys::actor_id(&vk) {
            return Err(ServiceError::PermissionDenied(
                "a patient may enroll only their own key".into(),
            ));
        }
        Ok(PatientRow {
            pseudonym: e.pseudonym,
            actor_id: pre_kms::keys::actor_id(&vk),
            verifying_key: e.verifying_key,
            enrolled_by: caller.actor_id.clone(),
            category_keys: keys,
        })
    }

    /// Checks that the caller may act for every patient named.
    pub(super) fn check_acts_for<'a>(
        &self,
        caller: &Caller,
        pseudonyms: impl Iterator<Item = &'a String>,
    ) -> ServiceResult<()> {
        let db = self.db();
        let mut seen = HashSet::new();
        for p in pseudonyms {
            if !seen.insert(p) {
                continue;
            }
            let row = db.patient(p)?.ok_or_else(|| {
                ServiceError::FailedPrecondition(format!(
                    "patient {p} is not enrolled; enroll first"
                ))
            })?;
            if db.is_being_erased(p)? {
                return Err(ServiceError::FailedPrecondition(format!(
                    "patient {p} is being erased"
                )));
            }
            let themself = caller.role == Role::Patient && row.actor_id == caller.actor_id;
            if row.enrolled_by != caller.actor_id && !themself {
                return Err(ServiceError::PermissionDenied(format!(
                    "the caller does not act for patient {p}"
                )));
            }
        }
        Ok(())
    }

    /// Stores envelopes (blobs fsynced first) and index rows; returns one receipt per
    /// envelope once everything is durable.
    pub fn upload(
        &self,
        caller: &Caller,
        upload: Upload,
    ) -> ServiceResult<(Vec<EnvelopeReceipt>, usize)> {
        self.check_acts_for(
            caller,
            upload
                .envelopes
                .iter()
                .map(|e| &e.pseudonym)
                .chain(upload.index.iter().map(|i| &i.0)),
        )?;
        for (i, e) in upload.envelopes.iter().enumerate() {
            if e.content_tag.len() != 32 {
                return Err(ServiceError::InvalidArgument(format!(
                    "envelope {i}: content_tag must be 32 bytes"
                )));
            }
            // The framing only: umbral re-verifies a capsule whenever it is deserialized,
            // which costs most of an encryption. The proxies parse it at re-encryption
            // (a bad capsule withholds only its own envelope) and the researcher again.
            envelope::split_capsule(&e.sealed)
                .map_err(|e| ServiceError::InvalidArgument(format!("envelope {i}: {e}")))?;
        }
        // Rows the cohort engine could not hold are refused before anything is stored.
        for (i, (_, index)) in upload.index.iter().enumerate() {
            index
                .check()
                .map_err(|e| ServiceError::InvalidArgument(format!("index {i}: {e}")))?;
        }
        // Content a stored version already holds writes no blob (encryption is
        // randomized, so the bytes differ even when the plaintext does not). The metadata
        // lock is held from this check to the commit, so that no other upload moves the
        // versions in between.
        let mut db = self.db();
        let stored = upload
            .envelopes
            .iter()
            .map(|e| Ok(db.stored_content(&e.pseudonym, e.category, &e.content_tag)?))
            .collect::<ServiceResult<Vec<StoredContent>>>()?;
        let unchanged: Vec<bool> = stored.iter().map(|s| *s != StoredContent::New).collect();
        // An upload carrying an older version's content is stale (replayed, or re-sent
        // late): its index snapshot is older than what is stored and is not applied.
        let stale: BTreeSet<&str> = upload
            .envelopes
            .iter()
            .zip(&stored)
            .filter(|(_, s)| matches!(s, StoredContent::Older(_)))
            .map(|(e, _)| e.pseudonym.as_str())
            .collect();
        let index: Vec<(String, PatientIndex)> = upload
            .index
            .iter()
            .filter(|(p, _)| !stale.contains(p.as_str()))
            .cloned()
            .collect();
        let fresh: Vec<&[u8]> = upload
            .envelopes
            .iter()
            .zip(&unchanged)
            .filter(|(_, same)| !**same)
            .map(|(e, _)| e.sealed.as_slice())
            .collect();
        let mut written = self.blobs.put_all(&fresh)?.into_iter();
        let rows: Vec<NewEnvelope> = upload
            .envelopes
            .iter()
            .zip(unchanged)
            .map(|(e, same)| NewEnvelope {
                pseudonym: e.pseudonym.clone(),
                category: e.category,
                at: if same { None } else { written.next() },
                content_tag: e.content_tag.clone(),
            })
            .collect();
        let pseudonyms: BTreeSet<&str> = rows.iter().map(|r| r.pseudonym.as_str()).collect();
        let tags = self.patient_tags(&db, &pseudonyms.into_iter().collect::<Vec<_>>())?;
        // The events are written with the envelopes, as intents, so that no stored
        // envelope is ever left unlogged by a crash before the log append.
        let stored = db.store_upload(&rows, &index, now_secs(), self.audit.size(), |receipts| {
            // One event per patient with new envelopes: categories, count, content hashes.
            let mut per_patient: BTreeMap<&str, Vec<&EnvelopeReceipt>> = BTreeMap::new();
            for r in receipts.iter().filter(|r| !r.unchanged) {
                per_patient.entry(r.pseudonym.as_str()).or_default().push(r);
            }
            per_patient
                .iter()
                .map(|(p, rs)| {
                    let mut e = self.event(EventKind::Upload, caller);
                    e.patient = tags.get(*p).copied();
                    e.details.categories =
                        rs.iter().map(|r| r.category.label().to_owned()).collect();
                    e.details.record_count = Some(rs.len() as u64);
                    e.details.content_hashes =
                        rs.iter().filter_map(|r| content_hash(&r.blob)).collect();
                    e
                })
                .collect()
        })?;
        drop(db);
        self.index_changed(&stored.changes)?;
        crate::crash::point(crate::crash::UPLOAD_AFTER_COMMIT);
        self.record_intended(&stored.events, &stored.intents)?;
        Ok((stored.receipts, index.len()))
    }
}
