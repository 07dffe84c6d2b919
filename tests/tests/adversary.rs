//! The trust model held against the parties it distrusts, each played for real: a broker
//! that lies to the patient's agent and to the board (its operator rewrote its own
//! database, or restarted it with proxies of its own), a sponsor that picks the key the
//! records go to, a network that captures and replays requests and deposits, and anyone
//! at all calling without credentials. Each test says which promise it breaks if it
//! fails (docs/THREAT_MODEL.md lists them).

use broker_cli::demo::Cast;
use broker_proto::methods as m;
use broker_proto::signed::signed;
use broker_proto::v1 as pb;
use brokerctl::{ClientError, agent};
use datasets::Population;
use integration_tests::hostile::HostileReleases;
use integration_tests::{Sandbox, World};
use model::{CohortDefinition, Role, Study, Upload, UploadedEnvelope};
use pre_kms::grant::{self, Grant};
use pre_kms::{Category, Identity};
use tonic::Code;

const CATS: [Category; 2] = [Category::Demographics, Category::Conditions];

fn db(sandbox: &Sandbox) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(sandbox.data_dir().join("broker.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    db
}

fn count(db: &rusqlite::Connection, table: &str) -> i64 {
    db.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

/// The custodian's agent, pinned to the honest network, tries to grant every patient to
/// `study` as the broker lists it; the error it gives.
async fn agent_grants(w: &World, study: &Study) -> Result<usize, ClientError> {
    let study = w.cast.custodian.get_study(&study.study_id).await?;
    let list: Vec<_> = w
        .patients
        .iter()
        .map(|(id, _)| (id.clone(), CATS.to_vec()))
        .collect();
    let plan = agent::grant_plan(&w.cast.custodian, &w.cast.network, &study).await?;
    agent::grant_batch(&w.cast.custodian, &plan, list).await
}

fn rewrite_study(sandbox: &Sandbox, study_id: &str, sql_set: &str, param: &dyn rusqlite::ToSql) {
    let n = db(sandbox)
        .execute(
            &format!("UPDATE studies SET {sql_set} WHERE study_id = ?2"),
            rusqlite::params![param, study_id],
        )
        .unwrap();
    assert_eq!(n, 1);
}

/// Promise: the agent grants only to studies a pinned board approved, as proposed.
/// Adversary: the broker (its operator edits its database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_broker_gets_no_grant_for_an_approval_the_board_did_not_sign() {
    let sandbox = Sandbox::start().await;
    let w = sandbox.world(4, 41).await;
    let proposal = w.cast.proposal("liar", &CATS, CohortDefinition::everyone());

    // 1. A study the board never saw, listed as approved with no signature.
    let unsigned = w.cast.sponsor.propose_study(&proposal).await.unwrap();
    let board_id = w.cast.board.identity().actor_id();
    rewrite_study(
        &sandbox,
        &unsigned.study_id,
        "status = 'approved', board_id = ?1",
        &board_id,
    );
    let err = agent_grants(&w, &unsigned).await.unwrap_err().to_string();
    assert!(err.contains("valid signature"), "{err}");

    // 2. A valid signature, by a board key the network does not pin (the broker
    // registered a board of its own).
    let rogue = sandbox.actor(Role::Board).await;
    let rogue_study = w.cast.sponsor.propose_study(&proposal).await.unwrap();
    rogue
        .decide_study(&rogue_study.study_id, true, false, "ok")
        .await
        .unwrap();
    let err = agent_grants(&w, &rogue_study)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a board this network pins"), "{err}");

    // 3. A real approval, then the broker swaps the receiving key for one it holds.
    let real = w.cast.approve(&proposal, false).await.unwrap();
    let mut swapped = real.proposal.clone();
    swapped.receiving_key =
        pre_kms::keys::public_key_bytes(&Identity::generate().encryption_public_key());
    let json = serde_json::to_string(&swapped).unwrap();
    rewrite_study(&sandbox, &real.study_id, "proposal = ?1", &json);
    let err = agent_grants(&w, &real).await.unwrap_err().to_string();
    assert!(err.contains("valid signature"), "{err}");

    // 4. ... or widens the study's categories after approval.
    let real2 = w.cast.approve(&proposal, false).await.unwrap();
    let mut wider = real2.proposal.clone();
    wider.categories.push(Category::MentalHealth);
    let json = serde_json::to_string(&wider).unwrap();
    rewrite_study(&sandbox, &real2.study_id, "proposal = ?1", &json);
    let err = agent_grants(&w, &real2).await.unwrap_err().to_string();
    assert!(err.contains("valid signature"), "{err}");

    // Nothing was issued for any of them; the honest approval still grants.
    assert_eq!(count(&db(&sandbox), "grants"), 0);
    assert_eq!(sandbox.kfrag_counts(), vec![0, 0, 0]);
    let honest = w.cast.approve(&proposal, false).await.unwrap();
    assert_eq!(agent_grants(&w, &honest).await.unwrap(), 4);
    sandbox.stop().await;
}

/// Promise: kfrags go only to the pinned proxies with the pinned threshold.
/// Adversary: the broker, restarted with proxies of its own and threshold 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_broker_with_its_own_proxies_and_threshold_one_gets_no_grant() {
    let mut sandbox = Sandbox::start().await;
    let w = sandbox.world(3, 42).await;
    let study = w
        .cast
        .approved_study("own proxies", &CATS, CohortDefinition::everyone())
        .await
        .unwrap();
    // The operator forgets the proxies the grants were sealed to and runs one of its own.
    let broker_key = sandbox.running.as_ref().unwrap().public.clone();
    let own = broker::server::start_proxy(&sandbox.dir.path().join("own"), 0, &broker_key, false)
        .await
        .unwrap();
    let own_cert = sandbox.dir.path().join("own").join("tls.crt");
    if let Some(r) = sandbox.running.take() {
        r.stop().await;
    }
    db(&sandbox).execute("DELETE FROM proxies", []).unwrap();
    let url = own.url.clone();
    sandbox
        .restart_with(move |c| {
            c.proxy_urls = vec![url];
            c.proxy_certs = vec![own_cert];
            c.threshold = 1;
        })
        .await;
    let custodian = sandbox.client(w.cast.custodian.identity().clone()).await;
    let w = World {
        cast: Cast {
            custodian,
            ..w.cast
        },
        ..w
    };
    let err = agent_grants(&w, &study).await.unwrap_err().to_string();
    assert!(
        err.contains("not the 3 proxies with threshold 2 of the pinned network"),
        "{err}"
    );
    assert_eq!(
        own.node.kfrag_count().unwrap(),
        0,
        "nothing sealed to the liar's proxy"
    );
    assert_eq!(count(&db(&sandbox), "grants"), 0);
    own.stop().await;
    sandbox.stop().await;
}

