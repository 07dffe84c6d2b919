//! The release path through real servers: only consenting patients' granted categories
//! reach the researcher, decrypted byte for byte; proxies that lie or are down are
//! detected; an acknowledged upload survives a restart; the data directory holds no
//! identifier or plaintext.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use broker::server::start_proxy;
use broker_cli::demo::{Cast, Tally};
use broker_proto::methods::PROXY_REENCRYPT as REENCRYPT;
use broker_proto::signed::signed;
use broker_proto::v1 as pb;
use brokerctl::ClientError;
use brokerctl::agent;
use integration_tests::tampered::{Tamper, Tampered, serve_on_loopback};
use integration_tests::{Sandbox, World, scan_for};
use model::CohortDefinition;
use model::Role;
use model::{Study, StudyProposal, Upload, UploadedEnvelope};
use pre_kms::{Category, Identity};
use proxy::ProxyNode;
use proxy::ProxyService;
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status};

const CATS: [Category; 3] = [
    Category::Demographics,
    Category::Conditions,
    Category::Observations,
];

fn proposal(w: &World, cohort: CohortDefinition) -> StudyProposal {
    let mut p = w.cast.proposal("test study", &CATS, cohort);
    p.not_after = broker::service::now_secs() + 3600;
    p
}

async fn approved_study(w: &World, cohort: CohortDefinition) -> Study {
    w.cast
        .approved_study("test study", &CATS, cohort)
        .await
        .expect("propose and approve")
}

/// Grants `categories` of each listed patient.
async fn grant(w: &World, study: &Study, who: &[usize], categories: &[Category]) {
    let list: Vec<_> = who
        .iter()
        .map(|&i| (w.patients[i].0.clone(), categories.to_vec()))
        .collect();
    w.cast
        .grant_all(study, &list, 100, |_| {})
        .await
        .expect("grant");
}

async fn fetch(w: &World, study: &Study) -> Result<Tally, ClientError> {
    Ok(w.cast.fetch(study).await?.1)
}

