//! Proxies that lie to the broker, for the tests of what the broker must not believe: an
//! honest proxy node behind hooks where a test answers what a dishonest proxy (or a man
//! in the middle) would.

use broker_proto::v1 as pb;
use proxy::ProxyService;
use tonic::{Request, Response, Status};

/// What a test changes of an honest proxy's answers. Each hook answers honestly unless
/// the test overrides it.
#[tonic::async_trait]
pub trait Tamper: Send + Sync + 'static {
    async fn reencrypt(
        &self,
        honest: &ProxyService,
        r: Request<pb::ReencryptRequest>,
    ) -> Result<Response<pb::ReencryptResponse>, Status> {
        pb::proxy_server::Proxy::reencrypt(honest, r).await
    }

    async fn erase(
        &self,
        honest: &ProxyService,
        r: Request<pb::EraseRequest>,
    ) -> Result<Response<pb::ErasureReceipt>, Status> {
        pb::proxy_server::Proxy::erase(honest, r).await
    }
}

/// An honest proxy whose re-encryptions and erasures go through `tamper`.
pub struct Tampered<T> {
    pub honest: ProxyService,
    pub tamper: T,
}

#[tonic::async_trait]
impl<T: Tamper> pb::proxy_server::Proxy for Tampered<T> {
    async fn info(
        &self,
        r: Request<pb::ProxyInfoRequest>,
    ) -> Result<Response<pb::ProxyInfo>, Status> {
        self.honest.info(r).await
    }
    async fn deposit(
        &self,
        r: Request<pb::DepositRequest>,
    ) -> Result<Response<pb::DepositResponse>, Status> {
        self.honest.deposit(r).await
    }
    async fn revoke(
        &self,
        r: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        self.honest.revoke(r).await
    }
    async fn erase(
        &self,
        r: Request<pb::EraseRequest>,
    ) -> Result<Response<pb::ErasureReceipt>, Status> {
        self.tamper.erase(&self.honest, r).await
    }
    async fn reencrypt(
        &self,
        r: Request<pb::ReencryptRequest>,
    ) -> Result<Response<pb::ReencryptResponse>, Status> {
        self.tamper.reencrypt(&self.honest, r).await
    }
}

/// Serves `proxy` over plain http on a loopback port, in the background; its address.
pub async fn serve_on_loopback<P: pb::proxy_server::Proxy>(proxy: P) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(pb::proxy_server::ProxyServer::new(proxy))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    url
}
