//! Every service refuses a call without credentials, with a forged signature, replayed,
//! or from the wrong role.

use broker_proto::methods as m;
use broker_proto::signed::signed;
use broker_proto::v1 as pb;
use integration_tests::Sandbox;
use model::Role;
use pre_kms::Identity;
use pre_kms::request_auth::ACTOR;
use tonic::Code;
use tonic::transport::Channel;

struct Call {
    name: &'static str,
    method: &'static str,
    /// A role that is registered but may not call this method.
    wrong_role: Role,
}

const CALLS: &[Call] = &[
    Call {
        name: "Registry.ListActors",
        method: m::LIST_ACTORS,
        wrong_role: Role::Sponsor,
    },
    Call {
        name: "Registry.RegisterActor",
        method: m::REGISTER_ACTOR,
        wrong_role: Role::Board,
    },
    Call {
        name: "Records.Enroll",
        method: m::ENROLL,
        wrong_role: Role::Researcher,
    },
    Call {
        name: "Records.Upload",
        method: m::UPLOAD,
        wrong_role: Role::Sponsor,
    },
    Call {
        name: "Records.Erase",
        method: m::ERASE,
        wrong_role: Role::Researcher,
    },
    Call {
        name: "Audit.Notices",
        method: m::AUDIT_NOTICES,
        wrong_role: Role::Sponsor,
    },
    Call {
        name: "Studies.Propose",
        method: m::PROPOSE,
        wrong_role: Role::Researcher,
    },
    Call {
        name: "Studies.Decide",
        method: m::DECIDE,
        wrong_role: Role::Sponsor,
    },
    Call {
        name: "Grants.Issue",
        method: m::ISSUE_GRANTS,
        wrong_role: Role::Researcher,
    },
    Call {
        name: "Consents.Set",
        method: m::SET_CONSENTS,
        wrong_role: Role::Researcher,
    },
    Call {
        name: "Consents.History",
        method: m::CONSENT_HISTORY,
        wrong_role: Role::Sponsor,
    },
    Call {
        name: "Feasibility.Count",
        method: m::COUNT,
        wrong_role: Role::Researcher,
    },
    Call {
        name: "Feasibility.PutConcepts",
        method: m::PUT_CONCEPTS,
        wrong_role: Role::Sponsor,
    },
    Call {
        name: "Grants.Withdraw",
        method: m::WITHDRAW_GRANTS,
        wrong_role: Role::Sponsor,
    },
    Call {
        name: "Audit.Checkpoints",
        method: m::AUDIT_CHECKPOINTS,
        wrong_role: Role::Operator,
    },
    Call {
        name: "Audit.Consistency",
        method: m::AUDIT_CONSISTENCY,
        wrong_role: Role::Researcher,
    },
    Call {
        name: "Audit.Events",
        method: m::AUDIT_EVENTS,
        wrong_role: Role::Sponsor,
    },
    Call {
        name: "Audit.Cosign",
        method: m::AUDIT_COSIGN,
        wrong_role: Role::Custodian,
    },
    Call {
        name: "Audit.Accesses",
        method: m::AUDIT_ACCESSES,
        wrong_role: Role::Board,
    },
    Call {
        name: "Audit.Alerts",
        method: m::AUDIT_ALERTS,
        wrong_role: Role::Researcher,
    },
    Call {
        name: "Emergency.RegisterOrganisation",
        method: m::REGISTER_EMERGENCY_ORG,
        wrong_role: Role::Board,
    },
    Call {
        name: "Emergency.BreakGlass",
        method: m::BREAK_GLASS,
        wrong_role: Role::Researcher,
    },
    Call {
        name: "Emergency.Reopen",
        method: m::REOPEN_BREAK_GLASS,
        wrong_role: Role::Sponsor,
    },
    Call {
        name: "Emergency.ListAccesses",
        method: m::LIST_BREAK_GLASS,
        wrong_role: Role::Clinician,
    },
    Call {
        name: "Emergency.Review",
        method: m::REVIEW_BREAK_GLASS,
        wrong_role: Role::Clinician,
    },
    Call {
        name: "Releases.Request",
        method: m::REQUEST_RELEASE,
        wrong_role: Role::Sponsor,
    },
    Call {
        name: "Releases.Fetch",
        method: m::FETCH_RELEASE,
        wrong_role: Role::Custodian,
    },
];

