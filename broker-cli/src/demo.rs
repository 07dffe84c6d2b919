//! `broker demo`: the whole flow on the embedded default, checked end to end.
//!
//! Starts a broker with its proxies on loopback, generates a seeded population, has a
//! custodian enroll and ingest it, a sponsor propose a study, the board approve it, the
//! patients' agent issue grants, and the researcher fetch, verify and decrypt the
//! release; then checks every decrypted record against the original research copy.
//!
//! The pieces ([`Scenario`], [`Cast`], [`Tally`]) are shared with the end-to-end
//! benchmark, so that both measure the same path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use broker::server::{self, RunningBroker, ServeConfig};

use brokerctl::{BrokerClient, ClientResult, Keystore, agent};
use consent_policy::{
    Categories, ConsentPolicy, PolicyDraft, PolicyHistory, broad_research_policy, decide,
    grant_scope,
};
use datasets::{PatientRecord, Population};
use indicatif::{ProgressBar, ProgressStyle};
use model::{
    CohortDefinition, ResearchPurpose, Role, SearchField, Study, StudyFocus, StudyProposal,
};
use pre_kms::request_auth::now_secs;
use pre_kms::{Category, Identity};
use tokio::net::TcpListener;

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

pub fn demo_cohort() -> CohortDefinition {
    CohortDefinition::from_json(include_bytes!("../../docs/examples/hypertension.json"))
        .expect("the demo cohort is a valid definition")
}

/// A broker with its embedded proxies on loopback, and its operator.
pub struct Scenario {
    pub running: RunningBroker,
    pub operator: BrokerClient,
}

impl Scenario {
    /// Starts a broker on `127.0.0.1:0` over `data_dir` with a fresh operator.
    pub async fn start(data_dir: &Path) -> anyhow::Result<Scenario> {
        let operator = Identity::generate();
        let mut config = ServeConfig::new(data_dir);
        config.operator = Some(operator.public("operator"));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let running = server::start(listener, config, std::future::pending()).await?;
        let operator = BrokerClient::connect(&running.url(), &running.client_tls, operator).await?;
        Ok(Scenario { running, operator })
    }

    /// Registers a custodian, a sponsor, a board member and a researcher of `org`.
    pub async fn cast(&self, org: &str) -> ClientResult<Cast> {
        Cast::register(
            &self.operator,
            &self.running.public.verifying_key,
            self.running.client_tls.pinned_pem(),
            org,
        )
        .await
    }
}

/// The demo's consent for patient `i`: seven in ten opt in broadly, two in ten share
/// everything but observations, one in ten never opts in.
pub fn demo_policy(i: usize, now: i64) -> Option<ConsentPolicy> {
    match i % 10 {
        0..=6 => Some(broad_research_policy(1, now)),
        7 | 8 => {
            let mut draft = broad_research_policy(1, now).into_draft();
            draft.provisions[0].categories = Some(Categories::only([
                Category::Demographics,
                Category::Conditions,
                Category::Medications,
            ]));
            Some(draft.check().expect("valid"))
        }
        _ => None,
    }
}

/// The actors of a scenario, each with its own signing identity.
#[derive(Clone)]
pub struct Cast {
    pub custodian: BrokerClient,
    pub sponsor: BrokerClient,
    pub board: BrokerClient,
    pub researcher: BrokerClient,
    /// The network the custodian pins, signed by the cast's board.
    pub network: pre_kms::network::VerifiedNetwork,
}

