//! Small helpers over FHIR JSON (`serde_json::Value`): references, codings, dates.

use serde_json::Value;

/// A parsed FHIR reference string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RefTarget<'a> {
    /// `urn:uuid:<id>` (the type is whatever resource carries that id).
    Uuid(&'a str),
    /// `Type/id`, `http://server/fhir/Type/id`, optionally with `/_history/n`.
    Typed(&'a str, &'a str),
    /// A conditional reference such as `Practitioner?identifier=…`: the type only.
    TypeOnly(&'a str),
    /// `#contained`, or anything else that cannot be resolved.
    Other,
}

/// Parses a reference string.
pub(crate) fn parse_reference(reference: &str) -> RefTarget<'_> {
    let reference = reference.trim();
    if let Some(id) = reference
        .strip_prefix("urn:uuid:")
        .or_else(|| reference.strip_prefix("urn:oid:"))
    {
        return if id.is_empty() {
            RefTarget::Other
        } else {
            RefTarget::Uuid(id)
        };
    }
    if reference.starts_with('#') || reference.is_empty() {
        return RefTarget::Other;
    }
    if let Some((ty, _query)) = reference.split_once('?') {
        let ty = ty.rsplit('/').next().unwrap_or(ty);
        return if is_resource_type(ty) {
            RefTarget::TypeOnly(ty)
        } else {
            RefTarget::Other
        };
    }
    let mut segments: Vec<&str> = reference.split('/').filter(|s| !s.is_empty()).collect();
    if segments.len() >= 4 && segments[segments.len() - 2] == "_history" {
        segments.truncate(segments.len() - 2);
    }
    match segments.as_slice() {
        [.., ty, id] if is_resource_type(ty) => RefTarget::Typed(ty, id),
        _ => RefTarget::Other,
    }
}

/// Whether `s` looks like a FHIR resource type name (`Patient`, `Observation`, …).
pub(crate) fn is_resource_type(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_alphanumeric())
}

/// `resource.resourceType`, if it is a string.
pub(crate) fn resource_type(resource: &Value) -> Option<&str> {
    resource.get("resourceType").and_then(Value::as_str)
}

/// `resource.id`, if it is a string.
pub(crate) fn resource_id(resource: &Value) -> Option<&str> {
    resource.get("id").and_then(Value::as_str)
}

/// The reference string of the resource's patient: `subject`, else `patient`.
pub(crate) fn patient_reference(resource: &Value) -> Option<&str> {
    ["subject", "patient"]
        .iter()
        .find_map(|k| resource.get(*k))
        .and_then(|r| r.get("reference"))
        .and_then(Value::as_str)
}

/// The patient id a reference string points to, when it names a Patient (or is a
/// `urn:uuid:` whose target is not known yet).
pub(crate) fn patient_id_of_reference(reference: &str) -> Option<&str> {
    match parse_reference(reference) {
        RefTarget::Uuid(id) => Some(id),
        RefTarget::Typed("Patient", id) => Some(id),
        _ => None,
    }
}

/// One coding: `(system, code, display)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coding<'a> {
    pub system: &'a str,
    pub code: &'a str,
}

/// The codings of a CodeableConcept (those with a string code).
pub(crate) fn codings(concept: Option<&Value>) -> impl Iterator<Item = Coding<'_>> {
    concept
        .and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let code = c.get("code").and_then(Value::as_str)?;
            let system = c.get("system").and_then(Value::as_str).unwrap_or("");
            Some(Coding { system, code })
        })
}

/// The first coding of a CodeableConcept that has a code.
pub(crate) fn first_coding(concept: Option<&Value>) -> Option<Coding<'_>> {
    codings(concept).next()
}

