//! Grants: a patient's signed delegation of some categories to one study.
//!
//! Per granted category the patient makes `n` kfrags (threshold `t`) from that
//! category's key to the study's receiving key, signed by the patient (umbral signs
//! both keys into every kfrag). Each kfrag travels inside a payload that binds it to
//! the study, the patient, the category and the expiry, signed again by the patient,
//! and sealed to one proxy's encryption key (magic `PKK1`), so that the broker relays
//! kfrags without being able to read them.

use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use umbral_pre::{DefaultDeserialize, DefaultSerialize, KeyFrag, PublicKey, VerifiedKeyFrag};

use crate::error::{Error, Result};
use crate::keys::{Identity, verify_signature};
use crate::sealed::Sealed;
use model::Category;

pub const KFRAG_MAGIC: &[u8; 4] = b"PKK1";
/// Default threshold and share count.
pub const DEFAULT_THRESHOLD: usize = 2;
pub const DEFAULT_SHARES: usize = 3;

/// What a patient agent needs to issue a grant.
#[derive(Debug, Clone)]
pub struct GrantPlan {
    pub study_id: String,
    pub receiving_key: PublicKey,
    pub categories: Vec<Category>,
    pub threshold: usize,
    /// Unix seconds.
    pub expires_at: i64,
    /// Proxy encryption keys, in the broker's proxy order; their count is `n`.
    pub proxy_keys: Vec<PublicKey>,
}

/// A signed grant as the broker receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub study_id: String,
    pub pseudonym: String,
    pub threshold: u32,
    pub expires_at: i64,
    pub categories: Vec<GrantCategory>,
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrantCategory {
    pub category: Category,
    /// One sealed kfrag per proxy, in proxy order.
    pub sealed_kfrags: Vec<Vec<u8>>,
}

/// The plaintext inside a sealed kfrag.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KfragPayload {
    study_id: String,
    pseudonym: String,
    category: Category,
    expires_at: i64,
    proxy_index: u32,
    /// umbral-pre 0.11 serialization of the kfrag, hex.
    kfrag: String,
    /// The patient's signature over [`payload_digest`], hex.
    signature: String,
}

fn payload_digest(
    study_id: &str,
    pseudonym: &str,
    category: Category,
    expires_at: i64,
    proxy_index: u32,
    kfrag: &[u8],
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("pre-kms kfrag payload v1");
    for part in [
        study_id.as_bytes(),
        pseudonym.as_bytes(),
        category.label().as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(&expires_at.to_be_bytes());
    h.update(&proxy_index.to_be_bytes());
    h.update(&(kfrag.len() as u64).to_be_bytes());
    h.update(kfrag);
    *h.finalize().as_bytes()
}

/// The digest a grant's signature covers: every field, and every sealed kfrag's hash.
pub fn grant_digest(grant: &Grant) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("pre-kms grant v1");
    for part in [grant.study_id.as_bytes(), grant.pseudonym.as_bytes()] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(&grant.threshold.to_be_bytes());
    h.update(&grant.expires_at.to_be_bytes());
    h.update(&(grant.categories.len() as u64).to_be_bytes());
    for c in &grant.categories {
        h.update(c.category.label().as_bytes());
        h.update(&[0]);
        h.update(&(c.sealed_kfrags.len() as u64).to_be_bytes());
        for k in &c.sealed_kfrags {
            h.update(blake3::hash(k).as_bytes());
        }
    }
    *h.finalize().as_bytes()
}

impl Grant {
    pub fn verify_signature(&self, patient_verifying_key: &PublicKey) -> Result<()> {
        if verify_signature(patient_verifying_key, &grant_digest(self), &self.signature) {
            Ok(())
        } else {
            Err(Error::BadSignature("grant"))
        }
    }
}