impl Cast {
    /// Registers, through `operator`, a custodian, a sponsor, a board member and a
    /// researcher of `org` at the broker whose key is `broker_key` and whose TLS
    /// certificate is `broker_cert`; the board member signs the network manifest the
    /// operator drafts, and the custodian's agent pins it.
    pub async fn register(
        operator: &BrokerClient,
        broker_key: &umbral_pre::PublicKey,
        broker_cert: Option<&str>,
        org: &str,
    ) -> ClientResult<Cast> {
        let mut clients = Vec::new();
        for (role, name) in [
            (Role::Custodian, "Hospital"),
            (Role::Sponsor, "Sponsor"),
            (Role::Board, "Ethics Board"),
            (Role::Researcher, "Researcher"),
        ] {
            let id = Identity::generate();
            operator
                .register_actor(
                    role,
                    &format!("{org} {name}"),
                    org,
                    &id.public(role.as_str()),
                )
                .await?;
            clients.push(operator.with_identity(id));
        }
        let [custodian, sponsor, board, researcher] =
            <[BrokerClient; 4]>::try_from(clients).unwrap_or_else(|_| unreachable!("four roles"));
        let mut manifest = agent::draft_network(operator, broker_key, broker_cert).await?;
        manifest.sign(board.identity())?;
        let network = manifest.verify()?;
        Ok(Cast {
            custodian,
            sponsor,
            board,
            researcher,
            network,
        })
    }

    /// A health-research study (DUO HMB, IRB-approved, will publish) for the cast's
    /// researcher, open for 90 days, searching every field.
    pub fn proposal(
        &self,
        title: &str,
        categories: &[Category],
        cohort: CohortDefinition,
    ) -> StudyProposal {
        let now = now_secs();
        let researcher = self.researcher.identity();
        let mut purpose = ResearchPurpose::new(StudyFocus::Health);
        purpose.irb_approved = true;
        purpose.will_publish = true;
        StudyProposal {
            title: title.into(),
            purpose,
            categories: categories.to_vec(),
            fields: SearchField::ALL.into_iter().collect(),
            researcher_id: researcher.actor_id(),
            receiving_key: pre_kms::keys::public_key_bytes(&researcher.encryption_public_key()),
            not_before: now - 60,
            not_after: now + 90 * 24 * 3600,
            cohort,
        }
    }

    /// The sponsor proposes `proposal`; the board approves it.
    pub async fn approve(
        &self,
        proposal: &StudyProposal,
        overrides_abstain: bool,
    ) -> ClientResult<Study> {
        let study = self.sponsor.propose_study(proposal).await?;
        self.board
            .decide_study(&study.study_id, true, overrides_abstain, "approved")
            .await
    }

    /// The sponsor proposes [`Cast::proposal`]; the board approves it.
    pub async fn approved_study(
        &self,
        title: &str,
        categories: &[Category],
        cohort: CohortDefinition,
    ) -> ClientResult<Study> {
        self.approve(&self.proposal(title, categories, cohort), false)
            .await
    }

    /// Sets each patient's next consent version to [`broad_research_policy`].
    pub async fn consent_broadly(&self, patients: &[Identity]) -> ClientResult<usize> {
        let now = now_secs();
        let mut policies = Vec::with_capacity(patients.len());
        for p in patients {
            let client = self.custodian.clone();
            let history = agent::consent_history(&client, p).await?;
            policies.push((
                p.clone(),
                broad_research_policy(agent::next_version(&history), now),
            ));
        }
        let mut set = 0;
        for chunk in policies.chunks(500) {
            set += agent::set_consents(&self.custodian, chunk).await?.len();
        }
        Ok(set)
    }

    /// Grants `plan`'s categories for each patient (those it has), in batches.
    pub async fn grant_all(
        &self,
        study: &Study,
        patients: &[(Identity, Vec<Category>)],
        batch: usize,
        mut progress: impl FnMut(usize),
    ) -> ClientResult<usize> {
        let plan = agent::grant_plan(&self.custodian, &self.network, study).await?;
        let mut grants = 0;
        for chunk in patients.chunks(batch.max(1)) {
            grants += agent::grant_batch(&self.custodian, &plan, chunk.to_vec()).await?;
            progress(chunk.len());
        }
        Ok(grants)
    }

    /// The researcher fetches, verifies and decrypts the study's release.
    pub async fn fetch(&self, study: &Study) -> ClientResult<(agent::FetchReport, Tally)> {
        let (report, got) = self.fetch_records(study).await?;
        let mut tally = Tally::default();
        for (_, _, hash) in &got {
            tally.add_hash(*hash);
        }
        Ok((report, tally))
    }

