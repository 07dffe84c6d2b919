//! Cohort definitions: the question a sponsor asks, as data.
//!
//! In the spirit of OHDSI Circe/ATLAS, a [`CohortDefinition`] is an optional index (a
//! fixed date, or each patient's first qualifying event) and a list of top-level
//! [`Criterion`]s that must all hold. The engine counts patients after each top-level
//! criterion in order (the attrition table). A criterion is a group (`all`, `any`,
//! `at_least`), an exclusion (`not`), demographics, or an event criterion on one of the
//! four event tables (`condition`, `measurement`, `drug`, `procedure`) with a code set,
//! optional descendants through the concept hierarchy, an occurrence count, a time window
//! and, for measurements, a value range and unit, or an observation-period requirement
//! (continuous observation around the index date, as OHDSI's observation window).
//!
//! ```
//! use model::CohortDefinition;
//!
//! let definition = CohortDefinition::from_json(br#"{
//!   "title": "Women 40-65 with type 2 diabetes and a high HbA1c, never on insulin",
//!   "index": {"date": "2024-01-01"},
//!   "criteria": [
//!     {"demographics": {"sex": ["female"], "age": {"min": 40, "max": 65}}},
//!     {"condition": {"codes": ["snomed:44054006"], "include_descendants": true}},
//!     {"measurement": {"codes": ["loinc:4548-4"], "value": {"min": 7.0}, "unit": "%",
//!                      "window": {"days_from_index": {"from": -365, "to": 0}}}},
//!     {"not": {"drug": {"codes": ["rxnorm:253182"]}}}
//!   ]
//! }"#).unwrap();
//! assert_eq!(definition.criteria.len(), 4);
//! // The normalized form ignores the title, the order of criteria and of codes.
//! let hash = definition.normalized().hash;
//! assert_eq!(hash.to_string().len(), 64);
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::date::Date;
use crate::field::SearchField;

/// Deepest nesting of groups and exclusions accepted.
pub const MAX_DEPTH: usize = 8;
/// Most criteria (every node of the tree) in one definition.
pub const MAX_CRITERIA: usize = 128;
/// Most codes listed in one criterion (before descendant expansion).
pub const MAX_CODES: usize = 1_000;
/// Most days of observation required before or after the index date (a century).
pub const MAX_OBSERVATION_DAYS: u32 = 36_525;

/// A code system the index is searchable by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CodeSystem {
    Snomed,
    Loinc,
    Rxnorm,
    Icd10,
}

impl CodeSystem {
    /// Every system, in order.
    pub const ALL: [CodeSystem; 4] = [
        CodeSystem::Snomed,
        CodeSystem::Loinc,
        CodeSystem::Rxnorm,
        CodeSystem::Icd10,
    ];

    /// The short name used in codes and in the index (`snomed`, `loinc`, `rxnorm`, `icd10`).
    pub fn as_str(self) -> &'static str {
        match self {
            CodeSystem::Snomed => "snomed",
            CodeSystem::Loinc => "loinc",
            CodeSystem::Rxnorm => "rxnorm",
            CodeSystem::Icd10 => "icd10",
        }
    }

    /// The system of a short name.
    pub fn from_name(name: &str) -> Option<CodeSystem> {
        CodeSystem::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for CodeSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A code in a code system, written `system:code` (e.g. `snomed:44054006`, `loinc:4548-4`).
///
/// The code part is 1 to 64 characters among ASCII letters, digits, `.`, `-` and `_`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Code {
    pub system: CodeSystem,
    pub code: String,
}

/// A string that is not a `system:code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a code: write system:code, with system snomed, loinc, rxnorm or icd10 and a \
     code of letters, digits, '.', '-' or '_' (e.g. \"snomed:44054006\")"
)]
pub struct CodeError(pub String);

impl Code {
    /// A code, checked.
    pub fn new(system: CodeSystem, code: &str) -> Result<Code, CodeError> {
        let ok = !code.is_empty()
            && code.len() <= 64
            && code
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if ok {
            Ok(Code {
                system,
                code: code.to_string(),
            })
        } else {
            Err(CodeError(format!("{system}:{code}")))
        }
    }
}

impl FromStr for Code {
    type Err = CodeError;

    fn from_str(s: &str) -> Result<Code, CodeError> {
        let (system, code) = s.split_once(':').ok_or_else(|| CodeError(s.into()))?;
        let system = CodeSystem::from_name(system).ok_or_else(|| CodeError(s.into()))?;
        Code::new(system, code).map_err(|_| CodeError(s.into()))
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.system, self.code)
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Code, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Administrative sex as the index holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sex {
    Male,
    Female,
    Other,
    Unknown,
}

impl Sex {
    /// The index value (`male`, `female`, `other`, `unknown`).
    pub fn as_str(self) -> &'static str {
        match self {
            Sex::Male => "male",
            Sex::Female => "female",
            Sex::Other => "other",
            Sex::Unknown => "unknown",
        }
    }
}

/// One of the four event tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Domain {
    Condition,
    Measurement,
    Drug,
    Procedure,
}

impl Domain {
    /// Every domain, in order.
    pub const ALL: [Domain; 4] = [
        Domain::Condition,
        Domain::Measurement,
        Domain::Drug,
        Domain::Procedure,
    ];

