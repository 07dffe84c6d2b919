//! Connecting to the broker (with your key, or a patient's from a custodian's keystore)
//! and printing answers.

use std::path::PathBuf;

use anyhow::{Context, bail};
use broker_proto::tls::ClientTls;
use brokerctl::{BrokerClient, Keystore};
use clap::Args;
use pre_kms::Identity;

#[derive(Args, Clone)]
pub struct Conn {
    /// Broker address.
    #[arg(
        long,
        env = "BROKER_URL",
        default_value = "https://127.0.0.1:50051",
        global = true
    )]
    pub broker: String,
    /// The broker's TLS certificate to pin (its data directory's tls.crt); not needed
    /// with --network, whose manifest pins it.
    #[arg(long, env = "BROKER_CERT", global = true)]
    pub broker_cert: Option<PathBuf>,
    /// Plain http to a broker on this machine, for tests: no TLS, nothing pinned.
    #[arg(long, env = "BROKER_INSECURE_LOOPBACK", global = true)]
    pub insecure_loopback: bool,
    /// Your secret key file (from `brokerctl keygen`).
    #[arg(long, env = "BROKER_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    /// The network manifest your ethics board signed (`brokerctl board sign-network`):
    /// it pins the proxies, the threshold and the board keys. Needed to grant.
    #[arg(long, env = "BROKER_NETWORK", global = true)]
    pub network: Option<PathBuf>,
}

/// The pinned network, read and verified: granting trusts it, not the broker.
pub fn pinned_network(conn: &Conn) -> anyhow::Result<pre_kms::network::VerifiedNetwork> {
    let path = conn.network.as_ref().context(
        "granting needs the network manifest your ethics board signed: --network FILE (or BROKER_NETWORK)",
    )?;
    Ok(pre_kms::network::VerifiedNetwork::load(path)?)
}

/// A patient whose key a custodian keeps, instead of `--key`.
#[derive(Args, Clone, Default)]
pub struct AsPatient {
    /// The custodian keystore holding the patient's key.
    #[arg(long, requires = "patient")]
    keystore: Option<PathBuf>,
    /// The patient's id in the keystore (the source record id).
    #[arg(long, requires = "keystore")]
    patient: Option<String>,
}

impl AsPatient {
    /// The keystore and the patient's id in it, when the patient is a custodian's.
    pub fn keystore_entry(&self) -> Option<(&std::path::Path, &str)> {
        Some((self.keystore.as_deref()?, self.patient.as_deref()?))
    }
}

pub fn load_key(conn: &Conn) -> anyhow::Result<Identity> {
    let path = conn
        .key
        .as_ref()
        .context("give your key file with --key FILE (or BROKER_KEY)")?;
    Ok(Identity::read_key_file(path)?.0)
}

/// How to reach the broker: its certificate pinned from --broker-cert or the network
/// manifest, or plain http on loopback with --insecure-loopback.
pub fn client_tls(conn: &Conn) -> anyhow::Result<ClientTls> {
    if conn.insecure_loopback {
        return Ok(ClientTls::InsecureLoopback);
    }
    if let Some(path) = &conn.broker_cert {
        return Ok(ClientTls::pinned_file(path)?);
    }
    if let Some(path) = &conn.network {
        let network = pre_kms::network::VerifiedNetwork::load(path)?;
        if let Some(pem) = network.broker_tls_cert {
            return Ok(ClientTls::Pinned(pem));
        }
    }
    bail!(
        "give the broker's certificate to pin with --broker-cert FILE (its data directory's tls.crt) or --network FILE"
    )
}

pub async fn connect(conn: &Conn) -> anyhow::Result<BrokerClient> {
    let identity = load_key(conn)?;
    Ok(BrokerClient::connect(&conn.broker, &client_tls(conn)?, identity).await?)
}

/// Connects as a patient: with their own key file, or with their key from a custodian's
/// keystore.
pub async fn connect_as(conn: &Conn, who: &AsPatient) -> anyhow::Result<BrokerClient> {
    let (Some(keystore), Some(patient)) = (&who.keystore, &who.patient) else {
        return connect(conn).await;
    };
    if !keystore.exists() {
        bail!("keystore {} does not exist", keystore.display());
    }
    let identity = Keystore::open(keystore)?
        .get(patient)?
        .with_context(|| format!("no patient {patient:?} in keystore {}", keystore.display()))?;
    Ok(BrokerClient::connect(&conn.broker, &client_tls(conn)?, identity).await?)
}

/// Where this agent keeps the newest consent it set for the patient `who` names: the
/// custodian's keystore, or a file beside the patient's key file.
pub fn head_store(
    conn: &Conn,
    who: &AsPatient,
) -> anyhow::Result<Box<dyn brokerctl::consent_heads::HeadStore + Send>> {
    if let Some(keystore) = &who.keystore {
        return Ok(Box::new(Keystore::open(keystore)?));
    }
    let key = conn
        .key
        .as_ref()
        .context("give your key file with --key FILE (or BROKER_KEY)")?;
    Ok(Box::new(brokerctl::consent_heads::HeadFile::beside(key)))
}

pub fn print<T: serde::Serialize>(conn: &Conn, value: &T, human: impl FnOnce() -> String) {
    if conn.json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("serializable")
        );
    } else {
        println!("{}", human());
    }
}

pub fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}
