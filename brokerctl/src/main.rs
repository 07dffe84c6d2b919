//! `brokerctl`: the broker's client, a subcommand per role.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use brokerctl::{BrokerClient, Keystore, agent, log_review};
use clap::{Args, Parser, Subcommand};
use consent_policy::ConsentPolicy;
use datasets::DeidConfig;
use model::{Cohort, ResearchPurpose, Role, SearchField, StudyFocus, StudyProposal, purpose_label};
use pre_kms::{Category, Identity, PublicIdentity};

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

#[derive(Args, Clone)]
struct Conn {
    /// Broker address.
    #[arg(
        long,
        env = "BROKER_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    broker: String,
    /// Your secret key file (from `brokerctl keygen`).
    #[arg(long, env = "BROKER_KEY", global = true)]
    key: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
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
    Operator(OperatorCmd),
    /// Patient: enroll yourself, upload your records, grant studies.
    #[command(subcommand)]
    Patient(PatientCmd),
    /// Custodian: import FHIR R4 data for the patients you keep keys for.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Custodian: grants for the patients in your keystore.
    #[command(subcommand)]
    Custodian(CustodianCmd),
    /// Sponsor: propose studies.
    #[command(subcommand)]
    Sponsor(SponsorCmd),
    /// Ethics board: review, approve and reject studies.
    #[command(subcommand)]
    Board(BoardCmd),
    /// Researcher: fetch, verify and decrypt a study's release.
    #[command(subcommand)]
    Researcher(ResearcherCmd),
}

