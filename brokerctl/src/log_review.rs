//! The reader's side of the access log: what `brokerctl board log` and `brokerctl patient
//! accesses|alerts` do. Nothing here trusts the broker: checkpoints are checked against
//! the broker's key, each new checkpoint against the last one the board saw (consistency
//! proofs, kept in a local state file), the board can recompute the whole tree from the
//! leaves, and a patient checks an inclusion proof for every event shown to them.

use std::fmt::Write as _;
use std::path::Path;

use audit_log::event::Outcome;
use audit_log::{
    AuditEvent, Checkpoint, ConsistencyProof, InclusionProof, MerkleTree, SignedCheckpoint,
};
use pre_kms::keys::{actor_id, public_key_bytes, public_key_from_bytes};
use pre_kms::logged_release::CheckpointKeys;
use serde::{Deserialize, Serialize};
use umbral_pre::PublicKey;

use crate::wire::{BrokerClient, ClientError, LogExcerpt};
use audit_log::EventFilter;
use pre_kms::logged_release::LoggedEvent;

/// Where verification of the log failed. Messages name sizes, times and leaf indices.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("state file {path}: {reason}")]
    State { path: String, reason: String },
    #[error(
        "the broker's log key changed (was {was}, now {now}): either the broker was replaced or this is another broker; nothing was saved"
    )]
    BrokerKeyChanged { was: String, now: String },
    #[error("checkpoint of size {size} (time {time}): {reason}")]
    Checkpoint {
        size: u64,
        time: i64,
        reason: String,
    },
    #[error("the log is not consistent from size {old} to size {new}: {reason}")]
    Inconsistent { old: u64, new: u64, reason: String },
    #[error("leaf {index}: {reason}")]
    Leaf { index: u64, reason: String },
    #[error("the broker sent a malformed answer: {0}")]
    Malformed(String),
}

/// What a board keeps between two verifications: the broker's key and the last checkpoint
/// it verified.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoardState {
    pub broker_key: String,
    pub checkpoint: String,
}

impl BoardState {
    /// Where a board member keeps it by default: beside their key file.
    pub fn beside(key_file: &Path) -> std::path::PathBuf {
        let mut p = key_file.as_os_str().to_owned();
        p.push(".log-state.json");
        std::path::PathBuf::from(p)
    }

    pub fn load(path: &Path) -> Result<Option<BoardState>, ReviewError> {
        let bad = |reason: String| ReviewError::State {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| bad(format!("not a log state file ({e})"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(bad(e.to_string())),
        }
    }

    /// Writes the state atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), ReviewError> {
        let bad = |e: std::io::Error| ReviewError::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let tmp = path.with_extension("tmp");
        let json = serde_json::to_vec_pretty(self).expect("serializable");
        std::fs::write(&tmp, json).map_err(bad)?;
        std::fs::rename(&tmp, path).map_err(bad)
    }
}

/// The outcome of a successful verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The size the board saw last time, if any.
    pub previous_size: Option<u64>,
    pub size: u64,
    pub root: String,
    /// Checkpoints whose signature and consistency were checked.
    pub checkpoints_checked: usize,
    /// Leaves fetched and hashed into the tree, when the full check ran.
    pub leaves_recomputed: Option<u64>,
    /// Witness signatures the checkpoint now carries, when the board co-signed.
    pub cosignatures: Option<u32>,
}

fn parse_checkpoint(note: &str) -> Result<SignedCheckpoint, ReviewError> {
    SignedCheckpoint::from_note(note)
        .map_err(|e| ReviewError::Malformed(format!("checkpoint: {e}")))
}

fn check_signed(c: &SignedCheckpoint, broker_key: &PublicKey) -> Result<(), ReviewError> {
    c.verify(
        &CheckpointKeys::new([*broker_key]),
        &[actor_id(broker_key).as_str()],
    )
    .map_err(|e| ReviewError::Checkpoint {
        size: c.checkpoint.size,
        time: c.checkpoint.time,
        reason: format!("not validly signed by the broker: {e}"),
    })
}

fn hashes(path: Vec<Vec<u8>>) -> Result<Vec<[u8; 32]>, ReviewError> {
    path.into_iter()
        .map(|h| {
            <[u8; 32]>::try_from(h)
                .map_err(|_| ReviewError::Malformed("a proof hash is not 32 bytes".into()))
        })
        .collect()
}

