//! `brokerctl ui`: the local web page for ethics board members and patients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, bail};
use brokerctl::ui::{Page, Role, Ui};
use clap::Args;

use super::conn::{AsPatient, Conn, connect_as, head_store};

#[derive(Args)]
pub struct UiArgs {
    #[command(flatten)]
    conn: Conn,
    /// As a patient whose key a custodian keeps (otherwise: the key's registered role,
    /// an ethics board member or a patient).
    #[command(flatten)]
    who: AsPatient,
    /// Where the page listens: a loopback address only [port 0: any free port].
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Board: where the last verified checkpoint is kept, shared with `board log verify`
    /// [default: KEY.log-state.json].
    #[arg(long)]
    state: Option<PathBuf>,
    /// Patient: where an erasure's signed request and receipts are kept
    /// [default: erasure-PSEUDONYM.json].
    #[arg(long)]
    receipts: Option<PathBuf>,
}

pub async fn run(args: UiArgs) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "--listen {}: the page listens on a loopback address only, because it acts with your key",
            args.listen
        );
    }
    let client = connect_as(&args.conn, &args.who).await?;
    let as_patient = match args.who.keystore_entry() {
        Some(_) => true,
        None => match client.whoami().await?.role {
            model::Role::Board => false,
            model::Role::Patient => true,
            other => bail!(
                "the page is for ethics board members and patients; this key is registered as a {}",
                other.as_str()
            ),
        },
    };
    let role = if as_patient {
        let pseudonym = client.identity().pseudonym();
        Role::Patient {
            heads: Mutex::new(head_store(&args.conn, &args.who)?),
            network: match &args.conn.network {
                Some(path) => Some(Box::new(pre_kms::network::VerifiedNetwork::load(path)?)),
                None => None,
            },
            receipts: args
                .receipts
                .unwrap_or_else(|| PathBuf::from(format!("erasure-{pseudonym}.json"))),
            keystore: args
                .who
                .keystore_entry()
                .map(|(k, p)| (k.to_owned(), p.to_owned())),
        }
    } else {
        let state = match args.state {
            Some(s) => s,
            None => brokerctl::log_review::BoardState::beside(
                args.conn
                    .key
                    .as_ref()
                    .context("give --state FILE or --key FILE")?,
            ),
        };
        Role::Board { state }
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let page = Page::new(listener, Ui { client, role })?;
    // The address carries this run's secret: it goes to the user's terminal only.
    println!("open {}", page.url());
    println!("(this page acts with your key; stop it with Ctrl-C)");
    page.serve(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
