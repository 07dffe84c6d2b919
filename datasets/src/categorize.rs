//! Which category of the research copy a FHIR resource belongs to.
//!
//! All mapping rules live in this module:
//!
//! * [`research_category_of_type`]: the default category of each resource type, and the
//!   types that are never part of the research copy ([`EXCLUDED_TYPES`]).
//! * [`SENSITIVE_CODES`] and [`icd10_category`]: clinical codes that move a resource into a
//!   sensitive category (mental health, substance use, sexual health, genomics).
//! * [`CRITICAL_OBSERVATION_CODES`] and [`is_critical`]: what the break-glass copy holds.
//!
//! A resource is checked against the sensitive tables through its own code and value, the
//! codes it gives as a reason, the conditions it references as a reason or addresses, and
//! the activities of a care plan. When several sensitive categories match, the first in
//! [`Category::ALL`] order wins (mental health, substance use, sexual health, genomics), so
//! that every resource lands in exactly one category.

use model::Category;
use serde_json::Value;

use crate::util::{self, Coding};

/// A code system, for the code tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSystem {
    /// `http://snomed.info/sct`
    Snomed,
    /// `http://loinc.org`
    Loinc,
    /// `http://www.nlm.nih.gov/research/umls/rxnorm`
    RxNorm,
}

impl CodeSystem {
    fn matches(self, system_url: &str) -> bool {
        match self {
            CodeSystem::Snomed => {
                system_url == "http://snomed.info/sct"
                    || system_url == "urn:oid:2.16.840.1.113883.6.96"
            }
            CodeSystem::Loinc => {
                system_url == "http://loinc.org" || system_url == "urn:oid:2.16.840.1.113883.6.1"
            }
            CodeSystem::RxNorm => {
                system_url == "http://www.nlm.nih.gov/research/umls/rxnorm"
                    || system_url == "urn:oid:2.16.840.1.113883.6.88"
            }
        }
    }
}

use Category::{Genomics as GEN, MentalHealth as MH, SexualHealth as SEX, SubstanceUse as SUB};
use CodeSystem::{Loinc as L, Snomed as S};

