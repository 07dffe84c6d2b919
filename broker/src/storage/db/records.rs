//! Patients, their keys, envelope versions and the searchable index.

use super::*;

impl Db {
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
    ) -> DbResult<Vec<EnvelopeReceipt>> {
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
}

/// New envelope versions; one whose content tag equals the latest version's is not
/// stored again.
fn add_envelopes(
    tx: &rusqlite::Transaction<'_>,
    envelopes: &[NewEnvelope],
    now: i64,
) -> DbResult<Vec<EnvelopeReceipt>> {
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
                (Some((version, blob, tag)), _) if tag == e.content_tag => EnvelopeReceipt {
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
                    EnvelopeReceipt {
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
