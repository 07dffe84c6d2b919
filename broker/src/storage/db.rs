//! The broker's metadata store: one SQLite file (`broker.db`) in WAL mode with
//! `synchronous=FULL`, so a committed write survives a crash.
//!
//! It holds actors, patients and their public keys, envelope versions (pointing at blob
//! names), the searchable index (apart from envelopes), studies, grants and releases.
//! No secret key, record plaintext, name or address is ever written here.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use cohort_query::{CodedEvent, PatientIndex, Person};
use pre_kms::Category;
use rusqlite::{Connection, OptionalExtension, params};

use consent_policy::ConsentPolicy;

use crate::consent::SignedPolicy;
use crate::role::{Actor, Role};
use crate::storage::blobs::BlobLocation;
use crate::study::{Study, StudyProposal, StudyStatus};

pub type DbResult<T> = Result<T, rusqlite::Error>;

pub struct Db {
    conn: Connection,
}

/// The metadata schema this broker reads and writes.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
PRAGMA journal_mode=WAL;
PRAGMA synchronous=FULL;
PRAGMA foreign_keys=ON;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS actors (
    actor_id TEXT PRIMARY KEY, role TEXT NOT NULL, name TEXT NOT NULL,
    organisation TEXT NOT NULL, verifying_key BLOB NOT NULL, created_at INTEGER NOT NULL);
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
CREATE TABLE IF NOT EXISTS index_person (
    pseudonym TEXT PRIMARY KEY REFERENCES patients(pseudonym), birth_year INTEGER, sex TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS index_event (
    pseudonym TEXT NOT NULL REFERENCES patients(pseudonym), kind TEXT NOT NULL,
    system TEXT NOT NULL, code TEXT NOT NULL, date TEXT NOT NULL, value REAL, unit TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS index_event_patient ON index_event (pseudonym);
CREATE INDEX IF NOT EXISTS index_event_code ON index_event (kind, code);
CREATE TABLE IF NOT EXISTS studies (
    study_id TEXT PRIMARY KEY, sponsor_id TEXT NOT NULL, proposal TEXT NOT NULL,
    status TEXT NOT NULL, board_id TEXT NOT NULL DEFAULT '', board_signature BLOB NOT NULL DEFAULT x'',
    reason TEXT NOT NULL DEFAULT '', proposed_at INTEGER NOT NULL, decided_at INTEGER NOT NULL DEFAULT 0,
    overrides_abstain INTEGER NOT NULL DEFAULT 0, sponsor_organisation TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS consents (
    pseudonym TEXT NOT NULL REFERENCES patients(pseudonym), version INTEGER NOT NULL,
    policy BLOB NOT NULL, signature BLOB NOT NULL, policy_hash TEXT NOT NULL,
    issued_at INTEGER NOT NULL, set_at INTEGER NOT NULL, PRIMARY KEY (pseudonym, version));
CREATE TABLE IF NOT EXISTS grants (
    grant_id TEXT PRIMARY KEY, study_id TEXT NOT NULL REFERENCES studies(study_id),
    pseudonym TEXT NOT NULL REFERENCES patients(pseudonym), threshold INTEGER NOT NULL,
    expires_at INTEGER NOT NULL, signature BLOB NOT NULL, created_at INTEGER NOT NULL,
    UNIQUE (study_id, pseudonym));
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
CREATE TABLE IF NOT EXISTS audit_salts (
    pseudonym TEXT PRIMARY KEY REFERENCES patients(pseudonym), salt BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS release_events (
    release_id TEXT NOT NULL, pseudonym TEXT NOT NULL, leaf INTEGER NOT NULL,
    PRIMARY KEY (release_id, pseudonym));
CREATE TABLE IF NOT EXISTS audit_index (
    leaf INTEGER PRIMARY KEY, kind TEXT NOT NULL, time INTEGER NOT NULL, actor TEXT NOT NULL,
    study TEXT, tag BLOB);
CREATE INDEX IF NOT EXISTS audit_index_tag ON audit_index (tag) WHERE tag IS NOT NULL;
CREATE TABLE IF NOT EXISTS audit_alert_reads (tag BLOB PRIMARY KEY, through INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending_revocations (
    proxy INTEGER NOT NULL, study_id TEXT NOT NULL, pseudonym TEXT NOT NULL,
    PRIMARY KEY (proxy, study_id, pseudonym));
CREATE TABLE IF NOT EXISTS query_budgets (sponsor TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS concept_relations (
    ancestor TEXT NOT NULL, descendant TEXT NOT NULL,
    PRIMARY KEY (ancestor, descendant)) WITHOUT ROWID;
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

/// Which leaves of the access log a board asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub study: Option<String>,
    pub actor: Option<String>,
    pub kinds: Vec<String>,
    pub from_leaf: u64,
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

#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    pub pseudonym: String,
    pub category: Category,
    pub version: u32,
    pub blob: String,
    pub unchanged: bool,
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
    s.parse().map_err(|e: pre_kms::category::UnknownCategory| {
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
                     (studies now carry a DUO research purpose, patients signed consent policies); \
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

    // ------------------------------------------------------------ actors

    pub fn insert_actor(&self, actor: &Actor, now: i64) -> DbResult<bool> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO actors (actor_id, role, name, organisation, verifying_key, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![actor.actor_id, actor.role.as_str(), actor.name, actor.organisation, actor.verifying_key, now],
        )?;
        Ok(n == 1)
    }

    pub fn actor(&self, actor_id: &str) -> DbResult<Option<Actor>> {
        self.conn
            .query_row(
                "SELECT actor_id, role, name, organisation, verifying_key FROM actors WHERE actor_id = ?1",
                [actor_id],
                actor_row,
            )
            .optional()
    }

    pub fn actors(&self) -> DbResult<Vec<Actor>> {
        let mut stmt = self
            .conn
            .prepare("SELECT actor_id, role, name, organisation, verifying_key FROM actors ORDER BY created_at, actor_id")?;
        stmt.query_map([], actor_row)?.collect()
    }

    // ------------------------------------------------------------ proxies

    pub fn proxies(&self) -> DbResult<Vec<ProxyRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT proxy_id, encryption_key, verifying_key FROM proxies ORDER BY idx")?;
        stmt.query_map([], |r| {
            Ok(ProxyRow {
                proxy_id: r.get(0)?,
                encryption_key: r.get(1)?,
                verifying_key: r.get(2)?,
            })
        })?
        .collect()
    }

    pub fn set_proxies(&mut self, proxies: &[ProxyRow]) -> DbResult<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM proxies", [])?;
        for (i, p) in proxies.iter().enumerate() {
            tx.execute(
                "INSERT INTO proxies (idx, proxy_id, encryption_key, verifying_key) VALUES (?1, ?2, ?3, ?4)",
                params![i as i64, p.proxy_id, p.encryption_key, p.verifying_key],
            )?;
        }
        tx.commit()
    }

    // ------------------------------------------------------------ patients and records

    /// Enrolls new patients in one transaction.
    pub fn enroll_all(&mut self, patients: &[PatientRow], now: i64) -> DbResult<()> {
        let tx = self.conn.transaction()?;
        {
            let mut patient = tx.prepare_cached(
                "INSERT OR IGNORE INTO patients (pseudonym, verifying_key, enrolled_by, created_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut key = tx.prepare_cached(
                "INSERT OR IGNORE INTO patient_keys (pseudonym, category, public_key) VALUES (?1, ?2, ?3)",
            )?;
            let mut actor = tx.prepare_cached(
                "INSERT OR IGNORE INTO patient_actors (actor_id, pseudonym) VALUES (?1, ?2)",
            )?;
            let mut salt = tx.prepare_cached(
                "INSERT OR IGNORE INTO audit_salts (pseudonym, salt) VALUES (?1, ?2)",
            )?;
            for p in patients {
                patient.execute(params![p.pseudonym, p.verifying_key, p.enrolled_by, now])?;
                actor.execute(params![p.actor_id, p.pseudonym])?;
                let fresh: [u8; 32] = rand::random();
                salt.execute(params![p.pseudonym, fresh.as_slice()])?;
                for (c, k) in &p.category_keys {
                    key.execute(params![p.pseudonym, c.label(), k])?;
                }
            }
        }
        tx.commit()
    }

    pub fn patient(&self, pseudonym: &str) -> DbResult<Option<PatientRow>> {
        let row: Option<(Vec<u8>, String, Option<String>)> = self
            .conn
            .query_row(
                "SELECT p.verifying_key, p.enrolled_by, a.actor_id FROM patients p
                 LEFT JOIN patient_actors a ON a.pseudonym = p.pseudonym WHERE p.pseudonym = ?1",
                [pseudonym],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((verifying_key, enrolled_by, actor_id)) = row else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare_cached("SELECT category, public_key FROM patient_keys WHERE pseudonym = ?1")?;
        let category_keys = stmt
            .query_map([pseudonym], |r| Ok((category_col(r.get(0)?)?, r.get(1)?)))?
            .collect::<DbResult<BTreeMap<_, _>>>()?;
        Ok(Some(PatientRow {
            pseudonym: pseudonym.to_owned(),
            actor_id: actor_id.unwrap_or_default(),
            verifying_key,
            enrolled_by,
            category_keys,
        }))
    }

    /// Records an upload in one transaction: its new envelope versions and the index
    /// rows of each patient, which replace the previous ones.
    pub fn store_upload(
        &mut self,
        envelopes: &[NewEnvelope],
        index: &[(String, PatientIndex)],
        now: i64,
    ) -> DbResult<Vec<Receipt>> {
        let tx = self.conn.transaction()?;
        let receipts = add_envelopes(&tx, envelopes, now)?;
        put_index(&tx, index)?;
        tx.commit()?;
        Ok(receipts)
    }

    /// The content tag of the latest version of a patient's category, if any.
    pub fn latest_tag(&self, pseudonym: &str, category: Category) -> DbResult<Option<Vec<u8>>> {
        self.conn
            .prepare_cached(
                "SELECT content_tag FROM envelopes WHERE pseudonym = ?1 AND category = ?2 ORDER BY version DESC LIMIT 1",
            )?
            .query_row(params![pseudonym, category.label()], |r| r.get(0))
            .optional()
    }

    pub fn index(&self, pseudonym: &str) -> DbResult<PatientIndex> {
        let person = self
            .conn
            .prepare_cached("SELECT birth_year, sex FROM index_person WHERE pseudonym = ?1")?
            .query_row([pseudonym], |r| {
                Ok(Person {
                    birth_year: r.get(0)?,
                    sex: r.get(1)?,
                })
            })
            .optional()?
            .unwrap_or_default();
        let mut index = PatientIndex {
            person,
            ..Default::default()
        };
        let mut stmt = self
            .conn
            .prepare_cached("SELECT kind, system, code, date, value, unit FROM index_event WHERE pseudonym = ?1 ORDER BY rowid")?;
        let mut rows = stmt.query([pseudonym])?;
        while let Some(r) = rows.next()? {
            let kind: String = r.get(0)?;
            let e = CodedEvent {
                system: r.get(1)?,
                code: r.get(2)?,
                date: r.get(3)?,
                value: r.get(4)?,
                unit: r.get(5)?,
            };
            match kind.as_str() {
                "condition" => index.conditions.push(e),
                "measurement" => index.measurements.push(e),
                "drug" => index.drugs.push(e),
                _ => index.procedures.push(e),
            }
        }
        Ok(index)
    }

    /// The latest version of each of a patient's envelopes in the given categories.
    pub fn latest_envelopes(
        &self,
        pseudonym: &str,
        categories: &[Category],
    ) -> DbResult<Vec<(Category, u32, BlobLocation)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT version, blob, pack, offset, length FROM envelopes WHERE pseudonym = ?1 AND category = ?2
             ORDER BY version DESC LIMIT 1",
        )?;
        let mut out = Vec::new();
        for c in categories {
            let row = stmt
                .query_row(params![pseudonym, c.label()], |r| {
                    Ok((
                        r.get(0)?,
                        BlobLocation {
                            name: r.get(1)?,
                            pack: r.get(2)?,
                            offset: r.get::<_, i64>(3)? as u64,
                            length: r.get::<_, i64>(4)? as u64,
                        },
                    ))
                })
                .optional()?;
            if let Some((v, at)) = row {
                out.push((*c, v, at));
            }
        }
        Ok(out)
    }

    pub fn count(&self, table: &str) -> DbResult<i64> {
        debug_assert!(table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        self.conn
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
    }

    // ------------------------------------------------------------ studies

    pub fn insert_study(&self, s: &Study) -> DbResult<()> {
        self.conn.execute(
            "INSERT INTO studies (study_id, sponsor_id, proposal, status, proposed_at, sponsor_organisation)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                s.study_id,
                s.sponsor_id,
                serde_json::to_string(&s.proposal).expect("proposal serializes"),
                s.status.as_str(),
                s.proposed_at,
                s.sponsor_organisation
            ],
        )?;
        Ok(())
    }

    pub fn decide_study(&self, s: &Study) -> DbResult<()> {
        self.conn.execute(
            "UPDATE studies SET status = ?2, board_id = ?3, board_signature = ?4, reason = ?5, decided_at = ?6,
             overrides_abstain = ?7 WHERE study_id = ?1",
            params![s.study_id, s.status.as_str(), s.board_id, s.board_signature, s.reason, s.decided_at, s.overrides_abstain],
        )?;
        Ok(())
    }

    pub fn study(&self, study_id: &str) -> DbResult<Option<Study>> {
        self.conn
            .query_row(
                &format!("{STUDY_SELECT} WHERE study_id = ?1"),
                [study_id],
                study_row,
            )
            .optional()
    }

    pub fn studies(&self) -> DbResult<Vec<Study>> {
        let mut stmt = self
            .conn
            .prepare(&format!("{STUDY_SELECT} ORDER BY proposed_at, study_id"))?;
        stmt.query_map([], study_row)?.collect()
    }

    // ------------------------------------------------------------ grants

    /// Stores grants in one transaction, each replacing an earlier grant of the same
    /// patient to the same study.
    pub fn put_grants(&mut self, grants: &[GrantRow], now: i64) -> DbResult<()> {
        let tx = self.conn.transaction()?;
        {
            let mut del =
                tx.prepare_cached("DELETE FROM grants WHERE study_id = ?1 AND pseudonym = ?2")?;
            let mut grant = tx.prepare_cached(
                "INSERT INTO grants (grant_id, study_id, pseudonym, threshold, expires_at, signature, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut cat = tx.prepare_cached(
                "INSERT INTO grant_categories (grant_id, category) VALUES (?1, ?2)",
            )?;
            for g in grants {
                del.execute(params![g.study_id, g.pseudonym])?;
                grant.execute(params![
                    g.grant_id,
                    g.study_id,
                    g.pseudonym,
                    g.threshold,
                    g.expires_at,
                    g.signature,
                    now
                ])?;
                for c in &g.categories {
                    cat.execute(params![g.grant_id, c.label()])?;
                }
            }
        }
        tx.commit()
    }

    /// Deletes these (study, pseudonym) grants and queues their destruction at each of
    /// `proxies` proxies, in one transaction. Returns the grants that existed.
    pub fn withdraw_grants(
        &mut self,
        grants: &[(String, String)],
        proxies: usize,
    ) -> DbResult<Vec<(String, String, String)>> {
        let tx = self.conn.transaction()?;
        let mut existed = Vec::new();
        {
            let mut find = tx.prepare_cached(
                "SELECT grant_id FROM grants WHERE study_id = ?1 AND pseudonym = ?2",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM grants WHERE grant_id = ?1")?;
            let mut queue = tx.prepare_cached(
                "INSERT OR IGNORE INTO pending_revocations (proxy, study_id, pseudonym) VALUES (?1, ?2, ?3)",
            )?;
            for (study, pseudonym) in grants {
                let id: Option<String> = find
                    .query_row(params![study, pseudonym], |r| r.get(0))
                    .optional()?;
                if let Some(id) = id {
                    del.execute([&id])?;
                    existed.push((study.clone(), pseudonym.clone(), id));
                }
                for p in 0..proxies {
                    queue.execute(params![p as i64, study, pseudonym])?;
                }
            }
        }
        tx.commit()?;
        Ok(existed)
    }

    /// Revocations not yet confirmed by a proxy, per proxy.
    pub fn pending_revocations(&self) -> DbResult<BTreeMap<usize, Vec<(String, String)>>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT proxy, study_id, pseudonym FROM pending_revocations ORDER BY proxy",
        )?;
        let mut out: BTreeMap<usize, Vec<(String, String)>> = BTreeMap::new();
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as usize, r.get(1)?, r.get(2)?))
        })?;
        for row in rows {
            let (p, s, ps) = row?;
            out.entry(p).or_default().push((s, ps));
        }
        Ok(out)
    }

    pub fn confirm_revocations(&self, proxy: usize, grants: &[(String, String)]) -> DbResult<()> {
        let mut stmt = self.conn.prepare_cached(
            "DELETE FROM pending_revocations WHERE proxy = ?1 AND study_id = ?2 AND pseudonym = ?3",
        )?;
        for (s, p) in grants {
            stmt.execute(params![proxy as i64, s, p])?;
        }
        Ok(())
    }

    /// Patients with an unexpired grant to the study, with the granted categories.
    pub fn active_grants(&self, study_id: &str, now: i64) -> DbResult<Vec<ActiveGrant>> {
        let mut stmt = self.conn.prepare(
            "SELECT g.pseudonym, g.grant_id, c.category FROM grants g JOIN grant_categories c ON c.grant_id = g.grant_id
             WHERE g.study_id = ?1 AND g.expires_at > ?2 ORDER BY g.pseudonym, c.category",
        )?;
        let mut out: Vec<ActiveGrant> = Vec::new();
        let mut rows = stmt.query(params![study_id, now])?;
        while let Some(r) = rows.next()? {
            let p: String = r.get(0)?;
            let c = category_col(r.get(2)?)?;
            match out.last_mut() {
                Some(last) if last.pseudonym == p => last.categories.push(c),
                _ => out.push(ActiveGrant {
                    pseudonym: p,
                    grant_id: r.get(1)?,
                    categories: vec![c],
                }),
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------ releases

    /// Stores a release, its items and the log leaf of each patient's release event.
    pub fn insert_release(
        &mut self,
        r: &ReleaseRow,
        items: &[ReleaseItemRow],
        events: &[(String, u64)],
    ) -> DbResult<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO release_events (release_id, pseudonym, leaf) VALUES (?1, ?2, ?3)",
            )?;
            for (pseudonym, leaf) in events {
                stmt.execute(params![r.release_id, pseudonym, *leaf as i64])?;
            }
        }
        tx.execute(
            "INSERT INTO releases (release_id, study_id, researcher_id, subjects, envelopes, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![r.release_id, r.study_id, r.researcher_id, r.subjects, r.envelopes, r.created_at],
        )?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO release_items (release_id, seq, pseudonym, category, version, blob, pack, offset, length)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for i in items {
                stmt.execute(params![
                    r.release_id,
                    i.seq,
                    i.pseudonym,
                    i.category.label(),
                    i.version,
                    i.at.name,
                    i.at.pack,
                    i.at.offset as i64,
                    i.at.length as i64
                ])?;
            }
        }
        tx.commit()
    }

    pub fn release(&self, release_id: &str) -> DbResult<Option<ReleaseRow>> {
        self.conn
            .query_row(
                "SELECT release_id, study_id, researcher_id, subjects, envelopes, created_at FROM releases WHERE release_id = ?1",
                [release_id],
                |r| {
                    Ok(ReleaseRow {
                        release_id: r.get(0)?,
                        study_id: r.get(1)?,
                        researcher_id: r.get(2)?,
                        subjects: r.get(3)?,
                        envelopes: r.get(4)?,
                        created_at: r.get(5)?,
                    })
                },
            )
            .optional()
    }

    /// A page of a release's items after `after_seq`.
    pub fn release_items(
        &self,
        release_id: &str,
        after_seq: i64,
        limit: usize,
    ) -> DbResult<Vec<ReleaseItemRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, pseudonym, category, version, blob, pack, offset, length FROM release_items
             WHERE release_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        stmt.query_map(params![release_id, after_seq, limit as i64], |r| {
            Ok(ReleaseItemRow {
                seq: r.get(0)?,
                pseudonym: r.get(1)?,
                category: category_col(r.get(2)?)?,
                version: r.get(3)?,
                at: BlobLocation {
                    name: r.get(4)?,
                    pack: r.get(5)?,
                    offset: r.get::<_, i64>(6)? as u64,
                    length: r.get::<_, i64>(7)? as u64,
                },
            })
        })?
        .collect()
    }
}

