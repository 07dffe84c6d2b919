//! Studies: proposed by a sponsor, approved or rejected by the board's signature.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::category::Category;
use crate::definition::CohortDefinition;
use crate::field::SearchField;
use crate::purpose::{ResearchPurpose, StudyFocus};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyProposal {
    pub title: String,
    pub purpose: ResearchPurpose,
    pub categories: Vec<Category>,
    /// The searchable fields the study may search: at least those its cohort reads.
    pub fields: BTreeSet<SearchField>,
    pub researcher_id: String,
    /// Compressed umbral public key the records are re-encrypted to.
    pub receiving_key: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    /// The study's cohort (docs/COHORTS.md): the board's exact count counts it, and a
    /// release selects exactly its patients, through the same engine and consent.
    pub cohort: CohortDefinition,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StudyStatus {
    Proposed,
    Approved,
    Rejected,
}

impl StudyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StudyStatus::Proposed => "proposed",
            StudyStatus::Approved => "approved",
            StudyStatus::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<StudyStatus> {
        [
            StudyStatus::Proposed,
            StudyStatus::Approved,
            StudyStatus::Rejected,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Study {
    pub study_id: String,
    pub proposal: StudyProposal,
    pub sponsor_id: String,
    pub status: StudyStatus,
    pub board_id: String,
    pub board_signature: Vec<u8>,
    pub reason: String,
    pub proposed_at: i64,
    pub decided_at: i64,
    /// The board approved the purpose where the DUO matcher abstains.
    pub overrides_abstain: bool,
    /// The sponsor's organisation, as the operator registered it (consent policies may
    /// name organisations).
    pub sponsor_organisation: String,
}

impl Study {
    /// Why the study is not open (approved, and `now` inside its approval period), if
    /// it is not.
    pub fn closed_because(&self, now: i64) -> Option<String> {
        let id = &self.study_id;
        match self.status {
            StudyStatus::Proposed => Some(format!("study {id} is not approved by the board yet")),
            StudyStatus::Rejected => Some(format!("study {id} was rejected by the board")),
            StudyStatus::Approved if now < self.proposal.not_before => {
                Some(format!("study {id}'s approval period has not started"))
            }
            StudyStatus::Approved if now >= self.proposal.not_after => {
                Some(format!("study {id}'s approval period has ended"))
            }
            StudyStatus::Approved => None,
        }
    }
}

/// What a board member signs to approve or reject: the study id, the decision, whether it
/// overrides the DUO matcher's abstentions, the normalized hash of the study's cohort
/// definition (what `board study list` shows) and the full proposal.
pub fn decision_digest(
    study_id: &str,
    proposal: &StudyProposal,
    approve: bool,
    overrides_abstain: bool,
) -> [u8; 32] {
    let json = serde_json::to_vec(proposal).expect("proposal serializes");
    let mut h = blake3::Hasher::new_derive_key("broker study decision v3");
    h.update(study_id.as_bytes());
    h.update(&[0, approve as u8, overrides_abstain as u8]);
    h.update(&proposal.cohort.normalized().hash.0);
    h.update(&json);
    *h.finalize().as_bytes()
}

/// A short label of a research purpose, for logs and listings: the DUO-style focus and
/// the commitments, e.g. `DS(ICD10:E11) IRB PUB`.
pub fn purpose_label(p: &ResearchPurpose) -> String {
    let mut parts = vec![match &p.focus {
        StudyFocus::Disease(codes) => format!("DS({})", codes.join(",")),
        StudyFocus::Health => "HMB".into(),
        StudyFocus::General => "GRU".into(),
        StudyFocus::Ancestry => "POA".into(),
        StudyFocus::MethodsDevelopment => "MDS".into(),
    }];
    for (on, term) in [
        (p.commercial, "commercial"),
        (p.irb_approved, "IRB"),
        (p.will_publish, "PUB"),
        (p.will_collaborate, "COL"),
        (p.will_return_data, "RTN"),
        (p.genetic, "genetic"),
    ] {
        if on {
            parts.push(term.into());
        }
    }
    if let Some(region) = &p.region {
        parts.push(format!("GS({region})"));
    }
    parts.join(" ")
}
