//! Consent through real servers: a release holds exactly what each patient's current
//! consent permits (categories, searchable fields, purpose, sponsor, periods); a
//! revocation, a narrowed consent or an ended permit takes effect on the next release;
//! refusals say what is wrong and carry no patient data.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use broker::service::now_secs;
use broker_cli::demo::{Cast, Tally};
use brokerctl::agent::{self, ConsentedGrants};
use brokerctl::{ClientError, ClientResult};
use cohort_query::{CohortDefinition, ConceptHierarchy, ConsentSnapshot};
use consent_policy::{
    AccessRequest, Actor, Categories, ConsentPolicy, DataUse, Modifier, Period, PolicyDraft,
    Primary, Provision, Requester, ResearchPurpose, SearchField, Sector, StudyFocus, evaluate,
};
use consent_policy::{broad_research_policy, consent_digest};
use datasets::{PatientRecord, Population};
use integration_tests::Sandbox;
use model::Role;
use model::Study;
use model::StudyProposal;
use pre_kms::{Category, Identity};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tonic::Code;

/// The cohort engine's reference evaluator (patient by patient, without DataFusion), the
/// same file the engine's own tests compare against.
#[path = "../../query/tests/cohorts/reference.rs"]
mod reference;

/// The organisation `Sandbox::actor` registers every actor under, the sponsor included.
const SPONSOR_ORG: &str = "Test Org";
const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;
const CATS: [Category; 3] = [
    Category::Demographics,
    Category::Conditions,
    Category::Observations,
];
const HYPERTENSION: &str = "38341003";
const DIABETES: &str = "44054006";

// ------------------------------------------------------------------ the world

struct World {
    cast: Cast,
    patients: Vec<(Identity, PatientRecord)>,
}

/// A custodian, sponsor, board and researcher of `SPONSOR_ORG`, and `n` ingested patients
/// who have set no consent yet.
async fn world(sandbox: &Sandbox, seed: u64, n: usize) -> World {
    let cast = sandbox.cast().await;
    let population = Population::new(seed, n);
    let patients: Vec<(Identity, PatientRecord)> = (0..n)
        .map(|i| (Identity::generate(), population.patient(i)))
        .collect();
    agent::ingest_batch(&cast.custodian, patients.clone())
        .await
        .expect("ingest");
    World { cast, patients }
}

/// A release (or what one should be) as the (patient, category) of each record, sorted,
/// with the tally of its plaintexts.
#[derive(Default, PartialEq)]
struct Released {
    records: Vec<(usize, Category)>,
    /// Decrypted records equal to no original research copy.
    not_originals: usize,
    tally: Tally,
}

impl fmt::Debug for Released {
    /// The records by name; the tally (compared all the same) only by its size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Released")
            .field("records", &self.records)
            .field("not_originals", &self.not_originals)
            .field("plaintexts", &self.tally.total())
            .finish()
    }
}

impl World {
    fn has(&self, i: usize) -> Vec<Category> {
        self.patients[i].1.categories.keys().copied().collect()
    }

    /// Patient `i`'s records in `categories`, for the ones the record has.
    fn records(&self, i: usize, categories: &[Category]) -> Vec<(usize, Category)> {
        categories
            .iter()
            .filter(|c| self.patients[i].1.categories.contains_key(c))
            .map(|c| (i, *c))
            .collect()
    }

    fn expect(&self, records: impl IntoIterator<Item = (usize, Category)>) -> Released {
        let mut by_patient: BTreeMap<usize, Vec<(Category, [u8; 32])>> = BTreeMap::new();
        let mut want = Released::default();
        for (i, c) in records {
            let plaintext = &self.patients[i].1.categories[&c];
            want.tally.add(plaintext);
            by_patient
                .entry(i)
                .or_default()
                .push((c, *blake3::hash(plaintext).as_bytes()));
        }
        for records in by_patient.values() {
            want.records
                .extend(self.name(records).into_iter().flatten());
        }
        want.records.sort();
        want
    }

    /// Names one subject's released records by patient: the first patient whose research
    /// copies are, byte for byte, every one of them. A record is known only by its
    /// plaintext, and two patients' copies of a category can be equal (the same sex,
    /// birth year and codes, ids replaced), so a subject is matched whole, on both sides
    /// of the comparison; records that are no patient's copies are `None`.
    fn name(&self, records: &[(Category, [u8; 32])]) -> Vec<Option<(usize, Category)>> {
        let owner = self.patients.iter().position(|(_, r)| {
            records.iter().all(|(c, hash)| {
                r.categories
                    .get(c)
                    .is_some_and(|p| blake3::hash(p).as_bytes() == hash)
            })
        });
        records
            .iter()
            .map(|(c, _)| owner.map(|i| (i, *c)))
            .collect()
    }

    /// Each patient's policy, signed by the patient, set by the custodian in one call.
    async fn try_set(
        &self,
        policies: &[(usize, ConsentPolicy)],
    ) -> ClientResult<Vec<consent_policy::ConsentReceipt>> {
        let signed: Vec<(Identity, ConsentPolicy)> = policies
            .iter()
            .map(|(i, p)| (self.patients[*i].0.clone(), p.clone()))
            .collect();
        agent::set_consents(&self.cast.custodian, &signed).await
    }

