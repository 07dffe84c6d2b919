//! Erasure requests and receipts: the right to be forgotten, with proof.
//!
//! A patient asks for erasure with an [`ErasureRequest`] signed by their own identity. Each
//! proxy that destroys the patient's kfrags, and the broker that deletes the patient's
//! data, signs an [`ErasureReceipt`] naming the request by its digest. The patient keeps the
//! [`ReceiptBundle`] and checks it against the network they pinned ([`check_bundle`]):
//! every signature, every receipt for this request, the broker's receipt, and receipts
//! from at least `n − t + 1` of the pinned proxies, the number at which revocation holds
//! (fewer than `t` proxies still holding kfrags can re-encrypt nothing).
//!
//! ```
//! use pre_kms::erasure::{ErasureReceipt, ErasureRequest, ReceiptBundle, Role};
//! use pre_kms::Identity;
//!
//! let patient = Identity::generate();
//! let request = ErasureRequest::sign(&patient, 1_800_000_000_000);
//! let verified = request.verify().unwrap();
//! let proxy = Identity::generate();
//! let receipt = ErasureReceipt::sign(&proxy, Role::Proxy, &verified, [("kfrags", 3)], 1_800_000_000_500);
//! receipt.verify_for(&verified).unwrap();
//! let bundle = ReceiptBundle::new(request, vec![receipt]);
//! assert_eq!(bundle.receipts.len(), 1);
//! ```
//!
//! Byte formats (docs/FORMATS.md): a request signs
//! `"pre-kms erasure request v1" ‖ field…` and a receipt
//! `"pre-kms erasure receipt v1" ‖ field…`, each field a big-endian `u64` length then its
//! bytes; the request's digest is BLAKE3 of its signed bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::{
    Identity, actor_id, pseudonym, public_key_bytes, public_key_from_hex, verify_signature,
};
use crate::network::VerifiedNetwork;

const REQUEST_DOMAIN: &[u8] = b"pre-kms erasure request v1";
const RECEIPT_DOMAIN: &[u8] = b"pre-kms erasure receipt v1";

/// The format name of a [`ReceiptBundle`].
pub const BUNDLE_FORMAT: &str = "pre-kms-erasure-receipts-v1";

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn unhex(what: &'static str, text: &str) -> Result<Vec<u8>> {
    hex::decode(text).map_err(|e| Error::malformed(what, e))
}

/// A patient's signed request to be erased.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureRequest {
    /// The broker pseudonym of the patient.
    pub pseudonym: String,
    /// The patient's verifying key (hex, compressed point): the pseudonym derives from it.
    pub verifying_key: String,
    /// When the patient signed it (unix milliseconds, the patient's clock).
    pub issued_at_ms: i64,
    /// 16 random bytes (hex): two requests are never the same.
    pub nonce: String,
    /// The patient's signature over the request's bytes (hex).
    pub signature: String,
}

impl ErasureRequest {
    /// The request of `patient`, signed now as of `issued_at_ms`.
    pub fn sign(patient: &Identity, issued_at_ms: i64) -> ErasureRequest {
        let mut nonce = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let mut request = ErasureRequest {
            pseudonym: patient.pseudonym(),
            verifying_key: hex::encode(public_key_bytes(&patient.verifying_key())),
            issued_at_ms,
            nonce: hex::encode(nonce),
            signature: String::new(),
        };
        request.signature = hex::encode(patient.sign(&request.signed_bytes()));
        request
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = REQUEST_DOMAIN.to_vec();
        field(&mut out, self.pseudonym.as_bytes());
        field(&mut out, self.verifying_key.as_bytes());
        field(&mut out, &self.issued_at_ms.to_be_bytes());
        field(&mut out, self.nonce.as_bytes());
        out
    }

