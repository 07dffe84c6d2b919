//! A definition as one portable SQL query, for other engines (PostgreSQL, DuckDB,
//! DataFusion's SQL front end) over the Parquet export of the index and the consent
//! snapshot ([`IndexTables::write_parquet_dir`](crate::IndexTables::write_parquet_dir),
//! [`ConsentSnapshot::write_parquet`](crate::ConsentSnapshot::write_parquet)).
//!
//! The engine never runs SQL: this exists so that benchmarks and tests can check the
//! engine's exact counts against independent engines. The query returns one row with one
//! column, `count`, and applies the consent filter by joining `consent(person_id, field)`
//! exactly as the engine does: patients without any consent row are absent, event rows
//! count only with a consent row for their table (and, for a code that is sensitive, a
//! consent row for each of its sensitive categories: `field = 'sexual_health'`, ...),
//! `birth_year`/`sex` are NULL without a consent row for that field. An exclusion is set difference (a patient whose sex is
//! masked is *not* female, so `NOT female` includes them), as in the engine.
//!
//! ```text
//! WITH p AS (SELECT person.person_id,
//!                   CASE WHEN kb.person_id IS NOT NULL THEN person.birth_year END AS birth_year, ...
//!            FROM person JOIN (SELECT DISTINCT person_id FROM consent) ka ON ...
//!            LEFT JOIN consent kb ON kb.person_id = person.person_id AND kb.field = 'birth_year' ...)
//! SELECT COUNT(*) AS count FROM p
//! LEFT JOIN (SELECT DISTINCT e.person_id FROM condition e
//!            JOIN consent k ON k.person_id = e.person_id AND k.field = 'condition'
//!            WHERE e.code IN ('snomed:44054006')) s1 ON s1.person_id = p.person_id
//! WHERE (s1.person_id IS NOT NULL)
//! ```

use std::fmt::Write;

use crate::date::Date;
use crate::definition::{
    CohortDefinition, Criterion, Demographics, Domain, EventCriterion, Index, ObservationWindow,
    Occurrence, Window,
};
use crate::hierarchy::ConceptHierarchy;
use crate::sensitivity::{Gates, Sensitivity};

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn date(d: Date) -> String {
    format!("DATE '{d}'")
}

enum IndexSql {
    Date(Date),
    Event,
}

struct Renderer<'a> {
    hierarchy: &'a ConceptHierarchy,
    sensitivity: Sensitivity,
    index: Option<IndexSql>,
    /// Derived tables of person ids, left-joined as `s1`, `s2`, ...
    sets: Vec<String>,
}

/// The SQL query counting `definition`'s patients (see the module docs). `definition`
/// must be valid.
pub fn to_sql(definition: &CohortDefinition, hierarchy: &ConceptHierarchy) -> String {
    let mut r = Renderer {
        hierarchy,
        sensitivity: Sensitivity::new(hierarchy),
        index: None,
        sets: Vec::new(),
    };
    let mut ctes = vec![
        "p AS (\n  SELECT person.person_id,\n    \
         CASE WHEN kb.person_id IS NOT NULL THEN person.birth_year END AS birth_year,\n    \
         CASE WHEN ks.person_id IS NOT NULL THEN person.sex END AS sex\n  \
         FROM person\n  \
         JOIN (SELECT DISTINCT person_id FROM consent) ka ON ka.person_id = person.person_id\n  \
         LEFT JOIN consent kb ON kb.person_id = person.person_id AND kb.field = 'birth_year'\n  \
         LEFT JOIN consent ks ON ks.person_id = person.person_id AND ks.field = 'sex'\n)"
            .to_string(),
    ];
    let mut from = "FROM p".to_string();
    match &definition.index {
        Some(Index::Date(d)) => r.index = Some(IndexSql::Date(*d)),
        Some(Index::FirstEvent(event)) => {
            let (domain, e) = event.as_event().expect("validated: an event criterion");
            ctes.push(format!(
                "idx AS (\n  SELECT e.person_id, MIN(e.date) AS index_date\n  {}\n  GROUP BY e.person_id\n)",
                r.event_from_where(domain, e)
            ));
            from.push_str("\nJOIN idx ON idx.person_id = p.person_id");
            r.index = Some(IndexSql::Event);
        }
        None => {}
    }
    let conditions: Vec<String> = definition.criteria.iter().map(|c| r.criterion(c)).collect();
    let mut sql = String::from("WITH ");
    sql.push_str(&ctes.join(",\n"));
    sql.push_str("\nSELECT COUNT(*) AS count\n");
    sql.push_str(&from);
    for (i, set) in r.sets.iter().enumerate() {
        let _ = write!(
            sql,
            "\nLEFT JOIN (\n  {set}\n) s{n} ON s{n}.person_id = p.person_id",
            n = i + 1
        );
    }
    sql.push_str("\nWHERE ");
    if conditions.is_empty() {
        sql.push_str("TRUE");
    } else {
        sql.push_str(&conditions.join("\n  AND "));
    }
    sql
}

