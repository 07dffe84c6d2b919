//! Conversions between broker.v1 messages and domain types, in one place for the server
//! and the client alike.

use audit_log::EventFilter;
use consent_policy::{ConsentReceipt, ConsentSubmission};
use model::{
    Actor, Category, CodedEvent, CohortDefinition, EnvelopeReceipt, ObservationPeriod,
    PatientIndex, Person, Release, ResearchPurpose, Role, SearchField, Study, StudyFocus,
    StudyProposal, StudyStatus, Upload, UploadReceipt, UploadedEnvelope,
};
use model::{BreakGlassAccess, EmergencyOrganisation, Review};
use pre_kms::erasure::{ErasureReceipt, ErasureRequest, Role as ErasureRole};
use pre_kms::grant::{Grant, GrantCategory};
use pre_kms::logged_release::{LoggedEvent, LoggedRelease};
use tonic::Status;

use crate::v1 as pb;

/// A message that does not convert to its domain type; the message says which part and
/// why, and carries no patient data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

type ServiceResult<T> = Result<T, Malformed>;

fn category(label: &str) -> ServiceResult<Category> {
    label
        .parse()
        .map_err(|e: model::UnknownCategory| Malformed(e.to_string()))
}

pub fn role_to_pb(r: Role) -> pb::Role {
    match r {
        Role::Patient => pb::Role::Patient,
        Role::Custodian => pb::Role::Custodian,
        Role::Sponsor => pb::Role::Sponsor,
        Role::Researcher => pb::Role::Researcher,
        Role::Board => pb::Role::Board,
        Role::Clinician => pb::Role::Clinician,
        Role::Operator => pb::Role::Operator,
    }
}

pub fn role_from_pb(r: i32) -> ServiceResult<Role> {
    Ok(
        match pb::Role::try_from(r).unwrap_or(pb::Role::Unspecified) {
            pb::Role::Patient => Role::Patient,
            pb::Role::Custodian => Role::Custodian,
            pb::Role::Sponsor => Role::Sponsor,
            pb::Role::Researcher => Role::Researcher,
            pb::Role::Board => Role::Board,
            pb::Role::Clinician => Role::Clinician,
            pb::Role::Operator => Role::Operator,
            pb::Role::Unspecified => {
                return Err(Malformed("a role is required".into()));
            }
        },
    )
}

pub fn actor_to_pb(a: Actor) -> pb::Actor {
    pb::Actor {
        actor_id: a.actor_id,
        role: role_to_pb(a.role) as i32,
        name: a.name,
        organisation: a.organisation,
        verifying_key: a.verifying_key,
        encryption_key: a.encryption_key,
        key_binding: a.key_binding,
    }
}

pub fn actor_from_pb(a: pb::Actor) -> ServiceResult<Actor> {
    Ok(Actor {
        actor_id: a.actor_id,
        role: role_from_pb(a.role)?,
        name: a.name,
        organisation: a.organisation,
        verifying_key: a.verifying_key,
        encryption_key: a.encryption_key,
        key_binding: a.key_binding,
    })
}

fn event_to_pb(e: CodedEvent) -> pb::CodedEvent {
    pb::CodedEvent {
        system: e.system,
        code: e.code,
        date: e.date,
        value: e.value,
        unit: e.unit,
    }
}

fn event_from_pb(e: pb::CodedEvent) -> CodedEvent {
    CodedEvent {
        system: e.system,
        code: e.code,
        date: e.date,
        value: e.value,
        unit: e.unit,
    }
}

pub fn index_to_pb(pseudonym: String, i: PatientIndex) -> pb::IndexRows {
    pb::IndexRows {
        pseudonym,
        person: Some(pb::Person {
            birth_year: i.person.birth_year.unwrap_or(0),
            sex: i.person.sex,
        }),
        conditions: i.conditions.into_iter().map(event_to_pb).collect(),
        measurements: i.measurements.into_iter().map(event_to_pb).collect(),
        drugs: i.drugs.into_iter().map(event_to_pb).collect(),
        procedures: i.procedures.into_iter().map(event_to_pb).collect(),
        observation_periods: i
            .observation_periods
            .into_iter()
            .map(|p| pb::ObservationPeriod {
                start: p.start,
                end: p.end,
            })
            .collect(),
    }
}

