//! Consent as the broker and the patient's agent both apply it: what a patient signs,
//! the access request a study makes of a patient, what a grant may hold, and the part of
//! a patient's index a study may search.
//!
//! The policy model and its evaluation are the rest of this crate; this module binds them
//! to studies, patients and grants, once, for the server and the client alike.

use std::collections::BTreeSet;

use model::{Category, Cohort, PatientIndex, Person, SearchField, Study};

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

/// The categories and expiry a grant to `study` may have under `decision`, or why none.
pub fn grant_scope(decision: &Decision, study: &Study) -> Result<(Vec<Category>, i64), NoGrant> {
    let access = decision
        .permit()
        .ok_or_else(|| NoGrant::NotPermitted(decision.reason().to_string()))?;
    let categories: Vec<Category> = study
        .proposal
        .categories
        .iter()
        .copied()
        .filter(|c| access.categories().contains(c))
        .collect();
    if categories.is_empty() {
        return Err(NoGrant::NoCategory);
    }
    let expiry = access.expiry().map_or(study.proposal.not_after, |e| {
        e.min(study.proposal.not_after)
    });
    Ok((categories, expiry))
}

/// What a release of a study may take of one patient, as the patient's consent stands
/// now: the categories the study requested and the consent permits, and the consent
/// version that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseScope {
    pub categories: BTreeSet<Category>,
    pub policy_hash: PolicyHash,
}

/// The release rule, for the broker that applies it and anyone who checks it: the
/// patient's consent must permit the study now, and the study's cohort must match the
/// patient's index as seen through only the fields that consent makes searchable and the
/// study requested. `None` when the patient is not released.
pub fn release_scope(
    history: &PolicyHistory,
    study: &Study,
    index: PatientIndex,
    now: i64,
) -> Option<ReleaseScope> {
    let decision = decide(history, study, now);
    let access = decision.permit()?;
    let fields: BTreeSet<SearchField> = access
        .fields()
        .intersection(&study.proposal.fields)
        .copied()
        .collect();
    let categories: BTreeSet<Category> = study
        .proposal
        .categories
        .iter()
        .copied()
        .filter(|c| access.categories().contains(c))
        .collect();
    if !study
        .proposal
        .cohort
        .matches(&exposed_index(index, &fields, &categories))
    {
        return None;
    }
    Some(ReleaseScope {
        categories,
        policy_hash: access.policy_hash(),
    })
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

/// The fields a cohort's criteria search.
pub fn cohort_fields(cohort: &Cohort) -> BTreeSet<SearchField> {
    let mut fields = BTreeSet::new();
    if cohort.min_birth_year.is_some() || cohort.max_birth_year.is_some() {
        fields.insert(SearchField::BirthYear);
    }
    if cohort.sex.is_some() {
        fields.insert(SearchField::Sex);
    }
    if !cohort.condition_codes.is_empty() {
        fields.insert(SearchField::Condition);
    }
    fields
}

/// The part of a patient's index a study may search: only `fields`, and of their coded
/// events only those whose code is not sensitive or whose sensitive category is among
/// `released` (the categories the consent releases to the study; the classifier is
/// `model::sensitive`'s); the rest reads as unknown (no birth year, sex `unknown`, no
/// events).
pub fn exposed_index(
    index: PatientIndex,
    fields: &BTreeSet<SearchField>,
    released: &BTreeSet<Category>,
) -> PatientIndex {
    let has = |f| fields.contains(&f);
    let visible = |events: Vec<model::CodedEvent>| -> Vec<model::CodedEvent> {
        events
            .into_iter()
            .filter(|e| {
                model::CodeSystem::from_name(&e.system)
                    .and_then(|s| model::sensitive::sensitive_category(s, &e.code))
                    .is_none_or(|c| released.contains(&c))
            })
            .collect()
    };
    PatientIndex {
        person: Person {
            birth_year: index
                .person
                .birth_year
                .filter(|_| has(SearchField::BirthYear)),
            sex: if has(SearchField::Sex) {
                index.person.sex
            } else {
                "unknown".into()
            },
        },
        conditions: if has(SearchField::Condition) {
            visible(index.conditions)
        } else {
            Vec::new()
        },
        measurements: if has(SearchField::Measurement) {
            visible(index.measurements)
        } else {
            Vec::new()
        },
        drugs: if has(SearchField::Drug) {
            visible(index.drugs)
        } else {
            Vec::new()
        },
        procedures: if has(SearchField::Procedure) {
            visible(index.procedures)
        } else {
            Vec::new()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::CodedEvent;

    #[test]
    fn an_unconsented_field_cannot_select_a_patient() {
        let index = PatientIndex {
            person: Person {
                birth_year: Some(1960),
                sex: "female".into(),
            },
            conditions: vec![CodedEvent {
                system: "snomed".into(),
                code: "44054006".into(),
                date: "2020-01-01".into(),
                value: None,
                unit: String::new(),
            }],
            ..Default::default()
        };
        let cohort = Cohort {
            condition_codes: vec!["44054006".into()],
            sex: Some("female".into()),
            ..Default::default()
        };
        let all: BTreeSet<SearchField> = SearchField::ALL.into_iter().collect();
        let none = BTreeSet::new();
        assert!(cohort.matches(&exposed_index(index.clone(), &all, &none)));
        for hidden in [SearchField::Condition, SearchField::Sex] {
            let mut fields = all.clone();
            fields.remove(&hidden);
            assert!(
                !cohort.matches(&exposed_index(index.clone(), &fields, &none)),
                "{hidden} still selects"
            );
        }
        assert_eq!(
            cohort_fields(&cohort),
            BTreeSet::from([SearchField::Condition, SearchField::Sex])
        );
    }

    #[test]
    fn a_sensitive_code_selects_only_where_its_category_is_released() {
        let index = PatientIndex {
            conditions: vec![CodedEvent {
                system: "snomed".into(),
                code: "86406008".into(), // HIV disease: sexual_health
                date: "2020-01-01".into(),
                value: None,
                unit: String::new(),
            }],
            ..Default::default()
        };
        let cohort = Cohort {
            condition_codes: vec!["86406008".into()],
            ..Default::default()
        };
        let all: BTreeSet<SearchField> = SearchField::ALL.into_iter().collect();
        let without = BTreeSet::from([Category::Conditions]);
        assert!(!cohort.matches(&exposed_index(index.clone(), &all, &without)));
        let with = BTreeSet::from([Category::Conditions, Category::SexualHealth]);
        assert!(cohort.matches(&exposed_index(index, &all, &with)));
    }

    #[test]
    fn the_consent_signature_binds_the_patient() {
        assert_ne!(consent_digest("p1", b"{}"), consent_digest("p2", b"{}"));
        assert_ne!(consent_digest("p1", b"{}"), consent_digest("p1", b"{ }"));
    }
}
