//! `brokerctl import` and `brokerctl custodian`: import FHIR R4 or OMOP CDM data for the
//! patients whose keys you keep, and set their consents and grants.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use brokerctl::{BrokerClient, Keystore, agent};
use clap::Subcommand;
use datasets::DeidConfig;
use pre_kms::Category;

use super::conn::{Conn, connect, pinned_network, print, progress};
use super::patient::{PolicySource, read_policy};

#[derive(Subcommand)]
pub enum ImportCmd {
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
pub enum CustodianCmd {
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
    /// Standing break-glass grants of the critical records of every patient in the
    /// keystore whose consent allows break-glass, to each emergency organisation the
    /// pinned network lists.
    EmergencyGrant {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "keystore.db")]
        keystore: PathBuf,
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

pub async fn import(cmd: ImportCmd) -> anyhow::Result<()> {
    match cmd {
        ImportCmd::Fhir {
            conn,
            path,
            keystore,
            batch,
        } => import_fhir(&conn, &path, &keystore, batch.max(1)).await?,
        ImportCmd::Omop {
            conn,
            dir,
            keystore,
            batch,
        } => {
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
            let expected = import.patients.len();
            let records = import.patients.into_iter().map(|p| p.record);
            let (total, created) =
                ingest_records(&client, records, expected, &keystore, batch.max(1)).await?;
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
                "rows": import.rows, "not_indexed": import.not_indexed, "withheld": import.withheld,
                "concept_relations_added": concepts_added, "concept_relations_held": concepts_held});
            print(&conn, &summary, || {
                format!(
                    "{} patients from {}: {} envelopes stored, {} unchanged; rows read {:?}; event rows not indexed (concept 0 or another vocabulary) {:?}; \
                     index rows withheld under Safe Harbor (would reveal an age over 89) {}; concept relations: {} new, {} held",
                    total.patients,
                    dir.display(),
                    total.envelopes_stored,
                    total.envelopes_unchanged,
                    import.rows,
                    import.not_indexed,
                    import.withheld.total(),
                    concepts_added,
                    concepts_held
                )
            });
        }
    }
    Ok(())
}

pub async fn run(cmd: CustodianCmd) -> anyhow::Result<()> {
    match cmd {
        CustodianCmd::Consent {
            conn,
            keystore,
            patient,
            source,
            batch,
        } => {
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
                    let history = agent::consent_history_checked(
                        &client,
                        id,
                        ks.consent_head(&id.pseudonym())?.as_ref(),
                    )
                    .await?;
                    policies.push((
                        id.clone(),
                        read_policy(&source, agent::next_version(&history))?,
                    ));
                }
                let receipts = agent::set_consents(&client, &policies).await?;
                ks.record_consent_heads(&receipts)?;
                set += receipts.len();
                pb.inc(chunk.len() as u64);
            }
            pb.finish_and_clear();
            print(&conn, &serde_json::json!({"consents": set}), || {
                format!("{set} consent versions set")
            });
        }
        CustodianCmd::EmergencyGrant { conn, keystore } => {
            let network = pinned_network(&conn)?;
            let client = connect(&conn).await?;
            let ks = Keystore::open(&keystore)?;
            let patients = ks.all()?;
            let pb = progress(patients.len(), "consents");
            let mut list = Vec::with_capacity(patients.len());
            for (_, id) in patients {
                let head = ks.consent_head(&id.pseudonym())?;
                let history = agent::consent_history_checked(&client, &id, head.as_ref()).await?;
                list.push((id, history));
                pb.inc(1);
            }
            pb.finish_and_clear();
            let r = agent::emergency_grants(&client, &network, list).await?;
            print(
                &conn,
                &serde_json::json!({"organisations": r.organisations, "grants": r.issued,
                    "not_allowed": r.not_allowed}),
                || {
                    format!(
                        "{} standing emergency grants to {} emergency organisation(s); {} patients' consent does not allow break-glass",
                        r.issued, r.organisations, r.not_allowed
                    )
                },
            );
        }
        CustodianCmd::Grant {
            conn,
            study,
            keystore,
            batch,
        } => {
            let network = pinned_network(&conn)?;
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
            let ks = Keystore::open(&keystore)?;
            let patients = ks.all()?;
            let pb = progress(patients.len(), "consents");
            let mut histories = Vec::with_capacity(patients.len());
            for (_, id) in &patients {
                let head = ks.consent_head(&id.pseudonym())?;
                histories.push(agent::consent_history_checked(&client, id, head.as_ref()).await?);
                pb.inc(1);
            }
            pb.finish_and_clear();
            let mut rows = Vec::new();
            for s in &studies {
                let plan = agent::grant_plan(&client, &network, s).await?;
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
    }
    Ok(())
}

