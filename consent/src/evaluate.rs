//! The engine: one pure function, [`evaluate`], that decides a study's (or an
//! emergency clinician's) access to one patient's data under that patient's policy.
//!
//! # How a research request is decided
//! 1. A policy that is not in force (before its start, at or after its end) is no
//!    consent: deny. So is a request outside its own study period.
//! 2. A provision *applies* when its period contains `now`, one of its actors (if it
//!    names any) is the requester, and its data use matches the study: for a permit,
//!    [`match_data_use`] approves; for a deny, its primary term covers the study (a
//!    deny also applies when the matcher abstains: when in doubt, deny).
//! 3. Among the provisions that apply at one level, the subtree of each decides
//!    (the deepest applying provision in it), and then **deny wins over permit**.
//!    Among permits, the deeper one wins, then the one releasing more of what was
//!    asked, then the first listed.
//! 4. No provision applies: the base decision, deny.
//! 5. A permit releases the requested categories and fields it grants (never
//!    `critical`, a sensitive category only if named); what else was asked is
//!    withheld. A permit that releases nothing asked for is a deny.
//! 6. The access expires at the earliest of: the policy's end, the end of each
//!    provision on the path to the deciding one, a DUO TS limit on that path, and the
//!    study period's end.
//!
//! # Abstain
//! When [`match_data_use`] abstains on a permit, the permit applies only if the
//! request says the ethics board recorded an approval for this study
//! ([`AccessRequest::board_overrides_abstain`]). Otherwise the permit does not apply,
//! and if the result is a deny, [`Decision::board_review`] says which board decision
//! could change it.
//!
//! # Emergencies
//! An emergency request ignores the provisions: it follows the patient's
//! [`BreakGlass`] choice, releases only `critical`, and expires at most
//! [`BREAK_GLASS_MAX_SECONDS`] after `now`.

use std::collections::BTreeSet;
use std::fmt;

use model::Category;
use serde::{Deserialize, Serialize};

use crate::duo::{Modifier, ResearchPurpose, Verdict, match_data_use, match_primary};
use crate::error::ProvisionPath;
use crate::policy::{
    Actor, BreakGlass, Categories, ConsentPolicy, Effect, Period, PolicyHash, PolicyHistory,
    Provision, SearchField, Sector,
};

/// Break-glass access lasts at most this long (24 hours).
pub const BREAK_GLASS_MAX_SECONDS: i64 = 24 * 60 * 60;

/// The organisation asking: a study's sponsor, or an emergency clinician's employer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Requester {
    /// The registered organisation id.
    pub organisation: String,
    pub for_profit: bool,
}

/// Research or break-glass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessKind {
    /// A study with an approved research purpose.
    Research(ResearchPurpose),
    /// An emergency clinician breaking the glass.
    Emergency,
}

/// One request for one patient's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    pub requester: Requester,
    pub kind: AccessKind,
    /// The categories asked for.
    pub categories: BTreeSet<Category>,
    /// The searchable fields asked for.
    pub fields: BTreeSet<SearchField>,
    /// The study's approval period (research) or the break-glass window (emergency).
    pub period: Period,
    /// The ethics board recorded an approval for this study where the DUO matcher
    /// abstains.
    pub board_overrides_abstain: bool,
}

impl AccessRequest {
    /// A research request asking for nothing yet, with no board override.
    pub fn research(requester: Requester, purpose: ResearchPurpose, period: Period) -> Self {
        AccessRequest {
            requester,
            kind: AccessKind::Research(purpose),
            categories: BTreeSet::new(),
            fields: BTreeSet::new(),
            period,
            board_overrides_abstain: false,
        }
    }

    /// A break-glass request for the `critical` category.
    pub fn emergency(requester: Requester, period: Period) -> Self {
        AccessRequest {
            requester,
            kind: AccessKind::Emergency,
            categories: BTreeSet::from([Category::Critical]),
            fields: BTreeSet::new(),
            period,
            board_overrides_abstain: false,
        }
    }
}

