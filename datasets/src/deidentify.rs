//! HIPAA Safe Harbor de-identification of the research copy.
//!
//! Applied to every category except [`Category::Critical`](model::Category::Critical):
//!
//! * **Patient** is rebuilt from a whitelist: `gender`, birth year, `deceasedBoolean` or the
//!   year of death, `maritalStatus` codes, `communication.language` codes, and the US Core
//!   race, ethnicity and birth-sex extensions (codes only). Its id becomes `subject`. Names,
//!   addresses, telecom, identifiers, photo, contacts, links, the narrative and every other
//!   extension (mother's maiden name, birthplace, Synthea's DALY/QALY, …) are gone.
//! * **Ages over 89** (the year of death, or the reference year for the living, minus the
//!   birth year, > 89: someone who died at 80 is never 90+): `birthDate` is removed and marked
//!   twice: `_birthDate` carries the standard data-absent-reason extension with code
//!   `masked`, and the Patient carries the extension [`AGE_90_PLUS_EXTENSION_URL`] with
//!   `valueString` `"90+"`. `…Age` elements (e.g. `Condition.onsetAge`) are dropped for
//!   those patients.
//! * **Other resources** are cleaned by a generic walk:
//!   - elements that identify people, places or things are dropped wherever they appear
//!     ([`is_dropped_element`]: identifier, name, address, telecom, note, extensions,
//!     performers and participants, locations, device serial and lot numbers,
//!     `presentedForm`, contained resources, …);
//!   - free text is dropped: narratives (`text.div`), `description`, `comment`,
//!     `conclusion`, any `…String` value, and a CodeableConcept `text` unless it repeats the
//!     display of one of its codings;
//!   - every date, dateTime or instant with at least a month (`YYYY-MM…`) becomes its year
//!     (`YYYY`), whatever element holds it;
//!   - references: a reference to the patient becomes `{"reference": "Patient/subject"}`;
//!     any other reference keeps only its target type (`{"type": "Encounter"}`) or is
//!     dropped; reference `display`s and identifiers are always dropped;
//!   - resource ids become the first 16 hex digits of a BLAKE3 hash of a per-patient salt
//!     (itself derived from the custodian's patient id), the resource type and the original
//!     id: stable across imports, not reversible without the custodian's ids;
//!   - `meta` keeps only `profile`;
//!   - observation components that ask for identifying data (PRAPARE's street address,
//!     [`IDENTIFYING_COMPONENT_CODES`]) are
//!     dropped;
//!   - coded data (system, code, display of clinical codes), values, units and statuses are
//!     kept.
//! * Finally, as a safety net, any string anywhere in the research copy that contains one
//!   of the patient's identifying strings (see
//!   [`PatientRecord::identifiers`](crate::PatientRecord::identifiers)), compared
//!   case-insensitively, is removed.

use serde_json::{Map, Value, json};

use crate::categorize::{IDENTIFYING_COMPONENT_CODES, Lookup};
use crate::resolve::Resolver;
use crate::util;

/// Parameters of the de-identification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeidConfig {
    /// The year a living patient's age is taken at: a patient born in year `y` is
    /// `reference_year - y` years old for the 90+ rule (at most a year more than their age
    /// in whole years, never less: the rule errs on the side of the bucket). The default is
    /// this year, by the clock; tests pass a fixed year so that imports are reproducible.
    pub reference_year: i32,
}

impl DeidConfig {
    /// A configuration with the given reference year.
    pub fn new(reference_year: i32) -> Self {
        DeidConfig { reference_year }
    }

    /// A configuration whose reference year is this year (UTC), by the system clock.
    pub fn this_year() -> Self {
        let days = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 86_400);
        let year = i32::try_from(days)
            .ok()
            .and_then(model::Date::from_days)
            .map_or(1970, model::Date::year);
        DeidConfig::new(year)
    }

    /// The year a patient's age is taken at: the reference year, or the year of death
    /// when the patient died before it.
    fn age_year(&self, death_year: Option<i32>) -> i32 {
        death_year.map_or(self.reference_year, |d| d.min(self.reference_year))
    }

    /// Whether someone born in `birth_year` is over 89 at the reference year or, having
    /// died (`death_year`), at death: someone who died at 80 is never 90+.
    pub fn is_over_89(&self, birth_year: i32, death_year: Option<i32>) -> bool {
        self.age_year(death_year).saturating_sub(birth_year) > 89
    }

    /// The birth year the index reports: the year itself, or for the 90+ bucket the year
    /// that makes the patient 90 at the year their age is taken at.
    pub fn index_birth_year(&self, birth_year: i32, death_year: Option<i32>) -> i32 {
        self.bucket_year(birth_year, death_year)
            .unwrap_or(birth_year)
    }

    /// For a patient over 89, the 90+ bucket's year (the year that makes them 90 at the
    /// year their age is taken at): a date of an earlier year would reveal an age over 90,
    /// so neither the research copy nor the index keeps one. `None` for anyone else.
    pub fn bucket_year(&self, birth_year: i32, death_year: Option<i32>) -> Option<i32> {
        self.is_over_89(birth_year, death_year)
            .then(|| self.age_year(death_year) - 90)
    }
}

