//! The whole flow as a user runs it: `broker serve` as a process, every role through
//! `brokerctl`, on the Synthea FHIR bundles in ../shared/data. Also: a re-import is
//! idempotent, the data directory holds no identifier, a killed server restarts with
//! nothing lost, and bad input and wrong roles get clear errors. And an OMOP CDM import
//! (OHDSI Eunomia) whose counts, through the broker, equal plain SQL over its tables.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[path = "../../tests/src/hostile.rs"]
mod hostile;
#[path = "../../tests/src/scan.rs"]
mod scan;

mod support;
use support::*;

fn fetched_hashes(out: &Path) -> BTreeSet<String> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let bytes = std::fs::read(out.join(f["file"].as_str().unwrap())).unwrap();
            let bundle: serde_json::Value =
                serde_json::from_slice(&bytes).expect("decrypted records are JSON");
            assert_eq!(bundle["resourceType"], "Bundle");
            blake3::hash(&bytes).to_hex().to_string()
        })
        .collect()
}

#[test]
fn every_role_through_brokerctl_on_synthea_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let [operator, custodian, sponsor, board, researcher] = keys(d);
    let keystore = d.join("custodian-keystore.db");
    let keystore = keystore.to_str().unwrap();

    let server = serve(&data, Path::new(&public(&operator)));
    let ctl = Ctl::new(&server.url, &data);
    register(&ctl, &operator, [&custodian, &sponsor, &board, &researcher]);
    ctl.pin_network(&operator, &board, &data);
    let who = ctl.json(&researcher, &["whoami"]);
    assert_eq!(who["name"], "researcher");

    // Import as the custodian; a second import stores nothing new.
    let src = synthea();
    let src = src.to_str().unwrap();
    let first = ctl.import_fhir(&custodian, src, keystore);
    assert_eq!(first["patients"], 10, "{first}");
    assert_eq!(first["errors"], 0, "{first}");
    assert!(first["envelopes_stored"].as_u64().unwrap() >= 40, "{first}");
    let second = ctl.import_fhir(&custodian, src, keystore);
    assert_eq!(
        second["envelopes_stored"], 0,
        "re-import is idempotent: {second}"
    );
    assert_eq!(second["envelopes_unchanged"], first["envelopes_stored"]);
    assert_eq!(second["new_keys"], 0);

    // Study: proposed, approved, granted, fetched and decrypted.
    let categories = "demographics,conditions,observations,medications";
    let study_id = ctl.propose(&sponsor, "Synthea cohort", categories, &researcher, &[]);
    let denied = ctl.fails(&sponsor, &["board", "study", "approve", &study_id]);
    assert!(denied.contains("permission denied"), "{denied}");
    ctl.ok(
        &board,
        &["board", "study", "approve", &study_id, "--reason", "IRB-42"],
    );
    let listed = ctl.json(&board, &["board", "study", "list"]);
    assert_eq!(listed[0]["status"], "approved");
    // Without consent, nothing is granted; with the broad preset, every patient grants.
    let none = ctl.json(
        &custodian,
        &[
            "custodian",
            "grant",
            "--study",
            &study_id,
            "--keystore",
            keystore,
        ],
    );
    assert_eq!(none["grants"], 0, "{none}");
    assert_eq!(none["not_permitted"], 10, "{none}");
    let consents = ctl.json(
        &custodian,
        &["custodian", "consent", "--keystore", keystore, "--broad"],
    );
    assert_eq!(consents["consents"], 10, "{consents}");
    let granted = ctl.json(
        &custodian,
        &[
            "custodian",
            "grant",
            "--study",
            &study_id,
            "--keystore",
            keystore,
        ],
    );
    assert_eq!(granted["grants"], 10);
    // Without --study: every approved study in its period (re-granting supersedes).
    let synced = ctl.json(&custodian, &["custodian", "grant", "--keystore", keystore]);
    assert_eq!(synced[0]["study"], study_id.as_str(), "{synced}");
    assert_eq!(synced[0]["grants"], 10, "{synced}");
    let out = d.join("release");
    let fetched = ctl.fetch(&researcher, &study_id, &out);
    assert_eq!(fetched["subjects"], 10, "{fetched}");
    assert_secrets_owner_only(
        &data,
        Path::new(keystore),
        &[&operator, &custodian, &sponsor, &board, &researcher],
        &out,
    );

    // What was decrypted is exactly the research copy the importer made.
    let report = datasets::import_path(&synthea(), &datasets::DeidConfig::default());
    let want: BTreeSet<String> = report
        .patients
        .iter()
        .flat_map(|p| p.categories.iter())
        .filter(|(c, _)| categories.split(',').any(|x| x == c.label()))
        .map(|(_, bytes)| blake3::hash(bytes).to_hex().to_string())
        .collect();
    let got = fetched_hashes(&out);
    assert_eq!(got, want);

    // No name, street address or identifier anywhere in the broker's data directory.
    let needles: Vec<String> = report
        .patients
        .iter()
        .flat_map(|p| p.identifiers.clone())
        .filter(|s| s.len() >= 4)
        .collect();
    assert!(
        needles.len() >= 30,
        "identifiers to look for: {}",
        needles.len()
    );
    let hits = scan::scan_for(&data, &needles);
    assert!(hits.is_empty(), "found in the data directory: {hits:?}");

    // The access log: the board verifies it and reads it; a patient whose keys the
    // custodian keeps sees their own accesses and is alerted to the release.
    let verified = ctl.json(&board, &["board", "log", "verify", "--cosign"]);
    let size_before_crash = verified["size"].as_u64().unwrap();
    assert_eq!(
        verified["leaves_recomputed"], verified["size"],
        "{verified}"
    );
    assert_eq!(verified["cosignatures"], 2, "{verified}");
    let releases = ctl.json(
        &board,
        &[
            "board", "log", "show", "--kind", "release", "--study", &study_id,
        ],
    );
    assert_eq!(releases.as_array().unwrap().len(), 10, "{releases}");
    let fhir = d.join("audit.ndjson");
    ctl.ok(
        &board,
        &[
            "board",
            "log",
            "export",
            "--format",
            "fhir",
            "--out",
            fhir.to_str().unwrap(),
        ],
    );
    let exported = std::fs::read_to_string(&fhir).unwrap();
    // 10 enrolments, 10 uploads (the re-import changed nothing), the proposal, the
    // sponsor's refused approval, the approval, 10 consents, 2 x 10 grants, 10 releases,
    // 1 fetch.
    assert_eq!(exported.lines().count(), 64, "{exported}");
    assert!(
        exported
            .lines()
            .all(|l| l.contains("\"resourceType\":\"AuditEvent\""))
    );
    let someone = report.patients[0].source_id.clone();
    let as_patient = ["--keystore", keystore, "--patient", someone.as_str()];
    let mine = ctl.json(
        &custodian,
        &[&["patient", "accesses"][..], &as_patient].concat(),
    );
    let kinds: BTreeSet<String> = mine
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(
            ["enroll", "upload", "consent_set", "grant_issued", "release"].map(String::from)
        ),
        "{mine}"
    );
    let alerts_cmd = [&["patient", "alerts"][..], &as_patient].concat();
    let alerts = ctl.json(&custodian, &[&alerts_cmd[..], &["--ack"]].concat());
    assert_eq!(alerts.as_array().unwrap().len(), 1, "{alerts}");
    let alerts = ctl.json(&custodian, &alerts_cmd);
    assert_eq!(
        alerts.as_array().unwrap().len(),
        0,
        "read once acknowledged"
    );

    // Crash (SIGKILL) and restart on the same data directory: the release still works.
    let first_log = server.log.lock().unwrap().clone();
    let first_errors = ctl.errors.borrow().clone();
    drop(server);
    let server = serve(&data, Path::new(&public(&operator)));
    let ctl = Ctl::new(&server.url, &data);
    *ctl.network.borrow_mut() = Some(data.with_file_name("network.json"));
    let out2 = d.join("release-after-restart");
    let again = ctl.fetch(&researcher, &study_id, &out2);
    assert_eq!(again["subjects"], 10);
    assert_eq!(fetched_hashes(&out2), want);
    // A patient revokes: their grant is withdrawn and the next release leaves them out.
    let shown = ctl.json(
        &custodian,
        &[&["patient", "consent", "show"][..], &as_patient].concat(),
    );
    assert_eq!(shown["version"], 1, "{shown}");
    let revoked = ctl.json(
        &custodian,
        &[&["patient", "consent", "revoke"][..], &as_patient].concat(),
    );
    assert_eq!(revoked["version"], 2, "{revoked}");
    assert_eq!(revoked["grants_withdrawn"], 1, "{revoked}");
    let history = ctl.json(
        &custodian,
        &[&["patient", "consent", "history"][..], &as_patient].concat(),
    );
    assert_eq!(history.as_array().unwrap().len(), 2, "{history}");
    let out3 = d.join("release-after-revocation");
    let after = ctl.fetch(&researcher, &study_id, &out3);
    assert_eq!(after["subjects"], 9, "{after}");
    // A FHIR Consent that opts out maps onto a policy that shares nothing.
    let out_fhir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/fhir-r4-examples/Consent-consent-example-Out.json");
    let other = report.patients[1].source_id.clone();
    let opted_out = ctl.json(
        &custodian,
        &[
            "patient",
            "consent",
            "set",
            "--fhir",
            out_fhir.to_str().unwrap(),
            "--keystore",
            keystore,
            "--patient",
            &other,
        ],
    );
    assert_eq!(opted_out["grants_withdrawn"], 1, "{opted_out}");
    let bad = d.join("bad-policy.json");
    std::fs::write(
        &bad,
        r#"{"provisions": [{"effect": "permit", "data_use": ["XYZ"]}]}"#,
    )
    .unwrap();
    let err = ctl.fails(
        &custodian,
        &[
            "patient",
            "consent",
            "set",
            bad.to_str().unwrap(),
            "--keystore",
            keystore,
            "--patient",
            &other,
        ],
    );
    assert!(err.contains("XYZ"), "{err}");

    // The log survived the crash and still extends what the board saw before it.
    let verified = ctl.json(&board, &["board", "log", "verify"]);
    assert_eq!(verified["previous_size"], size_before_crash, "{verified}");
    assert!(verified["size"].as_u64().unwrap() > size_before_crash);

    // Bad input gets a clear error.
    let garbage = d.join("garbage.key");
    std::fs::write(&garbage, "not a key").unwrap();
    let err = ctl.fails(&garbage, &["whoami"]);
    assert!(err.contains("not a pre-kms secret key file"), "{err}");
    let err = ctl.fails(Path::new(&public(&researcher)), &["whoami"]);
    assert!(err.contains("public key file"), "{err}");
    let stranger = keygen(d, "patient");
    let err = ctl.fails(&stranger, &["whoami"]);
    assert!(err.contains("not registered"), "{err}");
    let err = ctl.fails(
        &researcher,
        &[
            "researcher",
            "fetch",
            "--study",
            "st-nope",
            "--out",
            d.join("x").to_str().unwrap(),
        ],
    );
    assert!(err.contains("not found"), "{err}");
    let missing = d.join("missing");
    let err = ctl.fails(
        &custodian,
        &[
            "import",
            "fhir",
            missing.to_str().unwrap(),
            "--keystore",
            keystore,
        ],
    );
    assert!(err.contains("does not exist"), "{err}");

    // Neither the server's debug log nor any error brokerctl printed names a patient.
    let log = format!("{first_log}{}", server.log.lock().unwrap());
    assert!(log.contains("release fixed"), "the server log was captured");
    // A log written to a pipe is plain text: no terminal colour codes.
    assert!(
        !log.contains('\u{1b}'),
        "the server's piped log carries escape codes"
    );
    let said = format!("{log}{first_errors}{}", ctl.errors.borrow()).to_lowercase();
    let leaked: Vec<&String> = needles
        .iter()
        .filter(|n| said.contains(&n.to_lowercase()))
        .collect();
    assert!(
        leaked.is_empty(),
        "identifiers in logs or error messages: {leaked:?}"
    );

    // Offline, on the stopped broker's directory, the operator's check passes.
    drop(server);
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["log-verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(said.contains("access log verified"), "{said}");
}

