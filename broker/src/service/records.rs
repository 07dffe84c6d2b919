//! Enrollment and upload of envelopes and index rows.

use std::collections::{BTreeMap, HashSet};

use cohort_query::PatientIndex;
use pre_kms::keys::{pseudonym, public_key_from_bytes, verify_signature};
use pre_kms::{Category, envelope};
use rayon::prelude::*;

use audit_log::{AuditEvent, EventKind};

use super::{Broker, content_hash, now_secs};
use crate::error::{ServiceError, ServiceResult};
use crate::role::{Caller, Role};
use crate::storage::db::{NewEnvelope, PatientRow, Receipt};

#[derive(Debug, Clone)]
pub struct Enrollment {
    pub pseudonym: String,
    pub verifying_key: Vec<u8>,
    pub category_keys: Vec<(Category, Vec<u8>)>,
    pub signature: Vec<u8>,
}

/// What a patient signs to enroll: the pseudonym, the verifying key and every
/// category key, in the order given.
pub fn enrollment_digest(
    pseudonym: &str,
    verifying_key: &[u8],
    category_keys: &[(Category, Vec<u8>)],
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("broker enrollment v1");
    h.update(pseudonym.as_bytes());
    h.update(&[0]);
    h.update(verifying_key);
    for (c, k) in category_keys {
        h.update(c.label().as_bytes());
        h.update(&[0]);
        h.update(k);
    }
    *h.finalize().as_bytes()
}

impl Enrollment {
    fn check_signature(&self) -> Result<(), &'static str> {
        let vk = public_key_from_bytes(&self.verifying_key)
            .map_err(|_| "verifying_key is not a public key")?;
        let digest = enrollment_digest(&self.pseudonym, &self.verifying_key, &self.category_keys);
        if verify_signature(&vk, &digest, &self.signature) {
            Ok(())
        } else {
            Err("the patient's enrollment signature does not verify")
        }
    }

    /// Builds and signs the enrollment of a patient identity.
    pub fn of(patient: &pre_kms::Identity) -> Enrollment {
        let keys: Vec<_> = Category::ALL
            .iter()
            .map(|c| (*c, patient.category_public_key(*c)))
            .collect();
        Self::with_keys(patient, &keys)
    }

    /// The same, with the category public keys already derived.
    pub fn with_keys(
        patient: &pre_kms::Identity,
        keys: &[(Category, umbral_pre::PublicKey)],
    ) -> Enrollment {
        let verifying_key = pre_kms::keys::public_key_bytes(&patient.verifying_key());
        let category_keys: Vec<_> = keys
            .iter()
            .map(|(c, k)| (*c, pre_kms::keys::public_key_bytes(k)))
            .collect();
        let pseudonym = patient.pseudonym();
        let signature = patient.sign(&enrollment_digest(
            &pseudonym,
            &verifying_key,
            &category_keys,
        ));
        Enrollment {
            pseudonym,
            verifying_key,
            category_keys,
            signature,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Upload {
    /// (pseudonym, category, envelope bytes, content tag)
    pub envelopes: Vec<(String, Category, Vec<u8>, Vec<u8>)>,
    pub index: Vec<(String, PatientIndex)>,
}

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
        db.enroll_all(&fresh, now_secs())?;
        let pseudonyms: Vec<&str> = fresh.iter().map(|p| p.pseudonym.as_str()).collect();
        let tags = self.patient_tags(&db, &pseudonyms)?;
        drop(db);
        let events: Vec<AuditEvent> = pseudonyms
            .iter()
            .map(|p| {
                let mut e = self.event(EventKind::Enroll, caller);
                e.patient = tags.get(*p).copied();
                e
            })
            .collect();
        self.record(&events)?;
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
        e.check_signature()
            .map_err(|m| ServiceError::InvalidArgument(m.into()))?;
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
    pub fn upload(&self, caller: &Caller, upload: Upload) -> ServiceResult<(Vec<Receipt>, usize)> {
        self.check_acts_for(
            caller,
            upload
                .envelopes
                .iter()
                .map(|e| &e.0)
                .chain(upload.index.iter().map(|i| &i.0)),
        )?;
        for (i, (_, _, bytes, tag)) in upload.envelopes.iter().enumerate() {
            if tag.len() != 32 {
                return Err(ServiceError::InvalidArgument(format!(
                    "envelope {i}: content_tag must be 32 bytes"
                )));
            }
            // The framing only: umbral re-verifies a capsule whenever it is deserialized,
            // which costs most of an encryption. The proxies parse it at re-encryption
            // (a bad capsule withholds only its own envelope) and the researcher again.
            envelope::split_capsule(bytes)
                .map_err(|e| ServiceError::InvalidArgument(format!("envelope {i}: {e}")))?;
        }
        // A re-upload of unchanged content writes no blob (encryption is randomized, so
        // the bytes differ even when the plaintext does not). The metadata lock is held
        // from this check to the commit, so that no other upload moves the latest version
        // in between.
        let mut db = self.db();
        let unchanged = upload
            .envelopes
            .iter()
            .map(|(p, c, _, tag)| Ok(db.latest_tag(p, *c)?.as_deref() == Some(tag.as_slice())))
            .collect::<ServiceResult<Vec<bool>>>()?;
        let fresh: Vec<&[u8]> = upload
            .envelopes
            .iter()
            .zip(&unchanged)
            .filter(|(_, same)| !**same)
            .map(|((_, _, bytes, _), _)| bytes.as_slice())
            .collect();
        let mut written = self.blobs.put_all(&fresh)?.into_iter();
        let rows: Vec<NewEnvelope> = upload
            .envelopes
            .iter()
            .zip(unchanged)
            .map(|((p, c, _, tag), same)| NewEnvelope {
                pseudonym: p.clone(),
                category: *c,
                at: if same { None } else { written.next() },
                content_tag: tag.clone(),
            })
            .collect();
        let receipts = db.store_upload(&rows, &upload.index, now_secs())?;
        self.index_changed();
        // One event per patient with new envelopes: categories, count, content hashes.
        let mut per_patient: BTreeMap<&str, Vec<&Receipt>> = BTreeMap::new();
        for r in receipts.iter().filter(|r| !r.unchanged) {
            per_patient.entry(r.pseudonym.as_str()).or_default().push(r);
        }
        let pseudonyms: Vec<&str> = per_patient.keys().copied().collect();
        let tags = self.patient_tags(&db, &pseudonyms)?;
        drop(db);
        let events: Vec<AuditEvent> = per_patient
            .iter()
            .map(|(p, rs)| {
                let mut e = self.event(EventKind::Upload, caller);
                e.patient = tags.get(*p).copied();
                e.details.categories = rs.iter().map(|r| r.category.label().to_owned()).collect();
                e.details.record_count = Some(rs.len() as u64);
                e.details.content_hashes =
                    rs.iter().filter_map(|r| content_hash(&r.blob)).collect();
                e
            })
            .collect();
        self.record(&events)?;
        Ok((receipts, upload.index.len()))
    }
}
