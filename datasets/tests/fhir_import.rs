//! The importer on hand-made and damaged input: bad files, bad resources, NDJSON, the 90+
//! rule, references by `Patient/<id>` and `urn:uuid:`, medication references.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use datasets::{
    DeidConfig, ImportReport, PatientRecord, Population, import_bundle_json, import_path,
};
use model::Category;
use serde_json::{Value, json};

fn cfg() -> DeidConfig {
    DeidConfig::new(2026)
}

fn write_json(path: &Path, v: &Value) {
    fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// Entries of a research-copy category, as a set of canonical strings (order-free).
fn entry_set(record: &PatientRecord, category: Category) -> BTreeSet<String> {
    record
        .bundle(category)
        .map(|b| {
            b["entry"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn assert_no_patient_data_in_errors(report: &ImportReport, identifiers: &[String]) {
    for e in &report.errors {
        let text = e.to_string();
        for id in identifiers {
            assert!(
                !text.contains(id.as_str()),
                "error {text:?} contains {id:?}"
            );
        }
    }
}

#[test]
fn a_file_that_is_not_json_is_one_error_and_the_others_import() {
    let dir = tempfile::tempdir().unwrap();
    let pop = Population::new(1, 2);
    write_json(&dir.path().join("a.json"), &pop.bundle(0));
    fs::write(
        dir.path().join("b.json"),
        b"{\n  \"resourceType\": \"Bundle\",\n  \"entry\": [\n",
    )
    .unwrap();
    fs::write(dir.path().join("c.json"), b"\xff\xfe not utf-8").unwrap();
    fs::create_dir(dir.path().join("nested")).unwrap();
    write_json(&dir.path().join("nested/d.json"), &pop.bundle(1));
    fs::write(dir.path().join("README.txt"), b"hello").unwrap();
    fs::write(dir.path().join(".hidden.json"), b"not even json").unwrap();

    let report = import_path(dir.path(), &cfg());
    assert_eq!(report.patients.len(), 2, "{:?}", report.errors);
    assert_eq!(report.files, 4);
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    let b = &report.errors[0];
    assert!(b.file.ends_with("b.json"));
    assert_eq!(b.line, Some(4));
    assert!(
        b.reason.starts_with("invalid JSON at line 4"),
        "{}",
        b.reason
    );
    assert!(
        b.to_string()
            .starts_with(&format!("{}:4: invalid JSON", b.file.display())),
        "{b}"
    );
    assert!(report.errors[1].file.ends_with("c.json"));
    assert!(report.errors[1].reason.contains("UTF-8"));
    assert_eq!(report.skipped_files.len(), 1);
    assert!(report.skipped_files[0].0.ends_with("README.txt"));
    assert_eq!(report.patients[0], pop.patient(0));
    assert_eq!(report.patients[1], pop.patient(1));
}

#[test]
fn a_missing_path_is_an_error() {
    let report = import_path(Path::new("/nonexistent/datasets-test"), &cfg());
    assert_eq!(report.errors.len(), 1);
    assert!(report.patients.is_empty());
}

#[test]
fn malformed_resources_are_reported_and_the_rest_of_the_patient_imports() {
    let pop = Population::new(9, 1);
    let good_bundle = pop.bundle(0);
    let good = pop.patient(0);
    let mut bundle = good_bundle.clone();
    let entries = bundle["entry"].as_array_mut().unwrap();

    let find = |entries: &Vec<Value>, pred: &dyn Fn(&Value) -> bool| {
        entries.iter().position(|e| pred(&e["resource"])).unwrap()
    };
    // An Observation whose value is not a number.
    let weight = find(entries, &|r| r["code"]["coding"][0]["code"] == "29463-7");
    entries[weight]["resource"]["valueQuantity"]["value"] = json!("heavy");
    let weight_id = entries[weight]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A Condition without a code.
    let condition = find(entries, &|r| r["resourceType"] == "Condition");
    entries[condition]["resource"]
        .as_object_mut()
        .unwrap()
        .remove("code");
    // A procedure with a date that is not a date.
    let procedure = find(entries, &|r| r["resourceType"] == "Procedure");
    entries[procedure]["resource"]["performedPeriod"]["start"] = json!("last Tuesday");
    // An encounter of a patient that is not in the file.
    let encounter = find(entries, &|r| r["resourceType"] == "Encounter");
    entries[encounter]["resource"]["subject"]["reference"] = json!("Patient/someone-else");
    // Not an object; no resourceType; an entry without a resource.
    entries.push(json!({"resource": "oops"}));
    entries.push(json!({"resource": {"id": "x1", "status": "final"}}));
    entries.push(json!({"fullUrl": "urn:uuid:nothing"}));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("patient.json");
    write_json(&file, &bundle);
    let report = import_path(&file, &cfg());
    assert_eq!(report.files, 1);
    for e in &report.errors {
        eprintln!("{e}");
    }
    assert_eq!(report.patients.len(), 1);
    assert_eq!(report.errors.len(), 7);
    let by_reason = |s: &str| {
        report
            .errors
            .iter()
            .find(|e| e.reason.contains(s))
            .unwrap_or_else(|| panic!("no error {s}"))
    };

    let e = by_reason("valueQuantity.value is not a number");
    assert_eq!(e.resource_type.as_deref(), Some("Observation"));
    assert_eq!(e.resource_id.as_deref(), Some(weight_id.as_str()));
    assert_eq!(e.file, file);
    let entry = e.entry.expect("a Bundle entry names its index");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: Bundle.entry[{entry}]: Observation/{weight_id}: valueQuantity.value is not a number",
            file.display()
        )
    );
    assert_eq!(
        by_reason("Condition.code is missing")
            .resource_type
            .as_deref(),
        Some("Condition")
    );
    assert_eq!(
        by_reason("performedPeriod.start is not a valid date")
            .resource_type
            .as_deref(),
        Some("Procedure")
    );
    assert_eq!(
        by_reason("does not match any Patient")
            .resource_type
            .as_deref(),
        Some("Encounter")
    );
    assert!(by_reason("not a JSON object").resource_type.is_none());
    assert_eq!(
        by_reason("no resourceType").resource_id.as_deref(),
        Some("x1")
    );
    by_reason("has no resource");
    assert_no_patient_data_in_errors(&report, &good.identifiers);

    // Everything else of the patient is there: exactly the broken resources are missing.
    let got = &report.patients[0];
    assert_eq!(got.identifiers, good.identifiers);
    assert_eq!(got.index.person, good.index.person);
    assert_eq!(
        got.index.measurements.len() + 1,
        good.index.measurements.len()
    );
    assert_eq!(got.index.conditions.len() + 1, good.index.conditions.len());
    assert_eq!(got.index.procedures.len() + 1, good.index.procedures.len());
    assert_eq!(got.index.drugs, good.index.drugs);
    let lost: usize = Category::ALL
        .iter()
        .filter(|c| **c != Category::Critical)
        .map(|c| entry_set(&good, *c).difference(&entry_set(got, *c)).count())
        .sum();
    assert_eq!(lost, 4);
}

#[test]
fn a_patient_with_a_bad_birth_date_still_imports() {
    let mut bundle = Population::new(4, 1).bundle(0);
    bundle["entry"][0]["resource"]["birthDate"] = json!("1980-13-45");
    let report = import_bundle_json(
        &serde_json::to_vec(&bundle).unwrap(),
        Path::new("p.json"),
        &cfg(),
    );
    assert_eq!(report.patients.len(), 1);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].resource_type.as_deref(), Some("Patient"));
    assert_eq!(
        report.errors[0].reason,
        "birthDate is not a valid date/dateTime"
    );
    assert_eq!(report.patients[0].index.person.birth_year, None);
    assert!(report.patients[0].index.measurements.len() > 3);
}

#[test]
fn ndjson_files_are_joined_by_patient_and_a_bad_line_is_reported() {
    let pop = Population::new(21, 3);
    let dir = tempfile::tempdir().unwrap();
    // One file per resource type, the Observations split over two files, as bulk data does.
    let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for i in 0..3 {
        for e in pop.bundle(i)["entry"].as_array().unwrap() {
            let r = &e["resource"];
            by_type
                .entry(r["resourceType"].as_str().unwrap().to_string())
                .or_default()
                .push(r.to_string());
        }
    }
    for (ty, lines) in &by_type {
        if ty == "Observation" {
            let (a, b) = lines.split_at(lines.len() / 2);
            let mut a = a.to_vec();
            a.insert(2, "{\"resourceType\": \"Observation\", ".to_string());
            a.insert(4, String::new());
            a.insert(5, "[1, 2]".to_string());
            fs::write(dir.path().join("Observation.000.ndjson"), a.join("\n")).unwrap();
            fs::write(
                dir.path().join("Observation.001.ndjson"),
                b.join("\n") + "\n",
            )
            .unwrap();
        } else {
            fs::write(
                dir.path().join(format!("{ty}.ndjson")),
                lines.join("\n") + "\n",
            )
            .unwrap();
        }
    }
    let report = import_path(dir.path(), &cfg());
    for e in &report.errors {
        eprintln!("{e}");
    }
    assert_eq!(report.patients.len(), 3);
    assert_eq!(report.errors.len(), 2);
    let bad = &report.errors[0];
    assert!(bad.file.ends_with("Observation.000.ndjson"));
    assert_eq!(bad.line, Some(3));
    assert!(
        bad.reason.starts_with("invalid JSON at column"),
        "{}",
        bad.reason
    );
    assert_eq!(report.errors[1].line, Some(6));
    assert!(report.errors[1].reason.contains("not a JSON object"));
    assert!(report.skipped_files.is_empty());
    // Same content as the Bundle import, up to resource order.
    for (i, got) in report.patients.iter().enumerate() {
        let want = pop.patient(i);
        assert_eq!(got.source_id, want.source_id);
        assert_eq!(got.identifiers, want.identifiers);
        assert_eq!(got.index.person, want.index.person);
        for c in Category::ALL {
            assert_eq!(entry_set(got, c), entry_set(&want, c), "patient {i} {c}");
        }
    }
}

#[test]
fn ndjson_from_memory() {
    let patient =
        json!({"resourceType": "Patient", "id": "p9", "gender": "other", "birthDate": "2001-07"});
    let obs = json!({"resourceType": "Observation", "id": "o1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/p9"}, "effectiveDateTime": "2024-05-06T07:08:09+02:00",
        "valueQuantity": {"value": 61.5, "unit": "/min", "code": "/min"}});
    let text = format!("{obs}\r\n\n{patient}\n");
    let report = datasets::import_ndjson_bytes(text.as_bytes(), Path::new("mem.ndjson"), &cfg());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.resources, 2);
    let p = &report.patients[0];
    assert_eq!(p.index.person.birth_year, Some(2001));
    assert_eq!(p.index.person.sex, "other");
    let m = &p.index.measurements[0];
    assert_eq!(
        (
            m.system.as_str(),
            m.code.as_str(),
            m.date.as_str(),
            m.value,
            m.unit.as_str()
        ),
        ("loinc", "8867-4", "2024-05-06", Some(61.5), "/min")
    );
}

