//! The page around every view: navigation, notices, errors and the stylesheet. Every
//! value reaches the HTML through `maud`, which escapes it: log entries, reasons and
//! study titles are text other parties wrote.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::Role;

/// The stylesheet: readable type, visible focus, contrast above 7:1 for body text, no
/// colour that carries meaning alone (every status is also a word).
pub const STYLE: &str = r#"
:root { color-scheme: light; }
body { font: 16px/1.5 system-ui, sans-serif; margin: 0; color: #111; background: #fff; }
a { color: #0a4a8a; }
a:focus, button:focus, input:focus, select:focus, textarea:focus, summary:focus {
  outline: 3px solid #b35900; outline-offset: 2px; }
.skip { position: absolute; left: -999px; }
.skip:focus { left: 1rem; top: 1rem; background: #fff; padding: .5rem; z-index: 1; }
header { background: #12324f; color: #fff; padding: .75rem 1.5rem; }
header a { color: #fff; margin-right: 1.25rem; }
header a[aria-current] { font-weight: bold; text-decoration: underline 3px; }
header .who { float: right; font-size: .9rem; }
main { padding: 1rem 1.5rem 3rem; max-width: 72rem; }
h1 { font-size: 1.6rem; margin: .5rem 0 1rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { text-align: left; padding: .35rem .75rem .35rem 0; border-bottom: 1px solid #ccc;
  vertical-align: top; }
th { font-weight: 600; }
.ok { border-left: 6px solid #176b2c; background: #eef7f0; padding: .75rem 1rem; }
.bad { border-left: 6px solid #a1120f; background: #fbeeee; padding: .75rem 1rem; }
.note { border-left: 6px solid #6b5a17; background: #f8f5e8; padding: .75rem 1rem; }
.muted { color: #444; }
.mono { font-family: ui-monospace, monospace; font-size: .9rem; word-break: break-all; }
fieldset { border: 1px solid #999; margin: 1rem 0; padding: .5rem 1rem 1rem; }
legend { font-weight: 600; padding: 0 .25rem; }
label { margin-right: 1rem; }
.field { margin: .5rem 0; }
.field label { display: block; font-weight: 600; }
input[type=text], input[type=date], select, textarea { font: inherit; padding: .3rem;
  border: 1px solid #555; min-width: 16rem; }
button { font: inherit; padding: .4rem 1rem; border: 2px solid #12324f; background: #12324f;
  color: #fff; cursor: pointer; margin-right: .5rem; }
button.secondary { background: #fff; color: #12324f; }
button.danger { background: #a1120f; border-color: #a1120f; }
meter { width: 16rem; height: 1.1rem; }
ol.timeline { list-style: none; padding: 0; }
ol.timeline li { border-left: 3px solid #12324f; padding: .25rem 0 .75rem 1rem; }
"#;

/// A whole page: the navigation of `role`'s views, `current` marked, then `body`.
pub fn page(role: &Role, current: &str, title: &str, body: Markup) -> Html<String> {
    let links: &[(&str, &str)] = match role {
        Role::Board { .. } => &[
            ("/studies", "Studies"),
            ("/log", "Access log"),
            ("/events", "Events"),
            ("/break-glass", "Break-glass reviews"),
        ],
        Role::Patient { .. } => &[
            ("/consent", "My consent"),
            ("/studies", "Studies"),
            ("/accesses", "Who accessed my data"),
            ("/alerts", "Alerts"),
            ("/erase", "Erase me"),
        ],
    };
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · research data broker" }
                    link rel="stylesheet" href="/style.css";
                }
                body {
                    a.skip href="#main" { "Skip to the content" }
                    header {
                        span.who { (role.describe()) }
                        nav aria-label="Views" {
                            @for (href, label) in links {
                                @if *href == current {
                                    a href=(href) aria-current="page" { (label) }
                                } @else {
                                    a href=(href) { (label) }
                                }
                            }
                        }
                    }
                    main #main {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
        .into_string(),
    )
}

/// A notice after an action, announced to screen readers.
pub fn notice(ok: bool, text: &str) -> Markup {
    html! {
        div class=(if ok { "ok" } else { "bad" }) role=(if ok { "status" } else { "alert" }) {
            (text)
        }
    }
}

/// What went wrong, shown as a page with its status code. The text comes from the client
/// library's errors, which name no patient data (the broker's status messages carry none).
#[derive(Debug)]
pub struct PageError {
    pub status: StatusCode,
    pub message: String,
}

impl PageError {
    pub fn bad_input(message: impl Into<String>) -> PageError {
        PageError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl<E: std::fmt::Display> From<E> for PageError {
    fn from(e: E) -> PageError {
        PageError {
            status: StatusCode::BAD_GATEWAY,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let body = html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { "Error · research data broker" }
                    link rel="stylesheet" href="/style.css";
                }
                body { main #main {
                    h1 { "That did not work" }
                    div.bad role="alert" { (self.message) }
                    p { a href="/" { "Back to the start" } }
                } }
            }
        };
        (self.status, Html(body.into_string())).into_response()
    }
}

/// A 303 to `to`: after a form's POST, the browser shows the result with a GET.
pub fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// `YYYY-MM-DD HH:MM UTC` for people.
pub fn when(secs: i64) -> String {
    let iso = crate::log_review::iso_time(secs);
    format!("{} {} UTC", &iso[..10], &iso[11..16])
}

/// Percent-encodes a query value.
pub fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
