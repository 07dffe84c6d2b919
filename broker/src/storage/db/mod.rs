//! The broker's metadata store: one SQLite file (`broker.db`) in WAL mode with
//! `synchronous=FULL`, so a committed write survives a crash.
//!
//! It holds actors, patients and their public keys, envelope versions (pointing at blob
//! names), the searchable index (apart from envelopes), studies, grants and releases.
//! No secret key, record plaintext, name or address is ever written here.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use model::{CodedEvent, ObservationPeriod, PatientIndex, Person};
use pre_kms::Category;
use rusqlite::{Connection, OptionalExtension, params};

use consent_policy::ConsentPolicy;

use crate::storage::blobs::BlobLocation;
use consent_policy::SignedPolicy;
use model::{Actor, EnvelopeReceipt, Role};
use model::{Study, StudyProposal, StudyStatus};

mod actors;
mod audit;
mod consents;
mod emergency;
mod erasure;
mod feasibility;
mod grants;
mod records;
mod releases;
mod studies;

pub use emergency::BreakGlassRow;
pub use erasure::{Deleted, ErasureJob, ErasureStep, Moved};
pub use records::{IndexChange, Stored, StoredContent};

pub type DbResult<T> = Result<T, rusqlite::Error>;

pub struct Db {
    conn: Connection,
}

/// The metadata schema this broker reads and writes.
const SCHEMA_VERSION: i64 = 5;

const SCHEMA: &str = "
PRAGMA journal_mode=WAL;
PRAGMA synchronous=FULL;
-- Deleted content is overwritten, not only unlinked: an erased patient's rows must not
-- linger in free pages.
PRAGMA secure_delete=ON;
-- 128 MiB of page cache: uploads insert into B-trees keyed by random pseudonyms.
PRAGMA cache_size=-131072;
PRAGMA foreign_keys=ON;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS actors (
    actor_id TEXT PRIMARY KEY, role TEXT NOT NULL, name TEXT NOT NULL,
    organisation TEXT NOT NULL, verifying_key BLOB NOT NULL, encryption_key BLOB NOT NULL,
    key_binding BLOB NOT NULL, created_at INTEGER NOT NULL);