impl Db {
    // ------------------------------------------------------------ feasibility

    /// Every enrolled patient's pseudonym, in a fixed order.
    pub fn pseudonyms(&self) -> DbResult<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT pseudonym FROM patients ORDER BY pseudonym")?;
        stmt.query_map([], |r| r.get(0))?.collect()
    }

    /// A sponsor's stored query budget (JSON).
    pub fn query_budget(&self, sponsor: &str) -> DbResult<Option<String>> {
        self.conn
            .query_row(
                "SELECT state FROM query_budgets WHERE sponsor = ?1",
                [sponsor],
                |r| r.get(0),
            )
            .optional()
    }

    pub fn put_query_budget(&self, sponsor: &str, state: &str) -> DbResult<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO query_budgets (sponsor, state) VALUES (?1, ?2)",
            params![sponsor, state],
        )?;
        Ok(())
    }

    /// Adds `(ancestor, descendant)` code relations in one transaction; returns how many
    /// were new and how many are held in all.
    pub fn put_concept_relations(
        &mut self,
        relations: &[(String, String)],
    ) -> DbResult<(usize, u64)> {
        let tx = self.conn.transaction()?;
        let mut added = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO concept_relations (ancestor, descendant) VALUES (?1, ?2)",
            )?;
            for (a, d) in relations {
                added += insert.execute(params![a, d])?;
            }
        }
        let total: i64 =
            tx.query_row("SELECT COUNT(*) FROM concept_relations", [], |r| r.get(0))?;
        tx.commit()?;
        Ok((added, total as u64))
    }

    /// Every `(ancestor, descendant)` code relation.
    pub fn concept_relations(&self) -> DbResult<Vec<(String, String)>> {
        let mut q = self
            .conn
            .prepare("SELECT ancestor, descendant FROM concept_relations")?;
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
    }
}