/// Proxies as separate processes: `broker init` makes the broker's identity, three
/// `broker proxy` nodes trust it, `broker serve --proxy-url` uses them, and a release
/// flows through them.
#[test]
fn a_release_through_three_proxy_processes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let out = Command::new(BROKER)
        .args(["init", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let broker_pub = data.join("broker.pub");
    assert!(String::from_utf8_lossy(&out.stdout).contains("broker.pub"));
    let proxies: Vec<Server> = (0..3)
        .map(|i| {
            let args: Vec<std::ffi::OsString> = vec![
                "proxy".into(),
                "--dir".into(),
                d.join(format!("proxy{i}")).into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--broker-key".into(),
                broker_pub.clone().into(),
                "--index".into(),
                i.to_string().into(),
            ];
            spawn(&args, &format!("proxy {i} listening on "))
        })
        .collect();
    let [operator, custodian, sponsor, board, researcher] = keys(d);
    let mut args: Vec<std::ffi::OsString> =
        vec!["serve".into(), "--listen".into(), "127.0.0.1:0".into()];
    args.extend([
        "--data-dir".into(),
        data.clone().into(),
        "--operator".into(),
        public(&operator).into(),
    ]);
    for (i, p) in proxies.iter().enumerate() {
        args.extend(["--proxy-url".into(), p.url.clone().into()]);
        let cert = d.join(format!("proxy{i}")).join("tls.crt");
        args.extend(["--proxy-cert".into(), cert.into()]);
    }
    let server = spawn(&args, "broker listening on ");
    let ctl = Ctl::new(&server.url, &data);
    register(&ctl, &operator, [&custodian, &sponsor, &board, &researcher]);
    ctl.pin_network(&operator, &board, &data);
    let keystore = d.join("keystore.db");
    let keystore = keystore.to_str().unwrap();
    let src = synthea();
    let imported = ctl.import_fhir(&custodian, src.to_str().unwrap(), keystore);
    assert_eq!(imported["patients"], 10);
    let study_id = ctl.propose(&sponsor, "External proxies", "conditions", &researcher, &[]);
    ctl.ok(&board, &["board", "study", "approve", &study_id]);
    ctl.json(
        &custodian,
        &["custodian", "consent", "--keystore", keystore, "--broad"],
    );
    ctl.json(
        &custodian,
        &[
            "custodian",
            "grant",
            "--study",
            &study_id,
            "--keystore",
            keystore,
        ],
    );
    let release = d.join("release");
    let fetched = ctl.fetch(&researcher, &study_id, &release);
    assert_eq!(fetched["subjects"], 10, "{fetched}");
    // The release went through the proxy processes: each holds the kfrags it verified.
    for (i, p) in proxies.iter().enumerate() {
        assert!(p.url.starts_with("https://127.0.0.1:"), "{}", p.url);
        let db = rusqlite::Connection::open(d.join(format!("proxy{i}")).join("proxy.db")).unwrap();
        let kfrags: i64 = db
            .query_row("SELECT COUNT(*) FROM kfrags", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kfrags, 10, "proxy {i} holds one verified kfrag per patient");
    }
    drop(server);
    drop(proxies);
}

/// One number from plain DataFusion SQL over Eunomia's raw Parquet files.
fn eunomia_sql(sql: &str) -> i64 {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::{DataType, Int64Type};
    use datafusion::prelude::{ParquetReadOptions, SessionContext};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let ctx = SessionContext::new();
        for table in [
            "condition_occurrence",
            "concept",
            "concept_ancestor",
            "person",
            "death",
        ] {
            let path = eunomia().join(format!("{table}.parquet"));
            ctx.register_parquet(table, path.to_str().unwrap(), ParquetReadOptions::default())
                .await
                .unwrap();
        }
        let batches = ctx
            .sql(sql)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{sql}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}\n{sql}"));
        let batch = batches.iter().find(|b| b.num_rows() > 0).expect("a row");
        let value = cast(batch.column(0), &DataType::Int64).unwrap();
        value.as_primitive::<Int64Type>().value(0)
    })
}

