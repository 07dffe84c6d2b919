//! Which clinical codes are sensitive: the one classifier of mental health, substance
//! use, sexual health and genomics codes, for the importers (which move a resource into
//! its sensitive category) and for the cohort engine (which hides a sensitive code from a
//! count unless the patient's consent permits its category).
//!
//! * [`SENSITIVE_CODES`]: SNOMED CT and LOINC codes, each with its category;
//! * [`icd10_category`]: ICD-10 codes, by range;
//! * [`sensitive_category`]: a code of the index (`snomed`, `loinc`, `rxnorm`, `icd10`);
//! * [`sensitive_category_of`]: a FHIR coding (system URL and code);
//! * [`SensitiveCodes`]: the same through a concept hierarchy, so that a descendant of a
//!   sensitive code (e.g. a subtype of HIV disease) is sensitive too.
//!
//! ```
//! use model::sensitive::{SensitiveCodes, sensitive_category, sensitive_category_of};
//! use model::{Category, CodeSystem, ConceptHierarchy};
//!
//! assert_eq!(sensitive_category(CodeSystem::Snomed, "86406008"), Some(Category::SexualHealth));
//! assert_eq!(sensitive_category(CodeSystem::Icd10, "F32.9"), Some(Category::MentalHealth));
//! assert_eq!(sensitive_category_of("http://snomed.info/sct", "44054006"), None);
//!
//! // A subtype the table does not list is sensitive through its ancestor.
//! let hiv = "snomed:86406008".parse().unwrap();
//! let subtype = "snomed:111880001".parse().unwrap();
//! let codes = SensitiveCodes::new(&ConceptHierarchy::from_pairs([(hiv, subtype)]));
//! let subtype = "snomed:111880001".parse().unwrap();
//! assert_eq!(codes.categories(&subtype), vec![Category::SexualHealth]);
//! ```

use std::collections::{BTreeSet, HashMap};

use crate::category::Category;
use crate::definition::{Code, CodeSystem};
use crate::hierarchy::ConceptHierarchy;

use Category::{Genomics as GEN, MentalHealth as MH, SexualHealth as SEX, SubstanceUse as SUB};
use CodeSystem::{Loinc as L, Snomed as S};

/// The categories a code can be sensitive in, in [`Category::ALL`] order.
pub const SENSITIVE_CATEGORIES: [Category; 4] = [MH, SUB, SEX, GEN];

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

/// The code system of a FHIR system URL (or OID), among those the classifier knows.
pub fn code_system_of_url(url: &str) -> Option<CodeSystem> {
    match url {
        "http://snomed.info/sct" | "urn:oid:2.16.840.1.113883.6.96" => Some(CodeSystem::Snomed),
        "http://loinc.org" | "urn:oid:2.16.840.1.113883.6.1" => Some(CodeSystem::Loinc),
        "http://www.nlm.nih.gov/research/umls/rxnorm" | "urn:oid:2.16.840.1.113883.6.88" => {
            Some(CodeSystem::Rxnorm)
        }
        "urn:oid:2.16.840.1.113883.6.90" | "urn:oid:2.16.840.1.113883.6.3" => {
            Some(CodeSystem::Icd10)
        }
        u if u.starts_with("http://hl7.org/fhir/sid/icd-10") => Some(CodeSystem::Icd10),
        _ => None,
    }
}

/// The sensitive category of a code in one of the index's code systems, if any.
pub fn sensitive_category(system: CodeSystem, code: &str) -> Option<Category> {
    if system == CodeSystem::Icd10 {
        return icd10_category(code);
    }
    SENSITIVE_CODES
        .iter()
        .find(|(s, c, _)| *s == system && *c == code)
        .map(|(_, _, category)| *category)
}

/// The sensitive category of one FHIR coding (system URL and code), if any.
pub fn sensitive_category_of(system_url: &str, code: &str) -> Option<Category> {
    sensitive_category(code_system_of_url(system_url)?, code)
}

/// The classifier through a concept hierarchy: a code is sensitive in its own category
/// and in the category of every sensitive ancestor, so that a descendant the tables do not
/// list (a subtype of HIV disease, an "alcoholic" variant of a disorder) cannot be counted
/// around its ancestor's category. A relation can only add sensitivity, never remove it.
#[derive(Debug, Clone, Default)]
pub struct SensitiveCodes {
    /// Categories codes inherit from their sensitive ancestors.
    inherited: HashMap<Code, BTreeSet<Category>>,
}