/// Codes that make a resource sensitive, whatever its type: conditions, procedures,
/// encounter types, observation and report codes, observation values.
///
/// The SNOMED codes are those Synthea uses plus common equivalents; ICD-10-CM is handled by
/// ranges in [`icd10_category`].
pub const SENSITIVE_CODES: &[(CodeSystem, &str, Category)] = &[
    // --- Mental health: conditions (SNOMED) ---
    (S, "35489007", MH),  // Depressive disorder
    (S, "36923009", MH),  // Major depression, single episode
    (S, "370143000", MH), // Major depressive disorder
    (S, "197480006", MH), // Anxiety disorder
    (S, "80583007", MH),  // Severe anxiety (panic)
    (S, "231504006", MH), // Mixed anxiety and depressive disorder
    (S, "192127007", MH), // Child attention deficit disorder
    (S, "47505003", MH),  // Posttraumatic stress disorder
    (S, "58214004", MH),  // Schizophrenia
    (S, "13746004", MH),  // Bipolar disorder
    (S, "6471006", MH),   // Suicidal thoughts
    // Psychosocial findings Synthea records from screenings; treated as mental health
    // because they describe the patient's psychological situation.
    (S, "73595000", MH),  // Stress (finding)
    (S, "706893006", MH), // Victim of intimate partner abuse
    // --- Mental health: procedures ---
    (S, "228557008", MH), // Cognitive and behavioral therapy
    (S, "88848003", MH),  // Psychiatric follow-up
    (S, "90407005", MH),  // Evaluation of psychiatric state of patient
    // --- Mental health: questionnaires (LOINC panels and scores) ---
    (L, "55757-9", MH), // PHQ-2 panel
    (L, "55758-7", MH), // PHQ-2 total score
    (L, "44249-1", MH), // PHQ-9 panel
    (L, "44261-6", MH), // PHQ-9 total score
    (L, "89206-7", MH), // PHQ-9 modified for teens panel
    (L, "89204-2", MH), // PHQ-9 modified for teens total score
    (L, "69737-5", MH), // GAD-7 panel
    (L, "70274-6", MH), // GAD-7 total score
    (L, "76499-3", MH), // HARK (intimate partner violence) panel
    (L, "76504-0", MH), // HARK total score
    // --- Substance use: conditions and findings ---
    (S, "7200002", SUB),           // Alcoholism
    (S, "66590003", SUB),          // Alcohol dependence
    (S, "15167005", SUB),          // Alcohol abuse
    (S, "10939881000119105", SUB), // Unhealthy alcohol drinking behavior
    (S, "55680006", SUB),          // Drug overdose
    (S, "6525002", SUB),           // Dependent drug abuse
    (S, "26416006", SUB),          // Drug abuse
    (S, "361055000", SUB),         // Misuses drugs
    (S, "5602001", SUB),           // Opioid abuse
    (S, "75544000", SUB),          // Opioid dependence
    (S, "449868002", SUB),         // Smokes tobacco daily
    (S, "65568007", SUB),          // Cigarette smoker
    (S, "77176002", SUB),          // Smoker
    // --- Substance use: treatment procedures and encounters ---
    (S, "61480009", SUB),  // Drug detoxification
    (S, "60112009", SUB),  // Drug addiction counseling
    (S, "266707007", SUB), // Drug addiction therapy
    (S, "56876005", SUB),  // Drug rehabilitation and detoxification
    (S, "24165007", SUB),  // Alcoholism counseling
    // --- Substance use: questionnaires and status ---
    (L, "72109-2", SUB), // AUDIT-C panel
    (L, "75626-2", SUB), // AUDIT-C total score
    (L, "75624-7", SUB), // AUDIT total score
    (L, "82666-9", SUB), // DAST-10 panel
    (L, "82667-7", SUB), // DAST-10 total score
    (L, "72166-2", SUB), // Tobacco smoking status
    // --- Sexual and reproductive health: conditions ---
    (S, "86406008", SEX),  // HIV disease
    (S, "165816005", SEX), // HIV positive
    (S, "62479008", SEX),  // AIDS
    (S, "105629000", SEX), // Chlamydial infection
    (S, "15628003", SEX),  // Gonorrhea
    (S, "76272004", SEX),  // Syphilis
    (S, "33839006", SEX),  // Genital herpes simplex
    // --- Sexual and reproductive health: procedures (STI tests, pregnancy termination) ---
    (S, "31676001", SEX),  // HIV antigen test
    (S, "269828009", SEX), // Syphilis infectious titer test
    (S, "310861008", SEX), // Chlamydia antigen test
    (S, "165829005", SEX), // Gonorrhea infection titer test
    (S, "714812005", SEX), // Induced termination of pregnancy
    (S, "10383002", SEX),  // Counseling for termination of pregnancy
    (S, "386394001", SEX), // Pregnancy termination care
    // --- Sexual health: laboratory (HIV, STI) ---
    (L, "75622-1", SEX), // HIV 1 and 2 tests - Meaning
    (L, "7917-8", SEX),  // HIV 1 Ab [Presence] in Serum
    (L, "56888-1", SEX), // HIV 1+2 Ab + HIV 1 p24 Ag [Presence]
    (L, "5221-7", SEX),  // HIV 1 Ab [Presence] by Immunoblot
    (L, "20447-9", SEX), // HIV 1 RNA [#/volume] (viral load)
    (L, "25836-8", SEX), // HIV 1 RNA [#/volume] (viral load) by NAA
    (L, "21613-5", SEX), // Chlamydia trachomatis DNA [Presence]
    (L, "24111-7", SEX), // Neisseria gonorrhoeae DNA [Presence]
    (L, "20507-0", SEX), // Reagin Ab [Presence] (RPR, syphilis)
    // --- Genomics ---
    (L, "69548-6", GEN), // Genetic variant assessment
    (L, "81247-9", GEN), // Master HL7 genetic variant reporting panel
    (L, "48018-6", GEN), // Gene studied [ID]
    (L, "81252-9", GEN), // Discrete genetic variant
    (L, "53037-8", GEN), // Genetic variation clinical significance
    (L, "48004-6", GEN), // DNA change (c.HGVS)
    (L, "48005-3", GEN), // Amino acid change (p.HGVS)
    (L, "51969-4", GEN), // Genetic analysis report
];

