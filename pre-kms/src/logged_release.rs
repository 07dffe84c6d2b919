//! No access without a record: the proof a proxy checks before it re-encrypts anything.
//!
//! When a researcher's release is fixed, the broker appends one `release` event per
//! patient to the audit log (naming the release, the study, the patient's grant and the
//! categories released) and signs a checkpoint of the log. Every re-encryption request
//! then carries that signed checkpoint and, for each patient in the batch, the event's
//! leaf bytes with an inclusion proof. A proxy accepts the request only if the checkpoint
//! is signed by the broker's key and every proof leads to its root
//! ([`LoggedRelease::verify`] → [`VerifiedRelease`]), and re-encrypts an item only if a
//! verified event names this release, the item's study, the grant the proxy holds the
//! kfrag under and the item's category ([`VerifiedRelease::covers`]).
//!
//! A break-glass access is proven the same way, by its `break_glass` event, with two
//! more rules that keep the two paths apart: a `break_glass` event covers only the
//! `critical` category of an emergency organisation's standing grant, and only until the
//! expiry it names (at most [`BREAK_GLASS_MAX_SECONDS`] after the event); a `release`
//! event never covers `critical` nor an emergency organisation's grant.
//!
//! The same keys sign and check checkpoints for the board and patients: an [`Identity`]
//! is a [`CheckpointSigner`] under its actor id, and [`CheckpointKeys`] checks signatures
//! by public keys known by actor id.

use std::collections::HashMap;

use audit_log::{AuditEvent, CheckpointSigner, CheckpointVerifier, EventKind, InclusionProof};
use audit_log::{Hash, SignedCheckpoint};
use umbral_pre::PublicKey;

use crate::keys::{Identity, actor_id, verify_signature};
use model::{Category, emergency_organisation_of};

/// A break-glass event allows re-encryption for at most this long (24 hours), whatever
/// window the broker is set to.
pub const BREAK_GLASS_MAX_SECONDS: i64 = 24 * 60 * 60;

/// How far ahead of the proxy's clock a break-glass event's time may be.
const CLOCK_SKEW_SECONDS: i64 = 300;

impl CheckpointSigner for Identity {
    fn key_id(&self) -> String {
        self.actor_id()
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        Identity::sign(self, msg)
    }
}

/// Verifies checkpoint signatures by the public keys it knows, each under its actor id.
#[derive(Debug, Clone, Default)]
pub struct CheckpointKeys {
    keys: HashMap<String, PublicKey>,
}

impl CheckpointKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        CheckpointKeys {
            keys: keys.into_iter().map(|k| (actor_id(&k), k)).collect(),
        }
    }
}

impl CheckpointVerifier for CheckpointKeys {
    fn verify(&self, key_id: &str, msg: &[u8], sig: &[u8]) -> bool {
        self.keys
            .get(key_id)
            .is_some_and(|k| verify_signature(k, msg, sig))
    }
}

/// One logged event as shipped to a verifier: its leaf index, its leaf bytes and its
/// inclusion proof (the audit path) in the checkpoint's tree.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub index: u64,
    pub leaf: Vec<u8>,
    pub path: Vec<Hash>,
}

/// Why a release is not provably logged. Messages carry ids and sizes only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotLogged {
    #[error("the request carries no signed checkpoint of the audit log")]
    NoCheckpoint,
    #[error("the audit checkpoint does not parse: {0}")]
    BadCheckpoint(String),
    #[error("the audit checkpoint is not signed by the broker: {0}")]
    BadSignature(String),
    #[error("logged event {index}: {reason}")]
    BadEvent { index: u64, reason: String },
}

/// The log evidence of one re-encryption request, not yet checked.
#[derive(Debug, Clone)]
pub struct LoggedRelease {
    pub release_id: String,
    /// The signed checkpoint in its note form ([`SignedCheckpoint::to_note`]).
    pub checkpoint: String,
    pub events: Vec<LoggedEvent>,
}

/// What a verified release event allows: re-encryption under one grant, for one study
/// and some categories.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowance {
    study_id: String,
    grant_id: String,
    categories: Vec<String>,
}

/// A release whose events are proven to be in the broker-signed log. Only this type can
/// authorize re-encryption (`ProxyNode::reencrypt` in the proxy crate).
#[derive(Debug, Clone)]
pub struct VerifiedRelease {
    release_id: String,
    checkpoint_size: u64,
    allowances: Vec<Allowance>,
}

