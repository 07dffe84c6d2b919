//! Extraction of the searchable index rows ([`PatientIndex`]) from a patient's resources.
//!
//! * person: birth year (for patients over 89 at the reference year, or at death, the
//!   bucket year that makes them 90 then) and `Patient.gender` (`unknown` when absent);
//! * conditions: every Condition, sensitive or not (consent decides elsewhere what the
//!   broker may search); date from `onsetDateTime`, `onsetPeriod.start` or `recordedDate`;
//! * measurements: Observations with a `valueQuantity` (value and UCUM unit) or a
//!   `valueCodeableConcept` (no value), dated by `effectiveDateTime`,
//!   `effectivePeriod.start` or `issued`; each `component` (blood pressure, survey items)
//!   gives its own row under the component's code;
//! * drugs: MedicationRequest (`authoredOn`) and MedicationStatement (`effective[x]`,
//!   `dateAsserted`), coded by `medicationCodeableConcept` or the referenced Medication;
//! * procedures: Procedure, dated by `performedDateTime` or `performedPeriod.start`;
//! * observation period: FHIR has none, so one is derived as OHDSI's conversion of Synthea
//!   data to OMOP derives it: from the earliest `Encounter.period.start` to the latest
//!   `period.end` (or `start`, for an encounter without an end). None without encounters.
//!
//! Codes come from the first coding that has a code; systems are shortened by
//! [`system_short_name`]. Dates are `YYYY-MM-DD` (partial dates padded with `01`); rows
//! without a usable date or code are left out. Immunizations are not indexed.
//!
//! Safe Harbor, for FHIR and OMOP input alike ([`safe_harbor`]): no measurement states an
//! age over 89 (a value over 89 years in any unit of time, e.g. LOINC 30525-0 `Age` of 99
//! `a`); a patient in the 90+ bucket has no measurement in years or months at all and no
//! row dated before the bucket year. The dates here are the true ones: the custodian moves
//! them by the patient's secret shift before upload ([`model::PatientIndex::shifted`]).

use model::{CodedEvent, ObservationPeriod, PatientIndex, Person};
use serde_json::Value;

use crate::categorize::Lookup;
use crate::deidentify::{DeidConfig, is_age_unit, years_of};
use crate::resolve::Resolver;
use crate::util;

/// The index short name of a code system URL: `snomed`, `loinc`, `rxnorm`, `icd10`, `cvx`,
/// or the URL itself for other systems.
pub fn system_short_name(url: &str) -> &str {
    match url {
        "http://snomed.info/sct" | "urn:oid:2.16.840.1.113883.6.96" => "snomed",
        "http://loinc.org" | "urn:oid:2.16.840.1.113883.6.1" => "loinc",
        "http://www.nlm.nih.gov/research/umls/rxnorm" | "urn:oid:2.16.840.1.113883.6.88" => {
            "rxnorm"
        }
        "http://hl7.org/fhir/sid/cvx" | "urn:oid:2.16.840.1.113883.12.292" => "cvx",
        "urn:oid:2.16.840.1.113883.6.90" | "urn:oid:2.16.840.1.113883.6.3" => "icd10",
        u if u.starts_with("http://hl7.org/fhir/sid/icd-10") => "icd10",
        u => u,
    }
}

/// The index sex of a (raw) Patient: its administrative gender, `unknown` when absent.
fn sex(patient: &Value) -> String {
    patient
        .get("gender")
        .and_then(Value::as_str)
        .filter(|g| matches!(*g, "male" | "female" | "other" | "unknown"))
        .unwrap_or("unknown")
        .to_string()
}

fn first_date(resource: &Value, paths: &[&[&str]]) -> Option<String> {
    paths.iter().find_map(|path| {
        let mut v = resource;
        for key in *path {
            v = v.get(*key)?;
        }
        util::index_date(v.as_str()?)
    })
}

fn event(
    concept: Option<&Value>,
    date: &str,
    value: Option<f64>,
    unit: &str,
) -> Option<CodedEvent> {
    let coding = util::first_coding(concept)?;
    Some(CodedEvent {
        system: system_short_name(coding.system).to_string(),
        code: coding.code.to_string(),
        date: date.to_string(),
        value,
        unit: unit.to_string(),
    })
}