/// What decided.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecidedBy {
    /// No provision applied: the base decision (deny).
    Base,
    /// The provision at this path.
    Provision(ProvisionPath),
    /// The patient's break-glass choice.
    BreakGlass,
    /// The policy is not in force now (expired or not yet valid).
    PolicyPeriod,
    /// The request is outside its own study period.
    StudyPeriod,
    /// The patient has no policy issued by now.
    NoPolicy,
    /// The policy named is superseded by a newer version (or a revocation).
    Superseded,
}

impl fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecidedBy::Base => f.write_str("base"),
            DecidedBy::Provision(path) => write!(f, "provision {path}"),
            DecidedBy::BreakGlass => f.write_str("break-glass choice"),
            DecidedBy::PolicyPeriod => f.write_str("policy period"),
            DecidedBy::StudyPeriod => f.write_str("study period"),
            DecidedBy::NoPolicy => f.write_str("no policy"),
            DecidedBy::Superseded => f.write_str("superseded"),
        }
    }
}

/// The engine's answer. Only a permit yields a [`PermittedAccess`]
/// ([`Decision::permit`]), the one input from which grants are built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    effect: Effect,
    decided_by: DecidedBy,
    reason: String,
    emergency: bool,
    categories: BTreeSet<Category>,
    fields: BTreeSet<SearchField>,
    withheld_categories: BTreeSet<Category>,
    withheld_fields: BTreeSet<SearchField>,
    conditions: BTreeSet<Modifier>,
    expiry: Option<i64>,
    policy_version: Option<u32>,
    policy_hash: Option<PolicyHash>,
    board_review: Option<String>,
}

impl Decision {
    fn deny(
        policy: Option<&ConsentPolicy>,
        request: &AccessRequest,
        decided_by: DecidedBy,
        reason: String,
    ) -> Decision {
        Decision {
            effect: Effect::Deny,
            decided_by,
            reason,
            emergency: request.kind == AccessKind::Emergency,
            categories: BTreeSet::new(),
            fields: BTreeSet::new(),
            withheld_categories: request.categories.clone(),
            withheld_fields: request.fields.clone(),
            conditions: BTreeSet::new(),
            expiry: None,
            policy_version: policy.map(ConsentPolicy::version),
            policy_hash: policy.map(ConsentPolicy::policy_hash),
            board_review: None,
        }
    }

    pub fn effect(&self) -> Effect {
        self.effect
    }

    pub fn is_permit(&self) -> bool {
        self.effect == Effect::Permit
    }

    /// Which provision (or other rule) decided.
    pub fn decided_by(&self) -> &DecidedBy {
        &self.decided_by
    }

    /// Why, in words for the patient, the board and the audit log. Names provisions
    /// and DUO terms, never disease codes or organisation ids.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The categories released (empty on a deny).
    pub fn permitted_categories(&self) -> &BTreeSet<Category> {
        &self.categories
    }

    /// The searchable fields released (empty on a deny).
    pub fn permitted_fields(&self) -> &BTreeSet<SearchField> {
        &self.fields
    }

    /// Obligation: requested categories that must be withheld.
    pub fn withheld_categories(&self) -> &BTreeSet<Category> {
        &self.withheld_categories
    }

    /// Obligation: requested fields that must be withheld.
    pub fn withheld_fields(&self) -> &BTreeSet<SearchField> {
        &self.withheld_fields
    }

    /// The DUO modifiers on the deciding path that the study has committed to (PUB,
    /// COL, RTN, ...), to be written into its data access agreement.
    pub fn conditions(&self) -> &BTreeSet<Modifier> {
        &self.conditions
    }

    /// When a permit ends (unix seconds); `None` only if no bound applies at all.
    pub fn expiry(&self) -> Option<i64> {
        self.expiry
    }

    /// The version of the policy that was applied, if any.
    pub fn policy_version(&self) -> Option<u32> {
        self.policy_version
    }

    /// The consent version hash of the policy that was applied, if any.
    pub fn policy_hash(&self) -> Option<PolicyHash> {
        self.policy_hash
    }

    /// Set when the DUO matcher abstained on a provision that mattered: what the
    /// ethics board would have to decide.
    pub fn board_review(&self) -> Option<&str> {
        self.board_review.as_deref()
    }

