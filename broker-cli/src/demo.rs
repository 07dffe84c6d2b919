//! `broker demo`: the whole flow on the embedded default, checked end to end.
//!
//! Starts a broker with its proxies on loopback, generates a seeded population, has a
//! custodian enroll and ingest it, a sponsor propose a study, the board approve it, the
//! patients' agent issue grants, and the researcher fetch, verify and decrypt the
//! release; then checks every decrypted record against the original research copy.
//!
//! The pieces ([`Scenario`], [`Cast`], [`Tally`]) are shared with the end-to-end
//! benchmark, so that both measure the same path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use broker::server::{self, RunningBroker, ServeConfig};

use brokerctl::{BrokerClient, ClientResult, Keystore, agent};
use consent_policy::{
    Categories, ConsentPolicy, PolicyDraft, PolicyHistory, broad_research_policy, release_scope,
};
use datasets::{PatientRecord, Population};
use indicatif::{ProgressBar, ProgressStyle};
use model::{Cohort, ResearchPurpose, Role, SearchField, Study, StudyFocus, StudyProposal};
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

pub fn demo_cohort() -> Cohort {
    Cohort {
        condition_codes: vec!["38341003".into()],
        min_birth_year: Some(1930),
        max_birth_year: Some(1975),
        sex: None,
    }
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
        let op = &self.operator;
        let mut clients = Vec::new();
        for (role, name) in [
            (Role::Custodian, "Hospital"),
            (Role::Sponsor, "Sponsor"),
            (Role::Board, "Ethics Board"),
            (Role::Researcher, "Researcher"),
        ] {
            let id = Identity::generate();
            op.register_actor(
                role,
                &format!("{org} {name}"),
                org,
                &id.public(role.as_str()),
            )
            .await?;
            clients.push(op.with_identity(id));
        }
        let [custodian, sponsor, board, researcher] =
            <[BrokerClient; 4]>::try_from(clients).unwrap_or_else(|_| unreachable!("four roles"));
        // The network manifest, as the operator drafts it and the board signs it; the
        // custodian's agent grants through it.
        let mut manifest = agent::draft_network(
            &self.operator,
            &self.running.public.verifying_key,
            self.running.client_tls.pinned_pem(),
        )
        .await?;
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
    /// A health-research study (DUO HMB, IRB-approved, will publish) for the cast's
    /// researcher, open for 90 days, searching every field.
    pub fn proposal(&self, title: &str, categories: &[Category], cohort: Cohort) -> StudyProposal {
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
        cohort: Cohort,
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
        let mut got = Tally::default();
        let researcher = self.researcher.identity().clone();
        let report =
            agent::fetch_and_decrypt(&self.researcher, &researcher, &study.study_id, |r| {
                got.add(&r.plaintext);
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
        *self
            .0
            .entry(*blake3::hash(plaintext).as_bytes())
            .or_default() += 1;
    }

    /// The research copies of the records matching `cohort`, in `categories`.
    /// The research copies a study may release of `record` under the patient's consent:
    /// permitted ∩ requested categories, if the cohort matches the consented fields.
    pub fn add_consented(
        &mut self,
        record: &PatientRecord,
        history: &PolicyHistory,
        study: &Study,
        now: i64,
    ) {
        let Some(scope) = release_scope(history, study, record.index.clone(), now) else {
            return;
        };
        for (c, plaintext) in &record.categories {
            if scope.categories.contains(c) {
                self.add(plaintext);
            }
        }
    }

    pub fn add_expected(
        &mut self,
        record: &PatientRecord,
        categories: &[Category],
        cohort: &Cohort,
    ) {
        if cohort.matches(&record.index) {
            for (c, plaintext) in &record.categories {
                if categories.contains(c) {
                    self.add(plaintext);
                }
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

#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub patients: usize,
    /// The demo cohort's feasibility count: as the sponsor sees it (protected) and as the
    /// board does (exact), and the sponsor's round trip.
    pub count_protected: String,
    pub count_exact: String,
    pub count_time: Duration,
    /// Patients who set a consent policy.
    pub consents: usize,
    /// Patients whose consent does not permit the study.
    pub not_permitted: usize,
    /// Patients who revoked after the first release, and the grants that withdrew.
    pub revoked: usize,
    pub grants_withdrawn: usize,
    pub subjects_after_revocation: u32,
    pub envelopes: usize,
    pub envelope_bytes: usize,
    pub ingest: Duration,
    pub grants: usize,
    pub grant_time: Duration,
    pub subjects: u32,
    pub released: usize,
    pub release_time: Duration,
    pub expected: usize,
    /// `None` when every decrypted record equals an original and none is missing.
    pub mismatch: Option<String>,
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
            "feasibility count    {:>8}  for the sponsor (protected: noise, rounding, <11), in {:.1} ms with the engine's first build; exact for the board: {}",
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
            "release              {:>8} subjects, {} envelopes re-encrypted, verified and decrypted",
            self.subjects, self.released
        )?;
        writeln!(
            f,
            "release throughput   {:>8.2} s  {:>9.0} envelopes/s",
            self.release_time.as_secs_f64(),
            rate(self.released, self.release_time)
        )?;
        writeln!(
            f,
            "revocation           {:>8}  patients revoked, {} grants withdrawn at the proxies; next release: {} subjects",
            self.revoked, self.grants_withdrawn, self.subjects_after_revocation
        )?;
        match &self.mismatch {
            None => write!(
                f,
                "check                OK: all {} decrypted records equal the originals, none missing, none extra, none beyond consent; none of the revoked patients' records after revocation",
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

    // Feasibility: the demo cohort as a definition, over the fields each patient consented.
    let definition = serde_json::to_vec(&serde_json::json!({"criteria": [
        {"demographics": {"birth_year": {"min": 1930, "max": 1975}}},
        {"condition": {"codes": ["snomed:38341003"]}}]}))?;
    let started = Instant::now();
    summary.count_protected = cast
        .sponsor
        .count(&study.study_id, &definition)
        .await?
        .count;
    summary.count_time = started.elapsed();
    summary.count_exact = cast.board.count(&study.study_id, &definition).await?.count;

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

    let started = Instant::now();
    let (fetched, got) = cast.fetch(&study).await?;
    summary.release_time = started.elapsed();
    summary.subjects = fetched.release.subjects;
    summary.released = fetched.records;
    let expect = |histories: &[PolicyHistory]| {
        let mut want = Tally::default();
        let now = now_secs();
        for (i, h) in histories.iter().enumerate() {
            want.add_consented(&population.patient(i), h, &study, now);
        }
        want
    };
    let want = expect(&histories);
    summary.expected = want.total();
    summary.mismatch = want.check(&got).err();

    // Every tenth released patient revokes; the next release leaves them out.
    let released: Vec<usize> = (0..cfg.patients)
        .filter(|&i| {
            let mut one = Tally::default();
            one.add_consented(&population.patient(i), &histories[i], &study, now);
            one.total() > 0
        })
        .collect();
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
    let (after, got) = cast.fetch(&study).await?;
    summary.subjects_after_revocation = after.release.subjects;
    let want = expect(&histories);
    if summary.mismatch.is_none() {
        summary.mismatch = want
            .check(&got)
            .err()
            .map(|m| format!("after revocation: {m}"));
    }
    scenario.running.stop().await;
    Ok(summary)
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
