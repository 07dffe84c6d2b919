//! `brokerctl researcher`: fetch, verify and decrypt a study's release.

use std::path::PathBuf;

use anyhow::Context;
use brokerctl::agent;
use clap::Subcommand;

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
}

pub async fn run(cmd: ResearcherCmd) -> anyhow::Result<()> {
    match cmd {
        ResearcherCmd::Fetch { conn, study, out } => {
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
