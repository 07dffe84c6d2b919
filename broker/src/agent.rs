//! The client-side flows of each role, on top of [`crate::client`]: a custodian
//! sealing and uploading records, a patient agent issuing grants, a researcher
//! verifying and decrypting a release. All cryptography here runs on the caller's side.

use broker_proto::v1 as pb;
use datasets::PatientRecord;
use pre_kms::grant::{self, GrantPlan};
use pre_kms::keys::public_key_from_bytes;
use pre_kms::reencrypt::{ReleasedEnvelope, decrypt_released};
use pre_kms::{Category, Identity, envelope};
use rayon::prelude::*;
use tokio_stream::StreamExt;

use crate::client::{BrokerClient, ClientError, ClientResult};
use crate::convert::index_to_pb;
use crate::service::Enrollment;

/// A patient's enrollment and sealed upload, prepared together so that each category
/// key is derived once.
pub struct PreparedPatient {
    pub enrollment: Enrollment,
    pub envelopes: Vec<pb::Envelope>,
    pub index: pb::IndexRows,
}

/// Derives the patient's category keys once, signs the enrollment, and seals each
/// category of the record with its content tag.
pub fn prepare(patient: &Identity, record: &PatientRecord) -> pre_kms::Result<PreparedPatient> {
    let keys: Vec<(Category, umbral_pre::PublicKey)> = Category::ALL
        .iter()
        .map(|c| (*c, patient.category_public_key(*c)))
        .collect();
    let pseudonym = patient.pseudonym();
    let envelopes = record
        .categories
        .iter()
        .map(|(category, plaintext)| {
            let key = &keys
                .iter()
                .find(|(c, _)| c == category)
                .expect("every category has a key")
                .1;
            Ok(pb::Envelope {
                pseudonym: pseudonym.clone(),
                category: category.label().to_owned(),
                sealed: envelope::seal(key, plaintext)?,
                content_tag: patient.content_tag(*category, plaintext).to_vec(),
            })
        })
        .collect::<pre_kms::Result<Vec<_>>>()?;
    Ok(PreparedPatient {
        enrollment: Enrollment::with_keys(patient, &keys),
        envelopes,
        index: index_to_pb(pseudonym, record.index.clone()),
    })
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct IngestReport {
    pub patients: usize,
    pub newly_enrolled: usize,
    pub envelopes_stored: usize,
    pub envelopes_unchanged: usize,
    pub bytes: usize,
}

/// Enrolls and uploads one batch of patients (the caller acts for all of them).
pub async fn ingest_batch(
    client: &BrokerClient,
    batch: Vec<(Identity, PatientRecord)>,
) -> ClientResult<IngestReport> {
    let mut report = IngestReport {
        patients: batch.len(),
        ..Default::default()
    };
    let prepared = tokio::task::spawn_blocking(move || {
        batch
            .par_iter()
            .map(|(p, r)| prepare(p, r))
            .collect::<pre_kms::Result<Vec<_>>>()
    })
    .await
    .map_err(|e| ClientError::Invalid(e.to_string()))??;
    let mut enrollments = Vec::with_capacity(prepared.len());
    let mut envelopes = Vec::new();
    let mut index = Vec::with_capacity(prepared.len());
    for p in prepared {
        report.bytes += p.envelopes.iter().map(|e| e.sealed.len()).sum::<usize>();
        enrollments.push(p.enrollment);
        envelopes.extend(p.envelopes);
        index.push(p.index);
    }
    report.newly_enrolled = client
        .enroll_prepared(enrollments)
        .await?
        .into_iter()
        .filter(|c| *c)
        .count();
    let reply = client.upload(envelopes, index).await?;
    for r in reply.receipts {
        if r.unchanged {
            report.envelopes_unchanged += 1;
        } else {
            report.envelopes_stored += 1;
        }
    }
    Ok(report)
}

/// Ingests batches with two in flight, so that sealing one batch overlaps the upload
/// of the previous. `progress` is told the number of patients done after each batch.
pub async fn ingest_all(
    client: &BrokerClient,
    batches: impl IntoIterator<Item = pre_kms::Result<Vec<(Identity, PatientRecord)>>>,
    mut progress: impl FnMut(usize),
) -> ClientResult<IngestReport> {
    let mut total = IngestReport::default();
    let mut in_flight = std::collections::VecDeque::new();
    for batch in batches {
        let batch = batch?;
        let client = client.clone();
        in_flight.push_back(tokio::spawn(
            async move { ingest_batch(&client, batch).await },
        ));
        if in_flight.len() >= 2 {
            let done = in_flight.pop_front().expect("two in flight");
            total.add(
                &done
                    .await
                    .map_err(|e| ClientError::Invalid(e.to_string()))??,
            );
            progress(total.patients);
        }
    }
    while let Some(done) = in_flight.pop_front() {
        total.add(
            &done
                .await
                .map_err(|e| ClientError::Invalid(e.to_string()))??,
        );
        progress(total.patients);
    }
    Ok(total)
}

impl IngestReport {
    pub fn add(&mut self, other: &IngestReport) {
        self.patients += other.patients;
        self.newly_enrolled += other.newly_enrolled;
        self.envelopes_stored += other.envelopes_stored;
        self.envelopes_unchanged += other.envelopes_unchanged;
        self.bytes += other.bytes;
    }
}

/// The plan for a patient's grant to a study: the requested categories the patient
/// has (intersected with `allowed`), expiring with the study.
pub async fn grant_plan(client: &BrokerClient, study: &pb::Study) -> ClientResult<GrantPlan> {
    let proxies = client.list_proxies().await?;
    let proposal = study
        .proposal
        .clone()
        .ok_or_else(|| ClientError::Invalid("study without proposal".into()))?;
    Ok(GrantPlan {
        study_id: study.study_id.clone(),
        receiving_key: public_key_from_bytes(&proposal.receiving_key)?,
        categories: proposal
            .categories
            .iter()
            .map(|c| {
                c.parse::<Category>()
                    .map_err(|e| ClientError::Invalid(e.to_string()))
            })
            .collect::<ClientResult<_>>()?,
        threshold: proxies.threshold as usize,
        expires_at: proposal.not_after,
        proxy_keys: proxies
            .proxies
            .iter()
            .map(|p| public_key_from_bytes(&p.encryption_key))
            .collect::<pre_kms::Result<_>>()?,
    })
}

/// Issues grants for a batch of patients: each grants the plan's categories it has data in.
pub async fn grant_batch(
    client: &BrokerClient,
    plan: &GrantPlan,
    patients: Vec<(Identity, Vec<Category>)>,
) -> ClientResult<usize> {
    let plan = plan.clone();
    let grants = tokio::task::spawn_blocking(move || {
        patients
            .par_iter()
            .filter_map(|(patient, has)| {
                let categories: Vec<Category> = plan
                    .categories
                    .iter()
                    .copied()
                    .filter(|c| has.contains(c))
                    .collect();
                (!categories.is_empty()).then(|| {
                    grant::issue(
                        patient,
                        &GrantPlan {
                            categories,
                            ..plan.clone()
                        },
                    )
                })
            })
            .collect::<pre_kms::Result<Vec<_>>>()
    })
    .await
    .map_err(|e| ClientError::Invalid(e.to_string()))??;
    let n = grants.len();
    if n > 0 {
        client.issue_grants(grants).await?;
    }
    Ok(n)
}

/// One decrypted research copy.
#[derive(Debug, Clone)]
pub struct DecryptedRecord {
    pub subject: String,
    pub category: Category,
    pub version: u32,
    pub plaintext: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    pub release: pb::Release,
    pub records: usize,
    pub bytes: usize,
}

/// Requests a release of `study_id`, streams it, verifies every cfrag and decrypts,
/// handing each record to `sink` in release order. Fails on the first envelope that
/// does not verify: a lying broker or proxy is reported, never skipped.
pub async fn fetch_and_decrypt(
    client: &BrokerClient,
    researcher: &Identity,
    study_id: &str,
    mut sink: impl FnMut(DecryptedRecord) -> std::io::Result<()>,
) -> ClientResult<FetchReport> {
    let release = client.request_release(study_id).await?;
    let threshold = release.threshold as usize;
    let mut stream = client.fetch_release(&release.release_id).await?;
    let mut report = FetchReport {
        release: release.clone(),
        ..Default::default()
    };
    let mut pending = Vec::with_capacity(64);
    loop {
        let next = stream.next().await;
        let done = next.is_none();
        if let Some(item) = next {
            pending.push(item?);
        }
        if pending.len() >= 64 || (done && !pending.is_empty()) {
            let batch = std::mem::take(&mut pending);
            let researcher = researcher.clone();
            let decrypted = tokio::task::spawn_blocking(move || {
                batch
                    .into_par_iter()
                    .map(|item| {
                        let category: Category = item.category.parse().map_err(
                            |e: pre_kms::category::UnknownCategory| {
                                ClientError::Invalid(e.to_string())
                            },
                        )?;
                        let released = ReleasedEnvelope {
                            sealed: item.sealed,
                            delegating_key: public_key_from_bytes(&item.delegating_key)?,
                            verifying_key: public_key_from_bytes(&item.verifying_key)?,
                            cfrags: item.cfrags,
                        };
                        let plaintext = decrypt_released(&researcher, &released, threshold)?;
                        Ok(DecryptedRecord {
                            subject: item.subject,
                            category,
                            version: item.version,
                            plaintext,
                        })
                    })
                    .collect::<ClientResult<Vec<_>>>()
            })
            .await
            .map_err(|e| ClientError::Invalid(e.to_string()))??;
            for record in decrypted {
                report.records += 1;
                report.bytes += record.plaintext.len();
                sink(record).map_err(|e| {
                    ClientError::Invalid(format!("cannot write a decrypted record: {e}"))
                })?;
            }
        }
        if done {
            break;
        }
    }
    Ok(report)
}