pub fn index_from_pb(r: pb::IndexRows) -> (String, PatientIndex) {
    let person = r.person.unwrap_or_default();
    (
        r.pseudonym,
        PatientIndex {
            person: Person {
                birth_year: (person.birth_year != 0).then_some(person.birth_year),
                sex: person.sex,
            },
            conditions: r.conditions.into_iter().map(event_from_pb).collect(),
            measurements: r.measurements.into_iter().map(event_from_pb).collect(),
            drugs: r.drugs.into_iter().map(event_from_pb).collect(),
            procedures: r.procedures.into_iter().map(event_from_pb).collect(),
            observation_periods: r
                .observation_periods
                .into_iter()
                .map(|p| ObservationPeriod {
                    start: p.start,
                    end: p.end,
                })
                .collect(),
        },
    )
}

pub fn purpose_to_pb(p: &ResearchPurpose) -> pb::ResearchPurpose {
    let (focus, diseases) = match &p.focus {
        StudyFocus::Disease(codes) => ("disease", codes.clone()),
        StudyFocus::Health => ("health", Vec::new()),
        StudyFocus::General => ("general", Vec::new()),
        StudyFocus::Ancestry => ("ancestry", Vec::new()),
        StudyFocus::MethodsDevelopment => ("methods", Vec::new()),
    };
    pb::ResearchPurpose {
        focus: focus.into(),
        diseases,
        commercial: p.commercial,
        irb_approved: p.irb_approved,
        will_publish: p.will_publish,
        will_collaborate: p.will_collaborate,
        will_return_data: p.will_return_data,
        ends_at: p.ends_at.unwrap_or(0),
        region: p.region.clone().unwrap_or_default(),
        genetic: p.genetic,
    }
}

pub fn purpose_from_pb(p: pb::ResearchPurpose) -> ServiceResult<ResearchPurpose> {
    let focus = match p.focus.as_str() {
        "disease" if p.diseases.is_empty() => {
            return Err(Malformed(
                "a disease-specific purpose needs at least one disease code".into(),
            ));
        }
        "disease" => StudyFocus::Disease(p.diseases),
        "health" => StudyFocus::Health,
        "general" => StudyFocus::General,
        "ancestry" => StudyFocus::Ancestry,
        "methods" => StudyFocus::MethodsDevelopment,
        other => {
            return Err(Malformed(format!(
                "unknown research focus {other:?}; use disease, health, general, ancestry or methods"
            )));
        }
    };
    Ok(ResearchPurpose {
        focus,
        commercial: p.commercial,
        irb_approved: p.irb_approved,
        will_publish: p.will_publish,
        will_collaborate: p.will_collaborate,
        will_return_data: p.will_return_data,
        ends_at: (p.ends_at != 0).then_some(p.ends_at),
        region: (!p.region.is_empty()).then_some(p.region),
        genetic: p.genetic,
    })
}

pub fn proposal_to_pb(p: &StudyProposal) -> pb::StudyProposal {
    pb::StudyProposal {
        title: p.title.clone(),
        purpose: Some(purpose_to_pb(&p.purpose)),
        fields: p.fields.iter().map(|f| f.as_str().to_owned()).collect(),
        categories: p.categories.iter().map(|c| c.label().to_owned()).collect(),
        researcher_id: p.researcher_id.clone(),
        receiving_key: p.receiving_key.clone(),
        not_before: p.not_before,
        not_after: p.not_after,
        cohort_definition: p.cohort.to_json().into_bytes(),
    }
}

pub fn proposal_from_pb(p: pb::StudyProposal) -> ServiceResult<StudyProposal> {
    if p.cohort_definition.is_empty() {
        return Err(Malformed(
            "a study needs a cohort definition (`{\"criteria\": []}` for every consenting patient)"
                .into(),
        ));
    }
    let cohort = CohortDefinition::from_json(&p.cohort_definition)
        .map_err(|e| Malformed(format!("the study's cohort: {e}")))?;
    Ok(StudyProposal {
        title: p.title,
        purpose: purpose_from_pb(
            p.purpose
                .ok_or_else(|| Malformed("a study needs a research purpose".into()))?,
        )?,
        fields: p
            .fields
            .iter()
            .map(|f| {
                f.parse::<SearchField>()
                    .map_err(|e| Malformed(e.to_string()))
            })
            .collect::<ServiceResult<_>>()?,
        categories: p
            .categories
            .iter()
            .map(|c| category(c))
            .collect::<ServiceResult<_>>()?,
        researcher_id: p.researcher_id,
        receiving_key: p.receiving_key,
        not_before: p.not_before,
        not_after: p.not_after,
        cohort,
    })
}

pub fn status_to_pb(s: StudyStatus) -> pb::StudyStatus {
    match s {
        StudyStatus::Proposed => pb::StudyStatus::Proposed,
        StudyStatus::Approved => pb::StudyStatus::Approved,
        StudyStatus::Rejected => pb::StudyStatus::Rejected,
    }
}