impl Db {
    // ------------------------------------------------------------ consents

    /// Stores new policy versions (the caller has checked them), all or none.
    pub fn insert_consents(&mut self, versions: &[(String, SignedPolicy)]) -> DbResult<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO consents (pseudonym, version, policy, signature, policy_hash, issued_at, set_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for (pseudonym, v) in versions {
                let p = &v.policy;
                stmt.execute(params![
                    pseudonym,
                    p.version(),
                    p.canonical_bytes(),
                    v.signature,
                    p.policy_hash().to_hex(),
                    p.issued_at(),
                    v.set_at
                ])?;
            }
        }
        tx.commit()
    }

    /// Every stored policy version of a patient, oldest first.
    pub fn consents(&self, pseudonym: &str) -> DbResult<Vec<SignedPolicy>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT policy, signature, set_at FROM consents WHERE pseudonym = ?1 ORDER BY version",
        )?;
        stmt.query_map([pseudonym], |r| {
            let bytes: Vec<u8> = r.get(0)?;
            let policy = ConsentPolicy::from_json(&bytes).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Blob,
                    Box::new(e),
                )
            })?;
            Ok(SignedPolicy {
                policy,
                signature: r.get(1)?,
                set_at: r.get(2)?,
            })
        })?
        .collect()
    }

    /// A patient's grants: (study id, categories, expiry).
    pub fn patient_grants(&self, pseudonym: &str) -> DbResult<Vec<(String, Vec<Category>, i64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT g.study_id, c.category, g.expires_at FROM grants g JOIN grant_categories c ON c.grant_id = g.grant_id
             WHERE g.pseudonym = ?1 ORDER BY g.study_id",
        )?;
        let mut out: Vec<(String, Vec<Category>, i64)> = Vec::new();
        let mut rows = stmt.query([pseudonym])?;
        while let Some(r) = rows.next()? {
            let study: String = r.get(0)?;
            let c = category_col(r.get(1)?)?;
            match out.last_mut() {
                Some((s, cats, _)) if *s == study => cats.push(c),
                _ => out.push((study, vec![c], r.get(2)?)),
            }
        }
        Ok(out)
    }
}

