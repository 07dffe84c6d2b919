//! A sponsor who averages or differences protected counts learns nothing below the
//! protection, and sensitive codes count only under their consent category.
//!
//! The bound (docs/COHORTS.md, *What a sponsor can learn*): let `δ` be the largest total
//! variation distance between the protected answers to two exact counts that differ by one
//! (`ProtectionPolicy::neighbour_distance`: 15/49 at the threshold, 1/7 between counts of
//! at least 11). A sponsor charged for `k` draws whose exact count depends on one patient
//! guesses a fact about that patient (even prior) correctly with probability at most
//! `½ + (1 − (1 − δ)^k) / 2`. Equivalent questions share a draw, so averaging them adds
//! nothing; differently-written ones are fresh draws, each charged.
//!
//! The engine-level tests play many seeded trials of a sponsor who knows every patient but
//! one, asks what its budget allows, and guesses with the likelihood ratio (the optimal
//! test); the measured success must stay within the bound, and a control shows the same
//! sponsor would succeed if the broker answered a definition of many fresh steps for one
//! charge. The server tests drive the real broker through the real client.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use audit_log::EventKind;
use brokerctl::ClientError;
use cohort_query::{
    BrokerSecret, BudgetError, BudgetPolicy, CodedEvent, CohortDefinition, CohortEngine,
    ConceptHierarchy, ConsentSnapshot, CountBasis, CountResult, Draws, IndexBuilder, PatientIndex,
    Person, ProtectedCount, ProtectionPolicy, QueryBudget, protect,
};
use consent_policy::{Categories, ConsentPolicy, broad_research_policy};
use datasets::{PatientRecord, Population};
use integration_tests::Sandbox;
use pre_kms::{Category, Identity};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;

const HYPERTENSION: &str = "snomed:38341003";
const DIABETES: &str = "snomed:44054006";
const HIV: &str = "86406008";

fn def(json: &str) -> CohortDefinition {
    CohortDefinition::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{json}"))
}