    /// The researcher fetches, verifies and decrypts the study's release: each record's
    /// subject, category and plaintext hash.
    pub async fn fetch_records(
        &self,
        study: &Study,
    ) -> ClientResult<(agent::FetchReport, Vec<(String, Category, [u8; 32])>)> {
        let mut got = Vec::new();
        let researcher = self.researcher.identity().clone();
        let report =
            agent::fetch_and_decrypt(&self.researcher, &researcher, &study.study_id, |r| {
                got.push((
                    r.subject,
                    r.category,
                    *blake3::hash(&r.plaintext).as_bytes(),
                ));
                Ok(())
            })
            .await?;
        Ok((report, got))
    }
}

/// A multiset of plaintexts by BLAKE3 hash: what was expected, what was decrypted.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tally(BTreeMap<[u8; 32], usize>);

impl Tally {
    pub fn add(&mut self, plaintext: &[u8]) {
        self.add_hash(*blake3::hash(plaintext).as_bytes());
    }

    pub fn add_hash(&mut self, hash: [u8; 32]) {
        *self.0.entry(hash).or_default() += 1;
    }

    /// The research copies of `record` in `categories`.
    pub fn add_record(&mut self, record: &PatientRecord, categories: &[Category]) {
        for (c, plaintext) in &record.categories {
            if categories.contains(c) {
                self.add(plaintext);
            }
        }
    }

    pub fn total(&self) -> usize {
        self.0.values().sum()
    }

    /// `Ok` when `got` holds exactly these plaintexts; otherwise what is missing and extra.
    pub fn check(&self, got: &Tally) -> Result<(), String> {
        if self == got && self.total() > 0 {
            return Ok(());
        }
        let missing: usize = self
            .0
            .iter()
            .map(|(h, n)| n.saturating_sub(got.0.get(h).copied().unwrap_or(0)))
            .sum();
        let extra: usize = got
            .0
            .iter()
            .map(|(h, n)| n.saturating_sub(self.0.get(h).copied().unwrap_or(0)))
            .sum();
        Err(format!(
            "{} records decrypted, {} expected: {missing} originals missing, {extra} records that are not originals",
            got.total(),
            self.total()
        ))
    }
}

/// What a release may hold, checked without choosing patients (the broker's cohort engine
/// alone does that): every decrypted record is an original research copy, in its own
/// category, of one patient, in a category that patient's consent releases to the study;
/// each subject is one patient and brings every such record of theirs; no excluded
/// (revoked) patient appears; and there are as many subjects as the board's exact count
/// of the study's cohort.
pub struct ReleaseCheck {
    /// Plaintext hash → the patients and categories it is an original of.
    originals: HashMap<[u8; 32], Vec<(usize, Category)>>,
    /// Per patient, the categories a release of the study may bring (permitted by the
    /// consent, requested, and held).
    releasable: Vec<BTreeSet<Category>>,
}

