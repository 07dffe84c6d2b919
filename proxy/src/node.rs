//! A proxy node: holds one kfrag per grant category, verified on deposit, and
//! re-encrypts capsules for grants that are present and unexpired.
//!
//! Kfrags are kept in the node's own SQLite file (`proxy.db` in its directory), written
//! in one transaction per deposit batch before the deposit is acknowledged.
//!
//! Revocation sticks: when a grant's kfrags are destroyed (the grant was revoked, or a
//! newer grant of the same patient to the same study superseded it) the node keeps the
//! grant's id, and for a revocation the time, and refuses any later deposit of that id
//! or of a grant of that patient to that study issued (by the patient's signed clock)
//! before the revocation; a newer grant also shuts out every older one. Both survive a
//! restart, so a captured deposit re-sent by a broker, or replayed byte for byte,
//! restores nothing.

use std::path::Path;
use std::sync::Mutex;

use rayon::prelude::*;
use rusqlite::{Connection, OptionalExtension, params};

use model::Category;
use pre_kms::erasure::{ErasureReceipt, Role, VerifiedErasureRequest};
use pre_kms::grant::{self, DepositClaim};
use pre_kms::keys::Identity;
use pre_kms::logged_release::VerifiedRelease;
use pre_kms::private_fs::{DirLock, LockError, private_dir, private_file};
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
    #[error("{0}")]
    Locked(#[from] LockError),
}

pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// One kfrag to deposit.
#[derive(Debug, Clone)]
pub struct Deposit {
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
    _lock: DirLock,
}