    async fn set(
        &self,
        policies: &[(usize, ConsentPolicy)],
    ) -> Vec<consent_policy::ConsentReceipt> {
        self.try_set(policies).await.expect("set consents")
    }

    async fn next_version(&self, i: usize) -> u32 {
        let history = agent::consent_history(&self.cast.custodian, &self.patients[i].0)
            .await
            .expect("consent history");
        agent::next_version(&history)
    }

    /// Grants `study` what each listed patient's stored consent permits.
    async fn grant(&self, study: &Study, who: &[usize]) -> ConsentedGrants {
        let plan = agent::grant_plan(&self.cast.custodian, &self.cast.network, study)
            .await
            .expect("plan");
        let mut patients = Vec::with_capacity(who.len());
        for &i in who {
            let id = &self.patients[i].0;
            let history = agent::consent_history(&self.cast.custodian, id)
                .await
                .expect("consent history");
            patients.push((id.clone(), self.has(i), history));
        }
        agent::consented_grants(&self.cast.custodian, &plan, study, patients)
            .await
            .expect("consented grants")
    }

    /// The researcher requests, verifies and decrypts a release of `study`.
    async fn release(&self, study: &Study) -> Released {
        let mut got = Released::default();
        let mut by_subject: BTreeMap<String, Vec<(Category, [u8; 32])>> = BTreeMap::new();
        let researcher = self.cast.researcher.identity().clone();
        agent::fetch_and_decrypt(&self.cast.researcher, &researcher, &study.study_id, |r| {
            got.tally.add(&r.plaintext);
            by_subject
                .entry(r.subject)
                .or_default()
                .push((r.category, *blake3::hash(&r.plaintext).as_bytes()));
            Ok(())
        })
        .await
        .expect("release");
        for records in by_subject.values() {
            for name in self.name(records) {
                match name {
                    Some(name) => got.records.push(name),
                    None => got.not_originals += 1,
                }
            }
        }
        got.records.sort();
        got
    }
}

// ------------------------------------------------------------------ the oracle

/// The access request a study makes of every patient, written from the proposal: its
/// sponsor's organisation (counted as for-profit when the study is commercial), its
/// purpose, categories, fields and approval period.
fn research_request(p: &StudyProposal, board_overrides_abstain: bool) -> AccessRequest {
    let sponsor = Requester {
        organisation: SPONSOR_ORG.into(),
        for_profit: p.purpose.commercial,
    };
    let period = Period::new(Some(p.not_before), Some(p.not_after));
    let mut request = AccessRequest::research(sponsor, p.purpose.clone(), period);
    request.categories = p.categories.iter().copied().collect();
    request.fields = p.fields.clone();
    request.board_overrides_abstain = board_overrides_abstain;
    request
}

/// What patient `i`'s policy (`None`: no consent) lets a study have, as the oracle reads
/// the policy: the searchable fields (permitted ∩ requested) and the categories (permitted
/// ∩ requested), or `None` if it does not permit the study.
fn access(
    policy: Option<&ConsentPolicy>,
    proposal: &StudyProposal,
    request: &AccessRequest,
    now: i64,
) -> Option<(BTreeSet<SearchField>, Vec<Category>)> {
    let access = policy.and_then(|p| evaluate(p, request, now).permit())?;
    let categories = proposal
        .categories
        .iter()
        .copied()
        .filter(|c| access.categories().contains(c))
        .collect();
    let fields = access
        .fields()
        .intersection(&proposal.fields)
        .copied()
        .collect();
    Some((fields, categories))
}

/// The patients `cohort` selects, by the reference evaluator, when each patient shows
/// only what `visible` says (`None`: not in the population): the fields, and the
/// sensitive categories among the released ones. Also the count after each step.
fn reference_selection(
    w: &World,
    cohort: &CohortDefinition,
    visible: &[Option<(BTreeSet<SearchField>, Vec<Category>)>],
) -> Vec<BTreeSet<i64>> {
    let mut b = ConsentSnapshot::builder();
    for (i, v) in visible.iter().enumerate() {
        let Some((fields, categories)) = v else {
            continue;
        };
        b.include(i as i64).unwrap();
        for f in fields {
            b.grant(i as i64, *f).unwrap();
        }
        for c in categories.iter().filter(|c| SENSITIVE.contains(c)) {
            b.permit(i as i64, *c).unwrap();
        }
    }
    let consent = b.build();
    let hierarchy = ConceptHierarchy::new();
    let patients: Vec<(i64, model::PatientIndex)> = w
        .patients
        .iter()
        .enumerate()
        .map(|(i, (p, r))| (i as i64, agent::searchable_index(p, r)))
        .collect();
    reference::Reference {
        hierarchy: &hierarchy,
        consent: &consent,
    }
    .steps(&patients, cohort)
}

// ------------------------------------------------------------------ generated cases

/// When a policy or a rule is in force, relative to the time the case runs.
#[derive(Debug, Clone, Copy)]
enum When {
    Always,
    Now,
    Ended,
    NotStarted,
}

