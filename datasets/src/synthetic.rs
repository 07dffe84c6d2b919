//! Seeded synthetic population, generated patient by patient.
//!
//! Patient `i` of a population is computed from its own RNG (ChaCha8, seeded with
//! BLAKE3 of the population seed and `i`), so any patient can be generated alone, in any
//! order or in parallel, and a population of a million patients never has to be held in
//! memory. The same seed always gives the same bytes.
//!
//! Each patient is first written as the custodian would hold it, a FHIR R4 Bundle
//! ([`Population::bundle`]) with a synthetic name, address, phone, e-mail, MRN, SSN,
//! driver's licence and passport number, then run through the same pipeline as imported
//! FHIR ([`PatientRecord::from_fhir`]): categorization, de-identification, index
//! extraction.
//!
//! Distributions are rough but plausible for the US:
//!
//! * age from the US age pyramid (0–100, about 1% over 89 at the reference year), sex 50/50;
//! * chronic conditions with age-dependent prevalences and the usual correlations
//!   (obesity raises diabetes and hypertension; diabetes and hypertension raise kidney and
//!   heart disease): hypertension, type 2 diabetes, prediabetes, hyperlipidemia, asthma,
//!   COPD, coronary heart disease, chronic kidney disease (stage 1 or 3), obesity,
//!   depression and anxiety (mental health), osteoarthritis, atrial fibrillation,
//!   alcoholism (substance use), HIV (sexual health), plus a few acute infections;
//! * yearly wellness visits over the three years before the reference year, with vital
//!   signs, blood pressure, labs for adults (HbA1c, glucose, lipids, creatinine, eGFR, with
//!   values that follow the patient's conditions and treatment), PHQ-2, AUDIT-C, GAD-7 and
//!   smoking status, immunizations; follow-up visits for chronic conditions;
//! * medications by condition (metformin, lisinopril, atorvastatin, albuterol, sertraline,
//!   aspirin, warfarin, naproxen), allergies, blood type, a few procedures and implants.

use std::cell::RefCell;
use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{Map, Value, json};

use crate::deidentify::DeidConfig;
use crate::record::PatientRecord;
use crate::resolve::Resolver;
use model::PatientIndex;

/// A seeded synthetic population of `size` patients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Population {
    seed: u64,
    size: usize,
    config: DeidConfig,
    life_events: bool,
}

impl Population {
    /// The reference year of [`Population::new`]: fixed, so that a seed always gives the
    /// same population.
    pub const REFERENCE_YEAR: i32 = 2026;

    /// A population de-identified with [`Population::REFERENCE_YEAR`].
    pub fn new(seed: u64, size: usize) -> Self {
        Self::with_config(seed, size, DeidConfig::new(Self::REFERENCE_YEAR))
    }

    /// A population whose records are de-identified with `config`; its reference year is
    /// also the year the simulation ends before (events fall in the three years before it).
    pub fn with_config(seed: u64, size: usize, config: DeidConfig) -> Self {
        Population {
            seed,
            size,
            config,
            life_events: false,
        }
    }

    /// The same population, with what tests the de-identification of dates and ages: about
    /// a third of the patients aged 80 or more die, on the day of their last visit, of a
    /// condition recorded that day (`deceasedDateTime`); every patient's last visit records
    /// an `Age` observation (LOINC 30525-0, in months under two); patients aged 85 or more
    /// carry a cataract with `onsetAge`, and those aged 90 or more an osteoarthritis with an
    /// `onsetRange`. Drawn from a random stream of their own: every other resource stays
    /// as [`Population::with_config`] makes it.
    pub fn with_life_events(mut self) -> Self {
        self.life_events = true;
        self
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The number of patients.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether the population has no patients.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The de-identification configuration.
    pub fn config(&self) -> &DeidConfig {
        &self.config
    }

    /// The custodian-side id of patient `i` (`synth-000042`).
    pub fn source_id(i: usize) -> String {
        format!("synth-{i:06}")
    }

    /// Patient `i`, as the custodian's FHIR R4 transaction Bundle (not de-identified).
    /// Indices at or beyond [`len`](Self::len) are generated the same way: a population
    /// is a prefix of an endless sequence.
    pub fn bundle(&self, i: usize) -> Value {
        let (patient, resources) = self.resources(i);
        let entry: Vec<Value> = std::iter::once(patient)
            .chain(resources)
            .map(|r| {
                let ty = r
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let id = r
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let entry = with(
                    json!({"request": {"method": "POST", "url": ty}}),
                    vec![("resource", r)],
                );
                if ty == "Patient" {
                    entry
                } else {
                    with(
                        entry,
                        vec![("fullUrl", Value::from(format!("urn:uuid:{id}")))],
                    )
                }
            })
            .collect();
        with(
            json!({"resourceType": "Bundle", "type": "transaction"}),
            vec![("entry", Value::Array(entry))],
        )
    }

    /// Patient `i`, categorized, de-identified and indexed.
    pub fn patient(&self, i: usize) -> PatientRecord {
        let (patient, resources) = self.resources(i);
        PatientRecord::from_fhir(&patient, &resources, &self.config)
    }

    /// Only the index rows of patient `i`: the same as `self.patient(i).index`, without the
    /// cost of de-identifying and serializing the research copy (for cohort benchmarks and
    /// distribution checks over large populations).
    pub fn index(&self, i: usize) -> PatientIndex {
        let (patient, resources) = self.resources(i);
        let resolver = Resolver::new(&patient, &resources, None);
        crate::index::extract(&patient, &resources, &resolver, &self.config)
    }

    /// Every patient, in order, generated lazily.
    pub fn iter(&self) -> impl Iterator<Item = PatientRecord> + '_ {
        (0..self.size).map(move |i| self.patient(i))
    }

    /// Every patient, generated in parallel (rayon); `collect` keeps the order.
    pub fn par_iter(&self) -> impl IndexedParallelIterator<Item = PatientRecord> + '_ {
        (0..self.size).into_par_iter().map(move |i| self.patient(i))
    }

    fn rng(&self, i: usize) -> ChaCha8Rng {
        let mut h = blake3::Hasher::new_derive_key("datasets synthetic patient v1");
        h.update(&self.seed.to_le_bytes());
        h.update(&(i as u64).to_le_bytes());
        ChaCha8Rng::from_seed(*h.finalize().as_bytes())
    }

    /// The Patient resource and the patient's other resources.
    fn resources(&self, i: usize) -> (Value, Vec<Value>) {
        let mut g = Gen::new(self.rng(i), i, self.config.reference_year);
        g.run();
        if self.life_events {
            let mut h = blake3::Hasher::new_derive_key("datasets synthetic life events v1");
            h.update(&self.seed.to_le_bytes());
            h.update(&(i as u64).to_le_bytes());
            g.rng = ChaCha8Rng::from_seed(*h.finalize().as_bytes());
            g.life_events();
        }
        (g.patient, g.out)
    }
}

// ---------------------------------------------------------------------------------------
// Code systems and codes.

const SNOMED: &str = "http://snomed.info/sct";
const LOINC: &str = "http://loinc.org";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const CVX: &str = "http://hl7.org/fhir/sid/cvx";
const UCUM: &str = "http://unitsofmeasure.org";

/// `base` (an object) with the members `extra` added. Used instead of putting `Value`s
/// inside `json!`, which would serialize them again.
fn with(mut base: Value, extra: Vec<(&str, Value)>) -> Value {
    if let Value::Object(map) = &mut base {
        for (k, v) in extra {
            map.insert(k.to_string(), v);
        }
    }
    base
}

