//! Releases: the cohort engine's selection of an open study's own definition ∩ its active
//! grants, fixed when the researcher requests it; then streamed in batches, each batch re-encrypted by the
//! proxies, a sample of each proxy's capsule fragments (all of a proxy's once one failed)
//! verified before they are passed on ([`super::cfrag_check`]).

use std::collections::HashMap;
use std::sync::Arc;

use pre_kms::keys::public_key_from_bytes;
use pre_kms::reencrypt::{CfragContext, verify_cfrag};
use pre_kms::{Category, envelope};
use rand::RngCore;
use rayon::prelude::*;
use tokio::sync::mpsc;
use umbral_pre::PublicKey;

use audit_log::EventKind;
use audit_log::event::Digest32;

use super::cfrag_check::{Answer, screen};
use super::{Broker, content_hash, now_secs};
use crate::error::{ServiceError, ServiceResult};
use crate::storage::db::{ReleaseItemRow, ReleaseRow};
use consent_policy::StudyAccess;
use model::Caller;
use model::{Study, purpose_label};
use pre_kms::logged_release::LoggedRelease;
use proxy::ReencryptRequest;

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

/// Whether `cfrag` verifies for `item` (`None`: the broker's own copy of the capsule or
/// keys does not parse, so it cannot say).
fn check_cfrag(item: &Loaded, receiving: &PublicKey, cfrag: &[u8]) -> Option<bool> {
    let capsule = pre_kms::sealed::parse_capsule(&item.capsule).ok()?;
    let delegating = public_key_from_bytes(&item.delegating).ok()?;
    let verifying = public_key_from_bytes(&item.vk).ok()?;
    let ctx = CfragContext {
        capsule: &capsule,
        patient_verifying_key: &verifying,
        delegating_key: &delegating,
        receiving_key: receiving,
    };
    Some(verify_cfrag(&ctx, cfrag).is_ok())
}

pub type ReleaseStream = mpsc::Receiver<ServiceResult<ReleasedItem>>;

/// Whom a batch is re-encrypted for: the grantee the kfrags were granted to (a study, or
/// an emergency organisation) and its receiving key.
#[derive(Debug, Clone)]
pub(super) struct Recipient {
    pub grantee: String,
    pub receiving_key: Vec<u8>,
    /// Items name the subject by the study's own pseudonym (research), or by the
    /// patient's broker pseudonym (break-glass: the clinician named the patient).
    pub study_pseudonyms: bool,
}

impl Broker {
    fn open_study_for(&self, caller: &Caller, study_id: &str) -> ServiceResult<Study> {
        let study = self.study(study_id)?;
        if study.proposal.researcher_id != caller.actor_id {
            return Err(ServiceError::PermissionDenied(format!(
                "only the researcher named in study {study_id} may receive its release"
            )));
        }
        if let Some(reason) = study.closed_because(now_secs()) {
            return Err(ServiceError::FailedPrecondition(format!(
                "{reason}: nothing can be released"
            )));
        }
        Ok(study)
    }