#[test]
fn ndjson_without_patients_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let obs = json!({"resourceType": "Observation", "id": "o1", "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/p1"}, "valueQuantity": {"value": 60}});
    fs::write(dir.path().join("Observation.ndjson"), obs.to_string()).unwrap();
    let report = import_path(dir.path(), &cfg());
    assert!(report.errors.is_empty());
    assert!(report.patients.is_empty());
    assert_eq!(report.skipped_files.len(), 1);
}

fn tiny_bundle(birth_date: &str) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": birth_date,
                          "name": [{"family": "Quimby-Arkwright", "given": ["Philomena"]}],
                          "address": [{"line": ["7 Lantern Row"], "city": "Hatfield", "postalCode": "01038"}]}},
            {"fullUrl": "urn:uuid:c1",
             "resource": {"resourceType": "Condition", "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes mellitus type 2 (disorder)"}]},
                          "subject": {"reference": "Patient/p1"}, "onsetDateTime": "1975-06-01T10:00:00Z",
                          "note": [{"text": "Philomena prefers mornings"}]}},
            {"fullUrl": "urn:uuid:m1",
             "resource": {"resourceType": "Medication", "id": "m1", "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975", "display": "Metformin"}]}}},
            {"resource": {"resourceType": "MedicationRequest", "id": "mr1", "status": "active", "intent": "order",
                          "medicationReference": {"reference": "urn:uuid:m1"},
                          "subject": {"reference": "https://ehr.example.org/fhir/Patient/p1/_history/3"},
                          "reasonReference": [{"reference": "urn:uuid:c1", "display": "Diabetes"}],
                          "authoredOn": "1975-06-02"}},
            {"resource": {"resourceType": "Observation", "id": "bt", "status": "final",
                          "code": {"coding": [{"system": "http://loinc.org", "code": "882-1"}]},
                          "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2001-01-01",
                          "valueCodeableConcept": {"text": "O positive"}}},
            {"resource": {"resourceType": "Practitioner", "id": "dr", "name": [{"family": "Zwicky"}]}}
        ]
    })
}

