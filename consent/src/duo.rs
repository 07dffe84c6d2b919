//! GA4GH Data Use Ontology (DUO) terms and the matching of a consented *data use*
//! against a study's *research purpose*, in the style of the Broad Institute's DUOS
//! algorithm.
//!
//! A data use is one primary term (what kind of research: GRU, HMB, DS, POA) and any
//! number of modifiers (conditions: NPU, IRB, PUB, COL, RTN, TS, GS, NMDS, GSO, NPOA).
//! [`match_data_use`] answers [`Verdict::Approve`], [`Verdict::Deny`] or
//! [`Verdict::Abstain`]: the last means the matcher cannot tell and an ethics board
//! must decide (see [`mod@crate::evaluate`] for how the engine treats it).
//!
//! | consent \ study focus | disease | health | general | ancestry | methods |
//! |---|---|---|---|---|---|
//! | GRU | approve | approve | approve | approve | approve |
//! | HMB | approve | approve | deny | deny | approve |
//! | DS  | code rule | deny | deny | deny | deny |
//! | POA | deny | deny | deny | approve | deny |
//!
//! The DS code rule: a study disease equal to a consented disease approves. ICD-10
//! codes are a tree by prefix, so `ICD10:E11.9` is within `ICD10:E11` (approve) and
//! `ICD10:C50` is not (deny). Other systems (MONDO, SNOMED CT, ...) need the ontology's
//! hierarchy to tell a sub-disease from an unrelated one, which this crate does not
//! carry, so a different code in the same system abstains, as does a code of another
//! system. A study must be covered on every disease it names.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use model::{ResearchPurpose, StudyFocus};

use crate::error::{PolicyError, ProvisionPath, excerpt};

/// A DUO term this crate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DuoTerm {
    /// General research use (DUO:0000042).
    Gru,
    /// Health, medical or biomedical research (DUO:0000006).
    Hmb,
    /// Disease-specific research (DUO:0000007), with disease codes.
    Ds,
    /// Population origins or ancestry research only (DUO:0000011).
    Poa,
    /// Not-for-profit, non-commercial use only (DUO:0000018).
    Npu,
    /// Ethics approval required (DUO:0000021).
    Irb,
    /// Publication required (DUO:0000019).
    Pub,
    /// Collaboration with the primary investigators required (DUO:0000020).
    Col,
    /// Return derived or enriched data to the resource (DUO:0000029).
    Rtn,
    /// Time limit on use (DUO:0000025), with an end.
    Ts,
    /// Geographic restriction (DUO:0000022), with a region.
    Gs,
    /// No general methods research (DUO:0000015).
    Nmds,
    /// Genetic studies only (DUO:0000016).
    Gso,
    /// Population origins or ancestry research prohibited (DUO:0000044).
    Npoa,
}

impl DuoTerm {
    /// Every supported term.
    pub const ALL: [DuoTerm; 14] = [
        DuoTerm::Gru,
        DuoTerm::Hmb,
        DuoTerm::Ds,
        DuoTerm::Poa,
        DuoTerm::Npu,
        DuoTerm::Irb,
        DuoTerm::Pub,
        DuoTerm::Col,
        DuoTerm::Rtn,
        DuoTerm::Ts,
        DuoTerm::Gs,
        DuoTerm::Nmds,
        DuoTerm::Gso,
        DuoTerm::Npoa,
    ];