/// Sends one call of `method` as `identity` (None: unsigned), with `tamper` applied to
/// the signed request; returns the status code.
async fn call(
    channel: Channel,
    method: &str,
    identity: Option<&Identity>,
    tamper: impl Fn(&mut tonic::metadata::MetadataMap),
) -> Code {
    macro_rules! go {
        ($client:path, $rpc:ident, $msg:expr) => {{
            let msg = $msg;
            let mut req = match identity {
                Some(id) => signed(id, method, msg),
                None => tonic::Request::new(msg),
            };
            tamper(req.metadata_mut());
            match <$client>::new(channel).$rpc(req).await {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            }
        }};
    }
    match method {
        m::WHOAMI => go!(
            pb::registry_client::RegistryClient<Channel>,
            whoami,
            pb::WhoamiRequest {}
        ),
        m::LIST_ACTORS => go!(
            pb::registry_client::RegistryClient<Channel>,
            list_actors,
            pb::ListActorsRequest {}
        ),
        m::REGISTER_ACTOR => go!(
            pb::registry_client::RegistryClient<Channel>,
            register_actor,
            pb::RegisterActorRequest::default()
        ),
        m::ENROLL => go!(
            pb::records_client::RecordsClient<Channel>,
            enroll,
            pb::EnrollRequest::default()
        ),
        m::UPLOAD => go!(
            pb::records_client::RecordsClient<Channel>,
            upload,
            pb::UploadRequest::default()
        ),
        m::ERASE => go!(
            pb::records_client::RecordsClient<Channel>,
            erase,
            pb::EraseRequest::default()
        ),
        m::AUDIT_NOTICES => go!(
            pb::audit_client::AuditClient<Channel>,
            notices,
            pb::NoticesRequest::default()
        ),
        m::PROPOSE => go!(
            pb::studies_client::StudiesClient<Channel>,
            propose,
            pb::StudyProposal::default()
        ),
        m::DECIDE => go!(
            pb::studies_client::StudiesClient<Channel>,
            decide,
            pb::DecideStudyRequest::default()
        ),
        m::ISSUE_GRANTS => go!(
            pb::grants_client::GrantsClient<Channel>,
            issue,
            pb::IssueGrantsRequest::default()
        ),
        m::REQUEST_RELEASE => go!(
            pb::releases_client::ReleasesClient<Channel>,
            request,
            pb::RequestReleaseRequest::default()
        ),
        m::FETCH_RELEASE => go!(
            pb::releases_client::ReleasesClient<Channel>,
            fetch,
            pb::FetchReleaseRequest::default()
        ),
        m::SET_CONSENTS => go!(
            pb::consents_client::ConsentsClient<Channel>,
            set,
            pb::SetConsentsRequest::default()
        ),
        m::CONSENT_HISTORY => go!(
            pb::consents_client::ConsentsClient<Channel>,
            history,
            pb::ConsentHistoryRequest::default()
        ),
        m::COUNT => go!(
            pb::feasibility_client::FeasibilityClient<Channel>,
            count,
            pb::CountRequest::default()
        ),
        m::PUT_CONCEPTS => go!(
            pb::feasibility_client::FeasibilityClient<Channel>,
            put_concepts,
            pb::PutConceptsRequest::default()
        ),
        m::WITHDRAW_GRANTS => go!(
            pb::grants_client::GrantsClient<Channel>,
            withdraw,
            pb::WithdrawGrantsRequest::default()
        ),
        m::AUDIT_CHECKPOINTS => go!(
            pb::audit_client::AuditClient<Channel>,
            checkpoints,
            pb::CheckpointsRequest::default()
        ),
        m::AUDIT_CONSISTENCY => go!(
            pb::audit_client::AuditClient<Channel>,
            consistency,
            pb::ConsistencyRequest::default()
        ),
        m::AUDIT_EVENTS => go!(
            pb::audit_client::AuditClient<Channel>,
            events,
            pb::EventsRequest::default()
        ),
        m::AUDIT_COSIGN => go!(
            pb::audit_client::AuditClient<Channel>,
            cosign,
            pb::CosignRequest::default()
        ),
        m::AUDIT_ACCESSES => go!(
            pb::audit_client::AuditClient<Channel>,
            accesses,
            pb::AccessesRequest::default()
        ),
        m::AUDIT_ALERTS => go!(
            pb::audit_client::AuditClient<Channel>,
            alerts,
            pb::AlertsRequest::default()
        ),
        m::REGISTER_EMERGENCY_ORG => go!(
            pb::emergency_client::EmergencyClient<Channel>,
            register_organisation,
            pb::EmergencyOrganisation::default()
        ),
        m::LIST_EMERGENCY_ORGS => go!(
            pb::emergency_client::EmergencyClient<Channel>,
            list_organisations,
            pb::ListEmergencyOrganisationsRequest::default()
        ),
        m::BREAK_GLASS => go!(
            pb::emergency_client::EmergencyClient<Channel>,
            break_glass,
            pb::BreakGlassRequest::default()
        ),
        m::REOPEN_BREAK_GLASS => go!(
            pb::emergency_client::EmergencyClient<Channel>,
            reopen,
            pb::ReopenBreakGlassRequest::default()
        ),
        m::LIST_BREAK_GLASS => go!(
            pb::emergency_client::EmergencyClient<Channel>,
            list_accesses,
            pb::ListBreakGlassRequest::default()
        ),
        m::REVIEW_BREAK_GLASS => go!(
            pb::emergency_client::EmergencyClient<Channel>,
            review,
            pb::ReviewBreakGlassRequest::default()
        ),
        other => panic!("no call for {other}"),
    }
}

