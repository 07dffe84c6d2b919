//! The patient's views: my consent in plain words and as a form (with a preview of what
//! a change withdraws), every access to my data as a timeline (each entry proven to be
//! in the broker-signed log), unread alerts, revocation and erasure. Every consent
//! version is signed here, with the patient's key.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{Html, Response};
use axum::routing::get;
use axum::{Form, Router};
use consent_policy::{ConsentPolicy, Grantee, PolicyHistory, grant_permitted};
use maud::{Markup, html};
use model::{Category, SearchField};

use super::consent_form::{self, ConsentForm, Research, category_name, field_name};
use super::page::{PageError, notice, page, see_other, url_escape, when};
use super::{App, Fields, Role, field};
use crate::agent;
use crate::log_review::{self, ShownEvent};
use audit_log::EventKind;

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(|| async { see_other("/consent") }))
        .route("/consent", get(consent))
        .route("/consent/preview", axum::routing::post(preview))
        .route("/consent/set", axum::routing::post(set))
        .route("/consent/revoke", get(revoke_confirm).post(revoke))
        .route("/studies", get(studies))
        .route("/studies/{id}/grant", axum::routing::post(grant))
        .route("/accesses", get(accesses))
        .route("/alerts", get(alerts))
        .route("/alerts/read", axum::routing::post(alerts_read))
        .route("/erase", get(erase_confirm).post(erase))
}

type Page = Result<Html<String>, PageError>;

/// The patient's consent history, checked against the patient's key and against the
/// newest version this agent set.
async fn history(app: &App) -> Result<PolicyHistory, PageError> {
    let Role::Patient { heads, .. } = &app.ui.role else {
        unreachable!("the patient's routes serve a patient")
    };
    let me = app.ui.client.identity();
    let head = heads
        .lock()
        .map_err(|_| PageError::bad_input("the consent record is unavailable"))?
        .head(&me.pseudonym())?;
    Ok(agent::consent_history_checked(&app.ui.client, me, head.as_ref()).await?)
}

