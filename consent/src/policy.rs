//! The consent policy of one patient: a versioned, signed statement of which research
//! may use which of their data, and whether emergency clinicians may break the glass.
//!
//! A policy is written as a [`PolicyDraft`] (or as JSON) and becomes a
//! [`ConsentPolicy`] only through [`PolicyDraft::check`] or [`ConsentPolicy::from_json`],
//! so code that holds a `ConsentPolicy` holds a valid one. Its
//! [`canonical_bytes`](ConsentPolicy::canonical_bytes) are what the patient signs, and
//! its [`policy_hash`](ConsentPolicy::policy_hash) is the consent version hash written
//! to the audit log with every access.
//!
//! ```json
//! {
//!   "version": 3,
//!   "issued_at": 1767225600,
//!   "base": "deny",
//!   "period": {"end": 1924992000},
//!   "break_glass": "allow",
//!   "provisions": [
//!     {"effect": "permit", "actors": [{"sector": "non_profit"}],
//!      "data_use": ["HMB"], "categories": ["all"], "fields": ["birth_year", "sex", "condition"],
//!      "provisions": [{"effect": "deny", "actors": [{"organisation": "org-ex-employer"}]}]}
//!   ]
//! }
//! ```

use std::collections::BTreeSet;
use std::fmt;

use model::Category;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::duo::DataUse;
use crate::error::{Location, PolicyError, ProvisionPath, excerpt};

/// Provisions nest at most this deep (a top-level provision has depth 1).
pub const MAX_DEPTH: usize = 8;
/// A policy has at most this many provisions in all.
pub const MAX_PROVISIONS: usize = 256;
const MAX_ORGANISATION_ID: usize = 128;

/// Permit or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Permit,
    Deny,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Permit => "permit",
            Effect::Deny => "deny",
        })
    }
}

/// The patient's emergency choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakGlass {
    /// No emergency access, even in an emergency. The default: break-glass reaches
    /// only patients who allowed it.
    #[default]
    Deny,
    /// A registered emergency clinician may break the glass and read the `critical`
    /// category (nothing else).
    Allow,
}

/// A time window `[start, end)` in unix seconds; a missing bound is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Period {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<i64>,
}

impl Period {
    /// A window from `start` (inclusive) to `end` (exclusive).
    pub fn new(start: Option<i64>, end: Option<i64>) -> Period {
        Period { start, end }
    }

    /// Whether `t` lies in the window.
    pub fn contains(&self, t: i64) -> bool {
        self.start.is_none_or(|s| s <= t) && self.end.is_none_or(|e| t < e)
    }

    fn check(&self, at: Location) -> Result<(), PolicyError> {
        match (self.start, self.end) {
            (Some(start), Some(end)) if end <= start => {
                Err(PolicyError::PeriodEndsBeforeStart { at, start, end })
            }
            _ => Ok(()),
        }
    }
}

pub use model::{SearchField, UnknownSearchField};

/// Who a provision is about: the organisation that sponsors the study (or, for
/// break-glass, employs the clinician).
///
/// JSON: `{"organisation": "org-17"}`, `{"sector": "non_profit"}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    /// One registered organisation, by id.
    Organisation(String),
    /// Every organisation of a sector.
    Sector(Sector),
}

/// For-profit or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sector {
    NonProfit,
    ForProfit,
}

/// The categories a permit releases.
///
/// JSON: a list of category names, where `"all"` stands for every *non-sensitive*
/// category. Sensitive categories (mental_health, substance_use, sexual_health,
/// genomics) are released only when listed by name: `["all", "genomics"]`. `critical`
/// is never released to research.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Categories {
    /// Every non-sensitive category (demographics, conditions, observations,
    /// medications, procedures, immunizations, allergies, encounters).
    pub all_standard: bool,
    /// Categories named one by one; the only way a sensitive category is released.
    pub listed: BTreeSet<Category>,
}

impl Categories {
    /// Every non-sensitive category.
    pub fn all_standard() -> Categories {
        Categories {
            all_standard: true,
            listed: BTreeSet::new(),
        }
    }

