//! `e2e-bench`: the whole pipeline through a real broker and its proxies on loopback,
//! against the crypto floor measured in the same run on the same machine.
//!
//! 1. The floor: single-threaded per-operation times of the umbral operations the
//!    pipeline cannot avoid, over a few hundred real envelopes of the same population;
//!    floor throughput = cores / per-envelope floor time.
//! 2. The pipeline: a broker with three embedded proxies (2-of-3) in a temporary
//!    directory; a custodian ingests the population, a sponsor proposes a study of four
//!    categories with an empty cohort, the board approves it, every patient grants it, and
//!    the researcher fetches, verifies and decrypts the release, checked byte for byte.
//! 3. The report: measured and floor envelopes/s per stage, and the overhead.
//!
//! `cargo run --release -p benches --bin e2e-bench -- --patients 2000 --markdown`

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use benches::{OpTimes, STUDY_CATEGORIES, THRESHOLD, fixtures, measure_ops, sample_plaintexts};
use broker_cli::demo::{Scenario, Tally};
use brokerctl::agent;
use clap::Parser;
use datasets::{PatientRecord, Population};
use model::CohortDefinition;
use pre_kms::{Category, Identity};
use rayon::prelude::*;

/// The target: at most this much overhead over the floor.
const TARGET_OVERHEAD: f64 = 0.15;

#[derive(Debug, Parser)]
#[command(
    name = "e2e-bench",
    about = "End-to-end throughput of ingest and release against the crypto floor"
)]
struct Args {
    /// Patients in the synthetic population.
    #[arg(long, default_value_t = 2000)]
    patients: usize,
    /// Patients per upload and per grant call.
    #[arg(long, default_value_t = 200)]
    batch: usize,
    /// Population seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Worker threads for rayon and tokio (default: all available cores). The floor
    /// throughput is computed for this many cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Envelopes the floor is measured over (per stage).
    #[arg(long, default_value_t = 300)]
    floor_envelopes: usize,
    /// Timed passes over those envelopes per operation (the median is kept).
    #[arg(long, default_value_t = 5)]
    floor_passes: usize,
    /// Also print a markdown table for benches/RESULTS.md.
    #[arg(long)]
    markdown: bool,
}

#[derive(Debug, Default)]
struct Pipeline {
    patients: usize,
    envelopes: usize,
    envelope_bytes: usize,
    ingest: Duration,
    grants: usize,
    grant_time: Duration,
    subjects: u32,
    released: usize,
    released_bytes: usize,
    release: Duration,
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The argument vector, quoted for a POSIX shell where needed.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn measure_floor(args: &Args) -> OpTimes {
    let population = Population::new(args.seed, args.patients);
    let researcher = Identity::generate();
    let ingest = fixtures(
        &researcher,
        sample_plaintexts(&population, args.floor_envelopes, |_| true),
    );
    let release = fixtures(
        &researcher,
        sample_plaintexts(&population, args.floor_envelopes, |c| {
            STUDY_CATEGORIES.contains(&c)
        }),
    );
    measure_ops(&researcher, &ingest, &release, args.floor_passes)
}

async fn run_pipeline(args: &Args) -> anyhow::Result<Pipeline> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let scenario = Scenario::start(&dir.path().join("broker")).await?;
    eprintln!(
        "broker on {} with {} embedded proxies, data in {}",
        scenario.running.url(),
        scenario.running.proxies.len(),
        dir.path().display()
    );
    let cast = scenario.cast("Bench").await?;

    // The records are generated before the clock starts: the floor does not generate data.
    let population = Population::new(args.seed, args.patients);
    let records: Vec<(Identity, PatientRecord)> = tokio::task::spawn_blocking(move || {
        (0..population.len())
            .into_par_iter()
            .map(|i| (Identity::generate(), population.patient(i)))
            .collect()
    })
    .await?;
    let mut want = Tally::default();
    for (_, record) in &records {
        want.add_record(record, &STUDY_CATEGORIES);
    }
    let granting: Vec<(Identity, Vec<Category>)> = records
        .iter()
        .map(|(id, r)| (id.clone(), r.categories.keys().copied().collect()))
        .collect();
    let mut batches: Vec<brokerctl::ClientResult<_>> = Vec::new();
    let mut rest = records.into_iter().peekable();
    while rest.peek().is_some() {
        batches.push(Ok(rest.by_ref().take(args.batch).collect::<Vec<_>>()));
    }