/// The broker's current signed checkpoint and key; the key must equal `pinned` if given.
async fn current(
    client: &BrokerClient,
    pinned: Option<&str>,
) -> Result<(SignedCheckpoint, PublicKey, String), ReviewError> {
    let resp = client.log_checkpoint().await?;
    let key_hex = hex::encode(&resp.broker_key);
    if let Some(was) = pinned
        && was != key_hex
    {
        return Err(ReviewError::BrokerKeyChanged {
            was: was.to_owned(),
            now: key_hex,
        });
    }
    let key = public_key_from_bytes(&resp.broker_key)
        .map_err(|_| ReviewError::Malformed("the broker key is not a public key".into()))?;
    let latest = parse_checkpoint(&resp.checkpoint)?;
    check_signed(&latest, &key)?;
    Ok((latest, key, key_hex))
}

/// The board's check: every checkpoint since the one in `state_path` is signed by the
/// broker and extends its predecessor; with `full`, the tree recomputed from every leaf
/// has each checkpoint's root. With `cosign`, the board then signs the newest checkpoint as
/// a witness. The state file is updated only when everything verified.
pub async fn verify_log(
    client: &BrokerClient,
    state_path: &Path,
    full: bool,
    cosign: bool,
) -> Result<VerifyReport, ReviewError> {
    let state = BoardState::load(state_path)?;
    let (latest, key, key_hex) =
        current(client, state.as_ref().map(|s| s.broker_key.as_str())).await?;
    let previous = match &state {
        Some(s) => {
            let c = parse_checkpoint(&s.checkpoint)?;
            check_signed(&c, &key)?;
            Some(c.checkpoint)
        }
        None => None,
    };
    if let Some(p) = &previous
        && p.size > latest.checkpoint.size
    {
        return Err(ReviewError::Inconsistent {
            old: p.size,
            new: latest.checkpoint.size,
            reason: "the log is shorter than when this board last saw it".into(),
        });
    }
    let mut chain: Vec<SignedCheckpoint> = Vec::new();
    for note in client
        .log_checkpoints(previous.as_ref().map_or(0, |p| p.size))
        .await?
    {
        let c = parse_checkpoint(&note)?;
        check_signed(&c, &key)?;
        if c.checkpoint.size <= latest.checkpoint.size {
            chain.push(c);
        }
    }
    if chain.last().map(|c| &c.checkpoint) != Some(&latest.checkpoint) {
        chain.push(latest.clone());
    }
    chain.sort_by_key(|c| (c.checkpoint.size, c.checkpoint.time));
    let mut prev: Option<Checkpoint> = previous.clone();
    for c in &chain {
        if let Some(p) = &prev {
            let path = hashes(client.log_consistency(p.size, c.checkpoint.size).await?)?;
            let proof = ConsistencyProof {
                old_size: p.size,
                new_size: c.checkpoint.size,
                path,
            };
            p.verify_consistency(&c.checkpoint, &proof)
                .map_err(|e| ReviewError::Inconsistent {
                    old: p.size,
                    new: c.checkpoint.size,
                    reason: e.to_string(),
                })?;
        }
        prev = Some(c.checkpoint.clone());
    }
    let leaves_recomputed = if full {
        Some(
            recompute(
                client,
                previous.iter().chain(chain.iter().map(|c| &c.checkpoint)),
            )
            .await?,
        )
    } else {
        None
    };
    let cosignatures = if cosign {
        let mut mine = latest.clone();
        mine.signatures.retain(|s| s.key_id == actor_id(&key));
        mine.cosign(client.identity())
            .map_err(|e| ReviewError::Malformed(format!("co-signing: {e}")))?;
        let note = mine
            .to_note()
            .map_err(|e| ReviewError::Malformed(format!("co-signing: {e}")))?;
        Some(client.log_cosign(note).await?)
    } else {
        None
    };
    BoardState {
        broker_key: key_hex,
        checkpoint: latest
            .to_note()
            .map_err(|e| ReviewError::Malformed(e.to_string()))?,
    }
    .save(state_path)?;
    Ok(VerifyReport {
        previous_size: previous.map(|p| p.size),
        size: latest.checkpoint.size,
        root: hex::encode(latest.checkpoint.root),
        checkpoints_checked: chain.len(),
        leaves_recomputed,
        cosignatures,
    })
}