    /// The table (and consent field) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Domain::Condition => "condition",
            Domain::Measurement => "measurement",
            Domain::Drug => "drug",
            Domain::Procedure => "procedure",
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive range of whole numbers; either end may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i32>,
}

/// An inclusive range of measurement values; either end may be open.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// How many matching events a patient must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Occurrence {
    AtLeast(u32),
    AtMost(u32),
    Exactly(u32),
}

impl Default for Occurrence {
    fn default() -> Self {
        Occurrence::AtLeast(1)
    }
}

/// When an event must have happened (inclusive bounds; either may be open).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Window {
    /// Between two calendar dates.
    Between {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<Date>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<Date>,
    },
    /// Between two day offsets from the patient's index date (negative: before it).
    DaysFromIndex {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<i32>,
    },
    /// Between two day offsets from *any* event of the same patient that matches `event`
    /// (the anchor; negative: before it): the event counts if some anchor has
    /// `from <= event date - anchor date <= to`. The anchor is a plain event criterion:
    /// codes, descendants, value, unit and at most a `between` window.
    DaysFromEvent {
        event: Box<Criterion>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<i32>,
    },
}

impl Window {
    /// The anchor event criterion of a window relative to each of its events.
    pub fn anchor(&self) -> Option<(Domain, &EventCriterion)> {
        match self {
            Window::DaysFromEvent { event, .. } => event.as_event(),
            _ => None,
        }
    }
}

/// Events of one table: a code set, and optionally descendants, an occurrence count, a
/// time window and (measurements only) a value range and unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventCriterion {
    pub codes: Vec<Code>,
    /// Also match every descendant of the listed codes in the engine's concept hierarchy.
    #[serde(default, skip_serializing_if = "is_false")]
    pub include_descendants: bool,
    #[serde(default)]
    pub occurrence: Occurrence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// Measurements only: the value must lie in this range (rows without a value fail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<ValueRange>,
    /// Measurements only: the unit must be exactly this (UCUM) string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl EventCriterion {
    /// Events with any of `codes`, at least once, any time.
    pub fn codes(codes: impl IntoIterator<Item = Code>) -> EventCriterion {
        EventCriterion {
            codes: codes.into_iter().collect(),
            include_descendants: false,
            occurrence: Occurrence::default(),
            window: None,
            value: None,
            unit: None,
        }
    }
}

/// Demographic constraints; every one given must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Demographics {
    /// Any of these (empty: any sex).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sex: Vec<Sex>,
    /// Age in whole years at the index date: index year minus birth year (the index holds
    /// years only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age: Option<IntRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birth_year: Option<IntRange>,
}

/// Continuous observation around the index date (OHDSI's observation window): some
/// observation period of the patient starts at least `prior_days` before the index date
/// and ends at least `post_days` after it. Patients without observation periods in the
/// index (or who did not consent the field) never meet it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservationWindow {
    #[serde(default)]
    pub prior_days: u32,
    #[serde(default)]
    pub post_days: u32,
}

/// `n` or more of `of` must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtLeast {
    pub n: u32,
    pub of: Vec<Criterion>,
}

/// One criterion of a definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// Every criterion holds.
    All(Vec<Criterion>),
    /// At least one criterion holds.
    Any(Vec<Criterion>),
    /// At least `n` of the criteria hold.
    AtLeast(AtLeast),
    /// Exclusion: the criterion does not hold.
    Not(Box<Criterion>),
    Demographics(Demographics),
    Condition(EventCriterion),
    Measurement(EventCriterion),
    Drug(EventCriterion),
    Procedure(EventCriterion),
    /// Observed continuously around the index date.
    ObservationPeriod(ObservationWindow),
}

impl Criterion {
    /// The event domain and criterion of an event criterion.
    pub fn as_event(&self) -> Option<(Domain, &EventCriterion)> {
        match self {
            Criterion::Condition(e) => Some((Domain::Condition, e)),
            Criterion::Measurement(e) => Some((Domain::Measurement, e)),
            Criterion::Drug(e) => Some((Domain::Drug, e)),
            Criterion::Procedure(e) => Some((Domain::Procedure, e)),
            _ => None,
        }
    }

