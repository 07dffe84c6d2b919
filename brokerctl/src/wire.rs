//! The client's wire module: every call signed with the caller's identity (see
//! [`pre_kms::request_auth`]), actors and studies answered as domain types. Used by
//! `brokerctl`, the demo, benches and tests.

use broker_proto::signed::signed;
use broker_proto::tls::ClientTls;
use broker_proto::v1 as pb;
use pre_kms::grant::Grant;
use pre_kms::keys::public_key_bytes;
use pre_kms::{Identity, PublicIdentity};
use tonic::transport::Channel;

use audit_log::EventFilter;
use broker_proto::convert::{
    actor_from_pb, break_glass_from_pb, consent_receipt_from_pb, consent_submission_to_pb,
    emergency_org_from_pb, emergency_org_to_pb, event_filter_to_pb, grant_to_pb,
    logged_event_from_pb, proposal_to_pb, release_from_pb, role_to_pb, study_from_pb,
    upload_receipt_from_pb, upload_to_pb,
};
use broker_proto::methods as m;
use consent_policy::{ConsentReceipt, ConsentSubmission};
use model::Enrollment;
use model::Role;
use model::{Actor, Release, Study, StudyProposal, Upload, UploadReceipt, decision_digest};
use model::{BreakGlassAccess, EmergencyOrganisation};
use pre_kms::logged_release::LoggedEvent;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the broker at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The broker's refusal; shown as its code and message only (the status is not a
    /// `source`, so error chains do not print it twice).
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    #[error("{0}")]
    Crypto(#[from] pre_kms::Error),
    #[error("{0}")]
    Keystore(#[from] crate::keystore::KeystoreError),
    #[error("{0}")]
    Invalid(String),
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Unauthenticated => "not authenticated",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::ResourceExhausted => "resource exhausted",
        tonic::Code::Internal => "internal error",
        _ => "error",
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Status(status)
    }
}

pub type ClientResult<T> = Result<T, ClientError>;

impl From<broker_proto::convert::Malformed> for ClientError {
    fn from(e: broker_proto::convert::Malformed) -> Self {
        ClientError::Invalid(format!("the broker sent a malformed answer: {e}"))
    }
}

/// Events with inclusion proofs and the signed checkpoint (note form) they are proven
/// against, as the broker served them: not yet checked (`log_review` checks them).
#[derive(Debug, Clone)]
pub struct LogExcerpt {
    pub checkpoint: String,
    pub events: Vec<LoggedEvent>,
}

