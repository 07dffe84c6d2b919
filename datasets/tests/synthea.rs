//! Import of the real Synthea sample (10 patient bundles plus the hospital and practitioner
//! bundles) from the shared data directory beside the repository.

use std::path::PathBuf;

use datasets::{DeidConfig, ImportReport, import_path};
use model::Category;
use serde_json::Value;

fn synthea_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/synthea-ma-11/fhir"
    ))
}

fn import() -> ImportReport {
    import_path(&synthea_dir(), &DeidConfig::default())
}

#[test]
fn imports_every_patient_without_errors() {
    let report = import();
    for e in &report.errors {
        eprintln!("{e}");
    }
    assert!(report.errors.is_empty(), "{} errors", report.errors.len());
    assert_eq!(report.patients.len(), 10);
    assert_eq!(report.files, 12);
    assert_eq!(report.resources, 4892);
    assert_eq!(report.skipped_files.len(), 2, "{:?}", report.skipped_files);
    for (path, reason) in &report.skipped_files {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("hospitalInformation") || name.starts_with("practitionerInformation")
        );
        assert!(reason.contains("no Patient"));
    }
    for p in &report.patients {
        for c in [
            Category::Demographics,
            Category::Conditions,
            Category::Observations,
            Category::Encounters,
            Category::Critical,
        ] {
            assert!(p.categories.contains_key(&c), "{} has no {c}", p.source_id);
        }
        assert!(!p.index.conditions.is_empty());
        assert!(!p.index.measurements.is_empty());
        assert!(!p.index.procedures.is_empty());
    }
    // Synthea's sample has opioid-use and mental-health screenings: the sensitive categories
    // are populated, and contraception counselling etc. stays where it belongs.
    assert!(
        report
            .patients
            .iter()
            .all(|p| p.categories.contains_key(&Category::MentalHealth))
    );
    assert!(
        report
            .patients
            .iter()
            .any(|p| p.categories.contains_key(&Category::SexualHealth))
    );
    assert!(
        report
            .patients
            .iter()
            .any(|p| p.categories.contains_key(&Category::Allergies))
    );
}

#[test]
fn research_copy_contains_no_identifier() {
    let report = import();
    for p in &report.patients {
        assert!(
            p.identifiers.len() >= 8,
            "{}: {:?}",
            p.source_id,
            p.identifiers
        );
        // The MRN is Synthea's patient id.
        assert!(p.identifiers.contains(&p.source_id));
        for (category, bytes) in &p.categories {
            let text = std::str::from_utf8(bytes).unwrap();
            if *category == Category::Critical {
                // The break-glass copy is the full Patient.
                assert!(p.identifiers.iter().all(|id| text.contains(id.as_str())));
                continue;
            }
            let lower = text.to_lowercase();
            for id in &p.identifiers {
                assert!(
                    !lower.contains(&id.to_lowercase()),
                    "{}: {category} contains {id:?}",
                    p.source_id
                );
            }
            // No free-text narrative, notes or attachments survive.
            for marker in [
                "\"div\"",
                "\"note\"",
                "\"presentedForm\"",
                "\"data\"",
                "urn:uuid:",
                "Practitioner?",
                "Dr. ",
            ] {
                assert!(
                    !text.contains(marker),
                    "{}: {category} contains {marker}",
                    p.source_id
                );
            }
        }
    }
}

#[test]
fn birth_years_and_sex_match_the_source() {
    let report = import();
    for p in &report.patients {
        let file = std::fs::read_dir(synthea_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|f| {
                f.to_str()
                    .unwrap()
                    .ends_with(&format!("{}.json", p.source_id))
            })
            .unwrap();
        let bundle: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        let patient = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["resource"])
            .find(|r| r["resourceType"] == "Patient")
            .unwrap();
        let year: i32 = patient["birthDate"].as_str().unwrap()[..4].parse().unwrap();
        assert_eq!(p.index.person.birth_year, Some(year));
        assert_eq!(p.index.person.sex, patient["gender"].as_str().unwrap());
        let demo = p.bundle(Category::Demographics).unwrap();
        assert_eq!(demo["entry"][0]["resource"]["birthDate"], year.to_string());
        // Dates in the research copy are years; the index keeps full dates.
        let conditions = std::str::from_utf8(&p.categories[&Category::Conditions]).unwrap();
        assert!(
            !conditions.contains("T00:")
                && !conditions.contains(&patient["birthDate"].as_str().unwrap()[..7])
        );
        assert!(p.index.conditions.iter().all(|c| c.date.len() == 10));
    }
}

#[test]
fn importing_twice_gives_identical_bytes() {
    let a = import();
    let b = import();
    assert_eq!(a.patients.len(), b.patients.len());
    for (x, y) in a.patients.iter().zip(&b.patients) {
        assert_eq!(x.source_id, y.source_id);
        assert_eq!(x.categories, y.categories);
        assert_eq!(x.index, y.index);
        assert_eq!(x.identifiers, y.identifiers);
    }
}

#[test]
fn critical_holds_allergies_and_active_medications() {
    let report = import();
    for p in &report.patients {
        let critical = p.bundle(Category::Critical).unwrap();
        let entries = critical["entry"].as_array().unwrap();
        assert_eq!(entries[0]["resource"]["resourceType"], "Patient");
        assert!(
            entries[0]["resource"]["name"].is_array(),
            "not de-identified"
        );
        for e in &entries[1..] {
            let r = &e["resource"];
            match r["resourceType"].as_str().unwrap() {
                "AllergyIntolerance" | "Device" | "Observation" => {}
                "MedicationRequest" => assert_eq!(r["status"], "active"),
                other => panic!("{other} in critical"),
            }
        }
        if p.categories.contains_key(&Category::Allergies) {
            assert!(
                entries
                    .iter()
                    .any(|e| e["resource"]["resourceType"] == "AllergyIntolerance")
            );
        }
    }
}