/// Fetches every leaf, checks each parses as an event, rebuilds the tree and compares its
/// root at each checkpoint's size. Returns the number of leaves hashed.
async fn recompute<'a>(
    client: &BrokerClient,
    checkpoints: impl Iterator<Item = &'a Checkpoint>,
) -> Result<u64, ReviewError> {
    let mut sizes: Vec<&Checkpoint> = checkpoints.collect();
    sizes.sort_by_key(|c| c.size);
    let target = sizes.last().map_or(0, |c| c.size);
    let events = client.log_events(EventFilter::default()).await?;
    let mut tree: MerkleTree = MerkleTree::new();
    let mut next = sizes.iter().peekable();
    while let Some(c) = next.next_if(|c| c.size == 0) {
        check_root(&tree, c)?;
    }
    for e in events.iter().take_while(|e| e.index < target) {
        if e.index != tree.len() {
            return Err(ReviewError::Leaf {
                index: tree.len(),
                reason: format!("missing: the log served leaf {} next", e.index),
            });
        }
        shown(e.index, &e.leaf)?;
        tree.push_leaf(&e.leaf);
        while let Some(c) = next.next_if(|c| c.size == tree.len()) {
            check_root(&tree, c)?;
        }
    }
    if let Some(c) = next.next() {
        return Err(ReviewError::Leaf {
            index: tree.len(),
            reason: format!(
                "the log served {} leaves, but a checkpoint covers {}",
                tree.len(),
                c.size
            ),
        });
    }
    Ok(tree.len())
}

fn check_root(tree: &MerkleTree, c: &Checkpoint) -> Result<(), ReviewError> {
    if tree.root() == c.root {
        return Ok(());
    }
    Err(ReviewError::Checkpoint {
        size: c.size,
        time: c.time,
        reason: "the leaves the log serves do not hash to the root it signed: a leaf before this size was changed, removed, reordered or inserted".into(),
    })
}

/// One event as shown to its reader, its inclusion proof checked.
#[derive(Debug, Clone, Serialize)]
pub struct ShownEvent {
    pub index: u64,
    pub event: AuditEvent,
}

/// Leaf `index` parsed as an event.
fn shown(index: u64, leaf: &[u8]) -> Result<ShownEvent, ReviewError> {
    let event = AuditEvent::from_leaf_bytes(leaf).map_err(|err| ReviewError::Leaf {
        index,
        reason: format!("not an event: {err}"),
    })?;
    Ok(ShownEvent { index, event })
}

/// Checks each event's inclusion proof against `checkpoint` (already signature-checked).
fn check_included(
    checkpoint: &Checkpoint,
    events: Vec<LoggedEvent>,
) -> Result<Vec<ShownEvent>, ReviewError> {
    events
        .into_iter()
        .map(|e| {
            let proof = InclusionProof {
                leaf_index: e.index,
                tree_size: checkpoint.size,
                path: e.path,
            };
            checkpoint
                .verify_inclusion(&e.leaf, &proof)
                .map_err(|err| ReviewError::Leaf {
                    index: e.index,
                    reason: format!("its inclusion proof fails: {err}"),
                })?;
            shown(e.index, &e.leaf)
        })
        .collect()
}

/// A reader's view (a patient's, or a researcher's notices): a signed checkpoint and
/// events, each proven to be in it.
async fn proven_view(
    client: &BrokerClient,
    pinned_key: Option<&PublicKey>,
    excerpt: LogExcerpt,
) -> Result<Vec<ShownEvent>, ReviewError> {
    let pinned = pinned_key.map(|k| hex::encode(public_key_bytes(k)));
    let (_, key, _) = current(client, pinned.as_deref()).await?;
    let c = parse_checkpoint(&excerpt.checkpoint)?;
    check_signed(&c, &key)?;
    check_included(&c.checkpoint, excerpt.events)
}

/// Every event about the calling patient, each proven to be in the broker-signed log.
pub async fn patient_accesses(
    client: &BrokerClient,
    pinned_key: Option<&PublicKey>,
) -> Result<Vec<ShownEvent>, ReviewError> {
    let excerpt = client.log_accesses().await?;
    proven_view(client, pinned_key, excerpt).await
}

/// The calling patient's unread alerts (releases and break-glass access), proven; with
/// `acknowledge`, they are marked read once shown.
pub async fn patient_alerts(
    client: &BrokerClient,
    pinned_key: Option<&PublicKey>,
    acknowledge: bool,
) -> Result<Vec<ShownEvent>, ReviewError> {
    let excerpt = client.log_alerts(None).await?;
    let shown = proven_view(client, pinned_key, excerpt).await?;
    if acknowledge && let Some(last) = shown.iter().map(|e| e.index).max() {
        client.log_alerts(Some(last)).await?;
    }
    Ok(shown)
}

