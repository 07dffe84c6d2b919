//! The audit event model, its canonical leaf encoding, and patient pseudonyms.
//!
//! Events carry identifiers and pseudonyms only: actor ids, study/grant/release ids, content
//! hashes and a keyed per-patient tag; never a name, a record or any other patient data.

use std::fmt;

use model::Role;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::tree::Hash;

/// Version of the event schema written into every event.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// Why an event could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The bytes are not JSON of an event.
    #[error("not an audit event: {0}")]
    Json(#[from] serde_json::Error),
    /// The bytes decode, but are not the canonical encoding of what they decode to.
    #[error("the leaf is not in canonical form")]
    NotCanonical,
    /// The event contains a value the canonical form does not allow (a non-integer number).
    #[error("the event contains a value the canonical form does not allow: {0}")]
    Unsupported(String),
    /// The event was written with a schema this library does not know.
    #[error("unknown event schema version {0}")]
    UnknownVersion(u32),
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A patient (or their custodian) was enrolled.
    Enroll,
    /// Encrypted records were uploaded.
    Upload,
    /// A consent was set or changed.
    ConsentSet,
    /// A consent was revoked.
    ConsentRevoked,
    /// A sponsor proposed a study.
    StudyProposed,
    /// An ethics board approved a study.
    StudyApproved,
    /// An ethics board rejected a study.
    StudyRejected,
    /// A grant (re-encryption authorization) was issued.
    GrantIssued,
    /// A grant was withdrawn.
    GrantWithdrawn,
    /// A feasibility count was answered.
    FeasibilityCount,
    /// Records were released (re-encrypted) for a study.
    Release,
    /// A researcher fetched a release.
    Fetch,
    /// Emergency access outside the normal authorization: a registered clinician read a
    /// patient's `critical` records under the patient's standing emergency grant.
    BreakGlass,
    /// An ethics board reviewed a break-glass access (its finding and note).
    BreakGlassReview,
    /// A patient's data was erased.
    Erasure,
    /// A study's researcher is told that a subject whose records the study received was
    /// erased: what the researcher holds stays governed by the study's data-use terms.
    ErasureNotice,
    /// A key was rotated.
    KeyRotation,
    /// A request was refused by authorization.
    AuthorizationFailed,
}

impl EventKind {
    /// The kind's name, as serialized (`release`, `grant_issued`, ...).
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// Which leaves of the access log a reader (an ethics board) asks for: by time, study,
/// actor and kind (by [`EventKind::name`]), from a leaf index on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub study: Option<String>,
    pub actor: Option<String>,
    pub kinds: Vec<String>,
    pub from_leaf: u64,
}

/// The role an actor acted in: a registered role ([`model::Role`], its one definition), or
/// one of the log's own non-actor parties. Serialized as the role's name (`researcher`,
/// `proxy`, `system`, `unauthenticated`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorRole {
    /// A registered actor's role (patient, custodian, sponsor, researcher, board,
    /// clinician, operator).
    Registered(Role),
    /// A re-encryption proxy.
    Proxy,
    /// The broker itself (automatic actions).
    System,
    /// A caller whose identity could not be established (failed authorization).
    Unauthenticated,
}

impl ActorRole {
    /// The role's name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorRole::Registered(role) => role.as_str(),
            ActorRole::Proxy => "proxy",
            ActorRole::System => "system",
            ActorRole::Unauthenticated => "unauthenticated",
        }
    }
}

impl From<Role> for ActorRole {
    fn from(role: Role) -> ActorRole {
        ActorRole::Registered(role)
    }
}

impl Serialize for ActorRole {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ActorRole {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ActorRole, D::Error> {
        let name = String::deserialize(d)?;
        match name.as_str() {
            "proxy" => Ok(ActorRole::Proxy),
            "system" => Ok(ActorRole::System),
            "unauthenticated" => Ok(ActorRole::Unauthenticated),
            other => other
                .parse::<Role>()
                .map(ActorRole::Registered)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's registered id (e.g. a key fingerprint); for an unauthenticated caller,
    /// whatever identifier was presented.
    pub id: String,
    /// The role the actor acted in.
    pub role: ActorRole,
    /// The actor's organisation id, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organisation: Option<String>,
}

/// A 32-byte value shown as 64 lowercase hex digits (content hashes, consent versions).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Digest32(#[serde(with = "crate::proof::hex_hash")] pub Hash);

impl fmt::Debug for Digest32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(self.0))
    }
}

/// Why the action happened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Justification {
    /// The stated purpose (e.g. a purpose code, or the break-glass justification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Hash of the consent text/version the action relied on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_version: Option<Digest32>,
    /// The study under whose approval the action happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study_id: Option<String>,
}

/// How it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// The action was carried out.
    Success,
    /// The action was refused.
    Refused {
        /// Why (machine-readable reason code or short text; no patient data).
        reason: String,
    },
}

/// The objects of the event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Details {
    /// The study the event is about (e.g. the proposed or approved study).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study_id: Option<String>,
    /// The grant the event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// The release the event is about (proxies look releases up by this id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_id: Option<String>,
    /// The key the event is about (key rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The study's own pseudonym of the subject the event is about, as the study's
    /// researcher received it (erasure notices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Data categories involved (e.g. FHIR resource types).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// Number of records involved (or the count answered, for feasibility counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_count: Option<u64>,
    /// Hashes of the ciphertexts, capsules or other contents involved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_hashes: Vec<Digest32>,
    /// The normalized hash of the cohort definition counted, or that selected a release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition_hash: Option<Digest32>,
    /// Until when (unix seconds) the access the event records may be used: the
    /// break-glass window, which proxies enforce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// What a protected feasibility count cost its sponsor's privacy budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetCharge>,
}