#[test]
fn patients_over_89_are_bucketed() {
    let bytes = serde_json::to_vec(&tiny_bundle("1921-03-04")).unwrap();
    let report = import_bundle_json(&bytes, Path::new("old.json"), &cfg());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let p = &report.patients[0];
    assert_eq!(p.source_id, "p1");
    assert_eq!(p.index.person.birth_year, Some(2026 - 90));
    assert_eq!(p.index.person.sex, "female");
    let demo = p.bundle(Category::Demographics).unwrap();
    let patient = &demo["entry"][0]["resource"];
    assert!(patient.get("birthDate").is_none());
    assert_eq!(patient["_birthDate"]["extension"][0]["valueCode"], "masked");
    assert!(
        patient["extension"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["valueString"] == "90+")
    );
    for (c, bytes) in &p.categories {
        if *c != Category::Critical {
            assert!(!String::from_utf8_lossy(bytes).contains("1921"), "{c}");
        }
    }
    // A patient of 89 keeps the year.
    let bytes = serde_json::to_vec(&tiny_bundle("1937-12-31")).unwrap();
    let p = &import_bundle_json(&bytes, Path::new("young.json"), &cfg()).patients[0];
    assert_eq!(p.index.person.birth_year, Some(1937));
    assert_eq!(
        p.bundle(Category::Demographics).unwrap()["entry"][0]["resource"]["birthDate"],
        "1937"
    );
    // The age is taken at death: born 1926, died at 55, 80 or 88, never 90+; died at 95
    // in 1990, bucketed as 90 then.
    let deceased = |born: &str, died: &str| {
        let mut bundle = tiny_bundle(born);
        bundle["entry"][0]["resource"]["deceasedDateTime"] = json!(died);
        let bytes = serde_json::to_vec(&bundle).unwrap();
        import_bundle_json(&bytes, Path::new("deceased.json"), &cfg())
            .patients
            .remove(0)
    };
    for (born, died) in [
        ("1926-02-03", "1981-05-05"),
        ("1900-01-01", "1980-01-01T10:00:00Z"),
        ("1930-06-01", "2018-06-01"),
    ] {
        let p = deceased(born, died);
        let year: i32 = born[..4].parse().unwrap();
        assert_eq!(p.index.person.birth_year, Some(year), "{born} {died}");
        assert_eq!(
            p.bundle(Category::Demographics).unwrap()["entry"][0]["resource"]["birthDate"],
            born[..4],
            "{born} {died}"
        );
    }
    let p = deceased("1895-03-04", "1990-07-08");
    assert_eq!(p.index.person.birth_year, Some(1900));
    let patient = &p.bundle(Category::Demographics).unwrap()["entry"][0]["resource"];
    assert!(patient.get("birthDate").is_none(), "{patient}");
    assert_eq!(patient["_birthDate"]["extension"][0]["valueCode"], "masked");
}