    /// The checked access a permit grants; `None` for a deny.
    pub fn permit(&self) -> Option<PermittedAccess> {
        if self.effect != Effect::Permit {
            return None;
        }
        Some(PermittedAccess {
            emergency: self.emergency,
            categories: self.categories.clone(),
            fields: self.fields.clone(),
            conditions: self.conditions.clone(),
            expiry: self.expiry,
            policy_version: self.policy_version?,
            policy_hash: self.policy_hash?,
            decided_by: self.decided_by.clone(),
        })
    }
}

/// Access that passed [`evaluate`]: the only thing from which grants (kfrag sets) are
/// planned. It cannot be built any other way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PermittedAccess {
    emergency: bool,
    categories: BTreeSet<Category>,
    fields: BTreeSet<SearchField>,
    conditions: BTreeSet<Modifier>,
    expiry: Option<i64>,
    policy_version: u32,
    policy_hash: PolicyHash,
    decided_by: DecidedBy,
}

impl PermittedAccess {
    /// Break-glass access (then `categories` is exactly `critical`).
    pub fn is_emergency(&self) -> bool {
        self.emergency
    }

    /// The categories to issue grants for. Never empty together with `fields`.
    pub fn categories(&self) -> &BTreeSet<Category> {
        &self.categories
    }

    /// The fields the index may expose for this patient to this study.
    pub fn fields(&self) -> &BTreeSet<SearchField> {
        &self.fields
    }

    /// DUO modifiers the study committed to.
    pub fn conditions(&self) -> &BTreeSet<Modifier> {
        &self.conditions
    }

    /// The grant's expiry.
    pub fn expiry(&self) -> Option<i64> {
        self.expiry
    }

    pub fn policy_version(&self) -> u32 {
        self.policy_version
    }

    /// The consent version hash to log with every access under this grant.
    pub fn policy_hash(&self) -> PolicyHash {
        self.policy_hash
    }

    pub fn decided_by(&self) -> &DecidedBy {
        &self.decided_by
    }
}

/// Decides `request` under `policy` at time `now` (unix seconds). Pure: the same
/// inputs always give the same decision. The policy must be the patient's current
/// one; to pick it from their history, use [`PolicyHistory::evaluate`].
pub fn evaluate(policy: &ConsentPolicy, request: &AccessRequest, now: i64) -> Decision {
    if !policy.is_in_force(now) {
        return Decision::deny(
            Some(policy),
            request,
            DecidedBy::PolicyPeriod,
            "the policy is not in force at this time (expired or not yet valid), so there is no consent".into(),
        );
    }
    if !request.period.contains(now) {
        return Decision::deny(
            Some(policy),
            request,
            DecidedBy::StudyPeriod,
            "the request is outside its own approval period".into(),
        );
    }
    match &request.kind {
        AccessKind::Emergency => emergency(policy, request, now),
        AccessKind::Research(purpose) => research(policy, request, purpose, now),
    }
}

fn emergency(policy: &ConsentPolicy, request: &AccessRequest, now: i64) -> Decision {
    if policy.break_glass() == BreakGlass::Deny {
        return Decision::deny(
            Some(policy),
            request,
            DecidedBy::BreakGlass,
            "the patient does not allow break-glass access, even in an emergency".into(),
        );
    }
    if !request.categories.contains(&Category::Critical) {
        return Decision::deny(
            Some(policy),
            request,
            DecidedBy::BreakGlass,
            "break-glass releases the critical category only, and the request does not ask for it"
                .into(),
        );
    }
    let mut d = Decision::deny(
        Some(policy),
        request,
        DecidedBy::BreakGlass,
        "the patient allows break-glass access to the critical category".into(),
    );
    d.effect = Effect::Permit;
    d.categories = BTreeSet::from([Category::Critical]);
    d.withheld_categories.remove(&Category::Critical);
    d.expiry = earliest([
        policy.period().and_then(|p| p.end),
        request.period.end,
        Some(now.saturating_add(BREAK_GLASS_MAX_SECONDS)),
    ]);
    d
}

