//! Patients, their keys, envelope versions and the searchable index.

use super::*;

impl Db {
    /// Enrolls new patients with their log salts (`salts[i]` is `patients[i]`'s) in one
    /// transaction, with their log events as intents.
    pub fn enroll_all(
        &mut self,
        patients: &[PatientRow],
        salts: &[[u8; 32]],
        now: i64,
        log_size: u64,
        events: &[audit_log::AuditEvent],
    ) -> DbResult<Vec<i64>> {
        self.with_intents(log_size, events, |tx| {
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
            for (p, s) in patients.iter().zip(salts) {
                patient.execute(params![p.pseudonym, p.verifying_key, p.enrolled_by, now])?;
                actor.execute(params![p.actor_id, p.pseudonym])?;
                salt.execute(params![p.pseudonym, s.as_slice()])?;
                for (c, k) in &p.category_keys {
                    key.execute(params![p.pseudonym, c.label(), k])?;
                }
            }
            Ok(())
        })
        .map(|(_, intents)| intents)
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

    /// Records an upload in one transaction: its new envelope versions, the index rows
    /// of each patient (a new version replacing the previous one, unless it holds the
    /// same), and the log events `describe` makes of the receipts, as intents
    /// ([`super::audit::add_intents`]).
    pub fn store_upload(
        &mut self,
        envelopes: &[NewEnvelope],
        index: &[(String, PatientIndex)],
        now: i64,
        log_size: u64,
        describe: impl FnOnce(&[EnvelopeReceipt]) -> Vec<audit_log::AuditEvent>,
    ) -> DbResult<Stored> {
        let tx = self.conn.transaction()?;
        let receipts = add_envelopes(&tx, envelopes, now)?;
        let changes = put_index(&tx, index)?;
        let events = describe(&receipts);
        let intents = super::audit::add_intents(&tx, log_size, &events)?;
        tx.commit()?;
        Ok(Stored {
            receipts,
            events,
            intents,
            changes,
        })
    }

    /// Whether a version of a patient's category already holds this content, and
    /// whether that version is the latest.
    pub fn stored_content(
        &self,
        pseudonym: &str,
        category: Category,
        content_tag: &[u8],
    ) -> DbResult<StoredContent> {
        stored_content(&self.conn, pseudonym, category, content_tag)
    }

    /// A patient's current index (empty if none was uploaded).
    pub fn index(&self, pseudonym: &str) -> DbResult<PatientIndex> {
        let current = self
            .conn
            .prepare_cached(
                "SELECT index_id, birth_year, sex FROM index_person WHERE pseudonym = ?1",
            )?
            .query_row([pseudonym], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    Person {
                        birth_year: r.get(1)?,
                        sex: r.get(2)?,
                    },
                ))
            })
            .optional()?;
        let Some((id, person)) = current else {
            return Ok(PatientIndex::default());
        };
        let mut index = PatientIndex {
            person,
            ..Default::default()
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT kind, system, code, date, value, unit FROM index_event WHERE index_id = ?1 ORDER BY rowid",
        )?;
        let mut rows = stmt.query([id])?;
        while let Some(r) = rows.next()? {
            push_event(&mut index, r, 0)?;
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT start_date, end_date FROM index_period WHERE index_id = ?1 ORDER BY rowid",
        )?;
        let mut rows = stmt.query([id])?;
        while let Some(r) = rows.next()? {
            push_period(&mut index, r, 0)?;
        }
        Ok(index)
    }

    /// Every patient's current index, in the order of their numbers: `f(index_id,
    /// pseudonym, index)`. One pass over each table in order, for building the whole
    /// cohort index.
    pub fn for_each_index<E: From<rusqlite::Error>>(
        &self,
        mut f: impl FnMut(i64, String, PatientIndex) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut persons = self.conn.prepare(
            "SELECT index_id, pseudonym, birth_year, sex FROM index_person ORDER BY index_id",
        )?;
        let mut events = self.conn.prepare(
            "SELECT index_id, kind, system, code, date, value, unit FROM index_event ORDER BY index_id, rowid",
        )?;
        let mut periods = self.conn.prepare(
            "SELECT index_id, start_date, end_date FROM index_period ORDER BY index_id, rowid",
        )?;
        let mut persons = persons.query([])?;
        let mut events = events.query([])?;
        let mut event = events.next()?;
        let mut periods = periods.query([])?;
        let mut period = periods.next()?;
        while let Some(p) = persons.next()? {
            let id: i64 = p.get(0)?;
            let mut index = PatientIndex {
                person: Person {
                    birth_year: p.get(2)?,
                    sex: p.get(3)?,
                },
                ..Default::default()
            };
            // Rows of replaced versions are deleted with them; any left are skipped.
            while let Some(r) = event {
                let of: i64 = r.get(0)?;
                if of > id {
                    break;
                }
                if of == id {
                    push_event(&mut index, r, 1)?;
                }
                event = events.next()?;
            }
            while let Some(r) = period {
                let of: i64 = r.get(0)?;
                if of > id {
                    break;
                }
                if of == id {
                    push_period(&mut index, r, 1)?;
                }
                period = periods.next()?;
            }
            f(id, p.get(1)?, index)?;
        }
        Ok(())
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
}