pub fn study_to_pb(s: Study) -> pb::Study {
    pb::Study {
        study_id: s.study_id,
        proposal: Some(proposal_to_pb(&s.proposal)),
        sponsor_id: s.sponsor_id,
        status: status_to_pb(s.status) as i32,
        board_id: s.board_id,
        board_signature: s.board_signature,
        reason: s.reason,
        proposed_at: s.proposed_at,
        decided_at: s.decided_at,
        overrides_abstain: s.overrides_abstain,
        sponsor_organisation: s.sponsor_organisation,
    }
}

pub fn study_from_pb(s: pb::Study) -> ServiceResult<Study> {
    let status = match pb::StudyStatus::try_from(s.status).unwrap_or(pb::StudyStatus::Unspecified) {
        pb::StudyStatus::Approved => StudyStatus::Approved,
        pb::StudyStatus::Rejected => StudyStatus::Rejected,
        _ => StudyStatus::Proposed,
    };
    Ok(Study {
        study_id: s.study_id,
        proposal: proposal_from_pb(
            s.proposal
                .ok_or_else(|| Malformed("study without proposal".into()))?,
        )?,
        sponsor_id: s.sponsor_id,
        status,
        board_id: s.board_id,
        board_signature: s.board_signature,
        reason: s.reason,
        proposed_at: s.proposed_at,
        decided_at: s.decided_at,
        overrides_abstain: s.overrides_abstain,
        sponsor_organisation: s.sponsor_organisation,
    })
}

pub fn grant_to_pb(g: Grant) -> pb::Grant {
    pb::Grant {
        grant_id: g.grant_id,
        issued_at: g.issued_at,
        study_id: g.study_id,
        pseudonym: g.pseudonym,
        threshold: g.threshold,
        expires_at: g.expires_at,
        categories: g
            .categories
            .into_iter()
            .map(|c| pb::GrantCategory {
                category: c.category.label().to_owned(),
                sealed_kfrags: c.sealed_kfrags,
            })
            .collect(),
        signature: g.signature,
    }
}

pub fn grant_from_pb(g: pb::Grant) -> ServiceResult<Grant> {
    if !pre_kms::grant::is_grant_id(&g.grant_id) {
        return Err(Malformed("grant_id must be gr- and 32 hex digits".into()));
    }
    Ok(Grant {
        grant_id: g.grant_id,
        issued_at: g.issued_at,
        study_id: g.study_id,
        pseudonym: g.pseudonym,
        threshold: g.threshold,
        expires_at: g.expires_at,
        categories: g
            .categories
            .into_iter()
            .map(|c| {
                Ok(GrantCategory {
                    category: category(&c.category)?,
                    sealed_kfrags: c.sealed_kfrags,
                })
            })
            .collect::<ServiceResult<_>>()?,
        signature: g.signature,
    })
}

pub fn category_from_pb(label: &str) -> ServiceResult<Category> {
    category(label)
}

/// An erasure request on the wire (its hex fields as bytes).
pub fn erasure_request_to_pb(r: &ErasureRequest) -> pb::ErasureRequest {
    pb::ErasureRequest {
        pseudonym: r.pseudonym.clone(),
        verifying_key: hex::decode(&r.verifying_key).unwrap_or_default(),
        issued_at_ms: r.issued_at_ms,
        nonce: hex::decode(&r.nonce).unwrap_or_default(),
        signature: hex::decode(&r.signature).unwrap_or_default(),
    }
}

pub fn erasure_request_from_pb(r: pb::ErasureRequest) -> ErasureRequest {
    ErasureRequest {
        pseudonym: r.pseudonym,
        verifying_key: hex::encode(r.verifying_key),
        issued_at_ms: r.issued_at_ms,
        nonce: hex::encode(r.nonce),
        signature: hex::encode(r.signature),
    }
}

pub fn erasure_receipt_to_pb(r: &ErasureReceipt) -> pb::ErasureReceipt {
    pb::ErasureReceipt {
        role: match r.role {
            ErasureRole::Proxy => "proxy",
            ErasureRole::Broker => "broker",
        }
        .into(),
        signer: r.signer.clone(),
        verifying_key: hex::decode(&r.verifying_key).unwrap_or_default(),
        pseudonym: r.pseudonym.clone(),
        request: hex::decode(&r.request).unwrap_or_default(),
        destroyed: r.destroyed.clone().into_iter().collect(),
        at_ms: r.at_ms,
        signature: hex::decode(&r.signature).unwrap_or_default(),
    }
}