fn quantity(q: &Value) -> (Option<f64>, String) {
    let value = q.get("value").and_then(Value::as_f64);
    let unit = q
        .get("code")
        .and_then(Value::as_str)
        .or_else(|| q.get("unit").and_then(Value::as_str))
        .unwrap_or("");
    (value, unit.to_string())
}

/// Whether a measurement row may be indexed under Safe Harbor: never an age over 89 (a
/// value over 89 years in any unit of time: LOINC 30525-0 `Age` of 99 `a`, 1,100 `mo`),
/// and for a patient in the 90+ bucket no value in years or months at all (with its date,
/// an age gives the birth year).
fn is_indexable(row: &CodedEvent, over_89: bool) -> bool {
    let Some(value) = row.value else {
        return true;
    };
    match years_of(value, &row.unit) {
        Some(_) if over_89 && is_age_unit(&row.unit) => false,
        Some(years) => years <= 89.0,
        None => true,
    }
}

/// What Safe Harbor asks of a patient's index rows, whatever their source: the birth year
/// bucketed (90+), no measurement that states an age ([`is_indexable`]), and for the 90+
/// bucket nothing dated before the bucket year
/// ([`PatientIndex::drop_before_birth_year`]). `birth_year` is the true year of birth.
/// Also says how many rows of each table it withheld.
pub(crate) fn safe_harbor(
    mut index: PatientIndex,
    birth_year: Option<i32>,
    death_year: Option<i32>,
    cfg: &DeidConfig,
) -> (PatientIndex, Withheld) {
    let before = Withheld::sizes(&index);
    let over_89 = birth_year.is_some_and(|y| cfg.is_over_89(y, death_year));
    index.person.birth_year = birth_year.map(|y| cfg.index_birth_year(y, death_year));
    index.measurements.retain(|m| is_indexable(m, over_89));
    index.drop_before_birth_year();
    let after = Withheld::sizes(&index);
    let withheld = Withheld {
        condition: before.condition - after.condition,
        measurement: before.measurement - after.measurement,
        drug: before.drug - after.drug,
        procedure: before.procedure - after.procedure,
        observation_period: before.observation_period - after.observation_period,
    };
    (index, withheld)
}

/// Index rows withheld under Safe Harbor ([`crate::index`]), per index table: dated before
/// the 90+ bucket year (or before the birth year), or a measurement that states an age.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Withheld {
    pub condition: usize,
    pub measurement: usize,
    pub drug: usize,
    pub procedure: usize,
    pub observation_period: usize,
}

impl Withheld {
    fn sizes(index: &PatientIndex) -> Withheld {
        Withheld {
            condition: index.conditions.len(),
            measurement: index.measurements.len(),
            drug: index.drugs.len(),
            procedure: index.procedures.len(),
            observation_period: index.observation_periods.len(),
        }
    }

    /// All rows withheld.
    pub fn total(&self) -> usize {
        self.condition + self.measurement + self.drug + self.procedure + self.observation_period
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Withheld) {
        self.condition += other.condition;
        self.measurement += other.measurement;
        self.drug += other.drug;
        self.procedure += other.procedure;
        self.observation_period += other.observation_period;
    }
}

/// The measurement rows of one Observation.
fn measurements(obs: &Value, date: &str, out: &mut Vec<CodedEvent>) {
    let mut push = |row: Option<CodedEvent>| out.extend(row);
    if let Some(q) = obs.get("valueQuantity") {
        let (value, unit) = quantity(q);
        push(event(obs.get("code"), date, value, &unit));
    } else if obs.get("valueCodeableConcept").is_some() {
        push(event(obs.get("code"), date, None, ""));
    }
    for component in obs
        .get("component")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(q) = component.get("valueQuantity") {
            let (value, unit) = quantity(q);
            push(event(component.get("code"), date, value, &unit));
        } else if component.get("valueCodeableConcept").is_some() {
            push(event(component.get("code"), date, None, ""));
        }
    }
}

/// The index rows of one patient (see [`Extractor`]).
pub(crate) fn extract(
    patient: &Value,
    resources: &[Value],
    resolver: &Resolver<'_>,
    cfg: &DeidConfig,
) -> PatientIndex {
    let mut rows = Extractor::new(patient);
    for r in resources {
        rows.add(r, resolver);
    }
    rows.finish(patient, cfg).0
}

/// The index rows of one patient, gathered one resource at a time.
pub(crate) struct Extractor {
    index: PatientIndex,
    /// The span of the encounters (ISO dates compare as text).
    observed: Option<(String, String)>,
}

