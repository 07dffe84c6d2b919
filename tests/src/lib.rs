//! Test sandbox: a temporary data directory, a real broker and real proxies on
//! loopback, and registered clients for each role.

use std::path::PathBuf;

use broker::server::{self, RunningBroker, ServeConfig};
use brokerctl::BrokerClient;
use model::Role;
use pre_kms::Identity;
use tokio::net::TcpListener;

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

    pub async fn client(&self, identity: Identity) -> BrokerClient {
        BrokerClient::connect(&self.url, identity)
            .await
            .expect("connect")
    }

    pub async fn operator(&self) -> BrokerClient {
        self.client(self.operator.clone()).await
    }

    /// A new identity registered under `role`, and its client.
    pub async fn actor(&self, role: Role) -> BrokerClient {
        let id = Identity::generate();
        let key = pre_kms::keys::public_key_bytes(&id.verifying_key());
        self.operator()
            .await
            .register_actor(role, &format!("test {role}"), "Test Org", key)
            .await
            .expect("register");
        self.client(id).await
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

pub mod scan;
pub use scan::{files_under, scan_for};