fn earliest(bounds: impl IntoIterator<Item = Option<i64>>) -> Option<i64> {
    bounds.into_iter().flatten().min()
}

/// What a permit inherits from the permits around it.
#[derive(Clone, Copy)]
struct Inherited<'a> {
    categories: Option<&'a Categories>,
    fields: Option<&'a BTreeSet<SearchField>>,
}

impl<'a> Inherited<'a> {
    fn within(self, p: &'a Provision) -> Inherited<'a> {
        if p.effect == Effect::Deny {
            return self;
        }
        Inherited {
            categories: p.categories.as_ref().or(self.categories),
            fields: p.fields.as_ref().or(self.fields),
        }
    }

    fn granted(self, request: &AccessRequest) -> (BTreeSet<Category>, BTreeSet<SearchField>) {
        let categories = match self.categories {
            Some(c) => c.resolve(),
            None => Categories::all_standard().resolve(),
        };
        let categories = categories
            .intersection(&request.categories)
            .copied()
            .filter(|c| *c != Category::Critical)
            .collect();
        let fields = self
            .fields
            .map(|f| f.intersection(&request.fields).copied().collect())
            .unwrap_or_default();
        (categories, fields)
    }
}

struct Context<'a> {
    request: &'a AccessRequest,
    purpose: ResearchPurpose,
    now: i64,
}

struct Candidate {
    path: ProvisionPath,
    effect: Effect,
    reason: String,
    categories: BTreeSet<Category>,
    fields: BTreeSet<SearchField>,
}

impl Candidate {
    fn released(&self) -> usize {
        self.categories.len() + self.fields.len()
    }

    /// Deny beats permit; among permits the deeper, then the one releasing more;
    /// otherwise the earlier (`self`).
    fn or(self, later: Candidate) -> Candidate {
        match (self.effect, later.effect) {
            (Effect::Deny, _) => self,
            (Effect::Permit, Effect::Deny) => later,
            (Effect::Permit, Effect::Permit) => {
                let key = |c: &Candidate| (c.path.depth(), c.released());
                if key(&later) > key(&self) {
                    later
                } else {
                    self
                }
            }
        }
    }
}

enum Applies {
    Yes(String),
    No,
    NeedsBoard(String),
}

fn applies(p: &Provision, ctx: &Context<'_>) -> Applies {
    if p.period.is_some_and(|period| !period.contains(ctx.now)) {
        return Applies::No;
    }
    let requester = &ctx.request.requester;
    if !p.actors.is_empty()
        && !p.actors.iter().any(|actor| match actor {
            Actor::Organisation(id) => *id == requester.organisation,
            Actor::Sector(Sector::ForProfit) => requester.for_profit,
            Actor::Sector(Sector::NonProfit) => !requester.for_profit,
        })
    {
        return Applies::No;
    }
    let Some(data_use) = &p.data_use else {
        return Applies::Yes(match (p.effect, p.actors.is_empty()) {
            (Effect::Permit, _) => "within the research its enclosing permit allows".into(),
            (Effect::Deny, true) => "it denies every research purpose".into(),
            (Effect::Deny, false) => "it names the requesting organisation or its sector".into(),
        });
    };
    let m = match p.effect {
        Effect::Permit => match_data_use(data_use, &ctx.purpose, ctx.now),
        // A deny applies to the research its primary term names; when the matcher
        // cannot tell, it applies.
        Effect::Deny => match_primary(&data_use.primary, &ctx.purpose.focus),
    };
    match (p.effect, m.verdict) {
        (_, Verdict::Approve) => Applies::Yes(m.reason),
        (Effect::Deny, Verdict::Abstain) => {
            Applies::Yes(format!("{} (denied when in doubt)", m.reason))
        }
        (_, Verdict::Deny) => Applies::No,
        (Effect::Permit, Verdict::Abstain) if ctx.request.board_overrides_abstain => {
            Applies::Yes(format!("{}; the ethics board approved the study", m.reason))
        }
        (Effect::Permit, Verdict::Abstain) => Applies::NeedsBoard(m.reason),
    }
}

