//! `bundle-bench`: the client's peak memory when it imports one large FHIR bundle.
//!
//! A custodian's export can hold one patient with decades of data in a single Bundle. The
//! bench writes such a bundle (`--mb`, default 50): the synthetic population's patient 0,
//! its clinical entries repeated under fresh ids (references rewritten alike) until the
//! file reaches the size, pretty-printed as Synthea writes its bundles. Then, each in a
//! fresh child process so that one measurement cannot inflate another's peak:
//!
//! 1. **baseline**: read the file and parse it as one JSON document (`serde_json::Value`),
//!    the least a non-streaming importer holds;
//! 2. **import**: what `brokerctl import fhir` does on the client before the upload:
//!    `datasets::import_path`, then seal every category of the record under the patient's
//!    keys (`agent::prepare`).
//!
//! Each reports its peak resident set (`VmHWM`) and time; the result is the import's peak
//! as a ratio to the baseline's, and in MiB per MiB of bundle.
//!
//! `cargo build --release && target/release/bundle-bench --mb 50`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use benches::peak_rss_mib;
use brokerctl::agent::{self, Known};
use clap::{Parser, Subcommand};
use datasets::{DeidConfig, Population};
use pre_kms::Identity;
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(
    name = "bundle-bench",
    about = "Peak client memory importing one large FHIR bundle"
)]
struct Args {
    #[command(subcommand)]
    step: Option<Step>,
    /// Size of the generated bundle, in MiB.
    #[arg(long, default_value_t = 50)]
    mb: usize,
    /// Keep the generated bundle at this path (default: a temporary file).
    #[arg(long)]
    keep: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Step {
    /// Parse FILE as one JSON value; print the peak RSS.
    Baseline { file: PathBuf },
    /// Import FILE and seal its record; print the peak RSS.
    Import { file: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.step {
        Some(Step::Baseline { file }) => {
            let started = Instant::now();
            let bytes = std::fs::read(&file)?;
            let doc: Value = serde_json::from_slice(&bytes)?;
            let entries = doc["entry"].as_array().map_or(0, Vec::len);
            report(started, &format!("{entries} entries"));
        }
        Some(Step::Import { file }) => {
            let started = Instant::now();
            let imported = datasets::import_path(&file, &DeidConfig::default());
            ensure!(imported.errors.is_empty(), "{:?}", imported.errors.first());
            let [record] = <[_; 1]>::try_from(imported.patients)
                .map_err(|v| anyhow::anyhow!("{} patients in the bundle", v.len()))?;
            let patient = Identity::generate();
            let sealed = agent::prepare(&patient, &record, &Known::default())?;
            let bytes: usize = sealed.envelopes.iter().map(|e| e.sealed.len()).sum();
            let rows = sealed.index.1.conditions.len() + sealed.index.1.measurements.len();
            report(
                started,
                &format!(
                    "{} envelopes, {bytes} sealed bytes, {rows} index rows",
                    sealed.envelopes.len()
                ),
            );
        }
        None => run(args.mb, args.keep)?,
    }
    Ok(())
}

fn report(started: Instant, what: &str) {
    println!(
        "peak_mib={:.1} seconds={:.2} {what}",
        peak_rss_mib("self").unwrap_or(f64::NAN),
        started.elapsed().as_secs_f64()
    );
}

fn run(mb: usize, keep: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = keep.unwrap_or_else(|| dir.path().join("big-bundle.json"));
    let (size, entries) = write_bundle(&path, mb << 20)?;
    let size_mib = size as f64 / f64::from(1 << 20);
    println!(
        "bundle: {} ({size_mib:.1} MiB, {entries} entries)",
        path.display()
    );
    let exe = std::env::current_exe()?;
    let step = |name: &str| -> anyhow::Result<(f64, String)> {
        let out = Command::new(&exe)
            .arg(name)
            .arg(&path)
            .output()
            .with_context(|| format!("running {name}"))?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() {
            bail!("{name} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let peak: f64 = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("peak_mib="))
            .context("no peak reported")?
            .parse()?;
        println!("{name}: {text}");
        Ok((peak, text))
    };
    let (baseline, _) = step("baseline")?;
    let (import, _) = step("import")?;
    println!(
        "import peak / baseline peak = {:.2}; import peak per MiB of bundle = {:.2} MiB",
        import / baseline,
        import / size_mib
    );
    Ok(())
}

/// Writes a one-patient transaction Bundle of at least `target` bytes; its size and
/// number of entries.
fn write_bundle(path: &Path, target: usize) -> anyhow::Result<(u64, usize)> {
    let seed = Population::new(7, 1).bundle(0);
    let entries = seed["entry"].as_array().context("entries")?;
    let (patient, clinical) = entries.split_first().context("a patient")?;
    let patient_ref = format!(
        "urn:uuid:{}",
        patient["resource"]["id"].as_str().context("patient id")?
    );
    let file = std::fs::File::create(path)?;
    let mut out = std::io::BufWriter::new(file);
    // Written entry by entry: the bench itself never holds the whole bundle.
    let head = "{\n  \"resourceType\": \"Bundle\",\n  \"type\": \"transaction\",\n  \"entry\": [\n";
    out.write_all(head.as_bytes())?;
    let first = serde_json::to_vec_pretty(patient)?;
    out.write_all(&first)?;
    let mut written = head.len() + first.len();
    let mut n = 1;
    let mut k = 0;
    while written < target {
        for entry in clinical {
            let mut e = entry.clone();
            renumber(&mut e, &patient_ref, k);
            let bytes = serde_json::to_vec_pretty(&e)?;
            out.write_all(b",\n")?;
            out.write_all(&bytes)?;
            written += bytes.len() + 2;
            n += 1;
        }
        k += 1;
    }
    writeln!(out, "\n  ]\n}}")?;
    out.flush()?;
    drop(out);
    Ok((std::fs::metadata(path)?.len(), n))
}

/// Gives copy `k` of an entry its own ids: every `urn:uuid:` but the patient's, and every
/// `id`, get the suffix `-k`.
fn renumber(v: &mut Value, patient_ref: &str, k: usize) {
    match v {
        Value::String(s) if s.starts_with("urn:uuid:") && s != patient_ref => {
            s.push_str(&format!("-{k}"));
        }
        Value::Array(items) => items.iter_mut().for_each(|i| renumber(i, patient_ref, k)),
        Value::Object(o) => {
            for (key, value) in o.iter_mut() {
                match value {
                    Value::String(s) if key == "id" => s.push_str(&format!("-{k}")),
                    other => renumber(other, patient_ref, k),
                }
            }
        }
        _ => {}
    }
}
