//! Break-glass: a registered emergency clinician reads a patient's latest `critical`
//! records under the patient's standing emergency grant to the clinician's organisation,
//! only if the patient's consent allows it, only after the access is logged (the proxies
//! check its event), and only inside the access's window; the board reviews every use.

use std::sync::Arc;

use audit_log::event::{Digest32, Outcome};
use audit_log::{AuditEvent, EventKind};
use consent_policy::emergency_decision;
use model::{
    BreakGlassAccess, Caller, Category, EmergencyOrganisation, Finding, Review, emergency_grantee,
};
use pre_kms::emergency::EmergencyCard;
use pre_kms::keys::public_key_from_bytes;
use pre_kms::logged_release::{BREAK_GLASS_MAX_SECONDS, LoggedRelease};
use rand::RngCore;

use super::release::Recipient;
use super::{Broker, ReleasedItem, content_hash, now_secs};
use crate::error::{ServiceError, ServiceResult};
use crate::storage::db::{BreakGlassRow, ReleaseItemRow};

/// The broker's break-glass settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakGlassPolicy {
    /// How long an access lasts (seconds; at most 24 hours, which the proxies enforce).
    pub window_secs: i64,
    /// Attempts one clinician may make per hour (refused ones included); more are refused
    /// (`RESOURCE_EXHAUSTED`).
    pub per_hour: u32,
    /// Accesses by one clinician in 24 hours above which each further one is flagged
    /// for the board.
    pub flag_after: u32,
}

impl Default for BreakGlassPolicy {
    fn default() -> Self {
        BreakGlassPolicy {
            window_secs: BREAK_GLASS_MAX_SECONDS,
            per_hour: 5,
            flag_after: 3,
        }
    }
}

impl BreakGlassPolicy {
    /// Whether the settings make sense; the message says which does not.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=BREAK_GLASS_MAX_SECONDS).contains(&self.window_secs) {
            return Err(format!(
                "the break-glass window must be between 1 second and 24 hours, not {} seconds",
                self.window_secs
            ));
        }
        if self.per_hour == 0 {
            return Err("the break-glass rate limit must allow at least one access an hour".into());
        }
        Ok(())
    }
}

/// An access ready to be re-encrypted ([`Broker::delivery`]).
struct Delivery {
    row: BreakGlassRow,
    item: ReleaseItemRow,
    to: Recipient,
    evidence: LoggedRelease,
}

/// A reason longer than this is refused: it is logged and shown to the patient.
const MAX_REASON_CHARS: usize = 500;

/// What a break-glass call answers: the access and the patient's latest `critical`
/// envelope with its verified fragments.
#[derive(Debug, Clone)]
pub struct BreakGlassAnswer {
    pub access: BreakGlassAccess,
    pub items: Vec<ReleasedItem>,
}