    /// Exactly these categories.
    pub fn only(categories: impl IntoIterator<Item = Category>) -> Categories {
        Categories {
            all_standard: false,
            listed: categories.into_iter().collect(),
        }
    }

    /// The non-sensitive categories `"all"` stands for.
    pub fn standard() -> impl Iterator<Item = Category> {
        Category::ALL
            .into_iter()
            .filter(|c| !c.is_sensitive() && *c != Category::Critical)
    }

    /// The categories this selection releases. Never `critical`; a sensitive category
    /// only if listed by name.
    pub fn resolve(&self) -> BTreeSet<Category> {
        let mut out: BTreeSet<Category> = if self.all_standard {
            Categories::standard().collect()
        } else {
            BTreeSet::new()
        };
        out.extend(self.listed.iter().copied());
        out.remove(&Category::Critical);
        out
    }

    fn parse(names: &[String], at: &ProvisionPath) -> Result<Categories, PolicyError> {
        let mut out = Categories::default();
        for name in names {
            if name == "all" {
                out.all_standard = true;
                continue;
            }
            let category = name
                .parse::<Category>()
                .map_err(|_| PolicyError::UnknownCategory {
                    at: at.clone(),
                    name: excerpt(name),
                })?;
            out.listed.insert(category);
        }
        Ok(out)
    }
}

impl Serialize for Categories {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut names: Vec<&str> = Vec::with_capacity(1 + self.listed.len());
        if self.all_standard {
            names.push("all");
        }
        names.extend(self.listed.iter().map(|c| c.label()));
        names.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Categories {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(deserializer)?;
        Categories::parse(&names, &ProvisionPath::default()).map_err(serde::de::Error::custom)
    }
}

/// One rule of a policy. A provision applies to a request when its period contains the
/// time, one of its actors (if any) is the requester and its data use (if any) matches
/// the study; nested provisions are exceptions and refinements that apply only within
/// their parent.
///
/// What a nested provision does not say it inherits from the provisions around it:
/// a permit without `data_use`, `categories` or `fields` uses those of the nearest
/// permit that contains it (at the top level: `categories` are `["all"]`, `fields`
/// are none, and `data_use` is required).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Provision {
    pub effect: Effect,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    /// Empty: any requester.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actors: Vec<Actor>,
    /// For a permit: the research it allows. For a deny: the research it denies
    /// (primary term only); none denies all research.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_use: Option<DataUse>,
    /// Permits only: the categories it releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub categories: Option<Categories>,
    /// Permits only: the fields it makes searchable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeSet<SearchField>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provisions: Vec<Provision>,
}

impl Provision {
    /// A permit for the given research, releasing every non-sensitive category and
    /// making no field searchable, for any requester at any time.
    pub fn permit(data_use: DataUse) -> Provision {
        Provision {
            effect: Effect::Permit,
            period: None,
            actors: Vec::new(),
            data_use: Some(data_use),
            categories: None,
            fields: None,
            provisions: Vec::new(),
        }
    }

    /// A deny of all research by any requester at any time.
    pub fn deny() -> Provision {
        Provision {
            effect: Effect::Deny,
            period: None,
            actors: Vec::new(),
            data_use: None,
            categories: None,
            fields: None,
            provisions: Vec::new(),
        }
    }
}

/// A policy as written, not yet checked. [`PolicyDraft::check`] turns it into a
/// [`ConsentPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct PolicyDraft {
    /// 1, 2, 3, ...: a higher version supersedes a lower one.
    pub version: u32,
    /// When the patient issued it (unix seconds).
    pub issued_at: i64,
    /// What happens when no provision applies. Always `deny` (opt-in).
    pub base: Effect,
    /// When the whole policy is in force; outside it the patient has not consented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    pub break_glass: BreakGlass,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provisions: Vec<Provision>,
}

impl PolicyDraft {
    /// An opt-in policy that permits nothing and denies break-glass.
    pub fn new(version: u32, issued_at: i64) -> PolicyDraft {
        PolicyDraft {
            version,
            issued_at,
            base: Effect::Deny,
            period: None,
            break_glass: BreakGlass::Deny,
            provisions: Vec::new(),
        }
    }