/// Promise: records are re-encrypted only to the named researcher's own key.
/// Adversary: the sponsor (and a broker that would list its choice to the board).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sponsor_cannot_choose_who_decrypts() {
    let sandbox = Sandbox::start().await;
    let w = sandbox.world(2, 43).await;
    let sponsor_key = w.cast.sponsor.identity().encryption_public_key();
    let mut proposal = w
        .cast
        .proposal("sponsor's key", &CATS, CohortDefinition::everyone());
    proposal.receiving_key = pre_kms::keys::public_key_bytes(&sponsor_key);
    // The broker refuses the pairing.
    let err = w.cast.sponsor.propose_study(&proposal).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Status(s) if s.code() == Code::InvalidArgument
            && s.message().contains("not researcher")),
        "{err}"
    );
    // A broker that lets it through anyway (its database rewritten): the board's client
    // checks the researcher's key binding itself and refuses to sign.
    let honest = w
        .cast
        .sponsor
        .propose_study(
            &w.cast
                .proposal("honest", &CATS, CohortDefinition::everyone()),
        )
        .await
        .unwrap();
    let json = serde_json::to_string(&proposal).unwrap();
    rewrite_study(&sandbox, &honest.study_id, "proposal = ?1", &json);
    let err = w
        .cast
        .board
        .decide_study(&honest.study_id, true, false, "ok")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("refusing to approve"), "{err}");
    assert!(err.contains("not researcher"), "{err}");
    // A researcher registered without proof of its key is refused.
    let id = Identity::generate();
    let mut public = id.public("researcher");
    public.key_binding = None;
    let err = sandbox
        .operator()
        .await
        .register_actor(Role::Researcher, "no proof", "Org", &public)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status(s) if s.code() == Code::InvalidArgument),
        "{err}"
    );
    sandbox.stop().await;
}

