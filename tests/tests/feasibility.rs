//! Feasibility counts through the real server: only consented fields count, sponsors see
//! protected counts that repeat exactly, the board sees exact counts, budgets run out with
//! a clear error, and every count is logged (a sponsor's with its budget charge). Averaging,
//! differencing and sensitive codes: `averaging.rs`.

use audit_log::EventKind;
use brokerctl::ClientError;
use consent_policy::broad_research_policy;
use consent_policy::{ConsentPolicy, SearchField};
use datasets::{PatientRecord, Population};
use integration_tests::Sandbox;
use model::CohortDefinition;
use model::Role;
use pre_kms::{Category, Identity};
use tonic::Code;

const HYPERTENSION: &str = "38341003";

fn definition(code: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "criteria": [{"condition": {"codes": [format!("snomed:{code}")]}}]
    }))
    .unwrap()
}

/// The broad preset without `condition` among its searchable fields.
fn without_conditions(now: i64) -> ConsentPolicy {
    let mut draft = broad_research_policy(1, now).into_draft();
    let fields = draft.provisions[0].fields.as_mut().unwrap();
    fields.remove(&SearchField::Condition);
    draft.check().unwrap()
}

fn has(record: &PatientRecord, code: &str) -> bool {
    record.index.conditions.iter().any(|c| c.code == code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_use_only_consented_fields_and_protect_what_sponsors_see() {
    let mut sandbox = Sandbox::start().await;
    sandbox
        .restart_with(|c| {
            c.count_budget = cohort_query::BudgetPolicy {
                per_minute: 3,
                total: 100,
            }
        })
        .await;
    let cast = sandbox.cast().await;
    let n = 60;
    let population = Population::new(17, n);
    let patients: Vec<(Identity, PatientRecord)> = (0..n)
        .map(|i| (Identity::generate(), population.patient(i)))
        .collect();
    brokerctl::agent::ingest_batch(&cast.custodian, patients.clone())
        .await
        .unwrap();
    // A third share everything, a third hide their conditions, a third never consent.
    let now = broker::service::now_secs();
    let policies: Vec<(Identity, ConsentPolicy)> = patients
        .iter()
        .enumerate()
        .filter_map(|(i, (id, _))| match i % 3 {
            0 => Some((id.clone(), broad_research_policy(1, now))),
            1 => Some((id.clone(), without_conditions(now))),
            _ => None,
        })
        .collect();
    brokerctl::agent::set_consents(&cast.custodian, &policies)
        .await
        .unwrap();
    let study = cast
        .approved_study(
            "feasibility",
            &[Category::Conditions],
            CohortDefinition::everyone(),
        )
        .await
        .unwrap();

    // The board's exact count equals what the consented fields alone give.
    let want = patients
        .iter()
        .enumerate()
        .filter(|(i, (_, r))| i % 3 == 0 && has(r, HYPERTENSION))
        .count();
    let all_with = patients
        .iter()
        .filter(|(_, r)| has(r, HYPERTENSION))
        .count();
    assert!(
        want > 0 && all_with > want,
        "the population must test the filter: {want} of {all_with}"
    );
    let exact = cast
        .board
        .count(&study.study_id, &definition(HYPERTENSION))
        .await
        .unwrap();
    assert!(exact.exact);
    assert_eq!(exact.count, want.to_string());
    assert_eq!(
        exact.attrition[0].count,
        (2 * n / 3).to_string(),
        "step 0: patients with consent"
    );

    // Flipping fields nobody consented to (conditions of those who hide them, everything
    // of those who never consented) changes no count.
    let flipped: Vec<(Identity, PatientRecord)> =
        patients
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(_, (id, r))| {
                let mut r = r.clone();
                let mut c = r.index.conditions.first().cloned().unwrap_or_else(|| {
                    cohort_query::CodedEvent {
                        system: "snomed".into(),
                        code: String::new(),
                        date: "2020-01-01".into(),
                        value: None,
                        unit: String::new(),
                    }
                });
                c.code = HYPERTENSION.into();
                if has(&r, HYPERTENSION) {
                    r.index.conditions.retain(|e| e.code != HYPERTENSION);
                } else {
                    r.index.conditions.push(c);
                }
                (id.clone(), r)
            })
            .collect();
    brokerctl::agent::ingest_batch(&cast.custodian, flipped)
        .await
        .unwrap();
    let after = cast
        .board
        .count(&study.study_id, &definition(HYPERTENSION))
        .await
        .unwrap();
    assert_eq!(
        after.count, exact.count,
        "a non-consented field changed a count"
    );
    assert_eq!(after.attrition, exact.attrition);
    // The same change to a patient who consented does show: the index is live.
    let (id, record) = patients
        .iter()
        .enumerate()
        .find(|(i, (_, r))| i % 3 == 0 && has(r, HYPERTENSION))
        .map(|(_, p)| p.clone())
        .unwrap();
    let mut record = record;
    record.index.conditions.retain(|e| e.code != HYPERTENSION);
    brokerctl::agent::ingest_batch(&cast.custodian, vec![(id.clone(), record)])
        .await
        .unwrap();
    let fewer = cast
        .board
        .count(&study.study_id, &definition(HYPERTENSION))
        .await
        .unwrap();
    assert_eq!(fewer.count, (want - 1).to_string());
    let want = want - 1;

    // Descendants come from the concept relations custodians upload; a bad code is
    // refused, naming the relation, and nothing of that call is stored.
    let parent = serde_json::to_vec(&serde_json::json!({"criteria": [{"condition": {
        "codes": ["snomed:64572001"], "include_descendants": true}}]}))
    .unwrap();
    let before = cast.board.count(&study.study_id, &parent).await.unwrap();
    assert_eq!(before.count, "0");
    let relation = |a: &str, d: &str| (a.to_owned(), d.to_owned());
    let err = cast
        .custodian
        .put_concepts(&[
            relation("snomed:64572001", &format!("snomed:{HYPERTENSION}")),
            relation("snomed:64572001", "snowmed:1"),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status(s) if s.code() == Code::InvalidArgument
            && s.message().contains("relation 1")),
        "{err}"
    );
    let unchanged = cast.board.count(&study.study_id, &parent).await.unwrap();
    assert_eq!(unchanged.count, "0", "a refused call stored a relation");
    let (added, held) = cast
        .custodian
        .put_concepts(&[relation(
            "snomed:64572001",
            &format!("snomed:{HYPERTENSION}"),
        )])
        .await
        .unwrap();
    assert_eq!((added, held), (1, 1));
    let expanded = cast.board.count(&study.study_id, &parent).await.unwrap();
    assert_eq!(expanded.count, want.to_string());

    // The sponsor's answer is protected and repeats exactly.
    let first = cast
        .sponsor
        .count(&study.study_id, &definition(HYPERTENSION))
        .await
        .unwrap();
    assert!(!first.exact);
    let again = cast
        .sponsor
        .count(&study.study_id, &definition(HYPERTENSION))
        .await
        .unwrap();
    assert_eq!(
        (&first.count, &first.attrition),
        (&again.count, &again.attrition)
    );
    if want < 11 {
        assert_eq!(first.count, "<11");
    } else {
        let shown: u64 = first.count.parse().unwrap();
        assert_eq!(shown % 5, 0, "rounded to 5: {shown}");
        assert!(shown.abs_diff(want as u64) <= 10, "{shown} vs {want}");
    }
    // A code nobody has: below the threshold, never zero.
    let none = cast
        .sponsor
        .count(&study.study_id, &definition("0000000"))
        .await
        .unwrap();
    assert_eq!(none.count, "<11");

    // Bad definitions and other sponsors are refused clearly.
    let err = cast
        .sponsor
        .count(&study.study_id, b"{\"criteria\": [{\"condition\": {}}]}")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status(s) if s.code() == Code::InvalidArgument),
        "{err}"
    );
    let other = sandbox.actor(Role::Sponsor).await;
    let err = other
        .count(&study.study_id, &definition(HYPERTENSION))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status(s) if s.code() == Code::PermissionDenied),
        "{err}"
    );

    // Three counts a minute: the fourth is refused until the minute passes (refused
    // definitions and other sponsors' calls charged nothing).
    let err = cast
        .sponsor
        .count(&study.study_id, &definition(HYPERTENSION))
        .await
        .unwrap_err();
    match &err {
        ClientError::Status(s) => {
            assert_eq!(s.code(), Code::ResourceExhausted, "{err}");
            assert!(s.message().contains("per minute"), "{err}");
        }
        other => panic!("{other}"),
    }

    // Every answered count is in the access log, with the definition's hash.
    let events = brokerctl::log_review::board_events(&cast.board, Default::default())
        .await
        .unwrap();
    let counts: Vec<_> = events
        .iter()
        .filter(|e| e.event.kind == EventKind::FeasibilityCount)
        .collect();
    assert_eq!(
        counts.len(),
        9,
        "6 exact + 3 protected (refused calls are not answers)"
    );
    assert!(
        counts
            .iter()
            .all(|e| e.event.details.definition_hash.is_some())
    );
    // The sponsor's answers carry their budget charge: the first count showed two fresh
    // draws (the population and the criterion), its repeat none, the code nobody has one.
    let charges: Vec<(u64, u64)> = counts
        .iter()
        .filter_map(|e| e.event.details.budget.map(|b| (b.charged, b.remaining)))
        .collect();
    assert_eq!(charges, [(2, 98), (0, 98), (1, 97)]);
    sandbox.stop().await;
}