impl Db {
    // ------------------------------------------------------------ access log

    /// The log leaf of each patient's event in a release.
    pub fn release_event_leaves(
        &self,
        release_id: &str,
        pseudonyms: &[&str],
    ) -> DbResult<HashMap<String, u64>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT leaf FROM release_events WHERE release_id = ?1 AND pseudonym = ?2",
        )?;
        let mut out = HashMap::new();
        for p in pseudonyms {
            if let Some(leaf) = stmt
                .query_row(params![release_id, p], |r| r.get::<_, i64>(0))
                .optional()?
            {
                out.insert((*p).to_owned(), leaf as u64);
            }
        }
        Ok(out)
    }

    /// The audit salt of each patient, made for patients enrolled before salts existed.
    pub fn audit_salts(&self, pseudonyms: &[&str]) -> DbResult<HashMap<String, [u8; 32]>> {
        let mut get = self
            .conn
            .prepare_cached("SELECT salt FROM audit_salts WHERE pseudonym = ?1")?;
        let mut put = self
            .conn
            .prepare_cached("INSERT INTO audit_salts (pseudonym, salt) VALUES (?1, ?2)")?;
        let mut out = HashMap::new();
        for p in pseudonyms {
            if out.contains_key(*p) {
                continue;
            }
            let salt: Option<Vec<u8>> = get.query_row([p], |r| r.get(0)).optional()?;
            let salt = match salt.and_then(|s| <[u8; 32]>::try_from(s).ok()) {
                Some(s) => s,
                None => {
                    let fresh: [u8; 32] = rand::random();
                    put.execute(params![p, fresh.as_slice()])?;
                    fresh
                }
            };
            out.insert((*p).to_owned(), salt);
        }
        Ok(out)
    }

    /// The patient (pseudonym) whose own key has `actor_id`, if enrolled.
    pub fn patient_by_actor(&self, actor_id: &str) -> DbResult<Option<(String, Vec<u8>)>> {
        self.conn
            .query_row(
                "SELECT p.pseudonym, p.verifying_key FROM patient_actors a JOIN patients p ON p.pseudonym = a.pseudonym
                 WHERE a.actor_id = ?1",
                [actor_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
    }

    /// Adds log leaves to the side index (idempotent).
    pub fn index_audit(&mut self, rows: &[AuditIndexRow]) -> DbResult<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO audit_index (leaf, kind, time, actor, study, tag) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for r in rows {
                stmt.execute(params![
                    r.leaf as i64,
                    r.kind,
                    r.time,
                    r.actor,
                    r.study,
                    r.tag.as_ref().map(|t| t.as_slice())
                ])?;
            }
        }
        tx.commit()
    }

    /// The number of leaves the side index covers (its highest leaf + 1).
    pub fn audit_indexed(&self) -> DbResult<u64> {
        let max: Option<i64> =
            self.conn
                .query_row("SELECT MAX(leaf) FROM audit_index", [], |r| r.get(0))?;
        Ok(max.map_or(0, |m| m as u64 + 1))
    }

    /// Leaves matching `filter`, oldest first, at most `limit`.
    pub fn audit_leaves(&self, filter: &AuditFilter, limit: usize) -> DbResult<Vec<u64>> {
        let mut sql = String::from("SELECT leaf FROM audit_index WHERE leaf >= ?1");
        let mut args: Vec<rusqlite::types::Value> = vec![(filter.from_leaf as i64).into()];
        let mut arg = |sql: &mut String, clause: &str, v: rusqlite::types::Value| {
            args.push(v);
            sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
        };
        if let Some(t) = filter.since {
            arg(&mut sql, " AND time >= ?", t.into());
        }
        if let Some(t) = filter.until {
            arg(&mut sql, " AND time <= ?", t.into());
        }
        if let Some(s) = &filter.study {
            arg(&mut sql, " AND study = ?", s.clone().into());
        }
        if let Some(a) = &filter.actor {
            arg(&mut sql, " AND actor = ?", a.clone().into());
        }
        if !filter.kinds.is_empty() {
            sql.push_str(" AND kind IN (");
            for (i, k) in filter.kinds.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                arg(&mut sql, "?", k.clone().into());
            }
            sql.push(')');
        }
        sql.push_str(&format!(" ORDER BY leaf LIMIT {limit}"));
        let mut stmt = self.conn.prepare(&sql)?;
        stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, i64>(0))?
            .map(|r| r.map(|l| l as u64))
            .collect()
    }

    /// Leaves about the patient with `tag`, of `kinds` (all if empty), after `after`.
    pub fn audit_leaves_about(
        &self,
        tag: &[u8; 32],
        kinds: &[&str],
        after: Option<u64>,
    ) -> DbResult<Vec<u64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT leaf, kind FROM audit_index WHERE tag = ?1 ORDER BY leaf")?;
        let rows = stmt.query_map([tag.as_slice()], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (leaf, kind) = row?;
            if after.is_none_or(|a| leaf > a)
                && (kinds.is_empty() || kinds.contains(&kind.as_str()))
            {
                out.push(leaf);
            }
        }
        Ok(out)
    }

    /// The last alert leaf a patient has read.
    pub fn alerts_read_through(&self, tag: &[u8; 32]) -> DbResult<Option<u64>> {
        self.conn
            .query_row(
                "SELECT through FROM audit_alert_reads WHERE tag = ?1",
                [tag.as_slice()],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|t| t.map(|t| t as u64))
    }

    pub fn mark_alerts_read(&self, tag: &[u8; 32], through: u64) -> DbResult<()> {
        self.conn.execute(
            "INSERT INTO audit_alert_reads (tag, through) VALUES (?1, ?2)
             ON CONFLICT (tag) DO UPDATE SET through = MAX(through, excluded.through)",
            params![tag.as_slice(), through as i64],
        )?;
        Ok(())
    }

    /// Stores a witness signature on a checkpoint.
    pub fn add_cosignature(
        &self,
        size: u64,
        time: i64,
        key_id: &str,
        signature: &[u8],
    ) -> DbResult<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO checkpoint_cosignatures (size, time, key_id, signature) VALUES (?1, ?2, ?3, ?4)",
            params![size as i64, time, key_id, signature],
        )?;
        Ok(())
    }

    /// Witness signatures on the checkpoint of `size` at `time`.
    pub fn cosignatures(&self, size: u64, time: i64) -> DbResult<Vec<(String, Vec<u8>)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key_id, signature FROM checkpoint_cosignatures WHERE size = ?1 AND time = ?2 ORDER BY key_id",
        )?;
        stmt.query_map(params![size as i64, time], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
    }
}

