//! The proxy node's gRPC adapter: `broker.v1.Proxy`, callable only by the broker's key.

use std::future::Future;
use std::sync::Arc;

use broker_proto::MAX_MESSAGE_BYTES;
use broker_proto::convert::logged_release_from_pb;
use broker_proto::convert::{erasure_receipt_to_pb, erasure_request_from_pb};
use broker_proto::methods::{
    PROXY_DEPOSIT, PROXY_ERASE, PROXY_INFO, PROXY_REENCRYPT, PROXY_REVOKE,
};
use broker_proto::signed;
use broker_proto::tls::{ServerTls, TlsError};
use broker_proto::v1 as pb;
use pre_kms::grant::DepositClaim;
use pre_kms::keys::{actor_id, public_key_bytes, public_key_from_bytes};
use pre_kms::request_auth::{ReplayGuard, now_ms};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use umbral_pre::PublicKey;

use crate::node::{Deposit, NodeError, ProxyNode, ReencryptRequest};

pub struct ProxyService {
    node: Arc<ProxyNode>,
    broker_key: PublicKey,
    broker_id: String,
    guard: Arc<ReplayGuard>,
}

impl ProxyService {
    pub fn new(node: Arc<ProxyNode>, broker_key: PublicKey) -> Self {
        ProxyService {
            node,
            broker_id: actor_id(&broker_key),
            broker_key,
            guard: Arc::new(ReplayGuard::default()),
        }
    }

    /// An interceptor that refuses, before a (large) body is decoded, any call that is not
    /// fresh and from the broker's actor id; [`ProxyService`] then checks the signature.
    pub fn precheck(
        &self,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + use<> {
        let (guard, broker_id) = (self.guard.clone(), self.broker_id.clone());
        move |req: Request<()>| {
            let credentials =
                signed::credentials(req.metadata()).map_err(|e| signed::unauthenticated(&e))?;
            guard
                .precheck(&credentials, |actor| actor == broker_id)
                .map_err(|e| signed::unauthenticated(&e))?;
            Ok(req)
        }
    }

    fn authorize<T: prost::Message>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<(), Status> {
        self.guard
            .verify(&signed::call(request), method, |actor| {
                (actor == self.broker_id).then_some(self.broker_key)
            })
            .map_err(|e| signed::unauthenticated(&e))?;
        Ok(())
    }
}

fn category(label: &str) -> Result<model::Category, Status> {
    label
        .parse()
        .map_err(|e: model::UnknownCategory| Status::invalid_argument(e.to_string()))
}

fn key(bytes: &[u8], what: &str) -> Result<PublicKey, Status> {
    public_key_from_bytes(bytes)
        .map_err(|_| Status::invalid_argument(format!("{what} is not a public key")))
}

#[tonic::async_trait]
impl pb::proxy_server::Proxy for ProxyService {
    async fn info(
        &self,
        request: Request<pb::ProxyInfoRequest>,
    ) -> Result<Response<pb::ProxyInfo>, Status> {
        self.authorize(&request, PROXY_INFO)?;
        let id = self.node.identity();
        Ok(Response::new(pb::ProxyInfo {
            proxy_id: id.actor_id(),
            encryption_key: public_key_bytes(&id.encryption_public_key()),
            verifying_key: public_key_bytes(&id.verifying_key()),
        }))
    }

