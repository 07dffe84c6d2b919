//! The right to be forgotten against the parties that might cheat it: a request that is
//! forged, replayed, stale or sent by someone else is refused; a proxy that answers with
//! a receipt that is not its own holds the erasure back instead of being believed; a
//! broker that makes up receipts is caught by the patient's own check; and the released
//! studies get a notice while later releases leave the patient out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use broker::server::{load_or_create_identity, start_proxy};
use broker_proto::v1 as pb;
use brokerctl::{BrokerClient, ClientError, agent};
use integration_tests::tampered::{Tamper, Tampered, serve_on_loopback};
use integration_tests::{Sandbox, World};
use model::{CohortDefinition, Study};
use pre_kms::Category;
use pre_kms::Identity;
use pre_kms::erasure::{ErasureReceipt, ErasureRequest, Role as ReceiptRole};
use pre_kms::request_auth::now_ms;
use proxy::{ProxyNode, ProxyService};
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status};

const CATS: [Category; 2] = [Category::Demographics, Category::Conditions];

fn code(e: ClientError) -> (Code, String) {
    match e {
        ClientError::Status(s) => (s.code(), s.message().to_owned()),
        other => panic!("not a refusal: {other}"),
    }
}

/// Enrolment times are whole seconds, and a request of the enrolment's own second is
/// refused: wait for the next one.
async fn next_second() {
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
}

/// `n` patients with broad consent, a study of `CATS` approved, every patient granting it.
async fn granted_world(sandbox: &Sandbox, n: usize, seed: u64) -> (World, Study) {
    let w = sandbox.world(n, seed).await;
    let study = w
        .cast
        .approved_study("erasure", &CATS, CohortDefinition::everyone())
        .await
        .unwrap();
    let list: Vec<_> = w
        .patients
        .iter()
        .map(|(id, _)| (id.clone(), CATS.to_vec()))
        .collect();
    w.cast.grant_all(&study, &list, 100, |_| {}).await.unwrap();
    (w, study)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_replayed_stale_or_foreign_erasure_request_is_refused() {
    let sandbox = Sandbox::start().await;
    let (w, study) = granted_world(&sandbox, 3, 71).await;
    let (first, _) = w.cast.fetch(&study).await.unwrap();
    assert_eq!(first.release.subjects, 3);
    next_second().await;
    let (a, b) = (w.patients[0].0.clone(), w.patients[1].0.clone());
    let as_a = sandbox.client(a.clone()).await;
    let as_b = sandbox.client(b.clone()).await;

    // A signature that does not cover the request as sent.
    let mut forged = ErasureRequest::sign(&a, now_ms());
    forged.issued_at_ms += 1;
    let (c, m) = code(as_a.erase(&forged).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument, "{m}");
    // Another key's signature over a request naming the patient.
    let mut foreign = ErasureRequest::sign(&b, now_ms());
    foreign.pseudonym = a.pseudonym();
    let (c, m) = code(as_a.erase(&foreign).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument, "{m}");
    // The patient's own request, sent by another patient.
    let (c, m) = code(
        as_b.erase(&ErasureRequest::sign(&a, now_ms()))
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Code::PermissionDenied, "{m}");
    // Signed long ago.
    let stale = ErasureRequest::sign(&a, now_ms() - 25 * 3600 * 1000);
    let (c, m) = code(as_a.erase(&stale).await.unwrap_err());
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("24 hours"), "{m}");
    // None of these touched anything: A is still released.
    let (still, _) = w.cast.fetch(&study).await.unwrap();
    assert_eq!(still.release.subjects, 3);

    // A signs two requests; the first is carried out.
    let spare = ErasureRequest::sign(&a, now_ms());
    let request = ErasureRequest::sign(&a, now_ms());
    let (bundle, checked) = agent::erase(&as_a, &w.cast.network, request.clone())
        .await
        .expect("erased");
    assert_eq!(checked.proxies_confirmed, 3);
    assert!(checked.broker_destroyed["envelopes"] > 0, "{checked:?}");
    assert_eq!(checked.broker_destroyed["consent_versions"], 1);
    assert_eq!(
        checked.broker_destroyed["grants"], 0,
        "withdrawn on acceptance"
    );
    // Later releases leave the patient out; the study's researcher got a notice naming
    // the subject it knew.
    let (after, _) = w.cast.fetch(&study).await.unwrap();
    assert_eq!(after.release.subjects, 2);
    let notices = brokerctl::log_review::researcher_notices(&w.cast.researcher, None)
        .await
        .unwrap();
    assert_eq!(notices.len(), 1, "{notices:?}");
    let notice = &notices[0].event;
    assert_eq!(
        notice.details.study_id.as_deref(),
        Some(study.study_id.as_str())
    );
    let subject = notice
        .details
        .subject
        .clone()
        .expect("the subject is named");
    assert!(subject.starts_with("sub-"), "{subject}");
    assert!(notice.details.record_count.unwrap() > 0);
    // No other researcher reads them.
    let stranger = sandbox.actor(model::Role::Researcher).await;
    let (c, _) = code(
        stranger
            .log_notices(Some(&study.study_id))
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Code::PermissionDenied);

    // The erased patient's key no longer reads anything about them, but the same request
    // again answers the same receipts and erases nothing more.
    let (c, _) = code(as_a.log_accesses().await.unwrap_err());
    assert_eq!(c, Code::Unauthenticated);
    let (again, _) = agent::erase(&as_a, &w.cast.network, request.clone())
        .await
        .expect("the receipts again");
    assert_eq!(again.receipts, bundle.receipts);

    // The patient enrols again: it starts from nothing, and the request signed before
    // (never sent) is refused, as is the carried-out one sent again.
    next_second().await;
    let re = brokerctl::agent::ingest_batch(&w.cast.custodian, vec![w.patients[0].clone()])
        .await
        .unwrap();
    assert_eq!(re.newly_enrolled, 1);
    let as_a = sandbox.client(a.clone()).await;
    let accesses = as_a.log_accesses().await.unwrap();
    assert_eq!(
        accesses.events.len(),
        2,
        "only the new enrolment and upload"
    );
    let (c, m) = code(as_a.erase(&spare).await.unwrap_err());
    assert_eq!(c, Code::PermissionDenied, "{m}");
    assert!(m.contains("before the patient enrolled"), "{m}");
    let (again, _) = agent::erase(&as_a, &w.cast.network, request)
        .await
        .expect("answered");
    assert_eq!(again.receipts, bundle.receipts, "nothing new was erased");
    assert_eq!(as_a.log_accesses().await.unwrap().events.len(), 2);
    sandbox.stop().await;
}

