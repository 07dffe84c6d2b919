//! Property tests over random policies and requests.

use std::collections::BTreeSet;

use consent_policy::{
    AccessKind, AccessRequest, Actor, BreakGlass, Categories, ConsentPolicy, DataUse, DecidedBy,
    Effect, Modifier, Period, PolicyDraft, PolicyHistory, Primary, Provision, ProvisionPath,
    Requester, ResearchPurpose, SearchField, Sector, StudyFocus, evaluate,
};
use model::Category;
use proptest::prelude::*;

const NOW: i64 = 1_800_000_000;
const ORGS: [&str; 3] = ["org-a", "org-b", "org-c"];

fn bound() -> impl Strategy<Value = Option<i64>> {
    prop::option::of(NOW - 1_000..NOW + 1_000)
}

/// Any window near now: it may or may not contain now.
fn period() -> impl Strategy<Value = Period> {
    (bound(), bound()).prop_map(|(a, b)| match (a, b) {
        (Some(a), Some(b)) if b <= a => Period::new(Some(b), Some(a + 1)),
        (a, b) => Period::new(a, b),
    })
}

/// Mostly windows that contain now, so that decisions reach the provisions.
fn usual_period() -> impl Strategy<Value = Period> {
    prop_oneof![
        4 => (
            prop::option::of(NOW - 1_000..=NOW),
            prop::option::of(NOW + 1..NOW + 2_000)
        )
            .prop_map(|(start, end)| Period::new(start, end)),
        1 => period(),
    ]
}

fn actor() -> impl Strategy<Value = Actor> {
    prop_oneof![
        prop::sample::select(&ORGS[..]).prop_map(|o| Actor::Organisation(o.to_owned())),
        Just(Actor::Sector(Sector::NonProfit)),
        Just(Actor::Sector(Sector::ForProfit)),
    ]
}

fn primary() -> impl Strategy<Value = Primary> {
    prop_oneof![
        2 => Just(Primary::Gru),
        2 => Just(Primary::Hmb),
        1 => Just(Primary::Poa),
        1 =>
        prop::sample::subsequence(vec!["ICD10:E11", "ICD10:C50", "SNOMED:1"], 1..3)
            .prop_map(|codes| Primary::Ds(codes.into_iter().map(str::to_owned).collect())),
    ]
}

fn modifiers() -> impl Strategy<Value = BTreeSet<Modifier>> {
    (
        prop::sample::subsequence(vec![Modifier::Npu, Modifier::Irb, Modifier::Pub], 0..3),
        prop::option::weighted(0.3, (NOW - 500..NOW + 2_000).prop_map(Modifier::Ts)),
    )
        .prop_map(|(mut list, ts)| {
            list.extend(ts);
            list.into_iter().collect()
        })
}

fn categories() -> impl Strategy<Value = Categories> {
    (
        any::<bool>(),
        prop::sample::subsequence(
            Category::ALL
                .into_iter()
                .filter(|c| *c != Category::Critical)
                .collect::<Vec<_>>(),
            0..4,
        ),
    )
        .prop_map(|(all_standard, listed)| Categories {
            all_standard,
            listed: listed.into_iter().collect(),
        })
}

fn fields() -> impl Strategy<Value = BTreeSet<SearchField>> {
    prop::sample::subsequence(SearchField::ALL.to_vec(), 0..4).prop_map(|f| f.into_iter().collect())
}

/// One provision without nested provisions. Permits may leave their data use,
/// categories and fields to inheritance; invalid combinations are filtered out by
/// `PolicyDraft::check` later.
fn leaf() -> impl Strategy<Value = Provision> {
    (
        prop::bool::weighted(0.7),
        prop::option::weighted(0.3, usual_period()),
        prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(actor(), 1..3)],
        prop::option::weighted(0.8, (primary(), modifiers())),
        prop::option::of(categories()),
        prop::option::of(fields()),
    )
        .prop_map(|(permit, period, actors, data_use, categories, fields)| {
            if permit {
                Provision {
                    effect: Effect::Permit,
                    period,
                    actors,
                    data_use: data_use.map(|(primary, modifiers)| DataUse { primary, modifiers }),
                    categories,
                    fields,
                    provisions: Vec::new(),
                }
            } else {
                Provision {
                    effect: Effect::Deny,
                    period,
                    actors,
                    data_use: data_use.map(|(primary, _)| DataUse::new(primary)),
                    categories: None,
                    fields: None,
                    provisions: Vec::new(),
                }
            }
        })
}

fn provision() -> impl Strategy<Value = Provision> {
    leaf().prop_recursive(3, 24, 3, |inner| {
        (leaf(), prop::collection::vec(inner, 0..3)).prop_map(|(mut p, children)| {
            p.provisions = children;
            p
        })
    })
}

