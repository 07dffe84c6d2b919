//! Shared fixtures for the criterion benches (`benches/crypto.rs`) and the end-to-end
//! benchmark (`e2e-bench`): real research copies from the synthetic population, sealed
//! and delegated the way the broker's pipeline does it, and the measurement of the
//! per-envelope crypto floor.
//!
//! The floor is the umbral work that no implementation of the pipeline can avoid:
//!
//! - ingest: one `umbral_pre::encrypt` of the zstd-compressed research copy;
//! - release: `t` × `umbral_pre::reencrypt` (the proxies), `t` × `CapsuleFrag::verify`
//!   (the researcher) and one `umbral_pre::decrypt_reencrypted`.
//!
//! Everything else (compression, hashing, signatures on requests, gRPC, SQLite, blob
//! files, the broker's own check of every capsule fragment) is overhead over that floor.

use std::hint::black_box;
use std::time::{Duration, Instant};

use datasets::Population;
use model::CohortDefinition;
use pre_kms::reencrypt::ReleasedEnvelope;
use pre_kms::{Category, Identity, envelope};
use umbral_pre::{
    Capsule, CapsuleFrag, DefaultDeserialize, DefaultSerialize, PublicKey, SecretKey,
    VerifiedCapsuleFrag, VerifiedKeyFrag,
};

/// The categories the benchmark study requests (the demo study's four).
pub const STUDY_CATEGORIES: [Category; 4] = [
    Category::Demographics,
    Category::Conditions,
    Category::Observations,
    Category::Medications,
];

/// Threshold and share count of the embedded default (2-of-3 proxies).
pub const THRESHOLD: usize = pre_kms::grant::DEFAULT_THRESHOLD;
pub const SHARES: usize = pre_kms::grant::DEFAULT_SHARES;

/// The zstd level `pre_kms::envelope` compresses research copies with.
pub const ZSTD_LEVEL: i32 = 3;

/// Category plaintexts of patients `0, 1, 2, …` of `population`, in order, keeping the
/// categories `keep` accepts, until at least `want` are collected (or the population
/// runs out). Patients are independent draws, so the first ones are as representative
/// as any, and they are also the first ones the pipeline ingests.
pub fn sample_plaintexts(
    population: &Population,
    want: usize,
    keep: impl Fn(Category) -> bool,
) -> Vec<(Category, Vec<u8>)> {
    let mut out = Vec::with_capacity(want);
    for i in 0..population.len() {
        if out.len() >= want {
            break;
        }
        let record = population.patient(i);
        out.extend(record.categories.into_iter().filter(|(c, _)| keep(*c)));
    }
    out
}

/// One research copy, sealed to a fresh patient's category key and delegated to a
/// researcher with `SHARES` kfrags (threshold `THRESHOLD`), plus the `THRESHOLD`
/// capsule fragments a release would carry.
pub struct Fixture {
    pub category: Category,
    pub plaintext: Vec<u8>,
    /// The plaintext compressed as the envelope compresses it: what umbral encrypts.
    pub compressed: Vec<u8>,
    /// The envelope bytes (`PKE1` framing).
    pub sealed: Vec<u8>,
    pub capsule: Capsule,
    pub ciphertext: Box<[u8]>,
    /// The patient's category public key.
    pub delegating_key: PublicKey,
    /// The patient's signing public key (the kfrag signer).
    pub verifying_key: PublicKey,
    pub receiving_key: PublicKey,
    pub kfrags: Vec<VerifiedKeyFrag>,
    /// Re-encrypted with `kfrags[..THRESHOLD]`.
    pub cfrags: Vec<VerifiedCapsuleFrag>,
}