    /// The DUO shorthand, e.g. `HMB`.
    pub fn code(self) -> &'static str {
        match self {
            DuoTerm::Gru => "GRU",
            DuoTerm::Hmb => "HMB",
            DuoTerm::Ds => "DS",
            DuoTerm::Poa => "POA",
            DuoTerm::Npu => "NPU",
            DuoTerm::Irb => "IRB",
            DuoTerm::Pub => "PUB",
            DuoTerm::Col => "COL",
            DuoTerm::Rtn => "RTN",
            DuoTerm::Ts => "TS",
            DuoTerm::Gs => "GS",
            DuoTerm::Nmds => "NMDS",
            DuoTerm::Gso => "GSO",
            DuoTerm::Npoa => "NPOA",
        }
    }

    /// The DUO id, e.g. `DUO:0000006`.
    pub fn id(self) -> &'static str {
        match self {
            DuoTerm::Gru => "DUO:0000042",
            DuoTerm::Hmb => "DUO:0000006",
            DuoTerm::Ds => "DUO:0000007",
            DuoTerm::Poa => "DUO:0000011",
            DuoTerm::Npu => "DUO:0000018",
            DuoTerm::Irb => "DUO:0000021",
            DuoTerm::Pub => "DUO:0000019",
            DuoTerm::Col => "DUO:0000020",
            DuoTerm::Rtn => "DUO:0000029",
            DuoTerm::Ts => "DUO:0000025",
            DuoTerm::Gs => "DUO:0000022",
            DuoTerm::Nmds => "DUO:0000015",
            DuoTerm::Gso => "DUO:0000016",
            DuoTerm::Npoa => "DUO:0000044",
        }
    }

    /// Whether the term is a primary data-use category (GRU, HMB, DS, POA) rather than
    /// a modifier.
    pub fn is_primary(self) -> bool {
        matches!(
            self,
            DuoTerm::Gru | DuoTerm::Hmb | DuoTerm::Ds | DuoTerm::Poa
        )
    }

    /// Parses a code (`HMB`, any case), an id (`DUO:0000006`, `DUO_0000006`) or an OBO
    /// IRI (`http://purl.obolibrary.org/obo/DUO_0000006`).
    pub fn parse(text: &str) -> Result<DuoTerm, DuoTermError> {
        let text = text.trim();
        let tail = text.rsplit('/').next().unwrap_or(text);
        let id = tail.replace('_', ":").to_ascii_uppercase();
        if let Some(term) = DuoTerm::ALL
            .into_iter()
            .find(|t| t.code().eq_ignore_ascii_case(text) || t.id() == id)
        {
            return Ok(term);
        }
        if let Some(&(code, _, hint)) = UNSUPPORTED
            .iter()
            .find(|(code, uid, _)| code.eq_ignore_ascii_case(text) || *uid == id)
        {
            return Err(DuoTermError::Unsupported { code, hint });
        }
        Err(DuoTermError::Unknown)
    }
}

impl fmt::Display for DuoTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Real DUO terms the broker does not enforce, with what to use instead.
const UNSUPPORTED: [(&str, &str, &str); 9] = [
    (
        "NRES",
        "DUO:0000004",
        "no restriction reaches beyond research; use GRU",
    ),
    ("GRU-CC", "DUO:0000005", "obsolete in DUO; use GRU"),
    (
        "RS",
        "DUO:0000012",
        "research-specific restrictions have no machine-readable content",
    ),
    (
        "MOR",
        "DUO:0000024",
        "a publication moratorium is not enforced by the broker",
    ),
    (
        "US",
        "DUO:0000026",
        "name the permitted organisations as actors",
    ),
    (
        "PS",
        "DUO:0000027",
        "project-specific consent is given study by study",
    ),
    (
        "IS",
        "DUO:0000028",
        "name the permitted organisations as actors",
    ),
    (
        "NPO",
        "DUO:0000045",
        "use NPU, or a non_profit sector actor",
    ),
    ("NCU", "DUO:0000046", "use NPU"),
];

/// Why a text is not a supported DUO term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuoTermError {
    /// Not a DUO term we know of.
    Unknown,
    /// A DUO term the broker does not enforce.
    Unsupported {
        code: &'static str,
        hint: &'static str,
    },
}

/// The primary term of a data use: what kind of research it allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Primary {
    /// GRU: any research purpose.
    Gru,
    /// HMB: health, medical or biomedical research; not ancestry research.
    Hmb,
    /// DS: research on these diseases only (`SYSTEM:CODE`, e.g. `MONDO:0005148`).
    Ds(BTreeSet<String>),
    /// POA: population origins or ancestry research only.
    Poa,
}

impl Primary {
    /// The DUO term.
    pub fn term(&self) -> DuoTerm {
        match self {
            Primary::Gru => DuoTerm::Gru,
            Primary::Hmb => DuoTerm::Hmb,
            Primary::Ds(_) => DuoTerm::Ds,
            Primary::Poa => DuoTerm::Poa,
        }
    }
}

/// A modifier of a data use: a condition the study must meet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Modifier {
    /// NPU: only non-commercial use by not-for-profit organisations.
    Npu,
    /// IRB: the study needs ethics approval.
    Irb,
    /// PUB: the study must publish its results.
    Pub,
    /// COL: the study must collaborate with the primary investigators.
    Col,
    /// RTN: the study must return derived data to the resource.
    Rtn,
    /// TS: no use at or after this time (unix seconds).
    Ts(i64),
    /// GS: use only within this region (a code such as `EU`, `NL`, `US-CA`).
    Gs(String),
    /// NMDS: no general methods development.
    Nmds,
    /// GSO: genetic studies only.
    Gso,
    /// NPOA: no population origins or ancestry research.
    Npoa,
}

impl DuoTerm {
    /// The modifier a parameterless modifier term stands for; `None` for the primary
    /// terms and for DS, TS and GS, which need a parameter.
    pub fn simple_modifier(self) -> Option<Modifier> {
        Some(match self {
            DuoTerm::Npu => Modifier::Npu,
            DuoTerm::Irb => Modifier::Irb,
            DuoTerm::Pub => Modifier::Pub,
            DuoTerm::Col => Modifier::Col,
            DuoTerm::Rtn => Modifier::Rtn,
            DuoTerm::Nmds => Modifier::Nmds,
            DuoTerm::Gso => Modifier::Gso,
            DuoTerm::Npoa => Modifier::Npoa,
            DuoTerm::Gru
            | DuoTerm::Hmb
            | DuoTerm::Ds
            | DuoTerm::Poa
            | DuoTerm::Ts
            | DuoTerm::Gs => {
                return None;
            }
        })
    }
}

