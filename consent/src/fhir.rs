//! Import of FHIR R4 `Consent` resources.
//!
//! [`from_fhir_consent`] maps a Consent onto a [`ConsentPolicy`] or refuses it with a
//! [`Refusal`]. The rule it never breaks: **the mapped policy permits nothing the
//! Consent does not**. Where a FHIR rule says something the model cannot express, a
//! deny may be *widened* (it then withholds more), a permit may be *narrowed* (it then
//! releases less), and otherwise the Consent is refused. Every widening and narrowing
//! is reported in [`ImportedConsent::notes`].
//!
//! # Reading a Consent
//! - `status` must be `active`.
//! - `scope` `research`: a research consent. Its permits become research permits; a
//!   permit without a purpose is general research use (GRU).
//! - `scope` `patient-privacy`: a consent about disclosing records. Its denies apply
//!   to research and to break-glass as written. Its permits become research permits
//!   only when they name a research purpose (v3-ActReason `HRESCH`, or a DUO term):
//!   research use needs explicit consent. A permit for emergency treatment
//!   (`ETREAT`) becomes the break-glass choice.
//! - `scope` `treatment` and `adr` (advance directive) are not about sharing records.
//! - `policyRule` `OPTIN`/`OPTINR` or `OPTOUT`/`OPTOUTE` gives the base decision. The
//!   base for research is always deny; an opt-out *research* consent is refused. The
//!   opt-out default of a privacy consent (disclosure for care) is not carried into
//!   research or break-glass.
//! - The root rule's `type`, when absent (R4 leaves it to the policyRule): a root
//!   without nested rules is the consent's one exception to the base, so it permits
//!   under OPTIN and denies under OPTOUT; a root with nested rules only scopes them
//!   (its conditions limit where the nested exceptions apply). Nested rules must have
//!   a type.
//! - `actor`: an `Organization` reference is the organisation a rule is about (the
//!   study's sponsor); with role `CST` (custodian) or `AUT` (author) it is the
//!   organisation holding or writing the records, which the broker does not track. A reference to an individual
//!   (Practitioner, Patient, RelatedPerson, ...) is refused.
//! - `action`: a rule that names only actions the broker never performs (`collect`,
//!   `correct`) is left out; `access`, `use` and `disclose` are releases.
//! - `purpose`: DUO codings (`http://purl.obolibrary.org/obo/duo.owl` or `DUO:` ids)
//!   and `HRESCH` (read as HMB) are research purposes; `ETREAT` is emergency treatment;
//!   other v3-ActReason codes are purposes the broker never serves.
//! - `class` (resource types) and `securityLabel` (v3-Confidentiality `N`, v3-ActCode
//!   sensitivity codes) map to categories; `code`, `dataPeriod` and unmapped classes
//!   cannot be expressed; `data` (references to specific resources) is refused.
//! - `period` becomes the provision's period; FHIR ends are inclusive to their
//!   precision, so an end of `2016-01-01` means until the end of that day (UTC when
//!   no zone is given).
//! - Searchable fields are not part of FHIR Consent: imported permits make none
//!   searchable.

use std::collections::BTreeSet;

use model::Category;
use serde_json::Value;

use crate::duo::{DataUse, DuoTerm, DuoTermError, Modifier, Primary};
use crate::error::{ProvisionPath, Refusal, excerpt};
use crate::policy::{
    Actor, BreakGlass, Categories, ConsentPolicy, Effect, MAX_DEPTH, Period, PolicyDraft, Provision,
};

/// What a Consent was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentScope {
    Research,
    PatientPrivacy,
}

/// A Consent mapped onto a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedConsent {
    /// The policy, as version 1 (or the Consent's numeric `meta.versionId`). The
    /// broker re-issues it as the patient's next version: edit
    /// [`ConsentPolicy::into_draft`] and [`PolicyDraft::check`] it.
    pub policy: ConsentPolicy,
    pub scope: ConsentScope,
    /// What was widened, narrowed or left out, rule by rule.
    pub notes: Vec<String>,
}

