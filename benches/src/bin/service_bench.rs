//! `service-bench`: the cohort service as a sponsor and a board meet it, through a real
//! `broker serve` process (with its three embedded proxies) and the real client, at
//! hundreds of thousands to a million patients.
//!
//! 1. Ingest: a custodian seals and uploads `--patients` synthetic patients
//!    (`datasets::Population`) through the pipelined client path of `brokerctl import`
//!    and the demo; envelopes/s and total time.
//! 2. Consent: every patient's first consent version (the demo's mix: seven in ten broad,
//!    two in ten without observations, one in ten none), signed by the patient's key.
//! 3. Counts: a study whose cohort is the demo's (born 1930–1975 with hypertension) is
//!    proposed and approved; the board counts each of the five `cohort-bench` definitions
//!    over gRPC (signed request, the study's consent snapshot, the access-log append,
//!    all included): p50 and p99 over `--runs` counts per definition after one warm-up.
//! 4. Release selection: `Releases.Request` of the study while no patient has granted
//!    it: the engine's selection of the cohort under the study's consent, the
//!    intersection with (no) grants and the release's log checkpoint, through gRPC.
//! 5. The broker's peak resident set (its `VmHWM`, proxies included: they run in it).
//! 6. Restart: the broker is stopped (SIGINT) and started again on the same data
//!    directory; the time from the new process's start to its first answered count, and
//!    the counts compared with those before the restart.
//! 7. Erasure: `--erasures` patients, one after the other, each erased on their own
//!    signed request (every proxy, the packs rewritten, every row deleted, the index
//!    snapshot written again), the receipts checked against the pinned network; against
//!    a baseline measured in the same run: one patient's new consent version (a write of
//!    one patient through the same service, with its reconciliation). The study's count
//!    afterwards must be the count before less the erased patients it counted.
//!
//! `cargo build --release && target/release/service-bench --patients 1000000`

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use benches::{CONCEPT_RELATIONS, STUDY_CATEGORIES, definitions, peak_rss_mib};
use broker_cli::demo::{Cast, demo_cohort, demo_policy};
use broker_proto::tls::ClientTls;
use brokerctl::BrokerClient;
use brokerctl::agent::{self, Known};
use clap::Parser;
use datasets::{PatientRecord, Population};
use pre_kms::request_auth::now_secs;
use pre_kms::{Identity, PublicIdentity};
use rayon::prelude::*;

#[derive(Debug, Parser)]
#[command(
    name = "service-bench",
    about = "Ingest, counts, release selection and restart through a real broker process"
)]
struct Args {
    /// Patients in the synthetic population.
    #[arg(long, default_value_t = 100_000)]
    patients: usize,
    /// Patients per upload call.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Population seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Timed counts per definition (after one warm-up count), before and after restart.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Timed release selections.
    #[arg(long, default_value_t = 5)]
    releases: usize,
    /// The `broker` binary (default: the one beside this binary).
    #[arg(long)]
    broker: Option<PathBuf>,
    /// The broker's data directory (default: a temporary directory, removed after).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// After the ingest, import every patient again twice, as a custodian's re-import:
    /// first as if nothing were known of them (category keys derived and enrollments sent
    /// again, as before the keystore remembered them), then with what the first ingest
    /// established (as `brokerctl custodian import` with its keystore).
    #[arg(long)]
    reimport: bool,
    /// Patients erased after the restart (step 7).
    #[arg(long, default_value_t = 3)]
    erasures: usize,
}

/// A `broker serve` child process and what it said.
struct Server {
    child: Child,
    url: String,
    /// Lines of the broker's log, as they come.
    lines: mpsc::Receiver<String>,
}

