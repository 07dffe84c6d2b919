//! Actors and proxies.

use super::*;

impl Db {
    pub fn insert_actor(&self, actor: &Actor, now: i64) -> DbResult<bool> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO actors (actor_id, role, name, organisation, verifying_key, encryption_key, key_binding, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![actor.actor_id, actor.role.as_str(), actor.name, actor.organisation, actor.verifying_key,
                actor.encryption_key, actor.key_binding, now],
        )?;
        Ok(n == 1)
    }

    pub fn actor(&self, actor_id: &str) -> DbResult<Option<Actor>> {
        self.conn
            .query_row(
                "SELECT actor_id, role, name, organisation, verifying_key, encryption_key, key_binding FROM actors WHERE actor_id = ?1",
                [actor_id],
                actor_row,
            )
            .optional()
    }

    pub fn actors(&self) -> DbResult<Vec<Actor>> {
        let mut stmt = self
            .conn
            .prepare("SELECT actor_id, role, name, organisation, verifying_key, encryption_key, key_binding FROM actors ORDER BY created_at, actor_id")?;
        stmt.query_map([], actor_row)?.collect()
    }

    // ------------------------------------------------------------ proxies

    pub fn proxies(&self) -> DbResult<Vec<ProxyRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT proxy_id, encryption_key, verifying_key FROM proxies ORDER BY idx")?;
        stmt.query_map([], |r| {
            Ok(ProxyRow {
                proxy_id: r.get(0)?,
                encryption_key: r.get(1)?,
                verifying_key: r.get(2)?,
            })
        })?
        .collect()
    }

    pub fn set_proxies(&mut self, proxies: &[ProxyRow]) -> DbResult<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM proxies", [])?;
        for (i, p) in proxies.iter().enumerate() {
            tx.execute(
                "INSERT INTO proxies (idx, proxy_id, encryption_key, verifying_key) VALUES (?1, ?2, ?3, ?4)",
                params![i as i64, p.proxy_id, p.encryption_key, p.verifying_key],
            )?;
        }
        tx.commit()
    }
}

fn actor_row(r: &rusqlite::Row<'_>) -> DbResult<Actor> {
    let role: String = r.get(1)?;
    Ok(Actor {
        actor_id: r.get(0)?,
        role: role.parse::<Role>().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into())
        })?,
        name: r.get(2)?,
        organisation: r.get(3)?,
        verifying_key: r.get(4)?,
        encryption_key: r.get(5)?,
        key_binding: r.get(6)?,
    })
}
