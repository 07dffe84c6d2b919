//! `brokerctl clinician`: break the glass for a patient in an emergency, and reopen an
//! access inside its window.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use brokerctl::agent::{self, BreakGlassRecords};
use brokerctl::log_review::iso_time;
use clap::{Args, Subcommand};
use pre_kms::Identity;
use pre_kms::private_fs::{private_dir, write_private};

use super::conn::{Conn, connect, print};

#[derive(Subcommand)]
pub enum ClinicianCmd {
    /// Emergency access to one patient's critical records (blood type, allergies,
    /// implants, active medications, major diagnoses), for a patient whose consent allows
    /// it. Logged before anything is released, shown to the patient at once, reviewed by
    /// the ethics board; it lasts at most 24 hours.
    BreakGlass {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        patient: WhichPatient,
        /// Why this is an emergency (required; logged, shown to the patient and the board).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        out: Output,
    },
    /// The same access again, inside its window: the patient's latest critical records.
    Reopen {
        #[command(flatten)]
        conn: Conn,
        /// The access id `break-glass` printed.
        #[arg(long)]
        access: String,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct WhichPatient {
    /// The line of the patient's emergency card (`PBEC1.…`, from a printed card or QR code).
    #[arg(long)]
    token: Option<String>,
    /// The patient's pseudonym, when there is no card.
    #[arg(long)]
    patient: Option<String>,
}

#[derive(Args)]
pub struct Output {
    /// Your emergency organisation's secret key file (the key its standing grants
    /// re-encrypt to).
    #[arg(long)]
    org_key: PathBuf,
    /// Where to write the decrypted records (owner-only).
    #[arg(long)]
    out: PathBuf,
}

pub async fn run(cmd: ClinicianCmd) -> anyhow::Result<()> {
    match cmd {
        ClinicianCmd::BreakGlass {
            conn,
            patient,
            reason,
            out,
        } => {
            if reason.trim().is_empty() {
                bail!("--reason is required: say why this is an emergency");
            }
            let org = org_key(&out.org_key)?;
            let client = connect(&conn).await?;
            let card = patient.token.clone().unwrap_or_default();
            let pseudonym = match (&patient.token, &patient.patient) {
                (Some(t), _) => pre_kms::emergency::EmergencyCard::parse(t)?.pseudonym,
                (None, Some(p)) => p.clone(),
                (None, None) => bail!("give --token or --patient"),
            };
            let answer = client
                .break_glass(
                    patient.patient.as_deref().unwrap_or_default(),
                    &card,
                    &reason,
                )
                .await?;
            let opened = agent::open_break_glass(answer, &org, Some(&pseudonym)).await?;
            report(&conn, &out.out, &opened)?;
        }
        ClinicianCmd::Reopen { conn, access, out } => {
            let org = org_key(&out.org_key)?;
            let client = connect(&conn).await?;
            let answer = client.reopen_break_glass(&access).await?;
            let opened = agent::open_break_glass(answer, &org, None).await?;
            report(&conn, &out.out, &opened)?;
        }
    }
    Ok(())
}

fn org_key(path: &Path) -> anyhow::Result<Identity> {
    Ok(Identity::read_key_file(path)
        .with_context(|| format!("reading the organisation key {}", path.display()))?
        .0)
}

/// Writes the records (owner-only) and says what was opened, until when.
fn report(conn: &Conn, out: &Path, opened: &BreakGlassRecords) -> anyhow::Result<()> {
    if !out.exists() {
        private_dir(out).with_context(|| format!("creating {}", out.display()))?;
    }
    let mut files = Vec::new();
    for r in &opened.records {
        agent::check_subject(&r.subject)?;
        let file = r.relative_path();
        private_dir(&out.join(&r.subject))?;
        write_private(&out.join(&file), &r.plaintext)?;
        files.push(file.to_string_lossy().into_owned());
    }
    let a = &opened.access;
    print(
        conn,
        &serde_json::json!({"access_id": a.access_id, "pseudonym": a.pseudonym,
            "organisation": a.organisation_id, "expires_at": a.expires_at,
            "flagged": a.flagged, "files": files}),
        || {
            format!(
                "break-glass access {} to patient {} for {}: {} critical record(s) verified and decrypted into {}\nexpires {} (reopen with `brokerctl clinician reopen --access {}` until then; afterwards it is a new, logged break-glass){}",
                a.access_id,
                a.pseudonym,
                a.organisation_id,
                files.len(),
                out.display(),
                iso_time(a.expires_at),
                a.access_id,
                if a.flagged {
                    format!(
                        "\nflagged for the ethics board: your {} uses in 24 hours",
                        a.recent_uses
                    )
                } else {
                    String::new()
                }
            )
        },
    );
    Ok(())
}