impl LoggedRelease {
    /// Checks the checkpoint's signature by `broker_key` and every event's inclusion proof,
    /// and that every event is a successful `release` event of this release, or a
    /// successful `break_glass` event of this access still inside its window at `now`
    /// (unix seconds).
    pub fn verify(self, broker_key: &PublicKey, now: i64) -> Result<VerifiedRelease, NotLogged> {
        if self.checkpoint.is_empty() {
            return Err(NotLogged::NoCheckpoint);
        }
        let signed = SignedCheckpoint::from_note(&self.checkpoint)
            .map_err(|e| NotLogged::BadCheckpoint(e.to_string()))?;
        let broker_id = actor_id(broker_key);
        signed
            .verify(&CheckpointKeys::new([*broker_key]), &[broker_id.as_str()])
            .map_err(|e| NotLogged::BadSignature(e.to_string()))?;
        let checkpoint = signed.checkpoint;
        let mut allowances = Vec::with_capacity(self.events.len());
        for e in self.events {
            let bad = |reason: String| NotLogged::BadEvent {
                index: e.index,
                reason,
            };
            let proof = InclusionProof {
                leaf_index: e.index,
                tree_size: checkpoint.size,
                path: e.path.clone(),
            };
            checkpoint
                .verify_inclusion(&e.leaf, &proof)
                .map_err(|err| bad(format!("not in the signed checkpoint: {err}")))?;
            let event = AuditEvent::from_leaf_bytes(&e.leaf)
                .map_err(|err| bad(format!("does not parse: {err}")))?;
            if !matches!(event.kind, EventKind::Release | EventKind::BreakGlass)
                || event.outcome != audit_log::event::Outcome::Success
            {
                return Err(bad(
                    "is not a successful release or break-glass event".into()
                ));
            }
            if event.details.release_id.as_deref() != Some(self.release_id.as_str()) {
                return Err(bad("belongs to another release".into()));
            }
            let (Some(study_id), Some(grant_id)) = (
                event.details.study_id.clone(),
                event.details.grant_id.clone(),
            ) else {
                return Err(bad("names no study or grant".into()));
            };
            let emergency = emergency_organisation_of(&study_id).is_some();
            let critical = event
                .details
                .categories
                .iter()
                .any(|c| c == Category::Critical.label());
            if event.kind == EventKind::Release && (emergency || critical) {
                return Err(bad(
                    "a release event cannot cover the critical category or an emergency grant"
                        .into(),
                ));
            }
            if event.kind == EventKind::BreakGlass {
                if !emergency || event.details.categories != [Category::Critical.label()] {
                    return Err(bad(
                        "a break-glass event covers only the critical category of an emergency grant"
                            .into(),
                    ));
                }
                let Some(expires_at) = event.details.expires_at else {
                    return Err(bad("the break-glass event names no expiry".into()));
                };
                if expires_at - event.time > BREAK_GLASS_MAX_SECONDS
                    || event.time > now + CLOCK_SKEW_SECONDS
                {
                    return Err(bad(
                        "the break-glass event's window is longer than 24 hours or starts in the future"
                            .into(),
                    ));
                }
                if now >= expires_at {
                    return Err(bad("the break-glass window is over".into()));
                }
            }
            allowances.push(Allowance {
                study_id,
                grant_id,
                categories: event.details.categories,
            });
        }
        Ok(VerifiedRelease {
            release_id: self.release_id,
            checkpoint_size: checkpoint.size,
            allowances,
        })
    }
}

impl VerifiedRelease {
    pub fn release_id(&self) -> &str {
        &self.release_id
    }

    /// The size of the log the release was proven against.
    pub fn checkpoint_size(&self) -> u64 {
        self.checkpoint_size
    }

