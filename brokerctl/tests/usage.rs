//! The `brokerctl` binary as a user first meets it: its help names every role, and a key
//! file that is not one is refused with a clear message before any connection is made.

use std::process::Command;

const BROKERCTL: &str = env!("CARGO_BIN_EXE_brokerctl");

#[test]
fn help_lists_a_subcommand_per_role() {
    let out = Command::new(BROKERCTL).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for role in [
        "operator",
        "patient",
        "custodian",
        "sponsor",
        "board",
        "researcher",
    ] {
        assert!(
            help.contains(role),
            "--help does not mention {role}:\n{help}"
        );
    }
}

#[test]
fn a_key_file_that_is_not_one_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("not-a-key");
    std::fs::write(&key, "hello\n").unwrap();
    let out = Command::new(BROKERCTL)
        .args(["whoami", "--broker", "http://127.0.0.1:9", "--key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not-a-key"), "the error names the file: {err}");
    assert!(!err.contains("panicked"), "no panic: {err}");
}