impl Fixture {
    pub fn new(researcher: &Identity, category: Category, plaintext: Vec<u8>) -> Fixture {
        let patient = Identity::generate();
        let delegating_key = patient.category_public_key(category);
        let receiving_key = researcher.encryption_public_key();
        let compressed = zstd::bulk::compress(&plaintext, ZSTD_LEVEL).expect("zstd compresses");
        let sealed = envelope::seal(&delegating_key, &plaintext).expect("envelope seals");
        let parsed = envelope::parse(&sealed).expect("envelope parses");
        let kfrags = umbral_pre::generate_kfrags(
            &patient.category_key(category),
            &receiving_key,
            &patient.signer(),
            THRESHOLD,
            SHARES,
            true,
            true,
        )
        .into_vec();
        let cfrags = kfrags[..THRESHOLD]
            .iter()
            .map(|k| umbral_pre::reencrypt(&parsed.capsule, k.clone()))
            .collect();
        Fixture {
            category,
            plaintext,
            compressed,
            sealed,
            capsule: parsed.capsule,
            ciphertext: parsed.ciphertext,
            delegating_key,
            verifying_key: patient.verifying_key(),
            receiving_key,
            kfrags,
            cfrags,
        }
    }

    /// The capsule fragments as they travel (unverified).
    pub fn unverified_cfrags(&self) -> Vec<CapsuleFrag> {
        self.cfrags.iter().map(|c| c.clone().unverify()).collect()
    }

    /// The envelope as a researcher receives it from the broker.
    pub fn released(&self) -> ReleasedEnvelope {
        ReleasedEnvelope {
            sealed: self.sealed.clone(),
            delegating_key: self.delegating_key,
            verifying_key: self.verifying_key,
            cfrags: self
                .cfrags
                .iter()
                .map(|c| c.to_bytes().expect("cfrag serializes").to_vec())
                .collect(),
        }
    }
}

/// Fixtures for many plaintexts, built across the rayon pool.
pub fn fixtures(researcher: &Identity, plaintexts: Vec<(Category, Vec<u8>)>) -> Vec<Fixture> {
    use rayon::prelude::*;
    plaintexts
        .into_par_iter()
        .map(|(c, p)| Fixture::new(researcher, c, p))
        .collect()
}

/// Single-threaded time of one call of each umbral operation on the floor, over real
/// envelopes.
#[derive(Debug, Clone, Copy)]
pub struct OpTimes {
    pub encrypt: Duration,
    pub reencrypt: Duration,
    pub verify: Duration,
    /// `decrypt_reencrypted` with `THRESHOLD` capsule fragments.
    pub decrypt: Duration,
    /// `Capsule::from_bytes`: umbral recomputes its parameters and re-verifies the
    /// capsule whenever it deserializes one.
    pub capsule_parse: Duration,
    /// `CapsuleFrag::from_bytes`.
    pub cfrag_parse: Duration,
    /// Wall time per envelope of the ingest floor's operations run on all rayon
    /// threads at once: what this machine's cores really give, against the
    /// single-thread time × cores of the floor.
    pub ingest_parallel: Duration,
    /// The same for the release floor's operations.
    pub release_parallel: Duration,
    pub ingest_envelopes: usize,
    pub release_envelopes: usize,
    pub passes: usize,
}

impl OpTimes {
    /// Per-envelope ingest floor: one encrypt.
    pub fn ingest_floor(&self) -> Duration {
        self.encrypt
    }

    /// Per-envelope release floor: `t` re-encryptions, `t` verifications by the
    /// researcher, one decryption.
    pub fn release_floor(&self) -> Duration {
        self.reencrypt * THRESHOLD as u32 + self.verify * THRESHOLD as u32 + self.decrypt
    }

    /// The release floor when each party receives its inputs as bytes, as they do:
    /// the `t` proxies and the researcher each deserialize the capsule, and the
    /// researcher the `t` fragments. The least umbral-pre 0.11 allows across a wire.
    pub fn release_wire_floor(&self) -> Duration {
        self.release_floor()
            + self.capsule_parse * (THRESHOLD as u32 + 1)
            + self.cfrag_parse * THRESHOLD as u32
    }

