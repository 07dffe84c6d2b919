//! The synthetic population: determinism, independence of patients, plausible
//! distributions, and the same pipeline as FHIR imports.

use std::path::Path;

use datasets::{DeidConfig, Population, import_bundle_json};
use model::Category;

#[test]
fn same_seed_same_bytes_different_seed_different_bytes() {
    let a = Population::new(7, 50);
    let b = Population::new(7, 50);
    let c = Population::new(8, 50);
    for i in [0, 1, 17, 49] {
        let (pa, pb, pc) = (a.patient(i), b.patient(i), c.patient(i));
        assert_eq!(pa, pb);
        assert_eq!(pa.categories, pb.categories);
        assert_ne!(pa.categories, pc.categories);
        assert_ne!(pa.identifiers, pc.identifiers);
    }
    // iter() and patient(i) agree, and a parallel collect keeps the order.
    let seq: Vec<_> = a.iter().take(5).collect();
    for (i, r) in seq.iter().enumerate() {
        assert_eq!(*r, a.patient(i));
    }
    let par: Vec<_> = {
        use rayon::prelude::*;
        Population::new(7, 5).par_iter().collect()
    };
    assert_eq!(par, seq);
}

#[test]
fn any_patient_of_a_million_is_generated_alone() {
    let pop = Population::new(42, 1_000_000);
    assert_eq!(pop.len(), 1_000_000);
    let last = pop.patient(999_999);
    assert_eq!(last.source_id, "synth-999999");
    assert!(last.categories.contains_key(&Category::Demographics));
    assert!(last.categories.contains_key(&Category::Critical));
    assert_eq!(
        last,
        Population::new(42, 10).patient(999_999),
        "a patient does not depend on the population size"
    );
}

#[test]
fn research_copy_never_contains_identifiers() {
    let pop = Population::new(3, 300);
    for r in pop.iter() {
        assert!(r.identifiers.len() >= 6, "{:?}", r.identifiers);
        for (category, bytes) in &r.categories {
            if *category == Category::Critical {
                continue;
            }
            let text = std::str::from_utf8(bytes).unwrap();
            for id in &r.identifiers {
                assert!(
                    !text.contains(id.as_str()),
                    "{} leaks {id:?} in {category}",
                    r.source_id
                );
            }
            assert!(!text.contains(&r.source_id));
        }
        // Break-glass copy is the full record.
        let critical = std::str::from_utf8(&r.categories[&Category::Critical]).unwrap();
        assert!(
            r.identifiers
                .iter()
                .all(|id| critical.contains(id.as_str()))
        );
    }
}

#[test]
fn same_pipeline_as_fhir_import() {
    let pop = Population::new(11, 20);
    for i in 0..20 {
        let bundle = pop.bundle(i);
        let bytes = serde_json::to_vec(&bundle).unwrap();
        let report = import_bundle_json(&bytes, Path::new("synthetic.json"), pop.config());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.patients.len(), 1);
        assert_eq!(report.patients[0], pop.patient(i));
    }
}

#[test]
fn index_only_generation_matches_full_records() {
    let pop = Population::new(5, 10);
    for i in 0..10 {
        assert_eq!(pop.index(i), pop.patient(i).index);
    }
}

