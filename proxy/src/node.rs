//! A proxy node: holds one kfrag per grant category, verified on deposit, and
//! re-encrypts capsules for grants that are present and unexpired.
//!
//! Kfrags are kept in the node's own SQLite file (`proxy.db` in its directory), written
//! in one transaction per deposit batch before the deposit is acknowledged.

use std::path::Path;
use std::sync::Mutex;

use rayon::prelude::*;
use rusqlite::{Connection, OptionalExtension, params};

use model::Category;
use pre_kms::grant::{self, DepositClaim};
use pre_kms::keys::Identity;
use pre_kms::logged_release::VerifiedRelease;
use pre_kms::reencrypt::reencrypt_one;
use pre_kms::sealed::parse_capsule;

/// Why a node operation failed. Messages carry no key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A deposited kfrag did not verify; nothing of its batch was stored.
    #[error("kfrag rejected: {0}")]
    Rejected(String),
    #[error("storage: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = NodeError> = std::result::Result<T, E>;

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
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA secure_delete=ON;
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
                    return Err(NodeError::Rejected(format!(
                        "deposit {i}: meant for proxy {}",
                        d.claim.proxy_index
                    )));
                }
                grant::open_deposit(&self.identity, &d.claim, &d.sealed_kfrag)
                    .map(|k| grant::kfrag_bytes(&k.kfrag))
                    .map_err(|e| NodeError::Rejected(format!("deposit {i}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut db = self.db();
        let tx = db.transaction()?;
        {
            // A grant supersedes the patient's earlier grant to the same study: categories
            // it no longer names lose their kfrags here.
            let mut superseded = tx.prepare_cached(
                "DELETE FROM kfrags WHERE study_id = ?1 AND pseudonym = ?2 AND grant_id != ?3",
            )?;
            for d in deposits {
                superseded.execute(params![d.claim.study_id, d.claim.pseudonym, d.grant_id])?;
            }
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
    /// (unix seconds) and which a logged event of `release` covers. Items without a live
    /// kfrag, not covered by the log, or whose capsule does not parse, come back as `None`,
    /// so one bad item withholds only itself.
    pub fn reencrypt(
        &self,
        release: &VerifiedRelease,
        items: &[ReencryptRequest],
        now: i64,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        // Only the lookups hold the store's lock; parsing (umbral re-verifies a capsule
        // when it deserializes one) and re-encryption run in parallel after it.
        let kfrags: Vec<Option<Vec<u8>>> = {
            let db = self.db();
            let mut stmt = db.prepare_cached(
                "SELECT kfrag, expires_at, grant_id FROM kfrags WHERE study_id = ?1 AND pseudonym = ?2 AND category = ?3",
            )?;
            items
                .iter()
                .map(|item| {
                    let row: Option<(Vec<u8>, i64, String)> = stmt
                        .query_row(
                            params![item.study_id, item.pseudonym, item.category.label()],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                        )
                        .optional()?;
                    Ok(row
                        .filter(|(_, expires_at, grant_id)| {
                            *expires_at > now
                                && release.covers(&item.study_id, grant_id, item.category)
                        })
                        .map(|(k, _, _)| k))
                })
                .collect::<Result<_>>()?
        };
        Ok(items
            .par_iter()
            .zip(kfrags)
            .map(|(item, kfrag)| {
                let kfrag = grant::reload_checked_kfrag(&kfrag?).ok()?;
                let capsule = parse_capsule(&item.capsule).ok()?;
                Some(reencrypt_one(&capsule, kfrag))
            })
            .collect())
    }

    /// Destroys every kfrag of the grants of these patients to these studies, in one
    /// transaction (the store overwrites deleted content). Returns how many were held.
    pub fn revoke(&self, grants: &[(String, String)]) -> Result<usize> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let mut destroyed = 0;
        {
            let mut stmt =
                tx.prepare_cached("DELETE FROM kfrags WHERE study_id = ?1 AND pseudonym = ?2")?;
            for (study, pseudonym) in grants {
                destroyed += stmt.execute(params![study, pseudonym])?;
            }
        }
        tx.commit()?;
        Ok(destroyed)
    }

    /// Number of kfrags held (for operators and tests).
    pub fn kfrag_count(&self) -> Result<i64> {
        Ok(self
            .db()
            .query_row("SELECT COUNT(*) FROM kfrags", [], |r| r.get(0))?)
    }
}
