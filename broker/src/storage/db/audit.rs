//! The access log's side index.

use super::*;
use audit_log::{AuditEvent, EventFilter};

fn encoding_failed(e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}

/// Writes `events` as intents in the transaction `tx` of the state they describe; the log
/// then held `log_size` leaves (so they land at that position or later). Returns their
/// sequence numbers, for [`Db::clear_intents`] once they are in the log.
pub(crate) fn add_intents(
    tx: &Connection,
    log_size: u64,
    events: &[AuditEvent],
) -> DbResult<Vec<i64>> {
    let mut stmt =
        tx.prepare_cached("INSERT INTO log_intents (log_size, event) VALUES (?1, ?2)")?;
    events
        .iter()
        .map(|e| {
            let bytes = e.to_leaf_bytes().map_err(encoding_failed)?;
            stmt.execute(params![log_size as i64, bytes])?;
            Ok(tx.last_insert_rowid())
        })
        .collect()
}

impl Db {
    /// Runs `f` in one transaction together with writing `events` as intents (the log
    /// then held `log_size` leaves). Returns what `f` returned and the intents.
    pub(crate) fn with_intents<T>(
        &mut self,
        log_size: u64,
        events: &[AuditEvent],
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> DbResult<T>,
    ) -> DbResult<(T, Vec<i64>)> {
        let tx = self.conn.transaction()?;
        let intents = add_intents(&tx, log_size, events)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok((out, intents))
    }

    /// Intents not yet cleared, oldest first: (sequence, log size then, event).
    pub fn intents(&self) -> DbResult<Vec<(i64, u64, AuditEvent)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, log_size, event FROM log_intents ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (seq, size, bytes) = row?;
            let event = AuditEvent::from_leaf_bytes(&bytes).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Blob, e.into())
            })?;
            Ok((seq, size as u64, event))
        })
        .collect()
    }

    pub fn clear_intents(&self, seqs: &[i64]) -> DbResult<()> {
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM log_intents WHERE seq = ?1")?;
        for s in seqs {
            stmt.execute([s])?;
        }
        Ok(())
    }

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
    pub fn audit_leaves(&self, filter: &EventFilter, limit: usize) -> DbResult<Vec<u64>> {
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