    /// A short description for attrition tables (no patient data).
    pub fn describe(&self) -> String {
        match self {
            Criterion::All(v) => format!("all of {} criteria", v.len()),
            Criterion::Any(v) => format!("any of {} criteria", v.len()),
            Criterion::AtLeast(a) => format!("at least {} of {} criteria", a.n, a.of.len()),
            Criterion::Not(c) => format!("not ({})", c.describe()),
            Criterion::Demographics(d) => {
                let mut parts = Vec::new();
                if !d.sex.is_empty() {
                    let s: Vec<&str> = d.sex.iter().map(|s| s.as_str()).collect();
                    parts.push(format!("sex {}", s.join("/")));
                }
                if let Some(r) = d.age {
                    parts.push(format!("age {}", range_text(r)));
                }
                if let Some(r) = d.birth_year {
                    parts.push(format!("born {}", range_text(r)));
                }
                parts.join(", ")
            }
            Criterion::ObservationPeriod(w) => format!(
                "observed from {} days before to {} days after index",
                w.prior_days, w.post_days
            ),
            other => {
                let (domain, e) = other.as_event().expect("event criterion");
                let mut codes: Vec<String> = e.codes.iter().take(3).map(Code::to_string).collect();
                if e.codes.len() > 3 {
                    codes.push(format!("+{} more", e.codes.len() - 3));
                }
                let mut text = format!("{domain} {}", codes.join(", "));
                if e.include_descendants {
                    text.push_str(" (and descendants)");
                }
                match e.occurrence {
                    Occurrence::AtLeast(1) => {}
                    Occurrence::AtLeast(n) => text.push_str(&format!(", at least {n} times")),
                    Occurrence::AtMost(n) => text.push_str(&format!(", at most {n} times")),
                    Occurrence::Exactly(n) => text.push_str(&format!(", exactly {n} times")),
                }
                if let Some(v) = e.value {
                    let unit = e.unit.as_deref().unwrap_or("");
                    text.push_str(&format!(", value {} {unit}", float_range_text(v)));
                }
                let days = |from: Option<i32>, to: Option<i32>| {
                    format!(
                        "days {} to {}",
                        from.map_or("-inf".into(), |d| d.to_string()),
                        to.map_or("+inf".into(), |d| d.to_string())
                    )
                };
                match &e.window {
                    Some(Window::Between { from, to }) => text.push_str(&format!(
                        ", {} to {}",
                        from.map_or("any time".into(), |d| d.to_string()),
                        to.map_or("any time".into(), |d| d.to_string())
                    )),
                    Some(Window::DaysFromIndex { from, to }) => {
                        text.push_str(&format!(", {} from index", days(*from, *to)))
                    }
                    Some(Window::DaysFromEvent { event, from, to }) => text.push_str(&format!(
                        ", {} from any ({})",
                        days(*from, *to),
                        event.describe()
                    )),
                    None => {}
                }
                text.trim_end().to_string()
            }
        }
    }
}

fn range_text(r: IntRange) -> String {
    match (r.min, r.max) {
        (Some(a), Some(b)) => format!("{a}-{b}"),
        (Some(a), None) => format!(">= {a}"),
        (None, Some(b)) => format!("<= {b}"),
        (None, None) => "any".into(),
    }
}

fn float_range_text(r: ValueRange) -> String {
    match (r.min, r.max) {
        (Some(a), Some(b)) => format!("{a}-{b}"),
        (Some(a), None) => format!(">= {a}"),
        (None, Some(b)) => format!("<= {b}"),
        (None, None) => "any".into(),
    }
}

/// The date each patient's relative windows and age are measured from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Index {
    /// The same calendar date for every patient.
    Date(Date),
    /// Each patient's earliest event matching this event criterion; patients without one
    /// are not in the cohort.
    FirstEvent(Box<Criterion>),
}

/// A cohort definition: an optional index and the criteria that must all hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortDefinition {
    /// Free text for people; not part of the normalized form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Index>,
    /// Top-level criteria, all of which must hold; attrition is reported after each.
    pub criteria: Vec<Criterion>,
}

/// Why a cohort definition was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    /// The JSON does not parse into a definition (serde's message names line and column).
    #[error("the cohort definition is not valid: {0}")]
    Json(String),
    /// The definition parses, but a criterion makes no sense; `at` is its path.
    #[error("{at}: {problem}")]
    Invalid { at: String, problem: Problem },
}

/// What is wrong with one part of a definition.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error("an empty `{0}` group; list at least one criterion")]
    EmptyGroup(&'static str),
    #[error("`at_least` needs n from 1 to {len} (the number of criteria listed), not {n}")]
    AtLeastOutOfRange { n: u32, len: usize },
    #[error("no codes; list at least one code such as \"snomed:44054006\"")]
    NoCodes,
    #[error("{0} codes listed; at most {MAX_CODES} are accepted (use include_descendants)")]
    TooManyCodes(usize),
    #[error("`at_least: 0` always holds; remove the criterion, or use `at_most`")]
    AtLeastZero,
    #[error("a window needs `from`, `to` or both")]
    EmptyWindow,
    #[error("the window ends before it starts; swap `from` and `to`")]
    ReversedWindow,
    #[error("`days_from_index` needs an `index` (a date or a first event) in the definition")]
    NoIndex,
    #[error("`{0}` is only for measurements")]
    MeasurementOnly(&'static str),
    #[error("a range needs `min`, `max` or both")]
    EmptyRange,
    #[error("the range's `min` is above its `max`")]
    ReversedRange,
    #[error("range bounds must be finite numbers")]
    NotFinite,
    #[error("`unit` must be 1 to 32 printable characters without quotes")]
    BadUnit,
    #[error("empty demographics; give `sex`, `age` or `birth_year`")]
    EmptyDemographics,
    #[error("`age` needs an `index` (a date or a first event) in the definition")]
    AgeWithoutIndex,
    #[error("the index first event must be a condition, measurement, drug or procedure")]
    IndexNotEvent,
    #[error("the index first event must not have an occurrence count or a relative window")]
    IndexEventShape,
    #[error(
        "the `days_from_event` anchor must be a condition, measurement, drug or procedure \
         criterion; to combine anchors, write one criterion per anchor inside `any`"
    )]
    AnchorNotEvent,
    #[error(
        "the `days_from_event` anchor must not have an occurrence count: any one matching \
         event anchors the window; count the outer events with their own `occurrence`"
    )]
    AnchorOccurrence,
    #[error(
        "the `days_from_event` anchor may only have a `between` window (calendar dates), \
         not a window relative to the index or to another event"
    )]
    AnchorRelativeWindow,
    #[error(
        "`observation_period` needs an `index` (a date or a first event) in the definition: \
         observation is required around the index date"
    )]
    ObservationWithoutIndex,
    #[error("at most {MAX_OBSERVATION_DAYS} days of observation can be required, not {0}")]
    ObservationDays(u32),
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("more than {MAX_CRITERIA} criteria in one definition")]
    TooManyCriteria,
}

