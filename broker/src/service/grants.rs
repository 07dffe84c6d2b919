//! Grants: checked against the study and the patient's signature, kfrags passed on to
//! the proxies (which verify them), then recorded.

use std::sync::Arc;

use pre_kms::grant::Grant;
use pre_kms::keys::public_key_from_bytes;
use rayon::prelude::*;

use audit_log::{AuditEvent, EventKind};

use super::{Broker, now_secs};
use crate::error::{ServiceError, ServiceResult};
use crate::proxy_pool::KfragDeposit;
use crate::storage::db::GrantRow;
use consent_policy::{decide, grant_scope};
use model::{Caller, Category, EmergencyOrganisation, emergency_organisation_of};

#[derive(Debug, Clone, PartialEq)]
pub struct GrantOutcome {
    pub grant_ids: Vec<String>,
}

impl Broker {
    pub async fn issue_grants(
        self: &Arc<Self>,
        caller: Caller,
        grants: Vec<Grant>,
    ) -> ServiceResult<GrantOutcome> {
        let this = self.clone();
        let who = caller.clone();
        let checked = tokio::task::spawn_blocking(move || this.check_grants(&who, &grants))
            .await
            .map_err(ServiceError::internal)??;
        // One deposit call per proxy, all proxies at once.
        let n = self.proxies.len();
        let mut per_proxy: Vec<Vec<KfragDeposit>> = vec![Vec::new(); n];
        for (_, deposits) in &checked {
            for (i, d) in deposits.iter().enumerate() {
                per_proxy[i].extend(d.iter().cloned());
            }
        }
        let calls = per_proxy.into_iter().enumerate().map(|(i, deposits)| {
            let pool = self.proxies.clone();
            tokio::spawn(async move { pool.deposit(i, deposits).await })
        });
        for call in calls.collect::<Vec<_>>() {
            call.await.map_err(ServiceError::internal)??;
        }
        let rows: Vec<GrantRow> = checked.into_iter().map(|(row, _)| row).collect();
        let ids = rows.iter().map(|r| r.grant_id.clone()).collect();
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let tags = {
                let db = this.db();
                let pseudonyms: Vec<&str> = rows.iter().map(|r| r.pseudonym.as_str()).collect();
                this.patient_tags(&db, &pseudonyms)?
            };
            let events: Vec<AuditEvent> = rows
                .iter()
                .map(|r| {
                    let mut e = this.event(EventKind::GrantIssued, &caller);
                    e.patient = tags.get(&r.pseudonym).copied();
                    e.why.study_id = Some(r.study_id.clone());
                    e.details.study_id = Some(r.study_id.clone());
                    e.details.grant_id = Some(r.grant_id.clone());
                    e.details.categories =
                        r.categories.iter().map(|c| c.label().to_owned()).collect();
                    e
                })
                .collect();
            // The grants and their events (as intents) in one transaction.
            let intents = {
                let mut db = this.db();
                let log_size = this.audit.size();
                db.put_grants(&rows, now_secs(), log_size, &events)?
            };
            this.record_intended(&events, &intents)
        })
        .await
        .map_err(ServiceError::internal)??;
        Ok(GrantOutcome { grant_ids: ids })
    }

    /// Withdraws grants: the broker forgets them at once (no later release includes them),
    /// queues the destruction of their kfrags at every proxy, and asks every proxy now.
    /// Proxies that cannot be reached are retried ([`Broker::retry_revocations`]).
    /// Returns (grants withdrawn, proxies that confirmed all pending revocations).
    pub async fn withdraw_grants(
        self: &Arc<Self>,
        caller: Caller,
        grants: Vec<(String, String)>,
        reason: String,
    ) -> ServiceResult<(usize, usize)> {
        if grants.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "no grants to withdraw".into(),
            ));
        }
        self.check_acts_for(&caller, grants.iter().map(|(_, p)| p))?;
        let by = self.event(EventKind::GrantWithdrawn, &caller);
        self.withdraw(by, grants, reason).await
    }

    /// Withdraws grants, each logged as a copy of the event `by` (which says who).
    pub(crate) async fn withdraw(
        self: &Arc<Self>,
        by: AuditEvent,
        grants: Vec<(String, String)>,
        reason: String,
    ) -> ServiceResult<(usize, usize)> {
        let this = self.clone();
        let withdrawn = tokio::task::spawn_blocking(move || {
            // The withdrawals, their queued revocations and their events (as intents) in
            // one transaction.
            let (existed, events, intents) = {
                let mut db = this.db();
                let pseudonyms: Vec<&str> = grants.iter().map(|(_, p)| p.as_str()).collect();
                let tags = this.patient_tags(&db, &pseudonyms)?;
                let log_size = this.audit.size();
                db.withdraw_grants(&grants, this.proxies.len(), log_size, |existed| {
                    existed
                        .iter()
                        .map(|(study, pseudonym, grant)| {
                            let mut e = by.clone();
                            e.patient = tags.get(pseudonym).copied();
                            e.why.purpose = Some(reason.clone()).filter(|r| !r.is_empty());
                            e.why.study_id = Some(study.clone());
                            e.details.study_id = Some(study.clone());
                            e.details.grant_id = Some(grant.clone());
                            e
                        })
                        .collect()
                })?
            };
            this.record_intended(&events, &intents)?;
            Ok::<_, ServiceError>(existed.len())
        })
        .await
        .map_err(ServiceError::internal)??;
        let confirmed = self.retry_revocations().await?;
        Ok((withdrawn, confirmed))
    }

    /// Asks each proxy to destroy the kfrags of every revocation still pending for it;
    /// returns how many proxies have none left pending.
    pub async fn retry_revocations(self: &Arc<Self>) -> ServiceResult<usize> {
        let this = self.clone();
        let pending = tokio::task::spawn_blocking(move || this.db().pending_revocations())
            .await
            .map_err(ServiceError::internal)??;
        let mut confirmed = self.proxies.len() - pending.len();
        for (proxy, grants) in pending {
            match self.proxies.revoke(proxy, &grants).await {
                Ok(_) => {
                    let this = self.clone();
                    tokio::task::spawn_blocking(move || {
                        this.db().confirm_revocations(proxy, &grants)
                    })
                    .await
                    .map_err(ServiceError::internal)??;
                    confirmed += 1;
                }
                Err(e) => tracing::warn!(proxy, error = %e, "revocation pending at a proxy"),
            }
        }
        Ok(confirmed)
    }

    /// Validates each grant; returns its row and, per proxy, the deposits to make.
    #[allow(clippy::type_complexity)]
    fn check_grants(
        &self,
        caller: &Caller,
        grants: &[Grant],
    ) -> ServiceResult<Vec<(GrantRow, Vec<Vec<KfragDeposit>>)>> {
        if grants.is_empty() {
            return Err(ServiceError::InvalidArgument("no grants given".into()));
        }
        self.check_acts_for(caller, grants.iter().map(|g| &g.pseudonym))?;
        let now = now_secs();
        let mut studies = std::collections::HashMap::new();
        let mut patients = std::collections::HashMap::new();
        let mut consents = std::collections::HashMap::new();
        for g in grants {
            if !studies.contains_key(&g.study_id) {
                let target = match emergency_organisation_of(&g.study_id) {
                    Some(org) => Grantee::Emergency(self.emergency_org(org)?),
                    None => Grantee::Study(Box::new(self.study(&g.study_id)?)),
                };
                studies.insert(g.study_id.clone(), target);
            }
            if !patients.contains_key(&g.pseudonym) {
                let p = self
                    .db()
                    .patient(&g.pseudonym)?
                    .ok_or_else(|| ServiceError::internal("patient vanished"))?;
                patients.insert(g.pseudonym.clone(), p);
                consents.insert(g.pseudonym.clone(), self.patient_history(&g.pseudonym)?);
            }
        }
        grants
            .par_iter()
            .enumerate()
            .map(|(i, g)| {
                let patient = &patients[&g.pseudonym];
                let study = match &studies[&g.study_id] {
                    Grantee::Study(study) => study,
                    Grantee::Emergency(org) => {
                        let receiving_key = self.check_emergency_grant(
                            i,
                            g,
                            org,
                            &consents[&g.pseudonym],
                            now,
                        )?;
                        return self.checked_grant(i, g, patient, receiving_key);
                    }
                };
                if let Some(reason) = study.closed_because(now) {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "{reason}: grants can be issued only for an approved study in its period"
                    )));
                }
                // The patient's consent decides what a grant may hold, whoever issues it.
                let decision = decide(&consents[&g.pseudonym], study, now);
                let (allowed, expiry) = grant_scope(&decision, study)
                    .map_err(|m| ServiceError::PermissionDenied(format!("grant {i}: {m}")))?;
                if let Some(c) = g.categories.iter().find(|c| !allowed.contains(&c.category)) {
                    return Err(ServiceError::PermissionDenied(format!(
                        "grant {i}: the patient's consent does not permit releasing {} to this study",
                        c.category
                    )));
                }
                if g.expires_at > expiry {
                    return Err(ServiceError::PermissionDenied(format!(
                        "grant {i}: it expires at {}, after the consent allows ({expiry})",
                        g.expires_at
                    )));
                }
                if g.expires_at > study.proposal.not_after || g.expires_at <= now {
                    return Err(ServiceError::InvalidArgument(format!(
                        "grant {i}: expiry must be in the future and no later than the study's end"
                    )));
                }
                if let Some(c) = g
                    .categories
                    .iter()
                    .find(|c| !study.proposal.categories.contains(&c.category))
                {
                    return Err(ServiceError::InvalidArgument(format!(
                        "grant {i}: category {} was not requested by the study",
                        c.category
                    )));
                }
                self.checked_grant(i, g, patient, study.proposal.receiving_key.clone())
            })
            .collect()
    }

    /// A standing break-glass grant: `critical` only, to a registered emergency
    /// organisation, while the patient's current consent allows break-glass, expiring no
    /// later than that consent and within [`STANDING_GRANT_MAX_SECONDS`]. Returns the
    /// organisation's receiving key.
    fn check_emergency_grant(
        &self,
        i: usize,
        g: &Grant,
        org: &EmergencyOrganisation,
        history: &consent_policy::PolicyHistory,
        now: i64,
    ) -> ServiceResult<Vec<u8>> {
        if g.categories.len() != 1 || g.categories[0].category != Category::Critical {
            return Err(ServiceError::InvalidArgument(format!(
                "grant {i}: a grant to an emergency organisation holds the critical category only"
            )));
        }
        let end = consent_policy::standing_emergency(history, &org.organisation_id, now)
            .map_err(|reason| ServiceError::PermissionDenied(format!("grant {i}: {reason}")))?
            .unwrap_or(i64::MAX);
        if g.expires_at <= now || g.expires_at > end.min(now + STANDING_GRANT_MAX_SECONDS) {
            return Err(ServiceError::InvalidArgument(format!(
                "grant {i}: a standing emergency grant must expire in the future, within a year and no later than the patient's consent"
            )));
        }
        Ok(org.receiving_key.clone())
    }

    /// The checks every grant passes whatever its grantee (threshold, one kfrag per
    /// proxy per category, the patient's signature), and what to deposit at each proxy.
    fn checked_grant(
        &self,
        i: usize,
        g: &Grant,
        patient: &crate::storage::db::PatientRow,
        receiving_key: Vec<u8>,
    ) -> ServiceResult<(GrantRow, Vec<Vec<KfragDeposit>>)> {
        if g.threshold as usize != self.threshold {
            return Err(ServiceError::InvalidArgument(format!(
                "grant {i}: threshold must be {} (this broker's)",
                self.threshold
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &g.categories {
            if !seen.insert(c.category) {
                return Err(ServiceError::InvalidArgument(format!(
                    "grant {i}: category {} twice",
                    c.category
                )));
            }
            if c.sealed_kfrags.len() != self.proxies.len() {
                return Err(ServiceError::InvalidArgument(format!(
                    "grant {i}: {} kfrags for {} proxies",
                    c.sealed_kfrags.len(),
                    self.proxies.len()
                )));
            }
        }
        let vk = public_key_from_bytes(&patient.verifying_key).map_err(ServiceError::internal)?;
        g.verify_signature(&vk).map_err(|_| {
            ServiceError::InvalidArgument(format!(
                "grant {i}: the patient's signature does not verify"
            ))
        })?;
        let grant_id = g.grant_id.clone();
        let mut deposits = vec![Vec::new(); self.proxies.len()];
        for c in &g.categories {
            let delegating = patient
                .category_keys
                .get(&c.category)
                .ok_or_else(|| ServiceError::internal("enrolled patient lacks a category key"))?;
            for (p, sealed) in c.sealed_kfrags.iter().enumerate() {
                deposits[p].push(KfragDeposit {
                    grant_id: grant_id.clone(),
                    study_id: g.study_id.clone(),
                    pseudonym: g.pseudonym.clone(),
                    category: c.category,
                    expires_at: g.expires_at,
                    patient_verifying_key: patient.verifying_key.clone(),
                    delegating_key: delegating.clone(),
                    receiving_key: receiving_key.clone(),
                    sealed_kfrag: sealed.clone(),
                });
            }
        }
        let row = GrantRow {
            grant_id,
            study_id: g.study_id.clone(),
            pseudonym: g.pseudonym.clone(),
            threshold: g.threshold,
            expires_at: g.expires_at,
            signature: g.signature.clone(),
            categories: g.categories.iter().map(|c| c.category).collect(),
        };
        Ok((row, deposits))
    }
}

/// What a grant delegates to.
enum Grantee {
    Study(Box<model::Study>),
    Emergency(EmergencyOrganisation),
}

/// A standing emergency grant lasts at most a year (the agent renews it).
pub const STANDING_GRANT_MAX_SECONDS: i64 = 366 * 24 * 3600;