/// Prints, on standard error, everything of the input that was not imported: resources
/// in error, files skipped (with why), and resources whose type is not a FHIR R4 type.
pub fn report_problems(report: &datasets::ImportReport) {
    for e in &report.errors {
        eprintln!("skipped: {e}");
    }
    for (file, why) in &report.skipped_files {
        eprintln!("skipped file: {}: {why}", file.display());
    }
    for (file, types) in &report.unknown_types {
        let types: Vec<String> = types.iter().map(|(t, n)| format!("{t:?} ×{n}")).collect();
        eprintln!(
            "skipped: {}: resources of types that are not FHIR R4 resource types: {}",
            file.display(),
            types.join(", ")
        );
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
    let datasets::ImportFiles {
        json,
        ndjson,
        report: found,
    } = datasets::ImportFiles::find(path);
    let cfg = DeidConfig::default();
    // A few JSON files at a time, read one part ahead on a thread of their own: only
    // those patients are held until they are sealed and uploaded, however large the
    // directory. NDJSON files join by patient: they are read together, last.
    let report = std::cell::RefCell::new(found);
    let expected = json.len() + ndjson.len();
    let (parts, received) = std::sync::mpsc::sync_channel::<datasets::ImportReport>(1);
    let reader = std::thread::spawn(move || {
        let json_parts = json
            .chunks(FILES_AT_ONCE)
            .map(|files| datasets::import_json_files(files, &cfg));
        let ndjson_part =
            (!ndjson.is_empty()).then(|| datasets::import_ndjson_files(&ndjson, &cfg));
        for part in json_parts.chain(ndjson_part) {
            if parts.send(part).is_err() {
                return; // the upload stopped
            }
        }
    });
    let records = received.iter().flat_map(|mut part| {
        let patients = std::mem::take(&mut part.patients);
        report.borrow_mut().absorb(part);
        patients
    });
    let ingested = ingest_records(&client, records, expected, keystore, batch).await;
    let _ = reader.join();
    let report = report.into_inner();
    report_problems(&report);
    let (total, created) = ingested?;
    let summary = serde_json::json!({"files": report.files, "patients": total.patients, "new_keys": created,
        "envelopes_stored": total.envelopes_stored, "envelopes_unchanged": total.envelopes_unchanged,
        "keys_derived": total.keys_derived, "enrollments_sent": total.enrollments_sent,
        "errors": report.errors.len(), "skipped_files": report.skipped_files.len(),
        "not_imported": report.not_imported,
        "unknown_types": report.unknown_types.values().flat_map(|t| t.values()).sum::<usize>(),
        "withheld": report.withheld});
    print(conn, &summary, || {
        format!(
            "{} patients from {} files: {} envelopes stored, {} unchanged; {} resources skipped with errors, \
             {} files skipped, {} resources of unknown types; {} resources of other FHIR types not imported; \
             {} index rows withheld under Safe Harbor (would reveal an age over 89); keys in {}",
            total.patients,
            report.files,
            total.envelopes_stored,
            total.envelopes_unchanged,
            report.errors.len(),
            report.skipped_files.len(),
            report
                .unknown_types
                .values()
                .flat_map(|t| t.values())
                .sum::<usize>(),
            report.not_imported.values().sum::<usize>(),
            report.withheld.total(),
            keystore.display()
        )
    });
    Ok(())
}

/// JSON files imported at once by `import fhir`: their patients are held until uploaded.
const FILES_AT_ONCE: usize = 64;

/// Uploads records as a custodian, batch by batch, each patient's keys made (or found) in
/// the keystore. Returns the ingest totals and how many keys were new.
async fn ingest_records(
    client: &BrokerClient,
    records: impl Iterator<Item = datasets::PatientRecord>,
    expected: usize,
    keystore: &Path,
    batch: usize,
) -> anyhow::Result<(agent::IngestReport, usize)> {
    let mut keystore = Keystore::open(keystore)?;
    let pb = progress(expected, "import");
    let mut created = 0;
    let mut records = records.peekable();
    // What each stored batch established, kept by the next batch's transaction (the
    // batches hold the keystore meanwhile), and after the last one.
    let learned: std::cell::RefCell<Vec<agent::Learned>> = Default::default();
    let keep = |ks: &Keystore| ks.record_learned(&learned.borrow_mut().split_off(0));
    let batches = std::iter::from_fn(|| {
        records.peek()?;
        let chunk: Vec<_> = records.by_ref().take(batch).collect();
        Some(keystore.transaction(|ks| {
            keep(ks)?;
            chunk
                .into_iter()
                .map(|record| {
                    let (id, new) = ks.get_or_create(&record.source_id)?;
                    created += new as usize;
                    let known = ks.known(&id)?;
                    Ok((id, record, known))
                })
                .collect::<brokerctl::keystore::Result<Vec<_>>>()
        }))
    });
    let total = agent::ingest_all_known(
        client,
        batches,
        |done| pb.set_position(done as u64),
        |batch| learned.borrow_mut().extend(batch),
    )
    .await?;
    keystore.transaction(|ks| keep(ks))?;
    pb.finish_and_clear();
    Ok((total, created))
}