impl ProxyNode {
    /// Opens (or creates) the node's store in `dir`. `index` is the node's position in
    /// the broker's proxy list, which every kfrag payload names.
    pub fn open(dir: &Path, identity: Identity, index: u32) -> Result<ProxyNode> {
        private_dir(dir)?;
        let lock = DirLock::acquire(dir)?;
        // Kfrags are secrets: a reader of this file with t−1 others could re-encrypt.
        private_file(&dir.join("proxy.db"))?;
        let db = Connection::open(dir.join("proxy.db"))?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA secure_delete=ON;
             CREATE TABLE IF NOT EXISTS kfrags (
                 study_id TEXT NOT NULL, pseudonym TEXT NOT NULL, category TEXT NOT NULL,
                 grant_id TEXT NOT NULL, expires_at INTEGER NOT NULL, kfrag BLOB NOT NULL,
                 PRIMARY KEY (study_id, pseudonym, category));
             -- Grants whose kfrags were destroyed here: never taken again.
             CREATE TABLE IF NOT EXISTS destroyed_grants (
                 grant_id TEXT PRIMARY KEY, destroyed_at INTEGER NOT NULL);
             -- Per (study, patient), keyed by a hash of the pair: grants issued at or
             -- before floor_ms (unix ms) are refused.
             CREATE TABLE IF NOT EXISTS grant_floors (
                 pair BLOB PRIMARY KEY, floor_ms INTEGER NOT NULL);
             -- Per erased patient, keyed by a hash of the pseudonym: grants issued at or
             -- before floor_ms are refused, for every study.
             CREATE TABLE IF NOT EXISTS patient_floors (
                 patient BLOB PRIMARY KEY, floor_ms INTEGER NOT NULL);
             -- Erasure requests carried out (by digest), with what they destroyed: a
             -- request sent again is answered again and destroys nothing more.
             CREATE TABLE IF NOT EXISTS erasures (
                 request BLOB PRIMARY KEY, destroyed INTEGER NOT NULL, at_ms INTEGER NOT NULL);",
        )?;
        Ok(ProxyNode {
            identity,
            index,
            db: Mutex::new(db),
            _lock: lock,
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
    /// none is stored and the error names its position in the batch. A kfrag of a grant
    /// this node destroyed, or issued before the floor of its patient and study, is
    /// refused like one that does not verify.
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
                    .map(|k| (grant::kfrag_bytes(&k.kfrag), k.issued_at))
                    .map_err(|e| NodeError::Rejected(format!("deposit {i}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut db = self.db();
        let tx = db.transaction()?;
        {
            let mut destroyed =
                tx.prepare_cached("SELECT 1 FROM destroyed_grants WHERE grant_id = ?1")?;
            for (i, (d, (_, issued_at))) in deposits.iter().zip(&checked).enumerate() {
                if *issued_at <= patient_floor(&tx, &d.claim.pseudonym)? {
                    return Err(NodeError::Rejected(format!(
                        "deposit {i}: grant {} was issued before its patient was erased; the patient must enroll and grant again",
                        d.claim.grant_id
                    )));
                }
                if destroyed.exists([&d.claim.grant_id])? {
                    return Err(NodeError::Rejected(format!(
                        "deposit {i}: grant {} was revoked or superseded here; the patient must issue a new grant",
                        d.claim.grant_id
                    )));
                }
                if *issued_at <= floor(&tx, &d.claim.study_id, &d.claim.pseudonym)? {
                    return Err(NodeError::Rejected(format!(
                        "deposit {i}: grant {} was issued before this patient's grant to the study was revoked or replaced; the patient must issue a new grant",
                        d.claim.grant_id
                    )));
                }
            }
            // A grant supersedes the patient's earlier grants to the same study: they lose
            // their kfrags here, are remembered as destroyed, and no grant issued before
            // this one is taken any more.
            let mut superseded = tx.prepare_cached(
                "SELECT DISTINCT grant_id FROM kfrags WHERE study_id = ?1 AND pseudonym = ?2 AND grant_id != ?3",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM kfrags WHERE grant_id = ?1")?;
            for (d, (_, issued_at)) in deposits.iter().zip(&checked) {
                let old: Vec<String> = superseded
                    .query_map(
                        params![d.claim.study_id, d.claim.pseudonym, d.claim.grant_id],
                        |r| r.get(0),
                    )?
                    .collect::<rusqlite::Result<_>>()?;
                for id in old {
                    delete.execute([&id])?;
                    remember_destroyed(&tx, &id)?;
                }
                raise_floor(
                    &tx,
                    &d.claim.study_id,
                    &d.claim.pseudonym,
                    issued_at.saturating_sub(1),
                )?;
            }
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO kfrags (study_id, pseudonym, category, grant_id, expires_at, kfrag)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (d, (kfrag, _)) in deposits.iter().zip(&checked) {
                stmt.execute(params![
                    d.claim.study_id,
                    d.claim.pseudonym,
                    d.claim.category.label(),
                    d.claim.grant_id,
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
    /// transaction (the store overwrites deleted content), remembers the grants as
    /// destroyed and refuses from now on any grant of these patients to these studies
    /// issued before now. Returns how many kfrags were held.
    pub fn revoke(&self, grants: &[(String, String)], now_ms: i64) -> Result<usize> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let mut destroyed = 0;
        {
            let mut held = tx.prepare_cached(
                "SELECT DISTINCT grant_id FROM kfrags WHERE study_id = ?1 AND pseudonym = ?2",
            )?;
            let mut stmt =
                tx.prepare_cached("DELETE FROM kfrags WHERE study_id = ?1 AND pseudonym = ?2")?;
            for (study, pseudonym) in grants {
                let ids: Vec<String> = held
                    .query_map(params![study, pseudonym], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                for id in ids {
                    remember_destroyed(&tx, &id)?;
                }
                destroyed += stmt.execute(params![study, pseudonym])?;
                // Above the held grant's own time too, should the patient's clock be
                // ahead of this node's.
                let floor = floor(&tx, study, pseudonym)?.saturating_add(1).max(now_ms);
                raise_floor(&tx, study, pseudonym, floor)?;
            }
        }
        tx.commit()?;
        Ok(destroyed)
    }

    /// Carries out a patient's erasure request: destroys every kfrag of the patient, for
    /// every study, in one transaction (the store overwrites deleted content), remembers
    /// the grants as destroyed, refuses from now on any grant of the patient issued before
    /// now (or before the request, should the patient's clock be ahead), and signs a
    /// receipt. The same request again destroys nothing more (a grant the patient issued
    /// after it stays) and gets the receipt again, with the count of the first time.
    pub fn erase(&self, request: &VerifiedErasureRequest, now_ms: i64) -> Result<ErasureReceipt> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let digest = request.digest();
        let done: Option<(i64, i64)> = tx
            .prepare_cached("SELECT destroyed, at_ms FROM erasures WHERE request = ?1")?
            .query_row([digest.as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (destroyed, at_ms) = match done {
            Some(done) => done,
            None => {
                let pseudonym = request.pseudonym();
                let ids: Vec<String> = tx
                    .prepare_cached("SELECT DISTINCT grant_id FROM kfrags WHERE pseudonym = ?1")?
                    .query_map([pseudonym], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                for id in &ids {
                    remember_destroyed(&tx, id)?;
                }
                let destroyed = tx
                    .prepare_cached("DELETE FROM kfrags WHERE pseudonym = ?1")?
                    .execute([pseudonym])? as i64;
                let floor_ms = now_ms.max(request.request().issued_at_ms);
                tx.prepare_cached(
                    "INSERT INTO patient_floors (patient, floor_ms) VALUES (?1, ?2)
                     ON CONFLICT (patient) DO UPDATE SET floor_ms = MAX(floor_ms, excluded.floor_ms)",
                )?
                .execute(params![patient_key(pseudonym).as_slice(), floor_ms])?;
                tx.prepare_cached(
                    "INSERT INTO erasures (request, destroyed, at_ms) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![digest.as_slice(), destroyed, now_ms])?;
                (destroyed, now_ms)
            }
        };
        tx.commit()?;
        // The deleted kfrags' pages are overwritten in the write-ahead log; copying it
        // into the store and emptying it leaves no older copy of them in either file.
        db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(ErasureReceipt::sign(
            &self.identity,
            Role::Proxy,
            request,
            [("kfrags", destroyed.max(0) as u64)],
            at_ms,
        ))
    }

    /// Number of grants this node remembers as destroyed (for operators and tests).
    pub fn destroyed_grant_count(&self) -> Result<i64> {
        Ok(self
            .db()
            .query_row("SELECT COUNT(*) FROM destroyed_grants", [], |r| r.get(0))?)
    }

    /// Number of kfrags held (for operators and tests).
    pub fn kfrag_count(&self) -> Result<i64> {
        Ok(self
            .db()
            .query_row("SELECT COUNT(*) FROM kfrags", [], |r| r.get(0))?)
    }
}

/// The key of a (study, patient) pair in `grant_floors`: a hash, so that the table lists
/// no pseudonym.
fn pair_key(study_id: &str, pseudonym: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("pre-kms proxy grant floor v1");
    h.update(&(study_id.len() as u64).to_be_bytes());
    h.update(study_id.as_bytes());
    h.update(pseudonym.as_bytes());
    *h.finalize().as_bytes()
}

/// The key of an erased patient in `patient_floors`: a hash, so that the table lists no
/// pseudonym.
fn patient_key(pseudonym: &str) -> [u8; 32] {
    blake3::derive_key("pre-kms proxy patient floor v1", pseudonym.as_bytes())
}

fn patient_floor(db: &Connection, pseudonym: &str) -> Result<i64> {
    Ok(db
        .prepare_cached("SELECT floor_ms FROM patient_floors WHERE patient = ?1")?
        .query_row([patient_key(pseudonym).as_slice()], |r| r.get(0))
        .optional()?
        .unwrap_or(i64::MIN))
}

fn floor(db: &Connection, study_id: &str, pseudonym: &str) -> Result<i64> {
    Ok(db
        .prepare_cached("SELECT floor_ms FROM grant_floors WHERE pair = ?1")?
        .query_row([pair_key(study_id, pseudonym).as_slice()], |r| r.get(0))
        .optional()?
        .unwrap_or(i64::MIN))
}

fn raise_floor(db: &Connection, study_id: &str, pseudonym: &str, floor_ms: i64) -> Result<()> {
    db.prepare_cached(
        "INSERT INTO grant_floors (pair, floor_ms) VALUES (?1, ?2)
         ON CONFLICT (pair) DO UPDATE SET floor_ms = MAX(floor_ms, excluded.floor_ms)",
    )?
    .execute(params![pair_key(study_id, pseudonym).as_slice(), floor_ms])?;
    Ok(())
}

fn remember_destroyed(db: &Connection, grant_id: &str) -> Result<()> {
    db.prepare_cached(
        "INSERT OR IGNORE INTO destroyed_grants (grant_id, destroyed_at) VALUES (?1, ?2)",
    )?
    .execute(params![grant_id, pre_kms::request_auth::now_secs()])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pre_kms::erasure::ErasureRequest;
    use pre_kms::grant::{Grant, GrantPlan};

    /// Proxy 0 of a 2-of-3 network, and the deposits of `grant` meant for it.
    fn deposits(grant: &Grant, patient: &Identity, receiving: &Identity) -> Vec<Deposit> {
        grant
            .categories
            .iter()
            .map(|c| Deposit {
                claim: DepositClaim {
                    grant_id: grant.grant_id.clone(),
                    study_id: grant.study_id.clone(),
                    pseudonym: grant.pseudonym.clone(),
                    category: c.category,
                    expires_at: grant.expires_at,
                    proxy_index: 0,
                    patient_verifying_key: patient.verifying_key(),
                    delegating_key: patient.category_public_key(c.category),
                    receiving_key: receiving.encryption_public_key(),
                },
                sealed_kfrag: c.sealed_kfrags[0].clone(),
            })
            .collect()
    }

    fn grant(
        patient: &Identity,
        study: &str,
        proxies: &[Identity],
        receiving: &Identity,
        issued_at: i64,
    ) -> Grant {
        let plan = GrantPlan {
            study_id: study.into(),
            receiving_key: receiving.encryption_public_key(),
            categories: vec![Category::Conditions, Category::Observations],
            threshold: 2,
            expires_at: i64::MAX / 2,
            proxy_keys: proxies.iter().map(|p| p.encryption_public_key()).collect(),
        };
        grant::issue_with_rng(&mut rand::rngs::OsRng, patient, &plan, issued_at).unwrap()
    }

    /// A broker that kept a patient's old deposits replays them after the erasure: for
    /// the study the proxy held and for one it never saw, the proxy refuses every grant
    /// issued before the erasure; a new grant after re-enrolment is taken, and the same
    /// erasure request sent again destroys nothing of it.
    #[test]
    fn an_erasure_destroys_every_kfrag_of_the_patient_and_old_grants_never_return() {
        let dir = tempfile::tempdir().unwrap();
        let proxies: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
        let node = ProxyNode::open(dir.path(), Identity::from_seed(*proxies[0].seed()), 0).unwrap();
        let (patient, other) = (Identity::generate(), Identity::generate());
        let researcher = Identity::generate();
        let t0 = 1_000_000;
        let held_a = grant(&patient, "st-a", &proxies, &researcher, t0);
        let held_b = grant(&patient, "st-b", &proxies, &researcher, t0);
        let kept_back = grant(&patient, "st-c", &proxies, &researcher, t0);
        let theirs = grant(&other, "st-a", &proxies, &researcher, t0);
        for g in [&held_a, &held_b] {
            node.deposit(&deposits(g, &patient, &researcher)).unwrap();
        }
        node.deposit(&deposits(&theirs, &other, &researcher))
            .unwrap();
        assert_eq!(node.kfrag_count().unwrap(), 6);

        let request = ErasureRequest::sign(&patient, t0 + 10).verify().unwrap();
        let receipt = node.erase(&request, t0 + 20).unwrap();
        receipt.verify_for(&request).unwrap();
        assert_eq!(receipt.destroyed["kfrags"], 4);
        assert_eq!(receipt.role, Role::Proxy);
        assert_eq!(receipt.signer, proxies[0].actor_id());
        assert_eq!(node.kfrag_count().unwrap(), 2, "the other patient's stay");

        // Nothing of the patient is left in the proxy's files while it still runs (the
        // kfrag rows carried the pseudonym).
        let needle = patient.pseudonym().into_bytes();
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(f.unwrap().path()).unwrap();
            assert!(!bytes.windows(needle.len()).any(|w| w == needle.as_slice()));
        }
        drop(node);
        let node = ProxyNode::open(dir.path(), Identity::from_seed(*proxies[0].seed()), 0).unwrap();

        for g in [&held_a, &kept_back] {
            let err = node
                .deposit(&deposits(g, &patient, &researcher))
                .unwrap_err();
            assert!(err.to_string().contains("erased"), "{err}");
        }
        // Re-enrolled, the patient grants again: taken.
        let new = grant(&patient, "st-a", &proxies, &researcher, t0 + 30);
        node.deposit(&deposits(&new, &patient, &researcher))
            .unwrap();
        // The request again: the same count, nothing of the new grant destroyed.
        let again = node.erase(&request, t0 + 40).unwrap();
        assert_eq!(again.destroyed["kfrags"], 4);
        assert_eq!(again.at_ms, t0 + 20);
        assert_eq!(node.kfrag_count().unwrap(), 4);
    }
}
