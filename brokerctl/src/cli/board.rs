//! `brokerctl board`: review, approve and reject studies, verify, read and export the
//! access log, count cohorts exactly.

use std::path::PathBuf;

use anyhow::Context;
use brokerctl::log_review;
use clap::{Args, Subcommand};
use model::purpose_label;

use super::conn::{Conn, connect, load_key, print};
use super::sponsor::{self, CountArgs};

#[derive(Subcommand)]
pub enum BoardCmd {
    /// Studies.
    #[command(subcommand)]
    Study(BoardStudyCmd),
    /// The access log: verify, read, export.
    #[command(subcommand)]
    Log(BoardLogCmd),
    /// The exact count of a cohort definition for a study, with its attrition.
    Count(CountArgs),
    /// The break-glass review queue: every emergency access, and your findings.
    #[command(subcommand)]
    BreakGlass(BoardBreakGlassCmd),
    /// Check a network manifest (from `brokerctl operator network`) and sign it with your
    /// key, in place. Compare the proxy ids it shows with their operators first.
    SignNetwork {
        #[command(flatten)]
        conn: Conn,
        manifest: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum BoardBreakGlassCmd {
    /// Every break-glass access, newest first: who, which organisation, which patient,
    /// why, until when, flagged for repeated use, and its review.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Only the accesses no board member has reviewed yet.
        #[arg(long)]
        unreviewed: bool,
    },
    /// Record your finding on one access (logged).
    Review {
        #[command(flatten)]
        conn: Conn,
        /// The access id.
        access: String,
        #[arg(long, value_parser = ["ok", "misuse"])]
        finding: String,
        #[arg(long)]
        note: String,
    },
}

#[derive(Subcommand)]
pub enum BoardLogCmd {
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
pub struct LogFilter {
    /// From this time on: YYYY-MM-DD or unix seconds.
    #[arg(long, value_parser = log_review::parse_time)]
    since: Option<i64>,
    /// Up to this time: YYYY-MM-DD (the whole day) or unix seconds.
    #[arg(long, value_parser = log_review::parse_until)]
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
pub enum ExportFormat {
    Jsonl,
    Csv,
    Fhir,
}

#[derive(Subcommand)]
pub enum BoardStudyCmd {
    /// Every study and its status, with its cohort's hash (what an approval signs).
    List(#[command(flatten)] Conn),
    /// One study in full: purpose, categories, fields, researcher, period and its cohort
    /// definition (normalized) with the hash an approval signs.
    Show {
        #[command(flatten)]
        conn: Conn,
        study: String,
    },
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

pub async fn run(cmd: BoardCmd) -> anyhow::Result<()> {
    match cmd {
        BoardCmd::BreakGlass(BoardBreakGlassCmd::List { conn, unreviewed }) => {
            let list = connect(&conn)
                .await?
                .break_glass_accesses(unreviewed)
                .await?;
            let json: Vec<serde_json::Value> = list.iter().map(break_glass_json).collect();
            print(&conn, &json, || {
                let mut out = format!("{} break-glass accesses", list.len());
                for a in &list {
                    out.push_str(&format!(
                        "\n{} {} clinician {} of {} patient {}{} reason {:?} until {}{} - {}",
                        a.access_id,
                        log_review::iso_time(a.created_at),
                        a.clinician_id,
                        a.organisation_id,
                        a.pseudonym,
                        if a.card_presented { " (card)" } else { "" },
                        a.reason,
                        log_review::iso_time(a.expires_at),
                        if a.flagged {
                            format!(" FLAGGED ({} uses in 24 h)", a.recent_uses)
                        } else {
                            String::new()
                        },
                        match &a.review {
                            Some(r) =>
                                format!("reviewed {} by {}: {}", r.finding, r.board_id, r.note),
                            None => "not reviewed".into(),
                        }
                    ));
                }
                out
            });
        }
        BoardCmd::BreakGlass(BoardBreakGlassCmd::Review {
            conn,
            access,
            finding,
            note,
        }) => {
            let a = connect(&conn)
                .await?
                .review_break_glass(&access, &finding, &note)
                .await?;
            print(&conn, &break_glass_json(&a), || {
                format!("break-glass access {} reviewed: {finding}", a.access_id)
            });
        }
        BoardCmd::SignNetwork { conn, manifest } => {
            let me = load_key(&conn)?;
            let mut m = pre_kms::network::NetworkManifest::read(&manifest)?;
            m.sign(&me)?;
            let verified = m.verify()?;
            m.write(&manifest)?;
            print(
                &conn,
                &serde_json::json!({"manifest": manifest, "threshold": verified.threshold,
                    "proxies": m.proxies.iter().map(|p| &p.proxy_id).collect::<Vec<_>>(),
                    "signatures": m.signatures.len()}),
                || {
                    format!(
                        "signed {}: threshold {} of proxies {}; {} board signatures",
                        manifest.display(),
                        verified.threshold,
                        m.proxies
                            .iter()
                            .map(|p| p.proxy_id.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        m.signatures.len()
                    )
                },
            );
        }
        BoardCmd::Study(BoardStudyCmd::List(conn)) => {
            let studies = connect(&conn).await?.list_studies().await?;
            let rows: Vec<_> = studies.iter().map(study_json).collect();
            print(&conn, &rows, || {
                studies
                    .iter()
                    .map(|s| {
                        format!(
                            "{}  {:<9} {} [{}] cohort {} for researcher {} (receiving key {})",
                            s.study_id,
                            s.status.as_str(),
                            s.proposal.title,
                            s.proposal
                                .categories
                                .iter()
                                .map(|c| c.label())
                                .collect::<Vec<_>>()
                                .join(","),
                            &s.proposal.cohort.normalized().hash.to_string()[..16],
                            s.proposal.researcher_id,
                            hex::encode(&s.proposal.receiving_key)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        BoardCmd::Study(BoardStudyCmd::Show { conn, study }) => {
            let s = connect(&conn).await?.get_study(&study).await?;
            let normalized = s.proposal.cohort.normalized();
            print(&conn, &study_json(&s), || {
                let p = &s.proposal;
                let mut out = format!(
                    "{}  {}\n  title:      {}\n  purpose:    {}\n  categories: {}\n  fields:     {}\n  researcher: {} (receiving key {})\n  period:     {} to {}\n  cohort:     {}\n",
                    s.study_id,
                    s.status.as_str(),
                    p.title,
                    purpose_label(&p.purpose),
                    p.categories
                        .iter()
                        .map(|c| c.label())
                        .collect::<Vec<_>>()
                        .join(", "),
                    p.fields
                        .iter()
                        .map(|f| f.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    p.researcher_id,
                    hex::encode(&p.receiving_key),
                    p.not_before,
                    p.not_after,
                    normalized.hash,
                );
                if p.cohort.criteria.is_empty() {
                    out.push_str("              every patient whose consent permits the study\n");
                }
                for c in &p.cohort.criteria {
                    out.push_str(&format!("              - {}\n", c.describe()));
                }
                out.push_str(&format!("  definition: {}", normalized.json));
                out
            });
        }
        BoardCmd::Study(BoardStudyCmd::Approve {
            conn,
            study,
            reason,
            override_abstain,
        }) => decide(&conn, &study, true, override_abstain, &reason).await?,
        BoardCmd::Study(BoardStudyCmd::Reject {
            conn,
            study,
            reason,
        }) => decide(&conn, &study, false, false, &reason).await?,
        BoardCmd::Log(BoardLogCmd::Verify {
            conn,
            state,
            quick,
            cosign,
        }) => {
            let client = connect(&conn).await?;
            let state = match state {
                Some(s) => s,
                None => log_review::BoardState::beside(
                    conn.key
                        .as_ref()
                        .context("give --state FILE or --key FILE")?,
                ),
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
        BoardCmd::Log(BoardLogCmd::Show { conn, filter }) => {
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
        BoardCmd::Log(BoardLogCmd::Export {
            conn,
            filter,
            format,
            out,
        }) => {
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
        BoardCmd::Count(args) => sponsor::count(args).await?,
    }
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

fn log_filter(f: LogFilter) -> audit_log::EventFilter {
    log_review::events_filter(f.since, f.until, f.study, f.actor, f.kinds)
}

/// A study as `board study list --json` and `board study show --json` print it.
fn study_json(s: &model::Study) -> serde_json::Value {
    let normalized = s.proposal.cohort.normalized();
    serde_json::json!({"study_id": s.study_id, "status": s.status.as_str(), "title": s.proposal.title,
        "purpose": purpose_label(&s.proposal.purpose), "fields": s.proposal.fields,
        "categories": s.proposal.categories, "researcher_id": s.proposal.researcher_id,
        "receiving_key": hex::encode(&s.proposal.receiving_key),
        "not_before": s.proposal.not_before, "not_after": s.proposal.not_after,
        "cohort_hash": normalized.hash.to_string(), "cohort": s.proposal.cohort})
}

fn break_glass_json(a: &model::BreakGlassAccess) -> serde_json::Value {
    serde_json::json!({"access_id": a.access_id, "clinician": a.clinician_id,
        "organisation": a.organisation_id, "pseudonym": a.pseudonym, "reason": a.reason,
        "card_presented": a.card_presented, "created_at": a.created_at,
        "expires_at": a.expires_at, "leaf_index": a.leaf_index, "recent_uses": a.recent_uses,
        "flagged": a.flagged,
        "review": a.review.as_ref().map(|r| serde_json::json!({"board": r.board_id,
            "finding": r.finding.as_str(), "note": r.note, "reviewed_at": r.reviewed_at}))})
}
