//! The tonic adapter: authenticates, converts, calls the domain service, maps errors
//! ([`status`]).

mod status;

use std::pin::Pin;
use std::sync::Arc;

use broker_proto::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use broker_proto::convert::*;
use broker_proto::methods as m;
use broker_proto::signed;
use model::{Actor, Caller, Enrollment};

use crate::error::{ServiceError, ServiceResult};
use crate::service::Broker;

#[derive(Clone)]
pub struct Grpc(pub Arc<Broker>);

impl Grpc {
    /// Authenticates the request's credentials and checks the caller's role for
    /// `method` against the one access table.
    fn authorize<T: prost::Message>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<Caller, Status> {
        Ok(self.0.authorize(&signed::call(request), method)?)
    }
}

/// An interceptor for the services that take large bodies: it checks the credentials as
/// far as they go without the body (well-formed, fresh, a known actor), so that nothing
/// is decoded for a caller who cannot be who it claims.
pub fn precheck(
    broker: Arc<Broker>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        broker.precheck(&signed::credentials(req.metadata()))?;
        Ok(req)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ServiceResult<T> + Send + 'static,
) -> Result<T, Status> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(ServiceError::internal)??)
}

#[tonic::async_trait]
impl pb::registry_server::Registry for Grpc {
    async fn register_actor(
        &self,
        req: Request<pb::RegisterActorRequest>,
    ) -> Result<Response<pb::Actor>, Status> {
        self.authorize(&req, m::REGISTER_ACTOR)?;
        let r = req.into_inner();
        let actor = Actor {
            actor_id: String::new(),
            role: role_from_pb(r.role)?,
            name: r.name,
            organisation: r.organisation,
            verifying_key: r.verifying_key,
            encryption_key: r.encryption_key,
            key_binding: r.key_binding,
        };
        let b = self.0.clone();
        Ok(Response::new(actor_to_pb(
            blocking(move || b.register_actor(actor)).await?,
        )))
    }

    async fn list_actors(
        &self,
        req: Request<pb::ListActorsRequest>,
    ) -> Result<Response<pb::ListActorsResponse>, Status> {
        self.authorize(&req, m::LIST_ACTORS)?;
        Ok(Response::new(pb::ListActorsResponse {
            actors: self.0.list_actors().into_iter().map(actor_to_pb).collect(),
        }))
    }

    async fn whoami(&self, req: Request<pb::WhoamiRequest>) -> Result<Response<pb::Actor>, Status> {
        let caller = self.authorize(&req, m::WHOAMI)?;
        let actor = self
            .0
            .actor(&caller.actor_id)
            .ok_or_else(|| Status::not_found("caller not found"))?;
        Ok(Response::new(actor_to_pb(actor)))
    }

    async fn list_proxies(
        &self,
        req: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        self.authorize(&req, m::LIST_PROXIES)?;
        let proxies = self
            .0
            .proxies()
            .handles()
            .iter()
            .map(|h| pb::ProxyInfo {
                proxy_id: h.info.proxy_id.clone(),
                encryption_key: h.info.encryption_key.clone(),
                verifying_key: h.info.verifying_key.clone(),
            })
            .collect();
        Ok(Response::new(pb::ListProxiesResponse {
            proxies,
            threshold: self.0.threshold() as u32,
        }))
    }
}