/// A quantity's value in years when its unit is a unit of time of a day or longer (UCUM
/// `a`, `mo`, `wk`, `d`, or those words as written): how ages and durations are checked
/// against the 90+ rule. `None` for any other unit.
pub(crate) fn years_of(value: f64, unit: &str) -> Option<f64> {
    let unit = unit
        .trim_matches(|c| c == '{' || c == '}')
        .to_ascii_lowercase();
    let per_year = match unit.as_str() {
        "a" | "yr" | "yrs" | "year" | "years" | "a_j" | "a_g" => 1.0,
        "mo" | "month" | "months" | "mo_j" | "mo_g" => 12.0,
        "wk" | "week" | "weeks" => 365.25 / 7.0,
        "d" | "day" | "days" => 365.25,
        _ => return None,
    };
    Some(value / per_year)
}

/// Whether a unit is years or months: the units ages are written in (an age and the date
/// it was taken at give the birth year).
pub(crate) fn is_age_unit(unit: &str) -> bool {
    years_of(12.0, unit).is_some_and(|y| y >= 1.0)
}

impl Default for DeidConfig {
    /// [`DeidConfig::this_year`].
    fn default() -> Self {
        DeidConfig::this_year()
    }
}

/// A (raw) Patient's year of birth and, when it gives `deceasedDateTime`, of death.
pub(crate) fn life_years(patient: &Value) -> (Option<i32>, Option<i32>) {
    let year = |key: &str| {
        patient
            .get(key)
            .and_then(Value::as_str)
            .and_then(util::year_of)
    };
    (year("birthDate"), year("deceasedDateTime"))
}

/// URL of the Patient extension that marks the 90+ age bucket (`valueString: "90+"`).
pub const AGE_90_PLUS_EXTENSION_URL: &str = "urn:safe-harbor:age-90-plus";

/// URL of the standard FHIR data-absent-reason extension.
const DATA_ABSENT_REASON_URL: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";

/// Whether an element is dropped wherever it appears in a non-Patient resource: identifiers,
/// names, addresses, telecom, photos, contacts, notes, presented forms, contained resources,
/// extensions, performers, participants, locations and other actors, device serial and lot
/// numbers, encounter links, attachments, and element ids.
pub fn is_dropped_element(key: &str) -> bool {
    matches!(
        key,
        "identifier"
            | "name"
            | "address"
            | "telecom"
            | "photo"
            | "contact"
            | "note"
            | "presentedForm"
            | "contained"
            | "extension"
            | "modifierExtension"
            | "performer"
            | "participant"
            | "location"
            | "serviceProvider"
            | "requester"
            | "recorder"
            | "asserter"
            | "author"
            | "custodian"
            | "careTeam"
            | "managingOrganization"
            | "hospitalization"
            | "udiCarrier"
            | "distinctIdentifier"
            | "lotNumber"
            | "serialNumber"
            | "deviceName"
            | "modelNumber"
            | "owner"
            | "url"
            | "encounter"
            | "context"
            | "supportingInfo"
            | "insurance"
            | "organization"
            | "practitioner"
            | "informationSource"
            | "reportedReference"
            | "sender"
            | "recipient"
            | "media"
            | "imagingStudy"
            | "content"
            | "attachment"
            | "implicitRules"
            | "id"
    )
}

/// Elements whose string value is free text.
fn is_free_text_element(key: &str) -> bool {
    matches!(
        key,
        "description"
            | "comment"
            | "conclusion"
            | "patientInstruction"
            | "summary"
            | "div"
            | "title"
            | "instruction"
    )
}

/// Elements whose string values are never dates, even when they look like one.
fn is_non_date_element(key: &str) -> bool {
    matches!(key, "code" | "system" | "version" | "unit" | "type")
}