    /// What the broker's own check of the `t` capsule fragments costs per envelope.
    pub fn broker_verify(&self) -> Duration {
        self.verify * THRESHOLD as u32
    }
}

/// Median over `passes` of (time of one pass / operations in the pass).
fn per_op(passes: usize, ops_per_pass: usize, mut pass: impl FnMut()) -> Duration {
    pass(); // warm-up
    let mut times: Vec<Duration> = (0..passes.max(1))
        .map(|_| {
            let started = Instant::now();
            pass();
            started.elapsed() / ops_per_pass.max(1) as u32
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Measures the floor operations on this thread, in tight loops: encrypt over the
/// `ingest` fixtures (their compressed plaintexts), re-encrypt, verify and decrypt over
/// the `release` fixtures.
pub fn measure_ops(
    researcher: &Identity,
    ingest: &[Fixture],
    release: &[Fixture],
    passes: usize,
) -> OpTimes {
    let receiving_secret: SecretKey = researcher.encryption_key();
    let encrypt = per_op(passes, ingest.len(), || {
        for f in ingest {
            black_box(umbral_pre::encrypt(&f.delegating_key, &f.compressed).expect("encrypts"));
        }
    });
    let reencrypt = per_op(passes, release.len() * THRESHOLD, || {
        for f in release {
            for k in &f.kfrags[..THRESHOLD] {
                black_box(umbral_pre::reencrypt(&f.capsule, k.clone()));
            }
        }
    });
    let unverified: Vec<Vec<CapsuleFrag>> =
        release.iter().map(Fixture::unverified_cfrags).collect();
    let verify = per_op(passes, release.len() * THRESHOLD, || {
        for (f, cfrags) in release.iter().zip(&unverified) {
            for c in cfrags {
                let ok = c.clone().verify(
                    &f.capsule,
                    &f.verifying_key,
                    &f.delegating_key,
                    &f.receiving_key,
                );
                black_box(ok.expect("cfrag verifies"));
            }
        }
    });
    let decrypt = per_op(passes, release.len(), || {
        for f in release {
            let plain = umbral_pre::decrypt_reencrypted(
                &receiving_secret,
                &f.delegating_key,
                &f.capsule,
                f.cfrags.iter().cloned(),
                &f.ciphertext,
            );
            black_box(plain.expect("decrypts"));
        }
    });
    let capsule_bytes: Vec<Vec<u8>> = release
        .iter()
        .map(|f| pre_kms::sealed::capsule_bytes(&f.capsule))
        .collect();
    let capsule_parse = per_op(passes, release.len(), || {
        for b in &capsule_bytes {
            black_box(Capsule::from_bytes(b).expect("capsule parses"));
        }
    });
    let cfrag_bytes: Vec<Vec<u8>> = release.iter().flat_map(|f| f.released().cfrags).collect();
    let cfrag_parse = per_op(passes, cfrag_bytes.len(), || {
        for b in &cfrag_bytes {
            black_box(CapsuleFrag::from_bytes(b).expect("cfrag parses"));
        }
    });
    let ingest_parallel = per_op(passes, ingest.len(), || {
        use rayon::prelude::*;
        ingest.par_iter().for_each(|f| {
            black_box(umbral_pre::encrypt(&f.delegating_key, &f.compressed).expect("encrypts"));
        });
    });
    let release_parallel = per_op(passes, release.len(), || {
        use rayon::prelude::*;
        release.par_iter().for_each(|f| {
            let verified: Vec<_> = f.kfrags[..THRESHOLD]
                .iter()
                .map(|k| umbral_pre::reencrypt(&f.capsule, k.clone()).unverify())
                .map(|c| {
                    c.verify(
                        &f.capsule,
                        &f.verifying_key,
                        &f.delegating_key,
                        &f.receiving_key,
                    )
                    .expect("cfrag verifies")
                })
                .collect();
            let plain = umbral_pre::decrypt_reencrypted(
                &receiving_secret,
                &f.delegating_key,
                &f.capsule,
                verified,
                &f.ciphertext,
            );
            black_box(plain.expect("decrypts"));
        });
    });
    OpTimes {
        encrypt,
        reencrypt,
        verify,
        decrypt,
        capsule_parse,
        cfrag_parse,
        ingest_parallel,
        release_parallel,
        ingest_envelopes: ingest.len(),
        release_envelopes: release.len(),
        passes,
    }
}

/// The concept relations (ancestor, descendant) the definitions expand through: diabetes
/// mellitus → type 2, type 1.
pub const CONCEPT_RELATIONS: [(&str, &str); 2] = [
    ("snomed:73211009", "snomed:44054006"),
    ("snomed:73211009", "snomed:46635009"),
];

/// The five cohort definitions every cohort benchmark times (`cohort-bench` on the engine,
/// `service-bench` through the server), by name.
pub fn definitions() -> Vec<(&'static str, CohortDefinition)> {
    let d = |json: &str| CohortDefinition::from_json(json.as_bytes()).expect("valid definition");
    vec![
        (
            "a_simple_code",
            d(r#"{"criteria": [{"condition": {"codes": ["snomed:44054006"]}}]}"#),
        ),
        (
            "b_age_sex_condition",
            d(r#"{"index": {"date": "2024-01-01"}, "criteria": [
                {"demographics": {"sex": ["female"], "age": {"min": 40, "max": 65}}},
                {"condition": {"codes": ["snomed:38341003"]}}]}"#),
        ),
        (
            "c_condition_lab_window",
            d(r#"{"criteria": [
                {"condition": {"codes": ["snomed:73211009"], "include_descendants": true}},
                {"measurement": {"codes": ["loinc:4548-4"], "value": {"min": 7.0}, "unit": "%",
                    "window": {"between": {"from": "2020-01-01", "to": "2023-12-31"}}}}]}"#),
        ),
        (
            "d_exclusion",
            d(r#"{"criteria": [
                {"condition": {"codes": ["snomed:44054006"]}},
                {"not": {"drug": {"codes": ["rxnorm:860975"]}}}]}"#),
        ),
        (
            "e_at_least_2_of_3",
            d(r#"{"criteria": [{"at_least": {"n": 2, "of": [
                {"condition": {"codes": ["snomed:38341003"]}},
                {"condition": {"codes": ["snomed:55822004"]}},
                {"measurement": {"codes": ["loinc:39156-5"], "value": {"min": 30.0}}}]}}]}"#),
        ),
    ]
}

/// The peak resident set of process `pid` (`"self"`: this one) in MiB, from
/// `/proc/PID/status` (`VmHWM`); `None` where there is no such file.
pub fn peak_rss_mib(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_round_trips_through_decrypt_released() {
        let researcher = Identity::generate();
        let sample =
            sample_plaintexts(&Population::new(1, 3), 2, |c| STUDY_CATEGORIES.contains(&c));
        assert!(sample.len() >= 2);
        for f in fixtures(&researcher, sample) {
            let out = pre_kms::reencrypt::decrypt_released(&researcher, &f.released(), THRESHOLD)
                .unwrap();
            assert_eq!(out, f.plaintext);
            assert!(STUDY_CATEGORIES.contains(&f.category));
        }
    }

    #[test]
    fn op_times_add_up() {
        let researcher = Identity::generate();
        let f = fixtures(
            &researcher,
            sample_plaintexts(&Population::new(2, 2), 1, |_| true),
        );
        let t = measure_ops(&researcher, &f, &f, 1);
        assert_eq!(
            t.release_floor(),
            t.reencrypt * 2 + t.verify * 2 + t.decrypt
        );
        assert_eq!(t.broker_verify(), t.verify * 2);
    }
}