/// Whether `s` is a FHIR `date`, `dateTime` or `instant`: `YYYY`, `YYYY-MM`, `YYYY-MM-DD`
/// or `YYYY-MM-DDThh:mm(:ss(.s+)?)?(Z|±hh:mm)?` with plausible field ranges.
pub(crate) fn is_fhir_date(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r.clone())
            .is_some_and(|x| x.iter().all(u8::is_ascii_digit))
    };
    let num = |r: std::ops::Range<usize>| -> u32 {
        b[r].iter()
            .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'))
    };
    if !digits(0..4) {
        return false;
    }
    if b.len() == 4 {
        return true;
    }
    if b.get(4) != Some(&b'-') || !digits(5..7) || !(1..=12).contains(&num(5..7)) {
        return false;
    }
    if b.len() == 7 {
        return true;
    }
    if b.get(7) != Some(&b'-') || !digits(8..10) || !(1..=31).contains(&num(8..10)) {
        return false;
    }
    if b.len() == 10 {
        return true;
    }
    if b.get(10) != Some(&b'T') || !digits(11..13) || b.get(13) != Some(&b':') || !digits(14..16) {
        return false;
    }
    if num(11..13) > 24 || num(14..16) > 59 {
        return false;
    }
    let mut i = 16;
    if b.get(i) == Some(&b':') {
        if !digits(i + 1..i + 3) || num(i + 1..i + 3) > 60 {
            return false;
        }
        i += 3;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return false;
            }
        }
    }
    match b.get(i) {
        None => true,
        Some(b'Z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            i + 6 == b.len() && digits(i + 1..i + 3) && b[i + 3] == b':' && digits(i + 4..i + 6)
        }
        _ => false,
    }
}

/// Whether `s` looks like a date with at least a month (`YYYY-MM…`): the shape that the
/// de-identification reduces to a year. Stricter than "four digits and a dash" so that
/// LOINC codes such as `2093-3` are never mistaken for dates.
pub(crate) fn looks_like_month_date(s: &str) -> bool {
    s.len() >= 7 && is_fhir_date(s)
}

/// A FHIR date/dateTime as an index date `YYYY-MM-DD` (partial dates padded with `01`).
pub(crate) fn index_date(s: &str) -> Option<String> {
    if !is_fhir_date(s) {
        return None;
    }
    let date = match s.len() {
        4 => format!("{s}-01-01"),
        7 => format!("{s}-01"),
        _ => s[..10].to_string(),
    };
    // A calendar date only (not 2019-02-30, not year 0): the cohort engine holds no other.
    date.parse::<model::Date>().is_ok().then_some(date)
}

/// The year of a FHIR date/dateTime.
pub(crate) fn year_of(s: &str) -> Option<i32> {
    if is_fhir_date(s) {
        s[..4].parse().ok()
    } else {
        None
    }
}

/// Truncates an error-message fragment taken from input (ids, type names).
pub(crate) fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(parse_reference("urn:uuid:abc"), RefTarget::Uuid("abc"));
        assert_eq!(
            parse_reference("Patient/p1"),
            RefTarget::Typed("Patient", "p1")
        );
        assert_eq!(
            parse_reference("https://x.org/fhir/Condition/c1/_history/2"),
            RefTarget::Typed("Condition", "c1")
        );
        assert_eq!(
            parse_reference("Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|99"),
            RefTarget::TypeOnly("Practitioner")
        );
        assert_eq!(parse_reference("#referral"), RefTarget::Other);
        assert_eq!(parse_reference("nonsense"), RefTarget::Other);
    }

    #[test]
    fn dates() {
        for ok in [
            "2020",
            "2020-02",
            "2020-02-29",
            "2003-03-03T13:55:10-05:00",
            "2003-03-03T13:55:10.933-05:00",
            "2003-03-03T13:55:10Z",
            "2003-03-03T13:55",
        ] {
            assert!(is_fhir_date(ok), "{ok}");
        }
        for bad in [
            "",
            "20",
            "2093-3",
            "2020-13",
            "2020-01-32",
            "yesterday",
            "2020-01-01T",
            "2020-01-01T10:00+5",
        ] {
            assert!(!is_fhir_date(bad), "{bad}");
        }
        assert!(!looks_like_month_date("2020"));
        assert!(!looks_like_month_date("2093-3"));
        assert_eq!(index_date("1999").as_deref(), Some("1999-01-01"));
        assert_eq!(
            index_date("2003-03-03T13:55:10-05:00").as_deref(),
            Some("2003-03-03")
        );
        // Shaped like a date, but not one: the row is left out of the index.
        assert_eq!(index_date("2019-02-30"), None);
        assert_eq!(index_date("0000-01-01"), None);
        assert_eq!(index_date("2020-02-29").as_deref(), Some("2020-02-29"));
        assert_eq!(year_of("1986-01-13"), Some(1986));
    }
}
