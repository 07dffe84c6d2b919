//! The broker's view of its proxy nodes: gRPC clients, in the fixed order that grants
//! seal kfrags in. Calls are signed with the broker's own key. This is the broker's
//! adapter to `broker.v1.Proxy`: the service hands it domain values and it converts.

use broker_proto::MAX_MESSAGE_BYTES;
use broker_proto::convert::logged_event_to_pb;
use broker_proto::methods::{
    PROXY_DEPOSIT, PROXY_ERASE, PROXY_INFO, PROXY_REENCRYPT, PROXY_REVOKE,
};
use broker_proto::signed::signed;
use broker_proto::tls::ClientTls;
use broker_proto::v1 as pb;
use model::Category;
use pre_kms::Identity;
use pre_kms::logged_release::LoggedRelease;
use proxy::ReencryptRequest;
use tonic::transport::Channel;

use crate::error::{ServiceError, ServiceResult};
use crate::storage::db::ProxyRow;

#[derive(Clone)]
pub struct ProxyHandle {
    pub url: String,
    pub info: ProxyRow,
    client: pb::proxy_client::ProxyClient<Channel>,
}

/// One sealed kfrag for one proxy, with the claim the proxy checks it against.
#[derive(Debug, Clone)]
pub struct KfragDeposit {
    pub grant_id: String,
    pub study_id: String,
    pub pseudonym: String,
    pub category: Category,
    pub expires_at: i64,
    pub patient_verifying_key: Vec<u8>,
    pub delegating_key: Vec<u8>,
    pub receiving_key: Vec<u8>,
    pub sealed_kfrag: Vec<u8>,
}

impl KfragDeposit {
    fn into_pb(self) -> pb::KfragDeposit {
        pb::KfragDeposit {
            grant_id: self.grant_id,
            study_id: self.study_id,
            pseudonym: self.pseudonym,
            category: self.category.label().to_owned(),
            expires_at: self.expires_at,
            patient_verifying_key: self.patient_verifying_key,
            delegating_key: self.delegating_key,
            receiving_key: self.receiving_key,
            sealed_kfrag: self.sealed_kfrag,
        }
    }
}

/// A proxy that could not be reached or refused a call. Messages name the proxy and the
/// transport's reason, never a key or a record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy address {url}: {reason}")]
    Address { url: String, reason: String },
    #[error("cannot reach proxy {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("proxy {url} refused to identify itself: {message}")]
    Unidentified { url: String, message: String },
    #[error("proxy {index}: {message}")]
    Refused { index: usize, message: String },
}

#[derive(Clone)]
pub struct ProxyPool {
    identity: Identity,
    proxies: Vec<ProxyHandle>,
}