/// The coded elements of a confirmed Condition: clinical status, category and code.
fn condition_codes(
    (clinical, clinical_display): (&'static str, &'static str),
    (category, category_display): (&'static str, &'static str),
    code: &'static str,
    display: &'static str,
) -> Vec<(&'static str, Value)> {
    vec![
        (
            "clinicalStatus",
            concept(
                "http://terminology.hl7.org/CodeSystem/condition-clinical",
                clinical,
                clinical_display,
            ),
        ),
        (
            "verificationStatus",
            concept(
                "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "confirmed",
                "Confirmed",
            ),
        ),
        (
            "category",
            Value::Array(vec![concept(
                "http://terminology.hl7.org/CodeSystem/condition-category",
                category,
                category_display,
            )]),
        ),
        ("code", concept(SNOMED, code, display)),
    ]
}

fn concept(system: &'static str, code: &'static str, display: &'static str) -> Value {
    thread_local! {
        /// Built concepts, cloned on reuse (cloning a `Value` is cheaper than building it).
        static CONCEPTS: RefCell<HashMap<(&'static str, &'static str), Value>> = RefCell::new(HashMap::new());
    }
    CONCEPTS.with(|cache| {
        cache
            .borrow_mut()
            .entry((system, code))
            .or_insert_with(|| {
                let mut coding = Map::new();
                coding.insert("system".into(), Value::from(system));
                coding.insert("code".into(), Value::from(code));
                coding.insert("display".into(), Value::from(display));
                let mut cc = Map::new();
                cc.insert("coding".into(), Value::Array(vec![Value::Object(coding)]));
                cc.insert("text".into(), Value::from(display));
                Value::Object(cc)
            })
            .clone()
    })
}

/// A chronic condition the generator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cond {
    Hypertension,
    Diabetes,
    Prediabetes,
    Hyperlipidemia,
    Asthma,
    Copd,
    CoronaryHeartDisease,
    Ckd1,
    Ckd3,
    Obesity,
    Depression,
    Anxiety,
    Osteoarthritis,
    AtrialFibrillation,
    Alcoholism,
    Hiv,
}

impl Cond {
    fn code(self) -> (&'static str, &'static str) {
        match self {
            Cond::Hypertension => ("38341003", "Hypertension (disorder)"),
            Cond::Diabetes => ("44054006", "Diabetes mellitus type 2 (disorder)"),
            Cond::Prediabetes => ("15777000", "Prediabetes (finding)"),
            Cond::Hyperlipidemia => ("55822004", "Hyperlipidemia (disorder)"),
            Cond::Asthma => ("195967001", "Asthma (disorder)"),
            Cond::Copd => (
                "13645005",
                "Chronic obstructive pulmonary disease (disorder)",
            ),
            Cond::CoronaryHeartDisease => ("53741008", "Coronary arteriosclerosis (disorder)"),
            Cond::Ckd1 => ("431855005", "Chronic kidney disease stage 1 (disorder)"),
            Cond::Ckd3 => ("433144002", "Chronic kidney disease stage 3 (disorder)"),
            Cond::Obesity => ("162864005", "Body mass index 30+ - obesity (finding)"),
            Cond::Depression => ("35489007", "Depressive disorder (disorder)"),
            Cond::Anxiety => ("197480006", "Anxiety disorder (disorder)"),
            Cond::Osteoarthritis => ("239873007", "Osteoarthritis of knee (disorder)"),
            Cond::AtrialFibrillation => ("49436004", "Atrial fibrillation (disorder)"),
            Cond::Alcoholism => ("7200002", "Alcoholism (disorder)"),
            Cond::Hiv => (
                "86406008",
                "Human immunodeficiency virus infection (disorder)",
            ),
        }
    }

    /// The first-line drug, as an RxNorm code.
    fn drug(self) -> Option<(&'static str, &'static str)> {
        Some(match self {
            Cond::Hypertension => ("314076", "lisinopril 10 MG Oral Tablet"),
            Cond::Diabetes => (
                "860975",
                "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
            ),
            Cond::Hyperlipidemia => ("617312", "atorvastatin 10 MG Oral Tablet"),
            Cond::Asthma | Cond::Copd => (
                "745679",
                "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
            ),
            Cond::Depression | Cond::Anxiety => ("312940", "sertraline 50 MG Oral Tablet"),
            Cond::CoronaryHeartDisease => ("243670", "aspirin 81 MG Oral Tablet"),
            Cond::AtrialFibrillation => ("855332", "warfarin sodium 5 MG Oral Tablet"),
            Cond::Osteoarthritis => ("849574", "Naproxen sodium 220 MG Oral Tablet"),
            _ => return None,
        })
    }

    /// Youngest age of onset.
    fn min_onset_age(self) -> u32 {
        match self {
            Cond::Asthma | Cond::Obesity => 2,
            Cond::Depression | Cond::Anxiety => 8,
            Cond::Hiv => 0,
            Cond::Copd | Cond::CoronaryHeartDisease => 35,
            Cond::Osteoarthritis | Cond::AtrialFibrillation => 30,
            _ => 12,
        }
    }
}

const ACUTE: &[(&str, &str)] = &[
    ("444814009", "Viral sinusitis (disorder)"),
    ("10509002", "Acute bronchitis (disorder)"),
    ("195662009", "Acute viral pharyngitis (disorder)"),
];

/// US age pyramid (5-year bands, % of population), ages 0–100.
const AGE_PYRAMID: &[(u32, u32, f64)] = &[
    (0, 4, 5.7),
    (5, 9, 6.0),
    (10, 14, 6.4),
    (15, 19, 6.5),
    (20, 24, 6.6),
    (25, 29, 6.9),
    (30, 34, 6.8),
    (35, 39, 6.6),
    (40, 44, 6.3),
    (45, 49, 6.1),
    (50, 54, 6.3),
    (55, 59, 6.5),
    (60, 64, 6.3),
    (65, 69, 5.5),
    (70, 74, 4.4),
    (75, 79, 3.0),
    (80, 84, 1.9),
    (85, 89, 1.2),
    (90, 94, 0.6),
    (95, 100, 0.2),
];