/// The per-patient state of the de-identification.
pub(crate) struct Deidentifier<'a, 'r> {
    cfg: DeidConfig,
    salt: [u8; 32],
    /// The 90+ bucket year ([`DeidConfig::bucket_year`]) of a patient over 89.
    bucket_year: Option<i32>,
    resolver: &'a Resolver<'r>,
}

impl<'a, 'r> Deidentifier<'a, 'r> {
    pub(crate) fn new(
        cfg: DeidConfig,
        source_id: &str,
        bucket_year: Option<i32>,
        resolver: &'a Resolver<'r>,
    ) -> Self {
        let salt = blake3::derive_key(
            "datasets research-copy patient salt v1",
            source_id.as_bytes(),
        );
        Deidentifier {
            cfg,
            salt,
            bucket_year,
            resolver,
        }
    }

    /// The research-copy id of a resource.
    pub(crate) fn pseudo_id(&self, resource_type: &str, id: &str) -> String {
        let mut h = blake3::Hasher::new_derive_key("datasets research-copy resource id v1");
        h.update(&self.salt);
        h.update(resource_type.as_bytes());
        h.update(&[0]);
        h.update(id.as_bytes());
        let hex = h.finalize().to_hex();
        hex.as_str()[..16].to_string()
    }

    /// The de-identified Patient (demographics category).
    pub(crate) fn patient(&self, patient: &Value) -> Value {
        let mut out = Map::new();
        out.insert("resourceType".into(), json!("Patient"));
        out.insert("id".into(), json!("subject"));
        if let Some(meta) = clean_meta(patient.get("meta")) {
            out.insert("meta".into(), meta);
        }
        if let Some(g) = patient.get("gender").and_then(Value::as_str) {
            out.insert("gender".into(), json!(g));
        }
        let (birth_year, death_year) = life_years(patient);
        let over_89 = birth_year.is_some_and(|y| self.cfg.is_over_89(y, death_year));
        match birth_year {
            Some(_) if over_89 => {
                out.insert(
                    "_birthDate".into(),
                    json!({"extension": [{"url": DATA_ABSENT_REASON_URL, "valueCode": "masked"}]}),
                );
            }
            Some(y) => {
                out.insert("birthDate".into(), json!(format!("{y:04}")));
            }
            None => {}
        }
        if let Some(b) = patient.get("deceasedBoolean").and_then(Value::as_bool) {
            out.insert("deceasedBoolean".into(), json!(b));
        }
        // The year of death is at least the bucket year (the age is taken at death).
        if let Some(y) = patient
            .get("deceasedDateTime")
            .and_then(Value::as_str)
            .and_then(util::year_of)
        {
            out.insert("deceasedDateTime".into(), json!(format!("{y:04}")));
        }
        let no_parent = Map::new();
        if let Some(m) = patient
            .get("maritalStatus")
            .and_then(|m| self.clean(&no_parent, "maritalStatus", m))
        {
            out.insert("maritalStatus".into(), m);
        }
        let communication: Vec<Value> = patient
            .get("communication")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let mut m = Map::new();
                if let Some(lang) = c
                    .get("language")
                    .and_then(|l| self.clean(&no_parent, "language", l))
                {
                    m.insert("language".into(), lang);
                }
                if let Some(p) = c.get("preferred").and_then(Value::as_bool) {
                    m.insert("preferred".into(), json!(p));
                }
                (!m.is_empty()).then_some(Value::Object(m))
            })
            .collect();
        if !communication.is_empty() {
            out.insert("communication".into(), Value::Array(communication));
        }
        let mut extensions: Vec<Value> = patient
            .get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(clean_demographic_extension)
            .collect();
        if over_89 {
            extensions.push(json!({"url": AGE_90_PLUS_EXTENSION_URL, "valueString": "90+"}));
        }
        if !extensions.is_empty() {
            out.insert("extension".into(), Value::Array(extensions));
        }
        Value::Object(out)
    }

    /// The de-identified copy of a non-Patient resource, or `None` if nothing is left.
    pub(crate) fn resource(&self, resource: &Value) -> Option<Value> {
        let obj = resource.as_object()?;
        let ty = obj.get("resourceType")?.as_str()?;
        let mut out = Map::new();
        out.insert("resourceType".into(), Value::from(ty));
        if let Some(id) = obj.get("id").and_then(Value::as_str) {
            out.insert("id".into(), Value::from(self.pseudo_id(ty, id)));
        }
        if let Some(meta) = clean_meta(obj.get("meta")) {
            out.insert("meta".into(), meta);
        }
        for (k, v) in obj {
            if matches!(k.as_str(), "resourceType" | "id" | "meta") {
                continue;
            }
            if let Some(clean) = self.clean(obj, k, v) {
                out.insert(k.clone(), clean);
            }
        }
        // A medication given by reference (Synthea does this for some requests): inline
        // the referenced Medication's code, since the reference itself is stripped.
        if !out.contains_key("medicationCodeableConcept")
            && let Some(med) = obj
                .get("medicationReference")
                .and_then(|m| m.get("reference"))
                .and_then(Value::as_str)
                .and_then(|r| self.resolver.resolve(r))
            && let Some(code) = med
                .get("code")
                .and_then(|c| self.clean(&Map::new(), "medicationCodeableConcept", c))
        {
            out.insert("medicationCodeableConcept".into(), code);
        }
        Some(Value::Object(out))
    }

    /// Cleans the member `key: value` of the object `parent`.
    fn clean(&self, parent: &Map<String, Value>, key: &str, value: &Value) -> Option<Value> {
        if is_dropped_element(key) {
            return None;
        }
        if self.bucket_year.is_some() && key.ends_with("Age") {
            return None;
        }
        match value {
            Value::String(s) => self.clean_string(parent, key, s),
            Value::Object(o) => self.clean_object(key, o),
            Value::Array(items) => {
                let kept: Vec<Value> = items
                    .iter()
                    .filter(|item| key != "component" || !is_identifying_component(item))
                    .filter_map(|item| self.clean(parent, key, item))
                    .collect();
                (!kept.is_empty()).then_some(Value::Array(kept))
            }
            other => Some(other.clone()),
        }
    }

    fn clean_string(&self, parent: &Map<String, Value>, key: &str, s: &str) -> Option<Value> {
        match key {
            // CodeableConcept.text: kept only when it repeats one of its codings' displays.
            "text" => {
                let repeats_display = parent
                    .get("coding")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .any(|c| c.get("display").and_then(Value::as_str) == Some(s));
                return repeats_display.then(|| Value::from(s));
            }
            // A display is kept on a Coding (which has a code), never on a Reference.
            "display" => return parent.contains_key("code").then(|| Value::from(s)),
            _ => {}
        }
        if is_free_text_element(key) || key.ends_with("String") || key.ends_with("Markdown") {
            return None;
        }
        if !is_non_date_element(key)
            && let Some(year) = util::year_of(s)
        {
            if self.bucket_year.is_some_and(|bucket| year < bucket) {
                // The year would reveal an age over 90.
                return None;
            }
            if util::looks_like_month_date(s) {
                return Some(Value::from(&s[..4]));
            }
        }
        Some(Value::from(s))
    }

    fn clean_object(&self, key: &str, o: &Map<String, Value>) -> Option<Value> {
        if key == "text" {
            // A Narrative.
            return None;
        }
        if is_reference_like(o) {
            return self.clean_reference(o);
        }
        let mut out = Map::new();
        for (k, v) in o {
            if let Some(clean) = self.clean(o, k, v) {
                out.insert(k.clone(), clean);
            }
        }
        if let Some((years, unit)) = time_quantity(&out) {
            if self.bucket_year.is_some() && is_age_unit(unit) {
                // With any date of the patient, an age gives the birth year.
                return None;
            }
            if years > 89.0 {
                return aggregate_age(key);
            }
        }
        (!out.is_empty()).then_some(Value::Object(out))
    }

    fn clean_reference(&self, o: &Map<String, Value>) -> Option<Value> {
        if let Some(r) = o.get("reference").and_then(Value::as_str) {
            if self.resolver.is_patient(r) {
                return Some(single("reference", "Patient/subject"));
            }
            if let Some(ty) = self.resolver.target_type(r) {
                return Some(single("type", ty));
            }
        }
        o.get("type")
            .and_then(Value::as_str)
            .and_then(crate::categorize::known_type_name)
            .map(|ty| single("type", ty))
    }
}

