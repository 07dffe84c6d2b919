//! The client-side flows of each role, on top of [`crate::client`]: a custodian
//! sealing and uploading records, a patient agent issuing grants, a researcher
//! verifying and decrypting a release. All cryptography here runs on the caller's side.

use datasets::PatientRecord;
use pre_kms::grant::{self, GrantPlan};
use pre_kms::keys::{public_key_bytes, public_key_from_bytes};
use pre_kms::network::{NetworkManifest, NetworkProxy, VerifiedNetwork};
use pre_kms::reencrypt::{ReleasedEnvelope, decrypt_released};
use pre_kms::{Category, Identity, envelope};
use rayon::prelude::*;
use tokio_stream::StreamExt;

use consent_policy::{ConsentPolicy, PolicyHistory};

use crate::wire::{BrokerClient, ClientError, ClientResult};
use consent_policy::{ConsentReceipt, ConsentSubmission, consent_digest, decide, grant_scope};
use model::{Enrollment, PatientIndex, Release, Study, Upload, UploadedEnvelope};

/// What a custodian already knows of a patient from an earlier import (its keystore keeps
/// it), so that a re-import does not redo it.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// The patient's category public keys, in [`Category::ALL`] order: not derived again.
    pub category_keys: Option<Vec<umbral_pre::PublicKey>>,
    /// The broker acknowledged the patient's enrollment: it is not signed and sent again
    /// (should the broker not know the patient after all, the batch is enrolled and sent
    /// again).
    pub enrolled: bool,
}

/// What an ingested batch established about one of its patients, for the keystore: the
/// patient is enrolled at the broker, and these are its category keys when they were
/// derived in this batch.
#[derive(Debug, Clone)]
pub struct Learned {
    pub pseudonym: String,
    pub category_keys: Option<Vec<umbral_pre::PublicKey>>,
}

/// A patient's enrollment and sealed upload, prepared together so that each category
/// key is derived once.
pub struct PreparedPatient {
    /// `None` when the broker already has the patient's enrollment.
    pub enrollment: Option<Enrollment>,
    pub envelopes: Vec<UploadedEnvelope>,
    pub index: (String, PatientIndex),
    /// The category keys, in [`Category::ALL`] order.
    pub keys: Vec<(Category, umbral_pre::PublicKey)>,
    /// Whether `keys` were derived now (not taken from [`Known`]).
    pub derived: bool,
}

/// Derives the patient's category keys once (or takes the known ones), signs the
/// enrollment unless the broker has it, and seals each category of the record with its
/// content tag.
pub fn prepare(
    patient: &Identity,
    record: &PatientRecord,
    known: &Known,
) -> pre_kms::Result<PreparedPatient> {
    let cached = known
        .category_keys
        .as_ref()
        .filter(|k| k.len() == Category::ALL.len());
    let keys: Vec<(Category, umbral_pre::PublicKey)> = match cached {
        Some(keys) => Category::ALL
            .iter()
            .copied()
            .zip(keys.iter().copied())
            .collect(),
        None => Category::ALL
            .iter()
            .map(|c| (*c, patient.category_public_key(*c)))
            .collect(),
    };
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
            Ok(UploadedEnvelope {
                pseudonym: pseudonym.clone(),
                category: *category,
                sealed: envelope::seal(key, plaintext)?,
                content_tag: patient.content_tag(*category, plaintext).to_vec(),
            })
        })
        .collect::<pre_kms::Result<Vec<_>>>()?;
    Ok(PreparedPatient {
        enrollment: (!known.enrolled)
            .then(|| pre_kms::enrollment::enroll_with_keys(patient, &keys)),
        envelopes,
        index: (pseudonym, searchable_index(patient, record)),
        keys,
        derived: cached.is_none(),
    })
}