impl CohortDefinition {
    /// Parses and validates a definition from JSON.
    pub fn from_json(json: &[u8]) -> Result<CohortDefinition, DefinitionError> {
        let definition: CohortDefinition =
            serde_json::from_slice(json).map_err(|e| DefinitionError::Json(e.to_string()))?;
        definition.validate()?;
        Ok(definition)
    }

    /// The definition as JSON (as written, not normalized).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("definitions serialize")
    }

    /// Checks every criterion; the engine refuses definitions that do not pass.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        let mut v = Validator {
            has_index: self.index.is_some(),
            nodes: 0,
        };
        if let Some(Index::FirstEvent(event)) = &self.index {
            let at = "index.first_event";
            let (_, e) = event
                .as_event()
                .ok_or_else(|| invalid(at, Problem::IndexNotEvent))?;
            if e.occurrence != Occurrence::default()
                || matches!(
                    e.window,
                    Some(Window::DaysFromIndex { .. } | Window::DaysFromEvent { .. })
                )
            {
                return Err(invalid(at, Problem::IndexEventShape));
            }
            v.criterion(event, at, 1)?;
        }
        for (i, c) in self.criteria.iter().enumerate() {
            v.criterion(c, &format!("criteria[{i}]"), 1)?;
        }
        Ok(())
    }

    /// The definition made of the index and the first `steps` top-level criteria: what the
    /// attrition table counts after `steps` criteria.
    pub fn prefix(&self, steps: usize) -> CohortDefinition {
        CohortDefinition {
            title: None,
            index: self.index.clone(),
            criteria: self.criteria[..steps.min(self.criteria.len())].to_vec(),
        }
    }

    /// Every patient with consent: no index, no criteria.
    pub fn everyone() -> CohortDefinition {
        CohortDefinition {
            title: None,
            index: None,
            criteria: Vec::new(),
        }
    }

    /// The searchable fields the definition reads: a study must request each of them, or
    /// no patient's consent can make the criterion true.
    pub fn fields(&self) -> BTreeSet<SearchField> {
        fn walk(c: &Criterion, out: &mut BTreeSet<SearchField>) {
            match c {
                Criterion::All(v) | Criterion::Any(v) => v.iter().for_each(|c| walk(c, out)),
                Criterion::AtLeast(a) => a.of.iter().for_each(|c| walk(c, out)),
                Criterion::Not(c) => walk(c, out),
                Criterion::Demographics(d) => {
                    if !d.sex.is_empty() {
                        out.insert(SearchField::Sex);
                    }
                    if d.age.is_some() || d.birth_year.is_some() {
                        out.insert(SearchField::BirthYear);
                    }
                }
                Criterion::ObservationPeriod(_) => {
                    out.insert(SearchField::ObservationPeriod);
                }
                event => {
                    let (domain, e) = event.as_event().expect("every other criterion is an event");
                    out.insert(SearchField::of_domain(domain));
                    // A window relative to other events reads the anchor's field too.
                    if let Some(Window::DaysFromEvent { event, .. }) = &e.window {
                        walk(event, out);
                    }
                }
            }
        }
        let mut out = BTreeSet::new();
        if let Some(Index::FirstEvent(c)) = &self.index {
            walk(c, &mut out);
        }
        self.criteria.iter().for_each(|c| walk(c, &mut out));
        out
    }

    /// The normalized form: canonical JSON of an equivalent definition (title dropped,
    /// defaults explicit, codes sorted and deduplicated, `all`/`any` flattened, sorted and
    /// deduplicated, top-level criteria sorted, `at_least 1` as `any`, `at_least n of n` as
    /// `all`, double negation removed) and its BLAKE3 hash. Equivalent definitions written
    /// differently get the same hash, which seeds the noise of protected counts.
    pub fn normalized(&self) -> NormalizedDefinition {
        let criteria = normalize_list(&self.criteria, Group::All);
        let mut root = serde_json::Map::new();
        root.insert("version".into(), Value::from(1));
        if let Some(index) = &self.index {
            let index = match index {
                Index::Date(d) => Index::Date(*d),
                Index::FirstEvent(c) => Index::FirstEvent(Box::new(normalize(c))),
            };
            root.insert(
                "index".into(),
                serde_json::to_value(index).expect("serialize"),
            );
        }
        root.insert(
            "criteria".into(),
            serde_json::to_value(&criteria).expect("serialize"),
        );
        let json = canonical_json(&Value::Object(root));
        let mut hasher =
            blake3::Hasher::new_derive_key("cohort-query 2026 normalized cohort definition v1");
        hasher.update(json.as_bytes());
        NormalizedDefinition {
            json,
            hash: DefinitionHash(*hasher.finalize().as_bytes()),
        }
    }
}

