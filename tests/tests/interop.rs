//! Another umbral-pre 0.11 implementation decrypts a release from the documented bytes:
//! the PyPI package runs docs/examples/decrypt_release.py on a real release.
//!
//! Needs a Python with `docs/examples/requirements.txt` installed, named by
//! `BROKER_INTEROP_PYTHON`; `.ci/run` makes one. Without it the test says so and
//! returns: the Rust-only test command must work with only the Rust toolchain.

use std::path::PathBuf;

use brokerctl::agent;
use datasets::Population;
use integration_tests::Sandbox;
use model::CohortDefinition;
use pre_kms::{Category, Identity};
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pypi_umbral_package_decrypts_a_release() {
    let Some(python) = std::env::var_os("BROKER_INTEROP_PYTHON") else {
        eprintln!(
            "BROKER_INTEROP_PYTHON is not set: the cross-implementation check did not run (.ci/run runs it)"
        );
        return;
    };
    let sandbox = Sandbox::start().await;
    let cast = sandbox.cast().await;
    let population = Population::new(11, 5);
    let patients: Vec<_> = (0..5)
        .map(|i| (Identity::generate(), population.patient(i)))
        .collect();
    agent::ingest_batch(&cast.custodian, patients.clone())
        .await
        .unwrap();
    let ids: Vec<Identity> = patients.iter().map(|(id, _)| id.clone()).collect();
    cast.consent_broadly(&ids).await.unwrap();
    let categories = vec![Category::Conditions, Category::Observations];
    let study = cast
        .approved_study("interop", &categories, CohortDefinition::everyone())
        .await
        .unwrap();
    let granting: Vec<_> = patients
        .iter()
        .map(|(id, _)| (id.clone(), categories.clone()))
        .collect();
    cast.grant_all(&study, &granting, 100, |_| {})
        .await
        .unwrap();
    let researcher = &cast.researcher;

    // The raw release, as received, in hex JSON lines.
    let release = researcher.request_release(&study.study_id).await.unwrap();
    let mut stream = researcher.fetch_release(&release.release_id).await.unwrap();
    let mut lines = String::new();
    while let Some(item) = stream.next().await {
        let item = item.unwrap();
        let line = serde_json::json!({
            "subject": item.subject, "category": item.category, "version": item.version,
            "sealed": hex::encode(&item.sealed), "delegating_key": hex::encode(&item.delegating_key),
            "verifying_key": hex::encode(&item.verifying_key),
            "cfrags": item.cfrags.iter().map(hex::encode).collect::<Vec<_>>(),
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("researcher.key");
    researcher
        .identity()
        .write_key_file(&key, "researcher")
        .unwrap();
    let bundle = dir.path().join("release.jsonl");
    std::fs::write(&bundle, lines).unwrap();
    let out = dir.path().join("out");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/decrypt_release.py");
    let run = std::process::Command::new(python)
        .arg(script)
        .arg(&key)
        .arg(&bundle)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "python: {}",
        String::from_utf8_lossy(&run.stderr)
    );

    // Byte for byte the research copies the custodian sealed.
    let mut want: Vec<[u8; 32]> = patients
        .iter()
        .flat_map(|(_, r)| r.categories.iter())
        .filter(|(c, _)| categories.contains(c))
        .map(|(_, p)| *blake3::hash(p).as_bytes())
        .collect();
    let mut got: Vec<[u8; 32]> = integration_tests::files_under(&out)
        .iter()
        .map(|f| *blake3::hash(&std::fs::read(f).unwrap()).as_bytes())
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got.len() as u32, release.envelopes);
    assert_eq!(got, want);
    sandbox.stop().await;
}
