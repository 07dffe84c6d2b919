//! The consent snapshot of one study: per patient, the searchable fields the patient
//! consented to make searchable for the study's purpose, and the sensitive categories
//! (mental health, substance use, sexual health, genomics) the patient's consent permits
//! the study.
//!
//! The broker derives the snapshot from the patients' consent policies and the study's
//! purpose; the engine only reads it. A patient absent from the snapshot is invisible to
//! every query; a field a patient did not consent is invisible for that patient (event rows
//! are dropped, `birth_year`/`sex` read as NULL); an event row whose code is sensitive is
//! invisible unless the patient also permitted every sensitive category of the code
//! ([`crate::sensitivity`]). See [`crate::engine`] for where this is enforced.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock};

use model::Category;
use model::sensitive::SENSITIVE_CATEGORIES;
use roaring::RoaringBitmap;

pub use model::SearchField;

use crate::sensitivity::slot;

/// A consent snapshot that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsentError {
    #[error(
        "`{0}` is not a searchable field; use birth_year, sex, condition, measurement, drug or \
         procedure (or a sensitive category: mental_health, substance_use, sexual_health, \
         genomics)"
    )]
    UnknownField(String),
    #[error(
        "`{0}` is not a sensitive category; only mental_health, substance_use, sexual_health \
         and genomics gate searchable codes"
    )]
    NotSensitive(Category),
    #[error("person_id {0} is out of range: the index holds ids from 0 to 4294967295")]
    PersonIdOutOfRange(i64),
}

/// BLAKE3 hash of a consent snapshot's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsentHash(pub [u8; 32]);

impl fmt::Display for ConsentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Which patients consented which searchable fields for one study. Cheap to clone.
#[derive(Clone)]
pub struct ConsentSnapshot {
    inner: Arc<Inner>,
}

/// Number of searchable fields.
const FIELDS: usize = SearchField::ALL.len();
/// Dense-vector slots: the fields, `any`, then the sensitive categories.
const ANY_SLOT: usize = FIELDS;
const CATEGORY_SLOT: usize = FIELDS + 1;

struct Inner {
    fields: [RoaringBitmap; FIELDS],
    /// Patients who permitted each sensitive category, in [`SENSITIVE_CATEGORIES`] order.
    categories: [RoaringBitmap; 4],
    any: RoaringBitmap,
    hash: ConsentHash,
    /// Dense bit vectors of the fields, `any` and the four categories, built on first
    /// use.
    dense: [OnceLock<Option<Vec<u64>>>; CATEGORY_SLOT + 4],
}

/// Ids up to this get a dense bit vector (at most 32 MiB per field) for membership tests.
const DENSE_LIMIT: u32 = 1 << 28;

/// Membership in one consent set, as fast as the ids allow.
#[derive(Clone, Copy)]
pub(crate) struct Members<'a> {
    bitmap: &'a RoaringBitmap,
    dense: Option<&'a [u64]>,
}

impl Members<'_> {
    pub(crate) fn bitmap(&self) -> &RoaringBitmap {
        self.bitmap
    }

    #[inline]
    pub(crate) fn contains(&self, id: i64) -> bool {
        match self.dense {
            Some(words) => usize::try_from(id)
                .ok()
                .and_then(|i| words.get(i >> 6))
                .is_some_and(|w| (w >> (id & 63)) & 1 == 1),
            None => u32::try_from(id).is_ok_and(|k| self.bitmap.contains(k)),
        }
    }
}

fn dense(bitmap: &RoaringBitmap) -> Option<Vec<u64>> {
    let max = bitmap.max()?;
    if max >= DENSE_LIMIT {
        return None;
    }
    let mut words = vec![0u64; (max as usize >> 6) + 1];
    for id in bitmap {
        words[id as usize >> 6] |= 1 << (id & 63);
    }
    Some(words)
}

impl fmt::Debug for ConsentSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Counts only: a snapshot's membership is patient data.
        f.debug_struct("ConsentSnapshot")
            .field("patients", &self.inner.any.len())
            .field("hash", &self.inner.hash.to_string())
            .finish()
    }
}

impl PartialEq for ConsentSnapshot {
    fn eq(&self, other: &Self) -> bool {
        self.inner.hash == other.inner.hash
    }
}

impl Eq for ConsentSnapshot {}

impl std::hash::Hash for ConsentSnapshot {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.hash.hash(state)
    }
}