/// Erasure notices to the calling researcher's studies (or to one), each proven to be in
/// the broker-signed log.
pub async fn researcher_notices(
    client: &BrokerClient,
    study_id: Option<&str>,
) -> Result<Vec<ShownEvent>, ReviewError> {
    let excerpt = client.log_notices(study_id).await?;
    proven_view(client, None, excerpt).await
}

/// Board filters for `show` and `export`.
pub fn events_filter(
    since: Option<i64>,
    until: Option<i64>,
    study: Option<String>,
    actor: Option<String>,
    kinds: Vec<String>,
) -> EventFilter {
    EventFilter {
        since,
        until,
        study,
        actor,
        kinds,
        from_leaf: 0,
    }
}

/// Events for the board, parsed (no proofs: `verify` checks the whole log).
pub async fn board_events(
    client: &BrokerClient,
    filter: EventFilter,
) -> Result<Vec<ShownEvent>, ReviewError> {
    client
        .log_events(filter)
        .await?
        .into_iter()
        .map(|e| shown(e.index, &e.leaf))
        .collect()
}

// ------------------------------------------------------------------ formats

/// A time a reader gives: `YYYY-MM-DD` (midnight UTC) or unix seconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let parts: Vec<&str> = s.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(format!("{s:?} is not YYYY-MM-DD or unix seconds"));
    };
    let (y, m, d): (i64, i64, i64) = match (y.parse(), m.parse(), d.parse()) {
        (Ok(y), Ok(m), Ok(d)) if (1..=12).contains(&m) && (1..=31).contains(&d) => (y, m, d),
        _ => return Err(format!("{s:?} is not YYYY-MM-DD or unix seconds")),
    };
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok((era * 146_097 + doe - 719_468) * 86_400)
}