#[test]
fn references_medications_and_critical() {
    let bytes = serde_json::to_vec(&tiny_bundle("1950-01-01")).unwrap();
    let report = import_bundle_json(&bytes, Path::new("tiny.json"), &cfg());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.resources, 6);
    let p = &report.patients[0];
    assert_eq!(
        p.identifiers,
        ["Philomena", "Quimby-Arkwright", "7 Lantern Row", "Hatfield"]
    );
    // The medication given by reference is indexed and inlined in the research copy.
    assert_eq!(p.index.drugs.len(), 1);
    assert_eq!(
        (
            p.index.drugs[0].system.as_str(),
            p.index.drugs[0].code.as_str()
        ),
        ("rxnorm", "860975")
    );
    assert_eq!(p.index.drugs[0].date, "1975-06-02");
    let meds = p.bundle(Category::Medications).unwrap();
    let mr = &meds["entry"][0]["resource"];
    assert_eq!(
        mr["medicationCodeableConcept"]["coding"][0]["code"],
        "860975"
    );
    assert_eq!(mr["medicationReference"], json!({"type": "Medication"}));
    assert_eq!(mr["subject"], json!({"reference": "Patient/subject"}));
    assert_eq!(mr["reasonReference"], json!([{"type": "Condition"}]));
    assert_eq!(mr["authoredOn"], "1975");
    // Condition without id, notes dropped.
    let cond = &p.bundle(Category::Conditions).unwrap()["entry"][0]["resource"];
    assert!(cond.get("note").is_none());
    assert_eq!(cond["onsetDateTime"], "1975");
    assert_eq!(p.index.conditions[0].date, "1975-06-01");
    // Observation with a code-only value is indexed without a value.
    assert_eq!(p.index.measurements.len(), 1);
    assert_eq!(p.index.measurements[0].value, None);
    // Critical: the full Patient, the active request and the blood type.
    let critical = p.bundle(Category::Critical).unwrap();
    let types: Vec<&str> = critical["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Patient", "MedicationRequest", "Observation"]);
    assert_eq!(
        critical["entry"][0]["resource"]["name"][0]["family"],
        "Quimby-Arkwright"
    );
    // No practitioner anywhere.
    assert!(
        p.categories
            .values()
            .all(|b| !String::from_utf8_lossy(b).contains("Zwicky"))
    );
}

