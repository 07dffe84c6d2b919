//! Releases: the exact cohort of an open study ∩ its active grants, fixed when the
//! researcher requests it; then streamed in batches, each batch re-encrypted by the
//! proxies, every capsule fragment verified before it is passed on.

use std::collections::HashMap;
use std::sync::Arc;

use broker_proto::v1 as pb;
use pre_kms::keys::public_key_from_bytes;
use pre_kms::reencrypt::{CfragContext, verify_cfrag};
use pre_kms::{Category, envelope};
use rand::RngCore;
use rayon::prelude::*;
use tokio::sync::mpsc;

use super::{Broker, now_secs};
use crate::error::{ServiceError, ServiceResult};
use crate::role::Caller;
use crate::storage::db::{ReleaseItemRow, ReleaseRow};
use crate::study::Study;

/// Envelopes per proxy round trip.
pub const BATCH: usize = 128;

/// One re-encrypted envelope on its way to the researcher.
#[derive(Debug, Clone)]
pub struct ReleasedItem {
    pub subject: String,
    pub category: Category,
    pub version: u32,
    pub sealed: Vec<u8>,
    pub delegating_key: Vec<u8>,
    pub verifying_key: Vec<u8>,
    pub cfrags: Vec<Vec<u8>>,
}

/// A release item with its blob and the patient's keys, loaded for re-encryption.
struct Loaded {
    row: ReleaseItemRow,
    sealed: Vec<u8>,
    capsule: Vec<u8>,
    delegating: Vec<u8>,
    vk: Vec<u8>,
}

pub type ReleaseStream = mpsc::Receiver<ServiceResult<ReleasedItem>>;

impl Broker {
    fn open_study_for(&self, caller: &Caller, study_id: &str) -> ServiceResult<Study> {
        let study = self.study(study_id)?;
        if study.proposal.researcher_id != caller.actor_id {
            return Err(ServiceError::PermissionDenied(format!(
                "only the researcher named in study {study_id} may receive its release"
            )));
        }
        if !study.is_open(now_secs()) {
            return Err(ServiceError::FailedPrecondition(format!(
                "study {study_id} is {} and {}; nothing can be released",
                study.status.as_str(),
                if now_secs() < study.proposal.not_before {
                    "not yet in its period"
                } else {
                    "checked against its period"
                }
            )));
        }
        Ok(study)
    }