/// A definition's normalized form and its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedDefinition {
    /// Canonical JSON: sorted keys, no insignificant white space.
    pub json: String,
    pub hash: DefinitionHash,
}

/// BLAKE3 hash of a normalized definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DefinitionHash(pub [u8; 32]);

impl fmt::Display for DefinitionHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn invalid(at: &str, problem: Problem) -> DefinitionError {
    DefinitionError::Invalid {
        at: at.to_string(),
        problem,
    }
}

struct Validator {
    has_index: bool,
    nodes: usize,
}

impl Validator {
    fn criterion(&mut self, c: &Criterion, at: &str, depth: usize) -> Result<(), DefinitionError> {
        self.nodes += 1;
        if self.nodes > MAX_CRITERIA {
            return Err(invalid(at, Problem::TooManyCriteria));
        }
        if depth > MAX_DEPTH {
            return Err(invalid(at, Problem::TooDeep));
        }
        match c {
            Criterion::All(v) | Criterion::Any(v) => {
                let name = if matches!(c, Criterion::All(_)) {
                    "all"
                } else {
                    "any"
                };
                if v.is_empty() {
                    return Err(invalid(at, Problem::EmptyGroup(name)));
                }
                for (i, c) in v.iter().enumerate() {
                    self.criterion(c, &format!("{at}.{name}[{i}]"), depth + 1)?;
                }
            }
            Criterion::AtLeast(a) => {
                if a.of.is_empty() {
                    return Err(invalid(at, Problem::EmptyGroup("at_least")));
                }
                if a.n == 0 || a.n as usize > a.of.len() {
                    return Err(invalid(
                        at,
                        Problem::AtLeastOutOfRange {
                            n: a.n,
                            len: a.of.len(),
                        },
                    ));
                }
                for (i, c) in a.of.iter().enumerate() {
                    self.criterion(c, &format!("{at}.at_least.of[{i}]"), depth + 1)?;
                }
            }
            Criterion::Not(c) => self.criterion(c, &format!("{at}.not"), depth + 1)?,
            Criterion::Demographics(d) => {
                let at = format!("{at}.demographics");
                if d.sex.is_empty() && d.age.is_none() && d.birth_year.is_none() {
                    return Err(invalid(&at, Problem::EmptyDemographics));
                }
                if let Some(r) = d.age {
                    if !self.has_index {
                        return Err(invalid(&format!("{at}.age"), Problem::AgeWithoutIndex));
                    }
                    int_range(r, &format!("{at}.age"))?;
                }
                if let Some(r) = d.birth_year {
                    int_range(r, &format!("{at}.birth_year"))?;
                }
            }
            Criterion::ObservationPeriod(w) => {
                let at = format!("{at}.observation_period");
                if !self.has_index {
                    return Err(invalid(&at, Problem::ObservationWithoutIndex));
                }
                for (name, days) in [("prior_days", w.prior_days), ("post_days", w.post_days)] {
                    if days > MAX_OBSERVATION_DAYS {
                        return Err(invalid(
                            &format!("{at}.{name}"),
                            Problem::ObservationDays(days),
                        ));
                    }
                }
            }
            other => {
                let (domain, e) = other.as_event().expect("event criterion");
                let at = format!("{at}.{domain}");
                self.event(domain, e, &at, depth)?;
            }
        }
        Ok(())
    }