impl Modifier {
    /// The DUO term.
    pub fn term(&self) -> DuoTerm {
        match self {
            Modifier::Npu => DuoTerm::Npu,
            Modifier::Irb => DuoTerm::Irb,
            Modifier::Pub => DuoTerm::Pub,
            Modifier::Col => DuoTerm::Col,
            Modifier::Rtn => DuoTerm::Rtn,
            Modifier::Ts(_) => DuoTerm::Ts,
            Modifier::Gs(_) => DuoTerm::Gs,
            Modifier::Nmds => DuoTerm::Nmds,
            Modifier::Gso => DuoTerm::Gso,
            Modifier::Npoa => DuoTerm::Npoa,
        }
    }
}

/// What a patient allows their data to be used for: one primary term and its
/// modifiers.
///
/// In policy JSON a data use is a list of terms. Terms without a parameter are
/// strings (code or id); DS, TS and GS are one-key objects:
/// `["HMB", "NPU", {"TS": 1924992000}, {"GS": "EU"}]`,
/// `[{"DS": ["MONDO:0005148"]}, "IRB"]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataUse {
    pub primary: Primary,
    pub modifiers: BTreeSet<Modifier>,
}

impl DataUse {
    /// A data use with no modifiers.
    pub fn new(primary: Primary) -> DataUse {
        DataUse {
            primary,
            modifiers: BTreeSet::new(),
        }
    }

    /// Adds a modifier.
    pub fn with(mut self, modifier: Modifier) -> DataUse {
        self.modifiers.insert(modifier);
        self
    }

    /// The end of a TS time limit, if any.
    pub fn time_limit(&self) -> Option<i64> {
        self.modifiers.iter().find_map(|m| match m {
            Modifier::Ts(until) => Some(*until),
            _ => None,
        })
    }

    /// Checks what the type system does not: disease codes, regions, one modifier
    /// of each kind.
    pub(crate) fn check(&self, at: &ProvisionPath) -> Result<(), PolicyError> {
        if let Primary::Ds(diseases) = &self.primary {
            if diseases.is_empty() {
                return Err(PolicyError::DiseaseMissing { at: at.clone() });
            }
            for code in diseases {
                if !is_disease_code(code) {
                    return Err(PolicyError::InvalidDiseaseCode {
                        at: at.clone(),
                        code: excerpt(code),
                    });
                }
            }
        }
        let mut seen = BTreeSet::new();
        for modifier in &self.modifiers {
            if !seen.insert(modifier.term()) {
                return Err(PolicyError::DuplicateModifier {
                    at: at.clone(),
                    term: modifier.term().code(),
                });
            }
            if let Modifier::Gs(region) = modifier
                && !is_region(region)
            {
                return Err(PolicyError::InvalidRegion {
                    at: at.clone(),
                    region: excerpt(region),
                });
            }
        }
        Ok(())
    }

    /// The canonical JSON list of terms: the primary first, then modifiers in a fixed
    /// order.
    pub(crate) fn to_terms(&self) -> Vec<Value> {
        let mut terms = Vec::with_capacity(1 + self.modifiers.len());
        terms.push(match &self.primary {
            Primary::Ds(diseases) => {
                let list = diseases.iter().cloned().map(Value::String).collect();
                one_key("DS", Value::Array(list))
            }
            other => Value::String(other.term().code().to_owned()),
        });
        for modifier in &self.modifiers {
            terms.push(match modifier {
                Modifier::Ts(until) => one_key("TS", Value::from(*until)),
                Modifier::Gs(region) => one_key("GS", Value::String(region.clone())),
                other => Value::String(other.term().code().to_owned()),
            });
        }
        terms
    }

