//! Studies.

use super::*;

impl Db {
    /// Stores a proposed study with its log event as an intent, in one transaction.
    pub fn insert_study(
        &mut self,
        s: &Study,
        log_size: u64,
        event: &audit_log::AuditEvent,
    ) -> DbResult<Vec<i64>> {
        let proposal = serde_json::to_string(&s.proposal).expect("proposal serializes");
        self.with_intents(log_size, std::slice::from_ref(event), |tx| {
            tx.execute(
                "INSERT INTO studies (study_id, sponsor_id, proposal, status, proposed_at, sponsor_organisation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![s.study_id, s.sponsor_id, proposal, s.status.as_str(), s.proposed_at, s.sponsor_organisation],
            )
        })
        .map(|(_, intents)| intents)
    }

    /// Stores a board's decision with its log event as an intent, in one transaction.
    pub fn decide_study(
        &mut self,
        s: &Study,
        log_size: u64,
        event: &audit_log::AuditEvent,
    ) -> DbResult<Vec<i64>> {
        self.with_intents(log_size, std::slice::from_ref(event), |tx| {
            tx.execute(
                "UPDATE studies SET status = ?2, board_id = ?3, board_signature = ?4, reason = ?5, decided_at = ?6,
                 overrides_abstain = ?7 WHERE study_id = ?1",
                params![s.study_id, s.status.as_str(), s.board_id, s.board_signature, s.reason, s.decided_at, s.overrides_abstain],
            )
        })
        .map(|(_, intents)| intents)
    }

    pub fn study(&self, study_id: &str) -> DbResult<Option<Study>> {
        self.conn
            .query_row(
                &format!("{STUDY_SELECT} WHERE study_id = ?1"),
                [study_id],
                study_row,
            )
            .optional()
    }

    pub fn studies(&self) -> DbResult<Vec<Study>> {
        let mut stmt = self
            .conn
            .prepare(&format!("{STUDY_SELECT} ORDER BY proposed_at, study_id"))?;
        stmt.query_map([], study_row)?.collect()
    }
}

const STUDY_SELECT: &str = "SELECT study_id, sponsor_id, proposal, status, board_id, board_signature, reason, proposed_at, decided_at, overrides_abstain, sponsor_organisation FROM studies";

fn study_row(r: &rusqlite::Row<'_>) -> DbResult<Study> {
    let proposal: String = r.get(2)?;
    let proposal: StudyProposal = serde_json::from_str(&proposal).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let status: String = r.get(3)?;
    Ok(Study {
        study_id: r.get(0)?,
        sponsor_id: r.get(1)?,
        proposal,
        status: StudyStatus::parse(&status).unwrap_or(StudyStatus::Proposed),
        board_id: r.get(4)?,
        board_signature: r.get(5)?,
        reason: r.get(6)?,
        proposed_at: r.get(7)?,
        decided_at: r.get(8)?,
        overrides_abstain: r.get(9)?,
        sponsor_organisation: r.get(10)?,
    })
}