/// Whether an object is a FHIR Reference: it has a `reference`, or it only has Reference
/// elements and names something by identifier or display.
fn is_reference_like(o: &Map<String, Value>) -> bool {
    if o.get("reference").is_some_and(Value::is_string) {
        return true;
    }
    let only_reference_keys = o.keys().all(|k| {
        matches!(
            k.as_str(),
            "reference" | "display" | "identifier" | "type" | "extension" | "id"
        )
    });
    only_reference_keys && (o.contains_key("display") || o.contains_key("identifier"))
}

fn is_identifying_component(component: &Value) -> bool {
    util::codings(component.get("code")).any(|c| IDENTIFYING_COMPONENT_CODES.contains(&c.code))
}

/// A Quantity (or Age, Duration, a Range's `low` or `high`) in a unit of time: its value
/// in years and its unit.
fn time_quantity(o: &Map<String, Value>) -> Option<(f64, &str)> {
    let value = o.get("value")?.as_f64()?;
    ["code", "unit"].iter().find_map(|k| {
        let unit = o.get(*k)?.as_str()?;
        Some((years_of(value, unit)?, unit))
    })
}

const UCUM: &str = "http://unitsofmeasure.org";

/// An age over 89 as Safe Harbor's single category "90 or older": a Range's `high` is
/// dropped (the range becomes open-ended), its `low` becomes 90 years; any other quantity
/// becomes `>= 90` years.
fn aggregate_age(key: &str) -> Option<Value> {
    if key == "high" {
        return None;
    }
    let mut out = Map::new();
    out.insert("value".into(), json!(90));
    if key != "low" {
        // A Range's bounds are SimpleQuantities, which have no comparator.
        out.insert("comparator".into(), json!(">="));
    }
    out.insert("unit".into(), json!("years"));
    out.insert("system".into(), json!(UCUM));
    out.insert("code".into(), json!("a"));
    Some(Value::Object(out))
}

