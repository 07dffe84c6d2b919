//! `brokerctl sponsor`: propose studies, and count a cohort (the count the board also
//! runs, exactly).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use model::{CohortDefinition, ResearchPurpose, SearchField, StudyFocus, StudyProposal};
use pre_kms::{Category, PublicIdentity};

use super::conn::{Conn, connect, print};

#[derive(Subcommand)]
pub enum SponsorCmd {
    /// Studies.
    #[command(subcommand)]
    Study(SponsorStudyCmd),
    /// How many patients match a cohort definition (docs/COHORTS.md), counted over the
    /// fields each patient consented to make searchable for the study: a protected count
    /// ("<11", or noisy and rounded) and its attrition.
    Count(CountArgs),
}

#[derive(Args, Clone)]
pub struct CountArgs {
    #[command(flatten)]
    conn: Conn,
    #[arg(long)]
    study: String,
    /// A cohort definition (JSON, docs/COHORTS.md) to count [default: the study's own
    /// cohort, the one its release selects].
    #[arg(long)]
    definition: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum SponsorStudyCmd {
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
        /// Searchable fields the study may search [default: those its cohort reads].
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
        /// The study's cohort: a cohort definition (JSON, docs/COHORTS.md). The board
        /// approves it with the study, counts it exactly, and a release selects exactly
        /// its patients [default: every patient whose consent permits the study].
        #[arg(long)]
        cohort: Option<PathBuf>,
    },
}

/// What a study declares about its use of the data (DUO modifiers are matched to these).
#[derive(Args, Clone)]
pub struct Commitments {
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

pub async fn run(cmd: SponsorCmd) -> anyhow::Result<()> {
    match cmd {
        SponsorCmd::Study(SponsorStudyCmd::Propose {
            conn,
            title,
            purpose,
            commitments: c,
            fields,
            categories,
            researcher_key,
            days,
            cohort,
        }) => {
            let cohort = match &cohort {
                Some(path) => {
                    let json = std::fs::read(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    CohortDefinition::from_json(&json)
                        .with_context(|| format!("{}: not a cohort definition", path.display()))?
                }
                None => CohortDefinition::everyone(),
            };
            let client = connect(&conn).await?;
            let researcher = PublicIdentity::read_file(&researcher_key)?;
            let now = pre_kms::request_auth::now_secs();
            let fields = if fields.is_empty() {
                cohort.fields()
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
                cohort,
            };
            let s = client.propose_study(&proposal).await?;
            let hash = s.proposal.cohort.normalized().hash.to_string();
            print(
                &conn,
                &serde_json::json!({"study_id": s.study_id, "cohort_hash": hash}),
                || format!("proposed study {} (cohort {})", s.study_id, &hash[..16]),
            );
        }
        SponsorCmd::Count(args) => count(args).await?,
    }
    Ok(())
}

/// A cohort definition's count for a study, with its attrition, as the broker answers the
/// caller: protected for a sponsor, exact for the board.
pub async fn count(args: CountArgs) -> anyhow::Result<()> {
    let client = connect(&args.conn).await?;
    let definition = match &args.definition {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => Vec::new(),
    };
    let r = client.count(&args.study, &definition).await?;
    let attrition: Vec<_> = r
        .attrition
        .iter()
        .map(|s| serde_json::json!({"step": s.step, "criterion": s.label, "count": s.count}))
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
    Ok(())
}
