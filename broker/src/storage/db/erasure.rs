//! Erasure jobs: a patient's erasure, step by step, so that a restart resumes it.

use super::*;
use crate::storage::db::grants::WithdrawnGrant;

/// Where an erasure job stands. Each step is done (and redone after a crash) as a whole
/// before the job moves on; see `service::erasure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErasureStep {
    /// Accepted: the grants are withdrawn here; the proxies have yet to destroy kfrags.
    Proxies = 1,
    /// Every proxy confirmed: the patient's rows and blobs are to be deleted.
    Delete = 2,
    /// Deleted: the packs that held the patient's blobs are to be destroyed.
    Packs = 3,
    /// The cohort engine and its snapshot still hold the patient's index rows.
    Index = 4,
    /// Done: the receipts are kept for the patient to fetch again.
    Done = 5,
}

impl ErasureStep {
    fn from_i64(n: i64) -> DbResult<ErasureStep> {
        Ok(match n {
            1 => ErasureStep::Proxies,
            2 => ErasureStep::Delete,
            3 => ErasureStep::Packs,
            4 => ErasureStep::Index,
            5 => ErasureStep::Done,
            other => {
                return Err(rusqlite::Error::IntegralValueOutOfRange(4, other));
            }
        })
    }
}

/// One erasure, as stored.
#[derive(Debug, Clone)]
pub struct ErasureJob {
    /// BLAKE3 of the request's signed bytes.
    pub digest: [u8; 32],
    pub pseudonym: String,
    /// The patient's actor id: the key that may fetch the receipts again.
    pub actor_id: String,
    pub verifying_key: Vec<u8>,
    /// The patient's signed request (JSON).
    pub request: String,
    pub step: ErasureStep,
    /// The receipts collected so far (JSON array, proxies by index then the broker's).
    pub receipts: String,
    /// What the broker deleted, by kind (JSON object), once it has.
    pub deleted: String,
    /// The patient's index version in the cohort engine, until the engine forgot it.
    pub index_id: Option<i64>,
}

/// What deleting an erased patient's rows removed, by kind.
pub type Deleted = BTreeMap<String, u64>;

/// A blob moved out of a pack that held an erased patient's blobs: (old pack, old
/// offset) → where it is now.
pub type Moved = Vec<((String, u64), BlobLocation)>;