    fn event(
        &mut self,
        domain: Domain,
        e: &EventCriterion,
        at: &str,
        depth: usize,
    ) -> Result<(), DefinitionError> {
        if e.codes.is_empty() {
            return Err(invalid(&format!("{at}.codes"), Problem::NoCodes));
        }
        if e.codes.len() > MAX_CODES {
            return Err(invalid(
                &format!("{at}.codes"),
                Problem::TooManyCodes(e.codes.len()),
            ));
        }
        if e.occurrence == Occurrence::AtLeast(0) {
            return Err(invalid(&format!("{at}.occurrence"), Problem::AtLeastZero));
        }
        let wat = format!("{at}.window");
        match &e.window {
            Some(Window::Between { from, to }) => match (from, to) {
                (None, None) => return Err(invalid(&wat, Problem::EmptyWindow)),
                (Some(a), Some(b)) if a > b => {
                    return Err(invalid(&wat, Problem::ReversedWindow));
                }
                _ => {}
            },
            Some(Window::DaysFromIndex { from, to }) => {
                if !self.has_index {
                    return Err(invalid(&wat, Problem::NoIndex));
                }
                match (from, to) {
                    (None, None) => return Err(invalid(&wat, Problem::EmptyWindow)),
                    (Some(a), Some(b)) if a > b => {
                        return Err(invalid(&wat, Problem::ReversedWindow));
                    }
                    _ => {}
                }
            }
            Some(Window::DaysFromEvent { event, from, to }) => {
                let wat = format!("{wat}.days_from_event");
                match (from, to) {
                    (None, None) => return Err(invalid(&wat, Problem::EmptyWindow)),
                    (Some(a), Some(b)) if a > b => {
                        return Err(invalid(&wat, Problem::ReversedWindow));
                    }
                    _ => {}
                }
                let eat = format!("{wat}.event");
                let (anchor_domain, anchor) = event
                    .as_event()
                    .ok_or_else(|| invalid(&eat, Problem::AnchorNotEvent))?;
                let aat = format!("{eat}.{anchor_domain}");
                if anchor.occurrence != Occurrence::default() {
                    return Err(invalid(
                        &format!("{aat}.occurrence"),
                        Problem::AnchorOccurrence,
                    ));
                }
                if matches!(
                    anchor.window,
                    Some(Window::DaysFromIndex { .. } | Window::DaysFromEvent { .. })
                ) {
                    return Err(invalid(
                        &format!("{aat}.window"),
                        Problem::AnchorRelativeWindow,
                    ));
                }
                // The anchor is one more criterion (a subplan of its own), one level down.
                self.criterion(event, &eat, depth + 1)?;
            }
            None => {}
        }
        if domain != Domain::Measurement {
            if e.value.is_some() {
                return Err(invalid(
                    &format!("{at}.value"),
                    Problem::MeasurementOnly("value"),
                ));
            }
            if e.unit.is_some() {
                return Err(invalid(
                    &format!("{at}.unit"),
                    Problem::MeasurementOnly("unit"),
                ));
            }
        }
        if let Some(v) = e.value {
            let vat = format!("{at}.value");
            if v.min.is_some_and(|x| !x.is_finite()) || v.max.is_some_and(|x| !x.is_finite()) {
                return Err(invalid(&vat, Problem::NotFinite));
            }
            match (v.min, v.max) {
                (None, None) => return Err(invalid(&vat, Problem::EmptyRange)),
                (Some(a), Some(b)) if a > b => return Err(invalid(&vat, Problem::ReversedRange)),
                _ => {}
            }
        }
        if let Some(u) = &e.unit {
            let ok = !u.is_empty()
                && u.chars().count() <= 32
                && u.chars()
                    .all(|c| !c.is_control() && c != '\'' && c != '"' && c != '\\');
            if !ok {
                return Err(invalid(&format!("{at}.unit"), Problem::BadUnit));
            }
        }
        Ok(())
    }
}

