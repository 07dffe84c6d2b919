//! Why a policy was rejected, and why a FHIR Consent was refused.
//!
//! Every message says what was wrong and what to do. Messages never embed more than a
//! short, truncated excerpt of the input, so they are safe to log and to return to the
//! caller that sent the input.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where in a policy's provision tree something is: `[1, 0]` is the first provision
/// nested in the second top-level provision. The empty path is the policy itself (its
/// base decision) or, for a FHIR Consent, its root rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProvisionPath(pub Vec<usize>);

impl ProvisionPath {
    /// The path of the `index`-th provision nested under this one.
    pub fn child(&self, index: usize) -> ProvisionPath {
        let mut path = self.0.clone();
        path.push(index);
        ProvisionPath(path)
    }

    /// How deep the path reaches (top-level provisions have depth 1).
    pub fn depth(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Display for ProvisionPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, index) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{index}")?;
        }
        f.write_str("]")
    }
}

pub(crate) use model::excerpt;
#[cfg(test)]
use model::quote::QUOTE_LIMIT;

/// A consent policy that could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The document is not JSON of the policy's shape (syntax, a missing or unknown
    /// field, a wrong type).
    #[error(
        "the policy is not valid JSON of the expected shape (line {line}, column {column}): {message}; see docs/CONSENT.md for the format"
    )]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    /// Version 0 is reserved.
    #[error(
        "policy version must be 1 or higher; number versions from 1 and increase by one per change"
    )]
    VersionZero,
    /// The base decision is `permit`: research consent is opt-in.
    #[error(
        "the base decision must be \"deny\": research consent is opt-in; state each permission as a provision with \"effect\": \"permit\""
    )]
    BasePermit,
    /// A period ends before (or when) it starts.
    #[error(
        "period of {at} ends ({end}) before it starts ({start}); give an end later than the start, both in unix seconds"
    )]
    PeriodEndsBeforeStart { at: Location, start: i64, end: i64 },
    /// A DUO term that is neither a code (`HMB`) nor an id (`DUO:0000006`) we know.
    #[error(
        "provision {at}: unknown DUO term {term:?}; use one of GRU, HMB, DS, POA, NPU, IRB, PUB, COL, RTN, TS, GS, NMDS, GSO, NPOA (or their DUO:00000nn ids)"
    )]
    UnknownDuoTerm { at: ProvisionPath, term: String },
    /// A real DUO term that this broker does not enforce.
    #[error(
        "provision {at}: DUO term {term} is not supported by this broker ({hint}); express the restriction with supported terms or actors"
    )]
    UnsupportedDuoTerm {
        at: ProvisionPath,
        term: &'static str,
        hint: &'static str,
    },
    /// DS without a disease.
    #[error(
        "provision {at}: DS (disease-specific research) needs at least one disease code, e.g. {{\"DS\": [\"MONDO:0005148\"]}}"
    )]
    DiseaseMissing { at: ProvisionPath },
    /// A disease code that is not `SYSTEM:CODE`.
    #[error(
        "provision {at}: disease code {code:?} is not of the form SYSTEM:CODE (e.g. MONDO:0005148, SNOMED:44054006, ICD10:E11); use at most 64 printable characters without spaces"
    )]
    InvalidDiseaseCode { at: ProvisionPath, code: String },
    /// TS without an end.
    #[error(
        "provision {at}: TS (time limit on use) needs its end in unix seconds, e.g. {{\"TS\": 1924992000}}"
    )]
    TimeLimitMissing { at: ProvisionPath },
    /// GS without a region.
    #[error(
        "provision {at}: GS (geographic restriction) needs a region code, e.g. {{\"GS\": \"EU\"}}"
    )]
    RegionMissing { at: ProvisionPath },
    /// A region that is not a short code.
    #[error(
        "provision {at}: region {region:?} is not a region code; use 2 to 16 letters, digits or '-' (e.g. EU, NL, US-CA)"
    )]
    InvalidRegion { at: ProvisionPath, region: String },
    /// A parameter given to a DUO term that takes none, or the wrong kind of parameter.
    #[error("provision {at}: DUO term {term} {problem}")]
    BadDuoParameter {
        at: ProvisionPath,
        term: &'static str,
        problem: &'static str,
    },
    /// A data use without exactly one primary term.
    #[error(
        "provision {at}: a data use needs exactly one primary term (GRU, HMB, DS or POA), found {found}; to allow two kinds of research, write two sibling provisions"
    )]
    PrimaryCount { at: ProvisionPath, found: usize },
    /// The same modifier twice.
    #[error("provision {at}: DUO modifier {term} is listed twice; list each modifier once")]
    DuplicateModifier {
        at: ProvisionPath,
        term: &'static str,
    },
    /// Modifiers on a deny provision.
    #[error(
        "provision {at}: a deny provision names the research it denies with a primary term only (GRU, HMB, DS, POA); modifiers such as {term} only condition permits"
    )]
    ModifierOnDeny {
        at: ProvisionPath,
        term: &'static str,
    },
    /// A permit that never says which research it permits.
    #[error(
        "provision {at}: a permit must say which research it permits, e.g. \"data_use\": [\"HMB\"], on itself or on a permit that contains it"
    )]
    PermitWithoutDataUse { at: ProvisionPath },
    /// Categories or searchable fields on a deny provision.
    #[error(
        "provision {at}: a deny provision withholds everything it matches, so it lists no categories or fields; to withhold a category, leave it out of the permit"
    )]
    GrantOnDeny { at: ProvisionPath },
    /// A category name we do not know.
    #[error(
        "provision {at}: unknown category {name:?}; use \"all\" (every non-sensitive category) or one of demographics, conditions, observations, medications, procedures, immunizations, allergies, encounters, mental_health, substance_use, sexual_health, genomics"
    )]
    UnknownCategory { at: ProvisionPath, name: String },
    /// `critical` listed in a provision.
    #[error(
        "provision {at}: the critical category is released only by break-glass, never to research; remove it and set \"break_glass\": \"allow\" to allow emergency access"
    )]
    CriticalInProvision { at: ProvisionPath },
    /// A searchable field name we do not know.
    #[error(
        "provision {at}: unknown searchable field {name:?}; use birth_year, sex, condition, measurement, drug, procedure or observation_period"
    )]
    UnknownSearchField { at: ProvisionPath, name: String },
    /// An actor's organisation id is empty, too long or has control characters.
    #[error(
        "provision {at}: organisation id {id:?} is not usable; give the registered organisation id (1 to 128 printable characters)"
    )]
    InvalidOrganisation { at: ProvisionPath, id: String },
    /// Nesting deeper than [`crate::policy::MAX_DEPTH`].
    #[error(
        "provision {at} is nested {depth} levels deep, more than {max}; flatten the policy (siblings instead of nesting)"
    )]
    TooDeep {
        at: ProvisionPath,
        depth: usize,
        max: usize,
    },
    /// More than [`crate::policy::MAX_PROVISIONS`] provisions.
    #[error(
        "the policy has more than {max} provisions; merge provisions that grant the same thing"
    )]
    TooManyProvisions { max: usize },
    /// Two policies of one history share a version number.
    #[error("two policies share version {version}; every change needs a new, higher version")]
    DuplicateVersion { version: u32 },
    /// A newer version was issued before an older one.
    #[error(
        "version {version} was issued before version {previous}; a newer version must not be issued earlier"
    )]
    VersionOutOfOrder { version: u32, previous: u32 },
}