impl ReleaseCheck {
    pub fn new<'a>(
        records: impl IntoIterator<Item = &'a PatientRecord>,
        histories: &[PolicyHistory],
        study: &Study,
        now: i64,
    ) -> ReleaseCheck {
        let mut originals: HashMap<[u8; 32], Vec<(usize, Category)>> = HashMap::new();
        let mut releasable = Vec::new();
        for (i, (record, history)) in records.into_iter().zip(histories).enumerate() {
            let permitted: BTreeSet<Category> = grant_scope(&decide(history, study, now), study)
                .map(|(c, _)| c.into_iter().collect())
                .unwrap_or_default();
            for (c, plaintext) in &record.categories {
                originals
                    .entry(*blake3::hash(plaintext).as_bytes())
                    .or_default()
                    .push((i, *c));
            }
            releasable.push(
                record
                    .categories
                    .keys()
                    .copied()
                    .filter(|c| permitted.contains(c))
                    .collect(),
            );
        }
        ReleaseCheck {
            originals,
            releasable,
        }
    }

    /// Checks `got` (subject, category, plaintext hash) against the originals; returns the
    /// patients released.
    pub fn check(
        &self,
        got: &[(String, Category, [u8; 32])],
        exact_count: &str,
        excluded: &BTreeSet<usize>,
    ) -> Result<BTreeSet<usize>, String> {
        let mut by_subject: BTreeMap<&str, Vec<(Category, [u8; 32])>> = BTreeMap::new();
        for (subject, category, hash) in got {
            by_subject
                .entry(subject.as_str())
                .or_default()
                .push((*category, *hash));
        }
        let mut released = BTreeSet::new();
        for (subject, records) in &by_subject {
            // The patients every record of this subject is an original of.
            let mut candidates: Option<BTreeSet<usize>> = None;
            for (category, hash) in records {
                let of: BTreeSet<usize> = self
                    .originals
                    .get(hash)
                    .into_iter()
                    .flatten()
                    .filter(|(_, c)| c == category)
                    .map(|(i, _)| *i)
                    .collect();
                if of.is_empty() {
                    return Err(format!(
                        "subject {subject}: a {category} record that is not an original"
                    ));
                }
                candidates = Some(match candidates {
                    None => of,
                    Some(c) => c.intersection(&of).copied().collect(),
                });
            }
            let categories: BTreeSet<Category> = records.iter().map(|(c, _)| *c).collect();
            let patient = candidates
                .unwrap_or_default()
                .into_iter()
                .find(|&i| self.releasable[i] == categories && records.len() == categories.len())
                .ok_or_else(|| {
                    format!(
                        "subject {subject}: its {} records are not exactly one patient's records in the categories the consent releases (missing, extra, beyond consent or mixed)",
                        records.len()
                    )
                })?;
            if excluded.contains(&patient) {
                return Err(format!("subject {subject}: a revoked patient's records"));
            }
            if !released.insert(patient) {
                return Err(format!("one patient under two subjects ({subject})"));
            }
        }
        if exact_count != released.len().to_string() {
            return Err(format!(
                "{} subjects released, but the board's exact count of the study's cohort is {exact_count}",
                released.len()
            ));
        }
        Ok(released)
    }
}

#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub patients: usize,
    /// The demo cohort's feasibility count: as the sponsor sees it (protected) and as the
    /// board does (exact), and the sponsor's round trip.
    pub count_protected: String,
    pub count_exact: String,
    pub count_time: Duration,
    /// The normalized hash of the study's cohort definition, as the board approved it.
    pub cohort_hash: String,
    pub count_exact_after_revocation: String,
    /// Patients who set a consent policy.
    pub consents: usize,
    /// Patients whose consent does not permit the study.
    pub not_permitted: usize,
    /// Patients who revoked after the first release, and the grants that withdrew.
    pub revoked: usize,
    pub grants_withdrawn: usize,
    pub subjects_after_revocation: u32,
    /// One released patient (who did not revoke) erased on their own request: what the
    /// broker's receipt says it deleted, how many pinned proxies confirmed, how long it
    /// took, and the next release's subjects. `None` if no patient was left to erase.
    pub erasure: Option<ErasureSummary>,
    pub envelopes: usize,
    pub envelope_bytes: usize,
    pub ingest: Duration,
    pub grants: usize,
    pub grant_time: Duration,
    pub subjects: u32,
    pub released: usize,
    pub release_time: Duration,
    pub expected: usize,
    /// The break-glass step: `None` if fewer than two released patients were left.
    pub break_glass: Option<BreakGlassSummary>,
    /// `None` when every decrypted record equals an original and none is missing.
    pub mismatch: Option<String>,
}

/// The demo's break-glass: how long it took end to end (consent, organisation,
/// standing grants, the access, the refusal, the review), the access's window, the
/// records read, and the refusal for the patient who said no.
#[derive(Debug, Clone)]
pub struct BreakGlassSummary {
    pub time: Duration,
    pub window: i64,
    pub records: usize,
    pub refusal: String,
}