impl Server {
    /// Starts `broker serve` on a free loopback port; returns once it announced its
    /// address.
    fn start(broker: &Path, data: &Path, operator: &Path) -> anyhow::Result<Server> {
        let mut child = Command::new(broker)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .arg("--operator")
            .arg(operator)
            .env("RUST_LOG", "warn,broker=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", broker.display()))?;
        let stderr = child.stderr.take().context("the broker's stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .context("the broker did not announce its address")?;
            if let Some(rest) = line.strip_prefix("broker listening on ") {
                let url = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                return Ok(Server { child, url, lines });
            }
            if line.contains("ERROR") || line.starts_with("error") {
                bail!("the broker failed to start: {line}");
            }
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// The log lines printed since the last call about the cohort index (loads and
    /// snapshot writes).
    fn index_log(&self) -> Vec<String> {
        self.lines
            .try_iter()
            .filter(|l| l.contains("cohort index loaded") || l.contains("index snapshot"))
            .collect()
    }

    /// Stops the broker as an operator does (SIGINT) and waits for it; returns how long
    /// that took and its last index log lines.
    fn stop(mut self) -> anyhow::Result<(Duration, Vec<String>)> {
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-INT", &self.pid()])
            .status()
            .context("kill -INT")?;
        ensure!(status.success(), "kill -INT failed");
        let exit = self.child.wait()?;
        let took = started.elapsed();
        ensure!(exit.success(), "the broker exited with {exit}");
        // The reader thread ends with the broker's stderr.
        let rest = self
            .lines
            .iter()
            .filter(|l| l.contains("cohort index loaded") || l.contains("index snapshot"))
            .collect();
        Ok((took, rest))
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The patient identity of patient `i`, derived from the seed (so nothing is kept).
fn identity(seed: u64, i: usize) -> Identity {
    let mut h = blake3::Hasher::new_derive_key("service-bench patient identity v1");
    h.update(&seed.to_le_bytes());
    h.update(&(i as u64).to_le_bytes());
    Identity::from_seed(*h.finalize().as_bytes())
}

/// The population in upload batches, generated as they are needed (memory stays flat),
/// each patient with what is `known` of it (nothing past the end of `known`).
fn batches<'a>(
    population: &'a Population,
    seed: u64,
    batch: usize,
    known: &'a [Known],
) -> impl Iterator<Item = Result<Vec<(Identity, PatientRecord, Known)>, brokerctl::ClientError>> + 'a
{
    let n = population.len();
    (0..n).step_by(batch).map(move |start| {
        let end = (start + batch).min(n);
        Ok((start..end)
            .into_par_iter()
            .map(|i| {
                let known = known.get(i).cloned().unwrap_or_default();
                (identity(seed, i), population.patient(i), known)
            })
            .collect())
    })
}

/// Each definition's exact counts, and every timed count's latency in ms.
struct Counts {
    exact: Vec<u64>,
    per_definition_ms: Vec<Vec<f64>>,
}

async fn time_counts(board: &BrokerClient, study_id: &str, runs: usize) -> anyhow::Result<Counts> {
    let mut out = Counts {
        exact: Vec::new(),
        per_definition_ms: Vec::new(),
    };
    for (name, definition) in definitions() {
        let json = serde_json::to_vec(&definition)?;
        let exact = exact_count(&board.count(study_id, &json).await?)?;
        let mut ms = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let r = board.count(study_id, &json).await?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            ensure!(
                exact_count(&r)? == exact,
                "{name}: the count changed between runs"
            );
        }
        out.exact.push(exact);
        out.per_definition_ms.push(ms);
    }
    Ok(out)
}

/// The board's exact count in a count answer.
fn exact_count(r: &broker_proto::v1::CountResponse) -> anyhow::Result<u64> {
    ensure!(
        r.exact,
        "the broker answered the board with a protected count"
    );
    r.count
        .parse()
        .with_context(|| format!("{:?} is not an exact count", r.count))
}

fn summary(c: &Counts) -> (f64, f64) {
    let mut all: Vec<f64> = c.per_definition_ms.iter().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    (percentile(&all, 0.5), percentile(&all, 0.99))
}

async fn connect(url: &str, data: &Path, who: Identity) -> anyhow::Result<BrokerClient> {
    let tls = ClientTls::pinned_file(&data.join("tls.crt"))?;
    Ok(BrokerClient::connect(url, &tls, who).await?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.patients > 0, "--patients must be at least 1");
    ensure!(args.batch > 0, "--batch must be at least 1");
    ensure!(args.runs > 0, "--runs must be at least 1");
    let broker = match &args.broker {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the bench's directory")?
            .join("broker"),
    };
    ensure!(
        broker.exists(),
        "{} is missing: build it first (`cargo build --release`), or pass --broker",
        broker.display()
    );
    if cfg!(debug_assertions) {
        eprintln!("note: a debug build of the bench; measure with --release");
    }
    let temp;
    let root = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&root)?;
    let data = root.join("broker");
    ensure!(
        !data.exists(),
        "{} exists: give an empty --data-dir",
        data.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(&args, &broker, &root, &data))
}

