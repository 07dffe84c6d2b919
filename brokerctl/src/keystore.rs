//! The custodian keystore: the keys a custodian (e.g. a hospital) makes and keeps for
//! the patients it acts for.
//!
//! One SQLite file (`keystore.db`, owner-only permissions) with a row per patient:
//! the custodian's own patient id (`source_id`), the 32-byte identity seed and the
//! broker pseudonym derived from it. The same `source_id` always yields the same keys,
//! which makes re-imports idempotent. The file holds secrets: it stays with the
//! custodian and never goes to the broker.
//!
//! Beside the seeds it remembers what an import established, so that a re-import does
//! not redo it: each patient's category public keys (derived once; public, but derived
//! at the cost of a scalar multiplication each) and that the broker acknowledged the
//! patient's enrollment ([`crate::agent::Known`]).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use zeroize::Zeroizing;

use pre_kms::Category;
use pre_kms::keys::{Identity, SEED_LEN, public_key_bytes, public_key_from_bytes};

use crate::agent::{Known, Learned};

/// Bytes of a compressed public key.
const PUBLIC_KEY_LEN: usize = 33;

/// Binds stored category keys to the patient's seed: keys that do not carry the tag their
/// seed gives are not the patient's.
fn keys_tag(seed: &[u8], keys: &[u8]) -> blake3::Hash {
    let key = Zeroizing::new(blake3::derive_key(
        "brokerctl keystore category keys v1",
        seed,
    ));
    blake3::keyed_hash(&key, keys)
}

