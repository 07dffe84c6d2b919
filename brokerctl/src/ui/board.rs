//! The ethics board's views: studies to decide (purpose, the DUO matcher's verdicts,
//! categories, fields, the cohort in words and its exact attrition), the access log's
//! verification, event search and export, and the break-glass review queue. Every
//! decision is signed here, with the board member's key, as `brokerctl board` signs it.

use std::sync::Arc;

use axum::Form;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use consent_policy::{DataUse, Modifier, Primary, Verdict, match_data_use};
use maud::{Markup, html};
use model::{Study, StudyFocus, StudyStatus, purpose_label};

use super::page::{PageError, notice, page, see_other, url_escape, when};
use super::{App, Fields, Role, field};
use crate::log_review::{self, BoardState, ShownEvent};

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(|| async { see_other("/studies") }))
        .route("/studies", get(studies))
        .route("/studies/{id}", get(study))
        .route("/studies/{id}/decide", post(decide))
        .route("/log", get(log_status))
        .route("/log/verify", post(verify))
        .route("/events", get(events))
        .route("/events/export", get(export))
        .route("/break-glass", get(break_glass))
        .route("/break-glass/{id}/review", post(review))
}

type Page = Result<Html<String>, PageError>;

fn state_path(app: &App) -> &std::path::Path {
    match &app.ui.role {
        Role::Board { state } => state,
        Role::Patient { .. } => unreachable!("the board's routes serve a board member"),
    }
}

async fn studies(State(app): State<Arc<App>>) -> Page {
    let mut list = app.ui.client.list_studies().await?;
    list.sort_by_key(|s| (s.status != StudyStatus::Proposed, -s.proposed_at));
    let pending = list
        .iter()
        .filter(|s| s.status == StudyStatus::Proposed)
        .count();
    Ok(page(
        &app.ui.role,
        "/studies",
        "Studies",
        html! {
            p { (pending) " waiting for a decision, " (list.len()) " in all." }
            table {
                thead { tr { th { "Study" } th { "Title" } th { "Status" } th { "Purpose" }
                    th { "Categories" } th { "Proposed" } } }
                tbody {
                    @for s in &list {
                        tr {
                            td { a href={"/studies/" (s.study_id)} { (s.study_id) } }
                            td { (s.proposal.title) }
                            td { (s.status.as_str()) }
                            td { (purpose_label(&s.proposal.purpose)) }
                            td { (s.proposal.categories.iter().map(|c| c.label()).collect::<Vec<_>>().join(", ")) }
                            td { (when(s.proposed_at)) }
                        }
                    }
                }
            }
        },
    ))
}

/// The consents the board sees the study's purpose against: each a data use patients
/// commonly choose, with the DUO matcher's verdict on this purpose.
fn verdicts(study: &Study, now: i64) -> Vec<(String, Verdict, String)> {
    let mut uses = vec![
        ("Any research (GRU)", DataUse::new(Primary::Gru)),
        ("Health research (HMB)", DataUse::new(Primary::Hmb)),
        (
            "Health research, not-for-profit only (HMB NPU)",
            DataUse::new(Primary::Hmb).with(Modifier::Npu),
        ),
        (
            "Health research with ethics approval (HMB IRB)",
            DataUse::new(Primary::Hmb).with(Modifier::Irb),
        ),
        ("Ancestry research only (POA)", DataUse::new(Primary::Poa)),
    ];
    if let StudyFocus::Disease(codes) = &study.proposal.purpose.focus {
        uses.push((
            "Research on the study's diseases only (DS)",
            DataUse::new(Primary::Ds(codes.iter().cloned().collect())),
        ));
    }
    uses.into_iter()
        .map(|(label, u)| {
            let m = match_data_use(&u, &study.proposal.purpose, now);
            (label.to_owned(), m.verdict, m.reason)
        })
        .collect()
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Approve => "allowed",
        Verdict::Abstain => "the board decides",
        Verdict::Deny => "not allowed",
    }
}

