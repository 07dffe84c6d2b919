//! `brokerctl ui` in a real browser: `broker serve` and `brokerctl ui` as processes, the
//! page driven in headless Chromium through WebDriver (chromedriver), as a board member
//! and a patient use it. Checked against the broker and the proxies, not against the
//! page: the approval is at the broker, the narrowed consent's grant is gone from every
//! proxy, the patient's timeline is exactly the log's events about them (from the
//! board's export), a request without this run's secret is refused, and a broker that
//! rolled its log back shows as a failed verification.
//!
//! Needs Chromium and chromedriver (`/usr/bin/chromium`, `/usr/bin/chromedriver`, or
//! `BROKER_UI_CHROMIUM` and `BROKER_UI_CHROMEDRIVER`); `.ci/run` installs them. Without
//! them the test says so and returns, except under `CI=true`, where it fails. With
//! `BROKER_UI_SCREENSHOTS=DIR` it saves a screenshot of each view there (docs/ui holds
//! the committed ones).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

mod support;
use support::*;

/// A `brokerctl ui` process and the address it printed.
struct UiProcess {
    child: Child,
    url: String,
}

impl Drop for UiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl UiProcess {
    /// `http://127.0.0.1:PORT`
    fn base(&self) -> &str {
        self.url.split("/?token=").next().unwrap()
    }

    fn secret(&self) -> &str {
        self.url.split("/?token=").nth(1).unwrap()
    }

    fn port(&self) -> u16 {
        self.base().rsplit(':').next().unwrap().parse().unwrap()
    }
}

/// Starts `brokerctl ui ARGS` against `ctl`'s broker and waits for its address.
fn start_ui(ctl: &Ctl<'_>, args: &[&str]) -> UiProcess {
    let mut child = open_umask(brokerctl())
        .arg("ui")
        .args(args)
        .args(["--broker", ctl.url])
        .env("BROKER_CERT", &ctl.cert)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("brokerctl ui starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let url = line
        .strip_prefix("open ")
        .unwrap_or_else(|| panic!("brokerctl ui prints its address, not {line:?}"))
        .trim()
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    // Whatever else it prints, read it, so that it never writes to a closed pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    UiProcess { child, url }
}

/// chromedriver on a free port, and where Chromium is.
struct Driver {
    child: Child,
    url: String,
    chromium: PathBuf,
    profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn browser_paths() -> Option<(PathBuf, PathBuf)> {
    let pick = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from(default)).filter(|p| p.exists()))
    };
    Some((
        pick("BROKER_UI_CHROMEDRIVER", "/usr/bin/chromedriver")?,
        pick("BROKER_UI_CHROMIUM", "/usr/bin/chromium")?,
    ))
}

fn start_driver(driver: &Path, chromium: &Path) -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
        chromium: chromium.to_owned(),
        profile: tempfile::tempdir().unwrap(),
    }
}

/// A new browser session (its own profile, so no cookie of another run).
async fn browser(driver: &Driver) -> Client {
    let profile = tempfile::tempdir_in(driver.profile.path()).unwrap();
    let caps: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(serde_json::json!({"goog:chromeOptions": {
            "binary": driver.chromium,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.keep().display())]
        }}))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&driver.url)
            .await
        {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no WebDriver session: {e}"),
        }
    }
}

async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap(),
        Err(e) => panic!(
            "{css}: {e}\non {:?}: {}",
            c.current_url().await.map(|u| u.path().to_owned()),
            c.source().await.unwrap_or_default()
        ),
    }
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

/// Clicks what navigates (a link, a form's button) and waits for the next page: the old
/// document gone, the new one's body there.
async fn navigate(c: &Client, css: &str) {
    let old = c.find(Locator::Css("html")).await.unwrap();
    click(c, css).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while old.tag_name().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{css} did not lead to another page"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("body"))
        .await
        .unwrap();
}