#[test]
fn omop_import_through_brokerctl_counts_like_plain_sql() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let [operator, custodian, sponsor, board, researcher] = keys(d);
    let keystore = d.join("keystore.db");
    let keystore = keystore.to_str().unwrap();
    let server = serve(&d.join("data"), Path::new(&public(&operator)));
    let ctl = Ctl::new(&server.url, &d.join("data"));
    register(&ctl, &operator, [&custodian, &sponsor, &board, &researcher]);
    ctl.pin_network(&operator, &board, &d.join("data"));

    let src = eunomia();
    let import = || {
        ctl.json(
            &custodian,
            &[
                "import",
                "omop",
                src.to_str().unwrap(),
                "--keystore",
                keystore,
            ],
        )
    };
    let imported = import();
    assert_eq!(imported["patients"], 2_694, "{imported}");
    assert_eq!(
        imported["rows"]["condition_occurrence"], 65_332,
        "{imported}"
    );
    let relations = imported["concept_relations_held"].as_u64().unwrap();
    assert!(relations > 0, "{imported}");
    assert_eq!(imported["concept_relations_added"], relations, "{imported}");
    // Relations are idempotent: a second upload through a re-import adds none.
    let again = import();
    assert_eq!(again["envelopes_stored"], 0, "{again}");
    assert_eq!(again["concept_relations_added"], 0, "{again}");
    assert_eq!(again["concept_relations_held"], relations, "{again}");
    let consents = ctl.json(
        &custodian,
        &["custodian", "consent", "--keystore", keystore, "--broad"],
    );
    assert_eq!(consents["consents"], 2_694, "{consents}");

    let study_id = ctl.propose(
        &sponsor,
        "GI bleeding",
        "conditions",
        &researcher,
        &["--fields", "condition"],
    );
    ctl.ok(
        &board,
        &["board", "study", "approve", &study_id, "--reason", "IRB-7"],
    );

    // The SNOMED condition concept whose descendants (through concept_ancestor) add the
    // most patients beyond the concept itself: descendant expansion must show.
    // Safe Harbor: a person over 89 (at death, or this year) has no row dated before the
    // year that makes them 90, nor anyone a row before their birth year.
    let this_year = datasets::DeidConfig::this_year().reference_year;
    let people = |concepts: &str| {
        format!(
            "SELECT COUNT(DISTINCT CAST(co.person_id AS BIGINT)) FROM condition_occurrence co \
             JOIN concept c ON CAST(c.concept_id AS BIGINT) = CAST(co.condition_concept_id AS BIGINT) \
             JOIN (SELECT CAST(p.person_id AS BIGINT) AS pid, CAST(p.year_of_birth AS BIGINT) AS born, \
                          LEAST(COALESCE(MIN(CAST(date_part('year', d.death_date) AS BIGINT)), {this_year}), {this_year}) AS age_year \
                   FROM person p LEFT JOIN death d ON CAST(d.person_id AS BIGINT) = CAST(p.person_id AS BIGINT) \
                   GROUP BY 1, 2) a ON a.pid = CAST(co.person_id AS BIGINT) \
             WHERE c.vocabulary_id = 'SNOMED' AND CAST(co.condition_concept_id AS BIGINT) IN ({concepts}) \
               AND CAST(date_part('year', co.condition_start_date) AS BIGINT) >= \
                   CASE WHEN a.age_year - a.born > 89 THEN a.age_year - 90 ELSE a.born END"
        )
    };
    let ancestor = eunomia_sql(
        "SELECT CAST(ca.ancestor_concept_id AS BIGINT) FROM concept_ancestor ca \
         JOIN condition_occurrence co \
           ON CAST(co.condition_concept_id AS BIGINT) = CAST(ca.descendant_concept_id AS BIGINT) \
         JOIN concept c ON CAST(c.concept_id AS BIGINT) = CAST(ca.ancestor_concept_id AS BIGINT) \
         WHERE c.vocabulary_id = 'SNOMED' \
           AND CAST(ca.ancestor_concept_id AS BIGINT) <> CAST(ca.descendant_concept_id AS BIGINT) \
           AND CAST(ca.ancestor_concept_id AS BIGINT) <> CAST(co.condition_concept_id AS BIGINT) \
         GROUP BY CAST(ca.ancestor_concept_id AS BIGINT) \
         ORDER BY COUNT(DISTINCT CAST(co.person_id AS BIGINT)) DESC, 1 LIMIT 1",
    );
    let code = eunomia_sql(&format!(
        "SELECT CAST(concept_code AS BIGINT) FROM concept WHERE CAST(concept_id AS BIGINT) = {ancestor}"
    ));
    let with_descendants = eunomia_sql(&people(&format!(
        "SELECT CAST(descendant_concept_id AS BIGINT) FROM concept_ancestor \
         WHERE CAST(ancestor_concept_id AS BIGINT) = {ancestor} UNION SELECT {ancestor}"
    )));
    let alone = eunomia_sql(&people(&ancestor.to_string()));
    assert!(with_descendants > alone, "{with_descendants} vs {alone}");

    let count = |key: &Path, descendants: bool| {
        let definition = d.join(format!("cohort-{descendants}.json"));
        std::fs::write(
            &definition,
            format!(
                r#"{{"criteria": [{{"condition": {{"codes": ["snomed:{code}"], "include_descendants": {descendants}}}}}]}}"#
            ),
        )
        .unwrap();
        ctl.json(
            key,
            &[
                if key == board.as_path() {
                    "board"
                } else {
                    "sponsor"
                },
                "count",
                "--study",
                &study_id,
                "--definition",
                definition.to_str().unwrap(),
            ],
        )
    };
    let exact = count(&board, true);
    assert_eq!(exact["exact"], true, "{exact}");
    assert_eq!(exact["count"], with_descendants.to_string(), "{exact}");
    let exact = count(&board, false);
    assert_eq!(exact["count"], alone.to_string(), "{exact}");
    // The sponsor's answer is protected: a multiple of 5 near the exact count, or <11.
    let protected = count(&sponsor, true);
    assert_eq!(protected["exact"], false, "{protected}");
    let shown = protected["count"].as_str().unwrap();
    if with_descendants >= 11 {
        let n: i64 = shown.parse().unwrap_or_else(|_| panic!("{protected}"));
        assert_eq!(n % 5, 0, "{protected}");
        assert!((n - with_descendants).abs() <= 8, "{protected}");
    } else {
        assert_eq!(shown, "<11", "{protected}");
    }
}

/// A crash between storing an upload and logging it, or between storing a consent change
/// and withdrawing the grants it no longer permits, loses neither: at the next start the
/// events are logged and the withdrawals done.
#[test]
fn a_crash_leaves_no_stored_record_unlogged_and_no_withdrawal_undone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let [operator, custodian, sponsor, board, researcher] = keys(d);
    let keystore_path = d.join("keystore.db");
    let keystore = keystore_path.to_str().unwrap();
    let op_pub = public(&operator);
    let server = serve(&data, Path::new(&op_pub));
    let ctl = Ctl::new(&server.url, &data);
    register(&ctl, &operator, [&custodian, &sponsor, &board, &researcher]);
    ctl.pin_network(&operator, &board, &data);
    drop(ctl);
    drop(server);
    let db = || {
        let c = rusqlite::Connection::open(data.join("broker.db")).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    };
    let count = |sql: &str| -> i64 { db().query_row(sql, [], |r| r.get(0)).unwrap() };

    // The import's upload commits, then the broker dies before the log append.
    let mut server = serve_armed(
        &data,
        Path::new(&op_pub),
        Some(broker::crash::UPLOAD_AFTER_COMMIT),
    );
    let ctl = Ctl::new(&server.url, &data);
    let src = synthea();
    let out = ctl.run(
        &custodian,
        &[
            "import",
            "fhir",
            src.to_str().unwrap(),
            "--keystore",
            keystore,
        ],
    );
    assert!(!out.status.success(), "the import saw the broker die");
    assert!(
        !server.child.wait().unwrap().success(),
        "the broker aborted"
    );
    let stored = count("SELECT COUNT(DISTINCT pseudonym) FROM envelopes");
    assert_eq!(stored, 10, "the upload was committed");
    drop(ctl);

    // At the next start, every stored patient's upload is in the log, once.
    let server = serve(&data, Path::new(&op_pub));
    let ctl = Ctl::new(&server.url, &data);
    *ctl.network.borrow_mut() = Some(data.with_file_name("network.json"));
    let uploads = ctl.json(&board, &["board", "log", "show", "--kind", "upload"]);
    assert_eq!(uploads.as_array().unwrap().len(), 10, "{uploads}");
    assert_eq!(count("SELECT COUNT(*) FROM log_intents"), 0);
    // The re-import finds everything stored: nothing new, nothing logged twice.
    let again = ctl.import_fhir(&custodian, src.to_str().unwrap(), keystore);
    assert_eq!(again["envelopes_stored"], 0, "{again}");
    let uploads = ctl.json(&board, &["board", "log", "show", "--kind", "upload"]);
    assert_eq!(uploads.as_array().unwrap().len(), 10, "{uploads}");

    // Grants for a study, then a patient revokes and the broker dies before withdrawing.
    let study_id = ctl.propose(&sponsor, "Crash", "conditions", &researcher, &[]);
    ctl.ok(&board, &["board", "study", "approve", &study_id]);
    ctl.json(
        &custodian,
        &["custodian", "consent", "--keystore", keystore, "--broad"],
    );
    let granted = ctl.json(
        &custodian,
        &[
            "custodian",
            "grant",
            "--study",
            &study_id,
            "--keystore",
            keystore,
        ],
    );
    assert_eq!(granted["grants"], 10, "{granted}");
    drop(ctl);
    drop(server);
    let mut server = serve_armed(
        &data,
        Path::new(&op_pub),
        Some(broker::crash::CONSENT_BEFORE_WITHDRAWAL),
    );
    let ctl = Ctl::new(&server.url, &data);
    let patient: String = rusqlite::Connection::open(&keystore_path)
        .unwrap()
        .query_row(
            "SELECT source_id FROM patients ORDER BY source_id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let out = ctl.run(
        &custodian,
        &[
            "patient",
            "consent",
            "revoke",
            "--keystore",
            keystore,
            "--patient",
            &patient,
        ],
    );
    assert!(!out.status.success(), "the revocation saw the broker die");
    assert!(
        !server.child.wait().unwrap().success(),
        "the broker aborted"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM grants"),
        10,
        "stored, not yet withdrawn"
    );
    drop(ctl);

    // At the next start the withdrawal is done, at the broker and at every proxy.
    let _server = serve(&data, Path::new(&op_pub));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while count("SELECT COUNT(*) FROM grants") != 9
        || count("SELECT COUNT(*) FROM pending_revocations") != 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the withdrawal was not redone"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 0..3 {
        let kfrags: i64 = rusqlite::Connection::open(data.join(format!("proxies/{i}/proxy.db")))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM kfrags", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kfrags, 9, "proxy {i}");
    }
}

