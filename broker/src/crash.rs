//! Crash points: places where the crash tests make the broker die as if killed (no
//! destructors, no flush), to check that nothing stored is left unlogged and no consent
//! change loses its withdrawals. `BROKER_CRASH_AT=<name>` arms one; unset, as always
//! outside those tests, they do nothing.

/// After an upload's transaction committed, before its events reach the log.
pub const UPLOAD_AFTER_COMMIT: &str = "upload-after-commit";
/// After a consent change was stored (and logged), before its grant withdrawals.
pub const CONSENT_BEFORE_WITHDRAWAL: &str = "consent-before-withdrawal";

/// An erasure was accepted (grants withdrawn, logged); no proxy asked yet.
pub const ERASE_AFTER_ACCEPT: &str = "erase-after-accept";
/// Every proxy destroyed the patient's kfrags; nothing deleted at the broker yet.
pub const ERASE_AFTER_PROXIES: &str = "erase-after-proxies";
/// The packs were rewritten without the patient's blobs; the rows not yet deleted.
pub const ERASE_AFTER_REWRITE: &str = "erase-after-rewrite";
/// The patient's rows were deleted; the old packs not yet destroyed.
pub const ERASE_AFTER_DELETE: &str = "erase-after-delete";
/// The old packs were destroyed; the cohort engine's snapshot still holds the patient.
pub const ERASE_AFTER_PACKS: &str = "erase-after-packs";

/// Every crash point, for the tests that arm each in turn.
pub const ERASURE_POINTS: &[&str] = &[
    ERASE_AFTER_ACCEPT,
    ERASE_AFTER_PROXIES,
    ERASE_AFTER_REWRITE,
    ERASE_AFTER_DELETE,
    ERASE_AFTER_PACKS,
];

pub(crate) fn point(name: &str) {
    if std::env::var_os("BROKER_CRASH_AT").is_some_and(|armed| armed == name) {
        eprintln!("crash point {name}: aborting");
        std::process::abort();
    }
}