    /// Reads the JSON list of terms (see the type's docs).
    pub(crate) fn from_terms(terms: &[Value], at: &ProvisionPath) -> Result<DataUse, PolicyError> {
        let mut primaries = Vec::new();
        let mut modifiers = BTreeSet::new();
        for value in terms {
            let (name, parameter) = match value {
                Value::String(s) => (s.as_str(), None),
                Value::Object(map) if map.len() == 1 => match map.iter().next() {
                    Some((k, v)) => (k.as_str(), Some(v)),
                    None => continue,
                },
                other => {
                    return Err(PolicyError::UnknownDuoTerm {
                        at: at.clone(),
                        term: excerpt(&other.to_string()),
                    });
                }
            };
            let term = DuoTerm::parse(name).map_err(|e| match e {
                DuoTermError::Unknown => PolicyError::UnknownDuoTerm {
                    at: at.clone(),
                    term: excerpt(name),
                },
                DuoTermError::Unsupported { code, hint } => PolicyError::UnsupportedDuoTerm {
                    at: at.clone(),
                    term: code,
                    hint,
                },
            })?;
            let no_parameter = |p: Option<&Value>| match p {
                None => Ok(()),
                Some(_) => Err(PolicyError::BadDuoParameter {
                    at: at.clone(),
                    term: term.code(),
                    problem: "takes no parameter; write it as a plain string",
                }),
            };
            match term {
                DuoTerm::Ds => {
                    let diseases = match parameter {
                        None => return Err(PolicyError::DiseaseMissing { at: at.clone() }),
                        Some(Value::String(code)) => BTreeSet::from([code.trim().to_owned()]),
                        Some(Value::Array(codes)) => {
                            let mut set = BTreeSet::new();
                            for code in codes {
                                match code {
                                    Value::String(code) => set.insert(code.trim().to_owned()),
                                    other => {
                                        return Err(PolicyError::InvalidDiseaseCode {
                                            at: at.clone(),
                                            code: excerpt(&other.to_string()),
                                        });
                                    }
                                };
                            }
                            set
                        }
                        Some(_) => {
                            return Err(PolicyError::BadDuoParameter {
                                at: at.clone(),
                                term: "DS",
                                problem: "takes a list of disease codes",
                            });
                        }
                    };
                    primaries.push(Primary::Ds(diseases));
                }
                DuoTerm::Gru => no_parameter(parameter).map(|()| primaries.push(Primary::Gru))?,
                DuoTerm::Hmb => no_parameter(parameter).map(|()| primaries.push(Primary::Hmb))?,
                DuoTerm::Poa => no_parameter(parameter).map(|()| primaries.push(Primary::Poa))?,
                DuoTerm::Ts => {
                    let until = match parameter {
                        None => return Err(PolicyError::TimeLimitMissing { at: at.clone() }),
                        Some(v) => v.as_i64().ok_or_else(|| PolicyError::BadDuoParameter {
                            at: at.clone(),
                            term: "TS",
                            problem: "takes its end as whole unix seconds",
                        })?,
                    };
                    insert_modifier(&mut modifiers, Modifier::Ts(until), at)?;
                }
                DuoTerm::Gs => {
                    let region = match parameter {
                        None => return Err(PolicyError::RegionMissing { at: at.clone() }),
                        Some(Value::String(region)) => region.trim().to_owned(),
                        Some(_) => {
                            return Err(PolicyError::BadDuoParameter {
                                at: at.clone(),
                                term: "GS",
                                problem: "takes a region code string",
                            });
                        }
                    };
                    insert_modifier(&mut modifiers, Modifier::Gs(region), at)?;
                }
                simple => {
                    no_parameter(parameter)?;
                    let modifier = simple
                        .simple_modifier()
                        .expect("primaries and parameterised terms are matched above");
                    insert_modifier(&mut modifiers, modifier, at)?;
                }
            }
        }
        if primaries.len() != 1 {
            return Err(PolicyError::PrimaryCount {
                at: at.clone(),
                found: primaries.len(),
            });
        }
        let primary = primaries.remove(0);
        let data_use = DataUse { primary, modifiers };
        data_use.check(at)?;
        Ok(data_use)
    }
}

fn insert_modifier(
    modifiers: &mut BTreeSet<Modifier>,
    modifier: Modifier,
    at: &ProvisionPath,
) -> Result<(), PolicyError> {
    if modifiers.iter().any(|m| m.term() == modifier.term()) {
        return Err(PolicyError::DuplicateModifier {
            at: at.clone(),
            term: modifier.term().code(),
        });
    }
    modifiers.insert(modifier);
    Ok(())
}

fn one_key(key: &str, value: Value) -> Value {
    let mut map = serde_json::Map::new();
    map.insert(key.to_owned(), value);
    Value::Object(map)
}

/// `SYSTEM:CODE`, printable, no whitespace, at most 64 characters.
fn is_disease_code(code: &str) -> bool {
    code.len() <= 64
        && code
            .split_once(':')
            .is_some_and(|(system, value)| !system.is_empty() && !value.is_empty())
        && code.chars().all(|c| c.is_ascii_graphic())
}

fn is_region(region: &str) -> bool {
    (2..=16).contains(&region.len())
        && region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl Serialize for Modifier {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Modifier::Ts(until) => one_key("TS", Value::from(*until)).serialize(serializer),
            Modifier::Gs(region) => {
                one_key("GS", Value::String(region.clone())).serialize(serializer)
            }
            other => serializer.serialize_str(other.term().code()),
        }
    }
}