pub(crate) fn person_key(person_id: i64) -> Option<u32> {
    u32::try_from(person_id).ok()
}

impl ConsentSnapshot {
    /// A builder.
    pub fn builder() -> ConsentBuilder {
        ConsentBuilder::default()
    }

    /// A snapshot from `(person_id, fields)` grants.
    pub fn from_grants<I, F>(grants: I) -> Result<ConsentSnapshot, ConsentError>
    where
        I: IntoIterator<Item = (i64, F)>,
        F: IntoIterator<Item = SearchField>,
    {
        let mut b = ConsentBuilder::default();
        for (person, fields) in grants {
            for field in fields {
                b.grant(person, field)?;
            }
        }
        Ok(b.build())
    }

    /// Every field and every sensitive category for every listed patient.
    pub fn everything(
        persons: impl IntoIterator<Item = i64>,
    ) -> Result<ConsentSnapshot, ConsentError> {
        let mut b = ConsentBuilder::default();
        for person in persons {
            for field in SearchField::ALL {
                b.grant(person, field)?;
            }
            for category in SENSITIVE_CATEGORIES {
                b.permit(person, category)?;
            }
        }
        Ok(b.build())
    }

    /// Hash of the contents: equal snapshots hash equally, whatever order they were built in.
    pub fn hash(&self) -> ConsentHash {
        self.inner.hash
    }

    /// Whether `person_id` is in the population (see [`ConsentBuilder::include`]).
    pub fn includes(&self, person_id: i64) -> bool {
        person_key(person_id).is_some_and(|k| self.inner.any.contains(k))
    }

    /// Whether `person_id` consented `field`.
    pub fn allows(&self, person_id: i64, field: SearchField) -> bool {
        person_key(person_id).is_some_and(|k| self.inner.fields[field.index()].contains(k))
    }

    /// Whether `person_id` permitted the sensitive `category` (never, for a category that
    /// is not sensitive).
    pub fn permits(&self, person_id: i64, category: Category) -> bool {
        slot(category).is_some_and(|i| {
            person_key(person_id).is_some_and(|k| self.inner.categories[i].contains(k))
        })
    }

    /// The fields `person_id` consented.
    pub fn fields_of(&self, person_id: i64) -> BTreeSet<SearchField> {
        SearchField::ALL
            .into_iter()
            .filter(|f| self.allows(person_id, *f))
            .collect()
    }

    /// Patients in the snapshot (included, or with at least one consented field): the
    /// population every count starts from.
    pub fn patients(&self) -> u64 {
        self.inner.any.len()
    }

    /// Every `(person_id, field)` grant, by field then person.
    pub fn grants(&self) -> impl Iterator<Item = (i64, SearchField)> + '_ {
        SearchField::ALL.into_iter().flat_map(move |f| {
            self.inner.fields[f.index()]
                .iter()
                .map(move |p| (i64::from(p), f))
        })
    }

    /// Every `(person_id, category)` permit of a sensitive category, by category then
    /// person.
    pub fn permits_all(&self) -> impl Iterator<Item = (i64, Category)> + '_ {
        SENSITIVE_CATEGORIES
            .into_iter()
            .zip(&self.inner.categories)
            .flat_map(|(c, bitmap)| bitmap.iter().map(move |p| (i64::from(p), c)))
    }

    /// Membership in a field's set (`None`: the patients with any field).
    pub(crate) fn members(&self, field: Option<SearchField>) -> Members<'_> {
        match field {
            Some(f) => self.members_at(&self.inner.fields[f.index()], f.index()),
            None => self.members_at(&self.inner.any, ANY_SLOT),
        }
    }

    /// Membership in a sensitive category's set (empty for another category).
    pub(crate) fn category_members(&self, category: Category) -> Members<'_> {
        static NOBODY: LazyLock<RoaringBitmap> = LazyLock::new(RoaringBitmap::new);
        match slot(category) {
            Some(i) => self.members_at(&self.inner.categories[i], CATEGORY_SLOT + i),
            None => Members {
                bitmap: &NOBODY,
                dense: None,
            },
        }
    }

    fn members_at<'a>(&'a self, bitmap: &'a RoaringBitmap, slot: usize) -> Members<'a> {
        let dense = self.inner.dense[slot].get_or_init(|| dense(bitmap));
        Members {
            bitmap,
            dense: dense.as_deref(),
        }
    }
}