/// `brokerctl researcher fetch` from a broker that names subjects like paths fails
/// clearly and writes nothing, inside `--out` or outside it.
#[test]
fn researcher_fetch_writes_nothing_where_a_hostile_broker_points() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let researcher = keygen(d, "researcher");
    let escape = d.join("escaped");
    let absolute = format!("{}", d.join("absolute").display());
    for subject in ["../escaped", absolute.as_str(), "x/../../escaped", ".."] {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = rt.spawn(
            tonic::transport::Server::builder()
                .add_service(broker_proto::v1::releases_server::ReleasesServer::new(
                    hostile::HostileReleases::with_subjects(&[subject]),
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let out = d.join("out");
        let o = Command::new(brokerctl())
            .args(["researcher", "fetch", "--study", "st-x", "--out"])
            .arg(&out)
            .args(["--broker", &url, "--insecure-loopback", "--key"])
            .arg(&researcher)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{subject:?}");
        assert!(err.contains("not a plain name"), "{subject:?}: {err}");
        assert!(
            !escape.exists() && !Path::new(&absolute).exists(),
            "{subject:?}"
        );
        let written: Vec<_> = std::fs::read_dir(&out)
            .map(|r| r.count())
            .into_iter()
            .collect();
        assert!(
            written.iter().all(|n| *n == 0),
            "{subject:?}: nothing inside --out either"
        );
        server.abort();
    }
}

/// One patient of the Safe Harbor fixtures (datasets/tests/fixtures/safe-harbor).
struct Fixture {
    /// `""`: the patient has no birth date.
    birth: &'static str,
    death: Option<&'static str>,
    sex: &'static str,
}

const FIXTURES: [Fixture; 7] = [
    Fixture {
        birth: "1925-03-04",
        death: None,
        sex: "female",
    },
    Fixture {
        birth: "1900-06-15",
        death: Some("1995-08-01"),
        sex: "male",
    },
    Fixture {
        birth: "1930-01-10",
        death: Some("2018-05-05"),
        sex: "female",
    },
    Fixture {
        birth: "1926-04-04",
        death: Some("1981-09-09"),
        sex: "male",
    },
    Fixture {
        birth: "2026-10-02",
        death: None,
        sex: "female",
    },
    Fixture {
        birth: "1990-07-07",
        death: None,
        sex: "male",
    },
    Fixture {
        birth: "",
        death: None,
        sex: "other",
    },
];

impl Fixture {
    fn year(date: &str) -> i32 {
        date[..4].parse().unwrap()
    }

    /// The documented 90+ rule (docs/FORMATS.md), written out again here: the age is
    /// taken this year or at death; over 89, the bucket year is that year minus 90.
    fn bucket_year(&self, this_year: i32) -> Option<i32> {
        if self.birth.is_empty() {
            return None;
        }
        let age_year = self
            .death
            .map_or(this_year, |d| Self::year(d).min(this_year));
        (age_year - Self::year(self.birth) > 89).then_some(age_year - 90)
    }

    /// The birth year the broker's index must show.
    fn index_birth_year(&self, this_year: i32) -> Option<i32> {
        (!self.birth.is_empty()).then(|| {
            self.bucket_year(this_year)
                .unwrap_or_else(|| Self::year(self.birth))
        })
    }

    fn exact_dates(&self) -> Vec<&'static str> {
        std::iter::once(self.birth)
            .filter(|b| !b.is_empty())
            .chain(self.death)
            .collect()
    }
}

/// A value's years when its unit is a unit of time (as docs/FORMATS.md lists them).
fn years_in(value: f64, unit: &str) -> Option<f64> {
    let per_year = match unit
        .trim_matches(|c| c == '{' || c == '}')
        .to_ascii_lowercase()
        .as_str()
    {
        "a" | "yr" | "yrs" | "year" | "years" => 1.0,
        "mo" | "month" | "months" => 12.0,
        "wk" | "week" | "weeks" => 365.25 / 7.0,
        "d" | "day" | "days" => 365.25,
        _ => return None,
    };
    Some(value / per_year)
}

/// Every string and every quantity `{value, unit|code}` of a JSON document.
fn walk<'a>(
    v: &'a serde_json::Value,
    strings: &mut Vec<&'a str>,
    quantities: &mut Vec<&'a serde_json::Map<String, serde_json::Value>>,
) {
    match v {
        serde_json::Value::String(s) => strings.push(s),
        serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, strings, quantities)),
        serde_json::Value::Object(o) => {
            if o.get("value").is_some_and(|v| v.is_number())
                && (o.contains_key("unit") || o.contains_key("code"))
            {
                quantities.push(o);
            }
            o.values().for_each(|i| walk(i, strings, quantities));
        }
        _ => {}
    }
}

/// What the Parquet files under `dir` hold: every Date32 value as text with its column,
/// and every measurement value with its unit.
#[derive(Default)]
struct ParquetScan {
    dates: Vec<(String, String)>,
    values: Vec<(f64, String)>,
}

fn parquet_dates_and_values(dir: &Path) -> ParquetScan {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{DataType, Float64Type};
    use datafusion::prelude::{ParquetReadOptions, SessionContext};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut found = ParquetScan::default();
        for file in scan::files_under(dir) {
            if file.extension().is_none_or(|e| e != "parquet") {
                continue;
            }
            let ctx = SessionContext::new();
            ctx.register_parquet("t", file.to_str().unwrap(), ParquetReadOptions::default())
                .await
                .unwrap();
            let df = ctx.table("t").await.unwrap();
            let schema = df.schema().clone();
            for field in schema.fields() {
                if field.data_type() == &DataType::Date32 {
                    let sql = format!("SELECT CAST(\"{}\" AS VARCHAR) FROM t", field.name());
                    for b in ctx.sql(&sql).await.unwrap().collect().await.unwrap() {
                        let col =
                            datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
                        for s in col.as_string::<i32>().iter().flatten() {
                            found.dates.push((field.name().clone(), s.to_string()));
                        }
                    }
                }
            }
            if schema.has_column_with_unqualified_name("value")
                && schema.has_column_with_unqualified_name("unit")
            {
                let sql = "SELECT value, CAST(unit AS VARCHAR) FROM t WHERE value IS NOT NULL";
                for b in ctx.sql(sql).await.unwrap().collect().await.unwrap() {
                    let v = b.column(0).as_primitive::<Float64Type>();
                    let u = datafusion::arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
                    let u = u.as_string::<i32>();
                    for i in 0..b.num_rows() {
                        found.values.push((
                            v.value(i),
                            if u.is_null(i) {
                                String::new()
                            } else {
                                u.value(i).to_string()
                            },
                        ));
                    }
                }
            }
        }
        found
    })
}

