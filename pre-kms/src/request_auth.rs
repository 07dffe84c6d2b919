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
//!
//! This module is the cryptography of it, on bytes; carrying [`Credentials`] in gRPC
//! metadata is the transport's job (`broker_proto::signed`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;
use umbral_pre::PublicKey;

use crate::keys::{Identity, verify_signature};

/// The metadata header names the credentials travel in.
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
    #[error("request signed before this server started; sign it again")]
    BeforeStart,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn now_secs() -> i64 {
    now_ms() / 1000
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

/// What a signed request carries besides its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub actor: String,
    /// Unix milliseconds.
    pub timestamp: i64,
    /// 32 hex digits.
    pub nonce: String,
    pub signature: Vec<u8>,
}

impl Credentials {
    /// Signs `body` (the encoded message) by `identity` for `method` (the full gRPC path,
    /// e.g. `/broker.v1.Records/Upload`), now, with a fresh nonce.
    pub fn sign(identity: &Identity, method: &str, body: &[u8]) -> Credentials {
        let actor = identity.actor_id();
        let timestamp = now_ms();
        let mut nonce = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let nonce = hex::encode(nonce);
        let signature = identity.sign(&digest(method, &actor, timestamp, &nonce, body));
        Credentials {
            actor,
            timestamp,
            nonce,
            signature,
        }
    }
}

/// A call as it arrived: the credentials it presented (or why they are unusable), the
/// actor id it claimed (for the refusal log), and the encoded body the signature covers.
#[derive(Debug, Clone)]
pub struct SignedCall {
    pub credentials: Result<Credentials, AuthError>,
    pub presented_actor: String,
    pub body: Vec<u8>,
}

/// Remembers nonces within the window so that a captured request cannot be replayed.
///
/// The nonces live in memory; across a restart, replay is stopped by the guard's start
/// time instead: a request signed before the guard was made is refused, so a capture
/// from before a restart is dead after it, with nothing to persist. (A client whose
/// clock is behind the server's by δ is refused for δ after a restart, and signs again.)
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: i64,
    started_ms: i64,
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
            started_ms: now_ms(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// The checks that need no body, for a server to make before it decodes a large
    /// one: a well-formed nonce, a fresh timestamp, signed after this guard started, by
    /// an actor `known` knows. [`ReplayGuard::verify`] makes them again, then checks the
    /// signature and the nonce.
    pub fn precheck(
        &self,
        c: &Credentials,
        known: impl FnOnce(&str) -> bool,
    ) -> Result<(), AuthError> {
        self.fresh(c)?;
        if !known(&c.actor) {
            return Err(AuthError::UnknownActor);
        }
        Ok(())
    }

    fn fresh(&self, c: &Credentials) -> Result<(), AuthError> {
        if c.nonce.len() != 32 || !c.nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AuthError::Malformed(NONCE));
        }
        if (now_ms() - c.timestamp).abs() > self.window_ms {
            return Err(AuthError::Stale);
        }
        if c.timestamp < self.started_ms {
            return Err(AuthError::BeforeStart);
        }
        Ok(())
    }

    /// Checks a call's credentials. `lookup` maps an actor id to its registered
    /// verifying key. Returns the authenticated actor id.
    pub fn verify(
        &self,
        call: &SignedCall,
        method: &str,
        lookup: impl FnOnce(&str) -> Option<PublicKey>,
    ) -> Result<String, AuthError> {
        let c = call.credentials.as_ref().map_err(Clone::clone)?;
        let (actor, timestamp, nonce, signature) = (
            c.actor.as_str(),
            c.timestamp,
            c.nonce.as_str(),
            &c.signature,
        );
        self.fresh(c)?;
        let now = now_ms();
        let key = lookup(actor).ok_or(AuthError::UnknownActor)?;
        if !verify_signature(
            &key,
            &digest(method, actor, timestamp, nonce, &call.body),
            signature,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn call(identity: &Identity, method: &str, body: &[u8]) -> SignedCall {
        SignedCall {
            credentials: Ok(Credentials::sign(identity, method, body)),
            presented_actor: identity.actor_id(),
            body: body.to_vec(),
        }
    }

    #[test]
    fn a_capture_is_refused_by_the_same_server_and_after_a_restart() {
        let me = Identity::generate();
        let key = me.verifying_key();
        let lookup = |_: &str| Some(key);
        let guard = ReplayGuard::default();
        let captured = call(&me, "/m", b"body");
        assert_eq!(guard.verify(&captured, "/m", lookup), Ok(me.actor_id()));
        assert_eq!(
            guard.verify(&captured, "/m", lookup),
            Err(AuthError::Replayed)
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        let restarted = ReplayGuard::default();
        assert_eq!(
            restarted.verify(&captured, "/m", lookup),
            Err(AuthError::BeforeStart),
            "the nonce cache is gone, the start time is not"
        );
        let fresh = call(&me, "/m", b"body");
        assert_eq!(restarted.verify(&fresh, "/m", lookup), Ok(me.actor_id()));
    }

    #[test]
    fn a_changed_body_or_method_does_not_verify() {
        let me = Identity::generate();
        let key = me.verifying_key();
        let guard = ReplayGuard::default();
        let mut c = call(&me, "/m", b"body");
        c.body = b"other".to_vec();
        assert_eq!(
            guard.verify(&c, "/m", |_| Some(key)),
            Err(AuthError::BadSignature)
        );
        let c = call(&me, "/m", b"body");
        assert_eq!(
            guard.verify(&c, "/n", |_| Some(key)),
            Err(AuthError::BadSignature)
        );
    }
}