    /// The per-study pseudonym a researcher sees for a patient.
    fn subject(&self, study_id: &str, pseudonym: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.subject_secret);
        h.update(study_id.as_bytes());
        h.update(&[0]);
        h.update(pseudonym.as_bytes());
        format!("sub-{}", &h.finalize().to_hex()[..24])
    }

    /// Fixes a release: cohort ∩ active grants, latest envelope of each granted and
    /// requested category.
    pub fn request_release(&self, caller: &Caller, study_id: &str) -> ServiceResult<ReleaseRow> {
        let study = self.open_study_for(caller, study_id)?;
        let now = now_secs();
        let mut db = self.db();
        let mut items = Vec::new();
        let mut subjects = 0u32;
        for (pseudonym, granted) in db.active_grants(study_id, now)? {
            if !study.proposal.cohort.matches(&db.index(&pseudonym)?) {
                continue;
            }
            let categories: Vec<Category> = granted
                .into_iter()
                .filter(|c| study.proposal.categories.contains(c))
                .collect();
            let envelopes = db.latest_envelopes(&pseudonym, &categories)?;
            if envelopes.is_empty() {
                continue;
            }
            subjects += 1;
            for (category, version, at) in envelopes {
                items.push(ReleaseItemRow {
                    seq: items.len() as i64 + 1,
                    pseudonym: pseudonym.clone(),
                    category,
                    version,
                    at,
                });
            }
        }
        let mut id = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let release = ReleaseRow {
            release_id: format!("rel-{}", hex::encode(id)),
            study_id: study_id.to_owned(),
            researcher_id: caller.actor_id.clone(),
            subjects,
            envelopes: items.len() as u32,
            created_at: now,
        };
        db.insert_release(&release, &items)?;
        tracing::info!(release = %release.release_id, study = study_id, subjects, envelopes = items.len(), "release fixed");
        Ok(release)
    }

    /// Streams a release. Memory is bounded by a few batches whatever the cohort size.
    pub fn fetch_release(
        self: &Arc<Self>,
        caller: &Caller,
        release_id: &str,
    ) -> ServiceResult<(ReleaseRow, ReleaseStream)> {
        let release = self
            .db()
            .release(release_id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no release {release_id}")))?;
        if release.researcher_id != caller.actor_id {
            return Err(ServiceError::PermissionDenied(
                "only the researcher who requested a release may fetch it".into(),
            ));
        }
        let study = self.open_study_for(caller, &release.study_id)?;
        let (tx, rx) = mpsc::channel(2 * BATCH);
        let this = self.clone();
        let rel = release.clone();
        tokio::spawn(async move {
            let mut after = 0i64;
            let mut round = 0usize;
            loop {
                let page = {
                    let this = this.clone();
                    let id = rel.release_id.clone();
                    tokio::task::spawn_blocking(move || this.db().release_items(&id, after, BATCH))
                        .await
                };
                let page = match page {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => return drop(tx.send(Err(e.into())).await),
                    Err(e) => return drop(tx.send(Err(ServiceError::internal(e))).await),
                };
                let Some(last) = page.last() else { break };
                after = last.seq;
                match this
                    .reencrypt_page(&study, &rel.release_id, page, round)
                    .await
                {
                    Ok(items) => {
                        for item in items {
                            if tx.send(Ok(item)).await.is_err() {
                                return; // the researcher went away
                            }
                        }
                    }
                    Err(e) => return drop(tx.send(Err(e)).await),
                }
                round += 1;
            }
        });
        Ok((release, rx))
    }

    async fn reencrypt_page(
        self: &Arc<Self>,
        study: &Study,
        release_id: &str,
        page: Vec<ReleaseItemRow>,
        round: usize,
    ) -> ServiceResult<Vec<ReleasedItem>> {
        // Load blobs and keys off the async runtime.
        let this = self.clone();
        let loaded = tokio::task::spawn_blocking(move || -> ServiceResult<Vec<Loaded>> {
            let db = this.db();
            let mut keys: HashMap<String, crate::storage::db::PatientRow> = HashMap::new();
            let mut out = Vec::with_capacity(page.len());
            for row in page {
                if !keys.contains_key(&row.pseudonym) {
                    let p = db
                        .patient(&row.pseudonym)?
                        .ok_or_else(|| ServiceError::internal("released patient vanished"))?;
                    keys.insert(row.pseudonym.clone(), p);
                }
                let p = &keys[&row.pseudonym];
                let sealed = this.blobs.get(&row.at)?;
                let capsule = envelope::split_capsule(&sealed)
                    .map_err(ServiceError::internal)?
                    .to_vec();
                let delegating = p
                    .category_keys
                    .get(&row.category)
                    .cloned()
                    .unwrap_or_default();
                let vk = p.verifying_key.clone();
                out.push(Loaded {
                    row,
                    sealed,
                    capsule,
                    delegating,
                    vk,
                });
            }
            Ok(out)
        })
        .await
        .map_err(ServiceError::internal)??;

        let t = self.threshold;
        let n = self.proxies.len();
        let mut cfrags: Vec<Vec<Vec<u8>>> = vec![Vec::new(); loaded.len()];
        let receiving =
            public_key_from_bytes(&study.proposal.receiving_key).map_err(ServiceError::internal)?;
        // Parsed capsule and keys per item, shared with the verification workers.
        let keys = Arc::new(
            loaded
                .iter()
                .map(
                    |Loaded {
                         capsule,
                         delegating: dk,
                         vk,
                         ..
                     }| {
                        Ok((
                            pre_kms::sealed::parse_capsule(capsule)
                                .map_err(ServiceError::internal)?,
                            public_key_from_bytes(dk).map_err(ServiceError::internal)?,
                            public_key_from_bytes(vk).map_err(ServiceError::internal)?,
                        ))
                    },
                )
                .collect::<ServiceResult<Vec<_>>>()?,
        );
        // Ask t proxies (rotating, to spread load); fall back to the others for items
        // that still lack t verified fragments (a proxy down, or lying).
        for attempt in 0..n {
            let wanted: Vec<usize> = (0..loaded.len()).filter(|&i| cfrags[i].len() < t).collect();
            if wanted.is_empty() {
                break;
            }
            let proxies: Vec<usize> = if attempt == 0 {
                (0..t).map(|k| (round + k) % n).collect()
            } else {
                vec![(round + t + attempt - 1) % n]
            };
            if attempt > 0 && attempt + t > n {
                break;
            }
            let calls: Vec<_> = proxies
                .iter()
                .map(|&p| {
                    let pool = self.proxies.clone();
                    let items: Vec<pb::ReencryptItem> = wanted
                        .iter()
                        .map(|&i| pb::ReencryptItem {
                            study_id: study.study_id.clone(),
                            pseudonym: loaded[i].row.pseudonym.clone(),
                            category: loaded[i].row.category.label().to_owned(),
                            capsule: loaded[i].capsule.clone(),
                        })
                        .collect();
                    let release_id = release_id.to_owned();
                    tokio::spawn(async move { (p, pool.reencrypt(p, &release_id, items).await) })
                })
                .collect();
            let mut answers = Vec::new();
            for call in calls {
                let (p, answer) = call.await.map_err(ServiceError::internal)?;
                match answer {
                    Ok(c) if c.len() == wanted.len() => answers.push(c),
                    Ok(_) => tracing::warn!(
                        proxy = p,
                        "proxy answered with the wrong number of fragments"
                    ),
                    Err(e) => {
                        tracing::warn!(proxy = p, error = %e, "proxy unavailable for re-encryption")
                    }
                }
            }
            let batch: Vec<(usize, Vec<u8>)> = answers
                .into_iter()
                .flat_map(|c| wanted.iter().copied().zip(c).collect::<Vec<_>>())
                .filter(|(_, c)| !c.is_empty())
                .collect();
            let checks: Vec<(usize, Vec<u8>, bool)> = {
                let keys = keys.clone();
                tokio::task::spawn_blocking(move || {
                    batch
                        .into_par_iter()
                        .map(|(i, c)| {
                            let (capsule, dk, vk) = &keys[i];
                            let ctx = CfragContext {
                                capsule,
                                patient_verifying_key: vk,
                                delegating_key: dk,
                                receiving_key: &receiving,
                            };
                            let ok = verify_cfrag(&ctx, &c).is_ok();
                            (i, c, ok)
                        })
                        .collect()
                })
                .await
                .map_err(ServiceError::internal)?
            };
            let mut rejected = 0usize;
            for (i, c, ok) in checks {
                if ok {
                    if cfrags[i].len() < t {
                        cfrags[i].push(c);
                    }
                } else {
                    rejected += 1;
                }
            }
            if rejected > 0 {
                tracing::warn!(
                    release = release_id,
                    rejected,
                    "capsule fragments failed verification and were discarded"
                );
            }
        }
        let mut out = Vec::with_capacity(loaded.len());
        let mut withheld = 0usize;
        for (
            Loaded {
                row,
                sealed,
                delegating,
                vk,
                ..
            },
            frags,
        ) in loaded.into_iter().zip(cfrags)
        {
            if frags.len() < t {
                withheld += 1;
                continue;
            }
            out.push(ReleasedItem {
                subject: self.subject(&study.study_id, &row.pseudonym),
                category: row.category,
                version: row.version,
                sealed,
                delegating_key: delegating,
                verifying_key: vk,
                cfrags: frags,
            });
        }
        if withheld > 0 {
            tracing::warn!(
                release = release_id,
                withheld,
                "envelopes withheld: fewer than threshold proxies re-encrypted them (grant revoked or expired, or proxies down)"
            );
        }
        Ok(out)
    }
}
