//! Break the glass, through the real broker and proxies: only registered emergency
//! clinicians, only patients whose consent allows it, only `critical`, only after the
//! access is logged, only inside its window; the patient is alerted and the board
//! reviews. The adversaries play for real: a broker (man in the middle with the broker's
//! key) that strips the event, swaps the patient or the organisation, or replays an
//! access after its window; a custodian agent that deposits a grant the consent forbids.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use broker_proto::methods::PROXY_REENCRYPT as REENCRYPT;
use broker_proto::signed::signed;
use broker_proto::v1 as pb;
use brokerctl::{BrokerClient, ClientError, agent, log_review};
use consent_policy::{BreakGlass, ConsentPolicy, broad_research_policy};
use integration_tests::tampered::{Tamper, Tampered, serve_on_loopback};
use integration_tests::{Sandbox, World};
use model::{CohortDefinition, EmergencyOrganisation, Role};
use pre_kms::emergency::EmergencyCard;
use pre_kms::keys::public_key_bytes;
use pre_kms::network::VerifiedNetwork;
use pre_kms::request_auth::now_secs;
use pre_kms::{Category, Identity};
use proxy::{ProxyNode, ProxyService};
use tonic::{Code, Request, Response, Status};

const NORTH: &str = "er-north";
const SOUTH: &str = "er-south";

/// A world whose even-numbered patients allow break-glass (and hold standing grants to
/// both emergency organisations) and odd-numbered ones do not; a clinician of each
/// organisation.
struct Emergency {
    w: World,
    network: VerifiedNetwork,
    north: Identity,
    clinician: BrokerClient,
    south_clinician: BrokerClient,
}

impl Emergency {
    fn allows(i: usize) -> bool {
        i.is_multiple_of(2)
    }

    fn patient(&self, i: usize) -> &Identity {
        &self.w.patients[i].0
    }

    fn critical(&self, i: usize) -> &[u8] {
        &self.w.patients[i].1.categories[&Category::Critical]
    }
}

fn break_glass_policy(version: u32, allow: bool) -> ConsentPolicy {
    let mut draft = broad_research_policy(version, now_secs()).into_draft();
    draft.break_glass = if allow {
        BreakGlass::Allow
    } else {
        BreakGlass::Deny
    };
    draft.check().expect("a valid policy")
}

async fn set_choice(w: &World, who: &[usize], allow: bool) {
    let mut policies = Vec::new();
    for &i in who {
        let id = &w.patients[i].0;
        let history = agent::consent_history(&w.cast.custodian, id).await.unwrap();
        policies.push((
            id.clone(),
            break_glass_policy(agent::next_version(&history), allow),
        ));
    }
    agent::set_consents(&w.cast.custodian, &policies)
        .await
        .expect("consents set");
}

async fn register_org(sandbox: &Sandbox, id: &str) -> Identity {
    let key = Identity::generate();
    sandbox
        .operator()
        .await
        .register_emergency_org(EmergencyOrganisation {
            organisation_id: id.into(),
            name: format!("{id} emergency department"),
            receiving_key: public_key_bytes(&key.encryption_public_key()),
        })
        .await
        .expect("registered");
    key
}

async fn clinician_of(sandbox: &Sandbox, organisation: &str) -> BrokerClient {
    let id = Identity::generate();
    sandbox
        .operator()
        .await
        .register_actor(
            Role::Clinician,
            "Dr Test",
            organisation,
            &id.public("clinician"),
        )
        .await
        .expect("registered");
    sandbox.client(id).await
}

async fn emergency(sandbox: &Sandbox, n: usize, seed: u64) -> Emergency {
    let north = register_org(sandbox, NORTH).await;
    register_org(sandbox, SOUTH).await;
    let w = sandbox.world(n, seed).await;
    let all: Vec<usize> = (0..n).collect();
    set_choice(
        &w,
        &all.iter()
            .copied()
            .filter(|&i| Emergency::allows(i))
            .collect::<Vec<_>>(),
        true,
    )
    .await;
    // The network the board signs now lists both organisations; the agent pins it.
    let network = sandbox.network(&w.cast.board).await;
    assert_eq!(network.emergency_organisations.len(), 2);
    let mut patients = Vec::new();
    for (id, _) in &w.patients {
        let history = agent::consent_history(&w.cast.custodian, id).await.unwrap();
        patients.push((id.clone(), history));
    }
    let r = agent::emergency_grants(&w.cast.custodian, &network, patients)
        .await
        .expect("standing grants");
    let allowing = (0..n).filter(|&i| Emergency::allows(i)).count();
    assert_eq!(
        r.issued,
        2 * allowing,
        "one grant per allowing patient and organisation"
    );
    assert_eq!(r.not_allowed, n - allowing);
    Emergency {
        w,
        network,
        north,
        clinician: clinician_of(sandbox, NORTH).await,
        south_clinician: clinician_of(sandbox, SOUTH).await,
    }
}