#[tonic::async_trait]
impl pb::records_server::Records for Grpc {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let caller = self.authorize(&req, m::ENROLL)?;
        let enrollments = req
            .into_inner()
            .patients
            .into_iter()
            .map(|r| {
                Ok(Enrollment {
                    pseudonym: r.pseudonym,
                    verifying_key: r.verifying_key,
                    category_keys: r
                        .category_keys
                        .into_iter()
                        .map(|k| Ok((category_from_pb(&k.category)?, k.public_key)))
                        .collect::<ServiceResult<_>>()?,
                    signature: r.signature,
                })
            })
            .collect::<ServiceResult<Vec<_>>>()?;
        let b = self.0.clone();
        let created = blocking(move || b.enroll(&caller, enrollments)).await?;
        Ok(Response::new(pb::EnrollResponse { created }))
    }

    async fn upload(
        &self,
        req: Request<pb::UploadRequest>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let caller = self.authorize(&req, m::UPLOAD)?;
        let r = req.into_inner();
        let upload = upload_from_pb(r)?;
        let b = self.0.clone();
        let (receipts, index_patients) = blocking(move || b.upload(&caller, upload)).await?;
        Ok(Response::new(upload_receipt_to_pb(model::UploadReceipt {
            receipts,
            index_patients,
        })))
    }

    async fn erase(
        &self,
        req: Request<pb::EraseRequest>,
    ) -> Result<Response<pb::EraseResponse>, Status> {
        let caller = self.authorize(&req, m::ERASE)?;
        let request = req
            .into_inner()
            .request
            .ok_or_else(|| Status::invalid_argument("the erasure request is missing"))?;
        let request = broker_proto::convert::erasure_request_from_pb(request);
        let receipts = self.0.erase(caller, request).await?;
        Ok(Response::new(pb::EraseResponse {
            receipts: receipts
                .iter()
                .map(broker_proto::convert::erasure_receipt_to_pb)
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl pb::studies_server::Studies for Grpc {
    async fn propose(
        &self,
        req: Request<pb::StudyProposal>,
    ) -> Result<Response<pb::Study>, Status> {
        let caller = self.authorize(&req, m::PROPOSE)?;
        let proposal = proposal_from_pb(req.into_inner())?;
        let b = self.0.clone();
        Ok(Response::new(study_to_pb(
            blocking(move || b.propose_study(&caller, proposal)).await?,
        )))
    }

    async fn decide(
        &self,
        req: Request<pb::DecideStudyRequest>,
    ) -> Result<Response<pb::Study>, Status> {
        let caller = self.authorize(&req, m::DECIDE)?;
        let r = req.into_inner();
        let b = self.0.clone();
        let study = blocking(move || {
            b.decide_study(
                &caller,
                &r.study_id,
                r.approve,
                r.overrides_abstain,
                r.reason,
                r.signature,
            )
        })
        .await?;
        Ok(Response::new(study_to_pb(study)))
    }

    async fn list(
        &self,
        req: Request<pb::ListStudiesRequest>,
    ) -> Result<Response<pb::ListStudiesResponse>, Status> {
        self.authorize(&req, m::LIST_STUDIES)?;
        let b = self.0.clone();
        let studies = blocking(move || b.studies()).await?;
        Ok(Response::new(pb::ListStudiesResponse {
            studies: studies.into_iter().map(study_to_pb).collect(),
        }))
    }

    async fn get(&self, req: Request<pb::GetStudyRequest>) -> Result<Response<pb::Study>, Status> {
        self.authorize(&req, m::GET_STUDY)?;
        let id = req.into_inner().study_id;
        let b = self.0.clone();
        Ok(Response::new(study_to_pb(
            blocking(move || b.study(&id)).await?,
        )))
    }
}

#[tonic::async_trait]
impl pb::grants_server::Grants for Grpc {
    async fn issue(
        &self,
        req: Request<pb::IssueGrantsRequest>,
    ) -> Result<Response<pb::IssueGrantsResponse>, Status> {
        let caller = self.authorize(&req, m::ISSUE_GRANTS)?;
        let grants = req
            .into_inner()
            .grants
            .into_iter()
            .map(grant_from_pb)
            .collect::<Result<Vec<_>, Malformed>>()?;
        let outcome = self.0.issue_grants(caller, grants).await?;
        Ok(Response::new(pb::IssueGrantsResponse {
            grant_ids: outcome.grant_ids,
        }))
    }

    async fn withdraw(
        &self,
        req: Request<pb::WithdrawGrantsRequest>,
    ) -> Result<Response<pb::WithdrawGrantsResponse>, Status> {
        let caller = self.authorize(&req, m::WITHDRAW_GRANTS)?;
        let r = req.into_inner();
        let grants = r
            .grants
            .into_iter()
            .map(|g| (g.study_id, g.pseudonym))
            .collect();
        let (withdrawn, confirmed) = self.0.withdraw_grants(caller, grants, r.reason).await?;
        Ok(Response::new(pb::WithdrawGrantsResponse {
            withdrawn: withdrawn as u32,
            proxies_confirmed: confirmed as u32,
        }))
    }
}

type ItemStream = Pin<Box<dyn Stream<Item = Result<pb::ReleaseItem, Status>> + Send>>;

#[tonic::async_trait]
impl pb::releases_server::Releases for Grpc {
    async fn request(
        &self,
        req: Request<pb::RequestReleaseRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        let caller = self.authorize(&req, m::REQUEST_RELEASE)?;
        let study_id = req.into_inner().study_id;
        let b = self.0.clone();
        let r = blocking(move || b.request_release(&caller, &study_id)).await?;
        Ok(Response::new(release_to_pb(model::Release {
            release_id: r.release_id,
            study_id: r.study_id,
            subjects: r.subjects,
            envelopes: r.envelopes,
            created_at: r.created_at,
            threshold: self.0.threshold() as u32,
        })))
    }

    type FetchStream = ItemStream;

    async fn fetch(
        &self,
        req: Request<pb::FetchReleaseRequest>,
    ) -> Result<Response<ItemStream>, Status> {
        let caller = self.authorize(&req, m::FETCH_RELEASE)?;
        let (_, rx) = self
            .0
            .fetch_release(&caller, &req.into_inner().release_id)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let stream = tokio_stream::StreamExt::map(stream, |item| {
            item.map(released_to_pb).map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

fn released_to_pb(i: crate::service::ReleasedItem) -> pb::ReleaseItem {
    pb::ReleaseItem {
        subject: i.subject,
        category: i.category.label().to_owned(),
        version: i.version,
        sealed: i.sealed,
        delegating_key: i.delegating_key,
        verifying_key: i.verifying_key,
        cfrags: i.cfrags,
    }
}

impl Grpc {
    fn break_glass_to_pb(&self, a: crate::service::BreakGlassAnswer) -> pb::BreakGlassResponse {
        pb::BreakGlassResponse {
            access: Some(break_glass_to_pb(a.access)),
            items: a.items.into_iter().map(released_to_pb).collect(),
            threshold: self.0.threshold() as u32,
        }
    }
}

#[tonic::async_trait]
impl pb::emergency_server::Emergency for Grpc {
    async fn register_organisation(
        &self,
        req: Request<pb::EmergencyOrganisation>,
    ) -> Result<Response<pb::EmergencyOrganisation>, Status> {
        self.authorize(&req, m::REGISTER_EMERGENCY_ORG)?;
        let org = emergency_org_from_pb(req.into_inner());
        let b = self.0.clone();
        let stored = blocking(move || b.register_emergency_org(org)).await?;
        Ok(Response::new(emergency_org_to_pb(stored)))
    }

    async fn list_organisations(
        &self,
        req: Request<pb::ListEmergencyOrganisationsRequest>,
    ) -> Result<Response<pb::ListEmergencyOrganisationsResponse>, Status> {
        self.authorize(&req, m::LIST_EMERGENCY_ORGS)?;
        let b = self.0.clone();
        let orgs = blocking(move || b.emergency_orgs()).await?;
        Ok(Response::new(pb::ListEmergencyOrganisationsResponse {
            organisations: orgs.into_iter().map(emergency_org_to_pb).collect(),
        }))
    }

    async fn break_glass(
        &self,
        req: Request<pb::BreakGlassRequest>,
    ) -> Result<Response<pb::BreakGlassResponse>, Status> {
        let caller = self.authorize(&req, m::BREAK_GLASS)?;
        let r = req.into_inner();
        let answer = self
            .0
            .break_glass(caller, r.pseudonym, r.card, r.reason)
            .await?;
        Ok(Response::new(self.break_glass_to_pb(answer)))
    }

    async fn reopen(
        &self,
        req: Request<pb::ReopenBreakGlassRequest>,
    ) -> Result<Response<pb::BreakGlassResponse>, Status> {
        let caller = self.authorize(&req, m::REOPEN_BREAK_GLASS)?;
        let answer = self
            .0
            .reopen_break_glass(caller, req.into_inner().access_id)
            .await?;
        Ok(Response::new(self.break_glass_to_pb(answer)))
    }

    async fn list_accesses(
        &self,
        req: Request<pb::ListBreakGlassRequest>,
    ) -> Result<Response<pb::ListBreakGlassResponse>, Status> {
        self.authorize(&req, m::LIST_BREAK_GLASS)?;
        let unreviewed = req.into_inner().unreviewed_only;
        let b = self.0.clone();
        let list = blocking(move || b.break_glass_accesses(unreviewed)).await?;
        Ok(Response::new(pb::ListBreakGlassResponse {
            accesses: list.into_iter().map(break_glass_to_pb).collect(),
        }))
    }

    async fn review(
        &self,
        req: Request<pb::ReviewBreakGlassRequest>,
    ) -> Result<Response<pb::BreakGlassAccess>, Status> {
        let caller = self.authorize(&req, m::REVIEW_BREAK_GLASS)?;
        let r = req.into_inner();
        let b = self.0.clone();
        let reviewed =
            blocking(move || b.review_break_glass(&caller, &r.access_id, &r.finding, &r.note))
                .await?;
        Ok(Response::new(break_glass_to_pb(reviewed)))
    }
}

fn logged_to_pb(e: pre_kms::logged_release::LoggedEvent) -> pb::LoggedEvent {
    pb::LoggedEvent {
        index: e.index,
        leaf: e.leaf,
        path: e.path.iter().map(|h| h.to_vec()).collect(),
    }
}

fn note(c: &audit_log::SignedCheckpoint) -> Result<String, Status> {
    c.to_note()
        .map_err(|e| ServiceError::internal(format!("checkpoint: {e}")).into())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::LoggedEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::audit_server::Audit for Grpc {
    async fn checkpoint(
        &self,
        req: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        self.authorize(&req, m::AUDIT_CHECKPOINT)?;
        let b = self.0.clone();
        let c = blocking(move || b.checkpoint()).await?;
        Ok(Response::new(pb::CheckpointResponse {
            checkpoint: note(&c)?,
            broker_key: pre_kms::keys::public_key_bytes(&self.0.broker_key()),
        }))
    }

    async fn checkpoints(
        &self,
        req: Request<pb::CheckpointsRequest>,
    ) -> Result<Response<pb::CheckpointsResponse>, Status> {
        self.authorize(&req, m::AUDIT_CHECKPOINTS)?;
        let after = req.into_inner().after_size;
        let b = self.0.clone();
        let all = blocking(move || b.checkpoints_after(after)).await?;
        Ok(Response::new(pb::CheckpointsResponse {
            checkpoints: all.iter().map(note).collect::<Result<_, _>>()?,
        }))
    }

    async fn consistency(
        &self,
        req: Request<pb::ConsistencyRequest>,
    ) -> Result<Response<pb::ConsistencyResponse>, Status> {
        self.authorize(&req, m::AUDIT_CONSISTENCY)?;
        let r = req.into_inner();
        let path = self.0.consistency(r.old_size, r.new_size)?;
        Ok(Response::new(pb::ConsistencyResponse {
            path: path.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        req: Request<pb::EventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.authorize(&req, m::AUDIT_EVENTS)?;
        let r = req.into_inner();
        let mut filter = event_filter_from_pb(r);
        let (tx, rx) = tokio::sync::mpsc::channel(crate::service::EVENTS_PAGE);
        let b = self.0.clone();
        tokio::spawn(async move {
            loop {
                let (b2, f) = (b.clone(), filter.clone());
                let page = match blocking(move || b2.events_page(&f)).await {
                    Ok(p) => p,
                    Err(e) => return drop(tx.send(Err(e)).await),
                };
                let Some(last) = page.last().map(|e| e.index) else {
                    return;
                };
                filter.from_leaf = last + 1;
                for e in page {
                    if tx.send(Ok(logged_to_pb(e))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cosign(
        &self,
        req: Request<pb::CosignRequest>,
    ) -> Result<Response<pb::CosignResponse>, Status> {
        let caller = self.authorize(&req, m::AUDIT_COSIGN)?;
        let checkpoint = req.into_inner().checkpoint;
        let b = self.0.clone();
        let n = blocking(move || b.cosign(&caller, &checkpoint)).await?;
        Ok(Response::new(pb::CosignResponse {
            signatures: n as u32,
        }))
    }

    async fn accesses(
        &self,
        req: Request<pb::AccessesRequest>,
    ) -> Result<Response<pb::AccessesResponse>, Status> {
        let caller = self.authorize(&req, m::AUDIT_ACCESSES)?;
        let b = self.0.clone();
        let (c, events) = blocking(move || b.accesses(&caller)).await?;
        Ok(Response::new(pb::AccessesResponse {
            checkpoint: note(&c)?,
            events: events.into_iter().map(logged_to_pb).collect(),
        }))
    }

    async fn alerts(
        &self,
        req: Request<pb::AlertsRequest>,
    ) -> Result<Response<pb::AlertsResponse>, Status> {
        let caller = self.authorize(&req, m::AUDIT_ALERTS)?;
        let r = req.into_inner();
        let ack = r.acknowledge.then_some(r.acknowledge_through);
        let b = self.0.clone();
        let (c, events) = blocking(move || b.alerts(&caller, ack)).await?;
        Ok(Response::new(pb::AlertsResponse {
            checkpoint: note(&c)?,
            events: events.into_iter().map(logged_to_pb).collect(),
        }))
    }

    async fn notices(
        &self,
        req: Request<pb::NoticesRequest>,
    ) -> Result<Response<pb::AccessesResponse>, Status> {
        let caller = self.authorize(&req, m::AUDIT_NOTICES)?;
        let study = Some(req.into_inner().study_id).filter(|s| !s.is_empty());
        let b = self.0.clone();
        let (c, events) = blocking(move || b.notices(&caller, study.as_deref())).await?;
        Ok(Response::new(pb::AccessesResponse {
            checkpoint: note(&c)?,
            events: events.into_iter().map(logged_to_pb).collect(),
        }))
    }
}

#[tonic::async_trait]
impl pb::consents_server::Consents for Grpc {
    async fn set(
        &self,
        req: Request<pb::SetConsentsRequest>,
    ) -> Result<Response<pb::SetConsentsResponse>, Status> {
        let caller = self.authorize(&req, m::SET_CONSENTS)?;
        let submissions = req
            .into_inner()
            .consents
            .into_iter()
            .map(consent_submission_from_pb)
            .collect();
        let receipts = self.0.set_consents(caller, submissions).await?;
        Ok(Response::new(pb::SetConsentsResponse {
            receipts: receipts.into_iter().map(consent_receipt_to_pb).collect(),
        }))
    }

    async fn history(
        &self,
        req: Request<pb::ConsentHistoryRequest>,
    ) -> Result<Response<pb::ConsentHistoryResponse>, Status> {
        let caller = self.authorize(&req, m::CONSENT_HISTORY)?;
        let pseudonym = req.into_inner().pseudonym;
        let b = self.0.clone();
        let versions = blocking(move || b.consent_history(&caller, &pseudonym)).await?;
        Ok(Response::new(pb::ConsentHistoryResponse {
            versions: versions
                .into_iter()
                .map(|v| pb::ConsentVersion {
                    version: v.policy.version(),
                    issued_at: v.policy.issued_at(),
                    set_at: v.set_at,
                    policy_hash: v.policy.policy_hash().to_hex(),
                    policy: v.policy.canonical_bytes().to_vec(),
                    signature: v.signature,
                })
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl pb::feasibility_server::Feasibility for Grpc {
    async fn count(
        &self,
        req: Request<pb::CountRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        let caller = self.authorize(&req, m::COUNT)?;
        let r = req.into_inner();
        let definition_hash = cohort_query::CohortDefinition::from_json(&r.definition)
            .map(|d| hex::encode(d.normalized().hash.0))
            .unwrap_or_default();
        let b = self.0.clone();
        let answer = blocking(move || b.count_cohort(&caller, &r.study_id, &r.definition)).await?;
        let (count, attrition, exact) = match answer {
            crate::service::CountAnswer::Protected(p) => (
                p.count.to_string(),
                p.attrition
                    .into_iter()
                    .map(|s| pb::AttritionStep {
                        step: s.step as u32,
                        label: s.label,
                        count: s.count.to_string(),
                    })
                    .collect(),
                false,
            ),
            crate::service::CountAnswer::Exact(r) => (
                r.exact.to_string(),
                r.attrition
                    .into_iter()
                    .map(|s| pb::AttritionStep {
                        step: s.step as u32,
                        label: s.label,
                        count: s.exact.to_string(),
                    })
                    .collect(),
                true,
            ),
        };
        Ok(Response::new(pb::CountResponse {
            count,
            attrition,
            exact,
            definition_hash,
        }))
    }

    async fn put_concepts(
        &self,
        req: Request<pb::PutConceptsRequest>,
    ) -> Result<Response<pb::PutConceptsResponse>, Status> {
        let caller = self.authorize(&req, m::PUT_CONCEPTS)?;
        let relations = req
            .into_inner()
            .relations
            .into_iter()
            .map(|r| (r.ancestor, r.descendant))
            .collect();
        let b = self.0.clone();
        let (added, total) = blocking(move || b.put_concepts(&caller, relations)).await?;
        Ok(Response::new(pb::PutConceptsResponse {
            added: added as u32,
            total,
        }))
    }
}