impl Renderer<'_> {
    fn criterion(&mut self, c: &Criterion) -> String {
        match c {
            Criterion::All(v) => {
                let parts: Vec<String> = v.iter().map(|c| self.criterion(c)).collect();
                format!("({})", parts.join(" AND "))
            }
            Criterion::Any(v) => {
                let parts: Vec<String> = v.iter().map(|c| self.criterion(c)).collect();
                format!("({})", parts.join(" OR "))
            }
            Criterion::AtLeast(a) => {
                let parts: Vec<String> =
                    a.of.iter()
                        .map(|c| format!("CASE WHEN {} THEN 1 ELSE 0 END", self.criterion(c)))
                        .collect();
                format!("(({}) >= {})", parts.join(" + "), a.n)
            }
            Criterion::Not(inner) => format!("(NOT {})", self.criterion(inner)),
            Criterion::Demographics(d) => self.demographics(d),
            Criterion::ObservationPeriod(w) => self.observation(w),
            other => {
                let (domain, e) = other.as_event().expect("event criterion");
                self.event(domain, e)
            }
        }
    }

    fn observation(&mut self, w: &ObservationWindow) -> String {
        let (prior, post) = (w.prior_days, w.post_days);
        let mut query = "SELECT DISTINCT o.person_id FROM observation_period o\n  \
             JOIN consent k ON k.person_id = o.person_id AND k.field = 'observation_period'"
            .to_string();
        match &self.index {
            Some(IndexSql::Date(d)) => {
                let _ = write!(
                    query,
                    "\n  WHERE o.start_date <= {} AND o.end_date >= {}",
                    date(d.add_days(-(prior as i32))),
                    date(d.add_days(post as i32))
                );
            }
            Some(IndexSql::Event) => {
                let _ = write!(
                    query,
                    "\n  JOIN idx i ON i.person_id = o.person_id\n  \
                     WHERE o.start_date <= i.index_date - INTERVAL '{prior} days' \
                     AND o.end_date >= i.index_date + INTERVAL '{post} days'"
                );
            }
            None => unreachable!("validated: an observation period needs an index"),
        }
        self.sets.push(query);
        format!("(s{}.person_id IS NOT NULL)", self.sets.len())
    }

    fn demographics(&self, d: &Demographics) -> String {
        let mut preds = Vec::new();
        if !d.sex.is_empty() {
            let list: Vec<String> = d.sex.iter().map(|s| quote(s.as_str())).collect();
            preds.push(format!("p.sex IN ({})", list.join(", ")));
        }
        if let Some(r) = d.birth_year {
            if let Some(min) = r.min {
                preds.push(format!("p.birth_year >= {min}"));
            }
            if let Some(max) = r.max {
                preds.push(format!("p.birth_year <= {max}"));
            }
        }
        if let Some(r) = d.age {
            let age = match &self.index {
                Some(IndexSql::Date(d)) => format!("({} - p.birth_year)", d.year()),
                Some(IndexSql::Event) => {
                    "(date_part('year', idx.index_date) - p.birth_year)".into()
                }
                None => unreachable!("validated: age needs an index"),
            };
            if let Some(min) = r.min {
                preds.push(format!("{age} >= {min}"));
            }
            if let Some(max) = r.max {
                preds.push(format!("{age} <= {max}"));
            }
        }
        // Masked (NULL) fields fail a demographic criterion, and its exclusion holds.
        format!("COALESCE({}, FALSE)", preds.join(" AND "))
    }

    /// `FROM <table> e JOIN consent k ... WHERE <codes, window, value, unit>`.
    fn event_from_where(&self, domain: Domain, e: &EventCriterion) -> String {
        self.rows_from_where(domain, e, "e")
    }

    /// [`Self::event_from_where`] with the event table as `alias` (its consent rows are
    /// `{alias}k` and `{alias}kc`, so that an anchor's subquery inside an event's does not
    /// shadow the event's).
    fn rows_from_where(&self, domain: Domain, e: &EventCriterion, alias: &str) -> String {
        let table = domain.as_str();
        let (k, kc) = if alias == "e" {
            ("k".to_string(), "kc".to_string())
        } else {
            (format!("{alias}k"), format!("{alias}kc"))
        };
        // Codes grouped by the sensitive categories that gate them.
        let mut groups: Vec<(Gates, Vec<String>)> = Vec::new();
        for code in self.hierarchy.expand(&e.codes, e.include_descendants) {
            let gates = self.sensitivity.gates_of(&code);
            let quoted = quote(&code.to_string());
            match groups.iter_mut().find(|(g, _)| *g == gates) {
                Some((_, list)) => list.push(quoted),
                None => groups.push((gates, vec![quoted])),
            }
        }
        let alternatives: Vec<String> = groups
            .into_iter()
            .map(|(gates, codes)| {
                let mut parts = vec![format!("{alias}.code IN ({})", codes.join(", "))];
                for category in gates.iter() {
                    parts.push(format!(
                        "EXISTS (SELECT 1 FROM consent {kc} WHERE {kc}.person_id = \
                         {alias}.person_id AND {kc}.field = {})",
                        quote(category.label())
                    ));
                }
                parts.join(" AND ")
            })
            .collect();
        let mut preds = vec![match alternatives.as_slice() {
            [one] => one.clone(),
            _ => format!("({})", alternatives.join(" OR ")),
        }];
        let window = match (&e.window, &self.index) {
            (Some(Window::Between { from, to }), _) => Some((*from, *to)),
            (Some(Window::DaysFromIndex { from, to }), Some(IndexSql::Date(d))) => {
                Some((from.map(|f| d.add_days(f)), to.map(|t| d.add_days(t))))
            }
            _ => None,
        };
        if let Some((from, to)) = window {
            if let Some(from) = from {
                preds.push(format!("{alias}.date >= {}", date(from)));
            }
            if let Some(to) = to {
                preds.push(format!("{alias}.date <= {}", date(to)));
            }
        }
        if let Some(v) = e.value {
            if let Some(min) = v.min {
                preds.push(format!("{alias}.value >= {min:?}"));
            }
            if let Some(max) = v.max {
                preds.push(format!("{alias}.value <= {max:?}"));
            }
        }
        if let Some(unit) = &e.unit {
            preds.push(format!("{alias}.unit = {}", quote(unit)));
        }
        let mut joins = format!(
            "FROM {table} {alias}\n  JOIN consent {k} ON {k}.person_id = {alias}.person_id \
             AND {k}.field = {}",
            quote(table)
        );
        match (&e.window, &self.index) {
            (Some(Window::DaysFromIndex { from, to }), Some(IndexSql::Event)) => {
                joins.push_str(&format!(
                    "\n  JOIN idx i ON i.person_id = {alias}.person_id"
                ));
                if let Some(from) = from {
                    preds.push(format!(
                        "{alias}.date >= i.index_date + INTERVAL '{from} days'"
                    ));
                }
                if let Some(to) = to {
                    preds.push(format!(
                        "{alias}.date <= i.index_date + INTERVAL '{to} days'"
                    ));
                }
            }
            (Some(Window::DaysFromEvent { event, from, to }), _) => {
                // EXISTS, not a join: a row counts once however many anchors it has.
                let (anchor_domain, anchor) = event.as_event().expect("validated: an event");
                let a = format!("{alias}a");
                let mut exists = format!(
                    "EXISTS (SELECT 1 {}\n    AND {a}.person_id = {alias}.person_id",
                    self.rows_from_where(anchor_domain, anchor, &a)
                );
                if let Some(from) = from {
                    let _ = write!(
                        exists,
                        " AND {alias}.date >= {a}.date + INTERVAL '{from} days'"
                    );
                }
                if let Some(to) = to {
                    let _ = write!(
                        exists,
                        " AND {alias}.date <= {a}.date + INTERVAL '{to} days'"
                    );
                }
                exists.push(')');
                preds.push(exists);
            }
            _ => {}
        }
        format!("{joins}\n  WHERE {}", preds.join(" AND "))
    }

    fn event(&mut self, domain: Domain, e: &EventCriterion) -> String {
        let body = self.event_from_where(domain, e);
        let (query, negate) = match e.occurrence {
            Occurrence::AtLeast(1) => (format!("SELECT DISTINCT e.person_id {body}"), false),
            Occurrence::AtLeast(n) => (grouped(&body, ">=", n), false),
            Occurrence::Exactly(0) | Occurrence::AtMost(0) => {
                (format!("SELECT DISTINCT e.person_id {body}"), true)
            }
            Occurrence::Exactly(n) => (grouped(&body, "=", n), false),
            Occurrence::AtMost(n) => (grouped(&body, ">", n), true),
        };
        self.sets.push(query);
        let present = format!("(s{}.person_id IS NOT NULL)", self.sets.len());
        if negate {
            format!("(NOT {present})")
        } else {
            present
        }
    }
}

fn grouped(body: &str, op: &str, n: u32) -> String {
    format!("SELECT e.person_id {body}\n  GROUP BY e.person_id HAVING COUNT(*) {op} {n}")
}