/// A TLS endpoint of each running proxy, its certificate pinned.
fn proxy_endpoints(sandbox: &Sandbox) -> Vec<tonic::transport::Endpoint> {
    sandbox
        .running
        .as_ref()
        .unwrap()
        .proxies
        .iter()
        .map(|p| p.client_tls.endpoint(&p.url).unwrap())
        .collect()
}

fn deposit_request(
    sandbox: &Sandbox,
    g: &Grant,
    patient: &Identity,
    study: &Study,
    proxy: usize,
) -> pb::DepositRequest {
    let _ = sandbox;
    pb::DepositRequest {
        deposits: g
            .categories
            .iter()
            .map(|c| pb::KfragDeposit {
                grant_id: g.grant_id.clone(),
                study_id: g.study_id.clone(),
                pseudonym: g.pseudonym.clone(),
                category: c.category.label().to_owned(),
                expires_at: g.expires_at,
                patient_verifying_key: pre_kms::keys::public_key_bytes(&patient.verifying_key()),
                delegating_key: pre_kms::keys::public_key_bytes(
                    &patient.category_public_key(c.category),
                ),
                receiving_key: study.proposal.receiving_key.clone(),
                sealed_kfrag: c.sealed_kfrags[proxy].clone(),
            })
            .collect(),
    }
}

/// Promise: a revoked grant stays revoked at the proxies.
/// Adversary: the broker (re-signs a captured deposit) and the network (replays it byte
/// for byte), before and after the proxies restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_deposit_resent_after_revocation_restores_nothing() {
    let mut sandbox = Sandbox::start().await;
    let w = sandbox.world(1, 44).await;
    let study = w
        .cast
        .approved_study("revocation", &CATS, CohortDefinition::everyone())
        .await
        .unwrap();
    let patient = w.patients[0].0.clone();
    let plan = agent::grant_plan(&w.cast.custodian, &w.cast.network, &study)
        .await
        .unwrap();
    let captured = grant::issue(&patient, &plan).unwrap();
    w.cast
        .custodian
        .issue_grants(vec![captured.clone()])
        .await
        .unwrap();
    assert_eq!(sandbox.kfrag_counts(), vec![2, 2, 2]);
    w.cast
        .custodian
        .withdraw_grants(&[(study.study_id.clone(), patient.pseudonym())], "revoked")
        .await
        .unwrap();
    assert_eq!(sandbox.kfrag_counts(), vec![0, 0, 0]);

    let broker =
        broker::server::load_or_create_identity(&sandbox.data_dir().join("broker.key"), "broker")
            .unwrap();
    let urls = proxy_endpoints(&sandbox);
    // The broker re-signs the captured deposit and sends it to each proxy.
    let mut replays = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let mut client = pb::proxy_client::ProxyClient::new(url.connect().await.unwrap());
        let req = signed(
            &broker,
            m::PROXY_DEPOSIT,
            deposit_request(&sandbox, &captured, &patient, &study, i),
        );
        replays.push((req.metadata().clone(), req.get_ref().clone()));
        let err = client.deposit(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "proxy {i}: {err:?}");
        assert!(err.message().contains("revoked"), "{}", err.message());
    }
    // The broker's own API refuses to restore it too: the proxies turn it down.
    assert!(
        w.cast
            .custodian
            .issue_grants(vec![captured.clone()])
            .await
            .is_err()
    );
    assert_eq!(sandbox.kfrag_counts(), vec![0, 0, 0]);

    // After a restart of broker and proxies: the byte-for-byte replay is refused before
    // it is read, a fresh re-signing is refused by the durable tombstones.
    sandbox.restart_with(|_| {}).await;
    let urls = proxy_endpoints(&sandbox);
    for (i, ((md, body), url)) in replays.into_iter().zip(&urls).enumerate() {
        let mut client = pb::proxy_client::ProxyClient::new(url.connect().await.unwrap());
        let mut again = tonic::Request::new(body.clone());
        *again.metadata_mut() = md;
        let err = client.deposit(again).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "proxy {i}: {err:?}");
        let err = client
            .deposit(signed(&broker, m::PROXY_DEPOSIT, body))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "proxy {i}: {err:?}");
    }
    assert_eq!(sandbox.kfrag_counts(), vec![0, 0, 0]);
    for p in &sandbox.running.as_ref().unwrap().proxies {
        assert!(p.node.destroyed_grant_count().unwrap() >= 1);
    }
    // The patient's new grant, issued after the revocation, is taken.
    let custodian = sandbox.client(w.cast.custodian.identity().clone()).await;
    let fresh = grant::issue(&patient, &plan).unwrap();
    custodian.issue_grants(vec![fresh]).await.unwrap();
    assert_eq!(sandbox.kfrag_counts(), vec![2, 2, 2]);
    // And an older grant, issued before it but never delivered, cannot replace it.
    let older = grant::issue_with_rng(
        &mut rand::rngs::OsRng,
        &patient,
        &plan,
        pre_kms::request_auth::now_ms() - 60_000,
    )
    .unwrap();
    assert!(custodian.issue_grants(vec![older]).await.is_err());
    assert_eq!(sandbox.kfrag_counts(), vec![2, 2, 2]);
    sandbox.stop().await;
}