fn criteria(list: &[String]) -> String {
    format!(r#"{{"criteria": [{}]}}"#, list.join(", "))
}

fn condition(code: &str) -> String {
    format!(r#"{{"condition": {{"codes": ["{code}"]}}}}"#)
}

/// `condition(code)` written `copies` times in six equivalent forms.
fn rewritten(code: &str, copies: usize) -> Vec<String> {
    let a = condition(code);
    let forms = [
        a.clone(),
        format!(r#"{{"condition": {{"codes": ["{code}", "{code}"]}}}}"#),
        format!(r#"{{"all": [{a}]}}"#),
        format!(r#"{{"any": [{a}, {a}]}}"#),
        format!(r#"{{"at_least": {{"n": 1, "of": [{a}]}}}}"#),
        format!(r#"{{"not": {{"not": {a}}}}}"#),
    ];
    (0..copies)
        .map(|i| forms[i % forms.len()].clone())
        .collect()
}

/// `first`, then `steps` criteria no patient fails (the exclusion of a drug code nobody
/// has): the same exact count at every step, but each step a new question.
fn padded(first: &str, steps: usize, tag: u32) -> Vec<String> {
    std::iter::once(first.to_string())
        .chain(
            (0..steps)
                .map(|i| format!(r#"{{"not": {{"drug": {{"codes": ["rxnorm:9{tag}{i:03}"]}}}}}}"#)),
        )
        .collect()
}

// ---------------------------------------------------------------------------------------
// Engine level: many seeded trials.

/// One of the two data sets a sponsor must tell apart: identical but for the target.
struct World {
    engine: CohortEngine,
    consent: ConsentSnapshot,
    basis: CountBasis,
}

/// 300 patients; `cohort` of them (not the target, patient 0) have hypertension; the
/// target, the only patient born in 1931, has it only in the world `with_target`.
fn world(cohort: usize, with_target: bool) -> World {
    let event = |code: &str| {
        let (system, code) = code.split_once(':').unwrap();
        CodedEvent {
            system: system.into(),
            code: code.into(),
            date: "2021-05-01".into(),
            value: None,
            unit: String::new(),
        }
    };
    let mut b = IndexBuilder::new();
    for id in 0..300i64 {
        let mut p = PatientIndex {
            person: Person {
                birth_year: Some(if id == 0 {
                    1931
                } else {
                    1940 + (id % 60) as i32
                }),
                sex: if id % 2 == 0 { "female" } else { "male" }.into(),
            },
            ..Default::default()
        };
        p.conditions.push(event(DIABETES));
        let member = if id == 0 {
            with_target
        } else {
            (1..=cohort as i64).contains(&id)
        };
        if member {
            p.conditions.push(event(HYPERTENSION));
        }
        b.add(id, &p).unwrap();
    }
    let engine = CohortEngine::from_index(b.build(), ConceptHierarchy::new());
    let consent = ConsentSnapshot::everything(0..300).unwrap();
    let basis = CountBasis::new(&consent.hash(), &engine.index_version());
    World {
        engine,
        consent,
        basis,
    }
}

/// What the sponsor knows of one question: its exact counts in both worlds (it knows
/// everyone but the target) and, per world, the draws its answer shows.
struct Question {
    /// Each step's normalized hash: which steps are the same question (public).
    steps: Vec<[u8; 32]>,
    exact: [CountResult; 2],
    draws: [Draws; 2],
}

struct Game {
    worlds: [World; 2],
    policy: ProtectionPolicy,
}

impl Game {
    fn new(cohort: usize) -> Game {
        Game {
            worlds: [world(cohort, false), world(cohort, true)],
            policy: ProtectionPolicy::default(),
        }
    }

    fn question(&self, json: &str) -> Question {
        let definition = def(json);
        let exact = self
            .worlds
            .each_ref()
            .map(|w| w.engine.count_blocking(&definition, &w.consent).unwrap());
        let draws = self
            .worlds
            .each_ref()
            .map(|w| Draws::of(&definition, &w.basis));
        let steps = (0..=definition.criteria.len())
            .map(|k| definition.prefix(k).normalized().hash.0)
            .collect();
        Question {
            steps,
            exact,
            draws,
        }
    }

    /// Plays `trials` games: a fresh broker secret and a fresh sponsor budget of `budget`
    /// units each; the target is in the cohort in a random half. The sponsor asks
    /// `questions` in order (a refused one shows nothing) and guesses with the likelihood
    /// ratio of every distinct step it saw. Returns the share of correct guesses.
    fn play(&self, questions: &[Question], budget: Option<u64>, trials: usize, seed: u64) -> f64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut correct = 0;
        for _ in 0..trials {
            let secret = BrokerSecret::from_bytes(rng.r#gen());
            let truth = rng.gen_bool(0.5) as usize;
            let mut budget = budget.map(|total| {
                QueryBudget::new(BudgetPolicy {
                    per_minute: u32::MAX,
                    total,
                })
            });
            // Each distinct question (normalized step) the sponsor saw: its answer, and
            // its exact count in either world.
            let mut seen: BTreeMap<[u8; 32], (ProtectedCount, [u64; 2])> = BTreeMap::new();
            for q in questions {
                if let Some(b) = &mut budget
                    && b.charge(UNIX_EPOCH + Duration::from_secs(1), &q.draws[truth])
                        .is_err()
                {
                    continue;
                }
                let answer = protect(&q.exact[truth], &q.draws[truth], &secret, &self.policy);
                for step in &answer.attrition {
                    let key = q.steps[step.step];
                    let counts = [0, 1].map(|w| q.exact[w].attrition[step.step].exact);
                    let previous = seen.insert(key, (step.count, counts));
                    // One question, one draw: asked again, it answers the same.
                    assert!(previous.is_none_or(|(c, _)| c == step.count));
                }
            }
            let likelihood = |w: usize| -> f64 {
                seen.values()
                    .filter(|(_, counts)| counts[0] != counts[1])
                    .map(|(answer, counts)| self.policy.probability(counts[w], *answer))
                    .product()
            };
            let (out, inside) = (likelihood(0), likelihood(1));
            let guess = if inside > out {
                1
            } else if out > inside {
                0
            } else {
                rng.gen_bool(0.5) as usize
            };
            correct += (guess == truth) as usize;
        }
        correct as f64 / trials as f64
    }
}

/// `½ + (1 − (1 − δ)^k) / 2`, the most a sponsor's guess can be right.
fn bound(delta: f64, k: i32) -> f64 {
    0.5 + (1.0 - (1.0 - delta).powi(k)) / 2.0
}

/// Four standard deviations of a measured success rate near ½ over `trials`.
fn slack(trials: usize) -> f64 {
    4.0 * (0.25 / trials as f64).sqrt()
}

#[test]
fn averaging_equivalent_or_padded_questions_recovers_nothing_below_the_protection() {
    let game = Game::new(22);
    let trials = 4000;
    let delta = game.policy.neighbour_distance(11);
    assert!((delta - 1.0 / 7.0).abs() < 1e-12);
    let cohort = condition(HYPERTENSION);

    // The attack that worked before: one definition, one count charged, 41 steps each
    // with its own noise. The budget (4 units) refuses it: it shows 42 draws.
    let forty = game.question(&criteria(&padded(&cohort, 40, 1)));
    let mut budget = QueryBudget::new(BudgetPolicy {
        per_minute: u32::MAX,
        total: 4,
    });
    assert!(matches!(
        budget.charge(UNIX_EPOCH, &forty.draws[0]),
        Err(BudgetError::TooCostly { needed: 42, .. })
    ));
    // The control: had the broker answered it, averaging its 41 draws of the one count
    // would tell the target's membership most of the time. So the measurement can fail.
    let unlimited = game.play(std::slice::from_ref(&forty), None, trials, 1);
    eprintln!("control, 41 draws for one charge: {unlimited}");
    assert!(
        unlimited > 0.8,
        "the control sponsor only reached {unlimited}"
    );

    // Within the budget: the refused definition, then 50 rewritten copies of the cohort
    // (one draw of its count and one of the population: 2 units), then two padded steps
    // (1 unit each). Three draws of counts that depend on the target: k = 3.
    let repeated = game.question(&criteria(&rewritten(HYPERTENSION, 50)));
    for w in 0..2 {
        assert_eq!(repeated.draws[w].distinct().len(), 2);
    }
    let questions = [
        forty,
        repeated,
        game.question(&criteria(&padded(&cohort, 1, 1))),
        game.question(&criteria(&padded(&cohort, 2, 1))),
    ];
    let success = game.play(&questions, Some(4), trials, 2);
    let limit = bound(delta, 3) + slack(trials);
    eprintln!("averaging within a 4-unit budget (k = 3): {success}, limit {limit}");
    assert!(
        success <= limit,
        "averaging within the budget guessed {success}, above the bound {limit}"
    );
    // And the repeats alone are one draw: as good as asking once.
    let once = game.play(&questions[1..2], Some(4), trials, 3);
    eprintln!("50 rewritten copies (k = 1): {once}");
    assert!(once <= bound(delta, 1) + slack(trials), "{once}");
}

#[test]
fn differencing_with_and_without_one_patient_is_bounded_by_one_neighbour_distance() {
    let cohort = condition(HYPERTENSION);
    // C and C minus the target (the only patient born in 1931). Only C's exact count
    // depends on the target, so k = 1 whatever the two answers' difference shows.
    let without =
        r#"{"not": {"demographics": {"birth_year": {"min": 1931, "max": 1931}}}}"#.to_string();
    let trials = 4000;
    for (n, from) in [(22usize, 11u64), (10, 0)] {
        let game = Game::new(n);
        let delta = game.policy.neighbour_distance(from);
        let c = game.question(&criteria(std::slice::from_ref(&cohort)));
        let minus = game.question(&criteria(&[cohort.clone(), without.clone()]));
        assert_eq!(c.exact[0].exact, n as u64);
        assert_eq!(c.exact[1].exact, n as u64 + 1);
        assert_eq!(minus.exact[0].exact, n as u64);
        assert_eq!(minus.exact[1].exact, n as u64);
        let success = game.play(&[c, minus], Some(3), trials, 10 + n as u64);
        let limit = bound(delta, 1) + slack(trials);
        eprintln!("differencing at {n} vs {}: {success}, limit {limit}", n + 1);
        assert!(
            success <= limit,
            "differencing at {n} vs {} guessed {success}, above {limit}",
            n + 1
        );
        // At the threshold the bound is 15/49: 10 is always <11, 11 shows 15 sometimes.
        if n == 10 {
            assert!((delta - 15.0 / 49.0).abs() < 1e-12);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Through the real broker.

fn json(list: &[String]) -> Vec<u8> {
    criteria(list).into_bytes()
}

fn status(err: &ClientError) -> &tonic::Status {
    match err {
        ClientError::Status(s) => s,
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equivalent_questions_share_one_draw_and_each_fresh_draw_is_charged_and_logged() {
    let mut sandbox = Sandbox::start().await;
    let total = 40;
    sandbox
        .restart_with(|c| {
            c.count_budget = BudgetPolicy {
                per_minute: 1_000,
                total,
            }
        })
        .await;
    let cast = sandbox.cast().await;
    let n = 90;
    let population = Population::new(23, n);
    let patients: Vec<(Identity, PatientRecord)> = (0..n)
        .map(|i| (Identity::generate(), population.patient(i)))
        .collect();
    brokerctl::agent::ingest_batch(&cast.custodian, patients.clone())
        .await
        .unwrap();
    let now = broker::service::now_secs();
    let policies: Vec<(Identity, ConsentPolicy)> = patients
        .iter()
        .map(|(id, _)| (id.clone(), broad_research_policy(1, now)))
        .collect();
    brokerctl::agent::set_consents(&cast.custodian, &policies)
        .await
        .unwrap();
    let study = cast
        .approved_study(
            "averaging",
            &[Category::Conditions],
            CohortDefinition::everyone(),
        )
        .await
        .unwrap();

    // The most common condition: large enough that its protected count is a number whose
    // noise shows.
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for (_, r) in &patients {
        let mut mine: Vec<String> = r
            .index
            .conditions
            .iter()
            .filter(|c| c.system == "snomed")
            .map(|c| format!("snomed:{}", c.code))
            .collect();
        mine.sort();
        mine.dedup();
        for c in mine {
            *codes.entry(c).or_default() += 1;
        }
    }
    let (code, holders) = codes.into_iter().max_by_key(|(_, n)| *n).unwrap();
    assert!(holders >= 25, "{code}: only {holders} patients");
    let exact = cast
        .board
        .count(&study.study_id, &json(&[condition(&code)]))
        .await
        .unwrap();
    assert_eq!(exact.count, holders.to_string());

    // (a) One definition with the criterion 50 times, in six spellings: 50 identical step
    // counts, equal to the final count: one sample of it, not 50.
    let repeated = cast
        .sponsor
        .count(&study.study_id, &json(&rewritten(&code, 50)))
        .await
        .unwrap();
    assert!(!repeated.exact);
    let shown: u64 = repeated
        .count
        .parse()
        .expect("a number above the threshold");
    assert!(shown.abs_diff(holders as u64) <= 8, "{shown} vs {holders}");
    assert_eq!(repeated.attrition.len(), 51);
    assert!(
        repeated.attrition[1..]
            .iter()
            .all(|s| s.count == repeated.count),
        "{:?}",
        repeated.attrition
    );

    // (b) Differently written equivalent questions: the same answer, and free.
    let a = condition(&code);
    let variants = [
        format!(r#"{{"title": "another title", "criteria": [{a}]}}"#).into_bytes(),
        json(&[format!(r#"{{"all": [{a}, {a}]}}"#)]),
        json(&[format!(r#"{{"any": [{a}]}}"#)]),
        json(&[format!(r#"{{"not": {{"not": {a}}}}}"#)]),
        json(&[a.clone(), a.clone()]),
    ];
    for v in &variants {
        let answer = cast.sponsor.count(&study.study_id, v).await.unwrap();
        assert_eq!(answer.count, repeated.count);
        assert_eq!(answer.attrition[0].count, repeated.attrition[0].count);
    }

    // Fresh steps are fresh draws: 12 steps that exclude drug codes nobody has keep the
    // exact count, yet their answers do not all agree (independent noise; all 13 would
    // agree by chance with probability about 0.4^12). They cost 12 units.
    let padded12 = cast
        .sponsor
        .count(&study.study_id, &json(&padded(&a, 12, 1)))
        .await
        .unwrap();
    assert!(
        padded12.attrition[1..]
            .iter()
            .any(|s| s.count != padded12.count),
        "{:?}",
        padded12.attrition
    );
    // 30 more fresh steps need 30 units; 26 remain: refused whole, nothing answered.
    let err = cast
        .sponsor
        .count(&study.study_id, &json(&padded(&a, 30, 2)))
        .await
        .unwrap_err();
    let s = status(&err);
    assert_eq!(s.code(), Code::ResourceExhausted, "{err}");
    assert!(
        s.message().contains("needs 30 new counts") && s.message().contains("26 remain"),
        "{err}"
    );
    // Asked again, the padded definition is free and answers the same.
    let again = cast
        .sponsor
        .count(&study.study_id, &json(&padded(&a, 12, 1)))
        .await
        .unwrap();
    assert_eq!(
        (&again.count, &again.attrition),
        (&padded12.count, &padded12.attrition)
    );

    // (e) Each answer's charge is in the access log: units charged and units left.
    let events = brokerctl::log_review::board_events(&cast.board, Default::default())
        .await
        .unwrap();
    let counts: Vec<_> = events
        .iter()
        .filter(|e| e.event.kind == EventKind::FeasibilityCount)
        .collect();
    let charges: Vec<(u64, u64)> = counts
        .iter()
        .filter_map(|e| e.event.details.budget.map(|b| (b.charged, b.remaining)))
        .collect();
    let mut want = vec![(2, total - 2)];
    want.extend([(0, total - 2); 5]);
    want.push((12, total - 14));
    want.push((0, total - 14));
    assert_eq!(charges, want);
    // The board's exact count is not charged.
    assert_eq!(counts.len(), want.len() + 1);
    assert_eq!(
        counts
            .iter()
            .filter(|e| e.event.details.budget.is_none())
            .count(),
        1
    );
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensitive_codes_count_only_where_the_consent_permits_their_category() {
    let sandbox = Sandbox::start().await;
    let cast = sandbox.cast().await;
    let n = 30;
    let population = Population::new(5, n);
    let mut patients: Vec<(Identity, PatientRecord)> = (0..n)
        .map(|i| (Identity::generate(), population.patient(i)))
        .collect();
    // Nobody else has HIV; the target has it (by SNOMED and by ICD-10) and hypertension,
    // uploaded as ordinary condition rows: the broker must classify them itself.
    for (_, r) in &mut patients {
        r.index.conditions.retain(|c| c.code != HIV);
    }
    let row = |system: &str, code: &str| CodedEvent {
        system: system.into(),
        code: code.into(),
        date: "2021-03-01".into(),
        value: None,
        unit: String::new(),
    };
    let target = patients[0].0.clone();
    patients[0].1.index.conditions.extend([
        row("snomed", HIV),
        row("icd10", "B20"),
        row("snomed", "38341003"),
    ]);
    let hypertensive = patients
        .iter()
        .filter(|(_, r)| r.index.conditions.iter().any(|c| c.code == "38341003"))
        .count();
    brokerctl::agent::ingest_batch(&cast.custodian, patients.clone())
        .await
        .unwrap();
    let now = broker::service::now_secs();
    let policies: Vec<(Identity, ConsentPolicy)> = patients
        .iter()
        .map(|(id, _)| (id.clone(), broad_research_policy(1, now)))
        .collect();
    brokerctl::agent::set_consents(&cast.custodian, &policies)
        .await
        .unwrap();
    // One study asks for sexual health, one does not.
    let with = cast
        .approved_study(
            "with sexual health",
            &[Category::Conditions, Category::SexualHealth],
            CohortDefinition::everyone(),
        )
        .await
        .unwrap();
    let without = cast
        .approved_study(
            "without",
            &[Category::Conditions],
            CohortDefinition::everyone(),
        )
        .await
        .unwrap();
    // A custodian's vocabulary puts HIV under a non-sensitive parent.
    cast.custodian
        .put_concepts(&[("snomed:40733004".into(), format!("snomed:{HIV}"))])
        .await
        .unwrap();
    let questions = [
        json(&[condition(&format!("snomed:{HIV}"))]),
        json(&[condition("icd10:B20")]),
        json(&[
            r#"{"condition": {"codes": ["snomed:40733004"], "include_descendants": true}}"#
                .to_string(),
        ]),
    ];
    let board_counts = |study: String| {
        let board = cast.board.clone();
        let questions = questions.clone();
        async move {
            let mut out = Vec::new();
            for q in &questions {
                out.push(board.count(&study, q).await.unwrap().count);
            }
            out
        }
    };
    // The broad consent leaves sexual health out: the HIV codes count nobody, while the
    // target's ordinary condition counts.
    assert_eq!(board_counts(with.study_id.clone()).await, ["0", "0", "0"]);
    assert_eq!(
        board_counts(without.study_id.clone()).await,
        ["0", "0", "0"]
    );
    let plain = cast
        .board
        .count(&with.study_id, &json(&[condition(HYPERTENSION)]))
        .await
        .unwrap();
    assert_eq!(plain.count, hypertensive.to_string());

    // The target permits sexual health: counted for the study that asked for it only.
    let mut draft = broad_research_policy(2, now).into_draft();
    draft.provisions[0].categories = Some(Categories {
        all_standard: true,
        listed: [Category::SexualHealth].into(),
    });
    let permitting: ConsentPolicy = draft.check().unwrap();
    brokerctl::agent::set_consents(&cast.custodian, &[(target, permitting)])
        .await
        .unwrap();
    assert_eq!(board_counts(with.study_id.clone()).await, ["1", "1", "1"]);
    assert_eq!(
        board_counts(without.study_id.clone()).await,
        ["0", "0", "0"]
    );
    sandbox.stop().await;
}
