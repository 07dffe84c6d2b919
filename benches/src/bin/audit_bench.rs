//! Throughput and latency of the audit log.
//!
//! ```text
//! cargo run --release -p benches --bin audit-bench -- --leaves N [--store-leaves S] [--batch B] [--dir DIR]
//! ```
//!
//! Two phases:
//!
//! 1. **File store**, `S` leaves (default `min(N, 1_000_000)`): typical events are encoded
//!    and appended to a new log in a temporary directory (or `DIR`) in batches of `B`
//!    (default 1000), one fsync per batch; then the log is reopened (warm page cache) and
//!    proofs are timed on the reopened log.
//! 2. **In-memory tree**, `N` leaves: the tree is built directly from leaf hashes (no file),
//!    and inclusion and consistency proofs are generated and verified at random sizes.

use std::time::{Duration, Instant};

use audit_log::AuditLog;
use audit_log::event::{Actor, ActorRole, AuditEvent, Digest32, EventKind, PatientTag};
use audit_log::proof::{ConsistencyProof, InclusionProof};
use audit_log::tree::{Blake3, Hash, MerkleHasher, MerkleTree};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rayon::prelude::*;

struct Args {
    leaves: u64,
    store_leaves: u64,
    batch: usize,
    dir: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut leaves = 1_000_000u64;
    let mut store_leaves = None;
    let mut batch = 1000usize;
    let mut dir = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--leaves" => leaves = value()?.parse().map_err(|e| format!("--leaves: {e}"))?,
            "--store-leaves" => {
                store_leaves = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--store-leaves: {e}"))?,
                )
            }
            "--batch" => batch = value()?.parse().map_err(|e| format!("--batch: {e}"))?,
            "--dir" => dir = Some(value()?),
            "-h" | "--help" => {
                return Err(
                    "usage: audit_bench --leaves N [--store-leaves S] [--batch B] [--dir DIR]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if leaves == 0 || batch == 0 {
        return Err("--leaves and --batch must be positive".into());
    }
    Ok(Args {
        leaves,
        store_leaves: store_leaves.unwrap_or(leaves.min(1_000_000)),
        batch,
        dir,
    })
}

/// A typical release event.
fn event(i: u64) -> AuditEvent {
    let mut e = AuditEvent::new(
        EventKind::Release,
        1_760_000_000 + (i / 100) as i64,
        Actor {
            id: format!("researcher-{:06}", i % 5000),
            role: ActorRole::Registered(model::Role::Researcher),
            organisation: Some("org-0042".into()),
        },
    );
    e.patient = Some(PatientTag(*blake3::hash(&i.to_le_bytes()).as_bytes()));
    e.why.purpose = Some("research".into());
    e.why.study_id = Some(format!("study-{:04}", i % 300));
    e.why.consent_version = Some(Digest32(*blake3::hash(b"consent v3").as_bytes()));
    e.details.release_id = Some(format!("release-{i:010}"));
    e.details.grant_id = Some(format!("grant-{:08}", i / 7));
    e.details.categories = vec!["Observation".into(), "Condition".into()];
    e.details.record_count = Some(12);
    e.details.content_hashes = vec![Digest32(*blake3::hash(&(!i).to_le_bytes()).as_bytes())];
    e
}

fn rss() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l[name.len()..].trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    format!("RSS {} (peak {})", field("VmRSS:"), field("VmHWM:"))
}

fn per_op(total: Duration, ops: usize) -> String {
    format!("{:.2} µs", total.as_secs_f64() * 1e6 / ops as f64)
}