impl SensitiveCodes {
    /// The classifier over `hierarchy`'s relations.
    pub fn new(hierarchy: &ConceptHierarchy) -> SensitiveCodes {
        let ancestors: BTreeSet<&Code> = hierarchy.pairs().map(|(a, _)| a).collect();
        let mut inherited: HashMap<Code, BTreeSet<Category>> = HashMap::new();
        for ancestor in ancestors {
            let Some(category) = sensitive_category(ancestor.system, &ancestor.code) else {
                continue;
            };
            for d in hierarchy.descendants(ancestor) {
                inherited.entry(d).or_default().insert(category);
            }
        }
        SensitiveCodes { inherited }
    }

    /// Every sensitive category of `code` (its own and its ancestors'), in
    /// [`Category::ALL`] order; empty for a code that is not sensitive.
    pub fn categories(&self, code: &Code) -> Vec<Category> {
        let mut out: BTreeSet<Category> = self.inherited.get(code).cloned().unwrap_or_default();
        out.extend(sensitive_category(code.system, &code.code));
        out.into_iter().collect()
    }

    /// Whether `code` is sensitive in any category.
    pub fn is_sensitive(&self, code: &Code) -> bool {
        !self.categories(code).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(s: &str) -> Code {
        s.parse().unwrap()
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
    fn index_codes_and_fhir_codings_agree() {
        for (system, c, category) in SENSITIVE_CODES {
            assert_eq!(
                sensitive_category(*system, c),
                Some(*category),
                "{system}:{c}"
            );
            assert!(category.is_sensitive());
        }
        assert_eq!(
            sensitive_category_of("http://snomed.info/sct", "86406008"),
            Some(Category::SexualHealth)
        );
        assert_eq!(
            sensitive_category_of("urn:oid:2.16.840.1.113883.6.96", "7200002"),
            Some(Category::SubstanceUse)
        );
        assert_eq!(
            sensitive_category_of("http://hl7.org/fhir/sid/icd-10-cm", "B20"),
            Some(Category::SexualHealth)
        );
        // A code under another system is not the same code.
        assert_eq!(sensitive_category_of("http://loinc.org", "86406008"), None);
        assert_eq!(sensitive_category(CodeSystem::Loinc, "86406008"), None);
        assert_eq!(
            sensitive_category_of("http://example.org", "86406008"),
            None
        );
        assert_eq!(sensitive_category(CodeSystem::Snomed, "44054006"), None);
    }

    #[test]
    fn descendants_inherit_every_sensitive_ancestor() {
        let hierarchy = ConceptHierarchy::from_pairs([
            // HIV disease → a subtype → its subtype.
            (code("snomed:86406008"), code("snomed:1")),
            (code("snomed:1"), code("snomed:2")),
            // Alcoholism → a disorder that is also a descendant of HIV disease.
            (code("snomed:7200002"), code("snomed:2")),
            // A non-sensitive parent of HIV disease passes nothing down to its siblings.
            (code("snomed:40733004"), code("snomed:86406008")),
            (code("snomed:40733004"), code("snomed:3")),
            // ICD-10 by range: F32 and below.
            (code("icd10:F32"), code("icd10:X99")),
        ]);
        let s = SensitiveCodes::new(&hierarchy);
        assert_eq!(
            s.categories(&code("snomed:1")),
            vec![Category::SexualHealth]
        );
        assert_eq!(
            s.categories(&code("snomed:2")),
            vec![Category::SubstanceUse, Category::SexualHealth]
        );
        assert_eq!(
            s.categories(&code("snomed:86406008")),
            vec![Category::SexualHealth]
        );
        assert!(!s.is_sensitive(&code("snomed:3")));
        assert!(!s.is_sensitive(&code("snomed:40733004")));
        assert_eq!(
            s.categories(&code("icd10:X99")),
            vec![Category::MentalHealth]
        );
        // Without relations only the tables count.
        let bare = SensitiveCodes::default();
        assert!(!bare.is_sensitive(&code("snomed:1")));
        assert!(bare.is_sensitive(&code("icd10:F32.9")));
    }
}