impl LogExcerpt {
    fn from_pb(checkpoint: String, events: Vec<pb::LoggedEvent>) -> ClientResult<LogExcerpt> {
        Ok(LogExcerpt {
            checkpoint,
            events: events
                .into_iter()
                .map(logged_event_from_pb)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// A break-glass answer as the broker sent it: the access and the release items.
#[derive(Debug, Clone)]
pub struct BreakGlassAnswer {
    pub access: BreakGlassAccess,
    pub items: Vec<pb::ReleaseItem>,
    pub threshold: u32,
}

impl BreakGlassAnswer {
    fn from_pb(a: pb::BreakGlassResponse) -> ClientResult<BreakGlassAnswer> {
        let access = a.access.ok_or_else(|| {
            ClientError::Invalid("the broker's break-glass answer names no access".into())
        })?;
        Ok(BreakGlassAnswer {
            access: break_glass_from_pb(access)?,
            items: a.items,
            threshold: a.threshold,
        })
    }
}

fn actor(a: pb::Actor) -> ClientResult<Actor> {
    Ok(actor_from_pb(a)?)
}

fn study(s: pb::Study) -> ClientResult<Study> {
    Ok(study_from_pb(s)?)
}

const LIMIT: usize = broker_proto::MAX_MESSAGE_BYTES;

#[derive(Clone)]
pub struct BrokerClient {
    identity: Identity,
    registry: pb::registry_client::RegistryClient<Channel>,
    records: pb::records_client::RecordsClient<Channel>,
    studies: pb::studies_client::StudiesClient<Channel>,
    grants: pb::grants_client::GrantsClient<Channel>,
    releases: pb::releases_client::ReleasesClient<Channel>,
    audit: pb::audit_client::AuditClient<Channel>,
    consents: pb::consents_client::ConsentsClient<Channel>,
    feasibility: pb::feasibility_client::FeasibilityClient<Channel>,
    emergency: pb::emergency_client::EmergencyClient<Channel>,
}

impl BrokerClient {
    /// Connects to the broker at `url` over TLS, accepting only the pinned certificate
    /// (or plain http to loopback, for tests).
    pub async fn connect(
        url: &str,
        tls: &ClientTls,
        identity: Identity,
    ) -> ClientResult<BrokerClient> {
        let connect_err = |reason: String| ClientError::Connect {
            url: url.to_owned(),
            reason,
        };
        let channel = tls
            .endpoint(url)
            .map_err(|e| connect_err(e.to_string()))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| connect_err(format!("{e} (is `broker serve` running there?)")))?;
        Ok(Self::from_channel(channel, identity))
    }

    pub fn from_channel(channel: Channel, identity: Identity) -> BrokerClient {
        BrokerClient {
            identity,
            registry: pb::registry_client::RegistryClient::new(channel.clone()),
            records: pb::records_client::RecordsClient::new(channel.clone())
                .max_decoding_message_size(LIMIT)
                .max_encoding_message_size(LIMIT),
            studies: pb::studies_client::StudiesClient::new(channel.clone()),
            grants: pb::grants_client::GrantsClient::new(channel.clone())
                .max_decoding_message_size(LIMIT)
                .max_encoding_message_size(LIMIT),
            releases: pb::releases_client::ReleasesClient::new(channel.clone())
                .max_decoding_message_size(LIMIT)
                .max_encoding_message_size(LIMIT),
            consents: pb::consents_client::ConsentsClient::new(channel.clone()),
            feasibility: pb::feasibility_client::FeasibilityClient::new(channel.clone()),
            emergency: pb::emergency_client::EmergencyClient::new(channel.clone()),
            audit: pb::audit_client::AuditClient::new(channel)
                .max_decoding_message_size(LIMIT)
                .max_encoding_message_size(LIMIT),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The same connection, signing as another identity (a custodian's patients).
    pub fn with_identity(&self, identity: Identity) -> BrokerClient {
        BrokerClient {
            identity,
            ..self.clone()
        }
    }

    fn sign<T: prost::Message>(&self, method: &str, message: T) -> tonic::Request<T> {
        signed(&self.identity, method, message)
    }

    pub async fn register_actor(
        &self,
        role: Role,
        name: &str,
        organisation: &str,
        keys: &PublicIdentity,
    ) -> ClientResult<Actor> {
        let req = pb::RegisterActorRequest {
            role: role_to_pb(role) as i32,
            name: name.to_owned(),
            organisation: organisation.to_owned(),
            verifying_key: public_key_bytes(&keys.verifying_key),
            encryption_key: public_key_bytes(&keys.encryption_key),
            key_binding: keys.key_binding.clone().unwrap_or_default(),
        };
        actor(
            self.registry
                .clone()
                .register_actor(self.sign(m::REGISTER_ACTOR, req))
                .await?
                .into_inner(),
        )
    }

    pub async fn list_actors(&self) -> ClientResult<Vec<Actor>> {
        self.registry
            .clone()
            .list_actors(self.sign(m::LIST_ACTORS, pb::ListActorsRequest {}))
            .await?
            .into_inner()
            .actors
            .into_iter()
            .map(actor)
            .collect()
    }

    pub async fn whoami(&self) -> ClientResult<Actor> {
        actor(
            self.registry
                .clone()
                .whoami(self.sign(m::WHOAMI, pb::WhoamiRequest {}))
                .await?
                .into_inner(),
        )
    }

    pub async fn list_proxies(&self) -> ClientResult<pb::ListProxiesResponse> {
        Ok(self
            .registry
            .clone()
            .list_proxies(self.sign(m::LIST_PROXIES, pb::ListProxiesRequest {}))
            .await?
            .into_inner())
    }

    /// Enrolls patients (each signs its own enrollment; the call is by this client's
    /// identity). Returns, per patient, whether it was enrolled now.
    pub async fn enroll(&self, patients: &[&Identity]) -> ClientResult<Vec<bool>> {
        self.enroll_prepared(
            patients
                .iter()
                .map(|p| pre_kms::enrollment::enroll(p))
                .collect(),
        )
        .await
    }

    pub async fn enroll_prepared(&self, enrollments: Vec<Enrollment>) -> ClientResult<Vec<bool>> {
        let patients = enrollments
            .into_iter()
            .map(|e| pb::Enrollment {
                pseudonym: e.pseudonym,
                verifying_key: e.verifying_key,
                category_keys: e
                    .category_keys
                    .into_iter()
                    .map(|(c, k)| pb::CategoryKey {
                        category: c.label().to_owned(),
                        public_key: k,
                    })
                    .collect(),
                signature: e.signature,
            })
            .collect();
        let req = pb::EnrollRequest { patients };
        Ok(self
            .records
            .clone()
            .enroll(self.sign(m::ENROLL, req))
            .await?
            .into_inner()
            .created)
    }

    /// Sends a patient's signed erasure request; the receipts the broker answers with,
    /// not yet checked (see [`pre_kms::erasure::check_bundle`]).
    pub async fn erase(
        &self,
        request: &pre_kms::erasure::ErasureRequest,
    ) -> ClientResult<Vec<pre_kms::erasure::ErasureReceipt>> {
        let req = pb::EraseRequest {
            request: Some(broker_proto::convert::erasure_request_to_pb(request)),
        };
        let reply = self
            .records
            .clone()
            .erase(self.sign(m::ERASE, req))
            .await?
            .into_inner();
        reply
            .receipts
            .into_iter()
            .map(|r| {
                broker_proto::convert::erasure_receipt_from_pb(r).map_err(|s| {
                    ClientError::Invalid(format!(
                        "the broker sent a malformed receipt: {}",
                        s.message()
                    ))
                })
            })
            .collect()
    }

    /// Uploads envelopes and index rows; answers with a receipt per envelope.
    pub async fn upload(&self, upload: Upload) -> ClientResult<UploadReceipt> {
        Ok(upload_receipt_from_pb(
            self.records
                .clone()
                .upload(self.sign(m::UPLOAD, upload_to_pb(upload)))
                .await?
                .into_inner(),
        )?)
    }

    pub async fn propose_study(&self, proposal: &StudyProposal) -> ClientResult<Study> {
        study(
            self.studies
                .clone()
                .propose(self.sign(m::PROPOSE, proposal_to_pb(proposal)))
                .await?
                .into_inner(),
        )
    }

    /// Approves or rejects, signing the study's full proposal and the decision.
    pub async fn decide_study(
        &self,
        study_id: &str,
        approve: bool,
        overrides_abstain: bool,
        reason: &str,
    ) -> ClientResult<Study> {
        let current = self.get_study(study_id).await?;
        if approve {
            // The approval signature vouches for the receiving key: check that it is the
            // named researcher's own, as registered with its key binding.
            let researcher = self
                .list_actors()
                .await?
                .into_iter()
                .find(|a| a.actor_id == current.proposal.researcher_id)
                .ok_or_else(|| {
                    ClientError::Invalid(format!(
                        "refusing to approve study {study_id}: its researcher is not registered"
                    ))
                })?;
            pre_kms::keys::check_receiving_key(&researcher, &current.proposal.receiving_key)
                .map_err(|e| {
                    ClientError::Invalid(format!("refusing to approve study {study_id}: {e}"))
                })?;
        }
        let signature = self.identity.sign(&decision_digest(
            study_id,
            &current.proposal,
            approve,
            overrides_abstain,
        ));
        let req = pb::DecideStudyRequest {
            study_id: study_id.to_owned(),
            approve,
            reason: reason.to_owned(),
            signature,
            overrides_abstain,
        };
        study(
            self.studies
                .clone()
                .decide(self.sign(m::DECIDE, req))
                .await?
                .into_inner(),
        )
    }

    pub async fn list_studies(&self) -> ClientResult<Vec<Study>> {
        self.studies
            .clone()
            .list(self.sign(m::LIST_STUDIES, pb::ListStudiesRequest {}))
            .await?
            .into_inner()
            .studies
            .into_iter()
            .map(study)
            .collect()
    }

    pub async fn get_study(&self, study_id: &str) -> ClientResult<Study> {
        let req = pb::GetStudyRequest {
            study_id: study_id.to_owned(),
        };
        study(
            self.studies
                .clone()
                .get(self.sign(m::GET_STUDY, req))
                .await?
                .into_inner(),
        )
    }

    /// Withdraws these (study id, pseudonym) grants; returns (withdrawn, proxies that
    /// confirmed destroying the kfrags).
    pub async fn withdraw_grants(
        &self,
        grants: &[(String, String)],
        reason: &str,
    ) -> ClientResult<(u32, u32)> {
        let req = pb::WithdrawGrantsRequest {
            grants: broker_proto::convert::grant_refs(grants),
            reason: reason.to_owned(),
        };
        let r = self
            .grants
            .clone()
            .withdraw(self.sign(m::WITHDRAW_GRANTS, req))
            .await?
            .into_inner();
        Ok((r.withdrawn, r.proxies_confirmed))
    }

    pub async fn issue_grants(&self, grants: Vec<Grant>) -> ClientResult<Vec<String>> {
        let req = pb::IssueGrantsRequest {
            grants: grants.into_iter().map(grant_to_pb).collect(),
        };
        Ok(self
            .grants
            .clone()
            .issue(self.sign(m::ISSUE_GRANTS, req))
            .await?
            .into_inner()
            .grant_ids)
    }

    pub async fn request_release(&self, study_id: &str) -> ClientResult<Release> {
        let req = pb::RequestReleaseRequest {
            study_id: study_id.to_owned(),
        };
        Ok(release_from_pb(
            self.releases
                .clone()
                .request(self.sign(m::REQUEST_RELEASE, req))
                .await?
                .into_inner(),
        ))
    }

    pub async fn fetch_release(
        &self,
        release_id: &str,
    ) -> ClientResult<tonic::Streaming<pb::ReleaseItem>> {
        let req = pb::FetchReleaseRequest {
            release_id: release_id.to_owned(),
        };
        Ok(self
            .releases
            .clone()
            .fetch(self.sign(m::FETCH_RELEASE, req))
            .await?
            .into_inner())
    }

    // ------------------------------------------------------------ break-glass

    pub async fn register_emergency_org(
        &self,
        org: EmergencyOrganisation,
    ) -> ClientResult<EmergencyOrganisation> {
        let req = self.sign(m::REGISTER_EMERGENCY_ORG, emergency_org_to_pb(org));
        let org = self.emergency.clone().register_organisation(req).await?;
        Ok(emergency_org_from_pb(org.into_inner()))
    }

    /// The emergency organisations as the broker lists them (not trusted: a patient's
    /// agent grants only to those its pinned network lists).
    pub async fn emergency_orgs(&self) -> ClientResult<Vec<EmergencyOrganisation>> {
        let req = self.sign(
            m::LIST_EMERGENCY_ORGS,
            pb::ListEmergencyOrganisationsRequest {},
        );
        let list = self.emergency.clone().list_organisations(req).await?;
        Ok(list
            .into_inner()
            .organisations
            .into_iter()
            .map(emergency_org_from_pb)
            .collect())
    }

    /// Breaks the glass for the patient a card or a pseudonym names; the answer is not
    /// yet checked (`agent::break_glass` verifies and decrypts it).
    pub async fn break_glass(
        &self,
        pseudonym: &str,
        card: &str,
        reason: &str,
    ) -> ClientResult<BreakGlassAnswer> {
        let req = pb::BreakGlassRequest {
            pseudonym: pseudonym.to_owned(),
            card: card.to_owned(),
            reason: reason.to_owned(),
        };
        let answer = self
            .emergency
            .clone()
            .break_glass(self.sign(m::BREAK_GLASS, req))
            .await?;
        BreakGlassAnswer::from_pb(answer.into_inner())
    }

    pub async fn reopen_break_glass(&self, access_id: &str) -> ClientResult<BreakGlassAnswer> {
        let req = pb::ReopenBreakGlassRequest {
            access_id: access_id.to_owned(),
        };
        let answer = self
            .emergency
            .clone()
            .reopen(self.sign(m::REOPEN_BREAK_GLASS, req))
            .await?;
        BreakGlassAnswer::from_pb(answer.into_inner())
    }

    pub async fn break_glass_accesses(
        &self,
        unreviewed_only: bool,
    ) -> ClientResult<Vec<BreakGlassAccess>> {
        let req = self.sign(
            m::LIST_BREAK_GLASS,
            pb::ListBreakGlassRequest { unreviewed_only },
        );
        let list = self.emergency.clone().list_accesses(req).await?;
        Ok(list
            .into_inner()
            .accesses
            .into_iter()
            .map(break_glass_from_pb)
            .collect::<Result<_, _>>()?)
    }

    pub async fn review_break_glass(
        &self,
        access_id: &str,
        finding: &str,
        note: &str,
    ) -> ClientResult<BreakGlassAccess> {
        let req = pb::ReviewBreakGlassRequest {
            access_id: access_id.to_owned(),
            finding: finding.to_owned(),
            note: note.to_owned(),
        };
        let reviewed = self
            .emergency
            .clone()
            .review(self.sign(m::REVIEW_BREAK_GLASS, req))
            .await?;
        Ok(break_glass_from_pb(reviewed.into_inner())?)
    }

    // ------------------------------------------------------------ access log

    pub async fn log_checkpoint(&self) -> ClientResult<pb::CheckpointResponse> {
        let req = self.sign(m::AUDIT_CHECKPOINT, pb::CheckpointRequest {});
        Ok(self.audit.clone().checkpoint(req).await?.into_inner())
    }

    pub async fn log_checkpoints(&self, after_size: u64) -> ClientResult<Vec<String>> {
        let req = self.sign(m::AUDIT_CHECKPOINTS, pb::CheckpointsRequest { after_size });
        Ok(self
            .audit
            .clone()
            .checkpoints(req)
            .await?
            .into_inner()
            .checkpoints)
    }

    pub async fn log_consistency(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> ClientResult<Vec<Vec<u8>>> {
        let req = self.sign(
            m::AUDIT_CONSISTENCY,
            pb::ConsistencyRequest { old_size, new_size },
        );
        Ok(self.audit.clone().consistency(req).await?.into_inner().path)
    }

    /// Every logged event matching `filter`, oldest first.
    pub async fn log_events(&self, filter: EventFilter) -> ClientResult<Vec<LoggedEvent>> {
        let req = self.sign(m::AUDIT_EVENTS, event_filter_to_pb(filter));
        let mut stream = self.audit.clone().events(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(e) = stream.message().await? {
            out.push(logged_event_from_pb(e)?);
        }
        Ok(out)
    }

    pub async fn log_cosign(&self, checkpoint: String) -> ClientResult<u32> {
        let req = self.sign(m::AUDIT_COSIGN, pb::CosignRequest { checkpoint });
        Ok(self
            .audit
            .clone()
            .cosign(req)
            .await?
            .into_inner()
            .signatures)
    }

    pub async fn log_accesses(&self) -> ClientResult<LogExcerpt> {
        let req = self.sign(m::AUDIT_ACCESSES, pb::AccessesRequest {});
        let r = self.audit.clone().accesses(req).await?.into_inner();
        LogExcerpt::from_pb(r.checkpoint, r.events)
    }

    /// Erasure notices to the caller's studies (or to one).
    pub async fn log_notices(&self, study_id: Option<&str>) -> ClientResult<LogExcerpt> {
        let req = self.sign(
            m::AUDIT_NOTICES,
            pb::NoticesRequest {
                study_id: study_id.unwrap_or_default().to_owned(),
            },
        );
        let r = self.audit.clone().notices(req).await?.into_inner();
        LogExcerpt::from_pb(r.checkpoint, r.events)
    }

    pub async fn log_alerts(&self, acknowledge_through: Option<u64>) -> ClientResult<LogExcerpt> {
        let req = self.sign(
            m::AUDIT_ALERTS,
            pb::AlertsRequest {
                acknowledge_through: acknowledge_through.unwrap_or(0),
                acknowledge: acknowledge_through.is_some(),
            },
        );
        let r = self.audit.clone().alerts(req).await?.into_inner();
        LogExcerpt::from_pb(r.checkpoint, r.events)
    }

    // ------------------------------------------------------------ consents

    /// Sets new policy versions, each already signed by its patient.
    pub async fn set_consents(
        &self,
        consents: Vec<ConsentSubmission>,
    ) -> ClientResult<Vec<ConsentReceipt>> {
        let consents = consents.into_iter().map(consent_submission_to_pb).collect();
        let req = self.sign(m::SET_CONSENTS, pb::SetConsentsRequest { consents });
        Ok(self
            .consents
            .clone()
            .set(req)
            .await?
            .into_inner()
            .receipts
            .into_iter()
            .map(consent_receipt_from_pb)
            .collect())
    }

    pub async fn consent_history(&self, pseudonym: &str) -> ClientResult<Vec<pb::ConsentVersion>> {
        let req = self.sign(
            m::CONSENT_HISTORY,
            pb::ConsentHistoryRequest {
                pseudonym: pseudonym.to_owned(),
            },
        );
        Ok(self
            .consents
            .clone()
            .history(req)
            .await?
            .into_inner()
            .versions)
    }

    // ------------------------------------------------------------ feasibility

    /// A cohort count for a study: protected for its sponsor, exact for the board.
    pub async fn count(
        &self,
        study_id: &str,
        definition: &[u8],
    ) -> ClientResult<pb::CountResponse> {
        let req = self.sign(
            m::COUNT,
            pb::CountRequest {
                study_id: study_id.to_owned(),
                definition: definition.to_vec(),
            },
        );
        Ok(self.feasibility.clone().count(req).await?.into_inner())
    }

    /// Adds ancestor → descendant code relations (`system:code`), in calls of at most
    /// 10,000; returns how many were new and how many the broker holds.
    pub async fn put_concepts(&self, relations: &[(String, String)]) -> ClientResult<(u64, u64)> {
        let (mut added, mut total) = (0, 0);
        for chunk in relations.chunks(10_000) {
            let req = self.sign(
                m::PUT_CONCEPTS,
                pb::PutConceptsRequest {
                    relations: chunk
                        .iter()
                        .map(|(a, d)| pb::ConceptRelation {
                            ancestor: a.clone(),
                            descendant: d.clone(),
                        })
                        .collect(),
                },
            );
            let r = self
                .feasibility
                .clone()
                .put_concepts(req)
                .await?
                .into_inner();
            added += u64::from(r.added);
            total = r.total;
        }
        Ok((added, total))
    }
}