async fn study(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<Fields>,
) -> Page {
    let client = &app.ui.client;
    let s = client.get_study(&id).await?;
    let now = pre_kms::request_auth::now_secs();
    let p = &s.proposal;
    let normalized = p.cohort.normalized();
    // The board's count is exact; it is logged like every count.
    let count = client.count(&id, &[]).await;
    let done = field(&q, "done");
    Ok(page(
        &app.ui.role,
        "/studies",
        &format!("Study {}", s.study_id),
        html! {
            @if let Some(d) = done { (notice(true, &format!("Study {d}: your decision was signed and recorded in the access log."))) }
            table {
                tr { th { "Title" } td { (p.title) } }
                tr { th { "Status" } td { (s.status.as_str()) @if !s.reason.is_empty() { " — " (s.reason) } } }
                tr { th { "Sponsor" } td { (s.sponsor_id) @if !s.sponsor_organisation.is_empty() { " (" (s.sponsor_organisation) ")" } } }
                tr { th { "Purpose (DUO)" } td { (purpose_label(&p.purpose)) } }
                tr { th { "Categories requested" } td { (p.categories.iter().map(|c| c.label()).collect::<Vec<_>>().join(", ")) } }
                tr { th { "Fields to search" } td { @if p.fields.is_empty() { "none" } @else { (p.fields.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(", ")) } } }
                tr { th { "Researcher" } td.mono { (p.researcher_id) } }
                tr { th { "Approval period" } td { (when(p.not_before)) " to " (when(p.not_after)) } }
                tr { th { "Cohort hash" } td.mono { (normalized.hash) } }
            }
            h2 { "The purpose against patients' consents" }
            p.muted { "The DUO matcher's verdict on this study's purpose, for patients who chose each data use." }
            table {
                thead { tr { th { "Consented data use" } th { "Verdict" } th { "Why" } } }
                tbody {
                    @for (label, v, why) in verdicts(&s, now) {
                        tr { td { (label) } td { (verdict_word(v)) } td { (why) } }
                    }
                }
            }
            h2 { "Cohort" }
            ul {
                @if p.cohort.criteria.is_empty() {
                    li { "Every patient whose consent permits the study." }
                }
                @for c in &p.cohort.criteria { li { (c.describe()) } }
            }
            h2 { "Attrition (exact, for the board)" }
            (attrition(count))
            @if s.status == StudyStatus::Proposed {
                h2 { "Decide" }
                form method="post" action={"/studies/" (s.study_id) "/decide"} {
                    div.field {
                        label for="reason" { "Reason (required to reject; recorded with your signature)" }
                        textarea #reason name="reason" rows="3" cols="60" {}
                    }
                    div.field {
                        input #override_abstain type="checkbox" name="override_abstain";
                        label for="override_abstain" { " Also approve the purpose where the matcher leaves it to the board" }
                    }
                    button #approve type="submit" name="decision" value="approve" { "Approve and sign" }
                    button #reject .danger type="submit" name="decision" value="reject" { "Reject and sign" }
                }
            }
        },
    ))
}

fn attrition(count: Result<broker_proto::v1::CountResponse, crate::ClientError>) -> Markup {
    let r = match count {
        Ok(r) => r,
        Err(e) => return notice(false, &format!("The count did not work: {e}")),
    };
    let max = r
        .attrition
        .iter()
        .filter_map(|s| s.count.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        .max(1);
    html! {
        p { strong { (r.count) } " patients match." }
        table #attrition {
            thead { tr { th { "Step" } th { "Criterion" } th { "Patients" } th { span.skip { "Chart" } } } }
            tbody {
                @for step in &r.attrition {
                    tr {
                        td { (step.step) }
                        td { (step.label) }
                        td { (step.count) }
                        td { meter min="0" max=(max) value=(step.count.parse::<u64>().unwrap_or(0)) aria-label={"step " (step.step)} {} }
                    }
                }
            }
        }
    }
}