impl When {
    /// Bounds at least an hour away from `now`, so that nothing changes while a case runs.
    fn period(self, now: i64) -> Option<Period> {
        match self {
            When::Always => None,
            When::Now => Some(Period::new(Some(now - HOUR), Some(now + DAY))),
            When::Ended => Some(Period::new(Some(now - DAY), Some(now - HOUR))),
            When::NotStarted => Some(Period::new(Some(now + HOUR), None)),
        }
    }
}

#[derive(Debug, Clone)]
enum Rule {
    /// A permit, with a nested deny for `except` if any.
    Permit {
        data_use: DataUse,
        categories: Option<Categories>,
        fields: Option<BTreeSet<SearchField>>,
        when: When,
        except: Option<Actor>,
    },
    /// A deny of `primary` research (all research if `None`), by `actor` (anyone if `None`).
    Deny {
        primary: Option<Primary>,
        actor: Option<Actor>,
        when: When,
    },
}

impl Rule {
    fn provision(&self, now: i64) -> Provision {
        match self {
            Rule::Permit {
                data_use,
                categories,
                fields,
                when,
                except,
            } => {
                let mut p = Provision::permit(data_use.clone());
                p.categories = categories.clone();
                p.fields = fields.clone();
                p.period = when.period(now);
                if let Some(actor) = except {
                    let mut deny = Provision::deny();
                    deny.actors = vec![actor.clone()];
                    p.provisions.push(deny);
                }
                p
            }
            Rule::Deny {
                primary,
                actor,
                when,
            } => {
                let mut p = Provision::deny();
                p.data_use = primary.clone().map(DataUse::new);
                p.actors = actor.iter().cloned().collect();
                p.period = when.period(now);
                p
            }
        }
    }
}

#[derive(Debug, Clone)]
struct PolicySpec {
    when: When,
    rules: Vec<Rule>,
}

impl PolicySpec {
    fn policy(&self, now: i64) -> ConsentPolicy {
        let mut draft = PolicyDraft::new(1, now - 60);
        draft.period = self.when.period(now);
        draft.provisions = self.rules.iter().map(|r| r.provision(now)).collect();
        draft.check().expect("generated policies are valid")
    }
}

#[derive(Debug, Clone)]
struct StudySpec {
    purpose: ResearchPurpose,
    categories: Vec<Category>,
    cohort: CohortDefinition,
    extra_fields: Vec<SearchField>,
    overrides_abstain: bool,
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    /// One per patient; `None`: the patient never consented.
    policies: Vec<Option<PolicySpec>>,
    /// One per patient: whether the patient's agent issues the grants its consent permits.
    grants: Vec<bool>,
    study: StudySpec,
}

/// Disease codes of consents and studies: `ICD10:E11.9` lies within `ICD10:E11`; a
/// MONDO code against an ICD-10 one makes the matcher abstain.
const DISEASES: [&str; 4] = ["ICD10:E11", "ICD10:E11.9", "ICD10:I10", "MONDO:0005148"];
const SENSITIVE: [Category; 4] = [
    Category::MentalHealth,
    Category::SubstanceUse,
    Category::SexualHealth,
    Category::Genomics,
];
const STUDY_CATEGORIES: [Category; 8] = [
    Category::Demographics,
    Category::Conditions,
    Category::Observations,
    Category::Medications,
    Category::Procedures,
    Category::Encounters,
    Category::MentalHealth,
    Category::SubstanceUse,
];

fn when() -> impl Strategy<Value = When> {
    prop_oneof![
        6 => Just(When::Always),
        2 => Just(When::Now),
        1 => Just(When::Ended),
        1 => Just(When::NotStarted),
    ]
}

fn primary() -> impl Strategy<Value = Primary> {
    prop_oneof![
        Just(Primary::Gru),
        Just(Primary::Hmb),
        prop::sample::select(&DISEASES[..]).prop_map(|c| Primary::Ds(BTreeSet::from([c.into()]))),
        Just(Primary::Poa),
    ]
}

fn data_use() -> impl Strategy<Value = DataUse> {
    (primary(), any::<[bool; 3]>()).prop_map(|(primary, [npu, irb, publish])| {
        let mut d = DataUse::new(primary);
        for (on, m) in [
            (npu, Modifier::Npu),
            (irb, Modifier::Irb),
            (publish, Modifier::Pub),
        ] {
            if on {
                d = d.with(m);
            }
        }
        d
    })
}

fn categories() -> impl Strategy<Value = Option<Categories>> {
    let releasable: Vec<Category> = Category::ALL
        .into_iter()
        .filter(|c| *c != Category::Critical)
        .collect();
    prop_oneof![
        1 => Just(None),
        2 => Just(Some(Categories::all_standard())),
        1 => prop::sample::subsequence(SENSITIVE.to_vec(), 1..=2).prop_map(|named| {
            let mut c = Categories::all_standard();
            c.listed.extend(named);
            Some(c)
        }),
        2 => prop::sample::subsequence(releasable, 0..=5).prop_map(|c| Some(Categories::only(c))),
    ]
}

fn fields() -> impl Strategy<Value = Option<BTreeSet<SearchField>>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(SearchField::ALL.into_iter().collect())),
        2 => prop::sample::subsequence(SearchField::ALL.to_vec(), 0..=6)
            .prop_map(|f| Some(f.into_iter().collect())),
    ]
}

