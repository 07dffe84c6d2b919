//! `cohort-bench`: cohort counts through the DataFusion engine at a million patients,
//! with the consent filter on, before and after the code index.
//!
//! 1. A seeded synthetic population, generated straight into index rows: about 10
//!    conditions and 10 measurements per patient, 0–6 drugs, 0–4 procedures, codes drawn
//!    with Zipf-like frequencies (rank r with weight 1/r) from real codes at the top and
//!    synthetic ones in the tail, dates 2010–2024, lab values per code (HbA1c higher for
//!    patients with type 2 diabetes).
//! 2. A consent snapshot: 3% of patients consent nothing; the others consent each field
//!    with probability 85–92%.
//! 3. Five definitions, each timed over `--runs` runs (after one warm-up run) three ways:
//!    full scans (every scan reads its whole table), code rows (event scans read only the
//!    queried codes' rows) and person sets (the default: criteria that need no more than
//!    "has a row", demographics and the population read precomputed roaring bitmaps);
//!    medians reported, and the counts of all three checked equal.
//! 4. Peak RSS (`VmHWM`) after generating and indexing, after the indexed runs, and after
//!    the baselines (whose full scans hold filtered copies of whole tables).
//!
//! `--export DIR` also writes the data for other engines (`benches/peers/`):
//! `person/condition/measurement/drug/procedure/consent.parquet`, `queries.sql` (the five
//! definitions as SQL, `-- name: <name>` before each) and `expected.json` (the engine's
//! exact counts).
//!
//! `--peers` then runs `benches/peers/run_peers.sh` on that directory (a temporary one
//! without `--export`) with the same number of runs, and prints each peer's medians and
//! the ratios to this engine's, so both sides are measured in one run on one machine.
//!
//! `cargo run --release -p benches --bin cohort-bench -- --patients 1000000 --peers`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, ensure};
use benches::{CONCEPT_RELATIONS, definitions, peak_rss_mib};
use clap::Parser;
use cohort_query::{
    Access, CodedEvent, CohortDefinition, CohortEngine, ConceptHierarchy, ConsentBuilder,
    ConsentSnapshot, EngineOptions, IndexBuilder, PatientIndex, Person, SearchField,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

#[derive(Debug, Parser)]
#[command(
    name = "cohort-bench",
    about = "Cohort count latency at scale, with the consent filter, before and after the code index"
)]
struct Args {
    /// Patients in the synthetic population.
    #[arg(long, default_value_t = 1_000_000)]
    patients: usize,
    /// Population and consent seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Timed runs per definition and engine (the median is reported).
    #[arg(long, default_value_t = 11)]
    runs: usize,
    /// Engine threads (default: all available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Skip the baselines (full scans; code-ranged rows without person sets).
    #[arg(long)]
    no_baseline: bool,
    /// Write the Parquet files, queries.sql and expected.json into this directory.
    #[arg(long)]
    export: Option<PathBuf>,
    /// Also time the same queries on DuckDB and PostgreSQL (benches/peers/run_peers.sh,
    /// which installs and starts what it needs) and report the ratios.
    #[arg(long)]
    peers: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print EXPLAIN ANALYZE of each definition (with the indexes) after timing it.
    #[arg(long)]
    explain: bool,
    /// Time only the definitions whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

/// One code of a table: its code, Zipf weight by rank, and for measurements a unit and a
/// value distribution.
struct CodeInfo {
    code: String,
    unit: &'static str,
    mean: f64,
    sd: f64,
}

struct Vocabulary {
    codes: Vec<CodeInfo>,
    /// Cumulative weights, for sampling by rank with weight 1/rank.
    cdf: Vec<f64>,
}

impl Vocabulary {
    fn new(
        system: &str,
        top: &[(&str, &'static str, f64, f64)],
        size: usize,
        tail: impl Fn(usize) -> String,
    ) -> Self {
        let mut codes: Vec<CodeInfo> = top
            .iter()
            .map(|(c, unit, mean, sd)| CodeInfo {
                code: format!("{system}:{c}"),
                unit,
                mean: *mean,
                sd: *sd,
            })
            .collect();
        for rank in codes.len()..size {
            codes.push(CodeInfo {
                code: format!("{system}:{}", tail(rank)),
                unit: "1",
                mean: 50.0,
                sd: 10.0,
            });
        }
        let mut acc = 0.0;
        let cdf = (1..=size)
            .map(|r| {
                acc += 1.0 / r as f64;
                acc
            })
            .collect();
        Vocabulary { codes, cdf }
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> &CodeInfo {
        let total = *self.cdf.last().expect("codes");
        let u = rng.gen_range(0.0..total);
        let i = self
            .cdf
            .partition_point(|&c| c <= u)
            .min(self.codes.len() - 1);
        &self.codes[i]
    }
}

struct Vocabularies {
    conditions: Vocabulary,
    measurements: Vocabulary,
    drugs: Vocabulary,
    procedures: Vocabulary,
}

fn vocabularies() -> Vocabularies {
    let none = |c: &'static str| (c, "", 0.0, 0.0);
    Vocabularies {
        conditions: Vocabulary::new(
            "snomed",
            &[
                none("38341003"),  // hypertension
                none("55822004"),  // hyperlipidemia
                none("44054006"),  // type 2 diabetes
                none("195967001"), // asthma
                none("35489007"),  // depression
                none("13645005"),  // COPD
                none("49436004"),  // atrial fibrillation
                none("53741008"),  // coronary artery disease
                none("46635009"),  // type 1 diabetes
                none("40055000"),  // chronic sinusitis
            ],
            2_000,
            |r| format!("{}", 900_000_000 + r),
        ),
        measurements: Vocabulary::new(
            "loinc",
            &[
                ("8480-6", "mm[Hg]", 125.0, 15.0), // systolic blood pressure
                ("8462-4", "mm[Hg]", 80.0, 10.0),  // diastolic blood pressure
                ("39156-5", "kg/m2", 27.0, 5.0),   // BMI
                ("2345-7", "mg/dL", 100.0, 20.0),  // glucose
                ("4548-4", "%", 5.7, 0.6),         // HbA1c
                ("2093-3", "mg/dL", 190.0, 35.0),  // total cholesterol
                ("718-7", "g/dL", 14.0, 1.5),      // hemoglobin
                ("2160-0", "mg/dL", 1.0, 0.25),    // creatinine
            ],
            500,
            |r| format!("9{r:04}-0"),
        ),
        drugs: Vocabulary::new(
            "rxnorm",
            &[
                none("197361"), // amlodipine
                none("314076"), // lisinopril
                none("617312"), // atorvastatin
                none("860975"), // metformin
                none("310965"), // ibuprofen
            ],
            800,
            |r| format!("{}", 9_000_000 + r),
        ),
        procedures: Vocabulary::new(
            "snomed",
            &[
                none("73761001"),  // colonoscopy
                none("80146002"),  // appendectomy
                none("399208008"), // chest X-ray
            ],
            600,
            |r| format!("{}", 800_000_000 + r),
        ),
    }
}

const T2DM: &str = "snomed:44054006";
const HBA1C: &str = "loinc:4548-4";
const FIRST_DAY: i32 = 14_610; // 2010-01-01
const LAST_DAY: i32 = 20_088; // 2024-12-31

fn patient_rng(seed: u64, id: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.set_stream(stream);
    rng
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box–Muller.
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.r#gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn event(code: &str, rng: &mut ChaCha8Rng) -> CodedEvent {
    let (system, code) = code.split_once(':').expect("system:code");
    let day = rng.gen_range(FIRST_DAY..=LAST_DAY);
    CodedEvent {
        system: system.to_string(),
        code: code.to_string(),
        date: cohort_query::Date::from_days(day)
            .expect("in range")
            .to_string(),
        value: None,
        unit: String::new(),
    }
}

fn patient(v: &Vocabularies, seed: u64, id: u64) -> PatientIndex {
    let mut rng = patient_rng(seed, id, 1);
    let sex = match rng.gen_range(0..100) {
        0..49 => "female",
        49..98 => "male",
        98 => "other",
        _ => "unknown",
    };
    let mut p = PatientIndex {
        person: Person {
            birth_year: Some(rng.gen_range(1930..=2010)),
            sex: sex.into(),
        },
        ..Default::default()
    };
    for _ in 0..rng.gen_range(5..=15) {
        let code = &v.conditions.sample(&mut rng).code;
        p.conditions.push(event(code, &mut rng));
    }
    let diabetic = p
        .conditions
        .iter()
        .any(|c| T2DM.strip_prefix("snomed:") == Some(c.code.as_str()));
    for _ in 0..rng.gen_range(5..=15) {
        let info = v.measurements.sample(&mut rng);
        let mut e = event(&info.code, &mut rng);
        let mean = if diabetic && info.code == HBA1C {
            7.4
        } else {
            info.mean
        };
        let value = mean + info.sd * normal(&mut rng);
        e.value = Some((value * 10.0).round() / 10.0);
        e.unit = info.unit.to_string();
        p.measurements.push(e);
    }
    for _ in 0..rng.gen_range(0..=6) {
        let code = &v.drugs.sample(&mut rng).code;
        p.drugs.push(event(code, &mut rng));
    }
    for _ in 0..rng.gen_range(0..=4) {
        let code = &v.procedures.sample(&mut rng).code;
        p.procedures.push(event(code, &mut rng));
    }
    p
}

fn consent_of(seed: u64, id: u64) -> Vec<SearchField> {
    let mut rng = patient_rng(seed, id, 2);
    if rng.gen_range(0..100) < 3 {
        return Vec::new();
    }
    let odds = [
        (SearchField::BirthYear, 85),
        (SearchField::Sex, 90),
        (SearchField::Condition, 92),
        (SearchField::Measurement, 90),
        (SearchField::Drug, 85),
        (SearchField::Procedure, 85),
    ];
    odds.into_iter()
        .filter(|(_, pct)| rng.gen_range(0..100) < *pct)
        .map(|(f, _)| f)
        .collect()
}

fn hierarchy() -> ConceptHierarchy {
    let c = |s: &str| s.parse().expect("code");
    ConceptHierarchy::from_pairs(
        CONCEPT_RELATIONS
            .iter()
            .map(|(ancestor, descendant)| (c(ancestor), c(descendant))),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time_engine(
    engine: &CohortEngine,
    definition: &CohortDefinition,
    consent: &ConsentSnapshot,
    runs: usize,
) -> anyhow::Result<(u64, Vec<f64>)> {
    let exact = engine.count_blocking(definition, consent)?.exact;
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let r = engine.count_blocking(definition, consent)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(r.exact == exact, "a count changed between runs");
    }
    Ok((exact, ms))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(
        args.only.is_none() || (args.export.is_none() && !args.peers),
        "--only times a subset; --export and --peers need all five definitions"
    );
    if cfg!(debug_assertions) {
        eprintln!("note: a debug build; measure with --release");
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("rayon pool")?;

    // 1. Population.
    let t = Instant::now();
    let vocab = vocabularies();
    let mut builder = IndexBuilder::new();
    let mut consent = ConsentBuilder::default();
    let chunk = 20_000usize;
    for start in (0..args.patients).step_by(chunk) {
        let end = (start + chunk).min(args.patients);
        let part: Vec<(PatientIndex, Vec<SearchField>)> = (start..end)
            .into_par_iter()
            .map(|i| {
                (
                    patient(&vocab, args.seed, i as u64),
                    consent_of(args.seed, i as u64),
                )
            })
            .collect();
        for (offset, (p, fields)) in part.into_iter().enumerate() {
            let id = (start + offset) as i64;
            builder.add(id, &p)?;
            for f in fields {
                consent.grant(id, f)?;
            }
        }
    }
    let tables = builder.build();
    let consent = consent.build();
    let generate_s = t.elapsed().as_secs_f64();
    eprintln!(
        "population: {} patients, {} conditions, {} measurements, {} drugs, {} procedures \
         ({:.0} MiB of Arrow arrays), {} with consent, generated in {generate_s:.1} s",
        tables.persons(),
        tables.rows(cohort_query::Domain::Condition),
        tables.rows(cohort_query::Domain::Measurement),
        tables.rows(cohort_query::Domain::Drug),
        tables.rows(cohort_query::Domain::Procedure),
        tables.memory_size() as f64 / (1024.0 * 1024.0),
        consent.patients(),
    );

    let hierarchy = hierarchy();
    let engine = |access| {
        CohortEngine::with_options(
            tables.clone(),
            hierarchy.clone(),
            EngineOptions { access, threads },
        )
    };
    let indexed = engine(Access::PersonSets);
    let baselines = if args.no_baseline {
        Vec::new()
    } else {
        vec![engine(Access::FullScan), engine(Access::CodeRows)]
    };

    // 2. Timing: the indexed engine first, so its peak memory is measured before any
    // baseline's full-table scans.
    let rss_built = peak_rss_mib("self");
    let selected: Vec<(&str, CohortDefinition)> = definitions()
        .into_iter()
        .filter(|(name, _)| args.only.as_ref().is_none_or(|o| name.contains(o.as_str())))
        .collect();
    let mut timed = Vec::with_capacity(selected.len());
    for (_, definition) in &selected {
        let (exact, ms) = time_engine(&indexed, definition, &consent, args.runs)?;
        if args.explain {
            eprintln!(
                "{}",
                indexed.explain_analyze_blocking(definition, &consent)?
            );
        }
        timed.push((exact, median(ms)));
    }
    let rss_indexed = peak_rss_mib("self");
    let mut results = Vec::new();
    eprintln!(
        "\n{:<24} {:>10} {:>14} {:>14} {:>14}",
        "definition", "count", "full scan", "code rows", "person sets"
    );
    for ((name, definition), (exact, after)) in selected.iter().zip(timed) {
        let mut before = Vec::new();
        for baseline in &baselines {
            let (exact_before, ms) = time_engine(baseline, definition, &consent, args.runs)?;
            ensure!(
                exact_before == exact,
                "{name}: {exact_before} on a baseline, {exact} with the indexes"
            );
            before.push(median(ms));
        }
        let ms = |v: Option<&f64>| v.map_or("-".to_string(), |b| format!("{b:.2} ms"));
        eprintln!(
            "{name:<24} {exact:>10} {:>14} {:>14} {:>14}",
            ms(before.first()),
            ms(before.get(1)),
            ms(Some(&after)),
        );
        results.push(serde_json::json!({
            "name": name,
            "count": exact,
            "median_ms": after,
            "median_ms_full_scan": before.first(),
            "median_ms_code_rows": before.get(1),
        }));
    }
    let rss_all = peak_rss_mib("self");
    let mib = |v: Option<f64>| v.map_or("unknown".into(), |m| format!("{m:.0} MiB"));
    eprintln!(
        "\npeak RSS: {} after generating and indexing, {} after the indexed runs, {} after \
         the baselines ({} runs per median, {threads} threads)",
        mib(rss_built),
        mib(rss_indexed),
        mib(rss_all),
        args.runs
    );

    // 3. Export for other engines, and run them.
    let scratch;
    let export = match (&args.export, args.peers) {
        (Some(dir), _) => Some(dir.clone()),
        (None, true) => {
            scratch = tempfile::tempdir().context("a temporary export directory")?;
            Some(scratch.path().to_path_buf())
        }
        (None, false) => None,
    };
    if let Some(dir) = &export {
        let t = Instant::now();
        tables.write_parquet_dir(dir)?;
        consent.write_parquet(&dir.join("consent.parquet"))?;
        let mut sql = String::new();
        let mut expected = BTreeMap::new();
        for ((name, definition), r) in definitions().iter().zip(&results) {
            sql.push_str(&format!(
                "-- name: {name}\n{};\n\n",
                cohort_query::sql::to_sql(definition, &hierarchy)
            ));
            expected.insert(*name, r["count"].clone());
        }
        std::fs::write(dir.join("queries.sql"), sql)?;
        std::fs::write(
            dir.join("expected.json"),
            serde_json::to_string_pretty(&expected)? + "\n",
        )?;
        eprintln!(
            "exported to {} in {:.1} s",
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    // The engines are dropped first, so the peers have the machine to themselves.
    drop((indexed, baselines, tables, consent));
    let peers = match (&export, args.peers) {
        (Some(dir), true) => Some(run_peers(dir, args.runs, &results)?),
        _ => None,
    };

    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "patients": args.patients,
            "seed": args.seed,
            "runs": args.runs,
            "threads": threads,
            "peak_rss_mib": {
                "after_indexing": rss_built,
                "after_indexed_runs": rss_indexed,
                "after_baselines": rss_all,
            },
            "generate_s": generate_s,
            "definitions": results,
            "peers": peers,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    Ok(())
}

/// Runs `benches/peers/run_peers.sh` on `dir` and prints this engine's medians beside the
/// peers', with the ratios; returns the peers' report.
fn run_peers(
    dir: &std::path::Path,
    runs: usize,
    results: &[serde_json::Value],
) -> anyhow::Result<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/run_peers.sh");
    let out = dir.join("peers.json");
    eprintln!("\nrunning {script} (DuckDB, PostgreSQL) …");
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(dir)
        .arg("--runs")
        .arg(runs.to_string())
        .arg("--out")
        .arg(&out)
        .status()
        .with_context(|| format!("running {script}"))?;
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&out).with_context(|| format!("{}: no peer report", out.display()))?,
    )
    .context("the peer report is not JSON")?;
    ensure!(
        status.success(),
        "the peers failed or disagreed on a count ({status}); see above"
    );
    let peer_ms = |engine: &str, name: &str| report[engine]["queries"][name]["median_ms"].as_f64();
    eprintln!(
        "\n| definition | count | this engine | DuckDB | PostgreSQL | × DuckDB | × PostgreSQL |"
    );
    eprintln!("|---|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let name = r["name"].as_str().expect("name");
        let ours = r["median_ms"].as_f64().expect("median");
        let (duck, pg) = (peer_ms("duckdb", name), peer_ms("postgres", name));
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2} ms"));
        let ratio = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}×", v / ours));
        eprintln!(
            "| {name} | {} | {ours:.2} ms | {} | {} | {} | {} |",
            r["count"],
            ms(duck),
            ms(pg),
            ratio(duck),
            ratio(pg)
        );
    }
    Ok(report)
}