fn plain_pseudonym(p: &str) -> bool {
    p.len() == 32
        && p.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Broker {
    /// Registers an emergency organisation (operator); the same registration again is a
    /// no-op, another key under a registered id is refused.
    pub fn register_emergency_org(
        &self,
        org: EmergencyOrganisation,
    ) -> ServiceResult<EmergencyOrganisation> {
        if !model::emergency::is_organisation_id(&org.organisation_id) {
            return Err(ServiceError::InvalidArgument(
                "an emergency organisation id is 1-64 lowercase letters, digits and -".into(),
            ));
        }
        let name = org.name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(ServiceError::InvalidArgument(
                "an emergency organisation needs a name of 1-200 characters".into(),
            ));
        }
        public_key_from_bytes(&org.receiving_key).map_err(|_| {
            ServiceError::InvalidArgument("the receiving key is not a public key".into())
        })?;
        let stored = self.db().put_emergency_org(
            &EmergencyOrganisation {
                name: name.to_owned(),
                ..org.clone()
            },
            now_secs(),
        )?;
        if stored.receiving_key != org.receiving_key {
            return Err(ServiceError::FailedPrecondition(format!(
                "emergency organisation {} is already registered with another receiving key",
                org.organisation_id
            )));
        }
        Ok(stored)
    }

    pub fn emergency_orgs(&self) -> ServiceResult<Vec<EmergencyOrganisation>> {
        Ok(self.db().emergency_orgs()?)
    }

    /// A registered emergency organisation, or why not.
    pub(super) fn emergency_org(&self, id: &str) -> ServiceResult<EmergencyOrganisation> {
        self.db().emergency_org(id)?.ok_or_else(|| {
            ServiceError::NotFound(format!(
                "{} is not a registered emergency organisation",
                model::quote::excerpt(id)
            ))
        })
    }

    /// Logs a refused break-glass attempt (about the patient, if known) and returns the
    /// error: every attempt by an authenticated clinician is accountable.
    fn refuse_break_glass(
        &self,
        caller: &Caller,
        pseudonym: Option<&str>,
        reason: &str,
        error: ServiceError,
    ) -> ServiceError {
        let mut e = self.event(EventKind::BreakGlass, caller);
        e.outcome = Outcome::Refused {
            reason: error.to_string(),
        };
        e.why.purpose = Some(reason.to_owned()).filter(|r| !r.is_empty());
        e.details.categories = vec![Category::Critical.label().to_owned()];
        if let Some(p) = pseudonym {
            match self.patient_tags(&self.db(), &[p]) {
                Ok(tags) => e.patient = tags.get(p).copied(),
                Err(err) => return err,
            }
        }
        match self.record(&[e]) {
            Ok(_) => error,
            Err(err) => err,
        }
    }

    /// Breaks the glass: checks the clinician's organisation, the rate limit, the card,
    /// the patient's consent and standing grant; logs the access and signs a checkpoint;
    /// then has the proxies re-encrypt the patient's latest `critical` envelope.
    pub async fn break_glass(
        self: &Arc<Self>,
        caller: Caller,
        pseudonym: String,
        card: String,
        reason: String,
    ) -> ServiceResult<BreakGlassAnswer> {
        let this = self.clone();
        let delivery = tokio::task::spawn_blocking(move || {
            this.open_break_glass(&caller, pseudonym, card, reason)
        })
        .await
        .map_err(ServiceError::internal)??;
        self.deliver_break_glass(delivery).await
    }

    fn open_break_glass(
        &self,
        caller: &Caller,
        pseudonym: String,
        card: String,
        reason: String,
    ) -> ServiceResult<Delivery> {
        let reason = reason.trim().to_owned();
        if reason.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "a reason is required: say why this is an emergency (it is logged and shown to the patient and the ethics board)".into(),
            ));
        }
        if reason.chars().count() > MAX_REASON_CHARS {
            return Err(ServiceError::InvalidArgument(format!(
                "the reason is longer than {MAX_REASON_CHARS} characters"
            )));
        }
        let card = match card.trim() {
            "" => None,
            token => Some(
                EmergencyCard::parse(token)
                    .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?,
            ),
        };
        let pseudonym = match (&card, pseudonym.trim()) {
            (Some(c), "") => c.pseudonym.clone(),
            (Some(c), p) if p != c.pseudonym => {
                return Err(ServiceError::InvalidArgument(
                    "the emergency card names another patient than the pseudonym given".into(),
                ));
            }
            (_, p) => p.to_owned(),
        };
        if !plain_pseudonym(&pseudonym) {
            return Err(ServiceError::InvalidArgument(
                "name the patient by their emergency card or their pseudonym (32 hex digits)"
                    .into(),
            ));
        }
        let now = now_secs();
        let organisation = self
            .actor(&caller.actor_id)
            .map(|a| a.organisation)
            .unwrap_or_default();
        let Some(org) = self.db().emergency_org(&organisation)? else {
            return Err(self.refuse_break_glass(
                caller,
                None,
                &reason,
                ServiceError::PermissionDenied(
                    "your organisation is not a registered emergency organisation".into(),
                ),
            ));
        };
        // Every attempt counts, refused ones too: probing for patients is rate-limited.
        let hour = self
            .db()
            .break_glass_attempts_since(&caller.actor_id, now - 3600)?;
        if hour >= self.break_glass.per_hour {
            return Err(self.refuse_break_glass(
                caller,
                None,
                &reason,
                ServiceError::Exhausted(format!(
                    "{hour} break-glass attempts in the last hour reach this broker's limit of {} per clinician; the ethics board reviews every use",
                    self.break_glass.per_hour
                )),
            ));
        }
        let Some(patient) = self.db().patient(&pseudonym)? else {
            return Err(self.refuse_break_glass(
                caller,
                None,
                &reason,
                ServiceError::NotFound("no patient with this pseudonym is enrolled".into()),
            ));
        };
        if let Some(card) = &card {
            let key =
                public_key_from_bytes(&patient.verifying_key).map_err(ServiceError::internal)?;
            if card.verify(&key).is_err() {
                return Err(self.refuse_break_glass(
                    caller,
                    Some(&pseudonym),
                    &reason,
                    ServiceError::PermissionDenied(
                        "the emergency card's signature does not verify for this patient".into(),
                    ),
                ));
            }
        }
        let history = self.patient_history(&pseudonym)?;
        let decision = emergency_decision(
            &history,
            &org.organisation_id,
            now,
            Some(now + self.break_glass.window_secs),
        );
        let Some(permit) = decision.permit() else {
            return Err(self.refuse_break_glass(
                caller,
                Some(&pseudonym),
                &reason,
                ServiceError::PermissionDenied(format!(
                    "break-glass refused: {}",
                    decision.reason()
                )),
            ));
        };
        let grantee = emergency_grantee(&org.organisation_id);
        let Some(grant_id) =
            self.db()
                .active_grant(&grantee, &pseudonym, Category::Critical, now)?
        else {
            return Err(self.refuse_break_glass(
                caller,
                Some(&pseudonym),
                &reason,
                ServiceError::FailedPrecondition(
                    "the patient holds no standing emergency grant for your organisation (their agent deposits it when their consent allows break-glass)".into(),
                ),
            ));
        };
        let item = self.latest_critical(&pseudonym)?;
        let recent_uses = self
            .db()
            .break_glass_uses_since(&caller.actor_id, now - 24 * 3600)?
            + 1;
        let expires_at =
            (now + self.break_glass.window_secs).min(permit.expiry().unwrap_or(i64::MAX));
        let mut id = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let access_id = format!("bg-{}", hex::encode(id));
        let mut e = self.event(EventKind::BreakGlass, caller);
        e.patient = self
            .patient_tags(&self.db(), &[pseudonym.as_str()])?
            .get(&pseudonym)
            .copied();
        e.why.purpose = Some(reason.clone());
        e.why.consent_version = Some(Digest32(permit.policy_hash().0));
        e.details.study_id = Some(grantee);
        e.details.release_id = Some(access_id.clone());
        e.details.grant_id = Some(grant_id.clone());
        e.details.categories = vec![Category::Critical.label().to_owned()];
        e.details.record_count = Some(1);
        e.details.content_hashes = content_hash(&item.at.name).into_iter().collect();
        e.details.expires_at = Some(expires_at);
        let leaf = self.record(&[e])?[0];
        self.checkpoint()?;
        let row = BreakGlassRow {
            access: BreakGlassAccess {
                access_id,
                clinician_id: caller.actor_id.clone(),
                organisation_id: org.organisation_id.clone(),
                pseudonym,
                reason,
                card_presented: card.is_some(),
                created_at: now,
                expires_at,
                leaf_index: leaf,
                recent_uses,
                flagged: recent_uses > self.break_glass.flag_after,
                review: None,
            },
            grant_id,
        };
        self.db().insert_break_glass(&row)?;
        tracing::warn!(
            access = %row.access.access_id,
            clinician = %row.access.clinician_id,
            organisation = %row.access.organisation_id,
            flagged = row.access.flagged,
            "break-glass access logged"
        );
        self.delivery(row, item, org)
    }

    fn latest_critical(&self, pseudonym: &str) -> ServiceResult<ReleaseItemRow> {
        let (category, version, at) = self
            .db()
            .latest_envelopes(pseudonym, &[Category::Critical])?
            .into_iter()
            .next()
            .ok_or_else(|| {
                ServiceError::NotFound("the patient has no critical record at this broker".into())
            })?;
        Ok(ReleaseItemRow {
            seq: 1,
            pseudonym: pseudonym.to_owned(),
            category,
            version,
            at,
        })
    }

    /// The same clinician, inside the window: the latest `critical` envelope again, under
    /// the access's own logged event (the proxies check its window too).
    pub async fn reopen_break_glass(
        self: &Arc<Self>,
        caller: Caller,
        access_id: String,
    ) -> ServiceResult<BreakGlassAnswer> {
        let this = self.clone();
        let delivery = tokio::task::spawn_blocking(move || {
            let row = this.db().break_glass(&access_id)?.ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "no break-glass access {}",
                    model::quote::excerpt(&access_id)
                ))
            })?;
            if row.access.clinician_id != caller.actor_id {
                return Err(ServiceError::PermissionDenied(
                    "only the clinician who broke the glass may reopen the access".into(),
                ));
            }
            let now = now_secs();
            if now >= row.access.expires_at {
                return Err(ServiceError::FailedPrecondition(format!(
                    "break-glass access {} expired at {}: break the glass again (a new, logged access)",
                    row.access.access_id, row.access.expires_at
                )));
            }
            let history = this.patient_history(&row.access.pseudonym)?;
            let decision = emergency_decision(
                &history,
                &row.access.organisation_id,
                now,
                Some(now + this.break_glass.window_secs),
            );
            if !decision.is_permit() {
                return Err(ServiceError::PermissionDenied(format!(
                    "break-glass refused: {}",
                    decision.reason()
                )));
            }
            let item = this.latest_critical(&row.access.pseudonym)?;
            let mut fetch = this.event(EventKind::Fetch, &caller);
            fetch.patient = this
                .patient_tags(&this.db(), &[row.access.pseudonym.as_str()])?
                .get(&row.access.pseudonym)
                .copied();
            fetch.details.release_id = Some(row.access.access_id.clone());
            fetch.details.study_id = Some(emergency_grantee(&row.access.organisation_id));
            fetch.details.categories = vec![Category::Critical.label().to_owned()];
            fetch.details.record_count = Some(1);
            this.record(&[fetch])?;
            let org = this.emergency_org(&row.access.organisation_id)?;
            this.delivery(row, item, org)
        })
        .await
        .map_err(ServiceError::internal)??;
        self.deliver_break_glass(delivery).await
    }

    /// What re-encrypting an access's envelope needs: the recipient (the organisation's
    /// key) and the access's logged event with its inclusion proof in a fresh checkpoint.
    fn delivery(
        &self,
        row: BreakGlassRow,
        item: ReleaseItemRow,
        org: EmergencyOrganisation,
    ) -> ServiceResult<Delivery> {
        let evidence = self.evidence(&row.access.access_id, &[row.access.leaf_index])?;
        Ok(Delivery {
            to: Recipient {
                grantee: emergency_grantee(&org.organisation_id),
                receiving_key: org.receiving_key,
                study_pseudonyms: false,
            },
            evidence,
            row,
            item,
        })
    }

    /// Re-encrypts the access's envelope under its logged event; fails if fewer than `t`
    /// proxies give fragments (the grant withdrawn, the window over at the proxies,
    /// proxies down).
    async fn deliver_break_glass(
        self: &Arc<Self>,
        Delivery {
            row,
            item,
            to,
            evidence,
        }: Delivery,
    ) -> ServiceResult<BreakGlassAnswer> {
        let items = self
            .reencrypt_page(&to, &row.access.access_id, evidence, vec![item], 0)
            .await?;
        if items.is_empty() {
            return Err(ServiceError::Unavailable(
                "fewer than the threshold of proxies re-encrypted the critical record (the grant withdrawn, the window over, or proxies down)".into(),
            ));
        }
        Ok(BreakGlassAnswer {
            access: row.access,
            items,
        })
    }

    /// Every break-glass access, newest first (the board's review queue).
    pub fn break_glass_accesses(
        &self,
        unreviewed_only: bool,
    ) -> ServiceResult<Vec<BreakGlassAccess>> {
        Ok(self.db().break_glass_list(unreviewed_only)?)
    }

    /// A board member's finding on one access, logged.
    pub fn review_break_glass(
        &self,
        caller: &Caller,
        access_id: &str,
        finding: &str,
        note: &str,
    ) -> ServiceResult<BreakGlassAccess> {
        let finding: Finding = finding
            .parse()
            .map_err(|e: model::emergency::UnknownFinding| {
                ServiceError::InvalidArgument(e.to_string())
            })?;
        let note = note.trim();
        if note.is_empty() || note.chars().count() > MAX_REASON_CHARS {
            return Err(ServiceError::InvalidArgument(format!(
                "a review needs a note of 1-{MAX_REASON_CHARS} characters"
            )));
        }
        let row = self.db().break_glass(access_id)?.ok_or_else(|| {
            ServiceError::NotFound(format!(
                "no break-glass access {}",
                model::quote::excerpt(access_id)
            ))
        })?;
        let review = Review {
            board_id: caller.actor_id.clone(),
            finding,
            note: note.to_owned(),
            reviewed_at: now_secs(),
        };
        let mut e: AuditEvent = self.event(EventKind::BreakGlassReview, caller);
        e.why.purpose = Some(format!("{finding}: {note}"));
        e.details.release_id = Some(row.access.access_id.clone());
        e.details.study_id = Some(emergency_grantee(&row.access.organisation_id));
        let intents = {
            let mut db = self.db();
            let log_size = self.audit.size();
            db.review_break_glass(access_id, &review, log_size, &e)?
        };
        self.record_intended(&[e], &intents)?;
        Ok(BreakGlassAccess {
            review: Some(review),
            ..row.access
        })
    }
}