/// `{key: value}`.
fn single(key: &str, value: &str) -> Value {
    let mut m = Map::new();
    m.insert(key.into(), Value::from(value));
    Value::Object(m)
}

fn clean_meta(meta: Option<&Value>) -> Option<Value> {
    let profiles: Vec<Value> = meta?
        .get("profile")?
        .as_array()?
        .iter()
        .filter(|p| p.is_string())
        .cloned()
        .collect();
    (!profiles.is_empty()).then(|| {
        let mut m = Map::new();
        m.insert("profile".into(), Value::Array(profiles));
        Value::Object(m)
    })
}

const US_CORE_RACE: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race";
const US_CORE_ETHNICITY: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity";
const US_CORE_BIRTHSEX: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex";

/// Keeps the codes of the US Core race and ethnicity extensions and the birth-sex code.
fn clean_demographic_extension(ext: &Value) -> Option<Value> {
    let url = ext.get("url")?.as_str()?;
    match url {
        US_CORE_RACE | US_CORE_ETHNICITY => {
            let parts: Vec<Value> = ext
                .get("extension")?
                .as_array()?
                .iter()
                .filter_map(|sub| {
                    let sub_url = sub.get("url")?.as_str()?;
                    if !matches!(sub_url, "ombCategory" | "detailed") {
                        return None;
                    }
                    let coding = sub.get("valueCoding")?.as_object()?;
                    let mut c = Map::new();
                    for k in ["system", "code", "display"] {
                        if let Some(v) = coding.get(k).and_then(Value::as_str) {
                            c.insert(k.into(), json!(v));
                        }
                    }
                    Some(json!({"url": sub_url, "valueCoding": c}))
                })
                .collect();
            (!parts.is_empty()).then(|| json!({"url": url, "extension": parts}))
        }
        US_CORE_BIRTHSEX => {
            let code = ext.get("valueCode")?.as_str()?;
            matches!(code, "M" | "F" | "UNK" | "OTH")
                .then(|| json!({"url": url, "valueCode": code}))
        }
        _ => None,
    }
}