fn actor() -> impl Strategy<Value = Actor> {
    prop_oneof![
        Just(Actor::Organisation(SPONSOR_ORG.into())),
        Just(Actor::Organisation("Other Org".into())),
        Just(Actor::Sector(Sector::ForProfit)),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    let permit = (
        data_use(),
        categories(),
        fields(),
        when(),
        prop::option::weighted(0.3, actor()),
    )
        .prop_map(
            |(data_use, categories, fields, when, except)| Rule::Permit {
                data_use,
                categories,
                fields,
                when,
                except,
            },
        );
    // Research of any kind, every non-sensitive category, mostly every field: common in
    // practice, and what makes most cases release something.
    let all_fields: BTreeSet<SearchField> = SearchField::ALL.into_iter().collect();
    let some_fields = prop::sample::subsequence(SearchField::ALL.to_vec(), 1..=5)
        .prop_map(|f| Some(f.into_iter().collect()));
    let broad_fields = prop_oneof![Just(Some(all_fields)), some_fields];
    let broad = (broad_fields, when(), prop::option::weighted(0.2, actor())).prop_map(
        |(fields, when, except)| Rule::Permit {
            data_use: DataUse::new(Primary::Gru),
            categories: Some(Categories::all_standard()),
            fields,
            when,
            except,
        },
    );
    let deny = (
        prop::option::of(primary()),
        prop::option::of(actor()),
        when(),
    )
        .prop_map(|(primary, actor, when)| Rule::Deny {
            primary,
            actor,
            when,
        });
    prop_oneof![3 => permit, 4 => broad, 1 => deny]
}

fn policy() -> impl Strategy<Value = Option<PolicySpec>> {
    let when = prop_oneof![
        8 => Just(When::Always),
        1 => Just(When::Now),
        1 => Just(When::Ended),
        1 => Just(When::NotStarted),
    ];
    let spec = (when, prop::collection::vec(rule(), 1..=3))
        .prop_map(|(when, rules)| PolicySpec { when, rules });
    prop::option::weighted(0.9, spec)
}

fn purpose() -> impl Strategy<Value = ResearchPurpose> {
    let focus = prop_oneof![
        3 => Just(StudyFocus::Health),
        1 => Just(StudyFocus::General),
        2 => prop::sample::select(&DISEASES[..]).prop_map(|c| StudyFocus::Disease(vec![c.into()])),
        1 => Just(StudyFocus::Ancestry),
    ];
    (
        focus,
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.75),
        prop::bool::weighted(0.75),
    )
        .prop_map(|(focus, commercial, irb_approved, will_publish)| {
            let mut p = ResearchPurpose::new(focus);
            p.commercial = commercial;
            p.irb_approved = irb_approved;
            p.will_publish = will_publish;
            p
        })
}

/// Codes the synthetic population has (and one it never has).
const CONDITION_CODES: [&str; 5] = [HYPERTENSION, DIABETES, "15777000", "55822004", "35489007"];
const DRUG_CODES: [&str; 3] = ["314076", "617312", "312940"];
const MEASUREMENT_CODES: [&str; 2] = ["4548-4", "39156-5"];

/// One cohort criterion as JSON: demographics, a condition, drug or measurement (with
/// windows, counts and values), an exclusion or a choice of two.
fn criterion() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    let window = prop_oneof![
        3 => Just(None),
        1 => (2000..2024i32).prop_map(|y| Some(json!({"between": {"from": format!("{y}-01-01")}}))),
        1 => (1990..2024i32).prop_map(|y| Some(json!({"between": {"to": format!("{y}-12-31")}}))),
        // Relative to each of the patient's events of another criterion (an anchor).
        2 => (
            prop_oneof![
                prop::sample::select(&DRUG_CODES[..]).prop_map(|c| json!({"drug": {"codes": [format!("rxnorm:{c}")]}})),
                prop::sample::select(&CONDITION_CODES[..]).prop_map(|c| json!({"condition": {"codes": [format!("snomed:{c}")]}})),
            ],
            -3650..365i32,
            0..3650i32,
        )
            .prop_map(|(anchor, from, span)| Some(json!({"days_from_event": {"event": anchor, "from": from, "to": from + span}}))),
    ];
    let event = |domain: &'static str, codes: &'static [&'static str]| {
        (
            prop::sample::subsequence(codes.to_vec(), 1..=2),
            window.clone(),
            prop_oneof![3 => Just(None), 1 => (2..4u32).prop_map(Some)],
        )
            .prop_map(move |(codes, window, at_least)| {
                let system = if domain == "drug" { "rxnorm" } else if domain == "measurement" { "loinc" } else { "snomed" };
                let mut e = json!({"codes": codes.iter().map(|c| format!("{system}:{c}")).collect::<Vec<_>>()});
                if let Some(w) = window {
                    e["window"] = w;
                }
                if let Some(n) = at_least {
                    e["occurrence"] = json!({"at_least": n});
                }
                json!({ domain: e })
            })
    };
    let demographics = prop_oneof![
        prop::sample::select(&["female", "male"][..])
            .prop_map(|s| json!({"demographics": {"sex": [s]}})),
        (1930..2010i32, 0..40i32).prop_map(
            |(y, span)| json!({"demographics": {"birth_year": {"min": y, "max": y + span}}})
        ),
    ];
    let measurement = (prop::sample::select(&MEASUREMENT_CODES[..]), 4.0..40.0f64).prop_map(|(c, min)| {
        json!({"measurement": {"codes": [format!("loinc:{c}")], "value": {"min": (min * 10.0).round() / 10.0}}})
    });
    let leaf = prop_oneof![
        3 => demographics,
        4 => event("condition", &CONDITION_CODES),
        2 => event("drug", &DRUG_CODES),
        2 => measurement,
    ];
    leaf.prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            2 => inner.clone().prop_map(|c| json!({"not": c})),
            1 => (inner.clone(), inner).prop_map(|(a, b)| json!({"any": [a, b]})),
        ]
    })
}

