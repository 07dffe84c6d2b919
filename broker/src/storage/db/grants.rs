//! Grants and the proxies' pending revocations.

use super::*;

/// A withdrawn grant: (study id, pseudonym, grant id).
pub type WithdrawnGrant = (String, String, String);

impl Db {
    /// Stores grants in one transaction, each replacing an earlier grant of the same
    /// patient to the same study, with their log events as intents. Returns the intents.
    pub fn put_grants(
        &mut self,
        grants: &[GrantRow],
        now: i64,
        log_size: u64,
        events: &[audit_log::AuditEvent],
    ) -> DbResult<Vec<i64>> {
        self.with_intents(log_size, events, |tx| {
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
            Ok(())
        })
        .map(|(_, intents)| intents)
    }

    /// Deletes these (study, pseudonym) grants and queues their destruction at each of
    /// `proxies` proxies, with the log events `describe` makes of the grants that existed
    /// as intents, in one transaction. Returns those grants, the events and the intents.
    pub fn withdraw_grants(
        &mut self,
        grants: &[(String, String)],
        proxies: usize,
        log_size: u64,
        describe: impl FnOnce(&[WithdrawnGrant]) -> Vec<audit_log::AuditEvent>,
    ) -> DbResult<(Vec<WithdrawnGrant>, Vec<audit_log::AuditEvent>, Vec<i64>)> {
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
        let events = describe(&existed);
        let intents = super::audit::add_intents(&tx, log_size, &events)?;
        tx.commit()?;
        Ok((existed, events, intents))
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
}