async fn decide(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Form(f): Form<Fields>,
) -> Result<Response, PageError> {
    let reason = field(&f, "reason").unwrap_or_default().trim().to_owned();
    let approve = match field(&f, "decision") {
        Some("approve") => true,
        Some("reject") if reason.is_empty() => {
            return Err(PageError::bad_input(
                "Give a reason to reject the study: the sponsor and the log keep it.",
            ));
        }
        Some("reject") => false,
        _ => return Err(PageError::bad_input("Choose to approve or to reject.")),
    };
    let overrides = field(&f, "override_abstain").is_some();
    app.ui
        .client
        .decide_study(&id, approve, overrides, &reason)
        .await?;
    let done = if approve { "approved" } else { "rejected" };
    Ok(see_other(&format!("/studies/{id}?done={done}")))
}

async fn log_status(State(app): State<Arc<App>>) -> Page {
    let path = state_path(&app);
    let state = BoardState::load(path)?;
    let verified_at = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64);
    let checkpoint = state
        .as_ref()
        .and_then(|s| audit_log::SignedCheckpoint::from_note(&s.checkpoint).ok());
    Ok(page(
        &app.ui.role,
        "/log",
        "Access log",
        html! {
            @match (&checkpoint, verified_at) {
                (Some(c), Some(at)) => {
                    table #status {
                        tr { th { "Last verified checkpoint" } td { (c.checkpoint.size) " events" } }
                        tr { th { "Its root" } td.mono { (hex::encode(c.checkpoint.root)) } }
                        tr { th { "Signed by the broker at" } td { (when(c.checkpoint.time)) } }
                        tr { th { "Verified here at" } td { (when(at)) } }
                        tr { th { "Co-signed" } td {
                            @if c.signatures.len() > 1 { "yes, " (c.signatures.len() - 1) " witness signature(s)" }
                            @else { "no, the broker's signature only" }
                        } }
                    }
                }
                _ => { p #status { "This board member has not verified the log from this machine yet. The first verification trusts the broker's current checkpoint; each later one checks that the log only grew." } }
            }
            form method="post" action="/log/verify" {
                p.muted { "Verification checks every checkpoint's signature, that the log only grew since the last one verified here, and re-hashes every event." }
                div.field {
                    input #cosign type="checkbox" name="cosign";
                    label for="cosign" { " Co-sign the verified checkpoint as a witness" }
                }
                button #verify type="submit" { "Verify the whole log" }
            }
        },
    ))
}

async fn verify(State(app): State<Arc<App>>, Form(f): Form<Fields>) -> Page {
    let cosign = field(&f, "cosign").is_some();
    let result = log_review::verify_log(&app.ui.client, state_path(&app), true, cosign).await;
    Ok(page(
        &app.ui.role,
        "/log",
        "Access log",
        html! {
            @match &result {
                Ok(r) => {
                    div #verify-result .ok role="status" data-verified="true" {
                        strong { "Verified. " }
                        @match r.previous_size {
                            Some(p) => { "The log grew from " (p) " to " (r.size) " events, consistently. " }
                            None => { (r.size) " events; this checkpoint is now trusted here. " }
                        }
                        (r.checkpoints_checked) " checkpoints signed by the broker and consistent"
                        @if let Some(n) = r.leaves_recomputed { "; all " (n) " events re-hashed, every root matches" }
                        @if let Some(n) = r.cosignatures { "; co-signed (" (n) " signatures)" }
                        "."
                    }
                }
                Err(e) => {
                    div #verify-result .bad role="alert" data-verified="false" {
                        strong { "The access log does NOT verify. " }
                        (e.to_string())
                        p { "Nothing was saved: the last verified checkpoint stays as it was. Tell the other board members and the operator." }
                    }
                }
            }
            p { a href="/log" { "Back to the access log" } }
        },
    ))
}

