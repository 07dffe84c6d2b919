//! `broker demo`: the whole flow on the embedded default, checked end to end.
//!
//! Starts a broker with its proxies on loopback, generates a seeded population, has a
//! custodian enroll and ingest it, a sponsor propose a study, the board approve it, the
//! patients' agent issue grants, and the researcher fetch, verify and decrypt the
//! release; then checks every decrypted record against the original research copy.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cohort_query::Cohort;
use datasets::Population;
use indicatif::{ProgressBar, ProgressStyle};
use pre_kms::keystore::Keystore;
use pre_kms::{Category, Identity};
use tokio::net::TcpListener;

use crate::agent;
use crate::client::BrokerClient;
use crate::role::Role;
use crate::server::{self, ServeConfig};
use crate::study::StudyProposal;

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub data_dir: PathBuf,
    pub patients: usize,
    pub seed: u64,
    pub batch: usize,
    pub progress: bool,
}

/// The demo study: adults born 1930–1975 with hypertension, four categories.
pub const DEMO_CATEGORIES: [Category; 4] = [
    Category::Demographics,
    Category::Conditions,
    Category::Observations,
    Category::Medications,
];

pub fn demo_cohort() -> Cohort {
    Cohort {
        condition_codes: vec!["38341003".into()],
        min_birth_year: Some(1930),
        max_birth_year: Some(1975),
        sex: None,
    }
}

#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub patients: usize,
    pub envelopes: usize,
    pub envelope_bytes: usize,
    pub ingest: Duration,
    pub grants: usize,
    pub grant_time: Duration,
    pub subjects: u32,
    pub released: usize,
    pub release_time: Duration,
    pub expected: usize,
    pub verified: bool,
}

impl std::fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "patients ingested    {:>8}  ({} envelopes, {:.1} MiB sealed)",
            self.patients,
            self.envelopes,
            self.envelope_bytes as f64 / (1 << 20) as f64
        )?;
        writeln!(
            f,
            "ingest               {:>8.2} s  {:>9.0} envelopes/s  {:>8.0} patients/s",
            self.ingest.as_secs_f64(),
            rate(self.envelopes, self.ingest),
            rate(self.patients, self.ingest)
        )?;
        writeln!(
            f,
            "grants issued        {:>8}  in {:.2} s  ({:.0} grants/s)",
            self.grants,
            self.grant_time.as_secs_f64(),
            rate(self.grants, self.grant_time)
        )?;
        writeln!(
            f,
            "release              {:>8} subjects, {} envelopes re-encrypted, verified and decrypted",
            self.subjects, self.released
        )?;
        writeln!(
            f,
            "release throughput   {:>8.2} s  {:>9.0} envelopes/s",
            self.release_time.as_secs_f64(),
            rate(self.released, self.release_time)
        )?;
        write!(
            f,
            "check                {}",
            if self.verified {
                format!(
                    "OK: all {} decrypted records equal the originals, none missing, none extra",
                    self.expected
                )
            } else {
                "FAILED".to_owned()
            }
        )
    }
}

