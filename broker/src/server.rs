//! Running a broker: its data directory, its proxies, its gRPC server.
//!
//! ```text
//! DATA_DIR/
//!   LOCK              held by the running broker: a second one on the directory refuses
//!   broker.key        the broker's own signing identity (calls to proxies, checkpoints)
//!   broker.db         SQLite metadata, index, studies, grants, releases, log side index
//!   audit/            the access log: leaves.log and checkpoints.log
//!   blobs/            content-addressed envelope blobs
//!   index/            Parquet snapshots of the cohort index (a cache of broker.db's)
//!   proxies/N/        embedded proxy nodes: proxy.key and proxy.db each
//! ```
//!
//! The directory and everything secret in it are owner-only, whatever the umask.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use broker_proto::tls::{ClientTls, ServerCert, ServerTls, TlsError};
use broker_proto::v1 as pb;
use pre_kms::private_fs::{DirLock, LockError, private_dir, private_file};
use pre_kms::{Identity, PublicIdentity};
use proxy::ProxyNode;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::grpc::{Grpc, precheck};
use crate::service::{AccessLog, Broker};
use crate::storage::db::ProxyRow;
use crate::storage::{BlobStore, Db, IndexSnapshots};
use model::{Actor, Role};
use tonic::service::interceptor::InterceptedService;

/// How to run a broker.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// Proxies to start in this process, each on its own loopback port (ignored when
    /// `proxy_urls` is set).
    pub embedded_proxies: usize,
    /// External proxy nodes (`http://host:port`), in order.
    pub proxy_urls: Vec<String>,
    pub threshold: usize,
    /// Registered as the operator at start (needed on first start).
    pub operator: Option<PublicIdentity>,
    /// Each sponsor's feasibility-count allowance.
    pub count_budget: cohort_query::BudgetPolicy,
    /// The external proxies' certificates (their `tls.crt`), pinned, in `proxy_urls` order.
    pub proxy_certs: Vec<PathBuf>,
    /// Names (DNS or IP) this broker's certificate is made for, besides loopback.
    pub tls_names: Vec<String>,
    /// Plain http instead of TLS, for tests: only on loopback addresses.
    pub insecure_loopback: bool,
    /// Break-glass window, rate limit and flag threshold.
    pub break_glass: crate::service::BreakGlassPolicy,
}

impl ServeConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServeConfig {
            data_dir: data_dir.into(),
            embedded_proxies: pre_kms::grant::DEFAULT_SHARES,
            proxy_urls: Vec::new(),
            threshold: pre_kms::grant::DEFAULT_THRESHOLD,
            operator: None,
            count_budget: cohort_query::BudgetPolicy {
                per_minute: 30,
                total: 10_000,
            },
            proxy_certs: Vec::new(),
            tls_names: Vec::new(),
            insecure_loopback: false,
            break_glass: Default::default(),
        }
    }
}

