//! The reference evaluator: answers a cohort definition patient by patient over plain
//! `PatientIndex` rows, written independently of the engine (no DataFusion, no person
//! sets, no code index). The engine's tests and the broker's release property test both
//! compare against it.

use std::collections::BTreeSet;

use cohort_query::{
    Code, CodedEvent, CohortDefinition, ConceptHierarchy, ConsentSnapshot, Criterion, Date,
    Demographics, Domain, EventCriterion, Index, Occurrence, PatientIndex, SearchField, Window,
};

/// The reference: whether each visible patient matches, answered patient by patient.
pub struct Reference<'a> {
    pub hierarchy: &'a ConceptHierarchy,
    pub consent: &'a ConsentSnapshot,
}

struct Patient<'a> {
    id: i64,
    p: &'a PatientIndex,
    index_day: Option<i32>,
}

fn day(s: &str) -> i32 {
    s.parse::<Date>().unwrap().days()
}

impl Reference<'_> {
    /// A patient's rows of a table that count: the field consented, and every sensitive
    /// category of the row's code permitted.
    fn rows<'p>(&self, pt: &Patient<'p>, domain: Domain) -> Vec<&'p CodedEvent> {
        if !self.consent.allows(pt.id, SearchField::of_domain(domain)) {
            return Vec::new();
        }
        let rows = match domain {
            Domain::Condition => &pt.p.conditions,
            Domain::Measurement => &pt.p.measurements,
            Domain::Drug => &pt.p.drugs,
            Domain::Procedure => &pt.p.procedures,
        };
        let sensitive = model::sensitive::SensitiveCodes::new(self.hierarchy);
        rows.iter()
            .filter(|r| {
                let code: Code = format!("{}:{}", r.system, r.code).parse().unwrap();
                sensitive
                    .categories(&code)
                    .into_iter()
                    .all(|c| self.consent.permits(pt.id, c))
            })
            .collect()
    }

    fn matching(
        &self,
        pt: &Patient<'_>,
        domain: Domain,
        e: &EventCriterion,
        fixed: Option<Date>,
    ) -> usize {
        self.plain_rows(pt, domain, e)
            .into_iter()
            .filter(|r| {
                let d = day(&r.date);
                match &e.window {
                    None => true,
                    Some(Window::Between { from, to }) => {
                        from.is_none_or(|f| d >= f.days()) && to.is_none_or(|t| d <= t.days())
                    }
                    Some(Window::DaysFromIndex { from, to }) => {
                        let index = match fixed {
                            Some(f) => f.days(),
                            None => pt.index_day.expect("in population"),
                        };
                        // Fixed dates clamp like Date::add_days; irrelevant for these ranges.
                        from.is_none_or(|f| d - index >= f) && to.is_none_or(|t| d - index <= t)
                    }
                    Some(Window::DaysFromEvent { event, from, to }) => {
                        // Some anchor of the patient's, `from..=to` days before this row.
                        let (anchor_domain, anchor) = event.as_event().unwrap();
                        self.anchor_days(pt, anchor_domain, anchor)
                            .into_iter()
                            .any(|a| {
                                from.is_none_or(|f| d - a >= f) && to.is_none_or(|t| d - a <= t)
                            })
                    }
                }
            })
            .count()
    }

    /// A patient's visible rows of the criterion's codes, value range and unit (any date).
    fn plain_rows<'p>(
        &self,
        pt: &Patient<'p>,
        domain: Domain,
        e: &EventCriterion,
    ) -> Vec<&'p CodedEvent> {
        let codes: BTreeSet<String> = self
            .hierarchy
            .expand(&e.codes, e.include_descendants)
            .iter()
            .map(|c| c.to_string())
            .collect();
        self.rows(pt, domain)
            .into_iter()
            .filter(|r| codes.contains(&format!("{}:{}", r.system, r.code)))
            .filter(|r| match e.value {
                None => true,
                Some(v) => r
                    .value
                    .is_some_and(|x| v.min.is_none_or(|m| x >= m) && v.max.is_none_or(|m| x <= m)),
            })
            .filter(|r| e.unit.as_ref().is_none_or(|u| &r.unit == u))
            .collect()
    }

    /// The days of a patient's visible rows matching a plain event criterion (codes,
    /// calendar window, value, unit; no occurrence, no relative window).
    fn anchor_days(&self, pt: &Patient<'_>, domain: Domain, e: &EventCriterion) -> Vec<i32> {
        self.plain_rows(pt, domain, e)
            .into_iter()
            .map(|r| day(&r.date))
            .filter(|&d| match &e.window {
                None => true,
                Some(Window::Between { from, to }) => {
                    from.is_none_or(|f| d >= f.days()) && to.is_none_or(|t| d <= t.days())
                }
                Some(other) => panic!("not a plain event criterion: {other:?}"),
            })
            .collect()
    }

    fn demographics(&self, pt: &Patient<'_>, d: &Demographics, index_year: Option<i32>) -> bool {
        let sex = self
            .consent
            .allows(pt.id, SearchField::Sex)
            .then_some(pt.p.person.sex.as_str());
        let year = if self.consent.allows(pt.id, SearchField::BirthYear) {
            pt.p.person.birth_year
        } else {
            None
        };
        if !d.sex.is_empty() && !sex.is_some_and(|s| d.sex.iter().any(|x| x.as_str() == s)) {
            return false;
        }
        let in_range = |v: Option<i32>, r: cohort_query::IntRange| {
            v.is_some_and(|v| r.min.is_none_or(|m| v >= m) && r.max.is_none_or(|m| v <= m))
        };
        if let Some(r) = d.birth_year
            && !in_range(year, r)
        {
            return false;
        }
        if let Some(r) = d.age {
            let age = year.zip(index_year).map(|(y, i)| i - y);
            if !in_range(age, r) {
                return false;
            }
        }
        true
    }

    fn eval(&self, pt: &Patient<'_>, c: &Criterion, fixed: Option<Date>) -> bool {
        let index_year = match fixed {
            Some(d) => Some(d.year()),
            None => pt.index_day.map(|d| Date::from_days(d).unwrap().year()),
        };
        match c {
            Criterion::All(v) => v.iter().all(|c| self.eval(pt, c, fixed)),
            Criterion::Any(v) => v.iter().any(|c| self.eval(pt, c, fixed)),
            Criterion::AtLeast(a) => {
                a.of.iter().filter(|c| self.eval(pt, c, fixed)).count() >= a.n as usize
            }
            Criterion::Not(c) => !self.eval(pt, c, fixed),
            Criterion::Demographics(d) => self.demographics(pt, d, index_year),
            Criterion::ObservationPeriod(w) => {
                if !self.consent.allows(pt.id, SearchField::ObservationPeriod) {
                    return false;
                }
                let index = match fixed {
                    Some(f) => f.days(),
                    None => pt.index_day.expect("in population"),
                };
                let (prior, post) = (w.prior_days as i32, w.post_days as i32);
                pt.p.observation_periods
                    .iter()
                    .any(|p| index - day(&p.start) >= prior && day(&p.end) - index >= post)
            }
            other => {
                let (domain, e) = other.as_event().unwrap();
                let n = self.matching(pt, domain, e, fixed) as u32;
                match e.occurrence {
                    Occurrence::AtLeast(k) => n >= k,
                    Occurrence::AtMost(k) => n <= k,
                    Occurrence::Exactly(k) => n == k,
                }
            }
        }
    }

    /// Matching ids after each step (step 0: the population).
    pub fn steps(
        &self,
        patients: &[(i64, PatientIndex)],
        d: &CohortDefinition,
    ) -> Vec<BTreeSet<i64>> {
        let fixed = match &d.index {
            Some(Index::Date(x)) => Some(*x),
            _ => None,
        };
        let mut population: Vec<Patient<'_>> = Vec::new();
        for (id, p) in patients {
            if !self.consent.includes(*id) {
                continue;
            }
            let mut pt = Patient {
                id: *id,
                p,
                index_day: None,
            };
            if let Some(Index::FirstEvent(event)) = &d.index {
                let (domain, e) = event.as_event().unwrap();
                let first = self.anchor_days(&pt, domain, e).into_iter().min();
                match first {
                    Some(f) => pt.index_day = Some(f),
                    None => continue,
                }
            }
            population.push(pt);
        }
        let mut current: Vec<&Patient<'_>> = population.iter().collect();
        let mut out = vec![current.iter().map(|p| p.id).collect()];
        for c in &d.criteria {
            current.retain(|pt| self.eval(pt, c, fixed));
            out.push(current.iter().map(|p| p.id).collect());
        }
        out
    }
}
