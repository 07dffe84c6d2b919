//! `brokerctl sponsor`: propose studies, and count a cohort (the count the board also
//! runs, exactly).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use model::{Cohort, ResearchPurpose, SearchField, StudyFocus, StudyProposal};
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
    /// The cohort definition (JSON).
    #[arg(long)]
    definition: PathBuf,
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
            conditions,
            born_from,
            born_to,
            sex,
        }) => {
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
        SponsorCmd::Count(args) => count(args).await?,
    }
    Ok(())
}

/// A cohort definition's count for a study, with its attrition, as the broker answers the
/// caller: protected for a sponsor, exact for the board.
pub async fn count(args: CountArgs) -> anyhow::Result<()> {
    let client = connect(&args.conn).await?;
    let definition = std::fs::read(&args.definition)
        .with_context(|| format!("reading {}", args.definition.display()))?;
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