/// Collects grants into a [`ConsentSnapshot`]; kept, it is a study's consent maintained
/// patient by patient ([`ConsentBuilder::remove`], then the patient's new grants), with a
/// snapshot taken whenever one is needed ([`ConsentBuilder::snapshot`]).
#[derive(Debug, Default, Clone)]
pub struct ConsentBuilder {
    fields: [RoaringBitmap; FIELDS],
    categories: [RoaringBitmap; 4],
    included: RoaringBitmap,
}

impl ConsentBuilder {
    /// Records that `person_id` is in the population (its consent permits the study),
    /// whatever fields it consented: with none, the patient is counted at step 0 and
    /// matches only criteria that read no field of theirs (e.g. exclusions).
    pub fn include(&mut self, person_id: i64) -> Result<&mut Self, ConsentError> {
        let key = person_key(person_id).ok_or(ConsentError::PersonIdOutOfRange(person_id))?;
        self.included.insert(key);
        Ok(self)
    }

    /// Records that `person_id` consented `field`.
    pub fn grant(&mut self, person_id: i64, field: SearchField) -> Result<&mut Self, ConsentError> {
        let key = person_key(person_id).ok_or(ConsentError::PersonIdOutOfRange(person_id))?;
        self.fields[field.index()].insert(key);
        Ok(self)
    }

    /// Records that `person_id` permits the study the sensitive `category`: rows whose
    /// code is sensitive in it become visible for the patient (with the row's field).
    pub fn permit(
        &mut self,
        person_id: i64,
        category: Category,
    ) -> Result<&mut Self, ConsentError> {
        let i = slot(category).ok_or(ConsentError::NotSensitive(category))?;
        let key = person_key(person_id).ok_or(ConsentError::PersonIdOutOfRange(person_id))?;
        self.categories[i].insert(key);
        Ok(self)
    }

    /// Forgets everything recorded of `person_id`.
    pub fn remove(&mut self, person_id: i64) -> &mut Self {
        if let Some(key) = person_key(person_id) {
            for bitmap in self.fields.iter_mut().chain(&mut self.categories) {
                bitmap.remove(key);
            }
            self.included.remove(key);
        }
        self
    }

    /// A snapshot of what is recorded so far; the builder stays as it is.
    pub fn snapshot(&self) -> ConsentSnapshot {
        self.clone().build()
    }