/// What the store holds of one upload's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredContent {
    /// No version holds it: it becomes the next version.
    New,
    /// The latest version holds it already: a re-upload, nothing to store.
    Latest(u32),
    /// An older version holds it: storing it again would roll the record back (a replayed
    /// or stale upload), so nothing is stored.
    Older(u32),
}

fn stored_content(
    conn: &Connection,
    pseudonym: &str,
    category: Category,
    content_tag: &[u8],
) -> DbResult<StoredContent> {
    let row: Option<(u32, u32)> = conn
        .prepare_cached(
            "SELECT e.version, (SELECT MAX(version) FROM envelopes m WHERE m.pseudonym = e.pseudonym AND m.category = e.category)
             FROM envelopes e WHERE e.pseudonym = ?1 AND e.category = ?2 AND e.content_tag = ?3
             ORDER BY e.version DESC LIMIT 1",
        )?
        .query_row(params![pseudonym, category.label(), content_tag], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    Ok(match row {
        None => StoredContent::New,
        Some((v, latest)) if v == latest => StoredContent::Latest(v),
        Some((v, _)) => StoredContent::Older(v),
    })
}

/// New envelope versions. Content that a stored version already holds (the latest or an
/// older one) is not stored again, so an upload replayed or re-sent late never rolls a
/// correction back.
fn add_envelopes(
    tx: &rusqlite::Transaction<'_>,
    envelopes: &[NewEnvelope],
    now: i64,
) -> DbResult<Vec<EnvelopeReceipt>> {
    let mut receipts = Vec::with_capacity(envelopes.len());
    {
        let mut latest = tx.prepare_cached(
            "SELECT MAX(version) FROM envelopes WHERE pseudonym = ?1 AND category = ?2",
        )?;
        let mut blob_of = tx.prepare_cached(
            "SELECT blob FROM envelopes WHERE pseudonym = ?1 AND category = ?2 AND version = ?3",
        )?;
        let mut insert = tx.prepare_cached(
                "INSERT INTO envelopes (pseudonym, category, version, blob, pack, offset, length, content_tag, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
        for e in envelopes {
            let stored = stored_content(tx, &e.pseudonym, e.category, &e.content_tag)?;
            let receipt = match (stored, &e.at) {
                (StoredContent::Latest(version) | StoredContent::Older(version), _) => {
                    EnvelopeReceipt {
                        pseudonym: e.pseudonym.clone(),
                        category: e.category,
                        version,
                        blob: blob_of
                            .query_row(params![e.pseudonym, e.category.label(), version], |r| {
                                r.get(0)
                            })?,
                        unchanged: true,
                    }
                }
                (StoredContent::New, Some(at)) => {
                    let prev: Option<u32> =
                        latest.query_row(params![e.pseudonym, e.category.label()], |r| r.get(0))?;
                    let version = prev.map_or(1, |v| v + 1);
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
                    EnvelopeReceipt {
                        pseudonym: e.pseudonym.clone(),
                        category: e.category,
                        version,
                        blob: at.name.clone(),
                        unchanged: false,
                    }
                }
                // The caller found the content stored and wrote no blob, but it is not
                // stored now: only possible if the caller did not hold the lock between
                // its check and this call. Refuse rather than record nothing.
                (StoredContent::New, None) => {
                    return Err(rusqlite::Error::InvalidParameterName(
                        "envelope without a blob whose content is not stored".into(),
                    ));
                }
            };
            receipts.push(receipt);
        }
    }
    Ok(receipts)
}

/// Replaces the index rows of each patient with the given snapshot.
/// What [`Db::store_upload`] stored.
pub struct Stored {
    pub receipts: Vec<EnvelopeReceipt>,
    pub events: Vec<audit_log::AuditEvent>,
    pub intents: Vec<i64>,
    pub changes: Vec<IndexChange>,
}

/// A patient's index as one upload changed it: the new version's number in the cohort
/// engine, and the number of the version it replaces.
#[derive(Debug, Clone)]
pub struct IndexChange {
    pub pseudonym: String,
    pub replaced: Option<i64>,
    pub index_id: i64,
    pub index: PatientIndex,
}

/// Adds an `index_event` row (its columns `kind, system, code, date, value, unit` from
/// column `first` on) to `index`.
fn push_event(index: &mut PatientIndex, r: &rusqlite::Row<'_>, first: usize) -> DbResult<()> {
    let kind: String = r.get(first)?;
    let e = CodedEvent {
        system: r.get(first + 1)?,
        code: r.get(first + 2)?,
        date: r.get(first + 3)?,
        value: r.get(first + 4)?,
        unit: r.get(first + 5)?,
    };
    match kind.as_str() {
        "condition" => index.conditions.push(e),
        "measurement" => index.measurements.push(e),
        "drug" => index.drugs.push(e),
        _ => index.procedures.push(e),
    }
    Ok(())
}

/// Adds an `index_period` row (its columns `start_date, end_date` from column `first` on)
/// to `index`.
fn push_period(index: &mut PatientIndex, r: &rusqlite::Row<'_>, first: usize) -> DbResult<()> {
    index.observation_periods.push(ObservationPeriod {
        start: r.get(first)?,
        end: r.get(first + 1)?,
    });
    Ok(())
}

/// The number the next index version stored will take.
pub(super) fn next_index_id(conn: &rusqlite::Connection) -> DbResult<i64> {
    Ok(conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'next_index_id'",
            [],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .optional()?
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
        .unwrap_or(1))
}

/// What an index version holds, to tell a re-sent one from a new one.
fn index_hash(index: &PatientIndex) -> [u8; 32] {
    let json = serde_json::to_vec(index).expect("an index serializes");
    *blake3::Hasher::new_derive_key("broker index version v1")
        .update(&json)
        .finalize()
        .as_bytes()
}

/// Stores each patient's index as its new version, under a new number, unless it holds
/// what the stored version holds.
fn put_index(
    tx: &rusqlite::Transaction<'_>,
    rows: &[(String, PatientIndex)],
) -> DbResult<Vec<IndexChange>> {
    let mut changes = Vec::new();
    {
        let mut current = tx
            .prepare_cached("SELECT index_id, index_hash FROM index_person WHERE pseudonym = ?1")?;
        let mut del_person = tx.prepare_cached("DELETE FROM index_person WHERE pseudonym = ?1")?;
        let mut del_events = tx.prepare_cached("DELETE FROM index_event WHERE index_id = ?1")?;
        let mut del_periods = tx.prepare_cached("DELETE FROM index_period WHERE index_id = ?1")?;
        let mut person = tx.prepare_cached(
            "INSERT INTO index_person (pseudonym, birth_year, sex, index_id, index_hash) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut event = tx.prepare_cached(
                "INSERT INTO index_event (index_id, kind, system, code, date, value, unit) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
        let mut period = tx.prepare_cached(
            "INSERT INTO index_period (index_id, start_date, end_date) VALUES (?1, ?2, ?3)",
        )?;
        let mut next = next_index_id(tx)?;
        for (pseudonym, index) in rows {
            let hash = index_hash(index);
            let stored: Option<(i64, Vec<u8>)> = current
                .query_row([pseudonym], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if stored.as_ref().is_some_and(|(_, h)| h.as_slice() == hash) {
                continue;
            }
            del_person.execute([pseudonym])?;
            if let Some((old, _)) = &stored {
                del_events.execute([old])?;
                del_periods.execute([old])?;
            }
            person.execute(params![
                pseudonym,
                index.person.birth_year,
                index.person.sex,
                next,
                hash.as_slice()
            ])?;
            for (kind, events) in [
                ("condition", &index.conditions),
                ("measurement", &index.measurements),
                ("drug", &index.drugs),
                ("procedure", &index.procedures),
            ] {
                for e in events {
                    event.execute(params![
                        next, kind, e.system, e.code, e.date, e.value, e.unit
                    ])?;
                }
            }
            for p in &index.observation_periods {
                period.execute(params![next, p.start, p.end])?;
            }
            changes.push(IndexChange {
                pseudonym: pseudonym.clone(),
                replaced: stored.map(|(id, _)| id),
                index_id: next,
                index: index.clone(),
            });
            next += 1;
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_index_id', ?1)",
            [next.to_string().into_bytes()],
        )?;
    }
    Ok(changes)
}
