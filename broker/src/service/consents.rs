//! Consent policies: stored per patient as signed versions; a new version takes effect at
//! once, withdrawing the grants it no longer permits.

use std::collections::HashMap;
use std::sync::Arc;

use audit_log::EventKind;
use audit_log::event::Digest32;
use consent_policy::{ConsentPolicy, PolicyHistory};
use pre_kms::keys::{public_key_from_bytes, verify_signature};

use super::{Broker, now_secs};
use crate::error::{ServiceError, ServiceResult};
use consent_policy::{ConsentReceipt, ConsentSubmission};
use consent_policy::{Grantee, SignedPolicy, consent_digest, grant_permitted, history};
use model::Caller;

/// How far ahead of the broker's clock a policy may say it was issued.
const CLOCK_SKEW: i64 = 300;

impl Broker {
    /// Checks and stores each submission (all or none), logs it, then withdraws every
    /// grant the patient's new policy no longer permits as it stands (study, categories,
    /// expiry).
    pub async fn set_consents(
        self: &Arc<Self>,
        caller: Caller,
        submissions: Vec<ConsentSubmission>,
    ) -> ServiceResult<Vec<ConsentReceipt>> {
        if submissions.is_empty() {
            return Err(ServiceError::InvalidArgument("no consents given".into()));
        }
        self.check_acts_for(&caller, submissions.iter().map(|s| &s.pseudonym))?;
        let this = self.clone();
        let who = caller.clone();
        let (mut receipts, to_withdraw) =
            tokio::task::spawn_blocking(move || this.store_consents(&who, submissions))
                .await
                .map_err(ServiceError::internal)??;
        if to_withdraw.iter().any(|g| !g.is_empty()) {
            crate::crash::point(crate::crash::CONSENT_BEFORE_WITHDRAWAL);
        }
        for (i, grants) in to_withdraw.into_iter().enumerate() {
            if !grants.is_empty() {
                let (n, _) = self
                    .withdraw_grants(caller.clone(), grants, "consent changed".into())
                    .await?;
                receipts[i].grants_withdrawn = n;
            }
        }
        let done: Vec<String> = receipts.iter().map(|r| r.pseudonym.clone()).collect();
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.db().consents_reconciled(&done))
            .await
            .map_err(ServiceError::internal)??;
        Ok(receipts)
    }

    /// Withdraws the grants that the current consent of each patient marked for
    /// reconciliation no longer permits: the consent was stored, but a crash came before
    /// its withdrawals were done. Run at start. Returns the grants withdrawn.
    pub async fn reconcile_consents(self: &Arc<Self>) -> ServiceResult<usize> {
        let this = self.clone();
        let (pending, to_withdraw) = tokio::task::spawn_blocking(move || {
            let pending = this.db().consents_to_reconcile()?;
            let now = now_secs();
            let mut to_withdraw = Vec::new();
            for p in &pending {
                let history = this.patient_history(p)?;
                to_withdraw.extend(this.grants_not_permitted(p, &history, now)?);
            }
            Ok::<_, ServiceError>((pending, to_withdraw))
        })
        .await
        .map_err(ServiceError::internal)??;
        if pending.is_empty() {
            return Ok(0);
        }
        let withdrawn = if to_withdraw.is_empty() {
            0
        } else {
            let by = self.system_event(EventKind::GrantWithdrawn);
            self.withdraw(
                by,
                to_withdraw,
                "consent changed (redone after a restart)".into(),
            )
            .await?
            .0
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.db().consents_reconciled(&pending))
            .await
            .map_err(ServiceError::internal)??;
        Ok(withdrawn)
    }

    /// Stores the versions; returns receipts and, per submission, the grants to withdraw.
    #[allow(clippy::type_complexity)]
    fn store_consents(
        &self,
        caller: &Caller,
        submissions: Vec<ConsentSubmission>,
    ) -> ServiceResult<(Vec<ConsentReceipt>, Vec<Vec<(String, String)>>)> {
        let now = now_secs();
        // Each patient's versions as they will stand: stored ones, then this call's, so
        // that submissions in one call are checked against each other too.
        let mut histories: HashMap<String, Vec<SignedPolicy>> = HashMap::new();
        let mut accepted: Vec<(String, SignedPolicy)> = Vec::with_capacity(submissions.len());
        {
            let db = self.db();
            for (i, s) in submissions.into_iter().enumerate() {
                let bad = |m: String| ServiceError::InvalidArgument(format!("consent {i}: {m}"));
                let policy =
                    ConsentPolicy::from_json(&s.policy_json).map_err(|e| bad(e.to_string()))?;
                let patient = db
                    .patient(&s.pseudonym)?
                    .ok_or_else(|| ServiceError::internal("patient vanished"))?;
                let vk = public_key_from_bytes(&patient.verifying_key)
                    .map_err(ServiceError::internal)?;
                if !verify_signature(
                    &vk,
                    &consent_digest(&s.pseudonym, policy.canonical_bytes()),
                    &s.signature,
                ) {
                    return Err(bad(
                        "the patient's signature over the policy does not verify".into(),
                    ));
                }
                if policy.issued_at() > now + CLOCK_SKEW {
                    return Err(bad(format!(
                        "the policy says it was issued at {}, in the future",
                        policy.issued_at()
                    )));
                }
                let versions = match histories.entry(s.pseudonym.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(db.consents(&s.pseudonym)?)
                    }
                };
                if let Some(latest) = versions.last()
                    && latest.policy.version() >= policy.version()
                {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "consent {i}: version {} is not newer than version {}; issue version {}",
                        policy.version(),
                        latest.policy.version(),
                        latest.policy.version() + 1
                    )));
                }
                let version = SignedPolicy {
                    policy,
                    signature: s.signature,
                    set_at: now,
                };
                versions.push(version.clone());
                history(versions).map_err(|e| bad(e.to_string()))?;
                accepted.push((s.pseudonym, version));
            }
        }
        // The versions, their events (as intents) and the marks that their grants are to
        // be reconciled, in one transaction: a crash after it loses neither the events
        // (logged at start) nor the withdrawals (redone at start).
        let tags = {
            let db = self.db();
            let pseudonyms: Vec<&str> = accepted.iter().map(|(p, _)| p.as_str()).collect();
            self.patient_tags(&db, &pseudonyms)?
        };
        let events: Vec<_> = accepted
            .iter()
            .map(|(p, v)| {
                let kind = if v.policy.provisions().is_empty() {
                    EventKind::ConsentRevoked
                } else {
                    EventKind::ConsentSet
                };
                let mut e = self.event(kind, caller);
                e.patient = tags.get(p).copied();
                e.why.consent_version = Some(Digest32(v.policy.policy_hash().0));
                e
            })
            .collect();
        let intents = {
            let mut db = self.db();
            let log_size = self.audit.size();
            db.insert_consents(&accepted, log_size, &events)?
        };
        let changed: Vec<&str> = accepted.iter().map(|(p, _)| p.as_str()).collect();
        self.consents_changed(&changed)?;
        self.record_intended(&events, &intents)?;
        let receipts = accepted
            .iter()
            .map(|(p, v)| ConsentReceipt {
                pseudonym: p.clone(),
                version: v.policy.version(),
                policy_hash: v.policy.policy_hash().to_hex(),
                grants_withdrawn: 0,
            })
            .collect();
        // Grants to withdraw, once per patient (on the receipt of their last submission).
        let mut withdraw = vec![Vec::new(); accepted.len()];
        for (p, versions) in &histories {
            let last = accepted
                .iter()
                .rposition(|(q, _)| q == p)
                .expect("every history came from a submission");
            let history = history(versions).map_err(ServiceError::internal)?;
            withdraw[last] = self.grants_not_permitted(p, &history, now)?;
        }
        Ok((receipts, withdraw))
    }

    /// The patient's grants that `history` does not permit as they stand.
    fn grants_not_permitted(
        &self,
        pseudonym: &str,
        history: &PolicyHistory,
        now: i64,
    ) -> ServiceResult<Vec<(String, String)>> {
        let grants = self.db().patient_grants(pseudonym)?;
        let mut out = Vec::new();
        for (study_id, categories, expires_at) in grants {
            let study;
            let grantee = match model::emergency_organisation_of(&study_id) {
                Some(org) => Grantee::Emergency(org),
                None => {
                    study = self.study(&study_id)?;
                    Grantee::Study(&study)
                }
            };
            if !grant_permitted(history, grantee, &categories, expires_at, now) {
                out.push((study_id, pseudonym.to_owned()));
            }
        }
        Ok(out)
    }

    /// Every stored version of a patient's policy.
    pub fn consent_history(
        &self,
        caller: &Caller,
        pseudonym: &str,
    ) -> ServiceResult<Vec<SignedPolicy>> {
        self.check_acts_for(caller, std::iter::once(&pseudonym.to_owned()))?;
        Ok(self.db().consents(pseudonym)?)
    }

    /// The current policy history of a patient (empty if none was set).
    pub(crate) fn patient_history(&self, pseudonym: &str) -> ServiceResult<PolicyHistory> {
        let versions = self.db().consents(pseudonym)?;
        history(&versions).map_err(ServiceError::internal)
    }
}
