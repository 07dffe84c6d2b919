//! Patients' signed consent policy versions.

use super::*;

impl Db {
    /// Stores new policy versions (the caller has checked them), with their log events as intents and each patient
    /// marked for grant reconciliation, in one transaction. Returns the intents.
    pub fn insert_consents(
        &mut self,
        versions: &[(String, SignedPolicy)],
        log_size: u64,
        events: &[audit_log::AuditEvent],
    ) -> DbResult<Vec<i64>> {
        self.with_intents(log_size, events, |tx| {
            let mut reconcile = tx.prepare_cached(
                "INSERT OR IGNORE INTO consent_reconcile (pseudonym) VALUES (?1)",
            )?;
            for (pseudonym, _) in versions {
                reconcile.execute([pseudonym])?;
            }
            let mut stmt = tx.prepare_cached(
                "INSERT INTO consents (pseudonym, version, policy, signature, policy_hash, issued_at, set_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for (pseudonym, v) in versions {
                let p = &v.policy;
                stmt.execute(params![
                    pseudonym,
                    p.version(),
                    p.canonical_bytes(),
                    v.signature,
                    p.policy_hash().to_hex(),
                    p.issued_at(),
                    v.set_at
                ])?;
            }
            Ok(())
        })
        .map(|(_, intents)| intents)
    }

    /// Patients whose new consent may still have grants to withdraw.
    pub fn consents_to_reconcile(&self) -> DbResult<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT pseudonym FROM consent_reconcile ORDER BY pseudonym")?;
        stmt.query_map([], |r| r.get(0))?.collect()
    }

    pub fn consents_reconciled(&self, pseudonyms: &[String]) -> DbResult<()> {
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM consent_reconcile WHERE pseudonym = ?1")?;
        for p in pseudonyms {
            stmt.execute([p])?;
        }
        Ok(())
    }

    /// Every stored policy version of a patient, oldest first.
    pub fn consents(&self, pseudonym: &str) -> DbResult<Vec<SignedPolicy>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT policy, signature, set_at FROM consents WHERE pseudonym = ?1 ORDER BY version",
        )?;
        stmt.query_map([pseudonym], |r| {
            let bytes: Vec<u8> = r.get(0)?;
            let policy = ConsentPolicy::from_json(&bytes).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Blob,
                    Box::new(e),
                )
            })?;
            Ok(SignedPolicy {
                policy,
                signature: r.get(1)?,
                set_at: r.get(2)?,
            })
        })?
        .collect()
    }

    /// Every indexed patient's policy versions, oldest first, by the number of the
    /// patient's index in the cohort engine: `f(index_id, versions)` for each patient with
    /// an index and a stored policy. Each distinct policy is parsed once (many patients
    /// share one, e.g. a custodian's broad consent).
    pub fn for_each_consent_history(
        &self,
        mut f: impl FnMut(i64, &[ConsentPolicy]),
    ) -> DbResult<()> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT p.index_id, c.policy_hash, c.policy FROM consents c
             JOIN index_person p ON p.pseudonym = c.pseudonym ORDER BY p.index_id, c.version",
        )?;
        let mut parsed: HashMap<String, ConsentPolicy> = HashMap::new();
        let mut current: Option<i64> = None;
        let mut versions: Vec<ConsentPolicy> = Vec::new();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let person: i64 = r.get(0)?;
            let hash: String = r.get(1)?;
            if current != Some(person) {
                if let Some(p) = current {
                    f(p, &versions);
                }
                versions.clear();
                current = Some(person);
            }
            let policy = match parsed.get(&hash) {
                Some(p) => p.clone(),
                None => {
                    let bytes: Vec<u8> = r.get(2)?;
                    let p = ConsentPolicy::from_json(&bytes).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            2,
                            rusqlite::types::Type::Blob,
                            Box::new(e),
                        )
                    })?;
                    parsed.insert(hash, p.clone());
                    p
                }
            };
            versions.push(policy);
        }
        if let Some(p) = current {
            f(p, &versions);
        }
        Ok(())
    }

    /// A patient's grants: (study id, categories, expiry).
    pub fn patient_grants(&self, pseudonym: &str) -> DbResult<Vec<(String, Vec<Category>, i64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT g.study_id, c.category, g.expires_at FROM grants g JOIN grant_categories c ON c.grant_id = g.grant_id
             WHERE g.pseudonym = ?1 ORDER BY g.study_id",
        )?;
        let mut out: Vec<(String, Vec<Category>, i64)> = Vec::new();
        let mut rows = stmt.query([pseudonym])?;
        while let Some(r) = rows.next()? {
            let study: String = r.get(0)?;
            let c = category_col(r.get(1)?)?;
            match out.last_mut() {
                Some((s, cats, _)) if *s == study => cats.push(c),
                _ => out.push((study, vec![c], r.get(2)?)),
            }
        }
        Ok(out)
    }
}