const STUDY_SELECT: &str = "SELECT study_id, sponsor_id, proposal, status, board_id, board_signature, reason, proposed_at, decided_at, overrides_abstain, sponsor_organisation FROM studies";

fn study_row(r: &rusqlite::Row<'_>) -> DbResult<Study> {
    let proposal: String = r.get(2)?;
    let proposal: StudyProposal = serde_json::from_str(&proposal).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let status: String = r.get(3)?;
    Ok(Study {
        study_id: r.get(0)?,
        sponsor_id: r.get(1)?,
        proposal,
        status: StudyStatus::parse(&status).unwrap_or(StudyStatus::Proposed),
        board_id: r.get(4)?,
        board_signature: r.get(5)?,
        reason: r.get(6)?,
        proposed_at: r.get(7)?,
        decided_at: r.get(8)?,
        overrides_abstain: r.get(9)?,
        sponsor_organisation: r.get(10)?,
    })
}

fn actor_row(r: &rusqlite::Row<'_>) -> DbResult<Actor> {
    let role: String = r.get(1)?;
    Ok(Actor {
        actor_id: r.get(0)?,
        role: role.parse::<Role>().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into())
        })?,
        name: r.get(2)?,
        organisation: r.get(3)?,
        verifying_key: r.get(4)?,
    })
}