    /// A revocation: a new version that permits nothing, not even break-glass. Issued
    /// by the patient like any policy, it supersedes every earlier version.
    pub fn revocation(version: u32, issued_at: i64) -> PolicyDraft {
        PolicyDraft::new(version, issued_at)
    }

    /// Checks the draft and fixes its canonical bytes and hash.
    pub fn check(self) -> Result<ConsentPolicy, PolicyError> {
        if self.version == 0 {
            return Err(PolicyError::VersionZero);
        }
        if self.base != Effect::Deny {
            return Err(PolicyError::BasePermit);
        }
        if let Some(period) = &self.period {
            period.check(Location::Policy)?;
        }
        let mut count = 0;
        check_provisions(
            &self.provisions,
            &ProvisionPath::default(),
            false,
            &mut count,
        )?;
        let canonical = serde_json::to_vec(&self).map_err(|e| PolicyError::json(&e))?;
        let hash = PolicyHash(*blake3::hash(&canonical).as_bytes());
        Ok(ConsentPolicy {
            draft: self,
            canonical,
            hash,
        })
    }
}

fn check_provisions(
    provisions: &[Provision],
    parent: &ProvisionPath,
    permit_data_use_above: bool,
    count: &mut usize,
) -> Result<(), PolicyError> {
    for (index, p) in provisions.iter().enumerate() {
        let at = parent.child(index);
        *count += 1;
        if *count > MAX_PROVISIONS {
            return Err(PolicyError::TooManyProvisions {
                max: MAX_PROVISIONS,
            });
        }
        if at.depth() > MAX_DEPTH {
            return Err(PolicyError::TooDeep {
                depth: at.depth(),
                at,
                max: MAX_DEPTH,
            });
        }
        if let Some(period) = &p.period {
            period.check(Location::Provision(at.clone()))?;
        }
        for actor in &p.actors {
            if let Actor::Organisation(id) = actor
                && (id.is_empty()
                    || id.chars().count() > MAX_ORGANISATION_ID
                    || id.chars().any(char::is_control))
            {
                return Err(PolicyError::InvalidOrganisation {
                    at: at.clone(),
                    id: excerpt(id),
                });
            }
        }
        if let Some(data_use) = &p.data_use {
            data_use.check(&at)?;
        }
        match p.effect {
            Effect::Deny => {
                if p.categories.is_some() || p.fields.is_some() {
                    return Err(PolicyError::GrantOnDeny { at });
                }
                if let Some(modifier) = p.data_use.iter().flat_map(|d| &d.modifiers).next() {
                    return Err(PolicyError::ModifierOnDeny {
                        at,
                        term: modifier.term().code(),
                    });
                }
            }
            Effect::Permit => {
                if p.data_use.is_none() && !permit_data_use_above {
                    return Err(PolicyError::PermitWithoutDataUse { at });
                }
                if p.categories
                    .as_ref()
                    .is_some_and(|c| c.listed.contains(&Category::Critical))
                {
                    return Err(PolicyError::CriticalInProvision { at });
                }
            }
        }
        let below = permit_data_use_above || (p.effect == Effect::Permit && p.data_use.is_some());
        check_provisions(&p.provisions, &at, below, count)?;
    }
    Ok(())
}

/// The BLAKE3 hash of a policy's canonical bytes: the consent version hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyHash(pub [u8; 32]);

impl PolicyHash {
    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PolicyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PolicyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyHash({})", self.to_hex())
    }
}

impl Serialize for PolicyHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

/// A checked consent policy: every value is valid, and its canonical bytes and hash
/// are fixed. Obtain one from [`PolicyDraft::check`] or [`ConsentPolicy::from_json`].
#[derive(Clone)]
pub struct ConsentPolicy {
    draft: PolicyDraft,
    canonical: Vec<u8>,
    hash: PolicyHash,
}