#[test]
fn sensitive_conditions_land_in_sensitive_categories() {
    use rayon::prelude::*;
    let pop = Population::new(2024, 400);
    let records: Vec<_> = pop.par_iter().collect();
    let sensitive = [
        ("35489007", Category::MentalHealth),
        ("197480006", Category::MentalHealth),
        ("7200002", Category::SubstanceUse),
        ("86406008", Category::SexualHealth),
    ];
    let mut seen = 0;
    for r in &records {
        let text = |c: Category| {
            r.categories
                .get(&c)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let conditions = text(Category::Conditions);
        for (code, category) in sensitive {
            let quoted = format!("\"{code}\"");
            assert!(!conditions.contains(&quoted), "{code} in conditions");
            if r.index.conditions.iter().any(|c| c.code == code) {
                seen += 1;
                assert!(text(category).contains(&quoted), "{code} not in {category}");
            }
        }
        // PHQ-2 (mental health) and smoking status (substance use) never sit in observations.
        let observations = text(Category::Observations);
        assert!(!observations.contains("\"55758-7\"") && !observations.contains("\"72166-2\""));
    }
    assert!(seen > 20, "{seen}");
}

#[test]
fn distributions_are_plausible() {
    use rayon::prelude::*;
    let cfg = DeidConfig::new(2026);
    let pop = Population::with_config(2024, 5_000, cfg);
    let records: Vec<_> = (0..pop.len())
        .into_par_iter()
        .map(|i| pop.index(i))
        .collect();
    let n = records.len() as f64;
    let has = |code: &str| {
        records
            .iter()
            .filter(|r| {
                r.conditions
                    .iter()
                    .any(|c| c.system == "snomed" && c.code == code)
            })
            .count() as f64
            / n
    };

    let female = records.iter().filter(|r| r.person.sex == "female").count() as f64 / n;
    assert!((0.45..=0.55).contains(&female), "female share {female}");

    let bucketed = records
        .iter()
        .filter(|r| r.person.birth_year == Some(2026 - 90))
        .count();
    assert!((10..=150).contains(&bucketed), "90+ patients: {bucketed}");
    assert!(records.iter().all(|r| {
        r.person
            .birth_year
            .is_some_and(|y| (2026 - 90..=2025).contains(&y))
    }));
    let children = records
        .iter()
        .filter(|r| r.person.birth_year.unwrap_or(0) >= 2026 - 18)
        .count() as f64
        / n;
    assert!((0.15..=0.30).contains(&children), "children {children}");

    let htn = has("38341003");
    assert!((0.18..=0.38).contains(&htn), "hypertension {htn}");
    let dm = has("44054006");
    assert!((0.05..=0.15).contains(&dm), "diabetes {dm}");
    let asthma = has("195967001");
    assert!((0.05..=0.11).contains(&asthma), "asthma {asthma}");
    let depression = has("35489007");
    assert!(
        (0.04..=0.14).contains(&depression),
        "depression {depression}"
    );
    let hiv = has("86406008");
    assert!(hiv < 0.01, "hiv {hiv}");

    // Diabetics have higher HbA1c than the rest.
    let mean_a1c = |diabetic: bool| {
        let vals: Vec<f64> = records
            .iter()
            .filter(|r| r.conditions.iter().any(|c| c.code == "44054006") == diabetic)
            .flat_map(|r| {
                r.measurements
                    .iter()
                    .filter(|m| m.code == "4548-4")
                    .filter_map(|m| m.value)
            })
            .collect();
        assert!(!vals.is_empty());
        vals.iter().sum::<f64>() / vals.len() as f64
    };
    let (d, nd) = (mean_a1c(true), mean_a1c(false));
    assert!(d > nd + 1.0, "HbA1c diabetic {d} vs other {nd}");

    // Labs, vitals and drugs carry units and dates within the simulated years.
    let ldl = records
        .iter()
        .flat_map(|r| &r.measurements)
        .find(|m| m.code == "18262-6")
        .unwrap();
    assert_eq!(ldl.unit, "mg/dL");
    let systolic = records
        .iter()
        .flat_map(|r| &r.measurements)
        .find(|m| m.code == "8480-6")
        .unwrap();
    assert_eq!(systolic.unit, "mm[Hg]");
    assert!(
        records
            .iter()
            .flat_map(|r| &r.measurements)
            .filter(|m| m.value.is_some())
            .all(|m| m.date.len() == 10 && ("2023".."2026").contains(&&m.date[..4]))
    );
    assert!(
        records
            .iter()
            .flat_map(|r| &r.drugs)
            .any(|d| d.system == "rxnorm" && d.code == "860975")
    );
    assert!(
        records
            .iter()
            .flat_map(|r| &r.procedures)
            .any(|p| p.code == "73761001")
    );
}

/// Safe Harbor at scale: 4,000 generated patients with deaths, `Age` observations,
/// `onsetAge` and `onsetRange` (`with_life_events`), through the FHIR importer. No research
/// copy keeps a date finer than the year, an age over 89, or (in the 90+ bucket, decided on
/// the age this year or at death) a birth year, an age or a year before the bucket year;
/// no index row states an age over 89 or, in the bucket, is dated before its year.
#[test]
fn life_events_keep_no_date_or_age_that_safe_harbor_removes() {
    use rayon::prelude::*;
    use serde_json::Value;
    let cfg = DeidConfig::new(2026);
    let pop = Population::with_config(90, 4_000, cfg).with_life_events();
    // The same population without them: every other resource is the same, in order.
    let plain = Population::with_config(90, 4_000, cfg);
    for i in 0..20 {
        let (with, without) = (pop.bundle(i), plain.bundle(i));
        let (with, without) = (
            with["entry"].as_array().unwrap(),
            without["entry"].as_array().unwrap(),
        );
        assert!(with.len() > without.len());
        assert_eq!(with[1..without.len()], without[1..], "patient {i}");
    }
    let years_of = |value: f64, unit: &str| match unit {
        "a" => Some(value),
        "mo" => Some(value / 12.0),
        _ => None,
    };
    let seen: Vec<[bool; 4]> = (0..pop.len())
        .into_par_iter()
        .map(|i| {
            let bundle = pop.bundle(i);
            let patient = &bundle["entry"][0]["resource"];
            let year = |k: &str| patient[k].as_str().map(|s| s[..4].parse::<i32>().unwrap());
            let (born, died) = (year("birthDate").unwrap(), year("deceasedDateTime"));
            let bucket = cfg.bucket_year(born, died);
            let report = import_bundle_json(
                &serde_json::to_vec(&bundle).unwrap(),
                Path::new("p.json"),
                &cfg,
            );
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            let record = &report.patients[0];
            let mut ages = 0;
            for (category, bytes) in &record.categories {
                if *category == Category::Critical {
                    continue;
                }
                let doc: Value = serde_json::from_slice(bytes).unwrap();
                let mut stack = vec![&doc];
                while let Some(v) = stack.pop() {
                    match v {
                        Value::String(s) => {
                            let b = s.as_bytes();
                            let digits = |r: std::ops::Range<usize>| {
                                b.get(r).is_some_and(|x| x.iter().all(u8::is_ascii_digit))
                            };
                            assert!(
                                !(digits(0..4) && b.get(4) == Some(&b'-') && digits(5..7)),
                                "patient {i}: {s}"
                            );
                            if let (Some(bucket), true) = (bucket, b.len() == 4 && digits(0..4)) {
                                assert!(s.parse::<i32>().unwrap() >= bucket, "patient {i}: {s}");
                            }
                        }
                        Value::Array(items) => stack.extend(items),
                        Value::Object(o) => {
                            if let (Some(value), Some(unit)) = (
                                o.get("value").and_then(Value::as_f64),
                                o.get("code").and_then(Value::as_str),
                            ) && let Some(years) = years_of(value, unit)
                            {
                                ages += 1;
                                assert!(bucket.is_none(), "patient {i}: an age in the bucket");
                                assert!(years <= 89.0 || value == 90.0, "patient {i}: {years}");
                            }
                            stack.extend(o.values());
                        }
                        _ => {}
                    }
                }
            }
            let demographics = record.bundle(Category::Demographics).unwrap().to_string();
            assert_eq!(
                demographics.contains("age-90-plus"),
                bucket.is_some(),
                "patient {i}"
            );
            let index = &record.index;
            assert_eq!(index.person.birth_year, Some(bucket.unwrap_or(born)));
            for m in &index.measurements {
                if let Some(years) = m.value.and_then(|v| years_of(v, &m.unit)) {
                    assert!(years <= 89.0 && bucket.is_none(), "patient {i}: {m:?}");
                }
            }
            if let Some(bucket) = bucket {
                let first = format!("{bucket}-01-01");
                assert!(
                    index
                        .conditions
                        .iter()
                        .chain(&index.measurements)
                        .all(|e| e.date >= first)
                );
            }
            let age_now = 2026 - born;
            [
                bucket.is_some() && died.is_none(),
                bucket.is_some() && died.is_some(),
                died.is_some() && bucket.is_none() && age_now > 89,
                age_now <= 1 && ages > 0,
            ]
        })
        .collect();
    let count = |k: usize| seen.iter().filter(|s| s[k]).count();
    eprintln!(
        "90+ alive {}, 90+ at death {}, died before 90 but over 89 now {}, infants with an age in months {}",
        count(0),
        count(1),
        count(2),
        count(3)
    );
    assert!(
        count(0) > 5 && count(1) > 3 && count(2) > 0 && count(3) > 5,
        "the cases occur"
    );
}