/// The search form's filter, from the query string.
fn filter(q: &Fields) -> Result<audit_log::EventFilter, PageError> {
    let text = |name: &str| field(q, name).map(str::trim).filter(|v| !v.is_empty());
    let since = text("since")
        .map(log_review::parse_time)
        .transpose()
        .map_err(PageError::bad_input)?;
    let until = text("until")
        .map(log_review::parse_until)
        .transpose()
        .map_err(PageError::bad_input)?;
    Ok(log_review::events_filter(
        since,
        until,
        text("study").map(str::to_owned),
        text("actor").map(str::to_owned),
        text("kind").map(|k| vec![k.to_owned()]).unwrap_or_default(),
    ))
}

const KINDS: [&str; 19] = [
    "enroll",
    "upload",
    "consent_set",
    "consent_revoked",
    "study_proposed",
    "study_approved",
    "study_rejected",
    "grant_issued",
    "grant_withdrawn",
    "feasibility_count",
    "release",
    "fetch",
    "break_glass",
    "break_glass_review",
    "erasure",
    "erasure_notice",
    "key_rotation",
    "authorization_failed",
    "",
];

/// How many events the page lists at most (the export has them all).
const SHOWN: usize = 500;

async fn events(State(app): State<Arc<App>>, Query(q): Query<Fields>) -> Page {
    let f = filter(&q)?;
    let shown = log_review::board_events(&app.ui.client, f).await?;
    let value = |name: &str| field(&q, name).unwrap_or_default().to_owned();
    let query: String = q
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("&{}={}", url_escape(k), url_escape(v)))
        .collect();
    let kind = value("kind");
    Ok(page(
        &app.ui.role,
        "/events",
        "Events",
        html! {
            form method="get" action="/events" {
                div.field { label for="since" { "From (day)" } input #since type="date" name="since" value=(value("since")); }
                div.field { label for="until" { "To (day, included)" } input #until type="date" name="until" value=(value("until")); }
                div.field { label for="study" { "Study id" } input #study type="text" name="study" value=(value("study")); }
                div.field { label for="actor" { "Actor id" } input #actor type="text" name="actor" value=(value("actor")); }
                div.field {
                    label for="kind" { "Kind" }
                    select #kind name="kind" {
                        @for k in KINDS.iter().rev() {
                            option value=(k) selected[kind == *k] { @if k.is_empty() { "any" } @else { (k) } }
                        }
                    }
                }
                button #search type="submit" { "Search" }
            }
            p #found { (shown.len()) " events" @if shown.len() > SHOWN { ", the newest " (SHOWN) " shown" } "." }
            p {
                "Export these events: "
                a href={"/events/export?format=jsonl" (query)} { "JSON Lines" } ", "
                a href={"/events/export?format=csv" (query)} { "CSV" } ", "
                a href={"/events/export?format=fhir" (query)} { "FHIR AuditEvent (NDJSON)" }
            }
            (event_table(shown.iter().rev().take(SHOWN)))
        },
    ))
}

fn event_table<'a>(events: impl Iterator<Item = &'a ShownEvent>) -> Markup {
    html! {
        table #events {
            thead { tr { th { "#" } th { "Time" } th { "Kind" } th { "Actor" } th { "Study" }
                th { "Patient tag" } th { "Categories" } th { "Outcome" } } }
            tbody {
                @for e in events {
                    @let ev = &e.event;
                    tr {
                        td { (e.index) }
                        td { (when(ev.time)) }
                        td { (ev.kind.name()) }
                        td { (ev.actor.id) }
                        td { (ev.details.study_id.as_ref().or(ev.why.study_id.as_ref()).map(String::as_str).unwrap_or("")) }
                        td.mono { (ev.patient.map(|p| p.to_string()[..12].to_owned()).unwrap_or_default()) }
                        td { (ev.details.categories.join(", ")) }
                        td { (match &ev.outcome {
                            audit_log::event::Outcome::Success => "success".to_owned(),
                            audit_log::event::Outcome::Refused { reason } => format!("refused: {reason}"),
                        }) }
                    }
                }
            }
        }
    }
}

