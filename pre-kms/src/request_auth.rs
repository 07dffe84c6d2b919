//! Signed requests: every gRPC call carries the caller's actor id, a timestamp, a nonce
//! and a signature over those and a hash of the protobuf body.
//!
//! ```text
//! x-actor: <actor id>   x-timestamp: <unix ms>   x-nonce: <32 hex>   x-signature: <128 hex>
//! signature = ECDSA(signing key, BLAKE3-derive("broker.v1 request v1",
//!             len-prefixed(method) | len-prefixed(actor) | timestamp | len-prefixed(nonce)
//!             | BLAKE3(body)))
//! ```
//! The server re-encodes the decoded message to hash it, so the body is covered too.
//! A request older or newer than the window, or whose nonce was already seen within it,
//! is refused.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;
use tonic::metadata::MetadataMap;
use umbral_pre::PublicKey;

use crate::keys::{Identity, verify_signature};

pub const ACTOR: &str = "x-actor";
pub const TIMESTAMP: &str = "x-timestamp";
pub const NONCE: &str = "x-nonce";
pub const SIGNATURE: &str = "x-signature";

/// How far a request's timestamp may be from the server's clock.
pub const DEFAULT_WINDOW_MS: i64 = 5 * 60 * 1000;

/// Why a request was not authenticated. Messages name no key or data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: the {0} header is required (sign requests with your key file)")]
    Missing(&'static str),
    #[error("malformed {0} header")]
    Malformed(&'static str),
    #[error("unknown actor: the key is not registered with this broker")]
    UnknownActor,
    #[error("request timestamp outside the accepted window; check the clock")]
    Stale,
    #[error("signature does not verify")]
    BadSignature,
    #[error("replayed request: this nonce was already used")]
    Replayed,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn digest(method: &str, actor: &str, timestamp: i64, nonce: &str, body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("broker.v1 request v1");
    for part in [method, actor] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.update(&timestamp.to_be_bytes());
    h.update(&(nonce.len() as u64).to_be_bytes());
    h.update(nonce.as_bytes());
    h.update(blake3::hash(body).as_bytes());
    *h.finalize().as_bytes()
}

/// Wraps a message in a request signed by `identity` for `method`
/// (the full gRPC path, e.g. `/broker.v1.Records/Upload`).
pub fn signed<T: prost::Message>(
    identity: &Identity,
    method: &str,
    message: T,
) -> tonic::Request<T> {
    let actor = identity.actor_id();
    let timestamp = now_ms();
    let mut nonce = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let nonce = hex::encode(nonce);
    let body = message.encode_to_vec();
    let signature = identity.sign(&digest(method, &actor, timestamp, &nonce, &body));
    let mut request = tonic::Request::new(message);
    let md = request.metadata_mut();
    md.insert(ACTOR, actor.parse().expect("hex is ascii"));
    md.insert(
        TIMESTAMP,
        timestamp.to_string().parse().expect("digits are ascii"),
    );
    md.insert(NONCE, nonce.parse().expect("hex is ascii"));
    md.insert(
        SIGNATURE,
        hex::encode(signature).parse().expect("hex is ascii"),
    );
    request
}

fn header<'a>(md: &'a MetadataMap, name: &'static str) -> Result<&'a str, AuthError> {
    md.get(name)
        .ok_or(AuthError::Missing(name))?
        .to_str()
        .map_err(|_| AuthError::Malformed(name))
}

/// Remembers nonces within the window so that a captured request cannot be replayed.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: i64,
    seen: Mutex<HashMap<String, i64>>,
}

impl Default for ReplayGuard {
    fn default() -> Self {
        Self::new(DEFAULT_WINDOW_MS)
    }
}

impl ReplayGuard {
    pub fn new(window_ms: i64) -> Self {
        ReplayGuard {
            window_ms,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Checks a request's credentials. `lookup` maps an actor id to its registered
    /// verifying key. Returns the authenticated actor id.
    pub fn verify<T: prost::Message>(
        &self,
        request: &tonic::Request<T>,
        method: &str,
        lookup: impl FnOnce(&str) -> Option<PublicKey>,
    ) -> Result<String, AuthError> {
        let md = request.metadata();
        let actor = header(md, ACTOR)?;
        let timestamp: i64 = header(md, TIMESTAMP)?
            .parse()
            .map_err(|_| AuthError::Malformed(TIMESTAMP))?;
        let nonce = header(md, NONCE)?;
        if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AuthError::Malformed(NONCE));
        }
        let signature =
            hex::decode(header(md, SIGNATURE)?).map_err(|_| AuthError::Malformed(SIGNATURE))?;
        let now = now_ms();
        if (now - timestamp).abs() > self.window_ms {
            return Err(AuthError::Stale);
        }
        let key = lookup(actor).ok_or(AuthError::UnknownActor)?;
        let body = request.get_ref().encode_to_vec();
        if !verify_signature(
            &key,
            &digest(method, actor, timestamp, nonce, &body),
            &signature,
        ) {
            return Err(AuthError::BadSignature);
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 100_000 {
            let horizon = now - self.window_ms;
            seen.retain(|_, t| *t >= horizon);
        }
        if seen.insert(format!("{actor}/{nonce}"), timestamp).is_some() {
            return Err(AuthError::Replayed);
        }
        Ok(actor.to_owned())
    }
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        tonic::Status::unauthenticated(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_requests_verify_once_and_only_unchanged() {
        let id = Identity::generate();
        let other = Identity::generate();
        let guard = ReplayGuard::default();
        let key = id.verifying_key();
        let lookup = |a: &str| (a == id.actor_id()).then_some(key);
        let msg = broker_proto::v1::GetStudyRequest {
            study_id: "s1".into(),
        };
        let req = signed(&id, "/m", msg.clone());
        assert_eq!(guard.verify(&req, "/m", lookup).unwrap(), id.actor_id());
        assert_eq!(guard.verify(&req, "/m", lookup), Err(AuthError::Replayed));

        let req = signed(&id, "/m", msg.clone());
        assert_eq!(
            guard.verify(&req, "/other", lookup),
            Err(AuthError::BadSignature)
        );

        let mut req = signed(&id, "/m", msg.clone());
        req.get_mut().study_id = "s2".into();
        assert_eq!(
            guard.verify(&req, "/m", lookup),
            Err(AuthError::BadSignature)
        );

        let req = signed(&other, "/m", msg.clone());
        assert_eq!(
            guard.verify(&req, "/m", lookup),
            Err(AuthError::UnknownActor)
        );

        let req = tonic::Request::new(msg.clone());
        assert_eq!(
            guard.verify(&req, "/m", lookup),
            Err(AuthError::Missing(ACTOR))
        );

        let mut req = signed(&id, "/m", msg);
        req.metadata_mut().insert(
            TIMESTAMP,
            (now_ms() - DEFAULT_WINDOW_MS - 1000)
                .to_string()
                .parse()
                .unwrap(),
        );
        assert_eq!(guard.verify(&req, "/m", lookup), Err(AuthError::Stale));
    }
}
