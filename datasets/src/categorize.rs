//! Which category of the research copy a FHIR resource belongs to.
//!
//! All mapping rules live in this module:
//!
//! * [`research_category_of_type`]: the default category of each resource type, and the
//!   types that are never part of the research copy ([`EXCLUDED_TYPES`]).
//! * [`SENSITIVE_CODES`] and [`icd10_category`] (from [`model::sensitive`], the one
//!   classifier the cohort engine uses too): clinical codes that move a resource into a
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

/// The one classifier of sensitive codes lives in `model`, shared with the cohort engine.
pub use model::sensitive::{
    SENSITIVE_CODES, code_system_of_url, icd10_category, sensitive_category_of,
};

use crate::util::{self, Coding};

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

/// The resource types of FHIR R4 (4.0.1).
const R4_RESOURCE_TYPES: [&str; 148] = [
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "DomainResource",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "Resource",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

/// Whether `ty` is a FHIR R4 resource type (abstract `Resource` and `DomainResource`
/// included: they are R4 names, though never concrete).
pub(crate) fn is_r4_resource_type(ty: &str) -> bool {
    R4_RESOURCE_TYPES.binary_search(&ty).is_ok()
}

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
            code_system_of_url(c.system) == Some(model::CodeSystem::Loinc)
                && CRITICAL_OBSERVATION_CODES.contains(&c.code)
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

    #[test]
    fn the_r4_type_list_is_sorted_for_binary_search() {
        assert!(R4_RESOURCE_TYPES.is_sorted());
        for ty in ["Patient", "Organization", "VisionPrescription", "Account"] {
            assert!(is_r4_resource_type(ty), "{ty}");
        }
        for ty in ["Pokemon", "patient", "", "MedicationUsage"] {
            assert!(!is_r4_resource_type(ty), "{ty}");
        }
        // The reference types kept are R4 types.
        for ty in KNOWN_TYPES {
            assert!(is_r4_resource_type(ty), "{ty}");
        }
    }
}
