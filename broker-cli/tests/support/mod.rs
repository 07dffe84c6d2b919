//! What the process-level tests share: `broker serve` and `brokerctl` as a user runs
//! them, key files, registration and the pinned network.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BROKER: &str = env!("CARGO_BIN_EXE_broker");
/// `brokerctl` is the client crate's binary, built beside this one by
/// `cargo test --workspace`.
pub fn brokerctl() -> PathBuf {
    let path =
        Path::new(BROKER).with_file_name(format!("brokerctl{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or build brokerctl first)",
        path.display()
    );
    path
}

pub fn eunomia() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/omop-eunomia-gibleed")
}

pub fn synthea() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/synthea-ma-11/fhir")
}

pub struct Server {
    pub child: Child,
    pub url: String,
    /// Everything the server logged.
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `broker serve` on a free loopback port and waits until it says where it listens.
pub fn serve(data: &Path, operator_pub: &Path) -> Server {
    serve_armed(data, operator_pub, None)
}

/// [`serve`], with a crash point armed (`broker::crash`).
pub fn serve_armed(data: &Path, operator_pub: &Path, crash_at: Option<&str>) -> Server {
    let mut args: Vec<std::ffi::OsString> =
        vec!["serve".into(), "--listen".into(), "127.0.0.1:0".into()];
    args.extend([
        "--data-dir".into(),
        data.into(),
        "--operator".into(),
        operator_pub.into(),
    ]);
    let env: Vec<(&str, &str)> = crash_at
        .map(|c| ("BROKER_CRASH_AT", c))
        .into_iter()
        .collect();
    spawn_with(&args, "broker listening on ", &env)
}

/// The permission bits of `path`.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every secret the broker, its proxies and the clients wrote is owner-only, though all
/// of them ran under umask 000.
pub fn assert_secrets_owner_only(data: &Path, keystore: &Path, keys: &[&Path], release: &Path) {
    for dir in [data.to_owned(), data.join("proxies/0"), release.to_owned()] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    let mut files = vec![
        data.join("broker.db"),
        data.join("broker.key"),
        data.join("tls.key"),
        data.join("LOCK"),
        data.join("proxies/0/proxy.db"),
        data.join("proxies/0/proxy.key"),
        data.join("proxies/0/tls.key"),
        keystore.to_owned(),
        release.join("manifest.json"),
    ];
    files.extend(keys.iter().map(|k| k.to_path_buf()));
    for f in files {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    for entry in std::fs::read_dir(release).unwrap() {
        let subject = entry.unwrap().path();
        if subject.is_dir() {
            assert_eq!(mode(&subject), 0o700, "{}", subject.display());
            for f in std::fs::read_dir(&subject).unwrap() {
                let f = f.unwrap().path();
                assert_eq!(mode(&f), 0o600, "{}", f.display());
            }
        }
    }
}

/// Runs `broker ARGS` and waits until it prints `announce` followed by its address.
pub fn spawn(args: &[std::ffi::OsString], announce: &str) -> Server {
    spawn_with(args, announce, &[])
}

/// A command that runs `program` under umask 000, so that only the program's own care
/// keeps its secret files private.
pub fn open_umask(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(program);
    c
}

/// [`spawn`] under umask 000, with `env` set.
pub fn spawn_with(args: &[std::ffi::OsString], announce: &str, env: &[(&str, &str)]) -> Server {
    let announce = announce.to_owned();
    let mut child = open_umask(BROKER)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("broker starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(announce.as_str()) {
                let address = rest.split_whitespace().next().unwrap_or_default();
                let _ = tx.send(address.to_owned());
            }
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("`broker {args:?}` announces its address"));
    Server { child, url, log }
}

pub struct Ctl<'a> {
    pub url: &'a str,
    /// The broker's certificate, pinned by every command.
    pub cert: PathBuf,
    /// Everything brokerctl wrote to stderr (errors, warnings).
    pub errors: std::cell::RefCell<String>,
    /// The pinned network manifest, once [`Ctl::pin_network`] made it.
    pub network: std::cell::RefCell<Option<PathBuf>>,
}

impl<'a> Ctl<'a> {
    pub fn new(url: &'a str, data: &Path) -> Self {
        Ctl {
            url,
            cert: data.join("tls.crt"),
            errors: Default::default(),
            network: Default::default(),
        }
    }

    pub fn run(&self, key: &Path, args: &[&str]) -> std::process::Output {
        let mut command = open_umask(brokerctl());
        command.env("BROKER_CERT", &self.cert);
        if let Some(network) = &*self.network.borrow() {
            command.env("BROKER_NETWORK", network);
        }
        let out = command
            .args(args)
            .args(["--broker", self.url, "--key"])
            .arg(key)
            .output()
            .expect("brokerctl runs");
        self.errors
            .borrow_mut()
            .push_str(&String::from_utf8_lossy(&out.stderr));
        out
    }