/// A proxy that destroys nothing and answers with a receipt of its own making, until it
/// is told to behave.
struct Forger {
    liar: Identity,
    behaves: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl Tamper for Forger {
    async fn erase(
        &self,
        honest: &ProxyService,
        r: Request<pb::EraseRequest>,
    ) -> Result<Response<pb::ErasureReceipt>, Status> {
        if self.behaves.load(Ordering::SeqCst) {
            return pb::proxy_server::Proxy::erase(honest, r).await;
        }
        let wire = r.into_inner().request.unwrap();
        let request = broker_proto::convert::erasure_request_from_pb(wire)
            .verify()
            .unwrap();
        let receipt =
            ErasureReceipt::sign(&self.liar, ReceiptRole::Proxy, &request, [("kfrags", 2)], 0);
        Ok(Response::new(broker_proto::convert::erasure_receipt_to_pb(
            &receipt,
        )))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_waits_for_every_proxy_and_a_receipt_not_signed_by_the_proxy_counts_for_nothing()
{
    let mut sandbox = Sandbox::start().await;
    let dir = sandbox.dir.path().join("ext");
    let public = sandbox.fresh_broker_identity().public("broker");
    let honest0 = start_proxy(&dir.join("0"), 0, &public, true).await.unwrap();
    let node = Arc::new(ProxyNode::open(&dir.join("1"), Identity::generate(), 1).unwrap());
    let behaves = Arc::new(AtomicBool::new(false));
    let forger_url = serve_on_loopback(Tampered {
        honest: ProxyService::new(node.clone(), public.verifying_key),
        tamper: Forger {
            liar: Identity::generate(),
            behaves: behaves.clone(),
        },
    })
    .await;
    let honest2 = start_proxy(&dir.join("2"), 2, &public, true).await.unwrap();
    let urls = vec![honest0.url.clone(), forger_url, honest2.url.clone()];
    sandbox
        .restart_with(|c| {
            c.proxy_urls = urls;
            c.insecure_loopback = true;
        })
        .await;
    let (w, study) = granted_world(&sandbox, 2, 5).await;
    assert_eq!(node.kfrag_count().unwrap(), 4);
    next_second().await;
    let a = w.patients[0].0.clone();
    let as_a = sandbox.client(a.clone()).await;
    let request = ErasureRequest::sign(&a, now_ms());

    // Proxy 1 answers with a receipt it did not sign with its own key: the broker does
    // not take it, and keeps the erasure under way, deleting nothing yet.
    let (c, m) = code(as_a.erase(&request).await.unwrap_err());
    assert_eq!(c, Code::Unavailable, "{m}");
    assert!(
        m.contains("2 of 3 proxies confirmed") && m.contains("proxy 1"),
        "{m}"
    );
    assert_eq!(
        node.kfrag_count().unwrap(),
        4,
        "the forger destroyed nothing"
    );
    let (released, _) = w.cast.fetch(&study).await.unwrap();
    assert_eq!(
        released.release.subjects, 1,
        "the grants were withdrawn on acceptance"
    );
    let (c, m) = code(
        brokerctl::agent::ingest_batch(&w.cast.custodian, vec![w.patients[0].clone()])
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("being erased"), "{m}");

    // Once it behaves, the same request finishes the erasure.
    behaves.store(true, Ordering::SeqCst);
    let (bundle, checked) = agent::erase(&as_a, &w.cast.network, request)
        .await
        .expect("finished");
    assert_eq!(checked.proxies_confirmed, 3);
    assert_eq!(bundle.receipts.len(), 4);
    assert_eq!(node.kfrag_count().unwrap(), 2, "the other patient's stay");
    honest0.stop().await;
    honest2.stop().await;
    sandbox.stop().await;
}

/// A broker that answers an erasure with receipts it made up itself.
struct Fabricator {
    proxies: Vec<Identity>,
    broker: Identity,
    keep: usize,
}

#[tonic::async_trait]
impl pb::records_server::Records for Fabricator {
    async fn enroll(
        &self,
        _: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn upload(
        &self,
        _: Request<pb::UploadRequest>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn erase(
        &self,
        r: Request<pb::EraseRequest>,
    ) -> Result<Response<pb::EraseResponse>, Status> {
        let request =
            broker_proto::convert::erasure_request_from_pb(r.into_inner().request.unwrap())
                .verify()
                .unwrap();
        let mut receipts: Vec<ErasureReceipt> = self
            .proxies
            .iter()
            .take(self.keep)
            .map(|p| ErasureReceipt::sign(p, ReceiptRole::Proxy, &request, [("kfrags", 1)], 0))
            .collect();
        receipts.push(ErasureReceipt::sign(
            &self.broker,
            ReceiptRole::Broker,
            &request,
            [("envelopes", 9)],
            0,
        ));
        Ok(Response::new(pb::EraseResponse {
            receipts: receipts
                .iter()
                .map(broker_proto::convert::erasure_receipt_to_pb)
                .collect(),
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_patient_refuses_receipts_the_broker_made_up() {
    let sandbox = Sandbox::start().await;
    let cast = sandbox.cast().await;
    let network = cast.network.clone();
    let patient = Identity::generate();
    // The broker's own key signs what it likes; the proxies' keys it does not hold.
    // Receipts signed by proxy keys the patient never pinned, or the broker's receipt
    // with too few proxies', do not prove the erasure.
    let broker_key =
        load_or_create_identity(&sandbox.data_dir().join("broker.key"), "broker").unwrap();
    let unpinned: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
    for (proxies, keep, why) in [
        (unpinned.clone(), 3, "signed by a proxy that is not pinned"),
        (unpinned, 0, "0 of 3 proxies confirmed"),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = Fabricator {
            proxies,
            broker: broker_key.clone(),
            keep,
        };
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(pb::records_server::RecordsServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = BrokerClient::from_channel(channel, patient.clone());
        let err = agent::erase(&client, &network, ErasureRequest::sign(&patient, now_ms()))
            .await
            .unwrap_err();
        let said = err.to_string();
        assert!(said.contains("does not prove the erasure"), "{said}");
        assert!(said.contains(why), "{said}");
    }
    sandbox.stop().await;
}