/// Promise: a captured request does not work again, even after a restart; and an old
/// upload never rolls a record back.
/// Adversary: the network (captures and replays), a late or repeated upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_upload_replayed_after_a_restart_is_refused_and_nothing_rolls_back() {
    let mut sandbox = Sandbox::start().await;
    let cast = sandbox.cast().await;
    let patient = Identity::generate();
    let record = Population::new(45, 1).patient(0);
    agent::ingest_batch(&cast.custodian, vec![(patient.clone(), record.clone())])
        .await
        .unwrap();
    let correct = |text: &[u8]| -> Upload {
        let key = patient.category_public_key(Category::Conditions);
        Upload {
            envelopes: vec![UploadedEnvelope {
                pseudonym: patient.pseudonym(),
                category: Category::Conditions,
                sealed: pre_kms::envelope::seal(&key, text).unwrap(),
                content_tag: patient.content_tag(Category::Conditions, text).to_vec(),
            }],
            index: vec![(patient.pseudonym(), record.index.clone())],
        }
    };
    // The capture is of an upload (version v2); version v2 + 1 corrects it.
    let upload = broker_proto::convert::upload_to_pb(correct(b"{\"v\":2}"));
    let captured = signed(cast.custodian.identity(), m::UPLOAD, upload);
    let (md, body) = (captured.metadata().clone(), captured.get_ref().clone());
    let channel = sandbox.channel().await;
    let mut records = pb::records_client::RecordsClient::new(channel);
    let first = records.upload(captured).await.unwrap().into_inner();
    let v2 = first.receipts[0].version;
    assert!(!first.receipts[0].unchanged);
    let v3 = cast.custodian.upload(correct(b"{\"v\":3}")).await.unwrap();
    assert_eq!(v3.receipts[0].version, v2 + 1);
    // The same bytes again, now and after a restart.
    let mut again = tonic::Request::new(body.clone());
    *again.metadata_mut() = md.clone();
    let err = records.upload(again).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("replayed"), "{}", err.message());
    sandbox.restart_with(|_| {}).await;
    let channel = sandbox.channel().await;
    let mut records = pb::records_client::RecordsClient::new(channel);
    let mut again = tonic::Request::new(body);
    *again.metadata_mut() = md;
    let err = records.upload(again).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("before this server started"),
        "{}",
        err.message()
    );
    // Version 2's content sent anew (a late retry): stored already, not a new version.
    let custodian = sandbox.client(cast.custodian.identity().clone()).await;
    let late = custodian.upload(correct(b"{\"v\":2}")).await.unwrap();
    assert!(late.receipts[0].unchanged);
    assert_eq!(late.receipts[0].version, v2);
    let latest: u32 = db(&sandbox)
        .query_row(
            "SELECT MAX(version) FROM envelopes WHERE pseudonym = ?1 AND category = 'conditions'",
            [patient.pseudonym()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(latest, v2 + 1, "the correction stands");
    sandbox.stop().await;
}

/// Promise: the log records what happened, and only that: anonymous calls do not grow it
/// call by call, and are never written in a registered actor's name.
/// Adversary: anyone on the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_anonymous_calls_do_not_add_a_thousand_leaves() {
    let sandbox = Sandbox::start().await;
    let board = sandbox.actor(Role::Board).await;
    let size = |c: pb::CheckpointResponse| {
        audit_log::SignedCheckpoint::from_note(&c.checkpoint)
            .unwrap()
            .checkpoint
            .size
    };
    let before = size(board.log_checkpoint().await.unwrap());
    let channel = sandbox.channel().await;
    let mut studies = pb::studies_client::StudiesClient::new(channel);
    let victim = board.identity().actor_id();
    for i in 0..1000 {
        let mut req = tonic::Request::new(pb::ListStudiesRequest {});
        if i % 2 == 0 {
            // Claims to be the board member, with a forged signature.
            let forged = signed(
                &Identity::generate(),
                m::LIST_STUDIES,
                pb::ListStudiesRequest {},
            );
            *req.metadata_mut() = forged.metadata().clone();
            req.metadata_mut()
                .insert(pre_kms::request_auth::ACTOR, victim.parse().unwrap());
        }
        assert_eq!(
            studies.list(req).await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    let running = sandbox.running.as_ref().unwrap();
    let written = running.broker.flush_refusals().unwrap();
    assert_eq!(written, 2, "one event per method and reason");
    let after = size(board.log_checkpoint().await.unwrap());
    assert_eq!(after - before, 2, "two leaves for a thousand calls");
    let events = brokerctl::log_review::board_events(&board, Default::default())
        .await
        .unwrap();
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e.event.kind == audit_log::EventKind::AuthorizationFailed)
        .collect();
    assert_eq!(
        refused
            .iter()
            .map(|e| e.event.details.record_count.unwrap())
            .sum::<u64>(),
        1000
    );
    for e in refused {
        assert_ne!(
            e.event.actor.id, victim,
            "never in the claimed actor's name"
        );
        assert_eq!(
            e.event.actor.role,
            audit_log::event::ActorRole::Unauthenticated
        );
    }
    sandbox.stop().await;
}

/// Promise: one process per data directory. Adversary: an operator's mistake (two
/// brokers on one directory overwrite each other's log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_the_same_directory_refuses_to_start() {
    let sandbox = Sandbox::start().await;
    let mut config = broker::server::ServeConfig::new(sandbox.data_dir());
    config.operator = Some(sandbox.operator.public("operator"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let Err(e) = broker::server::start(listener, config, std::future::pending()).await else {
        panic!("a second broker started on a directory in use");
    };
    assert!(e.to_string().contains("in use by another process"), "{e}");
    // The first one is unharmed.
    assert!(sandbox.operator().await.list_actors().await.is_ok());
    sandbox.stop().await;
}

/// Promise: the agent decides grants on the patient's newest consent.
/// Adversary: the broker, which hides the newest (narrower) version it stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_hiding_the_newest_consent_gets_no_grant() {
    use brokerctl::consent_heads::HeadStore;
    let sandbox = Sandbox::start().await;
    let w = sandbox.world(1, 46).await;
    let keystore = brokerctl::Keystore::open(&sandbox.dir.path().join("keystore.db")).unwrap();
    let patient = w.patients[0].0.clone();
    // The agent's own record of what it set: version 2 revokes everything.
    let history = agent::consent_history(&w.cast.custodian, &patient)
        .await
        .unwrap();
    let revoke = consent_policy::PolicyDraft::revocation(
        agent::next_version(&history),
        broker::service::now_secs(),
    )
    .check()
    .unwrap();
    let receipts = agent::set_consents(&w.cast.custodian, &[(patient.clone(), revoke)])
        .await
        .unwrap();
    keystore.record(&receipts).unwrap();
    let head = keystore
        .head(&patient.pseudonym())
        .unwrap()
        .expect("recorded");
    assert!(
        agent::consent_history_checked(&w.cast.custodian, &patient, Some(&head))
            .await
            .is_ok(),
        "the honest history holds the newest version"
    );
    // The broker drops it from what it serves.
    let n = db(&sandbox)
        .execute(
            "DELETE FROM consents WHERE pseudonym = ?1 AND version = ?2",
            rusqlite::params![patient.pseudonym(), head.version],
        )
        .unwrap();
    assert_eq!(n, 1);
    let err = agent::consent_history_checked(&w.cast.custodian, &patient, Some(&head))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("hiding the newest consent"), "{err}");
    sandbox.stop().await;
}