/// LOINC codes of the blood-type observations copied into the break-glass category.
pub const CRITICAL_OBSERVATION_CODES: &[&str] = &[
    "882-1",   // ABO and Rh group [Type] in Blood
    "883-9",   // ABO group [Type] in Blood
    "10331-7", // Rh [Type] in Blood
];

/// Observation components that carry identifying free text (PRAPARE asks for the street
/// address); the de-identification drops them.
pub const IDENTIFYING_COMPONENT_CODES: &[&str] = &[
    "56799-0", // Address
];

/// Resource types that are never part of the research copy: providers and places, billing,
/// provenance, and documents or images whose content is free text or pixel data.
pub const EXCLUDED_TYPES: &[&str] = &[
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
    "Provenance",
    "Claim",
    "ClaimResponse",
    "ExplanationOfBenefit",
    "Coverage",
    "DocumentReference",
    "Binary",
    "ImagingStudy",
    "Media",
    "CareTeam",
    "SupplyDelivery",
    "RelatedPerson",
    "Person",
    "Group",
    "Communication",
    "Questionnaire",
    "QuestionnaireResponse",
    "AuditEvent",
    "Consent",
    "Account",
];

/// FHIR R4 resource type names that may be kept as the `type` of a stripped reference.
const KNOWN_TYPES: &[&str] = &[
    "Account",
    "AllergyIntolerance",
    "Appointment",
    "AuditEvent",
    "Binary",
    "BodyStructure",
    "Bundle",
    "CarePlan",
    "CareTeam",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "Communication",
    "Composition",
    "Condition",
    "Consent",
    "Coverage",
    "DetectedIssue",
    "Device",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "Endpoint",
    "EpisodeOfCare",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "Group",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationRecommendation",
    "List",
    "Location",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationRequest",
    "MedicationStatement",
    "MolecularSequence",
    "NutritionOrder",
    "Observation",
    "Organization",
    "Patient",
    "Person",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RiskAssessment",
    "Schedule",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "Substance",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
];

/// The static name of a known FHIR resource type.
pub(crate) fn known_type_name(ty: &str) -> Option<&'static str> {
    KNOWN_TYPES.iter().copied().find(|t| *t == ty)
}

/// The category a resource type goes to before the sensitive-code checks, or `None` when the
/// type is not part of the research copy (see [`EXCLUDED_TYPES`]; unknown types are dropped
/// too).
///
/// | type | category |
/// |---|---|
/// | Patient | demographics |
/// | Condition, CarePlan, Goal | conditions |
/// | Observation, DiagnosticReport | observations |
/// | MedicationRequest, MedicationStatement, MedicationAdministration, MedicationDispense | medications |
/// | Procedure, Device | procedures |
/// | Immunization | immunizations |
/// | AllergyIntolerance | allergies |
/// | Encounter | encounters |
/// | MolecularSequence | genomics |
pub fn research_category_of_type(resource_type: &str) -> Option<Category> {
    Some(match resource_type {
        "Patient" => Category::Demographics,
        "Condition" | "CarePlan" | "Goal" => Category::Conditions,
        "Observation" | "DiagnosticReport" => Category::Observations,
        "MedicationRequest"
        | "MedicationStatement"
        | "MedicationAdministration"
        | "MedicationDispense" => Category::Medications,
        "Procedure" | "Device" => Category::Procedures,
        "Immunization" => Category::Immunizations,
        "AllergyIntolerance" => Category::Allergies,
        "Encounter" => Category::Encounters,
        "MolecularSequence" => Category::Genomics,
        _ => return None,
    })
}

/// The sensitive category of an ICD-10 code (`F32.9`, `F1020`, …):
///
/// * F10–F19 (mental and behavioural disorders due to psychoactive substance use) → substance use
/// * any other F code → mental health
/// * A50–A64 (infections with a predominantly sexual mode of transmission), B20–B24 (HIV
///   disease), Z21 (asymptomatic HIV infection status), O04 (complications following
///   termination of pregnancy) and Z33.2 (encounter for elective termination of pregnancy)
///   → sexual health
pub fn icd10_category(code: &str) -> Option<Category> {
    let c: String = code
        .chars()
        .filter(|c| *c != '.')
        .collect::<String>()
        .to_ascii_uppercase();
    let letter = c.chars().next()?;
    let two: u32 = c.get(1..3)?.parse().ok()?;
    match letter {
        'F' if (10..=19).contains(&two) => Some(Category::SubstanceUse),
        'F' => Some(Category::MentalHealth),
        'A' if (50..=64).contains(&two) => Some(Category::SexualHealth),
        'B' if (20..=24).contains(&two) => Some(Category::SexualHealth),
        'Z' if two == 21 => Some(Category::SexualHealth),
        'Z' if two == 33 && c.get(3..4) == Some("2") => Some(Category::SexualHealth),
        'O' if two == 4 => Some(Category::SexualHealth),
        _ => None,
    }
}

