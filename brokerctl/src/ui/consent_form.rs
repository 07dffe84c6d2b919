//! A patient's consent as a form and in plain words: the form's choices become a policy
//! version the patient signs; any policy, however it was written, reads as sentences.
//!
//! The form covers what most patients choose: which research (any, health only, none),
//! whether only not-for-profit research, which categories, which searchable fields, and
//! break-glass. A policy with more than that (several provisions, periods, named
//! organisations) is shown in full in words; saving the form replaces it.

use std::collections::BTreeSet;

use consent_policy::{
    BreakGlass, Categories, ConsentPolicy, DataUse, Effect, Modifier, PolicyDraft, Primary,
    Provision,
};
use model::{Category, SearchField};

/// Which research the patient allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Research {
    None,
    /// DUO GRU.
    Any,
    /// DUO HMB.
    Health,
}

/// The form's choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentForm {
    pub research: Research,
    /// DUO NPU: only non-commercial research by not-for-profit organisations.
    pub not_for_profit: bool,
    pub categories: BTreeSet<Category>,
    pub fields: BTreeSet<SearchField>,
    pub break_glass: bool,
}

/// The categories research can have (`critical` is for break-glass only).
pub fn research_categories() -> impl Iterator<Item = Category> {
    Category::ALL
        .into_iter()
        .filter(|c| *c != Category::Critical)
}

/// A category's name for people.
pub fn category_name(c: Category) -> &'static str {
    match c {
        Category::Demographics => "Demographics (birth year, sex, region)",
        Category::Conditions => "Conditions and diagnoses",
        Category::Observations => "Lab results and measurements",
        Category::Medications => "Medications",
        Category::Procedures => "Procedures",
        Category::Immunizations => "Immunizations",
        Category::Allergies => "Allergies",
        Category::Encounters => "Visits and admissions",
        Category::MentalHealth => "Mental health (sensitive)",
        Category::SubstanceUse => "Substance use (sensitive)",
        Category::SexualHealth => "Sexual health (sensitive)",
        Category::Genomics => "Genomics (sensitive)",
        Category::Critical => "Critical emergency information",
    }
}

/// A searchable field's name for people.
pub fn field_name(f: SearchField) -> &'static str {
    match f {
        SearchField::BirthYear => "Birth year",
        SearchField::Sex => "Sex",
        SearchField::Condition => "Condition codes",
        SearchField::Measurement => "Lab result codes and values",
        SearchField::Drug => "Medication codes",
        SearchField::Procedure => "Procedure codes",
        SearchField::ObservationPeriod => "Periods your records cover",
    }
}

impl ConsentForm {
    /// What the form shows for `policy` (nothing shared without one), and a note when
    /// the policy says more than the form can show.
    pub fn from_policy(policy: Option<&ConsentPolicy>) -> (ConsentForm, Option<String>) {
        let mut form = ConsentForm {
            research: Research::None,
            not_for_profit: false,
            categories: BTreeSet::new(),
            fields: BTreeSet::new(),
            break_glass: false,
        };
        let Some(policy) = policy else {
            return (form, None);
        };
        form.break_glass = policy.break_glass() == BreakGlass::Allow;
        let provisions = policy.provisions();
        let permit = provisions.iter().find(|p| p.effect == Effect::Permit);
        if let Some(p) = permit {
            let use_ = p.data_use.as_ref();
            form.research = match use_.map(|u| &u.primary) {
                Some(Primary::Gru) => Research::Any,
                Some(_) => Research::Health,
                None => Research::None,
            };
            form.not_for_profit = use_.is_some_and(|u| u.modifiers.contains(&Modifier::Npu));
            form.categories = p
                .categories
                .clone()
                .unwrap_or_else(Categories::all_standard)
                .resolve()
                .into_iter()
                .filter(|c| *c != Category::Critical)
                .collect();
            form.fields = p.fields.clone().unwrap_or_default();
        }
        let simple = provisions.len() <= 1
            && permit.is_none_or(|p| {
                p.period.is_none()
                    && p.actors.is_empty()
                    && p.provisions.is_empty()
                    && p.data_use.as_ref().is_some_and(|u| {
                        matches!(u.primary, Primary::Gru | Primary::Hmb)
                            && u.modifiers.iter().all(|m| *m == Modifier::Npu)
                    })
            })
            && policy.period().is_none();
        let note = (!simple).then(|| {
            "Your current consent says more than this form can show (it is written out in full above). Saving the form replaces it with what the form says.".to_owned()
        });
        (form, note)
    }

