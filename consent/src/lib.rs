//! Patient consent policies: the model, its evaluation, GA4GH DUO matching and FHIR
//! Consent import.
//!
//! A patient's consent is a [`ConsentPolicy`]: versioned, signed by the patient over
//! its [`canonical_bytes`](ConsentPolicy::canonical_bytes), opt-in (the base decision
//! is deny), with nested permit/deny provisions restricted by period, organisation and
//! research purpose (GA4GH DUO terms), and with a break-glass choice. The broker asks
//! [`evaluate()`] whether a study (or an emergency clinician) may have a patient's data,
//! and builds grants only from the [`PermittedAccess`] a permit yields.
//!
//! ```text
//!   policy JSON ──ConsentPolicy::from_json──▶ ConsentPolicy ──┐
//!   FHIR Consent ──fhir::from_fhir_consent──▶ ImportedConsent ┤
//!                                                            ▼
//!   AccessRequest (study purpose, sponsor, categories, fields) ──evaluate──▶ Decision
//!                                                            │
//!                                     Decision::permit() ──▶ PermittedAccess ──▶ grants
//! ```
//!
//! Modules: [`policy`] (the model, checks, canonical bytes, history), [`duo`] (DUO
//! terms and matching), [`mod@evaluate`] (the engine), [`fhir`] (import of FHIR R4
//! Consent), [`error`] (what can be rejected or refused, and why). `docs/CONSENT.md`
//! explains the model to patients and ethics boards.
//!
//! # Example
//! A patient allows health research by not-for-profit organisations, never by one
//! named organisation, excluding the sensitive categories (they are not named), and
//! allows break-glass:
//!
//! ```
//! use std::collections::BTreeSet;
//! use consent_policy::{
//!     evaluate, AccessRequest, ConsentPolicy, DecidedBy, Period, Requester,
//!     ResearchPurpose, SearchField, StudyFocus,
//! };
//! use model::Category;
//!
//! let policy = ConsentPolicy::from_json(br#"{
//!     "version": 1,
//!     "issued_at": 1767225600,
//!     "break_glass": "allow",
//!     "provisions": [{
//!         "effect": "permit",
//!         "actors": [{"sector": "non_profit"}],
//!         "data_use": ["HMB", "IRB"],
//!         "categories": ["all"],
//!         "fields": ["birth_year", "condition"],
//!         "provisions": [{"effect": "deny", "actors": [{"organisation": "org-9"}]}]
//!     }]
//! }"#)?;
//!
//! let mut purpose = ResearchPurpose::new(StudyFocus::Disease(vec!["ICD10:E11".into()]));
//! purpose.irb_approved = true;
//! let sponsor = Requester { organisation: "uni-3".into(), for_profit: false };
//! let now = 1_780_000_000;
//! let mut request = AccessRequest::research(sponsor, purpose, Period::new(None, Some(now + 86_400 * 90)));
//! request.categories = BTreeSet::from([Category::Conditions, Category::MentalHealth]);
//! request.fields = BTreeSet::from([SearchField::Condition, SearchField::Sex]);
//!
//! let decision = evaluate(&policy, &request, now);
//! assert_eq!(decision.decided_by(), &DecidedBy::Provision(consent_policy::ProvisionPath(vec![0])));
//! assert_eq!(decision.withheld_categories(), &BTreeSet::from([Category::MentalHealth]));
//! assert_eq!(decision.withheld_fields(), &BTreeSet::from([SearchField::Sex]));
//!
//! // Only a permit gives a PermittedAccess, the input of grant planning.
//! let access = decision.permit().expect("permitted");
//! assert_eq!(access.categories(), &BTreeSet::from([Category::Conditions]));
//! assert_eq!(access.expiry(), Some(now + 86_400 * 90));
//! assert_eq!(access.policy_hash(), policy.policy_hash()); // logged with each access
//!
//! // The organisation the patient excluded is denied by the nested provision.
//! request.requester.organisation = "org-9".into();
//! let decision = evaluate(&policy, &request, now);
//! assert!(decision.permit().is_none());
//! assert_eq!(decision.decided_by(), &DecidedBy::Provision(consent_policy::ProvisionPath(vec![0, 0])));
//! # Ok::<(), consent_policy::PolicyError>(())
//! ```
#![forbid(unsafe_code)]

pub mod duo;
pub mod error;
pub mod evaluate;
pub mod fhir;
pub mod policy;
pub mod study;

pub use duo::{
    DataUse, DuoMatch, DuoTerm, Modifier, Primary, ResearchPurpose, StudyFocus, Verdict,
    match_data_use,
};
pub use error::{PolicyError, ProvisionPath, Refusal};
pub use evaluate::{
    AccessKind, AccessRequest, DecidedBy, Decision, PermittedAccess, Requester, emergency_decision,
    evaluate, standing_emergency,
};
pub use fhir::{ImportedConsent, from_fhir_consent};
pub use policy::{
    Actor, BreakGlass, Categories, ConsentPolicy, Effect, Period, PolicyDraft, PolicyHash,
    PolicyHistory, Provision, SearchField, Sector,
};
pub use study::{
    ConsentReceipt, ConsentSubmission, Grantee, NoGrant, SignedPolicy, StudyAccess,
    broad_research_policy, consent_digest, decide, grant_permitted, grant_scope, history,
    study_access, study_request,
};