/// Promise: a caller who cannot be who it claims gets no large body decoded.
/// Adversary: anyone on the network, sending 48 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_from_an_unknown_caller_is_refused_before_it_is_decoded() {
    let sandbox = Sandbox::start().await;
    let board = sandbox.actor(Role::Board).await;
    let channel = sandbox.channel().await;
    let mut records =
        pb::records_client::RecordsClient::new(channel).max_encoding_message_size(64 << 20);
    let big = pb::UploadRequest {
        envelopes: vec![pb::Envelope {
            sealed: vec![7u8; 48 << 20],
            ..Default::default()
        }],
        ..Default::default()
    };
    let stranger = Identity::generate();
    let err = records
        .upload(signed(&stranger, m::UPLOAD, big))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("unknown actor"), "{}", err.message());
    sandbox
        .running
        .as_ref()
        .unwrap()
        .broker
        .flush_refusals()
        .unwrap();
    let events = brokerctl::log_review::board_events(&board, Default::default())
        .await
        .unwrap();
    assert!(
        events.iter().any(
            |e| e.event.kind == audit_log::EventKind::AuthorizationFailed
                && e.event.why.purpose.as_deref() == Some("call (before the body was read)")
        ),
        "refused by the check before decoding"
    );
    assert!(
        !events
            .iter()
            .any(|e| e.event.why.purpose.as_deref() == Some(&*format!("call {}", m::UPLOAD))),
        "the handler, which runs after decoding, never saw the call"
    );
    sandbox.stop().await;
}