/// Maps a FHIR R4 Consent onto a policy, or refuses it.
pub fn from_fhir_consent(json: &Value) -> Result<ImportedConsent, Refusal> {
    let resource_type = json
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("");
    if resource_type != "Consent" {
        return Err(Refusal::NotAConsent {
            found: excerpt(resource_type),
        });
    }
    let status = json.get("status").and_then(Value::as_str).unwrap_or("");
    if status != "active" {
        return Err(Refusal::NotActive {
            status: excerpt(status),
        });
    }
    let scope = read_scope(json)?;
    let base = read_policy_rule(json)?;
    if scope == ConsentScope::Research && base == Some(Base::OptOut) {
        return Err(Refusal::OptOutResearch);
    }
    let issued_at = match json.get("dateTime").and_then(Value::as_str) {
        None => return Err(Refusal::MissingDate),
        Some(text) => {
            parse_date_time(text)
                .ok_or_else(|| Refusal::BadDate {
                    field: "dateTime",
                    value: excerpt(text),
                })?
                .0
        }
    };
    let root_json = json.get("provision").ok_or(Refusal::NoProvision)?;
    let root = Rule::read(root_json, ProvisionPath::default(), base)?;

    let mut importer = Importer {
        scope,
        notes: Vec::new(),
    };
    if base == Some(Base::OptOut) {
        importer.notes.push(
            "policyRule OPTOUT: the opt-out default (disclosure for care) is not carried into research or break-glass, which stay opt-in".into(),
        );
    }
    let top = Above::default();
    let provisions = match importer.convert(&root, &top)? {
        Converted::Provision(p) => vec![p],
        Converted::Dropped => Vec::new(),
        // The root has no parent permit to fold into.
        Converted::Subtract(_) => Vec::new(),
    };
    let (break_glass, emergency_stated) = importer.break_glass(&root)?;
    if provisions.is_empty() && !emergency_stated {
        // An empty policy would still supersede (revoke) a research consent given
        // elsewhere, which this Consent does not say.
        return Err(Refusal::NothingToImport);
    }

    let version = json
        .pointer("/meta/versionId")
        .and_then(Value::as_str)
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|v| *v > 0)
        .unwrap_or(1);
    let mut draft = PolicyDraft::new(version, issued_at);
    draft.break_glass = break_glass;
    draft.provisions = provisions;
    let policy = draft.check()?;
    Ok(ImportedConsent {
        policy,
        scope,
        notes: importer.notes,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    OptIn,
    OptOut,
}

fn read_scope(json: &Value) -> Result<ConsentScope, Refusal> {
    let codes = codings(json.get("scope"));
    let Some((_, code)) = codes.first() else {
        return Err(Refusal::MissingScope);
    };
    match *code {
        "research" => Ok(ConsentScope::Research),
        "patient-privacy" => Ok(ConsentScope::PatientPrivacy),
        "treatment" => Err(Refusal::ScopeNotAboutData {
            scope: "treatment".into(),
            about: "consent to a treatment or procedure",
        }),
        "adr" => Err(Refusal::ScopeNotAboutData {
            scope: "adr".into(),
            about: "an advance directive for care",
        }),
        other => Err(Refusal::UnknownScope {
            scope: excerpt(other),
        }),
    }
}

fn read_policy_rule(json: &Value) -> Result<Option<Base>, Refusal> {
    let codes = codings(json.get("policyRule"));
    let Some((_, code)) = codes.first() else {
        return Ok(None);
    };
    match *code {
        "OPTIN" | "OPTINR" => Ok(Some(Base::OptIn)),
        "OPTOUT" | "OPTOUTE" => Ok(Some(Base::OptOut)),
        other => Err(Refusal::UnknownPolicyRule {
            rule: excerpt(other),
        }),
    }
}

/// `(system, code)` pairs of a Coding, a CodeableConcept, or an array of either.
fn codings(value: Option<&Value>) -> Vec<(&str, &str)> {
    fn push<'a>(value: &'a Value, out: &mut Vec<(&'a str, &'a str)>) {
        match value {
            Value::Array(items) => items.iter().for_each(|v| push(v, out)),
            Value::Object(map) => {
                if let Some(coding) = map.get("coding") {
                    push(coding, out);
                } else if let Some(code) = map.get("code").and_then(Value::as_str) {
                    let system = map.get("system").and_then(Value::as_str).unwrap_or("");
                    out.push((system, code));
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(value) = value {
        push(value, &mut out);
    }
    out
}

fn list<'a>(rule: &'a Value, key: &str) -> &'a [Value] {
    rule.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Permit,
    Deny,
    /// A root rule without type that has nested rules: it only scopes them.
    Scope,
}

/// A FHIR provision with its type settled.
struct Rule<'a> {
    at: ProvisionPath,
    kind: Kind,
    json: &'a Value,
    children: Vec<Rule<'a>>,
}

impl<'a> Rule<'a> {
    fn read(json: &'a Value, at: ProvisionPath, base: Option<Base>) -> Result<Rule<'a>, Refusal> {
        // Our top-level provision is the FHIR root, one level deeper than its path.
        if at.depth() + 1 > MAX_DEPTH {
            return Err(Refusal::TooDeep { max: MAX_DEPTH });
        }
        if let Some(t) = json.get("type")
            && !t.is_string()
        {
            return Err(Refusal::BadType {
                at,
                found: excerpt(&t.to_string()),
            });
        }
        let nested = list(json, "provision");
        let kind = match json.get("type").and_then(Value::as_str) {
            Some("permit") => Kind::Permit,
            Some("deny") => Kind::Deny,
            Some(other) => {
                return Err(Refusal::BadType {
                    at,
                    found: excerpt(other),
                });
            }
            None if at.depth() > 0 => return Err(Refusal::MissingNestedType { at }),
            None if !nested.is_empty() => Kind::Scope,
            None => match base {
                Some(Base::OptIn) => Kind::Permit,
                Some(Base::OptOut) => Kind::Deny,
                None => return Err(Refusal::UnclearRootRule),
            },
        };
        let mut children = Vec::with_capacity(nested.len());
        for (index, child) in nested.iter().enumerate() {
            children.push(Rule::read(child, at.child(index), base)?);
        }
        Ok(Rule {
            at,
            kind,
            json,
            children,
        })
    }

    fn has_permit_below(&self) -> bool {
        self.children
            .iter()
            .any(|c| c.kind == Kind::Permit || c.has_permit_below())
    }

    /// Whether the rule names actions and none of them is a release.
    fn only_other_actions(&self) -> bool {
        let actions = codings(self.json.get("action"));
        !actions.is_empty()
            && !actions
                .iter()
                .any(|(_, code)| matches!(*code, "access" | "use" | "disclose"))
    }

    fn describe(&self) -> String {
        if self.at.depth() == 0 {
            "root rule".into()
        } else {
            format!("rule {}", self.at)
        }
    }
}

/// What the rules around a rule contribute.
#[derive(Clone, Default)]
struct Above {
    /// The research data use of the nearest rule that names one.
    data_use: Option<DataUse>,
    /// Categories the enclosing rules limit the data to.
    categories: Option<BTreeSet<Category>>,
    /// The categories the nearest enclosing permit releases (for folding a nested
    /// category deny into it).
    permit_categories: Option<Categories>,
    /// Whether the nearest enclosing rule is a permit (kept in the policy).
    parent_is_permit: bool,
}

enum Converted {
    Provision(Provision),
    /// Left out: the rule concerns nothing the broker does.
    Dropped,
    /// A nested deny of categories only: the parent permit releases these less.
    Subtract(BTreeSet<Category>),
}

/// The purposes a rule names, sorted by what they mean here.
#[derive(Default)]
struct Purposes {
    named: bool,
    primaries: Vec<Primary>,
    modifiers: BTreeSet<Modifier>,
    emergency: bool,
    other: bool,
    unknown: bool,
    needs_parameter: Option<&'static str>,
    unsupported: Option<String>,
}

/// Actor roles that name where records come from (custodian, author), not who
/// receives them.
const DATA_SOURCE_ROLES: [&str; 2] = ["CST", "AUT"];

const DUO_SYSTEM: &str = "purl.obolibrary.org/obo/duo";
const ACT_REASON: [&str; 2] = [
    "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "urn:oid:2.16.840.1.113883.5.8",
];
/// v3-ActReason purposes of use that are not research.
const NOT_RESEARCH: [&str; 18] = [
    "TREAT",
    "HPAYMT",
    "HOPERAT",
    "HMARKT",
    "HSYSADMIN",
    "PATRQT",
    "FAMRQT",
    "PWATRNY",
    "SUPNWK",
    "COC",
    "CAREMGT",
    "POPHLTH",
    "PUBHLTH",
    "HLEGAL",
    "HDIRECT",
    "HACCRED",
    "HCOMPL",
    "PATADMIN",
];

impl Purposes {
    fn read(rule: &Value) -> Purposes {
        let mut out = Purposes::default();
        for (system, code) in codings(rule.get("purpose")) {
            out.named = true;
            let is_duo = system.to_ascii_lowercase().contains(DUO_SYSTEM)
                || code.to_ascii_uppercase().starts_with("DUO");
            if is_duo {
                match DuoTerm::parse(code) {
                    Ok(DuoTerm::Gru) => out.primaries.push(Primary::Gru),
                    Ok(DuoTerm::Hmb) => out.primaries.push(Primary::Hmb),
                    Ok(DuoTerm::Poa) => out.primaries.push(Primary::Poa),
                    Ok(term @ (DuoTerm::Ds | DuoTerm::Ts | DuoTerm::Gs)) => {
                        out.needs_parameter.get_or_insert(term.code());
                    }
                    Ok(term) => {
                        out.modifiers.insert(
                            term.simple_modifier()
                                .expect("primaries and parameterised terms are matched above"),
                        );
                    }
                    Err(DuoTermError::Unsupported { code, .. }) => {
                        out.unsupported.get_or_insert(code.to_owned());
                    }
                    Err(DuoTermError::Unknown) => out.unknown = true,
                }
                continue;
            }
            let act_reason = system.is_empty() || ACT_REASON.contains(&system);
            match code {
                "HRESCH" if act_reason => out.primaries.push(Primary::Hmb),
                "ETREAT" if act_reason => out.emergency = true,
                c if act_reason && NOT_RESEARCH.contains(&c) => out.other = true,
                _ => out.unknown = true,
            }
        }
        out.primaries.dedup();
        out
    }

    fn research(&self) -> bool {
        !self.primaries.is_empty() || !self.modifiers.is_empty()
    }
}

/// Maps a resource type (`class` with system resource-types) to a category.
fn class_category(system: &str, code: &str) -> Option<Category> {
    if !(system.is_empty() || system == "http://hl7.org/fhir/resource-types") {
        return None;
    }
    Some(match code {
        "Patient" => Category::Demographics,
        "Condition" => Category::Conditions,
        "Observation" => Category::Observations,
        "MedicationRequest"
        | "MedicationStatement"
        | "MedicationAdministration"
        | "MedicationDispense"
        | "Medication" => Category::Medications,
        "Procedure" => Category::Procedures,
        "Immunization" => Category::Immunizations,
        "AllergyIntolerance" => Category::Allergies,
        "Encounter" => Category::Encounters,
        _ => return None,
    })
}

/// Maps a security label to categories. `broad` (for what a deny withholds) lets a
/// generic sensitivity code stand for every sensitive category.
fn label_categories(system: &str, code: &str, broad: bool) -> Option<BTreeSet<Category>> {
    let sensitive = || {
        Category::ALL
            .into_iter()
            .filter(|c| c.is_sensitive())
            .collect()
    };
    match (system, code) {
        ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "N" | "L" | "M") => {
            Some(Categories::standard().collect())
        }
        ("http://terminology.hl7.org/CodeSystem/v3-ActCode", code) => match code {
            "PSY" | "PSYTHPN" | "MH" => Some(BTreeSet::from([Category::MentalHealth])),
            "ETH" | "SUD" => Some(BTreeSet::from([Category::SubstanceUse])),
            "SEX" | "STD" | "HIV" => Some(BTreeSet::from([Category::SexualHealth])),
            "GDIS" => Some(BTreeSet::from([Category::Genomics])),
            "SPI" if broad => Some(sensitive()),
            _ => None,
        },
        _ => None,
    }
}

/// The categories a rule limits data to, and the element that could not be mapped.
struct DataLimit {
    categories: Option<BTreeSet<Category>>,
    unmapped: Option<&'static str>,
    partly_unmapped: bool,
}

fn data_limit(rule: &Value, broad: bool) -> DataLimit {
    let mut limit = DataLimit {
        categories: None,
        unmapped: None,
        partly_unmapped: false,
    };
    if !list(rule, "code").is_empty() {
        limit.unmapped = Some("code");
    } else if rule.get("dataPeriod").is_some() {
        limit.unmapped = Some("dataPeriod");
    }
    let mut intersect = |set: BTreeSet<Category>| {
        limit.categories = Some(match limit.categories.take() {
            None => set,
            Some(before) => before.intersection(&set).copied().collect(),
        });
    };
    let classes = codings(rule.get("class"));
    if !classes.is_empty() {
        let mapped: BTreeSet<Category> = classes
            .iter()
            .filter_map(|(s, c)| class_category(s, c))
            .collect();
        let all_mapped = classes.iter().all(|(s, c)| class_category(s, c).is_some());
        if mapped.is_empty() {
            limit.unmapped.get_or_insert("class");
        } else if !all_mapped {
            limit.partly_unmapped = true;
        }
        intersect(mapped);
    }
    let labels = codings(rule.get("securityLabel"));
    if !labels.is_empty() {
        let mut mapped = BTreeSet::new();
        let mut all_mapped = true;
        for (s, c) in &labels {
            match label_categories(s, c, broad) {
                Some(set) => mapped.extend(set),
                None => all_mapped = false,
            }
        }
        if mapped.is_empty() {
            limit.unmapped.get_or_insert("securityLabel");
        } else if !all_mapped {
            limit.partly_unmapped = true;
        }
        intersect(mapped);
    }
    limit
}

/// Reads `period` into our window; FHIR ends are inclusive to their precision.
fn read_period(rule: &Value, field: &'static str) -> Result<Option<Period>, Refusal> {
    let Some(period) = rule.get(field) else {
        return Ok(None);
    };
    let bound = |key: &str, end: bool| -> Result<Option<i64>, Refusal> {
        match period.get(key).and_then(Value::as_str) {
            None => Ok(None),
            Some(text) => parse_date_time(text)
                .map(|(start, after)| Some(if end { after } else { start }))
                .ok_or_else(|| Refusal::BadDate {
                    field,
                    value: excerpt(text),
                }),
        }
    };
    let start = bound("start", false)?;
    let end = bound("end", true)?;
    if let (Some(s), Some(e)) = (start, end)
        && e <= s
    {
        return Err(Refusal::BadDate {
            field,
            value: "end before start".into(),
        });
    }
    Ok(Some(Period::new(start, end)))
}

struct Importer {
    scope: ConsentScope,
    notes: Vec<String>,
}

impl Importer {
    fn note(&mut self, rule: &Rule<'_>, text: &str) {
        self.notes.push(format!("{}: {text}", rule.describe()));
    }

    /// Widens a deny (or scope) by dropping a condition, if that cannot make a nested
    /// permit apply more widely.
    fn widen(&mut self, rule: &Rule<'_>, element: &'static str, what: &str) -> Result<(), Refusal> {
        if rule.has_permit_below() {
            return Err(Refusal::DenyWithExceptions {
                at: rule.at.clone(),
                element,
            });
        }
        self.note(rule, what);
        Ok(())
    }

    fn convert(&mut self, rule: &Rule<'_>, above: &Above) -> Result<Converted, Refusal> {
        let json = rule.json;
        let permit = rule.kind == Kind::Permit;

        if !list(json, "data").is_empty() {
            return Err(Refusal::DataReference {
                at: rule.at.clone(),
            });
        }

        let mut actors = Vec::new();
        for actor in list(json, "actor") {
            let roles = codings(actor.get("role"));
            let reference = actor
                .pointer("/reference/reference")
                .and_then(Value::as_str);
            let Some(reference) = reference else {
                if permit {
                    return Err(Refusal::RoleOnlyActor {
                        at: rule.at.clone(),
                    });
                }
                self.widen(rule, "actor role", "an actor named by role only was dropped: the deny now covers every organisation")?;
                continue;
            };
            let mut parts = reference.rsplit('/');
            let id = parts.next().unwrap_or("");
            let resource_type = parts.next().unwrap_or("");
            let usable = |s: &str| {
                !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic())
            };
            if !usable(resource_type) || !usable(id) {
                return Err(Refusal::BadReference {
                    at: rule.at.clone(),
                });
            }
            if resource_type != "Organization" {
                return Err(Refusal::IndividualActor {
                    at: rule.at.clone(),
                    resource_type: excerpt(resource_type),
                });
            }
            if roles
                .iter()
                .any(|(_, code)| DATA_SOURCE_ROLES.contains(code))
            {
                if permit || rule.has_permit_below() {
                    return Err(Refusal::CustodianRestriction {
                        at: rule.at.clone(),
                    });
                }
                self.note(rule, "the organisation holding or authoring the records (actor role CST or AUT) was dropped: the deny now covers records wherever they come from");
                continue;
            }
            actors.push(Actor::Organisation(id.to_owned()));
        }

        if rule.only_other_actions() {
            self.note(rule, "left out: it names only actions the broker never performs (such as collect or correct)");
            return Ok(Converted::Dropped);
        }

        let purposes = Purposes::read(json);
        let mut data_use = None;
        // What nested permits inherit: the full data use this rule names.
        let mut passed_down = None;
        if permit {
            if let Some(term) = purposes.needs_parameter {
                return Err(Refusal::DuoTermNeedsParameter {
                    at: rule.at.clone(),
                    term,
                });
            }
            if let Some(term) = &purposes.unsupported {
                return Err(Refusal::UnsupportedDuoTerm {
                    at: rule.at.clone(),
                    term: term.clone(),
                });
            }
            if purposes.primaries.len() > 1 {
                return Err(Refusal::SeveralPrimaries {
                    at: rule.at.clone(),
                });
            }
            if purposes.named && !purposes.research() {
                self.note(rule, "left out of research: it names no research purpose the broker can express (a DUO term or HRESCH); emergency treatment is the break-glass choice");
                return Ok(Converted::Dropped);
            }
            let inherited = above.data_use.clone();
            let primary = purposes
                .primaries
                .first()
                .cloned()
                .or_else(|| inherited.as_ref().map(|d| d.primary.clone()));
            let primary = match primary {
                Some(p) => p,
                None if self.scope == ConsentScope::Research => {
                    self.note(
                        rule,
                        "a research permit without a purpose is general research use (GRU)",
                    );
                    Primary::Gru
                }
                None => {
                    return Err(Refusal::PermitWithoutResearchPurpose {
                        at: rule.at.clone(),
                    });
                }
            };
            let mut modifiers = inherited.map(|d| d.modifiers).unwrap_or_default();
            modifiers.extend(purposes.modifiers.iter().cloned());
            if purposes.unknown || purposes.other || purposes.emergency {
                self.note(
                    rule,
                    "purposes other than research were left out of this research permit",
                );
            }
            data_use = Some(DataUse { primary, modifiers });
            passed_down = data_use.clone();
        } else if purposes.named {
            let uncertain = purposes.unknown
                || purposes.needs_parameter.is_some()
                || purposes.unsupported.is_some()
                || purposes.primaries.len() > 1;
            if uncertain {
                self.widen(rule, "purpose", "a purpose that cannot be expressed was dropped: the deny now covers all research")?;
            } else if purposes.primaries.len() == 1 {
                if !purposes.modifiers.is_empty() && rule.kind == Kind::Deny {
                    self.widen(rule, "purpose modifiers", "DUO modifiers were dropped from the deny: it now covers all research of its kind")?;
                }
                data_use = Some(DataUse::new(purposes.primaries[0].clone()));
                let mut modifiers = above
                    .data_use
                    .as_ref()
                    .map(|d| d.modifiers.clone())
                    .unwrap_or_default();
                modifiers.extend(purposes.modifiers.iter().cloned());
                passed_down = Some(DataUse {
                    primary: purposes.primaries[0].clone(),
                    modifiers,
                });
            } else if !purposes.modifiers.is_empty() {
                self.widen(rule, "purpose modifiers", "DUO modifiers without a primary term were dropped: the deny now covers all research")?;
            } else {
                self.note(rule, "left out of research: it concerns only purposes other than research (emergency treatment is the break-glass choice)");
                return Ok(Converted::Dropped);
            }
        }

        let limit = data_limit(json, !permit);
        let mut categories = None;
        let mut limit_below = above.categories.clone();
        if permit {
            if let Some(element) = limit.unmapped {
                return Err(Refusal::UnmappedRestriction {
                    at: rule.at.clone(),
                    element,
                });
            }
            if limit.partly_unmapped {
                self.note(
                    rule,
                    "classes or labels with no category were dropped: the permit releases less",
                );
            }
            let mut set = limit.categories.clone();
            if let Some(outer) = &above.categories {
                set = Some(match set {
                    None => outer.clone(),
                    Some(own) => own.intersection(outer).copied().collect(),
                });
            }
            if let Some(set) = set {
                if set.is_empty() {
                    return Err(Refusal::UnmappedRestriction {
                        at: rule.at.clone(),
                        element: "class and securityLabel together",
                    });
                }
                categories = Some(Categories::only(set));
            }
        } else if limit.categories.is_some() || limit.unmapped.is_some() {
            let only_categories = rule.kind == Kind::Deny
                && rule.children.is_empty()
                && actors.is_empty()
                && json.get("period").is_none()
                && !purposes.named
                && limit.unmapped.is_none()
                && !limit.partly_unmapped
                && above.parent_is_permit;
            if only_categories && let Some(set) = limit.categories {
                self.note(
                    rule,
                    "a deny of categories within a permit: the permit releases them no longer",
                );
                return Ok(Converted::Subtract(set));
            }
            if rule.has_permit_below() {
                // The permits within stay limited to these categories (read as a
                // permit reads them); the deny itself widens to every category.
                let strict = data_limit(json, false);
                let element = strict.unmapped.or(if strict.partly_unmapped {
                    Some("class or securityLabel")
                } else {
                    None
                });
                if let Some(element) = element {
                    return Err(Refusal::DenyWithExceptions {
                        at: rule.at.clone(),
                        element,
                    });
                }
                limit_below = match (limit_below, strict.categories) {
                    (Some(outer), Some(own)) => Some(outer.intersection(&own).copied().collect()),
                    (outer, own) => own.or(outer),
                };
                self.note(rule, "the deny now covers all categories; the permits within it stay limited to its categories");
            } else {
                self.note(rule, "a data restriction (class, securityLabel, code or dataPeriod) was dropped: the deny now covers all categories");
            }
        }

        let period = read_period(json, "period")?;

        let effect = match rule.kind {
            Kind::Permit => Effect::Permit,
            Kind::Deny | Kind::Scope => Effect::Deny,
        };
        let mut provision = Provision {
            effect,
            period,
            actors,
            data_use,
            categories,
            fields: None,
            provisions: Vec::new(),
        };
        if rule.kind == Kind::Scope {
            self.note(rule, "a root rule without type scopes its nested rules: it becomes a deny (the base) holding them");
        }

        let below = Above {
            data_use: passed_down.or_else(|| above.data_use.clone()),
            categories: limit_below,
            permit_categories: if permit {
                provision
                    .categories
                    .clone()
                    .or_else(|| above.permit_categories.clone())
            } else {
                above.permit_categories.clone()
            },
            parent_is_permit: permit,
        };
        for child in &rule.children {
            match self.convert(child, &below)? {
                Converted::Provision(p) => provision.provisions.push(p),
                Converted::Dropped => {}
                Converted::Subtract(set) => {
                    let current = below
                        .permit_categories
                        .clone()
                        .unwrap_or_else(Categories::all_standard);
                    let released = provision.categories.clone().unwrap_or(current).resolve();
                    provision.categories =
                        Some(Categories::only(released.difference(&set).copied()));
                }
            }
        }
        Ok(Converted::Provision(provision))
    }

    /// The break-glass choice: allow only if some permit explicitly names emergency
    /// treatment without other conditions, and no deny applies to emergencies.
    /// Also says whether the Consent speaks of emergencies at all.
    fn break_glass(&mut self, root: &Rule<'_>) -> Result<(BreakGlass, bool), Refusal> {
        let mut allowed = false;
        let mut denied = false;
        self.walk_emergency(root, Emergency::default(), &mut allowed, &mut denied)?;
        let choice = if allowed && !denied {
            BreakGlass::Allow
        } else {
            BreakGlass::Deny
        };
        Ok((choice, allowed || denied))
    }

    fn walk_emergency(
        &mut self,
        rule: &Rule<'_>,
        above: Emergency,
        allowed: &mut bool,
        denied: &mut bool,
    ) -> Result<(), Refusal> {
        if rule.only_other_actions() {
            return Ok(());
        }
        let json = rule.json;
        let purposes = Purposes::read(json);
        let here = Emergency {
            named: if purposes.named {
                purposes.emergency
            } else {
                above.named
            },
            excluded: if purposes.named {
                !purposes.emergency && !purposes.unknown
            } else {
                above.excluded
            },
            conditional: above.conditional
                || !list(json, "actor").is_empty()
                || json.get("period").is_some()
                || json.get("dataPeriod").is_some()
                || !list(json, "class").is_empty()
                || !list(json, "code").is_empty()
                || !list(json, "securityLabel").is_empty(),
        };
        match rule.kind {
            Kind::Deny if !here.excluded => {
                *denied = true;
                if here.named {
                    self.note(rule, "denies emergency treatment: break-glass is denied");
                }
            }
            Kind::Permit if here.named => {
                if here.conditional {
                    return Err(Refusal::ConditionalBreakGlass {
                        at: rule.at.clone(),
                    });
                }
                *allowed = true;
            }
            _ => {}
        }
        for child in &rule.children {
            self.walk_emergency(child, here, allowed, denied)?;
        }
        Ok(())
    }
}