impl Db {
    /// Accepts an erasure in one transaction: the job, the withdrawal of every grant of
    /// the patient (the proxies destroy their kfrags in the job's next step), the end of
    /// any pending consent reconciliation or revocation of theirs, and the events
    /// `describe` makes of the withdrawn grants, as intents.
    pub fn begin_erasure(
        &mut self,
        job: &ErasureJob,
        now: i64,
        log_size: u64,
        describe: impl FnOnce(&[WithdrawnGrant]) -> Vec<audit_log::AuditEvent>,
    ) -> DbResult<(Vec<audit_log::AuditEvent>, Vec<i64>)> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO erasures (request_digest, pseudonym, actor_id, verifying_key, request, step, started_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                job.digest.as_slice(),
                job.pseudonym,
                job.actor_id,
                job.verifying_key,
                job.request,
                ErasureStep::Proxies as i64,
                now
            ],
        )?;
        let withdrawn: Vec<WithdrawnGrant> = tx
            .prepare("SELECT study_id, pseudonym, grant_id FROM grants WHERE pseudonym = ?1")?
            .query_map([&job.pseudonym], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<DbResult<_>>()?;
        tx.execute("DELETE FROM grants WHERE pseudonym = ?1", [&job.pseudonym])?;
        tx.execute(
            "DELETE FROM pending_revocations WHERE pseudonym = ?1",
            [&job.pseudonym],
        )?;
        tx.execute(
            "DELETE FROM consent_reconcile WHERE pseudonym = ?1",
            [&job.pseudonym],
        )?;
        let events = describe(&withdrawn);
        let intents = super::audit::add_intents(&tx, log_size, &events)?;
        tx.commit()?;
        Ok((events, intents))
    }

    fn erasure_rows(&self, filter: &str, param: &dyn rusqlite::ToSql) -> DbResult<Vec<ErasureJob>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT request_digest, pseudonym, actor_id, verifying_key, request, step, receipts,
                    deleted, index_id FROM erasures WHERE {filter} ORDER BY started_at"
        ))?;
        stmt.query_map([param], |r| {
            let digest: Vec<u8> = r.get(0)?;
            Ok(ErasureJob {
                digest: digest
                    .try_into()
                    .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, 0))?,
                pseudonym: r.get(1)?,
                actor_id: r.get(2)?,
                verifying_key: r.get(3)?,
                request: r.get(4)?,
                step: ErasureStep::from_i64(r.get(5)?)?,
                receipts: r.get(6)?,
                deleted: r.get(7)?,
                index_id: r.get(8)?,
            })
        })?
        .collect()
    }

    /// When the patient enrolled (unix seconds), if enrolled.
    pub fn patient_enrolled_at(&self, pseudonym: &str) -> DbResult<i64> {
        self.conn.query_row(
            "SELECT created_at FROM patients WHERE pseudonym = ?1",
            [pseudonym],
            |r| r.get(0),
        )
    }

    /// The erasure of this request, if it was accepted.
    pub fn erasure(&self, digest: &[u8; 32]) -> DbResult<Option<ErasureJob>> {
        Ok(self
            .erasure_rows("request_digest = ?1", &digest.as_slice())?
            .pop())
    }

    /// Whether an erasure of this patient is under way (checked on every call that acts
    /// for a patient).
    pub fn is_being_erased(&self, pseudonym: &str) -> DbResult<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM erasures WHERE pseudonym = ?1 AND step < 5 LIMIT 1")?
            .query_row([pseudonym], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Every erasure not yet done, oldest first.
    pub fn erasures_under_way(&self) -> DbResult<Vec<ErasureJob>> {
        self.erasure_rows("step < ?1", &(ErasureStep::Done as i64))
    }

    /// The verifying key of a patient erased by a finished erasure, by the patient's actor
    /// id: that key may still fetch its receipts.
    pub fn erased_actor(&self, actor_id: &str) -> DbResult<Option<Vec<u8>>> {
        self.conn
            .query_row(
                "SELECT verifying_key FROM erasures WHERE actor_id = ?1 AND step = 5
                 ORDER BY started_at DESC LIMIT 1",
                [actor_id],
                |r| r.get(0),
            )
            .optional()
    }

    /// Stores the receipts collected so far and moves the job to `step`.
    pub fn advance_erasure(
        &self,
        digest: &[u8; 32],
        step: ErasureStep,
        receipts: &str,
    ) -> DbResult<()> {
        self.conn.execute(
            "UPDATE erasures SET step = ?2, receipts = ?3, finished_at = CASE WHEN ?2 = 5 THEN ?4 END
             WHERE request_digest = ?1",
            params![digest.as_slice(), step as i64, receipts, crate::service::now_secs()],
        )?;
        Ok(())
    }

    /// Where the patient's blobs are (envelopes, and the same blobs as releases hold
    /// them), and, per pack holding one, the other patients' blobs in it. Neither table
    /// is indexed by pack (that would cost every upload and release): the packs go into a
    /// temporary table and each table is scanned once.
    pub fn erased_blobs(&self, pseudonym: &str) -> DbResult<BTreeMap<String, Vec<BlobLocation>>> {
        self.conn.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS erased_packs (pack TEXT PRIMARY KEY);
             DELETE FROM erased_packs;",
        )?;
        self.conn.execute(
            "INSERT OR IGNORE INTO erased_packs
             SELECT pack FROM envelopes WHERE pseudonym = ?1
             UNION SELECT pack FROM release_items WHERE pseudonym = ?1",
            [pseudonym],
        )?;
        let mut out: BTreeMap<String, Vec<BlobLocation>> = self
            .conn
            .prepare("SELECT pack FROM erased_packs")?
            .query_map([], |r| Ok((r.get(0)?, Vec::new())))?
            .collect::<DbResult<_>>()?;
        let mut residents = self.conn.prepare(
            "SELECT pack, blob, offset, length FROM envelopes
             WHERE pseudonym <> ?1 AND pack IN (SELECT pack FROM erased_packs)
             UNION SELECT pack, blob, offset, length FROM release_items
             WHERE pseudonym <> ?1 AND pack IN (SELECT pack FROM erased_packs)
             ORDER BY 1, 3",
        )?;
        let rows = residents.query_map([pseudonym], |r| {
            Ok(BlobLocation {
                pack: r.get(0)?,
                name: r.get(1)?,
                offset: r.get::<_, i64>(2)? as u64,
                length: r.get::<_, i64>(3)? as u64,
            })
        })?;
        for row in rows {
            let at = row?;
            out.entry(at.pack.clone()).or_default().push(at);
        }
        Ok(out)
    }

    /// Deletes every row of the erased patient in one transaction, and points the other
    /// patients' records at the packs their blobs were moved to: envelopes, release items
    /// and events, the index (person, events, periods), consents, grants, keys, the
    /// patient's actor, log salt and alert reads; the patient's tag is cleared from the
    /// log's side index (the leaves keep it, unlinkable once the salt is gone). The old
    /// packs are listed for destruction, the notices `notify` makes of the studies that
    /// received the patient's records are written as intents, and the job moves on.
    /// Returns what was deleted, the notices and their intents.
    #[allow(clippy::too_many_arguments)]
    pub fn delete_erased_patient(
        &mut self,
        job: &ErasureJob,
        tag: Option<[u8; 32]>,
        moved: &Moved,
        old_packs: &[String],
        log_size: u64,
        notify: impl FnOnce(&[(String, u64)]) -> Vec<audit_log::AuditEvent>,
    ) -> DbResult<(Deleted, Vec<audit_log::AuditEvent>, Vec<i64>)> {
        let p = job.pseudonym.as_str();
        let tx = self.conn.transaction()?;
        // The moved blobs in a temporary table: each table is scanned once and probes it.
        tx.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS moved_blobs (
                 pack TEXT NOT NULL, offset INTEGER NOT NULL, new_pack TEXT NOT NULL,
                 new_offset INTEGER NOT NULL, PRIMARY KEY (pack, offset));
             DELETE FROM moved_blobs;",
        )?;
        {
            let mut put = tx.prepare_cached(
                "INSERT INTO moved_blobs (pack, offset, new_pack, new_offset) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for ((pack, offset), to) in moved {
                put.execute(params![pack, *offset as i64, to.pack, to.offset as i64])?;
            }
        }
        for table in ["envelopes", "release_items"] {
            tx.execute(
                &format!(
                    "UPDATE {table} SET (pack, offset) = (SELECT new_pack, new_offset FROM moved_blobs m
                         WHERE m.pack = {table}.pack AND m.offset = {table}.offset)
                     WHERE (pack, offset) IN (SELECT pack, offset FROM moved_blobs)"
                ),
                [],
            )?;
        }
        let released: Vec<(String, u64)> = tx
            .prepare(
                "SELECT r.study_id, COUNT(*) FROM release_items i
                 JOIN releases r ON r.release_id = i.release_id
                 WHERE i.pseudonym = ?1 GROUP BY r.study_id ORDER BY r.study_id",
            )?
            .query_map([p], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<DbResult<_>>()?;
        let index_id: Option<i64> = tx
            .query_row(
                "SELECT index_id FROM index_person WHERE pseudonym = ?1",
                [p],
                |r| r.get(0),
            )
            .optional()?;
        let mut deleted = Deleted::new();
        let mut count =
            |kind: &str, n: usize| *deleted.entry(kind.to_owned()).or_default() += n as u64;
        count(
            "envelopes",
            tx.execute("DELETE FROM envelopes WHERE pseudonym = ?1", [p])?,
        );
        count(
            "release_items",
            tx.execute("DELETE FROM release_items WHERE pseudonym = ?1", [p])?,
        );
        tx.execute("DELETE FROM release_events WHERE pseudonym = ?1", [p])?;
        if let Some(id) = index_id {
            count(
                "index_rows",
                tx.execute("DELETE FROM index_event WHERE index_id = ?1", [id])?,
            );
            count(
                "index_rows",
                tx.execute("DELETE FROM index_period WHERE index_id = ?1", [id])?,
            );
        }
        count(
            "index_rows",
            tx.execute("DELETE FROM index_person WHERE pseudonym = ?1", [p])?,
        );
        count(
            "consent_versions",
            tx.execute("DELETE FROM consents WHERE pseudonym = ?1", [p])?,
        );
        count(
            "grants",
            tx.execute("DELETE FROM grants WHERE pseudonym = ?1", [p])?,
        );
        for table in [
            "break_glass",
            "pending_revocations",
            "consent_reconcile",
            "patient_keys",
            "patient_actors",
            "audit_salts",
        ] {
            tx.execute(&format!("DELETE FROM {table} WHERE pseudonym = ?1"), [p])?;
        }
        if let Some(tag) = tag {
            tx.execute(
                "DELETE FROM audit_alert_reads WHERE tag = ?1",
                [tag.as_slice()],
            )?;
            tx.execute(
                "UPDATE audit_index SET tag = NULL WHERE tag = ?1",
                [tag.as_slice()],
            )?;
        }
        tx.execute("DELETE FROM patients WHERE pseudonym = ?1", [p])?;
        {
            let mut pack =
                tx.prepare_cached("INSERT OR IGNORE INTO erasure_packs (pack) VALUES (?1)")?;
            for old in old_packs {
                pack.execute([old])?;
            }
        }
        count("packs_rewritten", old_packs.len());
        let events = notify(&released);
        let intents = super::audit::add_intents(&tx, log_size, &events)?;
        tx.execute(
            "UPDATE erasures SET step = ?2, deleted = ?3, index_id = ?4 WHERE request_digest = ?1",
            params![
                job.digest.as_slice(),
                ErasureStep::Packs as i64,
                serde_json::to_string(&deleted).expect("counts serialize"),
                index_id
            ],
        )?;
        tx.commit()?;
        Ok((deleted, events, intents))
    }

    /// Packs that held an erased patient's blobs and are still to be destroyed.
    pub fn erasure_packs(&self) -> DbResult<Vec<String>> {
        self.conn
            .prepare("SELECT pack FROM erasure_packs ORDER BY pack")?
            .query_map([], |r| r.get(0))?
            .collect()
    }

    pub fn erasure_pack_destroyed(&self, pack: &str) -> DbResult<()> {
        self.conn
            .execute("DELETE FROM erasure_packs WHERE pack = ?1", [pack])?;
        Ok(())
    }

    /// Copies every committed page into the database file and empties the write-ahead
    /// log, so that no older copy of a deleted row's page stays in it.
    pub fn checkpoint_wal(&self) -> DbResult<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }
}