/// Safe Harbor, end to end: the fixtures (over 89 alive and dead, died younger, a
/// newborn, conditions on birth and death dates, ages in every element) imported through
/// `brokerctl`, then the broker's data directory (SQLite and the Parquet index snapshot)
/// and a researcher's fetched research copy scanned: no exact birth or death date, no age
/// over 89, no year that implies one, and the 90+ decision as documented.
#[test]
fn safe_harbor_fixtures_leave_no_exact_date_and_no_age_over_89_at_the_broker_or_researcher() {
    let this_year = datasets::DeidConfig::this_year().reference_year;
    let fixtures_dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../datasets/tests/fixtures/safe-harbor");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let [operator, custodian, sponsor, board, researcher] = keys(d);
    let keystore = d.join("custodian-keystore.db");
    let keystore = keystore.to_str().unwrap();
    let mut server = serve(&data, Path::new(&public(&operator)));
    let ctl = Ctl::new(&server.url, &data);
    register(&ctl, &operator, [&custodian, &sponsor, &board, &researcher]);
    ctl.pin_network(&operator, &board, &data);

    let imported = ctl.import_fhir(&custodian, fixtures_dir.to_str().unwrap(), keystore);
    assert_eq!(imported["patients"], 7, "{imported}");
    assert_eq!(imported["errors"], 0, "{imported}");
    // Withheld, and counted: the two childhood conditions and the Age of 99 of the patient
    // born in 1925, the childhood sinusitis and the Age of 93 of the one who died at 95,
    // and the Age of 95 of the patient without a birth date.
    assert_eq!(imported["withheld"]["condition"], 3, "{imported}");
    assert_eq!(imported["withheld"]["measurement"], 3, "{imported}");
    ctl.ok(
        &custodian,
        &["custodian", "consent", "--keystore", keystore, "--broad"],
    );
    let categories = "demographics,conditions,observations,encounters";
    let study_id = ctl.propose(&sponsor, "Safe Harbor", categories, &researcher, &[]);
    ctl.ok(
        &board,
        &["board", "study", "approve", &study_id, "--reason", "IRB-90"],
    );
    let granted = ctl.json(
        &custodian,
        &[
            "custodian",
            "grant",
            "--study",
            &study_id,
            "--keystore",
            keystore,
        ],
    );
    assert_eq!(granted["grants"], 7, "{granted}");
    let out = d.join("release");
    let fetched = ctl.fetch(&researcher, &study_id, &out);
    assert_eq!(fetched["subjects"], 7, "{fetched}");
    // A count makes the engine load the index; a graceful stop writes its snapshot.
    ctl.json(&board, &["board", "count", "--study", &study_id]);
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        server.child.wait().unwrap().success(),
        "the broker stops cleanly"
    );

    let all_exact: Vec<String> = FIXTURES
        .iter()
        .flat_map(|f| f.exact_dates())
        .map(str::to_string)
        .collect();

    // 1. The data directory, byte for byte: no exact birth or death date as text.
    let hits = scan::scan_for(&data, &all_exact);
    assert!(
        hits.is_empty(),
        "exact dates in the data directory: {hits:?}"
    );

    // 2. The index in SQLite, patient by patient (told apart by birth year and sex).
    let db = rusqlite::Connection::open(data.join("broker.db")).unwrap();
    let mut persons: Vec<(i64, Option<i32>, String)> = db
        .prepare("SELECT index_id, birth_year, sex FROM index_person")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    persons.sort_by_key(|p| p.1);
    assert_eq!(persons.len(), 7);
    let mut dated_rows = 0;
    for f in &FIXTURES {
        let want_year = f.index_birth_year(this_year);
        let (index_id, _, sex) = persons
            .iter()
            .find(|p| p.1 == want_year)
            .unwrap_or_else(|| panic!("no index person born {want_year:?}: {persons:?}"));
        assert_eq!(sex, f.sex);
        let over_89 = f.bucket_year(this_year).is_some();
        let first_day = format!("{:04}-01-01", want_year.unwrap_or(1));
        let events: Vec<(String, Option<f64>, String)> = db
            .prepare("SELECT date, value, unit FROM index_event WHERE index_id = ?1")
            .unwrap()
            .query_map([index_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let periods: Vec<(String, String)> = db
            .prepare("SELECT start_date, end_date FROM index_period WHERE index_id = ?1")
            .unwrap()
            .query_map([index_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            !events.is_empty() && periods.len() == 1,
            "{}: {events:?}",
            f.birth
        );
        let dates = events
            .iter()
            .map(|e| e.0.clone())
            .chain(periods.iter().flat_map(|p| [p.0.clone(), p.1.clone()]));
        for date in dates {
            dated_rows += 1;
            assert!(
                !f.exact_dates().contains(&date.as_str()),
                "{}: {date}",
                f.birth
            );
            // No year before the birth year (the bucket year, in the 90+ bucket).
            assert!(date >= first_day, "{}: {date} before {first_day}", f.birth);
        }
        for (_, value, unit) in &events {
            if let Some(years) = value.and_then(|v| years_in(v, unit)) {
                assert!(years <= 89.0, "{}: an age of {years} years", f.birth);
                assert!(
                    !(over_89 && matches!(unit.as_str(), "a" | "mo")),
                    "{}: an age in the 90+ bucket",
                    f.birth
                );
            }
        }
        // Childhood sinusitis: before the bucket year for the two in the 90+ bucket, so
        // not indexed at all (a pile of rows on the bucket year's first day would say how
        // much history came before it); indexed for the patient who died at 88.
        let codes: Vec<String> = db
            .prepare("SELECT code FROM index_event WHERE index_id = ?1")
            .unwrap()
            .query_map([index_id], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let sinusitis = codes.iter().any(|c| c == "40055000");
        match f.birth {
            "1925-03-04" | "1900-06-15" => assert!(!sinusitis, "{}: {codes:?}", f.birth),
            "1930-01-10" => assert!(sinusitis, "{codes:?}"),
            _ => {}
        }
        if f.birth == "2026-10-02" {
            // The newborn's events, all on the day of birth, are all on one other day.
            let days: BTreeSet<&str> = events.iter().map(|e| e.0.as_str()).collect();
            assert_eq!(days.len(), 1, "{days:?}");
        }
    }
    assert!(dated_rows > 25, "{dated_rows} dated index rows checked");

    // 3. The Parquet snapshot: no exact date, no age over 89.
    let ParquetScan { dates, values } = parquet_dates_and_values(&data);
    assert!(dates.len() > 25, "{} dates in the snapshot", dates.len());
    for (column, date) in &dates {
        assert!(
            !all_exact.contains(date),
            "{column}: {date} in the snapshot"
        );
    }
    for (value, unit) in &values {
        assert!(
            years_in(*value, unit).is_none_or(|y| y <= 89.0),
            "{value} {unit} in the snapshot"
        );
    }

    // 4. The research copy the researcher decrypted: years only, and for the 90+ bucket
    // no birth year, no year before the bucket year and no age.
    let mut subjects = 0;
    for entry in std::fs::read_dir(&out).unwrap() {
        let subject = entry.unwrap().path();
        if !subject.is_dir() {
            continue;
        }
        subjects += 1;
        let docs: Vec<serde_json::Value> = std::fs::read_dir(&subject)
            .unwrap()
            .map(|f| serde_json::from_slice(&std::fs::read(f.unwrap().path()).unwrap()).unwrap())
            .collect();
        let patient = docs
            .iter()
            .flat_map(|b| b["entry"].as_array().unwrap())
            .map(|e| &e["resource"])
            .find(|r| r["resourceType"] == "Patient")
            .expect("demographics");
        let text = patient.to_string();
        let is_90_plus = text.contains("urn:safe-harbor:age-90-plus");
        let fixture = FIXTURES
            .iter()
            .find(|f| {
                let died = patient["deceasedDateTime"].as_str();
                f.sex == patient["gender"] && died == f.death.map(|d| &d[..4]) && {
                    match patient["birthDate"].as_str() {
                        Some(y) => f.birth.starts_with(y),
                        None if f.birth.is_empty() => !text.contains("age-90-plus"),
                        None => f.bucket_year(this_year).is_some(),
                    }
                }
            })
            .unwrap_or_else(|| panic!("which fixture is {text}?"));
        let bucket = fixture.bucket_year(this_year);
        assert_eq!(
            is_90_plus,
            bucket.is_some(),
            "the 90+ rule for {}",
            fixture.birth
        );
        assert_eq!(
            patient.get("birthDate").is_none(),
            bucket.is_some() || fixture.birth.is_empty(),
            "{text}"
        );
        let (mut strings, mut quantities) = (Vec::new(), Vec::new());
        for doc in &docs {
            walk(doc, &mut strings, &mut quantities);
        }
        for s in &strings {
            let b = s.as_bytes();
            let dated = b.len() >= 7
                && b[..4].iter().all(u8::is_ascii_digit)
                && b[4] == b'-'
                && b[5..7].iter().all(u8::is_ascii_digit);
            assert!(!dated, "{}: a date with a month: {s}", fixture.birth);
            if let (Some(bucket), true) = (bucket, b.len() == 4 && b.iter().all(u8::is_ascii_digit))
            {
                let year: i32 = s.parse().unwrap();
                assert!(
                    year >= bucket,
                    "{}: year {year} before {bucket}",
                    fixture.birth
                );
            }
        }
        for q in &quantities {
            let value = q["value"].as_f64().unwrap();
            let unit = q
                .get("code")
                .or_else(|| q.get("unit"))
                .and_then(|u| u.as_str())
                .unwrap_or("");
            let Some(years) = years_in(value, unit) else {
                continue;
            };
            assert!(
                years <= 89.0 || (value == 90.0 && unit == "a"),
                "{}: {q:?}",
                fixture.birth
            );
            assert!(
                bucket.is_none() || !matches!(unit, "a" | "mo"),
                "{}: an age in the 90+ bucket: {q:?}",
                fixture.birth
            );
        }
        for exact in fixture.exact_dates() {
            assert!(!strings.iter().any(|s| s.contains(exact)), "{exact}");
        }
        if fixture.birth.is_empty() {
            // No bucket to decide by: the ages over 89 stand as "90 or older".
            let aggregated = quantities
                .iter()
                .filter(|q| q["value"] == 90 && q["code"] == "a")
                .count();
            assert_eq!(aggregated, 2, "{quantities:?}");
            assert!(
                quantities
                    .iter()
                    .any(|q| q.get("comparator").is_some_and(|c| c == ">="))
            );
        }
    }
    assert_eq!(subjects, 7);
}

/// `brokerctl verify-receipt`, offline, on a bundle as an erasure gives it: it holds with
/// enough pinned proxies, and fails, naming why, when a proxy's receipt is removed, a
/// signature altered, or a receipt comes from a proxy the patient did not pin.
#[test]
fn verify_receipt_checks_an_erasure_bundle_against_the_pinned_network() {
    use pre_kms::erasure::{ErasureReceipt, ErasureRequest, ReceiptBundle, Role as ErasureRole};
    use pre_kms::network::{NetworkManifest, NetworkProxy};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (board, broker) = (pre_kms::Identity::generate(), pre_kms::Identity::generate());
    let proxies: Vec<pre_kms::Identity> = (0..3).map(|_| pre_kms::Identity::generate()).collect();
    let pinned: Vec<NetworkProxy> = proxies.iter().map(NetworkProxy::of).collect();
    let mut manifest = NetworkManifest::new(
        &broker.verifying_key(),
        None,
        2,
        &pinned,
        &[("IRB".into(), board.verifying_key())],
    );
    manifest.sign(&board).unwrap();
    let network = d.join("network.json");
    manifest.write(&network).unwrap();

    let patient = pre_kms::Identity::generate();
    let request = ErasureRequest::sign(&patient, 1_000);
    let verified = request.verify().unwrap();
    let receipt = |who: &pre_kms::Identity, role| {
        ErasureReceipt::sign(who, role, &verified, [("kfrags", 4)], 2_000)
    };
    let mut receipts: Vec<ErasureReceipt> = proxies
        .iter()
        .map(|p| receipt(p, ErasureRole::Proxy))
        .collect();
    receipts.push(ErasureReceipt::sign(
        &broker,
        ErasureRole::Broker,
        &verified,
        [("envelopes", 5), ("index_rows", 40)],
        2_000,
    ));
    let good = ReceiptBundle::new(request, receipts);
    let run = |bundle: &ReceiptBundle, name: &str| {
        let file = d.join(name);
        std::fs::write(&file, serde_json::to_vec(bundle).unwrap()).unwrap();
        Command::new(brokerctl())
            .arg("verify-receipt")
            .arg(&file)
            .arg("--network")
            .arg(&network)
            .output()
            .unwrap()
    };
    let ok = run(&good, "good.json");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(
        said.contains("3 of the pinned proxies") && said.contains("5 envelopes"),
        "{said}"
    );

    let mut two_missing = good.clone();
    two_missing.receipts.drain(0..2);
    let mut altered = good.clone();
    altered.receipts[3].destroyed.insert("envelopes".into(), 0);
    let mut foreign = good.clone();
    foreign.receipts[0] = receipt(&pre_kms::Identity::generate(), ErasureRole::Proxy);
    for (bundle, name, why) in [
        (two_missing, "missing.json", "1 of 3 proxies confirmed"),
        (altered, "altered.json", "signature does not verify"),
        (foreign, "foreign.json", "not pinned"),
    ] {
        let out = run(&bundle, name);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} passed");
        assert!(err.contains(why), "{name}: {err}");
    }
    let garbage = d.join("garbage.json");
    std::fs::write(&garbage, b"{\"format\": 1}").unwrap();
    let out = Command::new(brokerctl())
        .args(["verify-receipt", garbage.to_str().unwrap(), "--network"])
        .arg(&network)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not an erasure receipt bundle"));
}

// ------------------------------------------------------------------ erasure

/// A broker data directory where ten Synthea patients were imported by a custodian
/// (keystore `d/keystore.db`) with broad consent, and a study of their conditions was
/// approved, granted and released once (into `d/release`); the broker is stopped.
struct ErasureSetup {
    data: PathBuf,
    /// operator, custodian, sponsor, board, researcher.
    keys: [PathBuf; 5],
    operator_pub: PathBuf,
    keystore: PathBuf,
    study_id: String,
}

impl ErasureSetup {
    fn new(d: &Path) -> ErasureSetup {
        let data = d.join("data");
        let keys = keys(d);
        let [operator, custodian, sponsor, board, researcher] = &keys;
        let operator_pub = PathBuf::from(public(operator));
        let server = serve(&data, &operator_pub);
        let ctl = Ctl::new(&server.url, &data);
        register(&ctl, operator, [custodian, sponsor, board, researcher]);
        ctl.pin_network(operator, board, &data);
        let keystore = d.join("keystore.db");
        let ks = keystore.to_str().unwrap();
        let src = synthea();
        let imported = ctl.import_fhir(custodian, src.to_str().unwrap(), ks);
        assert_eq!(imported["patients"], 10, "{imported}");
        let study_id = ctl.propose(sponsor, "Erasure", "conditions", researcher, &[]);
        ctl.ok(board, &["board", "study", "approve", &study_id]);
        ctl.json(
            custodian,
            &["custodian", "consent", "--keystore", ks, "--broad"],
        );
        let granted = ctl.json(
            custodian,
            &["custodian", "grant", "--study", &study_id, "--keystore", ks],
        );
        assert_eq!(granted["grants"], 10, "{granted}");
        let fetched = ctl.fetch(researcher, &study_id, &d.join("release"));
        assert_eq!(fetched["subjects"], 10, "{fetched}");
        ErasureSetup {
            data,
            keys: keys.clone(),
            operator_pub,
            keystore,
            study_id,
        }
    }

    /// Starts the broker again, armed with a crash point or not; its `brokerctl`.
    fn serve(&self, crash_at: Option<&str>) -> Server {
        serve_armed(&self.data, &self.operator_pub, crash_at)
    }

    fn ctl<'a>(&self, url: &'a str) -> Ctl<'a> {
        let ctl = Ctl::new(url, &self.data);
        *ctl.network.borrow_mut() = Some(self.data.with_file_name("network.json"));
        ctl
    }
}