impl ConsentPolicy {
    /// Parses and checks a policy from its JSON.
    pub fn from_json(json: &[u8]) -> Result<ConsentPolicy, PolicyError> {
        let raw: RawPolicy = serde_json::from_slice(json).map_err(|e| PolicyError::json(&e))?;
        raw.into_draft()?.check()
    }

    /// The deterministic serialization the patient signs: compact JSON with fields in
    /// a fixed order, sets sorted, and absent options omitted.
    /// `ConsentPolicy::from_json(p.canonical_bytes())` gives `p` back.
    pub fn canonical_bytes(&self) -> &[u8] {
        &self.canonical
    }

    /// BLAKE3 of [`canonical_bytes`](Self::canonical_bytes): the consent version hash
    /// logged with each access.
    pub fn policy_hash(&self) -> PolicyHash {
        self.hash
    }

    pub fn version(&self) -> u32 {
        self.draft.version
    }

    pub fn issued_at(&self) -> i64 {
        self.draft.issued_at
    }

    pub fn base(&self) -> Effect {
        self.draft.base
    }

    pub fn period(&self) -> Option<Period> {
        self.draft.period
    }

    pub fn break_glass(&self) -> BreakGlass {
        self.draft.break_glass
    }

    pub fn provisions(&self) -> &[Provision] {
        &self.draft.provisions
    }

    /// The provision at `path`, if there is one.
    pub fn provision(&self, path: &ProvisionPath) -> Option<&Provision> {
        let (first, rest) = path.0.split_first()?;
        let mut p = self.draft.provisions.get(*first)?;
        for index in rest {
            p = p.provisions.get(*index)?;
        }
        Some(p)
    }

    /// Whether the policy's own period contains `now`.
    pub fn is_in_force(&self, now: i64) -> bool {
        self.draft.period.is_none_or(|p| p.contains(now))
    }

    /// The checked content, to read or to edit into a new version.
    pub fn draft(&self) -> &PolicyDraft {
        &self.draft
    }

    pub fn into_draft(self) -> PolicyDraft {
        self.draft
    }
}

impl PartialEq for ConsentPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.draft == other.draft
    }
}

impl Eq for ConsentPolicy {}

impl fmt::Debug for ConsentPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsentPolicy")
            .field("hash", &self.hash)
            .field("draft", &self.draft)
            .finish()
    }
}

impl Serialize for ConsentPolicy {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.draft.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ConsentPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawPolicy::deserialize(deserializer)?;
        raw.into_draft()
            .and_then(PolicyDraft::check)
            .map_err(serde::de::Error::custom)
    }
}

/// The JSON shape, with the values that need precise errors (DUO terms, categories,
/// fields) still as text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: u32,
    issued_at: i64,
    #[serde(default = "deny")]
    base: Effect,
    #[serde(default)]
    period: Option<Period>,
    #[serde(default)]
    break_glass: BreakGlass,
    #[serde(default)]
    provisions: Vec<RawProvision>,
}