fn int_range(r: IntRange, at: &str) -> Result<(), DefinitionError> {
    match (r.min, r.max) {
        (None, None) => Err(invalid(at, Problem::EmptyRange)),
        (Some(a), Some(b)) if a > b => Err(invalid(at, Problem::ReversedRange)),
        _ => Ok(()),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Group {
    All,
    Any,
}

/// Normalizes the members of an `all` or `any` group: flattened, sorted, deduplicated.
fn normalize_list(list: &[Criterion], group: Group) -> Vec<Criterion> {
    let mut flat = Vec::new();
    for c in list {
        match (normalize(c), group) {
            (Criterion::All(inner), Group::All) | (Criterion::Any(inner), Group::Any) => {
                flat.extend(inner)
            }
            (other, _) => flat.push(other),
        }
    }
    let mut keyed: Vec<(String, Criterion)> = flat
        .into_iter()
        .map(|c| {
            (
                canonical_json(&serde_json::to_value(&c).expect("serialize")),
                c,
            )
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed.dedup_by(|a, b| a.0 == b.0);
    keyed.into_iter().map(|(_, c)| c).collect()
}

fn normalize(c: &Criterion) -> Criterion {
    match c {
        Criterion::All(v) => collapse(normalize_list(v, Group::All), Criterion::All),
        Criterion::Any(v) => collapse(normalize_list(v, Group::Any), Criterion::Any),
        Criterion::AtLeast(a) if a.n <= 1 => normalize(&Criterion::Any(a.of.clone())),
        Criterion::AtLeast(a) if a.n as usize >= a.of.len() => {
            normalize(&Criterion::All(a.of.clone()))
        }
        Criterion::AtLeast(a) => {
            let mut keyed: Vec<(String, Criterion)> =
                a.of.iter()
                    .map(normalize)
                    .map(|c| {
                        (
                            canonical_json(&serde_json::to_value(&c).expect("serialize")),
                            c,
                        )
                    })
                    .collect();
            keyed.sort_by(|a, b| a.0.cmp(&b.0));
            Criterion::AtLeast(AtLeast {
                n: a.n,
                of: keyed.into_iter().map(|(_, c)| c).collect(),
            })
        }
        Criterion::Not(inner) => match normalize(inner) {
            Criterion::Not(x) => *x,
            other => Criterion::Not(Box::new(other)),
        },
        Criterion::Demographics(d) => {
            let sex: BTreeSet<Sex> = d.sex.iter().copied().collect();
            Criterion::Demographics(Demographics {
                sex: sex.into_iter().collect(),
                age: d.age,
                birth_year: d.birth_year,
            })
        }
        Criterion::ObservationPeriod(w) => Criterion::ObservationPeriod(*w),
        other => {
            let (domain, e) = other.as_event().expect("event criterion");
            let codes: BTreeSet<Code> = e.codes.iter().cloned().collect();
            let zero = |x: f64| if x == 0.0 { 0.0 } else { x };
            let e = EventCriterion {
                codes: codes.into_iter().collect(),
                include_descendants: e.include_descendants,
                occurrence: match e.occurrence {
                    Occurrence::Exactly(0) => Occurrence::AtMost(0),
                    o => o,
                },
                window: e.window.as_ref().map(|w| match w {
                    Window::DaysFromEvent { event, from, to } => Window::DaysFromEvent {
                        event: Box::new(normalize(event)),
                        from: *from,
                        to: *to,
                    },
                    other => other.clone(),
                }),
                value: e.value.map(|v| ValueRange {
                    min: v.min.map(zero),
                    max: v.max.map(zero),
                }),
                unit: e.unit.clone(),
            };
            match domain {
                Domain::Condition => Criterion::Condition(e),
                Domain::Measurement => Criterion::Measurement(e),
                Domain::Drug => Criterion::Drug(e),
                Domain::Procedure => Criterion::Procedure(e),
            }
        }
    }
}

fn collapse(mut v: Vec<Criterion>, group: fn(Vec<Criterion>) -> Criterion) -> Criterion {
    if v.len() == 1 {
        v.pop().expect("one")
    } else {
        group(v)
    }
}

/// JSON with object keys sorted and no insignificant white space.
pub(crate) fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).expect("string"));
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&serde_json::to_string(scalar).expect("scalar")),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_definition_reads_the_fields_of_its_criteria_and_its_index() {
        let d = CohortDefinition::from_json(
            br#"{"index": {"first_event": {"drug": {"codes": ["rxnorm:1"]}}},
                 "criteria": [{"not": {"any": [{"demographics": {"age": {"min": 40}}},
                                               {"measurement": {"codes": ["loinc:1-8"]}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(
            d.fields(),
            BTreeSet::from([
                SearchField::BirthYear,
                SearchField::Measurement,
                SearchField::Drug
            ])
        );
        assert!(CohortDefinition::everyone().fields().is_empty());
        let observed = CohortDefinition::from_json(
            br#"{"index": {"date": "2020-01-01"},
                 "criteria": [{"not": {"observation_period": {"prior_days": 365}}}]}"#,
        )
        .unwrap();
        assert_eq!(
            observed.fields(),
            BTreeSet::from([SearchField::ObservationPeriod])
        );
        assert_eq!(
            observed.criteria[0].describe(),
            "not (observed from 365 days before to 0 days after index)"
        );
        // Defaults are explicit in the normalized form.
        assert!(
            observed
                .normalized()
                .json
                .contains(r#"{"observation_period":{"post_days":0,"prior_days":365}}"#),
            "{}",
            observed.normalized().json
        );
        assert!(CohortDefinition::everyone().validate().is_ok());
    }

    fn def(json: &str) -> Result<CohortDefinition, DefinitionError> {
        CohortDefinition::from_json(json.as_bytes())
    }

    #[test]
    fn codes_parse_and_print() {
        let c: Code = "loinc:4548-4".parse().unwrap();
        assert_eq!(c.system, CodeSystem::Loinc);
        assert_eq!(c.to_string(), "loinc:4548-4");
        for bad in [
            "4548-4",
            "cpt:99213",
            "snomed:",
            "snomed:12 3",
            "icd10:E11'9",
        ] {
            assert!(bad.parse::<Code>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_code_names_the_code() {
        let e = def(r#"{"criteria":[{"condition":{"codes":["snowmed:1"]}}]}"#).unwrap_err();
        assert!(e.to_string().contains("`snowmed:1` is not a code"), "{e}");
    }

    #[test]
    fn invalid_definitions_say_where_and_why() {
        let cases = [
            (
                r#"{"criteria":[{"all":[]}]}"#,
                "criteria[0]: an empty `all` group",
            ),
            (
                r#"{"criteria":[{"at_least":{"n":3,"of":[{"drug":{"codes":["rxnorm:1"]}}]}}]}"#,
                "criteria[0]: `at_least` needs n from 1 to 1",
            ),
            (
                r#"{"criteria":[{"condition":{"codes":[]}}]}"#,
                "criteria[0].condition.codes: no codes",
            ),
            (
                r#"{"criteria":[{"drug":{"codes":["rxnorm:1"],"unit":"mg"}}]}"#,
                "criteria[0].drug.unit: `unit` is only for measurements",
            ),
            (
                r#"{"criteria":[{"condition":{"codes":["snomed:1"],"window":{"days_from_index":{"from":-30}}}}]}"#,
                "criteria[0].condition.window: `days_from_index` needs an `index`",
            ),
            (
                r#"{"criteria":[{"demographics":{"age":{"min":40}}}]}"#,
                "criteria[0].demographics.age: `age` needs an `index`",
            ),
            (
                r#"{"criteria":[{"measurement":{"codes":["loinc:1"],"value":{"min":9,"max":3}}}]}"#,
                "criteria[0].measurement.value: the range's `min` is above its `max`",
            ),
            (
                r#"{"criteria":[{"not":{"condition":{"codes":["snomed:1"],"window":{"between":{"from":"2020-02-01","to":"2020-01-01"}}}}}]}"#,
                "criteria[0].not.condition.window: the window ends before it starts",
            ),
            (
                r#"{"criteria":[{"condition":{"codes":["snomed:1"],"occurrence":{"at_least":0}}}]}"#,
                "criteria[0].condition.occurrence: `at_least: 0` always holds",
            ),
            (
                r#"{"index":{"first_event":{"demographics":{"sex":["male"]}}},"criteria":[]}"#,
                "index.first_event: the index first event must be",
            ),
            (
                r#"{"criteria":[{"demographics":{}}]}"#,
                "empty demographics",
            ),
            (r#"{"criteria":[], "extra": 1}"#, "unknown field `extra`"),
            (
                r#"{"criteria":[{"condition":{"codes":["snomed:1"],"window":{"between":{"from":"2020-02-30"}}}}]}"#,
                "`2020-02-30` is not a date",
            ),
            (
                r#"{"criteria":[{"observation_period":{"prior_days":365}}]}"#,
                "criteria[0].observation_period: `observation_period` needs an `index`",
            ),
            (
                r#"{"index":{"date":"2020-01-01"},"criteria":[{"any":[{"observation_period":{"post_days":99999}}]}]}"#,
                "criteria[0].any[0].observation_period.post_days: at most 36525 days",
            ),
            (
                r#"{"index":{"date":"2020-01-01"},"criteria":[{"observation_period":{"prior_days":-1}}]}"#,
                "invalid value: integer `-1`",
            ),
            (
                r#"{"index":{"date":"2020-01-01"},"criteria":[{"observation_period":{"prior":30}}]}"#,
                "unknown field `prior`",
            ),
        ];
        for (json, want) in cases {
            let err = def(json).unwrap_err().to_string();
            assert!(err.contains(want), "{json}\n got: {err}\nwant: {want}");
        }
    }

    #[test]
    fn too_deep_is_refused() {
        let mut c = Criterion::Condition(EventCriterion::codes(["snomed:1".parse().unwrap()]));
        for _ in 0..MAX_DEPTH {
            c = Criterion::Not(Box::new(c));
        }
        let d = CohortDefinition {
            title: None,
            index: None,
            criteria: vec![c],
        };
        assert!(matches!(
            d.validate(),
            Err(DefinitionError::Invalid {
                problem: Problem::TooDeep,
                ..
            })
        ));
    }

    #[test]
    fn normalized_form_ignores_order_title_and_spelling() {
        let a = def(r#"{"title":"a","criteria":[
            {"condition":{"codes":["snomed:2","snomed:1","snomed:1"]}},
            {"any":[{"drug":{"codes":["rxnorm:9"]}},{"procedure":{"codes":["snomed:7"]}}]},
            {"not":{"not":{"demographics":{"sex":["male","female"]}}}}]}"#)
        .unwrap();
        let b = def(r#"{"title":"b","criteria":[
            {"demographics":{"sex":["female","male"]}},
            {"at_least":{"n":1,"of":[{"procedure":{"codes":["snomed:7"],"occurrence":{"at_least":1}}},{"drug":{"codes":["rxnorm:9"]}}]}},
            {"all":[{"condition":{"codes":["snomed:1","snomed:2"]}}]}]}"#)
        .unwrap();
        assert_eq!(a.normalized(), b.normalized());
        let c = def(r#"{"criteria":[{"condition":{"codes":["snomed:1","snomed:2"]}}]}"#).unwrap();
        assert_ne!(a.normalized().hash, c.normalized().hash);
        // Keys sorted, no white space.
        let json = c.normalized().json;
        assert!(json.starts_with(r#"{"criteria":[{"condition":{"codes":["snomed:1","snomed:2"],"occurrence":{"at_least":1}}}],"version":1}"#), "{json}");
    }

    #[test]
    fn golden_hash_is_stable() {
        // A silent change in normalization or hashing changes every protected count's
        // noise; this vector makes it loud.
        let d = def(r#"{"criteria":[{"condition":{"codes":["snomed:44054006"]}}]}"#).unwrap();
        assert_eq!(
            d.normalized().hash.to_string(),
            blake3::Hasher::new_derive_key("cohort-query 2026 normalized cohort definition v1")
                .update(br#"{"criteria":[{"condition":{"codes":["snomed:44054006"],"occurrence":{"at_least":1}}}],"version":1}"#)
                .finalize()
                .to_hex()
                .to_string()
        );
    }

    #[test]
    fn json_round_trip() {
        let d = def(r#"{"index":{"first_event":{"condition":{"codes":["snomed:1"]}}},"criteria":[
            {"measurement":{"codes":["loinc:1"],"value":{"min":1.5},"unit":"mg/dL","occurrence":{"exactly":2},
              "window":{"days_from_index":{"from":-30,"to":30}}}},
            {"demographics":{"age":{"min":18},"birth_year":{"max":2000}}}]}"#)
        .unwrap();
        let back = CohortDefinition::from_json(d.to_json().as_bytes()).unwrap();
        assert_eq!(d, back);
        assert_eq!(
            d.criteria[0].describe(),
            "measurement loinc:1, exactly 2 times, value >= 1.5 mg/dL, days -30 to 30 from index"
        );
    }
}
