//! Consent as the broker and the patient's agent both apply it: what a patient signs,
//! the access request a study makes of a patient, and what a study may search and take of
//! a patient (and so what a grant may hold).
//!
//! The policy model and its evaluation are the rest of this crate; this module binds them
//! to studies, patients and grants, once, for the server and the client alike.

use std::collections::BTreeSet;

use model::{Category, SearchField, Study};

use crate::{
    AccessRequest, Categories, ConsentPolicy, DataUse, Decision, Period, PolicyDraft, PolicyError,
    PolicyHash, PolicyHistory, Primary, Provision, Requester,
};

/// What a patient signs to set a consent policy: the patient's pseudonym and the
/// policy's canonical bytes, so that a signed policy cannot be replayed for another
/// patient.
pub fn consent_digest(pseudonym: &str, canonical: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("broker consent v1");
    h.update(pseudonym.as_bytes());
    h.update(&[0]);
    h.update(canonical);
    *h.finalize().as_bytes()
}

/// A consent version submitted for a patient: the policy JSON and the patient's
/// signature over [`consent_digest`] of its canonical form.
#[derive(Debug, Clone)]
pub struct ConsentSubmission {
    pub pseudonym: String,
    pub policy_json: Vec<u8>,
    pub signature: Vec<u8>,
}

/// What became of one submission at the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsentReceipt {
    pub pseudonym: String,
    pub version: u32,
    pub policy_hash: String,
    pub grants_withdrawn: usize,
}

/// One stored version of a patient's policy, with the patient's signature.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedPolicy {
    pub policy: ConsentPolicy,
    pub signature: Vec<u8>,
    /// When the broker accepted it.
    pub set_at: i64,
}

/// A patient's policy history from stored versions.
pub fn history(versions: &[SignedPolicy]) -> Result<PolicyHistory, PolicyError> {
    PolicyHistory::new(versions.iter().map(|v| v.policy.clone()))
}

/// The request a study makes of each patient: its sponsor's registered organisation,
/// its research purpose (commercial if the purpose says so), the categories and
/// searchable fields it asked for, its approval period, and the board's decision on
/// abstentions.
pub fn study_request(study: &Study) -> AccessRequest {
    let p = &study.proposal;
    let requester = Requester {
        organisation: study.sponsor_organisation.clone(),
        for_profit: p.purpose.commercial,
    };
    let mut request = AccessRequest::research(
        requester,
        p.purpose.clone(),
        Period::new(Some(p.not_before), Some(p.not_after)),
    );
    request.categories = p.categories.iter().copied().collect();
    request.fields = p.fields.clone();
    request.board_overrides_abstain = study.overrides_abstain;
    request
}

/// What a patient's consent lets a study have, now.
pub fn decide(history: &PolicyHistory, study: &Study, now: i64) -> Decision {
    history.evaluate(&study_request(study), now)
}

/// Why a patient's consent allows no grant to a study.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoGrant {
    #[error("the patient's consent does not permit this study: {0}")]
    NotPermitted(String),
    #[error("the patient's consent permits none of the study's categories")]
    NoCategory,
}

/// What a patient's consent lets a study search and take, now: the searchable fields the
/// consent allows and the study requested, the categories the study requested and the
/// consent releases (a sensitive code is searchable only under its released category), and
/// the consent version that decided. The one rule the broker's consent snapshot, its
/// release selection and the patient's agent all apply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StudyAccess {
    pub fields: BTreeSet<SearchField>,
    pub categories: BTreeSet<Category>,
    pub policy_hash: PolicyHash,
    /// When the consent stops permitting the study, if it says.
    pub expiry: Option<i64>,
}

/// The access `decision` gives `study`, or why it gives none.
pub fn study_access(decision: &Decision, study: &Study) -> Result<StudyAccess, NoGrant> {
    let access = decision
        .permit()
        .ok_or_else(|| NoGrant::NotPermitted(decision.reason().to_string()))?;
    Ok(StudyAccess {
        fields: access
            .fields()
            .intersection(&study.proposal.fields)
            .copied()
            .collect(),
        categories: study
            .proposal
            .categories
            .iter()
            .copied()
            .filter(|c| access.categories().contains(c))
            .collect(),
        policy_hash: access.policy_hash(),
        expiry: access.expiry(),
    })
}

/// The categories and expiry a grant to `study` may have under `decision`, or why none.
pub fn grant_scope(decision: &Decision, study: &Study) -> Result<(Vec<Category>, i64), NoGrant> {
    let access = study_access(decision, study)?;
    if access.categories.is_empty() {
        return Err(NoGrant::NoCategory);
    }
    let expiry = access.expiry.map_or(study.proposal.not_after, |e| {
        e.min(study.proposal.not_after)
    });
    // In the order the study requested them.
    let categories = study
        .proposal
        .categories
        .iter()
        .copied()
        .filter(|c| access.categories.contains(c))
        .collect();
    Ok((categories, expiry))
}

/// Whom a grant re-encrypts for: an approved study, or an emergency organisation's
/// standing break-glass key.
#[derive(Debug, Clone, Copy)]
pub enum Grantee<'a> {
    Study(&'a Study),
    Emergency(&'a str),
}

/// Whether a grant as it stands (its categories and expiry) is still what `history`
/// permits at `now`. A consent change withdraws every grant for which it is not; the
/// broker applies it, and the patient's agent previews a change with it.
pub fn grant_permitted(
    history: &PolicyHistory,
    grantee: Grantee<'_>,
    categories: &[Category],
    expires_at: i64,
    now: i64,
) -> bool {
    match grantee {
        // A standing break-glass grant lives while the consent allows break-glass.
        Grantee::Emergency(org) => crate::standing_emergency(history, org, now)
            .is_ok_and(|end| expires_at <= end.unwrap_or(i64::MAX)),
        Grantee::Study(study) => match grant_scope(&decide(history, study, now), study) {
            Ok((allowed, expiry)) => {
                categories.iter().all(|c| allowed.contains(c)) && expires_at <= expiry
            }
            Err(_) => false,
        },
    }
}

/// A broad research consent, as a starting point: research of any purpose (DUO GRU) by
/// any organisation, every non-sensitive category, every searchable field; sensitive
/// categories are not shared and break-glass is denied. The custodian's default for
/// patients who opted in without restrictions (and the demo's).
pub fn broad_research_policy(version: u32, issued_at: i64) -> ConsentPolicy {
    let mut permit = Provision::permit(DataUse::new(Primary::Gru));
    permit.categories = Some(Categories::all_standard());
    permit.fields = Some(SearchField::ALL.into_iter().collect());
    let mut draft = PolicyDraft::new(version, issued_at);
    draft.provisions.push(permit);
    draft.check().expect("a valid policy")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consent_signature_binds_the_patient() {
        assert_ne!(consent_digest("p1", b"{}"), consent_digest("p2", b"{}"));
        assert_ne!(consent_digest("p1", b"{}"), consent_digest("p1", b"{ }"));
    }
}
