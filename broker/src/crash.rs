//! Crash points: places where the crash tests make the broker die as if killed (no
//! destructors, no flush), to check that nothing stored is left unlogged and no consent
//! change loses its withdrawals. `BROKER_CRASH_AT=<name>` arms one; unset, as always
//! outside those tests, they do nothing.

/// After an upload's transaction committed, before its events reach the log.
pub const UPLOAD_AFTER_COMMIT: &str = "upload-after-commit";
/// After a consent change was stored (and logged), before its grant withdrawals.
pub const CONSENT_BEFORE_WITHDRAWAL: &str = "consent-before-withdrawal";

pub(crate) fn point(name: &str) {
    if std::env::var_os("BROKER_CRASH_AT").is_some_and(|armed| armed == name) {
        eprintln!("crash point {name}: aborting");
        std::process::abort();
    }
}