fn draft() -> impl Strategy<Value = PolicyDraft> {
    (
        1u32..5,
        prop::option::of(usual_period()),
        any::<bool>(),
        prop::collection::vec(provision(), 0..5),
    )
        .prop_map(|(version, period, allow, provisions)| PolicyDraft {
            version,
            issued_at: NOW - 5_000,
            base: Effect::Deny,
            period,
            break_glass: if allow {
                BreakGlass::Allow
            } else {
                BreakGlass::Deny
            },
            provisions,
        })
}

fn policy() -> impl Strategy<Value = ConsentPolicy> {
    draft().prop_filter_map("valid policies only", |d| d.check().ok())
}

fn focus() -> impl Strategy<Value = StudyFocus> {
    prop_oneof![
        prop::sample::subsequence(vec!["ICD10:E11.9", "ICD10:C50", "SNOMED:2"], 0..2)
            .prop_map(|c| StudyFocus::Disease(c.into_iter().map(str::to_owned).collect())),
        Just(StudyFocus::Health),
        Just(StudyFocus::General),
        Just(StudyFocus::Ancestry),
        Just(StudyFocus::MethodsDevelopment),
    ]
}

fn request() -> impl Strategy<Value = AccessRequest> {
    (
        prop::sample::select(&ORGS[..]),
        any::<[bool; 2]>(),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.8),
        focus(),
        prop::sample::subsequence(Category::ALL.to_vec(), 0..10),
        fields(),
        usual_period(),
    )
        .prop_map(
            |(org, flags, emergency, irb, publish, focus, categories, fields, period)| {
                let mut purpose = ResearchPurpose::new(focus);
                purpose.irb_approved = irb;
                purpose.will_publish = publish;
                AccessRequest {
                    requester: Requester {
                        organisation: org.to_owned(),
                        for_profit: flags[0],
                    },
                    kind: if emergency {
                        AccessKind::Emergency
                    } else {
                        AccessKind::Research(purpose)
                    },
                    categories: categories.into_iter().collect(),
                    fields,
                    period,
                    board_overrides_abstain: flags[1],
                }
            },
        )
}

/// The provisions on the path to (and including) `path`, outermost first.
fn on_path<'a>(policy: &'a ConsentPolicy, path: &ProvisionPath) -> Vec<&'a Provision> {
    (1..=path.depth())
        .filter_map(|n| policy.provision(&ProvisionPath(path.0[..n].to_vec())))
        .collect()
}