    /// Checks that the key is the pseudonym's and signed the request.
    pub fn verify(&self) -> Result<VerifiedErasureRequest> {
        let key = public_key_from_hex(&self.verifying_key)?;
        if pseudonym(&key) != self.pseudonym {
            return Err(Error::malformed(
                "erasure request",
                "the verifying key is not the pseudonym's",
            ));
        }
        if unhex("erasure request nonce", &self.nonce)?.len() != 16 {
            return Err(Error::malformed(
                "erasure request",
                "the nonce is not 16 bytes",
            ));
        }
        let bytes = self.signed_bytes();
        let signature = unhex("erasure request signature", &self.signature)?;
        if !verify_signature(&key, &bytes, &signature) {
            return Err(Error::BadSignature("erasure request"));
        }
        Ok(VerifiedErasureRequest {
            request: self.clone(),
            digest: *blake3::hash(&bytes).as_bytes(),
        })
    }
}

/// An [`ErasureRequest`] whose signature is the patient's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedErasureRequest {
    request: ErasureRequest,
    digest: [u8; 32],
}

impl VerifiedErasureRequest {
    pub fn request(&self) -> &ErasureRequest {
        &self.request
    }

    pub fn pseudonym(&self) -> &str {
        &self.request.pseudonym
    }

    /// BLAKE3 of the request's signed bytes: what receipts name.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }
}

/// Who signs a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Proxy,
    Broker,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Broker => "broker",
        }
    }
}

/// A party's signed statement that it destroyed what it held of an erased patient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureReceipt {
    pub role: Role,
    /// The signer's actor id (from its verifying key).
    pub signer: String,
    /// The signer's verifying key (hex).
    pub verifying_key: String,
    pub pseudonym: String,
    /// The digest of the request carried out (hex).
    pub request: String,
    /// What was destroyed, counted by kind (e.g. `kfrags`, `envelopes`, `index_rows`).
    pub destroyed: BTreeMap<String, u64>,
    /// When (unix milliseconds, the signer's clock).
    pub at_ms: i64,
    /// The signer's signature over the receipt's bytes (hex).
    pub signature: String,
}

impl ErasureReceipt {
    /// The receipt `signer` gives for `request`.
    pub fn sign<'a>(
        signer: &Identity,
        role: Role,
        request: &VerifiedErasureRequest,
        destroyed: impl IntoIterator<Item = (&'a str, u64)>,
        at_ms: i64,
    ) -> ErasureReceipt {
        let mut receipt = ErasureReceipt {
            role,
            signer: signer.actor_id(),
            verifying_key: hex::encode(public_key_bytes(&signer.verifying_key())),
            pseudonym: request.pseudonym().to_string(),
            request: hex::encode(request.digest()),
            destroyed: destroyed
                .into_iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect(),
            at_ms,
            signature: String::new(),
        };
        receipt.signature = hex::encode(signer.sign(&receipt.signed_bytes()));
        receipt
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = RECEIPT_DOMAIN.to_vec();
        field(&mut out, self.role.label().as_bytes());
        field(&mut out, self.signer.as_bytes());
        field(&mut out, self.verifying_key.as_bytes());
        field(&mut out, self.pseudonym.as_bytes());
        field(&mut out, self.request.as_bytes());
        field(&mut out, &(self.destroyed.len() as u64).to_be_bytes());
        for (kind, n) in &self.destroyed {
            field(&mut out, kind.as_bytes());
            field(&mut out, &n.to_be_bytes());
        }
        field(&mut out, &self.at_ms.to_be_bytes());
        out
    }

    /// Checks the signature, that the signer is who the key says, and that the receipt is
    /// for `request`.
    pub fn verify_for(&self, request: &VerifiedErasureRequest) -> Result<()> {
        let key = public_key_from_hex(&self.verifying_key)?;
        if actor_id(&key) != self.signer {
            return Err(Error::malformed(
                "erasure receipt",
                "the signer is not the verifying key's",
            ));
        }
        let signature = unhex("erasure receipt signature", &self.signature)?;
        if !verify_signature(&key, &self.signed_bytes(), &signature) {
            return Err(Error::BadSignature("erasure receipt"));
        }
        if self.request != hex::encode(request.digest()) || self.pseudonym != request.pseudonym() {
            return Err(Error::malformed(
                "erasure receipt",
                "it is for another request",
            ));
        }
        Ok(())
    }
}

/// What a patient keeps after an erasure: the request and every receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBundle {
    pub format: String,
    pub request: ErasureRequest,
    pub receipts: Vec<ErasureReceipt>,
}