    // Ingest, the same pipelined path as the demo and `brokerctl import`.
    let mut out = Pipeline {
        patients: args.patients,
        ..Default::default()
    };
    let started = Instant::now();
    let report = agent::ingest_all(&cast.custodian, batches, |_| {}).await?;
    out.ingest = started.elapsed();
    out.envelopes = report.envelopes_stored + report.envelopes_unchanged;
    out.envelope_bytes = report.bytes;
    ensure!(
        report.newly_enrolled == args.patients,
        "enrolled {} of {} patients",
        report.newly_enrolled,
        args.patients
    );

    // Every patient consents broadly (not timed: a one-off per patient).
    let ids: Vec<_> = granting.iter().map(|(id, _)| id.clone()).collect();
    cast.consent_broadly(&ids).await?;

    // Every granting patient (empty cohort), four categories.
    let study = cast
        .approved_study(
            "End-to-end benchmark",
            &STUDY_CATEGORIES,
            CohortDefinition::everyone(),
        )
        .await?;
    let started = Instant::now();
    out.grants = cast
        .grant_all(&study, &granting, args.batch, |_| {})
        .await?;
    out.grant_time = started.elapsed();

    let started = Instant::now();
    let (fetched, got) = cast.fetch(&study).await?;
    out.release = started.elapsed();
    out.subjects = fetched.release.subjects;
    out.released = fetched.records;
    out.released_bytes = fetched.bytes;
    scenario.running.stop().await;

    if let Err(mismatch) = want.check(&got) {
        bail!("release check FAILED: {mismatch}");
    }
    Ok(out)
}

struct Stage {
    name: &'static str,
    envelopes: usize,
    time: Duration,
    floor_per_envelope: Duration,
}