/// What the deciding permit grants after inheritance: the nearest categories and
/// fields on its path.
fn effective_grant(path: &[&Provision]) -> (Categories, BTreeSet<SearchField>) {
    let permits = || path.iter().rev().filter(|p| p.effect == Effect::Permit);
    let categories = permits()
        .find_map(|p| p.categories.clone())
        .unwrap_or_else(Categories::all_standard);
    let fields = permits().find_map(|p| p.fields.clone()).unwrap_or_default();
    (categories, fields)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// A research permit releases only what the deciding permit grants: never
    /// `critical`, never a sensitive category it does not name, never an unasked item.
    #[test]
    fn permits_release_only_what_the_deciding_permit_grants(p in policy(), r in request()) {
        let d = evaluate(&p, &r, NOW);
        if let (Some(access), AccessKind::Research(_)) = (d.permit(), &r.kind) {
            let DecidedBy::Provision(path) = d.decided_by() else {
                return Err(TestCaseError::fail("a research permit is decided by a provision"));
            };
            let chain = on_path(&p, path);
            prop_assert_eq!(chain.len(), path.depth());
            prop_assert_eq!(chain.last().map(|p| p.effect), Some(Effect::Permit));
            let (categories, fields) = effective_grant(&chain);
            let granted = categories.resolve();
            for c in access.categories() {
                prop_assert!(granted.contains(c));
                prop_assert!(r.categories.contains(c));
                prop_assert!(*c != Category::Critical);
                if c.is_sensitive() {
                    prop_assert!(categories.listed.contains(c), "{c} released without being named");
                }
            }
            for f in access.fields() {
                prop_assert!(fields.contains(f) && r.fields.contains(f));
            }
            prop_assert!(!access.categories().is_empty() || !access.fields().is_empty());
        }
    }

    /// Released and withheld split what was asked.
    #[test]
    fn released_and_withheld_partition_the_request(p in policy(), r in request()) {
        let d = evaluate(&p, &r, NOW);
        let mut all: BTreeSet<Category> = d.permitted_categories().clone();
        prop_assert!(d.permitted_categories().is_disjoint(d.withheld_categories()));
        all.extend(d.withheld_categories().iter().copied());
        prop_assert_eq!(&all, &r.categories);
        let mut all: BTreeSet<SearchField> = d.permitted_fields().clone();
        prop_assert!(d.permitted_fields().is_disjoint(d.withheld_fields()));
        all.extend(d.withheld_fields().iter().copied());
        prop_assert_eq!(&all, &r.fields);
    }

    /// An unconditional deny among the top-level provisions beats every permit
    /// sibling, wherever it is listed.
    #[test]
    fn a_deny_sibling_beats_permit_siblings(
        d in draft(),
        r in request(),
        index in 0usize..5,
    ) {
        let mut d = d;
        let index = index.min(d.provisions.len());
        d.provisions.insert(index, Provision::deny());
        let Ok(p) = d.check() else { return Ok(()) };
        if let AccessKind::Research(_) = r.kind {
            let decision = evaluate(&p, &r, NOW);
            prop_assert_eq!(decision.effect(), Effect::Deny);
            prop_assert!(decision.permit().is_none());
        }
    }

    /// A policy that has expired or is not yet valid is no consent, for research and
    /// for break-glass.
    #[test]
    fn a_policy_out_of_force_always_denies(
        d in draft(),
        r in request(),
        expired in any::<bool>(),
        offset in 0i64..10_000,
    ) {
        let mut d = d;
        d.period = Some(if expired {
            Period::new(None, Some(NOW - offset))
        } else {
            Period::new(Some(NOW + 1 + offset), None)
        });
        let Ok(p) = d.check() else { return Ok(()) };
        let decision = evaluate(&p, &r, NOW);
        prop_assert_eq!(decision.decided_by(), &DecidedBy::PolicyPeriod);
        prop_assert!(decision.permit().is_none());
    }

    /// A superseded version always denies, whatever it said.
    #[test]
    fn a_superseded_policy_always_denies(
        old in draft(),
        newer in draft(),
        r in request(),
    ) {
        let mut old = old;
        let mut newer = newer;
        old.version = 1;
        old.issued_at = NOW - 100;
        newer.version = 2;
        newer.issued_at = NOW - 50;
        let (Ok(old), Ok(newer)) = (old.check(), newer.check()) else { return Ok(()) };
        let history = PolicyHistory::new([newer, old]).expect("ordered versions");
        let decision = history.evaluate_version(1, &r, NOW);
        prop_assert_eq!(decision.decided_by(), &DecidedBy::Superseded);
        prop_assert!(decision.permit().is_none());
        // Before the newer version was issued, version 1 was current.
        let before = history.evaluate_version(1, &r, NOW - 60);
        prop_assert_ne!(before.decided_by(), &DecidedBy::Superseded);
    }

    /// A permit expires no later than the policy, every provision on its path, any
    /// TS limit on that path and the request's period, and later than now.
    #[test]
    fn expiry_respects_every_bound(p in policy(), r in request()) {
        let d = evaluate(&p, &r, NOW);
        let Some(access) = d.permit() else { return Ok(()) };
        let mut bounds = vec![p.period().and_then(|p| p.end), r.period.end];
        if let DecidedBy::Provision(path) = d.decided_by() {
            for provision in on_path(&p, path) {
                bounds.push(provision.period.and_then(|p| p.end));
                bounds.push(provision.data_use.as_ref().and_then(DataUse::time_limit));
            }
        }
        let earliest = bounds.iter().flatten().min().copied();
        if access.is_emergency() {
            prop_assert!(access.expiry().is_some());
        } else {
            prop_assert_eq!(access.expiry(), earliest);
        }
        if let Some(expiry) = access.expiry() {
            prop_assert!(expiry > NOW);
            for b in bounds.iter().flatten() {
                prop_assert!(expiry <= *b);
            }
        }
    }

    /// Break-glass releases `critical` and nothing else, and only if allowed.
    #[test]
    fn emergencies_release_critical_only(p in policy(), r in request()) {
        let mut r = r;
        r.kind = AccessKind::Emergency;
        let d = evaluate(&p, &r, NOW);
        if let Some(access) = d.permit() {
            prop_assert_eq!(p.break_glass(), BreakGlass::Allow);
            prop_assert_eq!(access.categories(), &BTreeSet::from([Category::Critical]));
            prop_assert!(access.fields().is_empty());
            prop_assert!(access.is_emergency());
        }
        if p.break_glass() == BreakGlass::Deny {
            prop_assert!(d.permit().is_none());
        }
    }

    /// The canonical bytes parse back to the same policy with the same hash, and
    /// serde round-trips.
    #[test]
    fn canonical_bytes_round_trip(p in policy()) {
        let back = ConsentPolicy::from_json(p.canonical_bytes()).expect("canonical bytes parse");
        prop_assert_eq!(&back, &p);
        prop_assert_eq!(back.canonical_bytes(), p.canonical_bytes());
        prop_assert_eq!(back.policy_hash(), p.policy_hash());
        let text = serde_json::to_string(&p).expect("serializes");
        let again: ConsentPolicy = serde_json::from_str(&text).expect("deserializes");
        prop_assert_eq!(again.policy_hash(), p.policy_hash());
    }

    /// Evaluation is a function of its inputs, and records the policy it applied.
    #[test]
    fn evaluation_is_pure(p in policy(), r in request()) {
        let a = evaluate(&p, &r, NOW);
        let b = evaluate(&p, &r, NOW);
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(a.policy_hash(), Some(p.policy_hash()));
        prop_assert_eq!(a.policy_version(), Some(p.version()));
    }
}