    /// Whether a logged event of this release allows re-encrypting `category` under
    /// `grant_id` for `study_id`.
    pub fn covers(&self, study_id: &str, grant_id: &str, category: Category) -> bool {
        self.allowances.iter().any(|a| {
            a.study_id == study_id
                && a.grant_id == grant_id
                && a.categories.iter().any(|c| c == category.label())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use audit_log::AuditLog;
    use audit_log::event::{Actor, ActorRole, Outcome};

    const NOW: i64 = 1_700_000_100;

    fn release_event(release: &str, grant: &str, category: &str) -> AuditEvent {
        let actor = Actor {
            id: "researcher".into(),
            role: ActorRole::Registered(model::Role::Researcher),
            organisation: None,
        };
        let mut e = AuditEvent::new(EventKind::Release, 1_700_000_000, actor);
        e.details.release_id = Some(release.into());
        e.details.study_id = Some("st-1".into());
        e.details.grant_id = Some(grant.into());
        e.details.categories = vec![category.into()];
        e
    }

    fn logged(log: &AuditLog, index: u64, size: u64) -> LoggedEvent {
        LoggedEvent {
            index,
            leaf: log.leaf(index).unwrap(),
            path: log.inclusion_proof(index, size).unwrap().path,
        }
    }

    #[test]
    fn only_a_signed_logged_release_event_authorizes() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Identity::generate();
        let mut log = AuditLog::create(dir.path(), "test").unwrap();
        let mut refused = release_event("rel-1", "gr-3", "conditions");
        refused.outcome = Outcome::Refused { reason: "x".into() };
        let events = [
            release_event("rel-1", "gr-1", "conditions"),
            release_event("rel-2", "gr-2", "conditions"),
            refused,
        ];
        log.append_events(&events).unwrap();
        let note = log.checkpoint(&broker, 1).unwrap().to_note().unwrap();
        let request = |events: Vec<LoggedEvent>, checkpoint: &str| LoggedRelease {
            release_id: "rel-1".into(),
            checkpoint: checkpoint.into(),
            events,
        };

        let ok = request(vec![logged(&log, 0, 3)], &note)
            .verify(&broker.verifying_key(), NOW)
            .unwrap();
        assert!(ok.covers("st-1", "gr-1", Category::Conditions));
        assert!(!ok.covers("st-1", "gr-1", Category::MentalHealth));
        assert!(!ok.covers("st-1", "gr-2", Category::Conditions));
        assert!(!ok.covers("st-2", "gr-1", Category::Conditions));

        let other_key = Identity::generate().verifying_key();
        let refusals = [
            request(vec![logged(&log, 0, 3)], "").verify(&broker.verifying_key(), NOW),
            request(vec![logged(&log, 0, 3)], &note).verify(&other_key, NOW),
            // another release's event, and a refused one
            request(vec![logged(&log, 1, 3)], &note).verify(&broker.verifying_key(), NOW),
            request(vec![logged(&log, 2, 3)], &note).verify(&broker.verifying_key(), NOW),
        ];
        for r in refusals {
            assert!(r.is_err(), "{r:?}");
        }

        // An event that is not in the log: right shape, forged proof.
        let forged = release_event("rel-1", "gr-9", "conditions");
        let mut fake = logged(&log, 0, 3);
        fake.leaf = forged.to_leaf_bytes().unwrap();
        let err = request(vec![fake], &note)
            .verify(&broker.verifying_key(), NOW)
            .unwrap_err();
        assert!(matches!(err, NotLogged::BadEvent { index: 0, .. }), "{err}");

        // A checkpoint whose root was altered no longer carries a valid signature.
        let mut signed = SignedCheckpoint::from_note(&note).unwrap();
        signed.checkpoint.root[0] ^= 1;
        let err = request(vec![logged(&log, 0, 3)], &signed.to_note().unwrap())
            .verify(&broker.verifying_key(), NOW)
            .unwrap_err();
        assert!(matches!(err, NotLogged::BadSignature(_)), "{err}");
    }

    fn break_glass_event(access: &str, grantee: &str, category: &str, window: i64) -> AuditEvent {
        let mut e = release_event(access, "gr-e", category);
        e.kind = EventKind::BreakGlass;
        e.actor.role = ActorRole::Registered(model::Role::Clinician);
        e.details.study_id = Some(grantee.into());
        e.details.expires_at = Some(e.time + window);
        e
    }

    #[test]
    fn break_glass_covers_critical_of_an_emergency_grant_inside_its_window_only() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Identity::generate();
        let mut log = AuditLog::create(dir.path(), "test").unwrap();
        let grantee = model::emergency_grantee("er-north");
        let mut no_expiry = break_glass_event("bg-1", &grantee, "critical", 600);
        no_expiry.details.expires_at = None;
        let events = [
            break_glass_event("bg-1", &grantee, "critical", 600),
            break_glass_event("bg-1", "st-1", "critical", 600),
            break_glass_event("bg-1", &grantee, "conditions", 600),
            break_glass_event("bg-1", &grantee, "critical", BREAK_GLASS_MAX_SECONDS + 1),
            no_expiry,
            // a research release event naming critical, or an emergency grant
            release_event("bg-1", "gr-e", "critical"),
            {
                let mut e = release_event("bg-1", "gr-e", "conditions");
                e.details.study_id = Some(grantee.clone());
                e
            },
        ];
        log.append_events(&events).unwrap();
        let size = events.len() as u64;
        let note = log.checkpoint(&broker, 1).unwrap().to_note().unwrap();
        let request = |index: u64| LoggedRelease {
            release_id: "bg-1".into(),
            checkpoint: note.clone(),
            events: vec![logged(&log, index, size)],
        };
        let key = broker.verifying_key();
        let ok = request(0).verify(&key, NOW).unwrap();
        assert!(ok.covers(&grantee, "gr-e", Category::Critical));
        assert!(!ok.covers(&grantee, "gr-e", Category::Conditions));
        assert!(!ok.covers("st-1", "gr-e", Category::Critical));
        // The window: 600 s after the event's time, by the proxy's clock.
        let over = request(0).verify(&key, 1_700_000_000 + 600).unwrap_err();
        assert!(over.to_string().contains("window is over"), "{over}");
        for index in 1..size {
            let err = request(index).verify(&key, NOW).unwrap_err();
            assert!(matches!(err, NotLogged::BadEvent { .. }), "{index}: {err}");
        }
    }
}