-- Log events written in the transaction of the state they describe, until they are in
-- the access log (recovered at start: see Broker::recover_intents).
CREATE TABLE IF NOT EXISTS log_intents (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, log_size INTEGER NOT NULL, event BLOB NOT NULL);
-- Patients whose new consent's grant withdrawals are not yet done (redone at start).
CREATE TABLE IF NOT EXISTS consent_reconcile (pseudonym TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS proxies (
    idx INTEGER PRIMARY KEY, proxy_id TEXT NOT NULL, encryption_key BLOB NOT NULL,
    verifying_key BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS patients (
    pseudonym TEXT PRIMARY KEY, verifying_key BLOB NOT NULL, enrolled_by TEXT NOT NULL,
    created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS patient_keys (
    pseudonym TEXT NOT NULL REFERENCES patients(pseudonym), category TEXT NOT NULL,
    public_key BLOB NOT NULL, PRIMARY KEY (pseudonym, category));
CREATE TABLE IF NOT EXISTS envelopes (
    pseudonym TEXT NOT NULL REFERENCES patients(pseudonym), category TEXT NOT NULL,
    version INTEGER NOT NULL, blob TEXT NOT NULL, pack TEXT NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, content_tag BLOB NOT NULL, created_at INTEGER NOT NULL,
    PRIMARY KEY (pseudonym, category, version));
-- index_id: the number of this version of the patient's index in the cohort engine,
-- from meta 'next_index_id', never reused; index_hash: what the version holds.
CREATE TABLE IF NOT EXISTS index_person (
    pseudonym TEXT PRIMARY KEY REFERENCES patients(pseudonym), birth_year INTEGER, sex TEXT NOT NULL,
    index_id INTEGER NOT NULL UNIQUE, index_hash BLOB NOT NULL);
-- The rows of each index version, by its number: numbers only grow, so an upload's rows
-- go at the end of the table and of its index (no random B-tree inserts), and a start
-- that reads the whole index reads it in order.
CREATE TABLE IF NOT EXISTS index_event (
    index_id INTEGER NOT NULL, kind TEXT NOT NULL,
    system TEXT NOT NULL, code TEXT NOT NULL, date TEXT NOT NULL, value REAL, unit TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS index_event_version ON index_event (index_id);
-- The observation periods of each index version (inclusive ISO dates), kept like its events.
CREATE TABLE IF NOT EXISTS index_period (
    index_id INTEGER NOT NULL, start_date TEXT NOT NULL, end_date TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS index_period_version ON index_period (index_id);
CREATE TABLE IF NOT EXISTS studies (
    study_id TEXT PRIMARY KEY, sponsor_id TEXT NOT NULL, proposal TEXT NOT NULL,
    status TEXT NOT NULL, board_id TEXT NOT NULL DEFAULT '', board_signature BLOB NOT NULL DEFAULT x'',
    reason TEXT NOT NULL DEFAULT '', proposed_at INTEGER NOT NULL, decided_at INTEGER NOT NULL DEFAULT 0,
    overrides_abstain INTEGER NOT NULL DEFAULT 0, sponsor_organisation TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS consents (
    pseudonym TEXT NOT NULL REFERENCES patients(pseudonym), version INTEGER NOT NULL,
    policy BLOB NOT NULL, signature BLOB NOT NULL, policy_hash TEXT NOT NULL,
    issued_at INTEGER NOT NULL, set_at INTEGER NOT NULL, PRIMARY KEY (pseudonym, version));
-- study_id names the grantee: a study, or an emergency organisation (`emergency:ORG`) for
-- a standing break-glass grant of `critical`.
CREATE TABLE IF NOT EXISTS grants (
    grant_id TEXT PRIMARY KEY, study_id TEXT NOT NULL,
    pseudonym TEXT NOT NULL REFERENCES patients(pseudonym), threshold INTEGER NOT NULL,
    expires_at INTEGER NOT NULL, signature BLOB NOT NULL, created_at INTEGER NOT NULL,
    UNIQUE (study_id, pseudonym));
CREATE INDEX IF NOT EXISTS grants_patient ON grants (pseudonym);
CREATE TABLE IF NOT EXISTS grant_categories (
    grant_id TEXT NOT NULL REFERENCES grants(grant_id) ON DELETE CASCADE, category TEXT NOT NULL,
    PRIMARY KEY (grant_id, category));
CREATE TABLE IF NOT EXISTS releases (
    release_id TEXT PRIMARY KEY, study_id TEXT NOT NULL REFERENCES studies(study_id),
    researcher_id TEXT NOT NULL, subjects INTEGER NOT NULL, envelopes INTEGER NOT NULL,
    created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS release_items (
    release_id TEXT NOT NULL REFERENCES releases(release_id), seq INTEGER NOT NULL,
    pseudonym TEXT NOT NULL, category TEXT NOT NULL, version INTEGER NOT NULL, blob TEXT NOT NULL,
    pack TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    PRIMARY KEY (release_id, seq));
CREATE TABLE IF NOT EXISTS patient_actors (
    actor_id TEXT PRIMARY KEY, pseudonym TEXT NOT NULL REFERENCES patients(pseudonym));
-- A patient's row is read with its actor id on every upload and consent: without this
-- index each read scanned the whole table.
CREATE INDEX IF NOT EXISTS patient_actors_patient ON patient_actors (pseudonym);
CREATE TABLE IF NOT EXISTS audit_salts (
    pseudonym TEXT PRIMARY KEY REFERENCES patients(pseudonym), salt BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS release_events (
    release_id TEXT NOT NULL, pseudonym TEXT NOT NULL, leaf INTEGER NOT NULL,
    PRIMARY KEY (release_id, pseudonym));
CREATE TABLE IF NOT EXISTS audit_index (
    leaf INTEGER PRIMARY KEY, kind TEXT NOT NULL, time INTEGER NOT NULL, actor TEXT NOT NULL,
    study TEXT, tag BLOB);
CREATE INDEX IF NOT EXISTS audit_index_tag ON audit_index (tag) WHERE tag IS NOT NULL;
-- A clinician's break-glass attempts in the last hour (the rate limit), without a scan.
CREATE INDEX IF NOT EXISTS audit_index_break_glass ON audit_index (actor, time)
    WHERE kind = 'break_glass';
CREATE TABLE IF NOT EXISTS audit_alert_reads (tag BLOB PRIMARY KEY, through INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending_revocations (
    proxy INTEGER NOT NULL, study_id TEXT NOT NULL, pseudonym TEXT NOT NULL,
    PRIMARY KEY (proxy, study_id, pseudonym));
CREATE TABLE IF NOT EXISTS emergency_orgs (
    organisation_id TEXT PRIMARY KEY, name TEXT NOT NULL, receiving_key BLOB NOT NULL,
    created_at INTEGER NOT NULL);
-- Each break-glass access, its event's leaf, and the board's review of it.
CREATE TABLE IF NOT EXISTS break_glass (
    access_id TEXT PRIMARY KEY, clinician_id TEXT NOT NULL, organisation_id TEXT NOT NULL,
    pseudonym TEXT NOT NULL REFERENCES patients(pseudonym), grant_id TEXT NOT NULL,
    reason TEXT NOT NULL, card INTEGER NOT NULL, created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL, leaf INTEGER NOT NULL, recent_uses INTEGER NOT NULL,
    flagged INTEGER NOT NULL, review_board TEXT, review_finding TEXT, review_note TEXT,
    reviewed_at INTEGER);
CREATE INDEX IF NOT EXISTS break_glass_clinician ON break_glass (clinician_id, created_at);
CREATE INDEX IF NOT EXISTS break_glass_patient ON break_glass (pseudonym);
CREATE TABLE IF NOT EXISTS query_budgets (sponsor TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS concept_relations (
    ancestor TEXT NOT NULL, descendant TEXT NOT NULL,
    PRIMARY KEY (ancestor, descendant)) WITHOUT ROWID;
-- Patients' erasures, by the digest of the patient's signed request: under way (step < 5,
-- resumed at start) or done (the receipts, for the patient to fetch again).
CREATE TABLE IF NOT EXISTS erasures (
    request_digest BLOB PRIMARY KEY, pseudonym TEXT NOT NULL, actor_id TEXT NOT NULL,
    verifying_key BLOB NOT NULL, request TEXT NOT NULL, step INTEGER NOT NULL,
    receipts TEXT NOT NULL DEFAULT '[]', deleted TEXT NOT NULL DEFAULT '{}', index_id INTEGER,
    started_at INTEGER NOT NULL, finished_at INTEGER);
CREATE INDEX IF NOT EXISTS erasures_patient ON erasures (pseudonym);
CREATE INDEX IF NOT EXISTS erasures_actor ON erasures (actor_id);
-- Packs that held an erased patient's blobs, to destroy once nothing points at them.
CREATE TABLE IF NOT EXISTS erasure_packs (pack TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS checkpoint_cosignatures (
    size INTEGER NOT NULL, time INTEGER NOT NULL, key_id TEXT NOT NULL, signature BLOB NOT NULL,
    PRIMARY KEY (size, time, key_id));
";

/// One log leaf as the side index of the access log keeps it, for filtering.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditIndexRow {
    pub leaf: u64,
    pub kind: String,
    pub time: i64,
    pub actor: String,
    pub study: Option<String>,
    pub tag: Option<[u8; 32]>,
}

/// A patient as enrolled.
#[derive(Debug, Clone)]
pub struct PatientRow {
    pub pseudonym: String,
    /// The actor id of the patient's own key, under which the patient may call in person.
    pub actor_id: String,
    pub verifying_key: Vec<u8>,
    pub enrolled_by: String,
    pub category_keys: BTreeMap<Category, Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct NewEnvelope {
    pub pseudonym: String,
    pub category: Category,
    /// Where the blob was stored; `None` when the content tag says it is unchanged.
    pub at: Option<BlobLocation>,
    pub content_tag: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct ProxyRow {
    pub proxy_id: String,
    pub encryption_key: Vec<u8>,
    pub verifying_key: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct GrantRow {
    pub grant_id: String,
    pub study_id: String,
    pub pseudonym: String,
    pub threshold: u32,
    pub expires_at: i64,
    pub signature: Vec<u8>,
    pub categories: Vec<Category>,
}

/// A patient's live grant to a study.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveGrant {
    pub pseudonym: String,
    pub grant_id: String,
    pub categories: Vec<Category>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseRow {
    pub release_id: String,
    pub study_id: String,
    pub researcher_id: String,
    pub subjects: u32,
    pub envelopes: u32,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseItemRow {
    pub seq: i64,
    pub pseudonym: String,
    pub category: Category,
    pub version: u32,
    pub at: BlobLocation,
}

fn category_col(s: String) -> DbResult<Category> {
    s.parse().map_err(|e: model::UnknownCategory| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

impl Db {
    pub fn open(path: &Path) -> DbResult<Db> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let existing: i64 = conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            [],
            |r| r.get(0),
        )?;
        if existing > 0 {
            let version: Option<i64> = conn
                .query_row(
                    "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'schema'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            if version != Some(SCHEMA_VERSION) {
                return Err(rusqlite::Error::InvalidParameterName(format!(
                    "this data directory has metadata schema {} but this broker uses schema {SCHEMA_VERSION} \
                     (studies now carry a cohort definition, index versions a number in the cohort engine, grants may name an emergency organisation); \
                     nothing was changed: start a new data directory",
                    version.map_or("1".to_string(), |v| v.to_string())
                )));
            }
        }
        conn.execute_batch(SCHEMA)?;
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?1)",
            [SCHEMA_VERSION.to_string()],
        )?;
        Ok(Db { conn })
    }

    /// A 32-byte secret of the broker's own, made on first use (per-study pseudonyms).
    pub fn secret(&self, key: &str) -> DbResult<[u8; 32]> {
        let existing: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?;
        if let Some(v) = existing.filter(|v| v.len() == 32) {
            return Ok(v.try_into().expect("checked length"));
        }
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            params![key, secret.as_slice()],
        )?;
        Ok(secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_of_another_schema_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        Db::open(&path).unwrap().secret("k").unwrap();
        Db::open(&path).expect("the same schema opens again");
        let conn = Connection::open(&path).unwrap();
        conn.execute("DELETE FROM meta WHERE key = 'schema'", [])
            .unwrap();
        drop(conn);
        let err = Db::open(&path).err().expect("an older schema is refused");
        assert!(
            err.to_string().contains("start a new data directory"),
            "{err}"
        );
        let conn = Connection::open(&path).unwrap();
        let left: i64 = conn
            .query_row("SELECT COUNT(*) FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(left, 0, "nothing was changed");
    }
}
