//! `brokerctl patient`: enroll, upload your records, grant studies, set your consent
//! policy, review the accesses to your data.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use brokerctl::{agent, log_review};
use clap::{Args, Subcommand};
use consent_policy::ConsentPolicy;
use datasets::DeidConfig;
use pre_kms::Category;

use super::conn::{AsPatient, Conn, connect, connect_as, head_store, pinned_network, print};
use super::custodian::report_problems;

#[derive(Subcommand)]
pub enum PatientCmd {
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
    /// If your consent allows break-glass: deposit standing grants of your critical
    /// records (only those) to each emergency organisation your pinned network lists, so
    /// that its clinicians can read them in an emergency, each use logged and shown to
    /// you. Withdrawing break-glass in your consent withdraws them.
    EmergencyGrant(#[command(flatten)] Conn),
    /// Print your emergency card: one line (for a printed card or a QR code) with your
    /// pseudonym, signed by you, and nothing that identifies you.
    EmergencyCard {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        who: AsPatient,
        /// Also write the card's line to this file.
        #[arg(long)]
        out: Option<PathBuf>,
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
    /// Erase yourself, for good: every grant withdrawn (key fragments destroyed at every
    /// proxy), every record, index row and consent deleted at the broker, your log
    /// entries no longer linkable to you. Writes the receipts, checked against the pinned
    /// network (`brokerctl verify-receipt` checks them again); a patient in a custodian's
    /// keystore has their keys destroyed there too.
    Erase {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        who: AsPatient,
        /// Where to write the receipts (default: erasure-PSEUDONYM.json). Your signed
        /// request is kept there until they come: run the command again to finish an
        /// erasure that did not.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
pub enum ConsentCmd {
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
pub struct PolicySource {
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

pub async fn run(cmd: PatientCmd) -> anyhow::Result<()> {
    match cmd {
        PatientCmd::Enroll(conn) => {
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
        PatientCmd::Upload { conn, path } => {
            let client = connect(&conn).await?;
            let me = client.identity().clone();
            let report = datasets::import_path(&path, &DeidConfig::default());
            report_problems(&report);
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
        PatientCmd::Grant { conn, study } => {
            let client = connect(&conn).await?;
            let me = client.identity().clone();
            let network = pinned_network(&conn)?;
            let s = client.get_study(&study).await?;
            let plan = agent::grant_plan(&client, &network, &s).await?;
            let head = head_store(&conn, &AsPatient::default())?.head(&me.pseudonym())?;
            let history = agent::consent_history_checked(&client, &me, head.as_ref()).await?;
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
        PatientCmd::EmergencyGrant(conn) => {
            let client = connect(&conn).await?;
            let me = client.identity().clone();
            let network = pinned_network(&conn)?;
            let head = head_store(&conn, &AsPatient::default())?.head(&me.pseudonym())?;
            let history = agent::consent_history_checked(&client, &me, head.as_ref()).await?;
            let r = agent::emergency_grants(&client, &network, vec![(me, history)]).await?;
            print(
                &conn,
                &serde_json::json!({"organisations": r.organisations, "grants": r.issued,
                    "not_allowed": r.not_allowed > 0}),
                || match (r.organisations, r.issued) {
                    (0, _) => {
                        "your pinned network lists no emergency organisation; nothing granted"
                            .into()
                    }
                    (_, 0) => "your consent does not allow break-glass; nothing granted".into(),
                    (n, _) => format!(
                        "standing emergency grants of your critical records deposited for {n} emergency organisation(s)"
                    ),
                },
            );
        }
        PatientCmd::EmergencyCard { conn, who, out } => {
            // Made offline, with the patient's own key: no broker is asked.
            let me = match who.keystore_entry() {
                Some((keystore, _)) if !keystore.exists() => {
                    bail!("keystore {} does not exist", keystore.display())
                }
                Some((keystore, patient)) => brokerctl::keystore::Keystore::open(keystore)?
                    .get(patient)?
                    .with_context(|| {
                        format!("no patient {patient:?} in keystore {}", keystore.display())
                    })?,
                None => super::conn::load_key(&conn)?,
            };
            let card =
                pre_kms::emergency::EmergencyCard::sign(&me, pre_kms::request_auth::now_secs());
            let line = card.to_token();
            if let Some(path) = &out {
                pre_kms::private_fs::write_private(path, format!("{line}\n").as_bytes())
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            print(
                &conn,
                &serde_json::json!({"card": line, "pseudonym": card.pseudonym}),
                || {
                    format!(
                        "{line}\n(your emergency card: it names your pseudonym only; an emergency clinician gives it to `brokerctl clinician break-glass --token`)"
                    )
                },
            );
        }
        PatientCmd::Consent(cmd) => consent_command(cmd).await?,
        PatientCmd::Accesses { conn, who } => {
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
        PatientCmd::Erase {
            conn,
            who,
            out,
            yes,
        } => erase(&conn, &who, out, yes).await?,
        PatientCmd::Alerts { conn, who, ack } => {
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
    }
    Ok(())
}

/// A policy from the chosen source, as version `version` issued now (a file's own version
/// and issue time are kept if it has them).
pub fn read_policy(source: &PolicySource, version: u32) -> anyhow::Result<ConsentPolicy> {
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
    let heads = head_store(&conn, &who)?;
    let history =
        agent::consent_history_checked(&client, &me, heads.head(&me.pseudonym())?.as_ref()).await?;
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
    heads.record(std::slice::from_ref(&receipt))?;
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

/// `brokerctl patient erase`.
async fn erase(
    conn: &Conn,
    who: &AsPatient,
    out: Option<PathBuf>,
    yes: bool,
) -> anyhow::Result<()> {
    let network = conn.network.as_ref().context(
        "erasing needs the network manifest your ethics board signed, to check the receipts: --network FILE (or BROKER_NETWORK)",
    )?;
    let network = pre_kms::network::VerifiedNetwork::load(network)?;
    let client = connect_as(conn, who).await?;
    let pseudonym = client.identity().pseudonym();
    let out = out.unwrap_or_else(|| PathBuf::from(format!("erasure-{pseudonym}.json")));
    if out.exists() {
        eprintln!(
            "sending again the erasure request saved in {}",
            out.display()
        );
    }
    let checked = agent::erase_kept(&client, &network, &out, |pseudonym| {
        confirm_erasure(pseudonym, yes).map_err(|e| brokerctl::ClientError::Invalid(e.to_string()))
    })
    .await?;
    // The crypto-shredding: the custodian's copy of the patient's keys goes too.
    let shredded = match who.keystore_entry() {
        Some((keystore, patient)) => brokerctl::Keystore::open(keystore)?.destroy(patient)?,
        None => {
            head_store(conn, who)?.forget(&pseudonym)?;
            false
        }
    };
    print(conn, &checked, || {
        let deleted: Vec<String> = checked
            .broker_destroyed
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect();
        format!(
            "erased {}: {} of {} proxies destroyed their key fragments ({} needed); the broker deleted {}{}\nreceipts written to {}",
            checked.pseudonym,
            checked.proxies_confirmed,
            network.proxies.len(),
            checked.proxies_needed,
            deleted.join(", "),
            if shredded {
                "; the patient's keys were destroyed in the keystore"
            } else {
                ""
            },
            out.display()
        )
    });
    Ok(())
}

/// Asks the user to type `erase`, unless `--yes`.
fn confirm_erasure(pseudonym: &str, yes: bool) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("an erasure cannot be undone: confirm it with --yes");
    }
    eprint!(
        "This erases patient {pseudonym} for good: every record, consent and grant, at the broker and every proxy.\nType `erase` to confirm: "
    );
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "erase" {
        bail!("not confirmed; nothing was done");
    }
    Ok(())
}

/// `brokerctl verify-receipt`: checks an erasure receipt bundle against the pinned network.
pub fn verify_receipt(file: &Path, network: &Path, json: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the receipt bundle {}", file.display()))?;
    let bundle: pre_kms::erasure::ReceiptBundle = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an erasure receipt bundle", file.display()))?;
    let network = pre_kms::network::VerifiedNetwork::load(network)
        .with_context(|| format!("reading the pinned network {}", network.display()))?;
    let checked = pre_kms::erasure::check_bundle(&bundle, &network)
        .with_context(|| format!("the receipts in {} do not hold", file.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&checked)?);
    } else {
        let deleted: Vec<String> = checked
            .broker_destroyed
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect();
        println!(
            "erasure of {} confirmed: {} of the pinned proxies destroyed their key fragments ({} needed); the broker deleted {}",
            checked.pseudonym,
            checked.proxies_confirmed,
            checked.proxies_needed,
            if deleted.is_empty() {
                "nothing".to_string()
            } else {
                deleted.join(", ")
            }
        );
    }
    Ok(())
}