impl Extractor {
    pub(crate) fn new(patient: &Value) -> Self {
        Extractor {
            index: PatientIndex {
                person: Person {
                    birth_year: None,
                    sex: sex(patient),
                },
                ..PatientIndex::default()
            },
            observed: None,
        }
    }

    /// Adds the rows of one of the patient's resources.
    pub(crate) fn add(&mut self, r: &Value, resolver: &Resolver<'_>) {
        let index = &mut self.index;
        match util::resource_type(r) {
            Some("Encounter") => {
                if let Some(start) = first_date(r, &[&["period", "start"]]) {
                    let end = first_date(r, &[&["period", "end"]])
                        .filter(|end| *end >= start)
                        .unwrap_or_else(|| start.clone());
                    self.observed = Some(match self.observed.take() {
                        Some((from, to)) => (from.min(start), to.max(end)),
                        None => (start, end),
                    });
                }
            }
            Some("Condition") => {
                if let Some(date) = first_date(
                    r,
                    &[
                        &["onsetDateTime"],
                        &["onsetPeriod", "start"],
                        &["recordedDate"],
                    ],
                ) {
                    index
                        .conditions
                        .extend(event(r.get("code"), &date, None, ""));
                }
            }
            Some("Observation") => {
                if let Some(date) = first_date(
                    r,
                    &[
                        &["effectiveDateTime"],
                        &["effectivePeriod", "start"],
                        &["issued"],
                    ],
                ) {
                    measurements(r, &date, &mut index.measurements);
                }
            }
            Some(ty @ ("MedicationRequest" | "MedicationStatement")) => {
                let date = if ty == "MedicationRequest" {
                    first_date(r, &[&["authoredOn"]])
                } else {
                    first_date(
                        r,
                        &[
                            &["effectiveDateTime"],
                            &["effectivePeriod", "start"],
                            &["dateAsserted"],
                        ],
                    )
                };
                let concept = r.get("medicationCodeableConcept").or_else(|| {
                    r.get("medicationReference")
                        .and_then(|m| m.get("reference"))
                        .and_then(Value::as_str)
                        .and_then(|s| resolver.resolve(s))
                        .and_then(|m| m.get("code"))
                });
                if let Some(date) = date {
                    index.drugs.extend(event(concept, &date, None, ""));
                }
            }
            Some("Procedure") => {
                if let Some(date) =
                    first_date(r, &[&["performedDateTime"], &["performedPeriod", "start"]])
                {
                    index
                        .procedures
                        .extend(event(r.get("code"), &date, None, ""));
                }
            }
            _ => {}
        }
    }

