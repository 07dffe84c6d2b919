//! Studies: the sponsor proposes, the board decides with its signature.

use audit_log::{AuditEvent, EventKind};
use pre_kms::keys::{check_receiving_key, public_key_from_bytes, verify_signature};

use super::{Broker, now_secs};
use crate::error::{ServiceError, ServiceResult};
use model::{Caller, Role};
use model::{Study, StudyProposal, StudyStatus, decision_digest, purpose_label};

impl Broker {
    pub fn propose_study(&self, caller: &Caller, proposal: StudyProposal) -> ServiceResult<Study> {
        if proposal.title.trim().is_empty() {
            return Err(ServiceError::InvalidArgument(
                "a study needs a title".into(),
            ));
        }
        if proposal.categories.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "a study must request at least one category".into(),
            ));
        }
        if proposal.not_after <= proposal.not_before {
            return Err(ServiceError::InvalidArgument(
                "the study period ends before it starts".into(),
            ));
        }
        public_key_from_bytes(&proposal.receiving_key).map_err(|_| {
            ServiceError::InvalidArgument("receiving_key is not a public key".into())
        })?;
        match self.actor(&proposal.researcher_id) {
            Some(a) if a.role == Role::Researcher => {
                // The sponsor names the researcher; the records go to the researcher's
                // own key, never to one the sponsor chose.
                check_receiving_key(&a, &proposal.receiving_key)
                    .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
            }
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "researcher_id must name a registered researcher".into(),
                ));
            }
        }
        if let Some(missing) = proposal.cohort.fields().difference(&proposal.fields).next() {
            return Err(ServiceError::InvalidArgument(format!(
                "the cohort searches {missing}, which the study does not request as a searchable field"
            )));
        }
        let now = now_secs();
        let study = Study {
            study_id: study_id(&proposal, &caller.actor_id, now),
            proposal,
            sponsor_id: caller.actor_id.clone(),
            status: StudyStatus::Proposed,
            board_id: String::new(),
            board_signature: Vec::new(),
            reason: String::new(),
            proposed_at: now,
            decided_at: 0,
            overrides_abstain: false,
            sponsor_organisation: self
                .actor(&caller.actor_id)
                .map(|a| a.organisation)
                .unwrap_or_default(),
        };
        let event = self.study_event(EventKind::StudyProposed, caller, &study);
        let intents = {
            let mut db = self.db();
            db.insert_study(&study, self.audit.size(), &event)?
        };
        self.record_intended(&[event], &intents)?;
        Ok(study)
    }

    pub fn study(&self, study_id: &str) -> ServiceResult<Study> {
        self.db()
            .study(study_id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no study {study_id}")))
    }

    pub fn studies(&self) -> ServiceResult<Vec<Study>> {
        Ok(self.db().studies()?)
    }

    /// A board member approves or rejects a proposed study, signing the decision.
    pub fn decide_study(
        &self,
        caller: &Caller,
        study_id: &str,
        approve: bool,
        overrides_abstain: bool,
        reason: String,
        signature: Vec<u8>,
    ) -> ServiceResult<Study> {
        let mut study = self.study(study_id)?;
        if study.status != StudyStatus::Proposed {
            return Err(ServiceError::FailedPrecondition(format!(
                "study {study_id} is already {}",
                study.status.as_str()
            )));
        }
        let board = self
            .actor(&caller.actor_id)
            .ok_or_else(|| ServiceError::internal("caller vanished"))?;
        let key = public_key_from_bytes(&board.verifying_key).map_err(ServiceError::internal)?;
        if !verify_signature(
            &key,
            &decision_digest(study_id, &study.proposal, approve, overrides_abstain),
            &signature,
        ) {
            return Err(ServiceError::InvalidArgument(
                "the board signature does not cover this study and decision".into(),
            ));
        }
        study.status = if approve {
            StudyStatus::Approved
        } else {
            StudyStatus::Rejected
        };
        study.board_id = caller.actor_id.clone();
        study.board_signature = signature;
        study.reason = reason;
        study.decided_at = now_secs();
        study.overrides_abstain = approve && overrides_abstain;
        let kind = if approve {
            EventKind::StudyApproved
        } else {
            EventKind::StudyRejected
        };
        let event = self.study_event(kind, caller, &study);
        let intents = {
            let mut db = self.db();
            db.decide_study(&study, self.audit.size(), &event)?
        };
        self.record_intended(&[event], &intents)?;
        Ok(study)
    }

    fn study_event(&self, kind: EventKind, caller: &Caller, study: &Study) -> AuditEvent {
        let mut e = self.event(kind, caller);
        e.why.purpose = Some(purpose_label(&study.proposal.purpose));
        e.why.study_id = Some(study.study_id.clone());
        e.details.study_id = Some(study.study_id.clone());
        e.details.categories = study
            .proposal
            .categories
            .iter()
            .map(|c| c.label().to_owned())
            .collect();
        e
    }
}
/// A fresh study id: a hash of the sponsor, the proposal and a random nonce, so that
/// the same proposal made twice is two studies.
fn study_id(proposal: &StudyProposal, sponsor_id: &str, proposed_at: i64) -> String {
    let json = serde_json::to_vec(proposal).expect("proposal serializes");
    let mut nonce = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    let mut h = blake3::Hasher::new_derive_key("broker study id v1");
    h.update(sponsor_id.as_bytes());
    h.update(&[0]);
    h.update(&proposed_at.to_be_bytes());
    h.update(&nonce);
    h.update(&json);
    format!("st-{}", &h.finalize().to_hex()[..16])
}