/// The demo's erasure of one patient.
#[derive(Debug, Clone)]
pub struct ErasureSummary {
    pub proxies_confirmed: usize,
    pub deleted: std::collections::BTreeMap<String, u64>,
    pub time: Duration,
    pub subjects_after: u32,
    pub count_exact_after: String,
}

impl DemoSummary {
    pub fn verified(&self) -> bool {
        self.mismatch.is_none()
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

impl std::fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
            "consent policies     {:>8}  set and signed; {} patients' consent does not permit the study",
            self.consents, self.not_permitted
        )?;
        writeln!(
            f,
            "feasibility count    {:>8}  for the sponsor (protected: noise, rounding, <11), in {:.1} ms over gRPC; exact for the board: {}",
            self.count_protected,
            self.count_time.as_secs_f64() * 1e3,
            self.count_exact
        )?;
        writeln!(
            f,
            "grants issued        {:>8}  in {:.2} s  ({:.0} grants/s), as each consent permits",
            self.grants,
            self.grant_time.as_secs_f64(),
            rate(self.grants, self.grant_time)
        )?;
        writeln!(
            f,
            "release              {:>8} subjects (the board's exact count of the study's cohort {}: {}), {} envelopes re-encrypted, verified and decrypted",
            self.subjects,
            &self.cohort_hash[..self.cohort_hash.len().min(16)],
            self.count_exact,
            self.released
        )?;
        writeln!(
            f,
            "release throughput   {:>8.2} s  {:>9.0} envelopes/s",
            self.release_time.as_secs_f64(),
            rate(self.released, self.release_time)
        )?;
        writeln!(
            f,
            "revocation           {:>8}  patients revoked, {} grants withdrawn at the proxies; next release: {} subjects (exact count now {})",
            self.revoked,
            self.grants_withdrawn,
            self.subjects_after_revocation,
            self.count_exact_after_revocation
        )?;
        if let Some(e) = &self.erasure {
            let deleted: Vec<String> = e.deleted.iter().map(|(k, n)| format!("{n} {k}")).collect();
            writeln!(
                f,
                "erasure              {:>8.2} s  one patient erased on their own request; receipts of {} proxies and the broker checked against the pinned network (deleted: {}); next release: {} subjects (exact count now {})",
                e.time.as_secs_f64(),
                e.proxies_confirmed,
                deleted.join(", "),
                e.subjects_after,
                e.count_exact_after
            )?;
        }
        if let Some(b) = &self.break_glass {
            writeln!(
                f,
                "break-glass          {:>8.2} s  an emergency clinician read {} critical record(s) of a patient who allows it, by their card, for {} h, logged before the proxies re-encrypted, the patient alerted, the board's review logged; refused for a patient who said no ({})",
                b.time.as_secs_f64(),
                b.records,
                b.window / 3600,
                b.refusal
            )?;
        }
        match &self.mismatch {
            None => write!(
                f,
                "check                OK: all {} decrypted records equal the originals, none missing, none extra, none beyond consent; each release is exactly the board's exact count of the study's cohort; none of the revoked or erased patients' records after revocation and erasure; break-glass gave exactly the allowing patient's critical record and refused the other",
                self.expected
            ),
            Some(m) => write!(f, "check                FAILED: {m}"),
        }
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
    let custodian_dir = cfg.data_dir.join("custodian");
    pre_kms::private_fs::private_dir(&cfg.data_dir)?;
    pre_kms::private_fs::private_dir(&custodian_dir)?;
    let scenario = Scenario::start(&cfg.data_dir.join("broker")).await?;
    eprintln!(
        "broker on {} with {} proxies on loopback; data in {}",
        scenario.running.url(),
        scenario.running.proxies.len(),
        cfg.data_dir.display()
    );
    let cast = scenario.cast("Demo").await?;