/// Promise: a release is written only inside the researcher's output directory.
/// Adversary: the broker, naming subjects like paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_subjects_never_reach_the_researchers_disk() {
    for subject in [
        "../../escape",
        "/etc/passwd",
        "a/b",
        "..",
        "",
        "-rf",
        "sub\u{0}x",
    ] {
        let (client, server) = integration_tests::hostile_broker(
            HostileReleases::with_subjects(&[subject]),
            Identity::generate(),
        )
        .await;
        let researcher = Identity::generate();
        let mut written = 0;
        let err = agent::fetch_and_decrypt(&client, &researcher, "st-x", |_| {
            written += 1;
            Ok(())
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a plain name"), "{subject:?}: {err}");
        assert_eq!(written, 0, "{subject:?}: nothing handed to the writer");
        server.abort();
    }
    // The plain subjects the broker makes pass.
    assert!(agent::check_subject("sub-0123456789abcdef01234567").is_ok());
}

/// Promise: clients talk only to the server whose certificate they pinned, and never in
/// plain text unless told to for a loopback test.
/// Adversary: the network (a server that is not the broker, a downgrade to http).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_a_server_it_did_not_pin_and_plain_http() {
    let sandbox = Sandbox::start().await;
    assert!(sandbox.url.starts_with("https://"), "{}", sandbox.url);
    let other = tempfile::tempdir().unwrap();
    let impostor = broker_proto::tls::ServerCert::load_or_create(other.path(), &[]).unwrap();
    let wrong = broker_proto::tls::ClientTls::Pinned(impostor.cert_pem.clone());
    let err =
        brokerctl::BrokerClient::connect(&sandbox.url, &wrong, sandbox.operator.clone()).await;
    let refused = match err {
        Err(e) => e.to_string(),
        // tonic connects lazily on some paths: the first call must fail then.
        Ok(c) => c.whoami().await.unwrap_err().to_string(),
    };
    assert!(!refused.is_empty());
    let http = sandbox.url.replacen("https://", "http://", 1);
    let err =
        brokerctl::BrokerClient::connect(&http, &sandbox.client_tls(), sandbox.operator.clone())
            .await
            .err()
            .expect("plain http refused when a certificate is pinned")
            .to_string();
    assert!(err.contains("plain http"), "{err}");
    // With the right pin, it works.
    assert!(sandbox.operator().await.whoami().await.is_ok());
    sandbox.stop().await;
}