impl Serialize for DataUse {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_terms().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for DataUse {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let terms = Vec::<Value>::deserialize(deserializer)?;
        DataUse::from_terms(&terms, &ProvisionPath::default()).map_err(serde::de::Error::custom)
    }
}

/// The matcher's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    // Ordered from worst to best, so that combining verdicts is `min`.
    /// The data use does not allow this purpose.
    Deny,
    /// The matcher cannot tell; an ethics board must decide.
    Abstain,
    /// The data use allows this purpose.
    Approve,
}

/// A verdict with the reason for it (names DUO terms, never disease codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuoMatch {
    pub verdict: Verdict,
    pub reason: String,
}

impl DuoMatch {
    fn new(verdict: Verdict, reason: impl Into<String>) -> DuoMatch {
        DuoMatch {
            verdict,
            reason: reason.into(),
        }
    }
}

/// Matches a consented data use against a study's research purpose at time `now`.
///
/// Every part must allow the purpose: the primary term (see the module table) and each
/// modifier. Any deny makes the whole a deny; otherwise any abstain makes it an
/// abstain.
pub fn match_data_use(data_use: &DataUse, purpose: &ResearchPurpose, now: i64) -> DuoMatch {
    let mut outcome = match_primary(&data_use.primary, &purpose.focus);
    for modifier in &data_use.modifiers {
        let m = match_modifier(modifier, purpose, now);
        if m.verdict < outcome.verdict {
            outcome = m;
        }
    }
    if outcome.verdict == Verdict::Approve && !data_use.modifiers.is_empty() {
        let terms: Vec<&str> = data_use.modifiers.iter().map(|m| m.term().code()).collect();
        outcome.reason = format!("{}; the study meets {}", outcome.reason, terms.join(", "));
    }
    outcome
}

/// Matches only the primary term: whether a study of this focus is research of the
/// kind the term names. Deny provisions use this to decide whether they apply.
pub fn match_primary(primary: &Primary, focus: &StudyFocus) -> DuoMatch {
    use StudyFocus as F;
    match (primary, focus) {
        (Primary::Gru, _) => DuoMatch::new(Verdict::Approve, "GRU allows any research"),
        (Primary::Hmb, F::Disease(_) | F::Health | F::MethodsDevelopment) => DuoMatch::new(
            Verdict::Approve,
            "HMB allows health, medical and biomedical research",
        ),
        (Primary::Hmb, F::General) => DuoMatch::new(
            Verdict::Deny,
            "HMB allows health, medical or biomedical research only, and the study is not health research",
        ),
        (Primary::Hmb, F::Ancestry) => DuoMatch::new(
            Verdict::Deny,
            "HMB excludes population origins or ancestry research",
        ),
        (Primary::Ds(consented), F::Disease(studied)) => match_diseases(consented, studied),
        (Primary::Ds(_), _) => DuoMatch::new(
            Verdict::Deny,
            "DS allows research on the consented diseases only, and the study is not disease-specific",
        ),
        (Primary::Poa, F::Ancestry) => DuoMatch::new(
            Verdict::Approve,
            "POA allows population origins or ancestry research",
        ),
        (Primary::Poa, _) => DuoMatch::new(
            Verdict::Deny,
            "POA allows population origins or ancestry research only",
        ),
    }
}

fn match_modifier(modifier: &Modifier, purpose: &ResearchPurpose, now: i64) -> DuoMatch {
    let deny = |reason: &str| DuoMatch::new(Verdict::Deny, reason);
    let ok = DuoMatch::new(Verdict::Approve, "");
    match modifier {
        Modifier::Npu if purpose.commercial => deny(
            "NPU allows not-for-profit use only, and the study is commercial or its sponsor is for profit",
        ),
        Modifier::Irb if !purpose.irb_approved => {
            deny("IRB requires ethics approval, and the study has none")
        }
        Modifier::Pub if !purpose.will_publish => {
            deny("PUB requires publication, and the study does not commit to publish")
        }
        Modifier::Col if !purpose.will_collaborate => deny(
            "COL requires collaboration with the primary investigators, and the study does not commit to it",
        ),
        Modifier::Rtn if !purpose.will_return_data => {
            deny("RTN requires derived data to be returned, and the study does not commit to it")
        }
        Modifier::Ts(until) if now >= *until => deny("TS: the consented time for use has ended"),
        Modifier::Gs(region) => match &purpose.region {
            None => {
                deny("GS restricts use to a region, and the study does not say where it uses data")
            }
            Some(r) if r.trim().eq_ignore_ascii_case(region) => ok,
            Some(_) => deny("GS restricts use to a region, and the study uses data elsewhere"),
        },
        Modifier::Nmds if purpose.focus == StudyFocus::MethodsDevelopment => {
            deny("NMDS excludes methods development research")
        }
        Modifier::Gso if !purpose.genetic => {
            deny("GSO allows genetic studies only, and the study is not genetic")
        }
        Modifier::Npoa if purpose.focus == StudyFocus::Ancestry => {
            deny("NPOA excludes population origins or ancestry research")
        }
        _ => ok,
    }
}