/// A receipt from the wire; a role other than `proxy` or `broker` is refused (the
/// signature is checked by whoever relies on it).
pub fn erasure_receipt_from_pb(r: pb::ErasureReceipt) -> Result<ErasureReceipt, Status> {
    let role = match r.role.as_str() {
        "proxy" => ErasureRole::Proxy,
        "broker" => ErasureRole::Broker,
        _ => return Err(Status::invalid_argument("erasure receipt: unknown role")),
    };
    Ok(ErasureReceipt {
        role,
        signer: r.signer,
        verifying_key: hex::encode(r.verifying_key),
        pseudonym: r.pseudonym,
        request: hex::encode(r.request),
        destroyed: r.destroyed.into_iter().collect(),
        at_ms: r.at_ms,
        signature: hex::encode(r.signature),
    })
}

/// (study id, pseudonym) pairs as grant references.
pub fn grant_refs(grants: &[(String, String)]) -> Vec<pb::GrantRef> {
    grants
        .iter()
        .map(|(study_id, pseudonym)| pb::GrantRef {
            study_id: study_id.clone(),
            pseudonym: pseudonym.clone(),
        })
        .collect()
}

pub fn upload_to_pb(u: Upload) -> pb::UploadRequest {
    pb::UploadRequest {
        envelopes: u
            .envelopes
            .into_iter()
            .map(|e| pb::Envelope {
                pseudonym: e.pseudonym,
                category: e.category.label().to_owned(),
                sealed: e.sealed,
                content_tag: e.content_tag,
            })
            .collect(),
        index: u
            .index
            .into_iter()
            .map(|(pseudonym, i)| index_to_pb(pseudonym, i))
            .collect(),
    }
}

pub fn upload_from_pb(r: pb::UploadRequest) -> Result<Upload, Malformed> {
    Ok(Upload {
        envelopes: r
            .envelopes
            .into_iter()
            .map(|e| {
                Ok(UploadedEnvelope {
                    pseudonym: e.pseudonym,
                    category: category(&e.category)?,
                    sealed: e.sealed,
                    content_tag: e.content_tag,
                })
            })
            .collect::<Result<_, Malformed>>()?,
        index: r.index.into_iter().map(index_from_pb).collect(),
    })
}

pub fn upload_receipt_to_pb(r: UploadReceipt) -> pb::UploadResponse {
    pb::UploadResponse {
        receipts: r
            .receipts
            .into_iter()
            .map(|r| pb::EnvelopeReceipt {
                pseudonym: r.pseudonym,
                category: r.category.label().to_owned(),
                version: r.version,
                blob: r.blob,
                unchanged: r.unchanged,
            })
            .collect(),
        index_patients: r.index_patients as u32,
    }
}

pub fn upload_receipt_from_pb(r: pb::UploadResponse) -> Result<UploadReceipt, Malformed> {
    Ok(UploadReceipt {
        receipts: r
            .receipts
            .into_iter()
            .map(|r| {
                Ok(EnvelopeReceipt {
                    pseudonym: r.pseudonym,
                    category: category(&r.category)?,
                    version: r.version,
                    blob: r.blob,
                    unchanged: r.unchanged,
                })
            })
            .collect::<Result<_, Malformed>>()?,
        index_patients: r.index_patients as usize,
    })
}

pub fn release_to_pb(r: Release) -> pb::Release {
    pb::Release {
        release_id: r.release_id,
        study_id: r.study_id,
        subjects: r.subjects,
        envelopes: r.envelopes,
        created_at: r.created_at,
        threshold: r.threshold,
    }
}

pub fn release_from_pb(r: pb::Release) -> Release {
    Release {
        release_id: r.release_id,
        study_id: r.study_id,
        subjects: r.subjects,
        envelopes: r.envelopes,
        created_at: r.created_at,
        threshold: r.threshold,
    }
}

pub fn consent_submission_to_pb(c: ConsentSubmission) -> pb::ConsentSubmission {
    pb::ConsentSubmission {
        pseudonym: c.pseudonym,
        policy: c.policy_json,
        signature: c.signature,
    }
}

pub fn consent_submission_from_pb(c: pb::ConsentSubmission) -> ConsentSubmission {
    ConsentSubmission {
        pseudonym: c.pseudonym,
        policy_json: c.policy,
        signature: c.signature,
    }
}

pub fn consent_receipt_to_pb(r: ConsentReceipt) -> pb::ConsentReceipt {
    pb::ConsentReceipt {
        pseudonym: r.pseudonym,
        version: r.version,
        policy_hash: r.policy_hash,
        grants_withdrawn: r.grants_withdrawn as u32,
    }
}