async fn run(args: &Args, broker: &Path, root: &Path, data: &Path) -> anyhow::Result<()> {
    let operator = Identity::generate();
    let operator_pub = root.join("operator.pub");
    operator.public("operator").write_file(&operator_pub)?;
    let server = Server::start(broker, data, &operator_pub)?;
    eprintln!("broker (pid {}) on {}", server.pid(), server.url);
    let op = connect(&server.url, data, operator.clone()).await?;
    let broker_key = PublicIdentity::read_file(&data.join("broker.pub"))?.verifying_key;
    let tls_pem = std::fs::read_to_string(data.join("tls.crt"))?;
    let cast = Cast::register(&op, &broker_key, Some(&tls_pem), "Bench").await?;
    let relations: Vec<(String, String)> = CONCEPT_RELATIONS
        .iter()
        .map(|(a, d)| (a.to_string(), d.to_string()))
        .collect();
    op.put_concepts(&relations).await?;

    // 1. Ingest.
    let population = Population::new(args.seed, args.patients);
    let seed = args.seed;
    let batch = args.batch;
    let n = args.patients;
    let started = Instant::now();
    let mut next_report = n / 10;
    let mut learned: Vec<Known> = Vec::new();
    let report = agent::ingest_all_known(
        &cast.custodian,
        batches(&population, seed, batch, &[]),
        |done| {
            if done >= next_report {
                eprintln!(
                    "ingested {done} of {n} patients ({:.0} s)",
                    started.elapsed().as_secs_f64()
                );
                next_report = done + n / 10;
            }
        },
        |batch| {
            if args.reimport {
                learned.extend(batch.into_iter().map(|l| Known {
                    category_keys: l.category_keys,
                    enrolled: true,
                }));
            }
        },
    )
    .await?;
    let ingest = started.elapsed();
    // 1b. Re-imports: as if nothing were known, then with what the ingest established.
    let reimport = if args.reimport {
        let mut times = Vec::new();
        for known in [&[][..], &learned[..]] {
            let started = Instant::now();
            let r = agent::ingest_all_known(
                &cast.custodian,
                batches(&population, seed, batch, known),
                |_| {},
                |_| {},
            )
            .await?;
            ensure!(
                r.envelopes_stored == 0 && r.newly_enrolled == 0,
                "a re-import stored {} envelopes and enrolled {} patients",
                r.envelopes_stored,
                r.newly_enrolled
            );
            times.push((started.elapsed(), r));
        }
        eprintln!("re-imports done");
        Some(times)
    } else {
        None
    };
    let envelopes = report.envelopes_stored + report.envelopes_unchanged;
    ensure!(
        report.newly_enrolled == n,
        "enrolled {} of {n}",
        report.newly_enrolled
    );

    // 2. Consent, first versions.
    let started = Instant::now();
    let now = now_secs();
    let mut consented = 0usize;
    for start in (0..n).step_by(1000) {
        let end = (start + 1000).min(n);
        let policies: Vec<_> = (start..end)
            .into_par_iter()
            .filter_map(|i| demo_policy(i, now).map(|p| (identity(seed, i), p)))
            .collect();
        consented += agent::set_consents(&cast.custodian, &policies).await?.len();
    }
    let consent = started.elapsed();
    eprintln!(
        "ingest {:.0} s, consent {:.0} s",
        ingest.as_secs_f64(),
        consent.as_secs_f64()
    );

    // 3. Counts.
    let study = cast
        .approved_study("Service benchmark", &STUDY_CATEGORIES, demo_cohort())
        .await?;
    let cohort_size = {
        let json = serde_json::to_vec(&study.proposal.cohort)?;
        exact_count(&cast.board.count(&study.study_id, &json).await?)?
    };
    let before = time_counts(&cast.board, &study.study_id, args.runs).await?;
    let (p50, p99) = summary(&before);

    // 4. Release selection (nobody granted: selection, intersection, log).
    let mut release_ms = Vec::new();
    for _ in 0..args.releases {
        let t = Instant::now();
        let release = cast.researcher.request_release(&study.study_id).await?;
        release_ms.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(
            release.subjects == 0,
            "a release without grants has subjects"
        );
    }
    release_ms.sort_by(f64::total_cmp);

    // 5. Peak RSS, before the process ends.
    let rss = peak_rss_mib(&server.pid());

    // 6. Restart.
    let mut index_log = server.index_log();
    let (stop, last) = server.stop()?;
    index_log.extend(last);
    let started = Instant::now();
    let server = Server::start(broker, data, &operator_pub)?;
    let listening = started.elapsed();
    let board = connect(&server.url, data, cast.board.identity().clone()).await?;
    let json = serde_json::to_vec(&study.proposal.cohort)?;
    let first = board.count(&study.study_id, &json).await?;
    let restart = started.elapsed();
    ensure!(
        exact_count(&first)? == cohort_size,
        "the study's count changed across the restart"
    );
    index_log.extend(server.index_log());
    let after = time_counts(&board, &study.study_id, args.runs).await?;
    ensure!(
        after.exact == before.exact,
        "counts changed across the restart: {:?} before, {:?} after",
        before.exact,
        after.exact
    );
    let (p50_after, p99_after) = summary(&after);
    let rss_after = peak_rss_mib(&server.pid());

    // 7. Erasure, against one patient's consent change.
    let mut erase_ms = Vec::new();
    let mut consent_ms = Vec::new();
    let mut erased_counted = 0u64;
    let custodian = connect(&server.url, data, cast.custodian.identity().clone()).await?;
    for k in 0..args.erasures.min(n) {
        let i = n - 1 - k;
        let patient = identity(seed, i);
        let t = Instant::now();
        let policy = consent_policy::broad_research_policy(2, now_secs());
        agent::set_consents(&custodian, &[(patient.clone(), policy)]).await?;
        consent_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let counted_before = exact_count(&board.count(&study.study_id, &json).await?)?;
        let as_patient = connect(&server.url, data, patient.clone()).await?;
        let request =
            pre_kms::erasure::ErasureRequest::sign(&patient, pre_kms::request_auth::now_ms());
        let t = Instant::now();
        let (_, checked) = agent::erase(&as_patient, &cast.network, request).await?;
        erase_ms.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(
            checked.proxies_confirmed == 3,
            "{} proxies confirmed",
            checked.proxies_confirmed
        );
        let counted_after = exact_count(&board.count(&study.study_id, &json).await?)?;
        erased_counted += counted_before - counted_after;
        ensure!(
            counted_before - counted_after <= 1,
            "one erasure removed {} patients from the count",
            counted_before - counted_after
        );
    }
    erase_ms.sort_by(f64::total_cmp);
    consent_ms.sort_by(f64::total_cmp);
    server.stop()?;

    // The report.
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!("service-bench");
    println!(
        "command        {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!(
        "setup          {n} patients, seed {seed}, batch {batch}, {cores} cores, {consented} consents, {}",
        if cfg!(debug_assertions) {
            "DEBUG build"
        } else {
            "release build"
        }
    );
    println!(
        "ingest         {envelopes} envelopes in {:.1} s: {:.0} envelopes/s, {:.0} patients/s",
        ingest.as_secs_f64(),
        envelopes as f64 / ingest.as_secs_f64(),
        n as f64 / ingest.as_secs_f64()
    );
    if let Some(times) = &reimport {
        for ((elapsed, r), what) in times.iter().zip([
            "nothing known (keys derived, enrollments sent)",
            "keys and enrollments known",
        ]) {
            println!(
                "re-import      {:.1} s: {:.0} patients/s; {} keys derived, {} enrollments sent, {} envelopes unchanged ({what})",
                elapsed.as_secs_f64(),
                n as f64 / elapsed.as_secs_f64(),
                r.keys_derived,
                r.enrollments_sent,
                r.envelopes_unchanged
            );
        }
        println!(
            "re-import      known / nothing known: {:.2}x the time",
            times[1].0.as_secs_f64() / times[0].0.as_secs_f64()
        );
    }
    println!(
        "consent        {consented} first versions in {:.1} s",
        consent.as_secs_f64()
    );
    println!("counts (board, exact, over gRPC; ms)");
    println!("  definition              exact      p50      p99");
    for (((name, _), exact), ms) in definitions()
        .iter()
        .zip(&before.exact)
        .zip(&before.per_definition_ms)
    {
        let mut ms = ms.clone();
        ms.sort_by(f64::total_cmp);
        println!(
            "  {name:<22} {exact:>7} {:>8.2} {:>8.2}",
            percentile(&ms, 0.5),
            percentile(&ms, 0.99)
        );
    }
    println!(
        "  all five                       {p50:>8.2} {p99:>8.2}   (after restart: {p50_after:.2} / {p99_after:.2})"
    );
    println!(
        "release select study cohort {cohort_size} patients: median {:.1} ms (min {:.1}, max {:.1}) over {}",
        percentile(&release_ms, 0.5),
        release_ms.first().copied().unwrap_or(0.0),
        release_ms.last().copied().unwrap_or(0.0),
        release_ms.len()
    );
    println!(
        "broker RSS     peak {:.0} MiB before restart, {:.0} MiB after",
        rss.unwrap_or(f64::NAN),
        rss_after.unwrap_or(f64::NAN)
    );
    println!(
        "restart        stop {:.1} s; start to listening {:.2} s; to first count {:.2} s",
        stop.as_secs_f64(),
        listening.as_secs_f64(),
        restart.as_secs_f64()
    );
    if !erase_ms.is_empty() {
        let (erase, consent) = (percentile(&erase_ms, 0.5), percentile(&consent_ms, 0.5));
        println!(
            "erasure        median {erase:.0} ms (min {:.0}, max {:.0}) over {}; one consent version: median {consent:.1} ms; erasure / consent: {:.0}x; {erased_counted} of them were in the study's count",
            erase_ms[0],
            erase_ms[erase_ms.len() - 1],
            erase_ms.len(),
            erase / consent
        );
    }
    println!("index log (the broker's own lines on loading and snapshotting its index)");
    for line in index_log {
        println!("  {line}");
    }
    if let Some(path) = &args.json {
        let out = serde_json::json!({
            "patients": n,
            "envelopes": envelopes,
            "ingest_seconds": ingest.as_secs_f64(),
            "consent_seconds": consent.as_secs_f64(),
            "count_ms": {"p50": p50, "p99": p99, "p50_after_restart": p50_after, "p99_after_restart": p99_after},
            "counts": before.exact,
            "cohort": cohort_size,
            "release_select_ms": release_ms,
            "broker_peak_rss_mib": rss,
            "restart_to_first_count_seconds": restart.as_secs_f64(),
            "erasure_ms": erase_ms,
            "erasure_baseline_consent_ms": consent_ms,
            "reimport_seconds": reimport.as_ref().map(|t| t.iter().map(|(e, _)| e.as_secs_f64()).collect::<Vec<_>>()),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
    }
    Ok(())
}