/// The strings of a raw Patient that identify the person: names, address lines and cities,
/// telecom values, identifier values, contacts' names, mother's maiden name and birthplace
/// city. Strings shorter than [`MIN_IDENTIFIER_LEN`] characters are left out (too short to
/// scan for without false hits). Order of first appearance, no duplicates.
pub(crate) fn identifiers_of(patient: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: &str| {
        let s = s.trim();
        if s.chars().count() >= MIN_IDENTIFIER_LEN && !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    };
    let arr = |v: Option<&Value>| -> Vec<Value> {
        v.and_then(Value::as_array).cloned().unwrap_or_default()
    };
    let names = |v: &Value, push: &mut dyn FnMut(&str)| {
        for name in arr(v.get("name"))
            .iter()
            .chain(v.get("name").filter(|n| n.is_object()))
        {
            for g in arr(name.get("given")) {
                if let Some(s) = g.as_str() {
                    push(s);
                }
            }
            for k in ["family", "text"] {
                if let Some(s) = name.get(k).and_then(Value::as_str) {
                    push(s);
                }
            }
        }
    };
    let addresses = |v: &Value, push: &mut dyn FnMut(&str)| {
        for addr in arr(v.get("address"))
            .iter()
            .chain(v.get("address").filter(|a| a.is_object()))
        {
            for l in arr(addr.get("line")) {
                if let Some(s) = l.as_str() {
                    push(s);
                }
            }
            for k in ["city", "district", "text"] {
                if let Some(s) = addr.get(k).and_then(Value::as_str) {
                    push(s);
                }
            }
        }
    };
    names(patient, &mut push);
    addresses(patient, &mut push);
    for t in arr(patient.get("telecom")) {
        if let Some(s) = t.get("value").and_then(Value::as_str) {
            push(s);
        }
    }
    for i in arr(patient.get("identifier")) {
        if let Some(s) = i.get("value").and_then(Value::as_str) {
            push(s);
        }
    }
    for c in arr(patient.get("contact")) {
        names(&c, &mut push);
        addresses(&c, &mut push);
        for t in arr(c.get("telecom")) {
            if let Some(s) = t.get("value").and_then(Value::as_str) {
                push(s);
            }
        }
    }
    for e in arr(patient.get("extension")) {
        match e.get("url").and_then(Value::as_str) {
            Some("http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName") => {
                if let Some(s) = e.get("valueString").and_then(Value::as_str) {
                    push(s);
                }
            }
            Some("http://hl7.org/fhir/StructureDefinition/patient-birthPlace") => {
                if let Some(s) = e
                    .get("valueAddress")
                    .and_then(|a| a.get("city"))
                    .and_then(Value::as_str)
                {
                    push(s);
                }
            }
            _ => {}
        }
    }
    out
}

/// Identifying strings shorter than this are not listed (nor scrubbed).
pub const MIN_IDENTIFIER_LEN: usize = 4;