/// What the researcher must receive: these patients' records in these categories.
fn expected(w: &World, who: &[usize], categories: &[Category]) -> Tally {
    let mut want = Tally::default();
    for &i in who {
        want.add_record(&w.patients[i].1, categories);
    }
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_granted_categories_of_granting_patients_are_released() {
    let sandbox = Sandbox::start().await;
    let w = sandbox.world(24, 5).await;
    let study = approved_study(&w, CohortDefinition::everyone()).await;
    // Patients 0..8 grant everything, 8..16 only conditions, 16..24 nothing.
    let all: Vec<usize> = (0..8).collect();
    let cond: Vec<usize> = (8..16).collect();
    grant(&w, &study, &all, &CATS).await;
    grant(&w, &study, &cond, &[Category::Conditions]).await;
    let mut want = expected(&w, &all, &CATS);
    for &i in &cond {
        want.add_record(&w.patients[i].1, &[Category::Conditions]);
    }
    assert!(want.total() > 0);
    let got = fetch(&w, &study).await.expect("fetch");
    assert_eq!(
        got, want,
        "exactly the granted categories of granting patients"
    );

    // A cohort criterion narrows the release to matching patients only.
    let narrow =
        CohortDefinition::from_json(br#"{"criteria": [{"demographics": {"sex": ["female"]}}]}"#)
            .unwrap();
    let study2 = approved_study(&w, narrow).await;
    grant(&w, &study2, &all, &CATS).await;
    let got = fetch(&w, &study2).await.expect("fetch");
    let women: Vec<usize> = all
        .iter()
        .copied()
        .filter(|&i| w.patients[i].1.index.person.sex == "female")
        .collect();
    assert!(!women.is_empty() && women.len() < all.len());
    assert_eq!(got, expected(&w, &women, &CATS));
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_granted_or_released_for_a_study_the_board_has_not_approved() {
    let sandbox = Sandbox::start().await;
    let w = sandbox.world(4, 6).await;
    let study = w
        .cast
        .sponsor
        .propose_study(&proposal(&w, CohortDefinition::everyone()))
        .await
        .unwrap();
    // The agent refuses to plan a grant for it; a client that skips that check (as a
    // buggy or hostile agent would) is refused by the broker.
    let refused = agent::grant_plan(&w.cast.custodian, &w.cast.network, &study)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("not approved"), "{refused}");
    let plan = pre_kms::grant::GrantPlan {
        study_id: study.study_id.clone(),
        receiving_key: pre_kms::keys::public_key_from_bytes(&study.proposal.receiving_key).unwrap(),
        categories: study.proposal.categories.clone(),
        threshold: w.cast.network.threshold,
        expires_at: study.proposal.not_after,
        proxy_keys: w
            .cast
            .network
            .proxies
            .iter()
            .map(|p| p.encryption_key)
            .collect(),
    };
    let err = agent::grant_batch(
        &w.cast.custodian,
        &plan,
        vec![(w.patients[0].0.clone(), CATS.to_vec())],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status(s) if s.code() == Code::FailedPrecondition),
        "{err}"
    );
    let err = w
        .cast
        .researcher
        .request_release(&study.study_id)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status(s) if s.code() == Code::FailedPrecondition),
        "{err}"
    );

    let rejected = w
        .cast
        .board
        .decide_study(&study.study_id, false, false, "not justified")
        .await
        .unwrap();
    assert_eq!(rejected.status, model::StudyStatus::Rejected);
    let err = w
        .cast
        .researcher
        .request_release(&study.study_id)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status(s) if s.code() == Code::FailedPrecondition),
        "{err}"
    );

    // Another researcher cannot take an approved study's release.
    let study = approved_study(&w, CohortDefinition::everyone()).await;
    let other = sandbox.actor(Role::Researcher).await;
    let err = other.request_release(&study.study_id).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Status(s) if s.code() == Code::PermissionDenied),
        "{err}"
    );
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_uploads_and_grants_survive_a_restart() {
    let mut sandbox = Sandbox::start().await;
    let w = sandbox.world(10, 7).await;
    let study = approved_study(&w, CohortDefinition::everyone()).await;
    let who: Vec<usize> = (0..10).collect();
    grant(&w, &study, &who, &CATS).await;
    let before = fetch(&w, &study).await.unwrap();

    sandbox.restart_with(|_| {}).await;
    let researcher = sandbox.client(w.cast.researcher.identity().clone()).await;
    let w = World {
        cast: Cast {
            researcher,
            ..w.cast
        },
        ..w
    };
    let after = fetch(&w, &study).await.expect("release after restart");
    assert_eq!(before, after);
    assert_eq!(after, expected(&w, &who, &CATS));

    // Re-uploading the same records stores nothing new.
    let custodian = sandbox.client(w.cast.custodian.identity().clone()).await;
    let again = agent::ingest_batch(&custodian, w.patients.clone())
        .await
        .unwrap();
    assert_eq!(again.envelopes_stored, 0);
    assert!(again.envelopes_unchanged > 0);
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_holds_no_identifier_and_no_plaintext() {
    let sandbox = Sandbox::start().await;
    let w = sandbox.world(30, 8).await;
    let study = approved_study(&w, CohortDefinition::everyone()).await;
    grant(&w, &study, &(0..30).collect::<Vec<_>>(), &CATS).await;
    fetch(&w, &study).await.unwrap();
    let mut needles: Vec<String> = w
        .patients
        .iter()
        .flat_map(|(_, r)| r.identifiers.clone())
        .collect();
    assert!(
        needles.len() >= 30,
        "the generator gives every patient identifiers"
    );
    // Distinctive 40-byte windows of every plaintext research copy.
    for (_, r) in &w.patients {
        for plaintext in r.categories.values() {
            let text = String::from_utf8_lossy(plaintext);
            let mid = text.len() / 2;
            if let Some(window) = text.get(mid.saturating_sub(20)..(mid + 20).min(text.len())) {
                needles.push(window.to_owned());
            }
        }
    }
    let hits = scan_for(&sandbox.data_dir(), &needles);
    assert!(
        hits.is_empty(),
        "found in the data directory: {:?}",
        &hits[..hits.len().min(5)]
    );
    sandbox.stop().await;
}

// ------------------------------------------------------------------ lying proxies

/// A proxy that verifies and stores kfrags honestly but returns corrupted cfrags.
struct Liar;

#[tonic::async_trait]
impl Tamper for Liar {
    async fn reencrypt(
        &self,
        honest: &ProxyService,
        r: Request<pb::ReencryptRequest>,
    ) -> Result<Response<pb::ReencryptResponse>, Status> {
        let mut reply = pb::proxy_server::Proxy::reencrypt(honest, r).await?;
        for c in &mut reply.get_mut().cfrags {
            if let Some(b) = c.get_mut(40) {
                *b ^= 0x5a;
            }
        }
        Ok(reply)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_proxy_is_detected_and_fewer_than_t_honest_proxies_release_nothing() {
    let mut sandbox = Sandbox::start().await;
    // Replace the embedded proxies with two honest nodes and one liar, all on loopback.
    let dir = sandbox.dir.path().join("ext");
    let public = sandbox.fresh_broker_identity().public("broker");
    // The liar serves plain http on loopback; so do the others and the broker here.
    let honest0 = start_proxy(&dir.join("0"), 0, &public, true).await.unwrap();
    let liar_node = Arc::new(ProxyNode::open(&dir.join("1"), Identity::generate(), 1).unwrap());
    let liar_url = serve_on_loopback(Tampered {
        honest: ProxyService::new(liar_node.clone(), public.verifying_key),
        tamper: Liar,
    })
    .await;
    let honest2 = start_proxy(&dir.join("2"), 2, &public, true).await.unwrap();
    let urls = vec![honest0.url.clone(), liar_url.clone(), honest2.url.clone()];
    sandbox
        .restart_with(|c| {
            c.proxy_urls = urls;
            c.insecure_loopback = true;
        })
        .await;

    let w = sandbox.world(12, 9).await;
    let study = approved_study(&w, CohortDefinition::everyone()).await;
    let who: Vec<usize> = (0..12).collect();
    grant(&w, &study, &who, &CATS).await;
    assert!(
        liar_node.kfrag_count().unwrap() > 0,
        "the liar holds kfrags like the others"
    );
    // The broker discards the liar's fragments and uses the two honest proxies.
    let got = fetch(&w, &study)
        .await
        .expect("release despite a lying proxy");
    assert_eq!(got, expected(&w, &who, &CATS));

    // With one honest proxy down, only one honest fragment per envelope exists: below
    // the threshold, nothing is released.
    honest2.stop().await;
    let got = fetch(&w, &study).await.expect("release completes");
    assert_eq!(
        got.total(),
        0,
        "fewer than t honest proxies must release nothing"
    );
    honest0.stop().await;
    sandbox.stop().await;
}

// ------------------------------------------------------------------ withdrawal

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_grants_and_dropped_categories_are_destroyed_at_every_proxy() {
    let sandbox = Sandbox::start().await;
    let w = sandbox.world(5, 33).await;
    let study = approved_study(&w, CohortDefinition::everyone()).await;
    let who: Vec<usize> = (0..5).collect();
    grant(&w, &study, &who, &CATS).await;
    assert_eq!(
        sandbox.kfrag_counts(),
        vec![15; 3],
        "5 patients x 3 categories"
    );

    // Patient 0 re-grants without observations: that kfrag dies at every proxy.
    grant(&w, &study, &[0], &CATS[..2]).await;
    assert_eq!(sandbox.kfrag_counts(), vec![14; 3]);

    // Patients 1 and 2 withdraw: their kfrags are destroyed everywhere, the next release
    // leaves them out.
    let refs: Vec<(String, String)> = [1, 2]
        .iter()
        .map(|&i| (study.study_id.clone(), w.patients[i].0.pseudonym()))
        .collect();
    let (withdrawn, confirmed) = w
        .cast
        .custodian
        .withdraw_grants(&refs, "consent revoked")
        .await
        .unwrap();
    assert_eq!((withdrawn, confirmed), (2, 3));
    assert_eq!(sandbox.kfrag_counts(), vec![8; 3]);
    let got = fetch(&w, &study).await.unwrap();
    let mut want = expected(&w, &[3, 4], &CATS);
    want.add_record(&w.patients[0].1, &CATS[..2]);
    assert_eq!(got, want);

    // Only whoever acts for a patient may withdraw their grants.
    let stranger = sandbox.actor(Role::Custodian).await;
    let err = stranger.withdraw_grants(&refs[..1], "").await.unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    sandbox.stop().await;
}

// ------------------------------------------------------------------ unlogged releases

/// How [`Forger`] alters the broker's re-encryption requests before an honest proxy
/// sees them.
const PASS: u8 = 0;
const NO_CHECKPOINT: u8 = 1;
const NO_EVENTS: u8 = 2;
const OTHER_RELEASE: u8 = 3;
const FOREIGN_SIGNATURE: u8 = 4;

/// An honest proxy behind a man in the middle that strips or swaps the log evidence and
/// re-signs the request with the broker's key, as a broker skipping the log would. It
/// notes each answer's status code.
struct Forger {
    mode: Arc<AtomicU8>,
    broker: Identity,
    codes: Arc<std::sync::Mutex<Vec<Code>>>,
}

#[tonic::async_trait]
impl Tamper for Forger {
    async fn reencrypt(
        &self,
        honest: &ProxyService,
        r: Request<pb::ReencryptRequest>,
    ) -> Result<Response<pb::ReencryptResponse>, Status> {
        let mode = self.mode.load(Ordering::SeqCst);
        let r = if mode == PASS {
            r
        } else {
            let mut body = r.into_inner();
            match mode {
                NO_CHECKPOINT => body.checkpoint.clear(),
                NO_EVENTS => body.events.clear(),
                OTHER_RELEASE => body.release_id = "rel-000000000000000000000000".into(),
                _ => {
                    let mut c = audit_log::SignedCheckpoint::from_note(&body.checkpoint).unwrap();
                    c.signatures.clear();
                    c.cosign(&Identity::generate()).unwrap();
                    body.checkpoint = c.to_note().unwrap();
                }
            }
            signed(&self.broker, REENCRYPT, body)
        };
        let answer = pb::proxy_server::Proxy::reencrypt(honest, r).await;
        let code = answer.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        self.codes.lock().unwrap().push(code);
        answer
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_refuse_a_release_that_is_not_in_the_access_log() {
    let mut sandbox = Sandbox::start().await;
    let dir = sandbox.dir.path().join("ext");
    let broker_id = sandbox.fresh_broker_identity();
    let public = broker_id.public("broker");
    let mode = Arc::new(AtomicU8::new(PASS));
    let codes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut urls = Vec::new();
    for i in 0..3u32 {
        let node =
            Arc::new(ProxyNode::open(&dir.join(i.to_string()), Identity::generate(), i).unwrap());
        let forger = Forger {
            mode: mode.clone(),
            broker: broker_id.clone(),
            codes: codes.clone(),
        };
        urls.push(
            serve_on_loopback(Tampered {
                honest: ProxyService::new(node, public.verifying_key),
                tamper: forger,
            })
            .await,
        );
    }
    // The man in the middle serves plain http on loopback; so does the broker here.
    sandbox
        .restart_with(|c| {
            c.proxy_urls = urls;
            c.insecure_loopback = true;
        })
        .await;

    let w = sandbox.world(6, 21).await;
    let study = approved_study(&w, CohortDefinition::everyone()).await;
    let who: Vec<usize> = (0..6).collect();
    grant(&w, &study, &who, &CATS).await;
    for (m, what) in [
        (NO_CHECKPOINT, "no checkpoint"),
        (NO_EVENTS, "no logged events"),
        (OTHER_RELEASE, "events of another release"),
        (FOREIGN_SIGNATURE, "a checkpoint not signed by the broker"),
    ] {
        mode.store(m, Ordering::SeqCst);
        let got = fetch(&w, &study).await.expect("release completes");
        assert_eq!(got.total(), 0, "re-encrypted with {what}");
        // Refused for the missing proof, not for a bad request signature.
        let seen = std::mem::take(&mut *codes.lock().unwrap());
        let want = if m == NO_EVENTS {
            Code::Ok
        } else {
            Code::FailedPrecondition
        };
        assert!(
            !seen.is_empty() && seen.iter().all(|c| *c == want),
            "{what}: proxies answered {seen:?}"
        );
    }
    mode.store(PASS, Ordering::SeqCst);
    let got = fetch(&w, &study).await.expect("logged release");
    assert_eq!(got, expected(&w, &who, &CATS));
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_capsule_withholds_only_its_own_envelope() {
    let sandbox = Sandbox::start().await;
    let w = sandbox.world(6, 10).await;
    // A new version of a patient's conditions whose capsule is damaged but whose framing
    // is intact: accepted at upload (the broker checks framing only).
    let damaged = w
        .patients
        .iter()
        .position(|(_, r)| r.categories.contains_key(&Category::Conditions))
        .expect("someone has conditions");
    let (patient, record) = &w.patients[damaged];
    let plaintext = &record.categories[&Category::Conditions];
    let mut sealed = pre_kms::envelope::seal(
        &patient.category_public_key(Category::Conditions),
        plaintext,
    )
    .unwrap();
    sealed[8 + 12] ^= 0xff;
    let reply = w
        .cast
        .custodian
        .upload(Upload {
            envelopes: vec![UploadedEnvelope {
                pseudonym: patient.pseudonym(),
                category: Category::Conditions,
                sealed,
                content_tag: vec![7; 32],
            }],
            index: vec![],
        })
        .await
        .expect("framing is valid");
    assert_eq!(reply.receipts[0].version, 2);

    let study = approved_study(&w, CohortDefinition::everyone()).await;
    let who: Vec<usize> = (0..6).collect();
    grant(&w, &study, &who, &CATS).await;
    let got = fetch(&w, &study).await.expect("the release goes on");
    let mut want = Tally::default();
    for (i, (_, r)) in w.patients.iter().enumerate() {
        let categories: Vec<Category> = CATS
            .iter()
            .copied()
            .filter(|c| i != damaged || *c != Category::Conditions)
            .collect();
        want.add_record(r, &categories);
    }
    assert_eq!(got, want, "everything but the damaged envelope");

    // Bad framing is refused at upload with a clear error, and nothing is stored.
    let err = w
        .cast
        .custodian
        .upload(Upload {
            envelopes: vec![UploadedEnvelope {
                pseudonym: patient.pseudonym(),
                category: Category::Conditions,
                sealed: b"not an envelope".to_vec(),
                content_tag: vec![8; 32],
            }],
            index: vec![],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status(s) if s.code() == Code::InvalidArgument && s.message().contains("envelope 0")),
        "{err}"
    );
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_refuses_other_proxies_than_its_grants_were_sealed_to() {
    let mut sandbox = Sandbox::start().await;
    let w = sandbox.world(2, 12).await;
    let study = approved_study(&w, CohortDefinition::everyone()).await;
    grant(&w, &study, &[0, 1], &CATS).await;
    if let Some(r) = sandbox.running.take() {
        r.stop().await;
    }
    // Three new proxy nodes, unknown to the grants already sealed.
    let broker_key =
        broker::server::load_or_create_identity(&sandbox.data_dir().join("broker.key"), "broker")
            .unwrap()
            .public("broker");
    let mut others = Vec::new();
    for i in 0..3 {
        others.push(
            start_proxy(
                &sandbox.dir.path().join(format!("other{i}")),
                i,
                &broker_key,
                false,
            )
            .await
            .unwrap(),
        );
    }
    let mut config = broker::server::ServeConfig::new(sandbox.data_dir());
    config.proxy_urls = others.iter().map(|p| p.url.clone()).collect();
    config.proxy_certs = (0..3)
        .map(|i| sandbox.dir.path().join(format!("other{i}")).join("tls.crt"))
        .collect();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = broker::server::start(listener, config, std::future::pending()).await;
    let Err(e) = refused else {
        panic!("a broker started with proxies its grants were not sealed to")
    };
    assert!(
        e.to_string()
            .contains("not the ones this data directory's grants were sealed to"),
        "{e}"
    );
    for p in others {
        p.stop().await;
    }
    // With its own proxies it starts again and still releases.
    sandbox.restart_with(|_| {}).await;
    let researcher = sandbox.client(w.cast.researcher.identity().clone()).await;
    let w = World {
        cast: Cast {
            researcher,
            ..w.cast
        },
        ..w
    };
    assert_eq!(
        fetch(&w, &study).await.unwrap(),
        expected(&w, &[0, 1], &CATS)
    );
    sandbox.stop().await;
}

/// A custodian's re-import through its keystore: the second import derives no category
/// key and sends no enrollment (the keystore remembers both), and stores nothing new; the
/// same keystore against a broker that has never seen the patients (its hint of enrollment
/// wrong) enrolls them on the way and stores everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimport_through_the_keystore_redoes_no_key_derivation_and_no_enrollment() {
    use brokerctl::Keystore;
    let dir = tempfile::tempdir().unwrap();
    let keystore_path = dir.path().join("keystore.db");
    let population = datasets::Population::new(17, 30);
    let records: Vec<datasets::PatientRecord> = (0..30).map(|i| population.patient(i)).collect();
    let envelopes: usize = records.iter().map(|r| r.categories.len()).sum();

    async fn import(
        custodian: &brokerctl::BrokerClient,
        keystore: &std::path::Path,
        records: &[datasets::PatientRecord],
    ) -> agent::IngestReport {
        let ks = Keystore::open(keystore).unwrap();
        let batch: Vec<(Identity, datasets::PatientRecord, agent::Known)> = records
            .iter()
            .map(|r| {
                let (id, _) = ks.get_or_create(&r.source_id).unwrap();
                let known = ks.known(&id).unwrap();
                (id, r.clone(), known)
            })
            .collect();
        // Two batches, as the CLI pipelines them.
        let (first, second) = batch.split_at(batch.len() / 2);
        let mut learned = Vec::new();
        let report = agent::ingest_all_known(
            custodian,
            [first.to_vec(), second.to_vec()].map(Ok::<_, ClientError>),
            |_| {},
            |l| learned.extend(l),
        )
        .await
        .expect("import");
        ks.record_learned(&learned).unwrap();
        report
    }

    let sandbox = Sandbox::start().await;
    let cast = sandbox.cast().await;
    let first = import(&cast.custodian, &keystore_path, &records).await;
    assert_eq!(
        (
            first.keys_derived,
            first.enrollments_sent,
            first.newly_enrolled
        ),
        (30, 30, 30)
    );
    assert_eq!(first.envelopes_stored, envelopes);
    let again = import(&cast.custodian, &keystore_path, &records).await;
    assert_eq!(
        (
            again.keys_derived,
            again.enrollments_sent,
            again.newly_enrolled
        ),
        (0, 0, 0)
    );
    assert_eq!(
        (again.envelopes_stored, again.envelopes_unchanged),
        (0, envelopes)
    );
    sandbox.stop().await;

    // Another broker: the keystore's enrollments are not its; the import still goes in.
    let other = Sandbox::start().await;
    let cast = other.cast().await;
    let elsewhere = import(&cast.custodian, &keystore_path, &records).await;
    assert_eq!(
        (
            elsewhere.keys_derived,
            elsewhere.enrollments_sent,
            elsewhere.newly_enrolled
        ),
        (0, 30, 30)
    );
    assert_eq!(elsewhere.envelopes_stored, envelopes);
    other.stop().await;
}