/// 0 to 2 criteria; half the time an index date too, and then, half of those, a
/// requirement of observation around it (the synthetic patients' observation periods span
/// their encounters, which are in their last three years before 2026).
fn cohort() -> impl Strategy<Value = CohortDefinition> {
    use serde_json::json;
    let observed = prop_oneof![
        2 => Just(None),
        1 => (2021..2027i32, 0..1000u32, 0..500u32).prop_map(|(year, prior, post)| {
            Some((format!("{year}-07-01"), json!({"observation_period": {"prior_days": prior, "post_days": post}})))
        }),
        1 => (2000..2027i32).prop_map(|year| Some((format!("{year}-07-01"), json!(null)))),
    ];
    (prop::collection::vec(criterion(), 0..=2), observed).prop_map(|(mut criteria, observed)| {
        let mut json = json!({});
        if let Some((date, observation)) = observed {
            json["index"] = json!({ "date": date });
            if !observation.is_null() {
                criteria.push(observation);
            }
        }
        json["criteria"] = json!(criteria);
        CohortDefinition::from_json(json.to_string().as_bytes())
            .expect("generated definitions are valid")
    })
}

fn study() -> impl Strategy<Value = StudySpec> {
    (
        purpose(),
        prop::sample::subsequence(STUDY_CATEGORIES.to_vec(), 1..=4),
        cohort(),
        prop::sample::subsequence(SearchField::ALL.to_vec(), 0..=3),
        any::<bool>(),
    )
        .prop_map(
            |(purpose, categories, cohort, extra_fields, overrides_abstain)| StudySpec {
                purpose,
                categories,
                cohort,
                extra_fields,
                overrides_abstain,
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        prop::collection::vec((policy(), prop::bool::weighted(0.8)), 8..14),
        study(),
    )
        .prop_map(|(seed, patients, study)| Case {
            seed,
            policies: patients.iter().map(|(p, _)| p.clone()).collect(),
            grants: patients.iter().map(|(_, g)| *g).collect(),
            study,
        })
}

/// What one case released and should have released, the board's exact count and the
/// reference's, and how often each part of the property was exercised.
#[derive(Default)]
struct Outcome {
    got: Released,
    want: Released,
    /// The board's exact count of the study's cohort, step by step, and the reference's.
    exact: Vec<String>,
    reference: Vec<String>,
    issued: usize,
    /// Patients whose agent grants and whose consent permits a requested category they
    /// have.
    permitted: usize,
    /// Patients released.
    included: usize,
    /// Patients the cohort selects on their full index, granting, with records in the
    /// requested categories, whom their consent leaves out.
    excluded: usize,
    /// Of those, patients whose consent permits categories but hides what the cohort
    /// needs to select them.
    hidden: usize,
}

async fn run_case(case: &Case) -> Outcome {
    let sandbox = Sandbox::start().await;
    let w = world(&sandbox, case.seed, case.policies.len()).await;
    let now = now_secs();
    let policies: Vec<Option<ConsentPolicy>> = case
        .policies
        .iter()
        .map(|spec| spec.as_ref().map(|s| s.policy(now)))
        .collect();
    let set: Vec<(usize, ConsentPolicy)> = policies
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((i, p.clone()?)))
        .collect();
    if !set.is_empty() {
        w.set(&set).await;
    }

    let spec = &case.study;
    let mut proposal = w
        .cast
        .proposal("consent property", &spec.categories, spec.cohort.clone());
    proposal.purpose = spec.purpose.clone();
    proposal.fields = spec.cohort.fields();
    proposal.fields.extend(spec.extra_fields.iter().copied());
    let study = w
        .cast
        .approve(&proposal, spec.overrides_abstain)
        .await
        .expect("propose and approve");
    let granting: Vec<usize> = (0..w.patients.len()).filter(|&i| case.grants[i]).collect();
    let grants = w.grant(&study, &granting).await;
    let count = w
        .cast
        .board
        .count(&study.study_id, &[])
        .await
        .expect("the board's exact count of the study's cohort");
    let got = w.release(&study).await;
    sandbox.stop().await;

    let request = research_request(&proposal, spec.overrides_abstain);
    let now = now_secs();
    let visible: Vec<_> = policies
        .iter()
        .map(|p| access(p.as_ref(), &proposal, &request, now))
        .collect();
    let steps = reference_selection(&w, &spec.cohort, &visible);
    let selected = steps.last().expect("step 0");
    let everything: Vec<_> = (0..w.patients.len())
        .map(|_| {
            Some((
                SearchField::ALL.into_iter().collect(),
                spec.categories.clone(),
            ))
        })
        .collect();
    let unconstrained = reference_selection(&w, &spec.cohort, &everything)
        .pop()
        .expect("step 0");
    let mut outcome = Outcome {
        got,
        exact: count.attrition.iter().map(|s| s.count.clone()).collect(),
        reference: steps.iter().map(|s| s.len().to_string()).collect(),
        issued: grants.issued,
        ..Outcome::default()
    };
    let mut want = Vec::new();
    for (i, v) in visible.iter().enumerate() {
        let records = v
            .as_ref()
            .map(|(_, categories)| w.records(i, categories))
            .unwrap_or_default();
        let granted = case.grants[i] && !records.is_empty();
        let released = granted && selected.contains(&(i as i64));
        let wanted = case.grants[i]
            && unconstrained.contains(&(i as i64))
            && !w.records(i, &spec.categories).is_empty();
        outcome.permitted += usize::from(granted);
        outcome.included += usize::from(released);
        outcome.excluded += usize::from(wanted && !released);
        outcome.hidden += usize::from(wanted && granted && !released);
        if released {
            want.extend(records);
        }
    }
    outcome.want = w.expect(want);
    outcome
}