#[test]
fn patients_referenced_by_full_url_only() {
    // A transaction bundle whose Patient has an id and a different urn:uuid fullUrl, which
    // the other entries use.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:4c1d8e52-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient", "id": "mrn-77", "gender": "male", "birthDate": "1960"}},
        {"fullUrl": "urn:uuid:4c1d8e52-0000-4000-8000-000000000002",
         "resource": {"resourceType": "Procedure", "code": {"coding": [{"system": "http://snomed.info/sct", "code": "73761001"}]},
                      "subject": {"reference": "urn:uuid:4c1d8e52-0000-4000-8000-000000000001"},
                      "performedDateTime": "2020-02-02"}}]});
    let report = import_bundle_json(
        &serde_json::to_vec(&bundle).unwrap(),
        Path::new("t.json"),
        &cfg(),
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let p = &report.patients[0];
    assert_eq!(p.source_id, "mrn-77");
    assert_eq!(p.index.procedures.len(), 1);
    assert_eq!(p.index.procedures[0].date, "2020-02-02");
    let procedure = &p.bundle(Category::Procedures).unwrap()["entry"][0]["resource"];
    assert_eq!(
        procedure["subject"],
        json!({"reference": "Patient/subject"})
    );
    // The id came from fullUrl and was replaced by a pseudonymous one.
    assert_eq!(procedure["id"].as_str().unwrap().len(), 16);
}

#[test]
fn a_bundle_without_patient_is_skipped_not_an_error() {
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Organization", "id": "o", "name": "Clinic"}}]});
    let report = import_bundle_json(
        &serde_json::to_vec(&bundle).unwrap(),
        Path::new("org.json"),
        &cfg(),
    );
    assert!(report.errors.is_empty());
    assert!(report.patients.is_empty());
    assert_eq!(report.skipped_files.len(), 1);
}