/// The end of a time range: `YYYY-MM-DD` (the whole day) or unix seconds.
pub fn parse_until(s: &str) -> Result<i64, String> {
    let t = parse_time(s)?;
    Ok(if s.contains('-') { t + 86_399 } else { t })
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds (proleptic Gregorian, UTC).
pub fn iso_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn outcome(e: &AuditEvent) -> (&'static str, &str) {
    match &e.outcome {
        Outcome::Success => ("success", ""),
        Outcome::Refused { reason } => ("refused", reason.as_str()),
    }
}

fn role_name(e: &AuditEvent) -> String {
    serde_json::to_value(e.actor.role)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// One line per event for people.
pub fn human_line(e: &ShownEvent) -> String {
    let ev = &e.event;
    let mut line = format!(
        "#{:<6} {} {:<20} {} {}",
        e.index,
        iso_time(ev.time),
        ev.kind.name(),
        role_name(ev),
        ev.actor.id
    );
    if let Some(s) = ev.details.study_id.as_ref().or(ev.why.study_id.as_ref()) {
        let _ = write!(line, " study={s}");
    }
    if let Some(r) = &ev.details.release_id {
        let _ = write!(line, " release={r}");
    }
    if !ev.details.categories.is_empty() {
        let _ = write!(line, " categories={}", ev.details.categories.join(","));
    }
    if let Some(n) = ev.details.record_count {
        let _ = write!(line, " records={n}");
    }
    if let Some(p) = &ev.patient {
        let _ = write!(line, " patient={}", &p.to_string()[..12]);
    }
    if matches!(
        ev.kind,
        audit_log::EventKind::BreakGlass | audit_log::EventKind::BreakGlassReview
    ) {
        if let Some(o) = &ev.actor.organisation {
            let _ = write!(line, " organisation={o}");
        }
        if let Some(r) = &ev.why.purpose {
            let _ = write!(line, " reason={r:?}");
        }
        if let Some(t) = ev.details.expires_at {
            let _ = write!(line, " until={}", iso_time(t));
        }
    }
    if let (_, reason) = outcome(ev)
        && !reason.is_empty()
    {
        let _ = write!(line, " REFUSED: {reason}");
    }
    line
}

/// JSON Lines: `{"index": …, "event": …}` per event.
pub fn to_jsonl(events: &[ShownEvent]) -> String {
    events
        .iter()
        .map(|e| serde_json::to_string(e).expect("serializable") + "\n")
        .collect()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// CSV with a header row.
pub fn to_csv(events: &[ShownEvent]) -> String {
    let mut out = String::from(
        "index,time,kind,actor_id,actor_role,organisation,patient,purpose,study_id,release_id,grant_id,categories,record_count,outcome,reason\n",
    );
    for e in events {
        let ev = &e.event;
        let (result, reason) = outcome(ev);
        let fields = [
            e.index.to_string(),
            iso_time(ev.time),
            ev.kind.name(),
            ev.actor.id.clone(),
            role_name(ev),
            ev.actor.organisation.clone().unwrap_or_default(),
            ev.patient.map(|p| p.to_string()).unwrap_or_default(),
            ev.why.purpose.clone().unwrap_or_default(),
            ev.details
                .study_id
                .clone()
                .or(ev.why.study_id.clone())
                .unwrap_or_default(),
            ev.details.release_id.clone().unwrap_or_default(),
            ev.details.grant_id.clone().unwrap_or_default(),
            ev.details.categories.join(";"),
            ev.details
                .record_count
                .map(|n| n.to_string())
                .unwrap_or_default(),
            result.to_owned(),
            reason.to_owned(),
        ];
        let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

/// The DICOM audit event type, FHIR action code and the broker's subtype of an event.
fn fhir_type(e: &AuditEvent) -> (&'static str, &'static str, &'static str) {
    use audit_log::EventKind as K;
    match e.kind {
        K::Release | K::Fetch => ("110106", "Export", "R"),
        K::Upload => ("110107", "Import", "C"),
        K::FeasibilityCount => ("110112", "Query", "E"),
        K::AuthorizationFailed => ("110113", "Security Alert", "E"),
        K::BreakGlass => ("110110", "Patient Record", "R"),
        K::Erasure => ("110110", "Patient Record", "D"),
        K::Enroll | K::ConsentSet | K::GrantIssued => ("110110", "Patient Record", "C"),
        K::ConsentRevoked | K::GrantWithdrawn => ("110110", "Patient Record", "U"),
        _ => ("110100", "Application Activity", "E"),
    }
}

/// A FHIR R4 `AuditEvent` resource for one event.
pub fn to_fhir(e: &ShownEvent) -> serde_json::Value {
    let ev = &e.event;
    let (code, display, action) = fhir_type(ev);
    let (result, reason) = outcome(ev);
    let mut entities = Vec::new();
    if let Some(p) = &ev.patient {
        entities.push(serde_json::json!({
            "what": {"identifier": {"system": "urn:pre-broker:patient-tag", "value": p.to_string()}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"}
        }));
    }
    let study = ev.details.study_id.as_ref().or(ev.why.study_id.as_ref());
    if let Some(s) = study {
        entities.push(serde_json::json!({
            "what": {"identifier": {"system": "urn:pre-broker:study", "value": s}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"}
        }));
    }
    if let Some(r) = &ev.details.release_id {
        let mut detail = vec![
            serde_json::json!({"type": "categories", "valueString": ev.details.categories.join(",")}),
        ];
        if let Some(n) = ev.details.record_count {
            detail.push(serde_json::json!({"type": "record_count", "valueString": n.to_string()}));
        }
        entities.push(serde_json::json!({
            "what": {"identifier": {"system": "urn:pre-broker:release", "value": r}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "detail": detail
        }));
    }
    let mut resource = serde_json::json!({
        "resourceType": "AuditEvent",
        "id": format!("leaf-{}", e.index),
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": code, "display": display},
        "subtype": [{"system": "urn:pre-broker:event-kind", "code": ev.kind.name()}],
        "action": action,
        "recorded": iso_time(ev.time),
        "outcome": if result == "success" { "0" } else { "4" },
        "agent": [{
            "who": {"identifier": {"system": "urn:pre-broker:actor", "value": ev.actor.id}},
            "type": {"text": role_name(ev)},
            "requestor": true
        }],
        "source": {"observer": {"display": "pre-broker access log"}},
        "entity": entities
    });
    if !reason.is_empty() {
        resource["outcomeDesc"] = reason.into();
    }
    if let Some(org) = &ev.actor.organisation {
        resource["agent"][0]["altId"] = org.clone().into();
    }
    if let Some(p) = &ev.why.purpose {
        resource["purposeOfEvent"] = serde_json::json!([{"text": p}]);
    }
    resource
}

/// FHIR `AuditEvent` resources as NDJSON (the FHIR bulk data format).
pub fn to_fhir_ndjson(events: &[ShownEvent]) -> String {
    events
        .iter()
        .map(|e| to_fhir(e).to_string() + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_time_matches_known_dates() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso_time(1_763_700_000), "2025-11-21T04:40:00Z");
        assert_eq!(iso_time(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
