//! `brokerctl`: the broker's client, a subcommand per role.

mod cli;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use model::Role;

use cli::conn::Conn;
use cli::{board, clinician, custodian, keys, operator, patient, researcher, sponsor, ui};

#[derive(Parser)]
#[command(
    name = "brokerctl",
    version,
    about = "Client of the research data broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a key pair: FILE (secret, owner-only) and FILE.pub (to give the operator).
    Keygen {
        #[arg(long)]
        role: Role,
        #[arg(long)]
        out: PathBuf,
    },
    /// Who the broker thinks you are.
    Whoami(#[command(flatten)] Conn),
    /// Operator: register actors, list them.
    #[command(subcommand)]
    Operator(operator::OperatorCmd),
    /// Patient: enroll yourself, upload your records, grant studies.
    #[command(subcommand)]
    Patient(patient::PatientCmd),
    /// Custodian: import FHIR R4 data for the patients you keep keys for.
    #[command(subcommand)]
    Import(custodian::ImportCmd),
    /// Custodian: grants for the patients in your keystore.
    #[command(subcommand)]
    Custodian(custodian::CustodianCmd),
    /// Sponsor: propose studies.
    #[command(subcommand)]
    Sponsor(sponsor::SponsorCmd),
    /// Ethics board: review, approve and reject studies.
    #[command(subcommand)]
    Board(board::BoardCmd),
    /// Researcher: fetch, verify and decrypt a study's release.
    #[command(subcommand)]
    Researcher(researcher::ResearcherCmd),
    /// Emergency clinician: break the glass for a patient who allows it.
    #[command(subcommand)]
    Clinician(clinician::ClinicianCmd),
    /// A web page on this machine for ethics board members and patients: it prints the
    /// address to open, which carries this run's secret. Your key stays in this process.
    Ui(ui::UiArgs),
    /// Check an erasure receipt bundle against the network you pinned: every signature,
    /// the broker's receipt, and enough proxies for the erasure to hold. Offline.
    VerifyReceipt {
        /// The receipt bundle (JSON) the erasure gave you.
        file: PathBuf,
        /// The network manifest your ethics board signed.
        #[arg(long, env = "BROKER_NETWORK")]
        network: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { role, out } => keys::keygen(role, &out),
        Command::Whoami(conn) => keys::whoami(&conn).await,
        Command::Operator(cmd) => operator::run(cmd).await,
        Command::Patient(cmd) => patient::run(cmd).await,
        Command::Import(cmd) => custodian::import(cmd).await,
        Command::Custodian(cmd) => custodian::run(cmd).await,
        Command::Sponsor(cmd) => sponsor::run(cmd).await,
        Command::Board(cmd) => board::run(cmd).await,
        Command::Researcher(cmd) => researcher::run(cmd).await,
        Command::Clinician(cmd) => clinician::run(cmd).await,
        Command::Ui(args) => ui::run(args).await,
        Command::VerifyReceipt {
            file,
            network,
            json,
        } => patient::verify_receipt(&file, &network, json),
    }
}