impl ProxyPool {
    /// Connects to each proxy (its certificate pinned) and asks who it is.
    pub async fn connect(
        identity: Identity,
        proxies_at: &[(String, ClientTls)],
    ) -> Result<ProxyPool, ProxyError> {
        let mut proxies = Vec::with_capacity(proxies_at.len());
        for (url, tls) in proxies_at {
            let channel = tls
                .endpoint(url)
                .map_err(|e| ProxyError::Address {
                    url: url.clone(),
                    reason: e.to_string(),
                })?
                .connect_timeout(std::time::Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| ProxyError::Unreachable {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
            let mut client = pb::proxy_client::ProxyClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let info = client
                .info(signed(&identity, PROXY_INFO, pb::ProxyInfoRequest {}))
                .await
                .map_err(|e| ProxyError::Unidentified {
                    url: url.clone(),
                    message: e.message().to_owned(),
                })?
                .into_inner();
            proxies.push(ProxyHandle {
                url: url.clone(),
                info: ProxyRow {
                    proxy_id: info.proxy_id,
                    encryption_key: info.encryption_key,
                    verifying_key: info.verifying_key,
                },
                client,
            });
        }
        Ok(ProxyPool { identity, proxies })
    }

    pub fn len(&self) -> usize {
        self.proxies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.proxies.is_empty()
    }

    pub fn handles(&self) -> &[ProxyHandle] {
        &self.proxies
    }

    /// Asks proxy `index` to destroy the kfrags of these (study, pseudonym) grants.
    pub async fn revoke(
        &self,
        index: usize,
        grants: &[(String, String)],
    ) -> Result<u32, ProxyError> {
        let mut client = self.proxies[index].client.clone();
        let req = pb::RevokeRequest {
            grants: broker_proto::convert::grant_refs(grants),
        };
        let reply = client
            .revoke(signed(&self.identity, PROXY_REVOKE, req))
            .await
            .map_err(|s| ProxyError::Refused {
                index,
                message: s.message().to_owned(),
            })?;
        Ok(reply.into_inner().destroyed)
    }

    /// Asks proxy `index` to carry out a patient's erasure request; its receipt, checked
    /// to be signed by that proxy's key and for this request.
    pub async fn erase(
        &self,
        index: usize,
        request: &pre_kms::erasure::VerifiedErasureRequest,
    ) -> Result<pre_kms::erasure::ErasureReceipt, ProxyError> {
        let p = &self.proxies[index];
        let mut client = p.client.clone();
        let req = pb::EraseRequest {
            request: Some(broker_proto::convert::erasure_request_to_pb(
                request.request(),
            )),
        };
        let refused = |message: String| ProxyError::Refused { index, message };
        let reply = client
            .erase(signed(&self.identity, PROXY_ERASE, req))
            .await
            .map_err(|s| refused(s.message().to_owned()))?;
        let receipt = broker_proto::convert::erasure_receipt_from_pb(reply.into_inner())
            .map_err(|s| refused(s.message().to_owned()))?;
        let theirs = hex::decode(&receipt.verifying_key).is_ok_and(|k| k == p.info.verifying_key);
        if !theirs || receipt.verify_for(request).is_err() {
            return Err(refused("its erasure receipt does not verify".into()));
        }
        Ok(receipt)
    }

    pub async fn deposit(&self, index: usize, deposits: Vec<KfragDeposit>) -> ServiceResult<u32> {
        let p = &self.proxies[index];
        let mut client = p.client.clone();
        let deposits = deposits.into_iter().map(KfragDeposit::into_pb).collect();
        let reply = client
            .deposit(signed(
                &self.identity,
                PROXY_DEPOSIT,
                pb::DepositRequest { deposits },
            ))
            .await
            .map_err(|s| match s.code() {
                tonic::Code::InvalidArgument => ServiceError::InvalidArgument(format!(
                    "proxy {index} rejected a kfrag: {}",
                    s.message()
                )),
                _ => ServiceError::Unavailable(format!(
                    "proxy {index} did not accept the deposit: {}",
                    s.message()
                )),
            })?;
        Ok(reply.into_inner().accepted)
    }

    /// Asks proxy `index` to re-encrypt `items` for the release `evidence` proves logged.
    /// An empty fragment stands for an item the proxy withheld.
    pub async fn reencrypt(
        &self,
        index: usize,
        evidence: LoggedRelease,
        items: Vec<ReencryptRequest>,
    ) -> Result<Vec<Vec<u8>>, ProxyError> {
        let p = &self.proxies[index];
        let mut client = p.client.clone();
        let request = pb::ReencryptRequest {
            release_id: evidence.release_id,
            items: items
                .into_iter()
                .map(|i| pb::ReencryptItem {
                    study_id: i.study_id,
                    pseudonym: i.pseudonym,
                    category: i.category.label().to_owned(),
                    capsule: i.capsule,
                })
                .collect(),
            checkpoint: evidence.checkpoint,
            events: evidence.events.iter().map(logged_event_to_pb).collect(),
        };
        let reply = client
            .reencrypt(signed(&self.identity, PROXY_REENCRYPT, request))
            .await
            .map_err(|s| ProxyError::Refused {
                index,
                message: s.message().to_owned(),
            })?;
        Ok(reply.into_inner().cfrags)
    }
}