const GIVEN_FEMALE: &[&str] = &[
    "Amara",
    "Beatriz",
    "Chiara",
    "Dagny",
    "Esperanza",
    "Fiona",
    "Grainne",
    "Hana",
    "Ingrid",
    "Jolene",
    "Keiko",
    "Lucinda",
    "Marisol",
    "Nkechi",
    "Ottilie",
    "Priya",
    "Rosalind",
    "Saoirse",
    "Thandiwe",
    "Ulrike",
];
const GIVEN_MALE: &[&str] = &[
    "Anselm",
    "Bartholomew",
    "Cosimo",
    "Dmitri",
    "Emeka",
    "Florian",
    "Gideon",
    "Hamish",
    "Ignatius",
    "Jovan",
    "Kwabena",
    "Leopold",
    "Matthias",
    "Nikolai",
    "Osvaldo",
    "Percival",
    "Rafferty",
    "Soren",
    "Tobias",
    "Ulysses",
];
const FAMILY: &[&str] = &[
    "Okafor",
    "Lindqvist",
    "Marchetti",
    "Nakamura",
    "Abernathy",
    "Villanueva",
    "Kowalczyk",
    "Oyelaran",
    "Fitzgerald",
    "Haugland",
    "Delacroix",
    "Szabo",
    "Quintero",
    "Ramaswamy",
    "Thorvaldsen",
    "Achterberg",
    "Bellweather",
    "Castellanos",
    "Dunleavy",
    "Esterhazy",
    "Featherstone",
    "Grimaldi",
    "Hollingsworth",
    "Ivanova",
];
const STREETS: &[&str] = &[
    "Juniper",
    "Larkspur",
    "Quarry",
    "Harborview",
    "Tamarack",
    "Wintergreen",
    "Cobblestone",
    "Foxglove",
    "Millbrook",
    "Briarcliff",
    "Kettle Pond",
    "Old Orchard",
    "Sassafras",
    "Beacon Hill",
    "Cranberry",
];
const STREET_KINDS: &[&str] = &[
    "Street", "Road", "Lane", "Avenue", "Way", "Court", "Terrace",
];
const CITIES: &[(&str, &str)] = &[
    ("Worcester", "01601"),
    ("Springfield", "01103"),
    ("Lowell", "01852"),
    ("Cambridge", "02139"),
    ("Brockton", "02301"),
    ("Quincy", "02169"),
    ("New Bedford", "02740"),
    ("Fall River", "02720"),
    ("Somerville", "02143"),
    ("Framingham", "01701"),
    ("Haverhill", "01830"),
    ("Waltham", "02451"),
    ("Pittsfield", "01201"),
    ("Leominster", "01453"),
    ("Northampton", "01060"),
    ("Barnstable", "02630"),
];

/// Race (OMB category) with its share.
const RACES: &[(&str, &str, f64)] = &[
    ("2106-3", "White", 0.62),
    ("2054-5", "Black or African American", 0.13),
    ("2028-9", "Asian", 0.06),
    ("1002-5", "American Indian or Alaska Native", 0.01),
    ("2076-8", "Native Hawaiian or Other Pacific Islander", 0.005),
    ("2131-1", "Other Race", 0.175),
];

// ---------------------------------------------------------------------------------------
// Dates. Days are kept in 1..=28 so every (year, month, day) is a real date.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Date {
    y: i32,
    m: u32,
    d: u32,
}

impl Date {
    fn ordinal(self) -> i64 {
        i64::from(self.y) * 336 + i64::from(self.m - 1) * 28 + i64::from(self.d - 1)
    }

    fn from_ordinal(o: i64) -> Date {
        let y = o.div_euclid(336);
        let r = o.rem_euclid(336);
        Date {
            y: y as i32,
            m: (r / 28) as u32 + 1,
            d: (r % 28) as u32 + 1,
        }
    }

    fn date(self) -> String {
        format!("{:04}-{:02}-{:02}", self.y, self.m, self.d)
    }

    fn at(self, minute_of_day: u32) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:00-05:00",
            self.y,
            self.m,
            self.d,
            (minute_of_day / 60) % 24,
            minute_of_day % 60
        )
    }
}

// ---------------------------------------------------------------------------------------
// The generator of one patient.