    /// The snapshot.
    pub fn build(self) -> ConsentSnapshot {
        let mut any = self.included;
        for bitmap in &self.fields {
            any |= bitmap;
        }
        let mut hasher = blake3::Hasher::new_derive_key("cohort-query 2026 consent snapshot v3");
        let named = SearchField::ALL
            .iter()
            .map(|f| f.as_str())
            .zip(&self.fields)
            .chain(
                SENSITIVE_CATEGORIES
                    .iter()
                    .map(|c| c.label())
                    .zip(&self.categories),
            )
            .chain([("population", &any)]);
        for (name, bitmap) in named {
            // Name, count, then the sorted ids: independent of build order and of the
            // bitmap's internal container layout.
            hasher.update(name.as_bytes());
            hasher.update(&bitmap.len().to_le_bytes());
            let mut buf = Vec::with_capacity(4096);
            for id in bitmap.iter() {
                buf.extend_from_slice(&id.to_le_bytes());
                if buf.len() >= 4096 {
                    hasher.update(&buf);
                    buf.clear();
                }
            }
            hasher.update(&buf);
        }
        ConsentSnapshot {
            inner: Arc::new(Inner {
                fields: self.fields,
                categories: self.categories,
                any,
                hash: ConsentHash(*hasher.finalize().as_bytes()),
                dense: Default::default(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SearchField::*;

    #[test]
    fn grants_and_hash() {
        let a = ConsentSnapshot::from_grants([(1, vec![Sex, Condition]), (7, vec![Drug])]).unwrap();
        let b = ConsentSnapshot::from_grants([(7, vec![Drug]), (1, vec![Condition, Sex])]).unwrap();
        assert_eq!(a.hash(), b.hash());
        assert!(a.allows(1, Condition) && !a.allows(1, Drug) && !a.allows(2, Sex));
        assert_eq!(a.patients(), 2);
        assert_eq!(a.fields_of(1), BTreeSet::from([Sex, Condition]));
        let c = ConsentSnapshot::from_grants([(1, vec![Sex]), (7, vec![Drug])]).unwrap();
        assert_ne!(a.hash(), c.hash());
        assert_eq!(a.grants().count(), 3);
    }

    #[test]
    fn an_included_patient_without_fields_is_in_the_population_only() {
        let mut b = ConsentSnapshot::builder();
        b.grant(1, Condition).unwrap();
        b.include(2).unwrap();
        let s = b.build();
        assert_eq!(s.patients(), 2);
        assert!(s.fields_of(2).is_empty());
        let without = ConsentSnapshot::from_grants([(1, vec![Condition])]).unwrap();
        assert_ne!(s.hash(), without.hash());
        assert_eq!(without.patients(), 1);
        // Removing a patient leaves what the builder would have held without them.
        let mut b = ConsentSnapshot::builder();
        b.grant(1, Condition).unwrap();
        b.include(2).unwrap();
        b.grant(2, Sex)
            .unwrap()
            .permit(2, Category::MentalHealth)
            .unwrap();
        assert_eq!(b.snapshot().patients(), 2);
        b.remove(2);
        assert_eq!(b.snapshot(), without);
    }

    #[test]
    fn sensitive_categories_are_permits_of_their_own() {
        let mut b = ConsentSnapshot::builder();
        b.grant(1, Condition).unwrap();
        b.permit(1, Category::SexualHealth).unwrap();
        // A permit without any field makes nobody visible.
        b.permit(2, Category::MentalHealth).unwrap();
        assert_eq!(
            b.permit(1, Category::Conditions).unwrap_err(),
            ConsentError::NotSensitive(Category::Conditions)
        );
        let s = b.build();
        assert!(s.permits(1, Category::SexualHealth));
        assert!(!s.permits(1, Category::MentalHealth) && !s.permits(3, Category::SexualHealth));
        assert!(!s.permits(1, Category::Conditions));
        assert_eq!(s.patients(), 1);
        assert_eq!(
            s.permits_all().collect::<Vec<_>>(),
            [(2, Category::MentalHealth), (1, Category::SexualHealth)]
        );
        // The permit is part of the hash: the same fields without it hash differently.
        let fields_only = ConsentSnapshot::from_grants([(1, vec![Condition])]).unwrap();
        assert_ne!(s.hash(), fields_only.hash());
        assert!(s.category_members(Category::SexualHealth).contains(1));
        assert!(!s.category_members(Category::Genomics).contains(1));
        assert!(!s.category_members(Category::Conditions).contains(1));
        let all = ConsentSnapshot::everything([5]).unwrap();
        assert!(SENSITIVE_CATEGORIES.iter().all(|c| all.permits(5, *c)));
    }

    #[test]
    fn dense_and_sparse_membership_agree() {
        let s = ConsentSnapshot::from_grants([
            (0, vec![Sex]),
            (63, vec![Sex]),
            (64, vec![Drug]),
            (1 << 29, vec![Sex]),
        ])
        .unwrap();
        let sex = s.members(Some(Sex));
        assert!(sex.dense.is_none(), "ids above the dense limit stay sparse");
        assert!(sex.contains(0) && sex.contains(63) && sex.contains(1 << 29));
        assert!(!sex.contains(64) && !sex.contains(-1) && !sex.contains(i64::MAX));
        let drug = s.members(Some(Drug));
        assert!(drug.dense.is_some());
        assert!(
            drug.contains(64)
                && !drug.contains(63)
                && !drug.contains(65)
                && !drug.contains(100_000)
        );
        let any = s.members(None);
        assert!(any.contains(0) && any.contains(64) && !any.contains(1));
    }

    #[test]
    fn field_names_are_exact() {
        let names: Vec<&str> = SearchField::ALL.iter().map(|f| f.as_str()).collect();
        assert_eq!(
            names,
            [
                "birth_year",
                "sex",
                "condition",
                "measurement",
                "drug",
                "procedure",
                "observation_period"
            ]
        );
        assert_eq!("drug".parse::<SearchField>().unwrap(), Drug);
        assert!("conditions".parse::<SearchField>().is_err());
        assert_eq!(
            ConsentSnapshot::from_grants([(-1, vec![Sex])]).unwrap_err(),
            ConsentError::PersonIdOutOfRange(-1)
        );
    }
}