async fn consent(State(app): State<Arc<App>>, Query(q): Query<Fields>) -> Page {
    let history = history(&app).await?;
    let now = pre_kms::request_auth::now_secs();
    let current = history.current(now);
    let (form, note) = ConsentForm::from_policy(current);
    Ok(page(
        &app.ui.role,
        "/consent",
        "My consent",
        html! {
            @if let Some(msg) = field(&q, "done") { (notice(true, msg)) }
            h2 { "What you allow now" }
            @match current {
                Some(p) => {
                    ul #current { @for line in consent_form::describe(p) { li { (line) } } }
                    p.muted { "Version " (p.version()) ", signed by you on " (when(p.issued_at())) "." }
                }
                None => { p #current { "You have not set a consent: nothing of yours is shared for research, and there is no emergency access." } }
            }
            @if let Some(n) = note { div.note { (n) } }
            h2 { "Change it" }
            form method="post" action="/consent/preview" {
                (form_fields(&form))
                button #preview type="submit" { "Preview the change" }
            }
            h2 { "Stop sharing" }
            p { a #revoke href="/consent/revoke" { "Revoke my consent" } ": every study's access ends, now." }
            @if history.versions().len() > 1 {
                h2 { "Earlier versions" }
                ul { @for p in history.versions().iter().rev().skip(1) {
                    li { "Version " (p.version()) ", signed " (when(p.issued_at())) }
                } }
            }
        },
    ))
}

fn form_fields(form: &ConsentForm) -> Markup {
    let research = [
        (Research::Any, "any", "Any research"),
        (
            Research::Health,
            "health",
            "Health, medical or biomedical research only",
        ),
        (Research::None, "none", "No research"),
    ];
    html! {
        fieldset {
            legend { "Which research may use my records" }
            @for (r, value, label) in research {
                div { input #{"research-" (value)} type="radio" name="research" value=(value) checked[form.research == r];
                label for={"research-" (value)} { " " (label) } }
            }
            div { input #not_for_profit type="checkbox" name="not_for_profit" checked[form.not_for_profit];
                label for="not_for_profit" { " Only not-for-profit organisations, and not for commercial use" } }
        }
        fieldset {
            legend { "What studies may receive (de-identified)" }
            @for c in consent_form::research_categories() {
                div { input #{"category-" (c.label())} type="checkbox" name={"category." (c.label())} checked[form.categories.contains(&c)];
                label for={"category-" (c.label())} { " " (category_name(c)) } }
            }
        }
        fieldset {
            legend { "What the broker may search to find studies' patients" }
            @for f in SearchField::ALL {
                div { input #{"field-" (f.as_str())} type="checkbox" name={"field." (f.as_str())} checked[form.fields.contains(&f)];
                label for={"field-" (f.as_str())} { " " (field_name(f)) } }
            }
        }
        fieldset {
            legend { "Emergencies" }
            div { input #break_glass type="checkbox" name="break_glass" checked[form.break_glass];
                label for="break_glass" { " In an emergency, a registered emergency clinician may read my critical information (blood type, allergies, implants, active medications). I am told each time." } }
        }
    }
}

/// A grant the patient's log shows as issued and not withdrawn.
struct ActiveGrant {
    study_id: String,
    categories: Vec<Category>,
}

/// The patient's active grants, from their own proven log entries.
fn active_grants(events: &[ShownEvent]) -> Vec<ActiveGrant> {
    let mut grants: BTreeMap<String, ActiveGrant> = BTreeMap::new();
    for e in events {
        let ev = &e.event;
        let (Some(grant), Some(study)) = (&ev.details.grant_id, &ev.details.study_id) else {
            continue;
        };
        match ev.kind {
            EventKind::GrantIssued => {
                grants.insert(
                    grant.clone(),
                    ActiveGrant {
                        study_id: study.clone(),
                        categories: ev
                            .details
                            .categories
                            .iter()
                            .filter_map(|c| c.parse().ok())
                            .collect(),
                    },
                );
            }
            EventKind::GrantWithdrawn => {
                grants.remove(grant);
            }
            _ => {}
        }
    }
    grants.into_values().collect()
}

/// The studies whose grants `next` would withdraw (the consent rule the broker applies,
/// on the grants the log shows; the receipt gives the broker's own count).
async fn withdrawals(
    app: &App,
    history: &PolicyHistory,
    next: &ConsentPolicy,
) -> Result<Vec<(String, String)>, PageError> {
    let events = log_review::patient_accesses(&app.ui.client, None).await?;
    let after = PolicyHistory::new(history.versions().iter().cloned().chain([next.clone()]))
        .map_err(|e| PageError::bad_input(e.to_string()))?;
    let now = pre_kms::request_auth::now_secs();
    let mut out = Vec::new();
    for g in active_grants(&events) {
        let study;
        let (grantee, title) = match model::emergency_organisation_of(&g.study_id) {
            Some(org) => (
                Grantee::Emergency(org),
                format!("emergency access by {org}"),
            ),
            None => {
                study = app.ui.client.get_study(&g.study_id).await?;
                (Grantee::Study(&study), study.proposal.title.clone())
            }
        };
        // The expiry is not in the log: a grant is kept in the preview if its categories
        // still fit; a shorter consent period also withdraws it, as the receipt shows.
        if !grant_permitted(&after, grantee, &g.categories, i64::MIN, now) {
            out.push((g.study_id, title));
        }
    }
    Ok(out)
}

fn next_policy(history: &PolicyHistory, form: &ConsentForm) -> Result<ConsentPolicy, PageError> {
    form.draft(
        agent::next_version(history),
        pre_kms::request_auth::now_secs(),
    )
    .check()
    .map_err(|e| PageError::bad_input(e.to_string()))
}

async fn preview(State(app): State<Arc<App>>, Form(f): Form<Fields>) -> Page {
    let form = ConsentForm::from_fields(&f).map_err(PageError::bad_input)?;
    let history = history(&app).await?;
    let next = next_policy(&history, &form)?;
    let now_lines = history
        .current(pre_kms::request_auth::now_secs())
        .map(consent_form::describe)
        .unwrap_or_else(|| vec!["Nothing is shared.".to_owned()]);
    let withdrawn = withdrawals(&app, &history, &next).await?;
    Ok(page(
        &app.ui.role,
        "/consent",
        "Preview of my new consent",
        html! {
            table {
                thead { tr { th { "Now" } th { "After" } } }
                tbody { tr {
                    td { ul { @for l in &now_lines { li { (l) } } } }
                    td { ul #after { @for l in consent_form::describe(&next) { li { (l) } } } }
                } }
            }
            h2 { "What this withdraws" }
            @if withdrawn.is_empty() {
                p #withdrawn { "No study's access ends." }
            } @else {
                p #withdrawn { "These studies' access to your records ends at once (their key fragments are destroyed at the proxies):" }
                ul { @for (id, title) in &withdrawn { li { (title) " " span.mono { "(" (id) ")" } } } }
            }
            form method="post" action="/consent/set" {
                @for (k, v) in form.to_fields() { input type="hidden" name=(k) value=(v); }
                button #sign type="submit" { "Sign and set this consent" }
                a href="/consent" { "Change it again" }
            }
        },
    ))
}

/// The approved studies open now: what the patient's consent lets each have, whether the
/// patient's log shows a grant, and a button to grant (through the pinned network).
async fn studies(State(app): State<Arc<App>>, Query(q): Query<Fields>) -> Page {
    let Role::Patient { network, .. } = &app.ui.role else {
        unreachable!("the patient's routes serve a patient")
    };
    let history = history(&app).await?;
    let now = pre_kms::request_auth::now_secs();
    let events = log_review::patient_accesses(&app.ui.client, None).await?;
    let granted: Vec<String> = active_grants(&events)
        .into_iter()
        .map(|g| g.study_id)
        .collect();
    let open: Vec<model::Study> = app
        .ui
        .client
        .list_studies()
        .await?
        .into_iter()
        .filter(|s| s.closed_because(now).is_none())
        .collect();
    Ok(page(
        &app.ui.role,
        "/studies",
        "Studies",
        html! {
            @if let Some(msg) = field(&q, "done") { (notice(true, msg)) }
            @if network.is_none() {
                (notice(false, "This page was started without the network manifest your ethics board signed (--network), so it cannot grant: restart it with --network."))
            }
            p { (open.len()) " studies approved by the ethics board are open. A study receives only what your consent allows, de-identified, re-encrypted for its researcher." }
            @for s in &open {
                section.study aria-labelledby={"h-" (s.study_id)} {
                    h2 #{"h-" (s.study_id)} { (s.proposal.title) }
                    p.muted { "Purpose: " (model::purpose_label(&s.proposal.purpose)) "; study " span.mono { (s.study_id) } "; open until " (when(s.proposal.not_after)) }
                    @match consent_policy::grant_scope(&consent_policy::decide(&history, s, now), s) {
                        Ok((categories, _)) => {
                            p { "Your consent lets it have: " (categories.iter().map(|c| category_name(*c)).collect::<Vec<_>>().join("; ")) "." }
                            @if granted.contains(&s.study_id) {
                                p.grant-state { strong { "You have granted it." } }
                            } @else if network.is_some() {
                                form method="post" action={"/studies/" (s.study_id) "/grant"} {
                                    button type="submit" { "Grant it" }
                                }
                            }
                        }
                        Err(e) => { p.grant-state { "Your consent does not let it have your records: " (e) } }
                    }
                }
            }
        },
    ))
}

async fn grant(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, PageError> {
    let Role::Patient { network, .. } = &app.ui.role else {
        unreachable!("the patient's routes serve a patient")
    };
    let network = network
        .as_ref()
        .ok_or_else(|| PageError::bad_input("start the page with --network to grant"))?;
    let client = &app.ui.client;
    let study = client.get_study(&id).await?;
    // The pinned network decides: the board's signature on the approval, the proxies.
    let plan = agent::grant_plan(client, network, &study).await?;
    let history = history(&app).await?;
    let me = client.identity().clone();
    let r = agent::consented_grants(
        client,
        &plan,
        &study,
        vec![(me, Category::ALL.to_vec(), history)],
    )
    .await?;
    if r.issued == 0 {
        return Err(PageError::bad_input(
            "Your consent does not let this study have your records: nothing was granted.",
        ));
    }
    Ok(see_other(&format!(
        "/studies?done={}",
        url_escape(&format!("You granted {}.", study.proposal.title))
    )))
}

/// Signs and sets `policy`, records it as this agent's newest, and says what happened.
/// A policy that allows break-glass also gets its standing emergency grants, to the
/// organisations the pinned network lists: allowing it is what makes it work.
async fn set_policy(app: &App, policy: ConsentPolicy) -> Result<String, PageError> {
    let Role::Patient { heads, network, .. } = &app.ui.role else {
        unreachable!("the patient's routes serve a patient")
    };
    let me = app.ui.client.identity().clone();
    let allows_break_glass = policy.break_glass() == consent_policy::BreakGlass::Allow;
    let receipt = agent::set_consents(&app.ui.client, &[(me.clone(), policy)])
        .await?
        .pop()
        .ok_or_else(|| PageError::bad_input("the broker returned no receipt"))?;
    heads
        .lock()
        .map_err(|_| PageError::bad_input("the consent record is unavailable"))?
        .record(std::slice::from_ref(&receipt))?;
    let mut done = format!(
        "Consent version {} signed and set; {} grant(s) withdrawn.",
        receipt.version, receipt.grants_withdrawn
    );
    if allows_break_glass {
        match network {
            Some(network) => {
                let history = history(app).await?;
                let r = agent::emergency_grants(&app.ui.client, network, vec![(me, history)])
                    .await?;
                done.push_str(&format!(
                    " Emergency access is ready at {} emergency organisation(s).",
                    if r.issued > 0 { r.organisations } else { 0 }
                ));
            }
            None => done.push_str(
                " Emergency access needs the network manifest your board signed: start the page with --network to make it ready.",
            ),
        }
    }
    Ok(done)
}

async fn set(State(app): State<Arc<App>>, Form(f): Form<Fields>) -> Result<Response, PageError> {
    let form = ConsentForm::from_fields(&f).map_err(PageError::bad_input)?;
    let history = history(&app).await?;
    let policy = next_policy(&history, &form)?;
    let done = set_policy(&app, policy).await?;
    Ok(see_other(&format!("/consent?done={}", url_escape(&done))))
}

async fn revoke_confirm(State(app): State<Arc<App>>) -> Page {
    Ok(page(
        &app.ui.role,
        "/consent",
        "Revoke my consent",
        html! {
            p { "This signs a new consent that shares nothing and allows no emergency access. Every study's access to your records ends at once; what studies already received stays under their data-use terms." }
            form method="post" action="/consent/revoke" {
                button #confirm-revoke .danger type="submit" { "Revoke my consent" }
                a href="/consent" { "Keep it" }
            }
        },
    ))
}

async fn revoke(State(app): State<Arc<App>>) -> Result<Response, PageError> {
    let history = history(&app).await?;
    let now = pre_kms::request_auth::now_secs();
    let policy = consent_policy::PolicyDraft::revocation(agent::next_version(&history), now)
        .check()
        .map_err(|e| PageError::bad_input(e.to_string()))?;
    let done = set_policy(&app, policy).await?;
    Ok(see_other(&format!("/consent?done={}", url_escape(&done))))
}

/// An event in words, for the patient.
fn in_words(e: &ShownEvent) -> String {
    let ev = &e.event;
    let study = ev
        .details
        .study_id
        .as_ref()
        .or(ev.why.study_id.as_ref())
        .map(|s| format!(" (study {s})"))
        .unwrap_or_default();
    let categories = if ev.details.categories.is_empty() {
        String::new()
    } else {
        format!(": {}", ev.details.categories.join(", "))
    };
    let what = match ev.kind {
        EventKind::Enroll => "You were enrolled".to_owned(),
        EventKind::Upload => "Records of yours were stored, encrypted".to_owned(),
        EventKind::ConsentSet => "Your consent was set".to_owned(),
        EventKind::ConsentRevoked => "Your consent was revoked".to_owned(),
        EventKind::GrantIssued => format!("You granted a study access{study}{categories}"),
        EventKind::GrantWithdrawn => format!("A grant was withdrawn{study}"),
        EventKind::Release => {
            format!("Your records were re-encrypted for a study's researcher{study}{categories}")
        }
        EventKind::Fetch => format!("A researcher fetched a release{study}"),
        EventKind::BreakGlass => format!(
            "EMERGENCY ACCESS by {} of {}: {}{}",
            ev.actor.id,
            ev.actor
                .organisation
                .as_deref()
                .unwrap_or("an emergency organisation"),
            ev.why.purpose.as_deref().unwrap_or("no reason given"),
            ev.details
                .expires_at
                .map(|t| format!(" (open until {})", when(t)))
                .unwrap_or_default()
        ),
        EventKind::BreakGlassReview => format!(
            "The ethics board reviewed an emergency access: {}",
            ev.why.purpose.as_deref().unwrap_or("")
        ),
        EventKind::Erasure => "Your erasure".to_owned(),
        EventKind::AuthorizationFailed => "A refused attempt about your records".to_owned(),
        other => other.name(),
    };
    match &ev.outcome {
        audit_log::event::Outcome::Success => what,
        audit_log::event::Outcome::Refused { reason } => format!("{what} — REFUSED: {reason}"),
    }
}

fn timeline(events: &[ShownEvent]) -> Markup {
    html! {
        ol.timeline #timeline reversed {
            @for e in events.iter().rev() {
                li data-index=(e.index) {
                    strong { (when(e.event.time)) } " — " (in_words(e))
                    span.muted { " (log entry #" (e.index) ", by " (e.event.actor.id) ")" }
                }
            }
        }
    }
}

async fn accesses(State(app): State<Arc<App>>) -> Page {
    let events = log_review::patient_accesses(&app.ui.client, None).await?;
    Ok(page(
        &app.ui.role,
        "/accesses",
        "Who accessed my data",
        html! {
            p { (events.len()) " logged events about you. Each one's inclusion proof was checked here against the checkpoint the broker signed: the broker cannot show you an event it did not log, nor hide one from the board." }
            (timeline(&events))
        },
    ))
}

async fn alerts(State(app): State<Arc<App>>, Query(q): Query<Fields>) -> Page {
    let events = log_review::patient_alerts(&app.ui.client, None, false).await?;
    Ok(page(
        &app.ui.role,
        "/alerts",
        "Alerts",
        html! {
            @if field(&q, "done").is_some() { (notice(true, "Alerts marked as read.")) }
            p #unread { (events.len()) " unread alerts: releases of your records and emergency access." }
            @if !events.is_empty() {
                (timeline(&events))
                form method="post" action="/alerts/read" { button #mark-read type="submit" { "Mark these as read" } }
            }
        },
    ))
}

async fn alerts_read(State(app): State<Arc<App>>) -> Result<Response, PageError> {
    log_review::patient_alerts(&app.ui.client, None, true).await?;
    Ok(see_other("/alerts?done=read"))
}

async fn erase_confirm(State(app): State<Arc<App>>) -> Page {
    let Role::Patient { network, .. } = &app.ui.role else {
        unreachable!("the patient's routes serve a patient")
    };
    let pseudonym = app.ui.client.identity().pseudonym();
    Ok(page(
        &app.ui.role,
        "/erase",
        "Erase me",
        html! {
            p { "Erasure is for good: every grant is withdrawn and its key fragments destroyed at every proxy; every record, searchable field and consent of yours is deleted at the broker; the log's entries about you can no longer be linked to you. What studies already received stays under their data-use terms, and they are told." }
            @if network.is_none() {
                (notice(false, "This page was started without the network manifest your ethics board signed (--network), so it cannot check the receipts: erase from here after restarting it with --network."))
            } @else {
                form method="post" action="/erase" {
                    div.field {
                        label for="confirm" { "Type erase to confirm (pseudonym " (pseudonym) ")" }
                        input #confirm type="text" name="confirm" autocomplete="off" required;
                    }
                    button #erase .danger type="submit" { "Erase me, for good" }
                }
            }
        },
    ))
}

async fn erase(State(app): State<Arc<App>>, Form(f): Form<Fields>) -> Page {
    let Role::Patient {
        network,
        receipts,
        keystore,
        heads,
    } = &app.ui.role
    else {
        unreachable!("the patient's routes serve a patient")
    };
    let network = network
        .as_ref()
        .ok_or_else(|| PageError::bad_input("start the page with --network to erase"))?;
    if field(&f, "confirm").map(str::trim) != Some("erase") {
        return Err(PageError::bad_input(
            "Not confirmed (type erase): nothing was done.",
        ));
    }
    let checked = agent::erase_kept(&app.ui.client, network, receipts, |_| Ok(())).await?;
    let shredded = match keystore {
        Some((path, patient)) => crate::Keystore::open(path)?.destroy(patient)?,
        None => {
            heads
                .lock()
                .map_err(|_| PageError::bad_input("the consent record is unavailable"))?
                .forget(&checked.pseudonym)?;
            false
        }
    };
    Ok(page(
        &app.ui.role,
        "/erase",
        "Erased",
        html! {
            (notice(true, &format!(
                "Erased: {} of {} proxies confirmed destroying your key fragments ({} needed); the broker confirmed deleting your data{}.",
                checked.proxies_confirmed, network.proxies.len(), checked.proxies_needed,
                if shredded { "; your keys were destroyed in the custodian's keystore" } else { "" })))
            p { "The signed receipts are kept in " span.mono { (receipts.display()) } ". `brokerctl verify-receipt` checks them again, at any time." }
        },
    ))
}