fn deny() -> Effect {
    Effect::Deny
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvision {
    effect: Effect,
    #[serde(default)]
    period: Option<Period>,
    #[serde(default)]
    actors: Vec<Actor>,
    #[serde(default)]
    data_use: Option<Vec<Value>>,
    #[serde(default)]
    categories: Option<Vec<String>>,
    #[serde(default)]
    fields: Option<Vec<String>>,
    #[serde(default)]
    provisions: Vec<RawProvision>,
}

impl RawPolicy {
    fn into_draft(self) -> Result<PolicyDraft, PolicyError> {
        Ok(PolicyDraft {
            version: self.version,
            issued_at: self.issued_at,
            base: self.base,
            period: self.period,
            break_glass: self.break_glass,
            provisions: convert(self.provisions, &ProvisionPath::default())?,
        })
    }
}

fn convert(raw: Vec<RawProvision>, parent: &ProvisionPath) -> Result<Vec<Provision>, PolicyError> {
    let mut out = Vec::with_capacity(raw.len());
    for (index, r) in raw.into_iter().enumerate() {
        let at = parent.child(index);
        if at.depth() > MAX_DEPTH {
            return Err(PolicyError::TooDeep {
                depth: at.depth(),
                at,
                max: MAX_DEPTH,
            });
        }
        let data_use = r
            .data_use
            .as_deref()
            .map(|terms| DataUse::from_terms(terms, &at))
            .transpose()?;
        let categories = r
            .categories
            .as_deref()
            .map(|names| Categories::parse(names, &at))
            .transpose()?;
        let fields = r
            .fields
            .map(|names| {
                names
                    .iter()
                    .map(|n| {
                        n.parse::<SearchField>()
                            .map_err(|_| PolicyError::UnknownSearchField {
                                at: at.clone(),
                                name: excerpt(n),
                            })
                    })
                    .collect::<Result<BTreeSet<_>, _>>()
            })
            .transpose()?;
        out.push(Provision {
            effect: r.effect,
            period: r.period,
            actors: r.actors,
            data_use,
            categories,
            fields,
            provisions: convert(r.provisions, &at)?,
        });
    }
    Ok(out)
}

/// Every version of one patient's policy. The current policy is the highest version
/// issued by now; every lower version is superseded and counts as no consent.
#[derive(Debug, Clone, Default)]
pub struct PolicyHistory {
    versions: Vec<ConsentPolicy>,
}

impl PolicyHistory {
    /// Orders the versions; refuses two policies with one version number, or a newer
    /// version issued before an older one.
    pub fn new(policies: impl IntoIterator<Item = ConsentPolicy>) -> Result<Self, PolicyError> {
        let mut versions: Vec<ConsentPolicy> = policies.into_iter().collect();
        versions.sort_by_key(ConsentPolicy::version);
        for pair in versions.windows(2) {
            let (older, newer) = (&pair[0], &pair[1]);
            if older.version() == newer.version() {
                return Err(PolicyError::DuplicateVersion {
                    version: newer.version(),
                });
            }
            if newer.issued_at() < older.issued_at() {
                return Err(PolicyError::VersionOutOfOrder {
                    version: newer.version(),
                    previous: older.version(),
                });
            }
        }
        Ok(PolicyHistory { versions })
    }

    /// The highest version issued at or before `now`. It is current even if its own
    /// period has ended: a patient's latest word replaces the earlier ones.
    pub fn current(&self, now: i64) -> Option<&ConsentPolicy> {
        self.versions.iter().rev().find(|p| p.issued_at() <= now)
    }

    /// The policy with this version, current or not.
    pub fn version(&self, version: u32) -> Option<&ConsentPolicy> {
        self.versions.iter().find(|p| p.version() == version)
    }

    /// Every version, oldest first.
    pub fn versions(&self) -> &[ConsentPolicy] {
        &self.versions
    }

    /// The earliest instant after `now` at which a decision under this history may change
    /// by the clock alone: a version taking effect, a policy's or a provision's period
    /// starting or ending, a DUO time limit passing. Until then [`PolicyHistory::evaluate`]
    /// answers a request as it does at `now`, so a decision may be kept until this instant.
    pub fn next_change_after(&self, now: i64) -> Option<i64> {
        fn period(p: Option<Period>, out: &mut Vec<i64>) {
            if let Some(p) = p {
                out.extend(p.start);
                out.extend(p.end);
            }
        }
        fn provisions(list: &[Provision], out: &mut Vec<i64>) {
            for p in list {
                period(p.period, out);
                out.extend(p.data_use.as_ref().and_then(DataUse::time_limit));
                provisions(&p.provisions, out);
            }
        }
        let mut instants = Vec::new();
        for policy in &self.versions {
            instants.push(policy.issued_at());
            period(policy.period(), &mut instants);
            provisions(policy.provisions(), &mut instants);
        }
        instants.into_iter().filter(|&t| t > now).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duo::{Modifier, Primary};

    const EXAMPLE: &str = r#"{
      "version": 3,
      "issued_at": 1767225600,
      "base": "deny",
      "period": {"end": 1924992000},
      "break_glass": "allow",
      "provisions": [
        {"effect": "permit", "actors": [{"sector": "non_profit"}],
         "data_use": ["HMB"], "categories": ["all"], "fields": ["birth_year", "sex", "condition"],
         "provisions": [{"effect": "deny", "actors": [{"organisation": "org-ex-employer"}]}]}
      ]
    }"#;

    fn parse(json: &str) -> Result<ConsentPolicy, PolicyError> {
        ConsentPolicy::from_json(json.as_bytes())
    }

    fn with_provision(provision: &str) -> String {
        format!(r#"{{"version": 1, "issued_at": 0, "provisions": [{provision}]}}"#)
    }

    #[test]
    fn a_decision_can_change_by_the_clock_only_at_the_instants_the_history_names() {
        let mut p = parse(EXAMPLE).unwrap().into_draft();
        p.provisions[0].provisions[0].period = Some(Period::new(Some(1_800_000_000), None));
        p.provisions[0].data_use = Some(
            p.provisions[0]
                .data_use
                .clone()
                .unwrap()
                .with(Modifier::Ts(1_900_000_000)),
        );
        let h = PolicyHistory::new([p.check().unwrap()]).unwrap();
        assert_eq!(h.next_change_after(0), Some(1_767_225_600));
        assert_eq!(h.next_change_after(1_767_225_600), Some(1_800_000_000));
        assert_eq!(h.next_change_after(1_800_000_000), Some(1_900_000_000));
        assert_eq!(h.next_change_after(1_900_000_000), Some(1_924_992_000));
        assert_eq!(h.next_change_after(1_924_992_000), None);
        assert_eq!(PolicyHistory::default().next_change_after(0), None);
    }

    #[test]
    fn the_module_example_parses() {
        let p = parse(EXAMPLE).unwrap();
        assert_eq!(p.version(), 3);
        assert_eq!(p.break_glass(), BreakGlass::Allow);
        let top = &p.provisions()[0];
        assert_eq!(top.data_use, Some(DataUse::new(Primary::Hmb)));
        assert_eq!(top.actors, vec![Actor::Sector(Sector::NonProfit)]);
        assert_eq!(
            p.provision(&ProvisionPath(vec![0, 0])).map(|p| p.effect),
            Some(Effect::Deny)
        );
        assert!(p.provision(&ProvisionPath(vec![0, 1])).is_none());
        assert!(p.provision(&ProvisionPath(vec![])).is_none());
    }

    #[test]
    fn canonical_bytes_are_stable_and_round_trip() {
        let p = parse(EXAMPLE).unwrap();
        // Reordered keys and whitespace give the same canonical bytes and hash.
        let value: Value = serde_json::from_str(EXAMPLE).unwrap();
        let again = ConsentPolicy::from_json(&serde_json::to_vec_pretty(&value).unwrap()).unwrap();
        assert_eq!(again.canonical_bytes(), p.canonical_bytes());
        assert_eq!(again.policy_hash(), p.policy_hash());
        let back = ConsentPolicy::from_json(p.canonical_bytes()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.canonical_bytes(), p.canonical_bytes());
        assert_eq!(
            p.policy_hash().0,
            *blake3::hash(p.canonical_bytes()).as_bytes()
        );
        assert_eq!(p.policy_hash().to_hex().len(), 64);
        // A change of meaning changes the hash.
        let mut draft = p.clone().into_draft();
        draft.break_glass = BreakGlass::Deny;
        assert_ne!(draft.check().unwrap().policy_hash(), p.policy_hash());
    }

    #[test]
    fn canonical_form_is_compact_and_ordered() {
        let p = parse(EXAMPLE).unwrap();
        let text = std::str::from_utf8(p.canonical_bytes()).unwrap();
        assert!(text.starts_with(r#"{"version":3,"issued_at":1767225600,"base":"deny","period":{"end":1924992000},"break_glass":"allow","provisions":[{"effect":"permit""#), "{text}");
        assert!(
            text.contains(r#""fields":["birth_year","sex","condition"]"#),
            "{text}"
        );
    }

    #[test]
    fn sensitive_categories_need_their_names() {
        let all = Categories::all_standard().resolve();
        assert!(all.iter().all(|c| !c.is_sensitive()));
        assert!(!all.contains(&Category::Critical));
        assert_eq!(all.len(), 8);
        let with = Categories::parse(&["all".into(), "genomics".into()], &ProvisionPath(vec![]))
            .unwrap()
            .resolve();
        assert!(with.contains(&Category::Genomics));
        assert!(!with.contains(&Category::MentalHealth));
    }

    type Expected = fn(&PolicyError) -> bool;

    #[test]
    fn validation_errors() {
        let cases: Vec<(String, Expected)> = vec![
            (
                with_provision(r#"{"effect": "permit", "data_use": ["XYZ"]}"#),
                |e| matches!(e, PolicyError::UnknownDuoTerm { .. }),
            ),
            (
                with_provision(r#"{"effect": "permit", "data_use": ["DS"]}"#),
                |e| matches!(e, PolicyError::DiseaseMissing { .. }),
            ),
            (
                with_provision(r#"{"effect": "permit", "data_use": ["HMB", "TS"]}"#),
                |e| matches!(e, PolicyError::TimeLimitMissing { .. }),
            ),
            (
                with_provision(
                    r#"{"effect": "permit", "data_use": ["HMB"], "period": {"start": 10, "end": 5}}"#,
                ),
                |e| {
                    matches!(
                        e,
                        PolicyError::PeriodEndsBeforeStart {
                            start: 10,
                            end: 5,
                            ..
                        }
                    )
                },
            ),
            (
                r#"{"version": 1, "issued_at": 0, "period": {"start": 10, "end": 10}}"#.into(),
                |e| {
                    matches!(
                        e,
                        PolicyError::PeriodEndsBeforeStart {
                            at: Location::Policy,
                            ..
                        }
                    )
                },
            ),
            (
                with_provision(
                    r#"{"effect": "permit", "data_use": ["HMB"], "categories": ["mental"]}"#,
                ),
                |e| matches!(e, PolicyError::UnknownCategory { name, .. } if name == "mental"),
            ),
            (
                with_provision(r#"{"effect": "permit", "data_use": ["HMB"], "fields": ["zip"]}"#),
                |e| matches!(e, PolicyError::UnknownSearchField { name, .. } if name == "zip"),
            ),
            (
                with_provision(
                    r#"{"effect": "permit", "data_use": ["HMB"], "categories": ["critical"]}"#,
                ),
                |e| matches!(e, PolicyError::CriticalInProvision { .. }),
            ),
            (with_provision(r#"{"effect": "permit"}"#), |e| {
                matches!(e, PolicyError::PermitWithoutDataUse { .. })
            }),
            (
                with_provision(r#"{"effect": "deny", "categories": ["conditions"]}"#),
                |e| matches!(e, PolicyError::GrantOnDeny { .. }),
            ),
            (
                with_provision(r#"{"effect": "deny", "data_use": ["HMB", "NPU"]}"#),
                |e| matches!(e, PolicyError::ModifierOnDeny { term: "NPU", .. }),
            ),
            (
                with_provision(r#"{"effect": "deny", "actors": [{"organisation": ""}]}"#),
                |e| matches!(e, PolicyError::InvalidOrganisation { .. }),
            ),
            (r#"{"version": 0, "issued_at": 0}"#.into(), |e| {
                matches!(e, PolicyError::VersionZero)
            }),
            (
                r#"{"version": 1, "issued_at": 0, "base": "permit"}"#.into(),
                |e| matches!(e, PolicyError::BasePermit),
            ),
            (
                r#"{"version": 1, "issued_at": 0, "surprise": true}"#.into(),
                |e| matches!(e, PolicyError::Json { .. }),
            ),
        ];
        for (json, expected) in cases {
            let err = parse(&json).unwrap_err();
            assert!(expected(&err), "{json}\n gave {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn errors_name_the_provision() {
        let json = r#"{"version": 1, "issued_at": 0, "provisions": [
            {"effect": "permit", "data_use": ["HMB"]},
            {"effect": "deny", "provisions": [{"effect": "permit", "data_use": ["HMB"], "fields": ["zip"]}]}
        ]}"#;
        let err = parse(json).unwrap_err();
        assert_eq!(
            err,
            PolicyError::UnknownSearchField {
                at: ProvisionPath(vec![1, 0]),
                name: "zip".into()
            }
        );
        assert!(
            err.to_string()
                .starts_with("provision [1, 0]: unknown searchable field \"zip\"")
        );
    }

    #[test]
    fn nesting_is_limited() {
        let mut provision = Provision::permit(DataUse::new(Primary::Gru));
        for _ in 0..MAX_DEPTH {
            let mut outer = Provision::deny();
            outer.provisions.push(provision);
            provision = outer;
        }
        let mut draft = PolicyDraft::new(1, 0);
        draft.provisions.push(provision);
        assert!(matches!(
            draft.clone().check(),
            Err(PolicyError::TooDeep { depth, .. }) if depth == MAX_DEPTH + 1
        ));
        // Through JSON too, before any deeper work.
        let json = serde_json::to_vec(&draft).unwrap();
        assert!(matches!(
            ConsentPolicy::from_json(&json),
            Err(PolicyError::TooDeep { .. })
        ));
        // One level less is fine.
        draft.provisions[0] = draft.provisions[0].provisions[0].clone();
        assert!(draft.check().is_ok());
    }

    #[test]
    fn provision_count_is_limited() {
        let mut draft = PolicyDraft::new(1, 0);
        draft.provisions = vec![Provision::deny(); MAX_PROVISIONS + 1];
        assert_eq!(
            draft.check(),
            Err(PolicyError::TooManyProvisions {
                max: MAX_PROVISIONS
            })
        );
    }

    #[test]
    fn large_input_is_not_echoed() {
        let huge = "x".repeat(100_000);
        let json = with_provision(&format!(
            r#"{{"effect": "permit", "data_use": ["HMB"], "categories": ["{huge}"]}}"#
        ));
        let err = parse(&json).unwrap_err();
        assert!(err.to_string().len() < 700);
        let json = format!(r#"{{"version": "{huge}", "issued_at": 0}}"#);
        let err = parse(&json).unwrap_err();
        assert!(matches!(err, PolicyError::Json { .. }));
        assert!(err.to_string().len() < 700);
    }

    #[test]
    fn nested_permits_inherit_data_use() {
        let mut outer = Provision::permit(DataUse::new(Primary::Hmb).with(Modifier::Npu));
        let mut inner = Provision::permit(DataUse::new(Primary::Gru));
        inner.data_use = None;
        outer.provisions.push(inner);
        let mut draft = PolicyDraft::new(1, 0);
        draft.provisions.push(outer);
        assert!(draft.check().is_ok());
    }

    #[test]
    fn history_picks_the_current_version() {
        let v = |version, issued_at| PolicyDraft::new(version, issued_at).check().unwrap();
        let history = PolicyHistory::new([v(2, 200), v(1, 100), v(3, 300)]).unwrap();
        assert_eq!(history.current(50), None);
        assert_eq!(history.current(100).map(ConsentPolicy::version), Some(1));
        assert_eq!(history.current(299).map(ConsentPolicy::version), Some(2));
        assert_eq!(history.current(10_000).map(ConsentPolicy::version), Some(3));
        assert_eq!(
            PolicyHistory::new([v(1, 100), v(1, 100)]).unwrap_err(),
            PolicyError::DuplicateVersion { version: 1 }
        );
        assert_eq!(
            PolicyHistory::new([v(1, 100), v(2, 50)]).unwrap_err(),
            PolicyError::VersionOutOfOrder {
                version: 2,
                previous: 1
            }
        );
    }

    #[test]
    fn serde_goes_through_the_checks() {
        let p = parse(EXAMPLE).unwrap();
        let text = serde_json::to_string(&p).unwrap();
        let back: ConsentPolicy = serde_json::from_str(&text).unwrap();
        assert_eq!(back, p);
        let bad = with_provision(r#"{"effect": "permit"}"#);
        assert!(serde_json::from_str::<ConsentPolicy>(&bad).is_err());
    }
}