fn code(e: &ClientError) -> Code {
    match e {
        ClientError::Status(s) => s.code(),
        other => panic!("not a status: {other}"),
    }
}

/// No refusal names a patient's data: nothing of their records, not even their pseudonym.
fn assert_no_patient_data(e: &ClientError, w: &World) {
    let msg = e.to_string();
    for (id, record) in &w.patients {
        assert!(!msg.contains(&id.pseudonym()), "pseudonym in {msg}");
        for needle in &record.identifiers {
            assert!(!msg.contains(needle.as_str()), "{needle} in {msg}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_releases_critical_only_to_registered_clinicians_of_patients_who_allow_it() {
    let mut sandbox = Sandbox::start().await;
    let limits = |c: &mut broker::server::ServeConfig| {
        c.break_glass.per_hour = 8;
        c.break_glass.flag_after = 3;
    };
    sandbox.restart_with(limits).await;
    let e = emergency(&sandbox, 6, 41).await;
    let w = &e.w;
    // Standing grants: critical only, 3 allowing patients × 2 organisations at each proxy.
    assert_eq!(sandbox.kfrag_counts(), vec![6, 6, 6]);

    // By pseudonym, with a reason: the latest critical record, verified and decrypted.
    let answer = e
        .clinician
        .break_glass(
            &e.patient(0).pseudonym(),
            "",
            "unconscious after a car crash",
        )
        .await
        .expect("break-glass");
    let opened = agent::open_break_glass(answer, &e.north, Some(&e.patient(0).pseudonym()))
        .await
        .expect("verified");
    assert_eq!(opened.records.len(), 1);
    assert_eq!(opened.records[0].category, Category::Critical);
    assert_eq!(opened.records[0].plaintext, e.critical(0));
    let a = &opened.access;
    assert!(!a.card_presented);
    let window = a.expires_at - a.created_at;
    assert!(window > 0 && window <= 24 * 3600, "{window}");

    // By the patient's emergency card: the card alone names the patient.
    let card = EmergencyCard::sign(e.patient(2), now_secs()).to_token();
    let answer = e
        .clinician
        .break_glass("", &card, "anaphylaxis, no history")
        .await
        .expect("break-glass by card");
    assert!(answer.access.card_presented);
    let opened = agent::open_break_glass(answer, &e.north, Some(&e.patient(2).pseudonym()))
        .await
        .unwrap();
    assert_eq!(opened.records[0].plaintext, e.critical(2));
    // The organisation's key opens nothing of another organisation's answer.
    let south = e
        .south_clinician
        .break_glass(&e.patient(4).pseudonym(), "", "stroke")
        .await
        .expect("south breaks the glass");
    assert!(
        agent::open_break_glass(south, &e.north, None)
            .await
            .is_err()
    );

    let mut refusals = Vec::new();
    // A patient who said no: refused even for a registered clinician...
    let err = e
        .clinician
        .break_glass(&e.patient(1).pseudonym(), "", "unconscious")
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied, "{err}");
    assert!(
        err.to_string().contains("does not allow break-glass"),
        "{err}"
    );
    refusals.push(err);
    // ...and a lying agent cannot deposit a standing grant for them: the broker re-checks
    // the consent, and nothing reaches the proxies.
    let forged_plan = pre_kms::grant::GrantPlan {
        study_id: model::emergency_grantee(NORTH),
        receiving_key: e.north.encryption_public_key(),
        categories: vec![Category::Critical],
        threshold: e.network.threshold,
        expires_at: now_secs() + 3600,
        proxy_keys: e.network.proxies.iter().map(|p| p.encryption_key).collect(),
    };
    let err = agent::grant_scoped(
        &w.cast.custodian,
        &forged_plan,
        vec![(
            e.patient(1).clone(),
            vec![Category::Critical],
            now_secs() + 3600,
        )],
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied, "{err}");
    // A standing grant of anything but critical is refused too.
    let wide_plan = pre_kms::grant::GrantPlan {
        categories: vec![Category::Critical, Category::Conditions],
        ..forged_plan.clone()
    };
    let err = agent::grant_scoped(
        &w.cast.custodian,
        &wide_plan,
        vec![(
            e.patient(0).clone(),
            vec![Category::Critical, Category::Conditions],
            now_secs() + 3600,
        )],
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument, "{err}");
    assert_eq!(sandbox.kfrag_counts(), vec![6, 6, 6]);

    // A forged card (another key's signature under the patient's pseudonym).
    let mut forged = EmergencyCard::sign(&Identity::generate(), now_secs());
    forged.pseudonym = e.patient(0).pseudonym();
    let err = e
        .clinician
        .break_glass("", &forged.to_token(), "unconscious")
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied, "{err}");
    refusals.push(err);
    // No reason; a patient who does not exist.
    let err = e
        .clinician
        .break_glass(&e.patient(0).pseudonym(), "", "  ")
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument, "{err}");
    refusals.push(err);
    let err = e
        .clinician
        .break_glass(&"0".repeat(32), "", "unconscious")
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::NotFound, "{err}");
    refusals.push(err);
    // A sponsor, a researcher, a clinician of an unregistered organisation.
    for (who, want) in [
        (w.cast.sponsor.clone(), Code::PermissionDenied),
        (w.cast.researcher.clone(), Code::PermissionDenied),
        (
            clinician_of(&sandbox, "st-elsewhere").await,
            Code::PermissionDenied,
        ),
    ] {
        let err = who
            .break_glass(&e.patient(0).pseudonym(), "", "unconscious")
            .await
            .unwrap_err();
        assert_eq!(code(&err), want, "{err}");
        refusals.push(err);
    }
    for err in &refusals {
        assert_no_patient_data(err, w);
    }

    // A research release never includes critical: a study that asks for it gets no grant
    // of it, and its release holds none.
    let study = w
        .cast
        .approved_study(
            "asks for critical",
            &[Category::Conditions, Category::Critical],
            CohortDefinition::everyone(),
        )
        .await
        .unwrap();
    let plan = agent::grant_plan(&w.cast.custodian, &e.network, &study)
        .await
        .unwrap();
    let err = agent::grant_batch(
        &w.cast.custodian,
        &plan,
        vec![(e.patient(0).clone(), vec![Category::Critical])],
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied, "{err}");
    let mut histories = Vec::new();
    for (id, _) in &w.patients {
        let h = agent::consent_history(&w.cast.custodian, id).await.unwrap();
        histories.push((id.clone(), Category::ALL.to_vec(), h));
    }
    agent::consented_grants(&w.cast.custodian, &plan, &study, histories)
        .await
        .unwrap();
    let (_, got) = w.cast.fetch_records(&study).await.unwrap();
    assert!(!got.is_empty());
    assert!(
        got.iter().all(|(_, c, _)| *c == Category::Conditions),
        "{got:?}"
    );

    // The patient sees the access at once, with the organisation and the reason; a
    // patient who was not accessed sees none.
    let patient0 = sandbox.client(e.patient(0).clone()).await;
    let alerts = log_review::patient_alerts(&patient0, None, false)
        .await
        .unwrap();
    let bg: Vec<_> = alerts
        .iter()
        .filter(|s| {
            s.event.kind == audit_log::EventKind::BreakGlass
                && s.event.outcome == audit_log::event::Outcome::Success
        })
        .collect();
    assert_eq!(bg.len(), 1, "{alerts:?}");
    // The refused attempt with a forged card alerts the patient too.
    assert_eq!(
        alerts
            .iter()
            .filter(|s| s.event.kind == audit_log::EventKind::BreakGlass)
            .count(),
        2
    );
    assert_eq!(bg[0].event.actor.organisation.as_deref(), Some(NORTH));
    assert_eq!(
        bg[0].event.why.purpose.as_deref(),
        Some("unconscious after a car crash")
    );
    let line = log_review::human_line(bg[0]);
    assert!(
        line.contains("reason=") && line.contains("organisation=er-north"),
        "{line}"
    );
    let accesses = log_review::patient_accesses(&patient0, None).await.unwrap();
    assert!(
        accesses
            .iter()
            .any(|s| s.event.kind == audit_log::EventKind::BreakGlass)
    );
    let patient3 = sandbox.client(e.patient(3).clone()).await;
    let alerts = log_review::patient_alerts(&patient3, None, false)
        .await
        .unwrap();
    assert!(
        alerts
            .iter()
            .all(|s| s.event.kind != audit_log::EventKind::BreakGlass)
    );
    // The refused attempt on patient 1 is in their own access history.
    let patient1 = sandbox.client(e.patient(1).clone()).await;
    let seen = log_review::patient_accesses(&patient1, None).await.unwrap();
    assert!(
        seen.iter()
            .any(|s| s.event.kind == audit_log::EventKind::BreakGlass
                && matches!(s.event.outcome, audit_log::event::Outcome::Refused { .. }))
    );

    // The board's queue holds every use; a review is logged and leaves the queue.
    let board = &w.cast.board;
    let queue = board.break_glass_accesses(true).await.unwrap();
    assert_eq!(queue.len(), 3);
    assert!(queue.iter().all(|a| a.review.is_none()));
    let reviewed = board
        .review_break_glass(&queue[0].access_id, "ok", "justified: trauma")
        .await
        .unwrap();
    assert!(reviewed.review.is_some());
    assert_eq!(board.break_glass_accesses(true).await.unwrap().len(), 2);
    assert_eq!(board.break_glass_accesses(false).await.unwrap().len(), 3);
    let err = board
        .review_break_glass(&queue[1].access_id, "fine", "x")
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::InvalidArgument);
    assert!(
        e.clinician.break_glass_accesses(false).await.is_err(),
        "board only"
    );
    let reviews = board
        .log_events(audit_log::EventFilter {
            kinds: vec!["break_glass_review".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reviews.len(), 1);

    // Withdrawing the choice withdraws the standing grants at every proxy, and the next
    // break-glass is refused.
    let before = sandbox.kfrag_counts();
    set_choice(w, &[0], false).await;
    let after: Vec<i64> = before.iter().map(|k| k - 2).collect();
    assert_eq!(
        sandbox.kfrag_counts(),
        after,
        "both organisations' grants of patient 0 destroyed"
    );
    let err = e
        .clinician
        .break_glass(&e.patient(0).pseudonym(), "", "again")
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied, "{err}");

    // Per-clinician rate limit, and repeated use flagged for the board; the limits hold
    // across a restart (the attempts are counted from the log's side index).
    sandbox.restart_with(limits).await;
    let clinician = sandbox.client(e.clinician.identity().clone()).await;
    // Six attempts so far this hour count against the limit of eight (two accesses, to
    // patients 0 and 2, and four refusals: the patient who said no, the forged card, the
    // unknown patient, patient 0 after withdrawing; a request without a reason never
    // reaches the check). Two more are let through, the second flagged as the fourth
    // access in 24 hours; the ninth attempt is refused.
    let third = clinician
        .break_glass(&e.patient(4).pseudonym(), "", "seizure")
        .await
        .unwrap();
    assert!(!third.access.flagged);
    let fourth = clinician
        .break_glass(&e.patient(4).pseudonym(), "", "seizure again")
        .await
        .unwrap();
    assert!(fourth.access.flagged, "{:?}", fourth.access);
    let err = clinician
        .break_glass(&e.patient(4).pseudonym(), "", "third seizure")
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::ResourceExhausted, "{err}");
    sandbox.stop().await;
}

