//! Connecting to the broker (with your key, or a patient's from a custodian's keystore)
//! and printing answers.

use std::path::PathBuf;

use anyhow::{Context, bail};
use brokerctl::{BrokerClient, Keystore};
use clap::Args;
use pre_kms::Identity;

#[derive(Args, Clone)]
pub struct Conn {
    /// Broker address.
    #[arg(
        long,
        env = "BROKER_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub broker: String,
    /// Your secret key file (from `brokerctl keygen`).
    #[arg(long, env = "BROKER_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A patient whose key a custodian keeps, instead of `--key`.
#[derive(Args, Clone)]
pub struct AsPatient {
    /// The custodian keystore holding the patient's key.
    #[arg(long, requires = "patient")]
    keystore: Option<PathBuf>,
    /// The patient's id in the keystore (the source record id).
    #[arg(long, requires = "keystore")]
    patient: Option<String>,
}

fn load_key(conn: &Conn) -> anyhow::Result<Identity> {
    let path = conn
        .key
        .as_ref()
        .context("give your key file with --key FILE (or BROKER_KEY)")?;
    Ok(Identity::read_key_file(path)?.0)
}

pub async fn connect(conn: &Conn) -> anyhow::Result<BrokerClient> {
    Ok(BrokerClient::connect(&conn.broker, load_key(conn)?).await?)
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
    Ok(BrokerClient::connect(&conn.broker, identity).await?)
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