/// The index rows the broker receives for a patient: the record's rows with every date
/// moved by the patient's secret shift ([`Identity::index_date_shift`]), so that no row is
/// on the patient's birth or death date as such.
pub fn searchable_index(patient: &Identity, record: &PatientRecord) -> PatientIndex {
    record.index.shifted(patient.index_date_shift())
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct IngestReport {
    pub patients: usize,
    pub newly_enrolled: usize,
    pub envelopes_stored: usize,
    pub envelopes_unchanged: usize,
    pub bytes: usize,
    /// Patients whose category keys were derived (not known from an earlier import).
    pub keys_derived: usize,
    /// Enrollments signed and sent (patients not known to be enrolled, and any the broker
    /// turned out not to know).
    pub enrollments_sent: usize,
}

/// Enrolls and uploads one batch of patients (the caller acts for all of them).
pub async fn ingest_batch(
    client: &BrokerClient,
    batch: Vec<(Identity, PatientRecord)>,
) -> ClientResult<IngestReport> {
    let batch = batch
        .into_iter()
        .map(|(p, r)| (p, r, Known::default()))
        .collect();
    Ok(ingest_known(client, batch).await?.0)
}

/// [`ingest_batch`] for patients the custodian may know from an earlier import: known
/// category keys are not derived again, known enrollments are not sent again. Returns
/// what the batch established, for the keystore.
pub async fn ingest_known(
    client: &BrokerClient,
    batch: Vec<(Identity, PatientRecord, Known)>,
) -> ClientResult<(IngestReport, Vec<Learned>)> {
    let mut report = IngestReport {
        patients: batch.len(),
        ..Default::default()
    };
    let (batch, prepared) = tokio::task::spawn_blocking(move || {
        let prepared = batch
            .par_iter()
            .map(|(p, r, k)| prepare(p, r, k))
            .collect::<pre_kms::Result<Vec<_>>>();
        (batch, prepared)
    })
    .await
    .map_err(|e| ClientError::Invalid(e.to_string()))?;
    let prepared = prepared?;
    let mut enrollments = Vec::with_capacity(prepared.len());
    let mut envelopes = Vec::new();
    let mut index = Vec::with_capacity(prepared.len());
    let mut learned = Vec::with_capacity(prepared.len());
    let mut keys = Vec::with_capacity(prepared.len());
    for p in prepared {
        report.bytes += p.envelopes.iter().map(|e| e.sealed.len()).sum::<usize>();
        report.keys_derived += usize::from(p.derived);
        enrollments.extend(p.enrollment);
        envelopes.extend(p.envelopes);
        learned.push(Learned {
            pseudonym: p.index.0.clone(),
            category_keys: p.derived.then(|| p.keys.iter().map(|(_, k)| *k).collect()),
        });
        index.push(p.index);
        keys.push(p.keys);
    }
    report.enrollments_sent = enrollments.len();
    if !enrollments.is_empty() {
        report.newly_enrolled = count_new(client.enroll_prepared(enrollments).await?);
    }
    let upload = Upload { envelopes, index };
    // Kept for a second try only when an enrollment was taken as known.
    let again = batch
        .iter()
        .any(|(_, _, k)| k.enrolled)
        .then(|| upload.clone());
    let reply = match (client.upload(upload).await, again) {
        // A patient the keystore took for enrolled is unknown to this broker (another
        // broker, a new data directory): enroll the ones not sent, then upload again.
        (Err(ClientError::Status(s)), Some(upload))
            if s.code() == tonic::Code::FailedPrecondition =>
        {
            let late: Vec<Enrollment> = batch
                .iter()
                .zip(&keys)
                .filter(|((_, _, k), _)| k.enrolled)
                .map(|((p, _, _), keys)| pre_kms::enrollment::enroll_with_keys(p, keys))
                .collect();
            report.enrollments_sent += late.len();
            report.newly_enrolled += count_new(client.enroll_prepared(late).await?);
            client.upload(upload).await?
        }
        (other, _) => other?,
    };
    for r in reply.receipts {
        if r.unchanged {
            report.envelopes_unchanged += 1;
        } else {
            report.envelopes_stored += 1;
        }
    }
    Ok((report, learned))
}

fn count_new(enrolled: Vec<bool>) -> usize {
    enrolled.into_iter().filter(|c| *c).count()
}

/// Ingests batches with two in flight, so that sealing one batch overlaps the upload
/// of the previous. `progress` is told the number of patients done after each batch.
pub async fn ingest_all<E>(
    client: &BrokerClient,
    batches: impl IntoIterator<Item = Result<Vec<(Identity, PatientRecord)>, E>>,
    progress: impl FnMut(usize),
) -> ClientResult<IngestReport>
where
    ClientError: From<E>,
{
    let batches = batches.into_iter().map(|b| {
        b.map(|v| {
            v.into_iter()
                .map(|(p, r)| (p, r, Known::default()))
                .collect()
        })
    });
    ingest_all_known(client, batches, progress, |_| {}).await
}

/// [`ingest_all`] for patients the custodian may know ([`ingest_known`]); `learned` is
/// told what each batch established, in order, once the batch is stored.
pub async fn ingest_all_known<E>(
    client: &BrokerClient,
    batches: impl IntoIterator<Item = Result<Vec<(Identity, PatientRecord, Known)>, E>>,
    mut progress: impl FnMut(usize),
    mut learned: impl FnMut(Vec<Learned>),
) -> ClientResult<IngestReport>
where
    ClientError: From<E>,
{
    let mut total = IngestReport::default();
    let mut in_flight = std::collections::VecDeque::new();
    let mut finish = |done: (IngestReport, Vec<Learned>), total: &mut IngestReport| {
        total.add(&done.0);
        learned(done.1);
        progress(total.patients);
    };
    for batch in batches {
        let batch = batch?;
        let client = client.clone();
        in_flight.push_back(tokio::spawn(
            async move { ingest_known(&client, batch).await },
        ));
        if in_flight.len() >= 2 {
            let done = in_flight.pop_front().expect("two in flight");
            finish(
                done.await
                    .map_err(|e| ClientError::Invalid(e.to_string()))??,
                &mut total,
            );
        }
    }
    while let Some(done) = in_flight.pop_front() {
        finish(
            done.await
                .map_err(|e| ClientError::Invalid(e.to_string()))??,
            &mut total,
        );
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
        self.keys_derived += other.keys_derived;
        self.enrollments_sent += other.enrollments_sent;
    }
}

/// A draft manifest of the network this broker says it runs: its proxies in order, its
/// threshold and its registered boards, with `broker_key` (from the broker's `.pub`) and
/// the broker's TLS certificate.
/// The operator writes it; a board member checks it against what the proxy operators
/// say out of band and signs it; then it is handed to patients and custodians.
pub async fn draft_network(
    client: &BrokerClient,
    broker_key: &umbral_pre::PublicKey,
    broker_tls_cert: Option<&str>,
) -> ClientResult<NetworkManifest> {
    let listed = client.list_proxies().await?;
    let proxies = listed
        .proxies
        .iter()
        .map(|p| {
            Ok(NetworkProxy {
                proxy_id: p.proxy_id.clone(),
                verifying_key: public_key_from_bytes(&p.verifying_key)?,
                encryption_key: public_key_from_bytes(&p.encryption_key)?,
            })
        })
        .collect::<ClientResult<Vec<_>>>()?;
    let boards = client
        .list_actors()
        .await?
        .into_iter()
        .filter(|a| a.role == model::Role::Board)
        .map(|a| Ok((a.name, public_key_from_bytes(&a.verifying_key)?)))
        .collect::<ClientResult<Vec<_>>>()?;
    let emergency = client.emergency_orgs().await?;
    Ok(NetworkManifest::new(
        broker_key,
        broker_tls_cert,
        listed.threshold as usize,
        &proxies,
        &boards,
    )
    .with_emergency_organisations(&emergency))
}

/// The plan for a patient's grant to a study, from the pinned `network`, never from the
/// broker's word: only for a study a pinned board approved (its signature over the
/// proposal, receiving key included), sealed to the pinned proxies with the pinned
/// threshold. A broker that lists other proxies or another threshold is refused.
pub async fn grant_plan(
    client: &BrokerClient,
    network: &VerifiedNetwork,
    study: &Study,
) -> ClientResult<GrantPlan> {
    network.check_approval(study)?;
    check_proxies(client, network).await?;
    let proposal = &study.proposal;
    Ok(GrantPlan {
        study_id: study.study_id.clone(),
        receiving_key: public_key_from_bytes(&proposal.receiving_key)?,
        categories: proposal.categories.clone(),
        threshold: network.threshold,
        expires_at: proposal.not_after,
        proxy_keys: network.proxies.iter().map(|p| p.encryption_key).collect(),
    })
}

/// Refuses a broker that lists other proxies or another threshold than the pinned network.
async fn check_proxies(client: &BrokerClient, network: &VerifiedNetwork) -> ClientResult<()> {
    let listed = client.list_proxies().await?;
    let same = listed.threshold as usize == network.threshold
        && listed.proxies.len() == network.proxies.len()
        && listed.proxies.iter().zip(&network.proxies).all(|(l, p)| {
            l.proxy_id == p.proxy_id
                && l.encryption_key == public_key_bytes(&p.encryption_key)
                && l.verifying_key == public_key_bytes(&p.verifying_key)
        });
    if !same {
        return Err(pre_kms::Error::Network(format!(
            "the broker lists {} proxies with threshold {}, not the {} proxies with threshold {} of the pinned network manifest; nothing granted (ask your ethics board which is right)",
            listed.proxies.len(),
            listed.threshold,
            network.proxies.len(),
            network.threshold
        ))
        .into());
    }
    Ok(())
}

/// Issues grants for a batch of patients: each grants the plan's categories it has data in.
pub async fn grant_batch(
    client: &BrokerClient,
    plan: &GrantPlan,
    patients: Vec<(Identity, Vec<Category>)>,
) -> ClientResult<usize> {
    let expires_at = plan.expires_at;
    let scoped = patients
        .into_iter()
        .map(|(id, has)| (id, has, expires_at))
        .collect();
    grant_scoped(client, plan, scoped).await
}

/// Issues one grant per patient for the plan's categories the patient lists, expiring at
/// the patient's own time (at most the plan's). Patients left with no category get none.
pub async fn grant_scoped(
    client: &BrokerClient,
    plan: &GrantPlan,
    patients: Vec<(Identity, Vec<Category>, i64)>,
) -> ClientResult<usize> {
    let plan = plan.clone();
    let grants = tokio::task::spawn_blocking(move || {
        patients
            .par_iter()
            .filter_map(|(patient, has, expires_at)| {
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
                            expires_at: (*expires_at).min(plan.expires_at),
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
    /// The study pseudonym, checked by [`check_subject`]: safe as a file name.
    pub subject: String,
    pub category: Category,
    pub version: u32,
    pub plaintext: Vec<u8>,
}

impl DecryptedRecord {
    /// Where the record goes under an output directory: `SUBJECT/CATEGORY.vVERSION.json`,
    /// made only of checked parts, so it never leaves that directory.
    pub fn relative_path(&self) -> std::path::PathBuf {
        std::path::Path::new(&self.subject).join(format!(
            "{}.v{}.json",
            self.category.label(),
            self.version
        ))
    }
}

/// A subject names a directory on the researcher's disk, and comes from the broker: it
/// must be one plain name (letters, digits, `-`, `_`; at most 64), never a path.
pub fn check_subject(subject: &str) -> ClientResult<()> {
    let plain = !subject.is_empty()
        && subject.len() <= 64
        && !subject.starts_with('-')
        && subject
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        Ok(())
    } else {
        Err(ClientError::Invalid(format!(
            "the broker sent a subject that is not a plain name ({:?}); refusing the release",
            model::quote::excerpt(subject)
        )))
    }
}

/// Verifies a release item's `threshold` fragments and decrypts it with `me`'s key (the
/// study's receiving key, or an emergency organisation's).
fn open_item(
    item: broker_proto::v1::ReleaseItem,
    me: &Identity,
    threshold: usize,
) -> ClientResult<DecryptedRecord> {
    let category: Category = item
        .category
        .parse()
        .map_err(|e: model::UnknownCategory| ClientError::Invalid(e.to_string()))?;
    let released = ReleasedEnvelope {
        sealed: item.sealed,
        delegating_key: public_key_from_bytes(&item.delegating_key)?,
        verifying_key: public_key_from_bytes(&item.verifying_key)?,
        cfrags: item.cfrags,
    };
    let plaintext = decrypt_released(me, &released, threshold)?;
    Ok(DecryptedRecord {
        subject: item.subject,
        category,
        version: item.version,
        plaintext,
    })
}

#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    pub release: Release,
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
                        check_subject(&item.subject)?;
                        open_item(item, &researcher, threshold)
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

// ---------------------------------------------------------------- consent

/// Signs `policy` as `patient`'s next consent version, ready to submit.
pub fn sign_consent(patient: &Identity, policy: &ConsentPolicy) -> ConsentSubmission {
    let pseudonym = patient.pseudonym();
    ConsentSubmission {
        signature: patient.sign(&consent_digest(&pseudonym, policy.canonical_bytes())),
        pseudonym,
        policy_json: policy.canonical_bytes().to_vec(),
    }
}

/// Sets a policy for each patient (each signed by the patient's own key), in one call.
pub async fn set_consents(
    client: &BrokerClient,
    policies: &[(Identity, ConsentPolicy)],
) -> ClientResult<Vec<ConsentReceipt>> {
    let submissions = policies
        .par_iter()
        .map(|(id, policy)| sign_consent(id, policy))
        .collect();
    client.set_consents(submissions).await
}

/// A patient's policy versions as stored at the broker, each checked against the
/// patient's own key (a broker cannot substitute a policy the patient did not sign).
pub async fn consent_history(
    client: &BrokerClient,
    patient: &Identity,
) -> ClientResult<PolicyHistory> {
    let pseudonym = patient.pseudonym();
    let versions = client.consent_history(&pseudonym).await?;
    let mut policies = Vec::with_capacity(versions.len());
    for v in versions {
        let policy = ConsentPolicy::from_json(&v.policy).map_err(|e| {
            ClientError::Invalid(format!("stored consent version {}: {e}", v.version))
        })?;
        let digest = consent_digest(&pseudonym, policy.canonical_bytes());
        if !pre_kms::keys::verify_signature(&patient.verifying_key(), &digest, &v.signature) {
            return Err(ClientError::Invalid(format!(
                "stored consent version {} is not signed by the patient",
                v.version
            )));
        }
        policies.push(policy);
    }
    PolicyHistory::new(policies).map_err(|e| ClientError::Invalid(e.to_string()))
}

/// [`consent_history`], checked against what this agent itself last set (`head`): the
/// broker must not leave out the newest version, or an older, wider policy would decide.
pub async fn consent_history_checked(
    client: &BrokerClient,
    patient: &Identity,
    head: Option<&crate::consent_heads::ConsentHead>,
) -> ClientResult<PolicyHistory> {
    let history = consent_history(client, patient).await?;
    if let Some(head) = head {
        let newest = history.versions().last();
        let holds = history
            .versions()
            .iter()
            .any(|p| p.version() == head.version && p.policy_hash().to_hex() == head.policy_hash);
        if !holds || newest.is_some_and(|p| p.version() < head.version) {
            return Err(ClientError::Invalid(format!(
                "the broker's consent history of patient {} lacks version {}, which this agent set: it is hiding the newest consent; nothing granted",
                patient.pseudonym(),
                head.version
            )));
        }
    }
    Ok(history)
}

/// The next version number for a patient's policy.
pub fn next_version(history: &PolicyHistory) -> u32 {
    history.versions().last().map_or(1, |p| p.version() + 1)
}

/// What consent-driven granting did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsentedGrants {
    /// Grants issued.
    pub issued: usize,
    /// Patients whose consent does not permit the study (or any of its categories
    /// they have records in).
    pub not_permitted: usize,
}

/// Grants an approved study exactly what each patient's consent permits: the permitted
/// categories the patient has records in, expiring at the earliest of the policy, the
/// deciding provision and the study period. `patients` pairs each identity with its
/// record categories and its consent history.
pub async fn consented_grants(
    client: &BrokerClient,
    plan: &GrantPlan,
    study: &Study,
    patients: Vec<(Identity, Vec<Category>, PolicyHistory)>,
) -> ClientResult<ConsentedGrants> {
    let now = pre_kms::request_auth::now_secs();
    let mut out = ConsentedGrants::default();
    let mut scoped = Vec::with_capacity(patients.len());
    for (id, has, history) in patients {
        match grant_scope(&decide(&history, study, now), study) {
            Ok((allowed, expiry)) => {
                let categories: Vec<Category> =
                    allowed.into_iter().filter(|c| has.contains(c)).collect();
                if categories.is_empty() {
                    out.not_permitted += 1;
                } else {
                    scoped.push((id, categories, expiry));
                }
            }
            Err(_) => out.not_permitted += 1,
        }
    }
    out.issued = grant_scoped(client, plan, scoped).await?;
    Ok(out)
}

/// What standing break-glass granting did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmergencyGrants {
    /// The emergency organisations of the pinned network.
    pub organisations: usize,
    /// Grants issued (one per patient and organisation).
    pub issued: usize,
    /// Patients whose consent does not allow break-glass (they get none).
    pub not_allowed: usize,
}

/// A standing emergency grant lasts at most a year: the agent renews it.
pub const STANDING_GRANT_SECONDS: i64 = 365 * 24 * 3600;

/// Deposits standing break-glass grants: `critical` only, to each emergency organisation
/// the pinned `network` lists (to the key it pins, whatever the broker says), for each
/// patient whose current consent allows break-glass, expiring at the policy's end or
/// within a year. `patients` pairs each identity with its consent history (checked, see
/// [`consent_history_checked`]). Withdrawing the choice is a consent change: the broker
/// then withdraws these grants at every proxy.
pub async fn emergency_grants(
    client: &BrokerClient,
    network: &VerifiedNetwork,
    patients: Vec<(Identity, PolicyHistory)>,
) -> ClientResult<EmergencyGrants> {
    let mut out = EmergencyGrants {
        organisations: network.emergency_organisations.len(),
        ..Default::default()
    };
    if network.emergency_organisations.is_empty() {
        return Ok(out);
    }
    check_proxies(client, network).await?;
    let now = pre_kms::request_auth::now_secs();
    for (org, (_, key)) in &network.emergency_organisations {
        let plan = GrantPlan {
            study_id: model::emergency_grantee(org),
            receiving_key: *key,
            categories: vec![Category::Critical],
            threshold: network.threshold,
            expires_at: now + STANDING_GRANT_SECONDS,
            proxy_keys: network.proxies.iter().map(|p| p.encryption_key).collect(),
        };
        let mut scoped = Vec::new();
        for (id, history) in &patients {
            match consent_policy::standing_emergency(history, org, now) {
                Ok(end) => {
                    let expiry = end.map_or(plan.expires_at, |e| e.min(plan.expires_at));
                    scoped.push((id.clone(), vec![Category::Critical], expiry));
                }
                Err(_) => out.not_allowed += 1,
            }
        }
        out.issued += grant_scoped(client, &plan, scoped).await?;
    }
    out.not_allowed /= network.emergency_organisations.len();
    Ok(out)
}

/// What a clinician's break-glass gave: the access as logged and the patient's
/// `critical` records, verified and decrypted.
#[derive(Debug, Clone)]
pub struct BreakGlassRecords {
    pub access: model::BreakGlassAccess,
    pub records: Vec<DecryptedRecord>,
}

/// Checks a break-glass answer and decrypts it with the emergency organisation's key:
/// every item must be the `critical` category of the patient asked for (its verifying
/// key hashes to the pseudonym, so a broker cannot pass off another patient's record),
/// with `threshold` fragments that verify. A lying broker or proxy is reported.
pub async fn open_break_glass(
    answer: crate::wire::BreakGlassAnswer,
    organisation: &Identity,
    pseudonym: Option<&str>,
) -> ClientResult<BreakGlassRecords> {
    let threshold = answer.threshold as usize;
    let wanted = pseudonym.unwrap_or(&answer.access.pseudonym).to_owned();
    if answer.access.pseudonym != wanted {
        return Err(ClientError::Invalid(
            "the broker answered with an access to another patient; refusing it".into(),
        ));
    }
    if answer.items.is_empty() {
        return Err(ClientError::Invalid(
            "the broker's break-glass answer holds no record".into(),
        ));
    }
    let organisation = organisation.clone();
    let records = tokio::task::spawn_blocking(move || {
        answer
            .items
            .into_iter()
            .map(|item| {
                if item.category != Category::Critical.label() {
                    return Err(ClientError::Invalid(format!(
                        "the broker sent a {} record under break-glass, which covers critical only; refusing it",
                        model::quote::excerpt(&item.category)
                    )));
                }
                let verifying_key = public_key_from_bytes(&item.verifying_key)?;
                if pre_kms::keys::pseudonym(&verifying_key) != wanted || item.subject != wanted {
                    return Err(ClientError::Invalid(
                        "the broker sent a record of another patient; refusing it".into(),
                    ));
                }
                open_item(item, &organisation, threshold)
            })
            .collect::<ClientResult<Vec<_>>>()
    })
    .await
    .map_err(|e| ClientError::Invalid(e.to_string()))??;
    Ok(BreakGlassRecords {
        access: answer.access,
        records,
    })
}

/// Sends the patient's signed erasure request and checks the receipts the broker answers
/// with against the pinned network ([`pre_kms::erasure::check_bundle`]): the patient
/// trusts the signatures of the proxies it pinned, not the broker's word. Returns the
/// bundle to keep and what it proves.
pub async fn erase(
    client: &BrokerClient,
    network: &VerifiedNetwork,
    request: pre_kms::erasure::ErasureRequest,
) -> ClientResult<(
    pre_kms::erasure::ReceiptBundle,
    pre_kms::erasure::BundleCheck,
)> {
    let receipts = client.erase(&request).await?;
    let bundle = pre_kms::erasure::ReceiptBundle::new(request, receipts);
    let checked = pre_kms::erasure::check_bundle(&bundle, network).map_err(|e| {
        ClientError::Invalid(format!(
            "the broker's answer does not prove the erasure: {e}"
        ))
    })?;
    Ok((bundle, checked))
}

/// A patient's erasure whose signed request and receipts are kept in the file `out`
/// (owner-only). The request is written before it is sent, so a run that does not get the
/// receipts can send the same request again (call again with the same `out`); the
/// checked receipts then replace it. A refusal, after which nothing was done, removes the
/// saved request. `confirm` is asked before a new request is signed.
pub async fn erase_kept(
    client: &BrokerClient,
    network: &VerifiedNetwork,
    out: &std::path::Path,
    confirm: impl FnOnce(&str) -> ClientResult<()>,
) -> ClientResult<pre_kms::erasure::BundleCheck> {
    use pre_kms::erasure::{ErasureRequest, ReceiptBundle};
    let me = client.identity();
    let pseudonym = me.pseudonym();
    let saved: Option<ReceiptBundle> = match std::fs::read(out) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|_| {
            ClientError::Invalid(format!(
                "{} exists and is not an erasure receipt bundle; choose another file",
                out.display()
            ))
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(ClientError::Invalid(format!(
                "reading {}: {e}",
                out.display()
            )));
        }
    };
    let request = match saved {
        Some(b) if b.request.pseudonym != pseudonym => {
            return Err(ClientError::Invalid(format!(
                "{} holds another patient's erasure",
                out.display()
            )));
        }
        Some(b) => b.request,
        None => {
            confirm(&pseudonym)?;
            let request = ErasureRequest::sign(me, pre_kms::request_auth::now_ms());
            write_bundle(out, &ReceiptBundle::new(request.clone(), Vec::new()))?;
            request
        }
    };
    let (bundle, checked) = match erase(client, network, request).await {
        Ok(done) => done,
        Err(ClientError::Status(s))
            if matches!(
                s.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::Unauthenticated
            ) =>
        {
            // Refused, so nothing was done: the saved request goes, and the next run
            // signs a new one.
            let _ = std::fs::remove_file(out);
            return Err(ClientError::Status(s));
        }
        Err(e) => {
            return Err(ClientError::Invalid(format!(
                "{e}\nyour signed request is saved in {}: erase again to finish the erasure and get its receipts",
                out.display()
            )));
        }
    };
    write_bundle(out, &bundle)?;
    Ok(checked)
}

/// Writes a receipt bundle owner-only, through a temporary file.
fn write_bundle(
    out: &std::path::Path,
    bundle: &pre_kms::erasure::ReceiptBundle,
) -> ClientResult<()> {
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let bytes = serde_json::to_vec_pretty(bundle).expect("a bundle serializes");
    pre_kms::private_fs::write_private(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, out))
        .map_err(|e| ClientError::Invalid(format!("writing {}: {e}", out.display())))
}
