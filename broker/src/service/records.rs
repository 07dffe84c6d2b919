//! Enrollment and upload of envelopes and index rows.

use std::collections::{BTreeMap, HashSet};

use cohort_query::PatientIndex;
use pre_kms::keys::{public_key_from_bytes, pseudonym, verify_signature};
use pre_kms::{envelope, Category};
use rayon::prelude::*;

use super::{now_secs, Broker};
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
pub fn enrollment_digest(pseudonym: &str, verifying_key: &[u8], category_keys: &[(Category, Vec<u8>)]) -> [u8; 32] {
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
    /// Builds and signs the enrollment of a patient identity.
    pub fn of(patient: &pre_kms::Identity) -> Enrollment {
        let verifying_key = pre_kms::keys::public_key_bytes(&patient.verifying_key());
        let category_keys: Vec<_> = Category::ALL
            .iter()
            .map(|c| (*c, pre_kms::keys::public_key_bytes(&patient.category_public_key(*c))))
            .collect();
        let pseudonym = patient.pseudonym();
        let signature = patient.sign(&enrollment_digest(&pseudonym, &verifying_key, &category_keys));
        Enrollment { pseudonym, verifying_key, category_keys, signature }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Upload {
    /// (pseudonym, category, envelope bytes, content tag)
    pub envelopes: Vec<(String, Category, Vec<u8>, Vec<u8>)>,
    pub index: Vec<(String, PatientIndex)>,
}

impl Broker {
    pub fn enroll(&self, caller: &Caller, e: Enrollment) -> ServiceResult<bool> {
        let vk = public_key_from_bytes(&e.verifying_key)
            .map_err(|_| ServiceError::InvalidArgument("verifying_key is not a public key".into()))?;
        if pseudonym(&vk) != e.pseudonym {
            return Err(ServiceError::InvalidArgument("pseudonym does not derive from the verifying key".into()));
        }
        let mut keys = BTreeMap::new();
        for (c, k) in &e.category_keys {
            public_key_from_bytes(k)
                .map_err(|_| ServiceError::InvalidArgument(format!("the {c} key is not a public key")))?;
            if keys.insert(*c, k.clone()).is_some() {
                return Err(ServiceError::InvalidArgument(format!("the {c} key is given twice")));
            }
        }
        if let Some(missing) = Category::ALL.iter().find(|c| !keys.contains_key(c)) {
            return Err(ServiceError::InvalidArgument(format!("the {missing} key is missing")));
        }
        if !verify_signature(&vk, &enrollment_digest(&e.pseudonym, &e.verifying_key, &e.category_keys), &e.signature) {
            return Err(ServiceError::InvalidArgument("the patient's enrollment signature does not verify".into()));
        }
        if caller.role == Role::Patient && caller.actor_id != pre_kms::keys::actor_id(&vk) {
            return Err(ServiceError::PermissionDenied("a patient may enroll only their own key".into()));
        }
        let mut db = self.db();
        if let Some(existing) = db.patient(&e.pseudonym)? {
            if existing.enrolled_by != caller.actor_id {
                return Err(ServiceError::PermissionDenied("this patient was enrolled by another actor".into()));
            }
            if existing.category_keys != keys {
                return Err(ServiceError::FailedPrecondition("this patient is enrolled with other keys".into()));
            }
            return Ok(false);
        }
        let row = PatientRow {
            pseudonym: e.pseudonym,
            verifying_key: e.verifying_key,
            enrolled_by: caller.actor_id.clone(),
            category_keys: keys,
        };
        Ok(db.enroll(&row, now_secs())?)
    }

    /// Checks that the caller may act for every patient named.
    pub(super) fn check_acts_for<'a>(&self, caller: &Caller, pseudonyms: impl Iterator<Item = &'a String>) -> ServiceResult<()> {
        let db = self.db();
        let mut seen = HashSet::new();
        for p in pseudonyms {
            if !seen.insert(p) {
                continue;
            }
            let row = db
                .patient(p)?
                .ok_or_else(|| ServiceError::FailedPrecondition(format!("patient {p} is not enrolled; enroll first")))?;
            if row.enrolled_by != caller.actor_id {
                return Err(ServiceError::PermissionDenied(format!("the caller does not act for patient {p}")));
            }
        }
        Ok(())
    }

    /// Stores envelopes (blobs fsynced first) and index rows; returns one receipt per
    /// envelope once everything is durable.
    pub fn upload(&self, caller: &Caller, upload: Upload) -> ServiceResult<(Vec<Receipt>, usize)> {
        self.check_acts_for(caller, upload.envelopes.iter().map(|e| &e.0).chain(upload.index.iter().map(|i| &i.0)))?;
        for (i, (_, _, bytes, tag)) in upload.envelopes.iter().enumerate() {
            if tag.len() != 32 {
                return Err(ServiceError::InvalidArgument(format!("envelope {i}: content_tag must be 32 bytes")));
            }
            envelope::parse(bytes).map_err(|e| ServiceError::InvalidArgument(format!("envelope {i}: {e}")))?;
        }
        // A re-upload of unchanged content writes no blob (encryption is randomized, so
        // the bytes differ even when the plaintext does not).
        let unchanged = {
            let db = self.db();
            upload
                .envelopes
                .iter()
                .map(|(p, c, _, tag)| Ok(db.latest_tag(p, *c)?.as_deref() == Some(tag.as_slice())))
                .collect::<ServiceResult<Vec<bool>>>()?
        };
        let names = upload
            .envelopes
            .par_iter()
            .zip(unchanged)
            .map(|((_, _, bytes, _), same)| if same { Ok(String::new()) } else { self.blobs.put(bytes) })
            .collect::<Result<Vec<_>, _>>()?;
        let rows: Vec<NewEnvelope> = upload
            .envelopes
            .iter()
            .zip(names)
            .map(|((p, c, bytes, tag), blob)| NewEnvelope {
                pseudonym: p.clone(),
                category: *c,
                blob,
                content_tag: tag.clone(),
                size: bytes.len(),
            })
            .collect();
        let mut db = self.db();
        let receipts = db.add_envelopes(&rows, now_secs())?;
        db.put_index(&upload.index)?;
        Ok((receipts, upload.index.len()))
    }
}