/// What the rules around a rule say about emergency treatment.
#[derive(Clone, Copy, Default)]
struct Emergency {
    /// The rule's purposes name emergency treatment.
    named: bool,
    /// The rule's purposes leave emergency treatment out.
    excluded: bool,
    /// The rule or one around it has conditions break-glass cannot carry.
    conditional: bool,
}

/// Parses a FHIR `dateTime` (or `date`): returns the first second it covers and the
/// first second after it, at its precision. A date without zone is read as UTC.
pub(crate) fn parse_date_time(text: &str) -> Option<(i64, i64)> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let year = num(0..4)?;
    match b.len() {
        4 => return Some((days(year, 1, 1)? * DAY, days(year + 1, 1, 1)? * DAY)),
        7 if b[4] == b'-' => {
            let month = num(5..7)?;
            let (ny, nm) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            return Some((days(year, month, 1)? * DAY, days(ny, nm, 1)? * DAY));
        }
        10 if b[4] == b'-' && b[7] == b'-' => {
            let start = days(year, num(5..7)?, num(8..10)?)? * DAY;
            return Some((start, start + DAY));
        }
        _ => {}
    }
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &fraction[digits..];
    }
    let offset = match rest {
        "Z" => 0,
        zone if zone.len() == 6 && zone.as_bytes()[3] == b':' => {
            let sign = match zone.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let zb = zone.as_bytes();
            let digits = |r: std::ops::Range<usize>| -> Option<i64> {
                let part = zb.get(r)?;
                if !part.iter().all(u8::is_ascii_digit) {
                    return None;
                }
                std::str::from_utf8(part).ok()?.parse().ok()
            };
            let (h, m) = (digits(1..3)?, digits(4..6)?);
            if h > 14 || m > 59 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let start =
        days(year, num(5..7)?, num(8..10)?)? * DAY + hour * 3600 + minute * 60 + second - offset;
    Some((start, start + 1))
}

const DAY: i64 = 86_400;

/// Days since 1970-01-01 of a proleptic Gregorian date, or `None` if the date does not
/// exist.
fn days(year: i64, month: i64, day: i64) -> Option<i64> {
    if !(1..=12).contains(&month) || day < 1 {
        return None;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day > month_days {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duo::{ResearchPurpose, StudyFocus};
    use crate::evaluate::{AccessRequest, DecidedBy, Requester, evaluate};
    use serde_json::json;

    #[test]
    fn dates() {
        assert_eq!(parse_date_time("1970"), Some((0, 365 * DAY)));
        assert_eq!(parse_date_time("1970-02"), Some((31 * DAY, 59 * DAY)));
        assert_eq!(
            parse_date_time("2000-03-01"),
            Some((11_017 * DAY, 11_018 * DAY))
        );
        assert_eq!(parse_date_time("2016-02-29").map(|d| d.1 - d.0), Some(DAY));
        assert_eq!(parse_date_time("2015-02-29"), None);
        assert_eq!(parse_date_time("2016-13-01"), None);
        assert_eq!(
            parse_date_time("2016-06-23T17:02:33+10:00"),
            Some((1_466_665_353, 1_466_665_354))
        );
        assert_eq!(
            parse_date_time("2016-05-26T00:41:10-04:00"),
            Some((1_464_237_670, 1_464_237_671))
        );
        assert_eq!(parse_date_time("1970-01-01T00:00:00.123Z"), Some((0, 1)));
        assert_eq!(parse_date_time("2016-06-23T17:02:33"), None);
        assert_eq!(parse_date_time("yesterday"), None);
        assert_eq!(parse_date_time("2016-06-23T17:02:33+1000"), None);
        assert_eq!(parse_date_time(""), None);
    }

    fn research_consent(provision: Value) -> Value {
        json!({
            "resourceType": "Consent",
            "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
            "dateTime": "2024-01-01",
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
            "provision": provision
        })
    }

    fn study(org: &str) -> AccessRequest {
        let mut r = AccessRequest::research(
            Requester {
                organisation: org.into(),
                for_profit: false,
            },
            ResearchPurpose::new(StudyFocus::Health),
            Period::default(),
        );
        r.categories = Category::ALL.into_iter().collect();
        r
    }

    const NOW: i64 = 1_750_000_000;

    #[test]
    fn a_research_consent_maps_purposes_classes_and_organisations() {
        let consent = research_consent(json!({
            "type": "permit",
            "period": {"start": "2024-01-01", "end": "2030-12-31"},
            "actor": [{"role": {"coding": [{"code": "PRCP"}]}, "reference": {"reference": "Organization/uni-1"}}],
            "purpose": [
                {"system": "http://purl.obolibrary.org/obo/duo.owl", "code": "DUO:0000006"},
                {"system": "http://purl.obolibrary.org/obo/duo.owl", "code": "DUO:0000018"}
            ],
            "class": [
                {"system": "http://hl7.org/fhir/resource-types", "code": "Condition"},
                {"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}
            ],
            "provision": [{"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]}]
        }));
        let imported = from_fhir_consent(&consent).unwrap();
        assert_eq!(imported.scope, ConsentScope::Research);
        let p = &imported.policy.provisions()[0];
        assert_eq!(p.effect, Effect::Permit);
        assert_eq!(p.actors, vec![Actor::Organisation("uni-1".into())]);
        assert_eq!(
            p.data_use,
            Some(DataUse::new(Primary::Hmb).with(Modifier::Npu))
        );
        // The nested category deny was folded into the permit.
        assert_eq!(p.categories, Some(Categories::only([Category::Conditions])));
        assert!(p.provisions.is_empty());
        assert_eq!(
            p.period.and_then(|p| p.end),
            parse_date_time("2031-01-01").map(|d| d.0)
        );

        let d = evaluate(&imported.policy, &study("uni-1"), NOW);
        assert!(d.is_permit(), "{}", d.reason());
        assert_eq!(
            d.permitted_categories(),
            &BTreeSet::from([Category::Conditions])
        );
        assert!(!evaluate(&imported.policy, &study("uni-2"), NOW).is_permit());
    }

    #[test]
    fn research_permit_without_purpose_is_gru_and_hresch_is_hmb() {
        let imported = from_fhir_consent(&research_consent(json!({}))).unwrap();
        assert_eq!(
            imported.policy.provisions()[0].data_use,
            Some(DataUse::new(Primary::Gru))
        );
        let imported = from_fhir_consent(&research_consent(json!({
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]
        })))
        .unwrap();
        assert_eq!(
            imported.policy.provisions()[0].data_use,
            Some(DataUse::new(Primary::Hmb))
        );
    }

    #[test]
    fn a_privacy_consent_permits_research_only_when_it_says_so() {
        let mut consent = research_consent(json!({
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}],
            "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}]
        }));
        consent["scope"]["coding"][0]["code"] = json!("patient-privacy");
        let imported = from_fhir_consent(&consent).unwrap();
        let d = evaluate(&imported.policy, &study("any"), NOW);
        assert!(d.is_permit(), "{}", d.reason());
        assert_eq!(
            d.permitted_categories(),
            &BTreeSet::from([Category::MentalHealth])
        );

        // Only treatment: nothing for research or break-glass. An empty policy would
        // revoke research consent given elsewhere, so the Consent is refused.
        consent["provision"] = json!({"purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]});
        assert_eq!(from_fhir_consent(&consent), Err(Refusal::NothingToImport));
    }

    #[test]
    fn break_glass_from_etreat() {
        let mut consent = research_consent(json!({
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "ETREAT"}]
        }));
        consent["scope"]["coding"][0]["code"] = json!("patient-privacy");
        let imported = from_fhir_consent(&consent).unwrap();
        assert_eq!(imported.policy.break_glass(), BreakGlass::Allow);

        consent["provision"]["actor"] = json!([{"reference": {"reference": "Organization/er"}}]);
        assert_eq!(
            from_fhir_consent(&consent).unwrap_err(),
            Refusal::ConditionalBreakGlass {
                at: ProvisionPath::default()
            }
        );
    }

    #[test]
    fn refusals() {
        let mut c = research_consent(json!({}));
        c["status"] = json!("inactive");
        assert!(matches!(
            from_fhir_consent(&c),
            Err(Refusal::NotActive { .. })
        ));

        let mut c = research_consent(json!({}));
        c["policyRule"]["coding"][0]["code"] = json!("OPTOUT");
        assert_eq!(from_fhir_consent(&c), Err(Refusal::OptOutResearch));

        let mut c = research_consent(json!({}));
        c["scope"]["coding"][0]["code"] = json!("treatment");
        assert!(matches!(
            from_fhir_consent(&c),
            Err(Refusal::ScopeNotAboutData { .. })
        ));

        let c = research_consent(json!({"purpose": [{"code": "DUO:0000007"}]}));
        assert!(matches!(
            from_fhir_consent(&c),
            Err(Refusal::DuoTermNeedsParameter { term: "DS", .. })
        ));

        let c = research_consent(
            json!({"code": [{"coding": [{"system": "http://loinc.org", "code": "34133-9"}]}]}),
        );
        assert!(matches!(
            from_fhir_consent(&c),
            Err(Refusal::UnmappedRestriction {
                element: "code",
                ..
            })
        ));

        let c = research_consent(json!({
            "type": "deny",
            "code": [{"coding": [{"system": "http://loinc.org", "code": "34133-9"}]}],
            "provision": [{"type": "permit"}]
        }));
        assert!(matches!(
            from_fhir_consent(&c),
            Err(Refusal::DenyWithExceptions {
                element: "code",
                ..
            })
        ));

        let mut c = research_consent(json!({}));
        c["resourceType"] = json!("Patient");
        assert!(matches!(
            from_fhir_consent(&c),
            Err(Refusal::NotAConsent { .. })
        ));

        let mut c = research_consent(json!({}));
        if let Some(o) = c.as_object_mut() {
            o.remove("dateTime");
        }
        assert_eq!(from_fhir_consent(&c), Err(Refusal::MissingDate));
    }

    #[test]
    fn a_deny_without_exceptions_widens() {
        let c = research_consent(json!({
            "type": "deny",
            "dataPeriod": {"start": "2010"},
        }));
        let imported = from_fhir_consent(&c).unwrap();
        let d = evaluate(&imported.policy, &study("x"), NOW);
        assert_eq!(
            d.decided_by(),
            &DecidedBy::Provision(ProvisionPath(vec![0]))
        );
        assert!(imported.notes.iter().any(|n| n.contains("dropped")));
    }

    #[test]
    fn nested_permits_inherit_the_full_purpose_of_a_scope() {
        let c = research_consent(json!({
            "purpose": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"},
                {"system": "http://purl.obolibrary.org/obo/duo.owl", "code": "NPU"}
            ],
            "provision": [{"type": "permit", "actor": [{"reference": {"reference": "Organization/uni-1"}}]}]
        }));
        let imported = from_fhir_consent(&c).unwrap();
        let scope = &imported.policy.provisions()[0];
        assert_eq!(scope.effect, Effect::Deny);
        assert_eq!(scope.data_use, Some(DataUse::new(Primary::Hmb)));
        assert_eq!(
            scope.provisions[0].data_use,
            Some(DataUse::new(Primary::Hmb).with(Modifier::Npu))
        );
        let mut commercial = study("uni-1");
        commercial.requester.for_profit = true;
        assert!(evaluate(&imported.policy, &study("uni-1"), NOW).is_permit());
        assert!(!evaluate(&imported.policy, &commercial, NOW).is_permit());
    }

    #[test]
    fn permits_within_a_category_deny_stay_within_its_categories() {
        let observation =
            json!([{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]);
        let c = research_consent(json!({
            "type": "deny",
            "class": observation,
            "provision": [{"type": "permit", "actor": [{"reference": {"reference": "Organization/uni-1"}}]}]
        }));
        let imported = from_fhir_consent(&c).unwrap();
        let deny = &imported.policy.provisions()[0];
        assert_eq!(deny.categories, None);
        assert_eq!(
            deny.provisions[0].categories,
            Some(Categories::only([Category::Observations]))
        );
        let d = evaluate(&imported.policy, &study("uni-1"), NOW);
        assert_eq!(
            d.permitted_categories(),
            &BTreeSet::from([Category::Observations])
        );
        assert!(!evaluate(&imported.policy, &study("uni-2"), NOW).is_permit());

        // A label a permit cannot read (SPI) cannot limit the permits within.
        let c = research_consent(json!({
            "type": "deny",
            "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "SPI"}],
            "provision": [{"type": "permit"}]
        }));
        assert!(matches!(
            from_fhir_consent(&c),
            Err(Refusal::DenyWithExceptions { .. })
        ));
    }

    #[test]
    fn actor_references_must_be_usable() {
        for reference in ["#contained", "Organization/", "f001"] {
            let c = research_consent(json!({
                "actor": [{"reference": {"reference": reference}}]
            }));
            assert_eq!(
                from_fhir_consent(&c),
                Err(Refusal::BadReference {
                    at: ProvisionPath::default()
                }),
                "{reference}"
            );
        }
        let c = research_consent(json!({
            "actor": [{"reference": {"reference": "https://example.org/fhir/CareTeam/7"}}]
        }));
        assert!(matches!(
            from_fhir_consent(&c),
            Err(Refusal::IndividualActor { resource_type, .. }) if resource_type == "CareTeam"
        ));
    }

    #[test]
    fn authoring_organisations_cannot_limit_a_permit() {
        let c = research_consent(json!({
            "actor": [{"role": {"coding": [{"code": "AUT"}]}, "reference": {"reference": "Organization/lab"}}]
        }));
        assert_eq!(
            from_fhir_consent(&c),
            Err(Refusal::CustodianRestriction {
                at: ProvisionPath::default()
            })
        );
    }

    #[test]
    fn deep_consents_are_refused_without_deep_work() {
        let mut provision = json!({"type": "deny"});
        for _ in 0..(MAX_DEPTH + 2) {
            provision = json!({"type": "deny", "provision": [provision]});
        }
        let c = research_consent(provision);
        assert_eq!(
            from_fhir_consent(&c),
            Err(Refusal::TooDeep { max: MAX_DEPTH })
        );
    }
}