/// Promise: the researcher never decrypts with a capsule fragment that does not verify,
/// whatever the broker forwards (it verifies only a sample of each proxy's fragments).
/// Adversary: a proxy whose wrong fragment escaped the broker's sample; played by a
/// broker that forwards it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_researcher_refuses_a_fragment_the_brokers_sample_let_through() {
    use pre_kms::{envelope, reencrypt};
    let patient = Identity::generate();
    let researcher = Identity::generate();
    let proxies: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
    let key = patient.category_public_key(Category::Conditions);
    let sealed = envelope::seal(&key, b"{\"resourceType\":\"Bundle\"}").unwrap();
    let other = envelope::seal(&key, b"{\"resourceType\":\"Other\"}").unwrap();
    let plan = grant::GrantPlan {
        study_id: "st-x".into(),
        receiving_key: researcher.encryption_public_key(),
        categories: vec![Category::Conditions],
        threshold: 2,
        expires_at: i64::MAX,
        proxy_keys: proxies.iter().map(|p| p.encryption_public_key()).collect(),
    };
    let g = grant::issue(&patient, &plan).unwrap();
    let capsule = envelope::parse(&sealed).unwrap().capsule;
    let other_capsule = envelope::parse(&other).unwrap().capsule;
    let mut honest = Vec::new();
    let mut wrong = Vec::new();
    for (i, proxy) in proxies.iter().enumerate().take(2) {
        let claim = grant::DepositClaim {
            grant_id: g.grant_id.clone(),
            study_id: "st-x".into(),
            pseudonym: patient.pseudonym(),
            category: Category::Conditions,
            expires_at: i64::MAX,
            proxy_index: i as u32,
            patient_verifying_key: patient.verifying_key(),
            delegating_key: key,
            receiving_key: researcher.encryption_public_key(),
        };
        let k = grant::open_deposit(proxy, &claim, &g.categories[0].sealed_kfrags[i]).unwrap();
        honest.extend(reencrypt::reencrypt_batch(&[(
            capsule.clone(),
            k.kfrag.clone(),
        )]));
        // A well-formed fragment, made with the real kfrag, of another envelope's capsule.
        wrong.extend(reencrypt::reencrypt_batch(&[(
            other_capsule.clone(),
            k.kfrag,
        )]));
    }
    let item = |cfrags: Vec<Vec<u8>>| pb::ReleaseItem {
        subject: "sub-0123456789abcdef01234567".into(),
        category: "conditions".into(),
        version: 1,
        sealed: sealed.clone(),
        delegating_key: pre_kms::keys::public_key_bytes(&key),
        verifying_key: pre_kms::keys::public_key_bytes(&patient.verifying_key()),
        cfrags,
    };
    for (cfrags, ok) in [
        (honest.clone(), true),
        (vec![honest[0].clone(), wrong[1].clone()], false),
    ] {
        let (client, server) = integration_tests::hostile_broker(
            HostileReleases {
                items: vec![item(cfrags)],
            },
            Identity::generate(),
        )
        .await;
        let mut written = Vec::new();
        let got = agent::fetch_and_decrypt(&client, &researcher, "st-x", |r| {
            written.push(r.plaintext);
            Ok(())
        })
        .await;
        if ok {
            got.expect("honest fragments decrypt");
            assert_eq!(written, vec![b"{\"resourceType\":\"Bundle\"}".to_vec()]);
        } else {
            let err = got.unwrap_err().to_string();
            assert!(err.contains("fragment"), "{err}");
            assert!(
                written.is_empty(),
                "nothing decrypted with a wrong fragment"
            );
        }
        server.abort();
    }
}
