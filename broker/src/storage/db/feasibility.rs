//! Feasibility: concept relations and sponsors' budgets.

use super::*;

impl Db {
    /// Every patient with an index: the number of its current index version in the cohort
    /// engine and its pseudonym, by number.
    pub fn indexed_patients(&self) -> DbResult<Vec<(i64, String)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT index_id, pseudonym FROM index_person ORDER BY index_id")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
    }

    /// The number of the newest index version stored (0: none yet). Versions are
    /// numbered consecutively in the order their uploads committed.
    pub fn last_index_id(&self) -> DbResult<i64> {
        Ok(super::records::next_index_id(&self.conn)? - 1)
    }

    /// The numbers of these patients' current index versions in the cohort engine
    /// (patients without an index are left out).
    pub fn index_ids(&self, pseudonyms: &[&str]) -> DbResult<Vec<(i64, String)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT index_id FROM index_person WHERE pseudonym = ?1")?;
        let mut out = Vec::with_capacity(pseudonyms.len());
        for p in pseudonyms {
            if let Some(id) = stmt.query_row([p], |r| r.get(0)).optional()? {
                out.push((id, (*p).to_owned()));
            }
        }
        Ok(out)
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