fn decide<'a>(
    provisions: &'a [Provision],
    parent: &ProvisionPath,
    inherited: Inherited<'a>,
    ctx: &Context<'_>,
    board: &mut Option<String>,
) -> Option<Candidate> {
    let mut best: Option<Candidate> = None;
    for (index, p) in provisions.iter().enumerate() {
        let path = parent.child(index);
        let reason = match applies(p, ctx) {
            Applies::No => continue,
            Applies::NeedsBoard(reason) => {
                board.get_or_insert_with(|| {
                    format!("provision {path} would permit if the ethics board approves: {reason}")
                });
                continue;
            }
            Applies::Yes(reason) => reason,
        };
        let here = inherited.within(p);
        let candidate = match decide(&p.provisions, &path, here, ctx, board) {
            Some(deeper) => deeper,
            None => {
                let (categories, fields) = here.granted(ctx.request);
                Candidate {
                    path,
                    effect: p.effect,
                    reason,
                    categories,
                    fields,
                }
            }
        };
        best = Some(match best {
            None => candidate,
            Some(earlier) => earlier.or(candidate),
        });
    }
    best
}

fn research(
    policy: &ConsentPolicy,
    request: &AccessRequest,
    purpose: &ResearchPurpose,
    now: i64,
) -> Decision {
    let mut purpose = purpose.clone();
    // NPU limits use to not-for-profit organisations as well as non-commercial use.
    purpose.commercial |= request.requester.for_profit;
    let ctx = Context {
        request,
        purpose,
        now,
    };
    let mut board = None;
    let inherited = Inherited {
        categories: None,
        fields: None,
    };
    let Some(found) = decide(
        policy.provisions(),
        &ProvisionPath::default(),
        inherited,
        &ctx,
        &mut board,
    ) else {
        let mut d = Decision::deny(
            Some(policy),
            request,
            DecidedBy::Base,
            "no provision applies to this study, and the base decision is deny (opt-in)".into(),
        );
        d.board_review = board;
        return d;
    };
    let decided_by = DecidedBy::Provision(found.path.clone());
    if found.effect == Effect::Deny {
        let mut d = Decision::deny(
            Some(policy),
            request,
            decided_by,
            format!("provision {} denies: {}", found.path, found.reason),
        );
        d.board_review = board;
        return d;
    }
    if found.released() == 0 {
        let mut d = Decision::deny(
            Some(policy),
            request,
            decided_by,
            format!(
                "provision {} permits this study but releases none of the requested categories or fields",
                found.path
            ),
        );
        d.board_review = board;
        return d;
    }
    let mut conditions = BTreeSet::new();
    let mut bounds = vec![policy.period().and_then(|p| p.end), request.period.end];
    let mut level = policy.provisions();
    for index in &found.path.0 {
        let Some(p) = level.get(*index) else { break };
        bounds.push(p.period.and_then(|period| period.end));
        if let Some(data_use) = &p.data_use {
            bounds.push(data_use.time_limit());
            conditions.extend(data_use.modifiers.iter().cloned());
        }
        level = &p.provisions;
    }
    let mut d = Decision::deny(
        Some(policy),
        request,
        decided_by,
        format!("provision {} permits: {}", found.path, found.reason),
    );
    d.effect = Effect::Permit;
    d.withheld_categories = request
        .categories
        .difference(&found.categories)
        .copied()
        .collect();
    d.withheld_fields = request.fields.difference(&found.fields).copied().collect();
    d.categories = found.categories;
    d.fields = found.fields;
    d.conditions = conditions;
    d.expiry = earliest(bounds);
    d
}

/// The patient's current consent on a break-glass access by `organisation` at `now`,
/// for a window ending at `until` (none: open-ended, for a standing grant).
pub fn emergency_decision(
    history: &PolicyHistory,
    organisation: &str,
    now: i64,
    until: Option<i64>,
) -> Decision {
    let requester = Requester {
        organisation: organisation.to_owned(),
        for_profit: false,
    };
    history.evaluate(
        &AccessRequest::emergency(requester, Period::new(Some(now), until)),
        now,
    )
}