impl ReceiptBundle {
    pub fn new(request: ErasureRequest, receipts: Vec<ErasureReceipt>) -> ReceiptBundle {
        ReceiptBundle {
            format: BUNDLE_FORMAT.to_string(),
            request,
            receipts,
        }
    }
}

/// What [`check_bundle`] established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleCheck {
    pub pseudonym: String,
    /// Pinned proxies whose receipt verified.
    pub proxies_confirmed: usize,
    /// `n − t + 1` of the pinned network.
    pub proxies_needed: usize,
    /// What the broker's receipt says it deleted.
    pub broker_destroyed: BTreeMap<String, u64>,
}

/// Checks a receipt bundle against the network the patient pinned: the request is the
/// patient's, every receipt is signed by its signer and for this request, the broker's
/// receipt is signed by the pinned broker key, every proxy receipt by a pinned proxy, and
/// at least `n − t + 1` distinct pinned proxies confirmed.
pub fn check_bundle(bundle: &ReceiptBundle, network: &VerifiedNetwork) -> Result<BundleCheck> {
    if bundle.format != BUNDLE_FORMAT {
        return Err(Error::malformed(
            "erasure receipts",
            format!("format `{}`, expected `{BUNDLE_FORMAT}`", bundle.format),
        ));
    }
    let request = bundle.request.verify()?;
    let mut proxies = std::collections::BTreeSet::new();
    let mut broker = None;
    for (i, r) in bundle.receipts.iter().enumerate() {
        r.verify_for(&request)
            .map_err(|e| Error::malformed("erasure receipts", format!("receipt {i}: {e}")))?;
        let key = public_key_from_hex(&r.verifying_key)?;
        match r.role {
            Role::Broker if key == network.broker_key => broker = Some(r),
            Role::Broker => {
                return Err(Error::malformed(
                    "erasure receipts",
                    format!("receipt {i} is signed by a broker key that is not the pinned one"),
                ));
            }
            Role::Proxy => {
                let pinned = network
                    .proxies
                    .iter()
                    .find(|p| p.verifying_key == key)
                    .ok_or_else(|| {
                        Error::malformed(
                            "erasure receipts",
                            format!("receipt {i} is signed by a proxy that is not pinned"),
                        )
                    })?;
                proxies.insert(pinned.proxy_id.clone());
            }
        }
    }
    let broker = broker
        .ok_or_else(|| Error::malformed("erasure receipts", "no receipt from the pinned broker"))?;
    let needed = network.proxies.len() + 1 - network.threshold.min(network.proxies.len());
    if proxies.len() < needed {
        return Err(Error::malformed(
            "erasure receipts",
            format!(
                "{} of {} proxies confirmed; revocation holds only with {needed}",
                proxies.len(),
                network.proxies.len()
            ),
        ));
    }
    Ok(BundleCheck {
        pseudonym: request.pseudonym().to_string(),
        proxies_confirmed: proxies.len(),
        proxies_needed: needed,
        broker_destroyed: broker.destroyed.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{NetworkManifest, NetworkProxy};

    struct World {
        network: VerifiedNetwork,
        broker: Identity,
        proxies: Vec<Identity>,
        patient: Identity,
    }

    /// A 2-of-3 network pinned by a board, and a patient.
    fn world() -> World {
        let board = Identity::generate();
        let broker = Identity::generate();
        let proxies: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
        let pinned: Vec<NetworkProxy> = proxies.iter().map(NetworkProxy::of).collect();
        let mut manifest = NetworkManifest::new(
            &broker.verifying_key(),
            None,
            2,
            &pinned,
            &[("IRB".into(), board.verifying_key())],
        );
        manifest.sign(&board).unwrap();
        World {
            network: manifest.verify().unwrap(),
            broker,
            proxies,
            patient: Identity::generate(),
        }
    }

    fn bundle(w: &World, proxies: &[usize]) -> ReceiptBundle {
        let request = ErasureRequest::sign(&w.patient, 1_000);
        let verified = request.verify().unwrap();
        let mut receipts: Vec<ErasureReceipt> = proxies
            .iter()
            .map(|i| {
                ErasureReceipt::sign(
                    &w.proxies[*i],
                    Role::Proxy,
                    &verified,
                    [("kfrags", 4)],
                    2_000,
                )
            })
            .collect();
        receipts.push(ErasureReceipt::sign(
            &w.broker,
            Role::Broker,
            &verified,
            [("envelopes", 5), ("index_rows", 40)],
            2_000,
        ));
        ReceiptBundle::new(request, receipts)
    }

    #[test]
    fn a_bundle_with_n_minus_t_plus_1_proxies_checks() {
        let w = world();
        // n − t + 1 = 2 of the 3 proxies.
        let checked = check_bundle(&bundle(&w, &[0, 2]), &w.network).unwrap();
        assert_eq!((checked.proxies_confirmed, checked.proxies_needed), (2, 2));
        assert_eq!(checked.pseudonym, w.patient.pseudonym());
        assert_eq!(checked.broker_destroyed["envelopes"], 5);
        // The same proxy twice is one proxy.
        let err = check_bundle(&bundle(&w, &[1, 1]), &w.network).unwrap_err();
        assert!(
            err.to_string().contains("1 of 3 proxies confirmed"),
            "{err}"
        );
        // A bundle survives its JSON form.
        let b = bundle(&w, &[0, 1, 2]);
        let back: ReceiptBundle =
            serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(
            check_bundle(&back, &w.network).unwrap().proxies_confirmed,
            3
        );
    }

    #[test]
    fn removed_altered_or_foreign_receipts_fail() {
        let w = world();
        let good = bundle(&w, &[0, 1]);
        // A proxy's receipt removed: too few.
        let mut removed = good.clone();
        removed.receipts.remove(0);
        assert!(check_bundle(&removed, &w.network).is_err());
        // The broker's receipt removed.
        let mut no_broker = good.clone();
        no_broker.receipts.pop();
        let err = check_bundle(&no_broker, &w.network).unwrap_err();
        assert!(err.to_string().contains("broker"), "{err}");
        // A count altered after signing; a signature altered.
        let mut altered = good.clone();
        altered.receipts[0].destroyed.insert("kfrags".into(), 0);
        assert!(check_bundle(&altered, &w.network).is_err());
        let mut resigned = good.clone();
        let mut sig = hex::decode(&resigned.receipts[1].signature).unwrap();
        sig[5] ^= 1;
        resigned.receipts[1].signature = hex::encode(sig);
        assert!(check_bundle(&resigned, &w.network).is_err());
        // A receipt from a key the patient did not pin (a broker playing a proxy).
        let request = good.request.verify().unwrap();
        let mut foreign = good.clone();
        foreign.receipts[0] = ErasureReceipt::sign(
            &Identity::generate(),
            Role::Proxy,
            &request,
            [("kfrags", 4)],
            2_000,
        );
        let err = check_bundle(&foreign, &w.network).unwrap_err();
        assert!(err.to_string().contains("not pinned"), "{err}");
        // A receipt for another request of the same patient.
        let other = ErasureRequest::sign(&w.patient, 1_001).verify().unwrap();
        let mut elsewhere = good.clone();
        elsewhere.receipts[0] =
            ErasureReceipt::sign(&w.proxies[0], Role::Proxy, &other, [("kfrags", 4)], 2_000);
        assert!(check_bundle(&elsewhere, &w.network).is_err());
        assert!(check_bundle(&good, &w.network).is_ok());
    }

    #[test]
    fn only_the_patient_can_ask() {
        let w = world();
        let request = ErasureRequest::sign(&w.patient, 1_000);
        assert!(request.verify().is_ok());
        // Someone else's key under the patient's pseudonym.
        let intruder = Identity::generate();
        let mut forged = ErasureRequest::sign(&intruder, 1_000);
        forged.pseudonym = w.patient.pseudonym();
        assert!(forged.verify().is_err());
        // The patient's request, moved in time after signing.
        let mut moved = request.clone();
        moved.issued_at_ms += 1;
        assert!(matches!(moved.verify(), Err(Error::BadSignature(_))));
        // Two requests are never the same, so receipts of one never count for another.
        let again = ErasureRequest::sign(&w.patient, 1_000);
        assert_ne!(
            request.verify().unwrap().digest(),
            again.verify().unwrap().digest()
        );
    }
}