    async fn deposit(
        &self,
        request: Request<pb::DepositRequest>,
    ) -> Result<Response<pb::DepositResponse>, Status> {
        self.authorize(&request, PROXY_DEPOSIT)?;
        let index = self.node.index();
        let deposits = request
            .into_inner()
            .deposits
            .into_iter()
            .map(|d| {
                Ok(Deposit {
                    claim: DepositClaim {
                        grant_id: d.grant_id,
                        study_id: d.study_id,
                        pseudonym: d.pseudonym,
                        category: category(&d.category)?,
                        expires_at: d.expires_at,
                        proxy_index: index,
                        patient_verifying_key: key(
                            &d.patient_verifying_key,
                            "patient verifying key",
                        )?,
                        delegating_key: key(&d.delegating_key, "delegating key")?,
                        receiving_key: key(&d.receiving_key, "receiving key")?,
                    },
                    sealed_kfrag: d.sealed_kfrag,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let node = self.node.clone();
        let accepted = tokio::task::spawn_blocking(move || node.deposit(&deposits))
            .await
            .map_err(|_| Status::internal("deposit task failed"))?
            .map_err(|e| match e {
                NodeError::Rejected(_) => Status::invalid_argument(e.to_string()),
                other => Status::internal(other.to_string()),
            })?;
        Ok(Response::new(pb::DepositResponse {
            accepted: accepted as u32,
        }))
    }

    async fn reencrypt(
        &self,
        request: Request<pb::ReencryptRequest>,
    ) -> Result<Response<pb::ReencryptResponse>, Status> {
        self.authorize(&request, PROXY_REENCRYPT)?;
        let request = request.into_inner();
        let logged =
            logged_release_from_pb(request.release_id, request.checkpoint, request.events)?;
        let items = request
            .items
            .into_iter()
            .map(|i| {
                Ok(ReencryptRequest {
                    study_id: i.study_id,
                    pseudonym: i.pseudonym,
                    category: category(&i.category)?,
                    capsule: i.capsule,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let node = self.node.clone();
        let broker_key = self.broker_key;
        let now = now_ms() / 1000;
        let cfrags = tokio::task::spawn_blocking(move || {
            let release = logged.verify(&broker_key, now).map_err(|e| {
                tracing::warn!(error = %e, "re-encryption refused: release not provably logged");
                Status::failed_precondition(format!(
                    "refusing to re-encrypt: the release is not provably in the audit log ({e})"
                ))
            })?;
            node.reencrypt(&release, &items, now)
                .map_err(|e| Status::internal(e.to_string()))
        })
        .await
        .map_err(|_| Status::internal("re-encryption task failed"))??;
        Ok(Response::new(pb::ReencryptResponse {
            cfrags: cfrags.into_iter().map(Option::unwrap_or_default).collect(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        self.authorize(&request, PROXY_REVOKE)?;
        let grants: Vec<(String, String)> = request
            .into_inner()
            .grants
            .into_iter()
            .map(|g| (g.study_id, g.pseudonym))
            .collect();
        let node = self.node.clone();
        let destroyed = tokio::task::spawn_blocking(move || node.revoke(&grants, now_ms()))
            .await
            .map_err(|_| Status::internal("revocation task failed"))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::RevokeResponse {
            destroyed: destroyed as u32,
        }))
    }

    async fn erase(
        &self,
        request: Request<pb::EraseRequest>,
    ) -> Result<Response<pb::ErasureReceipt>, Status> {
        self.authorize(&request, PROXY_ERASE)?;
        let wire = request
            .into_inner()
            .request
            .ok_or_else(|| Status::invalid_argument("the erasure request is missing"))?;
        // The patient's own signature, not the broker's word, is what erases.
        let verified = erasure_request_from_pb(wire).verify().map_err(|e| {
            Status::invalid_argument(format!("the erasure request is not the patient's: {e}"))
        })?;
        let node = self.node.clone();
        let receipt = tokio::task::spawn_blocking(move || node.erase(&verified, now_ms()))
            .await
            .map_err(|_| Status::internal("erasure task failed"))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(erasure_receipt_to_pb(&receipt)))
    }
}

/// Why a proxy stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot listen: {0}")]
    Listen(#[from] std::io::Error),
}

/// Serves a proxy node on an already bound listener, over `tls`, until `shutdown`
/// resolves.
pub async fn serve(
    listener: TcpListener,
    node: Arc<ProxyNode>,
    broker_key: PublicKey,
    tls: &ServerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let proxy = ProxyService::new(node, broker_key);
    let precheck = proxy.precheck();
    let service = InterceptedService::new(
        pb::proxy_server::ProxyServer::new(proxy)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        precheck,
    );
    let addr = listener.local_addr()?;
    tls.apply(tonic::transport::Server::builder(), addr)?
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