/// Whether the patient's current policy lets their agent hold a standing break-glass
/// grant (of `critical`) to `organisation` now: `Ok` with the latest expiry such a grant
/// may have (the policy's end, if it names one), or `Err` with the reason in words. Both
/// the patient's agent (before granting) and the broker (on every grant and consent
/// change) decide with it.
pub fn standing_emergency(
    history: &PolicyHistory,
    organisation: &str,
    now: i64,
) -> Result<Option<i64>, String> {
    let decision = emergency_decision(history, organisation, now, None);
    if !decision.is_permit() {
        return Err(decision.reason().to_owned());
    }
    Ok(history
        .current(now)
        .and_then(|p| p.period())
        .and_then(|p| p.end))
}

impl PolicyHistory {
    /// Decides under the patient's current policy; no policy issued by `now` is no
    /// consent.
    pub fn evaluate(&self, request: &AccessRequest, now: i64) -> Decision {
        match self.current(now) {
            Some(policy) => evaluate(policy, request, now),
            None => Decision::deny(
                None,
                request,
                DecidedBy::NoPolicy,
                "the patient has no consent policy in force".into(),
            ),
        }
    }

    /// Decides under one named version, which must be the current one: a superseded
    /// (or revoked) version gives deny. Use it to re-check a grant made under that
    /// version.
    pub fn evaluate_version(&self, version: u32, request: &AccessRequest, now: i64) -> Decision {
        match self.current(now) {
            Some(current) if current.version() == version => evaluate(current, request, now),
            Some(current) => Decision::deny(
                self.version(version),
                request,
                DecidedBy::Superseded,
                format!(
                    "version {version} is not the patient's current policy (version {} is)",
                    current.version()
                ),
            ),
            None => Decision::deny(
                None,
                request,
                DecidedBy::NoPolicy,
                "the patient has no consent policy in force".into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duo::{DataUse, Primary, StudyFocus};
    use crate::policy::PolicyDraft;

    const NOW: i64 = 1_800_000_000;

    fn hmb_study(org: &str, for_profit: bool) -> AccessRequest {
        let mut r = AccessRequest::research(
            Requester {
                organisation: org.into(),
                for_profit,
            },
            ResearchPurpose::new(StudyFocus::Health),
            Period::new(Some(NOW - 10), Some(NOW + 1_000)),
        );
        r.categories = BTreeSet::from([
            Category::Conditions,
            Category::Observations,
            Category::MentalHealth,
            Category::Critical,
        ]);
        r.fields = BTreeSet::from([SearchField::BirthYear, SearchField::Condition]);
        r
    }

    fn policy(provisions: Vec<Provision>) -> ConsentPolicy {
        let mut draft = PolicyDraft::new(1, 0);
        draft.provisions = provisions;
        draft.check().unwrap()
    }

    #[test]
    fn opt_in_denies_without_provisions() {
        let d = evaluate(&policy(vec![]), &hmb_study("org-a", false), NOW);
        assert_eq!(d.effect(), Effect::Deny);
        assert_eq!(d.decided_by(), &DecidedBy::Base);
        assert!(d.permit().is_none());
        assert_eq!(d.withheld_categories().len(), 4);
    }

    #[test]
    fn permit_releases_standard_categories_and_named_fields() {
        let mut p = Provision::permit(DataUse::new(Primary::Hmb));
        p.fields = Some(BTreeSet::from([SearchField::BirthYear]));
        let d = evaluate(&policy(vec![p]), &hmb_study("org-a", false), NOW);
        assert!(d.is_permit(), "{}", d.reason());
        assert_eq!(
            d.decided_by(),
            &DecidedBy::Provision(ProvisionPath(vec![0]))
        );
        assert_eq!(
            d.permitted_categories(),
            &BTreeSet::from([Category::Conditions, Category::Observations])
        );
        assert_eq!(
            d.permitted_fields(),
            &BTreeSet::from([SearchField::BirthYear])
        );
        assert_eq!(
            d.withheld_categories(),
            &BTreeSet::from([Category::MentalHealth, Category::Critical])
        );
        assert_eq!(
            d.withheld_fields(),
            &BTreeSet::from([SearchField::Condition])
        );
        assert_eq!(d.expiry(), Some(NOW + 1_000));
        let access = d.permit().unwrap();
        assert_eq!(access.policy_version(), 1);
        assert!(!access.is_emergency());
    }

    #[test]
    fn sensitive_category_when_named() {
        let mut p = Provision::permit(DataUse::new(Primary::Hmb));
        p.categories = Some(Categories {
            all_standard: true,
            listed: BTreeSet::from([Category::MentalHealth]),
        });
        let d = evaluate(&policy(vec![p]), &hmb_study("org-a", false), NOW);
        assert!(d.permitted_categories().contains(&Category::MentalHealth));
        assert!(!d.permitted_categories().contains(&Category::Critical));
    }

    #[test]
    fn deny_sibling_wins_and_nested_exception_decides() {
        let permit = Provision::permit(DataUse::new(Primary::Hmb));
        let mut deny = Provision::deny();
        deny.actors = vec![Actor::Organisation("org-a".into())];
        let p = policy(vec![permit.clone(), deny.clone()]);
        let d = evaluate(&p, &hmb_study("org-a", false), NOW);
        assert_eq!(
            d.decided_by(),
            &DecidedBy::Provision(ProvisionPath(vec![1]))
        );
        assert_eq!(d.effect(), Effect::Deny);
        assert!(evaluate(&p, &hmb_study("org-b", false), NOW).is_permit());

        // Nested: the deny is an exception within the permit.
        let mut outer = permit;
        outer.provisions.push(deny);
        let p = policy(vec![outer]);
        let d = evaluate(&p, &hmb_study("org-a", false), NOW);
        assert_eq!(
            d.decided_by(),
            &DecidedBy::Provision(ProvisionPath(vec![0, 0]))
        );
        assert_eq!(d.effect(), Effect::Deny);
        let d = evaluate(&p, &hmb_study("org-b", false), NOW);
        assert_eq!(
            d.decided_by(),
            &DecidedBy::Provision(ProvisionPath(vec![0]))
        );
        assert!(d.is_permit());
    }

    #[test]
    fn a_permit_nested_in_a_deny_is_an_exception() {
        let mut deny = Provision::deny();
        let mut exception = Provision::permit(DataUse::new(Primary::Hmb));
        exception.actors = vec![Actor::Sector(Sector::NonProfit)];
        deny.provisions.push(exception);
        let p = policy(vec![deny]);
        assert!(evaluate(&p, &hmb_study("org-a", false), NOW).is_permit());
        assert!(!evaluate(&p, &hmb_study("org-a", true), NOW).is_permit());
    }

    #[test]
    fn npu_counts_a_for_profit_sponsor_as_commercial() {
        let p = policy(vec![Provision::permit(
            DataUse::new(Primary::Hmb).with(Modifier::Npu),
        )]);
        assert!(evaluate(&p, &hmb_study("org-a", false), NOW).is_permit());
        let d = evaluate(&p, &hmb_study("org-a", true), NOW);
        assert_eq!(d.decided_by(), &DecidedBy::Base);
    }

    #[test]
    fn abstain_needs_the_board() {
        let p = policy(vec![Provision::permit(DataUse::new(Primary::Ds(
            BTreeSet::from(["SNOMED:44054006".to_owned()]),
        )))]);
        let mut r = hmb_study("org-a", false);
        r.kind = AccessKind::Research(ResearchPurpose::new(StudyFocus::Disease(vec![
            "SNOMED:73211009".into(),
        ])));
        let d = evaluate(&p, &r, NOW);
        assert_eq!(d.effect(), Effect::Deny);
        assert!(
            d.board_review()
                .is_some_and(|b| b.contains("provision [0]"))
        );
        r.board_overrides_abstain = true;
        let d = evaluate(&p, &r, NOW);
        assert!(d.is_permit(), "{}", d.reason());
    }

    #[test]
    fn expiry_is_the_earliest_bound() {
        let mut outer = Provision::permit(DataUse::new(Primary::Hmb).with(Modifier::Ts(NOW + 500)));
        outer.period = Some(Period::new(None, Some(NOW + 700)));
        let mut inner = Provision::permit(DataUse::new(Primary::Gru));
        inner.data_use = None;
        inner.period = Some(Period::new(None, Some(NOW + 600)));
        outer.provisions.push(inner);
        let mut draft = PolicyDraft::new(1, 0);
        draft.period = Some(Period::new(None, Some(NOW + 800)));
        draft.provisions.push(outer);
        let p = draft.check().unwrap();
        let d = evaluate(&p, &hmb_study("org-a", false), NOW);
        assert_eq!(
            d.decided_by(),
            &DecidedBy::Provision(ProvisionPath(vec![0, 0]))
        );
        assert_eq!(d.expiry(), Some(NOW + 500));
        assert!(d.conditions().contains(&Modifier::Ts(NOW + 500)));
    }

    #[test]
    fn policy_out_of_force_is_no_consent() {
        let mut draft = PolicyDraft::new(1, 0);
        draft.period = Some(Period::new(Some(NOW + 1), None));
        draft
            .provisions
            .push(Provision::permit(DataUse::new(Primary::Gru)));
        let p = draft.check().unwrap();
        let d = evaluate(&p, &hmb_study("org-a", false), NOW);
        assert_eq!(d.decided_by(), &DecidedBy::PolicyPeriod);
        assert!(evaluate(&p, &hmb_study("org-a", false), NOW + 1).is_permit());
    }

    #[test]
    fn emergency_follows_the_choice_and_releases_critical_only() {
        let mut draft = PolicyDraft::new(1, 0);
        draft
            .provisions
            .push(Provision::permit(DataUse::new(Primary::Gru)));
        let requester = Requester {
            organisation: "er-1".into(),
            for_profit: false,
        };
        let mut r = AccessRequest::emergency(requester, Period::default());
        r.categories.insert(Category::Conditions);
        let d = evaluate(&draft.clone().check().unwrap(), &r, NOW);
        assert_eq!(d.decided_by(), &DecidedBy::BreakGlass);
        assert_eq!(d.effect(), Effect::Deny);

        draft.break_glass = BreakGlass::Allow;
        let d = evaluate(&draft.check().unwrap(), &r, NOW);
        assert!(d.is_permit());
        assert_eq!(
            d.permitted_categories(),
            &BTreeSet::from([Category::Critical])
        );
        assert_eq!(
            d.withheld_categories(),
            &BTreeSet::from([Category::Conditions])
        );
        assert_eq!(d.expiry(), Some(NOW + BREAK_GLASS_MAX_SECONDS));
        assert!(d.permit().unwrap().is_emergency());
    }

    #[test]
    fn superseded_versions_deny() {
        let mut v1 = PolicyDraft::new(1, 100);
        v1.provisions
            .push(Provision::permit(DataUse::new(Primary::Gru)));
        let v2 = PolicyDraft::revocation(2, 200);
        let history = PolicyHistory::new([v1.check().unwrap(), v2.check().unwrap()]).unwrap();
        let r = hmb_study("org-a", false);
        let r = AccessRequest {
            period: Period::default(),
            ..r
        };
        assert!(history.evaluate_version(1, &r, 150).is_permit());
        let d = history.evaluate_version(1, &r, 250);
        assert_eq!(d.decided_by(), &DecidedBy::Superseded);
        assert_eq!(d.policy_version(), Some(1));
        assert!(!history.evaluate(&r, 250).is_permit());
        assert_eq!(history.evaluate(&r, 50).decided_by(), &DecidedBy::NoPolicy);
    }

    #[test]
    fn a_permit_that_releases_nothing_asked_is_a_deny() {
        let mut p = Provision::permit(DataUse::new(Primary::Hmb));
        p.categories = Some(Categories::only([Category::Genomics]));
        let d = evaluate(&policy(vec![p]), &hmb_study("org-a", false), NOW);
        assert_eq!(d.effect(), Effect::Deny);
        assert_eq!(
            d.decided_by(),
            &DecidedBy::Provision(ProvisionPath(vec![0]))
        );
    }
}