    /// The rows, with Safe Harbor applied ([`safe_harbor`]), and what it withheld.
    pub(crate) fn finish(mut self, patient: &Value, cfg: &DeidConfig) -> (PatientIndex, Withheld) {
        if let Some((start, end)) = self.observed {
            self.index
                .observation_periods
                .push(ObservationPeriod { start, end });
        }
        let (birth_year, death_year) = crate::deidentify::life_years(patient);
        safe_harbor(self.index, birth_year, death_year, cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn short_names() {
        assert_eq!(system_short_name("http://snomed.info/sct"), "snomed");
        assert_eq!(
            system_short_name("http://hl7.org/fhir/sid/icd-10-cm"),
            "icd10"
        );
        assert_eq!(
            system_short_name("http://example.org/x"),
            "http://example.org/x"
        );
    }

    #[test]
    fn rows() {
        let patient = json!({"resourceType": "Patient", "id": "p", "birthDate": "1930-01-01", "gender": "female"});
        let resources = vec![
            json!({"resourceType": "Encounter", "period": {"start": "2009-12-31T23:00:00Z", "end": "2010-01-01T01:00:00Z"}}),
            json!({"resourceType": "Encounter", "period": {"start": "2001-02-03T04:00:00Z"}}),
            json!({"resourceType": "Encounter", "period": {"start": "2012-06-07T00:00:00Z", "end": "2011-01-01"}}),
            json!({"resourceType": "Condition", "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                   "onsetDateTime": "2001-02-03T04:05:06Z"}),
            json!({"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
                   "effectiveDateTime": "2010-01-01",
                   "component": [
                     {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, "valueQuantity": {"value": 130, "unit": "mm[Hg]"}},
                     {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]}, "valueQuantity": {"value": 85, "unit": "mm[Hg]"}}]}),
            json!({"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "72166-2"}]},
                   "effectiveDateTime": "2010-01-01", "valueCodeableConcept": {"coding": [{"code": "266919005"}]}}),
            json!({"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "630-4"}]},
                   "effectiveDateTime": "2010-01-01", "valueString": "free text"}),
            json!({"resourceType": "Medication", "id": "m1", "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975"}]}}),
            json!({"resourceType": "MedicationRequest", "medicationReference": {"reference": "urn:uuid:m1"}, "authoredOn": "2011-05"}),
            json!({"resourceType": "Procedure", "code": {"coding": [{"system": "http://snomed.info/sct", "code": "73761001"}]},
                   "performedPeriod": {"start": "2012-06-07T00:00:00Z"}}),
        ];
        let resolver = Resolver::new(&patient, &resources, None);
        let idx = extract(&patient, &resources, &resolver, &DeidConfig::new(2026));
        assert_eq!(
            idx.person,
            Person {
                birth_year: Some(1936),
                sex: "female".into()
            }
        );
        assert_eq!(idx.conditions.len(), 1);
        assert_eq!(idx.conditions[0].date, "2001-02-03");
        assert_eq!(idx.measurements.len(), 3);
        assert_eq!(idx.measurements[0].code, "8480-6");
        assert_eq!(idx.measurements[0].value, Some(130.0));
        assert_eq!(idx.measurements[0].unit, "mm[Hg]");
        assert_eq!(idx.measurements[2].value, None);
        assert_eq!(idx.drugs.len(), 1);
        assert_eq!(idx.drugs[0].system, "rxnorm");
        assert_eq!(idx.drugs[0].date, "2011-05-01");
        assert_eq!(idx.procedures[0].date, "2012-06-07");
        // From the first encounter's start to the last encounter's end; an end before its
        // start counts as the start.
        assert_eq!(
            idx.observation_periods,
            [ObservationPeriod {
                start: "2001-02-03".into(),
                end: "2012-06-07".into()
            }]
        );
        let none = extract(&patient, &resources[3..], &resolver, &DeidConfig::new(2026));
        assert!(none.observation_periods.is_empty());
    }

    #[test]
    fn no_age_over_89_is_indexed() {
        let observation = |code: &str, date: &str, value: f64, unit: &str| {
            json!({"resourceType": "Observation", "effectiveDateTime": date,
                   "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                   "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}})
        };
        let age = |value: f64, unit: &str| observation("30525-0", "2024-01-01", value, unit);
        // Not an age: a weight of 99 kg stays.
        let weight = observation("29463-7", "2024-01-01", 99.0, "kg");
        let resources = vec![
            age(99.0, "a"),
            age(89.0, "a"),
            age(95.0, "{years}"),
            age(1_100.0, "mo"),
            age(30.0, "d"),
            weight.clone(),
            observation("29463-7", "1930-06-01", 3.0, "kg"),
        ];
        let rows = |birth: &str| {
            let patient = json!({"resourceType": "Patient", "id": "p", "birthDate": birth});
            let resolver = Resolver::new(&patient, &resources, None);
            let idx = extract(&patient, &resources, &resolver, &DeidConfig::new(2026));
            idx.measurements
                .iter()
                .map(|m| (m.code.clone(), m.value, m.date.clone()))
                .collect::<Vec<_>>()
        };
        let row =
            |code: &str, value: f64, date: &str| (code.to_string(), Some(value), date.to_string());
        // Born 1925: in the 90+ bucket (1936), so no age in years or months at all, and
        // nothing dated before 1936.
        assert_eq!(
            rows("1925-01-01"),
            [
                row("30525-0", 30.0, "2024-01-01"),
                row("29463-7", 99.0, "2024-01-01")
            ]
        );
        // Born 1920 and 1950: ages up to 89 stay, those over go, in any unit.
        assert_eq!(
            rows("1920-03-04")[..2],
            rows("1925-01-01")[..2],
            "the same rule for everyone in the bucket"
        );
        assert_eq!(
            rows("1950-01-01"),
            [
                row("30525-0", 89.0, "2024-01-01"),
                row("30525-0", 30.0, "2024-01-01"),
                row("29463-7", 99.0, "2024-01-01")
            ]
        );
    }
}