/// Where a period sits: on the policy or on a provision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Policy,
    Provision(ProvisionPath),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Policy => f.write_str("the policy"),
            Location::Provision(path) => write!(f, "provision {path}"),
        }
    }
}

impl PolicyError {
    pub(crate) fn json(err: &serde_json::Error) -> PolicyError {
        let full = err.to_string();
        // serde_json quotes offending values; keep the message short whatever they are.
        let message: String = full.chars().take(160).collect();
        PolicyError::Json {
            line: err.line(),
            column: err.column(),
            message,
        }
    }
}

/// A FHIR R4 `Consent` that the importer cannot map onto a policy without permitting
/// more than the patient did.
///
/// A refusal is not an error in the Consent: it says which feature the broker cannot
/// express and what the custodian can do instead. Paths name FHIR rules: `[]` is
/// `Consent.provision`, `[0]` its first nested `provision`, and so on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("not a FHIR Consent (resourceType is {found:?}); import Consent resources only")]
    NotAConsent { found: String },
    #[error(
        "the Consent's status is {status:?}, not \"active\": only a consent in force can be imported; import the active version"
    )]
    NotActive { status: String },
    #[error("the Consent has no scope; it must say whether it is a research or a privacy consent")]
    MissingScope,
    #[error(
        "the Consent's scope is {scope:?}: it is about {about}, not about sharing records; only research and patient-privacy consents can be imported"
    )]
    ScopeNotAboutData { scope: String, about: &'static str },
    #[error(
        "the Consent's scope {scope:?} is not one we know (research, patient-privacy, treatment, adr)"
    )]
    UnknownScope { scope: String },
    #[error(
        "the Consent's policyRule {rule:?} is not OPTIN, OPTINR, OPTOUT or OPTOUTE; the base decision cannot be told"
    )]
    UnknownPolicyRule { rule: String },
    #[error(
        "an opt-out research consent would share by default, but research consent here is opt-in; ask the patient for an opt-in (OPTIN) research consent"
    )]
    OptOutResearch,
    #[error(
        "the Consent has no dateTime; the broker needs when consent was given to order its versions"
    )]
    MissingDate,
    #[error(
        "{field} {value:?} is not a FHIR dateTime (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss with a zone)"
    )]
    BadDate { field: &'static str, value: String },
    #[error("the Consent has no provision: it states no rule that could be applied")]
    NoProvision,
    #[error(
        "the root rule has no type and the Consent has no policyRule, so whether it permits or denies cannot be told; add policyRule OPTIN or OPTOUT"
    )]
    UnclearRootRule,
    #[error(
        "{} has no type: FHIR R4 requires permit or deny on every nested rule, and guessing could permit what the patient denied; give each nested rule a type",
        rule_name(.at)
    )]
    MissingNestedType { at: ProvisionPath },
    #[error("{} has type {found:?}; use \"permit\" or \"deny\"", rule_name(.at))]
    BadType { at: ProvisionPath, found: String },
    #[error("rules are nested deeper than {max} levels; flatten the Consent")]
    TooDeep { max: usize },
    #[error(
        "{} restricts by a reference to specific resources (provision.data); the broker releases whole categories and cannot express a rule about one record; restate it by category (class or securityLabel)",
        rule_name(.at)
    )]
    DataReference { at: ProvisionPath },
    #[error(
        "{} names a {resource_type} as actor, not an organisation; the broker releases only to studies of registered organisations; name the organisation instead",
        rule_name(.at)
    )]
    IndividualActor {
        at: ProvisionPath,
        resource_type: String,
    },
    #[error(
        "{} names an actor without a reference (by role or identifier only); a permit needs the organisation it permits; give an Organization reference",
        rule_name(.at)
    )]
    RoleOnlyActor { at: ProvisionPath },
    #[error(
        "{} names an actor whose reference is not Type/id with a usable id (at most 128 printable characters); use a relative reference such as Organization/org-17",
        rule_name(.at)
    )]
    BadReference { at: ProvisionPath },
    #[error(
        "{} limits a permit to the records held or written by one organisation (actor role CST or AUT); the broker does not keep where a record comes from, so the permit would grant more; import it from that organisation's records only, or drop the condition",
        rule_name(.at)
    )]
    CustodianRestriction { at: ProvisionPath },
    #[error(
        "{} permits disclosure without naming a research purpose; research use needs explicit consent: name purpose HRESCH or a GA4GH DUO term (e.g. DUO:0000006 HMB)",
        rule_name(.at)
    )]
    PermitWithoutResearchPurpose { at: ProvisionPath },
    #[error(
        "{} names DUO term {term}, which needs a parameter a FHIR Coding cannot carry (a disease, an end date or a region); write the policy in the broker's own format",
        rule_name(.at)
    )]
    DuoTermNeedsParameter {
        at: ProvisionPath,
        term: &'static str,
    },
    #[error("{} names DUO term {term:?}, which the broker does not support", rule_name(.at))]
    UnsupportedDuoTerm { at: ProvisionPath, term: String },
    #[error(
        "{} names more than one primary research purpose; the broker needs one per rule: split it into sibling rules",
        rule_name(.at)
    )]
    SeveralPrimaries { at: ProvisionPath },
    #[error(
        "{} restricts by {element}, which no record category expresses, and the permit would grant more without it; restate it by class (resource type) or securityLabel",
        rule_name(.at)
    )]
    UnmappedRestriction {
        at: ProvisionPath,
        element: &'static str,
    },
    #[error(
        "{} is a deny that the broker can only widen (its {element} cannot be expressed), but it contains permits that would then apply more widely; restate the rule by category, organisation or purpose",
        rule_name(.at)
    )]
    DenyWithExceptions {
        at: ProvisionPath,
        element: &'static str,
    },
    #[error(
        "{} allows emergency access only under conditions (actor, period or data); the broker's break-glass choice is all or nothing; allow or deny emergency access as a whole",
        rule_name(.at)
    )]
    ConditionalBreakGlass { at: ProvisionPath },
    #[error(
        "the Consent says nothing about research or break-glass (it concerns only other purposes or actions); importing it as a policy would revoke research consent given elsewhere, so nothing is imported"
    )]
    NothingToImport,
    #[error(
        "the mapped policy was rejected: {0}; this is a defect in the importer, please report the Consent's shape (not its content)"
    )]
    Mapping(#[from] PolicyError),
}

/// Names a FHIR rule by its path: `[]` is the root rule.
fn rule_name(at: &ProvisionPath) -> String {
    if at.0.is_empty() {
        "the root rule".to_owned()
    } else {
        format!("nested rule {at}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_display_as_index_lists() {
        assert_eq!(ProvisionPath(vec![]).to_string(), "[]");
        assert_eq!(ProvisionPath(vec![1, 0]).to_string(), "[1, 0]");
        assert_eq!(ProvisionPath(vec![2]).child(3), ProvisionPath(vec![2, 3]));
    }

    #[test]
    fn excerpts_are_short_and_printable() {
        let long = "x".repeat(10_000);
        let e = excerpt(&long);
        assert!(e.chars().count() <= QUOTE_LIMIT + 1);
        assert_eq!(excerpt("a\u{0}b"), "a?b");
    }

    #[test]
    fn messages_do_not_embed_large_input() {
        let err = PolicyError::UnknownCategory {
            at: ProvisionPath(vec![0]),
            name: excerpt(&"mental".repeat(1000)),
        };
        assert!(err.to_string().len() < 600, "{}", err.to_string().len());
    }
}