async fn export(
    State(app): State<Arc<App>>,
    Query(q): Query<Fields>,
) -> Result<Response, PageError> {
    let f = filter(&q)?;
    let shown = log_review::board_events(&app.ui.client, f).await?;
    let (text, mime, name) = match field(&q, "format") {
        Some("csv") => (log_review::to_csv(&shown), "text/csv", "events.csv"),
        Some("fhir") => (
            log_review::to_fhir_ndjson(&shown),
            "application/fhir+ndjson",
            "events.fhir.ndjson",
        ),
        Some("jsonl") | None => (
            log_review::to_jsonl(&shown),
            "application/jsonl",
            "events.jsonl",
        ),
        Some(other) => {
            return Err(PageError::bad_input(format!(
                "{other:?} is not an export format: jsonl, csv or fhir"
            )));
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, format!("{mime}; charset=utf-8")),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        text,
    )
        .into_response())
}

async fn break_glass(State(app): State<Arc<App>>, Query(q): Query<Fields>) -> Page {
    let list = app.ui.client.break_glass_accesses(false).await?;
    let waiting = list.iter().filter(|a| a.review.is_none()).count();
    Ok(page(
        &app.ui.role,
        "/break-glass",
        "Break-glass reviews",
        html! {
            @if let Some(d) = field(&q, "done") { (notice(true, &format!("Access {d} reviewed: your finding is in the access log."))) }
            p { (waiting) " of " (list.len()) " emergency accesses wait for a review." }
            @for a in &list {
                section.access aria-labelledby={"h-" (a.access_id)} {
                    h2 #{"h-" (a.access_id)} { "Access " (a.access_id) @if a.flagged { " — FLAGGED: " (a.recent_uses) " uses in 24 hours" } }
                    table {
                        tr { th { "Clinician" } td { (a.clinician_id) " of " (a.organisation_id) } }
                        tr { th { "Patient (pseudonym)" } td.mono { (a.pseudonym) @if a.card_presented { " (emergency card presented)" } } }
                        tr { th { "Reason given" } td { (a.reason) } }
                        tr { th { "When" } td { (when(a.created_at)) ", open until " (when(a.expires_at)) } }
                        tr { th { "Log entry" } td { "#" (a.leaf_index) } }
                    }
                    @match &a.review {
                        Some(r) => { p { "Reviewed by " (r.board_id) " at " (when(r.reviewed_at)) ": " strong { (r.finding.as_str()) } " — " (r.note) } }
                        None => {
                            form method="post" action={"/break-glass/" (a.access_id) "/review"} {
                                fieldset {
                                    legend { "Your finding" }
                                    input #{"ok-" (a.access_id)} type="radio" name="finding" value="ok" required;
                                    label for={"ok-" (a.access_id)} { " Justified" }
                                    input #{"misuse-" (a.access_id)} type="radio" name="finding" value="misuse";
                                    label for={"misuse-" (a.access_id)} { " Misuse" }
                                }
                                div.field {
                                    label for={"note-" (a.access_id)} { "Note" }
                                    textarea #{"note-" (a.access_id)} name="note" rows="2" cols="60" required {}
                                }
                                button type="submit" { "Record the review" }
                            }
                        }
                    }
                }
            }
        },
    ))
}

async fn review(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Form(f): Form<Fields>,
) -> Result<Response, PageError> {
    let finding = field(&f, "finding")
        .filter(|v| matches!(*v, "ok" | "misuse"))
        .ok_or_else(|| PageError::bad_input("Choose a finding: justified or misuse."))?;
    let note = field(&f, "note").unwrap_or_default().trim();
    if note.is_empty() {
        return Err(PageError::bad_input("Write a note for the review."));
    }
    app.ui.client.review_break_glass(&id, finding, note).await?;
    Ok(see_other(&format!("/break-glass?done={id}")))
}