/// Errors that stop a broker from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {0}: {1}")]
    DataDir(PathBuf, String),
    #[error("{0}")]
    Keys(#[from] pre_kms::Error),
    #[error("proxies: {0}")]
    Proxies(String),
    #[error("proxies: {0}")]
    ProxyPool(#[from] crate::proxy_pool::ProxyError),
    #[error("proxy node: {0}")]
    Node(#[from] proxy::NodeError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot listen: {0}")]
    Listen(std::io::Error),
    #[error("{0}")]
    AccessLog(String),
    #[error("{0}")]
    Locked(#[from] LockError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// How a server of this process accepts connections: TLS with the certificate kept in
/// `dir` (made on first start), or plain http on loopback when `insecure`.
pub fn server_tls(dir: &Path, names: &[String], insecure: bool) -> Result<ServerTls, TlsError> {
    Ok(if insecure {
        ServerTls::InsecureLoopback
    } else {
        ServerTls::Tls(ServerCert::load_or_create(dir, names)?)
    })
}

/// Loads the identity at `path`, or makes and saves one.
pub fn load_or_create_identity(path: &Path, role: &str) -> Result<Identity, pre_kms::Error> {
    if path.exists() {
        Ok(Identity::read_key_file(path)?.0)
    } else {
        let id = Identity::generate();
        id.write_key_file(path, role)?;
        Ok(id)
    }
}

/// A proxy node serving on a loopback port in this process.
pub struct EmbeddedProxy {
    pub url: String,
    pub node: Arc<ProxyNode>,
    /// How to reach it: its certificate pinned, or plain http on loopback.
    pub client_tls: ClientTls,
    shutdown: Option<oneshot::Sender<()>>,
    join: JoinHandle<()>,
}

impl EmbeddedProxy {
    pub async fn stop(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        let _ = self.join.await;
    }
}

/// Starts a proxy node from `dir` on `127.0.0.1:0`, callable only by `broker_key`, over
/// TLS with its own certificate (or plain http when `insecure`).
pub async fn start_proxy(
    dir: &Path,
    index: u32,
    broker: &PublicIdentity,
    insecure: bool,
) -> Result<EmbeddedProxy, StartError> {
    private_dir(dir).map_err(|e| StartError::DataDir(dir.to_owned(), e.to_string()))?;
    let identity = load_or_create_identity(&dir.join("proxy.key"), "proxy")?;
    let node = Arc::new(ProxyNode::open(dir, identity, index)?);
    let tls = server_tls(dir, &[], insecure)?;
    let client_tls = match tls.cert_pem() {
        Some(pem) => ClientTls::Pinned(pem.to_owned()),
        None => ClientTls::InsecureLoopback,
    };
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(StartError::Listen)?;
    let url = format!(
        "{}://{}",
        tls.scheme(),
        listener.local_addr().map_err(StartError::Listen)?
    );
    let (tx, rx) = oneshot::channel();
    let serving = node.clone();
    let key = broker.verifying_key;
    let join = tokio::spawn(async move {
        if let Err(e) = proxy::serve(listener, serving, key, &tls, async {
            let _ = rx.await;
        })
        .await
        {
            tracing::error!(error = %e, "proxy stopped");
        }
    });
    Ok(EmbeddedProxy {
        url,
        node,
        client_tls,
        shutdown: Some(tx),
        join,
    })
}

/// A running broker and its embedded proxies.
pub struct RunningBroker {
    pub addr: SocketAddr,
    /// The broker's own public identity (what `broker init` writes to broker.pub).
    pub public: PublicIdentity,
    /// How clients reach it: its certificate pinned, or plain http on loopback.
    pub client_tls: ClientTls,
    scheme: &'static str,
    pub broker: Arc<Broker>,
    pub proxies: Vec<EmbeddedProxy>,
    shutdown: Option<oneshot::Sender<()>>,
    join: JoinHandle<Result<(), tonic::transport::Error>>,
    refusal_flusher: JoinHandle<()>,
    _lock: DirLock,
}

/// How often the counts of unauthenticated refusals are written to the access log.
pub const REFUSAL_FLUSH: std::time::Duration = std::time::Duration::from_secs(60);

async fn flush_refusals(broker: &Arc<Broker>) {
    let broker = broker.clone();
    match tokio::task::spawn_blocking(move || broker.flush_refusals()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "could not log refused calls"),
        Err(e) => tracing::error!(error = %e, "logging refused calls failed"),
    }
}

impl RunningBroker {
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Stops accepting calls, waits for the server, logs the refusals still counted,
    /// then stops the proxies.
    pub async fn stop(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.join).await;
        self.finish().await;
    }

    /// Waits until the server ends (e.g. after a shutdown signal passed to `start`).
    pub async fn wait(mut self) -> Result<(), tonic::transport::Error> {
        let result = (&mut self.join).await.unwrap_or(Ok(()));
        self.finish().await;
        result
    }

    async fn finish(self) {
        self.refusal_flusher.abort();
        flush_refusals(&self.broker).await;
        let broker = self.broker.clone();
        let _ = tokio::task::spawn_blocking(move || broker.snapshot_on_stop()).await;
        for p in self.proxies {
            p.stop().await;
        }
    }
}

/// Opens the data directory, starts (or connects to) the proxies and serves on the
/// already bound `listener` until `shutdown` resolves or [`RunningBroker::stop`].
pub async fn start(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunningBroker, StartError> {
    let dir = &config.data_dir;
    private_dir(dir).map_err(|e| StartError::DataDir(dir.clone(), e.to_string()))?;
    // Held until the server ends: a second broker on this directory would interleave
    // its writes with ours.
    let lock = DirLock::acquire(dir)?;
    let identity = load_or_create_identity(&dir.join("broker.key"), "broker")?;
    let public = identity.public("broker");
    // It holds the log-tag, pseudonym and noise keys.
    private_file(&dir.join("broker.db"))
        .map_err(|e| StartError::DataDir(dir.clone(), e.to_string()))?;
    let mut db = Db::open(&dir.join("broker.db"))
        .map_err(|e| StartError::DataDir(dir.clone(), e.to_string()))?;
    let blobs = BlobStore::open(&dir.join("blobs"))
        .map_err(|e| StartError::DataDir(dir.clone(), e.to_string()))?;

    let tls = server_tls(dir, &config.tls_names, config.insecure_loopback)?;
    let mut embedded = Vec::new();
    let proxies: Vec<(String, ClientTls)> = if config.proxy_urls.is_empty() {
        for i in 0..config.embedded_proxies {
            embedded.push(
                start_proxy(
                    &dir.join("proxies").join(i.to_string()),
                    i as u32,
                    &public,
                    config.insecure_loopback,
                )
                .await?,
            );
        }
        embedded
            .iter()
            .map(|p| (p.url.clone(), p.client_tls.clone()))
            .collect()
    } else {
        if !config.insecure_loopback && config.proxy_certs.len() != config.proxy_urls.len() {
            return Err(StartError::Config(format!(
                "{} proxy URLs but {} proxy certificates: give each --proxy-url its --proxy-cert (the proxy's tls.crt)",
                config.proxy_urls.len(),
                config.proxy_certs.len()
            )));
        }
        let mut out = Vec::new();
        for (i, url) in config.proxy_urls.iter().enumerate() {
            let pin = match config.proxy_certs.get(i) {
                Some(path) => ClientTls::pinned_file(path)?,
                None => ClientTls::InsecureLoopback,
            };
            out.push((url.clone(), pin));
        }
        out
    };
    let urls: Vec<&String> = proxies.iter().map(|(u, _)| u).collect();
    if config.threshold == 0 || config.threshold > urls.len() {
        return Err(StartError::Config(format!(
            "threshold {} needs between 1 and {} proxies",
            config.threshold,
            urls.len()
        )));
    }
    config.break_glass.check().map_err(StartError::Config)?;
    let log_signer = identity.clone();
    let pool = crate::proxy_pool::ProxyPool::connect(identity, &proxies).await?;
    // Grants seal kfrags to particular proxy keys in a particular order: the set must
    // not change under existing grants.
    let current: Vec<ProxyRow> = pool.handles().iter().map(|h| h.info.clone()).collect();
    let known = db
        .proxies()
        .map_err(|e| StartError::DataDir(dir.clone(), e.to_string()))?;
    if known.is_empty() {
        db.set_proxies(&current)
            .map_err(|e| StartError::DataDir(dir.clone(), e.to_string()))?;
    } else if known
        .iter()
        .map(|p| &p.proxy_id)
        .ne(current.iter().map(|p| &p.proxy_id))
    {
        return Err(StartError::Proxies(
            "the proxies are not the ones this data directory's grants were sealed to (same keys, same order)".into(),
        ));
    }

    let tag_secret = db
        .secret("audit-patient-tag-key")
        .map_err(|e| StartError::DataDir(dir.clone(), e.to_string()))?;
    let audit = AccessLog::open(&dir.join("audit"), log_signer, tag_secret)
        .map_err(StartError::AccessLog)?;
    let broker = Broker::new(
        db,
        blobs,
        pool,
        audit,
        crate::service::Settings {
            threshold: config.threshold,
            count_budget: config.count_budget,
            break_glass: config.break_glass,
        },
        Some(IndexSnapshots::new(dir.join("index"))),
    )
    .map_err(|e| StartError::Config(e.to_string()))?;
    // The cohort engine loads while the server starts answering.
    tokio::task::spawn_blocking({
        let broker = broker.clone();
        move || broker.warm_cohort_engine()
    });
    // Withdrawals a crash interrupted are redone, revocations a proxy could not confirm
    // before are retried, and erasures under way are finished, now.
    tokio::spawn({
        let broker = broker.clone();
        async move {
            match broker.reconcile_consents().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    grants = n,
                    "withdrew grants a crash left behind a consent change"
                ),
                Err(e) => tracing::warn!(error = %e, "reconciling grants with consents"),
            }
            if let Err(e) = broker.retry_revocations().await {
                tracing::warn!(error = %e, "retrying pending revocations");
            }
            match broker.resume_erasures().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(erasures = n, "finished erasures a restart interrupted"),
                Err(e) => tracing::warn!(error = %e, "resuming erasures"),
            }
        }
    });
    if let Some(op) = &config.operator {
        broker
            .register_actor(Actor {
                actor_id: String::new(),
                role: Role::Operator,
                name: "operator".into(),
                organisation: String::new(),
                verifying_key: pre_kms::keys::public_key_bytes(&op.verifying_key),
                encryption_key: Vec::new(),
                key_binding: Vec::new(),
            })
            .map_err(|e| StartError::Config(e.to_string()))?;
    }
    if !broker
        .list_actors()
        .iter()
        .any(|a| a.role == Role::Operator)
    {
        return Err(StartError::Config(
            "no operator is registered: start once with --operator FILE.pub (from `brokerctl keygen --role operator`)".into(),
        ));
    }

    // Advertise what this server serves: broker.v1.Proxy is in the same file but is
    // served by the proxy nodes.
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET);
    for service in [
        "Registry", "Records", "Studies", "Grants", "Releases", "Audit",
    ] {
        reflection = reflection.with_service_name(format!("broker.v1.{service}"));
    }
    let reflection = reflection
        .build_v1()
        .map_err(|e| StartError::Config(format!("reflection: {e}")))?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::registry_server::RegistryServer<Grpc>>()
        .await;
    let grpc = Grpc(broker.clone());
    let limit = 64 << 20;
    let addr = listener.local_addr().map_err(StartError::Listen)?;
    let (tx, rx) = oneshot::channel::<()>();
    let router = tls
        .apply(tonic::transport::Server::builder(), addr)?
        .add_service(health_service)
        .add_service(reflection)
        .add_service(pb::registry_server::RegistryServer::new(grpc.clone()))
        .add_service(InterceptedService::new(
            pb::records_server::RecordsServer::new(grpc.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            precheck(broker.clone()),
        ))
        .add_service(pb::studies_server::StudiesServer::new(grpc.clone()))
        .add_service(pb::emergency_server::EmergencyServer::new(grpc.clone()))
        .add_service(pb::consents_server::ConsentsServer::new(grpc.clone()))
        .add_service(pb::feasibility_server::FeasibilityServer::new(grpc.clone()))
        .add_service(InterceptedService::new(
            pb::grants_server::GrantsServer::new(grpc.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            precheck(broker.clone()),
        ))
        .add_service(InterceptedService::new(
            pb::audit_server::AuditServer::new(grpc.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            precheck(broker.clone()),
        ))
        .add_service(InterceptedService::new(
            pb::releases_server::ReleasesServer::new(grpc)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            precheck(broker.clone()),
        ));
    let join = tokio::spawn(router.serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = rx => {}
            }
        },
    ));
    let refusal_flusher = tokio::spawn({
        let broker = broker.clone();
        async move {
            let mut every = tokio::time::interval(REFUSAL_FLUSH);
            every.tick().await;
            loop {
                every.tick().await;
                flush_refusals(&broker).await;
            }
        }
    });
    tracing::info!(%addr, proxies = urls.len(), threshold = config.threshold, "broker serving");
    Ok(RunningBroker {
        addr,
        public: public.clone(),
        client_tls: match tls.cert_pem() {
            Some(pem) => ClientTls::Pinned(pem.to_owned()),
            None => ClientTls::InsecureLoopback,
        },
        scheme: tls.scheme(),
        broker,
        proxies: embedded,
        shutdown: Some(tx),
        join,
        refusal_flusher,
        _lock: lock,
    })
}

/// Checks a stopped broker's access log on disk: every checkpoint in it is signed by the
/// broker's key, and the records, re-read and re-hashed, match every checkpoint. The
/// error says where the log stops matching.
pub fn check_access_log(data_dir: &Path) -> Result<audit_log::VerifyReport, String> {
    let key_path = data_dir.join("broker.key");
    let broker = Identity::read_key_file(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?
        .0
        .verifying_key();
    let dir = data_dir.join("audit");
    let checkpoints = audit_log::read_checkpoint_file(&dir).map_err(|e| e.to_string())?;
    let keys = pre_kms::logged_release::CheckpointKeys::new([broker]);
    let broker_id = pre_kms::keys::actor_id(&broker);
    for c in &checkpoints {
        c.verify(&keys, &[broker_id.as_str()]).map_err(|e| {
            format!(
                "checkpoint of size {} (time {}) is not signed by this broker: {e}",
                c.checkpoint.size, c.checkpoint.time
            )
        })?;
    }
    audit_log::verify_dir(&dir, &checkpoints).map_err(|e| e.to_string())
}