/// The sensitive category of one coding, if any.
pub fn sensitive_category_of(system: &str, code: &str) -> Option<Category> {
    if system.starts_with("http://hl7.org/fhir/sid/icd-10")
        || system == "urn:oid:2.16.840.1.113883.6.90"
    {
        return icd10_category(code);
    }
    SENSITIVE_CODES
        .iter()
        .find(|(sys, c, _)| *c == code && sys.matches(system))
        .map(|(_, _, cat)| *cat)
}

/// Resolves the references a resource makes to the patient's other resources.
pub(crate) trait Lookup {
    /// The resource a reference string points to, among the patient's resources.
    fn resolve(&self, reference: &str) -> Option<&Value>;
}

fn pick(found: &mut Option<Category>, candidate: Option<Category>) {
    if let Some(c) = candidate
        && found.is_none_or(|f| c < f)
    {
        *found = Some(c);
    }
}

fn concept_category(found: &mut Option<Category>, concept: Option<&Value>) {
    for Coding { system, code } in util::codings(concept) {
        pick(found, sensitive_category_of(system, code));
    }
}

fn concepts_category(found: &mut Option<Category>, concepts: Option<&Value>) {
    match concepts {
        Some(Value::Array(items)) => items.iter().for_each(|c| concept_category(found, Some(c))),
        Some(single @ Value::Object(_)) => concept_category(found, Some(single)),
        _ => {}
    }
}

