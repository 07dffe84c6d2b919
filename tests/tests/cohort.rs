//! A study's cohort through the real server: a release is exactly the board's exact
//! count of the study's own definition ∩ grants; a consent change changes the next count
//! and the next selection at once; a restart gives identical counts and selections.

use std::collections::BTreeSet;

use broker_cli::demo::{Cast, Tally};
use brokerctl::agent;
use cohort_query::CohortDefinition;
use consent_policy::{ConsentPolicy, SearchField, broad_research_policy};
use integration_tests::{Sandbox, World};
use model::Study;
use pre_kms::{Category, Identity};

const CATS: [Category; 2] = [Category::Demographics, Category::Conditions];
const HYPERTENSION: &str = "38341003";

/// Born 1940–1980 with hypertension.
fn cohort() -> CohortDefinition {
    CohortDefinition::from_json(
        br#"{"criteria": [{"demographics": {"birth_year": {"min": 1940, "max": 1980}}},
                          {"condition": {"codes": ["snomed:38341003"]}}]}"#,
    )
    .unwrap()
}

/// The patients the cohort selects, read off the plain index (for patients whose consent
/// shows both fields), independently of the engine.
fn oracle(w: &World, hidden: &BTreeSet<usize>) -> BTreeSet<usize> {
    (0..w.patients.len())
        .filter(|i| !hidden.contains(i))
        .filter(|&i| {
            let index = &w.patients[i].1.index;
            index
                .person
                .birth_year
                .is_some_and(|y| (1940..=1980).contains(&y))
                && index.conditions.iter().any(|c| c.code == HYPERTENSION)
        })
        .collect()
}

fn expected(w: &World, who: impl IntoIterator<Item = usize>) -> Tally {
    let mut want = Tally::default();
    for i in who {
        want.add_record(&w.patients[i].1, &CATS);
    }
    want
}

async fn exact(w: &World, study: &Study) -> u64 {
    let r = w
        .cast
        .board
        .count(&study.study_id, &[])
        .await
        .expect("the board's exact count");
    assert!(r.exact);
    r.count.parse().expect("an exact count is a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_the_exact_count_of_its_cohort_and_follows_consent_at_once() {
    let mut sandbox = Sandbox::start().await;
    let w = sandbox.world(600, 12).await;
    let study = w
        .cast
        .approved_study("cohort", &CATS, cohort())
        .await
        .expect("propose and approve");
    let selected = oracle(&w, &BTreeSet::new());
    assert!(selected.len() > 20, "the cohort selects {}", selected.len());
    assert_eq!(exact(&w, &study).await, selected.len() as u64);

    // Two in three patients grant; the release is the cohort ∩ grants, nothing else.
    let granting: Vec<usize> = (0..w.patients.len()).filter(|i| i % 3 != 0).collect();
    let list: Vec<(Identity, Vec<Category>)> = granting
        .iter()
        .map(|&i| (w.patients[i].0.clone(), CATS.to_vec()))
        .collect();
    w.cast
        .grant_all(&study, &list, 200, |_| {})
        .await
        .expect("grants");
    let granted: BTreeSet<usize> = granting.iter().copied().collect();
    let (report, got) = w.cast.fetch(&study).await.expect("release");
    let want: Vec<usize> = selected.intersection(&granted).copied().collect();
    assert_eq!(report.release.subjects as usize, want.len());
    assert_eq!(got, expected(&w, want.iter().copied()));

    // A few selected patients stop making conditions searchable: the very next count and
    // release leave them out, though their grants (conditions included) still stand.
    let hiding: Vec<usize> = want.iter().copied().step_by(4).take(6).collect();
    let now = broker::service::now_secs();
    let policies: Vec<(Identity, ConsentPolicy)> = hiding
        .iter()
        .map(|&i| {
            let mut draft = broad_research_policy(2, now).into_draft();
            draft.provisions[0].fields =
                Some(BTreeSet::from([SearchField::BirthYear, SearchField::Sex]));
            (w.patients[i].0.clone(), draft.check().expect("valid"))
        })
        .collect();
    agent::set_consents(&w.cast.custodian, &policies)
        .await
        .expect("set consents");
    let hidden: BTreeSet<usize> = hiding.iter().copied().collect();
    let selected = oracle(&w, &hidden);
    assert_eq!(exact(&w, &study).await, selected.len() as u64);
    let want: Vec<usize> = selected.intersection(&granted).copied().collect();
    let (report, got) = w.cast.fetch(&study).await.expect("release");
    assert_eq!(report.release.subjects as usize, want.len());
    assert_eq!(got, expected(&w, want.iter().copied()));

    // A restart decides every consent again from the database: the same answers.
    let sponsor_before = w
        .cast
        .sponsor
        .count(&study.study_id, &[])
        .await
        .expect("protected count");
    sandbox.restart_with(|_| {}).await;
    let w = World {
        cast: Cast {
            board: sandbox.client(w.cast.board.identity().clone()).await,
            sponsor: sandbox.client(w.cast.sponsor.identity().clone()).await,
            researcher: sandbox.client(w.cast.researcher.identity().clone()).await,
            ..w.cast
        },
        ..w
    };
    assert_eq!(exact(&w, &study).await, selected.len() as u64);
    let sponsor_after = w
        .cast
        .sponsor
        .count(&study.study_id, &[])
        .await
        .expect("protected count");
    assert_eq!(
        sponsor_after.count, sponsor_before.count,
        "the same question over the same index and consent draws the same noise"
    );
    let (_, after) = w.cast.fetch(&study).await.expect("release after restart");
    assert_eq!(after, got);
    sandbox.stop().await;
}