/// Every form control on the page has a label that names it (`label for=` its id), and
/// the page has its one `main` and `h1`.
async fn assert_labelled(c: &Client) {
    let controls = c
        .find_all(Locator::Css("input:not([type=hidden]), select, textarea"))
        .await
        .unwrap();
    for control in controls {
        let id = control.attr("id").await.unwrap();
        let id = id.unwrap_or_else(|| panic!("a form control without an id"));
        let label = c
            .find(Locator::Css(&format!("label[for='{id}']")))
            .await
            .unwrap_or_else(|_| panic!("no label for #{id}"));
        assert!(!label.text().await.unwrap().trim().is_empty(), "#{id}");
    }
    assert_eq!(c.find_all(Locator::Css("main")).await.unwrap().len(), 1);
    assert_eq!(c.find_all(Locator::Css("h1")).await.unwrap().len(), 1);
}

async fn screenshot(c: &Client, name: &str) {
    assert_labelled(c).await;

    if let Some(dir) = std::env::var_os("BROKER_UI_SCREENSHOTS") {
        let png = c.screenshot().await.unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }
}

/// A plain HTTP/1.1 GET: (status, body).
fn http_get(ui: &UiProcess, path: &str, host: &str, cookie: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(ui.base().trim_start_matches("http://")).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// Every proxy's count of kfrags.
fn kfrags(data: &Path) -> Vec<i64> {
    (0..3)
        .map(|i| {
            rusqlite::Connection::open(data.join(format!("proxies/{i}/proxy.db")))
                .unwrap()
                .query_row("SELECT COUNT(*) FROM kfrags", [], |r| r.get(0))
                .unwrap()
        })
        .collect()
}

/// Waits until every proxy holds `n` kfrags (revocations reach them after the answer).
fn await_kfrags(data: &Path, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while kfrags(data) != vec![n; 3] {
        assert!(
            Instant::now() < deadline,
            "kfrags at the proxies: {:?}, not {n} each",
            kfrags(data)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_board_member_and_a_patient_do_their_job_from_the_page() {
    let Some((driver_path, chromium)) = browser_paths() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run the browser tests: install chromium and chromium-driver (.ci/run does)"
        );
        eprintln!("no chromium/chromedriver: the browser test did not run (.ci/run runs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let fork = d.join("data-fork");
    let [operator, custodian, sponsor, board, researcher] = keys(d);
    let op_pub = PathBuf::from(public(&operator));
    let keystore = d.join("keystore.db");
    let keystore = keystore.to_str().unwrap();

    // The actors and their records, then a copy of the data directory as it is now:
    // later, a broker that serves this copy, grown another way, stands for one that
    // rewrote its log.
    let src = synthea();
    {
        let server = serve(&data, &op_pub);
        let ctl = Ctl::new(&server.url, &data);
        register(&ctl, &operator, [&custodian, &sponsor, &board, &researcher]);
        let imported = ctl.import_fhir(&custodian, src.to_str().unwrap(), keystore);
        assert_eq!(imported["patients"], 10, "{imported}");
    }
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&data)
        .arg(&fork)
        .status()
        .unwrap();
    assert!(copied.success());

    let server = serve(&data, &op_pub);
    let ctl = Ctl::new(&server.url, &data);
    // An emergency organisation and one of its clinicians, signed into the network.
    let (clinician, org_key) = emergency_organisation(&ctl, &operator, d);
    ctl.pin_network(&operator, &board, &data);
    ctl.json(
        &custodian,
        &["custodian", "consent", "--keystore", keystore, "--broad"],
    );
    let study = ctl.propose(
        &sponsor,
        "Diabetes outcomes",
        "demographics,conditions,observations",
        &researcher,
        &[],
    );

    let driver = start_driver(&driver_path, &chromium);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let board_ui = start_ui(&ctl, &["--key", board.to_str().unwrap()]);

    // Without this run's secret, nothing: no cookie, a wrong cookie, a wrong token, a
    // host that is not this loopback address.
    let host = board_ui.base().trim_start_matches("http://").to_owned();
    let cookie = format!("brokerctl-ui-{}={}", board_ui.port(), board_ui.secret());
    assert_eq!(http_get(&board_ui, "/studies", &host, None).0, 403);
    let wrong = format!("brokerctl-ui-{}={}", board_ui.port(), "0".repeat(64));
    assert_eq!(http_get(&board_ui, "/studies", &host, Some(&wrong)).0, 403);
    assert_eq!(
        http_get(&board_ui, "/?token=00", &host, None).0,
        403,
        "a wrong token"
    );
    let rebound = format!("evil.example:{}", board_ui.port());
    assert_eq!(
        http_get(&board_ui, "/studies", &rebound, Some(&cookie)).0,
        403,
        "another host name (DNS rebinding)"
    );
    let (status, listed) = http_get(&board_ui, "/studies", &host, Some(&cookie));
    assert_eq!(status, 200, "{listed}");
    assert!(listed.contains(&study), "{listed}");

    rt.block_on(async {
        let c = browser(&driver).await;
        // A browser that did not come through the printed address is refused too.
        c.goto(&format!("{}/studies", board_ui.base()))
            .await
            .unwrap();
        let refused = c.source().await.unwrap();
        assert!(refused.contains("refused"), "{refused}");
        assert!(!refused.contains(&study), "{refused}");

        // The board member opens the page, reads the study and approves it.
        c.goto(&board_ui.url).await.unwrap();
        let studies = text(&c, "main").await;
        assert!(studies.contains("1 waiting for a decision"), "{studies}");
        screenshot(&c, "board-studies").await;
        navigate(&c, &format!("a[href='/studies/{study}']")).await;
        let page = text(&c, "main").await;
        assert!(page.contains("Diabetes outcomes"), "{page}");
        assert!(page.contains("Any research (GRU)"), "{page}");
        assert!(
            page.contains("10 patients match."),
            "the exact count: {page}"
        );
        let attrition = text(&c, "#attrition").await;
        assert!(attrition.contains("Step"), "{attrition}");
        screenshot(&c, "board-study").await;
        c.find(Locator::Css("#reason"))
            .await
            .unwrap()
            .send_keys("IRB-7: consent and purpose match")
            .await
            .unwrap();
        navigate(&c, "#approve").await;
        let done = text(&c, "main").await;
        assert!(done.contains("Study approved"), "{done}");
        let shown = ctl.json(&board, &["board", "study", "show", &study]);
        assert_eq!(shown["status"], "approved", "at the broker: {shown}");

        // The access log verifies, and its events can be searched and exported.
        c.goto(&format!("{}/log", board_ui.base())).await.unwrap();
        navigate(&c, "#verify").await;
        let result = c.find(Locator::Css("#verify-result")).await.unwrap();
        assert_eq!(
            result.attr("data-verified").await.unwrap().as_deref(),
            Some("true"),
            "{}",
            result.text().await.unwrap()
        );
        screenshot(&c, "board-log").await;
        c.goto(&format!("{}/events?kind=study_approved", board_ui.base()))
            .await
            .unwrap();
        let found = text(&c, "#events").await;
        assert!(found.contains(&study), "{found}");
        assert_eq!(text(&c, "#found").await, "1 events.");
        screenshot(&c, "board-events").await;
        c.goto(&format!("{}/break-glass", board_ui.base()))
            .await
            .unwrap();
        assert!(text(&c, "main").await.contains("0 of 0 emergency accesses"));
        c.close().await.unwrap();
    });
    let (status, csv) = http_get(
        &board_ui,
        "/events/export?format=csv&kind=study_approved",
        &host,
        Some(&cookie),
    );
    assert_eq!(status, 200);
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].starts_with("index,time,kind,"), "{csv}");
    assert_eq!(rows.len(), 2, "{csv}");
    assert!(rows[1].contains(&study), "{csv}");

    // Every patient grants the study, as their consent permits.
    let granted = ctl.json(
        &custodian,
        &[
            "custodian",
            "grant",
            "--study",
            &study,
            "--keystore",
            keystore,
        ],
    );
    assert_eq!(granted["grants"], 10, "{granted}");
    assert_eq!(
        kfrags(&data),
        vec![30, 30, 30],
        "one per category of each grant"
    );
    // The researcher fetches: every patient is alerted.
    let fetched = ctl.fetch(&researcher, &study, &d.join("release"));
    assert_eq!(fetched["subjects"], 10, "{fetched}");

    // One patient, whose key the custodian keeps, narrows their consent on the page.
    let report = datasets::import_path(&synthea(), &datasets::DeidConfig::default());
    let patient = report.patients[0].source_id.clone();
    let network = ctl.network.borrow().clone().unwrap();
    let receipts = d.join("receipts.json");
    let patient_ui = start_ui(
        &ctl,
        &[
            "--keystore",
            keystore,
            "--patient",
            &patient,
            "--network",
            network.to_str().unwrap(),
            "--receipts",
            receipts.to_str().unwrap(),
        ],
    );
    let as_patient = ["--keystore", keystore, "--patient", patient.as_str()];
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&patient_ui.url).await.unwrap();
        let current = text(&c, "#current").await;
        assert!(current.contains("Allowed: any research"), "{current}");
        assert!(current.contains("Lab results"), "{current}");
        screenshot(&c, "patient-consent").await;
        click(&c, "#category-observations").await;
        click(&c, "#break_glass").await;
        navigate(&c, "#preview").await;
        let after = text(&c, "#after").await;
        assert!(!after.contains("Lab results"), "{after}");
        let withdrawn = text(&c, "main").await;
        assert!(
            withdrawn.contains(&study),
            "the preview names the study: {withdrawn}"
        );
        screenshot(&c, "patient-preview").await;
        navigate(&c, "#sign").await;
        let done = text(&c, "main").await;
        assert!(
            done.contains("Consent version 2 signed and set; 1 grant(s) withdrawn. Emergency access is ready at 1 emergency organisation(s)."),
            "{done}"
        );
        c.close().await.unwrap();
    });
    // At the broker: version 2, without observations. At every proxy: the grant's
    // kfrag destroyed.
    let shown = ctl.json(
        &custodian,
        &[&["patient", "consent", "show"][..], &as_patient].concat(),
    );
    assert_eq!(shown["version"], 2, "{shown}");
    assert!(!shown.to_string().contains("observations"), "{shown}");
    assert!(shown.to_string().contains("conditions"), "{shown}");
    // (27 of the study's grants, and the patient's standing emergency grant.)
    await_kfrags(&data, 28);

    // The patient grants the study again from the page: what the narrowed consent
    // allows, checked against the board-signed network.
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&patient_ui.url).await.unwrap();
        c.goto(&format!("{}/studies", patient_ui.base()))
            .await
            .unwrap();
        let open = text(&c, "main").await;
        assert!(
            open.contains("Your consent lets it have: Demographics (birth year, sex, region); Conditions and diagnoses."),
            "{open}"
        );
        screenshot(&c, "patient-studies").await;
        navigate(&c, "section.study button").await;
        let done = text(&c, "main").await;
        assert!(done.contains("You granted Diabetes outcomes."), "{done}");
        assert!(done.contains("You have granted it."), "{done}");
        c.close().await.unwrap();
    });
    await_kfrags(&data, 30);

    // An emergency clinician breaks the glass with the patient's card.
    let card = ctl.json(
        &custodian,
        &[&["patient", "emergency-card"][..], &as_patient].concat(),
    );
    let er = d.join("er");
    let opened = ctl.json(
        &clinician,
        &[
            "clinician",
            "break-glass",
            "--token",
            card["card"].as_str().unwrap(),
            "--reason",
            "unconscious after a fall",
            "--org-key",
            org_key.to_str().unwrap(),
            "--out",
            er.to_str().unwrap(),
        ],
    );
    assert!(opened["access_id"].is_string(), "{opened}");

    // The patient's timeline is exactly the log's events about them, from the board's
    // export of the whole log.
    let mine = ctl.json(
        &custodian,
        &[&["patient", "accesses"][..], &as_patient].concat(),
    );
    let tag = mine[0]["event"]["patient"].as_str().unwrap().to_owned();
    let all = ctl.ok(&board, &["board", "log", "export", "--format", "jsonl"]);
    let expected: Vec<u64> = all
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"]["patient"].as_str() == Some(tag.as_str()))
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert!(expected.len() >= 6, "{expected:?}");
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&patient_ui.url).await.unwrap();
        c.goto(&format!("{}/accesses", patient_ui.base()))
            .await
            .unwrap();
        let mut shown = Vec::new();
        for li in c.find_all(Locator::Css("#timeline li")).await.unwrap() {
            shown.push(
                li.attr("data-index")
                    .await
                    .unwrap()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            );
        }
        shown.sort_unstable();
        assert_eq!(
            shown, expected,
            "the timeline is the log's events about the patient"
        );
        let words = text(&c, "#timeline").await;
        assert!(
            words.contains("re-encrypted for a study's researcher"),
            "{words}"
        );
        assert!(
            words.contains("EMERGENCY ACCESS by") && words.contains("unconscious after a fall"),
            "{words}"
        );
        screenshot(&c, "patient-accesses").await;
        c.goto(&format!("{}/alerts", patient_ui.base()))
            .await
            .unwrap();
        assert_eq!(
            text(&c, "#unread").await,
            "2 unread alerts: releases of your records and emergency access."
        );
        screenshot(&c, "patient-alerts").await;
        navigate(&c, "#mark-read").await;
        assert!(text(&c, "#unread").await.starts_with("0 unread"));
        c.close().await.unwrap();
    });

    // The board reviews the emergency access.
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&board_ui.url).await.unwrap();
        c.goto(&format!("{}/break-glass", board_ui.base()))
            .await
            .unwrap();
        let queue = text(&c, "main").await;
        assert!(queue.contains("1 of 1 emergency accesses wait"), "{queue}");
        assert!(queue.contains("unconscious after a fall"), "{queue}");
        click(&c, "input[name=finding][value=ok]").await;
        c.find(Locator::Css("textarea[name=note]"))
            .await
            .unwrap()
            .send_keys("fall, card presented: justified")
            .await
            .unwrap();
        screenshot(&c, "board-break-glass").await;
        navigate(&c, "section.access button").await;
        let reviewed = text(&c, "main").await;
        assert!(
            reviewed.contains("0 of 1 emergency accesses wait"),
            "{reviewed}"
        );
        c.close().await.unwrap();
    });
    let queue = ctl.json(&board, &["board", "break-glass", "list"]);
    assert_eq!(
        queue[0]["review"]["finding"], "ok",
        "at the broker: {queue}"
    );

    // The patient revokes: the study's grant and the standing emergency grant go.
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&patient_ui.url).await.unwrap();
        navigate(&c, "#revoke").await;
        screenshot(&c, "patient-revoke").await;
        navigate(&c, "#confirm-revoke").await;
        let done = text(&c, "main").await;
        assert!(
            done.contains("Consent version 3 signed and set; 2 grant(s) withdrawn."),
            "{done}"
        );
        assert!(
            text(&c, "#current")
                .await
                .contains("Nothing is shared for research."),
            "{done}"
        );
        c.close().await.unwrap();
    });
    let shown = ctl.json(
        &custodian,
        &[&["patient", "consent", "show"][..], &as_patient].concat(),
    );
    assert_eq!(shown["version"], 3, "{shown}");
    assert!(shown.get("provisions").is_none(), "{shown}");
    await_kfrags(&data, 27);

    // Last, the patient asks to be erased: a wrong confirmation does nothing, the right
    // one erases, with receipts checked against the pinned network.
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&patient_ui.url).await.unwrap();
        c.goto(&format!("{}/erase", patient_ui.base()))
            .await
            .unwrap();
        screenshot(&c, "patient-erase").await;
        c.find(Locator::Css("#confirm"))
            .await
            .unwrap()
            .send_keys("yes")
            .await
            .unwrap();
        navigate(&c, "#erase").await;
        assert!(text(&c, "main").await.contains("Not confirmed"));
        assert!(!receipts.exists());
        c.goto(&format!("{}/erase", patient_ui.base()))
            .await
            .unwrap();
        c.find(Locator::Css("#confirm"))
            .await
            .unwrap()
            .send_keys("erase")
            .await
            .unwrap();
        navigate(&c, "#erase").await;
        let erased = text(&c, "main").await;
        assert!(
            erased.contains("Erased: 3 of 3 proxies confirmed"),
            "{erased}"
        );
        assert!(
            erased.contains("destroyed in the custodian's keystore"),
            "{erased}"
        );
        c.close().await.unwrap();
    });
    let checked = std::process::Command::new(brokerctl())
        .arg("verify-receipt")
        .arg(&receipts)
        .arg("--network")
        .arg(&network)
        .output()
        .unwrap();
    assert!(checked.status.success(), "{checked:?}");
    let checked = String::from_utf8(checked.stdout).unwrap();
    assert!(checked.contains("erasure of"), "{checked}");
    assert_eq!(
        kfrags(&data),
        vec![27, 27, 27],
        "the other patients' grants stay"
    );
    let gone = ctl.fails(
        &custodian,
        &[&["patient", "accesses"][..], &as_patient].concat(),
    );
    assert!(gone.contains("no patient"), "{gone}");
    drop(patient_ui);
    drop(board_ui);
    drop(server);

    // The broker comes back with another history: the copy, grown past what the board
    // verified with other events. The board's page says the log does not verify, and
    // keeps the checkpoint it trusted.
    let forked = serve(&fork, &op_pub);
    let forked_ctl = Ctl::new(&forked.url, &fork);
    // (Not through the custodian: its keystore remembers the consents it set, and its
    // agent refuses a broker that lacks them.)
    let other = forked_ctl.propose(&sponsor, "Other", "conditions", &researcher, &[]);
    for _ in 0..16 {
        forked_ctl.ok(&board, &["board", "count", "--study", &other]);
    }
    let trusted_size = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(PathBuf::from(format!("{}.log-state.json", board.display()))).unwrap(),
    )
    .unwrap()["checkpoint"]
        .as_str()
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap();
    let forked_size = forked_ctl
        .json(&board, &["board", "log", "show"])
        .as_array()
        .unwrap()
        .len() as u64;
    assert!(forked_size > trusted_size, "{forked_size} > {trusted_size}");
    let state = PathBuf::from(format!("{}.log-state.json", board.display()));
    let trusted = std::fs::read(&state).unwrap();
    let board_ui = start_ui(&forked_ctl, &["--key", board.to_str().unwrap()]);
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&board_ui.url).await.unwrap();
        c.goto(&format!("{}/log", board_ui.base())).await.unwrap();
        navigate(&c, "#verify").await;
        let result = c.find(Locator::Css("#verify-result")).await.unwrap();
        let said = result.text().await.unwrap();
        assert_eq!(
            result.attr("data-verified").await.unwrap().as_deref(),
            Some("false"),
            "{said}"
        );
        assert!(said.contains("does NOT verify"), "{said}");
        screenshot(&c, "board-log-failed").await;
        c.close().await.unwrap();
    });
    assert_eq!(std::fs::read(&state).unwrap(), trusted, "nothing saved");
}

/// The page acts with the user's key: it refuses to listen anywhere but on loopback,
/// before it reads a key or calls a broker.
#[test]
fn the_page_refuses_an_address_other_than_loopback() {
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let out = std::process::Command::new(brokerctl())
            .args(["ui", "--listen", listen, "--key", "/nonexistent.key"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{listen}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("loopback address only"), "{listen}: {said}");
    }
}