/// Each case starts its own broker and takes about a second in a debug build.
const CASES: u32 = 24;

#[test]
fn no_release_outside_what_each_policy_permits() {
    let config = Config {
        cases: CASES,
        // Each case runs its own broker: shrink a little, not for minutes.
        max_shrink_iters: 16,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let mixed = Cell::new(0usize);
    let (included, excluded, hidden) = (Cell::new(0), Cell::new(0), Cell::new(0));
    let result = runner.run(&case(), |case| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let outcome = runtime.block_on(run_case(&case));
        prop_assert_eq!(
            &outcome.exact,
            &outcome.reference,
            "the board's exact count (each step) vs the reference's"
        );
        prop_assert_eq!(
            &outcome.got,
            &outcome.want,
            "released vs consented ∩ cohort ∩ grants"
        );
        prop_assert_eq!(
            outcome.issued,
            outcome.permitted,
            "grants issued vs patients whose consent permits a category they have"
        );
        included.set(included.get() + outcome.included);
        excluded.set(excluded.get() + outcome.excluded);
        hidden.set(hidden.get() + outcome.hidden);
        if outcome.included > 0 && outcome.excluded > 0 {
            mixed.set(mixed.get() + 1);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "{} patients released; {} selected by the cohort but excluded by consent, {} of them by a \
         hidden field or category; {} of {CASES} cases with both released and excluded patients",
        included.get(),
        excluded.get(),
        hidden.get(),
        mixed.get()
    );
    assert!(
        mixed.get() > 0,
        "no case both released a patient and excluded one for consent: the property was not exercised"
    );
}

// ------------------------------------------------------------------ changes of consent

/// A permit of research of any kind by anyone, releasing `categories` (every
/// non-sensitive one if `None`) and every field, while `period` lasts.
fn permit_policy(
    version: u32,
    issued_at: i64,
    categories: Option<Categories>,
    period: Option<Period>,
) -> ConsentPolicy {
    let mut permit = Provision::permit(DataUse::new(Primary::Gru));
    permit.categories = categories.or(Some(Categories::all_standard()));
    permit.fields = Some(SearchField::ALL.into_iter().collect());
    permit.period = period;
    let mut draft = PolicyDraft::new(version, issued_at);
    draft.provisions.push(permit);
    draft.check().expect("a valid policy")
}

fn status(err: &ClientError) -> &tonic::Status {
    match err {
        ClientError::Status(s) => s,
        other => panic!("expected a refusal by the broker, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_expiry_take_effect_on_the_next_release() {
    let sandbox = Sandbox::start().await;
    let n = 6;
    let w = world(&sandbox, 31, n).await;
    let study = w
        .cast
        .approve(
            &w.cast
                .proposal("consent changes", &CATS, CohortDefinition::everyone()),
            false,
        )
        .await
        .expect("propose and approve");
    let narrowing = (0..n)
        .find(|&i| w.has(i).contains(&Category::Observations))
        .expect("someone has observations");
    let others: Vec<usize> = (0..n).filter(|&i| i != narrowing).collect();
    let (revoking, expiring) = (others[0], others[1]);

    // Everyone but `expiring` consents broadly and is granted what that permits.
    let mut released: BTreeMap<usize, Vec<Category>> = BTreeMap::new();
    let broad: Vec<(usize, ConsentPolicy)> = (0..n)
        .filter(|&i| i != expiring)
        .map(|i| (i, broad_research_policy(1, now_secs())))
        .collect();
    w.set(&broad).await;
    let who: Vec<usize> = broad.iter().map(|(i, _)| *i).collect();
    let granted = w.grant(&study, &who).await;
    assert_eq!((granted.issued, granted.not_permitted), (n - 1, 0));
    for &i in &who {
        released.insert(i, CATS.to_vec());
    }
    let want = |released: &BTreeMap<usize, Vec<Category>>| {
        w.expect(released.iter().flat_map(|(i, c)| w.records(*i, c)))
    };
    assert_eq!(w.release(&study).await, want(&released));

    // A revocation withdraws the patient's grant at once.
    let version = w.next_version(revoking).await;
    let revocation = PolicyDraft::revocation(version, now_secs())
        .check()
        .expect("a valid revocation");
    let receipts = w.set(&[(revoking, revocation)]).await;
    assert_eq!(receipts[0].version, 2);
    assert_eq!(
        receipts[0].grants_withdrawn, 1,
        "revoking withdraws the grant"
    );
    released.remove(&revoking);
    assert_eq!(
        w.release(&study).await,
        want(&released),
        "released after revoking"
    );

    // Dropping observations withdraws the grant that holds them; a new consented grant
    // brings back what is still permitted, and only that.
    let kept = [Category::Demographics, Category::Conditions];
    let version = w.next_version(narrowing).await;
    let narrowed = permit_policy(version, now_secs(), Some(Categories::only(kept)), None);
    let receipts = w.set(&[(narrowing, narrowed)]).await;
    assert_eq!(
        receipts[0].grants_withdrawn, 1,
        "narrowing withdraws the grant"
    );
    released.remove(&narrowing);
    assert_eq!(
        w.release(&study).await,
        want(&released),
        "released after narrowing, before a new grant"
    );
    let regranted = w.grant(&study, &[narrowing]).await;
    assert_eq!(regranted.issued, 1);
    released.insert(narrowing, kept.to_vec());
    assert_eq!(
        w.release(&study).await,
        want(&released),
        "released after the new grant"
    );

    // A permit that ends in a few seconds: no grant may outlive it, the consented one
    // ends with it, and the release after its end leaves the patient out.
    let start = now_secs();
    let end = start + 4;
    let ending = permit_policy(
        1,
        start,
        None,
        Some(Period::new(Some(start - 60), Some(end))),
    );
    w.set(&[(expiring, ending)]).await;
    let plan = agent::grant_plan(&w.cast.custodian, &w.cast.network, &study)
        .await
        .expect("plan");
    let patient = w.patients[expiring].0.clone();
    let err = agent::grant_scoped(
        &w.cast.custodian,
        &plan,
        vec![(patient.clone(), w.has(expiring), end + 1)],
    )
    .await
    .expect_err("a grant that outlives the permit");
    assert_eq!(status(&err).code(), Code::PermissionDenied, "{err}");
    assert!(status(&err).message().contains("expires"), "{err}");
    let granted = w.grant(&study, &[expiring]).await;
    assert_eq!(
        granted.issued, 1,
        "the consented grant ends with the permit"
    );
    released.insert(expiring, CATS.to_vec());
    let got = w.release(&study).await;
    assert!(
        now_secs() < end,
        "the release took until the permit's end; the machine is too slow for this check"
    );
    assert_eq!(got, want(&released), "released before the permit ends");

    let wait = end + 1 - now_secs();
    tokio::time::sleep(Duration::from_secs(wait.max(0) as u64)).await;
    released.remove(&expiring);
    assert_eq!(
        w.release(&study).await,
        want(&released),
        "released after the permit ended"
    );
    let again = w.grant(&study, &[expiring]).await;
    assert_eq!(
        (again.issued, again.not_permitted),
        (0, 1),
        "no grant after the permit ended"
    );
    sandbox.stop().await;
}

// ------------------------------------------------------------------ refusals

/// Asserts `err` is the broker's refusal with `code`, saying `says`, and carrying none of
/// `secrets` and no policy JSON.
fn assert_refusal(err: &ClientError, code: Code, says: &str, secrets: &[String]) {
    let status = status(err);
    assert_eq!(status.code(), code, "{err}");
    let message = status.message().to_lowercase();
    assert!(message.contains(says), "{message:?} does not say {says:?}");
    for secret in secrets {
        assert!(
            !message.contains(&secret.to_lowercase()),
            "{message:?} carries {secret:?}"
        );
    }
    for json in [
        "{\"version\"",
        "\"provisions\"",
        "\"effect\"",
        "\"data_use\"",
    ] {
        assert!(!message.contains(json), "{message:?} carries policy JSON");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_and_carry_no_patient_data() {
    let sandbox = Sandbox::start().await;
    let w = world(&sandbox, 41, 3).await;
    let mut secrets: Vec<String> = w
        .patients
        .iter()
        .flat_map(|(_, r)| r.identifiers.iter().cloned().chain([r.source_id.clone()]))
        .collect();
    assert!(
        secrets.len() > 2 * w.patients.len(),
        "the generator gives patients identifiers"
    );
    let study = w
        .cast
        .approve(
            &w.cast
                .proposal("refusals", &CATS, CohortDefinition::everyone()),
            false,
        )
        .await
        .expect("propose and approve");
    let plan = agent::grant_plan(&w.cast.custodian, &w.cast.network, &study)
        .await
        .expect("plan");
    let (unconsenting, conditions_only, third) = (0, 1, 2);
    let only_conditions = permit_policy(
        1,
        now_secs(),
        Some(Categories::only([Category::Conditions])),
        None,
    );
    secrets.push(String::from_utf8_lossy(only_conditions.canonical_bytes()).into_owned());
    w.set(&[(conditions_only, only_conditions.clone())]).await;

    // A grant for a patient without consent.
    let err = agent::grant_batch(
        &w.cast.custodian,
        &plan,
        vec![(w.patients[unconsenting].0.clone(), CATS.to_vec())],
    )
    .await
    .expect_err("a grant without consent");
    assert_refusal(&err, Code::PermissionDenied, "consent", &secrets);

    // A grant for a category the consent withholds names the category.
    assert!(w.has(conditions_only).contains(&Category::Demographics));
    let err = agent::grant_batch(
        &w.cast.custodian,
        &plan,
        vec![(
            w.patients[conditions_only].0.clone(),
            vec![Category::Demographics, Category::Conditions],
        )],
    )
    .await
    .expect_err("a grant beyond the consent");
    assert_refusal(&err, Code::PermissionDenied, "demographics", &secrets);

    // A consent signed by another key than the patient's.
    let patient = &w.patients[third].0;
    let policy = broad_research_policy(1, now_secs());
    let mut forged = agent::sign_consent(patient, &policy);
    forged.signature = Identity::generate().sign(&consent_digest(
        &patient.pseudonym(),
        policy.canonical_bytes(),
    ));
    let err = w
        .cast
        .custodian
        .set_consents(vec![forged])
        .await
        .expect_err("a consent the patient did not sign");
    assert_refusal(&err, Code::InvalidArgument, "signature", &secrets);
    let stored = agent::consent_history(&w.cast.custodian, patient)
        .await
        .expect("history");
    assert!(
        stored.versions().is_empty(),
        "a refused consent is not stored"
    );

    // A version that is not newer than the stored one.
    let stale = broad_research_policy(1, now_secs());
    let err = w
        .try_set(&[(conditions_only, stale)])
        .await
        .expect_err("a stale version");
    assert_refusal(&err, Code::FailedPrecondition, "version 2", &secrets);

    // A study whose cohort searches a field it did not request.
    let mut proposal = w.cast.proposal(
        "unrequested field",
        &CATS,
        CohortDefinition::from_json(br#"{"criteria": [{"demographics": {"sex": ["female"]}}]}"#)
            .unwrap(),
    );
    proposal.fields = BTreeSet::from([SearchField::Condition]);
    let err = w
        .cast
        .sponsor
        .propose_study(&proposal)
        .await
        .expect_err("a cohort on an unrequested field");
    assert_refusal(&err, Code::InvalidArgument, "sex", &secrets);

    // A consent for a patient the caller does not act for.
    let stranger = sandbox.actor(Role::Custodian).await;
    let err = agent::set_consents(&stranger, &[(patient.clone(), policy)])
        .await
        .expect_err("a consent set by a stranger");
    assert_refusal(&err, Code::PermissionDenied, "does not act for", &secrets);

    // None of the refused requests left anything to release.
    let got = w.release(&study).await;
    assert_eq!(got, Released::default(), "released after refusals only");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_conflicting_consent_versions_is_refused_whole() {
    let sandbox = Sandbox::start().await;
    let w = world(&sandbox, 51, 2).await;
    let now = now_secs();
    w.set(&[
        (0, broad_research_policy(1, now)),
        (1, broad_research_policy(1, now)),
    ])
    .await;
    let study = w
        .cast
        .approve(
            &w.cast
                .proposal("one call", &CATS, CohortDefinition::everyone()),
            false,
        )
        .await
        .expect("propose and approve");
    assert_eq!(w.grant(&study, &[0, 1]).await.issued, 2);
    let before = w.release(&study).await;
    assert_eq!(before, w.expect((0..2).flat_map(|i| w.records(i, &CATS))));

    // A valid new version for patient 0, with two versions for patient 1 that contradict
    // each other: a newer version issued before an older one, or one version twice.
    let revocation = |version| {
        PolicyDraft::revocation(version, now)
            .check()
            .expect("valid")
    };
    let calls = [
        vec![
            (0, revocation(2)),
            (1, broad_research_policy(3, now)),
            (1, broad_research_policy(2, now + 10)),
        ],
        vec![
            (0, revocation(2)),
            (1, broad_research_policy(2, now)),
            (1, revocation(2)),
        ],
    ];
    for call in calls {
        let err = w
            .try_set(&call)
            .await
            .expect_err("a call with conflicting versions of one patient's consent");
        assert!(
            matches!(
                status(&err).code(),
                Code::InvalidArgument | Code::FailedPrecondition
            ),
            "{err}"
        );
        for (i, (id, _)) in w.patients.iter().enumerate() {
            let history = agent::consent_history(&w.cast.custodian, id)
                .await
                .expect("a consent history that still reads");
            let versions: Vec<u32> = history.versions().iter().map(|p| p.version()).collect();
            assert_eq!(
                versions,
                [1],
                "patient {i}: nothing of a refused call is stored"
            );
        }
    }
    assert_eq!(
        w.release(&study).await,
        before,
        "the release after refused calls"
    );
    let receipts = w.set(&[(1, revocation(2))]).await;
    assert_eq!(
        receipts[0].grants_withdrawn, 1,
        "the patient can still revoke"
    );
    sandbox.stop().await;
}
