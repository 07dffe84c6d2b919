//! The broker's view of its proxy nodes: gRPC clients, in the fixed order that grants
//! seal kfrags in. Calls are signed with the broker's own key.

use broker_proto::v1 as pb;
use pre_kms::Identity;
use pre_kms::proxy_grpc::{DEPOSIT, INFO, REENCRYPT, REVOKE};
use pre_kms::request_auth::signed;
use tonic::transport::{Channel, Endpoint};

use crate::error::{ServiceError, ServiceResult};
use crate::storage::db::ProxyRow;

#[derive(Clone)]
pub struct ProxyHandle {
    pub url: String,
    pub info: ProxyRow,
    client: pb::proxy_client::ProxyClient<Channel>,
}

/// What a re-encryption request carries to prove its release is in the access log.
#[derive(Debug, Clone)]
pub struct ReleaseEvidence {
    pub release_id: String,
    /// The broker-signed checkpoint, as a signed note.
    pub checkpoint: String,
    pub events: Vec<pb::LoggedEvent>,
}

#[derive(Clone)]
pub struct ProxyPool {
    identity: Identity,
    proxies: Vec<ProxyHandle>,
}

impl ProxyPool {
    /// Connects to each proxy and asks who it is.
    pub async fn connect(identity: Identity, urls: &[String]) -> Result<ProxyPool, String> {
        let mut proxies = Vec::with_capacity(urls.len());
        for url in urls {
            let channel = Endpoint::from_shared(url.clone())
                .map_err(|e| format!("proxy address {url}: {e}"))?
                .connect_timeout(std::time::Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| format!("cannot reach proxy {url}: {e}"))?;
            let mut client = pb::proxy_client::ProxyClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            let info = client
                .info(signed(&identity, INFO, pb::ProxyInfoRequest {}))
                .await
                .map_err(|e| format!("proxy {url} refused to identify itself: {}", e.message()))?
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
    pub async fn revoke(&self, index: usize, grants: &[(String, String)]) -> Result<u32, String> {
        let mut client = self.proxies[index].client.clone();
        let req = pb::RevokeRequest {
            grants: crate::convert::grant_refs(grants),
        };
        let reply = client
            .revoke(signed(&self.identity, REVOKE, req))
            .await
            .map_err(|s| format!("proxy {index}: {}", s.message()))?;
        Ok(reply.into_inner().destroyed)
    }

    pub async fn deposit(
        &self,
        index: usize,
        deposits: Vec<pb::KfragDeposit>,
    ) -> ServiceResult<u32> {
        let p = &self.proxies[index];
        let mut client = p.client.clone();
        let reply = client
            .deposit(signed(
                &self.identity,
                DEPOSIT,
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

    pub async fn reencrypt(
        &self,
        index: usize,
        evidence: ReleaseEvidence,
        items: Vec<pb::ReencryptItem>,
    ) -> Result<Vec<Vec<u8>>, String> {
        let p = &self.proxies[index];
        let mut client = p.client.clone();
        let reply = client
            .reencrypt(signed(
                &self.identity,
                REENCRYPT,
                pb::ReencryptRequest {
                    release_id: evidence.release_id,
                    items,
                    checkpoint: evidence.checkpoint,
                    events: evidence.events,
                },
            ))
            .await
            .map_err(|s| format!("proxy {index}: {}", s.message()))?;
        Ok(reply.into_inner().cfrags)
    }
}