/// The keystore's patients: (source id, pseudonym, seed), in source-id order.
fn keystore_patients(keystore: &Path) -> Vec<(String, String, Vec<u8>)> {
    let db = rusqlite::Connection::open(keystore).unwrap();
    let mut stmt = db
        .prepare("SELECT source_id, pseudonym, seed FROM patients ORDER BY source_id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// What a patient left in the broker's data directory, to look for after the erasure:
/// a window from the middle of each envelope as stored, the signature of each consent
/// version, the log-tag salt; and the number of their index version.
struct Traces {
    needles: Vec<(String, Vec<u8>)>,
    index_id: i64,
}

fn traces(data: &Path, pseudonym: &str) -> Traces {
    let db = rusqlite::Connection::open(data.join("broker.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut needles = Vec::new();
    let mut stmt = db
        .prepare("SELECT pack, offset, length FROM envelopes WHERE pseudonym = ?1")
        .unwrap();
    let rows: Vec<(String, i64, i64)> = stmt
        .query_map([pseudonym], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!rows.is_empty());
    for (i, (pack, offset, length)) in rows.iter().enumerate() {
        let bytes = std::fs::read(data.join("blobs").join(format!("{pack}.pack"))).unwrap();
        let mid = (*offset + *length / 2) as usize;
        needles.push((format!("envelope {i}"), bytes[mid - 24..mid + 24].to_vec()));
    }
    let mut stmt = db
        .prepare("SELECT signature FROM consents WHERE pseudonym = ?1")
        .unwrap();
    for (i, sig) in stmt
        .query_map([pseudonym], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .enumerate()
    {
        needles.push((format!("consent version {i}"), sig.unwrap()));
    }
    let salt: Vec<u8> = db
        .query_row(
            "SELECT salt FROM audit_salts WHERE pseudonym = ?1",
            [pseudonym],
            |r| r.get(0),
        )
        .unwrap();
    needles.push(("log-tag salt".into(), salt));
    let index_id = db
        .query_row(
            "SELECT index_id FROM index_person WHERE pseudonym = ?1",
            [pseudonym],
            |r| r.get(0),
        )
        .unwrap();
    Traces { needles, index_id }
}

/// Rows naming `pseudonym` in every table of the SQLite file at `path` that has a
/// `pseudonym` column, except `erasures` (the receipts kept for the patient to fetch).
fn rows_naming(path: &Path, pseudonym: &str) -> Vec<(String, i64)> {
    let db = rusqlite::Connection::open(path).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut out = Vec::new();
    for t in tables.into_iter().filter(|t| t != "erasures") {
        let has: i64 = db
            .query_row(
                &format!("SELECT COUNT(*) FROM pragma_table_info('{t}') WHERE name = 'pseudonym'"),
                [],
                |r| r.get(0),
            )
            .unwrap();
        if has > 0 {
            let n: i64 = db
                .query_row(
                    &format!("SELECT COUNT(*) FROM {t} WHERE pseudonym = ?1"),
                    [pseudonym],
                    |r| r.get(0),
                )
                .unwrap();
            out.push((t, n));
        }
    }
    out
}

/// A patient of a custodian erased through `brokerctl patient erase`, the broker and its
/// proxies running: every byte of their envelopes, their consent versions, their log-tag
/// salt and their index rows are gone from the broker's and the proxies' files (the tag
/// stays only in the log's leaves, where every proof needs it and nothing links it to
/// them), the other patients' records read back byte for byte from the rewritten packs,
/// the board's full verify and the offline `broker log-verify` pass, the receipts check,
/// the researcher has a notice naming the subject it lost, the patient's key reads
/// nothing any more, and the same source record imported again starts from nothing.
#[test]
fn an_erasure_through_brokerctl_leaves_no_byte_of_the_patient_and_every_proof_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let setup = ErasureSetup::new(d);
    let (data, study_id) = (setup.data.clone(), setup.study_id.clone());
    let [_, custodian, _, board, researcher] = &setup.keys;
    let ks = setup.keystore.to_str().unwrap();
    let keystore = setup.keystore.clone();
    // Started again, the broker loads the cohort index from the database and writes it as
    // a snapshot, which then holds the patient's index rows too.
    let server = setup.serve(None);
    let ctl = setup.ctl(&server.url);
    let snapshot_manifest = data.join("index").join("CURRENT");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !snapshot_manifest.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no index snapshot written"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let board_before = ctl.json(board, &["board", "log", "verify", "--cosign"]);

    let patients = keystore_patients(&keystore);
    let (source_id, pseudonym, seed) = patients[0].clone();
    let traces = traces(&data, &pseudonym);
    let as_patient = ["--keystore", ks, "--patient", source_id.as_str()];
    let mine = ctl.json(
        custodian,
        &[&["patient", "accesses"][..], &as_patient].concat(),
    );
    let tag = mine[0]["event"]["patient"].as_str().unwrap().to_owned();
    // The patient's own key, kept aside to see what it can still do afterwards.
    let own_key = d.join("patient.key");
    let own = pre_kms::Identity::from_seed(seed.clone().try_into().unwrap());
    own.write_key_file(&own_key, "patient").unwrap();
    own.public("patient")
        .write_file(Path::new(&public(&own_key)))
        .unwrap();
    let mut needles = traces.needles.clone();
    needles.push(("tag".into(), hex::decode(&tag).unwrap()));
    needles.push(("tag (hex)".into(), tag.clone().into_bytes()));
    let before: BTreeSet<String> = scan::scan_bytes(&data, &needles)
        .into_iter()
        .map(|(_, label)| label)
        .collect();
    let labels: BTreeSet<String> = needles.iter().map(|(l, _)| l.clone()).collect();
    assert_eq!(before, labels, "every trace is found before the erasure");
    let seed_needle = [("seed".to_string(), seed.clone())];
    assert!(
        !scan::scan_bytes(d, &seed_needle).is_empty(),
        "the keystore holds the seed before the erasure"
    );
    let proxy_db = |i: usize| data.join(format!("proxies/{i}/proxy.db"));
    for i in 0..3 {
        assert!(
            rows_naming(&proxy_db(i), &pseudonym)
                .iter()
                .any(|(_, n)| *n > 0)
        );
    }

    // The erasure needs a confirmation.
    let receipts = d.join("receipts.json");
    let erase_args = [
        &["patient", "erase"][..],
        &as_patient,
        &["--out", receipts.to_str().unwrap()],
    ]
    .concat();
    let refused = ctl.fails(custodian, &erase_args);
    assert!(refused.contains("--yes"), "{refused}");
    assert!(!receipts.exists());
    let erased = ctl.json(custodian, &[&erase_args[..], &["--yes"]].concat());
    assert_eq!(erased["proxies_confirmed"], 3, "{erased}");
    assert_eq!(erased["proxies_needed"], 2, "{erased}");
    let deleted = &erased["broker_destroyed"];
    let envelopes = traces
        .needles
        .iter()
        .filter(|(l, _)| l.starts_with("envelope"))
        .count();
    assert_eq!(
        deleted["envelopes"].as_u64().unwrap() as usize,
        envelopes,
        "{erased}"
    );
    assert!(deleted["index_rows"].as_u64().unwrap() > 1, "{erased}");
    assert_eq!(deleted["consent_versions"], 1, "{erased}");
    assert!(deleted["release_items"].as_u64().unwrap() > 0, "{erased}");
    assert!(deleted["packs_rewritten"].as_u64().unwrap() > 0, "{erased}");
    let network = data.with_file_name("network.json");
    let checked = Command::new(brokerctl())
        .arg("verify-receipt")
        .arg(&receipts)
        .arg("--network")
        .arg(&network)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success() && said.contains("3 of the pinned proxies"),
        "{said}"
    );

    // The scan, with the broker and proxies still running: the tag is left only in the
    // access log's leaves; nothing else of the patient anywhere.
    let hits = scan::scan_bytes(&data, &needles);
    let audit_dir = data.join("audit");
    let stray: Vec<_> = hits
        .iter()
        .filter(|(f, l)| !(l.starts_with("tag") && f.starts_with(&audit_dir)))
        .collect();
    assert!(stray.is_empty(), "left after the erasure: {stray:?}");
    assert!(
        hits.iter().any(|(_, l)| l == "tag (hex)"),
        "the leaves keep the tag: {hits:?}"
    );
    for (table, n) in rows_naming(&data.join("broker.db"), &pseudonym) {
        assert_eq!(n, 0, "broker table {table} still names the patient");
    }
    for i in 0..3 {
        for (table, n) in rows_naming(&proxy_db(i), &pseudonym) {
            assert_eq!(n, 0, "proxy {i} table {table} still names the patient");
        }
        let hits = scan::scan_for(
            &data.join(format!("proxies/{i}")),
            std::slice::from_ref(&pseudonym),
        );
        assert!(hits.is_empty(), "proxy {i}: {hits:?}");
    }
    let db = rusqlite::Connection::open(data.join("broker.db")).unwrap();
    for table in ["index_event", "index_period"] {
        let n: i64 = db
            .query_row(
                &format!("SELECT COUNT(*) FROM {table} WHERE index_id = ?1"),
                [traces.index_id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0, "{table}");
    }
    drop(db);
    // The index snapshot was written again without the patient, the older one destroyed.
    let snaps: Vec<PathBuf> = std::fs::read_dir(data.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    let people = eunomia_like_count(&snaps[0].join("person.parquet"), traces.index_id);
    assert_eq!(people.0, 9, "nine patients in the snapshot");
    assert_eq!(people.1, 0, "the erased patient is not");
    // The custodian's keystore no longer holds the patient's seed.
    assert!(
        keystore_patients(&keystore)
            .iter()
            .all(|(s, _, _)| *s != source_id)
    );
    let seed_hits = scan::scan_bytes(d, &seed_needle);
    let seed_hits: Vec<_> = seed_hits.iter().filter(|(f, _)| *f != own_key).collect();
    assert!(
        seed_hits.is_empty(),
        "the seed is still on disk: {seed_hits:?}"
    );

    // The others' records come back byte for byte from the rewritten packs; the
    // researcher is told which subject went.
    let first = fetched_hashes(&d.join("release"));
    let after = ctl.fetch(researcher, &study_id, &d.join("release-after"));
    assert_eq!(after["subjects"], 9, "{after}");
    let second = fetched_hashes(&d.join("release-after"));
    assert!(second.is_subset(&first) && second.len() < first.len());
    let subjects = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let gone: Vec<String> = subjects(&d.join("release"))
        .difference(&subjects(&d.join("release-after")))
        .cloned()
        .collect();
    assert_eq!(gone.len(), 1, "{gone:?}");
    let notices = ctl.json(researcher, &["researcher", "notices", "--study", &study_id]);
    assert_eq!(notices.as_array().unwrap().len(), 1, "{notices}");
    assert_eq!(
        notices[0]["event"]["details"]["subject"],
        gone[0].as_str(),
        "{notices}"
    );

    // Every proof still verifies: the board's full verify extends what it saw before.
    let verified = ctl.json(board, &["board", "log", "verify"]);
    assert_eq!(
        verified["previous_size"], board_before["size"],
        "{verified}"
    );
    assert_eq!(
        verified["leaves_recomputed"], verified["size"],
        "{verified}"
    );
    // The patient's key reads nothing about them any more.
    let nothing = ctl.fails(&own_key, &["patient", "accesses"]);
    assert!(nothing.contains("not authenticated"), "{nothing}");

    // The same source record imported again is a new patient, starting from nothing.
    let src = synthea();
    let again = ctl.import_fhir(custodian, src.to_str().unwrap(), ks);
    assert_eq!(again["patients"], 10, "{again}");
    let (_, new_pseudonym, _) = keystore_patients(&keystore)
        .into_iter()
        .find(|(s, _, _)| *s == source_id)
        .unwrap();
    assert_ne!(new_pseudonym, pseudonym);
    let fresh = ctl.json(
        custodian,
        &[&["patient", "accesses"][..], &as_patient].concat(),
    );
    let kinds: BTreeSet<&str> = fresh
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, BTreeSet::from(["enroll", "upload"]), "{fresh}");

    // The erased key itself may enrol again, from nothing, and erase itself with its own
    // key file: the consent record kept beside the key goes with it.
    let operator = &setup.keys[0];
    ctl.ok(
        operator,
        &[
            "operator",
            "register",
            "--public-key",
            &public(&own_key),
            "--role",
            "patient",
            "--name",
            "patient",
        ],
    );
    let enrolled = ctl.ok(&own_key, &["patient", "enroll"]);
    assert!(enrolled.starts_with("enrolled as pseudonym"), "{enrolled}");
    ctl.ok(&own_key, &["patient", "consent", "set", "--broad"]);
    let heads = PathBuf::from(format!("{}.consents.json", own_key.display()));
    assert!(
        std::fs::read_to_string(&heads)
            .unwrap()
            .contains(&pseudonym)
    );
    std::thread::sleep(Duration::from_millis(1100)); // a request of the enrolment's second is refused
    let own_receipts = d.join("own-receipts.json");
    let erased = ctl.json(
        &own_key,
        &[
            "patient",
            "erase",
            "--yes",
            "--out",
            own_receipts.to_str().unwrap(),
        ],
    );
    assert_eq!(erased["pseudonym"], pseudonym.as_str(), "{erased}");
    assert_eq!(
        erased["broker_destroyed"]["consent_versions"], 1,
        "{erased}"
    );
    assert_eq!(erased["broker_destroyed"]["envelopes"], 0, "{erased}");
    assert!(
        !std::fs::read_to_string(&heads)
            .unwrap()
            .contains(&pseudonym)
    );
    // Sent again, the saved request fetches the same receipts, with the key no longer
    // enrolled.
    let again = ctl.json(
        &own_key,
        &[
            "patient",
            "erase",
            "--yes",
            "--out",
            own_receipts.to_str().unwrap(),
        ],
    );
    assert_eq!(again, erased);

    drop(ctl);
    drop(server);
    assert_log_verifies(&data);
}

/// `broker log-verify` passes on the stopped broker's data directory.
fn assert_log_verifies(data: &Path) {
    let checked = Command::new(BROKER)
        .args(["log-verify", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success() && said.contains("access log verified"),
        "{said}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// (rows, rows of `person_id`) in an index snapshot's person table.
fn eunomia_like_count(parquet: &Path, person_id: i64) -> (i64, i64) {
    use datafusion::arrow::array::AsArray;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let ctx = datafusion::prelude::SessionContext::new();
        ctx.register_parquet("person", parquet.to_str().unwrap(), Default::default())
            .await
            .unwrap();
        let batches = ctx
            .sql(&format!(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE person_id = {person_id}) FROM person"
            ))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let b = &batches[0];
        (
            b.column(0)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0),
            b.column(1)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0),
        )
    })
}

/// The broker dies (as if killed) at each step of an erasure; at the next start the
/// erasure finishes by itself, and the same command then hands the patient the receipts.
#[test]
fn an_erasure_killed_at_each_step_finishes_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let setup = ErasureSetup::new(d);
    let (data, study_id) = (setup.data.clone(), setup.study_id.clone());
    let [_, custodian, _, _, researcher] = &setup.keys;
    let ks = setup.keystore.to_str().unwrap().to_owned();
    let keystore = setup.keystore.clone();
    let patients = keystore_patients(&keystore);
    let step_of = |pseudonym: &str| -> Option<i64> {
        let db = rusqlite::Connection::open(data.join("broker.db")).unwrap();
        db.busy_timeout(Duration::from_secs(10)).unwrap();
        db.query_row(
            "SELECT step FROM erasures WHERE pseudonym = ?1",
            [pseudonym],
            |r| r.get(0),
        )
        .ok()
    };
    for (n, (point, (source_id, pseudonym, _))) in broker::crash::ERASURE_POINTS
        .iter()
        .zip(&patients)
        .enumerate()
    {
        let traces = traces(&data, pseudonym);
        let mut server = setup.serve(Some(point));
        let ctl = setup.ctl(&server.url);
        let receipts = d.join(format!("receipts-{point}.json"));
        let args = [
            "patient",
            "erase",
            "--keystore",
            &ks,
            "--patient",
            source_id,
            "--yes",
            "--out",
            receipts.to_str().unwrap(),
        ];
        let out = ctl.run(custodian, &args);
        assert!(
            !out.status.success(),
            "{point}: the erasure saw the broker die"
        );
        assert!(
            !server.child.wait().unwrap().success(),
            "{point}: the broker aborted"
        );
        assert!(
            step_of(pseudonym).is_some_and(|s| s < 5),
            "{point}: under way"
        );
        drop(ctl);

        let server = setup.serve(None);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while step_of(pseudonym) != Some(5) {
            assert!(
                std::time::Instant::now() < deadline,
                "{point}: not finished at start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let ctl = setup.ctl(&server.url);
        let erased = ctl.json(custodian, &args);
        assert_eq!(erased["proxies_confirmed"], 3, "{point}: {erased}");
        assert!(
            erased["broker_destroyed"]["envelopes"].as_u64().unwrap() > 0,
            "{point}: {erased}"
        );
        let hits = scan::scan_bytes(&data, &traces.needles);
        assert!(hits.is_empty(), "{point}: left after the erasure: {hits:?}");
        for (table, n) in rows_naming(&data.join("broker.db"), pseudonym) {
            assert_eq!(n, 0, "{point}: table {table} still names the patient");
        }
        let db = rusqlite::Connection::open(data.join("broker.db")).unwrap();
        let pending: i64 = db
            .query_row("SELECT COUNT(*) FROM erasure_packs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(pending, 0, "{point}: packs left to destroy");
        drop(db);
        let fetched = ctl.fetch(researcher, &study_id, &d.join(format!("release-{point}")));
        assert_eq!(
            fetched["subjects"].as_u64().unwrap() as usize,
            9 - n,
            "{point}"
        );
        drop(ctl);
        drop(server);
    }
    assert_log_verifies(&data);
}

// ------------------------------------------------------------------ break-glass

#[test]
fn break_glass_through_brokerctl_for_the_patient_who_allows_it_only() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    let data = d.join("data");
    let keys = keys(d);
    let [operator, custodian, _sponsor, board, _researcher] = &keys;
    let server = serve(&data, Path::new(&public(operator)));
    let ctl = Ctl::new(&server.url, &data);
    register(&ctl, operator, [custodian, &keys[2], board, &keys[4]]);
    // The emergency organisation's key: what its clinicians decrypt with.
    let (clinician, org_key) = emergency_organisation(&ctl, operator, d);
    ctl.pin_network(operator, board, &data);
    let manifest = std::fs::read_to_string(data.with_file_name("network.json")).unwrap();
    assert!(
        manifest.contains("er-north"),
        "the board signed the organisation in"
    );

    let keystore = d.join("keystore.db");
    let ks = keystore.to_str().unwrap();
    let imported = ctl.import_fhir(custodian, synthea().to_str().unwrap(), ks);
    assert_eq!(imported["patients"], 10, "{imported}");
    let patients = keystore_patients(&keystore);
    let (allowing, allowing_pseudonym, _) = &patients[0];
    let (_, refusing_pseudonym, _) = &patients[1];
    ctl.json(
        custodian,
        &["custodian", "consent", "--keystore", ks, "--broad"],
    );
    let policy = d.join("break-glass.json");
    std::fs::write(&policy, r#"{"base": "deny", "break_glass": "allow"}"#).unwrap();
    // A new consent version for the allowing patient alone, from `source`.
    let consent_of_allowing = |source: &str| {
        ctl.json(
            custodian,
            &[
                "custodian",
                "consent",
                "--keystore",
                ks,
                "--patient",
                allowing,
                source,
            ],
        )
    };
    consent_of_allowing(policy.to_str().unwrap());
    let granted = ctl.json(
        custodian,
        &["custodian", "emergency-grant", "--keystore", ks],
    );
    assert_eq!(granted["grants"], 1, "{granted}");
    assert_eq!(granted["not_allowed"], 9, "{granted}");

    // The patient's card: one line, their pseudonym and signature only.
    let card_file = d.join("card.txt");
    let card = ctl.json(
        custodian,
        &[
            "patient",
            "emergency-card",
            "--keystore",
            ks,
            "--patient",
            allowing,
            "--out",
            card_file.to_str().unwrap(),
        ],
    );
    let token = card["card"].as_str().unwrap().to_owned();
    assert!(token.starts_with("PBEC1.") && token.contains(allowing_pseudonym.as_str()));
    assert_eq!(mode(&card_file), 0o600);

    let er = d.join("er");
    let (org, out) = (org_key.to_str().unwrap(), er.to_str().unwrap());
    let opened = ctl.json(
        &clinician,
        &clinician_cmd(
            &[
                "break-glass",
                "--token",
                &token,
                "--reason",
                "unconscious after a fall",
            ],
            org,
            out,
        ),
    );
    let files = opened["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{opened}");
    let file = er.join(files[0].as_str().unwrap());
    assert!(file.starts_with(er.join(allowing_pseudonym)));
    let bundle: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        bundle["entry"][0]["resource"]["resourceType"], "Patient",
        "the full critical copy"
    );
    assert_eq!(mode(&file), 0o600);
    let access_id = opened["access_id"].as_str().unwrap().to_owned();
    // Within the window, the same clinician reopens it.
    ctl.json(
        &clinician,
        &clinician_cmd(&["reopen", "--access", &access_id], org, out),
    );

    // The patient who kept the default is refused, with a clear reason and no data.
    let refused = ctl.fails(
        &clinician,
        &clinician_cmd(
            &[
                "break-glass",
                "--patient",
                refusing_pseudonym,
                "--reason",
                "unconscious",
            ],
            org,
            out,
        ),
    );
    assert!(refused.contains("does not allow break-glass"), "{refused}");
    assert!(!refused.contains(refusing_pseudonym.as_str()), "{refused}");
    // No reason, no access: clap refuses before anything is sent.
    let no_reason = ctl.fails(
        &clinician,
        &clinician_cmd(&["break-glass", "--token", &token], org, out),
    );
    assert!(no_reason.contains("--reason"), "{no_reason}");

    // The patient is alerted at once: who, which organisation, why.
    let alerts = ctl.ok(
        custodian,
        &["patient", "alerts", "--keystore", ks, "--patient", allowing],
    );
    assert!(
        alerts.contains("break_glass")
            && alerts.contains("organisation=er-north")
            && alerts.contains("unconscious after a fall"),
        "{alerts}"
    );

    // The board's queue, and a logged review.
    let queue = ctl.json(board, &["board", "break-glass", "list", "--unreviewed"]);
    assert_eq!(queue.as_array().unwrap().len(), 1, "{queue}");
    assert_eq!(queue[0]["access_id"], access_id.as_str());
    ctl.ok(
        board,
        &[
            "board",
            "break-glass",
            "review",
            &access_id,
            "--finding",
            "ok",
            "--note",
            "justified",
        ],
    );
    let queue = ctl.json(board, &["board", "break-glass", "list", "--unreviewed"]);
    assert_eq!(queue.as_array().unwrap().len(), 0, "{queue}");
    let reviews = ctl.ok(
        board,
        &["board", "log", "show", "--kind", "break_glass_review"],
    );
    assert!(reviews.contains("break_glass_review"), "{reviews}");

    // Withdrawing the choice: the next break-glass is refused.
    consent_of_allowing("--broad");
    let refused = ctl.fails(
        &clinician,
        &clinician_cmd(
            &[
                "break-glass",
                "--token",
                &token,
                "--reason",
                "unconscious again",
            ],
            org,
            out,
        ),
    );
    assert!(refused.contains("does not allow break-glass"), "{refused}");
    drop(server);
    assert_log_verifies(&data);
}

/// `brokerctl clinician ARGS --org-key ORG --out OUT`.
fn clinician_cmd<'a>(args: &[&'a str], org: &'a str, out: &'a str) -> Vec<&'a str> {
    let mut v = vec!["clinician"];
    v.extend(args);
    v.extend(["--org-key", org, "--out", out]);
    v
}