struct Gen {
    rng: ChaCha8Rng,
    index: usize,
    uuid_prefix: u64,
    counter: u64,
    /// First day after the simulation (1 January of the reference year).
    end: Date,
    birth: Date,
    age: u32,
    female: bool,
    patient_ref: String,
    full_name: String,
    given: String,
    conditions: Vec<(Cond, Date, String)>,
    /// Current drugs (condition → true when treated).
    treated: Vec<Cond>,
    smoker: Smoking,
    patient: Value,
    out: Vec<Value>,
    /// The day and encounter id of the latest visit.
    last_visit: Option<(Date, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Smoking {
    Never,
    Former,
    Current,
}

fn normal(rng: &mut ChaCha8Rng, mean: f64, sd: f64) -> f64 {
    // Box–Muller.
    let u1: f64 = rng.r#gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.r#gen::<f64>();
    mean + sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

impl Gen {
    fn new(mut rng: ChaCha8Rng, index: usize, reference_year: i32) -> Gen {
        let uuid_prefix = rng.r#gen::<u64>();
        Gen {
            rng,
            index,
            uuid_prefix,
            counter: 0,
            end: Date {
                y: reference_year,
                m: 1,
                d: 1,
            },
            birth: Date { y: 0, m: 1, d: 1 },
            age: 0,
            female: false,
            patient_ref: format!("Patient/{}", Population::source_id(index)),
            full_name: String::new(),
            given: String::new(),
            conditions: Vec::new(),
            treated: Vec::new(),
            smoker: Smoking::Never,
            patient: Value::Null,
            out: Vec::new(),
            last_visit: None,
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.r#gen::<f64>() < p.clamp(0.0, 1.0)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.rng.gen_range(0..items.len())]
    }

    fn new_id(&mut self) -> String {
        self.counter += 1;
        let hi = self.uuid_prefix;
        let lo = self.counter;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            hi & 0xfff,
            (lo >> 48) & 0xfff,
            lo & 0xffff_ffff_ffff
        )
    }

    fn between(&mut self, from: Date, to_exclusive: Date) -> Date {
        let (a, b) = (from.ordinal(), to_exclusive.ordinal());
        if b <= a {
            return from;
        }
        Date::from_ordinal(self.rng.gen_range(a..b))
    }

    fn age_at(&self, d: Date) -> u32 {
        let mut years = d.y - self.birth.y;
        if (d.m, d.d) < (self.birth.m, self.birth.d) {
            years -= 1;
        }
        years.max(0) as u32
    }

    fn has(&self, c: Cond) -> bool {
        self.conditions.iter().any(|(k, _, _)| *k == c)
    }

    fn condition_id(&self, c: Cond) -> Option<String> {
        self.conditions
            .iter()
            .find(|(k, _, _)| *k == c)
            .map(|(_, _, id)| id.clone())
    }

    fn run(&mut self) {
        self.demographics();
        self.sample_conditions();
        self.allergies_and_blood_type();
        self.visits();
    }

    fn demographics(&mut self) {
        // Age at the end of the simulation (31 December of reference_year - 1).
        let total: f64 = AGE_PYRAMID.iter().map(|(_, _, w)| w).sum();
        let mut x = self.rng.r#gen::<f64>() * total;
        let mut age = 0;
        for &(lo, hi, w) in AGE_PYRAMID {
            if x < w {
                age = self.rng.gen_range(lo..=hi);
                break;
            }
            x -= w;
            age = hi;
        }
        self.age = age;
        self.birth = Date {
            y: self.end.y - 1 - age as i32,
            m: self.rng.gen_range(1..=12),
            d: self.rng.gen_range(1..=28),
        };
        self.female = self.rng.gen_bool(0.5);

        let i = self.index;
        let given = format!(
            "{}{}",
            if self.female {
                self.pick(GIVEN_FEMALE)
            } else {
                self.pick(GIVEN_MALE)
            },
            self.rng.gen_range(10..1000)
        );
        let middle = format!(
            "{}{}",
            if self.female {
                self.pick(GIVEN_FEMALE)
            } else {
                self.pick(GIVEN_MALE)
            },
            self.rng.gen_range(10..1000)
        );
        let family = format!("{}-{}{}", self.pick(FAMILY), self.pick(FAMILY), i);
        let street = format!(
            "{} {} {}",
            self.rng.gen_range(1..2000),
            self.pick(STREETS),
            self.pick(STREET_KINDS)
        );
        let (city, zip) = *self.pick(CITIES);
        let phone = format!(
            "555-{:03}-{:04}",
            self.rng.gen_range(200..1000),
            self.rng.gen_range(0..10000)
        );
        let email = format!(
            "{}.{}@example.com",
            given.to_lowercase(),
            family.to_lowercase()
        );
        let mrn = format!("MRN{:010}", self.rng.gen_range(0..10_000_000_000u64));
        let ssn = format!(
            "999-{:02}-{:04}",
            self.rng.gen_range(10..100),
            self.rng.gen_range(1000..10000)
        );
        let licence = format!("S{:08}", self.rng.gen_range(0..100_000_000));
        let passport = format!("X{:08}X", self.rng.gen_range(0..100_000_000));
        let mother = format!(
            "{}{} {}{}",
            self.pick(GIVEN_FEMALE),
            self.rng.gen_range(10..1000),
            self.pick(FAMILY),
            self.rng.gen_range(10..1000)
        );
        let (birth_city, _) = *self.pick(CITIES);
        self.full_name = format!("{given} {family}");
        self.given = given.clone();

        let x: f64 = self.rng.r#gen();
        let mut acc = 0.0;
        let mut race = RACES[0];
        for r in RACES {
            acc += r.2;
            if x < acc {
                race = *r;
                break;
            }
        }
        let hispanic = self.chance(0.19);
        let (eth_code, eth_display) = if hispanic {
            ("2135-2", "Hispanic or Latino")
        } else {
            ("2186-5", "Not Hispanic or Latino")
        };

        let mut identifiers = vec![
            json!({"type": concept("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical Record Number"),
                   "system": "http://hospital.example.org/mrn", "value": mrn}),
            json!({"type": concept("http://terminology.hl7.org/CodeSystem/v2-0203", "SS", "Social Security Number"),
                   "system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn}),
        ];
        if age >= 16 {
            identifiers.push(json!({"type": concept("http://terminology.hl7.org/CodeSystem/v2-0203", "DL", "Driver's license number"),
                   "system": "urn:oid:2.16.840.1.113883.4.3.25", "value": licence}));
        }
        if age >= 18 && self.chance(0.4) {
            identifiers.push(json!({"type": concept("http://terminology.hl7.org/CodeSystem/v2-0203", "PPN", "Passport Number"),
                   "system": "http://hl7.org/fhir/sid/passport-USA", "value": passport}));
        }
        let mut patient = json!({
            "resourceType": "Patient",
            "id": Population::source_id(i),
            "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
            "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{} {}</div>", given, family)},
            "extension": [
                {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": [
                    {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": race.0, "display": race.1}},
                    {"url": "text", "valueString": race.1}]},
                {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity", "extension": [
                    {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": eth_code, "display": eth_display}},
                    {"url": "text", "valueString": eth_display}]},
                {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": mother},
                {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": if self.female { "F" } else { "M" }},
                {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace", "valueAddress": {"city": birth_city, "state": "MA", "country": "US"}}
            ],
            "identifier": identifiers,
            "name": [{"use": "official", "family": family, "given": [given, middle]}],
            "telecom": [
                {"system": "phone", "value": phone, "use": "home"},
                {"system": "email", "value": email}
            ],
            "gender": if self.female { "female" } else { "male" },
            "birthDate": self.birth.date(),
            "address": [{"line": [street], "city": city, "state": "MA", "postalCode": zip, "country": "US"}],
            "communication": [{"language": concept("urn:ietf:bcp:47", "en-US", "English (United States)")}],
            "multipleBirthBoolean": false
        });
        if age >= 18 {
            let (code, display) = *self.pick(&[
                ("M", "Married"),
                ("S", "Never Married"),
                ("D", "Divorced"),
                ("W", "Widowed"),
            ]);
            patient["maritalStatus"] = concept(
                "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                code,
                display,
            );
        }
        self.patient = patient;
    }

    fn sample_conditions(&mut self) {
        let a = self.age;
        let f = self.female;
        let sex =
            |female_factor: f64, male_factor: f64| if f { female_factor } else { male_factor };
        // Smoking status first: it drives COPD.
        if a >= 16 {
            let x: f64 = self.rng.r#gen();
            let former = if a >= 50 { 0.30 } else { 0.15 };
            self.smoker = if x < 0.12 {
                Smoking::Current
            } else if x < 0.12 + former {
                Smoking::Former
            } else {
                Smoking::Never
            };
        }
        let band = |cuts: &[(u32, f64)]| {
            cuts.iter()
                .find(|(upto, _)| a < *upto)
                .map_or(0.0, |(_, p)| *p)
        };

        let obese = self.chance(band(&[
            (2, 0.0),
            (18, 0.18),
            (40, 0.40),
            (60, 0.44),
            (200, 0.40),
        ]));
        let ob = |yes: f64, no: f64| if obese { yes } else { no };
        let htn = self.chance(
            band(&[
                (12, 0.0),
                (18, 0.02),
                (40, 0.08),
                (60, 0.33),
                (75, 0.55),
                (200, 0.70),
            ]) * ob(1.35, 0.8),
        );
        let dm = self.chance(
            band(&[(10, 0.0), (18, 0.003), (45, 0.04), (65, 0.15), (200, 0.24)]) * ob(1.8, 0.5),
        );
        let prediabetes = !dm && self.chance(band(&[(18, 0.0), (200, 0.12)]) * ob(1.5, 0.8));
        let hld = self.chance(
            band(&[(20, 0.01), (40, 0.10), (60, 0.28), (200, 0.45)]) * if dm { 1.4 } else { 1.0 },
        );
        let asthma = self.chance(band(&[(2, 0.0), (200, 0.08)]));
        let smoke_factor = match self.smoker {
            Smoking::Never => 0.4,
            _ => 2.5,
        };
        let copd = self.chance(band(&[(40, 0.0), (65, 0.05), (200, 0.10)]) * smoke_factor);
        let chd_risk =
            if htn { 1.4 } else { 0.9 } * if dm { 1.5 } else { 1.0 } * if hld { 1.3 } else { 0.9 };
        let chd = self.chance(
            band(&[(40, 0.003), (65, 0.05), (75, 0.12), (200, 0.20)]) * chd_risk * sex(0.7, 1.3),
        );
        let ckd_risk = if dm { 2.0 } else { 1.0 } * if htn { 1.5 } else { 0.8 };
        let ckd = self.chance(band(&[(30, 0.005), (60, 0.05), (200, 0.15)]) * ckd_risk);
        let depression = self.chance(band(&[(12, 0.01), (18, 0.13), (200, 0.09)]) * sex(1.4, 0.65));
        let anxiety = self.chance(band(&[(12, 0.03), (200, 0.11)]) * sex(1.4, 0.65));
        let oa = self.chance(band(&[(40, 0.01), (65, 0.15), (200, 0.33)]));
        let afib = self.chance(band(&[(50, 0.002), (65, 0.01), (80, 0.06), (200, 0.12)]));
        let alcoholism = self.chance(band(&[(18, 0.0), (200, 0.03)]) * sex(0.5, 1.5));
        let hiv = self.chance(band(&[(18, 0.0005), (200, 0.004)]) * sex(0.5, 1.5));

        let chosen = [
            (obese, Cond::Obesity),
            (htn, Cond::Hypertension),
            (dm, Cond::Diabetes),
            (prediabetes, Cond::Prediabetes),
            (hld, Cond::Hyperlipidemia),
            (asthma, Cond::Asthma),
            (copd, Cond::Copd),
            (chd, Cond::CoronaryHeartDisease),
            (ckd && a >= 60 && self.rng.gen_bool(0.6), Cond::Ckd3),
            (depression, Cond::Depression),
            (anxiety, Cond::Anxiety),
            (oa, Cond::Osteoarthritis),
            (afib, Cond::AtrialFibrillation),
            (alcoholism, Cond::Alcoholism),
            (hiv, Cond::Hiv),
        ];
        let ckd3 = chosen[8].0;
        let mut list: Vec<Cond> = chosen
            .iter()
            .filter(|(yes, _)| *yes)
            .map(|(_, c)| *c)
            .collect();
        if ckd && !ckd3 {
            list.push(Cond::Ckd1);
        }
        for c in list {
            let lo = c.min_onset_age().min(a);
            let onset_age = self.rng.gen_range(lo..=a);
            let start = Date {
                y: self.birth.y + onset_age as i32,
                m: self.birth.m,
                d: self.birth.d,
            };
            let onset = self.between(
                start.max(self.birth),
                Date::from_ordinal(start.ordinal() + 336).min(self.end),
            );
            self.add_condition(c, onset);
        }
    }

    fn add_condition(&mut self, c: Cond, onset: Date) {
        let id = self.new_id();
        let (code, display) = c.code();
        let minute = self.rng.gen_range(480..1020);
        let mut cond = with(
            json!({
                "resourceType": "Condition",
                "id": id,
                "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition-problems-health-concerns"]},
                "subject": {"reference": self.patient_ref, "display": self.full_name},
                "onsetDateTime": onset.at(minute),
                "recordedDate": onset.at(minute)
            }),
            condition_codes(
                ("active", "Active"),
                ("problem-list-item", "Problem List Item"),
                code,
                display,
            ),
        );
        if self.chance(0.3) {
            // Free text that names the patient: the de-identification must drop it.
            cond["note"] = json!([{"text": format!("{} was counselled about {}.", self.given, display.to_lowercase())}]);
        }
        self.out.push(cond);
        self.conditions.push((c, onset, id.clone()));

        if let Some((rx, rx_display)) = c.drug()
            && self.chance(0.8)
        {
            let mid = self.new_id();
            self.out.push(with(json!({
                "resourceType": "MedicationRequest",
                "id": mid,
                "status": "active",
                "intent": "order",
                "subject": {"reference": self.patient_ref},
                "authoredOn": onset.at(minute + 20),
                "requester": {"display": "Dr. Hortensia Vandermeer"},
                "reasonReference": [{"reference": format!("urn:uuid:{id}"), "display": display}],
                "dosageInstruction": [{"text": "Take one tablet by mouth daily", "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}}]
            }), vec![("medicationCodeableConcept", concept(RXNORM, rx, rx_display))]));
            self.treated.push(c);
        }
        match c {
            Cond::CoronaryHeartDisease if self.chance(0.25) => {
                self.procedure(
                    "415070008",
                    "Percutaneous coronary intervention (procedure)",
                    onset,
                    Some(&id),
                );
                self.device(
                    "705643001",
                    "Coronary artery stent (physical object)",
                    onset,
                );
            }
            Cond::AtrialFibrillation if self.age >= 70 && self.chance(0.15) => {
                self.procedure(
                    "307280005",
                    "Implantation of cardiac pacemaker (procedure)",
                    onset,
                    Some(&id),
                );
                self.device(
                    "14106009",
                    "Cardiac pacemaker, device (physical object)",
                    onset,
                );
            }
            Cond::Alcoholism if self.chance(0.5) => {
                self.procedure(
                    "24165007",
                    "Alcoholism counseling (procedure)",
                    onset,
                    Some(&id),
                );
            }
            _ => {}
        }
    }

    fn procedure(
        &mut self,
        code: &'static str,
        display: &'static str,
        date: Date,
        reason: Option<&str>,
    ) {
        let id = self.new_id();
        let minute = self.rng.gen_range(480..1000);
        let mut p = with(
            json!({
                "resourceType": "Procedure",
                "id": id,
                "status": "completed",
                "subject": {"reference": self.patient_ref, "display": self.full_name},
                "performedPeriod": {"start": date.at(minute), "end": date.at(minute + 30)},
                "location": {"display": "Juniper Valley Medical Center"}
            }),
            vec![("code", concept(SNOMED, code, display))],
        );
        if let Some(r) = reason {
            p["reasonReference"] = json!([{"reference": format!("urn:uuid:{r}")}]);
        }
        self.out.push(p);
    }

    fn device(&mut self, code: &'static str, display: &'static str, date: Date) {
        let id = self.new_id();
        let serial = format!("{:011}", self.rng.gen_range(0..100_000_000_000u64));
        self.out.push(with(json!({
            "resourceType": "Device",
            "id": id,
            "status": "active",
            "udiCarrier": [{"deviceIdentifier": "00643169007222", "carrierHRF": format!("(01)00643169007222(21){serial}")}],
            "serialNumber": serial,
            "manufactureDate": date.at(600),
            "deviceName": [{"name": display, "type": "user-friendly-name"}],
            "patient": {"reference": self.patient_ref}
        }), vec![("type", concept(SNOMED, code, display))]));
    }

    fn allergies_and_blood_type(&mut self) {
        const ALLERGIES: &[(&str, &str, &str)] = &[
            (SNOMED, "84489001", "Mold (organism)"),
            (SNOMED, "256277009", "Grass pollen (substance)"),
            (SNOMED, "264287008", "Animal dander (substance)"),
            (SNOMED, "762952008", "Peanut (substance)"),
            (RXNORM, "7980", "Penicillin G"),
        ];
        if self.chance(0.15) {
            let (system, code, display) = *self.pick(ALLERGIES);
            let when = self.between(self.birth, self.end);
            let id = self.new_id();
            self.out.push(with(
                json!({
                    "resourceType": "AllergyIntolerance",
                    "id": id,
                    "type": "allergy",
                    "criticality": if system == RXNORM { "high" } else { "low" },
                    "patient": {"reference": self.patient_ref},
                    "recordedDate": when.at(600)
                }),
                vec![
                    (
                        "clinicalStatus",
                        concept(
                            "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                            "active",
                            "Active",
                        ),
                    ),
                    (
                        "verificationStatus",
                        concept(
                            "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                            "confirmed",
                            "Confirmed",
                        ),
                    ),
                    ("code", concept(system, code, display)),
                ],
            ));
        }
        if self.chance(0.5) {
            const GROUPS: &[(&str, &str, f64)] = &[
                ("LA19708-9", "Group O", 0.44),
                ("LA19710-5", "Group A", 0.42),
                ("LA19709-7", "Group B", 0.10),
                ("LA28449-9", "Group AB", 0.04),
            ];
            let x: f64 = self.rng.r#gen();
            let mut acc = 0.0;
            let mut group = GROUPS[0];
            for g in GROUPS {
                acc += g.2;
                if x < acc {
                    group = *g;
                    break;
                }
            }
            let rh = if self.chance(0.85) {
                ("LA6576-8", "Positive")
            } else {
                ("LA6577-6", "Negative")
            };
            let when = self.between(self.birth, self.end);
            for (code, display, value) in [
                ("883-9", "ABO group [Type] in Blood", (group.0, group.1)),
                ("10331-7", "Rh [Type] in Blood", rh),
            ] {
                let id = self.new_id();
                self.out.push(with(
                    json!({
                        "resourceType": "Observation",
                        "id": id,
                        "status": "final",
                        "subject": {"reference": self.patient_ref},
                        "effectiveDateTime": when.at(660)
                    }),
                    vec![
                        (
                            "category",
                            Value::Array(vec![concept(
                                "http://terminology.hl7.org/CodeSystem/observation-category",
                                "laboratory",
                                "Laboratory",
                            )]),
                        ),
                        ("code", concept(LOINC, code, display)),
                        ("valueCodeableConcept", concept(LOINC, value.0, value.1)),
                    ],
                ));
            }
        }
    }

    fn encounter(
        &mut self,
        date: Date,
        minute: u32,
        code: &'static str,
        display: &'static str,
        reason: Option<Cond>,
    ) -> String {
        let id = self.new_id();
        let mut e = with(
            json!({
                "resourceType": "Encounter",
                "id": id,
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": self.patient_ref, "display": self.full_name},
                "participant": [{"individual": {"reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999999999", "display": "Dr. Hortensia Vandermeer"}}],
                "period": {"start": date.at(minute), "end": date.at(minute + 30)},
                "serviceProvider": {"display": "Juniper Valley Medical Center"}
            }),
            vec![("type", Value::Array(vec![concept(SNOMED, code, display)]))],
        );
        if let Some(c) = reason {
            let (code, display) = c.code();
            e["reasonCode"] = Value::Array(vec![concept(SNOMED, code, display)]);
        }
        self.out.push(e);
        if self.last_visit.as_ref().is_none_or(|(d, _)| date >= *d) {
            self.last_visit = Some((date, id.clone()));
        }
        id
    }

    /// See [`Population::with_life_events`].
    fn life_events(&mut self) {
        let Some((last, enc)) = self.last_visit.clone() else {
            return;
        };
        let age = self.age_at(last);
        let (value, unit) = if age < 2 {
            let months = (last.ordinal() - self.birth.ordinal()) / 28;
            (months as f64, "mo")
        } else {
            (f64::from(age), "a")
        };
        self.observation(&enc, last, 600, "survey", "30525-0", "Age", value, unit);
        let condition = |g: &mut Gen, code, display, onset: (&'static str, Value)| {
            let id = g.new_id();
            let mut members = condition_codes(
                ("active", "Active"),
                ("encounter-diagnosis", "Encounter Diagnosis"),
                code,
                display,
            );
            members.push(onset);
            g.out.push(with(
                json!({
                    "resourceType": "Condition",
                    "id": id,
                    "subject": {"reference": g.patient_ref},
                    "encounter": {"reference": format!("urn:uuid:{enc}")},
                    "recordedDate": last.at(610)
                }),
                members,
            ));
        };
        let years = |v: u32| json!({"value": v, "unit": "years", "system": UCUM, "code": "a"});
        if age >= 85 {
            condition(
                self,
                "193570009",
                "Cataract (disorder)",
                ("onsetAge", years(age - 3)),
            );
        }
        if age >= 90 {
            let range = json!({"low": years(age - 6), "high": years(age - 1)});
            condition(
                self,
                "239873007",
                "Osteoarthritis of knee (disorder)",
                ("onsetRange", range),
            );
        }
        if age >= 80 && self.chance(0.35) {
            condition(
                self,
                "22298006",
                "Myocardial infarction (disorder)",
                ("onsetDateTime", Value::from(last.at(620))),
            );
            self.patient["deceasedDateTime"] = Value::from(last.at(630));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn observation(
        &mut self,
        enc: &str,
        date: Date,
        minute: u32,
        category: &'static str,
        code: &'static str,
        display: &'static str,
        value: f64,
        unit: &str,
    ) -> String {
        let id = self.new_id();
        let when = date.at(minute);
        self.out.push(with(
            json!({
                "resourceType": "Observation",
                "id": id,
                "status": "final",
                "subject": {"reference": self.patient_ref},
                "encounter": {"reference": format!("urn:uuid:{enc}")},
                "effectiveDateTime": when,
                "issued": when,
                "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}
            }),
            vec![
                (
                    "category",
                    Value::Array(vec![concept(
                        "http://terminology.hl7.org/CodeSystem/observation-category",
                        category,
                        category,
                    )]),
                ),
                ("code", concept(LOINC, code, display)),
            ],
        ));
        id
    }

    fn visits(&mut self) {
        let first_year = self.end.y - 3;
        for year in first_year..self.end.y {
            let year_start = Date {
                y: year,
                m: 1,
                d: 1,
            }
            .max(self.birth);
            let year_end = Date {
                y: year + 1,
                m: 1,
                d: 1,
            };
            if year_start >= year_end {
                continue;
            }
            if self.chance(0.75) {
                let date = self.between(year_start, year_end);
                self.wellness(date);
            }
            // Follow-up of treated chronic conditions.
            let chronic: Vec<(Cond, Date)> =
                self.conditions.iter().map(|(c, d, _)| (*c, *d)).collect();
            for (c, onset) in chronic {
                if onset < year_end
                    && matches!(
                        c,
                        Cond::Diabetes
                            | Cond::Hypertension
                            | Cond::Asthma
                            | Cond::Copd
                            | Cond::Depression
                            | Cond::Anxiety
                            | Cond::Hiv
                            | Cond::Alcoholism
                            | Cond::CoronaryHeartDisease
                    )
                    && self.chance(0.5)
                {
                    let date = self.between(year_start.max(onset), year_end);
                    self.follow_up(c, date);
                }
            }
            if self.chance(0.2) {
                let (code, display) = *self.pick(ACUTE);
                let date = self.between(year_start, year_end);
                let minute = self.rng.gen_range(480..960);
                self.encounter(
                    date,
                    minute,
                    "185345009",
                    "Encounter for symptom (procedure)",
                    None,
                );
                let id = self.new_id();
                let resolved = Date::from_ordinal(date.ordinal() + 10);
                self.out.push(with(
                    json!({
                        "resourceType": "Condition",
                        "id": id,
                        "subject": {"reference": self.patient_ref},
                        "onsetDateTime": date.at(minute),
                        "abatementDateTime": resolved.at(minute),
                        "recordedDate": date.at(minute)
                    }),
                    condition_codes(
                        ("resolved", "Resolved"),
                        ("encounter-diagnosis", "Encounter Diagnosis"),
                        code,
                        display,
                    ),
                ));
            }
        }
    }

    fn wellness(&mut self, date: Date) {
        let age = self.age_at(date);
        let minute = self.rng.gen_range(480..960);
        let (code, display) = if age < 18 {
            ("410620009", "Well child visit (procedure)")
        } else {
            ("162673000", "General examination of patient (procedure)")
        };
        let enc = self.encounter(date, minute, code, display, None);
        self.vitals(&enc, date, minute, age);
        if age >= 18 {
            self.labs(&enc, date, minute + 15);
            // Smoking status.
            let (sc, sd) = match self.smoker {
                Smoking::Never => ("266919005", "Never smoked tobacco (finding)"),
                Smoking::Former => ("8517006", "Ex-smoker (finding)"),
                Smoking::Current => ("449868002", "Smokes tobacco daily (finding)"),
            };
            let id = self.new_id();
            self.out.push(with(
                json!({
                    "resourceType": "Observation",
                    "id": id,
                    "status": "final",
                    "subject": {"reference": self.patient_ref},
                    "encounter": {"reference": format!("urn:uuid:{enc}")},
                    "effectiveDateTime": date.at(minute)
                }),
                vec![
                    (
                        "category",
                        Value::Array(vec![concept(
                            "http://terminology.hl7.org/CodeSystem/observation-category",
                            "social-history",
                            "Social history",
                        )]),
                    ),
                    ("code", concept(LOINC, "72166-2", "Tobacco smoking status")),
                    ("valueCodeableConcept", concept(SNOMED, sc, sd)),
                ],
            ));
            let audit = if self.has(Cond::Alcoholism) {
                self.rng.gen_range(6..=12)
            } else {
                self.rng.gen_range(0..=4)
            };
            self.observation(
                &enc,
                date,
                minute + 5,
                "survey",
                "75626-2",
                "Total score [AUDIT-C]",
                f64::from(audit),
                "{score}",
            );
        }
        if age >= 12 {
            let phq = if self.has(Cond::Depression) {
                self.rng.gen_range(3..=6)
            } else {
                self.rng.gen_range(0..=2)
            };
            self.observation(
                &enc,
                date,
                minute + 5,
                "survey",
                "55758-7",
                "Patient Health Questionnaire 2 item (PHQ-2) total score [Reported]",
                f64::from(phq),
                "{score}",
            );
            self.procedure("171207006", "Depression screening (procedure)", date, None);
        }
        self.immunizations(&enc, date, minute, age);
        if (45..=75).contains(&age) && self.chance(0.08) {
            self.procedure("73761001", "Colonoscopy (procedure)", date, None);
        }
    }

    fn vitals(&mut self, enc: &str, date: Date, minute: u32, age: u32) {
        let f = self.female;
        // Height (m) by age.
        let adult_height = if f {
            normal(&mut self.rng, 1.62, 0.065)
        } else {
            normal(&mut self.rng, 1.76, 0.07)
        };
        let height = if age >= 18 {
            adult_height
        } else {
            (0.5 + f64::from(age) * 0.065).min(adult_height)
        };
        let bmi = if age < 2 {
            normal(&mut self.rng, 16.5, 1.2)
        } else if self.has(Cond::Obesity) {
            normal(&mut self.rng, if age < 18 { 27.0 } else { 35.0 }, 3.5).max(if age < 18 {
                24.0
            } else {
                30.0
            })
        } else if age < 18 {
            normal(&mut self.rng, 17.5, 2.0).clamp(13.0, 23.9)
        } else {
            normal(&mut self.rng, 25.0, 2.6).clamp(17.0, 29.9)
        };
        let weight = bmi * height * height;
        self.observation(
            enc,
            date,
            minute,
            "vital-signs",
            "8302-2",
            "Body Height",
            round_to(height * 100.0, 1),
            "cm",
        );
        self.observation(
            enc,
            date,
            minute,
            "vital-signs",
            "29463-7",
            "Body Weight",
            round_to(weight, 1),
            "kg",
        );
        if age >= 2 {
            self.observation(
                enc,
                date,
                minute,
                "vital-signs",
                "39156-5",
                "Body mass index (BMI) [Ratio]",
                round_to(bmi, 2),
                "kg/m2",
            );
        }
        if age >= 3 {
            let mut sys = normal(
                &mut self.rng,
                112.0 + 0.35 * f64::from(age.saturating_sub(20)),
                11.0,
            );
            let mut dia = normal(
                &mut self.rng,
                72.0 + 0.1 * f64::from(age.saturating_sub(20)),
                8.0,
            );
            if self.has(Cond::Hypertension) {
                let treated = if self.treated.contains(&Cond::Hypertension) {
                    0.5
                } else {
                    1.0
                };
                sys += 22.0 * treated;
                dia += 10.0 * treated;
            }
            if age < 12 {
                sys -= 10.0;
                dia -= 10.0;
            }
            let id = self.new_id();
            self.out.push(with(json!({
                "resourceType": "Observation",
                "id": id,
                "status": "final",
                "subject": {"reference": self.patient_ref},
                "encounter": {"reference": format!("urn:uuid:{enc}")},
                "effectiveDateTime": date.at(minute)
            }), vec![("component", Value::Array(vec![
                    with(json!({"valueQuantity": {"value": sys.round().clamp(70.0, 230.0), "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}}),
                        vec![("code", concept(LOINC, "8480-6", "Systolic Blood Pressure"))]),
                    with(json!({"valueQuantity": {"value": dia.round().clamp(40.0, 140.0), "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}}),
                        vec![("code", concept(LOINC, "8462-4", "Diastolic Blood Pressure"))]),
                ])), ("category", Value::Array(vec![concept("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs", "Vital signs")])), ("code", concept(LOINC, "85354-9", "Blood pressure panel with all children optional"))]));
        }
    }

    fn labs(&mut self, enc: &str, date: Date, minute: u32) {
        let dm = self.has(Cond::Diabetes);
        let pre = self.has(Cond::Prediabetes);
        if dm || (pre && self.chance(0.7)) || self.chance(0.25) {
            let a1c = if dm {
                normal(
                    &mut self.rng,
                    if self.treated.contains(&Cond::Diabetes) {
                        7.3
                    } else {
                        8.4
                    },
                    1.1,
                )
                .clamp(6.0, 14.0)
            } else if pre {
                normal(&mut self.rng, 6.0, 0.2).clamp(5.7, 6.4)
            } else {
                normal(&mut self.rng, 5.3, 0.25).clamp(4.2, 5.6)
            };
            let glucose = if dm {
                normal(&mut self.rng, 110.0 + (a1c - 6.0) * 28.0, 20.0)
            } else {
                normal(&mut self.rng, if pre { 108.0 } else { 90.0 }, 8.0)
            };
            self.observation(
                enc,
                date,
                minute,
                "laboratory",
                "4548-4",
                "Hemoglobin A1c/Hemoglobin.total in Blood",
                round_to(a1c, 1),
                "%",
            );
            self.observation(
                enc,
                date,
                minute,
                "laboratory",
                "2339-0",
                "Glucose [Mass/volume] in Blood",
                glucose.round().max(55.0),
                "mg/dL",
            );
        }
        if self.chance(0.6) {
            let hld = self.has(Cond::Hyperlipidemia);
            let statin = self.treated.contains(&Cond::Hyperlipidemia);
            let ldl = match (hld, statin) {
                (true, true) => normal(&mut self.rng, 98.0, 22.0),
                (true, false) => normal(&mut self.rng, 165.0, 28.0),
                _ => normal(&mut self.rng, 108.0, 25.0),
            }
            .clamp(35.0, 300.0);
            let hdl = normal(&mut self.rng, if self.female { 58.0 } else { 48.0 }, 10.0)
                .clamp(20.0, 110.0);
            let tg_mean = if hld || self.has(Cond::Obesity) {
                180.0
            } else {
                115.0
            };
            let tg = normal(&mut self.rng, tg_mean, 35.0).clamp(40.0, 600.0);
            let total = ldl + hdl + tg / 5.0;
            let ids = [
                self.observation(
                    enc,
                    date,
                    minute,
                    "laboratory",
                    "2093-3",
                    "Cholesterol [Mass/volume] in Serum or Plasma",
                    total.round(),
                    "mg/dL",
                ),
                self.observation(
                    enc,
                    date,
                    minute,
                    "laboratory",
                    "18262-6",
                    "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay",
                    ldl.round(),
                    "mg/dL",
                ),
                self.observation(
                    enc,
                    date,
                    minute,
                    "laboratory",
                    "2085-9",
                    "Cholesterol in HDL [Mass/volume] in Serum or Plasma",
                    hdl.round(),
                    "mg/dL",
                ),
                self.observation(
                    enc,
                    date,
                    minute,
                    "laboratory",
                    "2571-8",
                    "Triglyceride [Mass/volume] in Serum or Plasma",
                    tg.round(),
                    "mg/dL",
                ),
            ];
            let id = self.new_id();
            self.out.push(with(
                json!({
                    "resourceType": "DiagnosticReport",
                    "id": id,
                    "status": "final",
                    "subject": {"reference": self.patient_ref},
                    "encounter": {"reference": format!("urn:uuid:{enc}")},
                    "effectiveDateTime": date.at(minute),
                    "issued": date.at(minute + 120),
                    "performer": [{"display": "Juniper Valley Medical Center Laboratory"}],
                    "conclusion": format!("Reviewed with {}.", self.given)
                }),
                vec![
                    (
                        "result",
                        ids.iter()
                            .map(|i| json!({"reference": format!("urn:uuid:{i}")}))
                            .collect::<Vec<_>>()
                            .into(),
                    ),
                    (
                        "code",
                        concept(
                            LOINC,
                            "57698-3",
                            "Lipid panel with direct LDL - Serum or Plasma",
                        ),
                    ),
                ],
            ));
        }
        let kidney_watch = self.has(Cond::Diabetes)
            || self.has(Cond::Hypertension)
            || self.has(Cond::Ckd1)
            || self.has(Cond::Ckd3);
        if kidney_watch || self.age_at(date) >= 50 || self.chance(0.3) {
            let (k, alpha, base) = if self.female {
                (0.7, -0.241, 0.75)
            } else {
                (0.9, -0.302, 0.95)
            };
            let scr = if self.has(Cond::Ckd3) {
                normal(&mut self.rng, base * 1.9, 0.25)
            } else {
                normal(&mut self.rng, base, 0.12)
            }
            .clamp(0.4, 6.0);
            let age = f64::from(self.age_at(date));
            // CKD-EPI 2021 (race-free) creatinine equation.
            let ratio: f64 = scr / k;
            let egfr = 142.0
                * ratio.min(1.0).powf(alpha)
                * ratio.max(1.0).powf(-1.200)
                * 0.9938f64.powf(age)
                * if self.female { 1.012 } else { 1.0 };
            self.observation(
                enc,
                date,
                minute,
                "laboratory",
                "2160-0",
                "Creatinine [Mass/volume] in Serum or Plasma",
                round_to(scr, 2),
                "mg/dL",
            );
            self.observation(enc, date, minute, "laboratory", "33914-3", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum or Plasma by Creatinine-based formula (MDRD)", egfr.round(), "mL/min/{1.73_m2}");
        }
    }

    fn immunizations(&mut self, enc: &str, date: Date, minute: u32, age: u32) {
        let mut shots: Vec<(&str, &str)> = Vec::new();
        if age >= 1 && self.chance(if age >= 65 { 0.7 } else { 0.45 }) {
            shots.push(("140", "Influenza, seasonal, injectable, preservative free"));
        }
        if age <= 6 && self.chance(0.5) {
            shots.push(("20", "DTaP"));
        }
        if (1..=6).contains(&age) && self.chance(0.3) {
            shots.push(("03", "MMR"));
        }
        if age >= 18 && self.chance(0.08) {
            shots.push(("113", "Td (adult) preservative free"));
        }
        if age >= 65 && self.chance(0.15) {
            shots.push(("33", "pneumococcal polysaccharide vaccine, 23 valent"));
        }
        if age >= 12 && date.y >= 2021 && self.chance(0.25) {
            shots.push(("208", "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose"));
        }
        for (code, display) in shots {
            let id = self.new_id();
            self.out.push(with(
                json!({
                    "resourceType": "Immunization",
                    "id": id,
                    "status": "completed",
                    "patient": {"reference": self.patient_ref},
                    "encounter": {"reference": format!("urn:uuid:{enc}")},
                    "occurrenceDateTime": date.at(minute + 10),
                    "primarySource": true,
                    "lotNumber": format!("LOT{:06}", self.rng.gen_range(0..1_000_000)),
                    "location": {"display": "Juniper Valley Medical Center"}
                }),
                vec![("vaccineCode", concept(CVX, code, display))],
            ));
        }
    }

    fn follow_up(&mut self, c: Cond, date: Date) {
        let minute = self.rng.gen_range(480..960);
        let enc = self.encounter(
            date,
            minute,
            "185347001",
            "Encounter for problem (procedure)",
            Some(c),
        );
        let reason = self.condition_id(c);
        match c {
            Cond::Diabetes => {
                let a1c = normal(
                    &mut self.rng,
                    if self.treated.contains(&Cond::Diabetes) {
                        7.3
                    } else {
                        8.4
                    },
                    1.1,
                )
                .clamp(6.0, 14.0);
                self.observation(
                    &enc,
                    date,
                    minute,
                    "laboratory",
                    "4548-4",
                    "Hemoglobin A1c/Hemoglobin.total in Blood",
                    round_to(a1c, 1),
                    "%",
                );
            }
            Cond::Anxiety => {
                let gad = self.rng.gen_range(8..=21);
                self.observation(
                    &enc,
                    date,
                    minute,
                    "survey",
                    "70274-6",
                    "Generalized anxiety disorder 7 item (GAD-7) total score [Reported.PHQ]",
                    f64::from(gad),
                    "{score}",
                );
            }
            Cond::Depression => {
                let phq9 = self.rng.gen_range(8..=24);
                self.observation(
                    &enc,
                    date,
                    minute,
                    "survey",
                    "44261-6",
                    "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]",
                    f64::from(phq9),
                    "{score}",
                );
            }
            Cond::Hiv => {
                let load = (10f64)
                    .powf(normal(&mut self.rng, 2.0, 1.0).clamp(1.3, 6.0))
                    .round();
                self.observation(&enc, date, minute, "laboratory", "25836-8", "HIV 1 RNA [#/volume] (viral load) in Serum or Plasma by NAA with probe detection", load, "{copies}/mL");
            }
            Cond::Alcoholism => {
                let audit = self.rng.gen_range(6..=12);
                self.observation(
                    &enc,
                    date,
                    minute,
                    "survey",
                    "75626-2",
                    "Total score [AUDIT-C]",
                    f64::from(audit),
                    "{score}",
                );
            }
            _ => {}
        }
        if self.chance(0.3) {
            self.procedure(
                "430193006",
                "Medication reconciliation (procedure)",
                date,
                reason.as_deref(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_shaped_and_unique() {
        let pop = Population::new(1, 3);
        let (patient, resources) = pop.resources(2);
        assert_eq!(patient["id"], "synth-000002");
        let mut ids: Vec<&str> = resources.iter().filter_map(|r| r["id"].as_str()).collect();
        assert!(
            ids.iter()
                .all(|id| id.len() == 36 && id.chars().filter(|c| *c == '-').count() == 4)
        );
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }

    #[test]
    fn dates_round_trip() {
        let d = Date {
            y: 2024,
            m: 12,
            d: 28,
        };
        assert_eq!(Date::from_ordinal(d.ordinal()), d);
        assert_eq!(
            Date::from_ordinal(d.ordinal() + 1),
            Date {
                y: 2025,
                m: 1,
                d: 1
            }
        );
        assert!(crate::util::is_fhir_date(&d.at(1000)));
    }
}
