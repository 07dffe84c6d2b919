//! A study's cohort through the real server: a release is exactly the board's exact
//! count of the study's own definition ∩ grants; a consent change changes the next count
//! and the next selection at once; a restart gives identical counts and selections.

use std::collections::BTreeSet;

use broker::service::IndexLoad;
use broker_cli::demo::{Cast, Tally};
use brokerctl::agent;
use cohort_query::CohortDefinition;
use consent_policy::{ConsentPolicy, SearchField, broad_research_policy};
use integration_tests::{Sandbox, World};
use model::Study;
use pre_kms::{Category, Identity};

const CATS: [Category; 2] = [Category::Demographics, Category::Conditions];
const HYPERTENSION: &str = "38341003";
/// Patients of the main test: a few thousand, so that restarts load a real snapshot.
const PATIENTS: usize = 2_000;

/// Born 1940–1980 with hypertension.
fn cohort() -> CohortDefinition {
    CohortDefinition::from_json(
        br#"{"criteria": [{"demographics": {"birth_year": {"min": 1940, "max": 1980}}},
                          {"condition": {"codes": ["snomed:38341003"]}}]}"#,
    )
    .unwrap()
}

/// The patients the cohort selects, read off the index as uploaded (for patients whose consent
/// shows both fields), independently of the engine.
fn oracle(w: &World, hidden: &BTreeSet<usize>) -> BTreeSet<usize> {
    (0..w.patients.len())
        .filter(|i| !hidden.contains(i))
        .filter(|&i| {
            let (patient, record) = &w.patients[i];
            let index = agent::searchable_index(patient, record);
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
    let w = sandbox.world(PATIENTS, 12).await;
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

    // Uploads while the engine is live: new patients (with consent) join the count at
    // once; patients re-uploaded without their hypertension leave it; a re-sent index
    // that holds what is stored changes nothing.
    let population = datasets::Population::new(99, 80);
    let newcomers: Vec<(Identity, datasets::PatientRecord)> = (0..80)
        .map(|i| (Identity::generate(), population.patient(i)))
        .collect();
    agent::ingest_batch(&w.cast.custodian, newcomers.clone())
        .await
        .expect("ingest newcomers");
    let ids: Vec<Identity> = newcomers.iter().map(|(id, _)| id.clone()).collect();
    w.cast.consent_broadly(&ids).await.expect("consent");
    let cured: Vec<usize> = selected
        .iter()
        .copied()
        .filter(|i| !hidden.contains(i))
        .take(5)
        .collect();
    let mut w = World {
        patients: w.patients.into_iter().chain(newcomers).collect(),
        ..w
    };
    let resent: Vec<(Identity, datasets::PatientRecord)> = cured
        .iter()
        .map(|&i| {
            w.patients[i]
                .1
                .index
                .conditions
                .retain(|c| c.code != HYPERTENSION);
            w.patients[i].clone()
        })
        .collect();
    agent::ingest_batch(&w.cast.custodian, resent.clone())
        .await
        .expect("re-upload");
    agent::ingest_batch(&w.cast.custodian, resent)
        .await
        .expect("re-send the same");
    let selected = oracle(&w, &hidden);
    assert!(
        selected.iter().any(|&i| i >= PATIENTS),
        "a newcomer is selected"
    );
    assert!(cured.iter().all(|i| !selected.contains(i)));
    assert_eq!(exact(&w, &study).await, selected.len() as u64);
    let want: Vec<usize> = selected.intersection(&granted).copied().collect();
    let (report, got) = w.cast.fetch(&study).await.expect("release");
    assert_eq!(report.release.subjects as usize, want.len());
    assert_eq!(got, expected(&w, want.iter().copied()));

    // A restart loads the index snapshot the stop wrote and decides every consent again
    // from the database: the same answers.
    let sponsor_before = w
        .cast
        .sponsor
        .count(&study.study_id, &[])
        .await
        .expect("protected count");
    sandbox.restart_with(|_| {}).await;
    let mut w = World {
        cast: reconnect(&sandbox, &w.cast).await,
        ..w
    };
    let everyone = w.patients.len() as u64;
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
    assert_eq!(
        sandbox.broker().index_load(),
        Some(IndexLoad {
            from_snapshot: everyone,
            from_database: 0
        })
    );

    // A snapshot older than the database (as a crash leaves it): the versions stored
    // after it are read from the database, the ones they replaced retired.
    let index = sandbox.data_dir().join("index");
    let older = sandbox.dir.path().join("older-index");
    copy_dir(&index, &older);
    let touched: Vec<usize> = (0..3).collect();
    let changed: Vec<(Identity, datasets::PatientRecord)> = touched
        .iter()
        .map(|&i| {
            // A code no definition here asks for: the selection stays as it is.
            w.patients[i].1.index.conditions.push(model::CodedEvent {
                system: "snomed".into(),
                code: "840539006".into(),
                date: "2021-03-01".into(),
                value: None,
                unit: String::new(),
            });
            w.patients[i].clone()
        })
        .collect();
    agent::ingest_batch(&w.cast.custodian, changed)
        .await
        .expect("re-upload");
    sandbox
        .restart_with(|_| {
            std::fs::remove_dir_all(&index).unwrap();
            std::fs::rename(&older, &index).unwrap();
        })
        .await;
    let w = same_answers(&sandbox, w, &study, selected.len(), &got).await;
    assert_eq!(
        sandbox.broker().index_load(),
        Some(IndexLoad {
            from_snapshot: everyone - touched.len() as u64,
            from_database: touched.len() as u64
        })
    );

    // A damaged snapshot is refused and the whole index read from the database: still
    // the same answers. (The broker is stopped, its snapshot written, when this runs.)
    sandbox
        .restart_with(|_| {
            for entry in std::fs::read_dir(&index).unwrap() {
                let dir = entry.unwrap().path();
                if dir.is_dir() {
                    let person = dir.join("person.parquet");
                    let bytes = std::fs::read(&person).unwrap();
                    std::fs::write(&person, &bytes[..bytes.len() / 2]).unwrap();
                }
            }
        })
        .await;
    same_answers(&sandbox, w, &study, selected.len(), &got).await;
    assert_eq!(
        sandbox.broker().index_load(),
        Some(IndexLoad {
            from_snapshot: 0,
            from_database: everyone
        })
    );
    sandbox.stop().await;
}

/// After a restart: the board's exact count of the study is `selected` and its release
/// decrypts to `released`. Returns the world with its clients reconnected.
async fn same_answers(
    sandbox: &Sandbox,
    w: World,
    study: &Study,
    selected: usize,
    released: &Tally,
) -> World {
    let w = World {
        cast: reconnect(sandbox, &w.cast).await,
        ..w
    };
    assert_eq!(exact(&w, study).await, selected as u64);
    let (_, after) = w.cast.fetch(study).await.expect("release after restart");
    assert_eq!(&after, released);
    w
}

/// The cast's clients, connected to the restarted broker.
async fn reconnect(sandbox: &Sandbox, cast: &Cast) -> Cast {
    Cast {
        custodian: sandbox.client(cast.custodian.identity().clone()).await,
        board: sandbox.client(cast.board.identity().clone()).await,
        sponsor: sandbox.client(cast.sponsor.identity().clone()).await,
        researcher: sandbox.client(cast.researcher.identity().clone()).await,
        network: cast.network.clone(),
    }
}

/// Restarts the broker without its index snapshot, so that it reads the whole index from
/// SQLite, and reconnects the cast.
async fn restart_from_the_database(sandbox: &mut Sandbox, w: World) -> World {
    let index = sandbox.data_dir().join("index");
    sandbox
        .restart_with(|_| std::fs::remove_dir_all(&index).unwrap())
        .await;
    World {
        cast: reconnect(sandbox, &w.cast).await,
        ..w
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// Uploads of the same patients racing each other: whatever order their reports reach the
/// live engine in, it ends up holding what the database holds, one version per patient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_uploads_leave_the_live_engine_equal_to_the_database() {
    let mut sandbox = Sandbox::start().await;
    let w = sandbox.world(60, 5).await;
    let study = w
        .cast
        .approved_study("racing uploads", &CATS, cohort())
        .await
        .expect("propose and approve");
    let everyone = w.patients.len() as u64;
    // Six uploads of the same 30 patients at once, alternately with and without
    // hypertension (each a new index version of every one of them).
    let mut uploads = Vec::new();
    for round in 0..6 {
        let batch: Vec<(Identity, datasets::PatientRecord)> = w.patients[..30]
            .iter()
            .map(|(id, record)| {
                let mut record = record.clone();
                record.index.conditions.retain(|c| c.code != HYPERTENSION);
                if round % 2 == 0 {
                    record.index.conditions.push(model::CodedEvent {
                        system: "snomed".into(),
                        code: HYPERTENSION.into(),
                        date: format!("20{:02}-01-01", 10 + round),
                        value: None,
                        unit: String::new(),
                    });
                }
                (id.clone(), record)
            })
            .collect();
        let custodian = w.cast.custodian.clone();
        uploads.push(tokio::spawn(async move {
            agent::ingest_batch(&custodian, batch).await
        }));
    }
    for u in uploads {
        u.await.unwrap().expect("upload");
    }
    let all = CohortDefinition::everyone();
    let count = |w: &World, d: &CohortDefinition| {
        let json = serde_json::to_vec(d).unwrap();
        let board = w.cast.board.clone();
        let study = study.study_id.clone();
        async move {
            let r = board.count(&study, &json).await.expect("count");
            r.count.parse::<u64>().expect("exact")
        }
    };
    let live = (count(&w, &all).await, count(&w, &cohort()).await);
    assert_eq!(live.0, everyone, "one version per patient");
    // The database's answer: a start without a snapshot reads every current version.
    let w = restart_from_the_database(&mut sandbox, w).await;
    let stored = (count(&w, &all).await, count(&w, &cohort()).await);
    assert_eq!(
        sandbox.broker().index_load().map(|l| l.from_database),
        Some(everyone)
    );
    assert_eq!(live, stored);
    sandbox.stop().await;
}

/// Observation around an index date through the real server: the board's exact count is
/// the number of patients (all consenting every field) with an observation period
/// covering a year before the date and a month after it, read off their plain index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observation_period_criterion_counts_the_patients_observed_around_the_index() {
    let sandbox = Sandbox::start().await;
    let w = sandbox.world(120, 8).await;
    let study = w
        .cast
        .approved_study("observed", &CATS, CohortDefinition::everyone())
        .await
        .expect("propose and approve");
    let json = br#"{"index": {"date": "2024-07-01"},
                    "criteria": [{"observation_period": {"prior_days": 365, "post_days": 30}}]}"#;
    let index = "2024-07-01".parse::<model::Date>().unwrap().days();
    let day = |s: &str| s.parse::<model::Date>().unwrap().days();
    // What the broker holds: each patient's dates moved by the patient's secret shift.
    let observed = w
        .patients
        .iter()
        .filter(|(p, r)| {
            agent::searchable_index(p, r)
                .observation_periods
                .iter()
                .any(|p| index - day(&p.start) >= 365 && day(&p.end) - index >= 30)
        })
        .count() as u64;
    let unobserved = w
        .patients
        .iter()
        .filter(|(_, r)| r.index.observation_periods.is_empty())
        .count();
    assert!(
        observed > 10 && observed < w.patients.len() as u64,
        "the criterion must split the population: {observed} observed"
    );
    let r = w
        .cast
        .board
        .count(&study.study_id, json)
        .await
        .expect("count");
    assert_eq!(r.count.parse::<u64>().unwrap(), observed);
    // Synthetic patients nearly all have encounters in their last three years, hence a
    // period each; the few without one are never observed.
    assert!(
        unobserved < w.patients.len() / 10,
        "{unobserved} without a period"
    );
    sandbox.stop().await;
}

/// An upload whose index rows the engine could not hold (a date that is not a calendar
/// date, an observation period that ends before it starts) is refused whole, with an
/// error that names the row and not its value, and nothing of it is stored: counts and a
/// start from the database alone are as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_rows_the_engine_cannot_hold_are_refused_and_nothing_is_stored() {
    use brokerctl::ClientError;
    let mut sandbox = Sandbox::start().await;
    let w = sandbox.world(40, 9).await;
    let study = w
        .cast
        .approved_study("bad rows", &CATS, cohort())
        .await
        .expect("propose and approve");
    let before = exact(&w, &study).await;
    let mut bad_date = w.patients[1].clone();
    bad_date.1.index.conditions.push(model::CodedEvent {
        system: "snomed".into(),
        code: HYPERTENSION.into(),
        date: "2019-02-30".into(),
        value: None,
        unit: String::new(),
    });
    let mut reversed = w.patients[2].clone();
    reversed.1.index.observation_periods = vec![model::ObservationPeriod {
        start: "2012-03-04".into(),
        end: "2011-03-04".into(),
    }];
    for (bad, row) in [
        (bad_date, "condition row"),
        (reversed, "observation period 0: it ends before it starts"),
    ] {
        // A good patient first: the whole upload is refused, not just the bad patient.
        let upload = vec![w.patients[0].clone(), bad];
        let err = agent::ingest_batch(&w.cast.custodian, upload)
            .await
            .expect_err("refused");
        let ClientError::Status(status) = &err else {
            panic!("not a status: {err:?}");
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(row), "{status:?}");
        for value in ["2019-02-30", "2012-03-04", "2011-03-04"] {
            assert!(!status.message().contains(value), "{status:?}");
        }
    }
    assert_eq!(exact(&w, &study).await, before);
    let w = restart_from_the_database(&mut sandbox, w).await;
    assert_eq!(exact(&w, &study).await, before);
    sandbox.stop().await;
}
