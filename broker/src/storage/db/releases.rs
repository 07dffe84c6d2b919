//! Releases and their items.

use super::*;

impl Db {
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
