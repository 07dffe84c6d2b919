//! Criterion micro-benchmarks of the cryptography the pipeline is made of.
//!
//! - `envelope_seal`: compress and seal a small and the largest research copy of a
//!   50-patient population (bytes/s of plaintext).
//! - `umbral_primitives`: one `encrypt`, `reencrypt`, `CapsuleFrag::verify` and
//!   `decrypt_reencrypted` (t = 2), the operations the crypto floor is made of.
//! - `reencrypt_batch`: a proxy's batch of 128 re-encryptions across the rayon pool.
//! - `cfrag_verify_and_decrypt`: a researcher's `decrypt_released` of one envelope
//!   (verify t = 2 cfrags, decrypt, decompress).
//!
//! Run with `cargo bench -p benches --bench crypto`.

use std::hint::black_box;
use std::time::Duration;

use benches::{Fixture, THRESHOLD};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use datasets::Population;
use pre_kms::reencrypt::{decrypt_released, reencrypt_batch};
use pre_kms::{Category, Identity, envelope};

const BATCH: usize = 128;

/// A small (about 1.5 KB) and the largest category plaintext of `Population::new(1, 50)`.
fn research_copies() -> [(&'static str, Category, Vec<u8>); 2] {
    let population = Population::new(1, 50);
    let all: Vec<(Category, Vec<u8>)> = (0..population.len())
        .flat_map(|i| population.patient(i).categories)
        .collect();
    let small = all
        .iter()
        .min_by_key(|(_, p)| p.len().abs_diff(1536))
        .cloned()
        .expect("the population has records");
    let large = all
        .iter()
        .max_by_key(|(_, p)| p.len())
        .cloned()
        .expect("the population has records");
    [("small", small.0, small.1), ("large", large.0, large.1)]
}

fn fixtures() -> (Identity, Vec<(&'static str, Fixture)>) {
    let researcher = Identity::generate();
    let fixtures = research_copies()
        .into_iter()
        .map(|(name, c, p)| (name, Fixture::new(&researcher, c, p)))
        .collect();
    (researcher, fixtures)
}

fn label(name: &str, f: &Fixture) -> String {
    format!("{name}/{}/{}B", f.category, f.plaintext.len())
}

fn envelope_seal(c: &mut Criterion) {
    let (_, fixtures) = fixtures();
    let mut group = c.benchmark_group("envelope_seal");
    for (name, f) in &fixtures {
        group.throughput(Throughput::Bytes(f.plaintext.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label(name, f)), f, |b, f| {
            b.iter(|| envelope::seal(&f.delegating_key, black_box(&f.plaintext)).expect("seals"))
        });
    }
    group.finish();
}

fn umbral_primitives(c: &mut Criterion) {
    let (researcher, fixtures) = fixtures();
    let f = &fixtures[0].1;
    let receiving_secret = researcher.encryption_key();
    let unverified = f.unverified_cfrags();
    let mut group = c.benchmark_group("umbral_primitives");
    group.bench_function(format!("encrypt/{}B", f.compressed.len()), |b| {
        b.iter(|| {
            umbral_pre::encrypt(&f.delegating_key, black_box(&f.compressed)).expect("encrypts")
        })
    });
    group.bench_function("reencrypt", |b| {
        b.iter_batched(
            || f.kfrags[0].clone(),
            |k| umbral_pre::reencrypt(black_box(&f.capsule), k),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("cfrag_verify", |b| {
        b.iter_batched(
            || unverified[0].clone(),
            |cfrag| {
                cfrag
                    .verify(
                        &f.capsule,
                        &f.verifying_key,
                        &f.delegating_key,
                        &f.receiving_key,
                    )
                    .expect("verifies")
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function(format!("decrypt_reencrypted/t={THRESHOLD}"), |b| {
        b.iter_batched(
            || f.cfrags.clone(),
            |cfrags| {
                umbral_pre::decrypt_reencrypted(
                    &receiving_secret,
                    &f.delegating_key,
                    &f.capsule,
                    cfrags,
                    &f.ciphertext,
                )
                .expect("decrypts")
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn reencrypt_batch_bench(c: &mut Criterion) {
    let (_, fixtures) = fixtures();
    let f = &fixtures[0].1;
    // 128 distinct capsules under one delegation: the cost per item does not depend on
    // whose key it is.
    let items: Vec<_> = (0..BATCH)
        .map(|i| {
            let (capsule, _) =
                umbral_pre::encrypt(&f.delegating_key, &f.compressed).expect("encrypts");
            (capsule, f.kfrags[i % f.kfrags.len()].clone())
        })
        .collect();
    let mut group = c.benchmark_group("reencrypt_batch");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    group.bench_function(format!("{BATCH}"), |b| {
        b.iter(|| reencrypt_batch(black_box(&items)))
    });
    group.finish();
}

fn cfrag_verify_and_decrypt(c: &mut Criterion) {
    let (researcher, fixtures) = fixtures();
    let mut group = c.benchmark_group("cfrag_verify_and_decrypt");
    group.throughput(Throughput::Elements(1));
    for (name, f) in &fixtures {
        let released = f.released();
        group.bench_with_input(
            BenchmarkId::from_parameter(label(name, f)),
            &released,
            |b, r| {
                b.iter(|| decrypt_released(&researcher, black_box(r), THRESHOLD).expect("decrypts"))
            },
        );
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! {
    name = crypto;
    config = config();
    targets = envelope_seal, umbral_primitives, reencrypt_batch_bench, cfrag_verify_and_decrypt
}
criterion_main!(crypto);