    /// The per-study pseudonym a researcher sees for a patient.
    pub(super) fn subject(&self, study_id: &str, pseudonym: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.subject_secret);
        h.update(study_id.as_bytes());
        h.update(&[0]);
        h.update(pseudonym.as_bytes());
        format!("sub-{}", &h.finalize().to_hex()[..24])
    }

    /// Fixes a release: the study's cohort as the engine selects it under the study's
    /// consent (the same view the board's exact count of the study's definition counts
    /// over) ∩ active grants, and of each patient the latest envelope of each category
    /// both the grant and the consent, as it stands now, allow. One `release` event per
    /// patient is logged, with the definition's hash, and a checkpoint signed, before the
    /// release exists: the proxies re-encrypt nothing else.
    pub fn request_release(&self, caller: &Caller, study_id: &str) -> ServiceResult<ReleaseRow> {
        let study = self.open_study_for(caller, study_id)?;
        let now = now_secs();
        let mut id = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let release_id = format!("rel-{}", hex::encode(id));
        let definition_hash = Digest32(study.proposal.cohort.normalized().hash.0);
        let view = self.cohort_view(&study)?;
        let cohort: HashMap<String, &StudyAccess> =
            view.select(&study.proposal.cohort)?.into_iter().collect();
        let mut items = Vec::new();
        let mut events = Vec::new();
        let mut subjects = Vec::new();
        {
            let db = self.db();
            let mut selected = Vec::new();
            for grant in db.active_grants(study_id, now)? {
                let Some(access) = cohort.get(grant.pseudonym.as_str()) else {
                    continue;
                };
                let categories: Vec<Category> = grant
                    .categories
                    .iter()
                    .copied()
                    .filter(|c| access.categories.contains(c))
                    .collect();
                let envelopes = db.latest_envelopes(&grant.pseudonym, &categories)?;
                if !envelopes.is_empty() {
                    selected.push((grant, envelopes, access.policy_hash));
                }
            }
            let pseudonyms: Vec<&str> = selected
                .iter()
                .map(|(g, ..)| g.pseudonym.as_str())
                .collect();
            let tags = self.patient_tags(&db, &pseudonyms)?;
            for (grant, envelopes, consent) in &selected {
                let mut e = self.event(EventKind::Release, caller);
                e.why.consent_version = Some(Digest32(consent.0));
                e.patient = tags.get(&grant.pseudonym).copied();
                e.why.purpose = Some(purpose_label(&study.proposal.purpose));
                e.why.study_id = Some(study_id.to_owned());
                e.details.study_id = Some(study_id.to_owned());
                e.details.release_id = Some(release_id.clone());
                e.details.grant_id = Some(grant.grant_id.clone());
                e.details.definition_hash = Some(definition_hash);
                e.details.categories = envelopes
                    .iter()
                    .map(|(c, ..)| c.label().to_owned())
                    .collect();
                e.details.record_count = Some(envelopes.len() as u64);
                e.details.content_hashes = envelopes
                    .iter()
                    .filter_map(|(.., at)| content_hash(&at.name))
                    .collect();
                events.push(e);
                subjects.push(grant.pseudonym.clone());
                for (category, version, at) in envelopes {
                    items.push(ReleaseItemRow {
                        seq: items.len() as i64 + 1,
                        pseudonym: grant.pseudonym.clone(),
                        category: *category,
                        version: *version,
                        at: at.clone(),
                    });
                }
            }
        }
        let leaves = self.record(&events)?;
        self.checkpoint()?;
        let release = ReleaseRow {
            release_id,
            study_id: study_id.to_owned(),
            researcher_id: caller.actor_id.clone(),
            subjects: subjects.len() as u32,
            envelopes: items.len() as u32,
            created_at: now,
        };
        let logged: Vec<(String, u64)> = subjects.into_iter().zip(leaves).collect();
        self.db().insert_release(&release, &items, &logged)?;
        tracing::info!(release = %release.release_id, study = study_id, subjects = release.subjects, envelopes = items.len(), "release fixed");
        Ok(release)
    }

    /// Streams a release. One batch is re-encrypted while the previous one is sent, so
    /// memory is bounded by a few batches whatever the cohort size.
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
        let to = Arc::new(Recipient {
            grantee: study.study_id.clone(),
            receiving_key: study.proposal.receiving_key.clone(),
            study_pseudonyms: true,
        });
        let mut fetch = self.event(EventKind::Fetch, caller);
        fetch.why.study_id = Some(release.study_id.clone());
        fetch.details.study_id = Some(release.study_id.clone());
        fetch.details.release_id = Some(release.release_id.clone());
        fetch.details.record_count = Some(u64::from(release.envelopes));
        self.record(&[fetch])?;
        let (tx, rx) = mpsc::channel(2 * BATCH);
        let this = self.clone();
        let release_id = release.release_id.clone();
        tokio::spawn(async move {
            let mut after = 0i64;
            let mut in_flight: Option<tokio::task::JoinHandle<ServiceResult<Vec<ReleasedItem>>>> =
                None;
            for round in 0.. {
                let page = {
                    let this = this.clone();
                    let id = release_id.clone();
                    tokio::task::spawn_blocking(move || this.db().release_items(&id, after, BATCH))
                        .await
                };
                let page = match page {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => return drop(tx.send(Err(e.into())).await),
                    Err(e) => return drop(tx.send(Err(ServiceError::internal(e))).await),
                };
                let next = page.last().map(|last| last.seq).map(|last| {
                    after = last;
                    let (this, to, id) = (this.clone(), to.clone(), release_id.clone());
                    tokio::spawn(async move {
                        let evidence = {
                            let (this, id, page) = (this.clone(), id.clone(), page.clone());
                            tokio::task::spawn_blocking(move || this.release_evidence(&id, &page))
                                .await
                                .map_err(ServiceError::internal)??
                        };
                        this.reencrypt_page(&to, &id, evidence, page, round).await
                    })
                });
                if let Some(previous) = in_flight.take() {
                    match previous
                        .await
                        .map_err(ServiceError::internal)
                        .and_then(|r| r)
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
                }
                match next {
                    Some(handle) => in_flight = Some(handle),
                    None => break,
                }
            }
        });
        Ok((release, rx))
    }

    /// Re-encrypts one batch: loads the envelopes, asks `t` proxies (rotating, to spread
    /// load), screens their fragments ([`super::cfrag_check`]: a sample, or all of a
    /// proxy caught lying), and asks the other proxies for items that still lack `t`
    /// fragments (a proxy down, or lying). Items that cannot get `t` are withheld.
    pub(super) async fn reencrypt_page(
        self: &Arc<Self>,
        to: &Recipient,
        release_id: &str,
        evidence: LoggedRelease,
        page: Vec<ReleaseItemRow>,
        round: usize,
    ) -> ServiceResult<Vec<ReleasedItem>> {
        let this = self.clone();
        let receiving_key = to.receiving_key.clone();
        let (loaded, receiving) =
            tokio::task::spawn_blocking(move || this.load_page(page, &receiving_key))
                .await
                .map_err(ServiceError::internal)??;
        let loaded = Arc::new(loaded);
        let t = self.threshold;
        let n = self.proxies.len();
        let mut cfrags: Vec<Vec<Vec<u8>>> = vec![Vec::new(); loaded.len()];
        for attempt in 0..n {
            let wanted: Vec<usize> = (0..loaded.len()).filter(|&i| cfrags[i].len() < t).collect();
            if wanted.is_empty() || (attempt > 0 && attempt + t > n) {
                break;
            }
            let proxies: Vec<usize> = if attempt == 0 {
                (0..t).map(|k| (round + k) % n).collect()
            } else {
                vec![(round + t + attempt - 1) % n]
            };
            let items: Vec<ReencryptRequest> = wanted
                .iter()
                .map(|&i| ReencryptRequest {
                    study_id: to.grantee.clone(),
                    pseudonym: loaded[i].row.pseudonym.clone(),
                    category: loaded[i].row.category,
                    capsule: loaded[i].capsule.clone(),
                })
                .collect();
            let calls: Vec<_> = proxies
                .iter()
                .map(|&p| {
                    let (pool, items, evidence) =
                        (self.proxies.clone(), items.clone(), evidence.clone());
                    tokio::spawn(async move { (p, pool.reencrypt(p, evidence, items).await) })
                })
                .collect();
            let mut answers: Vec<Answer> = Vec::new();
            for call in calls {
                let (p, answer) = call.await.map_err(ServiceError::internal)?;
                match answer {
                    Ok(c) if c.len() == wanted.len() => {
                        answers.extend(wanted.iter().zip(c).filter(|(_, c)| !c.is_empty()).map(
                            |(&item, cfrag)| Answer {
                                proxy: p,
                                item,
                                cfrag,
                            },
                        ))
                    }
                    Ok(_) => tracing::warn!(
                        proxy = p,
                        "proxy answered with the wrong number of fragments"
                    ),
                    Err(e) => {
                        tracing::warn!(proxy = p, error = %e, "proxy unavailable for re-encryption")
                    }
                }
            }
            let (this, items, receiving) = (self.clone(), loaded.clone(), receiving);
            let screened = tokio::task::spawn_blocking(move || {
                screen(answers, &this.suspects, &mut rand::thread_rng(), |i, c| {
                    check_cfrag(&items[i], &receiving, c)
                })
            })
            .await
            .map_err(ServiceError::internal)?;
            for (i, c) in screened.accepted {
                if cfrags[i].len() < t {
                    cfrags[i].push(c);
                }
            }
            for p in &screened.caught {
                tracing::warn!(
                    release = release_id,
                    proxy = p,
                    "a proxy's capsule fragment failed verification: every fragment of it is verified from now on"
                );
            }
            if screened.rejected > 0 {
                tracing::warn!(
                    release = release_id,
                    rejected = screened.rejected,
                    "capsule fragments failed verification and were discarded"
                );
            }
        }
        // The screening tasks that shared the batch have finished.
        let loaded = Arc::into_inner(loaded)
            .ok_or_else(|| ServiceError::internal("a screening task still holds the batch"))?;
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
                subject: if to.study_pseudonyms {
                    self.subject(&to.grantee, &row.pseudonym)
                } else {
                    row.pseudonym.clone()
                },
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
                "envelopes withheld: fewer than threshold proxies re-encrypted them (grant revoked or expired, proxies down, or a bad capsule)"
            );
        }
        Ok(out)
    }

    /// The proof, for the proxies, that a page's patients are in the logged release: the
    /// latest signed checkpoint and each patient's release event with its inclusion proof.
    fn release_evidence(
        &self,
        release_id: &str,
        page: &[ReleaseItemRow],
    ) -> ServiceResult<LoggedRelease> {
        let mut pseudonyms: Vec<&str> = page.iter().map(|r| r.pseudonym.as_str()).collect();
        pseudonyms.sort_unstable();
        pseudonyms.dedup();
        let mut leaves: Vec<u64> = self
            .db()
            .release_event_leaves(release_id, &pseudonyms)?
            .into_values()
            .collect();
        leaves.sort_unstable();
        self.evidence(release_id, &leaves)
    }

    /// The latest signed checkpoint and these leaves with their inclusion proofs in it.
    pub(super) fn evidence(
        &self,
        release_id: &str,
        leaves: &[u64],
    ) -> ServiceResult<LoggedRelease> {
        let checkpoint = self.checkpoint()?;
        let events = self.logged_events(leaves, checkpoint.checkpoint.size)?;
        Ok(LoggedRelease {
            release_id: release_id.to_owned(),
            checkpoint: checkpoint.to_note().map_err(ServiceError::internal)?,
            events,
        })
    }

    /// Loads a batch's envelopes and patient keys, and parses the receiving key. Capsules
    /// are not parsed here (umbral re-verifies a capsule as it deserializes it): the
    /// proxies parse each one, and the broker only those whose fragments it verifies.
    fn load_page(
        &self,
        page: Vec<ReleaseItemRow>,
        receiving_key: &[u8],
    ) -> ServiceResult<(Vec<Loaded>, PublicKey)> {
        let rows: Vec<(ReleaseItemRow, Vec<u8>, Vec<u8>)> = {
            let db = self.db();
            let mut patients: HashMap<String, crate::storage::db::PatientRow> = HashMap::new();
            let mut out = Vec::with_capacity(page.len());
            for row in page {
                if !patients.contains_key(&row.pseudonym) {
                    let p = db
                        .patient(&row.pseudonym)?
                        .ok_or_else(|| ServiceError::internal("released patient vanished"))?;
                    patients.insert(row.pseudonym.clone(), p);
                }
                let p = &patients[&row.pseudonym];
                let delegating = p
                    .category_keys
                    .get(&row.category)
                    .cloned()
                    .unwrap_or_default();
                out.push((row, delegating, p.verifying_key.clone()));
            }
            out
        };
        let loaded = rows
            .into_par_iter()
            .map(|(row, delegating, vk)| {
                let sealed = self.blobs.get(&row.at)?;
                let capsule = envelope::split_capsule(&sealed)
                    .map_err(ServiceError::internal)?
                    .to_vec();
                Ok(Loaded {
                    row,
                    sealed,
                    capsule,
                    delegating,
                    vk,
                })
            })
            .collect::<ServiceResult<Vec<_>>>()?;
        let receiving = public_key_from_bytes(receiving_key).map_err(ServiceError::internal)?;
        Ok((loaded, receiving))
    }
}