/// Makes a grant: kfrags per category, each sealed to its proxy, and signs it.
pub fn issue_with_rng(
    rng: &mut (impl CryptoRng + RngCore),
    patient: &Identity,
    plan: &GrantPlan,
) -> Result<Grant> {
    let shares = plan.proxy_keys.len();
    if plan.threshold == 0 || plan.threshold > shares {
        return Err(Error::Grant(format!(
            "threshold {} must be between 1 and the number of proxies ({shares})",
            plan.threshold
        )));
    }
    let pseudonym = patient.pseudonym();
    let signer = patient.signer();
    let mut categories = Vec::with_capacity(plan.categories.len());
    for &category in &plan.categories {
        let kfrags = umbral_pre::generate_kfrags_with_rng(
            rng,
            &patient.category_key(category),
            &plan.receiving_key,
            &signer,
            plan.threshold,
            shares,
            true,
            true,
        );
        let mut sealed_kfrags = Vec::with_capacity(shares);
        for (i, (kfrag, proxy_key)) in kfrags.iter().zip(&plan.proxy_keys).enumerate() {
            let kfrag_bytes = kfrag.to_bytes().expect("kfrag serialization cannot fail");
            let digest = payload_digest(
                &plan.study_id,
                &pseudonym,
                category,
                plan.expires_at,
                i as u32,
                &kfrag_bytes,
            );
            let payload = KfragPayload {
                study_id: plan.study_id.clone(),
                pseudonym: pseudonym.clone(),
                category,
                expires_at: plan.expires_at,
                proxy_index: i as u32,
                kfrag: hex::encode(&kfrag_bytes),
                signature: hex::encode(patient.sign_with_rng(rng, &digest)),
            };
            let json = serde_json::to_vec(&payload).expect("payload serializes");
            sealed_kfrags.push(Sealed::seal_with_rng(rng, proxy_key, &json)?.to_bytes(KFRAG_MAGIC));
        }
        categories.push(GrantCategory {
            category,
            sealed_kfrags,
        });
    }
    let mut grant = Grant {
        study_id: plan.study_id.clone(),
        pseudonym,
        threshold: plan.threshold as u32,
        expires_at: plan.expires_at,
        categories,
        signature: Vec::new(),
    };
    grant.signature = patient.sign_with_rng(rng, &grant_digest(&grant));
    Ok(grant)
}

pub fn issue(patient: &Identity, plan: &GrantPlan) -> Result<Grant> {
    issue_with_rng(&mut rand::rngs::OsRng, patient, plan)
}

/// What the broker tells a proxy about one deposited kfrag.
#[derive(Debug, Clone)]
pub struct DepositClaim {
    pub study_id: String,
    pub pseudonym: String,
    pub category: Category,
    pub expires_at: i64,
    pub proxy_index: u32,
    pub patient_verifying_key: PublicKey,
    pub delegating_key: PublicKey,
    pub receiving_key: PublicKey,
}

/// A kfrag that a proxy opened and verified against the claim it came with.
#[derive(Debug, Clone)]
pub struct CheckedKfrag {
    pub kfrag: VerifiedKeyFrag,
}

/// Opens a sealed kfrag with the proxy's key and checks everything it binds: the
/// payload matches the claim, the patient signed the payload, and the kfrag verifies
/// against the patient's signing, delegating and receiving keys.
pub fn open_deposit(proxy: &Identity, claim: &DepositClaim, sealed: &[u8]) -> Result<CheckedKfrag> {
    let sealed = Sealed::from_bytes(KFRAG_MAGIC, "sealed kfrag", sealed)?;
    let json = sealed
        .open(&proxy.encryption_key())
        .map_err(|_| Error::KfragRejected("not sealed to this proxy".into()))?;
    let payload: KfragPayload = serde_json::from_slice(&json)
        .map_err(|e| Error::KfragRejected(format!("payload does not parse: {e}")))?;
    if payload.study_id != claim.study_id
        || payload.pseudonym != claim.pseudonym
        || payload.category != claim.category
        || payload.expires_at != claim.expires_at
        || payload.proxy_index != claim.proxy_index
    {
        return Err(Error::KfragRejected(
            "payload does not match the deposit".into(),
        ));
    }
    let kfrag_bytes =
        hex::decode(&payload.kfrag).map_err(|_| Error::KfragRejected("kfrag is not hex".into()))?;
    let signature = hex::decode(&payload.signature)
        .map_err(|_| Error::KfragRejected("signature is not hex".into()))?;
    let digest = payload_digest(
        &payload.study_id,
        &payload.pseudonym,
        payload.category,
        payload.expires_at,
        payload.proxy_index,
        &kfrag_bytes,
    );
    if !verify_signature(&claim.patient_verifying_key, &digest, &signature) {
        return Err(Error::KfragRejected(
            "the patient's payload signature does not verify".into(),
        ));
    }
    let kfrag = KeyFrag::from_bytes(&kfrag_bytes)
        .map_err(|e| Error::KfragRejected(format!("kfrag does not parse: {e}")))?;
    let kfrag = kfrag
        .verify(
            &claim.patient_verifying_key,
            Some(&claim.delegating_key),
            Some(&claim.receiving_key),
        )
        .map_err(|(e, _)| Error::KfragRejected(e.to_string()))?;
    Ok(CheckedKfrag { kfrag })
}

pub fn kfrag_bytes(kfrag: &VerifiedKeyFrag) -> Vec<u8> {
    kfrag
        .to_bytes()
        .expect("kfrag serialization cannot fail")
        .to_vec()
}

/// Reloads a kfrag this proxy itself verified and stored.
pub fn reload_checked_kfrag(bytes: &[u8]) -> Result<VerifiedKeyFrag> {
    Ok(KeyFrag::from_bytes(bytes)
        .map_err(|e| Error::Storage(format!("stored kfrag does not parse: {e}")))?
        .skip_verification())
}
