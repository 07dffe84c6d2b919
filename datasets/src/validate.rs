//! Structural checks of input resources, before they enter the pipeline.
//!
//! A problem found here is reported (by element path, never by value) and the resource is
//! left out; for a Patient only the offending elements are left out, so that the rest of
//! the patient still imports.

use serde_json::{Map, Value};

use crate::categorize::research_category_of_type;
use crate::util;

/// One problem with a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    /// Top-level element the problem is in (`None`: the resource as a whole).
    pub element: Option<String>,
    /// What is wrong, naming the element path (`valueQuantity.value is not a number`).
    pub reason: String,
}

fn problem(element: Option<&str>, reason: String) -> Problem {
    Problem {
        element: element.map(str::to_string),
        reason,
    }
}

/// Elements that hold a FHIR date, dateTime or instant wherever they appear.
const DATE_ELEMENTS: &[&str] = &[
    "birthDate",
    "deceasedDateTime",
    "onsetDateTime",
    "abatementDateTime",
    "recordedDate",
    "effectiveDateTime",
    "effectiveInstant",
    "issued",
    "authoredOn",
    "performedDateTime",
    "occurrenceDateTime",
    "dateAsserted",
    "recorded",
    "date",
    "lastOccurrence",
    "created",
    "started",
    "whenHandedOver",
    "whenPrepared",
    "valueDateTime",
    "manufactureDate",
    "expirationDate",
    "dueDate",
    "statusDate",
];

/// Checks the envelope of any resource: a JSON object with a string `resourceType` and,
/// if present, a string `id`.
pub(crate) fn check_envelope(resource: &Value) -> Result<(), Problem> {
    let Some(obj) = resource.as_object() else {
        return Err(problem(None, "resource is not a JSON object".into()));
    };
    match obj.get("resourceType") {
        None => return Err(problem(None, "resource has no resourceType".into())),
        Some(Value::String(t)) if util::is_resource_type(t) => {}
        Some(_) => {
            return Err(problem(
                None,
                "resourceType is not a resource type name".into(),
            ));
        }
    }
    match obj.get("id") {
        None | Some(Value::String(_)) => Ok(()),
        Some(_) => Err(problem(Some("id"), "id is not a string".into())),
    }
}

/// Checks the content of a resource that goes into the research copy (or the Patient).
/// Resources of other types only get [`check_envelope`].
pub(crate) fn check_content(resource: &Value) -> Vec<Problem> {
    let mut problems = Vec::new();
    let Some(obj) = resource.as_object() else {
        return problems;
    };
    let Some(ty) = util::resource_type(resource) else {
        return problems;
    };
    if research_category_of_type(ty).is_none() {
        return problems;
    }
    // Required codes.
    let required: &[&str] = match ty {
        "Condition" | "Observation" | "DiagnosticReport" => &["code"],
        "Immunization" => &["vaccineCode"],
        _ => &[],
    };
    for key in required {
        if !obj.contains_key(*key) {
            problems.push(problem(Some(key), format!("{ty}.{key} is missing")));
        }
    }
    if matches!(
        ty,
        "MedicationRequest"
            | "MedicationStatement"
            | "MedicationAdministration"
            | "MedicationDispense"
    ) && !obj.contains_key("medicationCodeableConcept")
        && !obj.contains_key("medicationReference")
    {
        problems.push(problem(
            Some("medicationCodeableConcept"),
            format!("{ty} has neither medicationCodeableConcept nor medicationReference"),
        ));
    }
    if ty == "Patient"
        && let Some(g) = obj.get("gender")
        && !g.is_string()
    {
        problems.push(problem(Some("gender"), "gender is not a string".into()));
    }
    for (k, v) in obj {
        walk(k, v, k, false, &mut problems, k);
    }
    problems
}

const CONCEPT_ELEMENTS: &[&str] = &[
    "code",
    "vaccineCode",
    "medicationCodeableConcept",
    "valueCodeableConcept",
    "reasonCode",
    "category",
];

