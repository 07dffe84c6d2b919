//! A proxy node: holds one kfrag per grant category, verified on deposit, and
//! re-encrypts capsules for grants that are present and unexpired.
//!
//! Kfrags are kept in the node's own SQLite file (`proxy.db` in its directory), written
//! in one transaction per deposit batch before the deposit is acknowledged.

use std::path::Path;
use std::sync::Mutex;

use rayon::prelude::*;
use rusqlite::{Connection, OptionalExtension, params};

use crate::category::Category;
use crate::error::{Error, Result};
use crate::grant::{self, DepositClaim};
use crate::keys::Identity;
use crate::reencrypt::reencrypt_batch;
use crate::sealed::parse_capsule;

/// One kfrag to deposit.
#[derive(Debug, Clone)]
pub struct Deposit {
    pub grant_id: String,
    pub claim: DepositClaim,
    pub sealed_kfrag: Vec<u8>,
}

/// One capsule to re-encrypt.
#[derive(Debug, Clone)]
pub struct ReencryptRequest {
    pub study_id: String,
    pub pseudonym: String,
    pub category: Category,
    pub capsule: Vec<u8>,
}

pub struct ProxyNode {
    identity: Identity,
    index: u32,
    db: Mutex<Connection>,
}

impl ProxyNode {
    /// Opens (or creates) the node's store in `dir`. `index` is the node's position in
    /// the broker's proxy list, which every kfrag payload names.
    pub fn open(dir: &Path, identity: Identity, index: u32) -> Result<ProxyNode> {
        std::fs::create_dir_all(dir)?;
        let db = Connection::open(dir.join("proxy.db"))?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS kfrags (
                 study_id TEXT NOT NULL, pseudonym TEXT NOT NULL, category TEXT NOT NULL,
                 grant_id TEXT NOT NULL, expires_at INTEGER NOT NULL, kfrag BLOB NOT NULL,
                 PRIMARY KEY (study_id, pseudonym, category));",
        )?;
        Ok(ProxyNode {
            identity,
            index,
            db: Mutex::new(db),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Verifies every kfrag, then stores all of them in one transaction; if any fails,
    /// none is stored and the error names its position in the batch.
    pub fn deposit(&self, deposits: &[Deposit]) -> Result<usize> {
        let checked = deposits
            .par_iter()
            .enumerate()
            .map(|(i, d)| {
                if d.claim.proxy_index != self.index {
                    return Err(Error::KfragRejected(format!(
                        "deposit {i}: meant for proxy {}",
                        d.claim.proxy_index
                    )));
                }
                grant::open_deposit(&self.identity, &d.claim, &d.sealed_kfrag)
                    .map(|k| grant::kfrag_bytes(&k.kfrag))
                    .map_err(|e| Error::KfragRejected(format!("deposit {i}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut db = self.db();
        let tx = db.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO kfrags (study_id, pseudonym, category, grant_id, expires_at, kfrag)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (d, kfrag) in deposits.iter().zip(&checked) {
                stmt.execute(params![
                    d.claim.study_id,
                    d.claim.pseudonym,
                    d.claim.category.label(),
                    d.grant_id,
                    d.claim.expires_at,
                    kfrag
                ])?;
            }
        }
        tx.commit()?;
        Ok(checked.len())
    }

    /// Re-encrypts each capsule whose grant this node holds and is unexpired at `now`
    /// (unix seconds). Items without a live kfrag come back as `None`.
    pub fn reencrypt(&self, items: &[ReencryptRequest], now: i64) -> Result<Vec<Option<Vec<u8>>>> {
        let mut work = Vec::with_capacity(items.len());
        let mut slots = Vec::with_capacity(items.len());
        {
            let db = self.db();
            let mut stmt = db.prepare_cached(
                "SELECT kfrag, expires_at FROM kfrags WHERE study_id = ?1 AND pseudonym = ?2 AND category = ?3",
            )?;
            for (i, item) in items.iter().enumerate() {
                let row: Option<(Vec<u8>, i64)> = stmt
                    .query_row(
                        params![item.study_id, item.pseudonym, item.category.label()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                match row {
                    Some((kfrag, expires_at)) if expires_at > now => {
                        let capsule = parse_capsule(&item.capsule)
                            .map_err(|e| Error::malformed("capsule", format!("item {i}: {e}")))?;
                        work.push((capsule, grant::reload_checked_kfrag(&kfrag)?));
                        slots.push(Some(work.len() - 1));
                    }
                    _ => slots.push(None),
                }
            }
        }
        let mut cfrags = reencrypt_batch(&work)
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>();
        Ok(slots
            .into_iter()
            .map(|s| s.and_then(|j| cfrags[j].take()))
            .collect())
    }

    /// Number of kfrags held (for operators and tests).
    pub fn kfrag_count(&self) -> Result<i64> {
        Ok(self
            .db()
            .query_row("SELECT COUNT(*) FROM kfrags", [], |r| r.get(0))?)
    }
}
