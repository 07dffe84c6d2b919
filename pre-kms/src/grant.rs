//! Grants: a patient's signed delegation of some categories to one study.
//!
//! Per granted category the patient makes `n` kfrags (threshold `t`) from that
//! category's key to the study's receiving key, signed by the patient (umbral signs
//! both keys into every kfrag). Each kfrag travels inside a payload that binds it to
//! the study, the patient, the category and the expiry, signed again by the patient,
//! and sealed to one proxy's encryption key (magic `PKK1`), so that the broker relays
//! kfrags without being able to read them.
//!
//! Every grant has a random id chosen by the patient and the time it was issued, both
//! inside every signed kfrag payload: a proxy that has destroyed a grant's kfrags (the
//! grant was revoked or superseded) keeps its id and refuses it, and refuses any grant of
//! the same patient to the same study issued before the revocation, so a captured deposit
//! re-sent later restores nothing.

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
    /// `gr-` and 32 hex digits, random: the patient's name for this grant.
    pub grant_id: String,
    /// Unix milliseconds, by the patient's clock.
    pub issued_at: i64,
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
    grant_id: String,
    issued_at: i64,
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

/// The fields of a kfrag payload that its signature covers, besides the kfrag.
struct PayloadFields<'a> {
    grant_id: &'a str,
    issued_at: i64,
    study_id: &'a str,
    pseudonym: &'a str,
    category: Category,
    expires_at: i64,
    proxy_index: u32,
}

fn payload_digest(f: &PayloadFields<'_>, kfrag: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("pre-kms kfrag payload v2");
    for part in [
        f.grant_id.as_bytes(),
        f.study_id.as_bytes(),
        f.pseudonym.as_bytes(),
        f.category.label().as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(&f.issued_at.to_be_bytes());
    h.update(&f.expires_at.to_be_bytes());
    h.update(&f.proxy_index.to_be_bytes());
    h.update(&(kfrag.len() as u64).to_be_bytes());
    h.update(kfrag);
    *h.finalize().as_bytes()
}

/// Whether `id` has the form of a grant id (`gr-` and 32 lowercase hex digits).
pub fn is_grant_id(id: &str) -> bool {
    id.strip_prefix("gr-").is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The digest a grant's signature covers: every field, and every sealed kfrag's hash.
pub fn grant_digest(grant: &Grant) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("pre-kms grant v2");
    for part in [
        grant.grant_id.as_bytes(),
        grant.study_id.as_bytes(),
        grant.pseudonym.as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(&grant.issued_at.to_be_bytes());
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

/// Makes a grant issued at `issued_at` (unix ms): a fresh id from `rng`, kfrags per
/// category, each sealed to its proxy, and signs it.
pub fn issue_with_rng(
    rng: &mut (impl CryptoRng + RngCore),
    patient: &Identity,
    plan: &GrantPlan,
    issued_at: i64,
) -> Result<Grant> {
    let shares = plan.proxy_keys.len();
    if plan.threshold == 0 || plan.threshold > shares {
        return Err(Error::Grant(format!(
            "threshold {} must be between 1 and the number of proxies ({shares})",
            plan.threshold
        )));
    }
    let pseudonym = patient.pseudonym();
    let mut id = [0u8; 16];
    rng.fill_bytes(&mut id);
    let grant_id = format!("gr-{}", hex::encode(id));
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
                &PayloadFields {
                    grant_id: &grant_id,
                    issued_at,
                    study_id: &plan.study_id,
                    pseudonym: &pseudonym,
                    category,
                    expires_at: plan.expires_at,
                    proxy_index: i as u32,
                },
                &kfrag_bytes,
            );
            let payload = KfragPayload {
                grant_id: grant_id.clone(),
                issued_at,
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
        grant_id,
        issued_at,
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

/// Makes a grant issued now.
pub fn issue(patient: &Identity, plan: &GrantPlan) -> Result<Grant> {
    issue_with_rng(
        &mut rand::rngs::OsRng,
        patient,
        plan,
        crate::request_auth::now_ms(),
    )
}

/// What the broker tells a proxy about one deposited kfrag.
#[derive(Debug, Clone)]
pub struct DepositClaim {
    pub grant_id: String,
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
    /// When the patient issued the grant (unix ms), as the patient signed it.
    pub issued_at: i64,
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
    if payload.grant_id != claim.grant_id
        || payload.study_id != claim.study_id
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
        &PayloadFields {
            grant_id: &payload.grant_id,
            issued_at: payload.issued_at,
            study_id: &payload.study_id,
            pseudonym: &payload.pseudonym,
            category: payload.category,
            expires_at: payload.expires_at,
            proxy_index: payload.proxy_index,
        },
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
    Ok(CheckedKfrag {
        kfrag,
        issued_at: payload.issued_at,
    })
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
