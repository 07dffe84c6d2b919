//! Test sandbox: a temporary data directory, a real broker and real proxies on
//! loopback, and registered clients for each role.

use std::path::PathBuf;

use broker::server::{self, RunningBroker, ServeConfig};
use broker_cli::demo::Cast;
use broker_proto::tls::ClientTls;
use brokerctl::BrokerClient;
use datasets::{PatientRecord, Population};
use model::Role;
use pre_kms::Identity;
use pre_kms::network::VerifiedNetwork;
use tokio::net::TcpListener;
use tonic::transport::Channel;

/// A cast and its patients, each with its identity and synthetic record.
pub struct World {
    pub cast: Cast,
    pub patients: Vec<(Identity, PatientRecord)>,
}

pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub running: Option<RunningBroker>,
    pub operator: Identity,
    pub url: String,
}

impl Sandbox {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("broker")
    }

    /// A broker with its three embedded proxies (2-of-3).
    pub async fn start() -> Sandbox {
        let dir = tempfile::tempdir().expect("temp dir");
        let operator = Identity::generate();
        let mut sandbox = Sandbox {
            dir,
            running: None,
            operator,
            url: String::new(),
        };
        sandbox.restart_with(|_| {}).await;
        sandbox
    }

    /// Empties the data directory and makes the broker's identity in it, for a test that
    /// starts proxies of its own (trusting that key) before it restarts the broker on
    /// them; the identity.
    pub fn fresh_broker_identity(&self) -> Identity {
        std::fs::remove_dir_all(self.data_dir()).ok();
        std::fs::create_dir_all(self.data_dir()).expect("data dir");
        server::load_or_create_identity(&self.data_dir().join("broker.key"), "broker")
            .expect("broker identity")
    }

    /// Starts (again) on the same data directory, after `configure` adjusts the config.
    pub async fn restart_with(&mut self, configure: impl FnOnce(&mut ServeConfig)) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        let mut config = ServeConfig::new(self.data_dir());
        config.operator = Some(self.operator.public("operator"));
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let running = server::start(listener, config, std::future::pending())
            .await
            .expect("broker starts");
        self.url = running.url();
        self.running = Some(running);
    }

    /// The running broker's service.
    pub fn broker(&self) -> std::sync::Arc<broker::service::Broker> {
        self.running.as_ref().expect("running").broker.clone()
    }

    /// The kfrags each embedded proxy holds, in proxy order.
    pub fn kfrag_counts(&self) -> Vec<i64> {
        self.running
            .as_ref()
            .expect("running")
            .proxies
            .iter()
            .map(|p| p.node.kfrag_count().expect("the proxy's store"))
            .collect()
    }

    pub async fn client(&self, identity: Identity) -> BrokerClient {
        BrokerClient::connect(&self.url, &self.client_tls(), identity)
            .await
            .expect("connect")
    }

    /// How to reach the running broker (its certificate pinned).
    pub fn client_tls(&self) -> ClientTls {
        self.running.as_ref().expect("running").client_tls.clone()
    }

    /// A raw gRPC channel to the running broker, over its pinned TLS.
    pub async fn channel(&self) -> Channel {
        self.client_tls()
            .endpoint(&self.url)
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn operator(&self) -> BrokerClient {
        self.client(self.operator.clone()).await
    }

    /// A new identity registered under `role`, and its client.
    pub async fn actor(&self, role: Role) -> BrokerClient {
        let id = Identity::generate();
        self.operator()
            .await
            .register_actor(
                role,
                &format!("test {role}"),
                "Test Org",
                &id.public(role.as_str()),
            )
            .await
            .expect("register");
        self.client(id).await
    }

    /// A custodian, a sponsor, a board member and a researcher, each registered, and the
    /// network manifest the operator drafts and the board member signs.
    pub async fn cast(&self) -> Cast {
        let custodian = self.actor(Role::Custodian).await;
        let sponsor = self.actor(Role::Sponsor).await;
        let board = self.actor(Role::Board).await;
        let researcher = self.actor(Role::Researcher).await;
        let network = self.network(&board).await;
        Cast {
            custodian,
            sponsor,
            board,
            researcher,
            network,
        }
    }

    /// [`Sandbox::cast`], and `n` patients of the seeded synthetic population enrolled
    /// and uploaded by its custodian, each with the broad research consent.
    pub async fn world(&self, n: usize, seed: u64) -> World {
        let cast = self.cast().await;
        let population = Population::new(seed, n);
        let patients: Vec<(Identity, PatientRecord)> = (0..n)
            .map(|i| (Identity::generate(), population.patient(i)))
            .collect();
        let report = brokerctl::agent::ingest_batch(&cast.custodian, patients.clone())
            .await
            .expect("ingest");
        assert_eq!(report.newly_enrolled, n);
        let ids: Vec<Identity> = patients.iter().map(|(id, _)| id.clone()).collect();
        cast.consent_broadly(&ids).await.expect("consent");
        World { cast, patients }
    }

    /// The network as the running broker lists it, signed by `board`.
    pub async fn network(&self, board: &BrokerClient) -> VerifiedNetwork {
        let running = self.running.as_ref().expect("running");
        let mut manifest = brokerctl::agent::draft_network(
            &self.operator().await,
            &running.public.verifying_key,
            running.client_tls.pinned_pem(),
        )
        .await
        .expect("draft the network manifest");
        manifest.sign(board.identity()).expect("the board signs");
        manifest.verify().expect("a signed manifest verifies")
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

/// Serves a lying broker's `Releases` over plain http on loopback, in the background: a
/// client of it signing as `identity`, and the server's task (abort it when done).
pub async fn hostile_broker(
    releases: impl broker_proto::v1::releases_server::Releases,
    identity: Identity,
) -> (BrokerClient, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(broker_proto::v1::releases_server::ReleasesServer::new(
                releases,
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    let channel = ClientTls::InsecureLoopback
        .endpoint(&url)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    (BrokerClient::from_channel(channel, identity), server)
}

pub mod hostile;
pub mod scan;
pub mod tampered;
pub use scan::{files_under, scan_for};