    /// The form from its posted fields.
    pub fn from_fields(fields: &[(String, String)]) -> Result<ConsentForm, String> {
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        let research = match get("research").map(String::as_str) {
            Some("any") => Research::Any,
            Some("health") => Research::Health,
            Some("none") | None => Research::None,
            Some(other) => return Err(format!("{other:?} is not a research choice")),
        };
        let mut categories = BTreeSet::new();
        let mut searchable = BTreeSet::new();
        for (k, _) in fields {
            if let Some(label) = k.strip_prefix("category.") {
                let c: Category = label
                    .parse()
                    .map_err(|_| format!("{label:?} is not a category"))?;
                if c == Category::Critical {
                    return Err(
                        "critical information is shared only through break-glass".to_owned()
                    );
                }
                categories.insert(c);
            } else if let Some(name) = k.strip_prefix("field.") {
                searchable.insert(
                    SearchField::ALL
                        .into_iter()
                        .find(|f| f.as_str() == name)
                        .ok_or_else(|| format!("{name:?} is not a searchable field"))?,
                );
            }
        }
        if research != Research::None && categories.is_empty() {
            return Err(
                "choose at least one category to share, or choose not to share for research"
                    .to_owned(),
            );
        }
        Ok(ConsentForm {
            research,
            not_for_profit: get("not_for_profit").is_some(),
            categories,
            fields: searchable,
            break_glass: get("break_glass").is_some(),
        })
    }

    /// The form as posted fields (carried from the preview to the signature).
    pub fn to_fields(&self) -> Vec<(String, String)> {
        let mut out = vec![(
            "research".to_owned(),
            match self.research {
                Research::None => "none",
                Research::Any => "any",
                Research::Health => "health",
            }
            .to_owned(),
        )];
        if self.not_for_profit {
            out.push(("not_for_profit".into(), "on".into()));
        }
        if self.break_glass {
            out.push(("break_glass".into(), "on".into()));
        }
        out.extend(
            self.categories
                .iter()
                .map(|c| (format!("category.{}", c.label()), "on".into())),
        );
        out.extend(
            self.fields
                .iter()
                .map(|f| (format!("field.{}", f.as_str()), "on".into())),
        );
        out
    }

    /// The policy version the form says, for the patient to sign.
    pub fn draft(&self, version: u32, issued_at: i64) -> PolicyDraft {
        let mut draft = PolicyDraft::new(version, issued_at);
        draft.break_glass = if self.break_glass {
            BreakGlass::Allow
        } else {
            BreakGlass::Deny
        };
        let primary = match self.research {
            Research::None => return draft,
            Research::Any => Primary::Gru,
            Research::Health => Primary::Hmb,
        };
        let mut use_ = DataUse::new(primary);
        if self.not_for_profit {
            use_ = use_.with(Modifier::Npu);
        }
        let mut permit = Provision::permit(use_);
        permit.categories = Some(Categories::only(self.categories.iter().copied()));
        permit.fields = Some(self.fields.clone());
        draft.provisions.push(permit);
        draft
    }
}

fn list<T>(items: impl IntoIterator<Item = T>, name: impl Fn(T) -> &'static str) -> String {
    let names: Vec<&str> = items.into_iter().map(name).collect();
    if names.is_empty() {
        "nothing".to_owned()
    } else {
        names.join("; ")
    }
}

fn research_words(u: &DataUse) -> String {
    let mut s = match &u.primary {
        Primary::Gru => "any research".to_owned(),
        Primary::Hmb => "health, medical or biomedical research".to_owned(),
        Primary::Ds(codes) => format!(
            "research on these diseases only: {}",
            codes.iter().cloned().collect::<Vec<_>>().join(", ")
        ),
        Primary::Poa => "population origins or ancestry research only".to_owned(),
    };
    for m in &u.modifiers {
        s.push_str(&match m {
            Modifier::Npu => ", by not-for-profit organisations and not for commercial use".into(),
            Modifier::Irb => ", only with ethics approval".into(),
            Modifier::Pub => ", only if the results are published".into(),
            Modifier::Col => ", only in collaboration with the original investigators".into(),
            Modifier::Rtn => ", only if derived data is returned".into(),
            Modifier::Ts(t) => format!(", until {}", super::page::when(*t)),
            Modifier::Gs(region) => format!(", only within {region}"),
            Modifier::Nmds => ", not for general methods development".into(),
            Modifier::Gso => ", genetic studies only".into(),
            Modifier::Npoa => ", not for population origins or ancestry research".into(),
        });
    }
    s
}

