//! Signed calls on the wire: [`Credentials`] carried in gRPC metadata
//! (`x-actor`, `x-timestamp`, `x-nonce`, `x-signature`; docs/FORMATS.md). The signing and
//! checking are `pre_kms::request_auth`'s; this module only moves them in and out of
//! tonic requests, for the broker, its proxies and the client alike.

use pre_kms::Identity;
use pre_kms::request_auth::{
    ACTOR, AuthError, Credentials, NONCE, SIGNATURE, SignedCall, TIMESTAMP,
};
use prost::Message;
use tonic::metadata::MetadataMap;

/// Wraps a message in a request signed by `identity` for `method`
/// (the full gRPC path, e.g. `/broker.v1.Records/Upload`).
pub fn signed<T: Message>(identity: &Identity, method: &str, message: T) -> tonic::Request<T> {
    let c = Credentials::sign(identity, method, &message.encode_to_vec());
    let mut request = tonic::Request::new(message);
    let md = request.metadata_mut();
    md.insert(ACTOR, c.actor.parse().expect("hex is ascii"));
    md.insert(
        TIMESTAMP,
        c.timestamp.to_string().parse().expect("digits are ascii"),
    );
    md.insert(NONCE, c.nonce.parse().expect("hex is ascii"));
    md.insert(
        SIGNATURE,
        hex::encode(&c.signature).parse().expect("hex is ascii"),
    );
    request
}

/// The call a request makes, for `ReplayGuard::verify`: its credentials as presented and
/// its re-encoded body.
pub fn call<T: Message>(request: &tonic::Request<T>) -> SignedCall {
    let md = request.metadata();
    SignedCall {
        credentials: credentials(md),
        presented_actor: header(md, ACTOR).unwrap_or_default().to_owned(),
        body: request.get_ref().encode_to_vec(),
    }
}

/// The credentials in a call's metadata, or why they are unusable.
pub fn credentials(md: &MetadataMap) -> Result<Credentials, AuthError> {
    let actor = header(md, ACTOR)?.to_owned();
    let timestamp: i64 = header(md, TIMESTAMP)?
        .parse()
        .map_err(|_| AuthError::Malformed(TIMESTAMP))?;
    let nonce = header(md, NONCE)?.to_owned();
    let signature =
        hex::decode(header(md, SIGNATURE)?).map_err(|_| AuthError::Malformed(SIGNATURE))?;
    Ok(Credentials {
        actor,
        timestamp,
        nonce,
        signature,
    })
}

fn header<'a>(md: &'a MetadataMap, name: &'static str) -> Result<&'a str, AuthError> {
    md.get(name)
        .ok_or(AuthError::Missing(name))?
        .to_str()
        .map_err(|_| AuthError::Malformed(name))
}

/// The gRPC status of a refused credential.
pub fn unauthenticated(e: &AuthError) -> tonic::Status {
    tonic::Status::unauthenticated(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pre_kms::Identity;
    use pre_kms::request_auth::{DEFAULT_WINDOW_MS, ReplayGuard, now_ms};

    fn verify<T: prost::Message>(
        guard: &ReplayGuard,
        req: &tonic::Request<T>,
        method: &str,
        lookup: impl FnOnce(&str) -> Option<umbral_pre::PublicKey>,
    ) -> Result<String, AuthError> {
        guard.verify(&call(req), method, lookup)
    }

    #[test]
    fn signed_requests_verify_once_and_only_unchanged() {
        let id = Identity::generate();
        let other = Identity::generate();
        let guard = ReplayGuard::default();
        let key = id.verifying_key();
        let lookup = |a: &str| (a == id.actor_id()).then_some(key);
        let msg = crate::v1::GetStudyRequest {
            study_id: "s1".into(),
        };
        let req = signed(&id, "/m", msg.clone());
        assert_eq!(verify(&guard, &req, "/m", lookup).unwrap(), id.actor_id());
        assert_eq!(verify(&guard, &req, "/m", lookup), Err(AuthError::Replayed));

        let req = signed(&id, "/m", msg.clone());
        assert_eq!(
            verify(&guard, &req, "/other", lookup),
            Err(AuthError::BadSignature)
        );

        let mut req = signed(&id, "/m", msg.clone());
        req.get_mut().study_id = "s2".into();
        assert_eq!(
            verify(&guard, &req, "/m", lookup),
            Err(AuthError::BadSignature)
        );

        let req = signed(&other, "/m", msg.clone());
        assert_eq!(
            verify(&guard, &req, "/m", lookup),
            Err(AuthError::UnknownActor)
        );

        let req = tonic::Request::new(msg.clone());
        assert_eq!(
            verify(&guard, &req, "/m", lookup),
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
        assert_eq!(verify(&guard, &req, "/m", lookup), Err(AuthError::Stale));
    }
}