#[test]
fn unknown_types_are_counted_per_file_and_entry_errors_name_their_entry() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1", "gender": "female"}},
        {"resource": {"resourceType": "Pokemon", "id": "x"}},
        {"resource": {"resourceType": "Organization", "id": "o"}},
        42,
        {"resource": "not an object"},
        {"resource": {"resourceType": "Pokemon"}},
        {"fullUrl": "urn:uuid:1"},
    ]});
    write_json(&dir.path().join("a.json"), &bundle);
    write_json(
        &dir.path().join("b.json"),
        &json!({"resourceType": "Digimon", "id": "d"}),
    );
    let report = import_path(dir.path(), &cfg());
    assert_eq!(report.patients.len(), 1);
    let a = dir.path().join("a.json");
    let b = dir.path().join("b.json");
    assert_eq!(report.unknown_types[&a]["Pokemon"], 2);
    assert_eq!(report.unknown_types[&b]["Digimon"], 1);
    assert_eq!(report.unknown_types.len(), 2);
    assert_eq!(report.not_imported["Organization"], 1);
    // b.json has no Patient: named among the skipped files, with its reason.
    assert!(
        report
            .skipped_files
            .iter()
            .any(|(f, why)| f == &b && why.contains("no Patient")),
        "{:?}",
        report.skipped_files
    );
    let errors: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
    for (entry, what) in [
        (3, "the entry is not an object"),
        (4, "resource is not a JSON object"),
        (6, "the entry has no resource"),
    ] {
        let want = format!("a.json: Bundle.entry[{entry}]: ");
        assert!(
            errors.iter().any(|e| e.contains(&want) && e.contains(what)),
            "no `{want}…{what}` in {errors:#?}"
        );
    }
    assert_eq!(report.errors.len(), 3, "{errors:#?}");
    assert!(report.errors.iter().all(|e| e.entry.is_some()));
}

/// Bundles are read entry by entry: whatever the order of their members, with the same
/// result as before; a document that is not a Bundle but has an `entry` member, a Bundle
/// whose `entry` is not an array and broken JSON in the middle of the entries are each
/// told apart.
#[test]
fn bundles_stream_whatever_the_member_order_and_shape() {
    let population = Population::with_config(3, 2, cfg());
    let bundle = population.bundle(1);
    let want = import_bundle_json(
        &serde_json::to_vec(&bundle).unwrap(),
        "a.json".as_ref(),
        &cfg(),
    );
    assert!(want.errors.is_empty(), "{:?}", want.errors);
    assert_eq!(want.patients[0], population.patient(1));
    // `entry` before `resourceType`, written by hand so that the order holds.
    let entries = serde_json::to_string(&bundle["entry"]).unwrap();
    let reordered =
        format!(r#"{{"entry": {entries}, "type": "transaction", "resourceType": "Bundle"}}"#);
    let got = import_bundle_json(reordered.as_bytes(), "b.json".as_ref(), &cfg());
    assert!(got.errors.is_empty(), "{:?}", got.errors);
    assert_eq!(got.patients, want.patients);
    assert_eq!(got.resources, want.resources);

    // A List has a top-level `entry` too: it is a resource of another type, counted.
    let list =
        br#"{"entry": [{"item": {"reference": "Patient/x"}}], "resourceType": "List", "id": "l"}"#;
    let report = import_bundle_json(list, "list.json".as_ref(), &cfg());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.resources, 1);
    assert_eq!(report.not_imported["List"], 1);

    let report = import_bundle_json(
        br#"{"resourceType": "Bundle", "entry": {"resource": {}}}"#,
        "c.json".as_ref(),
        &cfg(),
    );
    assert_eq!(report.errors.len(), 1);
    assert!(
        report.errors[0]
            .reason
            .contains("Bundle.entry is not an array"),
        "{:?}",
        report.errors
    );

    let broken = format!(
        "{{\"resourceType\": \"Bundle\",\n\"entry\": [{}, \n{{\"resource\": }}]}}",
        serde_json::to_string(&bundle["entry"][0]).unwrap()
    );
    let report = import_bundle_json(broken.as_bytes(), "d.json".as_ref(), &cfg());
    assert!(report.patients.is_empty());
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].line, Some(3), "{:?}", report.errors);
    assert!(
        report.errors[0]
            .reason
            .starts_with("invalid JSON at line 3"),
        "{:?}",
        report.errors
    );
}