/// Why the keystore cannot be used. Messages name the file, never a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeystoreError {
    #[error("key file: {0}")]
    KeyFile(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl From<rusqlite::Error> for KeystoreError {
    fn from(e: rusqlite::Error) -> Self {
        KeystoreError::Storage(e.to_string())
    }
}

type Error = KeystoreError;
pub type Result<T, E = KeystoreError> = std::result::Result<T, E>;

pub struct Keystore {
    db: Connection,
    path: PathBuf,
}

impl Keystore {
    pub fn open(path: &Path) -> Result<Keystore> {
        if let Some(parent) = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty() && !p.exists())
        {
            pre_kms::private_fs::private_dir(parent)?;
        }
        // Owner-only before the first secret lands in it.
        pre_kms::private_fs::private_file(path)?;
        let db = Connection::open(path)
            .map_err(|e| Error::KeyFile(format!("cannot open keystore {}: {e}", path.display())))?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA secure_delete=ON;
             CREATE TABLE IF NOT EXISTS patients (
                 source_id TEXT PRIMARY KEY, seed BLOB NOT NULL, pseudonym TEXT NOT NULL UNIQUE,
                 created_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS consent_heads (
                 pseudonym TEXT PRIMARY KEY, version INTEGER NOT NULL, policy_hash TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS known (
                 pseudonym TEXT PRIMARY KEY, category_keys BLOB, enrolled INTEGER NOT NULL);",
        )
        .map_err(|e| Error::KeyFile(format!("{} is not a keystore: {e}", path.display())))?;
        Ok(Keystore {
            db,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The patient's identity, made and stored on first sight.
    /// Returns whether it was created now.
    pub fn get_or_create(&self, source_id: &str) -> Result<(Identity, bool)> {
        if let Some(id) = self.get(source_id)? {
            return Ok((id, false));
        }
        let id = Identity::generate();
        self.db.execute(
            "INSERT INTO patients (source_id, seed, pseudonym, created_at) VALUES (?1, ?2, ?3, strftime('%s','now'))",
            params![source_id, id.seed().as_slice(), id.pseudonym()],
        )?;
        Ok((id, true))
    }

    pub fn get(&self, source_id: &str) -> Result<Option<Identity>> {
        let seed: Option<Zeroizing<Vec<u8>>> = self
            .db
            .query_row(
                "SELECT seed FROM patients WHERE source_id = ?1",
                [source_id],
                |r| r.get::<_, Vec<u8>>(0).map(Zeroizing::new),
            )
            .optional()?;
        seed.map(|s| {
            let seed: [u8; SEED_LEN] = s.as_slice().try_into().map_err(|_| {
                Error::KeyFile(format!(
                    "{}: a seed has the wrong length",
                    self.path.display()
                ))
            })?;
            Ok(Identity::from_seed(seed))
        })
        .transpose()
    }

    /// Destroys an erased patient's entry: the seed (the crypto-shredding: nothing can
    /// decrypt the patient's records any more), the keys and consent heads remembered
    /// for them. Deleted content is overwritten, and the write-ahead log is emptied into
    /// the file, so that no copy of the seed is left in either. Returns whether the
    /// patient was in the keystore.
    pub fn destroy(&self, source_id: &str) -> Result<bool> {
        let pseudonym: Option<String> = self
            .db
            .query_row(
                "SELECT pseudonym FROM patients WHERE source_id = ?1",
                [source_id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(pseudonym) = pseudonym else {
            return Ok(false);
        };
        self.db.execute_batch("BEGIN IMMEDIATE")?;
        let deleted = (|| {
            self.db
                .execute("DELETE FROM patients WHERE source_id = ?1", [source_id])?;
            self.forget_patient(&pseudonym)
        })();
        match deleted {
            Ok(()) => self.db.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = self.db.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
        self.db
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(true)
    }

    /// Forgets what was remembered of a patient (keys, consent head), keeping the seed.
    pub fn forget_patient(&self, pseudonym: &str) -> Result<()> {
        self.db.execute(
            "DELETE FROM consent_heads WHERE pseudonym = ?1",
            [pseudonym],
        )?;
        self.db
            .execute("DELETE FROM known WHERE pseudonym = ?1", [pseudonym])?;
        Ok(())
    }

    /// Every patient as (source id, identity), in source-id order.
    pub fn all(&self) -> Result<Vec<(String, Identity)>> {
        let mut stmt = self
            .db
            .prepare("SELECT source_id FROM patients ORDER BY source_id")?;
        let ids = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        ids.into_iter()
            .map(|s| {
                let id = self
                    .get(&s)?
                    .ok_or_else(|| Error::Storage("keystore row vanished".into()))?;
                Ok((s, id))
            })
            .collect()
    }

    /// The newest consent version set for a patient through this keystore.
    pub fn consent_head(
        &self,
        pseudonym: &str,
    ) -> Result<Option<crate::consent_heads::ConsentHead>> {
        Ok(self
            .db
            .query_row(
                "SELECT version, policy_hash FROM consent_heads WHERE pseudonym = ?1",
                [pseudonym],
                |r| {
                    Ok(crate::consent_heads::ConsentHead {
                        version: r.get(0)?,
                        policy_hash: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn record_consent_heads(&self, receipts: &[consent_policy::ConsentReceipt]) -> Result<()> {
        let mut stmt = self.db.prepare_cached(
            "INSERT INTO consent_heads (pseudonym, version, policy_hash) VALUES (?1, ?2, ?3)
             ON CONFLICT (pseudonym) DO UPDATE SET version = excluded.version, policy_hash = excluded.policy_hash
             WHERE excluded.version > consent_heads.version",
        )?;
        for r in receipts {
            stmt.execute(params![r.pseudonym, r.version, r.policy_hash])?;
        }
        Ok(())
    }

    /// What an earlier import established about the patient (nothing, for a new one).
    /// Category keys that are not the ones this patient's seed recorded (a damaged row, or
    /// a version with other categories) are not used: they are derived again, so that no
    /// record is ever sealed to a key the patient does not hold.
    pub fn known(&self, patient: &Identity) -> Result<Known> {
        let row: Option<(Option<Vec<u8>>, bool)> = self
            .db
            .prepare_cached("SELECT category_keys, enrolled FROM known WHERE pseudonym = ?1")?
            .query_row([patient.pseudonym()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((stored, enrolled)) = row else {
            return Ok(Known::default());
        };
        let category_keys = stored.and_then(|bytes| {
            let (keys, tag) = bytes.split_at_checked(Category::ALL.len() * PUBLIC_KEY_LEN)?;
            if tag != keys_tag(patient.seed(), keys).as_bytes() {
                return None;
            }
            keys.chunks(PUBLIC_KEY_LEN)
                .map(|k| public_key_from_bytes(k).ok())
                .collect::<Option<Vec<_>>>()
        });
        Ok(Known {
            category_keys,
            enrolled,
        })
    }

    /// Records what an ingested batch established: every patient enrolled, and the
    /// category keys derived in it. Patients this keystore does not hold are ignored.
    pub fn record_learned(&self, learned: &[Learned]) -> Result<()> {
        let mut seed_of = self
            .db
            .prepare_cached("SELECT seed FROM patients WHERE pseudonym = ?1")?;
        let mut stmt = self.db.prepare_cached(
            "INSERT INTO known (pseudonym, category_keys, enrolled) VALUES (?1, ?2, 1)
             ON CONFLICT (pseudonym) DO UPDATE SET enrolled = 1,
                 category_keys = COALESCE(excluded.category_keys, known.category_keys)",
        )?;
        for l in learned {
            let Some(seed) = seed_of
                .query_row([&l.pseudonym], |r| {
                    r.get::<_, Vec<u8>>(0).map(Zeroizing::new)
                })
                .optional()?
            else {
                continue;
            };
            let keys: Option<Vec<u8>> = l.category_keys.as_ref().map(|keys| {
                let mut bytes: Vec<u8> = keys.iter().flat_map(public_key_bytes).collect();
                let tag = keys_tag(&seed, &bytes);
                bytes.extend_from_slice(tag.as_bytes());
                bytes
            });
            stmt.execute(params![l.pseudonym, keys])?;
        }
        Ok(())
    }

    /// Runs `f` in one transaction (bulk creation during an import).
    pub fn transaction<T>(&mut self, f: impl FnOnce(&Keystore) -> Result<T>) -> Result<T> {
        self.db.execute_batch("BEGIN")?;
        match f(self) {
            Ok(v) => {
                self.db.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.db.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_source_id_same_keys_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keystore.db");
        let (a, created) = Keystore::open(&path).unwrap().get_or_create("p1").unwrap();
        assert!(created);
        let ks = Keystore::open(&path).unwrap();
        let (b, created) = ks.get_or_create("p1").unwrap();
        assert!(!created);
        assert_eq!(a.verifying_key(), b.verifying_key());
        let (c, _) = ks.get_or_create("p2").unwrap();
        assert_ne!(a.verifying_key(), c.verifying_key());
        assert_eq!(ks.all().unwrap().len(), 2);
    }

    #[test]
    fn known_keys_are_used_only_when_they_are_the_seeds() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::open(&dir.path().join("keystore.db")).unwrap();
        let (a, _) = ks.get_or_create("a").unwrap();
        let (b, _) = ks.get_or_create("b").unwrap();
        assert!(ks.known(&a).unwrap().category_keys.is_none());
        assert!(!ks.known(&a).unwrap().enrolled);
        let keys = |p: &Identity| -> Vec<umbral_pre::PublicKey> {
            Category::ALL
                .iter()
                .map(|c| p.category_public_key(*c))
                .collect()
        };
        let learned = |p: &Identity, keys: Option<Vec<umbral_pre::PublicKey>>| Learned {
            pseudonym: p.pseudonym(),
            category_keys: keys,
        };
        ks.record_learned(&[learned(&a, Some(keys(&a))), learned(&b, None)])
            .unwrap();
        let known = ks.known(&a).unwrap();
        assert!(known.enrolled);
        assert_eq!(known.category_keys, Some(keys(&a)));
        // Enrolled without keys; a later batch that derived them keeps them.
        assert!(ks.known(&b).unwrap().enrolled);
        assert!(ks.known(&b).unwrap().category_keys.is_none());
        ks.record_learned(&[learned(&b, Some(keys(&b)))]).unwrap();
        assert_eq!(ks.known(&b).unwrap().category_keys, Some(keys(&b)));
        ks.record_learned(&[learned(&b, None)]).unwrap();
        assert_eq!(ks.known(&b).unwrap().category_keys, Some(keys(&b)));
        // Another patient's keys, or a damaged byte, are not taken for this patient's.
        let swap = |from: &Identity, to: &Identity| {
            ks.db
                .execute(
                    "UPDATE known SET category_keys = (SELECT category_keys FROM known WHERE pseudonym = ?1) WHERE pseudonym = ?2",
                    params![from.pseudonym(), to.pseudonym()],
                )
                .unwrap();
        };
        swap(&a, &b);
        assert!(ks.known(&b).unwrap().category_keys.is_none());
        let mut stored: Vec<u8> = ks
            .db
            .query_row(
                "SELECT category_keys FROM known WHERE pseudonym = ?1",
                [a.pseudonym()],
                |r| r.get(0),
            )
            .unwrap();
        stored[40] ^= 1;
        ks.db
            .execute(
                "UPDATE known SET category_keys = ?1 WHERE pseudonym = ?2",
                params![stored, a.pseudonym()],
            )
            .unwrap();
        assert!(ks.known(&a).unwrap().category_keys.is_none());
    }
}
