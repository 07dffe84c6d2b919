//! `brokerctl ui`: a web page on this machine for ethics board members and patients.
//!
//! The page talks only to this process, which holds the user's key and makes the same
//! signed gRPC calls as the command line: the key never reaches the browser or the
//! broker. The page is HTML rendered here, with no script.
//!
//! Who may use it: the listener must be on a loopback address, every request must name
//! this machine's loopback host (against DNS rebinding), and every request must carry
//! this run's secret. The secret comes once in the address `brokerctl ui` prints
//! (`/?token=…`); the page trades it for a cookie that is `HttpOnly` and
//! `SameSite=Strict`, so other sites' pages can neither read it nor send it, and leaves
//! it out of the address bar. Forms are posted only from the page itself (the cookie,
//! and the `Origin` check).
//!
//! ```text
//!  browser ──http, loopback, secret──▶ brokerctl ui (holds the key) ──signed gRPC, TLS──▶ broker
//! ```

mod board;
pub mod consent_form;
mod page;
mod patient;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use pre_kms::network::VerifiedNetwork;

use crate::BrokerClient;
use crate::consent_heads::HeadStore;

/// Whose page it is, and what that user's views need besides the client.
pub enum Role {
    /// An ethics board member; `state` keeps the last checkpoint they verified (the
    /// command line's `board log verify` uses the same file).
    Board { state: PathBuf },
    /// A patient (with their own key, or a custodian's keystore entry).
    Patient {
        /// The newest consent this agent set, to catch a broker that hides it.
        heads: Mutex<Box<dyn HeadStore + Send>>,
        /// The pinned network, to check erasure receipts; without it the page cannot erase.
        network: Option<Box<VerifiedNetwork>>,
        /// Where an erasure's signed request and receipts are kept.
        receipts: PathBuf,
        /// The custodian keystore holding the patient's key, if it is one: an erasure
        /// destroys the key there too.
        keystore: Option<(PathBuf, String)>,
    },
}

impl Role {
    fn describe(&self) -> &'static str {
        match self {
            Role::Board { .. } => "Ethics board",
            Role::Patient { .. } => "Patient",
        }
    }
}

/// The page's user: their signed client and role.
pub struct Ui {
    pub client: BrokerClient,
    pub role: Role,
}

struct App {
    ui: Ui,
    secret: String,
    cookie: String,
    /// The `Host` values this page answers to.
    hosts: Vec<String>,
}

/// Why the page cannot start.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error(
        "the page listens on loopback only ({0} is not a loopback address): it acts with your key"
    )]
    NotLoopback(SocketAddr),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The page, bound and ready to serve.
pub struct Page {
    listener: tokio::net::TcpListener,
    app: Arc<App>,
}

impl Page {
    /// Takes an already bound listener (tests bind `127.0.0.1:0`), which must be on a
    /// loopback address, and makes this run's secret.
    pub fn new(listener: tokio::net::TcpListener, ui: Ui) -> Result<Page, UiError> {
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            return Err(UiError::NotLoopback(addr));
        }
        let secret: [u8; 32] = rand::random();
        let port = addr.port();
        let hosts = vec![
            addr.to_string(),
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
        ];
        Ok(Page {
            listener,
            app: Arc::new(App {
                ui,
                secret: hex::encode(secret),
                cookie: format!("brokerctl-ui-{port}"),
                hosts,
            }),
        })
    }

    /// The address to open: it carries this run's secret, so show it to the user only.
    pub fn url(&self) -> String {
        format!("http://{}/?token={}", self.app.hosts[0], self.app.secret)
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = self.app.clone();
        let routes = match &app.ui.role {
            Role::Board { .. } => board::routes(),
            Role::Patient { .. } => patient::routes(),
        };
        let router = Router::new()
            .route("/style.css", get(style))
            .merge(routes)
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(app.clone(), guard))
            .with_state(app);
        axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        page::STYLE,
    )
}

async fn not_found() -> page::PageError {
    page::PageError {
        status: StatusCode::NOT_FOUND,
        message: "There is no such page here.".into(),
    }
}

/// Equal in constant time (the hashes' comparison is).
fn same_secret(a: &str, b: &str) -> bool {
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

fn refused(why: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("refused: {why}\n"),
    )
        .into_response()
}

/// Every request: the host, the secret (trading the address's token for the cookie), the
/// origin of forms; then the headers that keep the page in its own tab and its address
/// out of other sites' logs.
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !app.hosts.contains(&host) {
        return refused("this page answers only to its loopback address");
    }
    if let Some(token) = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(str::to_owned)
    }) {
        if !same_secret(&token, &app.secret) {
            return refused("this is not the address `brokerctl ui` printed for this run");
        }
        let mut r = page::see_other(req.uri().path());
        let cookie = format!(
            "{}={}; HttpOnly; SameSite=Strict; Path=/",
            app.cookie, app.secret
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        return secured(r);
    }
    let has_secret = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .any(|(name, value)| name == app.cookie && same_secret(value, &app.secret));
    if !has_secret {
        return refused(
            "this page needs this run's secret: open the address `brokerctl ui` printed",
        );
    }
    if req.method() == Method::POST
        && let Some(origin) = req.headers().get(header::ORIGIN)
        && origin.to_str().ok() != Some(format!("http://{host}").as_str())
    {
        return refused("forms are accepted from this page only");
    }
    secured(next.run(req).await)
}

fn secured(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}

/// A form's fields, in order (checkbox groups repeat no name: each box has its own).
type Fields = Vec<(String, String)>;

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_value() {
        assert!(same_secret("ab", "ab"));
        assert!(!same_secret("ab", "ac"));
        assert!(!same_secret("ab", ""));
    }
}