fn provision_words(p: &Provision, depth: usize, out: &mut Vec<String>) {
    let indent = "    ".repeat(depth);
    let mut s = match (p.effect, &p.data_use) {
        (Effect::Permit, Some(u)) => format!("{indent}Allowed: {}", research_words(u)),
        (Effect::Permit, None) => format!("{indent}Allowed, within the above"),
        (Effect::Deny, Some(u)) => format!("{indent}Not allowed: {}", research_words(u)),
        (Effect::Deny, None) => format!("{indent}Not allowed: any research"),
    };
    if let Some(period) = &p.period {
        match (period.start, period.end) {
            (Some(a), Some(b)) => s.push_str(&format!(
                ", from {} to {}",
                super::page::when(a),
                super::page::when(b)
            )),
            (Some(a), None) => s.push_str(&format!(", from {}", super::page::when(a))),
            (None, Some(b)) => s.push_str(&format!(", until {}", super::page::when(b))),
            (None, None) => {}
        }
    }
    if !p.actors.is_empty() {
        s.push_str(&format!(", for {} named requesters only", p.actors.len()));
    }
    if p.effect == Effect::Permit {
        if let Some(c) = &p.categories {
            s.push_str(&format!(
                ". Shares: {}",
                list(
                    c.resolve().into_iter().filter(|c| *c != Category::Critical),
                    category_name
                )
            ));
        }
        if let Some(f) = &p.fields {
            s.push_str(&format!(
                ". Searchable: {}",
                list(f.iter().copied(), field_name)
            ));
        }
    }
    s.push('.');
    out.push(s);
    for inner in &p.provisions {
        provision_words(inner, depth + 1, out);
    }
}

/// The policy in sentences, one per line.
pub fn describe(policy: &ConsentPolicy) -> Vec<String> {
    let mut out = Vec::new();
    if policy.provisions().is_empty() {
        out.push("Nothing is shared for research.".to_owned());
    }
    for p in policy.provisions() {
        provision_words(p, 0, &mut out);
    }
    if let Some(period) = policy.period() {
        out.push(format!(
            "This consent is in force {}.",
            match (period.start, period.end) {
                (Some(a), Some(b)) =>
                    format!("from {} to {}", super::page::when(a), super::page::when(b)),
                (Some(a), None) => format!("from {}", super::page::when(a)),
                (None, Some(b)) => format!("until {}", super::page::when(b)),
                (None, None) => "always".to_owned(),
            }
        ));
    }
    out.push(match policy.break_glass() {
        BreakGlass::Allow => "In an emergency, a registered emergency clinician may read your critical information (only that). You are told each time.".to_owned(),
        BreakGlass::Deny => "No emergency access, even in an emergency.".to_owned(),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form() -> ConsentForm {
        ConsentForm {
            research: Research::Health,
            not_for_profit: true,
            categories: [Category::Conditions, Category::Medications].into(),
            fields: [SearchField::BirthYear, SearchField::Condition].into(),
            break_glass: true,
        }
    }

    #[test]
    fn the_form_round_trips_through_its_fields_and_its_policy() {
        let f = form();
        assert_eq!(ConsentForm::from_fields(&f.to_fields()).unwrap(), f);
        let policy = f.draft(3, 1_700_000_000).check().unwrap();
        let (back, note) = ConsentForm::from_policy(Some(&policy));
        assert_eq!(back, f);
        assert_eq!(note, None);
        let words = describe(&policy).join("\n");
        assert!(
            words.contains("health, medical or biomedical research"),
            "{words}"
        );
        assert!(words.contains("not-for-profit"), "{words}");
        assert!(words.contains("Medications"), "{words}");
        assert!(!words.contains("Lab results"), "{words}");
        assert!(
            words.contains("may read your critical information"),
            "{words}"
        );
    }

    #[test]
    fn nothing_shared_is_a_valid_choice_and_bad_fields_are_refused() {
        let none = ConsentForm::from_fields(&[("research".into(), "none".into())]).unwrap();
        let policy = none.draft(1, 1).check().unwrap();
        assert!(policy.provisions().is_empty());
        assert_eq!(policy.break_glass(), BreakGlass::Deny);
        for bad in [
            vec![("research".into(), "everything".into())],
            vec![("research".into(), "any".into())],
            vec![
                ("research".into(), "any".into()),
                ("category.critical".into(), "on".into()),
            ],
            vec![
                ("research".into(), "any".into()),
                ("category.secrets".into(), "on".into()),
            ],
        ] {
            assert!(ConsentForm::from_fields(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_policy_beyond_the_form_is_described_and_flagged() {
        let mut draft = form().draft(2, 5);
        draft.provisions.push(Provision::deny());
        let policy = draft.check().unwrap();
        let (_, note) = ConsentForm::from_policy(Some(&policy));
        assert!(note.is_some());
        assert!(
            describe(&policy)
                .iter()
                .any(|l| l == "Not allowed: any research.")
        );
    }
}