pub fn consent_receipt_from_pb(r: pb::ConsentReceipt) -> ConsentReceipt {
    ConsentReceipt {
        pseudonym: r.pseudonym,
        version: r.version,
        policy_hash: r.policy_hash,
        grants_withdrawn: r.grants_withdrawn as usize,
    }
}

pub fn event_filter_to_pb(f: EventFilter) -> pb::EventsRequest {
    pb::EventsRequest {
        since: f.since.unwrap_or(0),
        until: f.until.unwrap_or(0),
        study_id: f.study.unwrap_or_default(),
        actor_id: f.actor.unwrap_or_default(),
        kinds: f.kinds,
        from_index: f.from_leaf,
    }
}

pub fn event_filter_from_pb(r: pb::EventsRequest) -> EventFilter {
    EventFilter {
        since: (r.since != 0).then_some(r.since),
        until: (r.until != 0).then_some(r.until),
        study: (!r.study_id.is_empty()).then_some(r.study_id),
        actor: (!r.actor_id.is_empty()).then_some(r.actor_id),
        kinds: r.kinds,
        from_leaf: r.from_index,
    }
}

impl From<Malformed> for tonic::Status {
    fn from(e: Malformed) -> Self {
        tonic::Status::invalid_argument(e.0)
    }
}

pub fn logged_event_to_pb(e: &LoggedEvent) -> pb::LoggedEvent {
    pb::LoggedEvent {
        index: e.index,
        leaf: e.leaf.clone(),
        path: e.path.iter().map(|h| h.to_vec()).collect(),
    }
}

pub fn logged_event_from_pb(e: pb::LoggedEvent) -> Result<LoggedEvent, Malformed> {
    let path = e
        .path
        .iter()
        .map(|h| h.as_slice().try_into())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            Malformed(format!(
                "logged event {}: proof hashes must be 32 bytes",
                e.index
            ))
        })?;
    Ok(LoggedEvent {
        index: e.index,
        leaf: e.leaf,
        path,
    })
}

/// The evidence half of a re-encryption request.
pub fn logged_release_from_pb(
    release_id: String,
    checkpoint: String,
    events: Vec<pb::LoggedEvent>,
) -> Result<LoggedRelease, Malformed> {
    Ok(LoggedRelease {
        release_id,
        checkpoint,
        events: events
            .into_iter()
            .map(logged_event_from_pb)
            .collect::<Result<_, _>>()?,
    })
}

pub fn emergency_org_to_pb(o: EmergencyOrganisation) -> pb::EmergencyOrganisation {
    pb::EmergencyOrganisation {
        organisation_id: o.organisation_id,
        name: o.name,
        receiving_key: o.receiving_key,
    }
}

pub fn emergency_org_from_pb(o: pb::EmergencyOrganisation) -> EmergencyOrganisation {
    EmergencyOrganisation {
        organisation_id: o.organisation_id,
        name: o.name,
        receiving_key: o.receiving_key,
    }
}

pub fn break_glass_to_pb(a: BreakGlassAccess) -> pb::BreakGlassAccess {
    pb::BreakGlassAccess {
        access_id: a.access_id,
        clinician_id: a.clinician_id,
        organisation_id: a.organisation_id,
        pseudonym: a.pseudonym,
        reason: a.reason,
        card_presented: a.card_presented,
        created_at: a.created_at,
        expires_at: a.expires_at,
        leaf_index: a.leaf_index,
        recent_uses: a.recent_uses,
        flagged: a.flagged,
        review: a.review.map(|r| pb::BreakGlassReview {
            board_id: r.board_id,
            finding: r.finding.as_str().to_owned(),
            note: r.note,
            reviewed_at: r.reviewed_at,
        }),
    }
}

pub fn break_glass_from_pb(a: pb::BreakGlassAccess) -> ServiceResult<BreakGlassAccess> {
    let review = match a.review {
        None => None,
        Some(r) => Some(Review {
            board_id: r.board_id,
            finding: r
                .finding
                .parse()
                .map_err(|e: model::emergency::UnknownFinding| Malformed(e.to_string()))?,
            note: r.note,
            reviewed_at: r.reviewed_at,
        }),
    };
    Ok(BreakGlassAccess {
        access_id: a.access_id,
        clinician_id: a.clinician_id,
        organisation_id: a.organisation_id,
        pseudonym: a.pseudonym,
        reason: a.reason,
        card_presented: a.card_presented,
        created_at: a.created_at,
        expires_at: a.expires_at,
        leaf_index: a.leaf_index,
        recent_uses: a.recent_uses,
        flagged: a.flagged,
        review,
    })
}