/// A charge to a sponsor's privacy budget: the units (fresh noisy counts) one feasibility
/// count cost, and the units left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetCharge {
    pub charged: u64,
    pub remaining: u64,
}

/// One consequential event.
///
/// Its leaf bytes are [`to_leaf_bytes`](Self::to_leaf_bytes): canonical JSON, see the crate
/// documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Schema version ([`EVENT_SCHEMA_VERSION`]).
    pub v: u32,
    /// What happened.
    pub kind: EventKind,
    /// When, in unix seconds.
    pub time: i64,
    /// Who acted.
    pub actor: Actor,
    /// About whom: the keyed patient pseudonym, if the event concerns one patient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<PatientTag>,
    /// Why.
    #[serde(default, skip_serializing_if = "Justification::is_empty")]
    pub why: Justification,
    /// How it ended.
    pub outcome: Outcome,
    /// What it was about.
    #[serde(default, skip_serializing_if = "Details::is_empty")]
    pub details: Details,
}

impl Justification {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl Details {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl AuditEvent {
    /// A successful event with no patient, justification or details; fill those in as needed.
    pub fn new(kind: EventKind, time: i64, actor: Actor) -> Self {
        Self {
            v: EVENT_SCHEMA_VERSION,
            kind,
            time,
            actor,
            patient: None,
            why: Justification::default(),
            outcome: Outcome::Success,
            details: Details::default(),
        }
    }

    /// The canonical leaf bytes of this event.
    pub fn to_leaf_bytes(&self) -> Result<Vec<u8>, EventError> {
        let value = serde_json::to_value(self)?;
        let mut out = Vec::with_capacity(256);
        write_canonical(&value, &mut out)?;
        Ok(out)
    }

    /// Decodes leaf bytes, accepting only the canonical encoding of a known schema version.
    pub fn from_leaf_bytes(bytes: &[u8]) -> Result<Self, EventError> {
        let event: Self = serde_json::from_slice(bytes)?;
        if event.v != EVENT_SCHEMA_VERSION {
            return Err(EventError::UnknownVersion(event.v));
        }
        if event.to_leaf_bytes()? != bytes {
            return Err(EventError::NotCanonical);
        }
        Ok(event)
    }
}

/// Writes `value` as canonical JSON: no insignificant whitespace, object members sorted by
/// the bytes of their keys, strings escaped as `serde_json` does, integers only.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) -> Result<(), EventError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => {
            if !(n.is_i64() || n.is_u64()) {
                return Err(EventError::Unsupported(format!("number {n}")));
            }
            out.extend_from_slice(n.to_string().as_bytes());
        }
        Value::String(s) => serde_json::to_writer(&mut *out, s)?,
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_canonical(item, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// A keyed, per-patient pseudonym (64 hex digits in JSON).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PatientTag(#[serde(with = "crate::proof::hex_hash")] pub Hash);

impl fmt::Debug for PatientTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PatientTag({})", hex::encode(self.0))
    }
}

impl fmt::Display for PatientTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The per-patient random salt. The broker stores it with the patient and deletes it on
/// erasure, after which the patient's tags can no longer be recomputed or linked to them.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct PatientSalt(pub [u8; 32]);

impl PatientSalt {
    /// A fresh salt from the thread-local CSPRNG.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Debug for PatientSalt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PatientSalt(..)")
    }
}

const PATIENT_KEY_CONTEXT: &[u8] = b"audit-log patient key v1\0";
const PATIENT_TAG_CONTEXT: &[u8] = b"audit-log patient tag v1\0";

/// The log's pseudonymization secret, from which per-patient keys and tags derive:
///
/// ```text
/// patient_key = BLAKE3-keyed(log_secret,  "audit-log patient key v1\0" ‖ salt)
/// patient_tag = BLAKE3-keyed(patient_key, "audit-log patient tag v1\0" ‖ patient_id)
/// ```
///
/// The tag is stable for a patient (so their events can be found), unlinkable to the patient
/// without both the log secret and the patient's salt, and the patient can be handed their
/// [`PatientKey`] (or just their tag) without learning anything about anyone else.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PatientTagKey {
    secret: [u8; 32],
}

impl PatientTagKey {
    /// Wraps the log's 32-byte secret.
    pub fn new(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    /// The per-patient key for `salt`.
    pub fn patient_key(&self, salt: &PatientSalt) -> PatientKey {
        let mut hasher = blake3::Hasher::new_keyed(&self.secret);
        hasher.update(PATIENT_KEY_CONTEXT);
        hasher.update(&salt.0);
        PatientKey {
            key: *hasher.finalize().as_bytes(),
        }
    }

    /// The tag of `patient_id` with `salt`.
    pub fn tag(&self, salt: &PatientSalt, patient_id: &str) -> PatientTag {
        self.patient_key(salt).tag(patient_id)
    }
}

impl fmt::Debug for PatientTagKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PatientTagKey(..)")
    }
}

/// One patient's tag key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PatientKey {
    key: [u8; 32],
}

impl PatientKey {
    /// Wraps a key handed out by the broker.
    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// The key bytes (to hand to the patient).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key
    }

    /// The tag of `patient_id`.
    pub fn tag(&self, patient_id: &str) -> PatientTag {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(PATIENT_TAG_CONTEXT);
        hasher.update(patient_id.as_bytes());
        PatientTag(*hasher.finalize().as_bytes())
    }
}

impl fmt::Debug for PatientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PatientKey(..)")
    }
}