/// New envelope versions; one whose content tag equals the latest version's is not
/// stored again.
fn add_envelopes(
    tx: &rusqlite::Transaction<'_>,
    envelopes: &[NewEnvelope],
    now: i64,
) -> DbResult<Vec<Receipt>> {
    let mut receipts = Vec::with_capacity(envelopes.len());
    {
        let mut latest = tx.prepare_cached(
                "SELECT version, blob, content_tag FROM envelopes WHERE pseudonym = ?1 AND category = ?2
                 ORDER BY version DESC LIMIT 1",
            )?;
        let mut insert = tx.prepare_cached(
                "INSERT INTO envelopes (pseudonym, category, version, blob, pack, offset, length, content_tag, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
        for e in envelopes {
            let prev: Option<(u32, String, Vec<u8>)> = latest
                .query_row(params![e.pseudonym, e.category.label()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let receipt = match (prev, &e.at) {
                (Some((version, blob, tag)), _) if tag == e.content_tag => Receipt {
                    pseudonym: e.pseudonym.clone(),
                    category: e.category,
                    version,
                    blob,
                    unchanged: true,
                },
                (prev, Some(at)) => {
                    let version = prev.map_or(1, |p| p.0 + 1);
                    insert.execute(params![
                        e.pseudonym,
                        e.category.label(),
                        version,
                        at.name,
                        at.pack,
                        at.offset as i64,
                        at.length as i64,
                        e.content_tag,
                        now
                    ])?;
                    Receipt {
                        pseudonym: e.pseudonym.clone(),
                        category: e.category,
                        version,
                        blob: at.name.clone(),
                        unchanged: false,
                    }
                }
                // The caller found the tag unchanged and wrote no blob, but the latest
                // version differs now: only possible if the caller did not hold the lock
                // between its check and this call. Refuse rather than record nothing.
                (_, None) => {
                    return Err(rusqlite::Error::InvalidParameterName(
                        "envelope without a blob whose content changed".into(),
                    ));
                }
            };
            receipts.push(receipt);
        }
    }
    Ok(receipts)
}

/// Replaces the index rows of each patient with the given snapshot.
fn put_index(tx: &rusqlite::Transaction<'_>, rows: &[(String, PatientIndex)]) -> DbResult<()> {
    {
        let mut del_person = tx.prepare_cached("DELETE FROM index_person WHERE pseudonym = ?1")?;
        let mut del_events = tx.prepare_cached("DELETE FROM index_event WHERE pseudonym = ?1")?;
        let mut person = tx.prepare_cached(
            "INSERT INTO index_person (pseudonym, birth_year, sex) VALUES (?1, ?2, ?3)",
        )?;
        let mut event = tx.prepare_cached(
                "INSERT INTO index_event (pseudonym, kind, system, code, date, value, unit) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
        for (pseudonym, index) in rows {
            del_person.execute([pseudonym])?;
            del_events.execute([pseudonym])?;
            person.execute(params![
                pseudonym,
                index.person.birth_year,
                index.person.sex
            ])?;
            for (kind, events) in [
                ("condition", &index.conditions),
                ("measurement", &index.measurements),
                ("drug", &index.drugs),
                ("procedure", &index.procedures),
            ] {
                for e in events {
                    event.execute(params![
                        pseudonym, kind, e.system, e.code, e.date, e.value, e.unit
                    ])?;
                }
            }
        }
    }
    Ok(())
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