fn walk(
    key: &str,
    value: &Value,
    path: &str,
    in_period: bool,
    problems: &mut Vec<Problem>,
    top: &str,
) {
    let is_date_element =
        DATE_ELEMENTS.contains(&key) || (in_period && matches!(key, "start" | "end"));
    if is_date_element {
        match value {
            Value::String(s) if util::is_fhir_date(s) => {}
            _ => problems.push(problem(
                Some(top),
                format!("{path} is not a valid date/dateTime"),
            )),
        }
        return;
    }
    if (key.ends_with("Quantity") || key == "quantity")
        && let Value::Object(q) = value
    {
        check_quantity(q, path, problems, top);
    }
    if CONCEPT_ELEMENTS.contains(&key) {
        match value {
            Value::Object(c) => check_concept(c, path, problems, top),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::Object(c) => {
                            check_concept(c, &format!("{path}[{i}]"), problems, top)
                        }
                        // AllergyIntolerance.category is an array of codes.
                        Value::String(_) if key == "category" => {}
                        _ => problems.push(problem(
                            Some(top),
                            format!("{path}[{i}] is not a CodeableConcept"),
                        )),
                    }
                }
            }
            // Simple codes (e.g. `"code": "M"` inside a Coding) are fine.
            Value::String(_) if key == "code" => {}
            _ => problems.push(problem(
                Some(top),
                format!("{path} is not a CodeableConcept"),
            )),
        }
        return;
    }
    let period = key.ends_with("Period") || key == "period";
    match value {
        Value::Object(o) => {
            for (k, v) in o {
                walk(k, v, &format!("{path}.{k}"), period, problems, top);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if let Value::Object(o) = item {
                    for (k, v) in o {
                        walk(k, v, &format!("{path}[{i}].{k}"), period, problems, top);
                    }
                }
            }
        }
        _ => {}
    }
}

fn check_quantity(q: &Map<String, Value>, path: &str, problems: &mut Vec<Problem>, top: &str) {
    if let Some(v) = q.get("value")
        && !v.is_number()
    {
        problems.push(problem(Some(top), format!("{path}.value is not a number")));
    }
    for k in ["unit", "code", "system"] {
        if let Some(v) = q.get(k)
            && !v.is_string()
        {
            problems.push(problem(Some(top), format!("{path}.{k} is not a string")));
        }
    }
}

fn check_concept(c: &Map<String, Value>, path: &str, problems: &mut Vec<Problem>, top: &str) {
    match c.get("coding") {
        None => {}
        Some(Value::Array(codings)) => {
            for (i, coding) in codings.iter().enumerate() {
                let Some(coding) = coding.as_object() else {
                    problems.push(problem(
                        Some(top),
                        format!("{path}.coding[{i}] is not an object"),
                    ));
                    continue;
                };
                for k in ["system", "code", "display"] {
                    if let Some(v) = coding.get(k)
                        && !v.is_string()
                    {
                        problems.push(problem(
                            Some(top),
                            format!("{path}.coding[{i}].{k} is not a string"),
                        ));
                    }
                }
            }
        }
        Some(_) => problems.push(problem(Some(top), format!("{path}.coding is not an array"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn envelopes() {
        assert!(check_envelope(&json!([1])).is_err());
        assert!(check_envelope(&json!({"id": "x"})).is_err());
        assert!(check_envelope(&json!({"resourceType": 3})).is_err());
        assert!(check_envelope(&json!({"resourceType": "Observation", "id": 3})).is_err());
        assert!(check_envelope(&json!({"resourceType": "Observation", "id": "o"})).is_ok());
    }

    #[test]
    fn content() {
        let reasons = |v: Value| {
            check_content(&v)
                .into_iter()
                .map(|p| p.reason)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            reasons(json!({"resourceType": "Condition"})),
            vec!["Condition.code is missing"]
        );
        assert_eq!(
            reasons(
                json!({"resourceType": "Observation", "code": {}, "valueQuantity": {"value": "high"}})
            ),
            vec!["valueQuantity.value is not a number"]
        );
        assert_eq!(
            reasons(
                json!({"resourceType": "Observation", "code": {}, "effectiveDateTime": "last Tuesday"})
            ),
            vec!["effectiveDateTime is not a valid date/dateTime"]
        );
        assert_eq!(
            reasons(
                json!({"resourceType": "Procedure", "performedPeriod": {"start": "2020-01-01", "end": "soon"}})
            ),
            vec!["performedPeriod.end is not a valid date/dateTime"]
        );
        assert_eq!(
            reasons(
                json!({"resourceType": "Observation", "code": {"coding": [{"code": 5}]},
                "component": [{"code": {}, "valueQuantity": {"value": true}}]})
            ),
            vec![
                "code.coding[0].code is not a string",
                "component[0].valueQuantity.value is not a number"
            ]
        );
        // Types outside the research copy are not checked in depth.
        assert!(reasons(json!({"resourceType": "Claim", "created": "whenever"})).is_empty());
        assert!(
            reasons(
                json!({"resourceType": "Patient", "birthDate": "1980-01-02", "gender": "male"})
            )
            .is_empty()
        );
    }
}