#[derive(Subcommand)]
enum OperatorCmd {
    /// Register an actor's public key file under a role.
    Register {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        public_key: PathBuf,
        #[arg(long)]
        role: Role,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        organisation: String,
    },
    /// List registered actors.
    Actors(#[command(flatten)] Conn),
}

#[derive(Subcommand)]
enum PatientCmd {
    /// Enroll yourself (your key must be registered as a patient).
    Enroll(#[command(flatten)] Conn),
    /// Upload your own records from a FHIR R4 Bundle or NDJSON file.
    Upload {
        #[command(flatten)]
        conn: Conn,
        path: PathBuf,
    },
    /// Grant an approved study the categories it requests.
    Grant {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        study: String,
    },
    /// Your consent policy: set a new version, show it, list its history, revoke it.
    #[command(subcommand)]
    Consent(ConsentCmd),
    /// Every logged access to your data, each checked against the broker-signed log.
    Accesses {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        who: AsPatient,
    },
    /// Your unread alerts: releases of, and emergency access to, your records.
    Alerts {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        who: AsPatient,
        /// Mark the alerts shown as read.
        #[arg(long)]
        ack: bool,
    },
}

#[derive(Subcommand)]
enum ConsentCmd {
    /// Sign and set a new version of your policy from a JSON file (docs/CONSENT.md), a
    /// FHIR R4 Consent resource (--fhir), or the broad research preset (--broad).
    /// The version and issue time are filled in when the file leaves them out.
    Set {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        who: AsPatient,
        #[command(flatten)]
        source: PolicySource,
    },
    /// Your current policy, as stored and signed.
    Show {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        who: AsPatient,
    },
    /// Every version of your policy.
    History {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        who: AsPatient,
    },
    /// Revoke your consent: a new version that permits nothing. Your grants are
    /// withdrawn and their kfrags destroyed at the proxies.
    Revoke {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        who: AsPatient,
    },
}

#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
struct PolicySource {
    /// A policy JSON file.
    file: Option<PathBuf>,
    /// A FHIR R4 Consent resource (JSON) to import.
    #[arg(long)]
    fhir: Option<PathBuf>,
    /// The broad research preset: any research purpose, every non-sensitive category,
    /// every searchable field, no break-glass.
    #[arg(long)]
    broad: bool,
}

/// A patient whose key a custodian keeps, instead of `--key`.
#[derive(Args, Clone)]
struct AsPatient {
    /// The custodian keystore holding the patient's key.
    #[arg(long, requires = "patient")]
    keystore: Option<PathBuf>,
    /// The patient's id in the keystore (the source record id).
    #[arg(long, requires = "keystore")]
    patient: Option<String>,
}

#[derive(Subcommand)]
enum ImportCmd {
    /// Import FHIR R4 Bundles or bulk NDJSON as a custodian (keys kept in the keystore).
    Fhir {
        #[command(flatten)]
        conn: Conn,
        path: PathBuf,
        /// The custodian keystore (made if missing; keep it private).
        #[arg(long, default_value = "keystore.db")]
        keystore: PathBuf,
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
    /// Import an OMOP CDM 5.3/5.4 directory (Parquet or CSV tables) as a custodian.
    Omop {
        #[command(flatten)]
        conn: Conn,
        dir: PathBuf,
        /// The custodian keystore (made if missing; keep it private).
        #[arg(long, default_value = "keystore.db")]
        keystore: PathBuf,
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
}

#[derive(Subcommand)]
enum CustodianCmd {
    /// Set a consent policy version for every patient in the keystore (or one).
    Consent {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "keystore.db")]
        keystore: PathBuf,
        /// Only this patient (the source record id).
        #[arg(long)]
        patient: Option<String>,
        #[command(flatten)]
        source: PolicySource,
        #[arg(long, default_value_t = 200)]
        batch: usize,
    },
    /// Grant, for every patient in the keystore, what each patient's consent permits: to
    /// one approved study, or (without --study) to every approved study in its period.
    Grant {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        study: Option<String>,
        #[arg(long, default_value = "keystore.db")]
        keystore: PathBuf,
        #[arg(long, default_value_t = 200)]
        batch: usize,
    },
}

#[derive(Subcommand)]
enum SponsorCmd {
    /// Studies.
    #[command(subcommand)]
    Study(SponsorStudyCmd),
    /// How many patients match a cohort definition (docs/COHORTS.md), counted over the
    /// fields each patient consented to make searchable for the study: a protected count
    /// ("<11", or noisy and rounded) and its attrition.
    Count(CountArgs),
}

#[derive(Args, Clone)]
struct CountArgs {
    #[command(flatten)]
    conn: Conn,
    #[arg(long)]
    study: String,
    /// The cohort definition (JSON).
    #[arg(long)]
    definition: PathBuf,
}

#[derive(Subcommand)]
enum SponsorStudyCmd {
    /// Propose a study for the board to approve.
    Propose {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        title: String,
        /// Research purpose, in GA4GH DUO terms: HMB (health/medical/biomedical), GRU
        /// (general), POA (population origins or ancestry), MDS (methods development) or
        /// DS:CODE[,CODE...] (disease-specific, e.g. DS:ICD10:E11).
        #[arg(long, default_value = "HMB", value_parser = parse_focus)]
        purpose: StudyFocus,
        #[command(flatten)]
        commitments: Commitments,
        /// Searchable fields the cohort needs [default: those its criteria use].
        #[arg(long, value_delimiter = ',')]
        fields: Vec<SearchField>,
        /// Categories to release, comma-separated (e.g. conditions,observations).
        #[arg(long, value_delimiter = ',', required = true)]
        categories: Vec<Category>,
        /// The receiving researcher's public key file.
        #[arg(long)]
        researcher_key: PathBuf,
        /// Length of the approval period in days, from now.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Cohort: any of these condition codes (repeat the flag).
        #[arg(long = "condition")]
        conditions: Vec<String>,
        #[arg(long)]
        born_from: Option<i32>,
        #[arg(long)]
        born_to: Option<i32>,
        #[arg(long)]
        sex: Option<String>,
    },
}

/// What a study declares about its use of the data (DUO modifiers are matched to these).
#[derive(Args, Clone)]
struct Commitments {
    /// Commercial use (for-profit sponsor or purpose).
    #[arg(long)]
    commercial: bool,
    /// An ethics board (IRB/ERB) approved the protocol.
    #[arg(long)]
    irb: bool,
    /// The results will be published.
    #[arg(long)]
    publish: bool,
    /// The study collaborates with the data's primary investigators.
    #[arg(long)]
    collaborate: bool,
    /// Derived data will be returned to the resource.
    #[arg(long)]
    return_data: bool,
    /// Genetic research.
    #[arg(long)]
    genetic: bool,
    /// Where the data will be used (a region code such as EU).
    #[arg(long)]
    region: Option<String>,
}

fn parse_focus(s: &str) -> Result<StudyFocus, String> {
    match s.to_ascii_uppercase().as_str() {
        "HMB" => Ok(StudyFocus::Health),
        "GRU" => Ok(StudyFocus::General),
        "POA" => Ok(StudyFocus::Ancestry),
        "MDS" => Ok(StudyFocus::MethodsDevelopment),
        _ => match s.split_once(':') {
            Some((ds, codes)) if ds.eq_ignore_ascii_case("DS") && !codes.is_empty() => Ok(
                StudyFocus::Disease(codes.split(',').map(str::to_owned).collect()),
            ),
            _ => Err(format!(
                "{s:?} is not a research purpose: use HMB, GRU, POA, MDS or DS:CODE (e.g. DS:ICD10:E11)"
            )),
        },
    }
}

#[derive(Subcommand)]
enum BoardCmd {
    /// Studies.
    #[command(subcommand)]
    Study(BoardStudyCmd),
    /// The access log: verify, read, export.
    #[command(subcommand)]
    Log(BoardLogCmd),
    /// The exact count of a cohort definition for a study, with its attrition.
    Count(CountArgs),
}

#[derive(Subcommand)]
enum BoardLogCmd {
    /// Check the log since the last checkpoint this board saw: signatures, consistency,
    /// and (unless --quick) every leaf against every checkpoint.
    Verify {
        #[command(flatten)]
        conn: Conn,
        /// Where the last verified checkpoint is kept [default: KEY.log-state.json].
        #[arg(long)]
        state: Option<PathBuf>,
        /// Skip re-hashing every leaf.
        #[arg(long)]
        quick: bool,
        /// Co-sign the verified checkpoint as a witness.
        #[arg(long)]
        cosign: bool,
    },
    /// Show events, filtered.
    Show {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        filter: LogFilter,
    },
    /// Export events as JSON Lines, CSV or FHIR AuditEvent (NDJSON).
    Export {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        filter: LogFilter,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Output file [default: standard output].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct LogFilter {
    /// From this time on: YYYY-MM-DD or unix seconds.
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Up to this time: YYYY-MM-DD (the whole day) or unix seconds.
    #[arg(long, value_parser = parse_until)]
    until: Option<i64>,
    #[arg(long)]
    study: Option<String>,
    /// Actor id.
    #[arg(long)]
    actor: Option<String>,
    /// Event kind (repeatable): enroll, upload, study_proposed, study_approved,
    /// study_rejected, grant_issued, release, fetch, authorization_failed, ...
    #[arg(long = "kind")]
    kinds: Vec<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Jsonl,
    Csv,
    Fhir,
}

fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let parts: Vec<&str> = s.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(format!("{s:?} is not YYYY-MM-DD or unix seconds"));
    };
    let (y, m, d): (i64, i64, i64) = match (y.parse(), m.parse(), d.parse()) {
        (Ok(y), Ok(m), Ok(d)) if (1..=12).contains(&m) && (1..=31).contains(&d) => (y, m, d),
        _ => return Err(format!("{s:?} is not YYYY-MM-DD or unix seconds")),
    };
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok((era * 146_097 + doe - 719_468) * 86_400)
}

fn parse_until(s: &str) -> Result<i64, String> {
    let t = parse_time(s)?;
    Ok(if s.contains('-') { t + 86_399 } else { t })
}

#[derive(Subcommand)]
enum BoardStudyCmd {
    /// Every study and its status.
    List(#[command(flatten)] Conn),
    /// Approve a proposed study, signing it.
    Approve {
        #[command(flatten)]
        conn: Conn,
        study: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Also approve the purpose for patients whose consent the DUO matcher cannot
        /// decide (it abstains, e.g. a disease code in another vocabulary).
        #[arg(long)]
        override_abstain: bool,
    },
    /// Reject a proposed study, signing the rejection.
    Reject {
        #[command(flatten)]
        conn: Conn,
        study: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum ResearcherCmd {
    /// Request the release of an approved study, verify and decrypt it into DIR.
    Fetch {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        study: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn load_key(conn: &Conn) -> anyhow::Result<Identity> {
    let path = conn
        .key
        .as_ref()
        .context("give your key file with --key FILE (or BROKER_KEY)")?;
    Ok(Identity::read_key_file(path)?.0)
}

async fn connect(conn: &Conn) -> anyhow::Result<BrokerClient> {
    Ok(BrokerClient::connect(&conn.broker, load_key(conn)?).await?)
}

/// Connects as a patient: with their own key file, or with their key from a custodian's
/// keystore.
async fn connect_as(conn: &Conn, who: &AsPatient) -> anyhow::Result<BrokerClient> {
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

fn log_filter(f: LogFilter) -> broker_proto::v1::EventsRequest {
    log_review::events_filter(f.since, f.until, f.study, f.actor, f.kinds)
}

fn print<T: serde::Serialize>(conn: &Conn, value: &T, human: impl FnOnce() -> String) {
    if conn.json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("serializable")
        );
    } else {
        println!("{}", human());
    }
}

fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
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
        Command::Keygen { role, out } => {
            let id = Identity::generate();
            id.write_key_file(&out, role.as_str())?;
            let public = pub_path(&out);
            id.public(role.as_str()).write_file(&public)?;
            println!(
                "secret key {} (keep it private)\npublic key {}\nactor id   {}",
                out.display(),
                public.display(),
                id.actor_id()
            );
        }
        Command::Whoami(conn) => {
            let a = connect(&conn).await?.whoami().await?;
            print(
                &conn,
                &serde_json::json!({"actor_id": a.actor_id, "role": a.role, "name": a.name}),
                || format!("{} ({}), actor {}", a.name, a.role, a.actor_id),
            );
        }
        Command::Operator(OperatorCmd::Register {
            conn,
            public_key,
            role,
            name,
            organisation,
        }) => {
            let public = PublicIdentity::read_file(&public_key)?;
            let key = pre_kms::keys::public_key_bytes(&public.verifying_key);
            let a = connect(&conn)
                .await?
                .register_actor(role, &name, &organisation, key)
                .await?;
            print(&conn, &serde_json::json!({"actor_id": a.actor_id}), || {
                format!("registered {name} as {role}: actor {}", a.actor_id)
            });
        }
        Command::Operator(OperatorCmd::Actors(conn)) => {
            let actors = connect(&conn).await?.list_actors().await?;
            let rows: Vec<_> = actors
                .iter()
                .map(|a| serde_json::json!({"actor_id": a.actor_id, "role": a.role, "name": a.name, "organisation": a.organisation}))
                .collect();
            print(&conn, &rows, || {
                actors
                    .iter()
                    .map(|a| {
                        format!(
                            "{}  {:<10} {} ({})",
                            a.actor_id,
                            a.role.as_str(),
                            a.name,
                            a.organisation
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Patient(PatientCmd::Enroll(conn)) => {
            let client = connect(&conn).await?;
            let me = client.identity().clone();
            let created = client
                .enroll(&[&me])
                .await?
                .first()
                .copied()
                .unwrap_or(false);
            println!(
                "{} as pseudonym {}",
                if created {
                    "enrolled"
                } else {
                    "already enrolled"
                },
                me.pseudonym()
            );
        }
        Command::Patient(PatientCmd::Upload { conn, path }) => {
            let client = connect(&conn).await?;
            let me = client.identity().clone();
            let report = datasets::import_path(&path, &DeidConfig::default());
            report_errors(&report.errors);
            let [record] = <[_; 1]>::try_from(report.patients).map_err(|v| {
                anyhow::anyhow!(
                    "{} holds {} patients; a patient uploads only their own record",
                    path.display(),
                    v.len()
                )
            })?;
            let r = agent::ingest_batch(&client, vec![(me, record)]).await?;
            println!(
                "{} envelopes stored, {} unchanged",
                r.envelopes_stored, r.envelopes_unchanged
            );
        }
        Command::Patient(PatientCmd::Grant { conn, study }) => {
            let client = connect(&conn).await?;
            let me = client.identity().clone();
            let s = client.get_study(&study).await?;
            let plan = agent::grant_plan(&client, &s).await?;
            let history = agent::consent_history(&client, &me).await?;
            let r = agent::consented_grants(
                &client,
                &plan,
                &s,
                vec![(me, Category::ALL.to_vec(), history)],
            )
            .await?;
            if r.issued == 0 {
                bail!("your consent does not permit study {study}; nothing was granted");
            }
            println!("grant issued to {study}, as your consent permits");
        }
        Command::Patient(PatientCmd::Consent(cmd)) => consent_command(cmd).await?,
        Command::Custodian(CustodianCmd::Consent {
            conn,
            keystore,
            patient,
            source,
            batch,
        }) => {
            let client = connect(&conn).await?;
            if !keystore.exists() {
                bail!("keystore {} does not exist", keystore.display());
            }
            let ks = Keystore::open(&keystore)?;
            let patients = match &patient {
                Some(id) => vec![(
                    id.clone(),
                    ks.get(id)?
                        .with_context(|| format!("no patient {id:?} in the keystore"))?,
                )],
                None => ks.all()?,
            };
            let pb = progress(patients.len(), "consents");
            let mut set = 0;
            for chunk in patients.chunks(batch.max(1)) {
                let mut policies = Vec::with_capacity(chunk.len());
                for (_, id) in chunk {
                    let history = agent::consent_history(&client, id).await?;
                    policies.push((
                        id.clone(),
                        read_policy(&source, agent::next_version(&history))?,
                    ));
                }
                set += agent::set_consents(&client, &policies).await?.len();
                pb.inc(chunk.len() as u64);
            }
            pb.finish_and_clear();
            print(&conn, &serde_json::json!({"consents": set}), || {
                format!("{set} consent versions set")
            });
        }
        Command::Import(ImportCmd::Fhir {
            conn,
            path,
            keystore,
            batch,
        }) => import_fhir(&conn, &path, &keystore, batch.max(1)).await?,
        Command::Import(ImportCmd::Omop {
            conn,
            dir,
            keystore,
            batch,
        }) => {
            let client = connect(&conn).await?;
            if !dir.is_dir() {
                bail!("{} is not a directory of OMOP CDM tables", dir.display());
            }
            let spinner = indicatif::ProgressBar::new_spinner();
            spinner.set_message(format!("reading {}", dir.display()));
            spinner.enable_steady_tick(std::time::Duration::from_millis(200));
            let import = datasets::omop::import_dir(&dir, &DeidConfig::default())
                .with_context(|| format!("importing {}", dir.display()))?;
            spinner.finish_and_clear();
            let records = import.patients.into_iter().map(|p| p.record).collect();
            let (total, created) =
                ingest_records(&client, records, &keystore, batch.max(1)).await?;
            // concept_ancestor, for include_descendants in cohort definitions.
            let relations: Vec<(String, String)> = import
                .hierarchy
                .pairs()
                .map(|(a, d)| (a.to_string(), d.to_string()))
                .collect();
            let (concepts_added, concepts_held) = client
                .put_concepts(&relations)
                .await
                .context("uploading the concept hierarchy")?;
            let summary = serde_json::json!({"patients": total.patients, "new_keys": created,
                "envelopes_stored": total.envelopes_stored, "envelopes_unchanged": total.envelopes_unchanged,
                "rows": import.rows, "not_indexed": import.not_indexed,
                "concept_relations_added": concepts_added, "concept_relations_held": concepts_held});
            print(&conn, &summary, || {
                format!(
                    "{} patients from {}: {} envelopes stored, {} unchanged; rows read {:?}; event rows not indexed (concept 0 or another vocabulary) {:?}; concept relations: {} new, {} held",
                    total.patients,
                    dir.display(),
                    total.envelopes_stored,
                    total.envelopes_unchanged,
                    import.rows,
                    import.not_indexed,
                    concepts_added,
                    concepts_held
                )
            });
        }
        Command::Custodian(CustodianCmd::Grant {
            conn,
            study,
            keystore,
            batch,
        }) => {
            let client = connect(&conn).await?;
            let now = pre_kms::request_auth::now_secs();
            let studies = match &study {
                Some(id) => vec![client.get_study(id).await?],
                None => client
                    .list_studies()
                    .await?
                    .into_iter()
                    .filter(|s| s.closed_because(now).is_none())
                    .collect(),
            };
            let patients = Keystore::open(&keystore)?.all()?;
            let pb = progress(patients.len(), "consents");
            let mut histories = Vec::with_capacity(patients.len());
            for (_, id) in &patients {
                histories.push(agent::consent_history(&client, id).await?);
                pb.inc(1);
            }
            pb.finish_and_clear();
            let mut rows = Vec::new();
            for s in &studies {
                let plan = agent::grant_plan(&client, s).await?;
                let pb = progress(patients.len(), "grants");
                let mut total = agent::ConsentedGrants::default();
                for (chunk, hs) in patients
                    .chunks(batch.max(1))
                    .zip(histories.chunks(batch.max(1)))
                {
                    let list = chunk
                        .iter()
                        .zip(hs)
                        .map(|((_, id), h)| (id.clone(), Category::ALL.to_vec(), h.clone()))
                        .collect();
                    let r = agent::consented_grants(&client, &plan, s, list).await?;
                    total.issued += r.issued;
                    total.not_permitted += r.not_permitted;
                    pb.inc(chunk.len() as u64);
                }
                pb.finish_and_clear();
                rows.push(
                    serde_json::json!({"study": s.study_id, "grants": total.issued,
                    "not_permitted": total.not_permitted}),
                );
            }
            let one = rows.len() == 1 && study.is_some();
            let value = if one {
                rows[0].clone()
            } else {
                serde_json::json!(rows)
            };
            print(&conn, &value, || {
                if rows.is_empty() {
                    return "no approved study is open".into();
                }
                rows.iter()
                    .map(|r| {
                        format!(
                            "{} grants issued to {}; {} patients' consent does not permit it",
                            r["grants"],
                            r["study"].as_str().unwrap_or_default(),
                            r["not_permitted"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Sponsor(SponsorCmd::Study(SponsorStudyCmd::Propose {
            conn,
            title,
            purpose,
            commitments: c,
            fields,
            categories,
            researcher_key,
            days,
            conditions,
            born_from,
            born_to,
            sex,
        })) => {
            let client = connect(&conn).await?;
            let researcher = PublicIdentity::read_file(&researcher_key)?;
            let now = pre_kms::request_auth::now_secs();
            let fields = if fields.is_empty() {
                let mut used = std::collections::BTreeSet::new();
                if born_from.is_some() || born_to.is_some() {
                    used.insert(SearchField::BirthYear);
                }
                if sex.is_some() {
                    used.insert(SearchField::Sex);
                }
                if !conditions.is_empty() {
                    used.insert(SearchField::Condition);
                }
                used
            } else {
                fields.into_iter().collect()
            };
            let proposal = StudyProposal {
                title,
                purpose: ResearchPurpose {
                    focus: purpose,
                    commercial: c.commercial,
                    irb_approved: c.irb,
                    will_publish: c.publish,
                    will_collaborate: c.collaborate,
                    will_return_data: c.return_data,
                    ends_at: Some(now + days * 24 * 3600),
                    region: c.region,
                    genetic: c.genetic,
                },
                fields,
                categories,
                researcher_id: researcher.actor_id(),
                receiving_key: pre_kms::keys::public_key_bytes(&researcher.encryption_key),
                not_before: now - 60,
                not_after: now + days * 24 * 3600,
                cohort: Cohort {
                    condition_codes: conditions,
                    min_birth_year: born_from,
                    max_birth_year: born_to,
                    sex,
                },
            };
            let s = client.propose_study(&proposal).await?;
            print(&conn, &serde_json::json!({"study_id": s.study_id}), || {
                format!("proposed study {}", s.study_id)
            });
        }
        Command::Board(BoardCmd::Study(BoardStudyCmd::List(conn))) => {
            let studies = connect(&conn).await?.list_studies().await?;
            let rows: Vec<_> = studies
                .iter()
                .map(|s| serde_json::json!({"study_id": s.study_id, "status": s.status.as_str(), "title": s.proposal.title,
                    "purpose": purpose_label(&s.proposal.purpose), "fields": s.proposal.fields, "categories": s.proposal.categories, "researcher_id": s.proposal.researcher_id}))
                .collect();
            print(&conn, &rows, || {
                studies
                    .iter()
                    .map(|s| {
                        format!(
                            "{}  {:<9} {} [{}]",
                            s.study_id,
                            s.status.as_str(),
                            s.proposal.title,
                            s.proposal
                                .categories
                                .iter()
                                .map(|c| c.label())
                                .collect::<Vec<_>>()
                                .join(",")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Board(BoardCmd::Study(BoardStudyCmd::Approve {
            conn,
            study,
            reason,
            override_abstain,
        })) => decide(&conn, &study, true, override_abstain, &reason).await?,
        Command::Board(BoardCmd::Study(BoardStudyCmd::Reject {
            conn,
            study,
            reason,
        })) => decide(&conn, &study, false, false, &reason).await?,
        Command::Patient(PatientCmd::Accesses { conn, who }) => {
            let client = connect_as(&conn, &who).await?;
            let shown = log_review::patient_accesses(&client, None).await?;
            print(&conn, &shown, || {
                let mut out = format!(
                    "{} logged events about you, each proven to be in the broker-signed log",
                    shown.len()
                );
                for e in &shown {
                    out.push('\n');
                    out.push_str(&log_review::human_line(e));
                }
                out
            });
        }
        Command::Patient(PatientCmd::Alerts { conn, who, ack }) => {
            let client = connect_as(&conn, &who).await?;
            let shown = log_review::patient_alerts(&client, None, ack).await?;
            print(&conn, &shown, || {
                let mut out = format!("{} unread alerts", shown.len());
                for e in &shown {
                    out.push('\n');
                    out.push_str(&log_review::human_line(e));
                }
                if ack && !shown.is_empty() {
                    out.push_str("\n(marked read)");
                }
                out
            });
        }
        Command::Sponsor(SponsorCmd::Count(args)) | Command::Board(BoardCmd::Count(args)) => {
            let client = connect(&args.conn).await?;
            let definition = std::fs::read(&args.definition)
                .with_context(|| format!("reading {}", args.definition.display()))?;
            let r = client.count(&args.study, &definition).await?;
            let attrition: Vec<_> = r
                .attrition
                .iter()
                .map(
                    |s| serde_json::json!({"step": s.step, "criterion": s.label, "count": s.count}),
                )
                .collect();
            print(
                &args.conn,
                &serde_json::json!({"study": args.study, "count": r.count, "exact": r.exact,
                    "definition_hash": r.definition_hash, "attrition": attrition}),
                || {
                    let mut out = format!(
                        "{} patients{} (definition {})\n\nstep  count   criterion",
                        r.count,
                        if r.exact {
                            ", exact"
                        } else {
                            " (protected: rounded, with noise; below 11 shown as <11)"
                        },
                        &r.definition_hash[..r.definition_hash.len().min(16)]
                    );
                    for s in &r.attrition {
                        out.push_str(&format!("\n{:>4}  {:>6}  {}", s.step, s.count, s.label));
                    }
                    out
                },
            );
        }
        Command::Board(BoardCmd::Log(BoardLogCmd::Verify {
            conn,
            state,
            quick,
            cosign,
        })) => {
            let client = connect(&conn).await?;
            let state = match state {
                Some(s) => s,
                None => {
                    let key = conn
                        .key
                        .as_ref()
                        .context("give --state FILE or --key FILE")?;
                    let mut p = key.as_os_str().to_owned();
                    p.push(".log-state.json");
                    PathBuf::from(p)
                }
            };
            let report = log_review::verify_log(&client, &state, !quick, cosign)
                .await
                .context("the access log does NOT verify")?;
            print(&conn, &report, || {
                let mut out = match report.previous_size {
                    Some(p) => format!(
                        "verified: the log grew from {p} to {} events, consistently",
                        report.size
                    ),
                    None => format!(
                        "verified: {} events (first check; this checkpoint is now trusted)",
                        report.size
                    ),
                };
                out.push_str(&format!(
                    "\n{} checkpoints signed by the broker and consistent; root {}",
                    report.checkpoints_checked, report.root
                ));
                if let Some(n) = report.leaves_recomputed {
                    out.push_str(&format!(
                        "\nall {n} leaves re-hashed: every checkpoint's root matches"
                    ));
                }
                if let Some(n) = report.cosignatures {
                    out.push_str(&format!("\nco-signed as a witness ({n} signatures)"));
                }
                out.push_str(&format!("\nstate kept in {}", state.display()));
                out
            });
        }
        Command::Board(BoardCmd::Log(BoardLogCmd::Show { conn, filter })) => {
            let client = connect(&conn).await?;
            let shown = log_review::board_events(&client, log_filter(filter)).await?;
            print(&conn, &shown, || {
                let mut out = format!("{} events", shown.len());
                for e in &shown {
                    out.push('\n');
                    out.push_str(&log_review::human_line(e));
                }
                out
            });
        }
        Command::Board(BoardCmd::Log(BoardLogCmd::Export {
            conn,
            filter,
            format,
            out,
        })) => {
            let client = connect(&conn).await?;
            let shown = log_review::board_events(&client, log_filter(filter)).await?;
            let text = match format {
                ExportFormat::Jsonl => log_review::to_jsonl(&shown),
                ExportFormat::Csv => log_review::to_csv(&shown),
                ExportFormat::Fhir => log_review::to_fhir_ndjson(&shown),
            };
            match out {
                Some(path) => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("{} events written to {}", shown.len(), path.display());
                }
                None => print!("{text}"),
            }
        }
        Command::Researcher(ResearcherCmd::Fetch { conn, study, out }) => {
            let client = connect(&conn).await?;
            let me = client.identity().clone();
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let mut manifest = Vec::new();
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {pos} records verified and decrypted ({per_sec})",
                )
                .expect("valid template"),
            );
            let report = agent::fetch_and_decrypt(&client, &me, &study, |r| {
                bar.inc(1);
                let dir = out.join(&r.subject);
                std::fs::create_dir_all(&dir)?;
                let name = format!("{}.v{}.json", r.category.label(), r.version);
                std::fs::write(dir.join(&name), &r.plaintext)?;
                manifest.push(serde_json::json!({"subject": r.subject, "category": r.category, "version": r.version,
                    "file": format!("{}/{}", r.subject, name), "blake3": blake3::hash(&r.plaintext).to_hex().to_string()}));
                Ok(())
            })
            .await?;
            bar.finish_and_clear();
            let summary = serde_json::json!({"release_id": report.release.release_id, "study_id": study,
                "subjects": report.release.subjects, "records": report.records, "files": manifest});
            std::fs::write(
                out.join("manifest.json"),
                serde_json::to_vec_pretty(&summary)?,
            )?;
            print(&conn, &summary, || {
                format!(
                    "release {}: {} subjects, {} records verified and decrypted into {}",
                    report.release.release_id,
                    report.release.subjects,
                    report.records,
                    out.display()
                )
            });
        }
    }
    Ok(())
}

/// A policy from the chosen source, as version `version` issued now (a file's own version
/// and issue time are kept if it has them).
fn read_policy(source: &PolicySource, version: u32) -> anyhow::Result<ConsentPolicy> {
    let now = pre_kms::request_auth::now_secs();
    if source.broad {
        return Ok(consent_policy::broad_research_policy(version, now));
    }
    let (path, fhir) = match (&source.file, &source.fhir) {
        (Some(p), _) => (p, false),
        (None, Some(p)) => (p, true),
        (None, None) => bail!("give a policy file, --fhir FILE or --broad"),
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let mut value = if fhir {
        let imported = consent_policy::from_fhir_consent(&value).map_err(|e| {
            anyhow::anyhow!(
                "{}: this FHIR Consent cannot be imported: {e}",
                path.display()
            )
        })?;
        for note in &imported.notes {
            eprintln!("note: {note}");
        }
        let mut v = serde_json::to_value(imported.policy.draft())?;
        v["version"] = version.into();
        v["issued_at"] = now.into();
        v
    } else {
        value
    };
    if let Some(map) = value.as_object_mut() {
        map.entry("version").or_insert(version.into());
        map.entry("issued_at").or_insert(now.into());
    }
    ConsentPolicy::from_json(&serde_json::to_vec(&value)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

async fn consent_command(cmd: ConsentCmd) -> anyhow::Result<()> {
    let (conn, who) = match &cmd {
        ConsentCmd::Set { conn, who, .. }
        | ConsentCmd::Show { conn, who }
        | ConsentCmd::History { conn, who }
        | ConsentCmd::Revoke { conn, who } => (conn.clone(), who.clone()),
    };
    let client = connect_as(&conn, &who).await?;
    let me = client.identity().clone();
    let history = agent::consent_history(&client, &me).await?;
    let next = agent::next_version(&history);
    let now = pre_kms::request_auth::now_secs();
    let policy = match cmd {
        ConsentCmd::Set { source, .. } => read_policy(&source, next)?,
        ConsentCmd::Revoke { .. } => consent_policy::PolicyDraft::revocation(next, now).check()?,
        ConsentCmd::Show { .. } => {
            let current = history
                .current(now)
                .context("no consent policy is set: nothing is shared")?;
            let json: serde_json::Value = serde_json::from_slice(current.canonical_bytes())?;
            print(&conn, &json, || {
                format!(
                    "version {} (hash {}), signed by you\n{}",
                    current.version(),
                    current.policy_hash(),
                    serde_json::to_string_pretty(&json).expect("json")
                )
            });
            return Ok(());
        }
        ConsentCmd::History { .. } => {
            let rows: Vec<_> = history
                .versions()
                .iter()
                .map(|p| {
                    serde_json::json!({"version": p.version(), "issued_at": p.issued_at(),
                    "policy_hash": p.policy_hash().to_hex(), "provisions": p.provisions().len()})
                })
                .collect();
            print(&conn, &rows, || {
                let mut out = format!("{} versions", rows.len());
                for p in history.versions() {
                    out.push_str(&format!(
                        "\nv{:<3} issued {}  {} provisions  {}",
                        p.version(),
                        log_review::iso_time(p.issued_at()),
                        p.provisions().len(),
                        p.policy_hash()
                    ));
                }
                out
            });
            return Ok(());
        }
    };
    let receipt = agent::set_consents(&client, &[(me, policy)])
        .await?
        .pop()
        .context("the broker returned no receipt")?;
    print(
        &conn,
        &serde_json::json!({"version": receipt.version, "policy_hash": receipt.policy_hash,
            "grants_withdrawn": receipt.grants_withdrawn}),
        || {
            format!(
                "consent version {} set (hash {}); {} grants withdrawn",
                receipt.version, receipt.policy_hash, receipt.grants_withdrawn
            )
        },
    );
    Ok(())
}

/// A board member's signed decision on a study.
async fn decide(
    conn: &Conn,
    study: &str,
    approve: bool,
    overrides_abstain: bool,
    reason: &str,
) -> anyhow::Result<()> {
    connect(conn)
        .await?
        .decide_study(study, approve, overrides_abstain, reason)
        .await?;
    println!("{} {study}", if approve { "approved" } else { "rejected" });
    Ok(())
}

fn pub_path(secret: &Path) -> PathBuf {
    let mut p = secret.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

fn report_errors(errors: &[datasets::ImportError]) {
    for e in errors {
        eprintln!("skipped: {e}");
    }
}

async fn import_fhir(
    conn: &Conn,
    path: &Path,
    keystore: &Path,
    batch: usize,
) -> anyhow::Result<()> {
    let client = connect(conn).await?;
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    let report = datasets::import_path(path, &DeidConfig::default());
    report_errors(&report.errors);
    let (total, created) = ingest_records(&client, report.patients, keystore, batch).await?;
    let summary = serde_json::json!({"files": report.files, "patients": total.patients, "new_keys": created,
        "envelopes_stored": total.envelopes_stored, "envelopes_unchanged": total.envelopes_unchanged,
        "errors": report.errors.len(), "skipped_files": report.skipped_files.len()});
    print(conn, &summary, || {
        format!(
            "{} patients from {} files: {} envelopes stored, {} unchanged; {} resources skipped with errors; keys in {}",
            total.patients,
            report.files,
            total.envelopes_stored,
            total.envelopes_unchanged,
            report.errors.len(),
            keystore.display()
        )
    });
    Ok(())
}

/// Uploads records as a custodian, batch by batch, each patient's keys made (or found) in
/// the keystore. Returns the ingest totals and how many keys were new.
async fn ingest_records(
    client: &BrokerClient,
    records: Vec<datasets::PatientRecord>,
    keystore: &Path,
    batch: usize,
) -> anyhow::Result<(agent::IngestReport, usize)> {
    let mut keystore = Keystore::open(keystore)?;
    let pb = progress(records.len(), "import");
    let mut created = 0;
    let mut records = records.into_iter().peekable();
    let batches = std::iter::from_fn(|| {
        records.peek()?;
        let chunk: Vec<_> = records.by_ref().take(batch).collect();
        Some(keystore.transaction(|ks| {
            chunk
                .into_iter()
                .map(|record| {
                    let (id, new) = ks.get_or_create(&record.source_id)?;
                    created += new as usize;
                    Ok((id, record))
                })
                .collect::<brokerctl::keystore::Result<Vec<_>>>()
        }))
    });
    let total = agent::ingest_all(client, batches, |done| pb.set_position(done as u64)).await?;
    pb.finish_and_clear();
    Ok((total, created))
}