impl Stage {
    fn measured(&self) -> f64 {
        rate(self.envelopes, self.time)
    }
    fn floor(&self, cores: usize) -> f64 {
        cores as f64 / self.floor_per_envelope.as_secs_f64().max(1e-12)
    }
    /// floor rate / measured rate − 1.
    fn overhead(&self, cores: usize) -> f64 {
        self.floor(cores) / self.measured().max(1e-9) - 1.0
    }
    fn verdict(&self, cores: usize) -> &'static str {
        if self.overhead(cores) <= TARGET_OVERHEAD {
            "met"
        } else {
            "missed"
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.patients > 0, "--patients must be at least 1");
    ensure!(args.batch > 0, "--batch must be at least 1");
    ensure!(
        args.floor_envelopes > 0,
        "--floor-envelopes must be at least 1"
    );
    let available = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if let Some(n) = args.threads {
        ensure!(n > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("rayon pool")?;
    }
    let cores = args.threads.map_or(available, |n| n.min(available));
    let profile = if cfg!(debug_assertions) {
        "dev build (debug assertions on: these numbers mean nothing)"
    } else {
        "release build"
    };

    eprintln!(
        "measuring the crypto floor (single-threaded, {} envelopes per stage)...",
        args.floor_envelopes
    );
    let ops = measure_floor(&args);

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = args.threads {
        runtime.worker_threads(n);
    }
    let runtime = runtime.build().context("tokio runtime")?;
    eprintln!(
        "running the pipeline ({} patients, batches of {})...",
        args.patients, args.batch
    );
    let p = runtime.block_on(run_pipeline(&args))?;
    drop(runtime);

    let ingest = Stage {
        name: "ingest",
        envelopes: p.envelopes,
        time: p.ingest,
        floor_per_envelope: ops.ingest_floor(),
    };
    let release = Stage {
        name: "release",
        envelopes: p.released,
        time: p.release,
        floor_per_envelope: ops.release_floor(),
    };
    let t = THRESHOLD;

    println!("e2e-bench");
    println!("command      {}", command_line());
    println!(
        "setup        {} patients, seed {}, batch {}, {cores} core(s) used of {available} available, {}",
        args.patients, args.seed, args.batch, profile
    );
    println!();
    println!(
        "crypto floor (one thread, median of {} passes over {} ingest / {} release envelopes of this population)",
        ops.passes, ops.ingest_envelopes, ops.release_envelopes
    );
    println!(
        "  umbral encrypt (compressed copy)   {:>9.1} µs",
        us(ops.encrypt)
    );
    println!(
        "  umbral reencrypt                   {:>9.1} µs",
        us(ops.reencrypt)
    );
    println!(
        "  CapsuleFrag::verify                {:>9.1} µs",
        us(ops.verify)
    );
    println!(
        "  decrypt_reencrypted (t={t})         {:>9.1} µs",
        us(ops.decrypt)
    );
    println!(
        "  ingest floor  = 1 encrypt                               {:>9.1} µs/envelope = {:>8.0} envelopes/s on {cores} core(s)",
        us(ops.ingest_floor()),
        ingest.floor(cores)
    );
    println!(
        "  release floor = {t} reencrypt + {t} verify + 1 decrypt      {:>9.1} µs/envelope = {:>8.0} envelopes/s on {cores} core(s)",
        us(ops.release_floor()),
        release.floor(cores)
    );
    println!();
    println!(
        "pipeline (real broker, 3 embedded proxies, {t}-of-3, gRPC on loopback, all in this process)"
    );
    println!(
        "  ingest    {:>8} envelopes ({:.1} MiB sealed) of {} patients in {:>7.2} s",
        p.envelopes,
        p.envelope_bytes as f64 / (1 << 20) as f64,
        p.patients,
        p.ingest.as_secs_f64()
    );
    println!(
        "  grants    {:>8} grants in {:>7.2} s = {:.0} grants/s",
        p.grants,
        p.grant_time.as_secs_f64(),
        rate(p.grants, p.grant_time)
    );
    println!(
        "  release   {:>8} envelopes ({:.1} MiB decrypted) of {} subjects in {:>7.2} s",
        p.released,
        p.released_bytes as f64 / (1 << 20) as f64,
        p.subjects,
        p.release.as_secs_f64()
    );
    println!(
        "  check     OK: all {} decrypted records equal the originals, none missing, none extra",
        p.released
    );
    println!();
    println!(
        "{:<8} {:>14} {:>14} {:>15} {:>10}   target ≤{:.0}%",
        "stage",
        "measured env/s",
        "floor env/s",
        "measured/floor",
        "overhead",
        TARGET_OVERHEAD * 100.0
    );
    for s in [&ingest, &release] {
        println!(
            "{:<8} {:>14.0} {:>14.0} {:>15.3} {:>9.1}%   {}",
            s.name,
            s.measured(),
            s.floor(cores),
            s.measured() / s.floor(cores),
            s.overhead(cores) * 100.0,
            s.verdict(cores)
        );
    }
    println!(
        "grants   {:>14.0} grants/s (no floor)",
        rate(p.grants, p.grant_time)
    );
    let bv = ops.broker_verify();
    let with_bv = ops.release_floor() + bv;
    println!(
        "verifying every fragment at the broker ({t} × verify = {:.1} µs/envelope; it verifies a sample of one in 16) would add {:.1}% to the release floor: \
         with it the floor is {:.1} µs/envelope = {:.0} envelopes/s, and the release overhead over that is {:.1}%",
        us(bv),
        100.0 * bv.as_secs_f64() / ops.release_floor().as_secs_f64(),
        us(with_bv),
        cores as f64 / with_bv.as_secs_f64(),
        100.0 * ((cores as f64 / with_bv.as_secs_f64()) / release.measured() - 1.0)
    );

    for (name, stage, parallel) in [
        ("ingest", &ingest, ops.ingest_parallel),
        ("release", &release, ops.release_parallel),
    ] {
        let rate = 1.0 / parallel.as_secs_f64();
        println!(
            "{name} floor run on all {cores} threads at once: {:.0} envelopes/s ({:.2}x one thread, not {cores}x); \
             the {name} overhead over that is {:.1}%",
            rate,
            rate / (stage.floor(cores) / cores as f64),
            100.0 * (rate / stage.measured() - 1.0)
        );
    }
    let wire = ops.release_wire_floor();
    let wire_rate = cores as f64 / wire.as_secs_f64();
    println!(
        "deserialization umbral-pre 0.11 requires between parties ({} capsule parses at {:.1} µs, {t} cfrag parses at {:.1} µs) \
         makes the release floor {:.1} µs/envelope = {:.0} envelopes/s; the release overhead over that is {:.1}%, \
         and {:.1}% over that plus verifying every fragment at the broker",
        t + 1,
        us(ops.capsule_parse),
        us(ops.cfrag_parse),
        us(wire),
        wire_rate,
        100.0 * (wire_rate / release.measured() - 1.0),
        100.0 * ((cores as f64 / (wire + bv).as_secs_f64()) / release.measured() - 1.0)
    );

    if args.markdown {
        println!();
        println!(
            "Command: `{}` ({}; {cores} of {available} cores; seed {})",
            command_line(),
            profile,
            args.seed
        );
        println!();
        println!(
            "| stage | envelopes | time (s) | measured env/s | floor env/s | measured/floor | overhead (target ≤ {:.0}%) |",
            TARGET_OVERHEAD * 100.0
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for s in [&ingest, &release] {
            println!(
                "| {} | {} | {:.2} | {:.0} | {:.0} | {:.3} | {:.1}% ({}) |",
                s.name,
                s.envelopes,
                s.time.as_secs_f64(),
                s.measured(),
                s.floor(cores),
                s.measured() / s.floor(cores),
                s.overhead(cores) * 100.0,
                s.verdict(cores)
            );
        }
        println!(
            "| grants | {} grants | {:.2} | {:.0} grants/s | – | – | – |",
            p.grants,
            p.grant_time.as_secs_f64(),
            rate(p.grants, p.grant_time)
        );
        println!();
        println!("| floor operation (one thread) | µs |");
        println!("|---|---:|");
        println!(
            "| `umbral_pre::encrypt` (compressed copy) | {:.1} |",
            us(ops.encrypt)
        );
        println!("| `umbral_pre::reencrypt` | {:.1} |", us(ops.reencrypt));
        println!("| `CapsuleFrag::verify` | {:.1} |", us(ops.verify));
        println!(
            "| `umbral_pre::decrypt_reencrypted` (t={t}) | {:.1} |",
            us(ops.decrypt)
        );
        println!(
            "| ingest floor per envelope (1 encrypt) | {:.1} |",
            us(ops.ingest_floor())
        );
        println!(
            "| release floor per envelope ({t} reencrypt + {t} verify + 1 decrypt) | {:.1} |",
            us(ops.release_floor())
        );
        println!(
            "| verifying every fragment at the broker, per envelope ({t} verify, not in the floor; it samples one in 16) | {:.1} |",
            us(bv)
        );
        println!(
            "| ingest floor on all threads at once, wall time per envelope | {:.1} |",
            us(ops.ingest_parallel)
        );
        println!(
            "| release floor on all threads at once, wall time per envelope | {:.1} |",
            us(ops.release_parallel)
        );
        println!("| `Capsule::from_bytes` | {:.1} |", us(ops.capsule_parse));
        println!("| `CapsuleFrag::from_bytes` | {:.1} |", us(ops.cfrag_parse));
        println!(
            "| release floor across the wire (+ {} capsule parses + {t} cfrag parses) | {:.1} |",
            t + 1,
            us(wire)
        );
        println!();
        println!(
            "Verifying every fragment at the broker (it verifies a sample of one in 16) would add {:.1}% to the release floor ({:.0} instead of {:.0} envelopes/s).",
            100.0 * bv.as_secs_f64() / ops.release_floor().as_secs_f64(),
            cores as f64 / with_bv.as_secs_f64(),
            release.floor(cores)
        );
    }
    Ok(())
}
