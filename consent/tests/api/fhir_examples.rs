//! The table test of the twelve official FHIR R4 Consent examples: one row per file,
//! saying what the Consent means in FHIR and what the importer makes of it.
//!
//! All twelve are `patient-privacy` consents written for care, not research. Three map
//! (they withhold, and a withdrawal is safe to honour); nine are refused, each for the
//! feature that the model cannot express without permitting more than the patient did.

use std::collections::BTreeSet;
use std::path::Path;

use consent_policy::{
    AccessRequest, Actor, BreakGlass, DecidedBy, Effect, ImportedConsent, Period, Provision,
    ProvisionPath, Refusal, Requester, ResearchPurpose, StudyFocus, evaluate, from_fhir_consent,
};
use model::Category;

const EXAMPLES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/data/fhir-r4-examples"
);

/// Some time well after every example was written.
const NOW: i64 = 1_780_000_000;

enum Expect {
    /// Maps; the function checks the policy.
    Maps(fn(&ImportedConsent)),
    /// Refused, for exactly this reason.
    Refused(Refusal),
}

struct Row {
    file: &'static str,
    /// What the Consent says in FHIR.
    fhir: &'static str,
    /// What the importer does with it.
    ours: &'static str,
    expect: Expect,
}

fn at(path: &[usize]) -> ProvisionPath {
    ProvisionPath(path.to_vec())
}

fn research_by(organisation: &str) -> AccessRequest {
    let mut r = AccessRequest::research(
        Requester {
            organisation: organisation.into(),
            for_profit: false,
        },
        ResearchPurpose::new(StudyFocus::Health),
        Period::default(),
    );
    r.categories = Category::ALL
        .into_iter()
        .filter(|c| *c != Category::Critical)
        .collect();
    r
}

fn emergency() -> AccessRequest {
    AccessRequest::emergency(
        Requester {
            organisation: "f001".into(),
            for_profit: false,
        },
        Period::default(),
    )
}

/// Nothing is released to research by anyone, nor by break-glass.
fn releases_nothing(imported: &ImportedConsent) {
    for org in ["f001", "uni-1"] {
        assert!(!evaluate(&imported.policy, &research_by(org), NOW).is_permit());
    }
    let d = evaluate(&imported.policy, &emergency(), NOW);
    assert_eq!(d.effect(), Effect::Deny);
    assert_eq!(d.decided_by(), &DecidedBy::BreakGlass);
}