#[test]
fn every_method_closed_to_some_role_is_checked_here() {
    for (method, roles) in broker::access::ACCESS {
        if roles.len() < Role::ALL.len() {
            assert!(
                CALLS.iter().any(|c| c.method == *method),
                "{method} is not in CALLS"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_refuses_missing_forged_replayed_and_wrong_role_calls() {
    let sandbox = Sandbox::start().await;
    let channel = sandbox.channel().await;
    let stranger = Identity::generate();
    for c in CALLS {
        let wrong = sandbox.actor(c.wrong_role).await;
        let registered_id = wrong.identity().actor_id();

        let code = call(channel.clone(), c.method, None, |_| {}).await;
        assert_eq!(code, Code::Unauthenticated, "{}: unsigned call", c.name);

        // Signed by an unregistered key, claiming a registered actor's id.
        let claimed = registered_id.clone();
        let code = call(channel.clone(), c.method, Some(&stranger), move |md| {
            md.insert(ACTOR, claimed.parse().unwrap());
        })
        .await;
        assert_eq!(code, Code::Unauthenticated, "{}: forged signature", c.name);

        // Signed for another method.
        let code = call(channel.clone(), m::WHOAMI, Some(wrong.identity()), |_| {}).await;
        assert_eq!(code, Code::Ok, "whoami works for any role");
        let other_method = if c.method == m::LIST_ACTORS {
            m::WHOAMI
        } else {
            m::LIST_ACTORS
        };
        let id = wrong.identity().clone();
        let code = {
            let msg_for_other = signed(&id, other_method, pb::WhoamiRequest {});
            let md = msg_for_other.metadata().clone();
            call(channel.clone(), c.method, None, move |m| *m = md.clone()).await
        };
        assert_eq!(
            code,
            Code::Unauthenticated,
            "{}: signature for another method and body",
            c.name
        );

        let code = call(channel.clone(), c.method, Some(wrong.identity()), |_| {}).await;
        assert_eq!(
            code,
            Code::PermissionDenied,
            "{}: wrong role {}",
            c.name,
            c.wrong_role
        );
    }

    // A captured request cannot be replayed.
    let board = sandbox.actor(Role::Board).await;
    let req = signed(board.identity(), m::LIST_STUDIES, pb::ListStudiesRequest {});
    let md = req.metadata().clone();
    let mut client = pb::studies_client::StudiesClient::new(channel.clone());
    let mut first = tonic::Request::new(pb::ListStudiesRequest {});
    *first.metadata_mut() = md.clone();
    client.list(first).await.expect("first use succeeds");
    let mut again = tonic::Request::new(pb::ListStudiesRequest {});
    *again.metadata_mut() = md;
    let err = client.list(again).await.expect_err("replay refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("replayed"), "{}", err.message());
    sandbox.stop().await;
}

/// The proxies' service accepts only the broker's key: no credentials, an unknown key,
/// a registered actor that is not the broker, or a forged broker signature are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_refuse_everyone_but_the_broker() {
    use broker_proto::methods::{
        PROXY_DEPOSIT as DEPOSIT, PROXY_REENCRYPT as REENCRYPT, PROXY_REVOKE as REVOKE,
    };
    let dir = tempfile::tempdir().unwrap();
    let broker = Identity::generate();
    let proxy =
        broker::server::start_proxy(&dir.path().join("p0"), 0, &broker.public("broker"), false)
            .await
            .unwrap();
    let channel = proxy
        .client_tls
        .endpoint(&proxy.url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::proxy_client::ProxyClient::new(channel);
    let deposit = || pb::DepositRequest { deposits: vec![] };
    let reencrypt = || pb::ReencryptRequest {
        release_id: "r".into(),
        ..Default::default()
    };

    fn code<T>(r: Result<T, tonic::Status>) -> Code {
        r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
    }
    assert_eq!(
        code(client.deposit(tonic::Request::new(deposit())).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(client.reencrypt(tonic::Request::new(reencrypt())).await),
        Code::Unauthenticated
    );

    let sandbox_actor = Identity::generate();
    assert_eq!(
        code(
            client
                .deposit(signed(&sandbox_actor, DEPOSIT, deposit()))
                .await
        ),
        Code::Unauthenticated
    );

    let mut forged = signed(&sandbox_actor, REENCRYPT, reencrypt());
    forged
        .metadata_mut()
        .insert(ACTOR, broker.actor_id().parse().unwrap());
    assert_eq!(code(client.reencrypt(forged).await), Code::Unauthenticated);

    let mut wrong_method = signed(&broker, DEPOSIT, reencrypt());
    *wrong_method.get_mut() = reencrypt();
    assert_eq!(
        code(client.reencrypt(wrong_method).await),
        Code::Unauthenticated
    );

    // The broker's own key passes authentication, but a release that carries no
    // proof of being in the access log is still refused.
    assert_eq!(
        code(
            client
                .reencrypt(signed(&broker, REENCRYPT, reencrypt()))
                .await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(client.deposit(signed(&broker, DEPOSIT, deposit())).await),
        Code::Ok
    );
    let revoke = || pb::RevokeRequest::default();
    assert_eq!(
        code(client.revoke(tonic::Request::new(revoke())).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            client
                .revoke(signed(&sandbox_actor, REVOKE, revoke()))
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code(client.revoke(signed(&broker, REVOKE, revoke())).await),
        Code::Ok
    );

    // Erasure: only the broker may ask, and only with the patient's own signed request.
    use broker_proto::methods::PROXY_ERASE as ERASE;
    use pre_kms::erasure::{ErasureReceipt, ErasureRequest};
    let patient = Identity::generate();
    let request = ErasureRequest::sign(&patient, pre_kms::request_auth::now_ms());
    let erase = |r: &ErasureRequest| pb::EraseRequest {
        request: Some(broker_proto::convert::erasure_request_to_pb(r)),
    };
    assert_eq!(
        code(
            client
                .erase(signed(&sandbox_actor, ERASE, erase(&request)))
                .await
        ),
        Code::Unauthenticated
    );
    // A broker that erases a patient on its own say-so: the request is not the patient's.
    let mut forged = ErasureRequest::sign(&Identity::generate(), request.issued_at_ms);
    forged.pseudonym = patient.pseudonym();
    let refused = client
        .erase(signed(&broker, ERASE, erase(&forged)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("not the patient's"),
        "{}",
        refused.message()
    );
    let receipt: ErasureReceipt = broker_proto::convert::erasure_receipt_from_pb(
        client
            .erase(signed(&broker, ERASE, erase(&request)))
            .await
            .unwrap()
            .into_inner(),
    )
    .unwrap();
    receipt.verify_for(&request.verify().unwrap()).unwrap();
    assert_eq!(receipt.destroyed["kfrags"], 0);
    proxy.stop().await;
}