    // Ingest, as the custodian: records are generated batch by batch, keys kept in the
    // custodian's keystore.
    let population = Population::new(cfg.seed, cfg.patients);
    let mut keystore = Keystore::open(&custodian_dir.join("keystore.db"))?;
    let mut summary = DemoSummary {
        patients: cfg.patients,
        ..Default::default()
    };
    let mut patients = Vec::with_capacity(cfg.patients);
    let progress = bar(cfg.progress, cfg.patients, "ingest");
    let started = Instant::now();
    let batches = (0..cfg.patients).step_by(cfg.batch).map(|start| {
        let end = (start + cfg.batch).min(cfg.patients);
        let records: Vec<_> = (start..end).map(|i| population.patient(i)).collect();
        let batch = keystore.transaction(|ks| {
            records
                .into_iter()
                .map(|r| Ok((ks.get_or_create(&r.source_id)?.0, r)))
                .collect::<brokerctl::keystore::Result<Vec<_>>>()
        })?;
        patients.extend(batch.iter().map(|(id, r)| {
            (
                id.clone(),
                r.categories.keys().copied().collect::<Vec<Category>>(),
            )
        }));
        Ok::<_, brokerctl::keystore::KeystoreError>(batch)
    });
    let report = agent::ingest_all(&cast.custodian, batches, |done| {
        progress.set_position(done as u64)
    })
    .await?;
    progress.finish_and_clear();
    summary.ingest = started.elapsed();
    summary.envelopes = report.envelopes_stored + report.envelopes_unchanged;
    summary.envelope_bytes = report.bytes;

    // Consent, as the custodian records it for each patient (signed with the patient's
    // key): most opt in broadly, some withhold observations, some never opt in.
    let now = now_secs();
    let policies: Vec<(Identity, ConsentPolicy)> = patients
        .iter()
        .enumerate()
        .filter_map(|(i, (id, _))| demo_policy(i, now).map(|p| (id.clone(), p)))
        .collect();
    for chunk in policies.chunks(cfg.batch) {
        summary.consents += agent::set_consents(&cast.custodian, chunk).await?.len();
    }
    let mut histories: Vec<PolicyHistory> = (0..cfg.patients)
        .map(|i| PolicyHistory::new(demo_policy(i, now)).expect("one version"))
        .collect();

    // The study carries its cohort; the board approves it with the definition's hash.
    let study = cast
        .approve(
            &cast.proposal(
                "Hypertension outcomes in adults born 1930-1975",
                &DEMO_CATEGORIES,
                demo_cohort(),
            ),
            false,
        )
        .await?;
    summary.cohort_hash = study.proposal.cohort.normalized().hash.to_string();

    // Feasibility: the study's own cohort, over the fields each patient consented.
    let started = Instant::now();
    summary.count_protected = cast.sponsor.count(&study.study_id, &[]).await?.count;
    summary.count_time = started.elapsed();
    summary.count_exact = cast.board.count(&study.study_id, &[]).await?.count;