/// Times proofs on `tree` at random sizes: `ops` inclusion proofs in the full tree, `ops`
/// at random earlier sizes, and `ops` consistency proofs between random sizes.
fn time_proofs(label: &str, tree: &MerkleTree<Blake3>, ops: usize, rng: &mut StdRng) {
    let n = tree.len();
    let mut roots: std::collections::HashMap<u64, Hash> = std::collections::HashMap::new();
    let mut root_at = |s: u64| {
        *roots
            .entry(s)
            .or_insert_with(|| tree.root_at(s).unwrap_or_default())
    };

    for (what, full) in [("full size", true), ("random earlier size", false)] {
        let cases: Vec<(u64, u64)> = (0..ops)
            .map(|_| {
                let size = if full { n } else { rng.gen_range(1..=n) };
                (rng.gen_range(0..size), size)
            })
            .collect();
        let t = Instant::now();
        let proofs: Vec<InclusionProof> = cases
            .iter()
            .map(|&(i, s)| tree.inclusion_proof(i, s).expect("proof"))
            .collect();
        let generate = t.elapsed();
        let inputs: Vec<(Hash, Hash)> = cases
            .iter()
            .map(|&(i, s)| (tree.leaf_hash(i).unwrap_or_default(), root_at(s)))
            .collect();
        let t = Instant::now();
        for (p, (leaf, root)) in proofs.iter().zip(&inputs) {
            p.verify_with::<Blake3>(leaf, root).expect("verifies");
        }
        let verify = t.elapsed();
        let avg_len = proofs.iter().map(|p| p.path.len()).sum::<usize>() as f64 / ops as f64;
        println!(
            "{label}: inclusion proof ({what}, {avg_len:.1} hashes): generate {} , verify {} (avg of {ops})",
            per_op(generate, ops),
            per_op(verify, ops)
        );
    }

    let cases: Vec<(u64, u64)> = (0..ops)
        .map(|_| {
            let a = rng.gen_range(1..=n);
            let b = rng.gen_range(1..=n);
            (a.min(b), a.max(b))
        })
        .collect();
    let t = Instant::now();
    let proofs: Vec<ConsistencyProof> = cases
        .iter()
        .map(|&(m, s)| tree.consistency_proof(m, s).expect("proof"))
        .collect();
    let generate = t.elapsed();
    let inputs: Vec<(Hash, Hash)> = cases
        .iter()
        .map(|&(m, s)| (root_at(m), root_at(s)))
        .collect();
    let t = Instant::now();
    for (p, (r1, r2)) in proofs.iter().zip(&inputs) {
        p.verify(r1, r2).expect("verifies");
    }
    let verify = t.elapsed();
    let avg_len = proofs.iter().map(|p| p.path.len()).sum::<usize>() as f64 / ops as f64;
    println!(
        "{label}: consistency proof (random sizes, {avg_len:.1} hashes): generate {} , verify {} (avg of {ops})",
        per_op(generate, ops),
        per_op(verify, ops)
    );
    let t = Instant::now();
    let size = rng.gen_range(1..=n);
    let _ = tree.root_at(size);
    println!(
        "{label}: root at a random earlier size: {:.2} µs",
        t.elapsed().as_secs_f64() * 1e6
    );
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut rng = StdRng::seed_from_u64(42);
    let ops = 10_000;
    println!(
        "audit_bench: leaves {} (in-memory tree), store leaves {} (file store), batch {}, {} threads",
        args.leaves,
        args.store_leaves,
        args.batch,
        rayon::current_num_threads()
    );

    // Phase 1: the file store.
    if args.store_leaves > 0 {
        let tmp;
        let dir = match &args.dir {
            Some(d) => std::path::PathBuf::from(d),
            None => {
                tmp = tempfile::tempdir().expect("tempdir");
                tmp.path().join("audit")
            }
        };
        let sample = event(123_456).to_leaf_bytes().expect("encode");
        println!(
            "typical event: {} bytes of canonical JSON; record on disk {} bytes",
            sample.len(),
            sample.len() + audit_log::store::RECORD_OVERHEAD
        );
        let mut log = AuditLog::create(&dir, "bench.example/audit").expect("create");
        let mut encode = Duration::ZERO;
        let mut append = Duration::ZERO;
        let mut next = 0u64;
        let wall = Instant::now();
        while next < args.store_leaves {
            let end = args.store_leaves.min(next + args.batch as u64);
            let t = Instant::now();
            let leaves: Vec<Vec<u8>> = (next..end)
                .into_par_iter()
                .map(|i| event(i).to_leaf_bytes().expect("encode"))
                .collect();
            encode += t.elapsed();
            let t = Instant::now();
            log.append(&leaves).expect("append");
            append += t.elapsed();
            next = end;
        }
        let wall = wall.elapsed();
        let batches = args.store_leaves.div_ceil(args.batch as u64);
        let n = args.store_leaves as f64;
        println!(
            "store: appended {} events in {} batches: {:.0} appends/s (append incl. fsync: {:.2} s = {:.0}/s, {:.2} ms per batch; event encoding {:.2} s; wall {:.2} s)",
            args.store_leaves,
            batches,
            n / wall.as_secs_f64(),
            append.as_secs_f64(),
            n / append.as_secs_f64(),
            append.as_secs_f64() * 1e3 / batches as f64,
            encode.as_secs_f64(),
            wall.as_secs_f64()
        );
        println!(
            "store: leaves.log {} bytes = {:.1} bytes per event on disk",
            log.file_bytes(),
            log.file_bytes() as f64 / n
        );
        let t = Instant::now();
        let cp = log
            .checkpoint(&pre_kms::Identity::generate(), 1_760_000_000)
            .expect("checkpoint");
        println!(
            "store: checkpoint (root + ECDSA sign with the broker's key type + fsync): {:.2} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        let root = log.root();
        println!("store: {}", rss());
        drop(log);

        let t = Instant::now();
        let log = AuditLog::open(&dir).expect("reopen");
        let reopen = t.elapsed();
        assert_eq!(log.root(), root);
        println!(
            "store: reopen (warm page cache: read, check every record, rebuild tree): {:.2} s = {:.0} leaves/s",
            reopen.as_secs_f64(),
            n / reopen.as_secs_f64()
        );
        let t = Instant::now();
        let report = log.verify_against(&cp).expect("verify");
        println!(
            "store: verify_against(checkpoint) over {} leaves: {:.2} s",
            report.leaves,
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        for _ in 0..ops {
            let i = rng.gen_range(0..log.size());
            let _ = log.leaf(i).expect("leaf");
        }
        println!("store: leaf(i) read + check: {}", per_op(t.elapsed(), ops));
        time_proofs(
            &format!("store {} leaves", args.store_leaves),
            log.tree(),
            ops,
            &mut rng,
        );
        println!("store: {}", rss());
        drop(log);
    }

    // Phase 2: the in-memory tree built directly from leaf hashes.
    let t = Instant::now();
    let hashes: Vec<Hash> = (0..args.leaves)
        .into_par_iter()
        .map(|i| {
            let mut leaf = [0u8; 64];
            leaf[..8].copy_from_slice(&i.to_le_bytes());
            Blake3::leaf_hash(&leaf)
        })
        .collect();
    let hash_time = t.elapsed();
    let t = Instant::now();
    let tree = MerkleTree::<Blake3>::from_leaf_hashes(hashes);
    println!(
        "tree: {} leaf hashes computed in {:.2} s, tree built from them in {:.2} s; nodes {:.0} MB; {}",
        args.leaves,
        hash_time.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        tree.memory_bytes() as f64 / 1e6,
        rss()
    );
    time_proofs(
        &format!("tree {} leaves", args.leaves),
        &tree,
        ops,
        &mut rng,
    );
}