fn rows() -> Vec<Row> {
    vec![
        Row {
            file: "Consent-consent-example-Emergency.json",
            fhir: "OPTOUT privacy consent (category EMRGONLY): within emergency treatment (ETREAT) of records held by Good Health (custodian Organization/f001), a nested deny: no data for emergency treatment",
            ours: "maps: the untyped root only scopes its nested deny; that scope names only emergency treatment, so nothing concerns research; the deny sets break_glass to deny (its custodian condition widened)",
            expect: Expect::Maps(|imported| {
                let p = &imported.policy;
                assert!(p.provisions().is_empty());
                assert_eq!(p.break_glass(), BreakGlass::Deny);
                assert_eq!(p.issued_at(), 1_447_804_800); // 2015-11-18
                assert!(imported.notes.iter().any(|n| n.contains("actor role CST")));
                assert!(
                    imported
                        .notes
                        .iter()
                        .any(|n| n.contains("break-glass is denied"))
                );
                releases_nothing(imported);
                let d = evaluate(p, &research_by("uni-1"), NOW);
                assert_eq!(d.decided_by(), &DecidedBy::Base);
            }),
        },
        Row {
            file: "Consent-consent-example-Out.json",
            fhir: "OPTOUT privacy consent: the root rule (no type, no nested rules) withholds the records held by Good Health (custodian f001) for every purpose",
            ours: "maps: the root is the opt-out exception, a deny; its custodian condition is widened (it denies all records), giving a deny of all research and break-glass denied",
            expect: Expect::Maps(|imported| {
                let p = &imported.policy;
                assert_eq!(p.provisions(), &[Provision::deny()]);
                assert_eq!(p.break_glass(), BreakGlass::Deny);
                releases_nothing(imported);
                let d = evaluate(p, &research_by("uni-1"), NOW);
                assert_eq!(d.decided_by(), &DecidedBy::Provision(at(&[0])));
            }),
        },
        Row {
            file: "Consent-consent-example-basic.json",
            fhir: "OPTIN privacy consent: the root rule permits access to all data from 1964-01-01 to 2016-01-01 (narrative: for normal treatment use)",
            ours: "refused: a permit that names no research purpose is not research consent",
            expect: Expect::Refused(Refusal::PermitWithoutResearchPurpose { at: at(&[]) }),
        },
        Row {
            file: "Consent-consent-example-grantor.json",
            fhir: "OPTOUT privacy consent (category INFAO): access by an authorized representative (actor PRCP Patient/example) to the records held by f001 (narrative: read-only access for a person the patient chose)",
            ours: "refused: an actor is an individual (a Patient resource), and releases go only to organisations",
            expect: Expect::Refused(Refusal::IndividualActor {
                at: at(&[]),
                resource_type: "Patient".into(),
            }),
        },
        Row {
            file: "Consent-consent-example-notAuthor.json",
            fhir: "OPTIN privacy consent: the root rule is about the records held by Good Health (actor CST Organization/f001) (narrative: withhold records authored by that organisation; under OPTIN, consent to them)",
            ours: "refused: a permit limited to one custodian's records would release every custodian's records",
            expect: Expect::Refused(Refusal::CustodianRestriction { at: at(&[]) }),
        },
        Row {
            file: "Consent-consent-example-notOrg.json",
            fhir: "OPTIN privacy consent: deny access and correction to Good Health Clinic (actor PRCP Organization/f001)",
            ours: "maps: a deny of organisation f001; the action correct is not ours, access is",
            expect: Expect::Maps(|imported| {
                let p = &imported.policy;
                let mut deny = Provision::deny();
                deny.actors = vec![Actor::Organisation("f001".into())];
                assert_eq!(p.provisions(), &[deny]);
                assert_eq!(p.break_glass(), BreakGlass::Deny);
                releases_nothing(imported);
                let d = evaluate(p, &research_by("f001"), NOW);
                assert_eq!(d.decided_by(), &DecidedBy::Provision(at(&[0])));
                let d = evaluate(p, &research_by("uni-1"), NOW);
                assert_eq!(d.decided_by(), &DecidedBy::Base);
            }),
        },
        Row {
            file: "Consent-consent-example-notThem.json",
            fhir: "OPTIN privacy consent: the root rule is about one nurse (actor PRCP Practitioner/f204), actions access and correct (narrative: withhold from the patient's ex-spouse)",
            ours: "refused: an actor is an individual (a Practitioner)",
            expect: Expect::Refused(Refusal::IndividualActor {
                at: at(&[]),
                resource_type: "Practitioner".into(),
            }),
        },
        Row {
            file: "Consent-consent-example-notThis.json",
            fhir: "OPTIN privacy consent: the root rule is about the data related to one lab order (data.reference Task/example3)",
            ours: "refused: a rule about specific resources cannot be expressed with categories",
            expect: Expect::Refused(Refusal::DataReference { at: at(&[]) }),
        },
        Row {
            file: "Consent-consent-example-notTime.json",
            fhir: "OPTIN privacy consent: the root rule holds from 2015-01-01 to 2015-02-01 (narrative: withhold data from that time frame)",
            ours: "refused: read as coded, a permit naming no research purpose",
            expect: Expect::Refused(Refusal::PermitWithoutResearchPurpose { at: at(&[]) }),
        },
        Row {
            file: "Consent-consent-example-pkb.json",
            fhir: "OPTOUT privacy consent (Patients Know Best): access by f001 to normal data, with eleven nested rules for labels PSY, SPI, SEX and N that have no type",
            ours: "refused: nested rules without type; guessing permit or deny could release what the patient withheld",
            expect: Expect::Refused(Refusal::MissingNestedType { at: at(&[0]) }),
        },
        Row {
            file: "Consent-consent-example-signature.json",
            fhir: "OPTIN privacy consent (notice of privacy practices): from 2015-10-10 to 2016-10-10, for recipient Practitioner/13, permit CDA documents (LOINC 34133-9, 18842-5) authored by Practitioner/xcda-author",
            ours: "refused: the scoping root names an individual recipient (a Practitioner)",
            expect: Expect::Refused(Refusal::IndividualActor {
                at: at(&[]),
                resource_type: "Practitioner".into(),
            }),
        },
        Row {
            file: "Consent-consent-example-smartonfhir.json",
            fhir: "OPTIN privacy consent given by a related person through a SMART app: for 30 minutes on 2016-06-23, permit access to MedicationRequest",
            ours: "refused: the nested permit (medications) names no research purpose",
            expect: Expect::Refused(Refusal::PermitWithoutResearchPurpose { at: at(&[0]) }),
        },
    ]
}

#[test]
fn every_official_consent_example_maps_or_is_refused_for_its_reason() {
    let rows = rows();
    let mut failures = Vec::new();
    for row in &rows {
        let path = Path::new(EXAMPLES).join(row.file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let json: serde_json::Value = serde_json::from_str(&text).expect("example is JSON");
        let outcome = from_fhir_consent(&json);
        match (&row.expect, outcome) {
            (Expect::Maps(check), Ok(imported)) => check(&imported),
            (Expect::Refused(expected), Err(refusal)) if *expected == refusal => {
                // The reason reads as advice, not as an echo of the input.
                let message = refusal.to_string();
                assert!(message.len() < 400, "{}: {message}", row.file);
            }
            (expected, got) => failures.push(format!(
                "{}\n  FHIR: {}\n  expected: {}\n  got: {:?}",
                row.file,
                row.fhir,
                match expected {
                    Expect::Maps(_) => "maps".to_owned(),
                    Expect::Refused(r) => format!("refused: {r}"),
                },
                got.map(|i| i.policy).map_err(|r| r.to_string())
            )),
        }
        assert!(!row.ours.is_empty());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_table_covers_every_consent_example_file() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(EXAMPLES)
        .expect("examples directory")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("Consent-") && n.ends_with(".json"))
        .collect();
    let in_table: BTreeSet<String> = rows().iter().map(|r| r.file.to_owned()).collect();
    assert_eq!(on_disk, in_table);
    assert_eq!(in_table.len(), 12);
}

#[test]
fn other_example_resources_are_not_consents() {
    for file in ["Patient-example.json", "ResearchStudy-example.json"] {
        let text = std::fs::read_to_string(Path::new(EXAMPLES).join(file)).expect("readable");
        let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert!(matches!(
            from_fhir_consent(&json),
            Err(Refusal::NotAConsent { .. })
        ));
    }
}