fn bar(show: bool, len: usize, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

pub async fn run(cfg: DemoConfig) -> anyhow::Result<DemoSummary> {
    anyhow::ensure!(cfg.patients > 0, "--patients must be at least 1");
    if cfg.data_dir.exists() && std::fs::read_dir(&cfg.data_dir)?.next().is_some() {
        anyhow::bail!(
            "{} is not empty; the demo needs a new or empty data directory",
            cfg.data_dir.display()
        );
    }
    let broker_dir = cfg.data_dir.join("broker");
    let custodian_dir = cfg.data_dir.join("custodian");
    std::fs::create_dir_all(&custodian_dir)?;

    let operator = Identity::generate();
    let mut config = ServeConfig::new(&broker_dir);
    config.operator = Some(operator.public("operator"));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let running = server::start(listener, config, std::future::pending()).await?;
    let url = running.url();
    eprintln!(
        "broker on {url} with {} proxies on loopback; data in {}",
        running.proxies.len(),
        cfg.data_dir.display()
    );

    let op = BrokerClient::connect(&url, operator).await?;
    let custodian = Identity::generate();
    let sponsor = Identity::generate();
    let board = Identity::generate();
    let researcher = Identity::generate();
    let vk = |i: &Identity| pre_kms::keys::public_key_bytes(&i.verifying_key());
    op.register_actor(
        Role::Custodian,
        "Demo Hospital",
        "Demo Health",
        vk(&custodian),
    )
    .await?;
    op.register_actor(Role::Sponsor, "Demo Sponsor", "Demo Pharma", vk(&sponsor))
        .await?;
    op.register_actor(Role::Board, "Demo Ethics Board", "Demo IRB", vk(&board))
        .await?;
    let researcher_actor = op
        .register_actor(
            Role::Researcher,
            "Demo Researcher",
            "Demo University",
            vk(&researcher),
        )
        .await?;

    // Ingest, as the custodian.
    let population = Population::new(cfg.seed, cfg.patients);
    let mut keystore = Keystore::open(&custodian_dir.join("keystore.db"))?;
    let cust = op.with_identity(custodian);
    let mut summary = DemoSummary {
        patients: cfg.patients,
        ..Default::default()
    };
    let progress = bar(cfg.progress, cfg.patients, "ingest");
    let started = Instant::now();
    let mut patients = Vec::with_capacity(cfg.patients);
    let batches = (0..cfg.patients).step_by(cfg.batch).map(|start| {
        let end = (start + cfg.batch).min(cfg.patients);
        let records: Vec<_> = (start..end).map(|i| population.patient(i)).collect();
        let batch = keystore.transaction(|ks| {
            records
                .into_iter()
                .map(|r| Ok((ks.get_or_create(&r.source_id)?.0, r)))
                .collect::<pre_kms::Result<Vec<_>>>()
        })?;
        patients.extend(
            batch
                .iter()
                .map(|(id, r)| (id.clone(), r.categories.keys().copied().collect::<Vec<_>>())),
        );
        Ok(batch)
    });
    let report =
        agent::ingest_all(&cust, batches, |done| progress.set_position(done as u64)).await?;
    progress.finish_and_clear();
    summary.ingest = started.elapsed();
    summary.envelopes = report.envelopes_stored + report.envelopes_unchanged;
    summary.envelope_bytes = report.bytes;

    // The study: proposed by the sponsor, approved by the board.
    let now = crate::service::now_secs();
    let proposal = StudyProposal {
        title: "Hypertension outcomes in adults born 1930-1975".into(),
        purpose: "HMB".into(),
        categories: DEMO_CATEGORIES.to_vec(),
        researcher_id: researcher_actor.actor_id.clone(),
        receiving_key: pre_kms::keys::public_key_bytes(&researcher.encryption_public_key()),
        not_before: now - 60,
        not_after: now + 90 * 24 * 3600,
        cohort: demo_cohort(),
    };
    let study = op.with_identity(sponsor).propose_study(&proposal).await?;
    let study = op
        .with_identity(board)
        .decide_study(&study.study_id, true, "demo approval")
        .await?;

    // Grants, issued by the custodian's agent for every patient.
    let plan = agent::grant_plan(&cust, &study).await?;
    let progress = bar(cfg.progress, patients.len(), "grants");
    let started = Instant::now();
    for chunk in patients.chunks(cfg.batch) {
        summary.grants += agent::grant_batch(&cust, &plan, chunk.to_vec()).await?;
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    summary.grant_time = started.elapsed();

    // Release: fetch, verify, decrypt; keep a hash per record to check.
    let res = op.with_identity(researcher.clone());
    let started = Instant::now();
    let mut got: BTreeMap<[u8; 32], usize> = BTreeMap::new();
    let fetched = agent::fetch_and_decrypt(&res, &researcher, &study.study_id, |r| {
        *got.entry(*blake3::hash(&r.plaintext).as_bytes())
            .or_default() += 1;
        Ok(())
    })
    .await?;
    summary.release_time = started.elapsed();
    summary.subjects = fetched.release.subjects;
    summary.released = fetched.records;

    // The check: exactly the research copies of matching patients, in the study's categories.
    let cohort = demo_cohort();
    let mut want: BTreeMap<[u8; 32], usize> = BTreeMap::new();
    for i in 0..cfg.patients {
        let record = population.patient(i);
        if !cohort.matches(&record.index) {
            continue;
        }
        for (c, plaintext) in &record.categories {
            if DEMO_CATEGORIES.contains(c) {
                *want.entry(*blake3::hash(plaintext).as_bytes()).or_default() += 1;
            }
        }
    }
    summary.expected = want.values().sum();
    summary.verified = summary.expected > 0 && want == got;
    running.stop().await;
    Ok(summary)
}