    let progress = bar(cfg.progress, patients.len(), "grants");
    let started = Instant::now();
    let plan = agent::grant_plan(&cast.custodian, &cast.network, &study).await?;
    for (chunk, hs) in patients.chunks(cfg.batch).zip(histories.chunks(cfg.batch)) {
        let list = chunk
            .iter()
            .zip(hs)
            .map(|((id, cats), h)| (id.clone(), cats.clone(), h.clone()))
            .collect();
        let r = agent::consented_grants(&cast.custodian, &plan, &study, list).await?;
        summary.grants += r.issued;
        summary.not_permitted += r.not_permitted;
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    summary.grant_time = started.elapsed();

    // The release: exactly the board's exact count of the study's cohort (every counted
    // patient holds a grant), each with every record the consent releases.
    let started = Instant::now();
    let (fetched, got) = cast.fetch_records(&study).await?;
    summary.release_time = started.elapsed();
    summary.subjects = fetched.release.subjects;
    summary.released = fetched.records;
    summary.expected = got.len();
    let records = || (0..cfg.patients).map(|i| population.patient(i));
    let check = ReleaseCheck::new(&records().collect::<Vec<_>>(), &histories, &study, now);
    let released = match check.check(&got, &summary.count_exact, &BTreeSet::new()) {
        Ok(released) => released,
        Err(m) => {
            summary.mismatch = Some(m);
            BTreeSet::new()
        }
    };

    // Every tenth released patient revokes; the next release leaves them out, and equals
    // the board's new exact count.
    let revoking: Vec<usize> = released.iter().copied().step_by(10).collect();
    let revocations: Vec<(Identity, ConsentPolicy)> = revoking
        .iter()
        .map(|&i| {
            let next = agent::next_version(&histories[i]);
            let policy = PolicyDraft::revocation(next, now).check().expect("valid");
            (patients[i].0.clone(), policy)
        })
        .collect();
    for chunk in revocations.chunks(cfg.batch) {
        for r in agent::set_consents(&cast.custodian, chunk).await? {
            summary.grants_withdrawn += r.grants_withdrawn;
        }
    }
    for (&i, (_, policy)) in revoking.iter().zip(&revocations) {
        let mut versions = histories[i].versions().to_vec();
        versions.push(policy.clone());
        histories[i] = PolicyHistory::new(versions)?;
    }
    summary.revoked = revoking.len();
    summary.count_exact_after_revocation = cast.board.count(&study.study_id, &[]).await?.count;
    let (after, got) = cast.fetch_records(&study).await?;
    summary.subjects_after_revocation = after.release.subjects;
    if summary.mismatch.is_none() {
        let check = ReleaseCheck::new(&records().collect::<Vec<_>>(), &histories, &study, now);
        let excluded: BTreeSet<usize> = revoking.iter().copied().collect();
        summary.mismatch = check
            .check(&got, &summary.count_exact_after_revocation, &excluded)
            .err()
            .map(|m| format!("after revocation: {m}"));
    }

    // A released patient who did not revoke erases themself: the receipts are checked
    // against the pinned network, and the next release leaves them out too.
    let erasing = released.iter().copied().find(|i| !revoking.contains(i));
    if let Some(i) = erasing {
        let patient = patients[i].0.clone();
        let started = Instant::now();
        let request =
            pre_kms::erasure::ErasureRequest::sign(&patient, pre_kms::request_auth::now_ms());
        let as_patient = cast.custodian.with_identity(patient);
        let (_, checked) = agent::erase(&as_patient, &cast.network, request).await?;
        let time = started.elapsed();
        let count_exact_after = cast.board.count(&study.study_id, &[]).await?.count;
        let (after, got) = cast.fetch_records(&study).await?;
        if summary.mismatch.is_none() {
            let check = ReleaseCheck::new(&records().collect::<Vec<_>>(), &histories, &study, now);
            let excluded: BTreeSet<usize> =
                revoking.iter().copied().chain(std::iter::once(i)).collect();
            summary.mismatch = check
                .check(&got, &count_exact_after, &excluded)
                .err()
                .map(|m| format!("after erasure: {m}"));
        }
        summary.erasure = Some(ErasureSummary {
            proxies_confirmed: checked.proxies_confirmed,
            deleted: checked.broker_destroyed,
            time,
            subjects_after: after.release.subjects,
            count_exact_after,
        });
    }
    // Break the glass: an emergency organisation, listed in a network manifest the board
    // signs again; one patient allows break-glass in a new consent version and gets
    // standing grants of their critical records, another keeps the default (no); an
    // emergency clinician reads the first one's critical records by their emergency card,
    // is refused for the second, and the board reviews the use.
    let mut candidates = released
        .iter()
        .copied()
        .filter(|i| !revoking.contains(i) && Some(*i) != erasing);
    if let (Some(allowing), Some(refusing)) = (candidates.next(), candidates.next()) {
        let started = Instant::now();
        let (a, r) = (&patients[allowing].0, &patients[refusing].0);
        let mut draft = histories[allowing]
            .versions()
            .last()
            .expect("a released patient has a policy")
            .clone()
            .into_draft();
        draft.version = agent::next_version(&histories[allowing]);
        draft.issued_at = now_secs();
        draft.break_glass = consent_policy::BreakGlass::Allow;
        agent::set_consents(&cast.custodian, &[(a.clone(), draft.check()?)]).await?;
        let (org_key, clinician) = register_emergency(&scenario.operator, "er-demo").await?;
        let mut manifest = agent::draft_network(
            &scenario.operator,
            &scenario.running.public.verifying_key,
            scenario.running.client_tls.pinned_pem(),
        )
        .await?;
        manifest.sign(cast.board.identity())?;
        let network = manifest.verify()?;
        let mut standing = Vec::new();
        for id in [a, r] {
            standing.push((
                id.clone(),
                agent::consent_history(&cast.custodian, id).await?,
            ));
        }
        let granted = agent::emergency_grants(&cast.custodian, &network, standing).await?;
        let card = pre_kms::emergency::EmergencyCard::sign(a, now_secs()).to_token();
        let answer = clinician
            .break_glass("", &card, "unconscious on arrival, allergies unknown")
            .await?;
        let opened = agent::open_break_glass(answer, &org_key, Some(&a.pseudonym())).await?;
        let original = &population.patient(allowing).categories[&Category::Critical];
        let matches = opened.records.len() == 1 && &opened.records[0].plaintext == original;
        let refusal = match clinician
            .break_glass(&r.pseudonym(), "", "unconscious on arrival")
            .await
        {
            Err(e) if e.to_string().starts_with("permission denied") => e.to_string(),
            other => format!("NOT REFUSED: {:?}", other.map(|a| a.access.access_id)),
        };
        let queue = cast.board.break_glass_accesses(true).await?;
        if let Some(first) = queue.first() {
            cast.board
                .review_break_glass(&first.access_id, "ok", "demo: justified emergency")
                .await?;
        }
        let alerted = brokerctl::log_review::patient_alerts(
            &cast.custodian.with_identity(a.clone()),
            None,
            false,
        )
        .await?
        .iter()
        .any(|e| e.event.kind.name() == "break_glass");
        if summary.mismatch.is_none() {
            summary.mismatch = if !matches {
                Some("break-glass: the decrypted critical record differs from the original".into())
            } else if refusal.starts_with("NOT REFUSED") {
                Some(format!(
                    "break-glass: the patient who said no was {refusal}"
                ))
            } else if granted.issued != 1 || queue.len() != 1 || !alerted {
                Some(format!(
                    "break-glass: {} standing grants (want 1), {} accesses in the board's queue (want 1), patient alerted: {alerted}",
                    granted.issued,
                    queue.len()
                ))
            } else {
                None
            };
        }
        summary.break_glass = Some(BreakGlassSummary {
            time: started.elapsed(),
            window: opened.access.expires_at - opened.access.created_at,
            records: opened.records.len(),
            refusal,
        });
    }
    scenario.running.stop().await;
    Ok(summary)
}

/// Registers an emergency organisation (a fresh key) and one of its clinicians.
async fn register_emergency(
    operator: &BrokerClient,
    organisation: &str,
) -> ClientResult<(Identity, BrokerClient)> {
    let org_key = Identity::generate();
    operator
        .register_emergency_org(model::EmergencyOrganisation {
            organisation_id: organisation.into(),
            name: "Demo emergency department".into(),
            receiving_key: pre_kms::keys::public_key_bytes(&org_key.encryption_public_key()),
        })
        .await?;
    let clinician = Identity::generate();
    operator
        .register_actor(
            Role::Clinician,
            "Demo emergency clinician",
            organisation,
            &clinician.public("clinician"),
        )
        .await?;
    Ok((org_key, operator.with_identity(clinician)))
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn the_check_fails_on_missing_extra_or_nothing() {
        let mut want = Tally::default();
        want.add(b"a");
        want.add(b"b");
        let mut got = want.clone();
        assert!(want.check(&got).is_ok());
        got.add(b"c");
        let err = want.check(&got).unwrap_err();
        assert!(
            err.contains("0 originals missing, 1 records that are not originals"),
            "{err}"
        );
        let mut short = Tally::default();
        short.add(b"a");
        assert!(
            want.check(&short)
                .unwrap_err()
                .contains("1 originals missing")
        );
        assert!(
            Tally::default().check(&Tally::default()).is_err(),
            "an empty release proves nothing"
        );
    }
}