/// Removes, recursively, every string that contains one of `needles` (lower-case),
/// compared case-insensitively; objects and arrays left empty are removed too. The
/// `resourceType` member is never removed.
pub(crate) fn scrub(value: &Value, needles: &[String]) -> Option<Value> {
    match value {
        Value::String(s) => {
            let lower = s.to_lowercase();
            (!needles
                .iter()
                .any(|n| memchr::memmem::find(lower.as_bytes(), n.as_bytes()).is_some()))
            .then(|| value.clone())
        }
        Value::Array(items) => {
            let kept: Vec<Value> = items.iter().filter_map(|v| scrub(v, needles)).collect();
            (!kept.is_empty()).then_some(Value::Array(kept))
        }
        Value::Object(o) => {
            let mut out = Map::new();
            for (k, v) in o {
                if k == "resourceType" {
                    out.insert(k.clone(), v.clone());
                } else if let Some(clean) = scrub(v, needles) {
                    out.insert(k.clone(), clean);
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        other => Some(other.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthea_like_patient(birth: &str) -> Value {
        json!({
            "resourceType": "Patient",
            "id": "p-1",
            "text": {"status": "generated", "div": "<div>Jane</div>"},
            "extension": [
                {"url": US_CORE_RACE, "extension": [
                    {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White"}},
                    {"url": "text", "valueString": "White"}]},
                {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": "Maiden Name42"},
                {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace", "valueAddress": {"city": "Springfield", "state": "MA"}}
            ],
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-12-3456"}],
            "name": [{"use": "official", "family": "Doe123", "given": ["Jane456"]}],
            "telecom": [{"system": "phone", "value": "555-123-4567"}],
            "gender": "female",
            "birthDate": birth,
            "address": [{"line": ["12 Elm Street"], "city": "Worcester", "postalCode": "01601"}],
            "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M", "display": "Married"}], "text": "Married"},
        })
    }

    #[test]
    fn patient_keeps_only_demographics() {
        let patient = synthea_like_patient("1980-05-17");
        let resolver = Resolver::new(&patient, &[], None);
        let d = Deidentifier::new(DeidConfig::default(), "p-1", None, &resolver);
        let out = d.patient(&patient);
        let text = serde_json::to_string(&out).unwrap();
        assert_eq!(out["birthDate"], "1980");
        assert_eq!(out["gender"], "female");
        assert_eq!(out["id"], "subject");
        for bad in [
            "Jane",
            "Doe123",
            "999-12-3456",
            "555-123-4567",
            "Elm",
            "Worcester",
            "01601",
            "Maiden",
            "Springfield",
            "<div>",
        ] {
            assert!(!text.contains(bad), "{bad} in {text}");
        }
        assert!(text.contains("2106-3"));
        let ids = identifiers_of(&patient);
        for want in [
            "Jane456",
            "Doe123",
            "999-12-3456",
            "555-123-4567",
            "12 Elm Street",
            "Worcester",
            "Maiden Name42",
            "Springfield",
        ] {
            assert!(ids.iter().any(|i| i == want), "{want} missing from {ids:?}");
        }
    }

    #[test]
    fn ages_over_89_are_bucketed() {
        let cfg = DeidConfig::new(2026);
        assert!(cfg.is_over_89(1936, None));
        assert!(!cfg.is_over_89(1937, None));
        assert_eq!(cfg.index_birth_year(1920, None), 1936);
        assert_eq!(cfg.index_birth_year(1950, None), 1950);
        // Age at death: died at 55, 80 and 88 is not 90+; died at 95 is, bucketed at death.
        for (born, died) in [(1926, 1981), (1900, 1980), (1930, 2018)] {
            assert!(!cfg.is_over_89(born, Some(died)), "{born}-{died}");
            assert_eq!(cfg.index_birth_year(born, Some(died)), born);
        }
        assert!(cfg.is_over_89(1895, Some(1990)));
        assert_eq!(cfg.index_birth_year(1895, Some(1990)), 1900);
        // A death year after the reference year counts as the reference year.
        assert!(cfg.is_over_89(1930, Some(2030)));
        let patient = synthea_like_patient("1921-02-03");
        let resolver = Resolver::new(&patient, &[], None);
        let d = Deidentifier::new(cfg, "p-1", cfg.bucket_year(1921, None), &resolver);
        let out = d.patient(&patient);
        assert!(out.get("birthDate").is_none());
        assert_eq!(out["_birthDate"]["extension"][0]["valueCode"], "masked");
        let ext = out["extension"].as_array().unwrap();
        assert!(
            ext.iter()
                .any(|e| e["url"] == AGE_90_PLUS_EXTENSION_URL && e["valueString"] == "90+")
        );
        assert!(!serde_json::to_string(&out).unwrap().contains("1921"));
    }

    #[test]
    fn resources_lose_identifying_elements_and_dates_shrink_to_years() {
        let patient = json!({"resourceType": "Patient", "id": "p-1"});
        let encounter = json!({"resourceType": "Encounter", "id": "e-1"});
        let resources = vec![encounter];
        let resolver = Resolver::new(&patient, &resources, None);
        let d = Deidentifier::new(DeidConfig::default(), "p-1", None, &resolver);
        let obs = json!({
            "resourceType": "Observation",
            "id": "o-1",
            "meta": {"profile": ["http://x/p"], "lastUpdated": "2020-01-01T00:00:00Z"},
            "text": {"div": "<div>free</div>"},
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3", "display": "Cholesterol"}], "text": "Cholesterol"},
            "subject": {"reference": "urn:uuid:p-1", "display": "Mr. Jane Doe"},
            "encounter": {"reference": "urn:uuid:e-1"},
            "performer": [{"reference": "Practitioner?identifier=x|1", "display": "Dr. Who"}],
            "effectiveDateTime": "2019-07-04T10:00:00-04:00",
            "issued": "2019-07-04T10:00:00.123-04:00",
            "valueQuantity": {"value": 180.5, "unit": "mg/dL"},
            "note": [{"text": "called Jane at home"}],
            "derivedFrom": [{"reference": "urn:uuid:e-1", "display": "visit"}],
            "component": [
                {"code": {"coding": [{"system": "http://loinc.org", "code": "56799-0"}]}, "valueString": "12 Elm Street"},
                {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, "valueQuantity": {"value": 120}}
            ]
        });
        let out = d.resource(&obs).unwrap();
        assert_eq!(out["subject"], json!({"reference": "Patient/subject"}));
        assert_eq!(out["derivedFrom"], json!([{"type": "Encounter"}]));
        assert_eq!(out["effectiveDateTime"], "2019");
        assert_eq!(out["issued"], "2019");
        assert_eq!(out["code"]["coding"][0]["code"], "2093-3");
        assert_eq!(out["code"]["text"], "Cholesterol");
        assert_eq!(out["meta"], json!({"profile": ["http://x/p"]}));
        assert_eq!(out["component"].as_array().unwrap().len(), 1);
        assert_ne!(out["id"], "o-1");
        assert_eq!(out["id"].as_str().unwrap().len(), 16);
        for gone in ["text", "encounter", "performer", "note"] {
            assert!(out.get(gone).is_none(), "{gone}");
        }
        let s = serde_json::to_string(&out).unwrap();
        assert!(!s.contains("Jane") && !s.contains("Dr. Who") && !s.contains("Elm"));
    }

    #[test]
    fn ages_over_89_and_the_years_that_imply_them_are_aggregated() {
        let cfg = DeidConfig::new(2026);
        let patient = json!({"resourceType": "Patient", "id": "p-1"});
        let resolver = Resolver::new(&patient, &[], None);
        let years = |v: f64| json!({"value": v, "unit": "years", "system": UCUM, "code": "a"});
        let age_obs = json!({"resourceType": "Observation", "id": "o",
            "code": {"coding": [{"system": "http://loinc.org", "code": "30525-0"}]},
            "effectiveDateTime": "2024-05-06", "valueQuantity": years(99.0)});
        let months = json!({"resourceType": "Observation", "id": "m",
            "code": {"coding": [{"system": "http://loinc.org", "code": "30525-0"}]},
            "effectiveDateTime": "2024-05-06",
            "valueQuantity": {"value": 1_100, "unit": "months", "code": "mo"}});
        let ranged = json!({"resourceType": "Condition", "id": "c",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]},
            "onsetRange": {"low": years(97.0), "high": years(99.0)}, "recordedDate": "1930-02-20"});
        let onset_age = json!({"resourceType": "Condition", "id": "d",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "2"}]},
            "onsetAge": years(50.0), "recordedDate": "1980-02-20"});
        let born = json!({"resourceType": "Observation", "id": "b",
            "code": {"coding": [{"system": "http://loinc.org", "code": "21112-8"}]},
            "valueDateTime": "1925", "effectivePeriod": {"start": "1925-01-01", "end": "1990-01-01"}});
        let ninety =
            json!({"value": 90, "comparator": ">=", "unit": "years", "system": UCUM, "code": "a"});

        // Anyone: an age over 89 is "90 or older"; a range over 89 is open-ended from 90.
        let anyone = Deidentifier::new(cfg, "p-1", None, &resolver);
        assert_eq!(anyone.resource(&age_obs).unwrap()["valueQuantity"], ninety);
        assert_eq!(anyone.resource(&months).unwrap()["valueQuantity"], ninety);
        let r = anyone.resource(&ranged).unwrap();
        assert_eq!(
            r["onsetRange"],
            json!({"low": {"value": 90, "unit": "years", "system": UCUM, "code": "a"}})
        );
        assert_eq!(r["recordedDate"], "1930");
        // Ages up to 89 and years stay for someone not in the bucket.
        assert_eq!(
            anyone.resource(&onset_age).unwrap()["onsetAge"],
            years(50.0)
        );
        assert_eq!(anyone.resource(&born).unwrap()["valueDateTime"], "1925");

        // In the 90+ bucket (born 1925, bucket year 1936): no age in years or months at
        // all, and no date of a year before 1936.
        let bucketed = Deidentifier::new(cfg, "p-1", cfg.bucket_year(1925, None), &resolver);
        assert_eq!(cfg.bucket_year(1925, None), Some(1936));
        assert!(
            bucketed
                .resource(&age_obs)
                .unwrap()
                .get("valueQuantity")
                .is_none()
        );
        assert!(
            bucketed
                .resource(&months)
                .unwrap()
                .get("valueQuantity")
                .is_none()
        );
        let r = bucketed.resource(&ranged).unwrap();
        assert!(
            r.get("recordedDate").is_none() && r.get("onsetRange").is_none(),
            "{r}"
        );
        let r = bucketed.resource(&onset_age).unwrap();
        assert!(r.get("onsetAge").is_none());
        assert_eq!(r["recordedDate"], "1980");
        let b = bucketed.resource(&born).unwrap();
        assert!(b.get("valueDateTime").is_none(), "{b}");
        assert_eq!(b["effectivePeriod"], json!({"end": "1990"}));
        let text = serde_json::to_string(&b).unwrap();
        assert!(!text.contains("1925"), "{text}");
    }

    #[test]
    fn scrub_removes_strings_containing_identifiers() {
        let v = json!({"resourceType": "X", "a": "hello BOSTON", "b": ["ok", "boston!"], "c": {"d": "Boston"}});
        let out = scrub(&v, &["boston".to_string()]).unwrap();
        assert_eq!(out, json!({"resourceType": "X", "b": ["ok"]}));
    }
}