/// The sensitive category given by a resource's own codes (not following references).
fn own_sensitive_category(resource: &Value) -> Option<Category> {
    let mut found = None;
    for key in [
        "code",
        "valueCodeableConcept",
        "medicationCodeableConcept",
        "vaccineCode",
        "type",
        "reasonCode",
        "category",
    ] {
        concepts_category(&mut found, resource.get(key));
    }
    // CarePlan activities.
    if let Some(activities) = resource.get("activity").and_then(Value::as_array) {
        for a in activities {
            concept_category(&mut found, a.get("detail").and_then(|d| d.get("code")));
        }
    }
    // Genomics reporting profiles and the v2 "GE" (genetics) diagnostic service section.
    let profiles = resource
        .get("meta")
        .and_then(|m| m.get("profile"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str);
    for p in profiles {
        if p.contains("genomics-reporting") {
            pick(&mut found, Some(Category::Genomics));
        }
    }
    if let Some(cats) = resource.get("category").and_then(Value::as_array) {
        for c in cats {
            for coding in util::codings(Some(c)) {
                if coding.code == "GE" && coding.system.ends_with("v2-0074") {
                    pick(&mut found, Some(Category::Genomics));
                }
            }
        }
    }
    found
}

/// The category of a resource in the research copy, or `None` when it is not part of it.
pub(crate) fn research_category(resource: &Value, lookup: &dyn Lookup) -> Option<Category> {
    let ty = util::resource_type(resource)?;
    let default = research_category_of_type(ty)?;
    if ty == "Patient" {
        return Some(default);
    }
    let mut found = own_sensitive_category(resource);
    // Reasons and addressed conditions: follow the reference one step.
    for key in ["reasonReference", "addresses"] {
        if let Some(refs) = resource.get(key).and_then(Value::as_array) {
            for r in refs {
                if let Some(target) = r
                    .get("reference")
                    .and_then(Value::as_str)
                    .and_then(|s| lookup.resolve(s))
                {
                    pick(&mut found, own_sensitive_category(target));
                }
            }
        }
    }
    Some(found.unwrap_or(default))
}

/// Whether a resource is copied, in full, into the break-glass [`Category::Critical`]:
/// allergies, active medication requests, blood-type observations and devices.
pub fn is_critical(resource: &Value) -> bool {
    match util::resource_type(resource) {
        Some("AllergyIntolerance" | "Device") => true,
        Some("MedicationRequest") => {
            resource.get("status").and_then(Value::as_str) == Some("active")
        }
        Some("Observation") => util::codings(resource.get("code")).any(|c| {
            CodeSystem::Loinc.matches(c.system) && CRITICAL_OBSERVATION_CODES.contains(&c.code)
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct NoLookup;
    impl Lookup for NoLookup {
        fn resolve(&self, _: &str) -> Option<&Value> {
            None
        }
    }

    fn condition(system: &str, code: &str) -> Value {
        json!({"resourceType": "Condition", "code": {"coding": [{"system": system, "code": code}]}})
    }

    #[test]
    fn icd10_ranges() {
        assert_eq!(icd10_category("F32.9"), Some(Category::MentalHealth));
        assert_eq!(icd10_category("F10.20"), Some(Category::SubstanceUse));
        assert_eq!(icd10_category("f19"), Some(Category::SubstanceUse));
        assert_eq!(icd10_category("F20"), Some(Category::MentalHealth));
        assert_eq!(icd10_category("B20"), Some(Category::SexualHealth));
        assert_eq!(icd10_category("A54.2"), Some(Category::SexualHealth));
        assert_eq!(icd10_category("Z33.2"), Some(Category::SexualHealth));
        assert_eq!(icd10_category("Z33.1"), None);
        assert_eq!(icd10_category("E11.9"), None);
        assert_eq!(icd10_category("F"), None);
    }

    #[test]
    fn conditions_by_code() {
        let snomed = "http://snomed.info/sct";
        assert_eq!(
            research_category(&condition(snomed, "44054006"), &NoLookup),
            Some(Category::Conditions)
        );
        assert_eq!(
            research_category(&condition(snomed, "35489007"), &NoLookup),
            Some(Category::MentalHealth)
        );
        assert_eq!(
            research_category(&condition(snomed, "7200002"), &NoLookup),
            Some(Category::SubstanceUse)
        );
        assert_eq!(
            research_category(&condition(snomed, "86406008"), &NoLookup),
            Some(Category::SexualHealth)
        );
        assert_eq!(
            research_category(
                &condition("http://hl7.org/fhir/sid/icd-10-cm", "F32.9"),
                &NoLookup
            ),
            Some(Category::MentalHealth)
        );
        // A SNOMED code looked up under the wrong system does not match.
        assert_eq!(
            research_category(&condition("http://loinc.org", "35489007"), &NoLookup),
            Some(Category::Conditions)
        );
    }

    #[test]
    fn excluded_and_unknown_types() {
        for ty in EXCLUDED_TYPES {
            assert_eq!(research_category_of_type(ty), None, "{ty}");
        }
        assert_eq!(
            research_category(&json!({"resourceType": "Frobnicator"}), &NoLookup),
            None
        );
    }

    #[test]
    fn reason_reference_moves_a_procedure() {
        struct One(Value);
        impl Lookup for One {
            fn resolve(&self, r: &str) -> Option<&Value> {
                (r == "urn:uuid:c1").then_some(&self.0)
            }
        }
        let lookup = One(condition("http://snomed.info/sct", "6525002"));
        let procedure = json!({
            "resourceType": "Procedure",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "52052004"}]},
            "reasonReference": [{"reference": "urn:uuid:c1"}]
        });
        assert_eq!(
            research_category(&procedure, &lookup),
            Some(Category::SubstanceUse)
        );
        assert_eq!(
            research_category(&procedure, &NoLookup),
            Some(Category::Procedures)
        );
    }

    #[test]
    fn critical_selection() {
        assert!(is_critical(&json!({"resourceType": "AllergyIntolerance"})));
        assert!(is_critical(
            &json!({"resourceType": "MedicationRequest", "status": "active"})
        ));
        assert!(!is_critical(
            &json!({"resourceType": "MedicationRequest", "status": "stopped"})
        ));
        assert!(is_critical(
            &json!({"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "882-1"}]}})
        ));
        assert!(!is_critical(&json!({"resourceType": "Condition"})));
    }
}
