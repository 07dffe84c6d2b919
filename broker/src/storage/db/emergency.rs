//! Emergency organisations and break-glass accesses.

use super::*;
use model::{BreakGlassAccess, EmergencyOrganisation, Review};

/// A break-glass access with the grant it used.
#[derive(Debug, Clone)]
pub struct BreakGlassRow {
    pub access: BreakGlassAccess,
    pub grant_id: String,
}

const ACCESS_COLUMNS: &str = "access_id, clinician_id, organisation_id, pseudonym, reason, card, created_at, expires_at, leaf, recent_uses, flagged, review_board, review_finding, review_note, reviewed_at, grant_id";

fn access_row(r: &rusqlite::Row<'_>) -> DbResult<BreakGlassRow> {
    let review_board: Option<String> = r.get(11)?;
    let review = match review_board {
        None => None,
        Some(board_id) => {
            let finding: String = r.get(12)?;
            Some(Review {
                board_id,
                finding: finding
                    .parse()
                    .map_err(|e: model::emergency::UnknownFinding| {
                        rusqlite::Error::FromSqlConversionFailure(
                            12,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?,
                note: r.get(13)?,
                reviewed_at: r.get(14)?,
            })
        }
    };
    Ok(BreakGlassRow {
        access: BreakGlassAccess {
            access_id: r.get(0)?,
            clinician_id: r.get(1)?,
            organisation_id: r.get(2)?,
            pseudonym: r.get(3)?,
            reason: r.get(4)?,
            card_presented: r.get(5)?,
            created_at: r.get(6)?,
            expires_at: r.get(7)?,
            leaf_index: r.get::<_, i64>(8)? as u64,
            recent_uses: r.get(9)?,
            flagged: r.get(10)?,
            review,
        },
        grant_id: r.get(15)?,
    })
}

impl Db {
    /// Registers an emergency organisation; the same registration again changes nothing.
    /// Returns the organisation as stored (an earlier registration wins).
    pub fn put_emergency_org(
        &self,
        org: &EmergencyOrganisation,
        now: i64,
    ) -> DbResult<EmergencyOrganisation> {
        self.conn.execute(
            "INSERT OR IGNORE INTO emergency_orgs (organisation_id, name, receiving_key, created_at)
             VALUES (?1, ?2, ?3, ?4)",
            params![org.organisation_id, org.name, org.receiving_key, now],
        )?;
        Ok(self
            .emergency_org(&org.organisation_id)?
            .expect("just inserted"))
    }

    pub fn emergency_org(&self, id: &str) -> DbResult<Option<EmergencyOrganisation>> {
        self.conn
            .query_row(
                "SELECT organisation_id, name, receiving_key FROM emergency_orgs WHERE organisation_id = ?1",
                [id],
                |r| {
                    Ok(EmergencyOrganisation {
                        organisation_id: r.get(0)?,
                        name: r.get(1)?,
                        receiving_key: r.get(2)?,
                    })
                },
            )
            .optional()
    }

    pub fn emergency_orgs(&self) -> DbResult<Vec<EmergencyOrganisation>> {
        let mut stmt = self.conn.prepare(
            "SELECT organisation_id, name, receiving_key FROM emergency_orgs ORDER BY organisation_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(EmergencyOrganisation {
                organisation_id: r.get(0)?,
                name: r.get(1)?,
                receiving_key: r.get(2)?,
            })
        })?;
        rows.collect()
    }

    /// The patient's unexpired grant to `grantee` holding `category`: its id.
    pub fn active_grant(
        &self,
        grantee: &str,
        pseudonym: &str,
        category: Category,
        now: i64,
    ) -> DbResult<Option<String>> {
        self.conn
            .query_row(
                "SELECT g.grant_id FROM grants g JOIN grant_categories c ON c.grant_id = g.grant_id
                 WHERE g.study_id = ?1 AND g.pseudonym = ?2 AND c.category = ?3 AND g.expires_at > ?4",
                params![grantee, pseudonym, category.label(), now],
                |r| r.get(0),
            )
            .optional()
    }

    /// How many break-glass attempts `clinician` made since `since` (unix seconds), refused
    /// ones included: every attempt by a clinician is a logged `break_glass` event.
    pub fn break_glass_attempts_since(&self, clinician: &str, since: i64) -> DbResult<u32> {
        self.conn.query_row(
            "SELECT COUNT(*) FROM audit_index WHERE kind = 'break_glass' AND actor = ?1 AND time > ?2",
            params![clinician, since],
            |r| r.get(0),
        )
    }

    /// How many break-glass accesses `clinician` made since `since` (unix seconds).
    pub fn break_glass_uses_since(&self, clinician: &str, since: i64) -> DbResult<u32> {
        self.conn.query_row(
            "SELECT COUNT(*) FROM break_glass WHERE clinician_id = ?1 AND created_at > ?2",
            params![clinician, since],
            |r| r.get(0),
        )
    }

    pub fn insert_break_glass(&self, row: &BreakGlassRow) -> DbResult<()> {
        let a = &row.access;
        self.conn.execute(
            "INSERT INTO break_glass (access_id, clinician_id, organisation_id, pseudonym, reason, card,
                 created_at, expires_at, leaf, recent_uses, flagged, grant_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                a.access_id,
                a.clinician_id,
                a.organisation_id,
                a.pseudonym,
                a.reason,
                a.card_presented,
                a.created_at,
                a.expires_at,
                a.leaf_index as i64,
                a.recent_uses,
                a.flagged,
                row.grant_id
            ],
        )?;
        Ok(())
    }

    pub fn break_glass(&self, access_id: &str) -> DbResult<Option<BreakGlassRow>> {
        self.conn
            .query_row(
                &format!("SELECT {ACCESS_COLUMNS} FROM break_glass WHERE access_id = ?1"),
                [access_id],
                access_row,
            )
            .optional()
    }

    /// Every access, newest first; only those not yet reviewed if asked.
    pub fn break_glass_list(&self, unreviewed_only: bool) -> DbResult<Vec<BreakGlassAccess>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {ACCESS_COLUMNS} FROM break_glass WHERE ?1 = 0 OR review_board IS NULL
             ORDER BY created_at DESC, access_id"
        ))?;
        let rows = stmt.query_map([unreviewed_only], access_row)?;
        rows.map(|r| r.map(|row| row.access)).collect()
    }

    /// Records a review, with its log event as an intent, in one transaction.
    pub fn review_break_glass(
        &mut self,
        access_id: &str,
        review: &Review,
        log_size: u64,
        event: &audit_log::AuditEvent,
    ) -> DbResult<Vec<i64>> {
        self.with_intents(log_size, std::slice::from_ref(event), |tx| {
            tx.execute(
                "UPDATE break_glass SET review_board = ?2, review_finding = ?3, review_note = ?4,
                     reviewed_at = ?5 WHERE access_id = ?1",
                params![
                    access_id,
                    review.board_id,
                    review.finding.as_str(),
                    review.note,
                    review.reviewed_at
                ],
            )?;
            Ok(())
        })
        .map(|(_, intents)| intents)
    }
}