/// A disease code split into a normalized system and code.
fn split_code(code: &str) -> (String, String) {
    let (system, value) = code.split_once(':').unwrap_or(("", code));
    let system: String = system
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let system = match system.as_str() {
        "SNOMEDCT" | "SCT" | "SCTID" => "SNOMED".to_owned(),
        "ICD10CM" => "ICD10".to_owned(),
        _ => system,
    };
    (system, value.trim().to_ascii_uppercase())
}

fn match_disease(consented: &str, studied: &str) -> Verdict {
    let (c_system, c_code) = split_code(consented);
    let (s_system, s_code) = split_code(studied);
    if c_system != s_system {
        return Verdict::Abstain;
    }
    if c_code == s_code {
        return Verdict::Approve;
    }
    if c_system == "ICD10" {
        let strip = |s: &str| s.replace('.', "");
        return if strip(&s_code).starts_with(&strip(&c_code)) {
            Verdict::Approve
        } else {
            Verdict::Deny
        };
    }
    Verdict::Abstain
}

fn match_diseases(consented: &BTreeSet<String>, studied: &[String]) -> DuoMatch {
    if studied.is_empty() {
        return DuoMatch::new(
            Verdict::Abstain,
            "DS: the study names no disease, so whether it is within the consented diseases cannot be told",
        );
    }
    let worst = studied
        .iter()
        .map(|s| {
            consented
                .iter()
                .map(|c| match_disease(c, s))
                .max()
                .unwrap_or(Verdict::Deny)
        })
        .min()
        .unwrap_or(Verdict::Abstain);
    match worst {
        Verdict::Approve => DuoMatch::new(
            Verdict::Approve,
            "DS: every disease the study names is within the consented diseases",
        ),
        Verdict::Deny => DuoMatch::new(
            Verdict::Deny,
            "DS: the study names a disease outside the consented diseases",
        ),
        Verdict::Abstain => DuoMatch::new(
            Verdict::Abstain,
            "DS: the study names a disease that differs from the consented ones and only a disease hierarchy could tell whether it is within them",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn purpose(focus: StudyFocus) -> ResearchPurpose {
        ResearchPurpose::new(focus)
    }

    fn ds(codes: &[&str]) -> Primary {
        Primary::Ds(codes.iter().map(|c| c.to_string()).collect())
    }

    fn disease(codes: &[&str]) -> StudyFocus {
        StudyFocus::Disease(codes.iter().map(|c| c.to_string()).collect())
    }

    #[test]
    fn terms_parse_from_code_id_and_iri() {
        for term in DuoTerm::ALL {
            assert_eq!(DuoTerm::parse(term.code()), Ok(term));
            assert_eq!(DuoTerm::parse(&term.code().to_lowercase()), Ok(term));
            assert_eq!(DuoTerm::parse(term.id()), Ok(term));
            let iri = format!(
                "http://purl.obolibrary.org/obo/{}",
                term.id().replace(':', "_")
            );
            assert_eq!(DuoTerm::parse(&iri), Ok(term));
        }
        assert_eq!(DuoTerm::parse("DUO:0000042"), Ok(DuoTerm::Gru));
        assert_eq!(DuoTerm::parse("XYZ"), Err(DuoTermError::Unknown));
        assert!(matches!(
            DuoTerm::parse("DUO:0000026"),
            Err(DuoTermError::Unsupported { code: "US", .. })
        ));
    }

    #[test]
    fn ids_are_distinct() {
        let ids: BTreeSet<_> = DuoTerm::ALL.iter().map(|t| t.id()).collect();
        assert_eq!(ids.len(), DuoTerm::ALL.len());
    }

    #[test]
    fn primary_table() {
        use StudyFocus as F;
        use Verdict::*;
        let foci = [
            disease(&["MONDO:0005148"]),
            F::Health,
            F::General,
            F::Ancestry,
            F::MethodsDevelopment,
        ];
        let table = [
            (Primary::Gru, [Approve, Approve, Approve, Approve, Approve]),
            (Primary::Hmb, [Approve, Approve, Deny, Deny, Approve]),
            (ds(&["MONDO:0005148"]), [Approve, Deny, Deny, Deny, Deny]),
            (Primary::Poa, [Deny, Deny, Deny, Approve, Deny]),
        ];
        for (primary, row) in table {
            for (focus, expected) in foci.iter().zip(row) {
                let got = match_primary(&primary, focus);
                assert_eq!(
                    got.verdict, expected,
                    "{primary:?} vs {focus:?}: {}",
                    got.reason
                );
            }
        }
    }

    #[test]
    fn disease_rule() {
        let m = |c: &[&str], s: &[&str]| match_primary(&ds(c), &disease(s)).verdict;
        assert_eq!(m(&["MONDO:0005148"], &["mondo:0005148"]), Verdict::Approve);
        assert_eq!(m(&["ICD10:E11"], &["ICD-10:E11.9"]), Verdict::Approve);
        assert_eq!(m(&["ICD10:E11"], &["ICD10:C50"]), Verdict::Deny);
        assert_eq!(
            m(&["SNOMED:44054006"], &["SNOMEDCT:73211009"]),
            Verdict::Abstain
        );
        assert_eq!(m(&["MONDO:0005148"], &["ICD10:E11"]), Verdict::Abstain);
        // Every disease the study names must be covered.
        assert_eq!(
            m(&["ICD10:E11"], &["ICD10:E11.9", "ICD10:C50"]),
            Verdict::Deny
        );
        assert_eq!(
            m(&["ICD10:E11", "ICD10:C50"], &["ICD10:E11.9", "ICD10:C50.1"]),
            Verdict::Approve
        );
        assert_eq!(m(&["ICD10:E11"], &[]), Verdict::Abstain);
    }

    #[test]
    fn modifiers() {
        let hmb = |m: Modifier| DataUse::new(Primary::Hmb).with(m);
        let mut p = purpose(StudyFocus::Health);
        let v = |du: &DataUse, p: &ResearchPurpose| match_data_use(du, p, 1_000).verdict;
        assert_eq!(v(&hmb(Modifier::Npu), &p), Verdict::Approve);
        p.commercial = true;
        assert_eq!(v(&hmb(Modifier::Npu), &p), Verdict::Deny);
        assert_eq!(v(&hmb(Modifier::Irb), &p), Verdict::Deny);
        p.irb_approved = true;
        assert_eq!(v(&hmb(Modifier::Irb), &p), Verdict::Approve);
        assert_eq!(v(&hmb(Modifier::Pub), &p), Verdict::Deny);
        assert_eq!(v(&hmb(Modifier::Col), &p), Verdict::Deny);
        assert_eq!(v(&hmb(Modifier::Rtn), &p), Verdict::Deny);
        p.will_publish = true;
        p.will_collaborate = true;
        p.will_return_data = true;
        assert_eq!(v(&hmb(Modifier::Pub), &p), Verdict::Approve);
        assert_eq!(v(&hmb(Modifier::Col), &p), Verdict::Approve);
        assert_eq!(v(&hmb(Modifier::Rtn), &p), Verdict::Approve);
        assert_eq!(v(&hmb(Modifier::Ts(1_001)), &p), Verdict::Approve);
        assert_eq!(v(&hmb(Modifier::Ts(1_000)), &p), Verdict::Deny);
        let gs = hmb(Modifier::Gs("EU".into()));
        assert_eq!(v(&gs, &p), Verdict::Deny);
        p.region = Some("eu".into());
        assert_eq!(v(&gs, &p), Verdict::Approve);
        p.region = Some("US".into());
        assert_eq!(v(&gs, &p), Verdict::Deny);
        assert_eq!(v(&hmb(Modifier::Gso), &p), Verdict::Deny);
        p.genetic = true;
        assert_eq!(v(&hmb(Modifier::Gso), &p), Verdict::Approve);
        let methods = purpose(StudyFocus::MethodsDevelopment);
        assert_eq!(v(&hmb(Modifier::Nmds), &methods), Verdict::Deny);
        let ancestry = purpose(StudyFocus::Ancestry);
        let gru_npoa = DataUse::new(Primary::Gru).with(Modifier::Npoa);
        assert_eq!(v(&gru_npoa, &ancestry), Verdict::Deny);
    }

    #[test]
    fn deny_outranks_abstain() {
        let du = DataUse::new(ds(&["SNOMED:1"])).with(Modifier::Irb);
        let p = purpose(disease(&["SNOMED:2"]));
        let m = match_data_use(&du, &p, 0);
        assert_eq!(m.verdict, Verdict::Deny);
        assert!(m.reason.starts_with("IRB"), "{}", m.reason);
    }

    #[test]
    fn terms_json_round_trip_and_errors() {
        let at = ProvisionPath(vec![0]);
        let parse = |s: &str| {
            let v: Vec<Value> = serde_json::from_str(s).unwrap();
            DataUse::from_terms(&v, &at)
        };
        let du =
            parse(r#"[{"DUO:0000007": ["ICD10:E11"]}, "DUO:0000018", {"TS": 5}, {"GS": "EU"}]"#)
                .unwrap();
        assert_eq!(du.primary, ds(&["ICD10:E11"]));
        assert_eq!(du.time_limit(), Some(5));
        let back = DataUse::from_terms(&du.to_terms(), &at).unwrap();
        assert_eq!(back, du);
        assert_eq!(
            serde_json::to_string(&du).unwrap(),
            r#"[{"DS":["ICD10:E11"]},"NPU",{"TS":5},{"GS":"EU"}]"#
        );

        assert!(matches!(
            parse(r#"["DS"]"#),
            Err(PolicyError::DiseaseMissing { .. })
        ));
        assert!(matches!(
            parse(r#"[{"DS": []}]"#),
            Err(PolicyError::DiseaseMissing { .. })
        ));
        assert!(matches!(
            parse(r#"["HMB", "TS"]"#),
            Err(PolicyError::TimeLimitMissing { .. })
        ));
        assert!(matches!(
            parse(r#"["HMB", "GS"]"#),
            Err(PolicyError::RegionMissing { .. })
        ));
        assert!(matches!(
            parse(r#"["HMB", "XYZ"]"#),
            Err(PolicyError::UnknownDuoTerm { .. })
        ));
        assert!(matches!(
            parse(r#"["HMB", "US"]"#),
            Err(PolicyError::UnsupportedDuoTerm { term: "US", .. })
        ));
        assert!(matches!(
            parse(r#"["NPU"]"#),
            Err(PolicyError::PrimaryCount { found: 0, .. })
        ));
        assert!(matches!(
            parse(r#"["HMB", "GRU"]"#),
            Err(PolicyError::PrimaryCount { found: 2, .. })
        ));
        assert!(matches!(
            parse(r#"["HMB", "NPU", "NPU"]"#),
            Err(PolicyError::DuplicateModifier { .. })
        ));
        assert!(matches!(
            parse(r#"[{"HMB": 1}]"#),
            Err(PolicyError::BadDuoParameter { .. })
        ));
        assert!(matches!(
            parse(r#"[{"DS": ["diabetes"]}]"#),
            Err(PolicyError::InvalidDiseaseCode { .. })
        ));
        assert!(matches!(
            parse(r#"["HMB", {"GS": "Europe and beyond"}]"#),
            Err(PolicyError::InvalidRegion { .. })
        ));
    }

    fn any_focus() -> impl Strategy<Value = StudyFocus> {
        prop_oneof![
            prop::collection::vec("(ICD10|MONDO):[A-E][0-9]{1,3}", 0..3)
                .prop_map(StudyFocus::Disease),
            Just(StudyFocus::Health),
            Just(StudyFocus::General),
            Just(StudyFocus::Ancestry),
            Just(StudyFocus::MethodsDevelopment),
        ]
    }

    fn any_purpose() -> impl Strategy<Value = ResearchPurpose> {
        (
            any_focus(),
            any::<[bool; 6]>(),
            prop::option::of(prop_oneof![Just("EU".to_owned()), Just("US".to_owned())]),
        )
            .prop_map(|(focus, flags, region)| ResearchPurpose {
                focus,
                commercial: flags[0],
                irb_approved: flags[1],
                will_publish: flags[2],
                will_collaborate: flags[3],
                will_return_data: flags[4],
                ends_at: None,
                region,
                genetic: flags[5],
            })
    }

    fn any_modifier() -> impl Strategy<Value = Modifier> {
        prop_oneof![
            Just(Modifier::Npu),
            Just(Modifier::Irb),
            Just(Modifier::Pub),
            Just(Modifier::Col),
            Just(Modifier::Rtn),
            (0i64..2_000).prop_map(Modifier::Ts),
            Just(Modifier::Gs("EU".into())),
            Just(Modifier::Nmds),
            Just(Modifier::Gso),
            Just(Modifier::Npoa),
        ]
    }

    proptest! {
        /// Adding a modifier never makes a data use allow more.
        #[test]
        fn modifiers_only_restrict(
            purpose in any_purpose(),
            modifier in any_modifier(),
            now in 0i64..2_000,
            primary in prop_oneof![Just(Primary::Gru), Just(Primary::Hmb), Just(Primary::Poa)],
        ) {
            let base = DataUse::new(primary);
            let restricted = base.clone().with(modifier);
            let before = match_data_use(&base, &purpose, now).verdict;
            let after = match_data_use(&restricted, &purpose, now).verdict;
            prop_assert!(after <= before);
        }

        /// GRU alone approves any research purpose; NPU never approves commercial use.
        #[test]
        fn gru_approves_and_npu_refuses_commerce(purpose in any_purpose(), now in 0i64..2_000) {
            prop_assert_eq!(
                match_data_use(&DataUse::new(Primary::Gru), &purpose, now).verdict,
                Verdict::Approve
            );
            if purpose.commercial {
                let npu = DataUse::new(Primary::Gru).with(Modifier::Npu);
                prop_assert_eq!(match_data_use(&npu, &purpose, now).verdict, Verdict::Deny);
            }
        }
    }
}
