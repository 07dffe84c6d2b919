//! `brokerctl researcher`: fetch, verify and decrypt a study's release; read the erasure
//! notices to your studies.

use std::path::PathBuf;

use anyhow::Context;
use brokerctl::{agent, log_review};
use clap::Subcommand;
use pre_kms::private_fs::{private_dir, write_private};

use super::conn::{Conn, connect, print};

#[derive(Subcommand)]
pub enum ResearcherCmd {
    /// Request the release of an approved study, verify and decrypt it into DIR.
    Fetch {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        study: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Notices that subjects of your studies were erased, each checked against the
    /// broker-signed log: what you already received of them stays governed by the study's
    /// data-use terms, and later releases leave them out.
    Notices {
        #[command(flatten)]
        conn: Conn,
        /// Only this study's notices.
        #[arg(long)]
        study: Option<String>,
    },
}

pub async fn run(cmd: ResearcherCmd) -> anyhow::Result<()> {
    match cmd {
        ResearcherCmd::Fetch { conn, study, out } => {
            let client = connect(&conn).await?;
            let me = client.identity().clone();
            // Decrypted records are patient data: everything written here is owner-only.
            if !out.exists() {
                private_dir(&out).with_context(|| format!("creating {}", out.display()))?;
            }
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
                // The path is made of parts the agent checked, never taken from the server.
                let file = r.relative_path();
                private_dir(&out.join(&r.subject))?;
                write_private(&out.join(&file), &r.plaintext)?;
                manifest.push(serde_json::json!({"subject": r.subject, "category": r.category, "version": r.version,
                    "file": file.to_string_lossy(), "blake3": blake3::hash(&r.plaintext).to_hex().to_string()}));
                Ok(())
            })
            .await?;
            bar.finish_and_clear();
            let summary = serde_json::json!({"release_id": report.release.release_id, "study_id": study,
                "subjects": report.release.subjects, "records": report.records, "files": manifest});
            write_private(
                &out.join("manifest.json"),
                &serde_json::to_vec_pretty(&summary)?,
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
        ResearcherCmd::Notices { conn, study } => {
            let client = connect(&conn).await?;
            let shown = log_review::researcher_notices(&client, study.as_deref()).await?;
            print(&conn, &shown, || {
                let mut out = format!(
                    "{} erasure notices, each proven to be in the broker-signed log",
                    shown.len()
                );
                for e in &shown {
                    let d = &e.event.details;
                    out.push_str(&format!(
                        "\n{}  study {}  subject {}  {} records received before the erasure",
                        log_review::iso_time(e.event.time),
                        d.study_id.as_deref().unwrap_or("-"),
                        d.subject.as_deref().unwrap_or("-"),
                        d.record_count.unwrap_or(0)
                    ));
                }
                if let Some(e) = shown.first()
                    && let Some(why) = &e.event.why.purpose
                {
                    out.push_str(&format!("\n{why}"));
                }
                out
            });
        }
    }
    Ok(())
}