const PASS: u8 = 0;
const STRIP: u8 = 1;
const OTHER_PATIENT: u8 = 2;
const OTHER_ORG: u8 = 3;

/// A man in the middle holding the broker's key: it rewrites each re-encryption request
/// as a broker skipping or bending the log would, re-signs it, and keeps the last honest
/// request for a later replay.
struct Bender {
    mode: Arc<AtomicU8>,
    broker: Identity,
    other_patient: Arc<std::sync::Mutex<String>>,
    last: Arc<std::sync::Mutex<Option<pb::ReencryptRequest>>>,
    answers: Arc<std::sync::Mutex<Vec<(Code, usize)>>>,
}

#[tonic::async_trait]
impl Tamper for Bender {
    async fn reencrypt(
        &self,
        honest: &ProxyService,
        r: Request<pb::ReencryptRequest>,
    ) -> Result<Response<pb::ReencryptResponse>, Status> {
        let mut body = r.into_inner();
        *self.last.lock().unwrap() = Some(body.clone());
        match self.mode.load(Ordering::SeqCst) {
            STRIP => body.events.clear(),
            OTHER_PATIENT => {
                for item in &mut body.items {
                    item.pseudonym = self.other_patient.lock().unwrap().clone();
                }
            }
            OTHER_ORG => {
                for item in &mut body.items {
                    item.study_id = model::emergency_grantee(SOUTH);
                }
            }
            _ => {}
        }
        let answer =
            pb::proxy_server::Proxy::reencrypt(honest, signed(&self.broker, REENCRYPT, body)).await;
        let seen = match &answer {
            Ok(a) => (
                Code::Ok,
                a.get_ref().cfrags.iter().filter(|c| !c.is_empty()).count(),
            ),
            Err(s) => (s.code(), 0),
        };
        self.answers.lock().unwrap().push(seen);
        answer
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_refuse_break_glass_without_its_logged_event_or_after_its_window() {
    let mut sandbox = Sandbox::start().await;
    let dir = sandbox.dir.path().join("ext");
    let broker_id = sandbox.fresh_broker_identity();
    let public = broker_id.public("broker");
    let mode = Arc::new(AtomicU8::new(PASS));
    let last = Arc::new(std::sync::Mutex::new(None));
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let other_patient = Arc::new(std::sync::Mutex::new(String::new()));
    let mut urls = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..3u32 {
        let node =
            Arc::new(ProxyNode::open(&dir.join(i.to_string()), Identity::generate(), i).unwrap());
        nodes.push(node.clone());
        urls.push(
            serve_on_loopback(Tampered {
                honest: ProxyService::new(node, public.verifying_key),
                tamper: Bender {
                    mode: mode.clone(),
                    broker: broker_id.clone(),
                    other_patient: other_patient.clone(),
                    last: last.clone(),
                    answers: answers.clone(),
                },
            })
            .await,
        );
    }
    const WINDOW: i64 = 4;
    sandbox
        .restart_with(|c| {
            c.proxy_urls = urls;
            c.insecure_loopback = true;
            c.break_glass.window_secs = WINDOW;
        })
        .await;
    let e = emergency(&sandbox, 4, 43).await;
    // Patient 2 also holds a standing grant to er-north: the man in the middle swaps
    // patient 0's items for patient 2's under patient 0's event.
    *other_patient.lock().unwrap() = e.patient(2).pseudonym();
    let pseudonym = e.patient(0).pseudonym();
    for (m, what) in [
        (STRIP, "the event stripped"),
        (OTHER_PATIENT, "another patient's items under this event"),
        (OTHER_ORG, "another organisation's grant under this event"),
    ] {
        mode.store(m, Ordering::SeqCst);
        answers.lock().unwrap().clear();
        let err = e
            .clinician
            .break_glass(&pseudonym, "", "unconscious")
            .await
            .unwrap_err();
        assert_eq!(code(&err), Code::Unavailable, "{what}: {err}");
        let seen = answers.lock().unwrap().clone();
        assert!(!seen.is_empty(), "{what}");
        assert!(
            seen.iter().all(|(_, fragments)| *fragments == 0),
            "{what}: a proxy re-encrypted: {seen:?}"
        );
    }
    mode.store(PASS, Ordering::SeqCst);
    let answer = e
        .clinician
        .break_glass(&pseudonym, "", "unconscious")
        .await
        .expect("the logged access");
    let access = answer.access.clone();
    assert_eq!(access.expires_at - access.created_at, WINDOW);
    let opened = agent::open_break_glass(answer, &e.north, Some(&pseudonym))
        .await
        .unwrap();
    assert_eq!(opened.records[0].plaintext, e.critical(0));
    // Inside the window the same clinician reopens it; nobody else may.
    e.clinician
        .reopen_break_glass(&access.access_id)
        .await
        .expect("reopened inside the window");
    let err = e
        .south_clinician
        .reopen_break_glass(&access.access_id)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::PermissionDenied);
    let captured = last.lock().unwrap().clone().expect("a captured request");

    // After the window: the broker refuses to reopen, and a replay of the captured,
    // logged request straight to a proxy (re-signed with the broker's key) re-encrypts
    // nothing.
    tokio::time::sleep(std::time::Duration::from_secs(WINDOW as u64 + 1)).await;
    let err = e
        .clinician
        .reopen_break_glass(&access.access_id)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("break the glass again"), "{err}");
    let honest = ProxyService::new(nodes[0].clone(), public.verifying_key);
    let replay =
        pb::proxy_server::Proxy::reencrypt(&honest, signed(&broker_id, REENCRYPT, captured))
            .await
            .unwrap_err();
    assert_eq!(replay.code(), Code::FailedPrecondition);
    assert!(
        replay.message().contains("window is over"),
        "{}",
        replay.message()
    );
    // A renewal is a new, logged break-glass.
    let renewed = e
        .clinician
        .break_glass(&pseudonym, "", "still unconscious")
        .await
        .expect("a new access");
    assert_ne!(renewed.access.access_id, access.access_id);
    sandbox.stop().await;
}