    pub fn ok(&self, key: &Path, args: &[&str]) -> String {
        let out = self.run(key, args);
        assert!(
            out.status.success(),
            "brokerctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, key: &Path, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(key, &a)).expect("json output")
    }

    /// `researcher fetch` of a study into `out`; its JSON summary.
    pub fn fetch(&self, researcher: &Path, study_id: &str, out: &Path) -> serde_json::Value {
        let out = out.to_str().unwrap();
        self.json(
            researcher,
            &["researcher", "fetch", "--study", study_id, "--out", out],
        )
    }

    /// `sponsor study propose` for `researcher`, with `extra` options; the study id.
    pub fn propose(
        &self,
        sponsor: &Path,
        title: &str,
        categories: &str,
        researcher: &Path,
        extra: &[&str],
    ) -> String {
        let researcher = public(researcher);
        let mut args = vec![
            "sponsor",
            "study",
            "propose",
            "--title",
            title,
            "--categories",
            categories,
            "--researcher-key",
            &researcher,
        ];
        args.extend(extra);
        let study = self.json(sponsor, &args);
        study["study_id"].as_str().unwrap().to_owned()
    }

    /// The operator drafts the network manifest from the broker in `data`, the board signs
    /// it, and every later command pins it.
    pub fn pin_network(&self, operator: &Path, board: &Path, data: &Path) {
        let path = data.with_file_name("network.json");
        let path_str = path.to_str().unwrap();
        let broker_pub = data.join("broker.pub");
        self.ok(
            operator,
            &[
                "operator",
                "network",
                "--broker-key",
                broker_pub.to_str().unwrap(),
                "--out",
                path_str,
            ],
        );
        self.ok(board, &["board", "sign-network", path_str]);
        *self.network.borrow_mut() = Some(path);
    }

    /// `import fhir SRC --keystore KEYSTORE` as the custodian; its JSON report.
    pub fn import_fhir(&self, custodian: &Path, src: &str, keystore: &str) -> serde_json::Value {
        self.json(custodian, &["import", "fhir", src, "--keystore", keystore])
    }

    pub fn fails(&self, key: &Path, args: &[&str]) -> String {
        let out = self.run(key, args);
        assert!(!out.status.success(), "brokerctl {args:?} should fail");
        String::from_utf8(out.stderr).unwrap()
    }
}

pub fn keygen(dir: &Path, role: &str) -> PathBuf {
    let key = dir.join(format!("{role}.key"));
    let out = Command::new(brokerctl())
        .args(["keygen", "--role", role, "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    key
}

/// A key file for each role, in `d`: operator, custodian, sponsor, board, researcher.
pub fn keys(d: &Path) -> [PathBuf; 5] {
    ["operator", "custodian", "sponsor", "board", "researcher"].map(|role| keygen(d, role))
}

/// The operator registers each key file under the role it was made for (its file stem).
pub fn register(ctl: &Ctl<'_>, operator: &Path, keys: [&PathBuf; 4]) {
    for key in keys {
        let role = key.file_stem().unwrap().to_str().unwrap();
        ctl.ok(
            operator,
            &[
                "operator",
                "register",
                "--public-key",
                &public(key),
                "--role",
                role,
                "--name",
                role,
            ],
        );
    }
}

pub fn public(key: &Path) -> String {
    format!("{}.pub", key.display())
}

/// The operator registers emergency organisation `er-north` (its key made in `dir`) and
/// one of its clinicians; returns the clinician's key file and the organisation's. Pin
/// the network afterwards, for the board to sign the organisation in.
pub fn emergency_organisation(ctl: &Ctl<'_>, operator: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let clinician = keygen(dir, "clinician");
    let org_key = dir.join("er-north.key");
    let made = Command::new(brokerctl())
        .args(["keygen", "--role", "clinician", "--out"])
        .arg(&org_key)
        .output()
        .unwrap();
    assert!(made.status.success());
    ctl.ok(
        operator,
        &[
            "operator",
            "register",
            "--public-key",
            &public(&clinician),
            "--role",
            "clinician",
            "--name",
            "Dr North",
            "--organisation",
            "er-north",
        ],
    );
    let org = ctl.json(
        operator,
        &[
            "operator",
            "emergency-org",
            "--id",
            "er-north",
            "--name",
            "North emergency department",
            "--public-key",
            &public(&org_key),
        ],
    );
    assert_eq!(org["organisation_id"], "er-north");
    (clinician, org_key)
}
